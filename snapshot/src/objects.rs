//! Each kind of object as the store holds it, and back: plain in an
//! unencrypted store; sealed (see `crypt::seal`) in an encrypted one, in
//! the domain the writer is bound to (chunks, pages) or the manifest
//! header names (roots), and opened in the domain its frame names.
//!
//! An encrypted repository refuses plain objects, and a repository without
//! keys refuses sealed ones with an error saying so, never a decode error.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{self, CodecError, Encoded};
use crate::crypt::seal::{self, Kind, SealError};
use crate::crypt::{DomainKeys, Encryption};
use crate::hash::{ChunkHash, Naming};
use crate::manifest::{ManifestError, SnapshotId, StoredManifest};
use crate::page::{Page, PageSpan};
use crate::repo::{Repo, RepoError};
use crate::store::{ErrorKind, StoreError};

/// Raw chunks up to this size are verified on the calling task: hashing
/// (and opening) 1 MiB is a fraction of a millisecond, and a round trip
/// through the blocking pool for each chunk cost hydration two thread
/// switches.
const INLINE_VERIFY: usize = 1 << 20;

fn task_error(op: &'static str, e: tokio::task::JoinError) -> RepoError {
    RepoError::Store(StoreError::new(op, "", ErrorKind::Transient, e.to_string()))
}

impl Repo {
    /// The domain keys new chunks and pages are sealed with: `None` in an
    /// unencrypted store.
    pub(crate) async fn seal_keys(
        &self,
        enc: Option<&Encryption>,
    ) -> Result<Option<Arc<DomainKeys>>, RepoError> {
        match (self.keyring(), enc) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(RepoError::NotEncrypted),
            (Some(_), None) => Err(RepoError::NeedsKey),
            (Some(k), Some(e)) => k.for_seal(e).await.map(Some),
        }
    }

    /// Hashes, compresses and (in an encrypted store) seals a chunk, off
    /// the async workers.
    pub(crate) async fn encode_chunk(&self, data: Vec<u8>) -> Result<Encoded, RepoError> {
        let level = self.level();
        let keys = self.seal_keys(self.sealing()).await?;
        tokio::task::spawn_blocking(move || {
            let Some(d) = keys else {
                return Ok(codec::encode(&data, level));
            };
            let front = seal::frame_len(32);
            let mut e = codec::encode_named(&data, level, d.naming(), front, seal::TAG_LEN);
            let (generation, key) = d.newest();
            seal::seal_in_place(&mut e.bytes, Kind::Chunk, &d.id, generation, &e.hash.0, key)
                .map_err(|source| RepoError::CorruptChunk {
                    hash: e.hash,
                    source: CodecError::Seal(source),
                })?;
            Ok(e)
        })
        .await
        .map_err(|e| task_error("encode", e))?
    }

    /// A page's name and stored bytes.
    pub(crate) async fn encode_page(&self, page: &Page) -> Result<(ChunkHash, Vec<u8>), RepoError> {
        let Some(d) = self.seal_keys(self.sealing()).await? else {
            return Ok(page.encode());
        };
        let (name, plain) = page.encode_named(d.naming());
        let (generation, key) = d.newest();
        let sealed =
            seal::seal(&plain, Kind::Page, &d.id, generation, &name.0, key).map_err(|source| {
                RepoError::CorruptPage {
                    hash: name,
                    source: ManifestError::Seal(source),
                }
            })?;
        Ok((name, sealed))
    }

    /// A manifest-shaped object's stored bytes (a manifest, a hold): in an
    /// encrypted store sealed as the header's encryption says, named by
    /// the snapshot id.
    pub(crate) async fn encode_root(&self, m: &StoredManifest) -> Result<Vec<u8>, RepoError> {
        let h = m.header();
        let Some(d) = self.seal_keys(h.encryption.as_ref()).await? else {
            return Ok(m.encode());
        };
        let (generation, key) = d.newest();
        seal::seal(
            &m.encode(),
            Kind::Root,
            &d.id,
            generation,
            h.id.as_str().as_bytes(),
            key,
        )
        .map_err(|source| RepoError::CorruptManifest {
            id: h.id.to_string(),
            source: ManifestError::Seal(source),
        })
    }

    /// Opens a sealed object of `kind` named `name` (any name when `None`):
    /// its plaintext and the domain it was sealed in; in an unencrypted
    /// store the object as it is, and no domain. The object is decrypted
    /// in place unless shared.
    async fn open_object(
        &self,
        obj: Bytes,
        kind: Kind,
        name: Option<&[u8]>,
        what: &str,
    ) -> Result<(Bytes, Option<Arc<DomainKeys>>), Opened> {
        let Some(keyring) = self.keyring() else {
            if seal::is_sealed(&obj) {
                return Err(Opened::Repo(RepoError::NoKeys(what.to_owned())));
            }
            return Ok((obj, None));
        };
        let f = seal::frame(&obj).map_err(Opened::Seal)?;
        f.expect(kind, name).map_err(Opened::Seal)?;
        let d = keyring
            .for_open(&f.domain, f.generation)
            .await
            .map_err(Opened::Repo)?;
        let key = d
            .seal_key(f.generation)
            .expect("for_open checked the generation");
        let plain = if obj.len() <= INLINE_VERIFY {
            seal::open(obj, &f, key)
        } else {
            let key = key.clone();
            tokio::task::spawn_blocking(move || seal::open(obj, &f, &key))
                .await
                .map_err(|e| Opened::Repo(task_error("open", e)))?
        };
        Ok((plain.map_err(Opened::Seal)?, Some(d)))
    }

    /// Verifies and decodes a chunk object. Decompression, and hashing a
    /// large raw chunk, run off the async workers; a raw chunk comes back
    /// as a slice of `obj`.
    pub async fn decode_chunk(&self, obj: Bytes, hash: &ChunkHash) -> Result<Bytes, RepoError> {
        let h = *hash;
        let corrupt = |source| RepoError::CorruptChunk { hash: h, source };
        let what = format!("chunk {h}");
        let (obj, naming) = match self.open_object(obj, Kind::Chunk, Some(&h.0), &what).await {
            Ok((obj, None)) => (obj, Naming::Plain),
            Ok((plain, Some(d))) => (plain, *d.naming()),
            Err(Opened::Seal(e)) => return Err(corrupt(CodecError::Seal(e))),
            Err(Opened::Repo(e)) => return Err(e),
        };
        let r = if !codec::is_compressed(&obj) && obj.len() <= codec::HEADER_LEN + INLINE_VERIFY {
            codec::decode_shared_named(obj, &h, &naming)
        } else {
            tokio::task::spawn_blocking(move || codec::decode_shared_named(obj, &h, &naming))
                .await
                .map_err(|e| task_error("decode", e))?
        };
        r.map_err(corrupt)
    }

    /// Decodes page `name`, which must cover `span`.
    pub(crate) async fn decode_page(
        &self,
        obj: Bytes,
        name: &ChunkHash,
        span: PageSpan,
    ) -> Result<Page, RepoError> {
        let corrupt = |source| RepoError::CorruptPage {
            hash: *name,
            source,
        };
        let what = format!("manifest page {name}");
        match self
            .open_object(obj, Kind::Page, Some(&name.0), &what)
            .await
        {
            Ok((obj, None)) => Page::decode(&obj, name, span).map_err(corrupt),
            Ok((plain, Some(d))) => {
                Page::decode_named(&plain, name, span, d.naming()).map_err(corrupt)
            }
            Err(Opened::Seal(e)) => Err(corrupt(ManifestError::Seal(e))),
            Err(Opened::Repo(e)) => Err(e),
        }
    }

    /// Decodes the manifest-shaped object under store key `key`; `id` names
    /// it in errors.
    pub(crate) async fn decode_root(
        &self,
        obj: Bytes,
        key: &str,
        id: &str,
    ) -> Result<StoredManifest, RepoError> {
        Ok(self.decode_root_plain(obj, key, id).await?.0)
    }

    /// [`Repo::decode_root`], and the plaintext encoding it decoded.
    pub(crate) async fn decode_root_plain(
        &self,
        obj: Bytes,
        key: &str,
        id: &str,
    ) -> Result<(StoredManifest, Bytes), RepoError> {
        let corrupt = |source| RepoError::CorruptManifest {
            id: id.to_owned(),
            source,
        };
        let expected: Option<SnapshotId> = crate::keys::root_name_of_key(key);
        let name = expected.as_ref().map(|s| s.as_str().as_bytes());
        let what = format!("manifest {id}");
        let (plain, domain) = match self.open_object(obj, Kind::Root, name, &what).await {
            Ok(r) => r,
            Err(Opened::Seal(e)) => return Err(corrupt(ManifestError::Seal(e))),
            Err(Opened::Repo(e)) => return Err(e),
        };
        let m = StoredManifest::decode(&plain).map_err(corrupt)?;
        if let Some(d) = domain {
            // The header inside must agree with the frame outside.
            let h = m.header();
            let agrees = h
                .encryption
                .as_ref()
                .is_some_and(|e| e.domain == d.id && e.key == d.key)
                && expected.as_ref().is_none_or(|x| *x == h.id);
            if !agrees {
                return Err(corrupt(ManifestError::Seal(SealError::Name {
                    expected: format!("snapshot {} in domain {}", h.id, d.id),
                    found: "a header that names another".into(),
                })));
            }
        }
        Ok((m, plain))
    }
}

/// Why an object did not open: its seal, or the repository.
enum Opened {
    Seal(SealError),
    Repo(RepoError),
}
