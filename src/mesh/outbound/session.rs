//! One outbound session's rules, with no I/O: what a frame from the
//! receiving side means, when a ping is due, and the samples of the time
//! from a write to its ack. The link task reads and writes; these decide.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::mesh::LinkError;
use crate::mesh::error::Violation;
use crate::wire::{Message, Position};

/// What a frame from the receiving side asks of the session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromReceiver {
    /// What it applied, cumulative.
    Ack(Position),
    /// The answer to a ping: it is alive (being heard is all it says).
    Pong,
}

/// Reads a frame of the receiving side: an ack or a pong; its refusal or
/// anything else ends the session.
pub(crate) fn from_receiver(msg: Message) -> Result<FromReceiver, LinkError> {
    match msg {
        Message::Ack(pos) => Ok(FromReceiver::Ack(pos)),
        Message::Pong => Ok(FromReceiver::Pong),
        Message::Reject { reason } => Err(LinkError::Rejected(reason)),
        other => Err(Violation::NotFromReceiver(other.kind()).into()),
    }
}

/// A ping is due after `every` without a write: the receiver then hears
/// from us, and its answer tells us it is alive.
pub(crate) struct PingClock {
    every: Duration,
    last_write: Instant,
}

impl PingClock {
    pub(crate) fn new(every: Duration, now: Instant) -> Self {
        PingClock {
            every,
            last_write: now,
        }
    }

    /// Something was written at `now`.
    pub(crate) fn wrote(&mut self, now: Instant) {
        self.last_write = now;
    }

    /// Whether a ping is due at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        now >= self.next()
    }

    /// When the next ping is due, if nothing is written before.
    pub(crate) fn next(&self) -> Instant {
        self.last_write + self.every
    }
}

/// Writes not yet acknowledged, sampled for the time to ack: one sample
/// per write (the last seq it carried, and when), bounded.
#[derive(Default)]
pub(crate) struct InFlight(VecDeque<(u64, Instant)>);

impl InFlight {
    /// Samples kept at most: a peer that stops acknowledging costs no
    /// more.
    const MAX: usize = 1024;

    /// A write carrying up to `last_seq` went out at `at`.
    pub(crate) fn wrote(&mut self, last_seq: u64, at: Instant) {
        if self.0.len() >= Self::MAX {
            self.0.pop_front();
        }
        self.0.push_back((last_seq, at));
    }

    /// Everything up to `acked` was acknowledged at `now`: `took` is given
    /// the time each write it covers took, oldest first (on every ack, so
    /// nothing is allocated for them).
    pub(crate) fn acked(&mut self, acked: u64, now: Instant, mut took: impl FnMut(Duration)) {
        while let Some(&(seq, at)) = self.0.front() {
            if seq > acked {
                break;
            }
            took(now.saturating_duration_since(at));
            self.0.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receiving_side_may_only_ack_and_pong() {
        let pos = Position {
            incarnation: 1,
            seq: 3,
        };
        assert_eq!(
            from_receiver(Message::Ack(pos)).ok(),
            Some(FromReceiver::Ack(pos))
        );
        assert_eq!(from_receiver(Message::Pong).ok(), Some(FromReceiver::Pong));
        assert!(matches!(
            from_receiver(Message::Reject {
                reason: "no".into()
            }),
            Err(LinkError::Rejected(r)) if r == "no"
        ));
        assert!(matches!(
            from_receiver(Message::Ping),
            Err(LinkError::Protocol(Violation::NotFromReceiver("Ping")))
        ));
        assert!(matches!(
            from_receiver(Message::Goodbye { last_seq: 1 }),
            Err(LinkError::Protocol(Violation::NotFromReceiver(_)))
        ));
    }

    #[test]
    fn a_ping_is_due_only_after_a_quiet_interval() {
        let t0 = Instant::now();
        let mut clock = PingClock::new(Duration::from_secs(1), t0);
        assert!(!clock.due(t0 + Duration::from_millis(999)));
        assert!(clock.due(t0 + Duration::from_secs(1)));
        clock.wrote(t0 + Duration::from_millis(500));
        assert!(
            !clock.due(t0 + Duration::from_secs(1)),
            "a write put it off"
        );
        assert_eq!(clock.next(), t0 + Duration::from_millis(1500));
    }

    #[test]
    fn an_ack_times_the_writes_it_covers_and_the_samples_stay_bounded() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = InFlight::default();
        let acked = |f: &mut InFlight, seq: u64, at: Instant| {
            let mut took = Vec::new();
            f.acked(seq, at, |d| took.push(d));
            took
        };
        f.wrote(10, t0);
        f.wrote(20, t0 + ms(5));
        f.wrote(30, t0 + ms(9));
        assert_eq!(
            acked(&mut f, 9, t0 + ms(20)),
            Vec::<Duration>::new(),
            "none covered"
        );
        assert_eq!(acked(&mut f, 25, t0 + ms(20)), vec![ms(20), ms(15)]);
        assert_eq!(acked(&mut f, 30, t0 + ms(30)), vec![ms(21)]);
        assert_eq!(
            acked(&mut f, 99, t0 + ms(40)),
            Vec::<Duration>::new(),
            "each once"
        );
        for seq in 0..5_000 {
            f.wrote(seq, t0);
        }
        assert_eq!(acked(&mut f, u64::MAX, t0).len(), InFlight::MAX);
    }
}
