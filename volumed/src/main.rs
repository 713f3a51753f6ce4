//! The `volumed` binary: logging to stderr, umask 077, flags resolved,
//! `daemon::run`, and the error chain printed once with the exit code.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use volumed::config::Args;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Files the daemon creates (catalog, data, sockets) are private to its
    // user unless a step says otherwise.
    // SAFETY: umask only swaps the process's file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    keep_io_buffers();

    let config = match Args::from_process().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("volumed: error: {}", volumed_api::error_chain(e.as_ref()));
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("volumed: error: start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(volumed::daemon::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain, each cause once.
            let chain = volumed_api::error_chain(e.as_ref());
            tracing::error!("{chain}");
            eprintln!("volumed: error: {chain}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Request buffers (up to the 32 MiB NBD payload, chunk-sized for imports)
/// come from malloc's arenas, and up to 16 MiB freed at an arena's top
/// stays there: with glibc's defaults many are fresh mmaps, so each 4 KiB
/// of a bulk write paid a page fault and the kernel's zeroing (a tenth of
/// an import's CPU).
fn keep_io_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters, before any thread is
    // started; a refused value (returns 0) leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
