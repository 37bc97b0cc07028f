//! The replicated state machine: a plain struct of ordered maps and a deterministic
//! [`State::apply`]. No I/O, no clocks (time comes inside each request, chosen by the leader
//! that proposed it), no randomness: every voter applying the same log reaches the same state.
//!
//! ```text
//!   Request { client, serial, actor, time_ms, command }
//!      │ retried? (client, serial) seen ──▶ the stored response, nothing applied
//!      │ authorized? (actor's role) ──────▶ Unauthorized, nothing applied
//!      │ valid? (spec, token, epoch…) ────▶ typed error, nothing applied
//!      ▼
//!   mutate ──▶ Reply
//! ```
//!
//! A command either applies completely or not at all: every check happens before the first
//! change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cloudless_api::SignedRequest;
pub use cloudless_api::command::{
    Change, Command, CommandError, NodeRole, ReplicaStatus, Reply, Role, Schedulable, Settings,
    Token, UserKey,
};
use cloudless_types::{InvalidInput, NodeName, ReplicaId, WorkloadName, WorkloadSpec};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Who makes a request. The node that accepts it establishes this (by checking the request's
/// signature); the state machine checks what the actor may do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Actor {
    /// A CLI user, by public key.
    User(UserKey),
    /// An enrolled node, by the PeerId its connection authenticated.
    Node(NodeName),
    /// The raft leader itself (placements, housekeeping).
    System,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(k) => write!(f, "user {}", hex(&k[..8])),
            Actor::Node(p) => write!(f, "node {p}"),
            Actor::System => f.write_str("the leader"),
        }
    }
}

/// An enrolled node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What it may be used for.
    pub roles: BTreeSet<NodeRole>,
    /// Labels granted by its invite (and changed by admins).
    pub labels: BTreeMap<String, String>,
    /// Cut off everywhere.
    pub revoked: bool,
    /// When it enrolled (leader's clock).
    pub enrolled_ms: u64,
    /// Whether new replicas may go there, and whether its replicas must move.
    pub schedulable: Schedulable,
}

/// A CLI user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// A name for people.
    pub name: String,
    /// What the user may do.
    pub role: Role,
}

/// A stored workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// The validated spec (its `replicas` is the desired count).
    pub spec: WorkloadSpec,
    /// Increases with every change of the spec.
    pub version: u64,
}

/// Where a replica is assigned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The node that runs it (and reports its status).
    pub node: NodeName,
    /// The placement epoch of the decision.
    pub epoch: u64,
    /// While the replica moves: the node that keeps running it until its replacement on
    /// `node` runs and the leader releases it.
    pub from: Option<NodeName>,
}

/// One write, as proposed to raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The client's session id (random per client process).
    pub client: u64,
    /// Increases with each request of that client; a retry reuses it.
    pub serial: u64,
    /// Who asks.
    pub actor: Actor,
    /// The proposing leader's clock, milliseconds since the epoch (for token expiry).
    pub time_ms: u64,
    /// What to do.
    pub command: Command,
    /// For a user's command: the request the user signed. A leader that receives the request
    /// from another member believes the actor only with it (an actor is never taken from
    /// the wire); the state machine ignores it.
    pub proof: Option<Box<SignedRequest>>,
}

impl Request {
    /// A user's `command`, in the session and as the actor of the request `signed`, which
    /// travels along as the proof; `time_ms` is the proposer's clock.
    pub fn from_signed(signed: SignedRequest, command: Command, time_ms: u64) -> Request {
        Request {
            client: signed.client,
            serial: signed.serial,
            actor: Actor::User(signed.key),
            time_ms,
            command,
            proof: Some(Box::new(signed)),
        }
    }
}

/// Largest encoded request: a raft entry holds its requests, and an append carries at most
/// `MAX_PAYLOAD_ENTRIES` entries inside the mesh's 4 MiB message limit.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// The encoded size of a request (a huge figure when it cannot be encoded, so it is refused).
pub fn encoded_len(req: &Request) -> usize {
    postcard::experimental::serialized_size(req).unwrap_or(usize::MAX)
}

/// Requests proposed together as one raft entry (group commit): one log append and one
/// fsync for all of them. Each is still applied, refused and de-duplicated on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Request>);

/// What applying a request yields.
pub type Response = Result<Reply, CommandError>;

fn invalid(e: InvalidInput) -> CommandError {
    match e {
        InvalidInput::Field { field, reason } => CommandError::Invalid { field, reason },
    }
}

/// Longest reason in a refusal: reasons quote what they refuse, and a refusal goes back over
/// the wire (refusals are not stored: sessions keep only what was applied).
const MAX_REASON: usize = 512;

fn bad(field: &str, reason: impl Into<String>) -> CommandError {
    let mut reason = reason.into();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    CommandError::Invalid { field: field.chars().take(64).collect(), reason }
}

/// Client sessions remembered for de-duplication; the least recently used is forgotten.
/// Forgetting a session is safe for the commands that are idempotent or guarded (reports,
/// epoch-checked assignments, nonce-checked enrollments); for the others the window below
/// covers any retry a client makes within its write deadline.
pub const MAX_SESSIONS: usize = 4096;
/// Sessions one actor keeps: a session is one CLI process (or one node process), and a person
/// runs a handful at once. An actor's further sessions push out its own oldest, never
/// another's, so nobody can flood the table to make someone else's retry apply twice.
pub const MAX_SESSIONS_PER_ACTOR: usize = 16;
/// Responses remembered per client, so the requests a client may have in flight at once: a
/// client must keep fewer than this outstanding (the consensus member does).
pub const SESSION_WINDOW: usize = 256;
/// Most enrolled nodes.
pub const MAX_NODES: usize = 100_000;
/// Most users.
pub const MAX_USERS: usize = 10_000;
/// Most workloads.
pub const MAX_WORKLOADS: usize = 10_000;
/// Most entries in one assign or report command.
pub const MAX_BATCH: usize = 100_000;
/// Longest user name or cluster name, in bytes.
pub const MAX_NAME: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Responses to the most recent serials (at most [`SESSION_WINDOW`]): a client may have
    /// several requests in flight, and raft may apply them in any order.
    recent: BTreeMap<u64, Response>,
    /// Serials at or below this are forgotten: a retry that old cannot be answered.
    forgotten: u64,
    /// Sequence number of the last use, for least-recently-used eviction.
    used: u64,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    settings: Option<Settings>,
    nodes: BTreeMap<NodeName, NodeRecord>,
    users: BTreeMap<UserKey, UserRecord>,
    workloads: BTreeMap<WorkloadName, WorkloadRecord>,
    assignments: BTreeMap<ReplicaId, Assignment>,
    statuses: BTreeMap<ReplicaId, ReplicaStatus>,
    /// Token nonces: uses so far and expiry (expired ones are dropped).
    nonces: BTreeMap<[u8; 16], (u32, u64)>,
    epoch: u64,
    /// Sessions by signer and client id: a client id is the signer's own, so another actor
    /// choosing the same id reaches a different session.
    sessions: BTreeMap<(Actor, u64), Session>,
    session_lru: BTreeMap<u64, (Actor, u64)>,
    applied: u64,
    /// The applied count at which each node's assignments (or the spec of something it runs)
    /// last changed: a worker is sent its list only when this moved past what it holds. One
    /// entry per node that ever had an assignment (at most the enrolled nodes).
    #[serde(default)]
    assign_changes: BTreeMap<NodeName, u64>,
    /// The applied count at which each node was last enrolled or revoked: the gate lists go to
    /// other nodes as the changes since what they hold.
    #[serde(default)]
    gate_changes: BTreeMap<NodeName, u64>,
    /// The latest of `gate_changes`.
    #[serde(default)]
    gate_generation: u64,
}

impl State {
    /// An empty, not yet bootstrapped state.
    pub fn new() -> Self {
        State::default()
    }

    /// Applies one request. Never panics and never half-applies.
    pub fn apply(&mut self, req: &Request) -> Response {
        self.applied += 1;
        let key = (req.actor.clone(), req.client);
        if let Some(s) = self.sessions.get(&key) {
            // A retry of something already applied: the same answer, nothing done again.
            if let Some(r) = s.recent.get(&req.serial) {
                return r.clone();
            }
            if req.serial <= s.forgotten {
                return Err(bad(
                    "serial",
                    format!(
                        "{} is too old for this client (the last {SESSION_WINDOW} are remembered)",
                        req.serial
                    ),
                ));
            }
        }
        let response = self.check(req).map(|()| self.mutate(req));
        // A refusal changed nothing, so a retry may be checked afresh: only what was applied
        // is remembered (refused requests cost no session).
        if response.is_ok() {
            self.remember(key, req.serial, response.clone());
        }
        response
    }

    fn remember(&mut self, key: (Actor, u64), serial: u64, response: Response) {
        let used = self.applied;
        if !self.sessions.contains_key(&key) {
            self.forget_oldest_of(&key.0);
        }
        let session = self.sessions.entry(key.clone()).or_insert_with(|| Session {
            recent: BTreeMap::new(),
            forgotten: 0,
            used,
        });
        self.session_lru.remove(&session.used);
        session.used = used;
        session.recent.insert(serial, response);
        while session.recent.len() > SESSION_WINDOW {
            if let Some((&oldest, _)) = session.recent.iter().next() {
                session.recent.remove(&oldest);
                session.forgotten = session.forgotten.max(oldest);
            }
        }
        self.session_lru.insert(used, key);
        while self.sessions.len() > MAX_SESSIONS {
            let Some((&oldest, _)) = self.session_lru.iter().next() else { break };
            if let Some(k) = self.session_lru.remove(&oldest) {
                self.sessions.remove(&k);
            }
        }
    }

    /// Makes room for one more session of `actor`: forgets its least recently used one when
    /// it has [`MAX_SESSIONS_PER_ACTOR`].
    fn forget_oldest_of(&mut self, actor: &Actor) {
        let mine = self.sessions.range((actor.clone(), 0)..=(actor.clone(), u64::MAX));
        let (count, oldest) = mine.fold((0usize, None::<(u64, u64)>), |(n, o), ((_, c), s)| {
            let o = match o {
                Some((used, _)) if used <= s.used => o,
                _ => Some((s.used, *c)),
            };
            (n + 1, o)
        });
        if count >= MAX_SESSIONS_PER_ACTOR
            && let Some((used, client)) = oldest
        {
            self.session_lru.remove(&used);
            self.sessions.remove(&(actor.clone(), client));
        }
    }

    fn role_of(&self, actor: &Actor) -> Option<Role> {
        match actor {
            Actor::User(k) => self.users.get(k).map(|u| u.role),
            Actor::System => Some(Role::Admin),
            Actor::Node(_) => None,
        }
    }

    fn is_live_node<'a>(&self, actor: &'a Actor) -> Option<&'a NodeName> {
        match actor {
            Actor::Node(p) => self.nodes.get(p).filter(|n| !n.revoked).map(|_| p),
            _ => None,
        }
    }

    /// Whether `req` would be accepted now, without applying it: lets a node refuse a hopeless
    /// request (a forged enrollment, say) before it costs a raft entry. The state may be a
    /// little stale; the apply itself checks again.
    pub fn precheck(&self, req: &Request) -> Result<(), CommandError> {
        self.check(req)
    }

    /// Every check, before anything changes.
    fn check(&self, req: &Request) -> Result<(), CommandError> {
        let unauthorized = || CommandError::Unauthorized {
            actor: req.actor.to_string(),
            command: req.command.name().into(),
        };
        let settings = match (&req.command, &self.settings) {
            (Command::Bootstrap { .. }, Some(_)) => return Err(CommandError::AlreadyBootstrapped),
            (Command::Bootstrap { settings, .. }, None) => {
                if req.actor != Actor::System {
                    return Err(unauthorized());
                }
                check_name("settings.name", &settings.name)?;
                return Ok(());
            }
            (_, None) => return Err(CommandError::NotBootstrapped),
            (_, Some(s)) => s,
        };
        let role = self.role_of(&req.actor);
        let at_least = |r: Role| role.is_some_and(|have| have >= r);
        match &req.command {
            Command::Bootstrap { .. } => Err(CommandError::AlreadyBootstrapped),
            Command::SetSettings(new) => {
                if !at_least(Role::Admin) {
                    return Err(unauthorized());
                }
                check_name("settings.name", &new.name)?;
                if new.root_key != settings.root_key {
                    return Err(bad("settings.root_key", "the cluster root key cannot change"));
                }
                if let Some(t) = new.voter_target
                    && !matches!(t, 1 | 3 | 5 | 7)
                {
                    return Err(bad("settings.voter_target", format!("{t} is not 1, 3, 5 or 7")));
                }
                Ok(())
            }
            Command::Enroll { token, signature, proof, peer } => {
                // The device itself, or an enrolled node relaying for a device that cannot
                // reach a raft member yet (the token's signature is what admits it).
                let relayed = self.is_live_node(&req.actor).is_some();
                if req.actor != Actor::Node(peer.clone()) && req.actor != Actor::System && !relayed
                {
                    return Err(unauthorized());
                }
                if token.cluster != settings.name {
                    return Err(bad(
                        "token.cluster",
                        format!(
                            "the token is for cluster {:?}, this is {:?}",
                            token.cluster, settings.name
                        ),
                    ));
                }
                let key = VerifyingKey::from_bytes(&settings.root_key)
                    .map_err(|_| CommandError::BadSignature)?;
                let sig =
                    Signature::from_slice(signature).map_err(|_| CommandError::BadSignature)?;
                key.verify(&token.to_bytes(), &sig).map_err(|_| CommandError::BadSignature)?;
                if !token.verify_claim(peer, proof) {
                    return Err(bad(
                        "proof",
                        format!("not the invite's claim for {peer}: the token alone admits no one"),
                    ));
                }
                if req.time_ms > token.expires_ms {
                    return Err(CommandError::TokenExpired { expired_ms: token.expires_ms });
                }
                let uses = self.nonces.get(&token.nonce).map_or(0, |(u, _)| *u);
                if uses >= token.max_uses.max(1) {
                    return Err(CommandError::TokenUsed { uses });
                }
                if let Some(n) = self.nodes.get(peer) {
                    if n.revoked {
                        return Err(unauthorized());
                    }
                    // Its roles, labels and cordon stay what the admins made them.
                    return Err(CommandError::AlreadyEnrolled { peer: peer.to_string() });
                } else if self.nodes.len() >= MAX_NODES {
                    return Err(CommandError::TooMany { what: "nodes".into(), max: MAX_NODES });
                }
                check_labels(&token.labels)
            }
            Command::Revoke { peer }
            | Command::SetNodeLabels { peer, .. }
            | Command::SetSchedulable { peer, .. } => {
                if !at_least(Role::Admin) {
                    return Err(unauthorized());
                }
                if !self.nodes.contains_key(peer) {
                    return Err(CommandError::NotFound {
                        what: "node".into(),
                        name: peer.to_string(),
                    });
                }
                if let Command::SetNodeLabels { labels, .. } = &req.command {
                    check_labels(labels)?;
                }
                Ok(())
            }
            Command::PutUser { key, name, role } => {
                if !at_least(Role::Admin) {
                    return Err(unauthorized());
                }
                check_name("name", name)?;
                let admins = self.users.values().filter(|u| u.role == Role::Admin).count();
                if *role != Role::Admin && self.user_role(key) == Some(Role::Admin) && admins == 1 {
                    return Err(bad("role", "the last admin cannot be demoted"));
                }
                if !self.users.contains_key(key) && self.users.len() >= MAX_USERS {
                    return Err(CommandError::TooMany { what: "users".into(), max: MAX_USERS });
                }
                Ok(())
            }
            Command::RemoveUser { key } => {
                if !at_least(Role::Admin) {
                    return Err(unauthorized());
                }
                let Some(u) = self.users.get(key) else {
                    return Err(CommandError::NotFound {
                        what: "user".into(),
                        name: hex(&key[..8]),
                    });
                };
                let admins = self.users.values().filter(|u| u.role == Role::Admin).count();
                if u.role == Role::Admin && admins == 1 {
                    return Err(bad("key", "the last admin cannot be removed"));
                }
                Ok(())
            }
            Command::PutWorkload(spec) => {
                if !at_least(Role::Deployer) {
                    return Err(unauthorized());
                }
                spec.validate().map_err(invalid)?;
                if !self.workloads.contains_key(&spec.name) && self.workloads.len() >= MAX_WORKLOADS
                {
                    return Err(CommandError::TooMany {
                        what: "workloads".into(),
                        max: MAX_WORKLOADS,
                    });
                }
                Ok(())
            }
            Command::DeleteWorkload { name } | Command::Scale { name, .. } => {
                if !at_least(Role::Deployer) {
                    return Err(unauthorized());
                }
                let Some(w) = self.workloads.get(name) else {
                    return Err(CommandError::NotFound {
                        what: "workload".into(),
                        name: name.to_string(),
                    });
                };
                if let Command::Scale { replicas, .. } = &req.command {
                    let mut spec = w.spec.clone();
                    spec.replicas = *replicas;
                    spec.min_available = spec.min_available.min(*replicas);
                    spec.validate().map_err(invalid)?;
                }
                Ok(())
            }
            Command::Assign { epoch, changes } => {
                if req.actor != Actor::System {
                    return Err(unauthorized());
                }
                if *epoch <= self.epoch {
                    return Err(CommandError::StaleEpoch { epoch: *epoch, current: self.epoch });
                }
                if changes.len() > MAX_BATCH {
                    return Err(CommandError::TooMany {
                        what: "assignment changes in one command".into(),
                        max: MAX_BATCH,
                    });
                }
                self.check_changes(changes)
            }
            Command::Report(items) => {
                let node = match &req.actor {
                    Actor::System => None,
                    other => Some(self.is_live_node(other).ok_or_else(unauthorized)?),
                };
                if items.len() > MAX_BATCH {
                    return Err(CommandError::TooMany {
                        what: "reports in one command".into(),
                        max: MAX_BATCH,
                    });
                }
                for (r, status) in items {
                    if let Some(n) = node
                        && status.node != *n
                    {
                        return Err(bad(
                            "report",
                            format!("{n} reports on behalf of {}", status.node),
                        ));
                    }
                    status.phase.validate().map_err(|e| bad("report", format!("{r}: {e}")))?;
                }
                Ok(())
            }
        }
    }

    /// Makes the change; only called after [`check`](Self::check) passed.
    fn mutate(&mut self, req: &Request) -> Reply {
        match &req.command {
            Command::Bootstrap { settings, admin, node } => {
                self.settings = Some(settings.clone());
                self.users.insert(*admin, UserRecord { name: "admin".into(), role: Role::Admin });
                let roles = [NodeRole::Worker, NodeRole::Voter].into_iter().collect();
                self.gate_touch(node);
                self.nodes.insert(
                    node.clone(),
                    NodeRecord {
                        roles,
                        labels: BTreeMap::new(),
                        revoked: false,
                        enrolled_ms: req.time_ms,
                        schedulable: Schedulable::Yes,
                    },
                );
                Reply::Done
            }
            Command::SetSettings(s) => {
                self.settings = Some(s.clone());
                Reply::Done
            }
            Command::Enroll { token, peer, .. } => {
                self.nonces.retain(|_, (_, expires)| *expires >= req.time_ms);
                self.nonces.entry(token.nonce).or_insert((0, token.expires_ms)).0 += 1;
                self.gate_touch(peer);
                self.nodes.insert(
                    peer.clone(),
                    NodeRecord {
                        roles: token.roles.clone(),
                        labels: token.labels.clone(),
                        revoked: false,
                        enrolled_ms: req.time_ms,
                        schedulable: Schedulable::Yes,
                    },
                );
                Reply::Done
            }
            Command::Revoke { peer } => {
                if let Some(n) = self.nodes.get_mut(peer) {
                    n.revoked = true;
                }
                self.gate_touch(peer);
                let touched: Vec<ReplicaId> = self
                    .assignments
                    .iter()
                    .filter(|(_, a)| a.node == *peer || a.from.as_ref() == Some(peer))
                    .map(|(r, _)| r.clone())
                    .collect();
                for r in &touched {
                    self.touch_replica(r);
                }
                // Its replicas must move: forget their assignments (a replica that was moving
                // to it goes back to the node that still runs it), and that it still runs
                // replicas moving away.
                let gone: Vec<ReplicaId> = self
                    .assignments
                    .iter()
                    .filter(|(_, a)| a.node == *peer)
                    .map(|(r, _)| r.clone())
                    .collect();
                for r in gone {
                    self.statuses.remove(&r);
                    match self.assignments.get_mut(&r).and_then(|a| a.from.take().map(|f| (a, f))) {
                        Some((a, origin)) => a.node = origin,
                        None => {
                            self.assignments.remove(&r);
                        }
                    }
                }
                for a in self.assignments.values_mut() {
                    if a.from.as_ref() == Some(peer) {
                        a.from = None;
                    }
                }
                Reply::Done
            }
            Command::SetNodeLabels { peer, labels } => {
                if let Some(n) = self.nodes.get_mut(peer) {
                    n.labels = labels.clone();
                }
                Reply::Done
            }
            Command::SetSchedulable { peer, schedulable } => {
                if let Some(n) = self.nodes.get_mut(peer) {
                    n.schedulable = *schedulable;
                }
                Reply::Done
            }
            Command::PutUser { key, name, role } => {
                self.users.insert(*key, UserRecord { name: name.clone(), role: *role });
                Reply::Done
            }
            Command::RemoveUser { key } => {
                self.users.remove(key);
                Reply::Done
            }
            Command::PutWorkload(spec) => {
                // Replicas beyond a lowered count keep running until the leader's scale plan
                // stops the ones it chooses.
                let version = self.workloads.get(&spec.name).map_or(1, |w| w.version + 1);
                self.touch_workload(&spec.name);
                self.workloads
                    .insert(spec.name.clone(), WorkloadRecord { spec: (**spec).clone(), version });
                Reply::Version(version)
            }
            Command::DeleteWorkload { name } => {
                self.touch_workload(name);
                self.workloads.remove(name);
                self.assignments.retain(|r, _| r.workload != *name);
                self.statuses.retain(|r, _| r.workload != *name);
                Reply::Done
            }
            Command::Scale { name, replicas } => {
                // The leader's scale plan starts or stops replicas to match.
                let mut version = 0;
                self.touch_workload(name);
                if let Some(w) = self.workloads.get_mut(name) {
                    w.spec.replicas = *replicas;
                    w.spec.min_available = w.spec.min_available.min(*replicas);
                    w.version += 1;
                    version = w.version;
                }
                Reply::Version(version)
            }
            Command::Assign { epoch, changes } => {
                self.epoch = *epoch;
                for change in changes {
                    self.change(change, *epoch);
                }
                Reply::Done
            }
            Command::Report(items) => {
                // Only the node a replica is assigned to speaks for it: a node that ran it
                // before it moved (and reports late, or from stale state after a restart)
                // must not overwrite the current host's status.
                for (r, status) in items {
                    if self.assignments.get(r).is_some_and(|a| a.node == status.node) {
                        self.statuses.insert(r.clone(), status.clone());
                    }
                }
                Reply::Done
            }
        }
    }

    /// Checks a placement command's changes against the state as they would apply in order:
    /// known workloads, enrolled unrevoked nodes, moves from where a replica runs, and no
    /// workload grown beyond its desired replicas.
    fn check_changes(&self, changes: &[Change]) -> Result<(), CommandError> {
        // Whether each touched replica is assigned after the changes so far, and where.
        // (node, the origin still running it while it moves), as `change` would leave it.
        type Place<'a> = Option<(&'a NodeName, Option<&'a NodeName>)>;
        let mut overlay: BTreeMap<&ReplicaId, Place<'_>> = BTreeMap::new();
        let current = |r: &ReplicaId| self.assignments.get(r).map(|a| (&a.node, a.from.as_ref()));
        for change in changes {
            let r = change.replica();
            if !self.workloads.contains_key(&r.workload) {
                return Err(CommandError::NotFound {
                    what: "workload".into(),
                    name: r.workload.to_string(),
                });
            }
            if r.index >= cloudless_types::spec::MAX_REPLICAS {
                return Err(bad(
                    "changes",
                    format!("{r}: ordinals go up to {}", cloudless_types::spec::MAX_REPLICAS - 1),
                ));
            }
            let now = overlay.get(r).copied().unwrap_or_else(|| current(r));
            let next = match change {
                Change::Start { node, .. } => {
                    self.check_target(node)?;
                    // A handoff in progress keeps its origin, unless the replica goes back to it.
                    let from = now.and_then(|(_, from)| from).filter(|f| *f != node);
                    Some((node, from))
                }
                Change::Move { from, to, .. } => {
                    if from == to {
                        return Err(bad(
                            "changes",
                            format!("{r} cannot move from {from} to itself"),
                        ));
                    }
                    self.check_target(to)?;
                    match now {
                        // A replica moves again only once its last move is released: its origin
                        // may be the only node that runs it.
                        Some((_, Some(_))) => {
                            return Err(bad(
                                "changes",
                                format!("{r} is still moving; it moves again once released"),
                            ));
                        }
                        Some((at, None)) if at == from => {}
                        _ => {
                            return Err(bad(
                                "changes",
                                format!("{r} cannot move from {from}: it is not assigned there"),
                            ));
                        }
                    }
                    Some((to, Some(from)))
                }
                Change::Release { .. } => match now {
                    Some((at, Some(_))) => Some((at, None)),
                    _ => return Err(bad("changes", format!("{r} is not moving"))),
                },
                Change::Stop { .. } => None,
            };
            overlay.insert(r, next);
        }
        // No workload ends with more replicas than it wants, unless it had them already (a
        // scale-down in progress).
        let touched: BTreeSet<&WorkloadName> = overlay.keys().map(|r| &r.workload).collect();
        for name in touched {
            let Some(w) = self.workloads.get(name) else { continue };
            let before = self.assigned_of(name).count();
            let mut after = before;
            for (r, next) in overlay.range(ReplicaId::new(name, 0)..) {
                if r.workload != *name {
                    break;
                }
                match (current(r).is_some(), next.is_some()) {
                    (false, true) => after += 1,
                    (true, false) => after -= 1,
                    _ => {}
                }
            }
            let want = w.spec.replicas as usize;
            if after > want.max(before) {
                return Err(bad(
                    "changes",
                    format!("{name} would have {after} replicas assigned; it wants {want}"),
                ));
            }
        }
        Ok(())
    }

    fn check_target(&self, node: &NodeName) -> Result<(), CommandError> {
        match self.nodes.get(node) {
            Some(n) if !n.revoked => Ok(()),
            _ => {
                Err(CommandError::NotFound { what: "enrolled node".into(), name: node.to_string() })
            }
        }
    }

    /// Makes one placement change (checked by [`check_changes`](Self::check_changes)).
    fn change(&mut self, change: &Change, epoch: u64) {
        let replica = match change {
            Change::Start { replica, .. }
            | Change::Move { replica, .. }
            | Change::Release { replica }
            | Change::Stop { replica } => replica,
        };
        // The nodes it leaves and the nodes it goes to both see their lists change.
        self.touch_replica(replica);
        self.change_inner(change, epoch);
        self.touch_replica(replica);
    }

    fn change_inner(&mut self, change: &Change, epoch: u64) {
        match change {
            Change::Start { replica, node } => {
                let old = self.assignments.get(replica);
                // A handoff in progress keeps its origin running until the replacement runs.
                let from = old.and_then(|a| a.from.clone()).filter(|f| f != node);
                if old.is_none_or(|a| a.node != *node) {
                    self.statuses.remove(replica);
                }
                self.assignments
                    .insert(replica.clone(), Assignment { node: node.clone(), epoch, from });
            }
            Change::Move { replica, from, to } => {
                // The status described the run on `from`; the new host reports its own.
                self.statuses.remove(replica);
                self.assignments.insert(
                    replica.clone(),
                    Assignment { node: to.clone(), epoch, from: Some(from.clone()) },
                );
            }
            Change::Release { replica } => {
                if let Some(a) = self.assignments.get_mut(replica) {
                    a.from = None;
                }
            }
            Change::Stop { replica } => {
                self.assignments.remove(replica);
                self.statuses.remove(replica);
            }
        }
    }

    /// Marks `node`'s enrollment as changed by the request being applied.
    fn gate_touch(&mut self, node: &NodeName) {
        self.gate_changes.insert(node.clone(), self.applied);
        self.gate_generation = self.applied;
    }

    /// Marks the lists of the nodes that run `replica` (its host and the node it leaves) as
    /// changed by the request being applied.
    fn touch_replica(&mut self, replica: &ReplicaId) {
        if let Some(a) = self.assignments.get(replica) {
            let nodes = std::iter::once(&a.node).chain(a.from.as_ref());
            for n in nodes {
                self.assign_changes.insert(n.clone(), self.applied);
            }
        }
    }

    /// Marks the lists of every node that runs a replica of `workload` as changed.
    fn touch_workload(&mut self, workload: &WorkloadName) {
        let nodes: BTreeSet<NodeName> = self
            .assignments
            .iter()
            .filter(|(r, _)| r.workload == *workload)
            .flat_map(|(_, a)| std::iter::once(a.node.clone()).chain(a.from.clone()))
            .collect();
        for n in nodes {
            self.assign_changes.insert(n, self.applied);
        }
    }

    // ---- reads ---------------------------------------------------------------------------

    /// The applied count at which `node`'s assignments last changed (0: never had any). It
    /// only grows, so a worker that holds the list of this generation need not fetch it again.
    pub fn assignments_generation(&self, node: &NodeName) -> u64 {
        self.assign_changes.get(node).copied().unwrap_or(0)
    }

    /// The nodes whose assignments changed after applied count `since`, with the generation.
    pub fn assignments_changed_since(&self, since: u64) -> impl Iterator<Item = (&NodeName, u64)> {
        self.assign_changes.iter().filter(move |(_, g)| **g > since).map(|(n, g)| (n, *g))
    }

    /// The applied count of the last enrollment or revocation.
    pub fn gate_generation(&self) -> u64 {
        self.gate_generation
    }

    /// The nodes enrolled or revoked after applied count `since` (with their records).
    pub fn gate_changed_since(&self, since: u64) -> impl Iterator<Item = (&NodeName, &NodeRecord)> {
        self.gate_changes
            .iter()
            .filter(move |(_, g)| **g > since)
            .filter_map(|(n, _)| self.nodes.get(n).map(|r| (n, r)))
    }

    /// The settings, once bootstrapped.
    pub fn settings(&self) -> Option<&Settings> {
        self.settings.as_ref()
    }

    /// Enrolled nodes.
    pub fn nodes(&self) -> &BTreeMap<NodeName, NodeRecord> {
        &self.nodes
    }

    /// Whether `peer` is enrolled and not revoked.
    pub fn is_member(&self, peer: &NodeName) -> bool {
        self.nodes.get(peer).is_some_and(|n| !n.revoked)
    }

    /// Users.
    pub fn users(&self) -> &BTreeMap<UserKey, UserRecord> {
        &self.users
    }

    /// A user's role.
    pub fn user_role(&self, key: &UserKey) -> Option<Role> {
        self.users.get(key).map(|u| u.role)
    }

    /// Workloads.
    pub fn workloads(&self) -> &BTreeMap<WorkloadName, WorkloadRecord> {
        &self.workloads
    }

    /// Assignments.
    pub fn assignments(&self) -> &BTreeMap<ReplicaId, Assignment> {
        &self.assignments
    }

    /// The assigned replicas of `workload`, by ordinal.
    pub fn assigned_of<'a>(
        &'a self,
        workload: &'a WorkloadName,
    ) -> impl Iterator<Item = (&'a ReplicaId, &'a Assignment)> + 'a {
        self.assignments
            .range(ReplicaId::new(workload, 0)..)
            .take_while(move |(r, _)| r.workload == *workload)
    }

    /// The replicas `node` should run: those assigned to it, and those moving away from it
    /// whose replacement does not run yet.
    pub fn runs_on<'a>(
        &'a self,
        node: &'a NodeName,
    ) -> impl Iterator<Item = (&'a ReplicaId, &'a Assignment)> + 'a {
        self.assignments
            .iter()
            .filter(move |(_, a)| a.node == *node || a.from.as_ref() == Some(node))
    }

    /// Reported replica statuses (each from the node the replica is assigned to).
    pub fn statuses(&self) -> &BTreeMap<ReplicaId, ReplicaStatus> {
        &self.statuses
    }

    /// The last placement epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Requests applied so far (including refused ones).
    pub fn applied(&self) -> u64 {
        self.applied
    }
}

fn check_name(field: &str, s: &str) -> Result<(), CommandError> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(bad(field, format!("must be 1 to {MAX_NAME} printable bytes")));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), CommandError> {
    let d = cloudless_types::NodeDescriptor { labels: labels.clone(), ..Default::default() };
    d.validate().map_err(invalid)
}

pub use cloudless_types::hex;

#[cfg(test)]
mod tests;
