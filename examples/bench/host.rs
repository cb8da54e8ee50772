//! What the bench needs of the machine it runs on: free loopback ports,
//! servers of its own (redis-server, nats-server) and the stopping of
//! every process it started, the programs it needs on the PATH (it
//! installs none: it says what is missing and skips it), and a line that
//! describes the machine.

use std::time::Duration;

use anyhow::bail;

use crate::STEP;

/// Ports free on 127.0.0.1 now (bound, read, released).
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// SIGTERM, a grace period, then SIGKILL; always reaped.
pub(crate) fn stop_child(child: &mut std::process::Child) {
    // Gone already (reaped now, if not before): nothing to signal, and
    // its pid may name another process by now.
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // std's `Child::kill` sends SIGKILL only; SIGTERM lets it stop cleanly.
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill takes plain integers and touches no memory of ours.
        // `pid` is our own child, not reaped yet (just checked, and only
        // this `&mut Child` could reap it), so it names that process and
        // no other.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A server of the bench's own (redis-server, nats-server) on a loopback
/// port, stopped on drop.
pub(crate) struct Daemon {
    pub(crate) port: u16,
    child: std::process::Child,
    /// Its configuration, if it has one.
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    pub(crate) fn new(
        port: u16,
        child: std::process::Child,
        dir: Option<tempfile::TempDir>,
    ) -> Daemon {
        Daemon {
            port,
            child,
            _dir: dir,
        }
    }

    /// Waits (at most [`STEP`]) until `probe` says it answers.
    pub(crate) async fn ready<F, Fut>(self, name: &str, mut probe: F) -> anyhow::Result<Daemon>
    where
        F: FnMut(u16) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if probe(self.port).await {
                return Ok(self);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} did not answer on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Whether `program` is on the PATH. When it is not, says what is missing,
/// how to install it (Debian's `package`) and that the rows of `rows` are
/// skipped. Nothing is installed here: `examples/bench.sh` does that.
pub(crate) fn installed(program: &str, package: &str, rows: &str) -> bool {
    if on_path(program) {
        return true;
    }
    eprintln!("{program} is missing (apt-get install {package}): the {rows} rows are skipped");
    false
}

/// Whether `name` is a file in one of the PATH's directories.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// CPU model, cores and memory, from /proc.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim())
        })
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM{}",
        mem_kib as f64 / 1024.0 / 1024.0,
        idle_driver()
    )
}

/// How an idle CPU waits, when the kernel says: in a virtual machine a
/// wake-up onto an idle vCPU costs a halt exit unless the guest polls
/// first (`haltpoll`), which shapes every latency here (see "Wake-ups"
/// in docs/performance.md).
fn idle_driver() -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let Some(driver) = read("/sys/devices/system/cpu/cpuidle/current_driver") else {
        return String::new();
    };
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(ns) if driver == "haltpoll" => format!(", cpuidle {driver} (guest_halt_poll_ns {ns})"),
        _ => format!(", cpuidle {driver}"),
    }
}
