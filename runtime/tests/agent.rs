//! The agent end to end: with the in-memory driver (status flow, stop, liveness), and with
//! real WASI guests (restart policy with backoff).

#![allow(clippy::unwrap_used)]

mod guests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_runtime::memory::MemoryDriver;
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Agent, AgentConfig, Driver, ReplicaPhase, ReplicaSpec, Status};
use cloudless_types::{Image, Kind, Probe, ProbeCheck, Resources, Restart, WorkloadSpec};
use tokio::sync::mpsc;

fn spec(name: &str, image: Image, restart: Restart) -> ReplicaSpec {
    let mut w = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        image,
        Resources { cpu_millis: 500, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    if restart != Restart::Always {
        w.kind = Kind::Job;
    }
    w.restart = restart;
    ReplicaSpec::from_workload(&w, 0)
}

/// Waits for a status matching `f`, with a deadline; returns it and everything seen before.
async fn until(
    rx: &mut mpsc::Receiver<Status>,
    what: &str,
    f: impl Fn(&Status) -> bool,
) -> (Status, Vec<(Instant, Status)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:?}"))
            .expect("the agent runs");
        if f(&s) {
            return (s, seen);
        }
        seen.push((Instant::now(), s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_start_report_and_stop() {
    let d = MemoryDriver::new().unwrap();
    let (agent, mut rx) = Agent::start(vec![Arc::new(d.clone())], AgentConfig::default());
    let a = spec("a", Image::Container("busybox".into()), Restart::Always);
    agent.set_desired(vec![a.clone()]).await.unwrap();
    until(&mut rx, "running", |s| s.phase == ReplicaPhase::Running { ready: true }).await;
    assert!(d.running().contains(&a.id));
    agent.set_desired(vec![]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.running().contains(&a.id) {
        assert!(Instant::now() < deadline, "the replica was not stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_liveness_probe_restarts_the_replica() {
    let d = MemoryDriver::new().unwrap();
    let (agent, mut rx) = Agent::start(vec![Arc::new(d.clone())], AgentConfig::default());
    let mut a = spec("live", Image::Container("busybox".into()), Restart::Always);
    a.restart.backoff_initial = Duration::from_millis(50);
    a.liveness = Some(Probe {
        period_ms: 100,
        timeout_ms: 100,
        failure_threshold: 2,
        ..Probe::new(ProbeCheck::Exec { command: vec!["check".into()] })
    });
    agent.set_desired(vec![a.clone()]).await.unwrap();
    until(&mut rx, "running", |s| matches!(s.phase, ReplicaPhase::Running { .. })).await;
    d.set_exec_code(1);
    let (s, _) =
        until(&mut rx, "a restart", |s| matches!(s.phase, ReplicaPhase::Restarting { .. })).await;
    match s.phase {
        ReplicaPhase::Restarting { reason, .. } => assert!(reason.contains("liveness"), "{reason}"),
        p => panic!("{p:?}"),
    }
    d.set_exec_code(0);
    until(&mut rx, "running again", |s| matches!(s.phase, ReplicaPhase::Running { .. })).await;
    assert_eq!(d.starts(&a.id), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_wasi_guest_is_restarted_with_growing_backoff_then_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = WasiConfig::new(dir.path());
    config.max_memory_mib = 64;
    config.max_replicas = 8;
    let wasi = WasiDriver::new(config).unwrap();
    let hash = wasi.store_module(&guests::crash()).unwrap();
    let mut s = spec("crashy", Image::Wasi(hash), Restart::OnFailure);
    s.restart.backoff_initial = Duration::from_millis(100);
    s.restart.max_restarts = Some(3);
    let (agent, mut rx) = Agent::start(vec![Arc::new(wasi.clone())], AgentConfig::default());
    agent.set_desired(vec![s.clone()]).await.unwrap();
    let (failed, seen) =
        until(&mut rx, "failed", |s| matches!(s.phase, ReplicaPhase::Failed(_))).await;
    match &failed.phase {
        ReplicaPhase::Failed(why) => {
            assert!(why.contains("trap") && why.contains("3 restarts"), "{why}")
        }
        p => panic!("{p:?}"),
    }
    assert_eq!(failed.restarts, 3);
    let backoffs: Vec<Duration> = seen
        .iter()
        .filter_map(|(_, s)| match s.phase {
            ReplicaPhase::Restarting { backoff, .. } => Some(backoff),
            _ => None,
        })
        .collect();
    assert_eq!(backoffs, [100, 200, 400].map(Duration::from_millis));
    // The waits really happened: the restarts are spread over at least their sum.
    let starts: Vec<Instant> = seen
        .iter()
        .filter(|(_, s)| matches!(s.phase, ReplicaPhase::Running { .. }))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(starts.len(), 4, "{seen:?}");
    assert!(starts[3] - starts[0] >= Duration::from_millis(650), "{:?}", starts[3] - starts[0]);
    assert!(wasi.status(&s.id).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_what_runs_and_stops_strays() {
    let d = MemoryDriver::new().unwrap();
    let a = spec("kept", Image::Container("busybox".into()), Restart::Always);
    let b = spec("stray", Image::Container("busybox".into()), Restart::Always);
    d.start(&a).await.unwrap();
    d.start(&b).await.unwrap();
    let (agent, mut rx) = Agent::start(vec![Arc::new(d.clone())], AgentConfig::default());
    agent.set_desired(vec![a.clone()]).await.unwrap();
    until(&mut rx, "adopted", |s| s.id == a.id && matches!(s.phase, ReplicaPhase::Running { .. }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.running().contains(&b.id) {
        assert!(Instant::now() < deadline, "the stray was not stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(d.starts(&a.id), 1, "adopted, not started again");
    // The adopted replica is watched: its exit is noticed and it is restarted.
    d.exit(&a.id, 1);
    until(&mut rx, "restart", |s| matches!(s.phase, ReplicaPhase::Restarting { .. })).await;
}
