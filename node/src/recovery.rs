//! Forced recovery of the raft group after a majority of its voters is lost for good
//! (`cloudless recover`).
//!
//! ```text
//!   data dir ──identity.key──▶ PeerId ──▶ Member
//!            └─raft/raft.redb─▶ Consensus::force_recover(member): a new term in which this
//!                               member is the only voter
//!   next `cloudless run` ──▶ elects itself ──▶ the voter controller regrows the group
//! ```
//!
//! It only works on a stopped node (the raft database is locked while the node runs) and only
//! on a data dir that already holds an identity and a raft store: it never creates either.

use std::path::{Path, PathBuf};

use cloudless_consensus::{Consensus, ConsensusError, Member, store};
use cloudless_mesh::identity::{self, IdentityError, KEY_FILE};

use crate::transport::MeshTransport;

/// The raft store's directory inside a node's data dir.
pub const RAFT_DIR: &str = "raft";

/// Why forced recovery did not happen (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The data dir has no identity key: not a node's data dir, or the wrong one.
    #[error("{0} holds no node identity ({KEY_FILE}); point --data-dir at the node's data dir")]
    NoIdentity(PathBuf),
    /// The identity key could not be read.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The data dir has no raft store: this node never took part in the raft group.
    #[error("{0} holds no raft store; run recover on a node that was a voter")]
    NoRaftStore(PathBuf),
    /// The raft store could not be rewritten.
    #[error(
        "could not rewrite the raft store in {dir} (is the node still running? stop it first): {source}"
    )]
    Store {
        /// The raft store directory.
        dir: PathBuf,
        /// What went wrong.
        source: ConsensusError,
    },
}

/// What a stopped node's raft store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Survivor {
    /// The node, as a raft member.
    pub member: Member,
    /// Its newest log entry as `(index, term)`; the survivor with the highest index (then
    /// term) is the one to recover from.
    pub last_log: Option<(u64, u64)>,
}

/// Reads what the stopped node in `data_dir` holds, changing nothing: run it on every survivor
/// and recover the one with the newest log.
pub fn inspect(data_dir: &Path) -> Result<Survivor, RecoverError> {
    let (member, raft_dir) = locate(data_dir)?;
    let last_log = Consensus::<MeshTransport>::last_log(&raft_dir)
        .map_err(|source| RecoverError::Store { dir: raft_dir, source })?;
    Ok(Survivor { member, last_log })
}

/// Makes the node whose data dir is `data_dir` the only voter of its raft group; returns the
/// member it made voter. Run it on the most up-to-date surviving voter, with the node stopped.
pub fn force_recover(data_dir: &Path) -> Result<Member, RecoverError> {
    let (me, raft_dir) = locate(data_dir)?;
    Consensus::<MeshTransport>::force_recover(&raft_dir, &me)
        .map_err(|source| RecoverError::Store { dir: raft_dir, source })?;
    Ok(me)
}

/// The node's member identity and raft store directory, both required to exist already.
fn locate(data_dir: &Path) -> Result<(Member, PathBuf), RecoverError> {
    if !data_dir.join(KEY_FILE).is_file() {
        return Err(RecoverError::NoIdentity(data_dir.to_path_buf()));
    }
    let raft_dir = data_dir.join(RAFT_DIR);
    if !raft_dir.join(store::FILE).is_file() {
        return Err(RecoverError::NoRaftStore(raft_dir));
    }
    let key = identity::load_or_create(data_dir)?;
    Ok((Member { peer: identity::node_name(&key.public().to_peer_id()) }, raft_dir))
}
