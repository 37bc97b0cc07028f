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
//! After the gate's answers change (a revocation, a test partition), call
//! `Handle::recheck_gate` so that live connections to peers no longer admitted are closed.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

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

/// Enforces [`Gate::admits`] on every connection.
pub struct Behaviour {
    gate: Arc<dyn Gate>,
}

impl Behaviour {
    /// A behaviour consulting `gate`.
    pub fn new(gate: Arc<dyn Gate>) -> Self {
        Behaviour { gate }
    }

    fn check(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        if self.gate.admits(peer) { Ok(()) } else { Err(ConnectionDenied::new(NotAdmitted(*peer))) }
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
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
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
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
