//! The commands of the Redis-protocol endpoint, answered as Redis 7.2
//! answers them: the same replies, the same error texts, the same order
//! of checks (unknown command, arity, authentication, subscribed context),
//! because clients branch on them.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::Shared;
use super::broker::{Kind, Outbox};
use super::clients::Client;
use super::parse::MAX_KEPT_ARG;
use crate::wire::MAX_STRING;

/// The version reported by `HELLO`: the Redis release whose behaviour the
/// endpoint follows (`CLIENT SETINFO` came with 7.2).
pub const REDIS_VERSION: &str = "7.2.0";

/// Channels and patterns one connection may subscribe to. Redis has no
/// such bound; here every name is held in memory for as long as it is
/// subscribed, and an application uses a handful (DHIS 2: one).
pub const MAX_SUBSCRIPTIONS: usize = 10_000;
/// Longest pattern: every message is matched against every pattern, at a
/// cost of pattern length × channel length.
pub const MAX_PATTERN: usize = 1024;

/// What the connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Read the next command.
    Continue,
    /// Write what is queued, then close (QUIT).
    Close,
}

/// A command's static facts, as in Redis's command table.
struct Spec {
    name: &'static str,
    /// Arity as Redis counts it: exact when positive, at least when negative.
    arity: i32,
    /// May run before authentication.
    no_auth: bool,
    /// May run in RESP2 subscribed mode.
    in_subscribed: bool,
    /// Subcommands, for container commands (their `name` without the
    /// container's).
    subs: &'static [Spec],
    /// What `COMMAND INFO` reports, as Redis 7.2 reports it: clients act on
    /// these (redis-py finds a command's keys from its flags and key
    /// specs), so they are Redis's, not a description of this endpoint.
    facts: Facts,
}

/// `COMMAND INFO`'s flags, ACL categories (implicit ones included, in
/// Redis's category order), tips, and the key spec of the shard channel
/// commands: `Some(lastkey)` of a range starting at argument 1.
#[derive(Clone, Copy)]
struct Facts {
    flags: &'static [&'static str],
    acl: &'static [&'static str],
    tips: &'static [&'static str],
    channel_keys: Option<i32>,
}

const fn facts(flags: &'static [&'static str], acl: &'static [&'static str]) -> Facts {
    Facts {
        flags,
        acl,
        tips: &[],
        channel_keys: None,
    }
}

const fn spec(name: &'static str, arity: i32, facts: Facts) -> Spec {
    Spec {
        name,
        arity,
        no_auth: false,
        in_subscribed: false,
        subs: &[],
        facts,
    }
}

// The facts shared by several commands (src/commands/*.json of Redis
// 7.2.6; 7.0.15 gives the same for every command here unless noted).
const CONNECTION_FAST: Facts = facts(&["loading", "stale", "fast"], &["@fast", "@connection"]);
const NO_AUTH: Facts = facts(
    &[
        "noscript",
        "loading",
        "stale",
        "fast",
        "no_auth",
        "allow_busy",
    ],
    &["@fast", "@connection"],
);
const SUBSCRIBING: Facts = facts(
    &["pubsub", "noscript", "loading", "stale"],
    &["@pubsub", "@slow"],
);
const PUBLISHING: Facts = facts(
    &["pubsub", "loading", "stale", "fast"],
    &["@pubsub", "@fast"],
);
const SHARD_SUBSCRIBING: Facts = Facts {
    channel_keys: Some(-1),
    ..SUBSCRIBING
};
const PUBSUB_SUB: Facts = facts(&["pubsub", "loading", "stale"], &["@pubsub", "@slow"]);
const CLIENT_SUB: Facts = facts(&["noscript", "loading", "stale"], &["@slow", "@connection"]);
const CLIENT_ADMIN: Facts = facts(
    &["admin", "noscript", "loading", "stale"],
    &["@admin", "@slow", "@dangerous", "@connection"],
);
const COMMAND_SUB: Facts = facts(&["loading", "stale"], &["@slow", "@connection"]);
const CONTAINER: Facts = facts(&[], &["@slow"]);
/// `CLIENT SETNAME` and `SETINFO`: 7.2 gives them these tips (7.0 gives
/// SETNAME none and lacks SETINFO).
const ALL_NODES: &[&str] = &["request_policy:all_nodes", "response_policy:all_succeeded"];
const OUTPUT_ORDER: &[&str] = &["nondeterministic_output_order"];
const OUTPUT: &[&str] = &["nondeterministic_output"];

/// Every command the endpoint knows; anything else is an unknown command.
static COMMANDS: &[Spec] = &[
    Spec {
        in_subscribed: true,
        ..spec(
            "ping",
            -1,
            Facts {
                tips: &["request_policy:all_shards", "response_policy:all_succeeded"],
                ..facts(&["fast"], &["@fast", "@connection"])
            },
        )
    },
    spec("echo", 2, CONNECTION_FAST),
    Spec {
        no_auth: true,
        ..spec("auth", -2, NO_AUTH)
    },
    Spec {
        no_auth: true,
        ..spec("hello", -1, NO_AUTH)
    },
    spec("select", 2, CONNECTION_FAST),
    Spec {
        subs: &[
            spec(
                "setname",
                3,
                Facts {
                    tips: ALL_NODES,
                    ..CLIENT_SUB
                },
            ),
            spec("getname", 2, CLIENT_SUB),
            spec(
                "setinfo",
                4,
                Facts {
                    tips: ALL_NODES,
                    ..CLIENT_SUB
                },
            ),
            spec("id", 2, CLIENT_SUB),
            spec(
                "info",
                2,
                Facts {
                    tips: OUTPUT,
                    ..CLIENT_SUB
                },
            ),
            spec(
                "list",
                -2,
                Facts {
                    tips: OUTPUT,
                    ..CLIENT_ADMIN
                },
            ),
            spec("kill", -3, CLIENT_ADMIN),
            spec("help", 2, COMMAND_SUB),
        ],
        ..spec("client", -2, CONTAINER)
    },
    Spec {
        no_auth: true,
        in_subscribed: true,
        ..spec("quit", -1, NO_AUTH)
    },
    Spec {
        no_auth: true,
        in_subscribed: true,
        ..spec("reset", 1, NO_AUTH)
    },
    Spec {
        subs: &[
            spec("count", 2, COMMAND_SUB),
            spec(
                "docs",
                -2,
                Facts {
                    tips: OUTPUT_ORDER,
                    ..COMMAND_SUB
                },
            ),
            spec(
                "info",
                -2,
                Facts {
                    tips: OUTPUT_ORDER,
                    ..COMMAND_SUB
                },
            ),
            spec(
                "list",
                -2,
                Facts {
                    tips: OUTPUT_ORDER,
                    ..COMMAND_SUB
                },
            ),
            spec("help", 2, COMMAND_SUB),
        ],
        ..spec(
            "command",
            -1,
            Facts {
                tips: OUTPUT_ORDER,
                ..COMMAND_SUB
            },
        )
    },
    Spec {
        in_subscribed: true,
        ..spec("subscribe", -2, SUBSCRIBING)
    },
    Spec {
        in_subscribed: true,
        ..spec("unsubscribe", -1, SUBSCRIBING)
    },
    Spec {
        in_subscribed: true,
        ..spec("psubscribe", -2, SUBSCRIBING)
    },
    Spec {
        in_subscribed: true,
        ..spec("punsubscribe", -1, SUBSCRIBING)
    },
    spec("publish", 3, PUBLISHING),
    Spec {
        in_subscribed: true,
        ..spec("ssubscribe", -2, SHARD_SUBSCRIBING)
    },
    Spec {
        in_subscribed: true,
        ..spec("sunsubscribe", -1, SHARD_SUBSCRIBING)
    },
    spec(
        "spublish",
        3,
        Facts {
            channel_keys: Some(0),
            ..PUBLISHING
        },
    ),
    Spec {
        subs: &[
            spec("channels", -2, PUBSUB_SUB),
            spec("numsub", -2, PUBSUB_SUB),
            spec("numpat", 2, PUBSUB_SUB),
            spec("shardchannels", -2, PUBSUB_SUB),
            spec("shardnumsub", -2, PUBSUB_SUB),
            spec("help", 2, facts(&["loading", "stale"], &["@slow"])),
        ],
        ..spec("pubsub", -2, CONTAINER)
    },
    spec(
        "info",
        -1,
        Facts {
            tips: &[
                "nondeterministic_output",
                "request_policy:all_shards",
                "response_policy:special",
            ],
            ..facts(&["loading", "stale"], &["@slow", "@dangerous"])
        },
    ),
];

fn arity_ok(arity: i32, argc: usize) -> bool {
    if arity >= 0 {
        argc == arity as usize
    } else {
        argc >= (-arity) as usize
    }
}

/// Replies, encoded for the connection's protocol version.
pub struct Reply<'a> {
    out: &'a mut BytesMut,
    resp3: bool,
}

impl Reply<'_> {
    fn line(&mut self, prefix: u8, text: &[u8]) {
        self.out.put_u8(prefix);
        // A line cannot hold a line break (Redis maps them to spaces).
        self.out.extend(
            text.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.out.put_slice(b"\r\n");
    }
    fn simple(&mut self, s: &str) {
        self.line(b'+', s.as_bytes());
    }
    /// An error; `text` starts with its code (`ERR`, `NOAUTH`, …).
    pub fn error(&mut self, text: &str) {
        self.line(b'-', text.as_bytes());
    }
    fn int(&mut self, n: i64) {
        self.line(b':', n.to_string().as_bytes());
    }
    fn bulk(&mut self, b: &[u8]) {
        self.out.put_u8(b'$');
        self.out.put_slice(b.len().to_string().as_bytes());
        self.out.put_slice(b"\r\n");
        self.out.put_slice(b);
        self.out.put_slice(b"\r\n");
    }
    /// Text for people: a verbatim string in RESP3, a bulk string in
    /// RESP2 (Redis's `addReplyVerbatim` with `txt`).
    fn verbatim(&mut self, text: &[u8]) {
        if !self.resp3 {
            return self.bulk(text);
        }
        self.out.put_u8(b'=');
        self.out.put_slice((text.len() + 4).to_string().as_bytes());
        self.out.put_slice(b"\r\ntxt:");
        self.out.put_slice(text);
        self.out.put_slice(b"\r\n");
    }
    fn null(&mut self) {
        self.out
            .put_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }
    fn array(&mut self, n: usize) {
        self.line(b'*', n.to_string().as_bytes());
    }
    fn map(&mut self, n: usize) {
        if self.resp3 {
            self.line(b'%', n.to_string().as_bytes());
        } else {
            self.array(n * 2);
        }
    }
    fn set(&mut self, n: usize) {
        if self.resp3 {
            self.line(b'~', n.to_string().as_bytes());
        } else {
            self.array(n);
        }
    }
    fn push(&mut self, n: usize) {
        if self.resp3 {
            self.line(b'>', n.to_string().as_bytes());
        } else {
            self.array(n);
        }
    }
}

/// Quotes arguments for an unknown-command error as Redis does: each as
/// `'arg' `, until 128 bytes are written.
fn args_beginning(args: &[Bytes]) -> String {
    let mut out = String::new();
    for a in args {
        if out.len() >= 128 {
            break;
        }
        let room = 128 - out.len();
        let text = String::from_utf8_lossy(&a[..a.len().min(room)]);
        out.push('\'');
        out.push_str(&text);
        out.push_str("' ");
    }
    out
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// At most `n` bytes of `b`, as text (for `%.128s` in Redis's messages).
fn clip(b: &[u8], n: usize) -> String {
    lossy(&b[..b.len().min(n)])
}

/// One client connection's state.
pub struct Session {
    /// Its `CLIENT ID`.
    pub id: u64,
    resp3: bool,
    authed: bool,
    /// Since when the client has had to authenticate and has not (at
    /// connect, and after `RESET`).
    unauthenticated_since: Option<Instant>,
    name: Option<Bytes>,
    channels: HashSet<Bytes>,
    /// In subscription order, which `PUNSUBSCRIBE` without arguments
    /// follows (as Redis does); a client has few patterns.
    patterns: Vec<Bytes>,
    /// `SSUBSCRIBE`d shard channels.
    shards: HashSet<Bytes>,
    /// Where its output goes.
    pub outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    /// What `CLIENT LIST` shows of it.
    me: Arc<Client>,
    /// `CLIENT SETINFO`.
    lib_name: Option<Bytes>,
    lib_ver: Option<Bytes>,
    /// Set when it killed itself (`CLIENT KILL`): closed after the reply.
    close_after_reply: bool,
}

impl Session {
    /// A new connection's session.
    pub fn new(me: Arc<Client>, outbox: Arc<Outbox>, shared: Arc<Shared>) -> Self {
        Session {
            id: me.id,
            me,
            lib_name: None,
            lib_ver: None,
            close_after_reply: false,
            resp3: false,
            authed: shared.password.is_none(),
            unauthenticated_since: shared.password.is_some().then(Instant::now),
            name: None,
            channels: HashSet::new(),
            patterns: Vec::new(),
            shards: HashSet::new(),
            outbox,
            shared,
        }
    }

    /// A reply into `out`, in this connection's protocol version.
    fn reply<'a>(&self, out: &'a mut BytesMut) -> Reply<'a> {
        Reply {
            out,
            resp3: self.resp3,
        }
    }

    /// Whether the client has authenticated (or needs not).
    pub fn authed(&self) -> bool {
        self.authed
    }

    /// Since when the client has owed its authentication, if it does.
    pub fn unauthenticated_since(&self) -> Option<Instant> {
        self.unauthenticated_since.filter(|_| !self.authed)
    }

    /// Channels and patterns: the count (P)SUBSCRIBE replies give.
    fn subscriptions(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }

    /// The count a reply of `kind` gives: shard channels are counted
    /// apart, as in Redis.
    fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Shard => self.shards.len(),
            _ => self.subscriptions(),
        }
    }

    /// Whether it is subscribed to anything: in RESP2, in subscribed mode.
    fn subscribed(&self) -> bool {
        self.subscriptions() + self.shards.len() > 0
    }

    /// The connection ended without unsubscribing (it closed, failed, was
    /// cut off or timed out): its client may be back soon having missed
    /// messages, so the hook covers them (see [`Broker::lost`]).
    ///
    /// [`Broker::lost`]: super::broker::Broker::lost
    pub fn end(&mut self) {
        let mut cover = false;
        for c in self.channels.drain() {
            cover |= self.shared.broker.lost(Kind::Channel, &c, self.id);
        }
        for p in self.patterns.drain(..) {
            cover |= self.shared.broker.lost(Kind::Pattern, &p, self.id);
        }
        for c in self.shards.drain() {
            cover |= self.shared.broker.lost(Kind::Shard, &c, self.id);
        }
        if cover && let Some(hook) = &self.shared.hook {
            hook.trigger_for_subscriber("a subscriber's connection ended while others stayed subscribed: one of them may be that client, back after missing messages");
        }
    }

    /// Drops every subscription (`RESET`, `QUIT`: the client asked).
    pub fn unsubscribe_all(&mut self) {
        for c in self.channels.drain() {
            self.shared.broker.unsubscribe(Kind::Channel, &c, self.id);
        }
        for p in self.patterns.drain(..) {
            self.shared.broker.unsubscribe(Kind::Pattern, &p, self.id);
        }
        for c in self.shards.drain() {
            self.shared.broker.unsubscribe(Kind::Shard, &c, self.id);
        }
    }

    /// Answers a command too large to keep.
    pub fn too_large(&mut self, out: &mut BytesMut, name: Option<&[u8]>, largest: usize) {
        let mut r = self.reply(out);
        let name = name.map(lossy).unwrap_or_default().to_ascii_lowercase();
        r.error(&format!(
            "ERR '{name}' has an argument of {largest} bytes; this endpoint takes at most {MAX_KEPT_ARG} (the mesh carries strings of at most {MAX_STRING} bytes); nothing was done"
        ));
    }

    /// Runs one command, appending its reply to `out`. Replies that must not
    /// be overtaken by messages (subscription confirmations) go to the
    /// outbox directly, after what `out` holds.
    pub fn execute(&mut self, out: &mut BytesMut, args: Vec<Bytes>) -> After {
        let (after, name) = self.run(out, &args);
        let mut v = self.me.view();
        v.last = Some(Instant::now().into_std());
        if name.is_some() {
            v.cmd = name;
        }
        v.name = self.name.clone();
        v.sub = self.channels.len();
        v.psub = self.patterns.len();
        v.ssub = self.shards.len();
        v.resp = if self.resp3 { 3 } else { 2 };
        v.lib_name = self.lib_name.clone();
        v.lib_ver = self.lib_ver.clone();
        v.omem = self.outbox.queued();
        drop(v);
        if self.close_after_reply {
            return After::Close;
        }
        after
    }

    /// Runs one command; also returns the full name of a known one, for
    /// `CLIENT LIST`'s `cmd=`.
    fn run(&mut self, out: &mut BytesMut, args: &[Bytes]) -> (After, Option<Cow<'static, str>>) {
        let Some(first) = args.first() else {
            return (After::Continue, None);
        };
        self.shared.stats.commands.fetch_add(1, Ordering::Relaxed);
        // QUIT comes before every check, as in Redis.
        if first.eq_ignore_ascii_case(b"quit") {
            self.reply(out).simple("OK");
            return (After::Close, Some(Cow::Borrowed("quit")));
        }
        let mut r = self.reply(out);
        // Compared without a lowercased copy: this runs for every PUBLISH.
        let Some(spec) = COMMANDS
            .iter()
            .find(|c| c.name.as_bytes().eq_ignore_ascii_case(first))
        else {
            r.error(&format!(
                "ERR unknown command '{}', with args beginning with: {}",
                clip(first, 128),
                args_beginning(&args[1..])
            ));
            return (After::Continue, None);
        };
        let mut full = Cow::Borrowed(spec.name);
        let mut arity = spec.arity;
        if !spec.subs.is_empty() && args.len() >= 2 {
            match spec
                .subs
                .iter()
                .find(|s| s.name.as_bytes().eq_ignore_ascii_case(&args[1]))
            {
                Some(s) => {
                    full = Cow::Owned(format!("{}|{}", spec.name, s.name));
                    arity = s.arity;
                }
                None => {
                    r.error(&format!(
                        "ERR unknown subcommand '{}'. Try {} HELP.",
                        clip(&args[1], 128),
                        spec.name.to_ascii_uppercase()
                    ));
                    return (After::Continue, None);
                }
            }
        }
        if !arity_ok(arity, args.len()) {
            r.error(&format!(
                "ERR wrong number of arguments for '{full}' command"
            ));
            return (After::Continue, Some(full));
        }
        if !self.authed && !spec.no_auth {
            r.error("NOAUTH Authentication required.");
            return (After::Continue, Some(full));
        }
        if !self.resp3 && self.subscribed() && !spec.in_subscribed {
            r.error(&format!(
                "ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
            ));
            return (After::Continue, Some(full));
        }
        match spec.name {
            "ping" => self.ping(r, args),
            "echo" => r.bulk(&args[1]),
            "auth" => self.auth(r, args),
            "hello" => self.hello(out_of(r), args),
            "select" => select(r, &args[1]),
            "client" => self.client(r, args),
            "reset" => self.reset(r),
            "command" => command(r, args),
            "subscribe" => self.subscribe(out_of(r), Kind::Channel, &args[1..]),
            "psubscribe" => self.subscribe(out_of(r), Kind::Pattern, &args[1..]),
            "unsubscribe" => self.unsubscribe(r, Kind::Channel, &args[1..]),
            "punsubscribe" => self.unsubscribe(r, Kind::Pattern, &args[1..]),
            "ssubscribe" => self.subscribe(out_of(r), Kind::Shard, &args[1..]),
            "sunsubscribe" => self.unsubscribe(r, Kind::Shard, &args[1..]),
            // One namespace: a shard channel is the channel of its name.
            "publish" | "spublish" => self.publish(r, &args[1], &args[2]),
            "pubsub" => self.pubsub(r, args),
            "info" => {
                let text = super::info::render(&self.shared.info_facts(), &args[1..]);
                r.verbatim(text.as_bytes());
            }
            _ => r.error("ERR internal: command without a handler"),
        }
        (After::Continue, Some(full))
    }

    fn ping(&self, mut r: Reply<'_>, args: &[Bytes]) {
        if args.len() > 2 {
            r.error("ERR wrong number of arguments for 'ping' command");
            return;
        }
        if !self.resp3 && self.subscribed() {
            // In RESP2 subscribed mode a reply must look like a message.
            r.array(2);
            r.bulk(b"pong");
            r.bulk(args.get(1).map_or(&b""[..], |a| &a[..]));
            return;
        }
        match args.get(1) {
            None => r.simple("PONG"),
            Some(m) => r.bulk(m),
        }
    }

    /// Checks a user and password; `Err` holds the error reply.
    fn check_password(&self, user: &[u8], pass: &[u8]) -> Result<(), &'static str> {
        let wrong = "WRONGPASS invalid username-password pair or user is disabled.";
        if user != b"default" {
            return Err(wrong);
        }
        match &self.shared.password {
            // The default user without a password takes any.
            None => Ok(()),
            Some(p) if same_secret(p.as_bytes(), pass) => Ok(()),
            Some(_) => Err(wrong),
        }
    }

    fn auth(&mut self, mut r: Reply<'_>, args: &[Bytes]) {
        let result = match args.len() {
            2 => {
                if self.shared.password.is_none() {
                    r.error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?");
                    return;
                }
                self.check_password(b"default", &args[1])
            }
            3 => self.check_password(&args[1], &args[2]),
            _ => {
                r.error("ERR syntax error");
                return;
            }
        };
        match result {
            Ok(()) => {
                self.authed = true;
                r.simple("OK");
            }
            Err(e) => {
                self.shared
                    .stats
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                r.error(e);
            }
        }
    }

    fn hello(&mut self, out: &mut BytesMut, args: &[Bytes]) {
        let mut r = self.reply(out);
        let mut version = None;
        if let Some(v) = args.get(1) {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
            {
                None => {
                    r.error("ERR Protocol version is not an integer or out of range");
                    return;
                }
                Some(v) if !(2..=3).contains(&v) => {
                    r.error("NOPROTO unsupported protocol version");
                    return;
                }
                Some(v) => version = Some(v),
            }
        }
        let (mut auth, mut name) = (None, None);
        let mut j = 2;
        while j < args.len() {
            let more = args.len() - 1 - j;
            let opt = args[j].to_ascii_lowercase();
            if opt == b"auth" && more >= 2 {
                auth = Some((&args[j + 1], &args[j + 2]));
                j += 3;
            } else if opt == b"setname" && more >= 1 {
                name = Some(&args[j + 1]);
                j += 2;
            } else {
                r.error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    lossy(&args[j])
                ));
                return;
            }
        }
        if let Some((user, pass)) = auth {
            if let Err(e) = self.check_password(user, pass) {
                self.shared
                    .stats
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                r.error(e);
                return;
            }
            self.authed = true;
        }
        if !self.authed {
            r.error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
            return;
        }
        if let Some(n) = name {
            if let Err(e) = valid_name(n) {
                r.error(e);
                return;
            }
            self.name = (!n.is_empty()).then(|| Bytes::copy_from_slice(n));
        }
        if let Some(v) = version {
            self.resp3 = v == 3;
            self.outbox.set_resp3(self.resp3);
        }
        let mut r = self.reply(out);
        r.map(7);
        r.bulk(b"server");
        r.bulk(b"redis");
        r.bulk(b"version");
        r.bulk(REDIS_VERSION.as_bytes());
        r.bulk(b"proto");
        r.int(if self.resp3 { 3 } else { 2 });
        r.bulk(b"id");
        r.int(self.id as i64);
        r.bulk(b"mode");
        r.bulk(b"standalone");
        r.bulk(b"role");
        r.bulk(b"master");
        r.bulk(b"modules");
        r.array(0);
    }

    fn client(&mut self, mut r: Reply<'_>, args: &[Bytes]) {
        match args[1].to_ascii_lowercase().as_slice() {
            b"setname" => match valid_name(&args[2]) {
                Ok(()) => {
                    self.name = (!args[2].is_empty()).then(|| Bytes::copy_from_slice(&args[2]));
                    r.simple("OK");
                }
                Err(e) => r.error(e),
            },
            b"getname" => match &self.name {
                Some(n) => r.bulk(n),
                None => r.null(),
            },
            b"setinfo" => {
                let attr = args[2].to_ascii_lowercase();
                let slot = if attr == b"lib-name" {
                    &mut self.lib_name
                } else if attr == b"lib-ver" {
                    &mut self.lib_ver
                } else {
                    r.error(&format!("ERR Unrecognized option '{}'", lossy(&args[2])));
                    return;
                };
                // CLIENT LIST's fields are split at spaces.
                if valid_name(&args[3]).is_err() {
                    r.error(&format!(
                        "ERR {} cannot contain spaces, newlines or special characters.",
                        lossy(&args[2])
                    ));
                    return;
                }
                *slot = (!args[3].is_empty()).then(|| Bytes::copy_from_slice(&args[3]));
                r.simple("OK");
            }
            b"id" => r.int(self.id as i64),
            b"info" => {
                // The line shows this command as the last one, as Redis's.
                self.me.view().cmd = Some(Cow::Borrowed("client|info"));
                let line = self.me.line(Instant::now().into_std()) + "\n";
                r.verbatim(line.as_bytes());
            }
            b"list" => self.client_list(r, args),
            b"kill" => self.client_kill(r, args),
            _ => help(
                r,
                "CLIENT",
                &[
                    "GETNAME",
                    "    Return the name of the current connection.",
                    "ID",
                    "    Return the ID of the current connection.",
                    "INFO",
                    "    Return information about the current client connection.",
                    "KILL <ip:port>",
                    "    Kill connection made from <ip:port>.",
                    "KILL <option> <value> [<option> <value> [...]]",
                    "    Kill connections. Options are:",
                    "    * ADDR (<ip:port>|<unixsocket>:0)",
                    "      Kill connections made from the specified address",
                    "    * LADDR (<ip:port>|<unixsocket>:0)",
                    "      Kill connections made to specified local address",
                    "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
                    "      Kill connections by type.",
                    "    * USER <username>",
                    "      Kill connections authenticated by <username>.",
                    "    * SKIPME (YES|NO)",
                    "      Skip killing current connection (default: yes).",
                    "LIST [options ...]",
                    "    Return information about client connections. Options:",
                    "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
                    "      Return clients of specified type.",
                    "SETINFO <option> <value>",
                    "    Set client meta attr. Options are:",
                    "    * LIB-NAME: the client lib name.",
                    "    * LIB-VER: the client lib version.",
                    "SETNAME <connection-name>",
                    "    Assign the name <connection-name> to the current connection.",
                ],
            ),
        }
    }

    /// `CLIENT LIST [TYPE type | ID id...]`, as Redis 7.2's clientCommand.
    fn client_list(&mut self, mut r: Reply<'_>, args: &[Bytes]) {
        self.me.view().cmd = Some(Cow::Borrowed("client|list"));
        let now = Instant::now().into_std();
        let all = self.shared.clients.all();
        let chosen: Vec<_> = if args.len() == 4 && args[2].eq_ignore_ascii_case(b"type") {
            match client_type(&args[3]) {
                Some(test) => all.into_iter().filter(|c| test(c.pubsub())).collect(),
                None => {
                    r.error(&format!("ERR Unknown client type '{}'", lossy(&args[3])));
                    return;
                }
            }
        } else if args.len() > 3 && args[2].eq_ignore_ascii_case(b"id") {
            let mut chosen = Vec::new();
            for a in &args[3..] {
                let Some(id) = integer(a) else {
                    r.error("ERR Invalid client ID");
                    return;
                };
                chosen.extend(
                    u64::try_from(id)
                        .ok()
                        .and_then(|id| self.shared.clients.get(id)),
                );
            }
            chosen
        } else if args.len() != 2 {
            r.error("ERR syntax error");
            return;
        } else {
            all
        };
        let mut text = String::new();
        for c in chosen {
            text.push_str(&c.line(now));
            text.push('\n');
        }
        r.verbatim(text.as_bytes());
    }

    /// `CLIENT KILL addr` (the old form, which may kill the caller) and
    /// `CLIENT KILL <filter> <value> ...`, as Redis 7.2's clientCommand.
    fn client_kill(&mut self, mut r: Reply<'_>, args: &[Bytes]) {
        let (mut addr, mut laddr, mut id, mut pubsub) = (None, None, None, None);
        let mut skipme = true;
        if args.len() == 3 {
            addr = Some(&args[2][..]);
            skipme = false;
        } else {
            let mut i = 2;
            while i < args.len() {
                let Some(value) = args.get(i + 1) else {
                    r.error("ERR syntax error");
                    return;
                };
                match args[i].to_ascii_lowercase().as_slice() {
                    b"id" => match integer(value).filter(|&n| n > 0) {
                        Some(n) => id = Some(n as u64),
                        None => {
                            r.error("ERR client-id should be greater than 0");
                            return;
                        }
                    },
                    b"type" => match client_type(value) {
                        Some(test) => pubsub = Some(test),
                        None => {
                            r.error(&format!("ERR Unknown client type '{}'", lossy(value)));
                            return;
                        }
                    },
                    b"addr" => addr = Some(&value[..]),
                    b"laddr" => laddr = Some(&value[..]),
                    // Every connection is the default user's.
                    b"user" if &value[..] == b"default" => {}
                    b"user" => {
                        r.error(&format!("ERR No such user '{}'", lossy(value)));
                        return;
                    }
                    b"skipme" if value.eq_ignore_ascii_case(b"yes") => skipme = true,
                    b"skipme" if value.eq_ignore_ascii_case(b"no") => skipme = false,
                    _ => {
                        r.error("ERR syntax error");
                        return;
                    }
                }
                i += 2;
            }
        }
        let mut killed = 0;
        for c in self.shared.clients.all() {
            if addr.is_some_and(|a| a != c.addr.to_string().as_bytes())
                || laddr.is_some_and(|a| a != c.laddr.to_string().as_bytes())
                || id.is_some_and(|id| id != c.id)
                || pubsub.is_some_and(|test| !test(c.pubsub()))
                || (c.id == self.id && skipme)
            {
                continue;
            }
            if c.id == self.id {
                self.close_after_reply = true;
            } else {
                c.kill.cancel();
            }
            killed += 1;
        }
        if args.len() == 3 {
            if killed == 0 {
                r.error("ERR No such client");
            } else {
                r.simple("OK");
            }
        } else {
            r.int(killed);
        }
    }

    fn reset(&mut self, mut r: Reply<'_>) {
        self.unsubscribe_all();
        self.resp3 = false;
        self.outbox.set_resp3(false);
        self.name = None;
        self.authed = self.shared.password.is_none();
        self.unauthenticated_since = (!self.authed).then(Instant::now);
        r.resp3 = false;
        r.simple("RESET");
    }

    fn subscribe(&mut self, out: &mut BytesMut, kind: Kind, names: &[Bytes]) {
        let verb: &[u8] = match kind {
            Kind::Channel => b"subscribe",
            Kind::Pattern => b"psubscribe",
            Kind::Shard => b"ssubscribe",
        };
        for name in names {
            // Nothing can be published to it: PUBLISH refuses it likewise.
            if kind != Kind::Pattern && std::str::from_utf8(name).is_err() {
                self.reply(out).error(
                    "ERR the channel must be UTF-8 text (the mesh carries strings); nothing was subscribed",
                );
                continue;
            }
            if kind == Kind::Pattern && name.len() > MAX_PATTERN {
                self.reply(out).error(&format!(
                    "ERR patterns are limited to {MAX_PATTERN} bytes here (this one has {})",
                    name.len()
                ));
                continue;
            }
            let known = match kind {
                Kind::Channel => self.channels.contains(name),
                Kind::Pattern => self.patterns.contains(name),
                Kind::Shard => self.shards.contains(name),
            };
            if !known && !self.shared.broker.has_room(name.len()) {
                self.reply(out)
                .error("ERR this sidecar holds as many subscriptions as it takes; nothing was subscribed");
                continue;
            }
            if !known && self.subscriptions() + self.shards.len() >= MAX_SUBSCRIPTIONS {
                self.reply(out).error(&format!(
                    "ERR at most {MAX_SUBSCRIPTIONS} channels and patterns per connection here"
                ));
                continue;
            }
            // Its own allocation: a slice would keep the whole read buffer
            // alive for as long as the subscription lasts.
            let name = &Bytes::copy_from_slice(name);
            let added = match kind {
                Kind::Channel => self.channels.insert(name.clone()),
                Kind::Pattern if self.patterns.contains(name) => false,
                Kind::Pattern => {
                    self.patterns.push(name.clone());
                    true
                }
                Kind::Shard => self.shards.insert(name.clone()),
            };
            let mut reply = BytesMut::new();
            let mut r = self.reply(&mut reply);
            r.push(3);
            r.bulk(verb);
            r.bulk(name);
            r.int(self.count(kind) as i64);
            if !added {
                out.extend_from_slice(&reply);
                continue;
            }
            // What is before it goes first; then the confirmation, queued
            // under the broker's lock so no message overtakes it.
            self.outbox.push(out.split().freeze());
            let first = self.shared.broker.subscribe(
                kind,
                name.clone(),
                self.id,
                &self.outbox,
                reply.freeze(),
            );
            if first && let Some(hook) = &self.shared.hook {
                hook.trigger_for_subscriber(&format!(
                    "{} {} has a new subscriber that may have missed messages (none was subscribed here, or one left without unsubscribing)",
                    match kind {
                        Kind::Channel => "channel",
                        Kind::Pattern => "pattern",
                        Kind::Shard => "shard channel",
                    },
                    clip(name, 200)
                ));
            }
        }
    }

    fn unsubscribe(&mut self, mut r: Reply<'_>, kind: Kind, names: &[Bytes]) {
        let verb: &[u8] = match kind {
            Kind::Channel => b"unsubscribe",
            Kind::Pattern => b"punsubscribe",
            Kind::Shard => b"sunsubscribe",
        };
        let names: Vec<Bytes> = if names.is_empty() {
            match kind {
                Kind::Channel => self.channels.iter().cloned().collect(),
                Kind::Pattern => self.patterns.clone(),
                Kind::Shard => self.shards.iter().cloned().collect(),
            }
        } else {
            names.to_vec()
        };
        if names.is_empty() {
            r.push(3);
            r.bulk(verb);
            r.null();
            r.int(self.count(kind) as i64);
            return;
        }
        for name in names {
            let removed = match kind {
                Kind::Channel => self.channels.remove(&name),
                Kind::Pattern => match self.patterns.iter().position(|p| *p == name) {
                    Some(i) => {
                        self.patterns.remove(i);
                        true
                    }
                    None => false,
                },
                Kind::Shard => self.shards.remove(&name),
            };
            if removed {
                self.shared.broker.unsubscribe(kind, &name, self.id);
            }
            r.push(3);
            r.bulk(verb);
            r.bulk(&name);
            r.int(self.count(kind) as i64);
        }
    }

    fn publish(&mut self, mut r: Reply<'_>, channel: &Bytes, message: &Bytes) {
        let (Ok(cache), Ok(key)) = (std::str::from_utf8(channel), std::str::from_utf8(message))
        else {
            r.error("ERR the channel and the message must be UTF-8 text (the mesh carries strings); nothing was sent");
            return;
        };
        // `invalidate` checks the mesh's limits and reuses the cache name's
        // allocation across messages.
        if let Err(e) = self.shared.mesh.invalidate(cache, key) {
            r.error(&format!("ERR {e}; nothing was sent"));
            return;
        }
        // A RESP3 client subscribed here gets its own message after the
        // replies before this one, and before this reply; for the others
        // the replies of a pipeline stay together, written at once.
        if self.subscribed() {
            self.outbox.push(r.out.split().freeze());
        }
        self.shared
            .broker
            .stats
            .published
            .fetch_add(1, Ordering::Relaxed);
        let n = self.shared.broker.publish(channel, message);
        r.int(n as i64);
    }

    fn pubsub(&mut self, mut r: Reply<'_>, args: &[Bytes]) {
        match args[1].to_ascii_lowercase().as_slice() {
            sub @ (b"channels" | b"shardchannels") => {
                if args.len() > 3 {
                    r.error(&format!(
                        "ERR unknown subcommand or wrong number of arguments for '{}'. Try PUBSUB HELP.",
                        clip(&args[1], 128)
                    ));
                    return;
                }
                let kind = if sub == b"channels" {
                    Kind::Channel
                } else {
                    Kind::Shard
                };
                let list = self
                    .shared
                    .broker
                    .channels(kind, args.get(2).map(|p| &p[..]));
                r.array(list.len());
                for c in list {
                    r.bulk(&c);
                }
            }
            sub @ (b"numsub" | b"shardnumsub") => {
                let kind = if sub == b"numsub" {
                    Kind::Channel
                } else {
                    Kind::Shard
                };
                r.array((args.len() - 2) * 2);
                for c in &args[2..] {
                    r.bulk(c);
                    r.int(self.shared.broker.numsub(kind, c) as i64);
                }
            }
            b"numpat" => r.int(self.shared.broker.numpat() as i64),
            _ => help(
                r,
                "PUBSUB",
                &[
                    "CHANNELS [<pattern>]",
                    "    Return the currently active channels matching a <pattern> (default: '*').",
                    "NUMPAT",
                    "    Return number of subscriptions to patterns.",
                    "NUMSUB [<channel> ...]",
                    "    Return the number of subscribers for the specified channels, excluding",
                    "    pattern subscriptions(default: no channels).",
                    "SHARDCHANNELS [<pattern>]",
                    "    Return the currently active shard level channels matching a <pattern> (default: '*').",
                    "SHARDNUMSUB [<shardchannel> ...]",
                    "    Return the number of subscribers for the specified shard level channel(s)",
                ],
            ),
        }
    }
}

/// Gives the reply's buffer back, for handlers that build replies of their
/// own.
fn out_of<'a>(r: Reply<'a>) -> &'a mut BytesMut {
    r.out
}

fn valid_name(n: &[u8]) -> Result<(), &'static str> {
    if n.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err("ERR Client names cannot contain spaces, newlines or special characters.");
    }
    Ok(())
}

/// Whether `given` is the password, in time that depends on neither: the
/// digests are compared in constant time, so that how long a refusal
/// takes tells nothing of how much of a guess was right, nor of the
/// password's length.
fn same_secret(password: &[u8], given: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(password)
        .ct_eq(&Sha256::digest(given))
        .into()
}

/// A decimal integer argument, as Redis's string2ll reads one.
fn integer(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b)
        .ok()
        .filter(|t| !t.starts_with('+'))
        .and_then(|t| t.parse().ok())
}

/// `TYPE` of `CLIENT LIST`/`KILL`, as a test of a connection's being
/// subscribed; `None` when unknown. There are no masters or replicas
/// here: nothing matches them.
fn client_type(name: &[u8]) -> Option<fn(bool) -> bool> {
    match name.to_ascii_lowercase().as_slice() {
        b"normal" => Some(|pubsub| !pubsub),
        b"pubsub" => Some(|pubsub| pubsub),
        b"master" | b"replica" | b"slave" => Some(|_| false),
        _ => None,
    }
}

fn select(mut r: Reply<'_>, index: &[u8]) {
    match std::str::from_utf8(index)
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
    {
        None => r.error("ERR value is not an integer or out of range"),
        // Pub/sub ignores the database; Redis has 16 by default.
        Some(0..=15) => r.simple("OK"),
        Some(_) => r.error("ERR DB index is out of range"),
    }
}

fn help(mut r: Reply<'_>, name: &str, lines: &[&str]) {
    r.array(lines.len() + 3);
    r.simple(&format!(
        "{name} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    ));
    for l in lines {
        r.simple(l);
    }
    r.simple("HELP");
    r.simple("    Print this help.");
}

/// One command's `COMMAND INFO` entry, as Redis's `addReplyCommandInfo`
/// writes it; `container` names the container of a subcommand.
fn command_info(r: &mut Reply<'_>, s: &Spec, container: Option<&str>) {
    let f = &s.facts;
    r.array(10);
    match container {
        Some(c) => r.bulk(format!("{c}|{}", s.name).as_bytes()),
        None => r.bulk(s.name.as_bytes()),
    }
    r.int(s.arity as i64);
    r.set(f.flags.len());
    for flag in f.flags {
        r.simple(flag);
    }
    // First key, last key, step: the key spec's range, as Redis derives
    // them for the shard channel commands.
    let (first, last, step) = match f.channel_keys {
        Some(last) => (1, i64::from(if last >= 0 { last + 1 } else { last }), 1),
        None => (0, 0, 0),
    };
    r.int(first);
    r.int(last);
    r.int(step);
    r.set(f.acl.len());
    for c in f.acl {
        r.simple(c);
    }
    r.set(f.tips.len());
    for t in f.tips {
        r.bulk(t.as_bytes());
    }
    match f.channel_keys {
        None => r.set(0),
        Some(last) => {
            r.set(1);
            r.map(3);
            r.bulk(b"flags");
            r.set(1);
            r.simple("not_key");
            r.bulk(b"begin_search");
            r.map(2);
            r.bulk(b"type");
            r.bulk(b"index");
            r.bulk(b"spec");
            r.map(1);
            r.bulk(b"index");
            r.int(1);
            r.bulk(b"find_keys");
            r.map(2);
            r.bulk(b"type");
            r.bulk(b"range");
            r.bulk(b"spec");
            r.map(3);
            r.bulk(b"lastkey");
            r.int(last as i64);
            r.bulk(b"keystep");
            r.int(1);
            r.bulk(b"limit");
            r.int(0);
        }
    }
    if s.subs.is_empty() {
        r.set(0);
    } else {
        r.array(s.subs.len());
        for sub in s.subs {
            command_info(r, sub, Some(s.name));
        }
    }
}

/// The command or subcommand (`container|sub`) `name` names, lowercased.
fn lookup(name: &[u8]) -> Option<(&'static Spec, Option<&'static str>)> {
    let lower = name.to_ascii_lowercase();
    let mut parts = lower.splitn(2, |&b| b == b'|');
    let first = parts.next()?;
    let spec = COMMANDS.iter().find(|s| s.name.as_bytes() == first)?;
    match parts.next() {
        None => Some((spec, None)),
        Some(sub) => spec
            .subs
            .iter()
            .find(|s| s.name.as_bytes() == sub)
            .map(|s| (s, Some(spec.name))),
    }
}

/// `COMMAND`: what clients ask of the server's command table.
fn command(mut r: Reply<'_>, args: &[Bytes]) {
    match args.get(1).map(|a| a.to_ascii_lowercase()) {
        None => {
            r.array(COMMANDS.len());
            for s in COMMANDS {
                command_info(&mut r, s, None);
            }
        }
        Some(sub) if sub == b"count" => r.int(COMMANDS.len() as i64),
        Some(sub) if sub == b"list" => {
            r.array(COMMANDS.len());
            for s in COMMANDS {
                r.bulk(s.name.as_bytes());
            }
        }
        Some(sub) if sub == b"docs" => r.map(0),
        // Without names, every command, as Redis gives it.
        Some(sub) if sub == b"info" && args.len() == 2 => {
            r.array(COMMANDS.len());
            for s in COMMANDS {
                command_info(&mut r, s, None);
            }
        }
        Some(sub) if sub == b"info" => {
            r.array(args.len() - 2);
            for name in &args[2..] {
                match lookup(name) {
                    Some((s, container)) => command_info(&mut r, s, container),
                    None => r.null(),
                }
            }
        }
        _ => help(
            r,
            "COMMAND",
            &[
                "(no subcommand)",
                "    Return details about all Redis commands.",
                "COUNT",
                "    Return the total number of commands in this Redis server.",
                "LIST",
                "    Return a list of all commands in this Redis server.",
                "INFO [<command-name> ...]",
                "    Return details about multiple Redis commands.",
                "DOCS [<command-name> ...]",
                "    Return documentation details about multiple Redis commands.",
            ],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_compared_whole() {
        assert!(same_secret(b"pw1", b"pw1"));
        assert!(!same_secret(b"pw1", b"pw"));
        assert!(!same_secret(b"pw1", b"pw12"));
        assert!(!same_secret(b"pw1", b"pw2"));
        assert!(!same_secret(b"", b"x"));
        assert!(same_secret(b"", b""));
    }
}
