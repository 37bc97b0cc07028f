//! News about peers this node's gate does not admit yet, kept for a moment.
//!
//! A device that just enrolled is announced by the members whose gates learned it first (the
//! raft members it joined through), before every other node's gate has: their copies of its
//! alive notice are dropped, since the member table holds enrolled nodes only. Instead of
//! waiting for the news to come round again (a piggybacked copy or its own probe, seconds
//! later), a node keeps the newcomer's own signed news here, hints the node to refresh its
//! gate now, and replays the news once the gate admits the newcomer.
//!
//! ```text
//!   news from a member about a peer the gate does not admit ──▶ keep (own news only)
//!        └─▶ hint: Event::NotEnrolled (within a budget) ──▶ node refreshes its gate
//!   gate changed (recheck) ──▶ take the kept news of peers it admits now ──▶ membership
//! ```
//!
//! Only a peer's own news is kept (its alive, leave and capacity notices, which only its key
//! signs), and only once its signature verified (the caller's job); at most [`MAX_UNVETTED`]
//! updates for at most [`UNVETTED_TTL`], and at most [`MAX_PER_RELAYER`] from one relayer, so
//! one member cannot push a real newcomer's news out. News about made-up peers, which a
//! malicious member can sign at will, is never admitted and ages out. The hints it can cause
//! are budgeted for the node as a whole ([`HINT_BURST`], then one per [`HINT_REFILL`]), and
//! each costs the node one request for the enrolled list (no follow-ups: see the
//! gatekeeper); past the budget a join falls back to the gate's own refresh.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::budget::Budgets;
use crate::membership::{Update, UpdateKind};

/// Updates kept at most: a few joins at once (an alive notice and a capacity summary each);
/// past it the oldest goes first.
pub(super) const MAX_UNVETTED: usize = 64;
/// Updates kept from one relayer at most: a member relays a joiner's alive notice and
/// capacity, a few joiners at once.
pub(super) const MAX_PER_RELAYER: usize = 8;
/// How long an update is kept: past it, the gate's own refresh (every 2 s on nodes that are
/// not raft members) has long had the chance to admit its peer.
pub(super) const UNVETTED_TTL: Duration = Duration::from_secs(10);
/// Hints at once: a few devices joining together are each let in at once.
pub(super) const HINT_BURST: u64 = 4;
/// One more hint per this interval once the burst is spent: a member announcing made-up
/// peers costs each node one enrolled-list request per second at most.
pub(super) const HINT_REFILL: Duration = Duration::from_secs(1);

/// The kept news (when, from which relayer), and the budget of hints.
pub(super) struct Unvetted {
    held: VecDeque<(Instant, PeerId, Update<PeerId>)>,
    hints: Budgets<()>,
}

impl Default for Unvetted {
    fn default() -> Self {
        let burst = u32::try_from(HINT_BURST).unwrap_or(u32::MAX);
        Unvetted {
            held: VecDeque::new(),
            hints: Budgets::new(HINT_BURST, HINT_REFILL.saturating_mul(burst), 1),
        }
    }
}

impl Unvetted {
    /// Whether `u` is news this keeps: its subject's own (which only its key signs).
    pub(super) fn keeps(u: &Update<PeerId>) -> bool {
        u.author() == &u.id
            && matches!(u.kind, UpdateKind::Alive | UpdateKind::Left | UpdateKind::Capacity { .. })
    }

    /// Keeps `u` (verified news about a peer the gate does not admit, relayed by member
    /// `from`), if it is that peer's own news and `from` has room; returns whether to hint
    /// the node to refresh its gate now.
    pub(super) fn keep(&mut self, u: Update<PeerId>, from: PeerId, now: Instant) -> bool {
        self.expire(now);
        if !Self::keeps(&u) || self.held.iter().any(|(_, _, h)| *h == u) {
            return false;
        }
        if self.held.iter().filter(|(_, f, _)| *f == from).count() >= MAX_PER_RELAYER {
            return false;
        }
        if self.held.len() >= MAX_UNVETTED {
            self.held.pop_front();
        }
        self.held.push_back((now, from, u));
        if self.hints.available(&(), now) == 0 {
            return false;
        }
        self.hints.spend((), 1, now);
        true
    }

    /// Takes the kept news of the peers `admits` lets in now.
    pub(super) fn take_admitted(
        &mut self,
        admits: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> Vec<Update<PeerId>> {
        self.expire(now);
        let mut taken = Vec::new();
        self.held.retain(|(_, _, u)| {
            if admits(&u.id) {
                taken.push(u.clone());
                false
            } else {
                true
            }
        });
        taken
    }

    fn expire(&mut self, now: Instant) {
        while self
            .held
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= UNVETTED_TTL)
        {
            self.held.pop_front();
        }
    }

    /// Updates kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use libp2p::identity::Keypair;

    use super::*;
    use crate::identity::KeySeal;

    fn alive(key: &Keypair, incarnation: u32) -> Update<PeerId> {
        let id = key.public().to_peer_id();
        Update::signed(id, incarnation, UpdateKind::Alive, &KeySeal::new(key.clone()))
    }

    #[test]
    fn own_news_is_kept_until_admitted_and_hints_are_budgeted() {
        let now = Instant::now();
        let mut u = Unvetted::default();
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let relayers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        assert!(u.keep(alive(&a, 0), relayers[0], now), "the first news hints");
        assert!(!u.keep(alive(&a, 0), relayers[1], now), "a copy is not kept twice");
        assert_eq!(u.len(), 1);
        // Bad news about it, by someone else: not its own, not kept.
        let suspect = Update::signed(
            a.public().to_peer_id(),
            0,
            UpdateKind::Suspect { by: b.public().to_peer_id(), witnesses: 1 },
            &KeySeal::new(b.clone()),
        );
        assert!(!u.keep(suspect, relayers[0], now));
        assert_eq!(u.len(), 1);
        // Hints within the node's budget, whoever relays.
        let hinted =
            (1..20u32).filter(|i| u.keep(alive(&b, *i), relayers[*i as usize % 4], now)).count();
        assert_eq!(hinted, usize::try_from(HINT_BURST).unwrap() - 1);
        assert!(u.keep(alive(&b, 100), relayers[0], now + HINT_REFILL), "one more per interval");
        // Taken once admitted; the rest stays until it ages out.
        let a_id = a.public().to_peer_id();
        let taken = u.take_admitted(|p| *p == a_id, now);
        assert_eq!(taken, vec![alive(&a, 0)]);
        assert!(u.take_admitted(|p| *p == a_id, now).is_empty());
        assert!(u.take_admitted(|_| true, now + UNVETTED_TTL * 2).is_empty(), "aged out");
    }

    #[test]
    fn one_relayer_cannot_push_the_others_news_out() {
        let now = Instant::now();
        let mut u = Unvetted::default();
        let (liar, honest) = (PeerId::random(), PeerId::random());
        let newcomer = Keypair::generate_ed25519();
        u.keep(alive(&newcomer, 0), honest, now);
        // Made-up peers, each signing its own news (anyone can make keys).
        for _ in 0..1000 {
            u.keep(alive(&Keypair::generate_ed25519(), 0), liar, now);
        }
        assert_eq!(u.len(), 1 + MAX_PER_RELAYER);
        let id = newcomer.public().to_peer_id();
        assert_eq!(u.take_admitted(|p| *p == id, now), vec![alive(&newcomer, 0)]);
        // Many relayers together stay within the whole bound.
        for _ in 0..1000 {
            u.keep(alive(&Keypair::generate_ed25519(), 0), PeerId::random(), now);
        }
        assert_eq!(u.len(), MAX_UNVETTED);
    }
}
