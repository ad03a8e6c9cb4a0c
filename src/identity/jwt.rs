//! JWT-SVID authentication (DESIGN §3): `authorization: Bearer <JWT-SVID>` on the TLS channel,
//! for the broker's configured audience, verified with the JWT bundles of the trust domains the
//! broker accepts.
//!
//! Verification itself (signature, `alg` allow list, `kid` lookup, `exp`/`nbf`, audience, the
//! JOSE header rules) is the `spiffe` crate's `JwtSvid::parse_and_validate`; this module chooses
//! the bundles, applies the trust-domain allow list and names the reason when it refuses.
//!
//! Bundles come from the SPIFFE Workload API (`spire`: a `JwtSource`, rotating with the agent),
//! from a file (`files`: rewritten by spiffe-helper or an operator, reloaded when it changes), or
//! from the dev JWT key (`dev`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spiffe::{JwtBundle, JwtBundleSet, JwtSvid, TrustDomain};
use tokio::sync::watch;

use super::{CONNECT_TIMEOUT, FileStamp, IdentityError, file_stamp};

/// Longer bearer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// How often a JWT bundle file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);

/// Where JWT bundles come from.
pub enum JwtBundleSource {
    /// The SPIFFE Workload API at this endpoint (or `SPIFFE_ENDPOINT_SOCKET`).
    Spire { endpoint: Option<String> },
    /// A JSON file: `{ "<trust domain>": <JWKS or SPIFFE bundle>, … }`, reloaded on change.
    File(PathBuf),
    /// A fixed set (the dev JWT key's bundle).
    Fixed(JwtBundleSet),
}

enum Bundles {
    Spire(spiffe::JwtSource),
    Held(watch::Receiver<Arc<JwtBundleSet>>),
}

/// Verifies JWT-SVIDs for one audience.
pub struct JwtAuth {
    audience: String,
    authorized: Vec<String>,
    bundles: Bundles,
    _feed: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for JwtAuth {
    fn drop(&mut self) {
        if let Some(f) = &self._feed {
            f.abort();
        }
    }
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtAuth(audience {:?})", self.audience)
    }
}

impl JwtAuth {
    /// Starts the bundle source and waits (bounded) for the first bundles.
    pub async fn start(
        audience: &str,
        authorized: &[String],
        source: JwtBundleSource,
    ) -> Result<Self, IdentityError> {
        if audience.trim().is_empty() {
            return Err(IdentityError::Source(
                "identity.jwt_audience is empty".into(),
            ));
        }
        let (bundles, feed) = match source {
            JwtBundleSource::Spire { endpoint } => {
                let endpoint = super::workload_endpoint(endpoint)?;
                let build = spiffe::JwtSource::builder().endpoint(&endpoint).build();
                let src = match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(IdentityError::Source(format!(
                            "the SPIFFE Workload API at {endpoint} gave no JWT bundles: {e}"
                        )));
                    }
                    Err(_) => {
                        return Err(IdentityError::Source(format!(
                            "timed out after {}s fetching JWT bundles from the SPIFFE Workload API \
                             at {endpoint}; is the SPIRE agent running and the socket mounted?",
                            CONNECT_TIMEOUT.as_secs()
                        )));
                    }
                };
                (Bundles::Spire(src), None)
            }
            JwtBundleSource::Fixed(set) => {
                let (_tx, rx) = watch::channel(Arc::new(set));
                (Bundles::Held(rx), None)
            }
            JwtBundleSource::File(path) => {
                let (first, mut seen) = read_bundle_file(&path)?;
                let (tx, rx) = watch::channel(Arc::new(first));
                let feed = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(FILE_POLL).await;
                        let stamp = file_stamp(&path);
                        if stamp == seen {
                            continue;
                        }
                        match read_bundle_file(&path) {
                            Ok((set, s)) => {
                                seen = s;
                                tracing::info!(file = %path.display(), "JWT bundle file changed; new requests use it");
                                let _ = tx.send(Arc::new(set));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "JWT bundle file unusable; keeping the previous bundles")
                            }
                        }
                    }
                });
                (Bundles::Held(rx), Some(feed))
            }
        };
        Ok(Self {
            audience: audience.to_owned(),
            authorized: authorized.to_vec(),
            bundles,
            _feed: feed,
        })
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The JWT bundle source is healthy (always, for file and fixed bundles).
    pub fn is_ready(&self) -> bool {
        match &self.bundles {
            Bundles::Spire(s) => s.is_healthy(),
            Bundles::Held(_) => true,
        }
    }

    /// Verifies a bearer JWT-SVID and returns its SPIFFE ID, or the reason it is refused.
    pub fn verify(&self, token: &str) -> Result<String, IdentityError> {
        self.verify_for(token, &[self.audience.as_str()])
    }

    /// Verifies a JWT-SVID that must name exactly one audience, one of `audiences` (the OAuth
    /// endpoints take assertions for their own URLs).
    pub fn verify_for(&self, token: &str, audiences: &[&str]) -> Result<String, IdentityError> {
        let refuse = IdentityError::Jwt;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(refuse(format!(
                "token is {} bytes, more than {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        // The trust domain is read from the unverified token only to refuse early; the
        // signature check below uses that trust domain's bundle, so a lie here cannot pass.
        let untrusted = JwtSvid::parse_insecure(token).map_err(|e| refuse(describe(&e, token)))?;
        let td = untrusted.spiffe_id().trust_domain().to_string();
        if !self.authorized.contains(&td) {
            return Err(refuse(format!(
                "trust domain {td:?} is not authorised (identity.authorized_trust_domains)"
            )));
        }
        let verified = match &self.bundles {
            Bundles::Spire(src) => JwtSvid::parse_and_validate(token, src, audiences),
            Bundles::Held(rx) => {
                let set = rx.borrow().clone();
                JwtSvid::parse_and_validate(token, &*set, audiences)
            }
        }
        .map_err(|e| refuse(describe(&e, token)))?;
        // A token minted for several audiences can be replayed by any of them: only tokens
        // for this broker alone are accepted.
        if verified.audience().len() != 1 {
            return Err(refuse(format!(
                "token names {} audiences; a JWT-SVID for this broker must name only one of {:?}",
                verified.audience().len(),
                audiences
            )));
        }
        let left = verified.expiry() - time::OffsetDateTime::now_utc();
        if left > time::Duration::seconds(MAX_JWT_LIFETIME_SECONDS) {
            return Err(refuse(format!(
                "token expires in {}s, beyond the {MAX_JWT_LIFETIME_SECONDS}s a bearer JWT-SVID \
                 may live (mint shorter ones; SPIRE's default is 5 minutes)",
                left.whole_seconds()
            )));
        }
        Ok(verified.spiffe_id().to_string())
    }
}

/// Longest remaining life accepted on a JWT-SVID: a stolen bearer token is useful for at most
/// this long.
pub const MAX_JWT_LIFETIME_SECONDS: i64 = 24 * 3600;

/// The `alg` of a token's (unverified) header, to name it in a refusal.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let alg = v.get("alg")?.as_str()?;
    Some(alg.chars().take(16).collect())
}

/// The spiffe crate's error, with the detail of a verification failure.
fn describe(e: &spiffe::JwtSvidError, token: &str) -> String {
    match e {
        spiffe::JwtSvidError::InvalidToken(inner) => {
            let kind = match inner.kind() {
                spiffe::JwtVerificationErrorKind::Expired => "token has expired",
                spiffe::JwtVerificationErrorKind::NotYetValid => "token is not yet valid",
                spiffe::JwtVerificationErrorKind::AudienceMismatch => {
                    "audience does not match the broker's audience"
                }
                spiffe::JwtVerificationErrorKind::InvalidSignature => "signature does not verify",
                _ => "invalid token",
            };
            format!("{kind} ({inner})")
        }
        spiffe::JwtSvidError::UnsupportedAlgorithm => format!(
            "algorithm {:?} is not allowed for JWT-SVIDs (RS*, ES* and PS* only)",
            header_alg(token).unwrap_or_default()
        ),
        other => {
            let s = other.to_string();
            // The crate names a missing authority by its key id; say so plainly.
            if s.contains("key_id") {
                format!("unknown kid: {s}")
            } else {
                s
            }
        }
    }
}

/// Reads a JWT bundle file: a JSON object from trust domain name to a JWKS (a SPIFFE bundle's
/// `x509-svid` keys are skipped, so `spire-server bundle show -format spiffe` output works per
/// trust domain).
pub fn read_bundle_file(path: &Path) -> Result<(JwtBundleSet, FileStamp), IdentityError> {
    let bad = |why: String| IdentityError::Files(format!("{}: {why}", path.display()));
    let stamp = file_stamp(path);
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    parse_bundle_set(&text).map(|s| (s, stamp)).map_err(bad)
}

/// Parses `{ "<trust domain>": <JWKS>, … }`.
pub fn parse_bundle_set(json: &[u8]) -> Result<JwtBundleSet, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("expected a JSON object from trust domain to JWKS")?;
    if obj.is_empty() {
        return Err("no trust domain in the JWT bundle file".into());
    }
    let mut set = JwtBundleSet::new();
    for (td, jwks) in obj {
        let trust_domain = TrustDomain::new(td).map_err(|e| format!("trust domain {td:?}: {e}"))?;
        let keys = jwks
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| format!("{td}: expected a JWKS with a \"keys\" array"))?;
        let mut bundle = JwtBundle::new(trust_domain);
        for key in keys {
            if key.get("use").and_then(|u| u.as_str()) == Some("x509-svid") {
                continue;
            }
            let raw = serde_json::to_vec(key).map_err(|e| format!("{td}: {e}"))?;
            bundle
                .add_jwk_authority_json(&raw)
                .map_err(|e| format!("{td}: key: {e}"))?;
        }
        set.add_bundle(bundle);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_file_format_errors_name_the_problem() {
        assert!(parse_bundle_set(b"[]").unwrap_err().contains("JSON object"));
        assert!(
            parse_bundle_set(b"{}")
                .unwrap_err()
                .contains("no trust domain")
        );
        assert!(
            parse_bundle_set(br#"{"a.org": {}}"#)
                .unwrap_err()
                .contains("keys")
        );
        assert!(
            parse_bundle_set(br#"{"a.org": {"keys": [{"kty": "EC"}]}}"#)
                .unwrap_err()
                .contains("a.org")
        );
        let ok = parse_bundle_set(
            br#"{"a.org": {"keys": [{"kty":"EC","kid":"k1","use":"jwt-svid"},
                                    {"kty":"EC","use":"x509-svid","x5c":["AA"]}]}}"#,
        )
        .unwrap();
        let td = TrustDomain::new("a.org").unwrap();
        assert!(ok.get(&td).unwrap().find_jwt_authority("k1").is_some());
    }
}
