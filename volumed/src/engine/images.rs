//! The engine's image import and export: checking a request, creating the
//! volumes an import fills (recorded `importing` from the start), starting
//! the jobs in `jobs::import` and `jobs::export`, and the job registry's
//! answers. A second `impl Engine` beside mod.rs's lifecycle rules, which
//! it calls.

use super::*;

impl Engine {
    /// Starts importing the image file `req.source` into new volumes;
    /// returns the running job. The image is inspected (and refused) first,
    /// so a bad one changes nothing.
    pub async fn import(&self, req: ImportRequest) -> Result<Arc<JobHandle>> {
        let path = std::path::PathBuf::from(&req.source);
        if !path.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "import source {:?} must be an absolute path the daemon can read",
                req.source
            )));
        }
        let format = self.check_import(&req)?;
        if self.get(&req.name).is_ok() {
            return Err(Error::VolumeExists(req.name.clone()));
        }
        let disks = crate::image::inspect::open(&path, format).await?;
        if disks.len() > 1 && req.sha256.is_some() {
            return Err(Error::InvalidRequest(
                "--sha256 checks one image; an OVA with several disks has no single hash".into(),
            ));
        }
        let names = import_names(&req.name, disks.len())?;
        let sizes: Vec<u64> = disks.iter().map(|d| d.size.next_multiple_of(512)).collect();
        let fmt = disks
            .first()
            .map_or("raw".into(), |d| d.spec.format.to_string());
        let fmt = if format == Some(crate::image::ImageFormat::Ova)
            || disks.iter().any(|d| d.spec.range.is_some())
        {
            "ova".to_owned()
        } else {
            fmt
        };
        let (h, vols) = self.start_import(req, fmt, names, sizes).await?;
        self.imports.spawn_file(Arc::clone(&h), disks, vols);
        Ok(h)
    }

    /// Starts importing the raw bytes of `body` into a new volume, which
    /// grows as they arrive; the returned task ends with the job.
    pub async fn import_stream<S, B, E>(
        &self,
        req: ImportRequest,
        body: S,
    ) -> Result<(Arc<JobHandle>, tokio::task::JoinHandle<()>)>
    where
        S: futures_util::Stream<Item = std::result::Result<B, E>> + Send + Unpin + 'static,
        B: AsRef<[u8]> + Send,
        E: std::fmt::Display + Send,
    {
        if req.source != "-" {
            return Err(Error::InvalidRequest(
                "a stream import's source is -".into(),
            ));
        }
        match self.check_import(&req)? {
            None | Some(crate::image::ImageFormat::Raw) => {}
            Some(f) => {
                return Err(Error::InvalidRequest(format!(
                    "a stream import reads raw bytes only, not {f}; save the image to a file first"
                )));
            }
        }
        // The volume starts one sector long and grows with the stream.
        let (h, vols) = self
            .start_import(req, "raw".into(), Vec::new(), vec![512])
            .await?;
        let vol = Arc::clone(&vols[0]);
        let task = self.imports.spawn_stream(Arc::clone(&h), vol, body);
        Ok((h, task))
    }

    /// Checks an import request's values; returns the format asked for.
    fn check_import(&self, req: &ImportRequest) -> Result<Option<crate::image::ImageFormat>> {
        if let Some(c) = req.chunk_size {
            validate::chunk_size(c)?;
        }
        validate::labels(&req.labels)?;
        if let Some(h) = &req.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(Error::InvalidRequest(format!(
                "sha256 {h:?} is not 64 hex digits"
            )));
        }
        req.format
            .as_deref()
            .map(|f| {
                crate::image::ImageFormat::parse(f).ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "unknown image format {f:?}: expected raw, qcow2, vmdk, vhdx, vpc or ova"
                    ))
                })
            })
            .transpose()
    }

    /// Records the job, then creates its volumes `importing`. Empty `names`
    /// means the one volume the request names.
    async fn start_import(
        &self,
        req: ImportRequest,
        format: String,
        names: Vec<VolumeName>,
        sizes: Vec<u64>,
    ) -> Result<(Arc<JobHandle>, Vec<Arc<Volume>>)> {
        let names = if names.is_empty() {
            vec![req.name.clone()]
        } else {
            names
        };
        for s in &sizes {
            validate::size(*s)?;
        }
        let id = self.imports.jobs.next_id()?;
        let rec = crate::catalog::JobRecord {
            id: id.clone(),
            kind: volumed_api::JobKind::Import,
            state: volumed_api::JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            import: Some(req.clone()),
            export: None,
            format,
            volumes: names.clone(),
            bytes_total: if req.source == "-" {
                0
            } else {
                sizes.iter().sum()
            },
            checkpoint: crate::catalog::Checkpoint::default(),
            error: None,
            snapshot: None,
            sha256: None,
        };
        let h = self.imports.jobs.add(rec)?;
        let mut vols = Vec::new();
        for (name, size) in names.iter().zip(&sizes) {
            let create = CreateVolume {
                name: name.clone(),
                size: Some(*size),
                ephemeral: req.ephemeral,
                from_snapshot: None,
                chunk_size: req.chunk_size,
                hydrate: None,
                encrypted: None,
                key: None,
            };
            match self
                .create_with(create, aws_attrs::VolumeAttrs::default(), Some(id.clone()))
                .await
            {
                Ok(v) => vols.push(v),
                Err(e) => {
                    let _guard = self.registry.lock().await;
                    for v in &vols {
                        if let Err(e) = self.delete_locked(v).await {
                            warn!(volume = %v.name, error = %e, "could not remove a volume of a failed import; start-up finishes it");
                        }
                    }
                    self.imports
                        .jobs
                        .finish(&h, volumed_api::JobState::Error, Some(e.to_string()));
                    return Err(e);
                }
            }
        }
        info!(job = %id, volumes = ?names.iter().map(VolumeName::as_str).collect::<Vec<_>>(),
              source = %req.source, "import started");
        Ok((h, vols))
    }

    /// Starts exporting a snapshot (or a volume, snapshotted first) as an
    /// image. For destination `-` the raw bytes come through the returned
    /// receiver, in order.
    pub async fn export_image(
        &self,
        req: volumed_api::ExportRequest,
    ) -> Result<(
        Arc<JobHandle>,
        Option<tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>>,
    )> {
        use crate::image::ImageFormat;
        let format = match req.format.as_deref() {
            None => ImageFormat::Raw,
            Some(f) => match ImageFormat::parse(f) {
                Some(ImageFormat::Ova) | None => {
                    return Err(Error::InvalidRequest(format!(
                        "unknown export format {f:?}: expected raw, qcow2, vmdk, vhdx or vpc"
                    )));
                }
                Some(f) => f,
            },
        };
        if req.compress && format != ImageFormat::Qcow2 {
            return Err(Error::InvalidRequest(
                "--compress applies to qcow2 exports only".into(),
            ));
        }
        let stream = req.destination == "-";
        if stream && format != ImageFormat::Raw {
            return Err(Error::InvalidRequest(format!(
                "only raw exports go to stdout, not {format}; give a file"
            )));
        }
        if !stream {
            let dest = std::path::Path::new(&req.destination);
            if !dest.is_absolute() {
                return Err(Error::InvalidRequest(format!(
                    "export destination {:?} must be an absolute path",
                    req.destination
                )));
            }
            if dest.symlink_metadata().is_ok() {
                return Err(Error::InvalidRequest(format!(
                    "export destination {} exists; remove it or choose another",
                    dest.display()
                )));
            }
            if !dest.parent().is_some_and(Path::is_dir) {
                return Err(Error::InvalidRequest(format!(
                    "the directory of export destination {} does not exist",
                    dest.display()
                )));
            }
        }
        let (source, size) = match SnapshotId::parse(&req.source) {
            Some(id) if req.source.starts_with("snap-") => {
                let info = self.snapshots.get(&id).await?;
                let size = match &info {
                    SnapshotInfo::Recorded { rec, .. } => rec.size,
                    SnapshotInfo::Stored(h) => h.size,
                };
                (ExportSource::Snapshot(id), size)
            }
            _ => {
                let name = VolumeName::parse(&req.source).map_err(|reason| Error::InvalidName {
                    name: req.source.clone(),
                    reason,
                })?;
                let vol = self.get(&name)?;
                not_importing(&vol)?;
                let size = vol.size();
                (ExportSource::Volume(vol), size)
            }
        };
        let id = self.imports.jobs.next_id()?;
        let rec = crate::catalog::JobRecord {
            id: id.clone(),
            kind: volumed_api::JobKind::Export,
            state: volumed_api::JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            import: None,
            export: Some(req.clone()),
            format: format.to_string(),
            volumes: match &source {
                ExportSource::Volume(v) => vec![v.name.clone()],
                ExportSource::Snapshot(_) => Vec::new(),
            },
            bytes_total: size,
            checkpoint: crate::catalog::Checkpoint::default(),
            error: None,
            snapshot: match &source {
                ExportSource::Snapshot(id) => Some(id.clone()),
                ExportSource::Volume(_) => None,
            },
            sha256: None,
        };
        let h = self.imports.jobs.add(rec)?;
        let (sink, rx) = if stream {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            (Sink::Stream(tx), Some(rx))
        } else {
            (Sink::File(req.destination.clone().into()), None)
        };
        info!(job = %id, source = %req.source, destination = %req.destination, %format, "export started");
        self.exports
            .spawn(Arc::clone(&h), source, format, req.compress, sink);
        Ok((h, rx))
    }

    /// Fires when the jobs stop for shutdown: event streams end with it.
    pub fn jobs_stopping(&self) -> tokio_util::sync::CancellationToken {
        self.imports.jobs.shutdown.clone()
    }

    pub fn jobs(&self) -> Vec<Arc<JobHandle>> {
        self.imports.jobs.list()
    }

    pub fn job(&self, id: &str) -> Result<Arc<JobHandle>> {
        self.imports.jobs.get(id)
    }

    /// Cancels a running job: it ends `cancelled`, its volumes removed.
    pub fn cancel_job(&self, id: &str) -> Result<Arc<JobHandle>> {
        self.imports.jobs.cancel(id)
    }
}
