//! One running node: the mesh, the raft member, the runtime, and the loops that join them.
//!
//! ```text
//!   mesh ──members, capacity, directory──▶ view (every 500 ms) ──▶ leader loop (raft leader
//!                                                                  only): leader::round ──▶ Assign
//!   raft ◀── api service (commands from nodes and users, queries, module chunks)
//!   keeper loop (raft members): a copy of every module a workload names
//!   agent loop: my assignments (local state if a raft member, else asked of one) ──▶ modules
//!               fetched from peers ──▶ runtime Agent ──▶ status changes ──▶ batched Report
//! ```
//!
//! The scheduler counts what each node's assignments request against the node's offer, so the
//! gossiped capacity only needs the totals.
//!
//! Every loop only reads committed state and proposes commands; a loop that fails waits a
//! moment and tries again, so a lost leader or an unreachable peer delays work, never stops it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudless_consensus::api::{ApiRequest, ApiResponse, CHUNK, MAX_MODULE, Query, SERVICE};
use cloudless_consensus::state::{
    Actor, Command, Phase as RaftPhase, ReplicaKey, ReplicaStatus, Settings, State, UserKey,
};
use cloudless_consensus::voters::{self, Candidate, Observation};
use cloudless_consensus::{Candidates, Consensus, Consistency, Member, node_id};
use cloudless_mesh::rpc::{RemoteError, RemoteErrorKind};
use cloudless_mesh::{Gate, Handle, Mesh, membership};
use cloudless_runtime::container::{ContainerConfig, ContainerDriver};
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Agent, AgentConfig, Driver, Phase, ReplicaSpec, Status};
use cloudless_sched::Scheduler;
use cloudless_types::{Capacity, Image, Power, Resources, Runtime, Runtimes, WorkloadSpec};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::leader::{self, Seen};
use crate::raft_rpc::{self, MeshTransport};
use crate::recovery::RAFT_DIR;

/// How often the view of the pool is refreshed from the mesh.
const VIEW_EVERY: Duration = Duration::from_millis(500);
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
}

/// How steadily a peer has been alive.
#[derive(Clone, Debug)]
struct Streak {
    /// Alive since (in the current streak).
    since: Instant,
    /// When it came back after being suspect, dead or gone, within the flap window.
    returns: Vec<Instant>,
    /// Its state at the last look.
    state: membership::State,
}

struct Inner {
    me: PeerId,
    mesh: Handle,
    consensus: Consensus<MeshTransport>,
    wasi: WasiDriver,
    seen: Mutex<Vec<Seen>>,
    /// Raft voters as last learned (for nodes that are not members themselves).
    members: Mutex<Vec<PeerId>>,
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

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Daemon {
    /// Starts every part of a node.
    pub async fn start(config: DaemonConfig, gate: Arc<dyn Gate>) -> Result<Daemon, DaemonError> {
        let data_dir: PathBuf = config.mesh.data_dir.clone();
        // Containers only where an engine answers; WASI everywhere.
        let containers = match &config.containers {
            Some(c) => Some(ContainerDriver::connect(c.clone()).await?),
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
        let Mesh { handle: mesh, events, task } = cloudless_mesh::start(mesh_config, gate).await?;
        // Events are not needed here: the loops poll the mesh's view.
        tokio::spawn(drain(events));
        let me = mesh.peer_id();
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
            tokio::spawn(serve_api(inner.clone(), api)),
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

async fn drain(mut events: mpsc::Receiver<cloudless_mesh::Event>) {
    while events.recv().await.is_some() {}
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

/// Refreshes the view of the pool, and the stability record voters are chosen by.
async fn view_loop(inner: Arc<Inner>) {
    loop {
        if let (Ok(members), Ok(dir)) = (inner.mesh.members().await, inner.mesh.directory().await) {
            let now = Instant::now();
            let seen: Vec<Seen> = members
                .iter()
                .map(|m| Seen {
                    peer: m.id.to_string(),
                    state: m.state,
                    capacity: m.capacity,
                    descriptor: dir.get(&m.id).cloned(),
                })
                .collect();
            if let Ok(mut st) = inner.stability.lock() {
                for m in &members {
                    let e = st.entry(m.id.to_string()).or_insert(Streak {
                        since: now,
                        returns: Vec::new(),
                        state: m.state,
                    });
                    let was_alive = e.state == membership::State::Alive;
                    if m.state == membership::State::Alive && !was_alive {
                        e.since = now;
                        e.returns.push(now);
                    }
                    e.returns.retain(|t| now.duration_since(*t) < voters::FLAP_WINDOW);
                    e.state = m.state;
                }
            }
            if let Ok(mut s) = inner.seen.lock() {
                *s = seen;
            }
        }
        if inner.consensus.is_member() {
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
        tokio::time::sleep(VIEW_EVERY).await;
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
    let scheduler = match Scheduler::new(cloudless_sched::Config::default()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "scheduler settings are invalid; this node will not schedule");
            return;
        }
    };
    // Run when the raft state changed (a committed workload is placed at once), and at least
    // every LEADER_EVERY (liveness changes come from the mesh, not from raft).
    let mut applied = None;
    loop {
        applied = inner.consensus.applied_after(applied, LEADER_EVERY).await;
        if !inner.consensus.is_leader() {
            continue;
        }
        let seen = inner.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let round = inner
            .consensus
            .read(Consistency::Stale, |state| leader::round(state, &seen, &scheduler))
            .await;
        let Ok(round) = round else { continue };
        for (workload, why) in &round.unschedulable {
            debug!(workload, why, "unschedulable");
        }
        if let Some(command) = round.command {
            match inner.consensus.propose(Actor::System, command).await {
                Ok(Ok(_)) => debug!(placed = round.placed, "assignments committed"),
                Ok(Err(e)) => debug!(error = %e, "assignment refused"),
                Err(e) => debug!(error = %e, "assignment not committed"),
            }
        }
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
        let assigned = match ask_member(&inner, query).await {
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
                if last.as_ref() != Some(&specs) {
                    if agent.set_desired(specs.clone()).await.is_err() {
                        return;
                    }
                    last = Some(specs);
                }
            }
            Err(e) => debug!(error = e, "cannot learn assignments yet"),
        }
        applied = inner.consensus.applied_after(applied, AGENT_EVERY).await;
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

fn assigned(state: &State, node: &str) -> Vec<(ReplicaKey, WorkloadSpec)> {
    state
        .assigned_to(node)
        .filter_map(|(k, _)| {
            state.workloads().get(&k.workload).map(|w| (k.clone(), w.spec.clone()))
        })
        .collect()
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

async fn call(inner: &Inner, peer: PeerId, req: &ApiRequest) -> Result<ApiResponse, String> {
    let body = postcard::to_allocvec(req).map_err(|e| e.to_string())?;
    let answer =
        inner.mesh.request(peer, SERVICE, body, API_TIMEOUT).await.map_err(|e| e.to_string())?;
    postcard::from_bytes(&answer).map_err(|e| format!("malformed api answer: {e}"))
}

/// Sends `req` to a raft member: this node when it is one, else the members learned before,
/// else any peer (which redirects).
async fn ask_member(inner: &Inner, req: ApiRequest) -> Result<ApiResponse, String> {
    if inner.consensus.is_member() {
        return Ok(answer(inner, inner.me, req).await);
    }
    let mut tried: BTreeSet<PeerId> = BTreeSet::new();
    let mut queue: Vec<PeerId> = inner.members.lock().map(|m| m.clone()).unwrap_or_default();
    queue.extend(live_peers(inner));
    let mut last = "no raft member is reachable".to_string();
    while let Some(peer) = queue.first().copied() {
        queue.remove(0);
        if peer == inner.me || !tried.insert(peer) || tried.len() > 16 {
            continue;
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
                    queue.insert(0, p);
                }
            }
            Ok(answer) => return Ok(answer),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Serves the api service.
async fn serve_api(
    inner: Arc<Inner>,
    mut requests: mpsc::Receiver<cloudless_mesh::rpc::InboundRequest>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some(req) = requests.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let caller = req.peer;
            let answer = match postcard::from_bytes::<ApiRequest>(&req.body) {
                Ok(r) => answer(&inner, caller, r).await,
                Err(e) => {
                    req.fail(RemoteError::new(
                        RemoteErrorKind::BadRequest,
                        format!("malformed api request: {e}"),
                    ));
                    return;
                }
            };
            match postcard::to_allocvec(&answer) {
                Ok(bytes) => req.respond_bytes(bytes),
                Err(e) => req.fail(RemoteError::new(RemoteErrorKind::Failed, e.to_string())),
            }
        });
    }
}

async fn answer(inner: &Inner, caller: PeerId, req: ApiRequest) -> ApiResponse {
    let redirect = || {
        ApiResponse::Redirect(
            inner
                .members
                .lock()
                .map(|m| m.iter().map(|p| p.to_string()).collect())
                .unwrap_or_default(),
        )
    };
    match req {
        ApiRequest::Module { hash, offset } => {
            match inner.wasi.module_chunk(&hash, offset, CHUNK) {
                Some((total, bytes)) => ApiResponse::Module { total, bytes },
                None => ApiResponse::Refused(format!("module {hash} is not stored here")),
            }
        }
        _ if !inner.consensus.is_member() => redirect(),
        ApiRequest::Query(Query::Members) => ApiResponse::Members(
            inner.consensus.voter_members().into_iter().map(|m| m.peer).collect(),
        ),
        ApiRequest::Query(Query::Assigned { node }) => {
            match inner.consensus.read(Consistency::Stale, |s| assigned(s, &node)).await {
                Ok(a) => ApiResponse::Assigned(a),
                Err(e) => ApiResponse::Refused(e.to_string()),
            }
        }
        ApiRequest::Node(command) => {
            match inner.consensus.propose(Actor::Node(caller.to_string()), command).await {
                Ok(r) => ApiResponse::Applied(r),
                Err(e) => ApiResponse::Refused(e.to_string()),
            }
        }
        ApiRequest::User(signed) => {
            if let Err(e) = signed.verify(now_ms()) {
                return ApiResponse::Refused(e.to_string());
            }
            let request = cloudless_consensus::state::Request {
                client: signed.client,
                serial: signed.serial,
                actor: Actor::User(signed.key),
                time_ms: now_ms(),
                command: signed.command,
            };
            match inner.consensus.submit(request).await {
                Ok(r) => ApiResponse::Applied(r),
                Err(e) => ApiResponse::Refused(e.to_string()),
            }
        }
    }
}
