//! Workload latencies on a local cluster of real nodes in one process (loopback QUIC, raft
//! with fsync, wasmtime), with percentiles over repeated runs:
//!
//!   cargo bench -p cloudless-node --bench workload
//!
//! - submit to running: a signed `PutWorkload` of a one-replica WASI workload sent through a
//!   node that is not the leader, until a linearizable read shows its replica running.
//! - failed replica running elsewhere: the node running a replica stops without a word (no
//!   leave, like SIGKILL) until the replica is reported running on another node.
//!
//! `ROUNDS` (default 50) and `KILLS` (default 10) set the samples. Processes and SIGKILL are
//! the subject of the testnet report (issue 6); this measures the same path in-process.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use cloudless_consensus::Consistency;
use cloudless_consensus::state::{Command, State};
use cloudless_node::local::LocalCluster;
use cloudless_types::{Image, ModuleHash, NodeName, Resources, WorkloadName, WorkloadSpec};
use ed25519_dalek::SigningKey;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn spec(name: &str) -> WorkloadSpec {
    WorkloadSpec::new(
        WorkloadName::new(name).unwrap(),
        Image::Wasi(ModuleHash::of(b"")),
        Resources { cpu_millis: 50, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    )
}

async fn running_on(c: &LocalCluster, via: usize, name: &str) -> Option<NodeName> {
    let name = WorkloadName::new(name).unwrap();
    c.nodes[via]
        .consensus()
        .read(Consistency::Linearizable, move |s: &State| {
            s.statuses()
                .iter()
                .find(|(k, st)| k.workload == name && st.phase.is_running())
                .map(|(_, st)| st.node.clone())
        })
        .await
        .ok()
        .flatten()
}

async fn cluster(dir: &std::path::Path) -> LocalCluster {
    let (root, admin) = (SigningKey::from_bytes(&[7; 32]), SigningKey::from_bytes(&[1; 32]));
    LocalCluster::start(3, dir, root, admin, |_, _| {}).await.unwrap()
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(50);
    let kills: usize = std::env::var("KILLS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let module = include_bytes!("../../examples/hello/hello.wat");
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path()).await;
        let leader = (0..3).find(|i| c.nodes[*i].consensus().is_leader()).unwrap();
        let via = (leader + 1) % 3;
        let mut samples = Vec::new();
        for r in 0..rounds {
            let name = format!("w{r}");
            let t = Instant::now();
            c.apply_wasi(via, spec(&name), module).await.unwrap();
            while running_on(&c, via, &name).await.is_none() {
                assert!(t.elapsed() < Duration::from_secs(30), "{name} never ran");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples.push(t.elapsed());
            let name = WorkloadName::new(name).unwrap();
            c.command(via, Command::DeleteWorkload { name }).await.unwrap();
        }
        println!(
            "submit to running (WASI, 1 replica, via a follower): P50 {:?}  P99 {:?}  max {:?}  ({rounds} runs)",
            pct(&mut samples, 0.5),
            pct(&mut samples, 0.99),
            pct(&mut samples, 1.0)
        );
        c.shutdown().await;

        let mut samples = Vec::new();
        for k in 0..kills {
            let dir = tempfile::tempdir().unwrap();
            let mut c = cluster(dir.path()).await;
            let leader = (0..3).find(|i| c.nodes[*i].consensus().is_leader()).unwrap();
            // The leader stays up: this measures failure detection and rescheduling (a lost
            // leader adds an election, which the raft benchmark measures).
            c.apply_wasi(leader, spec("victim"), module).await.unwrap();
            let host = loop {
                if let Some(n) = running_on(&c, leader, "victim").await {
                    break n;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let host_i = c.nodes.iter().position(|n| *n.name() == host).unwrap();
            if host_i == leader {
                // The replica landed on the leader: no sample from this round.
                c.shutdown().await;
                continue;
            }
            // Every member holds the module before the host dies.
            let hash = ModuleHash::of(module);
            while !c.nodes.iter().all(|n| n.wasi().has_module(&hash)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let t = Instant::now();
            c.nodes[host_i].kill().await;
            loop {
                match running_on(&c, leader, "victim").await {
                    Some(n) if n != host => break,
                    _ => {}
                }
                assert!(t.elapsed() < Duration::from_secs(60), "never rescheduled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples.push(t.elapsed());
            eprintln!("  kill {k}: running elsewhere after {:?}", t.elapsed());
            for (i, n) in c.nodes.iter().enumerate() {
                if i != host_i {
                    n.shutdown().await;
                }
            }
        }
        if samples.is_empty() {
            println!("failed replica running elsewhere: no sample (every replica landed on the leader)");
        } else {
            let n = samples.len();
            println!(
                "failed replica running elsewhere (crash, no leave): P50 {:?}  P95 {:?}  max {:?}  ({n} kills)",
                pct(&mut samples, 0.5),
                pct(&mut samples, 0.95),
                pct(&mut samples, 1.0)
            );
        }
    });
}
