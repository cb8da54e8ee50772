//! The application's handle on a running node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{
    Event, Events, InvalidateError, PeerId, PeerStatus, Shared, Status, WaitOutcome, lock, state,
};
use crate::wire::Item;

/// `cache` as an `Arc<str>`, shared with the invalidations this thread made
/// lately: an application invalidates many keys of few caches, and the
/// replay buffer then holds one copy of each name.
pub(crate) fn cache_name(cache: &str) -> Arc<str> {
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
    pub(crate) shared: Arc<Shared>,
    pub(crate) tracker: TaskTracker,
    pub(crate) local_addr: Option<SocketAddr>,
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

    pub(crate) fn send_checked(
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
    /// [`Tuning::event_capacity`](crate::Tuning::event_capacity) events (or [`Tuning::event_bytes`](crate::Tuning::event_bytes) of
    /// them) behind gets a [`FlushReason::Lagged`](crate::FlushReason::Lagged) flush in place of what
    /// it missed.
    ///
    /// Events that arrive before this call reach no stream: to see every
    /// event from the first, take the stream from
    /// [`MeshBuilder::subscribe`](crate::MeshBuilder::subscribe) before the node starts.
    pub fn subscribe(&self) -> Events {
        self.shared.app.fanout.subscribe()
    }

    /// Calls `f` for every event. Each peer's events are dispatched by a
    /// task of their own, in the order decided, never on the network path
    /// nor under a peer's lock: a slow `f` holds up only that peer's
    /// events (`f` may run for two peers at once), and acks keep flowing.
    /// A peer whose events fall [`Tuning::event_capacity`](crate::Tuning::event_capacity) events (or
    /// [`Tuning::event_bytes`](crate::Tuning::event_bytes)) behind has them replaced by one
    /// [`FlushReason::Backlog`](crate::FlushReason::Backlog) flush.
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        let mut callbacks = self
            .shared
            .app
            .callbacks
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::clone(&callbacks);
        list.push(Arc::new(f));
        *callbacks = Arc::new(list);
        self.shared.app.callbacks_gen.fetch_add(1, Ordering::AcqRel);
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
        Status {
            node: s.me.clone(),
            incarnation: self.incarnation(),
            last_seq,
            buffered,
            buffer_capacity: s.config.buffer,
            buffer_overflows: overflows,
            peers,
            counters: s.stats.snapshot(),
        }
    }

    /// Starts a graceful shutdown without waiting for it: new invalidations
    /// are refused, links drain what is queued, say goodbye and close.
    pub fn initiate_shutdown(&self) {
        self.shared.shutdown_deadline();
        lock(&self.shared.out).close();
        self.shared.life.token.cancel();
        self.tracker.close();
    }

    /// Shuts down gracefully and waits until every task has ended (at most
    /// about [`Tuning::shutdown_timeout`](crate::Tuning::shutdown_timeout) plus a little).
    pub async fn shutdown(self) {
        self.initiate_shutdown();
        self.tracker.wait().await;
        if let Some(path) = self.shared.config.state_file.path() {
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
        lock(&self.shared.life.state_lock).take();
        info!(node = %self.shared.me, "mesh stopped");
    }

    /// Stops at once, as a crash would: no draining, no goodbye. For tests
    /// and the demo.
    pub async fn abort(self) {
        let _ = self
            .shared
            .life
            .shutdown_at
            .set(tokio::time::Instant::now());
        lock(&self.shared.out).close();
        let shared = self.shared.clone();
        // Links check this flag and skip the goodbye.
        shared.life.aborted.store(true, Ordering::Release);
        shared.life.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        // What a crash would do too: the state file stays as written at
        // start, and the lock goes.
        lock(&shared.life.state_lock).take();
    }
}
