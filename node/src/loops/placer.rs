//! The placer: while this node leads raft, runs the leader's round (`round::round`, the
//! scheduler's plans) on each applied entry and each new view, commits its `Assign`, nudges
//! every node whose list of assignments changed (placements, moves, spec updates, deletes:
//! the state keeps each node's generation), and publishes why workloads are not placed.
//!
//! ```text
//!   applied index moved │ view published │ every 100 ms ──▶ leader? ──▶ round(state, view)
//!        ──▶ Assign (Actor::System) ──▶ committed ──▶ metrics
//!        ──▶ nodes whose generation moved since the last look ──▶ pending ──▶ Nudge{generation}
//!            (at most MAX_NUDGES in flight; a failed one is tried again, NUDGE_ATTEMPTS in all)
//!        ──▶ unschedulable ──▶ watch (api reads)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_api::node::Nudge;
use cloudless_api::{Change, Command};
use cloudless_consensus::Consistency;
use cloudless_consensus::state::{Actor, Request};
use cloudless_types::{NodeName, ReplicaId, WorkloadName};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::Api;
use crate::facts::Unschedulable;
use crate::round;

/// How often the leader reconciles when nothing wakes it: liveness changes and new entries
/// wake it at once, this only catches what neither announces.
const EVERY: Duration = Duration::from_millis(100);
/// Nudges in flight at once; more wait in `pending` for a slot (a freed slot is used at the
/// next wake-up, within [`EVERY`]).
const MAX_NUDGES: usize = 64;
/// A nudge not answered in this long is counted as failed (a node on a slow link answers a
/// nudge, a tiny request, well within it).
const NUDGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Tries of one nudge: a node that cannot be reached three times in a row learns its list
/// at its own next poll (every 5 s).
const NUDGE_ATTEMPTS: u8 = 3;

/// The replicas of each workload that have no node (the ordinals the leader would give them).
fn unplaced(s: &cloudless_consensus::state::State) -> BTreeSet<ReplicaId> {
    let mut out = BTreeSet::new();
    for (name, w) in s.workloads() {
        let used: BTreeSet<u32> = s.assigned_of(name).map(|(r, _)| r.index).collect();
        let missing = (w.spec.replicas as usize).saturating_sub(used.len());
        out.extend(
            (0..).filter(|i| !used.contains(i)).take(missing).map(|i| ReplicaId::new(name, i)),
        );
    }
    out
}

/// A nudge's outcome: the node, the generation named, the tries so far, whether it arrived.
type Nudged = (NodeName, u64, u8, bool);

/// Starts nudges from `pending` while fewer than [`MAX_NUDGES`] are in flight.
fn send_nudges(
    api: &Api,
    nudges: &mut JoinSet<Nudged>,
    pending: &mut BTreeMap<NodeName, (u64, u8)>,
) {
    while nudges.len() < MAX_NUDGES
        && let Some((node, (generation, tries))) = pending.pop_first()
    {
        let peers = api.peers().clone();
        nudges.spawn(async move {
            let ok = peers.node(&node, Nudge { generation }, NUDGE_TIMEOUT).await.is_ok();
            (node, generation, tries + 1, ok)
        });
    }
}

/// Runs the placer until `cancel`.
pub async fn run(
    api: Arc<Api>,
    publish: watch::Sender<Arc<Unschedulable>>,
    cancel: CancellationToken,
) {
    let facts = api.facts().clone();
    let mut views = facts.view.clone();
    let mut applied = None;
    // When this leader first saw each replica without a node: placement latency is measured
    // from there to the committed assignment.
    let mut waiting: BTreeMap<ReplicaId, Instant> = BTreeMap::new();
    // Workloads the last round could not place.
    let mut stuck: BTreeSet<WorkloadName> = BTreeSet::new();
    let mut nudges: JoinSet<Nudged> = JoinSet::new();
    // Nodes to nudge (with the generation to name and the tries so far), and the applied
    // count up to which changed generations were collected. Bounded by the enrolled nodes.
    let mut pending: BTreeMap<NodeName, (u64, u8)> = BTreeMap::new();
    let mut seen: u64 = 0;
    // The inputs of the last round, when it had nothing to change, and when time alone
    // would change its answer: a round with the same inputs is not run again before then
    // (an idle leader's work does not grow with the pool).
    let mut rested: Option<(Option<u64>, Arc<crate::view::View>, Option<Instant>)> = None;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            a = facts.consensus.applied_after(applied, EVERY) => applied = a,
            r = views.changed() => if r.is_err() { break },
        }
        while let Some(done) = nudges.try_join_next() {
            if let Ok((node, generation, tries, false)) = done
                && tries < NUDGE_ATTEMPTS
            {
                // A newer change of the same node keeps its own (newer) generation.
                pending.entry(node).or_insert((generation, tries));
            }
        }
        if !facts.consensus.is_leader() {
            waiting.clear();
            // A leader again later nudges every node once: another leader may have changed
            // lists meanwhile (a node holding the generation named does not even ask).
            pending.clear();
            seen = 0;
            rested = None;
            continue;
        }
        // Nudges waiting for a slot (or tried again) go out whether or not the round runs.
        send_nudges(&api, &mut nudges, &mut pending);
        let view = facts.view();
        let now = Instant::now();
        let same = rested.as_ref().is_some_and(|(a, v, wake)| {
            *a == applied && Arc::ptr_eq(v, &view) && wake.is_none_or(|t| now < t)
        });
        if same {
            continue;
        }
        let scheduler = &facts.scheduler;
        let read = facts
            .consensus
            .read(Consistency::Stale, |s| {
                let round = round::round(s, &view, scheduler, now);
                // A command the state would refuse is not proposed: it would cost an entry
                // and wake this loop at once to make it again.
                let refused = round.command.as_ref().and_then(|c| {
                    let req = Request {
                        client: 0,
                        serial: 0,
                        actor: Actor::System,
                        time_ms: cloudless_types::now_ms(),
                        command: c.clone(),
                        proof: None,
                    };
                    s.precheck(&req).err()
                });
                let changed: Vec<(NodeName, u64)> =
                    s.assignments_changed_since(seen).map(|(n, g)| (n.clone(), g)).collect();
                (round, unplaced(s), refused, changed, s.applied())
            })
            .await;
        let Ok((mut round, unplaced, refused, changed, now_applied)) = read else { continue };
        seen = now_applied;
        for (node, generation) in changed {
            if node != facts.name {
                pending.insert(node, (generation, 0));
            }
        }
        send_nudges(&api, &mut nudges, &mut pending);
        if let Some(e) = refused {
            warn!(error = %e, "the round's placement changes would be refused; not proposing them");
            round.command = None;
        }
        // Replicas placed elsewhere meanwhile, deleted or scaled away wait no more.
        waiting.retain(|k, _| unplaced.contains(k));
        for r in unplaced {
            waiting.entry(r).or_insert(now);
        }
        // Counted when a workload becomes unschedulable, not again every round it stays so.
        let now_stuck: BTreeSet<WorkloadName> = round.unschedulable.keys().cloned().collect();
        let newly = now_stuck.difference(&stuck).count() as u64;
        if newly > 0 {
            facts.metrics.decision("unschedulable", newly);
        }
        stuck = now_stuck;
        for (workload, why) in &round.unschedulable {
            debug!(%workload, why, "unschedulable");
        }
        if **publish.borrow() != round.unschedulable {
            publish.send_replace(Arc::new(round.unschedulable.clone()));
        }
        rested = round.command.is_none().then(|| (applied, view.clone(), round.wake_at));
        let Some(command) = round.command else { continue };
        let starts: Vec<ReplicaId> = match &command {
            Command::Assign { changes, .. } => changes
                .iter()
                .filter_map(|c| match c {
                    Change::Start { replica, .. } => Some(replica.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if let Command::Assign { epoch, changes } = &command {
            debug!(epoch, ?changes, "proposing placement changes");
        }
        match facts.consensus.propose(Actor::System, command).await {
            Ok(Ok(_)) => {
                facts.metrics.decision("placed", round.placed as u64);
                facts.metrics.decision("moved", round.moved as u64);
                for r in &starts {
                    if let Some(since) = waiting.remove(r) {
                        facts.metrics.placement_latency(since.elapsed().as_secs_f64());
                    }
                }
                // The nodes it changed are nudged when this loop wakes for the applied entry.
            }
            Ok(Err(e)) => debug!(error = %e, "assignment refused"),
            Err(e) => debug!(error = %e, "assignment not committed"),
        }
    }
    nudges.abort_all();
}
