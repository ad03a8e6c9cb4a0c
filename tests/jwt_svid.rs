//! JWT-SVID authentication (DESIGN §3): a bearer JWT-SVID for the broker's audience is an
//! identity on its own (the client certificate is optional when JWT-SVIDs are enabled), and each
//! hostile token is refused with UNAUTHENTICATED and a log line naming the reason. Tokens are
//! signed with the dev JWT key (the one the broker trusts) unless the case is about the key.

mod common;

use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use jitbroker::identity::DevJwtKey;
use serde_json::json;
use tonic::transport::Channel;

const AUD: &str = "jitbroker";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// Waits (bounded) for a new `authentication_failed` log line after `before` bytes.
async fn refusal_line(logs: &LogCapture, before: usize) -> Option<String> {
    for _ in 0..100 {
        let text = String::from_utf8_lossy(&logs.text()[before..]).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains("authentication_failed")) {
            return Some(l.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn jwt_svids_authenticate_and_hostile_tokens_are_refused_with_a_logged_reason() {
    let logs = LogCapture::install();
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| {
        enable_jwt_svids(t).replace(
            "trust_domain = \"jitbroker.dev\"\n",
            "trust_domain = \"jitbroker.dev\"\nauthorized_trust_domains = [\"jitbroker.dev\", \"partner.example\"]\n",
        )
    });
    let r = spawn_default(&cfg).await;
    let key = jitbroker::identity::dev::ensure_dev_jwt_key(dir.path(), "jitbroker.dev").unwrap();
    let (chain, pkey, bundle) = mint(dir.path(), AGENT);
    // A channel without a client certificate: allowed at TLS because JWT-SVIDs are enabled.
    let bare = channel(r.addr, tls_config(&bundle, None)).await.unwrap();
    let with_cert = channel(r.addr, tls_config(&bundle, Some((&chain, &pkey))))
        .await
        .unwrap();

    // A good JWT-SVID alone is an identity: the task belongs to its SPIFFE ID.
    let good = key.mint(AGENT, AUD, Duration::from_secs(300));
    let task = authed(bare.clone(), format!("Bearer {good}"))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("a valid JWT-SVID authenticates")
        .into_inner();
    assert_eq!(task.spiffe_id, AGENT);
    // The same token on an mTLS channel of the same identity is fine too.
    authed(with_cert.clone(), format!("Bearer {good}"))
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .expect("JWT-SVID and X.509-SVID naming the same ID");

    let stranger = random_jwt_key("jitbroker.dev");
    let partner = random_jwt_key("partner.example");
    let elsewhere = random_jwt_key("elsewhere.example");
    let claims = |sub: &str, aud: &str, exp: i64| json!({"sub": sub, "aud": [aud], "exp": exp});
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT", "kid": key.kid()})
            .to_string()
            .as_bytes()),
        b64(claims(AGENT, AUD, now() + 300).to_string().as_bytes())
    );
    // The classic confusion attack: HS256 keyed with the public key the verifier holds.
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(key.kid().to_owned());
        jsonwebtoken::encode(
            &h,
            &claims(AGENT, AUD, now() + 300),
            &jsonwebtoken::EncodingKey::from_secret(key.jwk().to_string().as_bytes()),
        )
        .unwrap()
    };
    let es = |k: &DevJwtKey, c: serde_json::Value| {
        k.sign(&json!({"alg": "ES256", "typ": "JWT", "kid": k.kid()}), &c)
    };

    // (name, channel, authorization value, what the logged reason must say)
    let cases: Vec<(&str, &Channel, String, &str)> = vec![
        ("no identity at all", &bare, String::new(), "no JWT-SVID"),
        (
            "not a bearer token",
            &bare,
            format!("Basic {good}"),
            "Bearer",
        ),
        (
            "garbage token",
            &bare,
            "Bearer not.a.jwt".into(),
            "malformed",
        ),
        ("alg none", &bare, format!("Bearer {alg_none}"), "alg"),
        (
            "HS256 keyed with the public key",
            &bare,
            format!("Bearer {hs256}"),
            "alg",
        ),
        (
            "wrong audience",
            &bare,
            format!(
                "Bearer {}",
                key.mint(AGENT, "someone-else", Duration::from_secs(300))
            ),
            "audience",
        ),
        (
            "expired",
            &bare,
            format!("Bearer {}", es(&key, claims(AGENT, AUD, now() - 60))),
            "expired",
        ),
        (
            "minted for several audiences",
            &bare,
            format!(
                "Bearer {}",
                es(
                    &key,
                    json!({"sub": AGENT, "aud": [AUD, "another-service"], "exp": now() + 300})
                )
            ),
            "2 audiences",
        ),
        (
            "living longer than a bearer JWT-SVID may",
            &bare,
            format!(
                "Bearer {}",
                es(&key, claims(AGENT, AUD, now() + 30 * 86_400))
            ),
            "beyond",
        ),
        (
            "from an unauthorised trust domain",
            &bare,
            format!(
                "Bearer {}",
                elsewhere.mint(
                    "spiffe://elsewhere.example/agent/a",
                    AUD,
                    Duration::from_secs(300)
                )
            ),
            "not authorised",
        ),
        (
            "from an authorised trust domain without a JWT bundle",
            &bare,
            format!(
                "Bearer {}",
                partner.mint(
                    "spiffe://partner.example/agent/a",
                    AUD,
                    Duration::from_secs(300)
                )
            ),
            "partner.example",
        ),
        (
            "unknown kid",
            &bare,
            format!(
                "Bearer {}",
                stranger.mint(AGENT, AUD, Duration::from_secs(300))
            ),
            "kid",
        ),
        (
            "signature by another key under a known kid",
            &bare,
            format!(
                "Bearer {}",
                stranger.sign(
                    &json!({"alg": "ES256", "typ": "JWT", "kid": key.kid()}),
                    &claims(AGENT, AUD, now() + 300)
                )
            ),
            "signature",
        ),
        (
            "ID differs from the mTLS peer's",
            &with_cert,
            format!(
                "Bearer {}",
                key.mint(AGENT_B, AUD, Duration::from_secs(300))
            ),
            "differs from the mTLS peer",
        ),
    ];
    for (name, ch, value, reason) in cases {
        let before = logs.text().len();
        let call = pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        };
        let res = if value.is_empty() {
            BrokerClient::new(ch.clone()).get_task(call).await
        } else {
            authed(ch.clone(), value).get_task(call).await
        };
        let status = match res {
            Ok(_) => panic!("{name}: accepted"),
            Err(s) => s,
        };
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{name}: {status:?}"
        );
        let line = refusal_line(&logs, before)
            .await
            .unwrap_or_else(|| panic!("{name}: refused but nothing logged"));
        assert!(
            line.contains(reason),
            "{name}: the logged reason should mention {reason:?}: {line}"
        );
        eprintln!(
            "{name:<52} -> {:?}; logged: {}",
            status.code(),
            line.split("\"reason\":").nth(1).unwrap_or("")
        );
    }
    // Nothing above touched the task.
    let still = authed(bare, format!("Bearer {good}"))
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.state, pb::TaskState::Active as i32);
    r.stop().await;
}

/// With JWT-SVIDs disabled (the default), mTLS stays mandatory and a bearer token is refused
/// rather than ignored.
#[tokio::test]
async fn without_jwt_svids_mtls_stays_mandatory() {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| t);
    assert!(cfg.identity.jwt_audience.is_none());
    let r = spawn_default(&cfg).await;
    let key = jitbroker::identity::dev::ensure_dev_jwt_key(dir.path(), "jitbroker.dev").unwrap();
    let good = key.mint(AGENT, AUD, Duration::from_secs(300));
    let (chain, pkey, bundle) = mint(dir.path(), AGENT);
    // No client certificate: the handshake (or the first call) fails.
    let refused = match channel(r.addr, tls_config(&bundle, None)).await {
        Err(_) => true,
        Ok(ch) => authed(ch, format!("Bearer {good}"))
            .start_task(start_req(vec![grant("demo-token", "read")], 60))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a JWT-SVID without mTLS must not pass when JWT-SVIDs are disabled"
    );
    // With mTLS, an extra bearer token is refused, not silently ignored.
    let ch = channel(r.addr, tls_config(&bundle, Some((&chain, &pkey))))
        .await
        .unwrap();
    let s = authed(ch.clone(), format!("Bearer {good}"))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().contains("not enabled"), "{s:?}");
    BrokerClient::new(ch)
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("plain mTLS works");
    r.stop().await;
}
