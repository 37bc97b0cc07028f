//! The membership tunables: [`Config`], its defaults, its validation, and the serde helper
//! that writes durations as milliseconds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Tunables of the membership protocol. The defaults target devices on home networks and
/// mobile links: round trips up to ~200 ms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often a node starts a probe. 200 ms makes the expected time until some node probes
    /// a failed member 200 ms (each of `n` nodes probes one of `n` members per interval).
    #[serde(with = "millis")]
    pub probe_interval: Duration,
    /// The longest wait for a direct ack before asking helpers, and the wait for a member
    /// whose round trip is not measured yet. Must exceed the round trip time of the slowest
    /// healthy link; 200 ms covers home broadband and most mobile links, and the local health
    /// multiplier stretches it on a struggling node.
    #[serde(with = "millis")]
    pub probe_timeout: Duration,
    /// The shortest wait for a direct ack. Between the two, the wait follows the member's
    /// measured round trip as TCP's retransmission timer does (smoothed time plus four
    /// deviations): a LAN or loopback member is found silent in 50 ms instead of 200, which
    /// is most of the failure detection time. 50 ms stays above a loaded host's scheduling
    /// delays (tens of milliseconds on two cores running fifty nodes).
    #[serde(with = "millis")]
    pub probe_timeout_min: Duration,
    /// How many helpers ping a target that missed its direct ack. Four helpers make a false
    /// suspicion under 5 % independent loss about one in a million probes.
    pub indirect_checks: usize,
    /// Suspicion timeout with every expected witness confirming, for a member whose round
    /// trip is short; a slower member, or one not measured yet, gets three of its probe waits
    /// (600 ms with the default `probe_timeout`). 300 ms made no false death in the
    /// simulator at 5 % loss (docs/mesh.md), but real processes on an overloaded host stall
    /// for longer: 400 ms tolerates a stall of half a second (with the probe's 150 ms).
    #[serde(with = "millis")]
    pub suspicion_min: Duration,
    /// Suspicion timeout with a single witness.
    #[serde(with = "millis")]
    pub suspicion_max: Duration,
    /// How often to ping one member held as dead, so that healed partitions merge.
    #[serde(with = "millis")]
    pub reconnect_interval: Duration,
    /// How long a dead member is remembered (and reconnect-probed) before it is forgotten.
    #[serde(with = "millis")]
    pub dead_retention: Duration,
    /// How long a member that left is remembered, so that late messages do not revive it.
    #[serde(with = "millis")]
    pub left_retention: Duration,
    /// Largest number of members tracked; a bound on memory, far above any real pool.
    pub max_members: usize,
    /// Largest number of bytes of updates piggybacked on one ping or ack; at most
    /// [`MAX_PIGGYBACK_BYTES`].
    pub piggyback_bytes: usize,
    /// Each update is piggybacked `retransmit_mult · ⌈log10(n + 1)⌉` times by the node that
    /// made it or learned it point to point, and once by a node that got it from a flood.
    /// Flooding carries the news; piggybacking only repairs, so one round per order of
    /// magnitude is enough.
    pub retransmit_mult: u32,
    /// Longest time between two capacity announcements of a node.
    #[serde(with = "millis")]
    pub capacity_refresh: Duration,
    /// Shortest time between two capacity announcements, whatever the cluster size.
    #[serde(with = "millis")]
    pub capacity_min_interval: Duration,
    /// Bytes per second each node may spend on everyone's capacity floods together.
    pub capacity_budget: u32,
    /// Copies of each flooded message a node forwards (gossipsub's mesh degree `D`).
    pub flood_degree: u32,
    /// Largest local health multiplier (Lifeguard); probe timing is scaled by `1 + lhm`.
    pub max_local_health: u32,
    /// Largest encoded size of one sync message sent to a joiner, in bytes.
    pub sync_chunk_bytes: usize,
    /// How often a joiner that has not yet received the member list asks again.
    #[serde(with = "millis")]
    pub join_retry: Duration,
}

/// The most `piggyback_bytes` may be: an ack goes back as the answer on its ping's stream,
/// and answers are read only up to 4 KiB (a member answering with more is cut off).
pub const MAX_PIGGYBACK_BYTES: usize = 2048;

impl Default for Config {
    fn default() -> Self {
        Config {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(200),
            probe_timeout_min: Duration::from_millis(50),
            indirect_checks: 4,
            suspicion_min: Duration::from_millis(400),
            suspicion_max: Duration::from_secs(4),
            reconnect_interval: Duration::from_secs(5),
            dead_retention: Duration::from_secs(3600),
            left_retention: Duration::from_secs(300),
            max_members: 100_000,
            piggyback_bytes: 300,
            retransmit_mult: 1,
            capacity_refresh: Duration::from_secs(60),
            capacity_min_interval: Duration::from_secs(2),
            capacity_budget: 512,
            flood_degree: 6,
            max_local_health: 8,
            sync_chunk_bytes: 16 * 1024,
            join_retry: Duration::from_millis(500),
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership.{field}: {reason}")]
pub struct ConfigError {
    /// The offending key.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Config {
    /// Checks that the timings are consistent and the bounds usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| Err(ConfigError { field, reason: reason.to_string() });
        if self.probe_interval.is_zero() {
            return err("probe_interval", "must be positive");
        }
        if self.probe_timeout.is_zero() {
            return err("probe_timeout", "must be positive");
        }
        if self.probe_timeout_min.is_zero() || self.probe_timeout_min > self.probe_timeout {
            return err("probe_timeout_min", "must be positive and at most probe_timeout");
        }
        if self.suspicion_min.is_zero() || self.suspicion_min > self.suspicion_max {
            return err("suspicion_min", "must be positive and at most suspicion_max");
        }
        if self.piggyback_bytes > MAX_PIGGYBACK_BYTES {
            return err("piggyback_bytes", &format!("must be at most {MAX_PIGGYBACK_BYTES}"));
        }
        if self.max_members < 2 {
            return err("max_members", "must be at least 2");
        }
        if self.sync_chunk_bytes < 1024 {
            return err("sync_chunk_bytes", "must be at least 1024");
        }
        if self.flood_degree == 0 {
            return err("flood_degree", "must be positive");
        }
        if self.reconnect_interval.is_zero() || self.join_retry.is_zero() {
            return err("reconnect_interval", "intervals must be positive");
        }
        if self.capacity_min_interval > self.capacity_refresh {
            return err("capacity_min_interval", "must be at most capacity_refresh");
        }
        Ok(())
    }
}

pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
