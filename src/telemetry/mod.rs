//! Logs and metrics. Logs go through `tracing` (plain or JSON lines); metrics are counters kept
//! here and rendered in the Prometheus text format on the ops port. Neither ever carries a secret:
//! only ids, names and counts are recorded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn record(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The label under which every request to a path that is not a served gRPC method is counted.
pub const OTHER_METHOD: &str = "other";

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Request latency by gRPC method: one series per method fixed at construction, and one
    /// ([`OTHER_METHOD`]) for every other path. The set never grows, so a client choosing paths
    /// can neither add series nor put its bytes in a label.
    latency: BTreeMap<String, Histogram>,
    other: Histogram,
    issued_token: AtomicU64,
    issued_jwt: AtomicU64,
    issued_postgres: AtomicU64,
    issued_x509: AtomicU64,
    allowed: AtomicU64,
    needs_approval: AtomicU64,
    denied: AtomicU64,
    ended: [AtomicU64; 6],
    auth_failures: AtomicU64,
    purged_tasks: AtomicU64,
    audit_archived: AtomicU64,
    /// Gateway tool calls by decision (allowed, needs approval, denied) and their latency.
    tool_calls: [AtomicU64; 3],
    tool_call_latency: Histogram,
    /// OAuth requests by endpoint ([`OAUTH_ENDPOINTS`]) and outcome (ok, refused, failed), and
    /// the token endpoint's latency.
    oauth: [[AtomicU64; 3]; 5],
    oauth_token_latency: Histogram,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    requests_timed_out: AtomicU64,
    requests_refused_busy: AtomicU64,
    rate_limited_identity: AtomicU64,
    rate_limited_remote: AtomicU64,
    policy_loaded: AtomicU64,
    policy_refused: AtomicU64,
}

impl Metrics {
    /// Counters labelling request latency by the given gRPC methods (`/package.Service/Method`);
    /// requests to any other path are counted as [`OTHER_METHOD`]. A method whose name is not a
    /// plain gRPC name is left out rather than written into the exposition.
    pub fn new(methods: impl IntoIterator<Item = String>) -> Self {
        let latency = methods
            .into_iter()
            .filter_map(|m| {
                let label = m.strip_prefix('/')?.to_owned();
                let plain = !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._/".contains(&b));
                plain.then(|| (label, Histogram::default()))
            })
            .collect();
        Self {
            latency,
            ..Self::default()
        }
    }

    pub fn issued(&self, kind: &str) {
        match kind {
            "jwt" => &self.issued_jwt,
            "postgres" => &self.issued_postgres,
            "x509" => &self.issued_x509,
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

    /// An ended task (with its credentials) deleted at the end of its retention window.
    pub fn purged(&self) {
        self.purged_tasks.fetch_add(1, Ordering::Relaxed);
    }

    /// Audit entries moved from the store into archive segments.
    pub fn audit_archived(&self, n: u64) {
        self.audit_archived.fetch_add(n, Ordering::Relaxed);
    }

    pub fn ended(&self, r: RevokeReason) {
        if let Some(i) = REASONS.iter().position(|x| *x == r) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One tool call decided for a gateway, and how long the decision took.
    pub fn tool_call(&self, d: Decision, elapsed: Duration) {
        let i = match d {
            Decision::Allowed => 0,
            Decision::NeedsApproval => 1,
            Decision::Denied => 2,
        };
        self.tool_calls[i].fetch_add(1, Ordering::Relaxed);
        self.tool_call_latency.record(elapsed);
    }

    /// One OAuth request: its endpoint (one of [`OAUTH_ENDPOINTS`]), its HTTP status, and for
    /// the token endpoint how long it took.
    pub fn oauth(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let Some(e) = OAUTH_ENDPOINTS.iter().position(|x| *x == endpoint) else {
            return;
        };
        let o = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.oauth[e][o].fetch_add(1, Ordering::Relaxed);
        if endpoint == "token" {
            self.oauth_token_latency.record(elapsed);
        }
    }

    /// Records one request's latency under its gRPC path, or under [`OTHER_METHOD`] when the
    /// path is not a method this broker serves.
    pub fn observe(&self, path: &str, elapsed: Duration) {
        path.strip_prefix('/')
            .and_then(|m| self.latency.get(m))
            .unwrap_or(&self.other)
            .record(elapsed);
    }

    /// A connection accepted (`true`) or closed (`false`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections_open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A connection closed at once because its remote address had too many open.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A request answered `DEADLINE_EXCEEDED` by the server's request timeout.
    pub fn request_timed_out(&self) {
        self.requests_timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// A request answered `RESOURCE_EXHAUSTED` because every request slot stayed busy.
    pub fn request_refused_busy(&self) {
        self.requests_refused_busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A request or connection refused by a rate limit (`scope` "identity" or "remote").
    pub fn rate_limited(&self, scope: &str) {
        match scope {
            "identity" => &self.rate_limited_identity,
            _ => &self.rate_limited_remote,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// A policy reload that loaded a new set (`true`) or was refused.
    pub fn policy_reload(&self, loaded: bool) {
        if loaded {
            &self.policy_loaded
        } else {
            &self.policy_refused
        }
        .fetch_add(1, Ordering::Relaxed);
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
             jitbroker_credentials_issued_total{{kind=\"jwt\"}} {}\n\
             jitbroker_credentials_issued_total{{kind=\"postgres\"}} {}\n\
             jitbroker_credentials_issued_total{{kind=\"x509\"}} {}",
            g(&self.issued_token),
            g(&self.issued_jwt),
            g(&self.issued_postgres),
            g(&self.issued_x509)
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
        let _ = writeln!(
            s,
            "# HELP jitbroker_api_connections Connections open on the API port.\n\
             # TYPE jitbroker_api_connections gauge\n\
             jitbroker_api_connections {}\n\
             # HELP jitbroker_api_connections_refused_total Connections closed at once: their remote address had server.max_connections_per_remote open.\n\
             # TYPE jitbroker_api_connections_refused_total counter\n\
             jitbroker_api_connections_refused_total {}\n\
             # HELP jitbroker_api_requests_timed_out_total Requests answered DEADLINE_EXCEEDED after server.request_timeout_ms.\n\
             # TYPE jitbroker_api_requests_timed_out_total counter\n\
             jitbroker_api_requests_timed_out_total {}\n\
             # HELP jitbroker_api_requests_refused_busy_total Requests answered RESOURCE_EXHAUSTED: server.max_concurrent_requests stayed busy.\n\
             # TYPE jitbroker_api_requests_refused_busy_total counter\n\
             jitbroker_api_requests_refused_busy_total {}",
            g(&self.connections_open),
            g(&self.connections_refused),
            g(&self.requests_timed_out),
            g(&self.requests_refused_busy)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_rate_limited_total Requests and connections refused by a rate limit, by what was limited.\n\
             # TYPE jitbroker_rate_limited_total counter\n\
             jitbroker_rate_limited_total{{scope=\"identity\"}} {}\n\
             jitbroker_rate_limited_total{{scope=\"remote\"}} {}",
            g(&self.rate_limited_identity),
            g(&self.rate_limited_remote)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_policy_reloads_total Policy reloads (file change, SIGHUP, Admin) by outcome.\n\
             # TYPE jitbroker_policy_reloads_total counter\n\
             jitbroker_policy_reloads_total{{outcome=\"loaded\"}} {}\n\
             jitbroker_policy_reloads_total{{outcome=\"refused\"}} {}",
            g(&self.policy_loaded),
            g(&self.policy_refused)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_tasks_purged_total Ended tasks deleted with their credentials after the retention window.\n\
             # TYPE jitbroker_tasks_purged_total counter\n\
             jitbroker_tasks_purged_total {}\n\
             # HELP jitbroker_audit_entries_archived_total Audit entries moved from the store into archive segments.\n\
             # TYPE jitbroker_audit_entries_archived_total counter\n\
             jitbroker_audit_entries_archived_total {}",
            g(&self.purged_tasks),
            g(&self.audit_archived)
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_request_duration_seconds gRPC request latency by method.\n\
             # TYPE jitbroker_request_duration_seconds histogram"
        );
        let series = self
            .latency
            .iter()
            .map(|(m, h)| (m.as_str(), h))
            .chain([(OTHER_METHOD, &self.other)]);
        for (method, h) in series {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "jitbroker_request_duration_seconds_bucket{{method=\"{method}\",le=\"{b}\"}} {}",
                    g(&h.buckets[i])
                );
            }
            let count = g(&h.count);
            let _ = writeln!(
                s,
                "jitbroker_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {count}\n\
                 jitbroker_request_duration_seconds_sum{{method=\"{method}\"}} {}\n\
                 jitbroker_request_duration_seconds_count{{method=\"{method}\"}} {count}",
                g(&h.sum_micros) as f64 / 1e6
            );
        }
        let _ = writeln!(
            s,
            "# HELP jitbroker_tool_calls_total Tool calls decided for gateways, by decision.\n\
             # TYPE jitbroker_tool_calls_total counter\n\
             jitbroker_tool_calls_total{{decision=\"allowed\"}} {}\n\
             jitbroker_tool_calls_total{{decision=\"needs_approval\"}} {}\n\
             jitbroker_tool_calls_total{{decision=\"denied\"}} {}\n\
             # HELP jitbroker_tool_call_duration_seconds Time to decide a tool call (policy, credential, audit).\n\
             # TYPE jitbroker_tool_call_duration_seconds histogram",
            g(&self.tool_calls[0]),
            g(&self.tool_calls[1]),
            g(&self.tool_calls[2])
        );
        write_histogram(
            &mut s,
            "tool_call_duration_seconds",
            &self.tool_call_latency,
        );
        let _ = writeln!(
            s,
            "# HELP jitbroker_oauth_requests_total OAuth requests by endpoint and outcome (ok: 2xx, refused: 4xx, failed: 5xx).\n\
             # TYPE jitbroker_oauth_requests_total counter"
        );
        for (e, name) in OAUTH_ENDPOINTS.iter().enumerate() {
            for (o, outcome) in ["ok", "refused", "failed"].iter().enumerate() {
                let _ = writeln!(
                    s,
                    "jitbroker_oauth_requests_total{{endpoint=\"{name}\",outcome=\"{outcome}\"}} {}",
                    g(&self.oauth[e][o])
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP jitbroker_oauth_token_duration_seconds Time to answer a token request (verification, policy, issuance, audit).\n\
             # TYPE jitbroker_oauth_token_duration_seconds histogram"
        );
        write_histogram(
            &mut s,
            "oauth_token_duration_seconds",
            &self.oauth_token_latency,
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

/// The buckets, sum and count of an unlabelled histogram `jitbroker_NAME` (its HELP and TYPE
/// lines are the caller's).
fn write_histogram(s: &mut String, name: &str, h: &Histogram) {
    use std::fmt::Write as _;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            s,
            "jitbroker_{name}_bucket{{le=\"{b}\"}} {}",
            g(&h.buckets[i])
        );
    }
    let count = g(&h.count);
    let _ = writeln!(
        s,
        "jitbroker_{name}_bucket{{le=\"+Inf\"}} {count}\n\
         jitbroker_{name}_sum {}\n\
         jitbroker_{name}_count {count}",
        g(&h.sum_micros) as f64 / 1e6
    );
}

/// The OAuth endpoints, as metrics label them.
pub const OAUTH_ENDPOINTS: [&str; 5] = ["metadata", "jwks", "token", "introspect", "revoke"];

/// A tower layer that records each request's latency in [`Metrics`].
#[derive(Clone)]
pub struct LatencyLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for LatencyLayer {
    type Service = Latency<S>;
    fn layer(&self, inner: S) -> Latency<S> {
        Latency {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Latency<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for Latency<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            metrics.observe(&path, start.elapsed());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each exposition line without its value: the series a scrape would see.
    fn series(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| match l.rsplit_once(' ') {
                Some((name, _)) if !l.starts_with('#') => name.to_owned(),
                _ => l.to_owned(),
            })
            .collect()
    }

    #[test]
    fn served_methods_are_labelled_and_every_other_path_is_other() {
        let m = Metrics::new(crate::api::served_methods());
        let before = series(&m.render(&[]));
        assert!(
            before.iter().any(|l| l.contains(
                "jitbroker_request_duration_seconds_count{method=\"jitbroker.v1.Broker/StartTask\"}"
            )),
            "{before:#?}"
        );
        m.observe("/jitbroker.v1.Broker/StartTask", Duration::from_millis(1));
        let crafted = [
            "/jitbroker.v1.Broker/StartTask\"} 1\n# TYPE evil counter\nevil",
            "/jitbroker.v1.x\"}junk{a=\"",
            "/jitbroker.v1.Broker/StartTask/",
            "jitbroker.v1.Broker/StartTask",
            "/other",
            "",
        ];
        for p in crafted {
            m.observe(p, Duration::from_millis(1));
        }
        for i in 0..10_000 {
            m.observe(&format!("/jitbroker.v1.Broker/R{i}"), Duration::ZERO);
        }
        let text = m.render(&[]);
        assert_eq!(series(&text), before, "the set of series changed");
        assert!(!text.contains("evil") && !text.contains("junk") && !text.contains("R1"));
        assert!(text.contains(
            "jitbroker_request_duration_seconds_count{method=\"jitbroker.v1.Broker/StartTask\"} 1\n"
        ));
        assert!(
            text.contains("jitbroker_request_duration_seconds_count{method=\"other\"} 10006\n")
        );
    }

    #[test]
    fn the_workload_api_is_neither_served_nor_labelled() {
        let methods = crate::api::served_methods();
        assert!(methods.contains(&"/jitbroker.v1.Admin/VerifyAudit".to_owned()));
        assert!(methods.contains(&"/grpc.health.v1.Health/Check".to_owned()));
        assert!(
            !methods.iter().any(|m| m.contains("SpiffeWorkloadAPI")),
            "{methods:?}"
        );
        let services: Vec<String> = crate::api::served_descriptor_set()
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
            .collect();
        assert_eq!(services, ["Broker", "Verifier", "Admin"], "{services:?}");
    }

    #[test]
    fn a_method_name_that_is_not_a_plain_grpc_name_is_never_a_label() {
        let m = Metrics::new([
            "/a.B/C\"}x".to_owned(),
            "/a.B/D".to_owned(),
            "nope".to_owned(),
        ]);
        let text = m.render(&[]);
        assert!(text.contains("method=\"a.B/D\""), "{text}");
        assert!(!text.contains("x\"") && !text.contains("nope"), "{text}");
    }
}
