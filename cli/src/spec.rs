//! The workload document users write (YAML or JSON, Kubernetes-style names and units), parsed
//! strictly into a validated [`WorkloadSpec`].
//!
//! ```text
//!   text (≤ MAX_DOCUMENT) ──serde (unknown fields refused, path tracked)──▶ Document
//!        ──into_spec: units, module path/hash, placement──▶ WorkloadSpec ──validate──▶ ok
//!   every error: Invalid { path: "resources.limits.memory", reason: "…" }
//! ```
//!
//! A WASI module given by local path is returned as [`Module::Path`] for the CLI to read and
//! upload; the spec then names it by hash.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cloudless_types::placement::{
    DeviceRules, LabelOp, LabelRule, Placement, Resources, Spread, Strategy, TaintEffect,
    Toleration, Topology, WorkloadTerm,
};
use cloudless_types::{
    DeviceClass, Image, InvalidInput, Kind, ModuleHash, Port, Probe, ProbeCheck, Restart,
    WorkloadName, WorkloadSpec,
};
use serde::Deserialize;

/// Largest document accepted: far above any real workload, small enough that parsing cannot
/// be used to exhaust a node or the CLI.
pub const MAX_DOCUMENT: usize = 256 * 1024;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Larger than [`MAX_DOCUMENT`].
    #[error("the document is {0} bytes; at most {MAX_DOCUMENT} are accepted")]
    TooLarge(usize),
    /// Not YAML/JSON, an unknown field, a wrong type, or an impossible value.
    #[error("{path}: {reason}")]
    Invalid {
        /// Where, as a dotted path (`resources.limits.memory`, `ports[1]`); `.` for the root.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid { path: path.into(), reason: reason.into() }
}

/// Where a WASI module comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Module {
    /// Already uploaded, by hash.
    Hash(ModuleHash),
    /// A local file the CLI uploads.
    Path(PathBuf),
}

/// A parsed document: the spec, and the module to upload when it named a local file (the
/// spec's `image` then holds a placeholder until [`Parsed::with_module_hash`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    /// The spec (validated, except for a module still to upload).
    pub spec: WorkloadSpec,
    /// The module, for WASI workloads.
    pub module: Option<Module>,
}

impl Parsed {
    /// Names the uploaded module by its hash and validates the result.
    pub fn with_module_hash(mut self, hash: &ModuleHash) -> Result<WorkloadSpec, SpecError> {
        self.spec.image = Image::Wasi(hash.clone());
        self.spec.validate().map_err(from_invalid)?;
        Ok(self.spec)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    name: String,
    #[serde(default)]
    kind: Option<DocKind>,
    runtime: DocRuntime,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    resources: DocResources,
    #[serde(default = "one")]
    replicas: u32,
    #[serde(default)]
    min_available: u32,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    placement: DocPlacement,
    #[serde(default)]
    restart: Option<DocRestart>,
    #[serde(default)]
    probes: DocProbes,
    #[serde(default)]
    ports: Vec<DocPort>,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    timeout_seconds: Option<u32>,
    #[serde(default)]
    reschedule_after_seconds: Option<u32>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DocKind {
    Service,
    Job,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum DocRestart {
    Always,
    OnFailure,
    Never,
}

/// Exactly one of the two (a struct rather than an enum: YAML maps read more naturally and
/// the field path survives).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocRuntime {
    #[serde(default)]
    container: Option<DocContainer>,
    #[serde(default)]
    wasi: Option<DocWasi>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocContainer {
    image: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocWasi {
    /// `sha256:<hex>` or a local path.
    module: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocResources {
    requests: DocQuantities,
    #[serde(default)]
    limits: Option<DocQuantities>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DocQuantities {
    #[serde(default)]
    cpu: Option<Quantity>,
    #[serde(default)]
    memory: Option<Quantity>,
    #[serde(default)]
    disk: Option<Quantity>,
    #[serde(default)]
    gpus: Option<u16>,
}

/// `100m`, `0.5`, `2` for CPU; `64Mi`, `1Gi`, `512M` for memory and disk.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Quantity {
    Number(f64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DocPlacement {
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    tolerations: Vec<DocToleration>,
    #[serde(default)]
    required: Vec<DocRule>,
    #[serde(default)]
    preferred: Vec<DocWeighted<DocRule>>,
    #[serde(default)]
    affinity: Vec<DocTerm>,
    #[serde(default)]
    anti_affinity: Vec<DocTerm>,
    #[serde(default)]
    preferred_affinity: Vec<DocWeighted<DocTerm>>,
    #[serde(default)]
    preferred_anti_affinity: Vec<DocWeighted<DocTerm>>,
    #[serde(default)]
    spread: Option<DocSpread>,
    #[serde(default)]
    devices: Option<DocDevices>,
    #[serde(default)]
    strategy: Option<DocStrategy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocToleration {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    effect: Option<DocEffect>,
}

#[derive(Deserialize, Clone, Copy)]
enum DocEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocRule {
    key: String,
    operator: DocOperator,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize, Clone, Copy)]
enum DocOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocWeighted<T> {
    weight: u32,
    #[serde(flatten)]
    term: T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocTerm {
    workload: String,
    #[serde(default)]
    topology: Option<DocTopology>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DocTopology {
    Node,
    Zone,
    Region,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DocSpread {
    topology: DocTopology,
    #[serde(default = "one")]
    max_skew: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DocDevices {
    #[serde(default)]
    classes: Vec<String>,
    #[serde(default)]
    allow_battery: bool,
    #[serde(default)]
    allow_metered: bool,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum DocStrategy {
    BinPack,
    Spread,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DocProbes {
    #[serde(default)]
    liveness: Option<DocProbe>,
    #[serde(default)]
    readiness: Option<DocProbe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DocProbe {
    #[serde(default)]
    http: Option<DocHttp>,
    #[serde(default)]
    tcp: Option<DocTcp>,
    #[serde(default)]
    exec: Option<DocExec>,
    #[serde(default)]
    initial_delay_seconds: Option<f64>,
    #[serde(default)]
    period_seconds: Option<f64>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    failure_threshold: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocHttp {
    port: u16,
    #[serde(default = "root")]
    path: String,
}

fn root() -> String {
    "/".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocTcp {
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocExec {
    command: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DocPort {
    Number(u16),
    Full(DocPortFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocPortFull {
    port: u16,
    #[serde(default)]
    protocol: Option<DocProtocol>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DocProtocol {
    Tcp,
    Udp,
}

/// Parses a YAML or JSON document into a workload spec, or says exactly what is wrong and
/// where.
pub fn parse(text: &str) -> Result<Parsed, SpecError> {
    if text.len() > MAX_DOCUMENT {
        return Err(SpecError::TooLarge(text.len()));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // serde_yaml_ng prefixes the path itself and appends " at line L column C"; keep the
        // position, it helps, and drop the repeated path.
        let reason =
            reason.strip_prefix(&format!("{path}: ")).map_or(reason.clone(), str::to_string);
        invalid(if path.is_empty() || path == "." { ".".into() } else { path }, reason)
    })?;
    doc.into_spec()
}

impl Document {
    fn into_spec(self) -> Result<Parsed, SpecError> {
        let (image, module) = match (self.runtime.container, self.runtime.wasi) {
            (Some(c), None) => (Image::Container(c.image), None),
            (None, Some(DocWasi { module })) => match module.strip_prefix("sha256:") {
                Some(h) => {
                    let h = ModuleHash::new(h)
                        .map_err(|e| invalid("runtime.wasi.module", e.to_string()))?;
                    (Image::Wasi(h.clone()), Some(Module::Hash(h)))
                }
                None if module.is_empty() => {
                    return Err(invalid("runtime.wasi.module", "must be a path or sha256:<hex>"));
                }
                // Placeholder until the upload names it.
                None => {
                    (Image::Wasi(ModuleHash::of(b"")), Some(Module::Path(PathBuf::from(module))))
                }
            },
            _ => return Err(invalid("runtime", "needs exactly one of container or wasi")),
        };
        let requests = quantities(&self.resources.requests, "resources.requests")?;
        let limits = self
            .resources
            .limits
            .as_ref()
            .map(|l| quantities(l, "resources.limits"))
            .transpose()?;
        let kind = match self.kind.unwrap_or(DocKind::Service) {
            DocKind::Service => Kind::Service,
            DocKind::Job => Kind::Job,
        };
        let restart = match self.restart {
            Some(DocRestart::Always) => Restart::Always,
            Some(DocRestart::OnFailure) => Restart::OnFailure,
            Some(DocRestart::Never) => Restart::Never,
            // Services restart always, jobs on failure: what people expect from both.
            None if kind == Kind::Job => Restart::OnFailure,
            None => Restart::Always,
        };
        let mut ports = Vec::new();
        for p in &self.ports {
            ports.push(match p {
                DocPort::Number(port) => Port { port: *port, udp: false },
                DocPort::Full(f) => {
                    Port { port: f.port, udp: matches!(f.protocol, Some(DocProtocol::Udp)) }
                }
            });
        }
        let spec = WorkloadSpec {
            name: WorkloadName::new(self.name).map_err(from_invalid)?,
            kind,
            image,
            command: self.command,
            args: self.args,
            env: self.env,
            requests,
            limits,
            replicas: self.replicas,
            min_available: self.min_available,
            priority: self.priority,
            placement: self.placement.into_placement()?,
            restart,
            ports,
            network: self.network,
            timeout_secs: self.timeout_seconds,
            reschedule_after_secs: self.reschedule_after_seconds,
            liveness: self.probes.liveness.map(|p| p.into_probe("probes.liveness")).transpose()?,
            readiness: self
                .probes
                .readiness
                .map(|p| p.into_probe("probes.readiness"))
                .transpose()?,
        };
        spec.validate().map_err(from_invalid)?;
        Ok(Parsed { spec, module })
    }
}

fn quantities(q: &DocQuantities, path: &str) -> Result<Resources, SpecError> {
    Ok(Resources {
        cpu_millis: q
            .cpu
            .as_ref()
            .map(|c| cpu(c, &format!("{path}.cpu")))
            .transpose()?
            .unwrap_or(0),
        memory_mib: q
            .memory
            .as_ref()
            .map(|m| mebibytes(m, &format!("{path}.memory")))
            .transpose()?
            .unwrap_or(0),
        disk_mib: q
            .disk
            .as_ref()
            .map(|d| mebibytes(d, &format!("{path}.disk")))
            .transpose()?
            .unwrap_or(0),
        gpus: q.gpus.unwrap_or(0),
    })
}

/// CPU in millicores: `250m`, `0.25`, `2`.
fn cpu(q: &Quantity, path: &str) -> Result<u32, SpecError> {
    let bad = || invalid(path, "must be cores (0.5, 2) or millicores (500m)");
    let millis = match q {
        Quantity::Number(n) => n * 1000.0,
        Quantity::Text(t) => match t.trim().strip_suffix('m') {
            Some(m) => m.parse::<f64>().map_err(|_| bad())?,
            None => t.trim().parse::<f64>().map_err(|_| bad())? * 1000.0,
        },
    };
    if !millis.is_finite() || millis < 0.0 || millis > f64::from(u32::MAX) {
        return Err(invalid(path, "is out of range"));
    }
    if millis.fract() != 0.0 {
        return Err(invalid(path, "is finer than a millicore"));
    }
    Ok(millis as u32)
}

/// Bytes as MiB, rounded up: `64Mi`, `1Gi`, `512M`, `1G`, `1048576`.
fn mebibytes(q: &Quantity, path: &str) -> Result<u32, SpecError> {
    let bad = || invalid(path, "must be a size such as 64Mi, 1Gi, 500M or a number of bytes");
    let bytes = match q {
        Quantity::Number(n) => *n,
        Quantity::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: f64 = num.trim().parse().map_err(|_| bad())?;
            let scale: f64 = match unit {
                "" => 1.0,
                "Ki" => 1024.0,
                "Mi" => 1024.0 * 1024.0,
                "Gi" => 1024.0 * 1024.0 * 1024.0,
                "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
                "k" | "K" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "T" => 1e12,
                _ => return Err(bad()),
            };
            n * scale
        }
    };
    let mib = (bytes / (1024.0 * 1024.0)).ceil();
    if !mib.is_finite() || mib < 0.0 || mib > f64::from(u32::MAX) {
        return Err(invalid(path, "is out of range"));
    }
    Ok(mib as u32)
}

fn millis(seconds: Option<f64>, default_ms: u32, path: &str) -> Result<u32, SpecError> {
    let Some(s) = seconds else { return Ok(default_ms) };
    let ms = (s * 1000.0).round();
    if !ms.is_finite() || ms < 0.0 || ms > f64::from(u32::MAX) {
        return Err(invalid(path, "is out of range"));
    }
    Ok(ms as u32)
}

impl DocProbe {
    fn into_probe(self, path: &str) -> Result<Probe, SpecError> {
        let checks = [self.http.is_some(), self.tcp.is_some(), self.exec.is_some()];
        if checks.iter().filter(|c| **c).count() != 1 {
            return Err(invalid(path, "needs exactly one of http, tcp or exec"));
        }
        let check = if let Some(h) = self.http {
            ProbeCheck::Http { port: h.port, path: h.path }
        } else if let Some(t) = self.tcp {
            ProbeCheck::Tcp { port: t.port }
        } else if let Some(e) = self.exec {
            ProbeCheck::Exec { command: e.command }
        } else {
            return Err(invalid(path, "needs exactly one of http, tcp or exec"));
        };
        let d = Probe::new(check.clone());
        Ok(Probe {
            check,
            initial_delay_ms: millis(
                self.initial_delay_seconds,
                d.initial_delay_ms,
                &format!("{path}.initialDelaySeconds"),
            )?,
            period_ms: millis(self.period_seconds, d.period_ms, &format!("{path}.periodSeconds"))?,
            timeout_ms: millis(
                self.timeout_seconds,
                d.timeout_ms,
                &format!("{path}.timeoutSeconds"),
            )?,
            failure_threshold: self.failure_threshold.unwrap_or(d.failure_threshold),
        })
    }
}

fn topology(t: Option<DocTopology>) -> Topology {
    match t {
        Some(DocTopology::Zone) => Topology::Zone,
        Some(DocTopology::Region) => Topology::Region,
        Some(DocTopology::Node) | None => Topology::Node,
    }
}

fn term(t: DocTerm) -> WorkloadTerm {
    WorkloadTerm { workload: t.workload, topology: topology(t.topology) }
}

fn rule(r: DocRule, path: &str) -> Result<LabelRule, SpecError> {
    let op = match r.operator {
        DocOperator::In => LabelOp::In(r.values),
        DocOperator::NotIn => LabelOp::NotIn(r.values),
        DocOperator::Exists | DocOperator::DoesNotExist if !r.values.is_empty() => {
            return Err(invalid(
                format!("{path}.values"),
                "Exists and DoesNotExist take no values",
            ));
        }
        DocOperator::Exists => LabelOp::Exists,
        DocOperator::DoesNotExist => LabelOp::DoesNotExist,
    };
    Ok(LabelRule { key: r.key, op })
}

impl DocPlacement {
    fn into_placement(self) -> Result<Placement, SpecError> {
        let mut required = Vec::new();
        for (i, r) in self.required.into_iter().enumerate() {
            required.push(rule(r, &format!("placement.required[{i}]"))?);
        }
        let mut preferred = Vec::new();
        for (i, w) in self.preferred.into_iter().enumerate() {
            preferred.push((w.weight, rule(w.term, &format!("placement.preferred[{i}]"))?));
        }
        let mut classes = Vec::new();
        let devices = self.devices.unwrap_or(DocDevices {
            classes: Vec::new(),
            allow_battery: DeviceRules::default().allow_battery,
            allow_metered: DeviceRules::default().allow_metered,
        });
        for (i, c) in devices.classes.iter().enumerate() {
            classes.push(DeviceClass::parse(c).ok_or_else(|| {
                invalid(
                    format!("placement.devices.classes[{i}]"),
                    format!("{c:?} is not server, desktop, gateway, laptop or phone"),
                )
            })?);
        }
        Ok(Placement {
            node_selector: self.node_selector,
            tolerations: self
                .tolerations
                .into_iter()
                .map(|t| Toleration {
                    key: t.key,
                    value: t.value,
                    effect: t.effect.map(|e| match e {
                        DocEffect::NoSchedule => TaintEffect::NoSchedule,
                        DocEffect::PreferNoSchedule => TaintEffect::PreferNoSchedule,
                        DocEffect::NoExecute => TaintEffect::NoExecute,
                    }),
                })
                .collect(),
            zones: self.zones,
            regions: self.regions,
            required_node_rules: required,
            preferred_node_rules: preferred,
            affinity: self.affinity.into_iter().map(term).collect(),
            anti_affinity: self.anti_affinity.into_iter().map(term).collect(),
            preferred_affinity: self
                .preferred_affinity
                .into_iter()
                .map(|w| (w.weight, term(w.term)))
                .collect(),
            preferred_anti_affinity: self
                .preferred_anti_affinity
                .into_iter()
                .map(|w| (w.weight, term(w.term)))
                .collect(),
            spread: self
                .spread
                .map(|s| Spread { topology: topology(Some(s.topology)), max_skew: s.max_skew }),
            device: DeviceRules {
                classes,
                allow_battery: devices.allow_battery,
                allow_metered: devices.allow_metered,
            },
            strategy: match self.strategy {
                Some(DocStrategy::Spread) => Strategy::Spread,
                Some(DocStrategy::BinPack) => Strategy::BinPack,
                None => Placement::default().strategy,
            },
        })
    }
}

/// Maps the spec's internal field names to the document's.
fn from_invalid(e: InvalidInput) -> SpecError {
    let InvalidInput::Field { field, reason } = e;
    let mapped = [
        ("image.container", "runtime.container.image"),
        ("image.wasi", "runtime.wasi.module"),
        ("requests", "resources.requests"),
        ("limits", "resources.limits"),
        ("min_available", "minAvailable"),
        ("timeout_secs", "timeoutSeconds"),
        ("reschedule_after_secs", "rescheduleAfterSeconds"),
        ("liveness", "probes.liveness"),
        ("readiness", "probes.readiness"),
    ]
    .iter()
    .find_map(|(from, to)| field.strip_prefix(from).map(|rest| format!("{to}{rest}")))
    .unwrap_or_else(|| camel(&field));
    invalid(mapped, reason)
}

fn camel(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut up = false;
    for c in path.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
