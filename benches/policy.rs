//! Cost of one policy decision as per-agent policies grow: 10, 100 and 1000 policies of the shape
//! `permit(principal == Agent::"…", action == Action::"…", resource == Resource::"…") when { … }`,
//! through `PolicyEngine::decide` (scope-indexed) and over the full set (plain Cedar).
//!
//! Run: `cargo bench --bench policy`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use jitbroker::model::SpiffeId;
use jitbroker::policy::{PolicyEngine, PolicyRequest};

const ACTIONS: [&str; 4] = ["read", "write", "list", "delete"];
const RESOURCES: [&str; 8] = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];

fn policies(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "@id(\"agent-{i}\")\npermit(principal == Agent::\"spiffe://example.org/agent/a{i}\", \
                 action == Action::\"{}\", resource == Resource::\"{}\")\n\
                 when {{ principal.trust_domain == \"example.org\" && context.requested_ttl_seconds <= 600 \
                 && context.labels.contains(\"env=prod\") && resource.kind == \"token\" }};\n",
                ACTIONS[i % ACTIONS.len()],
                RESOURCES[i % RESOURCES.len()]
            )
        })
        .collect()
}

fn per_decision(
    engine: &PolicyEngine,
    agents: &[SpiffeId],
    indexed: bool,
    budget: Duration,
) -> (f64, usize) {
    let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
    let mut i = 0usize;
    let mut allowed = 0usize;
    let start = Instant::now();
    while start.elapsed() < budget || i < 200 {
        let a = i % agents.len();
        let req = PolicyRequest {
            principal: &agents[a],
            action: ACTIONS[a % ACTIONS.len()],
            resource: RESOURCES[a % RESOURCES.len()],
            purpose: "benchmark",
            task_age_seconds: 1,
            requested_ttl_seconds: 300,
            delegation_chain: std::slice::from_ref(&agents[a]),
            approved: false,
            labels: &labels,
            now_unix: 0,
            tool_call: None,
        };
        let v = if indexed {
            engine.decide(&req)
        } else {
            engine.decide_unindexed(&req)
        };
        if v.decision == jitbroker::model::Decision::Allowed {
            allowed += 1;
        }
        black_box(v);
        i += 1;
    }
    (
        start.elapsed().as_secs_f64() * 1e6 / i as f64,
        allowed * 100 / i,
    )
}

fn main() {
    println!("| policies | indexed µs/decision | full set µs/decision | speed-up | allowed |");
    println!("|---:|---:|---:|---:|---:|");
    for n in [10usize, 100, 1000] {
        let engine = PolicyEngine::new(
            RESOURCES
                .iter()
                .map(|r| (r.to_string(), "token".to_string()))
                .collect(),
            ACTIONS.iter().map(|a| a.to_string()).collect(),
            &policies(n),
            "bench",
        )
        .expect("policies load");
        let agents: Vec<SpiffeId> = (0..n)
            .map(|i| SpiffeId::parse("bench", &format!("spiffe://example.org/agent/a{i}")).unwrap())
            .collect();
        // Warm the subset cache and the allocator.
        per_decision(&engine, &agents, true, Duration::from_millis(200));
        let (indexed, ok_i) = per_decision(&engine, &agents, true, Duration::from_secs(2));
        let (full, ok_f) = per_decision(&engine, &agents, false, Duration::from_secs(2));
        assert_eq!(ok_i, ok_f, "identical decisions");
        println!(
            "| {n} | {indexed:.1} | {full:.1} | {:.1}× | {ok_i}% |",
            full / indexed
        );
    }
}
