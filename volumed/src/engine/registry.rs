//! The volumes open on this host, by name, and the lock that serializes
//! lifecycle changes.
//!
//! Lifecycle changes (create, attach, detach, modify, delete, and the jobs'
//! record updates) take the async `lifecycle` lock: they are rare, and each
//! must see the state the previous one left in the catalog. The data path
//! never takes it; lookups take only the map's read lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use volumed_api::VolumeName;

use super::Volume;
use crate::error::{Error, Result};

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

    pub(super) fn remove(&self, name: &VolumeName) {
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Whether `vol` is still the volume registered under its name (not
    /// deleted, nor deleted and created again).
    pub fn is_current(&self, vol: &Arc<Volume>) -> bool {
        self.get(&vol.name).is_ok_and(|v| Arc::ptr_eq(&v, vol))
    }

    /// Held across one lifecycle change.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().await
    }
}
