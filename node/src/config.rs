//! The node's settings: a TOML file, then `CLOUDLESS_*` environment variables, then flags
//! (each later source wins), validated at start with errors that name the bad key.
//!
//! ```text
//!   <data-dir>/cloudless.toml (or --config) ──▶ FileConfig ─┐
//!   CLOUDLESS_* env and flags (clap) ──────────▶ Overrides ──┴─▶ NodeConfig::resolve
//!        ──▶ validate (names the key) ──▶ DaemonConfig + http bind address
//! ```
//!
//! Data dir layout: `identity.key` (the node's ed25519 key, 0600), `raft/` (the raft store),
//! `wasi/` (modules, compile cache, replica directories), `directory.*` and `incarnation`
//! (mesh), `cloudless.toml` (settings written by `init` / `join`), `cluster` (the cluster's
//! name, written once enrolled), `addresses` and `http` (where the running node listens,
//! rewritten at every start).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cloudless_mesh::{Config as MeshConfig, RelayMode};
use cloudless_runtime::container::ContainerConfig;
use cloudless_types::{DeviceClass, Resources};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Settings of a node, resolved and validated (what `Daemon::start` takes).
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The mesh (identity and data dir included).
    pub mesh: MeshConfig,
    /// The raft member.
    pub consensus: cloudless_consensus::Config,
    /// What this node offers to workloads.
    pub offer: Resources,
    /// Whether guests may use the network on this node.
    pub allow_network: bool,
    /// A container engine to run container workloads with, if this device has one.
    pub containers: Option<ContainerConfig>,
}

/// The settings file inside the data dir.
pub const FILE: &str = "cloudless.toml";
/// Default HTTP address for /metrics, /health, /ready: loopback, so nothing is exposed
/// unless the operator asks.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9464";
/// Default QUIC and TCP port.
pub const DEFAULT_PORT: u16 = 4001;

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the key and the line).
        message: String,
    },
    /// A value is impossible.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The key, as written in the file (`offer.cpu_millis`).
        key: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// What this node offers to workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// Millicores (default: all cores).
    pub cpu_millis: Option<u32>,
    /// MiB of memory (default: half the machine's, the rest stays with its owner).
    pub memory_mib: Option<u32>,
    /// MiB of disk for replicas.
    pub disk_mib: Option<u32>,
    /// Replicas run at once at most, of any runtime (default by device class: see
    /// [`default_max_replicas`]). Each is a slot of the WASI runtime's instance pool.
    pub replicas: Option<u32>,
}

/// Replicas a device of `class` runs at once unless its owner says otherwise: what its
/// memory can hold of small guests (16 MiB each would take 4 GiB at 256), and a phone's or a
/// gateway's little memory and battery fewer. Every WASI slot reserves address space only
/// (memories and a stack), no memory until a guest uses it.
pub fn default_max_replicas(class: Option<DeviceClass>) -> u32 {
    match class {
        Some(DeviceClass::Server) => 256,
        Some(DeviceClass::Desktop) | None => 128,
        Some(DeviceClass::Laptop) => 64,
        Some(DeviceClass::Gateway | DeviceClass::Phone) => 16,
    }
}

/// The settings file. Every key is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen addresses (QUIC first, TCP fallback).
    pub listen: Option<Vec<String>>,
    /// Peers to join through, with `/p2p/<id>`.
    pub bootstrap: Option<Vec<String>>,
    /// Look for peers on the local network.
    pub mdns: Option<bool>,
    /// Relay server policy: auto, always or never.
    pub relay: Option<String>,
    /// This device is behind a NAT without port forwarding.
    pub behind_nat: Option<bool>,
    /// Failure zone.
    pub zone: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// server, desktop, gateway, laptop or phone.
    pub device_class: Option<String>,
    /// Labels advertised for placement.
    pub labels: Option<BTreeMap<String, String>>,
    /// Address of /metrics, /health and /ready; an empty string turns it off.
    pub http: Option<String>,
    /// Whether guests may use the network on this device.
    pub allow_network: Option<bool>,
    /// Docker Engine API endpoint for container workloads (`unix:///var/run/docker.sock`);
    /// absent: this node runs WASI only.
    pub container_engine: Option<String>,
    /// What this node offers.
    pub offer: Option<Offer>,
}

impl FileConfig {
    /// Reads `path`; a missing file is an empty configuration when `optional`.
    pub fn load(path: &Path, optional: bool) -> Result<FileConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileConfig::default());
            }
            Err(source) => return Err(ConfigError::Read { path: path.into(), source }),
        };
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Writes it to `path` (used by `init` and `join` to remember what they were given).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        std::fs::write(path, text).map_err(|source| ConfigError::Read { path: path.into(), source })
    }

    /// `other`'s keys where it sets them, else this file's.
    pub fn overlay(mut self, other: FileConfig) -> FileConfig {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            listen,
            bootstrap,
            mdns,
            relay,
            behind_nat,
            zone,
            region,
            device_class,
            labels,
            http,
            allow_network,
            container_engine,
            offer
        );
        self
    }
}

/// Everything a node needs to start, resolved and validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The daemon's settings.
    pub daemon: DaemonConfig,
    /// Where /metrics, /health and /ready are served, if anywhere.
    pub http: Option<SocketAddr>,
}

/// This machine's cores and half its memory (MiB): the default offer.
fn machine() -> (u32, u32) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(2 * 1024 * 1024);
    (cores * 1000, (total_kib / 1024 / 2).min(u64::from(u32::MAX)) as u32)
}

fn addrs(key: &str, v: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<Multiaddr>().map_err(|e| {
                invalid(&format!("{key}[{i}]"), format!("{a:?} is not a multiaddr: {e}"))
            })
        })
        .collect()
}

/// The peer an address names (its `/p2p/<id>`), if it names one.
pub fn peer_in(addr: &Multiaddr) -> Option<libp2p::PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl NodeConfig {
    /// Resolves `file` (already overlaid with environment and flags) for `data_dir`.
    pub fn resolve(data_dir: &Path, file: &FileConfig) -> Result<NodeConfig, ConfigError> {
        let listen = match &file.listen {
            Some(l) => addrs("listen", l)?,
            None => addrs(
                "listen",
                &[
                    format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
                    format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                ],
            )?,
        };
        let bootstrap = addrs("bootstrap", file.bootstrap.as_deref().unwrap_or_default())?;
        // A bootstrap peer is believed about the cluster until this node learns its members,
        // so it must be named, not just addressed.
        if let Some(i) = bootstrap.iter().position(|a| peer_in(a).is_none()) {
            return Err(invalid(
                &format!("bootstrap[{i}]"),
                format!("{} must end in /p2p/<peer id> (the peer this node trusts)", bootstrap[i]),
            ));
        }
        let relay = match file.relay.as_deref().unwrap_or("auto") {
            "auto" => RelayMode::Auto,
            "always" => RelayMode::Always,
            "never" => RelayMode::Never,
            other => {
                return Err(invalid("relay", format!("{other:?} is not auto, always or never")));
            }
        };
        let device_class = match &file.device_class {
            Some(c) => Some(DeviceClass::parse(c).ok_or_else(|| {
                invalid(
                    "device_class",
                    format!("{c:?} is not server, desktop, gateway, laptop or phone"),
                )
            })?),
            None => None,
        };
        let http = match file.http.as_deref() {
            Some("") => None,
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("http", format!("{a:?} is not host:port: {e}")))?,
            ),
            None => DEFAULT_HTTP.parse().ok(),
        };
        let (cores, half) = machine();
        let offer = file.offer.clone().unwrap_or_default();
        let offer = Resources {
            cpu_millis: offer.cpu_millis.unwrap_or(cores),
            memory_mib: offer.memory_mib.unwrap_or(half),
            disk_mib: offer.disk_mib.unwrap_or(0),
            gpus: 0,
        };
        if offer.cpu_millis == 0 {
            return Err(invalid("offer.cpu_millis", "must be above 0"));
        }
        if offer.memory_mib < 16 {
            return Err(invalid("offer.memory_mib", "must be at least 16"));
        }
        let max_replicas = file.offer.as_ref().and_then(|o| o.replicas);
        if let Some(n) = max_replicas
            && !(1..=cloudless_types::MAX_NODE_REPLICAS).contains(&n)
        {
            return Err(invalid(
                "offer.replicas",
                format!("{n} is not in 1..={}", cloudless_types::MAX_NODE_REPLICAS),
            ));
        }
        let containers = match &file.container_engine {
            Some(e) if e.is_empty() => None,
            Some(e) => {
                if !(e.starts_with("unix://") || e.starts_with("tcp://") || e.starts_with("http")) {
                    return Err(invalid(
                        "container_engine",
                        format!("{e:?} is not unix://…, tcp://… or http(s)://…"),
                    ));
                }
                Some(ContainerConfig { host: Some(e.clone()), ..ContainerConfig::default() })
            }
            None => None,
        };
        let mut mesh = MeshConfig {
            data_dir: data_dir.to_path_buf(),
            listen,
            bootstrap,
            mdns: file.mdns.unwrap_or(true),
            relay,
            behind_nat: file.behind_nat.unwrap_or(false),
            ..MeshConfig::default()
        };
        mesh.descriptor.zone = file.zone.clone();
        mesh.descriptor.region = file.region.clone();
        mesh.descriptor.device_class = device_class;
        mesh.descriptor.labels = file.labels.clone().unwrap_or_default();
        mesh.descriptor.max_replicas = max_replicas;
        mesh.validate().map_err(|e| invalid("mesh", e.to_string()))?;
        let daemon = DaemonConfig {
            mesh,
            consensus: cloudless_consensus::Config::default(),
            offer,
            allow_network: file.allow_network.unwrap_or(false),
            containers,
        };
        Ok(NodeConfig { daemon, http })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: "t.toml".into(), message: e.to_string() })
    }

    #[test]
    fn a_full_file_resolves() {
        let f = parse(
            r#"
            listen = ["/ip4/127.0.0.1/udp/0/quic-v1"]
            bootstrap = []
            mdns = false
            relay = "never"
            zone = "kitchen"
            device_class = "laptop"
            labels = { gpu = "none" }
            http = "127.0.0.1:0"
            allow_network = true
            [offer]
            cpu_millis = 1500
            memory_mib = 512
            replicas = 40
            "#,
        )
        .unwrap();
        let c = NodeConfig::resolve(Path::new("/tmp/x"), &f).unwrap();
        assert_eq!(c.daemon.offer.cpu_millis, 1500);
        assert_eq!(c.daemon.mesh.descriptor.max_replicas, Some(40));
        assert_eq!(default_max_replicas(Some(DeviceClass::Laptop)), 64);
        assert_eq!(c.daemon.mesh.descriptor.zone.as_deref(), Some("kitchen"));
        assert_eq!(c.daemon.mesh.relay, RelayMode::Never);
        assert!(c.daemon.allow_network);
        assert_eq!(c.http.map(|a| a.port()), Some(0));
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (text, key) in
            [("lsiten = []", "lsiten"), ("mdns = \"yes\"", "mdns"), ("[offer]\ncpus = 2", "cpus")]
        {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        for (f, key) in [
            (FileConfig { listen: Some(vec!["nope".into()]), ..Default::default() }, "listen[0]"),
            (FileConfig { relay: Some("sometimes".into()), ..Default::default() }, "relay"),
            (
                FileConfig { device_class: Some("toaster".into()), ..Default::default() },
                "device_class",
            ),
            (FileConfig { http: Some("everywhere".into()), ..Default::default() }, "http"),
            (
                FileConfig {
                    offer: Some(Offer { cpu_millis: Some(0), ..Default::default() }),
                    ..Default::default()
                },
                "offer.cpu_millis",
            ),
            (
                FileConfig {
                    offer: Some(Offer { replicas: Some(0), ..Default::default() }),
                    ..Default::default()
                },
                "offer.replicas",
            ),
            (
                FileConfig {
                    offer: Some(Offer { replicas: Some(100_000), ..Default::default() }),
                    ..Default::default()
                },
                "offer.replicas",
            ),
            (
                FileConfig { container_engine: Some("docker".into()), ..Default::default() },
                "container_engine",
            ),
        ] {
            let e = NodeConfig::resolve(Path::new("/tmp/x"), &f).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid {key}:")), "{e}");
        }
    }

    #[test]
    fn later_sources_win_and_files_round_trip() {
        let file = FileConfig { zone: Some("a".into()), mdns: Some(true), ..Default::default() };
        let env = FileConfig { zone: Some("b".into()), ..Default::default() };
        let merged = file.overlay(env);
        assert_eq!(merged.zone.as_deref(), Some("b"));
        assert_eq!(merged.mdns, Some(true));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        merged.save(&path).unwrap();
        assert_eq!(FileConfig::load(&path, false).unwrap(), merged);
        assert_eq!(
            FileConfig::load(&dir.path().join("none"), true).unwrap(),
            FileConfig::default()
        );
        assert!(FileConfig::load(&dir.path().join("none"), false).is_err());
    }
}
