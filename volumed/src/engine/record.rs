//! A volume's catalog record as its `Volume` holds it, and the record's one
//! writer. A change is applied to the record as it is now and written with
//! a compare-and-swap against exactly that record (`Catalog::replace_volume`),
//! then kept here; writers take turns. The holder owns the record until it
//! is marked `deleting` or handed to a volume reopened from the same files;
//! from then on every change is refused, so a job that outlives its volume
//! can never write a record that is no longer its own.

use std::sync::Mutex;

use volumed_api::VolumeName;

use super::error::{Error, Result};
use crate::catalog::{Catalog, VolumeRecord};

pub(super) struct RecordOwner {
    cell: Mutex<Cell>,
    /// Serializes the writers, across the catalog write.
    writer: tokio::sync::Mutex<()>,
}

struct Cell {
    rec: VolumeRecord,
    owner: bool,
}

impl RecordOwner {
    pub(super) fn new(rec: VolumeRecord) -> Self {
        RecordOwner {
            cell: Mutex::new(Cell { rec, owner: true }),
            writer: tokio::sync::Mutex::new(()),
        }
    }

    fn cell(&self) -> std::sync::MutexGuard<'_, Cell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self) -> VolumeRecord {
        self.cell().rec.clone()
    }

    /// See `Volume::update_record`.
    pub(super) async fn update<T>(
        &self,
        name: &VolumeName,
        catalog: &Catalog,
        change: impl FnOnce(&mut VolumeRecord) -> Result<T>,
    ) -> Result<T> {
        let _writer = self.writer.lock().await;
        let old = {
            let cell = self.cell();
            if !cell.owner {
                return Err(Error::VolumeNotFound(name.clone()));
            }
            cell.rec.clone()
        };
        let mut new = old.clone();
        let out = change(&mut new)?;
        if new.id != old.id || new.name != old.name {
            return Err(Error::InvalidRequest(format!(
                "volume '{name}': a record change may not alter its id or name"
            )));
        }
        if new != old {
            catalog.replace_volume(&old, &new).await?;
            let mut cell = self.cell();
            cell.owner = !new.deleting;
            cell.rec = new;
        }
        Ok(out)
    }

    pub(super) fn retire(&self) {
        self.cell().owner = false;
    }
}
