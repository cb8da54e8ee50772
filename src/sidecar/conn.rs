//! Connections of the local API: a cap on how many are open at once and an
//! inactivity timeout on each. Without them, idle or stalled clients could
//! hold every file descriptor of the process, and the mesh, which accepts
//! its peers in the same process, could no longer accept them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::warn;

/// API connections open at once, by default. Beyond it, new connections
/// are closed as soon as they are accepted.
pub const MAX_API_CONNECTIONS: usize = 256;

/// Longest `?wait=`: the API's longest request, which bounds its
/// connections' idle timeout from below.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A connection on which nothing was read or written for this long is
/// closed. Longer than the longest `?wait=`, so that a waiting request is
/// never cut, and several times the SSE keep-alive interval, so that a
/// stream whose client reads lives on.
pub const API_IDLE_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT.as_secs() + 15);

/// Counters of the API's connections, for `/metrics`.
#[derive(Debug)]
pub(crate) struct ConnStats {
    /// The cap.
    pub(crate) max: usize,
    permits: Arc<Semaphore>,
    /// Connections closed at once because the cap was reached.
    pub(crate) refused: AtomicU64,
    /// Connections closed for inactivity.
    pub(crate) timed_out: AtomicU64,
}

impl ConnStats {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnStats {
            max,
            permits: Arc::new(Semaphore::new(max)),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// A slot under the cap, or `None` (counted as refused) when every
    /// slot is taken.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }
}

/// Says whether a warning is due: at most one a minute, so that a flood
/// of refused connections does not flood the log too.
#[derive(Default)]
pub(crate) struct WarnLimit {
    last: Option<Instant>,
}

impl WarnLimit {
    pub(crate) fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// After a failed accept: a reset or aborted connection is nothing; any
/// other error (typically out of file descriptors) is logged, rate
/// limited, and waited out rather than spun on.
pub(crate) async fn accept_failed(e: &io::Error, what: &str, warn_limit: &mut WarnLimit) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    if warn_limit.due() {
        warn!(error = %e, "{what} accept failed");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The API's listener, for `axum::serve`: applies the cap and wraps each
/// connection in [`ApiConn`].
pub(crate) struct ApiListener {
    listener: TcpListener,
    stats: Arc<ConnStats>,
    idle: Duration,
    /// Refusals and accept errors are logged at most once a minute.
    warn_limit: WarnLimit,
}

impl ApiListener {
    pub(crate) fn new(listener: TcpListener, stats: Arc<ConnStats>, idle: Duration) -> Self {
        ApiListener {
            listener,
            stats,
            idle,
            warn_limit: WarnLimit::default(),
        }
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = ApiConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ApiConn, SocketAddr) {
        loop {
            let (stream, remote) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e, "API", &mut self.warn_limit).await;
                    continue;
                }
            };
            match self.stats.admit() {
                Some(permit) => {
                    // An event stream is many small writes: with Nagle's
                    // algorithm each waits for the client's ack of the one
                    // before, which a client that only reads delays by up
                    // to 40 ms.
                    let _ = stream.set_nodelay(true);
                    let conn = ApiConn::new(stream, permit, self.idle, self.stats.clone());
                    return (conn, remote);
                }
                None => {
                    // Closed at once: answering would need the descriptor
                    // for longer, which is what the cap is there to bound.
                    if self.warn_limit.due() {
                        warn!(
                            limit = self.stats.max,
                            %remote,
                            "API connection closed: too many open (logged at most once a minute)"
                        );
                    }
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An API connection: holds its slot under the cap, and fails with
/// `TimedOut` once neither a read nor a write has made progress for the
/// idle timeout while the server waits on the socket.
pub(crate) struct ApiConn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    /// When bytes last moved either way.
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
    stats: Arc<ConnStats>,
    counted: bool,
}

impl ApiConn {
    fn new(
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        idle: Duration,
        stats: Arc<ConnStats>,
    ) -> Self {
        let now = Instant::now();
        ApiConn {
            stream,
            _permit: permit,
            idle,
            last_progress: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            stats,
            counted: false,
        }
    }

    /// Called when the socket is not ready: an error once the connection
    /// has been idle too long, else `Pending` with a wake-up at the
    /// deadline.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        // The timer is moved only when it is about to be waited on, not at
        // every read or write.
        let deadline = self.last_progress + self.idle;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        ready!(self.timer.as_mut().poll(cx));
        if !self.counted {
            self.counted = true;
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no progress for {:?}", self.idle),
        ))
    }

    /// What a read or write of the socket gave: progress (`moved` says
    /// whether bytes did) postpones the idle deadline; waiting is bounded
    /// by it.
    fn after<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(Ok(v)) if moved(&v) => {
                self.last_progress = Instant::now();
                Poll::Ready(Ok(v))
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        self.after(r, |&n| n > 0, cx)
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        let after = buf.filled().len();
        this.after(r, |()| after > before, cx)
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(idle: Duration) -> (ApiConn, TcpStream, Arc<ConnStats>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let stats = ConnStats::new(1);
        let mut listener = ApiListener::new(l, stats.clone(), idle);
        let (conn, _) = axum::serve::Listener::accept(&mut listener).await;
        (conn, client, stats)
    }

    #[tokio::test]
    async fn an_idle_read_times_out_and_progress_postpones_it() {
        let idle = Duration::from_millis(400);
        let (mut conn, mut client, stats) = pair(idle).await;
        assert_eq!(stats.open(), 1);
        let mut buf = [0u8; 16];
        // Bytes arriving late in the period keep it open past the first
        // deadline.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"ab").await.expect("write");
        let n = conn.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"ab");
        let start = Instant::now();
        let err = conn.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Counted from the last progress, not from the accept.
        assert!(
            start.elapsed() >= Duration::from_millis(350),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
        drop(conn);
        assert_eq!(stats.open(), 0);
    }

    #[tokio::test]
    async fn a_write_the_client_does_not_read_times_out() {
        let (mut conn, _client, stats) = pair(Duration::from_millis(300)).await;
        let chunk = vec![b'x'; 64 * 1024];
        // The client never reads: the socket buffers fill, then no write
        // makes progress.
        let err = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Err(e) = conn.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the stalled write ends");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        let (conn, _client, stats) = pair(Duration::from_secs(60)).await;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut listener = ApiListener::new(l, stats.clone(), Duration::from_secs(60));
        // The cap of 1 is taken by `conn`, whose stats this listener shares.
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let accepting = tokio::spawn(async move {
            let (c, _) = axum::serve::Listener::accept(&mut listener).await;
            c
        });
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        // A slot freed is a slot taken by the next connection.
        drop(conn);
        let _next = TcpStream::connect(addr).await.expect("connect");
        let c = tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("accepted")
            .expect("task");
        assert_eq!(stats.open(), 1);
        drop(c);
    }
}
