//! `cloudless`: the node program every device runs.
//!
//! Today it runs the mesh layer: a member node that joins through bootstrap peers (or LAN
//! discovery), keeps the membership and the node directory, and leaves cleanly on Ctrl-C.
//! `cloudless dev` starts a three-node cluster in one process on loopback.
//!
//! ```text
//!   flags / CLOUDLESS_* env ──▶ mesh::Config ──▶ mesh::start ──▶ events ──▶ log lines
//!                                                     ▲
//!                                 Ctrl-C ──▶ Handle::leave
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cloudless_mesh::membership::{self, State};
use cloudless_mesh::{Config, Event, Handle, Mesh, OpenGate, RelayMode};
use cloudless_types::{DeviceClass, Runtime};
use libp2p::Multiaddr;
use tracing::{info, warn};

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
    init_logs(cli.log_json);
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

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn"));
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
    if n == 0 || n > 64 {
        bail!("--nodes must be between 1 and 64, not {n}");
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut handles: Vec<Handle> = Vec::new();
    let mut tasks = Vec::new();
    let mut bootstrap: Vec<Multiaddr> = Vec::new();
    for i in 0..n {
        let mut config = Config {
            data_dir: dir.path().join(format!("node-{i}")),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?, "/ip4/127.0.0.1/tcp/0".parse()?],
            bootstrap: bootstrap.clone(),
            mdns: false,
            relay: RelayMode::Never,
            ..Config::default()
        };
        config.descriptor.zone = Some(format!("dev-zone-{}", i % 2));
        config.descriptor.device_class = Some(DeviceClass::Desktop);
        config.descriptor.runtimes = vec![Runtime::Wasi];
        let Mesh { handle, events, task } =
            cloudless_mesh::start(config, Arc::new(OpenGate)).await?;
        tokio::spawn(print_events(events, Some(format!("node-{i}"))));
        if i == 0 {
            bootstrap = wait_for_addrs(&handle).await?;
        }
        handles.push(handle);
        tasks.push(task);
    }
    let started = std::time::Instant::now();
    loop {
        let mut all = true;
        for h in &handles {
            let alive = h.members().await?.iter().filter(|m| m.state == State::Alive).count();
            all &= alive == n;
        }
        if all {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the dev cluster did not converge within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("\nCloudless dev cluster: {n} nodes converged in {:.2?}", started.elapsed());
    let dir_view: BTreeMap<_, _> = handles[0].directory().await?;
    for (i, h) in handles.iter().enumerate() {
        let zone = dir_view.get(&h.peer_id()).and_then(|d| d.zone.clone()).unwrap_or_default();
        println!("  node-{i}  {}  {zone}", h.peer_id());
        for a in h.listen_addrs().await? {
            println!("          {a}");
        }
    }
    println!(
        "Join another node with:\n  cargo run -p cloudless-node -- run --data-dir /tmp/cloudless-extra --listen /ip4/127.0.0.1/udp/0/quic-v1 --bootstrap {}",
        bootstrap.first().map(|a| a.to_string()).unwrap_or_default()
    );
    println!(
        "Workloads arrive with the scheduler and runtime; for now watch membership below. Ctrl-C stops.\n"
    );
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    for h in &handles {
        if let Err(e) = h.leave().await {
            warn!(error = %e, "node did not leave cleanly");
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn wait_for_addrs(h: &Handle) -> Result<Vec<Multiaddr>> {
    for _ in 0..200 {
        let addrs = h.listen_addrs().await?;
        if !addrs.is_empty() {
            return Ok(addrs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the first node did not start listening")
}
