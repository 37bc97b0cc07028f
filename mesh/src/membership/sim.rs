//! A deterministic, seeded simulator for the membership core.
//!
//! It runs one [`Membership`] per simulated node, exactly the code the mesh runs, and plays
//! the network itself: every point-to-point message gets a latency drawn uniformly from
//! `[latency_min, latency_max]` and is lost with probability `loss`; every flood
//! ([`Output::Broadcast`]) spreads as gossipsub's eager push does: the simulator keeps a random
//! overlay like gossipsub's mesh (every node grafts peers until it has `flood_degree`, prunes
//! above [`MESH_HIGH`], re-grafts below [`MESH_LOW`] when neighbours die) and each node
//! forwards its first copy to all its mesh peers, each copy again delayed and lossy. Nodes crash,
//! join and leave as Poisson processes. The same seed replays the same run.
//!
//! ```text
//!   event queue (time, seq) ──▶ Deliver / Flood / Timer / Churn ──▶ Membership::handle
//!          ▲                                                            │
//!          └──────── latency + loss ◀── Send / Broadcast ◀──────────────┘
//!                                        Event ──▶ trackers (who knows what, when)
//! ```
//!
//! What it reports, over the measurement window (after `warmup`):
//!
//! * for each join, the time until every live node holds the joiner alive;
//! * for each crash, the time until every live node holds it suspect or dead ("suspected by
//!   all") and until every live node holds it dead ("dead by all");
//! * for each voluntary leave, the time until every live node holds it as left;
//! * false deaths (a live node declared dead by anyone) and false suspicions;
//! * bytes sent per node per second, counting each message's encoded size plus
//!   [`MESSAGE_OVERHEAD`], and for floods also gossipsub's envelope ([`FLOOD_ENVELOPE`]) and
//!   its IHAVE gossip ([`FLOOD_IHAVE`]).
//!
//! Identifiers are serialized as 38 bytes, the size of a libp2p ed25519 PeerId, so byte counts
//! match production messages.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use cloudless_types::{Capacity, Power, Runtime, Runtimes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    Config, Event, FLOOD_ENVELOPE, Id, Input, MESSAGE_OVERHEAD, Membership, Message, Output, Seal,
    Signature, State, Update, encoded_len,
};

/// Bytes of IHAVE gossip each node sends per flood: a 20-byte message id to each of six lazy
/// peers.
pub const FLOOD_IHAVE: usize = 120;
/// Gossipsub's `D_low`: a node with fewer mesh peers grafts new ones.
pub const MESH_LOW: usize = 5;
/// Gossipsub's `D_high`: a node with this many mesh peers accepts no more grafts.
pub const MESH_HIGH: usize = 12;
/// Bytes of a libp2p ed25519 PeerId, the identifier size the simulator mimics.
const ID_BYTES: usize = 38;

/// A simulated node id that serializes like a PeerId (38 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimId(pub u32);

impl Serialize for SimId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut b = [0u8; ID_BYTES];
        b[..4].copy_from_slice(&self.0.to_be_bytes());
        s.serialize_bytes(&b)
    }
}

impl<'de> Deserialize<'de> for SimId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SimId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{ID_BYTES} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<SimId, E> {
                let head: [u8; 4] = v
                    .get(..4)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| E::invalid_length(v.len(), &self))?;
                Ok(SimId(u32::from_be_bytes(head)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The simulator's and unit tests' [`Seal`]: a keyed hash of author and claim in a
/// signature's 64 bytes. Same size on the wire as ed25519 and far cheaper to make; it is
/// unforgeable only by convention (simulated nodes sign as themselves, and tests forge by
/// signing as someone else).
#[derive(Clone, Debug)]
pub struct TestSeal<I>(pub I);

impl<I: Id> Seal<I> for TestSeal<I> {
    fn sign(&self, claim: &[u8]) -> Signature {
        test_tag(&self.0, claim)
    }

    fn verify(&self, author: &I, claim: &[u8], signature: &Signature) -> bool {
        test_tag(author, claim) == *signature
    }
}

fn test_tag<I: Hash>(author: &I, claim: &[u8]) -> Signature {
    // SipHash with fixed keys: deterministic, so runs replay from their seed.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    author.hash(&mut h);
    claim.hash(&mut h);
    let mut bytes = [0u8; 64];
    bytes[..8].copy_from_slice(&h.finish().to_be_bytes());
    Signature::new(bytes)
}

/// One simulation scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Nodes at the start, all members of one converged cluster.
    pub nodes: usize,
    /// Length of the measurement window.
    pub duration: Duration,
    /// Time simulated before measuring, to let probes settle into their rhythm.
    pub warmup: Duration,
    /// Shortest one-way latency.
    pub latency_min: Duration,
    /// Longest one-way latency.
    pub latency_max: Duration,
    /// Probability that any one message (or flood copy) is lost.
    pub loss: f64,
    /// Crashes per minute, as a fraction of the cluster (0.01 = 1 % of nodes per minute).
    pub crash_rate: f64,
    /// Joins of brand-new nodes per minute, as a fraction of the initial size.
    pub join_rate: f64,
    /// Voluntary leaves per minute, as a fraction of the cluster.
    pub leave_rate: f64,
    /// Seed for everything random.
    pub seed: u64,
    /// The membership protocol's settings.
    pub config: Config,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            nodes: 1000,
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(5),
            latency_min: Duration::from_millis(10),
            latency_max: Duration::from_millis(60),
            loss: 0.01,
            crash_rate: 0.002,
            join_rate: 0.002,
            leave_rate: 0.001,
            seed: 1,
            config: Config::default(),
        }
    }
}

/// Percentiles of a set of durations, in seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spread {
    /// Samples that completed.
    pub count: usize,
    /// Samples still incomplete at the end of the run.
    pub unfinished: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(mut samples: Vec<f64>, unfinished: usize) -> Spread {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        Spread {
            count: samples.len(),
            unfinished,
            p50: pick(0.50),
            p95: pick(0.95),
            p99: pick(0.99),
            max: pick(1.0),
        }
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={:<4} P50 {:>6.3}s  P95 {:>6.3}s  P99 {:>6.3}s  max {:>6.3}s  unfinished {}",
            self.count, self.p50, self.p95, self.p99, self.max, self.unfinished
        )
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// Join seen alive by every live node.
    pub joins: Spread,
    /// Crash seen as suspect or dead by every live node.
    pub failures_suspected: Spread,
    /// Crash seen as dead by every live node.
    pub failures_dead: Spread,
    /// Leave seen as left by every live node.
    pub leaves: Spread,
    /// Times a live node was declared dead by some node.
    pub false_deaths: usize,
    /// Distinct live nodes declared dead by someone.
    pub false_dead_members: usize,
    /// Times a live node was suspected by some node (refuted unless counted as a death).
    pub false_suspicions: usize,
    /// Mean bytes sent per live node per second.
    pub bytes_per_node_sec: f64,
    /// The 99th percentile over nodes of bytes sent per second.
    pub bytes_per_node_sec_p99: f64,
    /// Mean messages (and flood copies) sent per live node per second.
    pub messages_per_node_sec: f64,
    /// Bytes per node per second by message kind, largest first.
    pub breakdown: Vec<(&'static str, f64)>,
    /// Events the simulator processed.
    pub events: u64,
    /// Wall-clock time the run took.
    pub wall: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.scenario;
        writeln!(
            f,
            "membership simulation  SEED={} nodes={} measured={}s warmup={}s loss={:.1}% latency={}-{}ms",
            s.seed,
            s.nodes,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            s.loss * 100.0,
            s.latency_min.as_millis(),
            s.latency_max.as_millis()
        )?;
        writeln!(
            f,
            "churn per minute: crash {:.2}%  join {:.2}%  leave {:.2}%   probe {}ms/{}ms  suspicion {}-{}ms",
            s.crash_rate * 100.0,
            s.join_rate * 100.0,
            s.leave_rate * 100.0,
            s.config.probe_interval.as_millis(),
            s.config.probe_timeout.as_millis(),
            s.config.suspicion_min.as_millis(),
            s.config.suspicion_max.as_millis()
        )?;
        writeln!(f, "join known alive by all      {}", self.joins)?;
        writeln!(f, "crash suspected by all       {}", self.failures_suspected)?;
        writeln!(f, "crash declared dead by all   {}", self.failures_dead)?;
        writeln!(f, "leave known as left by all   {}", self.leaves)?;
        writeln!(
            f,
            "false deaths {} ({} members)   false suspicions {} (refuted)",
            self.false_deaths, self.false_dead_members, self.false_suspicions
        )?;
        writeln!(
            f,
            "bytes sent per node per second: mean {:.0}  P99 node {:.0}   messages per node per second {:.1}",
            self.bytes_per_node_sec, self.bytes_per_node_sec_p99, self.messages_per_node_sec
        )?;
        write!(f, "bytes per node per second by kind:")?;
        for (kind, b) in &self.breakdown {
            write!(f, " {kind} {b:.0}")?;
        }
        writeln!(f)?;
        write!(f, "simulated {} events in {:.1}s", self.events, self.wall.as_secs_f64())
    }
}

#[derive(Debug)]
enum Ev {
    Deliver { to: u32, from: u32, message: Message<SimId> },
    Flood { to: u32, from: u32, flood: u32 },
    Timer { node: u32 },
    Crash,
    Join,
    Leave,
    Stop { node: u32 },
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TrackKind {
    Join,
    Crash,
    Leave,
}

struct Tracker {
    kind: TrackKind,
    #[allow(dead_code)]
    subject: u32,
    start: u64,
    /// Nodes that know (alive for joins, dead for crashes, left for leaves).
    known: Vec<bool>,
    live_known: usize,
    done: Option<u64>,
    /// Crashes only: nodes that hold it suspect or dead.
    suspected: Vec<bool>,
    live_suspected: usize,
    suspected_done: Option<u64>,
}

struct FloodMsg {
    updates: Vec<Update<SimId>>,
    seen: Vec<bool>,
    copy_bytes: usize,
}

struct Node {
    core: Membership<SimId>,
    timer: Option<u64>,
}

/// Runs `scenario` to the end and returns its report.
pub fn run(scenario: Scenario) -> Report {
    Sim::new(scenario).run()
}

struct Sim {
    sc: Scenario,
    rng: ChaCha8Rng,
    base: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<Option<Node>>,
    /// Ground truth: nodes running and members (not crashed, not left).
    live: Vec<u32>,
    live_pos: HashMap<u32, usize>,
    /// The flood overlay (gossipsub's mesh), symmetric.
    mesh: Vec<Vec<u32>>,
    floods: Vec<FloodMsg>,
    trackers: Vec<Tracker>,
    by_subject: HashMap<u32, Vec<usize>>,
    measure_from: u64,
    measure_to: u64,
    sent_bytes: Vec<u64>,
    sent_msgs: Vec<u64>,
    by_kind: HashMap<&'static str, u64>,
    live_since: Vec<u64>,
    live_until: Vec<Option<u64>>,
    false_deaths: usize,
    false_dead: Vec<u32>,
    false_suspicions: usize,
    events: u64,
    /// `SIM_DEBUG` set: explain unfinished trackers and false deaths on stderr.
    debug: bool,
}

const MICROS: u64 = 1_000_000;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Sim {
    fn new(sc: Scenario) -> Sim {
        let rng = ChaCha8Rng::seed_from_u64(sc.seed);
        let measure_from = micros(sc.warmup);
        let measure_to = measure_from + micros(sc.duration);
        Sim {
            rng,
            base: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::new(),
            live: Vec::new(),
            live_pos: HashMap::new(),
            mesh: Vec::new(),
            floods: Vec::new(),
            trackers: Vec::new(),
            by_subject: HashMap::new(),
            measure_from,
            measure_to,
            sent_bytes: Vec::new(),
            sent_msgs: Vec::new(),
            by_kind: HashMap::new(),
            live_since: Vec::new(),
            live_until: Vec::new(),
            false_deaths: 0,
            false_dead: Vec::new(),
            false_suspicions: 0,
            events: 0,
            debug: std::env::var_os("SIM_DEBUG").is_some(),
            sc,
        }
    }

    fn instant(&self, t: u64) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at, seq: self.seq, ev }));
    }

    fn capacity(&mut self) -> Capacity {
        let total = [1000, 2000, 4000, 8000][self.rng.gen_range(0..4)];
        let mem = [1024, 4096, 8192, 16384][self.rng.gen_range(0..4)];
        Capacity {
            cpu_total_millis: total,
            cpu_free_millis: total / 2,
            memory_total_mib: mem,
            memory_free_mib: mem / 2,
            disk_total_mib: 40_000,
            disk_free_mib: 20_000,
            workloads: 0,
            power: Power::Mains,
            metered: false,
            runtimes: Runtimes::of(&[Runtime::Wasi]),
        }
    }

    fn new_node(&mut self) -> u32 {
        let id = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        let cap = self.capacity();
        let seed = self.rng.r#gen();
        let core = Membership::new(
            SimId(id),
            self.sc.config.clone(),
            cap,
            0,
            Box::new(TestSeal(SimId(id))),
            seed,
            self.instant(self.now),
        );
        self.nodes.push(Some(Node { core, timer: None }));
        self.sent_bytes.push(0);
        self.sent_msgs.push(0);
        self.live_since.push(self.now);
        self.live_until.push(None);
        self.live_pos.insert(id, self.live.len());
        self.live.push(id);
        self.mesh.push(Vec::new());
        for t in &mut self.trackers {
            t.known.push(false);
            t.suspected.push(false);
        }
        for f in &mut self.floods {
            f.seen.push(false);
        }
        id
    }

    fn kill(&mut self, id: u32) {
        if let Some(pos) = self.live_pos.remove(&id) {
            self.live.swap_remove(pos);
            if let Some(moved) = self.live.get(pos) {
                self.live_pos.insert(*moved, pos);
            }
        }
        self.live_until[id as usize] = Some(self.now);
        let peers = std::mem::take(&mut self.mesh[id as usize]);
        for p in peers {
            self.mesh[p as usize].retain(|x| *x != id);
            self.graft(p, MESH_LOW);
        }
        for t in &mut self.trackers {
            if t.known[id as usize] {
                t.live_known -= 1;
            }
            if t.suspected[id as usize] {
                t.live_suspected -= 1;
            }
        }
    }

    /// Adds random live mesh peers to `id` until it has `want`, as gossipsub's heartbeat does.
    /// Only peers with fewer than `cap` mesh peers accept.
    fn graft_capped(&mut self, id: u32, want: usize, cap: usize) {
        for _ in 0..want * 8 {
            if self.mesh[id as usize].len() >= want || self.live.len() < 2 {
                return;
            }
            let p = self.live[self.rng.gen_range(0..self.live.len())];
            if p == id || self.mesh[p as usize].len() >= cap || self.mesh[id as usize].contains(&p)
            {
                continue;
            }
            self.mesh[id as usize].push(p);
            self.mesh[p as usize].push(id);
        }
    }

    fn graft(&mut self, id: u32, want: usize) {
        self.graft_capped(id, want, MESH_HIGH);
    }

    /// Starts every node with the full member list, as a converged cluster would have it.
    fn bootstrap(&mut self) {
        for _ in 0..self.sc.nodes {
            self.new_node();
        }
        let degree = self.sc.config.flood_degree as usize;
        // A settled gossipsub mesh: about `degree` peers each (its heartbeat prunes above
        // D_high back down to D).
        for i in 0..self.sc.nodes {
            self.graft_capped(i as u32, degree, degree);
        }
        for i in 0..self.sc.nodes {
            self.graft(i as u32, MESH_LOW);
        }
        let n = self.nodes.len();
        let mut all = Vec::with_capacity(n * 2);
        for node in self.nodes.iter().flatten() {
            let me = *node.core.me();
            let cap = node.core.member(&me).and_then(|m| m.capacity).unwrap_or(Capacity::EMPTY);
            let seal = TestSeal(me);
            all.push(Update::signed(me, 0, super::UpdateKind::Alive, &seal));
            let kind = super::UpdateKind::Capacity { version: 0, capacity: cap };
            all.push(Update::signed(me, 0, kind, &seal));
        }
        let now = self.instant(0);
        // As a joiner's list from the seed it asked: old news, so nothing is queued to
        // piggyback (an unasked list would be news, and fill every node's queue).
        let seed = SimId(u32::MAX);
        let pages = u16::try_from(all.len().div_ceil(512)).unwrap_or(u16::MAX);
        for i in 0..n {
            if let Some(node) = self.nodes[i].as_mut() {
                let _ = node.core.handle(Input::Contact { peer: seed }, now);
                for (p, chunk) in all.chunks(512).enumerate() {
                    let page = u16::try_from(p).unwrap_or(u16::MAX);
                    let updates = chunk.to_vec();
                    let _ = node.core.handle(
                        Input::Message {
                            from: seed,
                            message: Message::Sync { page, pages, updates },
                        },
                        now,
                    );
                }
            }
            self.reschedule(i as u32);
        }
    }

    fn reschedule(&mut self, id: u32) {
        let Some(node) = self.nodes[id as usize].as_mut() else {
            return;
        };
        let Some(deadline) = node.core.next_deadline() else {
            return;
        };
        // Round up: a tick delivered a fraction of a microsecond early would find nothing due
        // and ask for the same instant again, forever.
        let nanos = deadline.saturating_duration_since(self.base).as_nanos().div_ceil(1000);
        let at = u64::try_from(nanos).unwrap_or(u64::MAX).max(self.now);
        if node.timer.is_none_or(|t| at < t) {
            node.timer = Some(at);
            self.push(at, Ev::Timer { node: id });
        }
    }

    fn schedule_churn(&mut self, ev: Ev, per_minute_fraction: f64, base_size: usize) {
        if per_minute_fraction <= 0.0 {
            return;
        }
        let rate_per_sec = per_minute_fraction * base_size as f64 / 60.0;
        let gap: f64 = -self.rng.gen_range(f64::EPSILON..1.0f64).ln() / rate_per_sec;
        let at = self.now + (gap * MICROS as f64) as u64;
        if at < self.measure_to {
            self.push(at.max(self.measure_from), ev);
        }
    }

    fn run(mut self) -> Report {
        let started = Instant::now();
        self.bootstrap();
        self.now = self.measure_from;
        let (n, c, j, l) =
            (self.sc.nodes, self.sc.crash_rate, self.sc.join_rate, self.sc.leave_rate);
        self.schedule_churn(Ev::Crash, c, n);
        self.schedule_churn(Ev::Join, j, n);
        self.schedule_churn(Ev::Leave, l, n);
        self.now = 0;
        // Let the last trackers finish: run a little past the window without new churn.
        let end = self.measure_to + micros(self.sc.config.suspicion_max) + 5 * MICROS;
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = q.at;
            self.events += 1;
            if self.events.is_multiple_of(10_000_000) && self.debug {
                eprintln!(
                    "sim: {} events, t={:.2}s, queue {}, floods {}",
                    self.events,
                    self.now as f64 / MICROS as f64,
                    self.queue.len(),
                    self.floods.len()
                );
            }
            self.step(q.ev);
        }
        self.now = end;
        self.report(started.elapsed())
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Timer { node } => {
                let Some(n) = self.nodes[node as usize].as_mut() else {
                    return;
                };
                if n.timer != Some(self.now) {
                    return;
                }
                n.timer = None;
                self.feed(node, Input::Tick);
            }
            Ev::Deliver { to, from, message } => {
                if self.nodes[to as usize].is_some() {
                    self.feed(to, Input::Message { from: SimId(from), message });
                }
            }
            Ev::Flood { to, from, flood } => {
                let f = &mut self.floods[flood as usize];
                if f.seen[to as usize] || self.nodes[to as usize].is_none() {
                    return;
                }
                f.seen[to as usize] = true;
                let updates = f.updates.clone();
                self.forward(to, from, flood);
                self.feed(to, Input::Broadcast { updates });
            }
            Ev::Crash => {
                if self.live.len() > 2 {
                    let victim = self.live[self.rng.gen_range(0..self.live.len())];
                    self.kill(victim);
                    self.nodes[victim as usize] = None;
                    self.track(TrackKind::Crash, victim);
                }
                self.schedule_churn(Ev::Crash, self.sc.crash_rate, self.sc.nodes);
            }
            Ev::Join => {
                let seed = self.live[self.rng.gen_range(0..self.live.len())];
                let id = self.new_node();
                self.graft(id, self.sc.config.flood_degree as usize);
                self.track(TrackKind::Join, id);
                self.feed(id, Input::Contact { peer: SimId(seed) });
                self.schedule_churn(Ev::Join, self.sc.join_rate, self.sc.nodes);
            }
            Ev::Leave => {
                if self.live.len() > 2 {
                    let who = self.live[self.rng.gen_range(0..self.live.len())];
                    self.track(TrackKind::Leave, who);
                    self.feed(who, Input::Leave);
                    self.kill(who);
                    // Linger long enough for the announcement to leave, then stop.
                    self.push(self.now + MICROS, Ev::Stop { node: who });
                }
                self.schedule_churn(Ev::Leave, self.sc.leave_rate, self.sc.nodes);
            }
            Ev::Stop { node } => self.nodes[node as usize] = None,
        }
    }

    fn feed(&mut self, id: u32, input: Input<SimId>) {
        let now = self.instant(self.now);
        let Some(node) = self.nodes[id as usize].as_mut() else {
            return;
        };
        let outputs = node.core.handle(input, now);
        for o in outputs {
            match o {
                Output::Send { to, message } => {
                    let bytes = encoded_len(&message) + MESSAGE_OVERHEAD;
                    self.count(id, bytes, 1);
                    self.count_kind(kind_of(&message), bytes);
                    if self.rng.gen_bool(self.sc.loss) {
                        continue;
                    }
                    let at = self.now + self.latency();
                    if (to.0 as usize) < self.nodes.len() {
                        self.push(at, Ev::Deliver { to: to.0, from: id, message });
                    }
                }
                Output::Broadcast(updates) => {
                    let copy_bytes = encoded_len(&updates) + MESSAGE_OVERHEAD + FLOOD_ENVELOPE;
                    let flood = u32::try_from(self.floods.len()).unwrap_or(u32::MAX);
                    let mut seen = vec![false; self.nodes.len()];
                    seen[id as usize] = true;
                    self.floods.push(FloodMsg { updates, seen, copy_bytes });
                    self.forward(id, id, flood);
                }
                Output::Event(e) => self.observe(id, e),
            }
        }
        self.reschedule(id);
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = (micros(self.sc.latency_min), micros(self.sc.latency_max));
        if hi <= lo { lo } else { self.rng.gen_range(lo..=hi) }
    }

    /// Gossipsub eager push: the first copy a node sees goes on to all its mesh peers.
    fn forward(&mut self, from: u32, source: u32, flood: u32) {
        let copy = self.floods[flood as usize].copy_bytes;
        self.count(from, FLOOD_IHAVE, 0);
        self.count_kind("ihave", FLOOD_IHAVE);
        let peers = self.mesh[from as usize].clone();
        for to in peers {
            // Gossipsub sends a copy to every mesh peer but the one it came from (IDONTWANT
            // only suppresses messages above 1 KB, which ours never are).
            if to == source {
                continue;
            }
            self.count(from, copy, 1);
            let kind = match self.floods[flood as usize].updates.first().map(|u| &u.kind) {
                Some(super::UpdateKind::Alive) => "flood-alive",
                Some(super::UpdateKind::Suspect { .. }) => "flood-suspect",
                Some(super::UpdateKind::Dead { .. }) => "flood-dead",
                Some(super::UpdateKind::Left) => "flood-left",
                Some(super::UpdateKind::Capacity { .. }) => "flood-capacity",
                None => "flood-empty",
            };
            self.count_kind(kind, copy);
            if self.rng.gen_bool(self.sc.loss) {
                continue;
            }
            let at = self.now + self.latency();
            self.push(at, Ev::Flood { to, from, flood });
        }
    }

    fn count(&mut self, id: u32, bytes: usize, messages: u64) {
        if self.now >= self.measure_from && self.now < self.measure_to {
            self.sent_bytes[id as usize] += bytes as u64;
            self.sent_msgs[id as usize] += messages;
        }
    }

    fn count_kind(&mut self, kind: &'static str, bytes: usize) {
        if self.now >= self.measure_from && self.now < self.measure_to {
            *self.by_kind.entry(kind).or_default() += bytes as u64;
        }
    }

    fn track(&mut self, kind: TrackKind, subject: u32) {
        if self.now < self.measure_from || self.now >= self.measure_to {
            return;
        }
        let n = self.nodes.len();
        let idx = self.trackers.len();
        self.trackers.push(Tracker {
            kind,
            subject,
            start: self.now,
            known: vec![false; n],
            live_known: 0,
            done: None,
            suspected: vec![false; n],
            live_suspected: 0,
            suspected_done: None,
        });
        self.by_subject.entry(subject).or_default().push(idx);
    }

    fn is_live(&self, id: u32) -> bool {
        self.live_pos.contains_key(&id)
    }

    fn observe(&mut self, observer: u32, event: Event<SimId>) {
        let Event::State { id, state, .. } = event else {
            return;
        };
        let subject = id.0;
        if self.is_live(subject) && observer != subject {
            match state {
                State::Dead => {
                    if self.debug {
                        eprintln!(
                            "t={:.3} false death of {} at {}",
                            self.now as f64 / 1e6,
                            subject,
                            observer
                        );
                    }
                    self.false_deaths += 1;
                    if !self.false_dead.contains(&subject) {
                        self.false_dead.push(subject);
                    }
                }
                State::Suspect => self.false_suspicions += 1,
                _ => {}
            }
        }
        let Some(idxs) = self.by_subject.get(&subject) else {
            return;
        };
        let observer_live = self.is_live(observer);
        for &i in idxs {
            let t = &mut self.trackers[i];
            let (knows, suspects) = match t.kind {
                TrackKind::Join => (matches!(state, State::Alive | State::Suspect), false),
                TrackKind::Crash => {
                    (state == State::Dead, matches!(state, State::Suspect | State::Dead))
                }
                TrackKind::Leave => (state == State::Left, false),
            };
            let o = observer as usize;
            if knows && !t.known[o] {
                t.known[o] = true;
                if observer_live {
                    t.live_known += 1;
                }
            }
            if (suspects || knows) && t.kind == TrackKind::Crash && !t.suspected[o] {
                t.suspected[o] = true;
                if observer_live {
                    t.live_suspected += 1;
                }
            }
        }
        self.check_trackers(subject);
    }

    fn check_trackers(&mut self, subject: u32) {
        let Some(idxs) = self.by_subject.get(&subject) else {
            return;
        };
        let live = self.live.len();
        let subject_live = self.is_live(subject);
        let need = if subject_live { live - 1 } else { live };
        for &i in idxs {
            let t = &mut self.trackers[i];
            if t.done.is_none() && t.live_known >= need {
                t.done = Some(self.now);
            }
            if t.kind == TrackKind::Crash && t.suspected_done.is_none() && t.live_suspected >= need
            {
                t.suspected_done = Some(self.now);
            }
        }
    }

    fn report(self, wall: Duration) -> Report {
        if self.debug {
            for t in self.trackers.iter().filter(|t| t.done.is_none()) {
                let mut views: HashMap<String, usize> = HashMap::new();
                for &v in &self.live {
                    if v == t.subject {
                        continue;
                    }
                    let Some(n) = self.nodes[v as usize].as_ref() else {
                        continue;
                    };
                    let k = format!(
                        "{:?}",
                        n.core.member(&SimId(t.subject)).map(|m| (m.state, m.incarnation))
                    );
                    if k == "None" {
                        eprintln!(
                            "  node {v} (joined {:.2}s) alive_count {} does not know",
                            self.live_since[v as usize] as f64 / 1e6,
                            n.core.alive_count()
                        );
                    }
                    *views.entry(k).or_default() += 1;
                }
                eprintln!(
                    "unfinished {:?} subject {} start {:.2}s views {:?}",
                    t.kind,
                    t.subject,
                    t.start as f64 / 1e6,
                    views
                );
            }
        }
        let spread = |kind: TrackKind, suspected: bool| {
            let mut samples = Vec::new();
            let mut unfinished = 0;
            for t in self.trackers.iter().filter(|t| t.kind == kind) {
                let done = if suspected { t.suspected_done } else { t.done };
                match done {
                    Some(at) => samples.push((at - t.start) as f64 / MICROS as f64),
                    None => unfinished += 1,
                }
            }
            Spread::of(samples, unfinished)
        };
        let window_end = self.measure_to;
        let mut per_node = Vec::new();
        let (mut bytes, mut msgs, mut node_secs) = (0u64, 0u64, 0f64);
        for i in 0..self.sent_bytes.len() {
            let from = self.live_since[i].max(self.measure_from);
            let until = self.live_until[i].unwrap_or(window_end).min(window_end);
            if until <= from {
                continue;
            }
            let secs = (until - from) as f64 / MICROS as f64;
            bytes += self.sent_bytes[i];
            msgs += self.sent_msgs[i];
            node_secs += secs;
            if secs >= 1.0 {
                per_node.push(self.sent_bytes[i] as f64 / secs);
            }
        }
        let p99 = Spread::of(per_node, 0).p99;
        let mut breakdown: Vec<(&'static str, f64)> =
            self.by_kind.iter().map(|(k, b)| (*k, *b as f64 / node_secs.max(1e-9))).collect();
        breakdown.sort_by(|a, b| b.1.total_cmp(&a.1));
        Report {
            joins: spread(TrackKind::Join, false),
            failures_suspected: spread(TrackKind::Crash, true),
            failures_dead: spread(TrackKind::Crash, false),
            leaves: spread(TrackKind::Leave, false),
            false_deaths: self.false_deaths,
            false_dead_members: self.false_dead.len(),
            false_suspicions: self.false_suspicions,
            bytes_per_node_sec: bytes as f64 / node_secs.max(1e-9),
            bytes_per_node_sec_p99: p99,
            messages_per_node_sec: msgs as f64 / node_secs.max(1e-9),
            breakdown,
            events: self.events,
            wall,
            scenario: self.sc,
        }
    }
}

fn kind_of<I>(m: &Message<I>) -> &'static str {
    match m {
        Message::Ping { .. } => "ping",
        Message::Ack { .. } => "ack",
        Message::PingReq { .. } => "ping-req",
        Message::Nack { .. } => "nack",
        Message::Join { .. } => "join",
        Message::Sync { .. } => "sync",
    }
}
