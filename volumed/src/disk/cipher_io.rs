//! A data file's reads, writes and zeroing as its owner (the volume) sees
//! them: through the file's sector cipher when it has one (see
//! `sector_cipher`), else straight to the segments.
//!
//! With a cipher, whole sectors are encrypted in the caller's buffer and
//! written as they are; a write that covers part of a sector reads the
//! sector, patches it and writes it whole. Such partial writes take one
//! lock, so two that share a sector without overlapping both land (an
//! aligned write shares a sector only with a write that overlaps it, whose
//! order NBD leaves open). Zeroing a range punches or zeroes its whole
//! sectors (a zero sector reads as zeros) and writes encrypted zeros over
//! the partial ones at its edges.

use std::io;

use super::data_file::DataFile;
use super::engine::{PUNCH_HOLE, ZERO_RANGE};
use super::sector_cipher::{SECTOR, covering};

impl DataFile {
    /// Reads `len` bytes at `offset`. Holes read as zeros.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let Some(c) = self.cipher() else {
            return self.read_raw(offset, len).await;
        };
        let (start, end) = covering(offset, len as u64);
        let mut buf = self.read_raw(start, to_usize(end - start)?).await?;
        c.decrypt(start / SECTOR, &mut buf);
        if start == offset && buf.len() == len {
            return Ok(buf);
        }
        let at = to_usize(offset - start)?;
        Ok(buf[at..at + len].to_vec())
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<()> {
        let Some(c) = self.cipher() else {
            return self.write_raw(offset, buf).await;
        };
        let len = buf.len() as u64;
        let (start, end) = covering(offset, len);
        if start == offset && end == offset + len {
            c.encrypt(start / SECTOR, &mut buf);
            return self.write_raw(offset, buf).await;
        }
        let _partial = self.partial_lock().await;
        let s = SECTOR as usize;
        let mut whole = vec![0u8; to_usize(end - start)?];
        let head = offset != start;
        if head {
            whole[..s].copy_from_slice(&self.read(start, s).await?);
        }
        let tail = !(offset + len).is_multiple_of(SECTOR);
        if tail && !(head && end - start == SECTOR) {
            let n = whole.len();
            whole[n - s..].copy_from_slice(&self.read(end - SECTOR, s).await?);
        }
        let at = to_usize(offset - start)?;
        whole[at..at + buf.len()].copy_from_slice(&buf);
        c.encrypt(start / SECTOR, &mut whole);
        self.write_raw(start, whole).await
    }

    /// fallocate(2) over a byte range of the volume; with a cipher,
    /// [`PUNCH_HOLE`] and [`ZERO_RANGE`] leave every byte of the range
    /// reading as zero, partial sectors included.
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let zeroing = mode == PUNCH_HOLE || mode == ZERO_RANGE;
        if self.cipher().is_none() || !zeroing {
            return self.fallocate_raw(mode, offset, len).await;
        }
        let end = offset + len;
        let inner_start = offset.div_ceil(SECTOR) * SECTOR;
        let inner_end = end / SECTOR * SECTOR;
        if inner_start >= inner_end {
            if len > 0 {
                self.write(offset, vec![0; to_usize(len)?]).await?;
            }
            return Ok(());
        }
        self.fallocate_raw(mode, inner_start, inner_end - inner_start)
            .await?;
        if offset < inner_start {
            self.write(offset, vec![0; to_usize(inner_start - offset)?])
                .await?;
        }
        if inner_end < end {
            self.write(inner_end, vec![0; to_usize(end - inner_end)?])
                .await?;
        }
        Ok(())
    }
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::disk::{EngineChoice, IoEngine, SectorCipher};

    const SIZE: u64 = 64 << 10;
    const MARK: &[u8] = b"PLAINTEXT-MARK";

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize),
        Punch(u64, u64),
        Zero(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let at = 0..SIZE - 1;
        prop_oneof![
            (at.clone(), 1usize..3000).prop_map(|(o, n)| Op::Write(o, n)),
            (at.clone(), 1u64..5000).prop_map(|(o, n)| Op::Punch(o, n)),
            (at, 1u64..5000).prop_map(|(o, n)| Op::Zero(o, n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any sequence of aligned and unaligned writes, punches and
        /// zeroings reads back as a plain `Vec` would, and the file never
        /// holds the plaintext.
        #[test]
        fn encrypted_file_matches_a_plain_model(ops in proptest::collection::vec(op(), 1..12)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let tmp = tempfile::tempdir().unwrap();
                let engine = Arc::new(IoEngine::new(EngineChoice::Threads).unwrap());
                let df = DataFile::create(&tmp.path().join("v"), SIZE, engine)
                    .unwrap()
                    .with_cipher(SectorCipher::random());
                let mut model = vec![0u8; SIZE as usize];
                for (i, op) in ops.iter().enumerate() {
                    match *op {
                        Op::Write(o, n) => {
                            let n = n.min((SIZE - o) as usize);
                            let buf: Vec<u8> =
                                MARK.iter().cycle().skip(i).take(n).copied().collect();
                            model[o as usize..o as usize + n].copy_from_slice(&buf);
                            df.write(o, buf).await.unwrap();
                        }
                        Op::Punch(o, n) | Op::Zero(o, n) => {
                            let n = n.min(SIZE - o);
                            let mode = if matches!(op, Op::Punch(..)) { PUNCH_HOLE } else { ZERO_RANGE };
                            model[o as usize..(o + n) as usize].fill(0);
                            df.fallocate(mode, o, n).await.unwrap();
                        }
                    }
                }
                assert_eq!(df.read(0, SIZE as usize).await.unwrap(), model);
                assert_eq!(df.read(700, 1000).await.unwrap(), &model[700..1700]);
                let stored = std::fs::read(tmp.path().join("v").join("seg-00000")).unwrap();
                assert!(!stored.windows(MARK.len()).any(|w| w == MARK));
            });
        }
    }
}
