//! The real sidecar (`cachecast run`): the binary, built first when cargo
//! runs the bench; a cluster of sidecars for the application's path
//! (systems `resp` and `http`); and the idle RSS of two of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::STEP;
use crate::host::{free_ports, stop_child};
use crate::stats::proc_status_kib;

/// The `cachecast` binary beside this example (target/release), built
/// first when cargo runs us, so that it is never stale.
pub(crate) fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target directory")?;
    let bin = dir.join("cachecast");
    if let (Ok(cargo), Ok(manifest)) = (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR"))
    {
        let release = dir.file_name().is_some_and(|d| d == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--features",
            "cli",
            "--bin",
            "cachecast",
        ])
        .arg("--manifest-path")
        .arg(Path::new(&manifest).join("Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status()?;
        if !status.success() {
            bail!("cargo build --bin cachecast failed");
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release --features cli --bin cachecast",
            bin.display()
        );
    }
    Ok(bin)
}

/// RSS and peak RSS (KiB) of two sidecars connected to each other and
/// idle for a while.
pub(crate) async fn idle_rss(bin: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let dir = tempfile::tempdir()?;
    let p = free_ports(4)?;
    let mut children = Vec::new();
    for (me, other, api) in [(p[0], p[1], p[2]), (p[1], p[0], p[3])] {
        let conf = dir.path().join(format!("node{me}.conf"));
        std::fs::write(
            &conf,
            format!(
                "cluster.instance0.hostname = 127.0.0.1\n\
                 cluster.instance0.cache.port = {me}\n\
                 cluster.instance1.hostname = 127.0.0.1\n\
                 cluster.instance1.cache.port = {other}\n\
                 cachecast.bind = 127.0.0.1\n\
                 cachecast.api.port = {api}\n"
            ),
        )?;
        let child = std::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        children.push(Guard(child));
    }
    let result = async {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + STEP;
        for api in [p[2], p[3]] {
            loop {
                let url = format!("http://127.0.0.1:{api}/v1/status");
                let up = match http.get(&url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .ok()
                        .is_some_and(|v| v["peers"][0]["connected"].as_bool() == Some(true)),
                    Err(_) => false,
                };
                if up {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the sidecars did not connect");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Idle: a few heartbeats go by.
        tokio::time::sleep(Duration::from_secs(2)).await;
        children
            .iter()
            .map(|c| {
                let pid = c.0.id();
                Ok((
                    proc_status_kib(pid, "VmRSS").context("VmRSS")?,
                    proc_status_kib(pid, "VmHWM").context("VmHWM")?,
                ))
            })
            .collect()
    }
    .await;
    drop(children);
    result
}

/// `n` sidecars peering with each other, each serving the Redis
/// protocol on its port of `resp`, reached by the others at its port of
/// `mesh` and listening at its port of `binds` (a relay between when the
/// network is modelled); stopped (SIGTERM) on drop.
pub(crate) struct Cluster {
    children: Vec<Guard>,
    /// Each sidecar's HTTP API port.
    pub(crate) api: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) async fn start(
        bin: &Path,
        resp: &[u16],
        mesh: &[u16],
        binds: &[u16],
        buffer: Option<usize>,
    ) -> anyhow::Result<Cluster> {
        let n = resp.len();
        let dir = tempfile::tempdir()?;
        let api = free_ports(n)?;
        let api = &api[..];
        let mut children = Vec::new();
        for i in 0..n {
            let mut text = format!(
                "cluster.instance0.hostname = 127.0.0.1\n\
                 cluster.instance0.cache.port = {}\n\
                 cachecast.bind = 127.0.0.1:{}\n\
                 cachecast.api.port = {}\n\
                 cachecast.resp.port = {}\n",
                mesh[i], binds[i], api[i], resp[i]
            );
            for (k, j) in (1..).zip((0..n).filter(|&j| j != i)) {
                text.push_str(&format!(
                    "cluster.instance{k}.hostname = 127.0.0.1\ncluster.instance{k}.cache.port = {}\n",
                    mesh[j]
                ));
            }
            // As Redis runs with no pub/sub output limit here, the
            // sidecars get the largest replay buffer, so that a
            // publisher flat out is measured, not replaced by flushes.
            let b = buffer.unwrap_or(cachecast::config::MAX_BUFFER);
            text.push_str(&format!("cachecast.buffer = {b}\n"));
            let conf = dir.path().join(format!("node{i}.conf"));
            std::fs::write(&conf, text)?;
            let child = std::process::Command::new(bin)
                .arg("run")
                .arg("--config")
                .arg(&conf)
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            children.push(Guard(child));
        }
        let cluster = Cluster {
            children,
            api: api.to_vec(),
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + STEP;
        for &port in api {
            loop {
                let url = format!("http://127.0.0.1:{port}/v1/status");
                let up = match http.get(&url).send().await {
                    Ok(r) => r.json::<Value>().await.ok().is_some_and(|v| {
                        v["peers"].as_array().is_some_and(|ps| {
                            ps.iter().all(|p| p["connected"].as_bool() == Some(true))
                        })
                    }),
                    Err(_) => false,
                };
                if up {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the sidecars did not connect");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(cluster)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.0.id()).collect()
    }
}

struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}
