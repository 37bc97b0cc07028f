//! Real swarms on loopback: membership, directory, partitions and RPC, end to end.
//!
//! Every test waits on conditions with deadlines; none sleeps for a fixed time to let
//! something happen.

use std::sync::Arc;
use std::time::Duration;

use cloudless_mesh::membership::State;
use cloudless_mesh::rpc::{RemoteErrorKind, Rpc, RpcError};
use cloudless_mesh::{Config, Role};
use cloudless_testnet::{Echo, Testnet, serve_echo, test_config, wait_until};
use cloudless_types::{Capacity, NodeDescriptor, Power, Runtime, Runtimes};

/// Generous bound for a cluster of ten to converge on a loaded two-core CI machine.
const CONVERGE: Duration = Duration::from_secs(60);
/// Bound for a failure or leave to be seen everywhere (defaults: probe 200 ms, suspicion
/// 0.6–4 s; the bound leaves room for a busy machine).
const DETECT: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Ten nodes that only know node 0 find each other, agree everyone is alive, and each holds
/// every node's directory entry and capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge_from_one_bootstrap_peer() {
    init_tracing();
    let net = Testnet::start_with(
        10,
        Arc::new(|i, c: &mut Config| {
            c.capacity = Some(Capacity {
                cpu_total_millis: 1000 * (i as u32 + 1),
                cpu_free_millis: 500,
                memory_total_mib: 2048,
                memory_free_mib: 1024,
                disk_total_mib: 20_000,
                disk_free_mib: 10_000,
                workloads: 0,
                power: Power::Mains,
                metered: false,
                runtimes: Runtimes::of(&[Runtime::Wasi]),
            });
            c.descriptor.labels.insert("index".into(), i.to_string());
        }),
    )
    .await
    .unwrap();
    let took =
        net.wait_until("all ten see all ten alive", CONVERGE, || net.converged()).await.unwrap();
    eprintln!("membership converged in {took:?}");
    net.wait_until("every directory holds ten valid entries", CONVERGE, || async {
        for i in 0..10 {
            let dir = net.handle(i).unwrap().directory().await.unwrap();
            if dir.len() != 10 || dir.values().any(|d| d.addrs.is_empty()) {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    // Capacity travelled with the join messages and floods.
    let view = net.members(3).await;
    let seven = view.iter().find(|m| m.id == net.peer(7)).unwrap();
    assert_eq!(seven.capacity.unwrap().cpu_total_millis, 8000);
    let dir = net.handle(9).unwrap().directory().await.unwrap();
    assert_eq!(dir[&net.peer(2)].labels["index"], "2");
}

/// A crashed node (no goodbye) is declared dead by every other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_seen_dead_by_all() {
    init_tracing();
    let mut net = Testnet::start(5).await.unwrap();
    net.wait_until("five converge", CONVERGE, || net.converged()).await.unwrap();
    net.kill(4).await;
    let took = net
        .wait_until("all see node 4 dead", DETECT, || net.all_see(&[0, 1, 2, 3], &[4], State::Dead))
        .await
        .unwrap();
    eprintln!("crash declared dead everywhere in {took:?}");
    for i in 0..4 {
        assert!(!net.ever_saw(i, 4, State::Left), "node {i} took a crash for a leave");
    }
}

/// A node that leaves is seen as left, never as dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_node_is_seen_left_not_dead() {
    init_tracing();
    let mut net = Testnet::start(5).await.unwrap();
    net.wait_until("five converge", CONVERGE, || net.converged()).await.unwrap();
    net.leave(2).await.unwrap();
    net.wait_until("all see node 2 left", DETECT, || net.all_see(&[0, 1, 3, 4], &[2], State::Left))
        .await
        .unwrap();
    // Never dead. (A passing suspicion is not asserted against: on a starved CI machine any
    // node may miss a probe deadline and be suspected, then refute; the leave still wins.)
    for i in [0, 1, 3, 4] {
        assert!(!net.ever_saw(i, 2, State::Dead), "node {i} took a leave for a failure");
    }
}

/// Two sides of a partition each declare the other dead and edit their directory entries;
/// after the heal, membership merges and every copy of the directory is identical and holds
/// both sides' edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal_converge_the_directory() {
    init_tracing();
    let mut net = Testnet::start(6).await.unwrap();
    net.wait_until("six converge", CONVERGE, || net.converged()).await.unwrap();
    let (a, b): (&[usize], &[usize]) = (&[0, 1, 2], &[3, 4, 5]);
    net.partition(&[a, b]).await.unwrap();
    net.wait_until("each side sees the other dead", DETECT, || async {
        net.all_see(a, b, State::Dead).await && net.all_see(b, a, State::Dead).await
    })
    .await
    .unwrap();
    for i in [1usize, 4] {
        let mut d = NodeDescriptor::default();
        d.labels.insert("edited".into(), format!("during-partition-{i}"));
        d.zone = Some(format!("zone-{i}"));
        net.handle(i).unwrap().set_descriptor(d).await.unwrap();
    }
    net.heal().await.unwrap();
    let took = net
        .wait_until("membership merges after the heal", CONVERGE, || net.converged())
        .await
        .unwrap();
    eprintln!("membership merged {took:?} after the heal");
    net.wait_until("all directories are identical and hold both edits", CONVERGE, || async {
        let first = net.handle(0).unwrap().directory_stats().await.unwrap();
        for i in 0..6 {
            let h = net.handle(i).unwrap();
            if h.directory_stats().await.unwrap() != first {
                return false;
            }
            let dir = h.directory().await.unwrap();
            for e in [1usize, 4] {
                match dir.get(&net.peer(e)) {
                    Some(d) if d.zone.as_deref() == Some(format!("zone-{e}").as_str()) => {}
                    _ => return false,
                }
            }
        }
        true
    })
    .await
    .unwrap();
}

/// A crashed node restarted from its data dir keeps its identity and comes back alive
/// everywhere (its higher incarnation outranks its death).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_alive_again_everywhere() {
    init_tracing();
    let mut net = Testnet::start(4).await.unwrap();
    net.wait_until("four converge", CONVERGE, || net.converged()).await.unwrap();
    net.kill(3).await;
    net.wait_until("all see node 3 dead", DETECT, || net.all_see(&[0, 1, 2], &[3], State::Dead))
        .await
        .unwrap();
    net.restart(3).await.unwrap();
    net.wait_until("node 3 is alive everywhere again", CONVERGE, || net.converged()).await.unwrap();
    let me = net.members(3).await.into_iter().find(|m| m.id == net.peer(3)).unwrap();
    assert!(me.incarnation >= 1, "restart must raise the incarnation, got {}", me.incarnation);
}

/// A client that knows only node 0 calls a service on node 2, which it never dialed: the
/// DHT finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_reaches_a_peer_found_through_the_dht() {
    init_tracing();
    let net = Testnet::start(3).await.unwrap();
    net.wait_until("three converge", CONVERGE, || net.converged()).await.unwrap();
    serve_echo(net.handle(2).unwrap(), "echo: ").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path().to_path_buf());
    config.role = Role::Client;
    config.bootstrap = net.addrs(0).to_vec();
    let client = cloudless_mesh::start(config, Arc::new(cloudless_mesh::OpenGate)).await.unwrap();
    let c = client.handle.clone();
    wait_until("the client connects to node 0", CONVERGE, &mut || {
        let c = c.clone();
        let p0 = net.peer(0);
        async move { c.connected_peers().await.unwrap().contains(&p0) }
    })
    .await
    .unwrap();
    let answer = c.call::<Echo>(net.peer(2), &"hello".to_string()).await.unwrap();
    assert_eq!(answer, "echo: hello");
    // A client is no member: the cluster never lists it.
    assert!(net.members(0).await.iter().all(|m| m.id != c.peer_id()));
    client.task.abort();
}

/// Refusals are clear and local where they can be: oversize requests never leave, unknown
/// services and gate refusals come back typed, and the serving node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_errors_are_typed_and_leave_the_server_serving() {
    init_tracing();
    let net = Testnet::start(2).await.unwrap();
    net.wait_until("two converge", CONVERGE, || net.converged()).await.unwrap();
    let (a, b) = (net.handle(0).unwrap().clone(), net.handle(1).unwrap().clone());
    serve_echo(&b, "").await.unwrap();
    let big = vec![0u8; 5 * 1024 * 1024];
    let err = a.request(b.peer_id(), Echo::SERVICE, big, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, RpcError::TooLarge { .. }), "{err}");
    let err = a
        .request(b.peer_id(), "no.such.service", vec![], Duration::from_secs(5))
        .await
        .unwrap_err();
    match err {
        RpcError::Remote { error, .. } => assert_eq!(error.kind, RemoteErrorKind::UnknownService),
        other => panic!("unexpected {other}"),
    }
    // A body that is not a String: the handler reports a bad request.
    let err = a
        .request(
            b.peer_id(),
            Echo::SERVICE,
            vec![0xff, 0xff, 0xff, 0xff, 0xff],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    match err {
        RpcError::Remote { error, .. } => {
            assert_eq!(error.kind, RemoteErrorKind::BadRequest, "{error}")
        }
        other => panic!("unexpected {other}"),
    }
    let ok = a.call::<Echo>(b.peer_id(), &"still here".to_string()).await.unwrap();
    assert_eq!(ok, "still here");
}

/// A node whose bootstrap peer is unreachable when it starts (a device that boots before its
/// network) keeps trying and joins once the peer is reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_dialing_its_bootstrap_peer_until_it_joins() {
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Switch(AtomicBool);
    impl cloudless_mesh::Gate for Switch {
        fn admits(&self, _: &libp2p::PeerId) -> bool {
            self.0.load(Ordering::SeqCst)
        }
        fn allows(&self, _: &libp2p::PeerId, _: cloudless_mesh::Protocol<'_>) -> bool {
            true
        }
    }

    init_tracing();
    let net = Testnet::start(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path().to_path_buf());
    config.bootstrap = net.addrs(0).to_vec();
    let switch = Arc::new(Switch(AtomicBool::new(false)));
    let b = cloudless_mesh::start(config, switch.clone()).await.unwrap();
    let h = b.handle.clone();
    let alone = || async { h.members().await.unwrap().len() == 1 };
    wait_until("the first dial has been refused", CONVERGE, &mut || async { alone().await })
        .await
        .unwrap();
    assert!(h.connected_peers().await.unwrap().is_empty());
    switch.0.store(true, Ordering::SeqCst);
    let a = net.peer(0);
    wait_until("the node joins once its bootstrap peer is reachable", CONVERGE, &mut || {
        let h = h.clone();
        async move { h.members().await.unwrap().iter().any(|m| m.id == a && m.state == State::Alive) }
    })
    .await
    .unwrap();
    b.task.abort();
}

/// A peer that connected while it was a stranger (blacklisted in gossipsub, so it floods
/// nothing to us and gets nothing from us) joins our flood mesh once it is enrolled and the
/// gate is rechecked: gossipsub kept its subscription while it was blacklisted, so lifting
/// the blacklist is enough. Without that, a device that joins through a node it first met
/// as a stranger would get membership news only by piggyback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_enrolled_later_joins_the_flood_mesh() {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Admits everyone; lets them use membership only once `enrolled`.
    struct Enrollment(AtomicBool);
    impl cloudless_mesh::Gate for Enrollment {
        fn admits(&self, _: &libp2p::PeerId) -> bool {
            true
        }
        fn allows(&self, _: &libp2p::PeerId, p: cloudless_mesh::Protocol<'_>) -> bool {
            !matches!(p, cloudless_mesh::Protocol::Membership) || self.0.load(Ordering::SeqCst)
        }
    }

    init_tracing();
    let dir_a = tempfile::tempdir().unwrap();
    let gate = Arc::new(Enrollment(AtomicBool::new(false)));
    let a =
        cloudless_mesh::start(test_config(dir_a.path().to_path_buf()), gate.clone()).await.unwrap();
    let ha = a.handle.clone();
    let mut addrs = Vec::new();
    wait_until("a listens", CONVERGE, &mut || {
        let ha = ha.clone();
        async move { !ha.listen_addrs().await.unwrap().is_empty() }
    })
    .await
    .unwrap();
    addrs.extend(ha.listen_addrs().await.unwrap());
    let dir_b = tempfile::tempdir().unwrap();
    let mut config = test_config(dir_b.path().to_path_buf());
    config.bootstrap = addrs
        .into_iter()
        .map(|addr| addr.with(libp2p::multiaddr::Protocol::P2p(ha.peer_id())))
        .collect();
    let b = cloudless_mesh::start(config, Arc::new(cloudless_mesh::OpenGate)).await.unwrap();
    let pb = b.handle.peer_id();
    wait_until("b connects to a", CONVERGE, &mut || {
        let ha = ha.clone();
        async move { ha.connected_peers().await.unwrap().contains(&pb) }
    })
    .await
    .unwrap();
    // While a stranger, b stays out of a's flood mesh, watched over six gossipsub heartbeats
    // (0.5 s each; a member would be grafted at the first).
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert!(!ha.flood_peers().await.unwrap().contains(&pb), "a stranger in the flood mesh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.0.store(true, Ordering::SeqCst);
    ha.recheck_gate().await.unwrap();
    wait_until("b joins a's flood mesh", CONVERGE, &mut || {
        let ha = ha.clone();
        async move { ha.flood_peers().await.unwrap().contains(&pb) }
    })
    .await
    .unwrap();
    b.task.abort();
    a.task.abort();
}
