//! Presentation shared by the front-ends: the JSON views of engine and job
//! state (`views`), the NBD URIs they carry (`endpoints`), and the one
//! mapping of errors to API codes (`failure`). The control API answers
//! with these views, the AWS endpoint starts from them; the engine and the
//! images layer below know nothing of them.

mod endpoints;
pub mod failure;
pub mod views;

pub use endpoints::NbdEndpoints;
