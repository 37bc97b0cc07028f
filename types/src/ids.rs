//! Names and ids that cross crate boundaries, each validated once, when it is made.
//!
//! ```text
//!   text from a user, a file or the wire ──▶ WorkloadName::new / ModuleHash::new /
//!        NodeName::new (serde goes through the same checks) ──▶ a value that is valid by
//!        construction: safe in paths, container names, maps and logs
//!   (WorkloadName, index) ──▶ ReplicaId ──▶ runtime, raft state, api, CLI
//! ```
//!
//! Deserializing any of these runs the same check as `new`, so a name that arrived over the
//! network and reached a path was checked on the way in.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{InvalidInput, invalid};

/// Longest workload name, in bytes: a DNS label.
pub const MAX_WORKLOAD_NAME: usize = 63;

/// A workload's name: 1–63 of `[a-z0-9-]`, starting with a letter and not ending with `-` (a
/// DNS label). It names replica directories and containers, so it is checked when it is made.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkloadName(String);

impl WorkloadName {
    /// Checks `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidInput> {
        let name = name.into();
        let b = name.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_WORKLOAD_NAME
            && b[0].is_ascii_lowercase()
            && !name.ends_with('-')
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if ok {
            Ok(WorkloadName(name))
        } else {
            Err(invalid(
                "name",
                format!(
                    "{:?} must be 1-63 of [a-z0-9-], start with a letter and not end with -",
                    shorten(&name)
                ),
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lowercase hex digits of a SHA-256 digest.
pub const MODULE_HASH_LEN: usize = 64;

/// A WebAssembly module's content address: the lowercase hex SHA-256 of its bytes (64
/// characters). Modules are stored and fetched by it, so it is checked when it is made.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModuleHash(String);

impl ModuleHash {
    /// Checks `hex` (64 lowercase hex digits) and wraps it.
    pub fn new(hex: impl Into<String>) -> Result<Self, InvalidInput> {
        let hex = hex.into();
        let ok = hex.len() == MODULE_HASH_LEN
            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(ModuleHash(hex))
        } else {
            Err(invalid(
                "image.wasi",
                format!(
                    "{:?} is not a module hash: it must be the lowercase hex SHA-256 of the \
                     module (64 characters)",
                    shorten(&hex)
                ),
            ))
        }
    }

    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ModuleHash(crate::hex(&Sha256::digest(bytes)))
    }

    /// The hash as hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first `n` hex digits, for display.
    pub fn short(&self, n: usize) -> &str {
        &self.0[..n.min(self.0.len())]
    }
}

/// Longest node name accepted, in characters: the base58 text of the largest multihash a peer
/// id may be (2 header bytes and 64 digest bytes) fits in 91.
const MAX_NODE_NAME: usize = 100;
/// Multihash code of an identity hash (the key itself, for small keys such as ed25519).
const IDENTITY: u8 = 0x00;
/// Multihash code of SHA-256 (the hash of larger keys).
const SHA2_256: u8 = 0x12;
/// Longest key inlined into an identity multihash, as libp2p allows.
const MAX_INLINE_KEY: usize = 42;
/// Longest digest a multihash may carry, as libp2p allows.
const MAX_DIGEST: usize = 64;

/// A node's name: the text of its libp2p PeerId (base58 of an identity or SHA-256 multihash),
/// in its one canonical spelling. Checked by the rules libp2p parses peer ids with, so every
/// name is a peer id and every peer id a name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    /// Checks `text` and wraps it.
    pub fn new(text: impl Into<String>) -> Result<Self, InvalidInput> {
        let text = text.into();
        let bad =
            |why: &str| invalid("node", format!("{:?} is not a peer id: {why}", shorten(&text)));
        if text.is_empty() || text.len() > MAX_NODE_NAME {
            return Err(bad("wrong length"));
        }
        let bytes = bs58::decode(&text).into_vec().map_err(|_| bad("not base58"))?;
        Self::check_bytes(&bytes).map_err(&bad)?;
        // base58 maps byte strings to text one to one, so this only refuses odd spellings.
        if bs58::encode(&bytes).into_string() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(NodeName(text))
    }

    /// The name of the peer whose id is the multihash `bytes` (libp2p's `PeerId::to_bytes`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidInput> {
        Self::check_bytes(bytes)
            .map_err(|why| invalid("node", format!("peer id bytes are unusable: {why}")))?;
        Ok(NodeName(bs58::encode(bytes).into_string()))
    }

    fn check_bytes(bytes: &[u8]) -> Result<(), &'static str> {
        let [code, len, digest @ ..] = bytes else { return Err("too short") };
        let len = usize::from(*len);
        if digest.len() != len {
            return Err("its length does not match its header");
        }
        match *code {
            IDENTITY if len <= MAX_INLINE_KEY => Ok(()),
            SHA2_256 if len <= MAX_DIGEST => Ok(()),
            IDENTITY | SHA2_256 => Err("digest too long"),
            _ => Err("not an identity or SHA-256 multihash"),
        }
    }

    /// The name of the peer whose identity is the ed25519 public key `key` (an identity
    /// multihash of the key's protobuf encoding, as libp2p derives it).
    pub fn from_ed25519(key: [u8; 32]) -> Self {
        let mut bytes = Vec::with_capacity(38);
        bytes.extend_from_slice(&[IDENTITY, 36, 0x08, 0x01, 0x12, 0x20]);
        bytes.extend_from_slice(&key);
        NodeName(bs58::encode(bytes).into_string())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The multihash bytes the name spells (libp2p's `PeerId::from_bytes` takes them).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Checked when made, so it decodes; an empty result would be refused by libp2p.
        bs58::decode(&self.0).into_vec().unwrap_or_default()
    }
}

/// Which replica: a workload's name and the replica's ordinal. Unique in the cluster and on a
/// node, and stable across restarts, so a restarted node can find and adopt what still runs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId {
    /// The workload.
    pub workload: WorkloadName,
    /// The replica's ordinal.
    pub index: u32,
}

impl ReplicaId {
    /// Replica `index` of `workload`.
    pub fn new(workload: &WorkloadName, index: u32) -> Self {
        ReplicaId { workload: workload.clone(), index }
    }

    /// Parses the `workload.index` form that [`fmt::Display`] writes.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let (w, i) = s
            .rsplit_once('.')
            .ok_or_else(|| invalid("replica", format!("{:?} is not workload.index", shorten(s))))?;
        let index = i
            .parse()
            .map_err(|_| invalid("replica", format!("{:?} is not a replica index", shorten(i))))?;
        Ok(ReplicaId { workload: WorkloadName::new(w)?, index })
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.workload, self.index)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Longest failure reason carried in a replica's phase, in bytes: room for an error chain,
/// small enough that reports stay small.
pub const MAX_REASON: usize = 1024;

/// How a replica is doing, as the runtime that runs it sees it. The node reports it to raft as
/// it changes; reads show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaPhase {
    /// Wanted, not running yet (fetching, compiling, creating).
    Pending,
    /// Running; `ready` once its readiness probe passes (at once without one).
    Running {
        /// Whether it passes its readiness probe.
        ready: bool,
    },
    /// Finished successfully (a job, or a `never`/`on-failure` replica that exited 0).
    Succeeded,
    /// Stopped for good, with the reason.
    Failed(String),
    /// Waiting to be started again after it stopped.
    Restarting {
        /// Why it stopped.
        reason: String,
        /// Wait before the next start.
        backoff: std::time::Duration,
    },
}

impl ReplicaPhase {
    /// The word for the phase (CLI output, metric labels).
    pub fn word(&self) -> &'static str {
        match self {
            ReplicaPhase::Pending => "pending",
            ReplicaPhase::Running { .. } => "running",
            ReplicaPhase::Succeeded => "succeeded",
            ReplicaPhase::Failed(_) => "failed",
            ReplicaPhase::Restarting { .. } => "restarting",
        }
    }

    /// Why it failed or is restarting.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ReplicaPhase::Failed(r) | ReplicaPhase::Restarting { reason: r, .. } => Some(r),
            _ => None,
        }
    }

    /// Whether it runs now.
    pub fn is_running(&self) -> bool {
        matches!(self, ReplicaPhase::Running { .. })
    }

    /// The same phase with its reason cut to [`MAX_REASON`] bytes (runtimes may say more
    /// than a report may carry).
    pub fn bounded(self) -> Self {
        let cut = |mut r: String| {
            if r.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                r.truncate(end);
            }
            r
        };
        match self {
            ReplicaPhase::Failed(r) => ReplicaPhase::Failed(cut(r)),
            ReplicaPhase::Restarting { reason, backoff } => {
                ReplicaPhase::Restarting { reason: cut(reason), backoff }
            }
            other => other,
        }
    }

    /// Checks the bound on the reason.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self.reason() {
            Some(r) if r.len() > MAX_REASON => {
                Err(invalid("phase.reason", format!("longer than {MAX_REASON} bytes")))
            }
            _ => Ok(()),
        }
    }
}

/// At most this much of a refused input is quoted back in an error message.
const QUOTE: usize = 80;

fn shorten(s: &str) -> &str {
    let mut end = s.len().min(QUOTE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

macro_rules! text_type {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $t {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, InvalidInput> {
                $t::new(s)
            }
        }

        impl TryFrom<String> for $t {
            type Error = InvalidInput;
            fn try_from(s: String) -> Result<Self, InvalidInput> {
                $t::new(s)
            }
        }

        impl TryFrom<&str> for $t {
            type Error = InvalidInput;
            fn try_from(s: &str) -> Result<Self, InvalidInput> {
                $t::new(s)
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

text_type!(WorkloadName);
text_type!(ModuleHash);
text_type!(NodeName);

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519_peer(key: [u8; 32]) -> String {
        NodeName::from_ed25519(key).to_string()
    }

    #[test]
    fn workload_names_are_dns_labels() {
        for good in ["a", "web", "web-1", "a0", &"x".repeat(63)] {
            assert!(WorkloadName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "Web", "9web", "web-", "we_b", "../etc", "a.b", &"x".repeat(64)] {
            let e = WorkloadName::new(bad).unwrap_err().to_string();
            assert!(e.starts_with("name:"), "{bad}: {e}");
        }
        let json: Result<WorkloadName, _> = serde_json::from_str("\"../x\"");
        assert!(json.is_err(), "deserializing checks too");
    }

    #[test]
    fn module_hashes_are_lowercase_hex_sha256() {
        let h = ModuleHash::of(b"hello");
        assert_eq!(h.as_str().len(), 64);
        assert_eq!(ModuleHash::new(h.as_str()).unwrap(), h);
        assert!(ModuleHash::new(h.as_str().to_uppercase()).is_err(), "uppercase is refused");
        assert!(ModuleHash::new("abc").is_err());
        assert!(ModuleHash::new(format!("{}g", &h.as_str()[..63])).is_err());
    }

    #[test]
    fn node_names_are_canonical_peer_ids() {
        let known = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
        let n = NodeName::new(known).unwrap();
        assert_eq!(n.as_str(), known);
        assert_eq!(NodeName::from_bytes(&n.to_bytes()).unwrap(), n);
        assert!(NodeName::new(ed25519_peer([7; 32])).is_ok());
        let sha = bs58::encode([&[SHA2_256, 32][..], &[9; 32]].concat()).into_string();
        assert!(NodeName::new(sha).is_ok(), "a hashed key");
        for bad in ["", "not a peer", "0OIl", "12D3KooW", &"1".repeat(101)] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
        let long = bs58::encode([&[IDENTITY, 43][..], &[1; 43]].concat()).into_string();
        assert!(NodeName::new(long).is_err(), "identity keys are at most 42 bytes");
        let other = bs58::encode([&[0x13, 32][..], &[1; 32]].concat()).into_string();
        assert!(NodeName::new(other).is_err(), "only identity and sha2-256");
    }

    #[test]
    fn replica_ids_print_and_parse() {
        let r = ReplicaId::new(&WorkloadName::new("web").unwrap(), 3);
        assert_eq!(r.to_string(), "web.3");
        assert_eq!(ReplicaId::parse("web.3").unwrap(), r);
        assert!(ReplicaId::parse("web").is_err());
        assert!(ReplicaId::parse("Web.1").is_err());
        assert!(ReplicaId::parse("web.x").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_ed25519_peer_id_is_a_node_name(key in proptest::array::uniform32(0u8..)) {
            let text = ed25519_peer(key);
            let n = NodeName::new(text.clone()).unwrap();
            proptest::prop_assert_eq!(n.as_str(), text.as_str());
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,120}") {
            let _ = NodeName::new(s.clone());
            let _ = WorkloadName::new(s.clone());
            let _ = ModuleHash::new(s.clone());
            let _ = ReplicaId::parse(&s);
        }
    }
}
