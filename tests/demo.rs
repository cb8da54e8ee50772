//! The newcomer's first command, `cachecast demo`, runs to the end by itself.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_runs_to_the_end_and_shows_replay_and_flush() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .arg("demo")
        .output()
        .expect("run cachecast demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    for needle in [
        "A: peer C down",
        "FLUSH every cache (C: peer restarted without a goodbye)",
        "C <- A #",
        "while-C-was-down-4",
        "graceful restart of B: 0 flushes",
        "demo finished",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn demo_into_a_closed_pipe_ends_quietly() {
    // The reader is gone before the demo prints its first line.
    let (code, stderr) =
        common::procs::into_closed_pipe(Command::new(env!("CARGO_BIN_EXE_cachecast")).arg("demo"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
