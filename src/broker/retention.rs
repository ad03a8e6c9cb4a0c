//! Keeping the store bounded: audit archival (ended tasks are purged by the reaper, see
//! `Expiring::Purge`). Archival moves the oldest audit entries into segment files a whole segment
//! at a time, with a checkpoint in the store that the rest of the chain continues from. The
//! chain's head is anchored outside the store (logs, metrics, an anchor file), so a deleted tail,
//! a recomputed chain or a restore from an older backup shows.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::{Event, archive};
use crate::error::{Error, Result};
use crate::model::SpiffeId;

/// How often the archiver looks at the size of the audit chain in the store.
const ARCHIVE_EVERY: Duration = Duration::from_secs(5);

/// What the anchor file holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct AnchorFile {
    #[serde(flatten)]
    anchor: crate::audit::Anchor,
    time: crate::model::UnixMillis,
    blocked: Vec<String>,
}

/// Archived entries leave the store this many at a time, with [`REMOVE_PAUSE`] between steps:
/// removing a whole segment (50,000 entries by default) at once is a burst of store writes that
/// every request's group-commit flush waits behind (BENCHMARKS.md, "Audit archival and the paced tail").
const REMOVE_STEP: u64 = 1024;
/// At most 20,000 entries a second leave the store, about twice what the broker appends at its
/// peak here, so removal keeps up while its writes are spread out.
const REMOVE_PAUSE: Duration = Duration::from_millis(50);

/// The lease that makes audit archival singleton work.
const ARCHIVER_LEASE: &str = "audit-archiver";

/// How often the chain's head is logged (and written to the anchor file) when it moved.
const ANCHOR_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

component!(
    /// Audit retention: anchors, restore detection, archival.
    Retention {  }
);

impl Retention {
    /// The audit chain's head.
    pub async fn audit_head(&self) -> Result<crate::audit::Anchor> {
        self.store.audit_head().await
    }

    /// Logs the chain's head (`event = "audit_anchor"`) and writes it to `file`, when it moved
    /// since `last`. Log shippers and the file keep it where a writer of the data volume
    /// cannot reach.
    pub async fn anchor_audit(&self, file: Option<&std::path::Path>, last: &mut u64) {
        let head = match self.store.audit_head().await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the audit chain's head");
                return;
            }
        };
        if head.seq == *last {
            return;
        }
        *last = head.seq;
        tracing::info!(event = "audit_anchor", anchor = %head, "audit chain head");
        let Some(file) = file else { return };
        let blocked: Vec<String> = self
            .store
            .blocked_identities()
            .await
            .unwrap_or_default()
            .iter()
            .map(|b| b.to_string())
            .collect();
        let body = AnchorFile {
            anchor: head,
            time: self.now(),
            blocked,
        };
        let tmp = file.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&body)
            .map_err(|e| e.to_string())
            .and_then(|b| std::fs::write(&tmp, b).map_err(|e| e.to_string()))
            .and_then(|()| std::fs::rename(&tmp, file).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::error!(file = %file.display(), error = %e, "cannot write the audit anchor file");
        }
    }

    /// Anchors the chain every minute, and once more at `stop`.
    pub async fn run_audit_anchor(
        self: Arc<Self>,
        file: Option<std::path::PathBuf>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut last = 0;
        loop {
            self.anchor_audit(file.as_deref(), &mut last).await;
            tokio::select! {
                _ = tokio::time::sleep(ANCHOR_EVERY) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// At start: compares the store with the anchor file. A store behind it (restored from an
    /// older backup, or its audit tail deleted) is reported loudly and audited with what it
    /// rolls back, and the identities blocked at the anchor are blocked again. Returns the
    /// finding, if any.
    pub async fn check_audit_anchor(&self, file: &std::path::Path) -> Result<Option<String>> {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Config(format!(
                    "cannot read the audit anchor file {}: {e}",
                    file.display()
                )));
            }
        };
        let a: AnchorFile = serde_json::from_slice(&text).map_err(|e| {
            Error::Config(format!(
                "the audit anchor file {} does not parse: {e}",
                file.display()
            ))
        })?;
        let archive = self.audit_archive.as_ref().map(|x| x.dir.clone());
        let Err(why) =
            crate::audit::check_anchor(self.store.engine(), archive.as_deref(), &a.anchor).await?
        else {
            return Ok(None);
        };
        let mut reblocked = Vec::new();
        let mut u = self.store.begin().await?;
        for id in &a.blocked {
            let Ok(id) = SpiffeId::parse("anchor file blocked", id) else {
                continue;
            };
            if !u.lock_identity(&id).await?.blocked {
                u.set_blocked(&id, true).await?;
                reblocked.push(id.to_string());
            }
        }
        let live = self
            .store
            .counts()
            .await
            .map(|c| c.credentials)
            .unwrap_or(0);
        let finding = format!(
            "the store is behind its audit anchor ({}, written at {}): {why}. Everything done \
             after the store's own last entry is rolled back: credentials revoked since are \
             active again ({live} credentials are active in this store: revoke what must stay \
             revoked), tasks ended since are live again; identities blocked at the anchor and \
             not in the store are blocked again: [{}]",
            a.anchor,
            a.time,
            reblocked.join(", ")
        );
        tracing::error!(event = "restore_detected", "{finding}");
        self.audit(
            &mut u,
            Event {
                kind: "restore_detected".into(),
                reason: finding.clone(),
                detail: format!("anchor {}", a.anchor),
                ..Default::default()
            },
        );
        u.commit().await?;
        Ok(Some(finding))
    }

    /// Archives every whole segment that is due. Returns the number of entries archived.
    pub async fn archive_audit(&self) -> Result<u64> {
        let (_never, mut stop) = watch::channel(false);
        self.archive_audit_until(&mut stop).await
    }

    /// [`Self::archive_audit`], giving up between removal steps once `stop` turns true (what was
    /// archived but not yet removed is removed by the next pass).
    pub(crate) async fn archive_audit_until(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<u64> {
        let Some(a) = self.audit_archive.clone() else {
            return Ok(0);
        };
        // Archival is singleton work: whoever holds the lease archives; another holder (a second
        // process on a shared engine) waits until it lapses.
        // Renewed every pass, so at least a few passes long.
        let lease_ms = a
            .lease_ms
            .max((ARCHIVE_EVERY.as_millis() as i64).saturating_mul(3));
        if self
            .store
            .try_lease(ARCHIVER_LEASE, self.holder(), self.now(), lease_ms)
            .await?
            .is_none()
        {
            return Ok(0);
        }
        let mut cp = archive::checkpoint(self.store.engine()).await?;
        if let Some(cp) = &cp {
            // Finish a step that stopped after its checkpoint: its entries are archived.
            if !self.remove_archived(cp.seq, stop).await? {
                return Ok(0);
            }
        }
        let mut total = 0;
        loop {
            // Readers of the whole chain (VerifyAudit) see a segment and its checkpoint together;
            // entries the checkpoint covers are never read from the store again, so removing
            // them needs no lock.
            let step = self.archive_lock.lock().await;
            let (first, prev) = archive::head_of(cp.as_ref())?;
            let in_store = (self.store.audit_head().await?.seq + 1).saturating_sub(first);
            if in_store < a.keep.saturating_add(a.segment) {
                return Ok(total);
            }
            let last = first + a.segment - 1;
            // Entries reach the store by committed units of work only: they are durable.
            let new =
                archive::write_segment(self.store.engine(), &a.dir, first, last, prev).await?;
            archive::put_checkpoint(self.store.engine(), &new).await?;
            self.metrics.audit_archived(a.segment);
            total += a.segment;
            tracing::info!(first, last, segment = %new.segment, "audit entries archived");
            let mut u = self.store.begin().await?;
            self.audit(
                &mut u,
                Event {
                    kind: "audit_archived".into(),
                    actor: "jitbroker".into(),
                    detail: format!(
                        "entries {first}..{last} moved to {} (sha256 {})",
                        new.segment, new.segment_sha256
                    ),
                    ..Default::default()
                },
            );
            u.commit().await?;
            drop(step);
            cp = Some(new);
            if !self.remove_archived(last, stop).await? {
                return Ok(total);
            }
        }
    }

    /// Removes the entries through `through` (archived: the checkpoint covers them) from the
    /// store, [`REMOVE_STEP`] at a time from the oldest one still there, paced. `false` when
    /// `stop` turned true first.
    async fn remove_archived(
        &self,
        through: u64,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut oldest = match self.store.audit_scan(0, 1).await?.first() {
            Some((seq, _)) if *seq <= through => *seq,
            _ => return Ok(true),
        };
        loop {
            let to = oldest.saturating_add(REMOVE_STEP - 1).min(through);
            self.store.audit_remove_through(to).await?;
            if to == through {
                return Ok(true);
            }
            oldest = to + 1;
            tokio::select! {
                _ = tokio::time::sleep(REMOVE_PAUSE) => {}
                _ = stop.wait_for(|s| *s) => return Ok(false),
            }
        }
    }

    /// Archives due audit segments every few seconds until `stop`.
    pub async fn run_audit_archiver(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.audit_archive.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.archive_audit_until(&mut stop).await {
                // Nothing is lost: the entries stay in the store until a step succeeds.
                tracing::error!(error = %e, "audit archival failed; retrying");
            }
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(ARCHIVE_EVERY) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}
