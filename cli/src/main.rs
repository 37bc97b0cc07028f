//! `cloudlessctl`: manage a Cloudless cluster from any peer.
//!
//! ```text
//!   flags / CLOUDLESS_* env / ctl.toml ──▶ peer + user key ──▶ Client::connect
//!   verb ──▶ one typed call (signed) ──▶ its reply ──▶ table, json or yaml
//!        └─ refused ──▶ "error: …" and the exit code of the error's kind
//! ```
//!
//! Exit codes: 0 done; 1 anything that is not an answer of the cluster (a local file, a bug);
//! 2 bad usage (clap); 3 invalid input (a document, an argument, a request the cluster calls
//! invalid); 4 unauthorized (the key is not known to the cluster); 5 forbidden (the key's role
//! does not allow it); 6 not found; 7 conflict (used up, exists, the last admin); 8 busy;
//! 9 unavailable (no peer or raft leader reachable); 10 the cluster failed internally.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use cloudless_api::ctl::{self as config, CtlConfig, ROOT_KEY, USER_KEY};
use cloudless_api::invite::{Grant, Invite};
use cloudless_api::user::{ClusterStatus, NodeInfo, WorkloadInfo};
use cloudless_api::{ErrorKind, NodeRole, Role, Schedulable, keys};
use cloudless_cli::client::{Client, ClientError};
use cloudless_cli::spec::{self, Module, SpecError};
use cloudless_types::{Image, ReplicaId, WorkloadName, now_ms};
use serde::Serialize;

/// How often `logs -f` asks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

#[derive(Parser)]
#[command(name = "cloudlessctl", version, about = "Manage a Cloudless cluster from any peer")]
struct Cli {
    /// The peer to talk to (a multiaddr ending in /p2p/<id>); default from ctl.toml.
    #[arg(long, global = true, env = "CLOUDLESS_PEER")]
    peer: Option<String>,
    /// Directory of ctl.toml and the keys.
    #[arg(long, global = true, env = "CLOUDLESS_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// The user key file (default: user.key in the config directory).
    #[arg(long, global = true, env = "CLOUDLESS_KEY")]
    key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Verb {
    /// The cluster as a whole.
    Cluster {
        #[command(subcommand)]
        verb: ClusterVerb,
    },
    /// Invites for new devices.
    Token {
        #[command(subcommand)]
        verb: TokenVerb,
    },
    /// Enrolled devices.
    Node {
        #[command(subcommand)]
        verb: NodeVerb,
    },
    /// Workloads.
    Workload {
        #[command(subcommand)]
        verb: WorkloadVerb,
    },
    /// Users (who may do what).
    User {
        #[command(subcommand)]
        verb: UserVerb,
    },
    /// This CLI's own key.
    Key {
        #[command(subcommand)]
        verb: KeyVerb,
    },
}

#[derive(Subcommand)]
enum ClusterVerb {
    /// Name, leader, voters, nodes and replicas.
    Status,
}

#[derive(Subcommand)]
enum TokenVerb {
    /// Create an invite (needs the cluster root key).
    Create {
        /// How many devices may use it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// Roles granted: worker, voter (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = ["worker".to_string(), "voter".to_string()])]
        roles: Vec<String>,
        /// Labels granted, key=value (comma-separated).
        #[arg(long = "label", value_delimiter = ',')]
        labels: Vec<String>,
        /// Addresses to join through (default: the voters' addresses).
        #[arg(long, value_delimiter = ',')]
        bootstrap: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NodeVerb {
    /// Every enrolled node.
    List,
    /// One node (by PeerId or a unique prefix).
    Get {
        #[arg(value_name = "PEER")]
        node: String,
    },
    /// Move every replica off a node and place nothing new there.
    Drain {
        #[arg(value_name = "PEER")]
        node: String,
    },
    /// Place nothing new on a node; what it runs stays.
    Cordon {
        #[arg(value_name = "PEER")]
        node: String,
    },
    /// Let the scheduler use a node again.
    Uncordon {
        #[arg(value_name = "PEER")]
        node: String,
    },
    /// Cut a node off for good: its connections are closed and its replicas move.
    Revoke {
        #[arg(value_name = "PEER")]
        node: String,
    },
}

#[derive(Subcommand)]
enum WorkloadVerb {
    /// Create or update a workload from a YAML or JSON document.
    Apply {
        /// The document.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Every workload.
    List,
    /// One workload and its replicas.
    Get { name: String },
    /// Delete a workload; its replicas stop everywhere.
    Delete { name: String },
    /// Change the number of replicas.
    Scale { name: String, replicas: u32 },
    /// A replica's output.
    Logs {
        name: String,
        /// Which replica.
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// The last this many lines.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Why each replica is where it is, or why it is not placed.
    Explain { name: String },
}

#[derive(Subcommand)]
enum UserVerb {
    /// Give a key a role (admin, deployer or viewer).
    Add {
        /// The user's public key, hex (`cloudlessctl key show` prints it).
        #[arg(value_name = "KEY")]
        public_key: String,
        /// admin, deployer or viewer.
        #[arg(long)]
        role: String,
        /// A name for people.
        #[arg(long)]
        name: String,
    },
    /// Remove a user.
    Remove {
        /// The user's public key, hex.
        #[arg(value_name = "KEY")]
        public_key: String,
    },
    /// This CLI's role.
    Whoami,
}

#[derive(Subcommand)]
enum KeyVerb {
    /// Create this CLI's user key (once).
    Create,
    /// Print this CLI's public key.
    Show,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLOUDLESS_CTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

/// The exit status for a failure: the kind of the cluster's answer, invalid for a document
/// or argument refused here, 1 for anything else.
fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return c.kind().exit_code();
        }
        if cause.downcast_ref::<SpecError>().is_some()
            || cause.downcast_ref::<cloudless_types::InvalidInput>().is_some()
        {
            return ErrorKind::Invalid.exit_code();
        }
    }
    1
}

struct Ctx {
    dir: PathBuf,
    settings: CtlConfig,
    peer: Option<String>,
    key: PathBuf,
    output: Output,
}

impl Ctx {
    async fn connect(&self) -> Result<Client> {
        let peer = self.peer.clone().or_else(|| self.settings.peer.clone()).with_context(|| {
            format!(
                "no peer: pass --peer <multiaddr>, set CLOUDLESS_PEER, or put peer = \"…\" in {}",
                self.dir.join(config::FILE).display()
            )
        })?;
        let key = keys::load(&self.key).context(
            "no user key (create one with `cloudlessctl key create`, then ask an admin to add it)",
        )?;
        let cluster = match &self.settings.cluster {
            Some(hex) => Some(parse_key(hex).with_context(|| {
                format!(
                    "cluster in {} is not a root public key",
                    self.dir.join(config::FILE).display()
                )
            })?),
            None => None,
        };
        let client = Client::connect(&peer, key, cluster).await?;
        if cluster.is_none() {
            // First contact: keep the cluster this peer belongs to, so requests are signed for
            // it from now on (a request signed for one cluster is refused by every other).
            let settings =
                CtlConfig { cluster: Some(keys::hex(&client.cluster())), ..self.settings.clone() };
            if let Err(e) = settings.save(&self.dir) {
                eprintln!("note: cannot keep the cluster key in ctl.toml: {e}");
            }
        }
        Ok(client)
    }

    fn print<T: Serialize>(&self, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
        match self.output {
            Output::Table => print!("{}", table(value)),
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        }
        Ok(())
    }
}

async fn run(cli: Cli) -> Result<()> {
    let dir = cli.config_dir.clone().unwrap_or_else(config::default_dir);
    let settings = CtlConfig::load(&dir)?;
    let key =
        cli.key.clone().or_else(|| settings.key.clone()).unwrap_or_else(|| dir.join(USER_KEY));
    let ctx = Ctx { dir, settings, peer: cli.peer.clone(), key, output: cli.output };
    match cli.command {
        Verb::Key { verb } => key_verb(&ctx, verb),
        Verb::Cluster { verb: ClusterVerb::Status } => {
            let c = ctx.connect().await?;
            let s = c.status().await;
            c.close().await;
            ctx.print(&s?, status_table)
        }
        Verb::Token { verb } => token(&ctx, verb).await,
        Verb::Node { verb } => node(&ctx, verb).await,
        Verb::Workload { verb } => workload(&ctx, verb).await,
        Verb::User { verb } => user(&ctx, verb).await,
    }
}

fn key_verb(ctx: &Ctx, verb: KeyVerb) -> Result<()> {
    match verb {
        KeyVerb::Create => {
            let k = keys::create(&ctx.key)?;
            println!("{}", keys::hex(&k.verifying_key().to_bytes()));
            eprintln!(
                "created {}; an admin adds it with `cloudlessctl user add <key> --role deployer --name <you>`",
                ctx.key.display()
            );
        }
        KeyVerb::Show => {
            let k = keys::load(&ctx.key)?;
            println!("{}", keys::hex(&k.verifying_key().to_bytes()));
        }
    }
    Ok(())
}

fn status_table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    line(&mut out, "cluster", s.name.clone());
    line(&mut out, "leader", s.leader.as_ref().map_or("(none)".into(), ToString::to_string));
    let voters: Vec<String> = s.voters.iter().map(ToString::to_string).collect();
    line(&mut out, "voters", voters.join(", "));
    line(&mut out, "term", s.term.to_string());
    line(&mut out, "applied", s.applied.to_string());
    line(&mut out, "nodes", format!("{} enrolled, {} alive", s.nodes, s.alive));
    line(&mut out, "workloads", s.workloads.to_string());
    line(&mut out, "replicas", format!("{} of {} running", s.running, s.replicas));
    out
}

fn labels(list: &[String]) -> Result<BTreeMap<String, String>> {
    list.iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {l:?} must be key=value"))
        })
        .collect()
}

async fn token(ctx: &Ctx, verb: TokenVerb) -> Result<()> {
    let TokenVerb::Create { uses, ttl, roles, labels: l, bootstrap } = verb;
    let root_path = ctx.settings.root_key.clone().unwrap_or_else(|| ctx.dir.join(ROOT_KEY));
    let root = keys::load(&root_path)
        .with_context(|| "only the holder of the cluster root key can create invites")?;
    let roles = roles
        .iter()
        .map(|r| {
            NodeRole::parse(r).ok_or_else(|| {
                ClientError::Api(cloudless_api::ApiError::invalid(format!(
                    "role {r:?} is not worker or voter"
                )))
            })
        })
        .collect::<Result<_, _>>()?;
    if uses == 0 {
        bail!("--uses must be at least 1");
    }
    let c = ctx.connect().await?;
    let s = c.status().await;
    c.close().await;
    let s = s?;
    if keys::hex(&root.verifying_key().to_bytes()) != s.root_key {
        bail!("{} is not the root key of cluster {:?}", root_path.display(), s.name);
    }
    let bootstrap = if bootstrap.is_empty() { s.bootstrap } else { bootstrap };
    let grant = Grant {
        roles,
        labels: labels(&l)?,
        max_uses: uses,
        expires_ms: now_ms().saturating_add(ttl.saturating_mul(1000)),
    };
    let invite = Invite::create(&root, &s.name, bootstrap, grant, rand::random());
    println!("{}", invite.encode());
    Ok(())
}

fn node_table(nodes: &Vec<NodeInfo>) -> String {
    let mut out = format!(
        "{:<54} {:<8} {:<6} {:<12} {:<10} {:>9} {:>11} {:>8}\n",
        "PEER", "STATE", "VOTER", "SCHEDULING", "ZONE", "CPU", "MEMORY", "REPLICAS"
    );
    for n in nodes {
        let state = if n.revoked { "revoked" } else { n.state.as_str() };
        out.push_str(&format!(
            "{:<54} {:<8} {:<6} {:<12} {:<10} {:>9} {:>11} {:>8}\n",
            n.peer,
            state,
            if n.voter { "yes" } else { "" },
            n.schedulable,
            n.zone.clone().unwrap_or_default(),
            format!("{}/{}m", n.cpu_used_millis, n.cpu_millis),
            format!("{}/{}Mi", n.memory_used_mib, n.memory_mib),
            match n.max_replicas {
                Some(max) => format!("{}/{max}", n.replicas),
                None => n.replicas.to_string(),
            }
        ));
    }
    out
}

/// The one node whose PeerId starts with `prefix`.
fn find<'a>(list: &'a [NodeInfo], prefix: &str) -> Result<&'a NodeInfo, ClientError> {
    let found: Vec<&NodeInfo> =
        list.iter().filter(|n| n.peer.as_str().starts_with(prefix)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(cloudless_api::ApiError::not_found(format!("no enrolled node {prefix}")).into()),
        _ => Err(cloudless_api::ApiError::invalid(format!(
            "{prefix} matches {} nodes; give more of the PeerId",
            found.len()
        ))
        .into()),
    }
}

async fn node(ctx: &Ctx, verb: NodeVerb) -> Result<()> {
    let c = ctx.connect().await?;
    let result = node_on(ctx, &c, verb).await;
    c.close().await;
    result
}

async fn node_on(ctx: &Ctx, c: &Client, verb: NodeVerb) -> Result<()> {
    let list = c.nodes().await?;
    let (peer, done) = match verb {
        NodeVerb::List => return ctx.print(&list, node_table),
        NodeVerb::Get { node } => {
            let n = find(&list, &node)?.clone();
            return ctx.print(&n, |n| {
                let mut t = node_table(&vec![n.clone()]);
                t.push_str(&format!("roles      {}\n", n.roles.join(", ")));
                t.push_str(&format!("class      {}\n", n.class.clone().unwrap_or_default()));
                t.push_str(&format!("runtimes   {}\n", n.runtimes.join(", ")));
                let labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.push_str(&format!("labels     {}\n", labels.join(", ")));
                t.push_str(&format!("addresses  {}\n", n.addresses.join(" ")));
                t
            });
        }
        NodeVerb::Drain { node } => {
            let peer = find(&list, &node)?.peer.clone();
            c.set_schedulable(&peer, Schedulable::Draining).await?;
            (peer, "draining: its replicas move")
        }
        NodeVerb::Cordon { node } => {
            let peer = find(&list, &node)?.peer.clone();
            c.set_schedulable(&peer, Schedulable::Cordoned).await?;
            (peer, "cordoned")
        }
        NodeVerb::Uncordon { node } => {
            let peer = find(&list, &node)?.peer.clone();
            c.set_schedulable(&peer, Schedulable::Yes).await?;
            (peer, "schedulable again")
        }
        NodeVerb::Revoke { node } => {
            let peer = find(&list, &node)?.peer.clone();
            c.revoke(&peer).await?;
            (peer, "revoked")
        }
    };
    println!("node {peer} {done}");
    Ok(())
}

fn workload_table(list: &Vec<WorkloadInfo>) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:<6} {:>9} {:>8}  {}\n",
        "NAME", "KIND", "RUNTIME", "RUNNING", "VERSION", "IMAGE"
    );
    for w in list {
        let (runtime, image) = match &w.spec.image {
            Image::Wasi(h) => ("wasi", format!("sha256:{}", h.short(16))),
            Image::Container(i) => ("container", i.clone()),
        };
        out.push_str(&format!(
            "{:<24} {:<8} {:<6} {:>9} {:>8}  {}\n",
            w.spec.name,
            format!("{:?}", w.spec.kind).to_lowercase(),
            runtime,
            format!("{}/{}", w.running, w.spec.replicas),
            w.version,
            image
        ));
    }
    out
}

fn workload_detail(w: &WorkloadInfo) -> String {
    let mut out = workload_table(&vec![w.clone()]);
    out.push_str(&format!(
        "\n{:<8} {:<54} {:<11} {:>8}  {}\n",
        "REPLICA", "NODE", "PHASE", "RESTARTS", "REASON"
    ));
    for r in &w.replicas {
        let phase = match &r.from {
            Some(from) => format!("{} (moving from {from})", r.phase),
            None => r.phase.clone(),
        };
        out.push_str(&format!(
            "{:<8} {:<54} {:<11} {:>8}  {}\n",
            r.index,
            r.node.as_ref().map_or("-".into(), ToString::to_string),
            phase,
            r.restarts,
            r.reason.clone().unwrap_or_default()
        ));
    }
    if let Some(why) = &w.unschedulable {
        out.push_str(&format!("\nnot placed: {why}\n"));
    }
    out
}

async fn workload(ctx: &Ctx, verb: WorkloadVerb) -> Result<()> {
    // Read the document before connecting: a bad spec is refused without touching anything.
    let parsed = match &verb {
        WorkloadVerb::Apply { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            Some(
                spec::parse(&text)
                    .with_context(|| format!("{} is not a valid workload", file.display()))?,
            )
        }
        _ => None,
    };
    let c = ctx.connect().await?;
    let result = workload_on(ctx, &c, verb, parsed).await;
    c.close().await;
    result
}

/// A workload name given on the command line.
fn name(text: &str) -> Result<WorkloadName> {
    Ok(WorkloadName::new(text)?)
}

async fn workload_on(
    ctx: &Ctx,
    c: &Client,
    verb: WorkloadVerb,
    parsed: Option<spec::Parsed>,
) -> Result<()> {
    match verb {
        WorkloadVerb::Apply { file } => {
            let Some(parsed) = parsed else { bail!("no document") };
            let spec = match parsed.module.clone() {
                Some(Module::Path(path)) => {
                    let path = relative_to(&file, &path);
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("cannot read module {}", path.display()))?;
                    let hash = c.upload(&bytes).await.context("module upload failed")?;
                    parsed.with_module_hash(&hash)?
                }
                Some(Module::Hash(hash)) => parsed.with_module_hash(&hash)?,
                None => parsed.spec,
            };
            let name = spec.name.clone();
            let version = c.put_workload(spec).await?;
            println!("workload {name} applied (version {version})");
            Ok(())
        }
        WorkloadVerb::List => {
            let list = c.workloads().await?;
            ctx.print(&list, workload_table)
        }
        WorkloadVerb::Get { name: n } => {
            let w = c.workload(&name(&n)?).await?;
            ctx.print(&w, workload_detail)
        }
        WorkloadVerb::Delete { name: n } => {
            c.delete_workload(&name(&n)?).await?;
            println!("workload {n} deleted");
            Ok(())
        }
        WorkloadVerb::Scale { name: n, replicas } => {
            c.scale(&name(&n)?, replicas).await?;
            println!("workload {n} scaled to {replicas}");
            Ok(())
        }
        WorkloadVerb::Explain { name: n } => {
            let lines = c.explain(&name(&n)?).await?;
            ctx.print(&lines, |l| l.iter().map(|s| format!("{s}\n")).collect())
        }
        WorkloadVerb::Logs { name: n, replica, tail, follow } => {
            let replica = ReplicaId::new(&name(&n)?, replica);
            let mut after_ns = 0;
            loop {
                let lines = c.logs(replica.clone(), after_ns, tail).await?;
                if let Some(last) = lines.last() {
                    after_ns = last.at_ns;
                }
                match ctx.output {
                    Output::Table => {
                        for l in &lines {
                            println!("{}", l.text);
                        }
                    }
                    _ => {
                        for l in &lines {
                            println!("{}", serde_json::to_string(l)?);
                        }
                    }
                }
                if !follow {
                    return Ok(());
                }
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        }
    }
}

/// A module path in a document is relative to the document.
fn relative_to(document: &Path, module: &Path) -> PathBuf {
    if module.is_absolute() {
        return module.to_path_buf();
    }
    document.parent().map_or_else(|| module.to_path_buf(), |d| d.join(module))
}

fn parse_key(hex: &str) -> Result<[u8; 32], ClientError> {
    keys::parse_hex(hex).ok_or_else(|| {
        cloudless_api::ApiError::invalid(format!("{hex:?} is not a public key (64 hex digits)"))
            .into()
    })
}

async fn user(ctx: &Ctx, verb: UserVerb) -> Result<()> {
    // Arguments are checked before anything is contacted.
    let key = match &verb {
        UserVerb::Add { public_key, .. } | UserVerb::Remove { public_key } => {
            Some(parse_key(public_key)?)
        }
        UserVerb::Whoami => None,
    };
    let role = match &verb {
        UserVerb::Add { role, .. } => Some(Role::parse(role).ok_or_else(|| {
            ClientError::Api(cloudless_api::ApiError::invalid(format!(
                "role {role:?} is not admin, deployer or viewer"
            )))
        })?),
        _ => None,
    };
    let c = ctx.connect().await?;
    let result = match (verb, key, role) {
        (UserVerb::Add { name, .. }, Some(key), Some(role)) => {
            c.put_user(key, &name, role).await.map(|()| println!("done"))
        }
        (UserVerb::Remove { .. }, Some(key), _) => {
            c.remove_user(key).await.map(|()| println!("done"))
        }
        _ => c.whoami().await.map(|r| println!("{} {r}", keys::hex(&c.public_key()))),
    };
    c.close().await;
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_verbs_are_well_formed_and_positionals_do_not_shadow_global_flags() {
        Cli::command().debug_assert();
        // Global flags after a positional of the same concept (a peer, a key) must still be
        // the flags: these failed once because the positional shared the flag's id.
        for args in [
            &["cloudlessctl", "node", "drain", "12D3", "--peer", "/ip4/1.2.3.4/udp/1/quic-v1"][..],
            &["cloudlessctl", "user", "add", "ab", "--role", "viewer", "--name", "x", "--key", "k"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.peer.is_some() || cli.key.is_some());
        }
    }
}
