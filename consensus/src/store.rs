//! Durable storage for the raft group: the log and the state machine, both in one redb
//! database in the node's data dir.
//!
//! ```text
//!   raft.redb
//!   ├── log:  index → entry (postcard)            append fsyncs before raft is told it is flushed
//!   └── meta: "format" | "vote" | "committed" | "purged" | "snapshot" → postcard
//!
//!   LogStore (RaftLogStorage)        StateMachineStore (RaftStateMachine)
//!                                     State in memory, rebuilt at start from the last snapshot
//!                                     plus the log after it; snapshots are built in the
//!                                     background from a copy and persisted before they count.
//! ```
//!
//! redb commits with `Durability::Immediate` (fsync) by default; every write below is one
//! transaction. The blocking redb calls run on tokio's blocking pool so that an fsync never
//! stalls the raft core.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::State;
use crate::{Member, NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Name of the database file in the data dir.
pub const FILE: &str = "raft.redb";

type SError = StorageError<NodeId>;

fn read_logs(e: AnyError) -> SError {
    StorageIOError::read_logs(e).into()
}
fn write_logs(e: AnyError) -> SError {
    StorageIOError::write_logs(e).into()
}
fn read_vote(e: AnyError) -> SError {
    StorageIOError::read_vote(e).into()
}
fn write_vote(e: AnyError) -> SError {
    StorageIOError::write_vote(e).into()
}
fn read_snapshot(sig: Option<openraft::storage::SnapshotSignature<NodeId>>, e: AnyError) -> SError {
    StorageIOError::read_snapshot(sig, e).into()
}
fn write_snapshot(
    sig: Option<openraft::storage::SnapshotSignature<NodeId>>,
    e: AnyError,
) -> SError {
    StorageIOError::write_snapshot(sig, e).into()
}
fn read_snapshot_none(e: AnyError) -> SError {
    read_snapshot(None, e)
}

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    postcard::to_allocvec(v).map_err(any)
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, AnyError> {
    postcard::from_bytes(b).map_err(any)
}

/// The encoding of what the store holds (log entries, snapshots, the vote). postcard is not
/// self-describing, so a store written with another encoding would be misread: it is refused
/// instead. 2: the api crate's commands, vocabulary newtypes, placement changes with handoffs.
/// 3: requests carry the user's signed request (the proof a forwarding member must show).
/// 4: sessions are keyed by signer and client id.
/// 5: enrollments carry the invite's claim (tokens name a claim key).
pub const FORMAT: u32 = 5;

/// Why the raft database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// redb could not open or create it.
    #[error(transparent)]
    Database(#[from] redb::DatabaseError),
    /// It was written with another encoding.
    #[error(
        "the raft store holds format {found}, this version of cloudless reads format {FORMAT}; \
         it was written by another version: move the node's data dir away and join again \
         with an invite (or run the version that wrote it)"
    )]
    Format {
        /// The format found.
        found: u32,
    },
    /// Reading or writing the format marker failed.
    #[error("the raft store's format marker: {0}")]
    Marker(String),
}

/// Opens (or creates) the raft database in `data_dir`, refusing one of another format.
pub fn open(data_dir: &Path) -> Result<Arc<Database>, OpenError> {
    let db = Database::create(data_dir.join(FILE))?;
    let marker = |e: AnyError| OpenError::Marker(e.to_string());
    match meta_get::<u32>(&db, "format").map_err(marker)? {
        Some(FORMAT) => {}
        Some(found) => return Err(OpenError::Format { found }),
        // A store from before the marker existed holds the first format; a new one is marked.
        None => {
            let used = meta_get::<Vote<NodeId>>(&db, "vote").map_err(marker)?.is_some()
                || LogStore::last_entry_id(&db).map_err(marker)?.is_some();
            if used {
                return Err(OpenError::Format { found: 1 });
            }
            meta_put(&db, "format", &FORMAT).map_err(marker)?;
        }
    }
    Ok(Arc::new(db))
}

/// Runs a blocking redb operation off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, AnyError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AnyError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(any)?
}

fn meta_get<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
    let r = db.begin_read().map_err(any)?;
    let t = match r.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(any(e)),
    };
    match t.get(key).map_err(any)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

fn meta_put<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), AnyError> {
    let bytes = encode(value)?;
    let w = db.begin_write().map_err(any)?;
    {
        let mut t = w.open_table(META).map_err(any)?;
        t.insert(key, bytes.as_slice()).map_err(any)?;
    }
    w.commit().map_err(any)
}

/// The raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// The log in `db`.
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    fn last_entry_id(db: &Database) -> Result<Option<LogId<NodeId>>, AnyError> {
        let r = db.begin_read().map_err(any)?;
        let t = match r.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(any(e)),
        };
        match t.last().map_err(any)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(v.value())?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        let db = self.db.clone();
        blocking(move || {
            let r = db.begin_read().map_err(any)?;
            let t = match r.open_table(LOG) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(any(e)),
            };
            let iter = match end {
                Some(end) if end <= start => return Ok(Vec::new()),
                Some(end) => t.range(start..end).map_err(any)?,
                None => t.range(start..).map_err(any)?,
            };
            let mut out = Vec::new();
            for item in iter {
                let (_, v) = item.map_err(any)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let db = self.db.clone();
        blocking(move || {
            let purged: Option<LogId<NodeId>> = meta_get(&db, "purged")?;
            // The last log id is never behind what was purged (entries below a purge point
            // may still be appended by a stale leader and must not hide it).
            let last = LogStore::last_entry_id(&db)?.max(purged);
            Ok(LogState { last_purged_log_id: purged, last_log_id: last })
        })
        .await
        .map_err(read_logs)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        let (db, vote) = (self.db.clone(), *vote);
        blocking(move || meta_put(&db, "vote", &vote)).await.map_err(write_vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        let db = self.db.clone();
        blocking(move || meta_get(&db, "vote")).await.map_err(read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        // Only shortens the replay after a restart: written without its own fsync, it becomes
        // durable with the next log append (raft is correct with a stale value).
        let db = self.db.clone();
        blocking(move || {
            let bytes = encode(&committed)?;
            let mut w = db.begin_write().map_err(any)?;
            w.set_durability(redb::Durability::None).map_err(any)?;
            {
                let mut t = w.open_table(META).map_err(any)?;
                t.insert("committed", bytes.as_slice()).map_err(any)?;
            }
            w.commit().map_err(any)
        })
        .await
        .map_err(write_logs)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        let db = self.db.clone();
        blocking(move || Ok(meta_get::<Option<LogId<NodeId>>>(&db, "committed")?.flatten()))
            .await
            .map_err(read_logs)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e).map_err(write_logs)?));
        }
        let db = self.db.clone();
        let res = blocking(move || {
            let w = db.begin_write().map_err(any)?;
            {
                let mut t = w.open_table(LOG).map_err(any)?;
                for (i, bytes) in &rows {
                    t.insert(*i, bytes.as_slice()).map_err(any)?;
                }
            }
            // Durable (fsync) before raft hears that the entries are flushed.
            w.commit().map_err(any)
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let db = self.db.clone();
        blocking(move || {
            let w = db.begin_write().map_err(any)?;
            {
                let mut t = w.open_table(LOG).map_err(any)?;
                t.retain_in(log_id.index.., |_, _| false).map_err(any)?;
            }
            w.commit().map_err(any)
        })
        .await
        .map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let db = self.db.clone();
        blocking(move || {
            let bytes = encode(&log_id)?;
            let w = db.begin_write().map_err(any)?;
            {
                let mut meta = w.open_table(META).map_err(any)?;
                meta.insert("purged", bytes.as_slice()).map_err(any)?;
                let mut t = w.open_table(LOG).map_err(any)?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(any)?;
            }
            w.commit().map_err(any)
        })
        .await
        .map_err(write_logs)
    }
}

/// The newest log id this member holds (in its log, or covered by its snapshot or purge), for
/// choosing the most up-to-date survivor before forced recovery; `None` for an empty store.
pub fn last_log_id(db: &Database) -> Result<Option<LogId<NodeId>>, AnyError> {
    let purged: Option<LogId<NodeId>> = meta_get(db, "purged")?;
    let snap: Option<StoredSnapshot> = meta_get(db, "snapshot")?;
    Ok(LogStore::last_entry_id(db)?.max(purged).max(snap.and_then(|s| s.meta.last_log_id)))
}

/// Forced recovery after the permanent loss of a majority: rewrites the stopped member's
/// log so that it alone is the voter. Run it on the most up-to-date surviving voter (the
/// highest last log index), with the member stopped; on restart it elects itself, commits
/// what it has, and the voter controller adds others back. Anything committed only on the
/// lost members is lost: that is the price of a lost majority.
///
/// It appends a membership entry `{me}` after the last entry, under a new term, and records a
/// vote for that term, so no old leader's entries can overwrite it.
pub fn force_single_voter(db: &Database, me: &Member) -> Result<LogId<NodeId>, AnyError> {
    let id = crate::node_id(&me.peer);
    let vote: Option<Vote<NodeId>> = meta_get(db, "vote")?;
    let last = last_log_id(db)?;
    let term = vote.map_or(0, |v| v.leader_id().term).max(last.map_or(0, |l| l.leader_id.term)) + 1;
    let index = last.map_or(0, |l| l.index + 1);
    let log_id = LogId::new(openraft::CommittedLeaderId::new(term, id), index);
    let nodes: std::collections::BTreeMap<NodeId, Member> =
        [(id, me.clone())].into_iter().collect();
    let membership = openraft::Membership::new(vec![[id].into_iter().collect()], nodes);
    let entry: Entry<TypeConfig> = Entry { log_id, payload: EntryPayload::Membership(membership) };
    let bytes = encode(&entry)?;
    let vote_bytes = encode(&Vote::new(term, id))?;
    let w = db.begin_write().map_err(any)?;
    {
        let mut t = w.open_table(LOG).map_err(any)?;
        t.insert(index, bytes.as_slice()).map_err(any)?;
        let mut m = w.open_table(META).map_err(any)?;
        m.insert("vote", vote_bytes.as_slice()).map_err(any)?;
    }
    w.commit().map_err(any)?;
    Ok(log_id)
}

/// A snapshot as stored: its meta and the serialized state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Machine {
    state: State,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    snapshots_built: u64,
}

/// The state machine: [`State`] in memory, snapshots in redb.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    machine: Arc<Mutex<Machine>>,
}

impl StateMachineStore {
    /// The state machine in `db`, restored from its last snapshot.
    pub fn open(db: Arc<Database>) -> Result<Self, Box<SError>> {
        let mut machine = Machine::default();
        if let Some(s) = meta_get::<StoredSnapshot>(&db, "snapshot")
            .map_err(|e| Box::new(read_snapshot_none(e)))?
        {
            machine.state = decode(&s.data).map_err(|e| Box::new(read_snapshot_none(e)))?;
            machine.last_applied = s.meta.last_log_id;
            machine.membership = s.meta.last_membership.clone();
        }
        Ok(StateMachineStore { db, machine: Arc::new(Mutex::new(machine)) })
    }

    /// Reads the current state (committed and applied on this node).
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        f(&m.state)
    }

    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner()).last_applied
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds snapshots from a copy of the state taken when building starts.
pub struct Builder {
    db: Arc<Database>,
    state: State,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        let data = encode(&self.state).map_err(read_snapshot_none)?;
        let id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: id,
        };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        let db = self.db.clone();
        blocking(move || meta_put(&db, "snapshot", &stored))
            .await
            .map_err(|e| write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), SError> {
        let m = self.lock();
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<crate::state::Response>>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut m = self.lock();
        let mut out = Vec::new();
        for e in entries {
            m.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(batch) => {
                    out.push(batch.0.iter().map(|r| m.state.apply(r)).collect())
                }
                EntryPayload::Membership(mem) => {
                    m.membership = StoredMembership::new(Some(e.log_id), mem);
                    out.push(Vec::new());
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let mut m = self.lock();
        m.snapshots_built += 1;
        Builder {
            db: self.db.clone(),
            state: m.state.clone(),
            last_applied: m.last_applied,
            membership: m.membership.clone(),
            seq: m.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let state: State = decode(&data).map_err(|e| read_snapshot(Some(meta.signature()), e))?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let db = self.db.clone();
        let sig = meta.signature();
        blocking(move || meta_put(&db, "snapshot", &stored))
            .await
            .map_err(|e| write_snapshot(Some(sig), e))?;
        let mut m = self.lock();
        m.state = state;
        m.last_applied = meta.last_log_id;
        m.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        let db = self.db.clone();
        let stored: Option<StoredSnapshot> =
            blocking(move || meta_get(&db, "snapshot")).await.map_err(read_snapshot_none)?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct Redb;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Redb {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), SError> {
            let dir = tempfile::tempdir().map_err(|e| write_logs(any(e)))?;
            let db = open(dir.path()).map_err(|e| write_logs(any(e)))?;
            let sm = StateMachineStore::open(db.clone()).map_err(|e| *e)?;
            Ok((dir, LogStore::new(db), sm))
        }
    }

    /// openraft's own storage test suite, against the redb stores.
    #[test]
    fn redb_stores_pass_the_openraft_suite() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Suite::test_all(Redb).unwrap();
    }

    #[test]
    fn a_store_of_another_format_is_refused_and_a_new_one_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        assert_eq!(meta_get::<u32>(&db, "format").unwrap(), Some(FORMAT));
        meta_put(&db, "format", &(FORMAT + 1)).unwrap();
        drop(db);
        let e = open(dir.path()).unwrap_err();
        assert!(matches!(e, OpenError::Format { found } if found == FORMAT + 1), "{e}");
        assert!(e.to_string().contains("another version"), "{e}");
        // A store written before the marker existed (a vote, no marker) is the first format.
        let old = tempfile::tempdir().unwrap();
        let db = Database::create(old.path().join(FILE)).unwrap();
        meta_put(&db, "vote", &Vote::<NodeId>::new(1, 1)).unwrap();
        drop(db);
        assert!(matches!(open(old.path()), Err(OpenError::Format { found: 1 })));
    }
}
