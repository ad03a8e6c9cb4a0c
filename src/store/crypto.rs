//! Sealing of secret material at rest (DESIGN §7).
//!
//! A key-encryption key (KEK) read from a file wraps random data keys; data keys seal records with
//! AES-256-GCM. Every ciphertext carries the id of the data key that sealed it and is bound to the
//! place it is stored (AAD = tree ‖ 0 ‖ record key), so a sealed value copied to another record
//! does not open. Plaintext buffers are zeroized.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

const SEALED_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// The largest plaintext sealed or opened: every sealed record (a secret, a CA key, a wrapped
/// key) is far smaller, so a larger value is damage, not data.
pub const MAX_SEALED_PLAINTEXT: usize = 1 << 20;

/// The key-encryption key, as read from its file.
pub struct Kek {
    key: Zeroizing<[u8; 32]>,
    path: PathBuf,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({}, id {})", self.path.display(), self.id())
    }
}

impl Kek {
    /// Reads a KEK file: exactly 32 raw bytes, or 64 hex digits (surrounding white space ignored).
    /// A file that others may read or write, or its group may write, is refused: the KEK is the
    /// root of secrecy at rest.
    pub fn load(path: &Path) -> Result<Self> {
        check_kek_mode(path)?;
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the key-encryption key file {}: {e}",
                path.display()
            ))
        })?);
        let mut key = Zeroizing::new([0u8; 32]);
        let trimmed = raw.trim_ascii();
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
        } else if trimmed.len() == 64 && trimmed.iter().all(u8::is_ascii_hexdigit) {
            hex::decode_to_slice(trimmed, &mut key[..]).map_err(|e| {
                Error::Config(format!("key file {} is not valid hex: {e}", path.display()))
            })?;
        } else {
            return Err(Error::Config(format!(
                "key-encryption key file {} must hold 32 random bytes, raw or as 64 hex digits \
                 (it holds {} bytes); create one with `(umask 077; openssl rand -hex 32 > {})`",
                path.display(),
                raw.len(),
                path.display()
            )));
        }
        Ok(Self {
            key,
            path: path.to_owned(),
        })
    }

    /// Creates a new random KEK file (mode 0600) that must not exist yet.
    pub fn create(path: &Path) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut key[..]);
        let text = Zeroizing::new(format!("{}\n", hex::encode(&key[..])));
        write_new_private_file(path, text.as_bytes())?;
        Ok(Self {
            key,
            path: path.to_owned(),
        })
    }

    /// A short public fingerprint that names this KEK in stored wrappings and error messages.
    pub fn id(&self) -> String {
        let d = Sha256::digest(&self.key[..]);
        hex::encode(&d[..8])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps a data key; the result names this KEK so a wrong KEK is reported as such.
    pub fn wrap(&self, label: &[u8], dek: &[u8; 32]) -> Result<Vec<u8>> {
        let mut out = self.id().into_bytes();
        out.push(b':');
        out.extend(seal_raw(&self.key, 0, label, dek)?);
        Ok(out)
    }

    pub fn unwrap_key(&self, label: &[u8], wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let (kek_id, body) = match wrapped.iter().position(|&b| b == b':') {
            Some(i) => (&wrapped[..i], &wrapped[i + 1..]),
            None => return Err(Error::Crypto("wrapped data key has no KEK id".into())),
        };
        if kek_id != self.id().as_bytes() {
            return Err(Error::Config(format!(
                "the key-encryption key in {} (id {}) is not the one that sealed this data \
                 (id {}): start with the KEK file this data directory was created with",
                self.path.display(),
                self.id(),
                String::from_utf8_lossy(kek_id)
            )));
        }
        let (_, plain) = open_raw(&self.key, label, body).map_err(|_| {
            Error::Config(format!(
                "the key-encryption key in {} does not open the stored data keys: wrong or \
                 damaged KEK file",
                self.path.display()
            ))
        })?;
        if plain.len() != 32 {
            return Err(Error::Crypto(
                "unwrapped data key has the wrong length".into(),
            ));
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&plain);
        Ok(k)
    }
}

/// Refuses a KEK file readable or writable by others, or writable by its group (group read is
/// fine: Kubernetes mounts Secrets for the pod's group).
#[cfg(unix)]
fn check_kek_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // reading it says what is wrong
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(Error::Config(format!(
            "key-encryption key file {} has mode {mode:04o}: it must not be readable or writable by \
             others, nor writable by its group; chmod 600 {} (or 640 for a group that must read it)",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_kek_mode(_path: &Path) -> Result<()> {
    Ok(())
}

/// Writes a file that must not exist yet, readable by its owner only.
pub fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}

/// Data keys that seal records, plus the key of the secret index.
pub struct Sealer {
    current: (u32, Zeroizing<[u8; 32]>),
    older: Vec<(u32, Zeroizing<[u8; 32]>)>,
    index_key: Zeroizing<[u8; 32]>,
}

impl Sealer {
    pub fn new(
        current: (u32, Zeroizing<[u8; 32]>),
        older: Vec<(u32, Zeroizing<[u8; 32]>)>,
        index_key: Zeroizing<[u8; 32]>,
    ) -> Self {
        Self {
            current,
            older,
            index_key,
        }
    }

    /// Seals `plain` for the record `key` of `tree`.
    pub fn seal(&self, tree: &str, key: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        if plain.len() > MAX_SEALED_PLAINTEXT {
            return Err(Error::Crypto(format!(
                "value for {tree} is {} bytes; at most {MAX_SEALED_PLAINTEXT} are sealed",
                plain.len()
            )));
        }
        let aad = aad(tree, key);
        seal_raw(&self.current.1, self.current.0, &aad, plain)
    }

    pub fn open(&self, tree: &str, key: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let aad = aad(tree, key);
        if sealed.len() > HEADER_LEN + MAX_SEALED_PLAINTEXT + TAG_LEN {
            return Err(Error::Crypto(format!(
                "sealed value in {tree} is {} bytes; at most {} are ever written",
                sealed.len(),
                HEADER_LEN + MAX_SEALED_PLAINTEXT + TAG_LEN
            )));
        }
        if sealed.len() < HEADER_LEN || sealed[0] != SEALED_VERSION {
            return Err(Error::Crypto(format!(
                "sealed value in {tree} is malformed"
            )));
        }
        let key_id = u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]);
        let dek = if key_id == self.current.0 {
            &self.current.1
        } else {
            &self
                .older
                .iter()
                .find(|(id, _)| *id == key_id)
                .ok_or_else(|| Error::Crypto(format!("data key {key_id} is unknown")))?
                .1
        };
        let (_, plain) = open_raw(dek, &aad, sealed)
            .map_err(|_| Error::Crypto(format!("sealed value in {tree} failed authentication")))?;
        Ok(plain)
    }

    /// Keyed hash of a secret: lets `Introspect` find a credential without storing the secret.
    pub fn index_hash(&self, secret: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key[..])
            .expect("HMAC takes keys of any length");
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }
}

fn aad(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(tree.len() + 1 + key.len());
    a.extend_from_slice(tree.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

fn seal_raw(key: &[u8; 32], key_id: u32, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|e| Error::Crypto(e.to_string()))?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + 16);
    out.push(SEALED_VERSION);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&nonce);
    let ct = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
        .map_err(|_| Error::Crypto("sealing failed".into()))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_raw(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<(u32, Zeroizing<Vec<u8>>)> {
    if sealed.len() < HEADER_LEN || sealed[0] != SEALED_VERSION {
        return Err(Error::Crypto("sealed value is malformed".into()));
    }
    let key_id = u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]);
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|e| Error::Crypto(e.to_string()))?;
    let nonce: [u8; NONCE_LEN] = sealed[5..HEADER_LEN]
        .try_into()
        .map_err(|_| Error::Crypto("sealed value is malformed".into()))?;
    let plain = cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed[HEADER_LEN..],
                aad,
            },
        )
        .map_err(|_| Error::Crypto("authentication failed".into()))?;
    Ok((key_id, Zeroizing::new(plain)))
}

/// Loads the data keys and the index key from `meta`, creating them on an empty store. Each key
/// is created once (insert-if-absent), so replicas starting together on an empty database all
/// read the same keys. A KEK that does not open them fails here, before anything is written.
pub async fn load_or_create_keys(engine: &dyn super::Store, kek: &Kek) -> Result<Sealer> {
    if engine.meta_get(DEK_CURRENT).await?.is_none() {
        let first = b"dek/id/1";
        engine
            .meta_put_if_absent("dek/id/1", kek.wrap(first, &random_key())?)
            .await?;
        engine
            .meta_put_if_absent(INDEX_KEY, kek.wrap(INDEX_KEY.as_bytes(), &random_key())?)
            .await?;
        engine
            .meta_put_if_absent(DEK_CURRENT, 1u32.to_be_bytes().to_vec())
            .await?;
    }
    let cur = engine
        .meta_get(DEK_CURRENT)
        .await?
        .ok_or_else(|| Error::Storage("meta dek/current is missing".into()))?;
    let id = u32::from_be_bytes(
        cur.as_slice()
            .try_into()
            .map_err(|_| Error::Storage("corrupt meta dek/current".into()))?,
    );
    let mut current = None;
    let mut older = Vec::new();
    // Data keys are numbered 1..=current (a KEK rotation adds the next one).
    for kid in 1..=id {
        let label = format!("dek/id/{kid}");
        let Some(wrapped) = engine.meta_get(&label).await? else {
            continue;
        };
        let dek = kek.unwrap_key(label.as_bytes(), &wrapped)?;
        if kid == id {
            current = Some((kid, dek));
        } else {
            older.push((kid, dek));
        }
    }
    let current =
        current.ok_or_else(|| Error::Storage(format!("current data key {id} is missing")))?;
    let wrapped_index = engine
        .meta_get(INDEX_KEY)
        .await?
        .ok_or_else(|| Error::Storage("secret index key is missing".into()))?;
    let index_key = kek.unwrap_key(INDEX_KEY.as_bytes(), &wrapped_index)?;
    Ok(Sealer::new(current, older, index_key))
}

const DEK_CURRENT: &str = "dek/current";
const INDEX_KEY: &str = "index_key";

/// A fresh random 256-bit key.
pub fn random_key() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut k[..]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new((7, random_key()), vec![(3, random_key())], random_key())
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let s = sealer();
        let ct = s.seal("credentials", b"crd_1", b"top secret").unwrap();
        assert_eq!(
            &s.open("credentials", b"crd_1", &ct).unwrap()[..],
            b"top secret"
        );
        assert_eq!(u32::from_be_bytes(ct[1..5].try_into().unwrap()), 7);
        assert!(!ct.windows(10).any(|w| w == b"top secret"));
        // Bound to its place: another record key or tree does not open it.
        assert!(s.open("credentials", b"crd_2", &ct).is_err());
        assert!(s.open("tasks", b"crd_1", &ct).is_err());
        let mut flipped = ct.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(s.open("credentials", b"crd_1", &flipped).is_err());
        assert!(s.open("credentials", b"crd_1", &ct[..10]).is_err());
    }

    #[test]
    fn kek_file_formats_and_wrong_kek() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        let kek = Kek::create(&p).unwrap();
        assert!(
            Kek::create(&p).is_err(),
            "never overwrites an existing key file"
        );
        let again = Kek::load(&p).unwrap();
        assert_eq!(kek.id(), again.id());
        let dek = random_key();
        let wrapped = kek.wrap(b"dek/1", &dek).unwrap();
        assert_eq!(&again.unwrap_key(b"dek/1", &wrapped).unwrap()[..], &dek[..]);

        let other_path = dir.path().join("other");
        let other = Kek::create(&other_path).unwrap();
        let err = other
            .unwrap_key(b"dek/1", &wrapped)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&other_path.display().to_string()), "{err}");

        use std::os::unix::fs::PermissionsExt;
        let private = |p: &Path| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        private(&raw);
        Kek::load(&raw).unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"abc").unwrap();
        private(&short);
        let err = Kek::load(&short).unwrap_err().to_string();
        assert!(err.contains("short") && err.contains("32"), "{err}");
        // Readable by others, or writable by the group: refused, saying how to fix it.
        for mode in [0o644, 0o604, 0o620] {
            std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Kek::load(&raw).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{mode:04o}")) && err.contains("chmod 600"),
                "{err}"
            );
        }
        // Group read is how Kubernetes mounts a Secret for the pod's group.
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o440)).unwrap();
        Kek::load(&raw).unwrap();
    }
}
