//! The view loop: keeps this node's [`View`] of the pool from the mesh's events and publishes
//! it; reads the mesh's full state only at start and after events were lost. The gauges
//! loop keeps the node's gauges (members, replicas, raft) current, apart, so that a slow
//! container engine never holds up the view.
//!
//! ```text
//!   mesh::Event ──▶ said in the log (joined, failed, left, first capacity)
//!               ──▶ View::apply ──▶ liveness changed? publish now : publish within 100 ms
//!   Event::Lagged ──▶ members() + directory() once ──▶ View::from_snapshot ──▶ publish
//!   gauges, every second: the published view, the runtimes, raft ──▶ metrics
//! ```
//!
//! Nothing here runs on the swarm task: the mesh only sends events; decoding and bookkeeping
//! happen here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_mesh::{Event, identity, membership};
use cloudless_runtime::{Driver, RunState};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::api::read::state_word;
use crate::facts::Facts;
use crate::view::View;

/// Longest a change other than liveness (capacity, directory, addresses) waits before it is
/// published: it batches the bursts that floods bring, and is far below what a placement on
/// new capacity needs.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// Events applied before a publish is considered, so a burst costs one publish.
const BURST: usize = 1024;

/// Reads the mesh's whole state.
async fn snapshot(facts: &Facts, previous: &View) -> View {
    let members = facts.mesh.members().await.unwrap_or_default();
    let directory = facts.mesh.directory().await.unwrap_or_default();
    let listen = facts.mesh.listen_addrs().await.unwrap_or_default();
    View::from_snapshot(&facts.name, &members, &directory, listen, previous, Instant::now())
}

/// Runs the view loop until `cancel` or until the mesh stops.
pub async fn run(
    facts: Arc<Facts>,
    mut events: mpsc::Receiver<Event>,
    publish: watch::Sender<Arc<View>>,
    cancel: CancellationToken,
) {
    let mut view = snapshot(&facts, &View::default()).await;
    publish.send_replace(Arc::new(view.clone()));
    let mut dirty_since: Option<Instant> = None;
    loop {
        let flush_at = dirty_since.map(|t| t + PUBLISH_EVERY);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            e = events.recv() => {
                let Some(first) = e else { break };
                let mut lagged = false;
                let mut liveness = false;
                let mut any = false;
                let now = Instant::now();
                let mut next = Some(first);
                let mut n = 0;
                while let Some(e) = next.take() {
                    if let Event::Lagged { dropped } = e {
                        debug!(dropped, "mesh events were lost; reading the mesh again");
                        lagged = true;
                    }
                    if let Event::NotEnrolled { peer } = &e {
                        debug!(%peer, "a member announced a peer the gate does not know");
                        facts.gate_hint.notify_one();
                    }
                    if say(&view, &e) {
                        facts.metrics.member_failed();
                    }
                    let c = view.apply(&e, now);
                    liveness |= c.liveness;
                    any |= c.any;
                    n += 1;
                    if n < BURST {
                        next = events.try_recv().ok();
                    }
                }
                if lagged {
                    view = snapshot(&facts, &view).await;
                    liveness = true;
                }
                if any && dirty_since.is_none() {
                    dirty_since = Some(now);
                }
                // Liveness at once; anything else at most PUBLISH_EVERY late, even while
                // events keep coming.
                let due =
                    dirty_since.is_some_and(|t| now.saturating_duration_since(t) >= PUBLISH_EVERY);
                if liveness || due {
                    publish.send_replace(Arc::new(view.clone()));
                    dirty_since = None;
                }
            }
            () = sleep_until(flush_at), if flush_at.is_some() => {
                publish.send_replace(Arc::new(view.clone()));
                dirty_since = None;
            }
        }
    }
}

/// Logs what an operator watches a pool for (as Serf and Consul do): a member joining,
/// coming back, failing or leaving, and the first capacity it is seen with (from then on it
/// can be given work). Said before `view` applies `e`; a suspicion is only a debug line,
/// since most are refuted. True when `e` is a member failing (for the failures counter).
fn say(view: &View, e: &Event) -> bool {
    match e {
        Event::Member(membership::Event::State { id, state, incarnation, .. }) => {
            let before = view.peers.get(&identity::node_name(id)).map(|p| p.state);
            if before == Some(*state) {
                return false;
            }
            match state {
                membership::State::Alive if before == Some(membership::State::Suspect) => {
                    debug!(peer = %id, incarnation, "member refuted a suspicion");
                }
                membership::State::Alive if before.is_none() => {
                    info!(peer = %id, incarnation, "member joined");
                }
                membership::State::Alive => info!(peer = %id, incarnation, "member is back"),
                membership::State::Suspect => debug!(peer = %id, incarnation, "member suspected"),
                membership::State::Dead => {
                    info!(peer = %id, incarnation, "member failed");
                    return true;
                }
                membership::State::Left => info!(peer = %id, incarnation, "member left"),
            }
        }
        Event::Member(membership::Event::Capacity { id, .. }) => {
            let first =
                view.peers.get(&identity::node_name(id)).is_some_and(|p| p.capacity.is_none());
            if first {
                info!(peer = %id, "first capacity of member seen");
            }
        }
        _ => {}
    }
    false
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Keeps the gauges current until `cancel`.
pub async fn gauges(facts: Arc<Facts>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGES_EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => set_gauges(&facts, &facts.view()).await,
        }
    }
}

/// Members by state, what the runtimes hold (a stopped replica is counted out when it has
/// stopped, not when it was asked to), and raft's figures.
async fn set_gauges(facts: &Facts, view: &View) {
    for state in [
        membership::State::Alive,
        membership::State::Suspect,
        membership::State::Dead,
        membership::State::Left,
    ] {
        let n = i64::try_from(view.count(state)).unwrap_or(i64::MAX);
        facts.metrics.set_members(state_word(state), n);
    }
    if let Ok(stats) = facts.mesh.directory_stats().await {
        facts.metrics.set_directory_entries(stats.entries);
    }
    let mut held = facts.wasi.list().await.unwrap_or_default();
    if let Some(c) = &facts.containers {
        held.extend(c.list().await.unwrap_or_default());
    }
    let running = held.iter().filter(|o| matches!(o.state, RunState::Running { .. })).count();
    let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    facts.metrics.set_replicas("running", to_i64(running));
    facts.metrics.set_replicas("exited", to_i64(held.len() - running));
    let raft = facts.consensus.raft().metrics().borrow().clone();
    facts.metrics.set_raft(
        raft.current_term,
        raft.last_applied.map_or(0, |l| l.index),
        facts.consensus.is_leader(),
        facts.consensus.voters().len(),
    );
}
