//! Opaque bearer tokens: 256 random bits with a recognisable prefix (so secret scanners and
//! humans can tell what leaked), checked with `Verifier.Introspect`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use zeroize::Zeroize;

use super::Issued;
use crate::model::Secret;

/// Prefix of every opaque token.
pub const PREFIX: &str = "jbt_";

pub fn issue() -> Issued {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let secret = Secret::new(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)));
    raw.zeroize();
    Issued {
        secret,
        attributes: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_prefixed_and_distinct() {
        let a = super::issue();
        let b = super::issue();
        assert!(a.secret.expose().starts_with(super::PREFIX));
        assert_eq!(a.secret.expose().len(), 4 + 43);
        assert_ne!(a.secret, b.secret);
    }
}
