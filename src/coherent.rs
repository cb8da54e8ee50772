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
//! but never served from the cache, since it may predate the change. Each
//! load notes a generation before it starts (one per key stripe, and one
//! for the whole cache) and stores its value tagged with it; an
//! invalidation moves the generation before it evicts, and a read serves a
//! value only if its tag is the current generation. So once an
//! invalidation is applied, no value loaded before it is served, whatever
//! the interleaving (a store after the eviction, or in the same clock tick
//! as a clear); and a load that started before an eviction never replaces
//! one that started after it.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::mesh::{Event, InvalidateError, MeshHandle, WaitOutcome};
use crate::wire::Item;

/// Generations per cache: a load is discarded only when a key of its
/// stripe (about 1 key in 64) was invalidated meanwhile.
const STRIPES: usize = 64;

/// Generations of a key's stripe and of the whole cache, as a load saw
/// them when it started. Both only grow.
type Tag = (u64, u64);

/// A value and the generations its load started at.
#[derive(Clone)]
struct Tagged<V> {
    tag: Tag,
    value: V,
}

struct Inner<V> {
    name: Arc<str>,
    values: moka::sync::Cache<String, Tagged<V>>,
    stripes: [AtomicU64; STRIPES],
    whole: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl<V: Clone + Send + Sync + 'static> Inner<V> {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        &self.stripes[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    /// The generations a value of `key` must be tagged with to be served.
    fn generation(&self, key: &str) -> Tag {
        (
            self.stripe(key).load(Ordering::SeqCst),
            self.whole.load(Ordering::SeqCst),
        )
    }

    /// The value held for `key`, if it was loaded since the last
    /// invalidation of its stripe and of the whole cache.
    fn get(&self, key: &str) -> Option<V> {
        let held = self.values.get(key)?;
        (held.tag == self.generation(key)).then_some(held.value)
    }

    /// Stores what a load that started at `tag` returned, unless the value
    /// held was loaded later (its tag is no older): a slow load never
    /// replaces a fresher one. A stale tag is stored harmlessly: it is
    /// never served.
    fn store(&self, key: &str, tag: Tag, value: V) {
        use moka::ops::compute::Op;
        self.values
            .entry(key.to_string())
            .and_compute_with(|held| match held {
                Some(h) if h.value().tag.0 >= tag.0 && h.value().tag.1 >= tag.1 => Op::Nop,
                _ => Op::Put(Tagged { tag, value }),
            });
    }

    /// Moves the generation, so that nothing loaded before is served, then
    /// evicts to free the space.
    fn evict(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
        self.values.invalidate(key);
    }

    /// Moves the whole cache's generation (no value loaded before is served
    /// again, whatever moka's clock says), then frees the space.
    fn clear(&self) {
        self.whole.fetch_add(1, Ordering::SeqCst);
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

    /// The value held for `key`, if any (never one loaded before an
    /// invalidation of it that was applied).
    pub fn get(&self, key: &str) -> Option<V> {
        self.inner.get(key)
    }

    /// The value for `key`: the one held, or else what `load` returns,
    /// which is then kept unless `key` (or the whole cache) was
    /// invalidated while it loaded. No lock is held across `load`.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.inner.get(key) {
            return Ok(v);
        }
        let before = self.inner.generation(key);
        let value = load().await?;
        // Not stored when already known stale (it would never be served);
        // an invalidation after this look is caught by the tag.
        if self.inner.generation(key) == before {
            self.inner.store(key, before, value.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Inner<&'static str> {
        Inner {
            name: Arc::from("c"),
            values: moka::sync::Cache::new(100),
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
            whole: AtomicU64::new(0),
            hasher: Default::default(),
        }
    }

    /// A load passed its check, then the invalidation evicted, then the
    /// load stored: what it stored is never served.
    #[test]
    fn a_value_stored_after_the_eviction_it_raced_is_not_served() {
        let c = cache();
        let tag = c.generation("k");
        c.evict("k");
        c.store("k", tag, "old");
        assert_eq!(c.get("k"), None);
    }

    /// A load that started before an eviction finishes after one that
    /// started after it: the fresher value stays.
    #[test]
    fn a_slow_load_never_replaces_a_fresher_one() {
        let c = cache();
        let first = c.generation("k");
        c.evict("k");
        let second = c.generation("k");
        c.store("k", second, "new");
        c.store("k", first, "old");
        assert_eq!(c.get("k"), Some("new"));
    }

    /// A clear in the same clock tick as a store (moka compares times):
    /// the generation, not the clock, decides.
    #[test]
    fn a_clear_hides_every_value_loaded_before_it_at_once() {
        let c = cache();
        let tag = c.generation("k");
        c.store("k", tag, "v");
        assert_eq!(c.get("k"), Some("v"));
        c.clear();
        c.store("k", tag, "raced");
        assert_eq!(c.get("k"), None);
        let later = c.generation("k");
        c.store("k", later, "fresh");
        assert_eq!(c.get("k"), Some("fresh"));
    }

    /// Every order of one load (tag, store) against one eviction and one
    /// clear: a value is served only when its load started after both.
    #[test]
    fn every_interleaving_of_load_eviction_and_clear() {
        // Steps: 0 = the load notes its tag, 1 = the load stores,
        // 2 = evict, 3 = clear. The tag always comes before the store.
        let orders: Vec<[u8; 4]> = permutations([0, 1, 2, 3])
            .into_iter()
            .filter(|o| o.iter().position(|&s| s == 0) < o.iter().position(|&s| s == 1))
            .collect();
        assert_eq!(orders.len(), 12);
        for order in orders {
            let c = cache();
            let mut tag = None;
            for step in order {
                match step {
                    0 => tag = Some(c.generation("k")),
                    1 => c.store("k", tag.expect("tag first"), "v"),
                    2 => c.evict("k"),
                    _ => c.clear(),
                }
            }
            let pos = |s: u8| order.iter().position(|&x| x == s);
            let fresh = pos(0) > pos(2) && pos(0) > pos(3);
            assert_eq!(c.get("k").is_some(), fresh, "order {order:?}");
        }
    }

    fn permutations(items: [u8; 4]) -> Vec<[u8; 4]> {
        let mut out = Vec::new();
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    for d in 0..4 {
                        let p = [items[a], items[b], items[c], items[d]];
                        let mut seen = [false; 4];
                        for &i in &[a, b, c, d] {
                            seen[i] = true;
                        }
                        if seen.iter().all(|&x| x) {
                            out.push(p);
                        }
                    }
                }
            }
        }
        out
    }
}
