//! The steps of a model run and how each is drawn. A step is chosen from
//! those the model allows now (attach a detached volume, complete an open
//! EBS snapshot, ...), with a few the daemon must refuse mixed in.
//!
//! Every step takes the same number of draws from the generator, whatever
//! it turns out to be, so a run replays from its seed even where the
//! daemon's timing (a job finishing a step earlier) changed what the model
//! allowed at one step.

use std::fmt;

use super::rng::Rng;
use super::state::{EBS_GIB, Model, Phase};

/// Names are drawn from a small pool, so the same name is deleted and
/// created again while jobs of its earlier volume still run.
pub const NAMES: [&str; 3] = ["a", "b", "c"];
/// Chunk size of every volume the model creates: small, so byte checks
/// stay cheap and every write spans chunk boundaries.
pub const CHUNK: u64 = 64 << 10;
/// Blocks of an EBS direct snapshot the model writes: a few at the start
/// and one near the end of its 2048.
const EBS_BLOCKS: [u64; 6] = [0, 1, 2, 5, 9, 2047];

/// One write of a `Write` step: `pattern` 0 is WRITE_ZEROES.
#[derive(Clone, Debug)]
pub struct Write {
    pub offset: u64,
    pub len: u64,
    pub pattern: u8,
}

#[derive(Clone, Debug)]
pub enum Op {
    Create {
        name: String,
        size: u64,
        ephemeral: bool,
        /// A completed snapshot, and whether to hydrate in the background.
        from: Option<(String, bool)>,
    },
    Delete {
        name: String,
    },
    Attach {
        name: String,
    },
    Detach {
        name: String,
    },
    Write {
        name: String,
        writes: Vec<Write>,
    },
    Snapshot {
        name: String,
    },
    SnapshotDelete {
        id: String,
    },
    WaitSnapshot {
        id: String,
    },
    WaitHydrated {
        name: String,
    },
    Gc,
    EbsStart,
    EbsPut {
        id: String,
        index: u64,
        pattern: u8,
    },
    EbsComplete {
        id: String,
    },
    /// Time passes (gc's grace period runs out for what is unreferenced).
    Sleep {
        ms: u64,
    },
    /// SIGTERM and start again, with new failpoint delays.
    Restart {
        delays: Delays,
    },
    /// kill -9 and start again, with new failpoint delays.
    Kill {
        delays: Delays,
    },
}

/// The failpoint delays of one daemon run: how long a snapshot waits
/// before its manifest (so jobs overlap later steps), and each hydrated
/// chunk (so hydration does too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delays {
    pub snapshot_ms: u64,
    pub hydrate_ms: u64,
}

impl Delays {
    pub fn draw(d: &mut Draws) -> Self {
        Delays {
            snapshot_ms: d.range(0, 3000),
            hydrate_ms: d.range(0, 20),
        }
    }

    /// `VOLUMED_FAILPOINTS`'s value.
    pub fn failpoints(&self) -> String {
        format!(
            "snapshot-before-manifest={},hydrate-chunk={}",
            self.snapshot_ms, self.hydrate_ms
        )
    }
}

/// The step kinds, for weights and for `VOLUMED_MODEL_SKIP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Create,
    Delete,
    Attach,
    Detach,
    Write,
    Snapshot,
    SnapshotDelete,
    WaitSnapshot,
    WaitHydrated,
    Gc,
    EbsStart,
    EbsPut,
    EbsComplete,
    Sleep,
    Restart,
    Kill,
}

impl Kind {
    pub const ALL: [Kind; 16] = [
        Kind::Create,
        Kind::Delete,
        Kind::Attach,
        Kind::Detach,
        Kind::Write,
        Kind::Snapshot,
        Kind::SnapshotDelete,
        Kind::WaitSnapshot,
        Kind::WaitHydrated,
        Kind::Gc,
        Kind::EbsStart,
        Kind::EbsPut,
        Kind::EbsComplete,
        Kind::Sleep,
        Kind::Restart,
        Kind::Kill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Delete => "delete",
            Kind::Attach => "attach",
            Kind::Detach => "detach",
            Kind::Write => "write",
            Kind::Snapshot => "snapshot",
            Kind::SnapshotDelete => "snapshot-delete",
            Kind::WaitSnapshot => "wait-snapshot",
            Kind::WaitHydrated => "wait-hydrated",
            Kind::Gc => "gc",
            Kind::EbsStart => "ebs-start",
            Kind::EbsPut => "ebs-put",
            Kind::EbsComplete => "ebs-complete",
            Kind::Sleep => "sleep",
            Kind::Restart => "restart",
            Kind::Kill => "kill",
        }
    }

    /// Parses a comma-separated list of kind names, or `ebs` for the three
    /// EBS direct steps.
    pub fn parse_list(list: &str) -> Result<Vec<Kind>, String> {
        let mut out = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word == "ebs" {
                out.extend([Kind::EbsStart, Kind::EbsPut, Kind::EbsComplete]);
                continue;
            }
            match Kind::ALL.iter().find(|k| k.name() == word) {
                Some(k) => out.push(*k),
                None => return Err(format!("unknown step kind {word:?}")),
            }
        }
        Ok(out)
    }

    /// How often the kind is drawn when the model allows it.
    fn weight(self) -> u64 {
        match self {
            Kind::Create => 10,
            Kind::Delete => 6,
            Kind::Attach => 8,
            Kind::Detach => 6,
            Kind::Write => 14,
            Kind::Snapshot => 10,
            Kind::SnapshotDelete => 4,
            Kind::WaitSnapshot => 3,
            Kind::WaitHydrated => 2,
            Kind::Gc => 6,
            Kind::EbsStart => 3,
            Kind::EbsPut => 6,
            Kind::EbsComplete => 3,
            Kind::Sleep => 5,
            Kind::Restart => 3,
            Kind::Kill => 3,
        }
    }
}

/// A step's share of the generator: a fixed number of draws taken up
/// front, handed out in order. The most a step takes is a burst of six
/// writes: 3 + 6 × 4.
pub struct Draws {
    values: [u64; 32],
    next: usize,
}

impl Draws {
    pub fn take(rng: &mut Rng) -> Self {
        Draws {
            values: std::array::from_fn(|_| rng.next_u64()),
            next: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let v = self.values[self.next];
        self.next += 1;
        v
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 99) < percent
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize].clone()
    }

    fn weighted(&mut self, weights: &[u64]) -> usize {
        Rng::new(self.next()).weighted(weights)
    }
}

impl Op {
    /// Draws the next step the model allows, leaving out `skip`.
    pub fn draw(model: &Model, rng: &mut Rng, skip: &[Kind], gc_grace_ms: u64) -> Op {
        let mut d = Draws::take(rng);
        let allowed: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| !skip.contains(k) && possible(model, *k))
            .collect();
        // A snapshot job outliving its volume, whose name then comes back,
        // is the sequence that lost data once (issue 24): while a job may
        // still run, deleting its volume and creating the name again are
        // drawn three times as often.
        let racing = !pending_volumes(model).is_empty();
        let weights: Vec<u64> = allowed
            .iter()
            .map(|k| match k {
                Kind::Delete | Kind::Create if racing => 3 * k.weight(),
                _ => k.weight(),
            })
            .collect();
        let kind = allowed[d.weighted(&weights)];
        build(model, kind, &mut d, gc_grace_ms)
    }
}

fn names_where(model: &Model, f: impl Fn(Option<&super::state::Volume>) -> bool) -> Vec<String> {
    NAMES
        .iter()
        .filter(|n| f(model.volumes.get(**n)))
        .map(|n| n.to_string())
        .collect()
}

/// Names with a snapshot of theirs still pending: of the volume under
/// that name now, or of one deleted since.
fn pending_volumes(model: &Model) -> Vec<String> {
    let mut names: Vec<String> = model
        .snapshots
        .values()
        .filter(|s| s.phase == Phase::Pending)
        .filter_map(|s| s.content.volume().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn hydrating(model: &Model) -> Vec<String> {
    names_where(model, |v| v.is_some_and(|v| v.hydrates))
}

fn open_uploads(model: &Model) -> Vec<String> {
    model
        .snapshots
        .iter()
        .filter(|(_, s)| s.phase == Phase::Open && !s.interrupted)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Completed snapshots of volumes, which the model can restore.
fn restorable(model: &Model) -> Vec<String> {
    model
        .snapshots
        .iter()
        .filter(|(_, s)| s.phase == Phase::Completed && !s.is_ebs())
        .map(|(id, _)| id.clone())
        .collect()
}

fn possible(model: &Model, kind: Kind) -> bool {
    let any = |f: &dyn Fn(Option<&super::state::Volume>) -> bool| !names_where(model, f).is_empty();
    match kind {
        Kind::Create | Kind::Delete | Kind::Gc | Kind::Sleep | Kind::Restart | Kind::Kill => true,
        Kind::Attach => any(&|v| v.is_some_and(|v| !v.attached)),
        Kind::Detach | Kind::Write => any(&|v| v.is_some_and(|v| v.attached)),
        Kind::Snapshot => !model.volumes.is_empty(),
        Kind::SnapshotDelete => model
            .snapshots
            .values()
            .any(|s| !s.in_flight() || !s.is_ebs()),
        Kind::WaitSnapshot => !model.in_phase(Phase::Pending).is_empty(),
        Kind::WaitHydrated => !hydrating(model).is_empty(),
        Kind::EbsStart => {
            model
                .snapshots
                .values()
                .filter(|s| s.phase == Phase::Open)
                .count()
                < 2
        }
        Kind::EbsPut | Kind::EbsComplete => !open_uploads(model).is_empty(),
    }
}

fn build(model: &Model, kind: Kind, d: &mut Draws, gc_grace_ms: u64) -> Op {
    match kind {
        Kind::Create => {
            // Mostly a free name; sometimes a taken one, which must be
            // refused.
            let free = names_where(model, |v| v.is_none());
            let racing: Vec<String> = pending_volumes(model)
                .into_iter()
                .filter(|n| free.contains(n))
                .collect();
            let name = match (racing, free) {
                (racing, _) if !racing.is_empty() && d.chance(70) => d.pick(&racing),
                (_, free) if !free.is_empty() && d.chance(85) => d.pick(&free),
                _ => d.pick(&NAMES).to_string(),
            };
            let from = restorable(model);
            let from = (!from.is_empty() && d.chance(35)).then(|| (d.pick(&from), d.chance(75)));
            let base = match &from {
                Some((id, _)) => model.snapshots[id].size(),
                None => d.range(1, 4) * (4 << 20),
            };
            // Sometimes a size that leaves a short last chunk; a restore
            // may also be larger than its snapshot.
            let size = match d.range(0, 4) {
                0 => base + d.range(1, 256) * 512,
                1 if from.is_some() => base + (4 << 20),
                _ => base,
            };
            Op::Create {
                name,
                size,
                ephemeral: d.chance(20),
                from,
            }
        }
        Kind::Delete => {
            // Mostly a volume that can go; sometimes an attached one or a
            // name that does not exist, which must be refused.
            let detached = names_where(model, |v| v.is_some_and(|v| !v.attached));
            let racing: Vec<String> = pending_volumes(model)
                .into_iter()
                .filter(|n| detached.contains(n))
                .collect();
            let name = match (racing, detached) {
                (racing, _) if !racing.is_empty() && d.chance(70) => d.pick(&racing),
                (_, detached) if !detached.is_empty() && d.chance(85) => d.pick(&detached),
                _ => d.pick(&NAMES).to_string(),
            };
            Op::Delete { name }
        }
        Kind::Attach => Op::Attach {
            name: d.pick(&names_where(model, |v| v.is_some_and(|v| !v.attached))),
        },
        Kind::Detach => Op::Detach {
            name: d.pick(&names_where(model, |v| v.is_some_and(|v| v.attached))),
        },
        Kind::Write => {
            let name = d.pick(&names_where(model, |v| v.is_some_and(|v| v.attached)));
            let size = model.volume(&name).size;
            // A quarter of the steps are a burst of small writes before
            // their flush, as a database guest's: enough of them for the
            // daemon's intent log to take the flush (disk/intent_log.rs).
            let burst = d.chance(25);
            let (count, max_sectors) = if burst {
                (d.range(4, 6), 128)
            } else {
                (d.range(1, 3), 2048)
            };
            let writes = (0..count)
                .map(|_| {
                    // 512-byte aligned, up to 1 MiB (64 KiB in a burst),
                    // often across chunks.
                    let sectors = size / 512;
                    let len = d.range(1, max_sectors.min(sectors)) * 512;
                    let offset = d.range(0, sectors - len / 512) * 512;
                    let pattern = if d.chance(10) {
                        0
                    } else {
                        d.range(1, 255) as u8
                    };
                    Write {
                        offset,
                        len,
                        pattern,
                    }
                })
                .collect();
            Op::Write { name, writes }
        }
        Kind::Snapshot => Op::Snapshot {
            name: d.pick(&names_where(model, |v| v.is_some())),
        },
        Kind::SnapshotDelete => {
            let ids: Vec<String> = model
                .snapshots
                .iter()
                .filter(|(_, s)| !s.in_flight() || !s.is_ebs())
                .map(|(id, _)| id.clone())
                .collect();
            Op::SnapshotDelete { id: d.pick(&ids) }
        }
        Kind::WaitSnapshot => Op::WaitSnapshot {
            id: d.pick(&model.in_phase(Phase::Pending)),
        },
        Kind::WaitHydrated => Op::WaitHydrated {
            name: d.pick(&hydrating(model)),
        },
        Kind::Gc => Op::Gc,
        Kind::EbsStart => Op::EbsStart,
        Kind::EbsPut => Op::EbsPut {
            id: d.pick(&open_uploads(model)),
            index: d.pick(&EBS_BLOCKS),
            pattern: d.range(1, 255) as u8,
        },
        Kind::EbsComplete => Op::EbsComplete {
            id: d.pick(&open_uploads(model)),
        },
        Kind::Sleep => Op::Sleep {
            ms: d.range(gc_grace_ms / 4, gc_grace_ms * 3 / 2),
        },
        Kind::Restart => Op::Restart {
            delays: Delays::draw(d),
        },
        Kind::Kill => Op::Kill {
            delays: Delays::draw(d),
        },
    }
}

/// The step as a line of the run's log, in `vol`'s words where it has them.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create {
                name,
                size,
                ephemeral,
                from,
            } => {
                write!(f, "vol create {name} --size {size}")?;
                match from {
                    Some((id, true)) => write!(f, " --from-snapshot {id}")?,
                    Some((id, false)) => write!(f, " --from-snapshot {id} --no-hydrate")?,
                    None => write!(f, " --chunk-size {CHUNK}")?,
                }
                if *ephemeral {
                    write!(f, " --ephemeral")?;
                }
                Ok(())
            }
            Op::Delete { name } => write!(f, "vol delete {name}"),
            Op::Attach { name } => write!(f, "vol attach {name}"),
            Op::Detach { name } => write!(f, "vol detach {name}"),
            Op::Write { name, writes } => {
                write!(f, "qemu-io {name}:")?;
                for w in writes {
                    match w.pattern {
                        0 => write!(f, " 'write -z {} {}'", w.offset, w.len)?,
                        p => write!(f, " 'write -P {p} {} {}'", w.offset, w.len)?,
                    }
                }
                write!(f, " 'flush'")
            }
            Op::Snapshot { name } => write!(f, "vol snapshot create {name}"),
            Op::SnapshotDelete { id } => write!(f, "vol snapshot delete {id}"),
            Op::WaitSnapshot { id } => write!(f, "wait until {id} settles"),
            Op::WaitHydrated { name } => write!(f, "wait until {name} is hydrated"),
            Op::Gc => write!(f, "vol gc"),
            Op::EbsStart => write!(f, "ebs start-snapshot --volume-size {EBS_GIB}"),
            Op::EbsPut { id, index, pattern } => write!(
                f,
                "ebs put-snapshot-block {id} --block-index {index} (bytes {pattern})"
            ),
            Op::EbsComplete { id } => write!(f, "ebs complete-snapshot {id}"),
            Op::Sleep { ms } => write!(f, "sleep {ms} ms"),
            Op::Restart { delays } => write!(f, "restart (SIGTERM) with {}", delays.failpoints()),
            Op::Kill { delays } => write!(f, "kill -9 and start with {}", delays.failpoints()),
        }
    }
}
