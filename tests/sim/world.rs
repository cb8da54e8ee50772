//! Runs a plan: real `Mesh` nodes on a `MemoryNetwork`, one thread, paused
//! time, each node's application driven by an RNG of its own seeded from
//! the plan, faults and adversaries on the plan's schedule, then a quiet
//! time in which everything must heal and flow again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use cachecast::config::SecretSource;
use cachecast::mesh::{MemoryStream, Toward};
use cachecast::wire::{
    Batch, FrameCodec, Hello, MAGIC, Message, NONCE_LEN, PROTOCOL_VERSION, Position, Resume,
};
use cachecast::{
    ClusterConfig, Event, Item, MemoryNetwork, Mesh, MeshHandle, NodeAddr, StateFile, Tuning,
};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::codec::{Encoder, Framed};
use tokio_util::sync::CancellationToken;

use crate::check::{ATTACK, Log, Rec, What};
use crate::plan::{Fault, Plan};

/// The caches the applications use.
const CACHES: [&str; 3] = ["c0", "c1", "c2"];

/// When the current run began (for log lines).
pub static STARTED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

pub fn addr(i: usize) -> NodeAddr {
    NodeAddr::new("127.0.0.1", 4001 + i as u16)
}

/// The address of a party on node `i`'s host that is no node.
fn party(i: usize) -> NodeAddr {
    NodeAddr::new("127.0.0.1", 5001 + i as u16)
}

/// One node slot: its current run, if running.
struct Slot {
    run: u32,
    handle: Option<MeshHandle>,
    /// Stops the application's workload.
    app: Option<(CancellationToken, JoinHandle<()>)>,
    reader: Option<JoinHandle<()>>,
    /// The application does not read its events before this.
    stalled_until: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// A run in progress.
pub struct World {
    pub plan: Plan,
    pub log: Log,
    net: MemoryNetwork,
    slots: Vec<Slot>,
    dir: tempfile::TempDir,
    t0: Instant,
    /// Set once the workload must stop.
    quiet: Arc<AtomicBool>,
}

impl World {
    pub fn new(plan: Plan) -> World {
        let slots = (0..plan.nodes)
            .map(|_| Slot {
                run: 0,
                handle: None,
                app: None,
                reader: None,
                stalled_until: Arc::default(),
            })
            .collect();
        World {
            plan,
            log: Log::default(),
            net: MemoryNetwork::new(),
            slots,
            dir: tempfile::tempdir().expect("temporary directory"),
            t0: Instant::now(),
            quiet: Arc::default(),
        }
    }

    pub fn ids(&self) -> Vec<String> {
        (0..self.plan.nodes).map(|i| addr(i).to_string()).collect()
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn note(&self, text: String) {
        self.log.push(self.now(), Rec::Fault(text));
    }

    /// The tuning every node runs with: production timers.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            event_capacity: self.plan.event_capacity,
            jitter_seed: Some(self.plan.seed),
            ..Tuning::default()
        }
    }

    /// Starts node `i`'s next run, with its application.
    async fn start(&mut self, i: usize) {
        if self.slots[i].handle.is_some() {
            return;
        }
        let peers = (0..self.plan.nodes).filter(|&j| j != i).map(addr);
        let mut cfg = ClusterConfig::new(addr(i), peers);
        cfg.buffer = self.plan.buffer;
        if self.plan.secret {
            cfg.secret = Some(SecretSource::Inline("simulated secret".into()));
        }
        let mut b = Mesh::builder(cfg)
            .state_file(StateFile::At(
                self.dir.path().join(format!("node{i}.state")),
            ))
            .tuning(self.tuning())
            .network(self.net.clone());
        let mut events = b.subscribe();
        let handle = match b.start().await {
            Ok(h) => h,
            Err(e) => panic!("node {i} does not start: {e}"),
        };
        let slot = &mut self.slots[i];
        slot.run += 1;
        let run = slot.run;
        self.log.push(
            self.t0.elapsed(),
            Rec::Start {
                node: i,
                run,
                incarnation: handle.incarnation(),
            },
        );
        let (log, t0, stalled) = (self.log.clone(), self.t0, slot.stalled_until.clone());
        slot.reader = Some(tokio::spawn(async move {
            loop {
                let until = *stalled.lock().unwrap();
                if let Some(until) = until {
                    sleep_until(until).await;
                }
                let Some(event) = events.recv().await else {
                    return;
                };
                log.push(
                    t0.elapsed(),
                    Rec::Seen {
                        node: i,
                        run,
                        event,
                    },
                );
            }
        }));
        let stop = CancellationToken::new();
        let rng = StdRng::seed_from_u64(self.plan.seed ^ ((i as u64) << 32) ^ u64::from(run) << 48);
        let app = App {
            node: i,
            run,
            handle: handle.clone(),
            log: self.log.clone(),
            t0: self.t0,
            gap: self.plan.gaps[i],
            rng,
            quiet: self.quiet.clone(),
        };
        let task = tokio::spawn(app.run(stop.clone()));
        slot.app = Some((stop, task));
        slot.handle = Some(handle);
    }

    /// Stops node `i`'s run: at once (`crash`) or gracefully.
    async fn stop(&mut self, i: usize, crash: bool) {
        let Some(handle) = self.slots[i].handle.take() else {
            return;
        };
        if let Some((stop, task)) = self.slots[i].app.take() {
            stop.cancel();
            let _ = task.await;
        }
        let run = self.slots[i].run;
        self.log.push(
            self.now(),
            Rec::Stop {
                node: i,
                run,
                crashed: crash,
            },
        );
        if crash {
            handle.abort().await;
        } else {
            handle.shutdown().await;
        }
        if let Some(reader) = self.slots[i].reader.take() {
            let _ = reader.await;
        }
    }

    /// Runs the plan, the quiet time and the final round; an error says
    /// which node's marker did not reach which other node in time.
    pub async fn run(&mut self) -> Result<(), String> {
        self.t0 = Instant::now();
        *STARTED.lock().unwrap() = Some(self.t0);
        for i in 0..self.plan.nodes {
            self.start(i).await;
        }
        // Primitive steps, by time: a fault with a duration is two.
        let mut steps: Vec<(Duration, Step)> = Vec::new();
        for (at, f) in self.plan.faults.clone() {
            match f {
                Fault::Partition { a, b, lasts } => {
                    steps.push((at, Step::Fault(f)));
                    steps.push((at + lasts, Step::Heal(a, b)));
                }
                Fault::OneWay { from, to, lasts } => {
                    steps.push((at, Step::Fault(f)));
                    steps.push((at + lasts, Step::Heal(from, to)));
                }
                Fault::Crash { node, down } | Fault::Restart { node, down } => {
                    steps.push((at, Step::Fault(f)));
                    steps.push((at + down, Step::Start(node)));
                }
                _ => steps.push((at, Step::Fault(f))),
            }
        }
        steps.retain(|(at, _)| *at < self.plan.active);
        steps.sort_by_key(|(at, _)| *at);
        let mut adversaries = Vec::new();
        for (at, step) in steps {
            sleep_until(self.t0 + at).await;
            match step {
                Step::Heal(a, b) => {
                    self.net.heal(&addr(a), &addr(b));
                    self.note(format!("heal {} and {}", addr(a), addr(b)));
                }
                Step::Start(i) => self.start(i).await,
                Step::Fault(f) => {
                    if let Some(t) = self.fault(f).await {
                        adversaries.push(t);
                    }
                }
            }
        }
        sleep_until(self.t0 + self.plan.active).await;
        // Everything heals; the applications stop changing data.
        self.quiet.store(true, Ordering::SeqCst);
        for t in adversaries {
            t.abort();
        }
        for a in 0..self.plan.nodes {
            for b in 0..self.plan.nodes {
                self.net.heal(&addr(a), &addr(b));
            }
        }
        for s in &self.slots {
            s.stalled_until.lock().unwrap().take();
        }
        for i in 0..self.plan.nodes {
            if let Some((_, task)) = self.slots[i].app.take() {
                let _ = task.await;
            }
            self.start(i).await;
        }
        self.log.push(self.now(), Rec::Quiet);
        sleep(quiet_time(&self.tuning())).await;
        // Everything flows again: one more invalidation from each node
        // reaches every other one as itself, not as a flush.
        let round = self.log.len();
        let mut markers = Vec::new();
        for i in 0..self.plan.nodes {
            let h = self.slots[i].handle.as_ref().expect("running");
            let key = format!("marker.{i}");
            let seq = h
                .invalidate("marker", &key)
                .map_err(|e| format!("marker of node {i}: {e}"))?;
            self.log.push(
                self.now(),
                Rec::Accepted {
                    node: i,
                    run: self.slots[i].run,
                    seq,
                    what: What::Key {
                        cache: "marker".into(),
                        key,
                    },
                },
            );
            markers.push(seq);
        }
        let limit = self.tuning().dead_after;
        let deadline = Instant::now() + limit;
        loop {
            let missing = self.missing_markers(round);
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "liveness: {} after {limit:?} of a healed cluster ({:?} after the heal)",
                    missing.join("; "),
                    quiet_time(&self.tuning())
                ));
            }
            sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// "node j lacks node i's marker", for each such pair.
    fn missing_markers(&self, since: usize) -> Vec<String> {
        let entries = self.log.entries_from(since);
        let mut missing = Vec::new();
        for i in 0..self.plan.nodes {
            let key = format!("marker.{i}");
            for j in (0..self.plan.nodes).filter(|&j| j != i) {
                let got = entries.iter().any(|e| {
                    matches!(&e.rec, Rec::Seen { node, event: Event::Invalidated { key: k, .. }, .. }
                            if *node == j && **k == *key)
                });
                if !got {
                    missing.push(format!("{} lacks the marker of {}", addr(j), addr(i)));
                }
            }
        }
        missing
    }

    /// Ends every run (not logged: the log ends with the check).
    pub async fn finish(&mut self) {
        for s in &mut self.slots {
            if let Some((stop, task)) = s.app.take() {
                stop.cancel();
                let _ = task.await;
            }
            if let Some(h) = s.handle.take() {
                h.abort().await;
            }
        }
    }

    /// Applies a fault; an adversary that goes on is returned as a task.
    async fn fault(&mut self, f: Fault) -> Option<JoinHandle<()>> {
        self.note(format!("{f:?}"));
        match f {
            Fault::Partition { a, b, .. } => self.net.partition(&addr(a), &addr(b)),
            Fault::OneWay { from, to, .. } => self.net.drop_one_way(&addr(from), &addr(to)),
            Fault::Cut { a, b } => self.net.cut(&addr(a), &addr(b)),
            Fault::Crash { node, .. } => self.stop(node, true).await,
            Fault::Restart { node, .. } => self.stop(node, false).await,
            Fault::Jump { by } => {
                self.log.push(
                    self.now(),
                    Rec::Blackout {
                        node: None,
                        lasts: by,
                    },
                );
                tokio::time::advance(by).await;
            }
            Fault::Stall { node, lasts } => {
                self.log.push(
                    self.now(),
                    Rec::Blackout {
                        node: Some(node),
                        lasts,
                    },
                );
                *self.slots[node].stalled_until.lock().unwrap() = Some(Instant::now() + lasts);
            }
            Fault::Claim {
                victim,
                target,
                items,
                tries_for,
            } => {
                let inc = self.slots[victim].handle.as_ref()?.incarnation();
                let claim = Claim {
                    net: self.net.clone(),
                    log: self.log.clone(),
                    t0: self.t0,
                    victim,
                    incarnation: inc,
                    target,
                    items,
                    secret: self.plan.secret,
                    seed: self.plan.seed,
                };
                return Some(tokio::spawn(claim.run(Instant::now() + tries_for)));
            }
            Fault::ForgeAck {
                victim,
                target,
                withhold,
            } => {
                let h = self.slots[victim].handle.clone()?;
                let (net, log, t0) = (self.net.clone(), self.log.clone(), self.t0);
                return Some(tokio::spawn(async move {
                    let (v, t) = (addr(victim), addr(target));
                    net.drop_one_way(&v, &t);
                    sleep(withhold).await;
                    let st = h.status();
                    let ack = Message::Ack(Position {
                        incarnation: st.incarnation,
                        seq: st.last_seq,
                    });
                    let mut buf = BytesMut::new();
                    FrameCodec::new().encode(ack, &mut buf).expect("encode");
                    let put = net.inject(&v, &t, Toward::Dialer, &buf);
                    if put {
                        log.push(
                            t0.elapsed(),
                            Rec::Fault(format!(
                                "{ATTACK}on the path {v} -> {t}: withheld {withhold:?}, forged \
                                 Ack({}) toward {v}",
                                st.last_seq
                            )),
                        );
                    }
                    sleep(Duration::from_millis(5)).await;
                    net.cut(&v, &t);
                    net.heal(&v, &t);
                }));
            }
        }
        None
    }
}

enum Step {
    Fault(Fault),
    Heal(usize, usize),
    Start(usize),
}

/// How long a healed cluster may take to have every link up and every
/// replay done: a silent link is noticed within `dead_after`, a redial
/// waits at most the backoff's cap (plus its jitter), and a dial and its
/// handshake take at most `connect_timeout` and `hello_timeout`; twice
/// that, for a dial that began just before the heal.
pub fn quiet_time(t: &Tuning) -> Duration {
    (t.dead_after + t.backoff_cap.mul_f64(1.2) + t.connect_timeout + t.hello_timeout) * 2
}

/// One node's application.
struct App {
    node: usize,
    run: u32,
    handle: MeshHandle,
    log: Log,
    t0: Instant,
    gap: Duration,
    rng: StdRng,
    quiet: Arc<AtomicBool>,
}

impl App {
    async fn run(mut self, stop: CancellationToken) {
        let mut k = 0u64;
        loop {
            // Busy for a while, then idle for a while: an idle origin is
            // where a missing invalidation shows (no later one to reveal a
            // gap).
            let busy = Instant::now() + Duration::from_millis(self.rng.random_range(500..10_000));
            while Instant::now() < busy {
                let gap = self.gap.mul_f64(self.rng.random_range(0.0..2.0));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sleep(gap) => {}
                }
                if self.quiet.load(Ordering::SeqCst) {
                    return;
                }
                self.act(&mut k).await;
            }
            let idle = Duration::from_millis(self.rng.random_range(1_000..20_000));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sleep(idle) => {}
            }
        }
    }

    fn key(&mut self, k: &mut u64) -> Item {
        *k += 1;
        Item::Key {
            cache: CACHES[self.rng.random_range(0..CACHES.len())].into(),
            key: format!("{}.{}.{}", self.node, self.run, k).into(),
        }
    }

    fn accepted(&self, seq: u64, item: &Item) {
        let what = match item {
            Item::Key { cache, key } => What::Key {
                cache: cache.to_string(),
                key: key.to_string(),
            },
            Item::Cache { cache } => What::Cache {
                cache: cache.to_string(),
            },
            Item::Flush => What::Flush,
        };
        self.log.push(
            self.t0.elapsed(),
            Rec::Accepted {
                node: self.node,
                run: self.run,
                seq,
                what,
            },
        );
    }

    async fn act(&mut self, k: &mut u64) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..75 => {
                let item = self.key(k);
                if let Ok(seq) = self.handle.send(item.clone()) {
                    self.accepted(seq, &item);
                }
            }
            75..78 => {
                let n = self.rng.random_range(20..2000);
                let items: Vec<Item> = (0..n).map(|_| self.key(k)).collect();
                if let Ok((first, _)) = self.handle.send_all(items.clone()) {
                    for (i, item) in items.iter().enumerate() {
                        self.accepted(first + i as u64, item);
                    }
                }
            }
            78..88 => {
                let item = Item::Cache {
                    cache: CACHES[self.rng.random_range(0..CACHES.len())].into(),
                };
                if let Ok(seq) = self.handle.send(item.clone()) {
                    self.accepted(seq, &item);
                }
            }
            88..90 => {
                if let Ok(seq) = self.handle.send(Item::Flush) {
                    self.accepted(seq, &Item::Flush);
                }
            }
            _ => {
                // As `?wait=` does: sent, then the acks waited for.
                let item = self.key(k);
                if let Ok(seq) = self.handle.send(item.clone()) {
                    self.accepted(seq, &item);
                    let wait = Duration::from_millis(self.rng.random_range(10..500));
                    let _ = self.handle.wait_acked(seq, wait).await;
                }
            }
        }
    }
}

/// A party on the victim's host claiming the victim's identity.
struct Claim {
    net: MemoryNetwork,
    log: Log,
    t0: Instant,
    victim: usize,
    incarnation: u64,
    target: usize,
    items: usize,
    secret: bool,
    seed: u64,
}

impl Claim {
    async fn run(self, until: Instant) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0xc1a1);
        let (me, victim, target) = (party(self.victim), addr(self.victim), addr(self.target));
        while Instant::now() < until {
            if let Some(at) = self.attempt(&me, &victim, &target, &mut rng).await {
                self.log.push(
                    self.t0.elapsed(),
                    Rec::Fault(format!(
                        "{ATTACK}a party on {victim}'s host, claiming {victim}, had {target} apply {} \
                         invalidations of its own at seqs {}..={}",
                        self.items,
                        at,
                        at + self.items as u64 - 1
                    )),
                );
                return;
            }
            sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        }
    }

    /// One try; the first seq it had applied, if it got that far.
    async fn attempt(
        &self,
        me: &NodeAddr,
        victim: &NodeAddr,
        target: &NodeAddr,
        rng: &mut StdRng,
    ) -> Option<u64> {
        let stream = self
            .net
            .dial(me, target, Duration::from_secs(2))
            .await
            .ok()?;
        let mut framed = Framed::new(stream, FrameCodec::new());
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: victim.to_string(),
            incarnation: self.incarnation,
            nonce,
            last_applied: None,
            auth: self.secret,
        };
        framed.send(Message::Hello(hello)).await.ok()?;
        let Some(Message::Hello(_)) = next_frame(&mut framed).await else {
            return None;
        };
        if self.secret {
            // It cannot prove the secret; it tries anyway.
            framed.send(Message::Auth { mac: [0; 32] }).await.ok()?;
            let _ = next_frame(&mut framed).await;
            return None;
        }
        let Some(Message::Resume(r)) = next_frame(&mut framed).await else {
            return None;
        };
        let at = r
            .last_applied
            .filter(|p| p.incarnation == self.incarnation)
            .map_or(0, |p| p.seq)
            + 1;
        framed
            .send(Message::Resume(Resume {
                last_applied: None,
                digest: [0; 16],
            }))
            .await
            .ok()?;
        let items = (0..self.items)
            .map(|k| Item::Key {
                cache: CACHES[k % CACHES.len()].into(),
                key: format!("forged.{k}").into(),
            })
            .collect();
        framed
            .send(Message::Batch(Batch {
                first_seq: at,
                items,
            }))
            .await
            .ok()?;
        // Its acknowledgement says it was applied.
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, framed.next()).await {
            if matches!(m, Message::Ack(_)) {
                return Some(at);
            }
        }
        None
    }
}

/// The next frame within 2 s, if any.
async fn next_frame(f: &mut Framed<MemoryStream, FrameCodec>) -> Option<Message> {
    match timeout(Duration::from_secs(2), f.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        _ => None,
    }
}
