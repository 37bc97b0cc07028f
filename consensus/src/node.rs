//! One member of the raft group: storage, the openraft instance, write forwarding, reads, and
//! the leader's voter controller.
//!
//! ```text
//!   propose(actor, command) ──▶ leader here? ──yes──▶ raft.client_write ──▶ Response
//!                                     └──no──▶ Message::Forward ──▶ leader's handle()
//!   read(Linearizable) ──▶ leader: ensure_linearizable │ follower: ReadIndex from leader,
//!                          then wait until applied ──▶ f(&State)
//!   read(Stale) ──▶ f(&State) at once
//!   handle(Message) ◀── Transport (append, vote, snapshot, forward, read index)
//!   controller (leader only, every second): Candidates ─▶ voters::plan ─▶ add_learner /
//!                                          change_membership
//! ```

use cloudless_types::now_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{ChangeMembers, Raft, SnapshotPolicy};
use tokio::sync::{Mutex, Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::network::{Answer, Message, Network, Transport};
use crate::state::{
    Actor, Batch, Command, CommandError, MAX_ENTRY_BYTES, Request, Response, State,
};
use crate::store::{self, LogStore, StateMachineStore};
use crate::voters::{self, Candidate};
use crate::{Member, NodeId, TypeConfig, node_id};
use cloudless_api::UserRequest;
use cloudless_types::NodeName;

/// Settings of a consensus member.
#[derive(Clone, Debug)]
pub struct Config {
    /// Leader heartbeat: several fit in the shortest election timeout, so a couple of lost or
    /// late ones on a home link do not unseat a healthy leader.
    pub heartbeat: Duration,
    /// Shortest election timeout (three heartbeats).
    pub election_min: Duration,
    /// Longest election timeout (randomized between the two to avoid split votes). openraft
    /// also uses it as the leader lease: a follower that heard from a live leader refuses to
    /// vote for this long, and waits lease + election timeout before standing itself. Failover
    /// therefore takes between `election_max + election_min` and `2 × election_max`: with the
    /// defaults 0.9–1.2 s, under the 1.5 s the design asks for.
    pub election_max: Duration,
    /// A snapshot is built every this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot, for followers slightly behind.
    pub keep_after_snapshot: u64,
    /// Per-RPC deadline for forwarded writes and read indexes.
    pub rpc_timeout: Duration,
    /// How long a write may take, forwarding and leader changes included.
    pub write_timeout: Duration,
    /// How often the leader reviews who votes.
    pub controller_interval: Duration,
    /// A learner within this many entries of the leader counts as caught up.
    pub caught_up_lag: u64,
    /// How long a member that just started waits to hear from a leader before it may stand
    /// for election itself (see [`quiet_start`]). Longer than the mesh takes to reconnect a
    /// restarted node; it is also how long a group that restarted as a whole stays leaderless.
    pub quiet_start: Duration,
    /// How long a follower or learner may go without an append from a leader and still act
    /// on its own state ([`Consensus::hears_leader`]). A member the group removed keeps its
    /// membership and the leader it knew, frozen, and hears nothing again: past this it must
    /// ask the others. Far above `election_max`, so that an election does not count.
    pub leader_silence: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(600),
            snapshot_every: 5000,
            keep_after_snapshot: 1000,
            rpc_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(10),
            controller_interval: Duration::from_secs(1),
            caught_up_lag: 100,
            quiet_start: Duration::from_secs(4),
            leader_silence: Duration::from_secs(3),
        }
    }
}

impl Config {
    fn raft(&self) -> Result<openraft::Config, ConsensusError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let c = openraft::Config {
            cluster_name: "cloudless".into(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_min),
            election_timeout_max: ms(self.election_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            // Snapshots travel in chunks of at most 1 MiB (the mesh's RPC limit is 4 MiB).
            snapshot_max_chunk_size: 1024 * 1024,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            install_snapshot_timeout: ms(self.rpc_timeout),
            ..openraft::Config::default()
        };
        c.validate().map_err(|e| ConsensusError::Config(e.to_string()))
    }
}

/// Why the consensus member could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// A setting is invalid.
    #[error("invalid consensus settings: {0}")]
    Config(String),
    /// The raft database could not be opened or used.
    #[error("raft storage: {0}")]
    Storage(String),
    /// openraft stopped.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// Why a write did not happen (nothing was applied, or it is unknown whether it was: a retry
/// with the same request is safe, it is applied at most once).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader could be reached before the deadline.
    #[error("no raft leader reachable within {0:?}")]
    Timeout(Duration),
    /// openraft stopped.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (asks the leader).
    Linearizable,
    /// Whatever this node has applied (may be behind; never wrong for its log position).
    Stale,
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// No leader could confirm the read index in time.
    #[error("no raft leader confirmed a read within {0:?}")]
    Timeout(Duration),
}

/// Supplies the voter controller with candidates (the node knows liveness and stability from
/// the mesh; the state tells roles and revocations).
pub trait Candidates: Send + Sync + 'static {
    /// The peers that might vote, now.
    fn candidates(&self, state: &State) -> Vec<Candidate>;
}

struct Inner<T: Transport> {
    id: NodeId,
    me: Member,
    raft: Raft<TypeConfig>,
    sm: StateMachineStore,
    transport: T,
    config: Config,
    client: u64,
    serial: AtomicU64,
    /// Proposals in flight on this member's client session, at most the state machine's
    /// session window, so that every retry can still be recognised.
    inflight: tokio::sync::Semaphore,
    /// Writes waiting for the batcher.
    queue: mpsc::Sender<Pending>,
    controller: Mutex<Option<JoinHandle<()>>>,
    /// Signals [`quiet_start`] that a leader has been heard.
    heard: Arc<Notify>,
    /// Elections held off for good (see [`Consensus::hold_elections`]).
    held: Arc<AtomicBool>,
    /// When this member last accepted an append or snapshot from a leader, in milliseconds
    /// after `started` (0: never).
    last_heard: AtomicU64,
    /// What `last_heard` counts from.
    started: Instant,
    /// The snapshot being received, chunk by chunk.
    snapshot_chunks: Chunks,
}

/// Largest snapshot received: far above the state's bounds in practice (100,000 nodes and
/// 10,000 workloads are tens of MiB), a bound on what a member can make another hold.
pub const MAX_SNAPSHOT: u64 = 256 * 1024 * 1024;

/// An append carries at most this many entries: each is at most `MAX_ENTRY_BYTES`, and the
/// mesh carries at most 4 MiB in one message.
pub const MAX_PAYLOAD_ENTRIES: u64 = 3;

/// Why a message from another member was refused before raft saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It names another node as its sender (an append, snapshot or vote in another's name).
    #[error("the message speaks for raft node {claims:#x}, not for its sender")]
    Impostor {
        /// The node it names.
        claims: NodeId,
    },
    /// A snapshot chunk that does not follow the last one, or goes past the bound.
    #[error(
        "snapshot chunk at offset {offset} ({len} bytes) does not follow the {expected} bytes received (at most {MAX_SNAPSHOT})"
    )]
    Chunk {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: usize,
        /// Where the next chunk should start.
        expected: u64,
    },
}

/// The progress of the snapshot being received: its id, where its last chunk started and
/// where the next one starts.
///
/// openraft writes a chunk wherever its offset says (a seek into an in-memory buffer), so a
/// chunk far past the end would make this member allocate that much: only a chunk that
/// starts a snapshot, follows the last one, or resends it (after a lost answer) is let in.
#[derive(Default)]
struct Chunks(std::sync::Mutex<Option<(String, u64, u64)>>);

impl Chunks {
    /// Accepts a chunk that starts a snapshot, follows the last chunk of the same one or
    /// repeats it, within `MAX_SNAPSHOT`.
    fn check(&self, id: &str, offset: u64, len: usize, done: bool) -> Result<(), Refused> {
        let mut progress = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let expected = match &*progress {
            Some((current, last, _)) if current == id && offset == *last && offset != 0 => *last,
            Some((current, _, next)) if current == id && offset != 0 => *next,
            _ => 0,
        };
        let end = offset.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
        if offset != expected || end > MAX_SNAPSHOT {
            return Err(Refused::Chunk { offset, len, expected });
        }
        *progress = if done { None } else { Some((id.to_string(), offset, end)) };
        Ok(())
    }
}

/// Whether member `caller` may forward `req`: for itself, for a user whose signed request
/// travels with it and checks out, or an enrollment (its token is the credential); never as
/// the system (only the leader proposes that) and never another node's own command (a node
/// sends those to the leader, which takes the actor from the connection).
fn forwarded_for(
    caller: &NodeName,
    req: &Request,
    root: Option<&cloudless_api::UserKey>,
    now_ms: u64,
) -> Result<(), String> {
    match &req.actor {
        Actor::System => Err("only the leader proposes as the system".into()),
        Actor::Node(n) if n == caller => Ok(()),
        // An enrollment's credential is its root-signed token (the state machine checks it,
        // and that the actor is the device or an enrolled node relaying for it).
        Actor::Node(_) if matches!(req.command, Command::Enroll { .. }) => Ok(()),
        Actor::Node(n) => Err(format!("it may not speak for node {n}")),
        Actor::User(key) => {
            let Some(p) = &req.proof else {
                return Err("a user's request must carry what the user signed".into());
            };
            let matches = p.key == *key
                && p.client == req.client
                && p.serial == req.serial
                && p.request == UserRequest::Command(req.command.clone());
            if !matches {
                return Err("the signed request does not match the forwarded one".into());
            }
            let root = root.ok_or("the cluster is not bootstrapped")?;
            p.check_cluster(root).map_err(|e| e.to_string())?;
            p.verify(now_ms).map_err(|e| e.to_string())
        }
    }
}

/// A member of the raft group. Cheap to clone.
pub struct Consensus<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Consensus<T> {
    fn clone(&self) -> Self {
        Consensus { inner: self.inner.clone() }
    }
}

/// Keeps a member that just started from standing for election until it has heard from a
/// leader, or for `quiet` if nobody speaks up (the whole group restarted).
///
/// openraft 0.9 has no pre-vote, and a member that restarts has no record of when it last heard
/// a leader, so it would stand at once with a higher term: the healthy leader, seeing that
/// term in a follower's answer, steps down, and every restart of any voter would cost the
/// group an election. A lone voter needs no one's permission and is not held back.
fn quiet_start(
    raft: &Raft<TypeConfig>,
    id: NodeId,
    quiet: Duration,
    heard: Arc<Notify>,
    held: Arc<AtomicBool>,
) {
    let alone = {
        let m = raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        voters == [id]
    };
    if alone {
        return;
    }
    raft.runtime_config().elect(false);
    let raft = raft.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(quiet, heard.notified()).await;
        raft.runtime_config().elect(!held.load(Ordering::SeqCst));
    });
}

impl<T: Transport> Consensus<T> {
    /// Opens the raft database in `data_dir` and starts the member. A fresh member stays
    /// passive until [`bootstrap`](Self::bootstrap) or until a leader adds it.
    pub async fn open(
        data_dir: &Path,
        me: Member,
        transport: T,
        config: Config,
    ) -> Result<Self, ConsensusError> {
        let raft_config = Arc::new(config.raft()?);
        std::fs::create_dir_all(data_dir)
            .map_err(|e| ConsensusError::Storage(format!("{}: {e}", data_dir.display())))?;
        let db = store::open(data_dir).map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let sm = StateMachineStore::open(db.clone())
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let id = node_id(&me.peer);
        let raft = Raft::new(
            id,
            raft_config,
            Network::new(transport.clone()),
            LogStore::new(db),
            sm.clone(),
        )
        .await
        .map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        // Set by the first append a leader sends that this member accepts.
        let heard = Arc::new(Notify::new());
        let held = Arc::new(AtomicBool::new(false));
        quiet_start(&raft, id, config.quiet_start, heard.clone(), held.clone());
        let client = rand_u64(id);
        let (queue, rx) = mpsc::channel(QUEUE);
        let writer =
            Writer { raft: raft.clone(), transport: transport.clone(), config: config.clone() };
        tokio::spawn(batcher(rx, writer));
        Ok(Consensus {
            inner: Arc::new(Inner {
                id,
                me,
                raft,
                sm,
                transport,
                config,
                client,
                serial: AtomicU64::new(0),
                inflight: tokio::sync::Semaphore::new(crate::state::SESSION_WINDOW),
                queue,
                controller: Mutex::new(None),
                heard,
                held,
                last_heard: AtomicU64::new(0),
                started: Instant::now(),
                snapshot_chunks: Chunks::default(),
            }),
        })
    }

    /// This member's raft id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This member.
    pub fn member(&self) -> &Member {
        &self.inner.me
    }

    /// The openraft instance (metrics, membership changes in tests).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Creates a one-voter group with this member, if it has never been part of one, and
    /// records the cluster's settings, first admin and first node.
    pub async fn bootstrap(
        &self,
        settings: crate::state::Settings,
        admin: crate::state::UserKey,
    ) -> Result<Response, WriteError> {
        let raft = &self.inner.raft;
        if !raft.is_initialized().await.map_err(|e| WriteError::Fatal(e.to_string()))? {
            let members: BTreeMap<NodeId, Member> =
                [(self.inner.id, self.inner.me.clone())].into_iter().collect();
            if let Err(e) = raft.initialize(members).await {
                warn!(error = %e, "raft initialization");
            }
        }
        self.propose(
            Actor::System,
            Command::Bootstrap { settings, admin, node: self.inner.me.peer.clone() },
        )
        .await
    }

    /// The current leader, if known.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, node))
    }

    /// Keeps this member from standing for election (`true`), or lets it again. For a voter
    /// that was replaced while it was down: its store still lists it as a voter and nobody
    /// will tell it otherwise, and without pre-vote its campaigns (with an ever higher term)
    /// would unseat the real leader again and again. The caller learns of the replacement
    /// from the current members.
    pub fn hold_elections(&self, hold: bool) {
        if self.inner.held.swap(hold, Ordering::SeqCst) != hold {
            info!(hold, "standing for raft election {}", if hold { "held off" } else { "allowed" });
            self.inner.raft.runtime_config().elect(!hold);
        }
    }

    /// Whether [`hold_elections`](Self::hold_elections) holds elections off.
    pub fn holding_elections(&self) -> bool {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Whether this member leads now.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.inner.id)
    }

    /// Waits until this member has applied past `seen` (an index an earlier call returned), or
    /// `timeout` passes; returns the index applied now. Heartbeats and other metric updates do
    /// not end the wait, so a loop built on it runs when the state changed or on its tick.
    pub async fn applied_after(&self, seen: Option<u64>, timeout: Duration) -> Option<u64> {
        let mut metrics = self.inner.raft.metrics();
        let applied = |m: &openraft::RaftMetrics<NodeId, Member>| m.last_applied.map(|l| l.index);
        let _ = tokio::time::timeout(timeout, metrics.wait_for(|m| applied(m) != seen)).await;
        applied(&metrics.borrow())
    }

    /// Notes that a leader's append or snapshot was just accepted.
    fn heard_leader(&self) {
        let ms = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.last_heard.store(ms.max(1), Ordering::Relaxed);
    }

    /// Whether this member's state is current: it leads, or it accepted an append from a
    /// leader within [`Config::leader_silence`]. A member the group removed still lists
    /// itself and its old leader, but stops hearing from it.
    pub fn hears_leader(&self) -> bool {
        if self.is_leader() {
            return true;
        }
        let last = self.inner.last_heard.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let now = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let silence = u64::try_from(self.inner.config.leader_silence.as_millis()).unwrap_or(0);
        now.saturating_sub(last) <= silence
    }

    /// Whether this member is part of the group (voter or learner).
    pub fn is_member(&self) -> bool {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&self.inner.id).is_some()
    }

    /// The voters, as members (how to reach them).
    pub fn voter_members(&self) -> Vec<Member> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .map(|(_, member)| member.clone())
            .collect()
    }

    /// Every member of the group this member knows of (voters and learners), as peers.
    pub fn members(&self) -> BTreeSet<cloudless_types::NodeName> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().nodes().map(|(_, member)| member.peer.clone()).collect()
    }

    /// Current voters.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.inner.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// Writes: `actor` asks for `command`. Accepted on any member; followers forward to the
    /// leader. Retried across leader changes until the write deadline; applied at most once.
    pub async fn propose(&self, actor: Actor, command: Command) -> Result<Response, WriteError> {
        let _permit =
            self.inner.inflight.acquire().await.map_err(|e| WriteError::Fatal(e.to_string()))?;
        let serial = self.inner.serial.fetch_add(1, Ordering::SeqCst) + 1;
        let req = Request {
            client: self.inner.client,
            serial,
            actor,
            time_ms: now_ms(),
            command,
            proof: None,
        };
        self.submit(req).await
    }

    /// Writes a request prepared elsewhere (a forwarded CLI request keeps its own client and
    /// serial, so a retry through another member is still applied once). Requests submitted
    /// together are committed together (group commit).
    pub async fn submit(&self, req: Request) -> Result<Response, WriteError> {
        // What cannot replicate is refused up front, not after it stalls the log.
        let size = crate::state::encoded_len(&req);
        if size > MAX_ENTRY_BYTES {
            return Ok(Err(crate::state::CommandError::TooLarge { size, max: MAX_ENTRY_BYTES }));
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .queue
            .send(Pending { req, reply })
            .await
            .map_err(|_| WriteError::Fatal("the batcher stopped".into()))?;
        rx.await.map_err(|_| WriteError::Fatal("the batcher stopped".into()))?
    }

    /// Reads the state.
    pub async fn read<R>(
        &self,
        consistency: Consistency,
        f: impl FnOnce(&State) -> R,
    ) -> Result<R, ReadError> {
        if consistency == Consistency::Linearizable {
            let index = self.read_index().await?;
            let timeout = self.inner.config.write_timeout;
            let wait = self
                .inner
                .raft
                .wait(Some(timeout))
                .applied_index_at_least(Some(index), "linearizable read")
                .await;
            if wait.is_err() {
                return Err(ReadError::Timeout(timeout));
            }
        }
        Ok(self.inner.sm.read(f))
    }

    /// The log index a linearizable read must wait for: confirmed by the leader with a quorum.
    async fn read_index(&self) -> Result<u64, ReadError> {
        let timeout = self.inner.config.write_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_leader() {
                if let Ok((read, _)) = self.inner.raft.get_read_log_id().await {
                    return Ok(read.map_or(0, |l| l.index));
                }
            } else if let Some((_, leader)) = self.leader() {
                let t = self.inner.config.rpc_timeout;
                if let Ok(Answer::ReadIndex(Ok(i))) =
                    self.inner.transport.call(&leader, Message::ReadIndex, t).await
                {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                return Err(ReadError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Answers a message from the member `caller` (authenticated by the transport), after
    /// checking that it speaks only for itself: appends, snapshots and votes must name their
    /// sender, snapshot chunks must follow each other within `MAX_SNAPSHOT`, and a forwarded
    /// request is applied only for an actor the sender may speak for (itself, or a user whose
    /// signed request travels with it; never the system).
    pub async fn handle(&self, caller: &NodeName, message: Message) -> Result<Answer, Refused> {
        let from = crate::node_id(caller);
        if let Some(claims) = message.speaks_for()
            && claims != from
        {
            return Err(Refused::Impostor { claims });
        }
        if let Message::Snapshot(r) = &message {
            self.inner.snapshot_chunks.check(
                &r.meta.snapshot_id,
                r.offset,
                r.data.len(),
                r.done,
            )?;
        }
        if let Message::Forward(batch) = message {
            return Ok(self.forwarded(caller, batch).await);
        }
        Ok(self.answer(message).await)
    }

    /// A batch forwarded by member `caller`: the requests it may not make are refused one by
    /// one (and cost no session), the rest applied together.
    async fn forwarded(&self, caller: &NodeName, batch: Batch) -> Answer {
        let now = now_ms();
        let root = self.inner.sm.read(|s| s.settings().map(|s| s.root_key));
        let mut answers: Vec<Option<Response>> = Vec::with_capacity(batch.0.len());
        let mut allowed = Vec::new();
        for r in batch.0 {
            match forwarded_for(caller, &r, root.as_ref(), now) {
                Ok(()) => {
                    answers.push(None);
                    allowed.push(r);
                }
                Err(why) => {
                    debug!(%caller, why, "a forwarded request was refused");
                    answers.push(Some(Err(CommandError::Unauthorized {
                        actor: r.actor.to_string(),
                        command: format!("{} (forwarded by {caller}: {why})", r.command.name()),
                    })));
                }
            }
        }
        let applied = if allowed.is_empty() {
            Vec::new()
        } else {
            match self.answer(Message::Forward(Batch(allowed))).await {
                Answer::Forward(Ok(resps)) => resps,
                other => return other,
            }
        };
        let mut applied = applied.into_iter();
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            match a {
                Some(refused) => out.push(refused),
                None => match applied.next() {
                    Some(r) => out.push(r),
                    None => return Answer::Forward(Err("fewer responses than requests".into())),
                },
            }
        }
        Answer::Forward(Ok(out))
    }

    async fn answer(&self, message: Message) -> Answer {
        let raft = &self.inner.raft;
        match message {
            Message::Append(r) => {
                let answer = raft.append_entries(r).await;
                if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                    self.inner.heard.notify_one();
                    self.heard_leader();
                }
                Answer::Append(answer)
            }
            Message::Vote(r) => Answer::Vote(raft.vote(r).await),
            Message::Snapshot(r) => {
                let answer = raft.install_snapshot(r).await;
                if answer.is_ok() {
                    self.heard_leader();
                }
                Answer::Snapshot(answer)
            }
            Message::Forward(mut batch) => {
                // Only the leader applies forwarded writes; anyone else says so and the sender
                // tries again where the leader is now.
                for r in &mut batch.0 {
                    r.time_ms = now_ms();
                }
                match raft.client_write(batch).await {
                    Ok(r) => Answer::Forward(Ok(r.data)),
                    Err(e) => Answer::Forward(Err(e.to_string())),
                }
            }
            Message::ReadIndex => match raft.get_read_log_id().await {
                Ok((read, _)) => Answer::ReadIndex(Ok(read.map_or(0, |l| l.index))),
                Err(e) => Answer::ReadIndex(Err(e.to_string())),
            },
        }
    }

    /// Starts the leader's voter controller: while this member leads, every
    /// `controller_interval` it adds learners and changes voters as [`voters::plan`] says.
    pub async fn start_controller(&self, candidates: Arc<dyn Candidates>) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.inner.config.controller_interval);
            loop {
                tick.tick().await;
                if me.is_leader() {
                    me.review_voters(candidates.as_ref()).await;
                }
            }
        });
        if let Some(old) = self.inner.controller.lock().await.replace(task) {
            old.abort();
        }
    }

    async fn review_voters(&self, candidates: &dyn Candidates) {
        let raft = &self.inner.raft;
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let lag = self.inner.config.caught_up_lag;
        let caught_up: BTreeSet<NodeId> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(_, m)| m.as_ref().is_some_and(|m| m.index + lag >= last))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let (cands, configured) = self
            .inner
            .sm
            .read(|s| (candidates.candidates(s), s.settings().and_then(|s| s.voter_target)));
        let plan = voters::plan(&voters, &learners, &caught_up, &cands, configured);
        if plan.is_empty() {
            return;
        }
        for (id, member) in plan.add_learners {
            info!(learner = %member, "adding a raft learner");
            if let Err(e) = raft.add_learner(id, member, false).await {
                debug!(error = %e, "add learner");
            }
        }
        if !plan.remove_learners.is_empty()
            && let Err(e) = raft
                .change_membership(ChangeMembers::RemoveNodes(plan.remove_learners), false)
                .await
        {
            debug!(error = %e, "remove learners");
        }
        if let Some(v) = plan.voters {
            info!(voters = ?v, "changing raft voters");
            if let Err(e) = raft.change_membership(v, false).await {
                debug!(error = %e, "change voters");
            }
        }
    }

    /// Forced recovery (see [`store::force_single_voter`]): run on the stopped, most
    /// up-to-date surviving voter after a majority is lost for good; at the next start this
    /// member is the only voter and the controller rebuilds the group around it.
    pub fn force_recover(data_dir: &Path, me: &Member) -> Result<(), ConsensusError> {
        let db = store::open(data_dir).map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let at = store::force_single_voter(&db, me)
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        warn!(member = %me, %at, "forced recovery: this member is now the only voter");
        Ok(())
    }

    /// The newest log id in the (stopped) member's store in `data_dir`, as `(index, term)`;
    /// `None` when it holds no log. Compare survivors with it before [`Self::force_recover`].
    pub fn last_log(data_dir: &Path) -> Result<Option<(u64, u64)>, ConsensusError> {
        let db = store::open(data_dir).map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let last = store::last_log_id(&db).map_err(|e| ConsensusError::Storage(e.to_string()))?;
        Ok(last.map(|l| (l.index, l.leader_id.term)))
    }

    /// Stops the member (its storage stays). The database is closed once the last clone of
    /// this handle and the last request it is serving are dropped.
    pub async fn shutdown(&self) {
        if let Some(t) = self.inner.controller.lock().await.take() {
            t.abort();
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
    }
}

/// Writes queued for the batcher before proposers wait (the session window bounds what one
/// member proposes; forwarded CLI writes add to it).
const QUEUE: usize = 4096;
/// Most requests in one raft entry.
const MAX_BATCH: usize = 512;
/// Batches in flight at once: while they commit, new requests gather into the next one.
const BATCHES_IN_FLIGHT: usize = 4;

struct Pending {
    req: Request,
    reply: oneshot::Sender<Result<Response, WriteError>>,
}

/// Gathers queued writes into batches and commits them, a few batches at a time.
async fn batcher<T: Transport>(mut rx: mpsc::Receiver<Pending>, writer: Writer<T>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // A request that did not fit the last batch starts the next one.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        // One entry stays within MAX_ENTRY_BYTES (each request is checked against it when
        // submitted), so that an append of MAX_PAYLOAD_ENTRIES fits the mesh.
        let mut bytes = crate::state::encoded_len(&first.req);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    let size = crate::state::encoded_len(&p.req);
                    if bytes.saturating_add(size) > MAX_ENTRY_BYTES {
                        carried = Some(p);
                        break;
                    }
                    bytes = bytes.saturating_add(size);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let writer = writer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (reqs, replies): (Vec<Request>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let n = reqs.len();
            match writer.write(Batch(reqs)).await {
                Ok(resps) if resps.len() == n => {
                    for (reply, resp) in replies.into_iter().zip(resps) {
                        let _ = reply.send(Ok(resp));
                    }
                }
                Ok(resps) => {
                    let e =
                        WriteError::Fatal(format!("{} responses for {n} requests", resps.len()));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Commits batches: locally when leading, else forwarded to the leader, retried across leader
/// changes until the write deadline.
struct Writer<T: Transport> {
    raft: Raft<TypeConfig>,
    transport: T,
    config: Config,
}

impl<T: Transport> Clone for Writer<T> {
    fn clone(&self) -> Self {
        Writer {
            raft: self.raft.clone(),
            transport: self.transport.clone(),
            config: self.config.clone(),
        }
    }
}

impl<T: Transport> Writer<T> {
    async fn write(&self, mut batch: Batch) -> Result<Vec<Response>, WriteError> {
        let deadline = Instant::now() + self.config.write_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            for r in &mut batch.0 {
                r.time_ms = now_ms();
            }
            match self.raft.client_write(batch.clone()).await {
                Ok(r) => return Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let (Some(leader_id), Some(leader)) = (f.leader_id, f.leader_node) {
                        if let Some(resps) = self.forward(leader_id, &leader, &batch).await {
                            return Ok(resps);
                        }
                    } else {
                        // No leader known: wait for one rather than spin.
                        let mut m = self.raft.metrics();
                        let _ = tokio::time::timeout(
                            self.config.election_max,
                            m.wait_for(|m| m.current_leader.is_some()),
                        )
                        .await;
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    return Err(WriteError::Fatal(e.to_string()));
                }
                Err(RaftError::Fatal(e)) => return Err(WriteError::Fatal(e.to_string())),
            }
            if Instant::now() + backoff > deadline {
                return Err(WriteError::Timeout(self.config.write_timeout));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Forwards to `leader`; gives up as soon as raft learns of another leader (the old one
    /// may be dead and its connection silent). Safe to repeat: requests are de-duplicated.
    async fn forward(
        &self,
        leader_id: NodeId,
        leader: &Member,
        batch: &Batch,
    ) -> Option<Vec<Response>> {
        let mut metrics = self.raft.metrics();
        let changed = metrics.wait_for(|m| m.current_leader != Some(leader_id));
        let call =
            self.transport.call(leader, Message::Forward(batch.clone()), self.config.rpc_timeout);
        tokio::select! {
            answer = call => match answer {
                Ok(Answer::Forward(Ok(resps))) => Some(resps),
                Ok(Answer::Forward(Err(why))) => {
                    debug!(%why, "forwarded write refused; retrying");
                    None
                }
                Ok(_) => None,
                Err(e) => {
                    debug!(error = %e, "forwarding failed; retrying");
                    None
                }
            },
            _ = changed => None,
        }
    }
}

/// A client session id: random enough that two members never share one.
fn rand_u64(seed: NodeId) -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut z = seed
        ^ (t as u64)
        ^ ((t >> 64) as u64).rotate_left(17)
        ^ (std::process::id() as u64).rotate_left(41);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
