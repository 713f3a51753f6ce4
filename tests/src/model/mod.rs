//! The lifecycle model test: a seeded random sequence of lifecycle steps
//! (create, delete and create again under the same name, attach, detach,
//! writes, snapshots slowed by a failpoint so they overlap later steps,
//! restores, hydration, snapshot deletes, gc with a short grace period,
//! EBS direct uploads spread over many steps, clean restarts and kill -9)
//! against the real daemon, checked after every step against a model kept
//! by the test.
//!
//! - `state`: the model (bytes, volumes, snapshots), which asks the
//!   daemon nothing;
//! - `op`: the steps and how they are drawn;
//! - `driver`: carries a step out with real clients and updates the model;
//! - `check`: compares the daemon with the model after each step;
//! - `rng`: the seeded generator.
//!
//! A run is set by `VOLUMED_MODEL_SEED` (else random), `VOLUMED_MODEL_STEPS`
//! and `VOLUMED_MODEL_SKIP` (step kinds left out, e.g. `kill,ebs`). A
//! failure prints the seed, the step and every step before it, so the same
//! seed replays it.

mod check;
mod driver;
mod op;
mod rng;
mod state;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

pub use op::Kind;

use driver::Driver;
use op::{Delays, Draws, Op};
use rng::Rng;
use state::Model;

/// What one run does.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub steps: usize,
    pub skip: Vec<Kind>,
}

impl Config {
    /// From `VOLUMED_MODEL_SEED`, `VOLUMED_MODEL_STEPS` (else
    /// `default_steps`) and `VOLUMED_MODEL_SKIP`.
    pub fn from_env(default_steps: usize) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let seed = match var("VOLUMED_MODEL_SEED") {
            Some(s) => s
                .parse()
                .unwrap_or_else(|e| panic!("VOLUMED_MODEL_SEED={s:?}: {e}")),
            None => fresh_seed(),
        };
        let steps = match var("VOLUMED_MODEL_STEPS") {
            Some(s) => s
                .parse()
                .unwrap_or_else(|e| panic!("VOLUMED_MODEL_STEPS={s:?}: {e}")),
            None => default_steps,
        };
        let skip = match var("VOLUMED_MODEL_SKIP") {
            Some(s) => {
                Kind::parse_list(&s).unwrap_or_else(|e| panic!("VOLUMED_MODEL_SKIP={s:?}: {e}"))
            }
            None => Vec::new(),
        };
        Config { seed, steps, skip }
    }

    /// The environment that replays this run.
    pub fn replay(&self) -> String {
        let skip: Vec<&str> = self.skip.iter().map(|k| k.name()).collect();
        format!(
            "VOLUMED_MODEL_SEED={} VOLUMED_MODEL_STEPS={} VOLUMED_MODEL_SKIP={}",
            self.seed,
            self.steps,
            skip.join(",")
        )
    }
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Rng::new(t.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
}

/// Runs `cfg.steps` steps, checking the daemon after each; panics with the
/// seed, the failed step and the whole step log on the first difference.
pub fn run(cfg: &Config) {
    eprintln!("model: {}", cfg.replay());
    let mut rng = Rng::new(cfg.seed);
    let mut first = Draws::take(&mut rng);
    // The same on every host sharing a store; short, so gc deletes what is
    // unreferenced within a few steps.
    let gc_grace_ms = first.range(2000, 4000);
    let delays = Delays::draw(&mut first);
    let mut log = vec![format!(
        "0: start with gc grace {gc_grace_ms} ms and {}",
        delays.failpoints()
    )];
    let mut drv = Driver::start(delays, gc_grace_ms);
    let mut model = Model::default();
    let started = Instant::now();
    for step in 1..=cfg.steps {
        let op = Op::draw(&model, &mut rng, &cfg.skip, gc_grace_ms);
        log.push(format!("{step}: {op}"));
        let restarted = matches!(op, Op::Restart { .. } | Op::Kill { .. });
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let note = drv.apply(&op, &mut model);
            let applied = t.elapsed();
            check::check(&mut drv, &mut model, restarted);
            (note, applied)
        }));
        match outcome {
            Ok((note, applied)) => {
                let line = log.last_mut().expect("this step's line");
                if !note.is_empty() {
                    line.push(' ');
                    line.push_str(&note);
                }
                line.push_str(&format!(
                    " [{} + {} ms]",
                    applied.as_millis(),
                    (t.elapsed() - applied).as_millis()
                ));
            }
            Err(panic) => fail(cfg, step, &log, &drv, &*panic),
        }
    }
    eprintln!(
        "model: {} steps in {:.1} s, {} volumes and {} snapshots at the end\n{}",
        cfg.steps,
        started.elapsed().as_secs_f64(),
        model.volumes.len(),
        model.snapshots.len(),
        log.join("\n")
    );
    drv.daemon.stop();
}

fn fail(cfg: &Config, step: usize, log: &[String], drv: &Driver, panic: &dyn std::any::Any) -> ! {
    let why = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)");
    let daemon_log = drv.daemon.log();
    let tail: Vec<&str> = daemon_log.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!(
        "model run failed at step {step} of {}: {why}\n\
         replay: {}\n\
         steps:\n{}\n\
         last lines of the daemon's log:\n{}",
        cfg.steps,
        cfg.replay(),
        log.join("\n"),
        tail.join("\n")
    );
}
