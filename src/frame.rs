//! The wire format: the preamble, every frame type, and every limit, exactly as `docs/PROTOCOL.md`
//! describes them. Pure functions over byte slices: no I/O, no state beyond one frame.
//!
//! Decoding never trusts a length before checking it against its named limit, so a peer cannot
//! make us allocate or wait for more than `MAX_FRAME_BODY_BYTES` of header. A DATA frame's payload
//! is *not* part of the decoded frame: the session hands it to the I/O shell, which moves it
//! straight from the socket into the file (and, on the leader, from the file into the socket).

use crate::paths::{PathError, RelPath, MAX_PATH_LEN_BYTES};

pub const PREAMBLE_BYTES: usize = 16;
pub const MAGIC: [u8; 8] = *b"FERRY\0\r\n";
pub const PROTOCOL_VERSION: u16 = 1;
/// Capability bit: held records (INSTANCE, HAVE_HELD; `docs/PROTOCOL.md`, *Held records*).
pub const CAPABILITY_HELD: u32 = 0x1;
/// Capability bit: with `HELD`, each file's birth in the index (INDEX_BORN), so the follower
/// hashes what the leader would refuse as held (`docs/PROTOCOL.md`, *Held records*).
pub const CAPABILITY_BIRTHS: u32 = 0x2;
/// Capability bit: the leader names its data dir's lineage (LINEAGE), and a follower holding a
/// copy of another declines (`docs/PROTOCOL.md`, *Lineage*).
pub const CAPABILITY_LINEAGE: u32 = 0x4;
/// Capability bit: with `HELD` and `BIRTHS`, the birth of each generation shipped whole or
/// created (BORN), so that a handoff's target can go on with the instance (`docs/PROTOCOL.md`,
/// *Across a handoff*).
pub const CAPABILITY_BORN: u32 = 0x8;
/// Capability bit: with `HELD`, a leader whose instance goes on from a dead leader's names it
/// (FORK_OF), and the follower reports as held what it holds under that instance up to the
/// fork (`docs/PROTOCOL.md`, *After a failover*).
pub const CAPABILITY_FORK: u32 = 0x10;
/// Capability bit: with `FORK`, a FORK_OF per link of the leader's fork chain, so that a
/// follower that missed failovers in a row still holds what it recorded before the first
/// (`docs/PROTOCOL.md`, *After failovers in a row*).
pub const CAPABILITY_FORK_CHAIN: u32 = 0x20;
/// Capability bit: the leader may move a copy the follower holds to another path (RENAME)
/// instead of shipping a renamed file again whole (`docs/PROTOCOL.md`, *Renames*).
pub const CAPABILITY_RENAME: u32 = 0x40;
/// Capability bits this build understands and offers.
pub const CAPABILITIES: u32 = CAPABILITY_HELD
    | CAPABILITY_BIRTHS
    | CAPABILITY_LINEAGE
    | CAPABILITY_BORN
    | CAPABILITY_FORK
    | CAPABILITY_FORK_CHAIN
    | CAPABILITY_RENAME;
pub const MAX_FRAME_BODY_BYTES: u32 = 8192;
pub const MAX_DATA_BYTES: u32 = 4 * 1024 * 1024;
pub const MAX_WHOLE_IN_FLIGHT: usize = 16;
pub const MAX_INVENTORY_FILES: u64 = 1_000_000;
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// The largest file Linux allows (an `off_t`, 2^63 - 1 bytes): a follower rejects a DATA ending
/// above it, or a BEGIN_WHOLE or TRUNCATE to a length above it, and a leader refuses a change
/// that says a file ends above it (`catalog::CatalogError`).
pub const MAX_FILE_BYTES: u64 = i64::MAX as u64;
/// No position goes above this (2^63 - 1): a follower rejects a MARK above it, and a leader
/// refuses a change that would take its position past it (`catalog::CatalogError`), so
/// positions never wrap and a reservation above one (`LEADER_POSITION_RESERVE`) fits in 64 bits.
pub const MAX_POSITION: u64 = i64::MAX as u64;
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
pub const DIGEST_BYTES: usize = 20;
/// A leader's instance id (INSTANCE, HAVE_HELD).
pub const INSTANCE_ID_BYTES: usize = 16;
/// A data dir's lineage id (LINEAGE).
pub const LINEAGE_ID_BYTES: usize = 16;
/// FORK_OF frames on one connection with `FORK_CHAIN` (one without), and the links a fork chain
/// keeps (`fork_chain::ForkChain`).
pub const MAX_FORK_CHAIN: usize = 8;
/// Length of the `body_len` field that opens every frame.
pub const FRAME_LEN_FIELD_BYTES: usize = 4;
/// The leader sends a MARK at least this often when it has nothing else to send.
pub const KEEPALIVE_INTERVAL_MS: u64 = 500;
/// A follower that hears nothing from its leader for this long drops the connection.
pub const LEADER_SILENCE_TIMEOUT_MS: u64 = 5000;
/// A follower whose TCP connect to its leader is not answered for this long gives up on it (a
/// host gone without a reset: its SYNs dropped, which the kernel retries for minutes).
pub const CONNECT_TIMEOUT_MS: u64 = 5000;
/// A leader drops a follower's connection whose host has left its bytes unacknowledged, or its
/// receive window shut, for this long (TCP_USER_TIMEOUT).
pub const FOLLOWER_UNACKED_TIMEOUT_MS: u64 = 30_000;
/// How long MARKs may repeat the last claim because bytes vanished from a file whose change
/// nobody reported, before the leader records the file as it is on disk itself. `ferry lead`'s
/// watcher reports such a change within milliseconds; a library user who cut a file back
/// without `replace_file` never does.
pub const VANISHED_HOLD_TIMEOUT_MS: u64 = 5000;
/// The longest node id a NODE_ID frame may carry.
pub const MAX_NODE_ID_BYTES: usize = 256;
/// A connection must send its preamble and a valid AUTH within this, or the leader closes it.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

pub type Nonce = [u8; NONCE_BYTES];
pub type Mac = [u8; MAC_BYTES];
pub type Digest = [u8; DIGEST_BYTES];
/// Drawn at random when a leader starts: its positions mean something only within it.
pub type InstanceId = [u8; INSTANCE_ID_BYTES];
/// A leader's instance that goes on from another's (FORK_OF): it shares `from`'s history up to
/// a MARK at `position` (`docs/PROTOCOL.md`, *After a failover*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    pub from: InstanceId,
    pub position: u64,
}
/// Drawn at random by the first leader of a data dir, and kept by every copy made from it.
pub type LineageId = [u8; LINEAGE_ID_BYTES];

const T_CHALLENGE: u8 = 0x01;
const T_AUTH: u8 = 0x02;
const T_WELCOME: u8 = 0x03;
const T_ERROR: u8 = 0x04;
const T_INSTANCE: u8 = 0x05;
const T_LINEAGE: u8 = 0x06;
const T_FORK_OF: u8 = 0x07;
const T_INDEX: u8 = 0x10;
const T_INDEX_END: u8 = 0x11;
const T_HAVE: u8 = 0x12;
const T_HAVE_END: u8 = 0x13;
const T_DATA: u8 = 0x20;
const T_BEGIN_WHOLE: u8 = 0x21;
const T_COMMIT_WHOLE: u8 = 0x22;
const T_TRUNCATE: u8 = 0x23;
const T_DELETE: u8 = 0x24;
const T_MARK: u8 = 0x25;
const T_ACK: u8 = 0x30;
const T_NODE_ID: u8 = 0x14;
const T_HAVE_HELD: u8 = 0x15;
const T_INDEX_BORN: u8 = 0x16;
const T_BORN: u8 = 0x26;
const T_RENAME: u8 = 0x27;

const DATA_FLAG_TEMP: u8 = 0x01;
const MARK_FLAG_SYNC_DONE: u8 = 0x01;

/// What a follower promises before it acks, from weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Durability {
    /// The frames were received.
    Received = 0,
    /// The bytes are in the follower's page cache.
    Written = 1,
    /// The bytes survive a power loss (fdatasync/fsync done).
    Synced = 2,
}

impl Durability {
    pub const ALL: [Durability; 3] = [
        Durability::Received,
        Durability::Written,
        Durability::Synced,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Durability::Received => "received",
            Durability::Written => "written",
            Durability::Synced => "synced",
        }
    }

    fn from_u8(v: u8) -> Option<Durability> {
        Durability::ALL.get(usize::from(v)).copied()
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Durability::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                format!("unknown durability {s:?}: expected received, written or synced")
            })
    }
}

/// ERROR frame codes (`docs/PROTOCOL.md`, frame 0x04).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadMagic,
    VersionMismatch,
    AuthFailed,
    Limit,
    BadFrame,
    BadPath,
    Io,
    Shutdown,
    /// The sender will not go on with what it was sent (a follower's copy that an empty index
    /// would wipe), and may connect again later.
    Declined,
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadMagic => 1,
            ErrorCode::VersionMismatch => 2,
            ErrorCode::AuthFailed => 3,
            ErrorCode::Limit => 4,
            ErrorCode::BadFrame => 5,
            ErrorCode::BadPath => 6,
            ErrorCode::Io => 7,
            ErrorCode::Shutdown => 8,
            ErrorCode::Declined => 9,
            ErrorCode::Unknown(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::BadMagic,
            2 => ErrorCode::VersionMismatch,
            3 => ErrorCode::AuthFailed,
            4 => ErrorCode::Limit,
            5 => ErrorCode::BadFrame,
            6 => ErrorCode::BadPath,
            7 => ErrorCode::Io,
            8 => ErrorCode::Shutdown,
            9 => ErrorCode::Declined,
            other => ErrorCode::Unknown(other),
        }
    }
}

/// Why bytes from a peer were rejected. Each names the cause and, for limits, the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a ferry peer (bad magic {found:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error(
        "protocol version mismatch: peer speaks version {peer}, this ferry speaks version {ours}"
    )]
    VersionMismatch { peer: u16, ours: u16 },
    #[error("frame body of {body_len} bytes exceeds MAX_FRAME_BODY_BYTES ({max})")]
    FrameTooLarge { body_len: u32, max: u32 },
    #[error("DATA payload of {data_len} bytes exceeds MAX_DATA_BYTES ({max})")]
    DataTooLarge { data_len: u32, max: u32 },
    #[error("ERROR message of {len} bytes exceeds MAX_ERROR_MESSAGE_BYTES ({max})")]
    MessageTooLong { len: usize, max: usize },
    #[error("empty frame (body_len 0)")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {frame} frame: {why}")]
    Malformed { frame: &'static str, why: String },
    #[error("bad path in {frame} frame: {source}")]
    BadPath {
        frame: &'static str,
        source: PathError,
    },
}

impl FrameError {
    /// The ERROR code a peer should be told for this rejection.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic { .. } => ErrorCode::BadMagic,
            FrameError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            FrameError::FrameTooLarge { .. }
            | FrameError::DataTooLarge { .. }
            | FrameError::MessageTooLong { .. } => ErrorCode::Limit,
            FrameError::BadPath { .. } => ErrorCode::BadPath,
            FrameError::Empty | FrameError::UnknownType(_) | FrameError::Malformed { .. } => {
                ErrorCode::BadFrame
            }
        }
    }
}

/// The capabilities in use on one connection (`Preamble::in_use`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InUse {
    pub held: bool,
    pub births: bool,
    pub lineage: bool,
    /// BORN frames: only with `HELD` and `BIRTHS`.
    pub born: bool,
    /// FORK_OF: only with `HELD`.
    pub fork: bool,
    /// A FORK_OF per link of a fork chain: only with `FORK`.
    pub fork_chain: bool,
    /// RENAME frames.
    pub rename: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub version: u16,
    pub capabilities: u32,
}

impl Preamble {
    pub fn ours() -> Preamble {
        Preamble {
            version: PROTOCOL_VERSION,
            capabilities: CAPABILITIES,
        }
    }

    /// The capabilities in use with a peer that sent this preamble, ours having offered
    /// `offered`: those both sides offer, `BIRTHS` only with `HELD`.
    pub fn in_use(&self, offered: u32) -> InUse {
        let both = self.capabilities & offered & CAPABILITIES;
        let held = both & CAPABILITY_HELD != 0;
        let births = held && both & CAPABILITY_BIRTHS != 0;
        let fork = held && both & CAPABILITY_FORK != 0;
        InUse {
            held,
            births,
            lineage: both & CAPABILITY_LINEAGE != 0,
            born: births && both & CAPABILITY_BORN != 0,
            fork,
            fork_chain: fork && both & CAPABILITY_FORK_CHAIN != 0,
            rename: both & CAPABILITY_RENAME != 0,
        }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_BYTES] {
        let mut out = [0u8; PREAMBLE_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.capabilities.to_le_bytes());
        out
    }

    /// Decodes a peer's preamble; the version is returned as is (the session decides on a mismatch).
    pub fn decode(bytes: &[u8; PREAMBLE_BYTES]) -> Result<Preamble, FrameError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[0..8]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        Ok(Preamble {
            version: u16::from_le_bytes([bytes[8], bytes[9]]),
            capabilities: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        })
    }
}

/// One frame, as decoded. A `Data` frame's payload follows it on the wire and is not included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Challenge {
        leader_nonce: Nonce,
    },
    Auth {
        follower_nonce: Nonce,
        follower_mac: Mac,
    },
    Welcome {
        leader_mac: Mac,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Instance {
        instance: InstanceId,
    },
    Lineage {
        lineage: LineageId,
    },
    /// The leader's instance goes on from `instance`, sharing its history up to a MARK at
    /// `position` (`FORK`).
    ForkOf {
        instance: InstanceId,
        position: u64,
    },
    Index {
        len_bytes: u64,
        path: RelPath,
    },
    /// INDEX with the position the file's generation was born at (`BIRTHS`).
    IndexBorn {
        len_bytes: u64,
        born_at: u64,
        path: RelPath,
    },
    IndexEnd {
        count: u64,
    },
    Have {
        len_bytes: u64,
        digest: Digest,
        path: RelPath,
    },
    HaveHeld {
        len_bytes: u64,
        position: u64,
        instance: InstanceId,
        path: RelPath,
    },
    HaveEnd {
        count: u64,
        durability: Durability,
    },
    NodeId {
        id: String,
    },
    Data {
        temp: bool,
        offset: u64,
        data_len: u32,
        path: RelPath,
    },
    BeginWhole {
        len_bytes: u64,
        path: RelPath,
    },
    CommitWhole {
        path: RelPath,
    },
    Truncate {
        len_bytes: u64,
        path: RelPath,
    },
    Delete {
        path: RelPath,
    },
    /// The follower's copy at `from` moves to `to` (`RENAME`).
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// The birth of the generation of `path` about to be shipped (`BORN`).
    Born {
        born_at: u64,
        path: RelPath,
    },
    Mark {
        position: u64,
        sync_done: bool,
    },
    Ack {
        received: u64,
        written: u64,
        synced: u64,
    },
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Challenge { .. } => "CHALLENGE",
            Frame::Auth { .. } => "AUTH",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Error { .. } => "ERROR",
            Frame::Instance { .. } => "INSTANCE",
            Frame::Lineage { .. } => "LINEAGE",
            Frame::ForkOf { .. } => "FORK_OF",
            Frame::Index { .. } => "INDEX",
            Frame::IndexBorn { .. } => "INDEX_BORN",
            Frame::IndexEnd { .. } => "INDEX_END",
            Frame::Have { .. } => "HAVE",
            Frame::HaveHeld { .. } => "HAVE_HELD",
            Frame::HaveEnd { .. } => "HAVE_END",
            Frame::NodeId { .. } => "NODE_ID",
            Frame::Data { .. } => "DATA",
            Frame::BeginWhole { .. } => "BEGIN_WHOLE",
            Frame::CommitWhole { .. } => "COMMIT_WHOLE",
            Frame::Truncate { .. } => "TRUNCATE",
            Frame::Delete { .. } => "DELETE",
            Frame::Rename { .. } => "RENAME",
            Frame::Born { .. } => "BORN",
            Frame::Mark { .. } => "MARK",
            Frame::Ack { .. } => "ACK",
        }
    }

    /// An ERROR frame whose message is cut to `MAX_ERROR_MESSAGE_BYTES` on a char boundary.
    pub fn error(code: ErrorCode, message: &str) -> Frame {
        let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Frame::Error {
            code,
            message: message[..end].to_string(),
        }
    }

    /// Appends the frame's bytes (without any DATA payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_LEN_FIELD_BYTES]);
        match self {
            Frame::Challenge { leader_nonce } => {
                out.push(T_CHALLENGE);
                out.extend_from_slice(leader_nonce);
            }
            Frame::Auth {
                follower_nonce,
                follower_mac,
            } => {
                out.push(T_AUTH);
                out.extend_from_slice(follower_nonce);
                out.extend_from_slice(follower_mac);
            }
            Frame::Welcome { leader_mac } => {
                out.push(T_WELCOME);
                out.extend_from_slice(leader_mac);
            }
            Frame::Error { code, message } => {
                out.push(T_ERROR);
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                let msg = &message.as_bytes()[..message.len().min(MAX_ERROR_MESSAGE_BYTES)];
                out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
                out.extend_from_slice(msg);
            }
            Frame::Instance { instance } => {
                out.push(T_INSTANCE);
                out.extend_from_slice(instance);
            }
            Frame::Lineage { lineage } => {
                out.push(T_LINEAGE);
                out.extend_from_slice(lineage);
            }
            Frame::ForkOf { instance, position } => {
                out.push(T_FORK_OF);
                out.extend_from_slice(instance);
                out.extend_from_slice(&position.to_le_bytes());
            }
            Frame::Index { len_bytes, path } => {
                out.push(T_INDEX);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                put_path(out, path);
            }
            Frame::IndexBorn {
                len_bytes,
                born_at,
                path,
            } => {
                out.push(T_INDEX_BORN);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                out.extend_from_slice(&born_at.to_le_bytes());
                put_path(out, path);
            }
            Frame::IndexEnd { count } => {
                out.push(T_INDEX_END);
                out.extend_from_slice(&count.to_le_bytes());
            }
            Frame::Have {
                len_bytes,
                digest,
                path,
            } => {
                out.push(T_HAVE);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                out.extend_from_slice(digest);
                put_path(out, path);
            }
            Frame::HaveHeld {
                len_bytes,
                position,
                instance,
                path,
            } => {
                out.push(T_HAVE_HELD);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                out.extend_from_slice(&position.to_le_bytes());
                out.extend_from_slice(instance);
                put_path(out, path);
            }
            Frame::HaveEnd { count, durability } => {
                out.push(T_HAVE_END);
                out.extend_from_slice(&count.to_le_bytes());
                out.push(*durability as u8);
            }
            Frame::NodeId { id } => {
                debug_assert!(!id.is_empty() && id.len() <= MAX_NODE_ID_BYTES);
                out.push(T_NODE_ID);
                out.extend_from_slice(&(id.len() as u16).to_le_bytes());
                out.extend_from_slice(id.as_bytes());
            }
            Frame::Data {
                temp,
                offset,
                data_len,
                path,
            } => {
                out.push(T_DATA);
                out.push(if *temp { DATA_FLAG_TEMP } else { 0 });
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&data_len.to_le_bytes());
                put_path(out, path);
            }
            Frame::BeginWhole { len_bytes, path } => {
                out.push(T_BEGIN_WHOLE);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                put_path(out, path);
            }
            Frame::CommitWhole { path } => {
                out.push(T_COMMIT_WHOLE);
                put_path(out, path);
            }
            Frame::Truncate { len_bytes, path } => {
                out.push(T_TRUNCATE);
                out.extend_from_slice(&len_bytes.to_le_bytes());
                put_path(out, path);
            }
            Frame::Delete { path } => {
                out.push(T_DELETE);
                put_path(out, path);
            }
            Frame::Rename { from, to } => {
                out.push(T_RENAME);
                put_path(out, from);
                put_path(out, to);
            }
            Frame::Born { born_at, path } => {
                out.push(T_BORN);
                out.extend_from_slice(&born_at.to_le_bytes());
                put_path(out, path);
            }
            Frame::Mark {
                position,
                sync_done,
            } => {
                out.push(T_MARK);
                out.extend_from_slice(&position.to_le_bytes());
                out.push(if *sync_done { MARK_FLAG_SYNC_DONE } else { 0 });
            }
            Frame::Ack {
                received,
                written,
                synced,
            } => {
                out.push(T_ACK);
                out.extend_from_slice(&received.to_le_bytes());
                out.extend_from_slice(&written.to_le_bytes());
                out.extend_from_slice(&synced.to_le_bytes());
            }
        }
        let body_len = (out.len() - start - FRAME_LEN_FIELD_BYTES) as u32;
        debug_assert!(
            body_len <= MAX_FRAME_BODY_BYTES,
            "encoded a frame over the limit"
        );
        out[start..start + FRAME_LEN_FIELD_BYTES].copy_from_slice(&body_len.to_le_bytes());
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed (never
    /// more than `FRAME_LEN_FIELD_BYTES + MAX_FRAME_BODY_BYTES`). On success, returns the frame
    /// and the number of bytes it took (a DATA payload is not consumed).
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(len_field) = buf.get(..FRAME_LEN_FIELD_BYTES) else {
            return Ok(None);
        };
        let body_len = u32::from_le_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]);
        if body_len == 0 {
            return Err(FrameError::Empty);
        }
        if body_len > MAX_FRAME_BODY_BYTES {
            return Err(FrameError::FrameTooLarge {
                body_len,
                max: MAX_FRAME_BODY_BYTES,
            });
        }
        let total = FRAME_LEN_FIELD_BYTES + body_len as usize;
        let Some(body) = buf.get(FRAME_LEN_FIELD_BYTES..total) else {
            return Ok(None);
        };
        let frame = decode_body(
            body[0],
            Reader {
                name: type_name(body[0])?,
                rest: &body[1..],
            },
        )?;
        Ok(Some((frame, total)))
    }
}

fn type_name(t: u8) -> Result<&'static str, FrameError> {
    Ok(match t {
        T_CHALLENGE => "CHALLENGE",
        T_AUTH => "AUTH",
        T_WELCOME => "WELCOME",
        T_ERROR => "ERROR",
        T_INSTANCE => "INSTANCE",
        T_LINEAGE => "LINEAGE",
        T_FORK_OF => "FORK_OF",
        T_INDEX => "INDEX",
        T_INDEX_BORN => "INDEX_BORN",
        T_INDEX_END => "INDEX_END",
        T_HAVE => "HAVE",
        T_HAVE_HELD => "HAVE_HELD",
        T_HAVE_END => "HAVE_END",
        T_NODE_ID => "NODE_ID",
        T_DATA => "DATA",
        T_BEGIN_WHOLE => "BEGIN_WHOLE",
        T_COMMIT_WHOLE => "COMMIT_WHOLE",
        T_TRUNCATE => "TRUNCATE",
        T_DELETE => "DELETE",
        T_RENAME => "RENAME",
        T_BORN => "BORN",
        T_MARK => "MARK",
        T_ACK => "ACK",
        other => return Err(FrameError::UnknownType(other)),
    })
}

fn decode_body(t: u8, mut r: Reader<'_>) -> Result<Frame, FrameError> {
    let frame = match t {
        T_CHALLENGE => Frame::Challenge {
            leader_nonce: r.array()?,
        },
        T_AUTH => Frame::Auth {
            follower_nonce: r.array()?,
            follower_mac: r.array()?,
        },
        T_WELCOME => Frame::Welcome {
            leader_mac: r.array()?,
        },
        T_ERROR => {
            let code = ErrorCode::from_u16(r.u16()?);
            let len = usize::from(r.u16()?);
            if len > MAX_ERROR_MESSAGE_BYTES {
                return Err(FrameError::MessageTooLong {
                    len,
                    max: MAX_ERROR_MESSAGE_BYTES,
                });
            }
            let message = String::from_utf8_lossy(r.bytes(len)?).into_owned();
            Frame::Error { code, message }
        }
        T_INSTANCE => Frame::Instance {
            instance: r.array()?,
        },
        T_LINEAGE => Frame::Lineage {
            lineage: r.array()?,
        },
        T_FORK_OF => Frame::ForkOf {
            instance: r.array()?,
            position: r.u64()?,
        },
        T_INDEX => Frame::Index {
            len_bytes: r.u64()?,
            path: r.path()?,
        },
        T_INDEX_BORN => Frame::IndexBorn {
            len_bytes: r.u64()?,
            born_at: r.u64()?,
            path: r.path()?,
        },
        T_INDEX_END => Frame::IndexEnd { count: r.u64()? },
        T_HAVE => Frame::Have {
            len_bytes: r.u64()?,
            digest: r.array()?,
            path: r.path()?,
        },
        T_HAVE_HELD => Frame::HaveHeld {
            len_bytes: r.u64()?,
            position: r.u64()?,
            instance: r.array()?,
            path: r.path()?,
        },
        T_HAVE_END => {
            let count = r.u64()?;
            let level = r.u8()?;
            let durability = Durability::from_u8(level)
                .ok_or_else(|| r.malformed(format!("unknown durability level {level}")))?;
            Frame::HaveEnd { count, durability }
        }
        T_NODE_ID => {
            let len = usize::from(r.u16()?);
            if len == 0 || len > MAX_NODE_ID_BYTES {
                return Err(r.malformed(format!(
                    "node id of {len} bytes is outside 1..=MAX_NODE_ID_BYTES ({MAX_NODE_ID_BYTES})"
                )));
            }
            let id = std::str::from_utf8(r.bytes(len)?)
                .map_err(|_| r.malformed("node id is not UTF-8".into()))?
                .to_string();
            Frame::NodeId { id }
        }
        T_DATA => {
            let flags = r.u8()?;
            if flags & !DATA_FLAG_TEMP != 0 {
                return Err(r.malformed(format!("unknown flags 0x{flags:02x}")));
            }
            let offset = r.u64()?;
            let data_len = r.u32()?;
            if data_len > MAX_DATA_BYTES {
                return Err(FrameError::DataTooLarge {
                    data_len,
                    max: MAX_DATA_BYTES,
                });
            }
            if offset.checked_add(u64::from(data_len)).is_none() {
                return Err(r.malformed(format!("offset {offset} + {data_len} overflows")));
            }
            Frame::Data {
                temp: flags & DATA_FLAG_TEMP != 0,
                offset,
                data_len,
                path: r.path()?,
            }
        }
        T_BEGIN_WHOLE => Frame::BeginWhole {
            len_bytes: r.u64()?,
            path: r.path()?,
        },
        T_COMMIT_WHOLE => Frame::CommitWhole { path: r.path()? },
        T_TRUNCATE => Frame::Truncate {
            len_bytes: r.u64()?,
            path: r.path()?,
        },
        T_DELETE => Frame::Delete { path: r.path()? },
        T_RENAME => Frame::Rename {
            from: r.path()?,
            to: r.path()?,
        },
        T_BORN => Frame::Born {
            born_at: r.u64()?,
            path: r.path()?,
        },
        T_MARK => {
            let position = r.u64()?;
            let flags = r.u8()?;
            if flags & !MARK_FLAG_SYNC_DONE != 0 {
                return Err(r.malformed(format!("unknown flags 0x{flags:02x}")));
            }
            Frame::Mark {
                position,
                sync_done: flags & MARK_FLAG_SYNC_DONE != 0,
            }
        }
        T_ACK => Frame::Ack {
            received: r.u64()?,
            written: r.u64()?,
            synced: r.u64()?,
        },
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(frame)
}

fn put_path(out: &mut Vec<u8>, path: &RelPath) {
    let bytes = path.as_str().as_bytes();
    debug_assert!(bytes.len() <= MAX_PATH_LEN_BYTES);
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over one frame's fields that turns every short read into a named `Malformed` error.
struct Reader<'a> {
    name: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn malformed(&self, why: String) -> FrameError {
        FrameError::Malformed {
            frame: self.name,
            why,
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(self.malformed(format!(
                "needs {n} more bytes, only {} left in the frame",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn path(&mut self) -> Result<RelPath, FrameError> {
        let len = usize::from(self.u16()?);
        if len > MAX_PATH_LEN_BYTES {
            return Err(self.malformed(format!(
                "path of {len} bytes exceeds MAX_PATH_LEN_BYTES ({MAX_PATH_LEN_BYTES})"
            )));
        }
        let raw = self.bytes(len)?;
        RelPath::from_bytes(raw).map_err(|source| FrameError::BadPath {
            frame: self.name,
            source,
        })
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} unexpected trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn error_codes_have_the_numbers_of_the_spec() {
        use ErrorCode::*;
        let spec = [
            (BadMagic, 1),
            (VersionMismatch, 2),
            (AuthFailed, 3),
            (Limit, 4),
            (BadFrame, 5),
            (BadPath, 6),
            (Io, 7),
            (Shutdown, 8),
            (Declined, 9),
        ];
        for (code, number) in spec {
            assert_eq!(code.to_u16(), number, "{code:?}");
            assert_eq!(ErrorCode::from_u16(number), code);
        }
        assert_eq!(ErrorCode::from_u16(10), Unknown(10));
    }

    fn roundtrip(f: &Frame) -> Frame {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let (g, used) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        g
    }

    #[test]
    fn data_header_layout_matches_the_spec() {
        let mut buf = Vec::new();
        Frame::Data {
            temp: true,
            offset: 0x0102,
            data_len: 7,
            path: path("ab"),
        }
        .encode(&mut buf);
        assert_eq!(
            buf,
            [
                18, 0, 0, 0, // body_len = 16 + path_len
                0x20, 0x01, // type, flags TEMP
                0x02, 0x01, 0, 0, 0, 0, 0, 0, // offset
                7, 0, 0, 0, // data_len
                2, 0, b'a', b'b'
            ]
        );
    }

    #[test]
    fn rename_layout_and_its_capability_bit_match_the_spec() {
        let mut buf = Vec::new();
        Frame::Rename {
            from: path("a/x"),
            to: path("b"),
        }
        .encode(&mut buf);
        assert_eq!(
            buf,
            [
                9, 0, 0, 0,    // body_len = 5 + from_len + to_len
                0x27, // type
                3, 0, b'a', b'/', b'x', // from
                1, 0, b'b', // to
            ]
        );
        let rename = Preamble {
            version: 1,
            capabilities: CAPABILITY_RENAME,
        };
        assert_eq!(
            &rename.encode()[12..16],
            &[0x40, 0, 0, 0],
            "RENAME is bit 6"
        );
        assert!(rename.in_use(CAPABILITIES).rename);
        assert!(!rename.in_use(CAPABILITIES & !CAPABILITY_RENAME).rename);
    }

    #[test]
    fn fork_of_and_its_capability_bit_match_the_spec() {
        let fork = Preamble {
            version: 1,
            capabilities: CAPABILITY_FORK,
        };
        assert_eq!(&fork.encode()[12..16], &[0x10, 0, 0, 0], "FORK is bit 4");
        let chain = Preamble {
            version: 1,
            capabilities: CAPABILITY_FORK_CHAIN,
        };
        assert_eq!(
            &chain.encode()[12..16],
            &[0x20, 0, 0, 0],
            "FORK_CHAIN is bit 5"
        );
        let offering = |capabilities| Preamble {
            version: 1,
            capabilities,
        };
        assert!(offering(CAPABILITIES).in_use(CAPABILITIES).fork_chain);
        for without in [CAPABILITY_HELD, CAPABILITY_FORK, CAPABILITY_FORK_CHAIN] {
            let theirs = offering(CAPABILITIES & !without);
            assert!(
                !theirs.in_use(CAPABILITIES).fork_chain,
                "without {without:#x}"
            );
        }
        let mut buf = Vec::new();
        Frame::ForkOf {
            instance: [7; 16],
            position: 0x0102,
        }
        .encode(&mut buf);
        let mut want = vec![25, 0, 0, 0, 0x07];
        want.extend_from_slice(&[7; 16]);
        want.extend_from_slice(&[0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(buf, want);
        let (decoded, used) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(
            decoded,
            Frame::ForkOf {
                instance: [7; 16],
                position: 0x0102
            }
        );
    }

    #[test]
    fn held_frames_and_the_capability_bit_match_the_spec() {
        let held = Preamble {
            version: 1,
            capabilities: CAPABILITY_HELD,
        };
        assert_eq!(&held.encode()[12..16], &[1, 0, 0, 0], "HELD is bit 0");
        let mut buf = Vec::new();
        Frame::Instance { instance: [7; 16] }.encode(&mut buf);
        let mut want = vec![17, 0, 0, 0, 0x05];
        want.extend_from_slice(&[7; 16]);
        assert_eq!(buf, want);

        buf.clear();
        Frame::HaveHeld {
            len_bytes: 0x0102,
            position: 0x0304,
            instance: [9; 16],
            path: path("ab"),
        }
        .encode(&mut buf);
        let mut want = vec![
            37, 0, 0, 0,    // body_len = 35 + path_len
            0x15, // type
            0x02, 0x01, 0, 0, 0, 0, 0, 0, // len_bytes
            0x04, 0x03, 0, 0, 0, 0, 0, 0, // position
        ];
        want.extend_from_slice(&[9; 16]);
        want.extend_from_slice(&[2, 0, b'a', b'b']);
        assert_eq!(buf, want);
    }

    #[test]
    fn lineage_and_its_capability_bit_match_the_spec() {
        let lineage = Preamble {
            version: 1,
            capabilities: CAPABILITY_LINEAGE,
        };
        assert_eq!(&lineage.encode()[12..16], &[4, 0, 0, 0], "LINEAGE is bit 2");
        let mut buf = Vec::new();
        Frame::Lineage { lineage: [5; 16] }.encode(&mut buf);
        let mut want = vec![17, 0, 0, 0, 0x06];
        want.extend_from_slice(&[5; 16]);
        assert_eq!(buf, want);
        assert_eq!(
            Frame::decode(&buf).unwrap(),
            Some((Frame::Lineage { lineage: [5; 16] }, 21))
        );
    }

    #[test]
    fn index_born_and_the_births_bit_match_the_spec() {
        let births = Preamble {
            version: 1,
            capabilities: CAPABILITY_BIRTHS,
        };
        assert_eq!(&births.encode()[12..16], &[2, 0, 0, 0], "BIRTHS is bit 1");
        let mut buf = Vec::new();
        Frame::IndexBorn {
            len_bytes: 0x0102,
            born_at: 0x0304,
            path: path("ab"),
        }
        .encode(&mut buf);
        let want = [
            21, 0, 0, 0,    // body_len = 19 + path_len
            0x16, // type
            0x02, 0x01, 0, 0, 0, 0, 0, 0, // len_bytes
            0x04, 0x03, 0, 0, 0, 0, 0, 0, // born_at
            2, 0, b'a', b'b',
        ];
        assert_eq!(buf, want);
        assert_eq!(
            roundtrip(&Frame::decode(&buf).unwrap().unwrap().0).name(),
            "INDEX_BORN"
        );
    }

    #[test]
    fn born_and_its_bit_match_the_spec() {
        let born = Preamble {
            version: 1,
            capabilities: CAPABILITY_BORN,
        };
        assert_eq!(&born.encode()[12..16], &[8, 0, 0, 0], "BORN is bit 3");
        let needs = |capabilities| Preamble {
            version: 1,
            capabilities,
        };
        assert!(needs(CAPABILITIES).in_use(CAPABILITIES).born);
        for without in [CAPABILITY_HELD, CAPABILITY_BIRTHS, CAPABILITY_BORN] {
            let theirs = needs(CAPABILITIES & !without);
            assert!(!theirs.in_use(CAPABILITIES).born, "without {without:#x}");
        }
        let mut buf = Vec::new();
        Frame::Born {
            born_at: 0x0304,
            path: path("ab"),
        }
        .encode(&mut buf);
        let want = [
            13, 0, 0, 0,    // body_len = 11 + path_len
            0x26, // type
            0x04, 0x03, 0, 0, 0, 0, 0, 0, // born_at
            2, 0, b'a', b'b',
        ];
        assert_eq!(buf, want);
        assert_eq!(
            roundtrip(&Frame::decode(&buf).unwrap().unwrap().0).name(),
            "BORN"
        );
    }

    #[test]
    fn preamble_layout_and_bad_magic() {
        let p = Preamble {
            version: 1,
            capabilities: 0,
        }
        .encode();
        assert_eq!(&p[..8], b"FERRY\0\r\n");
        assert_eq!(&p[8..10], &[1, 0]);
        assert_eq!(Preamble::decode(&p).unwrap().version, 1);
        let mut http = [0u8; 16];
        http.copy_from_slice(b"GET / HTTP/1.1\r\n");
        let err = Preamble::decode(&http).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        assert_eq!(err.code(), ErrorCode::BadMagic);
    }

    #[test]
    fn oversized_frame_is_rejected_naming_the_limit_before_its_body_arrives() {
        let buf = (MAX_FRAME_BODY_BYTES + 1).to_le_bytes();
        let err = Frame::decode(&buf).unwrap_err();
        assert!(err.to_string().contains("MAX_FRAME_BODY_BYTES"), "{err}");
        assert_eq!(err.code(), ErrorCode::Limit);
    }

    #[test]
    fn oversized_data_payload_is_rejected_naming_the_limit() {
        let mut buf = Vec::new();
        Frame::Data {
            temp: false,
            offset: 0,
            data_len: 1,
            path: path("a"),
        }
        .encode(&mut buf);
        buf[14..18].copy_from_slice(&(MAX_DATA_BYTES + 1).to_le_bytes());
        let err = Frame::decode(&buf).unwrap_err();
        assert!(err.to_string().contains("MAX_DATA_BYTES"), "{err}");
    }

    #[test]
    fn escaping_paths_are_rejected_as_bad_path() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            ".ferry/digests",
            "a//b",
        ] {
            let mut buf = Vec::new();
            Frame::Delete { path: path("x") }.encode(&mut buf);
            buf.truncate(5);
            buf.extend_from_slice(&(bad.len() as u16).to_le_bytes());
            buf.extend_from_slice(bad.as_bytes());
            let body_len = (buf.len() - 4) as u32;
            buf[..4].copy_from_slice(&body_len.to_le_bytes());
            let err = Frame::decode(&buf).unwrap_err();
            assert_eq!(err.code(), ErrorCode::BadPath, "{bad:?}: {err}");
        }
    }

    #[test]
    fn unknown_type_and_trailing_bytes_are_named() {
        let err = Frame::decode(&[1, 0, 0, 0, 0x7f]).unwrap_err();
        assert_eq!(err, FrameError::UnknownType(0x7f));
        let mut buf = Vec::new();
        Frame::IndexEnd { count: 3 }.encode(&mut buf);
        buf.push(0);
        buf[0] += 1;
        let err = Frame::decode(&buf).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn error_messages_are_cut_to_the_limit_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let Frame::Error { message, .. } = roundtrip(&Frame::error(ErrorCode::Io, &long)) else {
            panic!("not an error frame")
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(message.chars().all(|c| c == 'é'));
    }

    fn arb_path() -> impl Strategy<Value = RelPath> {
        "[a-z0-9_]{1,12}(/[a-z0-9_.]{1,12}){0,3}"
            .prop_filter_map("valid", |s| RelPath::new(&s).ok())
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(|n| Frame::Challenge { leader_nonce: n }),
            (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(n, m)| Frame::Auth {
                follower_nonce: n,
                follower_mac: m
            }),
            any::<[u8; 32]>().prop_map(|m| Frame::Welcome { leader_mac: m }),
            (any::<u16>(), "[ -~]{0,64}").prop_map(|(c, m)| Frame::Error {
                code: ErrorCode::from_u16(c),
                message: m
            }),
            (any::<u64>(), arb_path()).prop_map(|(l, p)| Frame::Index {
                len_bytes: l,
                path: p
            }),
            (any::<u64>(), any::<u64>(), arb_path()).prop_map(|(l, b, p)| Frame::IndexBorn {
                len_bytes: l,
                born_at: b,
                path: p
            }),
            any::<u64>().prop_map(|c| Frame::IndexEnd { count: c }),
            (any::<u64>(), any::<[u8; 20]>(), arb_path()).prop_map(|(l, d, p)| Frame::Have {
                len_bytes: l,
                digest: d,
                path: p
            }),
            "[a-z0-9.:]{1,64}".prop_map(|id| Frame::NodeId { id }),
            any::<[u8; 16]>().prop_map(|instance| Frame::Instance { instance }),
            any::<[u8; 16]>().prop_map(|lineage| Frame::Lineage { lineage }),
            (any::<[u8; 16]>(), any::<u64>())
                .prop_map(|(instance, position)| Frame::ForkOf { instance, position }),
            (any::<u64>(), any::<u64>(), any::<[u8; 16]>(), arb_path()).prop_map(
                |(l, p, i, path)| Frame::HaveHeld {
                    len_bytes: l,
                    position: p,
                    instance: i,
                    path
                }
            ),
            (any::<u64>(), 0u8..3).prop_map(|(c, d)| Frame::HaveEnd {
                count: c,
                durability: Durability::from_u8(d).unwrap()
            }),
            (
                any::<bool>(),
                0u64..u64::MAX / 2,
                0..=MAX_DATA_BYTES,
                arb_path()
            )
                .prop_map(|(t, o, l, p)| Frame::Data {
                    temp: t,
                    offset: o,
                    data_len: l,
                    path: p
                }),
            (any::<u64>(), arb_path()).prop_map(|(l, p)| Frame::BeginWhole {
                len_bytes: l,
                path: p
            }),
            arb_path().prop_map(|p| Frame::CommitWhole { path: p }),
            (any::<u64>(), arb_path()).prop_map(|(l, p)| Frame::Truncate {
                len_bytes: l,
                path: p
            }),
            arb_path().prop_map(|p| Frame::Delete { path: p }),
            (arb_path(), arb_path()).prop_map(|(from, to)| Frame::Rename { from, to }),
            (any::<u64>(), arb_path()).prop_map(|(b, p)| Frame::Born {
                born_at: b,
                path: p
            }),
            (any::<u64>(), any::<bool>()).prop_map(|(p, s)| Frame::Mark {
                position: p,
                sync_done: s
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(r, w, s)| Frame::Ack {
                received: r,
                written: w,
                synced: s
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_roundtrips(f in arb_frame()) {
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn a_stream_split_anywhere_decodes_to_the_same_frames(
            frames in proptest::collection::vec(arb_frame(), 1..8), cut in 0usize..4096
        ) {
            let mut wire = Vec::new();
            for f in &frames { f.encode(&mut wire); }
            let cut = cut.min(wire.len());
            // Feed the first `cut` bytes, then all: a prefix either yields whole frames or asks for more.
            let mut got = Vec::new();
            let mut pos = 0;
            for end in [cut, wire.len()] {
                while let Some((f, used)) = Frame::decode(&wire[pos..end]).unwrap() {
                    got.push(f);
                    pos += used;
                }
            }
            prop_assert_eq!(pos, wire.len());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = Frame::decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
