//! The quiesce hook of a snapshot set, as rbd-nbd's `--quiesce-hook`: a
//! program run as `HOOK NBD-URI quiesce` for each attached member before
//! the barrier (a guest agent can freeze its filesystem) and `HOOK NBD-URI
//! unquiesce` after it. A hook that fails or outlives its deadline fails
//! the set unless errors are ignored; unquiesce runs for every member that
//! was quiesced, whatever happened in between. Hooks start through
//! `child::spawn`, so none outlives the daemon.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tracing::{info, warn};

use crate::child;

/// How long one hook run may take: a filesystem freeze is quick, a hook
/// stuck on a dead guest must not hold the set.
pub const HOOK_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Hook {
    pub path: PathBuf,
    /// Go on without the hook's freeze when it fails.
    pub ignore_errors: bool,
}

/// Runs `hook URI VERB`; its exit status, or why it did not run.
pub async fn run(hook: &Path, uri: &str, verb: &str) -> Result<(), String> {
    let mut cmd = Command::new(hook);
    cmd.arg(uri)
        .arg(verb)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = child::spawn(cmd, None)
        .await
        .map_err(|e| format!("{} {verb}: cannot start: {e}", hook.display()))?;
    let out = tokio::time::timeout(HOOK_DEADLINE, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{} {verb}: still running after {HOOK_DEADLINE:?}",
                hook.display()
            )
        })?
        .map_err(|e| format!("{} {verb}: {e}", hook.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{} {verb} {uri}: {}: {}",
        hook.display(),
        out.status,
        err.lines().next().unwrap_or("").trim()
    ))
}

/// Runs `f` between quiescing and unquiescing every URI in `uris`.
pub async fn around<F: Future>(
    hook: Option<&Hook>,
    uris: &[String],
    f: F,
) -> Result<F::Output, String> {
    let Some(hook) = hook else {
        return Ok(f.await);
    };
    let mut quiesced = Vec::new();
    for uri in uris {
        match run(&hook.path, uri, "quiesce").await {
            Ok(()) => quiesced.push(uri),
            Err(e) if hook.ignore_errors => {
                warn!(error = %e, "quiesce hook failed; going on as asked");
                quiesced.push(uri);
            }
            Err(e) => {
                unquiesce(hook, &quiesced).await;
                return Err(e);
            }
        }
    }
    let out = f.await;
    unquiesce(hook, &quiesced).await;
    info!(hook = %hook.path.display(), volumes = quiesced.len(), "quiesce hook ran around the barrier");
    Ok(out)
}

async fn unquiesce(hook: &Hook, uris: &[&String]) {
    for uri in uris {
        if let Err(e) = run(&hook.path, uri, "unquiesce").await {
            warn!(error = %e, "unquiesce hook failed");
        }
    }
}
