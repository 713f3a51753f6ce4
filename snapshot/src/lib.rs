//! Snapshot formats and object stores for volumed.
//!
//! - `diff`: changed blocks between any two snapshots, exact by content;
//! - `geometry`: how a volume splits into chunks (counts, ranges, the short last one);
//! - `hash`: chunk hashes (blake3 of the uncompressed bytes);
//! - `codec`: the chunk object (header + zstd or raw payload), verified on read;
//! - `crypt`: encrypted stores: sealed objects, domains and their data
//!   keys, master keys as the linking program holds them;
//! - `objects`: each kind of object as stored, plain or sealed, and back;
//! - `store_header`: the object saying whether a store is encrypted;
//! - `copy`: a snapshot copied under a new id, in its domain or another;
//! - `manifest`: the self-contained, checksummed list of a snapshot's chunks
//!   (format 1, and the header and entry codec both formats share);
//! - `root`: the format-2 manifest root, naming content-addressed pages;
//! - `page`: a format-2 manifest page, one fixed range of chunk entries;
//! - `reader`: a manifest read lazily, page by page through a bounded cache;
//! - `writer`: writes format-2 manifests, reusing a parent's unchanged pages;
//! - `store`: object stores (local directory, S3, memory) behind one trait,
//!   and the wrapper that retries them;
//! - `keys`: the store's key layout, every prefix and key in one place;
//! - `repo`: chunks by hash with dedup, manifests by id, holds and markers;
//! - `pending`: a snapshot being written, its marker kept fresh, and the
//!   one commit protocol every snapshot writer follows;
//! - `cache`: the host's bounded chunk cache and the single-flight fetcher;
//! - `gc`: mark-and-sweep of unreferenced chunk objects, with a grace period;
//! - `verify`: reads every chunk of a snapshot and names what is wrong.
//!
//! Architecture invariant: this crate knows nothing about NBD, sled or the
//! daemon's state, so a snapshot in a store can be read, verified or restored
//! by any program that links it.

pub mod cache;
pub mod codec;
pub mod copy;
pub mod crypt;
pub mod diff;
pub mod gc;
pub mod geometry;
pub mod hash;
pub mod keys;
pub mod manifest;
mod objects;
pub mod page;
pub mod pending;
pub mod reader;
pub mod repo;
pub mod root;
pub mod store;
pub mod store_header;
pub mod store_url;
pub mod verify;
pub mod writer;

pub use crypt::{Encryption, KeyError, MasterKeys};
pub use geometry::ChunkGeometry;
pub use hash::ChunkHash;
pub use manifest::{InvalidSnapshotId, Manifest, ManifestHeader, SnapshotId, StoredManifest};
pub use pending::{CommitError, PendingSnapshot};
pub use reader::ManifestReader;
pub use repo::{PutChunk, Repo, RepoError};
pub use root::ManifestRoot;
pub use store::{ObjectStore, PutOutcome, RetryPolicy, Retrying, StoreError};
pub use store_url::{StoreUrl, StoreUrlError};
