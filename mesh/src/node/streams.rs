//! Inbound streams of our own protocols, handed over with the peer that opened them.
//!
//! A minimal behaviour: each connection's handler accepts streams on the listed protocols and
//! queues `(peer, protocol, stream)` for the acceptor (`inbound`), which decides what to read.
//! The queue is bounded; when it is full the stream is dropped unread, as a lost packet would
//! be (the sender sees it reset).
//!
//! ```text
//!   connection handler ──(peer, protocol, stream)──▶ bounded queue ──▶ acceptor task
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

/// Streams queued for the acceptor: a burst of calls from many peers fits; the acceptor
/// drains it at once (it reads nothing itself before deciding).
pub(super) const QUEUE: usize = 1024;

/// One inbound stream.
pub(super) type Incoming = (PeerId, StreamProtocol, Stream);

/// The behaviour: hands inbound streams of `protocols` to a queue.
pub(super) struct Behaviour {
    protocols: Vec<StreamProtocol>,
    queue: mpsc::Sender<Incoming>,
}

impl Behaviour {
    /// Accepts `protocols` and queues their streams; the receiver goes to the acceptor.
    pub(super) fn new(protocols: Vec<StreamProtocol>) -> (Self, mpsc::Receiver<Incoming>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        (Behaviour { protocols, queue }, rx)
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler { peer, protocols: self.protocols.clone(), queue: self.queue.clone() }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        e: THandlerOutEvent<Self>,
    ) {
        match e {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Accepts inbound streams of the listed protocols on one connection.
pub(super) struct Handler {
    peer: PeerId,
    protocols: Vec<StreamProtocol>,
    queue: mpsc::Sender<Incoming>,
}

/// Negotiates one of our protocols and yields the stream as it is.
pub(super) struct Upgrade(Vec<StreamProtocol>);

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: Stream, info: StreamProtocol) -> Self::Future {
        ready(Ok((socket, info)))
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Upgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Upgrade(self.protocols.clone()), ())
    }

    fn on_behaviour_event(&mut self, e: Infallible) {
        match e {}
    }

    fn connection_keep_alive(&self) -> bool {
        // Open streams keep the connection alive by themselves.
        false
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, Infallible>> {
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
            && self.queue.try_send((self.peer, protocol, stream)).is_err()
        {
            tracing::debug!(peer = %self.peer, "inbound stream queue full: stream dropped");
        }
    }
}
