//! The raft group's transport over the mesh: consensus messages travel as the `raft` RPC
//! service (postcard bodies, the mesh's size limit and per-call deadline).
//!
//! ```text
//!   Consensus ──Transport::call──▶ MeshTransport ──Handle::request("raft")──▶ peer
//!   peer: Handle::serve("raft") ──▶ serve() ──▶ Consensus::handle ──▶ answer
//! ```

use std::sync::Arc;
use std::time::Duration;

use cloudless_consensus::{Answer, Consensus, Member, Message, Transport, TransportError};
use cloudless_mesh::Handle;
use cloudless_mesh::rpc::{RemoteError, RemoteErrorKind, RpcError};
use libp2p::PeerId;
use tokio::sync::Semaphore;
use tracing::debug;

/// The RPC service name of raft messages.
pub const SERVICE: &str = "raft";
/// Raft requests queued for the local member before callers are told "busy".
const QUEUE: usize = 256;
/// Raft requests handled at once: appends from the leader, votes, forwarded writes.
const CONCURRENCY: usize = 64;

/// [`Transport`] over a mesh [`Handle`].
#[derive(Clone)]
pub struct MeshTransport {
    mesh: Handle,
}

impl MeshTransport {
    /// Raft messages through `mesh`.
    pub fn new(mesh: Handle) -> Self {
        MeshTransport { mesh }
    }
}

impl Transport for MeshTransport {
    async fn call(
        &self,
        to: &Member,
        message: Message,
        timeout: Duration,
    ) -> Result<Answer, TransportError> {
        let fail = |reason: String| TransportError::Failed { peer: to.peer.clone(), reason };
        let peer: PeerId = to.peer.parse().map_err(|e| TransportError::Unreachable {
            peer: to.peer.clone(),
            reason: format!("not a peer id: {e}"),
        })?;
        let body =
            postcard::to_allocvec(&message).map_err(|e| fail(format!("cannot encode: {e}")))?;
        match self.mesh.request(peer, SERVICE, body, timeout).await {
            Ok(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| fail(format!("malformed answer: {e}")))
            }
            Err(RpcError::Transport { reason, .. }) => {
                Err(TransportError::Unreachable { peer: to.peer.clone(), reason })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

/// Serves raft messages for `consensus` on `mesh` until the mesh stops.
pub async fn serve(
    mesh: &Handle,
    consensus: Consensus<MeshTransport>,
) -> Result<(), cloudless_mesh::MeshError> {
    let mut requests = mesh.serve(SERVICE, QUEUE).await?;
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    tokio::spawn(async move {
        while let Some(req) = requests.recv().await {
            let Ok(permit) = limit.clone().acquire_owned().await else { break };
            let consensus = consensus.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match postcard::from_bytes::<Message>(&req.body) {
                    Ok(message) => {
                        let answer = consensus.handle(message).await;
                        match postcard::to_allocvec(&answer) {
                            Ok(bytes) => req.respond_bytes(bytes),
                            Err(e) => req.fail(RemoteError::new(
                                RemoteErrorKind::Failed,
                                format!("cannot encode answer: {e}"),
                            )),
                        }
                    }
                    Err(e) => {
                        debug!(peer = %req.peer, error = %e, "malformed raft message");
                        req.fail(RemoteError::new(
                            RemoteErrorKind::BadRequest,
                            format!("malformed raft message: {e}"),
                        ));
                    }
                }
            });
        }
    });
    Ok(())
}
