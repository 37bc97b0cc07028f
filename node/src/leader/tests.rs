use cloudless_consensus::invite::{Grant, Invite};
use cloudless_consensus::state::{Actor, Request, Settings};
use cloudless_sched::place::Config;
use cloudless_types::{Power, WorkloadSpec};
use ed25519_dalek::SigningKey;

use super::*;

const ADMIN: [u8; 32] = [1; 32];

struct Pool {
    state: State,
    serial: u64,
}

impl Pool {
    /// A cluster whose first node is `n0`, with `n1`… enrolled as workers.
    fn new(nodes: usize) -> Pool {
        let root = SigningKey::from_bytes(&[7; 32]);
        let settings = Settings {
            name: "pool".into(),
            root_key: root.verifying_key().to_bytes(),
            voter_target: None,
            phones_may_vote: false,
        };
        let mut p = Pool { state: State::new(), serial: 0 };
        p.apply(Actor::System, Command::Bootstrap { settings, admin: ADMIN, node: "n0".into() });
        for i in 1..nodes {
            let grant = Grant {
                roles: [NodeRole::Worker].into(),
                labels: BTreeMap::new(),
                max_uses: 1,
                expires_ms: u64::MAX,
            };
            let inv = Invite::create(&root, "pool", vec![], grant, [i as u8; 16]);
            let peer = format!("n{i}");
            p.apply(
                Actor::Node(peer.clone()),
                Command::Enroll { token: inv.token, signature: inv.signature, peer },
            );
        }
        p
    }

    fn apply(&mut self, actor: Actor, command: Command) {
        self.serial += 1;
        let req = Request { client: 1, serial: self.serial, actor, time_ms: 1_000, command };
        self.state.apply(&req).unwrap();
    }

    fn workload(&mut self, name: &str, replicas: u32) {
        let spec = WorkloadSpec::new(
            name,
            Image::Wasi("ab".repeat(32)),
            Resources { cpu_millis: 500, memory_mib: 64, disk_mib: 0, gpus: 0 },
            replicas,
        );
        self.apply(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec)));
    }

    /// Runs a round and commits its command; returns the round.
    fn round(&mut self, seen: &[Seen]) -> Round {
        let r = round(&self.state, seen, &Scheduler::new(Config::default()).unwrap());
        if let Some(c) = r.command.clone() {
            self.apply(Actor::System, c);
        }
        r
    }

    fn placement(&self) -> BTreeMap<u32, String> {
        self.state.assignments().iter().map(|(k, a)| (k.index, a.node.clone())).collect()
    }
}

fn seen(i: usize, state: membership::State) -> Seen {
    Seen {
        peer: format!("n{i}"),
        state,
        down_for: std::time::Duration::ZERO,
        capacity: Some(Capacity {
            cpu_total_millis: 2000,
            cpu_free_millis: 2000,
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
    }
}

fn all_alive(n: usize) -> Vec<Seen> {
    (0..n).map(|i| seen(i, membership::State::Alive)).collect()
}

#[test]
fn places_missing_replicas_once_and_then_rests() {
    let mut p = Pool::new(3);
    p.workload("web", 3);
    let r = p.round(&all_alive(3));
    assert_eq!(r.placed, 3);
    assert_eq!(p.placement().len(), 3);
    let again = p.round(&all_alive(3));
    assert_eq!(again.command, None, "nothing to change");
}

#[test]
fn replicas_of_a_dead_node_move_and_a_suspect_keeps_them() {
    let mut p = Pool::new(3);
    p.workload("web", 2);
    p.round(&all_alive(3));
    let before = p.placement();
    let victim: usize = before[&0].trim_start_matches('n').parse().unwrap();
    let mut view = all_alive(3);
    view[victim].state = membership::State::Suspect;
    assert_eq!(p.round(&view).command, None, "a suspect node keeps its replicas");
    view[victim].state = membership::State::Dead;
    let r = p.round(&view);
    assert!(r.placed >= 1);
    let after = p.placement();
    assert_eq!(after.len(), 2);
    assert!(after.values().all(|n| *n != format!("n{victim}")), "{after:?}");
    for (i, node) in &before {
        if *node != format!("n{victim}") {
            assert_eq!(after[i], *node, "replicas on healthy nodes stay");
        }
    }
}

#[test]
fn unknown_unenrolled_and_revoked_nodes_get_nothing() {
    let mut p = Pool::new(2);
    p.apply(Actor::User(ADMIN), Command::Revoke { peer: "n1".into() });
    p.workload("web", 2);
    let mut view = all_alive(2);
    view.push(Seen { peer: "stranger".into(), ..seen(0, membership::State::Alive) });
    p.round(&view);
    assert!(p.placement().values().all(|n| n == "n0"), "{:?}", p.placement());
}

#[test]
fn what_fits_nowhere_is_reported() {
    let mut p = Pool::new(1);
    let spec = WorkloadSpec::new(
        "huge",
        Image::Wasi("ab".repeat(32)),
        Resources { cpu_millis: 64_000, memory_mib: 64, disk_mib: 0, gpus: 0 },
        1,
    );
    p.apply(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec)));
    let r = p.round(&all_alive(1));
    assert!(r.command.is_none());
    assert!(r.unschedulable["huge"].contains("lacks CPU"), "{:?}", r.unschedulable);
}

#[test]
fn a_cordoned_node_keeps_its_replicas_and_a_draining_one_loses_them() {
    use cloudless_consensus::state::Schedulable;
    let mut p = Pool::new(3);
    p.workload("web", 3);
    p.round(&all_alive(3));
    let before = p.placement();
    let host = before[&0].clone();
    let set = |s| Command::SetSchedulable { peer: host.clone(), schedulable: s };
    p.apply(Actor::User(ADMIN), set(Schedulable::Cordoned));
    assert_eq!(p.round(&all_alive(3)).command, None, "cordoning moves nothing");
    p.workload("db", 1);
    p.round(&all_alive(3));
    let db = p.state.assignments().iter().find(|(k, _)| k.workload == "db").map(|(_, a)| a);
    assert_ne!(db.map(|a| a.node.as_str()), Some(host.as_str()), "no new replica on it");
    p.apply(Actor::User(ADMIN), set(Schedulable::Draining));
    p.round(&all_alive(3));
    assert!(
        p.state.assignments().values().all(|a| a.node != host),
        "a draining node's replicas move: {:?}",
        p.state.assignments()
    );
    assert_eq!(p.state.assignments().len(), 4, "and every replica is placed elsewhere");
    p.apply(Actor::User(ADMIN), set(Schedulable::Yes));
    p.workload("cache", 3);
    p.round(&all_alive(3));
    assert!(p.state.assignments().values().any(|a| a.node == host), "uncordoned: used again");
}

#[test]
fn a_workload_may_wait_for_a_dead_node_to_return() {
    use std::time::Duration;
    let mut p = Pool::new(3);
    let mut spec = WorkloadSpec::new(
        "patient",
        Image::Wasi("ab".repeat(32)),
        Resources { cpu_millis: 500, memory_mib: 64, disk_mib: 0, gpus: 0 },
        1,
    );
    spec.reschedule_after_secs = Some(60);
    p.apply(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec)));
    p.round(&all_alive(3));
    let host: usize = p.placement()[&0].trim_start_matches('n').parse().unwrap();
    let mut view = all_alive(3);
    view[host].state = membership::State::Dead;
    view[host].down_for = Duration::from_secs(59);
    assert_eq!(p.round(&view).command, None, "dead for 59 s of 60: the replica waits");
    view[host].down_for = Duration::from_secs(60);
    p.round(&view);
    assert_ne!(p.placement()[&0], format!("n{host}"), "after 60 s it moves");
    let mut left = all_alive(3);
    let now_host: usize = p.placement()[&0].trim_start_matches('n').parse().unwrap();
    left[now_host].state = membership::State::Left;
    p.round(&left);
    assert_ne!(p.placement()[&0], format!("n{now_host}"), "a node that left is not waited for");
}
