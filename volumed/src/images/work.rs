//! `DATA_DIR/jobs`: a private directory per running import, holding the
//! socket its qemu-nbd serves the image on. Nothing in it outlives a run:
//! a resumed import keeps its checkpoint in the catalog and makes its
//! directory and socket anew, so at start everything here is stale.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

#[derive(Clone)]
pub struct WorkDirs {
    root: PathBuf,
}

impl WorkDirs {
    pub fn new(root: PathBuf) -> Self {
        WorkDirs { root }
    }

    /// Job `id`'s directory, created if missing.
    pub fn create(&self, id: &str) -> std::io::Result<PathBuf> {
        let dir = self.root.join(id);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Removes job `id`'s directory at the job's end.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.root.join(id));
    }

    /// At start, before any import resumes: removes what earlier runs left
    /// (a killed daemon's stale qemu-nbd sockets, the directories of imports
    /// that will not resume). The qemu-nbd that served such a socket died
    /// with the daemon that started it (`child::spawn`).
    pub fn clear_stale(&self) {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(e) => {
                warn!(dir = %self.root.display(), error = %e, "could not list the job work directories");
                return;
            }
        };
        let mut removed = 0usize;
        for entry in entries.flatten() {
            let path = entry.path();
            match remove(&path, entry.file_type().is_ok_and(|t| t.is_dir())) {
                Ok(()) => removed += 1,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "could not remove a stale job work entry")
                }
            }
        }
        if removed > 0 {
            info!(dir = %self.root.display(), removed, "removed what earlier runs left in the job work directory");
        }
    }
}

fn remove(path: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_and_directories_go() {
        let tmp = tempfile::tempdir().unwrap();
        let work = WorkDirs::new(tmp.path().join("jobs"));
        // No directory yet: nothing to do.
        work.clear_stale();
        let dir = work.create("job-0000000000000000").unwrap();
        // A socket as a killed qemu-nbd leaves it: bound, nobody listening.
        drop(std::os::unix::net::UnixListener::bind(dir.join("nbd.sock")).unwrap());
        assert!(dir.join("nbd.sock").exists());
        work.create("job-0000000000000001").unwrap();
        std::fs::write(tmp.path().join("jobs/stray"), b"x").unwrap();
        work.clear_stale();
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("jobs"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A resumed import makes its directory again.
        assert!(work.create("job-0000000000000000").unwrap().is_dir());
    }
}
