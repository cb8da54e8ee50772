//! What is measured and how: each receiver's count and latency histogram
//! (and their text form between processes), the CPU time and memory of
//! processes from /proc, and the figures of one run and of one system at
//! one size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::participant::Workload;
use crate::{DRAIN, clock};

/// What one receiver saw: a count and a latency histogram.
pub(crate) struct Recorder {
    /// Whether each delivery's latency is recorded (the latency workload);
    /// the throughput workload only counts, so that receivers cost the
    /// same little for every system.
    pub(crate) timed: bool,
    pub(crate) hist: Mutex<Histogram<u64>>,
    pub(crate) count: AtomicU64,
    /// Flushes received (a flush would stand for lost invalidations).
    pub(crate) flushes: AtomicU64,
    /// When the last delivery arrived.
    pub(crate) last_ns: AtomicU64,
}

impl Recorder {
    pub(crate) fn new(workload: Workload) -> Arc<Self> {
        Arc::new(Recorder {
            timed: matches!(workload, Workload::Latency { .. }),
            hist: Mutex::new(new_hist()),
            count: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        })
    }

    /// One delivery whose stamp ends `bytes`.
    pub(crate) fn record(&self, bytes: &[u8]) {
        if self.timed {
            let now = clock::now_ns();
            if let Some(stamp) = clock::parse_stamp(bytes) {
                let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
                h.saturating_record(now.saturating_sub(stamp).max(1));
            }
            self.last_ns.fetch_max(now, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until `n` deliveries arrived, at most [`DRAIN`].
    pub(crate) async fn wait_for(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while self.count.load(Ordering::Relaxed) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Without timing, notes when the count last changed, once a
    /// millisecond (late by at most about that: the throughput it gives
    /// errs low).
    pub(crate) fn sample(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let rec = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let c = rec.count.load(Ordering::Relaxed);
                if c != seen {
                    seen = c;
                    rec.last_ns.store(clock::now_ns(), Ordering::Relaxed);
                }
            }
        })
    }
}

/// Latencies in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// A histogram as `value:count,...` (between processes).
pub(crate) fn hist_to_text(h: &Histogram<u64>) -> String {
    let parts: Vec<String> = h
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

pub(crate) fn hist_from_text(text: &str, into: &mut Histogram<u64>) -> anyhow::Result<()> {
    if text == "-" {
        return Ok(());
    }
    for part in text.split(',') {
        let (v, c) = part.split_once(':').context("histogram entry")?;
        into.saturating_record_n(v.parse()?, c.parse()?);
    }
    Ok(())
}

/// A field of /proc/PID/status, in KiB.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// User plus system CPU time of these processes (all their threads), in
/// clock ticks: fields 14 and 15 of /proc/PID/stat. `None` when one of
/// them is gone.
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    pids.iter().try_fold(0u64, |sum, pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, field 2, may hold spaces: count after its ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(sum + utime + stime)
    })
}

/// Voluntary context switches of these processes (every thread's): a
/// thread that blocks (in `epoll_wait`, `read`, a futex) and is woken
/// again counts one, so this is the wake-ups the processes needed. `None`
/// when one of them is gone.
fn wakeups(pids: &[u32]) -> Option<u64> {
    pids.iter().try_fold(0u64, |sum, pid| {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut n = 0;
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            n += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        Some(sum + n)
    })
}

/// What a set of processes used, read at one instant or (from
/// [`Usage::since`]) over a span: CPU time and wake-ups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) cpu_secs: f64,
    pub(crate) wakeups: u64,
}

impl Usage {
    /// What these processes have used so far; `None` for no process, or
    /// when one of them is gone.
    pub(crate) fn now(pids: &[u32]) -> Option<Usage> {
        if pids.is_empty() {
            return None;
        }
        Some(Usage {
            cpu_secs: cpu_ticks(pids)? as f64 / ticks_per_sec(),
            wakeups: wakeups(pids)?,
        })
    }

    /// What these processes used since `start` (read by [`Usage::now`]).
    pub(crate) fn since(start: Option<Usage>, pids: &[u32]) -> Option<Usage> {
        let (start, end) = (start?, Usage::now(pids)?);
        Some(Usage {
            cpu_secs: (end.cpu_secs - start.cpu_secs).max(0.0),
            wakeups: end.wakeups.saturating_sub(start.wakeups),
        })
    }
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf takes a plain integer and touches no memory of
    // ours; _SC_CLK_TCK is a valid name (an unknown one would give -1,
    // handled below).
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
pub(crate) fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// What one run measured.
#[derive(Debug)]
pub(crate) struct RunResult {
    pub(crate) latency: Histogram<u64>,
    pub(crate) originated: u64,
    pub(crate) origin_secs: f64,
    pub(crate) delivered: u64,
    /// From the origin's first send to the last delivery anywhere.
    pub(crate) delivery_secs: f64,
    pub(crate) flushes: u64,
    /// Largest VmHWM among the node processes (separate processes only),
    /// and the Redis server's.
    pub(crate) peak_rss_kib: Option<u64>,
    /// The span from `start` to the last receiver's report.
    pub(crate) cpu_wall_secs: f64,
    /// User plus system CPU time and wake-ups over that span (separate
    /// processes only): of every process the system needs (its nodes, and
    /// its server or sidecars), and of its server side alone (the Redis or
    /// NATS server, or the sidecars; none for the library and the floor).
    pub(crate) used: Option<Usage>,
    pub(crate) server_used: Option<Usage>,
}

impl RunResult {
    pub(crate) fn originated_per_s(&self) -> f64 {
        self.originated as f64 / self.origin_secs
    }

    pub(crate) fn delivered_per_s(&self) -> f64 {
        self.delivered as f64 / self.delivery_secs
    }

    /// What every process (or the server side alone) used.
    fn usage(&self, server: bool) -> Option<Usage> {
        if server { self.server_used } else { self.used }
    }

    /// `total` per delivered invalidation.
    fn per_delivery(&self, total: f64) -> Option<f64> {
        (self.delivered > 0).then(|| total / self.delivered as f64)
    }

    /// CPU microseconds per delivered invalidation, of every process or of
    /// the server side.
    pub(crate) fn cpu_us_per_delivery(&self, server: bool) -> Option<f64> {
        self.per_delivery(self.usage(server)?.cpu_secs * 1e6)
    }

    /// Wake-ups per delivered invalidation, of every process or of the
    /// server side.
    pub(crate) fn wakeups_per_delivery(&self, server: bool) -> Option<f64> {
        self.per_delivery(self.usage(server)?.wakeups as f64)
    }

    /// CPU time over the run's span, in percent of one core.
    pub(crate) fn cpu_percent(&self) -> Option<f64> {
        let cpu = self.used?.cpu_secs;
        (self.cpu_wall_secs > 0.0).then(|| cpu * 100.0 / self.cpu_wall_secs)
    }
}

/// Everything measured for one system at one size.
#[derive(Default)]
pub(crate) struct Figures {
    pub(crate) latency: Option<RunResult>,
    pub(crate) throughput: Option<RunResult>,
    pub(crate) peak_rss_kib: Option<u64>,
}

impl Figures {
    pub(crate) fn pct(&self, q: f64) -> Option<f64> {
        let h = &self.latency.as_ref()?.latency;
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }

    pub(crate) fn max_us(&self) -> Option<f64> {
        let h = &self.latency.as_ref()?.latency;
        (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
    }

    pub(crate) fn min_us(&self) -> Option<f64> {
        let h = &self.latency.as_ref()?.latency;
        (!h.is_empty()).then(|| h.min() as f64 / 1000.0)
    }

    pub(crate) fn cpu_us_per_delivery(&self) -> Option<f64> {
        self.latency.as_ref()?.cpu_us_per_delivery(false)
    }

    pub(crate) fn server_cpu_at_rate(&self) -> Option<f64> {
        self.latency.as_ref()?.cpu_us_per_delivery(true)
    }

    pub(crate) fn wakeups_at_rate(&self, server: bool) -> Option<f64> {
        self.latency.as_ref()?.wakeups_per_delivery(server)
    }

    pub(crate) fn cpu_percent_at_rate(&self) -> Option<f64> {
        self.latency.as_ref()?.cpu_percent()
    }

    pub(crate) fn cpu_us_flat_out(&self) -> Option<f64> {
        self.throughput.as_ref()?.cpu_us_per_delivery(false)
    }

    pub(crate) fn delivered_per_s(&self) -> Option<f64> {
        Some(self.throughput.as_ref()?.delivered_per_s())
    }

    pub(crate) fn json(&self) -> Value {
        let t = self.throughput.as_ref();
        json!({
            "latency_us": {
                "min": self.min_us(),
                "p50": self.pct(0.5),
                "p99": self.pct(0.99),
                "p999": self.pct(0.999),
                "max": self.max_us(),
            },
            "throughput": {
                "originated_per_s": t.map(|t| t.originated_per_s().round()),
                "delivered_per_s": t.map(|t| t.delivered_per_s().round()),
            },
            "peak_rss_kib": self.peak_rss_kib,
            "cpu_us_per_delivery": self.cpu_us_per_delivery(),
            "cpu_percent_at_rate": self.cpu_percent_at_rate(),
            "server_cpu_us_per_delivery": self.server_cpu_at_rate(),
            "wakeups_per_delivery": self.wakeups_at_rate(false),
            "server_wakeups_per_delivery": self.wakeups_at_rate(true),
            "cpu_us_per_delivery_flat_out": self.cpu_us_flat_out(),
        })
    }
}
