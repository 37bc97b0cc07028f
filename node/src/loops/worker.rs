//! The worker: what this node runs. The agent loop pulls this node's assignments and hands
//! them to the runtime; the report loop sends status changes to raft; the keeper keeps, on
//! raft members, a copy of every module a workload names.
//!
//! ```text
//!   agent (nudged with a newer generation, new entries on members, else every 5 s):
//!        trusted member? own state : the leader that nudged │ a member
//!        ── Assigned{known} ──▶ not modified │ [Assignment] of a newer generation
//!        ──▶ every spec validated again ──▶ modules fetched from peers (hash checked)
//!        ──▶ runtime Agent::set_desired
//!   report: runtime Status ──(20 ms batch)──▶ Report ──▶ own handler │ a member
//!   keeper (members, every second): modules named by workloads and missing here ──▶ fetched
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cloudless_api::node::{Assigned, AssignedList, ModuleChunk, Report};
use cloudless_api::{ApiError, MAX_MODULE, ReplicaStatus};
use cloudless_consensus::Consistency;
use cloudless_runtime::{Agent, ReplicaSpec, Status};
use cloudless_types::{Image, ModuleHash, NodeName, ReplicaId, now_ms};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::{Api, Nudged};
use crate::peers::CALL_TIMEOUT;

/// How often a node asks for its assignments when nothing told it they changed. The leader
/// nudges every node whose list changes (raft members also wake on each applied entry), so
/// this only catches a lost nudge or a new leader's first moments; asking costs the member
/// one lookup while the list is unchanged ("not modified").
const AGENT_EVERY: Duration = Duration::from_secs(5);
/// One ask in this many takes the whole list whatever generation it names (about once a
/// minute at idle): generations restart lower after a forced recovery.
const WHOLE_EVERY: u32 = 12;
/// How soon a node asks again while a module of its list could not be fetched yet.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Status changes arriving within this long of the first go to raft in one report: replicas
/// starting together are reported together, and a lone change waits little.
const REPORT_EVERY: Duration = Duration::from_millis(20);
/// How often raft members check they hold every module a workload names.
const KEEP_EVERY: Duration = Duration::from_secs(1);

/// This node's assignments, from the best source it has, unless it holds generation `known`.
/// `named` is the generation a nudge from `nudger` announced.
async fn assignments(
    api: &Api,
    nudger: Option<cloudless_types::NodeName>,
    named: Option<u64>,
    known: Option<u64>,
) -> Result<AssignedList, ApiError> {
    let facts = api.facts();
    // A raft member answers itself, and so runs as soon as it applies new assignments.
    if facts.trusts_own_state() {
        let own = api.assigned(&facts.name, known).await;
        if nudger.is_none() || answers_nudge(&own, named) {
            return own;
        }
        debug!(?named, "own state is behind the nudge: asking the leader that sent it");
    }
    let ask = Assigned { known };
    // After a nudge, ask the leader that sent it: it has applied the change, a follower may
    // not have yet (and would answer with the old assignments until the next poll).
    if let Some(leader) = nudger
        && let Ok(list) = api.peers().node(&leader, ask, CALL_TIMEOUT).await
    {
        return Ok(list);
    }
    api.peers().node_to_member(ask).await
}

/// Whether this member's own answer is as new as the generation a nudge announced (`named`).
/// A member trusts its state for `leader_silence` after the last append it accepted; one the
/// leader has just stopped replicating to (a voter replaced while it was down, which never
/// hears of its removal) would otherwise answer from before the change and run nothing new
/// until its next poll, seconds later.
fn answers_nudge(own: &Result<AssignedList, ApiError>, named: Option<u64>) -> bool {
    match (own, named) {
        (Ok(list), Some(g)) => list.generation >= g,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    }
}

/// Pulls this node's assignments and hands them to the runtime, until `cancel`.
pub async fn agent(
    api: Arc<Api>,
    agent: Agent,
    mut nudges: watch::Receiver<Nudged>,
    runs: watch::Sender<Arc<Runs>>,
    cancel: CancellationToken,
) {
    let facts = api.facts().clone();
    let mut last: Option<Vec<ReplicaSpec>> = None;
    let mut applied = None;
    // The count of the last nudge acted on: a newer one names the leader to ask first.
    let mut nudged = nudges.borrow().count;
    // The generation of the list handed to the runtime, and whether all of it could be
    // (every module fetched): only a complete list is not asked for again.
    let mut held: u64 = 0;
    let mut complete = false;
    let mut asks: u32 = 0;
    loop {
        let (nudger, named) = {
            let n = nudges.borrow_and_update();
            let fresh = n.count != nudged;
            nudged = n.count;
            if fresh { (n.by.clone(), Some(n.generation)) } else { (None, None) }
        };
        // Every WHOLE_EVERY-th ask takes the list whatever its generation: after a forced
        // recovery (`cloudless recover`) the pool's generations may restart below the one
        // held, and this is how a node notices.
        asks = asks.wrapping_add(1);
        let whole = asks.is_multiple_of(WHOLE_EVERY);
        let known = (complete && !whole).then_some(held);
        let skip = complete && !whole && named.is_some_and(|g| g <= held);
        let answer = if skip {
            Ok(AssignedList::default())
        } else {
            assignments(&api, nudger, named, known).await
        };
        match answer {
            // Not modified, or a member that lags behind the list held: nothing to do.
            Ok(AssignedList { assignments: None, .. }) => {}
            Ok(AssignedList { generation, .. }) if !whole && generation < held => {}
            Ok(AssignedList { generation, assignments: Some(list) }) => {
                held = generation;
                complete = true;
                let mut specs = Vec::new();
                let mut mine: Runs = BTreeMap::new();
                for a in list {
                    // Whoever answered, the spec must hold before anything of it runs.
                    if let Err(e) = a.spec.validate() {
                        warn!(workload = %a.spec.name, error = %e, "refusing an invalid spec");
                        continue;
                    }
                    if let Image::Wasi(hash) = &a.spec.image
                        && !facts.wasi.has_module(hash)
                        && let Err(e) = fetch_module(&api, hash).await
                    {
                        warn!(module = %hash, error = %e, "cannot fetch module yet");
                        complete = false;
                        continue;
                    }
                    specs.extend(a.indexes.iter().map(|i| ReplicaSpec::from_workload(&a.spec, *i)));
                    mine.extend(
                        a.indexes
                            .iter()
                            .map(|i| (ReplicaId::new(&a.spec.name, *i), !a.leaving.contains(i))),
                    );
                }
                let cpu: u64 = specs.iter().map(|r| u64::from(r.cpu_millis)).sum();
                facts
                    .metrics
                    .set_cpu_utilization(cpu as f64 / f64::from(facts.offer.cpu_millis.max(1)));
                // The report loop learns what this node runs before the runtime hears of it.
                if **runs.borrow() != mine {
                    runs.send_replace(Arc::new(mine));
                }
                if last.as_ref() != Some(&specs) {
                    if agent.set_desired(specs.clone()).await.is_err() {
                        return;
                    }
                    last = Some(specs);
                }
            }
            Err(e) => debug!(error = %e, "cannot learn assignments yet"),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            a = facts.consensus.applied_after(
                applied,
                if complete { AGENT_EVERY } else { RETRY_EVERY },
            ) => applied = a,
            r = nudges.changed() => if r.is_err() { break },
        }
    }
}

/// Deadline of one module chunk: a 1 MiB chunk crosses a slow home uplink in about a second;
/// a peer that does not answer in this long is skipped for the next.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(4);

/// Fetches a module from a live peer that has it, chunk by chunk, checking its size as it
/// comes and its hash at the end. Raft members first: they keep a copy of every module a
/// workload names, and are the steadiest devices (a worker the pool just lost may still look
/// alive here for a moment).
pub async fn fetch_module(api: &Api, hash: &ModuleHash) -> Result<(), String> {
    let facts = api.facts();
    let view = facts.view();
    let alive: Vec<&NodeName> = view.alive_except(&facts.name).collect();
    let members = facts.members_to_ask();
    let mut order: Vec<&NodeName> = members.iter().filter(|m| alive.contains(m)).collect();
    order.extend(alive.iter().copied().filter(|p| !members.contains(p)));
    for peer in order {
        let mut bytes = Vec::new();
        loop {
            let req = ModuleChunk { hash: hash.clone(), offset: bytes.len() as u64 };
            match api.peers().node(peer, req, CHUNK_TIMEOUT).await {
                Ok(c) if c.total <= MAX_MODULE && c.total > 0 => {
                    let have = bytes.len() as u64;
                    if c.bytes.is_empty() || have.saturating_add(c.bytes.len() as u64) > c.total {
                        break;
                    }
                    bytes.extend_from_slice(&c.bytes);
                    if bytes.len() as u64 == c.total {
                        let stored = facts.wasi.store_module(&bytes).map_err(|e| e.to_string())?;
                        if stored == *hash {
                            return Ok(());
                        }
                        warn!(%peer, module = %hash, "a peer sent a module that does not match its hash");
                        break;
                    }
                }
                _ => break,
            }
        }
    }
    Err("no peer has it".into())
}

/// The replicas a node runs: `true` for its own, `false` for those it hands over (it runs
/// them until their new host's copy runs, and the new host speaks for them).
pub type Runs = BTreeMap<ReplicaId, bool>;

/// Longest wait before a report that was not recorded is sent again.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Sends status changes to raft, batched, until `cancel` (the batch in flight is sent first).
/// It keeps each replica's latest status: what was not recorded (no member reachable, a
/// leader election) is sent again, with backoff, and a replica this node takes over (a move
/// reverted to it) gets its status sent again, since the runtime reports only changes. Only
/// replicas the node owns are reported: it runs the ones moving away only until their new
/// host's replica runs, and the new host speaks for them.
pub async fn report(
    api: Arc<Api>,
    mut statuses: mpsc::Receiver<Status>,
    mut runs: watch::Receiver<Arc<Runs>>,
    cancel: CancellationToken,
) {
    let facts = api.facts().clone();
    let mut latest: BTreeMap<ReplicaId, ReplicaStatus> = BTreeMap::new();
    let mut unsent: BTreeSet<ReplicaId> = BTreeSet::new();
    let mut mine: Arc<Runs> = runs.borrow().clone();
    let mut backoff = REPORT_EVERY;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let take =
            |s: Status, latest: &mut BTreeMap<_, _>, unsent: &mut BTreeSet<_>, mine: &Runs| {
                let status = ReplicaStatus {
                    node: facts.name.clone(),
                    phase: s.phase.bounded(),
                    restarts: s.restarts,
                    at_ms: now_ms(),
                };
                if mine.get(&s.id) == Some(&true) {
                    unsent.insert(s.id.clone());
                }
                latest.insert(s.id, status);
            };
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = runs.changed() => {
                if r.is_err() {
                    break;
                }
                let now: Arc<Runs> = runs.borrow_and_update().clone();
                // Newly owned replicas (a move reverted to this node): their last status
                // counts now.
                unsent.extend(
                    now.iter()
                        .filter(|(r, own)| **own && mine.get(*r) != Some(&true))
                        .filter(|(r, _)| latest.contains_key(*r))
                        .map(|(r, _)| r.clone()),
                );
                // Statuses of what it ran until now are kept one change longer (a replica
                // being stopped reports its end), then dropped: the map stays as small as
                // what the node runs.
                latest.retain(|r, _| now.contains_key(r) || mine.contains_key(r));
                unsent.retain(|r| now.get(r) == Some(&true));
                mine = now;
            }
            s = statuses.recv() => match s {
                Some(s) => {
                    take(s, &mut latest, &mut unsent, &mine);
                    // Changes arriving together are reported together.
                    let deadline = tokio::time::Instant::now() + REPORT_EVERY;
                    while let Ok(Some(s)) = tokio::time::timeout_at(deadline, statuses.recv()).await {
                        take(s, &mut latest, &mut unsent, &mine);
                    }
                }
                None => break,
            },
            () = sleep_until(retry_at), if retry_at.is_some() => {}
        }
        if unsent.is_empty() || retry_at.is_some_and(|t| tokio::time::Instant::now() < t) {
            continue;
        }
        let batch: Vec<(ReplicaId, ReplicaStatus)> =
            unsent.iter().filter_map(|r| latest.get(r).map(|s| (r.clone(), s.clone()))).collect();
        let sent: Vec<(ReplicaId, ReplicaStatus)> = batch.clone();
        let report = Report(batch);
        let result = if facts.trusts_own_state() {
            api.report(&facts.name, report).await
        } else {
            api.peers().node_to_member(report).await
        };
        match result {
            Ok(_) => {
                // What changed while this report was in flight stays to be sent.
                for (r, s) in sent {
                    if latest.get(&r) == Some(&s) {
                        unsent.remove(&r);
                    }
                }
                backoff = REPORT_EVERY;
                retry_at = None;
            }
            Err(e) => {
                debug!(error = %e, "status report not recorded; it is sent again");
                backoff = (backoff * 2).min(RETRY_MAX);
                retry_at = Some(tokio::time::Instant::now() + backoff);
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// On raft members: keep a copy of every WASI module a workload names, so a module outlives
/// the node it was uploaded to and the nodes that ran it. Runs until `cancel`.
pub async fn keeper(api: Arc<Api>, cancel: CancellationToken) {
    let facts = api.facts().clone();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(KEEP_EVERY) => {}
        }
        if !facts.consensus.is_member() {
            continue;
        }
        let wanted: Vec<ModuleHash> = facts
            .consensus
            .read(Consistency::Stale, |s| {
                s.workloads()
                    .values()
                    .filter_map(|w| match &w.spec.image {
                        Image::Wasi(h) => Some(h.clone()),
                        Image::Container(_) => None,
                    })
                    .collect()
            })
            .await
            .unwrap_or_default();
        for hash in wanted {
            if !facts.wasi.has_module(&hash)
                && let Err(e) = fetch_module(&api, &hash).await
            {
                debug!(module = %hash, error = e, "cannot keep a copy of a module yet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(generation: u64) -> Result<AssignedList, ApiError> {
        Ok(AssignedList { generation, assignments: None })
    }

    #[test]
    fn own_state_behind_a_nudge_does_not_answer_it() {
        // The leader announced generation 7; a member still at 5 must ask the leader.
        assert!(!answers_nudge(&list(5), Some(7)));
        assert!(answers_nudge(&list(7), Some(7)));
        assert!(answers_nudge(&list(9), Some(7)));
        // No nudge: own state is the answer.
        assert!(answers_nudge(&list(0), None));
        let refused: Result<AssignedList, ApiError> =
            Err(ApiError::new(cloudless_api::ErrorKind::Unavailable, "no leader heard"));
        assert!(!answers_nudge(&refused, Some(1)));
    }
}
