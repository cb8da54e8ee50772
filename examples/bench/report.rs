//! The report: the tables printed for people (every system side by side,
//! then the application's path), the targets of docs/performance.md
//! checked against the figures, and the helpers both use.

use std::collections::HashMap;

use crate::stats::Figures;
use crate::systems::System;

/// Every system's figures at every cluster size.
pub(crate) type Results = HashMap<(System, usize), Figures>;

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100_000.0 => {
            let s = format!("{:.0}", v);
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The better of two figures (the lower when `low`), either of which may
/// be missing.
fn better(low: bool, a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if low => Some(a.min(b)),
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

type Metric = fn(&Figures) -> Option<f64>;

/// The rows of every table, and whether lower is better.
fn rows() -> [(&'static str, bool, Metric); 13] {
    [
        ("latency p50 (µs)", true, |f| f.pct(0.5)),
        ("latency p99 (µs)", true, |f| f.pct(0.99)),
        ("latency p99.9 (µs)", true, |f| f.pct(0.999)),
        ("latency max (µs)", true, |f| f.max_us()),
        ("CPU µs / delivery (a)", true, |f| f.cpu_us_per_delivery()),
        ("  of the server side (a)", true, |f| f.server_cpu_at_rate()),
        ("CPU % of a core (a)", true, |f| f.cpu_percent_at_rate()),
        ("wake-ups / delivery (a)", true, |f| {
            f.wakeups_at_rate(false)
        }),
        ("  of the server side (a)", true, |f| {
            f.wakeups_at_rate(true)
        }),
        ("originated/s", false, |f| {
            f.throughput.as_ref().map(|t| t.originated_per_s())
        }),
        ("delivered/s (all peers)", false, |f| f.delivered_per_s()),
        ("CPU µs / delivery (b)", true, |f| f.cpu_us_flat_out()),
        ("peak RSS under (b) (KiB)", true, |f| {
            f.peak_rss_kib.map(|v| v as f64)
        }),
    ]
}

pub(crate) fn print_table(results: &Results, sizes: &[usize], mode: &str) {
    for &n in sizes {
        let get = |s| results.get(&(s, n));
        println!();
        println!(
            "{n} nodes (1 origin, {} receiver{}), {mode}",
            n - 1,
            if n == 2 { "" } else { "s" }
        );
        println!(
            "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
            "", "cachecast", "Redis", "NATS", "raw TCP", "cc/broker", "cc/raw"
        );
        for (name, low, metric) in &rows() {
            let v = |s| get(s).and_then(metric);
            let (c, r, b, w) = (
                v(System::Cachecast),
                v(System::Redis),
                v(System::Nats),
                v(System::Raw),
            );
            // Against the better broker of the two, for this row.
            let broker = better(*low, r, b);
            println!(
                "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
                name,
                fmt_num(c),
                fmt_num(r),
                fmt_num(b),
                fmt_num(w),
                ratio(c, broker),
                ratio(c, w)
            );
        }
        if get(System::Resp).is_none() && get(System::Http).is_none() {
            continue;
        }
        // The application's path: the same Redis clients, through their
        // own sidecars or through one redis-server; NATS clients through
        // one nats-server beside them.
        println!();
        println!(
            "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9}",
            "application's path", "RESP-cc", "HTTP-cc", "Redis", "NATS", "RESP/brk"
        );
        for (name, low, metric) in &rows() {
            let v = |s| get(s).and_then(metric);
            let (a, h, r, b) = (
                v(System::Resp),
                v(System::Http),
                v(System::Redis),
                v(System::Nats),
            );
            let broker = better(*low, r, b);
            println!(
                "{:<26} {:>11} {:>11} {:>11} {:>11} {:>9}",
                name,
                fmt_num(a),
                fmt_num(h),
                fmt_num(r),
                fmt_num(b),
                ratio(a, broker)
            );
        }
    }
    println!();
    println!(
        "(a) at the paced rate, (b) flat out; CPU: user+system time of every process a system needs \
         (nodes, and its server or sidecars); \
         of the server side: the Redis or NATS server, or the sidecars, alone; wake-ups: voluntary \
         context switches; cc/broker: against the better of Redis and NATS"
    );
}

/// The targets of docs/performance.md, shown (not asserted).
pub(crate) fn targets(
    results: &Results,
    sizes: &[usize],
    sidecar: Option<u64>,
) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let f = |s, n| results.get(&(s, n));
    let Some(&n) = sizes.iter().max() else {
        return out;
    };
    let (c, r, b, w) = (
        f(System::Cachecast, n),
        f(System::Redis, n),
        f(System::Nats, n),
        f(System::Raw, n),
    );
    let us = |x: f64| format!("{x:.1} µs");
    for (q, name, limit) in [(0.5, "p50", 1.15), (0.99, "p99", 1.5)] {
        if let (Some(cv), Some(wv)) = (c.and_then(|c| c.pct(q)), w.and_then(|w| w.pct(q))) {
            out.push((
                cv <= limit * wv,
                format!(
                    "{n} nodes: latency {name} at most {limit}x the raw TCP floor: {} vs {} ({:.2}x)",
                    us(cv),
                    us(wv),
                    cv / wv
                ),
            ));
        }
    }
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let broker = better(true, r.and_then(|r| r.pct(q)), b.and_then(|b| b.pct(q)));
        if let (Some(cv), Some(bv)) = (c.and_then(|c| c.pct(q)), broker) {
            out.push((
                cv <= bv / 2.0,
                format!(
                    "{n} nodes: latency {name} at most half of the better broker's: {} vs {}",
                    us(cv),
                    us(bv)
                ),
            ));
        }
    }
    if let (Some(cv), Some(rv)) = (
        c.and_then(|c| c.cpu_us_per_delivery()),
        r.and_then(|r| r.cpu_us_per_delivery()),
    ) {
        out.push((
            cv <= rv / 2.0,
            format!(
                "{n} nodes: CPU per delivery at the paced rate at most half of Redis's (server and clients): {cv:.2} µs vs {rv:.2} µs"
            ),
        ));
    }
    let broker = better(
        false,
        r.and_then(Figures::delivered_per_s),
        b.and_then(Figures::delivered_per_s),
    );
    if let (Some(cv), Some(bv)) = (c.and_then(Figures::delivered_per_s), broker) {
        out.push((
            cv >= 4.0 * bv,
            format!(
                "{n} nodes: delivered/s at least 4x the better broker's: {} vs {}",
                fmt_num(Some(cv)),
                fmt_num(Some(bv))
            ),
        ));
    }
    if let Some(kib) = sidecar {
        out.push((
            kib < 10 * 1024,
            format!(
                "idle sidecar RSS under 10 MiB: {:.1} MiB",
                kib as f64 / 1024.0
            ),
        ));
    }
    out
}

/// An option's value as the command line spells it.
pub(crate) fn arg_name(v: impl clap::ValueEnum) -> Option<String> {
    v.to_possible_value().map(|p| p.get_name().to_owned())
}
