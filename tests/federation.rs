//! Federated trust domains: a caller from another trust domain gets in only when that trust domain
//! is authorised in config *and* the broker holds its bundle (`identity.federated_bundle_files`
//! for the dev and files sources; SPIRE delivers federated bundles through the Workload API).

mod common;

use std::time::Duration;

use common::*;

const PARTNER: &str = "spiffe://partner.example/agent/p";

/// A dev dir whose config authorises `authorized` and loads `bundle` as partner.example's.
fn setup(
    authorized: &[&str],
    bundle: Option<&std::path::Path>,
    jwt: bool,
) -> (tempfile::TempDir, jitbroker::config::Config) {
    let dir = dev_dir();
    append_policy(
        dir.path(),
        "\n@id(\"partner-agents\")\npermit(principal, action == Action::\"read\", resource == Resource::\"demo-token\")\nwhen { principal.trust_domain == \"partner.example\" };\n",
    );
    let tds = authorized
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let fed = bundle
        .map(|b| {
            format!(
                "federated_bundle_files = {{ \"partner.example\" = {:?} }}\n",
                b
            )
        })
        .unwrap_or_default();
    let cfg = config(dir.path(), |t| {
        let t = t.replace(
            "trust_domain = \"jitbroker.dev\"\n",
            &format!("trust_domain = \"jitbroker.dev\"\nauthorized_trust_domains = [{tds}]\n{fed}"),
        );
        if jwt { enable_jwt_svids(t) } else { t }
    });
    (dir, cfg)
}

/// Whether a partner SVID can start a task on a broker with this configuration.
async fn partner_gets_in(
    authorized: &[&str],
    with_bundle: bool,
    jwt: bool,
    partner_dir: &std::path::Path,
) -> Result<String, String> {
    let partner_ca = partner_dir.join("dev/ca.pem");
    let (dir, cfg) = setup(authorized, with_bundle.then_some(partner_ca.as_path()), jwt);
    let r = spawn_default(&cfg).await;
    // The partner's SVID, from the partner's CA; the broker is trusted through its own bundle.
    let partner = jitbroker::identity::dev::ensure_dev_ca(partner_dir, "partner.example").unwrap();
    let svid = partner
        .mint_svid(PARTNER, &[], &[], Duration::from_secs(600))
        .unwrap();
    let (_, _, broker_bundle) = mint(dir.path(), AGENT);
    let out = match channel(
        r.addr,
        tls_config(&broker_bundle, Some((&svid.cert_chain_pem, &svid.key_pem))),
    )
    .await
    {
        Err(e) => Err(format!("connect: {e}")),
        Ok(ch) => BrokerClient::new(ch)
            .start_task(start_req(vec![grant("demo-token", "read")], 60))
            .await
            .map(|t| t.into_inner().spiffe_id)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
    };
    r.stop().await;
    out
}

#[tokio::test]
async fn federated_callers_need_an_authorised_trust_domain_and_its_bundle() {
    let partner_dir = tempfile::tempdir().unwrap();
    jitbroker::identity::dev::ensure_dev_ca(partner_dir.path(), "partner.example").unwrap();
    let both = ["jitbroker.dev", "partner.example"];
    for jwt in [false, true] {
        // Authorised, with its bundle: in, as itself.
        assert_eq!(
            partner_gets_in(&both, true, jwt, partner_dir.path()).await,
            Ok(PARTNER.to_owned()),
            "jwt={jwt}"
        );
        // Its bundle is loaded but the trust domain is not authorised: refused.
        let e = partner_gets_in(&["jitbroker.dev"], true, jwt, partner_dir.path())
            .await
            .unwrap_err();
        eprintln!("jwt={jwt} not authorised -> {e}");
        // Authorised but no bundle to verify it with: refused.
        let e = partner_gets_in(&both, false, jwt, partner_dir.path())
            .await
            .unwrap_err();
        eprintln!("jwt={jwt} no bundle -> {e}");
    }
}

#[test]
fn federated_bundle_files_are_checked_at_load() {
    let dir = dev_dir();
    let base = std::fs::read_to_string(dir.path().join("jitbroker.toml")).unwrap();
    let with = |extra: &str| {
        base.replace(
            "trust_domain = \"jitbroker.dev\"\n",
            &format!("trust_domain = \"jitbroker.dev\"\n{extra}\n"),
        )
    };
    let own = jitbroker::config::Config::from_toml(
        &with("federated_bundle_files = { \"jitbroker.dev\" = \"/x.pem\" }"),
        "test",
        |_| None,
    )
    .unwrap_err();
    assert!(own.to_string().contains("own trust domain"), "{own}");
    let spire = jitbroker::config::Config::from_toml(
        &with("federated_bundle_files = { \"partner.example\" = \"/x.pem\" }")
            .replace("source = \"dev\"", "source = \"spire\""),
        "test",
        |_| None,
    )
    .unwrap_err();
    assert!(spire.to_string().contains("SPIRE"), "{spire}");
}
