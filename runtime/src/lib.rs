//! The Cloudless runtime: runs a node's replicas. WASI modules and components through
//! wasmtime on every device, containers through the Docker Engine API where a device has an
//! engine, and the reconciler that keeps the replicas a node should run running.
//!
//! ```text
//!   node: desired replicas (from raft) ──▶ Reconciler (pure: start/stop/restart decisions,
//!        backoff, probes' verdicts) ──▶ Agent ──▶ Driver::{start, stop, wait, …}
//!                                        │            ├─ WasiDriver (wasmtime)
//!                                        │            ├─ ContainerDriver (bollard)
//!                                        │            └─ MemoryDriver (tests)
//!        status changes ◀── bounded channel ◀──┘  (pending, running, succeeded, failed, restarting)
//! ```
//!
//! - [`spec`]: [`ReplicaSpec`], what a driver runs, derived from a workload spec.
//! - [`driver`]: the [`Driver`] trait and what drivers report (exits, logs, stats).
//! - [`logs`]: per-replica logs, a byte-bounded ring in memory plus rotated files.
//! - [`wasi`]: the wasmtime driver.
//! - [`container`]: the Docker Engine API driver.
//! - `memory`: an in-memory driver for tests (the `test-utils` feature; not in the node).
//! - [`reconcile`]: the reconciler's decisions (restart policy, backoff, adoption), pure.
//! - [`agent`]: the task that carries them out and publishes status changes.
//! - [`probe`]: HTTP, TCP and exec checks.

pub mod agent;
pub mod container;
pub mod driver;
pub mod logs;
#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
pub mod probe;
pub mod reconcile;
pub mod spec;
pub mod time;
pub mod wasi;

pub use agent::{Agent, AgentConfig};
pub use driver::{Driver, DriverError, Exit, ExitReason, LogLine, Observed, RunState, Stats};
pub use reconcile::{ReplicaPhase, Status};
pub use spec::{ReplicaId, ReplicaSpec, RestartPolicy};
