//! One inbound session's rules, with no I/O: the order the sending side
//! must keep, and why a session ended. The connection task reads and
//! applies; these decide.

use std::time::Duration;

use crate::mesh::error::Violation;
use crate::wire::{Batch, CodecError, Message, Resume};

/// Why an inbound connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboundEnd {
    #[error("nothing heard for {0:?} (dead or half-open link)")]
    Dead(Duration),
    #[error("the peer shut down (goodbye)")]
    Goodbye,
    #[error("connection closed by the peer")]
    Closed,
    #[error("read failed: {0}")]
    ReadFailed(std::io::Error),
    #[error("bad frame: {0}")]
    BadFrame(CodecError),
    #[error("the peer refused us: {0}")]
    RefusedUs(String),
    #[error("{0}")]
    Protocol(Violation),
    /// The peer's new run is applied on its own connection.
    #[error("superseded by a newer incarnation")]
    NewerIncarnation,
    #[error("superseded by a newer connection")]
    NewerConnection,
    #[error("reader ended")]
    ReaderEnded,
    #[error("the peer read nothing for {0:?}")]
    Stalled(Duration),
    #[error("write failed: {0}")]
    WriteFailed(std::io::Error),
    #[error("shutting down")]
    ShuttingDown,
}

impl InboundEnd {
    /// Whether the peer broke the protocol (counted as a protocol error).
    pub(crate) fn is_protocol_error(&self) -> bool {
        matches!(self, InboundEnd::BadFrame(_) | InboundEnd::Protocol(_))
    }
}

/// What a frame from the sending side asks of the session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromSender {
    /// Its position for us: what it last applied from this node.
    Resume(Resume),
    Batch(Batch),
    Ping,
    /// It is shutting down, having sent up to `last_seq`.
    Goodbye {
        last_seq: u64,
    },
}

/// The order the sending side must keep: its position for us first
/// (section 8 of the protocol), then batches, pings and its goodbye.
#[derive(Debug, Default)]
pub(crate) struct SenderOrder {
    resumed: bool,
    said_goodbye: bool,
}

impl SenderOrder {
    /// Reads the next frame; anything out of order ends the session.
    pub(crate) fn frame(&mut self, msg: Message) -> Result<FromSender, InboundEnd> {
        if !self.resumed {
            return match msg {
                Message::Resume(r) => {
                    self.resumed = true;
                    Ok(FromSender::Resume(r))
                }
                // Without secrets the dialer's refusal (after our hello)
                // arrives once the handshake is done here.
                Message::Reject { reason } => Err(InboundEnd::RefusedUs(reason)),
                other => Err(InboundEnd::Protocol(Violation::Unexpected {
                    expected: "Resume",
                    got: other.kind(),
                })),
            };
        }
        match msg {
            Message::Batch(b) => Ok(FromSender::Batch(b)),
            Message::Ping => Ok(FromSender::Ping),
            Message::Goodbye { last_seq } => {
                self.said_goodbye = true;
                Ok(FromSender::Goodbye { last_seq })
            }
            other => Err(InboundEnd::Protocol(Violation::NotFromSender(other.kind()))),
        }
    }

    /// Why the session ended when the stream did: a goodbye first makes it
    /// a clean shutdown.
    pub(crate) fn closed(&self) -> InboundEnd {
        if self.said_goodbye {
            InboundEnd::Goodbye
        } else {
            InboundEnd::Closed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Position;

    fn resume() -> Message {
        Message::Resume(Resume {
            last_applied: None,
            digest: [0; crate::wire::DIGEST_LEN],
        })
    }

    #[test]
    fn the_position_comes_first() {
        let mut order = SenderOrder::default();
        assert!(matches!(
            order.frame(Message::Ping),
            Err(InboundEnd::Protocol(Violation::Unexpected {
                expected: "Resume",
                got: "Ping"
            }))
        ));
        let mut order = SenderOrder::default();
        assert!(matches!(
            order.frame(Message::Reject { reason: "r".into() }),
            Err(InboundEnd::RefusedUs(r)) if r == "r"
        ));
        let mut order = SenderOrder::default();
        assert!(matches!(order.frame(resume()), Ok(FromSender::Resume(_))));
        assert!(matches!(order.frame(Message::Ping), Ok(FromSender::Ping)));
        // Once: a second position, an ack, a refusal now are not the
        // sending side's.
        for msg in [
            resume(),
            Message::Ack(Position {
                incarnation: 1,
                seq: 1,
            }),
            Message::Reject { reason: "r".into() },
        ] {
            let end = order.frame(msg).expect_err("out of order");
            assert!(end.is_protocol_error(), "{end:?}");
        }
    }

    #[test]
    fn a_goodbye_makes_the_close_clean() {
        let mut order = SenderOrder::default();
        order.frame(resume()).expect("resume");
        assert!(matches!(order.closed(), InboundEnd::Closed));
        assert!(!order.closed().is_protocol_error());
        assert_eq!(
            order.frame(Message::Goodbye { last_seq: 4 }).ok(),
            Some(FromSender::Goodbye { last_seq: 4 })
        );
        assert!(matches!(order.closed(), InboundEnd::Goodbye));
    }
}
