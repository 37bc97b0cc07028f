//! The node's loops: each owns what it writes, reads the rest from [`Facts`](crate::facts),
//! and stops when the daemon's cancellation token fires (between units of work, so nothing
//! that holds a write is cut off).
//!
//! ```text
//!   mesh events ──▶ view ──Arc<View>──▶ placer (raft leader only): round ──▶ Assign ──▶ nudges
//!                       └──────────────▶ api reads, voter candidates, worker (module peers)
//!   gatekeeper (500 ms): gate lists + voters ◀── own state (trusted members) │ a member
//!   worker: agent ◀── own assignments (own state │ the nudging leader │ a member) ──▶ runtime
//!           report ◀── runtime status changes ──▶ batched Report ──▶ raft
//!           keeper (raft members): a copy of every module a workload names
//! ```
//!
//! A loop whose call fails waits for its next tick and tries again, so a lost leader or an
//! unreachable peer delays work, never stops it.

pub mod gatekeeper;
pub mod placer;
pub mod view;
pub mod worker;
