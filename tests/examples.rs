//! The library examples run and end by themselves with what they promise
//! (`cargo test` builds them beside the test binaries).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// `target/<profile>/examples/<name>`, next to this test's `deps/` folder.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile.join("examples").join(name)
}

/// Runs an example to its end (at most 30 s); its stdout.
fn run(name: &str) -> String {
    run_with(name, &[], Duration::from_secs(30))
}

/// Runs an example with arguments to its end (at most `limit`); its stdout.
fn run_with(name: &str, args: &[&str], limit: Duration) -> String {
    let path = example(name);
    let mut child = Command::new(&path)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (built by `cargo test`)", path.display()));
    // Both pipes are read while the child runs: a chatty child would
    // otherwise block on a full pipe and never end.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out_reader = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err_reader = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out_reader.join(), err_reader.join());
            panic!("{name} did not end within {limit:?}:\n{out:?}\n{err:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    assert!(status.success(), "{name}: {status}\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn two_nodes_delivers_and_gets_the_ack() {
    let out = run("two_nodes");
    assert!(
        out.contains("B: drop org.hisp.dhis.user.User/xE7jOejl9FI"),
        "{out}"
    );
    assert!(out.contains("not by []"), "{out}");
}

#[test]
fn embed_cache_never_serves_the_stale_name() {
    let out = run("embed_cache");
    assert!(out.contains("acked by 2 peer(s)"), "{out}");
    assert_eq!(
        out.matches("reads admin: \"Administrator\"").count(),
        2,
        "{out}"
    );
}

/// The JSON of a short bench run of 2 node processes, cachecast and the
/// raw floor only (no servers to install), with `extra` arguments.
#[cfg(feature = "cli")]
fn bench_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--json",
        "--secs",
        "0.3",
        "--nodes",
        "2",
        "--only",
        "cachecast,raw",
        "--no-memory",
    ];
    args.extend_from_slice(extra);
    let out = run_with("bench", &args, Duration::from_secs(120));
    serde_json::from_str(out.trim()).expect("one JSON object")
}

/// The benchmark's JSON, from a short run of node processes (no servers:
/// cachecast and the raw floor only).
#[cfg(feature = "cli")]
#[test]
fn bench_json_has_mode_and_cpu_per_system() {
    let v = bench_json(&["--rate", "2000"]);
    assert_eq!(v["mode"], "processes", "{v:#}");
    assert_eq!(v["raw_variant"], "blocking", "{v:#}");
    assert_eq!(v["link_delay_us"], serde_json::Value::Null, "{v:#}");
    for system in ["cachecast", "raw_tcp"] {
        let s = &v["two_node"]["systems"][system];
        let p50 = s["latency_us"]["p50"].as_f64();
        assert!(p50.is_some_and(|p| p > 0.0), "{system}: {s:#}");
        let delivered = s["throughput"]["delivered_per_s"].as_f64();
        assert!(delivered.is_some_and(|d| d > 0.0), "{system}: {s:#}");
        // CPU is measured per process, in clock ticks of 10 ms (a run
        // this short may round to none): a figure, and a plausible one
        // (not a unit slip of 1000x).
        let cpu = s["cpu_us_per_delivery"]
            .as_f64()
            .expect("cpu_us_per_delivery");
        assert!((0.0..100_000.0).contains(&cpu), "{system}: {s:#}");
        assert!(
            s["cpu_percent_at_rate"].as_f64().is_some(),
            "{system}: {s:#}"
        );
        // Every delivery woke the receiver's thread, or shared a wake-up
        // with others: a figure above none, and not a count of the whole
        // machine's switches. No server side: neither has a server.
        let wakeups = s["wakeups_per_delivery"]
            .as_f64()
            .expect("wakeups_per_delivery");
        assert!(wakeups > 0.0 && wakeups < 100.0, "{system}: {s:#}");
        assert!(
            s["server_wakeups_per_delivery"].is_null(),
            "{system}: {s:#}"
        );
        assert!(s["server_cpu_us_per_delivery"].is_null(), "{system}: {s:#}");
    }
}

/// The network model: with every byte between servers held 200 µs by the
/// relay, no delivery can take less, and every invalidation still arrives.
#[cfg(feature = "cli")]
#[test]
fn bench_link_delay_holds_every_crossing() {
    let v = bench_json(&[
        "--rate",
        "1000",
        "--workloads",
        "latency",
        "--link-delay",
        "200us",
    ]);
    assert_eq!(v["link_delay_us"].as_f64(), Some(200.0), "{v:#}");
    for system in ["cachecast", "raw_tcp"] {
        let s = &v["two_node"]["systems"][system];
        // The histogram keeps 3 significant digits: 200 µs may read as
        // 199.9.
        let min = s["latency_us"]["min"].as_f64();
        assert!(min.is_some_and(|m| m >= 199.0), "{system}: {s:#}");
    }
}
