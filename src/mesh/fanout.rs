//! From the network path to the application: per-peer dispatch queues, the
//! tasks that run the application's callbacks from them, and the queues
//! that event streams read.
//!
//! A connection task decides a peer's events under that peer's lock and
//! only pushes them into the peer's queue; one dispatch task per peer runs
//! the callbacks and feeds the streams, in the order decided, and only then
//! lets the connection acknowledge them (so an origin's
//! `invalidate_and_wait` still means "the peer's application was told").
//! So no application code runs on the network path or under a peer's lock,
//! and a slow callback holds up only its own peer's events.
//! Every queue is bounded in events and in bytes; an event that would not
//! fit collapses what the queue holds into one flush, so memory stays
//! bounded and nothing is lost silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::runtime::RuntimeFlavor;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Event, FlushReason, PeerId, Shared, lock};
use crate::wire::Position;

/// Bytes counted for an event beside its strings.
const OVERHEAD: usize = 64;

/// Bytes an event holds, by an upper estimate: its strings and a fixed
/// overhead for the rest.
fn size_of(event: &Event) -> usize {
    OVERHEAD
        + match event {
            Event::Invalidated { cache, key, .. } => cache.len() + key.len(),
            Event::CacheCleared { cache, .. } => cache.len(),
            Event::PeerDown { reason, .. } => reason.len(),
            Event::Flush { .. } | Event::PeerUp { .. } => 0,
        }
}

/// Events the queue's own collapse already stands for.
fn missed_in(event: &Event) -> u64 {
    match event {
        Event::Flush {
            reason: FlushReason::Lagged { missed } | FlushReason::Backlog { missed },
            ..
        } => *missed,
        _ => 1,
    }
}

/// A queue of events bounded in count and in bytes. An event that would
/// not fit replaces everything queued, itself included, with one flush
/// (made by `collapse`, told how many events it stands for): everything
/// after the flush arrives after it, so the order of what remains holds.
#[derive(Debug)]
pub(crate) struct Bounded {
    events: VecDeque<Event>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Times the queue collapsed into a flush.
    collapses: u64,
}

impl Bounded {
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        Bounded {
            events: VecDeque::new(),
            bytes: 0,
            max_events: max_events.max(2),
            max_bytes,
            collapses: 0,
        }
    }

    /// Queues `event`; returns whether the queue collapsed into a flush.
    pub(crate) fn push(&mut self, event: Event, collapse: impl FnOnce(u64) -> Event) -> bool {
        let size = size_of(&event);
        if self.events.len() < self.max_events && self.bytes + size <= self.max_bytes {
            self.bytes += size;
            self.events.push_back(event);
            return false;
        }
        let missed = self.events.iter().map(missed_in).sum::<u64>() + missed_in(&event);
        self.events.clear();
        let flush = collapse(missed);
        self.bytes = size_of(&flush);
        self.events.push_back(flush);
        self.collapses += 1;
        true
    }

    pub(crate) fn pop(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        self.bytes -= size_of(&e);
        Some(e)
    }

    /// Takes everything queued, in order.
    pub(crate) fn take(&mut self) -> VecDeque<Event> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }

    /// Whether `events` more, of `bytes`, fit (an empty queue takes
    /// anything: what does not fit then collapses).
    fn fits(&self, events: usize, bytes: usize) -> bool {
        self.events.is_empty()
            || (self.events.len() + events <= self.max_events
                && self.bytes + bytes <= self.max_bytes)
    }

    #[cfg(test)]
    pub(crate) fn collapses(&self) -> u64 {
        self.collapses
    }
}

/// One peer's events on their way to the application: pushed by the
/// network tasks, taken by that peer's dispatch task.
#[derive(Debug)]
pub(crate) struct PeerQueue {
    queue: Mutex<Pending>,
    /// Something was queued (wakes the dispatch task).
    ready: Notify,
    /// The dispatch task took what was queued (wakes a connection task
    /// waiting for room).
    room: Notify,
}

impl PeerQueue {
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        PeerQueue {
            queue: Mutex::new(Pending {
                events: Bounded::new(max_events, max_bytes),
                ack: None,
            }),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Waits, at most `patience`, until `items` events of about `bytes`
    /// fit: an application that is slow but keeps up holds the stream back
    /// (acks slow down, the origin keeps the rest) instead of costing a
    /// flush; one that is stuck costs a flush once `patience` is over,
    /// short enough that the link's heartbeats are still answered.
    /// Called without any lock held.
    pub(crate) async fn room_for(&self, items: usize, bytes: usize, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        let bytes = bytes + items * OVERHEAD;
        loop {
            // Registered before the look, so that a take after it wakes us.
            let room = self.room.notified();
            if lock(&self.queue).events.fits(items, bytes) {
                return;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return;
            }
        }
    }

    /// Queues a peer's events, in order, and then `ack`: what the
    /// connection may acknowledge once they reached the application. Never
    /// blocks on the application.
    pub(crate) fn push(
        &self,
        origin: &PeerId,
        events: impl IntoIterator<Item = Event>,
        ack: Option<(AckTo, Position)>,
    ) -> u64 {
        let mut collapsed = 0;
        {
            let mut pending = lock(&self.queue);
            if ack.is_some() {
                // Cumulative: the latest supersedes what is not yet sent.
                pending.ack = ack;
            }
            let q = &mut pending.events;
            for e in events {
                let origin = origin.clone();
                if q.push(e, |missed| Event::Flush {
                    origin: Some(origin),
                    reason: FlushReason::Backlog { missed },
                }) {
                    collapsed += 1;
                }
            }
        }
        self.ready.notify_one();
        collapsed
    }
}

/// Sends a connection's acknowledgement of a position.
pub(crate) type AckTo = Arc<dyn Fn(Position) + Send + Sync>;

/// What waits for a peer's dispatch task.
struct Pending {
    events: Bounded,
    /// The latest position a connection may acknowledge once every event
    /// queued before it reached the application (those in `events`).
    ack: Option<(AckTo, Position)>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("events", &self.events)
            .field("ack", &self.ack.as_ref().map(|(_, p)| p))
            .finish()
    }
}

/// Runs the callbacks and feeds the streams with `peer`'s events until the
/// node's tasks have ended (`done`) and its queue is empty.
pub(crate) async fn dispatch(shared: Arc<Shared>, peer: usize, done: CancellationToken) {
    let queue = &shared.peers[peer].events;
    let mut callbacks = shared.callbacks();
    // Only other workers can run what a blocked callback holds up; on one
    // thread nothing can, and a yield would only cost each batch a pass.
    let other_workers =
        tokio::runtime::Handle::current().runtime_flavor() != RuntimeFlavor::CurrentThread;
    loop {
        // Registered before the queue is looked at, so that a push after
        // the look is not missed.
        let ready = queue.ready.notified();
        let (batch, ack) = {
            let mut pending = lock(&queue.queue);
            (pending.events.take(), pending.ack.take())
        };
        queue.room.notify_waiters();
        if batch.is_empty() && ack.is_none() {
            if done.is_cancelled() {
                return;
            }
            tokio::select! {
                () = ready => {}
                () = done.cancelled() => {}
            }
            continue;
        }
        if shared.app.callbacks_gen.load(Ordering::Acquire) != callbacks.generation {
            callbacks = shared.callbacks();
        }
        // Application code may block its thread. A task this one just woke
        // (the connection, for room in the queue or for its ack) waits in
        // this worker's next-task slot, which other workers do not take
        // from: it would wait as long as a callback blocks, and its link
        // would go silent. Yielding first lets it run.
        if other_workers && !callbacks.list.is_empty() {
            tokio::task::yield_now().await;
        }
        for event in &batch {
            if shared.app.callbacks_gen.load(Ordering::Acquire) != callbacks.generation {
                callbacks = shared.callbacks();
            }
            for cb in callbacks.list.iter() {
                cb(event);
            }
        }
        shared.app.fanout.publish(&batch);
        if let Some((ack_to, position)) = ack {
            ack_to(position);
        }
    }
}

/// Where [`Events`] streams come from.
#[derive(Clone)]
pub(crate) struct Fanout {
    inner: Arc<FanoutInner>,
    /// Resolves when the node has stopped and every event was handed to
    /// the streams: they end once they have read what they hold.
    pub(crate) finished: CancellationToken,
}

struct FanoutInner {
    streams: Mutex<Vec<Weak<Stream>>>,
    /// Live streams: with none, publishing costs nothing.
    live: AtomicUsize,
    max_events: usize,
    max_bytes: usize,
}

/// One stream's queue.
struct Stream {
    state: Mutex<StreamState>,
}

struct StreamState {
    queue: Bounded,
    waker: Option<Waker>,
}

impl Fanout {
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        Fanout {
            inner: Arc::new(FanoutInner {
                streams: Mutex::new(Vec::new()),
                live: AtomicUsize::new(0),
                max_events,
                max_bytes,
            }),
            finished: CancellationToken::new(),
        }
    }

    pub(crate) fn subscribe(&self) -> Events {
        let stream = Arc::new(Stream {
            state: Mutex::new(StreamState {
                queue: Bounded::new(self.inner.max_events, self.inner.max_bytes),
                waker: None,
            }),
        });
        let mut streams = lock(&self.inner.streams);
        streams.retain(|s| s.strong_count() > 0);
        streams.push(Arc::downgrade(&stream));
        self.inner.live.store(streams.len(), Ordering::Release);
        Events {
            stream,
            fanout: self.clone(),
            finished: Box::pin(self.finished.clone().cancelled_owned()),
        }
    }

    /// Hands `events` to every live stream, in order (one look at the
    /// list of streams, and one lock and wake-up per stream, per batch).
    fn publish(&self, events: &VecDeque<Event>) {
        if self.inner.live.load(Ordering::Acquire) == 0 {
            return;
        }
        let streams: Vec<Arc<Stream>> = {
            let mut list = lock(&self.inner.streams);
            list.retain(|s| s.strong_count() > 0);
            self.inner.live.store(list.len(), Ordering::Release);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for s in streams {
            let mut st = lock(&s.state);
            for event in events {
                st.queue.push(event.clone(), |missed| Event::Flush {
                    origin: None,
                    reason: FlushReason::Lagged { missed },
                });
            }
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
    }

    /// Every event has been handed out: streams end once they are read.
    pub(crate) fn finish(&self) {
        self.finished.cancel();
        for s in lock(&self.inner.streams).iter().filter_map(Weak::upgrade) {
            if let Some(w) = lock(&s.state).waker.take() {
                w.wake();
            }
        }
    }
}

/// A stream of [`Event`]s; see [`MeshHandle::subscribe`](crate::MeshHandle::subscribe).
#[must_use = "events are only kept for a stream that is read"]
pub struct Events {
    stream: Arc<Stream>,
    /// Keeps the list this stream is in alive (and counts it live).
    fanout: Fanout,
    /// Resolves when the node has stopped: the stream then ends.
    finished: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let mut streams = lock(&self.fanout.inner.streams);
        streams.retain(|s| !std::ptr::eq(s.as_ptr(), Arc::as_ptr(&self.stream)));
        self.fanout
            .inner
            .live
            .store(streams.len(), Ordering::Release);
    }
}

impl Events {
    /// The next event; `None` once the mesh has shut down and every event
    /// was read.
    pub async fn recv(&mut self) -> Option<Event> {
        use futures_util::StreamExt;
        self.next().await
    }
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        // Looked at first: once the node has stopped, whatever is still
        // queued is delivered, then the stream ends.
        let finished = self.finished.as_mut().poll(cx).is_ready();
        let mut st = lock(&self.stream.state);
        if let Some(e) = st.queue.pop() {
            return Poll::Ready(Some(e));
        }
        if finished {
            return Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Event {
        Event::Invalidated {
            origin: Arc::from("a:1"),
            seq: 1,
            cache: Arc::from("c"),
            key: Arc::from(k),
        }
    }

    fn lagged(missed: u64) -> Event {
        Event::Flush {
            origin: None,
            reason: FlushReason::Lagged { missed },
        }
    }

    #[test]
    fn a_full_queue_collapses_into_one_flush_that_counts_what_it_replaced() {
        let mut q = Bounded::new(3, usize::MAX);
        for k in ["a", "b", "c"] {
            assert!(!q.push(key(k), lagged));
        }
        assert!(q.push(key("d"), lagged), "the fourth does not fit");
        assert!(!q.push(key("e"), lagged));
        assert!(!q.push(key("f"), lagged));
        // Full again: the earlier flush's count carries over.
        assert!(q.push(key("g"), lagged));
        assert_eq!(q.pop(), Some(lagged(7)));
        assert_eq!(q.pop(), None);
        assert_eq!(q.collapses(), 2);
    }

    /// Hazard: bounded by count only, a queue of 8,192 events of two
    /// 64 KiB strings each held about 1 GiB for one slow reader.
    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let mut q = Bounded::new(8192, 1024 * 1024);
        let big = "x".repeat(64 * 1024);
        let mut collapsed = 0;
        for _ in 0..100 {
            if q.push(key(&big), lagged) {
                collapsed += 1;
            }
            assert!(q.bytes <= 1024 * 1024, "{} bytes held", q.bytes);
        }
        assert!(collapsed > 0);
        let mut seen = 0;
        while q.pop().is_some() {
            seen += 1;
        }
        assert!(seen <= 16, "{seen} events held");
    }
}
