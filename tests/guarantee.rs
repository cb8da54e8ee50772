//! The delivery guarantee against the ways it was once broken, black-box:
//! real `cachecast run` processes on loopback, a relay in front of each
//! node's port, and the HTTP API and event stream as an application sees
//! them. Every invalidation a node accepted reaches each peer's
//! application, or a flush reaches it afterwards.
#![cfg(feature = "cli")]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use cachecast::wire::{
    Batch, FrameCodec, Hello, Item, MAGIC, Message, PROTOCOL_VERSION, Position, Resume,
};
use common::Mode;
use common::procs::{Cluster, LONG, Sidecar, Sse, Subscription, client, metric};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, FramedRead};

/// A flush from `origin` on the stream.
fn flush_from(evs: &[Sse], origin: &str) -> bool {
    evs.iter()
        .any(|e| e.event == "flush" && e.data["origin"] == json!(origin))
}

async fn invalidate(node: &Sidecar, key: &str) {
    let r = client()
        .post(node.url("/v1/invalidate"))
        .json(&json!({"cache": "c", "key": key}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 202, "{key}");
}

/// Hole: a run that accepted invalidations while cut off from its peers,
/// then crashed, after a run that had ended cleanly, looked to the peers
/// like a clean restart, and they never flushed. The state file, kept by
/// default, makes the next run's first invalidation a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_partition_is_covered_by_default() {
    let (mut c, relays) = Cluster::relayed(2, "").await;
    c.start_all().await;
    c.wait_connected().await;
    let a = c.nodes[0].id();
    let b_stream = Subscription::open(c.nodes[1].url("/v1/events"), None).await;
    // Run A0 ends cleanly: B sees its goodbye.
    let status = c.nodes[0].terminate();
    assert!(status.success(), "{status:?}");
    // Run A1 starts cut off from B both ways, accepts, and is killed.
    for r in &relays {
        r.set(Mode::Stall);
        r.cut();
    }
    c.nodes[0].spawn();
    c.nodes[0].wait_healthy().await;
    for i in 0..10 {
        invalidate(&c.nodes[0], &format!("unseen-{i}")).await;
    }
    c.nodes[0].kill9();
    // Run A2 reaches B. What A1 wrote into the stalled relays dies with
    // their connections: A1 was never heard.
    for r in &relays {
        r.cut();
        r.set(Mode::Forward);
    }
    c.nodes[0].spawn();
    c.nodes[0].wait_healthy().await;
    b_stream
        .wait_for("a flush from A's next run", |evs| flush_from(evs, &a))
        .await;
}

/// `node`'s incarnation, as its status gives it (in hex): what a process
/// on its server can read from its local API.
async fn incarnation_of(node: &Sidecar) -> u64 {
    let st = node.status().await;
    u64::from_str_radix(st["incarnation"].as_str().expect("incarnation"), 16).expect("hex")
}

/// What `node` reports of `peer` in its status.
async fn peer_status(node: &Sidecar, peer: &str) -> Value {
    let st = node.status().await;
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == json!(peer)))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `pred` holds of what `node` reports of `peer`.
async fn wait_peer(node: &Sidecar, peer: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    common::eventually(what, LONG, async || {
        let p = peer_status(node, peer).await;
        if pred(&p) { Ok(()) } else { Err(p) }
    })
    .await;
}

fn frame(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(msg, &mut buf).expect("encode");
    buf
}

fn key(k: &str) -> Item {
    Item::Key {
        cache: "c".into(),
        key: k.into(),
    }
}

/// Every key of `keys` reached the stream, or a flush from `origin` came
/// after index `from` of the stream (when they had been accepted).
fn covered(evs: &[Sse], origin: &str, keys: &[String], from: usize) -> Vec<String> {
    let flushed = flush_from(&evs[from.min(evs.len())..], origin);
    keys.iter()
        .filter(|k| {
            !flushed
                && !evs
                    .iter()
                    .any(|e| e.event == "invalidate" && e.data["key"] == json!(k))
        })
        .cloned()
        .collect()
}

/// Two sidecars S (node 0) and R (node 1) behind relays, with R's event
/// stream open: S's 1..15 applied at R and acknowledged to S, then R's
/// relay stalled, and S's 16..25 (`real`) accepted into the stalled link.
/// Cuts the connection through `relay` and lets the next one through; waits
/// until R's stream has every key of `real` from `origin`, or a flush
/// after event `from`.
async fn heal_and_wait_covered(
    relay: &common::Proxy,
    r_stream: &Subscription,
    origin: &str,
    real: &[String],
    from: usize,
) {
    relay.cut();
    relay.set(Mode::Forward);
    r_stream
        .wait_for("S's 16..25, or a flush after them", |evs| {
            covered(evs, origin, real, from).is_empty()
        })
        .await;
}

struct Stalled {
    c: Cluster,
    relays: Vec<common::Proxy>,
    r_stream: Subscription,
    /// R's events before 16..25 were accepted.
    from: usize,
    real: Vec<String>,
}

async fn stalled_after_15(extra: &str) -> Stalled {
    let (mut c, relays) = Cluster::relayed(2, extra).await;
    c.start_all().await;
    c.wait_connected().await;
    let (s_id, r_id) = (c.nodes[0].id(), c.nodes[1].id());
    let r_stream = Subscription::open(c.nodes[1].url("/v1/events"), None).await;
    for i in 1..=15 {
        invalidate(&c.nodes[0], &format!("before-{i}")).await;
    }
    wait_peer(&c.nodes[1], &s_id, "R applied S's 15", |p| {
        p["applied"][1] == json!(15)
    })
    .await;
    wait_peer(&c.nodes[0], &r_id, "S saw R's ack of 15", |p| {
        p["acked_seq"] == json!(15)
    })
    .await;
    // S's link to R stalls (everything that reaches R goes through its relay).
    relays[1].set(Mode::Stall);
    let from = r_stream.events().len();
    let real: Vec<String> = (16..=25).map(|i| format!("real-{i}")).collect();
    for k in &real {
        invalidate(&c.nodes[0], k).await;
    }
    Stalled {
        c,
        relays,
        r_stream,
        from,
        real,
    }
}

/// Hole: with neither secret nor TLS, a process on S's server (it reads S's
/// incarnation from S's local API) waits until S's link to R falls silent
/// (S meanwhile accepted 16..25 into the stalled link), claims S to R and
/// sends 16..20 of its own. R's position for S is then 20, in S's range;
/// S resumed past it and 16..20 never reached R, with no flush. Now R's
/// position carries the fingerprint of the item it applied there, S sees
/// it is not its own, and R flushes before it gets S's real 16..25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_in_range_cannot_make_a_node_skip_a_peers_invalidations() {
    let Stalled {
        c,
        relays,
        r_stream,
        from,
        real,
    } = stalled_after_15("").await;
    let (s_id, r_id) = (c.nodes[0].id(), c.nodes[1].id());
    wait_peer(&c.nodes[1], &s_id, "R's link from S down", |p| {
        p["inbound"] == json!(false)
    })
    .await;

    // The claimant, at S's address, straight to R's port.
    let incarnation = incarnation_of(&c.nodes[0]).await;
    let r_port: u16 = relays[1].target.port();
    let stream = TcpStream::connect(("127.0.0.1", r_port))
        .await
        .expect("connect");
    let (rd, mut wr) = stream.into_split();
    let mut rd = FramedRead::new(rd, FrameCodec::new());
    let next = async |rd: &mut FramedRead<_, FrameCodec>| {
        tokio::time::timeout(Duration::from_secs(5), rd.next())
            .await
            .ok()
            .flatten()
            .and_then(Result::ok)
    };
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        node: s_id.clone(),
        incarnation,
        nonce: [7; 32],
        last_applied: None,
        auth: false,
    });
    wr.write_all(&frame(&hello)).await.expect("hello");
    let Some(Message::Hello(theirs)) = next(&mut rd).await else {
        panic!("R did not take the claim");
    };
    // A version 1 node put its position in its hello; version 2 in a Resume.
    let position = if theirs.version >= 2 {
        let Some(Message::Resume(r)) = next(&mut rd).await else {
            panic!("no Resume");
        };
        let none = Message::Resume(Resume {
            last_applied: None,
            digest: [0; 16],
        });
        wr.write_all(&frame(&none)).await.expect("resume");
        r.last_applied
    } else {
        theirs.last_applied
    };
    assert_eq!(position.map(|p| p.seq), Some(15), "R's position for S");
    let forged = Message::Batch(Batch {
        first_seq: 16,
        items: (16..=20).map(|i| key(&format!("forged-{i}"))).collect(),
    });
    wr.write_all(&frame(&forged)).await.expect("batch");
    assert_eq!(
        next(&mut rd).await,
        Some(Message::Ack(Position {
            incarnation,
            seq: 20
        })),
        "R applied the claimant's 16..20"
    );
    drop((rd, wr));

    // S's link comes back.
    heal_and_wait_covered(&relays[1], &r_stream, &s_id, &real, from).await;
    assert!(
        metric(&c.nodes[0], "cachecast_diverged_total").await >= 1,
        "S counted the divergence"
    );
    let _ = r_id;
}

/// Hole: a relay on the path withheld S's batches 16..25 from R, injected
/// `Ack(S, 25)` toward S and cut the connection: S took the ack for R's,
/// resumed at 26, and R got neither 16..25 nor a flush. With a secret every
/// frame is now tagged, so the forged ack closes the link; without one, R's
/// position below what the same run of it acknowledged is divergence, and
/// S replays (or flushes). Either way R gets 16..25 or a flush.
async fn a_forged_ack_cannot_make_an_origin_skip(extra: &str) {
    let Stalled {
        c,
        relays,
        r_stream,
        from,
        real,
    } = stalled_after_15(extra).await;
    let s_id = c.nodes[0].id();
    let incarnation = incarnation_of(&c.nodes[0]).await;
    relays[1].inject_to_dialer(
        frame(&Message::Ack(Position {
            incarnation,
            seq: 25,
        }))
        .to_vec(),
    );
    // S read it: it took it for R's (acked 25), or refused the untagged
    // frame and closed the link. Then the path cuts the connection.
    wait_peer(
        &c.nodes[0],
        &c.nodes[1].id(),
        "S to read the forged ack",
        |p| p["acked_seq"] == json!(25) || p["outbound"] == json!(false),
    )
    .await;
    heal_and_wait_covered(&relays[1], &r_stream, &s_id, &real, from).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_under_a_secret_is_refused() {
    a_forged_ack_cannot_make_an_origin_skip("cachecast.secret = 0123456789abcdef0123456789abcdef")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_without_a_secret_is_caught_at_the_next_connection() {
    a_forged_ack_cannot_make_an_origin_skip("").await;
}
