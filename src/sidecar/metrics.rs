//! `GET /metrics`: the node's counters in the OpenMetrics text format,
//! written by the Prometheus project's own client (`prometheus-client`).
//!
//! Every figure is read when the scrape comes (the mesh's status, the
//! sidecar's atomics), so nothing is registered ahead: each scrape builds
//! a registry around one [`Scrape`] and encodes it. A counter's descriptor
//! is named without `_total`, which the encoder adds to its sample, so the
//! series keep the names the alert rules and dashboard use.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::App;
use crate::mesh::{BUCKETS_US, PeerStatus, Status};

/// What `/metrics` answers with: OpenMetrics, which Prometheus asks for
/// first and parses by this type.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition of `app`'s figures, `st` being the mesh's status taken
/// for this scrape.
pub(crate) fn render(app: Arc<App>, st: Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { app, st }));
    let mut out = String::new();
    // Writing to a String fails only if a gauge exceeds i64, which no
    // count of this process reaches; what was written is still served.
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        tracing::warn!("a metric could not be encoded; /metrics is cut short");
    }
    out
}

/// One scrape's figures.
struct Scrape {
    app: Arc<App>,
    st: Status,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

/// Escapes a label value: the client writes values as given.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Writes one family: a metric without labels, or one sample per label
/// value.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter(&mut self, name: &'static str, help: &str, v: u64) -> fmt::Result {
        let m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(m)
    }

    fn gauge<V>(&mut self, name: &'static str, help: &str, v: V) -> fmt::Result
    where
        ConstGauge<V>: EncodeMetric,
    {
        let m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m)
    }

    /// One sample per `(value of label, figure)`.
    fn labelled(
        &mut self,
        kind: MetricType,
        name: &'static str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, u64)>,
    ) -> fmt::Result {
        let mut m = self.0.encode_descriptor(name, help, None, kind)?;
        for (value, v) in samples {
            let labels = [(label, value.as_str())];
            let family = m.encode_family(&labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(v).encode(family)?,
                _ => ConstGauge::new(v).encode(family)?,
            }
        }
        Ok(())
    }

    /// One sample per peer.
    fn per_peer(
        &mut self,
        kind: MetricType,
        name: &'static str,
        help: &str,
        peers: &[PeerStatus],
        f: impl Fn(&PeerStatus) -> Option<u64>,
    ) -> fmt::Result {
        let samples = peers.iter().filter_map(|p| f(p).map(|v| (label(&p.id), v)));
        self.labelled(kind, name, help, "peer", samples)
    }
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut out = Out(encoder);
        let (app, st) = (&*self.app, &self.st);
        mesh(&mut out, st)?;
        api(&mut out, app)?;
        if let Some(w) = &app.webhook {
            let s = w.snapshot();
            out.counter(
                "cachecast_webhook_delivered",
                "Events delivered to the webhook.",
                s.delivered,
            )?;
            out.counter(
                "cachecast_webhook_failures",
                "Failed webhook deliveries.",
                s.failures,
            )?;
        }
        if let Some(r) = &app.resp {
            resp(&mut out, r)?;
        }
        out.counter(
            "cachecast_api_unauthorized",
            "API calls refused for a missing or wrong token (cachecast.api.token.file).",
            load(&app.unauthorized),
        )?;
        if let Some(h) = &app.hook {
            flush_hook(&mut out, &h.snapshot())?;
        }
        ack_latency(&mut out, &st.peers)
    }
}

/// The mesh's own figures: what this node sent, received and refused, its
/// replay buffer, and each peer's link.
fn mesh(out: &mut Out<'_>, st: &Status) -> fmt::Result {
    let c = &st.counters;
    for (name, help, v) in [
        (
            "cachecast_originated",
            "Invalidations this node originated.",
            c.originated,
        ),
        (
            "cachecast_received",
            "Items applied from peers.",
            c.received,
        ),
        (
            "cachecast_sent",
            "Items written to peers, replays included.",
            c.sent,
        ),
    ] {
        out.counter(name, help, v)?;
    }
    let e = &c.events;
    out.labelled(
        MetricType::Counter,
        "cachecast_events",
        "Events delivered to the application, by kind.",
        "kind",
        [
            ("invalidated", e.invalidated),
            ("cache_cleared", e.cache_cleared),
            ("flush", e.flush),
            ("peer_up", e.peer_up),
            ("peer_down", e.peer_down),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )?;
    out.counter(
        "cachecast_gap_flushes_sent",
        "Flushes sent in place of invalidations a peer missed.",
        c.gap_flushes_sent,
    )?;
    out.counter(
        "cachecast_reconnects",
        "Outbound links re-established.",
        c.reconnects,
    )?;
    out.labelled(
        MetricType::Counter,
        "cachecast_rejected_connections",
        "Inbound connections refused, by reason.",
        "reason",
        [
            ("not_allowed", c.rejected_not_allowed),
            ("handshake", c.rejected_handshake),
            ("auth", c.rejected_auth),
            ("tls", c.rejected_tls),
            ("limit", c.rejected_limit),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )?;
    for (name, help, v) in [
        (
            "cachecast_protocol_errors",
            "Connections closed for a bad frame.",
            c.protocol_errors,
        ),
        (
            "cachecast_diverged",
            "Peer streams whose numbering diverged from the position held (another party claimed an identity, or a broken peer); each flushed.",
            c.diverged,
        ),
        (
            "cachecast_event_backlogs",
            "Times the sidecar fell so far behind a peer's events (a slow webhook, SSE or Redis-protocol path) that its queue collapsed into a flush.",
            c.event_backlogs,
        ),
    ] {
        out.counter(name, help, v)?;
    }
    out.gauge(
        "cachecast_buffer_held",
        "Invalidations held in the replay buffer.",
        st.buffered as u64,
    )?;
    out.gauge(
        "cachecast_buffer_capacity",
        "Bound of the replay buffer.",
        st.buffer_capacity as u64,
    )?;
    out.counter(
        "cachecast_buffer_overflows",
        "Times the buffer overflowed into a flush.",
        st.buffer_overflows,
    )?;
    let peers = &st.peers[..];
    type PeerFigure = fn(&PeerStatus) -> Option<u64>;
    let (gauge, counter) = (MetricType::Gauge, MetricType::Counter);
    let figures: [(MetricType, &'static str, &str, PeerFigure); 8] = [
        (
            gauge,
            "cachecast_peer_up",
            "1 when both links with the peer are up.",
            |p| Some(u64::from(p.connected)),
        ),
        (
            gauge,
            "cachecast_peer_outbound_up",
            "1 when our link to the peer is up.",
            |p| Some(u64::from(p.outbound)),
        ),
        (
            gauge,
            "cachecast_peer_inbound_up",
            "1 when the peer's link to us is up.",
            |p| Some(u64::from(p.inbound)),
        ),
        (
            gauge,
            "cachecast_peer_queued",
            "Our invalidations the peer has not acknowledged.",
            |p| Some(p.queued),
        ),
        (
            gauge,
            "cachecast_peer_acked_seq",
            "Our last sequence number the peer acknowledged.",
            |p| Some(p.acked_seq),
        ),
        (
            counter,
            "cachecast_peer_sent",
            "Items written to the peer.",
            |p| Some(p.sent),
        ),
        (
            counter,
            "cachecast_peer_received",
            "Items applied from the peer.",
            |p| Some(p.received),
        ),
        (
            counter,
            "cachecast_peer_reconnects",
            "Times our link to the peer was re-established.",
            |p| Some(p.reconnects),
        ),
    ];
    for (kind, name, help, f) in figures {
        out.per_peer(kind, name, help, peers, f)?;
    }
    out.per_peer(
        MetricType::Gauge,
        "cachecast_peer_last_heard_milliseconds",
        "Time since anything was heard from the peer.",
        peers,
        |p| p.last_heard.map(|d| d.as_millis() as u64),
    )
}

/// The HTTP API: event-stream clients and connections.
fn api(out: &mut Out<'_>, app: &App) -> fmt::Result {
    out.gauge(
        "cachecast_sse_clients",
        "Connected event-stream clients.",
        load(&app.sse_clients),
    )?;
    out.counter(
        "cachecast_sse_lagged",
        "Times an event-stream client fell behind the ring (counted when the ring drops an event it has not read).",
        load(&app.hub.lagged),
    )?;
    out.gauge(
        "cachecast_api_connections",
        "Open connections to the HTTP API.",
        app.conns.open() as u64,
    )?;
    out.gauge(
        "cachecast_api_connections_max",
        "Connections to the HTTP API allowed open at once (the cap).",
        app.conns.max as u64,
    )?;
    out.counter(
        "cachecast_api_connections_refused",
        "API connections closed at once because the most were open.",
        load(&app.conns.refused),
    )?;
    out.counter(
        "cachecast_api_connections_timed_out",
        "API connections closed after no progress for the idle timeout.",
        load(&app.conns.timed_out),
    )?;
    out.counter(
        "cachecast_api_invalidations",
        "Invalidations received over the HTTP API.",
        load(&app.api_invalidations),
    )
}

/// The Redis-protocol endpoint.
fn resp(out: &mut Out<'_>, r: &super::resp::Shared) -> fmt::Result {
    let (channels, patterns) = r.broker.counts();
    let (b, c) = (&r.broker.stats, &r.stats);
    out.gauge(
        "cachecast_resp_connections",
        "Redis-protocol connections open.",
        r.conns.open() as u64,
    )?;
    out.gauge(
        "cachecast_resp_connections_max",
        "The cap on Redis-protocol connections open at once.",
        r.conns.max as u64,
    )?;
    for (name, help, v) in [
        (
            "cachecast_resp_connections_accepted",
            "Redis-protocol connections accepted.",
            &c.accepted,
        ),
        (
            "cachecast_resp_connections_refused",
            "Redis-protocol connections closed at once because the most were open.",
            &r.conns.refused,
        ),
        (
            "cachecast_resp_connections_timed_out",
            "Redis-protocol connections closed for stalling inside a command or not authenticating in time.",
            &r.conns.timed_out,
        ),
        (
            "cachecast_resp_protocol_errors",
            "Redis-protocol connections closed for a protocol error.",
            &c.protocol_errors,
        ),
        (
            "cachecast_resp_auth_failures",
            "Failed Redis-protocol AUTH attempts.",
            &c.auth_failures,
        ),
        (
            "cachecast_resp_published",
            "Messages PUBLISHed on this sidecar.",
            &b.published,
        ),
        (
            "cachecast_resp_delivered",
            "Messages handed to this sidecar's subscribers (once per subscriber).",
            &b.delivered,
        ),
        (
            "cachecast_resp_slow_subscribers",
            "Subscribers disconnected for not reading their messages (each calls the flush hook).",
            &b.slow_dropped,
        ),
    ] {
        out.counter(name, help, load(v))?;
    }
    out.labelled(
        MetricType::Gauge,
        "cachecast_resp_subscriptions",
        "Channels and patterns with local subscribers.",
        "kind",
        [
            ("channel".to_string(), channels as u64),
            ("pattern".to_string(), patterns as u64),
        ],
    )
}

/// The flush hook: whether a call is owed, and its calls.
fn flush_hook(out: &mut Out<'_>, s: &super::FlushHookStatus) -> fmt::Result {
    out.gauge(
        "cachecast_flush_hook_pending",
        "1 while a call of the flush hook is owed (the application may serve stale entries).",
        u64::from(s.pending),
    )?;
    out.gauge(
        "cachecast_flush_hook_pending_seconds",
        "How long a call of the flush hook has been owed (0 when none is).",
        s.pending_seconds.unwrap_or(0.0),
    )?;
    for (name, help, v) in [
        (
            "cachecast_flush_hook_triggers",
            "Times the flush hook was asked for (coalesced into fewer calls).",
            s.triggers,
        ),
        (
            "cachecast_flush_hook_calls",
            "Flush hook calls answered with 2xx.",
            s.calls,
        ),
        (
            "cachecast_flush_hook_failures",
            "Flush hook calls that failed (retried).",
            s.failures,
        ),
        (
            "cachecast_flush_hook_rate_limited",
            "Flush hook triggers from Redis-protocol subscribers that found the rate spent (each covered by a later call).",
            s.rate_limited,
        ),
    ] {
        out.counter(name, help, v)?;
    }
    Ok(())
}

/// Time from writing an invalidation to the peer's ack, per peer; the
/// client makes the buckets cumulative.
fn ack_latency(out: &mut Out<'_>, peers: &[PeerStatus]) -> fmt::Result {
    let mut m = out.0.encode_descriptor(
        "cachecast_ack_latency_seconds",
        "Time from writing an invalidation to the peer's ack.",
        None,
        MetricType::Histogram,
    )?;
    for p in peers {
        let h = &p.ack_latency;
        let buckets: Vec<(f64, u64)> = h
            .counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // The last count is the overflow bucket: +Inf to the client.
                let le = BUCKETS_US.get(i).map_or(f64::MAX, |&us| us as f64 / 1e6);
                (le, n)
            })
            .collect();
        let peer = label(&p.id);
        let labels = [("peer", peer.as_str())];
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            h.sum_us as f64 / 1e6,
            h.count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}
