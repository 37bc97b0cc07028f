//! [`MembersOnly`]: a libp2p behaviour served to members only.
//!
//! Kademlia and AutoNAT answer whoever opens a stream to them: a stranger could walk our
//! routing table (every member's address) or have us dial addresses of its choosing.
//! Wrapping them, a stranger's inbound stream finds no such protocol (it is refused in
//! protocol negotiation, before a byte of it is read), while a member's is served as before.
//! Our own outbound requests are untouched (whom we ask is the swarm task's choice).
//!
//! ```text
//!   inbound stream ──▶ listen_protocol: gate.allows(peer, Membership)?
//!                         yes ─▶ the wrapped handler's protocols ─▶ served
//!                         no  ─▶ no protocol at all ─▶ negotiation fails, nothing read
//! ```
//!
//! The gate is asked anew for every inbound stream, so a peer enrolled on a live connection
//! is served on it from then on: the swarm compares the protocols it listens on whenever it
//! polls a connection, and identify pushes the change to the peer.
//!
//! Gossipsub is not wrapped: a peer whose gossipsub stream is refused once marks the
//! connection as not speaking it for good, so a joiner enrolled on the connection it met us
//! on as a stranger would never flood with us. Strangers are kept out of it by its own
//! blacklist and peer scores instead (the swarm task's `classify`).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::task::{Context, Poll};

use either::Either;
use futures::future;
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::swarm::handler::{
    ConnectionEvent, FullyNegotiatedInbound, ListenUpgradeError, SendWrapper,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::{Gate, Protocol};

/// `B`, with its inbound protocols offered only to peers the gate lets use membership.
pub struct MembersOnly<B> {
    inner: B,
    gate: Arc<dyn Gate>,
}

impl<B> MembersOnly<B> {
    /// Wraps `inner`, consulting `gate` for every inbound stream.
    pub fn new(inner: B, gate: Arc<dyn Gate>) -> Self {
        MembersOnly { inner, gate }
    }
}

impl<B> Deref for MembersOnly<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> DerefMut for MembersOnly<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for MembersOnly<B> {
    type ConnectionHandler = Handler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(id, peer, local, remote)?;
        Ok(Handler { inner, peer, gate: self.gate.clone() })
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner =
            self.inner.handle_established_outbound_connection(id, peer, addr, role, port_use)?;
        Ok(Handler { inner, peer, gate: self.gate.clone() })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// The wrapped behaviour's handler for one connection, listening only while the peer is a
/// member.
pub struct Handler<H> {
    inner: H,
    peer: PeerId,
    gate: Arc<dyn Gate>,
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = Either<SendWrapper<H::InboundProtocol>, SendWrapper<DeniedUpgrade>>;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = Either<H::InboundOpenInfo, ()>;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        if self.gate.allows(&self.peer, Protocol::Membership) {
            self.inner
                .listen_protocol()
                .map_upgrade(|u| Either::Left(SendWrapper(u)))
                .map_info(Either::Left)
        } else {
            SubstreamProtocol::new(Either::Right(SendWrapper(DeniedUpgrade)), Either::Right(()))
        }
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        let event = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                match (protocol, info) {
                    // Asked again once negotiated: a peer that stopped being a member while
                    // its stream was being set up is not served (the stream is dropped).
                    (future::Either::Left(_), Either::Left(_))
                        if !self.gate.allows(&self.peer, Protocol::Membership) =>
                    {
                        return;
                    }
                    (future::Either::Left(protocol), Either::Left(info)) => {
                        ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                            protocol,
                            info,
                        })
                    }
                    // A denied upgrade never completes; a stream negotiated with one side's
                    // protocol and the other's info cannot arise either.
                    (future::Either::Right(never), _) => match never {},
                    (future::Either::Left(_), Either::Right(())) => return,
                }
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }) => {
                match (info, error) {
                    (Either::Left(info), Either::Left(error)) => {
                        ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error })
                    }
                    // A stranger's stream that found no protocol: nothing of ours ran.
                    (Either::Right(()), _) => return,
                    (Either::Left(_), Either::Right(never)) => match never {},
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(e) => {
                ConnectionEvent::FullyNegotiatedOutbound(e)
            }
            ConnectionEvent::DialUpgradeError(e) => ConnectionEvent::DialUpgradeError(e),
            ConnectionEvent::AddressChange(e) => ConnectionEvent::AddressChange(e),
            ConnectionEvent::LocalProtocolsChange(e) => ConnectionEvent::LocalProtocolsChange(e),
            ConnectionEvent::RemoteProtocolsChange(e) => ConnectionEvent::RemoteProtocolsChange(e),
            // Events a later libp2p adds: the wrapped handler cannot be told of them here.
            _ => return,
        };
        self.inner.on_connection_event(event);
    }
}
