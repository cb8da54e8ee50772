//! Bytes → commands: the RESP request grammar (arrays of bulk strings) and
//! Redis's inline form, read incrementally so that nothing is parsed twice
//! and nothing is kept of an argument too large to use.
//!
//! Limits follow Redis where they protect it (the inline line, the array
//! count, the bulk length); the size of an argument kept is ours: anything
//! beyond what the mesh carries is read and dropped, and the command is
//! answered with an error, so the connection stays usable.

use bytes::{Buf, Bytes, BytesMut};

/// Longest inline command line, and longest `*`/`$` header line (Redis's
/// `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one command (Redis's limit on the array count; what
/// is kept of them is bounded by [`MAX_KEPT_COMMAND`]).
pub const MAX_ARGS: i64 = i32::MAX as i64;
/// Before a client authenticates, Redis takes at most this many arguments
/// in a command and this many bytes in one, so that a stranger cannot make
/// it buffer much.
pub const UNAUTHENTICATED_ARGS: i64 = 10;
/// See [`UNAUTHENTICATED_ARGS`].
pub const UNAUTHENTICATED_BULK: i64 = 16 * 1024;
/// Largest bulk length accepted at all (Redis's `proto-max-bulk-len`):
/// above it the request is a protocol error.
pub const MAX_BULK_LEN: i64 = 512 * 1024 * 1024;
/// Largest argument kept: the mesh carries strings of at most 64 KiB, so a
/// longer one can only be refused; it is read and dropped instead of held.
pub const MAX_KEPT_ARG: usize = 64 * 1024;
/// Bytes one command may keep in memory (its arguments and their
/// bookkeeping); the rest of a larger one is read and dropped.
pub const MAX_KEPT_COMMAND: usize = 4 * 1024 * 1024;
/// What an argument costs beside its bytes, for [`MAX_KEPT_COMMAND`].
const ARG_COST: usize = 48;

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A command and its arguments (never empty).
    Command(Vec<Bytes>),
    /// A command too large to keep: `name` is its first argument when that
    /// one was kept.
    TooLarge {
        /// The command's name, if it was kept.
        name: Option<Bytes>,
        /// The size of the largest argument dropped, in bytes.
        largest: usize,
    },
}

/// A request that breaks the protocol: answered with `-ERR Protocol error:
/// <text>`, then the connection is closed, as Redis does.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

#[derive(Debug)]
enum State {
    /// Between requests.
    Idle,
    /// Inside an array: `left` bulk strings still to come.
    Array { left: i64 },
    /// Inside a bulk string: `remaining` bytes of it and its `\r\n` still to
    /// come; `left` bulk strings follow it.
    Bulk {
        remaining: usize,
        keep: bool,
        left: i64,
    },
}

/// An incremental request parser; one per connection.
#[derive(Debug)]
pub struct Parser {
    state: State,
    args: Vec<Bytes>,
    /// Bytes kept for the current command.
    kept: usize,
    /// Set once an argument of the current command was dropped: the
    /// largest such size.
    dropped: Option<usize>,
    /// Whether the client has authenticated (or needs not): before, the
    /// tighter limits apply.
    pub authenticated: bool,
    /// How far the buffer was searched for the current line's end, so that
    /// a line arriving a byte at a time is not searched again from its
    /// start at every byte.
    scanned: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::Idle,
            args: Vec::new(),
            kept: 0,
            dropped: None,
            authenticated: true,
            scanned: 0,
        }
    }
}

/// The end of the line at the start of `buf`: the index of its `\n`,
/// searched from `*scanned` on; `Ok(None)` (and `*scanned` moved) while
/// incomplete.
fn line_end(
    buf: &[u8],
    scanned: &mut usize,
    too_long: &str,
) -> Result<Option<usize>, ProtocolError> {
    let from = (*scanned).min(buf.len());
    match buf[from..].iter().position(|&b| b == b'\n') {
        Some(i) => {
            *scanned = 0;
            Ok(Some(from + i))
        }
        None if buf.len() > MAX_INLINE => Err(ProtocolError(too_long.to_string())),
        None => {
            *scanned = buf.len();
            Ok(None)
        }
    }
}

/// The header line at the start of `buf` (after its type byte), without
/// its line end, and the bytes it spans; `Ok(None)` when incomplete.
fn header(
    buf: &[u8],
    scanned: &mut usize,
    too_long: &str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some(end) = line_end(buf, scanned, too_long)? else {
        return Ok(None);
    };
    let line = &buf[1..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Digits with an optional minus, as Redis's string2ll reads them.
    let n = std::str::from_utf8(line)
        .ok()
        .filter(|t| !t.starts_with('+'))
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(i64::MIN);
    Ok(Some((n, end + 1)))
}

impl Parser {
    /// Whether the parser is in the middle of a request.
    pub fn mid_request(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// The next complete request from `buf` (consuming what it reads), or
    /// `None` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        loop {
            match self.state {
                State::Idle => {
                    let Some(&first) = buf.first() else {
                        return Ok(None);
                    };
                    if first != b'*' {
                        match inline(buf, &mut self.scanned)? {
                            Some(args) if args.is_empty() => continue,
                            Some(args) => return Ok(Some(Request::Command(args))),
                            None => return Ok(None),
                        }
                    }
                    let Some((n, used)) =
                        header(buf, &mut self.scanned, "too big mbulk count string")?
                    else {
                        return Ok(None);
                    };
                    if n == i64::MIN || n > MAX_ARGS {
                        return Err(ProtocolError("invalid multibulk length".into()));
                    }
                    if !self.authenticated && n > UNAUTHENTICATED_ARGS {
                        return Err(ProtocolError("unauthenticated multibulk length".into()));
                    }
                    buf.advance(used);
                    // `*0` and `*-1` are nothing at all, as in Redis.
                    if n > 0 {
                        self.args = Vec::with_capacity((n as usize).min(16));
                        self.kept = 0;
                        self.dropped = None;
                        self.state = State::Array { left: n };
                    }
                }
                State::Array { left: 0 } => {
                    self.state = State::Idle;
                    let args = std::mem::take(&mut self.args);
                    return Ok(Some(match self.dropped.take() {
                        None => Request::Command(args),
                        Some(largest) => Request::TooLarge {
                            name: args.into_iter().next(),
                            largest,
                        },
                    }));
                }
                State::Array { left } => {
                    let Some(&first) = buf.first() else {
                        return Ok(None);
                    };
                    if first != b'$' {
                        return Err(ProtocolError(format!(
                            "expected '$', got '{}'",
                            char::from(first)
                        )));
                    }
                    let Some((len, used)) =
                        header(buf, &mut self.scanned, "too big bulk count string")?
                    else {
                        return Ok(None);
                    };
                    if !(0..=MAX_BULK_LEN).contains(&len) {
                        return Err(ProtocolError("invalid bulk length".into()));
                    }
                    if !self.authenticated && len > UNAUTHENTICATED_BULK {
                        return Err(ProtocolError("unauthenticated bulk length".into()));
                    }
                    buf.advance(used);
                    let len = len as usize;
                    let keep = self.dropped.is_none()
                        && len <= MAX_KEPT_ARG
                        && self.kept + len + ARG_COST <= MAX_KEPT_COMMAND;
                    if !keep {
                        self.dropped = Some(self.dropped.unwrap_or(0).max(len));
                    }
                    self.state = State::Bulk {
                        remaining: len + 2,
                        keep,
                        left: left - 1,
                    };
                }
                State::Bulk {
                    remaining,
                    keep: true,
                    left,
                } => {
                    if buf.len() < remaining {
                        buf.reserve(remaining - buf.len());
                        return Ok(None);
                    }
                    // Redis skips the two bytes after a bulk string without
                    // looking at them; so do we.
                    let arg = buf.split_to(remaining - 2).freeze();
                    buf.advance(2);
                    self.kept += arg.len() + ARG_COST;
                    self.args.push(arg);
                    self.state = State::Array { left };
                }
                State::Bulk {
                    remaining,
                    keep: false,
                    left,
                } => {
                    // Dropped as it arrives: nothing of it is held.
                    let take = buf.len().min(remaining);
                    buf.advance(take);
                    if take < remaining {
                        self.state = State::Bulk {
                            remaining: remaining - take,
                            keep: false,
                            left,
                        };
                        return Ok(None);
                    }
                    self.state = State::Array { left };
                }
            }
        }
    }
}

/// An inline command (a line of words, as typed in telnet): its arguments,
/// possibly none for a blank line; `None` while the line is incomplete.
fn inline(buf: &mut BytesMut, scanned: &mut usize) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(end) = line_end(buf, scanned, "too big inline request")? else {
        return Ok(None);
    };
    let line = buf.split_to(end + 1);
    let line = &line[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    split_args(line)
        .map(Some)
        .ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits a line into words as Redis's `sdssplitargs` does: white space
/// separates, `"..."` takes `\n \r \t \b \a \\ \"` and `\xHH` escapes,
/// `'...'` takes `\'`; a closing quote must be followed by white space or
/// the end. `None` for unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    let white = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c);
    loop {
        while i < line.len() && white(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let mut word = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                let c = *line.get(i)?;
                if c == b'\\'
                    && line.get(i + 1) == Some(&b'x')
                    && let (Some(h), Some(l)) = (
                        line.get(i + 2).copied().and_then(hex),
                        line.get(i + 3).copied().and_then(hex),
                    )
                {
                    word.push(h * 16 + l);
                    i += 3;
                } else if c == b'\\' && i + 1 < line.len() {
                    i += 1;
                    word.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // The closing quote must end the word.
                    if line.get(i + 1).is_some_and(|&b| !white(b)) {
                        return None;
                    }
                    in_dq = false;
                    i += 1;
                    break;
                } else {
                    word.push(c);
                }
            } else if in_sq {
                let c = *line.get(i)?;
                if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
                    i += 1;
                    word.push(b'\'');
                } else if c == b'\'' {
                    if line.get(i + 1).is_some_and(|&b| !white(b)) {
                        return None;
                    }
                    in_sq = false;
                    i += 1;
                    break;
                } else {
                    word.push(c);
                }
            } else {
                match line.get(i) {
                    None => break,
                    Some(&b) if white(b) => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(&b) => word.push(b),
                }
            }
            i += 1;
        }
        let _ = (in_dq, in_sq);
        args.push(Bytes::from(word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> (Vec<Request>, Option<ProtocolError>, usize) {
        let mut p = Parser::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match p.next(&mut buf) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return (out, None, buf.len()),
                Err(e) => return (out, Some(e), buf.len()),
            }
        }
    }

    fn cmd(args: &[&str]) -> Request {
        Request::Command(args.iter().map(|a| Bytes::from(a.to_string())).collect())
    }

    #[test]
    fn arrays_inline_and_pipelines() {
        let (r, e, _) =
            all(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$1\r\nx\r\nPING\r\nping a\n\r\n");
        assert_eq!(e, None);
        assert_eq!(
            r,
            [
                cmd(&["PING"]),
                cmd(&["ECHO", "x"]),
                cmd(&["PING"]),
                cmd(&["ping", "a"])
            ]
        );
        let (r, _, _) = all(b"*0\r\n*-1\r\n*1\r\n$0\r\n\r\n");
        assert_eq!(r, [cmd(&[""])]);
    }

    #[test]
    fn byte_at_a_time_is_the_same() {
        let input = b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$5\r\nhello\r\necho \"a b\"\r\n";
        let mut p = Parser::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(r) = p.next(&mut buf).expect("valid") {
                out.push(r);
            }
        }
        assert_eq!(
            out,
            [cmd(&["PUBLISH", "ch", "hello"]), cmd(&["echo", "a b"])]
        );
    }

    #[test]
    fn protocol_errors_are_redis_texts() {
        let err = |input: &[u8]| all(input).1.map(|e| e.0);
        assert_eq!(
            err(b"*abc\r\n").as_deref(),
            Some("invalid multibulk length")
        );
        assert_eq!(
            err(b"*3000000000\r\n").as_deref(),
            Some("invalid multibulk length")
        );
        assert_eq!(
            err(b"*1\r\nx\r\n").as_deref(),
            Some("expected '$', got 'x'")
        );
        assert_eq!(
            err(b"*1\r\n$abc\r\n").as_deref(),
            Some("invalid bulk length")
        );
        assert_eq!(
            err(b"*1\r\n$-5\r\n").as_deref(),
            Some("invalid bulk length")
        );
        assert_eq!(
            err(b"*1\r\n$600000000\r\n").as_deref(),
            Some("invalid bulk length")
        );
        assert_eq!(
            err(b"echo \"abc\r\n").as_deref(),
            Some("unbalanced quotes in request")
        );
        assert_eq!(
            err(b"echo \"a\"b\r\n").as_deref(),
            Some("unbalanced quotes in request")
        );
        let long = vec![b'a'; MAX_INLINE + 1];
        assert_eq!(err(&long).as_deref(), Some("too big inline request"));
        let mut long = b"*".to_vec();
        long.extend(vec![b'1'; MAX_INLINE + 1]);
        assert_eq!(err(&long).as_deref(), Some("too big mbulk count string"));
    }

    #[test]
    fn strangers_get_tighter_limits() {
        let mut p = Parser {
            authenticated: false,
            ..Parser::default()
        };
        let mut buf = BytesMut::from(&b"*11\r\n"[..]);
        assert_eq!(
            p.next(&mut buf),
            Err(ProtocolError("unauthenticated multibulk length".into()))
        );
        let mut p = Parser {
            authenticated: false,
            ..Parser::default()
        };
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$16385\r\n"[..]);
        assert_eq!(
            p.next(&mut buf),
            Err(ProtocolError("unauthenticated bulk length".into()))
        );
    }

    #[test]
    fn half_frames_wait_for_more() {
        for input in [
            &b"*2\r\n$4\r\nECHO\r\n$5\r\nhel"[..],
            b"*2\r",
            b"PING",
            b"*1\r\n$4",
        ] {
            let (r, e, _) = all(input);
            assert!(r.is_empty() && e.is_none(), "{input:?}");
        }
    }

    #[test]
    fn oversized_arguments_are_dropped_not_held() {
        let big = MAX_KEPT_ARG + 10;
        let mut input = format!("*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n${big}\r\n").into_bytes();
        let mut p = Parser::default();
        let mut buf = BytesMut::from(&input[..]);
        assert_eq!(p.next(&mut buf), Ok(None));
        // Fed in pieces: nothing of the argument stays buffered.
        input = vec![b'x'; big];
        for chunk in input.chunks(1000) {
            buf.extend_from_slice(chunk);
            assert_eq!(p.next(&mut buf), Ok(None));
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(b"\r\nPING\r\n");
        assert_eq!(
            p.next(&mut buf),
            Ok(Some(Request::TooLarge {
                name: Some(Bytes::from_static(b"PUBLISH")),
                largest: big
            }))
        );
        assert_eq!(p.next(&mut buf), Ok(Some(cmd(&["PING"]))));
    }

    #[test]
    fn quoting_follows_redis() {
        let s = |l: &str| {
            split_args(l.as_bytes()).map(|v| {
                v.iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(s("  a  b "), Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            s(r#"echo "\x41\n""#),
            Some(vec!["echo".into(), "A\n".into()])
        );
        assert_eq!(s(r"echo 'it\'s'"), Some(vec!["echo".into(), "it's".into()]));
        assert_eq!(s(r#"echo """#), Some(vec!["echo".into(), "".into()]));
        assert_eq!(s("'abc"), None);
        assert_eq!(s(""), Some(vec![]));
    }
}
