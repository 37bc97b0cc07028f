//! Getting through NATs: AutoNAT's verdict, the relay servers learned through identify, and the
//! reservations a private node keeps with up to [`MAX_RELAYS`] of them (dcutr then punches
//! direct connections through).

use libp2p::multiaddr::Protocol as Proto;
use libp2p::{Multiaddr, PeerId, StreamProtocol, autonat};
use tracing::{debug, info};

use super::task::Task;
use super::{Event, Reachability};

/// Relay servers remembered as candidates; a few dozen are plenty to pick two from.
const MAX_RELAY_CANDIDATES: usize = 32;
/// Relays a private node keeps reservations with.
const MAX_RELAYS: usize = 2;
/// Relay v2 hop protocol, advertised by relay servers through identify.
const RELAY_HOP: &str = "/libp2p/circuit/relay/0.2.0/hop";

impl Task {
    /// AutoNAT's verdict changed: keep it (a node configured as behind a NAT stays private),
    /// look for relays if we are private, and tell the node.
    pub(super) fn on_nat_status(&mut self, new: autonat::NatStatus) {
        let r = match new {
            autonat::NatStatus::Public(a) => Reachability::Public(a),
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        info!(reachability = ?r, "autonat");
        if !self.config.behind_nat {
            self.reachability = r.clone();
        }
        self.ensure_relays();
        self.emit(Event::Nat(r));
    }

    /// A peer that serves relay v2 becomes a relay candidate, at its first routable address.
    pub(super) fn consider_relay(
        &mut self,
        peer_id: PeerId,
        protocols: &[StreamProtocol],
        routable: &[Multiaddr],
    ) {
        if protocols.iter().any(|p| p.as_ref() == RELAY_HOP)
            && let Some(a) = routable.first()
            && (self.relay_candidates.len() < MAX_RELAY_CANDIDATES
                || self.relay_candidates.contains_key(&peer_id))
        {
            self.relay_candidates.insert(peer_id, a.clone());
            self.ensure_relays();
        }
    }

    /// Forgets the relays whose reservations went with these closed listen addresses.
    pub(super) fn drop_lost_reservations(&mut self, addresses: &[Multiaddr]) {
        let lost: Vec<PeerId> = addresses
            .iter()
            .filter(|a| a.iter().any(|p| matches!(p, Proto::P2pCircuit)))
            .filter_map(|a| {
                a.iter().find_map(|p| match p {
                    Proto::P2p(peer) => Some(peer),
                    _ => None,
                })
            })
            .collect();
        for relay in lost {
            self.relays.remove(&relay);
        }
    }

    /// Behind a NAT, keeps reservations with up to [`MAX_RELAYS`] relays so peers can reach us
    /// (and dcutr can then punch a direct connection).
    pub(super) fn ensure_relays(&mut self) {
        if self.reachability != Reachability::Private {
            return;
        }
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relay_candidates
            .iter()
            .filter(|(p, _)| !self.relays.contains(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in candidates {
            if self.relays.len() >= MAX_RELAYS {
                break;
            }
            let circuit = addr.with(Proto::P2p(peer)).with(Proto::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    info!(relay = %peer, "reserving a relay slot");
                    self.relays.insert(peer);
                }
                Err(e) => debug!(%circuit, error = %e, "cannot listen through relay"),
            }
        }
    }
}
