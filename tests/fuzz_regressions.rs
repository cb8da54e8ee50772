//! Replays the fuzz targets' seeds and kept regressions (`fuzz/seeds/`,
//! `fuzz/regressions/`) through the same entry points the fuzzers use, so
//! that every `cargo test` checks them without a nightly toolchain.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "bin") {
                let bytes = std::fs::read(&path).expect("read input");
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn frame_decoder_inputs_replay() {
    let all = inputs("frame_decoder");
    assert!(all.len() >= 9, "the seeds are there");
    for (name, bytes) in all {
        eprintln!("{name}");
        cachecast::fuzz::frames(&bytes);
    }
}

#[test]
fn handshake_inputs_replay() {
    let all = inputs("handshake");
    assert!(all.len() >= 2, "the seeds are there");
    for (name, bytes) in all {
        eprintln!("{name}");
        let started = std::time::Instant::now();
        cachecast::fuzz::acceptor(&bytes);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{name}: the acceptor took {:?}",
            started.elapsed()
        );
    }
}

#[cfg(feature = "sidecar")]
#[test]
fn resp_parser_inputs_replay() {
    let all = inputs("resp_parser");
    assert!(all.len() >= 5, "the seeds are there");
    for (name, bytes) in all {
        eprintln!("{name}");
        cachecast::fuzz::resp_requests(&bytes);
    }
}
