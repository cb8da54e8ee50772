//! Two nodes in one process, on loopback: one invalidates, the other hears
//! it; then a synchronous invalidation that waits for the peer's ack.
//!
//! ```sh
//! cargo run --example two_nodes
//! ```
//!
//! In a real deployment each node is its own process on its own server and
//! its configuration comes from `dhis.conf` (`cachecast::config::load`).

use std::time::Duration;

use cachecast::{ClusterConfig, Event, Item, Mesh, NodeAddr, StateFile};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Free loopback ports, learnt by binding first; the listeners are
    // handed to the nodes.
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    );
    let (a, b) = (
        NodeAddr::new("127.0.0.1", la.local_addr()?.port()),
        NodeAddr::new("127.0.0.1", lb.local_addr()?.port()),
    );
    // A real node keeps a state file (StateFile::At), so that a start
    // after a crash tells its peers to flush; these two live for a moment.
    let node_a = Mesh::builder(ClusterConfig::new(a.clone(), [b.clone()]))
        .state_file(StateFile::Off)
        .listener(la)
        .start()
        .await?;
    // B's stream is taken before B starts, so that it misses nothing.
    let mut builder_b = Mesh::builder(ClusterConfig::new(b, [a]))
        .state_file(StateFile::Off)
        .listener(lb);
    let mut events = builder_b.subscribe();
    let node_b = builder_b.start().await?;

    // Fire and forget: returns at once with the sequence number.
    let seq = node_a.invalidate("org.hisp.dhis.user.User", "xE7jOejl9FI")?;
    println!("A invalidated User/xE7jOejl9FI as seq {seq}");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await? {
            Some(Event::Invalidated {
                origin, cache, key, ..
            }) => {
                println!("B: drop {cache}/{key} (from {origin})");
                break;
            }
            Some(other) => println!("B: {other:?}"),
            None => anyhow::bail!("B stopped"),
        }
    }

    // Synchronous: resolves once every connected peer applied it.
    let outcome = node_a
        .invalidate_and_wait(
            Item::Cache {
                cache: "org.hisp.dhis.dataelement.DataElement".into(),
            },
            Duration::from_secs(1),
        )
        .await?;
    println!(
        "A cleared DataElement (seq {}): acked by {:?}, not by {:?}",
        outcome.seq, outcome.acked, outcome.not_acked
    );

    // Graceful: goodbyes, so neither side's restart costs the other a flush.
    node_a.shutdown().await;
    node_b.shutdown().await;
    Ok(())
}
