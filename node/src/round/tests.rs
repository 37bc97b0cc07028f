use std::time::{Duration, Instant};

use cloudless_api::invite::{Grant, Invite};
use cloudless_api::{ReplicaStatus, Settings};
use cloudless_consensus::state::{Actor, Request};
use cloudless_sched::place::Config;
use cloudless_types::{Capacity, ModuleHash, Power, WorkloadSpec};
use ed25519_dalek::SigningKey;

use super::*;
use crate::view::Seen;

const ADMIN: [u8; 32] = [1; 32];

/// Node `i` of the test pool.
fn n(i: usize) -> NodeName {
    NodeName::from_ed25519([i as u8 + 1; 32])
}

fn index_of(node: &NodeName) -> usize {
    (0..64).find(|i| n(*i) == *node).unwrap()
}

fn w(name: &str) -> WorkloadName {
    WorkloadName::new(name).unwrap()
}

struct Pool {
    state: State,
    serial: u64,
    now: Instant,
}

impl Pool {
    /// A cluster whose first node is `n(0)`, with `n(1)`… enrolled as workers.
    fn new(nodes: usize) -> Pool {
        let root = SigningKey::from_bytes(&[7; 32]);
        let settings = Settings {
            name: "pool".into(),
            root_key: root.verifying_key().to_bytes(),
            voter_target: None,
            phones_may_vote: false,
        };
        let mut p = Pool { state: State::new(), serial: 0, now: Instant::now() };
        p.apply(Actor::System, Command::Bootstrap { settings, admin: ADMIN, node: n(0) });
        for i in 1..nodes {
            let grant = Grant {
                roles: [NodeRole::Worker].into(),
                labels: BTreeMap::new(),
                max_uses: 1,
                expires_ms: u64::MAX,
            };
            let inv = Invite::create(&root, "pool", vec![], grant, [i as u8; 16]);
            p.apply(
                Actor::Node(n(i)),
                Command::Enroll {
                    proof: inv.claim_proof(&n(i)),
                    token: inv.token,
                    signature: inv.signature,
                    peer: n(i),
                },
            );
        }
        p
    }

    fn apply(&mut self, actor: Actor, command: Command) {
        self.serial += 1;
        let req =
            Request { client: 1, serial: self.serial, actor, time_ms: 1_000, command, proof: None };
        self.state.apply(&req).unwrap();
    }

    fn put(&mut self, spec: WorkloadSpec) {
        self.apply(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec)));
    }

    fn workload(&mut self, name: &str, replicas: u32) {
        self.put(spec(name, 500, replicas));
    }

    /// Runs a round and commits its command; returns the round.
    fn round(&mut self, view: &View) -> Round {
        let r = round(&self.state, view, &Scheduler::new(Config::default()).unwrap(), self.now);
        if let Some(c) = r.command.clone() {
            self.apply(Actor::System, c);
        }
        r
    }

    fn placement(&self) -> BTreeMap<u32, NodeName> {
        self.state.assignments().iter().map(|(k, a)| (k.index, a.node.clone())).collect()
    }

    /// Every replica whose status is running where it is assigned, as `node` reports it.
    fn report_running(&mut self) {
        let items: Vec<(ReplicaId, NodeName)> =
            self.state.assignments().iter().map(|(r, a)| (r.clone(), a.node.clone())).collect();
        for (r, node) in items {
            let status = ReplicaStatus {
                node: node.clone(),
                phase: ReplicaPhase::Running { ready: true },
                restarts: 0,
                at_ms: 1,
            };
            self.apply(Actor::Node(node), Command::Report(vec![(r, status)]));
        }
    }
}

fn spec(name: &str, cpu: u32, replicas: u32) -> WorkloadSpec {
    WorkloadSpec::new(
        w(name),
        Image::Wasi(ModuleHash::of(b"module")),
        Resources { cpu_millis: cpu, memory_mib: 64, disk_mib: 0, gpus: 0 },
        replicas,
    )
}

fn seen(state: membership::State, cpu: u32, now: Instant) -> Seen {
    Seen {
        state,
        changed: now,
        alive_since: Some(now),
        returns: Vec::new(),
        capacity: Some(Capacity {
            cpu_total_millis: cpu,
            cpu_free_millis: cpu,
            memory_total_mib: 1024,
            memory_free_mib: 1024,
            disk_total_mib: 0,
            disk_free_mib: 0,
            workloads: 0,
            power: Power::Mains,
            metered: false,
            runtimes: Runtimes::of(&[Runtime::Wasi]),
        }),
        descriptor: None,
        reached_directly: true,
    }
}

fn all_alive(count: usize, now: Instant) -> View {
    let mut v = View::default();
    for i in 0..count {
        v.peers.insert(n(i), Arc::new(seen(membership::State::Alive, 2000, now)));
    }
    v
}

/// `view` with node `i` in `state` since `ago` before `now`.
fn with(mut view: View, i: usize, state: membership::State, ago: Duration, now: Instant) -> View {
    let mut s = seen(state, 2000, now);
    s.changed = now - ago;
    view.peers.insert(n(i), Arc::new(s));
    view
}

#[test]
fn places_missing_replicas_once_and_then_rests() {
    let mut p = Pool::new(3);
    p.workload("web", 3);
    let view = all_alive(3, p.now);
    let r = p.round(&view);
    assert_eq!(r.placed, 3);
    assert_eq!(p.placement().len(), 3);
    let hosts: BTreeSet<NodeName> = p.placement().into_values().collect();
    for h in &hosts {
        assert!(p.state.assignments_generation(h) > 0, "{h}'s list changed: it is nudged");
    }
    let again = p.round(&view);
    assert_eq!(again.command, None, "nothing to change");
}

#[test]
fn replicas_of_a_dead_node_move_and_a_suspect_keeps_them() {
    let mut p = Pool::new(3);
    p.workload("web", 2);
    p.round(&all_alive(3, p.now));
    let before = p.placement();
    let victim = index_of(&before[&0]);
    let view = with(all_alive(3, p.now), victim, membership::State::Suspect, Duration::ZERO, p.now);
    assert_eq!(p.round(&view).command, None, "a suspect node keeps its replicas");
    let view = with(view, victim, membership::State::Dead, Duration::ZERO, p.now);
    let r = p.round(&view);
    assert!(r.moved >= 1, "{r:?}");
    let after = p.placement();
    assert_eq!(after.len(), 2);
    assert!(after.values().all(|node| *node != n(victim)), "{after:?}");
    for (i, node) in &before {
        if *node != n(victim) {
            assert_eq!(after[i], *node, "replicas on healthy nodes stay");
        }
    }
}

#[test]
fn unknown_unenrolled_and_revoked_nodes_get_nothing() {
    let mut p = Pool::new(2);
    p.apply(Actor::User(ADMIN), Command::Revoke { peer: n(1) });
    p.workload("web", 2);
    let mut view = all_alive(2, p.now);
    view.peers.insert(n(9), Arc::new(seen(membership::State::Alive, 2000, p.now)));
    p.round(&view);
    assert!(p.placement().values().all(|node| *node == n(0)), "{:?}", p.placement());
}

#[test]
fn what_fits_nowhere_is_reported() {
    let mut p = Pool::new(1);
    p.put(spec("huge", 64_000, 1));
    let r = p.round(&all_alive(1, p.now));
    assert!(r.command.is_none());
    assert!(r.unschedulable[&w("huge")].contains("lacks CPU"), "{:?}", r.unschedulable);
}

#[test]
fn a_cordoned_node_keeps_its_replicas_and_a_draining_one_hands_them_over() {
    let mut p = Pool::new(3);
    p.workload("web", 3);
    let view = all_alive(3, p.now);
    p.round(&view);
    let before = p.placement();
    let host = before[&0].clone();
    let set = |s| Command::SetSchedulable { peer: host.clone(), schedulable: s };
    p.apply(Actor::User(ADMIN), set(Schedulable::Cordoned));
    assert_eq!(p.round(&view).command, None, "cordoning moves nothing");
    p.workload("db", 1);
    p.round(&view);
    let db = p.state.assignments().iter().find(|(k, _)| k.workload == "db").map(|(_, a)| a);
    assert_ne!(db.map(|a| &a.node), Some(&host), "no new replica on it");
    p.apply(Actor::User(ADMIN), set(Schedulable::Draining));
    let r = p.round(&view);
    assert!(r.moved >= 1, "{r:?}");
    assert!(
        p.state.assignments().values().all(|a| a.node != host),
        "a draining node's replicas have new homes: {:?}",
        p.state.assignments()
    );
    assert!(
        p.state.runs_on(&host).count() >= 1,
        "but it keeps running them until their replacements run"
    );
    assert_eq!(p.state.assignments().len(), 4, "and every replica is placed elsewhere");
    p.report_running();
    let before = p.state.assignments_generation(&host);
    p.round(&view);
    assert!(p.state.assignments_generation(&host) > before, "released: the old host is nudged");
    assert_eq!(p.state.runs_on(&host).count(), 0, "the replacements run: the originals stop");
    p.apply(Actor::User(ADMIN), set(Schedulable::Yes));
    p.workload("cache", 3);
    p.round(&view);
    assert!(p.state.assignments().values().any(|a| a.node == host), "uncordoned: used again");
}

#[test]
fn a_drain_never_takes_a_workload_below_min_available() {
    // n0 runs all three replicas; the other nodes have room for one between them.
    let mut p = Pool::new(3);
    let mut s = spec("web", 600, 3);
    s.min_available = 2;
    p.put(s);
    let mut view = all_alive(3, p.now);
    for i in 1..3 {
        let cpu = if i == 1 { 1000 } else { 500 };
        view.peers.insert(n(i), Arc::new(seen(membership::State::Alive, cpu, p.now)));
    }
    for i in 1..3 {
        p.apply(
            Actor::User(ADMIN),
            Command::SetSchedulable { peer: n(i), schedulable: Schedulable::Cordoned },
        );
    }
    p.round(&view);
    assert!(p.placement().values().all(|node| *node == n(0)));
    for i in 1..3 {
        p.apply(
            Actor::User(ADMIN),
            Command::SetSchedulable { peer: n(i), schedulable: Schedulable::Yes },
        );
    }
    // The three run and are ready on n0.
    p.report_running();
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(0), schedulable: Schedulable::Draining },
    );
    let r = p.round(&view);
    let Some(Command::Assign { changes, .. }) = &r.command else { panic!("{r:?}") };
    let moves = changes.iter().filter(|c| matches!(c, Change::Move { .. })).count();
    let stops = changes.iter().filter(|c| matches!(c, Change::Stop { .. })).count();
    assert_eq!((moves, stops), (1, 1), "one moves, one the workload can spare stops: {changes:?}");
    let why = &r.unschedulable[&w("web")];
    assert!(why.contains("held back") && why.contains("min-available 2"), "{why}");
    // What runs never drops below two: the moved one runs on n0 until its replacement runs.
    let running = |p: &Pool| (0..3).map(|i| p.state.runs_on(&n(i)).count()).sum::<usize>();
    assert_eq!(running(&p), 3, "two on n0 (one moving away), one starting on n1");
    p.report_running();
    p.round(&view);
    assert_eq!(p.state.runs_on(&n(0)).count(), 1, "the blocked replica stays on n0");
    assert_eq!(p.state.runs_on(&n(1)).count(), 1);
}

#[test]
fn scaling_follows_the_scale_plan() {
    let mut p = Pool::new(3);
    p.workload("web", 3);
    let view = all_alive(3, p.now);
    p.round(&view);
    p.apply(Actor::User(ADMIN), Command::Scale { name: w("web"), replicas: 1 });
    assert_eq!(p.placement().len(), 3, "the state machine leaves the choice to the plan");
    let r = p.round(&view);
    assert_eq!(p.placement().len(), 1, "{r:?}");
    p.apply(Actor::User(ADMIN), Command::Scale { name: w("web"), replicas: 2 });
    p.round(&view);
    assert_eq!(p.placement().len(), 2);
    assert_eq!(p.round(&view).command, None);
}

#[test]
fn a_workload_may_wait_for_a_dead_node_to_return() {
    let mut p = Pool::new(3);
    let mut patient = spec("patient", 500, 1);
    patient.reschedule_after_secs = Some(60);
    p.put(patient);
    p.round(&all_alive(3, p.now));
    let host = index_of(&p.placement()[&0]);
    let now = p.now;
    let dead = |ago| with(all_alive(3, now), host, membership::State::Dead, ago, now);
    let waits = p.round(&dead(Duration::from_secs(59)));
    assert_eq!(waits.command, None, "dead for 59 s of 60: the replica waits");
    assert_eq!(
        waits.wake_at,
        Some(now + Duration::from_secs(1)),
        "and the leader runs the round again when the patience runs out, idle or not"
    );
    assert_eq!(p.round(&all_alive(3, now)).wake_at, None, "nothing to wait for");
    p.round(&dead(Duration::from_secs(60)));
    assert_ne!(p.placement()[&0], n(host), "after 60 s it moves");
    let now_host = index_of(&p.placement()[&0]);
    let left = with(all_alive(3, p.now), now_host, membership::State::Left, Duration::ZERO, p.now);
    p.round(&left);
    assert_ne!(p.placement()[&0], n(now_host), "a node that left is not waited for");
}

#[test]
fn a_dead_node_keeps_the_replicas_of_patient_workloads_only() {
    let mut p = Pool::new(2);
    let mut patient = spec("patient", 100, 1);
    patient.reschedule_after_secs = Some(600);
    p.put(patient);
    p.put(spec("eager", 100, 1));
    // Both on n1: n0 is cordoned while they are placed.
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(0), schedulable: Schedulable::Cordoned },
    );
    p.round(&all_alive(2, p.now));
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(0), schedulable: Schedulable::Yes },
    );
    let view = with(all_alive(2, p.now), 1, membership::State::Dead, Duration::from_secs(5), p.now);
    p.round(&view);
    let host = |name: &str| p.state.assigned_of(&w(name)).next().map(|(_, a)| a.node.clone());
    assert_eq!(host("patient"), Some(n(1)), "waits for its node");
    assert_eq!(host("eager"), Some(n(0)), "moves at once");
}

/// A replica moving to a node that dies goes back to the origin that still runs it, and a
/// replica still moving is not moved again by a drain of its new node.
#[test]
fn a_moving_replica_is_never_left_running_nowhere() {
    let mut p = Pool::new(3);
    p.workload("web", 1);
    for i in 1..3 {
        p.apply(
            Actor::User(ADMIN),
            Command::SetSchedulable { peer: n(i), schedulable: Schedulable::Cordoned },
        );
    }
    let view = all_alive(3, p.now);
    p.round(&view);
    assert_eq!(p.placement()[&0], n(0));
    p.report_running();
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(1), schedulable: Schedulable::Yes },
    );
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(0), schedulable: Schedulable::Draining },
    );
    p.round(&view);
    let r = ReplicaId::new(&w("web"), 0);
    assert_eq!(p.state.assignments()[&r].node, n(1));
    assert_eq!(p.state.assignments()[&r].from, Some(n(0)), "n0 runs it until n1 does");
    // n1 is drained before its copy runs: the replica is not moved again yet.
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(2), schedulable: Schedulable::Yes },
    );
    p.apply(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n(1), schedulable: Schedulable::Draining },
    );
    let r1 = p.round(&view);
    assert!(
        r1.command.is_none(),
        "a moving replica waits for its release before it moves again: {r1:?}"
    );
    // n1 dies before its copy runs: the replica goes back to n0, which still runs it, and
    // (n0 being drained) moves on to n2 from there, n0 running it meanwhile.
    let dead = with(view.clone(), 1, membership::State::Dead, Duration::from_secs(1), p.now);
    p.round(&dead);
    assert_eq!(p.state.assignments()[&r].node, n(2), "{:?}", p.state.assignments());
    assert_eq!(p.state.assignments()[&r].from, Some(n(0)));
    assert_eq!(p.state.runs_on(&n(0)).count(), 1, "never running nowhere");
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the pool looks like, every command a round makes is accepted by the state
    /// machine (a refused one would stall the leader), and a pool that stops changing
    /// settles: a few rounds later the round has nothing left to do.
    #[test]
    fn rounds_are_accepted_and_settle(
        nodes in 2usize..6,
        cpus in proptest::collection::vec(prop_oneof![Just(500u32), Just(1000), Just(2000)], 6),
        loads in proptest::collection::vec((1u32..5, 0u32..4, prop_oneof![Just(100u32), Just(600)]), 1..4),
        events in proptest::collection::vec((0usize..6, 0u8..6), 0..12),
    ) {
        let mut p = Pool::new(nodes);
        for (i, (replicas, min, cpu)) in loads.iter().enumerate() {
            let mut s = spec(&format!("w{i}"), *cpu, *replicas);
            s.min_available = (*min).min(*replicas);
            p.put(s);
        }
        let mut view = View::default();
        for (i, cpu) in cpus.iter().enumerate().take(nodes) {
            view.peers.insert(n(i), Arc::new(seen(membership::State::Alive, *cpu, p.now)));
        }
        let sched = Scheduler::new(Config::default()).unwrap();
        let step = |p: &mut Pool, view: &View| -> Option<Command> {
            let r = round(&p.state, view, &sched, p.now);
            if let Some(c) = r.command.clone() {
                p.serial += 1;
                let req = Request {
                    client: 1,
                    serial: p.serial,
                    actor: Actor::System,
                    time_ms: 1_000,
                    command: c,
                    proof: None,
                };
                let applied = p.state.apply(&req);
                assert!(applied.is_ok(), "the round's command was refused: {applied:?}\n{:?}", req.command);
            }
            p.report_running();
            r.command
        };
        step(&mut p, &view);
        for (node, what) in events {
            let node = node % nodes;
            match what {
                0 => { p.apply(Actor::User(ADMIN), Command::SetSchedulable { peer: n(node), schedulable: Schedulable::Draining }); }
                1 => { p.apply(Actor::User(ADMIN), Command::SetSchedulable { peer: n(node), schedulable: Schedulable::Cordoned }); }
                2 => { p.apply(Actor::User(ADMIN), Command::SetSchedulable { peer: n(node), schedulable: Schedulable::Yes }); }
                3 => { view = with(view, node, membership::State::Dead, Duration::from_secs(3600), p.now); }
                4 => { view = with(view, node, membership::State::Alive, Duration::ZERO, p.now); }
                _ => { p.apply(Actor::User(ADMIN), Command::Scale { name: w("w0"), replicas: (node as u32) % 4 }); }
            }
            step(&mut p, &view);
        }
        let mut settled = false;
        for _ in 0..8 {
            if step(&mut p, &view).is_none() {
                settled = true;
                break;
            }
        }
        prop_assert!(settled, "the pool never settled: {:?}", p.state.assignments());
        // Nothing is assigned to a node the pool lost, and nothing moves forever.
        for (r, a) in p.state.assignments() {
            prop_assert!(a.from.is_none(), "{r} still moving after settling: {a:?}");
        }
    }
}
