//! The delivery guarantee against the ways it was once broken, black-box:
//! real `cachecast run` processes on loopback, a relay in front of each
//! node's port, and the HTTP API and event stream as an application sees
//! them. Every invalidation a node accepted reaches each peer's
//! application, or a flush reaches it afterwards.
#![cfg(feature = "cli")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Mode;
use common::procs::{Cluster, LONG, Sidecar, client};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Event types (and the data) seen on one sidecar's event stream.
struct Stream {
    events: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    async fn open(node: &Sidecar) -> Stream {
        let resp = client()
            .get(node.url("/v1/events"))
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("subscribe");
        assert_eq!(resp.status(), 200);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let mut event = String::new();
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if !event.is_empty() {
                        let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                        sink.lock().expect("lock").push((event, data));
                    }
                }
            }
        });
        Stream { events, task }
    }

    fn events(&self) -> Vec<(String, Value)> {
        self.events.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds of the events so far (or fails after
    /// `limit`, printing them).
    async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[(String, Value)]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let evs = self.events();
            if pred(&evs) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; got {evs:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A flush from `origin` on the stream.
fn flush_from(evs: &[(String, Value)], origin: &str) -> bool {
    evs.iter()
        .any(|(e, d)| e == "flush" && d["origin"] == json!(origin))
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
    let b_stream = Stream::open(&c.nodes[1]).await;
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
        .wait_for("a flush from A's next run", LONG, |evs| flush_from(evs, &a))
        .await;
}
