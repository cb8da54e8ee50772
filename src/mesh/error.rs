//! Why a node could not start, an invalidation was not taken, or a link
//! ended.

use std::net::SocketAddr;
use std::time::Duration;

use crate::mesh::handshake::HandshakeError;
use crate::wire::{CodecError, ItemError};

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// More peers than a cluster may have.
    #[error("invalid configuration: {peers} peers; at most {max}")]
    TooManyPeers {
        /// Peers configured.
        peers: usize,
        /// The most allowed.
        max: usize,
    },
    /// The shared secret cannot be used.
    #[error("security settings: {0}")]
    Secret(#[from] crate::auth::SecretError),
    /// The TLS files cannot be used.
    #[error("security settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The state file cannot be read or written.
    #[error("state file {}: {source}", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Neither the configuration nor the builder chose whether to keep a
    /// state file ([`crate::config::StateFile::Default`]).
    #[error(
        "no choice of state file: set ClusterConfig::state_file or call MeshBuilder::state_file \
         with StateFile::At(path) (a start after a crash then tells the peers to flush) or \
         StateFile::Off (a crash after a partition may lose invalidations silently)"
    )]
    StateFileUnchosen,
}

/// Why an invalidation was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidateError {
    /// It breaks the protocol's limits (empty cache name, string too long).
    #[error(transparent)]
    Invalid(#[from] ItemError),
    /// The mesh is shutting down.
    #[error("the mesh is shut down")]
    Closed,
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("connect failed: {0}")]
    Connect(String),
    /// Not a failure: the peer connected to us while our dial still waited
    /// for an answer, so the dial is made again at once.
    #[error("the peer connected to us while this dial waited: dialling again")]
    Redial,
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("nothing heard for {0:?} (dead or half-open link)")]
    Dead(Duration),
    #[error("the peer read nothing for {0:?} (stopped reading)")]
    Stalled(Duration),
    #[error("connection closed by the peer")]
    Closed,
    #[error("peer refused the connection: {0}")]
    Rejected(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Tls(String),
}
