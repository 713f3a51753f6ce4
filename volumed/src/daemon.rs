//! Wires the engine, the NBD server and the control API together, and shuts
//! them down in order: stop accepting, end sessions after their in-flight
//! requests, flush every volume, record a clean shutdown.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use volumed_api::Status;

use crate::api::{self, ApiState};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::disk::IoEngine;
use crate::engine::Engine;
use crate::images::Images;
use crate::nbd::NbdServer;
use crate::present::NbdEndpoints;

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything can answer: a SIGTERM that arrives once the control
    // socket or an NBD listener is up is a clean shutdown, never the
    // default action (tokio keeps a signal that came before the select).
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    prepare_data_dir(&config.data_dir)?;
    // First: a credentials file others can read stops the daemon before it
    // touches anything.
    let aws_credentials = config
        .aws
        .as_ref()
        .map(|c| crate::aws::credentials::Credentials::load(&c.credentials))
        .transpose()
        .context("load --aws-credentials")?;
    let root = CancellationToken::new();

    // Bind NBD first so the URIs we report carry the real port when the
    // configured one is 0.
    let tcp = std::net::TcpListener::bind(config.nbd_listen)
        .with_context(|| format!("bind NBD TCP listener on {}", config.nbd_listen))?;
    let nbd_addr = tcp.local_addr()?;
    let tls = config
        .nbd_tls
        .as_ref()
        .map(crate::tls::acceptor)
        .transpose()
        .context("configure NBD TLS")?;
    let endpoints = NbdEndpoints {
        tcp: nbd_addr,
        unix: config.nbd_socket.clone(),
        tls: tls.is_some(),
    };
    let io = Arc::new(IoEngine::new(config.io_engine).context("start the I/O engine")?);
    let store = snapshot::store::open(&config.store).context("open the snapshot store")?;
    // Every store operation retries its transient failures here, and stops
    // waiting when the daemon shuts down.
    // Measured under the retries, so each attempt is seen.
    let store: Arc<dyn snapshot::ObjectStore> =
        Arc::new(crate::metrics::store::MeteredStore::new(store));
    let store = snapshot::Retrying::new(store, snapshot::RetryPolicy::default())
        .with_cancel(root.child_token());
    let store: Arc<dyn snapshot::ObjectStore> = Arc::new(store);
    // Whether the store is encrypted is its header's to say (see
    // snapshot::store_header), checked against what this host saw before.
    let header = snapshot::store_header::open_remembered(
        &*store,
        config.store_encryption.expect(),
        &config.data_dir,
        &crate::catalog::rfc3339(crate::catalog::unix_now()),
        concat!("volumed ", env!("CARGO_PKG_VERSION")),
    )
    .await
    .with_context(|| format!("read the header of store {}", config.store))?;
    let region = config
        .aws
        .as_ref()
        .map_or("us-east-1", |a| a.region.as_str());
    let keys = Arc::new(
        crate::keys::KeyService::open(&config.data_dir, region)
            .await
            .context("open the key service")?,
    );
    let mut repo = snapshot::Repo::new(store, config.zstd_level).with_gc_grace(config.gc_grace);
    if header.is_encrypted() {
        repo = repo.with_keys(Arc::clone(&keys) as Arc<dyn snapshot::MasterKeys>);
    }
    let cache_dir = config.data_dir.join("cache");
    let cache = snapshot::cache::ChunkCache::open(&cache_dir, config.cache_size)
        .with_context(|| format!("open the chunk cache in {}", cache_dir.display()))?;
    let fetcher = Arc::new(snapshot::cache::Fetcher::new(
        repo.clone(),
        (config.cache_size > 0).then(|| Arc::new(cache)),
    ));
    // The engine, the image jobs and the AWS endpoint each own trees of it.
    let catalog_path = config.data_dir.join("catalog");
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&catalog_path))
        .await
        .context("open catalog")?
        .context("open catalog")
        .context("open volume engine")?;
    let catalog = Arc::new(catalog);
    let (engine, clean) = Engine::open(
        &config.data_dir,
        Arc::clone(&catalog),
        Arc::clone(&io),
        repo,
        fetcher,
    )
    .await
    .context("open volume engine")?;
    if !clean {
        warn!("previous run did not shut down cleanly");
    }
    let engine = Arc::new(engine);
    engine.set_encryption(keys, config.encryption_domain);
    engine.start_background();
    engine.set_barrier_timeout(config.snapshot_barrier_timeout);
    let machines = Arc::new(crate::machines::Machines::new(
        Arc::clone(&engine),
        Arc::clone(&catalog),
        instance_types(config.instance_types.as_deref())?,
        config.quiesce_hook.clone(),
    ));
    machines.start_background();
    let lifecycle = crate::lifecycle::Lifecycle::open(
        Arc::clone(&engine),
        Arc::clone(&machines),
        Arc::clone(&catalog),
    )
    .context("open snapshot policies")?;
    // Before the NBD server accepts: a client reconnecting after a restart
    // finds its snapshot export where it was.
    engine.reopen_snapshot_exports().await;
    // Buckets tasks name: the store's S3 client and retries, its endpoint
    // unless --tasks-s3-endpoint says otherwise.
    let buckets = Arc::new(crate::images::buckets::Buckets::new(
        config.tasks_s3_endpoint.clone(),
        root.child_token(),
    ));
    let images = Images::open(
        Arc::clone(&engine),
        Arc::clone(&catalog),
        &config.data_dir,
        config.nbd_socket.clone(),
        buckets,
    )
    .await
    .context("load jobs")?;
    let images = Arc::new(images);
    images.start_background();

    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = crate::nbd::io_threads::IoThreads::start(threads, &io)?;
    let nbd = NbdServer::bind(Arc::clone(&engine), tcp, &config.nbd_socket, tls)
        .await?
        .with_limits(config.nbd_limits)
        .with_threads(threads);
    let endpoints = Arc::new(endpoints);
    // Before the control socket: a bad credentials file stops the daemon
    // before it reports ready.
    let aws = match (&config.aws, aws_credentials) {
        (Some(c), Some(creds)) => Some(
            crate::aws::server::bind(
                c,
                creds,
                Arc::clone(&machines),
                Arc::clone(&lifecycle),
                Arc::clone(&images),
                Arc::clone(&catalog),
                Arc::clone(&endpoints),
            )
            .await?,
        ),
        _ => None,
    };
    let aws_addr = aws.as_ref().map(|a| a.local_addr()).transpose()?;
    let api_listener = api::server::bind(&config.socket).await?;
    let status = Status {
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: config.data_dir.display().to_string(),
        nbd_listen: nbd_addr.to_string(),
        nbd_socket: config.nbd_socket.display().to_string(),
        nbd_tls: match &config.nbd_tls {
            None => "off",
            Some(f) if f.client_ca.is_some() => "required+client-cert",
            Some(_) => "required",
        }
        .into(),
        store: config.store.to_string(),
        volumes: 0,
        io_backend: engine.io_engine_name().into(),
        store_fetches: 0,
        store_fetched_bytes: 0,
        cache_bytes: 0,
        cache_hits: 0,
        image_tools: crate::images::qemu::tools_version().await,
        aws_listen: aws_addr.map(|a| a.to_string()),
        store_encrypted: engine.store_encrypted(),
        failing_policies: Vec::new(),
    };
    let state = ApiState {
        engine: Arc::clone(&engine),
        machines,
        images: Arc::clone(&images),
        catalog,
        status: Arc::new(status),
        endpoints,
        lifecycle: Arc::clone(&lifecycle),
    };

    let metrics_task = match config.metrics_listen {
        Some(addr) => Some(
            crate::telemetry::serve(
                addr,
                Arc::clone(&engine),
                Arc::clone(&lifecycle),
                root.child_token(),
            )
            .await?,
        ),
        None => None,
    };
    let nbd_task = tokio::spawn(nbd.run(root.child_token(), config.nbd_socket.clone()));
    let scheduler = crate::lifecycle::spawn_scheduler(lifecycle, root.child_token());
    let api_task = tokio::spawn(api::serve(api_listener, state, root.child_token()));
    let aws_task = aws.map(|a| tokio::spawn(a.run(root.child_token())));
    info!(data_dir = %config.data_dir.display(), socket = %config.socket.display(), nbd = %nbd_addr,
          store = %config.store, volumes = engine.list().len(), "volumed ready");

    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }

    root.cancel();
    // A policy run in progress ends at its next step; its snapshots are
    // the engine's and finish or fail with it.
    scheduler.abort();
    let _ = scheduler.await;
    // Imports stop first (a file import resumes from its checkpoint), then
    // the engine's own jobs, sessions and volumes.
    images.shutdown().await;
    engine
        .shutdown()
        .await
        .context("flush volumes at shutdown")?;
    let _ = nbd_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = aws_task {
        let _ = t.await;
    }
    match api_task.await {
        Ok(Err(e)) => {
            warn!(error = %volumed_api::error_chain(&e), "control API ended with an error")
        }
        Err(e) => warn!(error = %e, "control API task failed"),
        Ok(Ok(())) => {}
    }
    let _ = std::fs::remove_file(&config.socket);
    info!("volumed stopped cleanly");
    Ok(())
}

/// Creates the data directory private to the daemon's user and refuses one
/// that others can write to: whoever can write there can replace the catalog
/// or the control socket.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data dir {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        bail!(
            "data dir {} is writable by group or others (mode {:o}); chmod go-w it",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// The instance-type table: `--instance-types FILE`, or the built-in one.
fn instance_types(path: Option<&Path>) -> anyhow::Result<crate::machines::types::InstanceTypes> {
    use crate::machines::types::InstanceTypes;
    let Some(path) = path else {
        return Ok(InstanceTypes::builtin());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read --instance-types {}", path.display()))?;
    InstanceTypes::parse(&text).with_context(|| format!("--instance-types {}", path.display()))
}
