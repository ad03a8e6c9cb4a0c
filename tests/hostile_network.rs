//! What a hostile network can do to the API port: crafted paths, floods of junk and of
//! unauthenticated requests, oversized messages, too many connections and streams. The broker
//! must keep its metrics readable and bounded, its disk use bounded, and keep serving the
//! legitimate agent.

mod common;

use common::*;
use jitbroker::api::pb;
use tonic::codegen::http::uri::PathAndQuery;

/// Calls `path` on `ch` with an empty message, whatever the path says.
async fn call_path(ch: &tonic::transport::Channel, path: &str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<pb::GetTaskRequest, pb::Task>::default();
    let path = PathAndQuery::try_from(path).expect("a path the http crate accepts");
    match grpc
        .unary(
            tonic::Request::new(pb::GetTaskRequest::default()),
            path,
            codec,
        )
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn crafted_paths_neither_break_the_exposition_nor_add_series() {
    let dir = dev_dir();
    let (r, _clock) = spawn_manual(dir.path()).await;
    let ch = channel_as(&r, AGENT).await;
    let series = |samples: &[Sample]| {
        let mut v: Vec<String> = samples
            .iter()
            .map(|(n, l, _)| format!("{n}{l:?}"))
            .collect();
        v.sort();
        v
    };
    let before = series(&scrape(&r).await);

    // Quotes and braces pass the http crate's path check; written into a label unescaped they
    // end the label early and leave the rest of the line as garbage.
    let crafted = [
        "/jitbroker.v1.Broker/GetTask\"}0\"{x=\"",
        "/jitbroker.v1.x\"}junk{a=\"",
        "/jitbroker.v1.Broker/GetTask/extra",
    ];
    for p in crafted {
        assert_eq!(call_path(&ch, p).await, tonic::Code::Unimplemented, "{p}");
    }
    for i in 0..200 {
        call_path(&ch, &format!("/jitbroker.v1.Broker/Random{i}")).await;
    }
    assert_eq!(
        call_path(&ch, "/jitbroker.v1.Broker/GetTask").await,
        tonic::Code::InvalidArgument
    );

    let after = scrape(&r).await;
    assert_eq!(series(&after), before, "the set of series changed");
    let count = |method: &str| {
        labelled(
            &after,
            "jitbroker_request_duration_seconds_count",
            "method",
            method,
        )
    };
    assert_eq!(count("other"), Some(203.0));
    assert_eq!(count("jitbroker.v1.Broker/GetTask"), Some(1.0));
    r.stop().await;
}

/// A broker on a fresh dev dir whose `[server]` section is `server`: (dir, broker).
async fn spawn_limited(server: &str) -> (tempfile::TempDir, Running) {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| format!("{t}\n[server]\n{server}\n"));
    let r = spawn_default(&cfg).await;
    (dir, r)
}

/// The value of the series `name{label="value"}` among `samples`.
fn labelled(samples: &[Sample], name: &str, label: &str, value: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l == &[(label.to_owned(), value.to_owned())])
        .map(|s| s.2)
}

/// Asserts that the broker still answers an empty GetTask on `ch` on its merits.
async fn assert_still_served(ch: tonic::transport::Channel) {
    let code = BrokerClient::new(ch)
        .get_task(pb::GetTaskRequest::default())
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::InvalidArgument);
}

/// A TLS connection as `AGENT` from the local address `from` (any 127.x.y.z is loopback).
async fn tls_from(r: &Running, from: [u8; 4]) -> std::io::Result<TlsStream> {
    tls_to(r.addr, &r.data_dir, from).await
}

/// A TLS connection as `AGENT` to `addr` from the local address `from`.
async fn tls_connect_from(
    addr: std::net::SocketAddr,
    data_dir: &std::path::Path,
    from: [u8; 4],
) -> std::io::Result<TlsStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind((std::net::Ipv4Addr::from(from), 0).into())?;
    let tcp = sock.connect(addr).await?;
    tls_over(tcp, tls_as(data_dir, AGENT)).await
}

/// [`tls_connect_from`] and the HTTP/2 preface, once the server has answered it with its
/// SETTINGS.
async fn tls_to(
    addr: std::net::SocketAddr,
    data_dir: &std::path::Path,
    from: [u8; 4],
) -> std::io::Result<TlsStream> {
    let mut tls = tls_connect_from(addr, data_dir, from).await?;
    // TLS 1.3: the server's verdict on the client certificate, or its close, arrives after the
    // client's Finished. An HTTP/2 preface makes the server answer with its SETTINGS.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(PREFACE).await?;
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await?;
    let mut settings = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
    tls.read_exact(&mut settings).await?;
    Ok(tls)
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

fn metric(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l.is_empty())
        .unwrap_or_else(|| panic!("no {name}"))
        .2
}

#[tokio::test]
async fn connections_beyond_the_caps_are_refused_or_wait() {
    let (_dir, r) = spawn_limited("max_connections = 3\nmax_connections_per_remote = 2").await;
    let a1 = tls_from(&r, [127, 0, 0, 1]).await.expect("first");
    let _a2 = tls_from(&r, [127, 0, 0, 1]).await.expect("second");
    // A third from the same address is closed at once.
    assert!(tls_from(&r, [127, 0, 0, 1]).await.is_err());
    let _b1 = tls_from(&r, [127, 0, 0, 2]).await.expect("other address");
    // The fourth in all waits in the accept queue ...
    let (addr, data_dir) = (r.addr, r.data_dir.clone());
    let mut waiting = tokio::spawn(async move { tls_to(addr, &data_dir, [127, 0, 0, 2]).await });
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut waiting).await;
    assert!(
        early.is_err(),
        "a connection beyond max_connections was served"
    );
    // ... until one closes.
    drop(a1);
    let fourth = tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("the queued connection is served once one closes")
        .unwrap();
    assert!(fourth.is_ok(), "{fourth:?}");
    let m = scrape(&r).await;
    assert_eq!(metric(&m, "jitbroker_api_connections_refused_total"), 1.0);
    assert_eq!(metric(&m, "jitbroker_api_connections"), 3.0);
    drop((_a2, _b1, fourth));
    r.stop().await;
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A HEADERS frame opening a gRPC call to `path` on `stream` (HPACK literals, no indexing),
/// its body left open.
fn grpc_headers(stream: u32, path: &str) -> Vec<u8> {
    let mut h = vec![0x83, 0x87]; // :method POST, :scheme https
    h.extend([0x04, path.len() as u8]);
    h.extend(path.as_bytes());
    h.extend([0x01, 9]);
    h.extend(b"localhost");
    h.extend([0x0f, 0x10, 16]);
    h.extend(b"application/grpc");
    h.extend([0x00, 2]);
    h.extend(b"te");
    h.extend([8]);
    h.extend(b"trailers");
    frame(0x1, 0x4, stream, &h)
}

/// Every frame the server sends until it closes the connection (or `bound` passes): (type,
/// stream, payload).
async fn frames_until_close(
    tls: &mut TlsStream,
    bound: std::time::Duration,
) -> Vec<(u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(bound, async {
        let mut chunk = [0u8; 16384];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend(&chunk[..n]),
            }
        }
    })
    .await;
    let mut out = Vec::new();
    let mut rest = &buf[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        out.push((rest[3], stream, rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    out
}

/// The error code of the GOAWAY among `frames`, if any.
fn goaway(frames: &[(u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|(t, _, _)| *t == 0x7)
        .map(|(_, _, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

#[tokio::test]
async fn a_reset_flood_closes_the_connection_and_others_are_served() {
    let (_dir, r) = spawn_limited("max_pending_reset_streams = 5").await;
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_from(&r, [127, 0, 0, 1]).await.unwrap();
    let mut flood = Vec::new();
    for i in 0..200u32 {
        let stream = 2 * i + 1;
        flood.extend(grpc_headers(stream, "/jitbroker.v1.Broker/GetTask"));
        flood.extend(frame(0x3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    tls.write_all(&flood).await.unwrap();
    let got = frames_until_close(&mut tls, std::time::Duration::from_secs(20)).await;
    assert_eq!(
        goaway(&got),
        Some(0xb),
        "ENHANCE_YOUR_CALM expected: {got:?}"
    );
    // The broker still serves everyone else.
    assert_still_served(channel_as(&r, AGENT).await).await;
    r.stop().await;
}

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_are_refused() {
    let (_dir, r) = spawn_limited("max_concurrent_streams = 3\nrequest_timeout_ms = 1000").await;
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_from(&r, [127, 0, 0, 1]).await.unwrap();
    // The client ignores the advertised limit and opens five streams whose bodies never end.
    let mut open = Vec::new();
    for i in 0..5u32 {
        open.extend(grpc_headers(2 * i + 1, "/jitbroker.v1.Broker/GetTask"));
    }
    tls.write_all(&open).await.unwrap();
    let got = frames_until_close(&mut tls, std::time::Duration::from_secs(3)).await;
    let refused: Vec<u32> = got
        .iter()
        .filter(|(t, _, p)| *t == 0x3 && p[..] == 7u32.to_be_bytes()) // REFUSED_STREAM
        .map(|(_, s, _)| *s)
        .collect();
    assert_eq!(refused, vec![7, 9], "{got:?}");
    r.stop().await;
}

/// A call to GetTask whose request body never comes, optionally with a client `grpc-timeout`.
async fn stalled_call(
    ch: tonic::transport::Channel,
    timeout: Option<std::time::Duration>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<pb::GetTaskRequest, pb::Task>::default();
    let mut req = tonic::Request::new(futures::stream::pending::<pb::GetTaskRequest>());
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    grpc.client_streaming(
        req,
        PathAndQuery::from_static("/jitbroker.v1.Broker/GetTask"),
        codec,
    )
    .await
    .expect_err("a call without a request cannot succeed")
}

/// An empty GetTask call over a fresh HTTP/2 connection with `grpc-timeout: timeout`, from a
/// client that leaves the deadline to the server: (grpc-status, grpc-message).
async fn call_with_grpc_timeout(r: &Running, timeout: &str) -> (String, String) {
    use http_body_util::Full;
    let tls = tls_connect_from(r.addr, &r.data_dir, [127, 0, 0, 3])
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = tonic::codegen::http::Request::post("https://localhost/jitbroker.v1.Broker/GetTask")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let h = |k: &str| {
        resp.headers()
            .get(k)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (h("grpc-status"), h("grpc-message"))
}

#[tokio::test]
async fn a_request_not_answered_in_time_gets_deadline_exceeded() {
    let (_dir, r) = spawn_limited("request_timeout_ms = 400").await;
    let ch = channel_as(&r, AGENT).await;
    let s = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stalled_call(ch.clone(), None),
    )
    .await
    .expect("the server answers a stalled request");
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("request_timeout_ms"), "{s:?}");
    assert_still_served(ch).await;
    assert_eq!(
        metric(&scrape(&r).await, "jitbroker_api_requests_timed_out_total"),
        1.0
    );
    r.stop().await;
}

#[tokio::test]
async fn a_request_finding_every_slot_busy_is_refused_then_served_once_one_frees() {
    let (_dir, r) = spawn_limited("max_concurrent_requests = 2\nrequest_timeout_ms = 3000").await;
    let ch = channel_as(&r, AGENT).await;
    let holders: Vec<_> = (0..2)
        .map(|_| tokio::spawn(stalled_call(ch.clone(), None)))
        .collect();
    // Until both holders are in, a request may still find a slot and be answered on its merits.
    // The short deadline is sent as grpc-timeout by a client that does not enforce it itself, so
    // the answer is the server's.
    let mut refused = None;
    for _ in 0..50 {
        let (code, message) = call_with_grpc_timeout(&r, "200m").await;
        if code == "8" {
            refused = Some(message);
            break;
        }
    }
    let refused = refused.expect("a request is refused while both slots are held");
    assert!(refused.contains("max_concurrent_requests"), "{refused}");
    for h in holders {
        assert_eq!(h.await.unwrap().code(), tonic::Code::DeadlineExceeded);
    }
    assert_still_served(ch).await;
    assert!(
        metric(
            &scrape(&r).await,
            "jitbroker_api_requests_refused_busy_total"
        ) >= 1.0
    );
    r.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_before_it_is_decoded() {
    let (_dir, r) = spawn_limited("").await;
    let mut c = clients(&r, AGENT).await;
    let mut req = start_req(vec![grant("demo-token", "read")], 60);
    req.purpose = "x".repeat(100_000);
    let s = c.broker.start_task(req).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("server.max_message_bytes = 65536"),
        "{s:?}"
    );
    // Just under the limit, the request is decoded and refused for what it says.
    let mut req = start_req(vec![grant("demo-token", "read")], 60);
    req.purpose = "x".repeat(60_000);
    let s = c.broker.start_task(req).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("purpose:"), "{s:?}");
    r.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_a_request_in_progress() {
    let (_dir, r) = spawn_limited("idle_timeout_ms = 300\nrequest_timeout_ms = 1500").await;
    let mut idle = tls_from(&r, [127, 0, 0, 1]).await.unwrap();
    let started = std::time::Instant::now();
    let got = frames_until_close(&mut idle, std::time::Duration::from_secs(20)).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "an idle connection stayed open: {got:?}"
    );
    use tokio::io::AsyncWriteExt;
    let mut busy = tls_from(&r, [127, 0, 0, 1]).await.unwrap();
    busy.write_all(&grpc_headers(1, "/jitbroker.v1.Broker/GetTask"))
        .await
        .unwrap();
    let got = frames_until_close(&mut busy, std::time::Duration::from_secs(20)).await;
    assert!(
        got.iter().any(|(t, s, _)| *t == 0x1 && *s == 1),
        "the request in progress was answered before the connection closed: {got:?}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_unauthenticated_floods_leave_the_agent_served_and_the_disk_bounded() {
    use tokio::io::AsyncWriteExt;
    let dir = dev_dir();
    // JWT-SVIDs on: a client certificate becomes optional, so unauthenticated requests reach
    // the gRPC layer instead of stopping at the handshake.
    let cfg = config(dir.path(), enable_jwt_svids);
    let r = spawn_default(&cfg).await;
    let mut agent = clients(&r, AGENT).await;
    let (_, _, bundle) = mint(&r.data_dir, AGENT);
    let bytes_before = dir_bytes(&r.data_dir);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);

    // Junk: TCP connections from 127.0.0.2 that send garbage instead of a TLS ClientHello.
    let addr = r.addr;
    let junk = tokio::spawn(async move {
        let mut n = 0u64;
        while std::time::Instant::now() < until {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(([127, 0, 0, 2], 0).into()).unwrap();
            if let Ok(mut s) = sock.connect(addr).await {
                let _ = s.write_all(b"\x16\x03\x01\x00\x05junk-junk-junk\r\n").await;
                n += 1;
            }
        }
        n
    });
    // Unauthenticated: TLS without a certificate from 127.0.0.3, gRPC calls with no identity.
    let mut floods = Vec::new();
    for _ in 0..4 {
        let tls = tls_config(&bundle, None);
        floods.push(tokio::spawn(async move {
            let ch = channel(addr, tls).await.unwrap();
            let mut c = BrokerClient::new(ch);
            let (mut unauth, mut limited) = (0u64, 0u64);
            while std::time::Instant::now() < until {
                match c.get_task(pb::GetTaskRequest::default()).await {
                    Err(s) if s.code() == tonic::Code::Unauthenticated => unauth += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => limited += 1,
                    other => panic!("unexpected answer to an unauthenticated call: {other:?}"),
                }
            }
            (unauth, limited)
        }));
    }
    // Meanwhile the agent works: every call must succeed.
    let mut served = 0u64;
    let mut slowest = std::time::Duration::ZERO;
    while std::time::Instant::now() < until {
        let t0 = std::time::Instant::now();
        let task = agent
            .broker
            .start_task(start_req(vec![grant("demo-token", "read")], 60))
            .await
            .expect("the agent is served during the flood")
            .into_inner();
        agent
            .broker
            .issue_credential(issue_req(&task.task_id, "demo-token", 30))
            .await
            .expect("the agent gets its credential during the flood");
        agent
            .broker
            .complete_task(pb::CompleteTaskRequest {
                task_id: task.task_id,
            })
            .await
            .expect("the agent completes its task during the flood");
        slowest = slowest.max(t0.elapsed());
        served += 1;
    }
    let junk = junk.await.unwrap();
    let (mut unauth, mut limited) = (0, 0);
    for f in floods {
        let (u, l) = f.await.unwrap();
        unauth += u;
        limited += l;
    }
    let m = scrape(&r).await;
    let failures = metric(&m, "jitbroker_authentication_failures_total");
    r.stop().await;
    let bytes_after = dir_bytes(dir.path());
    let entries = audit_entries(dir.path());
    let summaries: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "auth_failed")
        .collect();
    eprintln!(
        "hostile network, 4 s: {junk} junk connections, {unauth} unauthenticated calls \
         refused, {limited} rate-limited, {failures} authentication failures counted; agent \
         served {served} task cycles (slowest {slowest:?}); audit: {} entries, {} auth_failed \
         summaries; data dir {bytes_before} -> {bytes_after} bytes",
        entries.len(),
        summaries.len(),
    );
    // One audit entry and flush per attempt wrote about 600 bytes each.
    assert!(
        bytes_after < 2 << 20,
        "the data dir grew to {bytes_after} bytes"
    );
    assert!(served >= 3, "the agent was starved: {served} cycles");
    assert!(
        junk + unauth >= 200,
        "the flood was too small to show anything"
    );
    assert!(failures >= unauth as f64, "every refusal is counted");
    // One summary per remote address (127.0.0.2 and 127.0.0.3), not one entry per attempt.
    assert!(
        (1..=2).contains(&summaries.len()),
        "{} auth_failed entries: {summaries:#?}",
        summaries.len()
    );
    for s in &summaries {
        assert!(
            s["detail"].as_str().unwrap().contains(" refused between "),
            "{s}"
        );
    }
    // The audit holds the agent's work and the summaries, nothing per attempt.
    assert!(
        (entries.len() as u64) < 10 * served + 10,
        "{} audit entries for {served} cycles",
        entries.len()
    );
}

#[tokio::test]
async fn under_the_disk_floor_writes_are_refused_naming_the_disk_and_readiness_fails() {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| {
        format!("{t}\n[store]\nmin_free_mb = 1000000000\n")
    });
    let r = spawn_default(&cfg).await;
    let mut agent = clients(&r, AGENT).await;
    let s = agent
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("min_free_mb") && s.message().contains("free"),
        "{s:?}"
    );
    let mut op = clients(&r, OPERATOR).await;
    let s = op.block(AGENT, "x").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    // Reads still answer.
    let s = agent
        .broker
        .get_task(pb::GetTaskRequest {
            task_id: "task_00000000000000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_ne!(s.code(), tonic::Code::Unavailable, "{s:?}");
    let ready = http_get(&r.ops_addr.to_string(), "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("min_free_mb"), "{ready}");
    r.stop().await;
}

#[tokio::test]
async fn a_caller_over_its_rate_is_refused_until_its_budget_refills() {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| {
        format!("{t}\n[server]\nrequests_per_identity_per_second = 1\n")
    });
    let (r, clock) = spawn_manual_cfg(&cfg).await;
    let mut a = clients(&r, AGENT).await;
    let mut b = clients(&r, AGENT_B).await;
    let get = pb::GetTaskRequest::default;
    // A burst of twice the rate, then refused.
    for _ in 0..2 {
        let s = a.broker.get_task(get()).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    }
    let s = a.broker.get_task(get()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("requests_per_identity_per_second")
            && s.message().contains("retry in 1000 ms"),
        "{s:?}"
    );
    // Another caller has its own budget.
    let s = b.broker.get_task(get()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    clock.advance(std::time::Duration::from_secs(1));
    let s = a.broker.get_task(get()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert_eq!(
        labelled(
            &scrape(&r).await,
            "jitbroker_rate_limited_total",
            "scope",
            "identity"
        ),
        Some(1.0)
    );
    r.stop().await;
}

#[tokio::test]
async fn a_start_task_whose_grants_are_all_denied_writes_one_audit_entry() {
    let dir = dev_dir();
    let (r, _clock) = spawn_manual(dir.path()).await;
    let mut tool = clients(&r, TOOL).await;
    let grants = vec![
        grant("demo-token", "read"),
        grant("demo-token", "write"),
        grant("demo-jwt", "read"),
        grant("demo-jwt", "write"),
    ];
    for _ in 0..5 {
        let s = tool
            .broker
            .start_task(start_req(grants.clone(), 60))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }
    r.stop().await;
    let decisions: Vec<_> = audit_entries(dir.path())
        .into_iter()
        .filter(|e| e["kind"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 5, "{decisions:#?}");
    for d in &decisions {
        assert_eq!(d["decision"], "DENIED");
        assert_eq!(d["spiffe_id"], TOOL);
        let reason = d["reason"].as_str().unwrap();
        for g in ["(demo-token, read)", "(demo-jwt, write)"] {
            assert!(reason.contains(g), "{reason}");
        }
    }
}
