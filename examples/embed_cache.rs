//! A read-through cache kept coherent by cachecast, as a Rust service would
//! embed it: three "servers" in one process share a "database"; each caches
//! what it reads in a [`CoherentCache`], and each write invalidates the
//! entry everywhere else.
//!
//! ```sh
//! cargo run --example embed_cache --features moka
//! ```
//!
//! [`CoherentCache`] does the event handling: invalidations drop one
//! entry, whole-cache events drop the cache, a flush (a peer crashed, a link
//! lost more than its buffer held, …) drops everything. No lock is held
//! while the database is read: a value loaded while its key was invalidated
//! is returned but not kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast::{ClusterConfig, CoherentCache, Mesh, MeshHandle, NodeAddr, StateFile};
use tokio::net::TcpListener;

const USERS: &str = "org.hisp.dhis.user.User";

/// The shared source of truth (a database, in real life).
type Db = Arc<Mutex<HashMap<String, String>>>;

/// One application server: its node and its cache of users.
struct Server {
    name: &'static str,
    mesh: MeshHandle,
    users: CoherentCache<Option<String>>,
}

impl Server {
    async fn read(&self, db: &Db, key: &str) -> Option<String> {
        let hit = self.users.get(key).is_some();
        let v = self
            .users
            .get_or_load(key, || async {
                // The database read; no cache lock is held meanwhile.
                let v = db
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(key)
                    .cloned();
                Ok::<_, std::convert::Infallible>(v)
            })
            .await
            .unwrap_or_else(|never| match never {});
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
            .users
            .invalidate_and_wait(key, Duration::from_secs(1))
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
        // Each server of this one-process example starts fresh; a real one
        // keeps a state file (StateFile::At) so that a start after a crash
        // tells its peers to flush.
        let mesh = Mesh::builder(config)
            .state_file(StateFile::Off)
            .listener(listener)
            .start()
            .await?;
        let users = CoherentCache::new(&mesh, USERS, 10_000);
        servers.push(Server { name, mesh, users });
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
        s.read(&db, "admin").await;
    }
    println!("app1 renames it:");
    servers[0].write(&db, "admin", "Administrator").await?;
    println!("the others read the new name, not their stale copy:");
    for s in &servers[1..] {
        let v = s.read(&db, "admin").await;
        anyhow::ensure!(v.as_deref() == Some("Administrator"), "stale read");
    }
    for s in servers {
        s.mesh.shutdown().await;
    }
    Ok(())
}
