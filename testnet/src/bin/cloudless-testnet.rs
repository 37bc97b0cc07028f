//! `cloudless-testnet`: run many real mesh nodes in one process and break them on purpose, or
//! simulate thousands of membership cores.
//!
//! ```text
//! cloudless-testnet up --nodes 5                      # interactive: type `help`
//! cloudless-testnet up --nodes 5 --run "wait-converged; kill 4; wait-dead 4; status"
//! SEED=7 cloudless-testnet sim --nodes 10000 --loss 1
//! cargo build --release --bins && target/release/cloudless-testnet report --nodes 6 --runs 50 --kills 20
//! ```
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cloudless_mesh::membership::State;
use cloudless_mesh::membership::sim::{self, Scenario};
use cloudless_testnet::Testnet;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start real nodes on loopback and drive them with commands (type `help`).
    Up {
        /// Nodes to start.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Commands to run instead of reading standard input, separated by `;`.
        #[arg(long)]
        run: Option<String>,
    },
    /// Simulate the membership protocol for many nodes; SEED= reproduces a run.
    Sim(SimArgs),
    /// Measure real `cloudless` processes: joins, submit to running (1 and many replicas),
    /// failover after SIGKILL, idle CPU, memory and mesh bytes (needs `cloudless` and
    /// `cloudlessctl` beside this binary, or CLOUDLESS_BIN_DIR).
    Report {
        /// Nodes in the pool (at least 6); several, comma-separated, are measured one after
        /// the other and tabled side by side (`--nodes 6,25,50,100`).
        #[arg(long, default_value = "6", value_delimiter = ',')]
        nodes: Vec<usize>,
        /// Submit-to-running runs.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Replicas of the one bulk workload applied at once (0: skip).
        #[arg(long, default_value_t = 1000)]
        bulk: u32,
        /// SIGKILL rounds.
        #[arg(long, default_value_t = 20)]
        kills: usize,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Nodes in the cluster at the start.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds simulated before measuring.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Message loss probability, in percent.
    #[arg(long, default_value_t = 1.0)]
    loss: f64,
    /// Shortest one-way latency in milliseconds.
    #[arg(long, default_value_t = 10)]
    latency_min: u64,
    /// Longest one-way latency in milliseconds.
    #[arg(long, default_value_t = 60)]
    latency_max: u64,
    /// Crashes per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.2)]
    crash: f64,
    /// Joins per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.2)]
    join: f64,
    /// Voluntary leaves per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.1)]
    leave: f64,
    /// Seed; the SEED environment variable works too.
    #[arg(long, env = "SEED", default_value_t = 1)]
    seed: u64,
    /// The membership's longest probe timeout, in milliseconds (default: the node's).
    #[arg(long)]
    probe_timeout: Option<u64>,
    /// The membership's shortest probe timeout (a fast member's), in milliseconds (default:
    /// the node's).
    #[arg(long)]
    probe_timeout_min: Option<u64>,
    /// The membership's shortest suspicion timeout, in milliseconds (default: the node's).
    #[arg(long)]
    suspicion_min: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up { nodes, run } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            up(nodes, run).await?;
        }
        Command::Report { nodes, runs, bulk, kills } => {
            let plan = cloudless_testnet::report::Plan { sizes: nodes, runs, bulk, kills };
            let module = include_bytes!("../../../examples/hello/hello.wat");
            cloudless_testnet::report::run(&plan, module, |line| println!("{line}")).await?;
        }
        Command::Sim(a) => {
            let mut config = cloudless_mesh::membership::Config::default();
            if let Some(ms) = a.probe_timeout {
                config.probe_timeout = Duration::from_millis(ms);
            }
            if let Some(ms) = a.probe_timeout_min {
                config.probe_timeout_min = Duration::from_millis(ms);
            }
            if let Some(ms) = a.suspicion_min {
                config.suspicion_min = Duration::from_millis(ms);
            }
            config.validate().map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
            let report = sim::run(Scenario {
                config,
                nodes: a.nodes,
                duration: Duration::from_secs_f64(a.duration),
                warmup: Duration::from_secs_f64(a.warmup),
                latency_min: Duration::from_millis(a.latency_min),
                latency_max: Duration::from_millis(a.latency_max),
                loss: a.loss / 100.0,
                crash_rate: a.crash / 100.0,
                join_rate: a.join / 100.0,
                leave_rate: a.leave / 100.0,
                seed: a.seed,
            });
            println!("{report}");
        }
    }
    Ok(())
}

const HELP: &str = "commands:
  status                     how each node sees the cluster
  kill N                     crash node N (no goodbye)
  leave N                    node N leaves voluntarily
  restart N                  start node N again from its data directory
  add                        start one more node
  partition 0,1,2 3,4        cut the network between the groups
  heal                       remove every partition
  wait-converged [SECS]      wait until every running node sees every running node alive
  wait-dead N [SECS]         wait until every running node holds node N dead
  wait-left N [SECS]         wait until every running node holds node N as left
  quit";

async fn up(n: usize, script: Option<String>) -> Result<()> {
    if n == 0 || n > 256 {
        bail!("--nodes must be between 1 and 256, not {n}");
    }
    let mut net = Testnet::start(n).await?;
    println!(
        "started {n} nodes; bootstrap peer: {}",
        net.addrs(0).first().map(|a| a.to_string()).unwrap_or_default()
    );
    match script {
        Some(s) => {
            for cmd in s.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                println!("> {cmd}");
                if !exec(&mut net, cmd).await? {
                    break;
                }
            }
        }
        None => {
            println!("{HELP}");
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await? {
                match exec(&mut net, line.trim()).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => println!("error: {e:#}"),
                }
            }
        }
    }
    Ok(())
}

fn index(net: &Testnet, arg: Option<&str>) -> Result<usize> {
    let i: usize = arg.context("which node?")?.parse().context("a node is a number")?;
    if i >= net.len() {
        bail!("there are {} nodes, numbered from 0", net.len());
    }
    Ok(i)
}

fn secs(arg: Option<&str>, default: u64) -> Result<Duration> {
    Ok(Duration::from_secs(
        arg.map(str::parse).transpose().context("seconds must be a number")?.unwrap_or(default),
    ))
}

/// Runs one command; returns false on `quit`.
async fn exec(net: &mut Testnet, cmd: &str) -> Result<bool> {
    let mut words = cmd.split_whitespace();
    let verb = words.next().unwrap_or("");
    let (a, b) = (words.next(), words.next());
    match verb {
        "" => {}
        "help" => println!("{HELP}"),
        "quit" | "exit" => return Ok(false),
        "status" => status(net).await,
        "kill" => {
            let i = index(net, a)?;
            net.kill(i).await;
            println!("node {i} killed");
        }
        "leave" => {
            let i = index(net, a)?;
            net.leave(i).await?;
            println!("node {i} left");
        }
        "restart" => {
            let i = index(net, a)?;
            net.restart(i).await?;
            println!("node {i} restarted");
        }
        "add" => {
            let i = net.add_node().await?;
            println!("node {i} started");
        }
        "partition" => {
            let groups: Vec<Vec<usize>> = std::iter::once(a)
                .chain(std::iter::once(b))
                .chain(words.map(Some))
                .flatten()
                .map(|g| g.split(',').map(|x| index(net, Some(x))).collect::<Result<Vec<_>>>())
                .collect::<Result<_>>()?;
            let refs: Vec<&[usize]> = groups.iter().map(Vec::as_slice).collect();
            net.partition(&refs).await?;
            println!("partitioned {groups:?}");
        }
        "heal" => {
            net.heal().await?;
            println!("healed");
        }
        "wait-converged" => {
            let took = net
                .wait_until("all running nodes see each other alive", secs(a, 60)?, || {
                    net.converged()
                })
                .await?;
            println!("converged after {took:.2?}");
        }
        "wait-dead" | "wait-left" => {
            let i = index(net, a)?;
            let state = if verb == "wait-dead" { State::Dead } else { State::Left };
            let observers: Vec<usize> = net.running().into_iter().filter(|o| *o != i).collect();
            let subject = [i];
            let took = net
                .wait_until(
                    &format!("every running node holds node {i} {state:?}"),
                    secs(b, 60)?,
                    || net.all_see(&observers, &subject, state),
                )
                .await?;
            println!("node {i} is {state:?} everywhere after {took:.2?}");
        }
        other => bail!("unknown command {other:?}; type help"),
    }
    Ok(true)
}

async fn status(net: &Testnet) {
    println!(
        "{:<5} {:<54} {:>5} {:>7} {:>5} {:>5} {:>5}",
        "node", "peer", "alive", "suspect", "dead", "left", "dir"
    );
    for i in 0..net.len() {
        let Some(h) = net.handle(i) else {
            println!("{i:<5} {:<54} (stopped)", net.peer(i));
            continue;
        };
        let view = net.members(i).await;
        let count = |s: State| view.iter().filter(|m| m.state == s).count();
        let dir = h.directory().await.map(|d| d.len()).unwrap_or(0);
        println!(
            "{i:<5} {:<54} {:>5} {:>7} {:>5} {:>5} {:>5}",
            net.peer(i).to_string(),
            count(State::Alive),
            count(State::Suspect),
            count(State::Dead),
            count(State::Left),
            dir
        );
    }
}
