//! The workload spec: what a user asks Cloudless to run. The CLI parses it from YAML or JSON
//! (a later issue), the raft state machine stores it validated, and the scheduler and the
//! runtime read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Image {
    /// An OCI image reference, run by a container engine.
    Container(String),
    /// A WebAssembly module or component, by the hex SHA-256 of its bytes (uploaded with the
    /// spec and stored as a blob).
    Wasi(String),
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

/// A workload, as submitted and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Unique name: 1–63 of `[a-z0-9-]`, starting with a letter (usable as a DNS label).
    pub name: String,
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
}

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

impl WorkloadSpec {
    /// A service with sensible defaults, for tests and examples.
    pub fn new(name: &str, image: Image, requests: Resources, replicas: u32) -> Self {
        WorkloadSpec {
            name: name.to_string(),
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
        }
    }

    /// Checks every rule; the error names the field and says what is wrong.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_name(&self.name)?;
        match &self.image {
            Image::Container(r) => {
                if r.is_empty() || r.len() > MAX_STRING || r.chars().any(char::is_whitespace) {
                    return Err(invalid(
                        "image.container",
                        "must be a non-empty image reference without spaces",
                    ));
                }
            }
            Image::Wasi(h) => {
                if h.len() != 64
                    || !h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(invalid(
                        "image.wasi",
                        "must be the lowercase hex SHA-256 of the module (64 characters)",
                    ));
                }
            }
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
        self.placement.validate()
    }
}

/// Checks a workload name: 1–63 of `[a-z0-9-]`, starting with a letter, not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), InvalidInput> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!("{name:?} must be 1-63 of [a-z0-9-], start with a letter and not end with -"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec::new(
            "web",
            Image::Container("busybox:1".into()),
            Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
            3,
        )
    }

    #[test]
    fn a_good_spec_passes_and_bad_ones_name_their_field() {
        spec().validate().unwrap();
        let cases: Vec<(WorkloadSpec, &str)> = vec![
            (WorkloadSpec { name: "Web".into(), ..spec() }, "name"),
            (WorkloadSpec { name: "9web".into(), ..spec() }, "name"),
            (WorkloadSpec { image: Image::Wasi("abc".into()), ..spec() }, "image.wasi"),
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
