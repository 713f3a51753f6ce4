//! What a scrape reads: the atomics of `metrics` and the engine's state,
//! encoded as Prometheus metric families (the policies' are `policies`).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::Engine;
use crate::lifecycle::Lifecycle;
use crate::metrics::store::{ERROR_KINDS, STORE, StoreOp, kind_str};
use crate::metrics::{Histogram, NBD_CONNECTIONS, NBD_CONNECTIONS_TOTAL, Op, REQUEST_LATENCY};

/// Everything the daemon reports, read when scraped.
struct EngineCollector {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

pub(super) type Labels<'a> = Vec<(&'static str, &'a str)>;

pub(super) fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, u64)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

pub(super) fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, i64)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn histograms(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, &Histogram)],
) -> std::fmt::Result {
    let mut family =
        enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in rows {
        let (sum, count, buckets) = h.snapshot();
        family
            .encode_family(labels)?
            .encode_histogram::<Labels<'_>>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let volumes = self.engine.list();
        let names: Vec<String> = volumes.iter().map(|v| v.name.as_str().to_owned()).collect();

        let (mut ops, mut bytes) = (Vec::new(), Vec::new());
        for (v, name) in volumes.iter().zip(&names) {
            for op in Op::ALL {
                let (n, b) = v.stats.get(op);
                ops.push((vec![("volume", name.as_str()), ("op", op.as_str())], n));
                if matches!(op, Op::Read | Op::Write | Op::Trim | Op::WriteZeroes) {
                    bytes.push((vec![("volume", name.as_str()), ("op", op.as_str())], b));
                }
            }
        }
        counter(
            &mut enc,
            "volumed_volume_requests",
            "NBD requests served, by volume and command",
            None,
            &ops,
        )?;
        counter(
            &mut enc,
            "volumed_volume",
            "Bytes read, written, trimmed and zeroed over NBD, by volume",
            Some(&Unit::Bytes),
            &bytes,
        )?;

        let mut allocated = Vec::new();
        let mut changed = Vec::new();
        let mut snap = Vec::new();
        let mut hydrated = Vec::new();
        let mut hydration_total = Vec::new();
        for (v, name) in volumes.iter().zip(&names) {
            let l = || vec![("volume", name.as_str())];
            let alloc = v.data().allocated_bytes();
            allocated.push((l(), signed(alloc)));
            // After an unclean stop every chunk counts as changed: the next
            // snapshot reads all the data there is.
            let dirty = match v.map().dirty_count() {
                Some(n) => n.saturating_mul(v.chunk_size),
                None => alloc,
            };
            changed.push((l(), signed(dirty)));
            if let Some((done, total)) = self.engine.snapshot_progress(v) {
                snap.push((
                    vec![("volume", name.as_str()), ("chunks", "done")],
                    signed(done),
                ));
                snap.push((
                    vec![("volume", name.as_str()), ("chunks", "total")],
                    signed(total),
                ));
            }
            if let Some(h) = self.engine.hydration(v) {
                hydrated.push((l(), signed(h.hydrated_bytes)));
                hydration_total.push((l(), signed(h.total_bytes)));
            }
        }
        gauge(
            &mut enc,
            "volumed_volume_allocated",
            "Bytes of the volume's data files allocated on disk",
            Some(&Unit::Bytes),
            &allocated,
        )?;
        gauge(
            &mut enc,
            "volumed_volume_changed",
            "Bytes of chunks changed since the volume's last snapshot",
            Some(&Unit::Bytes),
            &changed,
        )?;
        gauge(
            &mut enc,
            "volumed_snapshot_progress_chunks",
            "Chunks done and to do of the volume's snapshot in progress",
            None,
            &snap,
        )?;
        gauge(
            &mut enc,
            "volumed_hydration_done",
            "Bytes of a restored volume's snapshot copied in",
            Some(&Unit::Bytes),
            &hydrated,
        )?;
        gauge(
            &mut enc,
            "volumed_hydration_total",
            "Bytes of a restored volume's snapshot to copy in",
            Some(&Unit::Bytes),
            &hydration_total,
        )?;

        let lat: Vec<(Labels<'_>, &Histogram)> = Op::ALL
            .iter()
            .map(|op| (vec![("op", op.as_str())], &REQUEST_LATENCY[*op as usize]))
            .collect();
        histograms(
            &mut enc,
            "volumed_nbd_request_duration",
            "NBD request latency, from the request read to its reply queued",
            &lat,
        )?;
        use std::sync::atomic::Ordering::Relaxed;
        gauge(
            &mut enc,
            "volumed_nbd_connections",
            "NBD connections in transmission",
            None,
            &[(vec![], signed(NBD_CONNECTIONS.load(Relaxed)))],
        )?;
        counter(
            &mut enc,
            "volumed_nbd_connections_accepted",
            "NBD connections that entered transmission",
            None,
            &[(vec![], NBD_CONNECTIONS_TOTAL.load(Relaxed))],
        )?;

        let store_lat: Vec<(Labels<'_>, &Histogram)> = StoreOp::ALL
            .iter()
            .map(|op| (vec![("op", op.as_str())], &STORE.latency[*op as usize]))
            .collect();
        histograms(
            &mut enc,
            "volumed_store_request_duration",
            "Object store request latency, every attempt",
            &store_lat,
        )?;
        let mut errors = Vec::new();
        for op in StoreOp::ALL {
            for kind in ERROR_KINDS {
                errors.push((
                    vec![("op", op.as_str()), ("kind", kind_str(kind))],
                    STORE.errors(op, kind),
                ));
            }
        }
        counter(
            &mut enc,
            "volumed_store_errors",
            "Object store requests that failed, by kind",
            None,
            &errors,
        )?;

        let f = self.engine.fetch_stats();
        counter(
            &mut enc,
            "volumed_chunk_cache_hits",
            "Chunk reads answered by the host chunk cache",
            None,
            &[(vec![], f.cache_hits)],
        )?;
        counter(
            &mut enc,
            "volumed_chunk_cache_misses",
            "Chunk reads fetched from the store",
            None,
            &[(vec![], f.fetches)],
        )?;
        gauge(
            &mut enc,
            "volumed_chunk_cache_used",
            "Bytes in the host chunk cache",
            Some(&Unit::Bytes),
            &[(vec![], signed(f.cache_bytes))],
        )?;
        Ok(())
    }
}

/// The registry of a daemon's metrics.
pub fn registry(engine: Arc<Engine>, lifecycle: Arc<Lifecycle>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(EngineCollector { engine }));
    r.register_collector(Box::new(super::policies::PolicyCollector { lifecycle }));
    r
}
