//! The workload report: real `cloudless` processes on loopback, measured from a client the
//! way a user sees them (`cloudless-testnet report`).
//!
//! ```text
//!   for each pool size:
//!   Procs (init + joins, each timed step by step from the nodes' logs: `joins`)
//!        ──▶ client connected to node 0 (cordoned: never runs or dies)
//!   submit-to-running: apply a 1-replica WASI workload ──▶ poll until running (10 ms)
//!   bulk: apply one workload of 1,000 WASI replicas ──▶ poll until all run (100 ms)
//!             (the leader's CPU time over it, from /proc)
//!   failover: raft voters (once all are in) cordoned too ──▶ SIGKILL the replica's host
//!             (up for a probe round at least) ──▶ poll until it runs elsewhere ──▶ restart
//!             the host
//!   idle: no workload left ──▶ every node's CPU time (/proc/<pid>/stat) and mesh bytes
//!         (libp2p_bandwidth_bytes_total) over a window, and its VmRSS
//!   false deaths: node 0's cloudless_membership_failures_total less the kills
//!   ──▶ a table of every size side by side
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
use crate::procs::{Procs, ticks_per_second};

/// How often the client polls the workload while timing.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for one measurement before the run counts as failed.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for every replica of the bulk workload to run.
const BULK_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the client polls the bulk workload (its answer lists every replica).
const BULK_POLL: Duration = Duration::from_millis(100);
/// How long the pool idles (no workload left) before its CPU, bytes and memory are read.
const IDLE: Duration = Duration::from_secs(10);
/// The window over which idle CPU time and bytes are counted.
const WINDOW: Duration = Duration::from_secs(20);
/// Longest a restarted host is left up before it is killed again (a 51-node probe round).
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Pool sizes, each measured in a pool of its own (at least 6 nodes: three voters, and
    /// three workers to fail over between).
    pub sizes: Vec<usize>,
    /// Submit-to-running runs.
    pub runs: usize,
    /// Replicas of the bulk workload (0: not measured).
    pub bulk: u32,
    /// Failover rounds.
    pub kills: usize,
}

/// What one pool size measured: a column of the table.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Nodes in the pool.
    pub nodes: usize,
    /// Join to listed alive by every node, P50 and P95.
    pub join: (Duration, Duration),
    /// Submit to running of one replica, P50 and P99.
    pub submit: (Duration, Duration),
    /// Apply of the bulk workload to all of its replicas running.
    pub bulk: Option<Duration>,
    /// The leader's CPU time over the bulk apply, in seconds.
    pub bulk_leader_cpu: f64,
    /// SIGKILL of the replica's host to running elsewhere, P50 and P95.
    pub failover: (Duration, Duration),
    /// The leader's idle CPU, percent of one core, and RSS in MiB.
    pub leader: (f64, f64),
    /// The median node's idle CPU (percent of one core) and RSS (MiB).
    pub median: (f64, f64),
    /// The busiest node's idle CPU, percent of one core.
    pub max_cpu: f64,
    /// Mesh bytes (sent and received) per node per second at idle: median, and the leader's.
    pub bytes: (f64, f64),
    /// Times node 0 (never killed) saw a member declared dead beyond the failover kills: live
    /// members declared dead over the whole run (`None`: its metrics could not be read).
    pub false_deaths: Option<u64>,
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

/// Runs the plan; hands each line of the report to `out` as soon as it is measured, and
/// the table of every size at the end.
pub async fn run(plan: &Plan, module: &[u8], mut out: impl FnMut(String)) -> Result<()> {
    if let Some(n) = plan.sizes.iter().find(|n| **n < 6) {
        bail!("the report needs at least 6 nodes, not {n}");
    }
    let mut all = Vec::new();
    let mut failed = None;
    for &nodes in &plan.sizes {
        match run_one(plan, nodes, module, &mut out).await {
            Ok(s) => all.push(s),
            // A larger pool would fail the same way: the sizes measured are still tabled.
            Err(e) => {
                out(format!("{nodes} nodes: {e:#}"));
                failed = Some(e.context(format!("the pool of {nodes} nodes")));
                break;
            }
        }
    }
    for l in table(&all, plan.bulk) {
        out(l);
    }
    failed.map_or(Ok(()), Err)
}

/// The median of `v` (sorted here).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// How a table row writes one summary's cell.
type Cell<'a> = Box<dyn Fn(&Summary) -> String + 'a>;

/// The summaries side by side, one column per pool size (markdown).
pub fn table(all: &[Summary], bulk: u32) -> Vec<String> {
    let bulk_row = format!("apply of {bulk} replicas to all running");
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let pair = |(a, b): (Duration, Duration)| format!("{} / {}", ms(a), ms(b));
    let rows: Vec<(&str, Cell<'_>)> = vec![
        ("join to alive everywhere P50 / P95", Box::new(move |s| pair(s.join))),
        ("submit to running, 1 replica P50 / P99", Box::new(move |s| pair(s.submit))),
        (&bulk_row, Box::new(move |s| s.bulk.map_or("-".into(), ms))),
        ("leader CPU over that apply", Box::new(|s| format!("{:.1} s", s.bulk_leader_cpu))),
        ("failover P50 / P95", Box::new(move |s| pair(s.failover))),
        (
            "leader idle CPU / RSS",
            Box::new(|s| format!("{:.2} % / {:.1} MiB", s.leader.0, s.leader.1)),
        ),
        (
            "median node idle CPU / RSS",
            Box::new(|s| format!("{:.2} % / {:.1} MiB", s.median.0, s.median.1)),
        ),
        ("busiest node idle CPU", Box::new(|s| format!("{:.2} %", s.max_cpu))),
        (
            "mesh bytes/s per node, median / leader",
            Box::new(|s| format!("{:.0} / {:.0}", s.bytes.0, s.bytes.1)),
        ),
        (
            "live members declared dead (seen by node 0)",
            Box::new(|s| s.false_deaths.map_or("-".into(), |n| n.to_string())),
        ),
    ];
    let mut out = vec![
        format!(
            "| | {} |",
            all.iter().map(|s| format!("{} nodes", s.nodes)).collect::<Vec<_>>().join(" | ")
        ),
        format!("|---|{}", "---|".repeat(all.len())),
    ];
    for (name, f) in rows {
        out.push(format!("| {name} | {} |", all.iter().map(&f).collect::<Vec<_>>().join(" | ")));
    }
    out
}

/// Every node's CPU ticks and mesh bytes now.
fn sample(procs: &Procs) -> Vec<(Option<u64>, Option<f64>)> {
    (0..procs.nodes.len())
        .map(|i| (procs.cpu_ticks(i), procs.metric_sum(i, "libp2p_bandwidth_bytes_total")))
        .collect()
}

/// Measures one pool of `nodes` processes.
async fn run_one(
    plan: &Plan,
    nodes: usize,
    module: &[u8],
    out: &mut impl FnMut(String),
) -> Result<Summary> {
    let mut summary = Summary { nodes, ..Summary::default() };
    // CLOUDLESS_REPORT_DIR keeps the nodes' data dirs and logs for a look afterwards.
    let kept = std::env::var_os("CLOUDLESS_REPORT_DIR").map(std::path::PathBuf::from);
    let temp = tempfile::tempdir()?;
    let dir_path = kept.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir_path)?;
    let dir_path = dir_path.join(format!("pool-{nodes}"));
    std::fs::create_dir_all(&dir_path)?;
    // Room for the bulk workload on the nodes that take work (node 0 is cordoned), twice
    // over, so that spreading it is the scheduler's choice and not a limit.
    let per_node = (u64::from(plan.bulk) * 2 / (nodes as u64 - 1)).clamp(64, 1024).to_string();
    let (mut procs, joins) = tokio::task::block_in_place(|| -> Result<(Procs, Vec<JoinTimes>)> {
        let mut p = Procs::init(&dir_path, &["--max-replicas", &per_node])?;
        let mut joins = Vec::new();
        for _ in 1..nodes {
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
        "{nodes} cloudless processes on 127.0.0.1 (QUIC), {build} build; client on node 0 (cordoned)"
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
    summary.join = (percentile(&alive, 50.0), percentile(&alive, 95.0));

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
    summary.submit = (percentile(&submit, 50.0), percentile(&submit, 99.0));

    if plan.bulk > 0 {
        let name = WorkloadName::new("bulk")?;
        let mut bulk = spec(&name, &hash);
        bulk.replicas = plan.bulk;
        bulk.requests = Resources { cpu_millis: 5, memory_mib: 4, disk_mib: 0, gpus: 0 };
        let leader = client.status().await?.leader.and_then(|l| procs.index(l.as_str()));
        let cpu_before = leader.and_then(|i| procs.cpu_ticks(i));
        let start = Instant::now();
        client.put_workload(bulk).await?;
        loop {
            let running = client.workload(&name).await.map_or(0, |w| w.running);
            if running >= plan.bulk {
                break;
            }
            if start.elapsed() > BULK_TIMEOUT {
                bail!("{running} of {} replicas ran within {BULK_TIMEOUT:?}", plan.bulk);
            }
            tokio::time::sleep(BULK_POLL).await;
        }
        let took = start.elapsed();
        let ticks = leader.and_then(|i| procs.cpu_ticks(i)).zip(cpu_before);
        summary.bulk_leader_cpu =
            ticks.map_or(0.0, |(a, b)| a.saturating_sub(b) as f64 / ticks_per_second() as f64);
        summary.bulk = Some(took);
        out(format!(
            "apply of {} WASI replicas to all running: {:.0} ms (leader CPU {:.1} s) — target ≤ 10 s on 50 nodes",
            plan.bulk,
            took.as_secs_f64() * 1e3,
            summary.bulk_leader_cpu
        ));
        client.delete_workload(&name).await?;
    }

    // The voter set is still growing for a while after the last join (a learner becomes a
    // voter once it has caught up): cordon it once complete, or a worker promoted later would
    // be killed as one (and the round would measure raft's voter replacement instead).
    let want = cloudless_consensus::voters::target(nodes, None);
    let start = Instant::now();
    let voters = loop {
        let voters = client.status().await?.voters;
        if voters.len() >= want {
            break voters;
        }
        if start.elapsed() > MEASURE_TIMEOUT {
            bail!(
                "the pool has {} raft voters after {MEASURE_TIMEOUT:?}, not {want}",
                voters.len()
            );
        }
        tokio::time::sleep(POLL).await;
    };
    for peer in &voters {
        client.set_schedulable(peer, Schedulable::Cordoned).await?;
    }
    let mut failover = Vec::new();
    let name = WorkloadName::new("failover")?;
    client.put_workload(spec(&name, &hash)).await?;
    let (mut host, _) = wait_running(&client, &name, None).await?;
    // The replica moves between the same few workers, so each victim was restarted a round
    // or two earlier. A member back from the dead is waited for as one not measured yet
    // until it answers each prober once (docs/mesh.md: it is slow while it starts), which
    // takes a probe round: a host is killed only once it has been up that long, as a device
    // that fails has usually been running for a while.
    // Every member probes each other once per `(n - 1)` probe intervals.
    let interval = cloudless_mesh::membership::Config::default().probe_interval;
    let settle = (interval * u32::try_from(nodes - 1).unwrap_or(u32::MAX)).min(SETTLE_MAX);
    let mut restarted: std::collections::HashMap<usize, Instant> = Default::default();
    for _ in 0..plan.kills {
        let i = procs.index(host.as_str()).context("the replica runs on an unknown node")?;
        if let Some(up) = restarted.get(&i) {
            tokio::time::sleep(settle.saturating_sub(up.elapsed())).await;
        }
        let killed = Instant::now();
        let at = chrono::Utc::now();
        procs.kill(i);
        let (moved, _) = wait_running(&client, &name, Some(&host)).await?;
        failover.push(killed.elapsed());
        if kept.is_some() {
            // The wall-clock time of the kill, as the nodes' logs write it, to find the round there.
            let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            out(format!(
                "  kill of node {i} at {at}: running on {moved} after {:?}",
                killed.elapsed()
            ));
        }
        tokio::task::block_in_place(|| procs.restart(i))?;
        restarted.insert(i, Instant::now());
        host = moved;
    }
    out(line(
        "SIGKILL of the replica's host to running elsewhere",
        &mut failover,
        "targets P50 ≤ 1.0 s, P95 ≤ 2 s",
    ));
    summary.failover = (percentile(&failover, 50.0), percentile(&failover, 95.0));
    client.delete_workload(&name).await?;

    // Idle: no workload left anywhere; give allocators and caches a moment to settle.
    tokio::time::sleep(IDLE).await;
    let leader = client.status().await?.leader.and_then(|l| procs.index(l.as_str()));
    let before = sample(&procs);
    let window = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let after = sample(&procs);
    let secs = window.elapsed().as_secs_f64();
    let tps = ticks_per_second() as f64;
    // Node i's CPU (percent of a core) and mesh bytes per second over the window, each
    // `None` when it could not be read at both ends.
    let usage = |i: usize| -> (Option<f64>, Option<f64>) {
        let ((c0, b0), (c1, b1)) = (before[i], after[i]);
        let cpu = c1.zip(c0).map(|(a, b)| a.saturating_sub(b) as f64 / tps / secs * 100.0);
        let bytes = b1.zip(b0).map(|(a, b)| (a - b).max(0.0) / secs);
        (cpu, bytes)
    };
    let mib = |k: u64| k as f64 / 1024.0;
    let mut rss: Vec<f64> =
        (0..procs.nodes.len()).filter_map(|i| procs.rss_kib(i)).map(mib).collect();
    let (mut cpus, mut bytes): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for i in 0..procs.nodes.len() {
        let (cpu, b) = usage(i);
        cpus.extend(cpu);
        bytes.extend(b);
    }
    let (lcpu, lbytes) = leader.map(usage).unwrap_or_default();
    let (lcpu, lbytes) = (lcpu.unwrap_or(0.0), lbytes.unwrap_or(0.0));
    let lrss = leader.and_then(|i| procs.rss_kib(i)).map_or(0.0, mib);
    summary.leader = (lcpu, lrss);
    summary.max_cpu = cpus.iter().copied().fold(0.0, f64::max);
    summary.median = (median(&mut cpus), median(&mut rss));
    summary.bytes = (median(&mut bytes), lbytes);
    out(format!(
        "idle over {secs:.0} s: median node CPU {:.2} % of a core (busiest {:.2} %), RSS {:.1} MiB (max {:.1} MiB); leader CPU {lcpu:.2} %, RSS {lrss:.1} MiB — targets CPU ≤ 1 %, RSS ≤ 25 MiB",
        summary.median.0,
        summary.max_cpu,
        summary.median.1,
        rss.last().copied().unwrap_or(0.0),
    ));
    out(format!(
        "idle mesh bytes per node per second (sent and received): median {:.0}, leader {lbytes:.0}",
        summary.bytes.0
    ));
    // Node 0 never dies: every death it saw beyond the kills was of a live member.
    let failures = procs.metric_sum(0, "cloudless_membership_failures_total");
    summary.false_deaths = failures.map(|f| (f as u64).saturating_sub(plan.kills as u64));
    out(format!(
        "live members declared dead over the run, as node 0 saw them (deaths beyond the {} kills): {}",
        plan.kills,
        summary.false_deaths.map_or("unknown".into(), |n| n.to_string())
    ));
    client.close().await;
    Ok(summary)
}
