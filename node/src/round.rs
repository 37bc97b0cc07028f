//! What the raft leader decides each round, as a pure function of committed state, this
//! node's view of the pool and the clock: the scheduler's plans, turned into one `Assign`
//! command. Every move of a replica comes from a plan.
//!
//! ```text
//!   State (enrolled nodes, workloads, assignments) ─┐
//!   View (liveness, capacity, directory per peer) ──┼─▶ occupied: sched::Cluster with every
//!                                                   │   assignment; replicas on unknown,
//!                                                   │   revoked or non-worker nodes: Stop
//!   nodes dead past a workload's patience, or left ─┴─▶ plan_node_lost ─▶ Start elsewhere
//!   draining nodes ──▶ plan_drain ─▶ Move (start new, then stop old; min-available kept)
//!   every workload, by priority ──▶ plan_scale ─▶ Start missing │ Stop surplus
//!   moved replicas whose replacement runs, or whose origin is gone ──▶ Release
//!                                     ──▶ Command::Assign { epoch + 1, changes }
//! ```
//!
//! A suspect node keeps its replicas (a disconnected node keeps running its work); a node
//! declared dead keeps them for as long as each workload's `reschedule_after_secs` says. A
//! cordoned node gets no new replicas; a draining one also loses the ones it runs, each only
//! once its replacement runs, and never below a workload's min-available while it keeps the
//! replicas that cannot move anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_api::{Change, Command, NodeRole, Schedulable};
use cloudless_consensus::state::{State, WorkloadRecord};
use cloudless_mesh::membership;
use cloudless_sched::model::{Cluster, Liveness, Node, ReplicaId as SchedReplica, Workload};
use cloudless_sched::{Plan, Scheduler, Step};
use cloudless_types::{
    Image, NodeName, ReplicaId, ReplicaPhase, Resources, Runtime, Runtimes, WorkloadName,
    WorkloadSpec,
};

use crate::view::View;

/// The outcome of a round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// The command to commit, when anything changes.
    pub command: Option<Command>,
    /// Workloads with replicas that fit nowhere or a drain held back, and why.
    pub unschedulable: BTreeMap<WorkloadName, String>,
    /// Replicas placed that had no node.
    pub placed: usize,
    /// Replicas given a new node (moved off a draining node, or off a lost one).
    pub moved: usize,
    /// When the round must run again although its inputs (state, view) stay the same: the
    /// only input that changes by itself is time, through a dead node's patience.
    pub wake_at: Option<Instant>,
}

fn liveness(s: membership::State) -> Liveness {
    match s {
        membership::State::Alive => Liveness::Alive,
        membership::State::Suspect => Liveness::Suspect,
        membership::State::Dead | membership::State::Left => Liveness::Dead,
    }
}

/// The scheduler's id of a replica (its one conversion from the vocabulary).
pub fn sched_id(r: &ReplicaId) -> SchedReplica {
    SchedReplica::new(&Arc::from(r.workload.as_str()), r.index)
}

/// The vocabulary's id of a scheduler replica (the way back; `None` only for a name the
/// scheduler did not get from us).
fn replica_id(r: &SchedReplica) -> Option<ReplicaId> {
    Some(ReplicaId { workload: WorkloadName::new(&*r.workload).ok()?, index: r.index })
}

/// The scheduler's view of the pool: enrolled, unrevoked workers that the membership knows
/// and whose capacity is known.
pub fn cluster_view(state: &State, view: &View) -> Cluster {
    let mut cluster = Cluster::new();
    for (name, s) in &view.peers {
        let Some(record) = state.nodes().get(name) else { continue };
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
        let mut node = Node::new(name.as_str(), allocatable);
        node.labels = d.labels.clone();
        node.labels.extend(record.labels.clone());
        node.zone = d.zone.clone();
        node.region = d.region.clone();
        node.max_replicas = d.max_replicas.unwrap_or(u32::MAX);
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
        node.draining = record.schedulable == Schedulable::Draining;
        // A node listed twice keeps its first entry.
        let _ = cluster.add_node(node);
    }
    cluster
}

/// The scheduler's model of a workload.
pub fn workload(spec: &WorkloadSpec) -> Workload {
    let runtime = match spec.image {
        Image::Container(_) => Runtime::Container,
        Image::Wasi(_) => Runtime::Wasi,
    };
    let mut w = Workload::new(spec.name.as_str(), runtime, spec.requests, spec.replicas);
    w.priority = spec.priority;
    w.min_available = spec.min_available;
    w.placement = spec.placement.clone();
    w
}

/// Where the replicas are now, as the scheduler sees it.
pub struct Occupied {
    /// The scheduler's view with every assignment whose node it knows.
    pub cluster: Cluster,
    /// Replicas on nodes it does not know (unknown, revoked, not workers, no capacity): they
    /// lose their node and are placed again.
    pub homeless: Vec<ReplicaId>,
    /// Nodes that lost their replicas for good (dead past a workload's patience, or left),
    /// with the replicas that must leave each.
    pub lost: BTreeMap<NodeName, Vec<ReplicaId>>,
    /// When a dead node's replicas are next due to leave it (a workload's patience runs
    /// out): the round must run again then, although nothing else changes.
    pub wake_at: Option<Instant>,
}

/// Every assignment in the scheduler's view, and which replicas must find a new node.
pub fn occupied(state: &State, view: &View, now: Instant) -> Occupied {
    let mut cluster = cluster_view(state, view);
    let mut homeless = Vec::new();
    let mut lost: BTreeMap<NodeName, Vec<ReplicaId>> = BTreeMap::new();
    let mut wake_at: Option<Instant> = None;
    for (r, a) in state.assignments() {
        let Some(w) = state.workloads().get(&r.workload) else { continue };
        if cluster.node(a.node.as_str()).is_none() {
            homeless.push(r.clone());
            continue;
        }
        // Known to the cluster, so the assignment holds (it only fails for an unknown node
        // or a replica counted twice).
        let _ = cluster.assign(sched_id(r), a.node.as_str(), w.spec.requests, w.spec.priority);
        let Some(seen) = view.get(&a.node) else { continue };
        // A workload may wait a while for a dead node to come back (not for one that left).
        let patience =
            w.spec.reschedule_after_secs.map_or(Duration::ZERO, |s| Duration::from_secs(s.into()));
        let gone = match seen.state {
            membership::State::Left => true,
            membership::State::Dead => seen.down_for(now) >= patience,
            _ => false,
        };
        if gone {
            lost.entry(a.node.clone()).or_default().push(r.clone());
        } else if seen.state == membership::State::Dead {
            let due = now + patience.saturating_sub(seen.down_for(now));
            wake_at = Some(wake_at.map_or(due, |w| w.min(due)));
        }
    }
    Occupied { cluster, homeless, lost, wake_at }
}

/// Everything a round needs to know about the workloads, in the scheduler's terms.
struct Workloads<'a> {
    models: BTreeMap<Arc<str>, Workload>,
    records: &'a BTreeMap<WorkloadName, WorkloadRecord>,
}

impl Workloads<'_> {
    fn get(&self, name: &str) -> Option<&Workload> {
        self.models.get(name)
    }
}

/// Turns a plan into changes and records in `round` what it did.
struct Builder<'a> {
    state: &'a State,
    changes: Vec<Change>,
    round: Round,
}

impl Builder<'_> {
    fn host(&self, r: &ReplicaId) -> Option<&NodeName> {
        self.state.assignments().get(r).map(|a| &a.node)
    }

    fn stop(&mut self, r: ReplicaId) {
        self.changes.push(Change::Stop { replica: r });
    }

    /// Sends a moving replica back to the origin that still runs it.
    fn revert(&mut self, cluster: &mut Cluster, r: ReplicaId, from: NodeName) {
        if let Some(w) = self.state.workloads().get(&r.workload) {
            let _ = cluster.assign(sched_id(&r), from.as_str(), w.spec.requests, w.spec.priority);
        }
        self.round.moved += 1;
        self.changes.push(Change::Start { replica: r, node: from });
    }

    fn take(&mut self, plan: &Plan, held_back: impl Fn(&str) -> String) {
        for step in &plan.steps {
            match step {
                Step::Start { replica, node } => {
                    let (Some(r), Ok(node)) = (replica_id(replica), NodeName::new(&**node)) else {
                        continue;
                    };
                    if self.host(&r).is_some() {
                        self.round.moved += 1;
                    } else {
                        self.round.placed += 1;
                    }
                    self.changes.push(Change::Start { replica: r, node });
                }
                Step::Move { replica, from, to } => {
                    let (Some(r), Ok(from), Ok(to)) =
                        (replica_id(replica), NodeName::new(&**from), NodeName::new(&**to))
                    else {
                        continue;
                    };
                    self.round.moved += 1;
                    self.changes.push(Change::Move { replica: r, from, to });
                }
                Step::Stop { replica, .. } => {
                    if let Some(r) = replica_id(replica) {
                        self.stop(r);
                    }
                }
                Step::Evict { victims, .. } => {
                    for v in victims.iter().filter_map(replica_id) {
                        self.stop(v);
                    }
                }
            }
        }
        for (r, why) in &plan.unplaced {
            if let Ok(name) = WorkloadName::new(&*r.workload) {
                self.round.unschedulable.entry(name).or_insert_with(|| why.to_string());
            }
        }
        for (r, why) in &plan.blocked {
            if let Ok(name) = WorkloadName::new(&*r.workload) {
                self.round.unschedulable.entry(name).or_insert_with(|| held_back(why));
            }
        }
    }
}

/// Keeps a drain plan's stops only while each workload keeps at least its min-available
/// replicas running and ready; the others are held back like replicas with no other home.
fn keep_ready(state: &State, plan: Plan) -> Plan {
    let mut ready: BTreeMap<&WorkloadName, usize> = BTreeMap::new();
    let is_ready = |r: &ReplicaId| {
        state.assignments().get(r).is_some_and(|a| {
            state.statuses().get(r).is_some_and(|st| {
                st.node == a.node && matches!(st.phase, ReplicaPhase::Running { ready: true })
            })
        })
    };
    for r in state.assignments().keys() {
        if is_ready(r) {
            *ready.entry(&r.workload).or_default() += 1;
        }
    }
    let Plan { steps, unplaced, mut blocked } = plan;
    let mut kept = Vec::with_capacity(steps.len());
    for step in steps {
        let Step::Stop { replica, .. } = &step else {
            kept.push(step);
            continue;
        };
        let Some(r) = replica_id(replica) else { continue };
        let min = state.workloads().get(&r.workload).map_or(0, |w| w.spec.min_available);
        let count = ready.get(&r.workload).copied().unwrap_or(0);
        let after = if is_ready(&r) { count.saturating_sub(1) } else { count };
        if after >= min as usize {
            if let Some(c) = ready.get_mut(&r.workload) {
                *c = after;
            }
            kept.push(step);
        } else {
            blocked.push((
                replica.clone(),
                format!(
                    "no other node can take it and stopping it would leave {after} ready, below \
                     min-available {min}"
                ),
            ));
        }
    }
    Plan { steps: kept, unplaced, blocked }
}

/// One round of the leader's reconciliation.
pub fn round(state: &State, view: &View, scheduler: &Scheduler, now: Instant) -> Round {
    let Occupied { mut cluster, homeless, lost, wake_at } = occupied(state, view, now);
    let workloads = Workloads {
        models: state
            .workloads()
            .iter()
            .map(|(name, w)| (Arc::from(name.as_str()), workload(&w.spec)))
            .collect(),
        records: state.workloads(),
    };
    let lookup = |name: &str| workloads.get(name);
    let mut b =
        Builder { state, changes: Vec::new(), round: Round { wake_at, ..Round::default() } };

    // A replica that was moving to a node that is now gone goes back to its origin, which
    // still runs it, when the origin is healthy.
    let origin = |r: &ReplicaId, cluster: &Cluster| -> Option<NodeName> {
        let from = state.assignments().get(r)?.from.clone()?;
        cluster.node(from.as_str()).filter(|n| n.liveness == Liveness::Alive).map(|_| from)
    };

    // Replicas whose node the scheduler does not know lose it; the scale plans below place
    // them again.
    for r in homeless {
        match origin(&r, &cluster) {
            Some(from) => b.revert(&mut cluster, r, from),
            None => b.stop(r),
        }
    }

    // Nodes lost for good: their replicas start elsewhere (those a workload still waits for
    // stay where they are; those moving to it go back where they came from).
    for (node, leaving) in &lost {
        let mut rehome = Vec::new();
        for r in leaving {
            match origin(r, &cluster) {
                Some(from) => {
                    cluster.unassign(&sched_id(r));
                    b.revert(&mut cluster, r.clone(), from);
                }
                None => rehome.push(r.clone()),
            }
        }
        let leaving = &rehome;
        let all = cluster.replicas_on(node.as_str()).len();
        let waiting: Vec<SchedReplica> = if leaving.len() < all {
            let leaving: BTreeSet<SchedReplica> = leaving.iter().map(sched_id).collect();
            cluster
                .replicas_on(node.as_str())
                .iter()
                .filter(|r| !leaving.contains(*r))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let copy;
        let from = if waiting.is_empty() {
            &cluster
        } else {
            let mut c = cluster.clone();
            for r in &waiting {
                c.unassign(r);
            }
            copy = c;
            &copy
        };
        let Ok(plan) = scheduler.plan_node_lost(from, node.as_str(), lookup) else { continue };
        for r in leaving {
            cluster.unassign(&sched_id(r));
        }
        // Replicas of the lost node that found no home lose it too.
        for (r, _) in &plan.unplaced {
            if let Some(r) = replica_id(r) {
                b.stop(r);
            }
        }
        let _ = plan.apply(&mut cluster, lookup);
        b.take(&plan, |why| why.to_string());
    }

    // Draining nodes: every replica moves, start before stop, min-available kept.
    let draining: Vec<&NodeName> = state
        .nodes()
        .iter()
        .filter(|(n, r)| r.schedulable == Schedulable::Draining && !lost.contains_key(*n))
        .map(|(n, _)| n)
        .collect();
    for node in draining {
        if cluster.replicas_on(node.as_str()).is_empty() {
            continue;
        }
        // A replica still moving here is left out: its origin may be the only node that runs
        // it, and it moves again once it is released.
        let moving: Vec<SchedReplica> = state
            .assignments()
            .iter()
            .filter(|(_, a)| a.node == *node && a.from.is_some())
            .map(|(r, _)| sched_id(r))
            .collect();
        let copy;
        let from = if moving.is_empty() {
            &cluster
        } else {
            let mut c = cluster.clone();
            for r in &moving {
                c.unassign(r);
            }
            copy = c;
            &copy
        };
        let Ok(plan) = scheduler.plan_drain(from, node.as_str(), lookup) else { continue };
        // The scheduler counts assigned replicas towards min-available; only the ones that
        // run and are ready keep a workload available, so a stop must leave enough of those.
        let plan = keep_ready(state, plan);
        let _ = plan.apply(&mut cluster, lookup);
        b.take(&plan, |why| format!("the drain of {node} is held back: {why}"));
    }

    // Every workload at its desired count: higher priority first, then by name, so every
    // leader decides alike.
    let mut order: Vec<(&WorkloadName, &WorkloadRecord)> = workloads.records.iter().collect();
    order.sort_by(|a, b| b.1.spec.priority.cmp(&a.1.spec.priority).then(a.0.cmp(b.0)));
    for (name, record) in order {
        let Some(w) = workloads.get(name.as_str()) else { continue };
        let plan = scheduler.plan_scale(&cluster, w, record.spec.replicas);
        if plan.is_empty() && plan.unplaced.is_empty() {
            continue;
        }
        // Later workloads see these placements; a failure here only means a victim is gone.
        let _ = plan.apply(&mut cluster, lookup);
        b.take(&plan, |why| why.to_string());
    }

    // Moves whose replacement runs (or whose origin is gone) end: the origin stops its copy.
    let changed: BTreeSet<ReplicaId> = b.changes.iter().map(|c| c.replica().clone()).collect();
    for (r, a) in state.assignments() {
        let Some(from) = &a.from else { continue };
        if changed.contains(r) {
            continue;
        }
        let replaced = state.statuses().get(r).is_some_and(|s| {
            s.node == a.node
                && matches!(
                    s.phase,
                    ReplicaPhase::Running { ready: true } | ReplicaPhase::Succeeded
                )
        });
        let origin_gone = view
            .get(from)
            .is_none_or(|s| matches!(s.state, membership::State::Dead | membership::State::Left))
            || !state.is_member(from);
        if replaced || origin_gone {
            b.changes.push(Change::Release { replica: r.clone() });
        }
    }

    let Builder { changes, mut round, .. } = b;
    if !changes.is_empty() {
        round.command = Some(Command::Assign { epoch: state.epoch() + 1, changes });
    }
    round
}

#[cfg(test)]
mod tests;
