//! The listener, and one task per inbound connection: a peer's stream of
//! invalidations to this node.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Dir, Shared, lock};
use crate::config::NodeAddr;
use crate::wire::{FrameCodec, Hello, MAGIC, Message, NONCE_LEN, PROTOCOL_VERSION, Position};

/// Our hello, carrying what we applied from the peer.
pub(super) fn hello_for(shared: &Shared, last_applied: Option<Position>) -> Message {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    Message::Hello(Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        node: shared.me.to_string(),
        incarnation: lock(&shared.out).incarnation(),
        nonce,
        last_applied,
        auth: false,
    })
}

async fn resolve(addr: &NodeAddr) -> Vec<IpAddr> {
    if let Ok(ip) = addr.host.parse::<IpAddr>() {
        return vec![ip];
    }
    match tokio::net::lookup_host((addr.host.as_str(), addr.port)).await {
        Ok(it) => it.map(|a| a.ip()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether a claimed identity is the configured peer: equal ports, and the
/// same host name (ASCII case ignored) or intersecting addresses.
pub(super) async fn identity_matches(claimed: &NodeAddr, configured: &NodeAddr) -> bool {
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
pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tracker: TaskTracker) {
    loop {
        // Take a permit first, so that a flood of connections cannot grow
        // the number of tasks without bound.
        let permit = tokio::select! {
            p = shared.conn_limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shared.token.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.token.cancelled() => return,
        };
        match accepted {
            Ok((stream, remote)) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    let span = info_span!("inbound", remote = %remote);
                    serve(&shared, stream).instrument(span).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Typically out of file descriptors: wait instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the writer half of an inbound connection owes the peer.
#[derive(Debug, Clone, Copy, Default)]
struct Owed {
    ack: Option<Position>,
    pongs: u64,
}

/// Serves one inbound connection to its end; every error stays here.
async fn serve(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new());
    let hello_timeout = shared.tuning.hello_timeout;
    let first = tokio::select! {
        r = timeout(hello_timeout, reader.next()) => r,
        _ = shared.token.cancelled() => return,
    };
    let hello = match first {
        Err(_) => {
            return reject(
                shared,
                &mut wr,
                &format!("no hello within {hello_timeout:?}"),
            )
            .await;
        }
        Ok(None) => return reject(shared, &mut wr, "closed before saying hello").await,
        Ok(Some(Err(e))) => return reject(shared, &mut wr, &format!("bad first frame: {e}")).await,
        Ok(Some(Ok(Message::Hello(h)))) => h,
        Ok(Some(Ok(other))) => {
            return reject(
                shared,
                &mut wr,
                &format!("expected Hello, got {}", other.kind()),
            )
            .await;
        }
    };
    if hello.magic != MAGIC {
        return reject(shared, &mut wr, "bad magic: not a cachecast peer").await;
    }
    // Each side sends the highest version it speaks and both use the
    // lower; this node speaks only version 1, so any version from 1 on will
    // do (a newer peer steps down to ours).
    if hello.version < PROTOCOL_VERSION {
        let reason = format!(
            "unsupported protocol version {} (this node speaks {PROTOCOL_VERSION})",
            hello.version
        );
        return reject(shared, &mut wr, &reason).await;
    }
    let found = timeout(hello_timeout, find_peer(shared, &hello.node)).await;
    let Some(peer) = found.ok().flatten() else {
        let reason = format!("{:?} is not a configured peer of {}", hello.node, shared.me);
        return reject(shared, &mut wr, &reason).await;
    };
    if hello.auth {
        let reason = "the peer has a shared secret (cachecast.secret) and this node has none";
        return reject(shared, &mut wr, reason).await;
    }
    let id = shared.peers[peer].id.clone();
    let incarnation = hello.incarnation;
    // This connection supersedes any older one from the same peer.
    let conn_token = shared.token.child_token();
    let generation = {
        let mut links = lock(&shared.links);
        let l = &mut links[peer];
        if let Some(old) = l.inbound_cancel.replace(conn_token.clone()) {
            old.cancel();
        }
        l.inbound_gen += 1;
        l.inbound_gen
    };
    let reply = {
        let mut origins = lock(&shared.origins);
        origins.hello(peer, incarnation, &mut |e| shared.emit(e))
    };
    let mut buf = BytesMut::new();
    let sent = FrameCodec::new().encode(hello_for(shared, reply), &mut buf);
    let reason = match sent {
        Err(e) => format!("cannot encode hello: {e}"),
        Ok(()) => match wr.write_all(&buf).await {
            Err(e) => format!("cannot send hello: {e}"),
            Ok(()) => {
                info!(peer = %id, incarnation = format_args!("{incarnation:016x}"), "inbound link up");
                shared.set_link(peer, Dir::In, true, "");
                receive(shared, peer, incarnation, reader, wr, &conn_token).await
            }
        },
    };
    let current = {
        let mut links = lock(&shared.links);
        let l = &mut links[peer];
        let current = l.inbound_gen == generation;
        if current {
            l.inbound_cancel = None;
        }
        current
    };
    if current {
        warn!(peer = %id, reason = %reason, "inbound link down");
        shared.set_link(peer, Dir::In, false, &reason);
    } else {
        debug!(peer = %id, "superseded inbound connection closed");
    }
}

/// Refuses a connection, telling the other side why (best effort).
async fn reject(shared: &Shared, wr: &mut OwnedWriteHalf, reason: &str) {
    shared
        .stats
        .rejected_connections
        .fetch_add(1, Ordering::Relaxed);
    warn!(reason, "connection refused");
    let mut buf = BytesMut::new();
    let msg = Message::Reject {
        reason: reason.to_string(),
    };
    if FrameCodec::new().encode(&msg, &mut buf).is_ok() {
        let _ = timeout(Duration::from_secs(1), wr.write_all(&buf)).await;
    }
    let _ = wr.shutdown().await;
}

/// A node identity as sent in a hello: `host:port` written in full.
pub(super) fn parse_identity(node: &str) -> Option<NodeAddr> {
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

/// Reads the peer's stream and applies it, while a second half writes
/// acks and pongs; returns why it ended.
async fn receive(
    shared: &Shared,
    peer: usize,
    incarnation: u64,
    mut reader: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    mut wr: OwnedWriteHalf,
    conn_token: &CancellationToken,
) -> String {
    let (owed_tx, mut owed_rx) = watch::channel(Owed::default());
    let dead_after = shared.tuning.dead_after;
    let read = async {
        let mut said_goodbye = false;
        loop {
            let msg = match timeout(dead_after, reader.next()).await {
                Err(_) => {
                    return format!("nothing heard for {dead_after:?} (dead or half-open link)");
                }
                Ok(None) if said_goodbye => return "the peer shut down (goodbye)".to_string(),
                Ok(None) => return "connection closed by the peer".to_string(),
                Ok(Some(Err(e))) => {
                    shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    return format!("bad frame: {e}");
                }
                Ok(Some(Ok(m))) => m,
            };
            shared.heard(peer);
            match msg {
                Message::Batch(batch) => {
                    let n = batch.items.len() as u64;
                    let result = {
                        let mut origins = lock(&shared.origins);
                        let mut applied = 0u64;
                        let r = origins.batch(
                            peer,
                            incarnation,
                            batch.first_seq,
                            batch.items,
                            &mut |e| {
                                applied += 1;
                                shared.emit(e)
                            },
                        );
                        shared.stats.received.fetch_add(applied, Ordering::Relaxed);
                        shared.peers[peer]
                            .stats
                            .received
                            .fetch_add(applied, Ordering::Relaxed);
                        r
                    };
                    match result {
                        Ok(pos) => {
                            owed_tx.send_modify(|o| o.ack = Some(pos));
                        }
                        Err(_) => return "superseded by a newer incarnation".to_string(),
                    }
                    debug!(items = n, "batch");
                }
                Message::Ping => owed_tx.send_modify(|o| o.pongs += 1),
                Message::Goodbye { last_seq } => {
                    lock(&shared.origins).goodbye(peer, incarnation, last_seq);
                    said_goodbye = true;
                    info!(last_seq, "peer said goodbye");
                }
                other => {
                    shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    return format!("unexpected {} from the sending side", other.kind());
                }
            }
        }
    };
    let write = async {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut acked: Option<Position> = None;
        let mut ponged = 0u64;
        loop {
            if owed_rx.changed().await.is_err() {
                return "reader ended".to_string();
            }
            let owed = *owed_rx.borrow_and_update();
            if owed.ack != acked
                && let Some(pos) = owed.ack
            {
                let _ = codec.encode(&Message::Ack(pos), &mut buf);
                acked = owed.ack;
            }
            while ponged < owed.pongs {
                let _ = codec.encode(&Message::Pong, &mut buf);
                ponged += 1;
            }
            if let Err(e) = wr.write_all(&buf).await {
                return format!("write failed: {e}");
            }
            buf.clear();
        }
    };
    tokio::select! {
        r = read => r,
        w = write => w,
        _ = conn_token.cancelled() => {
            if shared.token.is_cancelled() {
                "shutting down".to_string()
            } else {
                "superseded by a newer connection".to_string()
            }
        }
    }
}
