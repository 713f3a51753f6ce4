//! The local-directory store, the embedded default. Each object is a file:
//! written to a temporary name, fsynced, renamed into place, and its
//! directory fsynced, so a crash leaves the old state or the new object,
//! never a torn one. A create-if-absent write hard-links the temporary file
//! into place instead of renaming it: `link` fails with `EEXIST` rather than
//! replace, which is what makes it atomic against another writer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{BoxFuture, ErrorKind, ObjectInfo, ObjectStore, PutOutcome, StoreError, valid_key};

pub struct LocalStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

const TMP_DIR: &str = ".tmp";

impl LocalStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let fail = |e: std::io::Error| {
            StoreError::new(
                "open",
                &root.display().to_string(),
                ErrorKind::Permanent,
                e.to_string(),
            )
        };
        std::fs::create_dir_all(root.join(TMP_DIR)).map_err(fail)?;
        // Temporary files of a crashed writer are garbage.
        if let Ok(rd) = std::fs::read_dir(root.join(TMP_DIR)) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(LocalStore {
            root: root.to_owned(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StoreError> {
        if !valid_key(key) {
            return Err(StoreError::new(
                op,
                key,
                ErrorKind::Permanent,
                "invalid object key",
            ));
        }
        Ok(self.root.join(key))
    }

    /// A fresh name in the temporary directory, unique across processes
    /// sharing the store and across calls.
    fn tmp_path(&self) -> PathBuf {
        self.root.join(TMP_DIR).join(format!(
            "{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// Writes `data` to a new file at `tmp` and makes it durable.
fn write_tmp(tmp: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(data)?;
    f.sync_all()
}

fn io_err(op: &'static str, key: &str, e: std::io::Error) -> StoreError {
    StoreError::new(op, key, ErrorKind::Permanent, e.to_string())
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| io_err(op, key, e)),
        Err(e) => Err(StoreError::new(
            op,
            key,
            ErrorKind::Transient,
            e.to_string(),
        )),
    }
}

impl ObjectStore for LocalStore {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path("put", key)?;
            let tmp = self.tmp_path();
            blocking("put", key, move || {
                let dir = path.parent().expect("keys have a directory").to_owned();
                std::fs::create_dir_all(&dir)?;
                // A write cut short (a full disk) leaves no half object.
                if let Err(e) = write_tmp(&tmp, &data).and_then(|()| std::fs::rename(&tmp, &path)) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                std::fs::File::open(&dir)?.sync_all()
            })
            .await
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            let path = self.path("put_if_absent", key)?;
            let tmp = self.tmp_path();
            blocking("put_if_absent", key, move || {
                let dir = path.parent().expect("keys have a directory").to_owned();
                std::fs::create_dir_all(&dir)?;
                if let Err(e) = write_tmp(&tmp, &data) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                // The complete, durable file appears under its key or not at
                // all; a crash before the temporary name is removed leaves
                // it for `open` to clear.
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        std::fs::File::open(&dir)?.sync_all()?;
                        Ok(PutOutcome::Created)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Ok(PutOutcome::AlreadyExists)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let path = self.path("get", key)?;
            blocking("get", key, move || match std::fs::read(&path) {
                Ok(b) => Ok(Some(Bytes::from(b))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .await
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let path = self.path("head", key)?;
            let k = key.to_owned();
            blocking("head", key, move || match std::fs::metadata(&path) {
                Ok(m) => Ok(Some(ObjectInfo {
                    key: k,
                    size: m.len(),
                    modified: m.modified()?,
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .await
        })
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path("touch", key)?;
            blocking("touch", key, move || {
                std::fs::File::options()
                    .write(true)
                    .open(&path)?
                    .set_modified(std::time::SystemTime::now())
            })
            .await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let root = self.root.clone();
            let prefix = prefix.to_owned();
            let p2 = prefix.clone();
            blocking("list", &p2, move || {
                let mut out = Vec::new();
                // Start from the deepest directory the prefix names.
                let start = match prefix.rfind('/') {
                    Some(i) => root.join(&prefix[..i]),
                    None => root.clone(),
                };
                walk(&root, &start, &mut |key, meta| {
                    if key.starts_with(&prefix) {
                        out.push(ObjectInfo {
                            key,
                            size: meta.len(),
                            modified: meta.modified()?,
                        });
                    }
                    Ok(())
                })?;
                Ok(out)
            })
            .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path("delete", key)?;
            blocking("delete", key, move || match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .await
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

type Visit<'a> = dyn FnMut(String, std::fs::Metadata) -> std::io::Result<()> + 'a;

fn walk(root: &Path, dir: &Path, f: &mut Visit<'_>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name() == TMP_DIR {
            continue;
        }
        if entry.file_type()?.is_dir() {
            walk(root, &path, f)?;
        } else if let Ok(rel) = path.strip_prefix(root)
            && let Some(key) = rel.to_str()
        {
            // A file removed since read_dir (a concurrent delete) is skipped.
            match entry.metadata() {
                Ok(m) => f(key.to_owned(), m)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
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
        assert!(s.exists("manifests/snap-1").await.unwrap());
        let keys = |list: Vec<ObjectInfo>| {
            let mut k: Vec<String> = list.into_iter().map(|o| o.key).collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(s.list("chunks/").await.unwrap()),
            ["chunks/ab/abc", "chunks/cd/cde"]
        );
        assert_eq!(
            keys(s.list("manifests/").await.unwrap()),
            ["manifests/snap-1"]
        );
        // Touch moves the modification time forward and keeps the bytes.
        let path = dir.path().join("chunks/cd/cde");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let before = s.head("chunks/cd/cde").await.unwrap().unwrap();
        assert_eq!(before.size, 3);
        s.touch("chunks/cd/cde").await.unwrap();
        let after = s.head("chunks/cd/cde").await.unwrap().unwrap();
        assert!(after.modified > before.modified);
        assert_eq!(s.get("chunks/cd/cde").await.unwrap().unwrap(), &b"two"[..]);
        s.delete("chunks/ab/abc").await.unwrap();
        s.delete("chunks/ab/abc").await.unwrap();
        assert!(!s.exists("chunks/ab/abc").await.unwrap());
        assert!(s.put("../escape", Bytes::new()).await.is_err());
        assert!(
            s.list("").await.unwrap().len() == 2,
            "the temp dir is not listed"
        );
    }

    #[tokio::test]
    async fn put_if_absent_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let key = "manifests/snap-1";
        assert_eq!(
            s.put_if_absent(key, Bytes::from_static(b"first"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_if_absent(key, Bytes::from_static(b"second"))
                .await
                .unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(s.get(key).await.unwrap().unwrap(), &b"first"[..]);
        assert!(
            std::fs::read_dir(dir.path().join(TMP_DIR))
                .unwrap()
                .next()
                .is_none(),
            "no temporary file is left behind"
        );
        assert!(s.put_if_absent("../x", Bytes::new()).await.is_err());

        // Racing writers: exactly one creates, every other finds it.
        let s = std::sync::Arc::new(s);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..16u8 {
            let s = std::sync::Arc::clone(&s);
            set.spawn(async move {
                s.put_if_absent("manifests/snap-2", Bytes::from(vec![i; 64]))
                    .await
                    .unwrap()
            });
        }
        let outcomes = set.join_all().await;
        let created = outcomes
            .iter()
            .filter(|o| **o == PutOutcome::Created)
            .count();
        assert_eq!(created, 1, "{outcomes:?}");
        let won = s.get("manifests/snap-2").await.unwrap().unwrap();
        assert!(won.len() == 64 && won.iter().all(|b| *b == won[0]));
    }
}
