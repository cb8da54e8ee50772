//! `cachecast demo`: three nodes in one process on loopback, showing
//! delivery, latency, a crash with replay and flush, and a clean restart.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Notify;

use cachecast::config::{ClusterConfig, NodeAddr};
use cachecast::mesh::{Event, Mesh, MeshHandle};

const NAMES: [&str; 3] = ["A", "B", "C"];

/// Shared between the demo and the nodes' callbacks.
struct Board {
    start: Instant,
    /// When each (origin, seq) was sent.
    sent: Mutex<HashMap<(String, u64), Instant>>,
    log: Mutex<Vec<(usize, Event, Option<Duration>)>>,
    changed: Notify,
}

/// A lock whose holder panicked still guards consistent data here (each
/// critical section is one push or lookup): it is taken anyway.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Board {
    fn record(&self, node: usize, event: &Event) {
        let latency = match event {
            Event::Invalidated { origin, seq, .. } | Event::CacheCleared { origin, seq, .. } => {
                locked(&self.sent)
                    .get(&(origin.to_string(), *seq))
                    .map(|t| t.elapsed())
            }
            _ => None,
        };
        locked(&self.log).push((node, event.clone(), latency));
        self.changed.notify_waiters();
    }

    fn elapsed(&self) -> String {
        format!("[{:>7.3}s]", self.start.elapsed().as_secs_f64())
    }
}

struct Demo {
    board: Arc<Board>,
    ports: Vec<u16>,
    nodes: Vec<Option<MeshHandle>>,
    out: Box<dyn Write + Send>,
    /// How many log entries were printed already.
    printed: usize,
}

impl Demo {
    fn name_of(&self, id: &str) -> &'static str {
        self.ports
            .iter()
            .position(|p| id.ends_with(&format!(":{p}")))
            .map_or("?", |i| NAMES[i])
    }

    async fn start_node(&mut self, i: usize, listener: Option<TcpListener>) -> anyhow::Result<()> {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(("127.0.0.1", self.ports[i])).await?,
        };
        let me = NodeAddr::new("127.0.0.1", self.ports[i]);
        let peers = (0..3)
            .filter(|&j| j != i)
            .map(|j| NodeAddr::new("127.0.0.1", self.ports[j]));
        let mut config = ClusterConfig::new(me, peers);
        config.bind = SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
        // The demo's nodes live for a second and leave nothing behind; its
        // crash is seen by peers that were connected, which flush by
        // themselves (a state file covers a crash nobody saw).
        config.state_file = cachecast::config::StateFile::Off;
        let board = self.board.clone();
        let handle = Mesh::builder(config)
            .listener(listener)
            .on_event(move |e| board.record(i, e))
            .start()
            .await?;
        writeln!(
            self.out,
            "{} node {} up at {} (incarnation {:016x})",
            self.board.elapsed(),
            NAMES[i],
            handle.node(),
            handle.incarnation()
        )?;
        self.nodes[i] = Some(handle);
        Ok(())
    }

    fn node(&self, i: usize) -> anyhow::Result<&MeshHandle> {
        self.nodes[i]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("node {} is not running", NAMES[i]))
    }

    fn send(&self, i: usize, cache: &str, key: &str) -> anyhow::Result<u64> {
        let h = self.node(i)?;
        // Record the time under the lock before sending, so the receiver's
        // callback always finds it.
        let mut sent = locked(&self.board.sent);
        let seq = h.invalidate(cache, key)?;
        sent.insert((h.node().to_string(), seq), Instant::now());
        Ok(seq)
    }

    /// Waits until `pred` holds over the event log (at most `limit`).
    async fn wait(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[(usize, Event, Option<Duration>)]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.board.changed.notified();
            if pred(&locked(&self.board.log)) {
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => anyhow::bail!("timed out waiting for {what}"),
            }
        }
    }

    /// Prints the events logged since the last call, except the bulk ones.
    fn print_new(&mut self, verbose_invalidations: bool) -> anyhow::Result<()> {
        let log = locked(&self.board.log).clone();
        for (node, event, latency) in &log[self.printed..] {
            let at = NAMES[*node];
            let line = match event {
                Event::Invalidated {
                    origin,
                    seq,
                    cache,
                    key,
                } if verbose_invalidations => Some(format!(
                    "{at} <- {} #{seq}: drop {cache}[{key}]{}",
                    self.name_of(origin),
                    latency
                        .map(|l| format!("   ({} µs after it was sent)", l.as_micros()))
                        .unwrap_or_default()
                )),
                Event::CacheCleared { origin, seq, cache } if verbose_invalidations => {
                    Some(format!(
                        "{at} <- {} #{seq}: clear all of {cache}",
                        self.name_of(origin)
                    ))
                }
                Event::Invalidated { .. } | Event::CacheCleared { .. } => None,
                Event::Flush { origin, reason } => Some(format!(
                    "{at}: FLUSH every cache ({}{reason})",
                    origin
                        .as_deref()
                        .map(|o| format!("{}: ", self.name_of(o)))
                        .unwrap_or_default()
                )),
                Event::PeerUp { peer } => Some(format!("{at}: peer {} up", self.name_of(peer))),
                Event::PeerDown { peer, reason } => {
                    Some(format!("{at}: peer {} down ({reason})", self.name_of(peer)))
                }
                // Kinds of events a later version may add.
                _ => None,
            };
            if let Some(line) = line {
                self.note(line)?;
            }
        }
        self.printed = log.len();
        Ok(())
    }

    fn say(&mut self, text: &str) -> anyhow::Result<()> {
        writeln!(self.out, "\n{} {text}", self.board.elapsed())?;
        Ok(())
    }

    /// A line under the current scene, at the board's time.
    fn note(&mut self, text: impl std::fmt::Display) -> anyhow::Result<()> {
        writeln!(self.out, "{}   {text}", self.board.elapsed())?;
        Ok(())
    }

    fn all_up(&self) -> bool {
        self.nodes
            .iter()
            .flatten()
            .all(|h| h.status().peers.iter().all(|p| p.connected))
    }

    async fn wait_all_up(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.all_up() {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the nodes did not connect within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

fn count(log: &[(usize, Event, Option<Duration>)], pred: impl Fn(usize, &Event) -> bool) -> usize {
    log.iter().filter(|(n, e, _)| pred(*n, e)).count()
}

/// Runs the demo, printing to `out`; ends by itself within seconds.
pub(crate) async fn run(out: Box<dyn Write + Send>) -> anyhow::Result<()> {
    let mut d = Demo::start(out).await?;
    d.each_node_invalidates().await?;
    let paced = d.steady_trickle().await?;
    d.burst().await?;
    d.crash_and_replay().await?;
    let flushes_before = d.flushes();
    d.graceful_restart().await?;
    d.summary(paced, flushes_before).await
}

impl Demo {
    /// Three nodes on loopback ports, all connected.
    async fn start(out: Box<dyn Write + Send>) -> anyhow::Result<Demo> {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = Demo {
            board: Arc::new(Board {
                start: Instant::now(),
                sent: Mutex::new(HashMap::new()),
                log: Mutex::new(Vec::new()),
                changed: Notify::new(),
            }),
            ports,
            nodes: vec![None, None, None],
            out,
            printed: 0,
        };
        writeln!(
            d.out,
            "cachecast demo: three nodes (A, B, C) in this process, on loopback ports"
        )?;
        for (i, l) in listeners.into_iter().enumerate() {
            d.start_node(i, Some(l)).await?;
        }
        d.wait_all_up().await?;
        d.print_new(true)?;
        Ok(d)
    }

    /// Scene 1: one invalidation from each node, and a whole cache.
    async fn each_node_invalidates(&mut self) -> anyhow::Result<()> {
        self.say("Each node invalidates an entry; the others are told at once:")?;
        let entries = [
            ("org.hisp.dhis.user.User", "42"),
            ("org.hisp.dhis.dataelement.DataElement", "fbfJHSPpUQD"),
            (
                "org.hisp.dhis.organisationunit.OrganisationUnit",
                "ImspTQPwCqd",
            ),
        ];
        for (i, (cache, key)) in entries.iter().enumerate() {
            self.send(i, cache, key)?;
            self.wait("delivery", Duration::from_secs(5), |log| {
                count(
                    log,
                    |_, e| matches!(e, Event::Invalidated { key: k, .. } if &**k == *key),
                ) == 2
            })
            .await?;
        }
        self.node(1)?
            .invalidate_cache("org.hisp.dhis.option.OptionSet")?;
        self.wait("cache cleared", Duration::from_secs(5), |log| {
            count(log, |_, e| matches!(e, Event::CacheCleared { .. })) == 2
        })
        .await?;
        self.print_new(true)
    }

    /// Scene 2: 300 invalidations paced at 1,000/s; returns the one-way
    /// latencies of their 600 deliveries (µs, sorted).
    async fn steady_trickle(&mut self) -> anyhow::Result<Vec<u64>> {
        self.say("A steady trickle: 300 invalidations from A, one every millisecond ...")?;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for k in 0..300 {
            tick.tick().await;
            self.send(0, "org.hisp.dhis.user.User", &format!("paced-{k}"))?;
        }
        self.wait("the trickle", Duration::from_secs(10), |log| {
            count(
                log,
                |_, e| matches!(e, Event::Invalidated { key, .. } if key.starts_with("paced-")),
            ) == 600
        })
        .await?;
        let mut paced: Vec<u64> = locked(&self.board.log)
            .iter()
            .filter(
                |(_, e, _)| matches!(e, Event::Invalidated { key, .. } if key.starts_with("paced-")),
            )
            .filter_map(|(_, _, l)| l.map(|l| l.as_micros() as u64))
            .collect();
        paced.sort_unstable();
        let (p50, p99, max) = (pct(&paced, 0.5), pct(&paced, 0.99), pct(&paced, 1.0));
        self.print_new(false)?;
        self.note(format_args!(
            "600 deliveries; one-way latency p50 {p50} µs, p99 {p99} µs, max {max} µs"
        ))?;
        Ok(paced)
    }

    /// Scene 3: 10,000 invalidations from each node at once.
    async fn burst(&mut self) -> anyhow::Result<()> {
        self.say("A burst: 10,000 invalidations from each node at once ...")?;
        let before = locked(&self.board.log).len();
        let burst = Instant::now();
        for k in 0..10_000 {
            for i in 0..3 {
                self.send(i, "org.hisp.dhis.user.User", &format!("burst-{k}"))?;
            }
        }
        self.wait("the burst", Duration::from_secs(30), |log| {
            log.len() >= before + 60_000
        })
        .await?;
        let took = burst.elapsed();
        self.print_new(false)?;
        writeln!(
            self.out,
            "{}   60,000 deliveries in {:.1} ms ({:.0} per second)",
            self.board.elapsed(),
            took.as_secs_f64() * 1e3,
            60_000.0 / took.as_secs_f64()
        )?;
        Ok(())
    }

    /// Scene 4: C crashes, A invalidates meanwhile, C restarts: replay to
    /// C, a flush at A and B.
    async fn crash_and_replay(&mut self) -> anyhow::Result<()> {
        self.say("C crashes (no goodbye); A keeps invalidating while C is away:")?;
        if let Some(c) = self.nodes[2].take() {
            c.abort().await;
        }
        self.wait("peer down", Duration::from_secs(5), |log| {
            count(log, |n, e| n == 0 && matches!(e, Event::PeerDown { .. })) >= 1
        })
        .await?;
        self.print_new(true)?;
        for k in 0..REPLAYED {
            self.send(
                0,
                "org.hisp.dhis.user.User",
                &format!("while-C-was-down-{k}"),
            )?;
        }
        let queued = self.node(0)?.status().peers[1].queued;
        self.note(format_args!(
            "A holds {queued} invalidations for C in its replay buffer"
        ))?;
        self.say("C restarts (a new incarnation):")?;
        self.start_node(2, None).await?;
        self.wait_all_up().await?;
        self.wait("the replay", Duration::from_secs(5), |log| {
            count(log, |n, e| {
                n == 2 && matches!(e, Event::Invalidated { key, .. } if key.starts_with("while-C"))
            }) == REPLAYED as usize
        })
        .await?;
        self.wait("the flushes", Duration::from_secs(5), |log| {
            count(log, |_, e| matches!(e, Event::Flush { .. })) >= 2
        })
        .await?;
        self.print_new(true)?;
        self.note(format_args!(
            "C got what it missed by replay; A and B flushed, since C may have \
             sent something just before it crashed that never arrived"
        ))?;
        Ok(())
    }

    /// Scene 5: B restarts gracefully; nobody flushes.
    async fn graceful_restart(&mut self) -> anyhow::Result<()> {
        self.say("B restarts gracefully (goodbye): no flush anywhere")?;
        if let Some(b) = self.nodes[1].take() {
            b.shutdown().await;
        }
        self.start_node(1, None).await?;
        self.wait_all_up().await?;
        self.send(1, "org.hisp.dhis.user.User", "after-clean-restart")?;
        self.wait("delivery", Duration::from_secs(5), |log| {
            count(
                log,
                |_, e| matches!(e, Event::Invalidated { key, .. } if &**key == "after-clean-restart"),
            ) == 2
        })
        .await?;
        self.print_new(true)
    }

    /// Flushes seen so far, at every node.
    fn flushes(&self) -> usize {
        count(&locked(&self.board.log), |_, e| {
            matches!(e, Event::Flush { .. })
        })
    }

    /// The figures, checked (a graceful restart must not flush), and the
    /// nodes stopped.
    async fn summary(mut self, paced: Vec<u64>, flushes_before: usize) -> anyhow::Result<()> {
        let log = locked(&self.board.log).clone();
        let flushes = count(&log, |_, e| matches!(e, Event::Flush { .. }));
        if flushes != flushes_before {
            anyhow::bail!("a graceful restart caused a flush");
        }
        let (p50, p99) = (pct(&paced, 0.5), pct(&paced, 0.99));
        let delivered = count(&log, |_, e| {
            matches!(e, Event::Invalidated { .. } | Event::CacheCleared { .. })
        });
        self.say("Summary")?;
        writeln!(
            self.out,
            "  delivered {delivered} invalidations; one-way latency at 1,000/s: p50 {p50} µs, \
             p99 {p99} µs (three nodes and this printer share one process)"
        )?;
        writeln!(
            self.out,
            "  crash of C: {} flushes at its peers, {} invalidations replayed to it; \
             graceful restart of B: 0 flushes",
            flushes, REPLAYED
        )?;
        for h in self.nodes.iter_mut().filter_map(Option::take) {
            h.shutdown().await;
        }
        writeln!(self.out, "demo finished")?;
        Ok(())
    }
}

/// Invalidations A makes while C is down, replayed to C.
const REPLAYED: u64 = 5;

/// The `p` quantile of sorted values (0 when empty).
fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0)
}
