//! The Cloudless node: the composition root that wires the mesh, consensus, scheduler and
//! runtime together into one [`daemon::Daemon`] per device. Its files are layers, each using
//! only the ones below it:
//!
//! ```text
//!   daemon        wires and stops (the only file that knows every part)
//!   loops         view (mesh events ─▶ View) · gatekeeper (gate, voters) · placer (leader
//!                 round ─▶ Assign) · worker (assignments ─▶ runtime, reports, module copies)
//!   api           the services: user and node requests, raft messages; read models; uploads
//!   peers         calls to other nodes, the walk to a raft member
//!   facts         what the parts share, each fact with one writer
//!   pure cores    access (the one access table), round (plans ─▶ changes), view (the pool),
//!                 gate, transport, config, http, recovery
//! ```
//!
//! `local` (whole clusters in one process, for `cloudless dev` and tests) sits on top.

pub mod access;
pub mod api;
pub mod config;
pub mod daemon;
pub mod facts;
pub mod files;
pub mod gate;
pub mod http;
pub mod local;
pub mod loops;
pub mod peers;
pub mod recovery;
pub mod round;
pub mod transport;
pub mod view;
