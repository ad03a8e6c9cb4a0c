//! Short-lived X.509 client certificates (DESIGN §6), bound to the resource and the action they
//! were issued for, for mTLS to downstream services.
//!
//! Two levels of CA, both made by the broker on first use and kept sealed in the store:
//! - a root (`x509/root`), published by `Verifier.GetX509Authorities` without a resource;
//! - one issuing CA per `x509` resource (`x509/ca/<resource>`), signed by the root, path length
//!   0, client authentication only, published by `GetX509Authorities` with that resource.
//!
//! A leaf is signed by its resource's CA and carries, as URI SANs, the agent's SPIFFE ID,
//! `urn:jitbroker:task:<id>`, `urn:jitbroker:resource:<name>` and `urn:jitbroker:action:<action>`;
//! its common name is the credential id, it is for client authentication only, and it expires
//! with the credential (never after its task). A relying party that trusts only its resource's
//! CA cannot accept another resource's certificate; it checks the action SAN for the action.
//!
//! The serial number is `01` followed by the 16 bytes of the credential id, so a relying party can
//! ask `Verifier.X509Status` about a certificate by serial without the broker keeping another
//! index; the id is not secret (it is the common name too) and holds 80 random bits.
//!
//! A downstream verifier checks the chain offline, so, as with JWTs, a revocation before expiry is
//! invisible to it unless it asks `X509Status`: keep TTLs short.

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use zeroize::Zeroizing;

use super::{IssueRequest, Issued};
use crate::error::{Error, Result};
use crate::model::{CredentialId, Secret, UnixMillis, preview};
use crate::store::Storage;

const ROOT_KEY: &str = "x509/root";
const RESOURCE_CA_PREFIX: &str = "x509/ca/";
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Shorter than the root's, so an issuing CA never outlives the root that signed it.
const RESOURCE_CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Leaves are valid from slightly before issuance, for clocks a little behind ours.
const BACKDATE_MS: i64 = 30_000;
/// First byte of every serial this issuer writes: keeps the number positive and names the scheme.
const SERIAL_TAG: u8 = 0x01;
/// URI SAN prefixes of the leaf, for relying parties to match exactly.
pub const TASK_URN: &str = "urn:jitbroker:task:";
pub const RESOURCE_URN: &str = "urn:jitbroker:resource:";
pub const ACTION_URN: &str = "urn:jitbroker:action:";

/// A CA: certificate (public) and key (sealed at rest, zeroized in memory).
struct Ca {
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl Ca {
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(err)?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(err)
    }

    async fn load(store: &Storage, key: &str) -> Result<Option<Self>> {
        let Some(sealed) = store.meta_get_sealed(key).await? else {
            return Ok(None);
        };
        Self::parse(&sealed, key).map(Some)
    }

    fn parse(sealed: &Secret, key: &str) -> Result<Self> {
        let (cert_pem, key_pem) = sealed
            .expose()
            .split_once("\n--KEY--\n")
            .ok_or_else(|| Error::Storage(format!("corrupt x509 CA record {key}")))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: Zeroizing::new(key_pem.to_owned()),
        })
    }

    /// Stores this CA unless another replica stored one first; returns the one stored.
    async fn create_once(self, store: &Storage, key: &str) -> Result<Self> {
        let record = Secret::new(format!(
            "{}\n--KEY--\n{}",
            self.cert_pem,
            self.key_pem.as_str()
        ));
        let winner = store.meta_create_sealed(key, &record).await?;
        Self::parse(&winner, key)
    }
}

/// The root and the per-resource issuing CAs.
pub struct X509Issuer {
    root: Ca,
    resources: BTreeMap<String, Ca>,
}

impl std::fmt::Debug for X509Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "X509Issuer(resources {:?}, keys <sealed>)",
            self.resources.keys().collect::<Vec<_>>()
        )
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("x509 issuer: {e}"))
}

fn offset(ms: UnixMillis) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).map_err(err)
}

fn ca_params(common_name: String, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl X509Issuer {
    /// Loads the root and the issuing CA of each of `resources` from the store, creating the ones
    /// that do not exist yet.
    pub async fn load(
        store: &Storage,
        issuer_name: &str,
        resources: &[&str],
        now: UnixMillis,
    ) -> Result<Self> {
        let root = match Ca::load(store, ROOT_KEY).await? {
            Some(ca) => ca,
            None => {
                let key = KeyPair::generate().map_err(err)?;
                // Path length 1: the resource CAs below it, and nothing below those.
                let mut p = ca_params(format!("jitbroker credential root ({issuer_name})"), 1);
                p.not_before = offset(now - 3_600_000)?;
                p.not_after = offset(now)? + ROOT_VALIDITY;
                let cert = p.self_signed(&key).map_err(err)?;
                let ca = Ca {
                    cert_pem: cert.pem(),
                    key_pem: Zeroizing::new(key.serialize_pem()),
                };
                ca.create_once(store, ROOT_KEY).await?
            }
        };
        let mut out = Self {
            root,
            resources: BTreeMap::new(),
        };
        for &name in resources {
            let key = format!("{RESOURCE_CA_PREFIX}{name}");
            let ca = match Ca::load(store, &key).await? {
                Some(ca) => ca,
                None => {
                    out.make_resource_ca(issuer_name, name, now)?
                        .create_once(store, &key)
                        .await?
                }
            };
            out.resources.insert(name.to_owned(), ca);
        }
        Ok(out)
    }

    fn make_resource_ca(&self, issuer_name: &str, resource: &str, now: UnixMillis) -> Result<Ca> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = ca_params(
            format!("jitbroker credential CA for resource {resource} ({issuer_name})"),
            0,
        );
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, resource);
        // Client authentication only, on the CA too: verifiers that check extended key usage
        // along the chain refuse its certificates for anything else.
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = offset(now - 3_600_000)?;
        p.not_after = offset(now)? + RESOURCE_CA_VALIDITY;
        let cert = p.signed_by(&key, &self.root.issuer()?).map_err(err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The root CA certificate (PEM): verifies every resource's certificates, given the chain.
    pub fn root_pem(&self) -> &str {
        &self.root.cert_pem
    }

    /// The issuing CA certificate (PEM) of one resource, if it is an `x509` resource.
    pub fn resource_ca_pem(&self, resource: &str) -> Option<&str> {
        self.resources.get(resource).map(|c| c.cert_pem.as_str())
    }

    /// A client certificate, its issuing CA and its key (PEM, in that order) for the credential.
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued> {
        let ca = self.resources.get(req.resource).ok_or_else(|| {
            Error::Internal(format!(
                "x509 issuer: no issuing CA for resource {}",
                req.resource
            ))
        })?;
        let issuer = ca.issuer()?;
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, req.credential_id.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let uri = |s: String| -> Result<SanType> { Ok(SanType::URI(s.try_into().map_err(err)?)) };
        p.subject_alt_names = vec![
            uri(req.owner.to_string())?,
            uri(format!("{TASK_URN}{}", req.task_id.as_str()))?,
            uri(format!("{RESOURCE_URN}{}", req.resource))?,
            uri(format!("{ACTION_URN}{}", req.action))?,
        ];
        let serial = serial_of(req.credential_id)?;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        p.not_before = offset(req.issued_at - BACKDATE_MS)?;
        p.not_after = offset(req.expires_at)?;
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let secret = Secret::new(format!(
            "{}{}{}",
            cert.pem(),
            ensure_newline(&ca.cert_pem),
            key_pem.as_str()
        ));
        Ok(Issued {
            secret,
            attributes: [
                ("serial".to_owned(), hex::encode(serial)),
                ("spiffe_id".to_owned(), req.owner.to_string()),
            ]
            .into(),
        })
    }
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

/// The serial number of a credential's certificate: the tag byte, then the id's 16 bytes.
pub fn serial_of(id: &CredentialId) -> Result<[u8; 17]> {
    let hex_part = id.as_str().strip_prefix("crd_").unwrap_or_default();
    let mut out = [0u8; 17];
    out[0] = SERIAL_TAG;
    hex::decode_to_slice(hex_part, &mut out[1..]).map_err(err)?;
    Ok(out)
}

/// The credential a serial number names: `Ok(None)` for a well-formed serial this issuer did not
/// write (it cannot be one of its certificates). Accepts hex in either case, with or without `:`
/// between bytes and a leading `0x` (as `openssl x509 -serial` and most tools print it).
pub fn credential_of_serial(serial: &str) -> Result<Option<CredentialId>> {
    const MAX_SERIAL_TEXT: usize = 3 * 20 + 2;
    if serial.is_empty() {
        return Err(Error::invalid("serial", "is required"));
    }
    if serial.len() > MAX_SERIAL_TEXT {
        return Err(Error::invalid(
            "serial",
            format!(
                "is {} bytes; a serial number has at most 20 octets",
                serial.len()
            ),
        ));
    }
    let body = serial
        .strip_prefix("0x")
        .or_else(|| serial.strip_prefix("0X"))
        .unwrap_or(serial);
    let digits: String = body.chars().filter(|&c| c != ':').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "serial",
            format!("must be hexadecimal (got {})", preview(serial)),
        ));
    }
    let digits = digits.to_ascii_lowercase();
    // Tools print serials without leading zero octets (and some without a leading zero digit).
    let trimmed = digits.trim_start_matches('0');
    let Some(id_hex) = trimmed.strip_prefix('1') else {
        return Ok(None);
    };
    if id_hex.len() != 32 {
        return Ok(None);
    }
    Ok(CredentialId::parse(&format!("crd_{id_hex}")).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_round_trip_in_the_forms_tools_print() {
        let id = CredentialId::generate();
        let serial = serial_of(&id).unwrap();
        assert_eq!(serial[0], SERIAL_TAG);
        let plain = hex::encode(serial);
        let upper = plain.to_ascii_uppercase();
        let colons = serial
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        for form in [
            plain.clone(),
            upper,
            colons,
            format!("0x{plain}"),
            format!("00{plain}"),
            plain[1..].to_owned(),
        ] {
            assert_eq!(
                credential_of_serial(&form).unwrap(),
                Some(id.clone()),
                "{form}"
            );
        }
    }

    #[test]
    fn foreign_and_malformed_serials() {
        // Well-formed, but not a serial of ours: another tag, another length.
        assert_eq!(credential_of_serial("02ab").unwrap(), None);
        assert_eq!(credential_of_serial(&"7f".repeat(16)).unwrap(), None);
        assert_eq!(
            credential_of_serial(&format!("01{}", "a".repeat(30))).unwrap(),
            None
        );
        for bad in ["", "xyz", ":", "0x", &"1".repeat(200), "01 02"] {
            let e = credential_of_serial(bad).unwrap_err().to_string();
            assert!(e.contains("serial"), "{bad}: {e}");
        }
    }
}
