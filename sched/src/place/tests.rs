use std::collections::HashMap;
use std::sync::Arc;

use cloudless_types::{LabelOp, LabelRule, Resources, Runtime, Spread, Topology, WorkloadTerm};
use proptest::prelude::*;

use super::*;
use crate::model::{Liveness, Node};
use crate::plan::Step;

fn res(cpu: u32, mem: u32) -> Resources {
    Resources { cpu_millis: cpu, memory_mib: mem, disk_mib: 0, gpus: 0 }
}

fn node(id: &str, cpu: u32, mem: u32, zone: &str) -> Node {
    let mut n = Node::new(id, res(cpu, mem));
    n.zone = Some(zone.into());
    n.region = Some("r".into());
    n
}

fn cluster(nodes: Vec<Node>) -> Cluster {
    let mut c = Cluster::new();
    for n in nodes {
        c.add_node(n).unwrap();
    }
    c
}

fn sched() -> Scheduler {
    Scheduler::new(Config::default()).unwrap()
}

fn ids(w: &Workload, n: u32) -> Vec<ReplicaId> {
    (0..n).map(|i| ReplicaId::new(&w.id, i)).collect()
}

fn nodes_of(d: &Decision) -> Vec<&str> {
    d.placements.iter().map(|p| &*p.node).collect()
}

#[test]
fn bin_pack_fills_a_node_before_the_next_and_spread_alternates() {
    let c = cluster(vec![node("a", 1000, 1000, "z"), node("b", 1000, 1000, "z")]);
    let mut w = Workload::new("w", Runtime::Wasi, res(200, 200), 4);
    let d = sched().place(&c, &w, &ids(&w, 4));
    let on = nodes_of(&d);
    assert!(on.iter().all(|n| *n == on[0]), "bin-pack keeps to one node: {on:?}");
    w.placement.strategy = cloudless_types::Strategy::Spread;
    let d = sched().place(&c, &w, &ids(&w, 4));
    let on = nodes_of(&d);
    assert_eq!(on.iter().filter(|n| **n == "a").count(), 2, "spread alternates: {on:?}");
}

#[test]
fn capacity_is_never_over_committed_and_the_refusal_is_precise() {
    let mut c = cluster(vec![node("a", 1000, 4000, "z"), node("b", 4000, 100, "z")]);
    c.add_node(Node { draining: true, ..node("c", 9000, 9000, "z") }).unwrap();
    c.add_node(Node {
        runtimes: cloudless_types::Runtimes::of(&[Runtime::Container]),
        ..node("d", 9000, 9000, "z")
    })
    .unwrap();
    let w = Workload::new("w", Runtime::Wasi, res(300, 300), 5);
    let d = sched().place(&c, &w, &ids(&w, 5));
    assert_eq!(d.placements.len(), 3, "a takes three, b has no memory: {d:?}");
    assert_eq!(d.unplaced.len(), 2);
    let why = d.unschedulable.unwrap();
    assert_eq!(
        why.to_string(),
        "0/4 nodes are available: 1 is draining, 1 offers no wasi runtime, 1 lacks CPU, 1 lacks memory"
    );
    let mut applied = c.clone();
    let d = sched().place(&c, &w, &ids(&w, 5));
    d.apply(&mut applied, &w).unwrap();
    assert_eq!(applied.node("a").unwrap().used, res(900, 900));
}

#[test]
fn anti_affinity_to_itself_puts_one_replica_per_node() {
    let c = cluster((0..3).map(|i| node(&format!("n{i}"), 8000, 8000, "z")).collect());
    let mut w = Workload::new("w", Runtime::Wasi, res(100, 100), 5);
    w.placement.anti_affinity.push(WorkloadTerm { workload: "w".into(), topology: Topology::Node });
    let d = sched().place(&c, &w, &ids(&w, 5));
    let mut on = nodes_of(&d);
    on.sort();
    assert_eq!(on, vec!["n0", "n1", "n2"]);
    assert_eq!(d.unplaced.len(), 2);
    assert!(
        d.unschedulable
            .unwrap()
            .to_string()
            .contains("3 are beside a workload it must stay away from")
    );
}

#[test]
fn affinity_to_itself_keeps_replicas_in_one_zone() {
    let c = cluster(vec![
        node("a", 1000, 1000, "z1"),
        node("b", 1000, 1000, "z2"),
        node("c", 1000, 1000, "z1"),
    ]);
    let mut w = Workload::new("w", Runtime::Wasi, res(400, 100), 4);
    w.placement.affinity.push(WorkloadTerm { workload: "w".into(), topology: Topology::Zone });
    let d = sched().place(&c, &w, &ids(&w, 4));
    let zones: Vec<&str> =
        d.placements.iter().map(|p| c.node(&p.node).unwrap().zone.as_deref().unwrap()).collect();
    assert!(zones.iter().all(|z| *z == zones[0]), "{zones:?}");
}

#[test]
fn zone_spread_keeps_within_the_skew_and_fills_what_has_room() {
    let mut nodes = Vec::new();
    for z in 0..3 {
        for i in 0..2 {
            nodes.push(node(&format!("z{z}n{i}"), 4000, 4000, &format!("z{z}")));
        }
    }
    // z2 is tiny: room for one replica only.
    nodes[4] = node("z2n0", 100, 100, "z2");
    nodes[5] = node("z2n1", 0, 0, "z2");
    let c = cluster(nodes);
    let mut w = Workload::new("w", Runtime::Wasi, res(100, 100), 9);
    w.placement.spread = Some(Spread { topology: Topology::Zone, max_skew: 1 });
    let d = sched().place(&c, &w, &ids(&w, 9));
    assert!(d.unplaced.is_empty(), "{d:?}");
    let mut per_zone: HashMap<String, u32> = HashMap::new();
    for p in &d.placements {
        *per_zone.entry(c.node(&p.node).unwrap().zone.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(per_zone["z2"], 1);
    assert_eq!(per_zone["z0"], 4);
    assert_eq!(per_zone["z1"], 4);
}

#[test]
fn preferred_terms_add_to_the_score_and_are_explained() {
    let mut fast = node("fast", 1000, 1000, "z");
    fast.labels.insert("disk".into(), "ssd".into());
    let c = cluster(vec![node("slow", 1000, 1000, "z"), fast]);
    let mut w = Workload::new("w", Runtime::Wasi, res(100, 100), 1);
    w.placement
        .preferred_node_rules
        .push((50, LabelRule { key: "disk".into(), op: LabelOp::In(vec!["ssd".into()]) }));
    let d = sched().place(&c, &w, &ids(&w, 1));
    assert_eq!(nodes_of(&d), vec!["fast"]);
    let r = sched().rank(&c, &w, 5);
    assert_eq!(r.candidates.len(), 2);
    assert_eq!(&*r.candidates[0].node, "fast");
    let best = &r.candidates[0];
    let sum: f64 = best.factors.iter().map(|f| f.contribution).sum();
    assert!((sum - best.total).abs() < 1e-9, "factors add up to the total");
    let loc = best.factors.iter().find(|f| f.factor == Factor::Locality).unwrap();
    assert_eq!(loc.score, 100.0);
    let other = sched().explain(&c, &w, "slow").unwrap().unwrap();
    assert_eq!(other.factors[0].score, 0.0);
    assert!(sched().explain(&c, &w, "nope").is_none());
}

#[test]
fn reliability_and_cost_steer_choices() {
    let flaky = Node { uptime: 0.5, recent_failures: 2, ..node("flaky", 1000, 1000, "z") };
    let dear = Node { cost: 10.0, ..node("dear", 1000, 1000, "z") };
    let good = node("good", 1000, 1000, "z");
    let c = cluster(vec![flaky, dear, good]);
    let w = Workload::new("w", Runtime::Wasi, res(100, 100), 1);
    assert_eq!(nodes_of(&sched().place(&c, &w, &ids(&w, 1))), vec!["good"]);
}

#[test]
fn suspect_nodes_and_phones_on_battery_take_nothing() {
    let c = cluster(vec![
        Node { liveness: Liveness::Suspect, ..node("s", 1000, 1000, "z") },
        Node {
            power: cloudless_types::Power::Battery(90),
            device_class: cloudless_types::DeviceClass::Phone,
            ..node("phone", 1000, 1000, "z")
        },
    ]);
    let w = Workload::new("w", Runtime::Wasi, res(100, 100), 1);
    let d = sched().place(&c, &w, &ids(&w, 1));
    assert_eq!(
        d.unschedulable.unwrap().to_string(),
        "0/2 nodes are available: 1 is not ready, 1 is on battery"
    );
}

#[test]
fn preemption_evicts_the_cheapest_set_of_lower_priority_replicas() {
    let mut c = cluster(vec![node("a", 1000, 1000, "z"), node("b", 1000, 1000, "z")]);
    let low: Arc<str> = Arc::from("low");
    let mid: Arc<str> = Arc::from("mid");
    // a: two low-priority replicas of 500; b: one mid-priority replica of 1000.
    c.assign(ReplicaId::new(&low, 0), "a", res(500, 500), 1).unwrap();
    c.assign(ReplicaId::new(&low, 1), "a", res(500, 500), 1).unwrap();
    c.assign(ReplicaId::new(&mid, 0), "b", res(1000, 1000), 5).unwrap();
    let mut w = Workload::new("urgent", Runtime::Wasi, res(400, 400), 1);
    w.priority = 10;
    let d = sched().place(&c, &w, &ids(&w, 1));
    assert_eq!(d.preemptions.len(), 1);
    let p = &d.preemptions[0];
    assert_eq!(&*p.node, "a", "victims of priority 1 beat a victim of priority 5");
    assert_eq!(p.victims.len(), 1, "one 500 replica makes room for 400");
    let mut after = c.clone();
    d.apply(&mut after, &w).unwrap();
    assert!(after.node("a").unwrap().used.fits_in(&after.node("a").unwrap().allocatable));
    // Equal priority never preempts.
    w.priority = 1;
    let d = sched().place(&c, &w, &ids(&w, 1));
    assert!(d.preemptions.is_empty());
    assert_eq!(d.unplaced.len(), 1);
}

#[test]
fn a_node_runs_no_more_replicas_than_its_limit_and_preemption_frees_a_slot() {
    // Room for ten of these on each, but a runs three at most and holds one already.
    let mut c = cluster(vec![
        Node { max_replicas: 3, ..node("a", 10_000, 10_000, "z") },
        Node { max_replicas: 2, ..node("b", 10_000, 10_000, "z") },
    ]);
    let low: Arc<str> = Arc::from("low");
    c.assign(ReplicaId::new(&low, 0), "a", res(100, 100), 1).unwrap();
    // Of the same priority as what a holds: nothing to preempt.
    let w = Workload { priority: 1, ..Workload::new("w", Runtime::Wasi, res(100, 100), 6) };
    let d = sched().place(&c, &w, &ids(&w, 6));
    let on = nodes_of(&d);
    assert_eq!(on.iter().filter(|n| **n == "a").count(), 2, "{on:?}");
    assert_eq!(on.iter().filter(|n| **n == "b").count(), 2, "{on:?}");
    assert_eq!(d.unplaced.len(), 2);
    assert_eq!(
        d.unschedulable.as_ref().unwrap().to_string(),
        "0/2 nodes are available: 2 are at their replica limit"
    );
    // A full node makes room by evicting one lower-priority replica (the first by name of
    // those that cost least), and only one.
    let mut full = c.clone();
    d.apply(&mut full, &w).unwrap();
    let mut urgent = Workload::new("urgent", Runtime::Wasi, res(100, 100), 1);
    urgent.priority = 10;
    let d = sched().place(&full, &urgent, &ids(&urgent, 1));
    assert_eq!(d.placements.len(), 1, "{d:?}");
    assert_eq!(&*d.preemptions[0].node, "a");
    assert_eq!(d.preemptions[0].victims, vec![ReplicaId::new(&low, 0)]);
}

#[test]
fn decisions_are_deterministic_per_seed() {
    let c = cluster(
        (0..50).map(|i| node(&format!("n{i}"), 1000, 1000, &format!("z{}", i % 5))).collect(),
    );
    let w = Workload::new("w", Runtime::Wasi, res(100, 100), 30);
    let a = sched().place(&c, &w, &ids(&w, 30));
    let b = sched().place(&c, &w, &ids(&w, 30));
    assert_eq!(a, b);
    let other = Scheduler::new(Config { seed: 99, ..Config::default() }).unwrap().place(
        &c,
        &w,
        &ids(&w, 30),
    );
    assert_eq!(other.placements.len(), 30);
}

#[test]
fn a_dead_node_s_replicas_are_rehomed_by_priority() {
    let mut c = cluster(vec![node("a", 1000, 1000, "z"), node("b", 600, 600, "z")]);
    let hi = Workload { priority: 5, ..Workload::new("hi", Runtime::Wasi, res(500, 500), 1) };
    let lo = Workload::new("lo", Runtime::Wasi, res(500, 500), 1);
    c.assign(ReplicaId::new(&lo.id, 0), "a", lo.resources, 0).unwrap();
    c.assign(ReplicaId::new(&hi.id, 0), "a", hi.resources, 5).unwrap();
    let lookup = |id: &str| [&hi, &lo].into_iter().find(|w| &*w.id == id);
    let plan = sched().plan_node_lost(&c, "a", lookup).unwrap();
    assert_eq!(
        plan.steps,
        vec![Step::Start { replica: ReplicaId::new(&hi.id, 0), node: Arc::from("b") }]
    );
    assert_eq!(plan.unplaced.len(), 1);
    assert_eq!(plan.unplaced[0].0, ReplicaId::new(&lo.id, 0));
    assert!(c.placement(&ReplicaId::new(&hi.id, 0)).is_some(), "planning is a dry run");
    plan.apply(&mut c, lookup).unwrap_err(); // the lost node is still in this view
}

#[test]
fn a_drain_moves_what_it_can_and_respects_min_available() {
    let mut c = cluster(vec![
        node("a", 2000, 2000, "z"),
        node("b", 600, 600, "z"),
        node("c", 100, 100, "z"),
    ]);
    let w = Workload { min_available: 2, ..Workload::new("w", Runtime::Wasi, res(500, 500), 3) };
    for i in 0..2 {
        c.assign(ReplicaId::new(&w.id, i), "a", w.resources, 0).unwrap();
    }
    c.assign(ReplicaId::new(&w.id, 2), "b", res(0, 0), 0).unwrap();
    let lookup = |id: &str| (id == "w").then_some(&w);
    let plan = sched().plan_drain(&c, "a", lookup).unwrap();
    let moves = plan.steps.iter().filter(|s| matches!(s, Step::Move { .. })).count();
    assert_eq!(moves, 1, "b has room for one: {plan:?}");
    // Three run; min-available is two: the second may stop.
    assert_eq!(plan.steps.iter().filter(|s| matches!(s, Step::Stop { .. })).count(), 1, "{plan:?}");
    assert!(plan.blocked.is_empty());
    let strict = Workload { min_available: 3, ..w.clone() };
    let lookup = |id: &str| (id == "w").then_some(&strict);
    let plan = sched().plan_drain(&c, "a", lookup).unwrap();
    assert_eq!(plan.blocked.len(), 1, "{plan:?}");
    assert!(plan.blocked[0].1.contains("min-available 3"));
}

#[test]
fn scaling_down_stops_replicas_on_unhealthy_nodes_first() {
    let mut c = cluster(vec![
        node("a", 9000, 9000, "z1"),
        node("b", 9000, 9000, "z2"),
        node("c", 9000, 9000, "z2"),
    ]);
    let w = Workload::new("w", Runtime::Wasi, res(100, 100), 3);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        c.assign(ReplicaId::new(&w.id, i as u32), n, w.resources, 0).unwrap();
    }
    c.update_node("a", |n| n.cordoned = true).unwrap();
    let plan = sched().plan_scale(&c, &w, 1);
    let stopped: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    assert_eq!(stopped.len(), 2);
    assert!(stopped[0].contains("on a"), "{stopped:?}");
    let up = sched().plan_scale(&c, &w, 5);
    assert_eq!(up.steps.len(), 2);
    assert!(
        up.steps.iter().all(|s| matches!(s, Step::Start { replica, .. } if replica.index >= 3))
    );
    let c2 = c.clone();
    let r = ReplicaId::new(&w.id, 1);
    let why = sched().explain_replica(&c2, &w, &r).unwrap().unwrap();
    assert_eq!(&*why.node, "b");
}

// ---- properties ------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct World {
    cluster: Cluster,
    workloads: Vec<Workload>,
}

fn arb_world() -> impl Strategy<Value = World> {
    let nodes =
        prop::collection::vec((0u32..4000, 0u32..4000, 0u32..4, any::<bool>(), 0u8..3), 1..25);
    let workloads = prop::collection::vec(
        (1u32..1500, 1u32..1500, 1u32..12, 0i32..4, 0u8..4, 1u32..3, any::<bool>()),
        1..5,
    );
    (nodes, workloads, any::<u64>()).prop_map(|(nodes, workloads, _)| {
        let mut c = Cluster::new();
        for (i, (cpu, mem, zone, ssd, class)) in nodes.into_iter().enumerate() {
            let mut n = node(&format!("n{i}"), cpu, mem, &format!("z{zone}"));
            if ssd {
                n.labels.insert("disk".into(), "ssd".into());
            }
            n.device_class = [
                cloudless_types::DeviceClass::Server,
                cloudless_types::DeviceClass::Desktop,
                cloudless_types::DeviceClass::Laptop,
            ][usize::from(class)];
            c.add_node(n).unwrap();
        }
        let ws = workloads
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, mem, replicas, priority, rules, skew, spread))| {
                let mut w = Workload::new(&format!("w{i}"), Runtime::Wasi, res(cpu, mem), replicas);
                w.priority = priority;
                if rules & 1 == 1 {
                    w.placement.anti_affinity.push(WorkloadTerm {
                        workload: w.id.to_string(),
                        topology: Topology::Node,
                    });
                }
                if rules & 2 == 2 {
                    w.placement
                        .preferred_node_rules
                        .push((40, LabelRule { key: "disk".into(), op: LabelOp::Exists }));
                }
                if spread {
                    w.placement.spread = Some(Spread { topology: Topology::Zone, max_skew: skew });
                    w.placement.strategy = cloudless_types::Strategy::Spread;
                }
                w
            })
            .collect();
        World { cluster: c, workloads: ws }
    })
}

/// Places every workload in turn, applying each decision; returns the decisions.
fn run(world: &World, s: &Scheduler) -> (Cluster, Vec<Decision>) {
    let mut c = world.cluster.clone();
    let mut out = Vec::new();
    for w in &world.workloads {
        let d = s.place(&c, w, &ids(w, w.replicas));
        d.apply(&mut c, w).unwrap();
        out.push(d);
    }
    (c, out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_plan_over_commits_a_node(world in arb_world()) {
        let (c, _) = run(&world, &sched());
        for n in c.nodes() {
            prop_assert!(n.used.fits_in(&n.allocatable), "{} uses {:?} of {:?}", n.id, n.used, n.allocatable);
        }
    }

    #[test]
    fn required_anti_affinity_always_holds(world in arb_world()) {
        let (c, _) = run(&world, &sched());
        for w in world.workloads.iter().filter(|w| !w.placement.anti_affinity.is_empty()) {
            let mut per_node: HashMap<&str, u32> = HashMap::new();
            for (_, a) in c.replicas_of(&w.id) {
                *per_node.entry(&a.node).or_default() += 1;
            }
            prop_assert!(per_node.values().all(|n| *n == 1), "{}: {per_node:?}", w.id);
        }
    }

    #[test]
    fn zone_skew_stays_within_its_bound(world in arb_world()) {
        // Checked right after each workload is placed: later, higher-priority workloads may
        // preempt its replicas, which no plan of its own can prevent.
        let s = sched();
        let mut c = world.cluster.clone();
        for w in &world.workloads {
            let before = c.clone();
            let d = s.place(&c, w, &ids(w, w.replicas));
            d.apply(&mut c, w).unwrap();
            let Some(sp) = w.placement.spread else { continue };
            // Among zones that could still take a replica, counts differ by at most the skew.
            let mut count: HashMap<String, u32> = HashMap::new();
            for (_, a) in c.replicas_of(&w.id) {
                *count.entry(c.node(&a.node).unwrap().zone.clone().unwrap()).or_default() += 1;
            }
            // Room as the placer saw it: capacity freed by this decision's own evictions does
            // not count (the skew is judged among zones that can take a replica without
            // preempting).
            let mut room: HashMap<String, bool> = HashMap::new();
            for n in before.nodes() {
                let placed_here = d.placements.iter().filter(|p| p.node == n.id).count() as u32;
                let mut free = n.free();
                for _ in 0..placed_here {
                    free = free.saturating_sub(&w.resources);
                }
                let fits = w.resources.fits_in(&free)
                    && (w.placement.anti_affinity.is_empty() || c.replicas_on(&n.id).iter().all(|r| r.workload != w.id));
                *room.entry(n.zone.clone().unwrap()).or_default() |= fits;
            }
            let max = count.values().copied().max().unwrap_or(0);
            for (z, has_room) in &room {
                if *has_room {
                    let here = count.get(z).copied().unwrap_or(0);
                    if max > here + sp.max_skew {
                        let dump: Vec<String> = world.cluster.nodes().map(|n| format!("{} {} {}/{}", n.id, n.zone.as_deref().unwrap_or(""), n.allocatable.cpu_millis, n.allocatable.memory_mib)).collect();
                        let ws: Vec<String> = world.workloads.iter().map(|w| format!("{} {:?} x{} p{} anti={} spread={:?}", w.id, (w.resources.cpu_millis, w.resources.memory_mib), w.replicas, w.priority, !w.placement.anti_affinity.is_empty(), w.placement.spread.map(|s| s.max_skew))).collect();
                        let placed: Vec<String> = d.placements.iter().map(|p| p.node.to_string()).collect();
                        prop_assert!(false, "{}: zone {z} has {here}, max {max}, skew {}\nnodes {dump:?}\nworkloads {ws:?}\nplaced {placed:?} preempt {:?} unplaced {}", w.id, sp.max_skew, d.preemptions, d.unplaced.len());
                    }
                }
            }
        }
    }

    #[test]
    fn results_are_deterministic(world in arb_world()) {
        let (_, a) = run(&world, &sched());
        let (_, b) = run(&world, &sched());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn preemption_only_evicts_lower_priority(world in arb_world()) {
        let s = sched();
        let mut c = world.cluster.clone();
        for w in &world.workloads {
            let d = s.place(&c, w, &ids(w, w.replicas));
            for p in &d.preemptions {
                for v in &p.victims {
                    let a = c.placement(v).unwrap();
                    prop_assert!(a.priority < w.priority, "{v} of priority {} evicted by {}", a.priority, w.priority);
                }
            }
            d.apply(&mut c, w).unwrap();
        }
        for n in c.nodes() {
            prop_assert!(n.used.fits_in(&n.allocatable));
        }
    }
}
