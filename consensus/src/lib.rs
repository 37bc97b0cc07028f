//! Cloudless consensus: the raft group, elected among stable peers, that holds the cluster's
//! metadata.
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod memnet;
pub mod network;
pub mod node;
pub mod state;
pub mod store;
pub mod voters;

pub use network::{Answer, Message, Transport, TransportError};
pub use node::{Candidates, Config, Consensus, ConsensusError, Consistency, ReadError, WriteError};

/// A raft member's id: derived from its PeerId by the node (see [`node_id`]).
pub type NodeId = u64;

/// What raft knows about a member: how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The member's PeerId, as text.
    pub peer: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.peer)
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
pub fn node_id(peer: &str) -> NodeId {
    use sha2::Digest;
    let d = sha2::Sha256::digest(peer.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}
