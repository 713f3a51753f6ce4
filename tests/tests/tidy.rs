//! Tidy: the rules of the house and its map, checked against the code by
//! reading files only (no daemon, no build), in the manner of
//! rust-analyzer's `xtask/src/tidy.rs`.
//!
//! - Every source file of the workspace is on docs/architecture.md's code
//!   map, and every file the map names exists.
//! - Imports point down: each top-level module of the daemon uses only the
//!   modules [`LAYERS`] allows it (`use crate::…`, or `super::` reaching
//!   out of its directory), the table has no cycle, and it is the one
//!   docs/architecture.md prints under "Layers".
//! - One owner per piece of state: `impl Engine` is in `engine/mod.rs`
//!   only, and each catalog tree is written by its owner only.
//! - The numbers the docs quote (timeouts, concurrency, retry policy, chunk
//!   and page sizes) are the constants' values, and every test the docs
//!   cite (`file.rs::name`) exists.
//! - Every module opens with `//!`; no file of the daemon is much over 600
//!   lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Files under `dir` (relative to the root) whose names end in `ext`,
/// recursively, as root-relative paths with `/`.
fn files(dir: &str, ext: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{dir}/{name}");
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            files(&rel, ext, out);
        } else if name.ends_with(ext) {
            out.push(rel);
        }
    }
}

/// The crates' source directories.
const RUST_DIRS: &[&str] = &[
    "volumed/src",
    "volumed/api/src",
    "nbd-proto/src",
    "snapshot/src",
    "cli/src",
    "tests/src",
    "tests/tests",
    "benches/src",
    "benches/benches",
];

fn rust_files() -> Vec<String> {
    let mut out = Vec::new();
    for d in RUST_DIRS {
        files(d, ".rs", &mut out);
    }
    out.sort();
    out
}

/// Every file the code map must name: the Rust sources, the bench
/// scripts, the scripts and CI.
fn workspace_files() -> BTreeSet<String> {
    let mut out = rust_files();
    files("benches", ".sh", &mut out);
    files("scripts", "", &mut out);
    files(".ci", "", &mut out);
    out.into_iter().collect()
}

/// The text of the doc section that starts with `heading` (a whole line),
/// up to the next heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs have no section {heading:?}"))
        + 1;
    let rest = &doc[start + heading.len()..];
    let end = rest
        .lines()
        .scan(0usize, |at, l| {
            let here = *at;
            *at += l.len() + 1;
            Some((here, l))
        })
        .find(|(_, l)| {
            let hashes = l.chars().take_while(|c| *c == '#').count();
            hashes > 0 && hashes <= level && l[hashes..].starts_with(' ')
        })
        .map_or(rest.len(), |(at, _)| at);
    &doc[start..start + heading.len() + end]
}

/// The first cell of each table row that is a path in backticks.
fn mapped_paths(doc: &str) -> BTreeSet<String> {
    section(doc, "## Code map")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(p, _)| p.to_owned())
        .collect()
}

#[test]
fn every_source_file_is_on_the_map_and_every_mapped_file_exists() {
    let doc = read("docs/architecture.md");
    let mapped = mapped_paths(&doc);
    let present = workspace_files();
    let unmapped: Vec<_> = present.difference(&mapped).collect();
    let missing: Vec<_> = mapped.difference(&present).collect();
    assert!(
        unmapped.is_empty() && missing.is_empty(),
        "docs/architecture.md's code map is not the workspace:\n\
         files not on the map: {unmapped:#?}\nmapped files that do not exist: {missing:#?}"
    );
}

/// Every `path.rs::name` the docs cite as a test or an item: the file
/// exists and defines a function or a constant of that name.
#[test]
fn every_cited_test_exists() {
    let mut missing = Vec::new();
    let mut docs = Vec::new();
    files("docs", ".md", &mut docs);
    for d in &docs {
        let text = read(d);
        for cite in text.split('`').skip(1).step_by(2) {
            let Some((file, name)) = cite.split_once(".rs::") else {
                continue;
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let path = format!("{file}.rs");
            let Ok(code) = std::fs::read_to_string(root().join(&path)) else {
                missing.push(format!("{d}: {cite} (no file {path})"));
                continue;
            };
            let defined = [
                format!("fn {name}("),
                format!("fn {name}<"),
                format!("const {name}:"),
            ]
            .iter()
            .any(|p| code.contains(p.as_str()));
            if !defined {
                missing.push(format!("{d}: {cite}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited but not found:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_module_opens_with_a_doc_comment() {
    let bare: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| {
            let text = read(f);
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .collect();
    assert!(
        bare.is_empty(),
        "modules without a `//!` opening: {bare:#?}"
    );
}

/// A file of the daemon this much longer than 600 lines wants splitting.
const MAX_LINES: usize = 620;

#[test]
fn no_daemon_file_is_much_over_600_lines() {
    let mut long = Vec::new();
    files("volumed/src", ".rs", &mut long);
    long.retain(|f| read(f).lines().count() > MAX_LINES);
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:#?}");
}

/// The daemon's top-level modules in layers, lowest first, and what each
/// may import. A module imports only modules of lower layers; the front-ends
/// share a layer and none imports another.
const LAYERS: &[(&str, &[&str])] = &[
    // Ground: knows nothing of volumes.
    ("failpoint", &[]),
    ("child", &[]),
    ("socket_path", &[]),
    ("metrics", &[]),
    ("disk", &["failpoint"]),
    ("catalog", &[]),
    // The host's master keys.
    ("keys", &["catalog", "child"]),
    // The one owner of volume state.
    (
        "engine",
        &["catalog", "disk", "metrics", "failpoint", "keys"],
    ),
    // VM images, through the engine's public functions.
    ("images", &["engine", "catalog", "failpoint", "child"]),
    // Images (AMIs) and instances, through the engine's public functions.
    ("machines", &["engine", "catalog", "failpoint", "child"]),
    // Snapshot policies, prune and the recycle bin, through the engine's
    // and the machines layer's public functions.
    ("lifecycle", &["machines", "engine", "catalog", "failpoint"]),
    // Shared by the front-ends.
    (
        "present",
        &[
            "images",
            "machines",
            "lifecycle",
            "engine",
            "catalog",
            "keys",
        ],
    ),
    ("tls", &[]),
    // Front-ends, apart.
    (
        "nbd",
        &["engine", "catalog", "disk", "metrics", "socket_path", "tls"],
    ),
    (
        "api",
        &[
            "present",
            "images",
            "machines",
            "lifecycle",
            "engine",
            "catalog",
            "socket_path",
        ],
    ),
    (
        "aws",
        &[
            "present",
            "images",
            "machines",
            "lifecycle",
            "engine",
            "catalog",
            "keys",
            "tls",
        ],
    ),
    ("telemetry", &["lifecycle", "engine", "metrics"]),
    // Wiring.
    ("config", &["aws", "disk", "keys", "nbd", "tls"]),
    (
        "daemon",
        &[
            "api",
            "aws",
            "catalog",
            "config",
            "disk",
            "engine",
            "images",
            "keys",
            "machines",
            "lifecycle",
            "metrics",
            "nbd",
            "present",
            "telemetry",
            "tls",
        ],
    ),
];

/// The layer of each module, by its position in [`LAYERS`]: front-ends (and
/// the modules of one layer) share a rank.
fn rank(module: &str) -> usize {
    const RANKS: &[&[&str]] = &[
        &["failpoint", "child", "socket_path", "metrics", "catalog"],
        &["disk", "keys"],
        &["engine"],
        &["images", "machines"],
        &["lifecycle"],
        &["present", "tls"],
        &["nbd", "api", "aws", "telemetry"],
        &["config"],
        &["daemon"],
    ];
    RANKS
        .iter()
        .position(|r| r.contains(&module))
        .unwrap_or_else(|| panic!("module {module} has no layer"))
}

/// The top-level modules `file` (under volumed/src) names, with the line of
/// each first mention: `crate::x`, and `super::` chains that climb out of
/// the file's directory to the crate root.
fn imports(rel: &str) -> BTreeMap<String, usize> {
    let path = rel.strip_prefix("volumed/src/").expect("a daemon file");
    let parts: Vec<&str> = path.split('/').collect();
    // The module's depth below the crate root: `a.rs` and `a/mod.rs` are
    // 1, `a/b.rs` is 2.
    let depth = if parts.last() == Some(&"mod.rs") {
        parts.len() - 1
    } else {
        parts.len()
    };
    let mut out = BTreeMap::new();
    for (n, line) in read(rel).lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let name: String = rest[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.entry(name).or_insert(n + 1);
            rest = &rest[i + 7..];
        }
        let mut rest = code;
        while let Some(i) = rest.find("super::") {
            // Only the start of a chain: not preceded by another `super::`.
            let before = &rest[..i];
            let chain = &rest[i..];
            let mut supers = 0;
            let mut tail = chain;
            while let Some(t) = tail.strip_prefix("super::") {
                supers += 1;
                tail = t;
            }
            if !before.ends_with("::") && supers >= depth {
                let name: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.entry(name).or_insert(n + 1);
                }
            }
            rest = &chain[7 * supers..];
        }
    }
    out.remove(top_module(path));
    out
}

/// The top-level module a file under volumed/src belongs to: its first
/// directory, or its stem (`child_tests.rs` is `child`'s, by `#[path]`).
fn top_module(path: &str) -> &str {
    let first = path.split('/').next().unwrap_or("");
    first
        .strip_suffix("_tests.rs")
        .or_else(|| first.strip_suffix(".rs"))
        .unwrap_or(first)
}

#[test]
fn imports_point_down() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = LAYERS
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    // The table itself points down.
    for (m, deps) in &allowed {
        for d in deps {
            assert!(
                rank(d) < rank(m),
                "the table lets {m} import {d}, which is not below it"
            );
        }
    }
    let mut daemon = Vec::new();
    files("volumed/src", ".rs", &mut daemon);
    let mut wrong = Vec::new();
    for f in &daemon {
        let path = f.strip_prefix("volumed/src/").expect("a daemon file");
        let top = top_module(path);
        if matches!(top, "lib" | "main") {
            continue;
        }
        let Some(ok) = allowed.get(top) else {
            wrong.push(format!("{f}: module {top} is not in the table"));
            continue;
        };
        for (m, line) in imports(f) {
            if !ok.contains(m.as_str()) {
                wrong.push(format!("{f}:{line}: {top} imports {m}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not point down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_docs_print_the_same_layers() {
    let doc = read("docs/architecture.md");
    let layers = section(&doc, "### Layers");
    let mut printed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in layers.lines() {
        let Some(row) = l.strip_prefix("| `") else {
            continue;
        };
        let Some((m, rest)) = row.split_once("` |") else {
            continue;
        };
        let deps = rest
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        printed.insert(m.to_owned(), deps);
    }
    let table: BTreeMap<String, BTreeSet<String>> = LAYERS
        .iter()
        .map(|(m, deps)| {
            (
                (*m).to_owned(),
                deps.iter().map(|d| (*d).to_owned()).collect(),
            )
        })
        .collect();
    assert_eq!(
        printed, table,
        "docs/architecture.md's \"Layers\" table is not tidy.rs's LAYERS"
    );
}

/// `anyhow` is for the binary's wiring; every layer has its own errors.
#[test]
fn anyhow_only_in_the_wiring() {
    let mut daemon = Vec::new();
    files("volumed/src", ".rs", &mut daemon);
    let wiring = ["main.rs", "daemon.rs", "config.rs"].map(|f| format!("volumed/src/{f}"));
    let elsewhere: Vec<&String> = daemon
        .iter()
        .filter(|f| !wiring.contains(f))
        .filter(|f| read(f).contains("anyhow"))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "anyhow outside main.rs, daemon.rs, config.rs: {elsewhere:?}"
    );
}

#[test]
fn impl_engine_lives_in_one_file() {
    let mut daemon = Vec::new();
    files("volumed/src", ".rs", &mut daemon);
    let elsewhere: Vec<&String> = daemon
        .iter()
        .filter(|f| f.as_str() != "volumed/src/engine/mod.rs")
        .filter(|f| {
            read(f)
                .lines()
                .any(|l| l.trim_start().starts_with("impl Engine"))
        })
        .collect();
    assert!(
        elsewhere.is_empty(),
        "impl Engine outside engine/mod.rs: {elsewhere:?}"
    );
}

/// Each catalog tree's writers: the `Catalog` methods that change it, and
/// the only directories (under volumed/src) that may call them.
const TREE_OWNERS: &[(&[&str], &[&str])] = &[
    (
        &["create_volume", "replace_volume", "remove_volume"],
        &["engine/", "catalog/"],
    ),
    (
        &[
            "put_snapshot",
            "record_new_snapshot",
            "remove_snapshot",
            "put_snapshot_export",
            "remove_snapshot_export",
            "mark_clean_shutdown",
        ],
        &["engine/", "catalog/"],
    ),
    (
        &["put_job", "remove_job", "put_last_job"],
        &["images/", "catalog/"],
    ),
    (
        &[
            "put_aws_volume",
            "remove_aws_volume",
            "put_aws_snapshot",
            "remove_aws_snapshot",
            "put_volume_modification",
            "remove_volume_modification",
        ],
        &["aws/", "catalog/"],
    ),
    (
        &[
            "put_policy",
            "remove_policy",
            "put_schedule_run",
            "remove_schedule_run",
            "put_bin_rule",
            "remove_bin_rule",
        ],
        &["lifecycle/", "catalog/"],
    ),
    (&["put_snapshot_set"], &["engine/", "catalog/"]),
    (
        &[
            "put_image",
            "remove_image",
            "put_instance",
            "remove_instance",
        ],
        &["machines/", "catalog/"],
    ),
];

#[test]
fn each_catalog_tree_has_one_writer() {
    let mut daemon = Vec::new();
    files("volumed/src", ".rs", &mut daemon);
    let mut wrong = Vec::new();
    for f in &daemon {
        let path = f.strip_prefix("volumed/src/").expect("a daemon file");
        // A call on a catalog, however rustfmt wrapped it.
        let text = squash(&read(f)).replace("catalog .", "catalog.");
        for (methods, owners) in TREE_OWNERS {
            for m in *methods {
                if text.contains(&format!("catalog.{m}("))
                    && !owners.iter().any(|o| path.starts_with(o))
                {
                    wrong.push(format!("{f}: Catalog::{m}"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "catalog writes outside their tree's owner:\n{}",
        wrong.join("\n")
    );
}

/// One number the docs quote and the code that sets it: `{}` marks the
/// number in each needle; each side's value is multiplied by its scale
/// (to bytes, microseconds or a count) before they are compared.
struct Quote {
    doc: &'static str,
    said: &'static str,
    said_scale: f64,
    file: &'static str,
    code: &'static str,
    code_scale: f64,
}

const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = MIB * 1024.0;
const TIB: f64 = GIB * 1024.0;
const S: f64 = 1e6;
const MS: f64 = 1e3;
const US: f64 = 1.0;
const ONE: f64 = 1.0;

const ARCH: &str = "docs/architecture.md";

fn quotes() -> Vec<Quote> {
    let q = |doc, said, said_scale, file, code, code_scale| Quote {
        doc,
        said,
        said_scale,
        file,
        code,
        code_scale,
    };
    vec![
        // NBD.
        q(
            ARCH,
            "(`--nbd-handshake-timeout`, {} s by default)",
            S,
            "volumed/src/config.rs",
            "\"VOLUMED_NBD_HANDSHAKE_TIMEOUT\", value_name = \"DURATION\", default_value = \"{}s\"",
            S,
        ),
        q(
            ARCH,
            "for up to `--nbd-poll` ({} µs)",
            US,
            "volumed/src/nbd/poll.rs",
            "pub const POLL_MAX: Duration = Duration::from_micros({});",
            US,
        ),
        q(
            ARCH,
            "recv` for up to {} µs before",
            US,
            "volumed/src/config.rs",
            "\"VOLUMED_NBD_POLL\", value_name = \"DURATION\", default_value = \"{}us\"",
            US,
        ),
        q(
            ARCH,
            "in-flight window ({} requests and",
            ONE,
            NBD_SESSION,
            "pub(super) const MAX_IN_FLIGHT: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "requests and {} MiB of payload per connection",
            MIB,
            NBD_SESSION,
            "const PAYLOAD_BUDGET_KIB: u32 = {};",
            KIB,
        ),
        q(
            ARCH,
            "A payload over the {} MiB maximum",
            MIB,
            NBD_LIMITS,
            NBD_MAX_PAYLOAD,
            ONE,
        ),
        q(
            ARCH,
            "preferred = chunk size,\nmaximum {} MiB)",
            MIB,
            NBD_LIMITS,
            NBD_MAX_PAYLOAD,
            ONE,
        ),
        // The disk and the chunk map.
        q(
            ARCH,
            "sparse segment files of {} TiB each",
            TIB,
            "volumed/src/disk/data_file.rs",
            "pub const SEGMENT_SIZE: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "Ops\n  beyond the ring's {} entries",
            ONE,
            "volumed/src/disk/uring.rs",
            "const RING_ENTRIES: u32 = {};",
            ONE,
        ),
        q(
            ARCH,
            "chunks (a power of two from {} KiB to",
            KIB,
            "volumed/api/src/types.rs",
            "pub const MIN_CHUNK_SIZE: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "KiB to 4 MiB,\n{} KiB by default)",
            KIB,
            "volumed/api/src/types.rs",
            "pub const DEFAULT_CHUNK_SIZE: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "from 64 KiB to {} MiB,",
            MIB,
            "volumed/api/src/types.rs",
            "pub const MAX_CHUNK_SIZE: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "The chunk's stripe lock ({} stripes per volume",
            ONE,
            "volumed/src/engine/base.rs",
            "const STRIPES: usize = {};",
            ONE,
        ),
        // Snapshots and restores.
        q(
            ARCH,
            "upload the changed chunks, {}\n   at a time",
            ONE,
            "volumed/src/engine/jobs/snapshot.rs",
            "const UPLOAD_CONCURRENCY: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "a page of {} chunk entries",
            ONE,
            "snapshot/src/root.rs",
            "pub const PAGE_CHUNKS: u32 = {};",
            ONE,
        ),
        q(
            ARCH,
            "at most {} decoded pages cached",
            ONE,
            "snapshot/src/reader.rs",
            "pub const CACHED_PAGES: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "format-2 manifest with at most {} stored pages",
            ONE,
            "volumed/src/engine/restore.rs",
            "const WHOLE_PAGES: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "`HYDRATE_CONCURRENCY` = {} fetches",
            ONE,
            "volumed/src/engine/jobs/hydrate.rs",
            "const HYDRATE_CONCURRENCY: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "`PERSIST_EVERY` = {} chunks",
            ONE,
            "volumed/src/engine/jobs/hydrate.rs",
            "const PERSIST_EVERY: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "retries failed chunks after {} s",
            S,
            "volumed/src/engine/jobs/hydrate.rs",
            "const RETRY_PAUSE: Duration = Duration::from_secs({});",
            S,
        ),
        q(
            ARCH,
            "memory up to {} MiB, then",
            MIB,
            "volumed/src/engine/freeze.rs",
            "pub const MEMORY_BOUND: usize = {};",
            ONE,
        ),
        // The retry policy.
        q(
            ARCH,
            "up to {} attempts with full-jitter waits",
            ONE,
            "snapshot/src/store/retry.rs",
            "attempts: {},",
            ONE,
        ),
        q(
            ARCH,
            "under ceilings of {}, 0.5 and 1 s",
            S,
            "snapshot/src/store/retry.rs",
            "base_delay: Duration::from_millis({}),",
            MS,
        ),
        q(
            ARCH,
            "within {} s per operation",
            S,
            "snapshot/src/store/retry.rs",
            "deadline: Duration::from_secs({}),",
            S,
        ),
        q(
            "docs/reliability.md",
            "full-jitter backoff from {} ms",
            MS,
            "snapshot/src/store/retry.rs",
            "base_delay: Duration::from_millis({}),",
            MS,
        ),
        q(
            "docs/reliability.md",
            "ms to {} s, a",
            S,
            "snapshot/src/store/retry.rs",
            "max_delay: Duration::from_secs({}),",
            S,
        ),
        q(
            "docs/reliability.md",
            "a {} s deadline per operation",
            S,
            "snapshot/src/store/retry.rs",
            "deadline: Duration::from_secs({}),",
            S,
        ),
        // Imports.
        q(
            ARCH,
            "asks for\neach {} MiB window's allocation",
            MIB,
            "volumed/src/images/copy.rs",
            "const WINDOW: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "reads the chunks holding data {} at a\ntime",
            ONE,
            "volumed/src/images/copy.rs",
            "const READS_IN_FLIGHT: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "time over {} NBD connections",
            ONE,
            "volumed/src/images/import.rs",
            "const NBD_CONNECTIONS: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "`Volume::write`, {} writes in flight",
            ONE,
            "volumed/src/images/copy.rs",
            "pub(super) const WRITES_IN_FLIGHT: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "every {} MiB it waits",
            MIB,
            "volumed/src/images/copy.rs",
            "const CHECKPOINT_EVERY: u64 = {};",
            ONE,
        ),
        q(
            ARCH,
            "its files reserved {} GiB ahead",
            GIB,
            "volumed/src/images/stream.rs",
            "const STREAM_RESERVE: u64 = {};",
            ONE,
        ),
        // The catalog and the CLI.
        q(
            ARCH,
            "at most {} changes per flush",
            ONE,
            "volumed/src/catalog/writer.rs",
            "const MAX_BATCH: usize = {};",
            ONE,
        ),
        q(
            ARCH,
            "asks again ({} ms, doubling",
            MS,
            "cli/src/commands/mod.rs",
            "const FIRST: Duration = Duration::from_millis({});",
            MS,
        ),
        q(
            ARCH,
            "doubling to {} ms)",
            MS,
            "cli/src/commands/mod.rs",
            "const MAX: Duration = Duration::from_millis({});",
            MS,
        ),
    ]
}

/// Where the NBD wire's limits and the session's window are set.
const NBD_SESSION: &str = "volumed/src/nbd/window.rs";
const NBD_LIMITS: &str = "nbd-proto/src/consts.rs";
const NBD_MAX_PAYLOAD: &str = "pub const MAX_PAYLOAD: u32 = {};";

/// `text` with every run of white space one space: docs wrap lines
/// anywhere.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn number_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " ._<*".contains(c)
}

/// The number `needle` puts where its `{}` is, in `text`: the first place
/// the text around it matches.
fn quoted(text: &str, needle: &str) -> Option<String> {
    let (text, needle) = (squash(text), squash(needle));
    let (before, after) = needle.split_once("{}").expect("a needle has {}");
    let mut from = 0;
    while let Some(i) = text[from..].find(before) {
        let start = from + i + before.len();
        let rest = &text[start..];
        let end = if after.is_empty() {
            rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
                .unwrap_or(rest.len())
        } else {
            rest.find(after)?
        };
        let v = &rest[..end];
        if v.len() <= 24 && v.chars().all(number_char) && value(v).is_some() {
            return Some(v.trim().to_owned());
        }
        from = start;
    }
    None
}

/// A number as the docs write it (`16`, `0.25`, `four`) or as the code
/// does (`32 << 20`, `10_000`, `8 << 40`).
fn value(text: &str) -> Option<f64> {
    let t = text.trim();
    const WORDS: &[&str] = &[
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    if let Some(n) = WORDS.iter().position(|w| *w == t) {
        return Some(n as f64);
    }
    if let Some((a, b)) = t.split_once("<<") {
        let (a, b) = (value(a)?, value(b)?);
        return Some(a * 2f64.powi(b as i32));
    }
    if let Some((a, b)) = t.split_once('*') {
        return Some(value(a)? * value(b)?);
    }
    t.replace('_', "").parse().ok()
}

#[test]
fn documented_numbers_match_the_constants() {
    let mut wrong = Vec::new();
    for q in quotes() {
        let doc = read(q.doc);
        let code = read(q.file);
        let said = quoted(&doc, q.said).as_deref().and_then(value);
        let set = quoted(&code, q.code).as_deref().and_then(value);
        match (said, set) {
            (Some(a), Some(b)) if (a * q.said_scale - b * q.code_scale).abs() < 1e-6 => {}
            (a, b) => wrong.push(format!(
                "{} says {:?} in {:?}; {} sets {:?} in {:?}",
                q.doc, a, q.said, q.file, b, q.code
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "quoted numbers that do not match:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_helpers_read_what_they_should() {
    assert_eq!(value("32 << 20"), Some(33_554_432.0));
    assert_eq!(value("10_000"), Some(10_000.0));
    assert_eq!(value("four"), Some(4.0));
    assert_eq!(value("0.25"), Some(0.25));
    assert_eq!(
        quoted("a window, a window of\n32 MiB here", "window of {} MiB"),
        Some("32".to_owned())
    );
    assert_eq!(
        quoted("const X: u64 = 8 << 40;\n", "const X: u64 = {};"),
        Some("8 << 40".to_owned())
    );
    let deep = imports("volumed/src/engine/jobs/snapshot.rs");
    assert!(deep.contains_key("catalog"), "{deep:?}");
}
