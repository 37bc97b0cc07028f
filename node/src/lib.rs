//! The Cloudless node: the composition root that wires the mesh, consensus, scheduler and
//! runtime together into one [`daemon::Daemon`] per device.
//!
//! ```text
//!   config (TOML, CLOUDLESS_* env, flags) ──▶ Daemon::start ──▶ mesh (behind the EnrollGate)
//!        ├─ raft member (raft_rpc over the mesh) ── leader loop (leader::round) ──▶ Assign
//!        ├─ agent loop ──▶ runtime Agent (WASI, containers) ──▶ status reports
//!        ├─ api service (nodes, cloudlessctl) ──▶ commands, reads, uploads, logs
//!        └─ http (/metrics, /health, /ready)
//! ```
pub(crate) mod api;
pub mod config;
pub mod daemon;
pub mod gate;
pub mod http;
pub mod leader;
pub mod local;
pub mod raft_rpc;
pub mod recovery;
