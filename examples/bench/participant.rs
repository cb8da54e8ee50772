//! A participant: one node of one run, whatever its system and
//! placement, and the small line protocol the driver speaks with it
//! (`ready`, `start`, `sent`, `expect`, `got`, `stop`) over the stdin and
//! stdout of a node process or over an in-memory pipe; the driver's end
//! of it is [`Peer`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::stats::{Recorder, hist_to_text};
use crate::systems::cachecast::CcOrigin;
use crate::systems::http::HttpOrigin;
use crate::systems::nats::NatsOrigin;
use crate::systems::raw::{RawOrigin, RawVariant};
use crate::systems::raw_async::RawAsyncOrigin;
use crate::systems::redis::RedisOrigin;
use crate::systems::{self, System};
use crate::{CACHE, STEP, clock};

/// What the origin of one run does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) enum Workload {
    /// `rate` invalidations per second for `secs`.
    Latency { rate: u64, secs: f64 },
    /// As fast as possible for `secs`.
    Throughput { secs: f64 },
}

/// One participant of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodeSpec {
    pub(crate) system: System,
    /// 0 is the origin; the others receive.
    pub(crate) index: usize,
    /// cachecast: every node's peer port; raw: every receiver's port
    /// (index 0 unused); resp: every node's sidecar's Redis-protocol port;
    /// Redis: unused.
    pub(crate) ports: Vec<u16>,
    /// cachecast and raw: where each node listens; its entry in `ports`
    /// is where the others reach it, a relay between when the network is
    /// modelled (`--link-delay`), else the same port.
    #[serde(default)]
    pub(crate) binds: Vec<u16>,
    /// The Redis and NATS servers' ports, and the channel (subject) of
    /// this run.
    pub(crate) redis_port: u16,
    pub(crate) nats_port: u16,
    pub(crate) channel: String,
    /// How the raw floor moves bytes.
    pub(crate) raw: RawVariant,
    /// The runtime of a node process.
    pub(crate) runtime: NodeRuntime,
    pub(crate) workload: Workload,
    /// cachecast's replay buffer, if not the default.
    pub(crate) buffer: Option<usize>,
    /// cachecast nodes share a secret (tagged frames).
    #[serde(default)]
    pub(crate) secret: bool,
    /// cachecast nodes' ack delay (`Tuning::ack_delay`), if not the
    /// default, in microseconds.
    #[serde(default)]
    pub(crate) ack_delay_us: Option<u64>,
}

/// The Tokio runtime of each node process (every system's alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub(crate) enum NodeRuntime {
    /// One thread, as `cachecast run` has.
    #[default]
    CurrentThread,
    /// A worker per core.
    MultiThread,
}

/// A node set up and ready: what it records, what it sends with (the
/// origin only) and how it stops.
pub(crate) struct Node {
    pub(crate) rec: Arc<Recorder>,
    pub(crate) origin: Option<Origin>,
    pub(crate) stop: BoxFuture<'static, ()>,
}

impl Node {
    /// The origin: nothing to stop but what `origin` holds.
    pub(crate) fn sending(rec: Arc<Recorder>, origin: Origin) -> Node {
        Node {
            rec,
            origin: Some(origin),
            stop: Box::pin(async {}),
        }
    }

    /// A receiver whose deliveries come in through `task`, aborted at stop.
    pub(crate) fn receiving(rec: Arc<Recorder>, task: tokio::task::JoinHandle<()>) -> Node {
        Node {
            rec,
            origin: None,
            stop: Box::pin(async move {
                task.abort();
                let _ = task.await;
            }),
        }
    }
}

/// The sending side. It runs as a task on the node's runtime, as an
/// application's code calling the system would.
pub(crate) enum Origin {
    Cachecast(CcOrigin),
    Redis(RedisOrigin),
    Nats(NatsOrigin),
    Http(HttpOrigin),
    /// The floor drives its workload itself, on a thread of its own.
    Raw(RawOrigin),
    RawAsync(RawAsyncOrigin),
}

impl Origin {
    /// One invalidation carrying `stamp` (latency workload).
    async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        match self {
            Origin::Cachecast(o) => o.one(stamp),
            Origin::Redis(o) => o.one(stamp).await,
            Origin::Nats(o) => o.one(stamp).await,
            Origin::Http(o) => o.one(stamp).await,
            Origin::RawAsync(o) => o.one(stamp).await,
            Origin::Raw(_) => bail!("the raw origin drives itself"),
        }
    }

    /// A burst, as fast as the system allows; returns how many were sent
    /// (throughput workload).
    async fn burst(&mut self) -> anyhow::Result<u64> {
        match self {
            Origin::Cachecast(o) => o.burst().await,
            Origin::Redis(o) => o.burst().await,
            Origin::Nats(o) => o.burst().await,
            Origin::Http(o) => o.burst().await,
            Origin::RawAsync(o) => o.burst().await,
            Origin::Raw(_) => bail!("the raw origin drives itself"),
        }
    }
}

/// The payload of Redis messages and raw frames: the cache name, a space,
/// the stamped key (what cachecast carries as cache and key).
pub(crate) fn payload(stamp: u64) -> [u8; CACHE.len() + 17] {
    let mut p = [b' '; CACHE.len() + 17];
    p[..CACHE.len()].copy_from_slice(CACHE.as_bytes());
    p[CACHE.len() + 1..].copy_from_slice(&clock::stamp_hex(stamp));
    p
}

/// Writes one line of the protocol.
async fn say(out: &mut (impl AsyncWrite + Unpin), line: &str) -> anyhow::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await?;
    Ok(())
}

async fn next_line(
    lines: &mut tokio::io::Lines<impl AsyncBufRead + Unpin>,
) -> anyhow::Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("the driver went away"))
}

/// Runs one participant over a line protocol; reports an error as a line.
pub(crate) async fn participant(
    spec: NodeSpec,
    input: impl AsyncBufRead + Unpin,
    mut out: impl AsyncWrite + Unpin,
) {
    let result = participant_inner(&spec, input, &mut out).await;
    if let Err(e) = result {
        let _ = say(
            &mut out,
            &format!("error {:?} node {}: {e:#}", spec.system, spec.index),
        )
        .await;
    }
}

async fn participant_inner(
    spec: &NodeSpec,
    input: impl AsyncBufRead + Unpin,
    out: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<()> {
    let mut lines = input.lines();
    let node = systems::setup(spec).await?;
    say(out, "ready").await?;
    if next_line(&mut lines).await? != "start" {
        bail!("expected start");
    }
    if let Some(mut origin) = node.origin {
        let (count, t0, t1) = drive(&mut origin, spec.workload).await?;
        say(out, &format!("sent {count} {t0} {t1}")).await?;
    } else {
        let sampler = (!node.rec.timed).then(|| node.rec.sample());
        let line = next_line(&mut lines).await?;
        let n: u64 = line
            .strip_prefix("expect ")
            .context("expected `expect N`")?
            .parse()?;
        node.rec.wait_for(n).await;
        if let Some(sampler) = sampler {
            // Past the next sample, then stop.
            tokio::time::sleep(Duration::from_millis(2)).await;
            sampler.abort();
        }
        let text = {
            let h = node.rec.hist.lock().unwrap_or_else(|e| e.into_inner());
            hist_to_text(&h)
        };
        let r = &node.rec;
        say(
            out,
            &format!(
                "got {} {} {} {text}",
                r.count.load(Ordering::Relaxed),
                r.flushes.load(Ordering::Relaxed),
                r.last_ns.load(Ordering::Relaxed)
            ),
        )
        .await?;
    }
    if next_line(&mut lines).await? != "stop" {
        bail!("expected stop");
    }
    node.stop.await;
    say(out, "stopped").await
}

/// The origin's workload; returns how many it sent and when it started and
/// stopped sending.
async fn drive(origin: &mut Origin, workload: Workload) -> anyhow::Result<(u64, u64, u64)> {
    let t0 = clock::now_ns();
    if let Origin::Raw(raw) = origin {
        let count = raw.drive(workload, t0).await?;
        return Ok((count, t0, clock::now_ns()));
    }
    let count = match workload {
        Workload::Latency { rate, secs } => {
            let total = (rate as f64 * secs) as u64;
            let interval = 1e9 / rate as f64;
            // Tokio's timers tick in milliseconds: a thread sleeps until
            // each due time and wakes the origin's task, which stamps and
            // sends. The schedule is absolute: a late send does not delay
            // the next.
            let due = Arc::new(AtomicU64::new(0));
            let wake = Arc::new(tokio::sync::Notify::new());
            let pacer = {
                let (due, wake) = (due.clone(), wake.clone());
                std::thread::spawn(move || {
                    // Microsecond precision instead of the default 50 µs slack.
                    clock::fine_timer_slack();
                    for i in 1..=total {
                        clock::sleep_until(t0 + ((i - 1) as f64 * interval) as u64);
                        due.store(i, Ordering::Release);
                        wake.notify_one();
                    }
                })
            };
            let mut sent = 0;
            while sent < total {
                wake.notified().await;
                let now_due = due.load(Ordering::Acquire);
                while sent < now_due {
                    origin.one(clock::now_ns()).await?;
                    sent += 1;
                }
            }
            let _ = pacer.join();
            total
        }
        Workload::Throughput { secs } => {
            let end = t0 + (secs * 1e9) as u64;
            let mut n = 0;
            while clock::now_ns() < end {
                n += origin.burst().await?;
                // Let the tasks on this worker run between bursts.
                tokio::task::yield_now().await;
            }
            n
        }
    };
    Ok((count, t0, clock::now_ns()))
}

/// A participant as the driver sees it.
pub(crate) struct Peer {
    lines: tokio::io::Lines<BufReader<Pin<Box<dyn AsyncRead + Send>>>>,
    out: Pin<Box<dyn AsyncWrite + Send>>,
    child: Option<tokio::process::Child>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Peer {
    pub(crate) fn start(spec: NodeSpec, separate: bool) -> anyhow::Result<Peer> {
        if separate {
            let exe = std::env::current_exe()?;
            let mut child = tokio::process::Command::new(exe)
                .arg("--node")
                .arg(serde_json::to_string(&spec)?)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let rd = child.stdout.take().context("child stdout")?;
            let wr = child.stdin.take().context("child stdin")?;
            return Ok(Peer {
                lines: BufReader::new(Box::pin(rd) as Pin<Box<dyn AsyncRead + Send>>).lines(),
                out: Box::pin(wr),
                child: Some(child),
                task: None,
            });
        }
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (their_rd, their_wr) = tokio::io::split(theirs);
        let task = tokio::spawn(participant(spec, BufReader::new(their_rd), their_wr));
        let (rd, wr) = tokio::io::split(ours);
        Ok(Peer {
            lines: BufReader::new(Box::pin(rd) as Pin<Box<dyn AsyncRead + Send>>).lines(),
            out: Box::pin(wr),
            child: None,
            task: Some(task),
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub(crate) async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        say(&mut self.out, line).await
    }

    pub(crate) async fn recv(&mut self, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("no answer within {limit:?}"))??
            .ok_or_else(|| anyhow!("participant ended early"))?;
        if line.starts_with("error ") {
            bail!("{line}");
        }
        Ok(line)
    }

    pub(crate) async fn finish(mut self) {
        if let Some(mut child) = self.child.take() {
            drop(self.out);
            if tokio::time::timeout(STEP, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(task) = self.task.take()
            && tokio::time::timeout(STEP, task).await.is_err()
        {
            eprintln!("a participant did not stop in time");
        }
    }
}
