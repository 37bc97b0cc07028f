//! `cloudlessctl`: the command-line client that talks to any node over the mesh (as a mesh
//! client, with its own ed25519 identity) with signed requests.
//!
//! ```text
//!   argv ──▶ verbs (src/main.rs) ──▶ spec::parse (documents) ──▶ SignedRequest(user key)
//!        ──▶ client::Client (mesh client, one peer) ──▶ node `api` service ──▶ output::*
//! ```
//!
//! - [`spec`]: workload documents (YAML or JSON) into validated `WorkloadSpec`s.
//! - [`config`]: which peer and which keys (`ctl.toml`).
//! - [`client`]: the connection and the signed request protocol.

pub mod client;
pub mod config;
pub mod spec;
