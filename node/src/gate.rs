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
use std::sync::RwLock;

use cloudless_consensus::api::SERVICE;
use cloudless_consensus::state::State;
use cloudless_mesh::{Gate, Protocol};
use libp2p::PeerId;

/// Who is enrolled, as far as this node knows. Cheap to consult (a read lock and a hash).
#[derive(Debug)]
pub struct EnrollGate {
    me: PeerId,
    known: RwLock<Known>,
}

#[derive(Debug, Default, PartialEq)]
struct Known {
    enrolled: HashSet<PeerId>,
    revoked: HashSet<PeerId>,
}

impl EnrollGate {
    /// A gate that so far knows only `me`.
    pub fn new(me: PeerId) -> Self {
        EnrollGate { me, known: RwLock::new(Known::default()) }
    }

    /// Replaces what the gate knows; returns whether anything was revoked since the last call
    /// (the caller then asks the mesh to close their connections).
    pub fn set(&self, enrolled: &[String], revoked: &[String]) -> bool {
        let parse =
            |v: &[String]| -> HashSet<PeerId> { v.iter().filter_map(|p| p.parse().ok()).collect() };
        let next = Known { enrolled: parse(enrolled), revoked: parse(revoked) };
        let Ok(mut k) = self.known.write() else { return false };
        let newly_revoked = next.revoked.iter().any(|p| !k.revoked.contains(p));
        if *k != next {
            *k = next;
        }
        newly_revoked
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

    /// Whether `peer` is an enrolled, unrevoked node.
    pub fn is_enrolled(&self, peer: &PeerId) -> bool {
        *peer == self.me || self.known.read().is_ok_and(|k| k.enrolled.contains(peer))
    }
}

/// The enrolled (unrevoked) and the revoked nodes in committed state, as PeerId text.
pub fn lists(state: &State) -> (Vec<String>, Vec<String>) {
    let (revoked, nodes): (Vec<_>, Vec<_>) = state.nodes().iter().partition(|(_, n)| n.revoked);
    let names = |v: Vec<(&String, _)>| v.into_iter().map(|(p, _)| p.clone()).collect();
    (names(nodes), names(revoked))
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
        let g = EnrollGate::new(me);
        let raft = Protocol::Rpc { service: "raft.append" };
        let api = Protocol::Rpc { service: SERVICE };
        assert!(g.allows(&me, Protocol::Membership), "itself, always");
        assert!(!g.allows(&friend, Protocol::Membership), "nobody before the list is known");
        assert!(!g.set(&[friend.to_string()], &[]));
        for p in [Protocol::Membership, Protocol::Directory, raft, api] {
            assert!(g.allows(&friend, p), "{p:?}");
        }
        assert!(g.admits(&stranger));
        assert!(g.allows(&stranger, api));
        for p in [Protocol::Membership, Protocol::Directory, raft] {
            assert!(!g.allows(&stranger, p), "{p:?}");
        }
        assert!(g.set(&[friend.to_string()], &[bad.to_string(), "not a peer id".into()]));
        assert!(!g.admits(&bad));
        assert!(!g.set(&[friend.to_string()], &[bad.to_string()]), "nothing newly revoked");
    }
}
