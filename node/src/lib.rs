//! The Cloudless node: the composition root that wires the mesh, consensus, scheduler and
//! runtime together. So far it provides the raft group's transport over the mesh
//! ([`raft_rpc`]); the `cloudless` binary (src/main.rs) runs mesh nodes.
pub mod raft_rpc;
