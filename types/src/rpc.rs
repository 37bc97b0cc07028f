//! The shape of a point-to-point request/response service, shared by the crates that define
//! services (the api, the raft transport) and the mesh that carries them (`mesh::Rpc` is this
//! trait): a name and a pair of serde types.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One RPC service: its name and its message types.
pub trait Rpc {
    /// The service name (at most 64 bytes), for example `"raft"`.
    const SERVICE: &'static str;
    /// What the caller sends.
    type Request: Serialize + DeserializeOwned + Send;
    /// What the server answers.
    type Response: Serialize + DeserializeOwned + Send;
}
