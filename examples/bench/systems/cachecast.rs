//! cachecast itself, as a library: each node a real mesh
//! (`Mesh::builder`), receivers counting and timing deliveries in its
//! `on_event` callback, the origin calling `MeshHandle::invalidate`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use cachecast::{ClusterConfig, Event, Mesh, MeshHandle, NodeAddr};

use crate::clock;
use crate::participant::{Node, NodeSpec, Origin};
use crate::stats::Recorder;
use crate::{CACHE, STEP};

/// Invalidations one throughput burst sends.
const BURST: u64 = 1024;

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    let addr = |p: u16| NodeAddr::new("127.0.0.1", p);
    let me = spec.ports[spec.index];
    let peers = spec
        .ports
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != spec.index)
        .map(|(_, p)| addr(*p));
    let mut config = ClusterConfig::new(addr(me), peers);
    // Its identity is `me`, where the others reach it; it listens at its
    // bind port (behind a relay when the network is modelled).
    config.bind = SocketAddr::from(([127, 0, 0, 1], spec.binds[spec.index]));
    if let Some(buffer) = spec.buffer {
        config.buffer = buffer;
    }
    // Benchmark nodes start fresh every run.
    config.state_file = cachecast::StateFile::Off;
    if spec.secret {
        config.secret = Some(cachecast::config::SecretSource::Inline(
            "bench-secret-0123456789abcdef".into(),
        ));
    }
    let buffer = config.buffer as u64;
    let rec = Recorder::new(spec.workload);
    let r = rec.clone();
    let mut tuning = cachecast::mesh::Tuning::default();
    if let Some(us) = spec.ack_delay_us {
        tuning.ack_delay = Duration::from_micros(us);
    }
    let mesh = Mesh::builder(config)
        .tuning(tuning)
        .on_event(move |e| match e {
            Event::Invalidated { key, .. } => r.record(key.as_bytes()),
            Event::Flush { .. } => {
                r.flushes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        })
        .start()
        .await?;
    // Ready once both links with every peer are up.
    let deadline = tokio::time::Instant::now() + STEP;
    while !mesh.status().peers.iter().all(|p| p.connected) {
        if tokio::time::Instant::now() > deadline {
            bail!("node {} did not connect to its peers", spec.index);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let origin = (spec.index == 0).then(|| {
        Origin::Cachecast(CcOrigin {
            mesh: mesh.clone(),
            // Half the replay buffer may be unacknowledged: the buffer
            // never overflows, so nothing is replaced by a flush.
            window: buffer / 2,
            last: 0,
        })
    });
    Ok(Node {
        rec,
        origin,
        stop: Box::pin(mesh.shutdown()),
    })
}

pub(crate) struct CcOrigin {
    mesh: MeshHandle,
    window: u64,
    last: u64,
}

impl CcOrigin {
    pub(crate) fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        let key = clock::stamp_hex(stamp);
        let key = std::str::from_utf8(&key)?;
        self.last = self.mesh.invalidate(CACHE, key)?;
        Ok(())
    }

    pub(crate) async fn burst(&mut self) -> anyhow::Result<u64> {
        // One call per invalidation, as an application makes them.
        for _ in 0..BURST {
            self.one(clock::now_ns())?;
        }
        if self.last > self.window {
            let outcome = self.mesh.wait_acked(self.last - self.window, STEP).await;
            if !outcome.all_acked() {
                bail!("peers stopped acknowledging: {:?}", outcome.not_acked);
            }
        }
        Ok(BURST)
    }
}
