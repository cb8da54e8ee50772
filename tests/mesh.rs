//! Integration tests of the mesh runtime: real nodes on loopback ports.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachecast::{Event, FlushReason, InvalidateError, Item};
use common::{Cluster, Mode, Proxy, check_no_silent_gap, wait_until};

const LONG: Duration = Duration::from_secs(30);

/// Every node sends `per_node` invalidations at once; every other node gets
/// each exactly once, in origin order, with no flush.
async fn all_to_all(n: usize, per_node: u64) {
    let mut c = Cluster::start(n).await;
    c.wait_connected(Duration::from_secs(5)).await;
    let mut senders = Vec::new();
    for i in 0..n {
        let h = c.h(i).clone();
        senders.push(tokio::spawn(async move {
            for k in 0..per_node {
                let key = k.to_string();
                if k % 1000 == 999 {
                    h.invalidate_cache("org.hisp.dhis.Whole").expect("send");
                } else {
                    h.invalidate("org.hisp.dhis.user.User", &key).expect("send");
                }
                if k % 4096 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let expected = per_node * (n as u64 - 1);
    for i in 0..n {
        let r = &c.recorders[i];
        r.wait_for("all invalidations", LONG, |evs| {
            evs.iter()
                .filter(|e| matches!(e, Event::Invalidated { .. } | Event::CacheCleared { .. }))
                .count() as u64
                >= expected
        })
        .await;
        for j in (0..n).filter(|&j| j != i) {
            let seqs = r.seqs_from(&c.id(j));
            assert_eq!(seqs.len() as u64, per_node, "node {i} from node {j}: count");
            assert!(
                seqs.iter().zip(1..).all(|(s, want)| *s == want),
                "node {i} from node {j}: not 1..={per_node} in order"
            );
        }
        assert_eq!(r.flushes(), 0, "node {i} got a flush");
    }
    // Acks trim every buffer once everything is delivered.
    for i in 0..n {
        let h = c.h(i).clone();
        wait_until("buffers trimmed by acks", Duration::from_secs(10), || {
            h.status().buffered == 0
        })
        .await;
    }
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exactly_once_in_order() {
    all_to_all(2, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exactly_once_in_order() {
    all_to_all(3, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_100k_invalidations_exactly_once_in_order() {
    all_to_all(5, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_wait_reports_acks_and_missing_peers() {
    let (mut c, mut listeners) = Cluster::reserve(3).await;
    // Node 2 is down: its port is closed.
    listeners.pop();
    let mut ls = listeners.into_iter();
    c.start_node(0, ls.next()).await;
    c.start_node(1, ls.next()).await;
    let h0 = c.h(0).clone();
    wait_until("0 and 1 connected", Duration::from_secs(5), || {
        h0.status().peers[0].connected
    })
    .await;
    let out = h0
        .invalidate_and_wait(
            Item::Key {
                cache: Arc::from("c"),
                key: Arc::from("k"),
            },
            Duration::from_millis(500),
        )
        .await
        .expect("sent");
    assert_eq!(out.acked, vec![Arc::<str>::from(c.id(1))]);
    assert_eq!(out.not_acked, vec![Arc::<str>::from(c.id(2))]);
    // Bad input is refused before anything is sent.
    assert!(matches!(
        h0.invalidate("", "k"),
        Err(InvalidateError::Invalid(_))
    ));
    let long = "x".repeat(64 * 1024 + 1);
    assert!(matches!(
        h0.invalidate("c", &long),
        Err(InvalidateError::Invalid(_))
    ));
    c.shutdown_all().await;
}

/// A node that is down at first comes up later: it connects, and gets
/// what it missed (large buffer) or a flush (small).
async fn late_peer(buffer: usize, sent: u64) -> (Vec<Event>, String) {
    let (mut c, mut listeners) = Cluster::reserve(2).await;
    c.buffer = buffer;
    let late = listeners.pop().expect("listener");
    drop(late);
    c.start_node(0, listeners.pop()).await;
    for k in 0..sent {
        c.h(0).invalidate("c", &k.to_string()).expect("send");
    }
    // Node 0 has failed to dial at least once (it is in its backoff).
    let h0 = c.h(0).clone();
    wait_until("node 0 failed to dial", Duration::from_secs(5), || {
        h0.status().peers[0].last_error.is_some()
    })
    .await;
    // How soon it connects (at once, not after node 0's backoff) is
    // measured exactly under paused time: tests/paused.rs,
    // a_peer_that_starts_late_is_connected_at_once.
    c.start_node(1, None).await;
    let r = c.recorders[1].clone();
    r.wait_for("peer up", Duration::from_secs(10), |evs| {
        evs.iter().any(|e| matches!(e, Event::PeerUp { .. }))
    })
    .await;
    let origin = c.id(0);
    r.wait_for("the last invalidation", LONG, |evs| {
        evs.iter()
            .any(|e| matches!(e, Event::Invalidated { seq, .. } if *seq == sent))
    })
    .await;
    let evs = r.events();
    c.shutdown_all().await;
    (evs, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_peer_gets_a_replay_when_the_buffer_holds_it() {
    let (evs, origin) = late_peer(10_000, 5_000).await;
    let (missing, flushes) = check_no_silent_gap(&evs, &origin, 5_000);
    assert_eq!((missing, flushes), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_peer_gets_a_flush_when_the_buffer_overflowed() {
    let (evs, origin) = late_peer(100, 5_000).await;
    let (missing, flushes) = check_no_silent_gap(&evs, &origin, 5_000);
    assert_eq!(flushes, 1);
    assert_eq!(missing, 4_900);
    assert!(evs.iter().any(|e| matches!(
        e,
        Event::Flush {
            reason: FlushReason::FromPeer { seq: 4_900 },
            ..
        }
    )));
}

/// Node 0 streams to node 1 through a proxy that misbehaves; after it
/// recovers, node 1 has every invalidation or a flush in place of the
/// missing ones, never a silent gap.
async fn faulty_link(buffer: usize, fault: impl Fn(&Proxy, u64)) -> (u64, usize) {
    let (mut c, listeners) = Cluster::reserve(2).await;
    c.buffer = buffer;
    let proxy = c
        .start_through_proxy(listeners, (0, 1), Duration::from_secs(5))
        .await;
    let total = 30_000u64;
    for k in 0..total {
        c.h(0).invalidate("c", &k.to_string()).expect("send");
        if k % 3000 == 1500 {
            fault(&proxy, k);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    proxy.set(Mode::Forward);
    let h0 = c.h(0).clone();
    wait_until("node 1 acked everything", LONG, || {
        let st = h0.status();
        st.peers[0].acked_seq == total
    })
    .await;
    // Acked once queued for the application: its callback may come after.
    c.recorders[1]
        .wait_for("the last invalidation", LONG, |evs| {
            evs.iter()
                .any(|e| matches!(e, Event::Invalidated { seq, .. } if *seq == total))
        })
        .await;
    let result = check_no_silent_gap(&c.recorders[1].events(), &c.id(0), total);
    assert!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst) > 1,
        "the fault did reconnect"
    );
    c.shutdown_all().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_nothing() {
    let (missing, flushes) = faulty_link(65_536, |p, _| p.cut()).await;
    assert_eq!((missing, flushes), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_bytes_lose_nothing() {
    // Dropping bytes desynchronises the framing: the receiver sees garbage,
    // closes, and the sender replays from what was applied.
    let (missing, flushes) = faulty_link(65_536, |p, _| {
        p.drop_next(7);
    })
    .await;
    assert_eq!((missing, flushes), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_with_a_small_buffer_flushes_instead_of_losing() {
    let (missing, flushes) = faulty_link(500, |p, k| {
        if k < 20_000 {
            p.set(Mode::Stall);
        } else {
            p.set(Mode::Forward);
        }
        p.cut();
    })
    .await;
    // check_no_silent_gap asserted that nothing went missing silently. The
    // stall held back the 18,500 invalidations from 1,501 to 19,999 (at
    // least) against a buffer of 500: entries were dropped, and a flush
    // stands in for them.
    assert!(
        missing >= 18_500 - 500,
        "only {missing} missing: the stall did not hold the link"
    );
    assert!(flushes >= 1, "{missing} missing without a flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restart_flushes_and_graceful_restart_does_not() {
    let mut c = Cluster::start(2).await;
    c.wait_connected(Duration::from_secs(5)).await;
    for k in 0..100 {
        c.h(0).invalidate("c", &k.to_string()).expect("send");
    }
    let r1 = c.recorders[1].clone();
    r1.wait_for("100 invalidations", LONG, |evs| {
        evs.iter()
            .filter(|e| matches!(e, Event::Invalidated { .. }))
            .count()
            == 100
    })
    .await;

    // Crash: no goodbye.
    c.nodes[0].take().expect("node 0").abort().await;
    r1.wait_for("peer down", Duration::from_secs(5), |evs| {
        evs.iter().any(|e| matches!(e, Event::PeerDown { .. }))
    })
    .await;
    c.start_node(0, None).await;
    r1.wait_for("peer up again", Duration::from_secs(5), |evs| {
        evs.iter()
            .filter(|e| matches!(e, Event::PeerUp { .. }))
            .count()
            == 2
    })
    .await;
    c.h(0).invalidate("c", "after-crash").expect("send");
    r1.wait_for("after-crash", LONG, |evs| {
        evs.iter()
            .any(|e| matches!(e, Event::Invalidated { key, .. } if &**key == "after-crash"))
    })
    .await;
    let restarted = r1.count(|e| {
        matches!(
            e,
            Event::Flush {
                reason: FlushReason::PeerRestarted,
                ..
            }
        )
    });
    assert_eq!(restarted, 1, "a crash costs exactly one flush");
    assert_eq!(r1.flushes(), 1);

    // Graceful: goodbye, then restart — no flush.
    r1.clear();
    c.h(0).invalidate("c", "before-shutdown").expect("send");
    c.nodes[0].take().expect("node 0").shutdown().await;
    c.start_node(0, None).await;
    c.h(0).invalidate("c", "after-graceful").expect("send");
    r1.wait_for("after-graceful", LONG, |evs| {
        evs.iter()
            .any(|e| matches!(e, Event::Invalidated { key, .. } if &**key == "after-graceful"))
    })
    .await;
    assert!(
        r1.events()
            .iter()
            .any(|e| matches!(e, Event::Invalidated { key, .. } if &**key == "before-shutdown")),
        "drained before goodbye"
    );
    assert_eq!(
        r1.flushes(),
        0,
        "a clean restart costs no flush: {:?}",
        r1.events()
    );
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_link_is_detected_by_heartbeats() {
    let (mut c, listeners) = Cluster::reserve(2).await;
    let proxy = c
        .start_through_proxy(listeners, (0, 1), Duration::from_secs(5))
        .await;
    proxy.set(Mode::Stall);
    let stalled = Instant::now();
    for r in [&c.recorders[0], &c.recorders[1]] {
        r.wait_for("peer down", Duration::from_secs(6), |evs| {
            evs.iter().any(|e| matches!(e, Event::PeerDown { .. }))
        })
        .await;
    }
    let detected = stalled.elapsed();
    assert!(detected < Duration::from_secs(5), "took {detected:?}");
    // And it recovers once the path works again.
    proxy.set(Mode::Forward);
    proxy.cut();
    c.wait_connected(Duration::from_secs(10)).await;
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_when_a_peer_never_comes() {
    let (mut c, mut listeners) = Cluster::reserve(2).await;
    c.buffer = 1000;
    drop(listeners.pop());
    c.start_node(0, listeners.pop()).await;
    let h = c.h(0).clone();
    for k in 0..1_000_000u64 {
        h.invalidate("org.hisp.dhis.user.User", &k.to_string())
            .expect("send");
    }
    let st = h.status();
    assert_eq!(st.last_seq, 1_000_000);
    assert_eq!(st.buffered, 1000, "held at the bound");
    assert_eq!(st.peers[0].queued, 1001, "the bound plus one pending flush");
    assert!(st.buffer_overflows > 0);
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_never_blocks_from_many_tasks() {
    let (mut c, listeners) = Cluster::reserve(3).await;
    // Large enough that nothing overflows: every invalidation must arrive.
    c.buffer = 400_000;
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    c.wait_connected(Duration::from_secs(5)).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let h = c.h(0).clone();
        tasks.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for k in 0..25_000 {
                let start = Instant::now();
                h.invalidate("c", &format!("{t}-{k}")).expect("send");
                worst = worst.max(start.elapsed());
            }
            worst
        }));
    }
    let mut worst = Duration::ZERO;
    for t in tasks {
        worst = worst.max(t.await.expect("task"));
    }
    // A sanity bound only: a call that waited on the network would take
    // far longer than this on any machine.
    assert!(worst < Duration::from_secs(1), "slowest call {worst:?}");
    for i in 1..3 {
        let r = &c.recorders[i];
        r.wait_for("200k invalidations", LONG, |evs| {
            evs.iter()
                .any(|e| matches!(e, Event::Invalidated { seq: 200_000, .. }))
        })
        .await;
        assert_eq!(check_no_silent_gap(&r.events(), &c.id(0), 200_000), (0, 0));
    }
    c.shutdown_all().await;
}

/// The sequence numbers of the next `n` invalidations on `events`; a
/// flush, the stream's end or a silence of `LONG` fails the test.
async fn invalidation_seqs(events: &mut cachecast::Events, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        match tokio::time::timeout(LONG, events.recv())
            .await
            .expect("event in time")
        {
            Some(Event::Invalidated { seq, .. }) => seqs.push(seq),
            Some(Event::Flush { reason, .. }) => panic!("unexpected flush: {reason}"),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_event_in_order() {
    let mut c = Cluster::start(2).await;
    let mut events = c.h(1).subscribe();
    c.wait_connected(Duration::from_secs(5)).await;
    let reader = tokio::spawn(async move { invalidation_seqs(&mut events, 1000).await });
    for k in 0..1000 {
        c.h(0).invalidate("c", &k.to_string()).expect("send");
    }
    let seqs = reader.await.expect("reader");
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    c.shutdown_all().await;
}

/// Hazard: events between `start()` and `MeshHandle::subscribe()` were
/// acknowledged to their origin and reached no one. A stream taken from the
/// builder sees every event from the node's first: here, invalidations A
/// made before B even started, replayed the moment B is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_taken_before_start_misses_nothing() {
    let (la, lb) = (common::bind().await, common::bind().await);
    let (a, b) = (
        common::node(la.local_addr().expect("addr").port()),
        common::node(lb.local_addr().expect("addr").port()),
    );
    let node_a = cachecast::Mesh::builder(cachecast::ClusterConfig::new(a.clone(), [b.clone()]))
        .state_file(cachecast::StateFile::Off)
        .listener(la)
        .start()
        .await
        .expect("start a");
    for k in 0..100 {
        node_a.invalidate("c", &k.to_string()).expect("send");
    }
    let mut builder = cachecast::Mesh::builder(cachecast::ClusterConfig::new(b, [a]))
        .state_file(cachecast::StateFile::Off)
        .listener(lb);
    let mut events = builder.subscribe();
    let node_b = builder.start().await.expect("start b");
    let seqs = invalidation_seqs(&mut events, 100).await;
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
    node_a.shutdown().await;
    node_b.shutdown().await;
    // The stream ends with the node.
    let end = tokio::time::timeout(LONG, async { while events.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "the stream ended after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_gets_a_flush() {
    let (mut c, listeners) = Cluster::reserve(2).await;
    c.tuning.event_capacity = 64;
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    let mut slow = c.h(1).subscribe();
    c.wait_connected(Duration::from_secs(5)).await;
    for k in 0..1000 {
        c.h(0).invalidate("c", &k.to_string()).expect("send");
    }
    c.recorders[1]
        .wait_for("all 1000", LONG, |evs| {
            evs.iter()
                .any(|e| matches!(e, Event::Invalidated { seq: 1000, .. }))
        })
        .await;
    // 1000 events behind a 64-event buffer: a flush comes first.
    let first = tokio::time::timeout(LONG, slow.recv())
        .await
        .expect("in time");
    assert!(
        matches!(
            first,
            Some(Event::Flush {
                reason: FlushReason::Lagged { .. },
                ..
            })
        ),
        "{first:?}"
    );
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_and_the_mesh_keeps_working() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Cluster::start(2).await;
    c.wait_connected(Duration::from_secs(5)).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], c.ports[1]));
    // Garbage.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    // A well-formed hello from a node not in the config.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let hello = cachecast::wire::Message::Hello(cachecast::wire::Hello {
        magic: cachecast::wire::MAGIC,
        version: cachecast::wire::PROTOCOL_VERSION,
        node: "127.0.0.1:1".into(),
        incarnation: 1,
        nonce: [0; 32],
        last_applied: None,
        auth: false,
    });
    let mut frame = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(&mut cachecast::wire::FrameCodec::new(), &hello, &mut frame)
        .expect("encode");
    s.write_all(&frame).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.contains("not a configured peer"),
        "reject reason sent: {text:?}"
    );
    let h1 = c.h(1).clone();
    wait_until("two rejections counted", Duration::from_secs(5), || {
        h1.status().counters.rejected_connections >= 2
    })
    .await;
    c.h(0).invalidate("c", "still-works").expect("send");
    c.recorders[1]
        .wait_for(
            "delivery after the strangers",
            Duration::from_secs(5),
            |evs| {
                evs.iter()
                    .any(|e| matches!(e, Event::Invalidated { key, .. } if &**key == "still-works"))
            },
        )
        .await;
    c.shutdown_all().await;
}

/// An embedder must say whether the node keeps a state file: without a
/// choice the node does not start, rather than lose invalidations after a
/// crash without anyone having chosen that.
#[tokio::test]
async fn a_node_without_a_choice_of_state_file_does_not_start() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let me = cachecast::NodeAddr::new("127.0.0.1", port);
    let started = cachecast::Mesh::builder(cachecast::ClusterConfig::new(me, []))
        .listener(listener)
        .start()
        .await;
    let Err(err) = started else {
        panic!("started without a choice of state file");
    };
    assert!(
        matches!(err, cachecast::StartError::StateFileUnchosen),
        "{err}"
    );
    assert!(err.to_string().contains("StateFile::Off"), "{err}");
}
