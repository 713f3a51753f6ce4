//! Criterion micro-benchmarks of volumed's hot functions live in
//! `benches/benches/`; end-to-end comparisons against peers (qemu-nbd) are
//! the scripts beside this crate. Results and commands: docs/performance.md.
