//! The command line: `serve`, `dev`, `dev-svid`, `check-config`, `policy validate`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::error::{Error, Result};
use crate::model::SpiffeId;
use crate::server::{self, App, Options};
use crate::store::crypto::{Kek, write_new_private_file};

#[derive(Parser, Debug)]
#[command(
    name = "jitbroker",
    version,
    about = "SPIFFE-native just-in-time secrets broker for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker from a configuration file.
    Serve {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
    },
    /// Run a self-contained development broker: dev CA, KEK, config and policy are created on
    /// first start in the data directory. Not for production.
    Dev {
        #[arg(long, default_value = "jitbroker-dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        ops_listen: SocketAddr,
    },
    /// Mint an X.509-SVID from the dev CA into --out (for demo agents, tools and operators), or
    /// with --jwt-audience print a JWT-SVID signed by the dev JWT key.
    DevSvid {
        #[arg(long, default_value = "jitbroker-dev")]
        data_dir: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, required_unless_present = "jwt_audience")]
        out: Option<PathBuf>,
        /// Print a JWT-SVID for this audience (the broker's identity.jwt_audience) instead.
        #[arg(long, conflicts_with = "out")]
        jwt_audience: Option<String>,
        #[arg(long, default_value_t = 86_400)]
        ttl_seconds: u64,
    },
    /// Check a configuration file and the policy it names, then exit.
    CheckConfig {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Key-encryption key tools (offline: stop the broker first).
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Audit trail tools (offline: stop the broker first, the store is single-writer).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum KekCommand {
    /// Re-wrap the data keys under a new KEK file; afterwards point `kek_file` at it and retire
    /// the old one. Creates the new file (32 random bytes, hex) if it does not exist.
    Rotate {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        new_kek: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 1 naming the first bad sequence number if it does not hold.
    Verify {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
        /// SEQ:HASH of an `audit_anchor` log line (or the anchor file): the chain must still
        /// hold it, so a deleted tail or a chain recomputed from scratch fails too.
        #[arg(long)]
        anchor: Option<String>,
    },
    /// Write every audit entry as one JSON line (to a file, or standard output).
    Export {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Run a file of requests with expected decisions ([[case]] entries) against the policy;
    /// exits 1 if any case fails.
    Test {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
        /// Policy file to test instead of the one the configuration names.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The cases file (TOML).
        cases: PathBuf,
    },
    /// Validate a policy file against the schema generated from a configuration.
    Validate {
        #[arg(long, env = "JITBROKER_CONFIG")]
        config: PathBuf,
        /// Policy file to check instead of the one the configuration names.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

/// Runs the parsed command line. Returns the process exit code.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = Config::load(&config)?;
            crate::telemetry::init_logging(cfg.log_format);
            if cfg.identity.source == crate::config::SourceKind::Dev {
                // The dev CA's key sits in plaintext in the data directory: whoever reads it can
                // mint any identity of the trust domain. Never silently in production.
                let warning = format!(
                    "INSECURE: identity.source = \"dev\" in {}: the dev CA key in {} lets anyone \
                     who can read it mint any identity; use source = \"spire\" or \"files\" in \
                     production",
                    config.display(),
                    cfg.data_dir.join("dev").display()
                );
                eprintln!("jitbroker: {warning}");
                tracing::warn!(event = "insecure_dev_identity", "{warning}");
            }
            serve(cfg, None).await
        }
        Command::Dev {
            data_dir,
            listen,
            ops_listen,
        } => {
            crate::telemetry::init_logging(LogFormat::Plain);
            let config_path = prepare_dev(&data_dir)?;
            let mut cfg = Config::load(&config_path)?;
            cfg.listen = listen;
            cfg.ops_listen = ops_listen;
            serve(cfg, Some(data_dir)).await
        }
        Command::DevSvid {
            data_dir,
            spiffe_id,
            out,
            jwt_audience,
            ttl_seconds,
        } => {
            let id = SpiffeId::parse("--spiffe-id", &spiffe_id)?;
            let td = id.trust_domain().to_owned();
            let ttl = Duration::from_secs(ttl_seconds);
            if let Some(aud) = jwt_audience {
                let key = crate::identity::dev::ensure_dev_jwt_key(&data_dir, &td)
                    .map_err(|e| Error::Config(e.to_string()))?;
                println!("{}", key.mint(id.as_str(), &aud, ttl));
                return Ok(());
            }
            let out = out.ok_or_else(|| Error::Config("--out is required".into()))?;
            let ca = crate::identity::dev::ensure_dev_ca(&data_dir, &td)
                .map_err(|e| Error::Config(e.to_string()))?;
            mint_to(&ca, id.as_str(), &out, ttl)?;
            println!(
                "wrote {0}/svid.pem, {0}/svid.key and {0}/bundle.pem for {id}",
                out.display()
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            let engine = server::load_policy(&cfg)?;
            let (n, digest) = engine.info();
            println!(
                "{}: ok ({} resources, {n} policies, policy sha256 {})",
                config.display(),
                cfg.resources.len(),
                &digest[..16]
            );
            Ok(())
        }
        Command::Kek {
            command: KekCommand::Rotate { config, new_kek },
        } => {
            let cfg = Config::load(&config)?;
            let old = Kek::load(&cfg.kek_file)?;
            let new = if new_kek.exists() {
                Kek::load(&new_kek)?
            } else {
                Kek::create(&new_kek)?
            };
            if new.id() == old.id() {
                return Err(Error::Config(format!(
                    "{} holds the same key as {}",
                    new_kek.display(),
                    cfg.kek_file.display()
                )));
            }
            if cfg.store.engine != crate::config::StoreEngine::Sled {
                return Err(Error::Config(
                    "rotate-kek re-wraps a sled store; with [store] engine = \"postgres\" it is \
                     not available yet (the data keys live in the database)"
                        .into(),
                ));
            }
            let (id, n) =
                crate::store::SledStore::rotate_kek(&cfg.data_dir.join("db"), &old, &new)?;
            println!(
                "re-wrapped {n} keys under {} (KEK id {}); new data key {id}. Set kek_file = \"{}\" and retire {}",
                new_kek.display(),
                new.id(),
                new_kek.display(),
                cfg.kek_file.display()
            );
            Ok(())
        }
        Command::Audit { command } => {
            let (cfg_path, out, anchor) = match &command {
                AuditCommand::Verify { config, anchor } => (config, None, anchor.as_deref()),
                AuditCommand::Export { config, out } => (config, Some(out.clone()), None),
            };
            let anchor = anchor.map(crate::audit::Anchor::parse).transpose()?;
            let cfg = Config::load(cfg_path)?;
            let kek = Kek::load(&cfg.kek_file)?;
            // The configured engine: the database for `postgres`, the local store for sled.
            let engine = server::open_engine(&cfg, &kek).await?;
            let store = engine.as_ref();
            let archive = cfg.audit_archive_dir();
            match out {
                None => {
                    let v = crate::audit::verify(store, Some(&archive)).await?;
                    if let Some(a) = &anchor
                        && v.ok
                        && let Err(why) =
                            crate::audit::check_anchor(store, Some(&archive), a).await?
                    {
                        return Err(Error::Config(format!(
                            "audit chain does not hold the anchor {a}: {why}"
                        )));
                    }
                    if v.ok {
                        match &anchor {
                            Some(a) => println!(
                                "audit chain ok: {} entries, holding the anchor {a}",
                                v.entries
                            ),
                            None => println!("audit chain ok: {} entries", v.entries),
                        }
                        Ok(())
                    } else {
                        Err(Error::Config(format!(
                            "audit chain broken at sequence {}: {} ({} entries verified before it)",
                            v.first_bad_seq, v.reason, v.entries
                        )))
                    }
                }
                Some(path) => {
                    let n = match path {
                        Some(p) => {
                            let mut f = std::fs::File::create(&p).map_err(|e| {
                                Error::Config(format!("cannot create {}: {e}", p.display()))
                            })?;
                            crate::audit::export(store, Some(&archive), &mut f).await?
                        }
                        None => {
                            let mut out = std::io::BufWriter::new(std::io::stdout());
                            let n = crate::audit::export(store, Some(&archive), &mut out).await?;
                            std::io::Write::flush(&mut out).map_err(|e| {
                                Error::Config(format!("cannot write the export: {e}"))
                            })?;
                            n
                        }
                    };
                    eprintln!("exported {n} audit entries");
                    Ok(())
                }
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Test {
                    config,
                    policy,
                    cases,
                },
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(p) = policy {
                cfg.policy_file = p;
            }
            let engine = server::load_policy(&cfg)?;
            let text = std::fs::read_to_string(&cases).map_err(|e| {
                Error::Config(format!("cannot read cases file {}: {e}", cases.display()))
            })?;
            let report =
                crate::policy::testing::run_cases(&engine, &text, &cases.display().to_string())?;
            println!("{report}");
            if report.passed() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{} of {} policy cases failed",
                    report.failed(),
                    report.results.len()
                )))
            }
        }
        Command::Policy {
            command: PolicyCommand::Validate { config, policy },
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(p) = policy {
                cfg.policy_file = p;
            }
            let engine = server::load_policy(&cfg)?;
            println!(
                "{}: {} policies validate against the schema",
                cfg.policy_file.display(),
                engine.info().0
            );
            Ok(())
        }
    }
}

async fn serve(cfg: Config, dev_dir: Option<PathBuf>) -> Result<()> {
    let api = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {} (API): {e}", cfg.listen)))?;
    let ops = tokio::net::TcpListener::bind(cfg.ops_listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {} (ops): {e}", cfg.ops_listen)))?;
    let api_addr = api.local_addr().ok();
    let app = App::build(&cfg, api_addr, Options::default()).await?;
    tracing::info!(
        api = %cfg.listen,
        ops = %cfg.ops_listen,
        identity = cfg.identity.source.as_str(),
        spiffe_id = app.identity.own_spiffe_id().unwrap_or_default(),
        "jitbroker serving"
    );
    if let Some(dir) = dev_dir {
        print_dev_banner(&dir, &cfg);
    }
    let store_dir = cfg.data_dir.join("db");
    let cache_bytes = cfg.store.cache_bytes();
    server::run(api, ops, app, shutdown_signal()).await?;
    // Everything is flushed and closed: record where it all is, for a fast next start.
    if cfg.store.engine != crate::config::StoreEngine::Sled {
        return Ok(());
    }
    match crate::store::SledStore::refresh_snapshot(&store_dir, cache_bytes) {
        Ok(took) => tracing::info!(
            ms = took.as_millis() as u64,
            "store snapshot refreshed for the next start"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not refresh the store snapshot; the next start replays the log")
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn mint_to(ca: &crate::identity::dev::DevCa, id: &str, out: &Path, ttl: Duration) -> Result<()> {
    let svid = ca
        .mint_svid(id, &[], &[], ttl)
        .map_err(|e| Error::Config(e.to_string()))?;
    crate::identity::dev::write_svid(out, &svid).map_err(|e| Error::Config(e.to_string()))
}

pub const DEV_TRUST_DOMAIN: &str = "jitbroker.dev";

/// The dev policy: any `spiffe://jitbroker.dev/agent/…` may read and write the demo resources.
pub const DEV_POLICY: &str = r#"// Development policy: any agent of the dev trust domain may read and write the demo resources.
@id("dev-agents-demo")
permit(principal, action in [Action::"read", Action::"write"], resource)
when {
  principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" &&
  (resource == Resource::"demo-token" || resource == Resource::"demo-jwt")
};
"#;

fn dev_config(data_dir: &Path) -> String {
    let d = data_dir.display();
    format!(
        r#"# jitbroker development configuration (created by `jitbroker dev`).
listen = "127.0.0.1:8443"
ops_listen = "127.0.0.1:9090"
data_dir = "{d}"
kek_file = "{d}/kek"
policy_file = "{d}/policy.cedar"
admin_ids = ["spiffe://jitbroker.dev/operator"]
approver_ids = ["spiffe://jitbroker.dev/approver"]
max_ttl_seconds = 3600
default_ttl_seconds = 900
log_format = "plain"

[identity]
source = "dev"
trust_domain = "jitbroker.dev"
# Accept JWT-SVIDs (authorization: Bearer) for this audience besides X.509-SVIDs; mint one with
# `jitbroker dev-svid --spiffe-id ID --jwt-audience jitbroker`.
# jwt_audience = "jitbroker"

# The OAuth authorization server (docs/oauth.md): token endpoint, introspection, discovery. It
# needs jwt_audience above; uncomment both, and oauth_resource under demo-jwt below.
# [oauth]
# listen = "127.0.0.1:8445"
# issuer = "https://127.0.0.1:8445"

[resources.demo-token]
kind = "token"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.demo-jwt]
kind = "jwt"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
# oauth_resource = "https://demo.jitbroker.dev/api"
"#
    )
}

/// Demo identities minted on every dev start, so the printed example works at once.
pub const DEV_IDENTITIES: [(&str, &str); 4] = [
    ("agent", "spiffe://jitbroker.dev/agent/demo"),
    ("tool", "spiffe://jitbroker.dev/tool/demo"),
    ("operator", "spiffe://jitbroker.dev/operator"),
    ("approver", "spiffe://jitbroker.dev/approver"),
];

/// Creates what a dev broker needs in `data_dir` (never overwriting anything) and returns the
/// config path.
pub fn prepare_dev(data_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", data_dir.display())))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| Error::Config(format!("cannot resolve {}: {e}", data_dir.display())))?;
    let kek = data_dir.join("kek");
    if !kek.exists() {
        Kek::create(&kek)?;
    }
    let policy = data_dir.join("policy.cedar");
    if !policy.exists() {
        write_new_private_file(&policy, DEV_POLICY.as_bytes())?;
    }
    let config = data_dir.join("jitbroker.toml");
    if !config.exists() {
        write_new_private_file(&config, dev_config(&data_dir).as_bytes())?;
    }
    let ca = crate::identity::dev::ensure_dev_ca(&data_dir, DEV_TRUST_DOMAIN)
        .map_err(|e| Error::Config(e.to_string()))?;
    for (name, id) in DEV_IDENTITIES {
        mint_to(
            &ca,
            id,
            &data_dir.join("dev").join("svids").join(name),
            Duration::from_secs(86_400),
        )?;
    }
    Ok(config)
}

fn print_dev_banner(data_dir: &Path, cfg: &Config) {
    let d = data_dir.display();
    let port = cfg.listen.port();
    println!(
        r#"
jitbroker dev is running. DEV MODE: the dev CA key is stored in plaintext at {d}/dev/ca.key,
and anyone who can read it can mint identities. Never use dev mode in production.

Demo SVIDs (24 h) are in {d}/dev/svids/{{agent,tool,operator,approver}}. Start a task as the demo agent:

  grpcurl -cacert {d}/dev/svids/agent/bundle.pem \
    -cert {d}/dev/svids/agent/svid.pem -key {d}/dev/svids/agent/svid.key \
    -d '{{"purpose":"summarise ticket 42","grants":[{{"resource":"demo-token","action":"read"}}],"ttl_seconds":600}}' \
    localhost:{port} jitbroker.v1.Broker/StartTask

Mint more with: jitbroker dev-svid --data-dir {d} --spiffe-id spiffe://jitbroker.dev/agent/NAME --out DIR
"#
    );
}
