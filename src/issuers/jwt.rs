//! ES256 JWT credentials (DESIGN §6) and the keys that sign them.
//!
//! Signing keys live sealed in the store's `meta` tree and rotate: a new key signs once the current
//! one is older than the rotation period, and retired keys stay in the JWKS until every JWT they
//! signed has expired. Offline verifiers cannot see a revocation before `exp`, so `Introspect`
//! answers for JWTs too.

use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use super::{IssueRequest, Issued};
use crate::error::{Error, Result};
use crate::model::{Secret, SpiffeId, UnixMillis};
use crate::store::Storage;

const META_KEY: &str = "jwt_signing_keys";

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    created_at: UnixMillis,
    /// Hex of the private scalar; only ever stored sealed, and wiped from memory on drop.
    d: String,
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.d);
    }
}

struct Key {
    kid: String,
    created_at: UnixMillis,
    signing: SigningKey,
}

/// A new signing key signs only this long after it was made: every replica reloads the key set
/// on each reaper pass (at least once a second) and publishes it in its JWKS, so a JWT signed
/// by any replica verifies against the JWKS of any replica.
pub const SIGN_AFTER_MS: i64 = 5_000;

/// The JWT issuer: signing keys plus the `iss` to stamp.
pub struct JwtIssuer {
    issuer: String,
    rotate_after_ms: i64,
    /// Retired keys stay published this long (the longest credential TTL).
    publish_for_ms: i64,
    keys: RwLock<Arc<Vec<Key>>>,
}

impl JwtIssuer {
    /// Loads the signing keys from the store, creating the first one if there is none.
    pub async fn load(
        store: &Storage,
        issuer: String,
        rotate_after_ms: i64,
        publish_for_ms: i64,
        now: UnixMillis,
    ) -> Result<Self> {
        let this = Self {
            issuer,
            rotate_after_ms,
            publish_for_ms,
            keys: RwLock::new(Arc::new(Vec::new())),
        };
        this.rotate_if_due(store, now).await?;
        Ok(this)
    }

    fn parse_keys(text: &Secret) -> Result<Vec<Key>> {
        let stored: Vec<StoredKey> = serde_json::from_str(text.expose())
            .map_err(|e| Error::Storage(format!("corrupt JWT key set: {e}")))?;
        stored
            .into_iter()
            .map(|k| {
                let d = Zeroizing::new(
                    hex::decode(&k.d).map_err(|_| Error::Storage("corrupt JWT key".into()))?,
                );
                let signing = SigningKey::from_slice(&d)
                    .map_err(|_| Error::Storage("corrupt JWT key".into()))?;
                Ok(Key {
                    kid: k.kid.clone(),
                    created_at: k.created_at,
                    signing,
                })
            })
            .collect()
    }

    fn current(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the key set from the store (another replica may have rotated it), then adds a new
    /// signing key when the newest is older than the rotation period and drops keys that no
    /// unexpired JWT can carry any more. The new set replaces the stored one only if nobody
    /// changed it meanwhile (compare and swap); a rotator that loses reads the winner's set.
    /// Returns whether this call changed the stored set (durably).
    pub async fn rotate_if_due(&self, store: &Storage, now: UnixMillis) -> Result<bool> {
        let stored_text = store.meta_get_sealed(META_KEY).await?;
        let keys = match &stored_text {
            Some(t) => Self::parse_keys(t)?,
            None => Vec::new(),
        };
        let newest = keys.iter().map(|k| k.created_at).max();
        let need_new = newest.is_none_or(|t| now - t >= self.rotate_after_ms);
        // A key retired at time R (when its successor was made) signs nothing after
        // R + SIGN_AFTER_MS, so it stays published until then plus the longest TTL.
        let mut sorted: Vec<&Key> = keys.iter().collect();
        sorted.sort_by_key(|k| k.created_at);
        let mut keep: Vec<Key> = Vec::new();
        for (i, k) in sorted.iter().enumerate() {
            let retired_at = sorted.get(i + 1).map(|n| n.created_at);
            let alive = retired_at
                .is_none_or(|r| now - r < self.publish_for_ms.saturating_add(SIGN_AFTER_MS));
            if alive {
                keep.push(Key {
                    kid: k.kid.clone(),
                    created_at: k.created_at,
                    signing: k.signing.clone(),
                });
            }
        }
        if need_new {
            let signing = SigningKey::random(&mut rand::rngs::OsRng);
            let kid = kid_of(signing.verifying_key());
            keep.push(Key {
                kid,
                created_at: now,
                signing,
            });
        }
        if !need_new && keep.len() == keys.len() {
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
            return Ok(false);
        }
        let stored: Vec<StoredKey> = keep
            .iter()
            .map(|k| {
                let scalar: Zeroizing<[u8; 32]> = Zeroizing::new(k.signing.to_bytes().into());
                StoredKey {
                    kid: k.kid.clone(),
                    created_at: k.created_at,
                    d: hex::encode(&scalar[..]),
                }
            })
            .collect();
        let text = Secret::new(serde_json::to_string(&stored).map_err(Error::internal)?);
        if store
            .meta_replace_sealed(META_KEY, stored_text.as_ref(), &text)
            .await?
        {
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keep);
            return Ok(true);
        }
        // Another replica rotated first: use its set.
        let winner = store
            .meta_get_sealed(META_KEY)
            .await?
            .ok_or_else(|| Error::Storage("the JWT key set vanished".into()))?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Self::parse_keys(&winner)?);
        Ok(false)
    }

    /// Signs a credential JWT with the newest key every replica can have published by now
    /// ([`SIGN_AFTER_MS`]); the oldest key while none is that old (the first key).
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued> {
        let keys = self.current();
        let key = keys
            .iter()
            .filter(|k| req.issued_at.saturating_sub(k.created_at) >= SIGN_AFTER_MS)
            .max_by_key(|k| k.created_at)
            .or_else(|| keys.iter().min_by_key(|k| k.created_at))
            .ok_or_else(|| Error::Internal("no JWT signing key".into()))?;
        let typ = if req.access_token { "at+jwt" } else { "JWT" };
        let header = json!({"alg": "ES256", "typ": typ, "kid": key.kid});
        let mut claims = json!({
            "iss": self.issuer,
            "sub": req.owner.as_str(),
            "aud": req.audience,
            "iat": req.issued_at / 1000,
            "nbf": req.issued_at / 1000,
            "exp": req.expires_at / 1000,
            "jti": req.credential_id.as_str(),
            "scope": req.action,
            "task_id": req.task_id.as_str(),
        });
        let actors = super::actors_of(req.binding);
        if let Some(act) = act_claim(req.delegation_chain, &actors) {
            claims["act"] = act;
        }
        if req.access_token {
            claims["client_id"] = json!(
                req.binding
                    .get(super::ATTR_CLIENT_ID)
                    .map_or(req.owner.as_str(), String::as_str)
            );
        }
        if let Some(x5t) = req.binding.get(super::ATTR_CNF) {
            claims["cnf"] = json!({ "x5t#S256": x5t });
        }
        let token = sign_es256(&key.signing, &header, &claims);
        Ok(Issued {
            secret: Secret::new(token),
            attributes: [("kid".to_owned(), key.kid.clone())].into(),
        })
    }

    /// The public keys as a JSON Web Key Set.
    pub fn jwks_json(&self) -> String {
        let keys: Vec<serde_json::Value> = self
            .current()
            .iter()
            .map(|k| p256_jwk(k.signing.verifying_key(), &k.kid, "sig"))
            .collect();
        json!({ "keys": keys }).to_string()
    }
}

/// RFC 8693 actor claim: the delegators of the credential's owner, nearest first, nested; then
/// the actors of token exchanges (`actors`, oldest first) around them, the newest outermost.
pub(crate) fn act_claim(chain: &[SpiffeId], actors: &[SpiffeId]) -> Option<serde_json::Value> {
    let mut act = delegators_claim(chain);
    for id in actors {
        let mut o = json!({ "sub": id.as_str() });
        if let Some(inner) = act.take() {
            o["act"] = inner;
        }
        act = Some(o);
    }
    act
}

fn delegators_claim(chain: &[SpiffeId]) -> Option<serde_json::Value> {
    // chain = [root owner, …, this owner]; the actors are everyone before the last.
    let (_, before) = chain.split_last()?;
    let mut act: Option<serde_json::Value> = None;
    for id in before.iter() {
        let mut o = json!({ "sub": id.as_str() });
        if let Some(inner) = act.take() {
            o["act"] = inner;
        }
        act = Some(o);
    }
    act
}

/// A compact JWS (ES256) of `header` and `claims`.
pub(crate) fn sign_es256(
    key: &SigningKey,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: Signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// The public JWK of a P-256 key, for ES256, with the given `use`.
pub(crate) fn p256_jwk(vk: &VerifyingKey, kid: &str, usage: &str) -> serde_json::Value {
    let point = vk.to_encoded_point(false);
    let x = point
        .x()
        .map(|x| URL_SAFE_NO_PAD.encode(x))
        .unwrap_or_default();
    let y = point
        .y()
        .map(|y| URL_SAFE_NO_PAD.encode(y))
        .unwrap_or_default();
    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": usage, "alg": "ES256"})
}

/// The key id of a public key: a short hash of its point.
pub(crate) fn kid_of(vk: &VerifyingKey) -> String {
    use sha2::{Digest, Sha256};
    let point = vk.to_encoded_point(false);
    hex::encode(&Sha256::digest(point.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{CredentialId, TaskId};

    fn kid_of_jwt(token: &str) -> String {
        let head = token.split('.').next().unwrap();
        let head = URL_SAFE_NO_PAD.decode(head).unwrap();
        serde_json::from_slice::<serde_json::Value>(&head).unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn published(jwks: &str) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(jwks).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    fn sign(issuer: &JwtIssuer, at: UnixMillis) -> String {
        let (id, task, owner) = (
            CredentialId::generate(),
            TaskId::generate(),
            SpiffeId::parse("x", "spiffe://td/agent").unwrap(),
        );
        let binding = BTreeMap::new();
        let req = IssueRequest {
            credential_id: &id,
            task_id: &task,
            owner: &owner,
            resource: "r",
            action: "read",
            issued_at: at,
            expires_at: at + 60_000,
            delegation_chain: &[],
            audience: "r",
            access_token: false,
            binding: &binding,
        };
        kid_of_jwt(issuer.issue(&req).unwrap().secret.expose())
    }

    /// Two replicas on one store: one rotates; the other publishes the new key at its next
    /// reload (each reaper pass), and no JWT is signed with the new key before
    /// `SIGN_AFTER_MS`, so every JWT verifies against either replica's JWKS at any time.
    #[tokio::test]
    async fn a_rotated_key_signs_only_once_every_replica_can_publish_it() {
        let kek_dir = tempfile::tempdir().unwrap();
        let kek = crate::store::Kek::create(&kek_dir.path().join("kek")).unwrap();
        let engine: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::MemoryStore::new());
        let store = Storage::open(engine, &kek).await.unwrap();
        const ROTATE: i64 = 3_600_000;
        let t0 = 1_700_000_000_000;
        let a = JwtIssuer::load(&store, "iss".into(), ROTATE, 600_000, t0)
            .await
            .unwrap();
        let b = JwtIssuer::load(&store, "iss".into(), ROTATE, 600_000, t0)
            .await
            .unwrap();
        let first = published(&a.jwks_json());
        assert_eq!(first, published(&b.jwks_json()), "one key set");
        assert_eq!(sign(&a, t0), first[0], "the first key signs at once");

        // A rotates; B has not reloaded yet.
        let t1 = t0 + ROTATE;
        assert!(a.rotate_if_due(&store, t1).await.unwrap());
        assert_eq!(
            published(&b.jwks_json()),
            first,
            "B still publishes the old set"
        );
        for at in [t1, t1 + SIGN_AFTER_MS - 1] {
            assert_eq!(sign(&a, at), first[0], "the old key still signs at {at}");
        }
        // B reloads on its next pass and publishes both keys.
        b.rotate_if_due(&store, t1 + 1_000).await.unwrap();
        let both = published(&b.jwks_json());
        assert_eq!(both.len(), 2);
        let new = both.iter().find(|k| **k != first[0]).unwrap().clone();
        assert_eq!(
            sign(&a, t1 + SIGN_AFTER_MS),
            new,
            "the new key signs after the delay"
        );
        assert_eq!(sign(&b, t1 + SIGN_AFTER_MS), new, "on every replica");
        assert!(published(&a.jwks_json()).contains(&new));
    }

    #[test]
    fn act_claim_nests_nearest_first() {
        let ids: Vec<SpiffeId> = ["a", "b", "c"]
            .iter()
            .map(|p| SpiffeId::parse("x", &format!("spiffe://td/{p}")).unwrap())
            .collect();
        assert_eq!(act_claim(&ids[..1], &[]), None);
        let act = act_claim(&ids, &[]).unwrap();
        assert_eq!(act["sub"], "spiffe://td/b");
        assert_eq!(act["act"]["sub"], "spiffe://td/a");
        // Exchange actors wrap the delegators, the newest outermost.
        let g = |p: &str| SpiffeId::parse("x", &format!("spiffe://td/{p}")).unwrap();
        let act = act_claim(&ids, &[g("gw1"), g("gw2")]).unwrap();
        assert_eq!(act["sub"], "spiffe://td/gw2");
        assert_eq!(act["act"]["sub"], "spiffe://td/gw1");
        assert_eq!(act["act"]["act"]["sub"], "spiffe://td/b");
        let act = act_claim(&ids[..1], &[g("gw1")]).unwrap();
        assert_eq!(act, json!({"sub": "spiffe://td/gw1"}));
    }
}
