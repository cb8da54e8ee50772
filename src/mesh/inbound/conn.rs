//! The listener, and one task per inbound connection: a peer's stream of
//! invalidations to this node.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(feature = "test-util")]
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::session::{FromSender, InboundEnd, SenderOrder};
use crate::auth;
use crate::config::NodeAddr;
use crate::mesh::error::Refusal;
use crate::mesh::handshake;
use crate::mesh::io::Io;
use crate::mesh::limits::{Admit, IpSlot, lookup};
#[cfg(feature = "test-util")]
use crate::mesh::memory::MemoryStream;
use crate::mesh::{Dir, Event, FlushReason, Rejected, Shared, Silence, lock};
use crate::wire::{
    CodecError, Expect, FrameCodec, Hello, MAC_LEN, MAGIC, Message, NONCE_LEN, PROTOCOL_VERSION,
    Position, Resume, Sealer,
};

/// Our hello. Positions travel in a `Resume` once the other side proved
/// itself (section 7.1 of the protocol), never in a hello.
pub(crate) fn hello_for(shared: &Shared) -> Hello {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        node: shared.me.to_string(),
        incarnation: lock(&shared.out).incarnation(),
        nonce,
        last_applied: None,
        auth: shared.admission.secret.is_some(),
    }
}

/// The addresses of `addr`'s host; none when it does not resolve in time.
async fn resolve(addr: &NodeAddr) -> Vec<IpAddr> {
    lookup(&addr.host, addr.port)
        .await
        .ok()
        .map(|a| a.iter().map(|a| a.ip().to_canonical()).collect())
        .unwrap_or_default()
}

/// Whether a claimed identity is the configured peer: equal ports, and the
/// same host name (ASCII case ignored) or intersecting addresses.
pub(crate) async fn identity_matches(claimed: &NodeAddr, configured: &NodeAddr) -> bool {
    if claimed.port != configured.port {
        return false;
    }
    if claimed.same_name(configured) {
        return true;
    }
    let (a, b) = tokio::join!(resolve(claimed), resolve(configured));
    a.iter().any(|ip| b.contains(ip))
}

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, mut incoming: Incoming, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            r = incoming.accept() => r,
            _ = shared.life.token.cancelled() => return,
        };
        let (stream, remote) = match accepted {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                // Typically out of file descriptors: wait instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Strangers are closed before anything is read from them. The
        // accept loop never waits for a name lookup: before the first one
        // is done, the connection's own task waits for it.
        let admit = shared.admission.allowlist.admit(remote.ip(), &tracker);
        if matches!(admit, Admit::No) {
            shared.reject_quietly(
                Rejected::NotAllowed,
                remote,
                "source address is not a configured peer's",
            );
            continue;
        }
        // Bounded work per source and in total, taken before spawning, so
        // that a flood cannot grow the number of tasks.
        let Ok(permit) = shared.admission.conn_limit.clone().try_acquire_owned() else {
            shared.reject_quietly(Rejected::Limit, remote, "too many connections open");
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            let allowed = match admit {
                Admit::Unknown => shared.admission.allowlist.permits(remote.ip()).await,
                Admit::Refreshing(_place) => {
                    shared.admission.allowlist.after_refresh(remote.ip()).await
                }
                Admit::Yes | Admit::No => true,
            };
            if !allowed {
                shared.reject_quietly(
                    Rejected::NotAllowed,
                    remote,
                    "source address is not a configured peer's",
                );
                return;
            }
            let Some(slot) = shared.admission.per_ip.enter(remote.ip()) else {
                shared.reject_quietly(
                    Rejected::Limit,
                    remote,
                    "too many handshakes from this address",
                );
                return;
            };
            let span = info_span!("inbound", remote = %remote);
            match stream {
                Conn::Tcp(stream) => serve(&shared, stream, remote, slot).instrument(span).await,
                #[cfg(feature = "test-util")]
                Conn::Memory(stream) => {
                    let deadline = Instant::now() + shared.tuning.hello_timeout;
                    let io = Io::Memory(stream);
                    serve_io(&shared, io, None, Some(remote.ip()), deadline, slot)
                        .instrument(span)
                        .await
                }
            }
            drop(permit);
        });
    }
}

/// Where inbound connections come from.
pub(crate) enum Incoming {
    Tcp(TcpListener),
    #[cfg(feature = "test-util")]
    Memory(mpsc::UnboundedReceiver<(MemoryStream, SocketAddr)>),
}

/// An accepted connection, before the handshake.
enum Conn {
    Tcp(TcpStream),
    #[cfg(feature = "test-util")]
    Memory(MemoryStream),
}

impl Incoming {
    /// The next connection; `None` once no more can come.
    async fn accept(&mut self) -> std::io::Result<Option<(Conn, SocketAddr)>> {
        match self {
            Incoming::Tcp(l) => l.accept().await.map(|(s, a)| Some((Conn::Tcp(s), a))),
            #[cfg(feature = "test-util")]
            Incoming::Memory(rx) => Ok(rx.recv().await.map(|(s, a)| (Conn::Memory(s), a))),
        }
    }
}

/// What the writer half of an inbound connection owes the peer.
#[derive(Debug, Clone, Copy, Default)]
struct Owed {
    ack: Option<Position>,
    pongs: u64,
}

/// Waits for the first byte and sets up TLS or plain TCP as configured;
/// refuses a peer that speaks the other.
async fn transport(
    shared: &Shared,
    stream: TcpStream,
    remote: SocketAddr,
    deadline: Instant,
) -> Option<(Io, Option<CertificateDer<'static>>)> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    match timeout_at(deadline, stream.peek(&mut first)).await {
        Err(_) => {
            shared.reject_quietly(
                Rejected::Handshake,
                remote,
                "sent nothing before the hello deadline",
            );
            return None;
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            shared.reject_quietly(Rejected::Handshake, remote, "closed before saying hello");
            return None;
        }
        Ok(Ok(_)) => {}
    }
    // A TLS record starts with 0x16 (handshake); a frame's length prefix,
    // at most 1 MiB, starts with 0x00.
    let speaks_tls = first[0] == 0x16;
    match (&shared.admission.tls, speaks_tls) {
        (Some(tls), true) => match timeout_at(deadline, tls.accept(stream)).await {
            Ok(Ok(s)) => {
                let cert = crate::tls::peer_certificate(&s);
                Some((Io::Server(Box::new(s)), cert))
            }
            Ok(Err(e)) => {
                shared.reject_quietly(Rejected::Tls, remote, &format!("TLS handshake failed: {e}"));
                None
            }
            Err(_) => {
                shared.reject_quietly(
                    Rejected::Tls,
                    remote,
                    "TLS handshake not finished before the deadline",
                );
                None
            }
        },
        (Some(_), false) => {
            let mut wr = stream;
            // Named, not "this node": the dialer logs this text as is.
            let reason = format!(
                "{} requires TLS (cachecast.tls.*) and the connecting node spoke plain TCP",
                shared.me
            );
            reject(shared, &mut wr, Rejected::Tls, &reason).await;
            None
        }
        (None, true) => {
            shared.reject_quietly(
                Rejected::Tls,
                remote,
                "the peer speaks TLS and this node has no cachecast.tls configured",
            );
            None
        }
        (None, false) => Some((Io::Plain(stream), None)),
    }
}

/// Serves one inbound connection to its end; every error stays here.
async fn serve(shared: &Shared, stream: TcpStream, remote: SocketAddr, slot: IpSlot<'_>) {
    let hello_timeout = shared.tuning.hello_timeout;
    let deadline = Instant::now() + hello_timeout;
    let Some((io, cert)) = transport(shared, stream, remote, deadline).await else {
        return;
    };
    serve_io(shared, io, cert, Some(remote.ip()), deadline, slot).await;
}

/// The handshake and the session over an established transport; `source`
/// is the connection's source address (none for an in-memory pipe).
pub(crate) async fn serve_io(
    shared: &Shared,
    io: Io,
    cert: Option<CertificateDer<'static>>,
    source: Option<IpAddr>,
    deadline: Instant,
    slot: IpSlot<'_>,
) {
    let (rd, mut wr) = tokio::io::split(io);
    // Nothing but a Hello is decoded before the handshake is complete.
    let mut reader = FramedRead::new(rd, FrameCodec::handshake(Expect::Hello));
    let first = tokio::select! {
        r = timeout_at(deadline, reader.next()) => r,
        _ = shared.life.token.cancelled() => return,
    };
    let hs = Rejected::Handshake;
    let hello = match first {
        Err(_) => return reject(shared, &mut wr, hs, "no hello before the deadline").await,
        Ok(None) => return reject(shared, &mut wr, hs, "closed before saying hello").await,
        Ok(Some(Err(e @ CodecError::Unexpected { .. }))) => {
            return reject(shared, &mut wr, hs, &e.to_string()).await;
        }
        Ok(Some(Err(e))) => {
            return reject(shared, &mut wr, hs, &format!("bad first frame: {e}")).await;
        }
        Ok(Some(Ok(Message::Hello(h)))) => h,
        Ok(Some(Ok(other))) => {
            let reason = format!("expected Hello, got {}", other.kind());
            return reject(shared, &mut wr, hs, &reason).await;
        }
    };
    if let Err(e) = handshake::check_hello(&hello) {
        return reject(shared, &mut wr, hs, &e.to_string()).await;
    }
    let found = timeout_at(deadline, find_peer(shared, &hello.node)).await;
    let Some(peer) = found.ok().flatten() else {
        let reason = format!("{:?} is not a configured peer of {}", hello.node, shared.me);
        return reject(shared, &mut wr, hs, &reason).await;
    };
    let id = shared.peers[peer].id.clone();
    let Claim { reply, incarnation } =
        match judge_claim(shared, peer, &hello, source, cert.as_ref()) {
            Ok(claim) => claim,
            Err((kind, reason)) => return reject(shared, &mut wr, kind, &reason).await,
        };
    let ours = hello_for(shared);
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new();
    let hellos = handshake::Hellos {
        role: auth::Role::Acceptor,
        ours: &ours,
        theirs: &hello,
    };
    let our_proof = shared.admission.secret.as_ref().map(|s| hellos.proof(s));
    // Without a secret the claim was judged above: our position goes with
    // the hello. With one, it waits for the dialer's proof.
    let encoded = codec
        .encode(Message::Hello(ours.clone()), &mut buf)
        .and_then(|()| match our_proof {
            Some(mac) => codec.encode(Message::Auth { mac }, &mut buf),
            None => codec.encode(Message::Resume(reply), &mut buf),
        });
    if encoded.is_err() || timeout_at(deadline, wr.write_all(&buf)).await.is_err() {
        return;
    }
    buf.clear();
    let mut sealer = None;
    if let Some(secret) = &shared.admission.secret {
        reader.decoder_mut().allow_next(Expect::AuthOrReject);
        let proof = match timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(Message::Auth { mac }))) => mac,
            Ok(Some(Ok(Message::Reject { reason }))) => {
                shared.reject_quietly_peer(
                    Rejected::Auth,
                    &id,
                    &format!("the peer refused us: {reason}"),
                );
                return;
            }
            Ok(Some(Ok(other))) => {
                let reason = format!("expected Auth, got {}", other.kind());
                return reject(shared, &mut wr, Rejected::Auth, &reason).await;
            }
            // A dialer that gave up (its own connect timeout, or a peer that
            // was stopped while its dial sat in our backlog) proved nothing
            // wrong: that is a broken handshake, not a failed authentication.
            Ok(None) => {
                let reason = "closed before proving the shared secret";
                return reject(shared, &mut wr, Rejected::Handshake, reason).await;
            }
            Ok(Some(Err(e))) => {
                let reason = format!("no proof of the shared secret: {e}");
                return reject(shared, &mut wr, Rejected::Handshake, &reason).await;
            }
            Err(_) => {
                return reject(
                    shared,
                    &mut wr,
                    Rejected::Auth,
                    "no proof of the shared secret before the deadline",
                )
                .await;
            }
        };
        if let Err((kind, reason)) = judge_proof(shared, peer, &hellos, secret, &proof) {
            return reject(shared, &mut wr, kind, &reason).await;
        }
        // Proven: every frame from here on is tagged both ways (section 7.6
        // of the protocol), our position first.
        let (mut s, opener) = handshake::session(secret, &ours, &hello, auth::Role::Acceptor);
        reader.decoder_mut().authenticate(opener);
        if s.encode(&Message::Resume(reply), &mut buf).is_err()
            || timeout_at(deadline, wr.write_all(&buf)).await.is_err()
        {
            return;
        }
        sealer = Some(s);
    }
    drop(slot);
    reader.decoder_mut().established();
    // Everything this connection may carry lies beyond what our `Resume`
    // said we hold from this incarnation (section 9.4 of the protocol).
    let floor = reply
        .last_applied
        .filter(|p| p.incarnation == incarnation)
        .map_or(0, |p| p.seq);
    // This connection supersedes any older one from the same peer.
    let conn_token = shared.life.token.child_token();
    let generation = lock(&shared.peers[peer].state).inbound_takes_over(
        incarnation,
        conn_token.clone(),
        Instant::now(),
    );
    info!(peer = %id, incarnation = format_args!("{incarnation:016x}"), "inbound link up");
    shared.set_inbound(peer, generation, true, "");
    // Our own link to the peer, if it is waiting for an answer or out a
    // backoff, redials.
    shared.peers[peer].reached.fetch_add(1, Ordering::AcqRel);
    shared.peers[peer].redial.notify_waiters();
    let reason = receive(
        shared,
        peer,
        incarnation,
        floor,
        Established {
            reader: &mut reader,
            wr: &mut wr,
            sealer,
        },
        &conn_token,
    )
    .await;
    if reason.is_protocol_error() {
        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    let reason = reason.to_string();
    // Down before the socket closes: a peer that reconnects as soon as it
    // sees the close must not find this link still counted as live.
    if shared.set_inbound(peer, generation, false, &reason) {
        warn!(peer = %id, reason = %reason, "inbound link down");
    } else {
        debug!(peer = %id, "superseded inbound connection closed");
    }
    drop((reader, wr));
}

/// Where a hello's claim stands once the peer it names is known.
#[derive(Debug)]
struct Claim {
    /// Our position for the peer, to be sent once it proved itself (or
    /// with our hello, without a secret).
    reply: Resume,
    incarnation: u64,
}

/// The checks of a hello claiming to be `peer`, made before this node says
/// anything but a refusal; `source` is the connection's source address
/// (none for an in-memory pipe), `cert` the peer's TLS certificate. Sync,
/// with no I/O: the driver sends what it decides.
///
/// Nothing changes state before the peer has proven who it is: with a
/// secret, the reply position is only read here (before the peer's
/// incarnation applies: section 9.9 of the protocol). Without one, no
/// proof is to come, so the claim is judged here, before our hello tells
/// the claimant anything of the peer it claims to be.
fn judge_claim(
    shared: &Shared,
    peer: usize,
    hello: &Hello,
    source: Option<IpAddr>,
    cert: Option<&CertificateDer<'static>>,
) -> Result<Claim, (Rejected, String)> {
    let id = &shared.peers[peer].id;
    let host = &shared.peers[peer].addr.host;
    // Without TLS nothing proves an identity but where it comes from: one
    // peer cannot speak for another.
    if cert.is_none()
        && let Some(ip) = source
        && !shared.admission.allowlist.is_address_of(peer, ip)
    {
        let reason = format!("{ip} is not an address of {id}, the peer it claims to be");
        return Err((Rejected::NotAllowed, reason));
    }
    if let Some(cert) = cert
        && !crate::tls::names(cert, host)
    {
        let reason =
            format!("the peer's certificate does not name {host}, the host it claims to be");
        return Err((Rejected::Tls, reason));
    }
    let secret = shared.admission.secret.is_some();
    handshake::check_secrets(secret, hello, &shared.me, id)
        .map_err(|e| (Rejected::Auth, e.to_string()))?;
    let reply = lock(&shared.peers[peer].state).resume();
    // Proven by a certificate, a newer connection is the peer itself and
    // takes over at once (section 2 of the protocol); without, it must not
    // silence a link that is demonstrably alive. (With a secret, the proof
    // is still to come: `judge_proof`.)
    if !secret {
        admit_incarnation(shared, peer, hello.incarnation, cert.is_some())
            .map_err(|r| (Rejected::Handshake, r.to_string()))?;
    }
    Ok(Claim {
        reply,
        incarnation: hello.incarnation,
    })
}

/// The dialer's proof of the secret, checked; then its incarnation
/// applies (it is the peer: it takes over at once).
fn judge_proof(
    shared: &Shared,
    peer: usize,
    hellos: &handshake::Hellos<'_>,
    secret: &auth::Secret,
    proof: &[u8; MAC_LEN],
) -> Result<(), (Rejected, String)> {
    hellos
        .check_proof(secret, proof, &shared.peers[peer].id)
        .map_err(|e| (Rejected::Auth, e.to_string()))?;
    admit_incarnation(shared, peer, hellos.theirs.incarnation, true)
        .map_err(|r| (Rejected::Handshake, r.to_string()))
}

/// Applies a proven (or, without a secret, admitted) peer's incarnation
/// (section 9.7): refuses a second live node under one identity, and
/// flushes for a new incarnation. Returns the refusal's reason.
fn admit_incarnation(
    shared: &Shared,
    peer: usize,
    incarnation: u64,
    proven: bool,
) -> Result<(), Refusal> {
    if !proven && let Some(reason) = shared.live_inbound(peer, incarnation) {
        return Err(reason);
    }
    shared.peer_incarnation(peer, incarnation)
}

/// Refuses a connection, telling the other side why (best effort).
async fn reject<W: AsyncWrite + Unpin>(shared: &Shared, wr: &mut W, kind: Rejected, reason: &str) {
    shared.refused(kind, None, reason);
    let mut buf = BytesMut::new();
    let msg = Message::Reject {
        reason: reason.to_string(),
    };
    if FrameCodec::new().encode(&msg, &mut buf).is_ok() {
        let _ = timeout(Duration::from_secs(1), wr.write_all(&buf)).await;
    }
    let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
}

/// A node identity as sent in a hello: `host:port` written in full.
pub(crate) fn parse_identity(node: &str) -> Option<NodeAddr> {
    let claimed: NodeAddr = node.parse().ok()?;
    claimed
        .to_string()
        .eq_ignore_ascii_case(node)
        .then_some(claimed)
}

/// The configured peer a hello's identity names, if any.
async fn find_peer(shared: &Shared, node: &str) -> Option<usize> {
    let claimed = parse_identity(node)?;
    if let Some(i) = shared.peers.iter().position(|p| p.addr.same_name(&claimed)) {
        return Some(i);
    }
    for (i, p) in shared.peers.iter().enumerate() {
        if identity_matches(&claimed, &p.addr).await {
            return Some(i);
        }
    }
    None
}

/// A connection whose handshake is complete, as [`receive`] drives it.
struct Established<'a> {
    reader: &'a mut FramedRead<ReadHalf<Io>, FrameCodec>,
    wr: &'a mut WriteHalf<Io>,
    /// Tags our acks and pongs, under a shared secret.
    sealer: Option<Sealer>,
}

/// Reads the peer's stream and applies it, while a second half writes
/// acks and pongs; returns why it ended. `floor` is the seq our hello
/// announced: the origin never sends it or anything below on this
/// connection.
async fn receive(
    shared: &Shared,
    peer: usize,
    incarnation: u64,
    mut floor: u64,
    conn: Established<'_>,
    conn_token: &CancellationToken,
) -> InboundEnd {
    let Established {
        reader,
        wr,
        mut sealer,
    } = conn;
    let (owed_tx, mut owed_rx) = watch::channel(Owed::default());
    let owed_tx = Arc::new(owed_tx);
    // What the peer's dispatch task calls once a batch's events reached
    // the application (see `fanout`).
    let ack_to: crate::mesh::fanout::AckTo = {
        let owed = owed_tx.clone();
        Arc::new(move |pos| owed.send_modify(|o| o.ack = Some(pos)))
    };
    let dead_after = shared.tuning.dead_after;
    let read = async {
        let mut order = SenderOrder::default();
        let mut silence = Silence::new(dead_after);
        loop {
            let next = tokio::select! {
                biased;
                next = reader.next() => next,
                () = silence.expired() => return InboundEnd::Dead(dead_after),
            };
            let msg = match next {
                None => return order.closed(),
                Some(Err(CodecError::Io(e))) => return InboundEnd::ReadFailed(e),
                Some(Err(e)) => return InboundEnd::BadFrame(e),
                Some(Ok(m)) => m,
            };
            silence.heard();
            shared.heard(peer, Dir::In);
            match order.frame(msg) {
                Err(end) => return end,
                Ok(FromSender::Resume(r)) => {
                    lock(&shared.out).peer_position(peer, r.last_applied);
                }
                Ok(FromSender::Batch(batch)) => {
                    let n = batch.items.len() as u64;
                    let info = &shared.peers[peer];
                    // Room in the peer's queue to the application first,
                    // waited for without any lock held (see `fanout`).
                    let bytes = batch.items.iter().map(|i| i.encoded_len_bound()).sum();
                    let patience = shared.tuning.ping_every.min(shared.tuning.dead_after / 3);
                    info.events
                        .room_for(batch.items.len(), bytes, patience)
                        .await;
                    // The turn first: this peer's events are queued for the
                    // application in the order decided (no application
                    // code runs here: its dispatch task runs it).
                    let mut events = Vec::with_capacity(batch.items.len());
                    let result = {
                        let _turn = lock(&info.turn);
                        let r = lock(&info.state).origin.batch(
                            incarnation,
                            &mut floor,
                            batch.first_seq,
                            batch.items,
                            &mut |e| events.push(e),
                        );
                        let applied = events.len() as u64;
                        for e in &events {
                            if let Event::Flush {
                                reason: reason @ FlushReason::Diverged { .. },
                                ..
                            } = e
                            {
                                shared.stats.diverged.fetch_add(1, Ordering::Relaxed);
                                warn!(%reason, "the peer's stream went below what this node held for it (another party claimed its identity?): flushing");
                            }
                        }
                        // Acknowledged once the application was told.
                        let ack = r.as_ref().ok().map(|&pos| (ack_to.clone(), pos));
                        shared.emit_all(peer, events.drain(..), ack);
                        shared.stats.received.fetch_add(applied, Ordering::Relaxed);
                        info.stats.received.fetch_add(applied, Ordering::Relaxed);
                        r
                    };
                    if result.is_err() {
                        return InboundEnd::NewerIncarnation;
                    }
                    debug!(items = n, "batch");
                }
                Ok(FromSender::Ping) => owed_tx.send_modify(|o| o.pongs += 1),
                Ok(FromSender::Goodbye { last_seq }) => {
                    lock(&shared.peers[peer].state)
                        .origin
                        .goodbye(incarnation, last_seq);
                    info!(last_seq, "peer said goodbye");
                }
            }
        }
    };
    let ack_delay = shared.tuning.ack_delay;
    let write = async {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut acked: Option<Position> = None;
        let mut ponged = 0u64;
        loop {
            if owed_rx.changed().await.is_err() {
                return InboundEnd::ReaderEnded;
            }
            // Deliveries first: whatever else is ready to run (other
            // connections' batches) goes before this ack, which then
            // covers every batch read meanwhile.
            tokio::task::yield_now().await;
            let owed = *owed_rx.borrow_and_update();
            let mut put = |msg: &Message, buf: &mut BytesMut| match sealer.as_mut() {
                Some(s) => s.encode(msg, buf),
                None => codec.encode(msg, buf),
            };
            if owed.ack != acked
                && let Some(pos) = owed.ack
            {
                let _ = put(&Message::Ack(pos), &mut buf);
                acked = owed.ack;
            }
            // One Pong answers every Ping since the last write: a flood of
            // Pings cannot pile up owed answers.
            if ponged < owed.pongs {
                let _ = put(&Message::Pong, &mut buf);
                ponged = owed.pongs;
            }
            // A peer that stops reading its acks is as dead as a silent one.
            match timeout(dead_after, wr.write_all(&buf)).await {
                Err(_) => return InboundEnd::Stalled(dead_after),
                Ok(Err(e)) => return InboundEnd::WriteFailed(e),
                Ok(Ok(())) => {}
            }
            buf.clear();
            // At most one write per `ack_delay`: the next ack covers every
            // batch read meanwhile, and the sender wakes once for them.
            if !ack_delay.is_zero() {
                tokio::time::sleep(ack_delay).await;
            }
        }
    };
    tokio::select! {
        r = read => r,
        w = write => w,
        _ = conn_token.cancelled() => {
            if shared.life.token.is_cancelled() {
                InboundEnd::ShuttingDown
            } else {
                InboundEnd::NewerConnection
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{ClusterConfig, SecretSource};
    use crate::mesh::{Fanout, Tuning, builder};

    const SECRET: &str = "a-shared-secret-0123456789";

    /// Node 127.0.0.1:1 with peer 0 at 127.0.0.1:2, and the secret if
    /// asked; its allowlist resolved.
    async fn node(secret: bool) -> Arc<Shared> {
        let mut config = ClusterConfig::new(
            NodeAddr::new("127.0.0.1", 1),
            [NodeAddr::new("127.0.0.1", 2)],
        );
        config.secret = secret.then(|| SecretSource::Inline(SECRET.into()));
        let tuning = Tuning::default();
        let fanout = Fanout::new(tuning.event_capacity, tuning.event_bytes);
        let shared =
            builder::build_shared(config, tuning, HashMap::new(), Vec::new(), fanout, None)
                .expect("shared");
        shared.admission.allowlist.refresh().await;
        shared
    }

    /// The peer's hello, as run `incarnation`.
    fn theirs(incarnation: u64, auth: bool) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: "127.0.0.1:2".into(),
            incarnation,
            nonce: [7; NONCE_LEN],
            last_applied: None,
            auth,
        }
    }

    /// The incarnation of peer 0 this node takes as current.
    fn held(shared: &Shared) -> Option<u64> {
        lock(&shared.peers[0].state)
            .applied()
            .map(|p| p.incarnation)
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[tokio::test]
    async fn a_claim_from_another_address_or_without_the_secret_is_refused() {
        let plain = node(false).await;
        let elsewhere = Some("10.9.9.9".parse().expect("ip"));
        let refused = judge_claim(&plain, 0, &theirs(5, false), elsewhere, None).expect_err("");
        assert_eq!(refused.0, Rejected::NotAllowed, "{}", refused.1);
        // It says it has a secret; this node has none: named, either side.
        let refused = judge_claim(&plain, 0, &theirs(5, true), LOOPBACK, None).expect_err("");
        assert_eq!(refused.0, Rejected::Auth, "{}", refused.1);
        let with = node(true).await;
        let refused = judge_claim(&with, 0, &theirs(5, false), LOOPBACK, None).expect_err("");
        assert_eq!(refused.0, Rejected::Auth, "{}", refused.1);
    }

    /// With a secret, a claim changes nothing before its proof: the
    /// position sent after the proof is the one held for the run we knew,
    /// and the new run applies only once proven.
    #[tokio::test]
    async fn with_a_secret_nothing_changes_before_the_proof() {
        let shared = node(true).await;
        let secret = shared.admission.secret.as_ref().expect("secret");
        shared.peer_incarnation(0, 5).expect("first run");
        assert_eq!(held(&shared), Some(5));
        let claim = judge_claim(&shared, 0, &theirs(6, true), LOOPBACK, None).expect("claim");
        assert_eq!(claim.incarnation, 6);
        assert_eq!(
            claim.reply.last_applied.map(|p| p.incarnation),
            Some(5),
            "the position read, not reset"
        );
        assert_eq!(held(&shared), Some(5), "a claim alone changes nothing");
        // A wrong proof: refused, and still nothing changed.
        let claimant = theirs(6, true);
        let ours = hello_for(&shared);
        let acceptor = handshake::Hellos {
            role: auth::Role::Acceptor,
            ours: &ours,
            theirs: &claimant,
        };
        let refused = judge_proof(&shared, 0, &acceptor, secret, &[0; MAC_LEN]).expect_err("");
        assert_eq!(refused.0, Rejected::Auth, "{}", refused.1);
        assert_eq!(held(&shared), Some(5));
        // The dialer's real proof: its run applies.
        let dialer = handshake::Hellos {
            role: auth::Role::Dialer,
            ours: &claimant,
            theirs: &ours,
        };
        let proof = dialer.proof(secret);
        judge_proof(&shared, 0, &acceptor, secret, &proof).expect("proven");
        assert_eq!(held(&shared), Some(6), "the new run replaced the old");
    }

    /// Without a secret nothing is to come after the hello: an unproven
    /// claim of the run whose link is alive is refused before our hello.
    #[tokio::test]
    async fn without_a_secret_a_live_links_run_cannot_be_claimed_again() {
        let shared = node(false).await;
        judge_claim(&shared, 0, &theirs(5, false), LOOPBACK, None).expect("first");
        let generation = lock(&shared.peers[0].state).inbound_takes_over(
            5,
            CancellationToken::new(),
            Instant::now(),
        );
        shared.set_inbound(0, generation, true, "");
        let refused = judge_claim(&shared, 0, &theirs(5, false), LOOPBACK, None).expect_err("");
        assert_eq!(refused.0, Rejected::Handshake);
        assert!(refused.1.contains("a live connection"), "{}", refused.1);
        // Another run while this one's link is up: two running nodes.
        let refused = judge_claim(&shared, 0, &theirs(6, false), LOOPBACK, None).expect_err("");
        assert_eq!(refused.0, Rejected::Handshake);
        assert!(refused.1.contains("two running nodes"), "{}", refused.1);
    }
}
