//! Logs and metrics. Logs go through `tracing` (plain or JSON lines); metrics are counters kept
//! here and rendered in the Prometheus text format on the ops port. Neither ever carries a secret:
//! only ids, names and counts are recorded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::LogFormat;
use crate::model::{Decision, RevokeReason};

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several brokers) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}

const REASONS: [RevokeReason; 6] = [
    RevokeReason::Completed,
    RevokeReason::Expired,
    RevokeReason::Revoked,
    RevokeReason::Admin,
    RevokeReason::Cascade,
    RevokeReason::IdentityRevoked,
];

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    issued_token: AtomicU64,
    issued_jwt: AtomicU64,
    allowed: AtomicU64,
    needs_approval: AtomicU64,
    denied: AtomicU64,
    ended: [AtomicU64; 6],
    auth_failures: AtomicU64,
}

impl Metrics {
    pub fn issued(&self, kind: &str) {
        match kind {
            "jwt" => &self.issued_jwt,
            _ => &self.issued_token,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn decision(&self, d: Decision) {
        match d {
            Decision::Allowed => &self.allowed,
            Decision::NeedsApproval => &self.needs_approval,
            Decision::Denied => &self.denied,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self, r: RevokeReason) {
        if let Some(i) = REASONS.iter().position(|x| *x == r) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition. `gauges` are point-in-time values computed by the caller.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut s = String::new();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP jitbroker_credentials_issued_total Credentials issued.\n\
             # TYPE jitbroker_credentials_issued_total counter\n\
             jitbroker_credentials_issued_total{{kind=\"token\"}} {}\n\
             jitbroker_credentials_issued_total{{kind=\"jwt\"}} {}",
            g(&self.issued_token),
            g(&self.issued_jwt)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_policy_decisions_total Policy decisions by outcome.\n\
             # TYPE jitbroker_policy_decisions_total counter\n\
             jitbroker_policy_decisions_total{{decision=\"allowed\"}} {}\n\
             jitbroker_policy_decisions_total{{decision=\"needs_approval\"}} {}\n\
             jitbroker_policy_decisions_total{{decision=\"denied\"}} {}",
            g(&self.allowed),
            g(&self.needs_approval),
            g(&self.denied)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_credentials_ended_total Credentials revoked or expired, by reason.\n\
             # TYPE jitbroker_credentials_ended_total counter"
        );
        for (i, r) in REASONS.iter().enumerate() {
            let _ = writeln!(
                s,
                "jitbroker_credentials_ended_total{{reason=\"{}\"}} {}",
                r.as_str(),
                g(&self.ended[i])
            );
        }
        let _ = writeln!(
            s,
            "# HELP jitbroker_authentication_failures_total Requests refused for want of a valid identity.\n\
             # TYPE jitbroker_authentication_failures_total counter\n\
             jitbroker_authentication_failures_total {}",
            g(&self.auth_failures)
        );
        for (name, help, v) in gauges {
            let _ = writeln!(
                s,
                "# HELP jitbroker_{name} {help}\n# TYPE jitbroker_{name} gauge\njitbroker_{name} {v}"
            );
        }
        s
    }
}
