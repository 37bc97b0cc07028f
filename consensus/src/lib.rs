//! Cloudless consensus: the raft group, elected among stable peers, that holds workload
//! metadata.
//!
//! It will own the openraft storage (redb), the state machine and the transport trait that the
//! node implements over the mesh's RPC (see issue "Consensus"). Nothing is implemented yet; the
//! crate exists so the workspace has its final shape.
