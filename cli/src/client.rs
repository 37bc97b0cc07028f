//! A connection to one node's `api` service, as a mesh client whose identity is the user's
//! ed25519 key, and the signed request protocol on top of it.
//!
//! ```text
//!   Client::connect(peer multiaddr, user key) ──▶ mesh client (no membership, no listening)
//!   send(UserRequest) ──▶ SignedRequest { key, session, serial, clock, request, signature }
//!        ──▶ node `api` (forwards to a raft member if it is not one) ──▶ ApiResponse
//! ```

use cloudless_types::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cloudless_consensus::api::{
    ApiRequest, ApiResponse, CHUNK, MAX_MODULE, Read, SignedRequest, UserRequest,
};
use cloudless_consensus::state::{Command, Reply};
use cloudless_mesh::{Handle, Mesh, OpenGate, RelayMode, Role};
use ed25519_dalek::SigningKey;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use sha2::{Digest, Sha256};

/// How long one request may take: a write through a forwarding node and a leader election
/// fit well inside it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The peer address is unusable.
    #[error("peer address {addr:?}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The mesh client did not start or the peer could not be reached.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The cluster refused the request.
    #[error("{0}")]
    Refused(String),
    /// The answer was not what the request calls for.
    #[error("unexpected answer from the node: {0}")]
    Unexpected(String),
}

/// A connection to one node.
pub struct Client {
    mesh: Handle,
    task: tokio::task::JoinHandle<()>,
    peer: PeerId,
    key: SigningKey,
    session: u64,
    serial: Arc<AtomicU64>,
}

/// The content hash a node stores a module under (hex SHA-256, as the runtime computes it).
pub fn module_hash(bytes: &[u8]) -> String {
    cloudless_types::hex(&Sha256::digest(bytes))
}

impl Client {
    /// Connects to `addr` (which must end in `/p2p/<peer id>`) as the holder of `key`.
    pub async fn connect(addr: &str, key: SigningKey) -> Result<Client, ClientError> {
        let bad = |reason: String| ClientError::Address { addr: addr.to_string(), reason };
        let multiaddr: Multiaddr = addr.parse().map_err(|e| bad(format!("{e}")))?;
        let peer = multiaddr
            .iter()
            .find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            })
            .ok_or_else(|| bad("it must end in /p2p/<peer id>".into()))?;
        let unreachable =
            |reason: String| ClientError::Unreachable { peer: peer.to_string(), reason };
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes())
            .map_err(|e| unreachable(e.to_string()))?;
        let config = cloudless_mesh::Config {
            role: Role::Client,
            listen: Vec::new(),
            bootstrap: vec![multiaddr],
            mdns: false,
            relay: RelayMode::Never,
            ..cloudless_mesh::Config::default()
        };
        let Mesh { handle, events, task } =
            cloudless_mesh::start_with_identity(config, keypair, Arc::new(OpenGate))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        drop(events);
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            if handle.connected_peers().await.is_ok_and(|p| p.contains(&peer)) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                task.abort();
                return Err(unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Client {
            mesh: handle,
            task,
            peer,
            key,
            session: rand::random(),
            serial: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The user's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs and sends `request`.
    pub async fn send(&self, request: UserRequest) -> Result<ApiResponse, ClientError> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let signed = SignedRequest::sign(&self.key, self.session, serial, now_ms(), request);
        let body = postcard::to_allocvec(&ApiRequest::User(signed))
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let answer = self
            .mesh
            .request(self.peer, cloudless_consensus::api::SERVICE, body, REQUEST_TIMEOUT)
            .await
            .map_err(|e| ClientError::Unreachable {
                peer: self.peer.to_string(),
                reason: e.to_string(),
            })?;
        match postcard::from_bytes(&answer) {
            Ok(ApiResponse::Refused(why)) => Err(ClientError::Refused(why)),
            Ok(a) => Ok(a),
            Err(e) => Err(ClientError::Unexpected(format!("malformed answer: {e}"))),
        }
    }

    /// Applies `command` as this user.
    pub async fn command(&self, command: Command) -> Result<Reply, ClientError> {
        match self.send(UserRequest::Command(command)).await? {
            ApiResponse::Applied(Ok(r)) => Ok(r),
            ApiResponse::Applied(Err(e)) => Err(ClientError::Refused(e.to_string())),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Makes a read.
    pub async fn read(&self, read: Read) -> Result<ApiResponse, ClientError> {
        self.send(UserRequest::Read(read)).await
    }

    /// Uploads a WASI module in chunks; returns its hash. A module the node has already is
    /// not sent again.
    pub async fn upload(&self, bytes: &[u8]) -> Result<String, ClientError> {
        if bytes.is_empty() || bytes.len() as u64 > MAX_MODULE {
            return Err(ClientError::Refused(format!(
                "a module must be 1 byte to {MAX_MODULE} bytes, not {}",
                bytes.len()
            )));
        }
        let hash = module_hash(bytes);
        let total = bytes.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + CHUNK).min(bytes.len());
            let request = UserRequest::Upload {
                hash: hash.clone(),
                total,
                offset: offset as u64,
                bytes: bytes[offset..end].to_vec(),
            };
            match self.send(request).await? {
                ApiResponse::Uploaded { received } if received >= total => return Ok(hash),
                ApiResponse::Uploaded { received } if received as usize == end => offset = end,
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.mesh.shutdown().await;
        self.task.abort();
    }
}
