//! The node runtime: a listener for peers' inbound streams, one task per
//! outbound peer link, the replay buffer, event fan-out and shutdown.
//!
//! Data flows one way: [`MeshHandle::invalidate`] numbers an invalidation
//! into the replay ring ([`outlog`]) and wakes each peer's link task
//! ([`link`]), which encodes what its peer has not seen into frames and
//! writes them. On the peer, the connection task ([`conn`]) decodes, drops
//! duplicates by sequence number ([`inbound`]), hands events to the
//! application and acknowledges. No lock is held across an `.await`.

mod conn;
mod event;
mod handshake;
mod inbound;
mod io;
mod limits;
mod link;
mod metrics;
mod outlog;
mod peer;
mod state;
mod transport;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Secret;
use crate::config::{ClusterConfig, NodeAddr};
use crate::tls::Tls;
use crate::wire::{Item, ItemError, Position};

pub use event::{Event, FlushReason, PeerId};
use metrics::Histogram;
pub use metrics::{BUCKETS_US, HistogramSnapshot};
use outlog::OutLog;
pub use transport::MemoryNetwork;

/// Timers and bounds of the runtime. The defaults suit production; tests
/// may shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Send a `Ping` after this long without writing anything.
    pub ping_every: Duration,
    /// Close a link after this long without hearing anything.
    pub dead_after: Duration,
    /// The peer's `Hello` must arrive within this long.
    pub hello_timeout: Duration,
    /// Give up a TCP connect after this long.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failure.
    pub backoff_first: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// An outbound session counts as healthy, and the reconnect delay
    /// starts again from [`Tuning::backoff_first`], once the peer
    /// acknowledged something on it or it stayed up this long. A peer that
    /// completes the handshake and then fails is redialled ever more slowly.
    pub healthy_after: Duration,
    /// How long shutdown waits for peers to acknowledge what is queued.
    pub shutdown_timeout: Duration,
    /// Events buffered per subscriber before it lags (and gets a flush).
    pub event_capacity: usize,
    /// Inbound connections open at once, all sources together.
    pub max_connections: usize,
    /// Bytes the replay buffer may hold, whatever `cachecast.buffer` says
    /// in invalidations: keys can be 64 KiB each.
    pub buffer_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            ping_every: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            backoff_first: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(2),
            event_capacity: 8192,
            max_connections: 64,
            buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// More peers than a cluster may have.
    #[error("invalid configuration: {peers} peers; at most {max}")]
    TooManyPeers {
        /// Peers configured.
        peers: usize,
        /// The most allowed.
        max: usize,
    },
    /// The shared secret cannot be used.
    #[error("security settings: {0}")]
    Secret(#[from] crate::auth::SecretError),
    /// The TLS files cannot be used.
    #[error("security settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The state file cannot be read or written.
    #[error("state file {}: {source}", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// Why an invalidation was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidateError {
    /// It breaks the protocol's limits (empty cache name, string too long).
    #[error(transparent)]
    Invalid(#[from] ItemError),
    /// The mesh is shutting down.
    #[error("the mesh is shut down")]
    Closed,
}

/// Which peers acknowledged, after [`MeshHandle::invalidate_and_wait`].
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
struct Stats {
    originated: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    flushes_received: AtomicU64,
    gap_flushes_sent: AtomicU64,
    replayed: AtomicU64,
    reconnects: AtomicU64,
    rejected_connections: AtomicU64,
    rejected_not_allowed: AtomicU64,
    rejected_handshake: AtomicU64,
    rejected_auth: AtomicU64,
    rejected_tls: AtomicU64,
    rejected_limit: AtomicU64,
    protocol_errors: AtomicU64,
    diverged: AtomicU64,
    /// Events delivered to the application, by kind.
    ev_invalidated: AtomicU64,
    ev_cache_cleared: AtomicU64,
    ev_peer_up: AtomicU64,
    ev_peer_down: AtomicU64,
}

/// Per-peer counters.
#[derive(Debug, Default)]
struct PeerStats {
    sent: AtomicU64,
    received: AtomicU64,
    reconnects: AtomicU64,
    /// From writing an invalidation to the peer's ack covering it.
    ack_latency: Histogram,
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
    /// Reconnections that resumed a peer from the replay buffer.
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
    /// Events delivered to the application, by kind.
    pub events: EventCounters,
}

/// Events delivered to the application since start, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventCounters {
    /// [`Event::Invalidated`].
    pub invalidated: u64,
    /// [`Event::CacheCleared`].
    pub cache_cleared: u64,
    /// [`Event::Flush`] (lagging subscribers' flushes excluded: those are
    /// made per subscriber).
    pub flush: u64,
    /// [`Event::PeerUp`].
    pub peer_up: u64,
    /// [`Event::PeerDown`].
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
    /// Entries dropped from the buffer while a peer still needed them
    /// (each covered by a flush to that peer).
    pub buffer_overflows: u64,
    /// Each peer.
    pub peers: Vec<PeerStatus>,
    /// Counters.
    pub counters: Counters,
}

/// Which of a peer's two links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Out,
    In,
}

/// A configured peer, as the runtime needs it.
#[derive(Debug)]
struct PeerInfo {
    id: PeerId,
    addr: NodeAddr,
    /// Where to dial instead of `addr`, if set.
    dial: Option<SocketAddr>,
    /// Wakes the link task when there is something to send.
    notify: Notify,
    /// The peer's acknowledged sequence number, for waiters.
    acked: watch::Sender<u64>,
    stats: PeerStats,
    /// What was applied from it and its links: one lock per peer, never
    /// held while application code runs.
    state: Mutex<peer::PeerState>,
    /// Held while this peer's events are emitted (after its state lock is
    /// released), so that they reach the application in the order they
    /// were decided; no other lock is taken under it.
    turn: Mutex<()>,
}

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// State shared by the handle and every task.
struct Shared {
    me: PeerId,
    config: ClusterConfig,
    tuning: Tuning,
    peers: Vec<PeerInfo>,
    out: Mutex<OutLog>,
    /// The event channel; without a live [`Events`] stream, events are not
    /// sent into it at all.
    fanout: Fanout,
    callbacks: RwLock<Arc<Vec<Callback>>>,
    /// Bumped when a callback is registered, so that a batch's events can
    /// share one snapshot of the list and still see a new one at once.
    callbacks_gen: AtomicU64,
    stats: Stats,
    /// Set by [`MeshHandle::abort`]: links close without draining or
    /// saying goodbye, as in a crash.
    aborted: AtomicBool,
    token: CancellationToken,
    conn_limit: Arc<Semaphore>,
    /// The shared secret, when peers must prove they know it.
    secret: Option<Secret>,
    /// Mutual TLS, when configured.
    tls: Option<Tls>,
    /// Source addresses allowed to connect (the peers').
    allowlist: Arc<limits::Allowlist>,
    /// Handshakes under way per source address.
    per_ip: limits::PerIp,
    /// Bounds the log lines of refused connections.
    reject_log: limits::LogLimiter,
    /// Bounds the log lines about two nodes with one identity.
    duplicate_log: limits::LogLimiter,
    /// When a shutdown must be over; set when it begins.
    shutdown_at: std::sync::OnceLock<tokio::time::Instant>,
    /// The state file's lock, held while this run may write the file.
    state_lock: Mutex<Option<std::fs::File>>,
    /// The in-memory network the node lives on instead of TCP (tests).
    network: Option<MemoryNetwork>,
}

/// Why an inbound connection was refused (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    NotAllowed,
    Handshake,
    Auth,
    Tls,
    Limit,
}

/// Notices `limit` of silence on a stream with one timer, moved only when
/// it fires early: no timer is set and cleared per message.
struct Silence {
    limit: Duration,
    last: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Silence {
    fn new(limit: Duration) -> Self {
        let last = tokio::time::Instant::now();
        Silence {
            limit,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + limit)),
        }
    }

    /// Something was heard.
    fn heard(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Resolves once nothing was heard for `limit`.
    async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last + self.limit;
            if tokio::time::Instant::now() >= due {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// Locks a mutex; a panic elsewhere while holding it (a bug) must not take
/// the node down with it, and the state machines stay consistent between
/// calls, so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The callbacks as of one moment, reused for many events while no
/// callback is registered.
struct CallbackSnapshot {
    generation: u64,
    list: Arc<Vec<Callback>>,
}

impl Shared {
    fn emit(&self, event: Event) {
        let mut callbacks = self.callbacks();
        self.emit_with(&mut callbacks, event);
    }

    /// A snapshot of the callbacks, so that a callback may register another.
    fn callbacks(&self) -> CallbackSnapshot {
        // The generation is read first: a registration after this read is
        // noticed by the next `emit_with`.
        let generation = self.callbacks_gen.load(Ordering::Acquire);
        let list = self
            .callbacks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        CallbackSnapshot { generation, list }
    }

    /// Emits `event` with a snapshot taken for a run of events (a batch),
    /// refreshed if a callback was registered since.
    fn emit_with(&self, callbacks: &mut CallbackSnapshot, event: Event) {
        let counter = match event {
            Event::Invalidated { .. } => &self.stats.ev_invalidated,
            Event::CacheCleared { .. } => &self.stats.ev_cache_cleared,
            Event::Flush { .. } => &self.stats.flushes_received,
            Event::PeerUp { .. } => &self.stats.ev_peer_up,
            Event::PeerDown { .. } => &self.stats.ev_peer_down,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.callbacks_gen.load(Ordering::Acquire) != callbacks.generation {
            *callbacks = self.callbacks();
        }
        for cb in callbacks.list.iter() {
            cb(&event);
        }
        // Into the channel only for subscribers: with none, sending would
        // only lock it to find that out.
        if self.fanout.subscribers.load(Ordering::SeqCst) > 0 {
            let _ = self.fanout.events.send(event);
        }
    }

    /// Records a link going up or down, and emits peer-up / peer-down on
    /// the transitions of "both links up".
    fn set_link(&self, peer: usize, dir: Dir, up: bool, reason: &str) {
        self.set_link_if(peer, dir, None, up, reason);
    }

    /// The inbound link's state, changed only by connection `generation`
    /// (the current one): an older connection ending, or coming up late,
    /// cannot overwrite what a newer one set. Returns whether it applied.
    fn set_inbound(&self, peer: usize, generation: u64, up: bool, reason: &str) -> bool {
        self.set_link_if(peer, Dir::In, Some(generation), up, reason)
    }

    fn set_link_if(
        &self,
        peer: usize,
        dir: Dir,
        generation: Option<u64>,
        up: bool,
        reason: &str,
    ) -> bool {
        let info = &self.peers[peer];
        let _turn = lock(&info.turn);
        let change = lock(&info.state).set_link(dir, generation, up, Instant::now());
        let Some(transition) = change else {
            return false;
        };
        let id = info.id.clone();
        match transition {
            Some(peer::Transition::Up) => {
                info!(peer = %id, "peer up");
                self.emit(Event::PeerUp { peer: id });
            }
            Some(peer::Transition::Down) => {
                warn!(peer = %id, reason, "peer down");
                self.emit(Event::PeerDown {
                    peer: id,
                    reason: reason.to_string(),
                });
            }
            None => {}
        }
        true
    }

    /// When the shutdown under way must be over.
    fn shutdown_deadline(&self) -> tokio::time::Instant {
        *self
            .shutdown_at
            .get_or_init(|| tokio::time::Instant::now() + self.tuning.shutdown_timeout)
    }

    fn count_rejection(&self, kind: Rejected) {
        let s = &self.stats;
        s.rejected_connections.fetch_add(1, Ordering::Relaxed);
        let c = match kind {
            Rejected::NotAllowed => &s.rejected_not_allowed,
            Rejected::Handshake => &s.rejected_handshake,
            Rejected::Auth => &s.rejected_auth,
            Rejected::Tls => &s.rejected_tls,
            Rejected::Limit => &s.rejected_limit,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts and logs (rate-limited) a connection closed without a word.
    fn reject_quietly(&self, kind: Rejected, remote: SocketAddr, reason: &str) {
        self.refused(kind, Some(&remote), reason);
    }

    /// The same, for a connection whose peer is known.
    fn reject_quietly_peer(&self, kind: Rejected, peer: &str, reason: &str) {
        self.refused(kind, Some(&peer), reason);
    }

    /// Counts a refused connection and logs it, within the rate limit
    /// (`who` is left out where the span already names the connection).
    fn refused(&self, kind: Rejected, who: Option<&dyn std::fmt::Display>, reason: &str) {
        self.count_rejection(kind);
        let (log, held) = self.reject_log.admit();
        if held > 0 {
            warn!(held, "rejected connections not logged (rate limit)");
        }
        match (log, who) {
            (false, _) => {}
            (true, Some(who)) => warn!(%who, reason, "connection refused"),
            (true, None) => warn!(reason, "connection refused"),
        }
    }

    /// A peer's incarnation, as its hello says (either direction): notices
    /// restarts (flushing when one was not clean) and duplicate identities.
    fn peer_incarnation(&self, peer: usize, incarnation: u64) -> Result<(), String> {
        let info = &self.peers[peer];
        let _turn = lock(&info.turn);
        let mut events = Vec::new();
        let r = lock(&info.state).hello(incarnation, &mut events);
        for e in events {
            self.emit(e);
        }
        r.map_err(|d| {
            let reason = format!(
                "two running nodes answer as {}: incarnation {:016x}{} while {:016x} is connected; \
                 check cluster.instance0 on each server (a restarted node is let in once its \
                 previous run's links are gone, within seconds)",
                info.id,
                d.other,
                if d.returning {
                    " came back"
                } else {
                    " arrived"
                },
                d.current
            );
            // Both nodes keep retrying: one line a minute says it.
            match self.duplicate_log.admit() {
                (true, 0) => tracing::error!("{reason}"),
                (true, held) => tracing::error!(held_back = held, "{reason}"),
                (false, _) => debug!("{reason}"),
            }
            reason
        })
    }

    fn heard(&self, peer: usize, dir: Dir) {
        lock(&self.peers[peer].state).heard(dir, Instant::now());
    }

    /// Why a new, unproven connection claiming `peer`'s `incarnation` must
    /// not take over: the current inbound link of that incarnation is up
    /// and was heard within two heartbeats (the real peer pings at least
    /// every [`Tuning::ping_every`]). `None` when it may take over: the
    /// link is down or has gone silent, as after a network failure.
    fn live_inbound(&self, peer: usize, incarnation: u64) -> Option<String> {
        let within = self.tuning.ping_every.saturating_mul(2);
        let ago =
            lock(&self.peers[peer].state).live_inbound(incarnation, within, Instant::now())?;
        Some(format!(
            "a live connection from {} (incarnation {incarnation:016x}) was heard {} ms ago; \
             a second one claiming it is refused until that one falls silent",
            self.peers[peer].id,
            ago.as_millis()
        ))
    }
}

/// Starts nodes.
pub struct Mesh;

impl Mesh {
    /// Binds `config.bind` and starts the node with default tuning.
    pub async fn start(config: ClusterConfig) -> Result<MeshHandle, StartError> {
        Self::builder(config).start().await
    }

    /// A node to start with more options.
    pub fn builder(config: ClusterConfig) -> MeshBuilder {
        MeshBuilder {
            config,
            tuning: Tuning::default(),
            listener: None,
            connect_via: HashMap::new(),
            callbacks: Vec::new(),
            fanout: None,
            network: None,
        }
    }
}

/// Options of a node before it starts; see [`Mesh::builder`].
#[must_use = "a builder starts nothing until `start()` is awaited"]
pub struct MeshBuilder {
    config: ClusterConfig,
    tuning: Tuning,
    listener: Option<TcpListener>,
    connect_via: HashMap<NodeAddr, SocketAddr>,
    callbacks: Vec<Callback>,
    /// The event channel, once [`MeshBuilder::subscribe`] made it.
    fanout: Option<Fanout>,
    network: Option<MemoryNetwork>,
}

/// Where [`Events`] streams come from: the channel, the count of live
/// streams, and the signal that the node has stopped.
#[derive(Clone)]
struct Fanout {
    events: broadcast::Sender<Event>,
    subscribers: Arc<AtomicUsize>,
    finished: CancellationToken,
}

impl Fanout {
    fn new(capacity: usize) -> Self {
        Fanout {
            events: broadcast::channel(capacity.max(16)).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
            finished: CancellationToken::new(),
        }
    }

    fn subscribe(&self) -> Events {
        // Counted before the receiver exists, so that no event sent after
        // it does is skipped.
        self.subscribers.fetch_add(1, Ordering::SeqCst);
        Events {
            inner: BroadcastStream::new(self.events.subscribe()),
            finished: Box::pin(self.finished.clone().cancelled_owned()),
            _counted: Subscribed(self.subscribers.clone()),
        }
    }
}

impl MeshBuilder {
    /// Registers a callback before the node starts, so that it sees every
    /// event from the first (see [`MeshHandle::on_event`]).
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(f));
        self
    }

    /// Timers and bounds (set them before [`MeshBuilder::subscribe`]:
    /// streams taken before keep the event capacity they were made with).
    pub fn tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// A stream of every event from the node's first, taken before it
    /// starts: what arrives between [`MeshBuilder::start`] and a later
    /// [`MeshHandle::subscribe`] would reach no stream (its origin is still
    /// told it was applied). See [`MeshHandle::subscribe`].
    #[must_use = "events are only kept for a stream that is read"]
    pub fn subscribe(&mut self) -> Events {
        let capacity = self.tuning.event_capacity;
        self.fanout
            .get_or_insert_with(|| Fanout::new(capacity))
            .subscribe()
    }

    /// Accept peers on this already-bound listener instead of binding
    /// `config.bind` (tests bind port 0 first, to learn the port).
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Joins an in-memory network instead of TCP (tests): the node binds
    /// nothing, is reached under its identity, and reaches its peers
    /// through `network`, which the test can partition and cut. TLS is not
    /// used there; a shared secret is.
    pub fn network(mut self, network: MemoryNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Dial `peer` at `addr` instead of its configured address (a proxy or
    /// port mapping in between); its identity stays `peer`.
    pub fn connect_via(mut self, peer: NodeAddr, addr: SocketAddr) -> Self {
        self.connect_via.insert(peer, addr);
        self
    }

    /// Starts the node: binds (unless given a listener), then spawns the
    /// listener task and one link task per peer.
    pub async fn start(self) -> Result<MeshHandle, StartError> {
        let MeshBuilder {
            config,
            tuning,
            listener,
            connect_via,
            callbacks,
            fanout,
            network,
        } = self;
        let fanout = fanout.unwrap_or_else(|| Fanout::new(tuning.event_capacity));
        let shared = build_shared(config, tuning, connect_via, callbacks, fanout, network)?;
        if let Some(path) = &shared.config.state_file {
            let state_err = |e: std::io::Error| StartError::State {
                path: path.clone(),
                source: e,
            };
            *lock(&shared.state_lock) = Some(state::lock(path).map_err(state_err)?);
            let previous = state::read(path).map_err(state_err)?;
            let incarnation = lock(&shared.out).incarnation();
            if let Some(p) = previous.filter(|p| !p.clean) {
                // Whatever that run invalidated may never have arrived.
                warn!(
                    previous = format_args!("{:016x}", p.incarnation),
                    "the previous run did not end cleanly: peers that did not see it end are told to flush"
                );
                lock(&shared.out).open_with_flush(p.incarnation);
                shared.stats.originated.fetch_add(1, Ordering::Relaxed);
            }
            state::write_async(path, incarnation, false)
                .await
                .map_err(state_err)?;
        }
        let incoming = match (&shared.network, listener) {
            (Some(net), _) => conn::Incoming::Memory(net.listen(&shared.config.node)),
            (None, Some(l)) => conn::Incoming::Tcp(l),
            (None, None) => {
                conn::Incoming::Tcp(TcpListener::bind(shared.config.bind).await.map_err(
                    |source| StartError::Bind {
                        addr: shared.config.bind,
                        source,
                    },
                )?)
            }
        };
        let local = match &incoming {
            conn::Incoming::Tcp(l) => l.local_addr().ok(),
            conn::Incoming::Memory(_) => None,
        };
        info!(
            node = %shared.me,
            incarnation = format_args!("{:016x}", lock(&shared.out).incarnation()),
            listen = ?local,
            peers = shared.peers.len(),
            "mesh started"
        );
        let tracker = TaskTracker::new();
        // Event streams end once every task has: a watcher outside the
        // tracker tells them.
        {
            let (tracker, finished) = (tracker.clone(), shared.fanout.finished.clone());
            tokio::spawn(async move {
                tracker.wait().await;
                finished.cancel();
            });
        }
        // Peers' names are looked up at once, off the accept loop.
        {
            let allowlist = shared.allowlist.clone();
            tracker.spawn(async move { allowlist.resolve_first().await });
        }
        tracker.spawn(conn::accept_loop(shared.clone(), incoming, tracker.clone()));
        for peer in 0..shared.peers.len() {
            tracker.spawn(link::run(shared.clone(), peer));
        }
        Ok(MeshHandle {
            shared,
            tracker,
            local_addr: local,
        })
    }
}

/// The node's shared state, before any task runs (also used by the fuzz
/// harness, which drives one connection with no listener or links).
fn build_shared(
    config: ClusterConfig,
    tuning: Tuning,
    connect_via: HashMap<NodeAddr, SocketAddr>,
    callbacks: Vec<Callback>,
    fanout: Fanout,
    network: Option<MemoryNetwork>,
) -> Result<Arc<Shared>, StartError> {
    if config.peers.len() >= crate::config::MAX_INSTANCES {
        return Err(StartError::TooManyPeers {
            peers: config.peers.len(),
            max: crate::config::MAX_INSTANCES - 1,
        });
    }
    let secret = config.secret.as_ref().map(Secret::load).transpose()?;
    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    if let Some(problem) = tls.as_ref().and_then(Tls::warning) {
        warn!("{problem}");
    }
    let incarnation: u64 = rand::random();
    let me: PeerId = Arc::from(config.node.to_string());
    let peers: Vec<PeerInfo> = config
        .peers
        .iter()
        .map(|p| {
            let id: PeerId = Arc::from(p.addr.to_string());
            PeerInfo {
                state: Mutex::new(peer::PeerState::new(id.clone())),
                id,
                addr: p.addr.clone(),
                dial: connect_via.get(&p.addr).copied(),
                notify: Notify::new(),
                acked: watch::channel(0).0,
                stats: PeerStats::default(),
                turn: Mutex::new(()),
            }
        })
        .collect();
    Ok(Arc::new(Shared {
        me,
        out: Mutex::new(OutLog::new(
            incarnation,
            peers.len(),
            config.buffer,
            tuning.buffer_bytes,
        )),
        peers,
        fanout,
        callbacks: RwLock::new(Arc::new(callbacks)),
        callbacks_gen: AtomicU64::new(0),
        stats: Stats::default(),
        aborted: AtomicBool::new(false),
        token: CancellationToken::new(),
        conn_limit: Arc::new(Semaphore::new(tuning.max_connections.max(1))),
        secret,
        tls,
        allowlist: Arc::new(limits::Allowlist::new(
            config.peers.iter().map(|p| p.addr.clone()).collect(),
        )),
        per_ip: limits::PerIp::default(),
        reject_log: limits::LogLimiter::new(20, Duration::from_secs(60)),
        duplicate_log: limits::LogLimiter::new(1, Duration::from_secs(60)),
        shutdown_at: std::sync::OnceLock::new(),
        state_lock: Mutex::new(None),
        network,
        tuning,
        config,
    }))
}

/// `cache` as an `Arc<str>`, shared with the invalidations this thread made
/// lately: an application invalidates many keys of few caches, and the
/// replay buffer then holds one copy of each name.
fn cache_name(cache: &str) -> Arc<str> {
    /// Names kept per thread, and the longest kept.
    const KEPT: usize = 4;
    const LONGEST: usize = 256;
    thread_local! {
        static RECENT: std::cell::RefCell<(Vec<Arc<str>>, usize)> =
            const { std::cell::RefCell::new((Vec::new(), 0)) };
    }
    if cache.len() > LONGEST {
        return Arc::from(cache);
    }
    RECENT.with(|recent| {
        let (names, next) = &mut *recent.borrow_mut();
        if let Some(known) = names.iter().find(|n| ***n == *cache) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(cache);
        if names.len() < KEPT {
            names.push(name.clone());
        } else {
            names[*next] = name.clone();
            *next = (*next + 1) % KEPT;
        }
        name
    })
}

/// The application's handle on a running node. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    local_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle")
            .field("node", &self.shared.me)
            .finish()
    }
}

impl MeshHandle {
    /// This node's identity.
    pub fn node(&self) -> &PeerId {
        &self.shared.me
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// This run's incarnation.
    pub fn incarnation(&self) -> u64 {
        lock(&self.shared.out).incarnation()
    }

    /// Tells every peer that entry `key` of cache `cache` is stale. Never
    /// waits on the network; returns the invalidation's sequence number.
    pub fn invalidate(&self, cache: &str, key: &str) -> Result<u64, InvalidateError> {
        self.send(Item::Key {
            cache: cache_name(cache),
            key: Arc::from(key),
        })
    }

    /// Tells every peer that the whole of cache `cache` is stale.
    pub fn invalidate_cache(&self, cache: &str) -> Result<u64, InvalidateError> {
        self.send(Item::Cache {
            cache: cache_name(cache),
        })
    }

    /// Tells every peer to drop every cache.
    pub fn flush(&self) -> Result<u64, InvalidateError> {
        self.send(Item::Flush)
    }

    /// Sends any item; the other methods are shorthands of this one.
    pub fn send(&self, item: Item) -> Result<u64, InvalidateError> {
        item.check()?;
        self.send_checked(std::iter::once(item)).map(|r| r.0)
    }

    /// Sends several items under one lock, numbered consecutively; returns
    /// the first and last sequence numbers. Nothing is sent if one is
    /// invalid.
    pub fn send_all(&self, items: Vec<Item>) -> Result<(u64, u64), InvalidateError> {
        for item in &items {
            item.check()?;
        }
        self.send_checked(items.into_iter())
    }

    fn send_checked(
        &self,
        items: impl Iterator<Item = Item>,
    ) -> Result<(u64, u64), InvalidateError> {
        let (mut first, mut last, mut n) = (0, 0, 0);
        // Links that had written everything may be waiting to be woken;
        // the others come back for more by themselves once their write is
        // done (they fill under this lock, so none is missed).
        let mut wake: u32 = 0;
        {
            let mut out = lock(&self.shared.out);
            // Checked under the ring's lock, which shutdown takes to close:
            // whatever is accepted here is in the ring before the links
            // drain it and say goodbye.
            if out.closed() {
                return Err(InvalidateError::Closed);
            }
            for p in 0..self.shared.peers.len() {
                if !out.has_unsent(p) {
                    wake |= 1 << p;
                }
            }
            for item in items {
                last = out.push(item);
                if n == 0 {
                    first = last;
                }
                n += 1;
            }
        }
        if n == 0 {
            let last = lock(&self.shared.out).last_seq();
            return Ok((last + 1, last));
        }
        self.shared.stats.originated.fetch_add(n, Ordering::Relaxed);
        for (i, p) in self.shared.peers.iter().enumerate() {
            if wake & (1 << i) != 0 {
                p.notify.notify_one();
            }
        }
        Ok((first, last))
    }

    /// Sends `item` and waits until every peer acknowledged it, at most
    /// `timeout`; says which peers did not.
    pub async fn invalidate_and_wait(
        &self,
        item: Item,
        timeout: Duration,
    ) -> Result<WaitOutcome, InvalidateError> {
        let seq = self.send(item)?;
        Ok(self.wait_acked(seq, timeout).await)
    }

    /// Waits until every connected peer acknowledged `seq`, at most
    /// `timeout`. Peers down when it is called are not waited for: they
    /// are reported as not acked (they get it on reconnect, or a flush).
    pub async fn wait_acked(&self, seq: u64, timeout: Duration) -> WaitOutcome {
        let deadline = tokio::time::Instant::now() + timeout;
        let up: Vec<bool> = self
            .shared
            .peers
            .iter()
            .map(|p| lock(&p.state).link.outbound)
            .collect();
        let waits = self.shared.peers.iter().zip(up).map(|(p, up)| {
            let mut rx = p.acked.subscribe();
            async move {
                let acked = if up {
                    tokio::time::timeout_at(deadline, rx.wait_for(|a| *a >= seq))
                        .await
                        .is_ok_and(|r| r.is_ok())
                } else {
                    *rx.borrow() >= seq
                };
                (p.id.clone(), acked)
            }
        });
        let results = futures_util::future::join_all(waits).await;
        let (acked, not_acked): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.1);
        WaitOutcome {
            seq,
            acked: acked.into_iter().map(|r| r.0).collect(),
            not_acked: not_acked.into_iter().map(|r| r.0).collect(),
        }
    }

    /// A stream of events from now on. A subscriber that falls more than
    /// [`Tuning::event_capacity`] events behind gets a
    /// [`FlushReason::Lagged`] flush in place of what it missed.
    ///
    /// Events that arrive before this call reach no stream: to see every
    /// event from the first, take the stream from
    /// [`MeshBuilder::subscribe`] before the node starts.
    pub fn subscribe(&self) -> Events {
        self.shared.fanout.subscribe()
    }

    /// Calls `f` for every event, on the task that produced it, in order.
    /// `f` must be quick and must not block: it runs on the network path.
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        let mut callbacks = self
            .shared
            .callbacks
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::clone(&callbacks);
        list.push(Arc::new(f));
        *callbacks = Arc::new(list);
        self.shared.callbacks_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// A snapshot of the node's state.
    pub fn status(&self) -> Status {
        let s = &self.shared;
        let now = Instant::now();
        let (last_seq, buffered, overflows, per_peer) = {
            let out = lock(&s.out);
            let per: Vec<(u64, u64)> = (0..s.peers.len())
                .map(|i| (out.queued(i), out.acked(i)))
                .collect();
            (out.last_seq(), out.held(), out.overflows(), per)
        };
        let peers = s
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let st = lock(&p.state);
                let l = &st.link;
                PeerStatus {
                    id: p.id.clone(),
                    connected: l.outbound && l.inbound,
                    outbound: l.outbound,
                    inbound: l.inbound,
                    last_heard: l.last_heard.map(|t| now.saturating_duration_since(t)),
                    queued: per_peer[i].0,
                    acked_seq: per_peer[i].1,
                    applied: st.applied(),
                    sent: p.stats.sent.load(Ordering::Relaxed),
                    received: p.stats.received.load(Ordering::Relaxed),
                    reconnects: p.stats.reconnects.load(Ordering::Relaxed),
                    ack_latency: p.stats.ack_latency.snapshot(),
                    last_error: l.last_error.clone(),
                }
            })
            .collect();
        let c = &s.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Status {
            node: s.me.clone(),
            incarnation: self.incarnation(),
            last_seq,
            buffered,
            buffer_capacity: s.config.buffer,
            buffer_overflows: overflows,
            peers,
            counters: Counters {
                originated: get(&c.originated),
                sent: get(&c.sent),
                received: get(&c.received),
                flushes_received: get(&c.flushes_received),
                gap_flushes_sent: get(&c.gap_flushes_sent),
                replayed: get(&c.replayed),
                reconnects: get(&c.reconnects),
                rejected_connections: get(&c.rejected_connections),
                rejected_not_allowed: get(&c.rejected_not_allowed),
                rejected_handshake: get(&c.rejected_handshake),
                rejected_auth: get(&c.rejected_auth),
                rejected_tls: get(&c.rejected_tls),
                rejected_limit: get(&c.rejected_limit),
                protocol_errors: get(&c.protocol_errors),
                diverged: get(&c.diverged),
                events: EventCounters {
                    invalidated: get(&c.ev_invalidated),
                    cache_cleared: get(&c.ev_cache_cleared),
                    flush: get(&c.flushes_received),
                    peer_up: get(&c.ev_peer_up),
                    peer_down: get(&c.ev_peer_down),
                },
            },
        }
    }

    /// Starts a graceful shutdown without waiting for it: new invalidations
    /// are refused, links drain what is queued, say goodbye and close.
    pub fn initiate_shutdown(&self) {
        self.shared.shutdown_deadline();
        lock(&self.shared.out).close();
        self.shared.token.cancel();
        self.tracker.close();
    }

    /// Shuts down gracefully and waits until every task has ended (at most
    /// about [`Tuning::shutdown_timeout`] plus a little).
    pub async fn shutdown(self) {
        self.initiate_shutdown();
        self.tracker.wait().await;
        if let Some(path) = &self.shared.config.state_file {
            // Clean only if every peer applied everything this run sent.
            let (incarnation, clean) = {
                let out = lock(&self.shared.out);
                let last = out.last_seq();
                let clean = (0..self.shared.peers.len()).all(|p| out.acked(p) >= last);
                (out.incarnation(), clean)
            };
            if let Err(e) = state::write_async(path, incarnation, clean).await {
                warn!(path = %path.display(), error = %e, "cannot record the clean shutdown");
            }
        }
        lock(&self.shared.state_lock).take();
        info!(node = %self.shared.me, "mesh stopped");
    }

    /// Stops at once, as a crash would: no draining, no goodbye. For tests
    /// and the demo.
    pub async fn abort(self) {
        let _ = self.shared.shutdown_at.set(tokio::time::Instant::now());
        lock(&self.shared.out).close();
        let shared = self.shared.clone();
        // Links check this flag and skip the goodbye.
        shared.aborted.store(true, Ordering::Release);
        shared.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        // What a crash would do too: the state file stays as written at
        // start, and the lock goes.
        lock(&shared.state_lock).take();
    }
}

/// A stream of [`Event`]s; see [`MeshHandle::subscribe`].
#[must_use = "events are only kept for a stream that is read"]
pub struct Events {
    inner: BroadcastStream<Event>,
    /// Resolves when the node has stopped: the stream then ends.
    finished: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Dropped after `inner`: uncounts this stream.
    _counted: Subscribed,
}

/// One live [`Events`] stream, counted in `Shared::subscribers`.
struct Subscribed(Arc<AtomicUsize>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Events {
    /// The next event; `None` once the mesh has shut down.
    pub async fn recv(&mut self) -> Option<Event> {
        use futures_util::StreamExt;
        self.next().await
    }
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        // Looked at first: once the node has stopped, whatever is still
        // queued is delivered, then the stream ends.
        let finished = self.finished.as_mut().poll(cx).is_ready();
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx).map(|r| {
            r.map(|r| match r {
                Ok(ev) => ev,
                Err(BroadcastStreamRecvError::Lagged(missed)) => Event::Flush {
                    origin: None,
                    reason: FlushReason::Lagged { missed },
                },
            })
        });
        match next {
            std::task::Poll::Pending if finished => std::task::Poll::Ready(None),
            other => other,
        }
    }
}

/// Drives one inbound connection through the acceptor's handshake and
/// session, with `input` as everything the other side sends (the fuzz
/// harness's entry). The input is written and the pipe closed, so every
/// read ends at once and no deadline is waited for. The first byte picks
/// whether this node has a shared secret.
#[doc(hidden)]
pub fn fuzz_acceptor(input: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let (flags, bytes) = input.split_first().map_or((0, input), |(f, b)| (*f, b));
    let mut config = ClusterConfig::new(
        NodeAddr::new("127.0.0.1", 1),
        [NodeAddr::new("127.0.0.1", 2), NodeAddr::new("localhost", 3)],
    );
    config.buffer = 16;
    if flags & 1 == 1 {
        config.secret = Some(crate::config::SecretSource::Inline(
            "fuzzing-secret-0123456789".into(),
        ));
    }
    let tuning = Tuning {
        hello_timeout: Duration::from_millis(200),
        dead_after: Duration::from_millis(200),
        ..Tuning::default()
    };
    let fanout = Fanout::new(tuning.event_capacity);
    let Ok(shared) = build_shared(config, tuning, HashMap::new(), Vec::new(), fanout, None) else {
        return;
    };
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let Some(slot) = shared.per_ip.enter(ip) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + shared.tuning.hello_timeout;
        let server = io::Io::Memory(transport::MemoryStream::plain(server));
        let serve = conn::serve_io(&shared, server, None, None, deadline, slot);
        let talk = async {
            let _ = client.write_all(bytes).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        tokio::join!(serve, talk);
    });
}
