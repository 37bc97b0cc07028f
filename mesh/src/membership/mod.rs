//! Membership: who is in the cluster, who is alive, and what each member can run.
//!
//! This module is a sans-I/O state machine: [`Membership::handle`] takes an [`Input`] and the
//! current time and returns [`Output`]s; [`Membership::next_deadline`] says when it next wants a
//! [`Input::Tick`]. It owns no sockets, timers or tasks, so the swarm task drives it in
//! production and [`sim`] drives ten thousand of them deterministically from one seed.
//!
//! ```text
//!              ┌──────────────────────── Membership<I> ─────────────────────────┐
//!  Tick ──────▶│ probe loop (SWIM) ── Ping ─▶ target        PingReq ─▶ k helpers │── Send{to,msg}
//!  Message ───▶│ suspicion timers (Lifeguard) ── Suspect ─▶ Dead                 │── Broadcast(updates)
//!  Broadcast ─▶│ member table: Alive / Suspect / Dead / Left + incarnation       │── Event
//!  Contact ───▶│ piggyback queue (repair)     capacity announcer (byte budget)   │
//!  SetCapacity▶│                                                                 │
//!  Leave ─────▶└─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! # Protocol
//!
//! The design is SWIM with the Lifeguard extensions, with dissemination split in two:
//!
//! * **Failure detection (point to point).** Every `probe_interval` a node pings the next member
//!   of a shuffled round-robin list. No ack within `probe_timeout`: it asks `indirect_checks`
//!   random members to ping the target for it (`PingReq`), and pings again itself. Helpers that
//!   cannot reach the target answer with a `Nack`. No ack by the end of the probe (three probe
//!   timeouts): the target becomes *suspect*.
//! * **Dissemination (flooding).** State changes are flooded through [`Output::Broadcast`],
//!   which the mesh publishes on gossipsub (each node forwards a message once to its mesh
//!   peers), so a change reaches ten thousand nodes in a handful of hops instead of the
//!   `O(log n)` protocol periods of piggyback-only SWIM. A flood is started only by the node
//!   the change is about (join, refutation, leave, capacity), by the node that suspected, or by
//!   a node that heard first hand of a member's arrival or return (a joiner's first contact, a
//!   dead member answering a reconnect probe): information that arrived by flood is never
//!   re-flooded, the transport already forwards it. Piggybacking on pings and acks stays as a
//!   cheap repair path for the rare node that missed a flood, and a ping or ack itself tells
//!   the receiver that its sender is alive.
//! * **Suspicion (Lifeguard).** A suspect is declared dead when its suspicion timer runs out.
//!   The timer starts at `suspicion_max` and shrinks logarithmically towards `suspicion_min` as
//!   independent witnesses confirm it: the helpers that nacked count as witnesses, and so does
//!   every other node that suspects the same member independently. Deaths are not flooded:
//!   every node that got the suspicion runs the same timer.
//! * **Joining.** A node that knows nobody sends `Join` to a peer it found and receives the
//!   member list in pages of at most `sync_chunk_bytes`; after a loss it asks for the missing
//!   pages only.
//! * **Refutation.** A live node that hears it is suspect or dead raises its incarnation and
//!   floods `Alive`. The suspecting node also tells the suspect directly, so refutation starts
//!   one hop after the suspicion does.
//! * **Local health (Lifeguard).** A node whose probes fail without the expected nacks, or that
//!   has to refute suspicions about itself, is probably the slow one; it raises its local health
//!   multiplier, which stretches its probe timeouts and intervals, so a struggling node stops
//!   accusing healthy ones.
//! * **Leaving** is announced: the node floods `Left`, tells a few members directly, and
//!   answers probes with its leave until it stops. `Left` is final for that incarnation and is
//!   reported as a departure, never as a failure.
//! * **Partitions heal** because every `reconnect_interval` a node pings one member it holds as
//!   dead, with the death notice attached; a live one refutes and its refutation is flooded.
//!
//! # Capacity
//!
//! Each member carries a [`Capacity`] summary ordered by `(incarnation, version)`. A node floods
//! its summary when it [changed meaningfully](Capacity::differs_meaningfully) or when
//! `capacity_refresh` passed, but never more often than the byte budget allows: a flood of `b`
//! bytes costs every node about `b · flood_degree` bytes, so with `n` members each node may
//! announce at most every `n · b · flood_degree / capacity_budget` seconds. At ten members that
//! is every few seconds, at ten thousand it is about once an hour; large clusters must count on
//! the scheduler's own bookkeeping between announcements.
//!
//! # Bandwidth bound
//!
//! What a node sends per second in steady state is bounded by
//! `(1 s / probe_interval) · 2 · (MESSAGE_OVERHEAD + piggyback_bytes)` for its own probes and
//! the acks to the probes it receives (one per interval on average), plus `capacity_budget` for
//! capacity floods, plus its share of forwarding liveness floods (`flood_degree` copies of each
//! change in the cluster). With the defaults that is 5 · 2 · (40 + 300) B = 3.4 KB/s at worst
//! with full piggyback; measured averages are in the crate docs.

pub mod sim;

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{BuildHasherDefault, Hash};
use std::time::{Duration, Instant};

use cloudless_types::Capacity;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a member identifier must support: a PeerId in production, a small integer in the
/// simulator.
pub trait Id:
    Clone + Eq + Ord + Hash + Debug + Serialize + DeserializeOwned + Send + 'static
{
}
impl<T: Clone + Eq + Ord + Hash + Debug + Serialize + DeserializeOwned + Send + 'static> Id for T {}

/// Deterministic hasher: the simulator must replay identically from a seed.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// Bytes that every message costs on the wire beyond its encoded body (stream and frame headers
/// of QUIC/yamux, the length prefix). Used for budgets and by the simulator's byte counts.
pub const MESSAGE_OVERHEAD: usize = 40;

/// Tunables of the membership protocol. The defaults target devices on home networks and
/// mobile links: round trips up to ~200 ms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often a node starts a probe. 200 ms makes the expected time until some node probes
    /// a failed member 200 ms (each of `n` nodes probes one of `n` members per interval).
    #[serde(with = "millis")]
    pub probe_interval: Duration,
    /// How long to wait for a direct ack before asking helpers. Must exceed the round trip
    /// time of the slowest healthy link; 200 ms covers home broadband and most mobile links,
    /// and the local health multiplier stretches it on a struggling node.
    #[serde(with = "millis")]
    pub probe_timeout: Duration,
    /// How many helpers ping a target that missed its direct ack. Four helpers make a false
    /// suspicion under 5 % independent loss about one in a million probes.
    pub indirect_checks: usize,
    /// Suspicion timeout with every expected witness confirming.
    #[serde(with = "millis")]
    pub suspicion_min: Duration,
    /// Suspicion timeout with a single witness.
    #[serde(with = "millis")]
    pub suspicion_max: Duration,
    /// How often to ping one member held as dead, so that healed partitions merge.
    #[serde(with = "millis")]
    pub reconnect_interval: Duration,
    /// How long a dead member is remembered (and reconnect-probed) before it is forgotten.
    #[serde(with = "millis")]
    pub dead_retention: Duration,
    /// How long a member that left is remembered, so that late messages do not revive it.
    #[serde(with = "millis")]
    pub left_retention: Duration,
    /// Largest number of members tracked; a bound on memory, far above any real pool.
    pub max_members: usize,
    /// Largest number of bytes of updates piggybacked on one ping or ack.
    pub piggyback_bytes: usize,
    /// Each update is piggybacked `retransmit_mult · ⌈log10(n + 1)⌉` times. Flooding carries the
    /// news; piggybacking only repairs, so one round per order of magnitude is enough.
    pub retransmit_mult: u32,
    /// Longest time between two capacity announcements of a node.
    #[serde(with = "millis")]
    pub capacity_refresh: Duration,
    /// Shortest time between two capacity announcements, whatever the cluster size.
    #[serde(with = "millis")]
    pub capacity_min_interval: Duration,
    /// Bytes per second each node may spend on everyone's capacity floods together.
    pub capacity_budget: u32,
    /// Copies of each flooded message a node forwards (gossipsub's mesh degree `D`).
    pub flood_degree: u32,
    /// Largest local health multiplier (Lifeguard); probe timing is scaled by `1 + lhm`.
    pub max_local_health: u32,
    /// Largest encoded size of one sync message sent to a joiner, in bytes.
    pub sync_chunk_bytes: usize,
    /// How often a joiner that has not yet received the member list asks again.
    #[serde(with = "millis")]
    pub join_retry: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(200),
            indirect_checks: 4,
            suspicion_min: Duration::from_millis(600),
            suspicion_max: Duration::from_secs(4),
            reconnect_interval: Duration::from_secs(5),
            dead_retention: Duration::from_secs(3600),
            left_retention: Duration::from_secs(300),
            max_members: 100_000,
            piggyback_bytes: 300,
            retransmit_mult: 1,
            capacity_refresh: Duration::from_secs(60),
            capacity_min_interval: Duration::from_secs(2),
            capacity_budget: 512,
            flood_degree: 6,
            max_local_health: 8,
            sync_chunk_bytes: 16 * 1024,
            join_retry: Duration::from_millis(500),
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership.{field}: {reason}")]
pub struct ConfigError {
    /// The offending key.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Config {
    /// Checks that the timings are consistent and the bounds usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| Err(ConfigError { field, reason: reason.to_string() });
        if self.probe_interval.is_zero() {
            return err("probe_interval", "must be positive");
        }
        if self.probe_timeout.is_zero() {
            return err("probe_timeout", "must be positive");
        }
        if self.suspicion_min.is_zero() || self.suspicion_min > self.suspicion_max {
            return err("suspicion_min", "must be positive and at most suspicion_max");
        }
        if self.max_members < 2 {
            return err("max_members", "must be at least 2");
        }
        if self.sync_chunk_bytes < 1024 {
            return err("sync_chunk_bytes", "must be at least 1024");
        }
        if self.flood_degree == 0 {
            return err("flood_degree", "must be positive");
        }
        if self.reconnect_interval.is_zero() || self.join_retry.is_zero() {
            return err("reconnect_interval", "intervals must be positive");
        }
        if self.capacity_min_interval > self.capacity_refresh {
            return err("capacity_min_interval", "must be at most capacity_refresh");
        }
        Ok(())
    }
}

pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Liveness of a member as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared dead unless it refutes in time.
    Suspect,
    /// Declared failed. Its work may be moved elsewhere.
    Dead,
    /// Announced its own departure.
    Left,
}

/// One piece of news about a member, as flooded and piggybacked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update<I> {
    /// Who the news is about.
    pub id: I,
    /// The member's incarnation the news refers to.
    pub incarnation: u32,
    /// The news.
    pub kind: UpdateKind<I>,
}

/// The kinds of news in an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateKind<I> {
    /// The member is alive at this incarnation.
    Alive,
    /// `by` failed to reach the member; `witnesses` nodes (including `by`) confirmed.
    Suspect {
        /// The node that suspects.
        by: I,
        /// How many nodes failed to reach the member in that probe.
        witnesses: u8,
    },
    /// The member was declared dead.
    Dead,
    /// The member left voluntarily.
    Left,
    /// The member's capacity summary, ordered by `(incarnation, version)`.
    Capacity {
        /// Increases with every announcement within one incarnation.
        version: u32,
        /// The summary.
        capacity: Capacity,
    },
}

impl<I> UpdateKind<I> {
    fn is_liveness(&self) -> bool {
        !matches!(self, UpdateKind::Capacity { .. })
    }
}

/// Messages sent point to point between two members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<I> {
    /// Are you alive? Answer with [`Message::Ack`] carrying the same `seq`.
    Ping {
        /// Correlates the ack.
        seq: u32,
        /// The sender's incarnation: a ping is first-hand news that the sender is alive.
        incarnation: u32,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// Yes (or, from a helper, the target is).
    Ack {
        /// The `seq` of the ping or ping request answered.
        seq: u32,
        /// The sender's incarnation.
        incarnation: u32,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// Please ping `target` for me and forward its ack.
    PingReq {
        /// Echoed in the forwarded ack or the nack.
        seq: u32,
        /// The member to ping.
        target: I,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// I could not reach the target of your ping request in time.
    Nack {
        /// The `seq` of the ping request.
        seq: u32,
    },
    /// I am here: the first message a node sends to a peer it discovered.
    Join {
        /// The sender's own alive and capacity news.
        updates: Vec<Update<I>>,
        /// Whether the sender wants the member list back.
        want_sync: bool,
        /// Which pages of it, when retrying after a loss; empty means all.
        pages: Vec<u16>,
    },
    /// A page of the member list, sent to a joiner (or, as a single page, to a member that
    /// must learn what we believe about it).
    Sync {
        /// This page's number, from 0.
        page: u16,
        /// How many pages the list has.
        pages: u16,
        /// One update per member: its liveness and its capacity.
        updates: Vec<Update<I>>,
    },
}

/// What the driver feeds the state machine.
#[derive(Clone, Debug)]
pub enum Input<I> {
    /// Time passed; call at [`Membership::next_deadline`] (calling early is harmless).
    Tick,
    /// A point-to-point message arrived from `from` (already authenticated by the transport).
    Message {
        /// The sender.
        from: I,
        /// The message.
        message: Message<I>,
    },
    /// A flooded message arrived. Floods carry no author: each update says whom it is about.
    Broadcast {
        /// Its news.
        updates: Vec<Update<I>>,
    },
    /// The transport found a peer (bootstrap, LAN discovery, a new connection).
    Contact {
        /// The peer.
        peer: I,
    },
    /// The transport has no address for `peer` yet, so messages to it cannot leave. Probes of
    /// it in flight are abandoned without suspicion: not knowing where a member is says
    /// nothing about whether it lives (the driver looks the address up meanwhile).
    Unreachable {
        /// The peer.
        peer: I,
    },
    /// This node's capacity changed.
    SetCapacity(Capacity),
    /// This node is leaving the cluster on purpose.
    Leave,
}

/// What the state machine asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output<I> {
    /// Send `message` to `to`, best effort.
    Send {
        /// Recipient.
        to: I,
        /// Message.
        message: Message<I>,
    },
    /// Flood these updates to the whole cluster.
    Broadcast(Vec<Update<I>>),
    /// Something changed in this node's view.
    Event(Event<I>),
}

/// Changes in this node's view of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Event<I> {
    /// A member's liveness changed; `previous` is `None` for a member seen for the first time.
    State {
        /// The member.
        id: I,
        /// What it was before.
        previous: Option<State>,
        /// What it is now.
        state: State,
        /// At which incarnation.
        incarnation: u32,
    },
    /// A member's capacity summary changed.
    Capacity {
        /// The member.
        id: I,
        /// Its new summary.
        capacity: Capacity,
    },
    /// A dead or departed member was forgotten after its retention time.
    Removed {
        /// The member.
        id: I,
    },
}

/// A read-only view of one member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView<I> {
    /// The member.
    pub id: I,
    /// Its liveness.
    pub state: State,
    /// Its incarnation.
    pub incarnation: u32,
    /// Its last capacity summary, if any arrived.
    pub capacity: Option<Capacity>,
}

#[derive(Clone, Debug)]
struct Member {
    state: State,
    incarnation: u32,
    /// `(incarnation, version, summary)` of the newest capacity summary.
    capacity: Option<(u32, u32, Capacity)>,
}

#[derive(Clone, Debug)]
struct Suspicion<I> {
    incarnation: u32,
    started: Instant,
    deadline: Instant,
    /// Distinct suspecting nodes, bounded by `indirect_checks + 1`.
    suspectors: Vec<I>,
    /// Highest witness count reported with one suspicion.
    witnesses: u32,
}

#[derive(Clone, Debug)]
struct Probe<I> {
    target: I,
    direct_deadline: Instant,
    end: Instant,
    indirect_sent: bool,
    expected_nacks: u32,
    nacks: u32,
}

#[derive(Clone, Debug)]
struct Relay<I> {
    origin: I,
    target: I,
    origin_seq: u32,
    deadline: Instant,
}

#[derive(Clone, Debug)]
struct Joining<I> {
    /// Peers asked for the member list.
    peers: Vec<I>,
    retry_at: Instant,
    /// Page count and pages received, per answering peer.
    received: Map<I, (u16, Vec<u16>)>,
}

#[derive(Clone, Debug)]
struct Queued<I> {
    update: Update<I>,
    size: usize,
    transmits: u32,
}

/// Largest number of probes in flight at once: a probe lasts three probe timeouts and one
/// starts every interval, so with the defaults three overlap; four leaves room for jitter.
const MAX_PROBES: usize = 4;
/// Largest number of ping requests this node relays at once for others; more are dropped, a
/// bound on the work other nodes can ask of us.
const MAX_RELAYS: usize = 64;
/// Largest number of updates waiting to be piggybacked.
const MAX_QUEUE: usize = 1024;
/// Largest number of updates accepted in one message; anything above is ignored. A sync page
/// of `sync_chunk_bytes` holds fewer than this.
pub const MAX_UPDATES_PER_MESSAGE: usize = 4096;
/// Largest number of peers a joiner asks for the member list at once.
const MAX_SEEDS: usize = 8;
/// Members told directly of a voluntary leave, in addition to the flood.
const LEAVE_DIRECT: usize = 3;

/// The membership state machine of one node. See the [module docs](self).
pub struct Membership<I: Id> {
    me: I,
    config: Config,
    rng: ChaCha8Rng,
    incarnation: u32,
    leaving: bool,
    members: Map<I, Member>,
    /// Round-robin probe order; holds every non-left member, stale entries are skipped.
    probe_order: Vec<I>,
    probe_index: usize,
    /// Members currently dead, for reconnect probes and reaping.
    gone: Map<I, Instant>,
    suspicions: Map<I, Suspicion<I>>,
    probes: Map<u32, Probe<I>>,
    relays: Map<u32, Relay<I>>,
    queue: Vec<Queued<I>>,
    seq: u32,
    local_health: u32,
    next_probe: Instant,
    next_reconnect: Instant,
    next_reap: Instant,
    /// Joining: contacted peers, until one has sent the whole member list.
    join_pending: Option<Joining<I>>,
    capacity: Capacity,
    capacity_version: u32,
    /// The summary last announced, and when.
    announced: (Capacity, Instant),
    alive_count: usize,
    /// A member whose return we learned first hand while handling the current message.
    firsthand: Option<I>,
    out: Vec<Output<I>>,
}

impl<I: Id> Membership<I> {
    /// A node `me` that starts alone, at `incarnation` (persist the last one to restart
    /// above it), with randomness from `seed`.
    pub fn new(
        me: I,
        config: Config,
        capacity: Capacity,
        incarnation: u32,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Spread probe starts so that nodes started together do not probe in lockstep.
        let jitter = config.probe_interval.mul_f64(rng.gen_range(0.0..1.0));
        let mut members = Map::default();
        members.insert(
            me.clone(),
            Member { state: State::Alive, incarnation, capacity: Some((incarnation, 0, capacity)) },
        );
        Membership {
            next_probe: now + jitter,
            next_reconnect: now + config.reconnect_interval,
            next_reap: now + Duration::from_secs(10),
            me,
            config,
            rng,
            incarnation,
            leaving: false,
            members,
            probe_order: Vec::new(),
            probe_index: 0,
            gone: Map::default(),
            suspicions: Map::default(),
            probes: Map::default(),
            relays: Map::default(),
            queue: Vec::new(),
            seq: 0,
            local_health: 0,
            join_pending: None,
            capacity,
            capacity_version: 0,
            // The join message carries the summary; the first flood waits for a change.
            announced: (capacity, now),
            alive_count: 1,
            firsthand: None,
            out: Vec::new(),
        }
    }

    /// This node's id.
    pub fn me(&self) -> &I {
        &self.me
    }

    /// This node's current incarnation.
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Lifeguard's local health multiplier: 0 when healthy.
    pub fn local_health(&self) -> u32 {
        self.local_health
    }

    /// Number of members (this node included) currently alive or suspect.
    pub fn alive_count(&self) -> usize {
        self.alive_count
    }

    /// One member, this node included.
    pub fn member(&self, id: &I) -> Option<MemberView<I>> {
        self.members.get(id).map(|m| view(id, m))
    }

    /// Every known member, this node included, in no particular order.
    pub fn members(&self) -> impl Iterator<Item = MemberView<I>> + '_ {
        self.members.iter().map(|(id, m)| view(id, m))
    }

    /// Members currently alive or suspect, except this node.
    pub fn live_peers(&self) -> impl Iterator<Item = &I> + '_ {
        self.members
            .iter()
            .filter(|(id, m)| **id != self.me && matches!(m.state, State::Alive | State::Suspect))
            .map(|(id, _)| id)
    }

    /// When the machine next needs a [`Input::Tick`]; `None` once it has left.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.leaving {
            return None;
        }
        let mut next = self.next_probe.min(self.next_reconnect).min(self.next_reap);
        for p in self.probes.values() {
            next = next.min(if p.indirect_sent { p.end } else { p.direct_deadline });
        }
        for r in self.relays.values() {
            next = next.min(r.deadline);
        }
        for s in self.suspicions.values() {
            next = next.min(s.deadline);
        }
        if let Some(j) = &self.join_pending {
            next = next.min(j.retry_at);
        }
        if let Some(at) = self.capacity_due() {
            next = next.min(at);
        }
        Some(next)
    }

    /// Feeds one input and returns what to do.
    pub fn handle(&mut self, input: Input<I>, now: Instant) -> Vec<Output<I>> {
        match input {
            Input::Tick => self.tick(now),
            Input::Message { from, message } => self.on_message(from, message, now),
            Input::Broadcast { updates } => {
                for u in updates.into_iter().take(MAX_UPDATES_PER_MESSAGE) {
                    self.apply(u, Via::Flood, now);
                }
            }
            Input::Contact { peer } => self.on_contact(peer, now),
            Input::Unreachable { peer } => {
                self.probes.retain(|_, p| p.target != peer);
                // As a helper we cannot tell either: no nack, which would count as a witness.
                self.relays.retain(|_, r| r.target != peer);
            }
            Input::SetCapacity(c) => {
                self.capacity = c;
                self.announce_capacity_if_due(now);
            }
            Input::Leave => self.leave(),
        }
        std::mem::take(&mut self.out)
    }

    // ---- probing -------------------------------------------------------------------------

    fn tick(&mut self, now: Instant) {
        if self.leaving {
            return;
        }
        self.expire_probes(now);
        self.expire_relays(now);
        self.expire_suspicions(now);
        if now >= self.next_probe {
            self.start_probe(now);
        }
        if now >= self.next_reconnect {
            self.next_reconnect = now + self.config.reconnect_interval;
            self.reconnect_probe();
        }
        if now >= self.next_reap {
            self.next_reap = now + Duration::from_secs(10);
            self.reap(now);
        }
        if let Some(j) = &mut self.join_pending
            && now >= j.retry_at
        {
            // Some page was lost (or the peer is gone): ask again, for the missing pages only
            // where some arrived. At 10,000 members the list is some 80 pages; asking for all
            // of it again after every single loss would rarely finish under heavy loss.
            j.retry_at = now + self.config.join_retry;
            let asks: Vec<(I, Vec<u16>)> = j
                .peers
                .iter()
                .map(|p| {
                    let missing = match j.received.get(p) {
                        Some((total, got)) if !got.is_empty() => (0..*total)
                            .filter(|i| !got.contains(i))
                            .take(MAX_UPDATES_PER_MESSAGE)
                            .collect(),
                        _ => Vec::new(),
                    };
                    (p.clone(), missing)
                })
                .collect();
            for (p, missing) in asks {
                self.send_join(p, true, missing);
            }
        }
        self.announce_capacity_if_due(now);
    }

    fn scaled(&self, d: Duration) -> Duration {
        d * (1 + self.local_health)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn start_probe(&mut self, now: Instant) {
        self.next_probe = now + self.scaled(self.config.probe_interval);
        if self.probes.len() >= MAX_PROBES {
            return;
        }
        let Some(target) = self.next_probe_target() else {
            return;
        };
        let seq = self.next_seq();
        let timeout = self.scaled(self.config.probe_timeout);
        self.probes.insert(
            seq,
            Probe {
                target: target.clone(),
                direct_deadline: now + timeout,
                end: now + timeout * 3,
                indirect_sent: false,
                expected_nacks: 0,
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

    fn expire_probes(&mut self, now: Instant) {
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
                if let Some(p) = self.probes.get_mut(&seq) {
                    p.expected_nacks = u32::try_from(helpers.len()).unwrap_or(u32::MAX);
                }
                for h in helpers {
                    let updates = self.piggyback_for(&h);
                    self.send(h, Message::PingReq { seq, target: target.clone(), updates });
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
            self.suspect(probe.target, witnesses, now);
        }
    }

    fn expire_relays(&mut self, now: Instant) {
        let due: Vec<u32> =
            self.relays.iter().filter(|(_, r)| now >= r.deadline).map(|(s, _)| *s).collect();
        for seq in due {
            if let Some(r) = self.relays.remove(&seq) {
                self.send(r.origin, Message::Nack { seq: r.origin_seq });
            }
        }
    }

    fn on_ack(&mut self, seq: u32) {
        if let Some(relay) = self.relays.remove(&seq) {
            let updates = self.piggyback_for(&relay.origin);
            self.send(
                relay.origin,
                Message::Ack { seq: relay.origin_seq, incarnation: self.incarnation, updates },
            );
            return;
        }
        // The ack comes from the target itself or from a helper we asked; either proves it.
        if self.probes.remove(&seq).is_some() {
            self.local_health = self.local_health.saturating_sub(1);
        }
    }

    fn reconnect_probe(&mut self) {
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

    // ---- suspicion -----------------------------------------------------------------------

    fn suspicion_timeout(&self, confirmations: u32) -> Duration {
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
        if k == 0 {
            return self.config.suspicion_min;
        }
        let c = confirmations.min(k);
        let frac = f64::from(c + 1).ln() / f64::from(k + 1).ln();
        let (min, max) = (self.config.suspicion_min, self.config.suspicion_max);
        max.saturating_sub((max - min).mul_f64(frac)).max(min)
    }

    fn suspect(&mut self, target: I, witnesses: u8, now: Instant) {
        let Some(m) = self.members.get(&target) else {
            return;
        };
        if m.state != State::Alive {
            return;
        }
        let update = Update {
            id: target.clone(),
            incarnation: m.incarnation,
            kind: UpdateKind::Suspect { by: self.me.clone(), witnesses },
        };
        if self.apply(update.clone(), Via::Local, now) {
            self.out.push(Output::Broadcast(vec![update.clone()]));
            // Buddy system: tell the suspect at once so that it can refute.
            let seq = self.next_seq();
            let mut updates = vec![update];
            updates.extend(self.piggyback(&target, self.config.piggyback_bytes / 2));
            self.send(target, Message::Ping { seq, incarnation: self.incarnation, updates });
        }
    }

    fn expire_suspicions(&mut self, now: Instant) {
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
            let update =
                Update { id: id.clone(), incarnation: s.incarnation, kind: UpdateKind::Dead };
            self.apply(update, Via::Local, now);
        }
    }

    // ---- messages ------------------------------------------------------------------------

    fn on_message(&mut self, from: I, message: Message<I>, now: Instant) {
        if from == self.me {
            return;
        }
        if self.leaving {
            // Until the process stops, answer probes with the leave itself: the prober gets
            // its ack (no suspicion) and the news in one message.
            if let Message::Ping { seq, .. } = message {
                let left = Update {
                    id: self.me.clone(),
                    incarnation: self.incarnation,
                    kind: UpdateKind::Left,
                };
                self.send(
                    from,
                    Message::Ack { seq, incarnation: self.incarnation, updates: vec![left] },
                );
            }
            return;
        }
        let mut sender_incarnation = None;
        let updates = match message {
            Message::Ping { seq, incarnation, updates } => {
                if !self.leaving {
                    let reply = self.piggyback_for(&from);
                    self.send(
                        from.clone(),
                        Message::Ack { seq, incarnation: self.incarnation, updates: reply },
                    );
                }
                sender_incarnation = Some(incarnation);
                updates
            }
            Message::Ack { seq, incarnation, updates } => {
                self.on_ack(seq);
                sender_incarnation = Some(incarnation);
                updates
            }
            Message::PingReq { seq, target, updates } => {
                if !self.leaving && self.relays.len() < MAX_RELAYS && target != self.me {
                    let my_seq = self.next_seq();
                    self.relays.insert(
                        my_seq,
                        Relay {
                            origin: from.clone(),
                            target: target.clone(),
                            origin_seq: seq,
                            deadline: now + self.scaled(self.config.probe_timeout),
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
                        Message::Ping {
                            seq: my_seq,
                            incarnation: self.incarnation,
                            updates: Vec::new(),
                        },
                    );
                }
                updates
            }
            Message::Nack { seq } => {
                if let Some(p) = self.probes.get_mut(&seq) {
                    p.nacks += 1;
                }
                Vec::new()
            }
            Message::Join { updates, want_sync, pages } => {
                for u in updates.into_iter().take(2) {
                    // A joiner speaks only for itself.
                    if u.id == from {
                        self.apply(u, Via::FirstHand, now);
                    }
                }
                self.flood_firsthand();
                if want_sync && !self.leaving {
                    self.send_sync(&from, &pages);
                } else if self.members.get(&from).is_some_and(|m| m.state != State::Alive) {
                    // It is not alive in our view at the incarnation it claims: tell it why.
                    let news = self.liveness_update(&from);
                    self.send(
                        from.clone(),
                        Message::Sync { page: 0, pages: 1, updates: news.into_iter().collect() },
                    );
                }
                Vec::new()
            }
            Message::Sync { page, pages, updates } => {
                // Only the peers we asked count towards a complete list; a single-page
                // correction from anyone else does not end the join.
                if let Some(j) = self.join_pending.as_mut().filter(|j| j.peers.contains(&from)) {
                    // Pages are arriving: wait for the rest before asking again.
                    j.retry_at = now + self.config.join_retry;
                    let (total, got) = j.received.entry(from.clone()).or_default();
                    // The list may have been re-paged between two answers: the latest count
                    // wins, pages already received still count.
                    *total = pages;
                    if page < pages && !got.contains(&page) {
                        got.push(page);
                    }
                    if (0..pages).all(|p| got.contains(&p)) {
                        self.join_pending = None;
                    }
                }
                for u in updates.into_iter().take(MAX_UPDATES_PER_MESSAGE) {
                    self.apply(u, Via::Sync, now);
                }
                Vec::new()
            }
        };
        let mut speaks_for_itself = false;
        for u in updates.into_iter().take(MAX_UPDATES_PER_MESSAGE) {
            let via = if u.id == from { Via::FirstHand } else { Via::Direct };
            speaks_for_itself |= u.id == from && u.kind.is_liveness();
            self.apply(u, via, now);
        }
        // A ping or ack is itself first-hand news that its sender is alive, unless the sender
        // said something else about itself (a leave notice). This is how a member that missed
        // a join flood learns of the joiner at the latest when the joiner first probes it.
        if let (Some(incarnation), false) = (sender_incarnation, speaks_for_itself) {
            self.apply(
                Update { id: from.clone(), incarnation, kind: UpdateKind::Alive },
                Via::Implied,
                now,
            );
        }
        self.flood_firsthand();
        // A message from a member we hold as dead or suspect is evidence it lives: attach what
        // we believe so that it refutes (this is how healed partitions merge).
        if let Some(m) = self.members.get(&from)
            && matches!(m.state, State::Dead | State::Suspect | State::Left)
            && !self.leaving
            && let Some(news) = self.liveness_update(&from)
        {
            let seq = self.next_seq();
            self.send(
                from,
                Message::Ping { seq, incarnation: self.incarnation, updates: vec![news] },
            );
        }
    }

    fn on_contact(&mut self, peer: I, now: Instant) {
        if peer == self.me || self.leaving {
            return;
        }
        let known_alive = self
            .members
            .get(&peer)
            .is_some_and(|m| matches!(m.state, State::Alive | State::Suspect));
        if known_alive {
            return;
        }
        // With nobody else known we are joining: ask for the member list and keep asking.
        let joining = self.alive_count <= 1;
        if joining {
            let at = now + self.config.join_retry;
            match &mut self.join_pending {
                Some(j) => {
                    if !j.peers.contains(&peer) && j.peers.len() < MAX_SEEDS {
                        j.peers.push(peer.clone());
                    }
                }
                None => {
                    self.join_pending = Some(Joining {
                        peers: vec![peer.clone()],
                        retry_at: at,
                        received: Map::default(),
                    })
                }
            }
        }
        self.send_join(peer, joining, Vec::new());
    }

    fn send_join(&mut self, peer: I, want_sync: bool, pages: Vec<u16>) {
        let mut updates = vec![Update {
            id: self.me.clone(),
            incarnation: self.incarnation,
            kind: UpdateKind::Alive,
        }];
        updates.extend(self.own_capacity_update());
        self.send(peer, Message::Join { updates, want_sync, pages });
    }

    /// Sends the member list to `to`: the pages numbered in `wanted`, or all when empty.
    fn send_sync(&mut self, to: &I, wanted: &[u16]) {
        let mut page = Vec::new();
        let mut size = 0;
        let mut ids: Vec<&I> = self.members.keys().collect();
        ids.sort();
        let mut pages = Vec::new();
        for id in ids {
            let m = &self.members[id];
            let mut news = vec![Update {
                id: id.clone(),
                incarnation: m.incarnation,
                kind: liveness_kind(m.state, &self.me),
            }];
            if let Some((inc, version, capacity)) = m.capacity {
                news.push(Update {
                    id: id.clone(),
                    incarnation: inc,
                    kind: UpdateKind::Capacity { version, capacity },
                });
            }
            for u in news {
                let s = encoded_len(&u);
                let full = size + s > self.config.sync_chunk_bytes
                    || page.len() >= MAX_UPDATES_PER_MESSAGE;
                if full && !page.is_empty() {
                    pages.push(std::mem::take(&mut page));
                    size = 0;
                }
                size += s;
                page.push(u);
            }
        }
        if !page.is_empty() {
            pages.push(page);
        }
        let count = u16::try_from(pages.len()).unwrap_or(u16::MAX);
        for (i, updates) in pages.into_iter().enumerate().take(usize::from(count)) {
            let page = u16::try_from(i).unwrap_or(u16::MAX);
            if wanted.is_empty() || wanted.contains(&page) {
                self.send(to.clone(), Message::Sync { page, pages: count, updates });
            }
        }
    }

    fn liveness_update(&self, id: &I) -> Option<Update<I>> {
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

    fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        let update =
            Update { id: self.me.clone(), incarnation: self.incarnation, kind: UpdateKind::Left };
        if let Some(m) = self.members.get_mut(&self.me) {
            m.state = State::Left;
        }
        self.out.push(Output::Event(Event::State {
            id: self.me.clone(),
            previous: Some(State::Alive),
            state: State::Left,
            incarnation: self.incarnation,
        }));
        self.out.push(Output::Broadcast(vec![update.clone()]));
        for peer in self.random_live(LEAVE_DIRECT, &[]) {
            let seq = self.next_seq();
            self.send(
                peer,
                Message::Ping { seq, incarnation: self.incarnation, updates: vec![update.clone()] },
            );
        }
        self.probes.clear();
        self.relays.clear();
        self.suspicions.clear();
    }

    // ---- applying news -------------------------------------------------------------------

    /// Applies one update; returns whether it changed this node's view.
    fn apply(&mut self, u: Update<I>, via: Via, now: Instant) -> bool {
        if u.id == self.me {
            self.about_me(u);
            return false;
        }
        if let UpdateKind::Capacity { version, capacity } = u.kind {
            return self.apply_capacity(u.id, u.incarnation, version, capacity);
        }
        let existing = self.members.get(&u.id).map(|m| (m.state, m.incarnation));
        let accept = match (&u.kind, existing) {
            (UpdateKind::Alive, None) => true,
            (UpdateKind::Alive, Some((_, inc))) => u.incarnation > inc,
            // Bad news about a stranger is ignored (it may be about a member we already
            // forgot), except in the member list a joiner receives.
            (UpdateKind::Suspect { .. } | UpdateKind::Dead | UpdateKind::Left, None) => {
                via == Via::Sync
            }
            (UpdateKind::Suspect { .. }, Some((state, inc))) => {
                u.incarnation > inc || (u.incarnation == inc && state == State::Alive)
            }
            (UpdateKind::Dead, Some((state, inc))) => {
                u.incarnation > inc
                    || (u.incarnation == inc && matches!(state, State::Alive | State::Suspect))
            }
            (UpdateKind::Left, Some((state, inc))) => u.incarnation >= inc && state != State::Left,
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
    fn flood_firsthand(&mut self) {
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

    fn confirm(&mut self, id: &I, by: I, witnesses: u32, now: Instant) {
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
        let deadline = started + self.suspicion_timeout(confirmations);
        if let Some(s) = self.suspicions.get_mut(id) {
            s.deadline = s.deadline.min(deadline.max(now));
        }
    }

    fn about_me(&mut self, u: Update<I>) {
        if self.leaving {
            return;
        }
        let refute = match u.kind {
            UpdateKind::Alive => u.incarnation > self.incarnation,
            UpdateKind::Suspect { .. } | UpdateKind::Dead | UpdateKind::Left => {
                u.incarnation >= self.incarnation
            }
            UpdateKind::Capacity { version, .. } => {
                // Someone holds a newer summary of ours than we know (we restarted): jump past it.
                if (u.incarnation, version) > (self.incarnation, self.capacity_version) {
                    self.incarnation = u.incarnation + 1;
                    self.refute();
                }
                return;
            }
        };
        if !refute {
            return;
        }
        if !matches!(u.kind, UpdateKind::Alive) {
            // Lifeguard: being suspected hints that we are the slow one.
            self.local_health = (self.local_health + 1).min(self.config.max_local_health);
        }
        self.incarnation = u.incarnation + 1;
        self.refute();
    }

    fn refute(&mut self) {
        if let Some(m) = self.members.get_mut(&self.me) {
            m.incarnation = self.incarnation;
            m.state = State::Alive;
        }
        let mut updates = vec![Update {
            id: self.me.clone(),
            incarnation: self.incarnation,
            kind: UpdateKind::Alive,
        }];
        self.capacity_version = 0;
        self.announced.0 = self.capacity;
        updates.extend(self.own_capacity_update());
        if let Some(m) = self.members.get_mut(&self.me) {
            m.capacity = Some((self.incarnation, 0, self.capacity));
        }
        self.out.push(Output::Broadcast(updates.clone()));
        for u in updates {
            self.enqueue(u);
        }
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

    // ---- capacity announcements ----------------------------------------------------------

    /// The summary last announced, with the version it was announced under.
    fn own_capacity_update(&self) -> Option<Update<I>> {
        Some(Update {
            id: self.me.clone(),
            incarnation: self.incarnation,
            kind: UpdateKind::Capacity {
                version: self.capacity_version,
                capacity: self.announced.0,
            },
        })
    }

    /// Shortest interval between two of our capacity floods that keeps every node within
    /// `capacity_budget` bytes per second for all members' capacity floods together.
    fn capacity_interval(&self) -> Duration {
        let size = (MESSAGE_OVERHEAD + 64) as f64;
        let per_node = size * f64::from(self.config.flood_degree) * self.alive_count as f64;
        let secs = per_node / f64::from(self.config.capacity_budget.max(1));
        Duration::from_secs_f64(secs.min(86_400.0)).max(self.config.capacity_min_interval)
    }

    fn capacity_due(&self) -> Option<Instant> {
        if self.leaving || self.alive_count <= 1 {
            return None;
        }
        let (last, at) = self.announced;
        let min = at + self.capacity_interval();
        if self.capacity.differs_meaningfully(&last) {
            Some(min)
        } else {
            Some(min.max(at + self.config.capacity_refresh))
        }
    }

    fn announce_capacity_if_due(&mut self, now: Instant) {
        if self.capacity_due().is_none_or(|at| now < at) {
            return;
        }
        self.capacity_version = self.capacity_version.wrapping_add(1);
        self.announced = (self.capacity, now);
        if let Some(m) = self.members.get_mut(&self.me) {
            m.capacity = Some((self.incarnation, self.capacity_version, self.capacity));
        }
        if let Some(u) = self.own_capacity_update() {
            self.out.push(Output::Broadcast(vec![u]));
        }
    }

    // ---- housekeeping --------------------------------------------------------------------

    fn reap(&mut self, now: Instant) {
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

    fn random_live(&mut self, k: usize, exclude: &[I]) -> Vec<I> {
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

    // ---- piggyback queue -----------------------------------------------------------------

    fn enqueue(&mut self, update: Update<I>) {
        let liveness = update.kind.is_liveness();
        self.queue
            .retain(|q| !(q.update.id == update.id && q.update.kind.is_liveness() == liveness));
        if self.queue.len() >= MAX_QUEUE {
            // Drop the most retransmitted entry: it has had the most chances already.
            if let Some(i) =
                self.queue.iter().enumerate().max_by_key(|(_, q)| q.transmits).map(|(i, _)| i)
            {
                self.queue.swap_remove(i);
            }
        }
        let size = encoded_len(&update);
        self.queue.push(Queued { update, size, transmits: 0 });
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.alive_count as f64 + 1.0;
        self.config.retransmit_mult * (n.log10().ceil() as u32).max(1)
    }

    fn piggyback_for(&mut self, to: &I) -> Vec<Update<I>> {
        self.piggyback(to, self.config.piggyback_bytes)
    }

    /// Takes the least-transmitted queued updates that fit in `budget` bytes.
    fn piggyback(&mut self, to: &I, budget: usize) -> Vec<Update<I>> {
        if self.queue.is_empty() {
            return Vec::new();
        }
        let limit = self.retransmit_limit();
        self.queue.sort_by_key(|q| q.transmits);
        let mut used = 0;
        let mut picked = Vec::new();
        for q in &mut self.queue {
            if &q.update.id == to
                && !matches!(q.update.kind, UpdateKind::Suspect { .. } | UpdateKind::Dead)
            {
                // It knows best about itself, except for the news it must refute.
                continue;
            }
            if used + q.size > budget {
                continue;
            }
            used += q.size;
            q.transmits += 1;
            picked.push(q.update.clone());
        }
        self.queue.retain(|q| q.transmits < limit);
        picked
    }

    fn send(&mut self, to: I, message: Message<I>) {
        self.out.push(Output::Send { to, message });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
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
    /// Learned from the member list sent to us as a joiner.
    Sync,
}

fn liveness_kind<I: Clone>(state: State, me: &I) -> UpdateKind<I> {
    match state {
        State::Alive => UpdateKind::Alive,
        // Only reached without a suspicion record; the news is then ours to vouch for.
        State::Suspect => UpdateKind::Suspect { by: me.clone(), witnesses: 1 },
        State::Dead => UpdateKind::Dead,
        State::Left => UpdateKind::Left,
    }
}

fn view<I: Clone>(id: &I, m: &Member) -> MemberView<I> {
    MemberView {
        id: id.clone(),
        state: m.state,
        incarnation: m.incarnation,
        capacity: m.capacity.map(|(_, _, c)| c),
    }
}

/// Encoded size of a value in the wire format (postcard), for byte budgets.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    // Serializing into the size-counting flavor cannot fail for our types; a huge figure on
    // failure keeps budgets conservative.
    postcard::experimental::serialized_size(value).unwrap_or(usize::MAX / 4)
}

#[cfg(test)]
mod tests;
