//! Audit archival (DESIGN §9): the store keeps the newest entries of the chain; older ones move,
//! a whole segment at a time, into append-only JSON-lines files named after the sequence numbers
//! they hold (`audit-<first>-<last>.jsonl`, zero-padded so names sort in chain order).
//!
//! One archival step: the segment is written from the store to a temporary file (checking the
//! chain link by link on the way: a broken chain is never archived), fsynced, renamed into place
//! and the directory fsynced; then the store's checkpoint (last archived entry, its hash, the
//! segment's name and SHA-256) is written and made durable; only then are the archived entries
//! deleted from the store. A crash at any point leaves either the old checkpoint (the segment is
//! written again, identically, next time) or the new one with entries still in the store that
//! the next step deletes. Verification walks the segments up to the checkpoint and continues in
//! the store from it, so an edited, removed or reordered archived entry is still detected.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Chain, GENESIS, parse_hash};
use crate::error::{Error, Result};
use crate::store::{Store, plain_meta_key};

/// The longest line a segment may hold: entries are far shorter (their fields are bounded), so a
/// longer one is damage, and reading stops there instead of taking the whole file into memory.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

/// Key of the checkpoint in the store's `meta` tree.
pub const CHECKPOINT_KEY: &str = "audit/checkpoint";

/// Where the archive ends and the store's part of the chain begins.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last archived sequence number; the store holds the chain after it.
    pub seq: u64,
    /// Hash of that entry (hex): the next entry's `prev_hash`.
    pub hash: String,
    /// File name of the segment ending at `seq`.
    pub segment: String,
    /// SHA-256 (hex) of that segment file.
    pub segment_sha256: String,
}

/// The store's checkpoint, if anything was ever archived.
pub async fn checkpoint(store: &dyn Store) -> Result<Option<Checkpoint>> {
    let Some(bytes) = store.meta_get(&plain_meta_key(CHECKPOINT_KEY)).await? else {
        return Ok(None);
    };
    parse_checkpoint(&bytes).map(Some)
}

/// Decodes a stored checkpoint, refusing impossible ones.
pub fn parse_checkpoint(bytes: &[u8]) -> Result<Checkpoint> {
    let cp: Checkpoint = serde_json::from_slice(bytes)
        .map_err(|e| Error::Storage(format!("corrupt audit checkpoint: {e}")))?;
    // Sequence numbers start at 1, and the entry after the checkpoint must have one.
    if cp.seq == 0 || cp.seq == u64::MAX {
        return Err(Error::Storage(format!(
            "corrupt audit checkpoint: sequence number {} is impossible",
            cp.seq
        )));
    }
    Ok(cp)
}

/// Stores the checkpoint, durably.
pub async fn put_checkpoint(store: &dyn Store, cp: &Checkpoint) -> Result<()> {
    let key = plain_meta_key(CHECKPOINT_KEY);
    let mut u = store.begin().await?;
    u.meta_put(&key, serde_json::to_vec(cp).map_err(Error::internal)?)
        .await?;
    u.commit().await.map(|_| ())
}

pub fn segment_name(first: u64, last: u64) -> String {
    format!("audit-{first:020}-{last:020}.jsonl")
}

/// The bounds a segment's name gives, if it is a segment's name: sequence numbers start at 1, and a
/// segment's last is not before its first (a file named otherwise is not one of ours; the chain
/// check then finds its entries missing).
fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let (a, b) = rest.split_once('-')?;
    let (first, last): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (1 <= first && first <= last).then_some((first, last))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

/// The segment files in `dir`, in chain order: (first, last, path).
pub fn segments(dir: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| io_err("cannot read the audit archive", dir, e))?;
    for item in rd {
        let item = item.map_err(|e| io_err("cannot read the audit archive", dir, e))?;
        let name = item.file_name();
        if let Some((first, last)) = name.to_str().and_then(parse_segment_name) {
            out.push((first, last, item.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Where the chain breaks: (sequence number, reason).
pub type Break = (u64, String);

/// Feeds every archived entry up to the checkpoint, in order, to `f` (one JSON line each).
/// Segments after the checkpoint (left by an archival step that did not finish) are ignored:
/// their entries are still in the store. Errors are (sequence number, reason).
pub fn walk(
    dir: &Path,
    cp: &Checkpoint,
    f: &mut dyn FnMut(&[u8]) -> std::result::Result<(), Break>,
) -> std::result::Result<(), Break> {
    let segs = segments(dir).map_err(|e| (1, e.to_string()))?;
    let mut seen_checkpoint_segment = false;
    for (first, last, path) in segs.into_iter().filter(|s| s.0 <= cp.seq) {
        let file = std::fs::File::open(&path)
            .map_err(|e| (first, format!("cannot open {}: {e}", path.display())))?;
        let mut reader = std::io::BufReader::new(file);
        let mut sha = Sha256::new();
        let mut line = Vec::new();
        let mut lines = 0u64;
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_ENTRY_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| {
                    (
                        first.saturating_add(lines),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
            if n == 0 {
                break;
            }
            if line.len() > MAX_ENTRY_BYTES {
                return Err((
                    first.saturating_add(lines),
                    format!(
                        "segment {} holds a line longer than {MAX_ENTRY_BYTES} bytes; entries                          are at most that",
                        path.display()
                    ),
                ));
            }
            sha.update(&line);
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            f(body)?;
            lines += 1;
        }
        if lines != last - first + 1 {
            return Err((
                first.saturating_add(lines),
                format!(
                    "segment {} holds {lines} entries, its name says {}",
                    path.display(),
                    last - first + 1
                ),
            ));
        }
        if path.file_name().and_then(|n| n.to_str()) == Some(cp.segment.as_str()) {
            seen_checkpoint_segment = true;
            if hex::encode(sha.finalize()) != cp.segment_sha256 {
                return Err((
                    first,
                    format!(
                        "segment {} does not match the checkpoint's SHA-256",
                        path.display()
                    ),
                ));
            }
        }
    }
    if !seen_checkpoint_segment {
        return Err((
            cp.seq,
            format!(
                "segment {} named by the checkpoint is not in {}",
                cp.segment,
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Writes entries `first..=last` from the store into a new segment in `dir`, checking the chain
/// from `prev` (the hash before `first`). Blocking; returns the checkpoint that ends with it.
pub async fn write_segment(
    store: &dyn Store,
    dir: &Path,
    first: u64,
    last: u64,
    prev: [u8; 32],
) -> Result<Checkpoint> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create the audit archive", dir, e))?;
    let name = segment_name(first, last);
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let file = std::fs::File::create(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut sha = Sha256::new();
    let mut chain = Chain::new(first, prev);
    super::scan_all(store, first, &mut |seq, bytes| {
        if seq > last {
            return Ok(false);
        }
        chain.next(Some(seq), bytes).map_err(|(seq, reason)| {
            Error::Storage(format!(
                "not archiving: the audit chain in the store is broken at entry {seq}: {reason}"
            ))
        })?;
        sha.update(bytes);
        sha.update(b"\n");
        out.write_all(bytes)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| io_err("cannot write", &tmp, e))?;
        Ok(true)
    })
    .await?;
    if chain.expected != last + 1 {
        return Err(Error::Storage(format!(
            "not archiving: entries {}..{last} are not in the store",
            chain.expected
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err("cannot write", &tmp, e.into_error()))?;
    // Syncing tens of megabytes takes a while: on a blocking thread, not a request worker.
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.sync_all()
            .map_err(|e| io_err("cannot sync", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| io_err("cannot rename into", &path, e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync", &dir, e))
    })
    .await
    .map_err(|e| Error::Internal(format!("the archive segment's sync stopped: {e}")))??;
    Ok(Checkpoint {
        seq: last,
        hash: hex::encode(chain.prev),
        segment: name,
        segment_sha256: hex::encode(sha.finalize()),
    })
}

/// The hash the entry after `cp` must link to (the genesis hash with no checkpoint).
pub fn head_of(cp: Option<&Checkpoint>) -> Result<(u64, [u8; 32])> {
    match cp {
        None => Ok((1, GENESIS)),
        Some(cp) => Ok((
            cp.seq + 1,
            parse_hash(&cp.hash)
                .ok_or_else(|| Error::Storage("corrupt audit checkpoint hash".into()))?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, verify};
    use crate::store::SledStore;
    use crate::store::crypto::Kek;
    use crate::store::local::LocalEngine;

    /// Appends `n` entries, one unit of work each; returns the last sequence number.
    async fn append(store: &dyn Store, n: u64) -> u64 {
        let mut last = 0;
        for i in 0..n {
            let ev = Event {
                kind: "decision".into(),
                detail: format!("event {i}"),
                ..Default::default()
            };
            let mut u = store.begin().await.unwrap();
            u.audit(i as i64, ev);
            last = u.commit().await.unwrap()[0];
        }
        last
    }

    #[tokio::test]
    async fn an_interrupted_step_and_a_fully_archived_store_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let db = dir.path().join("db");
        let store = SledStore::open(&db, &kek).unwrap();
        let archive = dir.path().join("archive");
        assert_eq!(append(&store, 25).await, 25);

        // Step 1 stops after its checkpoint: the entries are archived and still in the store.
        let cp = write_segment(&store, &archive, 1, 10, GENESIS)
            .await
            .unwrap();
        put_checkpoint(&store, &cp).await.unwrap();
        let v = verify(&store, Some(&archive)).await.unwrap();
        assert!(v.ok, "{}", v.reason);
        assert_eq!(v.entries, 25);
        assert_eq!(
            Store::audit_remove_through(&store, cp.seq).await.unwrap(),
            10
        );

        // A segment written again after a crash before its checkpoint is identical.
        let (first, prev) = head_of(Some(&cp)).unwrap();
        let cp2 = write_segment(&store, &archive, first, 25, prev)
            .await
            .unwrap();
        let again = write_segment(&store, &archive, first, 25, prev)
            .await
            .unwrap();
        assert_eq!(cp2, again);
        // Before its checkpoint, that segment is ignored: its entries are still in the store.
        let v = verify(&store, Some(&archive)).await.unwrap();
        assert!(v.ok, "{}", v.reason);
        assert_eq!(v.entries, 25);

        // Everything archived: a reopened store continues the chain from the checkpoint.
        put_checkpoint(&store, &cp2).await.unwrap();
        Store::audit_remove_through(&store, cp2.seq).await.unwrap();
        assert!(Store::audit_scan(&store, 0, 10).await.unwrap().is_empty());
        drop(store);
        let store = SledStore::open(&db, &kek).unwrap();
        assert_eq!(
            Store::audit_head(&store).await.unwrap(),
            crate::audit::Anchor {
                seq: 25,
                hash: cp2.hash.clone()
            }
        );
        assert_eq!(append(&store, 3).await, 28);
        let v = verify(&store, Some(&archive)).await.unwrap();
        assert!(v.ok, "{}", v.reason);
        assert_eq!(v.entries, 28);

        // The checkpoint pins the last segment's bytes; a missing archive is named.
        let mut forged = cp2.clone();
        forged.segment_sha256 = "00".repeat(32);
        put_checkpoint(&store, &forged).await.unwrap();
        let v = verify(&store, Some(&archive)).await.unwrap();
        assert!(!v.ok && v.reason.contains("SHA-256"), "{}", v.reason);
        put_checkpoint(&store, &cp2).await.unwrap();
        let v = verify(&store, Some(&dir.path().join("elsewhere")))
            .await
            .unwrap();
        assert!(!v.ok && v.reason.contains("elsewhere"), "{}", v.reason);

        // A broken chain in the store is never archived.
        LocalEngine::audit_put(&store, 27, b"{\"seq\":27}").unwrap();
        let (first, prev) = head_of(Some(&cp2)).unwrap();
        let err = write_segment(&store, &archive, first, 28, prev)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("broken at entry 27"), "{err}");
    }

    #[tokio::test]
    async fn impossible_segment_names_and_checkpoints_are_refused_without_panicking() {
        // Found by the fuzz smoke: bounds from a file name were trusted in arithmetic.
        assert_eq!(parse_segment_name(&segment_name(1, 10)), Some((1, 10)));
        for (first, last) in [(5, 2), (0, u64::MAX), (0, 0)] {
            assert_eq!(parse_segment_name(&segment_name(first, last)), None);
        }
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let store = SledStore::open(&dir.path().join("db"), &kek).unwrap();
        let archive = dir.path().join("archive");
        std::fs::create_dir_all(&archive).unwrap();
        let name = segment_name(1, u64::MAX);
        std::fs::write(archive.join(&name), b"{}\n").unwrap();
        let mut cp = Checkpoint {
            seq: u64::MAX - 1,
            hash: hex::encode(GENESIS),
            segment: name,
            segment_sha256: String::new(),
        };
        put_checkpoint(&store, &cp).await.unwrap();
        let v = verify(&store, Some(&archive)).await.unwrap();
        assert!(!v.ok && v.first_bad_seq == 1, "{v:?}");
        cp.seq = u64::MAX;
        put_checkpoint(&store, &cp).await.unwrap();
        let e = verify(&store, Some(&archive))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoint") && e.contains("impossible"), "{e}");
    }
}
