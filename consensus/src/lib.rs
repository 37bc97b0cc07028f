//! Cloudless consensus: the raft group, elected among the pool's own stable peers, that holds
//! the cluster's metadata (settings, enrolled nodes, users, workloads, assignments, replica
//! status, used invite nonces). There is no coordinator tier: any node may be a member.
//!
//! ```text
//!   any node: Consensus::propose ──(not leader: Message::Forward)──▶ leader's batcher
//!   leader: batch of Requests ──openraft──▶ LogStore (redb, fsync) ──▶ replicate (Transport)
//!   committed ──▶ StateMachineStore ──▶ State::apply (pure) ──▶ Response to the proposer
//!   reads: Consensus::read(Linearizable: read index via the leader | Stale: local) ──▶ &State
//!   leader's controller: Candidates (node: mesh view + State) ──▶ voters::plan ──▶ membership
//! ```
//!
//! - [`state`]: the state machine, a plain struct with a deterministic `apply` of the api's
//!   `Command`s (`cloudless-api` defines them, so the CLI needs nothing of raft); commands are
//!   checked completely before the first change and retried requests are answered from a
//!   per-client session table, so a retry is applied once.
//! - [`store`]: openraft's storage-v2 traits (`RaftLogStorage`, `RaftStateMachine`) over one
//!   redb database per member, fsync on every commit; snapshots are the serialized state,
//!   built off the apply path. [`store::force_single_voter`] is forced recovery.
//! - [`network`]: the [`Transport`] trait the node implements over the mesh's RPC (and
//!   `memnet` in memory, with drops, delays and one-way partitions, for tests: behind the
//!   `test-utils` feature, so it is not compiled into the node).
//! - [`voters`]: who votes, as pure functions: [`voters::assess`] scores a peer and
//!   [`voters::plan`] moves the voter set towards the most stable eligible peers.
//! - [`node`]: [`Consensus`], one member: opening, bootstrap, group-committed writes with
//!   forwarding, reads, the voter controller, quiet start, forced recovery.
//!
//! **openraft is pinned to `=0.9.25`**: the newest 0.9 release, the stable line (0.10 is still
//! alpha and changes the storage and network traits), with the storage-v2 traits. Two of its
//! behaviours shape this crate. It has no pre-vote, so a restarted member would stand for
//! election with a higher term and unseat a healthy leader; [`node`] keeps a member from
//! standing until it has heard from a leader or [`Config::quiet_start`] has passed. And it uses
//! the longest election timeout as the leader lease, so failover takes lease + a randomized
//! timeout: the default timings (heartbeat 100 ms, election 300–600 ms) keep that near 1 s.
use std::io::Cursor;

use serde::{Deserialize, Serialize};

#[cfg(feature = "test-utils")]
pub mod memnet;
pub mod network;
pub mod node;
pub mod state;
pub mod store;
pub mod voters;

pub use network::{Answer, Message, RaftService, Transport, TransportError};
pub use node::{Candidates, Config, Consensus, ConsensusError, Consistency, ReadError, WriteError};

/// A raft member's id: derived from its PeerId by the node (see [`node_id`]).
pub type NodeId = u64;

/// What raft knows about a member: how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The member's PeerId.
    pub peer: cloudless_types::NodeName,
}

/// openraft needs a default member for ids it knows no address of: the peer of the all-zero
/// ed25519 key, which no one can hold, so nothing ever answers there.
impl Default for Member {
    fn default() -> Self {
        Member { peer: cloudless_types::NodeName::from_ed25519([0; 32]) }
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.peer.as_str())
    }
}

openraft::declare_raft_types!(
    /// The raft type configuration of Cloudless.
    pub TypeConfig:
        D = state::Batch,
        R = Vec<state::Response>,
        NodeId = NodeId,
        Node = Member,
);

/// The raft id of a peer: the first eight bytes of the SHA-256 of its PeerId text. Stable,
/// spread evenly, and collision-free in practice for any pool size (2^64).
pub fn node_id(peer: &cloudless_types::NodeName) -> NodeId {
    use sha2::Digest;
    let d = sha2::Sha256::digest(peer.as_str().as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}
