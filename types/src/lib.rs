//! Shared vocabulary of Cloudless.
//!
//! Every other crate speaks in these types: the names and ids that cross crate boundaries
//! ([`WorkloadName`], [`ModuleHash`], [`NodeName`], [`ReplicaId`], [`ReplicaPhase`], each
//! validated once when it is made), what kind of device a node is, which runtimes it offers,
//! how much it can run right now ([`Capacity`]), the slowly changing description of a node
//! ([`NodeDescriptor`]), what a user asks to run ([`WorkloadSpec`]), and the shape of an RPC
//! service ([`Rpc`]). The crate has no dependency on any other Cloudless crate and no I/O; it
//! only defines data and validates it.
//!
//! ```text
//!  runtime ──(measures)──▶ Capacity ──(mesh gossips)──▶ every node ──▶ sched (placement)
//!  node config ──▶ NodeDescriptor ──(mesh directory, signed entries)──▶ every node
//!  cloudlessctl ──▶ WorkloadSpec (WorkloadName, Image::Wasi(ModuleHash)) ──▶ raft ──▶
//!       ReplicaId ──▶ runtime ──▶ ReplicaPhase ──▶ raft ──▶ reads
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of device a node runs on. The scheduler and the raft voter selection prefer the
/// more stable classes (a VPS over a PC over a laptop over a phone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// A rented or owned server with a stable address: the most stable class.
    Server,
    /// A desktop PC, usually on mains power.
    Desktop,
    /// An IoT gateway or single-board computer: mains power, little capacity.
    Gateway,
    /// A laptop: comes and goes, sometimes on battery.
    Laptop,
    /// A phone or tablet: WASI only, battery and metered links, the least stable class.
    Phone,
}

impl DeviceClass {
    /// Every class, most stable first.
    pub const ALL: [DeviceClass; 5] = [
        DeviceClass::Server,
        DeviceClass::Desktop,
        DeviceClass::Gateway,
        DeviceClass::Laptop,
        DeviceClass::Phone,
    ];

    /// The lowercase name used in config files and specs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Server => "server",
            DeviceClass::Desktop => "desktop",
            DeviceClass::Gateway => "gateway",
            DeviceClass::Laptop => "laptop",
            DeviceClass::Phone => "phone",
        }
    }

    /// Parses the lowercase name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind of workload runtime a node can offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// OCI containers through a Docker Engine API socket.
    Container,
    /// WebAssembly modules and components through wasmtime.
    Wasi,
}

impl Runtime {
    fn bit(self) -> u8 {
        match self {
            Runtime::Container => 1,
            Runtime::Wasi => 2,
        }
    }

    /// The lowercase name used in config files and specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Container => "container",
            Runtime::Wasi => "wasi",
        }
    }

    /// Parses the lowercase name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        [Runtime::Container, Runtime::Wasi].into_iter().find(|r| r.as_str() == s)
    }
}

/// A set of [`Runtime`]s, stored as one byte so capacity summaries stay small on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Runtimes(u8);

impl Runtimes {
    /// No runtime at all (a node that only routes and votes).
    pub const NONE: Runtimes = Runtimes(0);

    /// The set holding exactly the given runtimes.
    pub fn of(runtimes: &[Runtime]) -> Self {
        Runtimes(runtimes.iter().fold(0, |acc, r| acc | r.bit()))
    }

    /// Whether the set offers `runtime`.
    pub fn contains(self, runtime: Runtime) -> bool {
        self.0 & runtime.bit() != 0
    }

    /// The runtimes in the set, in a fixed order.
    pub fn iter(self) -> impl Iterator<Item = Runtime> {
        [Runtime::Container, Runtime::Wasi].into_iter().filter(move |r| self.contains(*r))
    }

    /// Whether the set holds only bits that name a known runtime.
    pub fn is_valid(self) -> bool {
        self.0 & !(Runtime::Container.bit() | Runtime::Wasi.bit()) == 0
    }
}

/// Where a device draws power from right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Power {
    /// Plugged in (or no battery at all).
    Mains,
    /// On battery, with the charge left in percent (0–100).
    Battery(u8),
}

/// What a node can run right now: the small, versioned summary that every member gossips.
///
/// Units are chosen so the summary encodes in about 20 bytes: CPU in millicores, memory and disk
/// in MiB. "Free" is what is left for Cloudless after what the owner reserved for themselves and
/// what running replicas use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU the node offers to Cloudless in total, in millicores.
    pub cpu_total_millis: u32,
    /// CPU not yet used by replicas, in millicores.
    pub cpu_free_millis: u32,
    /// Memory offered in total, in MiB.
    pub memory_total_mib: u32,
    /// Memory not yet used, in MiB.
    pub memory_free_mib: u32,
    /// Disk offered in total, in MiB.
    pub disk_total_mib: u32,
    /// Disk not yet used, in MiB.
    pub disk_free_mib: u32,
    /// Replicas running on the node.
    pub workloads: u16,
    /// Power source right now.
    pub power: Power,
    /// Whether the node's link is metered (mobile data, capped plans).
    pub metered: bool,
    /// Runtimes the node offers right now.
    pub runtimes: Runtimes,
}

/// Why a [`Capacity`] or [`NodeDescriptor`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// A field holds a value that cannot be true.
    #[error("{field}: {reason}")]
    Field {
        /// Path of the offending field, for example `labels.zone`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidInput {
    InvalidInput::Field { field: field.into(), reason: reason.into() }
}

impl Capacity {
    /// An idle node with nothing offered, used before the runtime has measured anything.
    pub const EMPTY: Capacity = Capacity {
        cpu_total_millis: 0,
        cpu_free_millis: 0,
        memory_total_mib: 0,
        memory_free_mib: 0,
        disk_total_mib: 0,
        disk_free_mib: 0,
        workloads: 0,
        power: Power::Mains,
        metered: false,
        runtimes: Runtimes::NONE,
    };

    /// Checks that free never exceeds total and that enumerations are known.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.cpu_free_millis > self.cpu_total_millis {
            return Err(invalid("cpu_free_millis", "exceeds cpu_total_millis"));
        }
        if self.memory_free_mib > self.memory_total_mib {
            return Err(invalid("memory_free_mib", "exceeds memory_total_mib"));
        }
        if self.disk_free_mib > self.disk_total_mib {
            return Err(invalid("disk_free_mib", "exceeds disk_total_mib"));
        }
        if let Power::Battery(p) = self.power
            && p > 100
        {
            return Err(invalid("power", format!("battery at {p} % is above 100 %")));
        }
        if !self.runtimes.is_valid() {
            return Err(invalid("runtimes", "names an unknown runtime"));
        }
        Ok(())
    }

    /// Whether `self` differs from `previous` enough to be worth telling the cluster now rather
    /// than at the next periodic re-announcement.
    ///
    /// A change is meaningful when anything discrete changed (power source, metered link,
    /// runtimes, totals, replica count) or when free CPU, memory or disk moved by at least
    /// [`Capacity::MEANINGFUL_PERCENT`] of the total. Small drifts in free resources are left to
    /// the periodic re-announcement so that a busy node does not flood the cluster.
    pub fn differs_meaningfully(&self, previous: &Capacity) -> bool {
        fn moved(now: u32, before: u32, total: u32) -> bool {
            let delta = u64::from(now.abs_diff(before)) * 100;
            delta >= u64::from(total.max(1)) * u64::from(Capacity::MEANINGFUL_PERCENT)
        }
        self.power != previous.power
            || self.metered != previous.metered
            || self.runtimes != previous.runtimes
            || self.cpu_total_millis != previous.cpu_total_millis
            || self.memory_total_mib != previous.memory_total_mib
            || self.workloads != previous.workloads
            || moved(self.cpu_free_millis, previous.cpu_free_millis, self.cpu_total_millis)
            || moved(self.memory_free_mib, previous.memory_free_mib, self.memory_total_mib)
            || self.disk_total_mib != previous.disk_total_mib
            || moved(self.disk_free_mib, previous.disk_free_mib, self.disk_total_mib)
    }

    /// Free CPU, memory or disk must move by this share of the total (in percent) before a change is
    /// announced early: 10 % keeps the scheduler's view within one typical replica of the truth
    /// while ignoring measurement noise.
    pub const MEANINGFUL_PERCENT: u32 = 10;
}

/// Largest number of labels a node may carry; labels are for selection, not for storage.
pub const MAX_LABELS: usize = 64;
/// Largest label key, in bytes (as Kubernetes label names).
pub const MAX_LABEL_KEY: usize = 63;
/// Largest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 253;
/// Largest number of addresses a node advertises; more only slows dialing down.
pub const MAX_ADDRS: usize = 16;
/// Largest length of one address or of zone and region names, in bytes.
pub const MAX_NAME: usize = 256;
/// Most replicas a node may say it runs at once: four times a server's default. A WASI
/// instance slot reserves address space for two memories (each up to its 4 GiB reservation
/// and guard) and a stack, so a pool of 1,024 reserves about 10 TiB of the 128 TiB a 64-bit
/// Linux process has.
pub const MAX_NODE_REPLICAS: u32 = 1024;

/// The slowly changing description of a node: how to reach it, what it is and what it offers at
/// most. Held in the mesh's replicated node directory; only the node itself edits its entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescriptor {
    /// Multiaddresses the node listens on, as text.
    pub addrs: Vec<String>,
    /// Free-form labels for node selectors (`gpu=true`, `owner=alice`).
    pub labels: BTreeMap<String, String>,
    /// Failure zone, for example a building or a home network.
    pub zone: Option<String>,
    /// Region, for example a city or a cloud region.
    pub region: Option<String>,
    /// The device class, if the owner stated it.
    pub device_class: Option<DeviceClass>,
    /// Runtimes the node can offer when it has capacity.
    pub runtimes: Vec<Runtime>,
    /// CPU offered at most, in millicores.
    pub cpu_millis: u32,
    /// Memory offered at most, in MiB.
    pub memory_mib: u32,
    /// Disk offered at most, in MiB.
    pub disk_mib: u32,
    /// GPUs offered.
    pub gpus: u16,
    /// Replicas it runs at once at most, of any runtime (the size of its WASI instance pool,
    /// like kubelet's `maxPods`); `None`: not stated, no limit.
    pub max_replicas: Option<u32>,
}

impl NodeDescriptor {
    /// Checks every bound; the error names the offending field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.addrs.len() > MAX_ADDRS {
            return Err(invalid(
                "addrs",
                format!("{} entries, at most {MAX_ADDRS}", self.addrs.len()),
            ));
        }
        for (i, a) in self.addrs.iter().enumerate() {
            if a.is_empty() || a.len() > MAX_NAME {
                return Err(invalid(
                    format!("addrs[{i}]"),
                    format!("length {} not in 1..={MAX_NAME}", a.len()),
                ));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid(
                "labels",
                format!("{} labels, at most {MAX_LABELS}", self.labels.len()),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_LABEL_KEY || !k.bytes().all(label_byte) {
                return Err(invalid(
                    format!("labels.{k}"),
                    format!("key must be 1..={MAX_LABEL_KEY} of [A-Za-z0-9._/-]"),
                ));
            }
            if v.len() > MAX_LABEL_VALUE || !v.bytes().all(label_byte) {
                return Err(invalid(
                    format!("labels.{k}"),
                    format!("value must be at most {MAX_LABEL_VALUE} of [A-Za-z0-9._/-]"),
                ));
            }
        }
        for (field, v) in [("zone", &self.zone), ("region", &self.region)] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > MAX_NAME)
            {
                return Err(invalid(field, format!("length {} not in 1..={MAX_NAME}", v.len())));
            }
        }
        let mut seen = Vec::new();
        for r in &self.runtimes {
            if seen.contains(r) {
                return Err(invalid("runtimes", format!("{} listed twice", r.as_str())));
            }
            seen.push(*r);
        }
        if let Some(n) = self.max_replicas
            && !(1..=MAX_NODE_REPLICAS).contains(&n)
        {
            return Err(invalid("max_replicas", format!("{n} not in 1..={MAX_NODE_REPLICAS}")));
        }
        Ok(())
    }
}

fn label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capacity {
        Capacity {
            cpu_total_millis: 4000,
            cpu_free_millis: 3000,
            memory_total_mib: 8192,
            memory_free_mib: 4096,
            disk_total_mib: 100_000,
            disk_free_mib: 50_000,
            workloads: 2,
            power: Power::Mains,
            metered: false,
            runtimes: Runtimes::of(&[Runtime::Wasi, Runtime::Container]),
        }
    }

    #[test]
    fn a_replica_limit_outside_its_bounds_is_refused() {
        for (n, ok) in [
            (None, true),
            (Some(1), true),
            (Some(MAX_NODE_REPLICAS), true),
            (Some(0), false),
            (Some(MAX_NODE_REPLICAS + 1), false),
        ] {
            let d = NodeDescriptor { max_replicas: n, ..Default::default() };
            match d.validate() {
                Ok(()) => assert!(ok, "{n:?} was taken"),
                Err(e) => {
                    assert!(!ok, "{n:?}: {e}");
                    assert!(e.to_string().contains("max_replicas"), "{e}");
                }
            }
        }
    }

    #[test]
    fn small_drift_is_not_meaningful_but_discrete_changes_are() {
        let base = cap();
        let drift = Capacity { cpu_free_millis: 2900, ..base };
        assert!(!drift.differs_meaningfully(&base));
        let big = Capacity { cpu_free_millis: 2500, ..base };
        assert!(big.differs_meaningfully(&base));
        let battery = Capacity { power: Power::Battery(80), ..base };
        assert!(battery.differs_meaningfully(&base));
        let one_more = Capacity { workloads: 3, ..base };
        assert!(one_more.differs_meaningfully(&base));
    }

    #[test]
    fn capacity_validation_names_the_field() {
        let bad = Capacity { cpu_free_millis: 5000, ..cap() };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "cpu_free_millis: exceeds cpu_total_millis"
        );
        let bad = Capacity { power: Power::Battery(101), ..cap() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("power:"));
        assert!(Capacity { runtimes: Runtimes(0x80), ..cap() }.validate().is_err());
        cap().validate().unwrap();
    }

    #[test]
    fn descriptor_validation_names_the_field() {
        let mut d = NodeDescriptor::default();
        d.labels.insert("zone name".into(), "x".into());
        assert!(d.validate().unwrap_err().to_string().starts_with("labels.zone name"));
        let d =
            NodeDescriptor { runtimes: vec![Runtime::Wasi, Runtime::Wasi], ..Default::default() };
        assert_eq!(d.validate().unwrap_err().to_string(), "runtimes: wasi listed twice");
        let d = NodeDescriptor { zone: Some(String::new()), ..Default::default() };
        assert!(d.validate().is_err());
    }

    #[test]
    fn runtimes_round_trip() {
        let set = Runtimes::of(&[Runtime::Wasi]);
        assert!(set.contains(Runtime::Wasi));
        assert!(!set.contains(Runtime::Container));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![Runtime::Wasi]);
        assert_eq!(DeviceClass::parse("laptop"), Some(DeviceClass::Laptop));
        assert_eq!(Runtime::parse("oci"), None);
    }
}

pub mod ids;
pub mod placement;
pub mod rpc;
pub mod spec;
pub use ids::{ModuleHash, NodeName, ReplicaId, ReplicaPhase, WorkloadName};
pub use placement::{
    DeviceRules, LabelOp, LabelRule, Placement, Resources, Spread, Strategy, Taint, TaintEffect,
    Toleration, Topology, WorkloadTerm,
};
pub use rpc::Rpc;
pub use spec::{Image, Kind, Port, Probe, ProbeCheck, Restart, WorkloadSpec};

/// Milliseconds since the Unix epoch by this machine's clock (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lowercase hex of `bytes` (keys, hashes).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
