//! What users ask through cloudlessctl: signed requests, each a typed call with its own reply.
//!
//! ```text
//!   cloudlessctl: SignedRequest::sign(user key, session, serial, clock, UserRequest)
//!        ──▶ any node: signature and clock ──▶ a raft member? role (access table) ──▶ handler
//!                                         └── no: forwarded verbatim to one (the signature
//!                                             travels with it)
//! ```
//!
//! A user is whoever holds the key that signed the request; the access table says which role
//! each request needs, and the state machine checks commands again when it applies them.

use std::collections::BTreeMap;

use cloudless_types::{ModuleHash, NodeName, ReplicaId, WorkloadName, WorkloadSpec};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::Call;
use crate::command::{Command, Reply, Role, UserKey};

/// How far a signed request's clock may be from the node's: enough for unsynchronised
/// laptops, short enough that a captured request is soon useless (and its (client, serial)
/// makes a replay within the window apply nothing new).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Most log lines in one answer: a 64 KiB ring holds about this many short lines.
pub const MAX_LINES: u32 = 2_000;

macro_rules! user_calls {
    ($( $(#[$m:meta])* $variant:ident($ty:ty) -> $reply:ty, )*) => {
        /// What a user asks, inside a [`SignedRequest`].
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum UserRequest {
            $( $(#[$m])* $variant($ty), )*
        }
        $(
            impl Call for $ty {
                type Reply = $reply;
            }
            impl From<$ty> for UserRequest {
                fn from(c: $ty) -> Self {
                    UserRequest::$variant(c)
                }
            }
        )*
    };
}

user_calls! {
    /// A change, applied by the state machine as the user.
    Command(Command) -> Reply,
    /// A chunk of a WASI module the user is about to name in a workload.
    Upload(Upload) -> Uploaded,
    /// The cluster at a glance.
    Status(Status) -> ClusterStatus,
    /// Every enrolled node with what the membership says about it.
    Nodes(Nodes) -> Vec<NodeInfo>,
    /// Every workload with its replicas.
    Workloads(Workloads) -> Vec<WorkloadInfo>,
    /// One workload.
    Workload(GetWorkload) -> WorkloadInfo,
    /// Log lines of one replica.
    Logs(Logs) -> Vec<Line>,
    /// Why each replica of a workload is where it is, or why it is not placed.
    Explain(Explain) -> Vec<String>,
    /// The caller's role.
    Whoami(Whoami) -> Role,
}

impl UserRequest {
    /// A short, fixed label of the request's kind (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            UserRequest::Command(_) => "user_command",
            UserRequest::Upload(_) => "upload",
            UserRequest::Status(_) => "status",
            UserRequest::Nodes(_) => "nodes",
            UserRequest::Workloads(_) => "workloads",
            UserRequest::Workload(_) => "workload",
            UserRequest::Logs(_) => "logs",
            UserRequest::Explain(_) => "explain",
            UserRequest::Whoami(_) => "whoami",
        }
    }
}

/// A chunk of a module upload. Chunks are sent in order; the module is stored once all
/// `total` bytes arrived and they hash to `hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The module's content hash.
    pub hash: ModuleHash,
    /// Its total size.
    pub total: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// The chunk (at most [`CHUNK`](crate::CHUNK) bytes).
    pub bytes: Vec<u8>,
}

/// How far an upload has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// Bytes received so far (all of them once the module is stored).
    pub received: u64,
}

/// [`UserRequest::Status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status;

/// [`UserRequest::Nodes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes;

/// [`UserRequest::Workloads`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workloads;

/// [`UserRequest::Workload`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetWorkload {
    /// The workload.
    pub name: WorkloadName,
}

/// Log lines of one replica (a user's read, and a raft member's relay of it to the host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    /// The replica.
    pub replica: ReplicaId,
    /// Only lines captured after this instant (nanoseconds since the epoch); 0 for the last
    /// `tail` lines.
    pub after_ns: u64,
    /// At most this many lines (the newest), up to [`MAX_LINES`].
    pub tail: u32,
}

/// [`UserRequest::Explain`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explain {
    /// The workload.
    pub name: WorkloadName,
}

/// [`UserRequest::Whoami`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami;

/// A request signed by a user key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The user's public key.
    pub key: UserKey,
    /// The cluster it is meant for: the cluster's root public key. A person keeps one key
    /// across clusters, so without this a request captured in one could be replayed in
    /// another; a raft member refuses requests meant for another cluster.
    pub cluster: UserKey,
    /// The client's session (random per CLI process) and request number: a retry reuses
    /// both, so a command is applied once.
    pub client: u64,
    /// See `client`.
    pub serial: u64,
    /// The signer's clock, milliseconds since the epoch.
    pub time_ms: u64,
    /// What to do.
    pub request: UserRequest,
    /// Signature over everything above.
    pub signature: Vec<u8>,
}

/// Why a signed request was refused before reaching the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature does not match.
    #[error("the request's signature does not match its key and contents")]
    Bad,
    /// The request was signed for another cluster.
    #[error(
        "the request was signed for another cluster (root key {0}…); check the cluster key in ctl.toml"
    )]
    OtherCluster(String),
    /// The signer's clock is too far from ours.
    #[error(
        "the request was signed {0} s away from this node's clock (at most {max} s); check the clock",
        max = CLOCK_SKEW_MS / 1000
    )]
    Skew(u64),
}

fn signed_bytes(
    key: &UserKey,
    cluster: &UserKey,
    client: u64,
    serial: u64,
    time_ms: u64,
    request: &UserRequest,
) -> Vec<u8> {
    postcard::to_allocvec(&(b"cloudless-api-4", key, cluster, client, serial, time_ms, request))
        .unwrap_or_default()
}

impl SignedRequest {
    /// Signs `request` with `user`, for the cluster whose root public key is `cluster`.
    pub fn sign(
        user: &SigningKey,
        cluster: UserKey,
        client: u64,
        serial: u64,
        time_ms: u64,
        request: UserRequest,
    ) -> Self {
        let key = user.verifying_key().to_bytes();
        let bytes = signed_bytes(&key, &cluster, client, serial, time_ms, &request);
        let signature = user.sign(&bytes).to_bytes().to_vec();
        SignedRequest { key, cluster, client, serial, time_ms, request, signature }
    }

    /// Checks that the request is meant for the cluster with root public key `root`.
    pub fn check_cluster(&self, root: &UserKey) -> Result<(), SignatureError> {
        if self.cluster == *root {
            Ok(())
        } else {
            Err(SignatureError::OtherCluster(cloudless_types::hex(&self.cluster[..8])))
        }
    }

    /// Checks the signature and the clock against `now_ms` (not the cluster: see
    /// [`check_cluster`](Self::check_cluster)).
    pub fn verify(&self, now_ms: u64) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| SignatureError::Bad)?;
        let sig = Signature::from_slice(&self.signature).map_err(|_| SignatureError::Bad)?;
        let bytes = signed_bytes(
            &self.key,
            &self.cluster,
            self.client,
            self.serial,
            self.time_ms,
            &self.request,
        );
        key.verify(&bytes, &sig).map_err(|_| SignatureError::Bad)?;
        let skew = now_ms.abs_diff(self.time_ms);
        if skew > CLOCK_SKEW_MS {
            return Err(SignatureError::Skew(skew / 1000));
        }
        Ok(())
    }
}

/// The cluster at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The cluster root public key, hex.
    pub root_key: String,
    /// The raft leader.
    pub leader: Option<NodeName>,
    /// The raft voters.
    pub voters: Vec<NodeName>,
    /// The raft term.
    pub term: u64,
    /// The last applied raft log index.
    pub applied: u64,
    /// Enrolled nodes (revoked ones excluded).
    pub nodes: u32,
    /// Nodes the answering node sees alive.
    pub alive: u32,
    /// Workloads.
    pub workloads: u32,
    /// Replicas desired, over all workloads.
    pub replicas: u32,
    /// Replicas reported running.
    pub running: u32,
    /// Addresses other devices can join through (voters first, with `/p2p/<id>`).
    pub bootstrap: Vec<String>,
}

/// An enrolled node as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// PeerId.
    pub peer: NodeName,
    /// Liveness as the answering node's membership sees it: alive, suspect, dead, left or
    /// unknown.
    pub state: String,
    /// Whether it votes in raft.
    pub voter: bool,
    /// Roles granted (worker, voter).
    pub roles: Vec<String>,
    /// Schedulable, cordoned or draining.
    pub schedulable: String,
    /// Revoked.
    pub revoked: bool,
    /// Labels (granted and advertised).
    pub labels: BTreeMap<String, String>,
    /// Failure zone.
    pub zone: Option<String>,
    /// Device class.
    pub class: Option<String>,
    /// Runtimes it offers.
    pub runtimes: Vec<String>,
    /// CPU it offers, millicores.
    pub cpu_millis: u32,
    /// Memory it offers, MiB.
    pub memory_mib: u64,
    /// CPU requested by the replicas assigned to it.
    pub cpu_used_millis: u32,
    /// Memory requested by the replicas assigned to it.
    pub memory_used_mib: u64,
    /// Replicas assigned to it.
    pub replicas: u32,
    /// Replicas it runs at once at most (its offer), if it said.
    pub max_replicas: Option<u32>,
    /// Addresses it listens on.
    pub addresses: Vec<String>,
}

/// One replica of a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Its ordinal.
    pub index: u32,
    /// Where it is assigned.
    pub node: Option<NodeName>,
    /// While it moves: the node that keeps running it until its replacement on `node` runs.
    pub from: Option<NodeName>,
    /// pending, running, succeeded, failed, restarting, or unassigned.
    pub phase: String,
    /// Whether it passes its readiness probe (running replicas without one are ready).
    pub ready: bool,
    /// Why it failed or restarts.
    pub reason: Option<String>,
    /// Restarts so far.
    pub restarts: u32,
}

/// A workload as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Its spec as stored.
    pub spec: WorkloadSpec,
    /// Increases with every change of the spec.
    pub version: u64,
    /// Replicas reported running.
    pub running: u32,
    /// Each replica: the assigned ones by ordinal, then one row per replica not placed yet.
    pub replicas: Vec<ReplicaInfo>,
    /// Why replicas are not placed (or a drain is held back), when they are not.
    pub unschedulable: Option<String>,
}

/// One log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// When it was captured, nanoseconds since the epoch.
    pub at_ns: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_contents_and_time() {
        let user = SigningKey::from_bytes(&[3; 32]);
        let web = WorkloadName::new("web").unwrap();
        let cmd = UserRequest::Command(Command::DeleteWorkload { name: web });
        let s = SignedRequest::sign(&user, [8; 32], 9, 1, 1_000_000, cmd);
        s.check_cluster(&[8; 32]).unwrap();
        assert!(matches!(s.check_cluster(&[9; 32]), Err(SignatureError::OtherCluster(_))));
        let mut moved = s.clone();
        moved.cluster = [9; 32];
        assert_eq!(moved.verify(1_000_000), Err(SignatureError::Bad), "the cluster is signed");
        s.verify(1_000_000).unwrap();
        s.verify(1_000_000 + CLOCK_SKEW_MS).unwrap();
        assert_eq!(s.verify(1_000_000 + CLOCK_SKEW_MS + 1_000), Err(SignatureError::Skew(301)));
        let mut changed = s.clone();
        let db = WorkloadName::new("db").unwrap();
        changed.request = UserRequest::Command(Command::DeleteWorkload { name: db });
        assert_eq!(changed.verify(1_000_000), Err(SignatureError::Bad));
        let mut other = s.clone();
        other.key = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert_eq!(other.verify(1_000_000), Err(SignatureError::Bad));
        let mut replay = s.clone();
        replay.serial = 2;
        assert_eq!(replay.verify(1_000_000), Err(SignatureError::Bad));
    }

    #[test]
    fn a_chunk_fits_an_rpc() {
        const { assert!(crate::CHUNK < 4 * 1024 * 1024) };
    }
}
