//! For the handshake and session tests: a real engine in a temporary
//! directory with attached volumes (a session needs a real `Volume`), and
//! an [`ExportLookup`] fake that serves only what a test gives it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use volumed_api::{AttachVolume, CreateVolume, VolumeName};

use super::handshake::ExportLookup;
use crate::disk::{EngineChoice, IoEngine};
use crate::engine::{Engine, Export};

/// Chunk size of the test volumes: the smallest allowed, so a few chunks
/// make a small volume.
pub const CHUNK: u64 = 64 << 10;

/// Opens an engine under `dir` and creates and attaches one volume per
/// `(name, size)`. Keep `dir` alive as long as the engine.
pub async fn engine_with(dir: &Path, volumes: &[(&str, u64)]) -> Arc<Engine> {
    let store = snapshot::store::LocalStore::open(&dir.join("store")).unwrap();
    let repo = snapshot::Repo::new(Arc::new(store), 3);
    let fetcher = Arc::new(snapshot::cache::Fetcher::new(repo.clone(), None));
    let io = Arc::new(IoEngine::new(EngineChoice::Auto).unwrap());
    let catalog = Arc::new(crate::catalog::Catalog::open(&dir.join("catalog")).unwrap());
    let (engine, _) = Engine::open(dir, catalog, io, repo, fetcher).await.unwrap();
    let engine = Arc::new(engine);
    for &(name, size) in volumes {
        let name = VolumeName::parse(name).unwrap();
        engine
            .create(CreateVolume {
                name: name.clone(),
                size: Some(size),
                ephemeral: false,
                from_snapshot: None,
                chunk_size: Some(CHUNK),
                hydrate: None,
                encrypted: None,
                key: None,
            })
            .await
            .unwrap();
        engine.attach(&name, AttachVolume::default()).await.unwrap();
    }
    engine
}

/// Exports by name, listed in name order.
#[derive(Default)]
pub struct FakeExports(pub BTreeMap<String, Export>);

impl FakeExports {
    /// Every export `engine` has, under the same names.
    pub fn of(engine: &Engine) -> Self {
        let mut m = BTreeMap::new();
        for name in engine.export_names() {
            let export = engine.export(name.as_str()).unwrap();
            m.insert(name.as_str().to_owned(), export);
        }
        FakeExports(m)
    }
}

impl ExportLookup for FakeExports {
    fn export(&self, name: &str) -> Option<Export> {
        self.0.get(name).cloned()
    }

    fn export_names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}
