//! What happened in a run, in the order it happened (one thread runs every
//! node, so the log's order is the order of events), and the checker of
//! the delivery guarantee (DESIGN.md section 4) over it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast::{Event, FlushReason};

/// An invalidation as the application asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Key { cache: String, key: String },
    Cache { cache: String },
    Flush,
}

/// One entry of the log.
#[derive(Debug, Clone)]
pub enum Rec {
    /// A run of a node started.
    Start {
        node: usize,
        run: u32,
        incarnation: u64,
    },
    /// It ended: crashed, or shut down gracefully.
    Stop {
        node: usize,
        run: u32,
        crashed: bool,
    },
    /// The node's application had an invalidation accepted.
    Accepted {
        node: usize,
        run: u32,
        seq: u64,
        what: What,
    },
    /// The node's application read an event.
    Seen { node: usize, run: u32, event: Event },
    /// The application of `node` (every node, when `None`) could not act
    /// for `lasts` from here: a stalled reader, a clock jump.
    Blackout {
        node: Option<usize>,
        lasts: Duration,
    },
    /// A fault or an adversary's step.
    Fault(String),
    /// Every fault healed; the workload stopped.
    Quiet,
}

/// A log entry: when (time since the start) and what.
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: Duration,
    pub rec: Rec,
}

/// The shared log.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Entry>>>);

impl Log {
    pub fn push(&self, at: Duration, rec: Rec) {
        self.0.lock().unwrap().push(Entry { at, rec });
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    pub fn entries_from(&self, from: usize) -> Vec<Entry> {
        self.0.lock().unwrap()[from..].to_vec()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// How the log notes an adversary's step that got through.
pub const ATTACK: &str = "attack: ";

/// A broken promise, with what is needed to read it.
#[derive(Debug)]
pub struct Violation {
    pub what: String,
    /// Log positions worth printing around.
    pub around: Vec<usize>,
}

/// The checker's limits.
pub struct Bounds {
    /// While a receiver has its origin up (and is not blacked out), an
    /// invalidation reaches it, or a flush does, within this.
    pub stale: Duration,
    /// Flushes caused by the mesh (not asked for by an application) a
    /// receiver may get per fault of the schedule.
    pub flushes_per_fault: usize,
}

/// Sums up a run that kept its promises.
#[derive(Debug, Default)]
pub struct Summary {
    pub accepted: usize,
    pub delivered: usize,
    pub mesh_flushes: usize,
    /// Adversaries' steps that got through: claims applied, acks put in.
    pub attacks: usize,
    /// The log's [`digest`].
    pub digest: u64,
}

struct Accepted<'a> {
    at_log: usize,
    at: Duration,
    node: usize,
    run: u32,
    seq: u64,
    what: &'a What,
}

/// Checks the log of a run of `nodes` nodes named `ids`; `faults` is how
/// many faults the schedule had, `foreign` whether parties other than the
/// nodes could send invalidations.
pub fn check(
    log: &[Entry],
    ids: &[String],
    faults: usize,
    foreign: bool,
    bounds: &Bounds,
) -> Result<Summary, Violation> {
    let node_of = |id: &str| ids.iter().position(|i| i == id);
    let end = log.last().map_or(Duration::ZERO, |e| e.at);
    let mut accepted = Vec::new();
    let mut by_key: HashMap<(usize, &str), usize> = HashMap::new();
    // Each node's runs: (run, first log position, last log position).
    let mut runs: Vec<Vec<(u32, usize, usize)>> = vec![Vec::new(); ids.len()];
    for (i, e) in log.iter().enumerate() {
        match &e.rec {
            Rec::Start { node, run, .. } => runs[*node].push((*run, i, usize::MAX)),
            Rec::Stop { node, .. } => {
                if let Some(r) = runs[*node].last_mut() {
                    r.2 = i;
                }
            }
            Rec::Accepted {
                node,
                run,
                seq,
                what,
            } => {
                if let What::Key { key, .. } = what {
                    by_key.insert((*node, key.as_str()), accepted.len());
                }
                accepted.push(Accepted {
                    at_log: i,
                    at: e.at,
                    node: *node,
                    run: *run,
                    seq: *seq,
                    what,
                });
            }
            _ => {}
        }
    }
    let mut summary = Summary {
        accepted: accepted.len(),
        attacks: log
            .iter()
            .filter(|e| matches!(&e.rec, Rec::Fault(t) if t.starts_with(ATTACK)))
            .count(),
        digest: digest(log),
        ..Summary::default()
    };
    for r in 0..ids.len() {
        for &(run, first, last) in &runs[r] {
            // A run with no stop lasted to the end of the log.
            let to_the_end = last == usize::MAX;
            let last = last.min(log.len().saturating_sub(1));
            let seen: Vec<(usize, &Event)> = (first..=last)
                .filter_map(|i| match &log[i].rec {
                    Rec::Seen {
                        node,
                        run: rr,
                        event,
                    } if *node == r && *rr == run => Some((i, event)),
                    _ => None,
                })
                .collect();
            // Safety: once and in order between flushes; nothing no node
            // accepted unless an adversary could send it.
            let mut since_flush: HashMap<(usize, u32), u64> = HashMap::new();
            let mut mesh_flushes = 0;
            for &(i, ev) in &seen {
                match ev {
                    Event::Flush { reason, .. } => {
                        since_flush.clear();
                        match reason {
                            // An application's flush, or a replay buffer
                            // that overflowed; and a reader slower than
                            // the events. Each is bounded by the workload
                            // (a burst larger than a buffer), not by
                            // faults.
                            FlushReason::FromPeer { .. }
                            | FlushReason::Lagged { .. }
                            | FlushReason::Backlog { .. } => {}
                            _ => mesh_flushes += 1,
                        }
                    }
                    Event::Invalidated { origin, key, .. } => {
                        let Some(o) = node_of(origin) else {
                            return Err(Violation {
                                what: format!(
                                    "{} got an invalidation from {origin}, no node",
                                    ids[r]
                                ),
                                around: vec![i],
                            });
                        };
                        let Some(&x) = by_key.get(&(o, &**key)) else {
                            if foreign {
                                continue;
                            }
                            return Err(Violation {
                                what: format!(
                                    "{} got key {key:?} from {origin}, which no application \
                                     accepted (and no adversary took part)",
                                    ids[r]
                                ),
                                around: vec![i],
                            });
                        };
                        let x = &accepted[x];
                        summary.delivered += 1;
                        let last = since_flush.entry((o, x.run)).or_insert(0);
                        if x.seq <= *last {
                            return Err(Violation {
                                what: format!(
                                    "{} got seq {} of {} (run {}) after seq {} with no flush \
                                     between: delivered twice or out of order",
                                    ids[r], x.seq, ids[o], x.run, last
                                ),
                                around: vec![x.at_log, i],
                            });
                        }
                        *last = x.seq;
                    }
                    _ => {}
                }
            }
            summary.mesh_flushes += mesh_flushes;
            let allowed = bounds.flushes_per_fault * (faults + 1) * ids.len();
            if mesh_flushes > allowed {
                return Err(Violation {
                    what: format!(
                        "flush storm: {} got {mesh_flushes} flushes for restarts, gaps and \
                         divergences over {faults} faults (bound {allowed})",
                        ids[r]
                    ),
                    around: vec![first],
                });
            }
            // Coverage and staleness, for what was accepted while this run
            // of the receiver was up.
            let blackouts = blackouts(log, r, first, last);
            let ups = up_intervals(log, &seen, ids, if to_the_end { end } else { log[last].at });
            let index = Coverage::new(&seen, &node_of);
            for x in accepted.iter().filter(|x| x.node != r && x.at_log > first) {
                let covered = index.first_after(x);
                let covered_at = covered.map(|i| log[i].at);
                // The first moment the receiver had the origin up for
                // `stale` (blackouts not counted) after the acceptance.
                let due = ups[x.node].iter().find_map(|&(up, down)| {
                    let start = up.max(x.at);
                    let due = after(start, bounds.stale, &blackouts);
                    (due < down).then_some(due)
                });
                let late = match (covered_at, due) {
                    (Some(c), Some(d)) => c > d,
                    (None, Some(_)) => true,
                    // Never up long enough: only a run that lasted to the
                    // end must have got it.
                    (None, None) => to_the_end,
                    (Some(_), None) => false,
                };
                if late {
                    let what = match (covered_at, due) {
                        (Some(c), Some(d)) => format!("only at {c:.3?}, though due by {d:.3?}"),
                        (None, Some(d)) => format!("never, though due by {d:.3?}"),
                        _ => "never".to_string(),
                    };
                    let mut around = vec![x.at_log];
                    if let Some(i) = covered {
                        around.push(i);
                    }
                    return Err(Violation {
                        what: format!(
                            "{} (run {}) got seq {} of {} (run {}, {:?}, accepted at {:.3?}) and \
                             no flush after it: {what}",
                            ids[r], run, x.seq, ids[x.node], x.run, x.what, x.at
                        ),
                        around,
                    });
                }
            }
        }
    }
    Ok(summary)
}

/// Where a receiver's run got what covers an invalidation: log positions,
/// ascending, of its flushes, of each cache's clearing, of each key, and of
/// each whole-cache invalidation.
struct Coverage<'a> {
    flushes: Vec<usize>,
    cleared: HashMap<&'a str, Vec<usize>>,
    keys: HashMap<(usize, &'a str), Vec<usize>>,
    caches: HashMap<(usize, u64, &'a str), Vec<usize>>,
}

impl<'a> Coverage<'a> {
    fn new(seen: &[(usize, &'a Event)], node_of: &dyn Fn(&str) -> Option<usize>) -> Self {
        let mut c = Coverage {
            flushes: Vec::new(),
            cleared: HashMap::new(),
            keys: HashMap::new(),
            caches: HashMap::new(),
        };
        for &(i, ev) in seen {
            match ev {
                Event::Flush { .. } => c.flushes.push(i),
                Event::Invalidated { origin, key, .. } => {
                    if let Some(o) = node_of(origin) {
                        c.keys.entry((o, &**key)).or_default().push(i);
                    }
                }
                Event::CacheCleared { origin, seq, cache } => {
                    c.cleared.entry(&**cache).or_default().push(i);
                    if let Some(o) = node_of(origin) {
                        c.caches.entry((o, *seq, &**cache)).or_default().push(i);
                    }
                }
                _ => {}
            }
        }
        c
    }

    /// The first position after `x`'s acceptance that covers it: a flush,
    /// its own delivery, or (for a key) its cache's clearing.
    fn first_after(&self, x: &Accepted<'_>) -> Option<usize> {
        let after = |v: Option<&Vec<usize>>| {
            v.and_then(|v| v.get(v.partition_point(|&i| i <= x.at_log)).copied())
        };
        let own = match x.what {
            What::Key { cache, key } => after(self.keys.get(&(x.node, key.as_str())))
                .into_iter()
                .chain(after(self.cleared.get(cache.as_str())))
                .min(),
            What::Cache { cache } => after(self.caches.get(&(x.node, x.seq, cache.as_str()))),
            What::Flush => None,
        };
        own.into_iter().chain(after(Some(&self.flushes))).min()
    }
}

/// The intervals in which receiver `r` could not act: its own stalls and
/// clock jumps, within its run.
fn blackouts(log: &[Entry], r: usize, first: usize, last: usize) -> Vec<(Duration, Duration)> {
    log[first..=last]
        .iter()
        .filter_map(|e| match &e.rec {
            Rec::Blackout { node, lasts } if node.is_none_or(|n| n == r) => {
                Some((e.at, e.at + *lasts))
            }
            _ => None,
        })
        .collect()
}

/// `start` plus `span` of time outside the blackouts.
fn after(start: Duration, span: Duration, blackouts: &[(Duration, Duration)]) -> Duration {
    let mut due = start + span;
    // Each blackout that begins before the due time pushes it by what it
    // overlaps (blackouts are few; a fixed point over them is enough).
    loop {
        let extra: Duration = blackouts
            .iter()
            .map(|&(b, e)| {
                let (lo, hi) = (b.max(start), e.min(due));
                hi.saturating_sub(lo)
            })
            .sum();
        let next = start + span + extra;
        if next == due {
            return due;
        }
        due = next;
    }
}

/// For each origin, when the receiver saw it up: (up, down) pairs. A
/// stream that lagged lost the up and down events among what it missed,
/// and the mesh does not say them again: from its `Lagged` flush on, the
/// receiver is taken to know of no origin up until it reads one.
fn up_intervals(
    log: &[Entry],
    seen: &[(usize, &Event)],
    ids: &[String],
    end: Duration,
) -> Vec<Vec<(Duration, Duration)>> {
    let mut out = vec![Vec::new(); ids.len()];
    let mut since: Vec<Option<Duration>> = vec![None; ids.len()];
    for &(i, ev) in seen {
        match ev {
            Event::PeerUp { peer } => {
                if let Some(o) = ids.iter().position(|id| **id == **peer) {
                    since[o].get_or_insert(log[i].at);
                }
            }
            Event::PeerDown { peer, .. } => {
                if let Some(o) = ids.iter().position(|id| **id == **peer)
                    && let Some(up) = since[o].take()
                {
                    out[o].push((up, log[i].at));
                }
            }
            Event::Flush {
                reason: FlushReason::Lagged { .. },
                ..
            } => {
                for (o, up) in since.iter_mut().enumerate() {
                    if let Some(up) = up.take() {
                        out[o].push((up, log[i].at));
                    }
                }
            }
            _ => {}
        }
    }
    // The run's end closes what is still up.
    let close = end;
    for (o, up) in since.into_iter().enumerate() {
        if let Some(up) = up {
            out[o].push((up, close));
        }
    }
    out
}

/// A digest of the log, to compare two runs of one seed: incarnations are
/// left out (each run draws its own).
pub fn digest(log: &[Entry]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in log {
        let text = match &e.rec {
            Rec::Start { node, run, .. } => format!("{:?} start {node} {run}", e.at),
            rec => format!("{:?} {rec:?}", e.at),
        };
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The log around `positions`, for a report.
pub fn excerpt(log: &[Entry], positions: &[usize], ids: &[String]) -> String {
    let mut keep = vec![false; log.len()];
    for &p in positions {
        for k in keep
            .iter_mut()
            .take((p + 12).min(log.len()))
            .skip(p.saturating_sub(12))
        {
            *k = true;
        }
    }
    let mut out = String::new();
    let mut skipped = false;
    for (i, e) in log.iter().enumerate() {
        let notable = matches!(
            e.rec,
            Rec::Fault(_) | Rec::Start { .. } | Rec::Stop { .. } | Rec::Quiet
        ) || matches!(
            &e.rec,
            Rec::Seen { event, .. } if !matches!(event, Event::Invalidated { .. })
        );
        if keep[i] || notable {
            let _ = writeln!(out, "  #{i:<6} {:>10.3?}  {}", e.at, show(&e.rec, ids));
            skipped = false;
        } else if !skipped {
            let _ = writeln!(out, "  ...");
            skipped = true;
        }
    }
    out
}

fn show(rec: &Rec, ids: &[String]) -> String {
    let name = |n: &usize| ids.get(*n).cloned().unwrap_or_default();
    match rec {
        Rec::Start {
            node,
            run,
            incarnation,
        } => {
            format!(
                "{} run {run} starts (incarnation {incarnation:016x})",
                name(node)
            )
        }
        Rec::Stop { node, run, crashed } => format!(
            "{} run {run} {}",
            name(node),
            if *crashed { "crashes" } else { "shuts down" }
        ),
        Rec::Accepted {
            node,
            run,
            seq,
            what,
        } => {
            format!("{} run {run} accepted seq {seq}: {what:?}", name(node))
        }
        Rec::Seen { node, run, event } => format!("{} run {run} reads {event:?}", name(node)),
        Rec::Blackout { node, lasts } => match node {
            Some(n) => format!("{} stops reading its events for {lasts:?}", name(n)),
            None => format!("the clock jumps by {lasts:?}"),
        },
        Rec::Fault(s) => s.clone(),
        Rec::Quiet => "everything healed; the workload stops".to_string(),
    }
}
