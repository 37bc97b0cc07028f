//! Placing replicas: filter, score, choose, account, repeat; preempt when nothing fits.
//!
//! ```text
//!  static pass over every node (once per decision)
//!    filters ─▶ verdict per node ─▶ candidates ─▶ static score parts ─▶ max-heap
//!  for each replica
//!    pop best ─▶ stale? skip │ dynamic filters fail? drop (or park, for spread skew)
//!              score dropped? push back │ otherwise place: account resources and counts,
//!              push the node back with its new score
//!    heap empty ─▶ preemption: the node whose lower-priority victims are cheapest to evict
//!                └▶ nothing ─▶ Unschedulable: nodes counted by the first filter they fail
//! ```
//!
//! A decision costs one pass over the nodes plus `O(log n)` per replica, so a batch of ten
//! thousand replicas costs little more than one. Ties are broken by a seeded hash of the node
//! name, so the same input always gives the same decision.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use cloudless_types::{Resources, Spread, Topology};

use crate::filter::{
    Admission, AllowAll, Labels, Reason, Unschedulable, own_terms, resource_verdict, static_verdict,
};
use crate::model::{Cluster, ClusterError, NodeId, ReplicaId, Workload};
use crate::score::{self, Explanation, Factor, FactorScore, Weights, WeightsError};

/// Scheduler settings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Config {
    /// Factor weights.
    pub weights: Weights,
    /// Seed for tie-breaks: the same seed and input give the same decision.
    pub seed: u64,
}

/// Places replicas. Cheap to clone; holds no cluster state.
#[derive(Clone)]
pub struct Scheduler {
    config: Config,
    admission: Arc<dyn Admission>,
}

/// A replica and the node chosen for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    /// The replica.
    pub replica: ReplicaId,
    /// Its node.
    pub node: NodeId,
    /// The node's score when it was chosen.
    pub score: f64,
}

/// A replica that only fit after evicting lower-priority ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Preemption {
    /// The replica placed.
    pub replica: ReplicaId,
    /// Where.
    pub node: NodeId,
    /// What it evicts, all of lower priority.
    pub victims: Vec<ReplicaId>,
}

/// The outcome of placing a workload's replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The workload.
    pub workload: Arc<str>,
    /// Every replica placed, preempting ones included.
    pub placements: Vec<Placed>,
    /// Placements that evict other replicas.
    pub preemptions: Vec<Preemption>,
    /// Replicas that fit nowhere.
    pub unplaced: Vec<ReplicaId>,
    /// Why they fit nowhere.
    pub unschedulable: Option<Unschedulable>,
}

impl Decision {
    /// Records the decision in the cluster view: evicts the victims and assigns the replicas.
    pub fn apply(&self, cluster: &mut Cluster, workload: &Workload) -> Result<(), ClusterError> {
        for p in &self.preemptions {
            for v in &p.victims {
                cluster.unassign(v);
            }
        }
        for p in &self.placements {
            cluster.assign(p.replica.clone(), &p.node, workload.resources, workload.priority)?;
        }
        Ok(())
    }
}

/// The best candidates for a workload, explained, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// Candidates, best first.
    pub candidates: Vec<Explanation>,
    /// Why no node fits, when none does.
    pub unschedulable: Option<Unschedulable>,
}

impl Scheduler {
    /// A scheduler with `config` and no admission policy.
    pub fn new(config: Config) -> Result<Self, WeightsError> {
        Self::with_admission(config, Arc::new(AllowAll))
    }

    /// A scheduler with an admission policy.
    pub fn with_admission(
        config: Config,
        admission: Arc<dyn Admission>,
    ) -> Result<Self, WeightsError> {
        config.weights.validate()?;
        Ok(Scheduler { config, admission })
    }

    /// Its settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Finds nodes for `replicas` of `workload`, accounting capacity as it goes. The cluster
    /// view is not changed (this is also the dry run); [`Decision::apply`] records the result.
    /// Replicas already placed in the view are left out.
    pub fn place(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        replicas: &[ReplicaId],
    ) -> Decision {
        let mut b = Batch::new(self, cluster, workload);
        let mut d = Decision {
            workload: workload.id.clone(),
            placements: Vec::new(),
            preemptions: Vec::new(),
            unplaced: Vec::new(),
            unschedulable: None,
        };
        let mut exhausted = false;
        for r in replicas {
            if cluster.placement(r).is_some() {
                continue;
            }
            if !exhausted {
                if let Some(i) = b.next_node() {
                    let score = b.score(i);
                    b.commit(i);
                    d.placements.push(Placed {
                        replica: r.clone(),
                        node: cluster.nodes[i].id.clone(),
                        score,
                    });
                    continue;
                }
                if let Some((i, victims)) = b.preempt() {
                    let score = b.score(i);
                    b.commit(i);
                    let node = cluster.nodes[i].id.clone();
                    d.placements.push(Placed { replica: r.clone(), node: node.clone(), score });
                    d.preemptions.push(Preemption { replica: r.clone(), node, victims });
                    continue;
                }
                exhausted = true;
                d.unschedulable = Some(b.report());
            }
            d.unplaced.push(r.clone());
        }
        d
    }

    /// The `limit` best nodes for one more replica of `workload`, each with its factor
    /// breakdown, or why none fits.
    pub fn rank(&self, cluster: &Cluster, workload: &Workload, limit: usize) -> Ranking {
        let mut b = Batch::new(self, cluster, workload);
        let mut candidates = Vec::new();
        while candidates.len() < limit {
            let Some(i) = b.next_node() else { break };
            candidates.push(b.explain(i));
            b.dead[i] = true;
        }
        let unschedulable =
            candidates.is_empty().then(|| Batch::new(self, cluster, workload).report());
        Ranking { candidates, unschedulable }
    }

    /// Why `replica` runs where it does: its node's score and factors as if the replica were
    /// not there yet. `None` when the replica is not placed.
    pub fn explain_replica(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        replica: &ReplicaId,
    ) -> Option<Result<Explanation, Reason>> {
        let node = cluster.placement(replica)?.node.clone();
        let mut without = cluster.clone();
        without.unassign(replica);
        self.explain(&without, workload, &node)
    }

    /// Whether `node` could take one more replica of `workload` and how it scores, or the
    /// first filter it fails; `None` when the view has no such node.
    pub fn explain(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        node: &str,
    ) -> Option<Result<Explanation, Reason>> {
        let i = cluster.index_of(node)?;
        let b = Batch::new(self, cluster, workload);
        if let Some(r) = &b.verdicts[i] {
            return Some(Err(r.clone()));
        }
        Some(b.dynamic_verdict(i, true).map(|()| b.explain(i)))
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    score: f64,
    tie: u64,
    i: usize,
    version: u32,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then(self.tie.cmp(&o.tie))
            .then(o.i.cmp(&self.i))
            .then(self.version.cmp(&o.version))
    }
}

/// Static score parts of a candidate node (small: one per node per decision).
#[derive(Clone, Copy, Debug, Default)]
struct Static {
    /// Weighted reliability + cost + network.
    weighted: f64,
    /// Satisfied weight of preferred terms about other workloads and node labels.
    satisfied: f64,
    /// Soft-taint penalty.
    penalty: f64,
    tie: u64,
}

/// The working state of one decision.
struct Batch<'a> {
    c: &'a Cluster,
    w: &'a Workload,
    weights: Weights,
    wsum: f64,
    verdicts: Vec<Option<Reason>>,
    statics: Vec<Static>,
    pref_weight: f64,
    own_anti: Vec<Topology>,
    own_aff: Vec<Topology>,
    own_pref_aff: Vec<(f64, Topology)>,
    own_pref_anti: Vec<(f64, Topology)>,
    spread: Option<Spread>,
    /// Per node: resources added by this decision (dense: a pass reads every node).
    extra: Vec<Resources>,
    /// Per node: replicas this decision evicted.
    evicted_on: Vec<u32>,
    /// Per node: resources freed by this decision's evictions.
    freed: Vec<Resources>,
    /// Per node: replicas of this workload added by this decision.
    own_node: Vec<u32>,
    /// Replicas of this workload per zone and per region, existing and added (dense).
    zone_count: Vec<u32>,
    region_count: Vec<u32>,
    /// Replicas of this workload before this decision.
    base_total: u32,
    own_new: u32,
    evicted: HashSet<ReplicaId>,
    heap: BinaryHeap<Entry>,
    version: Vec<u32>,
    dead: Vec<bool>,
    /// Spread only: candidate nodes parked because their domain was over the skew.
    blocked: HashMap<u32, Vec<usize>>,
    /// Spread only: per domain, candidate nodes that could take one more replica.
    room: Vec<u32>,
}

impl<'a> Batch<'a> {
    fn new(s: &Scheduler, c: &'a Cluster, w: &'a Workload) -> Self {
        let n = c.nodes.len();
        let weights = s.config.weights;
        let p = &w.placement;
        let own_pref = |terms: &[(u32, cloudless_types::WorkloadTerm)]| -> Vec<(f64, Topology)> {
            terms
                .iter()
                .filter(|(_, t)| *t.workload == *w.id)
                .map(|(wt, t)| (f64::from(*wt), t.topology))
                .collect()
        };
        let mut b = Batch {
            c,
            w,
            weights,
            wsum: weights.sum(),
            verdicts: Vec::with_capacity(n),
            statics: vec![Static::default(); n],
            pref_weight: score::preference_weight(w),
            own_anti: own_terms(w, &p.anti_affinity),
            own_aff: own_terms(w, &p.affinity),
            own_pref_aff: own_pref(&p.preferred_affinity),
            own_pref_anti: own_pref(&p.preferred_anti_affinity),
            spread: p.spread,
            extra: vec![Resources::ZERO; n],
            freed: vec![Resources::ZERO; n],
            evicted_on: vec![0; n],
            own_node: vec![0; n],
            zone_count: vec![0; c.zone_count()],
            region_count: vec![0; c.region_count()],
            base_total: c.total_of(&w.id),
            own_new: 0,
            evicted: HashSet::new(),
            heap: BinaryHeap::new(),
            version: vec![0; n],
            dead: vec![false; n],
            blocked: HashMap::new(),
            room: vec![
                0;
                p.spread.map_or(0, |sp| if sp.topology == Topology::Region {
                    c.region_count()
                } else {
                    c.zone_count()
                })
            ],
        };
        if let Some(counts) = c.counts.get(&w.id) {
            for (d, n) in &counts.zone {
                b.zone_count[*d as usize] = *n;
            }
            for (d, n) in &counts.region {
                b.region_count[*d as usize] = *n;
            }
        }
        let admission = s.admission.as_ref();
        let labels = Labels::compile(c, w);
        // Costs are relative to the dearest node of the whole pool, so one pass suffices.
        let max_cost = f64::from(c.max_cost());
        let mut entries = Vec::new();
        for i in 0..n {
            let mut v = static_verdict(c, i, w, &labels, admission).err();
            if v.is_none()
                && let Some(sp) = b.spread
                && c.domain_of(i, sp.topology).is_none()
            {
                v = Some(if sp.topology == Topology::Region {
                    Reason::Region
                } else {
                    Reason::Zone
                });
            }
            if v.is_some() {
                b.verdicts.push(v);
                b.dead[i] = true;
                continue;
            }
            b.verdicts.push(None);
            let node = &c.nodes[i];
            let (satisfied, penalty) = score::locality_static(c, i, w, &labels);
            let weighted = weights.reliability * score::reliability(node)
                + weights.cost * score::cost(node, max_cost)
                + weights.network * score::network(node);
            b.statics[i] = Static {
                weighted,
                satisfied,
                penalty,
                tie: mix(s.config.seed, c.slots[i].id_hash),
            };
            if b.dynamic_verdict(i, false).is_err() {
                b.dead[i] = true;
                continue;
            }
            if let Some(sp) = b.spread
                && let Some(d) = c.domain_of(i, sp.topology)
            {
                b.room[d as usize] += 1;
            }
            entries.push(Entry { score: b.score(i), tie: b.statics[i].tie, i, version: 0 });
        }
        b.heap = BinaryHeap::from(entries);
        b
    }

    fn used(&self, i: usize) -> Resources {
        self.c.nodes[i].used.saturating_add(&self.extra[i]).saturating_sub(&self.freed[i])
    }

    fn free(&self, i: usize) -> Resources {
        self.c.nodes[i].allocatable.saturating_sub(&self.used(i))
    }

    /// Replicas node `i` runs with this batch's placements and evictions.
    fn replicas(&self, i: usize) -> u32 {
        let held = u32::try_from(self.c.slots[i].replicas.len()).unwrap_or(u32::MAX);
        held.saturating_add(self.own_node[i]).saturating_sub(self.evicted_on[i])
    }

    /// Whether node `i` may run one more replica once `evicting` of its replicas are gone.
    fn has_slot(&self, i: usize, evicting: usize) -> bool {
        let evicting = u32::try_from(evicting).unwrap_or(u32::MAX);
        self.replicas(i).saturating_sub(evicting) < self.c.nodes[i].max_replicas
    }

    /// Replicas of this workload within node `i`'s extent `t`, this batch included.
    fn own_count(&self, i: usize, t: Topology) -> u32 {
        match t {
            Topology::Node => self.c.count_in(&self.w.id, i, t) + self.own_node[i],
            Topology::Zone | Topology::Region => {
                self.c.domain_of(i, t).map_or(0, |d| self.own_domain_count(t, d))
            }
        }
    }

    fn own_domain_count(&self, t: Topology, d: u32) -> u32 {
        let counts = if t == Topology::Region { &self.region_count } else { &self.zone_count };
        counts.get(d as usize).copied().unwrap_or(0)
    }

    /// Lowest replica count among spread domains that can still take a replica.
    fn min_room(&self, t: Topology) -> Option<u32> {
        let counts = if t == Topology::Region { &self.region_count } else { &self.zone_count };
        self.room.iter().zip(counts).filter(|(r, _)| **r > 0).map(|(_, c)| *c).min()
    }

    /// The filters that change while replicas are placed. `with_skew: false` leaves the spread
    /// out (used to decide whether a node could take a replica at all).
    fn dynamic_verdict(&self, i: usize, with_skew: bool) -> Result<(), Reason> {
        resource_verdict(&self.free(i), &self.w.resources)?;
        if !self.has_slot(i, 0) {
            return Err(Reason::Replicas);
        }
        self.dynamic_rules(i, with_skew)
    }

    /// The dynamic filters other than resources: the workload's own affinity, anti-affinity
    /// and spread.
    fn dynamic_rules(&self, i: usize, with_skew: bool) -> Result<(), Reason> {
        for t in &self.own_anti {
            if self.own_count(i, *t) > 0 {
                return Err(Reason::AntiAffinity);
            }
        }
        let total = self.base_total + self.own_new;
        for t in &self.own_aff {
            if total > 0 && self.own_count(i, *t) == 0 {
                return Err(Reason::Affinity);
            }
        }
        if with_skew && let Some(sp) = self.spread {
            let Some(d) = self.c.domain_of(i, sp.topology) else { return Err(Reason::Zone) };
            let min = self.min_room(sp.topology).unwrap_or(0);
            if self.own_domain_count(sp.topology, d) + 1 > min + sp.max_skew {
                return Err(Reason::Skew);
            }
        }
        Ok(())
    }

    fn locality(&self, i: usize) -> f64 {
        let st = &self.statics[i];
        let mut satisfied = st.satisfied;
        for (wt, t) in &self.own_pref_aff {
            if self.own_count(i, *t) > 0 {
                satisfied += wt;
            }
        }
        for (wt, t) in &self.own_pref_anti {
            if self.own_count(i, *t) == 0 {
                satisfied += wt;
            }
        }
        score::locality(satisfied, self.pref_weight, st.penalty)
    }

    fn utilization(&self, i: usize) -> f64 {
        let n = &self.c.nodes[i];
        score::utilization(
            &n.allocatable,
            &self.used(i),
            &self.w.resources,
            self.w.placement.strategy,
        )
    }

    fn score(&self, i: usize) -> f64 {
        let wt = &self.weights;
        (self.statics[i].weighted
            + wt.locality * self.locality(i)
            + wt.utilization * self.utilization(i))
            / self.wsum
    }

    fn explain(&self, i: usize) -> Explanation {
        let node = &self.c.nodes[i];
        let factors = Factor::ALL
            .iter()
            .map(|&f| {
                let score = match f {
                    Factor::Locality => self.locality(i),
                    Factor::Reliability => score::reliability(node),
                    Factor::Cost => score::cost(node, f64::from(self.c.max_cost())),
                    Factor::Utilization => self.utilization(i),
                    Factor::Network => score::network(node),
                };
                let weight = self.weights.get(f);
                FactorScore { factor: f, score, weight, contribution: score * weight / self.wsum }
            })
            .collect();
        Explanation { node: self.c.nodes[i].id.clone(), total: self.score(i), factors }
    }

    fn push(&mut self, i: usize) {
        self.version[i] += 1;
        let e =
            Entry { score: self.score(i), tie: self.statics[i].tie, i, version: self.version[i] };
        self.heap.push(e);
    }

    /// The best node that can take one more replica now.
    fn next_node(&mut self) -> Option<usize> {
        let mut rescanned = false;
        loop {
            let Some(e) = self.heap.pop() else {
                // Parked nodes may have become allowed in ways the incremental bookkeeping
                // did not see (a zone that filled up): recount once, then give up.
                if rescanned || self.blocked.is_empty() {
                    return None;
                }
                rescanned = true;
                self.recount_room();
                let parked: Vec<usize> = self.blocked.drain().flat_map(|(_, v)| v).collect();
                for i in parked {
                    if !self.dead[i] {
                        self.push(i);
                    }
                }
                continue;
            };
            if self.dead[e.i] || e.version != self.version[e.i] {
                continue;
            }
            match self.dynamic_verdict(e.i, true) {
                Ok(()) => {}
                Err(Reason::Skew) => {
                    if let Some(d) = self.spread.and_then(|sp| self.c.domain_of(e.i, sp.topology)) {
                        self.blocked.entry(d).or_default().push(e.i);
                    }
                    continue;
                }
                Err(_) => {
                    self.mark_dead(e.i);
                    continue;
                }
            }
            let s = self.score(e.i);
            if s + 1e-9 < e.score {
                // Its score fell since it was pushed (soft anti-affinity to itself): retry.
                self.push(e.i);
                continue;
            }
            return Some(e.i);
        }
    }

    fn mark_dead(&mut self, i: usize) {
        if self.dead[i] {
            return;
        }
        self.dead[i] = true;
        if let Some(sp) = self.spread
            && let Some(d) = self.c.domain_of(i, sp.topology)
            && let Some(r) = self.room.get_mut(d as usize)
        {
            *r = r.saturating_sub(1);
        }
    }

    fn recount_room(&mut self) {
        let Some(sp) = self.spread else { return };
        self.room.iter_mut().for_each(|r| *r = 0);
        for i in 0..self.c.nodes.len() {
            if self.verdicts[i].is_none()
                && self.dynamic_verdict(i, false).is_ok()
                && let Some(d) = self.c.domain_of(i, sp.topology)
            {
                self.room[d as usize] += 1;
            }
        }
    }

    /// Accounts one replica on node `i`.
    fn commit(&mut self, i: usize) {
        let before = self.spread.and_then(|sp| self.min_room(sp.topology));
        let need = self.w.resources;
        self.extra[i] = self.extra[i].saturating_add(&need);
        self.own_node[i] += 1;
        if let Some(z) = self.c.domain_of(i, Topology::Zone) {
            self.zone_count[z as usize] += 1;
        }
        if let Some(r) = self.c.domain_of(i, Topology::Region) {
            self.region_count[r as usize] += 1;
        }
        self.own_new += 1;
        self.dead[i] = false;
        if self.dynamic_verdict(i, false).is_ok() {
            self.push(i);
        } else {
            self.mark_dead(i);
        }
        if let Some(sp) = self.spread {
            let after = self.min_room(sp.topology);
            if after != before {
                self.unblock(sp);
            }
        }
    }

    /// Puts parked nodes back whose domain is within the skew again.
    fn unblock(&mut self, sp: Spread) {
        let min = self.min_room(sp.topology).unwrap_or(0);
        let ready: Vec<u32> = self
            .blocked
            .keys()
            .copied()
            .filter(|d| self.own_domain_count(sp.topology, *d) < min + sp.max_skew)
            .collect();
        for d in ready {
            for i in self.blocked.remove(&d).unwrap_or_default() {
                if !self.dead[i] {
                    self.push(i);
                }
            }
        }
    }

    /// Finds the node where evicting lower-priority replicas makes room at the least cost, and
    /// accounts the eviction.
    fn preempt(&mut self) -> Option<(usize, Vec<ReplicaId>)> {
        let need = self.w.resources;
        let mut best: Option<(PreemptionCost, usize, Vec<ReplicaId>)> = None;
        for i in 0..self.c.nodes.len() {
            if self.verdicts[i].is_some() {
                continue;
            }
            // Everything but resources must already hold.
            if self.dynamic_rules(i, true).is_err() {
                continue;
            }
            let mut victims: Vec<(&ReplicaId, i32, Resources)> = self
                .c
                .replicas_on(&self.c.nodes[i].id)
                .iter()
                .filter(|r| !self.evicted.contains(*r))
                .filter_map(|r| self.c.placement(r).map(|a| (r, a.priority, a.resources)))
                .filter(|(_, p, _)| *p < self.w.priority)
                .collect();
            victims.sort_by(|a, b| {
                a.1.cmp(&b.1)
                    .then((b.2.cpu_millis, b.2.memory_mib).cmp(&(a.2.cpu_millis, a.2.memory_mib)))
                    .then(a.0.cmp(b.0))
            });
            let mut free = self.free(i);
            let mut chosen = Vec::new();
            for (r, p, res) in victims {
                if need.fits_in(&free) && self.has_slot(i, chosen.len()) {
                    break;
                }
                free = free.saturating_add(&res);
                chosen.push((r.clone(), p, res));
            }
            if !need.fits_in(&free) || !self.has_slot(i, chosen.len()) || chosen.is_empty() {
                continue;
            }
            let max_p = chosen.iter().map(|(_, p, _)| i64::from(*p)).max().unwrap_or(i64::MIN);
            let sum_p: i64 = chosen.iter().map(|(_, p, _)| i64::from(*p)).sum();
            let key = (
                max_p,
                chosen.len(),
                sum_p,
                u64::MAX - (self.score(i) * 1e6) as u64,
                self.statics[i].tie,
            );
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                best = Some((key, i, chosen.into_iter().map(|(r, _, _)| r).collect()));
            }
        }
        let (_, i, victims) = best?;
        let mut freed = Resources::ZERO;
        for v in &victims {
            if let Some(a) = self.c.placement(v) {
                freed = freed.saturating_add(&a.resources);
            }
            self.evicted.insert(v.clone());
        }
        self.freed[i] = self.freed[i].saturating_add(&freed);
        self.evicted_on[i] =
            self.evicted_on[i].saturating_add(u32::try_from(victims.len()).unwrap_or(u32::MAX));
        Some((i, victims))
    }

    /// Every node, counted by the first filter it fails now.
    fn report(&self) -> Unschedulable {
        let mut counts: HashMap<Reason, usize> = HashMap::new();
        for i in 0..self.c.nodes.len() {
            let reason = match &self.verdicts[i] {
                Some(r) => r.clone(),
                None => match self.dynamic_verdict(i, true) {
                    Err(r) => r,
                    // Could take one only by breaking a rule checked elsewhere: say skew.
                    Ok(()) => Reason::Skew,
                },
            };
            *counts.entry(reason).or_default() += 1;
        }
        let mut reasons: Vec<(Reason, usize)> = counts.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Unschedulable { nodes: self.c.nodes.len(), reasons }
    }
}

/// How bad an eviction is, compared lexicographically: the highest victim priority, the
/// number of victims, the sum of their priorities, then the node's score (inverted) and tie.
type PreemptionCost = (i64, usize, i64, u64, u64);

/// Mixes the seed into a node's name hash (splitmix64's finalizer): stable across runs,
/// platforms and Rust releases.
fn mix(seed: u64, id_hash: u64) -> u64 {
    let mut z = seed ^ id_hash;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
