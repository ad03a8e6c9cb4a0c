//! Where SVIDs come from and how TLS uses them (DESIGN §3).
//!
//! A narrow seam separates the *source* of certificates (`spire`: the SPIFFE Workload API;
//! `files`: PEM files rewritten by spiffe-helper; `dev`: the dev CA) from *how TLS uses them*:
//! every source ends up as a `spiffe::X509Source`, and the server's rustls configuration is
//! always built by `spiffe-rustls` from it — chain verification against the trust bundle, the
//! single `spiffe://` URI SAN, the leaf-not-CA rule and the trust-domain allow list are never
//! hand-written here. `dev` and `files` reach `X509Source` through an in-process Workload API
//! ([`inproc`]), so a rotation is the same event for all three sources: new handshakes use the
//! new material, without a restart.

pub mod dev;
mod inproc;
mod jwt;
mod optional_mtls;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

pub use dev::{DevCa, DevJwtKey, SvidPem};
use inproc::Material;
pub use jwt::{JwtAuth, JwtBundleSource, parse_bundle_set};

/// How long the broker waits for a Workload API before giving up at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The dev server SVID's lifetime; it is re-minted at half-life.
const DEV_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the `files` source looks for rewritten files.
const FILES_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The SPIFFE Workload API could not be reached or gave nothing usable.
    #[error("{0}")]
    Source(String),
    /// An SVID, key or bundle file is missing or unreadable.
    #[error("identity files: {0}")]
    Files(String),
    /// A certificate could not be made or parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A peer certificate is not an acceptable X.509-SVID.
    #[error("peer certificate: {0}")]
    Peer(String),
    /// A bearer JWT-SVID is not acceptable.
    #[error("JWT-SVID refused: {0}")]
    Jwt(String),
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Where the broker's own SVID and the trust bundles come from.
pub enum IdentitySource {
    Dev {
        ca: DevCa,
        server_id: String,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
        /// Federated trust domains and their bundle files (PEM).
        federated: Vec<(String, PathBuf)>,
    },
    Files {
        svid_file: PathBuf,
        key_file: PathBuf,
        bundle_file: PathBuf,
        /// Federated trust domains and their bundle files (PEM), reloaded with the others.
        federated: Vec<(String, PathBuf)>,
    },
    Spire {
        endpoint: Option<String>,
    },
}

struct Inner {
    source: spiffe::X509Source,
    kind: &'static str,
    trust_domain: String,
    authorized: Vec<String>,
    /// JWT-SVID authentication, when `identity.jwt_audience` is set.
    jwt: Option<JwtAuth>,
    /// Keeps the in-process Workload API's feed alive (dev and files).
    _feed: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(f) = &self._feed {
            f.abort();
        }
    }
}

/// The broker's identity: its SVID source and the TLS configuration built from it.
#[derive(Clone)]
pub struct Identity(Arc<Inner>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({}, {})", self.0.kind, self.0.trust_domain)
    }
}

/// JWT-SVID settings: the broker's audience and where the JWT bundles come from.
pub struct JwtSettings {
    pub audience: String,
    pub bundles: JwtBundleSource,
}

/// The Workload API endpoint: the configured one, else `SPIFFE_ENDPOINT_SOCKET`.
fn workload_endpoint(configured: Option<String>) -> Result<String, IdentityError> {
    configured
        .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
        .ok_or_else(|| {
            IdentityError::Source(
                "no SPIFFE Workload API endpoint: set identity.workload_api_socket or \
                 SPIFFE_ENDPOINT_SOCKET (e.g. unix:///run/spire/agent.sock)"
                    .into(),
            )
        })
}

/// Starts the identity source and waits (bounded) for the first SVID (and JWT bundles, when
/// JWT-SVIDs are enabled).
pub async fn start(
    source: IdentitySource,
    trust_domain: &str,
    authorized_trust_domains: &[String],
    jwt: Option<JwtSettings>,
) -> Result<Identity, IdentityError> {
    let (kind, x509, feed) = match source {
        IdentitySource::Dev {
            ca,
            server_id,
            dns_names,
            ips,
            federated,
        } => {
            let mint = move || -> Result<Material, IdentityError> {
                let svid = ca.mint_svid(&server_id, &dns_names, &ips, DEV_SVID_TTL)?;
                let mut m = material_from_pem(
                    &server_id,
                    &svid.cert_chain_pem,
                    &svid.key_pem,
                    &svid.bundle_pem,
                )?;
                m.federated = read_federated(&federated)?.0;
                Ok(m)
            };
            let (tx, rx) = watch::channel(Some(mint()?));
            let feed = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(DEV_SVID_TTL / 2).await;
                    match mint() {
                        Ok(m) => {
                            let _ = tx.send(Some(m));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "re-minting the dev server SVID failed")
                        }
                    }
                }
            });
            ("dev", bounded(inproc::source(rx)).await?, Some(feed))
        }
        IdentitySource::Files {
            svid_file,
            key_file,
            bundle_file,
            federated,
        } => {
            let read = move || {
                let (mut m, mut stamp) = read_files(&svid_file, &key_file, &bundle_file)?;
                let (fed, fed_stamp) = read_federated(&federated)?;
                m.federated = fed;
                stamp.extend(fed_stamp);
                Ok::<_, IdentityError>((m, stamp))
            };
            let (first, mut seen) = read()?;
            let (tx, rx) = watch::channel(Some(first));
            let feed = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(FILES_POLL).await;
                    match read() {
                        Ok((m, stamp)) if stamp != seen => {
                            seen = stamp;
                            tracing::info!(spiffe_id = %m.spiffe_id, "SVID files changed; new handshakes use them");
                            let _ = tx.send(Some(m));
                        }
                        Ok(_) => {}
                        // A half-written file (spiffe-helper mid-rewrite) keeps the previous material.
                        Err(e) => {
                            tracing::warn!(error = %e, "SVID files unusable; keeping the previous SVID")
                        }
                    }
                }
            });
            ("files", bounded(inproc::source(rx)).await?, Some(feed))
        }
        IdentitySource::Spire { endpoint } => {
            let endpoint = workload_endpoint(endpoint)?;
            let build = spiffe::X509Source::builder().endpoint(&endpoint).build();
            let src = match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(IdentityError::Source(format!(
                        "the SPIFFE Workload API at {endpoint} gave no usable X.509-SVID: {e}; is a \
                         registration entry present for this workload?"
                    )));
                }
                Err(_) => {
                    return Err(IdentityError::Source(format!(
                        "timed out after {}s connecting to the SPIFFE Workload API at {endpoint}; is \
                         the SPIRE agent running, the socket mounted, and a registration entry \
                         present for this workload?",
                        CONNECT_TIMEOUT.as_secs()
                    )));
                }
            };
            ("spire", src, None)
        }
    };
    let mut authorized: Vec<String> = authorized_trust_domains.to_vec();
    if authorized.is_empty() {
        authorized.push(trust_domain.to_owned());
    }
    let jwt = match jwt {
        Some(j) => Some(JwtAuth::start(&j.audience, &authorized, j.bundles).await?),
        None => None,
    };
    Ok(Identity(Arc::new(Inner {
        source: x509,
        kind,
        trust_domain: trust_domain.to_owned(),
        authorized,
        jwt,
        _feed: feed,
    })))
}

async fn bounded(
    f: impl std::future::Future<Output = Result<spiffe::X509Source, IdentityError>>,
) -> Result<spiffe::X509Source, IdentityError> {
    tokio::time::timeout(CONNECT_TIMEOUT, f)
        .await
        .map_err(|_| IdentityError::Source("the identity source gave no SVID in time".into()))?
}

impl Identity {
    /// The server's rustls configuration: mTLS with X.509-SVIDs via spiffe-rustls, client
    /// identities limited to the authorised trust domains, ALPN `h2`. With JWT-SVIDs enabled,
    /// the client certificate is optional (see [`optional_mtls`]); without, it is mandatory.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let mandatory = self.mandatory_mtls_config()?;
        if self.0.jwt.is_none() {
            return Ok(mandatory);
        }
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .ok_or_else(|| IdentityError::Tls("no rustls crypto provider installed".into()))?;
        let verifier = Arc::new(optional_mtls::OptionalSvidVerifier::new(
            self.0.source.clone(),
            self.0.authorized.clone(),
            provider.clone(),
        ));
        // The server certificate still comes from spiffe-rustls' resolver (it follows rotation).
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(mandatory.cert_resolver.clone());
        cfg.alpn_protocols = mandatory.alpn_protocols.clone();
        // As spiffe-rustls does: no resumption, so every connection is verified afresh.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// JWT-SVIDs are accepted on this broker.
    pub fn jwt_enabled(&self) -> bool {
        self.0.jwt.is_some()
    }

    /// Verifies a bearer JWT-SVID; the SPIFFE ID, or why it is refused.
    pub fn verify_jwt(&self, token: &str) -> Result<String, IdentityError> {
        match &self.0.jwt {
            Some(j) => j.verify(token),
            None => Err(IdentityError::Jwt(
                "JWT-SVIDs are not enabled on this broker (identity.jwt_audience); connect with \
                 mTLS using an X.509-SVID"
                    .into(),
            )),
        }
    }

    /// Verifies a JWT-SVID whose one audience must be one of `audiences` (OAuth assertions).
    pub fn verify_jwt_for(&self, token: &str, audiences: &[&str]) -> Result<String, IdentityError> {
        match &self.0.jwt {
            Some(j) => j.verify_for(token, audiences),
            None => Err(IdentityError::Jwt(
                "JWT-SVIDs are not enabled on this broker (identity.jwt_audience)".into(),
            )),
        }
    }

    fn mandatory_mtls_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let tds: BTreeSet<spiffe::TrustDomain> = self
            .0
            .authorized
            .iter()
            .map(|t| {
                spiffe::TrustDomain::new(t)
                    .map_err(|e| IdentityError::Tls(format!("trust domain {t}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let authorizer =
            spiffe_rustls::authorizer::trust_domains(self.0.authorized.iter().map(String::as_str))
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let cfg = spiffe_rustls::mtls_server(self.0.source.clone())
            .authorize(authorizer)
            .trust_domain_policy(spiffe_rustls::AllowList(tds))
            .with_alpn_protocols([b"h2"])
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    pub fn own_spiffe_id(&self) -> Option<String> {
        self.0.source.try_svid().map(|s| s.spiffe_id().to_string())
    }

    pub fn svid_not_after(&self) -> Option<SystemTime> {
        let svid = self.0.source.try_svid()?;
        let leaf = svid.cert_chain().first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let secs = cert.validity().not_after.timestamp();
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
    }

    /// The source is healthy and the current SVID has not expired.
    pub fn is_ready(&self) -> bool {
        self.0.source.is_healthy()
            && self.svid_not_after().is_some_and(|t| t > SystemTime::now())
            && self.0.jwt.as_ref().is_none_or(JwtAuth::is_ready)
    }
}

/// The URI SANs of a DER certificate.
pub(crate) fn uri_sans(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Peer(format!("does not parse: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                out.push((*u).to_owned());
            }
        }
    }
    Ok(out)
}

/// The SPIFFE ID of an (already verified) peer chain: exactly one `spiffe://` URI SAN on a leaf
/// that is not a CA.
pub fn peer_spiffe_id(peer_certs: &[CertificateDer<'_>]) -> Result<String, IdentityError> {
    let leaf = peer_certs
        .first()
        .ok_or_else(|| IdentityError::Peer("no certificate presented".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| IdentityError::Peer(format!("does not parse: {e}")))?;
    if cert.is_ca() {
        return Err(IdentityError::Peer("the leaf is a CA certificate".into()));
    }
    let uris = uri_sans(leaf.as_ref())?;
    match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(one.clone()),
        [one] => Err(IdentityError::Peer(format!(
            "URI SAN {one:?} is not a spiffe:// ID"
        ))),
        [] => Err(IdentityError::Peer("no URI SAN".into())),
        _ => Err(IdentityError::Peer(format!(
            "{} URI SANs; an X.509-SVID has exactly one",
            uris.len()
        ))),
    }
}

fn pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Certificate(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::Certificate(format!(
            "{what}: no certificate"
        )));
    }
    Ok(certs)
}

fn material_from_pem(
    spiffe_id: &str,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<Material, IdentityError> {
    let chain = pem_certs(chain_pem, "SVID")?;
    let bundle = pem_certs(bundle_pem, "bundle")?;
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| IdentityError::Certificate(format!("SVID key (PKCS#8 PEM expected): {e}")))?;
    Ok(Material {
        spiffe_id: spiffe_id.to_owned(),
        chain_der: chain.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
        key_der: zeroize::Zeroizing::new(key.secret_pkcs8_der().to_vec()),
        bundle_der: bundle.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
        federated: Default::default(),
    })
}

/// Reads federated bundles: (`spiffe://td` → DER certificates), and the files' stamps.
fn read_federated(
    files: &[(String, PathBuf)],
) -> Result<(std::collections::BTreeMap<String, Vec<u8>>, Stamp), IdentityError> {
    let mut out = std::collections::BTreeMap::new();
    let mut stamp = Vec::new();
    for (td, path) in files {
        stamp.push(file_stamp(path));
        let pem = std::fs::read_to_string(path).map_err(|e| {
            IdentityError::Files(format!(
                "federated bundle of {td}: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let certs = pem_certs(&pem, &format!("federated bundle of {td}"))?;
        out.insert(
            format!("spiffe://{td}"),
            certs.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
        );
    }
    Ok((out, stamp))
}

/// What tells a rewritten file apart: modification time and length.
pub(crate) type FileStamp = (Option<SystemTime>, u64);

pub(crate) fn file_stamp(p: &Path) -> FileStamp {
    std::fs::metadata(p)
        .map(|m| (m.modified().ok(), m.len()))
        .unwrap_or((None, 0))
}

type Stamp = Vec<FileStamp>;

fn read_files(svid: &Path, key: &Path, bundle: &Path) -> Result<(Material, Stamp), IdentityError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| IdentityError::Files(format!("cannot read {}: {e}", p.display())))
    };
    let stamp = [svid, key, bundle].iter().map(|p| file_stamp(p)).collect();
    let chain_pem = read(svid)?;
    let key_pem = zeroize::Zeroizing::new(read(key)?);
    let bundle_pem = read(bundle)?;
    let leaf = pem_certs(&chain_pem, &svid.display().to_string())?;
    let id = peer_spiffe_id(&leaf)
        .map_err(|e| IdentityError::Files(format!("{}: {e}", svid.display())))?;
    Ok((
        material_from_pem(&id, &chain_pem, &key_pem, &bundle_pem)?,
        stamp,
    ))
}
