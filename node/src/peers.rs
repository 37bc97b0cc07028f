//! Calls to other nodes' `api` service, typed per call, and the walk to a raft member that
//! can answer: only peers this node believes (the members it learned, then its bootstrap
//! peers), following the redirects they give.
//!
//! ```text
//!   call::<C>(peer, request) ──mesh::Handle::call::<api::Service<C>>──▶ peer ──▶ Answer<C>
//!   ask_member::<C>(request): members learned ▸ bootstrap peers (Facts::trusted_to_ask)
//!        each: Ok │ Err(kind) ──redirect──▶ the members it names first ──▶ next
//! ```
//!
//! A peer that merely connected (an mDNS neighbour, an inbound dial, a live peer of the
//! membership) is never asked: its answers (enrolled lists, assignments, "you are enrolled")
//! would be believed.
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
    /// The believed peer that answered last: asked first next time (it is usually the
    /// leader, which every kind of request reaches without a redirect).
    last: Arc<std::sync::Mutex<Option<NodeName>>>,
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
        Peers { facts, last: Arc::default() }
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

    /// Sends `request` (call `C`) to a raft member this node believes (the members it knows,
    /// then its bootstrap peers, which redirect or relay). Retries nothing that one of them
    /// answered, except redirects, which only they give.
    pub async fn ask_member<C: Call>(&self, request: &Request) -> Answer<C> {
        let me = &self.facts.name;
        let mut tried: BTreeSet<NodeName> = BTreeSet::new();
        let trusted = self.facts.trusted_to_ask();
        let last = self.last.lock().ok().and_then(|l| l.clone());
        let mut queue: VecDeque<NodeName> =
            last.filter(|l| trusted.contains(l)).into_iter().chain(trusted).collect();
        let mut last = ApiError::unavailable(
            "no raft member this node knows is reachable (neither the members it learned nor \
             its bootstrap peers answer)",
        );
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
                    // Only believed peers are asked, so the members a redirect names come from
                    // one of them. However long its list, a handful is all a group has.
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
                answer => {
                    if let Ok(mut l) = self.last.lock() {
                        *l = Some(peer);
                    }
                    return answer;
                }
            }
        }
        Err(last)
    }

    /// Node call `c` to a raft member.
    pub async fn node_to_member<C: Call + Into<NodeRequest>>(&self, c: C) -> Answer<C> {
        self.ask_member::<C>(&Request::Node(c.into())).await
    }
}
