//! The `cachecast` command: parses the command line and hands each
//! subcommand to its file under `src/cli/`; the work is the library's.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::LogFormat;

mod cli;

/// Cache-invalidation mesh for small clusters (peers from dhis.conf).
#[derive(Parser, Debug)]
#[command(version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
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
        Command::Check { config } => cli::check(config),
        Command::Demo => cli::demo(),
        Command::Run { config, log_format } => cli::run(config, log_format),
        Command::Status { config, json } => cli::status(config, json),
        Command::Completions { shell } => cli::completions(shell),
        Command::Manpages { dir } => cli::manpages(&dir),
    }
}
