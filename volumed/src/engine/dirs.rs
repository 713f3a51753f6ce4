//! Where volumes' data directories live (`DATA_DIR/volumes/<id>`, one per
//! volume, named by its id in hex, never reused) and the trash a deleted
//! volume's directory passes through (`DATA_DIR/trash/<id>`).
//!
//! A delete renames the directory into the trash under the lifecycle lock,
//! which is one atomic step however large the volume, and removes it from
//! there outside the lock. Start-up empties the trash (a removal a crash
//! cut short).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::disk::sync_dir;

#[derive(Clone)]
pub struct VolumeDirs {
    root: PathBuf,
    trash: PathBuf,
}

impl VolumeDirs {
    /// The directories under `data_dir`; created if missing.
    pub fn create(data_dir: &Path) -> std::io::Result<Self> {
        let dirs = VolumeDirs {
            root: data_dir.join("volumes"),
            trash: data_dir.join("trash"),
        };
        std::fs::create_dir_all(&dirs.root)?;
        std::fs::create_dir_all(&dirs.trash)?;
        Ok(dirs)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn volume(&self, id: u64) -> PathBuf {
        self.root.join(format!("{id:016x}"))
    }

    pub fn parse_id(name: &str) -> Option<u64> {
        (name.len() == 16)
            .then(|| u64::from_str_radix(name, 16).ok())
            .flatten()
    }

    /// Moves volume `id`'s directory into the trash and syncs the volumes
    /// directory; returns where it went (`None` if it was already gone).
    /// Blocking. Falls back to removing it in place where the trash is on
    /// another file system.
    pub fn discard(&self, id: u64) -> std::io::Result<Option<PathBuf>> {
        let dir = self.volume(id);
        let to = self.trash.join(format!("{id:016x}"));
        match std::fs::rename(&dir, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                std::fs::remove_dir_all(&dir)?;
                sync_dir(&self.root)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        sync_dir(&self.root)?;
        Ok(Some(to))
    }

    /// Removes what [`VolumeDirs::discard`] moved into the trash. Blocking;
    /// a failure is logged (start-up tries again).
    pub fn remove_discarded(path: &Path) {
        if let Err(e) = std::fs::remove_dir_all(path)
            && e.kind() != ErrorKind::NotFound
        {
            warn!(path = %path.display(), error = %e, "could not remove a deleted volume's files; start-up tries again");
        }
    }

    /// At start: removes everything in the trash. Blocking.
    pub fn empty_trash(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.trash)? {
            let path = entry?.path();
            info!(path = %path.display(), "removing a deleted volume's files a crash left in the trash");
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_moves_then_removal_empties() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = VolumeDirs::create(tmp.path()).unwrap();
        std::fs::create_dir(dirs.volume(7)).unwrap();
        std::fs::write(dirs.volume(7).join("seg-00000"), b"x").unwrap();
        let moved = dirs.discard(7).unwrap().expect("moved");
        assert!(!dirs.volume(7).exists());
        assert!(moved.join("seg-00000").exists());
        assert_eq!(dirs.discard(7).unwrap(), None, "already gone");
        // A crash before the removal: start-up empties the trash.
        dirs.empty_trash().unwrap();
        assert!(!moved.exists());
        std::fs::create_dir(dirs.volume(8)).unwrap();
        let moved = dirs.discard(8).unwrap().unwrap();
        VolumeDirs::remove_discarded(&moved);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("trash")).unwrap().count(),
            0
        );
    }
}
