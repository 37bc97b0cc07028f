//! The `raft` service: messages between raft members, served only to raft members (the
//! access table), handed to the local member.
//!
//! ```text
//!   mesh "raft" ──InboundRequest──▶ decode (bounded by the mesh) ──▶ caller a member? ──▶
//!        Consensus::handle ──▶ Answer            not a member: refused, nothing handled
//! ```

use std::sync::Arc;

use cloudless_consensus::RaftService;
use cloudless_mesh::identity;
use cloudless_mesh::rpc::{InboundRequest, RemoteError, RemoteErrorKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::access::{Caller, Incoming, access, check};
use crate::facts::Facts;

/// Raft requests queued for the local member before callers are told "busy".
pub const QUEUE: usize = 256;
/// Raft requests handled at once: appends from the leader, votes, forwarded writes.
const CONCURRENCY: usize = 64;
/// Any raft message, to look its access up before the real one is decoded.
const RAFT_ACCESS_PROBE: cloudless_consensus::Message = cloudless_consensus::Message::ReadIndex;

async fn handle(facts: &Facts, inbound: InboundRequest) {
    let caller = identity::node_name(&inbound.peer);
    let who = Caller {
        name: Some(caller.clone()),
        enrolled: facts.gate.is_enrolled(&inbound.peer),
        member: facts.is_member(&caller),
        role: None,
    };
    // Every raft message needs the same caller (the table says so, and a test holds it to
    // that), so a stranger's bytes are refused before they are decoded.
    if check(access(Incoming::Raft(&RAFT_ACCESS_PROBE)), who.clone()).is_err() {
        debug!(peer = %caller, "raft message from a peer that is not a raft member");
        inbound.fail(RemoteError::new(
            RemoteErrorKind::Unauthorized,
            format!("{caller} is not a raft member of this cluster"),
        ));
        return;
    }
    let message = match inbound.decode::<RaftService>() {
        Ok(m) => m,
        Err(e) => {
            debug!(peer = %inbound.peer, error = %e, "malformed raft message");
            inbound.fail(e);
            return;
        }
    };
    if check(access(Incoming::Raft(&message)), who).is_err() {
        debug!(peer = %caller, "raft message from a peer that is not a raft member");
        inbound.fail(RemoteError::new(
            RemoteErrorKind::Unauthorized,
            format!("{caller} is not a raft member of this cluster"),
        ));
        return;
    }
    match facts.consensus.handle(&caller, message).await {
        Ok(answer) => inbound.respond::<RaftService>(&answer),
        Err(e) => {
            debug!(peer = %caller, error = %e, "raft message refused");
            inbound.fail(RemoteError::new(RemoteErrorKind::Unauthorized, e.to_string()));
        }
    }
}

/// Serves raft messages until `cancel`; then lets the ones in progress finish.
pub async fn serve(
    facts: Arc<Facts>,
    requests: mpsc::Receiver<InboundRequest>,
    cancel: CancellationToken,
) {
    super::serve_bounded(requests, cancel, CONCURRENCY, move |req| {
        let facts = facts.clone();
        async move { handle(&facts, req).await }
    })
    .await;
}
