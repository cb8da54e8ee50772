//! What `cachecast check` verifies beyond parsing, and what it prints; `run`
//! makes the same checks before it starts, so that a file `check` accepts
//! starts.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{ClusterConfig, Format, Problem, Resolved, SecretSource, Severity};

/// What `run` refuses at start, beyond the configuration's own rules: a
/// secret, TLS files, flush-hook credentials or a state file that cannot be
/// used. Errors, and warnings for what `run` logs and starts anyway.
pub fn preflight(config: &ClusterConfig) -> Vec<Problem> {
    let error = |key: &str, message: String| Problem {
        severity: Severity::Error,
        key: Some(key.to_string()),
        line: None,
        message,
    };
    let mut problems = Vec::new();
    if let Some(source) = &config.secret
        && let Err(e) = crate::auth::Secret::load(source)
    {
        problems.push(error("cachecast.secret", e.to_string()));
    }
    if let Some(files) = &config.tls {
        match crate::tls::Tls::load(files) {
            Err(e) => problems.push(error("cachecast.tls", e.to_string())),
            // Loadable, yet the peers would refuse it: a warning, as `run`
            // logs it (it starts anyway: the files may be replaced soon).
            Ok(tls) => {
                if let Some(message) = tls.warning() {
                    problems.push(Problem {
                        severity: Severity::Warning,
                        key: Some("cachecast.tls.cert".to_string()),
                        line: None,
                        message: message.to_string(),
                    });
                }
            }
        }
    }
    if let Some(hook) = &config.flush_hook
        && let Some(path) = &hook.credentials
        && let Err(e) = super::load_credentials(path)
    {
        problems.push(error("cachecast.flush.credentials.file", e.to_string()));
    }
    match &config.api_token {
        Some(path) => {
            if let Err(e) = super::ApiToken::load(path) {
                problems.push(error("cachecast.api.token.file", e.to_string()));
            }
        }
        // Allowed (a machine where every local user is trusted), but said.
        None => problems.push(Problem {
            severity: Severity::Warning,
            key: Some("cachecast.api.token.file".to_string()),
            line: None,
            message: "not set: any local process can make every server of the cluster clear its caches through the API (POST /v1/invalidate with {\"flush\": true}); see docs/security.md".to_string(),
        }),
    }
    let default_path = match &config.state_file {
        crate::config::StateFile::Default => {
            match super::state_path::default_state_file(&config.node, |k| std::env::var_os(k)) {
                Ok((p, _)) => Some(p),
                Err(e) => {
                    problems.push(error("cachecast.state.file", e));
                    None
                }
            }
        }
        _ => None,
    };
    // A default folder that does not exist yet is made by `run`.
    if let Some(path) = config.state_file.path().or(default_path.as_deref())
        && (config.state_file.path().is_some() || path.parent().is_some_and(Path::is_dir))
    {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            problems.push(error(
                "cachecast.state.file",
                format!("the folder {} does not exist", dir.display()),
            ));
        } else if path.is_dir() {
            problems.push(error(
                "cachecast.state.file",
                format!("{} is a folder; name a file in it", path.display()),
            ));
        } else if let Err(e) = std::fs::File::open(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(error(
                "cachecast.state.file",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    problems
}

/// What `check` prints about a valid configuration: the file, this node
/// and each peer with the addresses they resolve to now, and each setting
/// with where it comes from.
pub fn describe(path: &Path, config: &ClusterConfig, resolved: &[Resolved]) -> String {
    let show = |i: usize| match &resolved[i].ips {
        Ok(ips) => ips
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        Err(_) => "(does not resolve now)".into(),
    };
    let format = match config.format {
        Format::Instances => "cluster.instanceN keys",
        Format::Members => "cluster.hostname/cluster.members keys",
        Format::Programmatic => "built in code",
    };
    let mut report = String::new();
    let _ = writeln!(report, "config     {} ({format})", path.display());
    // Substitution is written in the file, and shown here, so that no
    // environment variable changes a value unseen.
    for value in &config.from_environment {
        let _ = writeln!(report, "environment {value}");
    }
    let _ = writeln!(
        report,
        "this node  {}  resolves to {}",
        config.node,
        show(0)
    );
    let _ = writeln!(report, "listens on {}", config.bind);
    let _ = writeln!(report, "peers      {}", config.peers.len());
    for (i, peer) in config.peers.iter().enumerate() {
        let line = peer.line.map(|l| format!(", line {l}")).unwrap_or_default();
        let _ = writeln!(
            report,
            "  {}  ({}{line})  resolves to {}",
            peer.addr,
            peer.source,
            show(i + 1)
        );
    }
    if config.format == Format::Members {
        // DHIS 2 2.38 to 2.40 run RMI replication on these keys (see the
        // warning): the same cluster in the form only the sidecar reads.
        let _ = writeln!(
            report,
            "as instanceN keys (for DHIS 2 2.38 to 2.40, instead of cluster.hostname, cluster.members and cluster.cache.port):"
        );
        for (i, addr) in std::iter::once(&config.node)
            .chain(config.peers.iter().map(|p| &p.addr))
            .enumerate()
        {
            let _ = writeln!(
                report,
                "    cluster.instance{i}.hostname = {}\n    cluster.instance{i}.cache.port = {}",
                addr.host, addr.port
            );
        }
    }
    let _ = writeln!(
        report,
        "secret     {}",
        match &config.secret {
            None => "none (only the source-address allowlist protects the port)".to_string(),
            Some(SecretSource::Inline(_)) => "set (cachecast.secret)".to_string(),
            Some(SecretSource::File(p)) => format!("from {}", p.display()),
        }
    );
    let _ = writeln!(
        report,
        "tls        {}",
        match &config.tls {
            None => "off".to_string(),
            Some(t) => format!("cert {}, CA {}", t.cert.display(), t.ca.display()),
        }
    );
    let _ = writeln!(report, "api        http://{}", config.api);
    let _ = writeln!(
        report,
        "api token  {}",
        match &config.api_token {
            Some(p) => format!(
                "from {} (POST /v1/invalidate needs `Authorization: Bearer <token>`; reads stay open)",
                p.display()
            ),
            None => "none: any local process can make every server of the cluster clear its caches through the API (set cachecast.api.token.file)".to_string(),
        }
    );
    let _ = writeln!(
        report,
        "webhook    {}",
        config.webhook_url.as_deref().unwrap_or("none")
    );
    let _ = writeln!(
        report,
        "redis      {}",
        match &config.resp {
            None => config.resp_why.clone(),
            Some(r) => format!(
                "{} ({}; {})",
                r.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" and "),
                if r.password.is_some() {
                    "password from redis.password"
                } else {
                    "no password"
                },
                config.resp_why
            ),
        }
    );
    let _ = writeln!(
        report,
        "flush hook {}",
        match &config.flush_hook {
            None if config.resp.is_some() =>
                "none: a flush, a whole-cache invalidation or a missed message cannot reach Redis-protocol subscribers (set cachecast.flush.url)".to_string(),
            None => "none".to_string(),
            Some(h) => format!(
                "POST {}{}",
                h.url,
                h.credentials
                    .as_ref()
                    .map(|p| format!(" (Basic credentials from {})", p.display()))
                    .unwrap_or_default()
            ),
        }
    );
    let _ = writeln!(
        report,
        "buffer     {} invalidations (a peer may be behind by this many before it gets a flush)",
        config.buffer
    );
    let _ = writeln!(
        report,
        "state      {}",
        match &config.state_file {
            crate::config::StateFile::At(p) => p.display().to_string(),
            crate::config::StateFile::Off =>
                "none (cachecast.state.file = none: a start after a crash cannot tell the peers \
                 to flush; invalidations can be lost silently)"
                    .to_string(),
            crate::config::StateFile::Default =>
                match super::state_path::default_state_file(&config.node, |k| std::env::var_os(k)) {
                    Ok((p, why)) => format!(
                        "{} (the default, from {why}; cachecast.state.file sets another)",
                        p.display()
                    ),
                    Err(e) => format!("none: {e}"),
                },
        }
    );
    report
}
