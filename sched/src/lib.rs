//! The Cloudless scheduler: pure, explainable placement of replicas on nodes.
//!
//! It will own the filter → score → select pipeline the raft leader runs on the capacity the
//! mesh gossips (see issue "The scheduler"). It has no I/O and depends only on
//! `cloudless-types`. Nothing is implemented yet; the crate exists so the workspace has its
//! final shape.
