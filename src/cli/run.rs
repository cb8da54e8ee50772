//! `cachecast run`: the sidecar, until a signal stops it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachecast::config::{self, ConfigError, Loaded};

use super::{LogFormat, config_path, runtime};

/// Runs the sidecar; exit 2 for a configuration that cannot be used.
pub(crate) fn run(explicit: Option<PathBuf>, format: LogFormat) -> ExitCode {
    init_logs(format);
    let Some(config) = load_for_run(explicit) else {
        return ExitCode::from(2);
    };
    // As `check` shows them: no environment variable changes a value unseen.
    for value in &config.from_environment {
        tracing::info!("from the environment: {value}");
    }
    let (_, problems) = config::resolve(&config, Duration::from_secs(3));
    let mut stop = false;
    for p in &problems {
        if p.severity == config::Severity::Error {
            fatal(p);
            stop = true;
        } else {
            tracing::warn!("{p}");
        }
    }
    if stop {
        return ExitCode::from(2);
    }
    if config.secret.is_none() {
        tracing::warn!(
            "no cachecast.secret: only the source-address allowlist protects port {}; \
             anything that can connect from a peer's address can inject invalidations",
            config.bind.port()
        );
    }
    let options = cachecast::sidecar::Options {
        api_max_connections: Some(cachecast::sidecar::api_connection_cap(&config)),
        ..Default::default()
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let name = wait_for_signal().await;
            tracing::info!(signal = name, "shutting down gracefully");
            on_signal.cancel();
        });
        match cachecast::sidecar::run(config, options, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            // One log event per problem, as for an invalid configuration.
            Err(cachecast::sidecar::SidecarError::Preflight(problems)) => {
                for p in problems {
                    fatal(p);
                }
                ExitCode::FAILURE
            }
            Err(e) => {
                fatal(e);
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logs(format: LogFormat) {
    // An empty RUST_LOG (`Environment=RUST_LOG=` in a unit) means the
    // default, not "nothing"; a filter that does not parse is said so.
    let value = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = if value.trim().is_empty() {
        (tracing_subscriber::EnvFilter::new("info"), None)
    } else {
        match tracing_subscriber::EnvFilter::try_new(value.trim()) {
            Ok(f) => (f, None),
            Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(e) = bad {
        tracing::warn!("RUST_LOG={value:?} is not a valid filter ({e}); logging at info");
    }
}

/// Reports what stops `run`: logged, or printed on stderr when RUST_LOG
/// hides errors, so that a failed start is never silent.
fn fatal(msg: impl std::fmt::Display) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{msg}");
    } else {
        let text = msg.to_string();
        match text.starts_with("error:") {
            true => eprintln!("{text}"),
            false => eprintln!("error: {text}"),
        }
    }
}

/// Loads the configuration for `run` and `status`, printing every problem;
/// `None` when it cannot be used.
fn load_for_run(explicit: Option<PathBuf>) -> Option<config::ClusterConfig> {
    let (path, why) = config_path(explicit);
    match config::load(&path) {
        Ok(Loaded { config, warnings }) => {
            for w in &warnings {
                tracing::warn!(config = %path.display(), "{w}");
            }
            Some(config)
        }
        Err(ConfigError::Invalid { errors, warnings }) => {
            // Each problem is a log event of its own (one JSON object each
            // with --log-format json).
            fatal(format_args!(
                "invalid configuration {}: {} error(s)",
                path.display(),
                errors.len()
            ));
            for p in &errors {
                fatal(p);
            }
            for p in &warnings {
                tracing::warn!("{p}");
            }
            None
        }
        Err(e) => {
            fatal(format_args!("{e} (the path {} is {why})", path.display()));
            None
        }
    }
}

/// SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal it was started from
/// closed): each would otherwise end the process at once, which peers take
/// for a crash (a flush each). Returns the signal's name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    async fn next(s: Option<&mut tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            // Not installable: that signal is then never waited for.
            None => std::future::pending().await,
        }
    }
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        _ = next(term.as_mut()) => "SIGTERM",
        _ = next(hup.as_mut()) => "SIGHUP",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
