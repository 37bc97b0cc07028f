//! The swarm task: its `select!` loop over commands, swarm events, the membership deadline
//! and housekeeping; the commands of [`Handle`](super::Handle)s; typed RPC in and out; the
//! datagram protocol that carries membership messages and directory sync; driving the
//! membership core; and persisting the directory and the incarnation.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_types::NodeDescriptor;
use futures::StreamExt;
use libp2p::kad;
use libp2p::multiaddr::Protocol as Proto;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, autonat, gossipsub, identify, mdns};
use rand::seq::IteratorRandom;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::handle::Command;
use super::swarm::{Behaviour, BehaviourEvent, Datagram, record};
use super::{Event, IDENTIFY_VERSION, KAD_PROTOCOL, Link, MeshError, Reachability, unroutable};
use crate::config::{Config, RelayMode, Role};
use crate::directory::Directory;
use crate::gate::{Gate, Protocol};
use crate::membership::{self, Input, Membership, Output, State};
use crate::rpc::{Envelope, Reply, RpcError};

/// RPC requests parked while a DHT lookup finds the peer.
const MAX_PARKED: usize = 256;
/// Directory peers sent our own change at once, beyond periodic reconciliation.
const DIRECTORY_PUSH: usize = 3;
/// How long a leaving node keeps running so its announcement gets out.
const LEAVE_LINGER: Duration = Duration::from_millis(500);
/// How often a node that knows nobody dials its bootstrap peers again.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(5);
/// Name of the file holding the last membership incarnation.
const INCARNATION_FILE: &str = "membership.incarnation";
/// A stranger's gossipsub score: far below the graylist threshold (-80), so it is never in
/// our flood mesh and nothing it sends on gossipsub is read.
const STRANGER_SCORE: f64 = -1000.0;

/// Reads the last incarnation from the data dir and returns the next one, so a restarted node
/// outranks whatever the cluster remembers of its earlier life.
pub(super) fn next_incarnation(data_dir: &Path) -> u32 {
    std::fs::read_to_string(data_dir.join(INCARNATION_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(0, |i| i.saturating_add(1))
}

pub(super) struct PendingRpc {
    peer: PeerId,
    /// Kept for one retry after a DHT lookup, when the peer was not connected and the request
    /// is small (see [`RETRY_COPY_MAX`]).
    retry: Option<Envelope>,
    reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
}

/// Largest request kept for a retry after a DHT lookup: bounds the memory pending requests can
/// hold to `rpc_max_pending` times this. Larger requests to unreachable peers fail at once.
const RETRY_COPY_MAX: usize = 64 * 1024;

pub(super) struct Task {
    /// libp2p's metrics, when the node exports them.
    pub(super) metrics: Option<libp2p::metrics::Metrics>,
    pub(super) me: PeerId,
    pub(super) config: Config,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) gate: Arc<dyn Gate>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) dropped_events: u64,
    /// Events lost since the node last heard of a loss.
    pub(super) lagging: u64,
    pub(super) topic: gossipsub::IdentTopic,
    pub(super) membership: Option<Membership<PeerId>>,
    pub(super) incarnation_saved: Option<u32>,
    pub(super) directory: Option<Directory>,
    pub(super) own: NodeDescriptor,
    pub(super) listen: Vec<Multiaddr>,
    pub(super) services: super::inbound::Services,
    /// Datagrams the acceptor read and decoded (from members only).
    pub(super) datagrams: mpsc::Receiver<super::inbound::Received>,
    pub(super) pending: HashMap<OutboundRequestId, PendingRpc>,
    pub(super) parked: HashMap<kad::QueryId, Vec<PendingRpc>>,
    /// DHT lookups started for members we could not dial.
    pub(super) lookups: HashMap<kad::QueryId, PeerId>,
    pub(super) relays: HashSet<PeerId>,
    pub(super) relay_candidates: HashMap<PeerId, Multiaddr>,
    pub(super) reachability: Reachability,
    pub(super) last_persist: Instant,
    pub(super) last_bootstrap: Instant,
    /// News about peers the gate does not admit yet (a device that just enrolled).
    pub(super) unvetted: super::unvetted::Unvetted,
    /// Each peer's open connections, oldest first (at most [`MAX_TRACKED_CONNECTIONS`]).
    pub(super) conns: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    /// The connections members had when they were declared dead or left (a subset of
    /// `conns`): closed when the member connects again.
    pub(super) stale: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    /// While a ping read by the acceptor is handled: its sender and the ping's stream, where
    /// the ack goes.
    pub(super) ack_to: Option<(PeerId, oneshot::Sender<Datagram>)>,
    /// Members that arrived or came back, to be sent our directory summary when their time
    /// comes (see [`greeting_delay`]): at most [`MAX_GREETINGS`].
    pub(super) greetings: std::collections::BTreeSet<(Instant, PeerId)>,
}

/// The longest a greeting waits: every member greets a member that arrives or comes back,
/// and all at once that was one QUIC handshake and one directory exchange per member within
/// a few milliseconds, on a process that is starting (50 members: the newcomer missed its
/// probes and was declared dead, twice, seconds after it joined). Spread over up to this
/// long, a newcomer takes about [`GREETINGS_PER_SECOND`] a second.
const GREETING_SPREAD_MAX: Duration = Duration::from_secs(3);
/// The pace greetings are spread for, while the spread is below its maximum.
const GREETINGS_PER_SECOND: u32 = 50;
/// Greetings pending at once; past it, a member is not greeted (the periodic directory
/// exchange still reaches it).
const MAX_GREETINGS: usize = 4096;

/// How long to wait before greeting a member that arrived or came back, when `live` members
/// are live: a uniform draw (`draw` in `0.0..1.0`) within `live / GREETINGS_PER_SECOND`
/// seconds, at most [`GREETING_SPREAD_MAX`]. Every member greets the newcomer, and the
/// newcomer every member, so each end takes about that many per second.
pub(super) fn greeting_delay(live: usize, draw: f64) -> Duration {
    let live = u32::try_from(live).unwrap_or(u32::MAX);
    let spread = (Duration::from_secs(1) * live / GREETINGS_PER_SECOND).min(GREETING_SPREAD_MAX);
    spread.mul_f64(draw.clamp(0.0, 1.0))
}

/// Connections tracked per peer: more than a handful means dial races, not restarts.
const MAX_TRACKED_CONNECTIONS: usize = 8;

impl Task {
    pub(super) async fn run(mut self) {
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
            let greet_at = self.greetings.first().map_or_else(Instant::now, |(at, _)| *at);
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
                Some((peer, datagram, ack)) = self.datagrams.recv() => self.on_datagram(peer, datagram, ack),
                _ = tokio::time::sleep_until(deadline.into()), if self.membership.is_some() => {
                    // Woken late: this process was not running; what fell due meanwhile is
                    // no evidence against anyone.
                    let late = Instant::now().saturating_duration_since(deadline);
                    if late >= membership::STALL {
                        debug!(?late, "the swarm task woke late: waits in flight stretched");
                        self.drive(Input::Stalled { late });
                    }
                    self.drive(Input::Tick)
                }
                _ = tokio::time::sleep_until(greet_at.into()), if !self.greetings.is_empty() => self.greet_due(),
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

    pub(super) fn emit(&mut self, event: Event) {
        // After a loss, the node hears of it before anything else, so it knows to re-read.
        if self.lagging > 0 {
            if self.events.try_send(Event::Lagged { dropped: self.lagging }).is_err() {
                self.lagging = self.lagging.saturating_add(1);
                self.dropped_events = self.dropped_events.saturating_add(1);
                return;
            }
            self.lagging = 0;
        }
        if self.events.try_send(event).is_err() {
            self.lagging = self.lagging.saturating_add(1);
            self.dropped_events = self.dropped_events.saturating_add(1);
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
            Command::FloodPeers(r) => {
                let topic = self.topic.hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .as_ref()
                    .map(|g| g.mesh_peers(&topic).copied().collect())
                    .unwrap_or_default();
                let _ = r.send(peers);
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
            Command::DirectoryStats(r) => {
                let res = self
                    .directory
                    .as_mut()
                    .map(Directory::stats)
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
                let res = match self.services.lock() {
                    Ok(mut services) => {
                        if services.get(&service).is_some_and(|s| !s.is_closed()) {
                            Err(MeshError::Serve { service, reason: "already served".into() })
                        } else {
                            services.insert(service, sender);
                            Ok(())
                        }
                    }
                    Err(_) => Err(MeshError::Serve { service, reason: "registry poisoned".into() }),
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
                self.recheck_members();
                self.retain_members();
                self.admit_unvetted();
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
            // Outbound only: inbound streams are read by the acceptor (`inbound`).
            E::Message { message: M::Request { .. }, .. } => {}
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

    /// Calls to `peer` parked on a DHT lookup go now that it is connected (it dialled us, or
    /// another dial reached it), not when the lookup ends: in a small pool the lookup runs to
    /// its timeout, and a restarted node's first call (to a member still unreachable a moment
    /// earlier) waited five seconds for it.
    fn resume_parked(&mut self, peer: PeerId) {
        let queries: Vec<kad::QueryId> = self
            .parked
            .iter()
            .filter(|(_, calls)| calls.iter().any(|p| p.peer == peer))
            .map(|(q, _)| *q)
            .collect();
        for q in queries {
            let Some(calls) = self.parked.remove(&q) else { continue };
            let (now, later): (Vec<_>, Vec<_>) = calls.into_iter().partition(|p| p.peer == peer);
            if later.is_empty() {
                if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&q) {
                    query.finish();
                }
            } else {
                self.parked.insert(q, later);
            }
            for p in now {
                if let Some(envelope) = p.retry {
                    self.send_rpc(p.peer, envelope, None, p.reply);
                }
            }
        }
    }

    // ---- datagrams: membership and directory -----------------------------------------------

    fn send_datagram(&mut self, to: PeerId, d: Datagram) {
        if to != self.me {
            self.swarm.behaviour_mut().datagram.send_request(&to, d);
        }
    }

    fn on_datagram_event(&mut self, event: request_response::Event<Datagram, Option<Datagram>>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message { message: M::Request { .. }, .. } => {}
            // A ping's ack, on the ping's stream: taken like an ack datagram from that peer
            // (the same checks), and nothing else is taken as an answer.
            E::Message { peer, message: M::Response { response: Some(answer), .. }, .. } => {
                if matches!(answer, Datagram::Membership(membership::Message::Ack { .. })) {
                    self.on_datagram(peer, answer, None);
                } else {
                    debug!(%peer, "datagram answered with something other than an ack: dropped");
                }
            }
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "datagram not delivered");
                if matches!(error, request_response::OutboundFailure::DialFailure) {
                    self.look_up(peer);
                }
            }
            E::InboundFailure { peer, error, .. } => debug!(%peer, %error, "datagram refused"),
            E::Message { message: M::Response { response: None, .. }, .. }
            | E::ResponseSent { .. } => {}
        }
    }

    /// A datagram the acceptor read from `peer` (a member when it was read; asked again).
    /// `ack` is the ping's stream, where its ack goes instead of a datagram of its own.
    fn on_datagram(
        &mut self,
        peer: PeerId,
        datagram: Datagram,
        ack: Option<oneshot::Sender<Datagram>>,
    ) {
        match datagram {
            Datagram::Membership(message) => {
                tracing::trace!(%peer, kind = message_kind(&message), "membership recv");
                if self.gate.allows(&peer, Protocol::Membership) {
                    let mut message = message;
                    match &mut message {
                        membership::Message::Ping { updates, .. }
                        | membership::Message::Ack { updates, .. }
                        | membership::Message::PingReq { updates, .. }
                        | membership::Message::Join { updates, .. }
                        | membership::Message::Sync { updates, .. } => {
                            self.members_only(peer, updates)
                        }
                        membership::Message::Nack { .. } => {}
                    }
                    self.ack_to = ack.map(|tx| (peer, tx));
                    self.drive(Input::Message { from: peer, message });
                    // The core acks every ping it is given; should one go unacked, the
                    // stream answers nothing.
                    self.ack_to = None;
                }
            }
            Datagram::Directory(message) => {
                if self.gate.allows(&peer, Protocol::Directory) {
                    self.on_directory(peer, message);
                }
            }
        }
    }

    /// A membership flood: forwarded only when it is wholly valid. Its bytes must be exactly
    /// a short list of distinct updates (anything after it would make a copy with a new id;
    /// an honest flood holds at most an alive notice and a capacity summary), every update
    /// must carry its author's signature (a relay of forgeries is penalised), and news about
    /// non-members is not forwarded (without a penalty: the relay's view of who is enrolled
    /// may simply lag ours).
    fn on_flood(&mut self, from: PeerId, data: &[u8]) -> gossipsub::MessageAcceptance {
        let decoded = postcard::take_from_bytes::<Vec<membership::Update<PeerId>>>(data);
        let mut updates = match decoded {
            Ok((updates, rest))
                if rest.is_empty()
                    && !updates.is_empty()
                    && updates.len() <= membership::MAX_FLOOD_UPDATES
                    && !updates.iter().enumerate().any(|(i, u)| updates[..i].contains(u)) =>
            {
                updates
            }
            Ok(_) | Err(_) => {
                warn!(peer = %from, "malformed membership flood");
                return gossipsub::MessageAcceptance::Reject;
            }
        };
        // Every update, although the core checks again what would change its view: a forged
        // copy of news a node already holds changes nothing there, and unchecked here it
        // would be forwarded across the pool under a fresh id. Two updates at most.
        if !updates.iter().all(crate::identity::verify_update) {
            warn!(peer = %from, "membership flood with a forged update");
            return gossipsub::MessageAcceptance::Reject;
        }
        let before = updates.len();
        self.members_only(from, &mut updates);
        // Bad news from a member whose suspicions were refuted too often is not taken, and
        // not forwarded either.
        let blamed =
            self.membership.as_ref().is_some_and(|m| m.holds_blamed_news(&updates, Instant::now()));
        let whole = updates.len() == before && !blamed;
        self.drive(Input::Broadcast { updates });
        if whole {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Ignore
        }
    }

    /// Drops news about peers that are not enrolled, and bad news from authors that are not:
    /// the member table holds members only, so made-up ids cannot fill it (and keep real
    /// devices out once it is full), and only members may suspect. A peer's own news is kept
    /// a moment (it may have enrolled since the gate was refreshed; see `unvetted`), once its
    /// signature verified; the first forgery ends that for the rest of the input, so a member
    /// cannot make us check one signature per update it sends.
    fn members_only(&mut self, from: PeerId, updates: &mut Vec<membership::Update<PeerId>>) {
        let before = updates.len();
        let (me, gate) = (self.me, self.gate.clone());
        let member = |p: &PeerId| *p == me || gate.allows(p, Protocol::Membership);
        let (kept, dropped): (Vec<_>, Vec<_>) =
            std::mem::take(updates).into_iter().partition(|u| member(&u.id) && member(u.author()));
        *updates = kept;
        if dropped.is_empty() {
            return;
        }
        debug!(dropped = before - updates.len(), "membership news about non-members dropped");
        let now = Instant::now();
        for u in dropped {
            if !super::unvetted::Unvetted::keeps(&u) {
                continue;
            }
            if !crate::identity::verify_update(&u) {
                break;
            }
            let peer = u.id;
            if self.unvetted.keep(u, from, now) {
                self.emit(Event::NotEnrolled { peer });
            }
        }
    }

    /// Gives membership the kept news of peers the gate admits now.
    fn admit_unvetted(&mut self) {
        let (me, gate) = (self.me, self.gate.clone());
        let updates = self
            .unvetted
            .take_admitted(|p| *p == me || gate.allows(p, Protocol::Membership), Instant::now());
        if !updates.is_empty() {
            debug!(updates = updates.len(), "news about newly enrolled peers taken");
        }
        // One at a time: a forgery among them (news a member relayed is checked only now)
        // must not make the core drop the rest.
        for u in updates {
            self.drive(Input::Broadcast { updates: vec![u] });
        }
    }

    /// Gives the connected peers what their standing allows (see `classify`).
    fn recheck_members(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            self.classify(p);
        }
    }

    /// Gives a connected peer what its standing allows, at its connection and whenever the
    /// gate changed: members are AutoNAT servers, gossip with us, and are told to membership
    /// (a peer enrolled on a live connection, such as a joiner's seeds, is heard of at once,
    /// not at its next connection; a known live member costs the core a lookup); strangers
    /// are blacklisted and scored out of gossipsub (their messages are dropped before they
    /// could be marked as seen, and they are never in our mesh).
    fn classify(&mut self, peer: PeerId) {
        let member = self.gate.allows(&peer, Protocol::Membership);
        if member {
            self.drive(Input::Contact { peer });
        }
        let b = self.swarm.behaviour_mut();
        if let Some(g) = b.gossipsub.as_mut() {
            if member {
                g.remove_blacklisted_peer(&peer);
            } else {
                g.blacklist_peer(&peer);
            }
            g.set_application_score(&peer, if member { 0.0 } else { STRANGER_SCORE });
        }
        if member {
            b.autonat.add_server(peer, None);
        } else {
            b.autonat.remove_server(&peer);
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
                    let mut datagram = Datagram::Membership(message);
                    // The ack of the ping being handled goes back on the ping's stream.
                    if matches!(datagram, Datagram::Membership(membership::Message::Ack { .. }))
                        && let Some((_, tx)) = self.ack_to.take_if(|(peer, _)| *peer == to)
                    {
                        match tx.send(datagram) {
                            Ok(()) => continue,
                            Err(back) => datagram = back,
                        }
                    }
                    self.send_datagram(to, datagram)
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
                        if let Some(d) = dir.get(id) {
                            add_addresses(&mut self.swarm, id, &d.addrs);
                        }
                        // Greeted with our directory summary (it answers with what we lack,
                        // and we with what it lacks), in its turn.
                        let live = self.membership.as_ref().map_or(0, |m| m.alive_count());
                        let at = Instant::now()
                            + greeting_delay(live, rand::Rng::r#gen(&mut rand::thread_rng()));
                        if self.greetings.len() < MAX_GREETINGS {
                            self.greetings.insert((at, *id));
                        }
                    }
                }
                // Its connections now are suspect: closed once it connects again.
                State::Dead | State::Left if *id != self.me => {
                    if let Some(list) = self.conns.get(id) {
                        self.stale.insert(*id, list.clone());
                    }
                }
                // A member's answer budget outlives its departures (a Left and a return must
                // not buy it a fresh burst); it goes when the member is forgotten.
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
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if dir.set_own(&d, unix_ms)? {
            if let Err(e) = dir.persist(&self.config.data_dir) {
                warn!(error = %e, "cannot persist the directory");
            }
            // Pushed to a few peers at once; the periodic exchange carries it on from there.
            if let (Some(own), Some(core)) = (dir.own_entry(), self.membership.as_ref()) {
                let peers: Vec<PeerId> = core
                    .live_peers()
                    .copied()
                    .choose_multiple(&mut rand::thread_rng(), DIRECTORY_PUSH);
                for p in peers {
                    self.send_datagram(p, Datagram::Directory(own.clone()));
                }
            }
        }
        Ok(())
    }

    /// Sends our directory summary to the members whose greeting is due, if they are still
    /// live.
    fn greet_due(&mut self) {
        let now = Instant::now();
        while let Some((at, peer)) = self.greetings.first().copied() {
            if at > now {
                break;
            }
            self.greetings.pop_first();
            let live = self.membership.as_ref().is_some_and(|m| {
                m.member(&peer).is_some_and(|v| matches!(v.state, State::Alive | State::Suspect))
            });
            if let (true, Some(dir)) = (live, self.directory.as_mut()) {
                let summary = dir.summary();
                self.send_datagram(peer, Datagram::Directory(summary));
            }
        }
    }

    /// Starts an exchange with `fanout` random live peers: our summary, which they answer
    /// only if their directory differs.
    fn reconcile_directory(&mut self, fanout: usize) {
        let (Some(dir), Some(core)) = (self.directory.as_mut(), self.membership.as_ref()) else {
            return;
        };
        let peers: Vec<PeerId> =
            core.live_peers().copied().choose_multiple(&mut rand::thread_rng(), fanout);
        let summary = dir.summary();
        // Entries their authors' budgets held back, now that they allow.
        let gate = self.gate.clone();
        let late = dir.promote_late(|p| gate.allows(p, Protocol::Directory), Instant::now());
        let updates: Vec<(PeerId, Option<NodeDescriptor>)> =
            late.into_iter().map(|p| (p, dir.get(&p))).collect();
        for p in peers {
            self.send_datagram(p, Datagram::Directory(summary.clone()));
        }
        self.directory_changed(updates);
    }

    /// Tells the node of changed directory entries (and the swarm of their addresses).
    fn directory_changed(&mut self, updates: Vec<(PeerId, Option<NodeDescriptor>)>) {
        for (p, d) in updates {
            if let Some(d) = &d {
                add_addresses(&mut self.swarm, &p, &d.addrs);
            }
            self.emit(Event::Directory { peer: p, descriptor: d });
        }
    }

    fn on_directory(&mut self, peer: PeerId, message: crate::directory::Message) {
        let Some(dir) = self.directory.as_mut() else {
            return;
        };
        let gate = self.gate.clone();
        let is_member = move |p: &PeerId| gate.allows(p, Protocol::Directory);
        match dir.receive(peer, message, is_member, Instant::now()) {
            Ok(out) => {
                // Our entry was signed again (above an earlier run's): kept before it leaves.
                if dir.own_unsaved()
                    && let Err(e) = dir.persist(&self.config.data_dir)
                {
                    warn!(error = %e, "cannot persist the directory");
                }
                if let Some(first) = out.refused.first() {
                    // Not a warning: a member could fill the owner's disk with them.
                    debug!(%peer, refused = out.refused.len(), %first, "directory entries refused");
                }
                let updates: Vec<(PeerId, Option<NodeDescriptor>)> =
                    out.changed.into_iter().map(|p| (p, dir.get(&p))).collect();
                for r in out.replies {
                    self.send_datagram(peer, Datagram::Directory(r));
                }
                self.directory_changed(updates);
            }
            Err(e) => debug!(%peer, error = %e, "directory message refused"),
        }
    }

    /// Drops the directory entries of nodes that are no longer members.
    fn retain_members(&mut self) {
        let Some(dir) = self.directory.as_mut() else {
            return;
        };
        let gate = self.gate.clone();
        let gone = dir.retain(move |p| gate.allows(p, Protocol::Directory));
        for p in gone {
            self.emit(Event::Directory { peer: p, descriptor: None });
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
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. } => {
                // A member that was held dead connects again: a restarted process (or one
                // wrongly held dead). The connections it had when it was declared dead are
                // closed, once: a crashed process leaves QUIC connections that look open
                // until their idle timeout (30 s), and requests are spread over all of a
                // peer's connections, so half of them would go to the dead one meanwhile.
                // Connections made since (a redial, both sides dialing) are kept.
                if let Some(old) = self.stale.remove(&peer_id) {
                    for c in old {
                        self.swarm.close_connection(c);
                    }
                }
                let list = self.conns.entry(peer_id).or_default();
                if list.len() >= MAX_TRACKED_CONNECTIONS {
                    list.remove(0);
                }
                list.push(connection_id);
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.resume_parked(peer_id);
                let link = if endpoint.is_relayed() {
                    Link::Relayed
                } else if endpoint.is_dialer() {
                    Link::Dialed
                } else {
                    Link::Accepted
                };
                self.emit(Event::Connected { peer: peer_id, link });
                self.classify(peer_id);
                // A new connection is the cheapest moment to reconcile directories: a joiner
                // learns every member's addresses from its first peer at once.
                if self.gate.allows(&peer_id, Protocol::Directory)
                    && let Some(summary) = self.directory.as_mut().map(Directory::summary)
                {
                    self.send_datagram(peer_id, Datagram::Directory(summary));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id, cause, num_established, connection_id, ..
            } => {
                for map in [&mut self.conns, &mut self.stale] {
                    if let Some(list) = map.get_mut(&peer_id) {
                        list.retain(|c| *c != connection_id);
                        if list.is_empty() {
                            map.remove(&peer_id);
                        }
                    }
                }
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    // Bounds gossipsub's blacklist and AutoNAT's servers by who is connected.
                    let b = self.swarm.behaviour_mut();
                    if let Some(g) = b.gossipsub.as_mut() {
                        g.remove_blacklisted_peer(&peer_id);
                    }
                    b.autonat.remove_server(&peer_id);
                }
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
                self.drop_lost_reservations(&addresses);
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
                    self.on_flood(propagation_source, &message.data)
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
                if info.protocols.contains(&KAD_PROTOCOL)
                    && self.gate.allows(&peer_id, Protocol::Membership)
                {
                    for a in &routable {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                }
                self.consider_relay(peer_id, &info.protocols, &routable);
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
                    if self.gate.allows(&peer, Protocol::Membership) {
                        self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    }
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            BehaviourEvent::Mdns(_) => {}
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.on_nat_status(new)
            }
            BehaviourEvent::Autonat(_)
            | BehaviourEvent::Ping(_)
            | BehaviourEvent::RelayClient(_)
            | BehaviourEvent::RelayServer(_)
            | BehaviourEvent::Dcutr(_) => {}
            BehaviourEvent::Gate(never) => match never {},
            BehaviourEvent::Limits(never)
            | BehaviourEvent::Memory(never)
            | BehaviourEvent::Streams(never) => match never {},
            BehaviourEvent::Unroutable(unroutable::NoAddress(peer)) => {
                self.drive(Input::Unreachable { peer });
                self.look_up(peer);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_are_spread_with_the_pool_and_never_past_the_maximum() {
        // A small pool greets at once, nearly.
        assert_eq!(greeting_delay(5, 1.0), Duration::from_millis(100));
        assert_eq!(greeting_delay(0, 0.7), Duration::ZERO);
        // Fifty a second: 50 members within a second, 100 within two.
        assert_eq!(greeting_delay(50, 1.0), Duration::from_secs(1));
        assert_eq!(greeting_delay(100, 0.5), Duration::from_secs(1));
        // Past 150 members the spread stops growing.
        assert_eq!(greeting_delay(10_000, 1.0), GREETING_SPREAD_MAX);
        assert_eq!(greeting_delay(usize::MAX, 1.0), GREETING_SPREAD_MAX);
        // A draw out of range is clamped, never negative or past the spread.
        assert_eq!(greeting_delay(50, -3.0), Duration::ZERO);
        assert_eq!(greeting_delay(50, 7.0), Duration::from_secs(1));
    }
}
