//! The services this node serves to other nodes and to cloudlessctl, split by audience: `api`
//! (users in [`user`], nodes in [`node`], its serve loop in [`serve`]) and `raft` ([`raft`]);
//! the read models are pure functions ([`read`]), uploads a pure reassembly table
//! ([`uploads`]). This file holds what they share: the handlers' state and the answers.
//!
//! ```text
//!   mesh "api" ──InboundRequest──▶ serve ──decode (bounded by the mesh)──▶ access table
//!        Request::Node(n) ── caller enrolled / a member? ──▶ node::* ──▶ Answer<C>
//!        Request::User(s) ── signature, clock ──▶ not a trusted member? relay to one
//!                                              └▶ role (access table) ──▶ user::* ──▶ Answer<C>
//!   mesh "raft" ──▶ raft::serve ── caller a member? ──▶ Consensus::handle
//! ```
//!
//! The loops call the same handlers directly when this node answers its own requests (a
//! trusted raft member asking for its assignments, say): a node never asks itself through
//! the network.

pub mod node;
pub mod raft;
pub mod read;
pub mod serve;
pub mod uploads;
pub mod user;

use std::sync::{Arc, Mutex};

use cloudless_api::{Answer, ApiError, Call, Request, Service};
use cloudless_consensus::{ReadError, WriteError};
use cloudless_mesh::rpc::InboundRequest;
use cloudless_types::NodeName;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::facts::Facts;
use crate::peers::Peers;
use uploads::Uploads;

/// The last nudge from the leader: the worker pulls its assignments when `count` moves, from
/// `by` first (it has applied the change; a follower may not have yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nudged {
    /// Who nudged.
    pub by: Option<NodeName>,
    /// Nudges so far.
    pub count: u64,
    /// The generation of this node's assignments the last nudge named.
    pub generation: u64,
}

/// The handlers, with the state only they write.
pub struct Api {
    facts: Arc<Facts>,
    peers: Peers,
    /// Written by the nudge handler only.
    nudged: watch::Sender<Nudged>,
    /// Written by the upload handler only.
    uploads: Mutex<Uploads>,
}

/// The mesh's view of the `api` service as a server: the one wire request.
pub(crate) struct Inbound;

impl cloudless_types::Rpc for Inbound {
    const SERVICE: &'static str = cloudless_api::SERVICE;
    type Request = Request;
    type Response = Answer<cloudless_api::node::Nudge>;
}

/// Runs `handle` on each request until `cancel`, at most `concurrency` at once (a request
/// waits in the mesh's bounded queue until a slot frees); then lets the ones in progress
/// finish. Both services (`api`, `raft`) are served this way.
async fn serve_bounded<F, Fut>(
    mut requests: mpsc::Receiver<InboundRequest>,
    cancel: CancellationToken,
    concurrency: usize,
    handle: F,
) where
    F: Fn(InboundRequest) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let req = tokio::select! {
            () = cancel.cancelled() => break,
            r = requests.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let work = handle(req);
        tasks.spawn(async move {
            let _permit = permit;
            work.await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Answers call `C`.
fn reply<C: Call>(inbound: InboundRequest, answer: Answer<C>) {
    inbound.respond::<Service<C>>(&answer);
}

/// Refuses a request of any call: an error answer is encoded alike for every call (the
/// result's error variant), so the caller decodes it whatever it asked.
fn refuse(inbound: InboundRequest, e: ApiError) {
    inbound.respond::<Inbound>(&Err(e));
}

/// What a failed write means to the caller.
pub fn write_error(e: WriteError) -> ApiError {
    match e {
        WriteError::Timeout(_) => ApiError::unavailable(e.to_string()),
        WriteError::Fatal(_) => ApiError::internal(e.to_string()),
    }
}

/// What a failed read means to the caller.
pub fn read_error(e: ReadError) -> ApiError {
    ApiError::unavailable(e.to_string())
}

impl Api {
    /// The handlers; the receiver sees every nudge.
    pub fn new(facts: Arc<Facts>, peers: Peers) -> (Api, watch::Receiver<Nudged>) {
        let (nudged, nudges) = watch::channel(Nudged::default());
        (Api { facts, peers, nudged, uploads: Mutex::new(Uploads::default()) }, nudges)
    }

    /// The facts the handlers read.
    pub fn facts(&self) -> &Arc<Facts> {
        &self.facts
    }

    /// The way to other nodes.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Points the caller at the raft members this node knows.
    fn redirect(&self) -> ApiError {
        ApiError::redirect(self.facts.members_to_ask())
    }
}
