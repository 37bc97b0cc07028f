//! The changes the cluster's replicated state machine applies, and what it answers.
//!
//! ```text
//!   user (signed)  ── Command::{PutWorkload, Scale, SetSchedulable, PutUser, …} ──┐
//!   node (its own) ── Command::{Enroll, Report} ──────────────────────────────────┼─▶ raft
//!   leader (system) ─ Command::{Bootstrap, Assign} ──────────────────────────────┘
//!        ──▶ State::apply (consensus) ──▶ Ok(Reply) │ Err(CommandError), nothing changed
//! ```
//!
//! Who may send each command is decided twice: the node's access table refuses a request
//! before it reaches raft, and the state machine checks the actor's role again when it applies
//! it (the actor is derived from the authenticated sender, never read from the wire).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cloudless_types::{NodeName, ReplicaId, ReplicaPhase, WorkloadName, WorkloadSpec};
use serde::{Deserialize, Serialize};

/// A user's public key (ed25519), the identity of a CLI user.
pub type UserKey = [u8; 32];

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Read only.
    Viewer,
    /// Read, and manage workloads.
    Deployer,
    /// Everything.
    Admin,
}

impl Role {
    /// The word the CLI uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    /// The role a word names.
    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Deployer, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

/// What a node may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeRole {
    /// Runs workloads.
    Worker,
    /// May be chosen as a raft voter.
    Voter,
}

impl NodeRole {
    /// The word the CLI uses.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Worker => "worker",
            NodeRole::Voter => "voter",
        }
    }

    /// The role a word names.
    pub fn parse(s: &str) -> Option<NodeRole> {
        [NodeRole::Worker, NodeRole::Voter].into_iter().find(|r| r.as_str() == s)
    }
}

/// Whether the scheduler may use a node (`cloudlessctl node drain|cordon|uncordon`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedulable {
    /// New replicas may be placed there.
    #[default]
    Yes,
    /// No new replicas; the ones it runs stay.
    Cordoned,
    /// No new replicas, and the leader moves the ones it runs elsewhere (replacements start
    /// before the originals stop, and no workload drops below its min-available).
    Draining,
}

impl Schedulable {
    /// The word the CLI shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Schedulable::Yes => "schedulable",
            Schedulable::Cordoned => "cordoned",
            Schedulable::Draining => "draining",
        }
    }
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The cluster's name.
    pub name: String,
    /// The cluster root public key: signs enrollment tokens.
    pub root_key: UserKey,
    /// Wanted voters; `None` follows the default rule (1, 3 or 5 by eligible peers).
    pub voter_target: Option<u8>,
    /// Whether phones may vote.
    pub phones_may_vote: bool,
}

/// The contents of an invite's enrollment token, signed by the cluster root key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The cluster it is for.
    pub cluster: String,
    /// Single-use (or `max_uses`) identifier.
    pub nonce: [u8; 16],
    /// Valid until (milliseconds since the epoch).
    pub expires_ms: u64,
    /// How many nodes may enroll with it.
    pub max_uses: u32,
    /// Roles granted.
    pub roles: BTreeSet<NodeRole>,
    /// Labels granted.
    pub labels: BTreeMap<String, String>,
    /// The public half of the invite's claim key. The private half is only in the invite
    /// string: an enrolling device signs its own PeerId with it ([`Token::claim_bytes`]), so
    /// a node that relays the enrollment (and sees the token) cannot use it for another
    /// identity.
    pub claim_key: UserKey,
}

impl Token {
    /// The bytes the root key signs.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a struct of plain fields into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// What the claim key signs for device `peer`: this token (by its nonce and cluster) and
    /// that device.
    pub fn claim_bytes(&self, peer: &NodeName) -> Vec<u8> {
        postcard::to_allocvec(&("cloudless-enroll-1", &self.cluster, self.nonce, peer))
            .unwrap_or_default()
    }

    /// Whether `proof` is the claim key's signature for device `peer`.
    pub fn verify_claim(&self, peer: &NodeName, proof: &[u8]) -> bool {
        use ed25519_dalek::Verifier;
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.claim_key) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(proof) else { return false };
        key.verify(&self.claim_bytes(peer), &sig).is_ok()
    }
}

/// A node's report about one replica it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Who reports.
    pub node: NodeName,
    /// The phase.
    pub phase: ReplicaPhase,
    /// Restarts so far.
    pub restarts: u32,
    /// When the node observed it (its clock, milliseconds since the epoch).
    pub at_ms: u64,
}

/// One change of where replicas run, as the leader's plans make them (`sched::Step`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Run `replica` on `node` (a new replica, or one whose node was lost). A handoff in
    /// progress keeps its origin running until the replacement runs.
    Start {
        /// The replica.
        replica: ReplicaId,
        /// Where.
        node: NodeName,
    },
    /// Start `replica` on `to` while `from` keeps running it, until a [`Change::Release`]
    /// (start before stop: a drain never lowers what runs).
    Move {
        /// The replica.
        replica: ReplicaId,
        /// Where it runs now, and keeps running until released.
        from: NodeName,
        /// Where it goes.
        to: NodeName,
    },
    /// The replacement of a moved replica runs: its origin stops it.
    Release {
        /// The replica.
        replica: ReplicaId,
    },
    /// Stop `replica` and forget where it ran (scale down, preemption, a drain with no other
    /// home that the workload can spare, a replica whose node is gone).
    Stop {
        /// The replica.
        replica: ReplicaId,
    },
}

impl Change {
    /// The replica the change is about.
    pub fn replica(&self) -> &ReplicaId {
        match self {
            Change::Start { replica, .. }
            | Change::Move { replica, .. }
            | Change::Release { replica }
            | Change::Stop { replica } => replica,
        }
    }
}

/// A change to the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the cluster: settings, the first admin, the first node. Only once.
    Bootstrap {
        /// Settings.
        settings: Settings,
        /// The first admin's key.
        admin: UserKey,
        /// The first node (the first voter).
        node: NodeName,
    },
    /// Replaces the settings (the root key cannot change).
    SetSettings(Settings),
    /// Enrolls `peer` with a signed token.
    Enroll {
        /// The token.
        token: Token,
        /// The root key's signature over `token.to_bytes()`.
        signature: Vec<u8>,
        /// The invite's claim key's signature over `token.claim_bytes(peer)`: the device
        /// holds the invite, not only the token.
        proof: Vec<u8>,
        /// The node enrolling.
        peer: NodeName,
    },
    /// Cuts a node off.
    Revoke {
        /// The node.
        peer: NodeName,
    },
    /// Cordons, drains or uncordons a node.
    SetSchedulable {
        /// The node.
        peer: NodeName,
        /// Its new state.
        schedulable: Schedulable,
    },
    /// Replaces a node's labels.
    SetNodeLabels {
        /// The node.
        peer: NodeName,
        /// Its labels.
        labels: BTreeMap<String, String>,
    },
    /// Adds or changes a user.
    PutUser {
        /// The key.
        key: UserKey,
        /// A name.
        name: String,
        /// The role.
        role: Role,
    },
    /// Removes a user.
    RemoveUser {
        /// The key.
        key: UserKey,
    },
    /// Creates or updates a workload (boxed: a spec is large, most commands are small).
    PutWorkload(Box<WorkloadSpec>),
    /// Deletes a workload and its assignments.
    DeleteWorkload {
        /// The workload.
        name: WorkloadName,
    },
    /// Changes a workload's desired replicas (the leader's scale plan then starts or stops
    /// replicas).
    Scale {
        /// The workload.
        name: WorkloadName,
        /// Desired replicas.
        replicas: u32,
    },
    /// Records where replicas run (the leader's plans), at a new placement epoch.
    Assign {
        /// The placement epoch: must be above the last one.
        epoch: u64,
        /// The changes, applied in order.
        changes: Vec<Change>,
    },
    /// Records replica status reports from a node.
    Report(Vec<(ReplicaId, ReplicaStatus)>),
}

impl Command {
    /// What the command does, as an error message names it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Bootstrap { .. } => "bootstrap",
            Command::SetSettings(_) => "set settings",
            Command::Enroll { .. } => "enroll",
            Command::Revoke { .. } => "revoke",
            Command::SetNodeLabels { .. } => "set node labels",
            Command::SetSchedulable { .. } => "set node schedulable",
            Command::PutUser { .. } => "put user",
            Command::RemoveUser { .. } => "remove user",
            Command::PutWorkload(_) => "put workload",
            Command::DeleteWorkload { .. } => "delete workload",
            Command::Scale { .. } => "scale",
            Command::Assign { .. } => "assign",
            Command::Report(_) => "report",
        }
    }
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Done,
    /// The workload's new version.
    Version(u64),
}

/// Why a command was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The cluster has not been bootstrapped.
    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
    /// The cluster is bootstrapped already.
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    /// The actor may not do this.
    #[error("{actor} may not {command}")]
    Unauthorized {
        /// Who.
        actor: String,
        /// What.
        command: String,
    },
    /// Something in the command is wrong.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// It refers to something that does not exist.
    #[error("no {what} named {name}")]
    NotFound {
        /// What kind of thing.
        what: String,
        /// Its name.
        name: String,
    },
    /// The token's signature does not verify with the root key.
    #[error("the enrollment token is not signed by this cluster's root key")]
    BadSignature,
    /// The token has expired.
    #[error("the enrollment token expired at {expired_ms} ms")]
    TokenExpired {
        /// When.
        expired_ms: u64,
    },
    /// The node is enrolled already (enrolling again would reset its roles and cordon).
    #[error("node {peer} is enrolled already")]
    AlreadyEnrolled {
        /// The node.
        peer: String,
    },
    /// The token has been used up.
    #[error("the enrollment token has been used {uses} time(s), its limit")]
    TokenUsed {
        /// Uses so far.
        uses: u32,
    },
    /// A placement epoch at or below the last one.
    #[error("placement epoch {epoch} is not above the current {current}")]
    StaleEpoch {
        /// The epoch given.
        epoch: u64,
        /// The current one.
        current: u64,
    },
    /// The request is larger than a raft entry may be.
    #[error("payload too large: {size} bytes, at most {max}")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// A bound was reached.
    #[error("too many {what} (at most {max})")]
    TooMany {
        /// What.
        what: String,
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
