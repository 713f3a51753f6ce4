//! The daemon measuring itself, for `--metrics-listen` (Prometheus text).
//!
//! The data path only adds to atomics: per volume, ops and bytes by
//! command ([`IoStats`], always counted: two relaxed adds per request); per
//! command, a latency histogram of fixed buckets, only while metrics are
//! enabled, so a daemon without the flag never reads the clock for them.
//! Everything else (allocation, changed bytes, snapshot and hydration
//! progress, cache counters) is read from the engine when scraped
//! (`telemetry`). Labels are bounded: volume and op, never a
//! client or a chunk.

pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns on what only metrics need (latency histograms).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An NBD command, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Trim,
        Op::WriteZeroes,
        Op::Flush,
        Op::Cache,
        Op::BlockStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Flush => "flush",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One volume's requests by command: count and bytes.
#[derive(Debug, Default)]
pub struct IoStats {
    ops: [AtomicU64; 7],
    bytes: [AtomicU64; 7],
}

impl IoStats {
    pub fn record(&self, op: Op, bytes: u64) {
        self.ops[op.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes[op.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    /// (ops, bytes) of `op` so far.
    pub fn get(&self, op: Op) -> (u64, u64) {
        (
            self.ops[op.index()].load(Ordering::Relaxed),
            self.bytes[op.index()].load(Ordering::Relaxed),
        )
    }
}

/// Upper bounds of the latency buckets, in seconds: 8 µs to about 4 s, by
/// doubling, which covers a page-cache hit and a store fetch alike.
pub const LATENCY_BUCKETS: [f64; 20] = {
    let mut b = [0.0; 20];
    let mut i = 0;
    let mut v = 8e-6;
    while i < 20 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

/// A histogram of fixed buckets updated with atomics only: the data path
/// never takes a lock to be measured.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative), the last one for +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            counts: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe_nanos(&self, nanos: u64) {
        let secs = nanos as f64 / 1e9;
        let i = LATENCY_BUCKETS.partition_point(|&b| b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, counts.iter().sum(), buckets)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// NBD request latency by command, from the request read to its reply
/// queued.
pub static REQUEST_LATENCY: [Histogram; 7] = [const { Histogram::new() }; 7];

/// NBD connections in transmission now, and ever.
pub static NBD_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
pub static NBD_CONNECTIONS_TOTAL: AtomicU64 = AtomicU64::new(0);

/// When a request started, if latencies are being measured.
pub fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

pub fn finish(op: Op, started: Option<Instant>) {
    if let Some(t) = started {
        let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        REQUEST_LATENCY[op.index()].observe_nanos(nanos);
    }
}

/// Counts a connection in transmission for as long as it lives.
pub struct ConnectionGauge(());

impl ConnectionGauge {
    pub fn new() -> Self {
        NBD_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        NBD_CONNECTIONS_TOTAL.fetch_add(1, Ordering::Relaxed);
        ConnectionGauge(())
    }
}

impl Default for ConnectionGauge {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        NBD_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = Histogram::new();
        h.observe_nanos(1_000); // 1 µs: first bucket
        h.observe_nanos(8_000); // exactly the first bound
        h.observe_nanos(20_000); // 20 µs: third bucket (<= 32 µs)
        h.observe_nanos(60_000_000_000); // a minute: +Inf
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 60.000_029).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (8e-6, 2));
        assert_eq!(buckets[2].1, 1);
        assert_eq!(buckets.last().unwrap(), &(f64::MAX, 1));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn io_stats_count_by_op() {
        let s = IoStats::default();
        s.record(Op::Write, 4096);
        s.record(Op::Write, 512);
        s.record(Op::Flush, 0);
        assert_eq!(s.get(Op::Write), (2, 4608));
        assert_eq!(s.get(Op::Flush), (1, 0));
        assert_eq!(s.get(Op::Read), (0, 0));
    }
}
