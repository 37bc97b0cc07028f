//! The reconciler's decisions, without I/O: given the replicas a node should run and what its
//! drivers report, what to start, what to stop, when to restart, and which status to publish.
//! The [`crate::agent`] carries the decisions out.
//!
//! ```text
//!   set_desired(specs) ─┐
//!   observe(Event) ─────┼─▶ Reconciler ──plan(now)──▶ [Action::Start | Action::Stop]
//!   (started, exited,   │        └──take_changes()──▶ [Status] (only when a phase changes)
//!    probe verdicts,    │
//!    found at startup) ─┘
//! ```
//!
//! Restart rules follow Kubernetes: `always` restarts whatever the exit, `on-failure` only
//! after a failure, `never` not at all; waits double from the policy's initial backoff up to
//! its cap, a run longer than `reset_after` resets them, and after `max_restarts` restarts in
//! a row the replica is left failed. A job that succeeds is done.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use cloudless_types::{Kind, Restart};
use serde::{Deserialize, Serialize};

use crate::driver::{Exit, Observed, RunState};
use crate::spec::{ReplicaId, ReplicaSpec};

pub use cloudless_types::ReplicaPhase;

/// A replica's status, published on every phase change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Which replica.
    pub id: ReplicaId,
    /// Its phase.
    pub phase: ReplicaPhase,
    /// Restarts since it was first started here.
    pub restarts: u32,
}

/// What the drivers and probes report.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A start succeeded.
    Started(ReplicaId),
    /// A start failed (missing image, engine error, refused by policy).
    StartFailed(ReplicaId, String),
    /// A run ended.
    Exited(ReplicaId, Exit),
    /// The liveness probe failed its threshold: the replica must be restarted.
    Unhealthy(ReplicaId, String),
    /// The readiness probe passed or failed.
    Ready(ReplicaId, bool),
    /// Found running (or exited) in a driver when the node started.
    Found(Observed),
}

/// What the agent must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start (or replace) a replica.
    Start(ReplicaSpec),
    /// Stop and remove a replica.
    Stop(ReplicaId),
    /// Watch a replica that is running: wait for its exit and run its probes. Emitted for
    /// adopted replicas, which were not started through [`Action::Start`].
    Watch(ReplicaSpec),
}

#[derive(Clone, Debug)]
struct Tracked {
    spec: ReplicaSpec,
    phase: ReplicaPhase,
    /// Restarts in a row (reset by a long enough run).
    in_a_row: u32,
    /// Restarts in total.
    restarts: u32,
    started_at: Option<Instant>,
    next_start: Option<Instant>,
    /// A start or stop is under way: do not issue another.
    busy: bool,
    /// Liveness failed and the replica is being stopped: its exit is that failure.
    unhealthy: Option<String>,
}

/// The per-node reconciler state.
#[derive(Debug, Default)]
pub struct Reconciler {
    replicas: BTreeMap<ReplicaId, Tracked>,
    /// Running replicas nobody wants (removed from the desired set, or found at startup).
    unwanted: BTreeSet<ReplicaId>,
    /// Found at startup, until the first desired set decides about them.
    found: BTreeMap<ReplicaId, Observed>,
    /// Adopted replicas the agent must start watching.
    adopted: BTreeSet<ReplicaId>,
    desired_known: bool,
    changes: Vec<Status>,
}

impl Reconciler {
    /// An empty reconciler: nothing wanted, nothing known.
    pub fn new() -> Self {
        Self::default()
    }

    fn set_phase(&mut self, id: &ReplicaId, phase: ReplicaPhase) {
        if let Some(t) = self.replicas.get_mut(id)
            && t.phase != phase
        {
            t.phase = phase.clone();
            self.changes.push(Status { id: id.clone(), phase, restarts: t.restarts });
        }
    }

    /// The replicas this node should run now. New ones are started, removed ones stopped,
    /// changed ones replaced; unchanged ones keep running.
    pub fn set_desired(&mut self, specs: Vec<ReplicaSpec>, now: Instant) {
        let wanted: BTreeMap<ReplicaId, ReplicaSpec> =
            specs.into_iter().map(|s| (s.id.clone(), s)).collect();
        let gone: Vec<ReplicaId> =
            self.replicas.keys().filter(|id| !wanted.contains_key(*id)).cloned().collect();
        for id in gone {
            if let Some(t) = self.replicas.remove(&id)
                && !matches!(t.phase, ReplicaPhase::Succeeded | ReplicaPhase::Failed(_))
            {
                self.unwanted.insert(id);
            }
        }
        for (id, spec) in wanted {
            match self.replicas.get_mut(&id) {
                Some(t) if t.spec.fingerprint() == spec.fingerprint() => t.spec = spec,
                Some(t) => {
                    // Changed: replace with a fresh history.
                    t.spec = spec;
                    t.in_a_row = 0;
                    t.next_start = Some(now);
                    self.set_phase(&id, ReplicaPhase::Pending);
                }
                None => {
                    let adopted = self.found.remove(&id).filter(|o| {
                        o.fingerprint == spec.fingerprint()
                            && matches!(o.state, RunState::Running { .. })
                    });
                    let running = adopted.is_some();
                    self.replicas.insert(
                        id.clone(),
                        Tracked {
                            spec,
                            phase: ReplicaPhase::Pending,
                            in_a_row: 0,
                            restarts: 0,
                            started_at: running.then_some(now),
                            next_start: (!running).then_some(now),
                            busy: false,
                            unhealthy: None,
                        },
                    );
                    self.changes.push(Status {
                        id: id.clone(),
                        phase: ReplicaPhase::Pending,
                        restarts: 0,
                    });
                    if running {
                        let ready =
                            self.replicas.get(&id).is_some_and(|t| t.spec.readiness.is_none());
                        self.set_phase(&id, ReplicaPhase::Running { ready });
                        self.adopted.insert(id);
                    }
                }
            }
        }
        // What was found and not adopted: stop it unless it is wanted (then the start replaces
        // it; a stop now could race with that start).
        for (id, _) in std::mem::take(&mut self.found) {
            if !self.replicas.contains_key(&id) {
                self.unwanted.insert(id);
            }
        }
        self.desired_known = true;
    }

    /// Takes in what happened.
    pub fn observe(&mut self, event: Event, now: Instant) {
        match event {
            Event::Found(o) => {
                if self.desired_known && !self.replicas.contains_key(&o.id) {
                    self.unwanted.insert(o.id.clone());
                } else {
                    self.found.insert(o.id.clone(), o);
                }
            }
            Event::Started(id) => {
                let Some(t) = self.replicas.get_mut(&id) else { return };
                t.busy = false;
                t.started_at = Some(now);
                let ready = t.spec.readiness.is_none();
                self.set_phase(&id, ReplicaPhase::Running { ready });
            }
            Event::StartFailed(id, reason) => {
                if let Some(t) = self.replicas.get_mut(&id) {
                    t.busy = false;
                    t.started_at = None;
                }
                self.ended(&id, false, format!("could not start: {reason}"), now);
            }
            Event::Exited(id, exit) => {
                let Some(t) = self.replicas.get_mut(&id) else { return };
                if !matches!(t.phase, ReplicaPhase::Running { .. }) {
                    // A stale exit of a run that was already replaced.
                    return;
                }
                let unhealthy = t.unhealthy.take();
                let success = unhealthy.is_none() && exit.success();
                let reason = unhealthy.unwrap_or_else(|| exit.describe());
                self.ended(&id, success, reason, now);
            }
            Event::Unhealthy(id, reason) => {
                let Some(t) = self.replicas.get_mut(&id) else { return };
                if matches!(t.phase, ReplicaPhase::Running { .. }) && t.unhealthy.is_none() {
                    t.unhealthy = Some(format!("liveness probe failed: {reason}"));
                }
            }
            Event::Ready(id, ready) => {
                if self
                    .replicas
                    .get(&id)
                    .is_some_and(|t| matches!(t.phase, ReplicaPhase::Running { .. }))
                {
                    self.set_phase(&id, ReplicaPhase::Running { ready });
                }
            }
        }
    }

    /// A run ended (or never began): restart, or settle.
    fn ended(&mut self, id: &ReplicaId, success: bool, reason: String, now: Instant) {
        let Some(t) = self.replicas.get_mut(id) else { return };
        let policy = t.spec.restart.clone();
        if t.started_at.is_some_and(|s| now.saturating_duration_since(s) >= policy.reset_after) {
            t.in_a_row = 0;
        }
        t.started_at = None;
        let job_done = t.spec.kind == Kind::Job && success;
        let restart = !job_done
            && match policy.when {
                Restart::Always => true,
                Restart::OnFailure => !success,
                Restart::Never => false,
            };
        let phase = if !restart {
            if success { ReplicaPhase::Succeeded } else { ReplicaPhase::Failed(reason) }
        } else if policy.max_restarts.is_some_and(|m| t.in_a_row >= m) {
            ReplicaPhase::Failed(format!("{reason} (gave up after {} restarts)", t.in_a_row))
        } else {
            let backoff = policy.backoff(t.in_a_row);
            t.in_a_row += 1;
            t.restarts += 1;
            t.next_start = Some(now + backoff);
            ReplicaPhase::Restarting { reason, backoff }
        };
        self.set_phase(id, phase);
    }

    /// What to do now.
    pub fn plan(&mut self, now: Instant) -> Vec<Action> {
        let mut actions: Vec<Action> = std::mem::take(&mut self.unwanted)
            .into_iter()
            .filter(|id| !self.replicas.contains_key(id))
            .map(Action::Stop)
            .collect();
        for id in std::mem::take(&mut self.adopted) {
            if let Some(t) = self.replicas.get(&id) {
                actions.push(Action::Watch(t.spec.clone()));
            }
        }
        for (id, t) in &mut self.replicas {
            if t.busy {
                continue;
            }
            if t.unhealthy.is_some() && matches!(t.phase, ReplicaPhase::Running { .. }) {
                // Stopping it makes its run end; the exit is then the liveness failure.
                t.busy = true;
                actions.push(Action::Stop(id.clone()));
                continue;
            }
            let due = t.next_start.is_some_and(|at| at <= now);
            if due && matches!(t.phase, ReplicaPhase::Pending | ReplicaPhase::Restarting { .. }) {
                t.busy = true;
                t.next_start = None;
                actions.push(Action::Start(t.spec.clone()));
            }
        }
        actions
    }

    /// A stop the plan asked for finished (the agent reports it; for unhealthy replicas the
    /// exit follows as an [`Event::Exited`]).
    pub fn stopped(&mut self, id: &ReplicaId) {
        if let Some(t) = self.replicas.get_mut(id) {
            t.busy = false;
        }
    }

    /// When [`Self::plan`] next has something to do on its own (a backoff ending).
    pub fn next_due(&self) -> Option<Instant> {
        self.replicas.values().filter(|t| !t.busy).filter_map(|t| t.next_start).min()
    }

    /// Status changes since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<Status> {
        std::mem::take(&mut self.changes)
    }

    /// Every replica's current status.
    pub fn statuses(&self) -> Vec<Status> {
        self.replicas
            .iter()
            .map(|(id, t)| Status { id: id.clone(), phase: t.phase.clone(), restarts: t.restarts })
            .collect()
    }
}

#[cfg(test)]
mod tests;
