//! What crosses the boundary of the state machine: the news ([`Update`]), the point-to-point
//! [`Message`]s, the driver's [`Input`]s and the [`Output`]s it carries out, the [`Event`]s and
//! [`MemberView`]s it reads, and the sizes that budgets are counted in.

use std::sync::Arc;

use cloudless_types::Capacity;
use serde::{Deserialize, Serialize};

/// Bytes that every message costs on the wire beyond its encoded body (stream and frame headers
/// of QUIC/yamux, the length prefix). Used for budgets and by the simulator's byte counts.
pub const MESSAGE_OVERHEAD: usize = 40;
/// Bytes gossipsub adds to each flooded copy in anonymous mode (every update carries its own
/// author's signature, so the flood needs no author): the topic name `cloudless/membership/2`
/// with its tag and length (24) and the framing of the message and the RPC around it (~8).
pub const FLOOD_ENVELOPE: usize = 32;
/// Largest number of updates in one flood: an honest flood holds one piece of news, or a
/// member's alive notice with its capacity summary. A larger one is refused before any
/// signature in it is checked, so a member cannot make every node verify hundreds per copy.
pub const MAX_FLOOD_UPDATES: usize = 2;
/// Largest number of updates accepted in one message; anything above is ignored. A sync page
/// of `sync_chunk_bytes` holds fewer than this.
pub const MAX_UPDATES_PER_MESSAGE: usize = 4096;

/// Liveness of a member as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared dead unless it refutes in time.
    Suspect,
    /// Declared failed. Its work may be moved elsewhere.
    Dead,
    /// Announced its own departure.
    Left,
}

/// One piece of news about a member, as flooded, piggybacked and synced, signed by its
/// [author](Update::author): the member itself for its own news (alive, left, capacity), the
/// suspecting or declaring node for bad news. Whoever relays it cannot change it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update<I> {
    /// Who the news is about.
    pub id: I,
    /// The member's incarnation the news refers to.
    pub incarnation: u32,
    /// The news.
    pub kind: UpdateKind<I>,
    /// The author's signature over [`Update::claim`].
    pub signature: Signature,
}

/// Domain of the bytes a membership signature covers, so that no other signed message of a
/// node's key can pass for one of its updates.
const CLAIM_DOMAIN: &str = "cloudless-membership-1";

impl<I: Serialize> Update<I> {
    /// News about `id` signed with `seal`, which must hold the author's key (this node's).
    pub fn signed(id: I, incarnation: u32, kind: UpdateKind<I>, seal: &dyn Seal<I>) -> Self {
        let signature = seal.sign(&claim(&id, incarnation, &kind));
        Update { id, incarnation, kind, signature }
    }

    /// Who must have signed the news: the member itself for its own news, `by` for bad news.
    pub fn author(&self) -> &I {
        match &self.kind {
            UpdateKind::Suspect { by, .. } | UpdateKind::Dead { by } => by,
            UpdateKind::Alive | UpdateKind::Left | UpdateKind::Capacity { .. } => &self.id,
        }
    }

    /// The bytes the signature covers: everything but the signature, under a domain.
    pub fn claim(&self) -> Vec<u8> {
        claim(&self.id, self.incarnation, &self.kind)
    }

    /// Whether the signature is the author's.
    pub fn verify(&self, seal: &dyn Seal<I>) -> bool {
        seal.verify(self.author(), &self.claim(), &self.signature)
    }
}

fn claim<I: Serialize>(id: &I, incarnation: u32, kind: &UpdateKind<I>) -> Vec<u8> {
    // Encoding our own types into a vector cannot fail; an empty claim on failure verifies
    // against no honest signature.
    postcard::to_allocvec(&(CLAIM_DOMAIN, id, incarnation, kind)).unwrap_or_default()
}

/// An ed25519 signature: 64 bytes on the wire (no length prefix), one shared allocation in
/// memory for all copies of an update (ten thousand simulated nodes hold the same news).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature(Arc<[u8; 64]>);

impl Signature {
    /// A signature from its 64 bytes.
    pub fn new(bytes: [u8; 64]) -> Self {
        Signature(Arc::new(bytes))
    }

    /// A signature from a slice; `None` unless it holds exactly 64 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Signature::new(bytes.try_into().ok()?))
    }

    /// Its 64 bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Two fixed arrays: 64 raw bytes in postcard, with no length to check or trust.
        let (a, b) = self.0.split_at(32);
        let halves: [[u8; 32]; 2] = [
            a.try_into().map_err(serde::ser::Error::custom)?,
            b.try_into().map_err(serde::ser::Error::custom)?,
        ];
        halves.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let [a, b] = <[[u8; 32]; 2]>::deserialize(d)?;
        let mut bytes = [0; 64];
        bytes[..32].copy_from_slice(&a);
        bytes[32..].copy_from_slice(&b);
        Ok(Signature::new(bytes))
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: String = self.0[..4].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "Signature({head}…)")
    }
}

/// Signs this node's news and checks the signatures on others': an ed25519 key and PeerIds
/// in the mesh, a cheap stand-in of the same size in the simulator. Pure: no I/O.
pub trait Seal<I>: Send {
    /// Signs `claim` with this node's key.
    fn sign(&self, claim: &[u8]) -> Signature;
    /// Whether `signature` over `claim` was made with `author`'s key.
    fn verify(&self, author: &I, claim: &[u8], signature: &Signature) -> bool;
}

/// The kinds of news in an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateKind<I> {
    /// The member is alive at this incarnation.
    Alive,
    /// `by` failed to reach the member; `witnesses` nodes (including `by`) confirmed.
    Suspect {
        /// The node that suspects.
        by: I,
        /// How many nodes failed to reach the member in that probe.
        witnesses: u8,
    },
    /// `by` declared the member dead (its suspicion ran out). From anyone but this node's own
    /// timer it counts as a suspicion by `by`: only a node's own timer declares a death.
    Dead {
        /// The declaring node.
        by: I,
    },
    /// The member left voluntarily.
    Left,
    /// The member's capacity summary, ordered by `(incarnation, version)`.
    Capacity {
        /// Increases with every announcement within one incarnation.
        version: u32,
        /// The summary.
        capacity: Capacity,
    },
}

impl<I> UpdateKind<I> {
    pub(super) fn is_liveness(&self) -> bool {
        !matches!(self, UpdateKind::Capacity { .. })
    }

    /// News a member says about itself (alive, left, capacity), as opposed to bad news.
    pub(super) fn is_good_news(&self) -> bool {
        !matches!(self, UpdateKind::Suspect { .. } | UpdateKind::Dead { .. })
    }
}

/// Messages sent point to point between two members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<I> {
    /// Are you alive? Answer with [`Message::Ack`] carrying the same `seq`.
    Ping {
        /// Correlates the ack.
        seq: u32,
        /// The sender's incarnation: a ping is first-hand news that the sender is alive.
        incarnation: u32,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// Yes (or, from a helper, the target is).
    Ack {
        /// The `seq` of the ping or ping request answered.
        seq: u32,
        /// The sender's incarnation.
        incarnation: u32,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// Please ping `target` for me and forward its ack.
    PingReq {
        /// Echoed in the forwarded ack or the nack.
        seq: u32,
        /// The member to ping.
        target: I,
        /// How long to wait for the target's ack before the nack, in milliseconds: what the
        /// asker waits for a direct ack from the target (a helper keeps it within its own
        /// bounds, `probe_timeout_min..=probe_timeout`).
        within_ms: u16,
        /// Piggybacked news.
        updates: Vec<Update<I>>,
    },
    /// I could not reach the target of your ping request in time.
    Nack {
        /// The `seq` of the ping request.
        seq: u32,
    },
    /// I am here: the first message a node sends to a peer it discovered.
    Join {
        /// The sender's own alive and capacity news.
        updates: Vec<Update<I>>,
        /// Whether the sender wants the member list back.
        want_sync: bool,
        /// Which pages of it, when retrying after a loss; empty means all.
        pages: Vec<u16>,
    },
    /// A page of the member list, sent to a joiner (or, as a single page, to a member that
    /// must learn what we believe about it).
    Sync {
        /// This page's number, from 0.
        page: u16,
        /// How many pages the list has.
        pages: u16,
        /// One update per member: its liveness and its capacity.
        updates: Vec<Update<I>>,
    },
}

/// What the driver feeds the state machine.
#[derive(Clone, Debug)]
pub enum Input<I> {
    /// Time passed; call at [`Membership::next_deadline`](super::Membership::next_deadline)
    /// (calling early is harmless).
    Tick,
    /// The driver woke `late` after the deadline it was asked for: this node was not running
    /// (starved of CPU, or asleep). Stalls of [`STALL`](super::STALL) or more stretch every
    /// wait in flight by `late` (at most `suspicion_max`) and raise the local health
    /// multiplier; shorter ones change nothing. Given before the [`Input::Tick`] it delayed.
    Stalled {
        /// How late the wake-up was.
        late: std::time::Duration,
    },
    /// A point-to-point message arrived from `from` (already authenticated by the transport).
    Message {
        /// The sender.
        from: I,
        /// The message.
        message: Message<I>,
    },
    /// A flooded message arrived. Its publisher does not matter: each update carries its
    /// author's signature.
    Broadcast {
        /// Its news.
        updates: Vec<Update<I>>,
    },
    /// The transport found a peer (bootstrap, LAN discovery, a new connection).
    Contact {
        /// The peer.
        peer: I,
    },
    /// The transport has no address for `peer` yet, so messages to it cannot leave. Probes of
    /// it in flight are abandoned without suspicion: not knowing where a member is says
    /// nothing about whether it lives (the driver looks the address up meanwhile).
    Unreachable {
        /// The peer.
        peer: I,
    },
    /// This node's capacity changed.
    SetCapacity(Capacity),
    /// This node is leaving the cluster on purpose.
    Leave,
}

/// What the state machine asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output<I> {
    /// Send `message` to `to`, best effort.
    Send {
        /// Recipient.
        to: I,
        /// Message.
        message: Message<I>,
    },
    /// Flood these updates to the whole cluster.
    Broadcast(Vec<Update<I>>),
    /// Something changed in this node's view.
    Event(Event<I>),
}

/// Changes in this node's view of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Event<I> {
    /// A member's liveness changed; `previous` is `None` for a member seen for the first time.
    State {
        /// The member.
        id: I,
        /// What it was before.
        previous: Option<State>,
        /// What it is now.
        state: State,
        /// At which incarnation.
        incarnation: u32,
    },
    /// A member's capacity summary changed.
    Capacity {
        /// The member.
        id: I,
        /// Its new summary.
        capacity: Capacity,
    },
    /// A dead or departed member was forgotten after its retention time.
    Removed {
        /// The member.
        id: I,
    },
}

/// A read-only view of one member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView<I> {
    /// The member.
    pub id: I,
    /// Its liveness.
    pub state: State,
    /// Its incarnation.
    pub incarnation: u32,
    /// Its last capacity summary, if any arrived.
    pub capacity: Option<Capacity>,
}

/// Encoded size of a value in the wire format (postcard), for byte budgets.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    // Serializing into the size-counting flavor cannot fail for our types; a huge figure on
    // failure keeps budgets conservative.
    postcard::experimental::serialized_size(value).unwrap_or(usize::MAX / 4)
}
