//! Load generator: N concurrent agents over persistent mTLS channels play the task flow
//! `StartTask → k × IssueCredential(token) → Introspect (by a tool) → CompleteTask` against a
//! running broker, or the no-op floor (`grpc.health.v1.Health/Check` over the same kind of
//! channel: what tonic + rustls cost with no work at all).
//!
//! ```text
//! jitbroker-load --addr 127.0.0.1:8443 --data-dir jitbroker-dev --agents 16 --k 4 --seconds 20 [--pid PID] [--noop]
//! ```
//! SVIDs are minted from the dev CA of `--data-dir`. With `--pid` of the broker it also reports
//! the broker's CPU seconds per 1000 operations, its peak RSS, and disk bytes per live credential.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper_util::rt::TokioIo;
use jitbroker::api::pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    #[arg(long, default_value = "jitbroker-dev")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Credentials per task.
    #[arg(long, default_value_t = 4)]
    k: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The broker's process id, for CPU and memory figures.
    #[arg(long)]
    pid: Option<u32>,
    /// Measure the no-op floor instead of the task flow.
    #[arg(long)]
    noop: bool,
}

fn tls(bundle: &str, chain: &str, key: &str) -> rustls::ClientConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.expect("bundle")).expect("root");
    }
    let certs: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.expect("chain"))
        .collect();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            certs,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
        )
        .expect("client config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

async fn channel(addr: SocketAddr, cfg: rustls::ClientConfig) -> Channel {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let s = connector
                    .connect(ServerName::try_from("localhost").expect("name"), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to the broker")
}

async fn identity_channel(args: &Args, id: &str) -> Channel {
    let ca =
        jitbroker::identity::dev::ensure_dev_ca(&args.data_dir, "jitbroker.dev").expect("dev CA");
    let svid = ca
        .mint_svid(id, &[], &[], Duration::from_secs(3600))
        .expect("mint");
    channel(
        args.addr,
        tls(&svid.bundle_pem, &svid.cert_chain_pem, &svid.key_pem),
    )
    .await
}

fn proc_stat(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((ticks / 100.0, hwm * 1024))
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            total += if path.is_dir() {
                dir_bytes(&path)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            };
        }
    }
    total
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let deadline = Duration::from_secs(args.seconds);
    let before = args.pid.and_then(proc_stat);
    let tool = identity_channel(&args, "spiffe://jitbroker.dev/tool/demo").await;
    let mut handles = Vec::new();
    let start = Instant::now();
    for a in 0..args.agents {
        let ch = identity_channel(&args, &format!("spiffe://jitbroker.dev/agent/load-{a}")).await;
        let tool = tool.clone();
        let (k, noop) = (args.k, args.noop);
        handles.push(tokio::spawn(async move {
            let mut lat_issue = Vec::new();
            let mut ops = 0u64;
            let mut broker = pb::broker_client::BrokerClient::new(ch.clone());
            let mut verifier = pb::verifier_client::VerifierClient::new(tool);
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            while start.elapsed() < deadline {
                if noop {
                    let t = Instant::now();
                    health
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .expect("health");
                    lat_issue.push(t.elapsed().as_micros() as u64);
                    ops += 1;
                    continue;
                }
                let task = broker
                    .start_task(pb::StartTaskRequest {
                        purpose: "load".into(),
                        grants: vec![pb::Grant {
                            resource: "demo-token".into(),
                            action: "read".into(),
                        }],
                        ttl_seconds: 300,
                        ..Default::default()
                    })
                    .await
                    .expect("start")
                    .into_inner();
                let mut last = String::new();
                for _ in 0..k {
                    let t = Instant::now();
                    let c = broker
                        .issue_credential(pb::IssueCredentialRequest {
                            task_id: task.task_id.clone(),
                            resource: "demo-token".into(),
                            action: "read".into(),
                            ttl_seconds: 120,
                            idempotency_key: String::new(),
                        })
                        .await
                        .expect("issue")
                        .into_inner();
                    lat_issue.push(t.elapsed().as_micros() as u64);
                    last = c.secret;
                }
                let i = verifier
                    .introspect(pb::IntrospectRequest {
                        secret: last,
                        resource: "demo-token".into(),
                    })
                    .await
                    .expect("introspect")
                    .into_inner();
                assert!(i.active);
                broker
                    .complete_task(pb::CompleteTaskRequest {
                        task_id: task.task_id,
                    })
                    .await
                    .expect("complete");
                ops += k as u64 + 3;
            }
            (lat_issue, ops)
        }));
    }
    let mut lat = Vec::new();
    let mut ops = 0;
    for h in handles {
        let (l, o) = h.await.expect("agent task");
        lat.extend(l);
        ops += o;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let what = if args.noop {
        "no-op calls"
    } else {
        "issuances"
    };
    println!(
        "agents={} k={} seconds={:.1} mode={}",
        args.agents,
        args.k,
        secs,
        if args.noop { "noop" } else { "flow" }
    );
    println!("{what}/s: {:.0}", lat.len() as f64 / secs);
    println!("all rpcs/s: {:.0}", ops as f64 / secs);
    println!(
        "{what} latency ms: p50 {:.3} p99 {:.3} p99.9 {:.3}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999)
    );
    if let (Some(pid), Some((cpu0, _))) = (args.pid, before)
        && let Some((cpu1, rss)) = proc_stat(pid)
    {
        println!(
            "broker cpu seconds per 1000 rpcs: {:.3}",
            (cpu1 - cpu0) * 1000.0 / ops.max(1) as f64
        );
        println!("broker peak rss MiB: {:.1}", rss as f64 / 1048576.0);
    }
    let db = dir_bytes(&args.data_dir.join("db"));
    println!("data dir db bytes: {db}");
}
