//! `x509` credentials: a client certificate and key from the resource's issuing CA that verify
//! against the published authorities, carry the agent's SPIFFE ID, the task, the resource and the
//! action, expire with the credential (never after the task), are refused by a relying party of
//! another resource or action, and whose revocation a verifier can look up by serial.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use jitbroker::broker::ManualClock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tonic::Code;

fn with_x509(dir: &std::path::Path) -> jitbroker::config::Config {
    append_policy(
        dir,
        "\n@id(\"agents-client-certs\")\npermit(principal, action == Action::\"connect\", resource == Resource::\"payments-mtls\")\nwhen { principal.path like \"/agent/*\" };\n",
    );
    config(dir, |t| {
        format!("{t}\n[resources.payments-mtls]\nkind = \"x509\"\nactions = [\"connect\"]\n")
    })
}

/// A client certificate verifier trusting the CAs in `ca_pem`.
fn client_verifier(ca_pem: &str) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap()
}

/// The URI SANs of `x` (none when it has no SAN extension).
fn uri_sans(x: &x509_parser::certificate::X509Certificate) -> Vec<String> {
    x.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn x509_credentials_verify_against_the_published_ca_and_expire_with_the_task() {
    let dir = dev_dir();
    let cfg = with_x509(dir.path());
    let r = spawn_default(&cfg).await;
    let mut c = clients(&r, AGENT).await;
    let task = c.start(vec![grant("payments-mtls", "connect")], 120).await;
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
        .get_x509_authorities(pb::GetX509AuthoritiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pem;

    // The secret: the certificate, its issuing CA, then its key.
    assert!(cred.secret.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(cred.secret.contains("-----BEGIN PRIVATE KEY-----"));
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cred.secret.as_bytes())
            .map(Result::unwrap)
            .collect();
    assert_eq!(chain.len(), 2, "the leaf and its resource's issuing CA");
    let leaf = chain[0].clone();
    let key_at = cred.secret.find("-----BEGIN PRIVATE KEY-----").unwrap();
    let key = rcgen::KeyPair::from_pem(&cred.secret[key_at..]).expect("the key parses");

    // Chain: verifies against the published root as a TLS client certificate, given the chain.
    let verifier = client_verifier(&ca_pem);
    verifier
        .verify_client_cert(&leaf, &chain[1..], UnixTime::now())
        .expect("the credential verifies against the published root");
    assert!(
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .is_err(),
        "the root signs resource CAs, not leaves"
    );

    // Contents: the SPIFFE ID and the task, the credential id, the key that came with it.
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    assert_eq!(
        uri_sans(&x),
        vec![
            AGENT.to_owned(),
            format!("urn:jitbroker:task:{}", task.task_id),
            "urn:jitbroker:resource:payments-mtls".to_owned(),
            "urn:jitbroker:action:connect".to_owned(),
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
        verifier
            .verify_client_cert(&leaf, &chain[1..], after)
            .is_err(),
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

const RESOURCE_POLICY: &str = r#"
@id("agents-staging-and-prod")
permit(principal, action, resource)
when { principal.path like "/agent/*" && (resource == Resource::"staging" || resource == Resource::"prod") };
"#;

/// Two `x509` resources with the same actions; the tool verifies both, nobody else does.
fn two_resources(dir: &std::path::Path) -> jitbroker::config::Config {
    std::fs::write(dir.join("policy.cedar"), RESOURCE_POLICY).unwrap();
    config(dir, |t| {
        let mut t = t;
        for name in ["staging", "prod"] {
            t.push_str(&format!(
                "\n[resources.{name}]\nkind = \"x509\"\nactions = [\"read\", \"write\"]\nverifiers = [\"{TOOL}\"]\n"
            ));
        }
        t
    })
}

/// What a relying party of one (resource, action) checks, in the order the README gives: the
/// chain up to the one CA it trusts, as a client certificate, at `now`; then exactly one
/// resource URI SAN naming its resource and exactly one action URI SAN naming its action.
fn relying_party(
    trusted_ca_pem: &str,
    resource: &str,
    action: &str,
    presented: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), String> {
    client_verifier(trusted_ca_pem)
        .verify_client_cert(&presented[0], &presented[1..], now)
        .map_err(|e| format!("chain: {e}"))?;
    let (_, x) = x509_parser::parse_x509_certificate(presented[0].as_ref()).unwrap();
    let uris = uri_sans(&x);
    let only = |prefix: &str| -> Result<String, String> {
        let found: Vec<&String> = uris.iter().filter(|u| u.starts_with(prefix)).collect();
        match found.as_slice() {
            [one] => Ok(one[prefix.len()..].to_owned()),
            _ => Err(format!("{} URI SANs with {prefix}", found.len())),
        }
    };
    let (r, a) = (
        only("urn:jitbroker:resource:")?,
        only("urn:jitbroker:action:")?,
    );
    if r != resource {
        return Err(format!("resource: issued for {r}, not {resource}"));
    }
    if a != action {
        return Err(format!("action: issued for {a}, not {action}"));
    }
    Ok(())
}

async fn authorities(c: &mut Clients, resource: &str) -> Result<String, tonic::Status> {
    c.verifier
        .get_x509_authorities(pb::GetX509AuthoritiesRequest {
            resource: resource.into(),
        })
        .await
        .map(|r| r.into_inner().pem)
}

async fn status(
    c: &mut Clients,
    resource: &str,
    serial: &str,
) -> Result<pb::X509StatusResponse, tonic::Status> {
    c.verifier
        .x509_status(pb::X509StatusRequest {
            resource: resource.into(),
            serial: serial.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn leaf_and_serial(secret: &str) -> (Vec<CertificateDer<'static>>, String) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(secret.as_bytes())
        .map(Result::unwrap)
        .collect();
    let (_, x) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
    // As `openssl x509 -text` prints it: upper-case octets with colons.
    let serial = x
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    (chain, serial)
}

#[tokio::test]
async fn a_certificate_is_bound_to_its_resource_and_action_and_its_revocation_is_visible_by_serial()
{
    let dir = dev_dir();
    let cfg = two_resources(dir.path());
    let clock = ManualClock::new();
    let r = spawn_on(&cfg, &clock).await;
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let task = agent
        .start(vec![grant("staging", "read"), grant("prod", "read")], 600)
        .await;
    let staging_read = agent.issue(&task.task_id, "staging", 60).await;
    let (presented, serial) = leaf_and_serial(&staging_read.secret);

    // One issuing CA per resource under one root; each resource's CA is only its own.
    let root = authorities(&mut agent, "").await.unwrap();
    let staging_ca = authorities(&mut agent, "staging").await.unwrap();
    let prod_ca = authorities(&mut agent, "prod").await.unwrap();
    assert!(root != staging_ca && staging_ca != prod_ca && root != prod_ca);
    assert_eq!(
        CertificateDer::from_pem_slice(staging_ca.as_bytes()).unwrap(),
        presented[1],
        "the credential carries its resource's issuing CA"
    );
    for (name, code) in [
        ("demo-token", Code::InvalidArgument),
        ("nope", Code::InvalidArgument),
        ("bad name!", Code::InvalidArgument),
    ] {
        let e = authorities(&mut agent, name).await.unwrap_err();
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(e.message().starts_with("resource"), "{name}: {e:?}");
    }

    // The relying parties: only staging/read accepts it.
    let now = UnixTime::now();
    relying_party(&staging_ca, "staging", "read", &presented, now)
        .expect("staging/read accepts a staging/read certificate");
    relying_party(&root, "staging", "read", &presented, now)
        .expect("trusting the root, staging/read accepts it too");
    let e = relying_party(&prod_ca, "prod", "read", &presented, now).unwrap_err();
    assert!(e.starts_with("chain"), "prod's CA does not sign it: {e}");
    let e = relying_party(&root, "prod", "read", &presented, now).unwrap_err();
    assert!(
        e.starts_with("resource"),
        "trusting the root, prod checks the SAN: {e}"
    );
    let e = relying_party(&staging_ca, "staging", "write", &presented, now).unwrap_err();
    assert!(
        e.starts_with("action"),
        "staging/write refuses a read certificate: {e}"
    );
    // Without the issuing CA in the chain, a relying party of the root cannot build a path.
    let e = relying_party(&root, "staging", "read", &presented[..1], now).unwrap_err();
    assert!(e.starts_with("chain"), "{e}");

    // Status by serial, for the resource's verifiers only.
    let s = status(&mut tool, "staging", &serial).await.unwrap();
    assert_eq!(s.status(), pb::X509CertStatus::X509CertGood);
    assert_eq!(s.credential_id, staging_read.credential_id);
    assert_eq!(
        (s.resource.as_str(), s.action.as_str()),
        ("staging", "read")
    );
    assert_eq!(s.spiffe_id, AGENT);
    assert_eq!(s.task_id, task.task_id);
    assert_eq!(s.expires_at, staging_read.expires_at);
    assert!(s.ended_at.is_none() && s.reason.is_empty());
    // The attribute and the other spellings of the same serial name the same certificate.
    let plain = staging_read.attributes["serial"].clone();
    assert_eq!(plain, serial.replace(':', "").to_lowercase());
    for form in [plain.clone(), format!("0x{plain}")] {
        let s = status(&mut tool, "staging", &form).await.unwrap();
        assert_eq!(s.status(), pb::X509CertStatus::X509CertGood, "{form}");
    }
    // Another resource's verifier question about it: unknown, with nothing about it.
    let s = status(&mut tool, "prod", &serial).await.unwrap();
    assert_eq!(s.status(), pb::X509CertStatus::X509CertUnknown);
    assert!(s.credential_id.is_empty() && s.spiffe_id.is_empty());
    // Serials the broker never issued: unknown.
    for other in ["01".to_owned() + &"ab".repeat(16), "7f3a".to_owned()] {
        let s = status(&mut tool, "staging", &other).await.unwrap();
        assert_eq!(s.status(), pb::X509CertStatus::X509CertUnknown, "{other}");
    }
    // The agent is no verifier: refused, whatever the serial.
    let e = status(&mut agent, "staging", &serial).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = status(&mut tool, "staging", "not-hex").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("serial"), "{e:?}");

    // A second credential, left to expire: EXPIRED once its time has passed, reaper or not.
    let short = agent.issue(&task.task_id, "prod", 30).await;
    let (_, short_serial) = leaf_and_serial(&short.secret);
    assert_eq!(
        status(&mut tool, "prod", &short_serial)
            .await
            .unwrap()
            .status(),
        pb::X509CertStatus::X509CertGood
    );
    clock.advance(Duration::from_secs(29));
    assert_eq!(
        status(&mut tool, "prod", &short_serial)
            .await
            .unwrap()
            .status(),
        pb::X509CertStatus::X509CertGood,
        "one second before its expiry it is still good"
    );
    clock.advance(Duration::from_secs(1));
    let s = status(&mut tool, "prod", &short_serial).await.unwrap();
    assert_eq!(s.status(), pb::X509CertStatus::X509CertExpired);
    assert_eq!(
        (s.ended_at, s.reason.as_str()),
        (short.expires_at, "expired")
    );

    // Completing the task revokes the staging certificate, and the verifier sees it at once.
    agent.complete(&task.task_id).await;
    let s = status(&mut tool, "staging", &serial).await.unwrap();
    assert_eq!(s.status(), pb::X509CertStatus::X509CertRevoked);
    assert_eq!(s.reason, "completed");
    assert_eq!(s.credential_id, staging_read.credential_id);
    let ended = s.ended_at.unwrap();
    assert!(ended.seconds <= staging_read.expires_at.unwrap().seconds);

    // The CAs survive a restart: the same authorities, so issued certificates keep verifying.
    drop((agent, tool));
    r.stop().await;
    let r = spawn_default(&cfg).await;
    let mut agent = clients(&r, AGENT).await;
    assert_eq!(authorities(&mut agent, "").await.unwrap(), root);
    assert_eq!(
        authorities(&mut agent, "staging").await.unwrap(),
        staging_ca
    );
    assert_eq!(authorities(&mut agent, "prod").await.unwrap(), prod_ca);
    drop(agent);
    r.stop().await;
}
