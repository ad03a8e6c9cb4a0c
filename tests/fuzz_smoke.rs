//! Fuzzing on stable Rust: a mutation loop per target, seeded from the corpus in
//! `tests/fuzz/corpus/<target>/`, for a bounded time (`JITBROKER_FUZZ_SECONDS` per target, 3 by
//! default; `JITBROKER_FUZZ_SEED` picks another sequence of mutations). Every input must be
//! answered with a result or an error, never a panic; an input that panics is printed in hex so
//! it can be added to the corpus. Inputs are capped at 64 KiB.
//!
//! Targets: request decoding and validation (through the broker), configuration parsing,
//! policy text and policy input, sealed-record opening, audit-segment reading.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::executor::block_on;
use jitbroker::api::pb;
use jitbroker::audit::Event;
use jitbroker::broker::{self, Broker, Core, Limits, ManualClock};
use jitbroker::model::SpiffeId;
use jitbroker::policy::{PolicyEngine, PolicyRequest};
use jitbroker::store::crypto::{Kek, Sealer};
use jitbroker::store::{SledStore, Storage, Store};
use prost::Message;

const MAX_INPUT: usize = 64 * 1024;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Self {
        let seed = std::env::var("JITBROKER_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
        Self((seed ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that matter to the formats under test, spliced in by the mutator.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\n",
    b"[",
    b"]",
    b"{",
    b"}",
    b"=",
    b"::",
    b"\0",
    b"\xff\xff\xff\xff\x0f",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"permit(",
    b"forbid(",
    b"when {",
    b"unless {",
    b"principal",
    b"resource",
    b"action",
    b"context.",
    b"like \"*\"",
    b"[resources.x]",
    b"kind = \"postgres\"",
    b"source = \"files\"",
    b"9999999999999999999999",
    b"-1",
    b"\xf0\x9f\x92",
    b"spiffe://",
    b"{role}",
    b"@id(\"",
    b"@approval(\"required\")",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(i..i, t.iter().copied());
            }
            3 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + rng.below(16) + 1).min(v.len());
                v.drain(a..b);
            }
            4 if !v.is_empty() => {
                // Repeat a slice: long names, deep nesting, many fields.
                let a = rng.below(v.len());
                let b = (a + rng.below(64) + 1).min(v.len());
                let chunk = v[a..b].to_vec();
                for _ in 0..rng.below(8) + 1 {
                    v.splice(a..a, chunk.iter().copied());
                }
            }
            5 => v.truncate(rng.below(v.len() + 1)),
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v.truncate(MAX_INPUT);
    v
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "empty corpus {}", dir.display());
    seeds.sort();
    seeds
}

fn budget() -> Duration {
    let secs = std::env::var("JITBROKER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Runs `check` on the seeds, then on mutations of them, until the budget is spent. Returns
/// how many inputs ran.
fn fuzz_sync(target: &str, salt: u64, mut check: impl FnMut(&[u8])) -> u64 {
    let seeds = corpus(target);
    let mut rng = Rng::new(salt);
    let until = Instant::now() + budget();
    let mut n = 0u64;
    let mut run = |input: &[u8]| {
        if std::panic::catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            panic!("{target}: panicked on input {}", hex::encode(input));
        }
    };
    for s in &seeds {
        run(s);
        n += 1;
    }
    while Instant::now() < until {
        let pick = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[pick]);
        run(&input);
        n += 1;
    }
    eprintln!("fuzz {target}: {n} inputs in {:?}", budget());
    n
}

#[test]
fn fuzz_config_parsing() {
    let n = fuzz_sync("config", 1, |input| {
        let text = String::from_utf8_lossy(input);
        let _ = jitbroker::config::Config::from_toml(&text, "fuzz", |_| None);
    });
    assert!(n > 10);
}

#[test]
fn fuzz_policy_text_and_input() {
    let resources: BTreeMap<String, String> = [
        ("tickets", "token"),
        ("payments", "token"),
        ("accounts", "jwt"),
        ("repo", "token"),
        ("deploy", "token"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let actions: Vec<String> = ["read", "draft", "refund:issue", "accounts:export", "write"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let principal = SpiffeId::parse("p", "spiffe://example.org/ns/support/sa/bot").unwrap();
    let mut rng = Rng::new(2);
    let n = fuzz_sync("policy", 2, |input| {
        let text = String::from_utf8_lossy(input);
        let Ok(engine) = PolicyEngine::new(resources.clone(), actions.clone(), &text, "fuzz")
        else {
            return;
        };
        // Policy input: odd purposes, labels and numbers against whatever policy parsed.
        let junk = String::from_utf8_lossy(&mutate(&mut rng, input)).into_owned();
        let labels: BTreeMap<String, String> =
            [("k".to_owned(), junk.chars().take(256).collect())].into();
        for (action, resource) in [
            ("read", "tickets"),
            ("refund:issue", "payments"),
            ("x", "y"),
        ] {
            let _ = engine.decide(&PolicyRequest {
                principal: &principal,
                action,
                resource,
                purpose: &junk,
                task_age_seconds: rng.next() as i64,
                requested_ttl_seconds: rng.next() as i64,
                delegation_chain: std::slice::from_ref(&principal),
                approved: rng.below(2) == 1,
                labels: &labels,
                now_unix: rng.next() as i64,
                tool_call: None,
            });
        }
    });
    assert!(n > 10);
}

#[test]
fn fuzz_sealed_record_opening() {
    let key = || jitbroker::store::crypto::random_key();
    let sealer = Sealer::new((7, key()), vec![(3, key())], key());
    let plain = b"postgresql://jb_x:secret@db:5432/app";
    let sealed = sealer.seal("credentials", b"crd_1", plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("sealed.bin");
    std::fs::write(&seed, &sealed).unwrap();
    let mut rng = Rng::new(3);
    let until = Instant::now() + budget();
    let mut n = 0;
    while Instant::now() < until {
        let input = mutate(&mut rng, &sealed);
        let opened = std::panic::catch_unwind(|| sealer.open("credentials", b"crd_1", &input))
            .unwrap_or_else(|_| panic!("sealed: panicked on input {}", hex::encode(&input)));
        // Authenticated encryption: anything but the sealed bytes themselves is refused.
        if input != sealed {
            assert!(
                opened.is_err(),
                "a changed sealed value opened: {}",
                hex::encode(&input)
            );
        }
        // The same bytes under another record key are refused too.
        assert!(sealer.open("credentials", b"crd_2", &input).is_err());
        n += 1;
    }
    eprintln!("fuzz sealed: {n} inputs");
    assert!(n > 10);
}

#[tokio::test]
async fn fuzz_audit_segment_reading() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::create(&dir.path().join("kek")).unwrap();
    let store = SledStore::open(&dir.path().join("db"), &kek).unwrap();
    let mut u = store.begin().await.unwrap();
    for i in 0..20 {
        u.audit(
            i,
            Event {
                kind: "decision".into(),
                spiffe_id: format!("spiffe://td/agent/{i}"),
                reason: "fuzz \"quoted\" \\ reason".into(),
                ..Default::default()
            },
        );
    }
    u.commit().await.unwrap();
    let archive = dir.path().join("archive");
    let cp = jitbroker::audit::archive::write_segment(
        &store,
        &archive,
        1,
        20,
        jitbroker::audit::GENESIS,
    )
    .await
    .unwrap();
    jitbroker::audit::archive::put_checkpoint(&store, &cp)
        .await
        .unwrap();
    let segment = archive.join(&cp.segment);
    let original = std::fs::read(&segment).unwrap();
    assert!(
        block_on(jitbroker::audit::verify(&store, Some(&archive)))
            .unwrap()
            .ok
    );
    let mut rng = Rng::new(4);
    let until = Instant::now() + budget();
    let mut n = 0;
    while Instant::now() < until {
        let input = mutate(&mut rng, &original);
        std::fs::write(&segment, &input).unwrap();
        let v = std::panic::catch_unwind(AssertUnwindSafe(|| {
            block_on(jitbroker::audit::verify(&store, Some(&archive)))
        }))
        .unwrap_or_else(|_| panic!("audit segment: panicked on input {}", hex::encode(&input)));
        // A changed segment never verifies (its checksum is in the store's checkpoint).
        if input != original {
            assert!(!v.unwrap().ok, "a changed segment verified");
        }
        n += 1;
    }
    std::fs::write(&segment, &original).unwrap();
    assert!(
        block_on(jitbroker::audit::verify(&store, Some(&archive)))
            .unwrap()
            .ok
    );
    eprintln!("fuzz audit segment: {n} inputs");
    assert!(n > 10);
}

/// A broker on a temp store with the token resources of the dev configuration.
async fn broker(dir: &Path) -> Broker {
    let kek = Kek::create(&dir.join("kek")).unwrap();
    let engine: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("db"), &kek).unwrap());
    let store = Arc::new(Storage::open(engine, &kek).await.unwrap());
    let policy = Arc::new(
        PolicyEngine::new(
            [("demo-token".to_owned(), "token".to_owned())].into(),
            vec!["read".into(), "write".into()],
            r#"@id("agents") permit(principal, action == Action::"read", resource)
               when { principal.path like "/agent/*" };"#,
            "fuzz",
        )
        .unwrap(),
    );
    let limits = Limits {
        resources: [(
            "demo-token".to_owned(),
            broker::ResourceSpec {
                kind: jitbroker::config::ResourceKind::Token,
                actions: ["read".to_owned(), "write".to_owned()].into(),
                verifiers: HashSet::new(),
                max_ttl_seconds: 600,
                inject: None,
                oauth_resource: None,
            },
        )]
        .into(),
        max_ttl_seconds: 3600,
        default_ttl_seconds: 300,
        max_active_tasks_per_identity: 1_000_000,
        max_credentials_per_task: 1_000_000,
        admin_ids: HashSet::new(),
        approver_ids: HashSet::new(),
        authorized_trust_domains: ["td".to_owned()].into(),
        approval_ttl_ms: 900_000,
        ended_retention_ms: 3_600_000,
        max_delegation_depth: 2,
        gateway: None,
        gateway_ids: HashSet::new(),
        oauth: None,
    };
    Broker::assemble(
        Core::new(
            store,
            policy,
            Arc::new(ManualClock::new()),
            limits,
            "spiffe://td/jitbroker".into(),
            Arc::new(jitbroker::telemetry::Metrics::default()),
            None,
        )
        .await
        .unwrap(),
    )
}

#[tokio::test]
async fn fuzz_request_decoding_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let agent = SpiffeId::parse("a", "spiffe://td/agent/a").unwrap();
    let seeds = corpus("request");
    let mut rng = Rng::new(5);
    let until = Instant::now() + budget();
    let (mut n, mut decoded, mut accepted) = (0u64, 0u64, 0u64);
    let mut inputs = seeds.clone();
    while Instant::now() < until || !inputs.is_empty() {
        let input = inputs.pop().unwrap_or_else(|| {
            let pick = rng.below(seeds.len());
            mutate(&mut rng, &seeds[pick])
        });
        let run = async {
            let mut ok = 0;
            let mut dec = 0;
            if let Ok(r) = pb::StartTaskRequest::decode(&input[..]) {
                dec += 1;
                let req = broker::StartTask {
                    purpose: r.purpose,
                    grants: r
                        .grants
                        .into_iter()
                        .map(|g| jitbroker::model::Grant {
                            resource: g.resource,
                            action: g.action,
                        })
                        .collect(),
                    ttl_seconds: r.ttl_seconds,
                    labels: r.labels,
                    idempotency_key: r.idempotency_key,
                };
                if let Ok(t) = b.tasks.start_task(&agent, req).await {
                    ok += 1;
                    // Complete it, so that quotas never end the run early.
                    let _ = b.tasks.complete_task(&agent, t.id.as_str()).await;
                }
            }
            if let Ok(r) = pb::IssueCredentialRequest::decode(&input[..]) {
                dec += 1;
                let _ = b
                    .credentials
                    .issue_credential(
                        &agent,
                        broker::IssueCredential {
                            task_id: r.task_id,
                            resource: r.resource,
                            action: r.action,
                            ttl_seconds: r.ttl_seconds,
                            idempotency_key: r.idempotency_key,
                        },
                    )
                    .await;
            }
            if let Ok(r) = pb::IntrospectRequest::decode(&input[..]) {
                dec += 1;
                let _ = b
                    .credentials
                    .introspect(&agent, &r.secret, &r.resource)
                    .await;
            }
            if let Ok(r) = pb::DelegateTaskRequest::decode(&input[..]) {
                dec += 1;
                let _ = b
                    .tasks
                    .delegate_task(
                        &agent,
                        broker::delegation::DelegateTask {
                            parent_task_id: r.parent_task_id,
                            delegate_spiffe_id: r.delegate_spiffe_id,
                            purpose: r.purpose,
                            grants: vec![],
                            ttl_seconds: r.ttl_seconds,
                        },
                    )
                    .await;
            }
            (dec, ok)
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok((d, o)) => {
                decoded += d;
                accepted += o;
            }
            Err(_) => panic!("request: panicked on input {}", hex::encode(&input)),
        }
        n += 1;
    }
    eprintln!("fuzz request: {n} inputs, {decoded} decoded, {accepted} tasks started");
    assert!(n > 10 && accepted >= 1, "the seeds must reach the broker");
}
