//! The embedded default store: sled, with secrets sealed by [`Sealer`].
//!
//! Trees (DESIGN §7): `tasks`, `credentials`, `secret_index` (keyed hash of secret → credential
//! id), `expiry` (big-endian expiry time ‖ kind ‖ id), `by_task`, `by_identity`, `idempotency`,
//! `meta`. Durability is a group commit: writers take a ticket after writing, one flusher thread
//! flushes and publishes the highest ticket it covers.
//!
//! Write order instead of transactions on the request path. Every sled transaction (and batch)
//! seals the current log buffer twice and hands each to sled's I/O thread pool, which made
//! thread wake-ups the largest cost of an issuance (BENCHMARKS.md). Tasks and credentials are
//! therefore written key by key, index entries first and the record last, and removed record
//! first. sled recovers a prefix of its log, so a crash leaves at worst index entries pointing
//! at a record that is missing or already ended; every reader treats those as absent (a secret
//! whose record is missing or ended is not a credential, an expiry or purge entry without a
//! record is dropped, an idempotency key without a record is not a replay). Rarer multi-key
//! changes (approvals, the upstream ledger) still use transactions.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::watch;

use super::crypto::{Kek, random_key};
use super::local::{Local, LocalEngine};
use super::{Counts, Expiring, Fut, SealedSecret};
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, CredentialId, CredentialRecord, CredentialState, Grant, Revocation,
    SpiffeId, Task, TaskId, TaskState, UnixMillis, UpstreamObject,
};

const CREDENTIALS: &str = "credentials";
const META: &str = "meta";

#[derive(Serialize, Deserialize)]
struct StoredCredential {
    record: CredentialRecord,
    /// AES-GCM sealed secret, present while the credential is active.
    #[serde(default, with = "opt_b64")]
    sealed: Option<Vec<u8>>,
    /// Keyed hash of the secret (not the secret): lets the index entry be removed on revocation.
    #[serde(default)]
    index: Option<String>,
}

mod opt_b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let o: Option<String> = Option::deserialize(d)?;
        o.map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

struct Flush {
    stop: std::sync::atomic::AtomicBool,
    written: AtomicU64,
    kick: Mutex<bool>,
    cv: Condvar,
    flushed: watch::Sender<u64>,
    /// The last failed flush: the tickets it was to cover and why it failed (`None` once a
    /// flush succeeds).
    failed: watch::Sender<Option<(u64, String)>>,
    /// Tests make the next flushes fail (a full disk is hard to arrange in a test).
    fail_flushes: std::sync::atomic::AtomicBool,
    /// Entries of `by_identity` (tasks not ended) and of `secret_index` (active credentials),
    /// kept as each write changes them so `counts` costs nothing per metrics scrape, and saved
    /// with each flush so a start after a crash need not count a million keys before it is
    /// ready.
    live_tasks: AtomicI64,
    live_credentials: AtomicI64,
    /// The counts were carried over a crash: they may be off by the writes made between the
    /// last flush and the crash. The next normal close counts again.
    approximate: std::sync::atomic::AtomicBool,
}

/// The longest a caller waits for its change to be flushed before it is told the store is
/// unavailable (the flusher keeps retrying; the change may still become durable later).
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct SledStore {
    db: sled::Db,
    tasks: sled::Tree,
    credentials: sled::Tree,
    secret_index: sled::Tree,
    expiry: sled::Tree,
    by_task: sled::Tree,
    by_identity: sled::Tree,
    idempotency: sled::Tree,
    audit: sled::Tree,
    blocked: sled::Tree,
    children: sled::Tree,
    approvals: sled::Tree,
    upstream: sled::Tree,
    revocations: sled::Tree,
    meta: sled::Tree,
    local: Local,
    flush: Arc<Flush>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Key of the saved counts in `meta`: written with `clean: true` by a store that closed
/// normally, and with `clean: false` at open and before every group-commit flush that follows a
/// change of the counts. A start after a crash takes the figures of the last flush (sled
/// recovers a prefix of its log, so they are off by at most the writes of the flush interval
/// in which it crashed) and marks them approximate until the next normal close counts again.
/// A store that saved without `flushed` (an older version) and crashed is counted at open.
const COUNTS_KEY: &[u8] = b"store/counts";

#[derive(Serialize, Deserialize)]
struct SavedCounts {
    tasks: u64,
    credentials: u64,
    clean: bool,
    #[serde(default)]
    flushed: bool,
    #[serde(default)]
    approximate: bool,
}

/// Key of the `upstream` and `revocations` trees: resource ‖ 0 ‖ account name.
fn upstream_key(resource: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(resource.len() + 1 + name.len());
    k.extend_from_slice(resource.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn st<E: std::fmt::Display>(e: E) -> Error {
    Error::storage(e)
}

fn tx_err(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => st(e),
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::internal)
}

fn dec<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Storage(format!("corrupt {what} record: {e}")))
}

/// Decodes the values of `items` (a scan of a tree), JSON records of `what`.
fn values<T: for<'de> Deserialize<'de>>(
    items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    what: &str,
) -> Result<Vec<T>> {
    items.map(|item| dec(what, &item.map_err(st)?.1)).collect()
}

/// The ids in `tree`'s keys under `owner`'s prefix (`owner`, then a separator): what comes after
/// it, parsed with `parse`.
fn ids_under<T>(
    tree: &sled::Tree,
    owner: &str,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<Vec<T>> {
    let prefix = cat(&[owner.as_bytes(), b""]);
    tree.scan_prefix(&prefix)
        .map(|item| {
            parse(&String::from_utf8_lossy(
                &item.map_err(st)?.0[prefix.len()..],
            ))
        })
        .collect()
}

/// Reads and decodes one JSON record.
fn get_record<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
    what: &str,
) -> Result<Option<T>> {
    tree.get(key)
        .map_err(st)?
        .map(|v| dec(what, &v))
        .transpose()
}

/// Reads one index entry whose value is an id.
fn get_ref<T>(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<Option<T>> {
    tree.get(key)
        .map_err(st)?
        .map(|v| parse(&String::from_utf8_lossy(&v)))
        .transpose()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            v.push(0);
        }
        v.extend_from_slice(p);
    }
    v
}

fn expiry_key(at: UnixMillis, what: &Expiring) -> Vec<u8> {
    let mut k = (at.max(0) as u64).to_be_bytes().to_vec();
    match what {
        Expiring::Task(id) => {
            k.push(b't');
            k.extend_from_slice(id.as_str().as_bytes());
        }
        Expiring::Credential(id) => {
            k.push(b'c');
            k.extend_from_slice(id.as_str().as_bytes());
        }
        Expiring::Purge(id) => {
            k.push(b'p');
            k.extend_from_slice(id.as_str().as_bytes());
        }
    }
    k
}

fn parse_expiry_key(k: &[u8]) -> Result<(UnixMillis, Expiring)> {
    let bad = || Error::Storage("corrupt expiry index entry".into());
    if k.len() < 9 {
        return Err(bad());
    }
    let at = u64::from_be_bytes(k[..8].try_into().map_err(|_| bad())?) as i64;
    let id = std::str::from_utf8(&k[9..]).map_err(|_| bad())?;
    let what = match k[8] {
        b't' => Expiring::Task(TaskId::parse(id).map_err(|_| bad())?),
        b'c' => Expiring::Credential(CredentialId::parse(id).map_err(|_| bad())?),
        b'p' => Expiring::Purge(TaskId::parse(id).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    Ok((at, what))
}

fn idem_task_key(owner: &SpiffeId, key: &str) -> Vec<u8> {
    cat(&[b"t", owner.as_str().as_bytes(), key.as_bytes()])
}

fn approval_grant_key(task: &TaskId, grant: &Grant) -> Vec<u8> {
    cat(&[
        b"a",
        task.as_str().as_bytes(),
        grant.resource.as_bytes(),
        grant.action.as_bytes(),
    ])
}

fn idem_cred_key(task: &TaskId, key: &str) -> Vec<u8> {
    cat(&[b"c", task.as_str().as_bytes(), key.as_bytes()])
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. On an existing store, the KEK must open the stored
    /// data keys; if it does not, this fails before writing anything.
    pub fn open(dir: &Path, kek: &Kek) -> Result<Self> {
        Self::open_with_cache(dir, kek, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store with sled's page cache bounded to about `cache_bytes` (`[store]
    /// cache_mb`). sled's accounting is approximate, so the process's RSS can exceed it.
    pub fn open_with_cache(dir: &Path, kek: &Kek, cache_bytes: u64) -> Result<Self> {
        // Check the KEK against a small file beside the store *before* opening sled: opening
        // sled may write (recovery), and a wrong key must leave the data directory untouched.
        let check = kek_check_path(dir);
        if let Ok(wrapped) = std::fs::read(&check) {
            kek.unwrap_key(KEK_CHECK_LABEL, &wrapped)?;
        }
        let db = open_sled(dir, cache_bytes).map_err(|e| {
            Error::Config(format!(
                "cannot open the data store in {}: {e} (is another broker using this data \
                     directory?)",
                dir.display()
            ))
        })?;
        let t = |name: &str| db.open_tree(name).map_err(st);
        let meta = t(META)?;
        let by_identity = t("by_identity")?;
        let secret_index = t("secret_index")?;
        let saved = meta
            .get(COUNTS_KEY)
            .map_err(st)?
            .and_then(|v| serde_json::from_slice::<SavedCounts>(&v).ok());
        let (tasks, credentials, approximate) = match saved {
            Some(c) if c.clean => (c.tasks, c.credentials, c.approximate),
            // After a crash: as of the last flush.
            Some(c) if c.flushed => (c.tasks, c.credentials, true),
            // On a store that never saved them as it flushed: count once.
            _ => (count_keys(&by_identity)?, count_keys(&secret_index)?, false),
        };
        if approximate {
            tracing::info!(
                tasks,
                credentials,
                "live counts carried over a crash (as of the last flush); counted again at the next normal close"
            );
        }
        // Unclean until this store closes normally.
        put_counts(&meta, tasks, credentials, false, approximate)?;
        db.flush().map_err(st)?;
        if !check.exists() {
            write_kek_check(&check, kek)?;
        }
        let (flushed, _) = watch::channel(0u64);
        let (failed, _) = watch::channel(None);
        let flush = Arc::new(Flush {
            stop: std::sync::atomic::AtomicBool::new(false),
            written: AtomicU64::new(0),
            kick: Mutex::new(false),
            cv: Condvar::new(),
            flushed,
            failed,
            fail_flushes: std::sync::atomic::AtomicBool::new(false),
            live_tasks: AtomicI64::new(tasks as i64),
            live_credentials: AtomicI64::new(credentials as i64),
            approximate: std::sync::atomic::AtomicBool::new(approximate),
        });
        let store = Self {
            tasks: t("tasks")?,
            credentials: t(CREDENTIALS)?,
            secret_index,
            expiry: t("expiry")?,
            by_task: t("by_task")?,
            by_identity,
            idempotency: t("idempotency")?,
            audit: t("audit")?,
            blocked: t("blocked")?,
            children: t("children")?,
            approvals: t("approvals")?,
            upstream: t("upstream")?,
            revocations: t("revocations")?,
            meta,
            local: Local::default(),
            flush: flush.clone(),
            db: db.clone(),
            flusher: Mutex::new(None),
        };
        let handle = std::thread::Builder::new()
            .name("jitbroker-flush".into())
            .spawn({
                let meta = store.meta.clone();
                move || flusher(db, meta, flush)
            })
            .map_err(Error::internal)?;
        *store.flusher.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(store)
    }

    /// Re-wraps every data key and the index key under `new`, and starts a new current data key
    /// (so new ciphertexts carry a new key id). Everything stored before stays readable; after
    /// this the old KEK opens nothing and can be retired. The broker must be stopped.
    pub fn rotate_kek(dir: &Path, old: &Kek, new: &Kek) -> Result<(u32, usize)> {
        let store = Self::open(dir, old)?;
        let meta = &store.meta;
        let mut rewrapped: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut max_id = 0u32;
        for item in meta.scan_prefix("dek/id/") {
            let (k, v) = item.map_err(st)?;
            let dek = old.unwrap_key(&k, &v)?;
            if let Some(id) = std::str::from_utf8(&k[7..])
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
            {
                max_id = max_id.max(id);
            }
            rewrapped.push((k.to_vec(), new.wrap(&k, &dek)?));
        }
        let wrapped_index = meta
            .get("index_key")
            .map_err(st)?
            .ok_or_else(|| Error::Storage("secret index key is missing".into()))?;
        let index_key = old.unwrap_key(b"index_key", &wrapped_index)?;
        rewrapped.push((b"index_key".to_vec(), new.wrap(b"index_key", &index_key)?));
        let new_id = max_id + 1;
        let label = format!("dek/id/{new_id}").into_bytes();
        rewrapped.push((label.clone(), new.wrap(&label, &random_key())?));
        let count = rewrapped.len();
        meta.transaction(|m| {
            for (k, v) in &rewrapped {
                m.insert(k.as_slice(), v.as_slice())?;
            }
            m.insert("dek/current", &new_id.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<Error>>(())
        })
        .map_err(tx_err)?;
        store.db.flush().map_err(st)?;
        let check = kek_check_path(dir);
        let tmp = check.with_extension("kek-check.new");
        let _ = std::fs::remove_file(&tmp);
        write_kek_check(&tmp, new)?;
        std::fs::rename(&tmp, &check)
            .map_err(|e| Error::Storage(format!("cannot replace {}: {e}", check.display())))?;
        Ok((new_id, count))
    }

    /// Opens the (closed) store once more and closes it, so sled records a fresh snapshot of
    /// where every page is. sled 0.34 writes that snapshot only while opening, and an open
    /// replays everything written to the log since the last snapshot: without this, a broker
    /// that ran for a while pays for all its writes on the next start (seconds for a store with
    /// a million credentials); with it, that cost moves to a graceful shutdown and the next
    /// start reads the snapshot. Returns how long the replay took. Needs no KEK: nothing is read.
    pub fn refresh_snapshot(dir: &Path, cache_bytes: u64) -> Result<std::time::Duration> {
        let t0 = std::time::Instant::now();
        let db = open_sled(dir, cache_bytes).map_err(|e| {
            Error::Storage(format!("reopening {} for a snapshot: {e}", dir.display()))
        })?;
        db.flush().map_err(st)?;
        drop(db);
        Ok(t0.elapsed())
    }

    /// Removes `key` from `tree`; when it was there and `live` counts that tree's entries,
    /// the count goes down with it.
    fn remove_counted(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        live: Option<&AtomicI64>,
    ) -> Result<()> {
        if tree.remove(key).map_err(st)?.is_some()
            && let Some(n) = live
        {
            n.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The first part of `create_credential`: the sealed record to store, after its index
    /// entries (secret, task, expiry, idempotency) are written. The record goes in last.
    fn write_credential_indexes(
        &self,
        rec: &CredentialRecord,
        secret: &SealedSecret,
    ) -> Result<StoredCredential> {
        let id = rec.id.as_str().as_bytes();
        let hash = secret.index;
        let stored = StoredCredential {
            record: rec.clone(),
            sealed: Some(secret.sealed.clone()),
            index: Some(hex::encode(hash)),
        };
        let by_task_key = cat(&[rec.task_id.as_str().as_bytes(), id]);
        let exp = expiry_key(rec.expires_at, &Expiring::Credential(rec.id.clone()));
        // 256-bit random secrets do not collide; if one does, refuse rather than alias.
        if self
            .secret_index
            .compare_and_swap(hash, None as Option<&[u8]>, Some(id))
            .map_err(st)?
            .is_err()
        {
            return Err(Error::Internal("secret index collision".into()));
        }
        self.flush.live_credentials.fetch_add(1, Ordering::SeqCst);
        self.by_task
            .insert(by_task_key.as_slice(), &[] as &[u8])
            .map_err(st)?;
        self.expiry
            .insert(exp.as_slice(), &[] as &[u8])
            .map_err(st)?;
        if let Some(k) = &rec.idempotency_key {
            self.idempotency
                .insert(idem_cred_key(&rec.task_id, k), id)
                .map_err(st)?;
        }
        Ok(stored)
    }

    /// What a crash in the middle of `create_credential` leaves: the index entries without
    /// the record (for tests of the readers).
    #[doc(hidden)]
    pub fn crash_after_credential_indexes(
        &self,
        rec: &CredentialRecord,
        secret: &SealedSecret,
    ) -> Result<()> {
        self.write_credential_indexes(rec, secret).map(|_| ())
    }

    fn load_stored(&self, id: &CredentialId) -> Result<Option<StoredCredential>> {
        get_record(&self.credentials, id.as_str(), "credential")
    }
}

const KEK_CHECK_LABEL: &[u8] = b"kek-check";

/// sled's page cache when nothing else is configured (`[store] cache_mb`'s default).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Opens sled in `dir`. A database closed a moment ago in this process may still hold its file
/// lock while sled's I/O threads let go of it, so a lock conflict is retried for up to a second;
/// a lock held by another process (another broker) still fails, after that second.
fn open_sled(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let mut attempts = 0;
    let segment = segment_size(dir);
    loop {
        let r = sled::Config::new()
            .path(dir)
            .segment_size(segment)
            .cache_capacity(cache_bytes)
            // Flushing is ours (group commit on every acknowledged write); no timer-driven flush.
            // (sled's timer thread is also where it cleans segments, but running it made no
            // measurable difference to the store's size under churn: BENCHMARKS.md.)
            .flush_every_ms(None)
            .open();
        match r {
            // sled reports the conflict as an `Other` I/O error naming the lock.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && attempts < 100 =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Opens the sled database in `dir` itself, with the segment size it was made with, for tools and
/// tests that read or change its trees directly while no broker runs. (`sled::open` would use
/// sled's default segment size, which sled refuses for a store made with another.)
#[doc(hidden)]
pub fn open_raw(dir: &Path) -> sled::Result<sled::Db> {
    open_sled(dir, DEFAULT_CACHE_BYTES)
}

/// sled's segment size (also its I/O buffer size) for a new store. sled 0.34 reuses a segment
/// only once every page fragment in it is dead, so under churn smaller segments die sooner:
/// 128 KiB instead of sled's 512 KiB left the store at 2.8–3.0× the live data instead of
/// 3.5–3.6× in the same churn run, for the same issuance rate (BENCHMARKS.md, Scale (c)).
const NEW_STORE_SEGMENT_BYTES: usize = 128 << 10;

/// The segment size to open `dir` with: what an existing store was created with (sled refuses
/// any other; it is in the store's `conf` file, and stores made before this choice have sled's
/// default), else [`NEW_STORE_SEGMENT_BYTES`].
fn segment_size(dir: &Path) -> usize {
    const SLED_DEFAULT: usize = 512 << 10;
    // The file ends with a binary checksum: read it as bytes.
    match std::fs::read(dir.join("conf")) {
        Ok(conf) => String::from_utf8_lossy(&conf)
            .lines()
            .find_map(|l| l.strip_prefix("segment_size: ")?.trim().parse().ok())
            .unwrap_or(SLED_DEFAULT),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NEW_STORE_SEGMENT_BYTES,
        Err(_) => SLED_DEFAULT,
    }
}

/// The number of keys in `tree`, counted over key ranges split by first byte on every core: the
/// recount after a crash is a scan of a million keys at a million live credentials, and it
/// happens before the broker is ready. (`secret_index` keys are uniform keyed hashes;
/// `by_identity` keys all start alike and land in one range, which is still correct.)
fn count_keys(tree: &sled::Tree) -> Result<u64> {
    let parts = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let bounds: Vec<u8> = (1..parts).map(|i| (i * 256 / parts) as u8).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts)
            .map(|i| {
                let lo = if i == 0 { None } else { Some(bounds[i - 1]) };
                let hi = bounds.get(i).copied();
                s.spawn(move || {
                    let mut n = 0u64;
                    let range = match (lo, hi) {
                        (None, None) => tree.iter(),
                        (None, Some(h)) => tree.range(..[h]),
                        (Some(l), None) => tree.range([l]..),
                        (Some(l), Some(h)) => tree.range([l]..[h]),
                    };
                    for item in range.keys() {
                        item.map_err(st)?;
                        n += 1;
                    }
                    Ok::<u64, Error>(n)
                })
            })
            .collect();
        handles.into_iter().try_fold(0u64, |acc, h| {
            let n = h
                .join()
                .map_err(|_| Error::Internal("a counting thread panicked".into()))??;
            Ok(acc + n)
        })
    })
}

fn put_counts(
    meta: &sled::Tree,
    tasks: u64,
    credentials: u64,
    clean: bool,
    approximate: bool,
) -> Result<()> {
    let v = enc(&SavedCounts {
        tasks,
        credentials,
        clean,
        flushed: true,
        approximate,
    })?;
    meta.insert(COUNTS_KEY, v).map_err(st)?;
    Ok(())
}

/// `<data>/db` → `<data>/db.kek-check`: a random value wrapped by the KEK, which tells a wrong KEK
/// before sled is opened.
fn kek_check_path(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".kek-check");
    dir.with_file_name(name)
}

fn write_kek_check(path: &Path, kek: &Kek) -> Result<()> {
    super::crypto::write_new_private_file(path, &kek.wrap(KEK_CHECK_LABEL, &random_key())?)
}

fn flusher(db: sled::Db, meta: sled::Tree, f: Arc<Flush>) {
    let mut saved = None;
    loop {
        {
            let mut kicked = f.kick.lock().unwrap_or_else(|p| p.into_inner());
            while !*kicked {
                if f.stop.load(Ordering::SeqCst) {
                    return; // the store is being dropped; it flushes once more itself
                }
                kicked = f.cv.wait(kicked).unwrap_or_else(|p| p.into_inner());
            }
            *kicked = false;
        }
        // Every ticket taken before this load was taken after its write, so one flush covers it.
        let target = f.written.load(Ordering::SeqCst);
        // The counts go into the log ahead of the flush, so a crash finds them as of it.
        let counts = f.counts();
        if saved != Some(counts) {
            let (t, c) = counts;
            let approximate = f.approximate.load(Ordering::SeqCst);
            match put_counts(&meta, t, c, false, approximate) {
                Ok(()) => saved = Some(counts),
                Err(e) => tracing::warn!(error = %e, "saving the live counts failed"),
            }
        }
        let flushed = if f.fail_flushes.load(Ordering::SeqCst) {
            Err("flush refused by the test".to_owned())
        } else {
            db.flush().map(|_| ()).map_err(|e| e.to_string())
        };
        match flushed {
            Ok(()) => {
                f.flushed.send_replace(target);
                f.failed.send_replace(None);
            }
            Err(e) => {
                // Fail closed: nobody is told "done" until a flush succeeds, and whoever waits for
                // this one is told it failed rather than left waiting.
                tracing::error!(error = %e, "flushing the data store failed; retrying");
                f.failed.send_replace(Some((target, e)));
                *f.kick.lock().unwrap_or_else(|p| p.into_inner()) = true;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

impl Flush {
    /// (live tasks, live credentials) as kept (never below zero).
    fn counts(&self) -> (u64, u64) {
        let n = |a: &AtomicI64| a.load(Ordering::SeqCst).max(0) as u64;
        (n(&self.live_tasks), n(&self.live_credentials))
    }
}

impl LocalEngine for SledStore {
    fn local(&self) -> &Local {
        &self.local
    }

    fn create_task(&self, task: &Task) -> Result<()> {
        let v = enc(task)?;
        let id = task.id.as_str().as_bytes();
        let ident = cat(&[task.owner.as_str().as_bytes(), id]);
        let exp = expiry_key(task.expires_at, &Expiring::Task(task.id.clone()));
        let idem = task
            .idempotency_key
            .as_ref()
            .map(|k| idem_task_key(&task.owner, k));
        let child = task
            .parent
            .as_ref()
            .map(|p| cat(&[p.as_str().as_bytes(), id]));
        // Index entries first, the record last (see the module comment on write order).
        if let Some(c) = &child {
            self.children
                .insert(c.as_slice(), &[] as &[u8])
                .map_err(st)?;
        }
        if self
            .by_identity
            .insert(ident.as_slice(), &[] as &[u8])
            .map_err(st)?
            .is_none()
        {
            self.flush.live_tasks.fetch_add(1, Ordering::SeqCst);
        }
        self.expiry
            .insert(exp.as_slice(), &[] as &[u8])
            .map_err(st)?;
        if let Some(k) = &idem {
            self.idempotency.insert(k.as_slice(), id).map_err(st)?;
        }
        self.tasks.insert(id, v).map_err(st)?;
        Ok(())
    }

    fn update_task(&self, task: &Task) -> Result<()> {
        let v = enc(task)?;
        let id = task.id.as_str().as_bytes();
        let ident = cat(&[task.owner.as_str().as_bytes(), id]);
        let ended = task.state != TaskState::Active;
        if let Some(at) = task.purge_at.filter(|_| ended) {
            // Before the record: a purge entry for a task still active is skipped when due.
            self.expiry
                .insert(
                    expiry_key(at, &Expiring::Purge(task.id.clone())),
                    &[] as &[u8],
                )
                .map_err(st)?;
        }
        self.tasks.insert(id, v).map_err(st)?;
        if ended {
            // by_identity lists live tasks only: quotas and the kill switch scan it (and check
            // each task's state, so an entry a crash left behind is harmless).
            self.remove_counted(&self.by_identity, &ident, Some(&self.flush.live_tasks))?;
        }
        Ok(())
    }

    fn purge_task(&self, id: &TaskId) -> Result<bool> {
        let task: Option<Task> = self.get_task(id)?;
        if task.as_ref().is_some_and(|t| t.state == TaskState::Active) {
            // Only ended tasks are purged (an entry can outlive a write a crash cut short).
            return Ok(false);
        }
        let tid = id.as_str().as_bytes();
        let prefix = cat(&[tid, b""]);
        // Removed key by key in this order (no batch: each sled batch seals the log buffer
        // twice): for each credential its index entries, its record, and last the by_task
        // entry through which a repeated purge finds it; then the task's entries, and the task
        // record at the very end, so an interrupted purge is found and finished again.
        let mut removals: Vec<(&sled::Tree, Vec<u8>, Option<&AtomicI64>)> = Vec::new();
        for item in self.by_task.scan_prefix(&prefix) {
            let (k, _) = item.map_err(st)?;
            let cid = CredentialId::parse(&String::from_utf8_lossy(&k[prefix.len()..]))?;
            if let Some(c) = self.load_stored(&cid)? {
                let rec = &c.record;
                removals.push((
                    &self.expiry,
                    expiry_key(rec.expires_at, &Expiring::Credential(cid.clone())),
                    None,
                ));
                if let Some(key) = &rec.idempotency_key {
                    removals.push((&self.idempotency, idem_cred_key(id, key), None));
                }
                if let Some(h) = c.index.as_deref().and_then(|h| hex::decode(h).ok()) {
                    // Only an ended task is purged, so this is normally gone already.
                    removals.push((&self.secret_index, h, Some(&self.flush.live_credentials)));
                }
            }
            removals.push((&self.credentials, cid.as_str().as_bytes().to_vec(), None));
            removals.push((&self.by_task, k.to_vec(), None));
        }
        for item in self.children.scan_prefix(&prefix) {
            let (k, _) = item.map_err(st)?;
            removals.push((&self.children, k.to_vec(), None));
        }
        // The task's approvals: by grant (the current ones) and by task (every one, replaced
        // ones included; stores written before that index have only the first).
        for index in [b"a".as_slice(), b"A".as_slice()] {
            for item in self.idempotency.scan_prefix(cat(&[index, tid, b""])) {
                let (k, v) = item.map_err(st)?;
                removals.push((&self.approvals, v.to_vec(), None));
                removals.push((&self.idempotency, k.to_vec(), None));
            }
        }
        if let Some(t) = &task {
            removals.push((
                &self.expiry,
                expiry_key(t.expires_at, &Expiring::Task(id.clone())),
                None,
            ));
            if let Some(key) = &t.idempotency_key {
                removals.push((&self.idempotency, idem_task_key(&t.owner, key), None));
            }
            if let Some(p) = &t.parent {
                removals.push((&self.children, cat(&[p.as_str().as_bytes(), tid]), None));
            }
            removals.push((
                &self.by_identity,
                cat(&[t.owner.as_str().as_bytes(), tid]),
                Some(&self.flush.live_tasks),
            ));
        }
        for (tree, key, live) in removals {
            self.remove_counted(tree, &key, live)?;
        }
        self.tasks.remove(tid).map_err(st)?;
        Ok(task.is_some())
    }

    fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
        get_record(&self.tasks, id.as_str(), "task")
    }

    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Result<Option<TaskId>> {
        get_ref(&self.idempotency, idem_task_key(owner, key), TaskId::parse)
    }

    fn tasks_of_identity(&self, owner: &SpiffeId) -> Result<Vec<TaskId>> {
        ids_under(&self.by_identity, owner.as_str(), TaskId::parse)
    }

    fn create_credential(&self, rec: &CredentialRecord, secret: &SealedSecret) -> Result<()> {
        let stored = self.write_credential_indexes(rec, secret)?;
        self.credentials
            .insert(rec.id.as_str().as_bytes(), enc(&stored)?)
            .map_err(st)?;
        Ok(())
    }

    fn update_credential(&self, rec: &CredentialRecord) -> Result<()> {
        let id = rec.id.as_str().as_bytes();
        let mut stored = self
            .load_stored(&rec.id)?
            .ok_or_else(|| Error::Storage(format!("credential {} vanished", rec.id)))?;
        let drop_index = if rec.state != CredentialState::Active {
            stored.sealed = None;
            stored.index.take()
        } else {
            None
        };
        stored.record = rec.clone();
        let v = enc(&stored)?;
        let index_key = drop_index
            .map(|h| hex::decode(h).map_err(|_| Error::Storage("corrupt index hash".into())))
            .transpose()?;
        // The record (ended, its sealed secret gone) first, then the index entry: in between,
        // a lookup by secret finds an ended credential, which is refused like no credential.
        self.credentials.insert(id, v).map_err(st)?;
        if let Some(k) = &index_key {
            self.remove_counted(&self.secret_index, k, Some(&self.flush.live_credentials))?;
        }
        Ok(())
    }

    fn get_credential(&self, id: &CredentialId) -> Result<Option<CredentialRecord>> {
        Ok(self.load_stored(id)?.map(|s| s.record))
    }

    fn credential_sealed(&self, id: &CredentialId) -> Result<Option<Vec<u8>>> {
        Ok(self.load_stored(id)?.and_then(|s| s.sealed))
    }

    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Result<Option<CredentialId>> {
        get_ref(
            &self.idempotency,
            idem_cred_key(task, key),
            CredentialId::parse,
        )
    }

    fn credential_by_index(&self, index: &[u8; 32]) -> Result<Option<CredentialId>> {
        get_ref(&self.secret_index, index, CredentialId::parse)
    }

    fn credentials_of_task(&self, task: &TaskId) -> Result<Vec<CredentialId>> {
        ids_under(&self.by_task, task.as_str(), CredentialId::parse)
    }

    fn due(&self, now: UnixMillis, limit: usize) -> Result<Vec<(UnixMillis, Expiring)>> {
        let end = ((now.max(0) as u64) + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.expiry.range(..end.as_slice()).take(limit) {
            let (k, _) = item.map_err(st)?;
            match parse_expiry_key(&k) {
                Ok(e) => out.push(e),
                Err(e) => {
                    // An entry nothing can act on would stop the reaper at the head of the
                    // index for good. Readers check expiry themselves, so dropping it loses
                    // only bookkeeping; say so loudly.
                    tracing::error!(error = %e, key = %hex::encode(&k[..k.len().min(64)]), "removing an unreadable expiry index entry");
                    self.expiry.remove(&k).map_err(st)?;
                }
            }
        }
        Ok(out)
    }

    fn next_due(&self) -> Result<Option<UnixMillis>> {
        match self.expiry.first().map_err(st)? {
            // The time is readable even when the rest is not; `due` removes such entries.
            Some((k, _)) if k.len() >= 8 => Ok(Some(u64::from_be_bytes(
                k[..8]
                    .try_into()
                    .map_err(|_| Error::Storage("expiry key".into()))?,
            ) as i64)),
            Some(_) => Ok(Some(0)),
            None => Ok(None),
        }
    }

    fn remove_due(&self, at: UnixMillis, what: &Expiring) -> Result<()> {
        self.expiry.remove(expiry_key(at, what)).map_err(st)?;
        Ok(())
    }

    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key).map_err(st)?.map(|v| v.to_vec()))
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.meta.insert(key, value).map_err(st)?;
        Ok(())
    }

    fn meta_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        match self
            .meta
            .compare_and_swap(key, expected, Some(value))
            .map_err(st)?
        {
            Ok(()) => Ok(expected.map(<[u8]>::to_vec)),
            Err(e) => Ok(e.current.map(|v| v.to_vec())),
        }
    }

    fn children_of(&self, task: &TaskId) -> Result<Vec<TaskId>> {
        ids_under(&self.children, task.as_str(), TaskId::parse)
    }

    fn put_approval(&self, a: &Approval) -> Result<()> {
        let v = enc(a)?;
        let grant_key = approval_grant_key(&a.task_id, &a.grant);
        let id = a.id.as_str().as_bytes();
        // Every approval of the task, kept when a newer request replaces it as its grant's
        // current one: a purge finds them all through it.
        let task_key = cat(&[b"A", a.task_id.as_str().as_bytes(), id]);
        (&self.approvals, &self.idempotency)
            .transaction(|(approvals, index)| {
                approvals.insert(id, v.as_slice())?;
                index.insert(grant_key.as_slice(), id)?;
                index.insert(task_key.as_slice(), id)?;
                Ok(())
            })
            .map_err(tx_err)
    }

    fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>> {
        get_record(&self.approvals, id.as_str(), "approval")
    }

    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Result<Option<ApprovalId>> {
        get_ref(
            &self.idempotency,
            approval_grant_key(task, grant),
            ApprovalId::parse,
        )
    }

    fn list_approvals(&self) -> Result<Vec<Approval>> {
        values(self.approvals.iter(), "approval")
    }

    fn put_upstream(&self, o: &UpstreamObject) -> Result<()> {
        self.upstream
            .insert(upstream_key(&o.resource, &o.name), enc(o)?)
            .map_err(st)?;
        Ok(())
    }

    fn upstream_objects(&self) -> Result<Vec<UpstreamObject>> {
        values(self.upstream.iter(), "upstream object")
    }

    fn queue_revocation(&self, r: &Revocation) -> Result<()> {
        let key = upstream_key(&r.resource, &r.name);
        let v = enc(r)?;
        (&self.upstream, &self.revocations)
            .transaction(|(upstream, revocations)| {
                upstream.remove(key.as_slice())?;
                revocations.insert(key.as_slice(), v.as_slice())?;
                Ok(())
            })
            .map_err(tx_err)
    }

    fn update_revocation(&self, r: &Revocation) -> Result<()> {
        // Only while it is queued: a revocation another worker finished stays finished.
        let v = enc(r)?;
        self.revocations
            .update_and_fetch(upstream_key(&r.resource, &r.name), |old| {
                old.map(|_| v.clone())
            })
            .map_err(st)?;
        Ok(())
    }

    fn remove_revocation(&self, resource: &str, name: &str) -> Result<bool> {
        Ok(self
            .revocations
            .remove(upstream_key(resource, name))
            .map_err(st)?
            .is_some())
    }

    fn revocations(&self) -> Result<Vec<Revocation>> {
        values(self.revocations.iter(), "revocation")
    }

    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Result<Vec<Task>> {
        let iter = match after {
            Some(a) => self.tasks.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_str().as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.tasks.iter(),
        };
        values(iter.take(limit), "task")
    }

    fn set_blocked(&self, id: &SpiffeId, blocked: bool) -> Result<bool> {
        let before = if blocked {
            self.blocked.insert(id.as_str(), &[] as &[u8])
        } else {
            self.blocked.remove(id.as_str())
        }
        .map_err(st)?;
        Ok(before.is_some())
    }

    fn blocked_identities(&self) -> Result<Vec<SpiffeId>> {
        let mut out = Vec::new();
        for item in self.blocked.iter() {
            let (k, _) = item.map_err(st)?;
            out.push(SpiffeId::parse("blocked", &String::from_utf8_lossy(&k))?);
        }
        Ok(out)
    }

    fn audit_last(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.audit.last().map_err(st)?.map(|(_, v)| v.to_vec()))
    }

    fn audit_put(&self, seq: u64, entry: &[u8]) -> Result<()> {
        self.audit.insert(seq.to_be_bytes(), entry).map_err(st)?;
        Ok(())
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.audit
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(st)?;
                let seq = u64::from_be_bytes(
                    k.as_ref()
                        .try_into()
                        .map_err(|_| Error::Storage("corrupt audit key".into()))?,
                );
                Ok((seq, v.to_vec()))
            })
            .collect()
    }

    fn audit_remove_through(&self, seq: u64) -> Result<u64> {
        let mut n = 0;
        loop {
            // Bounded batches, so a large backlog never builds one huge batch in memory.
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for item in self.audit.range(..=seq.to_be_bytes()).take(4096) {
                let (k, _) = item.map_err(st)?;
                batch.remove(k);
                in_batch += 1;
            }
            if in_batch == 0 {
                return Ok(n);
            }
            self.audit.apply_batch(batch).map_err(st)?;
            n += in_batch;
        }
    }

    fn counts(&self) -> Result<Counts> {
        let (tasks, credentials) = self.flush.counts();
        Ok(Counts { tasks, credentials })
    }

    fn durable(&self) -> Fut<'_, ()> {
        Box::pin(async move {
            let ticket = self.flush.written.fetch_add(1, Ordering::SeqCst) + 1;
            let mut rx = self.flush.flushed.subscribe();
            let mut failed = self.flush.failed.subscribe();
            failed.mark_unchanged();
            {
                *self.flush.kick.lock().unwrap_or_else(|p| p.into_inner()) = true;
                self.flush.cv.notify_one();
            }
            let wait = async {
                loop {
                    if *rx.borrow_and_update() >= ticket {
                        return Ok(());
                    }
                    if let Some((covered, why)) = &*failed.borrow_and_update()
                        && *covered >= ticket
                    {
                        return Err(Error::Unavailable(format!(
                            "the data store could not be written to disk ({why}); the change may \
                             not be durable: is the disk full or failing?"
                        )));
                    }
                    tokio::select! {
                        r = rx.changed() => r.map_err(|_| Error::Storage("the flusher stopped".into()))?,
                        r = failed.changed() => r.map_err(|_| Error::Storage("the flusher stopped".into()))?,
                    }
                }
            };
            tokio::time::timeout(FLUSH_WAIT, wait).await.map_err(|_| {
                Error::Unavailable(format!(
                    "the data store was not written to disk within {} s; the change may not be \
                     durable: is the disk full or failing?",
                    FLUSH_WAIT.as_secs()
                ))
            })?
        })
    }
}

impl SledStore {
    /// Makes every flush fail (`true`) or work again, as a full or failing disk would.
    #[cfg(test)]
    pub(crate) fn fail_flushes_for_tests(&self, fail: bool) {
        self.flush.fail_flushes.store(fail, Ordering::SeqCst);
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Stop the flusher (it holds a handle on the database, whose file lock must be released
        // for the same directory to be opened again), then flush what is left.
        self.flush.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.flush.kick.lock().unwrap_or_else(|p| p.into_inner());
            self.flush.cv.notify_all();
        }
        if let Some(h) = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        // Nothing writes any more: the counts are exact (counted again if they were carried
        // over a crash), and saved as such for the next open.
        let exact = if self.flush.approximate.load(Ordering::SeqCst) {
            count_keys(&self.by_identity)
                .and_then(|t| Ok((t, count_keys(&self.secret_index)?)))
                .ok()
        } else {
            Some(self.flush.counts())
        };
        if let Some((tasks, credentials)) = exact {
            let _ = put_counts(&self.meta, tasks, credentials, true, false);
        }
        let _ = self.db.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;
    use crate::store::Storage;
    use crate::store::test_records::{credential, task};

    /// The sealing layer over `s` (creating the data keys on a new store).
    async fn storage(s: &Arc<SledStore>, kek: &Kek) -> Storage {
        Storage::open(s.clone() as Arc<dyn crate::store::Store>, kek)
            .await
            .unwrap()
    }

    /// `id`'s secret opens as `secret`, and `secret` finds `id`.
    async fn assert_sealed(storage: &Storage, id: &CredentialId, secret: &str) {
        assert_eq!(
            storage
                .credential_secret(id)
                .await
                .unwrap()
                .unwrap()
                .expose(),
            secret
        );
        assert_eq!(
            storage.credential_by_secret(secret).await.unwrap(),
            Some(id.clone())
        );
    }

    /// A sealed secret for tests that never open it.
    fn opaque_secret(n: u8) -> SealedSecret {
        SealedSecret {
            sealed: b"x".to_vec(),
            index: [n; 32],
        }
    }

    #[tokio::test]
    async fn a_failing_flush_is_an_error_for_its_waiters_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let s = SledStore::open(&dir.path().join("db"), &kek).unwrap();
        s.fail_flushes_for_tests(true);
        s.create_task(&task("spiffe://x/a", 5_000)).unwrap();
        let waiters = futures::future::join_all((0..3).map(|_| s.durable())).await;
        for r in waiters {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Unavailable(_)), "{err}");
            assert!(err.to_string().contains("disk"), "{err}");
        }
        s.fail_flushes_for_tests(false);
        s.create_task(&task("spiffe://x/b", 5_000)).unwrap();
        s.durable().await.unwrap();
    }

    #[tokio::test]
    async fn round_trip_index_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let s = Arc::new(SledStore::open(&dir.path().join("db"), &kek).unwrap());
        let storage = storage(&s, &kek).await;
        let t = task("spiffe://x/a", 5_000);
        s.create_task(&t).unwrap();
        assert_eq!(
            s.task_by_idempotency_key(&t.owner, "k1").unwrap(),
            Some(t.id.clone())
        );
        assert_eq!(s.tasks_of_identity(&t.owner).unwrap(), vec![t.id.clone()]);
        let rec = credential(&t);
        let sealed = storage
            .seal_secret(&rec.id, &Secret::new("jbt_abc".into()))
            .unwrap();
        s.create_credential(&rec, &sealed).unwrap();
        s.durable().await.unwrap();
        assert_sealed(&storage, &rec.id, "jbt_abc").await;
        let due = s.due(2_000, 10).unwrap();
        assert_eq!(due, vec![(2_000, Expiring::Credential(rec.id.clone()))]);
        assert_eq!(s.next_due().unwrap(), Some(2_000));
        let mut dead = rec.clone();
        dead.state = CredentialState::Revoked;
        s.update_credential(&dead).unwrap();
        assert_eq!(storage.credential_by_secret("jbt_abc").await.unwrap(), None);
        assert!(storage.credential_secret(&rec.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn kek_rotation_keeps_data_readable_and_retires_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = Kek::create(&dir.path().join("old")).unwrap();
        let db = dir.path().join("db");
        let t = task("spiffe://x/a", 5_000);
        let rec = credential(&t);
        {
            let s = Arc::new(SledStore::open(&db, &old).unwrap());
            let storage = storage(&s, &old).await;
            let sealed = storage
                .seal_secret(&rec.id, &Secret::new("jbt_before".into()))
                .unwrap();
            s.create_credential(&rec, &sealed).unwrap();
            s.durable().await.unwrap();
        }
        let new = Kek::create(&dir.path().join("new")).unwrap();
        let (id, _) = SledStore::rotate_kek(&db, &old, &new).unwrap();
        assert_eq!(id, 2);
        assert!(
            SledStore::open(&db, &old).is_err(),
            "the old KEK is retired"
        );
        let s = Arc::new(SledStore::open(&db, &new).unwrap());
        let storage = storage(&s, &new).await;
        assert_sealed(&storage, &rec.id, "jbt_before").await;
        let mut rec2 = rec.clone();
        rec2.id = CredentialId::generate();
        let sealed = storage
            .seal_secret(&rec2.id, &Secret::new("jbt_after".into()))
            .unwrap();
        s.create_credential(&rec2, &sealed).unwrap();
        let stored: StoredCredential =
            dec("c", &s.credentials.get(rec2.id.as_str()).unwrap().unwrap()).unwrap();
        let sealed = stored.sealed.unwrap();
        assert_eq!(
            u32::from_be_bytes(sealed[1..5].try_into().unwrap()),
            2,
            "new key id"
        );
    }

    #[tokio::test]
    async fn a_refreshed_snapshot_covers_everything_written() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let db_dir = dir.path().join("db");
        let snapshot_lsn = || {
            std::fs::read_dir(&db_dir)
                .unwrap()
                .filter_map(|e| {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    let hex = name.strip_prefix("snap.")?.to_owned();
                    u64::from_str_radix(&hex, 16).ok()
                })
                .max()
                .unwrap_or(0)
        };
        let t = task("spiffe://td/agent/a", 1_000);
        {
            let store = SledStore::open(&db_dir, &kek).unwrap();
            for _ in 0..200 {
                store
                    .create_task(&task("spiffe://td/agent/a", 1_000))
                    .unwrap();
            }
            store.create_task(&t).unwrap();
            store.durable().await.unwrap();
        }
        let before = snapshot_lsn();
        SledStore::refresh_snapshot(&db_dir, DEFAULT_CACHE_BYTES).unwrap();
        let after = snapshot_lsn();
        assert!(after > before, "snapshot at {after:x}, was {before:x}");
        // The store opens as before, with everything in it.
        let store = SledStore::open(&db_dir, &kek).unwrap();
        assert_eq!(store.get_task(&t.id).unwrap().unwrap().id, t.id);
    }

    #[test]
    fn counting_by_ranges_counts_every_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .temporary(true)
            .path(dir.path())
            .open()
            .unwrap();
        let tree = db.open_tree("t").unwrap();
        assert_eq!(count_keys(&tree).unwrap(), 0);
        let mut keys: Vec<Vec<u8>> =
            vec![vec![], vec![0], vec![0x7f, 1], vec![0x80], vec![0xff; 3]];
        keys.extend((0..5000).map(|_| rand::random::<[u8; 32]>().to_vec()));
        for k in &keys {
            tree.insert(k.as_slice(), &[] as &[u8]).unwrap();
        }
        assert_eq!(count_keys(&tree).unwrap(), tree.len() as u64);
        assert_eq!(count_keys(&tree).unwrap(), 5005);
    }

    #[test]
    fn counts_follow_every_write_and_survive_a_restart_or_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let db_dir = dir.path().join("db");
        let counts = |s: &SledStore| {
            let c = s.counts().unwrap();
            (c.tasks, c.credentials)
        };
        {
            let store = SledStore::open(&db_dir, &kek).unwrap();
            let tasks: Vec<Task> = (0..3).map(|_| task("spiffe://td/agent/a", 1_000)).collect();
            for t in &tasks {
                store.create_task(t).unwrap();
            }
            let creds: Vec<CredentialRecord> = (0..2).map(|_| credential(&tasks[0])).collect();
            for (i, c) in creds.iter().enumerate() {
                store.create_credential(c, &opaque_secret(i as u8)).unwrap();
            }
            assert_eq!(counts(&store), (3, 2));
            let mut ended = tasks[1].clone();
            ended.state = TaskState::Completed;
            ended.ended_at = Some(10);
            store.update_task(&ended).unwrap();
            store.update_task(&ended).unwrap(); // again: no double count
            let mut c = creds[0].clone();
            c.state = CredentialState::Revoked;
            store.update_credential(&c).unwrap();
            assert_eq!(counts(&store), (2, 1));
            // Purging the ended task changes nothing live.
            store.purge_task(&ended.id).unwrap();
            assert_eq!(counts(&store), (2, 1));
            assert_eq!(
                (
                    store.by_identity.len() as u64,
                    store.secret_index.len() as u64
                ),
                (2, 1)
            );
        }
        // A clean close saves them; the next open reads them.
        {
            let store = SledStore::open(&db_dir, &kek).unwrap();
            assert_eq!(counts(&store), (2, 1));
        }
        // What a crash leaves in `meta`, written into the stopped store.
        let crashed_with = |saved: SavedCounts| {
            let db = open_sled(&db_dir, DEFAULT_CACHE_BYTES).unwrap();
            db.open_tree(META)
                .unwrap()
                .insert(COUNTS_KEY, serde_json::to_vec(&saved).unwrap())
                .unwrap();
            db.flush().unwrap();
        };
        // A crash leaves them marked unclean (here: wrong as well): the next open recounts.
        crashed_with(SavedCounts {
            tasks: 99,
            credentials: 99,
            clean: false,
            flushed: false,
            approximate: false,
        });
        let store = SledStore::open(&db_dir, &kek).unwrap();
        assert_eq!(counts(&store), (2, 1));
        drop(store);
        // Every flush saves them (unclean); a start after a crash takes those and does not
        // count: here they are made wrong on purpose to show that they were taken.
        {
            let store = SledStore::open(&db_dir, &kek).unwrap();
            store
                .create_task(&task("spiffe://td/agent/b", 1_000))
                .unwrap();
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(store.durable())
                .unwrap();
            let saved: SavedCounts =
                serde_json::from_slice(&store.meta.get(COUNTS_KEY).unwrap().unwrap()).unwrap();
            assert_eq!(
                (saved.tasks, saved.credentials, saved.clean, saved.flushed),
                (3, 1, false, true)
            );
        }
        crashed_with(SavedCounts {
            tasks: 7,
            credentials: 5,
            clean: false,
            flushed: true,
            approximate: false,
        });
        let store = SledStore::open(&db_dir, &kek).unwrap();
        assert_eq!(counts(&store), (7, 5), "carried over, not counted");
        assert!(store.flush.approximate.load(Ordering::SeqCst));
        drop(store);
        // The normal close after it counted again.
        let store = SledStore::open(&db_dir, &kek).unwrap();
        assert_eq!(counts(&store), (3, 1));
        assert!(!store.flush.approximate.load(Ordering::SeqCst));
    }

    /// A new store takes the smaller segment; a store made with sled's default keeps it (sled
    /// refuses to open a store with another segment size).
    #[tokio::test]
    async fn segment_size_new_stores_small_old_stores_as_made() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let conf_of = |db: &Path| {
            String::from_utf8_lossy(&std::fs::read(db.join("conf")).unwrap()).into_owned()
        };
        let new = dir.path().join("new");
        drop(SledStore::open(&new, &kek).unwrap());
        assert!(
            conf_of(&new).contains("segment_size: 131072"),
            "{}",
            conf_of(&new)
        );
        let old = dir.path().join("old");
        drop(sled::Config::new().path(&old).open().unwrap());
        assert!(conf_of(&old).contains("segment_size: 524288"));
        let t = task("spiffe://td/agent/a", 1_000);
        {
            let store = SledStore::open(&old, &kek).unwrap();
            store.create_task(&t).unwrap();
        }
        let store = SledStore::open(&old, &kek).unwrap();
        assert_eq!(store.get_task(&t.id).unwrap().unwrap().id, t.id);
        assert!(conf_of(&old).contains("segment_size: 524288"));
    }

    #[tokio::test]
    async fn wrong_kek_fails_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        {
            // Creates the kek-check file and the data keys.
            let s = Arc::new(SledStore::open(&dir.path().join("db"), &kek).unwrap());
            drop(storage(&s, &kek).await);
        }
        let other = Kek::create(&dir.path().join("other")).unwrap();
        let err = SledStore::open(&dir.path().join("db"), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("other"), "{err}");
        // The right key still opens it and its data keys: nothing was overwritten.
        let s = Arc::new(SledStore::open(&dir.path().join("db"), &kek).unwrap());
        drop(storage(&s, &kek).await);
    }
}
