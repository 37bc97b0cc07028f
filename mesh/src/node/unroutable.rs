//! Reports dials that failed because no address of the peer is known. The swarm tells only
//! behaviours about those (they fail before any connection attempt), and the membership core
//! must not take them for a dead peer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// A dial to this peer found no address.
#[derive(Debug)]
pub struct NoAddress(pub PeerId);

/// Bounded: at most this many reports wait to be read.
const MAX_QUEUED: usize = 256;

#[derive(Default)]
pub struct Behaviour {
    queue: VecDeque<PeerId>,
    waker: Option<Waker>,
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = NoAddress;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::DialFailure(f) = &event {
            tracing::trace!(peer = ?f.peer_id, error = %f.error, "dial failure");
        }
        if let FromSwarm::DialFailure(f) = event
            && let (Some(peer), DialError::NoAddresses) = (f.peer_id, f.error)
            && self.queue.len() < MAX_QUEUED
            && !self.queue.contains(&peer)
        {
            self.queue.push_back(peer);
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let never: Infallible = event;
        match never {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.queue.pop_front() {
            Some(peer) => Poll::Ready(ToSwarm::GenerateEvent(NoAddress(peer))),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
