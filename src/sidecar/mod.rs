//! The sidecar: a node of the mesh plus a local HTTP API, for applications
//! in any language (DHIS 2 is Java) running beside it.
//!
//! Every event the mesh delivers is numbered into a bounded ring
//! ([`hub`]); SSE clients and the webhook read it at their own pace, so
//! none of them can slow the mesh. A reader that falls off the ring's tail,
//! or that connects without a `Last-Event-ID` this run can resume from,
//! gets a flush first: the guarantee of the mesh reaches the application
//! even across a restart of the sidecar.

mod api;
mod conn;
mod hub;
mod table;
mod webhook;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::mesh::{Mesh, MeshHandle, StartError, Tuning};

pub use api::{MAX_BODY, MAX_ITEMS, MAX_WAIT, parse_duration};
pub use conn::{API_IDLE_TIMEOUT, MAX_API_CONNECTIONS};
pub use table::status_table;
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
    sse_lagged: AtomicU64,
    api_invalidations: AtomicU64,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
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
}

/// Runs the sidecar until `shutdown` is cancelled, then shuts down
/// gracefully: the mesh drains and says goodbye while the API answers 503,
/// and the API stops last.
pub async fn run(
    config: ClusterConfig,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), SidecarError> {
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
    let webhook_url = config.webhook_url.clone();
    // The hub exists before the mesh, so it sees every event from the
    // first. Its run id only has to differ between runs of the sidecar.
    let hub = Arc::new(hub::Hub::new(
        format!("{:016x}", rand::random::<u64>()),
        EVENT_RING,
    ));
    let feed = hub.clone();
    let mut builder = Mesh::builder(config)
        .tuning(options.tuning)
        .on_event(move |e| feed.push(e));
    if let Some(l) = options.peer_listener {
        builder = builder.listener(l);
    }
    let mesh = builder.start().await?;
    let webhook = webhook_url.map(|url| Arc::new(webhook::Webhook::new(url, hub.clone())));
    let idle = options.api_idle_timeout.unwrap_or(API_IDLE_TIMEOUT);
    let conns = conn::ConnStats::new(options.api_max_connections.unwrap_or(MAX_API_CONNECTIONS));
    let app = Arc::new(App {
        mesh: mesh.clone(),
        hub,
        api_addr,
        webhook: webhook.clone(),
        shutdown: shutdown.clone(),
        conns: conns.clone(),
        keep_alive: (idle / 3).min(Duration::from_secs(15)),
        sse_clients: AtomicU64::new(0),
        sse_lagged: AtomicU64::new(0),
        api_invalidations: AtomicU64::new(0),
    });
    if let Some(w) = webhook {
        tokio::spawn(w.run(shutdown.clone()));
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
    match served {
        Ok(r) => r.map_err(SidecarError::Serve),
        Err(e) => Err(SidecarError::Serve(std::io::Error::other(e))),
    }
}
