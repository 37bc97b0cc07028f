//! `cloudless recover` on real data dirs: refusals that change nothing, and a recovery that
//! turns the survivor of a lost majority into a working one-voter group.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudless_consensus::memnet::{MemNet, MemTransport};
use cloudless_consensus::state::{Command, Settings};
use cloudless_consensus::{Config, Consensus, Consistency, Member};
use cloudless_mesh::identity;
use cloudless_node::recovery::{self, RAFT_DIR, RecoverError};
use cloudless_types::{Image, Resources, WorkloadSpec};
use common::Alive;

fn config() -> Config {
    Config { quiet_start: Duration::from_millis(500), ..Config::default() }
}

fn peer_of(dir: &Path) -> cloudless_types::NodeName {
    identity::node_name(&identity::load_or_create(dir).unwrap().public().to_peer_id())
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn workload(name: &str) -> Command {
    let resources = Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 };
    let name = cloudless_types::WorkloadName::new(name).unwrap();
    let spec = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        Image::Container("busybox:1".into()),
        resources,
        1,
    );
    Command::PutWorkload(Box::new(spec))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_refuses_what_is_not_a_stopped_voter_and_rebuilds_from_a_survivor() {
    // Refusals: an empty dir, and a dir with an identity but no raft store.
    let empty = tempfile::tempdir().unwrap();
    let err = recovery::force_recover(empty.path()).unwrap_err();
    assert!(matches!(err, RecoverError::NoIdentity(_)), "{err}");
    assert!(!empty.path().join(identity::KEY_FILE).exists(), "recover created an identity");
    peer_of(empty.path());
    let err = recovery::force_recover(empty.path()).unwrap_err();
    assert!(matches!(err, RecoverError::NoRaftStore(_)), "{err}");
    assert!(!empty.path().join(RAFT_DIR).exists(), "recover created a raft store");

    // Three voters with real identities.
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let peers: Vec<cloudless_types::NodeName> = dirs.iter().map(|d| peer_of(d.path())).collect();
    let net = MemNet::new();
    let mut nodes: Vec<Consensus<MemTransport>> = Vec::new();
    let alive = Arc::new(Alive(Mutex::new(peers.iter().cloned().collect())));
    for (d, p) in dirs.iter().zip(&peers) {
        let me = Member { peer: p.clone() };
        let c = Consensus::open(&d.path().join(RAFT_DIR), me, net.transport(p), config())
            .await
            .unwrap();
        c.start_controller(alive.clone()).await;
        net.register(c.clone());
        nodes.push(c);
    }
    let settings = Settings {
        name: "t".into(),
        root_key: common::ROOT,
        voter_target: None,
        phones_may_vote: false,
    };
    nodes[0]
        .bootstrap(settings, common::admin().verifying_key().to_bytes())
        .await
        .unwrap()
        .unwrap();
    until("three voters", async || nodes[0].voters().len() == 3).await;
    nodes[1].submit(common::signed(workload("kept"))).await.unwrap().unwrap();
    let survivor = 2;
    until("the survivor applied the write", async || {
        nodes[survivor]
            .read(Consistency::Stale, |s| s.workloads().contains_key("kept"))
            .await
            .unwrap()
    })
    .await;

    // While the survivor runs, its store is locked: recover refuses and changes nothing.
    let err = recovery::force_recover(dirs[survivor].path()).unwrap_err();
    assert!(matches!(err, RecoverError::Store { .. }), "{err}");
    assert!(err.to_string().contains("still running"), "{err}");

    for n in &nodes {
        n.shutdown().await;
        net.remove(&n.member().peer);
    }
    drop(nodes);
    // Inspecting changes nothing and tells how far each survivor got.
    let start = Instant::now();
    let before = loop {
        match recovery::inspect(dirs[survivor].path()) {
            Ok(s) => break s.last_log.unwrap(),
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{e}"),
            Err(e) => {
                tracing::debug!(error = %e, "store still held");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(recovery::inspect(dirs[survivor].path()).unwrap().last_log, Some(before));
    // The other two are gone for good. Recovery on the survivor (retried while the stopped
    // member's handlers release the database).
    let start = Instant::now();
    let me = loop {
        match recovery::force_recover(dirs[survivor].path()) {
            Ok(me) => break me,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                tracing::debug!(error = %e, "store still held");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(me.peer, peers[survivor]);
    let after = recovery::inspect(dirs[survivor].path()).unwrap();
    let (index, term) = after.last_log.unwrap();
    assert!(index > before.0 && term > before.1, "{before:?} → {index}, {term}");
    let net = MemNet::new();
    let c = Consensus::open(
        &dirs[survivor].path().join(RAFT_DIR),
        me.clone(),
        net.transport(&me.peer),
        config(),
    )
    .await
    .unwrap();
    net.register(c.clone());
    until("the survivor leads alone", async || c.is_leader()).await;
    assert_eq!(c.voters().len(), 1);
    let kept = c.read(Consistency::Linearizable, |s| s.workloads().contains_key("kept")).await;
    assert!(kept.unwrap(), "the committed write survived recovery");
    c.submit(common::signed(workload("after"))).await.unwrap().unwrap();
    c.shutdown().await;
}
