//! The sidecar's event ring: every event the mesh delivers, numbered and
//! kept in a bounded ring that SSE clients and the webhook read from at
//! their own pace. The mesh only ever appends (it never waits for a
//! reader); a reader that falls off the ring's tail gets a flush instead of
//! what it missed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::mesh::Event;

/// One event as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Its number in this run (the part of the SSE id after the dash).
    pub n: u64,
    /// The event. It is kept as it is (a few shared strings) and written
    /// as JSON only when a reader reads it: every event passes through the
    /// ring, few are ever read, and serialising each one cost more than the
    /// rest of its delivery.
    event: Event,
}

/// What a reader gets from [`Hub::read`].
#[derive(Debug)]
pub(crate) enum Read {
    /// Entries from the cursor on (possibly none yet).
    Entries(Vec<Entry>),
    /// The cursor fell off the ring: `missed` entries are gone; go on from
    /// `resume` after flushing.
    Lagged { missed: u64, resume: u64 },
}

struct Ring {
    entries: VecDeque<Entry>,
    /// The number the next entry gets (the first is 1).
    next: u64,
    capacity: usize,
    /// Bytes held (the entries' JSON plus a fixed cost each), and their
    /// bound.
    bytes: usize,
    max_bytes: usize,
}

/// Bytes the ring may hold whatever its count says: one peer sending
/// 64 KiB names and keys (escaped up to six times in JSON) would otherwise
/// grow every other sidecar to gigabytes.
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// What an entry costs beside its strings (the entry, its `Arc`s, the
/// ring's slot, JSON's field names), roughly.
const ENTRY_COST: usize = 128;

impl Entry {
    /// Bytes the entry stands for: its strings (as their JSON would be, at
    /// least) and a fixed cost.
    fn cost(&self) -> usize {
        let strings = match &self.event {
            Event::Invalidated {
                origin, cache, key, ..
            } => origin.len() + cache.len() + key.len(),
            Event::CacheCleared { origin, cache, .. } => origin.len() + cache.len(),
            Event::Flush { origin, .. } => origin.as_ref().map_or(0, |o| o.len()) + 64,
            Event::PeerUp { peer } => peer.len(),
            Event::PeerDown { peer, reason } => peer.len() + reason.len(),
        };
        strings + ENTRY_COST
    }

    /// The SSE event name (also the JSON `type`) and the JSON object.
    pub(crate) fn to_json(&self) -> (&'static str, Value) {
        to_json(&self.event)
    }
}

/// An event-stream client's place in the ring, which the ring watches: a
/// client that stopped reading is counted as lagging as soon as the ring
/// drops an event it has not read, not only when (if ever) it reads again.
#[derive(Debug)]
pub(crate) struct Reader {
    /// Number of the next entry it reads.
    next: AtomicU64,
    /// Counted as lagging and not past that lag yet.
    lagging: AtomicBool,
}

/// The ring, shared by the mesh callback and every reader.
pub(crate) struct Hub {
    ring: Mutex<Ring>,
    /// The event-stream clients, to tell which ones an eviction leaves
    /// behind (few: the API takes at most a few hundred connections).
    readers: Mutex<Vec<Weak<Reader>>>,
    /// Times a client fell behind the ring (`cachecast_sse_lagged_total`).
    pub lagged: AtomicU64,
    /// The number of the newest entry, so readers can wait for more.
    newest: watch::Sender<u64>,
    /// This sidecar run's id (random, in hex): SSE ids are
    /// `run-n`, so a client can tell a resumed stream from a new run.
    pub run: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    pub(crate) fn new(run: String, capacity: usize) -> Self {
        Self::with_bytes(run, capacity, MAX_BYTES)
    }

    fn with_bytes(run: String, capacity: usize, max_bytes: usize) -> Self {
        Hub {
            ring: Mutex::new(Ring {
                entries: VecDeque::with_capacity(capacity.min(1024)),
                next: 1,
                capacity: capacity.max(1),
                bytes: 0,
                max_bytes,
            }),
            readers: Mutex::new(Vec::new()),
            lagged: AtomicU64::new(0),
            newest: watch::channel(0).0,
            run,
        }
    }

    /// Appends an event; never blocks on readers.
    pub(crate) fn push(&self, event: &Event) {
        let event = event.clone();
        let n = {
            let mut ring = lock(&self.ring);
            let n = ring.next;
            ring.next += 1;
            let entry = Entry { n, event };
            ring.bytes += entry.cost();
            ring.entries.push_back(entry);
            // The newest entry always stays, however large.
            let mut evicted = false;
            while ring.entries.len() > 1
                && (ring.entries.len() > ring.capacity || ring.bytes > ring.max_bytes)
            {
                if let Some(old) = ring.entries.pop_front() {
                    ring.bytes -= old.cost();
                    evicted = true;
                }
            }
            if evicted {
                // Under the ring's lock, as readers move under it too.
                let oldest = ring.entries.front().map_or(ring.next, |e| e.n);
                self.mark_behind(oldest);
            }
            n
        };
        // Waking costs a lock per shard of the channel's notifier: only
        // when a reader (SSE, webhook) waits. A reader reads the ring after
        // subscribing, so it misses nothing that was not announced.
        if self.newest.receiver_count() > 0 {
            self.newest.send_replace(n);
        }
    }

    /// The number the next event will get: a reader starting "now" starts
    /// here.
    pub(crate) fn next(&self) -> u64 {
        lock(&self.ring).next
    }

    /// Counts each reader that the ring's tail has just passed.
    fn mark_behind(&self, oldest: u64) {
        let mut readers = lock(&self.readers);
        readers.retain(|w| {
            let Some(r) = w.upgrade() else { return false };
            if r.next.load(Ordering::Relaxed) < oldest && !r.lagging.swap(true, Ordering::Relaxed) {
                self.lagged.fetch_add(1, Ordering::Relaxed);
            }
            true
        });
    }

    /// A client that reads from entry `next` on, watched for lag while it
    /// is held.
    pub(crate) fn reader(&self, next: u64) -> Arc<Reader> {
        let r = Arc::new(Reader {
            next: AtomicU64::new(next),
            lagging: AtomicBool::new(false),
        });
        let mut readers = lock(&self.readers);
        readers.retain(|w| w.strong_count() > 0);
        readers.push(Arc::downgrade(&r));
        r
    }

    /// Up to `max` entries from number `from` on.
    pub(crate) fn read(&self, from: u64, max: usize) -> Read {
        read_ring(&lock(&self.ring), from, max)
    }

    /// [`Hub::read`] for a watched client: its place moves with what it
    /// read, and a lag is counted once, when the ring first passed it.
    pub(crate) fn read_as(&self, reader: &Reader, from: u64, max: usize) -> Read {
        let ring = lock(&self.ring);
        let got = read_ring(&ring, from, max);
        let next = match &got {
            Read::Lagged { resume, .. } => {
                if !reader.lagging.swap(false, Ordering::Relaxed) {
                    self.lagged.fetch_add(1, Ordering::Relaxed);
                }
                *resume
            }
            Read::Entries(e) => e.last().map_or(from, |e| e.n + 1),
        };
        reader.next.store(next, Ordering::Relaxed);
        got
    }

    /// Whether entry `n` (and everything after it) is still held or yet to
    /// come, i.e. a reader can resume right after `n - 1`.
    pub(crate) fn can_resume_at(&self, n: u64) -> bool {
        let ring = lock(&self.ring);
        let oldest = ring.entries.front().map_or(ring.next, |e| e.n);
        n >= oldest && n <= ring.next
    }

    /// Waits for entries newer than `seen`.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// Entries held, and the ring's bound.
    pub(crate) fn held(&self) -> (usize, usize) {
        let ring = lock(&self.ring);
        (ring.entries.len(), ring.capacity)
    }
}

fn read_ring(ring: &Ring, from: u64, max: usize) -> Read {
    let oldest = ring.entries.front().map_or(ring.next, |e| e.n);
    if from < oldest {
        return Read::Lagged {
            missed: oldest - from,
            resume: oldest,
        };
    }
    let skip = (from - oldest) as usize;
    Read::Entries(ring.entries.iter().skip(skip).take(max).cloned().collect())
}

/// The API's JSON for an event, with its type name.
pub(crate) fn to_json(event: &Event) -> (&'static str, Value) {
    match event {
        Event::Invalidated {
            origin,
            seq,
            cache,
            key,
        } => (
            "invalidate",
            json!({"type": "invalidate", "origin": &**origin, "seq": seq, "cache": &**cache, "key": &**key}),
        ),
        Event::CacheCleared { origin, seq, cache } => (
            "invalidate",
            json!({"type": "invalidate", "origin": &**origin, "seq": seq, "cache": &**cache}),
        ),
        Event::Flush { origin, reason } => (
            "flush",
            json!({"type": "flush", "origin": origin.as_deref(), "reason": reason.to_string()}),
        ),
        Event::PeerUp { peer } => ("peer-up", json!({"type": "peer-up", "peer": &**peer})),
        Event::PeerDown { peer, reason } => (
            "peer-down",
            json!({"type": "peer-down", "peer": &**peer, "reason": reason}),
        ),
    }
}

/// A flush made for one reader (it is not in the ring).
pub(crate) fn flush_json(reason: &str) -> Value {
    json!({"type": "flush", "origin": null, "reason": reason})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ev(k: u64) -> Event {
        Event::Invalidated {
            origin: Arc::from("a:1"),
            seq: k,
            cache: Arc::from("c"),
            key: Arc::from(k.to_string()),
        }
    }

    #[test]
    fn readers_resume_or_lag() {
        let hub = Hub::new("r".into(), 4);
        for k in 1..=3 {
            hub.push(&ev(k));
        }
        match hub.read(2, 10) {
            Read::Entries(e) => assert_eq!(e.iter().map(|e| e.n).collect::<Vec<_>>(), [2, 3]),
            other => panic!("{other:?}"),
        }
        for k in 4..=10 {
            hub.push(&ev(k));
        }
        match hub.read(2, 10) {
            Read::Lagged { missed, resume } => assert_eq!((missed, resume), (5, 7)),
            other => panic!("{other:?}"),
        }
        assert!(hub.can_resume_at(7));
        assert!(hub.can_resume_at(11), "caught up exactly");
        assert!(!hub.can_resume_at(6));
        assert!(!hub.can_resume_at(12), "from the future");
        assert_eq!(hub.held(), (4, 4));
    }

    /// A client that stops reading is counted as lagging when the ring
    /// drops what it has not read, not when it reads again; and once per
    /// lag.
    #[test]
    fn a_stalled_reader_is_counted_when_the_ring_passes_it() {
        let hub = Hub::new("r".into(), 4);
        let stalled = hub.reader(hub.next());
        let reading = hub.reader(hub.next());
        let mut at = hub.next();
        // The other client keeps up with every event.
        let mut push = |k: u64| {
            hub.push(&ev(k));
            if let Read::Entries(e) = hub.read_as(&reading, at, 10) {
                at = e.last().map_or(at, |e| e.n + 1);
            }
        };
        let lagged = || hub.lagged.load(Ordering::Relaxed);
        (1..=10).for_each(&mut push);
        assert_eq!(lagged(), 1, "the stalled one, at once");
        (11..=20).for_each(&mut push);
        assert_eq!(lagged(), 1, "still the same lag");
        assert!(matches!(hub.read_as(&stalled, 1, 10), Read::Lagged { .. }));
        assert_eq!(lagged(), 1, "reading it is no second lag");
        (21..=30).for_each(&mut push);
        assert_eq!(lagged(), 2, "stalled again");
        drop(stalled);
        drop(reading);
        hub.push(&ev(31));
        assert!(lock(&hub.readers).is_empty(), "gone readers are forgotten");
    }

    #[test]
    fn large_events_are_bounded_by_bytes_too() {
        let hub = Hub::with_bytes("r".into(), 1000, 10_000);
        let big = |k: u64| Event::Invalidated {
            origin: Arc::from("a:1"),
            seq: k,
            cache: Arc::from("c"),
            key: Arc::from("x".repeat(3000)),
        };
        for k in 1..=10 {
            hub.push(&big(k));
        }
        let (held, _) = hub.held();
        assert_eq!(held, 3, "three ~3 KB events fit in 10 KB");
        assert!(matches!(hub.read(1, 10), Read::Lagged { resume: 8, .. }));
        // One larger than the bound is still held, alone.
        hub.push(&Event::Invalidated {
            origin: Arc::from("a:1"),
            seq: 11,
            cache: Arc::from("c"),
            key: Arc::from("y".repeat(20_000)),
        });
        assert_eq!(hub.held().0, 1);
        assert!(hub.can_resume_at(11));
    }
}
