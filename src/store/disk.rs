//! The free-space floor of the data directory's file system. Under it the broker refuses writes
//! with an error that names the disk, and reports not ready, rather than letting the store's
//! flushes fail and its callers wait.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// `[store] min_free_mb` for the file system holding `dir`.
#[derive(Clone, Debug)]
pub struct DiskFloor {
    dir: PathBuf,
    min_free: u64,
}

impl DiskFloor {
    pub fn new(dir: PathBuf, min_free_mb: u64) -> Self {
        Self {
            dir,
            min_free: min_free_mb.saturating_mul(1 << 20),
        }
    }

    /// `Ok` while the file system has at least the floor free (one `statvfs`, so always current);
    /// otherwise `UNAVAILABLE` saying where and how much.
    pub fn check(&self) -> Result<()> {
        let free = fs2::available_space(&self.dir).map_err(|e| {
            Error::Unavailable(format!(
                "cannot measure free disk space of {}: {e}; writes are refused",
                self.dir.display()
            ))
        })?;
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
}
