//! Optional webhook: POSTs received events to the application in batches,
//! reading the same ring as SSE clients. While the application is
//! unreachable the webhook retries with backoff; what it falls behind by is
//! bounded by the ring, and once the ring has moved past it, the missed
//! events are replaced by one flush.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use super::hub::{Hub, Read, flush_json};

/// Events per POST at most.
const BATCH: usize = 1000;

/// An error and its causes on one line: reqwest's own message names only
/// the URL, the cause (connection refused, a timeout) is in its sources.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some layers repeat their source's message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The webhook's counters, as in `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookStatus {
    /// The URL.
    pub url: String,
    /// Events delivered.
    pub delivered: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Events waiting to be delivered.
    pub pending: u64,
}

/// A running webhook.
pub(crate) struct Webhook {
    url: String,
    delivered: AtomicU64,
    failures: AtomicU64,
    /// Ring number of the next event to deliver.
    cursor: AtomicU64,
    hub: Arc<Hub>,
}

impl Webhook {
    pub(crate) fn new(url: String, hub: Arc<Hub>) -> Self {
        Webhook {
            url,
            delivered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            cursor: AtomicU64::new(hub.next()),
            hub,
        }
    }

    pub(crate) fn snapshot(&self) -> WebhookStatus {
        WebhookStatus {
            url: self.url.clone(),
            delivered: self.delivered.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            pending: self
                .hub
                .next()
                .saturating_sub(self.cursor.load(Ordering::Relaxed)),
        }
    }

    /// Delivers until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "webhook disabled: cannot build an HTTP client");
                return;
            }
        };
        let mut newest = self.hub.subscribe();
        // The first delivery after start is a flush: the application may
        // have missed anything while this sidecar was not running.
        let mut batch: Vec<Value> = vec![flush_json("the sidecar started")];
        let mut backoff = Duration::from_millis(100);
        loop {
            if batch.is_empty() {
                let cursor = self.cursor.load(Ordering::Relaxed);
                match self.hub.read(cursor, BATCH) {
                    Read::Lagged { missed, resume } => {
                        warn!(missed, "webhook fell behind; delivering a flush instead");
                        batch.push(flush_json("the webhook fell behind and missed events"));
                        self.cursor.store(resume, Ordering::Relaxed);
                    }
                    Read::Entries(entries) if !entries.is_empty() => {
                        for e in &entries {
                            batch.push(e.to_json().1);
                        }
                        let next = entries.last().map_or(cursor, |e| e.n + 1);
                        self.cursor.store(next, Ordering::Relaxed);
                    }
                    Read::Entries(_) => {
                        tokio::select! {
                            r = newest.changed() => if r.is_err() { return },
                            _ = shutdown.cancelled() => return,
                        }
                        continue;
                    }
                }
            }
            let sent = client.post(&self.url).json(&batch).send().await;
            match sent.map(|r| r.status()) {
                Ok(s) if s.is_success() => {
                    self.delivered
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if backoff > Duration::from_millis(100) {
                        info!(url = %self.url, "webhook reachable again");
                    }
                    batch.clear();
                    backoff = Duration::from_millis(100);
                }
                other => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let why = match other {
                        Ok(s) => format!("status {s}"),
                        Err(e) => error_chain(&e),
                    };
                    warn!(url = %self.url, error = %why, retry_in = ?backoff, "webhook delivery failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // If the ring moved past what is pending meanwhile, the
                    // retry carries a flush instead of the rest.
                    let cursor = self.cursor.load(Ordering::Relaxed);
                    if let Read::Lagged { resume, .. } = self.hub.read(cursor, 0) {
                        batch = vec![flush_json("the webhook fell behind and missed events")];
                        self.cursor.store(resume, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_the_cause() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(error_chain(&e), "error sending request: Connection refused");
    }
}
