//! The member table: applying news about other members (`apply`, and the capacity
//! summaries), flooding what was learned first hand, saying what we believe about a
//! member, and forgetting the dead and departed after their retention time.

use std::time::Instant;

use rand::Rng;

use super::{
    Event, Id, Liveness, Member, MemberView, Membership, Output, Said, State, Summary, Suspicion,
    Update, UpdateKind, summary,
};

/// Members that probe the suspect of a weak suspicion (one that not every helper confirmed) out
/// of turn, in expectation, whatever the pool's size: enough for the indirect checks' worth of
/// independent confirmations (four) with room for their own losses, and a burst of about a
/// dozen probes rather than one per member in a large pool.
const CONFIRMERS: usize = 6;

impl<I: Id> Membership<I> {
    /// The signed news we hold for a member's current liveness, to relay or to show it: its
    /// own while alive or left, the bad news about it while suspect or dead.
    pub(super) fn liveness_update(&self, id: &I) -> Option<Update<I>> {
        let m = self.members.get(id)?;
        match m.state {
            State::Alive | State::Left => m.own_update(id),
            State::Suspect | State::Dead => self.notices.get(id).map(|n| n.update(id)),
        }
    }

    /// Whether `u` carries its author's signature. A forgery ends the input it came in: an
    /// honest node sends none, so the rest of that message is not worth a check each.
    pub(super) fn signed_by_author(&mut self, u: &Update<I>) -> bool {
        let ok = u.verify(&*self.seal);
        self.forged |= !ok;
        ok
    }

    /// Applies one signed update; returns whether it changed this node's view. The signature
    /// is checked only for news that would change it (most news is a copy of what we hold),
    /// and nothing more of an input is applied once it held a forgery.
    pub(super) fn apply(&mut self, u: Update<I>, via: Via, now: Instant) -> bool {
        if self.forged {
            return false;
        }
        if u.id == self.me {
            self.about_me(u);
            return false;
        }
        if matches!(u.kind, UpdateKind::Capacity { .. }) {
            return self.apply_capacity(u);
        }
        if u.author() == &u.id && !u.kind.is_good_news() {
            // Bad news signed by its own subject: nothing an honest node sends.
            return false;
        }
        if !matches!(via, Via::Local | Via::Sync) && self.distrusted(&u, now) {
            // Its suspicions were refuted too often: it waits for its budget (see `blamed`).
            return false;
        }
        let existing = self.members.get(&u.id).map(|m| Held {
            state: m.state,
            incarnation: m.incarnation,
            vouched: m.vouched,
        });
        let Some(state) = judge(&u, existing, via) else {
            self.apply_unjudged(&u, existing, now);
            return false;
        };
        // (Bad news past the bound of what the member vouched for is handled by
        // `apply_unjudged`: it probes the member.)
        if !self.signed_by_author(&u) {
            return false;
        }
        let (id, incarnation) = (u.id.clone(), u.incarnation);
        self.set_state(id, incarnation, state, Some(u), via, now)
    }

    /// News that does not change a member's state may still count: a further independent
    /// suspicion of a suspect shortens its timer, and the member's own signed alive notice at
    /// the incarnation we know only from its pings gives us something to relay.
    fn apply_unjudged(&mut self, u: &Update<I>, existing: Option<Held>, now: Instant) {
        let Some(held) = existing else {
            return;
        };
        let k = u32::try_from(self.config.indirect_checks).unwrap_or(u32::MAX);
        let witnesses = match u.kind {
            // No more than an honest prober can have: itself and the helpers it asked.
            UpdateKind::Suspect { witnesses, .. } => u32::from(witnesses).min(k.saturating_add(1)),
            _ => 1,
        };
        match &u.kind {
            UpdateKind::Suspect { .. } | UpdateKind::Dead { .. }
                if held.state == State::Suspect && held.incarnation == u.incarnation =>
            {
                // Copies of a suspicion we already counted cost no signature check.
                let counts = self.suspicions.get(&u.id).is_some_and(|s| {
                    witnesses > s.witnesses
                        || (!s.suspectors.contains(u.author())
                            && s.suspectors.len() <= self.config.indirect_checks)
                });
                if counts && self.signed_by_author(u) {
                    self.confirm(&u.id, u.author().clone(), witnesses, now);
                }
            }
            UpdateKind::Suspect { .. } | UpdateKind::Dead { .. }
                if matches!(held.state, State::Alive | State::Suspect)
                    && u.incarnation > held.vouched.saturating_add(1)
                    && u.incarnation > held.incarnation =>
            {
                // News of an incarnation the member never vouched for to us: we missed its
                // refutations, or the news is made up. A probe out of turn tells which (its
                // ack says where it is; silence makes our own suspicion).
                self.probe_out_of_turn(u.id.clone(), now);
            }
            UpdateKind::Alive
                if held.state == State::Alive && held.incarnation == u.incarnation =>
            {
                let stale = self
                    .members
                    .get(&u.id)
                    .is_some_and(|m| m.own.as_ref().is_none_or(|o| o.incarnation < u.incarnation));
                if stale
                    && self.signed_by_author(u)
                    && let Some(m) = self.members.get_mut(&u.id)
                {
                    m.own = Said::of(u);
                }
            }
            _ => {}
        }
    }

    /// A member's ping or ack says, unsigned, that it is alive at `incarnation`: the transport
    /// authenticated it, so we believe it, but there is nothing to relay.
    pub(super) fn implied_alive(&mut self, id: I, incarnation: u32, now: Instant) {
        if id == self.me {
            return;
        }
        let newer = self.members.get(&id).is_none_or(|m| incarnation > m.incarnation);
        if newer {
            self.set_state(id, incarnation, State::Alive, None, Via::Implied, now);
        }
    }

    /// Moves a member to `state` at `incarnation`, backed by `proof` (signed) when we hold it.
    fn set_state(
        &mut self,
        id: I,
        incarnation: u32,
        state: State,
        proof: Option<Update<I>>,
        via: Via,
        now: Instant,
    ) -> bool {
        let existing = self.members.get(&id).map(|m| m.state);
        if existing.is_none() && self.members.len() >= self.config.max_members {
            return false;
        }
        let previous = existing;
        let was_live = matches!(previous, Some(State::Alive | State::Suspect));
        let is_live = matches!(state, State::Alive | State::Suspect);
        // The member's own word (signed, or its ping) moves what it vouched for; bad news never.
        let own_word = proof.as_ref().is_none_or(|p| p.kind.is_good_news());
        let own = proof.as_ref().filter(|p| p.kind.is_good_news()).and_then(Said::of);
        match self.members.get_mut(&id) {
            Some(m) => {
                // A member that died or left is measured afresh when it comes back: its old
                // round trip may no longer be its path (a phone that changed networks). A
                // refutation keeps it: refutations are frequent, and a round trip that grew
                // is measured by the late acks (see `on_ack`).
                if matches!(state, State::Dead | State::Left) {
                    m.rtt.stale();
                }
                m.state = state;
                m.incarnation = incarnation;
                if own_word {
                    m.vouched = m.vouched.max(incarnation);
                    match own {
                        Some(o) => m.own = Some(o),
                        // Known only from its pings: an older alive notice of its own is still
                        // true news to relay, an older leave is not.
                        None => {
                            if m.own.as_ref().is_some_and(|o| o.kind != Liveness::Alive) {
                                m.own = None;
                            }
                        }
                    }
                }
            }
            None => {
                // Only the member's own word (or its ping) adds it: bad news about a
                // member we do not know is never taken (see `judge`).
                self.members.insert(
                    id.clone(),
                    Member {
                        state,
                        incarnation,
                        vouched: incarnation,
                        own,
                        capacity: None,
                        rtt: super::probing::Rtt::default(),
                    },
                );
                // Put it at a random position so new members are probed soon, but not by
                // everyone at once (memberlist does the same). A swap keeps this O(1).
                self.add_to_probe_order(id.clone());
            }
        }
        if previous == Some(State::Left) && is_live {
            // A reshuffle drops departed members from the probe order: put it back.
            if !self.probe_order.contains(&id) {
                self.add_to_probe_order(id.clone());
            }
        }
        match (was_live, is_live) {
            (false, true) => self.alive_count += 1,
            (true, false) => self.alive_count -= 1,
            _ => {}
        }
        match proof.as_ref().filter(|p| !p.kind.is_good_news()).and_then(Said::of) {
            Some(notice) => {
                self.notices.insert(id.clone(), notice);
            }
            None => {
                self.notices.remove(&id);
            }
        }
        match state {
            State::Suspect => {
                let k = u32::try_from(self.config.indirect_checks).unwrap_or(u32::MAX);
                let (by, witnesses) = match proof.as_ref().map(|p| &p.kind) {
                    // A suspector cannot have more witnesses than it asked helpers, plus itself.
                    Some(UpdateKind::Suspect { by, witnesses }) => {
                        (by.clone(), u32::from(*witnesses).min(k.saturating_add(1)))
                    }
                    Some(UpdateKind::Dead { by }) => (by.clone(), 1),
                    _ => (self.me.clone(), 1),
                };
                let timeout = self.suspicion_timeout(&id, witnesses.saturating_sub(1));
                let weak = by != self.me && witnesses <= k;
                self.suspicions.insert(
                    id.clone(),
                    Suspicion {
                        incarnation,
                        started: now,
                        deadline: now + timeout,
                        suspectors: vec![by],
                        witnesses,
                    },
                );
                self.gone.remove(&id);
                // Another member's suspicion that not every helper confirmed (a struggling
                // suspector, lost nacks): about CONFIRMERS members probe the suspect at once
                // instead of in turn, so that it is confirmed (or refuted by its ack) within a
                // probe rather than after everyone's next rounds, up to `suspicion_max`.
                let share = CONFIRMERS as f64 / self.alive_count.max(1) as f64;
                if weak && !self.leaving && self.rng.gen_bool(share.min(1.0)) {
                    self.probe_out_of_turn(id.clone(), now);
                }
            }
            State::Alive => {
                // A suspect that proved alive refuted its suspectors: they are charged.
                if let Some(refuted) = self.suspicions.remove(&id) {
                    for by in refuted.suspectors {
                        self.charge(by, &id, now);
                    }
                }
                self.gone.remove(&id);
            }
            State::Dead | State::Left => {
                self.suspicions.remove(&id);
                self.gone.insert(id.clone(), now);
            }
        }
        self.out.push(Output::Event(Event::State { id: id.clone(), previous, state, incarnation }));
        // A member that appeared or came back and told us point to point (a joiner's first
        // contact, a dead member answering a reconnect probe): nobody else will flood it, so
        // we do (see the module docs). Everything else learned point to point is a late copy
        // of a flood, left to piggybacking.
        if via == Via::FirstHand && state == State::Alive && !was_live {
            self.firsthand = Some(id);
        }
        // A member list sent to a joiner is old news for everyone else; unsigned news cannot
        // be relayed.
        if via != Via::Sync
            && let Some(p) = proof
        {
            self.enqueue(p, via == Via::Flood);
        }
        true
    }

    fn add_to_probe_order(&mut self, id: I) {
        self.probe_order.push(id);
        let last = self.probe_order.len() - 1;
        let pos = self.rng.gen_range(0..=last);
        self.probe_order.swap(pos, last);
    }

    /// Floods a member's own alive news (with its capacity) learned first hand in this message.
    pub(super) fn flood_firsthand(&mut self) {
        let Some(id) = self.firsthand.take() else {
            return;
        };
        let Some(m) = self.members.get(&id) else {
            return;
        };
        let updates: Vec<Update<I>> = m
            .own_update(&id)
            .filter(|p| p.kind == UpdateKind::Alive)
            .into_iter()
            .chain(m.capacity_update(&id))
            .collect();
        if !updates.is_empty() {
            self.out.push(Output::Broadcast(updates));
        }
    }

    /// A member's capacity summary: only its own, signed, and newer than the one we hold.
    fn apply_capacity(&mut self, u: Update<I>) -> bool {
        let Some((incarnation, version, capacity)) = summary(&u) else {
            return false;
        };
        if capacity.validate().is_err() {
            return false;
        }
        let Some(m) = self.members.get(&u.id) else {
            return false;
        };
        if incarnation < m.vouched {
            // A summary from an earlier life of the member: its current one supersedes it.
            return false;
        }
        let held = m.capacity.as_ref().map(|h| (h.incarnation, h.version, h.capacity));
        let newer = held.is_none_or(|(inc, v, _)| (incarnation, version) > (inc, v));
        if !newer || !self.signed_by_author(&u) {
            return false;
        }
        let changed = held.is_none_or(|(_, _, c)| c != capacity);
        let id = u.id.clone();
        if let Some(m) = self.members.get_mut(&id) {
            m.capacity = Summary::of(&u);
        }
        if changed {
            self.out.push(Output::Event(Event::Capacity { id, capacity }));
        }
        true
    }

    pub(super) fn reap(&mut self, now: Instant) {
        let expired: Vec<I> = self
            .gone
            .iter()
            .filter(|(id, since)| {
                let retention = match self.members.get(*id).map(|m| m.state) {
                    Some(State::Left) => self.config.left_retention,
                    _ => self.config.dead_retention,
                };
                now.saturating_duration_since(**since) >= retention
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.blame.prune(now);
        self.pair_blame.prune(now);
        self.synced.prune(now);
        let blame = &self.blame;
        self.blamed_for.retain(|author, _| blame.holds(author));
        for id in expired {
            self.gone.remove(&id);
            self.blame.forget(&id);
            self.blamed_for.remove(&id);
            self.synced.forget(&id);
            self.notices.remove(&id);
            self.members.remove(&id);
            self.queue.retain(|q| q.update.id != id);
            self.out.push(Output::Event(Event::Removed { id }));
        }
        if self.probe_order.len() > self.members.len() * 2 {
            self.probe_order.retain(|id| self.members.contains_key(id));
            self.probe_index = self.probe_index.min(self.probe_order.len());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Via {
    /// Decided by this node.
    Local,
    /// Learned point to point from the member the news is about.
    FirstHand,
    /// Learned point to point from a third party (piggyback).
    Direct,
    /// Implied by the sender's ping or ack: repairs our view, too weak to flood (the sender
    /// may simply not have been announced to us yet).
    Implied,
    /// Learned from a flood.
    Flood,
    /// Learned from the member list a peer we asked sent us as a joiner.
    Sync,
}

/// What this node holds about a member, for judging news about it.
#[derive(Clone, Copy, Debug)]
struct Held {
    state: State,
    incarnation: u32,
    vouched: u32,
}

/// What signed liveness news `u` does to a member held as `existing` (`None`: unknown), or
/// `None` when it changes nothing.
///
/// A member's own word (alive, left) counts at any incarnation above the one we hold. Bad
/// news is taken only about a member we know, only while it is live (it never revives the
/// dead or turns a departure into a death), and at most one incarnation above what the member
/// itself vouched for (it can overtake the alive notice it answers), so nobody can push a
/// member's incarnation out of its reach. A death notice from another node counts as that
/// node's suspicion, so the member still gets its time to refute; only our own timer, or the
/// member list a joiner asked for, declares a death.
fn judge<I>(u: &Update<I>, existing: Option<Held>, via: Via) -> Option<State> {
    let Some(held) = existing else {
        return match u.kind {
            UpdateKind::Alive => Some(State::Alive),
            // A departure of a member we never knew matters only to a joiner (late news of
            // it must not add it as alive); bad news about a stranger is never taken.
            UpdateKind::Left => (via == Via::Sync).then_some(State::Left),
            _ => None,
        };
    };
    let live = matches!(held.state, State::Alive | State::Suspect);
    let bounded = u.incarnation <= held.vouched.saturating_add(1);
    let suspicion = live
        && bounded
        && (u.incarnation > held.incarnation
            || (u.incarnation == held.incarnation && held.state == State::Alive));
    match u.kind {
        UpdateKind::Alive => (u.incarnation > held.incarnation).then_some(State::Alive),
        UpdateKind::Left => {
            (u.incarnation >= held.incarnation && held.state != State::Left).then_some(State::Left)
        }
        UpdateKind::Suspect { .. } => suspicion.then_some(State::Suspect),
        UpdateKind::Dead { .. } if via == Via::Local || via == Via::Sync => {
            (live && bounded && u.incarnation >= held.incarnation).then_some(State::Dead)
        }
        UpdateKind::Dead { .. } => suspicion.then_some(State::Suspect),
        UpdateKind::Capacity { .. } => None,
    }
}

pub(super) fn view<I: Clone>(id: &I, m: &Member<I>) -> MemberView<I> {
    MemberView {
        id: id.clone(),
        state: m.state,
        incarnation: m.incarnation,
        capacity: m.capacity.as_ref().map(|h| h.capacity),
    }
}
