//! The node directory: every node's slowly changing [`NodeDescriptor`], replicated to every node
//! as a map of entries that each node signs for itself.
//!
//! ```text
//!   set_own(descriptor) ──▶ sign (version = max(now, last + 1)) ──▶ push to a few peers
//!   tick ──▶ Summary{digest} to a random peer
//!   receive(peer, message, is_member, now) ──▶ bounded, verified, members only ──▶ Outcome
//!        Summary (differs)  ──▶ our Versions, range by range          (rate-limited per peer)
//!        Versions           ──▶ the Entries they lack; our Versions if we lack some
//!        Entries            ──▶ verify each signature ──▶ keep the newer ──▶ changed ids
//!        Want(ids)          ──▶ those entries, whatever their rank
//! ```
//!
//! A data dir restored from a backup is found out here: the data dir keeps this node's own
//! entry durably before any peer gets it, so a peer holding an own entry newer than the one
//! the data dir kept, which this run did not sign, shows the data dir went back in time
//! ([`Directory::stale`]; the node then stops rather than vote with a stale raft log).
//!
//! Only a node writes its own entry, so the directory is a map of single-writer registers: an
//! entry replaces another for the same node when its `(version, hash)` is greater, which makes
//! every copy converge to the same map after a partition heals or a phone returns from hours
//! offline, whatever order the messages came in (a state-based CRDT, as Serf and Cassandra
//! gossip node metadata). Every entry is a libp2p [`SignedEnvelope`] over the entry's payload:
//! the signing key *is* the node the entry describes, so no node can write another's entry,
//! and a relayed entry is believed because of its signature, not because of who relayed it.
//!
//! Bounds, because any member may be malicious: an entry is at most [`MAX_ENTRY_BYTES`] and
//! its descriptor is validated; entries describe enrolled nodes only (the caller's
//! `is_member`), at most [`MAX_ENTRIES`] of them; a message carries at most
//! [`MAX_BATCH_ENTRIES`] entries or [`MAX_VERSIONS`] versions; nothing is ever decompressed;
//! and what a peer can make us send back is limited by a per-peer byte budget
//! ([`ANSWER_BYTES_PER_SECOND`]). The directory holds only the newest entry per node: its
//! size does not grow with how often a node changes (an automerge document, which this
//! replaced, keeps every change forever). How often a node's entry may change here is
//! budgeted per author ([`CHANGE_BURST`], then one per [`CHANGE_INTERVAL`]): a member that
//! re-signs its entry again and again costs every node an event, an address book update and
//! a file rewrite per change otherwise. A change past the budget is not lost, only late: the
//! newest entry refused per author is kept ([`Directory::promote_late`] takes it once the
//! budget allows), so replaying an author's older entries to a node that lags cannot keep
//! its newest one out.
//!
//! A node that lost its copy (a reinstall with the same key) signs versions from its wall
//! clock; if an earlier life's entry comes back with a higher version, it signs its current
//! descriptor again above it, so its own entry always wins.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudless_types::NodeDescriptor;
use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::budget::Budgets;

/// Largest entry on the wire, in bytes. A valid descriptor at every bound (64 labels of 63 +
/// 253 bytes, 16 addresses of 256) encodes to about 25 KiB; the envelope adds ~100 bytes.
pub const MAX_ENTRY_BYTES: usize = 32 * 1024;
/// Most entries held: as many as the membership holds members.
pub const MAX_ENTRIES: usize = 100_000;
/// Most entries in one message, and their bytes together ([`MAX_BATCH_BYTES`]): a message
/// stays well inside the smallest datagram limit the config allows (128 KiB).
pub const MAX_BATCH_ENTRIES: usize = 256;
/// Bytes of entries in one message.
pub const MAX_BATCH_BYTES: usize = 96 * 1024;
/// Versions in one message (~80 bytes each: ~80 KiB).
pub const MAX_VERSIONS: usize = 1024;
/// Largest number of peers whose answer budget is kept at once.
pub const MAX_PEERS: usize = 4096;
/// What a peer can make us send in answers, per second (bytes). A full directory of a
/// thousand ordinary entries (~1 KiB each) is one second's worth; a member that asks again
/// and again gets its share and no more.
pub const ANSWER_BYTES_PER_SECOND: u64 = 1024 * 1024;
/// The burst a peer may ask for at once (a joiner's first full exchange).
pub const ANSWER_BURST_BYTES: u64 = 4 * 1024 * 1024;
/// Changes of one node's entry taken at once. An honest node signs one per listen address
/// it learns at start (QUIC over IPv4 and IPv6, a relay circuit or two), then one when its
/// network changes: eight covers a start with room to spare.
pub const CHANGE_BURST: u64 = 8;
/// One more change of a node's entry is taken per this interval once its burst is spent: a
/// phone that moves between networks every minute is still followed (half a minute late at
/// worst), and a member re-signing its entry as fast as it can costs each node a change per
/// 30 s instead of thousands.
pub const CHANGE_INTERVAL: Duration = Duration::from_secs(30);
/// Change budgets: [`CHANGE_BURST`] at once, one per [`CHANGE_INTERVAL`], for every entry.
fn change_budgets() -> Budgets<PeerId> {
    let burst = u32::try_from(CHANGE_BURST).unwrap_or(u32::MAX);
    Budgets::new(CHANGE_BURST, CHANGE_INTERVAL.saturating_mul(burst), MAX_ENTRIES)
}

/// Answer budgets: [`ANSWER_BURST_BYTES`] at once, [`ANSWER_BYTES_PER_SECOND`] sustained,
/// for at most [`MAX_PEERS`] peers.
fn answer_budgets() -> Budgets<PeerId> {
    let refill = Duration::from_millis(ANSWER_BURST_BYTES * 1000 / ANSWER_BYTES_PER_SECOND);
    Budgets::new(ANSWER_BURST_BYTES, refill, MAX_PEERS)
}

/// Name of the directory file inside the data dir.
pub const FILE: &str = "directory.entries";
/// The file of the automerge directory this one replaced; removed on open.
const OLD_FILE: &str = "directory.automerge";
/// Domain separation of the entry signatures.
pub const DOMAIN: &str = "cloudless-directory";
/// Payload type of the entry envelopes.
pub const PAYLOAD_TYPE: &[u8] = b"/cloudless/directory-entry/1";

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The descriptor breaks a bound.
    #[error("invalid descriptor: {0}")]
    Invalid(#[from] cloudless_types::InvalidInput),
    /// A message breaks the protocol's bounds or order.
    #[error("malformed directory message from {peer}: {reason}")]
    Malformed {
        /// The sender.
        peer: PeerId,
        /// What is wrong.
        reason: String,
    },
    /// This node's entry could not be signed.
    #[error("cannot sign this node's directory entry: {0}")]
    Sign(String),
    /// The directory file could not be read or written.
    #[error("directory file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A directory protocol message (carried in a datagram).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// What the sender holds, in one hash: equal digests mean equal directories.
    Summary {
        /// [`Directory::digest`] of the sender.
        digest: [u8; 32],
    },
    /// The versions the sender holds for the nodes in `(after, upto]` (`None`: unbounded).
    Versions {
        /// Exclusive lower end of the range.
        after: Option<PeerId>,
        /// Inclusive upper end of the range.
        upto: Option<PeerId>,
        /// Strictly ascending by node, all inside the range.
        versions: Vec<Version>,
        /// Whether the receiver should send its versions of the range back if it lacks some.
        reply: bool,
    },
    /// Signed entries (each a [`SignedEnvelope`] encoding).
    Entries(Vec<Vec<u8>>),
    /// Asks for the entries of these nodes whatever their rank (at most [`MAX_WANTED`]): a
    /// node asks for its own entry when a peer holds one it did not sign in this run.
    Want(Vec<PeerId>),
}

/// Most nodes one [`Message::Want`] may name.
pub const MAX_WANTED: usize = 16;

/// Which entry of a node the sender holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The node.
    pub peer: PeerId,
    /// Its entry's version.
    pub version: u64,
    /// The entry's SHA-256, which orders entries with equal versions. All of it: with a
    /// prefix, a member grinding signatures could make two entries tie and keep two copies
    /// apart, costing a versions exchange every round.
    pub hash: [u8; 32],
}

/// What a directory holds, in brief.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// [`Directory::digest`], hex-encoded: equal on two nodes means equal directories.
    pub digest: String,
    /// Entries held.
    pub entries: usize,
    /// [`Directory::stale`].
    pub stale: Option<Stale>,
}

/// What a received message did, and what to send back to its sender.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Nodes whose entries changed.
    pub changed: BTreeSet<PeerId>,
    /// Messages for the sender.
    pub replies: Vec<Message>,
    /// Entries that were refused, and why (for the log).
    pub refused: Vec<String>,
}

/// The payload of an entry: what the node signs.
#[derive(Serialize, Deserialize)]
struct Payload {
    version: u64,
    descriptor: NodeDescriptor,
}

/// An entry as held: its wire bytes and what they say.
#[derive(Clone)]
struct Entry {
    bytes: Vec<u8>,
    hash: [u8; 32],
    version: u64,
    descriptor: NodeDescriptor,
}

impl Entry {
    fn rank(&self) -> (u64, [u8; 32]) {
        (self.version, self.hash)
    }
}

/// Evidence that this node's data dir is older than its last run: a peer holds an entry this
/// node signed after the newest one its data dir kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    /// The version (unix milliseconds) of the newest own entry the data dir kept.
    pub kept: u64,
    /// The later version a peer holds.
    pub seen: u64,
}

/// The replicated directory of one node.
pub struct Directory {
    me: PeerId,
    key: Keypair,
    entries: BTreeMap<PeerId, Entry>,
    /// The version of our own entry in the file this directory was opened from.
    kept_own: Option<u64>,
    /// The first version signed in this run.
    first_signed: Option<u64>,
    /// Whether an own entry newer than `kept_own` from an earlier run means a stale data dir
    /// (false once the operator said the data dir was restored on purpose).
    detect_stale: bool,
    stale: Option<Stale>,
    /// Whether our own entry, as held, is in the data dir (it does not leave before).
    own_saved: bool,
    /// Whether this directory lives in a data dir ([`Directory::open`]); one made with
    /// [`Directory::new`] keeps nothing, so its entry leaves at once.
    durable: bool,
    /// Our descriptor, kept to sign again above an earlier life's entry.
    own: Option<NodeDescriptor>,
    /// Answer bytes per peer.
    budgets: Budgets<PeerId>,
    /// Changes taken per author (never our own).
    changes: Budgets<PeerId>,
    /// The newest entry per author that its budget refused, taken once it allows.
    late: BTreeMap<PeerId, Entry>,
    digest: Option<[u8; 32]>,
    dirty: bool,
}

impl Directory {
    /// An empty directory for the node whose key is `key`.
    pub fn new(key: Keypair) -> Self {
        Directory {
            me: key.public().to_peer_id(),
            key,
            entries: BTreeMap::new(),
            kept_own: None,
            first_signed: None,
            detect_stale: true,
            stale: None,
            own_saved: true,
            durable: false,
            own: None,
            budgets: answer_budgets(),
            changes: change_budgets(),
            late: BTreeMap::new(),
            digest: None,
            dirty: false,
        }
    }

    /// Loads the directory persisted in `data_dir`, or starts an empty one. A file that cannot
    /// be parsed is moved aside (`.corrupt`) and entries that do not verify are dropped: every
    /// entry is a replica that peers will send again. Returns a warning to log, if any.
    pub fn open(key: Keypair, data_dir: &Path) -> Result<(Self, Option<String>), DirectoryError> {
        let mut dir = Self::new(key);
        dir.durable = true;
        let old = data_dir.join(OLD_FILE);
        if old.exists() {
            fs::remove_file(&old).map_err(|source| DirectoryError::Io { path: old, source })?;
        }
        let path = data_dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((dir, None)),
            Err(source) => return Err(DirectoryError::Io { path, source }),
        };
        let Ok(list) = postcard::from_bytes::<Vec<Vec<u8>>>(&bytes) else {
            let aside = path.with_extension("corrupt");
            fs::rename(&path, &aside)
                .map_err(|source| DirectoryError::Io { path: path.clone(), source })?;
            let warning = format!(
                "directory file {} is corrupt; moved to {}",
                path.display(),
                aside.display()
            );
            return Ok((dir, Some(warning)));
        };
        let mut bad = 0usize;
        for bytes in list.into_iter().take(MAX_ENTRIES) {
            match verify(&bytes) {
                Ok((peer, entry)) => {
                    if peer == dir.me {
                        dir.own = Some(entry.descriptor.clone());
                        dir.kept_own = Some(entry.version);
                    }
                    dir.entries.insert(peer, entry);
                }
                Err(_) => bad += 1,
            }
        }
        let warning = (bad > 0)
            .then(|| format!("{bad} entries of directory file {} did not verify", path.display()));
        Ok((dir, warning))
    }

    /// Writes the directory to `data_dir` atomically and durably.
    pub fn persist(&mut self, data_dir: &Path) -> Result<(), DirectoryError> {
        let path = data_dir.join(FILE);
        let io = |source| DirectoryError::Io { path: path.clone(), source };
        let list: Vec<&[u8]> = self.entries.values().map(|e| e.bytes.as_slice()).collect();
        let bytes =
            postcard::to_allocvec(&list).map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.dirty = false;
        self.own_saved = true;
        Ok(())
    }

    /// Stops treating an own entry from a later run as a stale data dir (the operator
    /// restored it on purpose): this node signs above it instead, as after a lost copy.
    pub fn accept_restored(&mut self) {
        self.detect_stale = false;
    }

    /// Evidence that the data dir is older than this node's last run, if any was seen. The
    /// data dir keeps our own entry durably before any peer gets it, so a peer holding a
    /// later one that this run did not sign means the data dir went back in time (restored
    /// from a backup, or copied back). Only our key signs our entries, so no peer can fake it.
    pub fn stale(&self) -> Option<Stale> {
        self.stale
    }

    /// Whether entries changed since the last [`persist`](Self::persist).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The digest of every entry held (node, version and hash, in node order): equal on two
    /// nodes means equal directories.
    pub fn digest(&mut self) -> [u8; 32] {
        if let Some(d) = self.digest {
            return d;
        }
        let mut h = Sha256::new();
        for (peer, e) in &self.entries {
            h.update(peer.to_bytes());
            h.update(e.version.to_be_bytes());
            h.update(e.hash);
        }
        let d: [u8; 32] = h.finalize().into();
        self.digest = Some(d);
        d
    }

    /// The digest (hex) and the number of entries.
    pub fn stats(&mut self) -> Stats {
        Stats {
            digest: self.digest().iter().map(|b| format!("{b:02x}")).collect(),
            entries: self.entries.len(),
            stale: self.stale,
        }
    }

    /// Sets this node's own entry, signed with a version above every earlier one (`unix_ms`:
    /// the wall clock, in milliseconds). Returns whether anything changed.
    pub fn set_own(
        &mut self,
        descriptor: &NodeDescriptor,
        unix_ms: u64,
    ) -> Result<bool, DirectoryError> {
        descriptor.validate()?;
        if self.own.as_ref() == Some(descriptor)
            && self.entries.get(&self.me).map(|e| &e.descriptor) == Some(descriptor)
        {
            return Ok(false);
        }
        let floor = self.entries.get(&self.me).map_or(0, |e| e.version.saturating_add(1));
        self.sign_own(descriptor.clone(), unix_ms.max(floor))?;
        Ok(true)
    }

    fn sign_own(&mut self, descriptor: NodeDescriptor, version: u64) -> Result<(), DirectoryError> {
        let payload = postcard::to_allocvec(&Payload { version, descriptor: descriptor.clone() })
            .map_err(|e| DirectoryError::Sign(e.to_string()))?;
        let envelope =
            SignedEnvelope::new(&self.key, DOMAIN.to_owned(), PAYLOAD_TYPE.to_vec(), payload)
                .map_err(|e| DirectoryError::Sign(e.to_string()))?;
        let bytes = envelope.into_protobuf_encoding();
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(DirectoryError::Sign(format!(
                "the entry is {} bytes, at most {MAX_ENTRY_BYTES}",
                bytes.len()
            )));
        }
        let hash = Sha256::digest(&bytes).into();
        self.first_signed.get_or_insert(version);
        self.own_saved = false;
        self.entries
            .insert(self.me, Entry { bytes, hash, version, descriptor: descriptor.clone() });
        self.own = Some(descriptor);
        self.touch();
        Ok(())
    }

    fn touch(&mut self) {
        self.digest = None;
        self.dirty = true;
    }

    /// Every entry, by node.
    pub fn entries(&self) -> BTreeMap<PeerId, NodeDescriptor> {
        self.entries.iter().map(|(p, e)| (*p, e.descriptor.clone())).collect()
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One node's entry, if present.
    pub fn get(&self, peer: &PeerId) -> Option<NodeDescriptor> {
        self.entries.get(peer).map(|e| e.descriptor.clone())
    }

    /// The message that starts an exchange with a peer.
    pub fn summary(&mut self) -> Message {
        Message::Summary { digest: self.digest() }
    }

    /// Whether our own entry changed and is not in the data dir yet (persist now).
    pub fn own_unsaved(&self) -> bool {
        self.durable && !self.own_saved
    }

    /// Our own entry, to push to a few peers after it changed, once the data dir keeps it.
    pub fn own_entry(&self) -> Option<Message> {
        if !self.shareable(&self.me) {
            return None;
        }
        self.entries.get(&self.me).map(|e| Message::Entries(vec![e.bytes.clone()]))
    }

    /// Drops the entries of nodes that are no longer members; returns them.
    pub fn retain(&mut self, is_member: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        let gone: Vec<PeerId> =
            self.entries.keys().filter(|p| **p != self.me && !is_member(p)).copied().collect();
        for p in &gone {
            self.entries.remove(p);
            self.budgets.forget(p);
            self.changes.forget(p);
            self.late.remove(p);
        }
        if !gone.is_empty() {
            self.touch();
        }
        gone
    }

    /// Forgets what is kept about a peer the membership forgot (its answer budget; its entry
    /// stays until it is no longer a member).
    pub fn forget(&mut self, peer: &PeerId) {
        self.budgets.forget(peer);
    }

    /// Applies a message from member `peer`. `is_member` says which nodes may have entries;
    /// `now` meters what the peer can make us send back. A message that breaks the protocol
    /// changes nothing.
    pub fn receive(
        &mut self,
        peer: PeerId,
        message: Message,
        is_member: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> Result<Outcome, DirectoryError> {
        let mut out = Outcome::default();
        // What the peer may make us send is known before anything is built: replies are
        // built within it, and charged for what they cost.
        let mut allowance = self.allowance(&peer, now);
        match message {
            Message::Summary { digest } => {
                if digest != self.digest() {
                    let all: Vec<Version> = self
                        .entries
                        .iter()
                        .filter(|(p, _)| self.shareable(p))
                        .map(|(p, e)| version_of(p, e))
                        .collect();
                    out.replies = version_messages(all, None, None, true);
                    keep_within(&mut out.replies, &mut allowance);
                }
            }
            Message::Versions { after, upto, versions, reply } => {
                let theirs = check_versions(peer, after.as_ref(), upto.as_ref(), &versions)?;
                let range = (
                    after.map_or(Bound::Unbounded, Bound::Excluded),
                    upto.map_or(Bound::Unbounded, Bound::Included),
                );
                // An own entry from after what the data dir kept, which this run did not sign:
                // the signed entry is the evidence, so ask for it (and hold ours back until
                // it came, or the peer would answer with ours).
                let evidence = theirs.get(&self.me).is_some_and(|(v, _)| self.would_be_stale(*v));
                let newer = self.entries.range(range).filter(|(p, e)| {
                    theirs.get(*p).is_none_or(|r| e.rank() > *r)
                        && self.shareable(p)
                        && !(evidence && **p == self.me)
                });
                out.replies = batches(take_within(newer.map(|(_, e)| e), &mut allowance));
                let lack = theirs.iter().any(|(p, r)| {
                    is_member(p) && self.entries.get(p).is_none_or(|e| *r > e.rank())
                });
                if lack && reply {
                    let mine: Vec<Version> = self
                        .entries
                        .range(range)
                        .filter(|(p, _)| self.shareable(p))
                        .map(|(p, e)| version_of(p, e))
                        .collect();
                    let mut asks = version_messages(mine, after, upto, false);
                    keep_within(&mut asks, &mut allowance);
                    out.replies.extend(asks);
                }
                if evidence {
                    out.replies.push(Message::Want(vec![self.me]));
                }
            }
            Message::Want(peers) => {
                if peers.len() > MAX_WANTED {
                    return Err(DirectoryError::Malformed {
                        peer,
                        reason: format!("{} nodes wanted, at most {MAX_WANTED}", peers.len()),
                    });
                }
                let wanted =
                    peers.iter().filter(|p| self.shareable(p)).filter_map(|p| self.entries.get(p));
                out.replies = batches(take_within(wanted, &mut allowance));
            }
            Message::Entries(list) => {
                if list.len() > MAX_BATCH_ENTRIES {
                    return Err(DirectoryError::Malformed {
                        peer,
                        reason: format!("{} entries, at most {MAX_BATCH_ENTRIES}", list.len()),
                    });
                }
                for bytes in list {
                    match self.accept(&bytes, &is_member, now) {
                        Ok(Some(p)) => {
                            out.changed.insert(p);
                        }
                        Ok(None) => {}
                        Err(reason) => out.refused.push(reason),
                    }
                }
            }
        }
        let cost: u64 = out.replies.iter().map(message_cost).sum();
        self.spend(peer, cost, now);
        Ok(out)
    }

    /// Verifies one entry and keeps it if it is newer and its author's change budget allows;
    /// returns the node whose entry changed.
    fn accept(
        &mut self,
        bytes: &[u8],
        is_member: &impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> Result<Option<PeerId>, String> {
        let (peer, entry) = verify(bytes)?;
        if peer == self.me {
            if self.would_be_stale(entry.version)
                && let Some(kept) = self.kept_own
            {
                // Signed after what the data dir kept, and not in this run.
                self.stale.get_or_insert(Stale { kept, seen: entry.version });
                return Err(format!(
                    "an own entry of version {} is newer than the data dir's {kept}",
                    entry.version
                ));
            }
            // An earlier life of ours signed this: if it outranks ours, sign ours above it.
            // Before this life set its entry, keep the newest earlier one (set_own signs
            // above it).
            let ours = self.entries.get(&self.me).map(Entry::rank);
            if ours.is_none_or(|r| entry.rank() > r) {
                match self.own.clone() {
                    Some(own) => self
                        .sign_own(own, entry.version.saturating_add(1))
                        .map_err(|e| e.to_string())?,
                    None => {
                        self.entries.insert(peer, entry);
                        self.touch();
                    }
                }
            }
            return Ok(None);
        }
        if !is_member(&peer) {
            return Err(format!("entry of {peer}, which is not a member"));
        }
        match self.entries.get(&peer) {
            Some(old) if old.rank() >= entry.rank() => return Ok(None),
            None if self.entries.len() >= MAX_ENTRIES => {
                return Err(format!("entry of {peer}: the directory holds {MAX_ENTRIES}"));
            }
            _ => {}
        }
        // Charged only for a verified entry that would replace: nobody can spend an author's
        // budget with entries it did not sign, or with ones older than what we hold.
        if self.changes.available(&peer, now) == 0 {
            if self.late.get(&peer).is_none_or(|l| entry.rank() > l.rank()) {
                self.late.insert(peer, entry);
            }
            return Err(format!(
                "entry of {peer} changed more than {CHANGE_BURST} times, then more than once \
                 per {}s; taken later",
                CHANGE_INTERVAL.as_secs()
            ));
        }
        // The newest seen wins the budget: an older entry replayed the moment it refilled
        // does not take the place of one refused before.
        let entry = match self.late.remove(&peer) {
            Some(l) if l.rank() > entry.rank() => l,
            _ => entry,
        };
        self.changes.spend(peer, 1, now);
        self.entries.insert(peer, entry);
        self.touch();
        Ok(Some(peer))
    }

    /// Takes the late entries (refused by their author's budget) that the budget allows now;
    /// returns the nodes whose entries changed. Called periodically.
    pub fn promote_late(
        &mut self,
        is_member: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> Vec<PeerId> {
        let due: Vec<PeerId> =
            self.late.keys().filter(|p| self.changes.available(p, now) > 0).copied().collect();
        let mut changed = Vec::new();
        for p in due {
            let Some(entry) = self.late.remove(&p) else { continue };
            let newer = self.entries.get(&p).is_none_or(|held| entry.rank() > held.rank());
            if newer && is_member(&p) {
                self.changes.spend(p, 1, now);
                self.entries.insert(p, entry);
                changed.push(p);
            }
        }
        if !changed.is_empty() {
            self.touch();
        }
        changed
    }

    /// Whether an own entry of `version` would show the data dir older than our last run:
    /// after what it kept, and not signed in this run.
    fn would_be_stale(&self, version: u64) -> bool {
        self.detect_stale
            && self.stale.is_none()
            && self.kept_own.is_some_and(|kept| version > kept)
            && self.first_signed.is_none_or(|first| version < first)
    }

    /// Our versions, range by range, covering every node.
    #[cfg(test)]
    fn versions(&self, reply: bool) -> Vec<Message> {
        let all: Vec<Version> = self.entries.iter().map(|(p, e)| version_of(p, e)).collect();
        version_messages(all, None, None, reply)
    }

    /// What `peer` may make us send now (its budget, refilled since it last asked).
    fn allowance(&self, peer: &PeerId, now: Instant) -> u64 {
        self.budgets.available(peer, now)
    }

    /// Takes `cost` bytes from `peer`'s budget (what [`Directory::allowance`] allowed).
    fn spend(&mut self, peer: PeerId, cost: u64, now: Instant) {
        self.budgets.spend(peer, cost, now);
    }

    /// Whether `peer`'s entry may leave this node: ours only once the data dir keeps it (a
    /// peer holding an own entry the data dir lost would take this node for a restore).
    fn shareable(&self, peer: &PeerId) -> bool {
        *peer != self.me || self.own_saved || !self.durable
    }
}

/// Decodes and verifies one entry: the node it describes (its signer) and the entry.
fn verify(bytes: &[u8]) -> Result<(PeerId, Entry), String> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(format!("entry of {} bytes, at most {MAX_ENTRY_BYTES}", bytes.len()));
    }
    let envelope = SignedEnvelope::from_protobuf_encoding(bytes)
        .map_err(|e| format!("entry is not a signed envelope: {e}"))?;
    let (payload, key) = envelope
        .payload_and_signing_key(DOMAIN.to_owned(), PAYLOAD_TYPE)
        .map_err(|e| format!("entry does not verify: {e}"))?;
    let peer = key.to_peer_id();
    let p: Payload =
        postcard::from_bytes(payload).map_err(|e| format!("entry of {peer} is malformed: {e}"))?;
    p.descriptor.validate().map_err(|e| format!("entry of {peer}: {e}"))?;
    let hash = Sha256::digest(bytes).into();
    Ok((peer, Entry { bytes: bytes.to_vec(), hash, version: p.version, descriptor: p.descriptor }))
}

/// Checks a versions message: bounded, strictly ascending, inside its range.
fn check_versions(
    peer: PeerId,
    after: Option<&PeerId>,
    upto: Option<&PeerId>,
    versions: &[Version],
) -> Result<BTreeMap<PeerId, (u64, [u8; 32])>, DirectoryError> {
    let bad = |reason: String| DirectoryError::Malformed { peer, reason };
    if versions.len() > MAX_VERSIONS {
        return Err(bad(format!("{} versions, at most {MAX_VERSIONS}", versions.len())));
    }
    if let (Some(a), Some(u)) = (after, upto)
        && a >= u
    {
        return Err(bad("an empty range".into()));
    }
    let mut last = after.copied();
    let mut map = BTreeMap::new();
    for v in versions {
        if last.is_some_and(|l| v.peer <= l) || upto.is_some_and(|u| v.peer > *u) {
            return Err(bad(format!("version of {} out of order or outside the range", v.peer)));
        }
        last = Some(v.peer);
        map.insert(v.peer, (v.version, v.hash));
    }
    Ok(map)
}

fn version_of(peer: &PeerId, e: &Entry) -> Version {
    Version { peer: *peer, version: e.version, hash: e.hash }
}

/// Splits versions covering `(after, upto]` into messages of at most [`MAX_VERSIONS`], each
/// covering its own sub-range (the ranges together cover exactly `(after, upto]`).
fn version_messages(
    versions: Vec<Version>,
    after: Option<PeerId>,
    upto: Option<PeerId>,
    reply: bool,
) -> Vec<Message> {
    let chunks: Vec<Vec<Version>> = versions.chunks(MAX_VERSIONS).map(<[_]>::to_vec).collect();
    if chunks.is_empty() {
        return vec![Message::Versions { after, upto, versions: Vec::new(), reply }];
    }
    let n = chunks.len();
    let mut lower = after;
    let mut out = Vec::with_capacity(n);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let end = if i + 1 == n { upto } else { chunk.last().map(|v| v.peer) };
        out.push(Message::Versions { after: lower, upto: end, versions: chunk, reply });
        lower = end;
    }
    out
}

/// Packs entries into messages within [`MAX_BATCH_ENTRIES`] and [`MAX_BATCH_BYTES`].
fn batches(entries: Vec<Vec<u8>>) -> Vec<Message> {
    let mut out = Vec::new();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut size = 0usize;
    for e in entries {
        if !cur.is_empty() && (cur.len() >= MAX_BATCH_ENTRIES || size + e.len() > MAX_BATCH_BYTES) {
            out.push(Message::Entries(std::mem::take(&mut cur)));
            size = 0;
        }
        size += e.len();
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(Message::Entries(cur));
    }
    out
}

/// The leading entries whose bytes fit `allowance` (taken from it), copied for sending.
fn take_within<'a>(entries: impl Iterator<Item = &'a Entry>, allowance: &mut u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        let cost = u64::try_from(e.bytes.len() + 4).unwrap_or(u64::MAX);
        if cost > *allowance {
            break;
        }
        *allowance -= cost;
        out.push(e.bytes.clone());
    }
    out
}

/// Keeps the leading messages that fit `allowance`, and takes their cost from it.
fn keep_within(messages: &mut Vec<Message>, allowance: &mut u64) {
    let mut kept = 0;
    for m in messages.iter() {
        let cost = message_cost(m);
        if cost > *allowance {
            break;
        }
        *allowance -= cost;
        kept += 1;
    }
    messages.truncate(kept);
}

/// About how many bytes a message takes on the wire.
fn message_cost(m: &Message) -> u64 {
    let n = match m {
        Message::Summary { .. } => 40,
        Message::Versions { versions, .. } => 100 + versions.len() * 56,
        Message::Entries(list) => list.iter().map(|e| e.len() + 4).sum(),
        Message::Want(peers) => 8 + peers.len() * 40,
    };
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
