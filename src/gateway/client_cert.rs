//! The agent's certificate as a forward-auth proxy passes it on: nginx's `$ssl_client_escaped_cert`
//! (URL-escaped PEM), Traefik's `passTLSClientCert` (the PEM body without its BEGIN/END lines,
//! URL-escaped), Caddy's placeholders (PEM or base64 DER). The proxy verified the certificate;
//! the broker believes it only because the proxy is a configured gateway on mTLS.

use base64::Engine;

/// Longest header value read (a certificate chain is a few kB).
const MAX_HEADER: usize = 32 * 1024;

/// The DER of the leaf certificate in a forwarded header value, or why there is none.
pub fn leaf_der(value: &str) -> Result<Vec<u8>, String> {
    if value.len() > MAX_HEADER {
        return Err(format!(
            "the client certificate header is {} bytes; at most {MAX_HEADER}",
            value.len()
        ));
    }
    let decoded = percent_decode(value)?;
    let text = decoded.trim();
    if text.is_empty() {
        return Err("the client certificate header is empty".into());
    }
    if text.contains("-----BEGIN") {
        use rustls_pki_types::pem::PemObject;
        return rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .next()
            .ok_or_else(|| "the client certificate header holds no certificate".to_owned())?
            .map(|c| c.as_ref().to_vec())
            .map_err(|e| format!("the client certificate header is not PEM: {e}"));
    }
    // A PEM body without its lines, or base64 DER: the same thing. Several certificates (a
    // chain, comma-separated by Traefik) keep the first, the leaf.
    let first = text.split(',').next().unwrap_or_default();
    let b64: String = first.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| format!("the client certificate header is neither PEM nor base64 DER: {e}"))
}

fn percent_decode(s: &str) -> Result<String, String> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the client certificate header has a bad %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the client certificate header is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> (String, Vec<u8>) {
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://jitbroker.dev/agent/a".try_into().unwrap(),
        )];
        let c = p.self_signed(&k).unwrap();
        (c.pem(), c.der().to_vec())
    }

    #[test]
    fn every_proxy_form_gives_the_leaf() {
        let (pem, der) = pem();
        let escaped: String = pem
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        for (name, v) in [
            ("pem", pem.clone()),
            ("nginx escaped pem", escaped),
            ("traefik body", body.clone()),
            (
                "traefik escaped body",
                body.replace('+', "%2B").replace('/', "%2F"),
            ),
            ("caddy der base64", b64.clone()),
            ("chain", format!("{b64},{b64}")),
        ] {
            assert_eq!(leaf_der(&v).unwrap(), der, "{name}");
        }
        for bad in ["", "%zz", "not base64 !", "-----BEGIN CERTIFICATE-----\nxx"] {
            assert!(leaf_der(bad).is_err(), "{bad:?}");
        }
        assert!(leaf_der(&"A".repeat(40_000)).is_err());
    }
}
