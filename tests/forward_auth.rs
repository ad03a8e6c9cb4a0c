//! Forward auth at `/forward-auth` for proxies that delegate the decision over HTTP: called
//! directly the way nginx, Caddy and Traefik call it, then through a real nginx (`auth_request`)
//! in front of a tool of the test's own.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::envoy::{
    assert_denied_completed, borrowed, first_allowed_call, https, tool_behind_gateway,
    with_own_authorization,
};
use common::gateway::{GATEWAY, TASK_HEADER, configure, tickets_task};
use common::tools::{self, KillOnDrop, docs_block, replace_all};
use common::*;

/// The agent's certificate as nginx's `$ssl_client_escaped_cert` passes it.
fn escaped(pem: &str) -> String {
    pem.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The leaf of a PEM chain.
fn leaf(chain: &str) -> String {
    let end = "-----END CERTIFICATE-----";
    let i = chain.find(end).unwrap() + end.len();
    format!("{}\n", &chain[..i])
}

async fn task_for(r: &Running, who: &str) -> (Clients, String) {
    let mut c = clients(r, who).await;
    let t = tickets_task(&mut c).await;
    (c, t)
}

#[tokio::test]
async fn forward_auth_decides_as_proxies_ask() {
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let fa = r.forward_auth_addr.expect("forward-auth listener");
    let gw_tls = tls_as(&r.data_dir, GATEWAY);
    let (agent_chain, _, _) = mint(&r.data_dir, AGENT);
    let agent_cert = leaf(&agent_chain);
    let (mut agent, task) = task_for(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let ask = |headers: Vec<(&'static str, String)>, tls: rustls::ClientConfig| async move {
        https(fa, tls, "GET", "/forward-auth", &borrowed(&headers), "")
            .await
            .unwrap()
    };

    // nginx: escaped PEM and X-Original-*; the answer carries the credential to copy upstream.
    let nginx = vec![
        ("x-client-cert", escaped(&agent_cert)),
        ("x-original-method", "GET".to_owned()),
        ("x-original-uri", "/tickets/42?x=1".to_owned()),
        (TASK_HEADER, task.clone()),
    ];
    let resp = ask(nginx.clone(), gw_tls.clone()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    // Only the configured path ([gateway] forward_auth_path) answers.
    let elsewhere = https(
        fa,
        gw_tls.clone(),
        "GET",
        "/forward-auth/x",
        &borrowed(&nginx),
        "",
    )
    .await
    .unwrap();
    assert_eq!(elsewhere.status, 404, "{elsewhere:?}");
    assert!(
        elsewhere.body.contains("forward_auth_path"),
        "{elsewhere:?}"
    );
    let from_nginx_form = raw_header(fa, gw_tls.clone(), &nginx, "authorization").await;

    // Traefik: the PEM body alone in X-Forwarded-Tls-Client-Cert, X-Forwarded-*.
    let body: String = agent_cert
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let traefik = vec![
        ("x-forwarded-tls-client-cert", escaped(&body)),
        ("x-forwarded-method", "GET".to_owned()),
        ("x-forwarded-host", "tickets.internal".to_owned()),
        ("x-forwarded-uri", "/tickets/42".to_owned()),
        (TASK_HEADER, task.clone()),
    ];
    let resp = ask(traefik.clone(), gw_tls.clone()).await;
    assert_eq!(resp.status, 200, "{resp:?}");

    // The task's credential, the same for both forms (reused), live for the agent and the task.
    let raw = raw_header(fa, gw_tls.clone(), &traefik, "authorization").await;
    assert_eq!(raw, from_nginx_form);
    let secret = raw.strip_prefix("Bearer ").expect("Bearer");
    let i = introspect(&mut tool, secret, "tickets").await;
    assert!(i.active);
    assert_eq!(i.spiffe_id, AGENT);
    assert_eq!(i.task_id, task);

    // Refusals: no agent certificate (401), no original request (400), another agent's task
    // (403, JSON naming why), a caller that is not a gateway (403).
    let no_cert: Vec<_> = nginx.iter().skip(1).cloned().collect();
    assert_eq!(ask(no_cert, gw_tls.clone()).await.status, 401);
    let no_uri = vec![nginx[0].clone(), (TASK_HEADER, task.clone())];
    assert_eq!(ask(no_uri, gw_tls.clone()).await.status, 400);
    let (_other, others) = task_for(&r, AGENT_B).await;
    let mut foreign = nginx.clone();
    foreign[3] = (TASK_HEADER, others);
    let resp = ask(foreign, gw_tls.clone()).await;
    assert_eq!(resp.status, 403);
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert!(
        v["reason"].as_str().unwrap().contains("not a task of"),
        "{v}"
    );
    let mut two_certs = traefik.clone();
    two_certs.push(("x-client-cert", escaped(&agent_cert)));
    let resp = ask(two_certs, gw_tls.clone()).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(resp.body.contains("came from the client"), "{}", resp.body);
    let mut two_families = nginx.clone();
    two_families.push(("x-forwarded-uri", "/billing".to_owned()));
    assert_eq!(ask(two_families, gw_tls.clone()).await.status, 400);
    let not_gateway = tls_as(&r.data_dir, AGENT);
    assert_eq!(ask(nginx.clone(), not_gateway).await.status, 403);

    // After CompleteTask: denied at once.
    agent.complete(&task).await;
    assert_denied_completed(&ask(nginx, gw_tls).await, "");
    r.stop().await;
}

/// The exact value of one response header (the shared client lower-cases the head).
async fn raw_header(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    headers: &[(&str, String)],
    name: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(addr, http1(tls)).await.unwrap();
    let mut req = "GET /forward-auth HTTP/1.1\r\nhost: x\r\nconnection: close\r\n".to_owned();
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// nginx: `JITBROKER_NGINX`, then `nginx` on PATH, then `/usr/sbin/nginx`. Skips when absent
/// unless `JITBROKER_REQUIRE_NGINX=1`.
fn nginx_binary() -> Option<PathBuf> {
    tools::binary(
        "nginx",
        Some(PathBuf::from("/usr/sbin/nginx")),
        "apt-get install nginx-light",
    )
}

/// The nginx configuration of docs/gateways.md with the test's addresses and files.
fn nginx_config(
    dir: &Path,
    listen: u16,
    forward_auth: SocketAddr,
    tool: SocketAddr,
    files: &[(&str, PathBuf)],
) -> String {
    let mut subst = vec![
        (
            "listen 443 ssl;".to_owned(),
            format!("listen 127.0.0.1:{listen} ssl;"),
        ),
        (
            "server jitbroker.jitbroker.svc.cluster.local:8444;".to_owned(),
            format!("server {forward_auth};"),
        ),
        (
            "http://tickets.tools.svc.cluster.local:8080".to_owned(),
            format!("http://{tool}"),
        ),
        (
            "proxy_ssl_name jitbroker.jitbroker.svc.cluster.local;".to_owned(),
            "proxy_ssl_name localhost;".to_owned(),
        ),
    ];
    for (from, to) in files {
        subst.push(((*from).to_owned(), to.display().to_string()));
    }
    let server = replace_all(docs_block("nginx-config", "nginx"), "nginx config", &subst);
    let d = dir.display();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    format!(
        "{user}worker_processes 1;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/t1;\n  proxy_temp_path {d}/t2;\n  \
         fastcgi_temp_path {d}/t3;\n  uwsgi_temp_path {d}/t4;\n  scgi_temp_path {d}/t5;\n{server}\n}}\n",
        user = if root { "user root;\n" } else { "" },
    )
}

#[tokio::test]
async fn nginx_auth_request_injects_the_credential_and_fails_closed() {
    let Some(bin) = nginx_binary() else { return };
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let fa = r.forward_auth_addr.unwrap();
    let work = tempfile::tempdir().unwrap();
    let (tool_addr, seen, files) = tool_behind_gateway(&r, work.path()).await;
    let (mut agent, task) = task_for(&r, AGENT).await;
    let port = free_port();
    let conf = nginx_config(
        work.path(),
        port,
        fa,
        tool_addr,
        &[
            ("/etc/nginx/svid/svid.pem", files.cert),
            ("/etc/nginx/svid/svid.key", files.key),
            ("/etc/nginx/svid/bundle.pem", files.bundle),
        ],
    );
    let conf_path = work.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(&bin)
        .arg("-p")
        .arg(work.path())
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let _nginx = KillOnDrop(child);
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    poll_until(100, Duration::from_millis(50), || async {
        tokio::net::TcpStream::connect(listen).await.is_ok()
    })
    .await;
    let agent_tls = tls_as(&r.data_dir, AGENT);
    let call = |headers: Vec<(&'static str, String)>| {
        let tls = agent_tls.clone();
        async move {
            https(listen, tls, "GET", "/tickets/42", &borrowed(&headers), "")
                .await
                .unwrap()
        }
    };
    let log = || std::fs::read_to_string(work.path().join("error.log")).unwrap_or_default();

    let resp = call(with_own_authorization(&task)).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", log());
    let auth = first_allowed_call(&resp, &seen, &task);
    assert!(auth.starts_with("Bearer jbt_"), "{auth}");
    let secret = auth.trim_start_matches("Bearer ");
    assert!(!resp.head.contains(&secret.to_lowercase()) && !resp.body.contains(secret));

    let (_b, others) = task_for(&r, AGENT_B).await;
    // Agent B's certificate is public: an agent that sends it, or claims another request, in
    // the headers the broker reads must not become B or change what is decided.
    let (b_chain, _, _) = mint(&r.data_dir, AGENT_B);
    let b_cert = leaf(&b_chain);
    let b_body: String = b_cert.lines().filter(|l| !l.starts_with("-----")).collect();
    for headers in [
        vec![],
        vec![(TASK_HEADER, others.clone())],
        vec![
            (TASK_HEADER, others.clone()),
            ("x-forwarded-tls-client-cert", escaped(&b_body)),
        ],
        vec![
            (TASK_HEADER, others.clone()),
            ("x-client-cert", escaped(&b_cert)),
        ],
        vec![
            (TASK_HEADER, others.clone()),
            ("x-forwarded-tls-client-cert", escaped(&b_body)),
            ("x-forwarded-method", "GET".into()),
            ("x-forwarded-uri", "/tickets/1".into()),
        ],
    ] {
        let resp = call(headers.clone()).await;
        assert!(
            resp.status == 403 || resp.status == 401,
            "{headers:?}: {resp:?}"
        );
    }
    assert_eq!(seen.all().len(), 1, "denied calls never reach the tool");

    agent.complete(&task).await;
    assert_eq!(call(vec![(TASK_HEADER, task.clone())]).await.status, 403);

    let (_c, task2) = task_for(&r, AGENT).await;
    r.stop().await;
    let resp = call(vec![(TASK_HEADER, task2)]).await;
    assert!(
        !(200..300).contains(&resp.status),
        "the broker down must deny: {resp:?}"
    );
    assert_eq!(seen.all().len(), 1);
}
