//! Bytes ↔ [`Message`]s: 4-byte big-endian length prefix, then the message
//! encoded with bincode 2's standard configuration.
//!
//! This is the only module that uses bincode. Its upstream has stopped, so it
//! stays behind this boundary: `proto/PROTOCOL.md` describes the bytes, and
//! another encoder producing them could replace it with no change on the wire.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::{Batch, DIGEST_LEN, Item, ItemError, MAX_STRING, Message, TAG_LEN};

/// Largest frame payload (the length prefix excluded), in bytes.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Length of the frame header.
const HEADER: usize = 4;

/// Largest frame payload before the handshake is complete: a `Hello` is
/// well under 1 KiB and a `Reject` reason at most 64 KiB, so a party that
/// has not proven anything cannot make a node buffer a 1 MiB frame.
pub const MAX_HANDSHAKE_FRAME: usize = MAX_STRING + 16;

/// Most items in one `Batch`: what a receiver decodes at once stays small
/// whatever a peer sends (section 6 of the protocol).
pub const MAX_BATCH_ITEMS: usize = 4096;

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
#[non_exhaustive]
pub enum CodecError {
    /// Reading from or writing to the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix announces more than [`MAX_FRAME`] bytes (or
    /// [`MAX_HANDSHAKE_FRAME`] during the handshake).
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit in force.
        limit: usize,
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
    /// A message of a kind not allowed at this point (the handshake),
    /// refused before its body was decoded.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What was allowed.
        expected: &'static str,
        /// The kind that came.
        got: &'static str,
    },
    /// A `Batch` with more items than [`MAX_BATCH_ITEMS`].
    #[error("batch of {0} items exceeds the limit of {MAX_BATCH_ITEMS}")]
    TooManyItems(u64),
    /// A message to send could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A frame's tag is not the one the session key gives it (section 7.6
    /// of the protocol): dropped, altered, reordered or injected on the
    /// path, or a frame too short to carry a tag.
    #[error("frame authentication failed")]
    BadTag,
}

/// Encodes and decodes whole frames; wraps `LengthDelimitedCodec`.
#[derive(Debug)]
pub struct FrameCodec {
    frames: LengthDelimitedCodec,
    /// Cache names seen lately on this stream, shared by the items that
    /// carry them.
    names: Names,
    /// During the handshake: the kinds of message accepted next, checked
    /// on the tag before the body is decoded, and the smaller frame limit.
    handshake: Option<Expect>,
    /// Under a shared secret, once the other side's frames carry tags:
    /// checks and strips each one before the payload is decoded.
    opener: Option<Opener>,
}

/// Message kinds a handshake step accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A `Hello` (the acceptor's first frame).
    Hello,
    /// A `Hello` or a `Reject` (the dialer's first frame).
    HelloOrReject,
    /// An `Auth` or a `Reject`.
    AuthOrReject,
    /// A `Resume` or a `Reject` (the dialer's last handshake frame).
    ResumeOrReject,
}

impl Expect {
    fn allows(self, tag: u8) -> bool {
        match self {
            Expect::Hello => tag == TAG_HELLO,
            Expect::HelloOrReject => tag == TAG_HELLO || tag == TAG_REJECT,
            Expect::AuthOrReject => tag == TAG_AUTH || tag == TAG_REJECT,
            Expect::ResumeOrReject => tag == TAG_RESUME || tag == TAG_REJECT,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Expect::Hello => "Hello",
            Expect::HelloOrReject => "Hello or Reject",
            Expect::AuthOrReject => "Auth or Reject",
            Expect::ResumeOrReject => "Resume or Reject",
        }
    }
}

/// `Message` variant indexes (one varint byte each), as section 5.1 of the
/// protocol numbers them.
const TAG_HELLO: u8 = 0;
const TAG_AUTH: u8 = 1;
const TAG_BATCH: u8 = 2;
const TAG_REJECT: u8 = 7;
const TAG_RESUME: u8 = 8;

/// A message kind's name by its tag, for errors.
fn kind_of(tag: u8) -> &'static str {
    const NAMES: [&str; 9] = [
        "Hello", "Auth", "Batch", "Ack", "Ping", "Pong", "Goodbye", "Reject", "Resume",
    ];
    NAMES
        .get(usize::from(tag))
        .copied()
        .unwrap_or("an unknown message")
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
        FrameCodec {
            frames,
            names: Names::default(),
            handshake: None,
            opener: None,
        }
    }

    /// From now on every frame received must carry a valid tag (section
    /// 7.6 of the protocol), checked and stripped before decoding.
    pub fn authenticate(&mut self, opener: Opener) {
        self.opener = Some(opener);
    }

    /// A codec for the first frames of a connection: only the kinds
    /// `expect` names are decoded (anything else is an error before its
    /// body is looked at), in frames of at most [`MAX_HANDSHAKE_FRAME`].
    pub fn handshake(expect: Expect) -> Self {
        let mut c = Self::new();
        c.handshake = Some(expect);
        c
    }

    /// The next handshake step accepts `expect`.
    pub fn allow_next(&mut self, expect: Expect) {
        self.handshake = Some(expect);
    }

    /// The handshake is over: every message, in frames up to [`MAX_FRAME`].
    pub fn established(&mut self) {
        self.handshake = None;
    }

    fn max_frame(&self) -> usize {
        if self.handshake.is_some() {
            MAX_HANDSHAKE_FRAME
        } else {
            MAX_FRAME
        }
    }
}

/// Cache names lately decoded on one stream. An application invalidates
/// many keys of few caches, so items share one `Arc<str>` per name instead
/// of allocating one each.
#[derive(Debug, Default)]
struct Names {
    recent: Vec<Arc<str>>,
    /// Where the next new name goes once `recent` is full.
    next: usize,
}

/// Names kept per stream, and the longest kept (so that what is held stays
/// small whatever a peer sends).
const RECENT_NAMES: usize = 8;
const SHARED_NAME_MAX: usize = 256;

impl Names {
    /// The name whose UTF-8 is `bytes`; `None` if they are not UTF-8. A
    /// name seen lately is not checked again.
    fn get_utf8(&mut self, bytes: &[u8]) -> Option<Arc<str>> {
        if let Some(known) = self.recent.iter().find(|n| n.as_bytes() == bytes) {
            return Some(known.clone());
        }
        let name = std::str::from_utf8(bytes).ok()?;
        let new: Arc<str> = Arc::from(name);
        if name.len() <= SHARED_NAME_MAX {
            if self.recent.len() < RECENT_NAMES {
                self.recent.push(new.clone());
            } else {
                self.recent[self.next] = new.clone();
                self.next = (self.next + 1) % RECENT_NAMES;
            }
        }
        Some(new)
    }
}

/// Validates what the type system cannot: string limits.
fn check(msg: &Message) -> Result<(), CodecError> {
    match msg {
        Message::Hello(h) if h.node.len() > MAX_NODE_ID => {
            Err(CodecError::NodeIdTooLong(h.node.len()))
        }
        Message::Batch(b) => {
            if b.items.len() > MAX_BATCH_ITEMS {
                return Err(CodecError::TooManyItems(b.items.len() as u64));
            }
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
fn decode_payload(payload: &[u8], names: &mut Names) -> Result<Message, CodecError> {
    // A batch's item count is read before any item, by either decoder.
    if payload.first() == Some(&TAG_BATCH) {
        let mut r = Reader {
            bytes: &payload[1..],
        };
        if let (Some(_), Some(count)) = (r.varint(253), r.varint(253))
            && count > MAX_BATCH_ITEMS as u64
        {
            return Err(CodecError::TooManyItems(count));
        }
    }
    let msg = match decode_batch(payload, names) {
        Some(batch) => batch,
        None => {
            let (msg, used): (Message, usize) =
                bincode::serde::decode_from_slice(payload, config())
                    .map_err(|e| CodecError::Malformed(e.to_string()))?;
            if used != payload.len() {
                return Err(CodecError::TrailingBytes(payload.len() - used));
            }
            msg
        }
    };
    check(&msg)?;
    Ok(msg)
}

/// Reads a payload by the rules of `proto/PROTOCOL.md` section 4.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// A varint whose widest accepted form starts with `widest` (`fc` for
    /// a u32, `fd` for a u64).
    fn varint(&mut self, widest: u8) -> Option<u64> {
        let first = self.byte()?;
        let width = match first {
            0..=250 => return Some(u64::from(first)),
            251 => 2,
            252 if widest >= 252 => 4,
            253 if widest >= 253 => 8,
            _ => return None,
        };
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(self.take(width)?);
        Some(u64::from_le_bytes(le))
    }

    /// A string's bytes, not checked.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint(253)?).ok()?;
        self.take(len)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

/// The hot path: a `Batch` payload decoded without serde, its keys straight
/// into `Arc<str>` and its cache names shared through `names`. `None` when
/// the payload is anything else, or anything but a well-formed batch:
/// bincode then decodes it, so every error (and every message but `Batch`)
/// comes from one decoder. What this returns is what bincode would.
fn decode_batch(payload: &[u8], names: &mut Names) -> Option<Message> {
    let mut r = Reader { bytes: payload };
    // `Message::Batch` is variant 2, in its one-byte form.
    if r.byte()? != 2 {
        return None;
    }
    let first_seq = r.varint(253)?;
    let count = r.varint(253)?;
    // Every item takes at least one byte.
    if count > r.bytes.len() as u64 {
        return None;
    }
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        items.push(match r.varint(252)? {
            0 => {
                let cache = names.get_utf8(r.bytes()?)?;
                Item::Key {
                    cache,
                    key: Arc::from(r.str()?),
                }
            }
            1 => Item::Cache {
                cache: names.get_utf8(r.bytes()?)?,
            },
            2 => Item::Flush,
            _ => return None,
        });
    }
    if !r.bytes.is_empty() {
        return None;
    }
    Some(Message::Batch(Batch { first_seq, items }))
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
        // During the handshake the tag is checked as soon as it arrives,
        // before the length or the body: a message out of place is named.
        if let Some(expect) = self.handshake
            && len > 0
            && let Some(&tag) = src.get(HEADER)
            && !expect.allows(tag)
        {
            return Err(CodecError::Unexpected {
                expected: expect.name(),
                got: kind_of(tag),
            });
        }
        let limit = self.max_frame();
        if len > limit {
            return Err(CodecError::FrameTooLarge {
                len: len as u64,
                limit,
            });
        }
        if src.len() < HEADER + len {
            // Not all here yet: make room, and leave the header in place.
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        match self.frames.decode(src)? {
            Some(frame) => {
                let payload = match &mut self.opener {
                    Some(opener) => opener.open(&frame)?,
                    None => &frame[..],
                };
                decode_payload(payload, &mut self.names).map(Some)
            }
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
    if let Err(e) = result {
        dst.truncate(start);
        return Err(CodecError::Encode(e.to_string()));
    }
    finish_frame(dst, start)
}

/// Writes the length of the frame that starts at `start` into its header,
/// or takes the frame back out when it is over the limit.
fn finish_frame(dst: &mut BytesMut, start: usize) -> Result<(), CodecError> {
    let len = dst.len() - start - HEADER;
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

/// Appends a varint in its shortest form (PROTOCOL.md 4.2), as bincode
/// writes it.
fn put_varint(dst: &mut BytesMut, v: u64) {
    if v <= 250 {
        dst.put_u8(v as u8);
    } else if let Ok(v) = u16::try_from(v) {
        dst.put_u8(251);
        dst.put_u16_le(v);
    } else if let Ok(v) = u32::try_from(v) {
        dst.put_u8(252);
        dst.put_u32_le(v);
    } else {
        dst.put_u8(253);
        dst.put_u64_le(v);
    }
}

fn put_str(dst: &mut BytesMut, s: &str) {
    put_varint(dst, s.len() as u64);
    dst.put_slice(s.as_bytes());
}

/// Appends an item's encoding (section 5.4 of the protocol, shortest
/// varints).
fn put_item(dst: &mut BytesMut, item: &Item) {
    match item {
        Item::Key { cache, key } => {
            dst.put_u8(0);
            put_str(dst, cache);
            put_str(dst, key);
        }
        Item::Cache { cache } => {
            dst.put_u8(1);
            put_str(dst, cache);
        }
        Item::Flush => dst.put_u8(2),
    }
}

/// The fingerprint of the item an origin numbered `seq` in `incarnation`
/// (section 9.5 of the protocol): what a receiver announces beside its
/// position, so that the origin resumes only past what the receiver
/// applied *from it*.
pub fn fingerprint(incarnation: u64, seq: u64, item: &Item) -> [u8; DIGEST_LEN] {
    let mut encoded = BytesMut::with_capacity(item.encoded_len_bound());
    put_item(&mut encoded, item);
    let digest = Sha256::new()
        .chain_update(b"cachecast item v2\0")
        .chain_update(incarnation.to_be_bytes())
        .chain_update(seq.to_be_bytes())
        .chain_update(&encoded)
        .finalize();
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&digest[..DIGEST_LEN]);
    out
}

/// The session key of a connection under a shared secret (section 7.6).
fn session_key(secret: &[u8], dialer_nonce: &[u8], acceptor_nonce: &[u8]) -> Hmac<Sha256> {
    let mut kdf = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    kdf.update(b"cachecast session v2\0");
    kdf.update(dialer_nonce);
    kdf.update(acceptor_nonce);
    let key = kdf.finalize().into_bytes();
    <Hmac<Sha256> as Mac>::new_from_slice(&key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

/// One direction of a connection's frame tags: the session key, whose
/// frames (role `D` or `A`), and how many were tagged so far.
#[derive(Clone)]
struct Tags {
    key: Hmac<Sha256>,
    role: u8,
    counter: u64,
}

impl std::fmt::Debug for Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Tags")
            .field("role", &char::from(self.role))
            .field("counter", &self.counter)
            .finish()
    }
}

impl Tags {
    /// The HMAC of the next frame's `payload`, not yet finalized.
    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        mac.update(&[self.role]);
        mac.update(&self.counter.to_be_bytes());
        mac.update(payload);
        mac
    }
}

/// The two halves of a connection's frame tags under a shared secret:
/// what this side sends, and what it receives.
pub fn session(
    secret: &[u8],
    dialer_nonce: &[u8],
    acceptor_nonce: &[u8],
    dialer: bool,
) -> (Sealer, Opener) {
    let key = session_key(secret, dialer_nonce, acceptor_nonce);
    let (ours, theirs) = if dialer { (b'D', b'A') } else { (b'A', b'D') };
    let tags = |role| Tags {
        key: key.clone(),
        role,
        counter: 0,
    };
    (Sealer(tags(ours)), Opener(tags(theirs)))
}

/// Tags the frames this side sends (section 7.6 of the protocol).
#[derive(Clone, Debug)]
pub struct Sealer(Tags);

impl Sealer {
    /// Appends the tag to the frame that starts at `start` (the last one
    /// in `dst`) and counts it in the frame's length.
    pub fn seal(&mut self, dst: &mut BytesMut, start: usize) -> Result<(), CodecError> {
        let payload_len = dst.len() - start - HEADER;
        if payload_len + TAG_LEN > MAX_FRAME {
            dst.truncate(start);
            return Err(CodecError::Encode(format!(
                "frame of {payload_len} bytes and its tag exceed the limit of {MAX_FRAME}"
            )));
        }
        let full = self.0.mac(&dst[start + HEADER..]).finalize().into_bytes();
        self.0.counter += 1;
        dst.put_slice(&full[..TAG_LEN]);
        // `payload_len + TAG_LEN <= MAX_FRAME` fits in a u32.
        dst[start..start + HEADER].copy_from_slice(&((payload_len + TAG_LEN) as u32).to_be_bytes());
        Ok(())
    }

    /// Encodes `msg` as one tagged frame.
    pub fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        FrameCodec::new().encode(msg, dst)?;
        self.seal(dst, start)
    }
}

/// Checks the tags of the frames the other side sends.
#[derive(Clone, Debug)]
pub struct Opener(Tags);

impl Opener {
    /// The payload of a tagged frame, once its tag checked out (compared
    /// in constant time).
    pub fn open<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], CodecError> {
        let Some(split) = frame.len().checked_sub(TAG_LEN).filter(|&n| n > 0) else {
            return Err(CodecError::BadTag);
        };
        let (payload, got) = frame.split_at(split);
        self.0
            .mac(payload)
            .verify_truncated_left(got)
            .map_err(|_| CodecError::BadTag)?;
        self.0.counter += 1;
        Ok(payload)
    }
}

/// Appends one `Batch` frame holding `items.0` then `items.1`, numbered from
/// `first_seq`: the bytes bincode writes for the same `Message::Batch` (a
/// test pins it), written straight from the replay buffer (two slices of a
/// ring) without copying items. Callers keep batches well below
/// [`MAX_FRAME`] (see [`Item::encoded_len_bound`]).
pub fn encode_batch_frame(
    first_seq: u64,
    items: (&[Item], &[Item]),
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let count = items.0.len() + items.1.len();
    if count > MAX_BATCH_ITEMS {
        return Err(CodecError::TooManyItems(count as u64));
    }
    let start = dst.len();
    let bound: usize = items
        .0
        .iter()
        .chain(items.1)
        .map(Item::encoded_len_bound)
        .sum();
    dst.reserve(HEADER + 1 + 9 + 9 + bound);
    dst.put_u32(0);
    // Variant 2 is `Message::Batch`; then its fields in order.
    dst.put_u8(2);
    put_varint(dst, first_seq);
    put_varint(dst, (items.0.len() + items.1.len()) as u64);
    for item in items.0.iter().chain(items.1) {
        put_item(dst, item);
    }
    finish_frame(dst, start)
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

    /// What bincode alone makes of a payload.
    fn bincode_decode(payload: &[u8]) -> Option<Message> {
        let (msg, used): (Message, usize) =
            bincode::serde::decode_from_slice(payload, config()).ok()?;
        (used == payload.len()).then_some(msg)
    }

    fn arb_str() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-zA-Z0-9.é]{0,20}",
            // Around the one-byte varint limit of 250.
            proptest::collection::vec(proptest::char::range('a', 'c'), 245..260)
                .prop_map(|v| v.into_iter().collect()),
            // Past the u16 form, for a u32 length.
            Just("k".repeat(70_000)),
        ]
    }

    fn arb_item() -> impl proptest::strategy::Strategy<Value = Item> {
        use proptest::prelude::*;
        prop_oneof![
            (arb_str(), arb_str()).prop_map(|(c, k)| Item::Key {
                cache: Arc::from(c),
                key: Arc::from(k),
            }),
            arb_str().prop_map(|c| Item::Cache {
                cache: Arc::from(c)
            }),
            Just(Item::Flush),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// The hand-written batch encoder and decoder agree with bincode
        /// byte for byte, varint forms included.
        #[test]
        fn batch_fast_paths_match_bincode(
            first_seq in proptest::prop_oneof![
                1u64..300,
                60_000u64..70_000,
                4_294_967_000u64..4_294_968_000,
                (u64::MAX - 1000)..u64::MAX,
            ],
            items in proptest::collection::vec(arb_item(), 0..12),
            split in 0usize..12,
        ) {
            let split = split.min(items.len());
            let owned = Message::Batch(Batch { first_seq, items: items.clone() });
            let mut by_bincode = BytesMut::new();
            encode_frame(&owned, &mut by_bincode).expect("bincode encodes");
            let mut by_hand = BytesMut::new();
            encode_batch_frame(first_seq, (&items[..split], &items[split..]), &mut by_hand)
                .expect("encodes");
            proptest::prop_assert_eq!(&by_bincode, &by_hand);
            let payload = &by_hand[HEADER..];
            let fast = decode_batch(payload, &mut Names::default());
            proptest::prop_assert_eq!(fast.as_ref(), Some(&owned));
            proptest::prop_assert_eq!(bincode_decode(payload), Some(owned));
        }

        /// On a damaged batch the fast decoder gives up (bincode then says
        /// what is wrong) or finds exactly what bincode finds.
        #[test]
        fn fast_decoder_never_disagrees_with_bincode(
            items in proptest::collection::vec(arb_item(), 0..6),
            edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..4),
            cut in 0usize..4096,
        ) {
            let mut buf = BytesMut::new();
            encode_batch_frame(7, (&items, &[]), &mut buf).expect("encodes");
            let mut payload = buf[HEADER..].to_vec();
            for (at, byte) in edits {
                let at = at % payload.len();
                payload[at] = byte;
            }
            payload.truncate(payload.len() - cut % payload.len());
            if let Some(fast) = decode_batch(&payload, &mut Names::default()) {
                proptest::prop_assert_eq!(Some(fast), bincode_decode(&payload));
            }
        }
    }

    #[test]
    fn long_forms_are_left_to_bincode_and_still_decode() {
        // Batch tag written as `fb 02 00`, first_seq 1, one Flush.
        let payload = [0xfb, 2, 0, 1, 1, 2];
        assert_eq!(decode_batch(&payload, &mut Names::default()), None);
        let msg = decode_payload(&payload, &mut Names::default()).expect("decodes");
        assert_eq!(
            msg,
            Message::Batch(Batch {
                first_seq: 1,
                items: vec![Item::Flush]
            })
        );
        // Long forms inside a batch are decoded by hand: first_seq `fb 05 00`.
        let payload = [2, 0xfb, 5, 0, 1, 2];
        assert_eq!(
            decode_batch(&payload, &mut Names::default()),
            bincode_decode(&payload)
        );
    }

    #[test]
    fn items_share_their_cache_name() {
        let key = |k: &str| Item::Key {
            cache: Arc::from("org.hisp.dhis.user.User"),
            key: Arc::from(k),
        };
        let items = [key("a"), key("b")];
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        encode_batch_frame(1, (&items, &[]), &mut buf).expect("encodes");
        encode_batch_frame(3, (&items, &[]), &mut buf).expect("encodes");
        let mut caches = Vec::new();
        while let Some(Message::Batch(b)) = codec.decode(&mut buf).expect("decodes") {
            for item in b.items {
                if let Item::Key { cache, .. } = item {
                    caches.push(cache);
                }
            }
        }
        assert_eq!(caches.len(), 4);
        assert!(caches.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
        // Long names are not kept.
        let mut names = Names::default();
        let long = "x".repeat(SHARED_NAME_MAX + 1);
        let mut get = || names.get_utf8(long.as_bytes()).expect("UTF-8");
        assert!(!Arc::ptr_eq(&get(), &get()));
        assert!(names.recent.is_empty());
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
            Err(CodecError::FrameTooLarge { len, .. }) => assert_eq!(len, 0x8000_0000),
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

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Section 12.5 of the protocol, as written there.
    #[test]
    fn frame_tags_match_the_spec_and_catch_tampering() {
        let secret = b"0123456789abcdef";
        let (dn, an) = ([0xaa; 32], [0xbb; 32]);
        let (mut d_seal, mut d_open) = session(secret, &dn, &an, true);
        let (mut a_seal, mut a_open) = session(secret, &dn, &an, false);
        let resume = Message::Resume(crate::wire::Resume {
            last_applied: None,
            digest: [0; DIGEST_LEN],
        });
        let mut buf = BytesMut::new();
        d_seal.encode(&resume, &mut buf).expect("seal");
        assert_eq!(
            &buf[..],
            &hex("00000022080000000000000000000000000000000000fc8b1db1a4408a381d82b8441c094f81")[..]
        );
        let mut acceptor = FrameCodec::new();
        acceptor.authenticate(a_open.clone());
        assert_eq!(
            acceptor.decode(&mut buf.clone()).expect("open"),
            Some(resume.clone())
        );

        let ack = Message::Ack(Position {
            incarnation: 65_536,
            seq: 41,
        });
        let mut first = BytesMut::new();
        a_seal.encode(&resume, &mut first).expect("seal");
        let mut second = BytesMut::new();
        a_seal.encode(&ack, &mut second).expect("seal");
        assert_eq!(
            &second[..],
            &hex("0000001703fc000001002937763cb81f973a690d1e69ca753a19e0")[..]
        );
        // Out of order (the first frame dropped on the path): refused.
        let mut dialer = FrameCodec::new();
        dialer.authenticate(d_open.clone());
        assert!(matches!(
            dialer.decode(&mut second.clone()),
            Err(CodecError::BadTag)
        ));
        // In order: both open.
        assert!(d_open.open(&first[4..]).is_ok());
        assert!(d_open.open(&second[4..]).is_ok());
        // One bit flipped: refused.
        let mut flipped = buf.clone();
        flipped[6] ^= 1;
        assert!(matches!(
            a_open.open(&flipped[4..]),
            Err(CodecError::BadTag)
        ));
        // Too short to hold a tag.
        assert!(matches!(a_open.open(&[8u8; 16]), Err(CodecError::BadTag)));
    }

    /// Section 12.6 of the protocol, as written there.
    #[test]
    fn fingerprints_match_the_spec() {
        let inc = 0x0123_4567_89ab_cdef;
        let key = Item::Key {
            cache: Arc::from("org.hisp.dhis.user.User"),
            key: Arc::from("xE7jOejl9FI"),
        };
        assert_eq!(
            fingerprint(inc, 42, &key)[..],
            hex("bbd3331d759de109335d5703466d11f0")[..]
        );
        assert_eq!(
            fingerprint(inc, 43, &Item::Flush)[..],
            hex("ff29c57e7f597c7acae7aa33466a412d")[..]
        );
        assert_ne!(fingerprint(inc, 43, &key), fingerprint(inc, 42, &key));
    }
}
