//! Test harness: N real nodes on loopback (ephemeral ports), an event
//! recorder per node, and a fault-injecting TCP proxy.
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod procs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast::{ClusterConfig, Event, Mesh, MeshHandle, NodeAddr, StateFile, Tuning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Everything one node received, in order.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
    changed: Arc<Notify>,
}

impl Recorder {
    /// A recorder and the callback that feeds it.
    pub fn new() -> (Recorder, impl Fn(&Event) + Send + Sync + 'static) {
        let r = Recorder::default();
        let r2 = r.clone();
        let f = move |e: &Event| {
            r2.events.lock().unwrap().push(e.clone());
            r2.changed.notify_waiters();
        };
        (r, f)
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// Waits until `pred` holds over the events, or panics after `limit`.
    pub async fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&[Event]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if pred(&self.events.lock().unwrap()) {
                return;
            }
            // Also re-check now and then, for conditions on other state.
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = notified => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let evs = self.events.lock().unwrap();
                    panic!("timed out after {limit:?} waiting for {what}; {} events, last: {:?}", evs.len(), evs.iter().rev().take(5).collect::<Vec<_>>());
                }
            }
        }
    }

    /// Invalidation sequence numbers received from `origin`, in order.
    pub fn seqs_from(&self, origin: &str) -> Vec<u64> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Invalidated { origin: o, seq, .. }
                | Event::CacheCleared { origin: o, seq, .. }
                    if &**o == origin =>
                {
                    Some(*seq)
                }
                _ => None,
            })
            .collect()
    }

    pub fn flushes(&self) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Flush { .. }))
            .count()
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| pred(e))
            .count()
    }
}

/// Checks the guarantee on one receiver's event log for one origin whose
/// invalidations were numbered 1..=last: every number arrives, in order,
/// once, unless a flush came in its place. Returns (missing, flushes).
pub fn check_no_silent_gap(events: &[Event], origin: &str, last: u64) -> (u64, usize) {
    let mut applied = 0u64;
    let mut covered = false;
    let mut missing = 0;
    let mut flushes = 0;
    for e in events {
        match e {
            Event::Flush { origin: o, .. } if o.as_deref().is_none_or(|o| o == origin) => {
                covered = true;
                flushes += 1;
            }
            Event::Invalidated { origin: o, seq, .. }
            | Event::CacheCleared { origin: o, seq, .. }
                if &**o == origin =>
            {
                assert!(
                    *seq > applied,
                    "{seq} arrived after {applied}: duplicate or out of order"
                );
                if *seq > applied + 1 {
                    assert!(
                        covered,
                        "silent gap: {} to {} never arrived and no flush came",
                        applied + 1,
                        seq - 1
                    );
                    missing += seq - applied - 1;
                }
                applied = *seq;
                covered = false;
            }
            _ => {}
        }
    }
    if applied < last {
        assert!(
            covered,
            "silent gap at the end: {} to {last} never arrived",
            applied + 1
        );
        missing += last - applied;
    }
    (missing, flushes)
}

/// Test tuning: the defaults, with a larger event buffer.
pub fn tuning() -> Tuning {
    Tuning {
        event_capacity: 1 << 16,
        ..Tuning::default()
    }
}

pub fn node(port: u16) -> NodeAddr {
    NodeAddr::new("127.0.0.1", port)
}

/// A change to node `i`'s configuration, made before it starts.
pub type Customize = Arc<dyn Fn(usize, &mut ClusterConfig) + Send + Sync>;

/// A cluster of nodes on loopback.
pub struct Cluster {
    pub ports: Vec<u16>,
    pub nodes: Vec<Option<MeshHandle>>,
    pub recorders: Vec<Recorder>,
    pub buffer: usize,
    pub tuning: Tuning,
    /// `via[(from, to)]`: node `from` dials node `to` at this address.
    pub via: HashMap<(usize, usize), SocketAddr>,
    /// Changes node `i`'s configuration before it starts.
    pub customize: Option<Customize>,
}

/// Binds a listener on an ephemeral loopback port.
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

impl Cluster {
    /// Reserves `n` ports (the listeners stay bound), starts nothing yet.
    pub async fn reserve(n: usize) -> (Cluster, Vec<TcpListener>) {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(bind().await);
        }
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let c = Cluster {
            ports,
            nodes: (0..n).map(|_| None).collect(),
            recorders: (0..n).map(|_| Recorder::default()).collect(),
            buffer: 65_536,
            tuning: tuning(),
            via: HashMap::new(),
            customize: None,
        };
        (c, listeners)
    }

    /// Starts `n` nodes, all connected to each other.
    pub async fn start(n: usize) -> Cluster {
        let (mut c, listeners) = Cluster::reserve(n).await;
        for (i, l) in listeners.into_iter().enumerate() {
            c.start_node(i, Some(l)).await;
        }
        c
    }

    pub fn id(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    pub fn config(&self, i: usize) -> ClusterConfig {
        let peers = (0..self.ports.len())
            .filter(|&j| j != i)
            .map(|j| node(self.ports[j]));
        let mut c = ClusterConfig::new(node(self.ports[i]), peers);
        c.bind = SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
        c.buffer = self.buffer;
        // Tests that need one set a path of their own.
        c.state_file = StateFile::Off;
        if let Some(f) = &self.customize {
            f(i, &mut c);
        }
        c
    }

    /// Starts the reserved nodes with `from`'s link to `to` through a new
    /// proxy, waits up to `limit` for the cluster to connect, and returns
    /// the proxy.
    pub async fn start_through_proxy(
        &mut self,
        listeners: Vec<TcpListener>,
        (from, to): (usize, usize),
        limit: Duration,
    ) -> Proxy {
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], self.ports[to]))).await;
        self.via.insert((from, to), proxy.addr);
        for (i, l) in listeners.into_iter().enumerate() {
            self.start_node(i, Some(l)).await;
        }
        self.wait_connected(limit).await;
        proxy
    }

    /// Starts (or restarts) node `i`, on `listener` or on its port.
    pub async fn start_node(&mut self, i: usize, listener: Option<TcpListener>) -> &MeshHandle {
        match self.try_start_node(i, listener).await {
            Ok(()) => self.nodes[i].as_ref().unwrap(),
            Err(e) => panic!("start node {i}: {e}"),
        }
    }

    /// Starts node `i`, or says why it cannot.
    pub async fn try_start_node(
        &mut self,
        i: usize,
        listener: Option<TcpListener>,
    ) -> Result<(), cachecast::mesh::StartError> {
        let listener = match listener {
            Some(l) => l,
            None => rebind(self.ports[i]).await,
        };
        let (recorder, callback) = Recorder::new();
        let mut b = Mesh::builder(self.config(i))
            .tuning(self.tuning.clone())
            .listener(listener)
            .on_event(callback);
        for (&(from, to), &addr) in &self.via {
            if from == i {
                b = b.connect_via(node(self.ports[to]), addr);
            }
        }
        let handle = b.start().await?;
        self.recorders[i] = recorder;
        self.nodes[i] = Some(handle);
        Ok(())
    }

    pub fn h(&self, i: usize) -> &MeshHandle {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Waits until every running node sees every other running node up.
    pub async fn wait_connected(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let all = self.nodes.iter().flatten().all(|h| {
                let st = h.status();
                st.peers.iter().all(|p| {
                    let running = self.nodes.iter().flatten().any(|o| **o.node() == *p.id);
                    !running || p.connected
                })
            });
            if all {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let links: Vec<String> = self
                    .nodes
                    .iter()
                    .flatten()
                    .flat_map(|h| {
                        let st = h.status();
                        st.peers.into_iter().map(move |p| {
                            format!(
                                "{} -> {}: out {} in {} ({:?}; {:?})",
                                st.node, p.id, p.outbound, p.inbound, p.last_error, st.counters
                            )
                        })
                    })
                    .collect();
                panic!(
                    "cluster not connected within {limit:?}:\n{}",
                    links.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown_all(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(h) = n.take() {
                h.shutdown().await;
            }
        }
    }
}

/// Listens on `port` again, for a node restarted on its port. The port
/// was free a moment ago, but the system may hand it to another socket
/// meanwhile (an outgoing connection's source port, on a machine this
/// busy): tried again for a while, then a failure that says so.
pub async fn rebind(port: u16) -> TcpListener {
    let start = tokio::time::Instant::now();
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < LONG_REBIND =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebind 127.0.0.1:{port} after {:?}: {e}", start.elapsed()),
        }
    }
}

/// How long [`rebind`] waits for a port to be free again.
const LONG_REBIND: Duration = Duration::from_secs(10);

/// The one polling helper: runs `probe` every 10 ms until it gives `Ok`,
/// and returns what it gave; after `limit`, panics naming `what` and what
/// the last probe said. For a wait on an event, not a sleep: the bound only
/// says how long a broken run takes to fail.
pub async fn eventually<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for a condition: polls `cond` until it holds; returns how
/// long it took (exact under paused time).
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    eventually(
        what,
        limit,
        async || {
            if cond() { Ok(()) } else { Err("not yet") }
        },
    )
    .await;
    start.elapsed()
}

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Pass everything.
    Forward = 0,
    /// Keep the sockets but pass nothing (a half-open link).
    Stall = 1,
}

/// A TCP proxy between two nodes that can cut, stall or corrupt the link.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub target: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped to close every current connection.
    cut: Arc<tokio::sync::watch::Sender<u64>>,
    /// Bytes still to drop from the client-to-server direction.
    drop_bytes: Arc<AtomicU64>,
    /// Bytes to write to every current client, as if its server sent them
    /// (an on-path party injecting frames).
    inject: tokio::sync::broadcast::Sender<Vec<u8>>,
    pub connections: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = bind().await;
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Forward as u8));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cut = Arc::new(cut);
        let drop_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (inject, _) = tokio::sync::broadcast::channel::<Vec<u8>>(16);
        let (m, c, d, n, i) = (
            mode.clone(),
            cut.clone(),
            drop_bytes.clone(),
            connections.clone(),
            inject.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(
                    cr,
                    sw,
                    m.clone(),
                    c.subscribe(),
                    Some(d.clone()),
                    None,
                ));
                tokio::spawn(pump(
                    sr,
                    cw,
                    m.clone(),
                    c.subscribe(),
                    None,
                    Some(i.subscribe()),
                ));
            }
        });
        Proxy {
            addr,
            target,
            mode,
            cut,
            drop_bytes,
            inject,
            connections,
        }
    }

    /// Writes `bytes` to every current client (the dialer), whatever the
    /// mode: frames forged on the path.
    pub fn inject_to_dialer(&self, bytes: Vec<u8>) {
        let _ = self.inject.send(bytes);
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Closes every connection through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Drops the next `n` bytes going from dialer to acceptor.
    pub fn drop_next(&self, n: u64) {
        self.drop_bytes.store(n, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    mut cut: tokio::sync::watch::Receiver<u64>,
    drop_bytes: Option<Arc<AtomicU64>>,
    mut inject: Option<tokio::sync::broadcast::Receiver<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let injected =
        async |inject: &mut Option<tokio::sync::broadcast::Receiver<Vec<u8>>>| match inject {
            Some(rx) => rx.recv().await.ok(),
            None => std::future::pending().await,
        };
    // A cut comes first, whatever else is ready: a cut while stalled must
    // lose what the stall held, not forward it once the mode is Forward
    // again (the test cuts, then sets Forward at once).
    loop {
        if cut.has_changed().unwrap_or(true) {
            return;
        }
        if mode.load(Ordering::SeqCst) == Mode::Stall as u8 {
            tokio::select! {
                biased;
                _ = cut.changed() => return,
                Some(bytes) = injected(&mut inject) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(5)) => continue,
            }
            continue;
        }
        // A close is held back while stalled too: a silent link stays
        // open at the far end, as a crash across a network leaves it.
        let n = tokio::select! {
            biased;
            _ = cut.changed() => return,
            r = from.read(&mut buf) => r.unwrap_or(0),
            Some(bytes) = injected(&mut inject) => {
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // Stalled while this read waited: what it got is held too.
        while mode.load(Ordering::SeqCst) == Mode::Stall as u8 {
            tokio::select! {
                biased;
                _ = cut.changed() => return,
                Some(bytes) = injected(&mut inject) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        if n == 0 || cut.has_changed().unwrap_or(true) {
            return;
        }
        let mut data = &buf[..n];
        if let Some(d) = &drop_bytes {
            let want = d.load(Ordering::SeqCst);
            if want > 0 {
                let k = want.min(data.len() as u64);
                d.fetch_sub(k, Ordering::SeqCst);
                data = &data[k as usize..];
            }
        }
        if to.write_all(data).await.is_err() {
            return;
        }
    }
}
