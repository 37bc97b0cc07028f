//! Who votes: a pure function from the current voters and the candidates to the next step.
//!
//! The leader keeps the voter set at its target size: 1 voter below 3 eligible peers, 3 below
//! 7, 5 from 7 on (or the size the settings fix). Healthy voters are kept (no churn for a
//! slightly more stable newcomer); dead, flapping or no longer eligible ones are replaced by
//! the most stable eligible peers. A newcomer first joins as a learner and becomes a voter
//! only once it has caught up with the log, so the group never waits on a voter that cannot
//! vote yet. Phones are never eligible unless the settings allow it (the caller decides
//! eligibility).

use std::collections::BTreeSet;

use crate::{Member, NodeId};

/// A peer that might vote, as the node sees it right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Its raft id.
    pub id: NodeId,
    /// How to reach it.
    pub member: Member,
    /// Alive in the membership view (not suspect, dead or gone).
    pub alive: bool,
    /// Allowed to vote: enrolled with the voter role, not revoked, not a phone (unless phones
    /// may vote), not flapping.
    pub eligible: bool,
    /// Higher is more stable: uptime, public reachability, mains power, device class.
    pub stability: f64,
}

/// What the leader should do next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Peers to add as learners (they will be promoted once caught up).
    pub add_learners: Vec<(NodeId, Member)>,
    /// The new voter set, when it should change now.
    pub voters: Option<BTreeSet<NodeId>>,
    /// Learners no longer wanted.
    pub remove_learners: BTreeSet<NodeId>,
}

impl Plan {
    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.add_learners.is_empty() && self.voters.is_none() && self.remove_learners.is_empty()
    }
}

/// The voter count for `eligible` eligible peers, or the configured one (never more than
/// there are eligible peers, never fewer than one).
pub fn target(eligible: usize, configured: Option<u8>) -> usize {
    if let Some(t) = configured {
        return usize::from(t).min(eligible).max(1);
    }
    match eligible {
        0..=2 => 1,
        3..=6 => 3,
        _ => 5,
    }
}

/// The next step from the current `voters` and `learners` (`caught_up` are the learners close
/// enough to the leader's log) towards the best voter set among `candidates`.
pub fn plan(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    caught_up: &BTreeSet<NodeId>,
    candidates: &[Candidate],
    configured: Option<u8>,
) -> Plan {
    let usable: Vec<&Candidate> = candidates.iter().filter(|c| c.alive && c.eligible).collect();
    let t = target(usable.len(), configured);
    let mut ranked = usable.clone();
    // Most stable first; the id breaks ties so every leader decides alike.
    ranked.sort_by(|a, b| b.stability.total_cmp(&a.stability).then(a.id.cmp(&b.id)));
    let mut desired: Vec<&Candidate> =
        ranked.iter().copied().filter(|c| voters.contains(&c.id)).take(t).collect();
    for c in &ranked {
        if desired.len() >= t {
            break;
        }
        if !desired.iter().any(|d| d.id == c.id) {
            desired.push(c);
        }
    }
    let mut plan = Plan::default();
    // Newcomers must catch up as learners first.
    let ready: BTreeSet<NodeId> = desired
        .iter()
        .filter(|c| voters.contains(&c.id) || caught_up.contains(&c.id))
        .map(|c| c.id)
        .collect();
    for c in &desired {
        if !voters.contains(&c.id) && !learners.contains(&c.id) {
            plan.add_learners.push((c.id, c.member.clone()));
        }
    }
    // Change the voters when the ready part of the desired set differs from them, and the
    // change neither empties the group nor shrinks it just because newcomers are not ready.
    let keeps_every_healthy_voter =
        voters.iter().all(|v| ready.contains(v) || !usable.iter().any(|c| c.id == *v));
    if !ready.is_empty() && ready != *voters && keeps_every_healthy_voter {
        plan.voters = Some(ready.clone());
    }
    let wanted: BTreeSet<NodeId> = desired.iter().map(|c| c.id).collect();
    plan.remove_learners = learners.iter().filter(|l| !wanted.contains(l)).copied().collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: NodeId, stability: f64) -> Candidate {
        Candidate {
            id,
            member: Member { peer: format!("p{id}") },
            alive: true,
            eligible: true,
            stability,
        }
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn target_sizes() {
        assert_eq!([0, 1, 2, 3, 6, 7, 100].map(|n| target(n, None)), [1, 1, 1, 3, 3, 5, 5]);
        assert_eq!(target(2, Some(5)), 2);
        assert_eq!(target(10, Some(3)), 3);
    }

    #[test]
    fn grows_through_learners_then_promotes_the_most_stable() {
        let cands: Vec<Candidate> = (1..=4).map(|i| cand(i, i as f64)).collect();
        // One voter (node 1), four eligible: target 3 → the two most stable others, as
        // learners first.
        let p = plan(&set(&[1]), &set(&[]), &set(&[]), &cands, None);
        assert_eq!(p.add_learners.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4, 3]);
        assert_eq!(p.voters, None, "not before they catch up");
        let p = plan(&set(&[1]), &set(&[3, 4]), &set(&[3, 4]), &cands, None);
        assert_eq!(p.voters, Some(set(&[1, 3, 4])));
        assert!(p.add_learners.is_empty());
    }

    #[test]
    fn replaces_a_dead_voter_and_keeps_healthy_ones() {
        let mut cands: Vec<Candidate> = (1..=5).map(|i| cand(i, i as f64)).collect();
        cands[4].alive = false; // node 5, a voter, died
        let voters = set(&[1, 2, 5]);
        let p = plan(&voters, &set(&[]), &set(&[]), &cands, None);
        // Healthy voters 1 and 2 stay even though 3 and 4 are more stable; 4 replaces 5.
        assert_eq!(p.add_learners.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4]);
        // The dead voter is dropped now; the replacement joins once caught up.
        assert_eq!(p.voters, Some(set(&[1, 2])));
        let p = plan(&set(&[1, 2]), &set(&[4]), &set(&[4]), &cands, None);
        assert_eq!(p.voters, Some(set(&[1, 2, 4])));
    }

    #[test]
    fn ineligible_peers_never_vote_and_stale_learners_go() {
        let mut cands: Vec<Candidate> = (1..=3).map(|i| cand(i, i as f64)).collect();
        cands[2].eligible = false; // a phone
        let p = plan(&set(&[1]), &set(&[3]), &set(&[3]), &cands, None);
        assert_eq!(p.remove_learners, set(&[3]));
        assert!(p.voters.is_none(), "two eligible peers: one voter");
    }

    #[test]
    fn never_empties_the_group() {
        let cands: Vec<Candidate> =
            (1..=3).map(|i| Candidate { alive: false, ..cand(i, 1.0) }).collect();
        let p = plan(&set(&[1, 2, 3]), &set(&[]), &set(&[]), &cands, None);
        assert_eq!(p.voters, None);
    }
}
