//! The protocol nodes and the CLI use to reach the raft group through any node (the node
//! serves it as the mesh RPC service `api`): commands from nodes (reports, enrollment) and
//! from users (signed), reads of committed state, and module transfer.
//!
//! ```text
//!   CLI: SignedRequest::sign(user key, Command | Read | Upload) ──▶ any node
//!          ──▶ a raft member? verify signature, clock, role ──▶ submit / read / store
//!          └── no: forwarded verbatim to a member (the signature travels with it)
//!   node: Node(Report | Enroll) ──▶ a member: proposed as Actor::Node(caller PeerId)
//!   node: Query(Assigned | Members | Enrolled), Module, Logs ──▶ enrolled callers only
//! ```
//!
//! The caller of `Node` requests is the mesh connection's authenticated PeerId, never a field
//! of the request; a user is whoever holds the key that signed the request, and the state
//! machine decides what that user may do.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::state::{Command, ReplicaKey, Response, Role, UserKey};
use cloudless_types::WorkloadSpec;

/// The mesh RPC service name.
pub const SERVICE: &str = "api";
/// How far a signed request's clock may be from the node's: enough for unsynchronised
/// laptops, short enough that a captured request is soon useless (and its (client, serial)
/// makes a replay within the window apply nothing new).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Largest module chunk per request: well under the mesh's 4 MiB RPC limit.
pub const CHUNK: usize = 1024 * 1024;
/// Largest module accepted.
pub const MAX_MODULE: u64 = 64 * 1024 * 1024;

/// What a user asks, inside a [`SignedRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserRequest {
    /// A change, applied by the state machine as the user.
    Command(Command),
    /// A read (viewer role or above).
    Read(Read),
    /// A chunk of a WASI module the user is about to name in a workload (deployer or above).
    /// Chunks are sent in order; the module is stored once all `total` bytes arrived and
    /// they hash to `hash`.
    Upload {
        /// The module's content hash (`runtime::wasi::module_hash`).
        hash: String,
        /// Its total size.
        total: u64,
        /// Where this chunk starts.
        offset: u64,
        /// The chunk (at most [`CHUNK`] bytes).
        bytes: Vec<u8>,
    },
}

/// The reads a user may make.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Read {
    /// The cluster at a glance.
    Status,
    /// Every enrolled node with what the membership says about it.
    Nodes,
    /// Every workload with its replicas.
    Workloads,
    /// One workload.
    Workload {
        /// Its name.
        name: String,
    },
    /// Log lines of one replica.
    Logs {
        /// The workload.
        workload: String,
        /// The replica's ordinal.
        index: u32,
        /// Only lines captured after this instant (nanoseconds since the epoch); 0 for the
        /// last `tail` lines.
        after_ns: u64,
        /// At most this many lines (the newest).
        tail: u32,
    },
    /// Why each replica of a workload is where it is, or why it is not placed.
    Explain {
        /// The workload.
        name: String,
    },
    /// The caller's role.
    Whoami,
}

/// A request signed by a user key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The user's public key.
    pub key: UserKey,
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
    /// The signer's clock is too far from ours.
    #[error(
        "the request was signed {0} s away from this node's clock (at most {max} s); check the clock",
        max = CLOCK_SKEW_MS / 1000
    )]
    Skew(u64),
}

fn signed_bytes(
    key: &UserKey,
    client: u64,
    serial: u64,
    time_ms: u64,
    request: &UserRequest,
) -> Vec<u8> {
    postcard::to_allocvec(&(b"cloudless-api-2", key, client, serial, time_ms, request))
        .unwrap_or_default()
}

impl SignedRequest {
    /// Signs `request` with `user`.
    pub fn sign(
        user: &SigningKey,
        client: u64,
        serial: u64,
        time_ms: u64,
        request: UserRequest,
    ) -> Self {
        let key = user.verifying_key().to_bytes();
        let signature =
            user.sign(&signed_bytes(&key, client, serial, time_ms, &request)).to_bytes().to_vec();
        SignedRequest { key, client, serial, time_ms, request, signature }
    }

    /// Checks the signature and the clock against `now_ms`.
    pub fn verify(&self, now_ms: u64) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| SignatureError::Bad)?;
        let sig = Signature::from_slice(&self.signature).map_err(|_| SignatureError::Bad)?;
        let bytes = signed_bytes(&self.key, self.client, self.serial, self.time_ms, &self.request);
        key.verify(&bytes, &sig).map_err(|_| SignatureError::Bad)?;
        let skew = now_ms.abs_diff(self.time_ms);
        if skew > CLOCK_SKEW_MS {
            return Err(SignatureError::Skew(skew / 1000));
        }
        Ok(())
    }
}

/// Reads of committed state, between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The replicas assigned to a node, with their workloads' specs.
    Assigned {
        /// The node (PeerId text).
        node: String,
    },
    /// The raft voters, as PeerId text (so callers can go to a member directly).
    Members,
    /// Who is enrolled and who is revoked (for the connection gate of non-members), and who
    /// votes.
    Enrolled,
}

/// A request to the `api` service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// A command from the calling node itself (an unenrolled peer may only send `Enroll`).
    Node(Command),
    /// A request from a user.
    User(SignedRequest),
    /// A read, from an enrolled node.
    Query(Query),
    /// A chunk of a stored module, for an enrolled node.
    Module {
        /// Its hash.
        hash: String,
        /// Where the chunk starts.
        offset: u64,
    },
    /// From the raft leader to a node whose assignments it just changed: pull them now
    /// (nodes also pull periodically, so a lost nudge only delays).
    Nudge,
    /// Log lines of a replica this node runs, for an enrolled node relaying a user's
    /// [`Read::Logs`].
    Logs {
        /// The workload.
        workload: String,
        /// The ordinal.
        index: u32,
        /// See [`Read::Logs`].
        after_ns: u64,
        /// See [`Read::Logs`].
        tail: u32,
    },
}

/// The cluster at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The cluster root public key, hex.
    pub root_key: String,
    /// The raft leader.
    pub leader: Option<String>,
    /// The raft voters.
    pub voters: Vec<String>,
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
    pub peer: String,
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
    /// Addresses it listens on.
    pub addresses: Vec<String>,
}

/// One replica of a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Its ordinal.
    pub index: u32,
    /// Where it is assigned.
    pub node: Option<String>,
    /// pending, running, succeeded, failed, restarting, or unassigned.
    pub phase: String,
    /// Why it failed.
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
    /// Each replica.
    pub replicas: Vec<ReplicaInfo>,
    /// Why replicas are not placed, when they are not.
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

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResponse {
    /// The state machine's response to a command.
    Applied(Response),
    /// For [`Query::Assigned`].
    Assigned(Vec<(ReplicaKey, WorkloadSpec)>),
    /// For [`Query::Members`].
    Members(Vec<String>),
    /// For [`Query::Enrolled`].
    Enrolled {
        /// Enrolled, not revoked.
        nodes: Vec<String>,
        /// Revoked.
        revoked: Vec<String>,
        /// The raft voters now (where to ask next time).
        voters: Vec<String>,
    },
    /// A module chunk and the module's total size.
    Module {
        /// Total size.
        total: u64,
        /// The bytes from the requested offset.
        bytes: Vec<u8>,
    },
    /// For [`UserRequest::Upload`]: how many bytes have arrived (all of them once stored).
    Uploaded {
        /// Bytes received so far.
        received: u64,
    },
    /// For [`Read::Status`].
    Status(ClusterStatus),
    /// For [`Read::Nodes`].
    Nodes(Vec<NodeInfo>),
    /// For [`Read::Workloads`] and [`Read::Workload`].
    Workloads(Vec<WorkloadInfo>),
    /// For [`Read::Logs`] and [`ApiRequest::Logs`].
    Logs(Vec<Line>),
    /// For [`Read::Explain`]: one line per replica or filter.
    Explain(Vec<String>),
    /// For [`Read::Whoami`].
    Role(Role),
    /// Done, nothing to report (for [`ApiRequest::Nudge`]).
    Done,
    /// This node cannot answer; these are raft members that can.
    Redirect(Vec<String>),
    /// Refused, with the reason.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_contents_and_time() {
        let user = SigningKey::from_bytes(&[3; 32]);
        let cmd = UserRequest::Command(Command::DeleteWorkload { name: "web".into() });
        let s = SignedRequest::sign(&user, 9, 1, 1_000_000, cmd);
        s.verify(1_000_000).unwrap();
        s.verify(1_000_000 + CLOCK_SKEW_MS).unwrap();
        assert_eq!(s.verify(1_000_000 + CLOCK_SKEW_MS + 1_000), Err(SignatureError::Skew(301)));
        let mut changed = s.clone();
        changed.request = UserRequest::Command(Command::DeleteWorkload { name: "db".into() });
        assert_eq!(changed.verify(1_000_000), Err(SignatureError::Bad));
        let mut other = s.clone();
        other.key = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert_eq!(other.verify(1_000_000), Err(SignatureError::Bad));
        let mut replay = s.clone();
        replay.serial = 2;
        assert_eq!(replay.verify(1_000_000), Err(SignatureError::Bad));
    }
}
