//! `CoherentCache` (feature `moka`) on real nodes on loopback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cachecast::{ClusterConfig, CoherentCache, Event, Mesh, MeshHandle, NodeAddr, StateFile};
use tokio::net::TcpListener;

const USERS: &str = "org.hisp.dhis.user.User";
const LONG: Duration = Duration::from_secs(10);

async fn pair() -> (MeshHandle, MeshHandle) {
    let la = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let lb = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = NodeAddr::new("127.0.0.1", la.local_addr().expect("addr").port());
    let b = NodeAddr::new("127.0.0.1", lb.local_addr().expect("addr").port());
    let ma = Mesh::builder(ClusterConfig::new(a.clone(), [b.clone()]))
        .state_file(StateFile::Off)
        .listener(la)
        .start()
        .await
        .expect("start a");
    let mb = Mesh::builder(ClusterConfig::new(b, [a]))
        .state_file(StateFile::Off)
        .listener(lb)
        .start()
        .await
        .expect("start b");
    until("connected", || {
        ma.status().peers[0].connected && mb.status().peers[0].connected
    })
    .await;
    (ma, mb)
}

/// Waits for `cond`, as every test of the suite does.
async fn until(what: &str, cond: impl FnMut() -> bool) {
    common::wait_until(what, LONG, cond).await;
}

/// Set once `mesh` has passed an invalidation of `key` to its callbacks
/// (registered after the cache's, so the cache has seen it too).
fn seen(mesh: &MeshHandle, key: &'static str) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    mesh.on_event(move |e| {
        if matches!(e, Event::Invalidated { key: k, .. } if &**k == key) {
            f.store(true, Ordering::SeqCst);
        }
    });
    flag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_invalidations_evict_and_local_ones_travel() {
    let (a, b) = pair().await;
    let ca: CoherentCache<String> = CoherentCache::new(&a, USERS, 1000);
    let cb: CoherentCache<String> = CoherentCache::new(&b, USERS, 1000);
    let other: CoherentCache<String> = CoherentCache::new(&b, "other", 1000);
    for c in [&cb, &other] {
        let v = c
            .get_or_load("42", || async { Ok::<_, ()>("v1".to_string()) })
            .await;
        assert_eq!(v, Ok("v1".to_string()));
    }
    assert_eq!(cb.get("42").as_deref(), Some("v1"));
    // A's own invalidation evicts at B, in that cache only.
    ca.invalidate("42").expect("invalidate");
    until("evicted at B", || cb.get("42").is_none()).await;
    assert_eq!(other.get("42").as_deref(), Some("v1"));
    // A whole-cache invalidation empties it; a flush empties every cache.
    cb.get_or_load("7", || async { Ok::<_, ()>("x".to_string()) })
        .await
        .expect("load");
    ca.invalidate_all().expect("invalidate all");
    until("cleared at B", || cb.get("7").is_none()).await;
    assert_eq!(other.get("42").as_deref(), Some("v1"));
    a.flush().expect("flush");
    until("flushed at B", || other.get("42").is_none()).await;
    // Local invalidation evicts here too.
    cb.get_or_load("9", || async { Ok::<_, ()>("y".to_string()) })
        .await
        .expect("load");
    cb.invalidate("9").expect("invalidate");
    assert!(cb.get("9").is_none());
    a.shutdown().await;
    b.shutdown().await;
}

/// The read-through race: B loads user 42 from the database (the old
/// value), A changes it and invalidates, the invalidation reaches B, and
/// only then does B's load return. B's caller gets what it loaded, but
/// the cache must not keep it: it predates the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_loaded_before_an_invalidation_is_not_kept() {
    let (a, b) = pair().await;
    let cb: CoherentCache<String> = CoherentCache::new(&b, USERS, 1000);
    let invalidated = seen(&b, "42");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let loading = {
        let cb = cb.clone();
        tokio::spawn(async move {
            cb.get_or_load("42", || async move {
                let old = "old".to_string(); // read from the database
                let _ = started_tx.send(());
                let _ = go_rx.await;
                Ok::<_, ()>(old)
            })
            .await
        })
    };
    started_rx.await.expect("load started");
    a.invalidate(USERS, "42").expect("invalidate"); // the database changed
    until("B applied it", || invalidated.load(Ordering::SeqCst)).await;
    let _ = go_tx.send(());
    let got = loading.await.expect("task");
    assert_eq!(got.as_deref(), Ok("old"), "the caller gets what it loaded");
    assert_eq!(
        cb.get("42"),
        None,
        "a stale value was kept after its invalidation"
    );
    // The next read loads the new value and keeps it.
    let v = cb
        .get_or_load("42", || async { Ok::<_, ()>("new".to_string()) })
        .await;
    assert_eq!(v.as_deref(), Ok("new"));
    assert_eq!(cb.get("42").as_deref(), Some("new"));
    a.shutdown().await;
    b.shutdown().await;
}
