//! The subcommands, a file each, and what they share: where the
//! configuration is, writing to stdout, logs, the runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use cachecast::config::{self, Problem};

mod check;
mod demo;
mod manual;
mod run;
mod status;
mod story;

pub(crate) use check::check;
pub(crate) use demo::demo;
pub(crate) use manual::{completions, manpages};
pub(crate) use run::run;
pub(crate) use status::status;

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub(crate) enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The configuration file, and why that one (for messages).
pub(crate) fn config_path(explicit: Option<PathBuf>) -> (PathBuf, &'static str) {
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
pub(crate) fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// The exit status after stdout failed: a reader that went away (`| head`)
/// is the normal end of a pipeline, so success without a word; anything
/// else is reported.
pub(crate) fn ended(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: cannot write to stdout: {e}");
    ExitCode::FAILURE
}

/// Prints each problem on stderr.
pub(crate) fn print_problems(problems: &[Problem]) {
    for p in problems {
        eprintln!("{p}");
    }
}

/// The runtime of `run` and `status`: one thread. The sidecar's work is
/// moving small messages between sockets; on one thread a message crosses
/// no thread on its way through, which measured a quarter less latency
/// through two sidecars than the multi-thread runtime did
/// (docs/performance.md). Nothing in it blocks: name lookups and files
/// go through Tokio's blocking pool.
pub(crate) fn runtime() -> Option<tokio::runtime::Runtime> {
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
