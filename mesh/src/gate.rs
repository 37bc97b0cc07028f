//! The connection gate: the seam through which the node decides which peers may connect at all
//! and which of our protocols each may use.
//!
//! Enrollment (a later layer) implements [`Gate`] from the cluster's committed member list; until
//! then [`OpenGate`] admits everyone. The gate is consulted:
//!
//! * by [`Behaviour`] on every connection, dialled or accepted: a peer the gate does not
//!   [admit](Gate::admits) is refused before any protocol runs, and dials to it are not made;
//! * by the swarm task on every membership message, flood, directory sync and RPC request, per
//!   [`Protocol`]: a refused RPC gets an "unauthorized" answer, anything else is dropped.
//!
//! After the gate's answers change (an enrollment, a revocation, a test partition), call
//! `Handle::recheck_gate` so that live connections to peers no longer admitted are closed and
//! peers that became members on a live connection are treated as members on it.
//!
//! Strangers (admitted peers that may not use membership: joiners, `cloudlessctl`, anyone)
//! hold at most [`MAX_STRANGER_CONNECTIONS`] connections together; beyond, a new stranger's
//! connection is let in and a random older stranger's closed, so a flood of strangers can
//! neither grow the node nor keep a newcomer out for long. Members are not counted.
//!
//! Protocols that serve members only and that libp2p implements (Kademlia, AutoNAT) are
//! wrapped in [`MembersOnly`]: a stranger's stream to them is refused in protocol
//! negotiation.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    CloseConnection, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

mod members_only;

pub use members_only::MembersOnly;

/// Our protocols, as far as the gate is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol<'a> {
    /// Membership probes and floods.
    Membership,
    /// Node directory synchronisation.
    Directory,
    /// One RPC service, by name.
    Rpc {
        /// The service name, as registered with `Handle::serve`.
        service: &'a str,
    },
}

/// Decides who may connect and use what. Implementations must be cheap: they run on the swarm
/// task for every message.
pub trait Gate: Send + Sync + 'static {
    /// Whether `peer` may hold a connection to us at all.
    fn admits(&self, peer: &PeerId) -> bool;
    /// Whether `peer` may use `protocol`. Only asked about admitted peers.
    fn allows(&self, peer: &PeerId, protocol: Protocol<'_>) -> bool;
}

/// Admits every peer to every protocol: the behaviour before enrollment exists.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenGate;

impl Gate for OpenGate {
    fn admits(&self, _: &PeerId) -> bool {
        true
    }
    fn allows(&self, _: &PeerId, _: Protocol<'_>) -> bool {
        true
    }
}

/// Connections all strangers together may hold. Each costs about half a MiB once every
/// protocol has set up on it (QUIC state, identify, kad, gossipsub and the stream handlers;
/// measured by `mesh_stranger_connections`), so 64 stay around 32 MiB; a pool's joiners and
/// users at one moment are far fewer.
pub const MAX_STRANGER_CONNECTIONS: usize = 64;

/// Enforces [`Gate::admits`] on every connection, and caps strangers' connections.
pub struct Behaviour {
    gate: Arc<dyn Gate>,
    strangers: HashMap<ConnectionId, PeerId>,
    closing: VecDeque<(PeerId, ConnectionId)>,
}

impl Behaviour {
    /// A behaviour consulting `gate`.
    pub fn new(gate: Arc<dyn Gate>) -> Self {
        Behaviour { gate, strangers: HashMap::new(), closing: VecDeque::new() }
    }

    fn check(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        if self.gate.admits(peer) { Ok(()) } else { Err(ConnectionDenied::new(NotAdmitted(*peer))) }
    }

    /// Counts a new connection; when strangers hold too many, picks one of theirs to close.
    fn established(&mut self, id: ConnectionId, peer: PeerId) {
        if self.gate.allows(&peer, Protocol::Membership) {
            return;
        }
        // Peers enrolled since they connected are members now: no longer counted.
        let gate = self.gate.clone();
        self.strangers.retain(|_, p| !gate.allows(p, Protocol::Membership));
        while self.strangers.len() >= MAX_STRANGER_CONNECTIONS {
            let pick = rand::random::<u64>() as usize % self.strangers.len();
            let Some((&victim, &who)) = self.strangers.iter().nth(pick) else { break };
            self.strangers.remove(&victim);
            self.closing.push_back((who, victim));
        }
        self.strangers.insert(id, peer);
    }
}

/// The error a refused connection carries.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not admitted by the connection gate")]
pub struct NotAdmitted(pub PeerId);

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        self.established(id, peer);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check(&peer)?;
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        self.established(id, peer);
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) = event {
            self.strangers.remove(&connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.closing.pop_front() {
            Some((peer_id, id)) => Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(id),
            }),
            None => Poll::Pending,
        }
    }
}
