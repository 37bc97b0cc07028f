//! The Cloudless node: the composition root that wires the mesh, consensus, scheduler and
//! runtime together. So far it provides the raft group's transport over the mesh
//! ([`raft_rpc`]) and forced recovery of that group ([`recovery`]); the `cloudless` binary
//! (src/main.rs) runs mesh nodes.
pub mod daemon;
pub mod leader;
pub mod local;
pub mod raft_rpc;
pub mod recovery;
