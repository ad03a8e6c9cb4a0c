//! The tamper-evident audit trail (DESIGN §9).
//!
//! Every decision, issuance, revocation, approval, admin action and authentication failure is
//! appended to a hash chain: entry *n* stores `hash = SHA-256(prev_hash ‖ canonical entry)`, where
//! the canonical entry is the entry's JSON without its `hash` field, with keys in a fixed order.
//! Modifying, removing or reordering any entry breaks the chain at that sequence number. Each
//! entry is also emitted as a JSON log line (target `jitbroker::audit`). Secrets never appear:
//! events carry ids, names, decisions and reasons only.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::UnixMillis;
use crate::store::Store;

/// Hash that precedes the first entry.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// One audit event. Optional fields are left out of the JSON when empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// `decision`, `task_started`, `credential_issued`, `credential_revoked`, `task_ended`,
    /// `approval_requested`, `approval_granted`, `approval_denied`, `admin`, `auth_failed`…
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

/// Appends events to the chain in the store.
pub struct AuditLog {
    /// (next sequence number, hash of the last entry). The lock orders appends.
    head: Mutex<(u64, [u8; 32])>,
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl AuditLog {
    /// Resumes the chain after the last stored entry.
    pub fn open(store: &dyn Store) -> Result<Self> {
        let head = match store.audit_last()? {
            Some(bytes) => {
                let e: Entry = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Storage(format!("corrupt last audit entry: {e}")))?;
                let h = parse_hash(&e.hash)
                    .ok_or_else(|| Error::Storage("corrupt last audit entry hash".into()))?;
                (e.seq + 1, h)
            }
            None => (1, GENESIS),
        };
        Ok(Self {
            head: Mutex::new(head),
        })
    }

    /// Appends one event (not yet durable: the caller's `Store::durable` covers it).
    pub fn append(&self, store: &dyn Store, time: UnixMillis, event: Event) -> Result<u64> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, prev) = *head;
        let mut entry = Entry {
            seq,
            time,
            event,
            prev_hash: hex::encode(prev),
            hash: String::new(),
        };
        let hash = entry.compute_hash(&prev)?;
        entry.hash = hex::encode(hash);
        let bytes = serde_json::to_vec(&entry).map_err(Error::internal)?;
        store.audit_put(seq, &bytes)?;
        *head = (seq + 1, hash);
        drop(head);
        tracing::info!(
            target: "jitbroker::audit",
            audit = %String::from_utf8_lossy(&bytes),
            "audit"
        );
        Ok(seq)
    }
}

/// Walks the whole chain and reports the first entry at which it breaks.
pub fn verify(store: &dyn Store) -> Result<Verification> {
    let mut prev = GENESIS;
    let mut count = 0u64;
    let bad = |seq: u64, count: u64, reason: String| Verification {
        ok: false,
        entries: count,
        first_bad_seq: seq,
        reason,
    };
    for (expected_seq, item) in (1u64..).zip(store.audit_scan()?) {
        let (key_seq, bytes) = item?;
        let entry: Entry = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) => return Ok(bad(key_seq, count, format!("entry does not parse: {e}"))),
        };
        if key_seq != expected_seq {
            return Ok(bad(
                expected_seq,
                count,
                format!("entry {expected_seq} is missing (next stored is {key_seq})"),
            ));
        }
        if entry.seq != key_seq {
            return Ok(bad(
                key_seq,
                count,
                format!("entry stored at {key_seq} claims sequence {}", entry.seq),
            ));
        }
        if parse_hash(&entry.prev_hash) != Some(prev) {
            return Ok(bad(
                key_seq,
                count,
                "previous-hash link does not match".into(),
            ));
        }
        let h = entry.compute_hash(&prev)?;
        if parse_hash(&entry.hash) != Some(h) {
            return Ok(bad(
                key_seq,
                count,
                "hash does not match the entry's content".into(),
            ));
        }
        prev = h;
        count += 1;
    }
    Ok(Verification {
        ok: true,
        entries: count,
        first_bad_seq: 0,
        reason: String::new(),
    })
}

/// Writes every entry as one JSON line (for log shippers). Returns the number written.
pub fn export(store: &dyn Store, out: &mut dyn std::io::Write) -> Result<u64> {
    let mut n = 0;
    for item in store.audit_scan()? {
        let (_, bytes) = item?;
        out.write_all(&bytes)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| Error::Internal(format!("writing the export: {e}")))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::store::crypto::Kek;

    #[test]
    fn an_untouched_chain_of_100k_entries_verifies_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let store = SledStore::open(&dir.path().join("db"), &kek).unwrap();
        let log = AuditLog::open(&store).unwrap();
        for i in 0..100_000u64 {
            let ev = Event {
                kind: "decision".into(),
                spiffe_id: format!("spiffe://td/agent/{}", i % 97),
                decision: "ALLOWED".into(),
                policies: vec!["p".into()],
                ..Default::default()
            };
            log.append(&store, i as i64, ev).unwrap();
        }
        let v = verify(&store).unwrap();
        assert!(v.ok, "{}", v.reason);
        assert_eq!(v.entries, 100_000);
        // A reopened log continues the same chain.
        let log = AuditLog::open(&store).unwrap();
        assert_eq!(log.append(&store, 1, Event::default()).unwrap(), 100_001);
        assert!(verify(&store).unwrap().ok);
    }
}
