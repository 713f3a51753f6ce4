//! The NBD server: attached volumes as exports, named after the volume.
//!
//! Three layers, as in mini-redis: `proto` is the wire format (pure, bytes
//! in and values out, no I/O); `handshake` and `session` are the async loops
//! that move bytes and call it; `server` owns the listeners. Two levels of
//! error: a session error (bad magic, truncated stream) closes the
//! connection; a command error (out of range, unknown command) becomes the
//! errno of that one reply, and the connection goes on.
//!
//! - `proto/mod.rs`: constants and the handshake's messages (greeting,
//!   options, option replies).
//! - `proto/request.rs`: transmission requests and `validate`, the rules a
//!   request must meet (flags, payload limit, range, read-only).
//! - `proto/reply.rs`: `Reply` and `Reply::encode`, the exact wire bytes of
//!   simple and structured replies.
//! - `handshake.rs`: option haggling, and `ExportLookup`, all it needs of
//!   the engine.
//! - `session.rs`: the transmission loop: one task polls the read of the
//!   next request, the requests in flight and the reply writes; the
//!   in-flight window.
//! - `server.rs`: TCP and Unix listeners, the connection task (handshake,
//!   TLS upgrade, session), and `ExportLookup` for `Engine`.
//! - `io_threads.rs`: the threads connections are served on, one per CPU,
//!   each with its own runtime and io_uring ring.
//! - `tls.rs`: the rustls acceptor and the per-connection TLS mode.

pub(crate) mod handshake;
pub mod io_threads;
pub(crate) mod poll;
pub mod proto;
pub(crate) mod server;
pub(crate) mod session;
pub mod tls;

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod testutil;

pub use handshake::ExportLookup;
pub use server::NbdServer;
