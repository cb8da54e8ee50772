//! `dhis.conf` → [`ClusterConfig`].
//!
//! The file is a Java properties file holding the whole application's
//! settings; this module reads only the cluster keys (both legacy DHIS 2
//! formats) and our own `cachecast.*` extensions, and reports every problem
//! at once, each naming its key and line. No I/O happens here but reading the
//! file; name resolution is a separate, explicit step ([`resolve`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Port of a cluster node when the file names none.
pub const DEFAULT_PORT: u16 = 4001;
/// Port of the sidecar's local HTTP API when the file names none.
pub const DEFAULT_API_PORT: u16 = 4002;
/// Replay buffer per peer, in invalidations, when the file names none.
pub const DEFAULT_BUFFER: usize = 65_536;
/// Largest accepted `cachecast.buffer`.
pub const MAX_BUFFER: usize = 16 * 1024 * 1024;
/// At most this many instances (this node included), as in DHIS 2.
pub const MAX_INSTANCES: usize = 5;
/// Where the file is looked for when neither `--config` nor `DHIS2_HOME` say.
pub const DEFAULT_PATH: &str = "/opt/dhis2/dhis.conf";

/// A node's identity and address: `host:port`, as its peers reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl NodeAddr {
    /// A node address from its parts.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        NodeAddr {
            host: host.into(),
            port,
        }
    }

    /// Whether both name the same node by their text alone (no lookup):
    /// equal ports, and host names equal ignoring ASCII case or equal IP
    /// addresses however written (`::1` and `0:0::1`).
    pub fn same_name(&self, other: &NodeAddr) -> bool {
        self.port == other.port
            && (self.host.eq_ignore_ascii_case(&other.host)
                || matches!(
                    (self.host.parse::<IpAddr>(), other.host.parse::<IpAddr>()),
                    (Ok(a), Ok(b)) if a.to_canonical() == b.to_canonical()
                ))
    }

    /// Resolves the host (an IP literal needs no lookup). Blocking.
    pub fn resolve(&self) -> std::io::Result<Vec<IpAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let mut ips: Vec<IpAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .map(|a| a.ip())
            .collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a `host:port` text is not a node address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

impl FromStr for NodeAddr {
    type Err = AddrError;

    /// Parses `host`, `host:port`, `[v6]:port` or a bare IPv6 address; the
    /// port defaults to [`DEFAULT_PORT`].
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let s = s.trim();
        if s.parse::<IpAddr>().is_ok() {
            check_host(s).map_err(AddrError)?;
            return Ok(NodeAddr::new(s, DEFAULT_PORT));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| AddrError(format!("`{s}`: missing `]` after an IPv6 address")))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(AddrError(format!("`{s}`: expected `:port` after `]`"))),
                },
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        check_host(host).map_err(AddrError)?;
        let port = match port {
            Some(p) => parse_port(p).map_err(AddrError)?,
            None => DEFAULT_PORT,
        };
        Ok(NodeAddr::new(host, port))
    }
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's identity and address.
    pub addr: NodeAddr,
    /// Where it was configured, e.g. `cluster.instance2` or
    /// `cluster.members[1]`, for messages.
    pub source: String,
    /// The line of its host name, when read from a file.
    pub line: Option<usize>,
}

/// Which legacy DHIS 2 format the cluster was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `cluster.instanceN.hostname` / `cluster.instanceN.cache.port`.
    Instances,
    /// `cluster.hostname` / `cluster.members` / `cluster.cache.port`
    /// (DHIS 2 2.29–2.40).
    Members,
    /// Built in code, not read from a file.
    Programmatic,
}

/// Where the shared secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `cachecast.secret`: the secret itself.
    Inline(String),
    /// `cachecast.secret.file`: a file holding it.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    // Never print the secret itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// PEM files for mutual TLS between peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// The CA that signs every peer's certificate.
    pub ca: PathBuf,
}

/// The resolved cluster: this node, its peers, and our extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's identity (`cluster.instance0` or `cluster.hostname`).
    pub node: NodeAddr,
    /// The other nodes, at most four.
    pub peers: Vec<Peer>,
    /// Which format the file used.
    pub format: Format,
    /// Where to listen for peers (`cachecast.bind`).
    pub bind: SocketAddr,
    /// Shared secret for peer authentication.
    pub secret: Option<SecretSource>,
    /// Mutual TLS between peers.
    pub tls: Option<TlsFiles>,
    /// The sidecar's local HTTP API address.
    pub api: SocketAddr,
    /// Whether `cachecast.api.bind` was set (only then may it be
    /// non-loopback).
    pub api_bind_explicit: bool,
    /// Replay buffer per peer, in invalidations.
    pub buffer: usize,
    /// `cachecast.webhook.url`, if set.
    pub webhook_url: Option<String>,
    /// `cachecast.state.file`: where the node records how its run ended,
    /// so that a start after a crash flushes its peers.
    pub state_file: Option<PathBuf>,
    /// The Redis-protocol pub/sub endpoint, when it is on.
    pub resp: Option<RespConfig>,
    /// Why the endpoint is on or off, in a sentence `check` prints.
    pub resp_why: String,
    /// The flush hook (`cachecast.flush.url`), if set.
    pub flush_hook: Option<FlushHookConfig>,
}

/// Where the Redis-protocol endpoint's settings came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespSource {
    /// `cachecast.resp.port`.
    Explicit,
    /// DHIS 2's `redis.*` keys point at this machine.
    RedisKeys,
}

/// The Redis-protocol (RESP) pub/sub endpoint of the sidecar.
#[derive(Clone, PartialEq, Eq)]
pub struct RespConfig {
    /// Where to listen: one address, or two for `localhost` (IPv4 and
    /// IPv6, since a client may resolve the name to either).
    pub addrs: Vec<SocketAddr>,
    /// The password clients must give (`redis.password`), if any.
    pub password: Option<String>,
    /// Whether `cachecast.resp.bind` chose the address (only then may it
    /// be non-loopback).
    pub bind_explicit: bool,
    /// Which keys turned it on.
    pub source: RespSource,
}

impl fmt::Debug for RespConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RespConfig")
            .field("addrs", &self.addrs)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("bind_explicit", &self.bind_explicit)
            .field("source", &self.source)
            .finish()
    }
}

/// The flush hook: an HTTP(S) endpoint of the application that clears
/// every cache, called when the application may hold an entry that no
/// message will name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushHookConfig {
    /// `cachecast.flush.url`.
    pub url: String,
    /// `cachecast.flush.credentials.file`: `user:password` for Basic
    /// authentication.
    pub credentials: Option<PathBuf>,
}

impl ClusterConfig {
    /// A cluster built in code (tests, the demo, embedding without a file):
    /// listens on all addresses at `node`'s port, default extensions.
    pub fn new(node: NodeAddr, peers: impl IntoIterator<Item = NodeAddr>) -> Self {
        let peers = peers
            .into_iter()
            .enumerate()
            .map(|(i, addr)| Peer {
                addr,
                source: format!("peer {}", i + 1),
                line: None,
            })
            .collect();
        ClusterConfig {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), node.port),
            node,
            peers,
            format: Format::Programmatic,
            secret: None,
            tls: None,
            api: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_API_PORT),
            api_bind_explicit: false,
            buffer: DEFAULT_BUFFER,
            webhook_url: None,
            state_file: None,
            resp: None,
            resp_why: "off (built in code)".into(),
            flush_hook: None,
        }
    }
}

/// How serious a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing, nothing wrong (e.g. a key we ignore on purpose).
    Note,
    /// Probably a mistake, but the configuration works.
    Warning,
    /// The configuration cannot be used.
    Error,
}

/// One finding about the file, naming the key and line where it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// How serious it is.
    pub severity: Severity,
    /// The key concerned, if one.
    pub key: Option<String>,
    /// The 1-based line, if known.
    pub line: Option<usize>,
    /// What is wrong, and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{sev}: ")?;
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A configuration read successfully, with what is worth a look.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The cluster.
    pub config: ClusterConfig,
    /// Warnings and notes (never errors).
    pub warnings: Vec<Problem>,
}

/// Why no configuration could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {}", path.display(), describe_io(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The path names a directory or another non-file.
    #[error("{} is not a regular file (expected a dhis.conf file)", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file was read, and has errors (every one is listed).
    #[error("{} error(s) in the configuration:\n{}", errors.len(), list(errors))]
    Invalid {
        /// Every error found.
        errors: Vec<Problem>,
        /// Warnings found alongside.
        warnings: Vec<Problem>,
    },
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            "no such file (give --config PATH or set DHIS2_HOME)".into()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the file must be readable by the user cachecast runs as)".into()
        }
        _ => e.to_string(),
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where the configuration file is: `explicit` (from `--config`), else
/// `$DHIS2_HOME/dhis.conf`, else [`DEFAULT_PATH`].
pub fn locate(explicit: Option<&Path>, dhis2_home: Option<&std::ffi::OsStr>) -> PathBuf {
    match (explicit, dhis2_home) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(home)) if !home.is_empty() => Path::new(home).join("dhis.conf"),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bytes(&bytes)
}

/// Parses a configuration from text.
pub fn parse_str(text: &str) -> Result<Loaded, ConfigError> {
    parse_bytes(text.as_bytes())
}

/// Our prefixes: keys under them are read, everything else is ignored.
const CLUSTER: &str = "cluster.";
const OURS: &str = "cachecast.";

/// The keys of the `cluster.hostname` / `cluster.members` format.
const MEMBERS_KEYS: [&str; 3] = ["cluster.hostname", "cluster.members", "cluster.cache.port"];

/// Keys of ours outside `cluster.instanceN.`; with instance keys
/// normalised to `cluster.instanceN.*`, the list typos are matched against.
const KNOWN_KEYS: &[&str] = &[
    "cluster.instanceN.hostname",
    "cluster.instanceN.cache.port",
    "cluster.instanceN.cache.remote.object.port",
    "cluster.hostname",
    "cluster.members",
    "cluster.cache.port",
    "cluster.cache.remote.object.port",
    "cachecast.secret",
    "cachecast.secret.file",
    "cachecast.bind",
    "cachecast.tls.cert",
    "cachecast.tls.key",
    "cachecast.tls.ca",
    "cachecast.api.port",
    "cachecast.api.bind",
    "cachecast.buffer",
    "cachecast.webhook.url",
    "cachecast.webhook.remote",
    "cachecast.state.file",
    "cachecast.resp.port",
    "cachecast.resp.bind",
    "cachecast.flush.url",
    "cachecast.flush.credentials.file",
];

/// DHIS 2's own keys that decide whether its caches are invalidated
/// through Redis pub/sub, and where (the Redis-protocol endpoint serves
/// there when they point at this machine). Every other `redis.` key is the
/// application's alone and is not read.
const REDIS_KEYS: &[&str] = &[
    "redis.cache.invalidation.enabled",
    "redis.enabled",
    "redis.host",
    "redis.port",
    "redis.password",
    "redis.use.ssl",
];

const NOT_SET_INSTANCE0: &str = "not set: clustering is off (set it to this node's host name or IP address, as its peers reach it)";

/// A value read from the file, with its line.
#[derive(Debug, Clone)]
struct Entry {
    /// The value, unescaped and trimmed.
    value: String,
    /// The first physical line of the entry.
    line: usize,
    /// The line could not be read (bad UTF-8, a malformed escape); an
    /// error was reported, and the value must not be used.
    broken: bool,
}

impl Entry {
    /// Whether the key counts as set: a non-empty value, or one that was
    /// there but could not be read.
    fn present(&self) -> bool {
        self.broken || !self.value.is_empty()
    }
}

/// Longest message a problem keeps: messages quote values, and a value
/// can be a megabyte long.
const MAX_MESSAGE: usize = 400;

/// Cuts a message to [`MAX_MESSAGE`] bytes (on a character boundary),
/// saying how much was left out.
fn shorten(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut cut = MAX_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let left = message.len() - cut;
    message.truncate(cut);
    message.push_str(&format!("… ({left} more bytes)"));
    message
}

/// Collects problems while the file is read.
#[derive(Default)]
struct Report {
    problems: Vec<Problem>,
}

impl Report {
    fn push(&mut self, severity: Severity, key: &str, line: Option<usize>, message: String) {
        self.problems.push(Problem {
            severity,
            key: (!key.is_empty()).then(|| key.to_string()),
            line,
            message: shorten(message),
        });
    }
    fn error(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Error, key, line, message.into());
    }
    fn warn(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, key, line, message.into());
    }
    fn note(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Note, key, line, message.into());
    }
}

/// Parses a configuration from the file's bytes.
pub fn parse_bytes(bytes: &[u8]) -> Result<Loaded, ConfigError> {
    let mut report = Report::default();
    let keys = read_keys(bytes, &mut report);
    let config = build(&keys, &mut report);
    // In file order; problems without a line (a key not set) last.
    report
        .problems
        .sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    let (mut errors, warnings): (Vec<Problem>, Vec<Problem>) = report
        .problems
        .into_iter()
        .partition(|p| p.severity == Severity::Error);
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded { config, warnings }),
        _ => {
            // Every path that yields no configuration reports why; should
            // one ever fail to, say so rather than fail with no reason.
            if errors.is_empty() {
                errors.push(Problem {
                    severity: Severity::Error,
                    key: None,
                    line: None,
                    message: "no usable cluster configuration (internal: no reason recorded)"
                        .into(),
                });
            }
            Err(ConfigError::Invalid { errors, warnings })
        }
    }
}

/// The file's physical lines. As in Java, `\n`, `\r\n` and a lone `\r`
/// each end a line. (`str::split_inclusive` and `contains` search with
/// `memchr`, which keeps a 10 MB file quick even in a debug build.)
fn physical_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    for piece in text.split_inclusive('\n') {
        let body = match piece.strip_suffix('\n') {
            Some(body) => body.strip_suffix('\r').unwrap_or(body),
            None => piece,
        };
        if body.contains('\r') {
            lines.extend(body.split('\r'));
        } else {
            lines.push(body);
        }
    }
    lines
}

/// Java's white space in a properties file: space, tab, form feed.
const WHITE: [char; 3] = [' ', '\t', '\x0c'];

/// Whether a physical line continues on the next (an odd number of
/// trailing backslashes).
fn continues(line: &str) -> bool {
    (line.len() - line.trim_end_matches('\\').len()) % 2 == 1
}

/// The key of a logical line as written (escapes not yet undone): up to
/// the first unescaped `=`, `:` or white space.
fn raw_key(line: &str) -> &str {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '=' | ':' | ' ' | '\t' | '\x0c' => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Whether `key` starts with `prefix`, ignoring ASCII case.
fn starts_with_ci(key: &str, prefix: &str) -> bool {
    key.len() >= prefix.len()
        && key.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Whether a key is ours to read: under `cluster.` or `cachecast.`. The
/// case is ignored here so that `Cluster.instance0.hostname` is reported
/// (keys are case-sensitive) rather than silently skipped.
fn is_ours(key: &str) -> bool {
    starts_with_ci(key, CLUSTER) || starts_with_ci(key, OURS) || REDIS_KEYS.contains(&key)
}

/// Whether a key written with escapes may turn out to be ours: the text
/// before its first `\` is literal, so `redis.pass\u` cannot be, while
/// `\u0063luster.x` or `cluster.instance0.host\u006eame` can. (DHIS 2's
/// `redis.*` keys are read only as written plainly: they are the
/// application's, and a malformed escape in one is none of ours.)
fn could_be_ours(raw: &str) -> bool {
    let literal = raw.split('\\').next().unwrap_or_default();
    [CLUSTER, OURS]
        .iter()
        .any(|p| starts_with_ci(literal, p) || starts_with_ci(p, literal))
}

/// One logical line, parsed by `java-properties`: its key and value with
/// escapes undone.
fn parse_entry(text: &str) -> Result<(String, String), String> {
    let mut lines =
        java_properties::PropertiesIter::new_with_encoding(text.as_bytes(), encoding_rs::UTF_8);
    match lines.next() {
        Some(Ok(line)) => match line.consume_content() {
            java_properties::LineContent::KVPair(key, value) => Ok((key, value)),
            java_properties::LineContent::Comment(_) => Err("not a `key = value` line".into()),
        },
        Some(Err(e)) => {
            // The crate's message ends with its own line number, which
            // counts from this one line: drop it, ours is in the problem.
            let text = e.to_string();
            Err(match text.find(" (line_number") {
                Some(i) => text[..i].to_string(),
                None => text,
            })
        }
        None => Err("not a `key = value` line".into()),
    }
}

/// Our keys with their values and lines; the last of a repeated key wins,
/// with a warning.
///
/// The file is split into logical lines here (comments, `\` continuations,
/// any line ending); only a line whose key is ours goes through the
/// `java-properties` parser. So nothing in the rest of the file (a comment
/// holding `C:\users`, a password with a stray `\u`) can stop the cluster
/// keys from being read, and a 10 MB file costs little.
fn read_keys(bytes: &[u8], report: &mut Report) -> BTreeMap<String, Entry> {
    let (text, lossy) = match std::str::from_utf8(bytes) {
        Ok(text) => (std::borrow::Cow::Borrowed(text), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let lines = physical_lines(text);
    // dhis.conf is UTF-8 in practice. A line that is not is an error if it
    // belongs to one of our keys, else only a warning (it may be a Latin-1
    // comment or password of the application's, which is none of ours).
    let bad_utf8: Vec<usize> = if lossy {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(char::REPLACEMENT_CHARACTER))
            .map(|(i, _)| i + 1)
            .collect()
    } else {
        Vec::new()
    };
    let mut bad_ours: Vec<usize> = Vec::new();
    let mut keys: BTreeMap<String, Entry> = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let number = i + 1;
        let first = lines[i].trim_start_matches(WHITE);
        if first.is_empty() || first.starts_with(['#', '!']) {
            i += 1;
            continue;
        }
        // Join continuation lines; a `\` on the file's last line is
        // dropped, as Java does.
        let mut last = i;
        let mut logical = std::borrow::Cow::Borrowed(first);
        while continues(lines[last]) {
            logical.to_mut().pop();
            if last + 1 == lines.len() {
                break;
            }
            last += 1;
            logical
                .to_mut()
                .push_str(lines[last].trim_start_matches(WHITE));
        }
        i = last + 1;

        let raw = raw_key(&logical);
        let key = if raw.contains('\\') {
            if !could_be_ours(raw) {
                continue;
            }
            match parse_entry(raw) {
                Ok((key, _)) => key,
                Err(e) => {
                    report.warn(
                        "",
                        Some(number),
                        format!(
                            "the key `{raw}` has a malformed escape ({e}); the line is ignored"
                        ),
                    );
                    continue;
                }
            }
        } else if is_ours(raw) {
            raw.to_string()
        } else {
            continue;
        };
        if !is_ours(&key) {
            continue;
        }
        let span = number..=last + 1;
        let entry = if bad_utf8.iter().any(|l| span.contains(l)) {
            bad_ours.extend(bad_utf8.iter().filter(|l| span.contains(l)));
            report.error(
                &key,
                Some(number),
                "not valid UTF-8 (save the file as UTF-8); the value is not used",
            );
            if key.contains(char::REPLACEMENT_CHARACTER) {
                continue;
            }
            Entry {
                value: String::new(),
                line: number,
                broken: true,
            }
        } else {
            match parse_entry(&logical) {
                Ok((_, value)) => Entry {
                    value: value.trim().to_string(),
                    line: number,
                    broken: false,
                },
                Err(e) => {
                    report.error(&key, Some(number), format!("{e}; the value is not used"));
                    Entry {
                        value: String::new(),
                        line: number,
                        broken: true,
                    }
                }
            }
        };
        if let Some(old) = keys.insert(key.clone(), entry) {
            report.warn(
                &key,
                Some(number),
                format!(
                    "set again (first on line {}); the last value wins",
                    old.line
                ),
            );
        }
    }
    let others: Vec<usize> = bad_utf8
        .into_iter()
        .filter(|l| !bad_ours.contains(l))
        .collect();
    if let Some((&first, rest)) = others.split_first() {
        let also = match rest.len() {
            0 => String::new(),
            n if n <= 10 => format!(
                " (also line{} {})",
                if n == 1 { "" } else { "s" },
                rest.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            n => format!(" (and {n} more lines)"),
        };
        report.warn(
            "",
            Some(first),
            format!("not valid UTF-8{also}; not a cluster key, so it is ignored"),
        );
    }
    keys
}

/// The value of a key: `Ok(None)` when absent or empty ("not set", warned
/// about once, in [`build`]); `Err` when it could not be read (reported).
fn value<'a>(keys: &'a BTreeMap<String, Entry>, key: &str) -> Result<Option<&'a Entry>, ()> {
    match keys.get(key) {
        Some(e) if e.broken => Err(()),
        Some(e) if !e.value.is_empty() => Ok(Some(e)),
        _ => Ok(None),
    }
}

/// A port number, 1..65535, digits only (no sign).
fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a port number (1..65535)"));
    }
    match s.parse::<u64>() {
        Ok(0) => Err("port 0 is not allowed (1..65535)".into()),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!("port {s} is out of range (1..65535)")),
    }
}

/// Checks a host name or IP address as written in the file.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!(
                "`{host}` is the unspecified address, which peers cannot reach; give the address peers reach this node by (cachecast.bind says where to listen)"
            ));
        }
        if ip.is_multicast() {
            return Err(format!(
                "`{host}` is a multicast address, not a node's address"
            ));
        }
        return Ok(());
    }
    if host.contains("://") {
        return Err(format!("`{host}` is a URL; give a host name or IP address"));
    }
    if host.contains(':') && host.contains('%') {
        return Err(format!(
            "`{host}`: IPv6 zone ids (`%eth0`) are not supported; \
             give a global or unique-local address of the peer"
        ));
    }
    if host.contains(':') {
        return Err(format!(
            "`{host}` holds a `:`; give the port in its own key (or bracket an IPv6 address)"
        ));
    }
    // Digits and dots only, yet not an IPv4 address (`10.0.0.256`,
    // `10.0.1`): a mistyped address, never a host name.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("`{host}` is not a valid IPv4 address"));
    }
    if host.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok {
        return Err(format!("`{host}` is not a valid host name or IP address"));
    }
    Ok(())
}

/// Parses a host key's value; IPv6 may be written in brackets.
fn parse_host(entry: &Entry, key: &str, report: &mut Report) -> Option<String> {
    let host = entry.value.as_str();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match check_host(host) {
        Ok(()) => Some(host.to_string()),
        Err(msg) => {
            report.error(key, Some(entry.line), msg);
            None
        }
    }
}

/// A port key: `Ok(None)` when not set, `Err` when invalid (reported).
fn port_of(
    keys: &BTreeMap<String, Entry>,
    key: &str,
    report: &mut Report,
) -> Result<Option<u16>, ()> {
    let Some(entry) = value(keys, key)? else {
        return Ok(None);
    };
    match parse_port(&entry.value) {
        Ok(p) => Ok(Some(p)),
        Err(msg) => {
            report.error(key, Some(entry.line), msg);
            Err(())
        }
    }
}

/// What an instance key names: its index and field.
enum InstanceKey<'a> {
    /// A recognised field of instance `n` (n may be out of range).
    Field(u64, &'a str),
    /// Not of the form `cluster.instanceN.<field>`.
    Other,
}

fn instance_key(key: &str) -> InstanceKey<'_> {
    let Some(rest) = key.strip_prefix("cluster.instance") else {
        return InstanceKey::Other;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (n, field) = rest.split_at(digits);
    let Some(field) = field.strip_prefix('.') else {
        return InstanceKey::Other;
    };
    // `instance01` is not what DHIS 2 reads: treat it as unknown.
    if digits == 0 || (digits > 1 && n.starts_with('0')) {
        return InstanceKey::Other;
    }
    // A number too long for u64 is out of range all the same.
    let n = n.parse::<u64>().unwrap_or(u64::MAX);
    match field {
        "hostname" | "cache.port" | "cache.remote.object.port" => InstanceKey::Field(n, field),
        _ => InstanceKey::Other,
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The key of ours an unknown key was probably meant to be, concrete:
/// `cluster.instance1.hostnme` → `cluster.instance1.hostname`.
fn suggestion(key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    // Compare `cluster.instance3.hostnme` as `cluster.instanceN.hostnme`.
    let (normalised, number) = match lower.strip_prefix("cluster.instance") {
        Some(rest) => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let n = rest[..digits].trim_start_matches('0');
            let n = if n.is_empty() { "0" } else { n };
            (
                format!("cluster.instanceN{}", &rest[digits..]),
                (digits > 0).then(|| n.to_string()),
            )
        }
        None => (lower.clone(), None),
    };
    let (_, best) = KNOWN_KEYS
        .iter()
        .map(|k| (distance(&normalised, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()?;
    let concrete = match (best.strip_prefix("cluster.instanceN"), number) {
        (Some(field), Some(n)) => format!("cluster.instance{n}{field}"),
        _ => best.to_string(),
    };
    (concrete != key).then_some(concrete)
}

/// An unknown key under one of our prefixes: a warning when it looks like
/// one of ours (a typo, a case slip) or sits in our own namespace, else a
/// note (`cluster.` is DHIS 2's, which may have keys we do not read).
fn unknown_key(key: &str, entry: &Entry, report: &mut Report) {
    const IGNORED: &str = "not a key cachecast reads, ignored";
    match suggestion(key) {
        Some(s) => report.warn(
            key,
            Some(entry.line),
            format!("{IGNORED} (did you mean `{s}`?)"),
        ),
        None if starts_with_ci(key, OURS) || starts_with_ci(key, "cluster.instance") => {
            report.warn(key, Some(entry.line), IGNORED)
        }
        None => report.note(key, Some(entry.line), IGNORED),
    }
}

fn warn_empty(key: &str, entry: &Entry, report: &mut Report) {
    if !entry.present() {
        report.warn(key, Some(entry.line), "empty value: treated as not set");
    }
}

/// Keeps the entry with the lowest line.
fn first_of<'a>(seen: &mut Option<(&'a str, usize)>, key: &'a str, line: usize) {
    if seen.is_none_or(|(_, l)| line < l) {
        *seen = Some((key, line));
    }
}

fn build(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<ClusterConfig> {
    // Sort every key into: an instance field, a members-format key, one of
    // our extensions, or unknown. Only keys that are set decide the format
    // (an empty value means "not set").
    let mut instance_seen: Option<(&str, usize)> = None;
    let mut members_seen: Option<(&str, usize)> = None;
    // With nothing set, the format whose keys are present (empty) decides
    // which key the "not set" error names.
    let mut members_empty = false;
    for (key, entry) in keys {
        let line = Some(entry.line);
        match instance_key(key) {
            InstanceKey::Field(n, field) => {
                if n >= MAX_INSTANCES as u64 {
                    let range = format!(
                        "at most {MAX_INSTANCES} instances (cluster.instance0 to cluster.instance{})",
                        MAX_INSTANCES - 1
                    );
                    if entry.present() {
                        report.error(key, line, range);
                    } else {
                        report.warn(
                            key,
                            line,
                            format!("empty value: treated as not set ({range})"),
                        );
                    }
                } else if field == "cache.remote.object.port" {
                    report.note(
                        key,
                        line,
                        "RMI object port: ignored (cachecast needs one port only)",
                    );
                    continue;
                } else {
                    warn_empty(key, entry, report);
                }
                if entry.present() {
                    first_of(&mut instance_seen, key, entry.line);
                }
            }
            InstanceKey::Other if MEMBERS_KEYS.contains(&key.as_str()) => {
                warn_empty(key, entry, report);
                if entry.present() {
                    first_of(&mut members_seen, key, entry.line);
                } else {
                    members_empty = true;
                }
            }
            InstanceKey::Other if key == "cluster.cache.remote.object.port" => {
                report.note(
                    key,
                    line,
                    "RMI object port: ignored (cachecast needs one port only)",
                );
            }
            InstanceKey::Other if KNOWN_KEYS.contains(&key.as_str()) => {
                warn_empty(key, entry, report);
            }
            // DHIS 2's keys, checked where the endpoint is decided; an
            // empty one is DHIS 2's default, not a mistake of ours.
            InstanceKey::Other if REDIS_KEYS.contains(&key.as_str()) => {}
            InstanceKey::Other => unknown_key(key, entry, report),
        }
    }
    let cluster = match (instance_seen, members_seen) {
        (Some((a, la)), Some((b, lb))) => {
            let (a, la, b, lb) = if la <= lb {
                (a, la, b, lb)
            } else {
                (b, lb, a, la)
            };
            report.error(
                b,
                Some(lb),
                format!(
                    "the file mixes both cluster formats (`{a}` on line {la} and `{b}`); use one of them"
                ),
            );
            None
        }
        (None, Some(_)) => Some((members_format(keys, report), Format::Members)),
        (None, None)
            if members_empty
                && !keys
                    .keys()
                    .any(|k| matches!(instance_key(k), InstanceKey::Field(..))) =>
        {
            Some((members_format(keys, report), Format::Members))
        }
        _ => Some((instances_format(keys, report), Format::Instances)),
    };
    if let Some((nodes, _)) = &cluster
        && let Some(node) = &nodes.node
    {
        check_duplicates(node, &nodes.peers, report);
        check_loopback(node, &nodes.peers, report);
        if nodes.ok && nodes.peers.is_empty() {
            report.warn(
                &node.source,
                node.line,
                "no peers configured: this node has nobody to keep coherent with",
            );
        }
    }
    // Our extensions are checked even when the cluster keys failed, so
    // that every problem is listed at once.
    let node_port = cluster
        .as_ref()
        .and_then(|(n, _)| n.node.as_ref())
        .map_or(DEFAULT_PORT, |n| n.addr.port);
    let ext = extensions(keys, node_port, report);
    let (nodes, format) = cluster?;
    let mut ext = ext?;
    let node = nodes.node.filter(|_| nodes.ok)?;
    // An IPv6 node listens on the IPv6 wildcard by default (which on Linux
    // takes IPv4 too): 0.0.0.0 would leave its peers unable to connect.
    let bind_set = keys
        .get("cachecast.bind")
        .is_some_and(|e| !e.value.is_empty());
    if !bind_set && node.addr.host.parse::<std::net::Ipv6Addr>().is_ok() {
        ext.bind.set_ip(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
    }
    if ext.api.port() == ext.bind.port()
        && (ext.api.ip() == ext.bind.ip()
            || ext.api.ip().is_unspecified()
            || ext.bind.ip().is_unspecified())
    {
        report.error(
            "cachecast.api.port",
            keys.get("cachecast.api.port").map(|e| e.line),
            format!(
                "the sidecar's API ({}) and the listener for peers ({}) would share port {}; set cachecast.api.port to another port",
                ext.api,
                ext.bind,
                ext.api.port()
            ),
        );
        return None;
    }
    let (resp, resp_why) = resp_endpoint(keys, ext.api, ext.bind, report)?;
    Some(ClusterConfig {
        node: node.addr,
        peers: nodes.peers,
        format,
        bind: ext.bind,
        secret: ext.secret,
        tls: ext.tls,
        api: ext.api,
        api_bind_explicit: ext.api_bind_explicit,
        buffer: ext.buffer,
        webhook_url: ext.webhook_url,
        state_file: ext.state_file,
        resp,
        resp_why,
        flush_hook: ext.flush_hook,
    })
}

/// What the cluster keys gave: this node (if it could be read), the peers
/// that could be read, and whether everything could.
struct Nodes {
    node: Option<Peer>,
    peers: Vec<Peer>,
    ok: bool,
}

fn instances_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Nodes {
    let mut nodes = Nodes {
        node: None,
        peers: Vec::new(),
        ok: true,
    };
    for n in 0..MAX_INSTANCES {
        let host_key = format!("cluster.instance{n}.hostname");
        let port_key = format!("cluster.instance{n}.cache.port");
        let port = port_of(keys, &port_key, report);
        match value(keys, &host_key) {
            Err(()) => nodes.ok = false,
            Ok(Some(entry)) => {
                let (Some(host), Ok(port)) = (parse_host(entry, &host_key, report), port) else {
                    nodes.ok = false;
                    continue;
                };
                let peer = Peer {
                    addr: NodeAddr::new(host, port.unwrap_or(DEFAULT_PORT)),
                    source: format!("cluster.instance{n}"),
                    line: Some(entry.line),
                };
                if n == 0 {
                    nodes.node = Some(peer);
                } else {
                    nodes.peers.push(peer);
                }
            }
            Ok(None) => {
                if let Some(port_entry) = keys.get(&port_key).filter(|e| e.present()) {
                    report.error(
                        &port_key,
                        Some(port_entry.line),
                        format!("a port without its host name (set {host_key})"),
                    );
                    nodes.ok = false;
                }
                if n == 0 {
                    report.error(
                        &host_key,
                        keys.get(&host_key).map(|e| e.line),
                        NOT_SET_INSTANCE0,
                    );
                    nodes.ok = false;
                }
            }
        }
    }
    nodes
}

fn members_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Nodes {
    let mut nodes = Nodes {
        node: None,
        peers: Vec::new(),
        ok: true,
    };
    let port = port_of(keys, "cluster.cache.port", report);
    match value(keys, "cluster.hostname") {
        Err(()) => nodes.ok = false,
        Ok(Some(entry)) => match (parse_host(entry, "cluster.hostname", report), port) {
            (Some(host), Ok(port)) => {
                nodes.node = Some(Peer {
                    addr: NodeAddr::new(host, port.unwrap_or(DEFAULT_PORT)),
                    source: "cluster.hostname".into(),
                    line: Some(entry.line),
                });
            }
            _ => nodes.ok = false,
        },
        Ok(None) => {
            report.error(
                "cluster.hostname",
                keys.get("cluster.hostname").map(|e| e.line),
                NOT_SET_INSTANCE0,
            );
            if let Some(port_entry) = keys.get("cluster.cache.port").filter(|e| e.present()) {
                report.error(
                    "cluster.cache.port",
                    Some(port_entry.line),
                    "a port without its host name (set cluster.hostname)",
                );
            }
            nodes.ok = false;
        }
    }
    if port.is_err() {
        nodes.ok = false;
    }
    let entry = match value(keys, "cluster.members") {
        Ok(Some(entry)) => entry,
        Ok(None) => return nodes,
        Err(()) => {
            nodes.ok = false;
            return nodes;
        }
    };
    let line = Some(entry.line);
    let mut count = 0;
    for (i, member) in entry.value.split(',').map(str::trim).enumerate() {
        if member.is_empty() {
            report.warn(
                "cluster.members",
                line,
                format!("entry {} is empty (a stray comma?)", i + 1),
            );
            continue;
        }
        count += 1;
        match member.parse::<NodeAddr>() {
            Ok(addr) => {
                if member.parse::<std::net::Ipv6Addr>().is_ok() {
                    report.warn(
                        "cluster.members",
                        line,
                        format!(
                            "entry {}: write an IPv6 address in brackets (`[{member}]:port`), so that a port cannot be read as part of it; port {DEFAULT_PORT} applies",
                            i + 1
                        ),
                    );
                }
                nodes.peers.push(Peer {
                    addr,
                    source: format!("cluster.members[{}]", i + 1),
                    line,
                });
            }
            Err(e) => {
                report.error("cluster.members", line, format!("entry {}: {e}", i + 1));
                nodes.ok = false;
            }
        }
    }
    if count + 1 > MAX_INSTANCES {
        report.error(
            "cluster.members",
            line,
            format!(
                "{count} members: at most {MAX_INSTANCES} instances (this node and {} members)",
                MAX_INSTANCES - 1
            ),
        );
        nodes.ok = false;
    }
    nodes
}

/// Two entries naming the same `host:port` (by text, or as equal IP
/// addresses however written) are an error.
fn check_duplicates(node: &Peer, peers: &[Peer], report: &mut Report) {
    let all: Vec<&Peer> = std::iter::once(node).chain(peers).collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.addr.same_name(&b.addr) {
                let why = if i == 0 {
                    "a node cannot peer with itself"
                } else {
                    "the same node twice"
                };
                report.error(
                    &b.source,
                    b.line,
                    format!("{} is also {} ({why})", b.addr, a.source),
                );
            }
        }
    }
}

/// `Some(true)` for a loopback address or `localhost`, `Some(false)` for
/// any other IP address, `None` for a name (unknown until resolved).
fn loopback(host: &str) -> Option<bool> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(true);
    }
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical().is_loopback())
}

/// This node named by a loopback address while a peer is on another
/// machine: that peer cannot reach this node by its identity.
fn check_loopback(node: &Peer, peers: &[Peer], report: &mut Report) {
    if loopback(&node.addr.host) != Some(true) {
        return;
    }
    if let Some(p) = peers.iter().find(|p| loopback(&p.addr.host) == Some(false)) {
        report.warn(
            &node.source,
            node.line,
            format!(
                "this node is {}, a loopback address, but {} ({}) is another machine, which cannot reach it there; give the address peers reach this node by",
                node.addr, p.addr, p.source
            ),
        );
    }
}

struct Extensions {
    bind: SocketAddr,
    secret: Option<SecretSource>,
    tls: Option<TlsFiles>,
    api: SocketAddr,
    api_bind_explicit: bool,
    buffer: usize,
    webhook_url: Option<String>,
    state_file: Option<PathBuf>,
    flush_hook: Option<FlushHookConfig>,
}

/// An IP address, IPv6 optionally in brackets.
fn ip_literal(text: &str) -> Option<IpAddr> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match inner.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) if inner.len() != text.len() => None, // `[10.0.0.1]`
        Ok(ip) => Some(ip),
        Err(_) => None,
    }
}

/// `cachecast.bind`: `addr` or `addr:port`, an IP address (no name).
fn parse_bind(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Some(ip) = ip_literal(text) {
        return Ok((ip, None));
    }
    if let Some((host, port)) = text.rsplit_once(':')
        && let Some(ip) = ip_literal(host).filter(|ip| ip.is_ipv4() || host.starts_with('['))
    {
        return Ok((ip, Some(parse_port(port)?)));
    }
    Err(format!(
        "`{text}` is not `address` or `address:port` (an IP address, not a name; IPv6 in brackets with a port)"
    ))
}

fn extensions(
    keys: &BTreeMap<String, Entry>,
    node_port: u16,
    report: &mut Report,
) -> Option<Extensions> {
    let mut ok = true;
    // Each lookup: Ok(None) when not set, Err when already reported.
    let get = |key: &str, ok: &mut bool| match value(keys, key) {
        Ok(v) => v,
        Err(()) => {
            *ok = false;
            None
        }
    };
    // cachecast.bind: `addr` or `addr:port`.
    let mut bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), node_port);
    if let Some(entry) = get("cachecast.bind", &mut ok) {
        match parse_bind(&entry.value) {
            Ok((ip, port)) => {
                bind.set_ip(ip);
                if let Some(port) = port {
                    bind.set_port(port);
                }
            }
            Err(msg) => {
                report.error("cachecast.bind", Some(entry.line), msg);
                ok = false;
            }
        }
    }
    let secret = match (
        get("cachecast.secret", &mut ok),
        get("cachecast.secret.file", &mut ok),
    ) {
        (Some(a), Some(f)) => {
            report.error(
                "cachecast.secret",
                Some(a.line),
                format!(
                    "both cachecast.secret and cachecast.secret.file (line {}) are set; keep one",
                    f.line
                ),
            );
            ok = false;
            None
        }
        (Some(a), None) => Some(SecretSource::Inline(a.value.clone())),
        (None, Some(f)) => Some(SecretSource::File(PathBuf::from(&f.value))),
        (None, None) => None,
    };
    let tls_keys = [
        "cachecast.tls.cert",
        "cachecast.tls.key",
        "cachecast.tls.ca",
    ];
    let tls_values: Vec<Option<&Entry>> = tls_keys.iter().map(|k| get(k, &mut ok)).collect();
    let tls = match tls_values.as_slice() {
        [Some(c), Some(k), Some(a)] => Some(TlsFiles {
            cert: PathBuf::from(&c.value),
            key: PathBuf::from(&k.value),
            ca: PathBuf::from(&a.value),
        }),
        [None, None, None] => None,
        _ => {
            let set: Vec<String> = tls_keys
                .iter()
                .zip(&tls_values)
                .filter_map(|(k, v)| v.map(|e| format!("{k} (line {})", e.line)))
                .collect();
            for (key, _) in tls_keys
                .iter()
                .zip(&tls_values)
                .filter(|(_, v)| v.is_none())
            {
                report.error(
                    key,
                    None,
                    format!(
                        "not set, but {} is: mutual TLS needs all three of cachecast.tls.cert, cachecast.tls.key and cachecast.tls.ca",
                        set.join(" and ")
                    ),
                );
            }
            ok = false;
            None
        }
    };
    let api_port = match port_of(keys, "cachecast.api.port", report) {
        Ok(p) => p.unwrap_or(DEFAULT_API_PORT),
        Err(()) => {
            ok = false;
            DEFAULT_API_PORT
        }
    };
    let mut api = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), api_port);
    let mut api_bind_explicit = false;
    if let Some(entry) = get("cachecast.api.bind", &mut ok) {
        match ip_literal(&entry.value) {
            Some(ip) => {
                api.set_ip(ip);
                api_bind_explicit = true;
                if !ip.to_canonical().is_loopback() {
                    report.warn(
                        "cachecast.api.bind",
                        Some(entry.line),
                        format!(
                            "{ip} is not a loopback address: the sidecar's API (which can invalidate every cache) is open to the network"
                        ),
                    );
                }
            }
            None => {
                report.error(
                    "cachecast.api.bind",
                    Some(entry.line),
                    format!("`{}` is not an IP address", entry.value),
                );
                ok = false;
            }
        }
    }
    let mut buffer = DEFAULT_BUFFER;
    if let Some(entry) = get("cachecast.buffer", &mut ok) {
        let digits = entry.value.bytes().all(|b| b.is_ascii_digit());
        match entry.value.parse::<usize>() {
            Ok(n) if digits && (1..=MAX_BUFFER).contains(&n) => buffer = n,
            _ => {
                report.error(
                    "cachecast.buffer",
                    Some(entry.line),
                    format!(
                        "`{}` is not a number of invalidations from 1 to {MAX_BUFFER}",
                        entry.value
                    ),
                );
                ok = false;
            }
        }
    }
    let remote = match get("cachecast.webhook.remote", &mut ok) {
        None => false,
        Some(e) if e.value.eq_ignore_ascii_case("true") => true,
        Some(e) if e.value.eq_ignore_ascii_case("false") => false,
        Some(e) => {
            report.error(
                "cachecast.webhook.remote",
                Some(e.line),
                format!("`{}` is not `true` or `false`", e.value),
            );
            ok = false;
            false
        }
    };
    let state_file = get("cachecast.state.file", &mut ok).map(|e| PathBuf::from(&e.value));
    let mut webhook_url = None;
    if let Some(entry) = get("cachecast.webhook.url", &mut ok) {
        match check_webhook(&entry.value, remote) {
            Ok(None) => webhook_url = Some(entry.value.clone()),
            Ok(Some(warning)) => {
                report.warn("cachecast.webhook.url", Some(entry.line), warning);
                webhook_url = Some(entry.value.clone());
            }
            Err(msg) => {
                report.error("cachecast.webhook.url", Some(entry.line), msg);
                ok = false;
            }
        }
    }
    let mut flush_hook = None;
    if let Some(entry) = get("cachecast.flush.url", &mut ok) {
        match check_flush_url(&entry.value) {
            Ok(warning) => {
                if let Some(w) = warning {
                    report.warn("cachecast.flush.url", Some(entry.line), w);
                }
                flush_hook = Some(FlushHookConfig {
                    url: entry.value.clone(),
                    credentials: None,
                });
            }
            Err(msg) => {
                report.error("cachecast.flush.url", Some(entry.line), msg);
                ok = false;
            }
        }
    }
    match (get("cachecast.flush.credentials.file", &mut ok), &mut flush_hook) {
        (Some(entry), Some(hook)) => hook.credentials = Some(PathBuf::from(&entry.value)),
        (Some(entry), None) if ok => report.warn(
            "cachecast.flush.credentials.file",
            Some(entry.line),
            "set without cachecast.flush.url: not used",
        ),
        (None, Some(hook)) => report.warn(
            "cachecast.flush.url",
            keys.get("cachecast.flush.url").map(|e| e.line),
            format!(
                "no cachecast.flush.credentials.file: {} is called without authentication (DHIS 2's cacheClear needs a user that may perform maintenance)",
                hook.url
            ),
        ),
        _ => {}
    }
    ok.then_some(Extensions {
        bind,
        secret,
        tls,
        api,
        api_bind_explicit,
        buffer,
        webhook_url,
        state_file,
        flush_hook,
    })
}

/// Checks a flush-hook URL: `http://` or `https://`, parsed by the HTTP
/// client's own parser. Plain HTTP to another host is allowed with a
/// warning: the hook carries credentials.
fn check_flush_url(url: &str) -> Result<Option<String>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    }
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(format!("`{url}` names no host")),
    };
    if parsed.port() == Some(0) {
        return Err(format!("`{url}`: port 0 is not allowed (1..65535)"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "`{url}` holds credentials; put `user:password` in the file named by cachecast.flush.credentials.file instead"
        ));
    }
    let local = loopback(&host) == Some(true);
    Ok((parsed.scheme() == "http" && !local).then(|| {
        format!("the flush hook goes to {host} over plain HTTP: its credentials cross the network in clear text (use https://)")
    }))
}

/// Whether a DHIS 2 switch is on. DHIS 2 writes `on`/`off`; `true` and
/// `false` are read the same way.
fn switch(keys: &BTreeMap<String, Entry>, key: &str, report: &mut Report) -> bool {
    let Some(entry) = keys.get(key).filter(|e| !e.broken) else {
        return false;
    };
    match entry.value.to_ascii_lowercase().as_str() {
        "on" | "true" => true,
        "off" | "false" | "" => false,
        _ => {
            report.warn(
                key,
                Some(entry.line),
                format!("`{}` is not `on` or `off`; read as off", entry.value),
            );
            false
        }
    }
}

/// Port of DHIS 2's Redis when `redis.port` is not set.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// Decides the Redis-protocol endpoint: `cachecast.resp.port`, else
/// DHIS 2's `redis.*` keys when they send its cache invalidation to this
/// machine. Returns the endpoint (if on) and why, or `None` after an
/// error.
fn resp_endpoint(
    keys: &BTreeMap<String, Entry>,
    api: SocketAddr,
    mesh: SocketAddr,
    report: &mut Report,
) -> Option<(Option<RespConfig>, String)> {
    let line = |k: &str| keys.get(k).map(|e| e.line);
    let text = |k: &str| {
        keys.get(k)
            .filter(|e| !e.broken && !e.value.is_empty())
            .map(|e| e.value.clone())
    };
    let mut ok = true;
    let explicit = match port_of(keys, "cachecast.resp.port", report) {
        Ok(p) => p,
        Err(()) => return None,
    };
    let bind = match text("cachecast.resp.bind") {
        None => None,
        Some(v) => match ip_literal(&v) {
            Some(ip) => Some(ip),
            None => {
                report.error(
                    "cachecast.resp.bind",
                    line("cachecast.resp.bind"),
                    format!("`{v}` is not an IP address"),
                );
                return None;
            }
        },
    };
    let invalidation = switch(keys, "redis.cache.invalidation.enabled", report);
    let redis_enabled = switch(keys, "redis.enabled", report);
    // DHIS 2 reads this one as a Java boolean: only `true` is on.
    let ssl = keys
        .get("redis.use.ssl")
        .is_some_and(|e| !e.broken && e.value.eq_ignore_ascii_case("true"));
    let host = text("redis.host").unwrap_or_else(|| "localhost".into());
    let password = text("redis.password");
    let host_local = loopback(&host) == Some(true);
    // Where DHIS 2 would connect when its invalidation goes to this machine.
    let app_points_here = invalidation && host_local;
    // Read only when DHIS 2's invalidation comes here: otherwise the key is
    // the application's alone, whatever it holds.
    let redis_port = if app_points_here {
        match port_of(keys, "redis.port", report) {
            Ok(p) => p.unwrap_or(DEFAULT_REDIS_PORT),
            Err(()) => {
                ok = false;
                DEFAULT_REDIS_PORT
            }
        }
    } else {
        DEFAULT_REDIS_PORT
    };
    let (port, source, why) = match explicit {
        Some(port) => (
            port,
            RespSource::Explicit,
            "on: cachecast.resp.port is set".to_string(),
        ),
        None if !invalidation => {
            return ok.then(|| {
                (
                    None,
                    "off: neither cachecast.resp.port nor redis.cache.invalidation.enabled = on is set"
                        .to_string(),
                )
            });
        }
        None if redis_enabled => {
            return ok.then(|| {
                (
                    None,
                    "off: redis.enabled = on, so DHIS 2 also keeps sessions and leader election in Redis, which the sidecar does not serve; \
                     keep the real Redis, or set cachecast.resp.port to serve pub/sub on another port"
                        .to_string(),
                )
            });
        }
        None if !host_local => {
            return ok.then(|| {
                (
                    None,
                    format!(
                        "off: redis.host = {host} is not this machine, so DHIS 2 invalidates through that Redis; \
                         set redis.host = localhost to use the mesh instead"
                    ),
                )
            });
        }
        None => (
            redis_port,
            RespSource::RedisKeys,
            format!(
                "on: redis.cache.invalidation.enabled = on and redis.host = {host} point DHIS 2 at this sidecar"
            ),
        ),
    };
    if source == RespSource::Explicit && app_points_here && !redis_enabled && port != redis_port {
        report.warn(
            "cachecast.resp.port",
            line("cachecast.resp.port"),
            format!(
                "DHIS 2's cache invalidation goes to {host}:{redis_port} (redis.host, redis.port), not to this endpoint's port {port}: DHIS 2 will not reach the sidecar"
            ),
        );
    }
    if ssl && app_points_here && port == redis_port {
        report.error(
            "redis.use.ssl",
            line("redis.use.ssl"),
            "DHIS 2 would speak TLS to its sidecar, which serves plain RESP on loopback; set redis.use.ssl = false (the traffic never leaves this machine)",
        );
        ok = false;
    }
    let addrs: Vec<SocketAddr> = match bind {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None if source == RespSource::RedisKeys && !host.eq_ignore_ascii_case("localhost") => {
            match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)],
            }
        }
        None if source == RespSource::RedisKeys => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port),
        ],
        None => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)],
    };
    let key = match source {
        RespSource::Explicit => "cachecast.resp.port",
        RespSource::RedisKeys => "redis.port",
    };
    for addr in &addrs {
        // The same port on the same address, or on a wildcard that covers
        // it (`0.0.0.0` covers IPv4 only; `::` both, as Linux binds it).
        let covers = |wild: IpAddr, other: IpAddr| {
            wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
        };
        let clash = |other: SocketAddr| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || covers(other.ip(), addr.ip())
                    || covers(addr.ip(), other.ip()))
        };
        for (other, what) in [(api, "the sidecar's API"), (mesh, "the listener for peers")] {
            if clash(other) {
                report.error(
                    key,
                    line(key),
                    format!(
                        "the Redis-protocol endpoint ({addr}) and {what} ({other}) would share port {}",
                        addr.port()
                    ),
                );
                ok = false;
            }
        }
    }
    if let Some(ip) = bind
        && !ip.to_canonical().is_loopback()
    {
        report.warn(
            "cachecast.resp.bind",
            line("cachecast.resp.bind"),
            format!(
                "{ip} is not a loopback address: anyone who reaches it can publish invalidations{}",
                if password.is_none() {
                    " (and no redis.password is set)"
                } else {
                    ""
                }
            ),
        );
    }
    if !ok {
        return None;
    }
    Some((
        Some(RespConfig {
            addrs,
            password,
            bind_explicit: bind.is_some(),
            source,
        }),
        why,
    ))
}

/// Checks a webhook URL: plain `http://` to a loopback host, unless
/// `remote` allows another host (then with a warning).
fn check_webhook(url: &str, remote: bool) -> Result<Option<String>, String> {
    if !url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    {
        return Err(format!(
            "`{url}` is not an http:// URL (the webhook goes to the local application; https is not supported)"
        ));
    }
    // The same parser as the HTTP client's, so that what passes here is
    // what the sidecar can call.
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("`{url}` names no host")),
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    if parsed.port() == Some(0) {
        return Err(format!("`{url}`: port 0 is not allowed (1..65535)"));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    match (loopback, remote) {
        (true, _) => Ok(None),
        (false, true) => Ok(Some(format!(
            "the webhook goes to {host}, off this machine: invalidations (cache names and keys) leave it in clear text"
        ))),
        (false, false) => Err(format!(
            "{host} is not a loopback address; the webhook is for the local application (set cachecast.webhook.remote = true to allow another host)"
        )),
    }
}

/// What name resolution found for one node.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The node.
    pub addr: NodeAddr,
    /// Its addresses, or why there are none.
    pub ips: Result<Vec<IpAddr>, String>,
}

/// Resolves every node of the cluster (each lookup at most `timeout`, all
/// in parallel) and reports, as problems: names that do not resolve
/// (warnings: DNS may differ at run time) and two nodes whose addresses
/// intersect with equal ports (errors).
pub fn resolve(config: &ClusterConfig, timeout: Duration) -> (Vec<Resolved>, Vec<Problem>) {
    let all: Vec<(NodeAddr, String, Option<usize>)> =
        std::iter::once((config.node.clone(), node_source(config), None))
            .chain(
                config
                    .peers
                    .iter()
                    .map(|p| (p.addr.clone(), p.source.clone(), p.line)),
            )
            .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, (addr, _, _)) in all.iter().enumerate() {
        let tx = tx.clone();
        let addr = addr.clone();
        // A blocking lookup per node in its own thread, so one slow name
        // cannot hold up the rest; a thread that outlives the timeout is
        // simply abandoned.
        std::thread::spawn(move || {
            let _ = tx.send((i, addr.resolve()));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + timeout;
    let mut results: Vec<Result<Vec<IpAddr>, String>> =
        vec![Err(format!("no answer within {timeout:?}")); all.len()];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((i, r)) => results[i] = r.map_err(|e| e.to_string()),
            Err(_) => break,
        }
    }
    let mut problems = Vec::new();
    for ((addr, source, line), r) in all.iter().zip(&results) {
        if let Err(e) = r {
            problems.push(Problem {
                severity: Severity::Warning,
                key: Some(source.clone()),
                line: *line,
                message: format!(
                    "{} does not resolve now ({e}); it is resolved again on every connection attempt",
                    addr.host
                ),
            });
        }
    }
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            let (a, b) = (&all[i], &all[j]);
            if a.0.port != b.0.port || a.0.same_name(&b.0) {
                continue; // different ports, or already reported by name
            }
            if let (Ok(x), Ok(y)) = (&results[i], &results[j])
                && let Some(ip) = x.iter().find(|ip| y.contains(ip))
            {
                problems.push(Problem {
                    severity: Severity::Error,
                    key: Some(b.1.clone()),
                    line: b.2,
                    message: format!(
                        "{} and {} ({}) both resolve to {ip} port {}: {}",
                        b.0,
                        a.0,
                        a.1,
                        a.0.port,
                        if i == 0 {
                            "a node cannot peer with itself"
                        } else {
                            "the same node twice"
                        }
                    ),
                });
            }
        }
    }
    let resolved = all
        .into_iter()
        .zip(results)
        .map(|((addr, _, _), ips)| Resolved { addr, ips })
        .collect();
    (resolved, problems)
}

fn node_source(config: &ClusterConfig) -> String {
    match config.format {
        Format::Members => "cluster.hostname".into(),
        _ => "cluster.instance0".into(),
    }
}
