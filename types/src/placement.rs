//! Where a workload may and would like to run: the placement part of a workload spec, and the
//! resources it asks for. The scheduler reads these; the spec parser (a later issue) fills
//! them from YAML.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{DeviceClass, InvalidInput, invalid};

/// An amount of each schedulable resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk in MiB.
    pub disk_mib: u32,
    /// Whole GPUs.
    pub gpus: u16,
}

impl Resources {
    /// Nothing at all.
    pub const ZERO: Resources = Resources { cpu_millis: 0, memory_mib: 0, disk_mib: 0, gpus: 0 };

    /// Whether `self` fits in `room` in every dimension.
    pub fn fits_in(&self, room: &Resources) -> bool {
        self.cpu_millis <= room.cpu_millis
            && self.memory_mib <= room.memory_mib
            && self.disk_mib <= room.disk_mib
            && self.gpus <= room.gpus
    }

    /// The sum, saturating at the maximum of each dimension.
    pub fn saturating_add(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_mib: self.disk_mib.saturating_add(o.disk_mib),
            gpus: self.gpus.saturating_add(o.gpus),
        }
    }

    /// The difference, stopping at zero in each dimension.
    pub fn saturating_sub(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_mib: self.disk_mib.saturating_sub(o.disk_mib),
            gpus: self.gpus.saturating_sub(o.gpus),
        }
    }

    /// Whether every dimension is zero.
    pub fn is_zero(&self) -> bool {
        *self == Resources::ZERO
    }
}

/// How a taint repels workloads that do not tolerate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaintEffect {
    /// Nothing new is placed on the node.
    NoSchedule,
    /// The node is avoided if possible (a scoring penalty, not a filter).
    PreferNoSchedule,
    /// Nothing new is placed, and running replicas that do not tolerate it are moved.
    NoExecute,
}

/// A mark on a node that keeps workloads away unless they tolerate it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Taint {
    /// The taint's key, for example `dedicated`.
    pub key: String,
    /// Its value, possibly empty.
    pub value: String,
    /// What it does.
    pub effect: TaintEffect,
}

/// A workload's permission to run on nodes with a matching taint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Toleration {
    /// The taint key tolerated; `None` with `value: None` tolerates every taint.
    pub key: Option<String>,
    /// `Some`: the taint's value must equal it; `None`: any value (Kubernetes' `Exists`).
    pub value: Option<String>,
    /// The effect tolerated; `None` tolerates every effect.
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    /// Whether this toleration covers `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.key.as_deref().is_none_or(|k| k == taint.key)
            && self.value.as_deref().is_none_or(|v| v == taint.value)
            && self.effect.is_none_or(|e| e == taint.effect)
    }
}

/// How a [`LabelRule`] compares a label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LabelOp {
    /// The label's value is one of these.
    In(Vec<String>),
    /// The label is absent or its value is none of these.
    NotIn(Vec<String>),
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A condition on one node label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelRule {
    /// The label key.
    pub key: String,
    /// The condition.
    pub op: LabelOp,
}

impl LabelRule {
    /// Whether a node with `labels` satisfies the rule.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match &self.op {
            LabelOp::In(values) => v.is_some_and(|v| values.iter().any(|x| x == v)),
            LabelOp::NotIn(values) => v.is_none_or(|v| !values.iter().any(|x| x == v)),
            LabelOp::Exists => v.is_some(),
            LabelOp::DoesNotExist => v.is_none(),
        }
    }
}

/// The extent within which workload affinity, anti-affinity and spread count replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topology {
    /// The same node.
    Node,
    /// The same zone.
    Zone,
    /// The same region.
    Region,
}

/// Co-location with (affinity) or away from (anti-affinity) another workload's replicas.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkloadTerm {
    /// The other workload, by name (it may be the workload itself).
    pub workload: String,
    /// Within which extent.
    pub topology: Topology,
}

/// Spread replicas evenly over zones or regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spread {
    /// Zones or regions.
    pub topology: Topology,
    /// Largest allowed difference between the most and the least loaded domain that can still
    /// take a replica.
    pub max_skew: u32,
}

/// Whether to fill nodes up or spread replicas thin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// Prefer the fullest node that fits: leaves whole devices idle (and asleep).
    #[default]
    BinPack,
    /// Prefer the emptiest node: least interference, most headroom.
    Spread,
}

/// Which devices a workload accepts, beyond their resources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRules {
    /// Acceptable device classes; empty accepts every class.
    pub classes: Vec<DeviceClass>,
    /// Run on devices that are on battery (off by default: a phone's owner comes first).
    pub allow_battery: bool,
    /// Run on devices with a metered link.
    pub allow_metered: bool,
}

/// Where a workload may run (required terms are filters) and would like to run (preferred
/// terms add to the score).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Every label here must be on the node with this value.
    pub node_selector: BTreeMap<String, String>,
    /// Taints the workload tolerates.
    pub tolerations: Vec<Toleration>,
    /// Acceptable zones; empty accepts every zone.
    pub zones: Vec<String>,
    /// Acceptable regions; empty accepts every region.
    pub regions: Vec<String>,
    /// Node label rules that must all hold.
    pub required_node_rules: Vec<LabelRule>,
    /// Node label rules that add their weight (1–100) to the locality score when they hold.
    pub preferred_node_rules: Vec<(u32, LabelRule)>,
    /// Must run within the extent of at least one replica of each named workload.
    pub affinity: Vec<WorkloadTerm>,
    /// Must not run within the extent of any replica of each named workload (naming the
    /// workload itself with `Node` puts at most one replica per node).
    pub anti_affinity: Vec<WorkloadTerm>,
    /// Preferred co-location, with weights (1–100).
    pub preferred_affinity: Vec<(u32, WorkloadTerm)>,
    /// Preferred separation, with weights (1–100).
    pub preferred_anti_affinity: Vec<(u32, WorkloadTerm)>,
    /// Even spread over zones or regions.
    pub spread: Option<Spread>,
    /// Device rules.
    pub device: DeviceRules,
    /// Bin-pack or spread.
    pub strategy: Strategy,
}

/// Most terms of each kind in one placement; specs are for people, not for data.
pub const MAX_TERMS: usize = 32;

impl Placement {
    /// Checks the bounds and weights; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let counts = [
            ("placement.node_selector", self.node_selector.len()),
            ("placement.tolerations", self.tolerations.len()),
            ("placement.zones", self.zones.len()),
            ("placement.regions", self.regions.len()),
            ("placement.required_node_rules", self.required_node_rules.len()),
            ("placement.preferred_node_rules", self.preferred_node_rules.len()),
            ("placement.affinity", self.affinity.len()),
            ("placement.anti_affinity", self.anti_affinity.len()),
            ("placement.preferred_affinity", self.preferred_affinity.len()),
            ("placement.preferred_anti_affinity", self.preferred_anti_affinity.len()),
        ];
        for (field, n) in counts {
            if n > MAX_TERMS {
                return Err(invalid(field, format!("{n} terms, at most {MAX_TERMS}")));
            }
        }
        let weights = self
            .preferred_node_rules
            .iter()
            .map(|(w, _)| ("placement.preferred_node_rules", *w))
            .chain(
                self.preferred_affinity.iter().map(|(w, _)| ("placement.preferred_affinity", *w)),
            )
            .chain(
                self.preferred_anti_affinity
                    .iter()
                    .map(|(w, _)| ("placement.preferred_anti_affinity", *w)),
            );
        for (field, w) in weights {
            if !(1..=100).contains(&w) {
                return Err(invalid(field, format!("weight {w} is not in 1..=100")));
            }
        }
        for rule in
            self.required_node_rules.iter().chain(self.preferred_node_rules.iter().map(|(_, r)| r))
        {
            if let LabelOp::In(v) | LabelOp::NotIn(v) = &rule.op
                && v.is_empty()
            {
                return Err(invalid(
                    format!("placement.node_rules.{}", rule.key),
                    "In and NotIn need at least one value",
                ));
            }
        }
        if let Some(s) = &self.spread {
            if s.max_skew == 0 {
                return Err(invalid("placement.spread.max_skew", "must be at least 1"));
            }
            if s.topology == Topology::Node {
                return Err(invalid(
                    "placement.spread.topology",
                    "spread is over zones or regions; use anti-affinity for nodes",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn label_rules() {
        let l = labels(&[("gpu", "a100"), ("owner", "alice")]);
        let rule = |key: &str, op| LabelRule { key: key.into(), op };
        assert!(rule("gpu", LabelOp::In(vec!["a100".into(), "h100".into()])).matches(&l));
        assert!(!rule("gpu", LabelOp::NotIn(vec!["a100".into()])).matches(&l));
        assert!(rule("tpu", LabelOp::NotIn(vec!["x".into()])).matches(&l));
        assert!(rule("owner", LabelOp::Exists).matches(&l));
        assert!(rule("tpu", LabelOp::DoesNotExist).matches(&l));
        assert!(!rule("tpu", LabelOp::In(vec!["x".into()])).matches(&l));
    }

    #[test]
    fn tolerations() {
        let t =
            Taint { key: "dedicated".into(), value: "ml".into(), effect: TaintEffect::NoSchedule };
        let any = Toleration { key: None, value: None, effect: None };
        assert!(any.tolerates(&t));
        let exact = Toleration {
            key: Some("dedicated".into()),
            value: Some("ml".into()),
            effect: Some(TaintEffect::NoSchedule),
        };
        assert!(exact.tolerates(&t));
        let wrong =
            Toleration { key: Some("dedicated".into()), value: Some("web".into()), effect: None };
        assert!(!wrong.tolerates(&t));
        let exists = Toleration {
            key: Some("dedicated".into()),
            value: None,
            effect: Some(TaintEffect::NoExecute),
        };
        assert!(!exists.tolerates(&t), "the effect must match too");
    }

    #[test]
    fn resources_arithmetic() {
        let a = Resources { cpu_millis: 500, memory_mib: 256, disk_mib: 0, gpus: 0 };
        let room = Resources { cpu_millis: 1000, memory_mib: 256, disk_mib: 10, gpus: 0 };
        assert!(a.fits_in(&room));
        assert!(!a.saturating_add(&a).fits_in(&room));
        assert_eq!(room.saturating_sub(&a).memory_mib, 0);
    }

    #[test]
    fn placement_validation_names_the_field() {
        let mut p = Placement::default();
        p.validate().unwrap();
        p.preferred_node_rules.push((0, LabelRule { key: "x".into(), op: LabelOp::Exists }));
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .starts_with("placement.preferred_node_rules: weight 0")
        );
        let p = Placement {
            spread: Some(Spread { topology: Topology::Zone, max_skew: 0 }),
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().starts_with("placement.spread.max_skew"));
        let p = Placement {
            required_node_rules: vec![LabelRule { key: "k".into(), op: LabelOp::In(vec![]) }],
            ..Default::default()
        };
        assert!(p.validate().is_err());
    }
}
