//! The workload report: real `cloudless` processes on loopback, measured from a client the
//! way a user sees them (`cloudless-testnet report`).
//!
//! ```text
//!   Procs (init + joins, each timed step by step from the nodes' logs: `joins`)
//!        ──▶ client connected to node 0 (cordoned: never runs or dies)
//!   submit-to-running: apply a 1-replica WASI workload ──▶ poll until running (10 ms)
//!   failover: raft voters cordoned too ──▶ SIGKILL the replica's host ──▶ poll until it
//!             runs elsewhere ──▶ restart the host
//!   idle RSS: every node's VmRSS once no workload is left
//! ```
//!
//! Failover rounds kill only workers that do not vote: killing voters round after round
//! measures raft elections and the voter controller (whose flap limit rightly stops promoting
//! devices that crash every minute), not replica failover. Raft failover has its own
//! benchmark (`cargo bench -p cloudless-node --bench raft`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloudless_api::{Schedulable, keys};
use cloudless_cli::client::Client;
use cloudless_types::{Image, ModuleHash, NodeName, Resources, WorkloadName, WorkloadSpec};

use crate::joins::JoinTimes;
use crate::procs::Procs;

/// How often the client polls the workload while timing.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for one measurement before the run counts as failed.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pool idles before its memory is read.
const IDLE: Duration = Duration::from_secs(10);

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Nodes in the pool (at least 6: three voters, and three workers to fail over between).
    pub nodes: usize,
    /// Submit-to-running runs.
    pub runs: usize,
    /// Failover rounds.
    pub kills: usize,
}

/// The `p`-th percentile (0–100) of sorted `v`, nearest rank.
pub fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

async fn replica(c: &Client, name: &WorkloadName) -> Option<(NodeName, String)> {
    let w = c.workload(name).await.ok()?;
    let r = w.replicas.first()?.clone();
    Some((r.node?, r.phase))
}

async fn wait_running(
    c: &Client,
    name: &WorkloadName,
    not_on: Option<&NodeName>,
) -> Result<(NodeName, Duration)> {
    let start = Instant::now();
    loop {
        if let Some((node, phase)) = replica(c, name).await
            && phase == "running"
            && Some(&node) != not_on
        {
            return Ok((node, start.elapsed()));
        }
        if start.elapsed() > MEASURE_TIMEOUT {
            bail!("{name} did not run within {MEASURE_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn spec(name: &WorkloadName, hash: &ModuleHash) -> WorkloadSpec {
    WorkloadSpec::new(
        name.clone(),
        Image::Wasi(hash.clone()),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    )
}

fn line(name: &str, v: &mut [Duration], target: &str) -> String {
    v.sort();
    format!(
        "{name}: P50 {:.1} ms, P95 {:.1} ms, P99 {:.1} ms, max {:.1} ms ({} samples) — {target}",
        percentile(v, 50.0).as_secs_f64() * 1e3,
        percentile(v, 95.0).as_secs_f64() * 1e3,
        percentile(v, 99.0).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        v.len()
    )
}

/// Runs the plan; hands each line of the report to `out` as soon as it is measured.
pub async fn run(plan: &Plan, module: &[u8], mut out: impl FnMut(String)) -> Result<()> {
    if plan.nodes < 6 {
        bail!("the report needs at least 6 nodes, not {}", plan.nodes);
    }
    // CLOUDLESS_REPORT_DIR keeps the nodes' data dirs and logs for a look afterwards.
    let kept = std::env::var_os("CLOUDLESS_REPORT_DIR").map(std::path::PathBuf::from);
    let temp = tempfile::tempdir()?;
    let dir_path = kept.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir_path)?;
    let (mut procs, joins) = tokio::task::block_in_place(|| -> Result<(Procs, Vec<JoinTimes>)> {
        let mut p = Procs::init(&dir_path, &[])?;
        let mut joins = Vec::new();
        for _ in 1..plan.nodes {
            joins.push(p.join_timed()?.1);
        }
        Ok((p, joins))
    })?;
    let key = keys::load(&procs.ctl_dir().join("user.key"))?;
    let client = Client::connect(&procs.nodes[0].addr, key, None).await?;
    let first = NodeName::new(procs.nodes[0].peer.clone())?;
    client.set_schedulable(&first, Schedulable::Cordoned).await?;
    let hash = client.upload(module).await?;
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    out(format!(
        "{} cloudless processes on 127.0.0.1 (QUIC), {build} build; client on node 0 (cordoned)",
        plan.nodes
    ));
    for (step, at) in [
        ("join: enrollment committed", (|t: &JoinTimes| t.enrolled) as fn(&JoinTimes) -> Duration),
        ("join: gate list learned", |t| t.admitted),
        ("join: membership joined", |t| t.joined),
        ("join: first capacity seen (node 0)", |t| t.capacity),
    ] {
        let mut v: Vec<Duration> = joins.iter().map(at).collect();
        out(line(step, &mut v, "from `cloudless join`"));
    }
    let mut alive: Vec<Duration> = joins.iter().map(|t| t.alive_everywhere).collect();
    out(line("join to listed alive by every node", &mut alive, "targets P50 ≤ 1 s, P95 ≤ 2 s"));

    let mut submit = Vec::new();
    for r in 0..plan.runs {
        let name = WorkloadName::new(format!("submit-{r}"))?;
        let start = Instant::now();
        client.put_workload(spec(&name, &hash)).await?;
        wait_running(&client, &name, None).await?;
        submit.push(start.elapsed());
        client.delete_workload(&name).await?;
    }
    out(line("submit to running (WASI, 1 replica)", &mut submit, "target P99 ≤ 300 ms"));

    let voters = client.status().await?.voters;
    for peer in &voters {
        client.set_schedulable(peer, Schedulable::Cordoned).await?;
    }
    let mut failover = Vec::new();
    let name = WorkloadName::new("failover")?;
    client.put_workload(spec(&name, &hash)).await?;
    let (mut host, _) = wait_running(&client, &name, None).await?;
    for _ in 0..plan.kills {
        let i = procs.index(host.as_str()).context("the replica runs on an unknown node")?;
        let killed = Instant::now();
        procs.kill(i);
        let (moved, _) = wait_running(&client, &name, Some(&host)).await?;
        failover.push(killed.elapsed());
        if kept.is_some() {
            out(format!("  kill of node {i}: running on {moved} after {:?}", killed.elapsed()));
        }
        tokio::task::block_in_place(|| procs.restart(i))?;
        host = moved;
    }
    out(line(
        "SIGKILL of the replica's host to running elsewhere",
        &mut failover,
        "targets P50 ≤ 1.5 s, P95 ≤ 4 s",
    ));
    client.delete_workload(&name).await?;

    // Idle: no workload left anywhere; give allocators and caches a moment to settle.
    tokio::time::sleep(IDLE).await;
    let mut rss: Vec<u64> = (0..procs.nodes.len()).filter_map(|i| procs.rss_kib(i)).collect();
    rss.sort_unstable();
    let mib = |k: u64| k as f64 / 1024.0;
    out(format!(
        "idle node RSS: median {:.1} MiB, max {:.1} MiB over {} nodes — target ≤ 25 MiB",
        mib(rss.get(rss.len() / 2).copied().unwrap_or(0)),
        mib(rss.last().copied().unwrap_or(0)),
        rss.len()
    ));
    client.close().await;
    Ok(())
}
