//! The libp2p side of the node: the composed [`Behaviour`], how the swarm is built (transports,
//! protocol configs, relay limits), the datagram protocol's message type, and feeding libp2p's
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    PeerId, Swarm, SwarmBuilder, autonat, connection_limits, dcutr, gossipsub, identify, mdns,
    memory_connection_limits, noise, ping, relay, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    DATAGRAM_PROTOCOL, IDENTIFY_VERSION, KAD_PROTOCOL, MEMBERSHIP_TOPIC, MeshError, RPC_PROTOCOL,
    unroutable,
};
use crate::codec::Codec;
use crate::config::{Config, RelayMode, Role};
use crate::gate::{self, Gate};
use crate::membership;
use crate::rpc::{Envelope, Reply};

/// Messages of the datagram protocol (public for tests that speak the wire format).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Datagram {
    /// A membership message.
    Membership(membership::Message<PeerId>),
    /// A directory message (signed entries, or what the sender holds).
    Directory(crate::directory::Message),
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) memory: memory_connection_limits::Behaviour,
    pub(super) gate: gate::Behaviour,
    pub(super) streams: super::streams::Behaviour,
    pub(super) unroutable: unroutable::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: gate::MembersOnly<kad::Behaviour<MemoryStore>>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) gossipsub: Toggle<gossipsub::Behaviour>,
    pub(super) rpc: request_response::Behaviour<Codec<Envelope, Reply>>,
    /// Datagrams out; the answer is a ping's ack, or nothing.
    pub(super) datagram: request_response::Behaviour<Codec<Datagram, Option<Datagram>>>,
    pub(super) autonat: gate::MembersOnly<autonat::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay_server: Toggle<relay::Behaviour>,
    pub(super) dcutr: dcutr::Behaviour,
}

/// How often libp2p's ping checks a connection (see where it is built).
const PING_EVERY: Duration = Duration::from_secs(60);

/// Builds the swarm; also returns the queue of inbound streams (for the acceptor).
pub(super) fn build_swarm(
    config: &Config,
    keypair: Keypair,
    gate: Arc<dyn Gate>,
    bandwidth: &mut prometheus_client::registry::Registry,
) -> Result<(Swarm<Behaviour>, mpsc::Receiver<super::streams::Incoming>), MeshError> {
    let member = config.role == Role::Member;
    let me = keypair.public().to_peer_id();
    let transport = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    // Request-response carries our outbound requests only: inbound streams are read by the
    // acceptor (`inbound`), which knows who sends them before it reads a byte.
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
            let mut r = relay::Behaviour::new(me, relay_config(gate.clone()));
            if mode == RelayMode::Always {
                r.set_status(Some(relay::Status::Enable));
            }
            Some(r)
        }
    };
    // Floods are anonymous: every update in one carries its author's signature, so who
    // published or relayed it does not matter, and a flood signature would cost ~115 bytes
    // per copy for nothing. A message's id is the hash of its bytes, so a copy seen first is
    // the same message (nobody can pre-empt a member's flood with a different one of the same
    // id and have the real one dropped as a duplicate).
    let gossip = if member {
        let cfg = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .validate_messages()
            .message_id_fn(|m: &gossipsub::Message| {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(m.topic.as_str().as_bytes());
                h.update(&m.data);
                gossipsub::MessageId::from(h.finalize()[..20].to_vec())
            })
            // Two signed updates are under 400 bytes; 4 KiB leaves room for gossipsub's own
            // control messages riding in the same frame.
            .max_transmit_size(4 * 1024)
            .heartbeat_interval(Duration::from_millis(500))
            .build()
            .map_err(|e| transport(&e))?;
        let mut g = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, cfg)
            .map_err(|e| transport(&e))?;
        // Peer scores carry one thing: our standing of the peer (`STRANGER_SCORE` for a
        // stranger, 0 for a member; see `classify`). The blacklist alone drops a stranger's
        // messages, but gossipsub 0.50 neither refuses its GRAFT nor keeps it out of the mesh
        // its heartbeat builds, so a stranger got our floods and took mesh slots from members.
        // Below the graylist threshold a peer is never grafted, pruned at the next heartbeat,
        // and every message of it ignored. Nothing else is scored: devices behind one NAT
        // share an address, and a member's delivery record is not ours to judge here.
        let params = gossipsub::PeerScoreParams {
            app_specific_weight: 1.0,
            ip_colocation_factor_weight: 0.0,
            behaviour_penalty_weight: 0.0,
            slow_peer_weight: 0.0,
            // A departed stranger's score is kept a minute, not an hour: strangers come with
            // fresh ids, and each kept score is memory.
            retain_score: Duration::from_secs(60),
            ..gossipsub::PeerScoreParams::default()
        };
        g.with_peer_score(params, gossipsub::PeerScoreThresholds::default())
            .map_err(|e| transport(&e))?;
        g.subscribe(&gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC)).map_err(|e| transport(&e))?;
        Some(g)
    } else {
        None
    };
    // Members take datagrams; everyone takes RPC (the gate decides per call).
    let inbound = if member { vec![RPC_PROTOCOL, DATAGRAM_PROTOCOL] } else { vec![RPC_PROTOCOL] };
    let (streams, incoming) = super::streams::Behaviour::new(inbound);
    let yamux = || {
        let mut c = yamux::Config::default();
        c.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
        c
    };
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux)
        .map_err(|e| transport(&e))?
        .with_quic_config(|mut c| {
            c.max_connection_data = QUIC_CONNECTION_WINDOW;
            c.max_stream_data = QUIC_STREAM_WINDOW;
            c.max_concurrent_stream_limit = MAX_STREAMS_PER_CONNECTION as u32;
            c.keep_alive_interval = QUIC_KEEP_ALIVE;
            c.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            c
        })
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux)
        .map_err(|e| transport(&e))?
        .with_bandwidth_metrics(bandwidth)
        .with_behaviour(|key, relay_client| {
            // The routing table holds members only: the swarm task adds their addresses
            // itself, so a stranger cannot poison it by connecting; and only members may
            // query it (a stranger would read every member's address from it).
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
            let mut kad = kad::Behaviour::with_config(me, MemoryStore::new(me), kad_config);
            kad.set_mode(Some(if member { kad::Mode::Server } else { kad::Mode::Client }));
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), me).ok()
            } else {
                None
            };
            Behaviour {
                limits: connection_limits::Behaviour::new(connection_limits()),
                memory: memory_connection_limits::Behaviour::with_max_percentage(
                    MEMORY_CONNECTION_LIMIT,
                ),
                gate: gate::Behaviour::new(gate.clone()),
                streams,
                unroutable: unroutable::Behaviour::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                        .with_agent_version(format!("cloudless/{}", env!("CARGO_PKG_VERSION"))),
                ),
                // Members' connections are watched by the membership's probes; ping only
                // catches a dead connection nobody probes (a client's, a relay circuit), so
                // once a minute: at libp2p's 15 s, ping was a cost that grows with the pool
                // (every node holds a connection to nearly every member: 50 nodes, 3 ping
                // streams a second each way).
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY)),
                kad: gate::MembersOnly::new(kad, gate.clone()),
                mdns: Toggle::from(mdns),
                gossipsub: Toggle::from(gossip),
                rpc: request_response::Behaviour::with_codec(
                    Codec::new(rpc_max, rpc_max),
                    [(RPC_PROTOCOL, ProtocolSupport::Outbound)],
                    rr_config,
                ),
                datagram: request_response::Behaviour::with_codec(
                    Codec::new(dg_max, super::inbound::ANSWER_MAX),
                    [(DATAGRAM_PROTOCOL, ProtocolSupport::Outbound)],
                    datagram_config,
                ),
                // Only members are asked whether we are reachable (the swarm task adds them
                // as servers): a stranger's verdict would make a NATed node a relay candidate.
                // And only members may ask us: a stranger would have us dial addresses of its
                // choosing.
                autonat: gate::MembersOnly::new(
                    autonat::Behaviour::new(
                        me,
                        autonat::Config { use_connected: false, ..autonat::Config::default() },
                    ),
                    gate,
                ),
                relay_client,
                relay_server: Toggle::from(relay_server),
                dcutr: dcutr::Behaviour::new(me),
            }
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    Ok((swarm, incoming))
}

/// Feeds libp2p's metrics with one swarm event.
pub(super) fn record(m: &libp2p::metrics::Metrics, event: &SwarmEvent<BehaviourEvent>) {
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

/// Past this share of the machine's memory in use by this process, new connections are
/// refused (libp2p's `memory_connection_limits`): the node keeps the connections it has and
/// serves them rather than grow until the kernel kills it. Guests run in the process, so the
/// bar is high.
const MEMORY_CONNECTION_LIMIT: f64 = 0.8;

/// A QUIC connection with nothing to send pings its peer this often. Every member ends up
/// connected to nearly every other (each probes all of them in turn), so this is paid once per
/// member: at libp2p's 5 s, a node of a 50-member pool sent and answered about 20 pings a
/// second on connections that had nothing else to carry, more than its own probes. 15 s stays
/// well inside the UDP mappings of home routers (30 s and up) and the idle timeout below.
/// Liveness is the membership's job, not this.
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A QUIC connection that hears nothing for this long is gone (libp2p: 10 s): two keep-alives
/// missed. A crashed peer's connections look open until then; the swarm task closes them as
/// soon as the member connects again (see `ConnectionEstablished`).
const QUIC_IDLE_TIMEOUT_MS: u32 = 30_000;

/// Bytes a peer may have in flight on one QUIC connection before we read them (the
/// connection's flow-control window). What is not read yet waits here, whoever sent it: at
/// libp2p's default of 15 MB, 64 strangers writing into streams the acceptor has not taken
/// yet could hold a GB. 4 MiB still fills a 40 MB/s link at 100 ms round trips.
const QUIC_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The same for one stream (libp2p's default: 10 MB).
const QUIC_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Streams one connection may have open (QUIC and yamux): the acceptor's cap per member
/// (`inbound::MAX_PER_MEMBER`, 128) with room for our own outbound streams; yamux's default
/// of 512 streams at 256 KiB of initial window each would let one TCP connection hold
/// 128 MiB unread.
const MAX_STREAMS_PER_CONNECTION: usize = 256;
/// Connections being set up (before we know who is on the other end) at once: handshakes
/// cost CPU and memory, and a flood of them must not starve the established ones.
const MAX_PENDING_INCOMING: u32 = 32;
/// Connections one peer may hold at once: QUIC and TCP, each way, and a relayed one while a
/// direct one is punched, with room to spare.
const MAX_PER_PEER: u32 = 8;

/// libp2p's connection limits. Strangers are further capped by the gate
/// ([`gate::MAX_STRANGER_CONNECTIONS`]), members are not: a pool's size is bounded by its
/// membership.
fn connection_limits() -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
        .with_max_established_per_peer(Some(MAX_PER_PEER))
}

/// Relay server limits. libp2p's defaults (2 minutes, 128 KiB per circuit) suit hole-punch
/// coordination only; a community relay also carries the membership probes and RPCs of
/// devices whose NAT defeats hole punching, so circuits may last 10 minutes and carry 16 MiB
/// before they are re-established. Reservations and circuits are for members only: a
/// stranger can neither hold a slot nor relay through us (a circuit *to* a member is asked
/// for by its source, which must be a member too).
fn relay_config(gate: Arc<dyn Gate>) -> relay::Config {
    let reserve_gate = gate.clone();
    let mut config = relay::Config {
        max_circuit_duration: Duration::from_secs(600),
        max_circuit_bytes: 16 * 1024 * 1024,
        ..relay::Config::default()
    };
    config.reservation_rate_limiters.push(Box::new(
        move |peer: PeerId, _: &libp2p::Multiaddr, _: std::time::Instant| {
            reserve_gate.allows(&peer, gate::Protocol::Membership)
        },
    ));
    config.circuit_src_rate_limiters.push(Box::new(
        move |peer: PeerId, _: &libp2p::Multiaddr, _: std::time::Instant| {
            gate.allows(&peer, gate::Protocol::Membership)
        },
    ));
    config
}
