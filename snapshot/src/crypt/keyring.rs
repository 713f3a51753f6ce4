//! The domains a repository has unwrapped, loaded from the store on first
//! use, created on first seal, rotated on request.
//!
//! Creating a domain writes its generation 0 create-if-absent, so two hosts
//! that start using one store domain at once agree on one data key: the
//! loser reads the winner's. A new generation is written the same way.
//! Rewrapping overwrites a data key object with the same data key under a
//! newer master key version; a reader sees the old wrap or the new one,
//! and either unwraps to the same key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::domain::{self, DataKey, DomainId, DomainKeys};
use super::seal;
use super::{Encryption, MasterKeys};
use crate::keys;
use crate::repo::RepoError;
use crate::store::{ObjectStore, PutOutcome};

/// How long a domain is sealed with before this host looks again for a
/// newer generation (another host may have rotated its key).
const REFRESH: Duration = Duration::from_secs(600);

/// What a rotation did in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotateReport {
    /// Domains whose data keys the key wraps.
    pub domains: u64,
    /// Data keys wrapped anew under the key's current version.
    pub rewrapped: u64,
    /// New generations, one per domain, for new data.
    pub generations: u64,
}

/// A domain in the store, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub id: DomainId,
    /// The master key wrapping its data keys.
    pub key: String,
    pub generations: u32,
}

struct Cached {
    keys: Arc<DomainKeys>,
    loaded: Instant,
}

/// A domain's data keys as unwrapped, and the key wrapping them.
struct Raw {
    key: String,
    data: BTreeMap<u32, DataKey>,
}

pub struct Keyring {
    store: Arc<dyn ObjectStore>,
    keys: Arc<dyn MasterKeys>,
    domains: Mutex<HashMap<DomainId, Cached>>,
    /// Held while a domain is read from the store or created there, so a
    /// miss is fetched once. A snapshot seals its chunks side by side: each
    /// missed the cache at once, and each listed, created (a conditional
    /// PUT of one name) and read the domain itself. Against SeaweedFS the
    /// racing conditional PUTs came back whole seconds apart: a 64 MiB
    /// encrypted snapshot took 1.0-5.0 s, against 0.4 s unencrypted.
    fetching: tokio::sync::Mutex<()>,
}

impl Keyring {
    pub fn new(store: Arc<dyn ObjectStore>, keys: Arc<dyn MasterKeys>) -> Self {
        Keyring {
            store,
            keys,
            domains: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn master_keys(&self) -> &Arc<dyn MasterKeys> {
        &self.keys
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<DomainId, Cached>> {
        self.domains.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, d: &DomainKeys) -> Result<(), RepoError> {
        self.keys.check(&d.key).map_err(|source| RepoError::Key {
            domain: d.id,
            source,
        })
    }

    /// The keys to open an object sealed in `domain` at `generation`.
    pub async fn for_open(
        &self,
        domain: &DomainId,
        generation: u32,
    ) -> Result<Arc<DomainKeys>, RepoError> {
        let hit = || {
            self.cache()
                .get(domain)
                .filter(|c| c.keys.seal_key(generation).is_some())
                .map(|c| Arc::clone(&c.keys))
        };
        let d = match hit() {
            Some(d) => d,
            // Unknown here, or a generation added elsewhere since.
            None => {
                let _one = self.fetching.lock().await;
                match hit() {
                    // Loaded while this waited.
                    Some(d) => d,
                    None => self
                        .load(domain)
                        .await?
                        .ok_or(RepoError::MissingDomain(*domain))?,
                }
            }
        };
        self.check(&d)?;
        if d.seal_key(generation).is_none() {
            return Err(RepoError::MissingDataKey {
                domain: *domain,
                generation,
            });
        }
        Ok(d)
    }

    /// The keys to seal new objects as `enc` says; the domain is created
    /// in the store on first use.
    pub async fn for_seal(&self, enc: &Encryption) -> Result<Arc<DomainKeys>, RepoError> {
        let cached = || {
            self.cache()
                .get(&enc.domain)
                .map(|c| (Arc::clone(&c.keys), c.loaded.elapsed() < REFRESH))
        };
        let fresh = match cached() {
            Some((d, true)) => Some(d),
            _ => None,
        };
        let d = match fresh {
            Some(d) => d,
            None => {
                let _one = self.fetching.lock().await;
                // Loaded or created while this waited, or still to do.
                match cached() {
                    Some((d, true)) => d,
                    stale => self.load_for_seal(enc, stale).await?,
                }
            }
        };
        if d.key != enc.key {
            return Err(RepoError::DomainKey {
                domain: enc.domain,
                want: enc.key.clone(),
                found: d.key.clone(),
            });
        }
        self.check(&d)?;
        Ok(d)
    }

    /// `for_seal`'s miss: the domain read from the store, or created there.
    /// `stale` is what this host loaded before, if anything.
    async fn load_for_seal(
        &self,
        enc: &Encryption,
        stale: Option<(Arc<DomainKeys>, bool)>,
    ) -> Result<Arc<DomainKeys>, RepoError> {
        Ok(match self.load(&enc.domain).await {
            Ok(Some(d)) => d,
            Ok(None) => self.create(enc).await?,
            // Rewrapped elsewhere under a version this host lacks: what
            // it unwrapped before still seals (the check below still
            // refuses a disabled key).
            Err(e) if e.is_key() && stale.is_some() => {
                tracing::warn!(domain = %enc.domain, error = %e,
                        "cannot reload the domain's data keys; sealing with the ones loaded before");
                stale.expect("matched as present").0
            }
            Err(e) => return Err(e),
        })
    }

    /// Reads and unwraps every generation of `domain`; `None` when it has
    /// none in the store.
    async fn load(&self, domain: &DomainId) -> Result<Option<Arc<DomainKeys>>, RepoError> {
        let Some(raw) = self.load_raw(domain).await? else {
            return Ok(None);
        };
        let keys = DomainKeys::new(*domain, raw.key, &raw.data)
            .ok_or(RepoError::MissingDataKey {
                domain: *domain,
                generation: 0,
            })
            .map(Arc::new)?;
        self.cache().insert(
            *domain,
            Cached {
                keys: Arc::clone(&keys),
                loaded: Instant::now(),
            },
        );
        Ok(Some(keys))
    }

    async fn load_raw(&self, domain: &DomainId) -> Result<Option<Raw>, RepoError> {
        let mut generations: Vec<u32> = self
            .store
            .list(&keys::data_keys_of(domain))
            .await?
            .iter()
            .filter_map(|o| keys::data_key_of_key(&o.key))
            .filter(|(d, _)| d == domain)
            .map(|(_, g)| g)
            .collect();
        generations.sort_unstable();
        let mut key: Option<String> = None;
        let mut data = BTreeMap::new();
        for g in generations {
            let Some(obj) = self.store.get(&keys::data_key_key(domain, g)).await? else {
                continue;
            };
            let (k, dk) = self.unwrap(domain, g, obj)?;
            match &key {
                Some(first) if *first != k => {
                    return Err(RepoError::DomainKey {
                        domain: *domain,
                        want: first.clone(),
                        found: k,
                    });
                }
                _ => key = Some(k),
            }
            data.insert(g, dk);
        }
        Ok(key.map(|key| Raw { key, data }))
    }

    fn unwrap(
        &self,
        domain: &DomainId,
        generation: u32,
        obj: Bytes,
    ) -> Result<(String, DataKey), RepoError> {
        let corrupt = |source| RepoError::CorruptDataKey {
            domain: *domain,
            generation,
            source,
        };
        let f = seal::frame(&obj).map_err(corrupt)?;
        let (key, version) = domain::wrapped_by(&f).ok_or(corrupt(seal::SealError::Name {
            expected: "<key id>#<version>".into(),
            found: f.name_text(),
        }))?;
        let material = self
            .keys
            .material(&key, version)
            .map_err(|source| RepoError::Key {
                domain: *domain,
                source,
            })?;
        let dk = domain::unwrap(obj, &f, domain, generation, &material).map_err(corrupt)?;
        Ok((key, dk))
    }

    async fn create(&self, enc: &Encryption) -> Result<Arc<DomainKeys>, RepoError> {
        let (version, material) = self.current(enc)?;
        let dk = DataKey::random();
        let obj =
            domain::wrap(&dk, &enc.domain, 0, &enc.key, version, &material).map_err(|source| {
                RepoError::CorruptDataKey {
                    domain: enc.domain,
                    generation: 0,
                    source,
                }
            })?;
        let key = keys::data_key_key(&enc.domain, 0);
        match self.store.put_if_absent(&key, Bytes::from(obj)).await? {
            PutOutcome::Created => {
                tracing::info!(domain = %enc.domain, key = %enc.key, "encryption domain created");
                let mut data = BTreeMap::new();
                data.insert(0, dk);
                let keys = Arc::new(
                    DomainKeys::new(enc.domain, enc.key.clone(), &data)
                        .expect("generation 0 is there"),
                );
                self.cache().insert(
                    enc.domain,
                    Cached {
                        keys: Arc::clone(&keys),
                        loaded: Instant::now(),
                    },
                );
                Ok(keys)
            }
            // Another host created it first: its data key is the domain's.
            PutOutcome::AlreadyExists => self
                .load(&enc.domain)
                .await?
                .ok_or(RepoError::MissingDomain(enc.domain)),
        }
    }

    fn current(&self, enc: &Encryption) -> Result<(u32, super::MasterSecret), RepoError> {
        self.keys
            .current(&enc.key)
            .map_err(|source| RepoError::Key {
                domain: enc.domain,
                source,
            })
    }

    /// Every domain in the store with the key wrapping it. Reads one data
    /// key object per domain (its frame names the key; nothing unwrapped).
    pub async fn domains(&self) -> Result<Vec<DomainInfo>, RepoError> {
        let mut by_domain: BTreeMap<DomainId, Vec<u32>> = BTreeMap::new();
        for o in self.store.list(keys::DATAKEYS).await? {
            if let Some((d, g)) = keys::data_key_of_key(&o.key) {
                by_domain.entry(d).or_default().push(g);
            }
        }
        let mut out = Vec::new();
        for (id, gens) in by_domain {
            let first = *gens.iter().min().expect("at least one");
            let Some(obj) = self.store.get(&keys::data_key_key(&id, first)).await? else {
                continue;
            };
            let f = seal::frame(&obj).map_err(|source| RepoError::CorruptDataKey {
                domain: id,
                generation: first,
                source,
            })?;
            let key = domain::wrapped_by(&f).map(|(k, _)| k).unwrap_or_default();
            out.push(DomainInfo {
                id,
                key,
                generations: gens.len() as u32,
            });
        }
        Ok(out)
    }

    /// After master key `key` gained a version: wraps every data key it
    /// wraps anew under that version (the data keys, and so the data, stay
    /// as they are), and gives each of its domains a new generation that
    /// new objects are sealed with.
    pub async fn rotate(&self, key: &str) -> Result<RotateReport, RepoError> {
        let mut report = RotateReport::default();
        for info in self.domains().await? {
            if info.key != key {
                continue;
            }
            let id = info.id;
            let Some(raw) = self.load_raw(&id).await? else {
                continue;
            };
            let enc = Encryption {
                key: key.to_owned(),
                domain: id,
            };
            let (version, material) = self.current(&enc)?;
            let wrap = |dk: &DataKey, g: u32| {
                domain::wrap(dk, &id, g, key, version, &material).map_err(|source| {
                    RepoError::CorruptDataKey {
                        domain: id,
                        generation: g,
                        source,
                    }
                })
            };
            for (g, dk) in &raw.data {
                let obj = wrap(dk, *g)?;
                self.store
                    .put(&keys::data_key_key(&id, *g), Bytes::from(obj))
                    .await?;
                report.rewrapped += 1;
            }
            let next = raw.data.keys().last().map_or(0, |g| g + 1);
            let obj = wrap(&DataKey::random(), next)?;
            if self
                .store
                .put_if_absent(&keys::data_key_key(&id, next), Bytes::from(obj))
                .await?
                == PutOutcome::Created
            {
                report.generations += 1;
            }
            report.domains += 1;
            self.cache().remove(&id);
            tracing::info!(domain = %id, key, version, generation = next, "encryption domain rotated");
        }
        Ok(report)
    }
}
