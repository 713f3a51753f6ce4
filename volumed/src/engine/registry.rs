//! The volumes open on this host, by name, and the lock that serializes
//! lifecycle changes.
//!
//! Lifecycle changes (create, attach, detach, modify, delete) take the async
//! `lifecycle` lock: they are rare, and each checks the state the previous
//! one left before changing it. The record itself changes only through
//! `Volume::update_record`, which jobs use without this lock: it applies
//! their change to the current record and refuses a volume that no longer
//! owns it. The data path never takes either; lookups take only the map's
//! read lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use volumed_api::VolumeName;

use super::Volume;
use crate::engine::error::{Error, Result};

#[derive(Default)]
pub struct Registry {
    volumes: RwLock<HashMap<VolumeName, Arc<Volume>>>,
    lifecycle: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn get(&self, name: &VolumeName) -> Result<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(name.clone()))
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        let mut v: Vec<_> = self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(super) fn insert(&self, vol: Arc<Volume>) {
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vol.name.clone(), vol);
    }

    /// Removes `vol`, and only `vol`: never another volume registered under
    /// its name since.
    pub(crate) fn remove(&self, vol: &Arc<Volume>) {
        let mut volumes = self.volumes.write().unwrap_or_else(|e| e.into_inner());
        if volumes.get(&vol.name).is_some_and(|v| Arc::ptr_eq(v, vol)) {
            volumes.remove(&vol.name);
        }
    }

    /// Held across one lifecycle change.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().await
    }
}
