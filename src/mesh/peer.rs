//! One peer's state behind one lock: what this node applied from it (its
//! [`OriginRecord`]) and the state of the two links with it. The methods
//! only decide; callers emit the events they return once the lock is
//! released, so no application code ever runs under it.

use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Dir;
use super::event::{Event, PeerId};
use super::inbound::{DuplicateIdentity, OriginRecord};
use crate::wire::Position;

/// A peer's links, as the runtime tracks them.
#[derive(Debug, Default)]
pub(crate) struct LinkState {
    pub outbound: bool,
    pub inbound: bool,
    /// The peer's incarnation on each link, as its hello said (meaningful
    /// while that link is up).
    pub outbound_incarnation: u64,
    pub inbound_incarnation: u64,
    pub last_heard: Option<Instant>,
    /// When the current inbound connection last carried a frame.
    pub inbound_heard: Option<Instant>,
    /// Generation of the current inbound connection; a newer connection
    /// from the same peer supersedes the older one.
    pub inbound_gen: u64,
    pub inbound_cancel: Option<CancellationToken>,
    /// Whether the outbound link was ever up (to count reconnects).
    pub ever_connected: bool,
    /// Why the outbound link last failed, until it is up again.
    pub last_error: Option<String>,
}

/// "Both links up" changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Up,
    Down,
}

/// One peer's state.
#[derive(Debug)]
pub(crate) struct PeerState {
    pub origin: OriginRecord,
    pub link: LinkState,
}

impl PeerState {
    pub(crate) fn new(id: PeerId) -> Self {
        PeerState {
            origin: OriginRecord::new(id),
            link: LinkState::default(),
        }
    }

    /// A link goes up or down. For the inbound link, `generation` names the
    /// connection: an older one ending, or coming up late, cannot overwrite
    /// what a newer one set (`None` is returned: nothing applied). Otherwise
    /// returns the transition of "both links up", if this made one.
    pub(crate) fn set_link(
        &mut self,
        dir: Dir,
        generation: Option<u64>,
        up: bool,
        now: Instant,
    ) -> Option<Option<Transition>> {
        let l = &mut self.link;
        if generation.is_some_and(|g| g != l.inbound_gen) {
            return None;
        }
        if generation.is_some() && !up {
            l.inbound_cancel = None;
        }
        let was = l.outbound && l.inbound;
        match dir {
            Dir::Out => l.outbound = up,
            Dir::In => l.inbound = up,
        }
        if up {
            l.last_heard = Some(now);
        }
        let is = l.outbound && l.inbound;
        Some(match (was, is) {
            (false, true) => Some(Transition::Up),
            (true, false) => Some(Transition::Down),
            _ => None,
        })
    }

    /// A hello from the peer (either direction) announces `incarnation`:
    /// notices restarts (a flush into `events` when one was not clean) and
    /// refuses another incarnation while the current one has a link up.
    pub(crate) fn hello(
        &mut self,
        incarnation: u64,
        events: &mut Vec<Event>,
    ) -> Result<(), DuplicateIdentity> {
        let l = &self.link;
        let live: Vec<u64> = [
            l.inbound.then_some(l.inbound_incarnation),
            l.outbound.then_some(l.outbound_incarnation),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.origin
            .hello(incarnation, &live, &mut |e| events.push(e))
            .map(|_| ())
    }

    /// Something was heard from the peer on the link in direction `dir`.
    pub(crate) fn heard(&mut self, dir: Dir, now: Instant) {
        self.link.last_heard = Some(now);
        if dir == Dir::In {
            self.link.inbound_heard = Some(now);
        }
    }

    /// How long ago the current inbound link of `incarnation` was heard,
    /// if it is up and was heard within `within`: an unproven connection
    /// claiming that incarnation must not take its place.
    pub(crate) fn live_inbound(
        &self,
        incarnation: u64,
        within: Duration,
        now: Instant,
    ) -> Option<Duration> {
        let l = &self.link;
        let ago = now.saturating_duration_since(l.inbound_heard?);
        (l.inbound && l.inbound_incarnation == incarnation && ago < within).then_some(ago)
    }

    /// A new inbound connection of `incarnation` takes over: the older one
    /// is cancelled. Returns the new connection's generation.
    pub(crate) fn inbound_takes_over(
        &mut self,
        incarnation: u64,
        token: CancellationToken,
        now: Instant,
    ) -> u64 {
        let l = &mut self.link;
        if let Some(old) = l.inbound_cancel.replace(token) {
            old.cancel();
        }
        l.inbound_gen += 1;
        l.inbound_incarnation = incarnation;
        l.inbound_heard = Some(now);
        l.inbound_gen
    }

    /// What was applied from the peer (for hellos and the status).
    pub(crate) fn applied(&self) -> Option<Position> {
        self.origin.applied()
    }

    /// What a `Resume` to the peer says (position and fingerprint).
    pub(crate) fn resume(&self) -> crate::wire::Resume {
        self.origin.resume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn both_links_make_up_and_either_makes_down() {
        let mut p = PeerState::new(Arc::from("a:1"));
        let now = Instant::now();
        assert_eq!(p.set_link(Dir::Out, None, true, now), Some(None));
        let g = p.inbound_takes_over(5, CancellationToken::new(), now);
        assert_eq!(
            p.set_link(Dir::In, Some(g), true, now),
            Some(Some(Transition::Up))
        );
        // A superseded connection ending changes nothing.
        assert_eq!(p.set_link(Dir::In, Some(g - 1), false, now), None);
        assert_eq!(
            p.set_link(Dir::Out, None, false, now),
            Some(Some(Transition::Down))
        );
    }

    #[test]
    fn an_inbound_link_is_live_while_heard_lately() {
        let mut p = PeerState::new(Arc::from("a:1"));
        let t0 = Instant::now();
        let g = p.inbound_takes_over(5, CancellationToken::new(), t0);
        p.set_link(Dir::In, Some(g), true, t0);
        let two = Duration::from_secs(2);
        assert!(
            p.live_inbound(5, two, t0 + Duration::from_secs(1))
                .is_some()
        );
        assert!(p.live_inbound(6, two, t0).is_none(), "another incarnation");
        assert!(p.live_inbound(5, two, t0 + two).is_none(), "silent");
        p.heard(Dir::In, t0 + two);
        assert!(p.live_inbound(5, two, t0 + two).is_some());
        p.heard(Dir::Out, t0 + two * 3);
        assert!(
            p.live_inbound(5, two, t0 + two * 3).is_none(),
            "the outbound link does not count"
        );
    }

    #[test]
    fn the_old_connection_is_cancelled_when_a_new_one_takes_over() {
        let mut p = PeerState::new(Arc::from("a:1"));
        let now = Instant::now();
        let old = CancellationToken::new();
        p.inbound_takes_over(5, old.clone(), now);
        p.inbound_takes_over(5, CancellationToken::new(), now);
        assert!(old.is_cancelled());
    }
}
