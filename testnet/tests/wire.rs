//! Hostile bytes on the wire: a raw libp2p peer sends oversize and malformed frames on the
//! mesh's RPC and datagram protocols. Each is refused on its own stream; the node keeps its
//! connections, its membership and its services.

use std::io;
use std::time::Duration;

use cloudless_mesh::membership::State;
use cloudless_mesh::node::{DATAGRAM_PROTOCOL, RPC_PROTOCOL};
use cloudless_mesh::rpc::{RemoteErrorKind, Reply};
use cloudless_testnet::{Echo, Testnet, serve_echo};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, Swarm, SwarmBuilder};

/// Writes requests byte for byte, reads whatever comes back.
#[derive(Clone, Default)]
struct Raw;

impl request_response::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        if v.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no response"));
        }
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await
    }
}

fn frame(len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = len.to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[derive(NetworkBehaviour)]
struct RawPeer {
    rpc: request_response::Behaviour<Raw>,
    datagram: request_response::Behaviour<Raw>,
}

/// Sends `bytes` on the RPC (or datagram) protocol; returns the response or the failure.
async fn send_raw(
    swarm: &mut Swarm<RawPeer>,
    peer: PeerId,
    protocol: StreamProtocol,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let id = if protocol == RPC_PROTOCOL {
        swarm.behaviour_mut().rpc.send_request(&peer, bytes)
    } else {
        swarm.behaviour_mut().datagram.send_request(&peer, bytes)
    };
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        let event = tokio::select! {
            _ = &mut deadline => return Err("no outcome within 20 s".into()),
            ev = swarm.select_next_some() => ev,
        };
        let event = match event {
            SwarmEvent::Behaviour(RawPeerEvent::Rpc(e) | RawPeerEvent::Datagram(e)) => e,
            _ => continue,
        };
        match event {
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } if request_id == id => {
                return Ok(response);
            }
            request_response::Event::OutboundFailure { request_id, error, .. }
                if request_id == id =>
            {
                return Err(error.to_string());
            }
            _ => {}
        }
    }
}

/// The kind of the typed refusal in a raw RPC answer, if it is one.
fn refusal(r: &Result<Vec<u8>, String>) -> Option<RemoteErrorKind> {
    let bytes = r.as_ref().ok()?;
    let reply: Reply = postcard::from_bytes(bytes.get(4..)?).ok()?;
    reply.err().map(|e| e.kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_malformed_frames_are_refused_without_harm() {
    let net = Testnet::start(2).await.unwrap();
    net.wait_until("two converge", Duration::from_secs(60), || net.converged()).await.unwrap();
    let (a, b) = (net.handle(0).unwrap().clone(), net.handle(1).unwrap().clone());
    serve_echo(&b, "").await.unwrap();

    let cfg = request_response::Config::default().with_request_timeout(Duration::from_secs(10));
    let mut raw = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| RawPeer {
            rpc: request_response::Behaviour::with_codec(
                Raw,
                [(RPC_PROTOCOL, ProtocolSupport::Full)],
                cfg.clone(),
            ),
            datagram: request_response::Behaviour::with_codec(
                Raw,
                [(DATAGRAM_PROTOCOL, ProtocolSupport::Full)],
                cfg,
            ),
        })
        .unwrap()
        .build();
    let quic = net.addrs(1).iter().find(|a| a.to_string().contains("quic")).unwrap().clone();
    raw.dial(quic).unwrap();
    let peer = b.peer_id();

    // 1 GiB announced, nothing sent: refused on the header, with a typed answer.
    let r = send_raw(&mut raw, peer, RPC_PROTOCOL, frame(1 << 30, b"x")).await;
    assert_eq!(refusal(&r), Some(RemoteErrorKind::BadRequest), "oversize rpc: {r:?}");
    // Valid length, garbage body (a service name 255 bytes long).
    let r = send_raw(&mut raw, peer, RPC_PROTOCOL, frame(6, &[0xff; 6])).await;
    assert_eq!(refusal(&r), Some(RemoteErrorKind::BadRequest), "malformed rpc: {r:?}");
    // A frame whose body is a valid envelope length but truncated.
    let r = send_raw(&mut raw, peer, RPC_PROTOCOL, frame(100, &[1, 2, 3])).await;
    assert!(r.is_err(), "truncated rpc answered: {r:?}");
    // The same on the membership/directory protocol.
    let r = send_raw(&mut raw, peer, DATAGRAM_PROTOCOL, frame(u32::MAX, &[])).await;
    assert!(r.is_err(), "oversize datagram answered: {r:?}");
    let r = send_raw(&mut raw, peer, DATAGRAM_PROTOCOL, frame(4, &[9, 9, 9, 9])).await;
    assert!(r.is_err(), "malformed datagram answered: {r:?}");
    // A well-formed directory datagram holding garbage instead of a signed entry (postcard:
    // Directory, Entries, one entry of two bytes).
    let garbage_entry = [1, 2, 1, 2, 0x42, 0x00];
    let r = send_raw(&mut raw, peer, DATAGRAM_PROTOCOL, frame(6, &garbage_entry)).await;
    assert!(
        r.is_ok(),
        "a well-framed datagram is acknowledged even if its content is refused: {r:?}"
    );

    // The raw peer's connection survived its bad streams...
    assert!(raw.is_connected(&peer), "the connection was torn down by bad streams");
    // ...and the node serves, and is still a healthy member for everyone.
    assert_eq!(a.call::<Echo>(peer, &"fine".to_string()).await.unwrap(), "fine");
    assert!(net.all_see(&[0, 1], &[0, 1], State::Alive).await);
}
