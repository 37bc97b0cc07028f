//! The scheduler's view of the cluster: nodes, workloads and who runs where.
//!
//! [`Cluster`] is the leader's bookkeeping: it is built from gossiped capacity and committed
//! assignments, and updated as decisions are applied ([`Cluster::assign`],
//! [`Cluster::unassign`]). Per-node and per-domain replica counts are kept incrementally so
//! that affinity and spread checks cost a lookup, not a scan.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use cloudless_types::{
    DeviceClass, Placement, Power, Resources, Runtime, Runtimes, Taint, Topology,
};

/// A node's name in the scheduler (the node's PeerId as text, in practice).
pub type NodeId = Arc<str>;
/// A workload's name.
pub type WorkloadId = Arc<str>;

/// One replica of a workload: its name and its ordinal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId {
    /// The workload.
    pub workload: WorkloadId,
    /// Which replica, from 0.
    pub index: u32,
}

impl ReplicaId {
    /// Replica `index` of `workload`.
    pub fn new(workload: &WorkloadId, index: u32) -> Self {
        ReplicaId { workload: workload.clone(), index }
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.workload, self.index)
    }
}

/// Liveness as membership reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Answering probes.
    #[default]
    Alive,
    /// Missed probes; may be back in a moment. Takes no new work.
    Suspect,
    /// Declared failed. Its replicas need new homes.
    Dead,
}

/// Everything the scheduler knows about one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Its name.
    pub id: NodeId,
    /// What it offers to Cloudless in total (after what its owner reserved).
    pub allocatable: Resources,
    /// What is in use: replicas placed there plus anything else the node reports.
    pub used: Resources,
    /// Labels for selectors and affinity.
    pub labels: BTreeMap<String, String>,
    /// Failure zone.
    pub zone: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Device class.
    pub device_class: DeviceClass,
    /// Power source right now.
    pub power: Power,
    /// Whether its link is metered.
    pub metered: bool,
    /// Runtimes offered.
    pub runtimes: Runtimes,
    /// Share of the recent window the node was online, 0.0–1.0.
    pub uptime: f32,
    /// Failures (crashes, disappearances) in the recent window.
    pub recent_failures: u32,
    /// Relative cost of one unit of resources on this node (0 for a free community device).
    pub cost: f32,
    /// Round trip to the leader (or to the workload's peers), if measured.
    pub rtt_ms: Option<u32>,
    /// No new work (set by an operator).
    pub cordoned: bool,
    /// Being emptied: no new work, running replicas move away.
    pub draining: bool,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Liveness.
    pub liveness: Liveness,
    /// Replicas it runs at once at most, of any runtime (its WASI instance pool, like
    /// kubelet's `maxPods`); `u32::MAX`: no limit.
    pub max_replicas: u32,
}

impl Node {
    /// A healthy node with `allocatable` resources and sensible defaults for everything else;
    /// handy for tests and examples.
    pub fn new(id: &str, allocatable: Resources) -> Self {
        Node {
            id: Arc::from(id),
            allocatable,
            used: Resources::ZERO,
            labels: BTreeMap::new(),
            zone: None,
            region: None,
            device_class: DeviceClass::Desktop,
            power: Power::Mains,
            metered: false,
            runtimes: Runtimes::of(&[Runtime::Container, Runtime::Wasi]),
            uptime: 1.0,
            recent_failures: 0,
            cost: 0.0,
            rtt_ms: None,
            cordoned: false,
            draining: false,
            taints: Vec::new(),
            liveness: Liveness::Alive,
            max_replicas: u32::MAX,
        }
    }

    /// Resources still free.
    pub fn free(&self) -> Resources {
        self.allocatable.saturating_sub(&self.used)
    }
}

/// What the scheduler needs to know about a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Its name.
    pub id: WorkloadId,
    /// Its runtime.
    pub runtime: Runtime,
    /// What each replica requests.
    pub resources: Resources,
    /// Higher runs first and may preempt lower.
    pub priority: i32,
    /// Desired replicas.
    pub replicas: u32,
    /// Replicas that must keep running during voluntary changes (drains, scale-downs).
    pub min_available: u32,
    /// Where it may and would like to run.
    pub placement: Placement,
}

impl Workload {
    /// A workload with `replicas` replicas each requesting `resources`, default placement.
    pub fn new(id: &str, runtime: Runtime, resources: Resources, replicas: u32) -> Self {
        Workload {
            id: Arc::from(id),
            runtime,
            resources,
            priority: 0,
            replicas,
            min_available: 0,
            placement: Placement::default(),
        }
    }
}

/// A replica placed on a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Assigned {
    /// Where it runs.
    pub node: NodeId,
    /// What it requested.
    pub resources: Resources,
    /// Its workload's priority.
    pub priority: i32,
}

/// Why a change to the cluster view was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A node with that name exists already.
    #[error("node {0} is already in the cluster")]
    DuplicateNode(NodeId),
    /// No node with that name.
    #[error("no node named {0}")]
    UnknownNode(NodeId),
    /// The replica is placed already.
    #[error("replica {0} is already placed")]
    DuplicateReplica(ReplicaId),
}

/// Per-node state kept beside the node itself, so both move together.
#[derive(Clone, Debug, Default)]
pub(crate) struct Slot {
    pub(crate) zone: Option<u32>,
    pub(crate) region: Option<u32>,
    /// Where the node's labels are in the cluster's label arena: interned `(key, value)`
    /// pairs sorted by key, so label rules compare integers in memory that a pass over the
    /// nodes reads front to back.
    pub(crate) labels: (u32, u32),
    /// FNV-1a of the node's name, for seeded tie-breaks.
    pub(crate) id_hash: u64,
    pub(crate) replicas: Vec<ReplicaId>,
    /// Replicas per workload on this node; short, so a vector.
    pub(crate) by_workload: Vec<(WorkloadId, u32)>,
}

impl Slot {
    pub(crate) fn count(&self, w: &str) -> u32 {
        self.by_workload.iter().find(|(id, _)| &**id == w).map_or(0, |(_, n)| *n)
    }
}

/// Replicas of one workload per zone and per region.
#[derive(Clone, Debug, Default)]
pub(crate) struct DomainCounts {
    pub(crate) zone: HashMap<u32, u32>,
    pub(crate) region: HashMap<u32, u32>,
    pub(crate) total: u32,
}

/// The scheduler's view of the whole cluster.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub(crate) nodes: Vec<Node>,
    pub(crate) slots: Vec<Slot>,
    index: HashMap<NodeId, usize>,
    zones: Vec<String>,
    zone_index: HashMap<String, u32>,
    regions: Vec<String>,
    region_index: HashMap<String, u32>,
    /// Interned label keys and values.
    strings: Vec<String>,
    /// Highest `cost` of any node.
    max_cost: f32,
    /// Every node's interned labels, back to back.
    label_arena: Vec<(u32, u32)>,
    /// Arena entries no node points to any more.
    label_garbage: usize,
    string_index: HashMap<String, u32>,
    replicas: BTreeMap<ReplicaId, Assigned>,
    pub(crate) counts: HashMap<WorkloadId, DomainCounts>,
}

impl Cluster {
    /// An empty view.
    pub fn new() -> Self {
        Cluster::default()
    }

    /// Adds a node. Its `used` should already include what runs there outside this view.
    pub fn add_node(&mut self, node: Node) -> Result<(), ClusterError> {
        if self.index.contains_key(&node.id) {
            return Err(ClusterError::DuplicateNode(node.id));
        }
        let zone = node.zone.as_deref().map(|z| intern(&mut self.zones, &mut self.zone_index, z));
        let region =
            node.region.as_deref().map(|r| intern(&mut self.regions, &mut self.region_index, r));
        let labels = self.store_labels(&node.labels);
        let id_hash = fnv1a(node.id.as_bytes());
        self.max_cost = self.max_cost.max(node.cost);
        self.index.insert(node.id.clone(), self.nodes.len());
        self.nodes.push(node);
        self.slots.push(Slot { zone, region, labels, id_hash, ..Slot::default() });
        Ok(())
    }

    /// Changes a node's facts (liveness, cordon, labels, capacity…) in place. Changing its id
    /// is not allowed and is undone.
    pub fn update_node(&mut self, id: &str, f: impl FnOnce(&mut Node)) -> Result<(), ClusterError> {
        let i = *self.index.get(id).ok_or_else(|| ClusterError::UnknownNode(Arc::from(id)))?;
        let old_id = self.nodes[i].id.clone();
        let old_cost = self.nodes[i].cost;
        f(&mut self.nodes[i]);
        self.nodes[i].id = old_id;
        if self.nodes[i].cost != old_cost {
            self.refresh_max_cost();
        }
        let zone = self.nodes[i].zone.clone();
        let region = self.nodes[i].region.clone();
        self.slots[i].zone =
            zone.as_deref().map(|z| intern(&mut self.zones, &mut self.zone_index, z));
        self.slots[i].region =
            region.as_deref().map(|r| intern(&mut self.regions, &mut self.region_index, r));
        let labels = self.nodes[i].labels.clone();
        self.label_garbage += self.slots[i].labels.1 as usize;
        self.slots[i].labels = self.store_labels(&labels);
        if self.label_garbage > self.label_arena.len() / 2 {
            self.compact_labels();
        }
        Ok(())
    }

    /// Removes a node and forgets the replicas placed on it, which it returns (they need new
    /// homes).
    pub fn remove_node(&mut self, id: &str) -> Result<Vec<(ReplicaId, Assigned)>, ClusterError> {
        let i = *self.index.get(id).ok_or_else(|| ClusterError::UnknownNode(Arc::from(id)))?;
        let orphans: Vec<ReplicaId> = self.slots[i].replicas.clone();
        let mut out = Vec::with_capacity(orphans.len());
        for r in orphans {
            if let Some(a) = self.unassign(&r) {
                out.push((r, a));
            }
        }
        self.index.remove(id);
        self.label_garbage += self.slots[i].labels.1 as usize;
        let cost = self.nodes.swap_remove(i).cost;
        self.slots.swap_remove(i);
        if cost >= self.max_cost {
            self.refresh_max_cost();
        }
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.id.clone(), i);
        }
        Ok(out)
    }

    /// Records that `replica` runs on `node`, adding its resources to the node's use. Does not
    /// check capacity: the view must be able to hold what really runs.
    pub fn assign(
        &mut self,
        replica: ReplicaId,
        node: &str,
        resources: Resources,
        priority: i32,
    ) -> Result<(), ClusterError> {
        let i = *self.index.get(node).ok_or_else(|| ClusterError::UnknownNode(Arc::from(node)))?;
        if self.replicas.contains_key(&replica) {
            return Err(ClusterError::DuplicateReplica(replica));
        }
        let n = &mut self.nodes[i];
        n.used = n.used.saturating_add(&resources);
        let slot = &mut self.slots[i];
        slot.replicas.push(replica.clone());
        match slot.by_workload.iter_mut().find(|(w, _)| *w == replica.workload) {
            Some((_, c)) => *c += 1,
            None => slot.by_workload.push((replica.workload.clone(), 1)),
        }
        let (zone, region) = (slot.zone, slot.region);
        let counts = self.counts.entry(replica.workload.clone()).or_default();
        counts.total += 1;
        if let Some(z) = zone {
            *counts.zone.entry(z).or_default() += 1;
        }
        if let Some(r) = region {
            *counts.region.entry(r).or_default() += 1;
        }
        self.replicas
            .insert(replica, Assigned { node: self.nodes[i].id.clone(), resources, priority });
        Ok(())
    }

    /// Forgets where `replica` runs, freeing its resources. Returns where it was.
    pub fn unassign(&mut self, replica: &ReplicaId) -> Option<Assigned> {
        let a = self.replicas.remove(replica)?;
        let Some(&i) = self.index.get(&a.node) else { return Some(a) };
        let n = &mut self.nodes[i];
        n.used = n.used.saturating_sub(&a.resources);
        let slot = &mut self.slots[i];
        slot.replicas.retain(|r| r != replica);
        if let Some(pos) = slot.by_workload.iter().position(|(w, _)| *w == replica.workload) {
            slot.by_workload[pos].1 -= 1;
            if slot.by_workload[pos].1 == 0 {
                slot.by_workload.swap_remove(pos);
            }
        }
        let (zone, region) = (slot.zone, slot.region);
        if let Some(counts) = self.counts.get_mut(&replica.workload) {
            counts.total = counts.total.saturating_sub(1);
            if let Some(z) = zone {
                decrement(&mut counts.zone, z);
            }
            if let Some(r) = region {
                decrement(&mut counts.region, r);
            }
            if counts.total == 0 {
                self.counts.remove(&replica.workload);
            }
        }
        Some(a)
    }

    /// A node by name.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.index.get(id).map(|&i| &self.nodes[i])
    }

    /// Every node, in insertion order (removals move the last node into the gap).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the view holds no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Where a replica runs.
    pub fn placement(&self, replica: &ReplicaId) -> Option<&Assigned> {
        self.replicas.get(replica)
    }

    /// Every placed replica, in order.
    pub fn replicas(&self) -> impl Iterator<Item = (&ReplicaId, &Assigned)> {
        self.replicas.iter()
    }

    /// Replicas placed on a node.
    pub fn replicas_on(&self, node: &str) -> &[ReplicaId] {
        self.index.get(node).map_or(&[], |&i| self.slots[i].replicas.as_slice())
    }

    /// Replicas of `workload` placed anywhere, in order.
    pub fn replicas_of<'a>(
        &'a self,
        workload: &'a str,
    ) -> impl Iterator<Item = (&'a ReplicaId, &'a Assigned)> + 'a {
        self.replicas.iter().filter(move |(r, _)| &*r.workload == workload)
    }

    /// The highest cost of any node: the cost factor is relative to it.
    pub fn max_cost(&self) -> f32 {
        self.max_cost
    }

    fn refresh_max_cost(&mut self) {
        self.max_cost = self.nodes.iter().map(|n| n.cost).fold(0.0, f32::max);
    }

    /// Appends a node's interned labels to the arena and returns their range.
    fn store_labels(&mut self, labels: &BTreeMap<String, String>) -> (u32, u32) {
        let v = self.intern_labels(labels);
        let start = u32::try_from(self.label_arena.len()).unwrap_or(u32::MAX);
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.label_arena.extend(v);
        (start, len)
    }

    /// Rewrites the arena in node order, dropping ranges of replaced labels.
    fn compact_labels(&mut self) {
        let mut arena = Vec::with_capacity(self.label_arena.len() - self.label_garbage);
        for slot in &mut self.slots {
            let (start, len) = slot.labels;
            let new_start = u32::try_from(arena.len()).unwrap_or(u32::MAX);
            arena.extend_from_slice(&self.label_arena[start as usize..(start + len) as usize]);
            slot.labels = (new_start, len);
        }
        self.label_arena = arena;
        self.label_garbage = 0;
    }

    /// Node `i`'s interned labels.
    pub(crate) fn labels_of(&self, i: usize) -> &[(u32, u32)] {
        let (start, len) = self.slots[i].labels;
        &self.label_arena[start as usize..(start + len) as usize]
    }

    fn intern_labels(&mut self, labels: &BTreeMap<String, String>) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = labels
            .iter()
            .map(|(k, val)| {
                let k = intern(&mut self.strings, &mut self.string_index, k);
                (k, intern(&mut self.strings, &mut self.string_index, val))
            })
            .collect();
        // Interned ids are not ordered like the strings: sort for binary search.
        v.sort_unstable();
        v
    }

    /// The interned id of a label key or value, if any node uses it.
    pub(crate) fn string_id(&self, s: &str) -> Option<u32> {
        self.string_index.get(s).copied()
    }

    pub(crate) fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub(crate) fn domain_of(&self, i: usize, t: Topology) -> Option<u32> {
        match t {
            Topology::Node => u32::try_from(i).ok(),
            Topology::Zone => self.slots[i].zone,
            Topology::Region => self.slots[i].region,
        }
    }

    /// Replicas of `workload` within node `i`'s extent `t`.
    pub(crate) fn count_in(&self, workload: &str, i: usize, t: Topology) -> u32 {
        match t {
            Topology::Node => self.slots[i].count(workload),
            Topology::Zone | Topology::Region => {
                let Some(d) = self.domain_of(i, t) else { return 0 };
                self.counts
                    .get(workload)
                    .map_or(0, |c| domain_map(c, t).get(&d).copied().unwrap_or(0))
            }
        }
    }

    pub(crate) fn zone_count(&self) -> usize {
        self.zones.len()
    }

    pub(crate) fn region_count(&self) -> usize {
        self.regions.len()
    }

    pub(crate) fn total_of(&self, workload: &str) -> u32 {
        self.counts.get(workload).map_or(0, |c| c.total)
    }
}

pub(crate) fn domain_map(c: &DomainCounts, t: Topology) -> &HashMap<u32, u32> {
    if t == Topology::Region { &c.region } else { &c.zone }
}

fn intern(table: &mut Vec<String>, index: &mut HashMap<String, u32>, name: &str) -> u32 {
    if let Some(&i) = index.get(name) {
        return i;
    }
    let i = u32::try_from(table.len()).unwrap_or(u32::MAX);
    table.push(name.to_string());
    index.insert(name.to_string(), i);
    i
}

fn decrement(map: &mut HashMap<u32, u32>, k: u32) {
    if let Some(v) = map.get_mut(&k) {
        *v -= 1;
        if *v == 0 {
            map.remove(&k);
        }
    }
}

/// FNV-1a: a small, stable hash (the same on every platform and Rust release).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u32, mem: u32) -> Resources {
        Resources { cpu_millis: cpu, memory_mib: mem, disk_mib: 0, gpus: 0 }
    }

    #[test]
    fn assign_unassign_and_remove_keep_counts_consistent() {
        let mut c = Cluster::new();
        for (id, zone) in [("a", "z1"), ("b", "z1"), ("c", "z2")] {
            let mut n = Node::new(id, res(4000, 4096));
            n.zone = Some(zone.into());
            c.add_node(n).unwrap();
        }
        assert_eq!(
            c.add_node(Node::new("a", res(1, 1))),
            Err(ClusterError::DuplicateNode(Arc::from("a")))
        );
        let w: WorkloadId = Arc::from("web");
        c.assign(ReplicaId::new(&w, 0), "a", res(500, 512), 0).unwrap();
        c.assign(ReplicaId::new(&w, 1), "b", res(500, 512), 0).unwrap();
        c.assign(ReplicaId::new(&w, 2), "c", res(500, 512), 0).unwrap();
        assert!(c.assign(ReplicaId::new(&w, 2), "a", res(1, 1), 0).is_err());
        assert_eq!(c.node("a").unwrap().used, res(500, 512));
        let ia = c.index_of("a").unwrap();
        assert_eq!(c.count_in("web", ia, Topology::Zone), 2);
        assert_eq!(c.count_in("web", ia, Topology::Node), 1);
        let orphans = c.remove_node("a").unwrap();
        assert_eq!(orphans.len(), 1);
        assert_eq!(c.total_of("web"), 2);
        // The node that moved into a's slot is still found by name.
        assert_eq!(c.replicas_on("c").len(), 1);
        let ic = c.index_of("c").unwrap();
        assert_eq!(c.count_in("web", ic, Topology::Zone), 1);
        c.unassign(&ReplicaId::new(&w, 1)).unwrap();
        assert_eq!(c.node("b").unwrap().used, Resources::ZERO);
        assert_eq!(c.count_in("web", c.index_of("b").unwrap(), Topology::Zone), 0);
    }
}
