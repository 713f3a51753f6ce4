//! The snapshots this host can see: its own catalog records (with state
//! `pending` and `error` that only it knows) together with every manifest in
//! the store, whichever host took it. Manifest headers never change, so the
//! ones read are cached by id.
//!
//! It also carries the store-wide operations on snapshots: delete (through
//! the trash, or into the recycle bin), protection, restore from the bin,
//! verify, diff, and gc.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::diff::Diff;
use snapshot::{Manifest, ManifestHeader, ManifestReader, Repo, RepoError, SnapshotId};
use tracing::{info, warn};

use crate::catalog::{Catalog, SnapshotRecord, SnapshotState};
use crate::engine::error::{Error, Result};

/// A snapshot as this host knows it.
pub enum SnapshotInfo {
    /// This host took it; `live` is `(done, total)` chunks while its job runs.
    Recorded {
        rec: SnapshotRecord,
        live: Option<(u64, u64)>,
    },
    /// Known only from its manifest: another host took it, or this host's
    /// record of it is gone. Only completed snapshots have manifests.
    Stored(ManifestHeader),
}

impl SnapshotInfo {
    pub fn volume(&self) -> &str {
        match self {
            SnapshotInfo::Recorded { rec, .. } => &rec.volume,
            SnapshotInfo::Stored(h) => &h.volume,
        }
    }

    pub fn id(&self) -> &SnapshotId {
        match self {
            SnapshotInfo::Recorded { rec, .. } => &rec.id,
            SnapshotInfo::Stored(h) => &h.id,
        }
    }

    pub fn chunk_size(&self) -> u64 {
        match self {
            SnapshotInfo::Recorded { rec, .. } => rec.chunk_size,
            SnapshotInfo::Stored(h) => h.chunk_size,
        }
    }

    /// The domain and key it is sealed with, in an encrypted store.
    pub fn encryption(&self) -> Option<&snapshot::Encryption> {
        match self {
            SnapshotInfo::Recorded { rec, .. } => rec.encryption.as_ref(),
            SnapshotInfo::Stored(h) => h.encryption.as_ref(),
        }
    }

    /// Its manifest is in the store: it can be read and compared.
    pub fn completed(&self) -> bool {
        match self {
            SnapshotInfo::Recorded { rec, .. } => rec.state == SnapshotState::Completed,
            SnapshotInfo::Stored(_) => true,
        }
    }
}

pub struct SnapshotCatalog {
    catalog: Arc<Catalog>,
    repo: Repo,
    headers: Mutex<HashMap<SnapshotId, ManifestHeader>>,
}

impl SnapshotCatalog {
    pub fn new(catalog: Arc<Catalog>, repo: Repo) -> Self {
        SnapshotCatalog {
            catalog,
            repo,
            headers: Mutex::new(HashMap::new()),
        }
    }

    /// The repository, for the image bin's store entries (`image_bin`).
    pub(super) fn repo(&self) -> &Repo {
        &self.repo
    }

    fn headers(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, ManifestHeader>> {
        self.headers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This host's record of a snapshot.
    pub fn record(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        Ok(self.catalog.snapshots()?.into_iter().find(|r| r.id == *id))
    }

    /// A snapshot by id: this host's record, else its manifest's header.
    pub async fn get(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        if let Some(rec) = self.record(id)? {
            return Ok(SnapshotInfo::Recorded { rec, live: None });
        }
        match self.header(id).await {
            Ok(h) => Ok(SnapshotInfo::Stored(h)),
            Err(RepoError::MissingManifest(_)) => Err(Error::SnapshotNotFound(id.clone())),
            Err(e) => Err(Error::store(format!("read snapshot {id}"), e)),
        }
    }

    /// A manifest's header, read once per id.
    async fn header(&self, id: &SnapshotId) -> std::result::Result<ManifestHeader, RepoError> {
        if let Some(h) = self.headers().get(id) {
            return Ok(h.clone());
        }
        // The object alone: a format-2 root has the header, no pages needed.
        let m = self.repo.get_stored(id).await?;
        let h = m.header().clone();
        self.headers().insert(id.clone(), h.clone());
        Ok(h)
    }

    /// Every snapshot, oldest first: this host's records, and every other
    /// snapshot in the store. A completed snapshot of ours whose manifest is
    /// gone was deleted elsewhere; its record goes too. If the store cannot
    /// be listed, this host's records are the answer.
    pub async fn list(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut recs = self.catalog.snapshots()?;
        // (created_at, seq) orders them; seq orders ours within a second.
        let mut out: Vec<(String, u64, SnapshotInfo)> = Vec::new();
        match self.repo.list_snapshots().await {
            Ok(ids) => {
                let in_store: HashSet<&SnapshotId> = ids.iter().collect();
                let gone: Vec<SnapshotId> = recs
                    .iter()
                    .filter(|r| r.state == SnapshotState::Completed && !in_store.contains(&r.id))
                    .map(|r| r.id.clone())
                    .collect();
                for id in &gone {
                    info!(snapshot = %id, "snapshot deleted from the store elsewhere; dropping its record");
                    let _ = self.catalog.remove_snapshot(id.as_str()).await;
                }
                recs.retain(|r| !gone.contains(&r.id));
                let ours: HashSet<SnapshotId> = recs.iter().map(|r| r.id.clone()).collect();
                for id in ids.iter().filter(|id| !ours.contains(*id)) {
                    match self.header(id).await {
                        Ok(h) => out.push((h.created_at.clone(), 0, SnapshotInfo::Stored(h))),
                        Err(e) => {
                            warn!(snapshot = %id, error = %e, "unreadable manifest left out of the list")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot list the store; showing this host's snapshots only")
            }
        }
        for rec in recs {
            let key = crate::catalog::rfc3339(rec.created_at);
            out.push((key, rec.seq, SnapshotInfo::Recorded { rec, live: None }));
        }
        out.retain(|(_, _, s)| volume.is_none_or(|v| s.volume() == v));
        out.sort_by(|a, b| {
            (&a.0, a.1)
                .cmp(&(&b.0, b.1))
                .then_with(|| a.2.id().cmp(b.2.id()))
        });
        Ok(out.into_iter().map(|(_, _, s)| s).collect())
    }

    /// Deletes a snapshot from the store (through the trash, see
    /// snapshot::gc) and from this host's records. Its chunks stay until a
    /// gc finds them unreferenced.
    pub async fn delete(&self, id: &SnapshotId) -> Result<()> {
        let local = self.record(id)?;
        match self.repo.trash_manifest(id).await {
            Ok(()) => {}
            Err(RepoError::MissingManifest(_)) if local.is_some() => {}
            Err(RepoError::MissingManifest(_)) => {
                return Err(Error::SnapshotNotFound(id.clone()));
            }
            Err(e) => return Err(Error::store(format!("delete snapshot {id}"), e)),
        }
        self.catalog.remove_snapshot(id.as_str()).await?;
        self.headers().remove(id);
        Ok(())
    }

    /// Deletes a snapshot into the recycle bin until `expires` (seconds
    /// since the epoch; see snapshot::bin), and from this host's records.
    pub async fn recycle(&self, id: &SnapshotId, expires: u64) -> Result<()> {
        match self.repo.bin_manifest(id, expires).await {
            Ok(()) => {}
            Err(RepoError::MissingManifest(_)) if self.record(id)?.is_some() => {}
            Err(RepoError::MissingManifest(_)) => {
                return Err(Error::SnapshotNotFound(id.clone()));
            }
            Err(e) => return Err(Error::store(format!("recycle snapshot {id}"), e)),
        }
        self.catalog.remove_snapshot(id.as_str()).await?;
        self.headers().remove(id);
        Ok(())
    }

    /// Every snapshot in the recycle bin, with its manifest's header; an
    /// entry whose manifest cannot be read is left out and logged.
    pub async fn binned(&self) -> Result<Vec<(snapshot::bin::BinEntry, ManifestHeader)>> {
        let entries = self
            .repo
            .list_binned()
            .await
            .map_err(|e| Error::store("list the recycle bin", e))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            match self.repo.binned_manifest(&e).await {
                Ok(m) => {
                    let h = m.header().clone();
                    out.push((e, h));
                }
                Err(err) => {
                    warn!(snapshot = %e.id, error = %volumed_api::error_chain(&err), "unreadable recycle-bin entry left out of the list")
                }
            }
        }
        Ok(out)
    }

    /// Restores a snapshot from the recycle bin, as it was.
    pub async fn restore_binned(&self, id: &SnapshotId) -> Result<()> {
        match self
            .repo
            .restore_binned(id, std::time::SystemTime::now())
            .await
        {
            Ok(()) => Ok(()),
            Err(RepoError::NotInBin(_)) => Err(Error::NotInBin(id.clone())),
            Err(RepoError::BinExpired(_)) => Err(Error::BinExpired(id.clone())),
            Err(e) => Err(Error::store(format!("restore snapshot {id}"), e)),
        }
    }

    pub async fn is_protected(&self, id: &SnapshotId) -> Result<bool> {
        self.repo
            .is_protected(id)
            .await
            .map_err(|e| Error::store(format!("read the protection of snapshot {id}"), e))
    }

    pub async fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<()> {
        self.repo
            .set_protected(id, protected)
            .await
            .map_err(|e| Error::store(format!("protect snapshot {id}"), e))
    }

    pub async fn protected(&self) -> Result<std::collections::BTreeSet<SnapshotId>> {
        self.repo
            .list_protected()
            .await
            .map_err(|e| Error::store("list protected snapshots", e))
    }

    /// Reads every chunk of a snapshot and reports the missing or damaged.
    pub async fn verify(&self, id: &SnapshotId) -> Result<snapshot::verify::VerifyReport> {
        let r = match snapshot::verify::verify(&self.repo, id).await {
            Ok(r) => r,
            Err(RepoError::MissingManifest(_)) => {
                return Err(Error::SnapshotNotFound(id.clone()));
            }
            Err(e) => return Err(Error::store(format!("verify snapshot {id}"), e)),
        };
        if !r.is_ok() {
            warn!(snapshot = %id, missing = r.missing.len(), damaged = r.damaged.len(), "snapshot verification found problems");
        }
        Ok(r)
    }

    /// A snapshot's whole manifest, from the store.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let r = self.reader(id).await?;
        r.materialize()
            .await
            .map_err(|e| Error::store(format!("read snapshot {id}"), e))
    }

    /// A snapshot's manifest, read lazily (pages on demand).
    pub async fn reader(&self, id: &SnapshotId) -> Result<ManifestReader> {
        match self.repo.open_manifest(id).await {
            Ok(m) => Ok(m),
            Err(RepoError::MissingManifest(_)) => match self.record(id)? {
                // Ours, and not in the store: it never completed.
                Some(rec) if rec.state != SnapshotState::Completed => Err(Error::InvalidRequest(
                    format!("snapshot {id} is not completed"),
                )),
                _ => Err(Error::SnapshotNotFound(id.clone())),
            },
            Err(e) => Err(Error::store(format!("read snapshot {id}"), e)),
        }
    }

    /// The ranges that differ from `from` to `to` (see `snapshot::diff`);
    /// without `from`, the ranges of `to` that hold data.
    pub async fn diff(&self, from: Option<&SnapshotId>, to: &SnapshotId) -> Result<Diff> {
        let to = self.reader(to).await?;
        let from = match from {
            Some(id) => Some(self.reader(id).await?),
            None => None,
        };
        snapshot::diff::diff_readers(from.as_ref(), &to)
            .await
            .map_err(|e| match e {
                snapshot::diff::DiffError::Read(id, e) => {
                    Error::store(format!("read the manifest of snapshot {id}"), *e)
                }
                e => Error::InvalidRequest(e.to_string()),
            })
    }

    /// Collects garbage in the store; `grace` overrides the configured
    /// period for this run.
    pub async fn gc(&self, grace: Option<Duration>) -> Result<(Duration, snapshot::gc::GcReport)> {
        let grace = grace.unwrap_or(self.repo.gc_grace());
        let r = snapshot::gc::collect_observed(&self.repo, grace, &|deleted| {
            if deleted == 1 {
                crate::failpoint::hit("gc-mid-sweep");
            }
        })
        .await
        .map_err(|e| Error::store("gc stopped before deleting anything unsafe", e))?;
        Ok((grace, r))
    }
}
