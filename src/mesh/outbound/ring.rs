//! The origin's side of delivery, as a synchronous state machine: sequence
//! numbers, the bounded replay buffer, and where each peer stands.
//!
//! One ring holds every invalidation some peer has not acknowledged; each
//! peer has a cursor into it. That is the per-peer replay buffer of the
//! design without a copy per peer: its bound is the same (`capacity`
//! invalidations), and so is the rule when it is full — the oldest entries
//! go, and a peer that still needed them gets one flush in their place.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::mesh::error::Violation;
use crate::wire::{CodecError, Item, Position, Resume, Sealer, encode_batch_frame, fingerprint};

/// Bytes of items after which a `Batch` frame is closed: small frames let
/// the receiver start applying sooner; one maximal item (two 64 KiB
/// strings) after a full batch still fits the 1 MiB frame limit.
const BATCH_BYTES: usize = 64 * 1024;
/// Most items in one `Batch` frame: the protocol's limit.
const BATCH_ITEMS: usize = crate::wire::MAX_BATCH_ITEMS;

/// Where one peer stands.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    /// Everything up to here is applied by the peer (acknowledged, or said
    /// in its hello).
    acked: u64,
    /// Everything up to here has been written on the current connection.
    sent: u64,
    /// Whether a connection is up (only then is anything written).
    connected: bool,
    /// The peer's hello showed it knew our previous run: it needs no
    /// opening flush (see [`OutLog::open_with_flush`]).
    knew_previous: bool,
    /// The run (incarnation) of the peer whose acks and hello last set
    /// `acked`: within one run of the receiver, what it applied never goes
    /// back, so a hello below `acked` from that same run means the acks
    /// were not its own (forged) or it lost track (see
    /// [`OutLog::connected`]).
    acked_by: Option<u64>,
    /// The seq of the last synthetic flush written to it (section 9.3): a
    /// position there, with a flush's fingerprint, is one we gave it.
    flushed_at: Option<u64>,
}

/// Sequence numbers, the replay ring and the peers' cursors.
#[derive(Debug)]
pub(crate) struct OutLog {
    incarnation: u64,
    /// The number the next invalidation gets.
    next_seq: u64,
    /// The sequence number of `items[0]`.
    front_seq: u64,
    items: VecDeque<Item>,
    capacity: usize,
    /// Encoded size (bound) of `items`, and its limit.
    bytes: usize,
    max_bytes: usize,
    peers: Vec<Cursor>,
    /// Entries dropped from the full ring before they were written to a
    /// peer that needed them: each costs that peer a flush. (An entry
    /// written but not yet acknowledged is not counted: it still arrives
    /// unless that connection breaks, and then the flush is counted as a
    /// gap flush.)
    overflows: u64,
    /// Shutting down: no more invalidations are taken.
    closed: bool,
    /// The previous run's incarnation, when seq 1 is the flush that stands
    /// for what it may have left undelivered.
    opening_flush_for: Option<u64>,
}

/// How a peer resumes, from [`OutLog::connected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resumed {
    /// It is behind what is still held: it gets a flush first.
    pub behind: bool,
    /// Its position for us was not believed (section 9.4 of the protocol).
    pub divergence: Option<Divergence>,
}

/// Why a peer's announced position for us is not believed. In each case it
/// applied something other than our stream under our numbers, or lost
/// track of it; it resumes from where it can be trusted, which replays or
/// flushes, never skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Divergence {
    /// A seq we never assigned: another party claimed our identity to it.
    #[error("it holds seq {announced}, beyond the last this node assigned ({last})")]
    Beyond { announced: u64, last: u64 },
    /// The fingerprint of its item at that seq is not ours: it applied
    /// invalidations another party sent under our identity.
    #[error("the item it holds at seq {announced} is not the one this node sent")]
    Content { announced: u64 },
    /// Past what it acknowledged, at an item no longer held to check.
    #[error(
        "it holds seq {announced}, past its acknowledgement of {acked}, which can no longer be checked"
    )]
    Unverifiable { announced: u64, acked: u64 },
    /// Below what the same run of it acknowledged: acks forged on the path,
    /// or it started over.
    #[error("it holds seq {announced}, below the {acked} it acknowledged in this run")]
    Below { announced: u64, acked: u64 },
}

/// What [`OutLog::fill`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filled {
    /// Items written (a flush standing in for dropped ones included).
    pub items: usize,
    /// Whether a flush was written in place of entries no longer held.
    pub gap_flush: bool,
}

impl OutLog {
    pub(crate) fn new(incarnation: u64, peers: usize, capacity: usize, max_bytes: usize) -> Self {
        OutLog {
            incarnation,
            next_seq: 1,
            front_seq: 1,
            items: VecDeque::new(),
            capacity: capacity.max(1),
            bytes: 0,
            max_bytes,
            peers: vec![Cursor::default(); peers],
            overflows: 0,
            closed: false,
            opening_flush_for: None,
        }
    }

    /// Makes seq 1 a flush for what the previous run, `previous`, may have
    /// left undelivered (it did not end cleanly). A peer that already knew
    /// that run does not need it: it flushes by itself when it sees this
    /// incarnation (that run ended without a goodbye), or it applied
    /// everything of it (a goodbye covered it). Only a peer that never saw
    /// it gets the flush, so a crash costs each peer one flush, not two.
    pub(crate) fn open_with_flush(&mut self, previous: u64) {
        if self.next_seq == 1 {
            self.push(Item::Flush);
            self.opening_flush_for = Some(previous);
        }
    }

    /// What a peer's hello (either direction) says it holds from us, seen
    /// before it learnt of this incarnation.
    pub(crate) fn peer_position(&mut self, peer: usize, pos: Option<Position>) {
        if let Some(previous) = self.opening_flush_for
            && pos.is_some_and(|p| p.incarnation == previous)
        {
            self.peers[peer].knew_previous = true;
        }
    }

    /// Refuses invalidations from now on.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    /// Whether [`OutLog::close`] was called.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The last sequence number assigned (0 before the first).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Numbers an invalidation and keeps it for every peer; returns its
    /// sequence number. Never blocks: when the ring is full, the oldest
    /// entry goes and peers that still needed it will get a flush.
    pub(crate) fn push(&mut self, item: Item) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.peers.is_empty() {
            self.front_seq = self.next_seq;
            return seq;
        }
        if item == Item::Flush {
            // A flush makes everything before it moot.
            self.items.clear();
            self.bytes = 0;
            self.front_seq = seq;
        }
        self.bytes += item.encoded_len_bound();
        self.items.push_back(item);
        // Bounded in count and in bytes; the newest entry always stays.
        while self.items.len() > 1
            && (self.items.len() > self.capacity || self.bytes > self.max_bytes)
        {
            self.pop_front();
            // `sent` is `acked` while a peer is away.
            if self.peers.iter().any(|c| c.sent < self.front_seq - 1) {
                self.overflows += 1;
            }
        }
        seq
    }

    /// A connection to `peer` is up; `resume` is what it says it applied
    /// from us, and `run` is the incarnation it runs as (section 9.4 of the
    /// protocol).
    ///
    /// A position of this incarnation is believed only when it is bound to
    /// our content: the fingerprint it announces is that of the item we
    /// assigned that seq (still held, or a flush there), or it lies within
    /// what it acknowledged. Otherwise it is **divergence** (see
    /// [`Divergence`]): the peer resumes from what it acknowledged, so it
    /// gets seqs at or below the position it announced, which makes it
    /// flush (section 9.5) instead of dropping them.
    ///
    /// A position *below* what the same run of the peer acknowledged is
    /// divergence too: a receiver's position never goes back within a run,
    /// so those acks were not all its own (forged on the path) or it
    /// flushed and started over. Either way it did not apply what lies
    /// between: it resumes from the position it announced, so what is
    /// still held is replayed and what is not is covered by a flush.
    pub(crate) fn connected(&mut self, peer: usize, resume: Resume, run: u64) -> Resumed {
        let last = self.last_seq();
        let incarnation = self.incarnation;
        let c = &self.peers[peer];
        let held = |seq: u64| {
            seq.checked_sub(self.front_seq)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.items.get(i))
        };
        // Bound to our content: the item we assigned `seq` (while held), or
        // the synthetic flush we wrote this peer there. (Not any flush: one
        // that a claimant sent ahead of our numbering would cover nothing
        // we assigned after it.)
        let verified = |seq: u64| {
            seq == 0
                || held(seq)
                    .is_some_and(|item| fingerprint(incarnation, seq, item) == resume.digest)
                || (c.flushed_at == Some(seq)
                    && fingerprint(incarnation, seq, &Item::Flush) == resume.digest)
        };
        let same_run = c.acked_by == Some(run);
        let acked = c.acked;
        let (position, divergence) = match resume.last_applied {
            Some(p) if p.incarnation == incarnation => {
                let announced = p.seq;
                if announced > last {
                    (acked, Some(Divergence::Beyond { announced, last }))
                } else if same_run && announced < acked {
                    // Replayed from its position; one whose item is not
                    // ours gets that seq again too, which makes it flush.
                    let from = if verified(announced) {
                        announced
                    } else {
                        announced - 1
                    };
                    (from, Some(Divergence::Below { announced, acked }))
                } else if verified(announced) {
                    (acked.max(announced), None)
                } else if held(announced).is_some() {
                    (acked, Some(Divergence::Content { announced }))
                } else if announced <= acked {
                    (acked, None)
                } else {
                    (acked, Some(Divergence::Unverifiable { announced, acked }))
                }
            }
            // The run that acknowledged our seqs knew this incarnation: a
            // position from it that holds nothing of ours went back too.
            None if same_run && acked > 0 => (
                0,
                Some(Divergence::Below {
                    announced: 0,
                    acked,
                }),
            ),
            _ => (acked, None),
        };
        let c = &mut self.peers[peer];
        c.acked = position;
        c.acked_by = Some(run);
        if c.knew_previous && self.opening_flush_for.is_some() {
            // Seq 1, the opening flush, is not for this peer.
            c.acked = c.acked.max(1);
        }
        c.sent = c.acked;
        c.connected = true;
        let behind = c.acked + 1 < self.front_seq;
        self.trim();
        Resumed { behind, divergence }
    }

    /// The connection to `peer` is down.
    pub(crate) fn disconnected(&mut self, peer: usize) {
        let c = &mut self.peers[peer];
        c.connected = false;
        c.sent = c.acked;
    }

    /// A cumulative ack from `peer`. Returns the peer's acked sequence
    /// number, or why an ack cannot be right.
    pub(crate) fn ack(&mut self, peer: usize, pos: Position) -> Result<u64, Violation> {
        if pos.incarnation != self.incarnation {
            return Err(Violation::AckIncarnation {
                got: pos.incarnation,
                ours: self.incarnation,
            });
        }
        // An ack may run ahead of what this connection wrote: the receiver
        // may have applied more from an older connection after its hello.
        // Only a number never assigned is wrong.
        if pos.seq > self.last_seq() {
            return Err(Violation::AckBeyondLast {
                seq: pos.seq,
                last: self.last_seq(),
            });
        }
        let c = &mut self.peers[peer];
        c.acked = c.acked.max(pos.seq);
        c.sent = c.sent.max(c.acked);
        let acked = c.acked;
        self.trim();
        Ok(acked)
    }

    fn pop_front(&mut self) {
        if let Some(item) = self.items.pop_front() {
            self.bytes -= item.encoded_len_bound();
            self.front_seq += 1;
        }
    }

    /// Drops entries every peer has applied.
    fn trim(&mut self) {
        let min = self
            .peers
            .iter()
            .map(|c| c.acked)
            .min()
            .unwrap_or(self.last_seq());
        while self.front_seq <= min && !self.items.is_empty() {
            self.pop_front();
        }
    }

    /// Whether `peer` has something not yet written.
    pub(crate) fn has_unsent(&self, peer: usize) -> bool {
        let c = &self.peers[peer];
        c.connected && c.sent < self.last_seq()
    }

    /// The last sequence number written to `peer` on this connection.
    pub(crate) fn sent(&self, peer: usize) -> u64 {
        self.peers[peer].sent
    }

    /// Acked sequence number of `peer`.
    pub(crate) fn acked(&self, peer: usize) -> u64 {
        self.peers[peer].acked
    }

    /// Invalidations `peer` has not acknowledged that are still held (a
    /// pending flush counts as one).
    pub(crate) fn queued(&self, peer: usize) -> u64 {
        let c = &self.peers[peer];
        let from = (c.acked + 1).max(self.front_seq);
        let gap = u64::from(c.acked + 1 < self.front_seq);
        self.next_seq.saturating_sub(from) + gap
    }

    /// Entries held in the ring.
    pub(crate) fn held(&self) -> usize {
        self.items.len()
    }

    /// Times the ring dropped an entry a peer still needed.
    pub(crate) fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Takes the next `Batch` frame's worth of what `peer` has not been
    /// sent (at most [`BATCH_ITEMS`] items or about [`BATCH_BYTES`], and a
    /// flush before them when entries it needed were dropped) into
    /// `taken`, as shared references (no string is copied), and marks it
    /// sent. The caller encodes it after releasing the lock this log lives
    /// under, so that encoding never holds up [`OutLog::push`]; one frame
    /// at a time keeps what is taken small.
    pub(crate) fn take(&mut self, peer: usize, taken: &mut Taken) -> Filled {
        let mut filled = Filled::default();
        if !self.has_unsent(peer) {
            return filled;
        }
        let mut from = self.peers[peer].sent + 1;
        if from < self.front_seq {
            // Entries this peer needs were dropped. A flush at the front
            // covers them itself; otherwise a flush numbered with the last
            // dropped entry stands in for them.
            if self.items.front() != Some(&Item::Flush) {
                let flush_seq = self.front_seq - 1;
                taken.push_run(flush_seq, std::iter::once(Item::Flush));
                filled.items += 1;
                filled.gap_flush = true;
                self.peers[peer].sent = flush_seq;
                self.peers[peer].flushed_at = Some(flush_seq);
            }
            from = self.front_seq;
        }
        let offset = (from - self.front_seq) as usize;
        let mut end = offset;
        let mut run_bytes = 0;
        while end < self.items.len() && end - offset < BATCH_ITEMS && run_bytes < BATCH_BYTES {
            run_bytes += self.items[end].encoded_len_bound();
            end += 1;
        }
        if end > offset {
            taken.push_run(from, self.items.range(offset..end).cloned());
            filled.items += end - offset;
            self.peers[peer].sent = from + (end - offset) as u64 - 1;
        }
        filled
    }

    /// [`OutLog::take`] and [`Taken::encode`] in one (tests).
    #[cfg(test)]
    pub(crate) fn fill(
        &mut self,
        peer: usize,
        dst: &mut BytesMut,
        max_bytes: usize,
    ) -> Result<Filled, CodecError> {
        let mut filled = Filled::default();
        let mut taken = Taken::default();
        let start = dst.len();
        while dst.len() - start < max_bytes {
            let f = self.take(peer, &mut taken);
            taken.encode(dst, None)?;
            if f.items == 0 {
                break;
            }
            filled.items += f.items;
            filled.gap_flush |= f.gap_flush;
        }
        Ok(filled)
    }
}

/// Invalidations taken from the ring for one write: runs of consecutive
/// seqs, each one `Batch` frame. Kept by the link between writes, for its
/// allocations.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// (first seq, number of items) of each run, in order.
    runs: Vec<(u64, usize)>,
    items: Vec<Item>,
}

impl Taken {
    fn push_run(&mut self, first_seq: u64, items: impl Iterator<Item = Item>) {
        let before = self.items.len();
        self.items.extend(items);
        self.runs.push((first_seq, self.items.len() - before));
    }

    /// Encodes the runs as `Batch` frames appended to `dst`, and empties
    /// itself.
    /// Under a shared secret, `sealer` tags each frame (section 7.6).
    pub(crate) fn encode(
        &mut self,
        dst: &mut BytesMut,
        mut sealer: Option<&mut Sealer>,
    ) -> Result<(), CodecError> {
        let mut at = 0;
        let result = self.runs.iter().try_for_each(|&(first_seq, n)| {
            let run = &self.items[at..at + n];
            at += n;
            let start = dst.len();
            encode_batch_frame(first_seq, (run, &[]), dst)?;
            match sealer.as_deref_mut() {
                Some(s) => s.seal(dst, start),
                None => Ok(()),
            }
        });
        self.runs.clear();
        self.items.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_key as key;
    use crate::wire::{FrameCodec, Message};
    use tokio_util::codec::Decoder;

    /// Decodes frames into (seq, item) pairs.
    fn sent(buf: &mut BytesMut) -> Vec<(u64, Item)> {
        let mut codec = FrameCodec::new();
        let mut out = Vec::new();
        while let Some(msg) = codec.decode(buf).expect("valid frames") {
            let Message::Batch(b) = msg else {
                panic!("not a batch: {msg:?}")
            };
            for (i, item) in b.items.into_iter().enumerate() {
                out.push((b.first_seq + i as u64, item));
            }
        }
        out
    }

    fn drain(log: &mut OutLog, peer: usize) -> Vec<(u64, Item)> {
        let mut buf = BytesMut::new();
        log.fill(peer, &mut buf, usize::MAX).expect("fill");
        sent(&mut buf)
    }

    /// A hello that holds nothing of ours.
    fn nothing() -> Resume {
        Resume {
            last_applied: None,
            digest: [0; 16],
        }
    }

    /// A receiver's position at `seq`, with the fingerprint of our item
    /// there when we still hold it.
    fn said(log: &OutLog, seq: u64) -> Resume {
        let item = seq
            .checked_sub(log.front_seq)
            .and_then(|i| log.items.get(i as usize));
        Resume {
            last_applied: Some(pos(log, seq)),
            digest: item.map_or([0; 16], |i| fingerprint(log.incarnation(), seq, i)),
        }
    }

    /// The seqs written to `peer` now.
    fn seqs(log: &mut OutLog, peer: usize) -> Vec<u64> {
        drain(log, peer).iter().map(|x| x.0).collect()
    }

    /// A log of incarnation 7 holding `capacity` entries for peers whose
    /// runs are `runs`, all connected, with keys "0".."n-1" pushed.
    fn with_keys(runs: &[u64], capacity: usize, n: usize) -> OutLog {
        let mut log = OutLog::new(7, runs.len(), capacity, usize::MAX);
        for (peer, &run) in runs.iter().enumerate() {
            log.connected(peer, nothing(), run);
        }
        for i in 0..n {
            log.push(key(&i.to_string()));
        }
        log
    }

    fn pos(log: &OutLog, seq: u64) -> Position {
        Position {
            incarnation: log.incarnation(),
            seq,
        }
    }

    #[test]
    fn sends_in_order_and_trims_on_ack() {
        let mut log = OutLog::new(7, 2, 100, usize::MAX);
        log.connected(0, nothing(), 1);
        log.connected(1, nothing(), 1);
        for i in 0..5 {
            assert_eq!(log.push(key(&i.to_string())), i + 1);
        }
        let got = seqs(&mut log, 0);
        assert_eq!(got, [1, 2, 3, 4, 5]);
        assert!(drain(&mut log, 0).is_empty());
        log.ack(0, pos(&log, 5)).expect("ack");
        assert_eq!(log.held(), 5, "peer 1 has not acked");
        drain(&mut log, 1);
        log.ack(1, pos(&log, 3)).expect("ack");
        assert_eq!(log.held(), 2);
        assert_eq!(log.queued(1), 2);
        assert_eq!(log.queued(0), 0);
    }

    #[test]
    fn replays_after_reconnect_from_last_applied() {
        let mut log = with_keys(&[1], 100, 10);
        drain(&mut log, 0);
        // The peer applied 6 before the link broke, but acked only 2.
        log.ack(0, pos(&log, 2)).expect("ack");
        log.disconnected(0);
        log.connected(0, said(&log, 6), 1);
        let got = seqs(&mut log, 0);
        assert_eq!(got, [7, 8, 9, 10]);
    }

    /// Hazard: a peer whose position for us was inflated by a party
    /// claiming our identity must not make us trim what it never got.
    #[test]
    fn a_position_beyond_what_was_assigned_is_not_believed() {
        let mut log = with_keys(&[1], 100, 10);
        drain(&mut log, 0);
        log.ack(0, pos(&log, 4)).expect("ack");
        log.disconnected(0);
        let inflated = Position {
            incarnation: 7,
            seq: 1_000_000,
        };
        let resumed = log.connected(
            0,
            Resume {
                last_applied: Some(inflated),
                digest: [0; 16],
            },
            1,
        );
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Beyond {
                announced: 1_000_000,
                last: 10
            })
        );
        assert_eq!(log.held(), 6, "5..=10 still held");
        let got = seqs(&mut log, 0);
        assert_eq!(got, [5, 6, 7, 8, 9, 10]);
    }

    /// Hazard: acks forged on the path (or a receiver that started over)
    /// must not make us skip what the receiver never applied.
    #[test]
    fn a_position_below_what_the_same_run_acknowledged_replays_or_flushes() {
        let mut log = with_keys(&[1, 9], 100, 10);
        drain(&mut log, 0);
        // A forged ack of everything; the receiver had applied only 4.
        log.ack(0, pos(&log, 10)).expect("ack");
        log.disconnected(0);
        let resumed = log.connected(0, said(&log, 4), 1);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Below {
                announced: 4,
                acked: 10
            })
        );
        assert!(!resumed.behind, "peer 1 keeps 5..=10 in the ring");
        let got = seqs(&mut log, 0);
        assert_eq!(got, [5, 6, 7, 8, 9, 10]);

        // Once nothing is held any more, a flush covers the gap.
        drain(&mut log, 1);
        log.ack(1, pos(&log, 10)).expect("ack");
        log.ack(0, pos(&log, 10)).expect("ack");
        assert_eq!(log.held(), 0);
        log.disconnected(0);
        let resumed = log.connected(0, said(&log, 4), 1);
        assert!(resumed.behind);
        assert_eq!(drain(&mut log, 0), [(10, Item::Flush)]);

        // A hello that holds nothing of ours, from the run that acked.
        log.disconnected(1);
        let resumed = log.connected(1, nothing(), 9);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Below {
                announced: 0,
                acked: 10
            })
        );
        assert_eq!(drain(&mut log, 1), [(10, Item::Flush)]);
    }

    /// A restarted receiver holds nothing of ours: that is no divergence,
    /// and it resumes after what its earlier run acknowledged.
    #[test]
    fn a_new_run_of_the_receiver_resumes_from_the_acks() {
        let mut log = with_keys(&[1], 100, 3);
        drain(&mut log, 0);
        log.ack(0, pos(&log, 3)).expect("ack");
        log.disconnected(0);
        let resumed = log.connected(0, said(&log, 0), 2);
        assert_eq!(resumed.divergence, None);
        log.push(key("x"));
        assert_eq!(seqs(&mut log, 0), [4]);
    }

    /// Hole: a party at our address fed the receiver invalidations of its
    /// own under our next seqs while our link stalled. Its position is in
    /// range, but bound to content that is not ours: not believed.
    #[test]
    fn a_position_in_range_with_content_not_ours_is_not_believed() {
        let mut log = with_keys(&[1], 100, 10);
        drain(&mut log, 0);
        log.ack(0, pos(&log, 5)).expect("ack");
        log.disconnected(0);
        let forged = Resume {
            last_applied: Some(pos(&log, 8)),
            digest: fingerprint(7, 8, &key("theirs")),
        };
        let resumed = log.connected(0, forged, 1);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Content { announced: 8 })
        );
        let got = seqs(&mut log, 0);
        assert_eq!(got, [6, 7, 8, 9, 10]);
        // The same position with our item's fingerprint is believed.
        log.disconnected(0);
        let resumed = log.connected(0, said(&log, 8), 1);
        assert_eq!(resumed.divergence, None);
        assert_eq!(seqs(&mut log, 0), [9, 10]);
    }

    /// Below what it acknowledged *and* holding an item that is not ours
    /// there: it gets that seq again, so it flushes (section 9.5) rather
    /// than keep the forged item in place of ours.
    #[test]
    fn below_the_acks_with_content_not_ours_gets_its_seq_again() {
        let mut log = with_keys(&[1, 9], 100, 10);
        drain(&mut log, 0);
        log.ack(0, pos(&log, 10)).expect("ack");
        log.disconnected(0);
        let forged = Resume {
            last_applied: Some(pos(&log, 6)),
            digest: fingerprint(7, 6, &key("theirs")),
        };
        let resumed = log.connected(0, forged, 1);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Below {
                announced: 6,
                acked: 10
            })
        );
        assert_eq!(seqs(&mut log, 0), [6, 7, 8, 9, 10]);
        // A new run of it that holds a forged item within what its
        // predecessor acknowledged: counted, nothing to resend.
        log.ack(0, pos(&log, 10)).expect("ack");
        log.disconnected(0);
        let forged = Resume {
            last_applied: Some(pos(&log, 6)),
            digest: fingerprint(7, 6, &key("theirs")),
        };
        let resumed = log.connected(0, forged, 2);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Content { announced: 6 })
        );
        log.push(key("new"));
        assert_eq!(seqs(&mut log, 0), [11]);
    }

    /// Past what it acknowledged, at an item we no longer hold: nothing to
    /// check it against, so it gets a flush; the synthetic flush we wrote
    /// it is one we can check.
    #[test]
    fn a_position_that_cannot_be_checked_costs_a_flush() {
        let mut log = with_keys(&[1], 4, 3);
        drain(&mut log, 0);
        log.ack(0, pos(&log, 1)).expect("ack");
        log.disconnected(0);
        for i in 3..10 {
            log.push(key(&i.to_string()));
        }
        // Seqs 1..=6 are gone; it claims 3 with some fingerprint.
        let claim = Resume {
            last_applied: Some(pos(&log, 3)),
            digest: fingerprint(7, 3, &key("2")),
        };
        let resumed = log.connected(0, claim, 1);
        assert_eq!(
            resumed.divergence,
            Some(Divergence::Unverifiable {
                announced: 3,
                acked: 1
            })
        );
        let got = drain(&mut log, 0);
        assert_eq!(got[0], (6, Item::Flush), "a synthetic flush first");
        // It applied that flush and the link broke before its ack.
        log.disconnected(0);
        let flushed = Resume {
            last_applied: Some(pos(&log, 6)),
            digest: fingerprint(7, 6, &Item::Flush),
        };
        let resumed = log.connected(0, flushed, 1);
        assert_eq!(resumed.divergence, None);
        assert_eq!(seqs(&mut log, 0), [7, 8, 9, 10]);
    }

    #[test]
    fn overflow_becomes_one_flush() {
        let mut log = OutLog::new(7, 2, 4, usize::MAX);
        log.connected(0, nothing(), 1);
        for i in 0..10 {
            log.push(key(&i.to_string()));
            // Peer 0 keeps up.
            drain(&mut log, 0);
            log.ack(0, pos(&log, log.last_seq())).expect("ack");
        }
        assert_eq!(log.held(), 4, "bounded by capacity");
        assert!(log.overflows() > 0);
        assert_eq!(log.queued(1), 5, "four held plus one flush");
        log.connected(1, nothing(), 1);
        let got = drain(&mut log, 1);
        assert_eq!(got[0], (6, Item::Flush));
        assert_eq!(
            got[1..].iter().map(|x| x.0).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        // Peer 0, never behind, got no flush.
        assert_eq!(log.queued(0), 0);
    }

    /// A peer that was written everything but acknowledges nothing (a
    /// stopped process whose socket buffers took it all) loses nothing while
    /// its connection holds: that is no overflow. What it was never written
    /// is.
    #[test]
    fn only_entries_never_written_count_as_overflows() {
        let mut log = OutLog::new(7, 1, 4, usize::MAX);
        log.connected(0, nothing(), 1);
        for i in 0..10 {
            log.push(key(&i.to_string()));
            drain(&mut log, 0);
        }
        assert_eq!(log.overflows(), 0, "all written, none acknowledged");
        for i in 10..13 {
            log.push(key(&i.to_string()));
        }
        assert_eq!(
            log.overflows(),
            0,
            "the ring still holds the unwritten ones"
        );
        for i in 13..15 {
            log.push(key(&i.to_string()));
        }
        assert_eq!(log.overflows(), 1, "seq 11 dropped before it was written");
        // The peer gets a flush in its place, and then the rest.
        let got = drain(&mut log, 0);
        assert_eq!(got[0].1, Item::Flush);
        // Away, a peer needs what it has not acknowledged.
        log.disconnected(0);
        log.push(key("x"));
        assert_eq!(log.overflows(), 2);
    }

    #[test]
    fn a_local_flush_replaces_what_came_before() {
        let mut log = OutLog::new(7, 1, 100, usize::MAX);
        for i in 0..10 {
            log.push(key(&i.to_string()));
        }
        log.push(Item::Flush);
        log.push(key("after"));
        log.connected(0, nothing(), 1);
        let got = drain(&mut log, 0);
        assert_eq!(got, vec![(11, Item::Flush), (12, key("after"))]);
    }

    #[test]
    fn bogus_acks_are_refused() {
        let mut log = OutLog::new(7, 1, 100, usize::MAX);
        log.connected(0, nothing(), 1);
        log.push(key("a"));
        assert_eq!(
            log.ack(
                0,
                Position {
                    incarnation: 8,
                    seq: 1
                }
            ),
            Err(Violation::AckIncarnation {
                got: 8,
                ours: log.incarnation
            })
        );
        assert_eq!(
            log.ack(0, pos(&log, 2)),
            Err(Violation::AckBeyondLast { seq: 2, last: 1 }),
            "never assigned"
        );
        // Applied from an older connection: accepted, and not sent again.
        assert_eq!(log.ack(0, pos(&log, 1)), Ok(1));
        assert!(drain(&mut log, 0).is_empty());
    }

    #[test]
    fn batches_stay_below_the_frame_limit() {
        let mut log = OutLog::new(7, 1, 100_000, usize::MAX);
        log.connected(0, nothing(), 1);
        let big = "x".repeat(60_000);
        for _ in 0..40 {
            log.push(key(&big));
        }
        for i in 0..20_000 {
            log.push(key(&i.to_string()));
        }
        let mut buf = BytesMut::new();
        log.fill(0, &mut buf, usize::MAX).expect("fill");
        let got = sent(&mut buf);
        assert_eq!(got.len(), 20_040);
        assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    }

    #[test]
    fn the_ring_is_bounded_in_bytes_too() {
        let mut log = OutLog::new(7, 1, 1000, 10_000);
        let big = "x".repeat(3000);
        for _ in 0..10 {
            log.push(key(&big));
        }
        assert_eq!(log.held(), 3, "three 3 KB keys fit in 10 KB");
        log.connected(0, nothing(), 1);
        let got = drain(&mut log, 0);
        assert_eq!(got[0], (7, Item::Flush), "a flush stands in for the rest");
    }

    #[test]
    fn no_peers_keeps_nothing() {
        let mut log = OutLog::new(7, 0, 10, usize::MAX);
        for _ in 0..100 {
            log.push(key("a"));
        }
        assert_eq!(log.held(), 0);
        assert_eq!(log.last_seq(), 100);
    }
}
