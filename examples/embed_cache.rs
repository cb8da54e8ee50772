//! A read-through cache kept coherent by cachecast, as a Rust service would
//! embed it: three "servers" in one process share a "database"; each caches
//! what it reads, and each write invalidates the entry everywhere else.
//!
//! ```sh
//! cargo run --example embed_cache
//! ```
//!
//! The point to copy is [`Cache::attach`]: invalidations drop one entry,
//! whole-cache events drop one cache, and a flush (a peer crashed, a link
//! lost more than its buffer held, …) drops everything, which is always
//! safe for a read-through cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast::{ClusterConfig, Event, Mesh, MeshHandle, NodeAddr};
use tokio::net::TcpListener;

const USERS: &str = "org.hisp.dhis.user.User";

/// The shared source of truth (a database, in real life).
type Db = Arc<Mutex<HashMap<String, String>>>;

/// One server's local cache: cache name → key → value.
#[derive(Clone, Default)]
struct Cache {
    entries: Arc<Mutex<HashMap<String, HashMap<String, String>>>>,
}

impl Cache {
    /// Makes the mesh's events drop what they make stale. The callback runs
    /// on the network path: it only takes a short lock.
    fn attach(&self, mesh: &MeshHandle) {
        let entries = self.entries.clone();
        mesh.on_event(move |event| {
            let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                Event::Invalidated { cache, key, .. } => {
                    if let Some(c) = entries.get_mut(&**cache) {
                        c.remove(&**key);
                    }
                }
                Event::CacheCleared { cache, .. } => {
                    entries.remove(&**cache);
                }
                Event::Flush { .. } => entries.clear(),
                _ => {} // peer up or down (and kinds added later): nothing to drop
            }
        });
    }

    /// Reads through the cache; says whether it was a hit.
    fn get(&self, db: &Db, cache: &str, key: &str) -> (Option<String>, bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let c = entries.entry(cache.to_string()).or_default();
        if let Some(v) = c.get(key) {
            return (Some(v.clone()), true);
        }
        let v = db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        if let Some(v) = &v {
            c.insert(key.to_string(), v.clone());
        }
        (v, false)
    }
}

/// One application server: its node and its cache.
struct Server {
    name: &'static str,
    mesh: MeshHandle,
    cache: Cache,
}

impl Server {
    fn read(&self, db: &Db, key: &str) -> Option<String> {
        let (v, hit) = self.cache.get(db, USERS, key);
        println!(
            "  {} reads {key}: {:?} ({})",
            self.name,
            v.as_deref().unwrap_or("-"),
            if hit { "cache" } else { "database" }
        );
        v
    }

    /// Writes the database, then tells the others; waits for their acks so
    /// that the next read anywhere sees the new value.
    async fn write(&self, db: &Db, key: &str, value: &str) -> anyhow::Result<()> {
        db.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), value.to_string());
        let outcome = self
            .mesh
            .invalidate_and_wait(
                cachecast::Item::Key {
                    cache: USERS.into(),
                    key: key.into(),
                },
                Duration::from_secs(1),
            )
            .await?;
        println!(
            "  {} writes {key} = {value:?}; acked by {} peer(s)",
            self.name,
            outcome.acked.len()
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(NodeAddr::new("127.0.0.1", l.local_addr()?.port()));
        listeners.push(l);
    }
    let mut servers = Vec::new();
    for (i, (listener, name)) in listeners
        .into_iter()
        .zip(["app1", "app2", "app3"])
        .enumerate()
    {
        let peers = addrs.iter().enumerate().filter(|&(j, _)| j != i);
        let config = ClusterConfig::new(addrs[i].clone(), peers.map(|(_, a)| a.clone()));
        let cache = Cache::default();
        let mesh = Mesh::builder(config).listener(listener).start().await?;
        cache.attach(&mesh);
        servers.push(Server { name, mesh, cache });
    }
    // Wait until every link is up, so the first write reaches everyone.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !servers
            .iter()
            .all(|s| s.mesh.status().peers.iter().all(|p| p.connected))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;

    let db: Db = Arc::default();
    db.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert("admin".into(), "Admin".into());

    println!("every server caches the user:");
    for s in &servers {
        s.read(&db, "admin");
    }
    println!("app1 renames it:");
    servers[0].write(&db, "admin", "Administrator").await?;
    println!("the others read the new name, not their stale copy:");
    for s in &servers[1..] {
        let v = s.read(&db, "admin");
        anyhow::ensure!(v.as_deref() == Some("Administrator"), "stale read");
    }
    for s in servers {
        s.mesh.shutdown().await;
    }
    Ok(())
}
