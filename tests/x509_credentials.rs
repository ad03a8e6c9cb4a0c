//! `x509` credentials: a client certificate and key from the broker's issuing CA that verify
//! against the published CA, carry the agent's SPIFFE ID and the task, and expire with the
//! credential (never after the task).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use jitbroker::server::Options;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;

fn with_x509(dir: &std::path::Path) -> jitbroker::config::Config {
    let mut policy = std::fs::read_to_string(dir.join("policy.cedar")).unwrap();
    policy.push_str(
        "\n@id(\"agents-client-certs\")\npermit(principal, action == Action::\"connect\", resource == Resource::\"payments-mtls\")\nwhen { principal.path like \"/agent/*\" };\n",
    );
    std::fs::write(dir.join("policy.cedar"), policy).unwrap();
    config(dir, |t| {
        format!("{t}\n[resources.payments-mtls]\nkind = \"x509\"\nactions = [\"connect\"]\n")
    })
}

#[tokio::test]
async fn x509_credentials_verify_against_the_published_ca_and_expire_with_the_task() {
    let dir = dev_dir();
    let cfg = with_x509(dir.path());
    let r = spawn(&cfg, Options::default()).await.unwrap();
    let mut c = clients(&r, AGENT).await;
    let task = c
        .broker
        .start_task(start_req(vec![grant("payments-mtls", "connect")], 120))
        .await
        .unwrap()
        .into_inner();
    // Asking for longer than the task has left gives the task's end, not more.
    let cred = c
        .broker
        .issue_credential(pb::IssueCredentialRequest {
            task_id: task.task_id.clone(),
            resource: "payments-mtls".into(),
            action: "connect".into(),
            ttl_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ca_pem = c
        .verifier
        .get_x509_authorities(pb::GetX509AuthoritiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .pem;

    // The secret: the certificate, then its key.
    assert!(cred.secret.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(cred.secret.contains("-----BEGIN PRIVATE KEY-----"));
    let leaf = CertificateDer::pem_slice_iter(cred.secret.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let key_at = cred.secret.find("-----BEGIN PRIVATE KEY-----").unwrap();
    let key = rcgen::KeyPair::from_pem(&cred.secret[key_at..]).expect("the key parses");

    // Chain: verifies against the published CA as a TLS client certificate.
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .expect("the credential verifies against the published CA");

    // Contents: the SPIFFE ID and the task, the credential id, the key that came with it.
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let uris: Vec<String> = x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(
        uris,
        vec![
            AGENT.to_owned(),
            format!("urn:jitbroker:task:{}", task.task_id)
        ]
    );
    assert!(!x.is_ca());
    assert_eq!(
        x.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        cred.credential_id
    );
    assert_eq!(
        x.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(cred.attributes["spiffe_id"], AGENT);

    // Lifetime: ends when the credential does, which is when the task does.
    let not_after = x.validity().not_after.timestamp();
    let cred_exp = cred.expires_at.as_ref().unwrap().seconds;
    let task_exp = task.expires_at.as_ref().unwrap().seconds;
    assert_eq!(not_after, cred_exp);
    assert!(cred_exp <= task_exp, "{cred_exp} > {task_exp}");
    let after = UnixTime::since_unix_epoch(Duration::from_secs(not_after as u64 + 1));
    assert!(
        verifier.verify_client_cert(&leaf, &[], after).is_err(),
        "the certificate must not verify after the credential's expiry"
    );

    // The CA key is sealed: neither the data directory nor the audit holds it in plaintext.
    drop(c);
    r.stop().await;
    let key_marker = "-----BEGIN PRIVATE KEY-----";
    for (path, bytes) in all_bytes(dir.path()) {
        if path.starts_with(dir.path().join("dev")) {
            continue; // the dev CA's own files, plaintext on purpose
        }
        assert!(
            !contains(&bytes, key_marker.as_bytes()),
            "a private key in plaintext in {}",
            path.display()
        );
    }
}
