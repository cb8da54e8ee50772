//! What the mesh tells the application.

use std::fmt;
use std::sync::Arc;

/// A node's identity, `host:port` as in its `cluster.instance0` entry.
pub type PeerId = Arc<str>;

/// Why the application must drop every cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushReason {
    /// The peer asked for it: its application called `flush()`, or its
    /// replay buffer overflowed while this node was slow or away, so a flush
    /// stands in for invalidations it no longer holds.
    FromPeer {
        /// The flush's sequence number at the peer.
        seq: u64,
    },
    /// The peer restarted without saying goodbye (a crash, a kill): what it
    /// sent just before may never have arrived.
    PeerRestarted,
    /// The peer's stream skipped sequence numbers, which a correct peer
    /// never does; flushing keeps the guarantee anyway.
    Gap {
        /// The first sequence number missing.
        expected: u64,
        /// The one that came instead.
        got: u64,
    },
    /// The peer's stream went back to numbers at or below the position
    /// this node held for it: what was held was not the peer's numbering
    /// (another party claimed its identity, or it restarted its numbering
    /// without a new incarnation). Taking the peer's numbering from here
    /// on, with a flush, keeps the guarantee.
    Diverged {
        /// The position held for the peer.
        held: u64,
        /// The sequence number that came.
        got: u64,
    },
    /// This subscriber fell behind and events were dropped for it.
    Lagged {
        /// How many events it missed.
        missed: u64,
    },
    /// The application's callbacks and streams fell so far behind this
    /// peer's events that they were dropped from its queue (bounded in
    /// events and bytes, see [`crate::Tuning::event_bytes`]).
    Backlog {
        /// How many events the flush stands for.
        missed: u64,
    },
}

impl fmt::Display for FlushReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushReason::FromPeer { seq } => write!(f, "peer sent a flush (seq {seq})"),
            FlushReason::PeerRestarted => f.write_str("peer restarted without a goodbye"),
            FlushReason::Gap { expected, got } => {
                write!(f, "sequence gap: expected {expected}, got {got}")
            }
            FlushReason::Diverged { held, got } => {
                write!(f, "peer's numbering diverged: held {held}, got {got}")
            }
            FlushReason::Lagged { missed } => {
                write!(f, "subscriber lagged and missed {missed} events")
            }
            FlushReason::Backlog { missed } => {
                write!(
                    f,
                    "the application fell behind and {missed} events were dropped"
                )
            }
        }
    }
}

/// Something the application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// One entry is stale: drop `key` from cache `cache`.
    Invalidated {
        /// The node that originated it.
        origin: PeerId,
        /// Its sequence number at the origin.
        seq: u64,
        /// The cache.
        cache: Arc<str>,
        /// The entry's key.
        key: Arc<str>,
    },
    /// A whole cache is stale: empty cache `cache`.
    CacheCleared {
        /// The node that originated it.
        origin: PeerId,
        /// Its sequence number at the origin.
        seq: u64,
        /// The cache.
        cache: Arc<str>,
    },
    /// Every cache may be stale: empty them all.
    Flush {
        /// The peer concerned, if one.
        origin: Option<PeerId>,
        /// Why.
        reason: FlushReason,
    },
    /// Both links with a peer are up.
    PeerUp {
        /// The peer.
        peer: PeerId,
    },
    /// A link with a peer went down. Nothing is lost: its invalidations are
    /// replayed when it is back, or replaced by a flush.
    PeerDown {
        /// The peer.
        peer: PeerId,
        /// What happened.
        reason: String,
    },
}
