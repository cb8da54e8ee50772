//! Latency, throughput, CPU and memory of cachecast on loopback, side by
//! side with Redis pub/sub, NATS core pub/sub and a raw TCP floor.
//!
//! ```sh
//! cargo run --release --features cli --example bench -- [--json] [--in-process]
//! ```
//!
//! Each system runs the same workloads with 5 and with 2 nodes (one origin,
//! the others receivers), each node a process of its own, as deployed.
//! Beside the library's path, the application's path through the sidecar's
//! Redis-protocol endpoint (`resp`): a Redis client publishes to its own
//! `cachecast run` process, the sidecars carry it, and a Redis client
//! subscribed to each other sidecar receives it, against the same clients
//! through one redis-server, and NATS clients through one nats-server:
//! - latency: the origin sends at a fixed rate; every receiver records the
//!   one-way delay of every invalidation (CLOCK_MONOTONIC stamp carried in
//!   the key) in an HDR histogram;
//! - throughput: the origin sends as fast as it can for a fixed time;
//!   receivers count deliveries until the last one arrives;
//! - CPU: user plus system time of every process a system needs (nodes,
//!   its server or its sidecars) over each run, from /proc/PID/stat, per
//!   delivered invalidation and in percent of a core;
//! - memory: the largest peak RSS (VmHWM) among the processes of a system
//!   during its throughput run (with `--in-process`, a second, shorter
//!   throughput run spawns them), the servers included; and the idle RSS
//!   of two real sidecars (`cachecast run`) connected to each other.
//!
//! The raw TCP floor is the fastest way these bytes cross loopback here:
//! blocking sockets, each receiver a thread blocked in `read` in its own
//! process, the origin's pacing thread writing each frame when it is due
//! (`--raw async|busy` run the variants shown to be no faster).
//!
//! Every node, whatever its system, is a *participant* that speaks a small
//! line protocol with the driver (`ready`, `start`, `sent`, `expect`, `got`,
//! `stop`): as a child process (this program re-executed with a hidden
//! `--node` argument) over its stdin and stdout, or in one process over an
//! in-memory pipe. `docs/performance.md` describes the method and records
//! a run.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The cache name every invalidation carries (a typical DHIS 2 one).
const CACHE: &str = "org.hisp.dhis.user.User";
/// How long receivers wait for the last deliveries once the origin stopped.
const DRAIN: Duration = Duration::from_secs(20);
/// Bound of any single step of the line protocol (setup, stop).
const STEP: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "cachecast vs Redis and NATS pub/sub vs raw TCP, on loopback")]
struct Args {
    /// Print one JSON object on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run every node in this one process, as tasks of one runtime (for
    /// profiling); the default is a process per node, as deployed.
    #[arg(long)]
    in_process: bool,
    /// Seconds of each latency and throughput run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Invalidations per second of the latency run.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Systems to run, comma-separated: cachecast, redis, nats, raw, resp
    /// (Redis clients through `cachecast run` sidecars), http (POST and
    /// SSE through sidecars).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cachecast,redis,nats,raw,resp,http"
    )]
    only: Vec<String>,
    /// How the raw TCP floor moves its bytes (the others are shown to be
    /// no faster: docs/performance.md).
    #[arg(long, value_enum, default_value_t)]
    raw: RawVariant,
    /// The Tokio runtime of each node process, whatever its system.
    #[arg(long, value_enum, default_value_t)]
    runtime: NodeRuntime,
    /// Cluster sizes, comma-separated (each 2..=5).
    #[arg(long, value_delimiter = ',', default_value = "5,2")]
    nodes: Vec<usize>,
    /// Workloads to run, comma-separated: latency, throughput.
    #[arg(long, value_delimiter = ',', default_value = "latency,throughput")]
    workloads: Vec<String>,
    /// cachecast's replay buffer per peer, in invalidations (default: the
    /// configuration's default, `cachecast.buffer`).
    #[arg(long)]
    buffer: Option<usize>,
    /// Skip the memory measurements (peak RSS runs, idle sidecars).
    #[arg(long)]
    no_memory: bool,
    /// cachecast nodes share a secret: every frame after the handshake
    /// carries a tag (section 7.6 of the protocol), which shows its cost.
    #[arg(long)]
    secret: bool,
    /// Internal: run one participant, described in JSON, over stdin/stdout.
    #[arg(long, hide = true)]
    node: Option<String>,
}

// ---------------------------------------------------------------------------
// Clock, stamps, recording

mod clock {
    /// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
    /// machine, so a stamp taken by the origin is comparable at a receiver.
    pub fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// A stamp as 16 lowercase hex digits: the invalidation's key.
    pub fn stamp_hex(ns: u64) -> [u8; 16] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = HEX[((ns >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }

    /// The stamp in the last 16 bytes of `bytes`.
    pub fn parse_stamp(bytes: &[u8]) -> Option<u64> {
        let hex = bytes.get(bytes.len().checked_sub(16)?..)?;
        hex.iter().try_fold(0u64, |acc, &c| {
            let d = (c as char).to_digit(16)?;
            Some(acc << 4 | u64::from(d))
        })
    }

    /// Sleeps until `due` (nanoseconds of [`now_ns`]); the caller's timer
    /// slack decides the precision.
    pub fn sleep_until(due: u64) {
        let now = now_ns();
        if due > now {
            std::thread::sleep(std::time::Duration::from_nanos(due - now));
        }
    }
}

/// What one receiver saw: a count and a latency histogram.
struct Recorder {
    /// Whether each delivery's latency is recorded (the latency workload);
    /// the throughput workload only counts, so that receivers cost the
    /// same little for every system.
    timed: bool,
    hist: Mutex<Histogram<u64>>,
    count: AtomicU64,
    /// Flushes received (a flush would stand for lost invalidations).
    flushes: AtomicU64,
    /// When the last delivery arrived.
    last_ns: AtomicU64,
}

impl Recorder {
    fn new(workload: Workload) -> Arc<Self> {
        Arc::new(Recorder {
            timed: matches!(workload, Workload::Latency { .. }),
            hist: Mutex::new(new_hist()),
            count: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        })
    }

    /// One delivery whose stamp ends `bytes`.
    fn record(&self, bytes: &[u8]) {
        if self.timed {
            let now = clock::now_ns();
            if let Some(stamp) = clock::parse_stamp(bytes) {
                let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
                h.saturating_record(now.saturating_sub(stamp).max(1));
            }
            self.last_ns.fetch_max(now, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until `n` deliveries arrived, at most [`DRAIN`].
    async fn wait_for(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while self.count.load(Ordering::Relaxed) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Without timing, notes when the count last changed, once a
    /// millisecond (late by at most about that: the throughput it gives
    /// errs low).
    fn sample(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let rec = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let c = rec.count.load(Ordering::Relaxed);
                if c != seen {
                    seen = c;
                    rec.last_ns.store(clock::now_ns(), Ordering::Relaxed);
                }
            }
        })
    }
}

/// Latencies in nanoseconds, 1 ns to 100 s, 3 significant digits.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// A histogram as `value:count,...` (between processes).
fn hist_to_text(h: &Histogram<u64>) -> String {
    let parts: Vec<String> = h
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn hist_from_text(text: &str, into: &mut Histogram<u64>) -> anyhow::Result<()> {
    if text == "-" {
        return Ok(());
    }
    for part in text.split(',') {
        let (v, c) = part.split_once(':').context("histogram entry")?;
        into.saturating_record_n(v.parse()?, c.parse()?);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// What a participant is told

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum System {
    Cachecast,
    Redis,
    Nats,
    Raw,
    /// Redis clients, each talking to its own sidecar process.
    Resp,
    /// HTTP clients: POST to the origin's sidecar, SSE from each other.
    Http,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Cachecast => "cachecast",
            System::Redis => "redis",
            System::Nats => "nats",
            System::Raw => "raw_tcp",
            System::Resp => "cachecast_resp",
            System::Http => "cachecast_http",
        }
    }

    fn title(self) -> &'static str {
        match self {
            System::Cachecast => "cachecast",
            System::Redis => "Redis pub/sub",
            System::Nats => "NATS",
            System::Raw => "raw TCP",
            System::Resp => "Redis clients via sidecars",
            System::Http => "HTTP and SSE via sidecars",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Workload {
    /// `rate` invalidations per second for `secs`.
    Latency { rate: u64, secs: f64 },
    /// As fast as possible for `secs`.
    Throughput { secs: f64 },
}

/// One participant of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeSpec {
    system: System,
    /// 0 is the origin; the others receive.
    index: usize,
    /// cachecast: every node's peer port; raw: every receiver's port
    /// (index 0 unused); resp: every node's sidecar's Redis-protocol port;
    /// Redis: unused.
    ports: Vec<u16>,
    /// The Redis and NATS servers' ports, and the channel (subject) of
    /// this run.
    redis_port: u16,
    nats_port: u16,
    channel: String,
    /// How the raw floor moves bytes.
    raw: RawVariant,
    /// The runtime of a node process.
    runtime: NodeRuntime,
    workload: Workload,
    /// cachecast's replay buffer, if not the default.
    buffer: Option<usize>,
    /// cachecast nodes share a secret (tagged frames).
    #[serde(default)]
    secret: bool,
}

/// A node set up and ready: what it records, what it sends with (the
/// origin only) and how it stops.
struct Node {
    rec: Arc<Recorder>,
    origin: Option<Origin>,
    stop: BoxFuture<'static, ()>,
}

impl Node {
    /// The origin: nothing to stop but what `origin` holds.
    fn sending(rec: Arc<Recorder>, origin: Origin) -> Node {
        Node {
            rec,
            origin: Some(origin),
            stop: Box::pin(async {}),
        }
    }

    /// A receiver whose deliveries come in through `task`, aborted at stop.
    fn receiving(rec: Arc<Recorder>, task: tokio::task::JoinHandle<()>) -> Node {
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
enum Origin {
    Cachecast(cc::CcOrigin),
    Redis(rd::RedisOrigin),
    Nats(nt::NatsOrigin),
    Http(ht::HttpOrigin),
    /// The floor drives its workload itself, on a thread of its own.
    Raw(raw::RawOrigin),
    RawAsync(raw_async::RawAsyncOrigin),
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
fn payload(stamp: u64) -> [u8; CACHE.len() + 17] {
    let mut p = [b' '; CACHE.len() + 17];
    p[..CACHE.len()].copy_from_slice(CACHE.as_bytes());
    p[CACHE.len() + 1..].copy_from_slice(&clock::stamp_hex(stamp));
    p
}

// ---------------------------------------------------------------------------
// cachecast

mod cc {
    use super::*;
    use cachecast::{ClusterConfig, Event, Mesh, MeshHandle, NodeAddr};

    /// Invalidations one throughput burst sends.
    const BURST: u64 = 1024;

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
        let addr = |p: u16| NodeAddr::new("127.0.0.1", p);
        let me = spec.ports[spec.index];
        let peers = spec
            .ports
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != spec.index)
            .map(|(_, p)| addr(*p));
        let mut config = ClusterConfig::new(addr(me), peers);
        config.bind = SocketAddr::from(([127, 0, 0, 1], me));
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
        let mesh = Mesh::builder(config)
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

    pub struct CcOrigin {
        mesh: MeshHandle,
        window: u64,
        last: u64,
    }

    impl CcOrigin {
        pub fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
            let key = clock::stamp_hex(stamp);
            let key = std::str::from_utf8(&key)?;
            self.last = self.mesh.invalidate(CACHE, key)?;
            Ok(())
        }

        pub async fn burst(&mut self) -> anyhow::Result<u64> {
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
}

// ---------------------------------------------------------------------------
// Redis pub/sub

mod rd {
    use super::*;
    use futures_util::StreamExt;

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
        Ok(redis::Client::open(format!("redis://127.0.0.1:{port}/"))?)
    }

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
        let rec = Recorder::new(spec.workload);
        let client = client(spec)?;
        if spec.index == 0 {
            let con = client.get_multiplexed_async_connection().await?;
            return Ok(Node::sending(
                rec,
                Origin::Redis(RedisOrigin {
                    con,
                    channel: spec.channel.clone(),
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

    pub struct RedisOrigin {
        con: redis::aio::MultiplexedConnection,
        channel: String,
    }

    impl RedisOrigin {
        pub async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
            redis::cmd("PUBLISH")
                .arg(&self.channel)
                .arg(&payload(stamp)[..])
                .query_async::<i64>(&mut self.con)
                .await?;
            Ok(())
        }

        pub async fn burst(&mut self) -> anyhow::Result<u64> {
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
    pub async fn start() -> anyhow::Result<Daemon> {
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

    /// Installs redis-server with apt when it is missing and we are root.
    pub fn ensure_installed() -> bool {
        ensure_package("redis-server", "redis-server")
    }
}

// ---------------------------------------------------------------------------
// The sidecar's HTTP API: POST /v1/invalidate, GET /v1/events (SSE)

mod ht {
    use super::*;
    use futures_util::StreamExt;

    /// Invalidations one throughput POST carries (a JSON array).
    const BURST: usize = 1024;

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
        let rec = Recorder::new(spec.workload);
        let base = format!("http://127.0.0.1:{}", spec.ports[spec.index]);
        let http = reqwest::Client::builder().no_proxy().build()?;
        if spec.index == 0 {
            return Ok(Node::sending(
                rec,
                Origin::Http(HttpOrigin {
                    http,
                    url: format!("{base}/v1/invalidate"),
                }),
            ));
        }
        let resp = http
            .get(format!("{base}/v1/events"))
            .send()
            .await?
            .error_for_status()?;
        let mut body = resp.bytes_stream();
        // A new client's first event is a flush (its caches may hold
        // anything): ready once it came, and it is not counted.
        let mut buf: Vec<u8> = Vec::new();
        let deadline = tokio::time::Instant::now() + STEP;
        while !buf.windows(12).any(|w| w == b"event: flush") {
            let chunk = tokio::time::timeout_at(deadline, body.next())
                .await
                .map_err(|_| anyhow!("no first event from the sidecar"))?
                .context("the event stream ended")??;
            buf.extend_from_slice(&chunk);
        }
        let end = buf
            .windows(2)
            .position(|w| w == b"\n\n")
            .map_or(buf.len(), |p| p + 2);
        buf.drain(..end);
        let r = rec.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(chunk)) = body.next().await {
                buf.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(p) = buf[start..].windows(2).position(|w| w == b"\n\n") {
                    let event = &buf[start..start + p];
                    start += p + 2;
                    record_event(&r, event);
                }
                buf.drain(..start);
            }
        });
        Ok(Node::receiving(rec, task))
    }

    /// One SSE event: its JSON parsed, as an application would.
    fn record_event(rec: &Recorder, event: &[u8]) {
        let Ok(text) = std::str::from_utf8(event) else {
            return;
        };
        let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<Value>(data.trim_start()) else {
            return;
        };
        match v["type"].as_str() {
            Some("invalidate") => {
                if let Some(key) = v["key"].as_str() {
                    rec.record(key.as_bytes());
                }
            }
            Some("flush") => {
                rec.flushes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub struct HttpOrigin {
        http: reqwest::Client,
        url: String,
    }

    impl HttpOrigin {
        async fn post(&self, body: Value) -> anyhow::Result<()> {
            let resp = self.http.post(&self.url).json(&body).send().await?;
            if resp.status() != reqwest::StatusCode::ACCEPTED {
                bail!("POST /v1/invalidate answered {}", resp.status());
            }
            Ok(())
        }

        pub async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
            let key = clock::stamp_hex(stamp);
            let key = std::str::from_utf8(&key)?;
            self.post(json!({"cache": CACHE, "key": key})).await
        }

        pub async fn burst(&mut self) -> anyhow::Result<u64> {
            let items: Vec<Value> = (0..BURST)
                .map(|_| {
                    let key = clock::stamp_hex(clock::now_ns());
                    json!({"cache": CACHE, "key": String::from_utf8_lossy(&key)})
                })
                .collect();
            self.post(Value::Array(items)).await?;
            Ok(BURST as u64)
        }
    }
}

// ---------------------------------------------------------------------------
// NATS core pub/sub

mod nt {
    use super::*;
    use futures_util::StreamExt;

    /// Messages one throughput burst publishes (the client buffers and
    /// writes them in large writes of its own).
    const BURST: usize = 1024;

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
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

    pub struct NatsOrigin {
        client: async_nats::Client,
        subject: String,
    }

    impl NatsOrigin {
        pub async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
            let body = bytes::Bytes::copy_from_slice(&payload(stamp));
            self.client.publish(self.subject.clone(), body).await?;
            Ok(())
        }

        pub async fn burst(&mut self) -> anyhow::Result<u64> {
            for _ in 0..BURST {
                self.one(clock::now_ns()).await?;
            }
            Ok(BURST as u64)
        }
    }

    /// A nats-server of our own on a free loopback port.
    pub async fn start() -> anyhow::Result<Daemon> {
        let port = free_ports(1)?[0];
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nats.conf");
        // As for Redis, subscribers are not cut off mid-run for lagging:
        // the per-connection buffer (64 MB by default) and the write
        // deadline (2 s) are raised.
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\nmax_pending: 1073741824\nwrite_deadline: \"60s\"\n"
            ),
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

    /// Installs nats-server with apt when it is missing and we are root.
    pub fn ensure_installed() -> bool {
        ensure_package("nats-server", "nats-server")
    }
}

// ---------------------------------------------------------------------------
// Raw TCP: length-prefixed frames, no protocol

/// How the raw TCP floor moves its bytes. `Blocking` is the floor the
/// tables show; the others are kept to show that they are not faster.
/// The Tokio runtime of each node process (every system's alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
enum NodeRuntime {
    /// One thread, as `cachecast run` has.
    #[default]
    CurrentThread,
    /// A worker per core.
    MultiThread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
enum RawVariant {
    /// Plain blocking sockets: each receiver a thread blocked in `read`,
    /// the origin's pacing thread writing each frame when it is due.
    #[default]
    Blocking,
    /// Tokio sockets: receivers as tasks, the origin a task woken by the
    /// pacing thread (what cachecast's origin does).
    Async,
    /// Non-blocking sockets polled in a loop by each receiver, the origin
    /// spinning until each due time (two cores kept busy).
    Busy,
}

mod raw {
    use super::*;
    use std::io::{Read, Write};

    /// Frames one throughput burst writes (one write per receiver).
    const BURST: usize = 1024;

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
        if spec.raw == RawVariant::Async {
            return raw_async::setup(spec).await;
        }
        let rec = Recorder::new(spec.workload);
        if spec.index == 0 {
            let socks = connect_all(spec).await?;
            return Ok(Node::sending(
                rec,
                Origin::Raw(RawOrigin {
                    socks,
                    busy: spec.raw == RawVariant::Busy,
                }),
            ));
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", spec.ports[spec.index]))?;
        let r = rec.clone();
        let busy = spec.raw == RawVariant::Busy;
        // The receiving socket, kept to unblock the thread at stop.
        let held: Arc<Mutex<Option<std::net::TcpStream>>> = Arc::default();
        let held_by_thread = held.clone();
        let thread = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut sock, _) = listener.accept()?;
            sock.set_nodelay(true)?;
            sock.set_nonblocking(busy)?;
            *held_by_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock.try_clone()?);
            let mut buf = vec![0u8; 256 * 1024];
            let (mut start, mut end) = (0, 0);
            loop {
                if buf.len() - end < 64 * 1024 {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                match sock.read(&mut buf[end..]) {
                    Ok(0) => return Ok(()),
                    Ok(n) => end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::hint::spin_loop();
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                while end - start >= 4 {
                    let len = u32::from_be_bytes([
                        buf[start],
                        buf[start + 1],
                        buf[start + 2],
                        buf[start + 3],
                    ]) as usize;
                    if end - start < 4 + len {
                        break;
                    }
                    r.record(&buf[start + 4..start + 4 + len]);
                    start += 4 + len;
                }
                if start == end {
                    (start, end) = (0, 0);
                }
            }
        });
        Ok(Node {
            rec,
            origin: None,
            stop: Box::pin(async move {
                if let Some(s) = held.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                // A thread still waiting in accept (the origin never came)
                // is left to the process's end.
                let join = tokio::task::spawn_blocking(move || thread.join());
                let _ = tokio::time::timeout(Duration::from_secs(1), join).await;
            }),
        })
    }

    /// The origin's socket to every receiver (blocking, `TCP_NODELAY`).
    pub(super) async fn connect_all(spec: &NodeSpec) -> anyhow::Result<Vec<std::net::TcpStream>> {
        let mut socks = Vec::new();
        for &port in &spec.ports[1..] {
            socks.push(connect(port).await?);
        }
        Ok(socks)
    }

    /// A socket to a receiver, which may still be starting.
    async fn connect(port: u16) -> anyhow::Result<std::net::TcpStream> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("cannot reach receiver on port {port}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    pub struct RawOrigin {
        socks: Vec<std::net::TcpStream>,
        busy: bool,
    }

    fn frame(buf: &mut Vec<u8>, stamp: u64) {
        let p = payload(stamp);
        buf.extend_from_slice(&(p.len() as u32).to_be_bytes());
        buf.extend_from_slice(&p);
    }

    impl RawOrigin {
        /// The whole workload on one thread of its own, with nothing
        /// between the due time and the write: the paced sends are written
        /// by the thread that waited for them.
        pub async fn drive(&mut self, workload: Workload, t0: u64) -> anyhow::Result<u64> {
            let mut socks: Vec<std::net::TcpStream> = self
                .socks
                .iter()
                .map(|s| s.try_clone())
                .collect::<Result<_, _>>()?;
            let busy = self.busy;
            let sent = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                let mut buf = Vec::with_capacity(BURST * 48);
                match workload {
                    Workload::Latency { rate, secs } => {
                        let total = (rate as f64 * secs) as u64;
                        let interval = 1e9 / rate as f64;
                        // SAFETY: PR_SET_TIMERSLACK takes a plain integer.
                        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64) };
                        for i in 0..total {
                            let due = t0 + (i as f64 * interval) as u64;
                            if busy {
                                while clock::now_ns() < due {
                                    std::hint::spin_loop();
                                }
                            } else {
                                clock::sleep_until(due);
                            }
                            buf.clear();
                            frame(&mut buf, clock::now_ns());
                            for s in &mut socks {
                                s.write_all(&buf)?;
                            }
                        }
                        Ok(total)
                    }
                    Workload::Throughput { secs } => {
                        let end = t0 + (secs * 1e9) as u64;
                        let mut n = 0;
                        while clock::now_ns() < end {
                            buf.clear();
                            for _ in 0..BURST {
                                frame(&mut buf, clock::now_ns());
                            }
                            for s in &mut socks {
                                s.write_all(&buf)?;
                            }
                            n += BURST as u64;
                        }
                        Ok(n)
                    }
                }
            })
            .await??;
            Ok(sent)
        }
    }
}

/// The raw floor on Tokio sockets (`--raw async`): the shape of the
/// other systems' origins and receivers, without their protocols.
mod raw_async {
    use super::*;
    use bytes::{Buf, BytesMut};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    const BURST: usize = 1024;

    pub async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
        let rec = Recorder::new(spec.workload);
        if spec.index == 0 {
            let mut socks = Vec::new();
            for s in raw::connect_all(spec).await? {
                s.set_nonblocking(true)?;
                socks.push(TcpStream::from_std(s)?);
            }
            return Ok(Node::sending(
                rec,
                Origin::RawAsync(RawAsyncOrigin {
                    socks,
                    buf: Vec::with_capacity(BURST * 48),
                }),
            ));
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", spec.ports[spec.index])).await?;
        let r = rec.clone();
        let task = tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let _ = sock.set_nodelay(true);
            let mut buf = BytesMut::with_capacity(256 * 1024);
            loop {
                match sock.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() < 4 + len {
                        break;
                    }
                    r.record(&buf[4..4 + len]);
                    buf.advance(4 + len);
                }
                if buf.capacity() - buf.len() < 64 * 1024 {
                    buf.reserve(256 * 1024);
                }
            }
        });
        Ok(Node::receiving(rec, task))
    }

    pub struct RawAsyncOrigin {
        socks: Vec<TcpStream>,
        buf: Vec<u8>,
    }

    impl RawAsyncOrigin {
        fn frame(&mut self, stamp: u64) {
            let p = payload(stamp);
            self.buf.extend_from_slice(&(p.len() as u32).to_be_bytes());
            self.buf.extend_from_slice(&p);
        }

        async fn write(&mut self) -> anyhow::Result<()> {
            for s in &mut self.socks {
                s.write_all(&self.buf).await?;
            }
            self.buf.clear();
            Ok(())
        }

        pub async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
            self.frame(stamp);
            self.write().await
        }

        pub async fn burst(&mut self) -> anyhow::Result<u64> {
            for _ in 0..BURST {
                self.frame(clock::now_ns());
            }
            self.write().await?;
            Ok(BURST as u64)
        }
    }
}

// ---------------------------------------------------------------------------
// A participant: one node of one run, whatever its system and placement

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
async fn participant(
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
    let node = match spec.system {
        System::Cachecast => cc::setup(spec).await?,
        System::Redis | System::Resp => rd::setup(spec).await?,
        System::Nats => nt::setup(spec).await?,
        System::Http => ht::setup(spec).await?,
        System::Raw => raw::setup(spec).await?,
    };
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
                    // SAFETY: PR_SET_TIMERSLACK takes a plain integer.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64) };
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

// ---------------------------------------------------------------------------
// The driver's side

/// A participant as the driver sees it.
struct Peer {
    lines: tokio::io::Lines<BufReader<Pin<Box<dyn AsyncRead + Send>>>>,
    out: Pin<Box<dyn AsyncWrite + Send>>,
    child: Option<tokio::process::Child>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Peer {
    fn start(spec: NodeSpec, separate: bool) -> anyhow::Result<Peer> {
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

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        say(&mut self.out, line).await
    }

    async fn recv(&mut self, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("no answer within {limit:?}"))??
            .ok_or_else(|| anyhow!("participant ended early"))?;
        if line.starts_with("error ") {
            bail!("{line}");
        }
        Ok(line)
    }

    async fn finish(mut self) {
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

/// What one run measured.
#[derive(Debug)]
struct RunResult {
    latency: Histogram<u64>,
    originated: u64,
    origin_secs: f64,
    delivered: u64,
    /// From the origin's first send to the last delivery anywhere.
    delivery_secs: f64,
    flushes: u64,
    /// Largest VmHWM among the node processes (separate processes only),
    /// and the Redis server's.
    peak_rss_kib: Option<u64>,
    /// User plus system CPU time of every process the system needs (its
    /// nodes, and its server or sidecars), from `start` to the last
    /// receiver's report, and that span (separate processes only).
    cpu_secs: Option<f64>,
    cpu_wall_secs: f64,
}

impl RunResult {
    fn originated_per_s(&self) -> f64 {
        self.originated as f64 / self.origin_secs
    }

    fn delivered_per_s(&self) -> f64 {
        self.delivered as f64 / self.delivery_secs
    }

    /// CPU microseconds per delivered invalidation.
    fn cpu_us_per_delivery(&self) -> Option<f64> {
        let cpu = self.cpu_secs?;
        (self.delivered > 0).then(|| cpu * 1e6 / self.delivered as f64)
    }

    /// CPU time over the run's span, in percent of one core.
    fn cpu_percent(&self) -> Option<f64> {
        let cpu = self.cpu_secs?;
        (self.cpu_wall_secs > 0.0).then(|| cpu * 100.0 / self.cpu_wall_secs)
    }
}

/// Shared by every run of one invocation.
struct Ctx {
    redis: Option<Daemon>,
    nats: Option<Daemon>,
    raw: RawVariant,
    runtime: NodeRuntime,
    secret: bool,
    runs: AtomicU64,
    /// The `cachecast` binary, built once when first needed.
    bin: std::sync::OnceLock<PathBuf>,
}

impl Ctx {
    fn sidecar_bin(&self) -> anyhow::Result<PathBuf> {
        if let Some(b) = self.bin.get() {
            return Ok(b.clone());
        }
        let b = sidecar::binary()?;
        Ok(self.bin.get_or_init(|| b).clone())
    }
}

async fn run(
    ctx: &Ctx,
    buffer: Option<usize>,
    system: System,
    n: usize,
    workload: Workload,
    separate: bool,
) -> anyhow::Result<RunResult> {
    let ports = match system {
        System::Redis | System::Nats => Vec::new(),
        _ => free_ports(n)?,
    };
    // The application's path: one sidecar process per server, each
    // serving the Redis protocol on `ports[i]`.
    let sidecars = match system {
        System::Resp | System::Http => {
            Some(sidecar::Cluster::start(&ctx.sidecar_bin()?, &ports, buffer).await?)
        }
        _ => None,
    };
    // HTTP clients talk to the sidecars' APIs.
    let ports = match &sidecars {
        Some(c) if system == System::Http => c.api.clone(),
        _ => ports,
    };
    let server_pid = match system {
        System::Redis => ctx.redis.as_ref().map(|r| r.pid()),
        System::Nats => ctx.nats.as_ref().map(|r| r.pid()),
        _ => None,
    };
    let channel = format!("bench-{}", ctx.runs.fetch_add(1, Ordering::Relaxed));
    let spec = |index| NodeSpec {
        system,
        index,
        ports: ports.clone(),
        redis_port: ctx.redis.as_ref().map_or(0, |r| r.port),
        nats_port: ctx.nats.as_ref().map_or(0, |r| r.port),
        channel: channel.clone(),
        raw: ctx.raw,
        runtime: ctx.runtime,
        workload,
        buffer,
        secret: ctx.secret,
    };
    // Receivers first, so that they listen before the origin dials.
    let mut peers = Vec::new();
    for index in (0..n).rev() {
        peers.push(Peer::start(spec(index), separate)?);
    }
    peers.reverse();
    let result = async {
        for p in &mut peers {
            let line = p.recv(STEP).await?;
            if line != "ready" {
                bail!("unexpected {line:?}");
            }
        }
        let mut pids: Vec<u32> = peers.iter().filter_map(|p| p.pid()).collect();
        pids.extend(server_pid);
        if let Some(s) = &sidecars {
            pids.extend(s.pids());
        }
        for &pid in &pids {
            reset_peak_rss(pid);
        }
        // CPU is counted per process: in one process the driver's own
        // work would be counted with the nodes'.
        let cpu_start = (separate).then(|| cpu_ticks(&pids)).flatten();
        let wall_start = clock::now_ns();
        for p in &mut peers {
            p.send("start").await?;
        }
        let secs = match workload {
            Workload::Latency { secs, .. } | Workload::Throughput { secs } => secs,
        };
        let sent = peers[0].recv(Duration::from_secs_f64(secs) + STEP).await?;
        let f: Vec<u64> = sent
            .strip_prefix("sent ")
            .context("expected sent")?
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let (originated, t0, t1) = (f[0], f[1], f[2]);
        let mut latency = new_hist();
        let (mut delivered, mut flushes, mut last) = (0, 0, t1);
        for p in &mut peers[1..] {
            p.send(&format!("expect {originated}")).await?;
        }
        for p in &mut peers[1..] {
            let got = p.recv(DRAIN + STEP).await?;
            let mut f = got
                .strip_prefix("got ")
                .context("expected got")?
                .splitn(4, ' ');
            let mut num = || -> anyhow::Result<u64> { Ok(f.next().context("field")?.parse()?) };
            delivered += num()?;
            flushes += num()?;
            last = last.max(num()?);
            hist_from_text(f.next().context("histogram")?, &mut latency)?;
        }
        let cpu_end = cpu_start.and_then(|_| cpu_ticks(&pids));
        let cpu_wall_secs = (clock::now_ns() - wall_start) as f64 / 1e9;
        let cpu_secs = match (cpu_start, cpu_end) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / ticks_per_sec()),
            _ => None,
        };
        let peak_rss_kib = pids
            .iter()
            .filter_map(|&p| proc_status_kib(p, "VmHWM"))
            .max();
        for p in &mut peers {
            p.send("stop").await?;
        }
        for p in &mut peers {
            p.recv(STEP).await?;
        }
        let expected = originated * (n as u64 - 1);
        if delivered < expected || flushes > 0 {
            eprintln!(
                "  note: {} of {expected} deliveries, {flushes} flushes",
                delivered
            );
        }
        Ok(RunResult {
            latency,
            originated,
            origin_secs: (t1 - t0) as f64 / 1e9,
            delivered,
            delivery_secs: (last.max(t1) - t0) as f64 / 1e9,
            flushes,
            peak_rss_kib,
            cpu_secs,
            cpu_wall_secs,
        })
    }
    .await;
    for p in peers {
        p.finish().await;
    }
    drop(sidecars);
    result
}

// ---------------------------------------------------------------------------
// The real sidecar, idle

mod sidecar {
    use super::*;

    /// The `cachecast` binary beside this example (target/release), built
    /// first when cargo runs us, so that it is never stale.
    pub fn binary() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("no target directory")?;
        let bin = dir.join("cachecast");
        if let (Ok(cargo), Ok(manifest)) =
            (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR"))
        {
            let release = dir.file_name().is_some_and(|d| d == "release");
            let mut cmd = std::process::Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "--features",
                "cli",
                "--bin",
                "cachecast",
            ])
            .arg("--manifest-path")
            .arg(Path::new(&manifest).join("Cargo.toml"));
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status()?;
            if !status.success() {
                bail!("cargo build --bin cachecast failed");
            }
        }
        if !bin.exists() {
            bail!(
                "{} not found: cargo build --release --features cli --bin cachecast",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// RSS and peak RSS (KiB) of two sidecars connected to each other and
    /// idle for a while.
    pub async fn idle_rss(bin: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
        let dir = tempfile::tempdir()?;
        let p = free_ports(4)?;
        let mut children = Vec::new();
        for (me, other, api) in [(p[0], p[1], p[2]), (p[1], p[0], p[3])] {
            let conf = dir.path().join(format!("node{me}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "cluster.instance0.hostname = 127.0.0.1\n\
                     cluster.instance0.cache.port = {me}\n\
                     cluster.instance1.hostname = 127.0.0.1\n\
                     cluster.instance1.cache.port = {other}\n\
                     cachecast.bind = 127.0.0.1\n\
                     cachecast.api.port = {api}\n"
                ),
            )?;
            let child = std::process::Command::new(bin)
                .arg("run")
                .arg("--config")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            children.push(Guard(child));
        }
        let result = async {
            let http = reqwest::Client::new();
            let deadline = tokio::time::Instant::now() + STEP;
            for api in [p[2], p[3]] {
                loop {
                    let url = format!("http://127.0.0.1:{api}/v1/status");
                    let up =
                        match http.get(&url).send().await {
                            Ok(r) => r.json::<Value>().await.ok().is_some_and(|v| {
                                v["peers"][0]["connected"].as_bool() == Some(true)
                            }),
                            Err(_) => false,
                        };
                    if up {
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        bail!("the sidecars did not connect");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            // Idle: a few heartbeats go by.
            tokio::time::sleep(Duration::from_secs(2)).await;
            children
                .iter()
                .map(|c| {
                    let pid = c.0.id();
                    Ok((
                        proc_status_kib(pid, "VmRSS").context("VmRSS")?,
                        proc_status_kib(pid, "VmHWM").context("VmHWM")?,
                    ))
                })
                .collect()
        }
        .await;
        drop(children);
        result
    }

    /// `n` sidecars peering with each other, each serving the Redis
    /// protocol on its port of `resp`; stopped (SIGTERM) on drop.
    pub struct Cluster {
        children: Vec<Guard>,
        /// Each sidecar's HTTP API port.
        pub api: Vec<u16>,
        _dir: tempfile::TempDir,
    }

    impl Cluster {
        pub async fn start(
            bin: &Path,
            resp: &[u16],
            buffer: Option<usize>,
        ) -> anyhow::Result<Cluster> {
            let n = resp.len();
            let dir = tempfile::tempdir()?;
            let p = free_ports(2 * n)?;
            let (mesh, api) = p.split_at(n);
            let mut children = Vec::new();
            for i in 0..n {
                let mut text = format!(
                    "cluster.instance0.hostname = 127.0.0.1\n\
                     cluster.instance0.cache.port = {}\n\
                     cachecast.bind = 127.0.0.1\n\
                     cachecast.api.port = {}\n\
                     cachecast.resp.port = {}\n",
                    mesh[i], api[i], resp[i]
                );
                for (k, j) in (1..).zip((0..n).filter(|&j| j != i)) {
                    text.push_str(&format!(
                        "cluster.instance{k}.hostname = 127.0.0.1\ncluster.instance{k}.cache.port = {}\n",
                        mesh[j]
                    ));
                }
                // As Redis runs with no pub/sub output limit here, the
                // sidecars get the largest replay buffer, so that a
                // publisher flat out is measured, not replaced by flushes.
                let b = buffer.unwrap_or(cachecast::config::MAX_BUFFER);
                text.push_str(&format!("cachecast.buffer = {b}\n"));
                let conf = dir.path().join(format!("node{i}.conf"));
                std::fs::write(&conf, text)?;
                let child = std::process::Command::new(bin)
                    .arg("run")
                    .arg("--config")
                    .arg(&conf)
                    .env("RUST_LOG", "error")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?;
                children.push(Guard(child));
            }
            let cluster = Cluster {
                children,
                api: api.to_vec(),
                _dir: dir,
            };
            let http = reqwest::Client::new();
            let deadline = tokio::time::Instant::now() + STEP;
            for &port in api {
                loop {
                    let url = format!("http://127.0.0.1:{port}/v1/status");
                    let up = match http.get(&url).send().await {
                        Ok(r) => r.json::<Value>().await.ok().is_some_and(|v| {
                            v["peers"].as_array().is_some_and(|ps| {
                                ps.iter().all(|p| p["connected"].as_bool() == Some(true))
                            })
                        }),
                        Err(_) => false,
                    };
                    if up {
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        bail!("the sidecars did not connect");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(cluster)
        }

        pub fn pids(&self) -> Vec<u32> {
            self.children.iter().map(|c| c.0.id()).collect()
        }
    }

    struct Guard(std::process::Child);

    impl Drop for Guard {
        fn drop(&mut self) {
            stop_child(&mut self.0);
        }
    }
}

// ---------------------------------------------------------------------------
// Processes and ports

/// Ports free on 127.0.0.1 now (bound, read, released).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A field of /proc/PID/status, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// User plus system CPU time of these processes (all their threads), in
/// clock ticks: fields 14 and 15 of /proc/PID/stat. `None` when one of
/// them is gone.
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    pids.iter().try_fold(0u64, |sum, pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, field 2, may hold spaces: count after its ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(sum + utime + stime)
    })
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// SIGTERM, a grace period, then SIGKILL; always reaped.
fn stop_child(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// An option's value as the command line spells it.
fn arg_name(v: impl clap::ValueEnum) -> Option<String> {
    v.to_possible_value().map(|p| p.get_name().to_owned())
}

/// A server of the bench's own (redis-server, nats-server) on a loopback
/// port, stopped on drop.
struct Daemon {
    port: u16,
    child: std::process::Child,
    /// Its configuration, if it has one.
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    fn new(port: u16, child: std::process::Child, dir: Option<tempfile::TempDir>) -> Daemon {
        Daemon {
            port,
            child,
            _dir: dir,
        }
    }

    /// Waits (at most [`STEP`]) until `probe` says it answers.
    async fn ready<F, Fut>(self, name: &str, mut probe: F) -> anyhow::Result<Daemon>
    where
        F: FnMut(u16) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if probe(self.port).await {
                return Ok(self);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} did not answer on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Whether `program` is there, installing Debian's `package` with apt
/// when it is missing and we are root; says so when it stays missing.
fn ensure_package(program: &str, package: &str) -> bool {
    if on_path(program) {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{program} is missing (apt-get install {package}): skipped");
        return false;
    }
    eprintln!("{program} is missing: apt-get update && apt-get install -y {package}");
    let ok = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"
            ),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok && on_path(program)
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// CPU model, cores and memory, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim())
        })
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

// ---------------------------------------------------------------------------
// Report

/// Everything measured for one system at one size.
#[derive(Default)]
struct Figures {
    latency: Option<RunResult>,
    throughput: Option<RunResult>,
    peak_rss_kib: Option<u64>,
}

impl Figures {
    fn pct(&self, q: f64) -> Option<f64> {
        let h = &self.latency.as_ref()?.latency;
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }

    fn max_us(&self) -> Option<f64> {
        let h = &self.latency.as_ref()?.latency;
        (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
    }

    fn cpu_us_per_delivery(&self) -> Option<f64> {
        self.latency.as_ref()?.cpu_us_per_delivery()
    }

    fn cpu_percent_at_rate(&self) -> Option<f64> {
        self.latency.as_ref()?.cpu_percent()
    }

    fn cpu_us_flat_out(&self) -> Option<f64> {
        self.throughput.as_ref()?.cpu_us_per_delivery()
    }

    fn delivered_per_s(&self) -> Option<f64> {
        Some(self.throughput.as_ref()?.delivered_per_s())
    }

    fn json(&self) -> Value {
        let t = self.throughput.as_ref();
        json!({
            "latency_us": {
                "p50": self.pct(0.5),
                "p99": self.pct(0.99),
                "p999": self.pct(0.999),
                "max": self.max_us(),
            },
            "throughput": {
                "originated_per_s": t.map(|t| t.originated_per_s().round()),
                "delivered_per_s": t.map(|t| t.delivered_per_s().round()),
            },
            "peak_rss_kib": self.peak_rss_kib,
            "cpu_us_per_delivery": self.cpu_us_per_delivery(),
            "cpu_percent_at_rate": self.cpu_percent_at_rate(),
            "cpu_us_per_delivery_flat_out": self.cpu_us_flat_out(),
        })
    }
}

type Results = HashMap<(System, usize), Figures>;

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100_000.0 => {
            let s = format!("{:.0}", v);
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The better of two figures (the lower when `low`), either of which may
/// be missing.
fn better(low: bool, a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if low => Some(a.min(b)),
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

type Metric = fn(&Figures) -> Option<f64>;

/// The rows of every table, and whether lower is better.
fn rows() -> [(&'static str, bool, Metric); 10] {
    [
        ("latency p50 (µs)", true, |f| f.pct(0.5)),
        ("latency p99 (µs)", true, |f| f.pct(0.99)),
        ("latency p99.9 (µs)", true, |f| f.pct(0.999)),
        ("latency max (µs)", true, |f| f.max_us()),
        ("CPU µs / delivery (a)", true, |f| f.cpu_us_per_delivery()),
        ("CPU % of a core (a)", true, |f| f.cpu_percent_at_rate()),
        ("originated/s", false, |f| {
            f.throughput.as_ref().map(|t| t.originated_per_s())
        }),
        ("delivered/s (all peers)", false, |f| f.delivered_per_s()),
        ("CPU µs / delivery (b)", true, |f| f.cpu_us_flat_out()),
        ("peak RSS under (b) (KiB)", true, |f| {
            f.peak_rss_kib.map(|v| v as f64)
        }),
    ]
}

fn print_table(results: &Results, sizes: &[usize], mode: &str) {
    for &n in sizes {
        let get = |s| results.get(&(s, n));
        println!();
        println!(
            "{n} nodes (1 origin, {} receiver{}), {mode}",
            n - 1,
            if n == 2 { "" } else { "s" }
        );
        println!(
            "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
            "", "cachecast", "Redis", "NATS", "raw TCP", "cc/broker", "cc/raw"
        );
        for (name, low, metric) in &rows() {
            let v = |s| get(s).and_then(metric);
            let (c, r, b, w) = (
                v(System::Cachecast),
                v(System::Redis),
                v(System::Nats),
                v(System::Raw),
            );
            // Against the better broker of the two, for this row.
            let broker = better(*low, r, b);
            println!(
                "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
                name,
                fmt_num(c),
                fmt_num(r),
                fmt_num(b),
                fmt_num(w),
                ratio(c, broker),
                ratio(c, w)
            );
        }
        if get(System::Resp).is_none() && get(System::Http).is_none() {
            continue;
        }
        // The application's path: the same Redis clients, through their
        // own sidecars or through one redis-server; NATS clients through
        // one nats-server beside them.
        println!();
        println!(
            "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9}",
            "application's path", "RESP-cc", "HTTP-cc", "Redis", "NATS", "RESP/brk"
        );
        for (name, low, metric) in &rows() {
            let v = |s| get(s).and_then(metric);
            let (a, h, r, b) = (
                v(System::Resp),
                v(System::Http),
                v(System::Redis),
                v(System::Nats),
            );
            let broker = better(*low, r, b);
            println!(
                "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9}",
                name,
                fmt_num(a),
                fmt_num(h),
                fmt_num(r),
                fmt_num(b),
                ratio(a, broker)
            );
        }
    }
    println!();
    println!(
        "(a) at the paced rate, (b) flat out; CPU: user+system time of every process a system needs \
         (nodes, and its server or sidecars); cc/broker: against the better of Redis and NATS"
    );
}

/// The targets of docs/performance.md, shown (not asserted).
fn targets(results: &Results, sizes: &[usize], sidecar: Option<u64>) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let f = |s, n| results.get(&(s, n));
    let Some(&n) = sizes.iter().max() else {
        return out;
    };
    let (c, r, b, w) = (
        f(System::Cachecast, n),
        f(System::Redis, n),
        f(System::Nats, n),
        f(System::Raw, n),
    );
    let us = |x: f64| format!("{x:.1} µs");
    for (q, name, limit) in [(0.5, "p50", 1.15), (0.99, "p99", 1.5)] {
        if let (Some(cv), Some(wv)) = (c.and_then(|c| c.pct(q)), w.and_then(|w| w.pct(q))) {
            out.push((
                cv <= limit * wv,
                format!(
                    "{n} nodes: latency {name} at most {limit}x the raw TCP floor: {} vs {} ({:.2}x)",
                    us(cv),
                    us(wv),
                    cv / wv
                ),
            ));
        }
    }
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let broker = better(true, r.and_then(|r| r.pct(q)), b.and_then(|b| b.pct(q)));
        if let (Some(cv), Some(bv)) = (c.and_then(|c| c.pct(q)), broker) {
            out.push((
                cv <= bv / 2.0,
                format!(
                    "{n} nodes: latency {name} at most half of the better broker's: {} vs {}",
                    us(cv),
                    us(bv)
                ),
            ));
        }
    }
    if let (Some(cv), Some(rv)) = (
        c.and_then(|c| c.cpu_us_per_delivery()),
        r.and_then(|r| r.cpu_us_per_delivery()),
    ) {
        out.push((
            cv <= rv / 2.0,
            format!(
                "{n} nodes: CPU per delivery at the paced rate at most half of Redis's (server and clients): {cv:.2} µs vs {rv:.2} µs"
            ),
        ));
    }
    let broker = better(
        false,
        r.and_then(Figures::delivered_per_s),
        b.and_then(Figures::delivered_per_s),
    );
    if let (Some(cv), Some(bv)) = (c.and_then(Figures::delivered_per_s), broker) {
        out.push((
            cv >= 4.0 * bv,
            format!(
                "{n} nodes: delivered/s at least 4x the better broker's: {} vs {}",
                fmt_num(Some(cv)),
                fmt_num(Some(bv))
            ),
        ));
    }
    if let Some(kib) = sidecar {
        out.push((
            kib < 10 * 1024,
            format!(
                "idle sidecar RSS under 10 MiB: {:.1} MiB",
                kib as f64 / 1024.0
            ),
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// main

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.node {
        let spec: NodeSpec = serde_json::from_str(spec)?;
        let rt = match spec.runtime {
            NodeRuntime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            NodeRuntime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        }
        .enable_all()
        .build()?;
        // Spawned: on the multi-thread runtime it then runs on a worker
        // as in one process (not on this thread, which would add a wakeup
        // to every send).
        let node = rt.spawn(participant(
            spec,
            BufReader::new(tokio::io::stdin()),
            tokio::io::stdout(),
        ));
        let _ = rt.block_on(node);
        // The stdin reader is a blocking thread that would keep the
        // runtime's shutdown waiting.
        rt.shutdown_timeout(Duration::from_millis(100));
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            r = bench(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })
}

/// The workloads of one system at one size.
async fn measure(ctx: &Ctx, args: &Args, system: System, n: usize) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let want = |w: &str| args.workloads.iter().any(|x| x == w);
    let sep = !args.in_process;
    if want("latency") {
        let (rate, secs) = (args.rate, args.secs);
        eprintln!(
            "{} {n} nodes: latency ({rate} /s, {secs} s)",
            system.title()
        );
        let w = Workload::Latency { rate, secs };
        let l = run(ctx, args.buffer, system, n, w, sep).await?;
        eprintln!(
            "  p50 {:.1} µs, p99 {:.1} µs, {} deliveries, {} flushes",
            l.latency.value_at_quantile(0.5) as f64 / 1e3,
            l.latency.value_at_quantile(0.99) as f64 / 1e3,
            l.delivered,
            l.flushes
        );
        figures.latency = Some(l);
    }
    if want("throughput") {
        eprintln!("{} {n} nodes: throughput ({} s)", system.title(), args.secs);
        let w = Workload::Throughput { secs: args.secs };
        let t = run(ctx, args.buffer, system, n, w, sep).await?;
        eprintln!(
            "  originated {:.0}/s, delivered {:.0}/s",
            t.originated_per_s(),
            t.delivered_per_s()
        );
        figures.peak_rss_kib = t.peak_rss_kib;
        figures.throughput = Some(t);
        if !sep && !args.no_memory {
            // Per-node RSS needs a process per node: the same workload,
            // shorter, each node a process.
            eprintln!(
                "{} {n} nodes: peak RSS (each node a process)",
                system.title()
            );
            let w = Workload::Throughput {
                secs: args.secs.min(2.0),
            };
            figures.peak_rss_kib = run(ctx, args.buffer, system, n, w, true)
                .await?
                .peak_rss_kib;
        }
    }
    if args.no_memory {
        figures.peak_rss_kib = None;
    }
    Ok(figures)
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let mut systems = Vec::new();
    for name in &args.only {
        systems.push(match name.as_str() {
            "cachecast" => System::Cachecast,
            "redis" => System::Redis,
            "nats" => System::Nats,
            "raw" | "raw_tcp" => System::Raw,
            "resp" | "cachecast_resp" => System::Resp,
            "http" | "cachecast_http" => System::Http,
            other => bail!("unknown system {other:?} (cachecast, redis, nats, raw, resp, http)"),
        });
    }
    if let Some(&n) = args.nodes.iter().find(|&&n| !(2..=5).contains(&n)) {
        bail!("{n} nodes: between 2 and 5");
    }
    let machine = machine();
    eprintln!("machine: {machine}");
    let redis = if systems.contains(&System::Redis) && rd::ensure_installed() {
        Some(rd::start().await?)
    } else {
        systems.retain(|s| *s != System::Redis);
        None
    };
    let nats = if systems.contains(&System::Nats) && nt::ensure_installed() {
        Some(nt::start().await?)
    } else {
        systems.retain(|s| *s != System::Nats);
        None
    };
    let ctx = Ctx {
        redis,
        nats,
        raw: args.raw,
        runtime: args.runtime,
        secret: args.secret,
        runs: AtomicU64::new(0),
        bin: std::sync::OnceLock::new(),
    };
    let sep = !args.in_process;
    let mut results: Results = HashMap::new();
    for &n in &args.nodes {
        for &system in &systems {
            let figures = measure(&ctx, &args, system, n).await?;
            results.insert((system, n), figures);
        }
    }
    let sidecar = if args.no_memory {
        None
    } else {
        eprintln!("cachecast sidecar: idle RSS of two connected sidecars");
        let bin = ctx.sidecar_bin()?;
        let rss = sidecar::idle_rss(&bin).await?;
        rss.iter().map(|r| r.0).max()
    };
    drop(ctx);
    let size_json = |n: usize| {
        let mut systems_json = serde_json::Map::new();
        for s in [
            System::Cachecast,
            System::Redis,
            System::Nats,
            System::Raw,
            System::Resp,
            System::Http,
        ] {
            if let Some(f) = results.get(&(s, n)) {
                systems_json.insert(s.key().into(), f.json());
            }
        }
        json!({ "systems": systems_json })
    };
    let checks = targets(&results, &args.nodes, sidecar);
    if args.json {
        let mut out = json!({
            "machine": machine,
            "mode": if sep { "processes" } else { "in-process" },
            "secs": args.secs,
            "latency_rate_per_s": args.rate,
            "raw_variant": arg_name(args.raw),
            "node_runtime": arg_name(args.runtime),
            "secret": args.secret,
            "systems": size_json(5)["systems"],
            "two_node": size_json(2),
            "sidecar_idle_rss_kib": sidecar,
            "targets": checks.iter().map(|(ok, what)| json!({"met": ok, "target": what})).collect::<Vec<_>>(),
        });
        if !args.nodes.contains(&5) {
            out["systems"] = json!({});
        }
        if !args.nodes.contains(&2) {
            out["two_node"] = Value::Null;
        }
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
        return Ok(());
    }
    println!("machine: {machine}");
    println!(
        "latency: {} invalidations/s for {} s; throughput: {} s flat out; delivered/s = deliveries at all receivers / time from the first send to the last delivery",
        args.rate, args.secs, args.secs
    );
    let mode = if sep {
        "each node a process"
    } else {
        "all nodes in one process"
    };
    print_table(&results, &args.nodes, mode);
    if let Some(kib) = sidecar {
        println!();
        println!(
            "idle sidecar (cachecast run, 2 connected): RSS {} KiB ({:.1} MiB)",
            kib,
            kib as f64 / 1024.0
        );
    }
    println!();
    println!("targets:");
    for (ok, what) in checks {
        println!("  [{}] {what}", if ok { "met" } else { "MISSED" });
    }
    Ok(())
}
