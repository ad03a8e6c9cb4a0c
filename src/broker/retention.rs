//! Keeping the store bounded: audit archival (ended tasks are purged by the reaper, see
//! `Expiring::Purge`). Archival moves the oldest audit entries into segment files a whole segment
//! at a time, with a checkpoint in the store that the rest of the chain continues from.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Broker;
use crate::audit::{Event, archive};
use crate::error::{Error, Result};

/// How often the archiver looks at the size of the audit chain in the store.
const ARCHIVE_EVERY: Duration = Duration::from_secs(5);

impl Broker {
    /// Archives every whole segment that is due. Returns the number of entries archived.
    pub async fn archive_audit(&self) -> Result<u64> {
        let Some(a) = self.audit_archive.clone() else {
            return Ok(0);
        };
        let mut cp = {
            let _step = self.archive_lock.lock().await;
            let cp = archive::checkpoint(self.store.as_ref())?;
            if let Some(cp) = &cp {
                // Finish a step that stopped after its checkpoint: its entries are archived.
                let store = self.store.clone();
                let upto = cp.seq;
                spawn_blocking(move || store.audit_remove_through(upto)).await?;
            }
            cp
        };
        let mut total = 0;
        loop {
            let _step = self.archive_lock.lock().await;
            let (first, prev) = archive::head_of(cp.as_ref())?;
            let in_store = self.audit.next_seq().saturating_sub(first);
            if in_store < a.keep.saturating_add(a.segment) {
                return Ok(total);
            }
            let last = first + a.segment - 1;
            // What goes into a segment file must already be durable in the store.
            self.store.durable().await?;
            let store = self.store.clone();
            let dir = a.dir.clone();
            let new = spawn_blocking(move || {
                archive::write_segment(store.as_ref(), &dir, first, last, prev)
            })
            .await?;
            archive::put_checkpoint(self.store.as_ref(), &new)?;
            self.store.durable().await?;
            let store = self.store.clone();
            spawn_blocking(move || store.audit_remove_through(last)).await?;
            self.metrics.audit_archived(a.segment);
            total += a.segment;
            tracing::info!(first, last, segment = %new.segment, "audit entries archived");
            self.audit(Event {
                kind: "audit_archived".into(),
                actor: "jitbroker".into(),
                detail: format!(
                    "entries {first}..{last} moved to {} (sha256 {})",
                    new.segment, new.segment_sha256
                ),
                ..Default::default()
            })?;
            self.store.durable().await?;
            cp = Some(new);
        }
    }

    /// Archives due audit segments every few seconds until `stop`.
    pub async fn run_audit_archiver(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.audit_archive.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.archive_audit().await {
                // Nothing is lost: the entries stay in the store until a step succeeds.
                tracing::error!(error = %e, "audit archival failed; retrying");
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

async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("archival task: {e}")))?
}
