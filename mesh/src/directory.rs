//! The node directory: every node's slowly changing [`NodeDescriptor`], replicated to every node
//! as one automerge document.
//!
//! ```text
//!   set_own(descriptor) ──▶ write root[<own peer id>] ──▶ persist ──▶ sync messages to peers
//!   receive(peer, msg) ──▶ trial-apply on a copy ──▶ check authorship ──▶ adopt ──▶ changed ids
//! ```
//!
//! Each node writes only the key named after its own PeerId at the document root. Keys are
//! distinct per node, so concurrent edits by different nodes never conflict, and after a
//! partition heals or a phone returns from hours offline every copy converges to the same state.
//! Peers exchange automerge sync messages, which carry only the changes the other side lacks.
//!
//! Every change is checked before it is adopted: its actor id embeds the author's PeerId, and
//! every operation must touch the author's own key or objects the author created. A sync
//! message with a forged change is refused whole and leaves the document untouched.
//!
//! Actor ids are `[len][peer id bytes][8 random bytes]`, fresh at every start, so that a node
//! that lost its copy of the document never reuses a sequence number of an earlier life.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, AutomergeError, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use cloudless_types::{DeviceClass, NodeDescriptor, Runtime};
use libp2p::PeerId;
use rand::RngCore;

/// Largest number of peers whose sync state is kept at once (each is a few hundred bytes).
pub const MAX_SYNC_PEERS: usize = 4096;
/// Name of the document file inside the data dir.
pub const FILE: &str = "directory.automerge";

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The descriptor breaks a bound.
    #[error("invalid descriptor: {0}")]
    Invalid(#[from] cloudless_types::InvalidInput),
    /// A sync message could not be decoded.
    #[error("malformed directory sync message from {peer}: {reason}")]
    Malformed {
        /// The sender.
        peer: PeerId,
        /// What is wrong.
        reason: String,
    },
    /// A sync message carried a change that writes another node's entry.
    #[error("directory sync message from {peer} refused: {reason}")]
    Forged {
        /// The sender.
        peer: PeerId,
        /// Which change and why.
        reason: String,
    },
    /// Automerge refused an operation.
    #[error("directory document: {0}")]
    Document(#[from] AutomergeError),
    /// The document file could not be read or written.
    #[error("directory file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The replicated directory of one node.
pub struct Directory {
    me: PeerId,
    key: String,
    doc: Automerge,
    /// Sync state per peer; bounded by the number of members the caller keeps.
    peers: HashMap<PeerId, sync::State>,
    own: Option<NodeDescriptor>,
    /// Our entry was written by an earlier life of this node concurrently with this one.
    rewrite_own: bool,
    dirty: bool,
}

impl Directory {
    /// An empty directory for node `me`.
    pub fn new(me: PeerId) -> Self {
        Self::with_doc(me, Automerge::new())
    }

    fn with_doc(me: PeerId, mut doc: Automerge) -> Self {
        doc.set_actor(fresh_actor(&me));
        Directory {
            key: me.to_base58(),
            me,
            doc,
            peers: HashMap::new(),
            own: None,
            rewrite_own: false,
            dirty: false,
        }
    }

    /// Loads the directory persisted in `data_dir`, or starts an empty one. A file that cannot
    /// be parsed is moved aside (`.corrupt`) and the directory starts empty: every entry in it
    /// is a replica that peers will send again.
    pub fn open(me: PeerId, data_dir: &Path) -> Result<(Self, Option<String>), DirectoryError> {
        let path = data_dir.join(FILE);
        match fs::read(&path) {
            Ok(bytes) => match Automerge::load(&bytes) {
                Ok(doc) => Ok((Self::with_doc(me, doc), None)),
                Err(e) => {
                    let aside = path.with_extension("corrupt");
                    fs::rename(&path, &aside)
                        .map_err(|source| DirectoryError::Io { path: path.clone(), source })?;
                    let warning = format!(
                        "directory file {} is corrupt ({e}); moved to {}",
                        path.display(),
                        aside.display()
                    );
                    Ok((Self::new(me), Some(warning)))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Self::new(me), None)),
            Err(source) => Err(DirectoryError::Io { path, source }),
        }
    }

    /// Writes the document to `data_dir` atomically and durably.
    pub fn persist(&mut self, data_dir: &Path) -> Result<(), DirectoryError> {
        let path = data_dir.join(FILE);
        let io = |source| DirectoryError::Io { path: path.clone(), source };
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.doc.save()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        self.dirty = false;
        Ok(())
    }

    /// Whether changes arrived since the last [`persist`](Self::persist).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The document heads, hex-encoded and sorted: equal heads mean equal documents.
    pub fn heads(&self) -> Vec<String> {
        let mut heads: Vec<String> = self.doc.get_heads().iter().map(|h| h.to_string()).collect();
        heads.sort();
        heads
    }

    /// Sets this node's own entry. Returns whether anything changed.
    pub fn set_own(&mut self, descriptor: &NodeDescriptor) -> Result<bool, DirectoryError> {
        descriptor.validate()?;
        if !self.rewrite_own
            && self.own.as_ref() == Some(descriptor)
            && self.entry(&self.key).as_ref() == Some(descriptor)
        {
            return Ok(false);
        }
        let key = self.key.clone();
        let recreate = self.rewrite_own || self.doc.get_all(ROOT, key.as_str())?.len() != 1;
        let result = self.doc.transact::<_, _, AutomergeError>(|tx| {
            let entry = match tx.get(ROOT, key.as_str())? {
                Some((Value::Object(ObjType::Map), id)) if !recreate => id,
                _ => tx.put_object(ROOT, key.as_str(), ObjType::Map)?,
            };
            write_entry(tx, &entry, descriptor)
        });
        result.map_err(|f| f.error)?;
        self.own = Some(descriptor.clone());
        self.rewrite_own = false;
        self.dirty = true;
        Ok(true)
    }

    /// Every valid entry, by node.
    pub fn entries(&self) -> BTreeMap<PeerId, NodeDescriptor> {
        self.doc
            .keys(ROOT)
            .filter_map(|k| {
                let peer: PeerId = k.parse().ok()?;
                Some((peer, self.entry(&k)?))
            })
            .collect()
    }

    /// One node's entry, if present and valid.
    pub fn get(&self, peer: &PeerId) -> Option<NodeDescriptor> {
        self.entry(&peer.to_base58())
    }

    fn entry(&self, key: &str) -> Option<NodeDescriptor> {
        let (value, obj) = self.doc.get(ROOT, key).ok()??;
        if !matches!(value, Value::Object(ObjType::Map)) {
            return None;
        }
        let d = read_entry(&self.doc, &obj)?;
        d.validate().ok()?;
        Some(d)
    }

    /// The next sync message for `peer`, if it lacks anything we know of.
    pub fn generate(&mut self, peer: PeerId) -> Option<Vec<u8>> {
        self.make_room(&peer);
        let state = self.peers.entry(peer).or_default();
        self.doc.generate_sync_message(state).map(|m| m.encode())
    }

    /// Keeps the per-peer sync states within [`MAX_SYNC_PEERS`]: a forgotten peer only costs
    /// one extra round trip the next time (its state starts afresh).
    fn make_room(&mut self, peer: &PeerId) {
        if self.peers.len() >= MAX_SYNC_PEERS
            && !self.peers.contains_key(peer)
            && let Some(victim) = self.peers.keys().next().copied()
        {
            self.peers.remove(&victim);
        }
    }

    /// Forgets the sync state of a peer that left or died.
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Starts the exchange with `peer` afresh (after a reconnection).
    pub fn reset(&mut self, peer: &PeerId) {
        self.peers.insert(*peer, sync::State::new());
    }

    /// Applies a sync message from `peer`. Returns the nodes whose entries changed.
    pub fn receive(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
    ) -> Result<BTreeSet<PeerId>, DirectoryError> {
        let message = sync::Message::decode(bytes)
            .map_err(|e| DirectoryError::Malformed { peer, reason: e.to_string() })?;
        let before = self.doc.get_heads();
        let mut trial = self.doc.clone();
        let mut state = self.peers.get(&peer).cloned().unwrap_or_default();
        trial
            .receive_sync_message(&mut state, message)
            .map_err(|e| DirectoryError::Malformed { peer, reason: e.to_string() })?;
        let mut changed = BTreeSet::new();
        let own_actor = self.doc.get_actor().clone();
        for change in trial.get_changes(&before) {
            let author =
                check_change(&change).map_err(|reason| DirectoryError::Forged { peer, reason })?;
            if author == self.me && *change.actor_id() != own_actor {
                // An earlier life of ours wrote our entry; make ours win again.
                self.rewrite_own = true;
            }
            changed.insert(author);
        }
        self.doc = trial;
        self.make_room(&peer);
        self.peers.insert(peer, state);
        if !changed.is_empty() {
            self.dirty = true;
        }
        if self.rewrite_own
            && let Some(own) = self.own.clone()
        {
            self.set_own(&own)?;
        }
        changed.remove(&self.me);
        Ok(changed)
    }
}

fn fresh_actor(me: &PeerId) -> ActorId {
    let peer = me.to_bytes();
    let mut bytes = Vec::with_capacity(1 + peer.len() + 8);
    bytes.push(u8::try_from(peer.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(&peer);
    let mut nonce = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut nonce);
    bytes.extend_from_slice(&nonce);
    ActorId::from(bytes)
}

/// The PeerId embedded in an actor id.
fn author_of(actor: &ActorId) -> Option<PeerId> {
    let bytes = actor.to_bytes();
    let len = usize::from(*bytes.first()?);
    PeerId::from_bytes(bytes.get(1..1 + len)?).ok()
}

/// Checks that every operation of `change` stays inside its author's entry; returns the author.
fn check_change(change: &automerge::Change) -> Result<PeerId, String> {
    let hash = change.hash();
    let author = author_of(change.actor_id())
        .ok_or_else(|| format!("change {hash} has an actor id that names no peer"))?;
    let key = author.to_base58();
    for op in change.decode().operations {
        let ok = match &op.obj {
            automerge::legacy::ObjectId::Root => {
                matches!(&op.key, automerge::legacy::Key::Map(k) if k.as_str() == key)
            }
            automerge::legacy::ObjectId::Id(id) => author_of(id.actor()) == Some(author),
        };
        if !ok {
            return Err(format!("change {hash} by {author} writes outside its own entry"));
        }
    }
    Ok(author)
}

fn write_entry(
    tx: &mut automerge::transaction::Transaction<'_>,
    entry: &automerge::ObjId,
    d: &NodeDescriptor,
) -> Result<(), AutomergeError> {
    let put_opt = |tx: &mut automerge::transaction::Transaction<'_>,
                   k: &str,
                   v: Option<&str>|
     -> Result<(), AutomergeError> {
        match v {
            Some(v) => tx.put(entry, k, v),
            None => {
                if tx.get(entry, k)?.is_some() {
                    tx.delete(entry, k)?;
                }
                Ok(())
            }
        }
    };
    put_opt(tx, "zone", d.zone.as_deref())?;
    put_opt(tx, "region", d.region.as_deref())?;
    put_opt(tx, "class", d.device_class.map(|c| c.as_str()))?;
    tx.put(entry, "cpu", ScalarValue::Uint(u64::from(d.cpu_millis)))?;
    tx.put(entry, "memory", ScalarValue::Uint(u64::from(d.memory_mib)))?;
    tx.put(entry, "disk", ScalarValue::Uint(u64::from(d.disk_mib)))?;
    tx.put(entry, "gpus", ScalarValue::Uint(u64::from(d.gpus)))?;
    let lists: [(&str, Vec<&str>); 2] = [
        ("addrs", d.addrs.iter().map(String::as_str).collect()),
        ("runtimes", d.runtimes.iter().map(|r| r.as_str()).collect()),
    ];
    for (name, items) in lists {
        let current = match tx.get(entry, name)? {
            Some((Value::Object(ObjType::List), id)) => Some(read_list(tx, &id)),
            _ => None,
        };
        if current.as_deref().map(|c| c.iter().map(String::as_str).collect::<Vec<_>>())
            != Some(items.clone())
        {
            let list = tx.put_object(entry, name, ObjType::List)?;
            for (i, item) in items.iter().enumerate() {
                tx.insert(&list, i, *item)?;
            }
        }
    }
    let labels = match tx.get(entry, "labels")? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => tx.put_object(entry, "labels", ObjType::Map)?,
    };
    let existing: Vec<String> = tx.keys(&labels).collect();
    for k in existing {
        if !d.labels.contains_key(&k) {
            tx.delete(&labels, k.as_str())?;
        }
    }
    for (k, v) in &d.labels {
        let same = tx
            .get(&labels, k.as_str())?
            .and_then(|(v, _)| v.as_str().map(str::to_owned))
            .as_deref()
            == Some(v.as_str());
        if !same {
            tx.put(&labels, k.as_str(), v.as_str())?;
        }
    }
    Ok(())
}

fn read_list<D: ReadDoc>(doc: &D, list: &automerge::ObjId) -> Vec<String> {
    doc.list_range(list, ..)
        .filter_map(|item| Value::from(item.value).as_str().map(str::to_owned))
        .collect()
}

fn read_entry<D: ReadDoc>(doc: &D, entry: &automerge::ObjId) -> Option<NodeDescriptor> {
    let str_of = |k: &str| -> Option<String> {
        doc.get(entry, k).ok()?.and_then(|(v, _)| v.as_str().map(str::to_owned))
    };
    let num_of = |k: &str| -> u64 {
        doc.get(entry, k).ok().flatten().and_then(|(v, _)| v.as_u64()).unwrap_or(0)
    };
    let list_of = |k: &str| -> Vec<String> {
        match doc.get(entry, k).ok().flatten() {
            Some((Value::Object(ObjType::List), id)) => read_list(doc, &id),
            _ => Vec::new(),
        }
    };
    let mut labels = BTreeMap::new();
    if let Some((Value::Object(ObjType::Map), id)) = doc.get(entry, "labels").ok().flatten() {
        for k in doc.keys(&id) {
            if let Some(v) = doc
                .get(&id, k.as_str())
                .ok()
                .flatten()
                .and_then(|(v, _)| v.as_str().map(str::to_owned))
            {
                labels.insert(k, v);
            }
        }
    }
    let device_class = match str_of("class") {
        Some(c) => Some(DeviceClass::parse(&c)?),
        None => None,
    };
    let runtimes =
        list_of("runtimes").iter().map(|r| Runtime::parse(r)).collect::<Option<Vec<_>>>()?;
    Some(NodeDescriptor {
        addrs: list_of("addrs"),
        labels,
        zone: str_of("zone"),
        region: str_of("region"),
        device_class,
        runtimes,
        cpu_millis: u32::try_from(num_of("cpu")).ok()?,
        memory_mib: u32::try_from(num_of("memory")).ok()?,
        disk_mib: u32::try_from(num_of("disk")).ok()?,
        gpus: u16::try_from(num_of("gpus")).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn desc(zone: &str) -> NodeDescriptor {
        let mut d = NodeDescriptor {
            addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()],
            zone: Some(zone.into()),
            device_class: Some(DeviceClass::Laptop),
            runtimes: vec![Runtime::Wasi],
            cpu_millis: 4000,
            memory_mib: 8192,
            ..Default::default()
        };
        d.labels.insert("owner".into(), "alice".into());
        d
    }

    /// Runs the sync protocol between two directories until neither has anything to send.
    fn sync_pair(a: &mut Directory, b: &mut Directory) {
        for _ in 0..20 {
            let mut quiet = true;
            if let Some(m) = a.generate(b.me) {
                b.receive(a.me, &m).unwrap();
                quiet = false;
            }
            if let Some(m) = b.generate(a.me) {
                a.receive(b.me, &m).unwrap();
                quiet = false;
            }
            if quiet {
                return;
            }
        }
        panic!("sync did not settle");
    }

    #[test]
    fn entries_replicate_and_converge_after_concurrent_edits() {
        let (pa, pb, pc) = (peer(), peer(), peer());
        let (mut a, mut b, mut c) = (Directory::new(pa), Directory::new(pb), Directory::new(pc));
        a.set_own(&desc("a")).unwrap();
        b.set_own(&desc("b")).unwrap();
        sync_pair(&mut a, &mut b);
        sync_pair(&mut b, &mut c);
        assert_eq!(c.get(&pa), Some(desc("a")));
        // "Partition": a and c edit concurrently, then heal through b.
        a.set_own(&desc("a2")).unwrap();
        let mut d = desc("c2");
        d.labels.insert("gpu".into(), "true".into());
        c.set_own(&d).unwrap();
        sync_pair(&mut a, &mut b);
        sync_pair(&mut b, &mut c);
        sync_pair(&mut a, &mut b);
        assert_eq!(a.heads(), c.heads());
        assert_eq!(a.entries(), c.entries());
        assert_eq!(a.get(&pc), Some(d));
        assert_eq!(c.get(&pa).unwrap().zone.as_deref(), Some("a2"));
    }

    #[test]
    fn forged_changes_are_refused_and_change_nothing() {
        let (pa, pb) = (peer(), peer());
        let mut victim = Directory::new(pb);
        victim.set_own(&desc("b")).unwrap();
        // A node whose actor claims to be pa writes pb's key.
        let mut forger = Directory::new(pa);
        let key = pb.to_base58();
        forger
            .doc
            .transact::<_, _, AutomergeError>(|tx| {
                let e = tx.put_object(ROOT, key.as_str(), ObjType::Map)?;
                tx.put(&e, "zone", "evil")
            })
            .map_err(|f| f.error)
            .unwrap();
        let before = victim.heads();
        let mut err = None;
        for _ in 0..5 {
            let Some(m) = forger.generate(pb) else { break };
            match victim.receive(pa, &m) {
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            if let Some(m) = victim.generate(pa) {
                forger.receive(pb, &m).ok();
            }
        }
        let err = err.expect("the forged change must be refused");
        assert!(err.to_string().contains("writes outside its own entry"), "{err}");
        assert_eq!(victim.heads(), before);
        assert_eq!(victim.get(&pb), Some(desc("b")));
    }

    #[test]
    fn garbage_is_malformed_and_persistence_round_trips() {
        let pa = peer();
        let dir = tempfile::tempdir().unwrap();
        let (mut a, warning) = Directory::open(pa, dir.path()).unwrap();
        assert!(warning.is_none());
        let err = a.receive(peer(), b"\x42garbage").unwrap_err();
        assert!(err.to_string().starts_with("malformed directory sync message"), "{err}");
        a.set_own(&desc("a")).unwrap();
        a.persist(dir.path()).unwrap();
        let (b, _) = Directory::open(pa, dir.path()).unwrap();
        assert_eq!(b.get(&pa), Some(desc("a")));
        fs::write(dir.path().join(FILE), b"corrupt").unwrap();
        let (c, warning) = Directory::open(pa, dir.path()).unwrap();
        assert!(warning.unwrap().contains("is corrupt"));
        assert!(c.entries().is_empty());
    }

    #[test]
    fn a_restarted_node_without_its_copy_wins_its_own_entry_back() {
        let (pa, pb) = (peer(), peer());
        let (mut a, mut b) = (Directory::new(pa), Directory::new(pb));
        a.set_own(&desc("old")).unwrap();
        sync_pair(&mut a, &mut b);
        // a loses its document and comes back with a new actor, writing before syncing.
        let mut a2 = Directory::new(pa);
        a2.set_own(&desc("new")).unwrap();
        sync_pair(&mut a2, &mut b);
        assert_eq!(b.get(&pa).unwrap().zone.as_deref(), Some("new"));
        assert_eq!(a2.get(&pa).unwrap().zone.as_deref(), Some("new"));
    }
}
