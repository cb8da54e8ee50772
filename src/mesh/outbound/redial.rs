//! What the outbound link decides between sessions, with no I/O: how long
//! to wait before the next dial, when the delays start again, and which
//! failures are worth a log line. Every input that depends on time carries
//! it, so the rules are tested with explicit instants.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::mesh::Tuning;

/// A failure repeated word for word is logged at most this often.
const REPEAT_LOG_EVERY: Duration = Duration::from_secs(60);

/// How loudly to log a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loudness {
    /// New, or not said for a minute: a warning.
    Warn,
    /// The same as the last warning, within the minute.
    Debug,
}

/// The dialing side's state between sessions with one peer.
pub(crate) struct Redialer {
    first: Duration,
    cap: Duration,
    healthy_after: Duration,
    /// Failed attempts since the last healthy session.
    failures: u32,
    /// ±20% on every delay, so that nodes restarted together do not dial
    /// in lockstep.
    jitter: StdRng,
    /// The last failure logged as a warning, and when.
    last_logged: Option<(String, Instant)>,
}

impl Redialer {
    /// The machine for `peer` (an index), its jitter from the tuning's seed
    /// when one is set (one sequence per peer, whatever order the links
    /// draw in), else from the system.
    pub(crate) fn new(tuning: &Tuning, peer: usize) -> Self {
        let jitter = match tuning.jitter_seed {
            Some(seed) => {
                StdRng::seed_from_u64(seed ^ (peer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            }
            None => StdRng::from_os_rng(),
        };
        Redialer {
            first: tuning.backoff_first,
            cap: tuning.backoff_cap,
            healthy_after: tuning.healthy_after,
            failures: 0,
            jitter,
            last_logged: None,
        }
    }

    /// A session that was up for `up_for` ended. Only one that proved
    /// healthy (it had something acknowledged, or lasted `healthy_after`)
    /// starts the delays and the log's memory again: one that fails right
    /// after the hellos (a refusal, a peer that closes at once) counts as
    /// a failed attempt, or it would be redialled at the first delay
    /// forever.
    pub(crate) fn session_ended(&mut self, up_for: Duration, acked_something: bool) {
        if acked_something || up_for >= self.healthy_after {
            self.failures = 0;
            self.last_logged = None;
        }
    }

    /// A failure, described by `text`, at `now`: a warning when it differs
    /// from the last one warned of, or that was a minute ago, so that a
    /// peer failing the same way on every attempt does not flood the log.
    pub(crate) fn failure(&mut self, text: &str, now: Instant) -> Loudness {
        let repeated = self.last_logged.as_ref().is_some_and(|(prev, at)| {
            prev == text && now.saturating_duration_since(*at) <= REPEAT_LOG_EVERY
        });
        if repeated {
            Loudness::Debug
        } else {
            self.last_logged = Some((text.to_string(), now));
            Loudness::Warn
        }
    }

    /// How long to wait before the next dial: none when the peer reached
    /// us since the attempt began (it is reachable now, and a wait would
    /// only delay its replay), else a capped exponential delay with
    /// jitter.
    pub(crate) fn next_delay(&mut self, peer_reached_us: bool) -> Duration {
        if peer_reached_us {
            return Duration::ZERO;
        }
        let base = self
            .first
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(self.jitter.random_range(0.8..1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redialer() -> Redialer {
        let tuning = Tuning {
            backoff_first: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            healthy_after: Duration::from_secs(2),
            jitter_seed: Some(7),
            ..Tuning::default()
        };
        Redialer::new(&tuning, 0)
    }

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut r = redialer();
        let first = r.next_delay(false);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let later: Vec<Duration> = (0..20).map(|_| r.next_delay(false)).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_secs(6)));
        assert!(later.last().is_some_and(|d| *d >= Duration::from_secs(4)));
    }

    #[test]
    fn a_peer_that_reached_us_is_dialled_at_once_and_costs_no_step() {
        let mut r = redialer();
        for _ in 0..5 {
            r.next_delay(false);
        }
        assert_eq!(r.next_delay(true), Duration::ZERO);
        assert_eq!(r.failures, 5, "no step taken");
    }

    #[test]
    fn only_a_healthy_session_starts_the_delays_again() {
        let mut r = redialer();
        for _ in 0..6 {
            r.next_delay(false);
        }
        // Refused right after the hellos: still backing off.
        r.session_ended(Duration::from_millis(30), false);
        assert!(r.next_delay(false) >= Duration::from_secs(4));
        // Something acknowledged, however short: healthy.
        r.session_ended(Duration::from_millis(30), true);
        assert!(r.next_delay(false) <= Duration::from_millis(120));
        // Up long enough: healthy too.
        r.next_delay(false);
        r.next_delay(false);
        r.session_ended(Duration::from_secs(2), false);
        assert!(r.next_delay(false) <= Duration::from_millis(120));
    }

    #[test]
    fn a_repeated_failure_is_warned_of_once_a_minute() {
        let mut r = redialer();
        let t0 = Instant::now();
        for (text, at, want, why) in [
            ("refused", 0, Loudness::Warn, "the first"),
            (
                "refused",
                30,
                Loudness::Debug,
                "the same, within the minute",
            ),
            ("reset", 31, Loudness::Warn, "another failure"),
            ("reset", 40, Loudness::Debug, "the same again"),
            ("reset", 92, Loudness::Warn, "a minute on"),
        ] {
            let got = r.failure(text, t0 + Duration::from_secs(at));
            assert_eq!(got, want, "{why}");
        }
        // A healthy session forgets: its next failure is news.
        r.session_ended(Duration::from_secs(3), false);
        let got = r.failure("reset", t0 + Duration::from_secs(93));
        assert_eq!(got, Loudness::Warn);
    }
}
