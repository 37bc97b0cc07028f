//! Placement speed on synthetic heterogeneous clusters.
//!
//! `cargo bench -p cloudless-sched` runs criterion (means, confidence intervals) and, for
//! each case, also prints the P50 / P95 / P99 of the individual iterations it timed, since the
//! targets are stated as percentiles:
//!
//! * one placement at 5,000 nodes: P50 ≤ 1 ms, P95 ≤ 3 ms;
//! * one placement at 100,000 nodes: P95 ≤ 30 ms;
//! * a batch of 10,000 replicas at 5,000 nodes: ≥ 20,000 placements per second.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudless_sched::{Cluster, Config, Node, ReplicaId, Scheduler, Workload};
use cloudless_types::{
    DeviceClass, LabelOp, LabelRule, Power, Resources, Runtime, Runtimes, Spread, Taint,
    TaintEffect, Topology, WorkloadTerm,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A cluster that looks like a community pool: mixed device classes and sizes, a tenth of
/// the devices phones (a third of those on battery), some WASI-only, some GPUs, zones of
/// about fifty devices in five regions, 0–70 % already used, varied uptime, cost and RTT.
fn cluster(n: usize, seed: u64) -> Cluster {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut c = Cluster::new();
    let zones = (n / 50).max(1);
    for i in 0..n {
        let class = match rng.gen_range(0..10) {
            0 => DeviceClass::Phone,
            1 | 2 => DeviceClass::Laptop,
            3 => DeviceClass::Server,
            4 => DeviceClass::Gateway,
            _ => DeviceClass::Desktop,
        };
        let cores = [1u32, 2, 4, 8, 16][rng.gen_range(0..5)];
        let mem = [1024u32, 2048, 4096, 8192, 16384, 65536][rng.gen_range(0..6)];
        let mut node = Node::new(
            &format!("node-{i:06}"),
            Resources {
                cpu_millis: cores * 1000,
                memory_mib: mem,
                disk_mib: 100_000,
                gpus: u16::from(rng.gen_bool(0.05)),
            },
        );
        let used: f64 = rng.gen_range(0.0..0.7);
        node.used = Resources {
            cpu_millis: (f64::from(node.allocatable.cpu_millis) * used) as u32,
            memory_mib: (f64::from(node.allocatable.memory_mib) * used) as u32,
            disk_mib: 10_000,
            gpus: 0,
        };
        let zone = rng.gen_range(0..zones);
        node.zone = Some(format!("zone-{zone}"));
        node.region = Some(format!("region-{}", zone % 5));
        node.device_class = class;
        if class == DeviceClass::Phone {
            node.runtimes = Runtimes::of(&[Runtime::Wasi]);
            if rng.gen_bool(0.3) {
                node.power = Power::Battery(rng.gen_range(20..100));
            }
            node.metered = rng.gen_bool(0.2);
        } else if rng.gen_bool(0.2) {
            node.runtimes = Runtimes::of(&[Runtime::Wasi]);
        }
        if rng.gen_bool(0.2) {
            node.labels.insert("disk".into(), "ssd".into());
        }
        node.labels.insert("owner".into(), format!("owner-{}", rng.gen_range(0..200)));
        if rng.gen_bool(0.02) {
            node.taints.push(Taint {
                key: "dedicated".into(),
                value: "ml".into(),
                effect: TaintEffect::NoSchedule,
            });
        }
        node.cordoned = rng.gen_bool(0.01);
        node.uptime = rng.gen_range(0.5..1.0);
        node.recent_failures = rng.gen_range(0..3);
        node.cost = rng.gen_range(0.0..2.0);
        node.rtt_ms = Some(rng.gen_range(1..300));
        c.add_node(node).expect("unique names");
    }
    c
}

/// A typical service: a container with a node rule, a preference, one replica per node and a
/// zone spread.
fn service(replicas: u32, cpu: u32, mem: u32) -> Workload {
    let mut w = Workload::new(
        "web",
        Runtime::Container,
        Resources { cpu_millis: cpu, memory_mib: mem, disk_mib: 100, gpus: 0 },
        replicas,
    );
    w.placement.required_node_rules.push(LabelRule { key: "owner".into(), op: LabelOp::Exists });
    w.placement
        .preferred_node_rules
        .push((50, LabelRule { key: "disk".into(), op: LabelOp::In(vec!["ssd".into()]) }));
    w.placement
        .anti_affinity
        .push(WorkloadTerm { workload: "web".into(), topology: Topology::Node });
    w.placement.spread = Some(Spread { topology: Topology::Zone, max_skew: 2 });
    w
}

fn percentiles(label: &str, samples: &mut [Duration], per: usize) {
    if samples.is_empty() {
        return;
    }
    samples.sort();
    let at =
        |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    let (p50, p95, p99) = (at(0.50), at(0.95), at(0.99));
    let rate = per as f64 / p50.as_secs_f64();
    println!(
        "{label}: P50 {p50:.2?}  P95 {p95:.2?}  P99 {p99:.2?}  ({} samples; {rate:.0} placements/s at P50)",
        samples.len()
    );
}

fn bench(c: &mut Criterion) {
    let s = Scheduler::new(Config::default()).expect("default weights are valid");
    let mut group = c.benchmark_group("single placement");
    group.sample_size(30);
    for n in [1_000usize, 5_000, 50_000, 100_000] {
        let cl = cluster(n, 7);
        let w = service(1, 500, 512);
        let one = [ReplicaId::new(&w.id, 0)];
        let samples = Mutex::new(Vec::new());
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let d = s.place(black_box(&cl), black_box(&w), black_box(&one));
                    let e = t.elapsed();
                    assert_eq!(d.placements.len(), 1);
                    total += e;
                    if let Ok(mut v) = samples.lock() {
                        v.push(e);
                    }
                }
                total
            });
        });
        if let Ok(mut v) = samples.lock() {
            percentiles(&format!("single placement, {n} nodes"), &mut v, 1);
        }
    }
    group.finish();

    let mut group = c.benchmark_group("batch");
    group.sample_size(10);
    let n = 5_000;
    let k = 10_000u32;
    let cl = cluster(n, 7);
    let mut w = service(k, 100, 128);
    // Ten thousand replicas on five thousand nodes: several per node, so no per-node
    // anti-affinity; the zone spread stays.
    w.placement.anti_affinity.clear();
    let replicas: Vec<ReplicaId> = (0..k).map(|i| ReplicaId::new(&w.id, i)).collect();
    let samples = Mutex::new(Vec::new());
    group.throughput(Throughput::Elements(u64::from(k)));
    group.bench_function(BenchmarkId::new("replicas at 5000 nodes", k), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let d = s.place(black_box(&cl), black_box(&w), black_box(&replicas));
                let e = t.elapsed();
                assert_eq!(d.placements.len(), k as usize, "{:?}", d.unschedulable);
                total += e;
                if let Ok(mut v) = samples.lock() {
                    v.push(e);
                }
            }
            total
        });
    });
    if let Ok(mut v) = samples.lock() {
        percentiles(&format!("batch of {k} at {n} nodes"), &mut v, k as usize);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
