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
use std::time::Duration;

use cloudless_types::{DeviceClass, Power};

use crate::state::{NodeRecord, NodeRole, Settings};
use crate::{Member, NodeId};

/// Flaps (alive → suspect/dead → alive) within [`FLAP_WINDOW`] that make a peer ineligible: a
/// voter that drops out this often costs the group an election or a lost quorum each time, and
/// three in a window rules out coincidence (one reboot, one Wi-Fi roam) while still catching a
/// device on a bad link within minutes.
pub const MAX_FLAPS: u32 = 3;

/// The window over which flaps count. An hour is long enough to see a pattern on a flaky link
/// and short enough that a device that was moved to a good one can vote again the same day.
pub const FLAP_WINDOW: Duration = Duration::from_secs(3600);

/// Uptime after which a peer earns the full uptime score: a day up means it survived at
/// least one night (when laptops sleep and phones go quiet).
pub const UPTIME_SATURATION: Duration = Duration::from_secs(24 * 3600);

/// What the node has observed about a peer, from the membership view and the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Alive in the membership view (not suspect, dead or gone).
    pub alive: bool,
    /// How long it has been continuously alive.
    pub uptime: Duration,
    /// AutoNAT confirmed a public address (it can be dialled directly from anywhere).
    pub public: bool,
    /// What it runs on.
    pub power: Power,
    /// What kind of device it is.
    pub class: DeviceClass,
    /// Times it went from alive to suspect or dead and back within [`FLAP_WINDOW`].
    pub flaps: u32,
}

/// Builds the [`Candidate`] for a peer from its enrollment `record` (absent: not enrolled), what
/// the node observes, and the cluster `settings`.
///
/// Eligible: enrolled with the voter role, not revoked, not a phone unless phones may vote, and
/// fewer than [`MAX_FLAPS`] recent flaps. Stability (0–100) weighs device class most (a server
/// stays, a laptop leaves), then uptime, power and public reachability, less 10 per flap, so the
/// ranking is explainable: a day-old desktop on mains behind NAT scores 75, the same desktop
/// with a public address 85, a fresh laptop on battery 10.
pub fn assess(
    id: NodeId,
    member: Member,
    record: Option<&NodeRecord>,
    seen: &Observation,
    settings: &Settings,
) -> Candidate {
    let enrolled_voter = record.is_some_and(|r| !r.revoked && r.roles.contains(&NodeRole::Voter));
    let phone_ok = seen.class != DeviceClass::Phone || settings.phones_may_vote;
    let steady = seen.flaps < MAX_FLAPS;
    let class = match seen.class {
        DeviceClass::Server => 40.0,
        DeviceClass::Desktop => 30.0,
        DeviceClass::Gateway => 25.0,
        DeviceClass::Laptop => 10.0,
        DeviceClass::Phone => 0.0,
    };
    let uptime = 30.0 * (seen.uptime.as_secs_f64() / UPTIME_SATURATION.as_secs_f64()).min(1.0);
    let power = match seen.power {
        Power::Mains => 15.0,
        Power::Battery(_) => 0.0,
    };
    let public = if seen.public { 10.0 } else { 0.0 };
    let stability = (class + uptime + power + public - 10.0 * f64::from(seen.flaps)).max(0.0);
    Candidate {
        id,
        member,
        alive: seen.alive,
        eligible: enrolled_voter && phone_ok && steady,
        stability,
    }
}

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
            member: Member { peer: cloudless_types::NodeName::from_ed25519([id as u8; 32]) },
            alive: true,
            eligible: true,
            stability,
        }
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn seen(class: DeviceClass) -> Observation {
        Observation {
            alive: true,
            uptime: UPTIME_SATURATION,
            public: false,
            power: Power::Mains,
            class,
            flaps: 0,
        }
    }

    fn voter() -> NodeRecord {
        NodeRecord {
            roles: [NodeRole::Worker, NodeRole::Voter].into(),
            labels: Default::default(),
            revoked: false,
            enrolled_ms: 0,
            schedulable: Default::default(),
        }
    }

    fn settings(phones_may_vote: bool) -> Settings {
        Settings { name: "c".into(), root_key: [7; 32], voter_target: None, phones_may_vote }
    }

    fn judge(record: Option<&NodeRecord>, o: &Observation, s: &Settings) -> Candidate {
        assess(1, Member { peer: cloudless_types::NodeName::from_ed25519([1; 32]) }, record, o, s)
    }

    #[test]
    fn phones_vote_only_when_allowed() {
        let phone = seen(DeviceClass::Phone);
        assert!(!judge(Some(&voter()), &phone, &settings(false)).eligible);
        assert!(judge(Some(&voter()), &phone, &settings(true)).eligible);
    }

    #[test]
    fn only_enrolled_unrevoked_voters_are_eligible() {
        let o = seen(DeviceClass::Server);
        let s = settings(false);
        assert!(judge(Some(&voter()), &o, &s).eligible);
        assert!(!judge(None, &o, &s).eligible, "not enrolled");
        let revoked = NodeRecord { revoked: true, ..voter() };
        assert!(!judge(Some(&revoked), &o, &s).eligible, "revoked");
        let worker = NodeRecord { roles: [NodeRole::Worker].into(), ..voter() };
        assert!(!judge(Some(&worker), &o, &s).eligible, "no voter role");
    }

    #[test]
    fn flapping_demotes_then_disqualifies() {
        let s = settings(false);
        let steady = judge(Some(&voter()), &seen(DeviceClass::Server), &s);
        let flappy = Observation { flaps: 1, ..seen(DeviceClass::Server) };
        let flappy = judge(Some(&voter()), &flappy, &s);
        assert!(flappy.eligible && flappy.stability < steady.stability);
        let bad = Observation { flaps: MAX_FLAPS, ..seen(DeviceClass::Server) };
        assert!(!judge(Some(&voter()), &bad, &s).eligible);
    }

    #[test]
    fn ranks_servers_over_pcs_over_laptops_and_prefers_public_mains_and_uptime() {
        let s = settings(true);
        let score = |o: Observation| judge(Some(&voter()), &o, &s).stability;
        let by_class = DeviceClass::ALL.map(|c| score(seen(c)));
        assert!(by_class.windows(2).all(|w| w[0] > w[1]), "{by_class:?}");
        let base = seen(DeviceClass::Desktop);
        assert!(score(Observation { public: true, ..base.clone() }) > score(base.clone()));
        assert!(
            score(Observation { power: Power::Battery(90), ..base.clone() }) < score(base.clone())
        );
        assert!(
            score(Observation { uptime: Duration::from_secs(60), ..base.clone() }) < score(base)
        );
        // Documented examples.
        assert_eq!(score(seen(DeviceClass::Desktop)), 75.0);
        let fresh_laptop = Observation {
            uptime: Duration::ZERO,
            power: Power::Battery(50),
            ..seen(DeviceClass::Laptop)
        };
        assert_eq!(score(fresh_laptop), 10.0);
    }

    #[test]
    fn assessed_candidates_drive_the_plan() {
        // Two servers, a desktop, a laptop and a phone; phones may not vote: target 3 from
        // four eligible, and the laptop is left out.
        let s = settings(false);
        let classes = [
            DeviceClass::Laptop,
            DeviceClass::Phone,
            DeviceClass::Server,
            DeviceClass::Desktop,
            DeviceClass::Server,
        ];
        let cands: Vec<Candidate> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assess(
                    i as NodeId + 1,
                    Member { peer: cloudless_types::NodeName::from_ed25519([i as u8; 32]) },
                    Some(&voter()),
                    &seen(*c),
                    &s,
                )
            })
            .collect();
        let p = plan(&set(&[1]), &set(&[]), &set(&[]), &cands, None);
        let mut added: Vec<NodeId> = p.add_learners.iter().map(|(i, _)| *i).collect();
        added.sort();
        // Node 1 (the laptop) is a healthy voter and stays; the two servers join it.
        assert_eq!(added, vec![3, 5]);
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
