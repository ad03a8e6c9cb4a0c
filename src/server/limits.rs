//! The API port's limits (`[server]`): how many connections (in all and per remote address),
//! how long a connection may sit idle, how many requests run at once, how long one may take and
//! how many bytes its body may hold. Each bounds what a client can make the broker hold before
//! anyone knows who it is.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};

use crate::api::PeerInfo;
use crate::config::ServerConfig;
use crate::ratelimit::RateLimiter;
use crate::telemetry::Metrics;

/// Milliseconds on the runtime's monotonic clock since `base` (the rate limiters' time).
fn ms_since(base: Instant) -> i64 {
    Instant::now().saturating_duration_since(base).as_millis() as i64
}

/// Admits connections: at most `max_connections` in all (the accept loop waits for room, so the
/// rest queue in the kernel), and per IP address at most `max_connections_per_remote` open and
/// `connections_per_remote_per_second` new (beyond either, closed at once).
pub struct ConnectionGate {
    all: Arc<Semaphore>,
    per_remote: Mutex<HashMap<IpAddr, usize>>,
    per_remote_max: usize,
    rate: RateLimiter<IpAddr>,
    base: Instant,
    metrics: Arc<Metrics>,
}

/// One admitted connection; dropping it gives its place back.
pub struct ConnectionPermit {
    _all: OwnedSemaphorePermit,
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
}

impl ConnectionGate {
    pub fn new(cfg: &ServerConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(cfg.max_connections)),
            per_remote: Mutex::new(HashMap::new()),
            per_remote_max: cfg.max_connections_per_remote,
            rate: RateLimiter::new(
                cfg.connections_per_remote_per_second,
                cfg.connections_per_remote_per_second.saturating_mul(2),
            ),
            base: Instant::now(),
            metrics,
        })
    }

    /// Waits until a connection may be accepted at all.
    pub async fn room(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed.
        self.all
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("the connection semaphore is never closed"))
    }

    /// Admits a connection from `remote` holding `room`, or `None` when that address already has
    /// its maximum open.
    pub fn admit(
        self: &Arc<Self>,
        room: OwnedSemaphorePermit,
        remote: SocketAddr,
    ) -> Option<ConnectionPermit> {
        let ip = remote.ip();
        if self.rate.check(&ip, ms_since(self.base)).is_err() {
            self.metrics.rate_limited("remote");
            return None;
        }
        let mut map = self.per_remote.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_remote_max {
            drop(map);
            self.metrics.connection_refused();
            return None;
        }
        *n += 1;
        self.metrics.connection(true);
        Some(ConnectionPermit {
            _all: room,
            gate: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut map = self
            .gate
            .per_remote
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.gate.metrics.connection(false);
    }
}

/// Whether a connection has requests in progress, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// When the connection becomes closable for idleness, or `None` while a request is open.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) + idle)
    }
}

/// A request in progress on a connection (held until its response body is done).
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes an idle connection: read by the connection's `poll_read`, which reports end of stream
/// once the connection has had no request in progress for `idle`.
pub struct IdleClose {
    activity: Arc<Activity>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl IdleClose {
    pub fn new(activity: Arc<Activity>, idle: Duration) -> Self {
        let timer = Box::pin(tokio::time::sleep(idle));
        Self {
            activity,
            idle,
            timer,
        }
    }

    /// Ready when the connection should be closed; otherwise arranges to be polled again when
    /// it might be.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let deadline = self
                .activity
                .idle_deadline(self.idle)
                // Busy: look again after another idle period (the request timeout ends it first).
                .unwrap_or_else(|| Instant::now() + self.idle);
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            ready!(self.timer.as_mut().poll(cx));
        }
    }
}

/// Open connections per remote address on a listener, capped; a slot is given back on drop.
#[derive(Debug)]
pub struct PerRemote {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerRemote`].
pub struct RemoteSlot {
    of: Arc<PerRemote>,
    ip: IpAddr,
}

impl PerRemote {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when it already has `max` open.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<RemoteSlot> {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(RemoteSlot {
            of: self.clone(),
            ip,
        })
    }
}

impl Drop for RemoteSlot {
    fn drop(&mut self) {
        let mut map = self.of.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What the accept loop attaches to each connection: the peer, and its activity.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: PeerInfo,
    pub activity: Arc<Activity>,
}

/// Per-request limits: a slot among `max_concurrent_requests`, an answer within
/// `request_timeout_ms`, a body of at most `max_message_bytes` (plus gRPC framing).
#[derive(Clone)]
pub struct RequestLimits {
    slots: Arc<Semaphore>,
    remote_rate: Arc<RateLimiter<IpAddr>>,
    base: Instant,
    timeout: Duration,
    max_body: usize,
    metrics: Arc<Metrics>,
    /// Gateways (`[gateway] ids`) carry the calls of many agents from one address: the
    /// per-address request rate would throttle all of them at once. Each agent behind a gateway
    /// is metered by its own identity when its tool call is decided.
    unmetered: Arc<std::collections::HashSet<crate::model::SpiffeId>>,
}

impl RequestLimits {
    pub fn new(
        cfg: &ServerConfig,
        metrics: Arc<Metrics>,
        unmetered: std::collections::HashSet<crate::model::SpiffeId>,
    ) -> Self {
        Self {
            unmetered: Arc::new(unmetered),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            remote_rate: Arc::new(RateLimiter::new(
                cfg.requests_per_remote_per_second,
                cfg.requests_per_remote_per_second.saturating_mul(2),
            )),
            base: Instant::now(),
            timeout: Duration::from_millis(cfg.request_timeout_ms),
            // A unary request is one message behind a 5-byte gRPC frame header.
            max_body: cfg.max_message_bytes + 5,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for RequestLimits {
    type Service = Limited<S>;
    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limits: RequestLimits,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for Limited<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked on the clone that serves each request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        use tower::ServiceExt;
        let limits = self.limits.clone();
        let inner = self.inner.clone();
        // A client's own `grpc-timeout` can shorten the server's, never lengthen it.
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map_or(limits.timeout, |t| t.min(limits.timeout));
        let deadline = Instant::now() + timeout;
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let remote = conn.as_ref().and_then(|c| c.peer.remote_addr);
        let gateway = conn
            .as_ref()
            .and_then(|c| c.peer.spiffe_id.as_ref())
            .is_some_and(|id| limits.unmetered.contains(id));
        if let Some(addr) = remote
            && !gateway
            && let Err(wait_ms) = limits.remote_rate.check(&addr.ip(), ms_since(limits.base))
        {
            limits.metrics.rate_limited("remote");
            let refused = tonic::Status::resource_exhausted(format!(
                "{} is over [server] requests_per_remote_per_second; retry in {wait_ms} ms",
                addr.ip()
            ));
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        let busy = conn.as_ref().map(|c| c.activity.begin());
        if let Some(c) = conn {
            req.extensions_mut().insert(c.peer);
        }
        let req = req.map(|b| {
            Body::new(BoundedBody {
                inner: b,
                remaining: limits.max_body,
                limit: limits.max_body - 5,
                prefix: [0; 5],
                prefix_len: 0,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                timeout,
            })
        });
        Box::pin(async move {
            let slot =
                tokio::time::timeout_at(deadline, limits.slots.clone().acquire_owned()).await;
            let Ok(Ok(slot)) = slot else {
                limits.metrics.request_refused_busy();
                return Ok(tonic::Status::resource_exhausted(
                    "the broker is at server.max_concurrent_requests; try again shortly",
                )
                .into_http());
            };
            // The handler runs to its end in its own task even when the caller is answered
            // DEADLINE_EXCEEDED first: a handler stopped half-way could leave an upstream
            // account made and not yet recorded. Its slot is held until it ends.
            let handler = tokio::spawn(async move {
                let r = inner.oneshot(req).await;
                drop(slot);
                r
            });
            match tokio::time::timeout_at(deadline, handler).await {
                Ok(Ok(Ok(resp))) => Ok(resp.map(|b| {
                    Body::new(HeldBody {
                        inner: b,
                        _busy: busy,
                    })
                })),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(join)) => {
                    tracing::error!(error = %join, "request handler failed");
                    Ok(
                        tonic::Status::internal("internal error; the broker's log has the detail")
                            .into_http(),
                    )
                }
                Err(_) => {
                    limits.metrics.request_timed_out();
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "not answered within {} ms (server.request_timeout_ms = {}, or the \
                         client's grpc-timeout if shorter)",
                        timeout.as_millis(),
                        limits.timeout.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// A request body cut off past `remaining` bytes, at a first gRPC message that declares itself
/// larger than `limit` (before the decoder reserves room for it), or past the request's
/// deadline. Its errors are gRPC statuses, which the gRPC decoder hands to the caller as they are.
struct BoundedBody {
    inner: Body,
    remaining: usize,
    limit: usize,
    /// The first message's 5-byte gRPC frame header (flag, big-endian length), as it arrives.
    prefix: [u8; 5],
    prefix_len: usize,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl http_body::Body for BoundedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let too_large = || {
                        Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                            "request message larger than server.max_message_bytes = {}",
                            this.limit
                        )))))
                    };
                    if this.prefix_len < 5 {
                        let take = (5 - this.prefix_len).min(data.len());
                        this.prefix[this.prefix_len..this.prefix_len + take]
                            .copy_from_slice(&data[..take]);
                        this.prefix_len += take;
                        let [_, a, b, c, d] = this.prefix;
                        if this.prefix_len == 5
                            && u32::from_be_bytes([a, b, c, d]) as usize > this.limit
                        {
                            return too_large();
                        }
                    }
                    if data.len() > this.remaining {
                        return too_large();
                    }
                    this.remaining -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                    "request body not received within {} ms (server.request_timeout_ms, or the \
                     client's grpc-timeout if shorter)",
                    this.timeout.as_millis()
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its connection counted as busy until it is done (a streamed
/// response is a request in progress).
struct HeldBody {
    inner: Body,
    _busy: Option<Busy>,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A `grpc-timeout` header value: at most 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(grpc_timeout(b"300m"), Some(Duration::from_millis(300)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1S", b"1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
