//! The host's key service: named master keys ("KMS keys") under
//! `DATA_DIR/keys/`, one file each (see `file`), with their material held
//! locally or printed by a command (see `command`). It answers the
//! snapshot crate's [`MasterKeys`] questions, and `vol key` and the AWS
//! endpoint's.
//!
//! - A key has a name (its alias `alias/NAME`), an id (a UUID, what
//!   manifests and wrapped data keys name), versions (rotation adds one;
//!   old ones stay, to unwrap what a host that has not rewrapped yet
//!   wrapped), and a state: enabled or disabled. Disabling stops every read
//!   and write of data under the key on this host at once.
//! - The default key, used when a volume names none, is `aws-ebs` (alias
//!   `alias/aws/ebs` too, as AWS's managed key), created on first need,
//!   unless another is made the default (`settings.json`).
//! - Hosts sharing a store share a key by holding the same key file (or the
//!   same command); a file copied into the directory is picked up when a
//!   key id is first asked for and not known.

pub mod command;
pub mod file;
mod lookup;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use snapshot::crypt::MasterSecret;
use tracing::{info, warn};

use file::KeyFile;

/// The one account this host answers as: in KMS ARNs here, and the EC2
/// endpoint's owner id.
pub const ACCOUNT_ID: &str = "000000000000";

/// What shares a data key in an encrypted store (`--encryption-domain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DomainScope {
    /// Every volume under one key: one domain per key, dedup across them.
    Store,
    /// Each new volume and what is restored from its snapshots, as EBS
    /// gives each encrypted volume lineage a data key of its own.
    Lineage,
}

/// The default key's name, and the alias AWS gives its managed EBS key.
pub const MANAGED_NAME: &str = "aws-ebs";
pub const MANAGED_ALIAS: &str = "alias/aws/ebs";
/// A key file as a directory scan sees it: name, modification time, length.
type Fingerprint = (std::ffi::OsString, Option<std::time::SystemTime>, u64);
const SETTINGS: &str = "settings.json";

#[derive(Debug, thiserror::Error)]
pub enum KeyServiceError {
    #[error("key '{0}' not found")]
    NotFound(String),
    #[error("key '{0}' already exists")]
    Exists(String),
    #[error("invalid key name {name:?}: {reason}")]
    InvalidName {
        name: String,
        reason: volumed_api::NameError,
    },
    #[error(
        "key file {path} is readable or writable by group or others (mode {mode:o}); chmod 600 it"
    )]
    Permissions { path: String, mode: u32 },
    #[error("key file {path}: {reason}")]
    Format { path: String, reason: String },
    #[error("key '{name}': its command failed: {reason}")]
    Command { name: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl KeyServiceError {
    pub fn code(&self) -> volumed_api::ErrorCode {
        use volumed_api::ErrorCode;
        match self {
            KeyServiceError::NotFound(_) => ErrorCode::NotFound,
            KeyServiceError::Exists(_) => ErrorCode::AlreadyExists,
            KeyServiceError::InvalidName { .. } => ErrorCode::InvalidName,
            KeyServiceError::Command { .. } => ErrorCode::InvalidRequest,
            KeyServiceError::Permissions { .. }
            | KeyServiceError::Format { .. }
            | KeyServiceError::Io { .. } => ErrorCode::Internal,
        }
    }
}

/// A key as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub arn: String,
    pub aliases: Vec<String>,
    pub enabled: bool,
    /// Why a command key has no material, if it has none.
    pub unavailable: Option<String>,
    pub version: u32,
    pub created_at: String,
    pub description: String,
    /// `local` or `command`.
    pub source: &'static str,
    pub default: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The id of the key used when none is named.
    #[serde(default)]
    default_key: Option<String>,
}

struct Loaded {
    file: KeyFile,
    material: BTreeMap<u32, MasterSecret>,
    unavailable: Option<String>,
}

#[derive(Default)]
struct State {
    /// By id.
    keys: BTreeMap<String, Loaded>,
    settings: Settings,
}

pub struct KeyService {
    dir: PathBuf,
    region: String,
    state: RwLock<State>,
    /// One change at a time, so files and memory agree.
    changes: tokio::sync::Mutex<()>,
    /// The directory as the last scan found it.
    last_scan: Mutex<Option<Vec<Fingerprint>>>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A key name follows the volume name rules: it becomes a file name.
pub fn check_name(name: &str) -> Result<(), KeyServiceError> {
    volumed_api::VolumeName::parse(name)
        .map(|_| ())
        .map_err(|reason| KeyServiceError::InvalidName {
            name: name.to_owned(),
            reason,
        })
}

fn uuid() -> String {
    let mut b: [u8; 16] = snapshot::crypt::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = snapshot::hash::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl KeyService {
    /// Opens `DATA_DIR/keys` (created mode 0700), loading every key file;
    /// a file others may read stops the daemon, as a credentials file does.
    /// `region` makes the keys' ARNs.
    pub async fn open(data_dir: &Path, region: &str) -> Result<Self, KeyServiceError> {
        let dir = data_dir.join("keys");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| KeyServiceError::Io {
                context: format!("create {}", dir.display()),
                source,
            })?;
        let svc = KeyService {
            region: region.to_owned(),
            state: RwLock::new(State::default()),
            changes: tokio::sync::Mutex::new(()),
            last_scan: Mutex::new(None),
            dir,
        };
        let settings = match std::fs::read(svc.dir.join(SETTINGS)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| KeyServiceError::Format {
                path: svc.dir.join(SETTINGS).display().to_string(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings::default(),
            Err(source) => {
                return Err(KeyServiceError::Io {
                    context: format!("read {}", svc.dir.join(SETTINGS).display()),
                    source,
                });
            }
        };
        svc.write().settings = settings;
        for f in svc.scan()? {
            let loaded = svc.load(f).await;
            svc.insert(loaded);
        }
        Ok(svc)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, l: Loaded) {
        self.write().keys.insert(l.file.id.clone(), l);
    }

    /// Every key file in the directory.
    fn scan(&self) -> Result<Vec<KeyFile>, KeyServiceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| KeyServiceError::Io {
            context: format!("list {}", self.dir.display()),
            source,
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            if n.starts_with('.') || !n.ends_with(file::SUFFIX) {
                continue;
            }
            out.push(file::read(&e.path())?);
        }
        Ok(out)
    }

    /// A key file with its material: from the file, or from its command.
    async fn load(&self, f: KeyFile) -> Loaded {
        let path = file::path_of(&self.dir, &f.name);
        let (material, unavailable) = match &f.command {
            None => match f.local_material(&path) {
                Ok(m) => (m, None),
                Err(e) => (BTreeMap::new(), Some(e.to_string())),
            },
            Some(cmd) => {
                let mut m = BTreeMap::new();
                let mut why = None;
                for v in 1..=f.command_version {
                    match command::material(cmd, &f.id, &f.name, v).await {
                        Ok(s) => {
                            m.insert(v, s);
                        }
                        Err(e) => {
                            warn!(key = %f.name, version = v, error = %e, "key command failed");
                            why = Some(format!("its command failed for version {v}: {e}"));
                            break;
                        }
                    }
                }
                (m, why)
            }
        };
        Loaded {
            file: f,
            material,
            unavailable,
        }
    }

    pub fn arn(&self, id: &str) -> String {
        format!("arn:aws:kms:{}:{}:key/{id}", self.region, ACCOUNT_ID)
    }

    fn info(&self, l: &Loaded, default: Option<&str>) -> KeyInfo {
        let f = &l.file;
        let mut aliases = vec![format!("alias/{}", f.name)];
        if f.name == MANAGED_NAME {
            aliases.push(MANAGED_ALIAS.to_owned());
        }
        KeyInfo {
            id: f.id.clone(),
            name: f.name.clone(),
            arn: self.arn(&f.id),
            aliases,
            enabled: f.enabled,
            unavailable: l.unavailable.clone(),
            version: f.current_version(),
            created_at: f.created_at.clone(),
            description: f.description.clone(),
            source: if f.command.is_some() {
                "command"
            } else {
                "local"
            },
            default: default == Some(f.id.as_str()),
        }
    }

    fn default_id(state: &State) -> Option<String> {
        state.settings.default_key.clone().or_else(|| {
            state
                .keys
                .values()
                .find(|l| l.file.name == MANAGED_NAME)
                .map(|l| l.file.id.clone())
        })
    }

    /// Every key, by name.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.reload_local();
        let state = self.read();
        let default = Self::default_id(&state);
        let mut out: Vec<KeyInfo> = state
            .keys
            .values()
            .map(|l| self.info(l, default.as_deref()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The key a reference names: its name, `alias/NAME`, `alias/aws/ebs`,
    /// its id, or a KMS ARN of the key or of an alias.
    pub fn resolve(&self, reference: &str) -> Result<KeyInfo, KeyServiceError> {
        let r = reference
            .strip_prefix("arn:aws:kms:")
            .and_then(|rest| rest.splitn(3, ':').nth(2))
            .unwrap_or(reference);
        let r = r.strip_prefix("key/").unwrap_or(r);
        let (by_name, r) = match r {
            MANAGED_ALIAS => (true, MANAGED_NAME),
            _ => match r.strip_prefix("alias/") {
                Some(n) => (true, n),
                None => (false, r),
            },
        };
        for attempt in 0..2 {
            if attempt == 1 {
                self.reload_local();
            }
            let state = self.read();
            let default = Self::default_id(&state);
            let hit = state
                .keys
                .values()
                .find(|l| l.file.name == r || (!by_name && l.file.id == r));
            if let Some(l) = hit {
                return Ok(self.info(l, default.as_deref()));
            }
        }
        Err(KeyServiceError::NotFound(reference.to_owned()))
    }

    /// The key used when none is named; `aws-ebs` is created on first need.
    pub async fn default_key(&self) -> Result<KeyInfo, KeyServiceError> {
        let id = Self::default_id(&self.read());
        match id {
            Some(id) => self.resolve(&id),
            None => match self
                .create(MANAGED_NAME, "default key for volumes that name none", None)
                .await
            {
                Ok(k) => Ok(k),
                // Created meanwhile by another request.
                Err(KeyServiceError::Exists(_)) => self.resolve(MANAGED_NAME),
                Err(e) => Err(e),
            },
        }
    }

    /// As [`KeyService::resolve`], creating the managed key when that is
    /// the one named and it does not exist yet (as AWS does).
    pub async fn resolve_or_managed(&self, reference: &str) -> Result<KeyInfo, KeyServiceError> {
        match self.resolve(reference) {
            Err(KeyServiceError::NotFound(_))
                if matches!(reference, MANAGED_ALIAS | MANAGED_NAME)
                    || reference.ends_with(":alias/aws/ebs") =>
            {
                match self
                    .create(MANAGED_NAME, "default key for volumes that name none", None)
                    .await
                {
                    Err(KeyServiceError::Exists(_)) => self.resolve(MANAGED_NAME),
                    r => r,
                }
            }
            r => r,
        }
    }

    /// Makes `reference` the default key, or `aws-ebs` again with `None`.
    pub async fn set_default(&self, reference: Option<&str>) -> Result<KeyInfo, KeyServiceError> {
        let _change = self.changes.lock().await;
        let id = match reference {
            Some(r) => Some(self.resolve(r)?.id),
            None => None,
        };
        let settings = Settings { default_key: id };
        let path = self.dir.join(SETTINGS);
        let tmp = self.dir.join(format!(".{SETTINGS}.tmp"));
        let json = serde_json::to_vec_pretty(&settings).expect("settings serialize");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| KeyServiceError::Io {
                context: format!("write {}", path.display()),
                source,
            })?;
        self.write().settings = settings;
        drop(_change);
        self.default_key().await
    }

    /// Creates key `name`: 32 random bytes kept in its file, or with
    /// `command`, material the command prints (tried once now).
    pub async fn create(
        &self,
        name: &str,
        description: &str,
        command: Option<&str>,
    ) -> Result<KeyInfo, KeyServiceError> {
        check_name(name)?;
        let _change = self.changes.lock().await;
        if self.resolve(name).is_ok() || file::path_of(&self.dir, name).exists() {
            return Err(KeyServiceError::Exists(name.to_owned()));
        }
        let id = uuid();
        let mut f = KeyFile {
            id: id.clone(),
            name: name.to_owned(),
            created_at: crate::catalog::rfc3339(crate::catalog::unix_now()),
            enabled: true,
            description: description.to_owned(),
            versions: BTreeMap::new(),
            command: command.map(str::to_owned),
            command_version: 0,
        };
        let mut material = BTreeMap::new();
        match command {
            None => {
                let m = MasterSecret(snapshot::crypt::random());
                f.versions.insert(1, file::material_hex(&m));
                material.insert(1, m);
            }
            Some(cmd) => {
                let m = command::material(cmd, &id, name, 1)
                    .await
                    .map_err(|reason| KeyServiceError::Command {
                        name: name.to_owned(),
                        reason,
                    })?;
                f.command_version = 1;
                material.insert(1, m);
            }
        }
        file::write(&self.dir, &f)?;
        info!(key = %name, id = %id, source = if command.is_some() { "command" } else { "local" }, "key created");
        self.insert(Loaded {
            file: f,
            material,
            unavailable: None,
        });
        self.resolve(&id)
    }

    /// Adds a version to key `reference`; the caller rewraps the store's
    /// data keys under it (see `snapshot::crypt::Keyring::rotate`).
    pub async fn add_version(&self, reference: &str) -> Result<KeyInfo, KeyServiceError> {
        let _change = self.changes.lock().await;
        let k = self.resolve(reference)?;
        let mut f = self.read().keys[&k.id].file.clone();
        let next = f.current_version() + 1;
        let m = match &f.command {
            None => {
                let m = MasterSecret(snapshot::crypt::random());
                f.versions.insert(next, file::material_hex(&m));
                m
            }
            Some(cmd) => {
                let m = command::material(cmd, &f.id, &f.name, next)
                    .await
                    .map_err(|reason| KeyServiceError::Command {
                        name: f.name.clone(),
                        reason,
                    })?;
                f.command_version = next;
                m
            }
        };
        // The file first: a version in use must survive a restart.
        file::write(&self.dir, &f)?;
        let mut state = self.write();
        let l = state.keys.get_mut(&k.id).expect("resolved above");
        l.file = f;
        l.material.insert(next, m);
        drop(state);
        info!(key = %k.name, version = next, "key rotated");
        self.resolve(&k.id)
    }

    /// Enables or disables key `reference` on this host.
    pub async fn set_enabled(
        &self,
        reference: &str,
        enabled: bool,
    ) -> Result<KeyInfo, KeyServiceError> {
        let _change = self.changes.lock().await;
        let k = self.resolve(reference)?;
        let mut f = self.read().keys[&k.id].file.clone();
        f.enabled = enabled;
        file::write(&self.dir, &f)?;
        self.write()
            .keys
            .get_mut(&k.id)
            .expect("resolved above")
            .file = f;
        info!(key = %k.name, enabled, "key state changed");
        self.resolve(&k.id)
    }
}

#[cfg(test)]
mod tests;
