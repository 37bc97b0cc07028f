//! `cloudless`: the node program every device runs.
//!
//! - `cloudless dev`: a complete local cluster in one process on loopback (mesh, raft,
//!   scheduler, WASI runtime on every node), the example WASI workload published on it, and
//!   its output followed until Ctrl-C ([`cloudless_node::local`]).
//! - `cloudless run`: today the mesh layer only: a member that joins through bootstrap peers
//!   (or LAN discovery), keeps the membership and the directory, and leaves cleanly on Ctrl-C.
//! - `cloudless recover`: forced recovery of the raft group (docs/consensus.md).
//!
//! ```text
//!   dev: LocalCluster::start ──▶ apply_wasi(examples/hello) ──▶ wait running ──▶ follow logs
//!   run: flags / CLOUDLESS_* env ──▶ mesh::Config ──▶ mesh::start ──▶ events ──▶ log lines
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cloudless_consensus::Consistency;
use cloudless_consensus::state::Phase;
use cloudless_mesh::membership;
use cloudless_mesh::{Config, Event, Mesh, OpenGate, RelayMode};
use cloudless_node::local::LocalCluster;
use cloudless_runtime::Driver;
use cloudless_types::{DeviceClass, Image, Resources, Runtime, WorkloadSpec};
use ed25519_dalek::SigningKey;
use libp2p::Multiaddr;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "cloudless",
    version,
    about = "A Cloudless node: pools the compute of community devices"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "CLOUDLESS_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from its data directory.
    Run(RunArgs),
    /// Start a local three-node cluster in this process, on loopback, and watch it.
    Dev {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Forced recovery after a majority of the raft voters is lost for good. Without
    /// --majority-is-lost it only shows how up to date this (stopped) node's raft log is; with
    /// it, makes this node the only voter, keeping what its log holds. See docs/consensus.md.
    Recover {
        /// The stopped node's data directory.
        #[arg(long, env = "CLOUDLESS_DATA_DIR", default_value = "cloudless-data")]
        data_dir: PathBuf,
        /// Confirms that the lost voters will never return: entries only they held are lost,
        /// and a returning one must be wiped before it rejoins.
        #[arg(long)]
        majority_is_lost: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where the identity key and the node's state live.
    #[arg(long, env = "CLOUDLESS_DATA_DIR", default_value = "cloudless-data")]
    data_dir: PathBuf,
    /// Listen addresses (QUIC first, TCP fallback).
    #[arg(long, env = "CLOUDLESS_LISTEN", value_delimiter = ',', default_values_t = [
        "/ip4/0.0.0.0/udp/4001/quic-v1".parse::<Multiaddr>().expect("valid default address"),
        "/ip4/0.0.0.0/tcp/4001".parse::<Multiaddr>().expect("valid default address"),
    ])]
    listen: Vec<Multiaddr>,
    /// Peers to join through (`/ip4/…/udp/…/quic-v1/p2p/<id>`).
    #[arg(long, env = "CLOUDLESS_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Do not look for peers on the local network.
    #[arg(long, env = "CLOUDLESS_NO_MDNS")]
    no_mdns: bool,
    /// Relay server policy: auto, always or never.
    #[arg(long, env = "CLOUDLESS_RELAY", default_value = "auto", value_parser = parse_relay)]
    relay: RelayMode,
    /// Failure zone of this device.
    #[arg(long, env = "CLOUDLESS_ZONE")]
    zone: Option<String>,
    /// Region of this device.
    #[arg(long, env = "CLOUDLESS_REGION")]
    region: Option<String>,
    /// Device class: server, desktop, gateway, laptop or phone.
    #[arg(long, env = "CLOUDLESS_DEVICE_CLASS", value_parser = parse_class)]
    device_class: Option<DeviceClass>,
    /// Labels, as key=value.
    #[arg(long = "label", env = "CLOUDLESS_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_relay(s: &str) -> Result<RelayMode, String> {
    match s {
        "auto" => Ok(RelayMode::Auto),
        "always" => Ok(RelayMode::Always),
        "never" => Ok(RelayMode::Never),
        other => Err(format!("relay must be auto, always or never, not {other:?}")),
    }
}

fn parse_class(s: &str) -> Result<DeviceClass, String> {
    DeviceClass::parse(s).ok_or_else(|| {
        format!("device class must be server, desktop, gateway, laptop or phone, not {s:?}")
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} must be key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `dev` prints its own story; the nodes' logs only when something is wrong.
    let quiet = matches!(cli.command, Command::Dev { .. });
    init_logs(cli.log_json, quiet);
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Dev { nodes } => dev(nodes).await,
        Command::Recover { data_dir, majority_is_lost } => recover(&data_dir, majority_is_lost),
    }
}

fn recover(data_dir: &std::path::Path, confirmed: bool) -> Result<()> {
    if !confirmed {
        let s = cloudless_node::recovery::inspect(data_dir)
            .with_context(|| format!("inspecting the raft store of {}", data_dir.display()))?;
        match s.last_log {
            Some((index, term)) => {
                println!("{}: last raft log entry index {index}, term {term}", s.member.peer)
            }
            None => println!("{}: the raft store holds no log", s.member.peer),
        }
        println!(
            "nothing changed. Compare this on every surviving voter; on the one with the \
             highest index (then term), and only if a majority of voters is gone for good, rerun \
             with --majority-is-lost (see docs/consensus.md)"
        );
        return Ok(());
    }
    let me = cloudless_node::recovery::force_recover(data_dir)
        .with_context(|| format!("forced recovery of {}", data_dir.display()))?;
    println!(
        "{} is now the only raft voter; start it with `cloudless run --data-dir {}` and the group \
         regrows around it",
        me.peer,
        data_dir.display()
    );
    Ok(())
}

fn init_logs(json: bool, quiet: bool) {
    let default = if quiet {
        "warn,openraft=error,wasmtime_internal_cache=error"
    } else {
        "info,libp2p=warn,openraft=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let mut config = Config {
        data_dir: args.data_dir,
        listen: args.listen,
        bootstrap: args.bootstrap,
        mdns: !args.no_mdns,
        relay: args.relay,
        ..Config::default()
    };
    config.descriptor.zone = args.zone;
    config.descriptor.region = args.region;
    config.descriptor.device_class = args.device_class;
    config.descriptor.runtimes = vec![Runtime::Wasi];
    config.descriptor.labels = args.labels.into_iter().collect();
    config.validate().context("invalid configuration")?;
    let Mesh { handle, events, task } =
        cloudless_mesh::start(config, Arc::new(OpenGate)).await.context("cannot start the mesh")?;
    info!(peer = %handle.peer_id(), "node started");
    let printer = tokio::spawn(print_events(events, None));
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    info!("Ctrl-C: leaving the cluster");
    handle.leave().await.context("cannot leave cleanly")?;
    let _ = task.await;
    printer.abort();
    Ok(())
}

async fn print_events(mut events: tokio::sync::mpsc::Receiver<Event>, name: Option<String>) {
    let who = name.unwrap_or_default();
    while let Some(e) = events.recv().await {
        match e {
            Event::Member(membership::Event::State { id, previous, state, incarnation }) => {
                info!(node = %who, peer = %id, ?previous, ?state, incarnation, "membership");
            }
            Event::Member(membership::Event::Capacity { id, capacity }) => {
                info!(node = %who, peer = %id, cpu_free = capacity.cpu_free_millis, memory_free_mib = capacity.memory_free_mib, "capacity");
            }
            Event::Directory { peer, descriptor } => {
                info!(node = %who, %peer, zone = ?descriptor.as_ref().and_then(|d| d.zone.clone()), "directory entry");
            }
            Event::Listening(addr) => info!(node = %who, %addr, "listening"),
            Event::Nat(r) => info!(node = %who, reachability = ?r, "nat"),
            Event::Member(membership::Event::Removed { id }) => {
                info!(node = %who, peer = %id, "forgotten")
            }
        }
    }
}

async fn dev(n: usize) -> Result<()> {
    if n == 0 || n > 16 {
        bail!("--nodes must be between 1 and 16, not {n}");
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let root = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let admin = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let started = Instant::now();
    println!("Starting a local Cloudless cluster of {n} nodes in {} …", dir.path().display());
    let mut cluster = LocalCluster::start(n, dir.path(), root, admin, |_| {})
        .await
        .context("the dev cluster did not form")?;
    println!("{n} nodes enrolled and voting after {:.2?}:", started.elapsed());
    for (i, node) in cluster.nodes.iter().enumerate() {
        let role = if node.consensus().is_leader() { "raft leader" } else { "" };
        println!("  node-{i}  {}  {role}", node.peer_id());
        for a in node.mesh().listen_addrs().await? {
            println!("          {a}");
        }
    }
    // The example workload, published through the last node (any node accepts it).
    let replicas = n.min(3) as u32;
    let mut spec = WorkloadSpec::new(
        "hello",
        Image::Wasi(String::new()),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        replicas,
    );
    spec.placement.strategy = cloudless_types::placement::Strategy::Spread;
    let submitted = Instant::now();
    cluster
        .apply_wasi(n - 1, spec, include_bytes!("../../examples/hello/hello.wat"))
        .await
        .context("the example workload was refused")?;
    let first = cluster.nodes[0].clone();
    let placed = loop {
        let statuses = first
            .consensus()
            .read(Consistency::Linearizable, |s| (s.statuses().clone(), s.assignments().clone()))
            .await
            .context("cannot read the cluster state")?;
        let running = statuses.0.values().filter(|s| s.phase == Phase::Running).count();
        if running == replicas as usize {
            break statuses.1;
        }
        if submitted.elapsed() > Duration::from_secs(60) {
            bail!("the example workload did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "\nWorkload \"hello\" (examples/hello/hello.wat, WASI): {replicas} of {replicas} replicas running {:.0?} after it was submitted:",
        submitted.elapsed()
    );
    let index: BTreeMap<String, usize> =
        cluster.nodes.iter().enumerate().map(|(i, d)| (d.peer_id().to_string(), i)).collect();
    for (key, a) in &placed {
        println!(
            "  {}.{}  on node-{}",
            key.workload,
            key.index,
            index.get(&a.node).copied().unwrap_or(0)
        );
    }
    // Show what replica 0 prints, as it prints it.
    if let Some((key, a)) = placed.iter().next()
        && let Some(host) = index.get(&a.node).and_then(|i| cluster.nodes.get(*i))
    {
        let id = cloudless_runtime::ReplicaId::new(&key.workload, key.index);
        let mut lines = host.wasi().follow(&id).await.context("cannot follow the replica's log")?;
        let label = format!("{}.{}", key.workload, key.index);
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(line) = lines.next().await {
                println!("  [{label}] {}", line.text);
            }
        });
    }
    println!(
        "The cluster lives in {} until Ctrl-C stops it (the directory is removed then).\n",
        dir.path().display()
    );
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    cluster.shutdown().await;
    Ok(())
}
