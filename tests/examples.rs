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
    let path = example(name);
    let mut child = Command::new(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (built by `cargo test`)", path.display()));
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("{name} did not end within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
