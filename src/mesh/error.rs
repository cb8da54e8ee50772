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
    Protocol(#[from] Violation),
    /// We refused the peer's identity claim.
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Tls(String),
}

impl LinkError {
    /// Whether the other side broke the protocol or was refused (counted
    /// as a protocol error); a reset or other I/O error is not.
    pub(crate) fn is_protocol_error(&self) -> bool {
        match self {
            LinkError::Protocol(_) | LinkError::Refused(_) => true,
            LinkError::Codec(c) => !matches!(c, CodecError::Io(_)),
            _ => false,
        }
    }
}

/// What the other side sent that the protocol does not allow: the link is
/// closed and counted as a protocol error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    /// A message out of its place in the handshake.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// A message the receiving side of a link never sends.
    #[error("unexpected {0} from the receiving side")]
    NotFromReceiver(&'static str),
    /// A message the sending side of a link never sends.
    #[error("unexpected {0} from the sending side")]
    NotFromSender(&'static str),
    /// The dialed address answers with another identity.
    #[error(
        "dialed {dialed} but the node there says it is {said:?}; check both nodes' cluster.instance0"
    )]
    WrongNode { dialed: String, said: String },
    /// An ack of another run of ours.
    #[error("ack for incarnation {got:016x}, ours is {ours:016x}")]
    AckIncarnation { got: u64, ours: u64 },
    /// An ack of a number we never assigned.
    #[error("ack of seq {seq} beyond the last assigned ({last})")]
    AckBeyondLast { seq: u64, last: u64 },
}

/// Why a peer's identity claim was refused for now (told to it in a
/// `Reject`, and logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// Another incarnation of the peer is connected: a restart not yet
    /// noticed, or two nodes configured as one.
    #[error(
        "two running nodes answer as {peer}: incarnation {other:016x}{} while {current:016x} is connected; \
         check cluster.instance0 on each server (a restarted node is let in once its \
         previous run's links are gone, within seconds)",
        if *returning { " came back" } else { " arrived" }
    )]
    TwoRunning {
        peer: String,
        other: u64,
        returning: bool,
        current: u64,
    },
    /// Without proof, a claim of a peer whose connection is demonstrably
    /// alive.
    #[error(
        "a live connection from {peer} (incarnation {incarnation:016x}) was heard {ago_ms} ms ago; \
         a second one claiming it is refused until that one falls silent"
    )]
    LiveConnection {
        peer: String,
        incarnation: u64,
        ago_ms: u128,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_peer_broke_is_told_from_what_the_network_did() {
        let broken = [
            LinkError::from(Violation::NotFromReceiver("Batch")),
            LinkError::from(Violation::AckBeyondLast { seq: 9, last: 3 }),
            LinkError::from(Refusal::LiveConnection {
                peer: "a:1".into(),
                incarnation: 5,
                ago_ms: 12,
            }),
            LinkError::Codec(CodecError::TrailingBytes(3)),
        ];
        for e in &broken {
            assert!(e.is_protocol_error(), "{e:?}");
        }
        let network = [
            LinkError::Codec(CodecError::Io(std::io::ErrorKind::ConnectionReset.into())),
            LinkError::Io(std::io::ErrorKind::BrokenPipe.into()),
            LinkError::Closed,
            LinkError::Dead(Duration::from_secs(6)),
        ];
        for e in &network {
            assert!(!e.is_protocol_error(), "{e:?}");
        }
    }

    #[test]
    fn a_refusal_says_what_to_check() {
        let two = Refusal::TwoRunning {
            peer: "10.0.0.2:4001".into(),
            other: 0xb,
            returning: false,
            current: 0xa,
        }
        .to_string();
        assert!(
            two.starts_with(
                "two running nodes answer as 10.0.0.2:4001: incarnation 000000000000000b arrived"
            ) && two.contains("check cluster.instance0"),
            "{two}"
        );
    }
}
