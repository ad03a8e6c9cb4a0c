//! Hostile client certificates are refused at the handshake (or with UNAUTHENTICATED), each with a
//! log line that names the reason. The certificates are made with rcgen, most of them signed by
//! the broker's own dev CA so that only the property under test is wrong.

mod common;

use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

struct Case {
    name: &'static str,
    uris: Vec<&'static str>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    ca: bool,
    key_usages: Vec<KeyUsagePurpose>,
    foreign_ca: bool,
}

fn base(name: &'static str) -> Case {
    let now = time::OffsetDateTime::now_utc();
    Case {
        name,
        uris: vec![AGENT],
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(3600),
        ca: false,
        key_usages: vec![KeyUsagePurpose::DigitalSignature],
        foreign_ca: false,
    }
}

fn mint_case(dir: &std::path::Path, other: &std::path::Path, c: &Case) -> (String, String) {
    let ca_dir = if c.foreign_ca { other } else { dir };
    let ca_pem = std::fs::read_to_string(ca_dir.join("dev/ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("dev/ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, c.name);
    p.subject_alt_names = c
        .uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.is_ca = if c.ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.key_usages = c.key_usages.clone();
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.not_before = c.not_before;
    p.not_after = c.not_after;
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The table runs twice: with mandatory mTLS, and with JWT-SVIDs enabled, where the client
/// certificate is optional but one that is presented is held to exactly the same rules. (One
/// test, so that the two runs never read each other's log lines.)
#[tokio::test]
async fn hostile_client_certificates_are_refused_with_a_logged_reason() {
    let logs = LogCapture::install();
    hostile_table(&logs, false).await;
    hostile_table(&logs, true).await;
}

async fn hostile_table(logs: &LogCapture, jwt: bool) {
    let dir = dev_dir();
    let other = tempfile::tempdir().unwrap();
    jitbroker::identity::dev::ensure_dev_ca(other.path(), "jitbroker.dev").unwrap();
    let cfg = config(dir.path(), |t| if jwt { enable_jwt_svids(t) } else { t });
    assert_eq!(cfg.identity.jwt_audience.is_some(), jwt);
    let r = spawn_default(&cfg).await;
    let now = time::OffsetDateTime::now_utc();
    let cases = vec![
        Case {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
            ..base("expired leaf")
        },
        Case {
            not_before: now + Duration::from_secs(3600),
            not_after: now + Duration::from_secs(7200),
            ..base("not-yet-valid leaf")
        },
        Case {
            foreign_ca: true,
            ..base("leaf signed by an unknown CA")
        },
        Case {
            ca: true,
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ],
            ..base("CA certificate used as leaf")
        },
        Case {
            uris: vec![],
            ..base("no URI SAN")
        },
        Case {
            uris: vec![AGENT, AGENT_B],
            ..base("two URI SANs")
        },
        Case {
            uris: vec!["https://jitbroker.dev/agent/a"],
            ..base("non-spiffe URI")
        },
        Case {
            uris: vec!["spiffe://elsewhere.example/agent/a"],
            ..base("unauthorised trust domain")
        },
        Case {
            key_usages: vec![KeyUsagePurpose::KeyEncipherment],
            ..base("leaf without digitalSignature")
        },
    ];
    let (_, _, bundle) = mint(dir.path(), AGENT);
    for c in &cases {
        let before = logs.text().len();
        let (chain, key) = mint_case(dir.path(), other.path(), c);
        let outcome = match channel(r.addr, tls_config(&bundle, Some((&chain, &key)))).await {
            Err(e) => format!("connect refused: {e}"),
            Ok(ch) => match BrokerClient::new(ch)
                .get_task(pb::GetTaskRequest {
                    task_id: "tsk_x".into(),
                })
                .await
            {
                Ok(_) => panic!("{}: accepted", c.name),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unauthenticated
                            | tonic::Code::Unknown
                    ) =>
                {
                    format!("{:?}", s.code())
                }
                Err(s) => panic!("{}: unexpected status {s:?}", c.name),
            },
        };
        // The server logs why it refused (the handshake task runs concurrently: wait, bounded).
        let mut logged = String::new();
        for _ in 0..100 {
            logged = String::from_utf8_lossy(&logs.text()[before..]).into_owned();
            if logged.contains("tls_handshake_failed") || logged.contains("authentication_failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let line = logged
            .lines()
            .find(|l| l.contains("tls_handshake_failed") || l.contains("authentication_failed"))
            .unwrap_or_else(|| panic!("{}: refused ({outcome}) but nothing logged", c.name));
        assert!(line.contains("\"reason\""), "{}: {line}", c.name);
        eprintln!(
            "[jwt {jwt}] {:<32} -> {outcome}; logged: {}",
            c.name,
            line.split("\"reason\":").nth(1).unwrap_or("")
        );
    }
    // A well-formed SVID still works after all that.
    let mut ok = clients(&r, AGENT).await;
    ok.start(vec![grant("demo-token", "read")], 60).await;
    drop(ok);
    r.stop().await;
}
