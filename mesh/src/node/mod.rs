//! The swarm task: the one owner of the libp2p `Swarm`, and the [`Handle`] everyone else uses.
//!
//! ```text
//!   Handle (clone) ──Command (bounded)──▶ ┌──────────── swarm task ─────────────┐
//!        ▲                                │ select! { biased;                    │
//!        └──────── oneshot replies ◀──────│   commands, swarm events,            │──Event (bounded)──▶ node
//!                                         │   membership deadline, housekeeping }│
//!                                         │ Swarm<Behaviour>  Membership<PeerId> │
//!                                         │ Directory  pending RPCs  gate        │
//!                                         └──────────────────────────────────────┘
//!   inbound streams (peer, protocol) ──▶ acceptor task: gate, budgets, then read
//!        ├─ datagrams (members only) ──(bounded)──▶ swarm task
//!        └─ RPC requests ──InboundRequest──▶ Handle::serve ──answer──▶ written back
//! ```
//!
//! Wire protocols (besides libp2p's identify, ping, kad, autonat, relay and dcutr):
//!
//! * `/cloudless/datagram/2`: membership messages and directory sync messages, one frame
//!   each way per stream, at most `datagram_max_bytes` each: a ping is answered with its ack,
//!   anything else with nothing (version 1 answered every datagram with an empty frame and
//!   sent the ack as a datagram of its own);
//! * gossipsub topic `cloudless/membership/2`: membership floods, anonymous (each update in
//!   one is signed by its author; ids hash the topic and the bytes), from members only,
//!   forwarded only when every update verifies;
//! * `/cloudless/rpc/1`: typed RPC for the other crates, at most `rpc_max_bytes` each way.

mod handle;
mod inbound;
mod nat;
mod streams;
mod swarm;
mod task;
mod unroutable;
mod unvetted;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use cloudless_types::{Capacity, NodeDescriptor};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol as Proto;
use libp2p::{Multiaddr, PeerId, StreamProtocol, gossipsub};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

pub use handle::Handle;
pub use inbound::{
    HANDLER_DEADLINE, HEADER_DEADLINE, MAX_STRANGER_STREAMS, MAX_STREAMS, MAX_STREAMS_PER_MEMBER,
    MAX_STREAMS_PER_STRANGER, MEMBER_BUDGET, MIN_RATE, STRANGER_BUDGET,
};
pub use swarm::Datagram;
use swarm::build_swarm;
use task::{Task, next_incarnation};

use crate::config::{Config, Role};
use crate::directory::Directory;
use crate::gate::Gate;
use crate::membership::{self, Membership};

/// The RPC protocol.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/rpc/1");
/// The membership and directory protocol.
pub const DATAGRAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/datagram/2");
/// Our private Kademlia DHT (not the public IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cloudless/kad/1.0.0");
/// The gossipsub topic of membership floods.
pub const MEMBERSHIP_TOPIC: &str = "cloudless/membership/2";
/// Identify's protocol version string: peers with another one are not Cloudless.
pub const IDENTIFY_VERSION: &str = "/cloudless/1.0.0";

/// Commands queued from handles; a full queue makes callers wait (backpressure).
const COMMAND_QUEUE: usize = 256;
/// Events queued for the node; when full, further events are dropped and counted, and the
/// node re-reads state through the handle.
const EVENT_QUEUE: usize = 4096;

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
    /// A connection to a peer was established, and how.
    Connected {
        /// The peer.
        peer: PeerId,
        /// How the connection was made.
        link: Link,
    },
    /// A member sent news about a peer the gate does not admit: it may have enrolled since the
    /// gate was last refreshed, so refresh it now (budgeted; see `unvetted`). Its news is
    /// kept a moment and taken once the gate admits it.
    NotEnrolled {
        /// The peer.
        peer: PeerId,
    },
    /// Events were lost because the node did not read them fast enough: what it holds may be
    /// stale, so it should read the membership and the directory again. Sent before the next
    /// event that fits.
    Lagged {
        /// How many were lost since the last `Lagged`.
        dropped: u64,
    },
}

/// How a connection was made, as evidence of where a peer can be reached from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// This node dialed the peer's own address (not through a relay): the peer accepts
    /// connections there.
    Dialed,
    /// The peer dialed this node.
    Accepted,
    /// Through a relay circuit.
    Relayed,
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
    // Counted, but nowhere to read them: the transport is the same either way.
    let mut unread = prometheus_client::registry::Registry::default();
    launch(config, keypair, gate, None, &mut unread).await
}

/// As [`start_with_identity`], also recording libp2p's own metrics (connections, identify,
/// ping round trips, Kademlia, gossipsub, relay, hole punching, and the bytes each transport
/// carries, `libp2p_bandwidth_bytes_total`) into `registry`, under the `libp2p_` prefix.
pub async fn start_with_metrics(
    config: Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Mesh, MeshError> {
    let metrics = libp2p::metrics::Metrics::new(registry);
    // The bandwidth transport adds the `libp2p_` prefix itself.
    launch(config, keypair, gate, Some(metrics), registry).await
}

async fn launch(
    config: Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
    metrics: Option<libp2p::metrics::Metrics>,
    bandwidth: &mut prometheus_client::registry::Registry,
) -> Result<Mesh, MeshError> {
    config.validate()?;
    let me = keypair.public().to_peer_id();
    let member = config.role == Role::Member;
    let (mut swarm, incoming) = build_swarm(&config, keypair.clone(), gate.clone(), bandwidth)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    let (directory, membership) = if member {
        let seal = Box::new(crate::identity::KeySeal::new(keypair.clone()));
        let (mut dir, warning) = Directory::open(keypair, &config.data_dir)?;
        if config.restored {
            dir.accept_restored();
        }
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
            seal,
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
    // Inbound streams are read off the swarm task, gate first (see `inbound`).
    let services = inbound::Services::default();
    let (datagram_tx, datagrams) = mpsc::channel(inbound::DATAGRAM_QUEUE);
    let acceptor = inbound::Acceptor::new(
        gate.clone(),
        services.clone(),
        datagram_tx,
        incoming,
        config.rpc_max_bytes,
        config.datagram_max_bytes,
    );
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
        lagging: 0,
        topic: gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC),
        membership,
        incarnation_saved: None,
        directory,
        own: config.descriptor.clone(),
        listen: Vec::new(),
        services,
        datagrams,
        pending: HashMap::new(),
        parked: HashMap::new(),
        lookups: HashMap::new(),
        relays: HashSet::new(),
        relay_candidates: HashMap::new(),
        reachability: if config.behind_nat { Reachability::Private } else { Reachability::Unknown },
        last_persist: Instant::now(),
        last_bootstrap: Instant::now(),
        unvetted: unvetted::Unvetted::default(),
        conns: HashMap::new(),
        stale: HashMap::new(),
        ack_to: None,
        greetings: std::collections::BTreeSet::new(),
        metrics,
        config,
    };
    let span = tracing::info_span!("mesh", peer = %me);
    tokio::spawn(tracing::Instrument::instrument(acceptor.run(), span.clone()));
    let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
    Ok(Mesh { handle, events, task })
}
