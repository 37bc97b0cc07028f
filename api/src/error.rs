//! The one error every call can answer with: a kind that callers act on and a message for
//! people.
//!
//! ```text
//!   handler ──Err(ApiError { kind, message, redirect })──▶ wire ──▶ caller
//!        kind: retry (busy, unavailable), follow (redirect), or stop and say why
//!        cloudlessctl: exit code per kind (see `ErrorKind::exit_code`)
//! ```

use std::fmt;

use cloudless_types::NodeName;
use serde::{Deserialize, Serialize};

use crate::command::CommandError;

/// Longest message carried, in bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Most raft members named in one redirect: a raft group has at most seven voters.
pub const MAX_REDIRECT: usize = 16;

/// What kind of failure, so that a caller can tell "try elsewhere" from "stop".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request is malformed or names something impossible; retrying cannot help.
    Invalid,
    /// The caller is not known: an unenrolled node, an unknown user key, a bad signature.
    Unauthorized,
    /// The caller is known but its role does not allow this.
    Forbidden,
    /// It names something that does not exist.
    NotFound,
    /// It conflicts with the current state (used up, already there, the last admin).
    Conflict,
    /// Overloaded for now; retry shortly.
    Busy,
    /// Not possible right now (no raft leader, peers unreachable); retry later.
    Unavailable,
    /// This node cannot answer; ask one of the raft members in `redirect`.
    Redirect,
    /// Something went wrong that is nobody's input's fault.
    Internal,
}

impl ErrorKind {
    /// Every kind, in exit-code order.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Internal,
        ErrorKind::Invalid,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::Busy,
        ErrorKind::Unavailable,
        ErrorKind::Redirect,
    ];

    /// The word for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Busy => "busy",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Redirect => "redirect",
            ErrorKind::Internal => "internal",
        }
    }

    /// cloudlessctl's exit status for a failure of this kind (2 is clap's usage error; 1 is
    /// anything that is not an answer of the cluster).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => 10,
            ErrorKind::Invalid => 3,
            ErrorKind::Unauthorized => 4,
            ErrorKind::Forbidden => 5,
            ErrorKind::NotFound => 6,
            ErrorKind::Conflict => 7,
            ErrorKind::Busy => 8,
            ErrorKind::Unavailable | ErrorKind::Redirect => 9,
        }
    }

    /// Whether the same request may succeed later without any change to it.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Busy | ErrorKind::Unavailable | ErrorKind::Redirect)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal or failure, as every call answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The kind.
    pub kind: ErrorKind,
    /// What went wrong, for people (at most [`MAX_MESSAGE`] bytes).
    pub message: String,
    /// For [`ErrorKind::Redirect`]: raft members that can answer.
    pub redirect: Vec<NodeName>,
}

impl ApiError {
    /// An error of `kind`, its message cut to [`MAX_MESSAGE`] bytes.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ApiError { kind, message, redirect: Vec::new() }
    }

    /// A redirect to `members` (at most [`MAX_REDIRECT`] of them).
    pub fn redirect(members: impl IntoIterator<Item = NodeName>) -> Self {
        let redirect: Vec<NodeName> = members.into_iter().take(MAX_REDIRECT).collect();
        let message = if redirect.is_empty() {
            "this node knows no raft member to send the request to".to_string()
        } else {
            format!("this node is not a raft member; ask one of {} members", redirect.len())
        };
        ApiError { kind: ErrorKind::Redirect, message, redirect }
    }

    /// [`ErrorKind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Invalid, message)
    }

    /// [`ErrorKind::Unauthorized`].
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Unauthorized, message)
    }

    /// [`ErrorKind::Forbidden`].
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Forbidden, message)
    }

    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::NotFound, message)
    }

    /// [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Conflict, message)
    }

    /// [`ErrorKind::Busy`].
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Busy, message)
    }

    /// [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Unavailable, message)
    }

    /// [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Internal, message)
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let kind = match &e {
            CommandError::NotBootstrapped => ErrorKind::Unavailable,
            CommandError::Unauthorized { .. } => ErrorKind::Forbidden,
            CommandError::BadSignature | CommandError::TokenExpired { .. } => {
                ErrorKind::Unauthorized
            }
            CommandError::Invalid { .. } | CommandError::TooLarge { .. } => ErrorKind::Invalid,
            CommandError::NotFound { .. } => ErrorKind::NotFound,
            CommandError::AlreadyBootstrapped
            | CommandError::TokenUsed { .. }
            | CommandError::AlreadyEnrolled { .. }
            | CommandError::StaleEpoch { .. }
            | CommandError::TooMany { .. } => ErrorKind::Conflict,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<cloudless_types::InvalidInput> for ApiError {
    fn from(e: cloudless_types::InvalidInput) -> Self {
        ApiError::invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_exit_code_except_redirect() {
        let mut codes: Vec<i32> = ErrorKind::ALL.iter().map(|k| k.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len() - 1, "redirect shares unavailable's");
        assert!(ErrorKind::ALL.iter().all(|k| ![0, 1, 2].contains(&k.exit_code())));
    }

    #[test]
    fn messages_are_bounded_and_command_errors_keep_their_words() {
        let e = ApiError::invalid("é".repeat(MAX_MESSAGE));
        assert!(e.message.len() <= MAX_MESSAGE);
        let e = ApiError::from(CommandError::TokenUsed { uses: 1 });
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert_eq!(e.to_string(), "the enrollment token has been used 1 time(s), its limit");
        let e = ApiError::from(CommandError::Unauthorized {
            actor: "user 01".into(),
            command: "revoke".into(),
        });
        assert_eq!(e.kind, ErrorKind::Forbidden);
    }
}
