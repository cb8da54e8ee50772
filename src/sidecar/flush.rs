//! The flush hook: an endpoint of the application that clears every cache
//! (for DHIS 2, `POST /api/maintenance/cacheClear`), called when the
//! application may hold an entry that no message will name: a flush from
//! the mesh, a whole-cache invalidation, a Redis-protocol subscriber cut
//! off, a channel that gained its first subscriber.
//!
//! Calls are retried with capped backoff until one answers 2xx. Triggers
//! that arrive while one is pending or under way coalesce: one more call
//! after the current one covers them all.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::webhook::error_chain;
use crate::config::FlushHookConfig;

/// First retry delay; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// It could not be read.
    #[error("cannot read the flush credentials file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Every user of the machine can read it.
    #[error(
        "the flush credentials file {0} is readable by every user; run `chmod 600 {0}` (and chown it to the user cachecast runs as)"
    )]
    WorldReadable(String),
    /// It does not hold `user:password`.
    #[error("the flush credentials file {0} must hold `user:password` on one line")]
    Malformed(String),
}

/// Reads `user:password` from a file that only its owner may read (the
/// same rules as the secret file); white space around it is trimmed.
pub fn load_credentials(path: &Path) -> Result<(String, String), CredentialsError> {
    let shown = path.display().to_string();
    let bytes = crate::auth::read_private(path).map_err(|e| match e {
        crate::auth::PrivateFile::Read(source) => CredentialsError::Read {
            path: shown.clone(),
            source,
        },
        crate::auth::PrivateFile::WorldReadable => CredentialsError::WorldReadable(shown.clone()),
    })?;
    let Ok(text) = String::from_utf8(bytes) else {
        return Err(CredentialsError::Malformed(shown));
    };
    let text = text.trim();
    match text.split_once(':') {
        Some((user, pass)) if !user.is_empty() && !text.contains('\n') => {
            Ok((user.to_string(), pass.to_string()))
        }
        _ => Err(CredentialsError::Malformed(shown)),
    }
}

/// The hook's state, as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FlushHookStatus {
    /// The URL.
    pub url: String,
    /// Whether a call is owed (requested and not yet answered with 2xx).
    pub pending: bool,
    /// Since when, in milliseconds since the Unix epoch.
    pub pending_since_ms: Option<u64>,
    /// For how long, in seconds.
    pub pending_seconds: Option<f64>,
    /// What last asked for a call.
    pub last_reason: Option<String>,
    /// Times a call was asked for (many may be covered by one call).
    pub triggers: u64,
    /// Calls answered with 2xx.
    pub calls: u64,
    /// Calls that failed (an error, or a status other than 2xx).
    pub failures: u64,
    /// Why the last call failed, if it did.
    pub last_error: Option<String>,
}

struct State {
    /// Triggers so far; a call started after trigger `n` covers it.
    wanted: u64,
    /// The `wanted` value the last successful call started at.
    done: u64,
    pending_since: Option<(Instant, SystemTime)>,
    last_reason: Option<String>,
    last_error: Option<String>,
}

/// A running flush hook.
pub struct FlushHook {
    url: String,
    auth: Option<(String, String)>,
    state: Mutex<State>,
    wake: Notify,
    triggers: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
}

impl FlushHook {
    /// A hook for `config`, its credentials read now.
    pub fn new(config: &FlushHookConfig) -> Result<Self, CredentialsError> {
        let auth = match &config.credentials {
            Some(path) => Some(load_credentials(path)?),
            None => None,
        };
        Ok(FlushHook {
            url: config.url.clone(),
            auth,
            state: Mutex::new(State {
                wanted: 0,
                done: 0,
                pending_since: None,
                last_reason: None,
                last_error: None,
            }),
            wake: Notify::new(),
            triggers: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a call; never waits. Quick enough for the network path.
    pub fn trigger(&self, reason: &str) {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = self.state();
            s.wanted += 1;
            s.pending_since
                .get_or_insert_with(|| (Instant::now(), SystemTime::now()));
            s.last_reason = Some(reason.to_string());
        }
        self.wake.notify_one();
    }

    /// A snapshot for status and metrics.
    pub fn snapshot(&self) -> FlushHookStatus {
        let s = self.state();
        FlushHookStatus {
            url: self.url.clone(),
            pending: s.pending_since.is_some(),
            pending_since_ms: s.pending_since.map(|(_, wall)| {
                wall.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            pending_seconds: s.pending_since.map(|(t, _)| t.elapsed().as_secs_f64()),
            last_reason: s.last_reason.clone(),
            triggers: self.triggers.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: s.last_error.clone(),
        }
    }

    /// Calls the hook whenever one is owed, until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let client = match reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .no_proxy()
            // A redirect is not a cleared cache: followed, a POST becomes a
            // GET (of a login page, say) whose 200 would pass for success.
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "flush hook disabled: cannot build an HTTP client");
                return;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (start_at, reason) = {
                let s = self.state();
                (s.wanted, s.last_reason.clone().unwrap_or_default())
            };
            if start_at == self.state().done {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
            let mut request = client.post(&self.url).header("content-length", "0");
            if let Some((user, pass)) = &self.auth {
                request = request.basic_auth(user, Some(pass));
            }
            let outcome = tokio::select! {
                r = request.send() => r,
                _ = shutdown.cancelled() => return,
            };
            match outcome.map(|r| r.status()) {
                Ok(status) if status.is_success() => {
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    let mut s = self.state();
                    s.done = start_at;
                    if s.wanted == s.done {
                        s.pending_since = None;
                    }
                    s.last_error = None;
                    info!(url = %self.url, %status, %reason, "flush hook called: the application cleared its caches");
                    backoff = FIRST_BACKOFF;
                    continue;
                }
                other => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let why = match &other {
                        Ok(status) if status.is_redirection() => format!(
                            "status {status}, a redirect (not followed: check the URL, its scheme and the credentials)"
                        ),
                        Ok(status) => format!("status {status}"),
                        Err(e) => error_chain(e),
                    };
                    match other {
                        // Bad credentials or a wrong URL: a person must act.
                        Ok(s) if s.is_client_error() => error!(
                            url = %self.url, error = %why, retry_in = ?backoff,
                            "flush hook refused: check cachecast.flush.url and the credentials (the application may serve stale entries until it succeeds)"
                        ),
                        _ => {
                            warn!(url = %self.url, error = %why, retry_in = ?backoff, "flush hook call failed")
                        }
                    }
                    self.state().last_error = Some(why);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        f
    }

    #[test]
    fn credentials_follow_the_secret_file_rules() {
        let ok = file("admin:dis:trict\n", 0o600);
        assert_eq!(
            load_credentials(ok.path()).expect("valid"),
            ("admin".to_string(), "dis:trict".to_string())
        );
        let open = file("admin:district", 0o644);
        assert!(matches!(
            load_credentials(open.path()),
            Err(CredentialsError::WorldReadable(_))
        ));
        for bad in ["admin", ":district", "a:b\nc:d", ""] {
            let f = file(bad, 0o600);
            assert!(
                matches!(
                    load_credentials(f.path()),
                    Err(CredentialsError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            load_credentials(Path::new("/nonexistent/creds")),
            Err(CredentialsError::Read { .. })
        ));
    }
}
