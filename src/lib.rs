//! cachecast keeps the local caches of a small cluster (at most 5 servers)
//! coherent: when one server changes data, every other server learns which
//! cache entries are stale, over plain TCP between static peers read from
//! DHIS 2's `dhis.conf`.
//!
//! # Use
//!
//! ```no_run
//! use cachecast::{Event, Mesh, StateFile, config};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let loaded = config::load("/opt/dhis2/dhis.conf".as_ref())?;
//! for warning in &loaded.warnings {
//!     eprintln!("{warning}");
//! }
//! // Subscribed before the node starts: no event can slip past.
//! // The file's cachecast.state.file, or a path of the embedder's: a
//! // start after a crash then tells the peers to flush.
//! let mut builder = Mesh::builder(loaded.config)
//!     .state_file(StateFile::At("/var/lib/myapp/cachecast.state".into()));
//! let mut events = builder.subscribe();
//! let mesh = builder.start().await?;
//! mesh.invalidate("org.hisp.dhis.user.User", "42")?; // never blocks
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Invalidated { cache, key, .. } => { /* drop cache[key] */ }
//!         Event::CacheCleared { cache, .. } => { /* empty that cache */ }
//!         Event::Flush { .. } => { /* empty every cache */ }
//!         _ => {} // peer up or down (and kinds added later): nothing to drop
//!     }
//! }
//! mesh.shutdown().await; // drains what is queued, says goodbye
//! # Ok(()) }
//! ```
//!
//! # Guarantee
//!
//! Every invalidation is delivered to every peer, at least once, deduplicated
//! by sequence number and in origin order, or replaced by a flush that
//! covers it. Nothing waits on the network: replay buffers are bounded and
//! collapse into one flush when full.
//!
//! # Layout
//!
//! - [`config`]: `dhis.conf` → [`ClusterConfig`]; pure, every problem named
//!   by key and line.
//! - [`wire`]: the protocol's messages and codec (`proto/PROTOCOL.md` is the
//!   normative description of the bytes).
//! - [`mesh`]: the runtime. Delivery logic lives in synchronous state
//!   machines (the origin's replay ring, each peer's state with what was
//!   applied from it, the handshake's checks); tasks only move bytes and
//!   timers around them, over TCP, TLS or an in-memory network
//!   (`MemoryNetwork`, feature `test-util`) on which tests run under
//!   paused time.
#![warn(missing_docs)]

pub(crate) mod auth;
#[cfg(feature = "moka")]
pub mod coherent;
pub mod config;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod mesh;
#[cfg(feature = "sidecar")]
pub mod sidecar;
pub(crate) mod tls;
pub mod wire;

pub use config::{ClusterConfig, NodeAddr, StateFile};
#[cfg(feature = "test-util")]
pub use mesh::MemoryNetwork;
pub use mesh::{
    Counters, Event, EventCounters, Events, FlushReason, HistogramSnapshot, InvalidateError, Mesh,
    MeshBuilder, MeshHandle, PeerId, PeerStatus, StartError, Status, Tuning, WaitOutcome,
};
pub use wire::Item;

#[cfg(feature = "moka")]
pub use coherent::CoherentCache;
