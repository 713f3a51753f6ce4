//! The NBD server: attached volumes as exports, named after the volume.
//!
//! Three layers, as in mini-redis: `proto` is the wire format (pure, bytes
//! in and values out, no I/O); `handshake` and `session` are the async loops
//! that move bytes and call it; `server` owns the listeners. Two levels of
//! error: a session error (bad magic, truncated stream) closes the
//! connection; a command error (out of range, unknown command) becomes the
//! errno of that one reply, and the connection goes on.

pub mod handshake;
pub mod proto;
pub mod server;
pub mod session;
pub mod tls;

pub use server::NbdServer;
