//! What the raft leader decides each round, as a pure function: from committed state and the
//! node's view of the pool (membership, capacity, directory) to one `Assign` command.
//!
//! ```text
//!   State (enrolled nodes, workloads, assignments) ─┐
//!   Seen (liveness, capacity, descriptor per peer) ─┼─▶ sched::Cluster ─▶ Scheduler::place
//!                                                   │        per workload, missing replicas
//!   replicas on dead, left, revoked, unknown or     ┴─▶ unset and placed again
//!   draining nodes
//!                                             ──▶ Command::Assign { epoch + 1, set, unset }
//! ```
//!
//! Only nodes declared dead (or gone) lose their replicas: a suspect node keeps them, since a
//! disconnected node keeps running its work; a workload may also wait a while
//! (`reschedule_after_secs`) for a dead node to come back. Cordoned nodes get no new replicas; draining ones
//! lose theirs too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cloudless_consensus::state::{Command, NodeRole, ReplicaKey, Schedulable, State};
use cloudless_mesh::membership;
use cloudless_sched::Scheduler;
use cloudless_sched::model::{Cluster, Liveness, Node, ReplicaId, Workload};
use cloudless_types::{Capacity, Image, NodeDescriptor, Resources, Runtime, Runtimes};

/// What this node knows about one peer of the pool.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The peer, as text.
    pub peer: String,
    /// Its liveness in the membership.
    pub state: membership::State,
    /// How long it has been declared dead (zero unless `state` is dead).
    pub down_for: Duration,
    /// Its last capacity summary.
    pub capacity: Option<Capacity>,
    /// Its directory entry.
    pub descriptor: Option<NodeDescriptor>,
}

/// The outcome of a round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// The command to commit, when anything changes.
    pub command: Option<Command>,
    /// Workloads with replicas that fit nowhere, and why.
    pub unschedulable: BTreeMap<String, String>,
    /// Replicas placed this round.
    pub placed: usize,
}

fn liveness(s: membership::State) -> Liveness {
    match s {
        membership::State::Alive => Liveness::Alive,
        membership::State::Suspect => Liveness::Suspect,
        membership::State::Dead | membership::State::Left => Liveness::Dead,
    }
}

/// The scheduler's view of the pool: enrolled, unrevoked workers that the membership knows
/// and whose capacity is known.
pub fn cluster_view(state: &State, seen: &[Seen]) -> Cluster {
    let mut cluster = Cluster::new();
    for s in seen {
        let Some(record) = state.nodes().get(&s.peer) else { continue };
        if record.revoked || !record.roles.contains(&NodeRole::Worker) {
            continue;
        }
        let d = s.descriptor.clone().unwrap_or_default();
        let allocatable = match &s.capacity {
            Some(c) => Resources {
                cpu_millis: c.cpu_total_millis,
                memory_mib: c.memory_total_mib,
                disk_mib: c.disk_total_mib,
                gpus: d.gpus,
            },
            None if d.cpu_millis > 0 => Resources {
                cpu_millis: d.cpu_millis,
                memory_mib: d.memory_mib,
                disk_mib: d.disk_mib,
                gpus: d.gpus,
            },
            None => continue,
        };
        let mut node = Node::new(&s.peer, allocatable);
        node.labels = d.labels.clone();
        node.labels.extend(record.labels.clone());
        node.zone = d.zone.clone();
        node.region = d.region.clone();
        if let Some(class) = d.device_class {
            node.device_class = class;
        }
        node.runtimes = match &s.capacity {
            Some(c) => c.runtimes,
            None => Runtimes::of(&d.runtimes),
        };
        if let Some(c) = &s.capacity {
            node.power = c.power;
            node.metered = c.metered;
        }
        node.liveness = liveness(s.state);
        node.cordoned = record.schedulable != Schedulable::Yes;
        // A node listed twice keeps its first entry.
        let _ = cluster.add_node(node);
    }
    cluster
}

/// The scheduler's model of a workload.
pub fn workload(name: &str, spec: &cloudless_types::WorkloadSpec) -> Workload {
    let runtime = match spec.image {
        Image::Container(_) => Runtime::Container,
        Image::Wasi(_) => Runtime::Wasi,
    };
    let mut w = Workload::new(name, runtime, spec.requests, spec.replicas);
    w.priority = spec.priority;
    w.min_available = spec.min_available;
    w.placement = spec.placement.clone();
    w
}

/// The scheduler's view with every assignment that still holds, and the replicas that must
/// move: those on dead, left, revoked, unknown or draining nodes, or that no longer fit.
pub fn occupied(state: &State, seen: &[Seen]) -> (Cluster, BTreeSet<ReplicaKey>) {
    let mut cluster = cluster_view(state, seen);
    let mut unset: BTreeSet<ReplicaKey> = BTreeSet::new();
    // How long each dead node has been dead, looked up once per assignment.
    let dead_for: BTreeMap<&str, Duration> = seen
        .iter()
        .filter(|s| s.state == membership::State::Dead)
        .map(|s| (s.peer.as_str(), s.down_for))
        .collect();
    for (key, a) in state.assignments() {
        let Some(w) = state.workloads().get(&key.workload) else { continue };
        let draining =
            state.nodes().get(&a.node).is_some_and(|n| n.schedulable == Schedulable::Draining);
        // A workload may wait a while for a dead node to come back (not for one that left).
        let patience =
            w.spec.reschedule_after_secs.map_or(Duration::ZERO, |s| Duration::from_secs(s.into()));
        let waiting = dead_for.get(a.node.as_str()).is_some_and(|d| *d < patience);
        let healthy = !draining
            && cluster.node(&a.node).is_some_and(|n| n.liveness != Liveness::Dead || waiting);
        let id = ReplicaId::new(&Arc::from(key.workload.as_str()), key.index);
        if !healthy || cluster.assign(id, &a.node, w.spec.requests, w.spec.priority).is_err() {
            unset.insert(key.clone());
        }
    }
    (cluster, unset)
}

/// One round of the leader's reconciliation.
pub fn round(state: &State, seen: &[Seen], scheduler: &Scheduler) -> Round {
    let (mut cluster, mut unset) = occupied(state, seen);
    let mut order: Vec<(&String, &cloudless_consensus::state::WorkloadRecord)> =
        state.workloads().iter().collect();
    // Higher priority first, then by name, so every leader decides alike.
    order.sort_by(|a, b| b.1.spec.priority.cmp(&a.1.spec.priority).then(a.0.cmp(b.0)));
    let mut set: Vec<(ReplicaKey, String)> = Vec::new();
    let mut result = Round::default();
    for (name, record) in order {
        let w = workload(name, &record.spec);
        let missing: Vec<ReplicaId> = (0..record.spec.replicas)
            .map(|i| ReplicaId::new(&w.id, i))
            .filter(|r| cluster.placement(r).is_none())
            .collect();
        if missing.is_empty() {
            continue;
        }
        let decision = scheduler.place(&cluster, &w, &missing);
        for p in &decision.preemptions {
            for v in &p.victims {
                unset.insert(ReplicaKey { workload: v.workload.to_string(), index: v.index });
            }
        }
        for p in &decision.placements {
            let key = ReplicaKey { workload: name.clone(), index: p.replica.index };
            unset.remove(&key);
            set.push((key, p.node.to_string()));
        }
        if let Some(why) = &decision.unschedulable {
            result.unschedulable.insert(name.clone(), why.to_string());
        }
        // Later workloads see these placements; a failure here only means a victim is gone.
        let _ = decision.apply(&mut cluster, &w);
    }
    result.placed = set.len();
    if !set.is_empty() || !unset.is_empty() {
        result.command = Some(Command::Assign {
            epoch: state.epoch() + 1,
            set,
            unset: unset.into_iter().collect(),
        });
    }
    result
}

#[cfg(test)]
mod tests;
