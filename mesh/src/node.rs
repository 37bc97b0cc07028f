//! The swarm task: the one owner of the libp2p `Swarm`, and the [`Handle`] everyone else uses.
//!
//! ```text
//!   Handle (clone) ──Command (bounded)──▶ ┌──────────── swarm task ─────────────┐
//!        ▲                                │ select! { biased;                    │
//!        └──────── oneshot replies ◀──────│   commands, swarm events,            │──Event (bounded)──▶ node
//!                                         │   membership deadline, housekeeping }│
//!   Handle::serve ◀──InboundRequest───────│ Swarm<Behaviour>  Membership<PeerId> │
//!                                         │ Directory  pending RPCs  gate        │
//!                                         └──────────────────────────────────────┘
//! ```
//!
//! Wire protocols (besides libp2p's identify, ping, kad, autonat, relay and dcutr):
//!
//! * `/cloudless/datagram/1`: one-way membership messages and directory sync messages,
//!   request-response with an empty answer, at most `datagram_max_bytes` each;
//! * gossipsub topic `cloudless/membership/1`: membership floods, unsigned (anonymous mode,
//!   content-addressed ids), validated before they are forwarded;
//! * `/cloudless/rpc/1`: typed RPC for the other crates, at most `rpc_max_bytes` each way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_types::{Capacity, NodeDescriptor};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol as Proto;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, autonat, dcutr, gossipsub, identify,
    mdns, noise, ping, relay, tcp, yamux,
};
use rand::seq::IteratorRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::codec::Codec;
use crate::config::{Config, RelayMode, Role};
use crate::directory::Directory;
use crate::gate::{self, Gate, Protocol};
use crate::membership::{self, Input, MemberView, Membership, Output, State};
use crate::rpc::{
    Envelope, InboundRequest, MAX_SERVICE_NAME, RemoteError, RemoteErrorKind, Reply, Rpc, RpcError,
};

/// The RPC protocol.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/rpc/1");
/// The membership and directory protocol.
pub const DATAGRAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/datagram/1");
/// Our private Kademlia DHT (not the public IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/kad/1.0.0");
/// The gossipsub topic of membership floods.
pub const MEMBERSHIP_TOPIC: &str = "cloudless/membership/1";
/// Identify's protocol version string: peers with another one are not Cloudless.
pub const IDENTIFY_VERSION: &str = "/cloudless/1.0.0";

/// Commands queued from handles; a full queue makes callers wait (backpressure).
const COMMAND_QUEUE: usize = 256;
/// Events queued for the node; when full, further events are dropped and counted, and the
/// node re-reads state through the handle.
const EVENT_QUEUE: usize = 4096;
/// Inbound RPCs awaiting their handler's answer, across all services.
const MAX_INBOUND_PENDING: usize = 1024;
/// RPC requests parked while a DHT lookup finds the peer.
const MAX_PARKED: usize = 256;
/// Directory peers sent our own change at once, beyond periodic reconciliation.
const DIRECTORY_PUSH: usize = 3;
/// Relay servers remembered as candidates; a few dozen are plenty to pick two from.
const MAX_RELAY_CANDIDATES: usize = 32;
/// Relays a private node keeps reservations with.
const MAX_RELAYS: usize = 2;
/// How long a leaving node keeps running so its announcement gets out.
const LEAVE_LINGER: Duration = Duration::from_millis(500);
/// How often a node that knows nobody dials its bootstrap peers again.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(5);
/// Name of the file holding the last membership incarnation.
const INCARNATION_FILE: &str = "membership.incarnation";
/// Relay v2 hop protocol, advertised by relay servers through identify.
const RELAY_HOP: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// Messages of the datagram protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Datagram {
    Membership(membership::Message<PeerId>),
    Directory(Vec<u8>),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: gate::Behaviour,
    unroutable: unroutable::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: Toggle<gossipsub::Behaviour>,
    rpc: request_response::Behaviour<Codec<Envelope, Reply>>,
    datagram: request_response::Behaviour<Codec<Datagram, ()>>,
    autonat: autonat::Behaviour,
    relay_client: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
}

/// What the mesh tells the node.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Membership changed.
    Member(membership::Event<PeerId>),
    /// A node's directory entry changed (`None`: removed or invalid).
    Directory {
        /// The node.
        peer: PeerId,
        /// Its entry now.
        descriptor: Option<NodeDescriptor>,
    },
    /// The node listens on a new address.
    Listening(Multiaddr),
    /// AutoNAT's verdict changed.
    Nat(Reachability),
}

/// AutoNAT's verdict on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// Not known yet.
    Unknown,
    /// Reachable from the internet at this address.
    Public(Multiaddr),
    /// Behind a NAT: reachable through relays.
    Private,
}

/// Why a mesh operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The directory could not be loaded or changed.
    #[error(transparent)]
    Directory(#[from] crate::directory::DirectoryError),
    /// The transport could not be built.
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A dial failed at once.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The service name is already served or invalid.
    #[error("cannot serve {service:?}: {reason}")]
    Serve {
        /// The service.
        service: String,
        /// Why.
        reason: String,
    },
    /// A client node has no membership or directory.
    #[error("a client node has no {0}")]
    NotAMember(&'static str),
    /// The swarm task is gone.
    #[error("the mesh has shut down")]
    Closed,
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), MeshError>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Members(oneshot::Sender<Result<Vec<MemberView<PeerId>>, MeshError>>),
    SetCapacity(Capacity),
    SetDescriptor(NodeDescriptor, oneshot::Sender<Result<(), MeshError>>),
    Directory(oneshot::Sender<Result<BTreeMap<PeerId, NodeDescriptor>, MeshError>>),
    DirectoryHeads(oneshot::Sender<Result<Vec<String>, MeshError>>),
    Request {
        peer: PeerId,
        envelope: Envelope,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
    Serve {
        service: String,
        sender: mpsc::Sender<InboundRequest>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    RecheckGate(oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// The cloneable way into the mesh. Every method talks to the swarm task over a bounded queue.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    rpc_max_bytes: usize,
    rpc_timeout: Duration,
}

impl Handle {
    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| MeshError::Closed)?;
        rx.await.map_err(|_| MeshError::Closed)
    }

    /// Addresses the node listens on, with its `/p2p/<id>` suffix.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Dials an address (with or without `/p2p/<id>`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.ask(|r| Command::Dial(addr, r)).await?
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::Connected).await
    }

    /// Every member this node knows of, itself included.
    pub async fn members(&self) -> Result<Vec<MemberView<PeerId>>, MeshError> {
        self.ask(Command::Members).await?
    }

    /// Reports this node's current capacity; the membership announces it when it changed
    /// meaningfully.
    pub async fn set_capacity(&self, capacity: Capacity) -> Result<(), MeshError> {
        self.tx.send(Command::SetCapacity(capacity)).await.map_err(|_| MeshError::Closed)
    }

    /// Replaces this node's directory entry (its addresses are kept up to date by the mesh).
    pub async fn set_descriptor(&self, descriptor: NodeDescriptor) -> Result<(), MeshError> {
        self.ask(|r| Command::SetDescriptor(descriptor, r)).await?
    }

    /// The node directory: every node's valid entry.
    pub async fn directory(&self) -> Result<BTreeMap<PeerId, NodeDescriptor>, MeshError> {
        self.ask(Command::Directory).await?
    }

    /// The directory document's heads; equal on two nodes means equal directories.
    pub async fn directory_heads(&self) -> Result<Vec<String>, MeshError> {
        self.ask(Command::DirectoryHeads).await?
    }

    /// Sends raw `body` to `service` on `peer` and waits for the answer, at most `timeout`.
    pub async fn request(
        &self,
        peer: PeerId,
        service: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            return Err(RpcError::BadService(service.to_string()));
        }
        let envelope = Envelope { service: service.to_string(), body };
        let size = membership::encoded_len(&envelope);
        if size > self.rpc_max_bytes {
            return Err(RpcError::TooLarge { size, max: self.rpc_max_bytes });
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Request { peer, envelope, reply: tx })
            .await
            .map_err(|_| RpcError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RpcError::Closed),
            Err(_) => Err(RpcError::Timeout { peer, timeout }),
        }
    }

    /// Calls service `R` on `peer` with the mesh's default deadline.
    pub async fn call<R: Rpc>(
        &self,
        peer: PeerId,
        request: &R::Request,
    ) -> Result<R::Response, RpcError> {
        self.call_with_timeout::<R>(peer, request, self.rpc_timeout).await
    }

    /// Calls service `R` on `peer`, waiting at most `timeout`.
    pub async fn call_with_timeout<R: Rpc>(
        &self,
        peer: PeerId,
        request: &R::Request,
        timeout: Duration,
    ) -> Result<R::Response, RpcError> {
        let codec = |reason: String| RpcError::Codec { service: R::SERVICE.to_string(), reason };
        let body = postcard::to_allocvec(request).map_err(|e| codec(e.to_string()))?;
        let answer = self.request(peer, R::SERVICE, body, timeout).await?;
        postcard::from_bytes(&answer).map_err(|e| codec(e.to_string()))
    }

    /// Registers a handler for `service`; requests arrive on the returned queue of `capacity`
    /// entries. When it is full, callers get a "busy" answer.
    pub async fn serve(
        &self,
        service: &str,
        capacity: usize,
    ) -> Result<mpsc::Receiver<InboundRequest>, MeshError> {
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            return Err(MeshError::Serve {
                service: service.into(),
                reason: "name must be 1 to 64 bytes".into(),
            });
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.ask(|r| Command::Serve { service: service.to_string(), sender: tx, reply: r })
            .await??;
        Ok(rx)
    }

    /// Closes connections to peers the gate no longer admits.
    pub async fn recheck_gate(&self) -> Result<(), MeshError> {
        self.ask(Command::RecheckGate).await
    }

    /// Announces a voluntary leave, lets it get out, and stops the mesh.
    pub async fn leave(&self) -> Result<(), MeshError> {
        self.ask(Command::Leave).await
    }

    /// Stops the mesh without announcing anything (the others will see a failure).
    pub async fn shutdown(&self) -> Result<(), MeshError> {
        self.ask(Command::Shutdown).await
    }
}

/// A running mesh node: its handle, its events and its task.
pub struct Mesh {
    /// The way in.
    pub handle: Handle,
    /// The way out; read it, or events are dropped once it is full.
    pub events: mpsc::Receiver<Event>,
    /// The swarm task; abort it to simulate a crash.
    pub task: JoinHandle<()>,
}

/// Starts a mesh node: loads or creates the identity in `config.data_dir`, builds the swarm,
/// starts listening, dials the bootstrap peers and spawns the swarm task.
pub async fn start(config: Config, gate: Arc<dyn Gate>) -> Result<Mesh, MeshError> {
    config.validate()?;
    let keypair = crate::identity::load_or_create(&config.data_dir)?;
    start_with_identity(config, keypair, gate).await
}

/// As [`start`], with an identity from elsewhere.
pub async fn start_with_identity(
    config: Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
) -> Result<Mesh, MeshError> {
    launch(config, keypair, gate, None).await
}

/// As [`start_with_identity`], also recording libp2p's own metrics (connections, identify,
/// ping round trips, Kademlia, gossipsub, relay, hole punching) into `registry`, under the
/// `libp2p_` prefix.
pub async fn start_with_metrics(
    config: Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Mesh, MeshError> {
    let metrics = libp2p::metrics::Metrics::new(registry);
    launch(config, keypair, gate, Some(metrics)).await
}

async fn launch(
    config: Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
    metrics: Option<libp2p::metrics::Metrics>,
) -> Result<Mesh, MeshError> {
    config.validate()?;
    let me = keypair.public().to_peer_id();
    let member = config.role == Role::Member;
    let mut swarm = build_swarm(&config, keypair, gate.clone())?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    let (directory, membership) = if member {
        let (dir, warning) = Directory::open(me, &config.data_dir)?;
        if let Some(w) = warning {
            warn!("{w}");
        }
        let incarnation = next_incarnation(&config.data_dir);
        let seed = config.seed.unwrap_or_else(rand::random);
        let capacity = config.capacity.unwrap_or(Capacity::EMPTY);
        let core = Membership::new(
            me,
            config.membership.clone(),
            capacity,
            incarnation,
            seed,
            Instant::now(),
        );
        (Some(dir), Some(core))
    } else {
        (None, None)
    };
    for addr in &config.bootstrap {
        if let Some(Proto::P2p(peer)) = addr.iter().last() {
            if peer == me {
                continue;
            }
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let handle = Handle {
        tx,
        peer_id: me,
        rpc_max_bytes: config.rpc_max_bytes,
        rpc_timeout: config.rpc_timeout,
    };
    let task = Task {
        me,
        swarm,
        gate,
        commands: rx,
        events: event_tx,
        dropped_events: 0,
        topic: gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC),
        membership,
        incarnation_saved: None,
        directory,
        own: config.descriptor.clone(),
        listen: Vec::new(),
        services: HashMap::new(),
        inbound: FuturesUnordered::new(),
        pending: HashMap::new(),
        parked: HashMap::new(),
        lookups: HashMap::new(),
        relays: HashSet::new(),
        relay_candidates: HashMap::new(),
        reachability: if config.behind_nat { Reachability::Private } else { Reachability::Unknown },
        last_persist: Instant::now(),
        last_bootstrap: Instant::now(),
        metrics,
        config,
    };
    let span = tracing::info_span!("mesh", peer = %me);
    let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
    Ok(Mesh { handle, events, task })
}

fn build_swarm(
    config: &Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
) -> Result<Swarm<Behaviour>, MeshError> {
    let member = config.role == Role::Member;
    let me = keypair.public().to_peer_id();
    let transport = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    let rr_config = request_response::Config::default()
        // Callers enforce their own deadlines; this only reclaims abandoned streams.
        .with_request_timeout(Duration::from_secs(300))
        .with_max_concurrent_streams(256);
    let datagram_config = request_response::Config::default()
        .with_request_timeout(Duration::from_secs(30))
        .with_max_concurrent_streams(256);
    let (rpc_max, dg_max) = (config.rpc_max_bytes, config.datagram_max_bytes);
    let mdns_on = config.mdns && member;
    // The relay server advertises itself once the node has a confirmed external address,
    // which AutoNAT provides when it finds the node publicly reachable (`Auto`); `Always`
    // advertises from the start, `Never` (and clients) leave it out.
    let relay_server = match (config.relay, member) {
        (RelayMode::Never, _) | (_, false) => None,
        (mode, true) => {
            let mut r = relay::Behaviour::new(me, relay_config());
            if mode == RelayMode::Always {
                r.set_status(Some(relay::Status::Enable));
            }
            Some(r)
        }
    };
    let gossip = if member {
        let cfg = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .validate_messages()
            .message_id_fn(|m: &gossipsub::Message| {
                use sha2::Digest;
                gossipsub::MessageId::from(sha2::Sha256::digest(&m.data)[..20].to_vec())
            })
            .max_transmit_size(64 * 1024)
            .heartbeat_interval(Duration::from_millis(500))
            .build()
            .map_err(|e| transport(&e))?;
        let mut g = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, cfg)
            .map_err(|e| transport(&e))?;
        g.subscribe(&gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC)).map_err(|e| transport(&e))?;
        Some(g)
    } else {
        None
    };
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_behaviour(|key, relay_client| {
            let mut kad = kad::Behaviour::with_config(
                me,
                MemoryStore::new(me),
                kad::Config::new(KAD_PROTOCOL),
            );
            kad.set_mode(Some(if member { kad::Mode::Server } else { kad::Mode::Client }));
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), me).ok()
            } else {
                None
            };
            Behaviour {
                gate: gate::Behaviour::new(gate),
                unroutable: unroutable::Behaviour::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                        .with_agent_version(format!("cloudless/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                mdns: Toggle::from(mdns),
                gossipsub: Toggle::from(gossip),
                rpc: request_response::Behaviour::with_codec(
                    Codec::new(rpc_max, rpc_max),
                    [(RPC_PROTOCOL, ProtocolSupport::Full)],
                    rr_config,
                ),
                datagram: request_response::Behaviour::with_codec(
                    Codec::new(dg_max, 16),
                    [(
                        DATAGRAM_PROTOCOL,
                        if member { ProtocolSupport::Full } else { ProtocolSupport::Outbound },
                    )],
                    datagram_config,
                ),
                autonat: autonat::Behaviour::new(me, autonat::Config::default()),
                relay_client,
                relay_server: Toggle::from(relay_server),
                dcutr: dcutr::Behaviour::new(me),
            }
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    Ok(swarm)
}

/// Feeds libp2p's metrics with one swarm event.
fn record(m: &libp2p::metrics::Metrics, event: &SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    m.record(event);
    match event {
        SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => m.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => m.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => m.record(e),
        _ => {}
    }
}

/// Reads the last incarnation from the data dir and returns the next one, so a restarted node
/// outranks whatever the cluster remembers of its earlier life.
fn next_incarnation(data_dir: &Path) -> u32 {
    std::fs::read_to_string(data_dir.join(INCARNATION_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(0, |i| i.saturating_add(1))
}

type InboundFuture =
    BoxFuture<'static, (Result<Reply, oneshot::error::RecvError>, ResponseChannel<Reply>)>;

struct PendingRpc {
    peer: PeerId,
    /// Kept for one retry after a DHT lookup, when the peer was not connected and the request
    /// is small (see [`RETRY_COPY_MAX`]).
    retry: Option<Envelope>,
    reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
}

/// Largest request kept for a retry after a DHT lookup: bounds the memory pending requests can
/// hold to `rpc_max_pending` times this. Larger requests to unreachable peers fail at once.
const RETRY_COPY_MAX: usize = 64 * 1024;

struct Task {
    /// libp2p's metrics, when the node exports them.
    metrics: Option<libp2p::metrics::Metrics>,
    me: PeerId,
    config: Config,
    swarm: Swarm<Behaviour>,
    gate: Arc<dyn Gate>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    dropped_events: u64,
    topic: gossipsub::IdentTopic,
    membership: Option<Membership<PeerId>>,
    incarnation_saved: Option<u32>,
    directory: Option<Directory>,
    own: NodeDescriptor,
    listen: Vec<Multiaddr>,
    services: HashMap<String, mpsc::Sender<InboundRequest>>,
    inbound: FuturesUnordered<InboundFuture>,
    pending: HashMap<OutboundRequestId, PendingRpc>,
    parked: HashMap<kad::QueryId, Vec<PendingRpc>>,
    /// DHT lookups started for members we could not dial.
    lookups: HashMap<kad::QueryId, PeerId>,
    relays: HashSet<PeerId>,
    relay_candidates: HashMap<PeerId, Multiaddr>,
    reachability: Reachability,
    last_persist: Instant,
    last_bootstrap: Instant,
}

impl Task {
    async fn run(mut self) {
        self.save_incarnation();
        if self.directory.is_some()
            && let Err(e) = self.publish_own()
        {
            warn!(error = %e, "cannot publish this node's directory entry");
        }
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        let mut directory_tick = tokio::time::interval(self.config.directory_interval);
        let mut stop: Option<(Instant, Option<oneshot::Sender<()>>)> = None;
        loop {
            let deadline = self
                .membership
                .as_ref()
                .and_then(|m| m.next_deadline())
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let stop_at = stop.as_ref().map(|(at, _)| *at);
            tokio::select! {
                biased;
                cmd = self.commands.recv(), if stop.is_none() => match cmd {
                    Some(Command::Leave(reply)) => {
                        info!("leaving the cluster");
                        self.drive(Input::Leave);
                        stop = Some((Instant::now() + LEAVE_LINGER, Some(reply)));
                    }
                    Some(Command::Shutdown(reply)) => {
                        stop = Some((Instant::now(), Some(reply)));
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => stop = Some((Instant::now(), None)),
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((reply, channel)) = self.inbound.next(), if !self.inbound.is_empty() => {
                    let reply = reply.unwrap_or_else(|_| Err(RemoteError::new(RemoteErrorKind::Failed, "the handler dropped the request")));
                    let _ = self.swarm.behaviour_mut().rpc.send_response(channel, reply);
                }
                _ = tokio::time::sleep_until(deadline.into()), if self.membership.is_some() => self.drive(Input::Tick),
                _ = directory_tick.tick() => self.reconcile_directory(1),
                _ = housekeeping.tick() => self.housekeeping(),
                _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now).into()), if stop_at.is_some() => break,
            }
        }
        self.persist_directory();
        if let Some((_, Some(reply))) = stop {
            let _ = reply.send(());
        }
        debug!("mesh stopped");
    }

    fn emit(&mut self, event: Event) {
        if self.events.try_send(event).is_err() {
            self.dropped_events += 1;
            if self.dropped_events.is_power_of_two() {
                warn!(dropped = self.dropped_events, "mesh event queue full; events dropped");
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(r) => {
                let me = self.me;
                let addrs = quic_first(&self.listen);
                let _ = r.send(
                    addrs.into_iter().map(|a| a.with_p2p(me).unwrap_or_else(|a| a)).collect(),
                );
            }
            Command::Dial(addr, r) => {
                // Remember where the peer is, so later requests can dial it again.
                if let Some(Proto::P2p(peer)) = addr.iter().last() {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                let res = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| MeshError::Dial { addr, reason: e.to_string() });
                let _ = r.send(res);
            }
            Command::Connected(r) => {
                let _ = r.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Members(r) => {
                let res = match &self.membership {
                    Some(m) => Ok(m.members().collect()),
                    None => Err(MeshError::NotAMember("membership")),
                };
                let _ = r.send(res);
            }
            Command::SetCapacity(c) => {
                if c.validate().is_ok() {
                    self.drive(Input::SetCapacity(c));
                } else {
                    warn!(capacity = ?c, "ignoring invalid capacity");
                }
            }
            Command::SetDescriptor(d, r) => {
                self.own = d;
                let _ = r.send(self.publish_own());
            }
            Command::Directory(r) => {
                let res = self
                    .directory
                    .as_ref()
                    .map(Directory::entries)
                    .ok_or(MeshError::NotAMember("directory"));
                let _ = r.send(res);
            }
            Command::DirectoryHeads(r) => {
                let res = self
                    .directory
                    .as_ref()
                    .map(Directory::heads)
                    .ok_or(MeshError::NotAMember("directory"));
                let _ = r.send(res);
            }
            Command::Request { peer, envelope, reply } => {
                if self.pending.len() >= self.config.rpc_max_pending {
                    let _ = reply.send(Err(RpcError::Busy));
                    return;
                }
                let retry = (!self.swarm.is_connected(&peer)
                    && envelope.body.len() <= RETRY_COPY_MAX)
                    .then(|| envelope.clone());
                self.send_rpc(peer, envelope, retry, reply);
            }
            Command::Serve { service, sender, reply } => {
                let res = if self.services.get(&service).is_some_and(|s| !s.is_closed()) {
                    Err(MeshError::Serve { service, reason: "already served".into() })
                } else {
                    self.services.insert(service, sender);
                    Ok(())
                };
                let _ = reply.send(res);
            }
            Command::RecheckGate(r) => {
                let denied: Vec<PeerId> = self
                    .swarm
                    .connected_peers()
                    .filter(|p| !self.gate.admits(p))
                    .copied()
                    .collect();
                for p in denied {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                let _ = r.send(());
            }
            Command::Leave(_) | Command::Shutdown(_) => {}
        }
    }

    // ---- RPC -------------------------------------------------------------------------------

    fn send_rpc(
        &mut self,
        peer: PeerId,
        envelope: Envelope,
        retry: Option<Envelope>,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    ) {
        let id = self.swarm.behaviour_mut().rpc.send_request(&peer, envelope);
        self.pending.insert(id, PendingRpc { peer, retry, reply });
    }

    fn on_rpc_event(&mut self, event: request_response::Event<Envelope, Reply>) {
        use request_response::{Event as E, Message as M, OutboundFailure};
        match event {
            E::Message { peer, message: M::Request { request, channel, .. }, .. } => {
                self.on_rpc_request(peer, request, channel)
            }
            E::Message { peer, message: M::Response { request_id, response }, .. } => {
                if let Some(p) = self.pending.remove(&request_id) {
                    let _ =
                        p.reply.send(response.map_err(|error| RpcError::Remote { peer, error }));
                }
            }
            E::OutboundFailure { peer, request_id, error, .. } => {
                let Some(p) = self.pending.remove(&request_id) else {
                    return;
                };
                if matches!(error, OutboundFailure::DialFailure)
                    && p.retry.is_some()
                    && self.parked.len() < MAX_PARKED
                {
                    // Not reachable with what we know: ask the DHT where it is, then retry once.
                    debug!(%peer, "looking the peer up in the DHT before retrying");
                    let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.parked.entry(q).or_default().push(p);
                    return;
                }
                let _ = p.reply.send(Err(RpcError::Transport { peer, reason: error.to_string() }));
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound rpc failed");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn on_rpc_request(&mut self, peer: PeerId, request: Envelope, channel: ResponseChannel<Reply>) {
        let service = request.service.clone();
        let refusal = if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            Some((RemoteErrorKind::BadRequest, "service name must be 1 to 64 bytes".to_string()))
        } else if !self.gate.allows(&peer, Protocol::Rpc { service: &service }) {
            warn!(%peer, %service, "rpc refused by the gate");
            Some((RemoteErrorKind::Unauthorized, format!("not allowed to use {service}")))
        } else if self.inbound.len() >= MAX_INBOUND_PENDING {
            Some((RemoteErrorKind::Busy, "too many requests in progress".to_string()))
        } else {
            match self.services.get(&service) {
                None => {
                    Some((RemoteErrorKind::UnknownService, format!("no service named {service}")))
                }
                Some(sender) => {
                    let (tx, rx) = oneshot::channel();
                    match sender.try_send(InboundRequest {
                        peer,
                        service: request.service,
                        body: request.body,
                        reply: tx,
                    }) {
                        Ok(()) => {
                            self.inbound.push(Box::pin(async move { (rx.await, channel) }));
                            return;
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            Some((RemoteErrorKind::Busy, format!("{service} is overloaded")))
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            self.services.remove(&service);
                            Some((
                                RemoteErrorKind::UnknownService,
                                format!("no service named {service}"),
                            ))
                        }
                    }
                }
            }
        };
        if let Some((kind, message)) = refusal {
            let _ = self
                .swarm
                .behaviour_mut()
                .rpc
                .send_response(channel, Err(RemoteError::new(kind, message)));
        }
    }

    // ---- datagrams: membership and directory -----------------------------------------------

    fn send_datagram(&mut self, to: PeerId, d: Datagram) {
        if to != self.me {
            self.swarm.behaviour_mut().datagram.send_request(&to, d);
        }
    }

    fn on_datagram_event(&mut self, event: request_response::Event<Datagram, ()>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message { peer, message: M::Request { request, channel, .. }, .. } => {
                let _ = self.swarm.behaviour_mut().datagram.send_response(channel, ());
                match request {
                    Datagram::Membership(message) => {
                        tracing::trace!(%peer, kind = message_kind(&message), "membership recv");
                        if self.gate.allows(&peer, Protocol::Membership) {
                            self.drive(Input::Message { from: peer, message });
                        }
                    }
                    Datagram::Directory(bytes) => {
                        if self.gate.allows(&peer, Protocol::Directory) {
                            self.on_directory(peer, &bytes);
                        }
                    }
                }
            }
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "datagram not delivered");
                if matches!(error, request_response::OutboundFailure::DialFailure) {
                    self.look_up(peer);
                }
            }
            E::InboundFailure { peer, error, .. } => debug!(%peer, %error, "datagram refused"),
            E::Message { message: M::Response { .. }, .. } | E::ResponseSent { .. } => {}
        }
    }

    /// Asks the DHT where a member we cannot dial is (a member learned from a member list
    /// before its directory entry arrived). One lookup per peer at a time, at most
    /// [`MAX_PARKED`] at once.
    fn look_up(&mut self, peer: PeerId) {
        if self.lookups.len() >= MAX_PARKED || self.lookups.values().any(|p| *p == peer) {
            return;
        }
        let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.lookups.insert(q, peer);
    }

    /// Feeds the membership core and carries out what it asks.
    fn drive(&mut self, input: Input<PeerId>) {
        let Some(core) = self.membership.as_mut() else {
            return;
        };
        let outputs = core.handle(input, Instant::now());
        for o in outputs {
            match o {
                Output::Send { to, message } => {
                    tracing::trace!(%to, kind = message_kind(&message), "membership send");
                    self.send_datagram(to, Datagram::Membership(message))
                }
                Output::Broadcast(updates) => {
                    let bytes = match postcard::to_allocvec(&updates) {
                        Ok(b) => b,
                        Err(e) => {
                            warn!(error = %e, "cannot encode membership flood");
                            continue;
                        }
                    };
                    let topic = self.topic.clone();
                    if let Some(g) = self.swarm.behaviour_mut().gossipsub.as_mut()
                        && let Err(e) = g.publish(topic, bytes)
                    {
                        // No subscribed peer yet, or the same news already went out:
                        // piggybacking still carries it.
                        debug!(error = %e, "membership flood not published");
                    }
                }
                Output::Event(e) => self.on_member_event(e),
            }
        }
        self.save_incarnation();
    }

    fn on_member_event(&mut self, e: membership::Event<PeerId>) {
        if let membership::Event::State { id, previous, state, .. } = &e {
            debug!(peer = %id, ?previous, ?state, "membership");
            let was_live = matches!(previous, Some(State::Alive | State::Suspect));
            match state {
                State::Alive if !was_live && *id != self.me => {
                    if let Some(dir) = self.directory.as_mut() {
                        dir.reset(id);
                        if let Some(d) = dir.get(id) {
                            add_addresses(&mut self.swarm, id, &d.addrs);
                        }
                        if let Some(msg) = dir.generate(*id) {
                            self.send_datagram(*id, Datagram::Directory(msg));
                        }
                    }
                }
                State::Dead | State::Left => {
                    if let Some(dir) = self.directory.as_mut() {
                        dir.forget(id);
                    }
                }
                _ => {}
            }
        }
        if let membership::Event::Removed { id } = &e
            && let Some(dir) = self.directory.as_mut()
        {
            dir.forget(id);
        }
        self.emit(Event::Member(e));
    }

    fn save_incarnation(&mut self) {
        let Some(core) = &self.membership else { return };
        let inc = core.incarnation();
        if self.incarnation_saved == Some(inc) {
            return;
        }
        let path = self.config.data_dir.join(INCARNATION_FILE);
        match write_atomic(&path, inc.to_string().as_bytes()) {
            Ok(()) => self.incarnation_saved = Some(inc),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot save the membership incarnation")
            }
        }
    }

    // ---- directory -------------------------------------------------------------------------

    fn publish_own(&mut self) -> Result<(), MeshError> {
        let Some(dir) = self.directory.as_mut() else {
            return Err(MeshError::NotAMember("directory"));
        };
        let mut d = self.own.clone();
        if d.addrs.is_empty() {
            d.addrs = quic_first(&self.listen)
                .iter()
                .take(cloudless_types::MAX_ADDRS)
                .map(|a| a.to_string())
                .collect();
        }
        if dir.set_own(&d)? {
            if let Err(e) = dir.persist(&self.config.data_dir) {
                warn!(error = %e, "cannot persist the directory");
            }
            self.reconcile_directory(DIRECTORY_PUSH);
        }
        Ok(())
    }

    fn reconcile_directory(&mut self, fanout: usize) {
        let (Some(dir), Some(core)) = (self.directory.as_mut(), self.membership.as_ref()) else {
            return;
        };
        let peers: Vec<PeerId> =
            core.live_peers().copied().choose_multiple(&mut rand::thread_rng(), fanout);
        let mut out = Vec::new();
        for p in peers {
            if let Some(msg) = dir.generate(p) {
                out.push((p, msg));
            }
        }
        for (p, msg) in out {
            self.send_datagram(p, Datagram::Directory(msg));
        }
    }

    fn on_directory(&mut self, peer: PeerId, bytes: &[u8]) {
        let Some(dir) = self.directory.as_mut() else {
            return;
        };
        match dir.receive(peer, bytes) {
            Ok(changed) => {
                let updates: Vec<(PeerId, Option<NodeDescriptor>)> =
                    changed.into_iter().map(|p| (p, dir.get(&p))).collect();
                let reply = dir.generate(peer);
                for (p, d) in updates {
                    if let Some(d) = &d {
                        add_addresses(&mut self.swarm, &p, &d.addrs);
                    }
                    self.emit(Event::Directory { peer: p, descriptor: d });
                }
                if let Some(msg) = reply {
                    self.send_datagram(peer, Datagram::Directory(msg));
                }
            }
            Err(e) => {
                warn!(%peer, error = %e, "directory sync refused");
                dir.reset(&peer);
            }
        }
    }

    fn persist_directory(&mut self) {
        if let Some(dir) = self.directory.as_mut()
            && dir.is_dirty()
            && let Err(e) = dir.persist(&self.config.data_dir)
        {
            warn!(error = %e, "cannot persist the directory");
        }
        self.last_persist = Instant::now();
    }

    fn housekeeping(&mut self) {
        if self.last_persist.elapsed() >= self.config.persist_interval {
            self.persist_directory();
        }
        // Still alone: the bootstrap peers may have been down when we started (a device that
        // boots before the network does). Keep knocking.
        let alone = self.membership.as_ref().is_some_and(|m| m.alive_count() <= 1)
            || (self.config.role == Role::Client && self.swarm.connected_peers().next().is_none());
        if alone && self.last_bootstrap.elapsed() >= BOOTSTRAP_RETRY {
            self.last_bootstrap = Instant::now();
            for addr in self.config.bootstrap.clone() {
                let _ = self.swarm.dial(addr);
            }
        }
        // Callers that gave up: free their slots.
        self.pending.retain(|_, p| !p.reply.is_closed());
    }

    // ---- swarm events ----------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.metrics {
            record(m, &event);
        }
        match event {
            SwarmEvent::Behaviour(b) => self.on_behaviour_event(b),
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                // A node told it is public (a relay with `Always`) vouches for its own listen
                // addresses; otherwise AutoNAT confirms external addresses.
                let circuit = address.iter().any(|p| matches!(p, Proto::P2pCircuit));
                if self.config.relay == RelayMode::Always && !circuit {
                    self.swarm.add_external_address(address.clone());
                }
                // Relay circuits included: for a node behind a NAT they are the way in.
                if !self.listen.contains(&address) {
                    self.listen.push(address.clone());
                    let _ = self.publish_own();
                }
                self.emit(Event::Listening(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen.retain(|a| *a != address);
                let _ = self.publish_own();
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if self.gate.allows(&peer_id, Protocol::Membership) {
                    self.drive(Input::Contact { peer: peer_id });
                }
                // A new connection is the cheapest moment to reconcile directories: a joiner
                // learns every member's addresses from its first peer at once.
                if self.gate.allows(&peer_id, Protocol::Directory)
                    && let Some(msg) = self.directory.as_mut().and_then(|d| d.generate(peer_id))
                {
                    self.send_datagram(peer_id, Datagram::Directory(msg));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if self.relays.remove(&peer_id) {
                    self.ensure_relays();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                debug!(?addresses, ?reason, "listener closed");
                for a in &addresses {
                    self.listen.retain(|l| l != a);
                }
                // A lost relay reservation: find another relay.
                let lost: Vec<PeerId> = addresses
                    .iter()
                    .filter(|a| a.iter().any(|p| matches!(p, Proto::P2pCircuit)))
                    .filter_map(|a| {
                        a.iter().find_map(|p| match p {
                            Proto::P2p(peer) => Some(peer),
                            _ => None,
                        })
                    })
                    .collect();
                for relay in lost {
                    self.relays.remove(&relay);
                }
                let _ = self.publish_own();
                self.ensure_relays();
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Rpc(e) => self.on_rpc_event(e),
            BehaviourEvent::Datagram(e) => self.on_datagram_event(e),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let verdict = if !self.gate.allows(&propagation_source, Protocol::Membership) {
                    gossipsub::MessageAcceptance::Reject
                } else {
                    match postcard::from_bytes::<Vec<membership::Update<PeerId>>>(&message.data) {
                        Ok(updates) if updates.len() <= membership::MAX_UPDATES_PER_MESSAGE => {
                            self.drive(Input::Broadcast { updates });
                            gossipsub::MessageAcceptance::Accept
                        }
                        Ok(_) | Err(_) => {
                            warn!(peer = %propagation_source, "malformed membership flood");
                            gossipsub::MessageAcceptance::Reject
                        }
                    }
                };
                if let Some(g) = self.swarm.behaviour_mut().gossipsub.as_mut() {
                    let _ = g.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        verdict,
                    );
                }
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != IDENTIFY_VERSION {
                    debug!(peer = %peer_id, version = %info.protocol_version, "not a cloudless peer");
                    return;
                }
                debug!(peer = %peer_id, protocols = ?info.protocols, "identified");
                let routable: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| !a.iter().any(|p| matches!(p, Proto::P2pCircuit)))
                    .collect();
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for a in &routable {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                }
                if info.protocols.iter().any(|p| p.as_ref() == RELAY_HOP)
                    && let Some(a) = routable.first()
                    && (self.relay_candidates.len() < MAX_RELAY_CANDIDATES
                        || self.relay_candidates.contains_key(&peer_id))
                {
                    self.relay_candidates.insert(peer_id, a.clone());
                    self.ensure_relays();
                }
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(r),
                step,
                ..
            }) => {
                if let Ok(ok) = &r {
                    for info in &ok.peers {
                        for a in &info.addrs {
                            self.swarm.add_peer_address(info.peer_id, a.clone());
                        }
                    }
                }
                if step.last {
                    self.lookups.remove(&id);
                    for p in self.parked.remove(&id).unwrap_or_default() {
                        if let Some(envelope) = p.retry {
                            self.send_rpc(p.peer, envelope, None, p.reply);
                        }
                    }
                }
            }
            BehaviourEvent::Kad(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == self.me || !self.gate.admits(&peer) {
                        continue;
                    }
                    self.swarm.add_peer_address(peer, addr.clone());
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            BehaviourEvent::Mdns(_) => {}
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                let r = match new {
                    autonat::NatStatus::Public(a) => Reachability::Public(a),
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                info!(reachability = ?r, "autonat");
                if !self.config.behind_nat {
                    self.reachability = r.clone();
                }
                self.ensure_relays();
                self.emit(Event::Nat(r));
            }
            BehaviourEvent::Autonat(_)
            | BehaviourEvent::Ping(_)
            | BehaviourEvent::RelayClient(_)
            | BehaviourEvent::RelayServer(_)
            | BehaviourEvent::Dcutr(_) => {}
            BehaviourEvent::Gate(never) => match never {},
            BehaviourEvent::Unroutable(unroutable::NoAddress(peer)) => {
                self.drive(Input::Unreachable { peer });
                self.look_up(peer);
            }
        }
    }

    /// Behind a NAT, keeps reservations with up to [`MAX_RELAYS`] relays so peers can reach us
    /// (and dcutr can then punch a direct connection).
    fn ensure_relays(&mut self) {
        if self.reachability != Reachability::Private {
            return;
        }
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relay_candidates
            .iter()
            .filter(|(p, _)| !self.relays.contains(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in candidates {
            if self.relays.len() >= MAX_RELAYS {
                break;
            }
            let circuit = addr.with(Proto::P2p(peer)).with(Proto::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    info!(relay = %peer, "reserving a relay slot");
                    self.relays.insert(peer);
                }
                Err(e) => debug!(%circuit, error = %e, "cannot listen through relay"),
            }
        }
    }
}

/// Relay server limits. libp2p's defaults (2 minutes, 128 KiB per circuit) suit hole-punch
/// coordination only; a community relay also carries the membership probes and RPCs of
/// devices whose NAT defeats hole punching, so circuits may last 10 minutes and carry 16 MiB
/// before they are re-established.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuit_duration: Duration::from_secs(600),
        max_circuit_bytes: 16 * 1024 * 1024,
        ..relay::Config::default()
    }
}

/// Addresses with QUIC ones first: peers dial in the order given, and QUIC is the preferred
/// transport (TCP is the fallback).
fn quic_first(addrs: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut v = addrs.to_vec();
    v.sort_by_key(|a| !a.iter().any(|p| matches!(p, Proto::QuicV1)));
    v
}

fn add_addresses(swarm: &mut Swarm<Behaviour>, peer: &PeerId, addrs: &[String]) {
    for a in addrs {
        if let Ok(addr) = a.parse::<Multiaddr>() {
            swarm.add_peer_address(*peer, addr);
        }
    }
}

fn write_atomic(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reports dials that failed because no address of the peer is known. The swarm tells only
/// behaviours about those (they fail before any connection attempt), and the membership core
/// must not take them for a dead peer.
mod unroutable {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::task::{Context, Poll, Waker};

    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;
    use libp2p::swarm::{
        ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
    };
    use libp2p::{Multiaddr, PeerId};

    /// A dial to this peer found no address.
    #[derive(Debug)]
    pub struct NoAddress(pub PeerId);

    /// Bounded: at most this many reports wait to be read.
    const MAX_QUEUED: usize = 256;

    #[derive(Default)]
    pub struct Behaviour {
        queue: VecDeque<PeerId>,
        waker: Option<Waker>,
    }

    impl NetworkBehaviour for Behaviour {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = NoAddress;

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm) {
            if let FromSwarm::DialFailure(f) = &event {
                tracing::trace!(peer = ?f.peer_id, error = %f.error, "dial failure");
            }
            if let FromSwarm::DialFailure(f) = event
                && let (Some(peer), DialError::NoAddresses) = (f.peer_id, f.error)
                && self.queue.len() < MAX_QUEUED
                && !self.queue.contains(&peer)
            {
                self.queue.push_back(peer);
                if let Some(w) = self.waker.take() {
                    w.wake();
                }
            }
        }

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            event: THandlerOutEvent<Self>,
        ) {
            let never: Infallible = event;
            match never {}
        }

        fn poll(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
            match self.queue.pop_front() {
                Some(peer) => Poll::Ready(ToSwarm::GenerateEvent(NoAddress(peer))),
                None => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }
}

fn message_kind(m: &membership::Message<PeerId>) -> String {
    match m {
        membership::Message::Ping { seq, .. } => format!("ping/{seq}"),
        membership::Message::Ack { seq, .. } => format!("ack/{seq}"),
        membership::Message::PingReq { seq, .. } => format!("pingreq/{seq}"),
        membership::Message::Nack { seq } => format!("nack/{seq}"),
        membership::Message::Join { .. } => "join".into(),
        membership::Message::Sync { .. } => "sync".into(),
    }
}
