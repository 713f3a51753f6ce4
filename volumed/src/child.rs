//! Every process the daemon starts (qemu-img, qemu-nbd) goes through
//! [`spawn`], so none outlives the daemon: a decoder left running after a
//! crash or an OOM kill would serve its image on a stale socket and hold the
//! file open forever (a systemd unit's cgroup would reap it, a plain start
//! does not).
//!
//! Between fork and exec the child sets its rlimits (when asked),
//! `PR_SET_PDEATHSIG` to SIGKILL, and then compares `getppid()` with the
//! daemon's pid taken before the fork: if the daemon died before the
//! `prctl`, no signal will ever come, so the child exits at once.
//!
//! The kernel sends the parent-death signal when the *thread* that forked
//! exits, not the process. `tokio::process::Command::spawn` forks on the
//! calling thread, which may be a blocking-pool thread (retired after 10 s
//! idle) or a worker (after `block_in_place` hands its core off, it goes on
//! as a blocking-pool thread and retires like one): a child forked there
//! would be killed while the daemon lives. So every fork happens on one
//! thread started here that never returns; it lives exactly as long as the
//! process, and the signal comes exactly when the daemon dies.

use std::io;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Resource limits set in the child before exec; a core dump is never
/// written under them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// RLIMIT_AS, bytes.
    pub address_space: u64,
    /// RLIMIT_CPU, seconds.
    pub cpu_secs: u64,
}

/// A command to fork, the runtime its child's pipes and reaper belong to,
/// and where the child goes.
struct Request {
    cmd: Command,
    rt: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The spawner thread's queue; started by the first spawn.
static SPAWNER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Starts `cmd` (under `limits` if given) on the spawner thread: it dies
/// with the daemon. Call from within a tokio runtime.
pub async fn spawn(mut cmd: Command, limits: Option<Limits>) -> io::Result<Child> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| io::Error::other(format!("spawn outside a runtime: {e}")))?;
    arm(cmd.as_std_mut(), limits);
    let (reply, answer) = oneshot::channel();
    spawner()?
        .send(Request { cmd, rt, reply })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .await
        .map_err(|_| io::Error::other("the spawner thread dropped a request"))?
}

/// The queue of the spawner thread, started on first use.
fn spawner() -> io::Result<mpsc::Sender<Request>> {
    let mut slot = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = &*slot {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("volumed-spawner".into())
        .spawn(move || {
            // The static keeps a sender, so this loop never ends.
            for Request { mut cmd, rt, reply } in rx {
                let _in_runtime = rt.enter();
                // A caller that went away drops the child; kill_on_drop
                // (set by every caller) kills it and tokio reaps it.
                let _ = reply.send(cmd.spawn());
            }
        })?;
    *slot = Some(tx.clone());
    Ok(tx)
}

/// Adds the steps between fork and exec: rlimits, the parent-death signal,
/// and the check that the parent is still the daemon.
fn arm(cmd: &mut std::process::Command, limits: Option<Limits>) {
    use std::os::unix::process::CommandExt;
    // Taken in the daemon, before the fork.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setrlimit, prctl, getppid and _exit, which are async-signal-safe;
    // it allocates nothing and touches no memory the parent's other threads
    // may hold locked.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(l) = limits {
                let set = |resource, value: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    // SAFETY: `lim` is a valid rlimit for the call's duration.
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_AS, l.address_space)?;
                set(libc::RLIMIT_CPU, l.cpu_secs)?;
                set(libc::RLIMIT_CORE, 0)?;
            }
            // SAFETY: PR_SET_PDEATHSIG takes a signal number; the other
            // arguments are unused.
            let kill = libc::SIGKILL as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The daemon died before the prctl (the child now belongs to
            // init or a subreaper): no signal will come, so go now.
            // SAFETY: getppid cannot fail; _exit ends the child at once,
            // running none of the parent's destructors or atexit handlers.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Output of a short command run through [`spawn`], or `None` if it could
/// not start or failed (for version probes).
pub async fn output_if_ok(mut cmd: Command) -> Option<Vec<u8>> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let out = spawn(cmd, None).await.ok()?.wait_with_output().await.ok()?;
    out.status.success().then_some(out.stdout)
}

#[cfg(test)]
#[path = "child_tests.rs"]
mod tests;
