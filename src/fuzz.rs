//! Entry points for the fuzz targets in `fuzz/` and their regression tests
//! (feature `fuzz`; no application needs them).

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::FrameCodec;

/// Decodes `input` as a stream of frames; every frame that decodes must
/// encode back to the same bytes. Panics only on a real bug.
pub fn frames(input: &[u8]) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone();
        match codec.decode(&mut buf) {
            Ok(Some(msg)) => {
                let used = before.len() - buf.len();
                let mut again = BytesMut::new();
                // A decoded message passed every check, so it encodes.
                if codec.encode(&msg, &mut again).is_err() {
                    panic!("decoded {msg:?} but cannot encode it");
                }
                // bincode accepts non-minimal varints, so only a re-decode
                // of the canonical bytes must give the same message.
                let back = FrameCodec::new().decode(&mut again.clone());
                assert!(
                    matches!(&back, Ok(Some(m)) if *m == msg),
                    "re-decoding {msg:?} gave {back:?} ({used} bytes in)"
                );
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// The acceptor's handshake and session over `input`; see
/// [`crate::mesh::fuzz_acceptor`].
pub fn acceptor(input: &[u8]) {
    crate::mesh::fuzz_acceptor(input);
}

/// Parses `input` as Redis-protocol requests twice, whole and one byte at
/// a time: both must give the same requests and the same error, and a
/// glob pattern made of the input must match without blowing up.
#[cfg(feature = "sidecar")]
pub fn resp_requests(input: &[u8]) {
    use crate::sidecar::resp::{glob, parse::Parser};
    let run = |chunk: usize, authenticated: bool| {
        let mut parser = Parser::default();
        parser.authenticated = authenticated;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match parser.next(&mut buf) {
                    Ok(Some(r)) => out.push(Ok(r)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    };
    for authenticated in [true, false] {
        let whole = run(input.len(), authenticated);
        let bytewise = run(1, authenticated);
        assert_eq!(whole, bytewise, "split input parsed differently");
    }
    let (pattern, subject) = input.split_at(input.len() / 2);
    let _ = glob::matches(pattern, subject);
}
