//! The sidecar's HTTP API: POST /v1/invalidate at the origin's sidecar,
//! GET /v1/events (Server-Sent Events) from each other sidecar.

use std::sync::atomic::Ordering;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::clock;
use crate::participant::{Node, NodeSpec, Origin};
use crate::stats::Recorder;
use crate::{CACHE, STEP};

/// Invalidations one throughput POST carries (a JSON array).
const BURST: usize = 1024;

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    let rec = Recorder::new(spec.workload);
    let base = format!("http://127.0.0.1:{}", spec.ports[spec.index]);
    let http = reqwest::Client::builder().no_proxy().build()?;
    if spec.index == 0 {
        return Ok(Node::sending(
            rec,
            Origin::Http(HttpOrigin {
                http,
                url: format!("{base}/v1/invalidate"),
            }),
        ));
    }
    let resp = http
        .get(format!("{base}/v1/events"))
        .send()
        .await?
        .error_for_status()?;
    let mut body = resp.bytes_stream();
    // A new client's first event is a flush (its caches may hold
    // anything): ready once it came, and it is not counted.
    let mut buf: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP;
    while !buf.windows(12).any(|w| w == b"event: flush") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| anyhow!("no first event from the sidecar"))?
            .context("the event stream ended")??;
        buf.extend_from_slice(&chunk);
    }
    let end = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(buf.len(), |p| p + 2);
    buf.drain(..end);
    let r = rec.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(p) = buf[start..].windows(2).position(|w| w == b"\n\n") {
                let event = &buf[start..start + p];
                start += p + 2;
                record_event(&r, event);
            }
            buf.drain(..start);
        }
    });
    Ok(Node::receiving(rec, task))
}

/// One SSE event: its JSON parsed, as an application would.
fn record_event(rec: &Recorder, event: &[u8]) {
    let Ok(text) = std::str::from_utf8(event) else {
        return;
    };
    let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<Value>(data.trim_start()) else {
        return;
    };
    match v["type"].as_str() {
        Some("invalidate") => {
            if let Some(key) = v["key"].as_str() {
                rec.record(key.as_bytes());
            }
        }
        Some("flush") => {
            rec.flushes.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

pub(crate) struct HttpOrigin {
    http: reqwest::Client,
    url: String,
}

impl HttpOrigin {
    async fn post(&self, body: Value) -> anyhow::Result<()> {
        let resp = self.http.post(&self.url).json(&body).send().await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            bail!("POST /v1/invalidate answered {}", resp.status());
        }
        Ok(())
    }

    pub(crate) async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        let key = clock::stamp_hex(stamp);
        let key = std::str::from_utf8(&key)?;
        self.post(json!({"cache": CACHE, "key": key})).await
    }

    pub(crate) async fn burst(&mut self) -> anyhow::Result<u64> {
        let items: Vec<Value> = (0..BURST)
            .map(|_| {
                let key = clock::stamp_hex(clock::now_ns());
                json!({"cache": CACHE, "key": String::from_utf8_lossy(&key)})
            })
            .collect();
        self.post(Value::Array(items)).await?;
        Ok(BURST as u64)
    }
}
