//! The `api` service's serve loop: decode (bounded by the mesh), look the request up in the
//! access table, check the caller, hand it to the handler of its audience (`node`, `user`).
//!
//! ```text
//!   mesh "api" ──InboundRequest──▶ serve (≤ CONCURRENT at once) ──▶ handle
//!        Request::Node ── caller enrolled / a member (the table) ──▶ node::*
//!        Request::User ── (signature, role: user::*) ──────────────▶ user::*
//!        Request::Cluster ── anyone ──▶ the cluster's name and root public key
//! ```

use std::sync::Arc;

use cloudless_api::{ApiError, Request};
use cloudless_mesh::identity;
use cloudless_mesh::rpc::{InboundRequest, RemoteError, RemoteErrorKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Api, Inbound, refuse};
use crate::access::{Access, Caller, Incoming, Refusal, access, check};

/// Api requests handled at once; more wait for a slot (the mesh queue in front is bounded).
const CONCURRENT: usize = 64;

impl Api {
    async fn handle(&self, inbound: InboundRequest) {
        let request = match inbound.decode::<Inbound>() {
            Ok(r) => r,
            Err(e) => {
                let message = e.message.clone();
                inbound.fail(RemoteError::new(RemoteErrorKind::BadRequest, message));
                return;
            }
        };
        self.facts.metrics.api_request(request.kind());
        let caller = identity::node_name(&inbound.peer);
        let need = access(Incoming::Api(&request));
        match request {
            Request::Node(n) => {
                let who = Caller {
                    name: Some(caller.clone()),
                    enrolled: self.facts.gate.is_enrolled(&inbound.peer),
                    member: self.facts.is_member(&caller),
                    role: None,
                };
                if let Err(r) = check(need.clone(), who) {
                    let message = match r {
                        Refusal::Unknown if need == Access::Member => {
                            format!("{caller} is not a raft member of this cluster")
                        }
                        _ => format!("{caller} is not an enrolled node of this cluster"),
                    };
                    refuse(inbound, ApiError::unauthorized(message));
                    return;
                }
                self.node_request(caller, n, inbound).await;
            }
            Request::User(signed) => {
                let forwarded =
                    inbound.peer != self.facts.me && self.facts.gate.is_enrolled(&inbound.peer);
                self.user_request(forwarded, need, signed, inbound).await;
            }
            Request::Cluster(c) => {
                super::reply::<cloudless_api::ClusterInfo>(inbound, self.cluster_id(c).await);
            }
        }
    }
}

/// Serves the `api` service until `cancel`; then lets the requests in progress finish.
pub async fn serve(
    api: Arc<Api>,
    requests: mpsc::Receiver<InboundRequest>,
    cancel: CancellationToken,
) {
    super::serve_bounded(requests, cancel, CONCURRENT, move |req| {
        let api = api.clone();
        async move { api.handle(req).await }
    })
    .await;
}
