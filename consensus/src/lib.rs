//! Cloudless consensus: the raft group, elected among stable peers, that holds the cluster's
//! metadata.
pub mod state;
