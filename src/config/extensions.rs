//! Our `cachecast.*` extensions, and the `redis.*` keys the
//! Redis-protocol endpoint reads.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::*;

pub(crate) struct Extensions {
    pub(crate) bind: SocketAddr,
    pub(crate) secret: Option<SecretSource>,
    pub(crate) tls: Option<TlsFiles>,
    pub(crate) api: SocketAddr,
    pub(crate) api_bind_explicit: bool,
    pub(crate) api_token: Option<PathBuf>,
    pub(crate) buffer: usize,
    pub(crate) webhook_url: Option<String>,
    pub(crate) state_file: StateFile,
    pub(crate) flush_hook: Option<FlushHookConfig>,
}

/// An IP address, IPv6 optionally in brackets.
pub(crate) fn ip_literal(text: &str) -> Option<IpAddr> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match inner.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) if inner.len() != text.len() => None, // `[10.0.0.1]`
        Ok(ip) => Some(ip),
        Err(_) => None,
    }
}

/// `cachecast.bind`: `addr` or `addr:port`, an IP address (no name).
pub(crate) fn parse_bind(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Some(ip) = ip_literal(text) {
        return Ok((ip, None));
    }
    if let Some((host, port)) = text.rsplit_once(':')
        && let Some(ip) = ip_literal(host).filter(|ip| ip.is_ipv4() || host.starts_with('['))
    {
        return Ok((ip, Some(parse_port(port)?)));
    }
    Err(format!(
        "`{text}` is not `address` or `address:port` (an IP address, not a name; IPv6 in brackets with a port)"
    ))
}

/// The `cachecast.*` keys, each concern read by a function of its own
/// that returns `None` once it reported a problem (a key set twice
/// included); every problem is reported, not only the first.
pub(crate) fn extensions(
    keys: &BTreeMap<String, Entry>,
    node_port: u16,
    report: &mut Report,
) -> Option<Extensions> {
    let bind = bind(keys, node_port, report);
    let secret = secret(keys, report);
    let tls = tls(keys, report);
    let api = api(keys, report);
    let api_token = value(keys, "cachecast.api.token.file")
        .ok()
        .map(|e| e.map(|e| PathBuf::from(&e.value)));
    let buffer = buffer(keys, report);
    let state_file = state_file(keys, report);
    let webhook_url = webhook(keys, report);
    let flush_hook = flush_hook(keys, report);
    let ((api, api_bind_explicit), api_token, bind, secret, tls, buffer, webhook_url, flush_hook) = (
        api?,
        api_token?,
        bind?,
        secret?,
        tls?,
        buffer?,
        webhook_url?,
        flush_hook?,
    );
    Some(Extensions {
        bind,
        secret,
        tls,
        api,
        api_bind_explicit,
        api_token,
        buffer,
        webhook_url,
        state_file,
        flush_hook,
    })
}

/// `cachecast.state.file`: a path, or `none` to keep no state file (the
/// operator's explicit choice, warned about); unset, the default path.
fn state_file(keys: &BTreeMap<String, Entry>, report: &mut Report) -> StateFile {
    let key = "cachecast.state.file";
    match value(keys, key).ok().flatten() {
        None => StateFile::Default,
        Some(e) if e.value.eq_ignore_ascii_case("none") => {
            report.warn(
                key,
                Some(e.line),
                "none: no state file, so a start after a crash cannot tell the peers to flush \
                 for what the crashed run accepted and never delivered; invalidations can be \
                 lost silently (remove the key to keep one at the default path)",
            );
            StateFile::Off
        }
        Some(e) => StateFile::At(PathBuf::from(&e.value)),
    }
}

/// `cachecast.bind`: `addr` or `addr:port`; by default every address, on
/// this node's port.
fn bind(keys: &BTreeMap<String, Entry>, node_port: u16, report: &mut Report) -> Option<SocketAddr> {
    let mut bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), node_port);
    let Some(entry) = value(keys, "cachecast.bind").ok()? else {
        return Some(bind);
    };
    match parse_bind(&entry.value) {
        Ok((ip, port)) => {
            bind.set_ip(ip);
            if let Some(port) = port {
                bind.set_port(port);
            }
            Some(bind)
        }
        Err(msg) => {
            report.error("cachecast.bind", Some(entry.line), msg);
            None
        }
    }
}

/// `cachecast.secret` or `cachecast.secret.file`, not both.
fn secret(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<Option<SecretSource>> {
    let inline = value(keys, "cachecast.secret").ok()?;
    let file = value(keys, "cachecast.secret.file").ok()?;
    match (inline, file) {
        (Some(a), Some(f)) => {
            report.error(
                "cachecast.secret",
                Some(a.line),
                format!(
                    "both cachecast.secret and cachecast.secret.file (line {}) are set; keep one",
                    f.line
                ),
            );
            None
        }
        (Some(a), None) => Some(Some(SecretSource::Inline(a.value.clone()))),
        (None, Some(f)) => Some(Some(SecretSource::File(PathBuf::from(&f.value)))),
        (None, None) => Some(None),
    }
}

/// `cachecast.tls.cert`, `.key` and `.ca`: all three, or none.
fn tls(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<Option<TlsFiles>> {
    let tls_keys = [
        "cachecast.tls.cert",
        "cachecast.tls.key",
        "cachecast.tls.ca",
    ];
    let mut values = Vec::with_capacity(3);
    for k in tls_keys {
        values.push(value(keys, k).ok()?);
    }
    match values.as_slice() {
        [Some(c), Some(k), Some(a)] => Some(Some(TlsFiles {
            cert: PathBuf::from(&c.value),
            key: PathBuf::from(&k.value),
            ca: PathBuf::from(&a.value),
        })),
        [None, None, None] => Some(None),
        _ => {
            let set: Vec<String> = tls_keys
                .iter()
                .zip(&values)
                .filter_map(|(k, v)| v.map(|e| format!("{k} (line {})", e.line)))
                .collect();
            for (key, _) in tls_keys.iter().zip(&values).filter(|(_, v)| v.is_none()) {
                report.error(
                    key,
                    None,
                    format!(
                        "not set, but {} is: mutual TLS needs all three of cachecast.tls.cert, cachecast.tls.key and cachecast.tls.ca",
                        set.join(" and ")
                    ),
                );
            }
            None
        }
    }
}

/// `cachecast.api.port` and `cachecast.api.bind`: the sidecar's API
/// address, and whether its address was set (loopback unless said).
fn api(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<(SocketAddr, bool)> {
    let port = port_of(keys, "cachecast.api.port", report);
    let bind = value(keys, "cachecast.api.bind");
    let mut api = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port.as_ref()
            .ok()
            .copied()
            .flatten()
            .unwrap_or(DEFAULT_API_PORT),
    );
    let mut explicit = false;
    let mut ok = port.is_ok() && bind.is_ok();
    if let Ok(Some(entry)) = bind {
        match ip_literal(&entry.value) {
            Some(ip) => {
                api.set_ip(ip);
                explicit = true;
                if !ip.to_canonical().is_loopback() {
                    report.warn(
                        "cachecast.api.bind",
                        Some(entry.line),
                        format!(
                            "{ip} is not a loopback address: the sidecar's API (which can invalidate every cache) is open to the network"
                        ),
                    );
                }
            }
            None => {
                report.error(
                    "cachecast.api.bind",
                    Some(entry.line),
                    format!("`{}` is not an IP address", entry.value),
                );
                ok = false;
            }
        }
    }
    ok.then_some((api, explicit))
}

/// Most connections `cachecast.resp.max.connections` may allow: each is a
/// file descriptor, and the limit on open files must hold them all.
pub const MAX_RESP_CONNECTIONS_LIMIT: usize = 65_536;

/// `cachecast.resp.max.connections`: Redis-protocol connections open at
/// once, 1 to [`MAX_RESP_CONNECTIONS_LIMIT`].
fn resp_max_connections(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<usize> {
    let key = "cachecast.resp.max.connections";
    let Some(entry) = value(keys, key).ok()? else {
        return Some(crate::config::DEFAULT_RESP_CONNECTIONS);
    };
    let digits = entry.value.bytes().all(|b| b.is_ascii_digit());
    match entry.value.parse::<usize>() {
        Ok(n) if digits && (1..=MAX_RESP_CONNECTIONS_LIMIT).contains(&n) => Some(n),
        _ => {
            report.error(
                key,
                Some(entry.line),
                format!(
                    "`{}` is not a number of connections from 1 to {MAX_RESP_CONNECTIONS_LIMIT}",
                    entry.value
                ),
            );
            None
        }
    }
}

/// `cachecast.buffer`: invalidations held per peer, 1 to [`MAX_BUFFER`].
fn buffer(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<usize> {
    let Some(entry) = value(keys, "cachecast.buffer").ok()? else {
        return Some(DEFAULT_BUFFER);
    };
    let digits = entry.value.bytes().all(|b| b.is_ascii_digit());
    match entry.value.parse::<usize>() {
        Ok(n) if digits && (1..=MAX_BUFFER).contains(&n) => Some(n),
        _ => {
            report.error(
                "cachecast.buffer",
                Some(entry.line),
                format!(
                    "`{}` is not a number of invalidations from 1 to {MAX_BUFFER}",
                    entry.value
                ),
            );
            None
        }
    }
}

/// `cachecast.webhook.url`, checked against `cachecast.webhook.remote`.
fn webhook(keys: &BTreeMap<String, Entry>, report: &mut Report) -> Option<Option<String>> {
    // Read with the words of DHIS 2's on/off keys, as the rest of the
    // file; anything else is an error, not off: the key opens the
    // webhook to another host, and a slip should be seen.
    let remote = match value(keys, "cachecast.webhook.remote").ok()? {
        None => Some(false),
        Some(e) if is_switch_word(&e.value) => Some(is_on(&e.value)),
        Some(e) => {
            report.error(
                "cachecast.webhook.remote",
                Some(e.line),
                format!("`{}` is not `true`, `false`, `on` or `off`", e.value),
            );
            None
        }
    };
    let Some(entry) = value(keys, "cachecast.webhook.url").ok()? else {
        return remote.map(|_| None);
    };
    // Checked even when `remote` was wrong, so that both are reported.
    match check_webhook(&entry.value, remote.unwrap_or(false)) {
        Ok(warning) => {
            if let Some(w) = warning {
                report.warn("cachecast.webhook.url", Some(entry.line), w);
            }
            remote.map(|_| Some(entry.value.clone()))
        }
        Err(msg) => {
            report.error("cachecast.webhook.url", Some(entry.line), msg);
            None
        }
    }
}

/// `cachecast.flush.url` and `cachecast.flush.credentials.file`.
fn flush_hook(
    keys: &BTreeMap<String, Entry>,
    report: &mut Report,
) -> Option<Option<FlushHookConfig>> {
    let url = value(keys, "cachecast.flush.url").ok()?;
    let credentials = value(keys, "cachecast.flush.credentials.file").ok()?;
    let Some(entry) = url else {
        if let Some(c) = credentials {
            report.warn(
                "cachecast.flush.credentials.file",
                Some(c.line),
                "set without cachecast.flush.url: not used",
            );
        }
        return Some(None);
    };
    match check_flush_url(&entry.value) {
        Ok(warning) => {
            if let Some(w) = warning {
                report.warn("cachecast.flush.url", Some(entry.line), w);
            }
        }
        Err(msg) => {
            report.error("cachecast.flush.url", Some(entry.line), msg);
            return None;
        }
    }
    if credentials.is_none() {
        report.warn(
            "cachecast.flush.url",
            Some(entry.line),
            format!(
                "no cachecast.flush.credentials.file: {} is called without authentication (DHIS 2's cacheClear needs a user that may perform maintenance)",
                entry.value
            ),
        );
    }
    Some(Some(FlushHookConfig {
        url: entry.value.clone(),
        credentials: credentials.map(|c| PathBuf::from(&c.value)),
    }))
}

/// Checks a flush-hook URL: `http://` or `https://`, parsed by the HTTP
/// client's own parser. Plain HTTP to another host is allowed with a
/// warning: the hook carries credentials.
pub(crate) fn check_flush_url(url: &str) -> Result<Option<String>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    }
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(format!("`{url}` names no host")),
    };
    if parsed.port() == Some(0) {
        return Err(format!("`{url}`: port 0 is not allowed (1..65535)"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "`{url}` holds credentials; put `user:password` in the file named by cachecast.flush.credentials.file instead"
        ));
    }
    let local = loopback(&host) == Some(true);
    Ok((parsed.scheme() == "http" && !local).then(|| {
        format!("the flush hook goes to {host} over plain HTTP: its credentials cross the network in clear text (use https://)")
    }))
}

/// DHIS 2's reading of an on/off key (`DhisConfigurationProvider.isOn`):
/// on for `on` or `true` in any case, off for anything else.
pub(crate) fn is_on(value: &str) -> bool {
    value.eq_ignore_ascii_case("on") || value.eq_ignore_ascii_case("true")
}

/// Whether a value is one of the words of an on/off key, in any case.
pub(crate) fn is_switch_word(value: &str) -> bool {
    is_on(value) || value.eq_ignore_ascii_case("off") || value.eq_ignore_ascii_case("false")
}

/// A DHIS 2 on/off key, read as DHIS 2 reads it ([`is_on`]); a value that
/// is none of the four words is off to DHIS 2 too, with a warning.
pub(crate) fn switch(keys: &BTreeMap<String, Entry>, key: &str, report: &mut Report) -> bool {
    let Some(entry) = keys.get(key).filter(|e| !e.broken) else {
        return false;
    };
    // A `${VAR}` left as written is reported as such, not as a bad word.
    if !entry.value.is_empty() && !is_switch_word(&entry.value) && entry.unresolved.is_empty() {
        report.warn(
            key,
            Some(entry.line),
            format!(
                "`{}` is not `on`, `off`, `true` or `false`: DHIS 2 reads it as off, and so does the sidecar",
                entry.value
            ),
        );
    }
    is_on(&entry.value)
}

/// Port of DHIS 2's Redis when `redis.port` is not set.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// Reports what `${VAR}` substitution left in a `redis.*` key: an error
/// when the sidecar uses the key's value, else a warning (the key is
/// DHIS 2's; the sidecar may simply lack a variable that only DHIS 2
/// needs). Returns whether the value can be used.
fn substituted<'k>(
    keys: &BTreeMap<String, Entry>,
    key: &'k str,
    used: bool,
    seen: &mut Vec<&'k str>,
    report: &mut Report,
) -> bool {
    if seen.contains(&key) {
        return true;
    }
    seen.push(key);
    let Some(entry) = keys.get(key) else {
        return true;
    };
    for p in &entry.unresolved {
        if used {
            report.error(key, Some(entry.line), p.clone());
        } else {
            report.warn(
                key,
                Some(entry.line),
                format!("{p} (the sidecar does not use this key as the file stands)"),
            );
        }
    }
    !used || entry.unresolved.is_empty()
}

/// Decides the Redis-protocol endpoint: `cachecast.resp.port`, else
/// DHIS 2's `redis.*` keys when they send its cache invalidation to this
/// machine. The keys are read as DHIS 2 reads them: `${VAR}` substituted,
/// on/off by [`is_on`], its defaults for keys not in the file, and an
/// empty value as the empty text (not the default). Returns the endpoint
/// (if on) and why, or `None` after an error.
pub(crate) fn resp_endpoint(
    keys: &BTreeMap<String, Entry>,
    api: SocketAddr,
    mesh: SocketAddr,
    report: &mut Report,
) -> Option<(Option<RespConfig>, String)> {
    let mut seen = Vec::new();
    let decided = decide_resp(keys, api, mesh, &mut seen, report);
    // Keys the decision did not use: what substitution left is only a
    // warning.
    for key in REDIS_KEYS {
        substituted(keys, key, false, &mut seen, report);
    }
    decided
}

fn decide_resp(
    keys: &BTreeMap<String, Entry>,
    api: SocketAddr,
    mesh: SocketAddr,
    seen: &mut Vec<&'static str>,
    report: &mut Report,
) -> Option<(Option<RespConfig>, String)> {
    let line = |k: &str| keys.get(k).map(|e| e.line);
    let text = |k: &str| {
        keys.get(k)
            .filter(|e| !e.broken && !e.value.is_empty())
            .map(|e| e.value.clone())
    };
    let mut ok = true;
    let explicit = match port_of(keys, "cachecast.resp.port", report) {
        Ok(p) => p,
        Err(()) => return None,
    };
    let bind = match text("cachecast.resp.bind") {
        None => None,
        Some(v) => match ip_literal(&v) {
            Some(ip) => Some(ip),
            None => {
                report.error(
                    "cachecast.resp.bind",
                    line("cachecast.resp.bind"),
                    format!("`{v}` is not an IP address"),
                );
                return None;
            }
        },
    };
    ok &= substituted(keys, "redis.cache.invalidation.enabled", true, seen, report);
    let invalidation = switch(keys, "redis.cache.invalidation.enabled", report);
    if invalidation || explicit.is_some() {
        ok &= substituted(keys, "redis.enabled", true, seen, report);
    }
    let redis_enabled = switch(keys, "redis.enabled", report);
    // DHIS 2's default when the key is absent; an empty `redis.host =` is
    // the empty host name to DHIS 2, which Lettuce refuses.
    let host_entry = keys.get("redis.host").filter(|e| !e.broken);
    let host = host_entry.map_or_else(|| "localhost".to_string(), |e| e.value.clone());
    let host_empty = host_entry.is_some() && host.is_empty();
    if invalidation && (explicit.is_some() || !redis_enabled) {
        ok &= substituted(keys, "redis.host", true, seen, report);
    }
    if invalidation && host_empty {
        report.warn(
            "redis.host",
            line("redis.host"),
            "empty: DHIS 2 reads it as an empty host name, not as localhost, and does not start (Lettuce: \"Host must not be empty\"); remove the line for localhost, or name the host",
        );
    }
    let host_local = loopback(&host) == Some(true);
    // Where DHIS 2 would connect when its invalidation goes to this machine.
    let app_points_here = invalidation && host_local;
    // An empty `redis.port =` is no number to DHIS 2 (`Integer.parseInt`
    // fails), not the default.
    let port_empty = app_points_here
        && keys
            .get("redis.port")
            .is_some_and(|e| !e.broken && e.value.is_empty());
    if port_empty {
        report.warn(
            "redis.port",
            line("redis.port"),
            format!(
                "empty: DHIS 2 reads no number here and does not start (NumberFormatException); remove the line for {DEFAULT_REDIS_PORT}, or give the port"
            ),
        );
    }
    if app_points_here {
        ok &= substituted(keys, "redis.port", true, seen, report);
        ok &= substituted(keys, "redis.use.ssl", true, seen, report);
    }
    // Read only when DHIS 2's invalidation comes here: otherwise the key is
    // the application's alone, whatever it holds.
    let port_unresolved = keys
        .get("redis.port")
        .is_some_and(|e| !e.unresolved.is_empty());
    let redis_port = if app_points_here && !port_unresolved {
        match port_of(keys, "redis.port", report) {
            Ok(p) => p.unwrap_or(DEFAULT_REDIS_PORT),
            Err(()) => {
                ok = false;
                DEFAULT_REDIS_PORT
            }
        }
    } else {
        DEFAULT_REDIS_PORT
    };
    let ssl = app_points_here && switch(keys, "redis.use.ssl", report);
    let (port, source, why) = match explicit {
        Some(port) => (
            port,
            RespSource::Explicit,
            "on: cachecast.resp.port is set".to_string(),
        ),
        None if !invalidation => {
            return ok.then(|| {
                (
                    None,
                    "off: neither cachecast.resp.port nor redis.cache.invalidation.enabled = on is set"
                        .to_string(),
                )
            });
        }
        None if redis_enabled => {
            return ok.then(|| {
                (
                    None,
                    "off: redis.enabled = on, so DHIS 2 also keeps sessions, leader election, application caches and job notifications in Redis, which the sidecar does not serve; \
                     keep the real Redis, or set cachecast.resp.port to serve pub/sub on another port"
                        .to_string(),
                )
            });
        }
        None if host_empty => {
            return ok.then(|| {
                (
                    None,
                    "off: redis.host is empty, which DHIS 2 does not read as localhost (it does not start); remove the line or set redis.host = localhost"
                        .to_string(),
                )
            });
        }
        None if !host_local => {
            return ok.then(|| {
                (
                    None,
                    format!(
                        "off: redis.host = {host} is not this machine, so DHIS 2 invalidates through that Redis; \
                         set redis.host = localhost to use the mesh instead"
                    ),
                )
            });
        }
        None if port_empty => {
            return ok.then(|| {
                (
                    None,
                    "off: redis.port is empty, which DHIS 2 does not read as 6379 (it does not start); remove the line or give the port"
                        .to_string(),
                )
            });
        }
        None => (
            redis_port,
            RespSource::RedisKeys,
            format!(
                "on: redis.cache.invalidation.enabled = on and redis.host = {host} point DHIS 2 at this sidecar"
            ),
        ),
    };
    ok &= substituted(keys, "redis.password", true, seen, report);
    let password = text("redis.password");
    let max_connections = resp_max_connections(keys, report);
    ok &= max_connections.is_some();
    if source == RespSource::Explicit && app_points_here && !redis_enabled && port != redis_port {
        report.warn(
            "cachecast.resp.port",
            line("cachecast.resp.port"),
            format!(
                "DHIS 2's cache invalidation goes to {host}:{redis_port} (redis.host, redis.port), not to this endpoint's port {port}: DHIS 2 will not reach the sidecar"
            ),
        );
    }
    if ssl && app_points_here && port == redis_port {
        report.error(
            "redis.use.ssl",
            line("redis.use.ssl"),
            "DHIS 2 would speak TLS to its sidecar, which serves plain RESP on loopback; set redis.use.ssl = off (the traffic never leaves this machine)",
        );
        ok = false;
    }
    let addrs: Vec<SocketAddr> = match bind {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None if source == RespSource::RedisKeys && !host.eq_ignore_ascii_case("localhost") => {
            match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)],
            }
        }
        None if source == RespSource::RedisKeys => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port),
        ],
        None => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)],
    };
    let key = match source {
        RespSource::Explicit => "cachecast.resp.port",
        RespSource::RedisKeys => "redis.port",
    };
    for addr in &addrs {
        // The same port on the same address, or on a wildcard that covers
        // it (`0.0.0.0` covers IPv4 only; `::` both, as Linux binds it).
        let covers = |wild: IpAddr, other: IpAddr| {
            wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
        };
        let clash = |other: SocketAddr| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || covers(other.ip(), addr.ip())
                    || covers(addr.ip(), other.ip()))
        };
        for (other, what) in [(api, "the sidecar's API"), (mesh, "the listener for peers")] {
            if clash(other) {
                report.error(
                    key,
                    line(key),
                    format!(
                        "the Redis-protocol endpoint ({addr}) and {what} ({other}) would share port {}",
                        addr.port()
                    ),
                );
                ok = false;
            }
        }
    }
    if let Some(ip) = bind
        && !ip.to_canonical().is_loopback()
    {
        report.warn(
            "cachecast.resp.bind",
            line("cachecast.resp.bind"),
            format!(
                "{ip} is not a loopback address: anyone who reaches it can publish invalidations{}",
                if password.is_none() {
                    " (and no redis.password is set)"
                } else {
                    ""
                }
            ),
        );
    }
    if password.is_none() {
        report.warn(
            "redis.password",
            line("redis.password"),
            "the Redis-protocol endpoint has no password: any local process can publish invalidations to every server, read every invalidation, and make this server's flush hook be called by subscribing (a burst of 5 calls, then one per 10 s); set redis.password (DHIS 2 sends it)",
        );
    }
    if !ok {
        return None;
    }
    Some((
        Some(RespConfig {
            addrs,
            password,
            max_connections: max_connections.unwrap_or(crate::config::DEFAULT_RESP_CONNECTIONS),
            bind_explicit: bind.is_some(),
            source,
        }),
        why,
    ))
}

/// Checks a webhook URL: plain `http://` to a loopback host, unless
/// `remote` allows another host (then with a warning).
pub(crate) fn check_webhook(url: &str, remote: bool) -> Result<Option<String>, String> {
    if !url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    {
        return Err(format!(
            "`{url}` is not an http:// URL (the webhook goes to the local application; https is not supported)"
        ));
    }
    // The same parser as the HTTP client's, so that what passes here is
    // what the sidecar can call.
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("`{url}` names no host")),
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    if parsed.port() == Some(0) {
        return Err(format!("`{url}`: port 0 is not allowed (1..65535)"));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    match (loopback, remote) {
        (true, _) => Ok(None),
        (false, true) => Ok(Some(format!(
            "the webhook goes to {host}, off this machine: invalidations (cache names and keys) leave it in clear text"
        ))),
        (false, false) => Err(format!(
            "{host} is not a loopback address; the webhook is for the local application (set cachecast.webhook.remote = true to allow another host)"
        )),
    }
}
