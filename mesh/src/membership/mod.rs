//! Membership: who is in the cluster, who is alive, and what each member can run.
//!
//! This module is a sans-I/O state machine: [`Membership::handle`] takes an [`Input`] and the
//! current time and returns [`Output`]s; [`Membership::next_deadline`] says when it next wants a
//! [`Input::Tick`]. It owns no sockets, timers or tasks, so the swarm task drives it in
//! production and `sim` (behind the `test-utils` feature) drives ten thousand of them
//! deterministically from one seed.
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
//! * **Signed news.** Every [`Update`] carries its author's signature ([`Seal`]): a member
//!   signs its own alive, leave and capacity news, a suspector its suspicion, a node whose
//!   timer ran out its death notice. Relays can carry news but not change it, so a member's
//!   own word counts whoever relays it, at any incarnation above the one held. Bad news is
//!   taken only about a known, live member, at most one incarnation above what the member
//!   itself vouched for (nobody can push it to `u32::MAX`); a death notice from another node
//!   counts as that node's suspicion, so the subject still gets its time to refute; a node
//!   refutes once per input however much bad news about it the input held; and only the
//!   member list a joiner asked for is believed as a joiner's. A ping or ack tells its
//!   receiver, unsigned, that the sender lives (the transport authenticated it): believed,
//!   never relayed. Signatures are checked only for news that would change the view, so
//!   copies of known news cost nothing.
//! * **Suspicion (Lifeguard).** A suspect is declared dead when its suspicion timer runs out.
//!   The timer starts at `suspicion_max` and shrinks logarithmically towards `suspicion_min` as
//!   independent witnesses confirm it: the helpers that nacked count as witnesses, and so does
//!   every other node that suspects the same member independently. Deaths are not flooded:
//!   every node that got the suspicion runs the same timer.
//! * **Joining.** A node that knows nobody sends `Join` to a peer it found and receives the
//!   member list in pages of at most `sync_chunk_bytes`; after a loss it asks for the missing
//!   pages only. One peer is sent at most the list and half of it again (at least 16 pages)
//!   at once, refilled over `SYNC_WINDOW` (60 s): asking again and again amplifies nothing.
//! * **Suspicion budget.** Each node charges a member for every suspicion by it that was
//!   refuted, per suspect and (different suspects in turn) in all; past four, then one per
//!   10 s, its bad news about that suspect (or anyone) is ignored (and a flood of it not
//!   forwarded, [`Membership::holds_blamed_news`]). Ignoring bad news only delays a
//!   detection, so nodes need not agree on the budgets. The victim refutes whoever accuses
//!   it: it cannot know who else holds the suspicion.
//! * **Refutation.** A live node that hears it is suspect or dead raises its incarnation and
//!   floods `Alive`. The suspecting node also tells the suspect directly, so refutation starts
//!   one hop after the suspicion does.
//! * **Local health (Lifeguard).** A node whose probes fail without the expected nacks, or that
//!   has to refute suspicions about itself, is probably the slow one; it raises its local health
//!   multiplier, which stretches its probe timeouts and intervals, so a struggling node stops
//!   accusing healthy ones. A driver that woke late tells the core so ([`Input::Stalled`]):
//!   every wait in flight is stretched by the stall, since what fell due while the node was
//!   not running is no evidence against anyone, and local health rises.
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

/// A wake-up at least this late for the deadline [`Membership::next_deadline`] asked for
/// means this node was not running ([`Input::Stalled`]): a tokio timer fires within a
/// millisecond or two of its deadline on a node that runs, and 20 ms is well under the
/// shortest probe wait (50 ms), so a stall long enough to cost a probe its ack is seen.
pub const STALL: Duration = Duration::from_millis(20);

mod capacity;
mod config;
mod join;
mod news;
mod piggyback;
mod probing;
#[cfg(any(test, feature = "test-utils"))]
pub mod sim;
mod suspicion;
mod wire;

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{BuildHasherDefault, Hash};
use std::time::{Duration, Instant};

use cloudless_types::Capacity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::budget::Budgets;
pub(crate) use config::millis;
pub use config::{Config, ConfigError, MAX_PIGGYBACK_BYTES};
use join::{Joining, SYNC_WINDOW};
use news::{Via, view};
use piggyback::Queued;
use probing::{Probe, Relay};
use suspicion::Suspicion;
use suspicion::blame_budgets;
pub use wire::{
    Event, FLOOD_ENVELOPE, Input, MAX_FLOOD_UPDATES, MAX_UPDATES_PER_MESSAGE, MESSAGE_OVERHEAD,
    MemberView, Message, Output, Seal, Signature, State, Update, UpdateKind, encoded_len,
};

/// What a member identifier must support: a PeerId in production, a small integer in the
/// simulator.
pub trait Id:
    Clone + Eq + Ord + Hash + Debug + Serialize + DeserializeOwned + Send + 'static
{
}
impl<T: Clone + Eq + Ord + Hash + Debug + Serialize + DeserializeOwned + Send + 'static> Id for T {}

/// Deterministic hasher: the simulator must replay identically from a seed.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

#[derive(Clone, Debug)]
struct Member<I> {
    state: State,
    incarnation: u32,
    /// The highest incarnation the member itself vouched for (its signed news, its pings).
    /// Bad news may name one more, never higher, and never moves this.
    vouched: u32,
    /// Its newest own signed liveness news (alive or left), the one we relay for it. It may
    /// be older than `incarnation` when we know the newest only from its (unsigned) pings.
    own: Option<Said<I>>,
    /// Its newest signed capacity summary.
    capacity: Option<Summary>,
    /// Its round trip, from the direct acks of our probes.
    rtt: probing::Rtt,
}

/// Signed liveness news held for a member, without the id it is stored under (every node
/// holds one per member: the simulator holds a hundred million).
#[derive(Clone, Debug)]
struct Said<I> {
    incarnation: u32,
    kind: Liveness<I>,
    signature: Signature,
}

/// The liveness kinds of [`UpdateKind`].
#[derive(Clone, Debug, PartialEq)]
enum Liveness<I> {
    Alive,
    Left,
    Suspect { by: I, witnesses: u8 },
    Dead { by: I },
}

/// A signed capacity summary held for a member.
#[derive(Clone, Debug)]
struct Summary {
    incarnation: u32,
    version: u32,
    capacity: Capacity,
    signature: Signature,
}

impl<I: Clone> Said<I> {
    /// The liveness news `u` holds, if it is liveness news.
    fn of(u: &Update<I>) -> Option<Self> {
        let kind = match &u.kind {
            UpdateKind::Alive => Liveness::Alive,
            UpdateKind::Left => Liveness::Left,
            UpdateKind::Suspect { by, witnesses } => {
                Liveness::Suspect { by: by.clone(), witnesses: *witnesses }
            }
            UpdateKind::Dead { by } => Liveness::Dead { by: by.clone() },
            UpdateKind::Capacity { .. } => return None,
        };
        Some(Said { incarnation: u.incarnation, kind, signature: u.signature.clone() })
    }

    /// The update again, about `id`.
    fn update(&self, id: &I) -> Update<I> {
        let kind = match &self.kind {
            Liveness::Alive => UpdateKind::Alive,
            Liveness::Left => UpdateKind::Left,
            Liveness::Suspect { by, witnesses } => {
                UpdateKind::Suspect { by: by.clone(), witnesses: *witnesses }
            }
            Liveness::Dead { by } => UpdateKind::Dead { by: by.clone() },
        };
        Update {
            id: id.clone(),
            incarnation: self.incarnation,
            kind,
            signature: self.signature.clone(),
        }
    }
}

impl Summary {
    /// The summary `u` holds, if it is a capacity update.
    fn of<I>(u: &Update<I>) -> Option<Self> {
        let (incarnation, version, capacity) = summary(u)?;
        Some(Summary { incarnation, version, capacity, signature: u.signature.clone() })
    }

    /// The update again, about `id`.
    fn update<I: Clone>(&self, id: &I) -> Update<I> {
        Update {
            id: id.clone(),
            incarnation: self.incarnation,
            kind: UpdateKind::Capacity { version: self.version, capacity: self.capacity },
            signature: self.signature.clone(),
        }
    }
}

impl<I: Clone> Member<I> {
    fn own_update(&self, id: &I) -> Option<Update<I>> {
        self.own.as_ref().map(|p| p.update(id))
    }

    fn capacity_update(&self, id: &I) -> Option<Update<I>> {
        self.capacity.as_ref().map(|c| c.update(id))
    }
}

/// `(incarnation, version, summary)` of a capacity update.
fn summary<I>(u: &Update<I>) -> Option<(u32, u32, Capacity)> {
    match &u.kind {
        UpdateKind::Capacity { version, capacity } => Some((u.incarnation, *version, *capacity)),
        _ => None,
    }
}

/// The membership state machine of one node. See the [module docs](self).
pub struct Membership<I: Id> {
    me: I,
    config: Config,
    seal: Box<dyn Seal<I>>,
    rng: ChaCha8Rng,
    incarnation: u32,
    leaving: bool,
    members: Map<I, Member<I>>,
    /// Round-robin probe order; holds every non-left member, stale entries are skipped.
    probe_order: Vec<I>,
    probe_index: usize,
    /// Members currently dead, for reconnect probes and reaping.
    gone: Map<I, Instant>,
    /// The signed bad news (suspicion or death notice) behind each suspect and dead member,
    /// the one we relay about it.
    notices: Map<I, Said<I>>,
    /// Bad news about this node heard in the current input, at the highest incarnation:
    /// refuted once, when the input is done (a message full of it costs one refutation).
    refute_above: Option<u32>,
    /// Whether the input being handled held a forged update (see `signed_by_author`).
    forged: bool,
    /// When this node last refuted: refutations are at most one per probe interval, so a
    /// member that keeps sending bad news about us costs the pool one flood per interval.
    last_refute: Option<Instant>,
    /// The authors of the bad news the next refutation answers (charged when it is made).
    accusers: Vec<I>,
    /// Refuted suspicions each member may still author (see `blamed`).
    blame: Budgets<I>,
    /// The suspect each member in `blame` was last charged for.
    blamed_for: Map<I, I>,
    /// The same per accuser and suspect: a member that suspects one other again and again is
    /// not believed about it, whoever is at fault (the two look alike from outside: a liar,
    /// or a suspect that fails probes on purpose and refutes).
    pair_blame: Budgets<(I, I)>,
    suspicions: Map<I, Suspicion<I>>,
    probes: Map<u32, Probe<I>>,
    relays: Map<u32, Relay<I>>,
    queue: Vec<Queued<I>>,
    seq: u32,
    local_health: u32,
    /// Stalls this node was told of.
    stalls: u64,
    next_probe: Instant,
    next_reconnect: Instant,
    next_reap: Instant,
    /// Joining: contacted peers, until one has sent the whole member list.
    join_pending: Option<Joining<I>>,
    /// Member-list pages each peer may still be sent (the burst follows the list's size).
    synced: Budgets<I>,
    capacity: Capacity,
    capacity_version: u32,
    /// The summary last announced, and when.
    announced: (Capacity, Instant),
    /// Encoded size of our signed summary, for the capacity budget (asked after every input).
    capacity_bytes: usize,
    alive_count: usize,
    /// A member whose return we learned first hand while handling the current message.
    firsthand: Option<I>,
    out: Vec<Output<I>>,
}

impl<I: Id> Membership<I> {
    /// A node `me` that starts alone, at `incarnation` (persist the last one to restart
    /// above it), signing its news with `seal`, with randomness from `seed`.
    pub fn new(
        me: I,
        config: Config,
        capacity: Capacity,
        incarnation: u32,
        seal: Box<dyn Seal<I>>,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Spread probe starts so that nodes started together do not probe in lockstep.
        let jitter = config.probe_interval.mul_f64(rng.gen_range(0.0..1.0));
        let mut members = Map::default();
        let alive = Update::signed(me.clone(), incarnation, UpdateKind::Alive, &*seal);
        let summary = Update::signed(
            me.clone(),
            incarnation,
            UpdateKind::Capacity { version: 0, capacity },
            &*seal,
        );
        let capacity_bytes = encoded_len(&summary);
        let max_members = config.max_members;
        members.insert(
            me.clone(),
            Member {
                state: State::Alive,
                incarnation,
                vouched: incarnation,
                own: Said::of(&alive),
                capacity: Summary::of(&summary),
                rtt: probing::Rtt::default(),
            },
        );
        Membership {
            next_probe: now + jitter,
            next_reconnect: now + config.reconnect_interval,
            next_reap: now + Duration::from_secs(10),
            me,
            config,
            seal,
            rng,
            incarnation,
            leaving: false,
            members,
            probe_order: Vec::new(),
            probe_index: 0,
            gone: Map::default(),
            notices: Map::default(),
            refute_above: None,
            last_refute: None,
            accusers: Vec::new(),
            blame: blame_budgets(max_members),
            blamed_for: Map::default(),
            pair_blame: blame_budgets(max_members),
            forged: false,
            suspicions: Map::default(),
            probes: Map::default(),
            relays: Map::default(),
            queue: Vec::new(),
            seq: 0,
            local_health: 0,
            stalls: 0,
            join_pending: None,
            synced: Budgets::new(join::sync_budget(1), SYNC_WINDOW, max_members),
            capacity,
            capacity_version: 0,
            // The join message carries the summary; the first flood waits for a change.
            announced: (capacity, now),
            capacity_bytes,
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
        if self.refute_above.is_some()
            && let Some(at) = self.last_refute
        {
            next = next.min(at + self.config.probe_interval);
        }
        Some(next)
    }

    /// Feeds one input and returns what to do.
    pub fn handle(&mut self, input: Input<I>, now: Instant) -> Vec<Output<I>> {
        self.forged = false;
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
            Input::Stalled { late } => {
                if late >= STALL && !self.leaving {
                    self.pardon_stall(late);
                }
            }
        }
        self.refute_if_told(now);
        std::mem::take(&mut self.out)
    }

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
        self.retry_join(now);
        self.announce_capacity_if_due(now);
    }

    /// This node was not running for `late` (its process starved of CPU, or the device
    /// asleep): what fell due meanwhile is no evidence against anyone, since an ack or a
    /// refutation may be waiting unread in this node's own queues. Every wait in flight (probes,
    /// relays, suspicions) is stretched by the stall, at most `suspicion_max`; and, as
    /// Lifeguard does for missed nacks, a node that stalls is the slow one, so its local health
    /// rises and it probes less often and waits longer until its acks come back on time.
    fn pardon_stall(&mut self, late: Duration) {
        let by = late.min(self.config.suspicion_max);
        for p in self.probes.values_mut() {
            p.direct_deadline += by;
            p.end += by;
        }
        for r in self.relays.values_mut() {
            r.deadline += by;
        }
        for s in self.suspicions.values_mut() {
            s.deadline += by;
        }
        self.local_health = (self.local_health + 1).min(self.config.max_local_health);
        self.stalls = self.stalls.saturating_add(1);
    }

    /// How many stalls ([`Input::Stalled`], [`STALL`] or longer) this node was told of.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    fn on_message(&mut self, from: I, message: Message<I>, now: Instant) {
        if from == self.me {
            return;
        }
        if self.leaving {
            // Until the process stops, answer probes with the leave itself: the prober gets
            // its ack (no suspicion) and the news in one message.
            if let Message::Ping { seq, .. } = message {
                let left = self.members.get(&self.me).and_then(|m| m.own_update(&self.me));
                self.send(
                    from,
                    Message::Ack {
                        seq,
                        incarnation: self.incarnation,
                        updates: left.into_iter().collect(),
                    },
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
                self.on_ack(&from, seq, now);
                sender_incarnation = Some(incarnation);
                updates
            }
            Message::PingReq { seq, target, within_ms, updates } => {
                self.on_ping_req(&from, seq, target, within_ms, now);
                updates
            }
            Message::Nack { seq } => {
                if let Some(p) = self.probes.get_mut(&seq)
                    && let Some(i) = p.helpers.iter().position(|h| *h == from)
                {
                    p.helpers.swap_remove(i);
                    p.nacks += 1;
                }
                Vec::new()
            }
            Message::Join { updates, want_sync, pages } => {
                self.on_join(&from, updates, want_sync, pages, now);
                Vec::new()
            }
            Message::Sync { page, pages, updates } => {
                self.on_sync(&from, page, pages, updates, now);
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
            self.implied_alive(from.clone(), incarnation, now);
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

    fn send(&mut self, to: I, message: Message<I>) {
        self.out.push(Output::Send { to, message });
    }
}

#[cfg(test)]
mod tests;
