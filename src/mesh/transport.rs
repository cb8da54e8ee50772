//! How nodes reach each other ([`Transport`]): TCP (with TLS when
//! configured) in production, or the in-memory network of the `memory`
//! module that tests drive (feature `test-util`). The tasks above it only
//! move bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};

use super::LinkError;
use super::StartError;
use super::inbound::Incoming;
use super::io::Io;
use super::limits::lookup;
use crate::config::NodeAddr;
use crate::tls::Tls;

/// A connection being made, with the handshake's deadline.
pub(crate) type Dialing<'a> =
    Pin<Box<dyn Future<Output = Result<(Io, Instant), LinkError>> + Send + 'a>>;

/// Where inbound connections will come from, once set up.
pub(crate) type Listening<'a> =
    Pin<Box<dyn Future<Output = Result<Incoming, StartError>> + Send + 'a>>;

/// Whom to dial, as a transport needs it: addresses and deadlines, not the
/// node's state.
pub(crate) struct Target<'a> {
    /// This node's identity (the in-memory network routes by it; TCP
    /// has the source address).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(crate) from: &'a NodeAddr,
    /// The peer.
    pub(crate) to: &'a NodeAddr,
    /// Where to connect instead of the peer's address (a proxy), if set.
    pub(crate) via: Option<SocketAddr>,
    pub(crate) connect_timeout: Duration,
    /// Counted from the connection: the handshake's deadline.
    pub(crate) hello_timeout: Duration,
}

/// How a node reaches its peers and is reached by them: a transport deals
/// in connections and addresses; what is said over them is the mesh's.
pub(crate) trait Transport: Send + Sync {
    /// Connects to `target.to` (its name resolved afresh), TLS included
    /// where this transport has it; with the deadline of the handshake
    /// that follows, counted from the connection.
    fn dial<'a>(&'a self, target: Target<'a>) -> Dialing<'a>;

    /// Starts accepting as `me`, on `listener` when given, else on `bind`.
    fn listen<'a>(
        &'a self,
        me: &'a NodeAddr,
        bind: SocketAddr,
        listener: Option<TcpListener>,
    ) -> Listening<'a>;
}

/// TCP, with mutual TLS when configured.
pub(crate) struct Tcp {
    /// This node's TLS, for dialing (accepting takes it from the
    /// node's admission rules).
    pub(crate) tls: Option<Tls>,
}

impl Transport for Tcp {
    fn dial<'a>(&'a self, target: Target<'a>) -> Dialing<'a> {
        Box::pin(self.tcp_dial(target))
    }

    fn listen<'a>(
        &'a self,
        _: &'a NodeAddr,
        bind: SocketAddr,
        listener: Option<TcpListener>,
    ) -> Listening<'a> {
        Box::pin(async move {
            let listener = match listener {
                Some(l) => l,
                None => TcpListener::bind(bind)
                    .await
                    .map_err(|source| StartError::Bind { addr: bind, source })?,
            };
            Ok(Incoming::Tcp(listener))
        })
    }
}

impl Tcp {
    /// Dials the peer over TCP (resolving its name afresh), with TLS when
    /// configured; with the handshake's deadline, counted from the TCP
    /// connection.
    async fn tcp_dial(&self, target: Target<'_>) -> Result<(Io, Instant), LinkError> {
        let Target {
            to,
            via,
            connect_timeout,
            hello_timeout,
            ..
        } = target;
        let stream = match via {
            Some(via) => timeout(connect_timeout, TcpStream::connect(via))
                .await
                .map_err(|_| LinkError::Connect(format!("{via}: no answer")))?
                .map_err(|e| LinkError::Connect(format!("{via}: {e}")))?,
            None => dial(to, connect_timeout).await?,
        };
        // Latency matters more than packet count; writes are batched anyway.
        stream.set_nodelay(true)?;
        let deadline = Instant::now() + hello_timeout;
        let Some(tls) = &self.tls else {
            return Ok((Io::Plain(stream), deadline));
        };
        match timeout_at(deadline, tls.connect(&to.host, stream)).await {
            Ok(Ok(s)) => Ok((Io::Client(Box::new(s)), deadline)),
            Ok(Err(e)) => Err(LinkError::Tls(format!(
                "TLS handshake with {to} failed: {e} (does it have cachecast.tls configured, with a certificate from the same CA naming {}?)",
                to.host
            ))),
            Err(_) => Err(LinkError::HelloTimeout(hello_timeout)),
        }
    }
}

/// Connects to the first address of `addr` that answers.
async fn dial(addr: &NodeAddr, connect_timeout: Duration) -> Result<TcpStream, LinkError> {
    let addrs = lookup(&addr.host, addr.port)
        .await
        .map_err(|e| LinkError::Connect(format!("cannot resolve {}: {e}", addr.host)))?;
    let mut last = format!("{} resolves to no address", addr.host);
    for a in addrs {
        match timeout(connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within {connect_timeout:?}"),
        }
    }
    Err(LinkError::Connect(last))
}
