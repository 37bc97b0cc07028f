//! An in-memory driver for other crates' tests: replicas "run" until the test ends them, so a
//! test can script exits, start failures and log output without an engine.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::driver::{
    Driver, DriverError, Exit, ExitReason, LogLine, LogStream, Observed, RunState, Stats, Stream,
};
use crate::logs::LogBook;
use cloudless_types::Image;

use crate::spec::{ReplicaId, ReplicaSpec};

struct Fake {
    fingerprint: String,
    since: SystemTime,
    exit: watch::Sender<Option<Exit>>,
    logs: Arc<LogBook>,
}

#[derive(Default)]
struct State {
    runs: BTreeMap<ReplicaId, Fake>,
    starts: BTreeMap<ReplicaId, u32>,
    broken: BTreeSet<Image>,
    exec_code: i32,
}

/// Replicas that run until told otherwise. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryDriver {
    state: Arc<Mutex<State>>,
    log_dir: Arc<tempfile::TempDir>,
}

impl MemoryDriver {
    /// An empty driver.
    pub fn new() -> Result<Self, DriverError> {
        let log_dir = tempfile::tempdir().map_err(|e| DriverError::Engine(e.to_string()))?;
        Ok(MemoryDriver { state: Arc::default(), log_dir: Arc::new(log_dir) })
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Ends a running replica's run as if it exited with `code`.
    pub fn exit(&self, id: &ReplicaId, code: i32) {
        self.end(id, Some(code), ExitReason::Exited);
    }

    /// Ends a running replica's run for `reason`.
    pub fn end(&self, id: &ReplicaId, code: Option<i32>, reason: ExitReason) {
        self.with(|s| {
            if let Some(f) = s.runs.get(id) {
                f.exit.send_replace(Some(Exit { code, reason, at: SystemTime::now() }));
            }
        });
    }

    /// Makes every later start of `image` fail as missing.
    pub fn break_artifact(&self, image: Image) {
        self.with(|s| s.broken.insert(image));
    }

    /// How many times a replica was started.
    pub fn starts(&self, id: &ReplicaId) -> u32 {
        self.with(|s| s.starts.get(id).copied().unwrap_or(0))
    }

    /// The replicas running now.
    pub fn running(&self) -> BTreeSet<ReplicaId> {
        self.with(|s| {
            s.runs
                .iter()
                .filter(|(_, f)| f.exit.borrow().is_none())
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    /// Writes a line to a replica's stdout.
    pub fn print(&self, id: &ReplicaId, line: &str) {
        self.with(|s| s.runs.get(id).map(|f| f.logs.push(Stream::Stdout, line)));
    }

    /// The exit code later exec calls return.
    pub fn set_exec_code(&self, code: i32) {
        self.with(|s| s.exec_code = code);
    }

    fn get<R>(&self, id: &ReplicaId, f: impl FnOnce(&Fake) -> R) -> Result<R, DriverError> {
        self.with(|s| s.runs.get(id).map(f)).ok_or_else(|| DriverError::NotFound(id.clone()))
    }
}

fn observed(id: &ReplicaId, f: &Fake) -> Observed {
    let state = RunState::of(f.since, f.exit.borrow().clone());
    Observed { id: id.clone(), fingerprint: f.fingerprint.clone(), state }
}

#[async_trait]
impl Driver for MemoryDriver {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn runs(&self, _: &Image) -> bool {
        true
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<(), DriverError> {
        let fingerprint = spec.fingerprint();
        let dir = self.log_dir.path().join(spec.id.to_string());
        self.with(|s| {
            if s.broken.contains(&spec.image) {
                return Err(DriverError::MissingArtifact {
                    artifact: format!("{:?}", spec.image),
                    reason: "broken by the test".into(),
                });
            }
            if let Some(f) = s.runs.get(&spec.id)
                && f.fingerprint == fingerprint
                && f.exit.borrow().is_none()
            {
                return Ok(());
            }
            let logs = s.runs.get(&spec.id).map_or_else(|| LogBook::open(&dir), |f| f.logs.clone());
            let (exit, _) = watch::channel(None);
            s.runs.insert(
                spec.id.clone(),
                Fake { fingerprint, since: SystemTime::now(), exit, logs },
            );
            *s.starts.entry(spec.id.clone()).or_default() += 1;
            Ok(())
        })
    }

    async fn stop(&self, id: &ReplicaId, _: Duration) -> Result<(), DriverError> {
        self.with(|s| {
            if let Some(f) = s.runs.remove(id) {
                f.exit.send_if_modified(|e| {
                    let was = e.is_none();
                    if was {
                        *e = Some(Exit {
                            code: None,
                            reason: ExitReason::Stopped,
                            at: SystemTime::now(),
                        });
                    }
                    was
                });
            }
        });
        Ok(())
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<Observed>, DriverError> {
        Ok(self.with(|s| s.runs.get(id).map(|f| observed(id, f))))
    }

    async fn list(&self) -> Result<Vec<Observed>, DriverError> {
        Ok(self.with(|s| s.runs.iter().map(|(id, f)| observed(id, f)).collect()))
    }

    async fn wait(&self, id: &ReplicaId) -> Result<Exit, DriverError> {
        let mut rx = self.get(id, |f| f.exit.subscribe())?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| DriverError::NotFound(id.clone()))?
            .clone();
        exit.ok_or_else(|| DriverError::NotFound(id.clone()))
    }

    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError> {
        self.get(id, |f| f.logs.tail(tail))
    }

    async fn follow(&self, id: &ReplicaId) -> Result<LogStream, DriverError> {
        self.get(id, |f| f.logs.follow())
    }

    async fn stats(&self, id: &ReplicaId) -> Result<Stats, DriverError> {
        self.get(id, |_| Stats::default())
    }

    async fn address(&self, id: &ReplicaId, port: u16) -> Result<SocketAddr, DriverError> {
        self.get(id, |_| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    async fn exec(&self, id: &ReplicaId, _: &[String], _: Duration) -> Result<i32, DriverError> {
        self.get(id, |_| ())?;
        Ok(self.with(|s| s.exec_code))
    }
}
