//! The state every task of a node shares, and the few rules that span
//! peers: event emission in order, link transitions, refusals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::Refusal;
use super::{
    Dir, Event, Fanout, OutLog, PeerId, PeerStats, Stats, Tuning, fanout, limits, lock, peer,
    transport,
};
use crate::auth::Secret;
use crate::config::{ClusterConfig, NodeAddr};
use crate::tls::Tls;

/// A configured peer, as the runtime needs it.
#[derive(Debug)]
pub(crate) struct PeerInfo {
    pub(crate) id: PeerId,
    pub(crate) addr: NodeAddr,
    /// Where to dial instead of `addr`, if set.
    pub(crate) dial: Option<SocketAddr>,
    /// Wakes the link task when there is something to send.
    pub(crate) notify: Notify,
    /// Cuts the link task's wait short (the peer's inbound link came up):
    /// wakes a dial waiting for an answer or a backoff; no permit is kept.
    pub(crate) redial: Notify,
    /// Inbound links from the peer that completed their handshake, so
    /// that one coming up between the link task's waits is not missed.
    pub(crate) reached: AtomicU64,
    /// The peer's acknowledged sequence number, for waiters.
    pub(crate) acked: watch::Sender<u64>,
    pub(crate) stats: PeerStats,
    /// What was applied from it and its links: one lock per peer, never
    /// held while application code runs.
    pub(crate) state: Mutex<peer::PeerState>,
    /// This peer's turn to emit: taken before `state`, held while the
    /// events decided under `state` are emitted after it is released, so
    /// that they reach the application in the order they were decided.
    /// Only this peer's tasks take it: application code under it holds up
    /// this peer's events alone.
    pub(crate) turn: Mutex<()>,
    /// Since when another incarnation of this peer has been held back while
    /// the current one's link is up, and which: a restart faster than
    /// `dead_after` looks the same for a few seconds, so only one that
    /// outlasts that is reported as two running nodes.
    pub(crate) held_back: Mutex<Option<(u64, Instant)>>,
    /// Its events on their way to the application (see `fanout`).
    pub(crate) events: fanout::PeerQueue,
}

pub(crate) type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// State shared by the handle and every task, grouped by concern: who
/// this node is and whom it peers with, what it originates, what goes to
/// the application, who may connect, and how the run ends.
pub(crate) struct Shared {
    pub(crate) me: PeerId,
    pub(crate) config: ClusterConfig,
    pub(crate) tuning: Tuning,
    pub(crate) peers: Vec<PeerInfo>,
    /// What this node originated, per peer not yet acknowledged.
    pub(crate) out: Mutex<OutLog>,
    pub(crate) stats: Stats,
    /// Where events go: the stream and the callbacks.
    pub(crate) app: AppSide,
    /// Who may connect and how they prove it.
    pub(crate) admission: Admission,
    /// Shutdown, abort and the state file.
    pub(crate) life: Lifecycle,
    /// How peers are reached: TCP (and TLS), or an in-memory network.
    pub(crate) transport: Arc<dyn transport::Transport>,
}

/// Where a node's events go.
pub(crate) struct AppSide {
    /// The event channel; without a live [`Events`](super::Events) stream,
    /// events are not sent into it at all.
    pub(crate) fanout: Fanout,
    pub(crate) callbacks: RwLock<Arc<Vec<Callback>>>,
    /// Bumped when a callback is registered, so that a batch's events can
    /// share one snapshot of the list and still see a new one at once.
    pub(crate) callbacks_gen: AtomicU64,
}

/// What an inbound connection must get past, and the bounds on what
/// refusing it costs.
pub(crate) struct Admission {
    /// Connections (handshakes and sessions) open at once.
    pub(crate) conn_limit: Arc<Semaphore>,
    /// The shared secret, when peers must prove they know it.
    pub(crate) secret: Option<Secret>,
    /// Mutual TLS, when configured.
    pub(crate) tls: Option<Tls>,
    /// Source addresses allowed to connect (the peers').
    pub(crate) allowlist: Arc<limits::Allowlist>,
    /// Handshakes under way per source address.
    pub(crate) per_ip: limits::PerIp,
    /// Bounds the log lines of refused connections.
    pub(crate) reject_log: limits::LogLimiter,
    /// Bounds the log lines about two nodes with one identity.
    pub(crate) duplicate_log: limits::LogLimiter,
}

/// How a run ends.
pub(crate) struct Lifecycle {
    /// Set by [`MeshHandle::abort`](super::MeshHandle::abort): links close
    /// without draining or saying goodbye, as in a crash.
    pub(crate) aborted: AtomicBool,
    pub(crate) token: CancellationToken,
    /// When a shutdown must be over; set when it begins.
    pub(crate) shutdown_at: std::sync::OnceLock<tokio::time::Instant>,
    /// The state file's lock, held while this run may write the file.
    pub(crate) state_lock: Mutex<Option<std::fs::File>>,
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
pub(crate) struct Silence {
    pub(crate) limit: Duration,
    pub(crate) last: tokio::time::Instant,
    pub(crate) timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Silence {
    pub(crate) fn new(limit: Duration) -> Self {
        let last = tokio::time::Instant::now();
        Silence {
            limit,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + limit)),
        }
    }

    /// Something was heard.
    pub(crate) fn heard(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Resolves once nothing was heard for `limit`.
    pub(crate) async fn expired(&mut self) {
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

/// The callbacks as of one moment, reused for many events while no
/// callback is registered.
pub(crate) struct CallbackSnapshot {
    pub(crate) generation: u64,
    pub(crate) list: Arc<Vec<Callback>>,
}

impl Shared {
    /// Hands one of `peer`'s events to the application.
    pub(crate) fn emit(&self, peer: usize, event: Event) {
        self.emit_all(peer, std::iter::once(event), None);
    }

    /// Hands `peer`'s events to the application, in order: counted, then
    /// queued for that peer's dispatch task. No application code runs
    /// here (the caller may hold the peer's turn).
    ///
    /// `ack`, if any, is sent once these events reached the application.
    pub(crate) fn emit_all(
        &self,
        peer: usize,
        events: impl IntoIterator<Item = Event>,
        ack: Option<(fanout::AckTo, crate::wire::Position)>,
    ) {
        let counted = events.into_iter().inspect(|event| {
            let counter = match event {
                Event::Invalidated { .. } => &self.stats.ev_invalidated,
                Event::CacheCleared { .. } => &self.stats.ev_cache_cleared,
                Event::Flush { .. } => &self.stats.flushes_received,
                Event::PeerUp { .. } => &self.stats.ev_peer_up,
                Event::PeerDown { .. } => &self.stats.ev_peer_down,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let info = &self.peers[peer];
        if info.events.push(&info.id, counted, ack) > 0 {
            self.stats.event_backlogs.fetch_add(1, Ordering::Relaxed);
            warn!(
                peer = %info.id,
                "the application's callbacks or event streams fell behind this peer's events: \
                 they get a flush in place of what was queued"
            );
        }
    }

    /// A snapshot of the callbacks, so that a callback may register another.
    pub(crate) fn callbacks(&self) -> CallbackSnapshot {
        // The generation is read first: a registration after this read is
        // noticed by the next `emit_with`.
        let generation = self.app.callbacks_gen.load(Ordering::Acquire);
        let list = self
            .app
            .callbacks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        CallbackSnapshot { generation, list }
    }

    /// Records a link going up or down, and emits peer-up / peer-down on
    /// the transitions of "both links up".
    pub(crate) fn set_link(&self, peer: usize, dir: Dir, up: bool, reason: &str) {
        self.set_link_if(peer, dir, None, up, reason);
    }

    /// The inbound link's state, changed only by connection `generation`
    /// (the current one): an older connection ending, or coming up late,
    /// cannot overwrite what a newer one set. Returns whether it applied.
    pub(crate) fn set_inbound(&self, peer: usize, generation: u64, up: bool, reason: &str) -> bool {
        self.set_link_if(peer, Dir::In, Some(generation), up, reason)
    }

    pub(crate) fn set_link_if(
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
                self.emit(peer, Event::PeerUp { peer: id });
            }
            Some(peer::Transition::Down) => {
                warn!(peer = %id, reason, "peer down");
                self.emit(
                    peer,
                    Event::PeerDown {
                        peer: id,
                        reason: reason.to_string(),
                    },
                );
            }
            None => {}
        }
        true
    }

    /// When the shutdown under way must be over.
    pub(crate) fn shutdown_deadline(&self) -> tokio::time::Instant {
        *self
            .life
            .shutdown_at
            .get_or_init(|| tokio::time::Instant::now() + self.tuning.shutdown_timeout)
    }

    pub(crate) fn count_rejection(&self, kind: Rejected) {
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
    pub(crate) fn reject_quietly(&self, kind: Rejected, remote: SocketAddr, reason: &str) {
        self.refused(kind, Some(&remote), reason);
    }

    /// The same, for a connection whose peer is known.
    pub(crate) fn reject_quietly_peer(&self, kind: Rejected, peer: &str, reason: &str) {
        self.refused(kind, Some(&peer), reason);
    }

    /// Counts a refused connection and logs it, within the rate limit
    /// (`who` is left out where the span already names the connection).
    pub(crate) fn refused(
        &self,
        kind: Rejected,
        who: Option<&dyn std::fmt::Display>,
        reason: &str,
    ) {
        self.count_rejection(kind);
        let (log, held) = self.admission.reject_log.admit();
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
    pub(crate) fn peer_incarnation(&self, peer: usize, incarnation: u64) -> Result<(), Refusal> {
        let info = &self.peers[peer];
        let _turn = lock(&info.turn);
        let mut events = Vec::new();
        let r = lock(&info.state).hello(incarnation, &mut events);
        self.emit_all(peer, events, None);
        r.map_err(|d| {
            let reason = Refusal::TwoRunning {
                peer: info.id.to_string(),
                other: d.other,
                returning: d.returning,
                current: d.current,
            };
            // A restarted node is held back until its previous run's
            // links are gone, noticed within `dead_after` (plus a ping and
            // a retry); only a claim that outlasts that is two running
            // nodes. Both keep retrying: one line a minute says it.
            let now = Instant::now();
            let since = {
                let mut held = lock(&info.held_back);
                match *held {
                    Some((other, since)) if other == d.other => since,
                    _ => {
                        *held = Some((d.other, now));
                        now
                    }
                }
            };
            let restart_window =
                self.tuning.dead_after + self.tuning.ping_every + self.tuning.backoff_cap;
            if now.saturating_duration_since(since) < restart_window {
                info!(
                    peer = %info.id,
                    "a new run of the peer is held back until its previous run's link is gone \
                     (a restart; two running nodes if this lasts): {reason}"
                );
            } else {
                match self.admission.duplicate_log.admit() {
                    (true, 0) => tracing::error!("{reason}"),
                    (true, held) => tracing::error!(held_back = held, "{reason}"),
                    (false, _) => debug!("{reason}"),
                }
            }
            reason
        })
        .inspect(|_| *lock(&info.held_back) = None)
    }

    pub(crate) fn heard(&self, peer: usize, dir: Dir) {
        lock(&self.peers[peer].state).heard(dir, Instant::now());
    }

    /// Why a new, unproven connection claiming `peer`'s `incarnation` must
    /// not take over: the current inbound link of that incarnation is up
    /// and was heard within two heartbeats (the real peer pings at least
    /// every [`Tuning::ping_every`]). `None` when it may take over: the
    /// link is down or has gone silent, as after a network failure.
    pub(crate) fn live_inbound(&self, peer: usize, incarnation: u64) -> Option<Refusal> {
        let within = self.tuning.ping_every.saturating_mul(2);
        let ago =
            lock(&self.peers[peer].state).live_inbound(incarnation, within, Instant::now())?;
        Some(Refusal::LiveConnection {
            peer: self.peers[peer].id.to_string(),
            incarnation,
            ago_ms: ago.as_millis(),
        })
    }
}
