//! Who is subscribed to what on this sidecar, and each connection's bounded
//! output queue.
//!
//! Messages reach a subscriber through its [`Outbox`]: the broker hands it
//! encoded frames and never waits. Output goes straight to the socket when
//! nothing is queued before it and the socket takes it whole, so a message
//! from a peer reaches its subscriber in the task that read it, with no
//! hand-off to the connection's task; only what would block is queued, for
//! the connection's writer to drain. A subscriber that does not read is
//! disconnected once its queue passes the output limit (as Redis's
//! `client-output-buffer-limit pubsub` does), and that counts as a gap for
//! the flush hook.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::glob;

/// A subscriber whose unread output passes this is disconnected at once
/// (Redis's pub/sub hard limit).
pub const OUTPUT_HARD_LIMIT: usize = 32 * 1024 * 1024;
/// A subscriber whose unread output stays above this for
/// [`OUTPUT_SOFT_SECONDS`] is disconnected (Redis's pub/sub soft limit).
pub const OUTPUT_SOFT_LIMIT: usize = 8 * 1024 * 1024;
/// See [`OUTPUT_SOFT_LIMIT`].
pub const OUTPUT_SOFT_SECONDS: u64 = 60;

/// Names remembered as lost at most; beyond it, a lost subscription is
/// covered by a call of the hook when its connection ends.
const MAX_LOST: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an outbox stopped taking output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client did not read its output fast enough.
    Slow,
    /// The connection is ending (QUIT, a protocol error, the client left).
    Ending,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    /// Bytes queued or taken by the writer and not yet written: what the
    /// output limits bound.
    bytes: usize,
    over_soft_since: Option<Instant>,
    closed: Option<Closed>,
    /// The connection's socket, written to directly while nothing is
    /// queued (dropped when the outbox closes: the writer keeps its own).
    socket: Option<Arc<OwnedWriteHalf>>,
    /// When output last went to the socket directly.
    last_direct: Option<Instant>,
}

/// Output that follows a direct write this closely is queued for the
/// writer instead: a burst (a batch from a peer, a pipeline of commands)
/// then leaves in one write, waking the client once, where a write each
/// would cost a system call and a wake-up per message.
const BURST_GAP: Duration = Duration::from_micros(50);

/// One connection's output: replies and messages, in order.
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Woken when output arrives or the outbox closes.
    pub(crate) ready: Notify,
    /// Woken when the writer has drained output.
    pub(crate) drained: Notify,
    /// Whether the connection speaks RESP3 (messages are push frames).
    resp3: AtomicBool,
    /// Cancelled when the client is cut off for not reading, so that a
    /// writer blocked on its socket stops at once.
    pub(crate) cut: tokio_util::sync::CancellationToken,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            drained: Notify::new(),
            resp3: AtomicBool::new(false),
            cut: tokio_util::sync::CancellationToken::new(),
        }
    }
}

impl Outbox {
    /// An outbox that writes to `socket` directly while nothing is queued.
    pub fn new(socket: Arc<OwnedWriteHalf>) -> Self {
        let outbox = Outbox::default();
        lock(&outbox.queue).socket = Some(socket);
        outbox
    }

    /// Switches the encoding of messages (`HELLO`, `RESET`).
    pub fn set_resp3(&self, on: bool) {
        self.resp3.store(on, Ordering::Relaxed);
    }

    /// Whether messages are RESP3 push frames.
    pub fn resp3(&self) -> bool {
        self.resp3.load(Ordering::Relaxed)
    }

    /// Appends output: written at once if nothing waits before it and the
    /// socket takes it, queued otherwise. Returns false when the outbox is
    /// closed, or closes it now because the client is too far behind.
    pub fn push(&self, mut bytes: Bytes) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let mut guard = lock(&self.queue);
        // Fields borrowed apart (the socket while noting the time).
        let q = &mut *guard;
        if q.closed.is_some() {
            return false;
        }
        let now = Instant::now();
        // `bytes` counts what the writer took and has not written yet too:
        // at zero, nothing can be written before this.
        if q.bytes == 0
            && q.last_direct
                .is_none_or(|t| now.duration_since(t) >= BURST_GAP)
            && let Some(socket) = &q.socket
        {
            q.last_direct = Some(now);
            // An error is left to the writer, which meets it again and
            // ends the connection.
            if let Ok(n) = socket.try_write(&bytes) {
                if n == bytes.len() {
                    return true;
                }
                let _ = bytes.split_to(n);
            }
        }
        q.bytes += bytes.len();
        q.chunks.push_back(bytes);
        let slow = if q.bytes > OUTPUT_HARD_LIMIT {
            true
        } else if q.bytes > OUTPUT_SOFT_LIMIT {
            let since = *q.over_soft_since.get_or_insert(now);
            now.duration_since(since) >= Duration::from_secs(OUTPUT_SOFT_SECONDS)
        } else {
            q.over_soft_since = None;
            false
        };
        if slow {
            q.closed = Some(Closed::Slow);
            q.chunks.clear();
            q.bytes = 0;
            q.socket = None;
            self.cut.cancel();
        }
        drop(guard);
        self.ready.notify_one();
        !slow
    }

    /// Takes everything queued, and says whether the outbox is closed.
    /// What is taken still counts against the limits until [`written`]
    /// says it left.
    ///
    /// [`written`]: Outbox::written
    pub fn take(&self) -> (Vec<Bytes>, Option<Closed>) {
        let mut q = lock(&self.queue);
        (q.chunks.drain(..).collect(), q.closed)
    }

    /// `n` bytes taken earlier were written to the client.
    pub fn written(&self, n: usize) {
        let mut q = lock(&self.queue);
        q.bytes = q.bytes.saturating_sub(n);
        if q.bytes <= OUTPUT_SOFT_LIMIT {
            q.over_soft_since = None;
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        lock(&self.queue).bytes
    }

    /// Closes the outbox: what is queued is still written, nothing more is
    /// taken.
    pub fn close(&self) {
        let mut q = lock(&self.queue);
        q.closed.get_or_insert(Closed::Ending);
        q.socket = None;
        drop(q);
        self.ready.notify_one();
    }
}

/// A subscription's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `SUBSCRIBE`: an exact channel.
    Channel,
    /// `PSUBSCRIBE`: a glob pattern.
    Pattern,
    /// `SSUBSCRIBE`: a shard channel. A standalone Redis keeps them apart
    /// from channels; the mesh has one namespace (cache names), so a shard
    /// channel is the channel of the same name, its messages `smessage`.
    Shard,
}

type Subscribers = HashMap<Bytes, Vec<(u64, Arc<Outbox>)>>;

#[derive(Default)]
struct Registry {
    channels: Subscribers,
    patterns: Subscribers,
    shards: Subscribers,
    /// Channels and patterns whose subscriber's connection ended while
    /// subscribed (a crash, a restart, a network error): that client may
    /// come back having missed messages, so the next subscription to them
    /// is a gap even when others stayed subscribed.
    lost: std::collections::HashSet<(Kind, Bytes)>,
    /// Bytes of the names subscribed to, bounded by [`MAX_NAME_BYTES`].
    name_bytes: usize,
}

/// Bytes of channel and pattern names this sidecar holds subscriptions
/// for, at most: clients on loopback are trusted to subscribe, not to
/// take the machine's memory.
pub const MAX_NAME_BYTES: usize = 64 * 1024 * 1024;

/// Counters of the endpoint, for status and metrics.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Messages published on this sidecar (RESP `PUBLISH`).
    pub published: AtomicU64,
    /// Messages handed to local subscribers (a message to two subscribers
    /// counts twice), from anywhere in the cluster.
    pub delivered: AtomicU64,
    /// Subscribers disconnected because they did not read their output.
    pub slow_dropped: AtomicU64,
}

/// The subscriptions of this sidecar.
pub struct Broker {
    registry: Mutex<Registry>,
    /// Counters.
    pub stats: BrokerStats,
}

/// Appends `prefix`, the decimal `n` and `\r\n`, without allocating.
fn put_header(out: &mut BytesMut, prefix: u8, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_u8(prefix);
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// `*3\r\n$7\r\nmessage\r\n…` or its RESP3 push form; `smessage` to a
/// shard channel's subscriber.
fn encode_message(
    resp3: bool,
    kind: Kind,
    pattern: &[u8],
    channel: &[u8],
    message: &[u8],
) -> Bytes {
    let parts: &[&[u8]] = match kind {
        Kind::Channel => &[b"message", channel, message],
        Kind::Pattern => &[b"pmessage", pattern, channel, message],
        Kind::Shard => &[b"smessage", channel, message],
    };
    let len: usize = parts.iter().map(|p| p.len() + 16).sum();
    let mut out = BytesMut::with_capacity(len + 8);
    put_header(&mut out, if resp3 { b'>' } else { b'*' }, parts.len());
    for part in parts {
        put_header(&mut out, b'$', part.len());
        out.put_slice(part);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            registry: Mutex::new(Registry::default()),
            stats: BrokerStats::default(),
        }
    }
}

impl Broker {
    /// Adds a subscription of connection `id` and queues its confirmation
    /// `reply` under the same lock, so that no message can overtake it.
    /// Returns whether the subscriber may have missed messages: the
    /// channel or pattern had no local subscriber, or one of its
    /// subscribers' connections ended while subscribed since.
    pub fn subscribe(
        &self,
        kind: Kind,
        name: Bytes,
        id: u64,
        outbox: &Arc<Outbox>,
        reply: Bytes,
    ) -> bool {
        let mut guard = lock(&self.registry);
        let reg = &mut *guard;
        let lost = reg.lost.remove(&(kind, name.clone()));
        let map = match kind {
            Kind::Channel => &mut reg.channels,
            Kind::Pattern => &mut reg.patterns,
            Kind::Shard => &mut reg.shards,
        };
        let len = name.len();
        let subs = map.entry(name).or_default();
        let first = subs.is_empty();
        if !subs.iter().any(|(i, _)| *i == id) {
            subs.push((id, outbox.clone()));
        }
        if first {
            reg.name_bytes += len;
        }
        outbox.push(reply);
        first || lost
    }

    /// Whether a subscription to a name of `len` bytes not yet subscribed
    /// to fits under [`MAX_NAME_BYTES`].
    pub fn has_room(&self, len: usize) -> bool {
        lock(&self.registry).name_bytes + len <= MAX_NAME_BYTES
    }

    /// Removes a subscription of connection `id` whose connection ended
    /// without unsubscribing: its client may come back having missed
    /// messages. The name is remembered, so that the next subscription to
    /// it is a gap (see [`Broker::subscribe`]). Returns whether others stay
    /// subscribed to it: one of them may be that client, already back, so
    /// the gap must be covered now.
    pub fn lost(&self, kind: Kind, name: &Bytes, id: u64) -> bool {
        let mut guard = lock(&self.registry);
        let reg = &mut *guard;
        let key = (kind, name.clone());
        let remembered =
            reg.lost.contains(&key) || (reg.lost.len() < MAX_LOST && reg.lost.insert(key));
        let map = match kind {
            Kind::Channel => &mut reg.channels,
            Kind::Pattern => &mut reg.patterns,
            Kind::Shard => &mut reg.shards,
        };
        let others = match map.get_mut(&name[..]) {
            Some(subs) => {
                subs.retain(|(i, _)| *i != id);
                let others = !subs.is_empty();
                if !others {
                    map.remove(&name[..]);
                    reg.name_bytes -= name.len();
                }
                others
            }
            None => false,
        };
        // Not remembered (too many names): cover it now instead.
        others || !remembered
    }

    /// Removes a subscription of connection `id`.
    pub fn unsubscribe(&self, kind: Kind, name: &[u8], id: u64) {
        let mut guard = lock(&self.registry);
        let reg = &mut *guard;
        let map = match kind {
            Kind::Channel => &mut reg.channels,
            Kind::Pattern => &mut reg.patterns,
            Kind::Shard => &mut reg.shards,
        };
        if let Some(subs) = map.get_mut(name) {
            subs.retain(|(i, _)| *i != id);
            if subs.is_empty() {
                map.remove(name);
                reg.name_bytes -= name.len();
            }
        }
    }

    /// Delivers a message to every local subscriber of `channel`, of
    /// every matching pattern (channel subscribers first, as Redis does),
    /// and of the shard channel of that name;
    /// returns how many received it.
    pub fn publish(&self, channel: &[u8], message: &[u8]) -> usize {
        let mut count = 0;
        {
            let reg = lock(&self.registry);
            // Encoded once per protocol, shared by every subscriber.
            let mut cached: [Option<Bytes>; 2] = [None, None];
            if let Some(subs) = reg.channels.get(channel) {
                for (_, out) in subs {
                    let r3 = out.resp3();
                    let frame = cached[usize::from(r3)]
                        .get_or_insert_with(|| {
                            encode_message(r3, Kind::Channel, b"", channel, message)
                        })
                        .clone();
                    if out.push(frame) {
                        count += 1;
                    }
                }
            }
            for (pattern, subs) in &reg.patterns {
                if !glob::matches(pattern, channel) {
                    continue;
                }
                let mut cached: [Option<Bytes>; 2] = [None, None];
                for (_, out) in subs {
                    let r3 = out.resp3();
                    let frame = cached[usize::from(r3)]
                        .get_or_insert_with(|| {
                            encode_message(r3, Kind::Pattern, pattern, channel, message)
                        })
                        .clone();
                    if out.push(frame) {
                        count += 1;
                    }
                }
            }
            let mut cached: [Option<Bytes>; 2] = [None, None];
            for (_, out) in reg.shards.get(channel).into_iter().flatten() {
                let r3 = out.resp3();
                let frame = cached[usize::from(r3)]
                    .get_or_insert_with(|| encode_message(r3, Kind::Shard, b"", channel, message))
                    .clone();
                if out.push(frame) {
                    count += 1;
                }
            }
        }
        self.stats
            .delivered
            .fetch_add(count as u64, Ordering::Relaxed);
        count
    }

    /// Channels (or shard channels) with at least one subscriber, those
    /// matching `pattern` if given.
    pub fn channels(&self, kind: Kind, pattern: Option<&[u8]>) -> Vec<Bytes> {
        let reg = lock(&self.registry);
        let map = match kind {
            Kind::Shard => &reg.shards,
            _ => &reg.channels,
        };
        map.keys()
            .filter(|c| pattern.is_none_or(|p| glob::matches(p, c)))
            .cloned()
            .collect()
    }

    /// Subscribers of a channel or shard channel (patterns not counted,
    /// as in Redis).
    pub fn numsub(&self, kind: Kind, channel: &[u8]) -> usize {
        let reg = lock(&self.registry);
        let map = match kind {
            Kind::Shard => &reg.shards,
            _ => &reg.channels,
        };
        map.get(channel).map_or(0, Vec::len)
    }

    /// Patterns with at least one subscriber.
    pub fn numpat(&self) -> usize {
        lock(&self.registry).patterns.len()
    }

    /// Channels and patterns subscribed to, for status.
    pub fn counts(&self) -> (usize, usize) {
        let reg = lock(&self.registry);
        (reg.channels.len(), reg.patterns.len())
    }

    /// Shard channels subscribed to.
    pub fn shard_count(&self) -> usize {
        lock(&self.registry).shards.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_the_confirmation_and_patterns_follow_channels() {
        let b = Broker::default();
        let out = Arc::new(Outbox::default());
        assert!(b.subscribe(
            Kind::Channel,
            Bytes::from_static(b"news"),
            1,
            &out,
            Bytes::from_static(b"S1")
        ));
        assert!(b.subscribe(
            Kind::Pattern,
            Bytes::from_static(b"n*"),
            1,
            &out,
            Bytes::from_static(b"P1")
        ));
        let other = Arc::new(Outbox::default());
        assert!(!b.subscribe(
            Kind::Channel,
            Bytes::from_static(b"news"),
            2,
            &other,
            Bytes::new()
        ));
        assert_eq!(b.publish(b"news", b"hi"), 3);
        let (chunks, closed) = out.take();
        assert_eq!(closed, None);
        assert_eq!(
            chunks,
            [
                Bytes::from_static(b"S1"),
                Bytes::from_static(b"P1"),
                Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"),
                Bytes::from_static(
                    b"*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
                ),
            ]
        );
        other.take();
        other.set_resp3(true);
        b.publish(b"news", b"x");
        assert_eq!(
            other.take().0,
            [Bytes::from_static(
                b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$1\r\nx\r\n"
            )]
        );
        b.unsubscribe(Kind::Channel, b"news", 1);
        b.unsubscribe(Kind::Channel, b"news", 2);
        assert_eq!(b.numsub(Kind::Channel, b"news"), 0);
        assert_eq!(b.channels(Kind::Channel, None), Vec::<Bytes>::new());
        assert_eq!(b.numpat(), 1);
    }

    #[test]
    fn a_subscriber_that_does_not_read_is_cut_off() {
        let b = Broker::default();
        let out = Arc::new(Outbox::default());
        b.subscribe(
            Kind::Channel,
            Bytes::from_static(b"c"),
            1,
            &out,
            Bytes::new(),
        );
        let message = vec![b'x'; 64 * 1024];
        let mut n = 0;
        while out.take_peek_open() {
            b.publish(b"c", &message);
            n += 1;
            assert!(n < 1000, "never cut off");
        }
        assert!(n * message.len() >= OUTPUT_HARD_LIMIT);
        assert_eq!(out.take(), (vec![], Some(Closed::Slow)));
    }

    /// An outbox on one end of a loopback connection, and the other end.
    async fn socket_outbox() -> (Arc<Outbox>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (_rd, wr) = client.expect("connect").into_split();
        let (peer, _) = accepted.expect("accept");
        (Arc::new(Outbox::new(Arc::new(wr))), peer)
    }

    /// No timeout around it: under paused time a timer would fire while
    /// the runtime waits for the socket. The bytes were written before
    /// this reads them.
    async fn read_exactly(peer: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        peer.read_exact(&mut got).await.expect("read");
        got
    }

    #[tokio::test(start_paused = true)]
    async fn output_goes_straight_to_the_socket_and_a_burst_is_queued_whole() {
        let (out, mut peer) = socket_outbox().await;
        // Nothing queued: written at once, nothing for the writer.
        assert!(out.push(Bytes::from_static(b"one ")));
        assert_eq!(out.queued(), 0);
        assert_eq!(read_exactly(&mut peer, 4).await, b"one ");
        // Right behind it (paused time: no time passed): queued, so that
        // the rest of a burst leaves in one write.
        assert!(out.push(Bytes::from_static(b"two ")));
        assert!(out.push(Bytes::from_static(b"three ")));
        assert_eq!(out.queued(), 10);
        let (chunks, closed) = out.take();
        assert_eq!(chunks.concat(), b"two three ");
        assert_eq!(closed, None);
        // Taken but not yet written: what follows waits behind it, even
        // after the gap.
        tokio::time::advance(BURST_GAP).await;
        assert!(out.push(Bytes::from_static(b"four ")));
        assert_eq!(out.queued(), 15);
        out.written(10);
        assert_eq!(out.take().0.concat(), b"four ");
        out.written(5);
        // Nothing left and the gap passed: straight to the socket again.
        tokio::time::advance(BURST_GAP).await;
        assert!(out.push(Bytes::from_static(b"five")));
        assert_eq!(out.queued(), 0);
        assert_eq!(read_exactly(&mut peer, 4).await, b"five");
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_socket_does_not_take_is_queued_in_order() {
        let (out, mut peer) = socket_outbox().await;
        // The peer reads nothing: the socket's buffers fill, and the rest
        // of the first write that does not fit is queued behind it.
        let chunk = Bytes::from(vec![b'a'; 1024 * 1024]);
        let mut pushed = 0;
        while out.queued() == 0 {
            tokio::time::advance(BURST_GAP).await;
            assert!(out.push(chunk.clone()));
            pushed += chunk.len();
            assert!(pushed < 64 * 1024 * 1024, "the socket never filled");
        }
        let held = out.queued();
        assert!(held > 0 && held <= chunk.len());
        tokio::time::advance(BURST_GAP).await;
        assert!(out.push(Bytes::from_static(b"last")));
        assert_eq!(out.queued(), held + 4);
        // Everything arrives once the writer drains the queue, in order.
        let writer = {
            let out = out.clone();
            async move {
                let (chunks, _) = out.take();
                let n = chunks.iter().map(|c| c.len()).sum();
                let socket = lock(&out.queue).socket.clone().expect("socket");
                super::super::write_chunks(&socket, &chunks)
                    .await
                    .expect("write");
                out.written(n);
            }
        };
        let (got, ()) = tokio::join!(read_exactly(&mut peer, pushed + 4), writer);
        assert!(got[..pushed].iter().all(|&b| b == b'a'));
        assert_eq!(&got[pushed..], b"last");
        assert_eq!(out.queued(), 0);
    }

    impl Outbox {
        fn take_peek_open(&self) -> bool {
            lock(&self.queue).closed.is_none()
        }
    }
}
