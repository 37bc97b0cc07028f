//! The gatekeeper: the one writer of the enrollment gate and of the voters this node learned.
//! Raft members that trust their own state take both from it; other nodes ask a member.
//!
//! ```text
//!   every 500 ms, or at once when woken (this node enrolled or committed an enrollment, or
//!   the mesh heard of a peer the gate does not know):
//!                ── trusted member? ── own state: enrolled, revoked ─┐ voters from raft
//!                └─ else (every 2 s, when woken, and every 500 ms while it knows nobody):
//!                   NodeRequest::Enrolled{known} to a member ───────┴▶ merged (changes since
//!                                                                     known) ▶ GateWriter::set,
//!                   voters ──▶ watch (peers, api, readiness)        ▶ newly revoked: the mesh
//!                          └─▶ <data>/group (whom to believe after a restart)   closes their connections
//! ```
//!
//! A voter the group replaced while it was down holds off standing for election once the
//! members' voter list leaves it out (without pre-vote its campaigns with a stale log would
//! unseat the real leader), and stands again once it hears a leader.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use cloudless_api::node::Enrolled;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::Api;
use crate::facts::Group;
use crate::gate::GateWriter;

/// How often the gate is refreshed on raft members (from their own state), and on other nodes
/// while they know nobody.
const EVERY: Duration = Duration::from_millis(500);
/// Other nodes ask a member this many ticks apart (2 s): a newly enrolled peer waits that long
/// at most to be let into the membership by them.
const ASK_TICKS: u64 = 4;
/// A node the cluster keeps refusing warns this many ticks apart (30 s).
const WARN_TICKS: u64 = 60;
/// When a refresh it was woken for by an enrollment (this device's, or one this member
/// committed) changed nothing (the member asked had not applied it yet: a follower learns a
/// commit with the leader's next message, within a heartbeat of 100 ms), the gatekeeper
/// asks again this much later, up to [`FOLLOW_UPS`] times. A mesh hint gets no follow-ups:
/// a member announcing made-up peers would otherwise cost four asks per hint.
const FOLLOW_UP: Duration = Duration::from_millis(150);
/// Asks again after a woken refresh that changed nothing.
const FOLLOW_UPS: u8 = 3;

/// One ask in this many takes the whole lists (about once a minute): generations restart
/// lower after a forced recovery, and changes since a generation from another history would
/// miss nodes.
const WHOLE_EVERY: u32 = 30;

/// `known`, except on every [`WHOLE_EVERY`]-th ask (counted in `asks`): none, for the whole
/// lists.
fn whole_or(known: Option<u64>, asks: &mut u32) -> Option<u64> {
    *asks = asks.wrapping_add(1);
    if asks.is_multiple_of(WHOLE_EVERY) { None } else { known }
}

/// Runs the gatekeeper until `cancel`.
pub async fn run(
    api: Arc<Api>,
    gate: GateWriter,
    group: watch::Sender<Arc<Group>>,
    group_file: std::path::PathBuf,
    cancel: CancellationToken,
) {
    let facts = api.facts().clone();
    let mut tick: u64 = 0;
    // What the cluster said last time it refused, so a new reason is said once.
    let mut refusal = String::new();
    // Whether this node was seen in the enrolled list yet (said once, for the join's timing).
    let mut admitted = false;
    let mut woken = false;
    // Whether the wake-up was an enrollment's (it gets follow-ups), not a mesh hint.
    let mut enrolling = false;
    let mut follow_ups: u8 = 0;
    // The lists held, and their generation: members send only what changed since.
    let (mut enrolled, mut revoked) = (BTreeSet::new(), BTreeSet::new());
    let mut known: Option<u64> = None;
    let mut asks: u32 = 0;
    loop {
        // Wake-ups do not count: the periodic asks and warnings keep their pace.
        if !woken {
            tick = tick.wrapping_add(1);
        }
        let lists = if facts.trusts_own_state() {
            // Hearing a leader again means this member is back in the group.
            facts.consensus.hold_elections(false);
            api.enrolled(whole_or(known, &mut asks)).await.ok()
        } else if woken || tick.is_multiple_of(ASK_TICKS) || !facts.gate.knows_anyone() {
            match api.peers().node_to_member(Enrolled { known: whole_or(known, &mut asks) }).await {
                Ok(list) => {
                    refusal.clear();
                    // A voter replaced while it was down must not campaign with its stale log.
                    if facts.consensus.is_member() && !list.voters.is_empty() {
                        facts.consensus.hold_elections(!list.voters.contains(&facts.name));
                    }
                    Some(list)
                }
                Err(e) => {
                    // Normal for a moment while a device enrolls: each reason said once, and
                    // as a warning only if it lasts (every WARN_TICKS), not on every tick.
                    if e.message != refusal {
                        info!(reason = %e, "the cluster does not let this node in (yet)");
                        refusal.clone_from(&e.message);
                    } else if tick.is_multiple_of(WARN_TICKS) {
                        warn!(reason = %e, "the cluster still does not let this node in");
                    }
                    None
                }
            }
        } else {
            None
        };
        let mut changed = false;
        if let Some(list) = lists {
            let news = list.whole || !list.nodes.is_empty() || !list.revoked.is_empty();
            list.merge_into(&mut enrolled, &mut revoked);
            known = Some(list.generation);
            if !admitted && enrolled.contains(&facts.name) {
                admitted = true;
                info!("the cluster lets this node in");
            }
            let learned = Group { voters: list.voters, learners: list.learners };
            if !learned.voters.is_empty() && **group.borrow() != learned {
                // Kept for the next start: whom to believe before anyone answers.
                if let Err(e) = learned.save(&group_file) {
                    warn!(file = %group_file.display(), error = %e, "cannot save the raft group");
                }
                group.send_replace(Arc::new(learned));
            }
            if news && gate.set(enrolled.iter(), revoked.iter()) {
                changed = true;
                let _ = facts.mesh.recheck_gate().await;
            }
        }
        // Woken for an enrollment that did not show yet: look again shortly, a few times.
        let again = woken && enrolling && !changed && follow_ups < FOLLOW_UPS;
        follow_ups = if again { follow_ups + 1 } else { 0 };
        (woken, enrolling) = tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(if again { FOLLOW_UP } else { EVERY }) => (again, again),
            () = facts.gate_refresh.notified() => {
                follow_ups = 0;
                (true, true)
            }
            () = facts.gate_hint.notified() => (true, false),
        };
    }
}
