//! Suspicion (Lifeguard): the timers that turn a suspect into a dead member, the independent
//! confirmations that shorten them, and this node's refutation of bad news about itself.

use std::time::{Duration, Instant};

use super::{
    Id, Membership, Message, Output, Said, State, Summary, Update, UpdateKind, Via, encoded_len,
};
use crate::budget::Budgets;

/// Refuted suspicions a member may author in a burst before its bad news is ignored. SWIM
/// cannot prove a probe failed, so any member may suspect any other; an honest one is
/// refuted rarely (only after a lossy moment: the simulator's run of 1,000 nodes at 5 % loss
/// for 120 s reports the same with this budget as without), one that lies always is.
pub(super) const BLAME_BURST: u32 = 4;
/// Past the burst, one refuted suspicion per this interval: a member that suspects others
/// without cause costs the pool one refutation flood per 10 s instead of five a second.
pub(super) const BLAME_REFILL: Duration = Duration::from_secs(10);
/// Budgets of [`BLAME_BURST`] refuted suspicions, one more per [`BLAME_REFILL`], for at most
/// `max` members (members only are ever charged: the table bounds them).
pub(super) fn blame_budgets<K: Ord + Clone>(max: usize) -> Budgets<K> {
    Budgets::new(u64::from(BLAME_BURST), BLAME_REFILL.saturating_mul(BLAME_BURST), max)
}

/// A suspect has at least this many of its probe waits ([`Membership::ack_wait`]) to refute:
/// the suspicion reaches it in one hop and its refutation floods back in a few. A member on a
/// slow link, or not measured yet, keeps 600 ms (three 200 ms waits); a LAN member gets the
/// configured `suspicion_min`.
const SUSPICION_PER_WAIT: u32 = 3;

/// Accusers one refutation charges at most (honest bad news about a node comes from one
/// prober, or a few at once).
const MAX_ACCUSERS: usize = 8;

#[derive(Clone, Debug)]
pub(super) struct Suspicion<I> {
    pub(super) incarnation: u32,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    /// Distinct suspecting nodes, bounded by `indirect_checks + 1`.
    pub(super) suspectors: Vec<I>,
    /// Highest witness count reported with one suspicion.
    pub(super) witnesses: u32,
}

impl<I: Id> Membership<I> {
    /// How long `target` stays suspect with `confirmations` beyond the first suspector:
    /// from `suspicion_max` down to its shortest (the configured `suspicion_min`, or
    /// [`SUSPICION_PER_WAIT`] probe waits of the target if longer) as confirmations come in.
    pub(super) fn suspicion_timeout(&self, target: &I, confirmations: u32) -> Duration {
        // Witnesses to expect: the configured number, but no more than the members that could
        // confirm (everyone but the suspect and the suspector). Like memberlist, a pool too
        // small to confirm anything uses the short timeout at once: otherwise a three-node
        // pool would always wait the longest.
        // Counting stops as soon as there are enough, so a large pool pays a few steps.
        let enough = self.config.indirect_checks.saturating_add(2);
        let others = self
            .members
            .values()
            .filter(|m| matches!(m.state, State::Alive | State::Suspect))
            .take(enough)
            .count()
            .saturating_sub(2);
        let k = u32::try_from(self.config.indirect_checks.min(others)).unwrap_or(u32::MAX);
        let max = self.config.suspicion_max;
        let min =
            self.config.suspicion_min.max(self.ack_wait(target) * SUSPICION_PER_WAIT).min(max);
        if k == 0 {
            return min;
        }
        let c = confirmations.min(k);
        let frac = f64::from(c + 1).ln() / f64::from(k + 1).ln();
        max.saturating_sub((max - min).mul_f64(frac)).max(min)
    }

    /// Suspects `target` at `incarnation` (the one its probe was about), if that is still
    /// the member's and it is alive; or, if others suspect it already, confirms their
    /// suspicion as one more independent suspector (as memberlist does), which shortens
    /// everyone's timer.
    pub(super) fn suspect(&mut self, target: I, incarnation: u32, witnesses: u8, now: Instant) {
        let Some(m) = self.members.get(&target) else {
            return;
        };
        if m.incarnation != incarnation {
            return;
        }
        if m.state == State::Suspect {
            self.confirm_own(target, incarnation, witnesses, now);
            return;
        }
        if m.state != State::Alive {
            return;
        }
        let update = Update::signed(
            target.clone(),
            m.incarnation,
            UpdateKind::Suspect { by: self.me.clone(), witnesses },
            &*self.seal,
        );
        if self.apply(update.clone(), Via::Local, now) {
            self.out.push(Output::Broadcast(vec![update.clone()]));
            // Buddy system: tell the suspect at once so that it can refute.
            let seq = self.next_seq();
            let mut updates = vec![update];
            updates.extend(self.piggyback(&target, self.config.piggyback_bytes / 2));
            self.send(target, Message::Ping { seq, incarnation: self.incarnation, updates });
        }
    }

    /// This node's own failed probe of a member others suspect: counted as a confirmation and
    /// flooded once, so the others count it too, while the suspicion is short of its full
    /// confirmations (a confirmed one is at its shortest timer already, and a large pool would
    /// flood a confirmation from every member probing the suspect meanwhile).
    fn confirm_own(&mut self, target: I, incarnation: u32, witnesses: u8, now: Instant) {
        let Some(s) = self.suspicions.get(&target) else {
            return;
        };
        // A suspicion already at its shortest (every helper confirmed it) gains nothing.
        let k = u32::try_from(self.config.indirect_checks).unwrap_or(u32::MAX);
        let independent = u32::try_from(s.suspectors.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let confirmed = independent.max(s.witnesses.saturating_sub(1)) >= k;
        let stronger = u32::from(witnesses) > s.witnesses;
        let new =
            !s.suspectors.contains(&self.me) && s.suspectors.len() <= self.config.indirect_checks;
        if s.incarnation != incarnation || confirmed || !(stronger || new) {
            return;
        }
        self.confirm(&target, self.me.clone(), u32::from(witnesses), now);
        let update = Update::signed(
            target,
            incarnation,
            UpdateKind::Suspect { by: self.me.clone(), witnesses },
            &*self.seal,
        );
        self.out.push(Output::Broadcast(vec![update]));
    }

    pub(super) fn expire_suspicions(&mut self, now: Instant) {
        let due: Vec<I> = self
            .suspicions
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(s) = self.suspicions.remove(&id) else {
                continue;
            };
            // Not flooded: every node that got the suspicion runs the same timer; the rare one
            // that missed it learns from piggybacking.
            let dead = UpdateKind::Dead { by: self.me.clone() };
            let update = Update::signed(id.clone(), s.incarnation, dead, &*self.seal);
            self.apply(update, Via::Local, now);
        }
    }

    pub(super) fn confirm(&mut self, id: &I, by: I, witnesses: u32, now: Instant) {
        let k = self.config.indirect_checks + 1;
        let Some(s) = self.suspicions.get_mut(id) else {
            return;
        };
        let mut changed = false;
        if !s.suspectors.contains(&by) && s.suspectors.len() < k {
            s.suspectors.push(by);
            changed = true;
        }
        if witnesses > s.witnesses {
            s.witnesses = witnesses;
            changed = true;
        }
        if !changed {
            return;
        }
        let independent = u32::try_from(s.suspectors.len() - 1).unwrap_or(u32::MAX);
        let confirmations = independent.max(s.witnesses.saturating_sub(1));
        let started = s.started;
        let deadline = started + self.suspicion_timeout(id, confirmations);
        if let Some(s) = self.suspicions.get_mut(id) {
            s.deadline = s.deadline.min(deadline.max(now));
        }
    }

    /// News about this node. Its own news (alive, left, capacity) counts only with its own
    /// signature: someone holding a newer one than we know means we restarted, and we jump
    /// past it at once. Bad news at our incarnation, or one above (which others accept as
    /// overtaking our alive notice), is refuted above the highest such incarnation once the
    /// input is done; bad news higher than that is nothing an honest node can hold, and a
    /// forged notice at `u32::MAX` cannot use up our incarnations.
    pub(super) fn about_me(&mut self, u: Update<I>) {
        if self.leaving {
            return;
        }
        let own = match u.kind {
            UpdateKind::Alive => u.incarnation > self.incarnation,
            UpdateKind::Left => u.incarnation >= self.incarnation,
            UpdateKind::Capacity { version, .. } => {
                (u.incarnation, version) > (self.incarnation, self.capacity_version)
            }
            UpdateKind::Suspect { .. } | UpdateKind::Dead { .. } => {
                let fresh = u.incarnation >= self.incarnation
                    && u.incarnation <= self.incarnation.saturating_add(1)
                    && self.refute_above.is_none_or(|at| u.incarnation > at);
                // Refuted even from a blamed accuser: what others believe of us is not ours
                // to know (a node that does not blame it yet may hold it), and a node that
                // is not refuted declares us dead. Checked once per incarnation it could
                // name: copies cost no signature check.
                if fresh && self.signed_by_author(&u) {
                    self.refute_above = Some(u.incarnation);
                    if self.accusers.len() < MAX_ACCUSERS && !self.accusers.contains(u.author()) {
                        self.accusers.push(u.author().clone());
                    }
                }
                return;
            }
        };
        if own && self.signed_by_author(&u) {
            self.incarnation = u.incarnation.saturating_add(1).max(self.incarnation);
            self.refute();
        }
    }

    /// Refutes the bad news about this node heard since the last refutation, once, and at
    /// most once per probe interval. The new incarnation is two above ours whatever the news
    /// named: bad news one above ours may already be held by others (it overtakes our alive
    /// notice there), and an alive notice only one above would tie with it and lose.
    pub(super) fn refute_if_told(&mut self, now: Instant) {
        let Some(at) = self.refute_above else {
            return;
        };
        if self.last_refute.is_some_and(|t| now < t + self.config.probe_interval) {
            return;
        }
        self.refute_above = None;
        let accusers = std::mem::take(&mut self.accusers);
        if self.leaving || at < self.incarnation {
            return;
        }
        self.last_refute = Some(now);
        // Charged as every other node charges them when it sees this refutation.
        let me = self.me.clone();
        for by in accusers {
            self.charge(by, &me, now);
        }
        // Lifeguard: being suspected hints that we are the slow one.
        self.local_health = (self.local_health + 1).min(self.config.max_local_health);
        self.incarnation = self.incarnation.saturating_add(2);
        self.refute();
    }

    /// Whether `author`'s bad news is ignored now: more of its suspicions were refuted than
    /// [`BLAME_BURST`] and one per [`BLAME_REFILL`] allow.
    pub fn blamed(&self, author: &I, now: Instant) -> bool {
        self.blame.available(author, now) == 0
    }

    /// Whether `u` is bad news whose author is not believed now, about anyone or about this
    /// suspect (a flood of it is dropped and not forwarded, so it spreads no further than the
    /// nodes that do not blame it yet).
    pub(super) fn distrusted(&self, u: &Update<I>, now: Instant) -> bool {
        !u.kind.is_good_news()
            && (self.blamed(u.author(), now)
                || self.pair_blame.available(&(u.author().clone(), u.id.clone()), now) == 0)
    }

    /// Whether `updates` hold bad news from a blamed author (see `distrusted`).
    pub fn holds_blamed_news(&self, updates: &[Update<I>], now: Instant) -> bool {
        updates.iter().any(|u| self.distrusted(u, now))
    }

    /// Charges `author` for one refuted suspicion of `suspect`: always for the pair, and for
    /// the author as a whole unless it was last charged for the same suspect (a member that
    /// fails probes on purpose, or a lossy phone, and then refutes would otherwise get every
    /// honest prober of it blamed for everything).
    pub(super) fn charge(&mut self, author: I, suspect: &I, now: Instant) {
        if author == self.me {
            return;
        }
        self.pair_blame.spend((author.clone(), suspect.clone()), 1, now);
        if self.blame.holds(&author) && self.blamed_for.get(&author) == Some(suspect) {
            return;
        }
        self.blame.spend(author.clone(), 1, now);
        self.blamed_for.insert(author, suspect.clone());
    }

    fn refute(&mut self) {
        let alive =
            Update::signed(self.me.clone(), self.incarnation, UpdateKind::Alive, &*self.seal);
        self.capacity_version = 0;
        self.announced.0 = self.capacity;
        let summary = Update::signed(
            self.me.clone(),
            self.incarnation,
            UpdateKind::Capacity { version: 0, capacity: self.capacity },
            &*self.seal,
        );
        self.capacity_bytes = encoded_len(&summary);
        if let Some(m) = self.members.get_mut(&self.me) {
            m.incarnation = self.incarnation;
            m.vouched = self.incarnation;
            m.state = State::Alive;
            m.own = Said::of(&alive);
            m.capacity = Summary::of(&summary);
        }
        let updates = vec![alive, summary];
        self.out.push(Output::Broadcast(updates.clone()));
        for u in updates {
            self.enqueue(u, false);
        }
    }
}
