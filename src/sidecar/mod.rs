//! The sidecar: a node of the mesh plus a local HTTP API, for applications
//! in any language (DHIS 2 is Java) running beside it.
//!
//! Every event the mesh delivers is numbered into a bounded ring
//! (`hub`); SSE clients and the webhook read it at their own pace, so
//! none of them can slow the mesh. A reader that falls off the ring's tail,
//! or that connects without a `Last-Event-ID` this run can resume from,
//! gets a flush first: the guarantee of the mesh reaches the application
//! even across a restart of the sidecar.

mod api;
pub mod check;
mod conn;
mod flush;
mod hub;
mod limits;
mod metrics;
pub(crate) mod resp;
pub mod state_path;
mod table;
mod token;
mod webhook;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ClusterConfig, StateFile};
use crate::mesh::{Event, Mesh, MeshHandle, StartError, Tuning};

pub use api::{MAX_BODY, MAX_ITEMS, parse_duration};
pub use conn::{API_IDLE_TIMEOUT, MAX_API_CONNECTIONS, MAX_WAIT};
pub use flush::{
    CredentialsError, FlushHookStatus, SUBSCRIBER_BURST, SUBSCRIBER_REFILL, load_credentials,
};
pub use limits::api_connection_cap;
pub use resp::{MAX_RESP_CONNECTIONS, RESP_STALL_TIMEOUT};
pub use table::status_table;
pub use token::{ApiToken, MIN_TOKEN, TokenError};
pub use webhook::WebhookStatus;

/// Events kept for SSE clients and the webhook to catch up from.
pub const EVENT_RING: usize = 16_384;

/// State shared by the API handlers.
pub(crate) struct App {
    mesh: MeshHandle,
    hub: Arc<hub::Hub>,
    api_addr: SocketAddr,
    webhook: Option<Arc<webhook::Webhook>>,
    shutdown: CancellationToken,
    conns: Arc<conn::ConnStats>,
    /// Interval of the SSE keep-alive comments: well inside the idle
    /// timeout, so that a stream whose client reads is never cut.
    keep_alive: Duration,
    sse_clients: AtomicU64,
    api_invalidations: AtomicU64,
    /// The Redis-protocol endpoint, when on.
    resp: Option<Arc<resp::Shared>>,
    /// The flush hook, when configured.
    hook: Option<Arc<flush::FlushHook>>,
    /// What a mutating call must bear (`cachecast.api.token.file`), when
    /// set.
    api_token: Option<ApiToken>,
    /// Mutating calls refused for a missing or wrong token.
    unauthorized: AtomicU64,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A file the configuration names cannot be used (what `check`
    /// reports as errors; every one is listed).
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Preflight(Vec<crate::config::Problem>),
    /// The mesh could not start.
    #[error(transparent)]
    Mesh(#[from] StartError),
    /// The API's address could not be bound.
    #[error("cannot listen for the API on {addr}: {source}")]
    ApiBind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The API refused to bind where it should not.
    #[error("{0}")]
    Refused(String),
    /// The Redis-protocol endpoint's address could not be bound.
    #[error("cannot listen for the Redis protocol on {addr}: {source}")]
    RespBind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The flush hook's credentials cannot be used.
    #[error(transparent)]
    FlushCredentials(#[from] flush::CredentialsError),
    /// The API server failed.
    #[error("API server: {0}")]
    Serve(std::io::Error),
}

/// Options of [`run`] beyond the configuration.
#[derive(Default)]
pub struct Options {
    /// Timers and bounds of the mesh.
    pub tuning: Tuning,
    /// An already-bound listener for peers (else `config.bind`).
    pub peer_listener: Option<TcpListener>,
    /// An already-bound listener for the API (else `config.api`).
    pub api_listener: Option<TcpListener>,
    /// API connections open at once (default [`MAX_API_CONNECTIONS`]).
    pub api_max_connections: Option<usize>,
    /// How long an API connection may make no progress before it is closed
    /// (default [`API_IDLE_TIMEOUT`]). Shorter values are for tests: below
    /// [`MAX_WAIT`] they can cut a waiting request.
    pub api_idle_timeout: Option<Duration>,
    /// Already-bound listeners for the Redis-protocol endpoint (else
    /// `config.resp`'s addresses).
    pub resp_listeners: Option<Vec<TcpListener>>,
    /// Redis-protocol connections open at once (default: the
    /// configuration's `cachecast.resp.max.connections`).
    pub resp_max_connections: Option<usize>,
}

/// Runs the sidecar until `shutdown` is cancelled, then shuts down
/// gracefully: the mesh drains and says goodbye while the API answers 503,
/// and the API stops last.
pub async fn run(
    mut config: ClusterConfig,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), SidecarError> {
    // Crash-safe unless the operator said otherwise: a state file at the
    // default path when the configuration names none.
    match &config.state_file {
        StateFile::Default => {
            let (path, why) = state_path::default_state_file(&config.node, |k| std::env::var_os(k))
                .map_err(SidecarError::Refused)?;
            state_path::make_state_dir(&path).map_err(|e| {
                SidecarError::Refused(format!(
                    "cannot make the folder of the state file {} (from {why}): {e}; \
                     set cachecast.state.file",
                    path.display()
                ))
            })?;
            info!(path = %path.display(), from = why, "state file at the default path");
            config.state_file = StateFile::At(path);
        }
        StateFile::Off => warn!(
            "cachecast.state.file = none: a start after a crash cannot tell the peers to flush \
             for what the crashed run accepted and never delivered"
        ),
        StateFile::At(_) => {}
    }
    // The checks `check` makes, all at once, before anything is bound.
    let errors: Vec<_> = check::preflight(&config)
        .into_iter()
        .filter(|p| p.severity == crate::config::Severity::Error)
        .collect();
    if !errors.is_empty() {
        return Err(SidecarError::Preflight(errors));
    }
    if !config.api.ip().to_canonical().is_loopback() {
        if !config.api_bind_explicit {
            return Err(SidecarError::Refused(format!(
                "the API would listen on {}, which is not loopback; set cachecast.api.bind to allow it",
                config.api
            )));
        }
        warn!(api = %config.api, "the API listens on a non-loopback address: anyone who reaches it can invalidate every cache");
    }
    let api_listener = match options.api_listener {
        Some(l) => l,
        None => TcpListener::bind(config.api)
            .await
            .map_err(|source| SidecarError::ApiBind {
                addr: config.api,
                source,
            })?,
    };
    let api_addr = api_listener.local_addr().unwrap_or(config.api);
    let resp_listeners = match (&config.resp, options.resp_listeners) {
        (_, Some(ls)) => ls,
        (Some(r), None) => {
            if !r.bind_explicit && r.addrs.iter().any(|a| !a.ip().to_canonical().is_loopback()) {
                return Err(SidecarError::Refused(format!(
                    "the Redis-protocol endpoint would listen on {:?}, which is not loopback; set cachecast.resp.bind to allow it",
                    r.addrs
                )));
            }
            resp::bind(&r.addrs)
                .await
                .map_err(|(addr, source)| SidecarError::RespBind { addr, source })?
        }
        (None, None) => Vec::new(),
    };
    let hook = match &config.flush_hook {
        Some(h) => Some(Arc::new(flush::FlushHook::new(h)?)),
        None => None,
    };
    // Checked by the preflight already; read once, here.
    let api_token = match &config.api_token {
        Some(path) => Some(ApiToken::load(path).map_err(|e| SidecarError::Refused(e.to_string()))?),
        None => {
            warn!(
                "no cachecast.api.token.file: any local process can make every server of the cluster clear its caches through the API"
            );
            None
        }
    };
    if !resp_listeners.is_empty() && hook.is_none() {
        warn!(
            "the Redis-protocol endpoint is on without cachecast.flush.url: pub/sub cannot tell the application \
             to clear its caches, so a flush from the mesh, a whole-cache invalidation, a subscriber cut off for \
             not reading, and messages missed while the application was not subscribed (a restart of either side) \
             are not covered; set cachecast.flush.url (docs/dhis2.md)"
        );
    }
    let password = config.resp.as_ref().and_then(|r| r.password.clone());
    let max_connections = config
        .resp
        .as_ref()
        .map_or(MAX_RESP_CONNECTIONS, |r| r.max_connections);
    let webhook_url = config.webhook_url.clone();
    // The hub exists before the mesh, so it sees every event from the
    // first. Its run id only has to differ between runs of the sidecar.
    let hub = Arc::new(hub::Hub::new(
        format!("{:016x}", rand::random::<u64>()),
        EVENT_RING,
    ));
    let feed = hub.clone();
    // The endpoint needs the mesh's handle, so it exists only once the mesh
    // runs; no client can have subscribed before that.
    let resp_cell: Arc<std::sync::OnceLock<Arc<resp::Shared>>> = Arc::default();
    let to_resp = resp_cell.clone();
    let to_hook = hook.clone();
    let mut builder = Mesh::builder(config)
        .tuning(options.tuning)
        .on_event(move |e| {
            feed.push(e);
            route_event(e, to_resp.get(), to_hook.as_deref());
        });
    if let Some(l) = options.peer_listener {
        builder = builder.listener(l);
    }
    let mesh = builder.start().await?;
    let webhook = webhook_url.map(|url| Arc::new(webhook::Webhook::new(url, hub.clone())));
    let idle = options.api_idle_timeout.unwrap_or(API_IDLE_TIMEOUT);
    let conns = conn::ConnStats::new(options.api_max_connections.unwrap_or(MAX_API_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    let resp = if resp_listeners.is_empty() {
        None
    } else {
        let shared = resp::Shared::new(
            mesh.clone(),
            hook.clone(),
            password,
            options.resp_max_connections.unwrap_or(max_connections),
            resp_listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        );
        let _ = resp_cell.set(shared.clone());
        for l in resp_listeners {
            info!(addr = ?l.local_addr().ok(), password = shared.has_password(), "Redis-protocol endpoint listening");
            tracker.spawn(resp::serve(
                l,
                shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        Some(shared)
    };
    if let Some(h) = &hook {
        let h = h.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move { h.run(stop).await });
    }
    let app = Arc::new(App {
        mesh: mesh.clone(),
        hub,
        api_addr,
        webhook: webhook.clone(),
        shutdown: shutdown.clone(),
        conns: conns.clone(),
        keep_alive: (idle / 3).min(Duration::from_secs(15)),
        sse_clients: AtomicU64::new(0),
        api_invalidations: AtomicU64::new(0),
        resp,
        hook,
        api_token,
        unauthorized: AtomicU64::new(0),
    });
    if let Some(w) = webhook {
        // Tracked like the hook: shutdown waits for its last delivery.
        tracker.spawn(w.run(shutdown.clone()));
    }
    info!(api = %api_addr, node = %mesh.node(), max_connections = conns.max, idle_timeout = ?idle, "sidecar API listening");
    let listener = conn::ApiListener::new(api_listener, conns, idle);
    // The API outlives `shutdown`: while the mesh drains, it answers 503
    // (as documented) instead of refusing connections.
    let stop_api = CancellationToken::new();
    let mut server = tokio::spawn(
        axum::serve(listener, api::router(app))
            .with_graceful_shutdown(stop_api.clone().cancelled_owned())
            .into_future(),
    );
    let early = tokio::select! {
        r = &mut server => Some(r),
        _ = shutdown.cancelled() => None,
    };
    info!("shutting down: draining to peers");
    mesh.shutdown().await;
    let served = match early {
        Some(r) => r,
        None => {
            stop_api.cancel();
            // Open requests get a moment to finish; a connection that
            // lingers beyond it ends with the process.
            match tokio::time::timeout(Duration::from_secs(1), &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    match served {
        Ok(r) => r.map_err(SidecarError::Serve),
        Err(e) => Err(SidecarError::Serve(std::io::Error::other(e))),
    }
}

/// What an event from the mesh means beyond the event ring: a message for
/// the Redis-protocol subscribers, or a call of the flush hook when no
/// message can name what is stale.
fn route_event(event: &Event, resp: Option<&Arc<resp::Shared>>, hook: Option<&flush::FlushHook>) {
    match event {
        Event::Invalidated { cache, key, .. } => {
            if let Some(r) = resp {
                r.broker.publish(cache.as_bytes(), key.as_bytes());
            }
        }
        Event::CacheCleared { origin, cache, .. } => {
            if let Some(h) = hook {
                h.trigger(&format!("{origin} invalidated the whole cache {cache}"));
            }
        }
        Event::Flush { origin, reason } => {
            if let Some(h) = hook {
                match origin {
                    Some(o) => h.trigger(&format!("flush from {o}: {reason}")),
                    None => h.trigger(&format!("flush: {reason}")),
                }
            }
        }
        Event::PeerUp { .. } | Event::PeerDown { .. } => {}
    }
}

/// Invalidations this sidecar originated through its HTTP API reach its
/// own Redis-protocol subscribers as a `PUBLISH` would (a whole cache or a
/// flush, which no message can say, calls the hook).
fn route_local(app: &App, items: &[crate::wire::Item]) {
    use crate::wire::Item;
    for item in items {
        match item {
            Item::Key { cache, key } => {
                if let Some(r) = &app.resp {
                    r.broker.publish(cache.as_bytes(), key.as_bytes());
                }
            }
            Item::Cache { cache } => {
                if let Some(h) = &app.hook {
                    h.trigger(&format!(
                        "this sidecar's API invalidated the whole cache {cache}"
                    ));
                }
            }
            Item::Flush => {
                if let Some(h) = &app.hook {
                    h.trigger("this sidecar's API sent a flush");
                }
            }
        }
    }
}

/// A temporary file holding `text` with permissions `mode` (tests of the
/// files that must stay private: credentials, the API token).
#[cfg(test)]
pub(crate) fn test_file(text: &str, mode: u32) -> tempfile::NamedTempFile {
    use std::os::unix::fs::PermissionsExt;
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), text).expect("write");
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
    f
}
