//! A run's plan, drawn from its seed alone: the cluster, the workload and
//! the schedule of faults and adversaries. Printed with a violation, so
//! that the schedule can be read beside the events.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    /// A shared secret between the peers (then every frame is tagged).
    pub secret: bool,
    /// Replay buffer per peer, in invalidations: small ones overflow into
    /// flushes.
    pub buffer: usize,
    /// Events a subscriber may fall behind before it is flushed.
    pub event_capacity: usize,
    /// How long the workload and the faults go on; then everything heals.
    pub active: Duration,
    /// Average time between two of a node's operations while it is busy.
    pub gaps: Vec<Duration>,
    /// Whether adversaries take part.
    pub adversaries: bool,
    /// Faults and attacks, by time from the start.
    pub faults: Vec<(Duration, Fault)>,
}

/// Something that happens to the cluster.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Nothing passes between `a` and `b` (no reset) for a while.
    Partition { a: usize, b: usize, lasts: Duration },
    /// Nothing passes from `from` to `to` for a while.
    OneWay {
        from: usize,
        to: usize,
        lasts: Duration,
    },
    /// Every connection between `a` and `b` is reset.
    Cut { a: usize, b: usize },
    /// The node stops at once, as on a crash; it starts again (its state
    /// file kept) after `down`.
    Crash { node: usize, down: Duration },
    /// The node shuts down gracefully and starts again after `down`.
    Restart { node: usize, down: Duration },
    /// The clock jumps (every node at once: a VM paused, a stopped world).
    Jump { by: Duration },
    /// The node's application stops reading its events for a while.
    Stall { node: usize, lasts: Duration },
    /// A party on `victim`'s address claims its identity (with the
    /// incarnation it learned) toward `target`, and sends invalidations of
    /// its own at the position `target` tells it; it keeps trying for
    /// `tries_for`.
    Claim {
        victim: usize,
        target: usize,
        items: usize,
        tries_for: Duration,
    },
    /// A party on the path from `victim` to `target` withholds what
    /// `victim` sends for `withhold`, injects an acknowledgement of all of
    /// it toward `victim`, and resets the connection.
    ForgeAck {
        victim: usize,
        target: usize,
        withhold: Duration,
    },
}

impl Plan {
    /// The plan of `seed`.
    pub fn new(seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = rng.random_range(2..=5);
        let secret = rng.random_bool(0.5);
        let buffer = [64, 1024, 65536][rng.random_range(0..3)];
        let event_capacity = [256, 8192][rng.random_range(0..2)];
        let active = Duration::from_secs(rng.random_range(20..=60));
        let gaps = (0..nodes)
            .map(|_| Duration::from_millis(rng.random_range(5..=300)))
            .collect();
        let adversaries = rng.random_bool(0.4);
        let count = rng.random_range(2..=12);
        let mut faults = Vec::new();
        let ms =
            |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..=hi));
        for _ in 0..count {
            let at = ms(&mut rng, 500, active.as_millis() as u64);
            let a = rng.random_range(0..nodes);
            let b = (a + rng.random_range(1..nodes)) % nodes;
            let kinds = if adversaries { 11 } else { 8 };
            let fault = match rng.random_range(0..kinds) {
                0 => Fault::Partition {
                    a,
                    b,
                    lasts: ms(&mut rng, 200, 15_000),
                },
                1 => Fault::OneWay {
                    from: a,
                    to: b,
                    lasts: ms(&mut rng, 200, 15_000),
                },
                2 => Fault::Cut { a, b },
                3 => Fault::Crash {
                    node: a,
                    down: ms(&mut rng, 0, 10_000),
                },
                4 => Fault::Restart {
                    node: a,
                    down: ms(&mut rng, 0, 10_000),
                },
                5 => Fault::Jump {
                    by: ms(&mut rng, 100, 10_000),
                },
                6 => Fault::Stall {
                    node: a,
                    lasts: ms(&mut rng, 100, 8_000),
                },
                7 => Fault::Partition {
                    a,
                    b,
                    lasts: ms(&mut rng, 3_000, 30_000),
                },
                // A patient party, claiming a few at a time: it waits for
                // the victim's link to the target to go quiet, and stays
                // within what the victim sent meanwhile.
                8 | 9 => Fault::Claim {
                    victim: a,
                    target: b,
                    items: rng.random_range(1..=5),
                    tries_for: ms(&mut rng, 1_000, 40_000),
                },
                _ => Fault::ForgeAck {
                    victim: a,
                    target: b,
                    withhold: ms(&mut rng, 100, 2_500),
                },
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        Plan {
            seed,
            nodes,
            secret,
            buffer,
            event_capacity,
            active,
            gaps,
            adversaries,
            faults,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} nodes, secret {}, buffer {}, event capacity {}, active {:?}, \
             adversaries {}",
            self.seed,
            self.nodes,
            self.secret,
            self.buffer,
            self.event_capacity,
            self.active,
            self.adversaries
        )?;
        writeln!(f, "  busy gaps per node: {:?}", self.gaps)?;
        for (at, fault) in &self.faults {
            writeln!(f, "  at {at:>10.3?}: {fault:?}")?;
        }
        Ok(())
    }
}
