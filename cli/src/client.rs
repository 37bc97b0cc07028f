//! A connection to one node's `api` service, as a mesh client whose identity is the user's
//! ed25519 key, and one typed method per request on top of it.
//!
//! ```text
//!   Client::connect(peer multiaddr, user key) ──▶ mesh client (no membership, no listening)
//!   status() / nodes() / put_workload(spec) / … ──▶ call::<C>(C) ──▶ SignedRequest { key,
//!        session, serial, clock, C, signature } ──mesh::call::<api::Service<C>>──▶ node
//!        ──▶ Ok(C::Reply) │ Err(ApiError { kind, message })
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cloudless_api::user::{
    ClusterStatus, Explain, GetWorkload, Line, Logs, NodeInfo, Nodes, Status, Upload, Whoami,
    WorkloadInfo, Workloads,
};
use cloudless_api::{
    ApiError, CHUNK, Call, ClusterInfo, Command, ErrorKind, MAX_MODULE, Reply, Request, Role,
    Schedulable, Service, SignedRequest, UserKey, UserRequest,
};
use cloudless_mesh::rpc::{RemoteErrorKind, RpcError};
use cloudless_mesh::{Handle, Mesh, OpenGate, RelayMode, Role as MeshRole};
use cloudless_types::{ModuleHash, NodeName, ReplicaId, WorkloadName, WorkloadSpec, now_ms};
use ed25519_dalek::SigningKey;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// How long one request may take: a write through a forwarding node and a leader election
/// fit well inside it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The peer address is unusable.
    #[error("peer address {addr:?}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The mesh client did not start or the peer could not be reached.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The exchange with the peer failed, or the peer's mesh refused it, before the cluster
    /// answered.
    #[error("{peer}: {reason}")]
    Transport {
        /// What kind of failure it is.
        kind: ErrorKind,
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The cluster answered with a refusal or a failure.
    #[error("{0}")]
    Api(#[from] ApiError),
}

impl ClientError {
    /// The kind of failure (an unusable address is invalid input; an unreachable peer is
    /// unavailable).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Address { .. } => ErrorKind::Invalid,
            ClientError::Unreachable { .. } => ErrorKind::Unavailable,
            ClientError::Transport { kind, .. } => *kind,
            ClientError::Api(e) => e.kind,
        }
    }
}

/// What a failed exchange means: the mesh's refusals keep their kind, the rest is "the
/// peer is unavailable".
fn transport(peer: &PeerId, e: RpcError) -> ClientError {
    let kind = match &e {
        RpcError::Remote { error, .. } => match error.kind {
            RemoteErrorKind::Unauthorized => ErrorKind::Unauthorized,
            RemoteErrorKind::Busy => ErrorKind::Busy,
            RemoteErrorKind::BadRequest => ErrorKind::Invalid,
            RemoteErrorKind::UnknownService => ErrorKind::Unavailable,
            RemoteErrorKind::Failed => ErrorKind::Internal,
        },
        RpcError::TooLarge { .. } => ErrorKind::Invalid,
        RpcError::Codec { .. } | RpcError::BadService(_) => ErrorKind::Internal,
        RpcError::Busy => ErrorKind::Busy,
        RpcError::Transport { .. } | RpcError::Timeout { .. } | RpcError::Closed => {
            ErrorKind::Unavailable
        }
    };
    ClientError::Transport { kind, peer: peer.to_string(), reason: e.to_string() }
}

/// A connection to one node.
pub struct Client {
    mesh: Handle,
    task: tokio::task::JoinHandle<()>,
    peer: PeerId,
    key: SigningKey,
    /// The cluster's root public key: what requests are signed for.
    cluster: UserKey,
    session: u64,
    serial: Arc<AtomicU64>,
}

impl Client {
    /// Connects to `addr` (which must end in `/p2p/<peer id>`) as the holder of `key`, to the
    /// cluster with root public key `cluster` (`None`: whichever the peer says it belongs to;
    /// [`Client::cluster`] tells which, for the caller to keep).
    pub async fn connect(
        addr: &str,
        key: SigningKey,
        cluster: Option<UserKey>,
    ) -> Result<Client, ClientError> {
        let bad = |reason: String| ClientError::Address { addr: addr.to_string(), reason };
        let multiaddr: Multiaddr = addr.parse().map_err(|e| bad(format!("{e}")))?;
        let peer = multiaddr
            .iter()
            .find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            })
            .ok_or_else(|| bad("it must end in /p2p/<peer id>".into()))?;
        let unreachable =
            |reason: String| ClientError::Unreachable { peer: peer.to_string(), reason };
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes())
            .map_err(|e| unreachable(e.to_string()))?;
        let config = cloudless_mesh::Config {
            role: MeshRole::Client,
            listen: Vec::new(),
            bootstrap: vec![multiaddr],
            mdns: false,
            relay: RelayMode::Never,
            ..cloudless_mesh::Config::default()
        };
        let Mesh { handle, events, task } =
            cloudless_mesh::start_with_identity(config, keypair, Arc::new(OpenGate))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        drop(events);
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            if handle.connected_peers().await.is_ok_and(|p| p.contains(&peer)) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                task.abort();
                return Err(unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cluster = match cluster {
            Some(c) => c,
            None => {
                let request = Request::Cluster(ClusterInfo);
                let answer = handle
                    .call_with_timeout::<Service<ClusterInfo>>(peer, &request, REQUEST_TIMEOUT)
                    .await
                    .map_err(|e| transport(&peer, e));
                match answer {
                    Ok(Ok(id)) => id.root_key,
                    Ok(Err(e)) => {
                        task.abort();
                        return Err(e.into());
                    }
                    Err(e) => {
                        task.abort();
                        return Err(e);
                    }
                }
            }
        };
        Ok(Client {
            mesh: handle,
            task,
            peer,
            key,
            cluster,
            session: rand::random(),
            serial: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The root public key of the cluster this client signs for.
    pub fn cluster(&self) -> UserKey {
        self.cluster
    }

    /// The user's public key.
    pub fn public_key(&self) -> UserKey {
        self.key.verifying_key().to_bytes()
    }

    /// Signs and sends call `c`; its answer, typed.
    pub async fn call<C: Call + Into<UserRequest>>(&self, c: C) -> Result<C::Reply, ClientError> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let signed =
            SignedRequest::sign(&self.key, self.cluster, self.session, serial, now_ms(), c.into());
        let request = Request::User(signed);
        let answer = self
            .mesh
            .call_with_timeout::<Service<C>>(self.peer, &request, REQUEST_TIMEOUT)
            .await
            .map_err(|e| transport(&self.peer, e))?;
        Ok(answer?)
    }

    /// Applies `command` as this user.
    pub async fn command(&self, command: Command) -> Result<Reply, ClientError> {
        self.call(command).await
    }

    /// The cluster at a glance.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(Status).await
    }

    /// Every enrolled node.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        self.call(Nodes).await
    }

    /// Every workload.
    pub async fn workloads(&self) -> Result<Vec<WorkloadInfo>, ClientError> {
        self.call(Workloads).await
    }

    /// One workload.
    pub async fn workload(&self, name: &WorkloadName) -> Result<WorkloadInfo, ClientError> {
        self.call(GetWorkload { name: name.clone() }).await
    }

    /// Why each replica of a workload is where it is.
    pub async fn explain(&self, name: &WorkloadName) -> Result<Vec<String>, ClientError> {
        self.call(Explain { name: name.clone() }).await
    }

    /// A replica's log lines after `after_ns` (0: the last `tail`).
    pub async fn logs(
        &self,
        replica: ReplicaId,
        after_ns: u64,
        tail: u32,
    ) -> Result<Vec<Line>, ClientError> {
        self.call(Logs { replica, after_ns, tail }).await
    }

    /// This user's role.
    pub async fn whoami(&self) -> Result<Role, ClientError> {
        self.call(Whoami).await
    }

    /// Creates or updates a workload; its new version.
    pub async fn put_workload(&self, spec: WorkloadSpec) -> Result<u64, ClientError> {
        match self.command(Command::PutWorkload(Box::new(spec))).await? {
            Reply::Version(v) => Ok(v),
            Reply::Done => Ok(0),
        }
    }

    /// Deletes a workload.
    pub async fn delete_workload(&self, name: &WorkloadName) -> Result<(), ClientError> {
        self.command(Command::DeleteWorkload { name: name.clone() }).await.map(|_| ())
    }

    /// Changes a workload's replicas; its new version.
    pub async fn scale(&self, name: &WorkloadName, replicas: u32) -> Result<u64, ClientError> {
        match self.command(Command::Scale { name: name.clone(), replicas }).await? {
            Reply::Version(v) => Ok(v),
            Reply::Done => Ok(0),
        }
    }

    /// Cordons, drains or uncordons a node.
    pub async fn set_schedulable(
        &self,
        peer: &NodeName,
        schedulable: Schedulable,
    ) -> Result<(), ClientError> {
        self.command(Command::SetSchedulable { peer: peer.clone(), schedulable }).await.map(|_| ())
    }

    /// Cuts a node off.
    pub async fn revoke(&self, peer: &NodeName) -> Result<(), ClientError> {
        self.command(Command::Revoke { peer: peer.clone() }).await.map(|_| ())
    }

    /// Gives a key a role.
    pub async fn put_user(&self, key: UserKey, name: &str, role: Role) -> Result<(), ClientError> {
        self.command(Command::PutUser { key, name: name.to_string(), role }).await.map(|_| ())
    }

    /// Removes a user.
    pub async fn remove_user(&self, key: UserKey) -> Result<(), ClientError> {
        self.command(Command::RemoveUser { key }).await.map(|_| ())
    }

    /// Uploads a WASI module in chunks; returns its hash. A module the node has already is
    /// not sent again.
    pub async fn upload(&self, bytes: &[u8]) -> Result<ModuleHash, ClientError> {
        if bytes.is_empty() || bytes.len() as u64 > MAX_MODULE {
            return Err(ApiError::invalid(format!(
                "a module must be 1 byte to {MAX_MODULE} bytes, not {}",
                bytes.len()
            ))
            .into());
        }
        let hash = ModuleHash::of(bytes);
        let total = bytes.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + CHUNK).min(bytes.len());
            let chunk = Upload {
                hash: hash.clone(),
                total,
                offset: offset as u64,
                bytes: bytes[offset..end].to_vec(),
            };
            let got = self.call(chunk).await?;
            if got.received >= total {
                return Ok(hash);
            }
            if got.received as usize != end {
                return Err(ApiError::internal(format!(
                    "the node acknowledged {} bytes of {total}, not {end}",
                    got.received
                ))
                .into());
            }
            offset = end;
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.mesh.shutdown().await;
        self.task.abort();
    }
}
