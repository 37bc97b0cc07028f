//! Scores: among the nodes that may take a replica, which would serve it best? Each factor
//! scores a node from 0 to 100; the total is their weighted mean, so it is 0–100 too, and
//! every decision can be explained factor by factor.

use std::fmt;

use cloudless_types::{DeviceClass, Resources, Strategy, TaintEffect};

use crate::model::{Cluster, Node, NodeId, Workload};

/// The scoring factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Factor {
    /// Preferred placement terms satisfied: preferred node rules, preferred affinity and
    /// anti-affinity, untolerated soft taints (a penalty). 100 when the workload states no
    /// preference.
    Locality,
    /// Uptime over the recent window, minus recent failures, scaled by device class stability.
    Reliability,
    /// Cheaper nodes score higher, relative to the dearest candidate.
    Cost,
    /// How full the node would be after placing the replica: high is good when bin-packing,
    /// low is good when spreading.
    Utilization,
    /// Round-trip time to the leader or the workload's peers; metered links score half.
    Network,
}

impl Factor {
    /// Every factor, in display order.
    pub const ALL: [Factor; 5] =
        [Factor::Locality, Factor::Reliability, Factor::Cost, Factor::Utilization, Factor::Network];
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Factor::Locality => "locality",
            Factor::Reliability => "reliability",
            Factor::Cost => "cost",
            Factor::Utilization => "utilization",
            Factor::Network => "network",
        })
    }
}

/// Factor weights. The defaults are the original design's: locality 0.3, reliability 0.25,
/// cost 0.15, utilization 0.2, network 0.1. Only their ratios matter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Weight of [`Factor::Locality`].
    pub locality: f64,
    /// Weight of [`Factor::Reliability`].
    pub reliability: f64,
    /// Weight of [`Factor::Cost`].
    pub cost: f64,
    /// Weight of [`Factor::Utilization`].
    pub utilization: f64,
    /// Weight of [`Factor::Network`].
    pub network: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { locality: 0.3, reliability: 0.25, cost: 0.15, utilization: 0.2, network: 0.1 }
    }
}

/// Why [`Weights`] were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sched.weights.{factor}: {reason}")]
pub struct WeightsError {
    /// The offending factor, or `sum`.
    pub factor: String,
    /// What is wrong.
    pub reason: String,
}

impl Weights {
    /// The weight of one factor.
    pub fn get(&self, f: Factor) -> f64 {
        match f {
            Factor::Locality => self.locality,
            Factor::Reliability => self.reliability,
            Factor::Cost => self.cost,
            Factor::Utilization => self.utilization,
            Factor::Network => self.network,
        }
    }

    /// All weights must be finite and non-negative, and at least one positive.
    pub fn validate(&self) -> Result<(), WeightsError> {
        for f in Factor::ALL {
            let w = self.get(f);
            if !w.is_finite() || w < 0.0 {
                return Err(WeightsError {
                    factor: f.to_string(),
                    reason: format!("{w} is not a finite, non-negative number"),
                });
            }
        }
        if self.sum() <= 0.0 {
            return Err(WeightsError {
                factor: "sum".into(),
                reason: "at least one weight must be positive".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn sum(&self) -> f64 {
        Factor::ALL.iter().map(|f| self.get(*f)).sum()
    }
}

/// One factor's part in a node's score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FactorScore {
    /// The factor.
    pub factor: Factor,
    /// Its score, 0–100.
    pub score: f64,
    /// Its weight.
    pub weight: f64,
    /// What it adds to the total (score × weight / sum of weights).
    pub contribution: f64,
}

/// A node's score and how it came about.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The node.
    pub node: NodeId,
    /// The total, 0–100.
    pub total: f64,
    /// Each factor's part.
    pub factors: Vec<FactorScore>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:.1}", self.node, self.total)?;
        for s in &self.factors {
            write!(f, "  {} {:.0}×{:.2}", s.factor, s.score, s.weight)?;
        }
        Ok(())
    }
}

/// Penalty for each soft (PreferNoSchedule) taint the workload does not tolerate.
const SOFT_TAINT_PENALTY: f64 = 30.0;
/// Reliability lost per failure in the recent window: three failures cost almost half.
const FAILURE_PENALTY: f64 = 15.0;
/// Round trips at or beyond this score zero on the network factor.
const WORST_RTT_MS: f64 = 500.0;

/// How stable a device class is, as a multiplier of its reliability.
fn class_stability(c: DeviceClass) -> f64 {
    match c {
        DeviceClass::Server => 1.0,
        DeviceClass::Desktop => 0.95,
        DeviceClass::Gateway => 0.9,
        DeviceClass::Laptop => 0.8,
        DeviceClass::Phone => 0.6,
    }
}

pub(crate) fn reliability(n: &Node) -> f64 {
    let base = f64::from(n.uptime.clamp(0.0, 1.0)) * 100.0
        - FAILURE_PENALTY * f64::from(n.recent_failures);
    base.clamp(0.0, 100.0) * class_stability(n.device_class)
}

pub(crate) fn cost(n: &Node, max_cost: f64) -> f64 {
    if max_cost <= 0.0 {
        return 100.0;
    }
    (100.0 * (1.0 - f64::from(n.cost.max(0.0)) / max_cost)).clamp(0.0, 100.0)
}

pub(crate) fn network(n: &Node) -> f64 {
    let base = match n.rtt_ms {
        None => 50.0,
        Some(r) => 100.0 * (1.0 - f64::from(r).min(WORST_RTT_MS) / WORST_RTT_MS),
    };
    if n.metered { base * 0.5 } else { base }
}

/// Utilization after adding `need` to `used`, as a 0–100 score for `strategy`.
pub(crate) fn utilization(
    alloc: &Resources,
    used: &Resources,
    need: &Resources,
    strategy: Strategy,
) -> f64 {
    let mut sum = 0.0;
    let mut dims = 0.0;
    let mut dim = |alloc: u32, used: u32, need: u32, always: bool| {
        if alloc > 0 && (always || need > 0) {
            sum += (f64::from(used.saturating_add(need)) / f64::from(alloc)).min(1.0);
            dims += 1.0;
        }
    };
    dim(alloc.cpu_millis, used.cpu_millis, need.cpu_millis, true);
    dim(alloc.memory_mib, used.memory_mib, need.memory_mib, true);
    dim(alloc.disk_mib, used.disk_mib, need.disk_mib, false);
    dim(u32::from(alloc.gpus), u32::from(used.gpus), u32::from(need.gpus), false);
    let frac = if dims > 0.0 { sum / dims } else { 0.0 };
    match strategy {
        Strategy::BinPack => 100.0 * frac,
        Strategy::Spread => 100.0 * (1.0 - frac),
    }
}

/// The static part of locality: preferred node rules and preferred (anti-)affinity to other
/// workloads, as satisfied weight; the penalty for untolerated soft taints.
pub(crate) fn locality_static(
    c: &Cluster,
    i: usize,
    w: &Workload,
    labels: &crate::filter::Labels,
) -> (f64, f64) {
    let n = &c.nodes[i];
    let p = &w.placement;
    let mut satisfied = 0.0;
    for (weight, rule) in &labels.preferred {
        if rule.matches(c.labels_of(i)) {
            satisfied += weight;
        }
    }
    for (weight, term) in p.preferred_affinity.iter().filter(|(_, t)| *t.workload != *w.id) {
        if c.count_in(&term.workload, i, term.topology) > 0 {
            satisfied += f64::from(*weight);
        }
    }
    for (weight, term) in p.preferred_anti_affinity.iter().filter(|(_, t)| *t.workload != *w.id) {
        if c.count_in(&term.workload, i, term.topology) == 0 {
            satisfied += f64::from(*weight);
        }
    }
    let soft = n
        .taints
        .iter()
        .filter(|t| {
            t.effect == TaintEffect::PreferNoSchedule
                && !p.tolerations.iter().any(|tol| tol.tolerates(t))
        })
        .count();
    (satisfied, SOFT_TAINT_PENALTY * soft as f64)
}

/// Total weight of all preferred terms (the denominator of locality).
pub(crate) fn preference_weight(w: &Workload) -> f64 {
    let p = &w.placement;
    p.preferred_node_rules.iter().map(|(w, _)| f64::from(*w)).sum::<f64>()
        + p.preferred_affinity.iter().map(|(w, _)| f64::from(*w)).sum::<f64>()
        + p.preferred_anti_affinity.iter().map(|(w, _)| f64::from(*w)).sum::<f64>()
}

pub(crate) fn locality(satisfied: f64, total_weight: f64, penalty: f64) -> f64 {
    let base = if total_weight > 0.0 { 100.0 * satisfied / total_weight } else { 100.0 };
    (base - penalty).clamp(0.0, 100.0)
}

#[cfg(test)]
mod tests {
    use cloudless_types::{LabelOp, LabelRule, Taint};

    use super::*;
    use crate::model::Node;

    fn res(cpu: u32, mem: u32) -> Resources {
        Resources { cpu_millis: cpu, memory_mib: mem, disk_mib: 0, gpus: 0 }
    }

    #[test]
    fn weights_default_and_validation() {
        let w = Weights::default();
        assert!((w.sum() - 1.0).abs() < 1e-9);
        w.validate().unwrap();
        let bad = Weights { cost: -1.0, ..w };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "sched.weights.cost: -1 is not a finite, non-negative number"
        );
        let zero =
            Weights { locality: 0.0, reliability: 0.0, cost: 0.0, utilization: 0.0, network: 0.0 };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn reliability_prefers_uptime_stable_classes_and_few_failures() {
        let n = Node::new("a", res(1, 1));
        let server = Node { device_class: DeviceClass::Server, ..n.clone() };
        let phone = Node { device_class: DeviceClass::Phone, ..n.clone() };
        assert!(reliability(&server) > reliability(&phone));
        let flaky = Node { recent_failures: 3, ..server.clone() };
        assert!((reliability(&flaky) - 55.0).abs() < 1e-9);
        let away = Node { uptime: 0.5, ..server };
        assert!((reliability(&away) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn cost_and_network() {
        let n = Node { cost: 2.0, ..Node::new("a", res(1, 1)) };
        assert!((cost(&n, 4.0) - 50.0).abs() < 1e-9);
        assert_eq!(cost(&n, 0.0), 100.0);
        assert_eq!(network(&Node { rtt_ms: Some(0), ..n.clone() }), 100.0);
        assert_eq!(network(&Node { rtt_ms: Some(250), ..n.clone() }), 50.0);
        assert_eq!(network(&Node { rtt_ms: Some(5000), ..n.clone() }), 0.0);
        assert_eq!(network(&Node { rtt_ms: Some(0), metered: true, ..n }), 50.0);
    }

    #[test]
    fn utilization_depends_on_strategy() {
        let alloc = res(1000, 1000);
        let half = utilization(&alloc, &res(400, 400), &res(100, 100), Strategy::BinPack);
        assert!((half - 50.0).abs() < 1e-9);
        let spread = utilization(&alloc, &res(400, 400), &res(100, 100), Strategy::Spread);
        assert!((spread - 50.0).abs() < 1e-9);
        assert!(utilization(&alloc, &res(800, 800), &res(100, 100), Strategy::BinPack) > half);
    }

    #[test]
    fn locality_counts_preferred_terms_and_soft_taints() {
        let mut c = Cluster::new();
        let mut n = Node::new("a", res(1, 1));
        n.labels.insert("ssd".into(), "yes".into());
        n.taints.push(Taint {
            key: "busy".into(),
            value: String::new(),
            effect: TaintEffect::PreferNoSchedule,
        });
        c.add_node(n).unwrap();
        let mut w = Workload::new("w", cloudless_types::Runtime::Wasi, res(1, 1), 1);
        w.placement
            .preferred_node_rules
            .push((30, LabelRule { key: "ssd".into(), op: LabelOp::Exists }));
        w.placement
            .preferred_node_rules
            .push((70, LabelRule { key: "gpu".into(), op: LabelOp::Exists }));
        let (sat, pen) = locality_static(&c, 0, &w, &crate::filter::Labels::compile(&c, &w));
        assert_eq!(sat, 30.0);
        assert_eq!(pen, SOFT_TAINT_PENALTY);
        assert!((locality(sat, preference_weight(&w), pen) - 0.0).abs() < 1e-9);
        assert_eq!(locality(0.0, 0.0, 0.0), 100.0, "no preference is neutral");
    }
}
