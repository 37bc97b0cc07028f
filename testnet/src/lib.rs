//! Many real mesh nodes in one process, on loopback, with faults on demand; and clusters of
//! real `cloudless` processes driven by `cloudlessctl` ([`procs`]).
//!
//! [`Testnet::start`] launches `n` complete mesh nodes (real libp2p swarms over QUIC and TCP on
//! `127.0.0.1`, port 0), each with its own data directory, the first one serving as the
//! bootstrap peer of the others. A test then waits for conditions with deadlines
//! ([`Testnet::wait_until`]), crashes nodes ([`Testnet::kill`]), makes them leave
//! ([`Testnet::leave`]), restarts them from their data directory ([`Testnet::restart`]), and cuts
//! the network between sets of nodes ([`Testnet::partition`], [`Testnet::heal`]).
//!
//! ```text
//!   Testnet ──▶ node 0 (bootstrap) ◀── node 1 … node n-1     each: mesh::start(config, gate)
//!      │                                                      gate = PartitionGate(shared table)
//!      └── partition table: PeerId → side ──▶ gates refuse connections across sides
//! ```
//!
//! Partitions are made at the connection level through each node's connection gate (the same
//! seam enrollment uses): connections across the cut are closed and refused, so every protocol
//! sees the other side vanish, as with a real network split. Dropping every node's task when
//! the testnet is dropped leaves no task or socket behind.

pub mod hostile;
pub mod joins;
pub mod procs;
pub mod report;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloudless_mesh::gate::{Gate, Protocol};
use cloudless_mesh::membership::{self, MemberView, State};
use cloudless_mesh::{Config, Event, Handle, Mesh, RelayMode};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::task::JoinHandle;

/// Events kept per node for inspection; older ones are dropped.
const HISTORY: usize = 20_000;
/// How often conditions are re-checked while waiting.
const POLL: Duration = Duration::from_millis(50);

/// Which side of a partition each peer is on; peers absent from the table see everyone.
#[derive(Clone, Default)]
pub struct PartitionTable(Arc<RwLock<HashMap<PeerId, usize>>>);

impl PartitionTable {
    fn side(&self, peer: &PeerId) -> Option<usize> {
        self.0.read().ok().and_then(|t| t.get(peer).copied())
    }
}

/// The gate every testnet node uses: admits everyone on its own side of the partition.
pub struct PartitionGate {
    me: PeerId,
    table: PartitionTable,
}

impl Gate for PartitionGate {
    fn admits(&self, peer: &PeerId) -> bool {
        match (self.table.side(&self.me), self.table.side(peer)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
    fn allows(&self, peer: &PeerId, _: Protocol<'_>) -> bool {
        self.admits(peer)
    }
}

/// One node of the testnet.
pub struct Node {
    /// Its PeerId (stable across restarts).
    pub peer: PeerId,
    /// Its data directory.
    pub data_dir: PathBuf,
    keypair: Keypair,
    running: Option<(Handle, JoinHandle<()>, JoinHandle<()>)>,
    history: Arc<Mutex<Vec<Event>>>,
    addrs: Vec<Multiaddr>,
}

/// Adjusts the configuration of node `i` before it starts.
pub type Tweak = Arc<dyn Fn(usize, &mut Config) + Send + Sync>;

/// A set of in-process mesh nodes. Dropping it stops them all.
pub struct Testnet {
    nodes: Vec<Node>,
    table: PartitionTable,
    tweak: Tweak,
    _dir: tempfile::TempDir,
}

/// The configuration testnet nodes start from: loopback only, no LAN discovery, no relay
/// server, quicker reconnection and directory reconciliation than production so tests settle
/// in seconds.
pub fn test_config(data_dir: PathBuf) -> Config {
    let mut c = Config {
        data_dir,
        listen: vec![
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap_or_else(|_| Multiaddr::empty()),
            "/ip4/127.0.0.1/tcp/0".parse().unwrap_or_else(|_| Multiaddr::empty()),
        ],
        mdns: false,
        relay: RelayMode::Never,
        directory_interval: Duration::from_millis(500),
        persist_interval: Duration::from_millis(500),
        ..Config::default()
    };
    c.membership.reconnect_interval = Duration::from_millis(500);
    c
}

impl Testnet {
    /// Starts `n` nodes; node 0 is everyone's bootstrap peer.
    pub async fn start(n: usize) -> Result<Testnet> {
        Self::start_with(n, Arc::new(|_, _| {})).await
    }

    /// Starts `n` nodes, letting `tweak` adjust each configuration.
    pub async fn start_with(n: usize, tweak: Tweak) -> Result<Testnet> {
        let dir = tempfile::tempdir().context("cannot create the testnet directory")?;
        let mut net =
            Testnet { nodes: Vec::new(), table: PartitionTable::default(), tweak, _dir: dir };
        for _ in 0..n {
            net.add_node().await?;
        }
        Ok(net)
    }

    /// Adds and starts one more node, bootstrapping from a running one. Returns its index.
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let data_dir = self._dir.path().join(format!("node-{i}"));
        let keypair = cloudless_mesh::identity::load_or_create(&data_dir)?;
        let peer = keypair.public().to_peer_id();
        self.nodes.push(Node {
            peer,
            data_dir,
            keypair,
            running: None,
            history: Arc::default(),
            addrs: Vec::new(),
        });
        self.boot(i).await?;
        Ok(i)
    }

    async fn boot(&mut self, i: usize) -> Result<()> {
        // Bootstrap from the first other node that runs (node 0 for a fresh start; anyone
        // for a restart, which comes back on new ports that nobody knows yet).
        let bootstrap = (0..self.nodes.len())
            .find(|j| *j != i && self.nodes[*j].running.is_some())
            .map(|j| self.nodes[j].addrs.clone())
            .unwrap_or_default();
        let node = &mut self.nodes[i];
        let mut config = test_config(node.data_dir.clone());
        config.bootstrap = bootstrap;
        (self.tweak)(i, &mut config);
        let gate = Arc::new(PartitionGate { me: node.peer, table: self.table.clone() });
        let Mesh { handle, mut events, task } =
            cloudless_mesh::start_with_identity(config, node.keypair.clone(), gate)
                .await
                .with_context(|| format!("cannot start node {i}"))?;
        let history = node.history.clone();
        let drain = tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let Ok(mut h) = history.lock() {
                    if h.len() >= HISTORY {
                        h.drain(..HISTORY / 2);
                    }
                    h.push(e);
                }
            }
        });
        node.running = Some((handle.clone(), task, drain));
        // Wait until it listens, so that others can bootstrap from it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let addrs = handle.listen_addrs().await?;
            if !addrs.is_empty() {
                node.addrs = addrs;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {i} did not start listening within 10 s");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Number of nodes, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the testnet has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Node `i`'s PeerId.
    pub fn peer(&self, i: usize) -> PeerId {
        self.nodes[i].peer
    }

    /// Node `i`'s listen addresses (with `/p2p/<id>`).
    pub fn addrs(&self, i: usize) -> &[Multiaddr] {
        &self.nodes[i].addrs
    }

    /// Node `i`'s handle, if it runs.
    pub fn handle(&self, i: usize) -> Option<&Handle> {
        self.nodes[i].running.as_ref().map(|(h, _, _)| h)
    }

    /// Indexes of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].running.is_some()).collect()
    }

    /// The events node `i` emitted so far (the most recent 10,000 to 20,000 of them).
    pub fn history(&self, i: usize) -> Vec<Event> {
        self.nodes[i].history.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Crashes node `i`: its task is aborted, its sockets close, nothing is announced.
    pub async fn kill(&mut self, i: usize) {
        if let Some((_, task, drain)) = self.nodes[i].running.take() {
            task.abort();
            let _ = task.await;
            drain.abort();
        }
    }

    /// Node `i` leaves the cluster voluntarily and stops.
    pub async fn leave(&mut self, i: usize) -> Result<()> {
        if let Some((handle, task, drain)) = self.nodes[i].running.take() {
            handle.leave().await?;
            let _ = task.await;
            drain.abort();
        }
        Ok(())
    }

    /// Starts a stopped node `i` again from its data directory (same identity, same
    /// directory copy, a higher incarnation).
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].running.is_some() {
            bail!("node {i} is running");
        }
        self.boot(i).await
    }

    /// Splits the network: nodes in different groups can no longer reach each other. Nodes in
    /// no group keep reaching everyone.
    pub async fn partition(&mut self, groups: &[&[usize]]) -> Result<()> {
        {
            let mut t =
                self.table.0.write().map_err(|_| anyhow::anyhow!("partition table poisoned"))?;
            t.clear();
            for (side, group) in groups.iter().enumerate() {
                for &i in *group {
                    t.insert(self.nodes[i].peer, side);
                }
            }
        }
        self.recheck().await
    }

    /// Removes every partition.
    pub async fn heal(&mut self) -> Result<()> {
        self.table.0.write().map_err(|_| anyhow::anyhow!("partition table poisoned"))?.clear();
        self.recheck().await
    }

    async fn recheck(&self) -> Result<()> {
        for i in self.running() {
            if let Some(h) = self.handle(i) {
                h.recheck_gate().await?;
            }
        }
        Ok(())
    }

    /// How node `i` sees every member (empty if it is not running).
    pub async fn members(&self, i: usize) -> Vec<MemberView<PeerId>> {
        match self.handle(i) {
            Some(h) => h.members().await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// How node `i` sees node `j`.
    pub async fn state_of(&self, i: usize, j: usize) -> Option<State> {
        let peer = self.peer(j);
        self.members(i).await.into_iter().find(|m| m.id == peer).map(|m| m.state)
    }

    /// Whether every node in `observers` holds every node in `subjects` in `state`.
    pub async fn all_see(&self, observers: &[usize], subjects: &[usize], state: State) -> bool {
        for &o in observers {
            let view = self.members(o).await;
            for &s in subjects {
                let peer = self.peer(s);
                if !view.iter().any(|m| m.id == peer && m.state == state) {
                    return false;
                }
            }
        }
        true
    }

    /// Whether every running node sees every running node alive.
    pub async fn converged(&self) -> bool {
        let running = self.running();
        self.all_see(&running, &running, State::Alive).await
    }

    /// Polls `condition` until it holds or `timeout` passes; the error names `what`.
    pub async fn wait_until<F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: F,
    ) -> Result<Duration>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_until(what, timeout, &mut condition).await
    }

    /// Whether node `i` ever reported `subject` in `state`.
    pub fn ever_saw(&self, i: usize, subject: usize, state: State) -> bool {
        let peer = self.peer(subject);
        self.history(i).iter().any(|e| {
            matches!(e, Event::Member(membership::Event::State { id, state: s, .. }) if *id == peer && *s == state)
        })
    }
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes. Returns how long it took;
/// the error says what did not happen.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    condition: &mut F,
) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some((_, task, drain)) = n.running.take() {
                task.abort();
                drain.abort();
            }
        }
    }
}

/// A trivial RPC service for tests and demos: answers a string with a prefixed copy.
pub struct Echo;

impl cloudless_mesh::rpc::Rpc for Echo {
    const SERVICE: &'static str = "testnet.echo";
    type Request = String;
    type Response = String;
}

/// Serves [`Echo`] on `handle`, answering `"{prefix}{request}"`; a body that is not a string
/// gets a bad-request error.
pub async fn serve_echo(handle: &Handle, prefix: &str) -> Result<()> {
    let mut requests = handle.serve(<Echo as cloudless_mesh::rpc::Rpc>::SERVICE, 16).await?;
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        while let Some(r) = requests.recv().await {
            match r.decode::<Echo>() {
                Ok(text) => r.respond::<Echo>(&format!("{prefix}{text}")),
                Err(e) => r.fail(e),
            }
        }
    });
    Ok(())
}
