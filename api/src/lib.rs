//! The node's service contract: what the state machine applies, what users and nodes ask each
//! other, and the files a user keeps. Both `consensus` (which applies [`Command`]s) and `cli`
//! (which sends [`UserRequest`]s) speak it; neither needs raft's or the swarm's internals.
//!
//! ```text
//!   cloudlessctl ── Request::User(SignedRequest(UserRequest)) ──┐
//!   other nodes  ── Request::Node(NodeRequest) ─────────────────┼─▶ mesh RPC "api" ──▶ node:
//!                                                                │   access table, handler
//!                      ◀── Result<C::Reply, ApiError> ──────────┘   (typed per call C)
//!   raft: consensus::State::apply(Command) ──▶ Result<Reply, CommandError>
//! ```
//!
//! Every call is a type `C: Call` whose answer on the wire is `Result<C::Reply, ApiError>`:
//! [`Service<C>`] is the `mesh::Rpc` that carries it, so a caller decodes exactly the reply its
//! request calls for and a server encodes exactly what the handler of that request returns.
//!
//! - [`command`]: the state machine's commands, replies and refusals.
//! - [`user`]: signed user requests, reads and what they answer.
//! - [`node`]: node-to-node requests.
//! - [`error`]: [`ApiError`] and its [`ErrorKind`]s (and cloudlessctl's exit codes).
//! - [`invite`]: invite strings: a root-signed enrollment token and where to join.
//! - [`keys`]: key files.
//! - [`ctl`]: cloudlessctl's settings (`ctl.toml`), which `cloudless init` writes.

use std::marker::PhantomData;

use cloudless_types::Rpc;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod command;
pub mod ctl;
pub mod error;
pub mod invite;
pub mod keys;
pub mod node;
pub mod user;

pub use command::{
    Change, Command, CommandError, NodeRole, ReplicaStatus, Reply, Role, Schedulable, Settings,
    Token, UserKey,
};
pub use ctl::CtlConfig;
pub use error::{ApiError, ErrorKind};
pub use node::NodeRequest;
pub use user::{SignedRequest, UserRequest};

/// The mesh RPC service name of the api.
pub const SERVICE: &str = "api";
/// Largest module chunk per request: well under the mesh's 4 MiB RPC limit.
pub const CHUNK: usize = 1024 * 1024;
/// Largest module accepted.
pub const MAX_MODULE: u64 = 64 * 1024 * 1024;

/// A request to the `api` service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// From a user (signed).
    User(SignedRequest),
    /// From the calling node itself.
    Node(NodeRequest),
    /// Which cluster this is (unsigned: a CLI asks it once, to know what to sign for).
    Cluster(ClusterInfo),
}

impl Request {
    /// A short, fixed label of the request's kind (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::User(s) => s.request.kind(),
            Request::Node(n) => n.kind(),
            Request::Cluster(_) => "cluster",
        }
    }
}

/// [`Request::Cluster`]: which cluster a node belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo;

/// The answer to [`ClusterInfo`]: what every invite already tells (public).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterId {
    /// The cluster's name.
    pub name: String,
    /// Its root public key: what user requests are signed for.
    pub root_key: UserKey,
}

impl Call for ClusterInfo {
    type Reply = ClusterId;
}

/// One call of the api: a request type and the type of its successful answer.
pub trait Call: Serialize + DeserializeOwned + Send {
    /// What a successful answer carries.
    type Reply: Serialize + DeserializeOwned + Send;
}

/// What the answer to call `C` is on the wire.
pub type Answer<C> = Result<<C as Call>::Reply, ApiError>;

/// The `api` service as the mesh carries call `C`: the one wire [`Request`], and `C`'s
/// answer.
pub struct Service<C>(PhantomData<fn() -> C>);

impl<C: Call> Rpc for Service<C> {
    const SERVICE: &'static str = SERVICE;
    type Request = Request;
    type Response = Answer<C>;
}
