//! Images (AMIs): RegisterImage's checks, the records, DescribeImages'
//! list (pending images settled from their snapshots first),
//! DeregisterImage with its snapshots, tags, and the rule that a snapshot
//! a registered image (or one in the recycle bin, see `bin`) uses cannot
//! be deleted.

use std::collections::BTreeMap;

use snapshot::SnapshotId;
use tracing::info;
use volumed_api::{
    BlockDeviceMapping, DeviceKind, ImageState, MAX_IMAGE_DESCRIPTION, MAX_IMAGE_NAME,
    RegisterImage, SnapshotSetState, check_all, valid_device_name, validate_tags,
};

use super::{MachineError, Machines, Result, fresh_id, gib_ceil, is_id};
use crate::catalog::{ImageRecord, SetState, SnapshotState, unix_now};
use crate::engine::Error;
use crate::engine::snapshot_catalog::SnapshotInfo;

/// Architectures RegisterImage accepts (EC2's).
pub const ARCHITECTURES: &[&str] = &["i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac"];
pub const DEFAULT_ARCHITECTURE: &str = "x86_64";

/// What a snapshot is, for a mapping that names it.
pub struct SnapshotFacts {
    pub size: u64,
    pub completed: bool,
    pub failed: bool,
}

impl Machines {
    /// Size and state of snapshot `raw`; `InvalidSnapshot.NotFound` when
    /// this host cannot see it.
    pub async fn snapshot_facts(&self, raw: &str) -> Result<SnapshotFacts> {
        let id = Error::snapshot_id(raw)?;
        Ok(match self.engine.snapshot(&id).await? {
            SnapshotInfo::Recorded { rec, .. } => SnapshotFacts {
                size: rec.size,
                completed: rec.state == SnapshotState::Completed,
                failed: rec.state == SnapshotState::Error,
            },
            SnapshotInfo::Stored(h) => SnapshotFacts {
                size: h.size,
                completed: true,
                failed: false,
            },
        })
    }

    /// Every EBS mapping's snapshot exists (else `InvalidSnapshot.NotFound`)
    /// and fits the size it is given; returns whether all are completed.
    pub(super) async fn check_snapshots(&self, mappings: &[BlockDeviceMapping]) -> Result<bool> {
        let mut completed = true;
        for m in mappings {
            let Ok(DeviceKind::Ebs(ebs)) = m.kind() else {
                continue;
            };
            let Some(snap) = &ebs.snapshot_id else {
                continue;
            };
            let facts = self.snapshot_facts(snap).await?;
            if facts.failed {
                return Err(Error::NoSuchSnapshotId(snap.clone()).into());
            }
            completed &= facts.completed;
            if let Some(gib) = ebs.volume_size
                && gib << 30 < facts.size
            {
                return Err(MachineError::SmallerThanSnapshot {
                    size: gib,
                    snapshot: snap.clone(),
                    needed: gib_ceil(facts.size),
                });
            }
        }
        Ok(completed)
    }

    pub async fn register_image(&self, req: RegisterImage) -> Result<ImageRecord> {
        check_image_name(&req.name)?;
        check_description(&req.description)?;
        let architecture = req
            .architecture
            .unwrap_or_else(|| DEFAULT_ARCHITECTURE.to_owned());
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(MachineError::Invalid(format!(
                "Invalid value '{architecture}' for Architecture: expected one of {}",
                ARCHITECTURES.join(", ")
            )));
        }
        validate_tags(&req.tags).map_err(|e| MachineError::Invalid(e.to_string()))?;
        check_root(&req.root_device_name, &req.mappings)?;
        let completed = self.check_snapshots(&req.mappings).await?;
        let _guard = self.lock.lock().await;
        self.check_name_free(&req.name)?;
        let rec = ImageRecord {
            id: fresh_id("ami"),
            name: req.name,
            description: req.description,
            architecture,
            root_device_name: req.root_device_name,
            mappings: req.mappings,
            state: if completed {
                ImageState::Available
            } else {
                ImageState::Pending
            },
            created_at: unix_now(),
            tags: req.tags,
            source_instance: None,
            snapshot_set: None,
            error: None,
        };
        self.catalog.put_image(&rec).await.map_err(Error::from)?;
        info!(image = %rec.id, name = %rec.name, "image registered");
        Ok(rec)
    }

    pub(super) fn check_name_free(&self, name: &str) -> Result<()> {
        if let Some(other) = self
            .catalog
            .images()
            .map_err(Error::from)?
            .into_iter()
            .find(|i| i.name == name)
        {
            return Err(MachineError::NameTaken {
                name: name.to_owned(),
                image: other.id,
            });
        }
        Ok(())
    }

    /// Every image, by id, pending ones settled from their snapshots.
    pub async fn images(&self) -> Result<Vec<ImageRecord>> {
        let mut all = self.catalog.images().map_err(Error::from)?;
        if all.iter().any(|i| i.state == ImageState::Pending) {
            let _guard = self.lock.lock().await;
            all = self.catalog.images().map_err(Error::from)?;
            for img in all.iter_mut().filter(|i| i.state == ImageState::Pending) {
                self.settle_pending(img).await?;
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    pub async fn image(&self, id: &str) -> Result<ImageRecord> {
        if !is_id("ami", id) {
            return Err(MachineError::ImageIdMalformed(id.to_owned()));
        }
        self.images()
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| MachineError::ImageNotFound(id.to_owned()))
    }

    /// A pending image becomes available once its snapshots are (its set
    /// completed), failed if one failed. Under the lock.
    async fn settle_pending(&self, img: &mut ImageRecord) -> Result<()> {
        let (state, error) = match &img.snapshot_set {
            Some(set) => match self.engine.snapshot_set(set) {
                Ok(s) if s.state == SetState::Completed => (ImageState::Available, None),
                Ok(s) if s.state == SetState::Failed => (
                    ImageState::Failed,
                    Some(format!(
                        "snapshot set {set} failed: {}",
                        s.error.unwrap_or_default()
                    )),
                ),
                Ok(_) => return Ok(()),
                Err(Error::SnapshotSetNotFound(_)) => (
                    ImageState::Failed,
                    Some(format!("snapshot set {set} is gone")),
                ),
                Err(e) => return Err(e.into()),
            },
            None => {
                let mut state = (ImageState::Available, None);
                for m in &img.mappings {
                    let Some(snap) = m.ebs.as_ref().and_then(|e| e.snapshot_id.as_ref()) else {
                        continue;
                    };
                    match self.snapshot_facts(snap).await {
                        Ok(f) if f.completed => {}
                        Ok(f) if !f.failed => return Ok(()),
                        Ok(_) | Err(MachineError::Engine(Error::SnapshotNotFound(_))) => {
                            state = (
                                ImageState::Failed,
                                Some(format!("snapshot {snap} failed or is gone")),
                            );
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                state
            }
        };
        img.state = state;
        img.error = error;
        self.catalog.put_image(img).await.map_err(Error::from)?;
        info!(image = %img.id, state = img.state.as_str(), "pending image settled");
        Ok(())
    }

    /// Deregisters image `id`; with `delete_snapshots`, deletes each of its
    /// snapshots that no other image uses. Returns what happened to each.
    pub async fn deregister_image(
        &self,
        id: &str,
        delete_snapshots: bool,
    ) -> Result<Vec<(String, std::result::Result<(), String>)>> {
        let img = self.image(id).await?;
        let _guard = self.lock.lock().await;
        self.catalog
            .remove_image(&img.id)
            .await
            .map_err(Error::from)?;
        info!(image = %img.id, "image deregistered");
        let mut out = Vec::new();
        if !delete_snapshots {
            return Ok(out);
        }
        let mut others = self.catalog.images().map_err(Error::from)?;
        // Images in the recycle bin keep theirs too; a bin that cannot be
        // read keeps every snapshot.
        match self.bin_entries().await {
            Ok(binned) => others.extend(binned.into_iter().map(|b| b.record)),
            Err(e) => {
                let why = format!("recycle bin unreadable: {}", volumed_api::error_chain(&e));
                return Ok(snapshots_of(&img)
                    .into_iter()
                    .map(|s| (s, Err(why.clone())))
                    .collect());
            }
        }
        for snap in snapshots_of(&img) {
            let r = match others.iter().find(|o| snapshots_of(o).contains(&snap)) {
                Some(o) => Err(format!("in use by {}", o.id)),
                None => match SnapshotId::parse(&snap) {
                    Some(sid) => self
                        .engine
                        .delete_snapshot(&sid)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err("not a snapshot id".into()),
                },
            };
            out.push((snap, r));
        }
        Ok(out)
    }

    /// Sets `set` and removes `remove` (a value given removes the key only
    /// while it has that value) on image `id`.
    pub async fn tag_image(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[(String, Option<String>)],
    ) -> Result<()> {
        let mut img = self.image(id).await?;
        let _guard = self.lock.lock().await;
        img.tags = crate::engine::volume_id::retag(&img.tags, set, remove)?;
        self.catalog.put_image(&img).await.map_err(Error::from)?;
        Ok(())
    }

    /// The image that uses snapshot `id`, if any.
    pub fn image_using(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .catalog
            .images()
            .map_err(Error::from)?
            .into_iter()
            .find(|i| snapshots_of(i).iter().any(|s| s == id))
            .map(|i| i.id))
    }

    /// Deletes snapshot `id` unless a registered image uses it
    /// (`InvalidSnapshot.InUse`, as AWS refuses it).
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.remove_snapshot(id, None).await
    }

    /// Deletes snapshot `id` into the recycle bin until `expires` (seconds
    /// since the epoch), unless a registered image uses it.
    pub async fn recycle_snapshot(&self, id: &SnapshotId, expires: u64) -> Result<()> {
        self.remove_snapshot(id, Some(expires)).await
    }

    async fn remove_snapshot(&self, id: &SnapshotId, bin_until: Option<u64>) -> Result<()> {
        let _guard = self.lock.lock().await;
        if let Some(image) = self.image_using(id.as_str())? {
            return Err(MachineError::SnapshotInUse {
                snapshot: id.to_string(),
                image,
            });
        }
        if let Some(image) = self.binned_image_using(id.as_str()).await? {
            return Err(MachineError::SnapshotInUse {
                snapshot: id.to_string(),
                image: format!("{image} (in the recycle bin)"),
            });
        }
        match bin_until {
            None => self.engine.delete_snapshot(id).await?,
            Some(expires) => self.engine.recycle_snapshot(id, expires).await?,
        }
        Ok(())
    }
}

/// The snapshots an image's EBS mappings name.
pub fn snapshots_of(img: &ImageRecord) -> Vec<String> {
    img.mappings
        .iter()
        .filter_map(|m| m.ebs.as_ref()?.snapshot_id.clone())
        .collect()
}

/// The image's set, when CreateImage made it: its members' state.
pub fn set_state(state: SetState) -> SnapshotSetState {
    match state {
        SetState::Creating => SnapshotSetState::Pending,
        SetState::Completed => SnapshotSetState::Completed,
        SetState::Failed => SnapshotSetState::Failed,
    }
}

/// AWS's rule for AMI names: 3 to 128 of letters, digits and `()[] ./-'@_`.
pub fn check_image_name(name: &str) -> Result<()> {
    let ok = (3..=MAX_IMAGE_NAME).contains(&name.chars().count())
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '(' | ')' | '[' | ']' | ' ' | '.' | '/' | '-' | '\'' | '@' | '_'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(MachineError::InvalidName(format!(
            "AMI name {name:?} is invalid: 3 to 128 of letters, digits and ( ) [ ] space . / - ' @ _"
        )))
    }
}

pub fn check_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_IMAGE_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(MachineError::Invalid(format!(
            "Value ({d}) for parameter Description is invalid. Expecting at most 255 printable characters."
        )));
    }
    Ok(())
}

/// Every mapping is well formed and complete, no device twice, and the
/// root device maps to an EBS volume from a snapshot.
pub fn check_root(root: &str, mappings: &[BlockDeviceMapping]) -> Result<()> {
    if !valid_device_name(root) {
        return Err(MachineError::Invalid(format!(
            "Value ({root}) for parameter RootDeviceName is invalid."
        )));
    }
    check_all(mappings)?;
    for m in mappings {
        if !m.no_device {
            m.check_complete()?;
        }
    }
    let has_root = mappings
        .iter()
        .any(|m| m.device_name == root && m.ebs.as_ref().is_some_and(|e| e.snapshot_id.is_some()));
    if !has_root {
        return Err(MachineError::BadMapping(format!(
            "The root device {root} must map to an EBS snapshot (BlockDeviceMapping with DeviceName={root} and Ebs.SnapshotId)"
        )));
    }
    Ok(())
}
