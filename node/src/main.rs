//! `cloudless`: the node program every device runs.
//!
//! - `cloudless init`: creates a cluster (root key and admin key for cloudlessctl, this node as
//!   its first voter) and keeps running as its first node.
//! - `cloudless join <invite>`: enrolls this device with an invite and keeps running.
//! - `cloudless run`: starts the node from its data dir and settings.
//! - `cloudless dev`: a complete local cluster in one process on loopback (mesh, raft,
//!   scheduler, WASI runtime on every node), the example WASI workload published on it, and
//!   its output followed until Ctrl-C ([`cloudless_node::local`]).
//! - `cloudless recover`: forced recovery of the raft group (docs/consensus.md).
//!
//! ```text
//!   init / join / run: <data-dir>/cloudless.toml ◀ CLOUDLESS_* env ◀ flags ──▶ NodeConfig
//!        ──▶ Daemon::start ──▶ (init: bootstrap │ join: Enroll) ──▶ http ──▶ until a signal
//!   dev: LocalCluster::start ──▶ apply_wasi(examples/hello) ──▶ wait running ──▶ follow logs
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cloudless_api::ctl::{self, CtlConfig, ROOT_KEY, USER_KEY};
use cloudless_api::invite::Invite;
use cloudless_api::{ErrorKind, Settings, keys};
use cloudless_consensus::Consistency;
use cloudless_node::config::{FILE, FileConfig, NodeConfig, Offer};
use cloudless_node::daemon::Daemon;
use cloudless_node::local::LocalCluster;
use cloudless_runtime::Driver;
use cloudless_types::{Image, ModuleHash, Resources, WorkloadName, WorkloadSpec, now_ms};
use ed25519_dalek::SigningKey;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tracing::{error, info, warn};

/// The file in the data dir that marks it as part of a cluster (holds the cluster's name).
const CLUSTER_FILE: &str = "cluster";
/// The file in the data dir listing where the running node listens.
const ADDRESSES_FILE: &str = "addresses";
/// The file in the data dir naming where the running node serves /metrics, /health, /ready.
const HTTP_FILE: &str = "http";
/// How long `join` keeps trying to reach the cluster.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

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
    command: Command_,
}

#[derive(Subcommand)]
enum Command_ {
    /// Create a new cluster with this device as its first node, then keep running.
    Init {
        /// The cluster's name.
        #[arg(long, default_value = "cloudless")]
        name: String,
        /// Where cloudlessctl's settings and the admin's keys go (the cluster root key
        /// included: keep it safe).
        #[arg(long, env = "CLOUDLESS_CONFIG_DIR")]
        admin_dir: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Enroll this device with an invite (from `cloudlessctl token create`), then keep running.
    Join {
        /// The invite string.
        invite: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Run the node in a data directory.
    Run {
        /// The data dir was moved here on purpose (the node no longer runs where it was):
        /// accept its new place. Without it, a data dir that last ran elsewhere is refused,
        /// since a copy would be a second node with the same identity.
        #[arg(long)]
        moved: bool,
        /// The data dir was restored from a backup on purpose, and no other copy of it runs:
        /// go on with it. Without it, a data dir older than the node's last run (the pool
        /// holds later entries this node signed) is refused.
        #[arg(long)]
        restored: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
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

/// Settings given on the command line or in the environment; they override the file.
#[derive(clap::Args)]
struct NodeArgs {
    /// Where the identity, the raft store and the workloads' files live.
    #[arg(long, env = "CLOUDLESS_DATA_DIR", default_value = "cloudless-data")]
    data_dir: PathBuf,
    /// Settings file (default: cloudless.toml in the data dir).
    #[arg(long, env = "CLOUDLESS_CONFIG")]
    config: Option<PathBuf>,
    /// Listen addresses, comma-separated (QUIC first, TCP fallback).
    #[arg(long, env = "CLOUDLESS_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Peers to join through (`/ip4/…/udp/…/quic-v1/p2p/<id>`), comma-separated.
    #[arg(long, env = "CLOUDLESS_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Do not look for peers on the local network.
    #[arg(long, env = "CLOUDLESS_NO_MDNS")]
    no_mdns: bool,
    /// Relay server policy: auto, always or never.
    #[arg(long, env = "CLOUDLESS_RELAY")]
    relay: Option<String>,
    /// This device is behind a NAT without port forwarding.
    #[arg(long, env = "CLOUDLESS_BEHIND_NAT")]
    behind_nat: bool,
    /// Failure zone of this device.
    #[arg(long, env = "CLOUDLESS_ZONE")]
    zone: Option<String>,
    /// Region of this device.
    #[arg(long, env = "CLOUDLESS_REGION")]
    region: Option<String>,
    /// Device class: server, desktop, gateway, laptop or phone.
    #[arg(long, env = "CLOUDLESS_DEVICE_CLASS")]
    device_class: Option<String>,
    /// Labels, as key=value, comma-separated.
    #[arg(long = "label", env = "CLOUDLESS_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Address for /metrics, /health and /ready ("" turns it off).
    #[arg(long, env = "CLOUDLESS_HTTP")]
    http: Option<String>,
    /// Let guests use the network on this device.
    #[arg(long, env = "CLOUDLESS_ALLOW_NETWORK")]
    allow_network: bool,
    /// Docker Engine API endpoint for container workloads (`unix:///var/run/docker.sock`).
    #[arg(long, env = "CLOUDLESS_CONTAINER_ENGINE")]
    container_engine: Option<String>,
    /// Millicores offered to workloads (default: every core).
    #[arg(long, env = "CLOUDLESS_CPU_MILLIS")]
    cpu_millis: Option<u32>,
    /// MiB of memory offered to workloads (default: half the machine's).
    #[arg(long, env = "CLOUDLESS_MEMORY_MIB")]
    memory_mib: Option<u32>,
    /// Replicas run at once at most, of any runtime (default by device class: 256 server,
    /// 128 desktop, 64 laptop, 16 gateway and phone).
    #[arg(long, env = "CLOUDLESS_MAX_REPLICAS")]
    max_replicas: Option<u32>,
}

impl NodeArgs {
    /// The settings these arguments set, as a file would hold them.
    fn overrides(&self) -> Result<FileConfig> {
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("invalid labels: {l:?} must be key=value"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let any =
            self.cpu_millis.is_some() || self.memory_mib.is_some() || self.max_replicas.is_some();
        let offer = any.then_some(Offer {
            cpu_millis: self.cpu_millis,
            memory_mib: self.memory_mib,
            disk_mib: None,
            replicas: self.max_replicas,
        });
        Ok(FileConfig {
            listen: (!self.listen.is_empty()).then(|| self.listen.clone()),
            bootstrap: (!self.bootstrap.is_empty()).then(|| self.bootstrap.clone()),
            mdns: self.no_mdns.then_some(false),
            relay: self.relay.clone(),
            behind_nat: self.behind_nat.then_some(true),
            zone: self.zone.clone(),
            region: self.region.clone(),
            device_class: self.device_class.clone(),
            labels: (!labels.is_empty()).then_some(labels),
            http: self.http.clone(),
            allow_network: self.allow_network.then_some(true),
            container_engine: self.container_engine.clone(),
            offer,
        })
    }

    /// The data dir as an absolute path (the runtime's caches require one).
    fn absolute(mut self) -> Result<Self> {
        self.data_dir = std::path::absolute(&self.data_dir)
            .with_context(|| format!("invalid data dir {}", self.data_dir.display()))?;
        Ok(self)
    }

    fn file_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| self.data_dir.join(FILE))
    }

    /// The file's settings overlaid with these.
    fn settings(&self) -> Result<FileConfig> {
        let file = FileConfig::load(&self.file_path(), self.config.is_none())?;
        Ok(file.overlay(self.overrides()?))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `dev` prints its own story; the nodes' logs only when something is wrong.
    let quiet = matches!(cli.command, Command_::Dev { .. });
    init_logs(cli.log_json, quiet);
    match cli.command {
        Command_::Init { name, admin_dir, node } => init(name, admin_dir, node.absolute()?).await,
        Command_::Join { invite, node } => join(&invite, node.absolute()?).await,
        Command_::Run { moved, restored, node } => run(node.absolute()?, moved, restored).await,
        Command_::Dev { nodes } => dev(nodes).await,
        Command_::Recover { data_dir, majority_is_lost } => recover(&data_dir, majority_is_lost),
    }
}

/// Refuses a data dir that already belongs to a cluster.
fn fresh(data_dir: &Path) -> Result<()> {
    if let Ok(name) = std::fs::read_to_string(data_dir.join(CLUSTER_FILE)) {
        bail!(
            "{} already belongs to cluster {:?}; start it with `cloudless run --data-dir {}`, or use \
             another --data-dir",
            data_dir.display(),
            name.trim(),
            data_dir.display()
        );
    }
    cloudless_mesh::identity::create_private_dir(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))
}

/// Refuses a data dir that last ran somewhere else (unless `moved`), and records where it
/// runs now.
fn check_place(data_dir: &Path, moved: bool) -> Result<()> {
    use cloudless_node::files::{Place, Whereabouts};
    cloudless_mesh::identity::create_private_dir(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let here = Place::here(data_dir);
    if let Whereabouts::Elsewhere(was) = here.compare(data_dir)
        && !moved
    {
        bail!(
            "{} last ran at {} on machine {}: a copied data dir is a second node with the \
             first one's identity, which the pool cannot tell apart from it. If the node no \
             longer runs there (you moved it), start it with `cloudless run --moved`; to add \
             another node here, create an invite (`cloudlessctl token create`) and `cloudless \
             join` it into a fresh data dir",
            data_dir.display(),
            was.path.display(),
            was.machine
        );
    }
    here.record(data_dir).with_context(|| format!("cannot write to {}", data_dir.display()))
}

async fn init(name: String, admin_dir: Option<PathBuf>, args: NodeArgs) -> Result<()> {
    fresh(&args.data_dir)?;
    let admin_dir = admin_dir.unwrap_or_else(ctl::default_dir);
    let settings_file = args.settings()?;
    let config = NodeConfig::resolve(&args.data_dir, &settings_file).context("invalid settings")?;
    if CtlConfig::load(&admin_dir)?.peer.is_some() {
        bail!(
            "{} already holds cloudlessctl settings for a cluster; pass --admin-dir to keep them",
            admin_dir.display()
        );
    }
    if admin_dir.join(ROOT_KEY).exists() {
        bail!(
            "{} exists already: another cluster's root key; pass --admin-dir to keep it",
            admin_dir.join(ROOT_KEY).display()
        );
    }
    let (node, http) = start(config).await?;
    // Keys are written only once the cluster exists, so a failed init leaves nothing behind.
    let root = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    // An existing user key becomes the admin (a person's one identity across clusters).
    let existing = keys::load(&admin_dir.join(USER_KEY)).ok();
    let admin =
        existing.clone().unwrap_or_else(|| SigningKey::from_bytes(&rand::random::<[u8; 32]>()));
    let settings = Settings {
        name: name.clone(),
        root_key: root.verifying_key().to_bytes(),
        voter_target: None,
        phones_may_vote: false,
    };
    node.init(settings, admin.verifying_key().to_bytes())
        .await
        .context("cannot create the cluster")?;
    keys::save(&admin_dir.join(ROOT_KEY), &root)?;
    if existing.is_none() {
        keys::save(&admin_dir.join(USER_KEY), &admin)?;
    }
    settings_file.save(&args.data_dir.join(FILE))?;
    std::fs::write(args.data_dir.join(CLUSTER_FILE), &name)?;
    check_place(&args.data_dir, false)?;
    let addrs = listen_addrs(&node).await;
    let peer = dialable(&addrs).with_context(|| "the node listens on no usable address")?;
    let cluster = Some(keys::hex(&root.verifying_key().to_bytes()));
    CtlConfig { peer: Some(peer.clone()), key: None, root_key: None, cluster }.save(&admin_dir)?;
    println!("Cluster {name:?} created; this node ({}) is its first voter.", node.peer_id());
    println!("cloudlessctl settings and keys: {} (keep root.key safe)", admin_dir.display());
    println!("  cloudlessctl cluster status");
    println!("  cloudlessctl token create      # an invite for the next device");
    serve(node, http, &args.data_dir, &addrs).await
}

async fn join(invite: &str, args: NodeArgs) -> Result<()> {
    let invite = Invite::decode(invite).context("the invite is unusable")?;
    invite.check_expiry(now_ms()).context("the invite is unusable")?;
    fresh(&args.data_dir)?;
    let mut settings_file = args.settings()?;
    if settings_file.bootstrap.is_none() {
        settings_file.bootstrap = Some(invite.bootstrap.clone());
    }
    let config = NodeConfig::resolve(&args.data_dir, &settings_file).context("invalid settings")?;
    let (node, http) = start(config).await?;
    // Where it listens is known before it is let in (an operator, or a test, may look).
    write_addresses(&args.data_dir, &listen_addrs(&node).await)?;
    let started = Instant::now();
    loop {
        match node.enroll(&invite).await {
            Ok(_) => break,
            // An earlier attempt may have been committed with its answer lost: then this
            // device is enrolled already and the token's use was its own.
            Err(e) if e.kind == ErrorKind::Conflict && enrolled(&node).await => break,
            // Only "not now" is worth waiting for; anything else is the cluster's answer.
            Err(e) if e.kind.is_transient() && started.elapsed() <= JOIN_TIMEOUT => {
                info!(error = %e, "cluster not reachable yet")
            }
            Err(e) if e.kind.is_transient() => {
                node.shutdown().await;
                bail!("cannot reach the cluster through the invite's addresses: {e}");
            }
            Err(e) => {
                node.shutdown().await;
                bail!("the cluster refused this device: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    settings_file.save(&args.data_dir.join(FILE))?;
    std::fs::write(args.data_dir.join(CLUSTER_FILE), &invite.token.cluster)?;
    check_place(&args.data_dir, false)?;
    info!(cluster = %invite.token.cluster, after = ?started.elapsed(), "enrolled");
    println!("Enrolled in cluster {:?} as {}.", invite.token.cluster, node.peer_id());
    let addrs = listen_addrs(&node).await;
    serve(node, http, &args.data_dir, &addrs).await
}

async fn run(args: NodeArgs, moved: bool, restored: bool) -> Result<()> {
    check_place(&args.data_dir, moved)?;
    if !args.data_dir.join(CLUSTER_FILE).exists() {
        warn!(
            data_dir = %args.data_dir.display(),
            "this data dir belongs to no cluster yet: `cloudless init` creates one, `cloudless \
             join <invite>` enrolls in one; until then the cluster will not let this node in"
        );
    }
    let mut config =
        NodeConfig::resolve(&args.data_dir, &args.settings()?).context("invalid settings")?;
    config.daemon.mesh.restored = restored;
    let (node, http) = start(config).await?;
    let addrs = listen_addrs(&node).await;
    serve(node, http, &args.data_dir, &addrs).await
}

/// Whether committed state lists this node as enrolled.
async fn enrolled(node: &Daemon) -> bool {
    node.enrolled().await.is_ok_and(|list| list.nodes.contains(node.name()))
}

/// Starts the daemon; returns it and where its HTTP endpoint should listen.
async fn start(config: NodeConfig) -> Result<(Daemon, Option<SocketAddr>)> {
    let http = config.http;
    let node = Daemon::start(config.daemon).await.context("the node did not start")?;
    Ok((node, http))
}

/// Where the node listens, with `/p2p/<id>`, once it listens anywhere (up to 10 s).
async fn listen_addrs(node: &Daemon) -> Vec<Multiaddr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addrs = node.mesh().listen_addrs().await.unwrap_or_default();
        if !addrs.is_empty() || Instant::now() > deadline {
            return addrs
                .into_iter()
                .map(|a| {
                    if a.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                        a
                    } else {
                        a.with(Protocol::P2p(node.peer_id()))
                    }
                })
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The address a CLI on this machine should use: loopback first, QUIC first.
fn dialable(addrs: &[Multiaddr]) -> Option<String> {
    let loopback =
        |a: &&Multiaddr| a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback()));
    let quic = |a: &&Multiaddr| a.iter().any(|p| matches!(p, Protocol::QuicV1));
    addrs
        .iter()
        .filter(loopback)
        .find(quic)
        .or_else(|| addrs.iter().find(loopback))
        .or_else(|| addrs.iter().find(quic))
        .or_else(|| addrs.first())
        .map(|a| a.to_string())
}

/// Writes where the node listens into its data dir (`addresses`, one per line).
fn write_addresses(data_dir: &Path, addrs: &[Multiaddr]) -> Result<()> {
    let list: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(data_dir.join(ADDRESSES_FILE), list)
        .with_context(|| format!("cannot write {}", data_dir.join(ADDRESSES_FILE).display()))
}

/// Serves until SIGINT or SIGTERM, then leaves the cluster cleanly.
async fn serve(
    node: Daemon,
    http: Option<SocketAddr>,
    data_dir: &Path,
    addrs: &[Multiaddr],
) -> Result<()> {
    write_addresses(data_dir, addrs)?;
    for a in addrs {
        info!(addr = %a, "reachable at");
    }
    let http_task = match http {
        Some(bind) => {
            let (bound, task) = cloudless_node::http::serve(bind, node.metrics(), node.readiness())
                .await
                .context("cannot serve /metrics, /health and /ready")?;
            info!(addr = %bound, "http: /metrics /health /ready");
            std::fs::write(data_dir.join(HTTP_FILE), format!("{bound}\n"))
                .with_context(|| format!("cannot write {}", data_dir.join(HTTP_FILE).display()))?;
            Some(task)
        }
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
        why = node.failed() => {
            error!(reason = %why, "the node cannot go on");
            node.kill().await;
            if let Some(t) = http_task {
                t.abort();
            }
            bail!("{why}; the node stopped. {}", why.advice(data_dir));
        }
    }
    info!("stopping: leaving the cluster");
    node.shutdown().await;
    if let Some(t) = http_task {
        t.abort();
    }
    Ok(())
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
        "info,libp2p=warn,openraft=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
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
    // cloudlessctl can reach the dev cluster as its admin.
    let ctl = dir.path().join("ctl");
    keys::save(&ctl.join(ROOT_KEY), &root)?;
    keys::save(&ctl.join(USER_KEY), &admin)?;
    let mut cluster = LocalCluster::start(n, dir.path(), root, admin, |_, _| {})
        .await
        .context("the dev cluster did not form")?;
    let peer = dialable(&listen_addrs(&cluster.nodes[0]).await);
    let root_key = Some(keys::hex(&cluster.root.verifying_key().to_bytes()));
    CtlConfig { peer, key: None, root_key: None, cluster: root_key }.save(&ctl)?;
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
    let module = include_bytes!("../../examples/hello/hello.wat");
    let mut spec = WorkloadSpec::new(
        WorkloadName::new("hello")?,
        Image::Wasi(ModuleHash::of(module)),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        replicas,
    );
    spec.placement.strategy = cloudless_types::placement::Strategy::Spread;
    let submitted = Instant::now();
    cluster.apply_wasi(n - 1, spec, module).await.context("the example workload was refused")?;
    let first = cluster.nodes[0].clone();
    let placed = loop {
        let statuses = first
            .consensus()
            .read(Consistency::Linearizable, |s| (s.statuses().clone(), s.assignments().clone()))
            .await
            .context("cannot read the cluster state")?;
        let running = statuses.0.values().filter(|s| s.phase.is_running()).count();
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
    let index: BTreeMap<cloudless_types::NodeName, usize> =
        cluster.nodes.iter().enumerate().map(|(i, d)| (d.name().clone(), i)).collect();
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
        let mut lines = host.wasi().follow(key).await.context("cannot follow the replica's log")?;
        let label = format!("{}.{}", key.workload, key.index);
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(line) = lines.next().await {
                println!("  [{label}] {}", line.text);
            }
        });
    }
    println!(
        "The cluster lives in {} until Ctrl-C stops it (the directory is removed then).",
        dir.path().display()
    );
    println!(
        "cloudlessctl reaches it as its admin:\n  export CLOUDLESS_CONFIG_DIR={}\n  \
         cloudlessctl node list; cloudlessctl workload get hello\n",
        ctl.display()
    );
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    cluster.shutdown().await;
    Ok(())
}
