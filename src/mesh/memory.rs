//! An in-memory network that tests drive (feature `test-util`):
//! partitions, one-way silences, resets and a party on the path, with
//! every timer of the mesh under `tokio::time::pause()`, so that
//! heartbeats, dead-peer detection, backoff and replay are tested
//! deterministically and fast, and the simulator (`tests/sim/`) runs whole
//! clusters on one thread.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::LinkError;
use super::inbound::Incoming;
use super::io::Io;
use super::transport::{Dialing, Listening, Target, Transport};
use crate::config::NodeAddr;

impl Transport for MemoryNetwork {
    fn dial<'a>(&'a self, target: Target<'a>) -> Dialing<'a> {
        Box::pin(async move {
            let s = self
                .connect(target.from, target.to, target.connect_timeout)
                .await
                .map_err(|e| LinkError::Connect(format!("{}: {e}", target.to)))?;
            Ok((Io::Memory(s), Instant::now() + target.hello_timeout))
        })
    }

    fn listen<'a>(
        &'a self,
        me: &'a NodeAddr,
        _: SocketAddr,
        _: Option<TcpListener>,
    ) -> Listening<'a> {
        Box::pin(async move { Ok(Incoming::Memory(self.listen_as(me))) })
    }
}

/// Bytes buffered in each direction of an in-memory connection.
const PIPE_BYTES: usize = 256 * 1024;

/// One direction of the in-memory links between two nodes: whether it is
/// silent (no reset, no end of stream), as on a path where a firewall
/// drops packets. As with TCP, nothing written on an open connection is
/// lost: a write waits until the path heals (TCP resends until then) or
/// the connection is reset; new connections are not answered.
#[derive(Debug, Default)]
struct Direction {
    silent: AtomicBool,
    /// Writes waiting for the path to heal.
    waiting: Mutex<Vec<Waker>>,
}

impl Direction {
    fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
        if !silent {
            let waiting =
                std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
            for w in waiting {
                w.wake();
            }
        }
    }

    /// Whether a write must wait; if so, it is woken when the path heals.
    fn blocks(&self, cx: &Context<'_>) -> bool {
        if !self.silent.load(Ordering::SeqCst) {
            return false;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        drop(waiting);
        // Healed meanwhile: its wake-up may have missed this waker.
        self.silent.load(Ordering::SeqCst)
    }
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
    /// Every connection made, by its (dialer, acceptor), oldest first: to
    /// cut them, or to put bytes in them.
    open: HashMap<(String, String), Vec<Wire>>,
    /// Connection attempts, by (dialer, acceptor).
    attempts: HashMap<(String, String), u64>,
}

/// An open in-memory connection, as the network sees it.
struct Wire {
    reset: CancellationToken,
    /// Bytes put in on the way to the dialer, and to the acceptor.
    to_dialer: Arc<Injected>,
    to_acceptor: Arc<Injected>,
}

/// Bytes a party on the path put into one direction of a connection: the
/// reading end takes them before anything its peer wrote after.
#[derive(Default)]
struct Injected {
    state: Mutex<(VecDeque<u8>, Option<Waker>)>,
}

impl Injected {
    fn put(&self, bytes: &[u8]) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0.extend(bytes);
            st.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Which end of a connection bytes are put in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// The end that dialled.
    Dialer,
    /// The end that accepted.
    Acceptor,
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

    /// Silences the path from `from` to `to`: nothing written on an open
    /// connection arrives (the write waits, as TCP resends, until the path
    /// heals or the connection is reset), and a new connection between
    /// them is not answered.
    pub fn drop_one_way(&self, from: &NodeAddr, to: &NodeAddr) {
        let d = self.lock().direction(&from.to_string(), &to.to_string());
        d.set_silent(true);
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
            d.set_silent(false);
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
            for wire in net.open.remove(&key).unwrap_or_default() {
                wire.reset.cancel();
            }
        }
    }

    /// Puts `bytes` into the newest connection `dialer` opened to
    /// `acceptor`, read by the end `toward` before anything the other end
    /// writes after, as a party on the path would (the simulator's forged
    /// frames). False when there is no such connection.
    pub fn inject(
        &self,
        dialer: &NodeAddr,
        acceptor: &NodeAddr,
        toward: Toward,
        bytes: &[u8],
    ) -> bool {
        let key = (dialer.to_string(), acceptor.to_string());
        let net = self.lock();
        let Some(wire) = net.open.get(&key).and_then(|w| w.last()) else {
            return false;
        };
        match toward {
            Toward::Dialer => wire.to_dialer.put(bytes),
            Toward::Acceptor => wire.to_acceptor.put(bytes),
        }
        true
    }

    /// Connects to `to` as a party on `from`'s address would: with
    /// `from`'s source address and its paths' silences (a `from` that is no
    /// node, a port of its host that no node uses, has paths of its own).
    /// Refused when nobody listens at `to`; times out while the path is
    /// silent.
    pub async fn dial(
        &self,
        from: &NodeAddr,
        to: &NodeAddr,
        timeout: Duration,
    ) -> io::Result<MemoryStream> {
        self.connect(from, to, timeout).await
    }

    /// How many times `from` tried to connect to `to`.
    pub fn attempts(&self, from: &NodeAddr, to: &NodeAddr) -> u64 {
        let key = (from.to_string(), to.to_string());
        self.lock().attempts.get(&key).copied().unwrap_or(0)
    }

    /// Accepts connections as `node` (a test playing a peer by hand):
    /// connections to `node` arrive here from now on, in place of any node
    /// that listened there before.
    pub fn listen(&self, node: &NodeAddr) -> MemoryListener {
        MemoryListener {
            incoming: self.listen_as(node),
        }
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
        let wire = Wire {
            reset: CancellationToken::new(),
            to_dialer: Arc::default(),
            to_acceptor: Arc::default(),
        };
        let mut ours = MemoryStream::new(a, forth, wire.reset.clone());
        ours.injected = wire.to_dialer.clone();
        let mut theirs = MemoryStream::new(b, back, wire.reset.clone());
        theirs.injected = wire.to_acceptor.clone();
        let source = SocketAddr::new(source_ip(from), 0);
        tx.send((theirs, source)).map_err(|_| refused())?;
        net.open.entry((key_from, key_to)).or_default().push(wire);
        Ok(Some(ours))
    }
}

/// Connections made to an address that a test listens on
/// ([`MemoryNetwork::listen`]).
#[derive(Debug)]
pub struct MemoryListener {
    incoming: mpsc::UnboundedReceiver<(MemoryStream, SocketAddr)>,
}

impl MemoryListener {
    /// The next connection and the address it came from; `None` once the
    /// network is gone.
    pub async fn accept(&mut self) -> Option<(MemoryStream, SocketAddr)> {
        self.incoming.recv().await
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
    /// The path this end writes on (silent or not).
    out: Arc<Direction>,
    /// Resolves when the connection is reset; polled beside every read
    /// and write, so that a waiting one wakes up.
    reset: Pin<Box<WaitForCancellationFutureOwned>>,
    /// What a party on the path put in for this end.
    injected: Arc<Injected>,
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
            injected: Arc::default(),
        }
    }

    /// A plain pipe end with no network around it (the fuzz harness).
    #[cfg(feature = "fuzz")]
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
        {
            let mut st = self
                .injected
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !st.0.is_empty() {
                let n = st.0.len().min(buf.remaining());
                let (front, back) = st.0.as_slices();
                let first = front.len().min(n);
                buf.put_slice(&front[..first]);
                buf.put_slice(&back[..n - first]);
                st.0.drain(..n);
                return Poll::Ready(Ok(()));
            }
            // Registered before the pipe is polled: bytes put in meanwhile
            // wake this read.
            st.1 = Some(cx.waker().clone());
        }
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
        if self.out.blocks(cx) {
            return Poll::Pending;
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
