//! The protocol as two sans-IO state machines, one per side: bytes in, frames and actions out.
//!
//! `leader::LeaderSession` serves one follower connection; `follower::FollowerSession` is the
//! follower's end. Neither touches a socket, a file or a clock: the I/O shells in `engine`,
//! `leader` and `follower` feed them bytes and the current time, move payload bytes between
//! files and sockets when told to, and send whatever the sessions put in their output buffer.
//! That is what lets the tests in `session/tests.rs` run a leader against a follower in one thread.

pub mod follower;
pub mod leader;
#[cfg(test)]
mod tests;

use crate::frame::{ErrorCode, Frame, FrameError, Preamble, PREAMBLE_BYTES, PROTOCOL_VERSION};

/// Why a session ended. Every variant names its cause; `code()` is what the peer is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("frame {frame} out of order: {why}")]
    OutOfOrder { frame: &'static str, why: String },
    #[error("{0}")]
    Limit(String),
    /// A local disk operation failed (reported to the peer as IO).
    #[error("{0}")]
    Io(String),
    /// A path from the peer would escape the data dir (reported as BAD_PATH).
    #[error("{0}")]
    BadPath(String),
    /// What the peer sent will not be applied, for the reason given (reported as DECLINED).
    #[error("{0}")]
    Declined(String),
    #[error("the peer reported an error ({}): {message}", code_name(*.code))]
    Peer { code: ErrorCode, message: String },
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Frame(e) => e.code(),
            SessionError::AuthFailed(_) => ErrorCode::AuthFailed,
            SessionError::OutOfOrder { .. } => ErrorCode::BadFrame,
            SessionError::Limit(_) => ErrorCode::Limit,
            SessionError::Io(_) => ErrorCode::Io,
            SessionError::BadPath(_) => ErrorCode::BadPath,
            SessionError::Declined(_) => ErrorCode::Declined,
            SessionError::Peer { code, .. } => *code,
        }
    }

    fn out_of_order(frame: &Frame, why: impl Into<String>) -> SessionError {
        SessionError::OutOfOrder {
            frame: frame.name(),
            why: why.into(),
        }
    }
}

pub fn code_name(code: ErrorCode) -> String {
    match code {
        ErrorCode::BadMagic => "bad magic".into(),
        ErrorCode::VersionMismatch => "version mismatch".into(),
        ErrorCode::AuthFailed => "authentication failed".into(),
        ErrorCode::Limit => "limit exceeded".into(),
        ErrorCode::BadFrame => "bad frame".into(),
        ErrorCode::BadPath => "bad path".into(),
        ErrorCode::Io => "I/O error".into(),
        ErrorCode::Shutdown => "shutting down".into(),
        ErrorCode::Declined => "declined".into(),
        ErrorCode::Unknown(v) => format!("code {v}"),
    }
}

/// Checks the peer's preamble at the front of `buf`: `Ok(None)` until all 16 bytes are there.
fn take_preamble(buf: &[u8]) -> Result<Option<Preamble>, SessionError> {
    let Some(head) = buf.first_chunk::<PREAMBLE_BYTES>() else {
        return Ok(None);
    };
    let peer = Preamble::decode(head)?;
    if peer.version != PROTOCOL_VERSION {
        return Err(FrameError::VersionMismatch {
            peer: peer.version,
            ours: PROTOCOL_VERSION,
        }
        .into());
    }
    Ok(Some(peer))
}

/// Puts an ERROR frame naming `err` in `out`, unless the peer itself sent the error.
fn queue_error(out: &mut Vec<u8>, err: &SessionError) {
    if !matches!(err, SessionError::Peer { .. }) {
        Frame::error(err.code(), &err.to_string()).encode(out);
    }
}
