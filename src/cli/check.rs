//! `cachecast check`: validates dhis.conf and prints the resolved cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachecast::config::{self, ConfigError, Loaded};

use super::{config_path, ended, out, print_problems};

/// Exit 0 when valid, 2 when not, with every problem listed.
pub(crate) fn check(explicit: Option<PathBuf>) -> ExitCode {
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
