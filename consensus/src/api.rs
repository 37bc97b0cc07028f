//! The protocol nodes and the CLI use to reach the raft group through any node (the node
//! serves it as the mesh RPC service `api`): commands from nodes (reports, enrollment) and
//! from users (signed), reads of committed state, and module transfer.
//!
//! ```text
//!   CLI: SignedCommand::sign(user key, command) ──▶ any node ──▶ a raft member? submit
//!                                                          └── no: Redirect(members)
//!   node: Node(Report | Enroll) ──▶ a member: proposed as Actor::Node(caller PeerId)
//!   node: Query(Assigned) ──▶ a member: its replicas and their specs
//! ```
//!
//! The caller of `Node` requests is the mesh connection's authenticated PeerId, never a field
//! of the request; a user is whoever holds the key that signed the request, and the state
//! machine decides what that user may do.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::state::{Command, ReplicaKey, Response, UserKey};
use cloudless_types::WorkloadSpec;

/// The mesh RPC service name.
pub const SERVICE: &str = "api";
/// How far a signed request's clock may be from the node's: enough for unsynchronised
/// laptops, short enough that a captured request is soon useless (and its (client, serial)
/// makes a replay within the window apply nothing new).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Largest module chunk per request: well under the mesh's 4 MiB RPC limit.
pub const CHUNK: usize = 1024 * 1024;
/// Largest module accepted.
pub const MAX_MODULE: u64 = 64 * 1024 * 1024;

/// A command signed by a user key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// The user's public key.
    pub key: UserKey,
    /// The client's session (random per CLI process) and request number: a retry reuses
    /// both, so it is applied once.
    pub client: u64,
    /// See `client`.
    pub serial: u64,
    /// The signer's clock, milliseconds since the epoch.
    pub time_ms: u64,
    /// What to do.
    pub command: Command,
    /// Signature over everything above.
    pub signature: Vec<u8>,
}

/// Why a signed command was refused before reaching the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature does not match.
    #[error("the request's signature does not match its key and contents")]
    Bad,
    /// The signer's clock is too far from ours.
    #[error(
        "the request was signed {0} s away from this node's clock (at most 300 s); check the clock"
    )]
    Skew(u64),
}

fn signed_bytes(
    key: &UserKey,
    client: u64,
    serial: u64,
    time_ms: u64,
    command: &Command,
) -> Vec<u8> {
    postcard::to_allocvec(&(b"cloudless-api-1", key, client, serial, time_ms, command))
        .unwrap_or_default()
}

impl SignedCommand {
    /// Signs `command` with `user`.
    pub fn sign(
        user: &SigningKey,
        client: u64,
        serial: u64,
        time_ms: u64,
        command: Command,
    ) -> Self {
        let key = user.verifying_key().to_bytes();
        let signature =
            user.sign(&signed_bytes(&key, client, serial, time_ms, &command)).to_bytes().to_vec();
        SignedCommand { key, client, serial, time_ms, command, signature }
    }

    /// Checks the signature and the clock against `now_ms`.
    pub fn verify(&self, now_ms: u64) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| SignatureError::Bad)?;
        let sig = Signature::from_slice(&self.signature).map_err(|_| SignatureError::Bad)?;
        let bytes = signed_bytes(&self.key, self.client, self.serial, self.time_ms, &self.command);
        key.verify(&bytes, &sig).map_err(|_| SignatureError::Bad)?;
        let skew = now_ms.abs_diff(self.time_ms);
        if skew > CLOCK_SKEW_MS {
            return Err(SignatureError::Skew(skew / 1000));
        }
        Ok(())
    }
}

/// Reads of committed state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The replicas assigned to a node, with their workloads' specs.
    Assigned {
        /// The node (PeerId text).
        node: String,
    },
    /// The raft voters, as PeerId text (so callers can go to a member directly).
    Members,
}

/// A request to the `api` service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// A command from the calling node itself.
    Node(Command),
    /// A command from a user.
    User(SignedCommand),
    /// A read.
    Query(Query),
    /// A chunk of a stored module.
    Module {
        /// Its hash.
        hash: String,
        /// Where the chunk starts.
        offset: u64,
    },
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResponse {
    /// The state machine's response to a command.
    Applied(Response),
    /// For [`Query::Assigned`].
    Assigned(Vec<(ReplicaKey, WorkloadSpec)>),
    /// For [`Query::Members`].
    Members(Vec<String>),
    /// A module chunk and the module's total size.
    Module {
        /// Total size.
        total: u64,
        /// The bytes from the requested offset.
        bytes: Vec<u8>,
    },
    /// This node cannot answer; these are raft members that can.
    Redirect(Vec<String>),
    /// Refused, with the reason.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_contents_and_time() {
        let user = SigningKey::from_bytes(&[3; 32]);
        let cmd = Command::DeleteWorkload { name: "web".into() };
        let s = SignedCommand::sign(&user, 9, 1, 1_000_000, cmd);
        s.verify(1_000_000).unwrap();
        s.verify(1_000_000 + CLOCK_SKEW_MS).unwrap();
        assert_eq!(s.verify(1_000_000 + CLOCK_SKEW_MS + 1_000), Err(SignatureError::Skew(301)));
        let mut changed = s.clone();
        changed.command = Command::DeleteWorkload { name: "db".into() };
        assert_eq!(changed.verify(1_000_000), Err(SignatureError::Bad));
        let mut other = s.clone();
        other.key = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert_eq!(other.verify(1_000_000), Err(SignatureError::Bad));
        let mut replay = s.clone();
        replay.serial = 2;
        assert_eq!(replay.verify(1_000_000), Err(SignatureError::Bad));
    }
}
