//! Broker processes (the `jitbroker` binary of this build) for tests that kill, stop and
//! restart them: `serve --config FILE` on free 127.0.0.1 ports, stderr to a log file, killed
//! when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::http_get;

pub struct BrokerProc {
    pub child: tokio::process::Child,
    pub log: PathBuf,
    pub addr: SocketAddr,
    pub ops: SocketAddr,
}

impl BrokerProc {
    /// Starts `jitbroker serve --config config` (with the crash point `failpoint` armed, when
    /// given) and waits until it is ready.
    pub async fn start(config: &Path, log: PathBuf, failpoint: Option<&str>) -> BrokerProc {
        let p = Self::spawn(config, log, failpoint);
        p.wait_ready().await;
        p
    }

    /// Starts the process without waiting for it.
    pub fn spawn(config: &Path, log: PathBuf, failpoint: Option<&str>) -> BrokerProc {
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (addr, ops_addr) = (api.local_addr().unwrap(), ops.local_addr().unwrap());
        drop((api, ops));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jitbroker"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("JITBROKER_LISTEN", addr.to_string())
            .env("JITBROKER_OPS_LISTEN", ops_addr.to_string())
            .env("JITBROKER_LOG_FORMAT", "plain")
            .env_remove("JITBROKER_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        if let Some(f) = failpoint {
            cmd.env("JITBROKER_FAILPOINT", f);
        }
        BrokerProc {
            child: cmd.spawn().unwrap(),
            log,
            addr,
            ops: ops_addr,
        }
    }

    /// Waits (bounded: 20 s) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        for _ in 0..400 {
            if self.is_ready().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("broker not ready: {}", self.log_text());
    }

    pub async fn is_ready(&self) -> bool {
        http_get(&self.ops.to_string(), "/readyz")
            .await
            .is_some_and(|r| r.contains(" 200 "))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded: 30 s) until the process reports the crash point `point`, then kills it
    /// with SIGKILL. A point never reached fails with the tail of the process's log.
    pub async fn kill_at(self, point: &str) {
        let marker = format!("FAILPOINT {point} reached");
        let reached = super::poll_until(300, Duration::from_millis(100), || {
            let text = self.log_text();
            let marker = marker.clone();
            async move { text.contains(&marker) }
        })
        .await;
        if !reached {
            let text = self.log_text();
            let tail: String = text
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "the broker never reached {point}; its log {} ends:\n{tail}",
                self.log.display()
            );
        }
        self.kill().await;
    }

    /// SIGKILL.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and waits (bounded: 30 s) for the exit; a process that does not exit by then is
    /// killed and the test fails with its log.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            panic!(
                "the broker did not exit within 30 s of SIGTERM; its log:\n{}",
                self.log_text()
            );
        }
    }
}
