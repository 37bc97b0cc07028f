//! The mesh's settings, with development-friendly defaults and validation that names the bad
//! key.

use std::path::PathBuf;
use std::time::Duration;

use cloudless_types::{Capacity, NodeDescriptor};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::membership;

/// Smallest datagram limit: a directory message (at most `directory::MAX_BATCH_BYTES` of
/// entries, or `directory::MAX_VERSIONS` versions) must fit with room to spare.
pub const MIN_DATAGRAM_BYTES: usize = 128 * 1024;

/// Whether this node runs a relay server for peers behind NATs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Serve once AutoNAT finds this node publicly reachable (the default).
    Auto,
    /// Always serve (a VPS known to be public).
    Always,
    /// Never serve.
    Never,
}

/// What part a node plays in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A cluster member: membership, directory, DHT server.
    Member,
    /// A client (the CLI): reaches members by RPC, takes no part in membership, is not
    /// advertised in the DHT.
    Client,
}

/// Settings of one mesh node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the identity key and the directory live.
    pub data_dir: PathBuf,
    /// Addresses to listen on; QUIC first, TCP as fallback. Port 0 picks a free port.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, with their `/p2p/<id>` suffix where known.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Relay server policy.
    pub relay: RelayMode,
    /// This node is behind a NAT (a phone on carrier NAT, a home PC without port forwarding):
    /// reserve relay slots as soon as a relay is known instead of waiting for AutoNAT's
    /// verdict. Such a node may have no listen address of its own.
    pub behind_nat: bool,
    /// Member or client.
    pub role: Role,
    /// Largest RPC request or response, in bytes.
    pub rpc_max_bytes: usize,
    /// Default RPC deadline.
    #[serde(with = "crate::membership::millis")]
    pub rpc_timeout: Duration,
    /// Largest number of our RPC requests in flight at once.
    pub rpc_max_pending: usize,
    /// Largest membership or directory message, in bytes.
    pub datagram_max_bytes: usize,
    /// The data dir was restored from a backup on purpose: an own directory entry newer than
    /// it (signed by a later run) is signed above, not taken for a stale data dir.
    pub restored: bool,
    /// How often the directory is reconciled with a random member.
    #[serde(with = "crate::membership::millis")]
    pub directory_interval: Duration,
    /// How often a changed directory is written to disk at most.
    #[serde(with = "crate::membership::millis")]
    pub persist_interval: Duration,
    /// Connections idle this long are closed.
    #[serde(with = "crate::membership::millis")]
    pub idle_timeout: Duration,
    /// The membership protocol.
    pub membership: membership::Config,
    /// This node's own directory entry (addresses are filled in from the listeners).
    pub descriptor: NodeDescriptor,
    /// This node's capacity at start.
    #[serde(skip)]
    pub capacity: Option<Capacity>,
    /// Seed for the membership core's randomness; random when absent.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("cloudless-data"),
            listen: vec![
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/tcp/0".parse().unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            relay: RelayMode::Auto,
            behind_nat: false,
            role: Role::Member,
            rpc_max_bytes: 4 * 1024 * 1024,
            rpc_timeout: Duration::from_secs(10),
            rpc_max_pending: 1024,
            datagram_max_bytes: 8 * 1024 * 1024,
            directory_interval: Duration::from_secs(5),
            persist_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            membership: membership::Config::default(),
            descriptor: NodeDescriptor::default(),
            capacity: None,
            seed: None,
            restored: false,
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mesh.{field}: {reason}")]
pub struct ConfigError {
    /// The offending key.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Config {
    /// Checks every setting; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &str, reason: &str| {
            Err(ConfigError { field: field.into(), reason: reason.into() })
        };
        if self.listen.is_empty() && self.role == Role::Member && !self.behind_nat {
            return err(
                "listen",
                "a member needs at least one listen address unless behind_nat is set",
            );
        }
        if self.rpc_max_bytes < 1024 || self.rpc_max_bytes > 64 * 1024 * 1024 {
            return err("rpc_max_bytes", "must be between 1 KiB and 64 MiB");
        }
        if self.datagram_max_bytes < self.membership.sync_chunk_bytes * 2
            || self.datagram_max_bytes < MIN_DATAGRAM_BYTES
            || self.datagram_max_bytes > 64 * 1024 * 1024
        {
            return err(
                "datagram_max_bytes",
                "must hold two membership sync pages, be at least 128 KiB and at most 64 MiB",
            );
        }
        if self.rpc_timeout.is_zero()
            || self.directory_interval.is_zero()
            || self.persist_interval.is_zero()
        {
            return err("rpc_timeout", "timeouts and intervals must be positive");
        }
        if self.rpc_max_pending == 0 {
            return err("rpc_max_pending", "must be positive");
        }
        self.membership.validate().map_err(|e| ConfigError {
            field: format!("membership.{}", e.field),
            reason: e.reason,
        })?;
        self.descriptor
            .validate()
            .map_err(|e| ConfigError { field: "descriptor".into(), reason: e.to_string() })?;
        if let Some(c) = &self.capacity {
            c.validate()
                .map_err(|e| ConfigError { field: "capacity".into(), reason: e.to_string() })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        Config::default().validate().unwrap();
        let c = Config { rpc_max_bytes: 10, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().starts_with("mesh.rpc_max_bytes:"));
        let mut c = Config::default();
        c.membership.probe_interval = Duration::ZERO;
        assert!(
            c.validate().unwrap_err().to_string().starts_with("mesh.membership.probe_interval:")
        );
    }
}
