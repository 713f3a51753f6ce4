//! The lifecycle model test (`volumed_tests::model`): random sequences of
//! lifecycle steps, snapshots, restores, gc, EBS direct uploads, restarts
//! and kill -9 against the real daemon, checked after every step.
//! `VOLUMED_MODEL_SEED` replays a run; `scripts/model-long` runs many.

use volumed_tests::model::{Config, run};

/// Steps of one run in the test suite: about a minute on two cores with
/// a debug build.
const STEPS: usize = 200;

#[test]
fn lifecycle_matches_the_model() {
    run(&Config::from_env(STEPS));
}
