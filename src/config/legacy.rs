//! The two legacy DHIS 2 cluster formats: `cluster.instanceN.*` and
//! `cluster.hostname` / `cluster.members`, and the checks of the node list
//! they give.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;

/// A port number, 1..65535, digits only (no sign).
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a port number (1..65535)"));
    }
    match s.parse::<u64>() {
        Ok(0) => Err("port 0 is not allowed (1..65535)".into()),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!("port {s} is out of range (1..65535)")),
    }
}

/// Checks a host name or IP address as written in the file.
pub(crate) fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!(
                "`{host}` is the unspecified address, which peers cannot reach; give the address peers reach this node by (cachecast.bind says where to listen)"
            ));
        }
        if ip.is_multicast() {
            return Err(format!(
                "`{host}` is a multicast address, not a node's address"
            ));
        }
        return Ok(());
    }
    if host.contains("://") {
        return Err(format!("`{host}` is a URL; give a host name or IP address"));
    }
    if host.contains(':') && host.contains('%') {
        return Err(format!(
            "`{host}`: IPv6 zone ids (`%eth0`) are not supported; \
             give a global or unique-local address of the peer"
        ));
    }
    if host.contains(':') {
        return Err(format!(
            "`{host}` holds a `:`; give the port in its own key (or bracket an IPv6 address)"
        ));
    }
    // Digits and dots only, yet not an IPv4 address (`10.0.0.256`,
    // `10.0.1`): a mistyped address, never a host name.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("`{host}` is not a valid IPv4 address"));
    }
    if host.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok {
        return Err(format!("`{host}` is not a valid host name or IP address"));
    }
    Ok(())
}

/// Parses a host key's value; IPv6 may be written in brackets.
pub(crate) fn parse_host(entry: &Entry, key: &str, report: &mut Report) -> Option<String> {
    let host = entry.value.as_str();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match check_host(host) {
        Ok(()) => Some(host.to_string()),
        Err(msg) => {
            report.error(key, Some(entry.line), msg);
            None
        }
    }
}

/// A port key: `Ok(None)` when not set, `Err` when invalid (reported).
pub(crate) fn port_of(
    keys: &BTreeMap<String, Entry>,
    key: &str,
    report: &mut Report,
) -> Result<Option<u16>, ()> {
    let Some(entry) = value(keys, key)? else {
        return Ok(None);
    };
    match parse_port(&entry.value) {
        Ok(p) => Ok(Some(p)),
        Err(msg) => {
            report.error(key, Some(entry.line), msg);
            Err(())
        }
    }
}

/// What an instance key names: its index and field.
pub(crate) enum InstanceKey<'a> {
    /// A recognised field of instance `n` (n may be out of range).
    Field(u64, &'a str),
    /// Not of the form `cluster.instanceN.<field>`.
    Other,
}

pub(crate) fn instance_key(key: &str) -> InstanceKey<'_> {
    let Some(rest) = key.strip_prefix("cluster.instance") else {
        return InstanceKey::Other;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (n, field) = rest.split_at(digits);
    let Some(field) = field.strip_prefix('.') else {
        return InstanceKey::Other;
    };
    // `instance01` is not what DHIS 2 reads: treat it as unknown.
    if digits == 0 || (digits > 1 && n.starts_with('0')) {
        return InstanceKey::Other;
    }
    // A number too long for u64 is out of range all the same.
    let n = n.parse::<u64>().unwrap_or(u64::MAX);
    match field {
        "hostname" | "cache.port" | "cache.remote.object.port" => InstanceKey::Field(n, field),
        _ => InstanceKey::Other,
    }
}

/// What the cluster keys gave: this node (if it could be read), the peers
/// that could be read, and whether everything could.
pub(crate) struct Nodes {
    pub(crate) node: Option<Peer>,
    pub(crate) peers: Vec<Peer>,
    pub(crate) ok: bool,
}

pub(crate) fn instances_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Nodes {
    let mut nodes = Nodes {
        node: None,
        peers: Vec::new(),
        ok: true,
    };
    for n in 0..MAX_INSTANCES {
        let host_key = format!("cluster.instance{n}.hostname");
        let port_key = format!("cluster.instance{n}.cache.port");
        let port = port_of(keys, &port_key, report);
        match value(keys, &host_key) {
            Err(()) => nodes.ok = false,
            Ok(Some(entry)) => {
                let (Some(host), Ok(port)) = (parse_host(entry, &host_key, report), port) else {
                    nodes.ok = false;
                    continue;
                };
                let peer = Peer {
                    addr: NodeAddr::new(host, port.unwrap_or(DEFAULT_PORT)),
                    source: format!("cluster.instance{n}"),
                    line: Some(entry.line),
                };
                if n == 0 {
                    nodes.node = Some(peer);
                } else {
                    nodes.peers.push(peer);
                }
            }
            Ok(None) => {
                if let Some(port_entry) = keys.get(&port_key).filter(|e| e.present()) {
                    report.error(
                        &port_key,
                        Some(port_entry.line),
                        format!("a port without its host name (set {host_key})"),
                    );
                    nodes.ok = false;
                }
                if n == 0 {
                    report.error(
                        &host_key,
                        keys.get(&host_key).map(|e| e.line),
                        NOT_SET_INSTANCE0,
                    );
                    nodes.ok = false;
                }
            }
        }
    }
    nodes
}

pub(crate) fn members_format(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Nodes {
    let mut nodes = Nodes {
        node: None,
        peers: Vec::new(),
        ok: true,
    };
    let port = port_of(keys, "cluster.cache.port", report);
    match value(keys, "cluster.hostname") {
        Err(()) => nodes.ok = false,
        Ok(Some(entry)) => match (parse_host(entry, "cluster.hostname", report), port) {
            (Some(host), Ok(port)) => {
                nodes.node = Some(Peer {
                    addr: NodeAddr::new(host, port.unwrap_or(DEFAULT_PORT)),
                    source: "cluster.hostname".into(),
                    line: Some(entry.line),
                });
            }
            _ => nodes.ok = false,
        },
        Ok(None) => {
            report.error(
                "cluster.hostname",
                keys.get("cluster.hostname").map(|e| e.line),
                NOT_SET_INSTANCE0,
            );
            if let Some(port_entry) = keys.get("cluster.cache.port").filter(|e| e.present()) {
                report.error(
                    "cluster.cache.port",
                    Some(port_entry.line),
                    "a port without its host name (set cluster.hostname)",
                );
            }
            nodes.ok = false;
        }
    }
    if port.is_err() {
        nodes.ok = false;
    }
    let entry = match value(keys, "cluster.members") {
        Ok(Some(entry)) => entry,
        Ok(None) => return nodes,
        Err(()) => {
            nodes.ok = false;
            return nodes;
        }
    };
    let line = Some(entry.line);
    let mut count = 0;
    for (i, member) in entry.value.split(',').map(str::trim).enumerate() {
        if member.is_empty() {
            report.warn(
                "cluster.members",
                line,
                format!("entry {} is empty (a stray comma?)", i + 1),
            );
            continue;
        }
        count += 1;
        match member.parse::<NodeAddr>() {
            Ok(addr) => {
                if member.parse::<std::net::Ipv6Addr>().is_ok() {
                    report.warn(
                        "cluster.members",
                        line,
                        format!(
                            "entry {}: write an IPv6 address in brackets (`[{member}]:port`), so that a port cannot be read as part of it; port {DEFAULT_PORT} applies",
                            i + 1
                        ),
                    );
                }
                nodes.peers.push(Peer {
                    addr,
                    source: format!("cluster.members[{}]", i + 1),
                    line,
                });
            }
            Err(e) => {
                report.error("cluster.members", line, format!("entry {}: {e}", i + 1));
                nodes.ok = false;
            }
        }
    }
    if count + 1 > MAX_INSTANCES {
        report.error(
            "cluster.members",
            line,
            format!(
                "{count} members: at most {MAX_INSTANCES} instances (this node and {} members)",
                MAX_INSTANCES - 1
            ),
        );
        nodes.ok = false;
    }
    nodes
}

/// Two entries naming the same `host:port` (by text, or as equal IP
/// addresses however written) are an error.
pub(crate) fn check_duplicates(node: &Peer, peers: &[Peer], report: &mut Report) {
    let all: Vec<&Peer> = std::iter::once(node).chain(peers).collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.addr.same_name(&b.addr) {
                let why = if i == 0 {
                    "a node cannot peer with itself"
                } else {
                    "the same node twice"
                };
                report.error(
                    &b.source,
                    b.line,
                    format!("{} is also {} ({why})", b.addr, a.source),
                );
            }
        }
    }
}

/// `Some(true)` for a loopback address or `localhost`, `Some(false)` for
/// any other IP address, `None` for a name (unknown until resolved).
pub(crate) fn loopback(host: &str) -> Option<bool> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(true);
    }
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical().is_loopback())
}

/// This node named by a loopback address while a peer is on another
/// machine: that peer cannot reach this node by its identity.
pub(crate) fn check_loopback(node: &Peer, peers: &[Peer], report: &mut Report) {
    if loopback(&node.addr.host) != Some(true) {
        return;
    }
    if let Some(p) = peers.iter().find(|p| loopback(&p.addr.host) == Some(false)) {
        report.warn(
            &node.source,
            node.line,
            format!(
                "this node is {}, a loopback address, but {} ({}) is another machine, which cannot reach it there; give the address peers reach this node by",
                node.addr, p.addr, p.source
            ),
        );
    }
}
