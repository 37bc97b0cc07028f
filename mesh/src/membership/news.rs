//! The member table: applying news about other members (`apply`, and the capacity
//! summaries), flooding what was learned first hand, saying what we believe about a
//! member, and forgetting the dead and departed after their retention time.

use std::time::Instant;

use cloudless_types::Capacity;
use rand::Rng;

use super::{
    Event, Id, Member, MemberView, Membership, Output, State, Suspicion, Update, UpdateKind,
};

impl<I: Id> Membership<I> {
    pub(super) fn liveness_update(&self, id: &I) -> Option<Update<I>> {
        let m = self.members.get(id)?;
        let kind = match m.state {
            State::Suspect => {
                let s = self.suspicions.get(id)?;
                UpdateKind::Suspect {
                    by: s.suspectors.first()?.clone(),
                    witnesses: u8::try_from(s.witnesses).unwrap_or(u8::MAX),
                }
            }
            other => liveness_kind(other, &self.me),
        };
        Some(Update { id: id.clone(), incarnation: m.incarnation, kind })
    }

    /// Applies one update; returns whether it changed this node's view.
    pub(super) fn apply(&mut self, u: Update<I>, via: Via, now: Instant) -> bool {
        if u.id == self.me {
            self.about_me(u);
            return false;
        }
        if let UpdateKind::Capacity { version, capacity } = u.kind {
            return self.apply_capacity(u.id, u.incarnation, version, capacity);
        }
        let existing = self.members.get(&u.id).map(|m| (m.state, m.incarnation));
        // What a member says about itself outranks anyone's word; a third party may move a
        // member's incarnation by one step at most (a refutation it relays), so nobody can
        // push it to `u32::MAX`, where the member could no longer refute anything.
        let own = via.is_own_word();
        let step = |inc: u32| own || u.incarnation <= inc.saturating_add(1);
        let accept = match (&u.kind, existing) {
            (UpdateKind::Alive, None) => true,
            (UpdateKind::Alive, Some((_, inc))) => u.incarnation > inc && step(inc),
            // Bad news about a stranger is ignored (it may be about a member we already
            // forgot), except in the member list a joiner receives.
            (UpdateKind::Suspect { .. } | UpdateKind::Dead | UpdateKind::Left, None) => {
                via == Via::Sync
            }
            (UpdateKind::Suspect { .. }, Some((state, inc))) => {
                step(inc)
                    && (u.incarnation > inc || (u.incarnation == inc && state == State::Alive))
            }
            (UpdateKind::Dead, Some((state, inc))) => {
                step(inc)
                    && (u.incarnation > inc
                        || (u.incarnation == inc && matches!(state, State::Alive | State::Suspect)))
            }
            // Only a member can say it left (its rescheduling skips the grace a death gets),
            // or the member list a joiner receives.
            (UpdateKind::Left, Some((state, inc))) => {
                (own || via == Via::Sync) && u.incarnation >= inc && state != State::Left
            }
            (UpdateKind::Capacity { .. }, _) => false,
        };
        if !accept {
            // A further independent suspicion of an existing suspect shortens its timer.
            if let (UpdateKind::Suspect { by, witnesses }, Some((State::Suspect, inc))) =
                (&u.kind, existing)
                && inc == u.incarnation
            {
                self.confirm(&u.id, by.clone(), u32::from(*witnesses), now);
            }
            return false;
        }
        if existing.is_none() && self.members.len() >= self.config.max_members {
            return false;
        }
        let previous = existing.map(|(s, _)| s);
        let state = match &u.kind {
            UpdateKind::Alive => State::Alive,
            UpdateKind::Suspect { .. } => State::Suspect,
            UpdateKind::Dead => State::Dead,
            UpdateKind::Left => State::Left,
            UpdateKind::Capacity { .. } => return false,
        };
        let was_live = matches!(previous, Some(State::Alive | State::Suspect));
        let is_live = matches!(state, State::Alive | State::Suspect);
        match self.members.get_mut(&u.id) {
            Some(m) => {
                m.state = state;
                m.incarnation = u.incarnation;
            }
            None => {
                self.members.insert(
                    u.id.clone(),
                    Member { state, incarnation: u.incarnation, capacity: None },
                );
                // Put it at a random position so new members are probed soon, but not by
                // everyone at once (memberlist does the same). A swap keeps this O(1).
                self.probe_order.push(u.id.clone());
                let last = self.probe_order.len() - 1;
                let pos = self.rng.gen_range(0..=last);
                self.probe_order.swap(pos, last);
            }
        }
        match (was_live, is_live) {
            (false, true) => self.alive_count += 1,
            (true, false) => self.alive_count -= 1,
            _ => {}
        }
        match state {
            State::Suspect => {
                let (by, witnesses) = match &u.kind {
                    UpdateKind::Suspect { by, witnesses } => (by.clone(), u32::from(*witnesses)),
                    _ => (self.me.clone(), 1),
                };
                let timeout = self.suspicion_timeout(witnesses.saturating_sub(1));
                self.suspicions.insert(
                    u.id.clone(),
                    Suspicion {
                        incarnation: u.incarnation,
                        started: now,
                        deadline: now + timeout,
                        suspectors: vec![by],
                        witnesses,
                    },
                );
                self.gone.remove(&u.id);
            }
            State::Alive => {
                self.suspicions.remove(&u.id);
                self.gone.remove(&u.id);
            }
            State::Dead | State::Left => {
                self.suspicions.remove(&u.id);
                self.gone.insert(u.id.clone(), now);
            }
        }
        self.out.push(Output::Event(Event::State {
            id: u.id.clone(),
            previous,
            state,
            incarnation: u.incarnation,
        }));
        // A member that appeared or came back and told us point to point (a joiner's first
        // contact, a dead member answering a reconnect probe): nobody else will flood it, so
        // we do (see the module docs). Everything else learned point to point is a late copy
        // of a flood, left to piggybacking.
        if via == Via::FirstHand && state == State::Alive && !was_live {
            self.firsthand = Some(u.id.clone());
        }
        // A member list sent to a joiner is old news for everyone else.
        if via != Via::Sync {
            self.enqueue(u);
        }
        true
    }

    /// Floods a member's own alive news (with its capacity) learned first hand in this message.
    pub(super) fn flood_firsthand(&mut self) {
        let Some(id) = self.firsthand.take() else {
            return;
        };
        let Some(m) = self.members.get(&id) else {
            return;
        };
        let mut updates =
            vec![Update { id: id.clone(), incarnation: m.incarnation, kind: UpdateKind::Alive }];
        if let Some((incarnation, version, capacity)) = m.capacity {
            updates.push(Update {
                id,
                incarnation,
                kind: UpdateKind::Capacity { version, capacity },
            });
        }
        self.out.push(Output::Broadcast(updates));
    }

    fn apply_capacity(
        &mut self,
        id: I,
        incarnation: u32,
        version: u32,
        capacity: Capacity,
    ) -> bool {
        if capacity.validate().is_err() {
            return false;
        }
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        let newer = m.capacity.is_none_or(|(inc, v, _)| (incarnation, version) > (inc, v));
        if !newer {
            return false;
        }
        let changed = m.capacity.is_none_or(|(_, _, c)| c != capacity);
        m.capacity = Some((incarnation, version, capacity));
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
        for id in expired {
            self.gone.remove(&id);
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
    /// Learned from a flood published by the member the news is about.
    OwnFlood,
    /// Learned from the member list sent to us as a joiner.
    Sync,
}

impl Via {
    /// Whether the news is the member's own word (or ours about ourselves).
    fn is_own_word(self) -> bool {
        matches!(self, Via::Local | Via::FirstHand | Via::Implied | Via::OwnFlood)
    }
}

pub(super) fn liveness_kind<I: Clone>(state: State, me: &I) -> UpdateKind<I> {
    match state {
        State::Alive => UpdateKind::Alive,
        // Only reached without a suspicion record; the news is then ours to vouch for.
        State::Suspect => UpdateKind::Suspect { by: me.clone(), witnesses: 1 },
        State::Dead => UpdateKind::Dead,
        State::Left => UpdateKind::Left,
    }
}

pub(super) fn view<I: Clone>(id: &I, m: &Member) -> MemberView<I> {
    MemberView {
        id: id.clone(),
        state: m.state,
        incarnation: m.incarnation,
        capacity: m.capacity.map(|(_, _, c)| c),
    }
}
