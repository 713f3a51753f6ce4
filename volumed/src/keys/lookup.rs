//! How the key service answers the snapshot crate (`MasterKeys`): a key
//! by id, only if enabled and its material at hand; and, when a key or a
//! version is not known, one more look at the key directory (a key file
//! copied in from another host, or one rotated there), only when the
//! directory changed since the last look.

use snapshot::crypt::{KeyError, MasterKeys, MasterSecret};
use tracing::{info, warn};

use super::{Fingerprint, KeyService, Loaded, State, file};

impl KeyService {
    /// What the directory holds: each key file's name, modification time
    /// and length, to tell whether anything changed since the last scan.
    fn fingerprint(&self) -> Vec<Fingerprint> {
        let mut out: Vec<Fingerprint> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(file::SUFFIX))
            })
            .map(|e| {
                let m = e.metadata().ok();
                (
                    e.file_name(),
                    m.as_ref().and_then(|m| m.modified().ok()),
                    m.map_or(0, |m| m.len()),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Picks up local key files copied in or replaced since the last scan
    /// (another host's keys, or a key file from the host that rotated it),
    /// when a key or a version is asked for and not known. Rescans only
    /// when the directory changed; command keys wait for a restart.
    pub(super) fn reload_local(&self) {
        let fp = self.fingerprint();
        {
            let mut last = self.last_scan.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_ref() == Some(&fp) {
                return;
            }
            *last = Some(fp);
        }
        let files = match self.scan() {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "could not reread the key directory");
                return;
            }
        };
        let mut state = self.write();
        for f in files {
            if f.command.is_some() || state.keys.get(&f.id).is_some_and(|l| l.file == f) {
                continue;
            }
            let path = file::path_of(&self.dir, &f.name);
            match f.local_material(&path) {
                Ok(material) => {
                    info!(key = %f.name, id = %f.id, version = f.current_version(), "key file read");
                    state.keys.insert(
                        f.id.clone(),
                        Loaded {
                            file: f,
                            material,
                            unavailable: None,
                        },
                    );
                }
                Err(e) => warn!(error = %e, "key file refused"),
            }
        }
    }

    fn usable<'a>(state: &'a State, key: &str) -> Result<&'a Loaded, KeyError> {
        let l = state
            .keys
            .get(key)
            .ok_or_else(|| KeyError::Unknown(key.to_owned()))?;
        if !l.file.enabled {
            return Err(KeyError::Disabled(format!("'{}' ({key})", l.file.name)));
        }
        if let Some(why) = &l.unavailable {
            return Err(KeyError::Unavailable {
                key: format!("'{}' ({key})", l.file.name),
                reason: why.clone(),
            });
        }
        Ok(l)
    }

    /// [`Self::usable`], rereading the directory once for a key or a
    /// version not known.
    fn with_key<T>(
        &self,
        key: &str,
        f: impl Fn(&Loaded) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        {
            let state = self.read();
            match Self::usable(&state, key).and_then(&f) {
                Err(KeyError::Unknown(_) | KeyError::Version { .. }) => {}
                other => return other,
            }
        }
        self.reload_local();
        let state = self.read();
        Self::usable(&state, key).and_then(f)
    }
}

impl MasterKeys for KeyService {
    fn material(&self, key: &str, version: u32) -> Result<MasterSecret, KeyError> {
        self.with_key(key, |l| {
            l.material
                .get(&version)
                .cloned()
                .ok_or_else(|| KeyError::Version {
                    key: format!("'{}' ({key})", l.file.name),
                    version,
                })
        })
    }

    fn current(&self, key: &str) -> Result<(u32, MasterSecret), KeyError> {
        self.with_key(key, |l| {
            l.material
                .last_key_value()
                .map(|(v, m)| (*v, m.clone()))
                .ok_or_else(|| KeyError::Unknown(key.to_owned()))
        })
    }

    fn check(&self, key: &str) -> Result<(), KeyError> {
        self.with_key(key, |_| Ok(()))
    }
}
