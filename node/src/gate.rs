//! The enrollment gate: which peers may reach what on this node.
//!
//! ```text
//!   committed state (raft members) ─┐
//!   Query::Enrolled (other nodes) ──┴─▶ EnrollGate::set ──▶ mesh asks admits / allows
//! ```
//!
//! - A revoked peer is not admitted: its connections are closed and it cannot open new ones.
//! - An enrolled peer may use everything: membership, directory, raft, the `api` service.
//! - Anyone else (a device that has not enrolled yet, a CLI) reaches only the `api` service,
//!   where it may send `Enroll` for itself or a request signed by a user key; the api refuses
//!   the rest from unenrolled callers.
//!
//! Until this node learns who is enrolled it trusts nobody but itself, so a new device talks to
//! nothing but the api until its enrollment is committed and it has fetched the list.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use cloudless_api::SERVICE;
use cloudless_mesh::{Gate, Protocol, identity};
use cloudless_types::NodeName;
use libp2p::PeerId;

/// Who is enrolled, as far as this node knows. Cheap to clone and to consult (a read lock and
/// a hash); only the [`GateWriter`] changes it.
#[derive(Clone, Debug)]
pub struct EnrollGate {
    me: PeerId,
    known: Arc<RwLock<Known>>,
}

/// The one writer of an [`EnrollGate`] (the gatekeeper loop owns it).
#[derive(Debug)]
pub struct GateWriter {
    known: Arc<RwLock<Known>>,
}

#[derive(Debug, Default, PartialEq)]
struct Known {
    enrolled: HashSet<PeerId>,
    revoked: HashSet<PeerId>,
}

impl EnrollGate {
    /// A gate that so far knows only `me`, and its writer.
    pub fn new(me: PeerId) -> (Self, GateWriter) {
        let known = Arc::new(RwLock::new(Known::default()));
        (EnrollGate { me, known: known.clone() }, GateWriter { known })
    }

    /// Whether the gate knows any enrolled node besides this one.
    pub fn knows_anyone(&self) -> bool {
        self.known.read().is_ok_and(|k| k.enrolled.iter().any(|p| *p != self.me))
    }

    /// Whether committed state (as last learned) lists `peer` as enrolled and unrevoked; unlike
    /// [`is_enrolled`](Self::is_enrolled), not assumed for this node itself.
    pub fn knows(&self, peer: &PeerId) -> bool {
        self.known.read().is_ok_and(|k| k.enrolled.contains(peer))
    }

    /// Whether committed state (as last learned) lists `peer` as revoked.
    pub fn is_revoked(&self, peer: &PeerId) -> bool {
        self.known.read().is_ok_and(|k| k.revoked.contains(peer))
    }

    /// Whether `peer` is an enrolled, unrevoked node.
    pub fn is_enrolled(&self, peer: &PeerId) -> bool {
        *peer == self.me || self.known.read().is_ok_and(|k| k.enrolled.contains(peer))
    }
}

impl GateWriter {
    /// Replaces what the gate knows; returns whether anything changed since the last call
    /// (the caller then asks the mesh to recheck its connections: close the revoked ones, and
    /// give newly enrolled peers what members get on a connection they opened as strangers).
    pub fn set<'a>(
        &self,
        enrolled: impl IntoIterator<Item = &'a NodeName>,
        revoked: impl IntoIterator<Item = &'a NodeName>,
    ) -> bool {
        let next = Known {
            enrolled: enrolled.into_iter().map(identity::peer_id).collect(),
            revoked: revoked.into_iter().map(identity::peer_id).collect(),
        };
        let Ok(mut k) = self.known.write() else { return false };
        let changed = *k != next;
        if changed {
            *k = next;
        }
        changed
    }
}

impl Gate for EnrollGate {
    fn admits(&self, peer: &PeerId) -> bool {
        !self.known.read().is_ok_and(|k| k.revoked.contains(peer))
    }

    fn allows(&self, peer: &PeerId, protocol: Protocol<'_>) -> bool {
        match protocol {
            Protocol::Rpc { service } if service == SERVICE => true,
            _ => self.is_enrolled(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_reach_only_the_api_and_revoked_peers_nothing() {
        let (me, friend, stranger, bad) =
            (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let (g, w) = EnrollGate::new(me);
        let name = |p: &PeerId| identity::node_name(p);
        let raft = Protocol::Rpc { service: "raft.append" };
        let api = Protocol::Rpc { service: SERVICE };
        assert!(g.allows(&me, Protocol::Membership), "itself, always");
        assert!(!g.allows(&friend, Protocol::Membership), "nobody before the list is known");
        assert!(w.set(&[name(&friend)], &[] as &[NodeName]), "the list changed");
        for p in [Protocol::Membership, Protocol::Directory, raft, api] {
            assert!(g.allows(&friend, p), "{p:?}");
        }
        assert!(g.admits(&stranger));
        assert!(g.allows(&stranger, api));
        for p in [Protocol::Membership, Protocol::Directory, raft] {
            assert!(!g.allows(&stranger, p), "{p:?}");
        }
        assert!(w.set(&[name(&friend)], &[name(&bad)]));
        assert!(!g.admits(&bad));
        assert!(!w.set(&[name(&friend)], &[name(&bad)]), "nothing changed");
    }
}
