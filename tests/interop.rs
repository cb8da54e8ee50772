//! Interoperability with a peer written in Java from `proto/PROTOCOL.md`
//! alone (`tests/interop/Peer.java`, no code shared with the crate): the
//! golden vectors, handshakes with and without a shared secret, batches
//! and acks both ways, clean and unclean restarts on either side. The Java
//! peer is strict: whatever it finds out of spec in what the node sends, it
//! reports as an `error` line, and any such line fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cachecast::Event;
use cachecast::config::SecretSource;
use common::{Cluster, check_no_silent_gap};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Notify;

const LONG: Duration = Duration::from_secs(20);
const CACHE: &str = "org.hisp.dhis.user.User";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the Java peer once per test run; the classes directory.
fn classes() -> &'static PathBuf {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("java-peer");
        std::fs::create_dir_all(&dir).expect("classes dir");
        let out = std::process::Command::new("javac")
            .arg("-encoding")
            .arg("UTF-8")
            .arg("-d")
            .arg(&dir)
            .arg(manifest_dir().join("tests/interop/Peer.java"))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "javac not found ({e}): these tests need a JDK, 11 or later \
                     (Debian: apt-get install default-jdk-headless; .ci/run installs it)"
                )
            });
        assert!(
            out.status.success(),
            "javac failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// The node's log, shown with a failing test's output.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("cachecast=info")
        .try_init();
}

/// Lines a child printed, shared with the task that reads them.
#[derive(Clone, Default)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
}

impl Lines {
    fn follow(&self, stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rd = BufReader::new(stream).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                me.lines.lock().expect("lines").push(line);
                me.changed.notify_waiters();
            }
        });
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

/// One run of the Java peer.
struct JavaPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Lines,
    err: Lines,
}

impl JavaPeer {
    fn start(args: &[&str]) -> JavaPeer {
        let mut child = Command::new("java")
            .arg("-cp")
            .arg(classes())
            .arg("Peer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("java not found ({e}): these tests need a JDK"));
        let (out, err) = (Lines::default(), Lines::default());
        out.follow(child.stdout.take().expect("stdout"));
        err.follow(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        JavaPeer {
            child,
            stdin,
            out,
            err,
        }
    }

    /// What it printed, for failure messages.
    fn transcript(&self) -> String {
        let out = self.out.snapshot();
        let err = self.err.snapshot();
        let tail = |v: &[String]| v[v.len().saturating_sub(15)..].join("\n  ");
        format!(
            "stdout ({} lines, last):\n  {}\nstderr (last):\n  {}",
            out.len(),
            tail(&out),
            tail(&err)
        )
    }

    /// Waits for a stdout line that satisfies `pred`; fails on any `error`.
    async fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            let notified = self.out.changed.notified();
            let lines = self.out.snapshot();
            self.assert_no_error_in(&lines);
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    panic!("timed out after {LONG:?} waiting for the Java peer to print {what}\n{}", self.transcript());
                }
            }
        }
    }

    fn assert_no_error_in(&self, lines: &[String]) {
        if let Some(e) = lines.iter().find(|l| l.starts_with("error")) {
            panic!(
                "the Java peer found the node out of spec: {e}\n{}",
                self.transcript()
            );
        }
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.out.snapshot().iter().filter(|l| pred(l)).count()
    }

    async fn command(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write to the Java peer");
        stdin.flush().await.expect("flush");
    }

    async fn exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(LONG, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("the Java peer did not exit\n{}", self.transcript()),
        }
    }

    /// `goodbye`: a graceful shutdown, exit status 0.
    async fn goodbye(&mut self) {
        self.command("goodbye").await;
        self.wait_line("bye", |l| l == "bye").await;
        let status = self.exit().await;
        assert!(
            status.success(),
            "goodbye exit: {status}\n{}",
            self.transcript()
        );
        self.assert_no_error_in(&self.out.snapshot());
    }

    /// `crash`: gone without a goodbye.
    async fn crash(&mut self) {
        self.command("crash").await;
        let status = self.exit().await;
        assert_eq!(status.code(), Some(3), "crash exit\n{}", self.transcript());
        self.assert_no_error_in(&self.out.snapshot());
    }
}

/// A cluster of two: node 0 is a real node, port 1 is left for the Java
/// peer (its listener is released just before the peer binds it).
async fn node_and_java_port(secret: Option<&str>) -> Cluster {
    let (mut c, mut listeners) = Cluster::reserve(2).await;
    if let Some(s) = secret {
        let s = s.to_string();
        c.customize = Some(Arc::new(move |_, cfg| {
            cfg.secret = Some(SecretSource::Inline(s.clone()));
        }));
    }
    drop(listeners.pop());
    c.start_node(0, listeners.pop()).await;
    c
}

/// The Java peer's arguments: its identity, the node's, then `extra`.
fn java_args<'a>(ids: &'a [String; 2], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--id", ids[1].as_str(), "--node", ids[0].as_str()];
    v.extend_from_slice(extra);
    v
}

/// Invalidations from origin `origin` that reached the node, as (seq, key).
fn keys_from(events: &[Event], origin: &str) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Invalidated {
                origin: o,
                seq,
                cache,
                key,
            } if **o == *origin && **cache == *CACHE => Some((*seq, key.to_string())),
            _ => None,
        })
        .collect()
}

fn flushes_from(events: &[Event], origin: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Flush { origin: Some(o), .. } if **o == *origin))
        .count()
}

#[test]
fn java_peer_decodes_and_reencodes_the_golden_vectors() {
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(classes())
        .arg("Peer")
        .arg("--selftest")
        .arg("--vectors")
        .arg(manifest_dir().join("proto/vectors"))
        .output()
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "selftest ok"),
        "selftest: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Java → node and node → Java, then a clean and an unclean restart of the
/// Java peer (the node flushes for the crash only), then the same of the
/// node (the Java peer flushes for the crash only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_peer_and_node_exchange_invalidations_and_restart_both_ways() {
    logs();
    let mut c = node_and_java_port(None).await;
    let ids = [c.id(0), c.id(1)];
    let java_id = ids[1].clone();

    // Java originates 1000, in batches of 64.
    let mut java = JavaPeer::start(&java_args(&ids, &["--send", "1000", "--batch", "64"]));
    java.wait_line("acked 1000", |l| l == "acked 1000").await;
    let rec = c.recorders[0].clone();
    let evs = rec.events();
    assert_eq!(check_no_silent_gap(&evs, &java_id, 1000), (0, 0));
    let got = keys_from(&evs, &java_id);
    let want: Vec<(u64, String)> = (1..=1000).map(|i| (i, format!("java-{i}"))).collect();
    assert_eq!(got, want, "the node applied the Java peer's stream");

    // The node originates 500 keys (one not ASCII), a whole cache and then
    // a flush; the Java peer applies them in order. (The flush waits for the
    // rest to arrive: a local flush drops what is still queued, 9.2.)
    java.wait_line("inbound-up", |l| l.starts_with("inbound-up"))
        .await;
    let h = c.h(0).clone();
    for k in 1..=500u64 {
        let key = if k == 250 {
            "café🔑 with spaces".to_string()
        } else {
            format!("rust-{k}")
        };
        assert_eq!(h.invalidate(CACHE, &key).expect("send"), k);
    }
    h.invalidate_cache("org.hisp.dhis.dataelement.DataElement")
        .expect("send");
    java.wait_line("cache 501", |l| l.starts_with("cache 501 "))
        .await;
    h.flush().expect("send");
    java.wait_line("flush 502", |l| l == "flush 502").await;
    let lines = java.out.snapshot();
    let applied: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("key ") || l.starts_with("cache ") || l.starts_with("flush "))
        .collect();
    let mut want: Vec<String> = (1..=500u64)
        .map(|k| {
            if k == 250 {
                format!("key 250 {CACHE} café🔑 with spaces")
            } else {
                format!("key {k} {CACHE} rust-{k}")
            }
        })
        .collect();
    want.push("cache 501 org.hisp.dhis.dataelement.DataElement".to_string());
    want.push("flush 502".to_string());
    assert_eq!(applied, want.iter().collect::<Vec<_>>());
    assert_eq!(java.count(|l| l.starts_with("flush-local")), 0);
    // The node knows the Java peer applied all of it.
    let hs = h.clone();
    common::wait_until("the Java peer's acks", LONG, || {
        hs.status().peers[0].acked_seq == 502
    })
    .await;

    // A clean restart of the Java peer costs the node no flush...
    java.goodbye().await;
    let before = java.transcript();
    let mut java = JavaPeer::start(&java_args(&ids, &["--send", "10"]));
    java.wait_line("acked 10", |l| l == "acked 10").await;
    let evs = rec.events();
    assert_eq!(
        flushes_from(&evs, &java_id),
        0,
        "clean restart: no flush; {:?}\nBEFORE {before}\n{}",
        evs.iter()
            .filter(|e| matches!(
                e,
                Event::Flush { .. } | Event::PeerUp { .. } | Event::PeerDown { .. }
            ))
            .collect::<Vec<_>>(),
        java.transcript()
    );
    assert_eq!(keys_from(&evs, &java_id).len(), 1010);
    // ...a crash costs one.
    java.crash().await;
    let mut java = JavaPeer::start(&java_args(&ids, &["--send", "1"]));
    java.wait_line("acked 1", |l| l == "acked 1").await;
    assert_eq!(flushes_from(&rec.events(), &java_id), 1, "crash: one flush");

    // The node restarts cleanly: the Java peer takes it without a flush.
    java.wait_line("inbound-up", |l| l.starts_with("inbound-up"))
        .await;
    c.nodes[0].take().expect("node").shutdown().await;
    c.start_node(0, None).await;
    c.h(0)
        .invalidate(CACHE, "after-clean-restart")
        .expect("send");
    java.wait_line("the key after the clean restart", |l| {
        l == format!("key 1 {CACHE} after-clean-restart")
    })
    .await;
    assert_eq!(
        java.count(|l| l.starts_with("flush-local")),
        0,
        "clean restart of the node: no flush\n{}",
        java.transcript()
    );
    // The node crashes: one flush at the Java peer.
    c.nodes[0].take().expect("node").abort().await;
    c.start_node(0, None).await;
    c.h(0).invalidate(CACHE, "after-crash").expect("send");
    java.wait_line("the key after the crash", |l| {
        l == format!("key 1 {CACHE} after-crash")
    })
    .await;
    assert_eq!(
        java.count(|l| l.starts_with("flush-local")),
        1,
        "crash of the node: one flush\n{}",
        java.transcript()
    );
    java.goodbye().await;
    c.shutdown_all().await;
}

/// With a shared secret on both sides (HMAC proofs of section 7.4) the
/// streams flow both ways; a Java peer with another secret is refused and
/// nothing of it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_peer_with_the_shared_secret_is_accepted_and_without_it_refused() {
    logs();
    let secret = "a shared secret of 32 bytes, ok!";
    let mut c = node_and_java_port(Some(secret)).await;
    let ids = [c.id(0), c.id(1)];
    let java_id = ids[1].clone();

    let mut wrong = JavaPeer::start(&java_args(
        &ids,
        &["--send", "5", "--secret", "not the secret, but as long!!"],
    ));
    let h = c.h(0).clone();
    common::wait_until("the node refuses the wrong proof", LONG, || {
        let st = h.status();
        st.counters.rejected_auth >= 1
            && st.peers[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("secret"))
    })
    .await;
    let lines = wrong.out.snapshot();
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("outbound-up") || l.starts_with("inbound-up")),
        "a handshake completed with the wrong secret\n{}",
        wrong.transcript()
    );
    assert!(keys_from(&c.recorders[0].events(), &java_id).is_empty());
    // Its `error` lines (the node refused it) are expected here.
    wrong.command("crash").await;
    wrong.exit().await;

    let mut java = JavaPeer::start(&java_args(&ids, &["--send", "200", "--secret", secret]));
    java.wait_line("acked 200", |l| l == "acked 200").await;
    java.wait_line("inbound-up", |l| l.starts_with("inbound-up"))
        .await;
    for k in 1..=200u64 {
        h.invalidate(CACHE, &format!("rust-{k}")).expect("send");
    }
    java.wait_line("key 200", |l| l.starts_with("key 200 "))
        .await;
    let evs = c.recorders[0].events();
    assert_eq!(check_no_silent_gap(&evs, &java_id, 200), (0, 0));
    assert_eq!(java.count(|l| l.starts_with("key ")), 200);
    java.goodbye().await;
    c.shutdown_all().await;
}
