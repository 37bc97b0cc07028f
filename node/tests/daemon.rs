//! Whole nodes in one process on loopback: init, enroll with invites, a WASI workload with
//! three replicas applied through a node that is not the leader, replicas running with
//! readable logs, the node running a replica leaving and its replicas moving, and deletion
//! stopping everything.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cloudless_consensus::Consistency;
use cloudless_consensus::state::{Command, State};
use cloudless_node::local::LocalCluster;
use cloudless_runtime::wasi::WasiDriver;
use cloudless_runtime::{Driver, RunState};
use cloudless_types::{Image, ModuleHash, Resources, WorkloadName, WorkloadSpec};
use ed25519_dalek::SigningKey;

async fn until<F: AsyncFnMut() -> bool>(what: &str, deadline: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// The (node, replica index) pairs the nodes' runtimes run now, read node by node.
async fn running_on(drivers: &[WasiDriver]) -> BTreeSet<(usize, u32)> {
    let mut now = BTreeSet::new();
    for (i, d) in drivers.iter().enumerate() {
        for o in d.list().await.unwrap_or_default() {
            if matches!(o.state, RunState::Running { .. }) {
                now.insert((i, o.id.index));
            }
        }
    }
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_workload_runs_moves_and_stops_across_real_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let root = SigningKey::from_bytes(&[7; 32]);
    let admin = SigningKey::from_bytes(&[1; 32]);
    let mut c = LocalCluster::start(3, dir.path(), root, admin, |_, config| {
        config.consensus.quiet_start = Duration::from_secs(2);
    })
    .await
    .unwrap();

    // Publish through a node that is not the leader; the module is stored on that node only.
    let leader = (0..3).find(|i| c.nodes[*i].consensus().is_leader()).unwrap();
    let via = (leader + 1) % 3;
    let spec = WorkloadSpec::new(
        cloudless_types::WorkloadName::new("hello").unwrap(),
        Image::Wasi(ModuleHash::of(b"")),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        3,
    );
    let module = include_bytes!("../../examples/hello/hello.wat");
    let submitted = Instant::now();
    c.apply_wasi(via, spec, module).await.unwrap();
    let running = |s: &State| s.statuses().values().filter(|s| s.phase.is_running()).count();
    until("three replicas run", Duration::from_secs(30), async || {
        c.nodes[leader].consensus().read(Consistency::Linearizable, running).await.unwrap() == 3
    })
    .await;
    eprintln!("submit to three running: {:?}", submitted.elapsed());

    // Logs are readable where a replica runs.
    let assignments = c.nodes[leader]
        .consensus()
        .read(Consistency::Stale, |s| s.assignments().clone())
        .await
        .unwrap();
    let (key, a) = assignments.iter().next().unwrap();
    let host = c.nodes.iter().position(|n| *n.name() == a.node).unwrap();
    let id = key.clone();
    until("a log line", Duration::from_secs(10), async || {
        c.nodes[host]
            .wasi()
            .logs(&id, 5)
            .await
            .is_ok_and(|l| l.iter().any(|l| l.text == "hello from a Cloudless replica"))
    })
    .await;

    // The node running replica 0 leaves (it may be the leader): its replicas run elsewhere.
    let gone = host;
    let observer = (gone + 1) % 3;
    let gone_peer = c.nodes[gone].name().clone();
    let hash = ModuleHash::of(module);
    // Every raft member keeps a copy of the module, so it outlives the node it came from.
    until("module copies", Duration::from_secs(10), async || {
        c.nodes.iter().all(|n| n.wasi().has_module(&hash))
    })
    .await;
    let left = Instant::now();
    c.nodes[gone].shutdown().await;
    until("replicas moved", Duration::from_secs(30), async || {
        let moved = |s: &State| {
            s.assignments().len() == 3
                && s.assignments().values().all(|a| a.node != gone_peer)
                && s.statuses()
                    .values()
                    .filter(|st| st.phase.is_running() && st.node != gone_peer)
                    .count()
                    == 3
        };
        c.nodes[observer].consensus().read(Consistency::Linearizable, moved).await.unwrap_or(false)
    })
    .await;
    eprintln!("replicas of a departed node running elsewhere {:?} after it left", left.elapsed());

    // Deleting the workload stops every replica.
    c.command(observer, Command::DeleteWorkload { name: WorkloadName::new("hello").unwrap() })
        .await
        .unwrap();
    for (i, n) in c.nodes.iter().enumerate() {
        if i != gone {
            until("replicas stopped", Duration::from_secs(15), async || {
                n.wasi().list().await.unwrap().is_empty()
            })
            .await;
        }
    }
    for (i, n) in c.nodes.iter().enumerate() {
        if i != gone {
            n.shutdown().await;
        }
    }
}

/// Containers on nodes that have an engine (`.ci/engine` starts one; set
/// CLOUDLESS_SKIP_CONTAINER_TESTS=1 to skip where none can run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_workload_runs_on_nodes_with_an_engine() {
    if std::env::var("CLOUDLESS_SKIP_CONTAINER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("container tests skipped (CLOUDLESS_SKIP_CONTAINER_TESTS=1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let mut c = LocalCluster::start(
        3,
        dir.path(),
        SigningKey::from_bytes(&[7; 32]),
        SigningKey::from_bytes(&[1; 32]),
        |_, config| {
            let node = config.mesh.data_dir.file_name().unwrap().to_string_lossy().to_string();
            config.containers = Some(cloudless_runtime::container::ContainerConfig {
                scope: format!("t{pid}-{node}"),
                ..Default::default()
            });
        },
    )
    .await
    .expect("the nodes start (is a container engine running? `eval \"$(.ci/engine)\"`)");
    let image =
        std::env::var("CLOUDLESS_TEST_IMAGE").unwrap_or_else(|_| "cloudless/busybox:test".into());
    let mut spec = WorkloadSpec::new(
        cloudless_types::WorkloadName::new("boxed").unwrap(),
        Image::Container(image),
        Resources { cpu_millis: 100, memory_mib: 32, disk_mib: 0, gpus: 0 },
        2,
    );
    spec.command = vec!["sh".into(), "-c".into(), "echo up; exec sleep 600".into()];
    c.command(1, Command::PutWorkload(Box::new(spec))).await.unwrap();
    let running = |s: &State| s.statuses().values().filter(|s| s.phase.is_running()).count();
    until("two containers run", Duration::from_secs(60), async || {
        c.nodes[0].consensus().read(Consistency::Linearizable, running).await.unwrap() == 2
    })
    .await;
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let ours = async || {
        let filters =
            std::collections::HashMap::from([("label", vec![format!("cloudless.replica")])]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::new()
            .filters(&filters)
            .build();
        docker
            .list_containers(Some(options))
            .await
            .unwrap()
            .into_iter()
            .filter(|s| {
                s.labels
                    .as_ref()
                    .and_then(|l| l.get("cloudless.node"))
                    .is_some_and(|n| n.starts_with(&format!("t{pid}-")))
            })
            .count()
    };
    assert_eq!(ours().await, 2, "two running containers carry our labels");
    c.command(1, Command::DeleteWorkload { name: WorkloadName::new("boxed").unwrap() })
        .await
        .unwrap();
    until("containers removed", Duration::from_secs(60), async || ours().await == 0).await;
    c.shutdown().await;
}

/// A pool of one: the node is its own raft member and answers its own requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_pool_runs_a_workload() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = LocalCluster::start(
        1,
        dir.path(),
        SigningKey::from_bytes(&[7; 32]),
        SigningKey::from_bytes(&[1; 32]),
        |_, _| {},
    )
    .await
    .unwrap();
    let spec = WorkloadSpec::new(
        cloudless_types::WorkloadName::new("solo").unwrap(),
        Image::Wasi(ModuleHash::of(b"")),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    c.apply_wasi(0, spec, include_bytes!("../../examples/hello/hello.wat")).await.unwrap();
    let running = |s: &State| s.statuses().values().filter(|s| s.phase.is_running()).count();
    until("the replica runs", Duration::from_secs(30), async || {
        c.nodes[0].consensus().read(Consistency::Linearizable, running).await.unwrap() == 1
    })
    .await;
    c.shutdown().await;
}

/// A drain hands replicas over start-before-stop and never takes a workload below its
/// min-available: node 2 runs all three replicas of a `minAvailable: 2` workload, node 0 has
/// room for one more and node 1 for none. Draining node 2 moves one replica (its replacement
/// runs on node 0 before the original stops), stops the one the workload can spare, and
/// keeps the third where it is. Every node's runtime is sampled all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_keeps_min_available_and_starts_replacements_first() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use cloudless_api::Schedulable;

    let dir = tempfile::tempdir().unwrap();
    let mut c = LocalCluster::start(
        3,
        dir.path(),
        SigningKey::from_bytes(&[7; 32]),
        SigningKey::from_bytes(&[1; 32]),
        |i, config| {
            config.consensus.quiet_start = Duration::from_secs(2);
            config.offer.cpu_millis = [1000, 500, 2000][i];
        },
    )
    .await
    .unwrap();
    let names: Vec<_> = c.nodes.iter().map(|n| n.name().clone()).collect();
    let set =
        |i: usize, schedulable| Command::SetSchedulable { peer: names[i].clone(), schedulable };
    for i in 0..2 {
        c.command(0, set(i, Schedulable::Cordoned)).await.unwrap();
    }
    let mut spec = WorkloadSpec::new(
        WorkloadName::new("kept").unwrap(),
        Image::Wasi(ModuleHash::of(b"")),
        Resources { cpu_millis: 600, memory_mib: 16, disk_mib: 0, gpus: 0 },
        3,
    );
    spec.min_available = 2;
    c.apply_wasi(0, spec, include_bytes!("../../examples/hello/hello.wat")).await.unwrap();
    let running = |s: &State| s.statuses().values().filter(|s| s.phase.is_running()).count();
    until("three replicas run on node 2", Duration::from_secs(30), async || {
        c.nodes[0].consensus().read(Consistency::Linearizable, running).await.unwrap() == 3
    })
    .await;
    for i in 0..2 {
        c.command(0, set(i, Schedulable::Yes)).await.unwrap();
    }

    // Sample what every node's runtime runs: (node, replica index) pairs, every 5 ms.
    let drivers: Vec<_> = c.nodes.iter().map(|n| n.wasi().clone()).collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut samples: Vec<BTreeSet<(usize, u32)>> = Vec::new();
            while sampling.load(Ordering::SeqCst) {
                samples.push(running_on(&drivers).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        })
    };
    c.command(0, set(2, Schedulable::Draining)).await.unwrap();
    let settled = |s: &State| {
        let on = |i: usize| s.runs_on(&names[i]).count();
        (on(0), on(1), on(2), s.assignments().values().filter(|a| a.from.is_some()).count())
    };
    until(
        "one replica moved to node 0, one stopped, one kept",
        Duration::from_secs(30),
        async || {
            c.nodes[0].consensus().read(Consistency::Linearizable, settled).await.unwrap()
                == (1, 0, 1, 0)
        },
    )
    .await;
    // The runtimes agree: read after the sampler's last sample, which may predate it (a
    // sample is taken node by node, while replicas stop and start).
    let per_node = |set: &BTreeSet<(usize, u32)>| {
        set.iter().fold(BTreeMap::new(), |mut m: BTreeMap<usize, usize>, (n, _)| {
            *m.entry(*n).or_default() += 1;
            m
        })
    };
    let drivers: Vec<_> = c.nodes.iter().map(|n| n.wasi().clone()).collect();
    let mut last = BTreeSet::new();
    until("the runtimes agree", Duration::from_secs(15), async || {
        last = running_on(&drivers).await;
        per_node(&last) == BTreeMap::from([(0, 1), (2, 1)])
    })
    .await;
    sampling.store(false, Ordering::SeqCst);
    let mut samples = sampler.await.unwrap();
    samples.push(last);
    assert!(samples.len() > 10, "{} samples", samples.len());
    for s in &samples {
        let indexes: BTreeSet<u32> = s.iter().map(|(_, i)| *i).collect();
        assert!(indexes.len() >= 2, "fewer than min-available ran: {s:?}");
    }
    // The moved replica ran on both nodes at once before its original stopped.
    let moved = samples.last().unwrap().iter().find(|(node, _)| *node == 0).unwrap().1;
    assert!(
        samples.iter().any(|s| s.contains(&(0, moved)) && s.contains(&(2, moved))),
        "replica {moved} never ran on both nodes: the replacement did not start first"
    );
    let first_on_0 = samples.iter().position(|s| s.contains(&(0, moved))).unwrap();
    let gone_from_2 = samples.iter().rposition(|s| s.contains(&(2, moved))).unwrap();
    assert!(
        first_on_0 <= gone_from_2,
        "started at sample {first_on_0}, stopped after {gone_from_2}"
    );
    // Why the third stays is shown to users (answered by the leader, which knows).
    let leader = (0..3).find(|i| c.nodes[*i].consensus().is_leader()).unwrap();
    let name = WorkloadName::new("kept").unwrap();
    let info = c.nodes[leader].api().workloads(Some(&name)).await.unwrap();
    let why = info[0].unschedulable.clone().unwrap_or_default();
    assert!(why.contains("held back") && why.contains("min-available 2"), "{why}");
    assert_eq!(per_node(samples.last().unwrap()), BTreeMap::from([(0, 1), (2, 1)]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_when_raft_storage_fails() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = cloudless_testnet::procs::tmpfs(dir.path(), 64).unwrap() else { return };
    let root = SigningKey::from_bytes(&[7; 32]);
    let admin = SigningKey::from_bytes(&[1; 32]);
    let mut c = LocalCluster::start(1, dir.path(), root, admin, |_, _| {}).await.unwrap();
    assert_eq!(c.nodes[0].readiness().health(), Ok(()));

    let mut filler = std::fs::File::create(dir.path().join("filler")).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while filler.write_all(&chunk).is_ok() {}
    // A write that touches no file but raft's log.
    let user =
        Command::PutUser { key: [9; 32], name: "probe".into(), role: cloudless_api::Role::Viewer };
    assert!(c.command(0, user).await.is_err(), "a write on a full disk succeeded");
    let node = &c.nodes[0];
    let why = tokio::time::timeout(Duration::from_secs(10), node.failed()).await.unwrap();
    let why = why.to_string();
    assert!(why.contains("raft stopped") && why.contains("No space left"), "{why}");
    let health = node.readiness().health().unwrap_err();
    assert!(health.contains("raft stopped"), "{health}");
    assert!(node.readiness().ready().is_err());
}
