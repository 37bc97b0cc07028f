//! The agent: one task per node that carries out the [`Reconciler`]'s decisions with the
//! drivers, watches every run (exit and probes), and publishes status changes.
//!
//! ```text
//!   Agent::set_desired ──(bounded)──▶ loop ──▶ Reconciler::set_desired / observe / plan
//!                                      │  actions: start, stop, watch ──▶ spawned tasks
//!                                      │  tasks: start result, exit (Driver::wait), probe
//!                                      │         verdicts ──(bounded, tagged by run)──▶ loop
//!   status receiver ◀──(bounded)── Reconciler::take_changes
//! ```
//!
//! Every run gets a number; events of a run that was replaced or stopped are dropped, so a
//! late exit can never be taken for the new run's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_types::Probe;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::driver::{Driver, Exit, ExitReason};
use crate::probe;
use crate::reconcile::{Action, Event, Reconciler, Status};
use crate::spec::{ReplicaId, ReplicaSpec};

/// Desired-set updates queued before `set_desired` waits.
const COMMANDS: usize = 16;
/// Driver and probe events queued for the loop.
const EVENTS: usize = 1024;
/// The loop looks at its state at least this often even when nothing happens.
const IDLE: Duration = Duration::from_secs(1);

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Time a replica gets to stop before it is killed.
    pub stop_grace: Duration,
    /// Status changes buffered for the node; when full, the agent waits for the node.
    pub status_buffer: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { stop_grace: Duration::from_secs(10), status_buffer: 256 }
    }
}

/// The agent has stopped (its task ended).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the runtime agent has stopped")]
pub struct AgentStopped;

/// A handle to the agent task. Cheap to clone; the task ends when every handle is dropped.
#[derive(Clone)]
pub struct Agent {
    commands: mpsc::Sender<Vec<ReplicaSpec>>,
}

impl Agent {
    /// Starts the agent over `drivers` (the first that runs an artifact runs it). It first
    /// lists what the drivers already run, to adopt it once the desired set is known.
    pub fn start(
        drivers: Vec<Arc<dyn Driver>>,
        config: AgentConfig,
    ) -> (Agent, mpsc::Receiver<Status>) {
        let (commands, rx) = mpsc::channel(COMMANDS);
        let (status, status_rx) = mpsc::channel(config.status_buffer.max(1));
        tokio::spawn(run(drivers, config, rx, status));
        (Agent { commands }, status_rx)
    }

    /// Replaces the set of replicas this node should run.
    pub async fn set_desired(&self, specs: Vec<ReplicaSpec>) -> Result<(), AgentStopped> {
        self.commands.send(specs).await.map_err(|_| AgentStopped)
    }
}

enum Msg {
    Event(u64, Event),
    Stopped(u64, ReplicaId),
}

struct Loop {
    drivers: Vec<Arc<dyn Driver>>,
    config: AgentConfig,
    events: mpsc::Sender<Msg>,
    /// The current run number of each replica.
    runs: HashMap<ReplicaId, u64>,
    /// Tasks watching each replica's current run.
    watchers: HashMap<ReplicaId, Vec<AbortHandle>>,
    /// Specs of replicas being started or running, for their watchers.
    specs: HashMap<ReplicaId, ReplicaSpec>,
    next_run: u64,
}

async fn run(
    drivers: Vec<Arc<dyn Driver>>,
    config: AgentConfig,
    mut commands: mpsc::Receiver<Vec<ReplicaSpec>>,
    status: mpsc::Sender<Status>,
) {
    let (events, mut incoming) = mpsc::channel(EVENTS);
    let mut rec = Reconciler::new();
    let mut l = Loop {
        drivers,
        config,
        events,
        runs: HashMap::new(),
        watchers: HashMap::new(),
        specs: HashMap::new(),
        next_run: 1,
    };
    for d in &l.drivers {
        match d.list().await {
            Ok(found) => {
                for o in found {
                    debug!(replica = %o.id, driver = d.name(), "found at startup");
                    rec.observe(Event::Found(o), Instant::now());
                }
            }
            Err(e) => warn!(driver = d.name(), error = %e, "cannot list existing replicas"),
        }
    }
    loop {
        let wake = rec.next_due().map_or(IDLE, |at| at.saturating_duration_since(Instant::now()));
        tokio::select! {
            specs = commands.recv() => match specs {
                Some(specs) => rec.set_desired(specs, Instant::now()),
                None => break,
            },
            Some(msg) = incoming.recv() => match msg {
                Msg::Event(run, event) => {
                    let id = event_id(&event);
                    if l.runs.get(id) == Some(&run) {
                        if let Event::Started(id) = &event {
                            l.watch(id.clone(), run);
                        }
                        rec.observe(event, Instant::now());
                    }
                }
                Msg::Stopped(run, id) => {
                    if l.runs.get(&id) == Some(&run) {
                        rec.stopped(&id);
                        let exit = Exit { code: None, reason: ExitReason::Stopped, at: std::time::SystemTime::now() };
                        rec.observe(Event::Exited(id, exit), Instant::now());
                    }
                }
            },
            () = tokio::time::sleep(wake.min(IDLE)) => {}
        }
        for action in rec.plan(Instant::now()) {
            l.act(action);
        }
        for change in rec.take_changes() {
            if status.send(change).await.is_err() {
                debug!("nobody listens to replica status any more");
            }
        }
    }
    for (_, handles) in l.watchers.drain() {
        handles.iter().for_each(AbortHandle::abort);
    }
}

fn event_id(e: &Event) -> &ReplicaId {
    match e {
        Event::Started(id)
        | Event::StartFailed(id, _)
        | Event::Exited(id, _)
        | Event::Unhealthy(id, _)
        | Event::Ready(id, _) => id,
        Event::Found(o) => &o.id,
    }
}

impl Loop {
    fn driver_for(&self, spec: &ReplicaSpec) -> Option<Arc<dyn Driver>> {
        self.drivers.iter().find(|d| d.runs(&spec.image)).cloned()
    }

    /// A new run number for `id`; the old run's watchers stop.
    fn new_run(&mut self, id: &ReplicaId) -> u64 {
        if let Some(handles) = self.watchers.remove(id) {
            handles.iter().for_each(AbortHandle::abort);
        }
        let run = self.next_run;
        self.next_run += 1;
        self.runs.insert(id.clone(), run);
        run
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Start(spec) => {
                let run = self.new_run(&spec.id);
                let events = self.events.clone();
                let Some(driver) = self.driver_for(&spec) else {
                    let why = format!("no runtime on this node runs {:?}", spec.image);
                    let id = spec.id.clone();
                    tokio::spawn(async move {
                        let _ = events.send(Msg::Event(run, Event::StartFailed(id, why))).await;
                    });
                    return;
                };
                self.specs.insert(spec.id.clone(), spec.clone());
                tokio::spawn(async move {
                    let event = match driver.start(&spec).await {
                        Ok(()) => Event::Started(spec.id.clone()),
                        Err(e) => Event::StartFailed(spec.id.clone(), e.to_string()),
                    };
                    let _ = events.send(Msg::Event(run, event)).await;
                });
            }
            Action::Watch(spec) => {
                let run = self.new_run(&spec.id);
                self.specs.insert(spec.id.clone(), spec.clone());
                self.watch(spec.id, run);
            }
            Action::Stop(id) => {
                let run = self.new_run(&id);
                self.specs.remove(&id);
                let drivers = self.drivers.clone();
                let events = self.events.clone();
                let grace = self.config.stop_grace;
                tokio::spawn(async move {
                    // The replica may be in any driver (found at startup, or its spec gone).
                    for d in drivers {
                        if matches!(d.status(&id).await, Ok(Some(_)))
                            && let Err(e) = d.stop(&id, grace).await
                        {
                            warn!(replica = %id, driver = d.name(), error = %e, "stop failed");
                        }
                    }
                    let _ = events.send(Msg::Stopped(run, id)).await;
                });
            }
        }
    }

    /// Waits for the run's exit and runs its probes.
    fn watch(&mut self, id: ReplicaId, run: u64) {
        let Some(spec) = self.specs.get(&id).cloned() else { return };
        let Some(driver) = self.driver_for(&spec) else { return };
        let events = self.events.clone();
        let (d, i) = (driver.clone(), id.clone());
        let mut handles = vec![
            tokio::spawn(async move {
                let exit = match d.wait(&i).await {
                    Ok(exit) => exit,
                    Err(e) => Exit {
                        code: None,
                        reason: ExitReason::Error(e.to_string()),
                        at: std::time::SystemTime::now(),
                    },
                };
                let _ = events.send(Msg::Event(run, Event::Exited(i, exit))).await;
            })
            .abort_handle(),
        ];
        for (probe, liveness) in [(spec.liveness.clone(), true), (spec.readiness.clone(), false)] {
            if let Some(probe) = probe {
                let task =
                    probing(driver.clone(), id.clone(), probe, liveness, run, self.events.clone());
                handles.push(tokio::spawn(task).abort_handle());
            }
        }
        self.watchers.insert(id, handles);
    }
}

/// Checks `probe` every period and reports its verdicts: liveness once it fails its
/// threshold, readiness whenever it changes.
async fn probing(
    driver: Arc<dyn Driver>,
    id: ReplicaId,
    probe: Probe,
    liveness: bool,
    run: u64,
    events: mpsc::Sender<Msg>,
) {
    tokio::time::sleep(Duration::from_millis(probe.initial_delay_ms.into())).await;
    let period = Duration::from_millis(probe.period_ms.into());
    let mut failures = 0u32;
    let mut ready = false;
    loop {
        let verdict = probe::check(driver.as_ref(), &id, &probe).await;
        let event = match verdict {
            Ok(()) => {
                failures = 0;
                (!liveness && !ready).then(|| {
                    ready = true;
                    Event::Ready(id.clone(), true)
                })
            }
            Err(why) => {
                failures += 1;
                debug!(replica = %id, liveness, failures, why, "probe failed");
                if failures < probe.failure_threshold {
                    None
                } else if liveness {
                    let _ = events.send(Msg::Event(run, Event::Unhealthy(id.clone(), why))).await;
                    return;
                } else {
                    ready.then(|| {
                        ready = false;
                        Event::Ready(id.clone(), false)
                    })
                }
            }
        };
        if let Some(e) = event
            && events.send(Msg::Event(run, e)).await.is_err()
        {
            return;
        }
        tokio::time::sleep(period).await;
    }
}
