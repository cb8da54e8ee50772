//! `dhis.conf` → [`ClusterConfig`].
//!
//! The file is a Java properties file holding the whole application's
//! settings; this module reads only the cluster keys (both legacy DHIS 2
//! formats) and our own `cachecast.*` extensions, and reports every problem
//! at once, each naming its key and line. No I/O happens here but reading the
//! file and the environment; name resolution is a separate, explicit step
//! ([`resolve`]).
//!
//! The file is read as DHIS 2 reads it, so that a file DHIS 2 accepts means
//! the same to the sidecar: `${VAR}` in a value is replaced from the
//! environment, then the value is trimmed; on/off keys
//! are on for `on` or `true` in any case; DHIS 2's defaults apply to its
//! keys that are absent, and an empty value of one of them is the empty
//! text. The environment is an input: [`load`] and [`parse_bytes`] read the
//! process's, the `_with_env` variants take a lookup (tests).

mod environment;
mod extensions;
mod legacy;
mod properties;
mod resolve;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use environment::*;
pub use environment::{Lookup, process_environment};
pub use extensions::DEFAULT_REDIS_PORT;
use extensions::*;
use legacy::*;
use properties::*;
pub use resolve::{Resolved, resolve};

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

/// Whether and where a node keeps its state file: the record of how its
/// previous run ended, so that a start after a crash tells the peers to
/// flush for what that run may have accepted and never delivered
/// (`proto/PROTOCOL.md`, section 9.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateFile {
    /// Not said (`cachecast.state.file` unset): the sidecar keeps one at
    /// its default path; the library refuses to start until the embedder
    /// chooses ([`crate::MeshBuilder::state_file`]).
    Default,
    /// Kept at this path.
    At(PathBuf),
    /// None (`cachecast.state.file = none`): a run that crashed after
    /// accepting invalidations that no peer received, following a clean
    /// run, is taken by the peers for a clean restart, and they do not
    /// flush. The operator's explicit choice.
    Off,
}

impl StateFile {
    /// The path, when one is set.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StateFile::At(p) => Some(p),
            StateFile::Default | StateFile::Off => None,
        }
    }
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
    /// `cachecast.api.token.file`: the token the API's mutating calls
    /// must bear, when set.
    pub api_token: Option<PathBuf>,
    /// Replay buffer per peer, in invalidations.
    pub buffer: usize,
    /// `cachecast.webhook.url`, if set.
    pub webhook_url: Option<String>,
    /// `cachecast.state.file`: where the node records how its run ended,
    /// so that a start after a crash flushes its peers.
    pub state_file: StateFile,
    /// The Redis-protocol pub/sub endpoint, when it is on.
    pub resp: Option<RespConfig>,
    /// Why the endpoint is on or off, in a sentence `check` prints.
    pub resp_why: String,
    /// The flush hook (`cachecast.flush.url`), if set.
    pub flush_hook: Option<FlushHookConfig>,
    /// The values read that came from environment variables, in file
    /// order, for `check` to show.
    pub from_environment: Vec<FromEnvironment>,
}

/// A value of the file that `${VAR}` substitution changed, as `check`
/// shows it: environment variables never change a value unseen.
#[derive(Clone, PartialEq, Eq)]
pub struct FromEnvironment {
    /// The key.
    pub key: String,
    /// Its line.
    pub line: usize,
    /// The variables its value refers to.
    pub variables: Vec<String>,
    /// The value after substitution, or `None` for a secret
    /// (`redis.password`, `cachecast.secret`), which is never shown.
    pub value: Option<String>,
    /// Whether the value is empty (shown even for a secret).
    pub empty: bool,
}

impl fmt::Debug for FromEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromEnvironment")
            .field("key", &self.key)
            .field("line", &self.line)
            .field("variables", &self.variables)
            .field("value", &self.value.as_deref().unwrap_or("<redacted>"))
            .finish()
    }
}

impl fmt::Display for FromEnvironment {
    /// `key = value (line N, from ${VAR})`, a secret as `********`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match (&self.value, self.empty) {
            (_, true) => "\"\"",
            (Some(v), false) => v.as_str(),
            (None, false) => "********",
        };
        let from = self
            .variables
            .iter()
            .map(|v| format!("${{{v}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        write!(
            f,
            "{} = {value} (line {}, from {from})",
            self.key, self.line
        )
    }
}

/// Keys whose values are secrets: never printed.
const SECRET_KEYS: [&str; 2] = ["redis.password", "cachecast.secret"];

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
    /// Connections open at once (`cachecast.resp.max.connections`).
    pub max_connections: usize,
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
            .field("max_connections", &self.max_connections)
            .field("bind_explicit", &self.bind_explicit)
            .field("source", &self.source)
            .finish()
    }
}

/// Redis-protocol connections open at once by default: room for six
/// Redisson clients (25 connections each at start) and DHIS 2 several
/// times over; Redis itself defaults to 10,000.
pub const DEFAULT_RESP_CONNECTIONS: usize = 1024;

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
            api_token: None,
            buffer: DEFAULT_BUFFER,
            webhook_url: None,
            state_file: StateFile::Default,
            resp: None,
            resp_why: "off (built in code)".into(),
            flush_hook: None,
            from_environment: Vec::new(),
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

/// Reads and parses a configuration file, `${VAR}` taken from the
/// process environment.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_with_env(path, &process_environment)
}

/// Reads and parses a configuration file, `${VAR}` looked up in `env`.
pub fn load_with_env(path: &Path, env: Lookup<'_>) -> Result<Loaded, ConfigError> {
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
    let loaded = parse_bytes_with_env(&bytes, env)?;
    // A secret written in the file is as private as the file: one every
    // user can read gives every user the cluster's secret.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if matches!(loaded.config.secret, Some(SecretSource::Inline(_)))
            && meta.permissions().mode() & 0o004 != 0
        {
            return Err(ConfigError::Invalid {
                errors: vec![Problem {
                    severity: Severity::Error,
                    key: Some("cachecast.secret".into()),
                    line: None,
                    message: format!(
                        "{} holds the shared secret and is readable by every user; run \
                         `chmod o-r {}` (or move the secret to cachecast.secret.file, mode 600)",
                        path.display(),
                        path.display()
                    ),
                }],
                warnings: loaded.warnings,
            });
        }
    }
    Ok(loaded)
}

/// Parses a configuration from text, `${VAR}` taken from the process
/// environment.
pub fn parse_str(text: &str) -> Result<Loaded, ConfigError> {
    parse_bytes(text.as_bytes())
}

/// Parses a configuration from text, `${VAR}` looked up in `env`.
pub fn parse_str_with_env(text: &str, env: Lookup<'_>) -> Result<Loaded, ConfigError> {
    parse_bytes_with_env(text.as_bytes(), env)
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
    "cachecast.api.token.file",
    "cachecast.buffer",
    "cachecast.webhook.url",
    "cachecast.webhook.remote",
    "cachecast.state.file",
    "cachecast.resp.port",
    "cachecast.resp.bind",
    "cachecast.resp.max.connections",
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

/// Parses a configuration from the file's bytes, `${VAR}` taken from the
/// process environment.
pub fn parse_bytes(bytes: &[u8]) -> Result<Loaded, ConfigError> {
    parse_bytes_with_env(bytes, &process_environment)
}

/// Parses a configuration from the file's bytes, `${VAR}` looked up in
/// `env`.
pub fn parse_bytes_with_env(bytes: &[u8], env: Lookup<'_>) -> Result<Loaded, ConfigError> {
    let mut report = Report::default();
    let mut keys = read_keys(bytes, env, &mut report);
    unresolved_variables(&mut keys, &mut report);
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

/// Whether the sidecar uses the value of this key of ours (`cluster.*`,
/// `cachecast.*`): not for an unknown key, an instance out of range, or
/// an RMI object port.
fn value_used(key: &str) -> bool {
    match instance_key(key) {
        InstanceKey::Field(n, field) => {
            n < MAX_INSTANCES as u64 && field != "cache.remote.object.port"
        }
        InstanceKey::Other => {
            KNOWN_KEYS.contains(&key)
                && !key.ends_with(".remote.object.port")
                && !REDIS_KEYS.contains(&key)
        }
    }
}

/// What `${VAR}` substitution left as written in a value of ours is an
/// error, and the value is not used. DHIS 2 would read `${X}` as it is
/// written, which as a host name, port or secret is never what was meant.
/// (`redis.*` keys are DHIS 2's: see [`resp_endpoint`].)
fn unresolved_variables(keys: &mut BTreeMap<String, Entry>, report: &mut Report) {
    for (key, entry) in keys.iter_mut() {
        if entry.unresolved.is_empty() || !value_used(key) {
            continue;
        }
        for p in &entry.unresolved {
            report.error(key, Some(entry.line), p.clone());
        }
        entry.broken = true;
    }
}

/// The values read that came from the environment, secrets masked.
fn from_environment(keys: &BTreeMap<String, Entry>) -> Vec<FromEnvironment> {
    let mut found: Vec<FromEnvironment> = keys
        .iter()
        .filter(|(k, e)| {
            !e.variables.is_empty()
                && !e.broken
                && (value_used(k) || REDIS_KEYS.contains(&k.as_str()))
        })
        .map(|(k, e)| FromEnvironment {
            key: k.clone(),
            line: e.line,
            variables: e.variables.clone(),
            value: (!SECRET_KEYS.contains(&k.as_str())).then(|| e.value.clone()),
            empty: e.value.is_empty(),
        })
        .collect();
    found.sort_by_key(|f| f.line);
    found
}

/// DHIS 2 2.29 to 2.40 start Ehcache RMI replication when
/// `cluster.hostname` and `cluster.members` are both set
/// (`DefaultDhisConfigurationProvider.isClusterEnabled`), its listener on
/// `cluster.cache.port`: the port the sidecar takes from the same keys.
/// 2.41 removed RMI; the `cluster.instanceN` keys were read up to 2.28
/// only, so that form is safe on every version the drop-in serves.
fn rmi_warning(keys: &BTreeMap<String, Entry>, port: u16, report: &mut Report) {
    let set = |k: &str| keys.get(k).is_some_and(|e| e.present());
    if !(set("cluster.hostname") && set("cluster.members")) {
        return;
    }
    report.warn(
        "cluster.hostname",
        keys.get("cluster.hostname").map(|e| e.line),
        format!(
            "with cluster.members, DHIS 2 2.38 to 2.40 starts Ehcache RMI replication listening on port {port}, the port this sidecar listens on: \
             DHIS 2 fails to start beside a running sidecar (or the sidecar beside DHIS 2). For those versions write the same hosts and ports \
             as cluster.instanceN keys, which DHIS 2 ignores (`check` prints them); 2.41 and later need no change"
        ),
    );
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
            // DHIS 2's keys, checked where the endpoint is decided, as
            // DHIS 2 reads them (an empty one included).
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
    if let Some((nodes, format)) = &cluster
        && let Some(node) = &nodes.node
    {
        if *format == Format::Members {
            rmi_warning(keys, node.addr.port, report);
        }
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
        api_token: ext.api_token,
        buffer: ext.buffer,
        webhook_url: ext.webhook_url,
        state_file: ext.state_file,
        resp,
        resp_why,
        flush_hook: ext.flush_hook,
        from_environment: from_environment(keys),
    })
}

#[cfg(test)]
mod reference {
    //! docs/configuration.md against the parser: the key table is what
    //! the readers use, and the doc lists exactly that table.
    use super::*;
    use std::collections::BTreeSet;

    const DOC: &str = include_str!("../../docs/configuration.md");
    const SOURCES: [(&str, &str); 6] = [
        ("mod.rs", include_str!("mod.rs")),
        ("environment.rs", include_str!("environment.rs")),
        ("legacy.rs", include_str!("legacy.rs")),
        ("extensions.rs", include_str!("extensions.rs")),
        ("properties.rs", include_str!("properties.rs")),
        ("resolve.rs", include_str!("resolve.rs")),
    ];

    fn ours(key: &str) -> bool {
        key.starts_with(CLUSTER) || key.starts_with(OURS) || key.starts_with("redis.")
    }

    fn table() -> BTreeSet<&'static str> {
        KNOWN_KEYS.iter().chain(REDIS_KEYS).copied().collect()
    }

    /// The first column of the doc's tables.
    fn documented() -> BTreeSet<&'static str> {
        DOC.lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .filter(|k| ours(k))
            .collect()
    }

    #[test]
    fn the_doc_lists_every_key_read_and_no_other() {
        let (doc, table) = (documented(), table());
        let undocumented: Vec<_> = table.difference(&doc).collect();
        let unread: Vec<_> = doc.difference(&table).collect();
        assert!(
            undocumented.is_empty(),
            "read but not in docs/configuration.md: {undocumented:?}"
        );
        assert!(
            unread.is_empty(),
            "in docs/configuration.md but not read: {unread:?}"
        );
    }

    /// A reader that names a key the table lacks would read a key that
    /// neither the doc nor the misspelling check knows.
    #[test]
    fn every_key_the_parser_names_is_in_the_table() {
        let table = table();
        let mut strays = Vec::new();
        for (file, src) in SOURCES {
            for (at, _) in src.match_indices('"') {
                let rest = &src[at + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.'))
                    .unwrap_or(rest.len());
                let key = &rest[..end];
                // Prefixes, and keys built with a number (`instance{n}`).
                if !ours(key) || key.ends_with('.') || rest[end..].starts_with('{') {
                    continue;
                }
                let normalised = match key.strip_prefix("cluster.instance") {
                    Some(tail) if tail.starts_with(|c: char| c.is_ascii_digit()) => {
                        format!("cluster.instanceN{}", &tail[1..])
                    }
                    _ => key.to_string(),
                };
                // A name's stem (`cluster.instance`, in messages
                // `cluster.instance0`) is part of a key of the table.
                if !table.iter().any(|k| k.starts_with(normalised.as_str())) {
                    strays.push(format!("{file}: {key}"));
                }
            }
        }
        assert!(strays.is_empty(), "keys outside the table: {strays:?}");
    }
}
