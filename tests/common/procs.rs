//! Real `cachecast run` processes on ephemeral loopback ports: start,
//! signal, kill, read their status; shared by the sidecar and
//! Redis-protocol tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::eventually;

pub const LONG: Duration = Duration::from_secs(20);

/// A loopback port for a sidecar to bind, chosen at random and checked
/// free. It lies below the kernel's range of ephemeral ports, so that no
/// outgoing connection (of this test or any other process) is given it
/// between this check and the sidecar's bind, and it is never handed out
/// twice in one test process, so that tests running side by side cannot
/// pick the same one. [`Sidecar::wait_healthy`] checks that the process
/// answering on it is the one started.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_from.max(10_001));
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = lo + (rand_u64() % u64::from(hi - lo)) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

/// A random number from the standard library alone (the hasher's keys).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// One sidecar process and its configuration.
pub struct Sidecar {
    pub child: Option<Child>,
    pub conf: PathBuf,
    pub api: SocketAddr,
    pub port: u16,
    pub log: PathBuf,
    /// Extra environment of the process.
    pub env: Vec<(&'static str, String)>,
    /// A limit on open files (soft and hard) to start it under.
    pub nofile: Option<u32>,
}

impl Sidecar {
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let bin = env!("CARGO_BIN_EXE_cachecast");
        let mut cmd = match self.nofile {
            // The shell sets the limit, then becomes the sidecar (same pid).
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.conf)
            .env("RUST_LOG", "info")
            // The default state file goes beside the test's configuration,
            // never into a folder that outlives the test.
            .env(
                "STATE_DIRECTORY",
                self.conf.parent().unwrap_or(Path::new("/nonexistent")),
            )
            .env_remove("XDG_STATE_HOME")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cachecast run");
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn id(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until this sidecar answers on its API. The answer must name
    /// this node: another process on the port fails the test at once, and
    /// so does this one exiting (its log says why).
    pub async fn wait_healthy(&mut self) {
        let client = client();
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            if let Ok(r) = client.get(self.url("/healthz")).send().await
                && r.status().is_success()
            {
                let body: Value = r.json().await.unwrap_or_default();
                assert_eq!(
                    body["node"],
                    json!(self.id()),
                    "another process answers on {}",
                    self.api
                );
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("sidecar exited ({status}); log:\n{}", self.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sidecar never became healthy; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`TERM`, `STOP`, `CONT`) to the running process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of `path` on the API.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        client().get(self.url(path)).send().await.expect(path)
    }

    pub async fn status(&self) -> Value {
        self.get("/v1/status").await.json().await.expect("json")
    }

    /// Waits until `/v1/status` satisfies `cond`, and returns it.
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        eventually(what, LONG, async || {
            let st = self.status().await;
            if cond(&st) { Ok(st) } else { Err(st) }
        })
        .await
    }

    /// Waits until the unlabelled metric `name` satisfies `cond`, and
    /// returns its value.
    pub async fn wait_metric(&self, name: &str, cond: impl Fn(u64) -> bool) -> u64 {
        eventually(name, LONG, async || {
            let v = metric(self, name).await;
            if cond(v) { Ok(v) } else { Err(v) }
        })
        .await
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// `n` sidecar configurations in a temp dir, each node peering with all.
pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub nodes: Vec<Sidecar>,
}

impl Cluster {
    pub fn new(n: usize, extra: &str) -> Cluster {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        Cluster::with_ports(&ports, None, extra)
    }

    /// `n` sidecars whose peers reach each one only through its own relay:
    /// node `i`'s identity is the relay's port, and it listens on another
    /// (`cachecast.bind`), so that the test can stall, cut or tamper with
    /// everything that reaches node `i`.
    pub async fn relayed(n: usize, extra: &str) -> (Cluster, Vec<super::Proxy>) {
        let real: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut relays = Vec::new();
        for &port in &real {
            relays.push(super::Proxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await);
        }
        let ports: Vec<u16> = relays.iter().map(|r| r.addr.port()).collect();
        (Cluster::with_ports(&ports, Some(&real), extra), relays)
    }

    fn with_ports(ports: &[u16], bind: Option<&[u16]>, extra: &str) -> Cluster {
        let n = ports.len();
        let dir = tempfile::tempdir().expect("tempdir");
        let apis: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut text = format!(
                "cluster.instance0.hostname = 127.0.0.1\ncluster.instance0.cache.port = {}\ncachecast.api.port = {}\n{extra}\n",
                ports[i], apis[i]
            );
            if let Some(bind) = bind {
                text.push_str(&format!("cachecast.bind = 127.0.0.1:{}\n", bind[i]));
            }
            for (k, j) in (1..).zip((0..n).filter(|&j| j != i)) {
                text.push_str(&format!(
                    "cluster.instance{k}.hostname = 127.0.0.1\ncluster.instance{k}.cache.port = {}\n",
                    ports[j]
                ));
            }
            let conf = dir.path().join(format!("node{i}.conf"));
            std::fs::write(&conf, text).expect("write conf");
            // Private, as a file that may hold the secret must be.
            std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod conf");
            nodes.push(Sidecar {
                child: None,
                conf,
                api: SocketAddr::from(([127, 0, 0, 1], apis[i])),
                port: ports[i],
                log: dir.path().join(format!("node{i}.log")),
                env: Vec::new(),
                nofile: None,
            });
        }
        Cluster { _dir: dir, nodes }
    }

    pub async fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.spawn();
        }
        for n in &mut self.nodes {
            n.wait_healthy().await;
        }
    }

    pub async fn wait_connected(&self) {
        for n in &self.nodes {
            n.wait_status("every peer connected", |st| {
                st["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().all(|p| p["connected"] == json!(true)))
            })
            .await;
        }
    }
}

/// The node's `/metrics` text.
pub async fn metrics_text(node: &Sidecar) -> String {
    node.get("/metrics").await.text().await.expect("text")
}

/// Runs `cmd` with its standard output a pipe whose reader is gone before
/// anything is printed (as `| head -0`); returns its exit code and
/// standard error.
pub fn into_closed_pipe(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of an unlabelled metric.
pub async fn metric(node: &Sidecar, name: &str) -> u64 {
    let text = metrics_text(node).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// One parsed SSE event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// A live SSE subscription, collecting events in the background.
pub struct Subscription {
    events: Arc<Mutex<Vec<Sse>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    pub async fn open(url: String, last_event_id: Option<String>) -> Subscription {
        let mut req = client().get(url).timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.expect("subscribe");
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) =
                        (String::new(), String::new(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if event.is_empty() {
                        continue; // a keep-alive comment
                    }
                    let data = serde_json::from_str(&data).expect("event data is JSON");
                    sink.lock().unwrap().push(Sse { id, event, data });
                }
            }
        });
        Subscription { events, task }
    }

    pub fn events(&self) -> Vec<Sse> {
        self.events.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
        eventually(what, LONG, async || {
            let evs = self.events();
            if pred(&evs) {
                Ok(evs)
            } else {
                Err(format!("got {evs:#?}"))
            }
        })
        .await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}
