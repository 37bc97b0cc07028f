//! Filters: may this workload run on that node at all? Each filter that says no gives a
//! [`Reason`], and an [`Unschedulable`] answer counts nodes by the first reason each failed on.
//!
//! Static filters depend only on the node and the workload and are evaluated once per
//! decision; dynamic ones (resources, the workload's own affinity and spread) change as
//! replicas are placed and are re-checked at each placement.

use std::fmt;

use cloudless_types::{LabelOp, LabelRule, Power, Runtime, TaintEffect, Topology};

use crate::model::{Cluster, Liveness, Node, Workload};

/// Why a node cannot take a replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The node is suspect or dead.
    NotReady,
    /// An operator cordoned it.
    Cordoned,
    /// It is being drained.
    Draining,
    /// It does not offer the workload's runtime.
    NoRuntime(Runtime),
    /// Its device class is not among those the workload accepts.
    DeviceClass,
    /// It runs on battery and the workload does not allow that.
    OnBattery,
    /// Its link is metered and the workload does not allow that.
    Metered,
    /// It is outside the zones the workload accepts.
    Zone,
    /// It is outside the regions the workload accepts.
    Region,
    /// Its labels do not match the node selector.
    NodeSelector,
    /// Its labels break a required node rule.
    NodeRules,
    /// It has a taint the workload does not tolerate.
    Taint,
    /// It is not beside a workload this one must run beside.
    Affinity,
    /// It is beside a workload this one must stay away from.
    AntiAffinity,
    /// The admission policy refused it.
    Policy(String),
    /// Not enough free CPU.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Not enough free disk.
    Disk,
    /// Not enough free GPUs.
    Gpu,
    /// It runs as many replicas as it can at once (its `max_replicas`).
    Replicas,
    /// Placing here would break the workload's zone or region spread.
    Skew,
}

impl Reason {
    /// The reason as a clause about `n` nodes, for example "3,100 lack memory".
    pub fn describe(&self, n: usize) -> String {
        let one = n == 1;
        let p = |a: &'static str, b: &'static str| if one { a } else { b };
        let v = match self {
            Reason::NotReady => format!("{} not ready", p("is", "are")),
            Reason::Cordoned => format!("{} cordoned", p("is", "are")),
            Reason::Draining => format!("{} draining", p("is", "are")),
            Reason::NoRuntime(r) => format!("{} no {} runtime", p("offers", "offer"), r.as_str()),
            Reason::DeviceClass => {
                format!("{} of a device class the workload excludes", p("is", "are"))
            }
            Reason::OnBattery => format!("{} on battery", p("is", "are")),
            Reason::Metered => format!("{} on a metered link", p("is", "are")),
            Reason::Zone => format!("{} outside the allowed zones", p("is", "are")),
            Reason::Region => format!("{} outside the allowed regions", p("is", "are")),
            Reason::NodeSelector => format!("{} not match the node selector", p("does", "do")),
            Reason::NodeRules => format!("{} not match the required node rules", p("does", "do")),
            Reason::Taint => format!("{} a taint the workload does not tolerate", p("has", "have")),
            Reason::Affinity => {
                format!("{} not beside a workload it must run beside", p("is", "are"))
            }
            Reason::AntiAffinity => {
                format!("{} beside a workload it must stay away from", p("is", "are"))
            }
            Reason::Policy(why) => {
                format!("{} refused by admission policy ({why})", p("is", "are"))
            }
            Reason::Cpu => format!("{} CPU", p("lacks", "lack")),
            Reason::Memory => format!("{} memory", p("lacks", "lack")),
            Reason::Disk => format!("{} disk", p("lacks", "lack")),
            Reason::Gpu => format!("{} GPUs", p("lacks", "lack")),
            Reason::Replicas => {
                format!("{} at {} replica limit", p("is", "are"), p("its", "their"))
            }
            Reason::Skew => "would break the workload's spread".to_string(),
        };
        format!("{} {v}", thousands(n))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.describe(1);
        // Drop the leading "1 ".
        f.write_str(text.split_once(' ').map_or(text.as_str(), |(_, rest)| rest))
    }
}

/// `n` with thousands separators: 4812 → "4,812".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A precise "no": how many nodes were considered and how many each reason rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// Nodes considered.
    pub nodes: usize,
    /// Nodes rejected per reason (each node counted once, by the first filter it failed),
    /// most frequent first.
    pub reasons: Vec<(Reason, usize)>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} nodes are available", thousands(self.nodes))?;
        if self.reasons.is_empty() {
            return f.write_str(" (the cluster has no nodes)");
        }
        f.write_str(": ")?;
        for (i, (reason, n)) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&reason.describe(*n))?;
        }
        Ok(())
    }
}

/// Admission policy: a last, site-specific say on each node (Rego through regorus, quotas, an
/// owner's rules). It must be pure and cheap: it runs for every candidate node.
pub trait Admission: Send + Sync {
    /// `Err(why)` refuses `node` for `workload`.
    fn admit(&self, workload: &Workload, node: &Node) -> Result<(), String>;
}

/// Admits everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Admission for AllowAll {
    fn admit(&self, _: &Workload, _: &Node) -> Result<(), String> {
        Ok(())
    }
}

/// A label rule compiled against a cluster's interned strings.
#[derive(Clone, Debug)]
pub(crate) enum Rule {
    /// The key is present with one of these values.
    In(u32, Vec<u32>),
    /// The key is absent or has none of these values.
    NotIn(u32, Vec<u32>),
    /// The key is present.
    Exists(u32),
    /// The key is absent.
    Absent(u32),
    /// Holds on every node (NotIn or DoesNotExist on a key no node has).
    Always,
    /// Holds on no node (In or Exists on a key no node has).
    Never,
}

impl Rule {
    fn compile(c: &Cluster, r: &LabelRule) -> Rule {
        let Some(key) = c.string_id(&r.key) else {
            return match r.op {
                LabelOp::In(_) | LabelOp::Exists => Rule::Never,
                LabelOp::NotIn(_) | LabelOp::DoesNotExist => Rule::Always,
            };
        };
        let ids =
            |values: &[String]| values.iter().filter_map(|v| c.string_id(v)).collect::<Vec<u32>>();
        match &r.op {
            LabelOp::In(v) => Rule::In(key, ids(v)),
            LabelOp::NotIn(v) => Rule::NotIn(key, ids(v)),
            LabelOp::Exists => Rule::Exists(key),
            LabelOp::DoesNotExist => Rule::Absent(key),
        }
    }

    pub(crate) fn matches(&self, labels: &[(u32, u32)]) -> bool {
        let get =
            |key: u32| labels.binary_search_by_key(&key, |(k, _)| *k).ok().map(|i| labels[i].1);
        match self {
            Rule::In(k, vs) => get(*k).is_some_and(|v| vs.contains(&v)),
            Rule::NotIn(k, vs) => get(*k).is_none_or(|v| !vs.contains(&v)),
            Rule::Exists(k) => get(*k).is_some(),
            Rule::Absent(k) => get(*k).is_none(),
            Rule::Always => true,
            Rule::Never => false,
        }
    }
}

/// A workload's label conditions compiled against the cluster's interned strings, once per
/// decision: label checks then compare integers.
#[derive(Clone, Debug)]
pub(crate) struct Labels {
    /// The node selector, one `In` rule per pair.
    selector: Vec<Rule>,
    /// The required node rules.
    required: Vec<Rule>,
    /// The preferred node rules with their weights.
    pub(crate) preferred: Vec<(f64, Rule)>,
}

impl Labels {
    pub(crate) fn compile(c: &Cluster, w: &Workload) -> Labels {
        let p = &w.placement;
        let selector = p
            .node_selector
            .iter()
            .map(|(k, v)| {
                Rule::compile(c, &LabelRule { key: k.clone(), op: LabelOp::In(vec![v.clone()]) })
            })
            .collect();
        let required = p.required_node_rules.iter().map(|r| Rule::compile(c, r)).collect();
        let preferred = p
            .preferred_node_rules
            .iter()
            .map(|(wt, r)| (f64::from(*wt), Rule::compile(c, r)))
            .collect();
        Labels { selector, required, preferred }
    }
}

/// Checks the filters that do not change while a workload's replicas are placed. Terms about
/// the workload itself (its own affinity, anti-affinity, spread) are left to the dynamic
/// check.
pub(crate) fn static_verdict(
    c: &Cluster,
    i: usize,
    w: &Workload,
    labels: &Labels,
    admission: &dyn Admission,
) -> Result<(), Reason> {
    let n = &c.nodes[i];
    let p = &w.placement;
    if n.liveness != Liveness::Alive {
        return Err(Reason::NotReady);
    }
    if n.cordoned {
        return Err(Reason::Cordoned);
    }
    if n.draining {
        return Err(Reason::Draining);
    }
    if !n.runtimes.contains(w.runtime) {
        return Err(Reason::NoRuntime(w.runtime));
    }
    if !p.device.classes.is_empty() && !p.device.classes.contains(&n.device_class) {
        return Err(Reason::DeviceClass);
    }
    if matches!(n.power, Power::Battery(_)) && !p.device.allow_battery {
        return Err(Reason::OnBattery);
    }
    if n.metered && !p.device.allow_metered {
        return Err(Reason::Metered);
    }
    if !p.zones.is_empty() && !n.zone.as_ref().is_some_and(|z| p.zones.contains(z)) {
        return Err(Reason::Zone);
    }
    if !p.regions.is_empty() && !n.region.as_ref().is_some_and(|r| p.regions.contains(r)) {
        return Err(Reason::Region);
    }
    let node_labels = c.labels_of(i);
    if !labels.selector.iter().all(|r| r.matches(node_labels)) {
        return Err(Reason::NodeSelector);
    }
    if !labels.required.iter().all(|r| r.matches(node_labels)) {
        return Err(Reason::NodeRules);
    }
    let untolerated = n.taints.iter().any(|t| {
        t.effect != TaintEffect::PreferNoSchedule
            && !p.tolerations.iter().any(|tol| tol.tolerates(t))
    });
    if untolerated {
        return Err(Reason::Taint);
    }
    for term in p.affinity.iter().filter(|t| *t.workload != *w.id) {
        if c.count_in(&term.workload, i, term.topology) == 0 {
            return Err(Reason::Affinity);
        }
    }
    for term in p.anti_affinity.iter().filter(|t| *t.workload != *w.id) {
        if c.count_in(&term.workload, i, term.topology) > 0 {
            return Err(Reason::AntiAffinity);
        }
    }
    admission.admit(w, n).map_err(Reason::Policy)
}

/// Which resource does not fit, checked in a fixed order.
pub(crate) fn resource_verdict(
    free: &cloudless_types::Resources,
    need: &cloudless_types::Resources,
) -> Result<(), Reason> {
    if need.cpu_millis > free.cpu_millis {
        Err(Reason::Cpu)
    } else if need.memory_mib > free.memory_mib {
        Err(Reason::Memory)
    } else if need.disk_mib > free.disk_mib {
        Err(Reason::Disk)
    } else if need.gpus > free.gpus {
        Err(Reason::Gpu)
    } else {
        Ok(())
    }
}

/// Whether `t` names the workload itself (self-affinity and self-anti-affinity are dynamic).
pub(crate) fn own_terms(w: &Workload, terms: &[cloudless_types::WorkloadTerm]) -> Vec<Topology> {
    terms.iter().filter(|t| *t.workload == *w.id).map(|t| t.topology).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cloudless_types::{
        DeviceClass, LabelOp, LabelRule, Resources, Runtimes, Taint, Toleration, WorkloadTerm,
    };

    use super::*;
    use crate::model::{Node, ReplicaId};

    fn cluster(n: Node) -> Cluster {
        let mut c = Cluster::new();
        c.add_node(n).unwrap();
        c
    }

    fn node() -> Node {
        let mut n = Node::new(
            "n",
            Resources { cpu_millis: 1000, memory_mib: 1024, disk_mib: 1024, gpus: 0 },
        );
        n.zone = Some("z1".into());
        n.region = Some("r1".into());
        n.labels.insert("disk".into(), "ssd".into());
        n
    }

    fn wl() -> Workload {
        Workload::new(
            "w",
            Runtime::Wasi,
            Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
            1,
        )
    }

    fn verdict(n: Node, w: &Workload) -> Result<(), Reason> {
        let c = cluster(n);
        static_verdict(&c, 0, w, &Labels::compile(&c, w), &AllowAll)
    }

    #[test]
    fn each_static_filter_names_its_reason() {
        let w = wl();
        assert_eq!(verdict(node(), &w), Ok(()));
        assert_eq!(
            verdict(Node { liveness: Liveness::Suspect, ..node() }, &w),
            Err(Reason::NotReady)
        );
        assert_eq!(verdict(Node { cordoned: true, ..node() }, &w), Err(Reason::Cordoned));
        assert_eq!(verdict(Node { draining: true, ..node() }, &w), Err(Reason::Draining));
        let container_only = Node { runtimes: Runtimes::of(&[Runtime::Container]), ..node() };
        assert_eq!(verdict(container_only, &w), Err(Reason::NoRuntime(Runtime::Wasi)));
        let mut servers_only = wl();
        servers_only.placement.device.classes = vec![DeviceClass::Server];
        assert_eq!(verdict(node(), &servers_only), Err(Reason::DeviceClass));
        let phone = Node { power: Power::Battery(80), device_class: DeviceClass::Phone, ..node() };
        assert_eq!(verdict(phone.clone(), &w), Err(Reason::OnBattery));
        let mut battery_ok = wl();
        battery_ok.placement.device.allow_battery = true;
        assert_eq!(verdict(phone, &battery_ok), Ok(()));
        assert_eq!(verdict(Node { metered: true, ..node() }, &w), Err(Reason::Metered));
        let mut zoned = wl();
        zoned.placement.zones = vec!["z2".into()];
        assert_eq!(verdict(node(), &zoned), Err(Reason::Zone));
        let mut regioned = wl();
        regioned.placement.regions = vec!["r2".into()];
        assert_eq!(verdict(node(), &regioned), Err(Reason::Region));
        let mut selected = wl();
        selected.placement.node_selector.insert("disk".into(), "hdd".into());
        assert_eq!(verdict(node(), &selected), Err(Reason::NodeSelector));
        let mut ruled = wl();
        ruled
            .placement
            .required_node_rules
            .push(LabelRule { key: "gpu".into(), op: LabelOp::Exists });
        assert_eq!(verdict(node(), &ruled), Err(Reason::NodeRules));
    }

    #[test]
    fn taints_repel_unless_tolerated_and_soft_taints_do_not_filter() {
        let taint = |effect| Taint { key: "dedicated".into(), value: "ml".into(), effect };
        let w = wl();
        assert_eq!(
            verdict(Node { taints: vec![taint(TaintEffect::NoSchedule)], ..node() }, &w),
            Err(Reason::Taint)
        );
        assert_eq!(
            verdict(Node { taints: vec![taint(TaintEffect::NoExecute)], ..node() }, &w),
            Err(Reason::Taint)
        );
        assert_eq!(
            verdict(Node { taints: vec![taint(TaintEffect::PreferNoSchedule)], ..node() }, &w),
            Ok(())
        );
        let mut tolerant = wl();
        tolerant.placement.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            value: None,
            effect: None,
        });
        assert_eq!(
            verdict(Node { taints: vec![taint(TaintEffect::NoSchedule)], ..node() }, &tolerant),
            Ok(())
        );
    }

    #[test]
    fn affinity_to_other_workloads() {
        let mut c = cluster(node());
        let db: Arc<str> = Arc::from("db");
        let mut w = wl();
        w.placement.affinity.push(WorkloadTerm { workload: "db".into(), topology: Topology::Zone });
        assert_eq!(
            static_verdict(&c, 0, &w, &Labels::compile(&c, &w), &AllowAll),
            Err(Reason::Affinity)
        );
        c.assign(ReplicaId::new(&db, 0), "n", Resources::ZERO, 0).unwrap();
        assert_eq!(static_verdict(&c, 0, &w, &Labels::compile(&c, &w), &AllowAll), Ok(()));
        let mut away = wl();
        away.placement
            .anti_affinity
            .push(WorkloadTerm { workload: "db".into(), topology: Topology::Node });
        assert_eq!(
            static_verdict(&c, 0, &away, &Labels::compile(&c, &away), &AllowAll),
            Err(Reason::AntiAffinity)
        );
    }

    #[test]
    fn admission_policy_has_the_last_word() {
        struct NoPhones;
        impl Admission for NoPhones {
            fn admit(&self, _: &Workload, n: &Node) -> Result<(), String> {
                if n.device_class == DeviceClass::Phone {
                    Err("no phones here".into())
                } else {
                    Ok(())
                }
            }
        }
        let mut w = wl();
        w.placement.device.allow_battery = true;
        let c = cluster(Node { device_class: DeviceClass::Phone, ..node() });
        assert_eq!(
            static_verdict(&c, 0, &w, &Labels::compile(&c, &w), &NoPhones),
            Err(Reason::Policy("no phones here".into()))
        );
    }

    #[test]
    fn resources_report_the_first_short_dimension() {
        let free = Resources { cpu_millis: 100, memory_mib: 10, disk_mib: 0, gpus: 0 };
        assert_eq!(
            resource_verdict(&free, &Resources { cpu_millis: 200, ..Resources::ZERO }),
            Err(Reason::Cpu)
        );
        assert_eq!(
            resource_verdict(&free, &Resources { memory_mib: 20, ..Resources::ZERO }),
            Err(Reason::Memory)
        );
        assert_eq!(
            resource_verdict(&free, &Resources { disk_mib: 1, ..Resources::ZERO }),
            Err(Reason::Disk)
        );
        assert_eq!(
            resource_verdict(&free, &Resources { gpus: 1, ..Resources::ZERO }),
            Err(Reason::Gpu)
        );
        assert_eq!(
            resource_verdict(&free, &Resources { cpu_millis: 100, ..Resources::ZERO }),
            Ok(())
        );
    }

    #[test]
    fn unschedulable_reads_like_a_sentence() {
        let u = Unschedulable {
            nodes: 4812,
            reasons: vec![
                (Reason::Memory, 3100),
                (Reason::NoRuntime(Runtime::Container), 1700),
                (Reason::Draining, 12),
            ],
        };
        assert_eq!(
            u.to_string(),
            "0/4,812 nodes are available: 3,100 lack memory, 1,700 offer no container runtime, 12 are draining"
        );
        let one = Unschedulable { nodes: 1, reasons: vec![(Reason::Cpu, 1)] };
        assert_eq!(one.to_string(), "0/1 nodes are available: 1 lacks CPU");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(Reason::Taint.to_string(), "has a taint the workload does not tolerate");
    }
}
