//! Test-only I/O engine that models power loss: `--io-engine powerloss-sim`.
//!
//! `kill -9` keeps the page cache, so a crash test on a real engine cannot
//! tell a write that was synced from one that merely reached the kernel.
//! This engine keeps every change to a data file since that file's last
//! sync in process memory and applies it to the file only when a sync
//! covers it; reads see the pending changes laid over the file's bytes. A
//! `kill -9` then loses exactly what was never synced, as a power cut
//! would. Never use it in production: nothing is durable until a sync, and
//! it holds every unsynced byte in memory.
//!
//! What a sync applies follows what the daemon may assume of Linux:
//! - fsync applies everything pending;
//! - fdatasync applies written data only. Punched and zeroed ranges change
//!   only the extent tree, which fdatasync need not write (the volume syncs
//!   with fsync after a trim for exactly that reason), so they stay pending
//!   and reads keep seeing them as zeros.
//!
//! Pending state is per file (device and inode), shared by every
//! descriptor of it, and forgotten when the last [`DataFile`] holding the
//! file lets it go without syncing: that is the "crash" of a unit test.
//! Allocation queries (SEEK_DATA at open) see the file, that is, only what
//! was synced, as after a real power cut. Size changes (`set_len` at create
//! and grow) go to the file at once; the data files sync them straight
//! away, so the model loses nothing there.
//!
//! [`DataFile`]: super::DataFile

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, MutexGuard};

use super::engine::{PUNCH_HOLE, ZERO_RANGE, fallocate};
use super::op::{OpKind, OpResult};

/// What a pending range holds.
#[derive(Debug, Clone)]
enum Fill {
    Data(Vec<u8>),
    /// ZERO_RANGE: zeros, allocated.
    Zero,
    /// PUNCH_HOLE: zeros, a hole.
    Punch,
}

impl Fill {
    fn slice(&self, from: usize, to: usize) -> Fill {
        match self {
            Fill::Data(d) => Fill::Data(d[from..to].to_vec()),
            f => f.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Ext {
    len: u64,
    fill: Fill,
}

/// One file's unsynced changes: non-overlapping ranges by start offset, the
/// newest change of each byte only.
#[derive(Debug, Default)]
struct Pending {
    exts: BTreeMap<u64, Ext>,
    /// `DataFile`s holding the file open.
    holders: usize,
}

impl Pending {
    /// Records `fill` over `[start, start + len)`, replacing what it covers.
    fn put(&mut self, start: u64, len: u64, fill: Fill) {
        if len == 0 {
            return;
        }
        let end = start + len;
        let over: Vec<u64> = self
            .exts
            .range(..end)
            .rev()
            .take_while(|(k, e)| **k + e.len > start)
            .map(|(k, _)| *k)
            .collect();
        for k in over {
            let e = self.exts.remove(&k).expect("listed just now");
            let e_end = k + e.len;
            if k < start {
                let keep = (start - k) as usize;
                self.exts.insert(
                    k,
                    Ext {
                        len: start - k,
                        fill: e.fill.slice(0, keep),
                    },
                );
            }
            if e_end > end {
                let from = (end - k) as usize;
                self.exts.insert(
                    end,
                    Ext {
                        len: e_end - end,
                        fill: e.fill.slice(from, e.len as usize),
                    },
                );
            }
        }
        self.exts.insert(start, Ext { len, fill });
    }

    /// Lays the pending changes over `buf`, the file's bytes at `offset`.
    fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (k, e) in self.exts.range(..end).rev() {
            if k + e.len <= offset {
                // Ranges do not overlap, so no earlier one reaches further.
                break;
            }
            let from = (*k).max(offset);
            let to = (k + e.len).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match &e.fill {
                Fill::Data(d) => dst.copy_from_slice(&d[(from - k) as usize..(to - k) as usize]),
                Fill::Zero | Fill::Punch => dst.fill(0),
            }
        }
    }

    /// Applies to the file what a sync of this kind makes durable, and
    /// forgets it; the rest stays pending.
    fn apply(&mut self, file: &File, data_only: bool) -> io::Result<()> {
        let mut keep = BTreeMap::new();
        for (k, e) in std::mem::take(&mut self.exts) {
            let r = match &e.fill {
                Fill::Data(d) => file.write_all_at(d, k),
                Fill::Zero | Fill::Punch if data_only => {
                    keep.insert(k, e);
                    continue;
                }
                Fill::Zero => fallocate(file, ZERO_RANGE, k, e.len),
                Fill::Punch => fallocate(file, PUNCH_HOLE, k, e.len),
            };
            if let Err(err) = r {
                // Keep what was not applied (this one included) pending.
                keep.insert(k, e);
                self.exts.append(&mut keep);
                return Err(err);
            }
        }
        self.exts = keep;
        Ok(())
    }
}

type Key = (u64, u64);

fn key(file: &File) -> io::Result<Key> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// The power-loss engine's state: every data file's unsynced changes.
#[derive(Default)]
pub struct PowerlossSim {
    files: Mutex<HashMap<Key, Arc<Mutex<Pending>>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PowerlossSim {
    fn pending(&self, file: &File) -> io::Result<Arc<Mutex<Pending>>> {
        let k = key(file)?;
        Ok(Arc::clone(locked(&self.files).entry(k).or_default()))
    }

    /// A `DataFile` opened `file`.
    pub fn hold(&self, file: &File) {
        if let Ok(p) = self.pending(file) {
            locked(&p).holders += 1;
        }
    }

    /// A `DataFile` let `file` go; with the last holder, whatever it never
    /// synced is lost.
    pub fn release(&self, file: &File) {
        let Ok(k) = key(file) else { return };
        let mut files = locked(&self.files);
        if let Some(p) = files.get(&k) {
            let mut g = locked(p);
            g.holders = g.holders.saturating_sub(1);
            if g.holders == 0 {
                drop(g);
                files.remove(&k);
            }
        }
    }

    /// Runs one op the way the model says, blocking.
    pub fn run_blocking(&self, file: &File, offset: u64, mut kind: OpKind) -> OpResult {
        let p = match self.pending(file) {
            Ok(p) => p,
            Err(e) => return (Err(e), kind),
        };
        // The file's lock is held across the file I/O, so a read never
        // sees a sync half applied.
        let mut p = locked(&p);
        let r = match &mut kind {
            OpKind::Read(buf) => {
                let buf = buf.whole_mut();
                file.read_exact_at(buf, offset)
                    .map(|()| p.overlay(offset, buf))
            }
            OpKind::Write(buf) => {
                p.put(offset, buf.len() as u64, Fill::Data(buf.clone()));
                Ok(())
            }
            OpKind::Sync { data_only } => p.apply(file, *data_only).and_then(|()| {
                if *data_only {
                    file.sync_data()
                } else {
                    file.sync_all()
                }
            }),
            OpKind::Fallocate { mode, len } if *mode == PUNCH_HOLE => {
                p.put(offset, *len, Fill::Punch);
                Ok(())
            }
            OpKind::Fallocate { mode, len } if *mode == ZERO_RANGE => {
                p.put(offset, *len, Fill::Zero);
                Ok(())
            }
            OpKind::Fallocate { .. } => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "powerloss-sim models only punch and zero-range fallocate",
            )),
            // Hints: nothing reaches the file before a sync in this model,
            // as a real writeback that began proves nothing durable.
            OpKind::WillNeed { .. } | OpKind::WriteBack { .. } => Ok(()),
        };
        (r, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model checked against a plain buffer: random writes, zeroes and
    /// punches, read back through the overlay and, after fsync, from the
    /// file itself.
    #[test]
    fn overlay_and_apply_match_a_plain_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        const LEN: usize = 1 << 16;
        f.set_len(LEN as u64).unwrap();
        let sim = PowerlossSim::default();
        sim.hold(&f);
        let mut model = vec![0u8; LEN];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for step in 0..400 {
            let off = next(LEN - 1);
            let len = 1 + next((LEN - off).min(9000));
            let kind = match next(10) {
                0 => OpKind::Fallocate {
                    mode: PUNCH_HOLE,
                    len: len as u64,
                },
                1 => OpKind::Fallocate {
                    mode: ZERO_RANGE,
                    len: len as u64,
                },
                2 => OpKind::Sync {
                    data_only: next(2) == 0,
                },
                _ => OpKind::Write(vec![(step % 250 + 1) as u8; len]),
            };
            match &kind {
                OpKind::Write(b) => model[off..off + len].copy_from_slice(b),
                OpKind::Fallocate { .. } => model[off..off + len].fill(0),
                _ => {}
            }
            let (r, _) = sim.run_blocking(&f, off as u64, kind);
            r.unwrap();
            let (r, kind) = sim.run_blocking(&f, 0, OpKind::Read(vec![0; LEN].into()));
            r.unwrap();
            assert!(matches!(kind, OpKind::Read(b) if b == model), "step {step}");
        }
        let (r, _) = sim.run_blocking(&f, 0, OpKind::Sync { data_only: false });
        r.unwrap();
        let mut on_disk = vec![0u8; LEN];
        f.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, model);
    }

    /// Only a sync puts bytes in the file; fdatasync leaves trims pending.
    #[test]
    fn the_file_holds_only_what_a_sync_applied() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(8192).unwrap();
        let sim = PowerlossSim::default();
        let on_disk = |f: &File| {
            let mut b = vec![0u8; 8192];
            f.read_exact_at(&mut b, 0).unwrap();
            b
        };
        sim.run_blocking(&f, 0, OpKind::Write(vec![1; 8192]))
            .0
            .unwrap();
        assert!(on_disk(&f).iter().all(|b| *b == 0), "unsynced");
        sim.run_blocking(&f, 0, OpKind::Sync { data_only: true })
            .0
            .unwrap();
        assert!(on_disk(&f).iter().all(|b| *b == 1), "synced");
        let punch = OpKind::Fallocate {
            mode: PUNCH_HOLE,
            len: 4096,
        };
        sim.run_blocking(&f, 0, punch).0.unwrap();
        sim.run_blocking(&f, 0, OpKind::Sync { data_only: true })
            .0
            .unwrap();
        assert!(
            on_disk(&f).iter().all(|b| *b == 1),
            "fdatasync skips the punch"
        );
        let (_, kind) = sim.run_blocking(&f, 0, OpKind::Read(vec![9; 8192].into()));
        assert!(
            matches!(kind, OpKind::Read(b) if b[..4096] == [0; 4096] && b[4096..] == [1; 4096])
        );
        sim.run_blocking(&f, 0, OpKind::Sync { data_only: false })
            .0
            .unwrap();
        let b = on_disk(&f);
        assert!(b[..4096].iter().all(|x| *x == 0) && b[4096..].iter().all(|x| *x == 1));
    }
}
