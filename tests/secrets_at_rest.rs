//! No issued secret reaches the data directory or the logs in plaintext.

mod common;

use common::*;

#[tokio::test]
async fn no_plaintext_secret_on_disk_or_in_logs() {
    let logs = LogCapture::install();
    let (dir, _cfg, r) = start_dev().await;
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let mut secrets = Vec::new();
    for i in 0..20 {
        let task = agent
            .start(
                vec![grant("demo-token", "read"), grant("demo-jwt", "read")],
                600,
            )
            .await;
        for res in ["demo-token", "demo-jwt"] {
            let mut req = issue_req(&task.task_id, res, 300);
            req.idempotency_key = format!("k{i}-{res}");
            let c = agent
                .broker
                .issue_credential(req)
                .await
                .unwrap()
                .into_inner();
            assert!(active(&mut tool, &c.secret, res).await);
            secrets.push(c.secret);
        }
        if i % 2 == 0 {
            agent.complete(&task.task_id).await;
        }
    }
    drop((agent, tool));
    r.stop().await;

    let dirs = store_dirs(dir.path());
    let files: Vec<_> = dirs.iter().flat_map(|d| all_bytes(d)).collect();
    // The store's own files are among those read: sled's, or the database's.
    assert!(
        files
            .iter()
            .any(|(p, _)| p.starts_with(dir.path().join("db"))
                || dirs[1..].iter().any(|d| p.starts_with(d)))
    );
    let log = logs.text();
    assert!(!log.is_empty(), "logs were captured");
    for s in &secrets {
        // The whole secret, and its distinctive tail (a token's random part, a JWT's signature).
        let tail = distinctive_part(s);
        for (path, bytes) in &files {
            assert!(
                !contains(bytes, s.as_bytes()),
                "secret in {}",
                path.display()
            );
            assert!(
                !contains(bytes, tail.as_bytes()),
                "secret part in {}",
                path.display()
            );
        }
        assert!(!contains(&log, tail.as_bytes()), "secret in the logs");
    }
}
