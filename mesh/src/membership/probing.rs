//! Failure detection (SWIM): the round-robin probe loop, direct and indirect pings and their
//! acks and nacks, the ping requests this node relays for others, and the reconnect probes
//! of members held as dead.
//!
//! How long a probe waits follows the target's measured round trip ([`Rtt`], from the direct
//! acks of earlier probes): `srtt + 4·rttvar` clamped to `probe_timeout_min..=probe_timeout`,
//! then stretched by the local health multiplier. A ping request names the wait the asker
//! used, so the helpers' nacks come back before the asker's indirect phase ends (a helper
//! waits longer only when its own round trip to the target needs it). An ack counts only
//! from the member pinged or a helper asked.

use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;

use super::{Id, Membership, Message, State, Update};

/// Units of [`Rtt`]: 100 µs, so that a `u16` spans 6.5 s, far beyond any timeout.
const RTT_UNIT_MICROS: u128 = 100;

/// A member's round trip, smoothed as TCP smooths it (RFC 6298: gains 1/8 and 1/4), in units
/// of [`RTT_UNIT_MICROS`]; zero is "not measured". Two `u16`s and a flag, so that it costs a
/// few bytes a member (the simulator holds a hundred million members).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Rtt {
    srtt: u16,
    var: u16,
    /// The member was away (dead or gone): its waits are an unmeasured member's until its next
    /// sample, which replaces the estimate if shorter (and is dropped if longer).
    stale: bool,
}

impl Rtt {
    /// Marks the estimate as from before the member went away: its path may have changed (a
    /// phone on another network), and a process that just started answers slowly for a while
    /// (it replays its raft log and opens its runtimes on a device that may be busy). Until
    /// its next ack (an ack past the wait still counts, `on_ack`), it is waited for as a
    /// member not measured yet: the longest probe wait, three of them to refute in. Each member probes it within about a round, so this lasts a second or so;
    /// with the old, short waits kept, freshly restarted processes of the 50-process report
    /// were declared dead again within a second of coming back (eight times in one run).
    pub(super) fn stale(&mut self) {
        self.stale = self.srtt != 0;
    }

    /// Takes one measured round trip.
    pub(super) fn sample(&mut self, d: Duration) {
        let r = u16::try_from(d.as_micros() / RTT_UNIT_MICROS).unwrap_or(u16::MAX).max(1);
        if self.srtt == 0 || (self.stale && r < self.srtt) {
            self.stale = false;
            self.srtt = r;
            self.var = r / 2;
            return;
        }
        if self.stale {
            // The first ack of a member back from the dead, slower than it was: most likely a
            // process still starting (raft replay, runtimes), not a slower path. Taken as the
            // seed it would set its waits near the longest for a dozen probes (the estimate
            // sheds an eighth per sample); the old estimate stands, and a path that did grow
            // shows in the next acks, which come past the wait and are smoothed in.
            self.stale = false;
            return;
        }
        let (srtt, var, r) = (u32::from(self.srtt), u32::from(self.var), u32::from(r));
        let var = (3 * var + srtt.abs_diff(r)) / 4;
        let srtt = (7 * srtt + r) / 8;
        self.var = u16::try_from(var).unwrap_or(u16::MAX);
        self.srtt = u16::try_from(srtt).unwrap_or(u16::MAX).max(1);
    }

    /// The retransmission timeout before clamping: `srtt + 4·rttvar`, if measured (and not
    /// stale).
    pub(super) fn timeout(self) -> Option<Duration> {
        if self.srtt == 0 || self.stale {
            return None;
        }
        let units = u64::from(self.srtt) + 4 * u64::from(self.var);
        Some(Duration::from_micros(units * RTT_UNIT_MICROS as u64))
    }
}

#[derive(Clone, Debug)]
pub(super) struct Probe<I> {
    pub(super) target: I,
    /// The target's incarnation when the probe began: its verdict is about that one only. A
    /// member that restarted meanwhile (a new incarnation, announced while this probe of
    /// its dead predecessor ran out) is not suspected for its predecessor's silence.
    incarnation: u32,
    /// When the first ping went: the round trip of a direct ack is measured from here.
    sent: Instant,
    pub(super) direct_deadline: Instant,
    pub(super) end: Instant,
    pub(super) indirect_sent: bool,
    expected_nacks: u32,
    /// The helpers asked; only their nacks count, once each (a witness count others could
    /// inflate would shorten everyone's suspicion timer).
    pub(super) helpers: Vec<I>,
    /// The helpers asked, kept whole: only the target and these may ack the probe (any
    /// member could otherwise cancel every probe by acking the sequence numbers it saw).
    asked: Vec<I>,
    pub(super) nacks: u32,
}

#[derive(Clone, Debug)]
pub(super) struct Relay<I> {
    origin: I,
    pub(super) target: I,
    origin_seq: u32,
    /// When the pings went (two copies at once): the round trip of the target's ack.
    sent: Instant,
    pub(super) deadline: Instant,
}

/// Largest number of probes in flight at once: a probe lasts three probe timeouts and one
/// starts every interval, so with the defaults three overlap; four leaves room for jitter.
const MAX_PROBES: usize = 4;
/// Largest number of ping requests this node relays at once for others; more are dropped, a
/// bound on the work other nodes can ask of us.
const MAX_RELAYS: usize = 64;

impl<I: Id> Membership<I> {
    fn scaled(&self, d: Duration) -> Duration {
        d * (1 + self.local_health)
    }

    /// How long to wait for `target`'s direct ack, before the local health multiplier: its
    /// measured round trip's timeout within `probe_timeout_min..=probe_timeout`, or
    /// `probe_timeout` while it is not measured.
    pub(super) fn ack_wait(&self, target: &I) -> Duration {
        self.measured_wait(target).unwrap_or(self.config.probe_timeout)
    }

    /// [`Self::ack_wait`] if `target`'s round trip is measured.
    fn measured_wait(&self, target: &I) -> Option<Duration> {
        let (min, max) = (self.config.probe_timeout_min, self.config.probe_timeout);
        self.members.get(target).and_then(|m| m.rtt.timeout()).map(|t| t.clamp(min, max))
    }

    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub(super) fn start_probe(&mut self, now: Instant) {
        self.next_probe = now + self.scaled(self.config.probe_interval);
        if self.probes.len() >= MAX_PROBES {
            return;
        }
        let Some(target) = self.next_probe_target() else {
            return;
        };
        self.probe(target, now);
    }

    /// Probes `target` now, out of the round-robin order (within the same bound on probes in
    /// flight), unless a probe of it is under way.
    pub(super) fn probe_out_of_turn(&mut self, target: I, now: Instant) {
        if self.leaving
            || self.probes.len() >= MAX_PROBES
            || self.probes.values().any(|p| p.target == target)
        {
            return;
        }
        self.probe(target, now);
    }

    fn probe(&mut self, target: I, now: Instant) {
        let seq = self.next_seq();
        let timeout = self.scaled(self.ack_wait(&target));
        let incarnation = self.members.get(&target).map_or(0, |m| m.incarnation);
        self.probes.insert(
            seq,
            Probe {
                target: target.clone(),
                incarnation,
                sent: now,
                direct_deadline: now + timeout,
                // Set again when the indirect phase starts.
                end: now + timeout * 3,
                indirect_sent: false,
                expected_nacks: 0,
                helpers: Vec::new(),
                asked: Vec::new(),
                nacks: 0,
            },
        );
        let updates = self.piggyback_for(&target);
        self.send(target, Message::Ping { seq, incarnation: self.incarnation, updates });
    }

    /// The next member in the shuffled round-robin order that is alive or suspect and not
    /// already being probed. Reshuffles at the end of each round (SWIM's bounded detection).
    fn next_probe_target(&mut self) -> Option<I> {
        let len = self.probe_order.len();
        for _ in 0..len {
            if self.probe_index >= self.probe_order.len() {
                self.probe_index = 0;
                self.probe_order
                    .retain(|id| self.members.get(id).is_some_and(|m| m.state != State::Left));
                self.probe_order.shuffle(&mut self.rng);
                if self.probe_order.is_empty() {
                    return None;
                }
            }
            let id = self.probe_order[self.probe_index].clone();
            self.probe_index += 1;
            let probeable = self
                .members
                .get(&id)
                .is_some_and(|m| matches!(m.state, State::Alive | State::Suspect));
            if probeable && !self.probes.values().any(|p| p.target == id) {
                return Some(id);
            }
        }
        None
    }

    pub(super) fn expire_probes(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .probes
            .iter()
            .filter(|(_, p)| now >= if p.indirect_sent { p.end } else { p.direct_deadline })
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            let Some(probe) = self.probes.get_mut(&seq) else {
                continue;
            };
            if !probe.indirect_sent {
                probe.indirect_sent = true;
                let target = probe.target.clone();
                let helpers =
                    self.random_live(self.config.indirect_checks, std::slice::from_ref(&target));
                // Helpers wait for the target what we waited; their answers take a round
                // trip more (the slowest helper's), and both fit twice in the phase.
                let within = self.scaled(self.ack_wait(&target));
                let slowest =
                    helpers.iter().map(|h| self.scaled(self.ack_wait(h))).max().unwrap_or_default();
                let within_ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
                if let Some(p) = self.probes.get_mut(&seq) {
                    p.expected_nacks = u32::try_from(helpers.len()).unwrap_or(u32::MAX);
                    p.helpers.clone_from(&helpers);
                    p.asked.clone_from(&helpers);
                    p.end = now + within.max(slowest) * 2;
                }
                for h in helpers {
                    let updates = self.piggyback_for(&h);
                    self.send(
                        h,
                        Message::PingReq { seq, target: target.clone(), within_ms, updates },
                    );
                }
                // A second direct attempt, in case only the first ping or its ack was lost.
                let updates = self.piggyback_for(&target);
                self.send(target, Message::Ping { seq, incarnation: self.incarnation, updates });
                continue;
            }
            let Some(probe) = self.probes.remove(&seq) else {
                continue;
            };
            // Lifeguard: missing nacks mean our own messages are not getting through.
            if probe.nacks < probe.expected_nacks {
                self.local_health = (self.local_health + 1).min(self.config.max_local_health);
            }
            let witnesses = u8::try_from(1 + probe.nacks).unwrap_or(u8::MAX);
            self.suspect(probe.target, probe.incarnation, witnesses, now);
        }
    }

    pub(super) fn expire_relays(&mut self, now: Instant) {
        let due: Vec<u32> =
            self.relays.iter().filter(|(_, r)| now >= r.deadline).map(|(s, _)| *s).collect();
        for seq in due {
            if let Some(r) = self.relays.remove(&seq) {
                self.send(r.origin, Message::Nack { seq: r.origin_seq });
            }
        }
    }

    pub(super) fn on_ack(&mut self, from: &I, seq: u32, now: Instant) {
        // Only the member pinged acks a relayed ping.
        if self.relays.get(&seq).is_some_and(|r| r.target == *from)
            && let Some(relay) = self.relays.remove(&seq)
        {
            if let Some(m) = self.members.get_mut(from) {
                m.rtt.sample(now.saturating_duration_since(relay.sent));
            }
            let updates = self.piggyback_for(&relay.origin);
            self.send(
                relay.origin,
                Message::Ack { seq: relay.origin_seq, incarnation: self.incarnation, updates },
            );
            return;
        }
        // The ack comes from the target itself or from a helper we asked; either proves it.
        let Some(probe) = self.probes.get(&seq) else { return };
        let direct = probe.target == *from;
        if !direct && !probe.asked.contains(from) {
            return;
        }
        let Some(probe) = self.probes.remove(&seq) else { return };
        self.local_health = self.local_health.saturating_sub(1);
        if direct && let Some(m) = self.members.get_mut(from) {
            // Karn: an ack to a ping sent once times the round trip. One that came after the
            // wait (the ping went again) is timed from the first ping, which can only make
            // the estimate too long: without it, a member whose round trip grew past its
            // wait would never be measured again, and be suspected on every probe.
            m.rtt.sample(now.saturating_duration_since(probe.sent));
        }
    }

    pub(super) fn reconnect_probe(&mut self) {
        let dead: Vec<&I> = self
            .gone
            .keys()
            .filter(|id| self.members.get(*id).is_some_and(|m| m.state == State::Dead))
            .collect();
        if dead.is_empty() {
            return;
        }
        let target = dead[self.rng.gen_range(0..dead.len())].clone();
        let seq = self.next_seq();
        // Say why we ask: a live member refutes its death and we flood its answer.
        let mut updates: Vec<Update<I>> = self.liveness_update(&target).into_iter().collect();
        updates.extend(self.piggyback(&target, self.config.piggyback_bytes / 2));
        self.send(target, Message::Ping { seq, incarnation: self.incarnation, updates });
    }

    /// Relays a ping request: pings `target` for `from` (twice) and remembers to forward its
    /// ack, or to nack when none comes in time: after the wait the asker named or this node's
    /// own measured wait for the target, the longer, within this node's bounds
    /// (`probe_timeout_min` up to its stretched `probe_timeout`).
    pub(super) fn on_ping_req(
        &mut self,
        from: &I,
        seq: u32,
        target: I,
        within_ms: u16,
        now: Instant,
    ) {
        if !self.leaving && self.relays.len() < MAX_RELAYS && target != self.me {
            let my_seq = self.next_seq();
            // The asker's wait, or ours for the target if we measured it longer (a helper far
            // from a target that is near the asker must not nack before the target's ack can
            // arrive). Not measured here: the asker's measure is the better guess, and a wait
            // past the asker's would bring the nack after its probe ended (one witness: a
            // dead member's suspicion would run the longest).
            let asked = Duration::from_millis(u64::from(within_ms));
            // Unstretched: this node's own local health says nothing about the path, and
            // the asker already stretched its wait by its own.
            let wait = self
                .measured_wait(&target)
                .map_or(asked, |own| asked.max(own))
                .clamp(self.config.probe_timeout_min, self.scaled(self.config.probe_timeout));
            self.relays.insert(
                my_seq,
                Relay {
                    origin: from.clone(),
                    target: target.clone(),
                    origin_seq: seq,
                    sent: now,
                    deadline: now + wait,
                },
            );
            // Two copies at once: a helper is only asked when something is lossy, and a
            // second copy makes its answer ten times less likely to be a false nack.
            let fwd = self.piggyback_for(&target);
            self.send(
                target.clone(),
                Message::Ping { seq: my_seq, incarnation: self.incarnation, updates: fwd },
            );
            self.send(
                target,
                Message::Ping { seq: my_seq, incarnation: self.incarnation, updates: Vec::new() },
            );
        }
    }

    pub(super) fn random_live(&mut self, k: usize, exclude: &[I]) -> Vec<I> {
        let mut picked: Vec<I> = Vec::with_capacity(k);
        if self.probe_order.is_empty() {
            return picked;
        }
        // Rejection sampling from the probe order: cheap when most members are alive.
        for _ in 0..k * 8 {
            if picked.len() == k {
                break;
            }
            let id = &self.probe_order[self.rng.gen_range(0..self.probe_order.len())];
            let live = self.members.get(id).is_some_and(|m| m.state == State::Alive);
            if live && !exclude.contains(id) && !picked.contains(id) && *id != self.me {
                picked.push(id.clone());
            }
        }
        picked
    }
}
