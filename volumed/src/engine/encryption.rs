//! What encryption a volume and its snapshots get, and key rotation over
//! the store: the engine's use of the key service (`crate::keys`) and of
//! the repository's keyring.
//!
//! In an encrypted store every volume is encrypted: a new one under the key
//! it names (else the default key), in its key's store domain or a lineage
//! domain of its own (`--encryption-domain`); a restored one in its
//! snapshot's domain, so its incremental snapshots share the snapshot's
//! chunks. A restored volume cannot change key: copy the snapshot under the
//! other key first (`vol snapshot copy ID --key NAME`), as the copy must
//! reseal every chunk.

use std::sync::Arc;

use snapshot::crypt::RotateReport;
use snapshot::{Encryption, ManifestReader};

use snapshot::Repo;

use super::error::{Error, Result};
use crate::catalog::Catalog;
use crate::keys::{DomainScope, KeyInfo, KeyService};

/// The engine's encryption settings, set once at start.
pub struct EncryptionSettings {
    pub keys: Arc<KeyService>,
    pub scope: DomainScope,
}

/// What encryption new data gets: the one reader of the key service and
/// the store's keyring for the engine's parts (volumes, snapshots, copies).
pub(super) struct Sealing {
    pub(super) repo: Repo,
    encryption: std::sync::OnceLock<EncryptionSettings>,
}

impl Sealing {
    pub(super) fn new(repo: Repo) -> Self {
        Sealing {
            repo,
            encryption: std::sync::OnceLock::new(),
        }
    }

    /// Gives the engine the key service (the daemon does, at start).
    pub fn set_encryption(&self, keys: Arc<KeyService>, scope: DomainScope) {
        let _ = self.encryption.set(EncryptionSettings { keys, scope });
    }

    pub fn keys(&self) -> Result<&Arc<KeyService>> {
        self.encryption
            .get()
            .map(|s| &s.keys)
            .ok_or_else(|| Error::InvalidRequest("this volumed has no key service".into()))
    }

    pub fn store_encrypted(&self) -> bool {
        self.repo.is_encrypted()
    }

    /// The encryption a volume being created gets. `encrypted` and `key`
    /// are what the request asked for; `source` the snapshot it restores.
    pub(crate) async fn volume_encryption(
        &self,
        encrypted: Option<bool>,
        key: Option<&str>,
        source: Option<&ManifestReader>,
    ) -> Result<Option<Encryption>> {
        if !self.store_encrypted() {
            if encrypted == Some(true) || key.is_some() {
                return Err(Error::InvalidRequest(
                    "the store is not encrypted; start volumed with --store-encryption on over a new store to encrypt volumes".into(),
                ));
            }
            return Ok(None);
        }
        if encrypted == Some(false) {
            return Err(Error::InvalidRequest(
                "the store is encrypted: every volume in it is".into(),
            ));
        }
        let keys = self.keys()?;
        let named = match key {
            Some(k) => Some(keys.resolve_or_managed(k).await?),
            None => None,
        };
        if let Some(m) = source {
            let h = m.header();
            let Some(enc) = h.encryption.clone() else {
                return Err(Error::InvalidRequest(format!(
                    "snapshot {} names no key in an encrypted store",
                    h.id
                )));
            };
            if let Some(k) = named.filter(|k| k.id != enc.key) {
                return Err(Error::InvalidRequest(format!(
                    "snapshot {} is encrypted under another key than '{}'; copy it under that key first (vol snapshot copy {} --key {})",
                    h.id, k.name, h.id, k.name
                )));
            }
            return Ok(Some(enc));
        }
        let k = match named {
            Some(k) => k,
            None => keys.default_key().await?,
        };
        // Refused now rather than at the volume's first snapshot.
        snapshot::MasterKeys::check(keys.as_ref(), &k.id).map_err(|e| {
            Error::InvalidRequest(format!("cannot encrypt under key '{}': {e}", k.name))
        })?;
        Ok(Some(self.new_domain(&k)))
    }

    /// The encryption of a snapshot made from nothing (an EBS direct
    /// upload without a parent): as a new volume's.
    pub async fn new_encryption(
        &self,
        encrypted: Option<bool>,
        key: Option<&str>,
    ) -> Result<Option<Encryption>> {
        self.volume_encryption(encrypted, key, None).await
    }

    /// Gives a volume made before its store was encrypted (its host moved
    /// to an encrypted store) the default key's domain, through the
    /// record's owner, before its first snapshot there.
    pub(crate) async fn ensure_encryption(
        &self,
        catalog: &Catalog,
        vol: &super::Volume,
    ) -> Result<()> {
        if !self.store_encrypted() || vol.record().encryption.is_some() {
            return Ok(());
        }
        let enc = self.new_encryption(None, None).await?;
        vol.update_record(catalog, |r| {
            if r.encryption.is_none() {
                r.encryption = enc;
            }
            Ok(())
        })
        .await
    }

    /// A domain for new data under key `k`, as `--encryption-domain` says.
    pub(crate) fn new_domain(&self, k: &KeyInfo) -> Encryption {
        match self.encryption.get().map(|s| s.scope) {
            Some(DomainScope::Lineage) => Encryption::new_lineage(&k.id),
            _ => Encryption::store_domain(&k.id),
        }
    }

    /// The encryption a snapshot copy gets: under `key` if named (a full,
    /// resealed copy when that is another domain), else the source's.
    pub(crate) async fn copy_encryption(
        &self,
        source: &Option<Encryption>,
        key: Option<&str>,
    ) -> Result<Option<Encryption>> {
        let Some(key) = key else {
            return Ok(source.clone());
        };
        if !self.store_encrypted() {
            return Err(Error::InvalidRequest(
                "the store is not encrypted: a copy cannot name a key".into(),
            ));
        }
        let k = self.keys()?.resolve_or_managed(key).await?;
        match source {
            Some(s) if s.key == k.id => Ok(Some(s.clone())),
            _ => Ok(Some(self.new_domain(&k))),
        }
    }

    /// Rotates key `reference`: a new version on this host, then every data
    /// key it wraps in the store wrapped anew, and a new data key for new
    /// data in each of its domains.
    pub async fn rotate_key(&self, reference: &str) -> Result<(KeyInfo, RotateReport)> {
        let keys = self.keys()?;
        let k = keys.add_version(reference).await?;
        let report = match self.repo.keyring() {
            Some(ring) => ring.rotate(&k.id).await.map_err(|e| {
                Error::store(format!("rewrap the data keys of key '{}'", k.name), e)
            })?,
            None => RotateReport::default(),
        };
        Ok((k, report))
    }
}
