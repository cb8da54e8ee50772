//! How nodes reach each other ([`Transport`]): TCP (with TLS when
//! configured) in production, or an in-memory network that tests drive:
//! partitions, one-way drops and cuts, with every timer of the mesh under
//! `tokio::time::pause()`, so that heartbeats, dead-peer detection,
//! backoff and replay are tested deterministically and fast. The tasks
//! above it only move bytes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::inbound::Incoming;
use super::io::Io;
use super::limits::lookup;
use super::outbound::link::LinkError;
use super::{PeerInfo, Shared, StartError};
use crate::config::NodeAddr;

/// A connection being made, with the handshake's deadline.
pub(crate) type Dialing<'a> =
    Pin<Box<dyn Future<Output = Result<(Io, Instant), LinkError>> + Send + 'a>>;

/// Where inbound connections will come from, once set up.
pub(crate) type Listening<'a> =
    Pin<Box<dyn Future<Output = Result<Incoming, StartError>> + Send + 'a>>;

/// How a node reaches its peers and is reached by them.
pub(crate) trait Transport: Send + Sync {
    /// Connects to `peer` (its name resolved afresh), TLS included where
    /// this transport has it; with the deadline of the handshake that
    /// follows, counted from the connection.
    fn dial<'a>(&'a self, shared: &'a Shared, peer: &'a PeerInfo) -> Dialing<'a>;

    /// Starts accepting, on `listener` when given.
    fn listen<'a>(&'a self, shared: &'a Shared, listener: Option<TcpListener>) -> Listening<'a>;
}

/// TCP, with mutual TLS when configured.
pub(crate) struct Tcp;

impl Transport for Tcp {
    fn dial<'a>(&'a self, shared: &'a Shared, peer: &'a PeerInfo) -> Dialing<'a> {
        Box::pin(tcp_transport(shared, peer))
    }

    fn listen<'a>(&'a self, shared: &'a Shared, listener: Option<TcpListener>) -> Listening<'a> {
        Box::pin(async move {
            let listener = match listener {
                Some(l) => l,
                None => TcpListener::bind(shared.config.bind)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: shared.config.bind,
                        source,
                    })?,
            };
            Ok(Incoming::Tcp(listener))
        })
    }
}

impl Transport for MemoryNetwork {
    fn dial<'a>(&'a self, shared: &'a Shared, peer: &'a PeerInfo) -> Dialing<'a> {
        Box::pin(async move {
            let s = self
                .connect(
                    &shared.config.node,
                    &peer.addr,
                    shared.tuning.connect_timeout,
                )
                .await
                .map_err(|e| LinkError::Connect(format!("{}: {e}", peer.addr)))?;
            Ok((Io::Memory(s), Instant::now() + shared.tuning.hello_timeout))
        })
    }

    fn listen<'a>(&'a self, shared: &'a Shared, _: Option<TcpListener>) -> Listening<'a> {
        Box::pin(async move { Ok(Incoming::Memory(self.listen_as(&shared.config.node))) })
    }
}

/// Dials the peer over TCP (resolving its name afresh), with TLS when
/// configured; with the handshake's deadline, counted from the TCP
/// connection.
async fn tcp_transport(shared: &Shared, info: &PeerInfo) -> Result<(Io, Instant), LinkError> {
    let stream = match info.dial {
        Some(via) => timeout(shared.tuning.connect_timeout, TcpStream::connect(via))
            .await
            .map_err(|_| LinkError::Connect(format!("{via}: no answer")))?
            .map_err(|e| LinkError::Connect(format!("{via}: {e}")))?,
        None => dial(&info.addr, shared.tuning.connect_timeout).await?,
    };
    // Latency matters more than packet count; writes are batched anyway.
    stream.set_nodelay(true)?;
    let hello_timeout = shared.tuning.hello_timeout;
    let deadline = Instant::now() + hello_timeout;
    let Some(tls) = &shared.tls else {
        return Ok((Io::Plain(stream), deadline));
    };
    match timeout_at(deadline, tls.connect(&info.addr.host, stream)).await {
        Ok(Ok(s)) => Ok((Io::Client(Box::new(s)), deadline)),
        Ok(Err(e)) => Err(LinkError::Tls(format!(
            "TLS handshake with {} failed: {e} (does it have cachecast.tls configured, with a certificate from the same CA naming {}?)",
            info.addr, info.addr.host
        ))),
        Err(_) => Err(LinkError::HelloTimeout(hello_timeout)),
    }
}

/// Connects to the first address of `addr` that answers.
async fn dial(addr: &NodeAddr, connect_timeout: Duration) -> Result<TcpStream, LinkError> {
    let addrs = lookup(&addr.host, addr.port)
        .await
        .map_err(|e| LinkError::Connect(format!("cannot resolve {}: {e}", addr.host)))?;
    let mut last = format!("{} resolves to no address", addr.host);
    for a in addrs {
        match timeout(connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within {connect_timeout:?}"),
        }
    }
    Err(LinkError::Connect(last))
}

/// Bytes buffered in each direction of an in-memory connection.
const PIPE_BYTES: usize = 256 * 1024;

/// One direction of the in-memory links between two nodes: whether its
/// bytes are dropped silently (no reset, no end of stream), as on a path
/// where a firewall drops packets.
#[derive(Debug, Default)]
struct Direction {
    silent: AtomicBool,
}

/// An in-memory network of nodes, for tests: each node joins it under its
/// identity (see `MeshBuilder::network`), and the test cuts, silences and
/// heals the paths between them. Cheap to clone; clones share the network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Net>>,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Net {
    /// Nodes accepting connections, by identity.
    listening: HashMap<String, mpsc::UnboundedSender<(MemoryStream, SocketAddr)>>,
    /// Each direction (from, to) between two nodes.
    directions: HashMap<(String, String), Arc<Direction>>,
    /// Every connection made, by its (dialer, acceptor), to cut them.
    open: HashMap<(String, String), Vec<CancellationToken>>,
    /// Connection attempts, by (dialer, acceptor).
    attempts: HashMap<(String, String), u64>,
}

impl Net {
    fn direction(&mut self, from: &str, to: &str) -> Arc<Direction> {
        self.directions
            .entry((from.to_string(), to.to_string()))
            .or_default()
            .clone()
    }
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the bytes from `from` to `to` silently, on open connections
    /// and new ones (a new connection from `from` to `to` is not answered).
    pub fn drop_one_way(&self, from: &NodeAddr, to: &NodeAddr) {
        let d = self.lock().direction(&from.to_string(), &to.to_string());
        d.silent.store(true, Ordering::SeqCst);
    }

    /// Silences both directions between `a` and `b`.
    pub fn partition(&self, a: &NodeAddr, b: &NodeAddr) {
        self.drop_one_way(a, b);
        self.drop_one_way(b, a);
    }

    /// Lets everything between `a` and `b` through again.
    pub fn heal(&self, a: &NodeAddr, b: &NodeAddr) {
        let mut net = self.lock();
        for (x, y) in [(a, b), (b, a)] {
            let d = net.direction(&x.to_string(), &y.to_string());
            d.silent.store(false, Ordering::SeqCst);
        }
    }

    /// Resets every open connection between `a` and `b` (either side
    /// sees an error at once, as after a TCP reset).
    pub fn cut(&self, a: &NodeAddr, b: &NodeAddr) {
        let mut net = self.lock();
        for key in [
            (a.to_string(), b.to_string()),
            (b.to_string(), a.to_string()),
        ] {
            for reset in net.open.remove(&key).unwrap_or_default() {
                reset.cancel();
            }
        }
    }

    /// How many times `from` tried to connect to `to`.
    pub fn attempts(&self, from: &NodeAddr, to: &NodeAddr) -> u64 {
        let key = (from.to_string(), to.to_string());
        self.lock().attempts.get(&key).copied().unwrap_or(0)
    }

    /// `node` accepts connections from now on.
    pub(crate) fn listen_as(
        &self,
        node: &NodeAddr,
    ) -> mpsc::UnboundedReceiver<(MemoryStream, SocketAddr)> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().listening.insert(node.to_string(), tx);
        rx
    }

    /// Connects `from` to `to`: refused at once when nobody listens there;
    /// while the path is silent, the attempt is repeated as TCP resends
    /// its SYN (after 1 s, then 2 s, …) until `timeout`.
    pub(crate) async fn connect(
        &self,
        from: &NodeAddr,
        to: &NodeAddr,
        timeout: Duration,
    ) -> io::Result<MemoryStream> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut resend = Duration::from_secs(1);
        loop {
            if let Some(s) = self.try_connect(from, to)? {
                return Ok(s);
            }
            let next = tokio::time::Instant::now() + resend;
            if next >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
            }
            tokio::time::sleep_until(next).await;
            resend *= 2;
        }
    }

    /// One attempt: a connection, `None` when the path is silent, or an
    /// error when nobody listens.
    fn try_connect(&self, from: &NodeAddr, to: &NodeAddr) -> io::Result<Option<MemoryStream>> {
        let (key_from, key_to) = (from.to_string(), to.to_string());
        let mut net = self.lock();
        *net.attempts
            .entry((key_from.clone(), key_to.clone()))
            .or_default() += 1;
        let forth = net.direction(&key_from, &key_to);
        let back = net.direction(&key_to, &key_from);
        if forth.silent.load(Ordering::SeqCst) || back.silent.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        let tx = net.listening.get(&key_to).ok_or_else(refused)?;
        let (a, b) = tokio::io::duplex(PIPE_BYTES);
        let reset = CancellationToken::new();
        let ours = MemoryStream::new(a, forth, reset.clone());
        let theirs = MemoryStream::new(b, back, reset.clone());
        let source = SocketAddr::new(source_ip(from), 0);
        tx.send((theirs, source)).map_err(|_| refused())?;
        net.open.entry((key_from, key_to)).or_default().push(reset);
        Ok(Some(ours))
    }
}

/// The address a node's connections come from: its host when that is an
/// IP address, else loopback.
fn source_ip(node: &NodeAddr) -> IpAddr {
    node.host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// One end of an in-memory connection.
pub struct MemoryStream {
    inner: DuplexStream,
    /// Whether what this end writes is dropped silently.
    out: Arc<Direction>,
    /// Resolves when the connection is reset; polled beside every read
    /// and write, so that a waiting one wakes up.
    reset: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for MemoryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStream").finish_non_exhaustive()
    }
}

impl MemoryStream {
    fn new(inner: DuplexStream, out: Arc<Direction>, reset: CancellationToken) -> Self {
        MemoryStream {
            inner,
            out,
            reset: Box::pin(reset.cancelled_owned()),
        }
    }

    /// A plain pipe end with no network around it (the fuzz harness).
    pub(crate) fn plain(inner: DuplexStream) -> Self {
        Self::new(inner, Arc::default(), CancellationToken::new())
    }

    fn check_reset(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.reset.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for MemoryStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_reset(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemoryStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_reset(cx)?;
        if self.out.silent.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_reset(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
