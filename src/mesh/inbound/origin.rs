//! The receiver's side of delivery, as a synchronous state machine: per
//! origin, which incarnation it is in and what was applied, so that
//! duplicates are dropped, restarts are noticed and gaps are never silent.

use std::sync::Arc;

use crate::wire::{DIGEST_LEN, Item, Position, Resume, fingerprint};

use crate::mesh::event::{Event, FlushReason, PeerId};

#[derive(Debug, Clone, Copy)]
struct Origin {
    incarnation: u64,
    last_applied: u64,
    /// `last_seq` of the origin's goodbye, if it said one.
    goodbye: Option<u64>,
    /// Nothing applied yet from this incarnation: its first batch may start
    /// anywhere (what came before was not meant for this node's caches).
    fresh: bool,
    /// The fingerprint of the item applied at `last_applied`, announced
    /// beside it so that the origin resumes only past what this node
    /// applied from it; zeros when `last_applied` was set otherwise.
    digest: [u8; DIGEST_LEN],
}

/// A batch for an incarnation that is no longer the origin's current one:
/// the connection carrying it has been superseded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Superseded;

/// Another incarnation announced itself while the current one is still
/// connected: two running nodes claim the same identity.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DuplicateIdentity {
    /// The incarnation current now.
    pub current: u64,
    /// The one refused.
    pub other: u64,
    /// Whether `other` was current here once (it came back).
    pub returning: bool,
}

/// Incarnations remembered per peer after they were replaced.
const RETIRED: usize = 8;

/// What this node applied from one peer: its part of the receiver's state.
#[derive(Debug)]
pub(crate) struct OriginRecord {
    id: PeerId,
    state: Option<Origin>,
    /// Incarnations the peer had before its current one. A restarted node
    /// draws a new random one, so one of these coming back means two nodes
    /// answer to one identity; accepting it would flush at every switch.
    retired: Vec<u64>,
    /// What was held for the incarnation the current one replaced, told
    /// to the peer while nothing of the current one arrived: the peer's
    /// new run then knows this node saw its previous one (and dealt with
    /// its end by the rule of section 9.7), whichever of the two
    /// connections told this node of the new run first (section 9.9).
    replaced: Option<Resume>,
}

impl OriginRecord {
    pub(crate) fn new(id: PeerId) -> Self {
        OriginRecord {
            id,
            state: None,
            retired: Vec::new(),
            replaced: None,
        }
    }

    /// A peer's hello announces `incarnation`. Returns the position to put
    /// in our hello (what we hold from that peer, any incarnation) and emits
    /// a flush when a new incarnation follows one that did not end cleanly.
    ///
    /// Another incarnation is refused while the current one is live (among
    /// `live`, the incarnations of the links up with that peer): two
    /// running nodes claim one identity (a copied configuration), and the
    /// one already in the mesh keeps its place; switching between them
    /// would also flush at every switch. A restarted node is not held back
    /// by this for long: its previous run's links are gone, or noticed dead
    /// within seconds. Once the current one is gone, any other is taken, an
    /// earlier one that comes back with a flush (its position here was
    /// given up).
    pub(crate) fn hello(
        &mut self,
        incarnation: u64,
        live: &[u64],
        emit: &mut impl FnMut(Event),
    ) -> Result<Option<Position>, DuplicateIdentity> {
        let returning = self.retired.contains(&incarnation);
        if let Some(s) = self.state
            && s.incarnation != incarnation
            && live.contains(&s.incarnation)
        {
            return Err(DuplicateIdentity {
                current: s.incarnation,
                other: incarnation,
                returning,
            });
        }
        self.retired.retain(|&r| r != incarnation);
        let reply = self.applied();
        // What is held for the current incarnation itself (not what it
        // replaced): that is the run the next one follows.
        let replacing = Resume {
            last_applied: reply,
            digest: self.state.map_or([0; DIGEST_LEN], |s| s.digest),
        };
        let state = &mut self.state;
        match state {
            Some(s) if s.incarnation == incarnation => {}
            Some(s) => {
                self.replaced = Some(replacing);
                let clean = !returning && s.goodbye.is_some_and(|last| s.last_applied >= last);
                if !clean {
                    emit(Event::Flush {
                        origin: Some(self.id.clone()),
                        reason: FlushReason::PeerRestarted,
                    });
                }
                let retired = &mut self.retired;
                if retired.len() == RETIRED {
                    retired.remove(0);
                }
                retired.push(s.incarnation);
                *s = Origin::new(incarnation);
            }
            None => *state = Some(Origin::new(incarnation)),
        }
        Ok(reply)
    }

    /// Applies a batch from `incarnation` of `peer`, emitting an event per
    /// new item; returns the position to acknowledge.
    ///
    /// `floor` belongs to the connection the batch came on: the seq our
    /// hello on it announced, then the last seq it carried. An origin never
    /// sends that seq or one below on a connection, so one that does is
    /// **divergence**: what we hold for it was not its numbering (another
    /// party claimed its identity, or it restarted its numbering without a
    /// new incarnation). Skipping those seqs as duplicates would drop real
    /// invalidations; instead the application flushes and the origin's
    /// numbering is taken from here on.
    pub(crate) fn batch(
        &mut self,
        incarnation: u64,
        floor: &mut u64,
        first_seq: u64,
        items: Vec<Item>,
        emit: &mut impl FnMut(Event),
    ) -> Result<Position, Superseded> {
        let origin = &self.id;
        let Some(s) = self.state.as_mut().filter(|s| s.incarnation == incarnation) else {
            return Err(Superseded);
        };
        let last = items.len().saturating_sub(1);
        for (i, item) in items.into_iter().enumerate() {
            let seq = first_seq.saturating_add(i as u64);
            if seq <= *floor {
                if item != Item::Flush {
                    emit(Event::Flush {
                        origin: Some(origin.clone()),
                        reason: FlushReason::Diverged {
                            held: s.last_applied,
                            got: seq,
                        },
                    });
                }
                s.last_applied = seq - 1;
                s.digest = [0; DIGEST_LEN];
            }
            *floor = seq;
            if seq <= s.last_applied {
                continue; // a duplicate, from an older connection's replay
            }
            if seq > s.last_applied + 1 && !s.fresh && item != Item::Flush {
                emit(Event::Flush {
                    origin: Some(origin.clone()),
                    reason: FlushReason::Gap {
                        expected: s.last_applied + 1,
                        got: seq,
                    },
                });
            }
            s.fresh = false;
            s.last_applied = seq;
            // A goodbye promises nothing more; if more comes anyway, the
            // goodbye no longer describes the end of the stream.
            s.goodbye = None;
            // Only the batch's last item can end up at `last_applied`.
            s.digest = if i == last {
                fingerprint(incarnation, seq, &item)
            } else {
                [0; DIGEST_LEN]
            };
            emit(event(origin, seq, item));
        }
        Ok(Position {
            incarnation,
            seq: s.last_applied,
        })
    }

    /// The peer's current incarnation said goodbye after `last_seq`.
    pub(crate) fn goodbye(&mut self, incarnation: u64, last_seq: u64) {
        if let Some(s) = self.state.as_mut().filter(|s| s.incarnation == incarnation) {
            s.goodbye = Some(last_seq);
            if s.fresh && last_seq > s.last_applied {
                // The origin writes everything this node needs before its
                // goodbye, on the same connection. Nothing arrived, so
                // nothing was owed: this node started after what the origin
                // numbered so far had been delivered to its predecessor.
                s.last_applied = last_seq;
                s.digest = [0; DIGEST_LEN];
            }
        }
    }

    /// What was applied from `peer`'s latest incarnation, and the
    /// fingerprint of the item there: what a `Resume` to it says.
    pub(crate) fn resume(&self) -> Resume {
        if let (Some(s), Some(replaced)) = (self.state, self.replaced)
            && s.fresh
            && s.last_applied == 0
        {
            return replaced;
        }
        Resume {
            last_applied: self.applied(),
            digest: self.state.map_or([0; DIGEST_LEN], |s| s.digest),
        }
    }

    /// What was applied from `peer`'s latest incarnation (what a hello from
    /// it is answered with).
    pub(crate) fn applied(&self) -> Option<Position> {
        self.state.map(|s| Position {
            incarnation: s.incarnation,
            seq: s.last_applied,
        })
    }
}

impl Origin {
    fn new(incarnation: u64) -> Self {
        Origin {
            incarnation,
            last_applied: 0,
            goodbye: None,
            fresh: true,
            digest: [0; DIGEST_LEN],
        }
    }
}

fn event(origin: &PeerId, seq: u64, item: Item) -> Event {
    let origin = Arc::clone(origin);
    match item {
        Item::Key { cache, key } => Event::Invalidated {
            origin,
            seq,
            cache,
            key,
        },
        Item::Cache { cache } => Event::CacheCleared { origin, seq, cache },
        Item::Flush => Event::Flush {
            origin: Some(origin),
            reason: FlushReason::FromPeer { seq },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_key as key;

    fn origins() -> OriginRecord {
        OriginRecord::new(Arc::from("a:1"))
    }

    /// A batch on a connection of its own whose hello announced nothing.
    fn run(
        o: &mut OriginRecord,
        inc: u64,
        first: u64,
        items: Vec<Item>,
    ) -> (Vec<Event>, Result<Position, Superseded>) {
        run_on(o, &mut 0, inc, first, items)
    }

    fn run_on(
        o: &mut OriginRecord,
        floor: &mut u64,
        inc: u64,
        first: u64,
        items: Vec<Item>,
    ) -> (Vec<Event>, Result<Position, Superseded>) {
        let mut evs = Vec::new();
        let r = o.batch(inc, floor, first, items, &mut |e| evs.push(e));
        (evs, r)
    }

    /// No link up: the previous incarnation, if any, is gone.
    const GONE: &[u64] = &[];

    fn flushes(evs: &[Event]) -> usize {
        evs.iter()
            .filter(|e| matches!(e, Event::Flush { .. }))
            .count()
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut o = origins();
        assert_eq!(o.hello(5, GONE, &mut |_| panic!("no event")), Ok(None));
        let (evs, ack) = run(&mut o, 5, 1, vec![key("a"), key("b")]);
        assert_eq!(evs.len(), 2);
        assert_eq!(ack.expect("ack").seq, 2);
        let (evs, ack) = run(&mut o, 5, 1, vec![key("a"), key("b"), key("c")]);
        assert_eq!(evs.len(), 1, "only c is new");
        assert_eq!(ack.expect("ack").seq, 3);
    }

    /// Hazard: a party claiming the origin's identity (or an origin that
    /// restarted its numbering) moved the position ahead; the origin's
    /// real seqs below it must not be dropped as duplicates.
    #[test]
    fn seqs_at_or_below_what_the_connection_announced_are_divergence() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        run(&mut o, 5, 1, vec![key("a")]).1.expect("applied");
        // The claimant's batch: a gap (flushed), position now 1,000,000.
        let (evs, _) = run(&mut o, 5, 1_000_000, vec![key("x")]);
        assert_eq!(flushes(&evs), 1);
        // The real origin reconnects; our hello announces 1,000,000, and it
        // resumes from what it really sent: 2.
        let mut floor = o.applied().expect("held").seq;
        assert_eq!(floor, 1_000_000);
        let (evs, ack) = run_on(&mut o, &mut floor, 5, 2, vec![key("b"), key("c")]);
        assert!(
            matches!(
                evs[0],
                Event::Flush {
                    reason: FlushReason::Diverged {
                        held: 1_000_000,
                        got: 2
                    },
                    ..
                }
            ),
            "{evs:?}"
        );
        assert_eq!(evs.len(), 3, "the flush, then b and c applied: {evs:?}");
        assert_eq!(ack.expect("ack").seq, 3);
        // From here on the origin's own numbering holds: no more flushes.
        let (evs, _) = run_on(&mut o, &mut floor, 5, 4, vec![key("d")]);
        assert_eq!((evs.len(), flushes(&evs)), (1, 0));
        // A connection going backwards is divergence too.
        let (evs, _) = run_on(&mut o, &mut floor, 5, 4, vec![key("d")]);
        assert_eq!((evs.len(), flushes(&evs)), (2, 1));
    }

    #[test]
    fn duplicates_from_an_older_connection_are_still_skipped_quietly() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        // The new connection's hello announced 2; the old one then applied
        // up to 4 before it was superseded.
        let mut new_conn = 2;
        run(&mut o, 5, 1, vec![key("a"), key("b"), key("c"), key("d")])
            .1
            .expect("applied");
        let (evs, ack) = run_on(
            &mut o,
            &mut new_conn,
            5,
            3,
            vec![key("c"), key("d"), key("e")],
        );
        assert_eq!(evs.len(), 1, "only e is new: {evs:?}");
        assert_eq!(ack.expect("ack").seq, 5);
    }

    #[test]
    fn a_gap_is_never_silent() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        run(&mut o, 5, 1, vec![key("a")]).1.expect("applied");
        let (evs, _) = run(&mut o, 5, 3, vec![key("c")]);
        assert_eq!(flushes(&evs), 1);
        assert!(matches!(
            evs[0],
            Event::Flush {
                reason: FlushReason::Gap {
                    expected: 2,
                    got: 3
                },
                ..
            }
        ));
        // A flush at the gap covers it: no extra flush.
        let (evs, _) = run(&mut o, 5, 10, vec![Item::Flush, key("k")]);
        assert_eq!(flushes(&evs), 1);
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn first_batch_of_an_incarnation_may_start_anywhere() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        let (evs, _) = run(&mut o, 5, 40, vec![key("a")]);
        assert_eq!(flushes(&evs), 0);
    }

    #[test]
    fn crash_restart_flushes_and_clean_restart_does_not() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        run(&mut o, 5, 1, vec![key("a")]).1.expect("applied");
        let mut evs = Vec::new();
        let reply = o.hello(6, GONE, &mut |e| evs.push(e));
        assert_eq!(
            reply,
            Ok(Some(Position {
                incarnation: 5,
                seq: 1
            }))
        );
        assert_eq!(flushes(&evs), 1, "no goodbye: flush");

        run(&mut o, 6, 1, vec![key("b"), key("c")])
            .1
            .expect("applied");
        o.goodbye(6, 2);
        let mut evs = Vec::new();
        o.hello(7, GONE, &mut |e| evs.push(e)).expect("hello");
        assert!(evs.is_empty(), "goodbye and all applied: no flush");

        run(&mut o, 7, 1, vec![key("d")]).1.expect("applied");
        o.goodbye(7, 3); // said goodbye after 3, but 2 and 3 never arrived
        let mut evs = Vec::new();
        o.hello(8, GONE, &mut |e| evs.push(e)).expect("hello");
        assert_eq!(flushes(&evs), 1);
    }

    #[test]
    fn goodbye_to_a_node_that_was_owed_nothing_is_clean() {
        let mut o = origins();
        // This node joined after the origin's first 40 were delivered to
        // its predecessor; the origin had nothing more for it.
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        o.goodbye(5, 40);
        let mut evs = Vec::new();
        o.hello(6, GONE, &mut |e| evs.push(e)).expect("hello");
        assert!(evs.is_empty(), "{evs:?}");
    }

    #[test]
    fn another_incarnation_is_refused_while_the_current_one_is_connected() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("first");
        // A copy with the same identity while 5 is connected: refused,
        // nothing changes.
        assert_eq!(
            o.hello(6, &[5], &mut |_| panic!("no flush")),
            Err(DuplicateIdentity {
                current: 5,
                other: 6,
                returning: false
            })
        );
        assert_eq!(
            o.hello(5, &[5], &mut |_| panic!("no flush")),
            Ok(Some(Position {
                incarnation: 5,
                seq: 0
            }))
        );
        // 5 is gone without a goodbye (a crash): 6 is taken, with a flush.
        let mut flushes = 0;
        o.hello(6, GONE, &mut |_| flushes += 1).expect("a restart");
        assert_eq!(flushes, 1);
        // 5 cannot come back while 6 is connected.
        assert_eq!(
            o.hello(5, &[6], &mut |_| panic!("no flush")),
            Err(DuplicateIdentity {
                current: 6,
                other: 5,
                returning: true
            })
        );
    }

    #[test]
    fn an_incarnation_that_comes_back_once_the_current_is_gone_is_taken_with_a_flush() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("first");
        o.hello(6, GONE, &mut |_| {}).expect("5 gone, 6 in");
        // 6 said goodbye and is gone: 5 comes back. Its position here was
        // given up, so it costs a flush, goodbye or not.
        o.goodbye(6, 0);
        let mut flushes = 0;
        o.hello(5, GONE, &mut |_| flushes += 1).expect("taken back");
        assert_eq!(flushes, 1);
        assert_eq!(o.applied().map(|p| p.incarnation), Some(5));
    }

    #[test]
    fn batches_of_an_old_incarnation_are_refused() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        o.hello(6, GONE, &mut |_| {}).expect("hello");
        let (evs, r) = run(&mut o, 5, 1, vec![key("a")]);
        assert!(evs.is_empty());
        assert_eq!(r, Err(Superseded));
    }

    /// Told of a peer's new run by one connection, this node still tells
    /// the new run, on the other, what it held for the run before: the new
    /// run then knows this node saw its predecessor end (section 9.9), and
    /// sends it no second flush for it.
    #[test]
    fn a_fresh_incarnation_reports_what_it_replaced() {
        let mut o = origins();
        o.hello(5, GONE, &mut |_| {}).expect("hello");
        run(&mut o, 5, 1, vec![key("a"), key("b")])
            .1
            .expect("applied");
        let before = o.resume();
        assert_eq!(
            before.last_applied.map(|p| (p.incarnation, p.seq)),
            Some((5, 2))
        );
        o.hello(6, GONE, &mut |_| {}).expect("new run");
        assert_eq!(o.resume(), before, "nothing of 6 yet");
        run(&mut o, 6, 1, vec![key("c")]).1.expect("applied");
        assert_eq!(
            o.resume().last_applied.map(|p| (p.incarnation, p.seq)),
            Some((6, 1))
        );
        // A third run follows 6, not 5.
        o.hello(7, GONE, &mut |_| {}).expect("third run");
        assert_eq!(
            o.resume().last_applied.map(|p| (p.incarnation, p.seq)),
            Some((6, 1))
        );
    }
}
