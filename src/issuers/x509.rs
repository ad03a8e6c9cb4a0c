//! Short-lived X.509 client certificates (DESIGN §6) from the broker's issuing CA, for mTLS to
//! downstream services. The leaf carries the agent's SPIFFE ID and the task as URI SANs
//! (`spiffe://…` and `urn:jitbroker:task:<id>`), the credential id as its common name, clientAuth
//! only, and expires with the credential (never after its task). The CA key is sealed in the
//! store like every other secret; the CA certificate is published by `Verifier.GetX509Authorities`.
//!
//! A downstream verifier checks the chain offline, so, as with JWTs, a revocation before expiry
//! is invisible to it: keep TTLs short.

use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use zeroize::Zeroizing;

use super::{IssueRequest, Issued};
use crate::error::{Error, Result};
use crate::model::{Secret, UnixMillis};
use crate::store::Store;

const META_KEY: &str = "x509/ca";
const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Leaves are valid from slightly before issuance, for clocks a little behind ours.
const BACKDATE_MS: i64 = 30_000;

/// The issuing CA: certificate (public) and key (sealed at rest).
pub struct X509Issuer {
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for X509Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X509Issuer(key <sealed>)")
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("x509 issuer: {e}"))
}

fn offset(ms: UnixMillis) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).map_err(err)
}

impl X509Issuer {
    /// Loads the issuing CA from the store, creating it on first use.
    pub fn load(store: &dyn Store, issuer_name: &str, now: UnixMillis) -> Result<Self> {
        if let Some(sealed) = store.meta_get_sealed(META_KEY)? {
            let (cert_pem, key_pem) = sealed
                .expose()
                .split_once("\n--KEY--\n")
                .ok_or_else(|| Error::Storage("corrupt x509 CA record".into()))?;
            return Ok(Self {
                cert_pem: cert_pem.to_owned(),
                key_pem: Zeroizing::new(key_pem.to_owned()),
            });
        }
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(
            DnType::CommonName,
            format!("jitbroker credential CA ({issuer_name})"),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = offset(now - 3_600_000)?;
        p.not_after = offset(now)? + CA_VALIDITY;
        let cert = p.self_signed(&key).map_err(err)?;
        let this = Self {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        };
        let record = Secret::new(format!(
            "{}\n--KEY--\n{}",
            this.cert_pem,
            this.key_pem.as_str()
        ));
        store.meta_put_sealed(META_KEY, &record)?;
        Ok(this)
    }

    /// The CA certificate (PEM), for verifiers.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A client certificate and its key (PEM, certificate first) for the credential.
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(err)?;
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, req.credential_id.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![
            SanType::URI(req.owner.as_str().try_into().map_err(err)?),
            SanType::URI(
                format!("urn:jitbroker:task:{}", req.task_id.as_str())
                    .try_into()
                    .map_err(err)?,
            ),
        ];
        let mut serial = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        p.not_before = offset(req.issued_at - BACKDATE_MS)?;
        p.not_after = offset(req.expires_at)?;
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let secret = Secret::new(format!("{}{}", cert.pem(), key_pem.as_str()));
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
