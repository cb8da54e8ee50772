//! The flush hook: an endpoint of the application that clears every cache
//! (for DHIS 2, `POST /api/maintenance/cacheClear`), called when the
//! application may hold an entry that no message will name: a flush from
//! the mesh, a whole-cache invalidation, a Redis-protocol subscriber cut
//! off, a channel that gained its first subscriber.
//!
//! Calls are retried with capped backoff until one answers 2xx. Triggers
//! that arrive while one is pending or under way coalesce: one more call
//! after the current one covers them all.
//!
//! What a Redis-protocol client's subscriptions cause (a first subscriber,
//! a subscriber that left without unsubscribing, one cut off for not
//! reading) any local process can cause at will, so those calls are
//! rate-limited: a burst of [`SUBSCRIBER_BURST`], then one per
//! [`SUBSCRIBER_REFILL`]. A call the rate holds back is owed, not dropped:
//! why a subscription asks for a call is that its client may hold entries
//! named by messages it never received, and any call that *starts after*
//! the subscription clears them. The owed call is made as soon as the rate
//! allows (or sooner, when anything else asks for one), and it covers
//! every subscription since; the cost is that those entries may be served
//! for up to [`SUBSCRIBER_REFILL`] longer, never that a clear is missed.

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
/// Calls that subscribers' comings and goings may cause back to back (a
/// DHIS 2 start subscribes once; a restart of a few clients fits).
pub const SUBSCRIBER_BURST: u32 = 5;
/// Then one more call per this long, at most.
pub const SUBSCRIBER_REFILL: Duration = Duration::from_secs(10);

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
    let bytes = crate::auth::read_private_as(
        path,
        |path, source| CredentialsError::Read { path, source },
        CredentialsError::WorldReadable,
    )?;
    let text = String::from_utf8(bytes).unwrap_or_default();
    let text = text.trim();
    match text.split_once(':') {
        Some((user, pass)) if !user.is_empty() && !text.contains('\n') => {
            Ok((user.to_string(), pass.to_string()))
        }
        // Not UTF-8 (read as empty), or not one `user:password` line.
        _ => Err(CredentialsError::Malformed(path.display().to_string())),
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
    /// Triggers from Redis-protocol subscribers that found the rate spent:
    /// each is covered by the next call the rate allows (or any sooner).
    pub rate_limited: u64,
    /// Why the last call failed, if it did.
    pub last_error: Option<String>,
}

/// The rate of calls caused by subscribers: a token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the token being refilled started to refill.
    since: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket {
            tokens: SUBSCRIBER_BURST,
            since: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let periods =
            now.saturating_duration_since(self.since).as_nanos() / SUBSCRIBER_REFILL.as_nanos();
        // At most a burst's worth: the cast cannot truncate.
        let periods = periods.min(u128::from(SUBSCRIBER_BURST)) as u32;
        self.tokens = (self.tokens + periods).min(SUBSCRIBER_BURST);
        if self.tokens == SUBSCRIBER_BURST {
            // Full: the next token spent starts refilling when it is spent.
            self.since = now;
        } else {
            self.since += SUBSCRIBER_REFILL * periods;
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        let had = self.tokens > 0;
        self.tokens = self.tokens.saturating_sub(1);
        had
    }

    fn empty(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens == 0
    }

    /// When the next token comes, while the bucket is empty.
    fn next_token(&self) -> Instant {
        self.since + SUBSCRIBER_REFILL
    }
}

/// What the calling loop does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Nothing is owed: wait for a trigger.
    Idle,
    /// Only subscribers' triggers are owed and the rate is spent: wait
    /// until then (or for another trigger).
    Until(Instant),
    /// Call now; on success, every trigger up to these counts is covered.
    Call { wanted: u64, sub_wanted: u64 },
}

struct State {
    /// Triggers so far; a call started after trigger `n` covers it.
    wanted: u64,
    /// The `wanted` value the last successful call started at.
    done: u64,
    /// As `wanted`, for triggers caused by Redis-protocol subscribers
    /// (subject to the rate).
    sub_wanted: u64,
    /// The `sub_wanted` value the last successful call started at.
    sub_done: u64,
    /// Whether the call being retried already spent a token: a retry is
    /// the same call, and costs none.
    sub_paid: bool,
    bucket: Bucket,
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
    rate_limited: AtomicU64,
}

impl State {
    fn new(now: Instant) -> Self {
        State {
            wanted: 0,
            done: 0,
            sub_wanted: 0,
            sub_done: 0,
            sub_paid: false,
            bucket: Bucket::full(now),
            pending_since: None,
            last_reason: None,
            last_error: None,
        }
    }

    /// What to do at `now`. Any owed call covers the subscribers' triggers
    /// too; only a call that nothing else asks for takes from the rate.
    fn next(&mut self, now: Instant) -> Next {
        let call = Next::Call {
            wanted: self.wanted,
            sub_wanted: self.sub_wanted,
        };
        if self.wanted != self.done {
            return call;
        }
        if self.sub_wanted == self.sub_done {
            return Next::Idle;
        }
        if self.sub_paid || self.bucket.take(now) {
            self.sub_paid = true;
            return call;
        }
        Next::Until(self.bucket.next_token())
    }

    /// A call that started at these counts answered 2xx.
    fn succeeded(&mut self, wanted: u64, sub_wanted: u64) {
        self.done = wanted;
        self.sub_done = sub_wanted;
        self.sub_paid = false;
        if self.wanted == self.done && self.sub_wanted == self.sub_done {
            self.pending_since = None;
        }
        self.last_error = None;
    }
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
            state: Mutex::new(State::new(Instant::now())),
            wake: Notify::new(),
            triggers: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
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

    /// Asks for a call on behalf of a Redis-protocol subscriber (a first
    /// subscription, a subscriber gone without unsubscribing, one cut off):
    /// as [`FlushHook::trigger`], under the rate (see the module's docs
    /// for why a call the rate holds back loses nothing).
    pub fn trigger_for_subscriber(&self, reason: &str) {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = self.state();
            s.sub_wanted += 1;
            let now = Instant::now();
            s.pending_since
                .get_or_insert_with(|| (now, SystemTime::now()));
            s.last_reason = Some(reason.to_string());
            if s.bucket.empty(now) {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
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
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
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
            let (next, reason) = {
                let mut s = self.state();
                (
                    s.next(Instant::now()),
                    s.last_reason.clone().unwrap_or_default(),
                )
            };
            let (start_at, sub_start_at) = match next {
                Next::Call { wanted, sub_wanted } => (wanted, sub_wanted),
                Next::Idle => tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = shutdown.cancelled() => return,
                },
                // Another trigger may be one the rate does not hold back.
                Next::Until(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => continue,
                    _ = self.wake.notified() => continue,
                    _ = shutdown.cancelled() => return,
                },
            };
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
                    self.state().succeeded(start_at, sub_start_at);
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
    use crate::sidecar::test_file as file;

    /// Subscribers' triggers take from the rate, others do not; a call the
    /// rate holds back is owed until a call that started after it
    /// succeeds, and a retry costs no token.
    #[test]
    fn the_rate_delays_subscribers_calls_and_never_drops_one() {
        let t0 = Instant::now();
        let mut s = State::new(t0);
        assert_eq!(s.next(t0), Next::Idle);
        for i in 1..=u64::from(SUBSCRIBER_BURST) {
            s.sub_wanted += 1;
            let n = s.next(t0);
            assert_eq!(
                n,
                Next::Call {
                    wanted: 0,
                    sub_wanted: i
                }
            );
            // A failure and a retry: the same call, no second token.
            assert_eq!(s.next(t0), n);
            s.succeeded(0, i);
            assert_eq!(s.next(t0), Next::Idle);
        }
        // The burst is spent: the next is owed, and waits.
        s.sub_wanted += 1;
        assert_eq!(s.next(t0), Next::Until(t0 + SUBSCRIBER_REFILL));
        s.sub_wanted += 1; // another subscription meanwhile
        let t1 = t0 + SUBSCRIBER_REFILL;
        assert_eq!(
            s.next(t1),
            Next::Call {
                wanted: 0,
                sub_wanted: 7
            }
        );
        s.succeeded(0, 7);
        // Spent again; a trigger of another kind is not held back, and
        // covers the subscribers' too.
        s.sub_wanted += 1;
        assert_eq!(s.next(t1), Next::Until(t1 + SUBSCRIBER_REFILL));
        s.wanted += 1;
        assert_eq!(
            s.next(t1),
            Next::Call {
                wanted: 1,
                sub_wanted: 8
            }
        );
        s.succeeded(1, 8);
        assert_eq!(s.next(t1), Next::Idle);
        // A subscription during a call is not covered by it.
        s.sub_wanted += 1;
        let t2 = t1 + SUBSCRIBER_REFILL * 2;
        let n = s.next(t2);
        assert_eq!(
            n,
            Next::Call {
                wanted: 1,
                sub_wanted: 9
            }
        );
        s.sub_wanted += 1;
        s.succeeded(1, 9);
        assert_eq!(
            s.next(t2),
            Next::Call {
                wanted: 1,
                sub_wanted: 10
            }
        );
        // Long idle refills the burst, no more.
        let mut b = Bucket::full(t0);
        assert!(b.take(t0));
        b.refill(t0 + SUBSCRIBER_REFILL * 100);
        assert_eq!(b.tokens, SUBSCRIBER_BURST);
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
