//! The interface every runtime implements, and what it reports.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use cloudless_types::Image;

use crate::spec::{ReplicaId, ReplicaSpec};

/// Why a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// It exited by itself; see the code.
    Exited,
    /// It used more memory than its limit and was stopped (containers: OOM-killed).
    OutOfMemory,
    /// Its files grew past its disk limit (or could not be measured) and it was stopped.
    OutOfDisk {
        /// What its directory held when it was measured, in MiB (`u64::MAX`: its files could
        /// not be measured).
        used_mib: u64,
        /// Its limit, in MiB.
        limit_mib: u32,
    },
    /// It ran past its wall-clock limit.
    Timeout,
    /// We stopped it.
    Stopped,
    /// A WebAssembly trap (unreachable, out-of-bounds access, stack overflow…).
    Trap(String),
    /// It could not run at all, or the engine lost it.
    Error(String),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, when there is one.
    pub code: Option<i32>,
    /// Why it ended.
    pub reason: ExitReason,
    /// When.
    pub at: SystemTime,
}

impl Exit {
    /// Whether the run succeeded: exited by itself with code 0.
    pub fn success(&self) -> bool {
        self.reason == ExitReason::Exited && self.code == Some(0)
    }

    /// A short description for status reports ("exit code 3", "out of memory", …).
    pub fn describe(&self) -> String {
        match (&self.reason, self.code) {
            (ExitReason::Exited, Some(c)) => format!("exit code {c}"),
            (ExitReason::Exited, None) => "exited".into(),
            (ExitReason::OutOfMemory, _) => "out of memory".into(),
            (ExitReason::OutOfDisk { used_mib: u64::MAX, .. }, _) => {
                "out of disk: its files cannot be measured (paths too deep?)".into()
            }
            (ExitReason::OutOfDisk { used_mib, limit_mib }, _) => {
                format!("out of disk: its files took {used_mib} MiB, limit {limit_mib} MiB")
            }
            (ExitReason::Timeout, _) => "timed out".into(),
            (ExitReason::Stopped, _) => "stopped".into(),
            (ExitReason::Trap(t), _) => format!("trap: {t}"),
            (ExitReason::Error(e), _) => format!("error: {e}"),
        }
    }
}

/// Where a replica is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Running since then.
    Running {
        /// When it started.
        since: SystemTime,
    },
    /// Ended, and not removed yet.
    Exited(Exit),
}

impl RunState {
    /// Running since `since`, or exited once an exit is known.
    pub fn of(since: SystemTime, exit: Option<Exit>) -> Self {
        match exit {
            Some(exit) => RunState::Exited(exit),
            None => RunState::Running { since },
        }
    }
}

/// A replica a driver knows about (for adoption after a node restart, and for status).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Which replica.
    pub id: ReplicaId,
    /// The [`ReplicaSpec::fingerprint`] it was started with.
    pub fingerprint: String,
    /// Where it is.
    pub state: RunState,
}

/// Which output stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line a replica wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was captured.
    pub at: SystemTime,
    /// Which stream.
    pub stream: Stream,
    /// The line, without its newline (invalid UTF-8 replaced).
    pub text: String,
}

/// A live feed of log lines; it ends when the replica's run ends.
pub type LogStream = BoxStream<'static, LogLine>;

/// Resource use of a running replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// CPU time used by the current run, in nanoseconds.
    pub cpu_nanos: u64,
    /// Memory in use now, in bytes.
    pub memory_bytes: u64,
}

/// Why a driver could not do what was asked. Nothing was started or changed unless the
/// variant says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The replica is not known to this driver.
    #[error("replica {0} is not running here")]
    NotFound(ReplicaId),
    /// The image or module is not available.
    #[error("{artifact} is not available: {reason}")]
    MissingArtifact {
        /// The image reference or module hash.
        artifact: String,
        /// What the engine said.
        reason: String,
    },
    /// The spec cannot run with this driver or under this node's policy.
    #[error("replica {id} cannot run: {reason}")]
    Refused {
        /// The replica.
        id: ReplicaId,
        /// Why.
        reason: String,
    },
    /// The driver does not offer this operation.
    #[error("{0} is not supported by this runtime")]
    Unsupported(&'static str),
    /// The engine failed (daemon unreachable, compile error, I/O).
    #[error("{0}")]
    Engine(String),
}

/// A runtime: starts, stops and watches replicas. Implementations: [`crate::wasi::WasiDriver`],
/// [`crate::container::ContainerDriver`], and [`crate::memory::MemoryDriver`] for tests.
///
/// Every method is safe to call concurrently. `start` of a replica that already runs with the
/// same fingerprint does nothing; `stop` of one that is not there succeeds.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// A short name for logs ("wasi", "container", "memory").
    fn name(&self) -> &'static str;

    /// Whether this driver runs `artifact`.
    fn runs(&self, image: &Image) -> bool;

    /// Starts a replica and returns once it runs (or failed to start).
    async fn start(&self, spec: &ReplicaSpec) -> Result<(), DriverError>;

    /// Stops a replica (asking first, forcing after `grace`) and removes it.
    async fn stop(&self, id: &ReplicaId, grace: Duration) -> Result<(), DriverError>;

    /// What the driver knows about one replica.
    async fn status(&self, id: &ReplicaId) -> Result<Option<Observed>, DriverError>;

    /// Every replica this driver has, running or exited (adoption after a node restart).
    async fn list(&self) -> Result<Vec<Observed>, DriverError>;

    /// Waits until the replica's current run ends.
    async fn wait(&self, id: &ReplicaId) -> Result<Exit, DriverError>;

    /// The last `tail` lines it wrote.
    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError>;

    /// Lines as they are written, from now on.
    async fn follow(&self, id: &ReplicaId) -> Result<LogStream, DriverError>;

    /// Resource use of the current run.
    async fn stats(&self, id: &ReplicaId) -> Result<Stats, DriverError>;

    /// Where a probe reaches the replica's `port` from this node.
    async fn address(&self, id: &ReplicaId, port: u16) -> Result<SocketAddr, DriverError>;

    /// Runs `command` inside the replica and returns its exit code (exec probes).
    async fn exec(
        &self,
        id: &ReplicaId,
        command: &[String],
        timeout: Duration,
    ) -> Result<i32, DriverError>;
}
