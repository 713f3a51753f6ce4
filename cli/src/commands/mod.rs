//! One file per noun.

pub mod bin;
pub mod diff;
pub mod export;
pub mod image;
pub mod import;
pub mod instance;
pub mod job;
pub mod key;
pub mod policy;
pub mod snapshot;
pub mod status;
pub mod volume;

use std::time::Duration;

/// How `--wait` asks again: soon at first, since most waits are short (an
/// unchanged snapshot takes a few milliseconds), then less and less often,
/// down to every `MAX` (a 200 ms poll made every such wait 200 ms).
pub(crate) struct Poll {
    every: Duration,
}

impl Poll {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_millis(250);

    pub(crate) fn new() -> Self {
        Poll { every: Self::FIRST }
    }

    pub(crate) async fn sleep(&mut self) {
        tokio::time::sleep(self.every).await;
        self.every = (self.every * 2).min(Self::MAX);
    }
}
