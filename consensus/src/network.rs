//! The network the raft group needs, as a trait: [`Transport`] carries one [`Message`] to one
//! member and brings back its [`Answer`]. The node implements it over the mesh's
//! request-response RPC; tests implement it over in-memory channels with faults. This module
//! adapts any transport to openraft's network traits.
//!
//! ```text
//!   openraft ──append/vote/snapshot──▶ Conn ──Message──▶ Transport ──▶ peer's Consensus::handle
//!   Consensus::write (follower) ──Message::Forward──▶ leader          ──▶ Answer
//! ```

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::state::{Batch, Response};
use crate::{Member, NodeId, TypeConfig};

/// What one member sends another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// Raft log replication and heartbeats.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft elections.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Writes forwarded to the leader, as one batch.
    Forward(Batch),
    /// A follower asks the leader for a read index (linearizable reads).
    ReadIndex,
}

impl Message {
    /// The raft node the message says it comes from: the leader an append or snapshot names,
    /// the candidate a vote request names. Forwards and read indexes name nobody.
    pub fn speaks_for(&self) -> Option<NodeId> {
        match self {
            Message::Append(r) => r.vote.leader_id().voted_for(),
            Message::Snapshot(r) => r.vote.leader_id().voted_for(),
            Message::Vote(r) => r.vote.leader_id().voted_for(),
            Message::Forward(_) | Message::ReadIndex => None,
        }
    }
}

/// The answer to a [`Message`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    /// To [`Message::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Message::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Message::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To [`Message::Forward`]: the state machine's response, or why the write did not
    /// happen there (for example, that node is not the leader any more).
    Forward(Result<Vec<Response>, String>),
    /// To [`Message::ReadIndex`]: the index to wait for, or why there is none.
    ReadIndex(Result<u64, String>),
}

/// The raft service as the node's transport carries it: a [`Message`] and its [`Answer`].
pub struct RaftService;

impl cloudless_types::Rpc for RaftService {
    const SERVICE: &'static str = "raft";
    type Request = Message;
    type Response = Answer;
}

/// Why a message did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The member could not be reached (down, partitioned, unknown address).
    #[error("{peer} is unreachable: {reason}")]
    Unreachable {
        /// The member.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The exchange started but broke or timed out.
    #[error("exchange with {peer} failed: {reason}")]
    Failed {
        /// The member.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// Carries raft messages between members. Implementations must be cheap to clone.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `message` to `to` and waits for its answer, at most `timeout`.
    fn call(
        &self,
        to: &Member,
        message: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Answer, TransportError>> + Send;
}

/// openraft's network factory over a [`Transport`].
pub struct Network<T> {
    transport: T,
}

impl<T: Transport> Network<T> {
    /// The network over `transport`.
    pub fn new(transport: T) -> Self {
        Network { transport }
    }
}

/// One connection: a target and the transport.
pub struct Conn<T> {
    transport: T,
    target: NodeId,
    node: Member,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Conn<T>;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        Conn { transport: self.transport.clone(), target, node: node.clone() }
    }
}

fn rpc_error<E: std::error::Error>(e: TransportError) -> RPCError<NodeId, Member, E> {
    match e {
        TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        TransportError::Failed { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(what: &str) -> RPCError<NodeId, Member, E> {
    let e = TransportError::Failed {
        peer: String::new(),
        reason: format!("unexpected answer to {what}"),
    };
    RPCError::Network(NetworkError::new(&e))
}

impl<T: Transport> RaftNetwork<TypeConfig> for Conn<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self
            .transport
            .call(&self.node, Message::Append(rpc), option.hard_ttl())
            .await
            .map_err(rpc_error)?
        {
            Answer::Append(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
            }),
            _ => Err(unexpected("append")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .transport
            .call(&self.node, Message::Snapshot(rpc), option.hard_ttl())
            .await
            .map_err(rpc_error)?
        {
            Answer::Snapshot(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
            }),
            _ => Err(unexpected("install snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self
            .transport
            .call(&self.node, Message::Vote(rpc), option.hard_ttl())
            .await
            .map_err(rpc_error)?
        {
            Answer::Vote(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
            }),
            _ => Err(unexpected("vote")),
        }
    }
}
