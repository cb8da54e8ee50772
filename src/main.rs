//! The `cachecast` command: thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachecast::config::{self, ConfigError, Loaded, Problem};
use clap::{Parser, Subcommand};

/// Cache-invalidation mesh for small clusters (peers from dhis.conf).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar: join the mesh from dhis.conf and serve the local
    /// HTTP API (POST /v1/invalidate, GET /v1/events, /v1/status, /metrics).
    Run {
        /// The configuration file (default: $DHIS2_HOME/dhis.conf, else /opt/dhis2/dhis.conf).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format; the level comes from RUST_LOG (default: info).
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Print a running sidecar's state (peers, queues, last heard).
    Status {
        /// The configuration file, to find the sidecar's API address.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the raw JSON of /v1/status instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start three nodes in this process on loopback and show invalidations,
    /// a crash with replay and flush, and a clean restart. Ends by itself.
    Demo,
    /// Validate dhis.conf and print the resolved cluster (exit 0 valid, 2 invalid).
    Check {
        /// The configuration file (default: $DHIS2_HOME/dhis.conf, else /opt/dhis2/dhis.conf).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script on stdout
    /// (e.g. `cachecast completions bash > /etc/bash_completion.d/cachecast`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (cachecast.1, one per subcommand) into DIR.
    /// The Debian package is built with them; hidden from help.
    #[command(hide = true)]
    Manpages {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config),
        Command::Demo => demo(),
        Command::Run { config, log_format } => run(config, log_format),
        Command::Status { config, json } => status(config, json),
        Command::Completions { shell } => completions(shell),
        Command::Manpages { dir } => manpages(&dir),
    }
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    // The generators offer hidden subcommands too: complete a copy
    // without them.
    let full = Cli::command();
    let mut cmd = clap::Command::new("cachecast")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut cmd, "cachecast", &mut text);
    match out(&String::from_utf8_lossy(&text)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ended(&e),
    }
}

/// What the manual says beyond the options, in roff: where the
/// configuration comes from, the environment, the files, the exit status.
const MAN_EXTRA: &str = r#".SH ENVIRONMENT
.TP
.B DHIS2_HOME
The directory holding
.IR dhis.conf ,
when
.B \-\-config
is not given.
.TP
.B RUST_LOG
The log filter of
.BR run ,
e.g.
.B info
(the default) or
.BR cachecast=debug .
.SH FILES
.TP
.I /opt/dhis2/dhis.conf
The configuration when neither
.B \-\-config
nor
.B DHIS2_HOME
is given: DHIS 2's own file, with its
.B cluster.*
keys and the
.B cachecast.*
extensions.
.TP
.I /etc/default/cachecast
The environment of the packaged systemd unit
.RB ( DHIS2_HOME ,
.BR RUST_LOG ).
.TP
.I /var/lib/cachecast
The state directory of the packaged unit, for
.BR cachecast.state.file .
.SH EXIT STATUS
0 on success (for
.BR run ,
after a graceful shutdown); 2 for an invalid configuration (restarting
does not fix it); 1 for any other failure.
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1);
/usr/share/doc/cachecast/ for the operations guide.
"#;

fn manpages(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        // One page per subcommand, then the main page again with the
        // sections clap knows nothing of.
        clap_mangen::generate_to(Cli::command(), dir)?;
        let mut page = Vec::new();
        let man = clap_mangen::Man::new(Cli::command());
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        man.render_subcommands_section(&mut page)?;
        page.extend_from_slice(MAN_EXTRA.as_bytes());
        man.render_version_section(&mut page)?;
        std::fs::write(dir.join("cachecast.1"), page)
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: cannot write the manual pages into {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// The configuration file, and why that one (for messages).
fn config_path(explicit: Option<PathBuf>) -> (PathBuf, &'static str) {
    let home = std::env::var_os("DHIS2_HOME");
    let why = match (&explicit, &home) {
        (Some(_), _) => "given with --config",
        (None, Some(h)) if !h.is_empty() => "from $DHIS2_HOME",
        _ => "the default location; --config and DHIS2_HOME were not given",
    };
    (config::locate(explicit.as_deref(), home.as_deref()), why)
}

/// Writes `text` to stdout. Fails only with the error to end on; a closed
/// stdout (`cachecast status | head -1`) is among them, see [`ended`].
fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// The exit status after stdout failed: a reader that went away (`| head`)
/// is the normal end of a pipeline, so success without a word; anything
/// else is reported.
fn ended(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: cannot write to stdout: {e}");
    ExitCode::FAILURE
}

fn print_problems(problems: &[Problem]) {
    for p in problems {
        eprintln!("{p}");
    }
}

fn check(explicit: Option<PathBuf>) -> ExitCode {
    let (path, why) = config_path(explicit);
    let Loaded { config, warnings } = match config::load(&path) {
        Ok(loaded) => loaded,
        Err(ConfigError::Invalid { errors, warnings }) => {
            eprintln!("{}: invalid", path.display());
            print_problems(&errors);
            print_problems(&warnings);
            eprintln!("{} error(s), {} warning(s)", errors.len(), warnings.len());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("  (the path {} is {why})", path.display());
            return ExitCode::from(2);
        }
    };
    let (resolved, mut problems) = config::resolve(&config, Duration::from_secs(3));
    problems.extend(cachecast::sidecar::check::preflight(&config));
    let report = cachecast::sidecar::check::describe(&path, &config, &resolved);
    if let Err(e) = out(&report) {
        return ended(&e);
    }
    problems.extend(warnings);
    let errors = problems
        .iter()
        .filter(|p| p.severity == config::Severity::Error)
        .count();
    print_problems(&problems);
    if errors > 0 {
        eprintln!("{}: invalid ({errors} error(s))", path.display());
        return ExitCode::from(2);
    }
    match out("valid\n") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ended(&e),
    }
}

fn demo() -> ExitCode {
    // Only problems are logged: the demo prints its own story on stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cachecast::demo::run(Box::new(std::io::stdout()))) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            // The demo writes only to stdout: a reader that went away
            // (`cachecast demo | head`) ends it, quietly.
            let closed = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if closed {
                return ExitCode::SUCCESS;
            }
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
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

/// The runtime of `run` and `status`: one thread. The sidecar's work is
/// moving small messages between sockets; on one thread a message crosses
/// no thread on its way through, which measured a quarter less latency
/// through two sidecars than the multi-thread runtime did
/// (docs/performance.md). Nothing in it blocks: name lookups and files
/// go through Tokio's blocking pool.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            None
        }
    }
}

fn run(explicit: Option<PathBuf>, format: LogFormat) -> ExitCode {
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
        api_max_connections: Some(api_connection_cap(&config)),
        api_idle_timeout: test_idle_timeout(),
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

/// Raises the soft limit on open files to the hard limit (a service may
/// need more than the usual soft default of 1024, and only the hard limit
/// is the administrator's choice). Returns the soft limit in force.
fn raise_nofile_limit() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given. It can fail
        // (an unlimited hard limit is above the kernel's nr_open): then the
        // soft limit stays as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// Descriptors kept aside beside connections: listeners, the runtime's
/// own, the state file, webhook and DNS sockets, stdio.
const FD_RESERVE: u64 = 32;

/// The cap on API connections: the default, or less when the limit on
/// open files would not leave room for the mesh (its inbound connections
/// and one outbound per peer) and the Redis-protocol endpoint's
/// connections (`cachecast.resp.max.connections`), so that API clients
/// can never starve them. Raises the limit first, and warns when it is
/// too low for all.
fn api_connection_cap(config: &config::ClusterConfig) -> usize {
    use cachecast::sidecar::MAX_API_CONNECTIONS;
    let mesh = cachecast::Tuning::default().max_connections as u64
        + config.peers.len() as u64
        + config.resp.as_ref().map_or(0, |r| r.max_connections as u64);
    let wanted = mesh + MAX_API_CONNECTIONS as u64 + FD_RESERVE;
    let soft = match raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the limit on open files; assuming it suffices");
            return MAX_API_CONNECTIONS;
        }
    };
    if soft >= wanted {
        return MAX_API_CONNECTIONS;
    }
    // Never zero: the API must stay usable, if cramped.
    let cap = soft
        .saturating_sub(mesh + FD_RESERVE)
        .clamp(8, MAX_API_CONNECTIONS as u64);
    tracing::warn!(
        limit = soft,
        wanted,
        api_max_connections = cap,
        "the limit on open files is too low for the mesh and {MAX_API_CONNECTIONS} API connections; \
         the API gets fewer. Raise it (under systemd: LimitNOFILE={wanted} or more)"
    );
    cap as usize
}

/// Test only: `CACHECAST_TEST_API_IDLE_TIMEOUT_MS` shortens the API's idle
/// timeout, so that tests need not wait for the real one.
fn test_idle_timeout() -> Option<Duration> {
    let v = std::env::var("CACHECAST_TEST_API_IDLE_TIMEOUT_MS").ok()?;
    match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
        _ => {
            tracing::warn!(value = %v, "ignoring CACHECAST_TEST_API_IDLE_TIMEOUT_MS: not a positive number");
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

fn status(explicit: Option<PathBuf>, raw: bool) -> ExitCode {
    let (path, why) = config_path(explicit);
    let config = match config::load(&path) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("  (the path {} is {why})", path.display());
            return ExitCode::from(2);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let url = format!("http://{}/v1/status", config.api);
    let fetched = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()?;
        client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json::<serde_json::Value>()
            .await
    });
    let body = match fetched {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {url}: {e}");
            eprintln!("  is `cachecast run` running with this configuration?");
            return ExitCode::FAILURE;
        }
    };
    let text = if raw {
        format!("{body:#}\n")
    } else {
        cachecast::sidecar::status_table(&body)
    };
    match out(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ended(&e),
    }
}
