//! One task per peer: dials it, says hello, and writes this node's
//! invalidations to it; reconnects with capped exponential backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_util::codec::{Encoder, FramedRead};
use tracing::{Instrument, debug, info, info_span, warn};

use super::redial::{Loudness, Redialer};
use super::ring::{Filled, Taken};
use super::session::{FromReceiver, InFlight, PingClock, from_receiver};
use crate::auth;
use crate::mesh::LinkError;
use crate::mesh::handshake;
use crate::mesh::inbound::{hello_for, identity_matches, parse_identity};
use crate::mesh::io::Io;
use crate::mesh::transport::Target;
use crate::mesh::{Dir, Shared, Silence, lock};
use crate::wire::{CodecError, Expect, FrameCodec, Hello, Message, Resume, Sealer};

/// Bytes of frames encoded per write while busy: large enough for one
/// syscall to carry thousands of invalidations, small enough to keep the
/// items taken from the ring per write few.
const WRITE_CHUNK: usize = 256 * 1024;

/// The link task for `peer`.
pub(crate) async fn run(shared: Arc<Shared>, peer: usize) {
    let id = shared.peers[peer].id.clone();
    let span = info_span!("link", peer = %id);
    async move {
        let mut redialer = Redialer::new(&shared.tuning, peer);
        loop {
            // How often the peer had reached us when this attempt began.
            let reached = shared.peers[peer].reached.load(Ordering::Acquire);
            let attempt = tokio::select! {
                r = connect(&shared, peer) => r,
                _ = shared.life.token.cancelled() => return,
            };
            match attempt {
                Ok(Session {
                    reader,
                    writer,
                    hello,
                    resume,
                    sealer,
                }) => {
                    let (resumed, acked, queued, ours) = {
                        let mut out = lock(&shared.out);
                        out.peer_position(peer, resume.last_applied);
                        let resumed = out.connected(peer, resume, hello.incarnation);
                        (
                            resumed,
                            out.acked(peer),
                            out.queued(peer),
                            out.incarnation(),
                        )
                    };
                    if let Some(why) = resumed.divergence {
                        shared.stats.diverged.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            resume_from = acked + 1,
                            behind = resumed.behind,
                            "the peer's position for this node is not believed: {why} (another \
                             party sent it invalidations under this node's identity, or forged \
                             its acks?); resuming where it can be trusted, so that it flushes \
                             rather than miss anything"
                        );
                    }
                    shared.peers[peer].acked.send_if_modified(|a| {
                        let changed = *a < acked;
                        *a = (*a).max(acked);
                        changed
                    });
                    {
                        let l = &mut lock(&shared.peers[peer].state).link;
                        if l.ever_connected {
                            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            shared.peers[peer]
                                .stats
                                .reconnects
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        l.ever_connected = true;
                        l.outbound_incarnation = hello.incarnation;
                        l.last_error = None;
                    }
                    // A peer that knew this run resumes: what it had not
                    // acknowledged is sent again from the buffer.
                    if resume.last_applied.is_some_and(|p| p.incarnation == ours) {
                        shared.stats.replayed.fetch_add(queued, Ordering::Relaxed);
                    }
                    info!(
                        incarnation = format_args!("{:016x}", hello.incarnation),
                        behind = resumed.behind,
                        "outbound link up"
                    );
                    shared.set_link(peer, Dir::Out, true, "");
                    // Sending may be due already.
                    shared.peers[peer].notify.notify_one();
                    let up_at = Instant::now();
                    let acked_something = AtomicBool::new(false);
                    let result =
                        session(&shared, peer, reader, writer, sealer, &acked_something).await;
                    lock(&shared.out).disconnected(peer);
                    redialer
                        .session_ended(up_at.elapsed(), acked_something.load(Ordering::Relaxed));
                    match result {
                        Ok(()) => {
                            shared.set_link(peer, Dir::Out, false, "shutting down");
                            return;
                        }
                        Err(e) => {
                            if e.is_protocol_error() {
                                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            let text = e.to_string();
                            match redialer.failure(&text, Instant::now()) {
                                Loudness::Warn => warn!(error = %text, "outbound link down"),
                                Loudness::Debug => debug!(error = %text, "outbound link down"),
                            }
                            lock(&shared.peers[peer].state).link.last_error = Some(text.clone());
                            shared.set_link(peer, Dir::Out, false, &text);
                        }
                    }
                }
                Err(e @ LinkError::Redial) => debug!("{e}"),
                Err(e) => {
                    let text = e.to_string();
                    lock(&shared.peers[peer].state).link.last_error = Some(text.clone());
                    match redialer.failure(&text, Instant::now()) {
                        Loudness::Warn => warn!(error = %text, "cannot reach peer; retrying"),
                        Loudness::Debug => debug!(error = %text, "cannot reach peer; retrying"),
                    }
                }
            }
            // The peer reached us during the attempt, or does while we
            // wait: it is reachable now.
            let info = &shared.peers[peer];
            let redial = info.redial.notified();
            let delay = redialer.next_delay(info.reached.load(Ordering::Acquire) != reached);
            if delay.is_zero() {
                debug!("the peer connected to us: redialling at once");
                continue;
            }
            tokio::select! {
                _ = sleep(delay) => {}
                _ = redial => debug!("the peer connected to us: redialling at once"),
                _ = shared.life.token.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await
}

type Reader = FramedRead<ReadHalf<Io>, FrameCodec>;

/// A connection whose handshake is complete.
struct Session {
    reader: Reader,
    writer: WriteHalf<Io>,
    /// The acceptor's hello.
    hello: Hello,
    /// Where the acceptor stands in our stream.
    resume: Resume,
    /// Tags our frames, under a shared secret.
    sealer: Option<Sealer>,
}

/// Dials the peer (resolving its name afresh) and completes the handshake.
async fn connect(shared: &Shared, peer: usize) -> Result<Session, LinkError> {
    let info = &shared.peers[peer];
    let hello_timeout = shared.tuning.hello_timeout;
    // One deadline covers the handshake from the connection on, TLS
    // included.
    // A dial still waiting for an answer when the peer reaches us is
    // given up and made again at once (its SYN was lost, most likely).
    let redial = info.redial.notified();
    let (io, deadline) = tokio::select! {
        r = shared.transport.dial(Target {
            from: &shared.config.node,
            to: &info.addr,
            via: info.dial,
            connect_timeout: shared.tuning.connect_timeout,
            hello_timeout: shared.tuning.hello_timeout,
        }) => r?,
        _ = redial => return Err(LinkError::Redial),
    };
    let (rd, mut wr) = tokio::io::split(io);
    // Nothing but the acceptor's Hello (or its Reject) is decoded first.
    let mut reader = FramedRead::new(rd, FrameCodec::handshake(Expect::HelloOrReject));
    // Read before the acceptor's incarnation is applied (section 9.9).
    let our_resume = lock(&info.state).resume();
    let ours = hello_for(shared);
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new();
    codec.encode(Message::Hello(ours.clone()), &mut buf)?;
    timeout_at(deadline, wr.write_all(&buf))
        .await
        .map_err(|_| LinkError::HelloTimeout(hello_timeout))??;
    buf.clear();
    let frame = next_frame(&mut reader, deadline, hello_timeout).await?;
    let hello = handshake::answer(frame, "Hello", |m| match m {
        Message::Hello(h) => Some(h),
        _ => None,
    })?;
    let checked = async {
        // The name resolved here: the only I/O among the checks.
        let named = match parse_identity(&hello.node) {
            Some(c) => identity_matches(&c, &info.addr).await,
            None => false,
        };
        let secret = shared.admission.secret.is_some();
        handshake::judge_acceptor(&hello, &info.id, named, secret, &shared.me)?;
        let mut hellos = None;
        if let Some(secret) = &shared.admission.secret {
            let pair = handshake::Hellos {
                role: auth::Role::Dialer,
                ours: &ours,
                theirs: &hello,
            };
            reader.decoder_mut().allow_next(Expect::AuthOrReject);
            let frame = next_frame(&mut reader, deadline, hello_timeout).await?;
            let proof = handshake::answer(frame, "Auth", |m| match m {
                Message::Auth { mac } => Some(mac),
                _ => None,
            })?;
            pair.check_proof(secret, &proof, &info.id)?;
            hellos = Some((secret, pair));
        }
        // The acceptor's incarnation tells of a restart even before its own
        // stream reaches us (it may be unable to). Applied before our proof,
        // so that a refusal (a Reject, never tagged) precedes it.
        shared.peer_incarnation(peer, hello.incarnation)?;
        Ok::<_, LinkError>(hellos.map(|(secret, pair)| (pair.proof(secret), secret)))
    }
    .await;
    let proof = match checked {
        Ok(p) => p,
        Err(e) => return Err(refuse(shared, &mut wr, e).await),
    };
    // Our proof, then our position for the acceptor (tagged from here on
    // under a secret: section 7.6 of the protocol).
    let mut sealer = None;
    if let Some((mac, secret)) = proof {
        codec.encode(Message::Auth { mac }, &mut buf)?;
        let (s, opener) = handshake::session(secret, &ours, &hello, auth::Role::Dialer);
        reader.decoder_mut().authenticate(opener);
        sealer = Some(s);
    }
    match &mut sealer {
        Some(s) => s.encode(&Message::Resume(our_resume), &mut buf)?,
        None => codec.encode(Message::Resume(our_resume), &mut buf)?,
    }
    timeout_at(deadline, wr.write_all(&buf))
        .await
        .map_err(|_| LinkError::HelloTimeout(hello_timeout))??;
    // Where to resume: said only once we proved ourselves.
    reader.decoder_mut().allow_next(Expect::ResumeOrReject);
    let frame = next_frame(&mut reader, deadline, hello_timeout).await?;
    let resume = handshake::answer(frame, "Resume", |m| match m {
        Message::Resume(r) => Some(r),
        _ => None,
    })?;
    reader.decoder_mut().established();
    Ok(Session {
        reader,
        writer: wr,
        hello,
        resume,
        sealer,
    })
}

/// Tells the acceptor why its hello or proof was refused (best effort, so
/// that its log says more than "closed"); returns the error.
async fn refuse(shared: &Shared, wr: &mut WriteHalf<Io>, e: LinkError) -> LinkError {
    {
        if matches!(
            e,
            LinkError::Protocol(_) | LinkError::Handshake(_) | LinkError::Refused(_)
        ) {
            let reject = Message::Reject {
                reason: format!("{} refuses: {e}", shared.me),
            };
            let mut buf = BytesMut::new();
            if FrameCodec::new().encode(&reject, &mut buf).is_ok() {
                let _ = timeout(Duration::from_secs(1), wr.write_all(&buf)).await;
            }
        }
    }
    e
}

/// Writes `buf`, bounded: a write that makes no progress for `dead_after`
/// (the peer stopped reading) fails the link; once shutdown has begun, the
/// write may only go on until the shutdown deadline.
async fn write_bounded(
    shared: &Shared,
    wr: &mut WriteHalf<Io>,
    buf: &[u8],
) -> Result<(), LinkError> {
    let dead_after = shared.tuning.dead_after;
    let mut written = 0;
    while written < buf.len() {
        // Each write call must make progress within `dead_after`: a slow
        // but moving peer is fine, one that stopped reading is not.
        let step = wr.write(&buf[written..]);
        tokio::pin!(step);
        let late = |_| LinkError::Stalled(shared.tuning.shutdown_timeout);
        let n = if shared.life.token.is_cancelled() {
            timeout_at(shared.shutdown_deadline(), &mut step)
                .await
                .map_err(late)?
        } else {
            // The write first: one that completes at once (the usual case)
            // registers nothing with the token.
            tokio::select! {
                biased;
                r = timeout(dead_after, &mut step) => r.map_err(|_| LinkError::Stalled(dead_after))?,
                _ = shared.life.token.cancelled() => {
                    timeout_at(shared.shutdown_deadline(), &mut step).await.map_err(late)?
                }
            }
        }?;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        written += n;
    }
    Ok(())
}

/// Encodes one frame, tagged under a shared secret.
fn encode(
    codec: &mut FrameCodec,
    sealer: Option<&mut Sealer>,
    msg: &Message,
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    match sealer {
        Some(s) => s.encode(msg, buf),
        None => codec.encode(msg, buf),
    }
}

/// The next handshake frame, before `deadline`.
async fn next_frame(
    reader: &mut Reader,
    deadline: Instant,
    limit: Duration,
) -> Result<Message, LinkError> {
    match timeout_at(deadline, reader.next()).await {
        Err(_) => Err(LinkError::HelloTimeout(limit)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(r)) => Ok(r?),
    }
}

/// What [`fill_chunk`] encoded.
struct Chunk {
    filled: Filled,
    /// The peer's `sent` after the last take.
    sent: u64,
    /// The last seq assigned, read under the lock of the last take.
    last_seq: u64,
    /// The last take found nothing more: everything up to `last_seq` is
    /// in the buffer (or was written before).
    exhausted: bool,
}

/// Encodes what `peer` has not been sent into `buf`, a frame at a time
/// (the ring's lock is held only to take each), until about
/// [`WRITE_CHUNK`] bytes or nothing is left.
fn fill_chunk(
    shared: &Shared,
    peer: usize,
    taken: &mut Taken,
    buf: &mut BytesMut,
    mut sealer: Option<&mut Sealer>,
) -> Result<Chunk, CodecError> {
    let mut chunk = Chunk {
        filled: Filled::default(),
        sent: 0,
        last_seq: 0,
        exhausted: false,
    };
    while buf.len() < WRITE_CHUNK {
        let f = {
            let mut out = lock(&shared.out);
            let f = out.take(peer, taken);
            chunk.sent = out.sent(peer);
            chunk.last_seq = out.last_seq();
            f
        };
        taken.encode(buf, sealer.as_deref_mut())?;
        if f.items == 0 {
            chunk.exhausted = true;
            break;
        }
        chunk.filled.items += f.items;
        chunk.filled.gap_flush |= f.gap_flush;
    }
    Ok(chunk)
}

/// Moves bytes until the link fails (an error) or the node shuts down
/// (`Ok`). Reading and writing run side by side, so that acks are read
/// while a large write is under way.
async fn session(
    shared: &Shared,
    peer: usize,
    mut reader: Reader,
    mut wr: WriteHalf<Io>,
    mut sealer: Option<Sealer>,
    acked_something: &AtomicBool,
) -> Result<(), LinkError> {
    let info = &shared.peers[peer];
    let dead_after = shared.tuning.dead_after;
    // Writes to time acks by. Both halves run in this task and never hold
    // it across an await.
    let in_flight: Mutex<InFlight> = Mutex::new(InFlight::default());
    let read = async {
        let mut silence = Silence::new(dead_after);
        loop {
            let next = tokio::select! {
                biased;
                next = reader.next() => next,
                () = silence.expired() => return Err(LinkError::Dead(dead_after)),
            };
            let msg = match next {
                None => return Err(LinkError::Closed),
                Some(r) => r?,
            };
            silence.heard();
            shared.heard(peer, Dir::Out);
            match from_receiver(msg)? {
                FromReceiver::Ack(pos) => {
                    let acked = lock(&shared.out).ack(peer, pos)?;
                    acked_something.store(true, Ordering::Relaxed);
                    lock(&in_flight).acked(acked, Instant::now(), |took| {
                        info.stats.ack_latency.record(took);
                    });
                    info.acked.send_if_modified(|a| {
                        let changed = *a < acked;
                        *a = (*a).max(acked);
                        changed
                    });
                }
                FromReceiver::Pong => {}
            }
        }
    };
    let write = async {
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK + 64 * 1024);
        // What is taken from the ring under its lock, encoded after it.
        let mut taken = Taken::default();
        let mut codec = FrameCodec::new();
        let mut clock = PingClock::new(shared.tuning.ping_every, Instant::now());
        // Both kept across passes, so that an idle wait sets no timer and
        // registers no waiter per write.
        let ping = sleep_until(clock.next());
        tokio::pin!(ping);
        let cancelled = shared.life.token.cancelled();
        tokio::pin!(cancelled);
        loop {
            // Checked on every pass: a long backlog must not hold up
            // shutdown past its deadline.
            if shared.life.token.is_cancelled() {
                break;
            }
            let chunk = fill_chunk(shared, peer, &mut taken, &mut buf, sealer.as_mut())?;
            let (filled, last_written) = (chunk.filled, chunk.sent);
            if filled.items > 0 {
                shared
                    .stats
                    .sent
                    .fetch_add(filled.items as u64, Ordering::Relaxed);
                info.stats
                    .sent
                    .fetch_add(filled.items as u64, Ordering::Relaxed);
                if filled.gap_flush {
                    shared
                        .stats
                        .gap_flushes_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                write_bounded(shared, &mut wr, &buf).await?;
                buf.clear();
                let now = Instant::now();
                clock.wrote(now);
                lock(&in_flight).wrote(last_written, now);
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => break,
                _ = info.notify.notified() => {}
                _ = &mut ping => {
                    // Not due if something was written since it was set.
                    if clock.due(Instant::now()) {
                        encode(&mut codec, sealer.as_mut(), &Message::Ping, &mut buf)?;
                        write_bounded(shared, &mut wr, &buf).await?;
                        buf.clear();
                        clock.wrote(Instant::now());
                    }
                    ping.as_mut().reset(clock.next());
                }
            }
        }
        if shared.life.aborted.load(Ordering::Acquire) {
            return Ok(());
        }
        // Graceful shutdown: drain, say goodbye, wait for the acks.
        let deadline = shared.shutdown_deadline();
        let drain = async {
            let last_seq = loop {
                // The last number is read under the lock of the take that
                // found nothing more, so the goodbye never names something
                // that was not written.
                let chunk = fill_chunk(shared, peer, &mut taken, &mut buf, sealer.as_mut())?;
                if !buf.is_empty() {
                    write_bounded(shared, &mut wr, &buf).await?;
                    buf.clear();
                }
                if chunk.exhausted {
                    break chunk.last_seq;
                }
            };
            encode(
                &mut codec,
                sealer.as_mut(),
                &Message::Goodbye { last_seq },
                &mut buf,
            )?;
            write_bounded(shared, &mut wr, &buf).await?;
            buf.clear();
            let mut acked = info.acked.subscribe();
            let _ = acked.wait_for(|a| *a >= last_seq).await;
            Ok::<(), LinkError>(())
        };
        match tokio::time::timeout_at(deadline, drain).await {
            Ok(r) => r?,
            Err(_) => warn!("peer did not acknowledge everything before the shutdown deadline"),
        }
        // TLS sends close_notify here: bounded like any write.
        let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
        Ok(())
    };
    // The reader never ends by itself without an error; the writer ends on
    // shutdown.
    tokio::select! {
        r = read => r,
        w = write => w,
    }
}
