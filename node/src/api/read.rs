//! What reads answer, as pure functions of committed state and this node's view of the pool.
//!
//! ```text
//!   &State + &View (+ raft's own figures) ──▶ ClusterStatus │ [NodeInfo] │ [WorkloadInfo] │
//!                                            explain lines │ assignments │ enrolled lists
//! ```
//!
//! Reads are answered from a member's applied state, without a round through the leader: a
//! CLI sees what that member knows, at most a heartbeat old.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use cloudless_api::node::{AssignedList, Assignment, EnrolledList};
use cloudless_api::user::{ClusterStatus, NodeInfo, ReplicaInfo, WorkloadInfo};
use cloudless_api::{ApiError, invite};
use cloudless_consensus::state::State;
use cloudless_mesh::membership;
use cloudless_sched::Scheduler;
use cloudless_types::{NodeName, ReplicaId, ReplicaPhase, WorkloadName};

use crate::facts::Unschedulable;
use crate::round;
use crate::view::View;

/// What raft itself says, beside the state.
#[derive(Clone, Debug, Default)]
pub struct Raft {
    /// The leader, if known.
    pub leader: Option<NodeName>,
    /// The voters.
    pub voters: Vec<NodeName>,
    /// The term.
    pub term: u64,
    /// The last applied index.
    pub applied: u64,
}

/// The word for a membership state.
pub fn state_word(s: membership::State) -> &'static str {
    match s {
        membership::State::Alive => "alive",
        membership::State::Suspect => "suspect",
        membership::State::Dead => "dead",
        membership::State::Left => "left",
    }
}

/// The cluster at a glance.
pub fn status(
    state: &State,
    raft: &Raft,
    view: &View,
    me: &NodeName,
) -> Result<ClusterStatus, ApiError> {
    let settings = state
        .settings()
        .ok_or_else(|| ApiError::unavailable("the cluster is not bootstrapped yet"))?;
    // Voters first (they are the steadiest devices), this node's own addresses among them.
    let mut bootstrap: Vec<String> = Vec::new();
    for v in &raft.voters {
        let addrs: Vec<String> = if v == me {
            view.listen.iter().map(ToString::to_string).collect()
        } else {
            view.get(v)
                .and_then(|s| s.descriptor.as_ref())
                .map(|d| d.addrs.clone())
                .unwrap_or_default()
        };
        for a in addrs.into_iter().filter(|a| !a.contains("/p2p-circuit")) {
            let full = if a.contains("/p2p/") { a } else { format!("{a}/p2p/{v}") };
            if bootstrap.len() < invite::MAX_BOOTSTRAP {
                bootstrap.push(full);
            }
        }
    }
    let running = state.statuses().iter().filter(|(r, st)| {
        st.phase.is_running() && state.assignments().get(*r).is_some_and(|a| a.node == st.node)
    });
    Ok(ClusterStatus {
        name: settings.name.clone(),
        root_key: cloudless_types::hex(&settings.root_key),
        leader: raft.leader.clone(),
        voters: raft.voters.clone(),
        term: raft.term,
        applied: raft.applied,
        nodes: count(state.nodes().values().filter(|n| !n.revoked)),
        alive: u32::try_from(view.count(membership::State::Alive)).unwrap_or(u32::MAX),
        workloads: u32::try_from(state.workloads().len()).unwrap_or(u32::MAX),
        replicas: state.workloads().values().fold(0u32, |n, w| n.saturating_add(w.spec.replicas)),
        running: count(running),
        bootstrap,
    })
}

fn count<T>(it: impl Iterator<Item = T>) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

/// Every enrolled node with what this node's view says about it.
pub fn nodes(state: &State, view: &View, voters: &[NodeName]) -> Vec<NodeInfo> {
    // What each node's replicas request, in one pass over the assignments.
    let mut used: BTreeMap<&NodeName, (u32, u64, u32)> = BTreeMap::new();
    for (r, a) in state.assignments() {
        if let Some(w) = state.workloads().get(&r.workload) {
            let u = used.entry(&a.node).or_default();
            u.0 = u.0.saturating_add(w.spec.requests.cpu_millis);
            u.1 = u.1.saturating_add(u64::from(w.spec.requests.memory_mib));
            u.2 = u.2.saturating_add(1);
        }
    }
    state
        .nodes()
        .iter()
        .map(|(peer, rec)| {
            let seen = view.get(peer);
            let d = seen.and_then(|s| s.descriptor.clone()).unwrap_or_default();
            let (cpu, mem, replicas) = used.get(peer).copied().unwrap_or_default();
            let mut labels = d.labels.clone();
            labels.extend(rec.labels.clone());
            let capacity = seen.and_then(|s| s.capacity);
            NodeInfo {
                peer: peer.clone(),
                state: seen.map_or("unknown", |s| state_word(s.state)).into(),
                voter: voters.contains(peer),
                roles: rec.roles.iter().map(|r| r.as_str().to_string()).collect(),
                schedulable: rec.schedulable.as_str().into(),
                revoked: rec.revoked,
                labels,
                zone: d.zone.clone(),
                class: d.device_class.map(|c| c.as_str().to_string()),
                runtimes: d.runtimes.iter().map(|r| r.as_str().to_string()).collect(),
                cpu_millis: capacity.map_or(d.cpu_millis, |c| c.cpu_total_millis),
                memory_mib: u64::from(capacity.map_or(d.memory_mib, |c| c.memory_total_mib)),
                cpu_used_millis: cpu,
                memory_used_mib: mem,
                replicas,
                max_replicas: d.max_replicas,
                addresses: d.addrs.clone(),
            }
        })
        .collect()
}

/// One workload: its assigned replicas by ordinal, then a row for each replica not placed
/// (at the ordinals the leader would give them).
pub fn workload_info(
    state: &State,
    name: &WorkloadName,
    why: Option<String>,
) -> Option<WorkloadInfo> {
    let w = state.workloads().get(name)?;
    let mut replicas: Vec<ReplicaInfo> = state
        .assigned_of(name)
        .map(|(r, a)| {
            // Only the current host's report describes this run.
            let status = state.statuses().get(r).filter(|s| s.node == a.node);
            let (phase, ready, reason) = match status {
                None => ("pending", false, None),
                Some(s) => (
                    s.phase.word(),
                    matches!(s.phase, ReplicaPhase::Running { ready: true }),
                    s.phase.reason().map(str::to_string),
                ),
            };
            ReplicaInfo {
                index: r.index,
                node: Some(a.node.clone()),
                from: a.from.clone(),
                phase: phase.into(),
                ready,
                reason,
                restarts: status.map_or(0, |s| s.restarts),
            }
        })
        .collect();
    let used: BTreeSet<u32> = replicas.iter().map(|r| r.index).collect();
    let missing = (w.spec.replicas as usize).saturating_sub(replicas.len());
    replicas.extend((0..).filter(|i| !used.contains(i)).take(missing).map(|index| ReplicaInfo {
        index,
        node: None,
        from: None,
        phase: "unassigned".into(),
        ready: false,
        reason: None,
        restarts: 0,
    }));
    let running = count(replicas.iter().filter(|r| r.phase == "running"));
    Some(WorkloadInfo {
        spec: w.spec.clone(),
        version: w.version,
        running,
        replicas,
        unschedulable: why,
    })
}

/// Whether some workload has fewer replicas placed than it wants (reads then work out why).
pub fn any_unplaced(state: &State) -> bool {
    state.workloads().iter().any(|(n, w)| state.assigned_of(n).count() < w.spec.replicas as usize)
}

/// Every workload, or the one named.
pub fn workloads(
    state: &State,
    only: Option<&WorkloadName>,
    why: &Unschedulable,
) -> Result<Vec<WorkloadInfo>, ApiError> {
    let names: Vec<&WorkloadName> = match only {
        Some(n) => vec![n],
        None => state.workloads().keys().collect(),
    };
    let list: Vec<WorkloadInfo> =
        names.into_iter().filter_map(|n| workload_info(state, n, why.get(n).cloned())).collect();
    match only {
        Some(name) if list.is_empty() => {
            Err(ApiError::not_found(format!("no workload named {name}")))
        }
        _ => Ok(list),
    }
}

/// Why each replica of `name` is where it is, or why it is not placed.
pub fn explain(
    state: &State,
    view: &View,
    scheduler: &Scheduler,
    name: &WorkloadName,
    now: Instant,
) -> Option<Vec<String>> {
    let record = state.workloads().get(name)?;
    let cluster = round::occupied(state, view, now).cluster;
    let w = round::workload(&record.spec);
    let mut lines = Vec::new();
    for (r, a) in state.assigned_of(name) {
        match scheduler.explain_replica(&cluster, &w, &round::sched_id(r)) {
            Some(Ok(e)) => lines.push(format!("{r} on {e}")),
            Some(Err(reason)) => {
                lines.push(format!("{r} on {}, which would now be refused: {reason}", a.node))
            }
            None => lines.push(format!("{r} on {}, which the scheduler does not know", a.node)),
        }
        if let Some(from) = &a.from {
            lines.push(format!("  moving from {from}, which runs it until this one does"));
        }
    }
    let unplaced = (record.spec.replicas as usize).saturating_sub(state.assigned_of(name).count());
    if unplaced > 0 {
        let ranking = scheduler.rank(&cluster, &w, 3);
        match ranking.unschedulable {
            Some(why) => lines.push(format!("{unplaced} replica(s) not placed: {why}")),
            None => {
                lines.push(format!("{unplaced} replica(s) not placed yet; best candidates:"));
                lines.extend(ranking.candidates.iter().map(|c| format!("  {c}")));
            }
        }
    }
    Some(lines)
}

/// The replicas `node` should run, unless it holds the list of generation `known` or newer
/// (then only the generation: "not modified", and the read costs one lookup).
pub fn assigned_since(state: &State, node: &NodeName, known: Option<u64>) -> AssignedList {
    let generation = state.assignments_generation(node);
    let assignments = match known {
        Some(k) if k >= generation => None,
        _ => Some(assigned(state, node)),
    };
    AssignedList { generation, assignments }
}

/// The replicas `node` should run, grouped by workload, with their specs.
pub fn assigned(state: &State, node: &NodeName) -> Vec<Assignment> {
    let mut by: BTreeMap<&WorkloadName, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
    for (r, a) in state.runs_on(node) {
        let entry = by.entry(&r.workload).or_default();
        entry.0.push(r.index);
        if a.node != *node {
            entry.1.push(r.index);
        }
    }
    by.into_iter()
        .filter_map(|(name, (indexes, leaving))| {
            let spec = state.workloads().get(name)?.spec.clone();
            Some(Assignment { spec, indexes, leaving })
        })
        .collect()
}

/// Who is enrolled, who is revoked, who votes and who learns: the changes after generation
/// `known`, or everything when the caller holds nothing (or more than this state knows:
/// this member lags, or the state was recovered). The voters and learners are always whole.
pub fn enrolled(
    state: &State,
    known: Option<u64>,
    voters: Vec<NodeName>,
    learners: Vec<NodeName>,
) -> EnrolledList {
    let generation = state.gate_generation();
    let since = known.filter(|k| *k <= generation);
    let changed: Vec<(&NodeName, &cloudless_consensus::state::NodeRecord)> = match since {
        Some(k) => state.gate_changed_since(k).collect(),
        None => state.nodes().iter().collect(),
    };
    let (revoked, nodes): (Vec<_>, Vec<_>) = changed.into_iter().partition(|(_, n)| n.revoked);
    let names = |v: Vec<(&NodeName, _)>| v.into_iter().map(|(p, _)| p.clone()).collect();
    EnrolledList {
        generation,
        whole: since.is_none(),
        nodes: names(nodes),
        revoked: names(revoked),
        voters,
        learners,
    }
}

/// The replicas this list names.
pub fn replicas(list: &[Assignment]) -> impl Iterator<Item = ReplicaId> + '_ {
    list.iter().flat_map(|a| a.indexes.iter().map(|i| ReplicaId::new(&a.spec.name, *i)))
}
