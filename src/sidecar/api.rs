//! The local HTTP API: invalidate, events (SSE), status, metrics, health.

use std::convert::Infallible;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::conn::MAX_WAIT;
use super::hub::{Read, flush_json};

use crate::wire::Item;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Most invalidations in one request.
pub const MAX_ITEMS: usize = 10_000;
/// Entries an SSE stream takes from the ring per pass.
const SSE_CHUNK: usize = 256;

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/invalidate", post(invalidate))
        .route("/v1/events", get(events))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            refuse_while_stopping,
        ))
        .with_state(app)
}

/// While the sidecar shuts down, every endpoint (`/healthz` too) answers
/// 503, so that clients see why and retry, rather than a refused
/// connection.
async fn refuse_while_stopping(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    if app.shutdown.is_cancelled() {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the sidecar is shutting down",
        );
        // Nothing more will be served on this connection.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    next.run(req).await
}

/// With `cachecast.api.token.file` set, every call that may change
/// something (any method but GET, HEAD and OPTIONS, so that a call added
/// later is covered too) must bear the token. Reads stay open: they change
/// nothing, and the application's event stream, monitoring and
/// `cachecast status` then need no secret.
async fn require_token(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(token) = &app.api_token else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION);
    if token.admits(given.map(HeaderValue::as_bytes)) {
        return next.run(req).await;
    }
    app.unauthorized.fetch_add(1, Ordering::Relaxed);
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        if given.is_some() {
            "wrong token: this call needs `Authorization: Bearer <token>`, the token of cachecast.api.token.file"
        } else {
            "this call needs `Authorization: Bearer <token>`, the token of cachecast.api.token.file"
        },
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// A JSON error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// Axum's own 405 has an empty body; ours is JSON like every other error
/// (axum still adds the `allow` header).
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; see the allow header",
            uri.path()
        ),
    )
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see POST /v1/invalidate, GET /v1/events, /v1/status, /metrics, /healthz",
    )
}

/// One element of a `POST /v1/invalidate` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cache: Option<String>,
    key: Option<String>,
    flush: Option<bool>,
}

fn to_item(v: Value) -> Result<Item, String> {
    if !v.is_object() {
        return Err(format!(
            "expected an object like {{\"cache\":\"C\",\"key\":\"K\"}}, got {}",
            kind_of(&v)
        ));
    }
    // `"key": null` means no key (the whole cache), as documented: Java
    // serializers commonly write absent fields as null.
    let r: Request = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let item = match (r.flush, r.cache, r.key) {
        (Some(true), None, None) => Item::Flush,
        (Some(true), _, _) => return Err("`flush` cannot be combined with `cache` or `key`".into()),
        (Some(false), _, _) => return Err("`flush` must be true when given".into()),
        (None, None, _) => return Err("missing `cache` (or `\"flush\": true`)".into()),
        (None, Some(cache), None) => Item::Cache {
            cache: Arc::from(cache),
        },
        (None, Some(cache), Some(key)) => Item::Key {
            cache: Arc::from(cache),
            key: Arc::from(key),
        },
    };
    item.check().map_err(|e| e.to_string())?;
    Ok(item)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `1m`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms or 2s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: unknown unit (use ms, s or m)")),
    };
    let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))?;
    if d > MAX_WAIT {
        return Err(format!("`{s}` is longer than the limit of {MAX_WAIT:?}"));
    }
    Ok(d)
}

async fn invalidate(
    State(app): State<Arc<App>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, with Content-Type: application/json",
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let wait = match query.get("wait").map(|w| parse_duration(w)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(msg)) => return error(StatusCode::BAD_REQUEST, format!("wait: {msg}")),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let items: Vec<Item> = match value {
        Value::Array(list) => {
            if list.is_empty() {
                return error(StatusCode::BAD_REQUEST, "the array is empty");
            }
            if list.len() > MAX_ITEMS {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{} invalidations in one request; at most {MAX_ITEMS}",
                        list.len()
                    ),
                );
            }
            let mut items = Vec::with_capacity(list.len());
            for (i, v) in list.into_iter().enumerate() {
                match to_item(v) {
                    Ok(item) => items.push(item),
                    Err(msg) => return error(StatusCode::BAD_REQUEST, format!("item {i}: {msg}")),
                }
            }
            items
        }
        v => match to_item(v) {
            Ok(item) => vec![item],
            Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
        },
    };
    let n = items.len() as u64;
    let local = (app.resp.is_some() || app.hook.is_some()).then(|| items.clone());
    let (first, last) = match app.mesh.send_all(items) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let seqs: Vec<u64> = (first..first + n).collect();
    app.api_invalidations.fetch_add(n, Ordering::Relaxed);
    if let Some(items) = local {
        super::route_local(&app, &items);
    }
    match wait {
        None => (StatusCode::ACCEPTED, Json(json!({ "seqs": seqs }))).into_response(),
        Some(d) => {
            let out = app.mesh.wait_acked(last, d).await;
            let body = json!({
                "seqs": seqs,
                "all_acked": out.all_acked(),
                "acked": out.acked,
                "not_acked": out.not_acked,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
    }
}

/// Where a new SSE client starts, and the flush it gets first, if any.
fn start_point(app: &App, headers: &HeaderMap) -> (u64, Option<&'static str>) {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let Some(last) = last.filter(|l| !l.is_empty()) else {
        return (
            app.hub.next(),
            Some("new subscriber: caches may hold anything"),
        );
    };
    match last.rsplit_once('-') {
        Some((run, n)) if run == app.hub.run => {
            match n.parse::<u64>().ok().map(|n| n.checked_add(1)) {
                Some(Some(next)) if app.hub.can_resume_at(next) => (next, None),
                Some(Some(next)) if next < app.hub.next() => (
                    app.hub.next(),
                    Some("the events missed since Last-Event-ID are no longer held"),
                ),
                _ => (
                    app.hub.next(),
                    Some("Last-Event-ID is not one of this run's event ids"),
                ),
            }
        }
        _ => (
            app.hub.next(),
            Some("Last-Event-ID is from an earlier run of the sidecar"),
        ),
    }
}

struct SseState {
    app: Arc<App>,
    /// Number of the next ring entry to send.
    cursor: u64,
    pending: std::collections::VecDeque<SseEvent>,
    newest: tokio::sync::watch::Receiver<u64>,
    /// This client's place, as the ring watches it.
    reader: Arc<super::hub::Reader>,
    _guard: ClientGuard,
}

/// Counts connected SSE clients.
struct ClientGuard(Arc<App>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.sse_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn sse_event(app: &App, n: u64, kind: &str, json: &str) -> SseEvent {
    SseEvent::default()
        .id(format!("{}-{n}", app.hub.run))
        .event(kind)
        .data(json)
}

async fn events(State(app): State<Arc<App>>, headers: HeaderMap) -> impl IntoResponse {
    let (cursor, flush) = start_point(&app, &headers);
    app.sse_clients.fetch_add(1, Ordering::Relaxed);
    let mut pending = std::collections::VecDeque::new();
    if let Some(reason) = flush {
        // Numbered with the entry before the cursor: resuming from it
        // continues exactly here.
        pending.push_back(sse_event(
            &app,
            cursor - 1,
            "flush",
            &flush_json(reason).to_string(),
        ));
    }
    let state = SseState {
        newest: app.hub.subscribe(),
        reader: app.hub.reader(cursor),
        _guard: ClientGuard(app.clone()),
        app,
        cursor,
        pending,
    };
    let keep_alive = state.app.keep_alive;
    Sse::new(sse_stream(state)).keep_alive(KeepAlive::new().interval(keep_alive))
}

fn sse_stream(state: SseState) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            match st.app.hub.read_as(&st.reader, st.cursor, SSE_CHUNK) {
                Read::Lagged { missed, resume } => {
                    // Counted by the ring when it passed this client.
                    // `lagged` keeps the id of the last event this client
                    // got: one that reconnects after reading it but before
                    // the flush resumes from there, which is no longer
                    // held, so the flush is not lost with the connection.
                    let lagged = json!({"type": "lagged", "missed": missed}).to_string();
                    st.pending.push_back(sse_event(
                        &st.app,
                        st.cursor.saturating_sub(1),
                        "lagged",
                        &lagged,
                    ));
                    let flush = flush_json("this client fell behind and missed events");
                    st.pending.push_back(sse_event(
                        &st.app,
                        resume - 1,
                        "flush",
                        &flush.to_string(),
                    ));
                    st.cursor = resume;
                }
                Read::Entries(entries) if !entries.is_empty() => {
                    for e in entries {
                        st.cursor = e.n + 1;
                        let (kind, json) = e.to_json();
                        st.pending
                            .push_back(sse_event(&st.app, e.n, kind, &json.to_string()));
                    }
                }
                Read::Entries(_) => {
                    // Caught up: wait for more, or for shutdown.
                    tokio::select! {
                        changed = st.newest.changed() => if changed.is_err() { return None },
                        _ = st.app.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    })
}

/// The node's status as the API gives it: incarnations in hex, times in
/// milliseconds (the library keeps them typed).
fn status_json(st: &crate::mesh::Status) -> Value {
    let hex = |i: u64| format!("{i:016x}");
    let peers: Vec<Value> = st
        .peers
        .iter()
        .map(|p| {
            json!({
                "id": &*p.id,
                "connected": p.connected,
                "outbound": p.outbound,
                "inbound": p.inbound,
                "last_heard_ms": p.last_heard.map(|d| d.as_millis() as u64),
                "queued": p.queued,
                "acked_seq": p.acked_seq,
                "applied": p.applied.map(|a| json!([hex(a.incarnation), a.seq])),
                "sent": p.sent,
                "received": p.received,
                "reconnects": p.reconnects,
                "ack_latency": serde_json::to_value(&p.ack_latency).unwrap_or(Value::Null),
                "last_error": p.last_error,
            })
        })
        .collect();
    json!({
        "node": &*st.node,
        "incarnation": hex(st.incarnation),
        "last_seq": st.last_seq,
        "buffered": st.buffered,
        "buffer_capacity": st.buffer_capacity,
        "buffer_overflows": st.buffer_overflows,
        "peers": peers,
        "counters": serde_json::to_value(&st.counters).unwrap_or(Value::Null),
    })
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let st = app.mesh.status();
    let (held, capacity) = app.hub.held();
    let mut body = status_json(&st);
    if let Value::Object(map) = &mut body {
        map.insert(
            "sidecar".into(),
            json!({
                "run": app.hub.run,
                "api": app.api_addr.to_string(),
                "api_token": app.api_token.is_some(),
                "api_unauthorized": app.unauthorized.load(Ordering::Relaxed),
                "sse_clients": app.sse_clients.load(Ordering::Relaxed),
                "events_held": held,
                "events_capacity": capacity,
                "webhook": app.webhook.as_ref().map(|w| w.snapshot()),
                "resp": app.resp.as_ref().map(|r| resp_status(r)),
                "flush_hook": app.hook.as_ref().map(|h| h.snapshot()),
            }),
        );
    }
    Json(body).into_response()
}

/// The Redis-protocol endpoint's part of `/v1/status`.
fn resp_status(r: &super::resp::Shared) -> Value {
    let (channels, patterns) = r.broker.counts();
    let b = &r.broker.stats;
    let c = &r.stats;
    json!({
        "listen": r.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "password": r.has_password(),
        "connections": r.conns.open(),
        "max_connections": r.conns.max,
        "accepted": c.accepted.load(Ordering::Relaxed),
        "refused": r.conns.refused.load(Ordering::Relaxed),
        "timed_out": r.conns.timed_out.load(Ordering::Relaxed),
        "protocol_errors": c.protocol_errors.load(Ordering::Relaxed),
        "auth_failures": c.auth_failures.load(Ordering::Relaxed),
        "channels": channels,
        "patterns": patterns,
        "published": b.published.load(Ordering::Relaxed),
        "delivered": b.delivered.load(Ordering::Relaxed),
        "slow_dropped": b.slow_dropped.load(Ordering::Relaxed),
    })
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    Json(json!({"status": "ok", "node": &**app.mesh.node()})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let st = app.mesh.status();
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        super::metrics::render(app, st),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("10m").is_err(), "over the limit");
        assert!(parse_duration("1e400s").is_err());
    }
}
