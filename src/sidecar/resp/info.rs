//! `INFO`, laid out as Redis 7.2 lays it out: the same sections in the same
//! order, the same section names and selectors (`default`, `all`,
//! `everything`, any case), `key:value` lines, a blank line between
//! sections. Clients read it at connect (ioredis's ready check reads
//! `loading:`; Spring Boot's health indicator reads `redis_version` from
//! `INFO server`), and monitoring reads the counters.
//!
//! What a pub/sub endpoint has no notion of (keys, persistence,
//! replication) is reported as a Redis with nothing in it would report it:
//! nothing loading, nothing to save, a master with no replicas.

use std::fmt::Write as _;

use bytes::Bytes;

use super::cmd::REDIS_VERSION;

/// The facts `INFO` reports, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// 40 hex digits, new at every start (Redis's `run_id`).
    pub run_id: String,
    /// The first port served.
    pub tcp_port: u16,
    /// `listener0:name=tcp,bind=…`: the addresses bound.
    pub binds: Vec<String>,
    /// Seconds since the endpoint started.
    pub uptime_secs: u64,
    /// Unix time when it started (Redis's `rdb_last_save_time` at startup).
    pub started_unix: u64,
    /// Unix time now, in microseconds.
    pub now_usec: u64,
    /// Connections open on the endpoint.
    pub connected_clients: usize,
    /// The cap on them.
    pub maxclients: usize,
    /// Connections accepted since start.
    pub total_connections: u64,
    /// Commands answered since start.
    pub total_commands: u64,
    /// Connections refused at the cap.
    pub rejected_connections: u64,
    /// Channels, patterns and shard channels subscribed to here.
    pub channels: usize,
    /// See [`Facts::channels`].
    pub patterns: usize,
    /// See [`Facts::channels`].
    pub shard_channels: usize,
    /// Resident memory of the process, in bytes.
    pub rss: u64,
}

/// Sections of `INFO` with no argument or `default`, in output order.
const DEFAULT: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "module_list",
    "errorstats",
    "cluster",
    "keyspace",
];

/// The text of `INFO args…` (the arguments after `INFO`).
pub fn render(facts: &Facts, args: &[Bytes]) -> String {
    let mut all = false;
    let mut wanted: Vec<String> = Vec::new();
    if args.is_empty() {
        wanted.extend(DEFAULT.iter().map(|s| s.to_string()));
    }
    for a in args {
        let s = String::from_utf8_lossy(a).to_ascii_lowercase();
        match s.as_str() {
            "default" => wanted.extend(DEFAULT.iter().map(|s| s.to_string())),
            "all" | "everything" => all = true,
            _ => wanted.push(s),
        }
    }
    let want = |name: &str| all || wanted.iter().any(|w| w == name);
    let mut out = String::new();
    let section = |out: &mut String, title: &str, body: &dyn Fn(&mut String)| {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str("# ");
        out.push_str(title);
        out.push_str("\r\n");
        body(out);
    };
    let f = facts;
    if want("server") {
        section(&mut out, "Server", &|o| server(o, f));
    }
    if want("clients") {
        section(&mut out, "Clients", &|o| {
            line(o, "connected_clients", f.connected_clients);
            for (k, v) in [
                ("cluster_connections", 0usize),
                ("maxclients", f.maxclients),
                ("client_recent_max_input_buffer", 0),
                ("client_recent_max_output_buffer", 0),
                ("blocked_clients", 0),
                ("tracking_clients", 0),
                ("clients_in_timeout_table", 0),
                ("total_blocking_keys", 0),
                ("total_blocking_keys_on_nokey", 0),
            ] {
                line(o, k, v);
            }
        });
    }
    if want("memory") {
        section(&mut out, "Memory", &|o| {
            line(o, "used_memory", f.rss);
            line(o, "used_memory_human", human(f.rss));
            line(o, "used_memory_rss", f.rss);
            line(o, "used_memory_rss_human", human(f.rss));
            line(o, "maxmemory", 0);
            line(o, "maxmemory_human", human(0));
            line(o, "maxmemory_policy", "noeviction");
            line(o, "mem_allocator", "libc");
        });
    }
    if want("persistence") {
        section(&mut out, "Persistence", &|o| persistence(o, f));
    }
    if want("stats") {
        section(&mut out, "Stats", &|o| {
            line(o, "total_connections_received", f.total_connections);
            line(o, "total_commands_processed", f.total_commands);
            line(o, "rejected_connections", f.rejected_connections);
            line(o, "expired_keys", 0);
            line(o, "evicted_keys", 0);
            line(o, "keyspace_hits", 0);
            line(o, "keyspace_misses", 0);
            line(o, "pubsub_channels", f.channels);
            line(o, "pubsub_patterns", f.patterns);
            line(o, "pubsubshard_channels", f.shard_channels);
        });
    }
    if want("replication") {
        section(&mut out, "Replication", &|o| {
            line(o, "role", "master");
            line(o, "connected_slaves", 0);
            line(o, "master_failover_state", "no-failover");
            line(o, "master_replid", &f.run_id);
            line(o, "master_replid2", "0".repeat(40));
            line(o, "master_repl_offset", 0);
            line(o, "second_repl_offset", -1);
            line(o, "repl_backlog_active", 0);
            line(o, "repl_backlog_size", 1_048_576);
            line(o, "repl_backlog_first_byte_offset", 0);
            line(o, "repl_backlog_histlen", 0);
        });
    }
    if want("cpu") {
        section(&mut out, "CPU", &cpu);
    }
    if want("module_list") || want("modules") {
        section(&mut out, "Modules", &|_| {});
    }
    if want("commandstats") {
        section(&mut out, "Commandstats", &|_| {});
    }
    if want("errorstats") {
        section(&mut out, "Errorstats", &|_| {});
    }
    if want("latencystats") {
        section(&mut out, "Latencystats", &|_| {});
    }
    if want("cluster") {
        section(&mut out, "Cluster", &|o| line(o, "cluster_enabled", 0));
    }
    if want("keyspace") {
        section(&mut out, "Keyspace", &|_| {});
    }
    out
}

fn line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "{key}:{value}\r\n");
}

fn server(o: &mut String, f: &Facts) {
    line(o, "redis_version", REDIS_VERSION);
    line(o, "redis_git_sha1", "00000000");
    line(o, "redis_git_dirty", 0);
    line(o, "redis_build_id", "0");
    line(o, "redis_mode", "standalone");
    line(o, "os", os());
    line(o, "arch_bits", usize::BITS);
    line(o, "monotonic_clock", "POSIX clock_gettime");
    line(o, "multiplexing_api", "epoll");
    line(o, "atomicvar_api", "c11-builtin");
    line(o, "gcc_version", "0.0.0");
    line(o, "process_id", std::process::id());
    line(o, "process_supervised", "no");
    line(o, "run_id", &f.run_id);
    line(o, "tcp_port", f.tcp_port);
    line(o, "server_time_usec", f.now_usec);
    line(o, "uptime_in_seconds", f.uptime_secs);
    line(o, "uptime_in_days", f.uptime_secs / 86_400);
    line(o, "hz", 10);
    line(o, "configured_hz", 10);
    // Redis's LRU clock: seconds, on 24 bits.
    line(o, "lru_clock", (f.now_usec / 1_000_000) & ((1 << 24) - 1));
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    line(o, "executable", exe);
    line(o, "config_file", "");
    line(o, "io_threads_active", 0);
    // Not Redis's: tells an operator which server answered.
    line(o, "cachecast_version", env!("CARGO_PKG_VERSION"));
    let mut l = String::from("name=tcp");
    for b in &f.binds {
        let _ = write!(l, ",bind={b}");
    }
    let _ = write!(l, ",port={}", f.tcp_port);
    line(o, "listener0", l);
}

fn persistence(o: &mut String, f: &Facts) {
    for (k, v) in [
        ("loading", "0"),
        ("async_loading", "0"),
        ("current_cow_peak", "0"),
        ("current_cow_size", "0"),
        ("current_cow_size_age", "0"),
        ("current_fork_perc", "0.00"),
        ("current_save_keys_processed", "0"),
        ("current_save_keys_total", "0"),
        ("rdb_changes_since_last_save", "0"),
        ("rdb_bgsave_in_progress", "0"),
    ] {
        line(o, k, v);
    }
    // At startup Redis considers its (empty) data saved.
    line(o, "rdb_last_save_time", f.started_unix);
    for (k, v) in [
        ("rdb_last_bgsave_status", "ok"),
        ("rdb_last_bgsave_time_sec", "-1"),
        ("rdb_current_bgsave_time_sec", "-1"),
        ("rdb_saves", "0"),
        ("rdb_last_cow_size", "0"),
        ("rdb_last_load_keys_expired", "0"),
        ("rdb_last_load_keys_loaded", "0"),
        ("aof_enabled", "0"),
        ("aof_rewrite_in_progress", "0"),
        ("aof_rewrite_scheduled", "0"),
        ("aof_last_rewrite_time_sec", "-1"),
        ("aof_current_rewrite_time_sec", "-1"),
        ("aof_last_bgrewrite_status", "ok"),
        ("aof_rewrites", "0"),
        ("aof_rewrites_consecutive_failures", "0"),
        ("aof_last_write_status", "ok"),
        ("aof_last_cow_size", "0"),
        ("module_fork_in_progress", "0"),
        ("module_fork_last_cow_size", "0"),
    ] {
        line(o, k, v);
    }
}

fn cpu(o: &mut String) {
    let usage = |who| {
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return ((0, 0), (0, 0));
        }
        (
            (ru.ru_stime.tv_sec, ru.ru_stime.tv_usec),
            (ru.ru_utime.tv_sec, ru.ru_utime.tv_usec),
        )
    };
    let ((ss, su), (us, uu)) = usage(libc::RUSAGE_SELF);
    let ((css, csu), (cus, cuu)) = usage(libc::RUSAGE_CHILDREN);
    line(o, "used_cpu_sys", format!("{ss}.{su:06}"));
    line(o, "used_cpu_user", format!("{us}.{uu:06}"));
    line(o, "used_cpu_sys_children", format!("{css}.{csu:06}"));
    line(o, "used_cpu_user_children", format!("{cus}.{cuu:06}"));
}

/// `uname`'s system, release and machine, as Redis's `os:` gives them.
fn os() -> String {
    // SAFETY: uname only writes the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return std::env::consts::OS.to_string();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!(
        "{} {} {}",
        field(&u.sysname),
        field(&u.release),
        field(&u.machine)
    )
}

/// Redis's `bytesToHuman`: `512B`, `1.50K`, `2.00M`, …
fn human(n: u64) -> String {
    let units = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    for u in units {
        if v < 1024.0 {
            return format!("{v:.2}{u}");
        }
        v /= 1024.0;
    }
    format!("{:.2}P", v * 1024.0)
}

/// The resident memory of this process, from `/proc/self/statm` (0 where
/// there is none).
pub fn rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(text: &str) -> Vec<&str> {
        text.split("\r\n").filter(|l| l.starts_with("# ")).collect()
    }

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter().map(|s| Bytes::from(s.to_string())).collect()
    }

    #[test]
    fn sections_are_chosen_as_redis_chooses_them() {
        let f = Facts::default();
        let text = render(&f, &[]);
        let default = headers(&text);
        assert_eq!(
            default,
            [
                "# Server",
                "# Clients",
                "# Memory",
                "# Persistence",
                "# Stats",
                "# Replication",
                "# CPU",
                "# Modules",
                "# Errorstats",
                "# Cluster",
                "# Keyspace"
            ]
        );
        let again = render(&f, &args(&["DEFAULT"]));
        assert_eq!(headers(&again), default);
        let all = render(&f, &args(&["all"]));
        assert!(headers(&all).contains(&"# Commandstats"));
        assert_eq!(render(&f, &args(&["nosuch"])), "");
        let two = render(&f, &args(&["persistence", "SERVER", "server"]));
        assert_eq!(headers(&two), ["# Server", "# Persistence"]);
        assert!(two.contains("\r\n\r\n# Persistence\r\nloading:0\r\n"));
        assert!(two.ends_with("module_fork_last_cow_size:0\r\n"));
        assert_eq!(human(1536), "1.50K");
        assert_eq!(human(100), "100B");
    }
}
