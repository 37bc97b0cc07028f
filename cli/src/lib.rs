//! `cloudlessctl`: the command-line client that talks to any node over the mesh (as a mesh
//! client, with its own ed25519 identity) with signed requests.
//!
//! ```text
//!   argv ──▶ verbs (src/main.rs) ──▶ spec::parse (documents) ──▶ client::Client::<call>
//!        ──▶ SignedRequest(user key) over a mesh client connection ──▶ node `api` service
//!        ──▶ typed reply ──▶ table, json or yaml │ ApiError ──▶ exit code of its kind
//! ```
//!
//! - [`spec`]: workload documents (YAML or JSON) into validated `WorkloadSpec`s.
//! - [`client`]: the connection, one typed method per request.
//!
//! Its settings (`ctl.toml`) and key files are `cloudless_api::{ctl, keys}`, which
//! `cloudless init` writes too. The crate needs the api and the mesh, nothing of raft.

pub mod client;
pub mod spec;
