//! Starting a node: its options, the shared state, the tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::transport::Transport;
use super::{
    Admission, AppSide, Callback, Event, Events, Fanout, Lifecycle, MeshHandle, OutLog, PeerId,
    PeerInfo, PeerStats, Shared, StartError, Stats, Tuning, fanout, inbound, limits, lock,
    outbound, peer, state, transport,
};
use crate::auth::Secret;
use crate::config::{ClusterConfig, NodeAddr, StateFile};
use crate::tls::Tls;

/// Starts nodes.
pub struct Mesh;

impl Mesh {
    /// Binds `config.bind` and starts the node with default tuning.
    pub async fn start(config: ClusterConfig) -> Result<MeshHandle, StartError> {
        Self::builder(config).start().await
    }

    /// A node to start with more options.
    pub fn builder(config: ClusterConfig) -> MeshBuilder {
        MeshBuilder {
            config,
            tuning: Tuning::default(),
            listener: None,
            connect_via: HashMap::new(),
            callbacks: Vec::new(),
            fanout: None,
            transport: None,
        }
    }
}

/// Options of a node before it starts; see [`Mesh::builder`].
#[must_use = "a builder starts nothing until `start()` is awaited"]
pub struct MeshBuilder {
    pub(crate) config: ClusterConfig,
    pub(crate) tuning: Tuning,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) connect_via: HashMap<NodeAddr, SocketAddr>,
    pub(crate) callbacks: Vec<Callback>,
    /// The event channel, once [`MeshBuilder::subscribe`] made it.
    pub(crate) fanout: Option<Fanout>,
    /// How it reaches its peers, when not over TCP.
    pub(crate) transport: Option<Arc<dyn Transport>>,
}

impl MeshBuilder {
    /// Registers a callback before the node starts, so that it sees every
    /// event from the first (see [`MeshHandle::on_event`]).
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(f));
        self
    }

    /// Timers and bounds (set them before [`MeshBuilder::subscribe`]:
    /// streams taken before keep the event capacity they were made with).
    pub fn tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// A stream of every event from the node's first, taken before it
    /// starts: what arrives between [`MeshBuilder::start`] and a later
    /// [`MeshHandle::subscribe`] would reach no stream (its origin is still
    /// told it was applied). See [`MeshHandle::subscribe`].
    #[must_use = "events are only kept for a stream that is read"]
    pub fn subscribe(&mut self) -> Events {
        let (events, bytes) = (self.tuning.event_capacity, self.tuning.event_bytes);
        self.fanout
            .get_or_insert_with(|| Fanout::new(events, bytes))
            .subscribe()
    }

    /// Accept peers on this already-bound listener instead of binding
    /// `config.bind` (tests bind port 0 first, to learn the port).
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Joins an in-memory network instead of TCP (tests): the node binds
    /// nothing, is reached under its identity, and reaches its peers
    /// through `network`, which the test can partition and cut. TLS is not
    /// used there; a shared secret is.
    #[cfg(feature = "test-util")]
    pub fn network(mut self, network: super::MemoryNetwork) -> Self {
        self.transport = Some(Arc::new(network));
        self
    }

    /// Whether and where this node keeps its state file, in place of what
    /// the configuration says. A node must have one or say it does not:
    /// [`StateFile::Default`] in both makes [`MeshBuilder::start`] fail, so
    /// that no embedder loses invalidations after a crash without having
    /// chosen to (see [`StateFile`]).
    pub fn state_file(mut self, state_file: StateFile) -> Self {
        self.config.state_file = state_file;
        self
    }

    /// Dial `peer` at `addr` instead of its configured address (a proxy or
    /// port mapping in between); its identity stays `peer`.
    pub fn connect_via(mut self, peer: NodeAddr, addr: SocketAddr) -> Self {
        self.connect_via.insert(peer, addr);
        self
    }

    /// Starts the node: binds (unless given a listener), then spawns the
    /// listener task and one link task per peer.
    pub async fn start(self) -> Result<MeshHandle, StartError> {
        let MeshBuilder {
            config,
            tuning,
            listener,
            connect_via,
            callbacks,
            fanout,
            transport,
        } = self;
        let fanout =
            fanout.unwrap_or_else(|| Fanout::new(tuning.event_capacity, tuning.event_bytes));
        if config.state_file == StateFile::Default {
            return Err(StartError::StateFileUnchosen);
        }
        let shared = build_shared(config, tuning, connect_via, callbacks, fanout, transport)?;
        if let Some(path) = shared.config.state_file.path() {
            let state_err = |e: std::io::Error| StartError::State {
                path: path.to_path_buf(),
                source: e,
            };
            *lock(&shared.life.state_lock) = Some(state::lock(path).map_err(state_err)?);
            let previous = state::read(path).map_err(state_err)?;
            let incarnation = lock(&shared.out).incarnation();
            if let Some(p) = previous.filter(|p| !p.clean) {
                // Whatever that run invalidated may never have arrived.
                warn!(
                    previous = format_args!("{:016x}", p.incarnation),
                    "the previous run did not end cleanly: peers that did not see it end are told to flush"
                );
                lock(&shared.out).open_with_flush(p.incarnation);
                shared.stats.originated.fetch_add(1, Ordering::Relaxed);
            }
            state::write_async(path, incarnation, false)
                .await
                .map_err(state_err)?;
        }
        let incoming = shared
            .transport
            .listen(&shared.config.node, shared.config.bind, listener)
            .await?;
        let local = match &incoming {
            inbound::Incoming::Tcp(l) => l.local_addr().ok(),
            #[cfg(feature = "test-util")]
            inbound::Incoming::Memory(_) => None,
        };
        info!(
            node = %shared.me,
            incarnation = format_args!("{:016x}", lock(&shared.out).incarnation()),
            listen = ?local,
            peers = shared.peers.len(),
            "mesh started"
        );
        let tracker = TaskTracker::new();
        // One dispatch task per peer runs the application's callbacks and
        // feeds the streams, outside the tracker: it ends once every task
        // in it has and what they queued is handed out; then the streams
        // end too.
        {
            let done = CancellationToken::new();
            let dispatchers = TaskTracker::new();
            for peer in 0..shared.peers.len() {
                dispatchers.spawn(fanout::dispatch(shared.clone(), peer, done.clone()));
            }
            dispatchers.close();
            let (tracker, fanout) = (tracker.clone(), shared.app.fanout.clone());
            tokio::spawn(async move {
                tracker.wait().await;
                done.cancel();
                dispatchers.wait().await;
                fanout.finish();
            });
        }
        // Peers' names are looked up at once, off the accept loop.
        {
            let allowlist = shared.admission.allowlist.clone();
            tracker.spawn(async move { allowlist.resolve_first().await });
        }
        tracker.spawn(inbound::accept_loop(
            shared.clone(),
            incoming,
            tracker.clone(),
        ));
        for peer in 0..shared.peers.len() {
            tracker.spawn(outbound::link::run(shared.clone(), peer));
        }
        Ok(MeshHandle {
            shared,
            tracker,
            local_addr: local,
        })
    }
}

/// The node's shared state, before any task runs (also used by the fuzz
/// harness, which drives one connection with no listener or links).
pub(crate) fn build_shared(
    config: ClusterConfig,
    tuning: Tuning,
    connect_via: HashMap<NodeAddr, SocketAddr>,
    callbacks: Vec<Callback>,
    fanout: Fanout,
    transport: Option<Arc<dyn Transport>>,
) -> Result<Arc<Shared>, StartError> {
    if config.peers.len() >= crate::config::MAX_INSTANCES {
        return Err(StartError::TooManyPeers {
            peers: config.peers.len(),
            max: crate::config::MAX_INSTANCES - 1,
        });
    }
    let secret = config.secret.as_ref().map(Secret::load).transpose()?;
    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    if let Some(problem) = tls.as_ref().and_then(Tls::warning) {
        warn!("{problem}");
    }
    let transport = transport.unwrap_or_else(|| Arc::new(transport::Tcp { tls: tls.clone() }));
    let incarnation: u64 = rand::random();
    let me: PeerId = Arc::from(config.node.to_string());
    let peers: Vec<PeerInfo> = config
        .peers
        .iter()
        .map(|p| {
            let id: PeerId = Arc::from(p.addr.to_string());
            PeerInfo {
                state: Mutex::new(peer::PeerState::new(id.clone())),
                id,
                addr: p.addr.clone(),
                dial: connect_via.get(&p.addr).copied(),
                notify: Notify::new(),
                redial: Notify::new(),
                reached: AtomicU64::new(0),
                acked: watch::channel(0).0,
                stats: PeerStats::default(),
                turn: Mutex::new(()),
                held_back: Mutex::new(None),
                // Room for two full batches at least, so that one batch
                // never collapses by itself.
                events: fanout::PeerQueue::new(
                    tuning.event_capacity.max(2 * crate::wire::MAX_BATCH_ITEMS),
                    tuning.event_bytes,
                ),
            }
        })
        .collect();
    Ok(Arc::new(Shared {
        me,
        out: Mutex::new(OutLog::new(
            incarnation,
            peers.len(),
            config.buffer,
            tuning.buffer_bytes,
        )),
        peers,
        stats: Stats::default(),
        app: AppSide {
            fanout,
            callbacks: RwLock::new(Arc::new(callbacks)),
            callbacks_gen: AtomicU64::new(0),
        },
        admission: Admission {
            conn_limit: Arc::new(Semaphore::new(tuning.max_connections.max(1))),
            secret,
            tls,
            allowlist: Arc::new(limits::Allowlist::new(
                config.peers.iter().map(|p| p.addr.clone()).collect(),
            )),
            per_ip: limits::PerIp::default(),
            reject_log: limits::LogLimiter::new(20, Duration::from_secs(60)),
            duplicate_log: limits::LogLimiter::new(1, Duration::from_secs(60)),
        },
        life: Lifecycle {
            aborted: AtomicBool::new(false),
            token: CancellationToken::new(),
            shutdown_at: std::sync::OnceLock::new(),
            state_lock: Mutex::new(None),
        },
        transport,
        tuning,
        config,
    }))
}

/// Drives one inbound connection through the acceptor's handshake and
/// session, with `input` as everything the other side sends (the fuzz
/// harness's entry). The input is written and the pipe closed, so every
/// read ends at once and no deadline is waited for. The first byte picks
/// whether this node has a shared secret.
#[cfg(feature = "fuzz")]
pub fn fuzz_acceptor(input: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let (flags, bytes) = input.split_first().map_or((0, input), |(f, b)| (*f, b));
    let mut config = ClusterConfig::new(
        NodeAddr::new("127.0.0.1", 1),
        [NodeAddr::new("127.0.0.1", 2), NodeAddr::new("localhost", 3)],
    );
    config.buffer = 16;
    if flags & 1 == 1 {
        config.secret = Some(crate::config::SecretSource::Inline(
            "fuzzing-secret-0123456789".into(),
        ));
    }
    let tuning = Tuning {
        hello_timeout: Duration::from_millis(200),
        dead_after: Duration::from_millis(200),
        ..Tuning::default()
    };
    let fanout = Fanout::new(tuning.event_capacity, tuning.event_bytes);
    let Ok(shared) = build_shared(config, tuning, HashMap::new(), Vec::new(), fanout, None) else {
        return;
    };
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let Some(slot) = shared.admission.per_ip.enter(ip) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + shared.tuning.hello_timeout;
        let server = super::io::Io::Memory(super::memory::MemoryStream::plain(server));
        let serve = inbound::conn::serve_io(&shared, server, None, None, deadline, slot);
        let talk = async {
            let _ = client.write_all(bytes).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        tokio::join!(serve, talk);
    });
}
