//! What nodes ask each other: enrollment, status reports, their own assignments, who is
//! enrolled, module chunks, a replica's logs for a member relaying a user's read, and the
//! leader's nudges. The caller is the mesh connection's authenticated PeerId, never a field
//! of the request (except the peer an enrollment is for, which a relay names).
//!
//! ```text
//!   new device ── Enroll ──▶ any node ──(a member? propose : relay to a member)
//!   worker ── Report, Assigned, Enrolled ──▶ a raft member (others redirect)
//!   worker ── Module ──▶ any peer that stores it
//!   member ── Logs ──▶ the replica's host        leader ── Nudge ──▶ a node it changed
//! ```

use cloudless_types::{ModuleHash, NodeName, ReplicaId, WorkloadSpec};
use serde::{Deserialize, Serialize};

use crate::Call;
use crate::command::{ReplicaStatus, Reply, Token};
use crate::user::Logs;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// A device enrolls itself (or an enrolled node relays the enrollment of one that cannot
    /// reach a raft member yet).
    Enroll(Enroll),
    /// Status changes of replicas the caller runs.
    Report(Report),
    /// The replicas assigned to the caller, with their workloads' specs.
    Assigned(Assigned),
    /// Who is enrolled, who is revoked, who votes (the gate of nodes outside raft).
    Enrolled(Enrolled),
    /// A chunk of a stored module.
    Module(ModuleChunk),
    /// Log lines of a replica this node runs, for a raft member relaying a user's read.
    Logs(Logs),
    /// From the raft leader: the caller's assignments changed, pull them now.
    Nudge(Nudge),
}

impl NodeRequest {
    /// A short, fixed label of the request's kind (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeRequest::Enroll(_) => "enroll",
            NodeRequest::Report(_) => "report",
            NodeRequest::Assigned(_) => "assigned",
            NodeRequest::Enrolled(_) => "enrolled",
            NodeRequest::Module(_) => "module",
            NodeRequest::Logs(_) => "host_logs",
            NodeRequest::Nudge(_) => "nudge",
        }
    }
}

macro_rules! node_calls {
    ($( $variant:ident($ty:ty) -> $reply:ty, )*) => {
        $(
            impl Call for $ty {
                type Reply = $reply;
            }
            impl From<$ty> for NodeRequest {
                fn from(c: $ty) -> Self {
                    NodeRequest::$variant(c)
                }
            }
        )*
    };
}

node_calls! {
    Enroll(Enroll) -> Reply,
    Report(Report) -> Reply,
    Assigned(Assigned) -> AssignedList,
    Enrolled(Enrolled) -> EnrolledList,
    Module(ModuleChunk) -> Chunk,
    Nudge(Nudge) -> (),
}

impl From<Logs> for NodeRequest {
    fn from(c: Logs) -> Self {
        NodeRequest::Logs(c)
    }
}

/// [`NodeRequest::Enroll`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enroll {
    /// The invite's token.
    pub token: Token,
    /// The root key's signature over it.
    pub signature: Vec<u8>,
    /// The invite's claim key's signature for `peer` ([`crate::Token::claim_bytes`]).
    pub proof: Vec<u8>,
    /// The device enrolling: the caller itself, unless an enrolled node relays.
    pub peer: NodeName,
}

/// [`NodeRequest::Report`]: at most `consensus::state::MAX_BATCH` entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report(pub Vec<(ReplicaId, ReplicaStatus)>);

/// [`NodeRequest::Assigned`]: the caller's assignments, unless it holds them already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// The generation of the list the caller holds (none: send it whatever it is).
    pub known: Option<u64>,
}

/// The answer to [`Assigned`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedList {
    /// The generation of the caller's list in the answering member's state: the applied
    /// count at which it last changed. It only grows.
    pub generation: u64,
    /// The list, or none when the caller's `known` is this generation or newer ("not
    /// modified": the member is no newer than the caller).
    pub assignments: Option<Vec<Assignment>>,
}

/// Replicas of one workload that a node should run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The workload's spec.
    pub spec: WorkloadSpec,
    /// The ordinals this node runs (including replicas it keeps running while they move
    /// away, until their replacement runs).
    pub indexes: Vec<u32>,
    /// Those of `indexes` that are moving away: this node runs them until their replacement
    /// runs elsewhere, and reports nothing about them (the new host does).
    pub leaving: Vec<u32>,
}

/// [`NodeRequest::Enrolled`]: who is enrolled, as the changes since what the caller holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The generation of the lists the caller holds (none: send them whole).
    pub known: Option<u64>,
}

/// Who is enrolled, as committed state says: whole, or the changes after the caller's
/// `known` generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledList {
    /// The generation of these lists: the applied count of the last enrollment or
    /// revocation in the answering member's state.
    pub generation: u64,
    /// Whether `nodes` and `revoked` are whole (else they are the nodes enrolled or revoked
    /// after the caller's `known`, to merge into what it holds).
    pub whole: bool,
    /// Enrolled, not revoked.
    pub nodes: Vec<NodeName>,
    /// Revoked.
    pub revoked: Vec<NodeName>,
    /// The raft voters now (where to ask next time).
    pub voters: Vec<NodeName>,
    /// The raft learners now (members too: they relay users' log reads).
    pub learners: Vec<NodeName>,
}

impl EnrolledList {
    /// Takes these lists into `enrolled` and `revoked`, the sets a node holds: replaces
    /// them when whole, else enrolls and revokes the nodes named.
    pub fn merge_into(
        &self,
        enrolled: &mut std::collections::BTreeSet<NodeName>,
        revoked: &mut std::collections::BTreeSet<NodeName>,
    ) {
        if self.whole {
            enrolled.clear();
            revoked.clear();
        }
        for n in &self.nodes {
            revoked.remove(n);
            enrolled.insert(n.clone());
        }
        for n in &self.revoked {
            enrolled.remove(n);
            revoked.insert(n.clone());
        }
    }
}

/// [`NodeRequest::Module`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleChunk {
    /// The module.
    pub hash: ModuleHash,
    /// Where the chunk starts.
    pub offset: u64,
}

/// A module chunk and the module's total size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Total size.
    pub total: u64,
    /// The bytes from the requested offset (at most `CHUNK`).
    pub bytes: Vec<u8>,
}

/// [`NodeRequest::Nudge`]: the leader's word that the caller's assignments changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nudge {
    /// The generation of the receiver's assignments in the leader's state: a node that holds
    /// this one (or newer) need not ask.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn name(k: u8) -> NodeName {
        NodeName::from_ed25519([k; 32])
    }

    fn set(ks: &[u8]) -> BTreeSet<NodeName> {
        ks.iter().map(|k| name(*k)).collect()
    }

    fn list(whole: bool, nodes: &[u8], revoked: &[u8]) -> EnrolledList {
        EnrolledList {
            generation: 1,
            whole,
            nodes: nodes.iter().map(|k| name(*k)).collect(),
            revoked: revoked.iter().map(|k| name(*k)).collect(),
            ..EnrolledList::default()
        }
    }

    #[test]
    fn enrolled_lists_replace_when_whole_and_merge_as_changes() {
        let (mut enrolled, mut revoked) = (set(&[1, 2, 3]), set(&[9]));
        // Changes: 4 enrolled, 2 revoked, 9 enrolled again.
        list(false, &[4, 9], &[2]).merge_into(&mut enrolled, &mut revoked);
        assert_eq!(enrolled, set(&[1, 3, 4, 9]));
        assert_eq!(revoked, set(&[2]));
        // No changes: nothing moves.
        list(false, &[], &[]).merge_into(&mut enrolled, &mut revoked);
        assert_eq!((enrolled.len(), revoked.len()), (4, 1));
        // Whole: what was held is gone, whatever it was.
        list(true, &[5], &[6]).merge_into(&mut enrolled, &mut revoked);
        assert_eq!(enrolled, set(&[5]));
        assert_eq!(revoked, set(&[6]));
        // Whole and empty: an empty pool.
        list(true, &[], &[]).merge_into(&mut enrolled, &mut revoked);
        assert!(enrolled.is_empty() && revoked.is_empty());
    }
}
