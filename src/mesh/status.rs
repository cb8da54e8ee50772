//! What a node reports about itself: counters, peers, outcomes of waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::{Histogram, HistogramSnapshot, PeerId};
use crate::wire::Position;

/// Which peers acknowledged, after [`MeshHandle::invalidate_and_wait`](crate::MeshHandle::invalidate_and_wait).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WaitOutcome {
    /// The sequence number waited for.
    pub seq: u64,
    /// Peers that applied it.
    pub acked: Vec<PeerId>,
    /// Peers that did not within the timeout (down ones included; they
    /// get it on reconnect, or a flush).
    pub not_acked: Vec<PeerId>,
}

impl WaitOutcome {
    /// Whether every peer acknowledged.
    pub fn all_acked(&self) -> bool {
        self.not_acked.is_empty()
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) originated: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) flushes_received: AtomicU64,
    pub(crate) gap_flushes_sent: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) rejected_connections: AtomicU64,
    pub(crate) rejected_not_allowed: AtomicU64,
    pub(crate) rejected_handshake: AtomicU64,
    pub(crate) rejected_auth: AtomicU64,
    pub(crate) rejected_tls: AtomicU64,
    pub(crate) rejected_limit: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) diverged: AtomicU64,
    /// Times a peer's queue of events for the application collapsed into
    /// a flush.
    pub(crate) event_backlogs: AtomicU64,
    /// Events delivered to the application, by kind.
    pub(crate) ev_invalidated: AtomicU64,
    pub(crate) ev_cache_cleared: AtomicU64,
    pub(crate) ev_peer_up: AtomicU64,
    pub(crate) ev_peer_down: AtomicU64,
}

impl Stats {
    /// The counters as of now (each read on its own: a snapshot, not a
    /// consistent cut).
    pub(crate) fn snapshot(&self) -> Counters {
        // The fields that keep their name from `Stats` to `Counters`.
        macro_rules! read {
            ($($field:ident),* $(,)?) => {
                Counters {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                    events: EventCounters {
                        invalidated: self.ev_invalidated.load(Ordering::Relaxed),
                        cache_cleared: self.ev_cache_cleared.load(Ordering::Relaxed),
                        flush: self.flushes_received.load(Ordering::Relaxed),
                        peer_up: self.ev_peer_up.load(Ordering::Relaxed),
                        peer_down: self.ev_peer_down.load(Ordering::Relaxed),
                    },
                }
            };
        }
        read!(
            originated,
            sent,
            received,
            flushes_received,
            gap_flushes_sent,
            replayed,
            reconnects,
            rejected_connections,
            rejected_not_allowed,
            rejected_handshake,
            rejected_auth,
            rejected_tls,
            rejected_limit,
            protocol_errors,
            diverged,
            event_backlogs,
        )
    }
}

/// Per-peer counters.
#[derive(Debug, Default)]
pub(crate) struct PeerStats {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    /// From writing an invalidation to the peer's ack covering it.
    pub(crate) ack_latency: Histogram,
}

/// Counters since start, as in [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Counters {
    /// Invalidations this node originated.
    pub originated: u64,
    /// Items written to peers (replays and retries included).
    pub sent: u64,
    /// Items applied from peers (duplicates excluded).
    pub received: u64,
    /// Flush events delivered to the application.
    pub flushes_received: u64,
    /// Flushes sent in place of invalidations a peer missed (buffer full).
    pub gap_flushes_sent: u64,
    /// Invalidations sent again from the replay buffer to peers that
    /// reconnected (what each had not acknowledged when its link came back;
    /// a flush standing in for dropped ones counts as one).
    pub replayed: u64,
    /// Outbound links established after the first.
    pub reconnects: u64,
    /// Inbound connections refused, all reasons together.
    pub rejected_connections: u64,
    /// Refused: the source address is not a configured peer's.
    pub rejected_not_allowed: u64,
    /// Refused in the handshake: no or bad hello, unknown identity.
    pub rejected_handshake: u64,
    /// Refused: shared secret missing on one side, or wrong.
    pub rejected_auth: u64,
    /// Refused: TLS required but absent, failed, or the wrong name.
    pub rejected_tls: u64,
    /// Refused: too many connections.
    pub rejected_limit: u64,
    /// Connections closed for a malformed or unexpected frame (not for a
    /// connection reset or other I/O error).
    pub protocol_errors: u64,
    /// Times a peer's numbering diverged from the position held for it,
    /// either side: a receiver that got seqs at or below what it announced
    /// (it flushed), an origin whose peer announced a position beyond what
    /// it ever assigned. Another party claimed an identity, or a peer is
    /// broken.
    pub diverged: u64,
    /// Times the application's callbacks or event streams fell so far
    /// behind a peer's events that its queue collapsed into a flush
    /// ([`crate::FlushReason::Backlog`]).
    pub event_backlogs: u64,
    /// Events delivered to the application, by kind.
    pub events: EventCounters,
}

/// Events delivered to the application since start, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventCounters {
    /// [`Event::Invalidated`](crate::Event::Invalidated).
    pub invalidated: u64,
    /// [`Event::CacheCleared`](crate::Event::CacheCleared).
    pub cache_cleared: u64,
    /// [`Event::Flush`](crate::Event::Flush) (lagging subscribers' flushes excluded: those are
    /// made per subscriber).
    pub flush: u64,
    /// [`Event::PeerUp`](crate::Event::PeerUp).
    pub peer_up: u64,
    /// [`Event::PeerDown`](crate::Event::PeerDown).
    pub peer_down: u64,
}

/// One peer's state, as in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStatus {
    /// The peer's identity.
    pub id: PeerId,
    /// Both links are up.
    pub connected: bool,
    /// Our outbound link (our invalidations to it) is up.
    pub outbound: bool,
    /// Its inbound link (its invalidations to us) is up.
    pub inbound: bool,
    /// Time since anything was heard from it, if ever.
    pub last_heard: Option<Duration>,
    /// Our invalidations it has not acknowledged that are still held.
    pub queued: u64,
    /// The last of our sequence numbers it acknowledged.
    pub acked_seq: u64,
    /// What we applied from it: its incarnation and sequence number.
    pub applied: Option<Position>,
    /// Items written to it (replays included).
    pub sent: u64,
    /// Items applied from it.
    pub received: u64,
    /// Times our outbound link to it was re-established.
    pub reconnects: u64,
    /// Time from writing an invalidation to its acknowledgement.
    pub ack_latency: HistogramSnapshot,
    /// Why our link to it last failed, while it is down.
    pub last_error: Option<String>,
}

/// A snapshot of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// This node's identity.
    pub node: PeerId,
    /// This run's incarnation.
    pub incarnation: u64,
    /// The last sequence number this node assigned.
    pub last_seq: u64,
    /// Invalidations held in the replay buffer.
    pub buffered: usize,
    /// The replay buffer's bound.
    pub buffer_capacity: usize,
    /// Entries dropped from the buffer before they were written to a peer
    /// that needed them (each covered by a flush to that peer); entries
    /// written and waiting only for an acknowledgement are not counted.
    pub buffer_overflows: u64,
    /// Each peer.
    pub peers: Vec<PeerStatus>,
    /// Counters.
    pub counters: Counters,
}
