//! Checks the codec against `proto/PROTOCOL.md`: the golden frames in
//! `proto/vectors/` were written by hand from the spec's encoding rules, so
//! these tests compare the code with the spec, not the code with itself.
//!
//! Uses only the crate's public API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use cachecast::wire::{
    Batch, CodecError, FrameCodec, Hello, Item, MAGIC, MAX_FRAME, Message, Position, Resume,
};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

// Limits, as PROTOCOL.md states them (deliberately not taken from the crate).
const SPEC_MAX_FRAME: usize = 1_048_576;
const SPEC_MAX_STRING: usize = 65_536;
const SPEC_MAX_NODE: usize = 512;

// ---------------------------------------------------------------- helpers

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto")
        .join("vectors")
}

/// Parses a vector file: hex digits, whitespace ignored, `#` starts a
/// comment that runs to the end of the line.
fn parse_hex(text: &str) -> Vec<u8> {
    let mut digits = String::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        digits.extend(code.chars().filter(|c| !c.is_whitespace()));
    }
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .unwrap_or_else(|_| panic!("bad hex digits {:?}", &digits[i..i + 2]))
        })
        .collect()
}

fn read_vector(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_hex(&text)
}

fn s(text: &str) -> Arc<str> {
    Arc::from(text)
}

fn encode(msg: &Message) -> Result<BytesMut, CodecError> {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(msg, &mut buf)?;
    Ok(buf)
}

/// Decodes `bytes` with a fresh codec; returns the result and what is left.
fn decode(bytes: &[u8]) -> (Result<Option<Message>, CodecError>, usize) {
    let mut buf = BytesMut::from(bytes);
    let result = FrameCodec::new().decode(&mut buf);
    (result, buf.len())
}

/// A frame around a hand-written payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn decode_err(bytes: &[u8]) -> CodecError {
    match decode(bytes).0 {
        Err(e) => e,
        Ok(other) => panic!("expected an error for {bytes:02x?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- vectors

fn expected_vectors() -> Vec<(&'static str, Message)> {
    let nonce: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mac: [u8; 32] = std::array::from_fn(|i| 0xff - i as u8);
    vec![
        (
            "hello.hex",
            Message::Hello(Hello {
                magic: *b"CCST",
                version: 1,
                node: "app1.example.org:4001".into(),
                incarnation: 0x0123_4567_89ab_cdef,
                nonce,
                last_applied: Some(Position {
                    incarnation: 3_000_000_000,
                    seq: 300,
                }),
                auth: false,
            }),
        ),
        (
            "hello_no_position.hex",
            Message::Hello(Hello {
                magic: MAGIC,
                version: 1,
                node: "10.0.0.2:4001".into(),
                incarnation: 65_536,
                nonce: [0xaa; 32],
                last_applied: None,
                auth: true,
            }),
        ),
        ("auth.hex", Message::Auth { mac }),
        (
            "batch.hex",
            Message::Batch(Batch {
                first_seq: 1000,
                items: vec![
                    Item::Key {
                        cache: s("org.hisp.dhis.user.User"),
                        key: s("café🔑"),
                    },
                    Item::Cache {
                        cache: s("org.hisp.dhis.dataelement.DataElement"),
                    },
                    Item::Flush,
                ],
            }),
        ),
        (
            "ack.hex",
            Message::Ack(Position {
                incarnation: 0x0123_4567_89ab_cdef,
                seq: 1002,
            }),
        ),
        ("ping.hex", Message::Ping),
        ("pong.hex", Message::Pong),
        ("goodbye.hex", Message::Goodbye { last_seq: 70_000 }),
        (
            "reject.hex",
            Message::Reject {
                reason: "unknown peer: 10.0.0.9:4001".into(),
            },
        ),
        (
            "resume.hex",
            Message::Resume(Resume {
                last_applied: Some(Position {
                    incarnation: 0x0123_4567_89ab_cdef,
                    seq: 1002,
                }),
                digest: [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ],
            }),
        ),
        (
            "resume_none.hex",
            Message::Resume(Resume {
                last_applied: None,
                digest: [0; 16],
            }),
        ),
    ]
}

#[test]
fn vectors_decode_and_reencode_byte_for_byte() {
    for (name, expected) in expected_vectors() {
        let bytes = read_vector(name);
        let (result, left) = decode(&bytes);
        let got = result
            .unwrap_or_else(|e| panic!("{name}: decode error: {e}"))
            .unwrap_or_else(|| panic!("{name}: decoder wants more bytes"));
        assert_eq!(got, expected, "{name}: decoded message");
        assert_eq!(left, 0, "{name}: bytes left after the frame");

        let encoded = encode(&expected).unwrap_or_else(|e| panic!("{name}: encode error: {e}"));
        assert_eq!(
            encoded.as_ref(),
            &bytes[..],
            "{name}: re-encoding differs from the vector"
        );
    }
}

#[test]
fn every_vector_file_is_checked() {
    let known: Vec<&str> = expected_vectors().iter().map(|(n, _)| *n).collect();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(vectors_dir()).expect("proto/vectors exists") {
        let name = entry
            .expect("dir entry")
            .file_name()
            .into_string()
            .expect("utf-8 name");
        if name.ends_with(".hex") {
            assert!(
                known.contains(&name.as_str()),
                "{name} has no expected message in this test"
            );
            found.push(name);
        }
    }
    assert_eq!(
        found.len(),
        known.len(),
        "missing vector files: have {found:?}"
    );
}

#[test]
fn vectors_decode_back_to_back_in_one_buffer() {
    let mut buf = BytesMut::new();
    let vectors = expected_vectors();
    for (name, _) in &vectors {
        buf.extend_from_slice(&read_vector(name));
    }
    let mut codec = FrameCodec::new();
    for (name, expected) in vectors {
        let got = codec
            .decode(&mut buf)
            .expect("no error")
            .expect("a whole frame");
        assert_eq!(got, expected, "{name}");
    }
    assert!(buf.is_empty());
    assert!(codec.decode(&mut buf).expect("no error").is_none());
}

/// What a TCP reader does: feed the bytes as they arrive, here one at a
/// time, to the *same* codec; the payload's first bytes must never be taken
/// for a length prefix.
#[test]
fn vectors_decode_when_fed_byte_by_byte() {
    for (name, expected) in expected_vectors() {
        let bytes = read_vector(name);
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let result = codec.decode(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{name}: error after {} of {} bytes: {e}",
                    i + 1,
                    bytes.len()
                )
            });
            if i + 1 < bytes.len() {
                assert!(
                    result.is_none(),
                    "{name}: message before the frame is complete"
                );
            } else {
                assert_eq!(result, Some(expected.clone()), "{name}");
            }
        }
    }
}

// ---------------------------------------------------------------- limits and malformed input

#[test]
fn max_frame_is_one_mib() {
    assert_eq!(MAX_FRAME, SPEC_MAX_FRAME);
}

#[test]
fn two_gib_prefix_is_rejected_from_the_header_alone() {
    let (result, _) = decode(&[0x80, 0x00, 0x00, 0x00]);
    match result {
        Err(CodecError::FrameTooLarge { len, .. }) => assert_eq!(len, 0x8000_0000),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    let (result, _) = decode(&[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        result,
        Err(CodecError::FrameTooLarge {
            len: 0xffff_ffff,
            ..
        })
    ));
}

#[test]
fn max_frame_plus_one_is_rejected() {
    let header = (SPEC_MAX_FRAME as u32 + 1).to_be_bytes();
    match decode(&header).0 {
        Err(CodecError::FrameTooLarge { len, .. }) => assert_eq!(len, SPEC_MAX_FRAME as u64 + 1),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[test]
fn max_frame_prefix_is_accepted_and_waits_for_the_payload() {
    let header = (SPEC_MAX_FRAME as u32).to_be_bytes();
    assert!(matches!(decode(&header).0, Ok(None)));
}

/// A Batch whose payload is exactly `payload_len` bytes: 15 caches of
/// 65,536 bytes, and one more cache whose length makes up the rest.
fn batch_of_payload_len(payload_len: usize) -> Message {
    // tag (1) + first_seq 1 (1) + count 16 (1) + 15 * (tag 1 + len fc xx xx xx xx (5) + 65536)
    let fixed = 3 + 15 * (1 + 5 + SPEC_MAX_STRING);
    // last item: tag (1) + length fb xx xx (3, for lengths 251..=65535) + bytes
    let last = payload_len - fixed - 1 - 3;
    assert!((251..=65_535).contains(&last));
    let mut items: Vec<Item> = (0..15)
        .map(|i| Item::Cache {
            cache: Arc::from(format!("{i:x}").repeat(SPEC_MAX_STRING)),
        })
        .collect();
    items.push(Item::Cache {
        cache: Arc::from("z".repeat(last)),
    });
    Message::Batch(Batch {
        first_seq: 1,
        items,
    })
}

/// bincode's decode limit counts in-memory sizes (8 per u64 or length, 4
/// per enum tag), not wire bytes; the codec's limit must still admit every
/// frame of at most 1 MiB.
#[test]
fn a_payload_of_exactly_max_frame_round_trips() {
    let msg = batch_of_payload_len(SPEC_MAX_FRAME);
    let bytes = encode(&msg).expect("a payload of exactly 1 MiB is allowed");
    assert_eq!(bytes.len(), 4 + SPEC_MAX_FRAME);
    assert_eq!(&bytes[..4], &(SPEC_MAX_FRAME as u32).to_be_bytes());
    let (result, left) = decode(&bytes);
    assert_eq!(result.expect("decodes"), Some(msg));
    assert_eq!(left, 0);
}

/// A batch of many small items: 4,096 round-trip; one more is refused by
/// the encoder and, before any item is decoded, by the decoder (section 6).
#[test]
fn a_batch_of_the_item_limit_round_trips_and_one_more_is_refused() {
    let msg = Message::Batch(Batch {
        first_seq: 1,
        items: vec![Item::Flush; 4096],
    });
    let bytes = encode(&msg).expect("4,096 items are allowed");
    let (result, left) = decode(&bytes);
    assert_eq!(result.expect("decodes"), Some(msg));
    assert_eq!(left, 0);
    let over = Message::Batch(Batch {
        first_seq: 1,
        items: vec![Item::Flush; 4097],
    });
    assert!(encode(&over).is_err(), "the encoder refuses 4,097 items");
    // The same bytes by hand: tag 02, first_seq 01, count fb + u16 LE.
    let mut payload = vec![2u8, 1, 0xfb];
    payload.extend_from_slice(&4097u16.to_le_bytes());
    payload.extend(std::iter::repeat_n(2u8, 4097));
    let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&payload);
    assert!(matches!(
        decode(&framed).0,
        Err(CodecError::TooManyItems(4097))
    ));
}

#[test]
fn a_payload_of_max_frame_plus_one_is_not_encoded() {
    let msg = batch_of_payload_len(SPEC_MAX_FRAME + 1);
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(FrameCodec::new().encode(&msg, &mut buf).is_err());
    assert_eq!(
        &buf[..],
        b"keep",
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn bool_byte_two_is_an_error() {
    let mut bytes = read_vector("hello_no_position.hex");
    let last = bytes.len() - 1;
    assert_eq!(bytes[last], 0x01, "auth is the last byte");
    bytes[last] = 0x02;
    assert!(matches!(decode_err(&bytes), CodecError::Malformed(_)));
}

#[test]
fn option_byte_two_is_an_error() {
    let mut bytes = read_vector("hello_no_position.hex");
    let at = bytes.len() - 2;
    assert_eq!(bytes[at], 0x00, "last_applied is the byte before auth");
    bytes[at] = 0x02;
    assert!(matches!(decode_err(&bytes), CodecError::Malformed(_)));
}

#[test]
fn unknown_message_tag_is_an_error() {
    for tag in [8u8, 99, 250] {
        assert!(
            matches!(decode_err(&frame(&[tag])), CodecError::Malformed(_)),
            "tag {tag}"
        );
    }
    // Tag 99 written in the long form is still unknown.
    assert!(matches!(
        decode_err(&frame(&[0xfb, 99, 0])),
        CodecError::Malformed(_)
    ));
}

#[test]
fn unknown_item_tag_is_an_error() {
    // Batch, first_seq 1, one item with tag 99.
    assert!(matches!(
        decode_err(&frame(&[2, 1, 1, 99])),
        CodecError::Malformed(_)
    ));
}

#[test]
fn invalid_utf8_is_an_error() {
    // Reject reason: a lone continuation byte, a truncated sequence, an
    // overlong NUL (Java's "modified UTF-8"), a UTF-16 surrogate, and a code
    // point above U+10FFFF.
    for bad in [
        &[0x80][..],
        &[0xc3],
        &[0xc0, 0x80],
        &[0xed, 0xa0, 0x80],
        &[0xf4, 0x90, 0x80, 0x80],
        &[0xff, 0xfe],
    ] {
        let mut payload = vec![7, bad.len() as u8];
        payload.extend_from_slice(bad);
        assert!(
            matches!(decode_err(&frame(&payload)), CodecError::Malformed(_)),
            "{bad:02x?}"
        );
    }
    // A key in a Batch: "c" then "\xc3(".
    let payload = [2, 1, 1, 0, 1, b'c', 2, 0xc3, b'('];
    assert!(matches!(
        decode_err(&frame(&payload)),
        CodecError::Malformed(_)
    ));
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut payload = read_vector("goodbye.hex")[4..].to_vec();
    payload.push(0);
    assert!(matches!(
        decode_err(&frame(&payload)),
        CodecError::TrailingBytes(1)
    ));
}

#[test]
fn truncated_payload_is_an_error() {
    // The frame is complete, the message inside it is not.
    let payload = &read_vector("batch.hex")[4..];
    for len in 0..payload.len() {
        assert!(
            decode(&frame(&payload[..len])).0.is_err(),
            "payload cut at {len}"
        );
    }
}

#[test]
fn empty_cache_name_is_an_error_both_ways() {
    // Batch, first_seq 1, one Cache item with an empty name.
    assert!(matches!(
        decode_err(&frame(&[2, 1, 1, 1, 0])),
        CodecError::InvalidItem(_)
    ));
    let msg = Message::Batch(Batch {
        first_seq: 1,
        items: vec![Item::Key {
            cache: s(""),
            key: s("k"),
        }],
    });
    assert!(encode(&msg).is_err());
}

#[test]
fn string_limits_hold_both_ways() {
    let at_limit = "é".repeat(SPEC_MAX_STRING / 2); // 65,536 bytes
    let over = "x".repeat(SPEC_MAX_STRING + 1);
    for items in [
        vec![Item::Key {
            cache: s(&at_limit),
            key: s(&at_limit),
        }],
        vec![Item::Cache {
            cache: s(&at_limit),
        }],
    ] {
        let msg = Message::Batch(Batch {
            first_seq: 1,
            items,
        });
        assert_eq!(
            decode(&encode(&msg).expect("at the limit")).0.expect("ok"),
            Some(msg)
        );
    }
    for items in [
        vec![Item::Key {
            cache: s("c"),
            key: s(&over),
        }],
        vec![Item::Key {
            cache: s(&over),
            key: s("k"),
        }],
        vec![Item::Cache { cache: s(&over) }],
    ] {
        let msg = Message::Batch(Batch {
            first_seq: 1,
            items,
        });
        assert!(encode(&msg).is_err());
    }

    // Decoding: a Cache item of 65,537 bytes, written by hand.
    let mut payload = vec![2, 1, 1, 1, 0xfc];
    payload.extend_from_slice(&(SPEC_MAX_STRING as u32 + 1).to_le_bytes());
    payload.extend_from_slice(over.as_bytes());
    assert!(matches!(
        decode_err(&frame(&payload)),
        CodecError::InvalidItem(_)
    ));

    // Reject reason.
    let ok = Message::Reject {
        reason: "x".repeat(SPEC_MAX_STRING),
    };
    assert_eq!(
        decode(&encode(&ok).expect("at the limit")).0.expect("ok"),
        Some(ok)
    );
    assert!(
        encode(&Message::Reject {
            reason: over.clone()
        })
        .is_err()
    );
    let mut payload = vec![7, 0xfc];
    payload.extend_from_slice(&(SPEC_MAX_STRING as u32 + 1).to_le_bytes());
    payload.extend_from_slice(over.as_bytes());
    assert!(decode(&frame(&payload)).0.is_err());
}

fn hello_with_node(node: String) -> Message {
    Message::Hello(Hello {
        magic: MAGIC,
        version: 1,
        node,
        incarnation: 1,
        nonce: [0; 32],
        last_applied: None,
        auth: false,
    })
}

#[test]
fn node_identity_limit_holds_both_ways() {
    let ok = hello_with_node("a".repeat(SPEC_MAX_NODE));
    assert_eq!(
        decode(&encode(&ok).expect("at the limit")).0.expect("ok"),
        Some(ok)
    );
    assert!(encode(&hello_with_node("a".repeat(SPEC_MAX_NODE + 1))).is_err());

    // Decoding a Hello whose node has 513 bytes (length fb 01 02).
    let mut payload = vec![0];
    payload.extend_from_slice(b"CCST");
    payload.push(1);
    payload.extend_from_slice(&[0xfb, 0x01, 0x02]);
    payload.extend_from_slice("a".repeat(SPEC_MAX_NODE + 1).as_bytes());
    payload.push(1); // incarnation
    payload.extend_from_slice(&[0; 32]);
    payload.extend_from_slice(&[0, 0]); // last_applied None, auth false
    assert!(matches!(
        decode_err(&frame(&payload)),
        CodecError::NodeIdTooLong(513)
    ));
}

#[test]
fn huge_length_fields_inside_a_frame_are_errors_not_allocations() {
    // Reject whose reason claims 2^63 bytes.
    let mut payload = vec![7, 0xfd];
    payload.extend_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(decode(&frame(&payload)).0.is_err());
    // Reject whose reason claims 1 MiB but the frame ends.
    let mut payload = vec![7, 0xfc];
    payload.extend_from_slice(&(SPEC_MAX_FRAME as u32).to_le_bytes());
    assert!(decode(&frame(&payload)).0.is_err());
    // Batch claiming u64::MAX items.
    let mut payload = vec![2, 1, 0xfd];
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    payload.push(2);
    assert!(decode(&frame(&payload)).0.is_err());
}

#[test]
fn varint_markers_follow_the_spec() {
    // Decoders accept a longer form than the shortest (PROTOCOL.md:
    // "Varint decoding"): last_seq 5 written as fb 05 00, fc .., fd ...
    for payload in [
        &[6, 0xfb, 5, 0][..],
        &[6, 0xfc, 5, 0, 0, 0],
        &[6, 0xfd, 5, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(
            decode(&frame(payload)).0.expect("long form accepted"),
            Some(Message::Goodbye { last_seq: 5 })
        );
    }
    // Message and item indexes are u32 varints: the same holds for them,
    // a Batch (the hand-written fast path) included.
    assert_eq!(
        decode(&frame(&[0xfb, 4, 0])).0.expect("long index"),
        Some(Message::Ping)
    );
    assert_eq!(
        decode(&frame(&[0xfc, 2, 0, 0, 0, 7, 1, 0xfb, 2, 0]))
            .0
            .expect("long indexes"),
        Some(Message::Batch(Batch {
            first_seq: 7,
            items: vec![Item::Flush],
        }))
    );
    // A u32 index does not take the u64 form.
    assert!(decode(&frame(&[0xfd, 4, 0, 0, 0, 0, 0, 0, 0])).0.is_err());
    // Markers 254 and 255 are never valid for the protocol's integers.
    for marker in [0xfe, 0xff] {
        let mut payload = vec![6, marker];
        payload.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_err(&frame(&payload)),
            CodecError::Malformed(_)
        ));
    }
    // A u16 (Hello.version) cannot use the u32 marker fc.
    let mut bytes = read_vector("hello_no_position.hex");
    assert_eq!(bytes[9], 0x01, "version byte");
    bytes.splice(9..10, [0xfc, 1, 0, 0, 0]);
    let len = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(decode_err(&bytes), CodecError::Malformed(_)));
    // The message tag (u32) cannot use the u64 marker fd.
    let mut payload = vec![0xfd];
    payload.extend_from_slice(&4u64.to_le_bytes());
    assert!(matches!(
        decode_err(&frame(&payload)),
        CodecError::Malformed(_)
    ));
}

#[test]
fn empty_frame_is_an_error() {
    assert!(matches!(
        decode_err(&[0, 0, 0, 0]),
        CodecError::Malformed(_)
    ));
}

#[test]
fn encoded_integers_use_the_shortest_form() {
    let cases: [(u64, &[u8]); 9] = [
        (0, &[0x00]),
        (250, &[0xfa]),
        (251, &[0xfb, 0xfb, 0x00]),
        (65_535, &[0xfb, 0xff, 0xff]),
        (65_536, &[0xfc, 0x00, 0x00, 0x01, 0x00]),
        (u32::MAX as u64, &[0xfc, 0xff, 0xff, 0xff, 0xff]),
        (u32::MAX as u64 + 1, &[0xfd, 0, 0, 0, 0, 1, 0, 0, 0]),
        (0x0102_0304_0506_0708, &[0xfd, 8, 7, 6, 5, 4, 3, 2, 1]),
        (
            u64::MAX,
            &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
    ];
    for (value, varint) in cases {
        let mut payload = vec![6];
        payload.extend_from_slice(varint);
        let bytes = encode(&Message::Goodbye { last_seq: value }).expect("encode");
        assert_eq!(&bytes[..], &frame(&payload)[..], "last_seq {value}");
    }
}

// ---------------------------------------------------------------- property tests

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        1 => 0u64..=300,
        1 => 65_000u64..=70_000,
        3 => prop::sample::select(vec![
            0u64,
            1,
            250,
            251,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64 - 1,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX - 1,
            u64::MAX,
        ]),
    ]
}

fn edge_u16() -> impl Strategy<Value = u16> {
    prop_oneof![
        any::<u16>(),
        prop::sample::select(vec![0u16, 1, 2, 250, 251, 255, 256, u16::MAX]),
    ]
}

/// Any Unicode scalar values (NUL and other controls included), up to
/// `max_chars` of them.
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max_chars).prop_map(String::from_iter)
}

/// A string of at most `max_bytes` bytes: usually short, sometimes exactly at
/// the limit (ASCII or 4-byte characters).
fn limited(max_bytes: usize, long: bool) -> BoxedStrategy<String> {
    // At most 40 characters, so at most 160 bytes: within every limit.
    let short = text(40).boxed();
    if !long {
        return short;
    }
    prop_oneof![
        20 => short,
        1 => Just("x".repeat(max_bytes)),
        1 => Just("🔑".repeat(max_bytes / 4)),
        1 => Just(format!("é{}", "a".repeat(max_bytes - 2))),
    ]
    .boxed()
}

fn cache_name(long: bool) -> impl Strategy<Value = Arc<str>> {
    limited(SPEC_MAX_STRING, long)
        .prop_map(|c| if c.is_empty() { "c".to_owned() } else { c })
        .prop_map(Arc::from)
}

fn item(long: bool) -> impl Strategy<Value = Item> {
    prop_oneof![
        3 => (cache_name(long), limited(SPEC_MAX_STRING, long))
            .prop_map(|(cache, key)| Item::Key { cache, key: Arc::from(key) }),
        2 => cache_name(long).prop_map(|cache| Item::Cache { cache }),
        1 => Just(Item::Flush),
    ]
}

fn position() -> impl Strategy<Value = Position> {
    (edge_u64(), edge_u64()).prop_map(|(incarnation, seq)| Position { incarnation, seq })
}

/// Any valid message. With `long`, strings sometimes reach their limits
/// (at most 6 items, so a batch stays under 1 MiB).
fn message(long: bool) -> impl Strategy<Value = Message> {
    let hello = (
        edge_u16(),
        limited(SPEC_MAX_NODE, long),
        edge_u64(),
        any::<[u8; 32]>(),
        prop::option::of(position()),
        any::<bool>(),
    )
        .prop_map(|(version, node, incarnation, nonce, last_applied, auth)| {
            Message::Hello(Hello {
                magic: MAGIC,
                version,
                node,
                incarnation,
                nonce,
                last_applied,
                auth,
            })
        });
    prop_oneof![
        hello,
        any::<[u8; 32]>().prop_map(|mac| Message::Auth { mac }),
        // Sequence numbers start at 1 and the last item's must fit in u64.
        (edge_u64(), prop::collection::vec(item(long), 0..=6)).prop_map(|(seq, items)| {
            let first_seq = seq.clamp(1, u64::MAX - items.len().max(1) as u64 + 1);
            Message::Batch(Batch { first_seq, items })
        }),
        position().prop_map(Message::Ack),
        Just(Message::Ping),
        Just(Message::Pong),
        edge_u64().prop_map(|last_seq| Message::Goodbye { last_seq }),
        limited(SPEC_MAX_STRING, long).prop_map(|reason| Message::Reject { reason }),
    ]
}

proptest! {
    #[test]
    fn any_message_round_trips(msg in message(true)) {
        let bytes = encode(&msg).expect("valid messages encode");
        prop_assert_eq!(
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize,
            bytes.len() - 4
        );
        let (result, left) = decode(&bytes);
        prop_assert_eq!(result.expect("decodes"), Some(msg));
        prop_assert_eq!(left, 0);
    }

    #[test]
    fn two_messages_in_one_buffer_decode_in_order(a in message(false), b in message(false)) {
        let mut buf = encode(&a).expect("encode");
        buf.extend_from_slice(&encode(&b).expect("encode"));
        let mut codec = FrameCodec::new();
        prop_assert_eq!(codec.decode(&mut buf).expect("ok"), Some(a));
        prop_assert_eq!(codec.decode(&mut buf).expect("ok"), Some(b));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        drain(&bytes);
    }

    #[test]
    fn random_payloads_in_a_valid_frame_never_panic(
        payload in prop::collection::vec(any::<u8>(), 0..300),
        tag in 0u8..10,
    ) {
        // Start with a plausible tag so the payload decoder gets exercised.
        let mut p = vec![tag];
        p.extend_from_slice(&payload);
        drain(&frame(&p));
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes(msg in message(false)) {
        let bytes = encode(&msg).expect("encode");
        for len in 0..bytes.len() {
            let (result, _) = decode(&bytes[..len]);
            prop_assert!(
                matches!(result, Ok(None)),
                "prefix of {} of {} bytes gave {:?}", len, bytes.len(), result
            );
        }
    }

    #[test]
    fn flipping_a_byte_never_panics(
        msg in message(false),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut bytes = encode(&msg).expect("encode").to_vec();
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        drain(&bytes);
        // Whatever decodes from the altered payload re-encodes, unless it
        // breaks a limit the encoder enforces too.
        if let (Ok(Some(m)), 0) = decode(&bytes) {
            prop_assert!(encode(&m).is_ok());
        }
    }
}

/// Decodes frames until the codec wants more bytes or fails; then the
/// end-of-stream path. Only a panic fails the test.
fn drain(bytes: &[u8]) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "a decoded frame consumes bytes"),
            Ok(None) | Err(_) => break,
        }
    }
    let mut buf = BytesMut::from(bytes);
    let _ = FrameCodec::new().decode_eof(&mut buf);
}
