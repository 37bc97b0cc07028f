//! Raft over the mesh: three voters, each a real mesh node on loopback (QUIC), raft logs in
//! redb with fsync on a real disk, production timings. Prints a report:
//!
//! * commit latency of sequential writes (P50, P99);
//! * throughput with 64 concurrent writers (openraft batches them), with latency under load;
//! * leader failover: from killing the leader to the first write committed through a
//!   survivor, over repeated rounds (P50, P95).
//!
//! `cargo bench -p cloudless-node --bench raft` (targets: ≥ 5,000 writes/s, commit P50 ≤ 5 ms,
//! failover P50 ≤ 1.5 s).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cloudless_consensus::Config;
use cloudless_consensus::state::{Actor, Command, ReplicaStatus};
use cloudless_types::{NodeName, ReplicaId, ReplicaPhase, WorkloadName};
use common::Group;

fn pct(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
}

/// A small write, like the status reports nodes send all the time.
fn report(i: u64) -> Command {
    let status = ReplicaStatus {
        node: NodeName::from_ed25519([42; 32]),
        phase: ReplicaPhase::Running { ready: true },
        restarts: 0,
        at_ms: i,
    };
    let none = WorkloadName::new("none").unwrap_or_else(|_| unreachable!("a valid name"));
    Command::Report(vec![(ReplicaId::new(&none, 0), status)])
}

/// A workload put, as a user's CLI sends it: signed, so a follower may forward it.
fn put(i: u64) -> cloudless_consensus::state::Request {
    let spec = cloudless_types::WorkloadSpec::new(
        WorkloadName::new(format!("w{i}")).unwrap_or_else(|_| unreachable!("a valid name")),
        cloudless_types::Image::Container("busybox:1".into()),
        cloudless_types::Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
        1,
    );
    common::signed(Command::PutWorkload(Box::new(spec)))
}

fn main() {
    let _ = tracing_subscriber::fmt()
        // Quiet unless asked: the restarted members' refused RPCs are expected noise here.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut config = Config::default();
    if let Some(v) = env("HEARTBEAT_MS") {
        config.heartbeat = Duration::from_millis(v);
    }
    if let Some(v) = env("ELECTION_MIN_MS") {
        config.election_min = Duration::from_millis(v);
    }
    if let Some(v) = env("ELECTION_MAX_MS") {
        config.election_max = Duration::from_millis(v);
    }
    let mut g = Group::start(3, config.clone()).await;
    let l = g.leader().expect("leader");
    println!(
        "raft over the mesh: 3 voters on loopback QUIC, redb with fsync, heartbeat {:?}, election {:?}-{:?}",
        config.heartbeat, config.election_min, config.election_max
    );

    // Sequential commits through the leader.
    let leader = g.node(l).clone();
    let mut lat = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        let r = leader.propose(Actor::System, report(i)).await.expect("write");
        lat.push(t.elapsed());
        r.expect("applied");
    }
    println!(
        "sequential commit latency: P50 {:.2?}  P99 {:.2?}  ({} writes)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.len()
    );

    // Concurrent writers: openraft batches what arrives together into one append and fsync.
    let writers: u64 = std::env::var("WRITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let per = 16_000 / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per as usize);
            for i in 0..per {
                let t = Instant::now();
                leader
                    .propose(Actor::System, report(w * per + i))
                    .await
                    .expect("write")
                    .expect("applied");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("writer"));
    }
    let took = start.elapsed();
    println!(
        "{writers} concurrent writers: {:.0} writes/s ({} writes in {:.2?}); latency P50 {:.2?}  P99 {:.2?}",
        lat.len() as f64 / took.as_secs_f64(),
        lat.len(),
        took,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    // Forwarded writes: through a follower, signed as users send them (a member forwards a
    // user's command only with its signature, which the leader checks).
    let f = (0..3).find(|i| *i != l).expect("follower");
    let follower = g.node(f).clone();
    let mut lat = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        follower.submit(put(i)).await.expect("write").expect("applied");
        lat.push(t.elapsed());
    }
    println!(
        "sequential commits through a follower: P50 {:.2?}  P99 {:.2?}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    // The members killed below must not be kept alive by clones held here.
    drop(leader);
    drop(follower);

    // Failover rounds.
    let rounds: u64 = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut fail = Vec::new();
    for round in 0..rounds {
        let l = g.leader().expect("leader");
        let survivor = (0..3).find(|i| *i != l).expect("survivor");
        let s = g.node(survivor).clone();
        let old = g.node(l).id();
        let t = Instant::now();
        g.kill(l).await;
        // Time until a write through a survivor commits under a new leader.
        s.submit(put(round)).await.expect("write after failover").expect("applied");
        fail.push(t.elapsed());
        if std::env::var_os("VERBOSE").is_some() {
            let m = s.raft().metrics().borrow().clone();
            println!(
                "  round {round}: committed after {:?}; leader {:?} (old {old}), term {}",
                t.elapsed(),
                m.current_leader,
                m.current_term
            );
        }
        g.restart(l).await;
        let back = Instant::now();
        while !g.settled(3) {
            assert!(back.elapsed() < Duration::from_secs(60), "the group did not heal");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "leader failover (kill → next committed write): P50 {:.2?}  P95 {:.2?}  max {:.2?}  ({rounds} rounds)",
        pct(&mut fail, 0.5),
        pct(&mut fail, 0.95),
        pct(&mut fail, 1.0)
    );
}
