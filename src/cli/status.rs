//! `cachecast status`: a running sidecar's state, from its API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachecast::config;

use super::{config_path, ended, out, runtime};

/// Prints the sidecar's `/v1/status` as a table, or raw with `--json`.
pub(crate) fn status(explicit: Option<PathBuf>, raw: bool) -> ExitCode {
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
