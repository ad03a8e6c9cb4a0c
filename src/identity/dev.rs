//! The development CA: made with rcgen on first start as `dev/ca.pem` + `dev/ca.key` in the data
//! directory. The key is stored in plaintext on purpose (dev only, and the broker says so), so any
//! standard tool can mint test SVIDs; `jitbroker dev-svid` mints them too.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use zeroize::Zeroizing;

use super::IdentityError;

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The dev CA: its certificate and its signing key.
pub struct DevCa {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    trust_domain: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevCa({})", self.trust_domain)
    }
}

impl Clone for DevCa {
    fn clone(&self) -> Self {
        Self {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// An X.509-SVID as PEM: the chain (leaf first), its key, and the trust bundle.
pub struct SvidPem {
    pub cert_chain_pem: String,
    pub key_pem: Zeroizing<String>,
    pub bundle_pem: String,
}

impl std::fmt::Debug for SvidPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SvidPem(key <redacted>)")
    }
}

fn cert_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Certificate(e.to_string())
}

fn now_offset(d: Duration, back: bool) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    if back { now - d } else { now + d }
}

/// Loads the dev CA of `data_dir`, creating it on first use.
pub fn ensure_dev_ca(data_dir: &Path, trust_domain: &str) -> Result<DevCa, IdentityError> {
    let dir = data_dir.join("dev");
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let io = |p: &Path, e: std::io::Error| IdentityError::Files(format!("{}: {e}", p.display()));
    if cert_path.exists() && key_path.exists() {
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| io(&cert_path, e))?;
        let key_pem =
            Zeroizing::new(std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?);
        let ca_td = ca_trust_domain(&cert_pem).unwrap_or_default();
        if ca_td != trust_domain {
            return Err(IdentityError::Files(format!(
                "the dev CA in {} is for trust domain {ca_td:?}, not {trust_domain:?}",
                cert_path.display()
            )));
        }
        // Fail now, not at the first mint, if the pair is unusable.
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err)?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err)?;
        return Ok(DevCa {
            cert_pem,
            key_pem,
            trust_domain: trust_domain.to_owned(),
        });
    }
    create_private_dir(&dir)?;
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("jitbroker dev CA ({trust_domain})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(cert_err)?,
    )];
    params.not_before = now_offset(Duration::from_secs(3600), true);
    params.not_after = now_offset(CA_VALIDITY, false);
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    write_private(&key_path, key_pem.as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| io(&cert_path, e))?;
    Ok(DevCa {
        cert_pem: cert.pem(),
        key_pem,
        trust_domain: trust_domain.to_owned(),
    })
}

fn ca_trust_domain(pem: &str) -> Option<String> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let uri = super::uri_sans(&der).ok()?.into_iter().next()?;
    uri.strip_prefix("spiffe://")
        .map(|s| s.trim_end_matches('/').to_owned())
}

use rustls_pki_types::pem::PemObject;

impl DevCa {
    /// Mints an X.509-SVID: a leaf (not a CA) with exactly one URI SAN, plus any DNS and IP SANs
    /// (servers need them for host-name checks by standard clients).
    pub fn mint_svid(
        &self,
        spiffe_id: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<SvidPem, IdentityError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(cert_err)?;
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, spiffe_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut sans = vec![SanType::URI(spiffe_id.try_into().map_err(cert_err)?)];
        for d in dns_names {
            sans.push(SanType::DnsName(d.as_str().try_into().map_err(cert_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.use_authority_key_identifier_extension = true;
        params.not_before = now_offset(Duration::from_secs(60), true);
        params.not_after = now_offset(ttl, false);
        let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
        Ok(SvidPem {
            cert_chain_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            bundle_pem: self.cert_pem.clone(),
        })
    }
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| IdentityError::Files(format!("cannot create {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| IdentityError::Files(format!("{}: {e}", dir.display())))?;
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| IdentityError::Files(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| IdentityError::Files(format!("cannot write {}: {e}", path.display())))
}

/// Writes `svid.pem`, `svid.key` (0600) and `bundle.pem` into `dir`.
pub fn write_svid(dir: &Path, svid: &SvidPem) -> Result<(), IdentityError> {
    create_private_dir(dir)?;
    let w = |name: &str, b: &[u8]| {
        std::fs::write(dir.join(name), b).map_err(|e| {
            IdentityError::Files(format!("cannot write {}: {e}", dir.join(name).display()))
        })
    };
    w("svid.pem", svid.cert_chain_pem.as_bytes())?;
    write_private(&dir.join("svid.key"), svid.key_pem.as_bytes())?;
    w("bundle.pem", svid.bundle_pem.as_bytes())
}

/// The dev JWT-SVID signing key: `dev/jwt.key` (P-256, PKCS#8 PEM), made on first use and kept
/// in plaintext like the dev CA key, so tests and `jitbroker dev-svid --jwt-audience` can mint
/// JWT-SVIDs that the dev broker accepts.
pub struct DevJwtKey {
    key: p256::ecdsa::SigningKey,
    kid: String,
    trust_domain: String,
}

impl std::fmt::Debug for DevJwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevJwtKey({}, kid {})", self.trust_domain, self.kid)
    }
}

/// Loads the dev JWT key of `data_dir`, creating it on first use.
pub fn ensure_dev_jwt_key(data_dir: &Path, trust_domain: &str) -> Result<DevJwtKey, IdentityError> {
    use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
    let dir = data_dir.join("dev");
    let path = dir.join("jwt.key");
    let key = if path.exists() {
        let pem = Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|e| IdentityError::Files(format!("{}: {e}", path.display())))?,
        );
        p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
            IdentityError::Files(format!("{}: not a P-256 PKCS#8 key: {e}", path.display()))
        })?
    } else {
        create_private_dir(&dir)?;
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(cert_err)?;
        write_private(&path, pem.as_bytes())?;
        key
    };
    Ok(DevJwtKey::new(key, trust_domain))
}

impl DevJwtKey {
    /// A signer for `trust_domain` (tests use this to make keys the broker does not know).
    pub fn new(key: p256::ecdsa::SigningKey, trust_domain: &str) -> Self {
        let kid = crate::issuers::jwt::kid_of(key.verifying_key());
        Self {
            key,
            kid,
            trust_domain: trust_domain.to_owned(),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`use: jwt-svid`, as in SPIFFE bundles).
    pub fn jwk(&self) -> serde_json::Value {
        crate::issuers::jwt::p256_jwk(self.key.verifying_key(), &self.kid, "jwt-svid")
    }

    /// The JWT bundle file content for this key's trust domain (`{td: JWKS}`).
    pub fn bundle_json(&self) -> serde_json::Value {
        serde_json::json!({ self.trust_domain.clone(): { "keys": [self.jwk()] } })
    }

    /// Signs a JWT-SVID with arbitrary claims (tests use this for hostile tokens too).
    pub fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        crate::issuers::jwt::sign_es256(&self.key, header, claims)
    }

    /// Mints a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl`.
    pub fn mint(&self, spiffe_id: &str, audience: &str, ttl: Duration) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let exp = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2));
        self.sign(
            &serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}),
            &serde_json::json!({"sub": spiffe_id, "aud": [audience], "iat": now, "exp": exp}),
        )
    }
}
