//! Several broker replicas on one PostgreSQL database (`[store] engine = "postgres"`,
//! docs/ha.md): real `jitbroker serve` processes sharing one data directory (its dev CA and KEK)
//! and one throwaway PostgreSQL server (tests/common/pg.rs), killed with SIGKILL, stopped and
//! restarted; the database killed and its synchronous standby promoted. What the tests check is
//! read from the database itself and from the replicas' answers.
//!
//! These run in CI in a reduced size; `JITBROKER_HA_SCALE=N` multiplies the load (credentials,
//! agents, overdue entries).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::Pg;
use common::procs::BrokerProc;
use common::*;
use jitbroker::api::pb;
use tonic::Code;

/// One scenario at a time: each runs a database and several replicas on the machine's cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scale() -> usize {
    std::env::var("JITBROKER_HA_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A dev data directory configured for the PostgreSQL engine on `dsn` (written to a file);
/// `top` adds top-level settings, `tables` more tables.
fn ha_dir(dsn: &str, top: &str, tables: &str) -> tempfile::TempDir {
    let dir = dev_dir();
    let dsn_file = dir.path().join("store.dsn");
    std::fs::write(&dsn_file, dsn).unwrap();
    config(dir.path(), |t| {
        let t = t.replace(
            "log_format = \"plain\"\n",
            &format!("log_format = \"plain\"\n{top}\n"),
        );
        format!(
            "{t}\n{tables}\n[store]\nengine = \"postgres\"\ndsn_file = \"{}\"\npool_size = 8\n\
             [server]\nrequests_per_identity_per_second = 100000\n",
            dsn_file.display()
        )
    });
    dir
}

async fn replica(dir: &Path, n: usize) -> BrokerProc {
    BrokerProc::start(
        &dir.join("jitbroker.toml"),
        dir.join(format!("replica-{n}.log")),
        None,
    )
    .await
}

async fn replicas(dir: &Path, n: usize) -> Vec<BrokerProc> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(replica(dir, i).await);
    }
    v
}

/// A database and `n` replicas on it (`top`: top-level settings); `None` without PostgreSQL.
async fn cluster(n: usize, top: &str) -> Option<(Pg, tempfile::TempDir, Vec<BrokerProc>)> {
    let pg = Pg::start()?;
    let dir = ha_dir(&pg.admin_dsn(), top, "");
    let reps = replicas(dir.path(), n).await;
    Some((pg, dir, reps))
}

async fn stop_all(reps: Vec<BrokerProc>) {
    for r in reps {
        r.stop().await;
    }
}

/// `SELECT count(*) …` on the database.
async fn count(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    db.query_one(sql, params).await.unwrap().get(0)
}

fn agent(n: usize) -> String {
    format!("spiffe://jitbroker.dev/agent/ha-{n}")
}

/// Every audit entry in the database, parsed, in order.
async fn audit_rows(pg: &Pg) -> Vec<serde_json::Value> {
    let c = pg.admin().await;
    c.query("SELECT entry FROM audit ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).unwrap())
        .collect()
}

/// How many audit entries of `kind` name each credential.
fn per_credential(entries: &[serde_json::Value], kind: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in entries.iter().filter(|e| e["kind"] == kind) {
        let id = e["credential_id"].as_str().unwrap_or_default();
        *out.entry(id.to_owned()).or_insert(0) += 1;
    }
    out
}

/// Asks each replica to verify the audit chain.
async fn verify_everywhere(dir: &Path, reps: &[&BrokerProc]) {
    for r in reps {
        let mut op = clients_at(r.addr, dir, OPERATOR).await;
        let v = op
            .admin
            .verify_audit(pb::VerifyAuditRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(v.ok, "audit chain on {}: {v:?}", r.addr);
    }
}

/// A call retried once on the next replica when the first fails with UNAVAILABLE or cannot
/// connect, as a client of several replicas does; the same request (idempotency key) both
/// times.
async fn on_any<T, F, Fut>(clients: &mut [Clients], first: usize, mut call: F) -> Result<T, Code>
where
    F: FnMut(Clients) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let n = clients.len();
    let mut last = Code::Unknown;
    for attempt in 0..2 {
        let c = clients[(first + attempt) % n].clone();
        match call(c).await {
            Ok(v) => return Ok(v),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                last = s.code();
            }
            Err(s) => return Err(s.code()),
        }
    }
    Err(last)
}

/// A credential whose issuance a client saw acknowledged.
#[derive(Clone, Debug)]
struct Acked {
    id: String,
    secret: String,
    key: String,
}

/// One agent's load over the replicas until `until`: tasks with two token credentials each,
/// every call with an idempotency key and retried once on the next replica.
async fn agent_load(
    mut clients: Vec<Clients>,
    home: usize,
    name: usize,
    until: Instant,
    codes: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut round = 0usize;
    while Instant::now() < until {
        round += 1;
        let mut req = start_req(vec![grant("demo-token", "read")], 600);
        req.idempotency_key = format!("t-{name}-{round}");
        let t = on_any(&mut clients, home + round, |mut c| {
            let req = req.clone();
            async move { c.broker.start_task(req).await.map(|r| r.into_inner()) }
        })
        .await;
        let t = match t {
            Ok(t) => t,
            Err(code) => {
                *codes
                    .lock()
                    .unwrap()
                    .entry(format!("{code:?}"))
                    .or_default() += 1;
                continue;
            }
        };
        for k in 0..2 {
            let mut req = issue_req(&t.task_id, "demo-token", 300);
            req.idempotency_key = format!("c-{name}-{round}-{k}");
            let key = req.idempotency_key.clone();
            match on_any(&mut clients, home + round + k, |mut c| {
                let req = req.clone();
                async move { c.broker.issue_credential(req).await.map(|r| r.into_inner()) }
            })
            .await
            {
                Ok(c) => acked.push(Acked {
                    id: c.credential_id,
                    secret: c.secret,
                    key,
                }),
                Err(code) => {
                    *codes
                        .lock()
                        .unwrap()
                        .entry(format!("{code:?}"))
                        .or_default() += 1;
                }
            }
        }
    }
    acked
}

/// Proof 2: a replica SIGKILLed mid-load loses no acknowledged credential: every secret a
/// client received introspects active on the survivors, no idempotency key names two
/// credentials, the audit chain verifies on every survivor, and the trail holds exactly one
/// issuance entry per acknowledged credential. Calls that failed failed UNAVAILABLE (or with
/// the connection), never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_no_acknowledged_credential() {
    let _one = SERIAL.lock().await;
    let Some((pg, dir, mut reps)) = cluster(3, "").await else {
        return;
    };
    let agents = 3 * scale();
    let codes = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let until = Instant::now() + Duration::from_secs(4);
    let mut loads = Vec::new();
    for a in 0..agents {
        let mut clients = Vec::new();
        for r in &reps {
            clients.push(clients_at(r.addr, dir.path(), &agent(a)).await);
        }
        loads.push(tokio::spawn(agent_load(
            clients,
            a % 3,
            a,
            until,
            codes.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = reps.remove(0);
    victim.kill().await;
    let mut acked = Vec::new();
    for l in loads {
        acked.extend(l.await.unwrap());
    }
    let codes = codes.lock().unwrap().clone();
    assert!(
        !codes.contains_key("Internal"),
        "a call failed INTERNAL: {codes:?}"
    );
    assert!(acked.len() > 20, "the load ran: {} acked", acked.len());

    // Every acknowledged secret is active, asked of the survivors in turn.
    let mut tools = Vec::new();
    for r in &reps {
        tools.push(clients_at(r.addr, dir.path(), TOOL).await);
    }
    let n_tools = tools.len();
    for (i, a) in acked.iter().enumerate() {
        assert!(
            active(&mut tools[i % n_tools], &a.secret, "demo-token").await,
            "acknowledged credential {} (key {}) is not active",
            a.id,
            a.key
        );
    }
    let ids: HashSet<&str> = acked.iter().map(|a| a.id.as_str()).collect();
    let keys: HashSet<&str> = acked.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "one credential per acknowledgement");
    assert_eq!(
        keys.len(),
        acked.len(),
        "one credential per idempotency key"
    );
    let db = pg.admin().await;
    let dup = count(
        &db,
        "SELECT count(*) FROM (SELECT task_id, idem_key FROM credentials \
             WHERE idem_key IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) d",
        &[],
    )
    .await;
    assert_eq!(dup, 0, "an idempotency key names two credentials");

    let survivors: Vec<&BrokerProc> = reps.iter().collect();
    verify_everywhere(dir.path(), &survivors).await;
    let issued = per_credential(&audit_rows(&pg).await, "credential_issued");
    for a in &acked {
        assert_eq!(
            issued.get(&a.id),
            Some(&1),
            "one credential_issued entry for {}",
            a.id
        );
    }
    stop_all(reps).await;
}

/// Proof 7 and quotas: a block acknowledged by one replica is refused by the others at once,
/// even against concurrent StartTasks racing it (none of that identity's tasks is active after
/// the block returns); the per-identity task quota holds across replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_and_quota_hold_across_replicas() {
    let _one = SERIAL.lock().await;
    let Some((pg, dir, reps)) = cluster(3, "max_active_tasks_per_identity = 5").await else {
        return;
    };

    // Quota: 30 StartTasks of one identity at once over three replicas: exactly 5 succeed.
    let quota_agent = agent(100);
    let mut racers = Vec::new();
    for i in 0..30 {
        let mut c = clients_at(reps[i % 3].addr, dir.path(), &quota_agent).await;
        racers.push(tokio::spawn(async move {
            c.broker
                .start_task(start_req(vec![grant("demo-token", "read")], 600))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }));
    }
    let mut ok = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(()) => ok += 1,
            Err(c) => assert_eq!(c, Code::ResourceExhausted),
        }
    }
    assert_eq!(ok, 5, "the quota of 5 live tasks holds across replicas");

    // Kill switch: 50 StartTasks on replicas 1 and 2 race a block on replica 0.
    let target = agent(101);
    let mut racers = Vec::new();
    for i in 0..50 {
        let mut c = clients_at(reps[1 + i % 2].addr, dir.path(), &target).await;
        racers.push(tokio::spawn(async move {
            c.broker
                .start_task(start_req(vec![grant("demo-token", "read")], 600))
                .await
                .map(|r| r.into_inner().task_id)
        }));
    }
    let mut op = clients_at(reps[0].addr, dir.path(), OPERATOR).await;
    op.block(&target, "compromised").await.unwrap();
    // After the block returned: refused everywhere, at once.
    for r in &reps {
        let mut c = clients_at(r.addr, dir.path(), &target).await;
        let e = c
            .broker
            .start_task(start_req(vec![grant("demo-token", "read")], 600))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}: {e}", r.addr);
    }
    let db = pg.admin().await;
    let live = count(
        &db,
        "SELECT count(*) FROM tasks WHERE owner = $1 AND active",
        &[&target],
    )
    .await;
    // Racers still in flight after the block either committed before it (and were ended by it)
    // or see the block: none is live.
    for r in racers {
        let _ = r.await.unwrap();
    }
    let live_after = count(
        &db,
        "SELECT count(*) FROM tasks WHERE owner = $1 AND active",
        &[&target],
    )
    .await;
    assert_eq!(
        (live, live_after),
        (0, 0),
        "no task of a blocked identity is live"
    );
    stop_all(reps).await;
}

/// Proof 4: each expired credential is ended once, across replicas (one `credential_ended`
/// entry each), within its expiry plus 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_ends_each_expired_credential_once_across_replicas() {
    let _one = SERIAL.lock().await;
    let Some((pg, dir, reps)) = cluster(3, "").await else {
        return;
    };
    let n = 150 * scale();
    let mut ids = Vec::new();
    for (a, r) in reps.iter().enumerate() {
        let mut c = clients_at(r.addr, dir.path(), &agent(200 + a)).await;
        let t = c.start(vec![grant("demo-token", "read")], 600).await;
        for _ in 0..n / 3 {
            ids.push(c.issue(&t.task_id, "demo-token", 2).await.credential_id);
        }
    }
    let db = pg.admin().await;
    eventually("every credential is ended", || {
        let db = &db;
        async move {
            let left = count(
                db,
                "SELECT count(*) FROM credentials WHERE secret_hash IS NOT NULL",
                &[],
            )
            .await;
            left == 0
        }
    })
    .await;
    let rows = db
        .query("SELECT record FROM credentials", &[])
        .await
        .unwrap();
    let mut late = Vec::new();
    for r in &rows {
        let rec: serde_json::Value = serde_json::from_slice(r.get::<_, &[u8]>(0)).unwrap();
        let (exp, ended) = (
            rec["expires_at"].as_i64().unwrap(),
            rec["ended_at"].as_i64().unwrap(),
        );
        if ended > exp + 3_000 {
            late.push(ended - exp);
        }
    }
    assert!(late.is_empty(), "ended later than expiry + 3 s: {late:?}");
    let ended = per_credential(&audit_rows(&pg).await, "credential_ended");
    for id in &ids {
        assert_eq!(ended.get(id), Some(&1), "one credential_ended for {id}");
    }
    verify_everywhere(dir.path(), &reps.iter().collect::<Vec<_>>()).await;
    stop_all(reps).await;
}

/// Proof 5: every replica down while credentials expire: the first Introspect after a restart
/// says inactive, and the overdue entries are reaped in at most 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_replicas_down_then_expired_credentials_are_inactive_at_once() {
    let _one = SERIAL.lock().await;
    let Some((pg, dir, reps)) = cluster(2, "").await else {
        return;
    };
    let n = 400 * scale();
    let mut c = clients_at(reps[0].addr, dir.path(), &agent(300)).await;
    let mut secrets = Vec::new();
    let mut tasks = Vec::new();
    // Long enough to outlast the issuing, short enough to pass while every replica is down.
    const TTL: u32 = 8;
    let issuing = Instant::now();
    for _ in 0..n.div_ceil(50) {
        tasks.push(c.start(vec![grant("demo-token", "read")], 600).await);
    }
    let tasks = Arc::new(tasks);
    // Issued from a few concurrent callers to keep the setup short.
    let mut jobs = Vec::new();
    for w in 0..4 {
        let mut c = clients_at(reps[w % 2].addr, dir.path(), &agent(300)).await;
        let tasks = tasks.clone();
        jobs.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (w..n).step_by(4) {
                let t = &tasks[i / 50];
                out.push(c.issue(&t.task_id, "demo-token", TTL).await.secret);
            }
            out
        }));
    }
    for j in jobs {
        secrets.extend(j.await.unwrap());
    }
    for r in reps {
        r.kill().await;
    }
    let issued_in = issuing.elapsed();
    assert!(
        issued_in < Duration::from_secs(u64::from(TTL)),
        "issuing took {issued_in:?}: the first ones expired before every replica was down"
    );
    // Past every expiry with no replica running.
    tokio::time::sleep((issuing + Duration::from_secs(u64::from(TTL) + 1)) - Instant::now()).await;
    let r = replica(dir.path(), 9).await;
    let started = Instant::now();
    let mut tool = clients_at(r.addr, dir.path(), TOOL).await;
    for s in secrets.iter().take(50) {
        assert!(
            !active(&mut tool, s, "demo-token").await,
            "an expired credential answered active"
        );
    }
    let db = pg.admin().await;
    eventually("the overdue credentials are reaped", || {
        let db = &db;
        async move {
            let left = count(db, "SELECT count(*) FROM due WHERE kind = 'c'", &[]).await;
            left == 0
        }
    })
    .await;
    let took = started.elapsed();
    eprintln!("{n} overdue credentials reaped in {took:?} after the restart");
    assert!(took < Duration::from_secs(10), "{n} reaped in {took:?}");
    r.stop().await;
}

/// Proof 8 (cold start): replicas started together on an empty database serve one JWKS, and a
/// JWT issued by any replica verifies against the JWKS of every replica.
/// The JWKS replica `r` serves (asked as the tool).
async fn jwks_of(r: &BrokerProc, dir: &Path) -> String {
    let mut c = clients_at(r.addr, dir, TOOL).await;
    c.verifier
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks_json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_its_database_waits_for_it() {
    let _one = SERIAL.lock().await;
    let Some(pg) = Pg::start() else { return };
    let dir = ha_dir(&pg.admin_dsn(), "", "");
    pg.stop_server();
    let r = BrokerProc::spawn(
        &dir.path().join("jitbroker.toml"),
        dir.path().join("early.log"),
        None,
    );
    // It says why it waits (polled, bounded) and is not ready meanwhile.
    let waiting = poll_until(400, Duration::from_millis(50), || async {
        r.log_text().contains("database is not reachable yet")
    })
    .await;
    assert!(waiting, "{}", r.log_text());
    // Not ready meanwhile (its ops port may be bound and not yet answering).
    let ready = tokio::time::timeout(Duration::from_secs(1), r.is_ready()).await;
    assert!(!matches!(ready, Ok(true)));
    pg.start_server();
    r.wait_ready().await;
    let jwks = jwks_of(&r, dir.path()).await;
    assert!(jwks.contains("\"kid\""), "{jwks}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_cold_started_together_share_one_key_set() {
    let _one = SERIAL.lock().await;
    let Some(pg) = Pg::start() else { return };
    let dir = ha_dir(&pg.admin_dsn(), "", "");
    let config = dir.path().join("jitbroker.toml");
    let reps: Vec<BrokerProc> = (0..3)
        .map(|i| BrokerProc::spawn(&config, dir.path().join(format!("cold-{i}.log")), None))
        .collect();
    for r in &reps {
        r.wait_ready().await;
    }
    let mut jwks = Vec::new();
    for r in &reps {
        jwks.push(jwks_of(r, dir.path()).await);
    }
    assert!(
        jwks.iter().all(|j| *j == jwks[0]),
        "one JWKS on every replica: {jwks:?}"
    );
    let set: serde_json::Value = serde_json::from_str(&jwks[0]).unwrap();
    let kids: Vec<&str> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "one signing key");
    for r in &reps {
        let mut c = clients_at(r.addr, dir.path(), &agent(400)).await;
        let t = c.start(vec![grant("demo-jwt", "read")], 600).await;
        let jwt = c.issue(&t.task_id, "demo-jwt", 60).await.secret;
        let head = jwt.split('.').next().unwrap();
        use base64::Engine;
        let head: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(head)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(head["kid"], kids[0], "signed with the published key");
    }
    stop_all(reps).await;
}

/// Proof 6: the PostgreSQL primary is killed under load and its synchronous standby promoted
/// (the test plays the operator): no acknowledged credential is lost, calls during the outage
/// fail UNAVAILABLE (never INTERNAL), and every replica issues again within 5 s of the
/// promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failover_loses_no_acknowledged_credential() {
    let _one = SERIAL.lock().await;
    let Some(primary) = Pg::start() else { return };
    let standby = primary.start_standby("standby1");
    primary.require_sync_standby("standby1").await;
    let dsn = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} password={} dbname=postgres \
         target_session_attrs=read-write connect_timeout=2",
        primary.port,
        standby.port,
        common::pg::ADMIN,
        primary.password
    );
    let dir = ha_dir(&dsn, "", "");
    let reps = replicas(dir.path(), 2).await;
    let codes = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let until = Instant::now() + Duration::from_secs(8);
    let mut loads = Vec::new();
    for a in 0..2 {
        let mut clients = Vec::new();
        for r in &reps {
            clients.push(clients_at(r.addr, dir.path(), &agent(500 + a)).await);
        }
        loads.push(tokio::spawn(agent_load(
            clients,
            a,
            500 + a,
            until,
            codes.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    primary.stop_server();
    tokio::time::sleep(Duration::from_secs(1)).await;
    standby.promote();
    let promoted = Instant::now();
    // Every replica issues again, within 5 s of the promotion.
    for r in &reps {
        let c = clients_at(r.addr, dir.path(), &agent(550)).await;
        let back = poll_until(100, Duration::from_millis(50), || {
            let mut c = c.clone();
            async move {
                let Ok(t) = c
                    .broker
                    .start_task(start_req(vec![grant("demo-token", "read")], 600))
                    .await
                else {
                    return false;
                };
                c.broker
                    .issue_credential(issue_req(&t.into_inner().task_id, "demo-token", 60))
                    .await
                    .is_ok()
            }
        })
        .await;
        assert!(back, "{} issues again after the promotion", r.addr);
    }
    let took = promoted.elapsed();
    eprintln!("every replica issued again {took:?} after the promotion");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mut acked = Vec::new();
    for l in loads {
        acked.extend(l.await.unwrap());
    }
    let codes = codes.lock().unwrap().clone();
    eprintln!("failed calls by code: {codes:?}");
    assert!(!codes.contains_key("Internal"), "INTERNAL: {codes:?}");
    let mut tool = clients_at(reps[1].addr, dir.path(), TOOL).await;
    for a in &acked {
        assert!(
            active(&mut tool, &a.secret, "demo-token").await,
            "acknowledged credential {} lost in the failover",
            a.id
        );
    }
    verify_everywhere(dir.path(), &reps.iter().collect::<Vec<_>>()).await;
    stop_all(reps).await;
}

/// Proof 3: PostgreSQL credentials ended on a replica that is killed in the middle of revoking
/// them (after dropping a role, before recording it); two other replicas take its claims over
/// once they lapse: every role is gone, the queue is empty, and each credential has exactly one
/// `upstream_revoked` entry.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_happens_once_when_a_replica_dies_mid_revocation() {
    let _one = SERIAL.lock().await;
    let Some(pg) = Pg::start() else { return };
    pg.admin()
        .await
        .batch_execute("CREATE TABLE orders (id int, item text)")
        .await
        .unwrap();
    let admin_dsn = pg.admin_dsn();
    let dir = ha_dir(
        &admin_dsn,
        "",
        "[resources.orders-db]\nkind = \"postgres\"\nactions = [\"read\"]\n\n\
             [resources.orders-db.postgres]\nadmin_dsn_file = \"ADMIN_DSN\"\n\n\
             [resources.orders-db.postgres.grants.read]\n\
             statements = [\"GRANT SELECT ON orders TO {role}\"]\n\n\
             [revocation]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\n\
             attempt_timeout_ms = 1000\nreconcile_interval_seconds = 3600\n",
    );
    let dsn_file = dir.path().join("store.dsn");
    let toml = dir.path().join("jitbroker.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("ADMIN_DSN", &dsn_file.display().to_string()),
    )
    .unwrap();
    append_policy(
        dir.path(),
        "\n@id(\"agents-read-orders\")\npermit(principal, action == Action::\"read\", resource == Resource::\"orders-db\")\nwhen { principal.path like \"/agent/*\" };\n",
    );
    let reps = replicas(dir.path(), 2).await;
    let n = 60 * scale();
    let mut c = clients_at(reps[0].addr, dir.path(), &agent(600)).await;
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n.div_ceil(10) {
        let t = c.start(vec![grant("orders-db", "read")], 600).await;
        for _ in 0..10.min(n - i * 10) {
            ids.push(c.issue(&t.task_id, "orders-db", 300).await.credential_id);
        }
        tasks.push(t.task_id);
    }
    assert_eq!(pg.roles("jb_").await.len(), n);
    // The tasks end on a replica that stops after its first drop, before recording it: the
    // only replica running then, so that it is the one that claims the revocations.
    stop_all(reps).await;
    let doomed = BrokerProc::start(
        &toml,
        dir.path().join("doomed.log"),
        Some("revoke-after-drop"),
    )
    .await;
    let mut c = clients_at(doomed.addr, dir.path(), &agent(600)).await;
    // The crash point parks one of the replica's runtime threads, which may hold a call in
    // flight: a completion that does not come back is made again on the replicas below.
    let mut unanswered = Vec::new();
    for t in &tasks {
        if tokio::time::timeout(Duration::from_secs(5), c.complete(t))
            .await
            .is_err()
        {
            unanswered.push(t.clone());
        }
    }
    doomed.kill_at("revoke-after-drop").await;
    // Two replicas take over its claims once they lapse.
    let reps = replicas(dir.path(), 2).await;
    let mut c = clients_at(reps[0].addr, dir.path(), &agent(600)).await;
    for t in &unanswered {
        let r = c
            .broker
            .complete_task(pb::CompleteTaskRequest { task_id: t.clone() })
            .await;
        // Done already (only the answer was lost), or done now.
        if let Err(e) = r {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        }
    }
    let db = pg.admin().await;
    eventually("every role is dropped and the queue is empty", || {
        let db = &db;
        let pg = &pg;
        async move {
            let queued = count(db, "SELECT count(*) FROM revocations", &[]).await;
            queued == 0 && pg.roles("jb_").await.is_empty()
        }
    })
    .await;
    let revoked = per_credential(&audit_rows(&pg).await, "upstream_revoked");
    for id in &ids {
        assert_eq!(revoked.get(id), Some(&1), "one upstream_revoked for {id}");
    }
    assert_eq!(revoked.len(), n, "and none for anything else");
    verify_everywhere(dir.path(), &reps.iter().collect::<Vec<_>>()).await;
    stop_all(reps).await;
}

/// Readiness and outages at the engine: a clock more than `max_clock_skew_ms` away from the
/// database's fails readiness and says so; with the database down every call fails UNAVAILABLE
/// (never INTERNAL); once it is back the same engine serves again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_and_its_clock() {
    use jitbroker::broker::Clock;
    use jitbroker::store::{PgSettings, PgStore, Store};
    let _one = SERIAL.lock().await;
    let Some(pg) = Pg::start() else { return };
    let store = PgStore::connect(PgSettings {
        dsn: pg.admin_dsn().into(),
        tls: None,
        pool_size: 4,
    })
    .await
    .unwrap();
    let now = jitbroker::broker::SystemClock.now();
    store.check_ready(now, 1_000).await.unwrap();
    let e = store.check_ready(now + 10_000, 1_000).await.unwrap_err();
    assert!(
        matches!(e, jitbroker::error::Error::Unavailable(_)) && e.to_string().contains("clock"),
        "{e}"
    );

    pg.stop_server();
    let e = store.check_ready(now, 1_000).await.unwrap_err();
    assert!(matches!(e, jitbroker::error::Error::Unavailable(_)), "{e}");
    let id = jitbroker::model::TaskId::generate();
    let e = store.get_task(&id).await.unwrap_err();
    assert!(matches!(e, jitbroker::error::Error::Unavailable(_)), "{e}");
    let e = match store.begin().await {
        Ok(mut u) => u.lock_task(&id).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(e, jitbroker::error::Error::Unavailable(_)), "{e}");

    pg.start_server();
    store.check_ready(now, 60_000).await.unwrap();
    assert!(store.get_task(&id).await.unwrap().is_none());
    let mut u = store.begin().await.unwrap();
    assert!(u.lock_task(&id).await.unwrap().is_none());
    u.commit().await.unwrap();
}
