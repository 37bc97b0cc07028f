//! Typed point-to-point RPC over the mesh, for the other crates.
//!
//! A service is a name and a pair of serde types ([`Rpc`]). The caller uses
//! [`Handle::call`](crate::Handle::call); the server registers with
//! [`Handle::serve`](crate::Handle::serve) and answers each [`InboundRequest`]. On the wire a
//! request is an [`Envelope`] (service name and postcard body) on the `/cloudless/rpc/1`
//! protocol, bounded by the mesh's `rpc_max_bytes`; the answer is either the response body or
//! a [`RemoteError`]. Requests time out after the caller's deadline.

use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 64;
/// Longest error message carried back to a caller, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// One RPC service: its name and its message types (defined in `cloudless-types`, so the
/// crates that define services need not depend on the mesh).
pub use cloudless_types::Rpc;

/// A request on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Which service.
    pub service: String,
    /// The postcard-encoded request.
    pub body: Vec<u8>,
}

/// An answer on the wire.
pub type Reply = Result<Vec<u8>, RemoteError>;

/// Why the remote side refused or failed a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    /// The class of failure.
    pub kind: RemoteErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

/// Classes of [`RemoteError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The gate does not let us use this service.
    Unauthorized,
    /// Nothing serves that name there.
    UnknownService,
    /// The service is overloaded; retry later.
    Busy,
    /// The request could not be decoded.
    BadRequest,
    /// The handler failed.
    Failed,
}

impl std::fmt::Display for RemoteErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteErrorKind::Unauthorized => "unauthorized",
            RemoteErrorKind::UnknownService => "unknown service",
            RemoteErrorKind::Busy => "busy",
            RemoteErrorKind::BadRequest => "bad request",
            RemoteErrorKind::Failed => "failed",
        })
    }
}

impl RemoteError {
    /// An error of `kind`, its message cut to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        RemoteError { kind, message }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The request is larger than the mesh accepts.
    #[error("request of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The request or response could not be encoded or decoded.
    #[error("cannot encode or decode {service} message: {reason}")]
    Codec {
        /// The service.
        service: String,
        /// What failed.
        reason: String,
    },
    /// The service name is empty or too long.
    #[error("service name {0:?} must be 1 to 64 bytes")]
    BadService(String),
    /// The peer could not be reached or the exchange broke.
    #[error("request to {peer} failed: {reason}")]
    Transport {
        /// The peer.
        peer: PeerId,
        /// What failed.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("request to {peer} timed out after {timeout:?}")]
    Timeout {
        /// The peer.
        peer: PeerId,
        /// The deadline.
        timeout: Duration,
    },
    /// The remote refused or failed.
    #[error("{peer} answered: {error}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// Its answer.
        error: RemoteError,
    },
    /// Too many requests of ours are in flight.
    #[error("too many requests in flight; retry later")]
    Busy,
    /// The mesh has shut down.
    #[error("the mesh has shut down")]
    Closed,
}

/// A request waiting for this node's answer.
#[derive(Debug)]
pub struct InboundRequest {
    /// Who asks (authenticated by the transport, admitted by the gate).
    pub peer: PeerId,
    /// The service.
    pub service: String,
    /// The postcard-encoded request.
    pub body: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Reply>,
}

impl InboundRequest {
    /// Decodes the body as `R`'s request.
    pub fn decode<R: Rpc>(&self) -> Result<R::Request, RemoteError> {
        postcard::from_bytes(&self.body).map_err(|e| {
            RemoteError::new(
                RemoteErrorKind::BadRequest,
                format!("malformed {} request: {e}", R::SERVICE),
            )
        })
    }

    /// Answers with `R`'s response.
    pub fn respond<R: Rpc>(self, response: &R::Response) {
        let reply = postcard::to_allocvec(response).map_err(|e| {
            RemoteError::new(RemoteErrorKind::Failed, format!("cannot encode response: {e}"))
        });
        let _ = self.reply.send(reply);
    }

    /// Answers with raw bytes.
    pub fn respond_bytes(self, body: Vec<u8>) {
        let _ = self.reply.send(Ok(body));
    }

    /// Answers with an error.
    pub fn fail(self, error: RemoteError) {
        let _ = self.reply.send(Err(error));
    }
}
