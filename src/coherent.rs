//! A read-through cache that the mesh keeps coherent (feature `moka`).
//!
//! [`CoherentCache`] holds the values of one named cache (a cache name as
//! the mesh knows it, e.g. `org.hisp.dhis.user.User`) in a bounded
//! [moka](https://docs.rs/moka) cache. Invalidations received from peers
//! evict their key; whole-cache invalidations and flushes empty it; a local
//! [`CoherentCache::invalidate`] evicts here and tells every peer.
//!
//! It closes the read-through race: a value loaded from the source of
//! truth while an invalidation of its key arrives is returned to its caller
//! but not kept, since it may predate the change. Each load notes a
//! generation before it starts (one per key stripe, and one for the whole
//! cache) and keeps its value only if neither moved by the time it is
//! stored; the eviction side moves the generation before it evicts, and
//! the loader checks again after storing, so either the loader sees the
//! move or the eviction removes what it stored.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::Duration;

use crate::mesh::{Event, InvalidateError, MeshHandle, WaitOutcome};
use crate::wire::Item;

/// Generations per cache: a load is discarded only when a key of its
/// stripe (about 1 key in 64) was invalidated meanwhile.
const STRIPES: usize = 64;

struct Inner<V> {
    name: Arc<str>,
    values: moka::sync::Cache<String, V>,
    stripes: [AtomicU64; STRIPES],
    whole: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl<V: Clone + Send + Sync + 'static> Inner<V> {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        &self.stripes[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    /// Generations a load of `key` must find unchanged to keep its value.
    fn generation(&self, key: &str) -> (u64, u64) {
        (
            self.stripe(key).load(Ordering::Acquire),
            self.whole.load(Ordering::Acquire),
        )
    }

    /// Moves the generation first, then evicts: a load that stored before
    /// this eviction is removed by it; one that stores after sees the move.
    fn evict(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::AcqRel);
        // Pairs with the loader's fence: of a store and this eviction, at
        // least one sees the other (a store-buffering pattern otherwise).
        fence(Ordering::SeqCst);
        self.values.invalidate(key);
    }

    fn clear(&self) {
        self.whole.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::SeqCst);
        self.values.invalidate_all();
    }

    fn apply(&self, event: &Event) {
        match event {
            Event::Invalidated { cache, key, .. } if **cache == *self.name => self.evict(key),
            Event::CacheCleared { cache, .. } if **cache == *self.name => self.clear(),
            Event::Flush { .. } => self.clear(),
            _ => {}
        }
    }
}

/// A read-through cache of one named cache, kept coherent across the mesh.
/// Cloning it gives another handle to the same cache.
pub struct CoherentCache<V> {
    inner: Arc<Inner<V>>,
    mesh: MeshHandle,
}

impl<V> Clone for CoherentCache<V> {
    fn clone(&self) -> Self {
        CoherentCache {
            inner: self.inner.clone(),
            mesh: self.mesh.clone(),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> CoherentCache<V> {
    /// A cache named `name` holding at most `max_entries` values, evicted
    /// by the events `mesh` receives from now on. (It starts empty, so
    /// events before it existed concern nothing it holds.)
    pub fn new(mesh: &MeshHandle, name: &str, max_entries: u64) -> Self {
        let inner = Arc::new(Inner {
            name: Arc::from(name),
            values: moka::sync::Cache::new(max_entries),
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
            whole: AtomicU64::new(0),
            hasher: Default::default(),
        });
        // A weak link: the mesh's callback must not keep a dropped cache.
        let weak = Arc::downgrade(&inner);
        mesh.on_event(move |event| {
            if let Some(inner) = weak.upgrade() {
                inner.apply(event);
            }
        });
        CoherentCache {
            inner,
            mesh: mesh.clone(),
        }
    }

    /// The cache's name, as the mesh carries it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The value held for `key`, if any.
    pub fn get(&self, key: &str) -> Option<V> {
        self.inner.values.get(key)
    }

    /// The value for `key`: the one held, or else what `load` returns,
    /// which is then kept unless `key` (or the whole cache) was
    /// invalidated while it loaded. No lock is held across `load`.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.inner.values.get(key) {
            return Ok(v);
        }
        let before = self.inner.generation(key);
        let value = load().await?;
        if self.inner.generation(key) == before {
            self.inner.values.insert(key.to_string(), value.clone());
            fence(Ordering::SeqCst);
            // An invalidation between the check and the insert moved the
            // generation before evicting: if it evicted first, take back
            // what was stored after it.
            if self.inner.generation(key) != before {
                self.inner.values.invalidate(key);
            }
        }
        Ok(value)
    }

    /// Evicts `key` here and tells every peer to evict it (never blocks on
    /// the network; see [`MeshHandle::invalidate`]).
    pub fn invalidate(&self, key: &str) -> Result<u64, InvalidateError> {
        self.inner.evict(key);
        self.mesh.invalidate(&self.inner.name, key)
    }

    /// Evicts `key` here, tells every peer, and waits until each connected
    /// peer acknowledged it (at most `timeout`): after a write, the next
    /// read anywhere sees the new value. See
    /// [`MeshHandle::invalidate_and_wait`].
    pub async fn invalidate_and_wait(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<WaitOutcome, InvalidateError> {
        self.inner.evict(key);
        let item = Item::Key {
            cache: self.inner.name.clone(),
            key: Arc::from(key),
        };
        self.mesh.invalidate_and_wait(item, timeout).await
    }

    /// Empties this cache here and on every peer.
    pub fn invalidate_all(&self) -> Result<u64, InvalidateError> {
        self.inner.clear();
        self.mesh.invalidate_cache(&self.inner.name)
    }

    /// Values held (moka's estimate, exact once pending work is done).
    pub fn entry_count(&self) -> u64 {
        self.inner.values.run_pending_tasks();
        self.inner.values.entry_count()
    }
}
