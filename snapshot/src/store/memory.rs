//! An object store in memory, for tests: the same semantics as the others
//! (whole objects, create-if-absent, modification times gc reads) with no
//! I/O, and a way to age an object without waiting.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

use super::{BoxFuture, ErrorKind, ObjectInfo, ObjectStore, PutOutcome, StoreError, valid_key};

/// A multipart upload in progress: its key and its parts by number.
type Upload = (String, BTreeMap<i32, Bytes>);

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, SystemTime)>>,
    /// Multipart uploads in progress: id → (key, parts by number).
    uploads: Mutex<BTreeMap<String, Upload>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an object's modification time, as if it had been written then.
    /// Returns whether the object exists.
    pub fn set_modified(&self, key: &str, t: SystemTime) -> bool {
        match self.lock().get_mut(key) {
            Some(o) => {
                o.1 = t;
                true
            }
            None => false,
        }
    }

    /// Number of objects stored.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn uploads_in_progress(&self) -> usize {
        self.uploads_lock().len()
    }

    fn uploads_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Upload>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, SystemTime)>> {
        // The map is never left half-updated, so a panic elsewhere while it
        // was held does not poison its contents.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Refuses keys the other stores would refuse, so tests catch them.
fn check(op: &'static str, key: &str) -> Result<(), StoreError> {
    if valid_key(key) {
        Ok(())
    } else {
        Err(StoreError::new(
            op,
            key,
            ErrorKind::Permanent,
            "invalid object key",
        ))
    }
}

impl ObjectStore for MemoryStore {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check("put", key)?;
            self.lock()
                .insert(key.to_owned(), (data, SystemTime::now()));
            Ok(())
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            check("put_if_absent", key)?;
            let mut objects = self.lock();
            if objects.contains_key(key) {
                return Ok(PutOutcome::AlreadyExists);
            }
            objects.insert(key.to_owned(), (data, SystemTime::now()));
            Ok(PutOutcome::Created)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            check("get", key)?;
            Ok(self.lock().get(key).map(|(b, _)| b.clone()))
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            check("head", key)?;
            Ok(self.lock().get(key).map(|(b, t)| ObjectInfo {
                key: key.to_owned(),
                size: b.len() as u64,
                modified: *t,
            }))
        })
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check("touch", key)?;
            match self.lock().get_mut(key) {
                Some(o) => {
                    o.1 = SystemTime::now();
                    Ok(())
                }
                None => Err(StoreError::new(
                    "touch",
                    key,
                    ErrorKind::Permanent,
                    "no such object",
                )),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, (b, t))| ObjectInfo {
                    key: k.clone(),
                    size: b.len() as u64,
                    modified: *t,
                })
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check("delete", key)?;
            self.lock().remove(key);
            Ok(())
        })
    }

    fn create_multipart<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            check("create_multipart", key)?;
            let mut uploads = self.uploads_lock();
            let id = format!("upload-{}", uploads.len() + 1);
            uploads.insert(id.clone(), (key.to_owned(), BTreeMap::new()));
            Ok(id)
        })
    }

    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        part: i32,
        data: Bytes,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let mut uploads = self.uploads_lock();
            match uploads.get_mut(upload) {
                Some((k, parts)) if k == key && (1..=10_000).contains(&part) => {
                    parts.insert(part, data);
                    Ok(format!("etag-{part}"))
                }
                _ => Err(StoreError::new(
                    "upload_part",
                    key,
                    ErrorKind::Permanent,
                    "no such upload, or a part number out of range",
                )),
            }
        })
    }

    fn complete_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: &'a [(i32, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let fail =
                |m: &str| StoreError::new("complete_multipart", key, ErrorKind::Permanent, m);
            let (k, mut stored) = self
                .uploads_lock()
                .remove(upload)
                .ok_or_else(|| fail("no such upload"))?;
            if k != key {
                return Err(fail("the upload is of another key"));
            }
            let mut whole = Vec::new();
            for (n, etag) in parts {
                let data = stored
                    .remove(n)
                    .ok_or_else(|| fail("a part named was not uploaded"))?;
                if *etag != format!("etag-{n}") {
                    return Err(fail("a part's etag does not match"));
                }
                whole.extend_from_slice(&data);
            }
            self.lock()
                .insert(key.to_owned(), (Bytes::from(whole), SystemTime::now()));
            Ok(())
        })
    }

    fn abort_multipart<'a>(
        &'a self,
        _key: &'a str,
        upload: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.uploads_lock().remove(upload);
            Ok(())
        })
    }

    fn describe(&self) -> String {
        "memory:".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn behaves_like_a_store() {
        let s = MemoryStore::new();
        s.put("chunks/ab/abc", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.put("chunks/cd/cde", Bytes::from_static(b"two"))
            .await
            .unwrap();
        s.put("manifests/snap-1", Bytes::from_static(b"m"))
            .await
            .unwrap();
        assert_eq!(s.get("chunks/ab/abc").await.unwrap().unwrap(), &b"one"[..]);
        assert_eq!(s.get("chunks/ab/nope").await.unwrap(), None);
        let keys: Vec<String> = s
            .list("chunks/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["chunks/ab/abc", "chunks/cd/cde"]);
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        assert!(s.set_modified("chunks/cd/cde", old));
        assert_eq!(
            s.head("chunks/cd/cde").await.unwrap().unwrap().modified,
            old
        );
        s.touch("chunks/cd/cde").await.unwrap();
        assert!(s.head("chunks/cd/cde").await.unwrap().unwrap().modified > old);
        assert_eq!(
            s.put_if_absent("manifests/snap-1", Bytes::from_static(b"x"))
                .await
                .unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(s.get("manifests/snap-1").await.unwrap().unwrap(), &b"m"[..]);
        assert_eq!(
            s.put_if_absent("manifests/snap-2", Bytes::from_static(b"x"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        s.delete("chunks/ab/abc").await.unwrap();
        s.delete("chunks/ab/abc").await.unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.put("../x", Bytes::new()).await.is_err());
    }
}
