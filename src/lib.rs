//! cachecast keeps the local caches of a small cluster (at most 5 servers)
//! coherent: when one server changes data, every other server learns which
//! cache entries are stale, over plain TCP between static peers read from
//! DHIS 2's `dhis.conf`.
#![warn(missing_docs)]

pub mod config;
pub mod demo;
pub mod mesh;
pub mod wire;

pub use config::{ClusterConfig, NodeAddr};
pub use mesh::{
    Event, Events, FlushReason, InvalidateError, Mesh, MeshBuilder, MeshHandle, PeerId, Status,
    Tuning, WaitOutcome,
};
pub use wire::Item;
