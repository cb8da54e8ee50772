//! Integration tests of the sidecar: real `cachecast run` processes (the
//! built binary) on ephemeral loopback ports, driven over HTTP by a real
//! client (reqwest) and by curl.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::procs::{
    Cluster, LONG, Sidecar, Sse, Subscription, client, free_port, into_closed_pipe, metric,
    metrics_text,
};
use common::{eventually, wait_until};
use serde_json::{Value, json};

fn keys(evs: &[Sse]) -> Vec<String> {
    evs.iter()
        .filter(|e| e.event == "invalidate")
        .filter_map(|e| e.data["key"].as_str().map(str::to_string))
        .collect()
}

async fn post(node: &Sidecar, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(node.url(path))
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_deliver_over_http_and_wait_returns_acks() {
    let mut c = Cluster::new(3, "");
    c.start_all().await;
    c.wait_connected().await;
    let s1 = Subscription::open(c.nodes[1].url("/v1/events"), None).await;
    let s2 = Subscription::open(c.nodes[2].url("/v1/events"), None).await;
    // A subscriber without Last-Event-ID is told to flush first.
    for s in [&s1, &s2] {
        let evs = s.wait_for("initial flush", |e| !e.is_empty()).await;
        assert_eq!(evs[0].event, "flush");
    }
    let (code, body) = post(
        &c.nodes[0],
        "/v1/invalidate",
        json!({"cache": "org.hisp.dhis.user.User", "key": "42"}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["seqs"], json!([1]));
    let (code, body) = post(
        &c.nodes[0],
        "/v1/invalidate?wait=2s",
        // `"key": null` is the whole cache, as when the key is left out.
        json!([{"cache": "c", "key": "a"}, {"cache": "c", "key": "b"}, {"cache": "whole", "key": null}]),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["seqs"], json!([2, 3, 4]));
    assert_eq!(body["all_acked"], json!(true));
    assert_eq!(body["acked"].as_array().map(Vec::len), Some(2));
    for s in [&s1, &s2] {
        let evs = s
            .wait_for("four invalidations", |e| {
                e.iter().filter(|e| e.event == "invalidate").count() == 4
            })
            .await;
        assert_eq!(keys(&evs), ["42", "a", "b"]);
        let whole = evs
            .iter()
            .find(|e| e.data["cache"] == "whole")
            .expect("whole-cache event");
        assert!(whole.data.get("key").is_none(), "whole cache: no key");
        assert_eq!(whole.data["origin"], json!(c.nodes[0].id()));
        // Every event carries an id of this run.
        assert!(evs.iter().all(|e| e.id.contains('-')));
    }
    // `cachecast status` prints the table.
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["status", "--config"])
        .arg(&c.nodes[0].conf)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&c.nodes[1].id()) && text.contains(" up "),
        "{text}"
    );
    // And the metrics are Prometheus text.
    let m = metrics_text(&c.nodes[0]).await;
    assert!(m.contains("cachecast_originated_total 4"), "{m}");
    assert!(m.contains(&format!(
        "cachecast_peer_up{{peer=\"{}\"}} 1",
        c.nodes[1].id()
    )));
    assert!(m.contains("cachecast_ack_latency_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_then_restart_shows_down_up_flush_and_replay() {
    let mut c = Cluster::new(3, "");
    c.start_all().await;
    c.wait_connected().await;
    let s0 = Subscription::open(c.nodes[0].url("/v1/events"), None).await;
    c.nodes[2].kill9();
    s0.wait_for("peer-down", |e| {
        e.iter()
            .any(|e| e.event == "peer-down" && e.data["peer"] == json!(c.nodes[2].id()))
    })
    .await;
    // Invalidate while node 2 is down: it gets these on return (replay).
    let (code, body) = post(
        &c.nodes[0],
        "/v1/invalidate",
        json!([{"cache": "c", "key": "while-down-1"}, {"cache": "c", "key": "while-down-2"}]),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    c.nodes[2].spawn();
    c.nodes[2].wait_healthy().await;
    let s2 = Subscription::open(c.nodes[2].url("/v1/events"), None).await;
    let evs = s0
        .wait_for("peer-up and a flush for the crash", |e| {
            let up = e
                .iter()
                .any(|e| e.event == "peer-up" && e.data["peer"] == json!(c.nodes[2].id()));
            let flush = e.iter().any(|e| {
                e.event == "flush"
                    && e.data["origin"] == json!(c.nodes[2].id())
                    && e.data["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("restarted")
            });
            up && flush
        })
        .await;
    assert!(evs.iter().any(|e| e.event == "peer-down"));
    // Node 2 applies the replay. It may do so before s2 subscribed (node 0
    // redials at once when node 2 reaches it); s2's opening flush covers
    // what came before it, and what came after arrives in order.
    let last = body["seqs"][1].as_u64().expect("seqs");
    c.nodes[2]
        .wait_status("node 2 to apply the replay", |st| {
            st["peers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["id"] == json!(c.nodes[0].id())))
                .and_then(|p| p["applied"][1].as_u64())
                .is_some_and(|a| a >= last)
        })
        .await;
    let evs2 = s2.wait_for("the opening flush", |e| !e.is_empty()).await;
    assert_eq!(evs2[0].event, "flush", "a new subscriber flushes first");
    let got = keys(&s2.events());
    let replay = ["while-down-1", "while-down-2"];
    assert!(
        replay.ends_with(&got.iter().map(String::as_str).collect::<Vec<_>>()),
        "after its flush, the subscriber gets the rest of the replay in order: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_without_a_flush_and_a_foreign_one_flushes() {
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    c.wait_connected().await;
    let s = Subscription::open(c.nodes[1].url("/v1/events"), None).await;
    post(
        &c.nodes[0],
        "/v1/invalidate",
        json!({"cache": "c", "key": "one"}),
    )
    .await;
    let evs = s.wait_for("one", |e| keys(e) == ["one"]).await;
    let last_id = evs.last().expect("event").id.clone();
    drop(s);
    // Missed while away.
    post(
        &c.nodes[0],
        "/v1/invalidate",
        json!({"cache": "c", "key": "two"}),
    )
    .await;
    post(
        &c.nodes[0],
        "/v1/invalidate?wait=2s",
        json!({"cache": "c", "key": "three"}),
    )
    .await;
    let resumed = Subscription::open(c.nodes[1].url("/v1/events"), Some(last_id.clone())).await;
    let evs = resumed
        .wait_for("two and three", |e| keys(e).len() == 2)
        .await;
    assert_eq!(keys(&evs), ["two", "three"]);
    assert!(evs.iter().all(|e| e.event != "flush"), "{evs:?}");
    // An id from another run (or garbage) gets a flush first.
    for foreign in ["0000000000000000-5", "garbage"] {
        let s = Subscription::open(c.nodes[1].url("/v1/events"), Some(foreign.into())).await;
        let evs = s.wait_for("a flush", |e| !e.is_empty()).await;
        assert_eq!(evs[0].event, "flush", "{foreign}");
    }
    // Ids of this run that were never given (ahead of the newest, up to
    // the largest number) flush too, and say why.
    let run = last_id.rsplit_once('-').expect("RUN-N").0.to_string();
    for ahead in [format!("{run}-999999"), format!("{run}-{}", u64::MAX)] {
        let s = Subscription::open(c.nodes[1].url("/v1/events"), Some(ahead.clone())).await;
        let evs = s.wait_for("a flush", |e| !e.is_empty()).await;
        assert_eq!(evs[0].event, "flush", "{ahead}");
        assert!(
            evs[0].data["reason"]
                .as_str()
                .unwrap_or("")
                .contains("not one of this run's"),
            "{ahead}: {:?}",
            evs[0]
        );
    }
    // After a restart of the sidecar, the old id is from an earlier run.
    c.nodes[1].terminate();
    c.nodes[1].spawn();
    c.nodes[1].wait_healthy().await;
    let s = Subscription::open(c.nodes[1].url("/v1/events"), Some(last_id)).await;
    let evs = s.wait_for("a flush", |e| !e.is_empty()).await;
    assert_eq!(evs[0].event, "flush");
    assert!(
        evs[0].data["reason"]
            .as_str()
            .unwrap_or("")
            .contains("earlier run"),
        "{:?}",
        evs[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors_and_the_node_keeps_serving() {
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    let n = &mut c.nodes[0];
    let big_key = "k".repeat(64 * 1024 + 1);
    let huge = "x".repeat(5 * 1024 * 1024);
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({"cache": "c", "key": i.to_string()}))
        .collect();
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "not JSON",
            Some("application/json"),
            "{nope".into(),
            400,
            "invalid JSON",
        ),
        (
            "empty body",
            Some("application/json"),
            String::new(),
            400,
            "invalid JSON",
        ),
        (
            "wrong type",
            Some("application/json"),
            r#"{"cache": 5}"#.into(),
            400,
            "invalid type",
        ),
        (
            "key wrong type",
            Some("application/json"),
            r#"{"cache": "c", "key": [1]}"#.into(),
            400,
            "invalid type",
        ),
        (
            "empty cache",
            Some("application/json"),
            r#"{"cache": ""}"#.into(),
            400,
            "empty",
        ),
        (
            "missing cache",
            Some("application/json"),
            r#"{"key": "k"}"#.into(),
            400,
            "missing `cache`",
        ),
        (
            "unknown field",
            Some("application/json"),
            r#"{"cache": "c", "kee": "k"}"#.into(),
            400,
            "unknown field",
        ),
        (
            "flush false",
            Some("application/json"),
            r#"{"flush": false}"#.into(),
            400,
            "must be true",
        ),
        (
            "flush with cache",
            Some("application/json"),
            r#"{"flush": true, "cache": "c"}"#.into(),
            400,
            "cannot be combined",
        ),
        (
            "a number",
            Some("application/json"),
            "42".into(),
            400,
            "expected an object",
        ),
        (
            "empty array",
            Some("application/json"),
            "[]".into(),
            400,
            "empty",
        ),
        (
            "bad item in array",
            Some("application/json"),
            r#"[{"cache": "c"}, 7]"#.into(),
            400,
            "item 1",
        ),
        (
            "key over 64 KiB",
            Some("application/json"),
            format!(r#"{{"cache": "c", "key": "{big_key}"}}"#),
            400,
            "at most 65536",
        ),
        (
            "too many items",
            Some("application/json"),
            serde_json::to_string(&many).unwrap(),
            413,
            "at most 10000",
        ),
        (
            "body over the limit",
            Some("application/json"),
            format!(r#"{{"cache": "{huge}"}}"#),
            413,
            "larger than",
        ),
        (
            "form content type",
            Some("application/x-www-form-urlencoded"),
            r#"{"cache": "c"}"#.into(),
            415,
            "Content-Type",
        ),
        (
            "no content type",
            None,
            r#"{"cache": "c"}"#.into(),
            415,
            "Content-Type",
        ),
        (
            "invalid UTF-8",
            Some("application/json"),
            String::from_utf8_lossy(b"{\"cache\": \"\xff\"}").into_owned(),
            202,
            "",
        ),
        (
            "null key: the whole cache",
            Some("application/json"),
            r#"{"cache": "c", "key": null}"#.into(),
            202,
            "",
        ),
        (
            "null cache",
            Some("application/json"),
            r#"{"cache": null, "key": "k"}"#.into(),
            400,
            "missing `cache`",
        ),
    ];
    for (name, ctype, body, want, needle) in cases {
        let mut req = client().post(n.url("/v1/invalidate")).body(body);
        if let Some(t) = ctype {
            req = req.header("content-type", t);
        }
        let r = req.send().await.expect(name);
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, want, "{name}: {text}");
        if want >= 400 {
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
            let msg = v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no error field: {text}"));
            assert!(msg.contains(needle), "{name}: {msg}");
        }
    }
    // Raw invalid UTF-8 bytes in the body.
    let r = client()
        .post(n.url("/v1/invalidate"))
        .header("content-type", "application/json")
        .body(&b"{\"cache\": \"\xff\xfe\"}"[..])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    // Bad ?wait values.
    for w in ["abc", "5h", "-1s", "10m"] {
        let r = client()
            .post(n.url(&format!("/v1/invalidate?wait={w}")))
            .json(&json!({"cache": "c"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "wait={w}");
    }
    // Unknown endpoint, wrong method: JSON errors too, 405 with `allow`.
    let r = client().get(n.url("/nope")).send().await.expect("send");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("404 body is JSON");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|m| m.contains("no such endpoint")),
        "{v}"
    );
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/v1/invalidate", "POST"),
        (reqwest::Method::DELETE, "/healthz", "GET"),
        (reqwest::Method::POST, "/v1/events", "GET"),
    ] {
        let r = client()
            .request(method.clone(), n.url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 405, "{method} {path}");
        let allow = r
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap_or("").to_string());
        assert!(
            allow.as_deref().is_some_and(|a| a.contains(allowed)),
            "{method} {path}: allow {allow:?}"
        );
        let v: Value = r.json().await.expect("405 body is JSON");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(method.as_str()) && msg.contains(path), "{v}");
    }
    // Still serving.
    let (code, _) = post(n, "/v1/invalidate", json!({"cache": "c", "key": "after"})).await;
    assert_eq!(code, 202);
    n.wait_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_posts_and_streams() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required for this test (CI installs it)");
    }
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    c.wait_connected().await;
    let mut stream = Command::new("curl")
        .args(["-sN", "--max-time", "10", &c.nodes[1].url("/v1/events")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl -N");
    let stdout = stream.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for the stream to be up (its first event is the flush).
    let first = rx.recv_timeout(LONG).expect("first line from curl");
    assert!(
        first.starts_with("id:") || first.starts_with("event:"),
        "{first}"
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"cache":"org.hisp.dhis.user.User","key":"from-curl"}"#,
            &c.nodes[0].url("/v1/invalidate?wait=2s"),
        ])
        .output()
        .expect("curl POST");
    let body: Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(body["all_acked"], json!(true), "{body}");
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the invalidation on curl's stream");
        if line.contains("from-curl") {
            break;
        }
    }
    let _ = stream.kill();
    let _ = stream.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_a_flush_first_then_batches() {
    use axum::routing::post as axum_post;
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum_post(move |axum::Json(batch): axum::Json<Vec<Value>>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().extend(batch);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let extra = format!("cachecast.webhook.url = http://{hook}/hook");
    let mut c = Cluster::new(2, &extra);
    c.start_all().await;
    c.wait_connected().await;
    for k in 0..50 {
        post(
            &c.nodes[0],
            "/v1/invalidate",
            json!({"cache": "c", "key": format!("k{k}")}),
        )
        .await;
    }
    let got = eventually("50 keys at the webhook", LONG, async || {
        let got = received.lock().unwrap().clone();
        let keys = got.iter().filter(|v| v["key"].is_string()).count();
        if keys >= 50 {
            Ok(got)
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    assert_eq!(
        got[0]["type"], "flush",
        "first delivery is a flush: {:?}",
        got[0]
    );
    let keys: Vec<&str> = got.iter().filter_map(|v| v["key"].as_str()).collect();
    let want: Vec<String> = (0..50).map(|k| format!("k{k}")).collect();
    assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
    // A webhook pointing nowhere is retried and counted; the node serves on.
    let mut c2 = Cluster::new(
        1,
        &format!(
            "cachecast.webhook.url = http://127.0.0.1:{}/gone",
            free_port()
        ),
    );
    c2.start_all().await;
    c2.nodes[0]
        .wait_status("two webhook failures", |st| {
            st["sidecar"]["webhook"]["failures"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    c2.nodes[0].wait_healthy().await;
    // The log says why, not only which URL: the cause is in the error's
    // sources.
    let log = c2.nodes[0].log_text();
    let line = log
        .lines()
        .find(|l| l.contains("webhook delivery failed"))
        .unwrap_or_else(|| panic!("no failure logged:\n{log}"));
    assert!(line.contains("Connection refused"), "{line}");
}

/// `kill -SIG` ends node 1 gracefully: exit 0, a goodbye, so that its
/// restart costs node 0's application no flush.
async fn a_signal_is_graceful_and_costs_no_flush(sig: &str) {
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    c.wait_connected().await;
    let s0 = Subscription::open(c.nodes[0].url("/v1/events"), None).await;
    post(
        &c.nodes[1],
        "/v1/invalidate",
        json!({"cache": "c", "key": "before"}),
    )
    .await;
    s0.wait_for("before", |e| keys(e) == ["before"]).await;
    c.nodes[1].signal(sig);
    let status = c.nodes[1].wait_exit();
    assert!(
        status.success(),
        "SIG{sig}: exit {status:?}\n{}",
        c.nodes[1].log_text()
    );
    let log = c.nodes[1].log_text();
    assert!(log.contains("shutting down gracefully"), "{log}");
    assert!(log.contains(&format!("SIG{sig}")), "{log}");
    c.nodes[1].spawn();
    c.nodes[1].wait_healthy().await;
    c.wait_connected().await;
    post(
        &c.nodes[1],
        "/v1/invalidate",
        json!({"cache": "c", "key": "after"}),
    )
    .await;
    let evs = s0
        .wait_for("after", |e| keys(e) == ["before", "after"])
        .await;
    let flushes = evs.iter().filter(|e| e.event == "flush").count();
    assert_eq!(flushes, 1, "only the subscriber's initial flush: {evs:#?}");
    assert!(evs.iter().any(|e| e.event == "peer-down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_graceful_and_costs_no_flush() {
    a_signal_is_graceful_and_costs_no_flush("TERM").await;
}

/// SIGHUP (the terminal `run` was started from closed) stops it as
/// gracefully as SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_graceful_too() {
    a_signal_is_graceful_and_costs_no_flush("HUP").await;
}

/// A failed start is never silent: with RUST_LOG empty or off the problems
/// still reach stderr, and with --log-format json every line is JSON and
/// each problem an event of its own.
#[test]
fn run_reports_config_problems_whatever_the_log_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("dhis.conf");
    std::fs::write(
        &conf,
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance5.hostname = 127.0.0.2\n",
    )
    .expect("write");
    let run = |rust_log: Option<&str>, json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachecast"));
        cmd.args(["run", "--config"]).arg(&conf);
        if json {
            cmd.args(["--log-format", "json"]);
        }
        match rust_log {
            Some(v) => cmd.env("RUST_LOG", v),
            None => cmd.env_remove("RUST_LOG"),
        };
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(2), "RUST_LOG={rust_log:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for rust_log in [None, Some(""), Some("off"), Some("bogus=[[")] {
        let err = run(rust_log, false);
        assert!(
            err.contains("cluster.instance5.hostname"),
            "RUST_LOG={rust_log:?}: {err}"
        );
    }
    let err = run(None, true);
    let events: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cluster.instance5.hostname"))),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("dhis.conf");
    std::fs::write(&conf, "cluster.instance1.hostname = 10.0.0.2\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["run", "--config"])
        .arg(&conf)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clustering is off"), "{err}");
}

/// Reads `stream` until the server closes it (EOF or reset); returns what
/// was read, or panics after `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {limit:?}; read {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_starve_neither_the_api_nor_the_mesh() {
    use tokio::net::TcpStream;
    let mut c = Cluster::new(2, "");
    // As in the field report: a low limit on open files. `run` fits the
    // API's cap under it, leaving room for the mesh.
    c.nodes[0].nofile = Some(160);
    c.nodes[0].spawn();
    c.nodes[0].wait_healthy().await;
    let log = c.nodes[0].log_text();
    assert!(
        log.contains("LimitNOFILE="),
        "no warning about the limit:\n{log}"
    );
    let cap: usize = log
        .lines()
        .find(|l| l.contains("sidecar API listening"))
        .and_then(|l| l.split("max_connections=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no max_connections in:\n{log}"));
    assert!((8..160).contains(&cap), "cap {cap}");

    // Far more idle connections than the cap: the ones beyond it are
    // closed at once, the others stay open (idle timeout: 75 s).
    const FLOOD: usize = 200;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(c.nodes[0].api).await.expect("connect"));
    }
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for mut s in flood {
        let closed = closed.clone();
        watchers.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 64];
            if matches!(s.read(&mut b).await, Ok(0) | Err(_)) {
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // Held open until the test aborts this task.
            std::future::pending::<()>().await;
        }));
    }
    wait_until(&format!("{FLOOD} - {cap} closed"), LONG, || {
        closed.load(std::sync::atomic::Ordering::SeqCst) >= FLOOD - cap
    })
    .await;

    // With the API full, a peer still connects to the mesh port.
    c.nodes[1].spawn();
    c.nodes[1].wait_healthy().await;
    eventually("the peer to connect", LONG, async || {
        let st = c.nodes[1].status().await;
        if st["peers"][0]["connected"] == json!(true) {
            Ok(())
        } else {
            Err(format!(
                "{st}\nlog of the flooded node:\n{}",
                c.nodes[0].log_text()
            ))
        }
    })
    .await;
    assert_eq!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        FLOOD - cap,
        "connections within the cap were closed"
    );
    let log = c.nodes[0].log_text();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(
        log.contains("too many open"),
        "the refusals are logged:\n{log}"
    );

    // Once the idle clients go away, /healthz answers again.
    for w in &watchers {
        w.abort();
    }
    c.nodes[0].wait_healthy().await;
    let refused = metric(&c.nodes[0], "cachecast_api_connections_refused_total").await;
    assert!(refused >= (FLOOD - cap) as u64, "refused {refused}");
    assert_eq!(
        metric(&c.nodes[0], "cachecast_api_connections_max").await,
        cap as u64
    );
}

/// The value of an unlabelled metric of the API at `api`.
async fn metric_at(api: std::net::SocketAddr, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{api}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_api_connections_are_closed_and_a_live_stream_is_not() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    const IDLE: Duration = Duration::from_millis(1500);
    // The sidecar of the library, in this process: its options shorten the
    // 75 s idle timeout, which the command line does not offer.
    let peers = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (peer_port, api_addr) = (
        peers.local_addr().expect("addr").port(),
        api.local_addr().expect("addr"),
    );
    let text = format!(
        "cluster.instance0.hostname = 127.0.0.1\n\
         cluster.instance0.cache.port = {peer_port}\n\
         cachecast.api.port = {}\n\
         cachecast.state.file = none\n",
        api_addr.port()
    );
    let config = cachecast::config::parse_str(&text).expect("config").config;
    let options = cachecast::sidecar::Options {
        peer_listener: Some(peers),
        api_listener: Some(api),
        api_idle_timeout: Some(IDLE),
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let sidecar = tokio::spawn(cachecast::sidecar::run(config, options, stop.clone()));
    // An event stream whose client reads: kept alive by the comments the
    // server sends (every IDLE/3 here) for several idle periods.
    let mut sse = TcpStream::connect(api_addr).await.expect("connect");
    sse.write_all(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");

    let stalls: [(&str, &[u8]); 3] = [
        ("partial header", b"GET /healthz HTTP/1.1\r\nHost: t\r\n"),
        (
            "stalled body",
            b"POST /v1/invalidate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        ),
        (
            "idle keep-alive",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
    ];
    let mut tasks = Vec::new();
    for (name, bytes) in stalls {
        let mut s = TcpStream::connect(api_addr).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        tasks.push(tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let got = read_until_closed(&mut s, LONG).await;
            (
                name,
                start.elapsed(),
                String::from_utf8_lossy(&got).into_owned(),
            )
        }));
    }
    for t in tasks {
        let (name, took, got) = t.await.expect("task");
        // Closed by the timeout, not at once.
        assert!(
            took >= IDLE - Duration::from_millis(200),
            "{name}: after {took:?}"
        );
        if name == "idle keep-alive" {
            assert!(got.starts_with("HTTP/1.1 200"), "{name}: {got}");
        }
    }

    // The stream outlived them, still open and still getting comments.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + IDLE * 2;
    while let Ok(r) = tokio::time::timeout_at(until, {
        use tokio::io::AsyncReadExt;
        sse.read(&mut buf)
    })
    .await
    {
        match r {
            Ok(0) | Err(_) => panic!(
                "the live stream was closed: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
    assert!(!got.is_empty(), "no keep-alive within {:?}", IDLE * 2);
    assert!(metric_at(api_addr, "cachecast_api_connections_timed_out_total").await >= 3);
    stop.cancel();
    let ended = tokio::time::timeout(LONG, sidecar).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the sidecar stopped: {ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_graceful_stop_the_api_answers_503() {
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    c.wait_connected().await;
    // A peer that cannot acknowledge what is queued for it keeps the stop
    // draining (for up to 2 s): the window in which the API must still
    // answer. Without something unacknowledged the stop is over at once.
    c.nodes[1].signal("STOP");
    post(
        &c.nodes[0],
        "/v1/invalidate",
        json!({"cache": "c", "key": "queued"}),
    )
    .await;
    c.nodes[0].signal("TERM");
    let body = eventually("a 503", LONG, async || {
        match client().get(c.nodes[0].url("/healthz")).send().await {
            Ok(r) if r.status() == 503 => Ok(r.json::<Value>().await.expect("JSON")),
            Ok(r) => {
                assert_eq!(r.status(), 200, "before the stop");
                Err(r.status())
            }
            Err(e) => panic!("refused during the stop: {e}"),
        }
    })
    .await;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{body}"
    );
    let r = client()
        .post(c.nodes[0].url("/v1/invalidate"))
        .json(&json!({"cache": "c"}))
        .send()
        .await;
    // Still within the drain, unless it ended just now.
    if let Ok(r) = r {
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.expect("JSON");
        assert!(v["error"].is_string(), "{v}");
    }
    c.nodes[1].signal("CONT");
    let status = c.nodes[0].wait_exit();
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        c.nodes[0].log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_into_a_closed_pipe_ends_quietly() {
    let mut c = Cluster::new(1, "");
    c.start_all().await;
    for raw in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachecast"));
        cmd.args(["status", "--config"]).arg(&c.nodes[0].conf);
        if raw {
            cmd.arg("--json");
        }
        let (code, err) = into_closed_pipe(&mut cmd);
        assert_eq!(code, Some(0), "json {raw}: {err}");
        assert!(err.is_empty(), "json {raw}: {err}");
    }
}

#[test]
fn run_reports_an_unreadable_config_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["run", "--config"])
        .arg(dir.path().join("missing.conf"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot read").count(), 1, "{err}");
}

/// A client that stops reading its event stream, with the connection
/// open, shows in `cachecast_sse_lagged_total` once the ring has dropped
/// an event it did not read: while it is still stalled, not when (if
/// ever) it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_event_stream_is_counted_as_lagging_while_stalled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Cluster::new(2, "");
    c.start_all().await;
    c.wait_connected().await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    // A small receive window, so the stream's bytes pile up at the sidecar.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock.connect(b.api).await.expect("connect");
    s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("request");
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(LONG, s.read(&mut buf))
            .await
            .expect("response head")
            .expect("read");
        assert!(n > 0, "closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    assert_eq!(metric(b, "cachecast_sse_lagged_total").await, 0);
    // Far more events than the socket buffers and then the ring (16,384)
    // hold, the client reading none of them. They come in small steps, so
    // the stream fills the socket while it keeps up with the ring, and is
    // then stuck writing (it no longer reads the ring) when the ring
    // passes it: the case the count must not wait for.
    for chunk in 0..100 {
        let items: Vec<Value> = (0..1000)
            .map(|i| json!({"cache": "c", "key": format!("{chunk}-{i}")}))
            .collect();
        assert_eq!(post(a, "/v1/invalidate", json!(items)).await.0, 202);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A client behind by far more than the ring is counted.
    b.wait_metric("cachecast_sse_lagged_total", |v| v >= 1)
        .await;
    // Still connected, still stalled.
    assert_eq!(metric(b, "cachecast_sse_clients").await, 1);
    // It reads on, up to the `lagged` event, and is cut off before the
    // `flush` that follows it. Reconnecting with the id it last saw, that
    // of `lagged`, it must still get a flush: `lagged` keeps the id of the
    // last event the client got, whose successors are gone.
    let mut text = Vec::new();
    let lagged_id = loop {
        let n = tokio::time::timeout(LONG, s.read(&mut buf))
            .await
            .expect("the stream goes on")
            .expect("read");
        assert!(n > 0, "closed before lagged");
        text.extend_from_slice(&buf[..n]);
        let t = String::from_utf8_lossy(&text);
        if let Some(at) = t.find("event: lagged")
            && let Some(end) = t[at..].find("\n\n")
        {
            let start = t[..at].rfind("\n\n").map_or(0, |p| p + 2);
            let block = &t[start..at + end];
            let id = block
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .expect("lagged carries an id")
                .trim()
                .to_string();
            break id;
        }
    };
    drop(s);
    let again = Subscription::open(b.url("/v1/events"), Some(lagged_id.clone())).await;
    let evs = again.wait_for("the first event", |e| !e.is_empty()).await;
    assert_eq!(
        evs[0].event, "flush",
        "resuming from lagged's id {lagged_id} must flush: {:?}",
        evs[0]
    );
}

/// What Prometheus's OpenMetrics parser requires of `/metrics`: every
/// family declared by `# HELP` and `# TYPE` before its samples, each sample
/// named as its type has it (a counter's `_total`, a histogram's
/// `_bucket`, `_sum`, `_count`), no family twice, and `# EOF` last.
fn assert_openmetrics(text: &str) {
    let mut families = std::collections::BTreeMap::new();
    let mut help = None;
    let mut current: Option<(String, String)> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, words) = rest.split_once(' ').expect("help text");
            assert!(!words.is_empty(), "{name}: empty help");
            help = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type");
            assert_eq!(
                help.as_deref(),
                Some(name),
                "# TYPE {name} without its # HELP"
            );
            assert!(
                families.insert(name.to_string(), ()).is_none(),
                "{name} declared twice"
            );
            current = Some((name.to_string(), kind.to_string()));
        } else {
            let (name, kind) = current.as_ref().expect("a sample before any # TYPE");
            let sample = line.split(['{', ' ']).next().expect("name");
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gauge" => &[""],
                other => panic!("{name}: type {other}"),
            };
            assert!(
                suffixes.iter().any(|s| sample == format!("{name}{s}")),
                "{sample} is not a sample of {kind} {name}"
            );
            let value = line.rsplit(' ').next().expect("value");
            assert!(value.parse::<f64>().is_ok(), "{line}: value");
        }
    }
    panic!("no # EOF at the end:\n{text}");
}

/// Every metric that the alert rules and the dashboard of docs/monitoring
/// use is one a real sidecar serves: a renamed metric cannot leave an alert
/// that never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitoring_files_use_only_served_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring");
    let mut used = std::collections::BTreeSet::new();
    for file in ["alerts.yml", "alerts_test.yml", "dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect("monitoring file");
        for (at, _) in text.match_indices("cachecast_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            used.insert(name);
        }
    }
    assert!(used.len() > 10, "names found: {used:?}");
    // With the Redis-protocol endpoint and the flush hook on, as DHIS 2 runs it.
    let extra = format!(
        "cachecast.resp.port = {}\ncachecast.flush.url = http://127.0.0.1:{}/api/maintenance/cacheClear\n",
        free_port(),
        free_port()
    );
    let mut c = Cluster::new(2, &extra);
    // Each sidecar needs an endpoint port of its own.
    let conf = &c.nodes[1].conf;
    let text = std::fs::read_to_string(conf).expect("conf");
    let own = format!("cachecast.resp.port = {}", free_port());
    std::fs::write(
        conf,
        text.replace(extra.lines().next().expect("line"), &own),
    )
    .expect("conf");
    c.start_all().await;
    c.wait_connected().await;
    let text = metrics_text(&c.nodes[0]).await;
    assert_openmetrics(&text);
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = used
        .iter()
        .filter(|n| !served.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used by docs/monitoring but not served: {missing:?}"
    );
}

/// With `cachecast.api.token.file`, a local process that does not hold the
/// token cannot make the cluster clear its caches: a missing or wrong
/// token is a JSON 401, counted, and nothing is sent; the token admits the
/// call; reads and `cachecast status` stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_guards_mutating_calls_and_leaves_reads_open() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("api.token");
    let token = "6f1c0e0a9b2d4c5e8f7a6b5c4d3e2f1a";
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let mut c = Cluster::new(
        2,
        &format!("cachecast.api.token.file = {}", token_file.display()),
    );
    c.start_all().await;
    c.wait_connected().await;
    let node = &c.nodes[0];
    let invalidate = || {
        client()
            .post(node.url("/v1/invalidate"))
            .json(&json!({"flush": true}))
    };
    for (what, req) in [
        ("no token", invalidate()),
        (
            "a wrong token",
            invalidate().bearer_auth("6f1c0e0a9b2d4c5e8f7a6b5c4d3e2f1b"),
        ),
        ("a prefix", invalidate().bearer_auth(&token[..20])),
        (
            "another scheme",
            invalidate().basic_auth("cachecast", Some(token)),
        ),
    ] {
        let r = req.send().await.expect("post");
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
        let body: Value = r.json().await.expect("a JSON error");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("Bearer")),
            "{what}: {body}"
        );
    }
    assert_eq!(metric(node, "cachecast_api_unauthorized_total").await, 4);
    assert_eq!(metric(node, "cachecast_originated_total").await, 0);
    let r = invalidate().bearer_auth(token).send().await.expect("post");
    assert_eq!(r.status(), 202);
    assert_eq!(metric(node, "cachecast_originated_total").await, 1);
    // Reads need no token.
    for path in ["/v1/status", "/metrics", "/healthz"] {
        let r = client().get(node.url(path)).send().await.expect("get");
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = client()
        .get(node.url("/v1/events"))
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 200);
    drop(r);
    assert_eq!(node.status().await["sidecar"]["api_token"], true);
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["status", "--config"])
        .arg(&node.conf)
        .output()
        .expect("cachecast status");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A token file every user can read is refused (`run` makes the same
    // checks before it starts).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["check", "--config"])
        .arg(&c.nodes[1].conf)
        .output()
        .expect("cachecast check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cachecast.api.token.file") && err.contains("readable by every user"),
        "{err}"
    );
}
