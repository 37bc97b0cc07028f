//! Plans for change: a node died or is being drained, a workload is scaled. A plan is a list
//! of steps computed on a copy of the cluster view, so computing one is always a dry run;
//! [`Plan::apply`] records it in the view once the leader commits it.
//!
//! ```text
//!  dead node  ─▶ its replicas, highest priority first ─▶ place elsewhere ─▶ Start steps
//!  drain      ─▶ each replica: place a replacement ─▶ Move (start new, then stop old)
//!                no room: Stop if min-available allows, else Blocked
//!  scale up   ─▶ place the new replicas ─▶ Start steps
//!  scale down ─▶ choose victims (unhealthy nodes, fullest domain, least reliable) ─▶ Stop
//! ```

use std::collections::BTreeMap;
use std::fmt;

use cloudless_types::Topology;

use crate::filter::Unschedulable;
use crate::model::{Cluster, ClusterError, Liveness, NodeId, ReplicaId, Workload, WorkloadId};
use crate::place::{Preemption, Scheduler};
use crate::score;

/// One step of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Start `replica` on `node`.
    Start {
        /// The replica.
        replica: ReplicaId,
        /// Where.
        node: NodeId,
    },
    /// Start `replica` on `to`, and once it runs, stop it on `from`: the workload never has
    /// fewer replicas running than before.
    Move {
        /// The replica.
        replica: ReplicaId,
        /// Where it runs now.
        from: NodeId,
        /// Where it goes.
        to: NodeId,
    },
    /// Stop `replica` on `node`.
    Stop {
        /// The replica.
        replica: ReplicaId,
        /// Where it runs.
        node: NodeId,
    },
    /// Evict lower-priority replicas from `node` to make room (they become unplaced).
    Evict {
        /// The replicas evicted.
        victims: Vec<ReplicaId>,
        /// From where.
        node: NodeId,
        /// For which replica.
        by: ReplicaId,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Start { replica, node } => write!(f, "start {replica} on {node}"),
            Step::Move { replica, from, to } => write!(f, "move {replica} from {from} to {to}"),
            Step::Stop { replica, node } => write!(f, "stop {replica} on {node}"),
            Step::Evict { victims, node, by } => {
                let names: Vec<String> = victims.iter().map(ToString::to_string).collect();
                write!(f, "evict {} from {node} for {by}", names.join(", "))
            }
        }
    }
}

/// What a change needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Replicas for which no node was found, and why.
    pub unplaced: Vec<(ReplicaId, Unschedulable)>,
    /// Replicas left where they are because moving them was impossible and stopping them
    /// would break their workload's min-available.
    pub blocked: Vec<(ReplicaId, String)>,
}

impl Plan {
    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Records the plan in the view: starts and moves assign, stops and evictions unassign.
    /// `workload` looks up a workload's resources and priority by name.
    pub fn apply<'a>(
        &self,
        cluster: &mut Cluster,
        workload: impl Fn(&str) -> Option<&'a Workload>,
    ) -> Result<(), ClusterError> {
        for step in &self.steps {
            match step {
                Step::Start { replica, node } => {
                    if let Some(w) = workload(&replica.workload) {
                        cluster.assign(replica.clone(), node, w.resources, w.priority)?;
                    }
                }
                Step::Move { replica, to, .. } => {
                    let old = cluster.unassign(replica);
                    let (res, prio) = match (workload(&replica.workload), &old) {
                        (Some(w), _) => (w.resources, w.priority),
                        (None, Some(a)) => (a.resources, a.priority),
                        (None, None) => continue,
                    };
                    cluster.assign(replica.clone(), to, res, prio)?;
                }
                Step::Stop { replica, .. } => {
                    cluster.unassign(replica);
                }
                Step::Evict { victims, .. } => {
                    for v in victims {
                        cluster.unassign(v);
                    }
                }
            }
        }
        Ok(())
    }

    fn push_decision(
        &mut self,
        d: &crate::place::Decision,
        moves: Option<&BTreeMap<ReplicaId, NodeId>>,
    ) {
        for Preemption { replica, node, victims } in &d.preemptions {
            self.steps.push(Step::Evict {
                victims: victims.clone(),
                node: node.clone(),
                by: replica.clone(),
            });
        }
        for p in &d.placements {
            match moves.and_then(|m| m.get(&p.replica)) {
                Some(from) => self.steps.push(Step::Move {
                    replica: p.replica.clone(),
                    from: from.clone(),
                    to: p.node.clone(),
                }),
                None => self
                    .steps
                    .push(Step::Start { replica: p.replica.clone(), node: p.node.clone() }),
            }
        }
        if let Some(why) = &d.unschedulable {
            for r in &d.unplaced {
                self.unplaced.push((r.clone(), why.clone()));
            }
        }
    }
}

impl Scheduler {
    /// New homes for the replicas of a node that was declared dead. Higher-priority
    /// workloads are placed first. The view is not changed.
    pub fn plan_node_lost<'a>(
        &self,
        cluster: &Cluster,
        node: &str,
        workload: impl Fn(&str) -> Option<&'a Workload>,
    ) -> Result<Plan, ClusterError> {
        let mut c = cluster.clone();
        let orphans = c.remove_node(node)?;
        let order = by_priority(orphans.into_iter().map(|(r, _)| r), workload);
        let mut plan = Plan::default();
        for (w, replicas) in order {
            let d = self.place(&c, w, &replicas);
            d.apply(&mut c, w)?;
            plan.push_decision(&d, None);
        }
        Ok(plan)
    }

    /// Moves every replica off `node` so it can be drained, keeping each workload at or above
    /// its min-available: replacements start before the originals stop. A replica with no
    /// other home is stopped only if its workload can spare it. The view is not changed.
    pub fn plan_drain<'a>(
        &self,
        cluster: &Cluster,
        node: &str,
        workload: impl Fn(&str) -> Option<&'a Workload>,
    ) -> Result<Plan, ClusterError> {
        let mut c = cluster.clone();
        c.update_node(node, |n| n.draining = true)?;
        let from: NodeId = c
            .node(node)
            .map(|n| n.id.clone())
            .ok_or_else(|| ClusterError::UnknownNode(node.into()))?;
        let order = by_priority(c.replicas_on(node).to_vec(), workload);
        let mut plan = Plan::default();
        for (w, replicas) in order {
            // The replicas keep running where they are until their replacement runs, so they
            // are taken out of the view (their own node is draining and takes nothing).
            let moves: BTreeMap<ReplicaId, NodeId> =
                replicas.iter().map(|r| (r.clone(), from.clone())).collect();
            for r in &replicas {
                c.unassign(r);
            }
            let d = self.place(&c, w, &replicas);
            d.apply(&mut c, w)?;
            plan.push_decision(&d, Some(&moves));
            plan.unplaced.retain(|(r, _)| !d.unplaced.contains(r));
            let running = c.replicas_of(&w.id).count() as u32 + d.unplaced.len() as u32;
            let mut spare = running.saturating_sub(w.min_available);
            for r in &d.unplaced {
                if spare > 0 {
                    spare -= 1;
                    plan.steps.push(Step::Stop { replica: r.clone(), node: from.clone() });
                } else {
                    let why = d.unschedulable.as_ref().map(ToString::to_string).unwrap_or_default();
                    plan.blocked.push((
                        r.clone(),
                        format!("no other node can take it ({why}) and stopping it would leave {} of {} below min-available {}", running - 1, w.replicas, w.min_available),
                    ));
                    // It stays where it is.
                    c.assign(r.clone(), &from, w.resources, w.priority)?;
                }
            }
        }
        Ok(plan)
    }

    /// Brings `workload` to `target` replicas: new ones are placed (lowest free ordinals
    /// first); surplus ones are stopped, first those on unhealthy nodes, then from the domain
    /// holding the most, then on the least reliable and dearest nodes, then the highest
    /// ordinals. The view is not changed.
    pub fn plan_scale(&self, cluster: &Cluster, workload: &Workload, target: u32) -> Plan {
        let mut plan = Plan::default();
        let current: Vec<(ReplicaId, NodeId)> =
            cluster.replicas_of(&workload.id).map(|(r, a)| (r.clone(), a.node.clone())).collect();
        let have = current.len() as u32;
        if target > have {
            let used: std::collections::HashSet<u32> =
                current.iter().map(|(r, _)| r.index).collect();
            let new: Vec<ReplicaId> = (0..)
                .filter(|i| !used.contains(i))
                .take((target - have) as usize)
                .map(|i| ReplicaId::new(&workload.id, i))
                .collect();
            let d = self.place(cluster, workload, &new);
            plan.push_decision(&d, None);
        } else if target < have {
            let mut c = cluster.clone();
            for _ in 0..(have - target) {
                let Some((r, node)) = pick_surplus(&c, workload) else { break };
                c.unassign(&r);
                plan.steps.push(Step::Stop { replica: r, node });
            }
        }
        plan
    }
}

/// Replicas grouped by workload, highest priority first (then by name, for determinism);
/// replicas of unknown workloads are left out.
fn by_priority<'a>(
    replicas: impl IntoIterator<Item = ReplicaId>,
    workload: impl Fn(&str) -> Option<&'a Workload>,
) -> Vec<(&'a Workload, Vec<ReplicaId>)> {
    let mut by_workload: BTreeMap<WorkloadId, Vec<ReplicaId>> = BTreeMap::new();
    for r in replicas {
        by_workload.entry(r.workload.clone()).or_default().push(r);
    }
    let mut order: Vec<(&'a Workload, Vec<ReplicaId>)> =
        by_workload.into_iter().filter_map(|(id, rs)| workload(&id).map(|w| (w, rs))).collect();
    order.sort_by(|a, b| b.0.priority.cmp(&a.0.priority).then(a.0.id.cmp(&b.0.id)));
    order
}

/// The replica of `w` whose loss hurts least.
fn pick_surplus(c: &Cluster, w: &Workload) -> Option<(ReplicaId, NodeId)> {
    let spread = w.placement.spread.map_or(Topology::Zone, |s| s.topology);
    c.replicas_of(&w.id)
        .filter_map(|(r, a)| {
            let i = c.index_of(&a.node)?;
            let n = &c.nodes[i];
            let unhealthy = n.liveness != Liveness::Alive || n.draining || n.cordoned;
            let crowd = c.count_in(&w.id, i, spread);
            let rel = score::reliability(n);
            Some((
                (unhealthy, crowd, -(rel * 1000.0) as i64, (n.cost * 1000.0) as i64, r.index),
                r.clone(),
                a.node.clone(),
            ))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, r, n)| (r, n))
}
