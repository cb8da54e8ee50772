//! The Redis-protocol endpoint of the sidecar, against real clients that
//! no one here wrote (redis-cli, redis-py, the `redis` crate, Lettuce, the
//! client DHIS 2 uses) and against a real `redis-server` for the replies
//! that must match byte for byte. Every sidecar is a real `cachecast run`
//! process on ephemeral loopback ports.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{Cluster, LONG, free_port, metric};
use common::{eventually, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Whether a tool is on this machine. CI installs every tool these tests
/// use, so there a missing one fails; elsewhere the test says what it
/// skips and why.
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing, and CI must run this test (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {tool} is not installed here (.ci/run installs it)");
    }
    ok
}

/// Adds a Redis-protocol endpoint (and anything in `extra`) to every node
/// of `cluster`; returns the endpoints' ports.
fn with_resp(cluster: &Cluster, extra: &str) -> Vec<u16> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let port = free_port();
            let mut text = std::fs::read_to_string(&n.conf).expect("conf");
            text.push_str(&format!("cachecast.resp.port = {port}\n{extra}\n"));
            std::fs::write(&n.conf, text).expect("conf");
            port
        })
        .collect()
}

async fn started(n: usize, extra: &str) -> (Cluster, Vec<u16>) {
    let mut c = Cluster::new(n, "");
    let ports = with_resp(&c, extra);
    c.start_all().await;
    if n > 1 {
        c.wait_connected().await;
    }
    (c, ports)
}

/// A real redis-server on a free loopback port, stopped on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    async fn start(password: Option<&str>) -> RedisServer {
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.spawn().expect("redis-server");
        let server = RedisServer { child, port };
        eventually("redis-server to listen", LONG, async || {
            TcpStream::connect(("127.0.0.1", port)).await.map(drop)
        })
        .await;
        server
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `requests` on a fresh connection, then `QUIT` (answered in any
/// state, and it closes the connection), and returns every byte read
/// until the server closed.
async fn exchange(port: u16, requests: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(requests).await.expect("write");
    // After a protocol error the server may already have closed.
    let _ = s.write_all(b"QUIT\r\n").await;
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(LONG, async {
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was not closed after QUIT");
    out
}

/// Reads until `want` bytes arrived.
async fn read_n(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut out = vec![0u8; want];
    tokio::time::timeout(LONG, s.read_exact(&mut out))
        .await
        .expect("timely reply")
        .expect("read");
    out
}

/// The parts of a reply that differ between any two servers by design:
/// the version and the connection id in a HELLO reply.
fn normalise(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut out = String::new();
    let mut lines = text.split_inclusive("\r\n").peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        if line == "version\r\n" || line == "id\r\n" {
            // `$N\r\n<version>` or `:<id>`: keep the type, not the value.
            if let Some(next) = lines.next() {
                if next.starts_with('$') {
                    lines.next();
                    out.push_str("$<version>\r\n<version>\r\n");
                } else {
                    out.push_str(":<id>\r\n");
                }
            }
        }
    }
    out
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn cmds(list: &[&[&str]]) -> Vec<u8> {
    list.iter().flat_map(|c| cmd(c)).collect()
}

/// Cases whose replies must be the same bytes as Redis's, each on a fresh
/// connection (then QUIT). `HELLO 3` first makes a case RESP3.
fn cases() -> Vec<(String, Vec<u8>)> {
    let long = "x".repeat(300);
    let twenty: Vec<String> = (0..20).map(|i| format!("argument{i:02}")).collect();
    let mut twenty_args: Vec<&str> = vec!["nosuch"];
    twenty_args.extend(twenty.iter().map(String::as_str));
    let mut list: Vec<(&str, Vec<u8>)> = vec![
        ("ping", cmds(&[&["PING"], &["PING", "hello"], &["PING", "a", "b"]])),
        ("echo", cmds(&[&["ECHO", "x"], &["ECHO"], &["ECHO", "a", "b"], &["ecHo", ""]])),
        ("select", cmds(&[&["SELECT", "0"], &["SELECT", "15"], &["SELECT", "16"], &["SELECT", "-1"], &["SELECT", "abc"], &["SELECT"]])),
        ("client names", cmds(&[&["CLIENT", "GETNAME"], &["CLIENT", "SETNAME", "n1"], &["client", "getname"], &["CLIENT", "SETNAME", "a b"], &["CLIENT", "SETNAME", ""], &["CLIENT", "GETNAME"]])),
        ("client errors", cmds(&[&["CLIENT"], &["CLIENT", "FOO"], &["CLIENT", "SETNAME"], &["CLIENT", "GETNAME", "x"]])),
        ("hello", cmds(&[&["HELLO"], &["HELLO", "2"], &["HELLO", "4"], &["HELLO", "abc"], &["HELLO", "-1"], &["HELLO", "3", "FOO"], &["HELLO", "3", "SETNAME"], &["HELLO", "3", "SETNAME", "a b"]])),
        ("hello 3 with a name", cmds(&[&["HELLO", "3", "SETNAME", "myname"], &["CLIENT", "GETNAME"], &["HELLO", "2"]])),
        ("unknown commands", cmds(&[&["FOO"], &["FOO", "a", "b"], &["foo", &long], &twenty_args, &["FOO", "a\r\nb", "it's"]])),
        ("auth without a password", cmds(&[&["AUTH", "x"], &["AUTH", "default", "x"], &["AUTH", "other", "x"], &["AUTH", "a", "b", "c"], &["AUTH"], &["HELLO", "3", "AUTH", "default", "any"], &["HELLO", "2", "AUTH", "x", "y"]])),
        ("subscribe", cmds(&[&["SUBSCRIBE", "a", "b"], &["SUBSCRIBE", "a"], &["PING"], &["PING", "x"], &["PUBLISH", "a", "b"], &["ECHO", "x"], &["SELECT", "0"], &["CLIENT", "GETNAME"], &["FOO"], &["PING", "a", "b"], &["UNSUBSCRIBE", "b"], &["UNSUBSCRIBE", "nosuch"], &["UNSUBSCRIBE"], &["PING"]])),
        ("psubscribe", cmds(&[&["PSUBSCRIBE", "h?llo", "n*", "[ab]*"], &["PUNSUBSCRIBE", "n*"], &["PUNSUBSCRIBE"], &["PUNSUBSCRIBE"], &["SUBSCRIBE", "a", "a"], &["UNSUBSCRIBE", "a"]])),
        ("unsubscribe with none", cmds(&[&["UNSUBSCRIBE"], &["PUNSUBSCRIBE"], &["UNSUBSCRIBE", "a", "b"]])),
        ("subscribe arity", cmds(&[&["SUBSCRIBE"], &["PSUBSCRIBE"], &["PUBLISH", "a"], &["PUBLISH", "a", "b", "c"]])),
        ("pubsub", cmds(&[&["PUBSUB", "NUMSUB", "news", "nosuch"], &["PUBSUB", "NUMSUB"], &["PUBSUB", "NUMPAT"], &["pubsub", "numpat"], &["PUBSUB", "CHANNELS"], &["PUBSUB", "CHANNELS", "n*"], &["PUBSUB", "CHANNELS", "a", "b"], &["PUBSUB", "FOO"], &["PUBSUB"], &["PUBSUB", "NUMPAT", "x"]])),
        ("pubsub while subscribed", cmds(&[&["SUBSCRIBE", "news"], &["PSUBSCRIBE", "n*", "x*"]]).into_iter().chain(b"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n$4\r\nnews\r\n".iter().copied()).collect()),
        ("reset", cmds(&[&["HELLO", "3"], &["CLIENT", "SETNAME", "n"], &["SUBSCRIBE", "a"], &["RESET"], &["CLIENT", "GETNAME"], &["PING"], &["PUBSUB", "NUMSUB", "a"], &["RESET", "x"]])),
        ("quit", cmds(&[&["PING"], &["QUIT"], &["PING"]])),
        ("inline", b"PING\r\nPING\nping hello\r\necho \"a b\"\r\necho 'x y'\r\necho \"\\x41\\n\"\r\n\r\n   \r\nECHO it\\'s\r\n".to_vec()),
        ("inline while subscribed", b"subscribe a\r\nping\r\nunsubscribe\r\n".to_vec()),
        ("pipelined", b"PING\r\nPING\r\n*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$1\r\nx\r\n*0\r\n*-1\r\n".to_vec()),
        ("unchecked bulk terminator", b"*1\r\n$4\r\nPINGXY".to_vec()),
        ("unbalanced quotes", b"PING\r\necho \"unbalanced\r\nPING\r\n".to_vec()),
        ("bad multibulk length", b"*abc\r\n".to_vec()),
        ("expected dollar", b"*1\r\nx\r\n".to_vec()),
        ("bad bulk length", b"*1\r\n$abc\r\n".to_vec()),
        ("negative bulk length", b"*1\r\n$-5\r\n".to_vec()),
        ("huge bulk length", b"*1\r\n$600000000\r\n".to_vec()),
        ("top-level bulk", b"$3\r\nfoo\r\n".to_vec()),
        // Where Redis 7.0 and 7.2 agree (src/commands/*.json); the others
        // are in `what_redis_7_0_lacks_is_answered_as_7_2_does`.
        ("command info", cmd(&[
            "COMMAND", "INFO", "ping", "ECHO", "auth", "hello", "select", "quit", "reset",
            "subscribe", "unsubscribe", "psubscribe", "punsubscribe", "publish", "info",
            "nosuch", "client|getname", "CLIENT|ID", "client|help", "client|nosuch",
            "command|count", "command|docs", "command|info", "command|list", "command|help",
            "pubsub|channels", "pubsub|numsub", "pubsub|numpat", "pubsub|help",
            "client|list", "client|info", "client|kill",
            "ssubscribe", "sunsubscribe", "spublish", "pubsub|shardchannels", "pubsub|shardnumsub",
        ])),
        ("ssubscribe", cmds(&[
            &["SUNSUBSCRIBE"], &["SSUBSCRIBE", "a", "b"], &["SSUBSCRIBE", "a"], &["SUBSCRIBE", "c"], &["PING"],
            &["SPUBLISH", "nosuch", "x"], &["SUNSUBSCRIBE", "b"], &["SUNSUBSCRIBE"], &["PING"], &["UNSUBSCRIBE"],
            &["PING"], &["SUNSUBSCRIBE", "x", "y"], &["SSUBSCRIBE"], &["SPUBLISH", "a"], &["SPUBLISH", "nosuch", "m"],
        ])),
        ("shard pubsub", cmds(&[
            &["PUBSUB", "SHARDCHANNELS"], &["SSUBSCRIBE", "s1"], &["PUBSUB", "SHARDNUMSUB", "s1", "nosuch"],
            &["PUBSUB", "SHARDCHANNELS"], &["PUBSUB", "SHARDCHANNELS", "*1"], &["PUBSUB", "SHARDCHANNELS", "a", "b"],
            // Not HELP: 7.0 ends it with "Prints this help.", 7.2 with
            // "Print this help." (networking.c, addReplyHelp).
            &["PUBSUB", "SHARDNUMSUB"],
        ])),
        ("client kill and list errors", cmds(&[
            &["CLIENT", "KILL", "1.2.3.4:5"], &["CLIENT", "KILL", "ID", "abc"], &["CLIENT", "KILL", "ID", "0"],
            &["CLIENT", "KILL", "TYPE", "foo"], &["CLIENT", "KILL", "USER", "nobody"],
            &["CLIENT", "KILL", "USER", "default", "ADDR", "1.1.1.1:1"], &["CLIENT", "KILL", "SKIPME", "maybe"],
            &["CLIENT", "KILL", "ADDR"], &["client", "kill", "addr", "1.1.1.1:1", "id", "5", "skipme", "NO"],
            &["CLIENT", "KILL", "LADDR", "1.1.1.1:1", "TYPE", "master"], &["CLIENT", "KILL", "ADDR", "1.1.1.1:1", "ID"],
            &["CLIENT", "LIST", "TYPE", "foo"], &["CLIENT", "LIST", "ID", "abc"], &["CLIENT", "LIST", "foo"],
            &["CLIENT", "LIST", "ID", "99999"], &["CLIENT", "LIST", "TYPE", "replica"], &["CLIENT", "INFO", "x"],
        ])),
        ("info of unknown sections", cmds(&[&["INFO", "nosuch"], &["info", "NOSUCH", "other"]])),
        ("info while subscribed", cmds(&[&["SUBSCRIBE", "a"], &["INFO"], &["INFO", "server"]])),
    ];
    // The same in RESP3, where HELLO 3 comes first.
    let resp3: Vec<(String, Vec<u8>)> = list
        .iter()
        // RESP3 allows every command while subscribed.
        .filter(|(name, _)| {
            !matches!(
                *name,
                "hello" | "hello 3 with a name" | "reset" | "info while subscribed"
            )
        })
        .map(|(name, bytes)| {
            let mut b = cmd(&["HELLO", "3"]);
            b.extend_from_slice(bytes);
            (format!("{name} (RESP3)"), b)
        })
        .collect();
    let mut all: Vec<(String, Vec<u8>)> = list.drain(..).map(|(n, b)| (n.to_string(), b)).collect();
    all.extend(resp3);
    all
}

/// Cases for a server with a password (`pw1`).
fn password_cases() -> Vec<(String, Vec<u8>)> {
    let many = vec!["a"; 11];
    vec![
        (
            "before auth",
            cmds(&[
                &["PING"],
                &["ECHO", "x"],
                &["PUBLISH", "a", "b"],
                &["SUBSCRIBE", "a"],
                &["CLIENT", "SETNAME", "n"],
                &["SELECT", "0"],
                &["PUBSUB", "NUMPAT"],
                &["FOO"],
                &["CLIENT", "FOO"],
                &["PING", "a", "b"],
            ]),
        ),
        (
            "hello before auth",
            cmds(&[
                &["HELLO"],
                &["HELLO", "3"],
                &["HELLO", "3", "AUTH", "default", "wrong"],
                &["HELLO", "3", "AUTH", "other", "pw1"],
                &["PING"],
            ]),
        ),
        (
            "hello with auth",
            cmds(&[
                &["HELLO", "3", "AUTH", "default", "pw1", "SETNAME", "x"],
                &["PING"],
                &["CLIENT", "GETNAME"],
            ]),
        ),
        (
            "auth",
            cmds(&[
                &["AUTH", "wrong"],
                &["AUTH", "default", "wrong"],
                &["AUTH", "other", "pw1"],
                &["AUTH", "pw1"],
                &["PING"],
                &["AUTH", "default", "pw1"],
                &["AUTH", "a", "b", "c"],
            ]),
        ),
        (
            "reset deauthenticates",
            cmds(&[&["AUTH", "pw1"], &["RESET"], &["PING"]]),
        ),
        ("quit before auth", cmds(&[&["QUIT"]])),
        ("unauthenticated multibulk", cmd(&many)),
        (
            "unauthenticated bulk",
            format!("*2\r\n$4\r\nAUTH\r\n$20000\r\n{}\r\n", "p".repeat(20000)).into_bytes(),
        ),
        (
            "authenticated large args",
            cmds(&[&["AUTH", "pw1"], &many, &["ECHO", &"e".repeat(20000)]]),
        ),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_string(), b))
    .collect()
}

fn compare(name: &str, ours: &[u8], redis: &[u8], failures: &mut Vec<String>) {
    let (o, r) = (normalise(ours), normalise(redis));
    if o != r {
        failures.push(format!("{name}:\n  redis:     {r:?}\n  cachecast: {o:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_a_real_redis_byte_for_byte() {
    if !have("redis-server", &["--version"]) {
        return;
    }
    let redis = RedisServer::start(None).await;
    let redis_pw = RedisServer::start(Some("pw1")).await;
    let (_c, ports) = started(1, "").await;
    let (_c2, ports_pw) = started(1, "redis.password = pw1").await;
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, bytes) in cases() {
        let ours = exchange(ports[0], &bytes).await;
        let theirs = exchange(redis.port, &bytes).await;
        compare(&name, &ours, &theirs, &mut failures);
        count += 1;
    }
    for (name, bytes) in password_cases() {
        let ours = exchange(ports_pw[0], &bytes).await;
        let theirs = exchange(redis_pw.port, &bytes).await;
        compare(&name, &ours, &theirs, &mut failures);
        count += 1;
    }
    // Delivery between two connections, RESP2 and RESP3 subscribers.
    for hello in [&b""[..], &cmd(&["HELLO", "3"])[..]] {
        let mut replies = Vec::new();
        for port in [ports[0], redis.port] {
            let mut sub = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let mut setup = hello.to_vec();
            setup.extend(cmds(&[
                &["SUBSCRIBE", "news"],
                &["PSUBSCRIBE", "n*"],
                &["PING", "sync"],
            ]));
            sub.write_all(&setup).await.expect("write");
            // Until the PING's answer, the subscriptions' confirmations.
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("sync\r\n") {
                let mut b = [0u8; 4096];
                let n = tokio::time::timeout(LONG, sub.read(&mut b))
                    .await
                    .expect("timely")
                    .expect("read");
                assert!(n > 0, "closed");
                seen.extend_from_slice(&b[..n]);
            }
            let publisher = exchange(
                port,
                &cmds(&[
                    &["PUBLISH", "news", "hi"],
                    &["PUBLISH", "nx", "ho"],
                    &["PUBLISH", "other", "x"],
                ]),
            )
            .await;
            sub.write_all(b"QUIT\r\n").await.expect("write");
            let rest = read_to_close(&mut sub).await;
            replies.push((publisher, seen, rest));
        }
        let label = if hello.is_empty() { "RESP2" } else { "RESP3" };
        compare(
            &format!("publisher ({label})"),
            &replies[0].0,
            &replies[1].0,
            &mut failures,
        );
        compare(
            &format!("subscriber setup ({label})"),
            &replies[0].1,
            &replies[1].1,
            &mut failures,
        );
        compare(
            &format!("subscriber messages ({label})"),
            &replies[0].2,
            &replies[1].2,
            &mut failures,
        );
        count += 3;
    }
    // A RESP3 client publishing to its own channel, pipelined.
    let own = cmds(&[
        &["HELLO", "3"],
        &["SUBSCRIBE", "q"],
        &["PING"],
        &["PUBLISH", "q", "z"],
        &["PING"],
    ]);
    compare(
        "own channel (RESP3)",
        &exchange(ports[0], &own).await,
        &exchange(redis.port, &own).await,
        &mut failures,
    );
    count += 1;
    let own = cmds(&[
        &["HELLO", "3"],
        &["SSUBSCRIBE", "q"],
        &["PING"],
        &["SPUBLISH", "q", "z"],
        &["PING"],
    ]);
    compare(
        "own shard channel (RESP3)",
        &exchange(ports[0], &own).await,
        &exchange(redis.port, &own).await,
        &mut failures,
    );
    count += 1;
    assert!(
        failures.is_empty(),
        "{} of {count} cases differ from redis-server:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{count} cases: identical bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_redis_7_0_lacks_is_answered_as_7_2_does() {
    let (_c, ports) = started(1, "").await;
    let out = exchange(
        ports[0],
        &cmds(&[
            &["CLIENT", "SETINFO", "lib-name", "x"],
            &["CLIENT", "SETINFO", "LIB-VER", "1"],
            &["CLIENT", "SETINFO", "other", "1"],
            &["CLIENT", "SETINFO", "lib-name", "a b"],
            &["CLIENT", "ID"],
            &["COMMAND", "COUNT"],
            &["COMMAND", "DOCS"],
        ]),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with(
            "+OK\r\n+OK\r\n-ERR Unrecognized option 'other'\r\n\
             -ERR lib-name cannot contain spaces, newlines or special characters.\r\n:"
        ),
        "{text:?}"
    );
    // Redis 7.2.6's src/commands/client-setname.json and
    // client-setinfo.json: SETNAME gained these tips in 7.2, SETINFO is new.
    let out = exchange(
        ports[0],
        &cmd(&[
            "COMMAND",
            "INFO",
            "client|setname",
            "client|setinfo",
            "client",
        ]),
    )
    .await;
    let entry = |name: &str, arity: i32| {
        format!(
            "*10\r\n${}\r\n{name}\r\n:{arity}\r\n*3\r\n+noscript\r\n+loading\r\n+stale\r\n:0\r\n:0\r\n:0\r\n\
             *2\r\n+@slow\r\n+@connection\r\n*2\r\n$24\r\nrequest_policy:all_nodes\r\n\
             $29\r\nresponse_policy:all_succeeded\r\n*0\r\n*0\r\n",
            name.len()
        )
    };
    let want = format!(
        "*3\r\n{}{}*10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*1\r\n+@slow\r\n*0\r\n*0\r\n*",
        entry("client|setname", 3),
        entry("client|setinfo", 4)
    );
    let info = String::from_utf8_lossy(&out);
    assert!(info.starts_with(&want), "{info:?}");
    assert!(
        text.contains("\r\n:19\r\n*0\r\n+OK\r\n"),
        "COMMAND COUNT and DOCS: {text:?}"
    );
}

/// The `key=value` fields of a client line, in order.
fn client_fields(line: &str) -> Vec<(String, String)> {
    line.trim_end()
        .split(' ')
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The one verbatim or bulk string of a reply, without its header.
fn text_of(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    let (len, body) = text.split_once("\r\n").unwrap_or(("$0", ""));
    let len: usize = len[1..].parse().unwrap_or(0);
    let body = &body[..len.min(body.len())];
    body.strip_prefix("txt:").unwrap_or(body).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_info_and_kill_work_as_in_redis() {
    let (_c, ports) = started(1, "").await;
    let port = ports[0];
    // CLIENT INFO has Redis's fields in Redis's order: 7.0's, then 7.2's
    // lib-name and lib-ver (networking.c, catClientInfoString).
    let mine = text_of(
        &exchange(
            port,
            &cmds(&[&["CLIENT", "SETINFO", "lib-name", "x"], &["CLIENT", "INFO"]]),
        )
        .await[5..],
    );
    let fields = client_fields(&mine);
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    if have("redis-server", &["--version"]) {
        let redis = RedisServer::start(None).await;
        let theirs = text_of(&exchange(redis.port, &cmd(&["CLIENT", "INFO"])).await);
        let mut want: Vec<String> = client_fields(&theirs).into_iter().map(|(k, _)| k).collect();
        want.extend(["lib-name".to_string(), "lib-ver".to_string()]);
        assert_eq!(keys, want, "{mine}");
    }
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    assert_eq!(get("cmd").as_deref(), Some("client|info"));
    assert_eq!(get("lib-name").as_deref(), Some("x"));
    assert_eq!(get("flags").as_deref(), Some("N"));
    assert!(mine.ends_with('\n'));
    // A named subscriber, and a publisher that lists and kills it.
    let mut sub = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    sub.write_all(&cmds(&[
        &["CLIENT", "SETNAME", "app"],
        &["SUBSCRIBE", "c1", "c2"],
    ]))
    .await
    .expect("write");
    let confirm = b"+OK\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nc2\r\n:2\r\n";
    assert_eq!(read_n(&mut sub, confirm.len()).await, confirm);
    let sub_addr = sub.local_addr().expect("addr").to_string();
    let list = text_of(&exchange(port, &cmd(&["CLIENT", "LIST", "TYPE", "pubsub"])).await);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 1, "{list}");
    let f = client_fields(lines[0]);
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("addr"), Some(sub_addr.as_str()));
    assert_eq!(get("laddr"), Some(format!("127.0.0.1:{port}").as_str()));
    assert_eq!(get("name"), Some("app"));
    assert_eq!(
        (get("sub"), get("psub"), get("ssub")),
        (Some("2"), Some("0"), Some("0"))
    );
    assert_eq!(get("flags"), Some("P"));
    assert_eq!(get("cmd"), Some("subscribe"));
    let id = get("id").expect("id").to_string();
    // Every connection: the subscriber and the one asking.
    let all = text_of(&exchange(port, &cmd(&["CLIENT", "LIST"])).await);
    assert_eq!(all.lines().count(), 2, "{all}");
    let by_id = text_of(&exchange(port, &cmd(&["CLIENT", "LIST", "ID", &id, "99999"])).await);
    assert_eq!(by_id.lines().count(), 1, "{by_id}");
    // KILL by a filter that matches nothing, then by its id: it is closed.
    let out = exchange(
        port,
        &cmds(&[
            &["CLIENT", "KILL", "ID", &id, "TYPE", "normal"],
            &["CLIENT", "KILL", "ID", &id],
        ]),
    )
    .await;
    assert_eq!(out, b":0\r\n:1\r\n+OK\r\n");
    assert!(read_to_close(&mut sub).await.is_empty());
    // By address, in the old form and with ADDR; LADDR matches every
    // connection to the port but SKIPME spares the caller.
    for form in ["old", "addr", "laddr"] {
        let mut victim = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        victim.write_all(&cmd(&["PING"])).await.expect("write");
        assert_eq!(read_n(&mut victim, 7).await, b"+PONG\r\n");
        let a = victim.local_addr().expect("addr").to_string();
        let laddr = format!("127.0.0.1:{port}");
        let req = match form {
            "old" => cmd(&["CLIENT", "KILL", &a]),
            "addr" => cmd(&["CLIENT", "KILL", "ADDR", &a, "SKIPME", "yes"]),
            _ => cmd(&["CLIENT", "KILL", "LADDR", &laddr, "USER", "default"]),
        };
        let out = exchange(port, &req).await;
        let want: &[u8] = if form == "old" {
            b"+OK\r\n+OK\r\n"
        } else {
            b":1\r\n+OK\r\n"
        };
        assert_eq!(out, want, "{form}");
        assert!(read_to_close(&mut victim).await.is_empty(), "{form}");
    }
    // SKIPME no: the caller closes itself, after the reply.
    let mut me = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let my_addr = me.local_addr().expect("addr").to_string();
    me.write_all(&cmds(&[
        &["CLIENT", "KILL", "ADDR", &my_addr, "SKIPME", "no"],
        &["PING"],
    ]))
    .await
    .expect("write");
    assert_eq!(read_to_close(&mut me).await, b":1\r\n");
}

/// The `# Section` lines of an INFO reply, and its `key:value` fields.
fn info_parts(reply: &[u8]) -> (Vec<String>, std::collections::HashMap<String, String>) {
    let text = String::from_utf8_lossy(reply);
    let mut headers = Vec::new();
    let mut fields = std::collections::HashMap::new();
    for l in text.split("\r\n") {
        if let Some(h) = l.strip_prefix("# ") {
            headers.push(h.to_string());
        } else if let Some((k, v)) = l.split_once(':') {
            fields.insert(k.to_string(), v.to_string());
        }
    }
    (headers, fields)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_is_answered_as_redis_7_2_answers_it() {
    let (_c, ports) = started(1, "").await;
    let redis = if have("redis-server", &["--version"]) {
        Some(RedisServer::start(None).await)
    } else {
        None
    };
    // Each selector gives the sections Redis gives, in Redis's order.
    for args in [
        &[][..],
        &["default"],
        &["ALL"],
        &["everything"],
        &["server"],
        &["Persistence", "server"],
        &["clients", "nosuch"],
    ] {
        let mut req = vec!["INFO"];
        req.extend_from_slice(args);
        let ours = exchange(ports[0], &cmd(&req)).await;
        assert!(ours.starts_with(b"$"), "{args:?}: a bulk string in RESP2");
        let (headers, fields) = info_parts(&ours);
        if let Some(redis) = &redis {
            let (theirs, their_fields) = info_parts(&exchange(redis.port, &cmd(&req)).await);
            assert_eq!(headers, theirs, "INFO {args:?}");
            // Every field is one Redis has: 7.2 adds `listener0` and the
            // blocking keys counts (server.c, genRedisInfoString);
            // `cachecast_version` is ours.
            let newer = [
                "listener0",
                "total_blocking_keys",
                "total_blocking_keys_on_nokey",
                "cachecast_version",
            ];
            for k in fields.keys() {
                if !newer.contains(&k.as_str()) {
                    assert!(
                        their_fields.contains_key(k),
                        "INFO {args:?}: {k} is not Redis's"
                    );
                }
            }
        }
        if headers.iter().any(|h| h == "Server") {
            assert!(fields["redis_version"].starts_with("7.2."), "{fields:?}");
            assert_eq!(fields["redis_mode"], "standalone");
            assert_eq!(fields["tcp_port"], ports[0].to_string());
            assert_eq!(fields["run_id"].len(), 40);
            for k in ["os", "arch_bits", "uptime_in_seconds", "process_id"] {
                assert!(fields.contains_key(k), "{k}");
            }
        }
        if headers.iter().any(|h| h == "Persistence") {
            assert_eq!(fields["loading"], "0");
        }
        if headers.iter().any(|h| h == "Clients") {
            // This connection, at least.
            assert!(fields["connected_clients"].parse::<u64>().unwrap_or(0) >= 1);
        }
    }
    // RESP3: a verbatim string of format `txt`, as HELLO's version says.
    let out = exchange(ports[0], &cmds(&[&["HELLO", "3"], &["INFO", "server"]])).await;
    let text = String::from_utf8_lossy(&out);
    let info = &text[text.find("\r\n=").expect("a verbatim string") + 2..];
    let (len, rest) = info[1..].split_once("\r\n").expect("length");
    assert!(
        rest.starts_with("txt:# Server\r\nredis_version:7.2."),
        "{rest:?}"
    );
    let body_len = rest.find("\r\n+OK\r\n").expect("QUIT's OK");
    assert_eq!(len.parse::<usize>().ok(), Some(body_len));
    let hello_version = text.split("version\r\n$5\r\n").nth(1).map(|v| &v[..5]);
    assert!(rest.contains(&format!(
        "redis_version:{}\r\n",
        hello_version.unwrap_or("?")
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_fits_six_redisson_clients_and_is_configurable() {
    // Redisson opens 25 connections per client at start: six of them, and
    // one more connection, by default.
    let (_c, ports) = started(1, "").await;
    let mut open = Vec::new();
    for _ in 0..151 {
        let mut s = TcpStream::connect(("127.0.0.1", ports[0]))
            .await
            .expect("connect");
        s.write_all(&cmd(&["PING"])).await.expect("write");
        assert_eq!(read_n(&mut s, 7).await, b"+PONG\r\n");
        open.push(s);
    }
    drop(open);
    let (_c2, ports) = started(1, "cachecast.resp.max.connections = 2").await;
    let mut two = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", ports[0]))
            .await
            .expect("connect");
        s.write_all(&cmd(&["PING"])).await.expect("write");
        assert_eq!(read_n(&mut s, 7).await, b"+PONG\r\n");
        two.push(s);
    }
    let mut third = TcpStream::connect(("127.0.0.1", ports[0]))
        .await
        .expect("connect");
    assert_eq!(
        read_to_close(&mut third).await,
        b"-ERR max number of clients reached\r\n"
    );
    // INFO, on a connection under the cap, reports it.
    two[0]
        .write_all(&cmd(&["INFO", "clients"]))
        .await
        .expect("write");
    two[0].write_all(b"QUIT\r\n").await.expect("write");
    let info = read_to_close(&mut two[0]).await;
    assert!(
        String::from_utf8_lossy(&info).contains("\r\nmaxclients:2\r\n"),
        "{info:?}"
    );
    drop(two);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_channels_cross_the_mesh_as_channels() {
    let (_c, ports) = started(2, "").await;
    let mut sub = TcpStream::connect(("127.0.0.1", ports[1]))
        .await
        .expect("connect");
    sub.write_all(&cmd(&["SSUBSCRIBE", "sc"]))
        .await
        .expect("write");
    let confirm = b"*3\r\n$10\r\nssubscribe\r\n$2\r\nsc\r\n:1\r\n";
    assert_eq!(read_n(&mut sub, confirm.len()).await, confirm);
    let out = exchange(
        ports[1],
        &cmds(&[
            &["PUBSUB", "SHARDNUMSUB", "sc"],
            &["PUBSUB", "SHARDCHANNELS"],
        ]),
    )
    .await;
    assert_eq!(out, b"*2\r\n$2\r\nsc\r\n:1\r\n*1\r\n$2\r\nsc\r\n+OK\r\n");
    // SPUBLISH on the other sidecar, then PUBLISH: one namespace, so
    // both reach the shard subscriber, as smessage.
    let out = exchange(
        ports[0],
        &cmds(&[&["SPUBLISH", "sc", "k1"], &["PUBLISH", "sc", "k2"]]),
    )
    .await;
    assert_eq!(out, b":0\r\n:0\r\n+OK\r\n");
    for k in ["k1", "k2"] {
        let m = format!("*3\r\n$8\r\nsmessage\r\n$2\r\nsc\r\n$2\r\n{k}\r\n");
        assert_eq!(String::from_utf8_lossy(&read_n(&mut sub, m.len()).await), m);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_crosses_the_mesh_and_bad_input_leaves_the_node_serving() {
    let (c, ports) = started(2, "").await;
    let mut sub = TcpStream::connect(("127.0.0.1", ports[1]))
        .await
        .expect("connect");
    sub.write_all(&cmd(&["SUBSCRIBE", "c1"]))
        .await
        .expect("write");
    let confirm = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:1\r\n";
    assert_eq!(read_n(&mut sub, confirm.len()).await, confirm);
    // Refused, nothing sent: not UTF-8, an empty channel, too long.
    let mut bad = b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nc1\r\n$2\r\n\xff\xfe\r\n".to_vec();
    bad.extend(cmd(&["PUBLISH", "", "x"]));
    bad.extend(cmd(&["PUBLISH", "c1", &"k".repeat(70_000)]));
    bad.extend(cmd(&["PUBLISH", "c1", "good"]));
    let out = exchange(ports[0], &bad).await;
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(
        lines[0].starts_with("-ERR the channel and the message must be UTF-8"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("-ERR the cache name is empty"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("-ERR 'publish' has an argument of 70000 bytes"),
        "{text}"
    );
    assert_eq!(&lines[3..], [":0", "+OK", ""], "{text}");
    // A channel no PUBLISH can reach is refused to SUBSCRIBE and
    // SSUBSCRIBE alike; the connection stays out of subscribed mode.
    let mut bad = b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\n\xff\xfe\r\n".to_vec();
    bad.extend(b"*3\r\n$10\r\nSSUBSCRIBE\r\n$2\r\n\xff\xfe\r\n$2\r\nok\r\n");
    bad.extend(cmd(&["SUNSUBSCRIBE"]));
    bad.extend(cmd(&["PING"]));
    let out = exchange(ports[0], &bad).await;
    let refusal = "-ERR the channel must be UTF-8 text (the mesh carries strings); nothing was subscribed\r\n";
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!(
            "{refusal}{refusal}*3\r\n$10\r\nssubscribe\r\n$2\r\nok\r\n:1\r\n\
             *3\r\n$12\r\nsunsubscribe\r\n$2\r\nok\r\n:0\r\n+PONG\r\n+OK\r\n"
        )
    );
    // Only the good one arrives, across the mesh.
    let message = b"*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$4\r\ngood\r\n";
    assert_eq!(read_n(&mut sub, message.len()).await, message);
    // Garbage, a huge length, a half frame left open: each connection
    // gets Redis's error or waits; the node serves on.
    for garbage in [
        &b"\x00\x01\x02\xff garbage\r\n"[..],
        b"*99999999999\r\n",
        b"*1\r\n$1000000000\r\n",
        b"*2\r\n$4\r\nECHO\r\n$10\r\nabc",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", ports[0]))
            .await
            .expect("connect");
        s.write_all(garbage).await.expect("write");
    }
    let mut half = TcpStream::connect(("127.0.0.1", ports[0]))
        .await
        .expect("connect");
    half.write_all(b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nc1\r\n$5\r\nhal")
        .await
        .expect("write");
    let out = exchange(ports[0], &cmd(&["PUBLISH", "c1", "after"])).await;
    assert_eq!(out, b":0\r\n+OK\r\n");
    half.write_all(b"f!\r\n").await.expect("write");
    assert_eq!(read_n(&mut half, 4).await, b":0\r\n");
    for key in ["after", "half!"] {
        let m = format!(
            "*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n${}\r\n{key}\r\n",
            key.len()
        );
        assert_eq!(String::from_utf8_lossy(&read_n(&mut sub, m.len()).await), m);
    }
    // The two protocol errors are counted (their connections may be served
    // after the ones above).
    c.nodes[0]
        .wait_status("two protocol errors counted", |st| {
            st["sidecar"]["resp"]["protocol_errors"].as_u64() >= Some(2)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_redis_cli_and_redis_py_work_across_sidecars() {
    let (c, ports) = started(2, "redis.password = s3cret").await;
    // The `redis` crate (async, RESP2): subscribe on node 1, publish on 0.
    let url = |p: u16| format!("redis://:s3cret@127.0.0.1:{p}/");
    let sub_client = redis::Client::open(url(ports[1])).expect("client");
    let mut pubsub = sub_client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("rs-news").await.expect("subscribe");
    pubsub.psubscribe("rs-*").await.expect("psubscribe");
    let pub_client = redis::Client::open(url(ports[0])).expect("client");
    let mut con = pub_client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let n: i64 = redis::cmd("PUBLISH")
        .arg("rs-news")
        .arg("from-rust")
        .query_async(&mut con)
        .await
        .expect("publish");
    assert_eq!(n, 0, "no subscriber on the publishing sidecar");
    {
        let mut stream = pubsub.on_message();
        use futures_util::StreamExt;
        for want in ["rs-news", "rs-*"] {
            let msg = tokio::time::timeout(LONG, stream.next())
                .await
                .expect("timely")
                .expect("message");
            let payload: String = msg.get_payload().expect("payload");
            assert_eq!(
                (msg.get_channel_name(), payload.as_str()),
                ("rs-news", "from-rust")
            );
            let pattern: Option<String> = msg.get_pattern().ok();
            assert_eq!(pattern.is_some(), want == "rs-*");
        }
    }
    // A wrong password is refused with Redis's error.
    let bad =
        redis::Client::open(format!("redis://:nope@127.0.0.1:{}/", ports[0])).expect("client");
    let err = bad
        .get_multiplexed_async_connection()
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed, "{err}");

    // redis-cli: a subscriber process on node 0, a publisher on node 1.
    if have("redis-cli", &["--version"]) {
        let mut sub = tokio::process::Command::new("redis-cli")
            .args([
                "-p",
                &ports[0].to_string(),
                "-a",
                "s3cret",
                "--no-auth-warning",
                "SUBSCRIBE",
                "cli-news",
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli");
        let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
        let mut next = async || {
            tokio::time::timeout(LONG, lines.next_line())
                .await
                .expect("timely")
                .expect("read")
                .expect("line")
        };
        assert_eq!(
            [next().await, next().await, next().await],
            ["subscribe", "cli-news", "1"]
        );
        let out = redis_cli(ports[1], "s3cret", &["PUBLISH", "cli-news", "héllo wörld"]);
        assert_eq!(out.trim(), "0");
        assert_eq!(
            [next().await, next().await, next().await],
            ["message", "cli-news", "héllo wörld"]
        );
        let out = redis_cli(ports[0], "s3cret", &["PUBSUB", "NUMSUB", "cli-news"]);
        assert_eq!(out, "cli-news\n1\n");
    }

    // redis-py, RESP2 and RESP3.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/redis_py_check.py");
    if have("python3", &["-c", "import redis"]) {
        for protocol in ["2", "3"] {
            let out = Command::new("python3")
                .arg(&script)
                .args([
                    &ports[1].to_string(),
                    &ports[0].to_string(),
                    "s3cret",
                    protocol,
                ])
                .output()
                .expect("python3");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.ends_with("done\n"),
                "redis-py RESP{protocol}:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let st = c.nodes[1].status().await;
    assert!(
        st["sidecar"]["resp"]["delivered"].as_u64() >= Some(2),
        "{st}"
    );
}

/// `redis-cli -p PORT -a PASSWORD ARGS...`, its stdout.
fn redis_cli(port: u16, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "-a", password, "--no-auth-warning"])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Lettuce versions of DHIS 2's release lines (docs/dhis2.md, "DHIS 2
/// releases"): 2.38.2; 2.39.7–2.39.10; 2.42.0; 2.42.1–2.42.2; 2.40.12,
/// 2.41.9.1 and 2.42.3+. One module of tests/lettuce each.
const LETTUCE_VERSIONS: [&str; 5] = ["6.1.6", "6.4.0", "6.5.5", "6.7.1", "6.8.1"];

/// Builds the Lettuce client for every version in [`LETTUCE_VERSIONS`],
/// and tests/clients/jvm (Jedis, Redisson, Spring Data Redis), once per
/// test run and in one Maven run (Maven fetches the libraries from Maven
/// Central the first time); `None` when Maven or Java is missing.
fn lettuce_jars() -> Option<Vec<(&'static str, PathBuf)>> {
    type Jars = Option<Vec<(&'static str, PathBuf)>>;
    static BUILT: Mutex<Option<Jars>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = built.clone() {
        return r;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lettuce");
    let jars: Vec<(&'static str, PathBuf)> = LETTUCE_VERSIONS
        .iter()
        .map(|v| {
            (
                *v,
                dir.join(format!("lettuce-{v}/target/lettuce-client.jar")),
            )
        })
        .collect();
    let result = if !have("mvn", &["-v"]) || !have("java", &["-version"]) {
        None
    } else {
        let t = Instant::now();
        let out = Command::new("mvn")
            .args(["-q", "-B", "-Dstyle.color=never", "-f"])
            .arg(dir.join("pom.xml"))
            .args(["package", "-DskipTests"])
            .output()
            .expect("mvn");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Maven Central out of reach with the libraries not yet in the local
        // repository: nothing here can be built, which says nothing of
        // the sidecar.
        if !out.status.success()
            && ["Could not transfer", "Could not resolve", "Non-resolvable"]
                .iter()
                .any(|s| log.contains(s))
        {
            eprintln!("SKIPPED: Maven could not fetch the clients' libraries:\n{log}");
            *built = Some(None);
            return None;
        }
        assert!(
            out.status.success() && jars.iter().all(|(_, j)| j.exists()) && jvm_jar().exists(),
            "mvn package failed:\n{log}"
        );
        eprintln!("Lettuce and JVM clients built in {:?}", t.elapsed());
        Some(jars)
    };
    *built = Some(result.clone());
    result
}

/// The check of tests/clients/jvm, built by [`lettuce_jars`].
fn jvm_jar() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/jvm/target/jvm-clients.jar")
}

/// The client on the Lettuce of the newest DHIS 2 releases.
fn lettuce_jar() -> Option<PathBuf> {
    lettuce_jars().map(|j| j.last().expect("a version").1.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettuce_as_dhis2_uses_it_resp3_and_resp2_with_and_without_a_password() {
    let Some(jars) = tokio::task::spawn_blocking(lettuce_jars)
        .await
        .expect("build")
    else {
        return;
    };
    // A sidecar per case, so that the four cases of a version run at once
    // (the conformance client counts the subscribers of its channels).
    let mut clusters = Vec::new();
    let mut cases = Vec::new();
    for password in [None, Some("lettuce-pw")] {
        for protocol in ["RESP3", "RESP2"] {
            let extra = password.map_or(String::new(), |p| format!("redis.password = {p}"));
            let (c, ports) = started(1, &extra).await;
            clusters.push(c);
            cases.push((ports[0], password, protocol));
        }
    }
    for (version, jar) in &jars {
        let mut runs = tokio::task::JoinSet::new();
        for (port, password, protocol) in cases.clone() {
            let mut cmd = tokio::process::Command::new("java");
            cmd.arg("-jar").arg(jar).args([
                "conformance",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--protocol",
                protocol,
            ]);
            if let Some(p) = password {
                cmd.args(["--password", p]);
            }
            runs.spawn(async move { (password, protocol, cmd.output().await.expect("java")) });
        }
        while let Some(run) = runs.join_next().await {
            let (password, protocol, out) = run.expect("join");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.ends_with("done\n"),
                "Lettuce {version} {protocol}, password {password:?}:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if password.is_some() {
                assert!(
                    text.contains("ok wrong-password RedisCommandExecutionException: WRONGPASS"),
                    "{text}"
                );
                assert!(
                    text.contains("ok no-password RedisCommandExecutionException: NOAUTH"),
                    "{text}"
                );
            }
        }
    }
}

/// One HTTP endpoint standing in for DHIS 2's `POST
/// /api/maintenance/cacheClear` on every server: checks the Basic
/// credentials and records each call with the server it came for.
struct Maintenance {
    addr: std::net::SocketAddr,
    calls: Arc<Mutex<Vec<(usize, Instant)>>>,
    refused: Arc<Mutex<u64>>,
}

impl Maintenance {
    async fn start() -> Maintenance {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{HeaderMap, StatusCode};
        type Shared = (Arc<Mutex<Vec<(usize, Instant)>>>, Arc<Mutex<u64>>);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        async fn clear(
            State((calls, refused)): State<Shared>,
            UrlPath(server): UrlPath<usize>,
            headers: HeaderMap,
        ) -> StatusCode {
            // admin:district, the DHIS 2 demo user, in Basic form.
            if headers.get("authorization").and_then(|v| v.to_str().ok())
                != Some("Basic YWRtaW46ZGlzdHJpY3Q=")
            {
                *refused.lock().expect("lock") += 1;
                return StatusCode::UNAUTHORIZED;
            }
            calls.lock().expect("lock").push((server, Instant::now()));
            StatusCode::OK
        }
        // As an application that sends strangers to its login page.
        async fn login() -> (StatusCode, [(&'static str, &'static str); 1]) {
            (StatusCode::FOUND, [("location", "/login.html")])
        }
        async fn login_page() -> &'static str {
            "<html>please log in</html>"
        }
        let app = axum::Router::new()
            .route(
                "/{server}/api/maintenance/cacheClear",
                axum::routing::post(clear),
            )
            .route("/redirect", axum::routing::post(login))
            .route(
                "/login.html",
                axum::routing::get(login_page).post(login_page),
            )
            .with_state((calls.clone(), refused.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Maintenance {
            addr,
            calls,
            refused,
        }
    }

    fn calls_for(&self, server: usize) -> Vec<Instant> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.0 == server)
            .map(|c| c.1)
            .collect()
    }

    async fn wait_call_after(&self, server: usize, t: Instant) {
        wait_until(
            &format!("a flush hook call for server {server}"),
            LONG,
            || self.calls_for(server).iter().any(|c| *c >= t),
        )
        .await;
    }
}

impl Maintenance {
    /// The cache-clearing URL of server `i`.
    fn url(&self, i: usize) -> String {
        format!("http://{}/{i}/api/maintenance/cacheClear", self.addr)
    }
}

/// Flush-hook settings calling `url`, with the credentials in a file
/// (`creds{i}` in `dir`) that only its owner reads.
fn hook_conf(url: &str, dir: &Path, i: usize) -> String {
    let creds = dir.join(format!("creds{i}"));
    std::fs::write(&creds, "admin:district\n").expect("creds");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    format!(
        "cachecast.flush.url = {url}\ncachecast.flush.credentials.file = {}\n",
        creds.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_cut_off_and_the_hook_is_called() {
    let start = Instant::now();
    let m = Maintenance::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let (c, port) = with_hook(&m.url(0), dir.path()).await;
    let mut stalled = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stalled
        .write_all(&cmd(&["SUBSCRIBE", "big"]))
        .await
        .expect("write");
    // Its first subscription is a gap the hook covers.
    m.wait_call_after(0, start).await;
    let before = Instant::now();
    let message = "m".repeat(60_000);
    let mut publisher = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut sent = 0;
    loop {
        publisher
            .write_all(&cmd(&["PUBLISH", "big", &message]))
            .await
            .expect("write");
        let reply = read_n(&mut publisher, 4).await;
        sent += 1;
        if reply == b":0\r\n" {
            break; // the subscriber is gone
        }
        assert!(sent < 5_000, "never cut off");
    }
    let st = c.nodes[0].status().await;
    assert_eq!(st["sidecar"]["resp"]["slow_dropped"], 1, "{st}");
    assert!(
        sent as usize * message.len() >= 32 * 1024 * 1024,
        "cut off after {sent}"
    );
    m.wait_call_after(0, before).await;
    assert_eq!(*m.refused.lock().expect("lock"), 0);
    assert_eq!(
        metric(&c.nodes[0], "cachecast_resp_slow_subscribers_total").await,
        1
    );
    // Once the call succeeded, nothing is owed.
    c.nodes[0]
        .wait_metric("cachecast_flush_hook_pending", |v| v == 0)
        .await;
    assert!(metric(&c.nodes[0], "cachecast_flush_hook_calls_total").await >= 2);
}

/// One Lettuce client wired as DHIS 2 wires it, as a process.
struct Dhis2 {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dhis2 {
    async fn start(jar: &Path, port: u16, password: &str, uid: &str) -> Dhis2 {
        Dhis2::start_with(jar, port, password, uid, None).await
    }

    /// As [`Dhis2::start`], with the protocol pinned (`RESP2`) rather than
    /// Lettuce's default, as DHIS 2 leaves it.
    async fn start_with(
        jar: &Path,
        port: u16,
        password: &str,
        uid: &str,
        protocol: Option<&str>,
    ) -> Dhis2 {
        let mut cmd = tokio::process::Command::new("java");
        cmd.arg("-jar").arg(jar).args([
            "dhis2",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--password",
            password,
            "--uid",
            uid,
        ]);
        if let Some(p) = protocol {
            cmd.args(["--protocol", p]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("java");
        let stdin = child.stdin.take().expect("stdin");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                sink.lock().expect("lock").push(l);
            }
        });
        let d = Dhis2 {
            child,
            stdin,
            lines,
        };
        d.wait_line("ready", |l| l == "ready").await;
        d
    }

    async fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) {
        eventually(what, Duration::from_secs(60), async || {
            let lines = self.lines.lock().expect("lock");
            if lines.iter().any(|l| pred(l)) {
                Ok(())
            } else {
                Err(format!("lines: {lines:?}"))
            }
        })
        .await;
    }

    /// Publishes `n` more messages and waits until all were acknowledged.
    async fn publish(&mut self, n: usize, last: usize) {
        self.send(n).await;
        let want = format!("published {last}");
        self.wait_line(&want, |l| l == want).await;
    }

    /// Asks for `n` more messages without waiting for them.
    async fn send(&mut self, n: usize) {
        self.stdin
            .write_all(format!("publish {n}\n").as_bytes())
            .await
            .expect("stdin");
    }

    /// The messages of other instances, as DHIS 2 acts on them.
    fn received(&self) -> Vec<String> {
        self.with_prefix("recv ")
    }

    /// Its own messages, which DHIS 2 drops.
    fn own(&self) -> Vec<String> {
        self.with_prefix("own ")
    }

    fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
            .collect()
    }
}

/// Message `k` of the instance `uid`, as tests/lettuce's `dhis2` mode
/// publishes it: in turn an entity, a collection of an owner, and an entity
/// with a composite id, in DHIS 2's shapes.
fn dhis2_message(uid: &str, k: usize) -> String {
    match k % 3 {
        1 => format!("{uid}:update:org.hisp.dhis.dataelement.DataElement:{k}"),
        2 => format!(
            "{uid}:collection:org.hisp.dhis.dataset.DataSet:org.hisp.dhis.dataset.DataSet.dataSetElements:{k}"
        ),
        _ => format!(
            "{uid}:update:org.hisp.dhis.datavalue.DataValue:fbfJHSPpUQD;202612;DiszpKrYNg8;HllvX50cXC0;{k}"
        ),
    }
}

/// The number of a message of [`dhis2_message`].
fn dhis2_k(message: &str) -> Option<usize> {
    message.rsplit([':', ';']).next()?.parse().ok()
}

impl Drop for Dhis2 {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dhis2_instances_stay_coherent_through_a_crash_and_a_sidecar_restart() {
    let Some(jar) = tokio::task::spawn_blocking(lettuce_jar)
        .await
        .expect("build")
    else {
        return;
    };
    let start = Instant::now();
    let m = Maintenance::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut c = Cluster::new(3, "");
    // Each server's dhis.conf points DHIS 2's Redis at its own sidecar.
    let mut ports = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let port = free_port();
        ports.push(port);
        let mut text = std::fs::read_to_string(&n.conf).expect("conf");
        text.push_str(&format!(
            "redis.cache.invalidation.enabled = on\nredis.host = 127.0.0.1\nredis.port = {port}\nredis.password = pw{i}\n{}",
            hook_conf(&m.url(i), dir.path(), i)
        ));
        std::fs::write(&n.conf, text).expect("conf");
    }
    c.start_all().await;
    c.wait_connected().await;
    let uids = ["uidAAAAAAAAA", "uidBBBBBBBBB", "uidCCCCCCCCC"];
    let mut apps = Vec::new();
    for i in 0..3 {
        apps.push(Dhis2::start(&jar, ports[i], &format!("pw{i}"), uids[i]).await);
    }
    // Each application's first subscription asks for a clear.
    for i in 0..3 {
        m.wait_call_after(i, start).await;
    }
    let msg = |i: usize, k: usize| dhis2_message(uids[i], k);
    let mut sent = [0usize; 3];
    // Phase 1: every subscriber gets every message exactly once, in each
    // origin's order.
    for round in 0..2 {
        for (i, app) in apps.iter_mut().enumerate() {
            sent[i] += 25;
            app.publish(25, sent[i]).await;
            let _ = round;
        }
    }
    for (j, app) in apps.iter().enumerate() {
        let total: usize = sent.iter().sum::<usize>() - sent[j];
        eventually(&format!("{total} messages at app {j}"), LONG, async || {
            let got = app.received().len();
            if got >= total && app.own().len() >= sent[j] {
                Ok(())
            } else {
                Err(format!("only {got}"))
            }
        })
        .await;
        let got = app.received();
        assert_eq!(got.len(), total, "duplicates");
        for (i, uid) in uids.iter().enumerate() {
            let from: Vec<String> = if i == j {
                // Delivered to the publisher too, as Redis does, and dropped.
                assert!(!got.iter().any(|m| m.starts_with(uid)), "own acted on");
                app.own()
            } else {
                got.iter().filter(|m| m.starts_with(uid)).cloned().collect()
            };
            let want: Vec<String> = (1..=sent[i]).map(|k| msg(i, k)).collect();
            assert_eq!(from, want, "origin {i}'s messages, in order");
        }
    }
    // Phase 2: server 1's sidecar crashes (SIGKILL) and comes back; later
    // server 2's sidecar restarts gracefully. Publishing goes on
    // throughout; Lettuce reconnects by itself, as in DHIS 2.
    let mut published_at: Vec<(usize, usize, Instant)> = Vec::new();
    let mut publish_all =
        async |apps: &mut Vec<Dhis2>, sent: &mut [usize; 3], skip: Option<usize>| {
            for (i, app) in apps.iter_mut().enumerate() {
                if Some(i) == skip {
                    continue;
                }
                let t = Instant::now();
                sent[i] += 10;
                app.publish(10, sent[i]).await;
                for k in sent[i] - 9..=sent[i] {
                    published_at.push((i, k, t));
                }
            }
        };
    c.nodes[1].kill9();
    publish_all(&mut apps, &mut sent, Some(1)).await;
    c.nodes[1].spawn();
    c.nodes[1].wait_healthy().await;
    c.wait_connected().await;
    apps[1]
        .wait_line("reconnected", |l| l == "reconnected")
        .await;
    publish_all(&mut apps, &mut sent, None).await;
    c.nodes[2].terminate();
    publish_all(&mut apps, &mut sent, Some(2)).await;
    c.nodes[2].spawn();
    c.nodes[2].wait_healthy().await;
    c.wait_connected().await;
    apps[2]
        .wait_line("reconnected", |l| l == "reconnected")
        .await;
    publish_all(&mut apps, &mut sent, None).await;
    // Every message either reached every application or was followed by a
    // flush hook call on that application's server.
    eventually("every message delivered or flushed", LONG, async || {
        let mut missing = Vec::new();
        for (j, app) in apps.iter().enumerate() {
            let got: std::collections::HashSet<String> = app.received().into_iter().collect();
            let calls = m.calls_for(j);
            for &(i, k, t) in &published_at {
                if i != j && !got.contains(&msg(i, k)) && !calls.iter().any(|c| *c >= t) {
                    missing.push(format!(
                        "app {j} lacks {} with no flush after it",
                        msg(i, k)
                    ));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} uncovered:\n{}",
                missing.len(),
                missing.join("\n")
            ))
        }
    })
    .await;
    // And per origin, what each application got stays in order.
    for app in &apps {
        for (i, uid) in uids.iter().enumerate() {
            let ks: Vec<usize> = app
                .received()
                .iter()
                .filter(|m| m.starts_with(uid))
                .filter_map(|m| dhis2_k(m))
                .collect();
            let mut seen = std::collections::HashSet::new();
            let firsts: Vec<usize> = ks.iter().copied().filter(|k| seen.insert(*k)).collect();
            assert!(
                firsts.windows(2).all(|w| w[0] < w[1]),
                "origin {i} out of order: {firsts:?}"
            );
        }
    }
    assert_eq!(
        *m.refused.lock().expect("lock"),
        0,
        "credentials were refused"
    );
}

/// Waits until `app` has acted on `want` (in that order, nothing else)
/// from the instance `uid`.
async fn wait_from(app: &Dhis2, uid: &str, want: &[String], what: &str) {
    let from = eventually(what, LONG, async || {
        let from: Vec<String> = app
            .received()
            .into_iter()
            .filter(|m| m.starts_with(uid))
            .collect();
        if from.len() >= want.len() {
            Ok(from)
        } else {
            Err(format!("only {from:?}"))
        }
    })
    .await;
    assert_eq!(from, want, "{what}: in order, once each");
}

/// The Lettuce of every DHIS 2 release line, wired as DHIS 2 wires it, on
/// two sidecars: one with `redis.password`, one without (DHIS 2 then gives
/// Lettuce the empty password, which 6.8 sends in `HELLO 3 AUTH`). Each
/// instance acts on the other's messages, in order, and drops its own;
/// what one publishes while its sidecar restarts is queued by Lettuce and
/// reaches the other instance, in order, once the sidecar is back. A third
/// listener, pinned to RESP2, beside the first, gets both instances'
/// messages in order and resubscribes after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lettuce_of_every_dhis2_release_line_works_across_sidecars_and_a_restart() {
    let Some(jars) = tokio::task::spawn_blocking(lettuce_jars)
        .await
        .expect("build")
    else {
        return;
    };
    let uids = ["uidAAAAAAAAA", "uidBBBBBBBBB", "uidCCCCCCCCC"];
    for (version, jar) in &jars {
        let t = Instant::now();
        let mut c = Cluster::new(2, "");
        let ports = with_resp(&c, "");
        let mut text = std::fs::read_to_string(&c.nodes[0].conf).expect("conf");
        text.push_str("redis.password = pw0\n");
        std::fs::write(&c.nodes[0].conf, text).expect("conf");
        c.start_all().await;
        c.wait_connected().await;
        let mut a = Dhis2::start(jar, ports[0], "pw0", uids[0]).await;
        let mut b = Dhis2::start(jar, ports[1], "", uids[1]).await;
        // A listener in RESP2 beside a, through the same restart.
        let r2 = Dhis2::start_with(jar, ports[0], "pw0", uids[2], Some("RESP2")).await;
        // What each connection negotiated: RESP3 (HELLO 3) for every
        // version unless pinned, and from 6.3 on the library's name and
        // version (CLIENT SETINFO, after HELLO 3 AUTH default with the
        // empty password).
        let requests = [
            (ports[0], cmds(&[&["AUTH", "pw0"], &["CLIENT", "LIST"]])),
            (ports[1], cmd(&["CLIENT", "LIST"])),
        ];
        for (port, request) in requests {
            let reply = exchange(port, &request).await;
            let reply = String::from_utf8_lossy(&reply);
            let list = reply.trim_start_matches("+OK\r\n");
            let list = text_of(list.as_bytes());
            let apps: Vec<Vec<(String, String)>> = list
                .lines()
                .map(client_fields)
                .filter(|f| !f.iter().any(|(k, v)| k == "cmd" && v == "client|list"))
                .collect();
            let resp2 = if port == ports[0] { 2 } else { 0 };
            assert_eq!(apps.len(), 2 + resp2, "{version}: {list}");
            let want_lib = if *version == "6.1.6" {
                ("", "")
            } else {
                ("Lettuce", *version)
            };
            for f in &apps {
                let get = |key: &str| {
                    f.iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                assert!(
                    ["2", "3"].contains(&get("resp").as_str()),
                    "{version}: {list}"
                );
                assert_eq!(get("lib-name"), want_lib.0, "{version}: {list}");
                assert!(get("lib-ver").starts_with(want_lib.1), "{version}: {list}");
            }
            let in_resp2 = apps
                .iter()
                .filter(|f| f.iter().any(|(k, v)| k == "resp" && v == "2"))
                .count();
            assert_eq!(in_resp2, resp2, "{version}: {list}");
        }
        let from = |i: usize, ks: std::ops::RangeInclusive<usize>| -> Vec<String> {
            ks.map(|k| dhis2_message(uids[i], k)).collect()
        };
        a.publish(9, 9).await;
        b.publish(9, 9).await;
        wait_from(
            &b,
            uids[0],
            &from(0, 1..=9),
            &format!("{version}: b from a"),
        )
        .await;
        wait_from(
            &a,
            uids[1],
            &from(1, 1..=9),
            &format!("{version}: a from b"),
        )
        .await;
        wait_from(
            &r2,
            uids[0],
            &from(0, 1..=9),
            &format!("{version}: RESP2 from a"),
        )
        .await;
        wait_from(
            &r2,
            uids[1],
            &from(1, 1..=9),
            &format!("{version}: RESP2 from b"),
        )
        .await;
        wait_until(&format!("{version}: own messages delivered"), LONG, || {
            a.own().len() >= 9 && b.own().len() >= 9
        })
        .await;
        assert_eq!(a.own(), from(0, 1..=9), "{version}: a's own, dropped");
        assert_eq!(b.own(), from(1, 1..=9), "{version}: b's own, dropped");
        // a's sidecar restarts; a publishes meanwhile, as DHIS 2 goes on
        // saving objects: Lettuce queues the commands until it is back.
        c.nodes[0].terminate();
        a.wait_line("disconnected", |l| l == "disconnected").await;
        a.send(9).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.nodes[0].spawn();
        c.nodes[0].wait_healthy().await;
        c.wait_connected().await;
        a.wait_line("published 18", |l| l == "published 18").await;
        a.wait_line("reconnected", |l| l == "reconnected").await;
        r2.wait_line("reconnected", |l| l == "reconnected").await;
        wait_from(
            &b,
            uids[0],
            &from(0, 1..=18),
            &format!("{version}: b from a, queued"),
        )
        .await;
        b.publish(9, 18).await;
        for (name, app) in [("a", &a), ("RESP2", &r2)] {
            let last = dhis2_message(uids[1], 18);
            wait_until(&format!("{version}: {name} to get {last}"), LONG, || {
                app.received().contains(&last)
            })
            .await;
            for uid in &uids {
                let ks: Vec<usize> = app
                    .received()
                    .iter()
                    .filter(|m| m.starts_with(uid))
                    .filter_map(|m| dhis2_k(m))
                    .collect();
                assert!(
                    ks.windows(2).all(|w| w[0] < w[1]),
                    "{version}: {name} got {ks:?}"
                );
            }
        }
        eprintln!("Lettuce {version}: {:?}", t.elapsed());
    }
}

/// A sidecar with the Redis-protocol endpoint and a flush hook to `url`.
async fn with_hook(url: &str, dir: &Path) -> (Cluster, u16) {
    let mut c = Cluster::new(1, "");
    let port = free_port();
    let mut text = std::fs::read_to_string(&c.nodes[0].conf).expect("conf");
    text.push_str(&format!(
        "cachecast.resp.port = {port}\n{}",
        hook_conf(url, dir, 0)
    ));
    std::fs::write(&c.nodes[0].conf, text).expect("conf");
    c.start_all().await;
    (c, port)
}

async fn subscribed(port: u16, channel: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&cmd(&["SUBSCRIBE", channel]))
        .await
        .expect("write");
    let want = format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
        channel.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&read_n(&mut s, want.len()).await),
        want
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_lost_beside_another_is_covered_by_the_hook() {
    let m = Maintenance::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let (c, port) = with_hook(&m.url(0), dir.path()).await;
    // The application, then an operator's subscriber beside it.
    let start = Instant::now();
    let app = subscribed(port, "dhis2_cache_invalidation").await;
    m.wait_call_after(0, start).await;
    let _operator = subscribed(port, "dhis2_cache_invalidation").await;
    // The application's connection dies (no UNSUBSCRIBE): while the
    // operator stays subscribed, the hook covers what the application
    // misses until it is back...
    let calls = metric(&c.nodes[0], "cachecast_flush_hook_calls_total").await;
    let died = Instant::now();
    drop(app);
    m.wait_call_after(0, died).await;
    // ...and its return counts as a gap too, though a subscriber stayed.
    let wait_calls = async |n: u64| {
        c.nodes[0]
            .wait_metric("cachecast_flush_hook_calls_total", |v| v >= n)
            .await
    };
    wait_calls(calls + 1).await;
    let back = Instant::now();
    let _app = subscribed(port, "dhis2_cache_invalidation").await;
    m.wait_call_after(0, back).await;
    // A pattern too long to match cheaply, and the connection goes on.
    let long = "p".repeat(2000);
    let out = exchange(port, &cmds(&[&["PSUBSCRIBE", &long], &["PING"]])).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "-ERR patterns are limited to 1024 bytes here (this one has 2000)\r\n+PONG\r\n+OK\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_a_cleared_cache() {
    let m = Maintenance::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("http://{}/redirect", m.addr);
    let (c, port) = with_hook(&url, dir.path()).await;
    let _sub = subscribed(port, "c").await;
    let st = c.nodes[0]
        .wait_status("a failed hook call", |st| {
            st["sidecar"]["flush_hook"]["failures"].as_u64() >= Some(1)
        })
        .await;
    let hook = &st["sidecar"]["flush_hook"];
    assert_eq!(hook["pending"], true, "{hook}");
    assert_eq!(hook["calls"], 0, "{hook}");
    assert!(
        hook["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("redirect"),
        "{hook}"
    );
    assert!(
        c.nodes[0].log_text().contains("flush hook refused")
            || c.nodes[0].log_text().contains("flush hook call failed")
    );
}

/// Without `redis.password`, any local process can subscribe to fresh
/// channel names in a loop, each a first subscriber that asks for the
/// flush hook. The calls that causes are bounded by the rate (a burst,
/// then one per period), never dropped: the call held back comes once the
/// rate allows, after every subscription it covers; and a flush from
/// elsewhere (here the API) is not held back by the rate at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_subscriptions_in_a_loop_call_the_hook_at_a_bounded_rate_and_none_is_lost() {
    let burst = cachecast::sidecar::SUBSCRIBER_BURST as usize;
    let refill = cachecast::sidecar::SUBSCRIBER_REFILL;
    let m = Maintenance::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let (c, port) = with_hook(&m.url(0), dir.path()).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut last = start;
    for i in 1..=20 {
        last = Instant::now();
        let channel = format!("fresh-{i:02}");
        s.write_all(&cmd(&["SUBSCRIBE", &channel]))
            .await
            .expect("write");
        let want = format!("*3\r\n$9\r\nsubscribe\r\n$8\r\n{channel}\r\n:{i}\r\n");
        assert_eq!(
            String::from_utf8_lossy(&read_n(&mut s, want.len()).await),
            want
        );
        // Room for the call it asks for to be made, so that coalescing
        // alone would make one call per subscription.
        let deadline = Instant::now() + Duration::from_millis(150);
        while Instant::now() < deadline && !m.calls_for(0).iter().any(|t| *t >= last) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let made = m.calls_for(0).len();
    let periods = (start.elapsed().as_secs_f64() / refill.as_secs_f64()).floor() as usize;
    assert!(
        made <= burst + periods,
        "{made} hook calls for 20 subscriptions in {:?}",
        start.elapsed()
    );
    let status = c.nodes[0].status().await;
    let hook = &status["sidecar"]["flush_hook"];
    assert_eq!(hook["pending"], true, "the held-back call is owed: {hook}");
    assert!(
        metric(&c.nodes[0], "cachecast_flush_hook_rate_limited_total").await >= 10,
        "{hook}"
    );
    // The last subscription is covered all the same, once the rate allows.
    m.wait_call_after(0, last).await;
    c.nodes[0]
        .wait_status("nothing owed", |st| {
            st["sidecar"]["flush_hook"]["pending"] == false
        })
        .await;
    // The rate is spent again; a flush from the API is not held back, and
    // covers the subscription held back meanwhile.
    let held = subscribed(port, "fresh-21").await;
    // Taken before the request: its call may be made before the answer.
    let asked = Instant::now();
    let r = common::procs::client()
        .post(c.nodes[0].url("/v1/invalidate"))
        .json(&serde_json::json!({"flush": true}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    // That it is not held to the rate is the unit test's to show (a
    // wall-clock bound here would flicker on a loaded machine); here it
    // must come, retries and all.
    eventually("a hook call for the API's flush", 3 * LONG, async || {
        if m.calls_for(0).iter().any(|t| *t >= asked) {
            return Ok(());
        }
        let log = c.nodes[0].log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        Err(format!(
            "status {}\nlog (last lines first):\n{}",
            c.nodes[0].status().await["sidecar"]["flush_hook"],
            tail.join("\n")
        ))
    })
    .await;
    drop(held);
}

/// Whether `tool` runs here. Unlike [`have`], not required in CI: the
/// clients of other languages are checked where their toolchain is
/// installed, and skipped, saying why, elsewhere.
fn optional_tool(tool: &str, args: &[&str], what: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: {what}: {tool} is not installed here");
    }
    ok
}

/// Runs a client check of tests/clients (subscribers through the first
/// sidecar of a pair, publishers through the second; the first with a
/// password, the second without) and restarts the subscribers' sidecar
/// when the check says `restart`. Returns the check's output once it says
/// `done`.
async fn client_check(mut cmd: tokio::process::Command, what: &str) -> String {
    let mut c = Cluster::new(2, "");
    let ports = with_resp(&c, "");
    let mut text = std::fs::read_to_string(&c.nodes[0].conf).expect("conf");
    text.push_str("redis.password = sub-pw\n");
    std::fs::write(&c.nodes[0].conf, text).expect("conf");
    c.start_all().await;
    c.wait_connected().await;
    let mut child = cmd
        .args([&ports[0].to_string(), "sub-pw", &ports[1].to_string(), "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("client check");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{what}: no end within 120 s:\n{out}"))
            .expect("read");
        let Some(line) = line else {
            panic!("{what}: ended without done:\n{out}");
        };
        out.push_str(&line);
        out.push('\n');
        assert!(!line.starts_with("FAIL"), "{what}:\n{out}");
        if line == "restart" {
            c.nodes[0].terminate();
            c.nodes[0].spawn();
            c.nodes[0].wait_healthy().await;
            c.wait_connected().await;
            stdin.write_all(b"restarted\n").await.expect("stdin");
        }
        if line == "done" {
            break;
        }
    }
    assert!(
        child.wait().await.expect("wait").success(),
        "{what}:\n{out}"
    );
    out
}

/// ioredis and node-redis on their default options (tests/clients/node):
/// ioredis's ready check sends INFO and subscribes only if that succeeds.
/// Every message published through one sidecar reaches the subscriber on
/// the other, in order, before and after the subscriber's sidecar
/// restarts; node-redis in RESP2 and RESP3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioredis_and_node_redis_on_defaults_get_every_message_across_sidecars() {
    let what = "ioredis and node-redis";
    if !optional_tool("node", &["--version"], what) || !optional_tool("npm", &["--version"], what) {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node");
    // `npm ci` (from npm's cache after the first run) when the installed
    // packages are not those of package-lock.json.
    let installed = dir.join("node_modules/.package-lock.json");
    let current = std::fs::metadata(&installed)
        .and_then(|m| m.modified())
        .ok()
        .zip(
            std::fs::metadata(dir.join("package-lock.json"))
                .and_then(|m| m.modified())
                .ok(),
        )
        .is_some_and(|(i, l)| i >= l);
    if !current {
        let t = Instant::now();
        let out = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .await
            .expect("npm");
        if !out.status.success() {
            eprintln!(
                "SKIPPED: {what}: npm ci failed (registry unreachable?):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        eprintln!("npm ci: {:?}", t.elapsed());
    }
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(dir.join("check.mjs"));
    let out = client_check(cmd, what).await;
    eprint!("{out}");
    for client in ["ioredis", "node-redis-resp2", "node-redis-resp3"] {
        for phase in ["before", "after"] {
            assert!(
                out.contains(&format!("ok {client} {phase} 200\n")),
                "{client} {phase}:\n{out}"
            );
        }
    }
}

/// go-redis v9 on its default options (tests/clients/go), in RESP2 and
/// RESP3: every message published through one sidecar reaches the
/// subscriber on the other, in order, before and after the subscriber's
/// sidecar restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_redis_gets_every_message_across_sidecars() {
    let what = "go-redis";
    if !optional_tool("go", &["version"], what) {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/go");
    // Modules come from the Go proxy once, then from the module cache. An
    // older Go than go.mod asks for skips rather than fetch a toolchain.
    let t = Instant::now();
    let out = tokio::process::Command::new("go")
        .args(["mod", "download"])
        .env("GOTOOLCHAIN", "local")
        .current_dir(&dir)
        .output()
        .await
        .expect("go");
    if !out.status.success() {
        eprintln!(
            "SKIPPED: {what}: go mod download failed (proxy unreachable, or Go older than go.mod's):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-check");
    let out = tokio::process::Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(".")
        .env("GOTOOLCHAIN", "local")
        .current_dir(&dir)
        .output()
        .await
        .expect("go");
    assert!(
        out.status.success(),
        "go build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("go-redis check built in {:?}", t.elapsed());
    let out = client_check(tokio::process::Command::new(&bin), what).await;
    eprint!("{out}");
    for client in ["go-redis-resp2", "go-redis-resp3"] {
        for phase in ["before", "after"] {
            assert!(
                out.contains(&format!("ok {client} {phase} 200\n")),
                "{client} {phase}:\n{out}"
            );
        }
    }
}

/// Jedis 6.2 (RESP2 and RESP3, resubscribing as applications do),
/// Redisson 3.52 (25 connections per client) and Spring Data Redis's
/// listener container (tests/clients/jvm): every message published through
/// one sidecar reaches the subscriber on the other, in order, before and
/// after the subscriber's sidecar restarts; Spring Boot's Redis health
/// indicator reports UP with the version INFO gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jedis_redisson_and_spring_get_every_message_across_sidecars() {
    if tokio::task::spawn_blocking(lettuce_jars)
        .await
        .expect("build")
        .is_none()
    {
        return;
    }
    let mut cmd = tokio::process::Command::new("java");
    cmd.arg("-jar").arg(jvm_jar());
    let out = client_check(cmd, "Jedis, Redisson, Spring").await;
    eprint!("{out}");
    for client in ["jedis-resp2", "jedis-resp3", "redisson", "spring-listener"] {
        for phase in ["before", "after"] {
            assert!(
                out.contains(&format!("ok {client} {phase} 200\n")),
                "{client} {phase}:\n{out}"
            );
        }
    }
    for phase in ["before", "after"] {
        assert!(
            out.contains(&format!("ok spring-health {phase} UP 7.")),
            "health {phase}:\n{out}"
        );
    }
}
