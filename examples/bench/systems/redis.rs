//! Redis pub/sub: Redis clients publishing and subscribing through one
//! redis-server of the bench's own, or (system `resp`, the application's
//! path) each through its own sidecar's Redis-protocol endpoint.

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};

use crate::clock;
use crate::host::{self, Daemon, free_ports};
use crate::participant::{Node, NodeSpec, Origin, payload};
use crate::stats::Recorder;
use crate::systems::System;

/// PUBLISH commands per pipeline, and pipelines in flight, of a
/// throughput burst (Redis's own advice for bulk traffic; of 1, 4 and
/// 16 pipelines of 64 to 1024 commands, this was the fastest here).
const PIPELINE: usize = 1024;
const IN_FLIGHT: usize = 4;

/// The server this participant talks to: the one redis-server, or
/// (the application's path) its own sidecar.
fn client(spec: &NodeSpec) -> anyhow::Result<redis::Client> {
    let port = match spec.system {
        System::Resp => spec.ports[spec.index],
        _ => spec.redis_port,
    };
    // TCP_NODELAY, as every other client here has it (the redis crate's
    // default is off): with Nagle's algorithm a PUBLISH may wait for the
    // ack of the one before.
    let info =
        redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}/"))?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?)
}

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    let rec = Recorder::new(spec.workload);
    let client = client(spec)?;
    if spec.index == 0 {
        let con = client.get_multiplexed_async_connection().await?;
        return Ok(Node::sending(
            rec,
            Origin::Redis(RedisOrigin {
                con,
                channel: spec.channel.clone(),
                pending: FuturesUnordered::new(),
            }),
        ));
    }
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&spec.channel).await?;
    let (sink, mut stream) = pubsub.split();
    let r = rec.clone();
    let task = tokio::spawn(async move {
        let _sink = sink;
        while let Some(msg) = stream.next().await {
            r.record(msg.get_payload_bytes());
        }
    });
    Ok(Node::receiving(rec, task))
}

pub(crate) struct RedisOrigin {
    con: redis::aio::MultiplexedConnection,
    channel: String,
    /// PUBLISHes sent and not yet answered: the origin does not wait for
    /// one reply before the next command, as an application's client
    /// (Lettuce's async API) does not, and as a round trip to a server on
    /// another host (`--link-delay`) would otherwise cap the rate.
    pending: FuturesUnordered<BoxFuture<'static, redis::RedisResult<i64>>>,
}

impl RedisOrigin {
    pub(crate) async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        let mut con = self.con.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(&payload(stamp)[..]);
        let mut publish: BoxFuture<'static, _> =
            Box::pin(async move { cmd.query_async::<i64>(&mut con).await });
        // Polled once here, so that commands leave in the order sent.
        if let std::task::Poll::Ready(r) = futures_util::poll!(&mut publish) {
            r?;
        } else {
            self.pending.push(publish);
        }
        // The answers that came meanwhile, each checked.
        while let Some(Some(r)) = self.pending.next().now_or_never() {
            r?;
        }
        Ok(())
    }

    pub(crate) async fn burst(&mut self) -> anyhow::Result<u64> {
        let pipes = (0..IN_FLIGHT).map(|_| {
            let mut pipe = redis::pipe();
            for _ in 0..PIPELINE {
                pipe.cmd("PUBLISH")
                    .arg(&self.channel)
                    .arg(&payload(clock::now_ns())[..])
                    .ignore();
            }
            let mut con = self.con.clone();
            async move { pipe.query_async::<()>(&mut con).await }
        });
        let done = futures_util::future::join_all(pipes).await;
        for r in done {
            r?;
        }
        Ok((PIPELINE * IN_FLIGHT) as u64)
    }
}

/// A redis-server of our own on a free loopback port.
pub(crate) async fn start() -> anyhow::Result<Daemon> {
    let port = free_ports(1)?[0];
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        // Subscribers are never cut off mid-run for lagging (the
        // default pub/sub output limit is 32 MB).
        .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    Daemon::new(port, child, None)
        .ready("redis-server", |port| async move {
            let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
                return false;
            };
            match client.get_multiplexed_async_connection().await {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await
}

/// Whether redis-server is there; when it is not, says so and how to
/// install it (the bench installs nothing itself).
pub(crate) fn installed() -> bool {
    host::installed("redis-server", "redis-server", "Redis")
}
