//! How nodes reach each other ([`Transport`]): TCP (with TLS when
//! configured) in production, or the in-memory network of the `memory`
//! module that tests drive (feature `test-util`). The tasks above it only
//! move bytes.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};

use super::LinkError;
use super::inbound::Incoming;
use super::io::Io;
use super::limits::lookup;
use super::{PeerInfo, Shared, StartError};
use crate::config::NodeAddr;

/// A connection being made, with the handshake's deadline.
pub(crate) type Dialing<'a> =
    Pin<Box<dyn Future<Output = Result<(Io, Instant), LinkError>> + Send + 'a>>;

/// Where inbound connections will come from, once set up.
pub(crate) type Listening<'a> =
    Pin<Box<dyn Future<Output = Result<Incoming, StartError>> + Send + 'a>>;

/// How a node reaches its peers and is reached by them.
pub(crate) trait Transport: Send + Sync {
    /// Connects to `peer` (its name resolved afresh), TLS included where
    /// this transport has it; with the deadline of the handshake that
    /// follows, counted from the connection.
    fn dial<'a>(&'a self, shared: &'a Shared, peer: &'a PeerInfo) -> Dialing<'a>;

    /// Starts accepting, on `listener` when given.
    fn listen<'a>(&'a self, shared: &'a Shared, listener: Option<TcpListener>) -> Listening<'a>;
}

/// TCP, with mutual TLS when configured.
pub(crate) struct Tcp;

impl Transport for Tcp {
    fn dial<'a>(&'a self, shared: &'a Shared, peer: &'a PeerInfo) -> Dialing<'a> {
        Box::pin(tcp_transport(shared, peer))
    }

    fn listen<'a>(&'a self, shared: &'a Shared, listener: Option<TcpListener>) -> Listening<'a> {
        Box::pin(async move {
            let listener = match listener {
                Some(l) => l,
                None => TcpListener::bind(shared.config.bind)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: shared.config.bind,
                        source,
                    })?,
            };
            Ok(Incoming::Tcp(listener))
        })
    }
}

/// Dials the peer over TCP (resolving its name afresh), with TLS when
/// configured; with the handshake's deadline, counted from the TCP
/// connection.
async fn tcp_transport(shared: &Shared, info: &PeerInfo) -> Result<(Io, Instant), LinkError> {
    let stream = match info.dial {
        Some(via) => timeout(shared.tuning.connect_timeout, TcpStream::connect(via))
            .await
            .map_err(|_| LinkError::Connect(format!("{via}: no answer")))?
            .map_err(|e| LinkError::Connect(format!("{via}: {e}")))?,
        None => dial(&info.addr, shared.tuning.connect_timeout).await?,
    };
    // Latency matters more than packet count; writes are batched anyway.
    stream.set_nodelay(true)?;
    let hello_timeout = shared.tuning.hello_timeout;
    let deadline = Instant::now() + hello_timeout;
    let Some(tls) = &shared.admission.tls else {
        return Ok((Io::Plain(stream), deadline));
    };
    match timeout_at(deadline, tls.connect(&info.addr.host, stream)).await {
        Ok(Ok(s)) => Ok((Io::Client(Box::new(s)), deadline)),
        Ok(Err(e)) => Err(LinkError::Tls(format!(
            "TLS handshake with {} failed: {e} (does it have cachecast.tls configured, with a certificate from the same CA naming {}?)",
            info.addr, info.addr.host
        ))),
        Err(_) => Err(LinkError::HelloTimeout(hello_timeout)),
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
