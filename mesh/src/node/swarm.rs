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
    PeerId, Swarm, SwarmBuilder, autonat, dcutr, gossipsub, identify, mdns, noise, ping, relay,
    tcp, yamux,
};
use serde::{Deserialize, Serialize};

use super::{
    DATAGRAM_PROTOCOL, IDENTIFY_VERSION, KAD_PROTOCOL, MEMBERSHIP_TOPIC, MeshError, RPC_PROTOCOL,
    unroutable,
};
use crate::codec::Codec;
use crate::config::{Config, RelayMode, Role};
use crate::gate::{self, Gate};
use crate::membership;
use crate::rpc::{Envelope, Reply};

/// Messages of the datagram protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Datagram {
    Membership(membership::Message<PeerId>),
    Directory(Vec<u8>),
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) gate: gate::Behaviour,
    pub(super) unroutable: unroutable::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) gossipsub: Toggle<gossipsub::Behaviour>,
    pub(super) rpc: request_response::Behaviour<Codec<Envelope, Reply>>,
    pub(super) datagram: request_response::Behaviour<Codec<Datagram, ()>>,
    pub(super) autonat: autonat::Behaviour,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay_server: Toggle<relay::Behaviour>,
    pub(super) dcutr: dcutr::Behaviour,
}

pub(super) fn build_swarm(
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
