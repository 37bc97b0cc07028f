//! A node behind a NAT, with no listen address of its own, is reachable through a relay: it
//! reserves a slot on a relay it learns of, advertises the circuit address, joins the
//! membership, and serves an RPC to a client that can only reach it through the relay.

use std::sync::Arc;
use std::time::Duration;

use cloudless_mesh::membership::State;
use cloudless_mesh::{Config, RelayMode, Role};
use cloudless_testnet::{Echo, Testnet, serve_echo, test_config, wait_until};
use libp2p::multiaddr::Protocol;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_nat_is_reached_through_a_relay() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // Node 0 is a public relay; node 1 is an ordinary member; node 2 sits behind a NAT.
    let net = Testnet::start_with(
        3,
        Arc::new(|i, c: &mut Config| match i {
            0 => c.relay = RelayMode::Always,
            2 => {
                c.behind_nat = true;
                c.listen.clear();
            }
            _ => {}
        }),
    )
    .await
    .unwrap();
    let natted = net.peer(2);
    let circuit = net.addrs(2).to_vec();
    assert!(!circuit.is_empty());
    assert!(
        circuit.iter().all(|a| a.iter().any(|p| p == Protocol::P2pCircuit)),
        "the natted node can only be reached through circuits: {circuit:?}"
    );
    net.wait_until("all three see each other alive", DEADLINE, || net.converged()).await.unwrap();
    // Its directory entry tells everyone how to reach it.
    net.wait_until("node 1 knows the circuit address", DEADLINE, || async {
        let dir = net.handle(1).unwrap().directory().await.unwrap();
        dir.get(&natted).is_some_and(|d| d.addrs.iter().any(|a| a.contains("p2p-circuit")))
    })
    .await
    .unwrap();

    serve_echo(net.handle(2).unwrap(), "relayed: ").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path().to_path_buf());
    config.role = Role::Client;
    config.listen.clear();
    config.bootstrap = net.addrs(0).to_vec();
    let client = cloudless_mesh::start(config, Arc::new(cloudless_mesh::OpenGate)).await.unwrap();
    let c = client.handle.clone();
    // libp2p's relay client cancels a circuit dial issued while its own connection to the
    // relay is still being set up, so dial once the relay is connected (RPCs retry by
    // themselves after a lookup).
    let relay = net.peer(0);
    wait_until("the client connects to the relay", DEADLINE, &mut || {
        let c = c.clone();
        async move { c.connected_peers().await.unwrap().contains(&relay) }
    })
    .await
    .unwrap();
    c.dial(circuit[0].clone()).await.unwrap();
    wait_until("the client reaches the natted node through the relay", DEADLINE, &mut || {
        let c = c.clone();
        async move { c.connected_peers().await.unwrap().contains(&natted) }
    })
    .await
    .unwrap();
    let answer = c.call::<Echo>(natted, &"hi".to_string()).await.unwrap();
    assert_eq!(answer, "relayed: hi");
    wait_until("the relay carries membership too", DEADLINE, &mut || {
        net.all_see(&[0, 1], &[2], State::Alive)
    })
    .await
    .unwrap();
    client.task.abort();
}
