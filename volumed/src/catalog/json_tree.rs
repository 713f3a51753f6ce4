//! A tree of JSON records by string key, for the trees whose records are
//! replaced whole (snapshot sets, images, instances): put, get, remove and
//! scan, each change flushed before it returns, like every catalog change.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CatalogError, Result, sled_err};

pub(super) struct JsonTree {
    db: sled::Db,
    tree: sled::Tree,
    /// The tree's name, for errors.
    name: &'static str,
}

impl JsonTree {
    pub(super) fn open(db: &sled::Db, name: &'static str) -> Result<Self> {
        Ok(JsonTree {
            db: db.clone(),
            tree: db.open_tree(name).map_err(sled_err("open tree"))?,
            name,
        })
    }

    pub(super) fn put<T: Serialize>(&self, key: &str, rec: &T) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a catalog record always serializes");
        self.tree.insert(key, value).map_err(sled_err(self.name))?;
        self.flush()
    }

    pub(super) fn remove(&self, key: &str) -> Result<()> {
        self.tree.remove(key).map_err(sled_err(self.name))?;
        self.flush()
    }

    pub(super) fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(v) = self.tree.get(key).map_err(sled_err(self.name))? else {
            return Ok(None);
        };
        decode(key.as_bytes(), &v).map(Some)
    }

    /// Every record, by key.
    pub(super) fn all<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        self.tree
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err(self.name))?;
                decode(&k, &v)
            })
            .collect()
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_err("flush"))
    }
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| CatalogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}
