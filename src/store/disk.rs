//! The free-space floor of the data directory's file system. Under it the broker refuses writes
//! with an error that names the disk, and reports not ready, rather than letting the store's
//! flushes fail and its callers wait.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a measurement well above the floor is trusted without measuring again.
const TRUSTED_FOR: Duration = Duration::from_millis(50);
/// How far above the floor a measurement must be to be trusted for [`TRUSTED_FOR`]: filling
/// this much in that time would take over a gigabyte a second.
const HEADROOM: u64 = 64 << 20;

/// `[store] min_free_mb` for the file system holding `dir`.
#[derive(Clone, Debug)]
pub struct DiskFloor {
    dir: PathBuf,
    min_free: u64,
    /// The instant every check measures from.
    epoch: Instant,
    /// Nanoseconds after `epoch` until which the last measurement is trusted (0: measure).
    trusted_until: Arc<AtomicU64>,
}

impl DiskFloor {
    pub fn new(dir: PathBuf, min_free_mb: u64) -> Self {
        Self {
            dir,
            min_free: min_free_mb.saturating_mul(1 << 20),
            epoch: Instant::now(),
            trusted_until: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `Ok` while the file system has at least the floor free; otherwise `UNAVAILABLE` saying
    /// where and how much. Each call measures (`statvfs`), except within 50 ms of a measurement
    /// that found 64 MiB more than the floor free: every writing call checks, and at thousands
    /// of calls a second the measurement was a percent of the broker's CPU.
    pub fn check(&self) -> Result<()> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<()> {
        let at =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        if at < self.trusted_until.load(Ordering::Relaxed) {
            return Ok(());
        }
        let free = self.measure()?;
        if free >= self.min_free.saturating_add(HEADROOM) {
            let until = at.saturating_add(TRUSTED_FOR.as_nanos() as u64);
            self.trusted_until.store(until, Ordering::Relaxed);
            return Ok(());
        }
        self.trusted_until.store(0, Ordering::Relaxed);
        self.judge(free)
    }

    fn measure(&self) -> Result<u64> {
        fs2::available_space(&self.dir).map_err(|e| {
            Error::Unavailable(format!(
                "cannot measure free disk space of {}: {e}; writes are refused",
                self.dir.display()
            ))
        })
    }

    fn judge(&self, free: u64) -> Result<()> {
        if free < self.min_free {
            return Err(Error::Unavailable(format!(
                "the disk holding {} has {} MiB free, under [store] min_free_mb = {}; writes are \
                 refused until space is freed",
                self.dir.display(),
                free >> 20,
                self.min_free >> 20
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_refuses_naming_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskFloor::new(dir.path().into(), 0).check().is_ok());
        let err = DiskFloor::new(dir.path().into(), u64::MAX >> 21)
            .check()
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("min_free_mb"),
            "{msg}"
        );
    }

    #[test]
    fn a_measurement_well_above_the_floor_is_trusted_for_a_moment_only() {
        let dir = tempfile::tempdir().unwrap();
        let floor = DiskFloor::new(dir.path().into(), 0);
        let t0 = floor.epoch + Duration::from_secs(1);
        floor.check_at(t0).unwrap();
        let until = floor.trusted_until.load(Ordering::Relaxed);
        assert_eq!(
            until,
            (Duration::from_secs(1) + TRUSTED_FOR).as_nanos() as u64
        );
        // Within the window nothing is measured: a directory gone meanwhile is not noticed.
        let gone = DiskFloor {
            dir: dir.path().join("missing"),
            ..floor.clone()
        };
        gone.check_at(t0 + TRUSTED_FOR / 2).unwrap();
        // After it, the next call measures again (and here fails, naming the directory).
        let err = gone.check_at(t0 + TRUSTED_FOR).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        // A refusal is never trusted: every call under the floor measures.
        let high = DiskFloor::new(dir.path().into(), u64::MAX >> 21);
        assert!(high.check_at(t0).is_err());
        assert_eq!(high.trusted_until.load(Ordering::Relaxed), 0);
    }
}
