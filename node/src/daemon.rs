//! One running node: the mesh, the raft member, the runtime, and the loops that join them.
//!
//! ```text
//!   mesh ──members, capacity, directory──▶ view loop (every 500 ms, and at once when a
//!        member's liveness changes) ──▶ leader loop (raft leader only, on each view and each
//!        applied entry): leader::round ──▶ Assign ──▶ nudge the nodes that got replicas
//!   raft ◀── api service (enrollment, node commands and queries, user requests, modules, logs)
//!   keeper loop (raft members): a copy of every module a workload names
//!   agent loop (nudged by the leader, else every 250 ms): my assignments (local state if a
//!               raft member that knows a leader, else asked of one) ──▶ modules fetched
//!               from peers ──▶ runtime Agent ──▶ status changes ──▶ batched Report
//! ```
//!
//! The scheduler counts what each node's assignments request against the node's offer, so the
//! gossiped capacity only needs the totals.
//!
//! Every loop only reads committed state and proposes commands; a loop that fails waits a
//! moment and tries again, so a lost leader or an unreachable peer delays work, never stops it.

use cloudless_types::now_ms;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudless_consensus::api::{ApiRequest, ApiResponse, MAX_MODULE, Query, SERVICE};
use cloudless_consensus::state::{
    Actor, Command, Phase as RaftPhase, ReplicaKey, ReplicaStatus, Settings, State, UserKey,
};
use cloudless_consensus::voters::{self, Candidate, Observation};
use cloudless_consensus::{Candidates, Consensus, Consistency, Member, node_id};
use cloudless_mesh::{Handle, Mesh, membership};
use cloudless_runtime::container::{ContainerConfig, ContainerDriver};
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Agent, AgentConfig, Driver, Phase, ReplicaSpec, RunState, Status};
use cloudless_sched::Scheduler;
use cloudless_types::{Capacity, Image, Power, Resources, Runtime, Runtimes};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::Uploads;
use crate::gate::EnrollGate;
use crate::http::{Metrics, Readiness};
use crate::leader::{self, Seen};
use crate::raft_rpc::{self, MeshTransport};
use crate::recovery::RAFT_DIR;

/// How often the view of the pool is refreshed from the mesh.
const VIEW_EVERY: Duration = Duration::from_millis(500);
/// Shortest gap between two refreshes when liveness changes wake the view loop early.
const VIEW_MIN_GAP: Duration = Duration::from_millis(50);
/// How often the leader reconciles: fast enough that a new workload starts within a few
/// hundred milliseconds, slow enough to stay idle when nothing changes.
const LEADER_EVERY: Duration = Duration::from_millis(100);
/// How often a node pulls its assignments (nothing is missed even without a push).
const AGENT_EVERY: Duration = Duration::from_millis(250);
/// Status changes arriving within this long of the first go to raft in one report: replicas
/// starting together are reported together, and a lone change waits little.
const REPORT_EVERY: Duration = Duration::from_millis(20);
/// How often raft members check they hold every module a workload names.
const KEEP_EVERY: Duration = Duration::from_secs(1);
/// Requests queued for the api service before callers are told "busy".
const API_QUEUE: usize = 256;
/// Most peers one `ask_member` tries before giving up: members first, so a healthy pool
/// answers at the first or second.
const MAX_ASKED: usize = 16;
/// Nodes nudged per leader round; more wait for their next poll.
const MAX_NUDGES: usize = 64;
/// A nudge is worth little after this long: the node's own poll comes sooner.
const NUDGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline of one api call to another node.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The mesh (identity and data dir included).
    pub mesh: cloudless_mesh::Config,
    /// The raft member.
    pub consensus: cloudless_consensus::Config,
    /// What this node offers to workloads.
    pub offer: Resources,
    /// Whether guests may use the network on this node.
    pub allow_network: bool,
    /// A container engine to run container workloads with, if this device has one.
    pub containers: Option<ContainerConfig>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The mesh did not start.
    #[error("mesh: {0}")]
    Mesh(#[from] cloudless_mesh::MeshError),
    /// The raft member did not start.
    #[error("raft: {0}")]
    Consensus(#[from] cloudless_consensus::ConsensusError),
    /// The runtime did not start.
    #[error("runtime: {0}")]
    Runtime(#[from] cloudless_runtime::DriverError),
    /// The scheduler settings are invalid.
    #[error("scheduler: {0}")]
    Scheduler(String),
}

/// How steadily a peer has been alive.
#[derive(Clone, Debug)]
struct Streak {
    /// Alive since (in the current streak).
    since: Instant,
    /// When its state last changed.
    changed: Instant,
    /// When it came back after being suspect, dead or gone, within the flap window.
    returns: Vec<Instant>,
    /// Its state at the last look.
    state: membership::State,
}

/// What the loops and the api share.
pub(crate) struct Inner {
    pub(crate) me: PeerId,
    pub(crate) mesh: Handle,
    pub(crate) consensus: Consensus<MeshTransport>,
    pub(crate) wasi: WasiDriver,
    pub(crate) containers: Option<ContainerDriver>,
    pub(crate) gate: Arc<EnrollGate>,
    pub(crate) scheduler: Scheduler,
    pub(crate) uploads: Mutex<Uploads>,
    pub(crate) metrics: Metrics,
    /// Why workloads could not be placed, as of this node's last round as leader.
    pub(crate) unschedulable: Mutex<BTreeMap<String, String>>,
    /// Woken when the leader says this node's assignments changed.
    pub(crate) nudge: tokio::sync::Notify,
    /// The leader that sent the last nudge (asked first on the next pull).
    pub(crate) nudged_by: Mutex<Option<PeerId>>,
    /// Woken by the mesh when a member's liveness changes.
    liveness: Arc<tokio::sync::Notify>,
    /// Woken by the view loop after each refresh of `seen` (the leader rounds on it).
    viewed: tokio::sync::Notify,
    /// What this node offers (for its CPU utilisation gauge).
    offer: Resources,
    pub(crate) seen: Mutex<Vec<Seen>>,
    /// Raft voters as last learned (for nodes that are not members themselves).
    pub(crate) members: Mutex<Vec<PeerId>>,
    /// Each peer's current streak and recent flaps.
    stability: Mutex<BTreeMap<String, Streak>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
    mesh_task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Daemon {
    /// Starts every part of a node. Peers reach it through the enrollment gate
    /// ([`EnrollGate`]).
    pub async fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        let data_dir: PathBuf = config.mesh.data_dir.clone();
        let scheduler = Scheduler::new(cloudless_sched::Config::default())
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let keypair = cloudless_mesh::identity::load_or_create(&data_dir)
            .map_err(|e| DaemonError::Mesh(e.into()))?;
        let gate = Arc::new(EnrollGate::new(keypair.public().to_peer_id()));
        // Containers only where an engine answers; WASI everywhere.
        let me = keypair.public().to_peer_id();
        let containers = match &config.containers {
            Some(c) => {
                let mut c = c.clone();
                if c.scope.is_empty() {
                    c.scope = me.to_string();
                }
                c.allow_network |= config.allow_network;
                Some(ContainerDriver::connect(c).await?)
            }
            None => None,
        };
        let mut runtimes = vec![Runtime::Wasi];
        if containers.is_some() {
            runtimes.push(Runtime::Container);
        }
        let mut mesh_config = config.mesh.clone();
        mesh_config.descriptor.runtimes = runtimes.clone();
        mesh_config.descriptor.cpu_millis = config.offer.cpu_millis;
        mesh_config.descriptor.memory_mib = config.offer.memory_mib;
        mesh_config.descriptor.disk_mib = config.offer.disk_mib;
        mesh_config.capacity = Some(capacity(config.offer, &runtimes));
        let mut registry = prometheus_client::registry::Registry::default();
        let Mesh { handle: mesh, events, task } =
            cloudless_mesh::start_with_metrics(mesh_config, keypair, gate.clone(), &mut registry)
                .await?;
        // The view loop polls the mesh, and looks at once when liveness changes.
        let liveness = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(watch(events, liveness.clone()));
        let member = Member { peer: me.to_string() };
        let consensus = Consensus::open(
            &data_dir.join(RAFT_DIR),
            member,
            MeshTransport::new(mesh.clone()),
            config.consensus.clone(),
        )
        .await?;
        raft_rpc::serve(&mesh, consensus.clone()).await?;
        let mut wasi_config = WasiConfig::new(&data_dir.join("wasi"));
        wasi_config.allow_network = config.allow_network;
        wasi_config.max_memory_mib = config.offer.memory_mib.clamp(16, 4096);
        let wasi = WasiDriver::new(wasi_config)?;
        let inner = Arc::new(Inner {
            me,
            mesh: mesh.clone(),
            consensus: consensus.clone(),
            wasi: wasi.clone(),
            containers: containers.clone(),
            gate,
            scheduler,
            uploads: Mutex::new(Uploads::default()),
            metrics: Metrics::with_registry(registry),
            unschedulable: Mutex::new(BTreeMap::new()),
            nudge: tokio::sync::Notify::new(),
            nudged_by: Mutex::new(None),
            liveness,
            viewed: tokio::sync::Notify::new(),
            offer: config.offer,
            seen: Mutex::new(Vec::new()),
            members: Mutex::new(Vec::new()),
            stability: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        consensus.start_controller(Arc::new(Voters(Arc::downgrade(&inner)))).await;
        let mut drivers: Vec<Arc<dyn Driver>> = vec![Arc::new(wasi)];
        if let Some(c) = containers {
            drivers.push(Arc::new(c));
        }
        let (agent, statuses) = Agent::start(drivers, AgentConfig::default());
        let api = mesh.serve(SERVICE, API_QUEUE).await?;
        let tasks = vec![
            tokio::spawn(view_loop(inner.clone())),
            tokio::spawn(leader_loop(inner.clone())),
            tokio::spawn(agent_loop(inner.clone(), agent)),
            tokio::spawn(report_loop(inner.clone(), statuses)),
            tokio::spawn(keeper_loop(inner.clone())),
            tokio::spawn(crate::api::serve(inner.clone(), api)),
        ];
        if let Ok(mut t) = inner.tasks.lock() {
            t.extend(tasks);
        }
        info!(peer = %me, "node started");
        Ok(Daemon { inner, mesh_task: Arc::new(Mutex::new(Some(task))) })
    }

    /// Creates a new cluster with this node as its first voter.
    pub async fn init(&self, settings: Settings, admin: UserKey) -> Result<(), String> {
        match self.inner.consensus.bootstrap(settings, admin).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.me
    }

    /// The mesh handle.
    pub fn mesh(&self) -> &Handle {
        &self.inner.mesh
    }

    /// The raft member.
    pub fn consensus(&self) -> &Consensus<MeshTransport> {
        &self.inner.consensus
    }

    /// This node's metrics (served at /metrics).
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.clone()
    }

    /// What /health and /ready answer.
    pub fn readiness(&self) -> Arc<dyn Readiness> {
        Arc::new(Ready(Arc::downgrade(&self.inner)))
    }

    /// The WASI driver (module storage, logs).
    pub fn wasi(&self) -> &WasiDriver {
        &self.inner.wasi
    }

    /// Sends `request` to the api service of a raft member (following redirects).
    pub async fn ask_member(&self, request: ApiRequest) -> Result<ApiResponse, String> {
        ask_member(&self.inner, request).await
    }

    /// Stops as a crash would: no leave is announced, replicas stop with the process (the
    /// others find out by failure detection). For tests and benchmarks of failover.
    pub async fn kill(&self) {
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.drain(..).for_each(|t| t.abort());
        }
        let _ = self.inner.mesh.shutdown().await;
        self.inner.consensus.shutdown().await;
        for o in self.inner.wasi.list().await.unwrap_or_default() {
            let _ = self.inner.wasi.stop(&o.id, Duration::ZERO).await;
        }
        let task = self.mesh_task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            t.abort();
        }
    }

    /// Stops the loops, announces a leave, and stops the mesh.
    pub async fn shutdown(&self) {
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.drain(..).for_each(|t| t.abort());
        }
        self.inner.consensus.shutdown().await;
        let _ = self.inner.mesh.leave().await;
        let task = self.mesh_task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Wakes the view loop when a member's liveness changes (a death seen at once, not at the
/// next poll); other mesh events need no action here.
async fn watch(
    mut events: mpsc::Receiver<cloudless_mesh::Event>,
    liveness: Arc<tokio::sync::Notify>,
) {
    while let Some(e) = events.recv().await {
        if matches!(e, cloudless_mesh::Event::Member(membership::Event::State { .. })) {
            liveness.notify_one();
        }
    }
}

/// The capacity summary this node gossips: its offer (the leader counts what assignments use).
fn capacity(offer: Resources, runtimes: &[Runtime]) -> Capacity {
    Capacity {
        cpu_total_millis: offer.cpu_millis,
        cpu_free_millis: offer.cpu_millis,
        memory_total_mib: offer.memory_mib,
        memory_free_mib: offer.memory_mib,
        disk_total_mib: offer.disk_mib,
        disk_free_mib: offer.disk_mib,
        workloads: 0,
        power: Power::Mains,
        metered: false,
        runtimes: Runtimes::of(runtimes),
    }
}

/// /health: the loops run. /ready: enrolled, and the raft group is reachable.
struct Ready(std::sync::Weak<Inner>);

impl Readiness for Ready {
    fn health(&self) -> Result<(), String> {
        let inner = self.0.upgrade().ok_or("the node is stopping")?;
        let tasks = inner.tasks.lock().map_err(|_| "task list poisoned")?;
        if tasks.is_empty() {
            return Err("the node is stopping".into());
        }
        match tasks.iter().filter(|t| t.is_finished()).count() {
            0 => Ok(()),
            n => Err(format!("{n} of the node's loops stopped")),
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.health()?;
        let inner = self.0.upgrade().ok_or("the node is stopping")?;
        if !inner.gate.knows(&inner.me) {
            return Err("not enrolled in a cluster (yet)".into());
        }
        // Knows how to reach the raft group: a leader, or members to ask.
        let reachable = inner.consensus.leader().is_some()
            || inner.members.lock().is_ok_and(|m| m.iter().any(|p| *p != inner.me));
        if reachable { Ok(()) } else { Err("no raft leader or member known".into()) }
    }
}

/// Refreshes the view of the pool, and the stability record voters are chosen by.
async fn view_loop(inner: Arc<Inner>) {
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        refresh_gate(&inner, tick).await;
        if let (Ok(members), Ok(dir)) = (inner.mesh.members().await, inner.mesh.directory().await) {
            let now = Instant::now();
            let mut down: BTreeMap<String, Duration> = BTreeMap::new();
            if let Ok(mut st) = inner.stability.lock() {
                for m in &members {
                    let e = st.entry(m.id.to_string()).or_insert(Streak {
                        since: now,
                        changed: now,
                        returns: Vec::new(),
                        state: m.state,
                    });
                    let was_alive = e.state == membership::State::Alive;
                    if m.state == membership::State::Alive && !was_alive {
                        e.since = now;
                        e.returns.push(now);
                    }
                    if m.state != e.state {
                        e.changed = now;
                    }
                    e.returns.retain(|t| now.duration_since(*t) < voters::FLAP_WINDOW);
                    e.state = m.state;
                    down.insert(m.id.to_string(), now.duration_since(e.changed));
                }
            }
            let seen: Vec<Seen> = members
                .iter()
                .map(|m| {
                    let peer = m.id.to_string();
                    let down_for = match m.state {
                        membership::State::Dead => down.get(&peer).copied().unwrap_or_default(),
                        _ => Duration::ZERO,
                    };
                    Seen {
                        peer,
                        state: m.state,
                        down_for,
                        capacity: m.capacity,
                        descriptor: dir.get(&m.id).cloned(),
                    }
                })
                .collect();
            for state in [
                membership::State::Alive,
                membership::State::Suspect,
                membership::State::Dead,
                membership::State::Left,
            ] {
                let n = members.iter().filter(|m| m.state == state).count() as i64;
                inner.metrics.set_members(crate::api::state_word(state), n);
            }
            if let Ok(mut s) = inner.seen.lock() {
                *s = seen;
            }
        }
        count_replicas(&inner).await;
        let raft = inner.consensus.raft().metrics().borrow().clone();
        inner.metrics.set_raft(
            raft.current_term,
            raft.last_applied.map_or(0, |l| l.index),
            inner.consensus.is_leader(),
            inner.consensus.voters().len(),
        );
        if trusts_own_state(&inner) {
            let voters: Vec<PeerId> = inner
                .consensus
                .voter_members()
                .iter()
                .filter_map(|m| m.peer.parse().ok())
                .collect();
            if let Ok(mut m) = inner.members.lock() {
                *m = voters;
            }
        }
        inner.viewed.notify_one();
        let looked = tokio::time::Instant::now();
        tokio::select! {
            () = tokio::time::sleep(VIEW_EVERY) => {}
            () = inner.liveness.notified() => {
                // Under churn, events come in bursts: one look per VIEW_MIN_GAP at most.
                tokio::time::sleep_until(looked + VIEW_MIN_GAP).await;
            }
        }
    }
}

/// Sets the replicas gauge from what the runtimes hold now (so a stopped replica is counted
/// out when it has stopped, not when it was asked to).
async fn count_replicas(inner: &Inner) {
    let mut held = inner.wasi.list().await.unwrap_or_default();
    if let Some(c) = &inner.containers {
        held.extend(c.list().await.unwrap_or_default());
    }
    let running = held.iter().filter(|o| matches!(o.state, RunState::Running { .. })).count();
    inner.metrics.set_replicas("running", running as i64);
    inner.metrics.set_replicas("exited", (held.len() - running) as i64);
}

/// Non-members refresh the gate this many view ticks apart (2 s): a newly enrolled peer waits
/// that long at most to be let into the membership by them; members refresh every tick from
/// their own state.
const GATE_TICKS: u64 = 4;
/// A node the cluster keeps refusing warns this many view ticks apart (30 s).
const WARN_TICKS: u64 = 60;

/// Tells the gate who is enrolled: from committed state on raft members, else from a member
/// (which also says who votes, so this node knows whom to ask); closes connections to newly
/// revoked peers.
async fn refresh_gate(inner: &Inner, tick: u64) {
    let lists = if trusts_own_state(inner) {
        // Hearing a leader again means this member is back in the group.
        inner.consensus.hold_elections(false);
        inner.consensus.read(Consistency::Stale, crate::gate::lists).await.ok()
    } else if tick.is_multiple_of(GATE_TICKS) || !inner.gate.knows_anyone() {
        match ask_member(inner, ApiRequest::Query(Query::Enrolled)).await {
            Ok(ApiResponse::Enrolled { nodes, revoked, voters }) => {
                let voters: Vec<PeerId> = voters.iter().filter_map(|v| v.parse().ok()).collect();
                // A voter replaced while it was down must not campaign with its stale log.
                if inner.consensus.is_member() && !voters.is_empty() {
                    inner.consensus.hold_elections(!voters.contains(&inner.me));
                }
                if !voters.is_empty()
                    && let Ok(mut m) = inner.members.lock()
                {
                    *m = voters;
                }
                Some((nodes, revoked))
            }
            Ok(ApiResponse::Refused(why)) => {
                // Normal for a moment while a device enrolls: said once then, and as a warning
                // only if it lasts (every WARN_TICKS), not on every tick.
                if tick == 1 {
                    info!(reason = why, "the cluster does not let this node in (yet)");
                } else if tick.is_multiple_of(WARN_TICKS) {
                    warn!(reason = why, "the cluster still does not let this node in");
                }
                None
            }
            _ => None,
        }
    } else {
        None
    };
    if let Some((nodes, revoked)) = lists
        && inner.gate.set(&nodes, &revoked)
    {
        let _ = inner.mesh.recheck_gate().await;
    }
}

/// Candidates for the voter controller, from the view and committed state.
struct Voters(std::sync::Weak<Inner>);

impl Candidates for Voters {
    fn candidates(&self, state: &State) -> Vec<Candidate> {
        let Some(inner) = self.0.upgrade() else { return Vec::new() };
        let seen = inner.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let stability = inner.stability.lock().map(|s| s.clone()).unwrap_or_default();
        let settings = state.settings().cloned();
        let Some(settings) = settings else { return Vec::new() };
        let now = Instant::now();
        seen.iter()
            .map(|s| {
                let (since, flaps) =
                    stability.get(&s.peer).map_or((now, 0), |k| (k.since, k.returns.len() as u32));
                let d = s.descriptor.clone().unwrap_or_default();
                let observation = Observation {
                    alive: s.state == membership::State::Alive,
                    uptime: now.duration_since(since),
                    public: false,
                    power: s.capacity.map_or(Power::Mains, |c| c.power),
                    class: d.device_class.unwrap_or(cloudless_types::DeviceClass::Desktop),
                    flaps,
                };
                voters::assess(
                    node_id(&s.peer),
                    Member { peer: s.peer.clone() },
                    state.nodes().get(&s.peer),
                    &observation,
                    &settings,
                )
            })
            .collect()
    }
}

/// While this node leads: place what is missing, move what was on dead nodes.
async fn leader_loop(inner: Arc<Inner>) {
    // Run when the raft state changed (a committed workload is placed at once), and at least
    // every LEADER_EVERY (liveness changes come from the mesh, not from raft).
    let mut applied = None;
    // When this leader first saw each replica without a node: placement latency is measured
    // from there to the committed assignment.
    let mut waiting: BTreeMap<ReplicaKey, Instant> = BTreeMap::new();
    // Workloads the last round could not place.
    let mut stuck: BTreeSet<String> = BTreeSet::new();
    loop {
        applied = tokio::select! {
            a = inner.consensus.applied_after(applied, LEADER_EVERY) => a,
            () = inner.viewed.notified() => applied,
        };
        if !inner.consensus.is_leader() {
            waiting.clear();
            continue;
        }
        let seen = inner.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let round = inner
            .consensus
            .read(Consistency::Stale, |state| {
                let round = leader::round(state, &seen, &inner.scheduler);
                let mut unplaced: BTreeSet<ReplicaKey> = BTreeSet::new();
                for (name, w) in state.workloads() {
                    for index in 0..w.spec.replicas {
                        let key = ReplicaKey { workload: name.clone(), index };
                        if !state.assignments().contains_key(&key) {
                            unplaced.insert(key);
                        }
                    }
                }
                // Where the replicas this round moves ran: they must stop there.
                let old_hosts: BTreeSet<String> = match &round.command {
                    Some(Command::Assign { unset, .. }) => unset
                        .iter()
                        .filter_map(|k| state.assignments().get(k).map(|a| a.node.clone()))
                        .collect(),
                    _ => BTreeSet::new(),
                };
                (round, unplaced, old_hosts)
            })
            .await;
        let Ok((round, unplaced, old_hosts)) = round else { continue };
        let now = Instant::now();
        // Replicas placed elsewhere meanwhile, deleted or scaled away wait no more.
        waiting.retain(|k, _| unplaced.contains(k));
        for key in unplaced {
            waiting.entry(key).or_insert(now);
        }
        // Counted when a workload becomes unschedulable, not again every round it stays so.
        let now_stuck: BTreeSet<String> = round.unschedulable.keys().cloned().collect();
        let newly = now_stuck.difference(&stuck).count() as u64;
        if newly > 0 {
            inner.metrics.decision("unschedulable", newly);
        }
        stuck = now_stuck;
        for (workload, why) in &round.unschedulable {
            debug!(workload, why, "unschedulable");
        }
        if let Ok(mut u) = inner.unschedulable.lock() {
            u.clone_from(&round.unschedulable);
        }
        let Some(Command::Assign { epoch, set, unset }) = round.command else { continue };
        let unset_keys: BTreeSet<&ReplicaKey> = unset.iter().collect();
        for key in &unset {
            waiting.entry(key.clone()).or_insert(now);
        }
        let moved = set.iter().filter(|(k, _)| unset_keys.contains(k)).count() as u64;
        let placed = set.len() as u64 - moved;
        let command = Command::Assign { epoch, set: set.clone(), unset: unset.clone() };
        match inner.consensus.propose(Actor::System, command).await {
            Ok(Ok(_)) => {
                debug!(placed = round.placed, "assignments committed");
                inner.metrics.decision("placed", placed);
                inner.metrics.decision("moved", moved);
                for (key, _) in &set {
                    if let Some(since) = waiting.remove(key) {
                        inner.metrics.placement_latency(since.elapsed().as_secs_f64());
                    }
                }
                nudge(&inner, set.iter().map(|(_, node)| node).chain(old_hosts.iter()));
            }
            Ok(Err(e)) => debug!(error = %e, "assignment refused"),
            Err(e) => debug!(error = %e, "assignment not committed"),
        }
    }
}

/// Tells the nodes whose assignments changed (replicas gained or lost) to pull them now (raft
/// members learn by applying the entry; the rest would wait for their next pull). Fire and
/// forget, one short task per node, at most MAX_NUDGES per round: the poll catches the rest.
fn nudge<'a>(inner: &Arc<Inner>, nodes: impl Iterator<Item = &'a String>) {
    let targets: BTreeSet<&String> = nodes.collect();
    let Ok(body) = postcard::to_allocvec(&ApiRequest::Nudge) else { return };
    for node in targets.into_iter().take(MAX_NUDGES) {
        let Ok(peer) = node.parse::<PeerId>() else { continue };
        if peer == inner.me {
            continue;
        }
        let (mesh, body) = (inner.mesh.clone(), body.clone());
        tokio::spawn(async move {
            let _ = mesh.request(peer, SERVICE, body, NUDGE_TIMEOUT).await;
        });
    }
}

/// Pulls this node's assignments and hands them to the runtime.
async fn agent_loop(inner: Arc<Inner>, agent: Agent) {
    let me = inner.me.to_string();
    let mut last: Option<Vec<ReplicaSpec>> = None;
    let mut applied = None;
    loop {
        // A raft member answers itself, and so runs as soon as it applies new assignments;
        // other nodes ask a member every AGENT_EVERY.
        let query = ApiRequest::Query(Query::Assigned { node: me.clone() });
        // After a nudge, ask the leader that sent it: it has applied the change, a follower
        // may not have yet (and would answer with the old assignments until the next poll).
        let nudger = inner.nudged_by.lock().ok().and_then(|mut n| n.take());
        let fresh = match nudger {
            Some(leader) if !trusts_own_state(&inner) => call(&inner, leader, &query).await.ok(),
            _ => None,
        };
        let answer = match fresh {
            Some(a @ ApiResponse::Assigned(_)) => Ok(a),
            _ => ask_member(&inner, query).await,
        };
        let assigned = match answer {
            Ok(ApiResponse::Assigned(a)) => Ok(a),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        };
        match assigned {
            Ok(list) => {
                let mut specs = Vec::new();
                for (key, spec) in list {
                    if let Image::Wasi(hash) = &spec.image
                        && !inner.wasi.has_module(hash)
                        && let Err(e) = fetch_module(&inner, hash).await
                    {
                        warn!(module = hash, error = e, "cannot fetch module yet");
                        continue;
                    }
                    specs.push(ReplicaSpec::from_workload(&spec, key.index));
                }
                let cpu: u32 = specs.iter().map(|r| r.cpu_millis).sum();
                inner
                    .metrics
                    .set_cpu_utilization(f64::from(cpu) / f64::from(inner.offer.cpu_millis.max(1)));
                if last.as_ref() != Some(&specs) {
                    if agent.set_desired(specs.clone()).await.is_err() {
                        return;
                    }
                    last = Some(specs);
                }
            }
            Err(e) => debug!(error = e, "cannot learn assignments yet"),
        }
        applied = tokio::select! {
            a = inner.consensus.applied_after(applied, AGENT_EVERY) => a,
            () = inner.nudge.notified() => applied,
        };
    }
}

/// On raft members: keep a copy of every WASI module a workload names, so a module outlives
/// the node it was uploaded to and the nodes that ran it.
async fn keeper_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(KEEP_EVERY).await;
        if !inner.consensus.is_member() {
            continue;
        }
        let wanted: Vec<String> = inner
            .consensus
            .read(Consistency::Stale, |s| {
                s.workloads()
                    .values()
                    .filter_map(|w| match &w.spec.image {
                        Image::Wasi(h) => Some(h.clone()),
                        Image::Container(_) => None,
                    })
                    .collect()
            })
            .await
            .unwrap_or_default();
        for hash in wanted {
            if !inner.wasi.has_module(&hash)
                && let Err(e) = fetch_module(&inner, &hash).await
            {
                debug!(module = hash, error = e, "cannot keep a copy of a module yet");
            }
        }
    }
}

/// The other peers the membership holds alive.
fn live_peers(inner: &Inner) -> Vec<PeerId> {
    inner
        .seen
        .lock()
        .map(|s| {
            s.iter()
                .filter(|p| p.state == membership::State::Alive)
                .filter_map(|p| p.peer.parse().ok())
                .filter(|p| *p != inner.me)
                .collect()
        })
        .unwrap_or_default()
}

/// Fetches a module from whichever peer has it, chunk by chunk, checking its hash.
async fn fetch_module(inner: &Inner, hash: &str) -> Result<(), String> {
    for peer in live_peers(inner) {
        let mut bytes = Vec::new();
        loop {
            let req = ApiRequest::Module { hash: hash.to_string(), offset: bytes.len() as u64 };
            match call(inner, peer, &req).await {
                Ok(ApiResponse::Module { total, bytes: chunk }) if total <= MAX_MODULE => {
                    if chunk.is_empty() && (bytes.len() as u64) < total {
                        break;
                    }
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() as u64 >= total {
                        let stored = inner.wasi.store_module(&bytes).map_err(|e| e.to_string())?;
                        if stored == hash {
                            return Ok(());
                        }
                        warn!(%peer, module = hash, "a peer sent a module that does not match its hash");
                        break;
                    }
                }
                _ => break,
            }
        }
    }
    Err("no peer has it".into())
}

/// Sends status changes to raft, batched.
async fn report_loop(inner: Arc<Inner>, mut statuses: mpsc::Receiver<Status>) {
    let me = inner.me.to_string();
    while let Some(first) = statuses.recv().await {
        let mut batch: BTreeMap<ReplicaKey, ReplicaStatus> = BTreeMap::new();
        let mut add = |s: Status| {
            let key = ReplicaKey { workload: s.id.workload.clone(), index: s.id.index };
            let phase = match s.phase {
                Phase::Pending => RaftPhase::Pending,
                Phase::Running { .. } => RaftPhase::Running,
                Phase::Succeeded => RaftPhase::Succeeded,
                Phase::Failed(why) => RaftPhase::Failed(why),
                Phase::Restarting { .. } => RaftPhase::Restarting,
            };
            batch.insert(
                key,
                ReplicaStatus { node: me.clone(), phase, restarts: s.restarts, at_ms: now_ms() },
            );
        };
        add(first);
        let deadline = tokio::time::Instant::now() + REPORT_EVERY;
        while let Ok(Some(s)) = tokio::time::timeout_at(deadline, statuses.recv()).await {
            add(s);
        }
        let command = Command::Report(batch.into_iter().collect());
        let result = match ask_member(&inner, ApiRequest::Node(command)).await {
            Ok(ApiResponse::Applied(Ok(_))) => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            debug!(error = e, "status report not recorded");
        }
    }
}

/// Sends `req` to the api service of `peer`.
pub(crate) async fn call(
    inner: &Inner,
    peer: PeerId,
    req: &ApiRequest,
) -> Result<ApiResponse, String> {
    let body = postcard::to_allocvec(req).map_err(|e| e.to_string())?;
    let answer =
        inner.mesh.request(peer, SERVICE, body, API_TIMEOUT).await.map_err(|e| e.to_string())?;
    postcard::from_bytes(&answer).map_err(|e| format!("malformed api answer: {e}"))
}

/// Whether this node's own raft state is current enough to act on: it is a member and knows a
/// leader. A voter that was replaced while it was down still lists itself as one but never
/// hears from a leader again; its state stays as it was when it died, so it must ask the
/// others (else it would keep running replicas that moved away).
pub(crate) fn trusts_own_state(inner: &Inner) -> bool {
    inner.consensus.is_member() && inner.consensus.leader().is_some()
}

/// Sends `req` to a raft member: this node when it is one, else the members learned before,
/// else any live or connected peer (which redirects or relays).
pub(crate) async fn ask_member(inner: &Inner, req: ApiRequest) -> Result<ApiResponse, String> {
    if trusts_own_state(inner) {
        return Ok(Box::pin(crate::api::answer(inner, inner.me, req)).await);
    }
    let mut tried: BTreeSet<PeerId> = BTreeSet::new();
    let mut queue: VecDeque<PeerId> =
        inner.members.lock().map(|m| m.iter().copied().collect()).unwrap_or_default();
    queue.extend(live_peers(inner));
    // A device that has just joined knows nobody through the membership yet: its bootstrap
    // connections are the way in.
    queue.extend(inner.mesh.connected_peers().await.unwrap_or_default());
    let mut last = "no raft member is reachable".to_string();
    while let Some(peer) = queue.pop_front() {
        if peer == inner.me || !tried.insert(peer) {
            continue;
        }
        if tried.len() > MAX_ASKED {
            break;
        }
        match call(inner, peer, &req).await {
            Ok(ApiResponse::Redirect(members)) => {
                let learned: Vec<PeerId> = members.iter().filter_map(|m| m.parse().ok()).collect();
                if !learned.is_empty()
                    && let Ok(mut m) = inner.members.lock()
                {
                    *m = learned.clone();
                }
                for p in learned.into_iter().rev() {
                    queue.push_front(p);
                }
            }
            Ok(answer) => return Ok(answer),
            Err(e) => last = e,
        }
    }
    Err(last)
}
