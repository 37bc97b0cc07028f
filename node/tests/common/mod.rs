//! A raft group over real mesh nodes on loopback, for the node's tests and benchmarks.

#![allow(clippy::unwrap_used, dead_code)] // test helpers; not every user needs every helper

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudless_api::{SignedRequest, UserRequest};
use cloudless_consensus::state::{Command, Request, Settings, State};
use cloudless_consensus::voters::Candidate;
use cloudless_consensus::{Candidates, Config, Consensus, Member, RaftService, node_id};
use cloudless_mesh::identity;
use cloudless_node::transport::MeshTransport;
use cloudless_testnet::Testnet;
use cloudless_types::{NodeName, Rpc, now_ms};
use ed25519_dalek::SigningKey;

/// The groups' cluster root public key (what users sign for).
pub const ROOT: [u8; 32] = [9; 32];

/// The groups' admin (its public half is bootstrapped as the first user).
pub fn admin() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

/// `command` as the CLI sends it: signed by the admin, with the signature travelling along so
/// a follower may forward it.
pub fn signed(command: Command) -> Request {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let (client, time_ms, user) = (7, now_ms(), admin());
    let proof = SignedRequest::sign(
        &user,
        ROOT,
        client,
        serial,
        time_ms,
        UserRequest::Command(command.clone()),
    );
    Request::from_signed(proof, command, time_ms)
}

/// Serves raft messages for `consensus` on `mesh` (every caller admitted: these groups have
/// no enrollment; the node's own service checks callers against its access table).
async fn serve_raft(mesh: &cloudless_mesh::Handle, consensus: Consensus<MeshTransport>) {
    let mut requests = mesh.serve(RaftService::SERVICE, 256).await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = requests.recv().await {
            let consensus = consensus.clone();
            tokio::spawn(async move {
                let caller = identity::node_name(&req.peer);
                match req.decode::<RaftService>() {
                    Ok(m) => match consensus.handle(&caller, m).await {
                        Ok(answer) => req.respond::<RaftService>(&answer),
                        Err(e) => req.fail(cloudless_mesh::rpc::RemoteError::new(
                            cloudless_mesh::rpc::RemoteErrorKind::Unauthorized,
                            e.to_string(),
                        )),
                    },
                    Err(e) => req.fail(e),
                }
            });
        }
    });
}

/// Everyone the test has not killed is a healthy, eligible candidate.
#[derive(Default)]
pub struct Alive(pub Mutex<BTreeSet<NodeName>>);

impl Candidates for Alive {
    fn candidates(&self, _: &State) -> Vec<Candidate> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|p| Candidate {
                id: node_id(p),
                member: Member { peer: p.clone() },
                alive: true,
                eligible: true,
                stability: 1.0,
            })
            .collect()
    }
}

pub struct Group {
    pub net: Testnet,
    pub dirs: Vec<tempfile::TempDir>,
    pub nodes: Vec<Option<Consensus<MeshTransport>>>,
    pub alive: Arc<Alive>,
    pub config: Config,
}

impl Group {
    /// `n` mesh nodes, each with a raft member; node 0 bootstraps and the controller grows
    /// the group to its target size.
    pub async fn start(n: usize, config: Config) -> Group {
        let net = Testnet::start(n).await.unwrap();
        net.wait_until("the mesh converges", Duration::from_secs(60), || net.converged())
            .await
            .unwrap();
        let mut g =
            Group { net, dirs: Vec::new(), nodes: Vec::new(), alive: Arc::default(), config };
        for i in 0..n {
            g.dirs.push(tempfile::tempdir().unwrap());
            g.nodes.push(None);
            g.boot(i).await;
        }
        let settings = Settings {
            name: "bench".into(),
            root_key: ROOT,
            voter_target: None,
            phones_may_vote: false,
        };
        g.node(0).bootstrap(settings, admin().verifying_key().to_bytes()).await.unwrap().unwrap();
        let want = if n >= 3 { 3 } else { 1 };
        let start = Instant::now();
        while g.leader().is_none_or(|l| g.node(l).voters().len() != want) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the group did not reach {want} voters"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        g
    }

    /// Starts raft member `i` on its (running) mesh node, from its data dir. A member that
    /// just stopped may still hold the database for a moment (its RPC handlers finish first):
    /// opening is retried until it is released.
    pub async fn boot(&mut self, i: usize) {
        let mesh = self.net.handle(i).unwrap().clone();
        let me = Member { peer: identity::node_name(&mesh.peer_id()) };
        let start = Instant::now();
        let c = loop {
            match Consensus::open(
                self.dirs[i].path(),
                me.clone(),
                MeshTransport::new(mesh.clone()),
                self.config.clone(),
            )
            .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "cannot open raft data: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        serve_raft(&mesh, c.clone()).await;
        c.start_controller(self.alive.clone()).await;
        self.alive.0.lock().unwrap().insert(me.peer);
        self.nodes[i] = Some(c);
    }

    pub fn node(&self, i: usize) -> &Consensus<MeshTransport> {
        self.nodes[i].as_ref().unwrap()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    /// The leader of the highest term any running member knows (a member just restarted may
    /// still believe in its old leadership until someone tells it otherwise).
    pub fn leader(&self) -> Option<usize> {
        let term = |i: usize| self.node(i).raft().metrics().borrow().current_term;
        let top = self.running().into_iter().map(term).max()?;
        self.running().into_iter().find(|i| self.node(*i).is_leader() && term(*i) == top)
    }

    /// True once there is a leader with `voters` voters and every running member has applied
    /// everything in the leader's log: a healthy group, ready for the next fault.
    #[allow(dead_code)]
    pub fn settled(&self, voters: usize) -> bool {
        let Some(l) = self.leader() else { return false };
        if self.node(l).voters().len() != voters {
            return false;
        }
        let last = self.node(l).raft().metrics().borrow().last_log_index;
        self.running().into_iter().all(|i| {
            let m = self.node(i).raft().metrics().borrow().clone();
            m.last_applied.map(|x| x.index) == last
        })
    }

    /// Crashes node `i`: its mesh node and raft member stop; the disk stays.
    pub async fn kill(&mut self, i: usize) {
        let peer = self.node(i).member().peer.clone();
        self.alive.0.lock().unwrap().remove(&peer);
        self.net.kill(i).await;
        if let Some(c) = self.nodes[i].take() {
            c.shutdown().await;
        }
    }

    /// Brings node `i` back: same identity, same raft data.
    pub async fn restart(&mut self, i: usize) {
        self.net.restart(i).await.unwrap();
        self.boot(i).await;
    }
}
