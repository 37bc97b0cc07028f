//! The raft group over real mesh nodes on loopback (QUIC): election, writes through a
//! follower, leader failover, restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cloudless_consensus::state::Command;
use cloudless_consensus::{Config, Consistency};
use cloudless_types::{Image, Resources, WorkloadSpec};
use common::Group;

fn spec(name: &str) -> WorkloadSpec {
    WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        Image::Container("busybox:1".into()),
        Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
        1,
    )
}

fn fast() -> Config {
    Config {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(300),
        election_max: Duration::from_millis(600),
        controller_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_over_the_mesh_fails_over_and_keeps_writing() {
    let mut g = Group::start(3, fast()).await;
    let l = g.leader().expect("a leader");
    let f = (0..3).find(|i| *i != l).unwrap();
    for i in 0..10 {
        let r = g
            .node(f)
            .submit(common::signed(Command::PutWorkload(Box::new(spec(&format!("w{i}"))))))
            .await;
        assert!(r.expect("write").is_ok());
    }
    g.kill(l).await;
    let start = Instant::now();
    let new = loop {
        if let Some(n) = g.leader() {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no new leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("new leader over the mesh after {:?}", start.elapsed());
    let other = (0..3).find(|i| *i != l && *i != new).unwrap();
    let r =
        g.node(other).submit(common::signed(Command::PutWorkload(Box::new(spec("after"))))).await;
    assert!(r.expect("write after failover").is_ok());
    let names =
        g.node(other).read(Consistency::Linearizable, |s| s.workloads().len()).await.unwrap();
    assert_eq!(names, 11);
    g.restart(l).await;
    let start = Instant::now();
    while g.node(l).read(Consistency::Stale, |s| s.workloads().len()).await.unwrap() != 11 {
        if start.elapsed() > Duration::from_secs(20) {
            for i in 0..3 {
                let m = g.node(i).raft().metrics().borrow().clone();
                eprintln!("node {i}: {m}");
            }
            panic!("the restarted node did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
