//! The `files` identity source, as spiffe-helper feeds it: PEM SVID, key and bundle files and a
//! JWT bundle file, reloaded when they change, without a restart; a half-written file keeps the
//! previous material.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use jitbroker::identity::{DevCa, DevJwtKey};

const SERVER_ID: &str = "spiffe://jitbroker.dev/jitbroker";

fn write_server_svid(ca: &DevCa, dir: &Path) {
    let svid = ca
        .mint_svid(
            SERVER_ID,
            &["localhost".to_owned()],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            Duration::from_secs(3600),
        )
        .unwrap();
    // spiffe-helper replaces files one by one; write key first, as it does.
    std::fs::write(dir.join("svid_key.pem"), svid.key_pem.as_bytes()).unwrap();
    std::fs::write(dir.join("svid.pem"), &svid.cert_chain_pem).unwrap();
    std::fs::write(dir.join("svid_bundle.pem"), &svid.bundle_pem).unwrap();
}

#[tokio::test]
async fn files_source_reloads_svid_and_jwt_bundle_without_restart() {
    let dir = dev_dir();
    let d = dir.path();
    let helper = d.join("helper");
    std::fs::create_dir_all(&helper).unwrap();
    let ca = jitbroker::identity::dev::ensure_dev_ca(d, "jitbroker.dev").unwrap();
    write_server_svid(&ca, &helper);
    let key1 = random_jwt_key("jitbroker.dev");
    let key2 = random_jwt_key("jitbroker.dev");
    let jwt_file = helper.join("jwt_bundle.json");
    std::fs::write(&jwt_file, key1.bundle_json().to_string()).unwrap();
    let h = helper.display();
    let cfg = config(d, |t| {
        enable_jwt_svids(t.replace(
            "source = \"dev\"\n",
            &format!(
                "source = \"files\"\nsvid_file = \"{h}/svid.pem\"\nsvid_key_file = \"{h}/svid_key.pem\"\n\
                 bundle_file = \"{h}/svid_bundle.pem\"\njwt_bundle_file = \"{h}/jwt_bundle.json\"\n"
            ),
        ))
    });
    let r = spawn_default(&cfg).await;
    let (chain, key, bundle) = mint(d, AGENT);
    let tls = tls_config(&bundle, Some((&chain, &key)));
    let first = server_cert_serial(r.addr, tls.clone()).await;
    let ch = channel(r.addr, tls.clone()).await.unwrap();
    let mut b = BrokerClient::new(ch.clone());
    b.start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap();
    let bare = channel(r.addr, tls_config(&bundle, None)).await.unwrap();
    let jwt = |k: &DevJwtKey| k.mint(AGENT, "jitbroker", Duration::from_secs(300));
    authed(bare.clone(), format!("Bearer {}", jwt(&key1)))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("JWT-SVID signed by the key in the bundle file");

    // spiffe-helper rotates the SVID: new handshakes see the new certificate, the open channel
    // keeps working.
    write_server_svid(&ca, &helper);
    eventually("new handshakes use the rewritten SVID", || {
        let tls = tls.clone();
        let first = first.clone();
        async move { server_cert_serial(r.addr, tls).await != first }
    })
    .await;
    let second = server_cert_serial(r.addr, tls.clone()).await;
    b.start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("the open channel survives the rotation");

    // A half-written key file: the broker keeps serving the SVID it has.
    std::fs::write(
        helper.join("svid_key.pem"),
        "-----BEGIN PRIVATE KEY-----\nMIGH",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // one poll period of the watcher
    assert_eq!(server_cert_serial(r.addr, tls.clone()).await, second);
    write_server_svid(&ca, &helper);

    // The JWT bundle file changes: the new key is accepted, the removed one refused.
    std::fs::write(&jwt_file, key2.bundle_json().to_string()).unwrap();
    eventually("the rewritten JWT bundle is used", || {
        let bare = bare.clone();
        let t = jwt(&key2);
        async move {
            authed(bare, format!("Bearer {t}"))
                .start_task(start_req(vec![grant("demo-token", "read")], 60))
                .await
                .is_ok()
        }
    })
    .await;
    let refused = authed(bare.clone(), format!("Bearer {}", jwt(&key1)))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("kid"), "{refused:?}");
    drop((b, ch, bare));
    r.stop().await;
}
