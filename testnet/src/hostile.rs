//! A hostile peer: a real libp2p mesh node that speaks Cloudless's wire formats with any
//! identity — a stranger's fresh key, or the key of an enrolled device taken from its data
//! dir (the device's owner changed its code) — and sends whatever a test makes it send.
//!
//! ```text
//!   Hostile::stranger() / Hostile::with_key(victim data dir)
//!        └─ mesh::start_with_identity (open gate, loopback, no mDNS) ──dial──▶ target node
//!   raft(peer, Message)        ──"raft" RPC──▶  the target's raft service
//!   api::<C>(peer, Request)    ──"api" RPC───▶  the target's api service
//!   raw(peer, service, bytes)  ──any bytes───▶  any service
//! ```
//!
//! The hostile suite (`testnet/tests/hostile_*.rs`) runs one attack per test against a cluster
//! of real `cloudless` processes ([`crate::procs`]) and checks that the attack is refused and
//! that the pool keeps working.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloudless_api::{Call, Request, Service};
use cloudless_consensus::{Answer, Message, RaftService};
use cloudless_mesh::rpc::RpcError;
use cloudless_mesh::{Mesh, OpenGate};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

mod raw;
pub use raw::{Frames, NO_ANSWER, RawPeer, Sent, is_ack};

/// How long a hostile peer waits for its connection to the target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The deadline of one hostile call: generous, since a refusal is what is expected.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A hostile mesh peer.
pub struct Hostile {
    mesh: Mesh,
    _dir: tempfile::TempDir,
}

/// The key in an enrolled device's data dir (`identity.key`): what its owner has.
pub fn key_of(data_dir: &Path) -> Result<Keypair> {
    if !data_dir.join("identity.key").exists() {
        bail!("{} holds no identity.key", data_dir.display());
    }
    cloudless_mesh::identity::load_or_create(data_dir)
        .with_context(|| format!("cannot read the identity in {}", data_dir.display()))
}

impl Hostile {
    /// A peer with a fresh key nobody enrolled, connected to `target` (an address with
    /// `/p2p/<id>`).
    pub async fn stranger(target: &str) -> Result<Hostile> {
        Self::start(Keypair::generate_ed25519(), target).await
    }

    /// A peer with the identity in `data_dir` (an enrolled device's, stopped first so that
    /// only one peer holds it), connected to `target`.
    pub async fn with_key(data_dir: &Path, target: &str) -> Result<Hostile> {
        Self::start(key_of(data_dir)?, target).await
    }

    /// A peer with `key`, connected to `target`.
    pub async fn start(key: Keypair, target: &str) -> Result<Hostile> {
        let dir = tempfile::tempdir().context("cannot create the hostile peer's data dir")?;
        let addr: Multiaddr = target.parse().with_context(|| format!("bad address {target}"))?;
        let peer = peer_of(target)?;
        let mut config = crate::test_config(dir.path().to_path_buf());
        config.bootstrap = vec![addr.clone()];
        let mesh = cloudless_mesh::node::start_with_identity(config, key, Arc::new(OpenGate))
            .await
            .context("cannot start the hostile peer")?;
        let hostile = Hostile { mesh, _dir: dir };
        hostile.connect(peer, addr).await?;
        Ok(hostile)
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.mesh.handle.peer_id()
    }

    /// The mesh node (to read its membership, say).
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Dials `addr` until a connection to `peer` is up.
    pub async fn connect(&self, peer: PeerId, addr: Multiaddr) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.mesh.handle.connected_peers().await?.contains(&peer) {
                return Ok(());
            }
            if start.elapsed() > CONNECT_TIMEOUT {
                bail!("the hostile peer could not connect to {peer} within {CONNECT_TIMEOUT:?}");
            }
            let _ = self.mesh.handle.dial(addr.clone()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a raft message to `peer`.
    pub async fn raft(&self, peer: PeerId, message: &Message) -> Result<Answer, RpcError> {
        self.mesh.handle.call_with_timeout::<RaftService>(peer, message, CALL_TIMEOUT).await
    }

    /// Sends an api request to `peer`, expecting call `C`'s answer.
    pub async fn api<C: Call>(
        &self,
        peer: PeerId,
        request: &Request,
    ) -> Result<cloudless_api::Answer<C>, RpcError> {
        self.mesh.handle.call_with_timeout::<Service<C>>(peer, request, CALL_TIMEOUT).await
    }

    /// Sends raw `body` to `service` on `peer`.
    pub async fn raw(
        &self,
        peer: PeerId,
        service: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        self.mesh.handle.request(peer, service, body, CALL_TIMEOUT).await
    }

    /// Serves the `api` service with `answer`, which sees each request and returns the raw
    /// answer bytes (`None`: refuse it). Returns the count of requests received, by kind
    /// ([`cloudless_api::Request::kind`]; "undecodable" for bytes that are none).
    pub async fn serve_api(
        &self,
        answer: impl Fn(&Request) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<Asked> {
        let mut requests = self.mesh.handle.serve(cloudless_api::SERVICE, 64).await?;
        let asked = Asked::default();
        let seen = asked.clone();
        tokio::spawn(async move {
            while let Some(req) = requests.recv().await {
                let decoded: Option<Request> = postcard::from_bytes(&req.body).ok();
                let kind = decoded.as_ref().map_or("undecodable", Request::kind);
                seen.add(kind);
                match decoded.and_then(|d| answer(&d)) {
                    Some(bytes) => req.respond_bytes(bytes),
                    None => req.fail(cloudless_mesh::rpc::RemoteError::new(
                        cloudless_mesh::rpc::RemoteErrorKind::Failed,
                        "no".to_string(),
                    )),
                }
            }
        });
        Ok(asked)
    }

    /// Stops the peer.
    pub async fn stop(self) {
        let _ = self.mesh.handle.shutdown().await;
        self.mesh.task.abort();
    }
}

/// What a hostile peer was asked, by request kind.
#[derive(Clone, Default)]
pub struct Asked(Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>>);

impl Asked {
    fn add(&self, kind: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// Requests received, by kind.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Requests received in all.
    pub fn total(&self) -> usize {
        self.counts().values().sum()
    }
}

/// The PeerId at the end of an address.
pub fn peer_of(addr: &str) -> Result<PeerId> {
    addr.rsplit("/p2p/")
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("{addr} does not end in /p2p/<peer id>"))
}

/// Whether `r` is the target's refusal of an unauthorized caller.
pub fn unauthorized<T>(r: &Result<T, RpcError>) -> bool {
    matches!(r, Err(RpcError::Remote { error, .. })
        if error.kind == cloudless_mesh::rpc::RemoteErrorKind::Unauthorized)
}

/// A pool of real `cloudless` processes for one attack: `voters` nodes with the voter role
/// (node 0 made the cluster) and `workers` worker-only devices.
pub struct Pool {
    /// The processes.
    pub procs: crate::procs::Procs,
    /// The process id of each node when the attack began (to tell that none restarted).
    pids: Vec<Option<u32>>,
    /// Where the data dirs and logs are.
    pub dir: tempfile::TempDir,
}

/// How long the pool may take to answer after an attack.
pub const SERVE_DEADLINE: Duration = Duration::from_secs(30);

impl Pool {
    /// Starts the pool and waits until every node is listed alive.
    pub fn start(voters: usize, workers: usize) -> Result<Pool> {
        Self::start_with(voters, workers, &[])
    }

    /// As [`Pool::start`], with `extra` flags for every node (`--relay always`, say).
    pub fn start_with(voters: usize, workers: usize, extra: &[&str]) -> Result<Pool> {
        let dir = tempfile::tempdir().context("cannot create the pool's dir")?;
        let mut procs = crate::procs::Procs::init(dir.path(), extra)?;
        for _ in 1..voters {
            procs.join()?;
        }
        for _ in 0..workers {
            let invite = procs.invite(&["--roles", "worker"])?;
            procs.join_with(&invite)?;
        }
        let want = voters.min(if voters >= 7 {
            5
        } else if voters >= 3 {
            3
        } else {
            1
        });
        crate::procs::until("the voters are in place", crate::procs::START_TIMEOUT, || {
            let s = procs.json(&["cluster", "status"]).ok()?;
            (s["voters"].as_array()?.len() == want && s["leader"].is_string()).then_some(())
        })?;
        let pids = procs.nodes.iter().map(crate::procs::Proc::pid).collect();
        Ok(Pool { procs, pids, dir })
    }

    /// Node `i`'s address (`/ip4/…/quic-v1/p2p/<id>`) and peer id.
    pub fn addr(&self, i: usize) -> Result<(Multiaddr, PeerId)> {
        let addr = &self.procs.nodes.get(i).context("no such node")?.addr;
        Ok((addr.parse().with_context(|| format!("bad address {addr}"))?, peer_of(addr)?))
    }

    /// The cluster status, as `cloudlessctl cluster status` prints it.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.procs.json(&["cluster", "status"])
    }

    /// The index of the raft leader.
    pub fn leader(&self) -> Result<usize> {
        let s = self.status()?;
        let peer = s["leader"].as_str().context("no leader")?;
        self.procs.index(peer).context("the leader is not one of the pool's nodes")
    }

    /// The cluster's root public key (what user requests are signed for).
    pub fn root_key(&self) -> Result<[u8; 32]> {
        let s = self.status()?;
        let hex = s["root_key"].as_str().context("no root key in the status")?;
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<_, _>>()
            .context("the root key is not hex")?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("the root key is not 32 bytes"))
    }

    /// The current raft term.
    pub fn term(&self) -> Result<u64> {
        self.status()?["term"].as_u64().context("no term in the status")
    }

    /// Marks node `i` as taken over by the attacker (it is killed and its key used): it is
    /// not expected to keep running.
    pub fn take_over(&mut self, i: usize) -> Result<Keypair> {
        self.procs.kill(i);
        self.pids[i] = None;
        key_of(&self.procs.nodes[i].data_dir)
    }

    /// Resident memory of node `i`, in MiB.
    pub fn rss_mib(&self, i: usize) -> Option<f64> {
        self.procs.rss_kib(i).map(|k| k as f64 / 1024.0)
    }

    /// The most resident memory node `i` has had, in MiB.
    pub fn peak_rss_mib(&self, i: usize) -> Option<f64> {
        self.procs.peak_rss_kib(i).map(|k| k as f64 / 1024.0)
    }

    /// Prints the line the closing report collects for one attack: the target's peak RSS and
    /// that the pool kept serving.
    pub fn report(&self, attack: &str, target: usize) {
        let peak = self.peak_rss_mib(target).unwrap_or(f64::NAN);
        eprintln!(
            "hostile {attack}: refused; target node {target} peak RSS {peak:.1} MiB; the pool kept serving"
        );
    }

    /// Checks that the pool still serves: every node that ran when the attack began runs with
    /// the same process (none crashed or restarted), and a raft write through the CLI
    /// succeeds and is read back.
    pub fn keeps_serving(&mut self) -> Result<()> {
        for (i, pid) in self.pids.iter().enumerate() {
            if let Some(pid) = pid
                && (self.procs.exited(i) || self.procs.nodes[i].pid() != Some(*pid))
            {
                bail!("node {i} stopped during the attack:\n{}", self.procs.tail(i, 30));
            }
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let hex: String =
            key.verifying_key().to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        crate::procs::until("a write succeeds after the attack", SERVE_DEADLINE, || {
            let out = self.procs.ctl(&["user", "add", &hex, "--role", "viewer", "--name", "probe"]);
            out.ok.then_some(())
        })?;
        crate::procs::until("the pool answers after the attack", SERVE_DEADLINE, || {
            self.status().ok().filter(|s| s["leader"].is_string()).map(|_| ())
        })
    }
}
