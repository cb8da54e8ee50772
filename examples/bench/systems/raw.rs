//! Raw TCP, the floor: length-prefixed frames, no protocol, on plain
//! blocking sockets (or, with `--raw busy`, non-blocking ones polled in a
//! loop; `--raw async` is in [`super::raw_async`]).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::participant::{Node, NodeSpec, Origin, Workload, payload};
use crate::stats::Recorder;
use crate::systems::raw_async;
use crate::{STEP, clock};

/// How the raw TCP floor moves its bytes. `Blocking` is the floor the
/// tables show; the others are kept to show that they are not faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub(crate) enum RawVariant {
    /// Plain blocking sockets: each receiver a thread blocked in `read`,
    /// the origin's pacing thread writing each frame when it is due.
    #[default]
    Blocking,
    /// Tokio sockets: receivers as tasks, the origin a task woken by the
    /// pacing thread (what cachecast's origin does).
    Async,
    /// Non-blocking sockets polled in a loop by each receiver, the origin
    /// spinning until each due time (two cores kept busy).
    Busy,
}

/// Frames one throughput burst writes (one write per receiver).
const BURST: usize = 1024;

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    if spec.raw == RawVariant::Async {
        return raw_async::setup(spec).await;
    }
    let rec = Recorder::new(spec.workload);
    if spec.index == 0 {
        let socks = connect_all(spec).await?;
        return Ok(Node::sending(
            rec,
            Origin::Raw(RawOrigin {
                socks,
                busy: spec.raw == RawVariant::Busy,
            }),
        ));
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", spec.binds[spec.index]))?;
    let r = rec.clone();
    let busy = spec.raw == RawVariant::Busy;
    // The receiving socket, kept to unblock the thread at stop.
    let held: Arc<Mutex<Option<std::net::TcpStream>>> = Arc::default();
    let held_by_thread = held.clone();
    let thread = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut sock, _) = listener.accept()?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(busy)?;
        *held_by_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock.try_clone()?);
        let mut buf = vec![0u8; 256 * 1024];
        let (mut start, mut end) = (0, 0);
        loop {
            if buf.len() - end < 64 * 1024 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            match sock.read(&mut buf[end..]) {
                Ok(0) => return Ok(()),
                Ok(n) => end += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            while end - start >= 4 {
                let len = u32::from_be_bytes([
                    buf[start],
                    buf[start + 1],
                    buf[start + 2],
                    buf[start + 3],
                ]) as usize;
                if end - start < 4 + len {
                    break;
                }
                r.record(&buf[start + 4..start + 4 + len]);
                start += 4 + len;
            }
            if start == end {
                (start, end) = (0, 0);
            }
        }
    });
    Ok(Node {
        rec,
        origin: None,
        stop: Box::pin(async move {
            if let Some(s) = held.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            // A thread still waiting in accept (the origin never came)
            // is left to the process's end.
            let join = tokio::task::spawn_blocking(move || thread.join());
            let _ = tokio::time::timeout(Duration::from_secs(1), join).await;
        }),
    })
}

/// The origin's socket to every receiver (blocking, `TCP_NODELAY`).
pub(super) async fn connect_all(spec: &NodeSpec) -> anyhow::Result<Vec<std::net::TcpStream>> {
    let mut socks = Vec::new();
    for &port in &spec.ports[1..] {
        socks.push(connect(port).await?);
    }
    Ok(socks)
}

/// A socket to a receiver, which may still be starting.
async fn connect(port: u16) -> anyhow::Result<std::net::TcpStream> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                bail!("cannot reach receiver on port {port}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

pub(crate) struct RawOrigin {
    socks: Vec<std::net::TcpStream>,
    busy: bool,
}

fn frame(buf: &mut Vec<u8>, stamp: u64) {
    let p = payload(stamp);
    buf.extend_from_slice(&(p.len() as u32).to_be_bytes());
    buf.extend_from_slice(&p);
}

impl RawOrigin {
    /// The whole workload on one thread of its own, with nothing
    /// between the due time and the write: the paced sends are written
    /// by the thread that waited for them.
    pub(crate) async fn drive(&mut self, workload: Workload, t0: u64) -> anyhow::Result<u64> {
        let mut socks: Vec<std::net::TcpStream> = self
            .socks
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<_, _>>()?;
        let busy = self.busy;
        let sent = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut buf = Vec::with_capacity(BURST * 48);
            match workload {
                Workload::Latency { rate, secs } => {
                    let total = (rate as f64 * secs) as u64;
                    let interval = 1e9 / rate as f64;
                    clock::fine_timer_slack();
                    for i in 0..total {
                        let due = t0 + (i as f64 * interval) as u64;
                        if busy {
                            while clock::now_ns() < due {
                                std::hint::spin_loop();
                            }
                        } else {
                            clock::sleep_until(due);
                        }
                        buf.clear();
                        frame(&mut buf, clock::now_ns());
                        for s in &mut socks {
                            s.write_all(&buf)?;
                        }
                    }
                    Ok(total)
                }
                Workload::Throughput { secs } => {
                    let end = t0 + (secs * 1e9) as u64;
                    let mut n = 0;
                    while clock::now_ns() < end {
                        buf.clear();
                        for _ in 0..BURST {
                            frame(&mut buf, clock::now_ns());
                        }
                        for s in &mut socks {
                            s.write_all(&buf)?;
                        }
                        n += BURST as u64;
                    }
                    Ok(n)
                }
            }
        })
        .await??;
        Ok(sent)
    }
}
