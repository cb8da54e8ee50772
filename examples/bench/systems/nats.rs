//! NATS core pub/sub: NATS's own async client, through one nats-server
//! of the bench's own.

use anyhow::Context;
use futures_util::StreamExt;

use crate::clock;
use crate::host::{self, Daemon, free_ports};
use crate::participant::{Node, NodeSpec, Origin, payload};
use crate::stats::Recorder;

/// Messages one throughput burst publishes (the client buffers and
/// writes them in large writes of its own).
const BURST: usize = 1024;

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    let rec = Recorder::new(spec.workload);
    let client = async_nats::ConnectOptions::new()
        // The client's queue per subscription: large enough that a
        // subscriber that keeps up is never dropped by its own client.
        .subscription_capacity(1 << 20)
        .connect(format!("127.0.0.1:{}", spec.nats_port))
        .await?;
    if spec.index == 0 {
        return Ok(Node::sending(
            rec,
            Origin::Nats(NatsOrigin {
                client,
                subject: spec.channel.clone(),
            }),
        ));
    }
    let mut sub = client.subscribe(spec.channel.clone()).await?;
    // A round trip: the server has the subscription before `ready`.
    client.flush().await?;
    let r = rec.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Some(msg) = sub.next().await {
            r.record(&msg.payload);
        }
    });
    Ok(Node::receiving(rec, task))
}

pub(crate) struct NatsOrigin {
    client: async_nats::Client,
    subject: String,
}

impl NatsOrigin {
    pub(crate) async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        let body = bytes::Bytes::copy_from_slice(&payload(stamp));
        self.client.publish(self.subject.clone(), body).await?;
        Ok(())
    }

    pub(crate) async fn burst(&mut self) -> anyhow::Result<u64> {
        for _ in 0..BURST {
            self.one(clock::now_ns()).await?;
        }
        Ok(BURST as u64)
    }
}

/// A nats-server of our own on a free loopback port.
pub(crate) async fn start() -> anyhow::Result<Daemon> {
    let port = free_ports(1)?[0];
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("nats.conf");
    // As for Redis, subscribers are not cut off mid-run for lagging:
    // the per-connection buffer (64 MB by default) and the write
    // deadline (2 s) are raised.
    std::fs::write(
        &conf,
        format!("listen: \"127.0.0.1:{port}\"\nmax_pending: 1073741824\nwrite_deadline: \"60s\"\n"),
    )?;
    let child = std::process::Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start nats-server")?;
    Daemon::new(port, child, Some(dir))
        .ready("nats-server", |port| async move {
            match async_nats::connect(format!("127.0.0.1:{port}")).await {
                Ok(c) => c.flush().await.is_ok(),
                Err(_) => false,
            }
        })
        .await
}

/// Whether nats-server is there; when it is not, says so and how to
/// install it (the bench installs nothing itself).
pub(crate) fn installed() -> bool {
    host::installed("nats-server", "nats-server", "NATS")
}
