//! The timing of the mesh under paused time: nodes on an in-memory network
//! (`MemoryNetwork`), every timer on tokio's clock, which advances only when
//! every task waits. Heartbeats, dead-peer detection, backoff and replay are
//! then exact and fast, whatever the machine's load.

mod common;

use std::time::Duration;

use cachecast::{
    ClusterConfig, Event, MemoryNetwork, Mesh, MeshHandle, NodeAddr, StateFile, Tuning,
};
use common::{Recorder, check_no_silent_gap};
use tokio::time::Instant;

fn addr(i: u16) -> NodeAddr {
    NodeAddr::new("127.0.0.1", 4001 + i)
}

/// Starts node `i` of `n` on `net`, with the default (production) timers.
async fn node(net: &MemoryNetwork, i: u16, n: u16) -> (MeshHandle, Recorder) {
    let peers = (0..n).filter(|&j| j != i).map(addr);
    let (rec, cb) = Recorder::new();
    let h = Mesh::builder(ClusterConfig::new(addr(i), peers))
        .state_file(StateFile::Off)
        .tuning(Tuning {
            event_capacity: 1 << 16,
            ..Tuning::default()
        })
        .network(net.clone())
        .on_event(cb)
        .start()
        .await
        .expect("start");
    (h, rec)
}

/// Two nodes on a network of their own, connected.
async fn pair() -> (
    MemoryNetwork,
    (MeshHandle, Recorder),
    (MeshHandle, Recorder),
) {
    let net = MemoryNetwork::new();
    let a = node(&net, 0, 2).await;
    let b = node(&net, 1, 2).await;
    until("connected", Duration::from_secs(5), || {
        connected(&a.0) && connected(&b.0)
    })
    .await;
    (net, a, b)
}

/// Waits (in paused time) until `cond` holds; returns how long it took.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn connected(h: &MeshHandle) -> bool {
    h.status().peers.iter().all(|p| p.connected)
}

fn downs(r: &Recorder) -> usize {
    r.count(|e| matches!(e, Event::PeerDown { .. }))
}

#[tokio::test(start_paused = true)]
async fn an_idle_link_stays_up_on_heartbeats_alone() {
    let (_net, (a, ra), (b, rb)) = pair().await;
    // Ten minutes without an invalidation: pings keep both links alive.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(connected(&a) && connected(&b));
    assert_eq!((downs(&ra), downs(&rb)), (0, 0));
    assert_eq!(a.status().counters.reconnects, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_partition_is_noticed_within_the_dead_peer_timeout() {
    let (net, (a, ra), (b, rb)) = pair().await;
    net.partition(&addr(0), &addr(1));
    // No reset, no end of stream: only the 3 s of silence tells.
    let took = until(
        "both sides see the peer down",
        Duration::from_secs(10),
        || downs(&ra) > 0 && downs(&rb) > 0,
    )
    .await;
    // Silence counts from the last frame heard, at most one heartbeat
    // (1 s) before the partition.
    let t = Tuning::default();
    assert!(
        took >= t.dead_after - t.ping_every && took <= t.dead_after + Duration::from_millis(100),
        "noticed after {took:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_one_way_drop_loses_nothing_and_recovery_is_bounded() {
    let (net, (a, _ra), (b, rb)) = pair().await;
    // A's invalidations vanish on their way to B; B's acks still arrive.
    net.drop_one_way(&addr(0), &addr(1));
    for k in 0..1000 {
        a.invalidate("c", &k.to_string()).expect("send");
        if k % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    until("B notices", Duration::from_secs(10), || downs(&rb) > 0).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    net.heal(&addr(0), &addr(1));
    // Back within what a dial can take once the path is whole: an attempt
    // under way at the heal waits out its connect timeout (2 s, its SYN
    // resent once), then at most one delay at the cap (5 s + 20%); the
    // first side to get through makes the other redial at once.
    let took = until("B has everything", Duration::from_secs(30), || {
        rb.seqs_from(&addr(0).to_string()).last() == Some(&1000)
    })
    .await;
    let t = Tuning::default();
    let bound = t.connect_timeout + t.backoff_cap.mul_f64(1.2) + Duration::from_millis(100);
    assert!(took <= bound, "recovered after {took:?} (bound {bound:?})");
    let (missing, flushes) = check_no_silent_gap(&rb.events(), &addr(0).to_string(), 1000);
    assert_eq!((missing, flushes), (0, 0), "replayed, not flushed");
    // All 1,000 were unacknowledged when the link came back.
    let replayed = a.status().counters.replayed;
    assert!(replayed >= 1000, "replayed counts items: {replayed}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cuts_in_a_stream_lose_nothing() {
    let (net, (a, _ra), (b, rb)) = pair().await;
    let total = 20_000u64;
    for k in 0..total {
        a.invalidate("c", &k.to_string()).expect("send");
        if k % 2000 == 1000 {
            // Mid-stream: some of it written, some acknowledged.
            tokio::time::sleep(Duration::from_millis(1)).await;
            net.cut(&addr(0), &addr(1));
            let cuts = k / 2000 + 1;
            until("reconnected", Duration::from_secs(10), || {
                a.status().counters.reconnects == cuts
            })
            .await;
        }
    }
    until("B has everything", Duration::from_secs(60), || {
        rb.seqs_from(&addr(0).to_string()).last() == Some(&total)
    })
    .await;
    let (missing, flushes) = check_no_silent_gap(&rb.events(), &addr(0).to_string(), total);
    assert_eq!((missing, flushes), (0, 0));
    assert_eq!(a.status().counters.reconnects, 10, "each cut did cut");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_absent_peer_is_redialled_with_doubling_delays_up_to_the_cap() {
    let net = MemoryNetwork::new();
    let (a, _ra) = node(&net, 0, 2).await;
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let n = net.attempts(&addr(0), &addr(1));
    // Delays 100 ms doubling to 5 s, each ±20%: the first six take 5.04 to
    // 7.56 s, then 4 to 6 s each.
    let t = Tuning::default();
    assert_eq!(
        (t.backoff_first, t.backoff_cap),
        (Duration::from_millis(100), Duration::from_secs(5))
    );
    let most: f64 = 7.0 + (60.0 - 5.04) / 4.0;
    let least: f64 = 7.0 + (60.0 - 7.56) / 6.0;
    assert!(
        (n as f64) >= least.floor() && (n as f64) <= most.ceil(),
        "{n} attempts in {window:?}, expected {least:.1} to {most:.1}"
    );
    a.shutdown().await;
}

/// After a partition both nodes back off (up to 5 s). Once the path heals,
/// the first to redial gets in, and the other's own link must follow at
/// once instead of waiting out its backoff: each origin's invalidations
/// travel only on the link it dials. Before, the second link came up as
/// much as a backoff delay (up to 5 s) after the first.
#[tokio::test(start_paused = true)]
async fn an_inbound_link_cuts_the_outbound_backoff_short() {
    let (net, (a, _ra), (b, rb)) = pair().await;
    net.partition(&addr(0), &addr(1));
    until("down", Duration::from_secs(10), || downs(&rb) > 0).await;
    // Long enough for both delays to reach the cap.
    tokio::time::sleep(Duration::from_secs(30)).await;
    for k in 0..10 {
        a.invalidate("c", &k.to_string()).expect("send");
        b.invalidate("c", &k.to_string()).expect("send");
    }
    net.heal(&addr(0), &addr(1));
    let first = until("one link up", Duration::from_secs(10), || {
        let (pa, pb) = (&a.status().peers[0], &b.status().peers[0]);
        pa.outbound || pb.outbound
    })
    .await;
    let both = until("both links up", Duration::from_secs(10), || {
        connected(&a) && connected(&b)
    })
    .await;
    assert!(
        both <= first + Duration::from_millis(50),
        "one link up after {first:?}, the other only after {both:?}"
    );
    until("B has A's", Duration::from_secs(5), || {
        rb.seqs_from(&addr(0).to_string()).last() == Some(&10)
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
