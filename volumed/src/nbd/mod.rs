//! The NBD server: attached volumes as exports, named after the volume.
//!
//! Three layers, as in mini-redis: the `nbd_proto` crate is the wire format
//! (pure, bytes in and values out, no I/O: `validate` for the rules a
//! request must meet, `Reply::encode` for the bytes of replies);
//! `handshake` and `session` are the async loops that move bytes and call
//! it; `server` owns the listeners. Two levels of error: a session error
//! (bad magic, truncated stream) closes the connection; a command error
//! (out of range, unknown command) becomes the errno of that one reply, and
//! the connection goes on.
//!
//! - `handshake.rs`: option haggling, and `ExportLookup`, all it needs of
//!   the engine.
//! - `session.rs`: the transmission loop: one task polls the read of the
//!   next request, the requests in flight and the reply writes;
//!   `window.rs`: the in-flight window every request holds a share of
//!   until its reply is written; `output.rs`: the replies waiting for the
//!   socket, staged and written with `writev`.
//! - `server.rs`: TCP and Unix listeners, the connection task (handshake,
//!   TLS upgrade, session), and `ExportLookup` for `Engine`;
//!   `refusals.rs`: refused connections logged, rate-limited.
//! - `io_threads.rs`: the threads connections are served on, one per CPU,
//!   each with its own runtime and io_uring ring.
//!
//! TLS (the acceptor and the per-connection mode) is `crate::tls`, shared
//! with the AWS endpoint.

pub(crate) mod handshake;
pub mod io_threads;
mod output;
pub(crate) mod poll;
mod refusals;
pub(crate) mod server;
pub(crate) mod session;
mod window;

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod testutil;

pub use handshake::ExportLookup;
pub use server::NbdServer;

/// Maps a host I/O error to the NBD errno the client sees.
pub(crate) fn errno_of(e: &std::io::Error) -> u32 {
    use nbd_proto::{EIO, ENOMEM, ENOSPC, EPERM};
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        _ => EIO,
    }
}
