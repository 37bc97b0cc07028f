//! The workload spec: what a user asks Cloudless to run. The CLI parses it from YAML or JSON
//! (a later issue), the raft state machine stores it validated, and the scheduler and the
//! runtime read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ModuleHash, WorkloadName};
use crate::placement::{Placement, Resources};
use crate::{InvalidInput, invalid};

/// A long-running service or a job that runs to completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Kept running; replaced when it stops.
    #[default]
    Service,
    /// Runs to completion; restarted only on failure, if at all.
    Job,
}

/// What runs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Image {
    /// An OCI image reference, run by a container engine.
    Container(String),
    /// A WebAssembly module or component, by the hex SHA-256 of its bytes (uploaded with the
    /// spec and stored as a blob).
    Wasi(ModuleHash),
}

/// When a stopped replica is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whatever the exit status (services).
    #[default]
    Always,
    /// Only after a failure.
    OnFailure,
    /// Never.
    Never,
}

/// A port a replica listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Port {
    /// The port inside the replica.
    pub port: u16,
    /// `true` for UDP, `false` for TCP.
    pub udp: bool,
}

/// How a probe checks a replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeCheck {
    /// An HTTP GET on the replica's port answering 200–399.
    Http {
        /// The port inside the replica.
        port: u16,
        /// The path, starting with `/`.
        path: String,
    },
    /// A TCP connection to the replica's port that opens.
    Tcp {
        /// The port inside the replica.
        port: u16,
    },
    /// A command run inside the container that exits 0 (containers only).
    Exec {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

/// A liveness or readiness probe, modelled on Kubernetes': checked every `period_ms` after
/// `initial_delay_ms`; `failure_threshold` failures in a row fail it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Probe {
    /// What to check.
    pub check: ProbeCheck,
    /// Wait this long after the replica starts before the first check.
    pub initial_delay_ms: u32,
    /// Time between checks.
    pub period_ms: u32,
    /// One check fails if it takes longer than this.
    pub timeout_ms: u32,
    /// Failures in a row that fail the probe.
    pub failure_threshold: u32,
}

impl Probe {
    /// A probe with Kubernetes' default timings (every 10 s, 1 s timeout, 3 failures).
    pub fn new(check: ProbeCheck) -> Self {
        Probe {
            check,
            initial_delay_ms: 0,
            period_ms: 10_000,
            timeout_ms: 1_000,
            failure_threshold: 3,
        }
    }

    fn validate(&self, field: &str) -> Result<(), InvalidInput> {
        match &self.check {
            ProbeCheck::Http { port, path } => {
                if *port == 0 {
                    return Err(invalid(format!("{field}.http.port"), "port 0 is not a port"));
                }
                let ok = path.starts_with('/')
                    && path.len() <= MAX_PATH
                    && path.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(invalid(
                        format!("{field}.http.path"),
                        format!("must start with / and be at most {MAX_PATH} printable characters"),
                    ));
                }
            }
            ProbeCheck::Tcp { port } if *port == 0 => {
                return Err(invalid(format!("{field}.tcp.port"), "port 0 is not a port"));
            }
            ProbeCheck::Tcp { .. } => {}
            ProbeCheck::Exec { command } => {
                if command.is_empty() || command.len() > MAX_ARGS {
                    return Err(invalid(
                        format!("{field}.exec.command"),
                        format!("must have 1 to {MAX_ARGS} entries"),
                    ));
                }
                if command.iter().any(|a| a.len() > MAX_STRING || a.contains('\0')) {
                    return Err(invalid(
                        format!("{field}.exec.command"),
                        format!("an entry is longer than {MAX_STRING} bytes or contains NUL"),
                    ));
                }
            }
        }
        for (name, v, min) in [
            ("period_ms", self.period_ms, MIN_PROBE_MS),
            ("timeout_ms", self.timeout_ms, MIN_PROBE_MS),
            ("failure_threshold", self.failure_threshold, 1),
        ] {
            if v < min {
                return Err(invalid(format!("{field}.{name}"), format!("{v} is below {min}")));
            }
        }
        if self.timeout_ms > self.period_ms {
            return Err(invalid(format!("{field}.timeout_ms"), "must not exceed period_ms"));
        }
        Ok(())
    }
}

/// A workload, as submitted and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Unique name: 1–63 of `[a-z0-9-]`, starting with a letter (usable as a DNS label).
    pub name: WorkloadName,
    /// Service or job.
    pub kind: Kind,
    /// What runs.
    pub image: Image,
    /// Replaces the image's entry point.
    pub command: Vec<String>,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// What each replica is guaranteed (the scheduler reserves it).
    pub requests: Resources,
    /// What each replica may use at most; `None` means its requests.
    pub limits: Option<Resources>,
    /// Desired replicas.
    pub replicas: u32,
    /// Replicas that must keep running during voluntary changes.
    pub min_available: u32,
    /// Higher runs first and may preempt lower (-1,000 to 1,000).
    pub priority: i32,
    /// Where it may and would like to run.
    pub placement: Placement,
    /// Restart policy.
    pub restart: Restart,
    /// Ports.
    pub ports: Vec<Port>,
    /// Whether replicas may open network connections (WASI sockets; for containers, a network
    /// at all). Off by default: a replica gets only what it asks for. Ports imply it for
    /// containers.
    #[serde(default)]
    pub network: bool,
    /// Wall-clock limit of one run, in seconds: a replica still running after it is stopped
    /// and reported as timed out (meant for jobs).
    #[serde(default)]
    pub timeout_secs: Option<u32>,
    /// How long the leader waits, after a node running a replica is declared dead, before
    /// placing the replica elsewhere (a device that often drops off for a minute keeps its
    /// work); `None` moves it at once.
    #[serde(default)]
    pub reschedule_after_secs: Option<u32>,
    /// Restarted when this fails.
    #[serde(default)]
    pub liveness: Option<Probe>,
    /// Counted as available only while this passes.
    #[serde(default)]
    pub readiness: Option<Probe>,
}

/// Longest wait before replicas of a dead node move: a day; longer is a node that is gone.
pub const MAX_RESCHEDULE_AFTER: u32 = 86_400;
/// Most replicas of one workload.
pub const MAX_REPLICAS: u32 = 10_000;
/// Most command-line arguments (command and args each).
pub const MAX_ARGS: usize = 256;
/// Most environment variables.
pub const MAX_ENV: usize = 256;
/// Longest argument, environment value or image reference, in bytes.
pub const MAX_STRING: usize = 4096;
/// Most ports.
pub const MAX_PORTS: usize = 64;
/// Priorities range from -MAX_PRIORITY to MAX_PRIORITY.
pub const MAX_PRIORITY: i32 = 1000;
/// Longest probe path, in bytes.
pub const MAX_PATH: usize = 1024;
/// Shortest probe period and timeout: faster checks cost a phone more than they tell.
pub const MIN_PROBE_MS: u32 = 100;

impl WorkloadSpec {
    /// A service with sensible defaults, for tests and examples.
    pub fn new(name: WorkloadName, image: Image, requests: Resources, replicas: u32) -> Self {
        WorkloadSpec {
            name,
            kind: Kind::Service,
            image,
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            requests,
            limits: None,
            replicas,
            min_available: 0,
            priority: 0,
            placement: Placement::default(),
            restart: Restart::Always,
            ports: Vec::new(),
            network: false,
            timeout_secs: None,
            reschedule_after_secs: None,
            liveness: None,
            readiness: None,
        }
    }

    /// Checks every rule; the error names the field and says what is wrong.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        // The name and a module hash are valid by construction.
        if let Image::Container(r) = &self.image
            && (r.is_empty() || r.len() > MAX_STRING || r.chars().any(char::is_whitespace))
        {
            return Err(invalid(
                "image.container",
                "must be a non-empty image reference without spaces",
            ));
        }
        for (field, list) in [("command", &self.command), ("args", &self.args)] {
            if list.len() > MAX_ARGS {
                return Err(invalid(field, format!("{} entries, at most {MAX_ARGS}", list.len())));
            }
            if let Some(i) = list.iter().position(|a| a.len() > MAX_STRING || a.contains('\0')) {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("longer than {MAX_STRING} bytes or contains NUL"),
                ));
            }
        }
        if self.env.len() > MAX_ENV {
            return Err(invalid("env", format!("{} variables, at most {MAX_ENV}", self.env.len())));
        }
        for (k, v) in &self.env {
            let ok_key = !k.is_empty()
                && k.len() <= 255
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok_key {
                return Err(invalid(format!("env.{k}"), "name must be [A-Za-z_][A-Za-z0-9_]*"));
            }
            if v.len() > MAX_STRING || v.contains('\0') {
                return Err(invalid(
                    format!("env.{k}"),
                    format!("value longer than {MAX_STRING} bytes or contains NUL"),
                ));
            }
        }
        if self.requests.is_zero() {
            return Err(invalid("requests", "must request some CPU or memory"));
        }
        if let Some(l) = &self.limits
            && !self.requests.fits_in(l)
        {
            return Err(invalid("limits", "every limit must be at least the request"));
        }
        if self.replicas > MAX_REPLICAS {
            return Err(invalid(
                "replicas",
                format!("{} is more than {MAX_REPLICAS}", self.replicas),
            ));
        }
        if self.min_available > self.replicas {
            return Err(invalid(
                "min_available",
                format!("{} is more than replicas ({})", self.min_available, self.replicas),
            ));
        }
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(invalid(
                "priority",
                format!("{} is not in -{MAX_PRIORITY}..={MAX_PRIORITY}", self.priority),
            ));
        }
        if self.kind == Kind::Job && self.restart == Restart::Always {
            return Err(invalid("restart", "a job runs to completion: use on-failure or never"));
        }
        if self.ports.len() > MAX_PORTS {
            return Err(invalid(
                "ports",
                format!("{} ports, at most {MAX_PORTS}", self.ports.len()),
            ));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(invalid(format!("ports[{i}]"), "port 0 is not a port"));
            }
            if self.ports[..i].contains(p) {
                return Err(invalid(
                    format!("ports[{i}]"),
                    format!("port {} listed twice", p.port),
                ));
            }
        }
        if self.timeout_secs == Some(0) {
            return Err(invalid("timeout_secs", "0 would stop every run at once"));
        }
        if self.reschedule_after_secs.is_some_and(|s| s > MAX_RESCHEDULE_AFTER) {
            return Err(invalid(
                "reschedule_after_secs",
                format!("at most {MAX_RESCHEDULE_AFTER} s (a day)"),
            ));
        }
        if let Some(p) = &self.liveness {
            p.validate("liveness")?;
        }
        if let Some(p) = &self.readiness {
            p.validate("readiness")?;
        }
        self.placement.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec::new(
            WorkloadName::new("web").unwrap(),
            Image::Container("busybox:1".into()),
            Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
            3,
        )
    }

    #[test]
    fn a_good_spec_passes_and_bad_ones_name_their_field() {
        spec().validate().unwrap();
        let cases: Vec<(WorkloadSpec, &str)> = vec![
            (WorkloadSpec { image: Image::Container("".into()), ..spec() }, "image.container"),
            (WorkloadSpec { replicas: 20_000, ..spec() }, "replicas"),
            (WorkloadSpec { min_available: 4, ..spec() }, "min_available"),
            (WorkloadSpec { priority: 5000, ..spec() }, "priority"),
            (WorkloadSpec { requests: Resources::ZERO, ..spec() }, "requests"),
            (
                WorkloadSpec {
                    limits: Some(Resources { cpu_millis: 10, ..Resources::ZERO }),
                    ..spec()
                },
                "limits",
            ),
            (WorkloadSpec { kind: Kind::Job, ..spec() }, "restart"),
            (WorkloadSpec { ports: vec![Port { port: 0, udp: false }], ..spec() }, "ports[0]"),
            (WorkloadSpec { args: vec!["a\0b".into()], ..spec() }, "args[0]"),
            (WorkloadSpec { timeout_secs: Some(0), ..spec() }, "timeout_secs"),
            (
                WorkloadSpec { reschedule_after_secs: Some(86_401), ..spec() },
                "reschedule_after_secs",
            ),
            (
                WorkloadSpec {
                    liveness: Some(Probe::new(ProbeCheck::Http { port: 8080, path: "x".into() })),
                    ..spec()
                },
                "liveness.http.path",
            ),
            (
                WorkloadSpec {
                    readiness: Some(Probe {
                        period_ms: 50,
                        ..Probe::new(ProbeCheck::Tcp { port: 80 })
                    }),
                    ..spec()
                },
                "readiness.period_ms",
            ),
            (
                WorkloadSpec {
                    liveness: Some(Probe::new(ProbeCheck::Exec { command: vec![] })),
                    ..spec()
                },
                "liveness.exec.command",
            ),
        ];
        for (s, field) in cases {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("{field}:")), "{field}: got {err}");
        }
        let mut bad_env = spec();
        bad_env.env.insert("1X".into(), "v".into());
        assert!(bad_env.validate().unwrap_err().to_string().starts_with("env.1X"));
    }
}
