//! Name resolution, an explicit step after parsing: the configuration
//! itself holds names as written.

use std::net::IpAddr;
use std::time::Duration;

use super::*;

/// What name resolution found for one node.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The node.
    pub addr: NodeAddr,
    /// Its addresses, or why there are none.
    pub ips: Result<Vec<IpAddr>, String>,
}

/// Resolves every node of the cluster (each lookup at most `timeout`, all
/// in parallel) and reports, as problems: names that do not resolve
/// (warnings: DNS may differ at run time) and two nodes whose addresses
/// intersect with equal ports (errors).
pub fn resolve(config: &ClusterConfig, timeout: Duration) -> (Vec<Resolved>, Vec<Problem>) {
    let all: Vec<(NodeAddr, String, Option<usize>)> =
        std::iter::once((config.node.clone(), node_source(config), None))
            .chain(
                config
                    .peers
                    .iter()
                    .map(|p| (p.addr.clone(), p.source.clone(), p.line)),
            )
            .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, (addr, _, _)) in all.iter().enumerate() {
        let tx = tx.clone();
        let addr = addr.clone();
        // A blocking lookup per node in its own thread, so one slow name
        // cannot hold up the rest; a thread that outlives the timeout is
        // simply abandoned.
        std::thread::spawn(move || {
            let _ = tx.send((i, addr.resolve()));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + timeout;
    let mut results: Vec<Result<Vec<IpAddr>, String>> =
        vec![Err(format!("no answer within {timeout:?}")); all.len()];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((i, r)) => results[i] = r.map_err(|e| e.to_string()),
            Err(_) => break,
        }
    }
    let mut problems = Vec::new();
    for ((addr, source, line), r) in all.iter().zip(&results) {
        if let Err(e) = r {
            problems.push(Problem {
                severity: Severity::Warning,
                key: Some(source.clone()),
                line: *line,
                message: format!(
                    "{} does not resolve now ({e}); it is resolved again on every connection attempt",
                    addr.host
                ),
            });
        }
    }
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            let (a, b) = (&all[i], &all[j]);
            if a.0.port != b.0.port || a.0.same_name(&b.0) {
                continue; // different ports, or already reported by name
            }
            if let (Ok(x), Ok(y)) = (&results[i], &results[j])
                && let Some(ip) = x.iter().find(|ip| y.contains(ip))
            {
                problems.push(Problem {
                    severity: Severity::Error,
                    key: Some(b.1.clone()),
                    line: b.2,
                    message: format!(
                        "{} and {} ({}) both resolve to {ip} port {}: {}",
                        b.0,
                        a.0,
                        a.1,
                        a.0.port,
                        if i == 0 {
                            "a node cannot peer with itself"
                        } else {
                            "the same node twice"
                        }
                    ),
                });
            }
        }
    }
    let resolved = all
        .into_iter()
        .zip(results)
        .map(|((addr, _, _), ips)| Resolved { addr, ips })
        .collect();
    (resolved, problems)
}

pub(crate) fn node_source(config: &ClusterConfig) -> String {
    match config.format {
        Format::Members => "cluster.hostname".into(),
        _ => "cluster.instance0".into(),
    }
}
