//! The Redis-protocol endpoint: the pub/sub part of RESP2 and RESP3, so
//! that an application which invalidates its caches through Redis pub/sub
//! (DHIS 2 through Lettuce) uses the mesh by pointing its Redis host and
//! port at its own sidecar.
//!
//! `PUBLISH channel message` is one invalidation (cache = channel, key =
//! message) sent over the mesh like any other, and delivered to this
//! sidecar's subscribers at once, as Redis delivers to its own. What the
//! mesh delivers from peers reaches subscribers of the channel and of every
//! matching pattern.
//!
//! Layers, as in mini-redis: [`parse`] turns bytes into commands, [`cmd`]
//! answers them, [`broker`] keeps subscriptions and each connection's
//! bounded output; this module accepts connections and moves bytes.

pub mod broker;
pub mod clients;
pub mod cmd;
pub mod glob;
pub mod info;
pub mod parse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::broker::{Broker, Closed, Outbox};
use self::cmd::{After, Session};
use self::parse::{Parser, Request};
use super::conn::{ConnStats, WarnLimit, accept_failed};
use super::flush::FlushHook;
use crate::mesh::MeshHandle;

/// Connections open at once, by default (`cachecast.resp.max.connections`
/// sets it); beyond it, new ones are closed as soon as they are accepted.
pub const MAX_RESP_CONNECTIONS: usize = crate::config::DEFAULT_RESP_CONNECTIONS;

/// A connection that stops halfway through a command for this long, or
/// that has not authenticated this long after connecting (when a password
/// is set), is closed. A connection idle between commands is not: pub/sub
/// subscribers and publishers stay idle for hours, as Redis lets them.
pub const RESP_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Reading stops while this much output waits for a client that sends
/// commands faster than it reads the replies.
const READ_PAUSE: usize = 1024 * 1024;

/// Counters of the endpoint's connections, beside the cap's own
/// ([`ConnStats`]: open, refused, timed out).
#[derive(Debug, Default)]
pub struct RespStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed for a protocol error.
    pub protocol_errors: AtomicU64,
    /// Failed `AUTH`/`HELLO AUTH` attempts.
    pub auth_failures: AtomicU64,
    /// Commands answered (`INFO`'s `total_commands_processed`).
    pub commands: AtomicU64,
}

/// What every connection shares.
pub struct Shared {
    /// Subscriptions and delivery.
    pub broker: Broker,
    mesh: MeshHandle,
    hook: Option<Arc<FlushHook>>,
    password: Option<String>,
    next_id: AtomicU64,
    /// Connection counters.
    pub stats: RespStats,
    /// The cap on connections, and the counts of those refused or closed
    /// for stalling (the same bookkeeping as the HTTP API's).
    pub conns: Arc<ConnStats>,
    /// The addresses served.
    pub addrs: Vec<SocketAddr>,
    /// Open connections, for `CLIENT LIST` and `CLIENT KILL`.
    pub clients: clients::Clients,
    /// When the endpoint started, for `INFO`'s uptime.
    started: std::time::Instant,
    /// The same, as Unix time in seconds.
    started_unix: u64,
    /// `INFO`'s `run_id`: 40 hex digits, new at every start, as Redis's.
    run_id: String,
}

impl Shared {
    /// Shared state for an endpoint on `mesh`.
    pub fn new(
        mesh: MeshHandle,
        hook: Option<Arc<FlushHook>>,
        password: Option<String>,
        max_connections: usize,
        addrs: Vec<SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            broker: Broker::default(),
            mesh,
            hook,
            password,
            next_id: AtomicU64::new(1),
            stats: RespStats::default(),
            conns: ConnStats::new(max_connections),
            addrs,
            clients: clients::Clients::default(),
            started: std::time::Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            run_id: (0..5)
                .map(|_| format!("{:08x}", rand::random::<u32>()))
                .collect(),
        })
    }

    /// Whether clients must authenticate.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// What `INFO` reports now.
    pub fn info_facts(&self) -> info::Facts {
        let (channels, patterns) = self.broker.counts();
        let now_usec = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        info::Facts {
            run_id: self.run_id.clone(),
            tcp_port: self.addrs.first().map_or(0, |a| a.port()),
            binds: self.addrs.iter().map(|a| a.ip().to_string()).collect(),
            uptime_secs: self.started.elapsed().as_secs(),
            started_unix: self.started_unix,
            now_usec,
            connected_clients: self.conns.open(),
            maxclients: self.conns.max,
            total_connections: self.stats.accepted.load(Ordering::Relaxed),
            total_commands: self.stats.commands.load(Ordering::Relaxed),
            rejected_connections: self.conns.refused.load(Ordering::Relaxed),
            channels,
            patterns,
            shard_channels: self.broker.shard_count(),
            rss: info::rss(),
        }
    }

    /// Counts a subscriber cut off for not reading, and asks the
    /// application to flush: it missed what was dropped.
    fn slow(&self, id: u64) {
        self.broker
            .stats
            .slow_dropped
            .fetch_add(1, Ordering::Relaxed);
        warn!(
            client = id,
            limit = broker::OUTPUT_HARD_LIMIT,
            "Redis-protocol subscriber disconnected: it did not read its messages (output limit reached)"
        );
        if let Some(hook) = &self.hook {
            hook.trigger_for_subscriber(
                "a Redis-protocol subscriber was disconnected for not reading its messages",
            );
        }
    }
}

/// Accepts connections on `listener` until `shutdown`; each is served on
/// its own task, tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut warn_limit = WarnLimit::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                accept_failed(&e, "Redis-protocol", &mut warn_limit).await;
                continue;
            }
        };
        let Some(permit) = shared.conns.admit() else {
            // Redis's words, if the socket takes them at once; closed
            // either way.
            let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
            if warn_limit.due() {
                warn!(limit = shared.conns.max, %remote, "Redis-protocol connection closed: too many open (logged at most once a minute)");
            }
            continue;
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            connection(stream, remote, shared, shutdown).await;
        });
    }
}

/// Serves one client until it leaves, errs, or the sidecar stops.
async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let laddr = stream.local_addr().unwrap_or(remote);
    let me = clients::Client::new(id, remote, laddr, {
        use std::os::fd::AsRawFd;
        stream.as_raw_fd()
    });
    shared.clients.add(me.clone());
    // Forgotten however the connection ends.
    struct Registered<'a>(&'a Shared, u64);
    impl Drop for Registered<'_> {
        fn drop(&mut self) {
            self.0.clients.remove(self.1);
        }
    }
    let _registered = Registered(&shared, id);
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    let outbox = Arc::new(Outbox::new(wr.clone()));
    // However this task ends (an unwind included), the outbox lets go of
    // the socket, which then closes with the task: the broker may hold the
    // outbox longer, and the client must see its connection end.
    struct LetGo(Arc<Outbox>);
    impl Drop for LetGo {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _let_go = LetGo(outbox.clone());
    let mut session = Session::new(me.clone(), outbox.clone(), shared.clone());
    debug!(client = id, %remote, "Redis-protocol client connected");

    let writer = async {
        loop {
            let (chunks, closed) = outbox.take();
            if chunks.is_empty() {
                match closed {
                    Some(c) => return c,
                    None => {
                        outbox.ready.notified().await;
                        continue;
                    }
                }
            }
            let n: usize = chunks.iter().map(|c| c.len()).sum();
            let result = tokio::select! {
                r = write_chunks(&wr, &chunks) => r,
                // Cut off while blocked on a client that does not read.
                () = outbox.cut.cancelled() => return Closed::Slow,
            };
            outbox.written(n);
            outbox.drained.notify_one();
            if result.is_err() {
                return Closed::Ending;
            }
        }
    };

    let reader = async {
        let mut parser = Parser::default();
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = BytesMut::new();
        loop {
            // Idle between commands is fine; stalled inside one, or owing
            // its authentication, is not.
            let stalled = (parser.mid_request() || !buf.is_empty())
                .then(|| Instant::now() + RESP_STALL_TIMEOUT);
            let unauthenticated = session
                .unauthenticated_since()
                .map(|t| t + RESP_STALL_TIMEOUT);
            let deadline = match (stalled, unauthenticated) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let read = match deadline {
                Some(d) => match tokio::time::timeout_at(d, rd.read_buf(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        shared.conns.timed_out.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            client = id,
                            "Redis-protocol client closed: stalled or never authenticated"
                        );
                        session.end();
                        return;
                    }
                },
                None => rd.read_buf(&mut buf).await,
            };
            match read {
                Ok(0) | Err(_) => {
                    session.end();
                    return;
                }
                Ok(_) => {}
            }
            loop {
                // A client that sends faster than it reads its replies
                // waits here: what one read holds cannot grow the output
                // past the pause either.
                if out.len() >= READ_PAUSE {
                    outbox.push(out.split().freeze());
                }
                while outbox.queued() > READ_PAUSE {
                    outbox.drained.notified().await;
                }
                parser.authenticated = session.authed();
                match parser.next(&mut buf) {
                    Ok(Some(Request::Command(args))) => {
                        if session.execute(&mut out, args) == After::Close {
                            outbox.push(out.split().freeze());
                            outbox.close();
                            session.unsubscribe_all();
                            return;
                        }
                    }
                    Ok(Some(Request::TooLarge { name, largest })) => {
                        session.too_large(&mut out, name.as_deref(), largest);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        debug!(client = id, error = %e.0, "Redis-protocol client closed: protocol error");
                        out.put_slice(b"-ERR Protocol error: ");
                        out.put_slice(e.0.as_bytes());
                        out.put_slice(b"\r\n");
                        outbox.push(out.split().freeze());
                        outbox.close();
                        session.end();
                        return;
                    }
                }
            }
            outbox.push(out.split().freeze());
            // A buffer grown for a large argument is not kept.
            if buf.is_empty() && buf.capacity() > 64 * 1024 {
                buf = BytesMut::with_capacity(4096);
            }
        }
    };

    tokio::pin!(writer);
    tokio::select! {
        closed = &mut writer => {
            if closed == Closed::Slow {
                shared.slow(id);
            }
        }
        () = reader => {
            // What is queued (a last reply) still goes out, briefly.
            outbox.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
        }
        () = shutdown.cancelled() => {}
        // CLIENT KILL from another connection.
        () = me.kill.cancelled() => {}
    }
    // Whatever ended the connection without the client's asking (the
    // writer failed, it was cut off, the sidecar stops): a gap for its
    // subscriptions. Nothing is left after QUIT or an ended reader.
    session.end();
    debug!(client = id, "Redis-protocol client disconnected");
}

/// Chunks one `writev` takes at most, here.
const WRITE_SLICES: usize = 64;

/// Writes `chunks` in order to a socket that the outbox also writes to
/// directly (never while this runs: it only does with nothing queued or
/// being written). Gathered by `writev`, not copied into one buffer: a
/// subscriber's backlog can be megabytes of small messages.
async fn write_chunks(socket: &OwnedWriteHalf, chunks: &[bytes::Bytes]) -> std::io::Result<()> {
    use std::io::IoSlice;
    // The first chunk not wholly written, and how much of it was.
    let (mut first, mut done) = (0, 0);
    loop {
        while first < chunks.len() && done == chunks[first].len() {
            first += 1;
            done = 0;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(&chunks[first..]) {
            *slot = IoSlice::new(if count == 0 { &chunk[done..] } else { chunk });
            count += 1;
        }
        match socket.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                while n > 0 {
                    let left = chunks[first].len() - done;
                    if n < left {
                        done += n;
                        break;
                    }
                    n -= left;
                    first += 1;
                    done = 0;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// Binds the endpoint's addresses. An address of a family the machine
/// lacks (`::1` on a host without IPv6) is skipped with a log line when
/// another address was bound; any other failure (an address in use: a
/// real Redis still running) is an error, since a client could reach that
/// other server instead.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut listeners = Vec::new();
    let mut skipped = None;
    for &addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) if addrs.len() > 1 && family_missing(&e) => {
                info!(%addr, error = %e, "Redis-protocol endpoint not served on this address: the machine lacks its address family");
                skipped.get_or_insert((addr, e));
            }
            Err(e) => return Err((addr, e)),
        }
    }
    match (listeners.is_empty(), skipped) {
        (true, Some(e)) => Err(e),
        _ => Ok(listeners),
    }
}

/// The address (family) is not on this machine: `EADDRNOTAVAIL`,
/// `EAFNOSUPPORT`.
fn family_missing(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order_past_a_full_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_rd, wr) = client.expect("connect").into_split();
        let (mut peer, _) = accepted.expect("accept");
        // More chunks than one writev takes, of sizes that split across
        // writes, and more bytes than the socket's buffers hold: the
        // writer must wait for the reader and resume mid-chunk.
        let chunks: Vec<bytes::Bytes> = (0..5 * WRITE_SLICES)
            .map(|i| bytes::Bytes::from(vec![(i % 251) as u8; 1 + (i * 7919) % 70_000]))
            .collect();
        let expected: Vec<u8> = chunks.concat();
        let reader = async {
            let mut got = vec![0; expected.len()];
            peer.read_exact(&mut got).await.expect("read");
            got
        };
        let (written, got) = tokio::join!(write_chunks(&wr, &chunks), reader);
        written.expect("written");
        assert!(got == expected, "the bytes arrived altered or out of order");
    }
}
