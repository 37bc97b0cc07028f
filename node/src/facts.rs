//! What the parts of a running node share, each fact with one owner that writes it.
//!
//! ```text
//!   fact                        written by (holds the sender)     read by (receivers)
//!   view: Arc<View>             loops::view (mesh events)         placer, api, voters, worker
//!   group: Arc<Group>           loops::gatekeeper                 peers, api, readiness
//!   gate (EnrollGate)           loops::gatekeeper (GateWriter)    mesh, api
//!   unschedulable               loops::placer                     api reads
//!   raft state                  consensus (raft)                  everyone, through read()
//!   bootstrap                   the settings (invite, operator)   peers (whom to believe)
//! ```
//!
//! Whom this node believes about the cluster (its members, who is enrolled, what to run):
//! the raft members it learned from a member (persisted in `group` so a restart keeps them),
//! its own raft membership while it trusts its state, and its bootstrap peers (the addresses
//! sealed into its invite by the root key, or given by the operator). Nobody else: a peer
//! that merely connects (mDNS, an inbound dial) is never asked.
//!
//! Everything else here (the mesh handle, the raft member, the drivers, the scheduler, the
//! metrics) is a handle whose own type arbitrates access.

use std::collections::BTreeMap;
use std::sync::Arc;

use cloudless_consensus::Consensus;
use cloudless_mesh::Handle;
use cloudless_runtime::container::ContainerDriver;
use cloudless_runtime::wasi::WasiDriver;
use cloudless_sched::Scheduler;
use cloudless_types::{NodeName, Resources, WorkloadName};
use libp2p::PeerId;
use tokio::sync::watch;

use crate::gate::EnrollGate;
use crate::http::Metrics;
use crate::transport::MeshTransport;
use crate::view::View;

/// Why workloads could not be placed, as of the leader's last round.
pub type Unschedulable = BTreeMap<WorkloadName, String>;

/// The raft group as this node last learned it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    /// The voters (whom to ask).
    pub voters: Vec<NodeName>,
    /// The learners (members too).
    pub learners: Vec<NodeName>,
}

/// The file in the data dir that keeps the last learned group.
pub const GROUP_FILE: &str = "group";
/// Most members kept per kind: a group has five voters and a few learners; more in the file
/// means it is not ours.
const MAX_GROUP: usize = 64;
/// Largest group file read.
const MAX_GROUP_FILE: u64 = 64 * 1024;

impl Group {
    /// The group saved in `path`, or an empty one when there is none or it is unreadable (it
    /// is learned again from a bootstrap peer).
    pub fn load(path: &std::path::Path) -> Group {
        let read = || -> Option<Group> {
            let f = std::fs::File::open(path).ok()?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_GROUP_FILE), &mut bytes)
                .ok()?;
            let g: Group = postcard::from_bytes(&bytes).ok()?;
            (g.voters.len() <= MAX_GROUP && g.learners.len() <= MAX_GROUP).then_some(g)
        };
        read().unwrap_or_default()
    }

    /// Saves the group in `path` (written aside, synced, then renamed over the old one).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(self).map_err(std::io::Error::other)?;
        crate::files::write_synced(path, &bytes)
    }
}

/// What every part of the node may read.
pub struct Facts {
    /// This node.
    pub me: PeerId,
    /// This node, as the vocabulary names it.
    pub name: NodeName,
    /// The mesh.
    pub mesh: Handle,
    /// The raft member.
    pub consensus: Consensus<MeshTransport>,
    /// The WASI driver (module storage too).
    pub wasi: WasiDriver,
    /// The container driver, where this device has an engine.
    pub containers: Option<ContainerDriver>,
    /// The placement engine.
    pub scheduler: Scheduler,
    /// The metrics registry.
    pub metrics: Metrics,
    /// What this node offers to workloads.
    pub offer: Resources,
    /// Who is enrolled (the gatekeeper writes it).
    pub gate: EnrollGate,
    /// The pool as this node sees it (the view loop publishes it).
    pub view: watch::Receiver<Arc<View>>,
    /// The raft group as last learned (the gatekeeper publishes it).
    pub group: watch::Receiver<Arc<Group>>,
    /// The peers this node was told to join through (sealed into its invite, or given by the
    /// operator): believed about the cluster like members, after the members it learned.
    pub bootstrap: Vec<NodeName>,
    /// Why workloads are not placed (the placer publishes it while it leads).
    pub unschedulable: watch::Receiver<Arc<Unschedulable>>,
    /// Wakes the gatekeeper to refresh the gate now, and again shortly if that showed no
    /// change yet: this node enrolled, or committed an enrollment.
    pub gate_refresh: tokio::sync::Notify,
    /// Wakes the gatekeeper to refresh the gate once: the mesh heard a member announce a
    /// peer the gate does not know (budgeted by the mesh: 4 at once, then one per second).
    pub gate_hint: tokio::sync::Notify,
}

impl Facts {
    /// The latest view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// The raft voters as last learned.
    pub fn voters(&self) -> Vec<NodeName> {
        self.group.borrow().voters.clone()
    }

    /// Whether this node's own raft state is current enough to act on: it is a member and
    /// hears a leader (leads, or accepted an append within the consensus' `leader_silence`).
    /// A voter replaced while it was down, or a learner the group removed, still lists itself
    /// as a member and still names its last leader, but never hears from one again; its
    /// state stays as it was, so it must ask the others (else its gate would keep the nodes
    /// enrolled since out, and it would keep running replicas that moved away).
    pub fn trusts_own_state(&self) -> bool {
        self.consensus.is_member() && self.consensus.hears_leader()
    }

    /// Whether `peer` is a raft member (voter or learner) as this node knows the group: the
    /// members it learned, and its own membership while it trusts its raft state (a replaced
    /// voter's frozen membership names members that may be gone).
    pub fn is_member(&self, peer: &NodeName) -> bool {
        if *peer == self.name {
            return true;
        }
        let group = self.group.borrow();
        group.voters.contains(peer)
            || group.learners.contains(peer)
            || (self.trusts_own_state() && self.consensus.members().contains(peer))
    }

    /// Raft members to ask, best first: the voters, then the other members this node knows.
    pub fn members_to_ask(&self) -> Vec<NodeName> {
        let mut out: Vec<NodeName> = self.voters();
        for m in self.consensus.members() {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out.retain(|m| *m != self.name);
        out
    }

    /// The peers whose answers about the cluster this node believes, best first: the members
    /// it knows, then its bootstrap peers (unless committed state revoked them).
    pub fn trusted_to_ask(&self) -> Vec<NodeName> {
        let mut out = self.members_to_ask();
        for b in &self.bootstrap {
            let revoked = self.gate.is_revoked(&cloudless_mesh::identity::peer_id(b));
            if *b != self.name && !revoked && !out.contains(b) {
                out.push(b.clone());
            }
        }
        out
    }
}
