//! Presentation shared by the front-ends: the JSON views of engine and job
//! state (`views`) and the NBD URIs they carry (`endpoints`). The control
//! API answers with these views, the AWS endpoint starts from them; the
//! engine and the images layer below know nothing of them.

mod endpoints;
pub mod views;

pub use endpoints::NbdEndpoints;
