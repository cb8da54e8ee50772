//! Why a node could not start, or an invalidation was not taken.

use std::net::SocketAddr;

use crate::wire::ItemError;

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
