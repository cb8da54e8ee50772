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

    /// Whether both name the same node by their text alone: equal ports and
    /// host names equal ignoring ASCII case.
    pub fn same_name(&self, other: &NodeAddr) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
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
        std::io::ErrorKind::NotFound => "no such file (give --config PATH or set DHIS2_HOME)".into(),
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
];

/// A value read from the file, with its line.
#[derive(Debug, Clone)]
struct Entry {
    value: String,
    line: usize,
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
            message,
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
    let text = decode_utf8(bytes, &mut report);
    let keys = read_keys(&text, &mut report);
    let config = build(&keys, &mut report);
    let (errors, warnings): (Vec<Problem>, Vec<Problem>) = report
        .problems
        .into_iter()
        .partition(|p| p.severity == Severity::Error);
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded { config, warnings }),
        _ => Err(ConfigError::Invalid { errors, warnings }),
    }
}

/// The file as text. dhis.conf is UTF-8 in practice; a line that is not
/// is an error if it holds one of our keys, else only a warning (it may be a
/// Latin-1 password of the application's, which is none of our business).
fn decode_utf8(bytes: &[u8], report: &mut Report) -> String {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.to_string();
    }
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if std::str::from_utf8(line).is_err() {
            let lossy = String::from_utf8_lossy(line);
            let start = lossy.trim_start();
            if start.starts_with(CLUSTER) || start.starts_with(OURS) {
                report.error(
                    "",
                    Some(i + 1),
                    "not valid UTF-8 (save the file as UTF-8)",
                );
            } else {
                report.warn(
                    "",
                    Some(i + 1),
                    "not valid UTF-8; not a cluster key, so it is ignored",
                );
            }
        }
    }
    String::from_utf8_lossy(bytes).into_owned()
}

/// Our keys with their values and lines; the last of a repeated key wins,
/// with a warning.
fn read_keys(text: &str, report: &mut Report) -> BTreeMap<String, Entry> {
    let mut keys: BTreeMap<String, Entry> = BTreeMap::new();
    let iter = java_properties::PropertiesIter::new_with_encoding(
        text.as_bytes(),
        encoding_rs::UTF_8,
    );
    for line in iter {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                // The crate's errors (a malformed \uXXXX escape) end its
                // iteration, so what follows the bad line is not read.
                report.error(
                    "",
                    e.line_number(),
                    format!("{e}; the rest of the file was not read"),
                );
                break;
            }
        };
        let number = line.line_number();
        if let java_properties::LineContent::KVPair(key, value) = line.consume_content() {
            if !(key.starts_with(CLUSTER) || key.starts_with(OURS)) {
                continue;
            }
            let entry = Entry {
                value: value.trim().to_string(),
                line: number,
            };
            if let Some(old) = keys.insert(key.clone(), entry) {
                report.warn(
                    &key,
                    Some(number),
                    format!("set again (first on line {}); the last value wins", old.line),
                );
            }
        }
    }
    keys
}

/// The value of a key; an empty value means "not set" and is reported.
fn value<'a>(keys: &'a BTreeMap<String, Entry>, key: &str, report: &mut Report) -> Option<&'a Entry> {
    let entry = keys.get(key)?;
    if entry.value.is_empty() {
        report.warn(key, Some(entry.line), "empty value: treated as not set");
        return None;
    }
    Some(entry)
}

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
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.contains("://") {
        return Err(format!("`{host}` is a URL; give a host name or IP address"));
    }
    if host.contains(':') {
        return Err(format!(
            "`{host}` holds a `:`; give the port in its own key (or bracket an IPv6 address)"
        ));
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

fn port_of(keys: &BTreeMap<String, Entry>, key: &str, report: &mut Report) -> Option<u16> {
    let entry = value(keys, key, report)?;
    match parse_port(&entry.value) {
        Ok(p) => Some(p),
        Err(msg) => {
            report.error(key, Some(entry.line), msg);
            None
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

fn suggestion(key: &str) -> Option<&'static str> {
    // Compare `cluster.instance3.hostnme` as `cluster.instanceN.hostnme`.
    let normalised = match key.strip_prefix("cluster.instance") {
        Some(rest) => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            format!("cluster.instanceN{}", &rest[digits..])
        }
        None => key.to_string(),
    };
    KNOWN_KEYS
        .iter()
        .map(|k| (distance(&normalised, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

fn build(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<ClusterConfig> {
    // Sort every key into: an instance field, a members-format key, one of
    // our extensions, or unknown.
    let members_keys = ["cluster.hostname", "cluster.members", "cluster.cache.port"];
    let mut instance_seen: Option<(&str, usize)> = None;
    let mut members_seen: Option<(&str, usize)> = None;
    for (key, entry) in keys {
        match instance_key(key) {
            InstanceKey::Field(n, field) => {
                if n >= MAX_INSTANCES as u64 {
                    report.error(
                        key,
                        Some(entry.line),
                        format!(
                            "at most {MAX_INSTANCES} instances (cluster.instance0 to cluster.instance4)"
                        ),
                    );
                } else if field == "cache.remote.object.port" {
                    report.note(
                        key,
                        Some(entry.line),
                        "RMI object port: ignored (cachecast needs one port only)",
                    );
                }
                instance_seen.get_or_insert((key, entry.line));
            }
            InstanceKey::Other if members_keys.contains(&key.as_str()) => {
                members_seen.get_or_insert((key, entry.line));
            }
            InstanceKey::Other if key == "cluster.cache.remote.object.port" => {
                report.note(
                    key,
                    Some(entry.line),
                    "RMI object port: ignored (cachecast needs one port only)",
                );
            }
            InstanceKey::Other if KNOWN_KEYS.contains(&key.as_str()) => {}
            InstanceKey::Other => {
                let hint = match suggestion(key) {
                    Some(k) => format!("unknown key, ignored (did you mean `{k}`?)"),
                    None => "unknown key, ignored".to_string(),
                };
                report.warn(key, Some(entry.line), hint);
            }
        }
    }
    if let (Some((a, la)), Some((b, lb))) = (instance_seen, members_seen) {
        report.error(
            b,
            Some(lb),
            format!(
                "the file mixes both cluster formats (`{a}` on line {la} and `{b}`); use one of them"
            ),
        );
        return None;
    }
    let (node, peers, format) = if members_seen.is_some() {
        let (node, peers) = members_format(keys, report)?;
        (node, peers, Format::Members)
    } else {
        let (node, peers) = instances_format(keys, report)?;
        (node, peers, Format::Instances)
    };
    check_duplicates(&node, &peers, report);
    if peers.is_empty() {
        report.warn(
            "",
            node.line,
            "no peers configured: this node has nobody to keep coherent with",
        );
    }
    let ext = extensions(keys, node.addr.port, report)?;
    Some(ClusterConfig {
        node: node.addr,
        peers,
        format,
        bind: ext.bind,
        secret: ext.secret,
        tls: ext.tls,
        api: ext.api,
        api_bind_explicit: ext.api_bind_explicit,
        buffer: ext.buffer,
        webhook_url: ext.webhook_url,
    })
}

type NodeAndPeers = (Peer, Vec<Peer>);

fn instances_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<NodeAndPeers> {
    let mut nodes: Vec<Option<Peer>> = vec![None; MAX_INSTANCES];
    let mut failed = false;
    for (n, slot) in nodes.iter_mut().enumerate() {
        let host_key = format!("cluster.instance{n}.hostname");
        let port_key = format!("cluster.instance{n}.cache.port");
        let host = value(keys, &host_key, report);
        let port = port_of(keys, &port_key, report);
        match (host, keys.get(&port_key)) {
            (Some(entry), _) => {
                let Some(host) = parse_host(entry, &host_key, report) else {
                    failed = true;
                    continue;
                };
                if keys.get(&port_key).is_some_and(|e| !e.value.is_empty()) && port.is_none() {
                    failed = true;
                    continue;
                }
                *slot = Some(Peer {
                    addr: NodeAddr::new(host, port.unwrap_or(DEFAULT_PORT)),
                    source: format!("cluster.instance{n}"),
                    line: Some(entry.line),
                });
            }
            (None, Some(port_entry)) if !port_entry.value.is_empty() => {
                report.error(
                    &port_key,
                    Some(port_entry.line),
                    format!("a port without its host name (set {host_key})"),
                );
                failed = true;
            }
            _ => {}
        }
    }
    let mut nodes = nodes.into_iter();
    let node = nodes.next().flatten();
    let peers: Vec<Peer> = nodes.flatten().collect();
    let Some(node) = node else {
        let unset = keys
            .get("cluster.instance0.hostname")
            .is_none_or(|e| e.value.is_empty());
        if unset {
            report.error(
                "cluster.instance0.hostname",
                None,
                "not set: clustering is off (set it to this node's host name or IP address, as its peers reach it)",
            );
        }
        return None;
    };
    if failed {
        return None;
    }
    Some((node, peers))
}

fn members_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<NodeAndPeers> {
    let port = port_of(keys, "cluster.cache.port", report);
    let port_failed = keys
        .get("cluster.cache.port")
        .is_some_and(|e| !e.value.is_empty())
        && port.is_none();
    let host = value(keys, "cluster.hostname", report);
    let node = match host {
        Some(entry) => parse_host(entry, "cluster.hostname", report).map(|h| Peer {
            addr: NodeAddr::new(h, port.unwrap_or(DEFAULT_PORT)),
            source: "cluster.hostname".into(),
            line: Some(entry.line),
        }),
        None => {
            if !keys.contains_key("cluster.hostname") {
                report.error(
                    "cluster.hostname",
                    None,
                    "not set: clustering is off (set it to this node's host name or IP address, as its peers reach it)",
                );
            }
            None
        }
    };
    let mut peers = Vec::new();
    let mut failed = port_failed || node.is_none();
    if let Some(entry) = value(keys, "cluster.members", report) {
        for (i, member) in entry.value.split(',').map(str::trim).enumerate() {
            if member.is_empty() {
                report.warn(
                    "cluster.members",
                    Some(entry.line),
                    format!("entry {} is empty (a stray comma?)", i + 1),
                );
                continue;
            }
            match member.parse::<NodeAddr>() {
                Ok(addr) => peers.push(Peer {
                    addr,
                    source: format!("cluster.members[{}]", i + 1),
                    line: Some(entry.line),
                }),
                Err(e) => {
                    report.error("cluster.members", Some(entry.line), format!("entry {}: {e}", i + 1));
                    failed = true;
                }
            }
        }
        if peers.len() + 1 > MAX_INSTANCES {
            report.error(
                "cluster.members",
                Some(entry.line),
                format!(
                    "{} members: at most {MAX_INSTANCES} instances (this node and {} members)",
                    peers.len(),
                    MAX_INSTANCES - 1
                ),
            );
            failed = true;
        }
    }
    if failed {
        return None;
    }
    node.map(|n| (n, peers))
}

/// Two entries naming the same `host:port` (by text) are an error.
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

struct Extensions {
    bind: SocketAddr,
    secret: Option<SecretSource>,
    tls: Option<TlsFiles>,
    api: SocketAddr,
    api_bind_explicit: bool,
    buffer: usize,
    webhook_url: Option<String>,
}

fn parse_ip(keys: &BTreeMap<String, Entry>, key: &str, report: &mut Report) -> Option<Option<IpAddr>> {
    let Some(entry) = value(keys, key, report) else {
        return Some(None);
    };
    let text = entry.value.trim_start_matches('[').trim_end_matches(']');
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(Some(ip)),
        Err(_) => {
            report.error(key, Some(entry.line), format!("`{}` is not an IP address", entry.value));
            None
        }
    }
}

fn extensions(keys: &BTreeMap<String, Entry>, node_port: u16, report: &mut Report) -> Option<Extensions> {
    let mut ok = true;
    // cachecast.bind: `addr` or `addr:port`.
    let mut bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), node_port);
    if let Some(entry) = value(keys, "cachecast.bind", report) {
        let v = entry.value.as_str();
        if let Ok(sa) = v.parse::<SocketAddr>() {
            if sa.port() == 0 {
                report.error("cachecast.bind", Some(entry.line), "port 0 is not allowed (1..65535)");
                ok = false;
            }
            bind = sa;
        } else if let Ok(ip) = v.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            bind.set_ip(ip);
        } else {
            report.error(
                "cachecast.bind",
                Some(entry.line),
                format!("`{v}` is not `address` or `address:port` (an IP address, not a name)"),
            );
            ok = false;
        }
    }
    let secret = match (
        value(keys, "cachecast.secret", report),
        value(keys, "cachecast.secret.file", report),
    ) {
        (Some(a), Some(_)) => {
            report.error(
                "cachecast.secret",
                Some(a.line),
                "both cachecast.secret and cachecast.secret.file are set; keep one",
            );
            ok = false;
            None
        }
        (Some(a), None) => Some(SecretSource::Inline(a.value.clone())),
        (None, Some(f)) => Some(SecretSource::File(PathBuf::from(&f.value))),
        (None, None) => None,
    };
    let tls_keys = ["cachecast.tls.cert", "cachecast.tls.key", "cachecast.tls.ca"];
    let tls_values: Vec<Option<&Entry>> = tls_keys.iter().map(|k| value(keys, k, report)).collect();
    let tls = match tls_values.as_slice() {
        [Some(c), Some(k), Some(a)] => Some(TlsFiles {
            cert: PathBuf::from(&c.value),
            key: PathBuf::from(&k.value),
            ca: PathBuf::from(&a.value),
        }),
        [None, None, None] => None,
        _ => {
            let missing: Vec<&str> = tls_keys
                .iter()
                .zip(&tls_values)
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            let line = tls_values.iter().flatten().map(|e| e.line).next();
            report.error(
                "cachecast.tls",
                line,
                format!("mutual TLS needs all three files; missing {}", missing.join(", ")),
            );
            ok = false;
            None
        }
    };
    let api_port = port_of(keys, "cachecast.api.port", report);
    if keys.get("cachecast.api.port").is_some_and(|e| !e.value.is_empty()) && api_port.is_none() {
        ok = false;
    }
    let api_ip = parse_ip(keys, "cachecast.api.bind", report);
    let api_bind_explicit = matches!(api_ip, Some(Some(_)));
    let api = SocketAddr::new(
        api_ip.flatten().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        api_port.unwrap_or(DEFAULT_API_PORT),
    );
    if api_ip.is_none() {
        ok = false;
    }
    let mut buffer = DEFAULT_BUFFER;
    if let Some(entry) = value(keys, "cachecast.buffer", report) {
        match entry.value.parse::<usize>() {
            Ok(n) if (1..=MAX_BUFFER).contains(&n) => buffer = n,
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
    let webhook_url = value(keys, "cachecast.webhook.url", report).map(|e| e.value.clone());
    ok.then_some(Extensions {
        bind,
        secret,
        tls,
        api,
        api_bind_explicit,
        buffer,
        webhook_url,
    })
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
            .chain(config.peers.iter().map(|p| (p.addr.clone(), p.source.clone(), p.line)))
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
