//! A complete cluster in one process on loopback: what `cloudless dev` runs, and what the
//! node's tests build on.
//!
//! ```text
//!   node 0: Daemon::start + init (root key, admin key) ──▶ listen address
//!   node i: Daemon::start(bootstrap = node 0) ──▶ Enroll with a fresh single-use invite
//!   apply(spec, module) ──▶ module stored on the node it is sent through ──▶ signed PutWorkload
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use cloudless_api::invite::{Grant, Invite};
use cloudless_api::{Command, NodeRole, Reply, Settings, SignedRequest, UserRequest};
use cloudless_mesh::RelayMode;
use cloudless_types::{Image, ModuleHash, Resources, WorkloadSpec, now_ms};
use ed25519_dalek::SigningKey;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use crate::config::DaemonConfig;
use crate::daemon::Daemon;

/// How long a local cluster may take to form before giving up.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a local cluster could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A node did not start.
    #[error("node {index}: {source}")]
    Start {
        /// Which node.
        index: usize,
        /// Why.
        source: crate::daemon::DaemonError,
    },
    /// The cluster did not reach the expected shape in time.
    #[error("{0}")]
    Timeout(String),
    /// The cluster refused a request.
    #[error("{0}")]
    Refused(#[from] cloudless_api::ApiError),
}

/// Several nodes of one new cluster, with its root key and an admin key.
pub struct LocalCluster {
    /// The nodes, node 0 first.
    pub nodes: Vec<Daemon>,
    /// The cluster root key (signs invites).
    pub root: SigningKey,
    /// The admin user's key.
    pub admin: SigningKey,
    client: u64,
    serial: u64,
}

async fn wait<F: AsyncFnMut() -> bool>(what: &str, mut f: F) -> Result<(), LocalError> {
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > FORM_TIMEOUT {
            return Err(LocalError::Timeout(format!("{what} took longer than {FORM_TIMEOUT:?}")));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// Settings of one loopback node under `dir`.
pub fn loopback_config(dir: &Path, bootstrap: Vec<Multiaddr>, zone: &str) -> DaemonConfig {
    let mut mesh = cloudless_mesh::Config {
        data_dir: dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("a valid address")],
        bootstrap,
        mdns: false,
        relay: RelayMode::Never,
        ..cloudless_mesh::Config::default()
    };
    mesh.descriptor.zone = Some(zone.to_string());
    mesh.descriptor.device_class = Some(cloudless_types::DeviceClass::Desktop);
    DaemonConfig {
        mesh,
        consensus: cloudless_consensus::Config::default(),
        offer: Resources { cpu_millis: 2000, memory_mib: 1024, disk_mib: 0, gpus: 0 },
        allow_network: false,
        containers: None,
    }
}

impl LocalCluster {
    /// Starts `n` nodes under `dir` (one subdirectory each), creates the cluster on the first
    /// and enrolls the others with invites; returns once they all vote (up to five) and work.
    /// `tune` adjusts each node's settings (it is given the node's index).
    pub async fn start(
        n: usize,
        dir: &Path,
        root: SigningKey,
        admin: SigningKey,
        tune: impl Fn(usize, &mut DaemonConfig),
    ) -> Result<LocalCluster, LocalError> {
        let mut nodes: Vec<Daemon> = Vec::new();
        let mut boot: Vec<Multiaddr> = Vec::new();
        for index in 0..n.max(1) {
            let mut config = loopback_config(
                &dir.join(format!("node-{index}")),
                boot.clone(),
                &format!("zone-{}", index % 2),
            );
            tune(index, &mut config);
            let node = Daemon::start(config)
                .await
                .map_err(|source| LocalError::Start { index, source })?;
            if index == 0 {
                let settings = Settings {
                    name: "local".into(),
                    root_key: root.verifying_key().to_bytes(),
                    voter_target: None,
                    phones_may_vote: false,
                };
                node.init(settings, admin.verifying_key().to_bytes()).await?;
                let mut addrs = Vec::new();
                wait("listening", async || {
                    addrs = node.mesh().listen_addrs().await.unwrap_or_default();
                    !addrs.is_empty()
                })
                .await?;
                boot = addrs.into_iter().map(|a| a.with(Protocol::P2p(node.peer_id()))).collect();
            } else {
                let grant = Grant {
                    roles: [NodeRole::Worker, NodeRole::Voter].into(),
                    labels: Default::default(),
                    max_uses: 1,
                    expires_ms: now_ms() + 600_000,
                };
                let nonce = (index as u128 ^ u128::from(now_ms())).to_le_bytes();
                let invite = Invite::create(&root, "local", vec![], grant, nonce);
                wait("enrollment", async || node.enroll(&invite).await.is_ok()).await?;
            }
            nodes.push(node);
        }
        let voters = match n {
            0..=2 => 1,
            3..=6 => 3,
            _ => 5,
        };
        let first = nodes[0].clone();
        wait("the voters", async || first.consensus().voters().len() == voters).await?;
        Ok(LocalCluster { nodes, root, admin, client: now_ms(), serial: 0 })
    }

    /// Sends a command as the admin, through node `via`.
    pub async fn command(&mut self, via: usize, command: Command) -> Result<Reply, LocalError> {
        self.serial += 1;
        let signed = SignedRequest::sign(
            &self.admin,
            self.root.verifying_key().to_bytes(),
            self.client,
            self.serial,
            now_ms(),
            UserRequest::Command(command),
        );
        Ok(self.nodes[via].user_command(signed).await?)
    }

    /// Publishes a WASI workload through node `via`: stores `module` there and applies `spec`
    /// naming it (whatever image it named before).
    pub async fn apply_wasi(
        &mut self,
        via: usize,
        mut spec: WorkloadSpec,
        module: &[u8],
    ) -> Result<Reply, LocalError> {
        let hash: ModuleHash = self.nodes[via]
            .wasi()
            .store_module(module)
            .map_err(|e| LocalError::Refused(cloudless_api::ApiError::internal(e.to_string())))?;
        spec.image = Image::Wasi(hash);
        self.command(via, Command::PutWorkload(Box::new(spec))).await
    }

    /// Stops every node.
    pub async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}
