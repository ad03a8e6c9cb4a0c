//! The tamper-evident audit trail (DESIGN §9).
//!
//! Every decision, issuance, revocation, approval, admin action and authentication failure is
//! appended to a hash chain: entry *n* stores `hash = SHA-256(prev_hash ‖ canonical entry)`, where
//! the canonical entry is the entry's JSON without its `hash` field, with keys in a fixed order.
//! Modifying, removing or reordering any entry breaks the chain at that sequence number. Each
//! entry is also emitted as a JSON log line (target `jitbroker::audit`). Secrets never appear:
//! events carry ids, names, decisions and reasons only.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::UnixMillis;
use crate::store::Store;

pub mod archive;

/// Hash that precedes the first entry.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// One audit event. Optional fields are left out of the JSON when empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// `decision`, `task_started`, `credential_issued`, `credential_revoked`, `task_ended`,
    /// `approval_requested`, `approval_granted`, `approval_denied`, `admin`, `auth_failed`…
    /// A `credential_issued` entry also carries the decision that allowed it (`decision`,
    /// `policies`, `reason`): an issuance is one entry. A decision that issues nothing is a
    /// `decision` entry of its own.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Declared intent of the task, recorded beside the action taken.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub purpose: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation_chain: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A stored entry: the event plus its place in the chain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub time: UnixMillis,
    #[serde(flatten)]
    pub event: Event,
    pub prev_hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Entry {
    /// The bytes that are hashed: the entry's JSON without `hash`.
    fn canonical(&self) -> Result<Vec<u8>> {
        let mut e = self.clone();
        e.hash.clear();
        serde_json::to_vec(&e).map_err(Error::internal)
    }

    fn compute_hash(&self, prev: &[u8; 32]) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(self.canonical()?);
        Ok(h.finalize().into())
    }
}

/// Result of checking the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    pub entries: u64,
    /// The first sequence number at which the chain does not hold (0 when ok).
    pub first_bad_seq: u64,
    pub reason: String,
}

/// The head of the chain as an engine keeps it: the sequence number the next entry gets and the
/// hash it links to. Engines append under a lock on it (in-process engines) or on its row.
#[derive(Clone, Debug)]
pub struct Head {
    next: u64,
    prev: [u8; 32],
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl Head {
    /// Resumes after the last stored entry, or after the archive checkpoint when every stored
    /// entry was archived (the raw `meta` value of [`archive::CHECKPOINT_KEY`]).
    pub fn resume(last: Option<&[u8]>, checkpoint: Option<&[u8]>) -> Result<Self> {
        let (mut next, mut prev) = match last {
            Some(bytes) => {
                let e: Entry = serde_json::from_slice(bytes)
                    .map_err(|e| Error::Storage(format!("corrupt last audit entry: {e}")))?;
                let h = parse_hash(&e.hash)
                    .ok_or_else(|| Error::Storage("corrupt last audit entry hash".into()))?;
                let next = e.seq.checked_add(1).ok_or_else(|| {
                    Error::Storage(format!("corrupt last audit entry: sequence {}", e.seq))
                })?;
                (next, h)
            }
            None => (1, GENESIS),
        };
        if let Some(cp) = checkpoint.map(archive::parse_checkpoint).transpose()?
            && cp.seq + 1 > next
        {
            (next, prev) = archive::head_of(Some(&cp))?;
        }
        Ok(Self { next, prev })
    }

    /// A head kept by an engine as (next sequence number, hash of the last entry).
    pub fn from_parts(next: u64, prev: [u8; 32]) -> Self {
        Self { next, prev }
    }

    /// What [`Head::from_parts`] takes back.
    pub fn parts(&self) -> (u64, [u8; 32]) {
        (self.next, self.prev)
    }

    /// The next entry for `event` at `time`: its sequence number, its bytes, and its hash (pass
    /// it to [`Head::advance`] once the entry is stored).
    pub fn entry(&self, time: UnixMillis, event: Event) -> Result<(u64, Vec<u8>, [u8; 32])> {
        let mut entry = Entry {
            seq: self.next,
            time,
            event,
            prev_hash: hex::encode(self.prev),
            hash: String::new(),
        };
        let hash = entry.compute_hash(&self.prev)?;
        entry.hash = hex::encode(hash);
        let bytes = serde_json::to_vec(&entry).map_err(Error::internal)?;
        Ok((self.next, bytes, hash))
    }

    /// Moves past the entry just stored.
    pub fn advance(&mut self, hash: [u8; 32]) {
        self.next += 1;
        self.prev = hash;
    }

    /// The last entry's sequence number and hash: `(0, GENESIS)` before the first entry.
    pub fn head(&self) -> Anchor {
        Anchor {
            seq: self.next - 1,
            hash: hex::encode(self.prev),
        }
    }
}

/// Entries read from the store per page: small enough that reading and checking one page (a
/// few milliseconds) does not hold up the requests sharing its worker thread.
const PAGE: usize = 512;

/// Feeds every stored entry from `from` on, in order, to `f`, a page at a time.
pub(crate) async fn scan_all(
    store: &dyn Store,
    from: u64,
    f: &mut (dyn FnMut(u64, &[u8]) -> Result<bool> + Send),
) -> Result<()> {
    let mut from = from;
    loop {
        let page = store.audit_scan(from, PAGE).await?;
        let n = page.len();
        for (seq, bytes) in page {
            if !f(seq, &bytes)? {
                return Ok(());
            }
            from = seq.saturating_add(1);
        }
        if n < PAGE {
            return Ok(());
        }
        // A long walk leaves room for request handling between pages.
        tokio::task::yield_now().await;
    }
}

/// A point of the chain recorded outside the store (a log line, a metric, a file on another
/// volume): entry `seq` had hash `hash`. A store whose chain lacks it lost its tail (deleted, or
/// restored from an older backup); one with another hash there was rewritten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl Anchor {
    /// `SEQ:HASH` as the broker logs it.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "anchor",
                format!(
                    "{} is not SEQ:HASH (a sequence number and 64 hex digits)",
                    crate::model::preview(s)
                ),
            )
        };
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        parse_hash(hash).ok_or_else(bad)?;
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// Whether the chain in `store` (and `archive`) still holds `anchor`: `Ok(Ok(()))` when it does,
/// `Ok(Err(why))` saying what was lost or rewritten when it does not.
pub async fn check_anchor(
    store: &dyn Store,
    archive: Option<&std::path::Path>,
    anchor: &Anchor,
) -> Result<std::result::Result<(), String>> {
    if anchor.seq == 0 {
        return Ok(Ok(()));
    }
    let cp = archive::checkpoint(store).await?;
    let mut found: Option<(String, UnixMillis)> = None;
    match &cp {
        Some(cp) if anchor.seq == cp.seq => found = Some((cp.hash.clone(), 0)),
        Some(cp) if anchor.seq < cp.seq => {
            let Some(dir) = archive else {
                return Ok(Err(format!(
                    "entry {} is archived and no archive was given to look it up",
                    anchor.seq
                )));
            };
            let _ = archive::walk(dir, cp, &mut |bytes| {
                if let Ok(e) = serde_json::from_slice::<Entry>(bytes)
                    && e.seq == anchor.seq
                {
                    found = Some((e.hash, e.time));
                }
                Ok(())
            });
        }
        _ => {
            if let Some((seq, bytes)) = store.audit_scan(anchor.seq, 1).await?.pop()
                && seq == anchor.seq
            {
                let e: Entry = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Storage(format!("corrupt audit entry {seq}: {e}")))?;
                found = Some((e.hash, e.time));
            }
        }
    }
    Ok(match found {
        Some((hash, _)) if hash == anchor.hash => Ok(()),
        Some((hash, _)) => Err(format!(
            "entry {} has hash {hash}, the anchor says {}: the chain was rewritten",
            anchor.seq, anchor.hash
        )),
        None => {
            let last = store.audit_head().await?.seq;
            Err(format!(
                "the chain ends at entry {last}, before the anchored entry {}: entries {}..={} \
                 were removed, or the store was restored from an older backup",
                anchor.seq,
                last + 1,
                anchor.seq
            ))
        }
    })
}

/// Walks the chain entry by entry: sequence numbers consecutive, each link and hash right.
struct Chain {
    prev: [u8; 32],
    expected: u64,
    count: u64,
}

impl Chain {
    fn new(expected: u64, prev: [u8; 32]) -> Self {
        Self {
            prev,
            expected,
            count: 0,
        }
    }

    /// Checks the next entry (stored under `key_seq`, when the store gives one). On failure,
    /// returns the sequence number at which the chain breaks and why.
    fn next(
        &mut self,
        key_seq: Option<u64>,
        bytes: &[u8],
    ) -> std::result::Result<(), archive::Break> {
        let expected = self.expected;
        let entry: Entry = serde_json::from_slice(bytes).map_err(|e| {
            (
                key_seq.unwrap_or(expected),
                format!("entry does not parse: {e}"),
            )
        })?;
        let seq = key_seq.unwrap_or(entry.seq);
        if seq != expected {
            return Err((
                expected,
                format!("entry {expected} is missing (next stored is {seq})"),
            ));
        }
        if entry.seq != seq {
            return Err((
                seq,
                format!("entry stored at {seq} claims sequence {}", entry.seq),
            ));
        }
        if parse_hash(&entry.prev_hash) != Some(self.prev) {
            return Err((seq, "previous-hash link does not match".into()));
        }
        let h = entry
            .compute_hash(&self.prev)
            .map_err(|e| (seq, e.to_string()))?;
        if parse_hash(&entry.hash) != Some(h) {
            return Err((seq, "hash does not match the entry's content".into()));
        }
        self.prev = h;
        self.expected += 1;
        self.count += 1;
        Ok(())
    }

    fn broken(&self, seq: u64, reason: String) -> Verification {
        Verification {
            ok: false,
            entries: self.count,
            first_bad_seq: seq,
            reason,
        }
    }
}

/// Walks the whole chain and reports the first entry at which it breaks: the archive segments in
/// `archive` (when given) up to the store's checkpoint, then the entries still in the store.
/// Without `archive`, archived entries are taken on the checkpoint's word and only the store's
/// part is walked (from the checkpoint's hash).
pub async fn verify(store: &dyn Store, archive: Option<&std::path::Path>) -> Result<Verification> {
    let cp = archive::checkpoint(store).await?;
    let mut chain = Chain::new(1, GENESIS);
    if let Some(cp) = &cp {
        match archive {
            Some(dir) => {
                if let Err((seq, reason)) =
                    archive::walk(dir, cp, &mut |bytes| chain.next(None, bytes))
                {
                    return Ok(chain.broken(seq, reason));
                }
                if chain.expected != cp.seq + 1 || hex::encode(chain.prev) != cp.hash {
                    return Ok(chain.broken(
                        chain.expected,
                        format!(
                            "the archive does not end where the store's checkpoint says \
                             (checkpoint: entry {}; archive: entry {})",
                            cp.seq,
                            chain.expected - 1
                        ),
                    ));
                }
            }
            None => {
                let (next, prev) = archive::head_of(Some(cp))?;
                chain = Chain::new(next, prev);
            }
        }
    }
    let mut broken = None;
    scan_all(store, chain.expected, &mut |key_seq, bytes| {
        if let Err(b) = chain.next(Some(key_seq), bytes) {
            broken = Some(b);
            return Ok(false);
        }
        Ok(true)
    })
    .await?;
    if let Some((seq, reason)) = broken {
        return Ok(chain.broken(seq, reason));
    }
    Ok(Verification {
        ok: true,
        entries: chain.count,
        first_bad_seq: 0,
        reason: String::new(),
    })
}

/// Writes every entry as one JSON line (for log shippers): the archive segments in `archive`
/// (when given) up to the checkpoint, then the store's entries. Returns the number written.
pub async fn export(
    store: &dyn Store,
    archive: Option<&std::path::Path>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let cp = archive::checkpoint(store).await?;
    let mut n = 0;
    let mut write = |bytes: &[u8]| {
        out.write_all(bytes)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| Error::Internal(format!("writing the export: {e}")))
    };
    let mut from = 1;
    if let Some(cp) = &cp {
        if let Some(dir) = archive {
            let mut failed = None;
            archive::walk(dir, cp, &mut |bytes| {
                write(bytes).map_err(|e| {
                    failed = Some(e);
                    (0, String::new())
                })?;
                n += 1;
                Ok(())
            })
            .map_err(|(seq, reason)| {
                failed.take().unwrap_or_else(|| {
                    Error::Storage(format!("audit archive unreadable at entry {seq}: {reason}"))
                })
            })?;
        }
        from = cp.seq + 1;
    }
    scan_all(store, from, &mut |_, bytes| {
        write(bytes)?;
        n += 1;
        Ok(true)
    })
    .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::store::crypto::Kek;

    /// Appends `events` at `time` in one unit of work; returns their sequence numbers.
    async fn append(store: &dyn Store, time: UnixMillis, events: Vec<Event>) -> Vec<u64> {
        let mut u = store.begin().await.unwrap();
        for ev in events {
            u.audit(time, ev);
        }
        u.commit().await.unwrap()
    }

    #[tokio::test]
    async fn an_anchor_shows_a_deleted_tail_and_a_recomputed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let store = SledStore::open(&dir.path().join("db"), &kek).unwrap();
        let ev = |k: &str| Event {
            kind: k.into(),
            ..Default::default()
        };
        for _ in 0..5 {
            append(&store, 1, vec![ev("decision")]).await;
        }
        let anchor = store.audit_head().await.unwrap();
        assert_eq!(anchor.seq, 5);
        assert_eq!(Anchor::parse(&anchor.to_string()).unwrap(), anchor);
        assert!(Anchor::parse("5:xyz").is_err() && Anchor::parse("nope").is_err());
        assert_eq!(check_anchor(&store, None, &anchor).await.unwrap(), Ok(()));
        // Another store whose chain was rebuilt from scratch with other content: the chain
        // verifies, the anchor does not.
        let other = SledStore::open(&dir.path().join("db2"), &kek).unwrap();
        for _ in 0..5 {
            append(&other, 1, vec![ev("rewritten")]).await;
        }
        assert!(verify(&other, None).await.unwrap().ok);
        let why = check_anchor(&other, None, &anchor)
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.contains("rewritten"), "{why}");
        // A store three entries behind the anchor (its tail deleted, or an older backup).
        let short = SledStore::open(&dir.path().join("db3"), &kek).unwrap();
        for _ in 0..2 {
            append(&short, 1, vec![ev("decision")]).await;
        }
        let why = check_anchor(&short, None, &anchor)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            why.contains("ends at entry 2") && why.contains("3..=5"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn an_untouched_chain_of_100k_entries_verifies_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let db = dir.path().join("db");
        let store = SledStore::open(&db, &kek).unwrap();
        // A thousand entries per unit of work (a flush each), at the times they had one by one.
        for batch in 0..100u64 {
            let mut u = store.begin().await.unwrap();
            for i in batch * 1000..(batch + 1) * 1000 {
                let ev = Event {
                    kind: "decision".into(),
                    spiffe_id: format!("spiffe://td/agent/{}", i % 97),
                    decision: "ALLOWED".into(),
                    policies: vec!["p".into()],
                    ..Default::default()
                };
                u.audit(i as i64, ev);
            }
            let seqs = u.commit().await.unwrap();
            assert_eq!(seqs.first(), Some(&(batch * 1000 + 1)));
        }
        let v = verify(&store, None).await.unwrap();
        assert!(v.ok, "{}", v.reason);
        assert_eq!(v.entries, 100_000);
        // A reopened store continues the same chain.
        drop(store);
        let store = SledStore::open(&db, &kek).unwrap();
        assert_eq!(store.audit_head().await.unwrap().seq, 100_000);
        assert_eq!(
            append(&store, 1, vec![Event::default()]).await,
            vec![100_001]
        );
        assert!(verify(&store, None).await.unwrap().ok);
    }
}
