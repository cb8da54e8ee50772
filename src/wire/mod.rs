//! Wire protocol: the messages peers exchange, and the codec that frames them.
//!
//! `proto/PROTOCOL.md` is the normative description of the bytes; these types
//! follow it. The order of enum variants and struct fields *is* the wire
//! format (it fixes the tags and the byte order), so never reorder them: add
//! new variants at the end and bump [`PROTOCOL_VERSION`] for anything else.

mod codec;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use codec::{
    CodecError, Expect, FrameCodec, MAX_BATCH_ITEMS, MAX_FRAME, MAX_HANDSHAKE_FRAME, Opener,
    Sealer, encode_batch_frame, fingerprint, session,
};

/// The four bytes every `Hello` starts with, so that a stranger speaking
/// another protocol is recognised at once.
pub const MAGIC: [u8; 4] = *b"CCST";

/// The protocol version this build speaks (it speaks no other: version 1
/// cannot carry positions bound to content or tagged frames).
pub const PROTOCOL_VERSION: u16 = 2;

/// Longest cache name or key, in bytes of UTF-8.
pub const MAX_STRING: usize = 64 * 1024;

/// Length of the handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

/// Length of an item's fingerprint ([`fingerprint`]).
pub const DIGEST_LEN: usize = 16;

/// Length of a frame's tag under a shared secret ([`Sealer`]).
pub const TAG_LEN: usize = 16;

/// A position in an origin's stream of invalidations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The origin's incarnation (a random number drawn when it started).
    pub incarnation: u64,
    /// A sequence number within that incarnation (the first is 1).
    pub seq: u64,
}

/// One invalidation, as carried in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Item {
    /// One entry of one cache is stale.
    Key {
        /// The cache's name, e.g. `org.hisp.dhis.user.User`.
        cache: Arc<str>,
        /// The entry's key.
        key: Arc<str>,
    },
    /// Every entry of one cache is stale.
    Cache {
        /// The cache's name.
        cache: Arc<str>,
    },
    /// Every entry of every cache is stale.
    Flush,
}

impl Item {
    /// Checks the limits the protocol puts on an item.
    pub fn check(&self) -> Result<(), ItemError> {
        let (cache, key) = match self {
            Item::Key { cache, key } => (cache, Some(key)),
            Item::Cache { cache } => (cache, None),
            Item::Flush => return Ok(()),
        };
        if cache.is_empty() {
            return Err(ItemError::EmptyCache);
        }
        if cache.len() > MAX_STRING {
            return Err(ItemError::TooLong {
                what: "cache name",
                len: cache.len(),
            });
        }
        if let Some(key) = key
            && key.len() > MAX_STRING
        {
            return Err(ItemError::TooLong {
                what: "key",
                len: key.len(),
            });
        }
        Ok(())
    }

    /// An upper bound of the item's encoded size, used to keep batches far
    /// below the frame limit without encoding twice.
    pub fn encoded_len_bound(&self) -> usize {
        match self {
            Item::Key { cache, key } => 1 + 5 + cache.len() + 5 + key.len(),
            Item::Cache { cache } => 1 + 5 + cache.len(),
            Item::Flush => 1,
        }
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Key { cache, key } => write!(f, "{cache}[{key}]"),
            Item::Cache { cache } => write!(f, "{cache}[*]"),
            Item::Flush => f.write_str("flush"),
        }
    }
}

/// Why an [`Item`] breaks the protocol's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The cache name is the empty string.
    #[error("the cache name is empty")]
    EmptyCache,
    /// A string is longer than [`MAX_STRING`].
    #[error("the {what} is {len} bytes long; at most {MAX_STRING} are allowed")]
    TooLong {
        /// Which string: `cache name` or `key`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

/// The first message each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// The highest protocol version the sender speaks.
    pub version: u16,
    /// The sender's identity, `host:port` of its `cluster.instance0` entry.
    pub node: String,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Fresh random bytes for the authentication challenge.
    pub nonce: [u8; NONCE_LEN],
    /// What the sender last applied from the receiver, if anything.
    pub last_applied: Option<Position>,
    /// Whether the sender has a shared secret and will send and demand an
    /// [`Message::Auth`].
    pub auth: bool,
}

/// Where the sender stands in the receiver's stream, sent once the other
/// side has proven itself (section 5.6 of the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// What the sender last applied from the receiver of this message.
    pub last_applied: Option<Position>,
    /// The fingerprint of the item applied at that position; zeros when
    /// there is none.
    pub digest: [u8; DIGEST_LEN],
}

/// A run of invalidations with consecutive sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The sequence number of `items[0]`; `items[i]` has `first_seq + i`.
    pub first_seq: u64,
    /// The invalidations.
    pub items: Vec<Item>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Handshake: identity, incarnation, nonce, replay position.
    Hello(Hello),
    /// Handshake: HMAC-SHA256 proof of the shared secret.
    Auth {
        /// The HMAC tag.
        mac: [u8; MAC_LEN],
    },
    /// Invalidations from the dialer (the origin) to the acceptor.
    Batch(Batch),
    /// Cumulative acknowledgement: everything up to `seq` of `incarnation`
    /// has been applied.
    Ack(Position),
    /// Heartbeat request (dialer to acceptor).
    Ping,
    /// Heartbeat answer.
    Pong,
    /// Graceful shutdown: the origin sent everything up to `last_seq`.
    Goodbye {
        /// The last sequence number the origin assigned.
        last_seq: u64,
    },
    /// The sender closes the connection, and says why.
    Reject {
        /// Human-readable reason, for the other side's log.
        reason: String,
    },
    /// Handshake, after each side's proof: the replay position.
    Resume(Resume),
}

impl Message {
    /// The message's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Auth { .. } => "Auth",
            Message::Batch(_) => "Batch",
            Message::Ack(_) => "Ack",
            Message::Ping => "Ping",
            Message::Pong => "Pong",
            Message::Goodbye { .. } => "Goodbye",
            Message::Reject { .. } => "Reject",
            Message::Resume(_) => "Resume",
        }
    }
}

/// The unit tests' invalidation: `key` in cache `c`.
#[cfg(test)]
pub(crate) fn test_key(key: &str) -> Item {
    Item::Key {
        cache: Arc::from("c"),
        key: Arc::from(key),
    }
}
