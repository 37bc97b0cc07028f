//! What crosses the boundary of the state machine: the news ([`Update`]), the point-to-point
//! [`Message`]s, the driver's [`Input`]s and the [`Output`]s it carries out, the [`Event`]s and
//! [`MemberView`]s it reads, and the sizes that budgets are counted in.

use cloudless_types::Capacity;
use serde::{Deserialize, Serialize};

/// Bytes that every message costs on the wire beyond its encoded body (stream and frame headers
/// of QUIC/yamux, the length prefix). Used for budgets and by the simulator's byte counts.
pub const MESSAGE_OVERHEAD: usize = 40;
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

/// One piece of news about a member, as flooded and piggybacked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update<I> {
    /// Who the news is about.
    pub id: I,
    /// The member's incarnation the news refers to.
    pub incarnation: u32,
    /// The news.
    pub kind: UpdateKind<I>,
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
    /// The member was declared dead.
    Dead,
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
    /// A point-to-point message arrived from `from` (already authenticated by the transport).
    Message {
        /// The sender.
        from: I,
        /// The message.
        message: Message<I>,
    },
    /// A flooded message arrived. Each update says whom it is about; `author` is who
    /// published the flood (signed by the transport), when known: a member's claims about
    /// itself (it left, it is alive at a new incarnation) count only from itself.
    Broadcast {
        /// Its news.
        updates: Vec<Update<I>>,
        /// Who published it.
        author: Option<I>,
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
