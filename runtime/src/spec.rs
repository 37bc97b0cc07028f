//! What the runtime runs: one replica of a workload, with everything a driver needs and
//! nothing it does not (placement is the scheduler's business).

use std::collections::BTreeMap;
use std::time::Duration;

use cloudless_types::{Image, Kind, Port, Probe, Restart, WorkloadSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use cloudless_types::ReplicaId;

/// Scratch space of a replica whose spec asks for no disk, in MiB: enough for a program's
/// temporary files, small enough that 64 of them fit on a phone.
pub const DEFAULT_DISK_MIB: u32 = 64;

/// When and how often a replica that stopped is started again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Always, on failure, or never.
    pub when: Restart,
    /// Wait before the first restart; doubled after each one.
    pub backoff_initial: Duration,
    /// The longest wait between restarts.
    pub backoff_max: Duration,
    /// Restarts in a row after which the replica is left failed; `None` for no limit.
    pub max_restarts: Option<u32>,
    /// A run that lasted this long resets the backoff and the count: it was healthy.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    /// Kubernetes' crash-loop backoff shape, scaled for small devices: 1 s doubling to 60 s
    /// (a crashing guest costs a phone little), reset after 10 minutes of running.
    fn default() -> Self {
        RestartPolicy {
            when: Restart::Always,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_restarts: None,
            reset_after: Duration::from_secs(600),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `n` (0-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

/// One replica as a driver runs it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaSpec {
    /// Which replica.
    pub id: ReplicaId,
    /// Service or job.
    pub kind: Kind,
    /// What runs.
    pub image: Image,
    /// Replaces the image's entry point (containers); for WASI, `argv[0]` and on.
    pub command: Vec<String>,
    /// Arguments after the command.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// CPU the replica may use, in millicores (1000 = one core).
    pub cpu_millis: u32,
    /// Memory the replica may use, in MiB.
    pub memory_mib: u32,
    /// Disk its files may take, in MiB (0: the node's default scratch space).
    pub disk_mib: u32,
    /// Ports it listens on.
    pub ports: Vec<Port>,
    /// May open network connections.
    pub network: bool,
    /// Wall-clock limit of one run.
    pub timeout: Option<Duration>,
    /// Restarts.
    pub restart: RestartPolicy,
    /// Restarted when this fails.
    pub liveness: Option<Probe>,
    /// Ready only while this passes.
    pub readiness: Option<Probe>,
}

impl ReplicaSpec {
    /// Replica `index` of a validated workload spec: limits are the spec's limits, or its
    /// requests when it sets none.
    pub fn from_workload(spec: &WorkloadSpec, index: u32) -> Self {
        let limits = spec.limits.unwrap_or(spec.requests);
        ReplicaSpec {
            id: ReplicaId::new(&spec.name, index),
            kind: spec.kind,
            image: spec.image.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            cpu_millis: limits.cpu_millis,
            memory_mib: limits.memory_mib,
            disk_mib: limits.disk_mib,
            ports: spec.ports.clone(),
            network: spec.network,
            timeout: spec.timeout_secs.map(|s| Duration::from_secs(s.into())),
            restart: RestartPolicy { when: spec.restart, ..RestartPolicy::default() },
            liveness: spec.liveness.clone(),
            readiness: spec.readiness.clone(),
        }
    }

    /// The disk its files may take, in MiB: its limit, or [`DEFAULT_DISK_MIB`] without one.
    pub fn disk_limit_mib(&self) -> u32 {
        if self.disk_mib == 0 { DEFAULT_DISK_MIB } else { self.disk_mib }
    }

    /// A digest of everything that shapes a run (not the restart policy or probes, which the
    /// reconciler applies): a running replica with another fingerprint is replaced, one with
    /// the same fingerprint is adopted.
    pub fn fingerprint(&self) -> String {
        let run = (
            &self.kind,
            &self.image,
            &self.command,
            &self.args,
            &self.env,
            self.cpu_millis,
            self.memory_mib,
            self.disk_mib,
            &self.ports,
            self.network,
            self.timeout,
        );
        let bytes = postcard::to_allocvec(&run).unwrap_or_default();
        let digest = Sha256::digest(bytes);
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_types::Resources;

    fn spec() -> WorkloadSpec {
        WorkloadSpec::new(
            cloudless_types::WorkloadName::new("web").unwrap(),
            Image::Wasi(cloudless_types::ModuleHash::of(b"module")),
            Resources { cpu_millis: 250, memory_mib: 32, disk_mib: 0, gpus: 0 },
            2,
        )
    }

    #[test]
    fn fingerprints_change_with_what_runs_not_with_policy() {
        let a = ReplicaSpec::from_workload(&spec(), 0);
        let mut b = a.clone();
        b.restart.max_restarts = Some(3);
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.env.insert("X".into(), "1".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RestartPolicy::default();
        let waits: Vec<u64> = (0..9).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(60));
    }
}
