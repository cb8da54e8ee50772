//! The node runtime: a listener for peers' inbound streams, one task per
//! outbound peer link, the replay buffer, event fan-out and shutdown.
//!
//! Data flows one way: [`MeshHandle::invalidate`] numbers an invalidation
//! into the replay ring (`outbound::ring`) and wakes each peer's link task
//! (`outbound::link`), which encodes what its peer has not seen into
//! frames and writes them. On the peer, the connection task
//! (`inbound::conn`) decodes, drops duplicates by sequence number
//! (`inbound::origin`), hands events to the application and acknowledges.
//! No lock is held across an `.await`, and none while application code
//! runs.
//!
//! The delivery logic is sans-IO: synchronous state and rules that take
//! inputs (a hello, a frame, the time) and return decisions, unit-tested
//! without sockets or clocks. The tasks only move bytes and timers between
//! them. Per peer, that state is split where it is owned: what this node
//! sent the peer is its cursor in the one replay ring (`outbound::ring`,
//! under the ring's lock, since the items are held once for every peer),
//! and what it applied from the peer, with the peer's links, is `peer`
//! (under that peer's lock).
//!
//! Where each concept lives:
//! - `builder` ([`Mesh`], [`MeshBuilder`]): options and start;
//!   `handle` ([`MeshHandle`]): what the application calls; `fanout`
//!   ([`Events`]): event streams; `event`: what the application is told;
//!   `status`, `tuning`, `error`: what it reads and sets (`error` holds
//!   the typed reasons a link or session ends, and a refusal's).
//! - `shared`: the state every task shares; `peer`: one peer's state
//!   behind one lock (its origin record and links), synchronous.
//! - `handshake`: the checks of both hellos, synchronous, for both sides
//!   (the acceptor's judgement of a claim and a proof is in
//!   `inbound::conn`: `judge_claim`, `judge_proof`); `outbound::session`
//!   and `inbound::session`: the rules of a session (what each side may
//!   send, in which order, pings, ack timing); `outbound::redial`: the
//!   rules between sessions (backoff, which failures are logged).
//! - `transport` and `io`: TCP, TLS and the in-memory network, dealing in
//!   connections and addresses; `limits`: admission; `state`: the state
//!   file; `metrics`: latency histograms.

mod builder;
mod error;
mod event;
mod fanout;
mod handle;
mod handshake;
mod inbound;
mod io;
mod limits;
#[cfg(feature = "test-util")]
mod memory;
mod metrics;
mod outbound;
mod peer;
mod shared;
mod state;
mod status;
mod transport;
mod tuning;

use std::sync::{Mutex, MutexGuard};

pub use event::{Event, FlushReason, PeerId};
#[cfg(feature = "test-util")]
pub use memory::{MemoryListener, MemoryNetwork, MemoryStream, Toward};
use metrics::Histogram;
pub use metrics::{BUCKETS_US, HistogramSnapshot};
use outbound::OutLog;

#[doc(hidden)]
#[cfg(feature = "fuzz")]
pub use builder::fuzz_acceptor;
pub use builder::{Mesh, MeshBuilder};
pub(crate) use error::LinkError;
pub use error::{InvalidateError, StartError};
// What StartError carries when the secret or the TLS files cannot be used:
// named here, since their modules are internal.
pub use crate::auth::SecretError;
pub use crate::tls::TlsError;
pub use fanout::Events;
use fanout::Fanout;
pub use handle::MeshHandle;
use shared::{Admission, AppSide, Callback, Lifecycle, PeerInfo, Rejected, Shared, Silence};
pub use status::{Counters, EventCounters, PeerStatus, Status, WaitOutcome};
use status::{PeerStats, Stats};
pub use tuning::Tuning;

/// Which of a peer's two links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Out,
    In,
}

/// Locks a mutex; a panic elsewhere while holding it (a bug) must not take
/// the node down with it, and the state machines stay consistent between
/// calls, so a poisoned lock is used as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
