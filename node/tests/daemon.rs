//! Whole nodes in one process on loopback: init, enroll with invites, a WASI workload with
//! three replicas applied through a node that is not the leader, replicas running with
//! readable logs, a node leaving and its replica moving, and deletion stopping everything.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudless_consensus::api::{ApiRequest, ApiResponse, SignedCommand};
use cloudless_consensus::invite::{Grant, Invite};
use cloudless_consensus::state::{Command, NodeRole, Phase, Settings};
use cloudless_consensus::{Config, Consistency};
use cloudless_mesh::{OpenGate, RelayMode};
use cloudless_node::daemon::{Daemon, DaemonConfig};
use cloudless_runtime::{Driver, ReplicaId};
use cloudless_types::{Image, Resources, WorkloadSpec};
use ed25519_dalek::SigningKey;
use libp2p::Multiaddr;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn until<F: AsyncFnMut() -> bool>(what: &str, deadline: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

async fn node(dir: &std::path::Path, bootstrap: Vec<Multiaddr>) -> Daemon {
    let mut mesh = cloudless_mesh::Config {
        data_dir: dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap,
        mdns: false,
        relay: RelayMode::Never,
        ..cloudless_mesh::Config::default()
    };
    mesh.descriptor.zone = Some("z".into());
    let config = DaemonConfig {
        mesh,
        consensus: Config { quiet_start: Duration::from_secs(2), ..Config::default() },
        offer: Resources { cpu_millis: 2000, memory_mib: 512, disk_mib: 0, gpus: 0 },
        allow_network: false,
    };
    Daemon::start(config, Arc::new(OpenGate)).await.unwrap()
}

async fn addrs(d: &Daemon) -> Vec<Multiaddr> {
    let mut a = Vec::new();
    until("listening", Duration::from_secs(10), async || {
        a = d.mesh().listen_addrs().await.unwrap();
        !a.is_empty()
    })
    .await;
    a.into_iter().map(|a| a.with(libp2p::multiaddr::Protocol::P2p(d.peer_id()))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_workload_runs_moves_and_stops_across_real_nodes() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let root = SigningKey::from_bytes(&[7; 32]);
    let admin = SigningKey::from_bytes(&[1; 32]);
    let first = node(dirs[0].path(), vec![]).await;
    let settings = Settings {
        name: "pool".into(),
        root_key: root.verifying_key().to_bytes(),
        voter_target: None,
        phones_may_vote: false,
    };
    first.init(settings, admin.verifying_key().to_bytes()).await.unwrap();
    let boot = addrs(&first).await;
    let mut nodes = vec![first];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let d = node(dir.path(), boot.clone()).await;
        let grant = Grant {
            roles: [NodeRole::Worker, NodeRole::Voter].into(),
            labels: Default::default(),
            max_uses: 1,
            expires_ms: now_ms() + 60_000,
        };
        let invite = Invite::create(&root, "pool", vec![], grant, [i as u8; 16]);
        let enroll = Command::Enroll {
            token: invite.token,
            signature: invite.signature,
            peer: d.peer_id().to_string(),
        };
        let mut answer = None;
        until("enrolled", Duration::from_secs(30), async || {
            answer = d.ask_member(ApiRequest::Node(enroll.clone())).await.ok();
            matches!(answer, Some(ApiResponse::Applied(Ok(_))))
        })
        .await;
        nodes.push(d);
    }
    until("three voters", Duration::from_secs(30), async || {
        nodes[0].consensus().voters().len() == 3
    })
    .await;

    // Publish through a node that is not the leader; the module is stored on that node only.
    let leader = (0..3).find(|i| nodes[*i].consensus().is_leader()).unwrap();
    let via = (leader + 1) % 3;
    let hash =
        nodes[via].wasi().store_module(include_bytes!("../../examples/hello/hello.wat")).unwrap();
    let spec = WorkloadSpec::new(
        "hello",
        Image::Wasi(hash.clone()),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        3,
    );
    let put = SignedCommand::sign(&admin, 77, 1, now_ms(), Command::PutWorkload(Box::new(spec)));
    let answer = nodes[via].ask_member(ApiRequest::User(put)).await.unwrap();
    assert!(matches!(answer, ApiResponse::Applied(Ok(_))), "{answer:?}");
    let submitted = Instant::now();
    let running = |c: &cloudless_consensus::state::State| {
        c.statuses().values().filter(|s| s.phase == Phase::Running).count()
    };
    until("three replicas run", Duration::from_secs(30), async || {
        nodes[leader].consensus().read(Consistency::Linearizable, running).await.unwrap() == 3
    })
    .await;
    eprintln!("submit to three running: {:?}", submitted.elapsed());

    // Logs are readable where a replica runs.
    let assignments = nodes[leader]
        .consensus()
        .read(Consistency::Stale, |s| s.assignments().clone())
        .await
        .unwrap();
    let (key, a) = assignments.iter().next().unwrap();
    let host = nodes.iter().position(|n| n.peer_id().to_string() == a.node).unwrap();
    let id = ReplicaId::new(&key.workload, key.index);
    until("a log line", Duration::from_secs(10), async || {
        nodes[host]
            .wasi()
            .logs(&id, 5)
            .await
            .is_ok_and(|l| l.iter().any(|l| l.text == "hello from a Cloudless replica"))
    })
    .await;

    // The node running replica 0 leaves (it may be the leader): its replicas run elsewhere.
    let gone = host;
    let observer = (gone + 1) % 3;
    let gone_peer = nodes[gone].peer_id().to_string();
    // Every raft member keeps a copy of the module, so it outlives the node it came from.
    until("module copies", Duration::from_secs(10), async || {
        nodes.iter().all(|n| n.wasi().has_module(&hash))
    })
    .await;
    let left = Instant::now();
    nodes[gone].shutdown().await;
    until("replicas moved", Duration::from_secs(30), async || {
        let moved = |s: &cloudless_consensus::state::State| {
            s.assignments().len() == 3
                && s.assignments().values().all(|a| a.node != gone_peer)
                && s.statuses()
                    .values()
                    .filter(|st| st.phase == Phase::Running && st.node != gone_peer)
                    .count()
                    == 3
        };
        nodes[observer].consensus().read(Consistency::Linearizable, moved).await.unwrap_or(false)
    })
    .await;
    eprintln!("replicas of a departed node running elsewhere {:?} after it left", left.elapsed());

    // Deleting the workload stops every replica.
    let delete = SignedCommand::sign(
        &admin,
        77,
        2,
        now_ms(),
        Command::DeleteWorkload { name: "hello".into() },
    );
    let answer = nodes[observer].ask_member(ApiRequest::User(delete)).await.unwrap();
    assert!(matches!(answer, ApiResponse::Applied(Ok(_))), "{answer:?}");
    for (i, n) in nodes.iter().enumerate() {
        if i == gone {
            continue;
        }
        until("replicas stopped", Duration::from_secs(15), async || {
            n.wasi().list().await.unwrap().is_empty()
        })
        .await;
    }
    for (i, n) in nodes.iter().enumerate() {
        if i != gone {
            n.shutdown().await;
        }
    }
}
