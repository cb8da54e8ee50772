//! Attacks on the peer port: each is refused with a counter, and the mesh
//! between the real peers keeps delivering throughout.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachecast::config::{SecretSource, TlsFiles};
use cachecast::wire::{FrameCodec, Hello, MAGIC, Message, PROTOCOL_VERSION};
use cachecast::{ClusterConfig, Event, MeshHandle};
use common::{Cluster, Customize, check_no_silent_gap, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Encoder;

const LONG: Duration = Duration::from_secs(30);

fn secret(s: &str) -> SecretSource {
    SecretSource::Inline(s.to_string())
}

fn with(f: impl Fn(usize, &mut ClusterConfig) + Send + Sync + 'static) -> Option<Customize> {
    Some(Arc::new(f))
}

/// Node 0 streams to node 1 in the background until stopped; returns how
/// many it sent.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(h: MeshHandle) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                h.invalidate("c", &n.load(Ordering::Relaxed).to_string())
                    .expect("send");
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        Traffic { stop, sent, task }
    }

    /// Stops and checks that node 1 got every invalidation, no flush.
    async fn finish(self, c: &Cluster) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("traffic");
        let total = self.sent.load(Ordering::Relaxed);
        assert!(total > 10, "traffic ran");
        c.recorders[1]
            .wait_for("all traffic delivered", LONG, |evs| {
                evs.iter()
                    .any(|e| matches!(e, Event::Invalidated { seq, .. } if *seq == total))
            })
            .await;
        let (missing, flushes) = check_no_silent_gap(&c.recorders[1].events(), &c.id(0), total);
        assert_eq!((missing, flushes), (0, 0), "delivery during the attack");
    }
}

async fn secured_pair(s0: &str, s1: &str) -> Cluster {
    let (mut c, listeners) = Cluster::reserve(2).await;
    let (a, b) = (s0.to_string(), s1.to_string());
    c.customize = with(move |i, cfg| {
        let s = if i == 0 { &a } else { &b };
        if !s.is_empty() {
            cfg.secret = Some(secret(s));
        }
    });
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    c
}

/// Waits until the node's link to its first peer last failed for a reason
/// that says `needle`.
async fn last_error_says(h: &MeshHandle, what: &str, needle: &str) {
    wait_until(what, LONG, || {
        h.status().peers[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(needle))
    })
    .await;
}

fn counters(h: &MeshHandle) -> cachecast::Counters {
    h.status().counters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_the_same_secret_connect() {
    let c = secured_pair(
        "correct horse battery staple",
        "correct horse battery staple",
    )
    .await;
    c.wait_connected(Duration::from_secs(5)).await;
    let t = Traffic::start(c.h(0).clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.finish(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_on_both_sides() {
    let c = secured_pair(
        "correct horse battery staple",
        "wrong horse battery staple!",
    )
    .await;
    for i in 0..2 {
        let h = c.h(i).clone();
        wait_until("auth rejections counted", LONG, || {
            counters(&h).rejected_auth >= 1
        })
        .await;
        last_error_says(&h, "the dialer says why", "secret").await;
        assert!(!h.status().peers[0].connected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_on_one_side_only_is_refused() {
    let c = secured_pair("correct horse battery staple", "").await;
    for i in 0..2 {
        let h = c.h(i).clone();
        wait_until("refusals", LONG, || counters(&h).rejected_auth >= 1).await;
        last_error_says(&h, "a clear reason", "shared secret").await;
    }
}

/// What a dialer sent, one recording per connection, oldest first.
type Recordings = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// Forwards every connection to `target` and records what each dialer
/// sends, to replay it later. Every connection is forwarded: a dial that
/// waits for its answer is made again when the peer reaches the dialer
/// first, and that second dial is the one that becomes the link.
async fn recording_proxy(target: SocketAddr) -> (SocketAddr, Recordings) {
    let listener = common::bind().await;
    let addr = listener.local_addr().expect("addr");
    let recordings: Recordings = Arc::default();
    let all = recordings.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let place = {
                let mut all = all.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            let all = all.clone();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    all.lock().unwrap()[place].extend_from_slice(&buf[..n]);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, recordings)
}

/// Two nodes with a secret, node 0 dialling node 1 through a proxy that
/// records what it sends; node 1's address and what the dial that became
/// the link sent (the last one: no dial follows a link that is up).
async fn recorded_secured_pair() -> (Cluster, SocketAddr, Vec<u8>) {
    let (mut c, listeners) = Cluster::reserve(2).await;
    c.customize = with(|_, cfg| cfg.secret = Some(secret("correct horse battery staple")));
    let target = SocketAddr::from(([127, 0, 0, 1], c.ports[1]));
    let (proxy, recordings) = recording_proxy(target).await;
    c.via.insert((0, 1), proxy);
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    c.wait_connected(Duration::from_secs(5)).await;
    let last = recordings.lock().unwrap().last().cloned();
    (c, target, last.expect("the link's connection was recorded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_is_refused() {
    let (c, target, bytes) = recorded_secured_pair().await;
    // Node 0's hello and proof, as an eavesdropper saw them.
    assert!(bytes.len() > 100, "recorded the handshake");
    let before = counters(c.h(1)).rejected_auth;
    let mut s = TcpStream::connect(target).await.expect("connect");
    s.write_all(&bytes).await.expect("replay");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("authentication failed"), "{text}");
    let h1 = c.h(1).clone();
    wait_until("counted", LONG, || counters(&h1).rejected_auth > before).await;
    // The real link is untouched.
    let t = Traffic::start(c.h(0).clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.finish(&c).await;
}

/// A dialer that sends its hello and then gives up (its connect timeout
/// ran out, or it was stopped while its dial waited in the backlog) is a
/// broken handshake, not a failed authentication: the auth counter is what
/// operators alert on for someone without the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_that_leaves_before_its_proof_is_no_auth_failure() {
    let (c, target, bytes) = recorded_secured_pair().await;
    // Node 0's hello frame alone, without the proof that followed it.
    let len = u32::from_be_bytes(bytes[..4].try_into().expect("length")) as usize;
    let hello = bytes[..4 + len].to_vec();
    let before = counters(c.h(1));
    let mut s = TcpStream::connect(target).await.expect("connect");
    s.write_all(&hello).await.expect("hello");
    let mut answer = [0u8; 256];
    let n = tokio::time::timeout(LONG, s.read(&mut answer))
        .await
        .expect("an answer")
        .expect("read");
    assert!(n > 0, "the node answered the hello with its own");
    drop(s);
    let h1 = c.h(1).clone();
    wait_until("counted", LONG, || {
        counters(&h1).rejected_handshake > before.rejected_handshake
    })
    .await;
    assert_eq!(counters(&h1).rejected_auth, before.rejected_auth);
}

/// Connects to `target` from `source` (another loopback address).
async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    sock.connect(target).await
}

/// True when the server closed the connection (EOF or reset) in time.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a Reject frame, then the close
        }
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    FrameCodec::new().encode(msg, &mut buf).expect("encode");
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_garbage_are_refused_while_peers_keep_delivering() {
    let (mut c, listeners) = Cluster::reserve(2).await;
    c.tuning.hello_timeout = Duration::from_secs(1);
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    c.wait_connected(Duration::from_secs(5)).await;
    let t = Traffic::start(c.h(0).clone());
    let target = SocketAddr::from(([127, 0, 0, 1], c.ports[1]));
    let h1 = c.h(1).clone();
    let stranger: IpAddr = "127.0.0.2".parse().expect("ip");

    // A source address that is no peer's: closed before any byte is read.
    let mut s = connect_from(stranger, target).await.expect("connect");
    let _ = s.write_all(&frame(&Message::Ping)).await;
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
    wait_until("not-allowed counted", LONG, || {
        counters(&h1).rejected_not_allowed >= 1
    })
    .await;

    // 1000 connections at once from the stranger.
    let mut conns = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = connect_from(stranger, target).await {
            conns.push(s);
        }
    }
    wait_until("1000 strangers refused", LONG, || {
        counters(&h1).rejected_not_allowed >= 1000
    })
    .await;
    drop(conns);

    // From a peer's address (loopback), but garbage.
    let bad_frames: Vec<(&str, Vec<u8>)> = vec![
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("2 GiB length prefix", vec![0x80, 0, 0, 0, 1, 2, 3]),
        ("1 MiB + 1 frame", {
            let mut v = ((1024 * 1024 + 1) as u32).to_be_bytes().to_vec();
            v.extend(std::iter::repeat_n(0u8, 64));
            v
        }),
        (
            "random bytes",
            (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
        ),
        (
            "unknown peer",
            frame(&Message::Hello(Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                node: "127.0.0.1:1".into(),
                incarnation: 7,
                nonce: [0; 32],
                last_applied: None,
                auth: false,
            })),
        ),
        (
            "bad magic",
            frame(&Message::Hello(Hello {
                magic: *b"XXXX",
                version: PROTOCOL_VERSION,
                node: c.id(0),
                incarnation: 7,
                nonce: [0; 32],
                last_applied: None,
                auth: false,
            })),
        ),
    ];
    for (name, bytes) in &bad_frames {
        let before = counters(&h1).rejected_handshake;
        let mut s = TcpStream::connect(target).await.expect("connect");
        let _ = s.write_all(bytes).await;
        assert!(
            closed_by_server(&mut s, Duration::from_secs(5)).await,
            "{name}: not closed"
        );
        wait_until(name, LONG, || counters(&h1).rejected_handshake > before).await;
    }

    // Slowloris: a hello dribbled one byte at a time is cut at the deadline.
    let hello = frame(&Message::Hello(Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        node: c.id(0),
        incarnation: 7,
        nonce: [0; 32],
        last_applied: None,
        auth: false,
    }));
    let mut s = TcpStream::connect(target).await.expect("connect");
    let started = Instant::now();
    let mut cut = false;
    for b in &hello {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    assert!(
        cut || closed_by_server(&mut s, Duration::from_secs(3)).await,
        "slowloris not cut"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    t.finish(&c).await;
    assert!(
        c.h(1).status().peers[0].connected,
        "the real peer stayed up"
    );
}

/// Test PKI: a CA, node certificates for 127.0.0.1, and the odd ones.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write pem");
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        p
    }

    /// A CA; returns its PEM and issuer.
    fn ca(&self, name: &str) -> (PathBuf, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("ca cert");
        let path = self.write(&format!("{name}-ca.pem"), &cert.pem());
        (path, rcgen::Issuer::new(params, key))
    }

    /// A node certificate for `san`, signed by `issuer`.
    fn node(
        &self,
        name: &str,
        san: &str,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).expect("params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, issuer).expect("sign");
        (
            self.write(&format!("{name}.pem"), &cert.pem()),
            self.write(&format!("{name}.key"), &key.serialize_pem()),
        )
    }
}

async fn tls_pair(files: [Option<TlsFiles>; 2]) -> Cluster {
    let (mut c, listeners) = Cluster::reserve(2).await;
    c.customize = with(move |i, cfg| cfg.tls = files[i].clone());
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_node(i, Some(l)).await;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_peers_of_one_ca() {
    let pki = Pki::new();
    let (ca, issuer) = pki.ca("cluster");
    let files = |n: &str| {
        let (cert, key) = pki.node(n, "127.0.0.1", &issuer, false);
        TlsFiles {
            cert,
            key,
            ca: ca.clone(),
        }
    };
    let c = tls_pair([Some(files("a")), Some(files("b"))]).await;
    c.wait_connected(Duration::from_secs(5)).await;
    let t = Traffic::start(c.h(0).clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.finish(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_or_expired_or_misnamed_is_refused() {
    let pki = Pki::new();
    let (ca, issuer) = pki.ca("cluster");
    let (_, rogue_issuer) = pki.ca("rogue");
    let good = {
        let (cert, key) = pki.node("good", "127.0.0.1", &issuer, false);
        TlsFiles {
            cert,
            key,
            ca: ca.clone(),
        }
    };
    let bad = [
        (
            "another CA",
            pki.node("rogue", "127.0.0.1", &rogue_issuer, false),
        ),
        ("expired", pki.node("expired", "127.0.0.1", &issuer, true)),
        (
            "wrong name",
            pki.node("misnamed", "127.0.0.9", &issuer, false),
        ),
    ];
    for (what, (cert, key)) in bad {
        let c = tls_pair([
            Some(good.clone()),
            Some(TlsFiles {
                cert,
                key,
                ca: ca.clone(),
            }),
        ])
        .await;
        let h0 = c.h(0).clone();
        wait_until(what, LONG, || counters(&h0).rejected_tls >= 1).await;
        // Node 0 refuses to talk to the bad one as a client too.
        last_error_says(&h0, what, "TLS").await;
        assert!(!h0.status().peers[0].connected, "{what}");
    }
}

/// A node's own certificate that its peers would refuse is reported at
/// start (and by `check`): expired, from another CA, or not allowed for
/// client use (every node is also a client).
/// Through `preflight`, the checks `cachecast check` and `run` make: TLS
/// is internal to the library.
#[cfg(feature = "sidecar")]
#[test]
fn an_own_certificate_the_peers_would_refuse_is_reported() {
    let pki = Pki::new();
    let (ca, issuer) = pki.ca("cluster");
    let (_, rogue) = pki.ca("rogue");
    let files = |(cert, key): (PathBuf, PathBuf)| TlsFiles {
        cert,
        key,
        ca: ca.clone(),
    };
    let good = files(pki.node("good", "127.0.0.1", &issuer, false));
    let warning = |f: &TlsFiles| {
        let mut config = cachecast::config::parse_str("cluster.instance0.hostname = 127.0.0.1\n")
            .expect("config")
            .config;
        config.tls = Some(f.clone());
        let problems = cachecast::sidecar::check::preflight(&config);
        let tls: Vec<_> = problems
            .iter()
            .filter(|p| {
                p.key
                    .as_deref()
                    .is_some_and(|k| k.starts_with("cachecast.tls"))
            })
            .collect();
        assert!(
            tls.iter()
                .all(|p| p.severity == cachecast::config::Severity::Warning),
            "loads: {tls:?}"
        );
        tls.first().map(|p| p.message.clone())
    };
    assert_eq!(warning(&good), None);
    let server_only = {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (
            pki.write("server-only.pem", &cert.pem()),
            pki.write("server-only.key", &key.serialize_pem()),
        )
    };
    // Each in the words the docs use.
    for (what, f, words) in [
        (
            "expired",
            files(pki.node("old", "127.0.0.1", &issuer, true)),
            "expired",
        ),
        (
            "another CA",
            files(pki.node("rogue", "127.0.0.1", &rogue, false)),
            "not signed by the configured CA",
        ),
        (
            "server use only",
            files(server_only),
            "not allowed for both client and server use",
        ),
    ] {
        let problem = warning(&f);
        assert!(
            problem
                .as_deref()
                .is_some_and(|p| p.contains("will be refused by peers") && p.contains(words)),
            "{what}: {problem:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tls_nodes_refuse_each_other_clearly() {
    let pki = Pki::new();
    let (ca, issuer) = pki.ca("cluster");
    let (cert, key) = pki.node("a", "127.0.0.1", &issuer, false);
    let c = tls_pair([Some(TlsFiles { cert, key, ca }), None]).await;
    let (h0, h1) = (c.h(0).clone(), c.h(1).clone());
    // Each side counts the other's attempts as TLS refusals.
    wait_until("TLS node refuses plain", LONG, || {
        counters(&h0).rejected_tls >= 1
    })
    .await;
    wait_until("plain node refuses TLS", LONG, || {
        counters(&h1).rejected_tls >= 1
    })
    .await;
    // And the plain dialer was told why.
    last_error_says(&h1, "plain dialer's reason", "requires TLS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_security_files_stop_the_node_from_starting() {
    let (mut c, mut listeners) = Cluster::reserve(1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let world = dir.path().join("secret");
    std::fs::write(&world, "0123456789abcdef0123456789").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&world, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let cases: Vec<(&str, Customize)> = vec![
        (
            "world-readable",
            Arc::new(move |_, c: &mut ClusterConfig| {
                c.secret = Some(SecretSource::File(world.clone()))
            }),
        ),
        (
            "too short",
            Arc::new(|_, c: &mut ClusterConfig| c.secret = Some(secret("short"))),
        ),
        (
            "missing cert",
            Arc::new(|_, c: &mut ClusterConfig| {
                c.tls = Some(TlsFiles {
                    cert: "/nonexistent/cert.pem".into(),
                    key: "/nonexistent/key.pem".into(),
                    ca: "/nonexistent/ca.pem".into(),
                })
            }),
        ),
    ];
    let listener = listeners.pop();
    let mut listener = listener;
    for (what, f) in cases {
        c.customize = Some(f);
        let err = c.try_start_node(0, listener.take()).await.expect_err(what);
        assert!(err.to_string().contains("security"), "{what}: {err}");
    }
}

/// Key material is checked as the secret file is: a TLS private key, or a
/// dhis.conf that holds the secret itself, readable by every user stops
/// `check` and `run` with the command that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_readable_by_every_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let (ca, issuer) = pki.ca("cluster");
    let (cert, key) = pki.node("n", "127.0.0.1", &issuer, false);
    let files = TlsFiles { cert, key, ca };
    let (mut c, mut listeners) = Cluster::reserve(1).await;
    let with_files = files.clone();
    c.customize = Some(Arc::new(move |_, c: &mut ClusterConfig| {
        c.tls = Some(with_files.clone())
    }));
    c.try_start_node(0, listeners.pop())
        .await
        .unwrap_or_else(|e| panic!("mode 600 is fine: {e}"));
    c.shutdown_all().await;
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = c
        .try_start_node(0, None)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("readable by every user") && err.contains("chmod 600"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("dhis.conf");
    std::fs::write(
        &conf,
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 127.0.0.2\n\
         cachecast.secret = 0123456789abcdef0123\n",
    )
    .expect("write");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert!(
        cachecast::config::load(&conf).is_ok(),
        "not readable by others"
    );
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let Err(cachecast::config::ConfigError::Invalid { errors, .. }) =
        cachecast::config::load(&conf)
    else {
        panic!("expected an invalid configuration");
    };
    assert!(
        errors[0].to_string().contains("cachecast.secret")
            && errors[0].to_string().contains("chmod o-r"),
        "{:?}",
        errors
    );
}
