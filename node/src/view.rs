//! This node's view of the pool, as a plain value: who is alive, what each peer offers and
//! describes, how steadily it has been up, and whether this node reached it directly. The view
//! loop keeps one up to date from the mesh's events ([`View::apply`]) and publishes immutable
//! snapshots (`Arc<View>`) to the placer, the api and the voter controller.
//!
//! ```text
//!   mesh::Event ──▶ View::apply (pure: membership state and streaks, capacity, directory
//!                   entry, direct connections, own reachability and addresses)
//!   View ──▶ candidates(state, view, now) ──▶ voter controller (uptime, reachability, power,
//!                                               device class, flaps)
//! ```
//!
//! Nothing here does I/O; the loop that feeds it lives in `loops::view`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_consensus::state::State;
use cloudless_consensus::voters::{self, Candidate, Observation};
use cloudless_consensus::{Member, node_id};
use cloudless_mesh::membership::{self, MemberView};
use cloudless_mesh::node::Link;
use cloudless_mesh::{Event, Reachability, identity};
use cloudless_types::{Capacity, DeviceClass, NodeDescriptor, NodeName, Power};
use libp2p::{Multiaddr, PeerId};

/// Returns remembered per peer within the flap window: more than the voter rule counts, so
/// the count is exact where it matters and memory stays bounded.
const MAX_RETURNS: usize = 16;
/// Listen addresses remembered for this node (as many as a directory entry advertises).
const MAX_LISTEN: usize = cloudless_types::MAX_ADDRS;
/// Peers remembered before the membership admits them (their directory entry or a direct
/// connection can come first): more than join at once in any pool, a bound on what strangers'
/// connections can make this node hold.
const MAX_PENDING: usize = 4096;
/// How long what arrived about a peer waits for the membership to admit it: far longer than
/// an enrollment takes, short enough that peers that never join free their place.
const PENDING_TTL: Duration = Duration::from_secs(300);

/// What this node knows about one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    /// Its liveness in the membership.
    pub state: membership::State,
    /// When its state last changed (as this node saw it).
    pub changed: Instant,
    /// When its current alive streak began (`None` while it is not alive).
    pub alive_since: Option<Instant>,
    /// When it came back after being suspect, dead or gone, within the flap window.
    pub returns: Vec<Instant>,
    /// Its last capacity summary.
    pub capacity: Option<Capacity>,
    /// Its directory entry.
    pub descriptor: Option<NodeDescriptor>,
    /// This node dialed it directly (not through a relay) and got through: evidence that it
    /// accepts connections, which a device behind a NAT does not.
    pub reached_directly: bool,
}

impl Seen {
    fn new(state: membership::State, now: Instant) -> Self {
        Seen {
            state,
            changed: now,
            alive_since: (state == membership::State::Alive).then_some(now),
            returns: Vec::new(),
            capacity: None,
            descriptor: None,
            reached_directly: false,
        }
    }

    /// How long it has been declared dead or gone (zero while alive or suspect).
    pub fn down_for(&self, now: Instant) -> Duration {
        match self.state {
            membership::State::Dead | membership::State::Left => {
                now.saturating_duration_since(self.changed)
            }
            _ => Duration::ZERO,
        }
    }

    /// Whether it answers probes now.
    pub fn is_alive(&self) -> bool {
        self.state == membership::State::Alive
    }
}

/// What arrived about a peer before the membership admitted it.
#[derive(Clone, Debug, PartialEq)]
struct Pending {
    descriptor: Option<NodeDescriptor>,
    reached_directly: bool,
    since: Instant,
}

/// The pool as this node sees it. Cloning shares the per-peer entries.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Every peer the membership knows (this node included), by name.
    pub peers: BTreeMap<NodeName, Arc<Seen>>,
    /// Peers not in the membership yet, with what arrived about them first.
    pending: BTreeMap<NodeName, Pending>,
    /// This node (its own entry's reachability is AutoNAT's verdict, not a dial).
    pub me: Option<NodeName>,
    /// AutoNAT's verdict on this node.
    pub reachability: Option<Reachability>,
    /// Where this node listens.
    pub listen: Vec<Multiaddr>,
}

/// Whether an event changed who is alive (the placer and the agents act on those at once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// The view changed at all.
    pub any: bool,
    /// A peer's liveness changed.
    pub liveness: bool,
}

impl View {
    /// A view from a full read of the mesh (at start, and after events were lost).
    pub fn from_snapshot(
        me: &NodeName,
        members: &[MemberView<PeerId>],
        directory: &BTreeMap<PeerId, NodeDescriptor>,
        listen: Vec<Multiaddr>,
        previous: &View,
        now: Instant,
    ) -> View {
        let mut view = View {
            peers: BTreeMap::new(),
            pending: previous.pending.clone(),
            me: Some(me.clone()),
            reachability: previous.reachability.clone(),
            listen,
        };
        view.listen.truncate(MAX_LISTEN);
        for m in members {
            let name = identity::node_name(&m.id);
            let mut seen = match previous.peers.get(&name) {
                Some(old) => (**old).clone(),
                None => view.admit(&name, m.state, now),
            };
            seen.transition(m.state, now);
            seen.capacity = m.capacity;
            seen.descriptor = directory.get(&m.id).cloned();
            view.peers.insert(name, Arc::new(seen));
        }
        view
    }

    /// Applies one mesh event.
    pub fn apply(&mut self, event: &Event, now: Instant) -> Changed {
        match event {
            Event::Member(membership::Event::State { id, state, .. }) => {
                let name = identity::node_name(id);
                if !self.peers.contains_key(&name) {
                    let seen = self.admit(&name, *state, now);
                    self.peers.insert(name, Arc::new(seen));
                    return Changed { any: true, liveness: true };
                }
                let Some(entry) = self.peers.get_mut(&name) else { return Changed::default() };
                let seen = Arc::make_mut(entry);
                let moved = seen.state != *state;
                seen.transition(*state, now);
                Changed { any: true, liveness: moved }
            }
            Event::Member(membership::Event::Capacity { id, capacity }) => {
                let name = identity::node_name(id);
                match self.peers.get_mut(&name) {
                    Some(entry) => {
                        Arc::make_mut(entry).capacity = Some(*capacity);
                        Changed { any: true, liveness: false }
                    }
                    None => Changed::default(),
                }
            }
            Event::Member(membership::Event::Removed { id }) => {
                let name = identity::node_name(id);
                self.pending.remove(&name);
                let removed = self.peers.remove(&name).is_some();
                Changed { any: removed, liveness: removed }
            }
            Event::Directory { peer, descriptor } => {
                let name = identity::node_name(peer);
                match self.peers.get_mut(&name) {
                    Some(entry) => {
                        Arc::make_mut(entry).descriptor.clone_from(descriptor);
                        Changed { any: true, liveness: false }
                    }
                    // The membership admits a peer to the view; what came first waits for it.
                    None => {
                        if let Some(p) = self.pending_mut(name, now) {
                            p.descriptor.clone_from(descriptor);
                        }
                        Changed::default()
                    }
                }
            }
            Event::Connected { peer, link: Link::Dialed } => {
                let name = identity::node_name(peer);
                match self.peers.get_mut(&name) {
                    Some(entry) if !entry.reached_directly => {
                        Arc::make_mut(entry).reached_directly = true;
                        Changed { any: true, liveness: false }
                    }
                    Some(_) => Changed::default(),
                    None => {
                        if let Some(p) = self.pending_mut(name, now) {
                            p.reached_directly = true;
                        }
                        Changed::default()
                    }
                }
            }
            Event::Connected { .. } | Event::Lagged { .. } | Event::NotEnrolled { .. } => {
                Changed::default()
            }
            Event::Listening(addr) => {
                if !self.listen.contains(addr) && self.listen.len() < MAX_LISTEN {
                    self.listen.push(addr.clone());
                }
                Changed { any: true, liveness: false }
            }
            Event::Nat(r) => {
                self.reachability = Some(r.clone());
                Changed { any: true, liveness: false }
            }
        }
    }

    /// A new member's entry, with what arrived about it before.
    fn admit(&mut self, name: &NodeName, state: membership::State, now: Instant) -> Seen {
        let mut seen = Seen::new(state, now);
        if let Some(p) = self.pending.remove(name) {
            seen.descriptor = p.descriptor;
            seen.reached_directly = p.reached_directly;
        }
        seen
    }

    /// The pending entry of `name`, made if there is room.
    fn pending_mut(&mut self, name: NodeName, now: Instant) -> Option<&mut Pending> {
        if !self.pending.contains_key(&name) && self.pending.len() >= MAX_PENDING {
            self.pending.retain(|_, p| now.saturating_duration_since(p.since) < PENDING_TTL);
            if self.pending.len() >= MAX_PENDING {
                return None;
            }
        }
        let fresh = Pending { descriptor: None, reached_directly: false, since: now };
        Some(self.pending.entry(name).or_insert(fresh))
    }

    /// A peer by name.
    pub fn get(&self, name: &NodeName) -> Option<&Seen> {
        self.peers.get(name).map(|s| &**s)
    }

    /// The peers alive now, except `me`.
    pub fn alive_except<'a>(&'a self, me: &'a NodeName) -> impl Iterator<Item = &'a NodeName> {
        self.peers.iter().filter(move |(n, s)| *n != me && s.is_alive()).map(|(n, _)| n)
    }

    /// How many peers are in `state`.
    pub fn count(&self, state: membership::State) -> usize {
        self.peers.values().filter(|s| s.state == state).count()
    }
}

impl Seen {
    fn transition(&mut self, state: membership::State, now: Instant) {
        if state == self.state {
            return;
        }
        if state == membership::State::Alive {
            self.alive_since = Some(now);
            self.returns.retain(|t| now.saturating_duration_since(*t) < voters::FLAP_WINDOW);
            if self.returns.len() >= MAX_RETURNS {
                self.returns.remove(0);
            }
            self.returns.push(now);
        } else if self.state == membership::State::Alive {
            self.alive_since = None;
        }
        // A peer that went away may come back from another network: it has to be reached
        // directly again before that counts.
        if matches!(state, membership::State::Dead | membership::State::Left) {
            self.reached_directly = false;
        }
        self.state = state;
        self.changed = now;
    }
}

/// The voter controller's candidates: every peer of the view, judged by what the pool
/// observed of it (uptime streak, whether this node reached it directly, its power source,
/// its device class and recent flaps) and by its enrollment in committed state.
pub fn candidates(state: &State, view: &View, now: Instant) -> Vec<Candidate> {
    let Some(settings) = state.settings() else { return Vec::new() };
    view.peers
        .iter()
        .map(|(name, s)| {
            let recent = s
                .returns
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < voters::FLAP_WINDOW);
            let d = s.descriptor.as_ref();
            // This node never dials itself: for it, AutoNAT's verdict is the evidence.
            let public = if view.me.as_ref() == Some(name) {
                matches!(view.reachability, Some(Reachability::Public(_)))
            } else {
                s.reached_directly
            };
            let observation = Observation {
                alive: s.is_alive(),
                uptime: s.alive_since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                public,
                power: s.capacity.map_or(Power::Mains, |c| c.power),
                class: d.and_then(|d| d.device_class).unwrap_or(DeviceClass::Desktop),
                flaps: u32::try_from(recent.count()).unwrap_or(u32::MAX),
            };
            voters::assess(
                node_id(name),
                Member { peer: name.clone() },
                state.nodes().get(name),
                &observation,
                settings,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_mesh::membership::Event as M;

    fn state(id: PeerId, state: membership::State) -> Event {
        Event::Member(M::State { id, previous: None, state, incarnation: 0 })
    }

    #[test]
    fn events_keep_streaks_flaps_capacity_and_reachability() {
        let p = PeerId::random();
        let name = identity::node_name(&p);
        let t0 = Instant::now();
        let mut v = View::default();
        let c = v.apply(&state(p, membership::State::Alive), t0);
        assert!(c.any && c.liveness);
        assert_eq!(v.get(&name).unwrap().alive_since, Some(t0));
        let cap = Capacity { cpu_total_millis: 1000, ..Capacity::EMPTY };
        v.apply(&Event::Member(M::Capacity { id: p, capacity: cap }), t0);
        assert_eq!(v.get(&name).unwrap().capacity, Some(cap));
        v.apply(&Event::Connected { peer: p, link: Link::Relayed }, t0);
        assert!(!v.get(&name).unwrap().reached_directly, "a relayed path proves nothing");
        v.apply(&Event::Connected { peer: p, link: Link::Dialed }, t0);
        assert!(v.get(&name).unwrap().reached_directly);
        let t1 = t0 + Duration::from_secs(5);
        v.apply(&state(p, membership::State::Dead), t1);
        assert_eq!(
            v.get(&name).unwrap().down_for(t1 + Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(v.get(&name).unwrap().alive_since, None);
        v.apply(&state(p, membership::State::Alive), t1 + Duration::from_secs(1));
        assert_eq!(v.get(&name).unwrap().returns.len(), 1, "came back: a return");
        assert_eq!(v.count(membership::State::Alive), 1);
        let c = v.apply(&Event::Member(M::Removed { id: p }), t1);
        assert!(c.liveness && v.get(&name).is_none());
    }

    #[test]
    fn what_arrives_before_the_membership_admits_a_peer_is_kept() {
        let p = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::default();
        let d = NodeDescriptor { cpu_millis: 1000, ..Default::default() };
        v.apply(&Event::Directory { peer: p, descriptor: Some(d.clone()) }, t0);
        v.apply(&Event::Connected { peer: p, link: Link::Dialed }, t0);
        assert!(v.get(&identity::node_name(&p)).is_none(), "not a member yet");
        v.apply(&state(p, membership::State::Alive), t0);
        let seen = v.get(&identity::node_name(&p)).unwrap();
        assert_eq!(seen.descriptor.as_ref(), Some(&d));
        assert!(seen.reached_directly);
    }

    #[test]
    fn a_snapshot_keeps_what_events_taught() {
        let p = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::default();
        v.apply(&state(p, membership::State::Alive), t0);
        v.apply(&Event::Connected { peer: p, link: Link::Dialed }, t0);
        let members = vec![MemberView {
            id: p,
            state: membership::State::Alive,
            incarnation: 1,
            capacity: None,
        }];
        let me = NodeName::from_ed25519([1; 32]);
        let fresh = View::from_snapshot(&me, &members, &BTreeMap::new(), vec![], &v, t0);
        let seen = fresh.get(&identity::node_name(&p)).unwrap();
        assert!(seen.reached_directly && seen.alive_since == Some(t0));
    }
}
