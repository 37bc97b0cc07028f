//! The way into the mesh: the cloneable [`Handle`] and the commands it queues for the swarm
//! task, each with a oneshot for the answer.

use std::collections::BTreeMap;
use std::time::Duration;

use cloudless_types::{Capacity, NodeDescriptor};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::MeshError;
use crate::membership::{self, MemberView};
use crate::rpc::{Envelope, InboundRequest, MAX_SERVICE_NAME, Rpc, RpcError};

pub(super) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), MeshError>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    FloodPeers(oneshot::Sender<Vec<PeerId>>),
    Members(oneshot::Sender<Result<Vec<MemberView<PeerId>>, MeshError>>),
    SetCapacity(Capacity),
    SetDescriptor(NodeDescriptor, oneshot::Sender<Result<(), MeshError>>),
    Directory(oneshot::Sender<Result<BTreeMap<PeerId, NodeDescriptor>, MeshError>>),
    DirectoryStats(oneshot::Sender<Result<crate::directory::Stats, MeshError>>),
    Request {
        peer: PeerId,
        envelope: Envelope,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
    Serve {
        service: String,
        sender: mpsc::Sender<InboundRequest>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    RecheckGate(oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// The cloneable way into the mesh. Every method talks to the swarm task over a bounded queue.
#[derive(Clone)]
pub struct Handle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
    pub(super) rpc_max_bytes: usize,
    pub(super) rpc_timeout: Duration,
}

impl Handle {
    /// Whether the swarm task still runs (it owns the other end of every command).
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| MeshError::Closed)?;
        rx.await.map_err(|_| MeshError::Closed)
    }

    /// Addresses the node listens on, with its `/p2p/<id>` suffix.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Dials an address (with or without `/p2p/<id>`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.ask(|r| Command::Dial(addr, r)).await?
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::Connected).await
    }

    /// The peers this node floods membership news to (its gossipsub mesh for the membership
    /// topic): members only, since strangers are scored below gossipsub's graylist. Empty on a
    /// client.
    pub async fn flood_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::FloodPeers).await
    }

    /// Every member this node knows of, itself included.
    pub async fn members(&self) -> Result<Vec<MemberView<PeerId>>, MeshError> {
        self.ask(Command::Members).await?
    }

    /// Reports this node's current capacity; the membership announces it when it changed
    /// meaningfully.
    pub async fn set_capacity(&self, capacity: Capacity) -> Result<(), MeshError> {
        self.tx.send(Command::SetCapacity(capacity)).await.map_err(|_| MeshError::Closed)
    }

    /// Replaces this node's directory entry (its addresses are kept up to date by the mesh).
    pub async fn set_descriptor(&self, descriptor: NodeDescriptor) -> Result<(), MeshError> {
        self.ask(|r| Command::SetDescriptor(descriptor, r)).await?
    }

    /// The node directory: every node's valid entry.
    pub async fn directory(&self) -> Result<BTreeMap<PeerId, NodeDescriptor>, MeshError> {
        self.ask(Command::Directory).await?
    }

    /// The directory's digest and size; equal digests on two nodes mean equal directories.
    pub async fn directory_stats(&self) -> Result<crate::directory::Stats, MeshError> {
        self.ask(Command::DirectoryStats).await?
    }

    /// Sends raw `body` to `service` on `peer` and waits for the answer, at most `timeout`.
    pub async fn request(
        &self,
        peer: PeerId,
        service: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            return Err(RpcError::BadService(service.to_string()));
        }
        let envelope = Envelope { service: service.to_string(), body };
        let size = membership::encoded_len(&envelope);
        if size > self.rpc_max_bytes {
            return Err(RpcError::TooLarge { size, max: self.rpc_max_bytes });
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Request { peer, envelope, reply: tx })
            .await
            .map_err(|_| RpcError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RpcError::Closed),
            Err(_) => Err(RpcError::Timeout { peer, timeout }),
        }
    }

    /// Calls service `R` on `peer` with the mesh's default deadline.
    pub async fn call<R: Rpc>(
        &self,
        peer: PeerId,
        request: &R::Request,
    ) -> Result<R::Response, RpcError> {
        self.call_with_timeout::<R>(peer, request, self.rpc_timeout).await
    }

    /// Calls service `R` on `peer`, waiting at most `timeout`.
    pub async fn call_with_timeout<R: Rpc>(
        &self,
        peer: PeerId,
        request: &R::Request,
        timeout: Duration,
    ) -> Result<R::Response, RpcError> {
        let codec = |reason: String| RpcError::Codec { service: R::SERVICE.to_string(), reason };
        let body = postcard::to_allocvec(request).map_err(|e| codec(e.to_string()))?;
        let answer = self.request(peer, R::SERVICE, body, timeout).await?;
        postcard::from_bytes(&answer).map_err(|e| codec(e.to_string()))
    }

    /// Registers a handler for `service`; requests arrive on the returned queue of `capacity`
    /// entries. When it is full, callers get a "busy" answer.
    pub async fn serve(
        &self,
        service: &str,
        capacity: usize,
    ) -> Result<mpsc::Receiver<InboundRequest>, MeshError> {
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            return Err(MeshError::Serve {
                service: service.into(),
                reason: "name must be 1 to 64 bytes".into(),
            });
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.ask(|r| Command::Serve { service: service.to_string(), sender: tx, reply: r })
            .await??;
        Ok(rx)
    }

    /// Rechecks live connections after the gate's answers changed: closes those of peers it
    /// no longer admits, and gives peers enrolled since they connected what members get
    /// (gossip, AutoNAT) and takes it from those no longer members.
    pub async fn recheck_gate(&self) -> Result<(), MeshError> {
        self.ask(Command::RecheckGate).await
    }

    /// Announces a voluntary leave, lets it get out, and stops the mesh.
    pub async fn leave(&self) -> Result<(), MeshError> {
        self.ask(Command::Leave).await
    }

    /// Stops the mesh without announcing anything (the others will see a failure).
    pub async fn shutdown(&self) -> Result<(), MeshError> {
        self.ask(Command::Shutdown).await
    }
}
