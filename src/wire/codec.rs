//! Bytes ↔ [`Message`]s: 4-byte big-endian length prefix, then the message
//! encoded with bincode 2's standard configuration.
//!
//! This is the only module that uses bincode. Its upstream has stopped, so it
//! stays behind this boundary: `proto/PROTOCOL.md` describes the bytes, and
//! another encoder producing them could replace it with no change on the wire.

use bytes::{BufMut, BytesMut};
use serde::Serialize;
use serde::ser::SerializeStruct;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::{Item, ItemError, MAX_STRING, Message};

/// Largest frame payload (the length prefix excluded), in bytes.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Length of the frame header.
const HEADER: usize = 4;

/// Longest node identity accepted in a `Hello` (a DNS name is at most 253
/// bytes, plus `:port`).
const MAX_NODE_ID: usize = 512;

fn config() -> impl bincode::config::Config {
    // Bounds what a length field inside a frame can make the decoder
    // allocate. bincode charges in-memory sizes (8 bytes per u64 or length,
    // 4 per enum tag) against the limit, never more than 8 times the wire
    // bytes, so this admits every valid frame.
    bincode::config::standard().with_limit::<{ 8 * MAX_FRAME }>()
}

/// Why a frame could not be encoded or decoded. Any of these closes the
/// connection; none of them stops the node.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading from or writing to the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message ends before the frame does.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// A string breaks the protocol's limits.
    #[error("invalid item: {0}")]
    InvalidItem(#[from] ItemError),
    /// A node identity is longer than any host name and port can be.
    #[error("node identity of {0} bytes is too long")]
    NodeIdTooLong(usize),
    /// A message to send could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes and decodes whole frames; wraps `LengthDelimitedCodec`.
#[derive(Debug)]
pub struct FrameCodec {
    frames: LengthDelimitedCodec,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCodec {
    /// A codec with the protocol's limits.
    pub fn new() -> Self {
        let frames = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(HEADER)
            .max_frame_length(MAX_FRAME)
            .new_codec();
        FrameCodec { frames }
    }
}

/// Validates what the type system cannot: string limits.
fn check(msg: &Message) -> Result<(), CodecError> {
    match msg {
        Message::Hello(h) if h.node.len() > MAX_NODE_ID => {
            Err(CodecError::NodeIdTooLong(h.node.len()))
        }
        Message::Batch(b) => {
            if b.first_seq == 0 {
                return Err(CodecError::Malformed("batch numbered from 0".into()));
            }
            let span = (b.items.len() as u64).saturating_sub(1);
            if b.first_seq.checked_add(span).is_none() {
                return Err(CodecError::Malformed("batch numbers overflow u64".into()));
            }
            for item in &b.items {
                item.check()?;
            }
            Ok(())
        }
        Message::Reject { reason } if reason.len() > MAX_STRING => Err(CodecError::Malformed(
            format!("reject reason of {} bytes", reason.len()),
        )),
        _ => Ok(()),
    }
}

/// Decodes one frame's payload.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<Message, CodecError> {
    let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    check(&msg)?;
    Ok(msg)
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        // The inner codec is only called once the whole frame is buffered,
        // so it never keeps a half-read header between calls and `src`
        // always starts at a length prefix here. Checking the prefix first
        // also lets the error name the length.
        if src.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME {
            return Err(CodecError::FrameTooLarge { len: len as u64 });
        }
        if src.len() < HEADER + len {
            // Not all here yet: make room, and leave the header in place.
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        match self.frames.decode(src)? {
            Some(payload) => decode_payload(&payload).map(Some),
            // Unreachable: the whole frame is buffered.
            None => Ok(None),
        }
    }
}

/// Appends bincode's output to a `BytesMut` with no intermediate buffer.
struct BytesWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BytesWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.put_slice(bytes);
        Ok(())
    }
}

/// Writes one frame: a length placeholder, the payload, then the real length.
fn encode_frame<T: Serialize>(value: T, dst: &mut BytesMut) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    let result = bincode::serde::encode_into_writer(value, BytesWriter(dst), config());
    let len = dst.len() - start - HEADER;
    if let Err(e) = result {
        dst.truncate(start);
        return Err(CodecError::Encode(e.to_string()));
    }
    if len > MAX_FRAME {
        dst.truncate(start);
        return Err(CodecError::Encode(format!(
            "frame of {len} bytes exceeds the limit of {MAX_FRAME}"
        )));
    }
    // `len <= MAX_FRAME` fits in a u32.
    dst[start..start + HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

impl Encoder<&Message> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        check(msg)?;
        encode_frame(msg, dst)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

/// Borrowed twin of `Message::Batch`, so that a batch is encoded straight
/// from the replay buffer (two slices of a ring) without copying items.
/// Serde encodes it exactly as `Message::Batch(Batch { .. })`.
struct BatchFrame<'a> {
    first_seq: u64,
    items: (&'a [Item], &'a [Item]),
}

struct Items<'a>((&'a [Item], &'a [Item]));

impl Serialize for Items<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.0.iter().chain(self.0.1))
    }
}

struct BatchBody<'a>(&'a BatchFrame<'a>);

impl Serialize for BatchBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Batch", 2)?;
        st.serialize_field("first_seq", &self.0.first_seq)?;
        st.serialize_field("items", &Items(self.0.items))?;
        st.end()
    }
}

impl Serialize for BatchFrame<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Variant index 2 is `Message::Batch`; a unit test pins the equality.
        s.serialize_newtype_variant("Message", 2, "Batch", &BatchBody(self))
    }
}

/// Appends one `Batch` frame holding `items.0` then `items.1`, numbered from
/// `first_seq`. Callers keep batches well below [`MAX_FRAME`]
/// (see [`Item::encoded_len_bound`]).
pub fn encode_batch_frame(
    first_seq: u64,
    items: (&[Item], &[Item]),
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    encode_frame(BatchFrame { first_seq, items }, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Batch, Hello, MAGIC, Position};
    use std::sync::Arc;

    fn roundtrip(msg: &Message) -> BytesMut {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        codec.encode(msg, &mut buf).expect("encode");
        let bytes = buf.clone();
        let back = codec.decode(&mut buf).expect("decode").expect("a frame");
        assert_eq!(&back, msg);
        assert!(buf.is_empty());
        bytes
    }

    #[test]
    fn borrowed_batch_encodes_like_owned() {
        let items: Vec<Item> = vec![
            Item::Key {
                cache: Arc::from("c"),
                key: Arc::from("k"),
            },
            Item::Cache {
                cache: Arc::from("org.hisp.dhis.user.User"),
            },
            Item::Flush,
        ];
        let owned = roundtrip(&Message::Batch(Batch {
            first_seq: 300,
            items: items.clone(),
        }));
        let mut borrowed = BytesMut::new();
        encode_batch_frame(300, (&items[..1], &items[1..]), &mut borrowed).expect("encode");
        assert_eq!(owned, borrowed);
    }

    #[test]
    fn hello_roundtrips() {
        roundtrip(&Message::Hello(Hello {
            magic: MAGIC,
            version: 1,
            node: "127.0.0.1:4001".into(),
            incarnation: u64::MAX,
            nonce: [7; 32],
            last_applied: Some(Position {
                incarnation: 5,
                seq: 250,
            }),
            auth: false,
        }));
    }

    #[test]
    fn oversized_prefix_is_rejected_before_buffering() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&[0x80, 0, 0, 0][..]);
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len }) => assert_eq!(len, 0x8000_0000),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn frame_of_limit_plus_one_is_rejected() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32 + 1);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut codec = FrameCodec::new();
        let mut full = BytesMut::new();
        codec.encode(&Message::Ping, &mut full).expect("encode");
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert!(codec.decode(&mut part).expect("no error").is_none());
        part.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(codec.decode(&mut part).expect("ok"), Some(Message::Ping));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(2);
        buf.put_slice(&[4, 0]); // Ping, then a stray byte
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn too_long_key_is_rejected_on_both_sides() {
        let msg = Message::Batch(Batch {
            first_seq: 1,
            items: vec![Item::Key {
                cache: Arc::from("c"),
                key: Arc::from("x".repeat(MAX_STRING + 1)),
            }],
        });
        let mut buf = BytesMut::new();
        assert!(FrameCodec::new().encode(&msg, &mut buf).is_err());
        // Encode it anyway, bypassing the check, and decode.
        encode_frame(&msg, &mut buf).expect("raw encode");
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(CodecError::InvalidItem(_))
        ));
    }
}
