//! Client authentication when JWT-SVIDs are enabled: a client certificate becomes optional at
//! the TLS layer (an agent behind a proxy may hold only a JWT-SVID), but one that *is* presented
//! must be a valid X.509-SVID of an authorised trust domain, or the handshake is refused.
//!
//! spiffe-rustls only builds mandatory client authentication, so this verifier composes the same
//! checks from parts that are not hand-written crypto: the chain is verified by rustls'
//! `WebPkiClientVerifier` against the peer trust domain's X.509 bundle taken from the same
//! `X509Source` (so bundle rotation applies at once), and the SVID rules (one `spiffe://` URI
//! SAN, leaf not a CA, digitalSignature key usage, trust domain allowed) are checked on the leaf
//! before the chain is. The request layer then requires a JWT-SVID on connections without one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::{SpiffeId, TrustDomain, X509Bundle};

use super::peer_spiffe_id;

type Cached = (Arc<X509Bundle>, Arc<dyn ClientCertVerifier>);

pub(super) struct OptionalSvidVerifier {
    source: spiffe::X509Source,
    authorized: Vec<String>,
    provider: Arc<CryptoProvider>,
    /// Per trust domain: the bundle a verifier was built from, and the verifier.
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for OptionalSvidVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OptionalSvidVerifier({:?})", self.authorized)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("client X.509-SVID refused: {0}")]
struct Refused(String);

/// A refusal, reported the way spiffe-rustls reports its own (so log lines read alike).
fn refuse(why: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(Refused(why.to_string()))))
}

impl OptionalSvidVerifier {
    pub(super) fn new(
        source: spiffe::X509Source,
        authorized: Vec<String>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            source,
            authorized,
            provider,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The chain verifier for a trust domain, rebuilt when its bundle changes.
    fn chain_verifier(
        &self,
        td: &TrustDomain,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self
            .source
            .try_bundle_for_trust_domain(td)
            .ok_or_else(|| refuse(format!("no X.509 bundle for trust domain {td}")))?;
        let key = td.to_string();
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| refuse("verifier cache poisoned"))?;
        if let Some((b, v)) = cache.get(&key)
            && Arc::ptr_eq(b, &bundle)
        {
            return Ok(v.clone());
        }
        let mut roots = RootCertStore::empty();
        for ca in bundle.authorities() {
            roots
                .add(CertificateDer::from(ca.as_ref().to_vec()))
                .map_err(|e| refuse(format!("bundle of {td}: {e}")))?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| refuse(format!("bundle of {td}: {e}")))?;
        cache.insert(key, (bundle, v.clone()));
        Ok(v)
    }
}

/// The leaf carries the digitalSignature key usage (X.509-SVID §4.3).
fn has_digital_signature(der: &[u8]) -> Result<(), rustls::Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| refuse(format!("does not parse: {e}")))?;
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.digital_signature() => Ok(()),
        Ok(Some(_)) => Err(refuse("leaf lacks the digitalSignature key usage")),
        Ok(None) => Err(refuse("leaf has no key usage extension")),
        Err(e) => Err(refuse(format!("key usage: {e}"))),
    }
}

impl ClientCertVerifier for OptionalSvidVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = peer_spiffe_id(std::slice::from_ref(end_entity)).map_err(refuse)?;
        has_digital_signature(end_entity.as_ref())?;
        let id = SpiffeId::new(&id).map_err(|e| refuse(format!("{id}: {e}")))?;
        let td = id.trust_domain();
        if !self.authorized.iter().any(|a| a == td.as_str()) {
            return Err(refuse(format!(
                "trust domain {td} is not authorised (identity.authorized_trust_domains)"
            )));
        }
        self.chain_verifier(td)?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
