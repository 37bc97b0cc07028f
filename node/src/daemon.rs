//! One running node: wires the mesh, the raft member, the runtime, the services and the loops
//! together, and stops them. It decides nothing itself.
//!
//! ```text
//!   start: identity ─▶ gate (reader, writer) ─▶ mesh (events) ─▶ raft member ─▶ drivers ─▶
//!          facts (view, group, unschedulable: receivers) ─▶ api ─▶ services and loops,
//!          each a task of one JoinSet, all sharing one cancellation token
//!            view ◀ mesh events          gatekeeper ▶ gate, group      placer ▶ Assign
//!            agent, report, keeper       api serve, raft serve
//!   shutdown: cancel ─▶ every task finishes what it holds (a report, a proposal) ─▶ raft
//!             stops ─▶ the mesh announces the leave ─▶ done
//!   kill (tests): abort everything, no leave, as a crash would
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudless_api::node::{Enroll, EnrolledList};
use cloudless_api::{ApiError, Reply, Settings, SignedRequest, UserKey};
use cloudless_consensus::{Candidates, Consensus, Member, voters::Candidate};
use cloudless_mesh::{Mesh, identity};
use cloudless_runtime::container::ContainerDriver;
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Agent, AgentConfig, Driver};
use cloudless_sched::Scheduler;
use cloudless_types::{Capacity, NodeName, Power, Resources, Runtime, Runtimes};
use libp2p::PeerId;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, Api};
use crate::config::DaemonConfig;
use crate::facts::{Facts, Group, Unschedulable};
use crate::gate::EnrollGate;
use crate::http::{Metrics, Readiness};
use crate::loops;
use crate::peers::Peers;
use crate::recovery::RAFT_DIR;
use crate::transport::MeshTransport;
use crate::view::{self, View};

/// Requests queued for the api service before callers are told "busy".
const API_QUEUE: usize = 256;
/// How long a stop waits for the loops to finish what they hold before it gives up on them:
/// longer than a raft write (10 s at most) and a relayed request (`peers::ASK_DEADLINE`) take,
/// short enough that a device shuts down promptly.
const STOP_GRACE: Duration = Duration::from_secs(20);

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

/// The tasks of a node.
struct Tasks {
    set: JoinSet<()>,
    mesh: Option<JoinHandle<()>>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    facts: Arc<Facts>,
    api: Arc<Api>,
    cancel: CancellationToken,
    tasks: Arc<tokio::sync::Mutex<Tasks>>,
    /// Loops started, and loops still running (readiness reports the difference).
    loops: (usize, Arc<AtomicUsize>),
}

/// What the gossiped capacity says: the totals the node offers (the scheduler counts what
/// each node's assignments request against them).
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

/// The voter controller's candidates, from the latest view and committed state.
struct Voters(watch::Receiver<Arc<View>>);

impl Candidates for Voters {
    fn candidates(&self, state: &cloudless_consensus::state::State) -> Vec<Candidate> {
        let view = self.0.borrow().clone();
        view::candidates(state, &view, Instant::now())
    }
}

impl Daemon {
    /// Starts every part of a node. Peers reach it through the enrollment gate.
    pub async fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        let data_dir = config.mesh.data_dir.clone();
        let scheduler = Scheduler::new(cloudless_sched::Config::default())
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let keypair =
            identity::load_or_create(&data_dir).map_err(|e| DaemonError::Mesh(e.into()))?;
        // The key, the raft log and the workloads' files are the owner's alone.
        if let Err(e) = crate::files::make_private(&data_dir) {
            warn!(data_dir = %data_dir.display(), error = %e, "cannot make the data dir private");
        }
        let me = keypair.public().to_peer_id();
        let (gate, gate_writer) = EnrollGate::new(me);
        // The largest disk limit a replica may have here: what the node offers, and at least
        // the scratch space a replica without a limit gets.
        let max_disk_mib = config.offer.disk_mib.max(cloudless_runtime::spec::DEFAULT_DISK_MIB);
        // Containers only where an engine answers; WASI everywhere.
        let containers = match &config.containers {
            Some(c) => {
                let mut c = c.clone();
                if c.scope.is_empty() {
                    c.scope = me.to_string();
                }
                c.allow_network |= config.allow_network;
                c.max_disk_mib = Some(max_disk_mib);
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
        // The replicas it runs at once: the owner's number, else its class's; the WASI pool
        // holds that many instances, and the scheduler places no more.
        let max_replicas = mesh_config.descriptor.max_replicas.unwrap_or_else(|| {
            crate::config::default_max_replicas(mesh_config.descriptor.device_class)
        });
        mesh_config.descriptor.max_replicas = Some(max_replicas);
        mesh_config.capacity = Some(capacity(config.offer, &runtimes));
        let mut registry = prometheus_client::registry::Registry::default();
        let Mesh { handle: mesh, events, task: mesh_task } = cloudless_mesh::start_with_metrics(
            mesh_config,
            keypair,
            Arc::new(gate.clone()),
            &mut registry,
        )
        .await?;
        let name = identity::node_name(&me);
        let consensus = Consensus::open(
            &data_dir.join(RAFT_DIR),
            Member { peer: name.clone() },
            MeshTransport::new(mesh.clone()),
            config.consensus.clone(),
        )
        .await?;
        let raft_requests = mesh
            .serve(
                <cloudless_consensus::RaftService as cloudless_types::Rpc>::SERVICE,
                api::raft::QUEUE,
            )
            .await?;
        let mut wasi_config = WasiConfig::new(&data_dir.join("wasi"));
        wasi_config.allow_network = config.allow_network;
        wasi_config.max_memory_mib = config.offer.memory_mib.clamp(16, 4096);
        wasi_config.max_disk_mib = max_disk_mib;
        wasi_config.max_replicas = max_replicas;
        let wasi = WasiDriver::new(wasi_config)?;
        let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
        let group_file = data_dir.join(crate::facts::GROUP_FILE);
        let (group_tx, group_rx) = watch::channel(Arc::new(Group::load(&group_file)));
        let bootstrap = config
            .mesh
            .bootstrap
            .iter()
            .filter_map(crate::config::peer_in)
            .map(|p| identity::node_name(&p))
            .collect();
        let (why_tx, why_rx) = watch::channel(Arc::new(Unschedulable::new()));
        let facts = Arc::new(Facts {
            me,
            name,
            mesh: mesh.clone(),
            consensus: consensus.clone(),
            wasi: wasi.clone(),
            containers: containers.clone(),
            scheduler,
            metrics: Metrics::with_registry(registry),
            offer: config.offer,
            gate,
            view: view_rx.clone(),
            group: group_rx,
            bootstrap,
            unschedulable: why_rx,
            gate_refresh: tokio::sync::Notify::new(),
            gate_hint: tokio::sync::Notify::new(),
        });
        consensus.start_controller(Arc::new(Voters(view_rx))).await;
        let mut drivers: Vec<Arc<dyn Driver>> = vec![Arc::new(wasi)];
        if let Some(c) = containers {
            drivers.push(Arc::new(c));
        }
        let (agent, statuses) = Agent::start(drivers, AgentConfig::default());
        let api_requests = mesh.serve(cloudless_api::SERVICE, API_QUEUE).await?;
        let (api, nudges) = Api::new(facts.clone(), Peers::new(facts.clone()));
        let api = Arc::new(api);
        let cancel = CancellationToken::new();
        let alive = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        let mut spawn = |f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let alive = alive.clone();
            alive.fetch_add(1, Ordering::SeqCst);
            set.spawn(async move {
                f.await;
                alive.fetch_sub(1, Ordering::SeqCst);
            });
        };
        spawn(Box::pin(loops::view::run(facts.clone(), events, view_tx, cancel.clone())));
        spawn(Box::pin(loops::view::gauges(facts.clone(), cancel.clone())));
        spawn(Box::pin(loops::gatekeeper::run(
            api.clone(),
            gate_writer,
            group_tx,
            group_file,
            cancel.clone(),
        )));
        spawn(Box::pin(loops::placer::run(api.clone(), why_tx, cancel.clone())));
        let (runs_tx, runs_rx) = watch::channel(Arc::new(loops::worker::Runs::new()));
        spawn(Box::pin(loops::worker::agent(api.clone(), agent, nudges, runs_tx, cancel.clone())));
        spawn(Box::pin(loops::worker::report(api.clone(), statuses, runs_rx, cancel.clone())));
        spawn(Box::pin(loops::worker::keeper(api.clone(), cancel.clone())));
        spawn(Box::pin(api::serve::serve(api.clone(), api_requests, cancel.clone())));
        spawn(Box::pin(api::raft::serve(facts.clone(), raft_requests, cancel.clone())));
        let started = alive.load(Ordering::SeqCst);
        info!(peer = %me, "node started");
        Ok(Daemon {
            facts,
            api,
            cancel,
            tasks: Arc::new(tokio::sync::Mutex::new(Tasks { set, mesh: Some(mesh_task) })),
            loops: (started, alive),
        })
    }

    /// Creates a new cluster with this node as its first voter.
    pub async fn init(&self, settings: Settings, admin: UserKey) -> Result<(), ApiError> {
        match self.facts.consensus.bootstrap(settings, admin).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(api::write_error(e)),
        }
    }

    /// Enrolls this node with an invite (through a member, or relayed): its token, and the
    /// proof that this device holds the invite.
    pub async fn enroll(&self, invite: &cloudless_api::invite::Invite) -> Result<Reply, ApiError> {
        let peer = self.facts.name.clone();
        let e = Enroll {
            token: invite.token.clone(),
            signature: invite.signature.clone(),
            proof: invite.claim_proof(&peer),
            peer,
        };
        let reply = self.api.enroll(&self.facts.name, e).await?;
        // Let in by the pool now: learn the enrolled list at once, not at the next tick.
        self.facts.gate_refresh.notify_one();
        Ok(reply)
    }

    /// Who is enrolled, from this node's state if it trusts it, else from a member.
    pub async fn enrolled(&self) -> Result<EnrolledList, ApiError> {
        if self.facts.trusts_own_state() {
            self.api.enrolled(None).await
        } else {
            self.api.peers().node_to_member(cloudless_api::node::Enrolled { known: None }).await
        }
    }

    /// A user's signed command, checked and applied as if it arrived over the network.
    pub async fn user_command(&self, signed: SignedRequest) -> Result<Reply, ApiError> {
        self.api.user_command(signed).await
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.facts.me
    }

    /// This node's name.
    pub fn name(&self) -> &NodeName {
        &self.facts.name
    }

    /// The mesh handle.
    pub fn mesh(&self) -> &cloudless_mesh::Handle {
        &self.facts.mesh
    }

    /// The raft member.
    pub fn consensus(&self) -> &Consensus<MeshTransport> {
        &self.facts.consensus
    }

    /// This node's metrics (served at /metrics).
    pub fn metrics(&self) -> Metrics {
        self.facts.metrics.clone()
    }

    /// The latest view of the pool.
    pub fn view(&self) -> Arc<View> {
        self.facts.view()
    }

    /// What /health and /ready answer.
    pub fn readiness(&self) -> Arc<dyn Readiness> {
        Arc::new(Ready { facts: Arc::downgrade(&self.facts), loops: self.loops.clone() })
    }

    /// Resolves when the node can no longer work, with what failed: raft stopped on an error
    /// (its storage failed: a full disk, an I/O error), the mesh's swarm task ended, or the
    /// data dir turned out older than the node's last run. The binary exits on it rather than
    /// run on as a node that answers but cannot commit, or that votes with a stale log.
    pub async fn failed(&self) -> Failure {
        let mut metrics = self.facts.consensus.raft().metrics();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if let Some(why) = failure(&self.facts) {
                return why;
            }
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return Failure::Raft("its task ended".into());
                    }
                }
                // The directory is asked once a second only: raft's metrics change on every
                // pass of its loop (tens of times a second on a leader), and each ask is a
                // round trip through the swarm task.
                _ = tick.tick() => {
                    if let Ok(stats) = self.facts.mesh.directory_stats().await
                        && let Some(stale) = stats.stale
                    {
                        return Failure::Stale(stale);
                    }
                }
            }
        }
    }

    /// The handlers of the node's services (what a request over the network would reach).
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The WASI driver (module storage, logs).
    pub fn wasi(&self) -> &WasiDriver {
        &self.facts.wasi
    }

    /// Stops as a crash would: no leave is announced, replicas stop with the process (the
    /// others find out by failure detection). For tests and benchmarks of failover.
    pub async fn kill(&self) {
        self.cancel.cancel();
        let mut t = self.tasks.lock().await;
        t.set.abort_all();
        while t.set.join_next().await.is_some() {}
        let _ = self.facts.mesh.shutdown().await;
        self.facts.consensus.shutdown().await;
        for o in self.facts.wasi.list().await.unwrap_or_default() {
            let _ = self.facts.wasi.stop(&o.id, Duration::ZERO).await;
        }
        if let Some(m) = t.mesh.take() {
            m.abort();
        }
    }

    /// Stops the loops (each finishes what it holds), raft, and the mesh, announcing a leave.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let mut t = self.tasks.lock().await;
        let drained =
            tokio::time::timeout(STOP_GRACE, async { while t.set.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            warn!("some of the node's loops did not stop in time; stopping them now");
            t.set.abort_all();
            while t.set.join_next().await.is_some() {}
        }
        self.facts.consensus.shutdown().await;
        let _ = self.facts.mesh.leave().await;
        if let Some(m) = t.mesh.take() {
            let _ = tokio::time::timeout(STOP_GRACE, m).await;
        }
    }
}

/// Why a node cannot go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Raft stopped on an error (its storage failed: a full disk, an I/O error).
    Raft(String),
    /// The mesh's swarm task ended.
    Mesh,
    /// The data dir is older than this node's last run (restored from a backup, or copied
    /// back): the pool holds an entry this node signed later than anything the data dir kept.
    Stale(cloudless_mesh::directory::Stale),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Raft(e) => write!(f, "raft stopped: {e}"),
            Failure::Mesh => write!(f, "the mesh's swarm task stopped"),
            Failure::Stale(s) => write!(
                f,
                "this data dir is older than this node's last run: the pool holds an entry this \
                 node signed {} s after the newest one the data dir kept",
                s.seen.saturating_sub(s.kept) / 1000
            ),
        }
    }
}

impl Failure {
    /// What the operator should do about it, for data dir `data_dir`.
    pub fn advice(&self, data_dir: &std::path::Path) -> String {
        let dir = data_dir.display();
        match self {
            Failure::Raft(_) | Failure::Mesh => format!(
                "Check that {dir} is on a disk with free space and without I/O errors, then run \
                 it again"
            ),
            Failure::Stale(_) => format!(
                "It was restored from a backup or copied back; running on with its raft state \
                 could make it vote twice in one election. To rejoin: move {dir} away and join \
                 again with a new invite (`cloudlessctl token create`, then `cloudless join`). \
                 If you restored it on purpose and no other copy of it runs, start it with \
                 `cloudless run --restored`"
            ),
        }
    }
}

/// Why a node can no longer work, from what it can tell at once: raft stopped on an error,
/// or the mesh's swarm task ended.
fn failure(facts: &Facts) -> Option<Failure> {
    if !facts.mesh.is_running() {
        return Some(Failure::Mesh);
    }
    match &facts.consensus.raft().metrics().borrow().running_state {
        Ok(()) => None,
        Err(f) => Some(Failure::Raft(f.to_string())),
    }
}

/// /health: the swarm task and raft run (raft stops on a storage error) and so do the loops.
/// /ready: healthy, enrolled, and the raft group is reachable.
struct Ready {
    facts: std::sync::Weak<Facts>,
    loops: (usize, Arc<AtomicUsize>),
}

impl Readiness for Ready {
    fn health(&self) -> Result<(), String> {
        let (started, alive) = (self.loops.0, self.loops.1.load(Ordering::SeqCst));
        let Some(facts) = self.facts.upgrade() else {
            return Err("the node is stopping".into());
        };
        if alive == 0 {
            return Err("the node is stopping".into());
        }
        if let Some(why) = failure(&facts) {
            return Err(why.to_string());
        }
        match started.saturating_sub(alive) {
            0 => Ok(()),
            n => Err(format!("{n} of the node's loops stopped")),
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.health()?;
        let facts = self.facts.upgrade().ok_or("the node is stopping")?;
        if !facts.gate.knows(&facts.me) {
            return Err("not enrolled in a cluster (yet)".into());
        }
        // Knows how to reach the raft group: a leader, or members to ask.
        let reachable =
            facts.consensus.leader().is_some() || facts.voters().iter().any(|p| *p != facts.name);
        if reachable { Ok(()) } else { Err("no raft leader or member known".into()) }
    }
}
