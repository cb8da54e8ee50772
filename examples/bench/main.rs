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
//!   delivered invalidation and in percent of a core, and the server
//!   side's share (the Redis or NATS server, or the sidecars);
//! - wake-ups: voluntary context switches of the same processes (every
//!   thread's, from /proc/PID/task/*/status) per delivered invalidation,
//!   and the server side's: each is a thread that slept and was woken;
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
//!
//! The bench's files, by concern:
//! - `main.rs`: the command line, the driver (every system at every size,
//!   each workload a run of its own) and what it prints;
//! - `participant.rs`: a node of one run and the line protocol between it
//!   and the driver, both ends;
//! - `systems/`: each system's nodes (`cachecast.rs`, `redis.rs` also for
//!   `resp`, `nats.rs`, `http.rs`, `raw.rs`, `raw_async.rs`) and the real
//!   sidecars (`sidecar.rs`);
//! - `stats.rs`: what a receiver records, CPU and memory from /proc, and
//!   the figures of a run;
//! - `report.rs`: the tables and the targets;
//! - `host.rs`: ports, the servers of the bench's own, child processes,
//!   programs on the PATH (a missing redis-server or nats-server is reported
//!   and its rows skipped: `examples/bench.sh` installs them), the machine;
//! - `clock.rs`: the monotonic clock, stamps and pacing;
//! - `network.rs`: the network between servers (`--link-delay`), a relay
//!   that holds every byte crossing from one server to another;
//! - `wakeup-delays.sh`: runs the bench under `perf sched` and prints how
//!   long each node's and sidecar's threads waited for a CPU once woken,
//!   and how often onto an idle one (where the tails come from).

mod clock;
mod host;
mod network;
mod participant;
mod report;
mod stats;
mod systems;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::BufReader;

use crate::host::{Daemon, free_ports, machine};
use crate::participant::{NodeRuntime, NodeSpec, Peer, Workload, participant};
use crate::report::{Results, arg_name, print_table, targets};
use crate::stats::{
    Figures, RunResult, Usage, hist_from_text, new_hist, proc_status_kib, reset_peak_rss,
};
use crate::systems::raw::RawVariant;
use crate::systems::{System, sidecar};

/// The cache name every invalidation carries (a typical DHIS 2 one).
pub(crate) const CACHE: &str = "org.hisp.dhis.user.User";
/// How long receivers wait for the last deliveries once the origin stopped.
pub(crate) const DRAIN: Duration = Duration::from_secs(20);
/// Bound of any single step of the line protocol (setup, stop).
pub(crate) const STEP: Duration = Duration::from_secs(30);

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
    /// Models the network between servers: every byte from one server to
    /// another (node to node, sidecar to sidecar, a client to the Redis or
    /// NATS server, a host of its own) is held this long each way by a
    /// relay (e.g. 100us; 0 runs the relay with no delay, to show its own
    /// cost). Without it, servers talk over loopback directly.
    #[arg(long, value_parser = network::parse_delay)]
    link_delay: Option<Duration>,
    /// How long a cachecast library node gathers acks before writing one
    /// (`Tuning::ack_delay`; default 1ms; 0 acks every batch at once): to
    /// show what coalesced acks do to the tail.
    #[arg(long, value_parser = network::parse_delay)]
    ack_delay: Option<Duration>,
    /// Internal: run one participant, described in JSON, over stdin/stdout.
    #[arg(long, hide = true)]
    node: Option<String>,
}

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

/// Every system asked for at every size, then the report: the tables, or
/// one JSON object with `--json`.
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
    let redis = if systems.contains(&System::Redis) && systems::redis::installed() {
        Some(systems::redis::start().await?)
    } else {
        systems.retain(|s| *s != System::Redis);
        None
    };
    let nats = if systems.contains(&System::Nats) && systems::nats::installed() {
        Some(systems::nats::start().await?)
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
        link_delay: args.link_delay,
        ack_delay: args.ack_delay,
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
            "ack_delay_us": args.ack_delay.map(|d| d.as_micros() as u64),
            "link_delay_us": args.link_delay.map(|d| d.as_secs_f64() * 1e6),
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
    match args.link_delay {
        Some(d) => println!(
            "network: every byte between servers held {} µs each way by a relay (a client's Redis or NATS server is a host of its own)",
            d.as_secs_f64() * 1e6
        ),
        None => println!("network: none (servers talk over loopback directly)"),
    }
    if let Some(d) = args.ack_delay {
        println!(
            "cachecast library nodes' ack delay: {} µs (default 1000)",
            d.as_micros()
        );
    }
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

/// Shared by every run of one invocation.
struct Ctx {
    redis: Option<Daemon>,
    nats: Option<Daemon>,
    raw: RawVariant,
    runtime: NodeRuntime,
    secret: bool,
    link_delay: Option<Duration>,
    ack_delay: Option<Duration>,
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

/// One run of `workload` on `n` nodes of `system`, each node a process of
/// its own when `separate`.
async fn run(
    ctx: &Ctx,
    buffer: Option<usize>,
    system: System,
    n: usize,
    workload: Workload,
    separate: bool,
) -> anyhow::Result<RunResult> {
    // The wire between servers, when modelled: relays, dropped (no
    // longer accepting) at the end of the run.
    let mut net = network::Network::default();
    // Where each server's node (or sidecar) is reached from the others,
    // and where it listens: a relay between the two when the network is
    // modelled, else one port.
    let mut mesh = || -> anyhow::Result<(Vec<u16>, Vec<u16>)> {
        let reached = free_ports(n)?;
        let Some(delay) = ctx.link_delay else {
            return Ok((reached.clone(), reached));
        };
        let binds = free_ports(n)?;
        for (&r, &b) in reached.iter().zip(&binds) {
            net.relay(r, b, delay)?;
        }
        Ok((reached, binds))
    };
    let (mut ports, mut binds) = (Vec::new(), Vec::new());
    let mut sidecars = None;
    match system {
        System::Redis | System::Nats => {}
        System::Cachecast | System::Raw => (ports, binds) = mesh()?,
        // The application's path: one sidecar process per server, each
        // serving the Redis protocol on `ports[i]` (on its server: no
        // relay), the sidecars peering across the network.
        System::Resp | System::Http => {
            let (reached, listen) = mesh()?;
            ports = free_ports(n)?;
            let bin = ctx.sidecar_bin()?;
            sidecars =
                Some(sidecar::Cluster::start(&bin, &ports, &reached, &listen, buffer).await?);
        }
    }
    // The Redis and NATS servers are hosts of their own: every client
    // reaches them across the network.
    let mut server_port = |port: u16| -> anyhow::Result<u16> {
        match ctx.link_delay {
            Some(delay) => net.relay(0, port, delay),
            None => Ok(port),
        }
    };
    let redis_port = match (&ctx.redis, system) {
        (Some(r), System::Redis) => server_port(r.port)?,
        _ => 0,
    };
    let nats_port = match (&ctx.nats, system) {
        (Some(r), System::Nats) => server_port(r.port)?,
        _ => 0,
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
        binds: binds.clone(),
        redis_port,
        nats_port,
        channel: channel.clone(),
        raw: ctx.raw,
        runtime: ctx.runtime,
        workload,
        buffer,
        secret: ctx.secret,
        ack_delay_us: ctx.ack_delay.map(|d| d.as_micros() as u64),
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
        // The server side: the Redis or NATS server, or the sidecars.
        let server: Vec<u32> = server_pid
            .into_iter()
            .chain(sidecars.iter().flat_map(|s| s.pids()))
            .collect();
        let mut pids: Vec<u32> = peers.iter().filter_map(|p| p.pid()).collect();
        pids.extend(&server);
        for &pid in &pids {
            reset_peak_rss(pid);
        }
        // CPU and wake-ups are counted per process: in one process the
        // driver's own work would be counted with the nodes'.
        let start = separate.then(|| (Usage::now(&pids), Usage::now(&server)));
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
        let (used, server_used) = match start {
            Some((all, srv)) => (Usage::since(all, &pids), Usage::since(srv, &server)),
            None => (None, None),
        };
        let cpu_wall_secs = (clock::now_ns() - wall_start) as f64 / 1e9;
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
            cpu_wall_secs,
            used,
            server_used,
        })
    }
    .await;
    for p in peers {
        p.finish().await;
    }
    drop(sidecars);
    drop(net);
    result
}
