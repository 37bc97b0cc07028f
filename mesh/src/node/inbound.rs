//! Inbound streams, gated before a byte of them is read.
//!
//! Everything a peer opens towards us on our own protocols arrives here first, on a task of its
//! own, with the peer's authenticated id. Who the peer is decides what it may send, *before*
//! the body is read: a stranger's membership datagram is never read at all, a request to a
//! service the peer may not use is refused on its name, and what a peer may keep in flight
//! (streams and bytes) depends on whether it is an enrolled member or a stranger.
//!
//! ```text
//!   /cloudless/datagram/2, /cloudless/rpc/1 ──(peer, stream)──▶ acceptor task (`streams`)
//!        gate: may this peer use the protocol at all?      no ─▶ reset, nothing read
//!        slots: the peer's share of open streams full?     yes ─▶ "busy" (rpc) or reset
//!        header: length within the limit, bytes from the budget of its kind, deadline
//!        rpc: service name ─▶ gate ─▶ body ─▶ service queue ─▶ answer written back
//!        datagram: body ─▶ decoded ─▶ swarm task (bounded queue; full: dropped)
//!                  a ping waits for its ack (≤ ACK_WAIT) and carries it back as the answer
//! ```
//!
//! A ping's ack is the answer on the ping's own stream: one stream per probe instead of two
//! (a ping and an ack each with an empty answer), which halves a probe's packets, streams and
//! timers; membership probing is most of an idle node's work.
//!
//! Outbound requests still go through libp2p's request-response (outbound only); the framing
//! is the same ([`crate::codec`]): a 4-byte big-endian length, then postcard.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::streams::Incoming;
use super::swarm::Datagram;
use super::{DATAGRAM_PROTOCOL, RPC_PROTOCOL};
use crate::gate::{Gate, Protocol};
use crate::rpc::{InboundRequest, MAX_SERVICE_NAME, RemoteError, RemoteErrorKind, Reply};

/// Registered services, shared by the swarm task (which registers them) and the acceptor.
pub(super) type Services = Arc<Mutex<HashMap<String, mpsc::Sender<InboundRequest>>>>;

/// Inbound streams open at once, all peers together: what the old request-response bound was.
pub const MAX_STREAMS: usize = 1024;
/// Inbound streams one member may keep open at once (raft appends, api calls and datagrams of
/// a busy peer fit; a misbehaving member cannot take the whole node).
pub const MAX_STREAMS_PER_MEMBER: usize = 128;
/// Inbound streams one stranger may keep open: a user's scripts and dashboard with calls in
/// parallel fit; beyond, calls are answered "busy" (a client retries them later).
pub const MAX_STREAMS_PER_STRANGER: usize = 16;
/// Largest request read (and dropped) to answer "busy" to it: signed calls are far smaller;
/// a larger one is reset unread instead.
const MAX_REFUSED_READ: usize = 64 * 1024;
/// Inbound streams all strangers together may keep open, so that members always have room.
pub const MAX_STRANGER_STREAMS: usize = 64;
/// Bytes of requests all strangers together may have in memory: a handful of 1 MiB module
/// chunks; a stranger flood waits for its turn instead of growing the node.
pub const STRANGER_BUDGET: usize = 32 * 1024 * 1024;
/// Bytes of requests and datagrams all members together may have in memory.
pub const MEMBER_BUDGET: usize = 256 * 1024 * 1024;
/// How long a peer has to send a frame's header once it opened a stream.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// The slowest rate at which a body must arrive (64 KiB/s, a bad mobile link): a 4 MiB body
/// has a minute, a peer that trickles bytes to hold memory is cut off.
pub const MIN_RATE: u64 = 64 * 1024;
/// How long a service may take to answer (the caller's own deadline is usually shorter).
pub const HANDLER_DEADLINE: Duration = Duration::from_secs(300);
/// Refusals being written at once, beyond the slots (answers of a few bytes).
const MAX_REFUSALS: usize = 64;
/// Decoded datagrams queued for the swarm task; beyond, they are dropped like lost packets.
pub(super) const DATAGRAM_QUEUE: usize = 1024;
/// How long a ping's stream waits for the swarm task's ack. The swarm task answers at once
/// (the membership core acks synchronously); the prober has given up on a direct answer long
/// before (`probe_timeout`, 200 ms at most), so a slower ack is worth nothing.
pub(super) const ACK_WAIT: Duration = Duration::from_secs(1);

/// Largest answer to a datagram: an ack carries its few fields and at most
/// `piggyback_bytes` of news (validated at most 2 KiB,
/// [`MAX_PIGGYBACK_BYTES`](crate::membership::MAX_PIGGYBACK_BYTES)), so 4 KiB always holds
/// it, and a member answering with more (or announcing more and withholding it) holds at
/// most 4 KiB of ours per datagram in flight (256: 1 MiB).
pub(super) const ANSWER_MAX: usize = 4 * 1024;

/// A datagram read from a member: who sent it, what it holds, and, for a ping, where its
/// ack goes (the ping's own stream).
pub(super) type Received = (PeerId, Datagram, Option<oneshot::Sender<Datagram>>);

/// The deadline for `bytes` more bytes, at [`MIN_RATE`] after a [`HEADER_DEADLINE`].
fn body_deadline(bytes: usize) -> Duration {
    HEADER_DEADLINE + Duration::from_secs((bytes as u64) / MIN_RATE)
}

/// Bytes reserved from a budget, given back when dropped.
struct Reserved {
    pool: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Takes `bytes` from `pool` (bytes in use) if that stays within `cap`.
fn reserve(pool: &Arc<AtomicUsize>, cap: usize, bytes: usize) -> Option<Reserved> {
    pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
        used.checked_add(bytes).filter(|n| *n <= cap)
    })
    .ok()
    .map(|_| Reserved { pool: pool.clone(), bytes })
}

/// What the stream futures share.
struct Shared {
    gate: Arc<dyn Gate>,
    services: Services,
    datagrams: mpsc::Sender<Received>,
    rpc_max: usize,
    datagram_max: usize,
    members_bytes: Arc<AtomicUsize>,
    strangers_bytes: Arc<AtomicUsize>,
}

/// How one stream ended, for the acceptor's counts.
struct Done {
    peer: PeerId,
    member: bool,
    refusal: bool,
}

/// The acceptor: owns the incoming stream queues and the in-flight stream futures.
pub(super) struct Acceptor {
    shared: Arc<Shared>,
    incoming: mpsc::Receiver<Incoming>,
    open: HashMap<PeerId, usize>,
    strangers: usize,
    refusals: usize,
    running: FuturesUnordered<BoxFuture<'static, Done>>,
}

impl Acceptor {
    /// An acceptor for the streams in `incoming`.
    pub(super) fn new(
        gate: Arc<dyn Gate>,
        services: Services,
        datagrams: mpsc::Sender<Received>,
        incoming: mpsc::Receiver<Incoming>,
        rpc_max: usize,
        datagram_max: usize,
    ) -> Self {
        Acceptor {
            shared: Arc::new(Shared {
                gate,
                services,
                datagrams,
                rpc_max,
                datagram_max,
                members_bytes: Arc::default(),
                strangers_bytes: Arc::default(),
            }),
            incoming,
            open: HashMap::new(),
            strangers: 0,
            refusals: 0,
            running: FuturesUnordered::new(),
        }
    }

    /// Runs until the swarm is gone (its stream queue closes).
    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                s = self.incoming.recv() => match s {
                    Some((peer, protocol, stream)) if protocol == RPC_PROTOCOL => {
                        self.on_rpc(peer, stream)
                    }
                    Some((peer, protocol, stream)) if protocol == DATAGRAM_PROTOCOL => {
                        self.on_datagram(peer, stream)
                    }
                    Some(_) => {}
                    None => break,
                },
                Some(done) = self.running.next(), if !self.running.is_empty() => self.finished(done),
            }
        }
        debug!("inbound streams stopped");
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.shared.gate.allows(peer, Protocol::Membership)
    }

    /// Takes a slot for `peer`, if its kind has one left.
    fn take_slot(&mut self, peer: PeerId, member: bool) -> bool {
        let open = self.open.get(&peer).copied().unwrap_or(0);
        let per_peer = if member { MAX_STREAMS_PER_MEMBER } else { MAX_STREAMS_PER_STRANGER };
        let total: usize = self.running.len().saturating_sub(self.refusals);
        if open >= per_peer
            || total >= MAX_STREAMS
            || (!member && self.strangers >= MAX_STRANGER_STREAMS)
        {
            return false;
        }
        *self.open.entry(peer).or_default() += 1;
        if !member {
            self.strangers += 1;
        }
        true
    }

    fn finished(&mut self, done: Done) {
        if done.refusal {
            self.refusals = self.refusals.saturating_sub(1);
            return;
        }
        if let Some(n) = self.open.get_mut(&done.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&done.peer);
            }
        }
        if !done.member {
            self.strangers = self.strangers.saturating_sub(1);
        }
    }

    fn on_rpc(&mut self, peer: PeerId, stream: Stream) {
        if !self.shared.gate.admits(&peer) {
            return;
        }
        let member = self.is_member(&peer);
        if !self.take_slot(peer, member) {
            debug!(%peer, member, "rpc stream refused: too many open");
            if self.refusals < MAX_REFUSALS {
                self.refusals += 1;
                self.running.push(Box::pin(async move {
                    refuse_busy(stream).await;
                    Done { peer, member, refusal: true }
                }));
            }
            return;
        }
        let shared = self.shared.clone();
        self.running.push(Box::pin(async move {
            serve_rpc(&shared, peer, member, stream).await;
            Done { peer, member, refusal: false }
        }));
    }

    fn on_datagram(&mut self, peer: PeerId, stream: Stream) {
        let gate = &self.shared.gate;
        // A stranger's datagram is not read at all: the stream is reset unread.
        if !gate.allows(&peer, Protocol::Membership) && !gate.allows(&peer, Protocol::Directory) {
            debug!(%peer, "datagram from a peer that is not a member: reset unread");
            return;
        }
        if !self.take_slot(peer, true) {
            debug!(%peer, "datagram refused: too many open");
            return;
        }
        let shared = self.shared.clone();
        self.running.push(Box::pin(async move {
            if let Err(e) = serve_datagram(&shared, peer, stream).await {
                debug!(%peer, error = %e, "datagram refused");
            }
            Done { peer, member: true, refusal: false }
        }));
    }
}

/// Answers "busy" to a small request (read and dropped, so that the caller gets to read the
/// answer); a large one is reset unread.
async fn refuse_busy(mut stream: Stream) {
    let Ok(len) = read_len(&mut stream).await else { return };
    if len > MAX_REFUSED_READ {
        return;
    }
    let mut sink = vec![0u8; len];
    if timed(HEADER_DEADLINE, "the body", stream.read_exact(&mut sink)).await.is_err() {
        return;
    }
    drop(sink);
    let busy = RemoteError::new(RemoteErrorKind::Busy, "too many requests in progress");
    write_reply(stream, &Err(busy), 1024).await;
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn timed<T>(
    deadline: Duration,
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(deadline, f).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("{what} took over {deadline:?}"))
    })?
}

async fn read_len(stream: &mut Stream) -> io::Result<usize> {
    let mut len = [0u8; 4];
    timed(HEADER_DEADLINE, "the header", stream.read_exact(&mut len)).await?;
    usize::try_from(u32::from_be_bytes(len)).map_err(|_| invalid("length does not fit".into()))
}

async fn read_body(stream: &mut Stream, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    timed(body_deadline(len), "the body", stream.read_exact(&mut body)).await?;
    Ok(body)
}

async fn serve_datagram(shared: &Shared, peer: PeerId, mut stream: Stream) -> io::Result<()> {
    let len = read_len(&mut stream).await?;
    if len > shared.datagram_max {
        return Err(invalid(format!(
            "datagram of {len} bytes exceeds the limit of {} bytes",
            shared.datagram_max
        )));
    }
    let Some(_held) = reserve(&shared.members_bytes, MEMBER_BUDGET, len.saturating_mul(2)) else {
        return Err(io::Error::other("members' byte budget exhausted"));
    };
    let body = read_body(&mut stream, len).await?;
    let datagram: Datagram =
        postcard::from_bytes(&body).map_err(|e| invalid(format!("malformed datagram: {e}")))?;
    drop(body);
    let mut later = None;
    let answer =
        if matches!(datagram, Datagram::Membership(crate::membership::Message::Ping { .. })) {
            // The ack comes back on this stream, if the swarm task takes the ping and acks it.
            let (tx, rx) = oneshot::channel();
            if shared.datagrams.try_send((peer, datagram, Some(tx))).is_err() {
                debug!(%peer, "datagram queue full: dropped");
            }
            tokio::time::timeout(ACK_WAIT, rx).await.ok().and_then(Result::ok)
        } else {
            later = Some(datagram);
            None
        };
    // The answer the sender waits for: the ack of a ping, or nothing (postcard's `None`).
    let frame = encode_answer(&answer, ANSWER_MAX)?;
    timed(HEADER_DEADLINE, "the answer", async {
        stream.write_all(&frame).await?;
        stream.close().await
    })
    .await?;
    if let Some(datagram) = later
        && shared.datagrams.try_send((peer, datagram, None)).is_err()
    {
        debug!(%peer, "datagram queue full: dropped");
    }
    Ok(())
}

/// A datagram's answer as one frame; an answer that does not fit goes as none at all.
fn encode_answer(answer: &Option<Datagram>, max: usize) -> io::Result<Vec<u8>> {
    crate::codec::frame(answer, max).or_else(|_| crate::codec::frame(&None::<Datagram>, max))
}

/// Reads one request, hands it to its service and writes the answer; every refusal is an
/// answer naming what was wrong.
async fn serve_rpc(shared: &Shared, peer: PeerId, member: bool, mut stream: Stream) {
    let reply = match read_request(shared, peer, member, &mut stream).await {
        Ok(Ok((request, rx, held))) => {
            let service = request.service.clone();
            let reply = match lookup(shared, &service) {
                None => Err(RemoteError::new(
                    RemoteErrorKind::UnknownService,
                    format!("no service named {service}"),
                )),
                Some(sender) => match sender.try_send(request) {
                    Ok(()) => match tokio::time::timeout(HANDLER_DEADLINE, rx).await {
                        Ok(Ok(reply)) => reply,
                        Ok(Err(_)) | Err(_) => Err(RemoteError::new(
                            RemoteErrorKind::Failed,
                            "the handler dropped the request",
                        )),
                    },
                    Err(mpsc::error::TrySendError::Full(_)) => Err(RemoteError::new(
                        RemoteErrorKind::Busy,
                        format!("{service} is overloaded"),
                    )),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        if let Ok(mut s) = shared.services.lock() {
                            s.remove(&service);
                        }
                        Err(RemoteError::new(
                            RemoteErrorKind::UnknownService,
                            format!("no service named {service}"),
                        ))
                    }
                },
            };
            drop(held);
            reply
        }
        Ok(Err(refusal)) => Err(refusal),
        Err(e) => {
            debug!(%peer, error = %e, "inbound rpc failed");
            return;
        }
    };
    write_reply(stream, &reply, shared.rpc_max).await;
}

fn lookup(shared: &Shared, service: &str) -> Option<mpsc::Sender<InboundRequest>> {
    shared.services.lock().ok()?.get(service).cloned()
}

type Accepted = (InboundRequest, oneshot::Receiver<Reply>, Reserved);

/// Reads a request frame: its length, the service name, the gate's verdict on them, and only
/// then (from the byte budget of the peer's kind) the body. `Ok(Err(_))` is a refusal to
/// answer; `Err(_)` a stream to drop.
async fn read_request(
    shared: &Shared,
    peer: PeerId,
    member: bool,
    stream: &mut Stream,
) -> io::Result<Result<Accepted, RemoteError>> {
    let bad = |m: String| Ok(Err(RemoteError::new(RemoteErrorKind::BadRequest, m)));
    let len = read_len(stream).await?;
    if len > shared.rpc_max {
        return bad(format!(
            "message of {len} bytes exceeds the limit of {} bytes",
            shared.rpc_max
        ));
    }
    // An envelope is the service name (postcard: a one-byte length for names up to 64
    // bytes, then the bytes) and the body.
    let mut n = [0u8; 1];
    timed(HEADER_DEADLINE, "the header", stream.read_exact(&mut n)).await?;
    let n = usize::from(n[0]);
    if n == 0 || n > MAX_SERVICE_NAME || n >= len {
        return bad("service name must be 1 to 64 bytes".into());
    }
    let mut name = vec![0u8; n];
    timed(HEADER_DEADLINE, "the header", stream.read_exact(&mut name)).await?;
    let Ok(service) = String::from_utf8(name) else {
        return bad("service name is not utf-8".into());
    };
    if !shared.gate.allows(&peer, Protocol::Rpc { service: &service }) {
        debug!(%peer, %service, "rpc refused by the gate before its body was read");
        return Ok(Err(RemoteError::new(
            RemoteErrorKind::Unauthorized,
            format!("not allowed to use {service}"),
        )));
    }
    let rest = len - 1 - n;
    let (pool, cap) = if member {
        (&shared.members_bytes, MEMBER_BUDGET)
    } else {
        (&shared.strangers_bytes, STRANGER_BUDGET)
    };
    // Twice the body: the frame and its decoded copy live together for a moment.
    let Some(held) = reserve(pool, cap, rest.saturating_mul(2)) else {
        return Ok(Err(RemoteError::new(RemoteErrorKind::Busy, "too many requests in progress")));
    };
    let raw = read_body(stream, rest).await?;
    let body: Vec<u8> = match postcard::from_bytes(&raw) {
        Ok(b) => b,
        Err(e) => return bad(format!("malformed message: {e}")),
    };
    drop(raw);
    let (tx, rx) = oneshot::channel();
    Ok(Ok((InboundRequest { peer, service, body, reply: tx }, rx, held)))
}

/// Writes `reply` as one frame (an answer too large for the limit becomes an error saying so)
/// and closes the stream.
async fn write_reply(mut stream: Stream, reply: &Reply, max: usize) {
    let frame = match crate::codec::encode(reply, max) {
        Ok(b) => b,
        Err(e) => {
            let err: Reply = Err(RemoteError::new(RemoteErrorKind::Failed, e.to_string()));
            match crate::codec::encode(&err, max) {
                Ok(b) => b,
                Err(_) => return,
            }
        }
    };
    let Ok(len) = u32::try_from(frame.len()) else { return };
    let res = timed(body_deadline(frame.len()), "the answer", async {
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(&frame).await?;
        stream.close().await
    })
    .await;
    if let Err(e) = res {
        debug!(error = %e, "rpc answer not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_one_frame_and_too_large_ones_go_as_nothing() {
        let none = encode_answer(&None, ANSWER_MAX).unwrap();
        assert_eq!(none, [0, 0, 0, 1, 0], "postcard's None in one frame");
        let small =
            Some(Datagram::Directory(crate::directory::Message::Summary { digest: [7; 32] }));
        let frame = encode_answer(&small, ANSWER_MAX).unwrap();
        let body: Option<Datagram> = postcard::from_bytes(&frame[4..]).unwrap();
        assert_eq!(frame[..4], u32::try_from(frame.len() - 4).unwrap().to_be_bytes());
        assert!(matches!(body, Some(Datagram::Directory(_))));
        let big =
            Some(Datagram::Directory(crate::directory::Message::Entries(vec![
                vec![0; ANSWER_MAX];
                1
            ])));
        assert_eq!(encode_answer(&big, ANSWER_MAX).unwrap(), none, "over the limit: nothing");
    }

    #[test]
    fn budgets_refuse_beyond_their_cap_and_return_on_drop() {
        let pool = Arc::new(AtomicUsize::new(0));
        let a = reserve(&pool, 100, 60);
        assert!(a.is_some());
        assert!(reserve(&pool, 100, 50).is_none(), "60 + 50 > 100");
        assert!(reserve(&pool, 100, usize::MAX).is_none(), "no overflow");
        drop(a);
        assert_eq!(pool.load(Ordering::Acquire), 0);
        assert!(reserve(&pool, 100, 100).is_some());
    }

    #[test]
    fn body_deadlines_grow_with_size() {
        assert_eq!(body_deadline(0), HEADER_DEADLINE);
        assert_eq!(body_deadline(4 * 1024 * 1024), HEADER_DEADLINE + Duration::from_secs(64));
    }
}
