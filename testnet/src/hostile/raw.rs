//! A raw hostile peer: a bare libp2p swarm (QUIC, the relay client and raw streams) that
//! writes whatever bytes a test wants on any protocol, holds as many connections as it likes,
//! and asks relays for reservations — what a stranger with its own code can do.
//!
//! ```text
//!   RawPeer::start(key) ──▶ task owning the Swarm ◀── commands (dial N times, listen via relay)
//!        │                        └──▶ counts: connections established now, reservation outcomes
//!        └─ Control ──open_stream(peer, protocol)──▶ raw bytes (bomb), answers read back
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, relay, yamux};
use tokio::sync::mpsc;

/// A datagram's answer when it is not a ping: one frame holding postcard's `None`.
pub const NO_ANSWER: [u8; 5] = [0, 0, 0, 1, 0];

/// Whether `answer` is one frame holding a ping's ack: what a member answers a ping it took.
pub fn is_ack(answer: &[u8]) -> bool {
    use cloudless_mesh::membership::Message;
    use cloudless_mesh::node::Datagram;
    let Some((len, body)) = answer.split_first_chunk::<4>() else { return false };
    u32::from_be_bytes(*len) as usize == body.len()
        && matches!(
            postcard::from_bytes::<Option<Datagram>>(body),
            Ok(Some(Datagram::Membership(Message::Ack { .. })))
        )
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    relay: relay::client::Behaviour,
    streams: libp2p_stream::Behaviour,
}

enum Cmd {
    Dial { peer: PeerId, addr: Multiaddr, times: usize },
    Listen(Multiaddr),
}

/// A bare libp2p peer for attacks below our protocols' framing.
pub struct RawPeer {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    cmds: mpsc::Sender<Cmd>,
    connections: Arc<AtomicUsize>,
    reservations: mpsc::Receiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

/// Frame bodies a [`RawPeer`] was sent (see [`RawPeer::take_frames`]).
#[derive(Clone, Debug, Default)]
pub struct Frames(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Frames {
    /// The bodies received so far.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.0.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// What a stream attack achieved.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Bytes written before the target cut the streams off (or all of them): what the
    /// transport took, not what the target read.
    pub written: usize,
    /// Streams the target answered, with their answers (an empty answer is none).
    pub answers: Vec<Vec<u8>>,
    /// Streams cut off without an answer.
    pub refused: usize,
}

impl RawPeer {
    /// Starts a raw peer with `key` (a fresh one for a stranger).
    pub fn start(key: Keypair) -> Result<RawPeer> {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .context("cannot build the raw peer's relay client")?
            .with_behaviour(|_, relay| Behaviour {
                relay,
                streams: libp2p_stream::Behaviour::new(),
            })
            .context("cannot build the raw peer")?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().context("bad listen address")?)
            .context("the raw peer cannot listen")?;
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().streams.new_control();
        let (cmds, mut rx) = mpsc::channel::<Cmd>(64);
        let (res_tx, reservations) = mpsc::channel(1024);
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            let mut circuits = Vec::new();
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => break,
                        Some(Cmd::Dial { peer, addr, times }) => for _ in 0..times {
                            let opts = DialOpts::peer_id(peer)
                                .addresses(vec![addr.clone()])
                                .condition(PeerCondition::Always)
                                .build();
                            let _ = swarm.dial(opts);
                        },
                        Some(Cmd::Listen(addr)) => match swarm.listen_on(addr) {
                            Ok(id) => circuits.push(id),
                            Err(e) => { let _ = res_tx.try_send(Err(e.to_string())); }
                        },
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { .. } => {
                            count.fetch_add(1, Ordering::AcqRel);
                        }
                        SwarmEvent::ConnectionClosed { .. } => {
                            count.fetch_sub(1, Ordering::AcqRel);
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Relay(
                            relay::client::Event::ReservationReqAccepted { .. },
                        )) => {
                            let _ = res_tx.try_send(Ok(()));
                        }
                        SwarmEvent::ListenerClosed { listener_id, reason, .. }
                            if circuits.contains(&listener_id) =>
                        {
                            circuits.retain(|l| *l != listener_id);
                            let why = match reason {
                                Ok(()) => "closed".to_string(),
                                Err(e) => format!("{e}: {:?}", std::error::Error::source(&e)),
                            };
                            let _ = res_tx.try_send(Err(why));
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(RawPeer { peer_id, control, cmds, connections, reservations, task })
    }

    /// Starts a raw peer with `key` and waits (up to 20 s) until it is connected to `peer`
    /// at `addr`.
    pub async fn connected(key: Keypair, peer: PeerId, addr: &Multiaddr) -> Result<RawPeer> {
        let raw = Self::start(key)?;
        raw.dial(peer, addr, 1).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while raw.connections() == 0 {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the raw peer could not connect to {peer} at {addr} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(raw)
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Connections it holds now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Dials `peer` at `addr` `times` times, each a connection of its own.
    pub async fn dial(&self, peer: PeerId, addr: &Multiaddr, times: usize) -> Result<()> {
        self.cmds
            .send(Cmd::Dial { peer, addr: addr.clone(), times })
            .await
            .context("the raw peer stopped")
    }

    /// Asks the relay at `relay` (with `/p2p/<id>`) for a reservation; the outcome arrives
    /// through [`RawPeer::reservation`].
    pub async fn reserve(&self, relay: &Multiaddr) -> Result<()> {
        self.cmds
            .send(Cmd::Listen(relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit)))
            .await
            .context("the raw peer stopped")
    }

    /// The next reservation outcome, within `timeout`.
    pub async fn reservation(&mut self, timeout: Duration) -> Option<Result<(), String>> {
        tokio::time::timeout(timeout, self.reservations.recv()).await.ok().flatten()
    }

    /// Opens `streams` streams to `peer` on `protocol` at once, and on each writes `header`
    /// and then `body_len` bytes in 64 KiB pieces, until the target cuts it off.
    pub async fn bomb(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        streams: usize,
        header: Vec<u8>,
        body_len: usize,
    ) -> Sent {
        let attacks = (0..streams).map(|_| {
            let mut control = self.control.clone();
            let (protocol, header) = (protocol.clone(), header.clone());
            async move {
                let open = control.open_stream(peer, protocol);
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), open).await else {
                    return (0, None);
                };
                let piece = vec![0x5a_u8; 64 * 1024];
                let mut sent = 0usize;
                // The answer is read while the body is written: a target that refuses a
                // request answers and stops the stream without reading the body.
                let (mut r, mut w) = futures::AsyncReadExt::split(s);
                let write = async {
                    w.write_all(&header).await?;
                    while sent < body_len {
                        let n = piece.len().min(body_len - sent);
                        w.write_all(&piece[..n]).await?;
                        sent += n;
                    }
                    w.flush().await?;
                    Ok::<_, std::io::Error>(())
                };
                let read = async {
                    let mut answer = Vec::new();
                    r.read_to_end(&mut answer).await.map(|_| answer)
                };
                // Done once the answer is read (the rest of the body may never be taken).
                let both = async {
                    tokio::pin!(write, read);
                    tokio::select! {
                        answer = &mut read => answer,
                        _ = &mut write => read.await,
                    }
                };
                let answer = match tokio::time::timeout(Duration::from_secs(60), both).await {
                    Ok(Ok(answer)) if !answer.is_empty() => Some(answer),
                    _ => None,
                };
                (sent, answer)
            }
        });
        let results = futures::future::join_all(attacks).await;
        results.into_iter().fold(Sent::default(), |mut t, (sent, answer)| {
            t.written += sent;
            match answer {
                Some(a) => t.answers.push(a),
                None => t.refused += 1,
            }
            t
        })
    }

    /// Whether `peer` accepts a stream on `protocol` from us (it is refused in protocol
    /// negotiation otherwise, before anything is read), asked within `timeout`.
    pub async fn speaks(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        timeout: Duration,
    ) -> Result<bool> {
        let mut control = self.control.clone();
        let open = control.open_stream(peer, protocol);
        match tokio::time::timeout(timeout, open).await.context("no answer in time")? {
            Ok(_) => Ok(true),
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => Ok(false),
            Err(e) => Err(anyhow::anyhow!("the stream failed: {e}")),
        }
    }

    /// Takes the streams peers open to us on `protocol`: reads one length-prefixed frame
    /// from each (at most 1 MiB), answers it with [`NO_ANSWER`] (what our datagram protocol
    /// answers anything but a ping with: a ping goes unacked) and keeps its body, in arrival
    /// order, in what is returned.
    pub fn take_frames(&self, protocol: StreamProtocol) -> Result<Frames> {
        self.take_frames_answering(protocol, NO_ANSWER.to_vec())
    }

    /// [`Self::take_frames`], answering each frame with `answer` (any bytes: an oversized
    /// length, a frame of the wrong kind).
    pub fn take_frames_answering(
        &self,
        protocol: StreamProtocol,
        answer: Vec<u8>,
    ) -> Result<Frames> {
        let mut incoming = self
            .control
            .clone()
            .accept(protocol)
            .map_err(|e| anyhow::anyhow!("cannot take streams: {e}"))?;
        let frames = Frames::default();
        let kept = frames.clone();
        tokio::spawn(async move {
            while let Some((_, mut s)) = incoming.next().await {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let len = u32::from_be_bytes(len) as usize;
                if len > 1024 * 1024 {
                    continue;
                }
                let mut body = vec![0; len];
                if s.read_exact(&mut body).await.is_ok() {
                    let _ = s.write_all(&answer).await;
                    let _ = s.close().await;
                    if let Ok(mut f) = kept.0.lock() {
                        f.push(body);
                    }
                }
            }
        });
        Ok(frames)
    }

    /// Opens one stream to `peer` on `protocol`, writes `bytes` and reads the answer to its
    /// end (what a refusal said), within `timeout`.
    pub async fn ask(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let mut control = self.control.clone();
        let talk = async {
            let mut s = control.open_stream(peer, protocol).await.map_err(std::io::Error::other)?;
            s.write_all(bytes).await?;
            s.flush().await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        tokio::time::timeout(timeout, talk)
            .await
            .context("no answer in time")?
            .context("the stream failed")
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
