//! The raft group's transport over the mesh: consensus messages travel as the `raft` RPC
//! service (`consensus::RaftService`: postcard bodies, the mesh's size limit and the caller's
//! deadline). The serving side, with its access check, is `api::raft`.
//!
//! ```text
//!   Consensus ──Transport::call──▶ MeshTransport ──Handle::call::<RaftService>──▶ peer
//! ```

use std::time::Duration;

use cloudless_consensus::{Answer, Member, Message, RaftService, Transport, TransportError};
use cloudless_mesh::Handle;
use cloudless_mesh::identity;
use cloudless_mesh::rpc::RpcError;

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
        let peer = identity::peer_id(&to.peer);
        match self.mesh.call_with_timeout::<RaftService>(peer, &message, timeout).await {
            Ok(answer) => Ok(answer),
            Err(RpcError::Transport { reason, .. }) => {
                Err(TransportError::Unreachable { peer: to.peer.to_string(), reason })
            }
            Err(e) => {
                Err(TransportError::Failed { peer: to.peer.to_string(), reason: e.to_string() })
            }
        }
    }
}
