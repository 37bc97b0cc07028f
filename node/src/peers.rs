//! Calls to other nodes' `api` service, typed per call, and the walk to a raft member that
//! can answer: the voters learned, then the live peers of the view, then whoever this node is
//! connected to (a device that has just joined knows nobody else), following redirects.
//!
//! ```text
//!   call::<C>(peer, request) ──mesh::Handle::call::<api::Service<C>>──▶ peer ──▶ Answer<C>
//!   ask_member::<C>(request): voters ▸ live peers ▸ connected peers
//!        each: Ok │ Err(kind) ──redirect──▶ its members first ──▶ next
//! ```
//!
//! This node never asks itself through here: a node answers its own requests by calling the
//! handler (`api`), which the loops do when it trusts its own raft state.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use cloudless_api::{Answer, ApiError, Call, ErrorKind, NodeRequest, Request, Service};
use cloudless_mesh::rpc::{RemoteErrorKind, RpcError};
use cloudless_mesh::{Handle, identity};
use cloudless_types::NodeName;
use tracing::debug;

use crate::facts::Facts;

/// Most peers one `ask_member` tries before giving up: members first, so a healthy pool
/// answers at the first or second.
const MAX_ASKED: usize = 16;
/// Deadline of one api call to another node: a write through a leader election fits.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a whole walk to a raft member, however many peers it asks: a peer that does
/// not answer cannot hold a loop for MAX_ASKED × CALL_TIMEOUT.
pub const ASK_DEADLINE: Duration = Duration::from_secs(15);

/// The way to other nodes. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    facts: Arc<Facts>,
}

/// What a transport failure means to a caller of the api.
pub fn rpc_error(peer: &NodeName, e: RpcError) -> ApiError {
    match e {
        RpcError::Remote { error, .. } => {
            let kind = match error.kind {
                RemoteErrorKind::Unauthorized => ErrorKind::Unauthorized,
                RemoteErrorKind::Busy => ErrorKind::Busy,
                RemoteErrorKind::BadRequest => ErrorKind::Invalid,
                RemoteErrorKind::UnknownService => ErrorKind::Unavailable,
                RemoteErrorKind::Failed => ErrorKind::Internal,
            };
            ApiError::new(kind, format!("{peer}: {}", error.message))
        }
        RpcError::Busy => ApiError::busy(e.to_string()),
        RpcError::TooLarge { .. } => ApiError::invalid(e.to_string()),
        RpcError::Codec { .. } | RpcError::BadService(_) => {
            ApiError::internal(format!("{peer}: {e}"))
        }
        RpcError::Transport { .. } | RpcError::Timeout { .. } | RpcError::Closed => {
            ApiError::unavailable(e.to_string())
        }
    }
}

impl Peers {
    /// Calls through the node's mesh.
    pub fn new(facts: Arc<Facts>) -> Self {
        Peers { facts }
    }

    fn mesh(&self) -> &Handle {
        &self.facts.mesh
    }

    /// Sends `request` (which must be call `C`) to `peer`.
    pub async fn call<C: Call>(
        &self,
        peer: &NodeName,
        request: &Request,
        timeout: Duration,
    ) -> Answer<C> {
        let to = identity::peer_id(peer);
        match self.mesh().call_with_timeout::<Service<C>>(to, request, timeout).await {
            Ok(answer) => answer,
            Err(e) => Err(rpc_error(peer, e)),
        }
    }

    /// Sends node call `c` to `peer`.
    pub async fn node<C: Call + Into<NodeRequest>>(
        &self,
        peer: &NodeName,
        c: C,
        timeout: Duration,
    ) -> Answer<C> {
        self.call::<C>(peer, &Request::Node(c.into()), timeout).await
    }

    /// Sends `request` (call `C`) to a raft member: the members this node knows, else any
    /// live or connected peer (which redirects or relays). Retries nothing that a member
    /// answered, except redirects.
    pub async fn ask_member<C: Call>(&self, request: &Request) -> Answer<C> {
        let me = &self.facts.name;
        let mut tried: BTreeSet<NodeName> = BTreeSet::new();
        let mut queue: VecDeque<NodeName> = self.facts.members_to_ask().into();
        let view = self.facts.view();
        queue.extend(view.alive_except(me).cloned());
        // A device that has just joined knows nobody through the membership yet: its bootstrap
        // connections are the way in.
        let connected = self.mesh().connected_peers().await.unwrap_or_default();
        queue.extend(connected.iter().map(identity::node_name));
        let mut last = ApiError::unavailable("no raft member is reachable");
        let deadline = tokio::time::Instant::now() + ASK_DEADLINE;
        while let Some(peer) = queue.pop_front() {
            if peer == *me || !tried.insert(peer.clone()) {
                continue;
            }
            if tried.len() > MAX_ASKED {
                break;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                last = ApiError::unavailable(format!(
                    "no raft member answered within {ASK_DEADLINE:?}"
                ));
                break;
            }
            match self.call::<C>(&peer, request, left.min(CALL_TIMEOUT)).await {
                Err(e) if e.kind == ErrorKind::Redirect => {
                    // However long the list a peer sends, a handful of members is all a
                    // group has.
                    let bound = cloudless_api::error::MAX_REDIRECT;
                    for p in e.redirect.into_iter().take(bound).rev() {
                        queue.push_front(p);
                    }
                }
                // This peer cannot help now; another may.
                Err(e) if e.kind.is_transient() || e.kind == ErrorKind::Unauthorized => {
                    debug!(%peer, error = %e, "asking the next peer");
                    last = e;
                }
                answer => return answer,
            }
        }
        Err(last)
    }

    /// Node call `c` to a raft member.
    pub async fn node_to_member<C: Call + Into<NodeRequest>>(&self, c: C) -> Answer<C> {
        self.ask_member::<C>(&Request::Node(c.into())).await
    }
}
