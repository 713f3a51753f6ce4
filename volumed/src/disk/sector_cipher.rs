//! A length-preserving cipher for a data file: XTS-AES-256 (IEEE 1619, as
//! dm-crypt's `aes-xts-plain64`) over 512-byte sectors, the sector's index
//! in the file as the tweak, under a random key that exists only in this
//! process's memory. When the process ends, nothing can read the file
//! again (crypto-shred).
//!
//! Why XTS: the file keeps its layout (sector `i` of the volume is bytes
//! `512 i` to `512 i + 511` of the file), so holes, SEEK_DATA, punching and
//! positional I/O work as on a plain file; no side file of nonces has to be
//! written and synced with the data. What XTS does not give (and an
//! ephemeral volume's threat, a data file left behind, does not need):
//! authentication (a changed sector decrypts to garbage, not to an error),
//! and hiding which sectors changed between two looks at the file.
//!
//! A sector whose stored bytes are all zero is a hole (never written, or
//! punched) and reads as zeros; an encrypted sector is all zero with
//! probability 2^-4096.

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};

/// Bytes per sector: volume sizes are multiples of it.
pub const SECTOR: u64 = 512;
const SECTOR_LEN: usize = SECTOR as usize;
const BLOCKS: usize = SECTOR_LEN / 16;

type Block = GenericArray<u8, aes::cipher::consts::U16>;

/// The key of one data file, held only here.
pub struct SectorCipher {
    keys: Box<Keys>,
}

/// XTS's two AES key schedules (zeroed when dropped), on page(s) of their
/// own so that they can be kept out of swap and core dumps.
#[repr(C, align(4096))]
struct Keys {
    data: Aes256,
    tweak: Aes256,
}

impl Keys {
    fn span(&self) -> (*mut libc::c_void, usize) {
        (
            self as *const Keys as *mut libc::c_void,
            std::mem::size_of::<Keys>(),
        )
    }
}

/// Keeps `keys` in RAM (`mlock`) and out of core dumps (`MADV_DONTDUMP`)
/// where the system lets it (`RLIMIT_MEMLOCK`); a refusal is logged, and
/// the key is then as safe as the rest of the daemon's memory.
fn protect(keys: &Keys) {
    let (ptr, len) = keys.span();
    // SAFETY: `ptr..ptr + len` is exactly the page-aligned allocation of
    // the `Box<Keys>` (its alignment and size are multiples of the page),
    // alive while the cipher is; neither call reads or writes its bytes.
    let locked = unsafe { libc::mlock(ptr, len) } == 0;
    // SAFETY: as above.
    let undumped = unsafe { libc::madvise(ptr, len, libc::MADV_DONTDUMP) } == 0;
    if !(locked && undumped) {
        tracing::debug!(locked, undumped, error = %std::io::Error::last_os_error(),
            "a data file's key could not be kept out of swap or core dumps");
    }
}

impl Drop for SectorCipher {
    fn drop(&mut self) {
        let (ptr, len) = self.keys.span();
        // SAFETY: the span `protect` locked, still allocated; the key
        // schedules are zeroed right after, when the box drops.
        unsafe { libc::munlock(ptr, len) };
    }
}

impl std::fmt::Debug for SectorCipher {
    // Key material never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(..)")
    }
}

impl SectorCipher {
    /// A fresh random key (the operating system's generator).
    pub fn random() -> Self {
        use ring::rand::SecureRandom;
        let mut key = [0u8; 64];
        // The system generator fails only where the OS has none at all.
        ring::rand::SystemRandom::new()
            .fill(&mut key)
            .expect("the operating system's random generator works");
        let c = Self::from_key(&key);
        zeroize::Zeroize::zeroize(&mut key);
        c
    }

    /// XTS's two keys: the data key, then the tweak key.
    fn from_key(key: &[u8; 64]) -> Self {
        let keys = Box::new(Keys {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
        });
        protect(&keys);
        SectorCipher { keys }
    }

    /// Encrypts `buf`, whole sectors starting at sector `first`, in place.
    pub fn encrypt(&self, first: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR_LEN, 0);
        for (i, s) in buf.chunks_exact_mut(SECTOR_LEN).enumerate() {
            self.sector(first + i as u64, s, true);
        }
    }

    /// Decrypts `buf`, whole sectors starting at sector `first`, in place;
    /// an all-zero sector (a hole) stays zero.
    pub fn decrypt(&self, first: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR_LEN, 0);
        for (i, s) in buf.chunks_exact_mut(SECTOR_LEN).enumerate() {
            if s.iter().any(|b| *b != 0) {
                self.sector(first + i as u64, s, false);
            }
        }
    }

    /// One sector: each block XORed with its tweak, through AES, XORed
    /// again. The 32 blocks go through AES together (AES-NI pipelines
    /// them), not one by one.
    fn sector(&self, index: u64, s: &mut [u8], encrypt: bool) {
        let mut t = Block::from(u128::from(index).to_le_bytes());
        self.keys.tweak.encrypt_block(&mut t);
        let mut tweak = u128::from_le_bytes(t.into());
        let mut tweaks = [0u128; BLOCKS];
        let mut blocks = [Block::default(); BLOCKS];
        for ((b, t), bytes) in blocks
            .iter_mut()
            .zip(tweaks.iter_mut())
            .zip(s.chunks_exact(16))
        {
            *t = tweak;
            let x = u128::from_le_bytes(bytes.try_into().expect("16-byte block")) ^ tweak;
            *b = Block::from(x.to_le_bytes());
            tweak = times_alpha(tweak);
        }
        if encrypt {
            self.keys.data.encrypt_blocks(&mut blocks);
        } else {
            self.keys.data.decrypt_blocks(&mut blocks);
        }
        for ((b, t), out) in blocks.iter().zip(tweaks).zip(s.chunks_exact_mut(16)) {
            let x = u128::from_le_bytes((*b).into()) ^ t;
            out.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Multiplication by the primitive element of GF(2^128), little-endian
/// as XTS defines it.
fn times_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// The sector-aligned range `[start, end)` covering `[offset, offset + len)`.
pub fn covering(offset: u64, len: u64) -> (u64, u64) {
    let start = offset - offset % SECTOR;
    let end = (offset + len).div_ceil(SECTOR) * SECTOR;
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> [u8; 64] {
        std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
    }

    /// The same bytes as an independent XTS implementation (the
    /// `xts-mode` crate, tested there against OpenSSL).
    #[test]
    fn matches_a_reference_xts() {
        let k = key(7);
        let ours = SectorCipher::from_key(&k);
        let reference = xts_mode::Xts128::new(
            Aes256::new(GenericArray::from_slice(&k[..32])),
            Aes256::new(GenericArray::from_slice(&k[32..])),
        );
        let plain: Vec<u8> = (0..4 * SECTOR_LEN).map(|i| (i * 7 + 3) as u8).collect();
        for first in [0u64, 1, 1 << 40, u64::MAX - 4] {
            let mut a = plain.clone();
            ours.encrypt(first, &mut a);
            let mut b = plain.clone();
            reference.encrypt_area(
                &mut b,
                SECTOR_LEN,
                u128::from(first),
                xts_mode::get_tweak_default,
            );
            assert_eq!(a, b, "first sector {first}");
            ours.decrypt(first, &mut a);
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn holes_read_as_zeros_and_zeros_written_do_not_look_like_holes() {
        let c = SectorCipher::from_key(&key(1));
        let mut hole = vec![0u8; 2 * SECTOR_LEN];
        c.decrypt(5, &mut hole);
        assert!(hole.iter().all(|b| *b == 0));
        let mut zeros = vec![0u8; SECTOR_LEN];
        c.encrypt(5, &mut zeros);
        assert!(zeros.iter().any(|b| *b != 0));
        c.decrypt(5, &mut zeros);
        assert!(zeros.iter().all(|b| *b == 0));
    }

    #[test]
    fn keys_sit_on_pages_of_their_own() {
        let c = SectorCipher::from_key(&key(3));
        let (ptr, len) = c.keys.span();
        assert_eq!(ptr as usize % 4096, 0);
        assert_eq!(len % 4096, 0);
    }

    #[test]
    fn covering_ranges() {
        assert_eq!(covering(0, 512), (0, 512));
        assert_eq!(covering(1, 1), (0, 512));
        assert_eq!(covering(511, 2), (0, 1024));
        assert_eq!(covering(1024, 0), (1024, 1024));
        assert_eq!(covering(4096, 4097), (4096, 8704));
    }

    proptest! {
        /// Round trips; the same plaintext in two sectors, or under two
        /// keys, gives different bytes.
        #[test]
        fn round_trips_and_depends_on_sector_and_key(
            data in proptest::collection::vec(any::<u8>(), SECTOR_LEN..=SECTOR_LEN),
            first in any::<u64>().prop_map(|x| x / 2),
            seed in any::<u8>(),
        ) {
            let c = SectorCipher::from_key(&key(seed));
            let mut twice = [data.clone(), data.clone()].concat();
            c.encrypt(first, &mut twice);
            prop_assert_ne!(&twice[..SECTOR_LEN], &twice[SECTOR_LEN..]);
            let mut other = data.clone();
            SectorCipher::from_key(&key(seed.wrapping_add(1))).encrypt(first, &mut other);
            prop_assert_ne!(&other[..], &twice[..SECTOR_LEN]);
            c.decrypt(first, &mut twice);
            prop_assert_eq!(&twice[..SECTOR_LEN], &data[..]);
            prop_assert_eq!(&twice[SECTOR_LEN..], &data[..]);
        }
    }
}
