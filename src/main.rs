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

#[derive(Subcommand, Debug)]
enum Command {
    /// Start three nodes in this process on loopback and show invalidations,
    /// a crash with replay and flush, and a clean restart. Ends by itself.
    Demo,
    /// Validate dhis.conf and print the resolved cluster (exit 0 valid, 2 invalid).
    Check {
        /// The configuration file (default: $DHIS2_HOME/dhis.conf, else /opt/dhis2/dhis.conf).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config),
        Command::Demo => demo(),
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
    let show = |i: usize| match &resolved[i].ips {
        Ok(ips) => ips
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        Err(_) => "(does not resolve now)".into(),
    };
    let format = match config.format {
        config::Format::Instances => "cluster.instanceN keys",
        config::Format::Members => "cluster.hostname/cluster.members keys",
        config::Format::Programmatic => "built in code",
    };
    println!("config     {} ({format})", path.display());
    println!("this node  {}  resolves to {}", config.node, show(0));
    println!("listens on {}", config.bind);
    println!("peers      {}", config.peers.len());
    for (i, peer) in config.peers.iter().enumerate() {
        let line = peer.line.map(|l| format!(", line {l}")).unwrap_or_default();
        println!(
            "  {}  ({}{line})  resolves to {}",
            peer.addr,
            peer.source,
            show(i + 1)
        );
    }
    println!(
        "secret     {}",
        match &config.secret {
            None => "none (only the source-address allowlist protects the port)".to_string(),
            Some(config::SecretSource::Inline(_)) => "set (cachecast.secret)".to_string(),
            Some(config::SecretSource::File(p)) => format!("from {}", p.display()),
        }
    );
    println!(
        "tls        {}",
        match &config.tls {
            None => "off".to_string(),
            Some(t) => format!("cert {}, CA {}", t.cert.display(), t.ca.display()),
        }
    );
    println!("api        http://{}", config.api);
    println!("buffer     {} invalidations per peer", config.buffer);
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
    println!("valid");
    ExitCode::SUCCESS
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
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
