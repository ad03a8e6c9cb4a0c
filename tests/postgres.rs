//! PostgreSQL credentials against a real, throwaway PostgreSQL (DESIGN §6, §8): a role per
//! credential that can read what it was granted and nothing else; gone with its task or its TTL,
//! sessions included; revocations that wait out an outage without giving up; crash points killed
//! with SIGKILL and recovered; hand-made roles with the broker's prefix removed by the reconciler.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::pg::Pg;
use common::procs::BrokerProc;
use common::*;
use jitbroker::api::pb;
use jitbroker::broker::{Clock, ManualClock};
use jitbroker::store::Store;

const PREFIX: &str = "jb_";

/// A throwaway PostgreSQL (`None`: skip the test) with the test tables: `orders` is granted to
/// the `read` action, `payroll` is not.
async fn seeded() -> Option<Pg> {
    let pg = Pg::start()?;
    pg.admin()
        .await
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (id int, item text);
             INSERT INTO orders VALUES (1, 'tea'), (2, 'cake');
             CREATE TABLE IF NOT EXISTS payroll (who text, pay int);
             INSERT INTO payroll VALUES ('ceo', 1000000);",
        )
        .await
        .unwrap();
    Some(pg)
}

/// The dev config plus an `orders-db` postgres resource and fast revocation retries.
fn pg_config(dir: &Path, pg: &Pg) -> jitbroker::config::Config {
    let dsn = pg.write_admin_dsn(dir);
    append_policy(
        dir,
        "\n@id(\"agents-read-orders\")\npermit(principal, action == Action::\"read\", resource == Resource::\"orders-db\")\nwhen { principal.path like \"/agent/*\" };\n",
    );
    config(dir, |t| {
        format!(
            "{t}
[resources.orders-db]
kind = \"postgres\"
actions = [\"read\"]

[resources.orders-db.postgres]
admin_dsn_file = \"{}\"
role_prefix = \"{PREFIX}\"

[resources.orders-db.postgres.grants.read]
statements = [\"GRANT SELECT ON orders TO {{role}}\"]

[revocation]
backoff_initial_ms = 50
backoff_max_ms = 400
attempt_timeout_ms = 3000
reconcile_interval_seconds = 1
",
            dsn.display()
        )
    })
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    ops_get(addr, "/metrics").await
}

fn db_msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

fn pg_issue(task_id: &str, ttl: u32) -> pb::IssueCredentialRequest {
    issue_req(task_id, "orders-db", ttl)
}

/// A task granted `orders-db` read (10 minutes).
async fn orders_task(c: &mut Clients) -> pb::Task {
    c.start(vec![grant("orders-db", "read")], 600).await
}

/// An `orders-db` credential (a real role) for the task.
async fn orders_credential(c: &mut Clients, task_id: &str, ttl: u32) -> pb::Credential {
    c.issue(task_id, "orders-db", ttl).await
}

/// The agent's clients of `r`, a task granted `orders-db` read and a credential of it (300 s).
async fn agent_with_role(r: &Running) -> (Clients, pb::Task, pb::Credential) {
    let mut c = clients(r, AGENT).await;
    let task = orders_task(&mut c).await;
    let cred = orders_credential(&mut c, &task.task_id, 300).await;
    (c, task, cred)
}

/// The rows of `orders`, as `session` counts them.
async fn count_orders(session: &tokio_postgres::Client) -> i64 {
    session
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until no role with the broker's prefix is left.
async fn no_roles_left(pg: &Pg, what: &str) {
    eventually(what, || async { pg.roles(PREFIX).await.is_empty() }).await;
}

#[tokio::test]
async fn role_reads_what_it_was_granted_and_dies_with_its_task_or_ttl() {
    let Some(pg) = seeded().await else { return };
    let dir = dev_dir();
    let cfg = pg_config(dir.path(), &pg);
    let clock = ManualClock::new();
    let r = spawn(&cfg, clock_options(&clock, true)).await.unwrap();

    // Issue: a DSN as the secret, the parts as attributes.
    let (mut c, task, cred) = agent_with_role(&r).await;
    let user = cred.attributes["user"].clone();
    assert!(user.starts_with(PREFIX), "{user}");
    assert_eq!(cred.attributes["port"], pg.port.to_string());
    assert_eq!(pg.roles(PREFIX).await, vec![user.clone()]);
    // The server stores a SCRAM verifier, never the password.
    let stored: String = pg
        .admin()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert!(!cred.secret.contains(&stored));

    // It reads what it was granted, and nothing else.
    let session = Pg::connect(&cred.secret)
        .await
        .expect("login with the issued DSN");
    assert_eq!(count_orders(&session).await, 2);
    let denied = session
        .query_one("SELECT count(*) FROM payroll", &[])
        .await
        .unwrap_err();
    assert!(db_msg(&denied).contains("permission denied"), "{denied:?}");
    let write = session
        .execute("INSERT INTO orders VALUES (3, 'x')", &[])
        .await
        .unwrap_err();
    assert!(db_msg(&write).contains("permission denied"), "{write:?}");

    // CompleteTask: the role is dropped and its open session is cut.
    c.complete(&task.task_id).await;
    no_roles_left(&pg, "the role is dropped after CompleteTask").await;
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the open session survived revocation"
    );
    assert!(
        Pg::connect(&cred.secret).await.is_err(),
        "login after revocation"
    );

    // TTL: the credential expires on the broker's clock; the reaper ends it and the role goes.
    let t2 = orders_task(&mut c).await;
    let cred2 = orders_credential(&mut c, &t2.task_id, 60).await;
    let s2 = Pg::connect(&cred2.secret).await.unwrap();
    count_orders(&s2).await;
    clock.advance(Duration::from_secs(61));
    no_roles_left(&pg, "the role is dropped after its TTL").await;
    assert!(s2.query_one("SELECT 1", &[]).await.is_err());
    assert!(Pg::connect(&cred2.secret).await.is_err());
    // Nothing left queued.
    let m = metrics(r.ops_addr).await;
    assert!(m.contains("jitbroker_revocation_debt 0"), "{m}");
    assert!(
        m.contains("jitbroker_credentials_issued_total{kind=\"postgres\"} 2"),
        "{m}"
    );
    drop(c);
    r.stop().await;
    // The passwords were sealed at rest: not in the data directory, in any form.
    for dsn in [&cred.secret, &cred2.secret] {
        let pw = dsn
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, pw)| pw.to_owned())
            .expect("a password in the DSN");
        for (path, bytes) in all_bytes(dir.path()) {
            assert!(
                !contains(&bytes, pw.as_bytes()),
                "a PostgreSQL password in plaintext in {}",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn revocation_waits_out_a_database_outage_without_giving_up() {
    let logs = LogCapture::shared();
    let Some(pg) = seeded().await else { return };
    let dir = dev_dir();
    let cfg = pg_config(dir.path(), &pg);
    let r = spawn_default(&cfg).await;
    let (mut c, task, cred) = agent_with_role(&r).await;
    let user = cred.attributes["user"].clone();

    // The database goes away; completion still succeeds and the revocation is queued.
    pg.stop_server();
    let done = c.complete(&task.task_id).await;
    assert_eq!(
        done.revoked_credential_ids,
        vec![cred.credential_id.clone()]
    );
    let m = metrics(r.ops_addr).await;
    assert!(m.contains("jitbroker_revocation_debt 1"), "{m}");
    // Issuance while it is down fails cleanly (and queues the cleanup of the half-made name).
    let t2 = orders_task(&mut c).await;
    let e = c
        .broker
        .issue_credential(pg_issue(&t2.task_id, 300))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Far more failed attempts than the handful after which some managers give up (backoff is
    // capped at 400 ms here; in production the cap is seconds, the principle is the same).
    let failures = || {
        String::from_utf8_lossy(&logs.text())
            .matches("upstream revocation failed; will retry")
            .count()
    };
    eventually("a dozen failed attempts", || async { failures() >= 12 }).await;
    let m = metrics(r.ops_addr).await;
    assert!(m.contains("jitbroker_revocation_debt 2"), "{m}");
    assert!(
        !m.contains("jitbroker_revocation_oldest_pending_seconds 0\n"),
        "{m}"
    );

    // The database returns: the role is gone within moments, and the queue is empty.
    pg.start_server();
    no_roles_left(&pg, "the queued revocation runs once PostgreSQL is back").await;
    eventually("the revocation debt is paid", || async {
        metrics(r.ops_addr)
            .await
            .contains("jitbroker_revocation_debt 0")
    })
    .await;
    assert!(!pg.roles("").await.contains(&user));
    // And issuance works again.
    c.broker
        .issue_credential(pg_issue(&t2.task_id, 300))
        .await
        .expect("issuance after the outage");
    drop(c);
    r.stop().await;
}

#[tokio::test]
async fn reconciler_removes_hand_made_roles_with_the_prefix() {
    let Some(pg) = seeded().await else { return };
    let admin = pg.admin().await;
    admin
        .batch_execute(
            "CREATE ROLE jb_handmade LOGIN PASSWORD 'x'; CREATE ROLE app_owner LOGIN PASSWORD 'y';
             GRANT SELECT ON orders TO jb_handmade;",
        )
        .await
        .unwrap();
    let dir = dev_dir();
    let cfg = pg_config(dir.path(), &pg);
    let r = spawn_default(&cfg).await;
    let (c, _task, cred) = agent_with_role(&r).await;
    let mine = cred.attributes["user"].clone();
    eventually("the hand-made role is removed", || async {
        pg.roles(PREFIX).await == vec![mine.clone()]
    })
    .await;
    // A later hand-made role goes too; roles without the prefix are not the broker's business.
    admin
        .batch_execute("CREATE ROLE jb_later LOGIN PASSWORD 'z'")
        .await
        .unwrap();
    eventually("the later hand-made role is removed", || async {
        pg.roles(PREFIX).await == vec![mine.clone()]
    })
    .await;
    assert_eq!(pg.roles("app_").await, vec!["app_owner".to_owned()]);
    // The live credential was never touched.
    let s = Pg::connect(&cred.secret).await.unwrap();
    count_orders(&s).await;
    drop(c);
    r.stop().await;
}

/// A broker process for the crash tests, on the dev dir `dir` (its log `broker-N.log` there).
async fn start_proc(dir: &Path, failpoint: Option<&str>, n: usize) -> BrokerProc {
    BrokerProc::start(
        &dir.join("jitbroker.toml"),
        dir.join(format!("broker-{n}.log")),
        failpoint,
    )
    .await
}

/// The ledger's view, read offline from the stopped broker's store: (roles of live postgres
/// credentials, queued revocations).
fn ledger(dir: &Path) -> (Vec<String>, usize) {
    let kek = jitbroker::store::crypto::Kek::load(&dir.join("kek")).unwrap();
    let store = jitbroker::store::SledStore::open(&dir.join("db"), &kek).unwrap();
    let now = jitbroker::broker::SystemClock.now();
    let mut live = Vec::new();
    use futures::executor::block_on;
    for t in block_on(store.scan_tasks(None, 100_000)).unwrap() {
        for cid in block_on(store.credentials_of_task(&t.id)).unwrap() {
            let c = block_on(store.get_credential(&cid)).unwrap().unwrap();
            if c.kind == "postgres" && c.is_live(now) {
                live.push(c.attributes["user"].clone());
            }
        }
    }
    live.sort();
    (live, block_on(store.revocations()).unwrap().len())
}

/// SIGKILL at each step of issue and revoke, then restart: no role survives that the ledger
/// does not hold as live, and no acknowledged credential is lost.
/// Needs the crash points: `cargo test --features failpoints` (as scripts/test.sh runs it).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn crash_at_every_step_leaves_no_unknown_role_and_loses_no_credential() {
    let Some(pg) = seeded().await else { return };
    for (n, point) in [
        "issue-after-intent",
        "issue-after-create",
        "issue-before-reply",
        "revoke-after-terminate",
        "revoke-after-drop",
    ]
    .into_iter()
    .enumerate()
    {
        let dir = dev_dir();
        let d = dir.path();
        pg_config(d, &pg);
        // An acknowledged credential that must survive everything, issued before the crash.
        let p = start_proc(d, Some(point), 0).await;
        let mut c = clients_at(p.addr, d, AGENT).await;
        let keep_task = orders_task(&mut c).await;
        let kept = if point.starts_with("issue") {
            None
        } else {
            Some(orders_credential(&mut c, &keep_task.task_id, 300).await)
        };
        if point.starts_with("issue") {
            // The issuance that crashes: its reply never comes.
            let mut b = c.broker.clone();
            let tid = keep_task.task_id.clone();
            tokio::spawn(async move {
                let _ = b.issue_credential(pg_issue(&tid, 300)).await;
            });
        } else {
            // Complete a second task whose revocation crashes midway.
            let t = orders_task(&mut c).await;
            orders_credential(&mut c, &t.task_id, 300).await;
            c.complete(&t.task_id).await;
        }
        drop(c);
        p.kill_at(point).await;

        // Restart without the crash point; recovery and the queue converge.
        let p = start_proc(d, None, 1).await;
        let kept_user = kept.as_ref().map(|k| k.attributes["user"].clone());
        let expected_at_least: Vec<String> = kept_user.iter().cloned().collect();
        eventually(
            &format!("[{point}] upstream roles match the acknowledged set"),
            || {
                let expected = expected_at_least.clone();
                let pg = &pg;
                async move {
                    let roles = pg.roles(PREFIX).await;
                    // issue-before-reply committed a credential nobody was told about: the ledger
                    // holds it as live, so its role may stay. Nothing else may.
                    expected.iter().all(|e| roles.contains(e))
                        && roles.len()
                            <= expected.len() + usize::from(point == "issue-before-reply")
                }
            },
        )
        .await;
        if let Some(k) = &kept {
            let s = Pg::connect(&k.secret)
                .await
                .unwrap_or_else(|e| panic!("[{point}] acknowledged credential lost: {e}"));
            count_orders(&s).await;
            let mut c = clients_at(p.addr, d, AGENT).await;
            let r = c
                .verifier
                .introspect(pb::IntrospectRequest {
                    secret: k.secret.clone(),
                    resource: "orders-db".into(),
                })
                .await;
            // The agent is not a verifier of orders-db: the point is only that the record exists
            // and the broker answers (PERMISSION_DENIED, not an internal error).
            if let Err(e) = r {
                assert_ne!(e.code(), tonic::Code::Internal, "[{point}] {e:?}");
            }
        }
        // Wait for the queue to drain, stop cleanly, then compare with the ledger exactly.
        eventually(&format!("[{point}] revocations drain"), || async {
            metrics(p.ops).await.contains("jitbroker_revocation_debt 0")
        })
        .await;
        p.stop().await;
        let (live, queued) = ledger(d);
        let mut roles = pg.roles(PREFIX).await;
        roles.sort();
        assert_eq!(
            roles, live,
            "[{point}] upstream roles must be exactly the ledger's live credentials"
        );
        assert_eq!(queued, 0, "[{point}] revocations left in the queue");
        for u in &expected_at_least {
            assert!(
                live.contains(u),
                "[{point}] acknowledged credential {u} lost"
            );
        }
        eprintln!("[{n}] {point}: after restart roles = {roles:?}");
        // Clean up this round's roles so the next round starts empty.
        let admin = pg.admin().await;
        for r in roles {
            admin
                .batch_execute(&format!("DROP OWNED BY \"{r}\"; DROP ROLE \"{r}\""))
                .await
                .unwrap();
        }
    }
}

/// With `ca_file` the admin connection requires TLS and verifies the server against that CA; a
/// server certificate from another CA is refused, and issuance fails closed.
#[tokio::test]
async fn admin_connection_uses_verified_tls_when_a_ca_is_configured() {
    let Some(pg) = seeded().await else { return };
    let logs = LogCapture::shared();
    for trusted in [true, false] {
        let dir = dev_dir();
        let d = dir.path();
        let ca = d.join("pg-ca.pem");
        if trusted {
            std::fs::write(&ca, &pg.ca_pem).unwrap();
        } else {
            // A CA that did not sign the server's certificate.
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            std::fs::write(&ca, p.self_signed(&k).unwrap().pem()).unwrap();
        }
        let _ = pg_config(d, &pg);
        // Name the broker's sessions so the server's view of them can be found.
        std::fs::write(
            d.join("pg-admin.dsn"),
            format!("{} application_name=jitbroker-admin", pg.admin_dsn()),
        )
        .unwrap();
        let cfg = config(d, |t| {
            t.replace(
                "role_prefix = \"jb_\"\n",
                &format!("role_prefix = \"jb_\"\nca_file = \"{}\"\n", ca.display()),
            )
        });
        let r = spawn_default(&cfg).await;
        let mut c = clients(&r, AGENT).await;
        let task = orders_task(&mut c).await;
        let issued = c
            .broker
            .issue_credential(pg_issue(&task.task_id, 300))
            .await;
        if trusted {
            let cred = issued.expect("issuance over verified TLS").into_inner();
            let rows = pg
                .admin()
                .await
                .query(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = 'jitbroker-admin'",
                    &[],
                )
                .await
                .unwrap();
            assert!(!rows.is_empty(), "no broker admin session seen");
            assert!(
                rows.iter().all(|r| r.get::<_, bool>(0)),
                "a broker admin session without TLS"
            );
            c.complete(&task.task_id).await;
            let user = cred.attributes["user"].clone();
            eventually("the role is dropped over TLS", || async {
                !pg.roles(PREFIX).await.contains(&user)
            })
            .await;
        } else {
            let e = issued.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            // The agent learns that it failed and where operators look, not the database's
            // or the TLS layer's words.
            let m = e.message();
            assert!(
                !m.to_lowercase().contains("certificate") && !m.contains("UnknownIssuer"),
                "{e:?}"
            );
            let reference = m
                .split("reference ")
                .nth(1)
                .map(|r| r.trim_end_matches(')').to_owned())
                .expect("a reference for operators");
            let log = String::from_utf8_lossy(&logs.text()).into_owned();
            let line = log
                .lines()
                .find(|l| l.contains(&reference))
                .expect("the log line under the reference");
            assert!(
                line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
                "{line}"
            );
        }
        drop(c);
        r.stop().await;
    }
}

/// An operator following the README gives the broker no superuser: an admin with CREATEROLE, the
/// grant option on the table and the admin option on the group role. Issuance and revocation
/// (sessions cut, role dropped) still work; an admin without CREATEROLE is refused at start with
/// what to grant.
#[tokio::test]
async fn least_privilege_admin_issues_and_revokes() {
    let Some(pg) = seeded().await else { return };
    pg.admin()
        .await
        .batch_execute(
            "CREATE ROLE broker_admin LOGIN CREATEROLE PASSWORD 'broker-admin-pw';
             CREATE ROLE orders_reader NOLOGIN;
             GRANT SELECT ON orders TO orders_reader;
             GRANT orders_reader TO broker_admin WITH ADMIN OPTION;
             GRANT SELECT ON orders TO broker_admin WITH GRANT OPTION;
             CREATE ROLE powerless LOGIN PASSWORD 'powerless-pw';",
        )
        .await
        .unwrap();
    let dir = dev_dir();
    let cfg = pg_config(dir.path(), &pg);
    let least = |user: &str, pw: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=postgres",
            pg.port
        )
    };
    // Group role and direct grant, as the admin may hand out.
    let cfg_text = std::fs::read_to_string(dir.path().join("jitbroker.toml")).unwrap();
    std::fs::write(
        dir.path().join("jitbroker.toml"),
        cfg_text.replace(
            "statements = [\"GRANT SELECT ON orders TO {role}\"]",
            "roles = [\"orders_reader\"]\nstatements = [\"GRANT SELECT ON orders TO {role}\"]",
        ),
    )
    .unwrap();

    let admin_dsn_file = cfg.resources["orders-db"]
        .postgres
        .as_ref()
        .unwrap()
        .admin_dsn_file
        .clone();
    std::fs::write(&admin_dsn_file, least("powerless", "powerless-pw")).unwrap();
    let cfg = config(dir.path(), |t| t);
    let err = spawn(&cfg, Default::default())
        .await
        .err()
        .expect("refused");
    let err = err.to_string();
    assert!(
        err.contains("ALTER ROLE \"powerless\" CREATEROLE"),
        "the error says what to grant: {err}"
    );

    std::fs::write(&admin_dsn_file, least("broker_admin", "broker-admin-pw")).unwrap();
    let r = spawn_default(&cfg).await;
    let (mut c, task, cred) = agent_with_role(&r).await;
    let session = Pg::connect(&cred.secret).await.expect("login");
    assert_eq!(count_orders(&session).await, 2);
    c.complete(&task.task_id).await;
    no_roles_left(&pg, "the role is dropped by a non-superuser admin").await;
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the open session was terminated"
    );
    assert!(Pg::connect(&cred.secret).await.is_err());
    let m = metrics(r.ops_addr).await;
    assert!(m.contains("jitbroker_revocation_debt 0"), "{m}");
    drop(c);
    r.stop().await;
}

/// A credential the broker acknowledged, and what the client knows about it.
#[derive(Clone, Debug)]
struct Acked {
    kind: String,
    secret: String,
    task_id: String,
    expires_at: i64,
}

/// What one agent's load left: acknowledged credentials, tasks whose completion was
/// acknowledged, and the task whose completion the kill cut off (done or not: in doubt).
type LoadOutcome = (Vec<Acked>, Vec<String>, Option<String>);

/// One agent's load: tasks with a token and a PostgreSQL credential each, half of them completed,
/// until the broker goes away.
async fn agent_load(mut c: Clients, seed: u64) -> LoadOutcome {
    let (mut acked, mut completed) = (Vec::new(), Vec::new());
    let mut x = seed | 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Ok(t) = c
            .broker
            .start_task(start_req(
                vec![grant("demo-token", "read"), grant("orders-db", "read")],
                60,
            ))
            .await
        else {
            break;
        };
        let t = t.into_inner();
        for (res, ttl) in [("demo-token", 2 + (x % 8) as u32), ("orders-db", 30)] {
            match c
                .broker
                .issue_credential(issue_req(&t.task_id, res, ttl))
                .await
            {
                Ok(cred) => {
                    let cred = cred.into_inner();
                    let exp = cred.expires_at.unwrap();
                    acked.push(Acked {
                        kind: cred.kind,
                        secret: cred.secret,
                        task_id: t.task_id.clone(),
                        expires_at: exp.seconds * 1000 + i64::from(exp.nanos) / 1_000_000,
                    });
                }
                Err(_) => return (acked, completed, None),
            }
        }
        if x.is_multiple_of(2) {
            match c
                .broker
                .complete_task(pb::CompleteTaskRequest {
                    task_id: t.task_id.clone(),
                })
                .await
            {
                Ok(_) => completed.push(t.task_id),
                Err(_) => return (acked, completed, Some(t.task_id)),
            }
        }
    }
    (acked, completed, None)
}

fn now_ms() -> i64 {
    jitbroker::broker::SystemClock.now()
}

/// The kill loop: the broker under load from two agents, SIGKILLed at a random moment, restarted,
/// checked: every acknowledged token credential is still active until its expiry, none whose task
/// was completed is active again, none is active past its expiry plus one second; at the end,
/// once the revocation queue drains, no PostgreSQL role exists that the ledger does not hold as a
/// live credential. `JITBROKER_KILL_LOOP_KILLS` kills (5 by default; `scripts/kill-loop.sh` runs
/// 100 and prints the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_under_load_keeps_every_promise() {
    let Some(pg) = seeded().await else { return };
    let dir = dev_dir();
    let _ = pg_config(dir.path(), &pg);
    let kills: usize = std::env::var("JITBROKER_KILL_LOOP_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let started = std::time::Instant::now();
    let (mut acked, mut completed): (Vec<Acked>, HashSet<String>) = (Vec::new(), HashSet::new());
    let mut in_doubt: HashSet<String> = HashSet::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let (mut restarts_ms, mut checked) = (Vec::new(), 0u64);
    for n in 0..kills {
        let t0 = std::time::Instant::now();
        let p = start_proc(dir.path(), None, n).await;
        restarts_ms.push(t0.elapsed().as_millis() as u64);
        // After each restart: every promise made before the kill holds.
        let mut tool = clients_at(p.addr, dir.path(), TOOL).await.verifier;
        for a in acked.iter().filter(|a| a.kind == "token") {
            let now = now_ms();
            let active = tool
                .introspect(pb::IntrospectRequest {
                    secret: a.secret.clone(),
                    resource: "demo-token".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .active;
            if in_doubt.contains(&a.task_id) {
                // Its completion was cut off by a kill: ended or not, never past its expiry.
                assert!(
                    !(active && now > a.expires_at + 1000),
                    "a credential is active past its expiry: {a:?}"
                );
            } else if completed.contains(&a.task_id) {
                assert!(
                    !active,
                    "a credential of a completed task is active again: {a:?}"
                );
            } else if now > a.expires_at + 1000 {
                assert!(!active, "a credential is active past its expiry: {a:?}");
            } else if now_ms() < a.expires_at {
                assert!(active, "an acknowledged credential was lost: {a:?}");
            }
            checked += 1;
        }
        // Load, then SIGKILL at a random moment.
        let loads: Vec<_> = (0..2)
            .map(|i| {
                let dir = dir.path().to_path_buf();
                let addr = p.addr;
                tokio::spawn(async move {
                    let c = clients_at(addr, &dir, if i == 0 { AGENT } else { AGENT_B }).await;
                    agent_load(c, 0x9e37_79b9 + i).await
                })
            })
            .collect();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tokio::time::sleep(Duration::from_millis(100 + x % 1400)).await;
        p.kill().await;
        for l in loads {
            let (a, c, d) = l.await.unwrap();
            acked.extend(a);
            completed.extend(c);
            in_doubt.extend(d);
        }
    }
    // The queue drains on the last start; then no role is unknown to the ledger.
    let p = start_proc(dir.path(), None, kills).await;
    eventually("the revocation queue drains", || {
        let ops = p.ops;
        async move { metrics(ops).await.contains("jitbroker_revocation_debt 0\n") }
    })
    .await;
    // Let the reconciler's first pass (at start) finish with the queue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eventually("the revocation queue drains after the reconciler", || {
        let ops = p.ops;
        async move { metrics(ops).await.contains("jitbroker_revocation_debt 0\n") }
    })
    .await;
    p.stop().await;
    let (live, queued) = ledger(dir.path());
    let roles = pg.roles(PREFIX).await;
    let orphans: Vec<&String> = roles.iter().filter(|r| !live.contains(r)).collect();
    assert_eq!(queued, 0);
    assert!(
        orphans.is_empty(),
        "roles the ledger does not know: {orphans:?}"
    );
    let pg_acked = acked.iter().filter(|a| a.kind == "postgres").count();
    restarts_ms.sort();
    eprintln!(
        "kill loop: {kills} SIGKILLs in {:?}; {} credentials acknowledged ({pg_acked} PostgreSQL \
         roles), {} tasks completed, {checked} token checks after restarts; restart to ready \
         median {} ms, max {} ms; {} roles live at the end, 0 orphaned",
        started.elapsed(),
        acked.len(),
        completed.len(),
        restarts_ms[restarts_ms.len() / 2],
        restarts_ms.last().unwrap(),
        live.len()
    );
}

/// A caller that goes away mid-issuance (its process killed, its deadline passed) does not cut
/// the issuance between its steps: the credential is recorded with its role, counted, and
/// revoked with its task. Cut, it left a role the ledger held as `Creating` until a restart (the
/// kill loop found it, killing its load generator).
#[tokio::test]
async fn an_issuance_the_caller_abandons_completes_and_ends_with_its_task() {
    let Some(pg) = seeded().await else { return };
    let dir = dev_dir();
    pg_config(dir.path(), &pg);
    // Creation takes a second and a half: long after the caller has gone.
    let text = std::fs::read_to_string(dir.path().join("jitbroker.toml"))
        .unwrap()
        .replace(
            "statements = [\"GRANT SELECT ON orders TO {role}\"]",
            "statements = [\"GRANT SELECT ON orders TO {role}\", \"SELECT pg_sleep(1.5) WHERE '{role}' <> ''\"]",
        );
    let cfg = jitbroker::config::Config::from_toml(&text, "test", |_| None).unwrap();
    let r = spawn_default(&cfg).await;
    let mut c = clients(&r, AGENT).await;
    let task = orders_task(&mut c).await;
    let mut req = tonic::Request::new(pg_issue(&task.task_id, 300));
    req.set_timeout(Duration::from_millis(300));
    let e = c.broker.issue_credential(req).await.unwrap_err();
    // The client gives up (its own timer) and resets the stream.
    assert!(
        matches!(
            e.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{e:?}"
    );
    eventually("the abandoned issuance is recorded", || async {
        metrics(r.ops_addr)
            .await
            .contains("jitbroker_credentials_issued_total{kind=\"postgres\"} 1")
    })
    .await;
    assert_eq!(pg.roles(PREFIX).await.len(), 1);
    // It belongs to the task like any other: completing the task revokes it and drops its role.
    let done = c.complete(&task.task_id).await;
    assert_eq!(done.revoked_credential_ids.len(), 1);
    no_roles_left(&pg, "its role is dropped with the task").await;
    drop(c);
    r.stop().await;
}
