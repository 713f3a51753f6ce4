//! A key file: `DATA_DIR/keys/<name>.key`, JSON, mode 0600 in a directory
//! of mode 0700. Whoever reads it can read every snapshot sealed under the
//! key, so a file others may read or write is refused, as the AWS
//! credentials file is.
//!
//! ```json
//! {"id": "3f1c9a2e-…", "name": "backup", "created_at": "2026-12-06T10:00:00Z",
//!  "enabled": true, "description": "",
//!  "versions": {"1": "<64 hex digits>", "2": "<64 hex digits>"},
//!  "command": null, "command_version": 0}
//! ```
//!
//! A key whose material lives in an external KMS has no `versions`: its
//! `command` prints a version's material (see `command`), and
//! `command_version` is its newest version.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapshot::crypt::MasterSecret;

use super::KeyServiceError;

/// The suffix of key files in the key directory.
pub const SUFFIX: &str = ".key";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// The key's id (a UUID): what manifests and data key wraps name.
    pub id: String,
    pub name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub enabled: bool,
    #[serde(default)]
    pub description: String,
    /// Local material by version, 64 hex digits each.
    #[serde(default)]
    pub versions: BTreeMap<u32, String>,
    /// For an external KMS: the command printing a version's material.
    #[serde(default)]
    pub command: Option<String>,
    /// The newest version of a command key.
    #[serde(default)]
    pub command_version: u32,
}

impl KeyFile {
    /// The newest version.
    pub fn current_version(&self) -> u32 {
        match &self.command {
            Some(_) => self.command_version,
            None => self.versions.keys().last().copied().unwrap_or(0),
        }
    }

    /// Local material by version.
    pub fn local_material(
        &self,
        path: &Path,
    ) -> Result<BTreeMap<u32, MasterSecret>, KeyServiceError> {
        self.versions
            .iter()
            .map(|(v, hex)| {
                parse_material(hex)
                    .map(|m| (*v, m))
                    .ok_or_else(|| KeyServiceError::Format {
                        path: path.display().to_string(),
                        reason: format!("version {v} is not 64 hex digits"),
                    })
            })
            .collect()
    }
}

/// 64 hex digits (either case), surrounding whitespace ignored.
pub fn parse_material(s: &str) -> Option<MasterSecret> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let h: snapshot::ChunkHash = s.to_ascii_lowercase().parse().ok()?;
    Some(MasterSecret(h.0))
}

pub fn material_hex(m: &MasterSecret) -> String {
    snapshot::hash::hex(&m.0)
}

pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{SUFFIX}"))
}

/// Reads a key file, refusing one others may read or write.
pub fn read(path: &Path) -> Result<KeyFile, KeyServiceError> {
    let io = |source| KeyServiceError::Io {
        context: format!("read {}", path.display()),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeyServiceError::Permissions {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    let text = std::fs::read(path).map_err(io)?;
    let f: KeyFile = serde_json::from_slice(&text).map_err(|e| KeyServiceError::Format {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(SUFFIX));
    if stem != Some(f.name.as_str()) {
        return Err(KeyServiceError::Format {
            path: path.display().to_string(),
            reason: format!("names key '{}'; a key file is named after its key", f.name),
        });
    }
    Ok(f)
}

/// Writes a key file whole or not at all: a temporary file of mode 0600,
/// synced, renamed over the old one, and the directory synced.
pub fn write(dir: &Path, f: &KeyFile) -> Result<(), KeyServiceError> {
    let path = path_of(dir, &f.name);
    let tmp = dir.join(format!(".{}{SUFFIX}.tmp", f.name));
    let io = |context: String| move |source| KeyServiceError::Io { context, source };
    let json = serde_json::to_vec_pretty(f).expect("a key file always serializes");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("create {}", tmp.display())))?;
    out.write_all(&json)
        .and_then(|()| out.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("sync {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> KeyFile {
        KeyFile {
            id: "3f1c9a2e-0000-4000-8000-000000000001".into(),
            name: name.into(),
            created_at: "2026-12-06T00:00:00Z".into(),
            enabled: true,
            description: String::new(),
            versions: [(1, "ab".repeat(32))].into(),
            command: None,
            command_version: 0,
        }
    }

    #[test]
    fn written_files_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = key("backup");
        write(dir.path(), &f).unwrap();
        let path = path_of(dir.path(), "backup");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(&path).unwrap(), f);
        assert_eq!(
            f.local_material(&path).unwrap()[&1],
            MasterSecret([0xab; 32])
        );
        assert_eq!(f.current_version(), 1);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "key file {} is readable or writable by group or others (mode 640); chmod 600 it",
                path.display()
            )
        );
    }

    #[test]
    fn a_file_must_be_named_after_its_key_and_hold_good_material() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &key("a")).unwrap();
        std::fs::rename(path_of(dir.path(), "a"), path_of(dir.path(), "b")).unwrap();
        assert!(matches!(
            read(&path_of(dir.path(), "b")),
            Err(KeyServiceError::Format { .. })
        ));
        let mut bad = key("c");
        bad.versions.insert(2, "xyz".into());
        assert!(bad.local_material(Path::new("c.key")).is_err());
        assert!(parse_material(" AB").is_none());
        assert!(parse_material(&format!("{}\n", "AB".repeat(32))).is_some());
    }
}
