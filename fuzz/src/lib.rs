//! Shared harness code for ferry's fuzz targets: in-memory shells that drive a `LeaderSession`
//! or a `FollowerSession` the way `src/session/tests.rs` does (files are byte vectors, the wire
//! is a byte buffer, time is a parameter), and a checker that reads what a session sends the
//! way its peer would and asserts the protocol's invariants on it.
//!
//! Every assertion here is a property of the sessions, not of the input: the fuzzer's bytes may
//! be anything, and whatever they are, a violation is a bug in ferry (or in this harness).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ferry::auth::{tags_equal, Secret};
use ferry::catalog::{Catalog, CatalogError, Kept};
use ferry::frame::{
    Digest, Durability, ErrorCode, Frame, InstanceId, LineageId, Nonce, Preamble, CAPABILITIES,
    MAX_DATA_BYTES, PREAMBLE_BYTES, PROTOCOL_VERSION,
};
use ferry::paths::RelPath;
use ferry::session::follower::{
    Births, FollowerAction, FollowerPhase, FollowerSession, HaveEntry, HaveProof,
};
use ferry::session::leader::{LeaderPhase, LeaderSession, Transmit};
use ferry::session::SessionError;
use sha1::{Digest as _, Sha1};

/// The secret both sides of every harness know. The seed corpus's AUTH and WELCOME frames are
/// computed with it and the two nonces below, so mutations of a valid transcript get past
/// authentication.
pub const SECRET: &[u8] = b"ferry-fuzz-secret";
pub const LEADER_NONCE: Nonce = [0x4c; 32];
pub const LEADER_INSTANCE: InstanceId = [0x49; 16];
pub const LEADER_LINEAGE: LineageId = [0x4e; 16];
pub const FOLLOWER_NONCE: Nonce = [0x46; 32];
/// The follower's node id in the harnesses that send one.
pub const NODE_ID: &str = "fuzz-node-1";
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// Files the in-memory follower materialises up to this size; a DATA frame reaching further
/// (only possible with bytes the fuzzer made up) is counted but not stored.
pub const MAX_SIM_FILE_BYTES: u64 = 1 << 20;

pub type Files = HashMap<RelPath, Vec<u8>>;

pub fn secret() -> Secret {
    Secret::new(SECRET.to_vec()).unwrap()
}

/// The leader's second secret, as during a rotation (`--previous-secret-file`).
pub fn previous_secret() -> Secret {
    Secret::new(b"a previous secret, rotated out".to_vec()).unwrap()
}

/// A leader session as the shell makes one: in a rotation, holding two secrets.
fn leader_session() -> LeaderSession {
    LeaderSession::new(
        secret(),
        LEADER_NONCE,
        ACK_TIMEOUT,
        LEADER_INSTANCE,
        LEADER_LINEAGE,
    )
    .with_previous_secret(Some(previous_secret()))
}

pub fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

pub fn sha1(bytes: &[u8]) -> Digest {
    Sha1::digest(bytes).into()
}

/// Deterministic filler bytes for file contents.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The leader's files in the single-session harnesses (and the seed corpus's index).
pub fn leader_files() -> Files {
    [
        ("a", b"hello".to_vec()),
        ("seg/000", pattern(3000, 1)),
        ("meta.json", b"{}".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (p(k), v))
    .collect()
}

/// The follower's files in the single-session harnesses: a prefix of the leader's (resumed),
/// a longer copy (truncated), one that differs (sent whole), one the leader lacks (deleted).
pub fn follower_files() -> Files {
    [
        ("a", b"hello world".to_vec()),
        ("seg/000", pattern(1000, 1)),
        ("meta.json", b"{\"old\":1}".to_vec()),
        ("stale", b"x".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (p(k), v))
    .collect()
}

/// Splits `data` into the chunks a socket might deliver. `seed` 0 delivers everything at once;
/// otherwise chunk sizes are pseudo-random in `1..=2^(seed % 9)`, so every chunking from one
/// byte at a time to 256 at a time is reachable from the seed byte alone.
pub fn chunks(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    if seed == 0 || data.is_empty() {
        return vec![data];
    }
    let max = 1u64 << (seed % 9);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (1 + state % max).min(rest.len() as u64) as usize;
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// Which end produced a stream the `WireChecker` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Leader,
    Follower,
}

/// Where a stream is in the protocol's *Sequence* (docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    Preamble,
    /// Leader: CHALLENGE next. Follower: AUTH next.
    First,
    /// Leader: WELCOME next.
    Welcome,
    /// Leader: INDEX* INDEX_END. Follower: NODE_ID? HAVE* HAVE_END.
    Listing,
    /// Leader: sync and streaming frames. Follower: ACKs.
    Streaming,
}

/// Reads one session's output as its peer would, and asserts that every byte of it is a valid
/// preamble, frame or DATA payload, in an order the protocol allows, with consistent counts and
/// monotonic positions. An ERROR frame must be the last thing sent.
pub struct WireChecker {
    side: Side,
    /// The preamble the session must open with.
    preamble: Preamble,
    phase: StreamPhase,
    buf: Vec<u8>,
    payload_left: u64,
    /// The ERROR frame sent, if any: nothing may follow it.
    pub error_sent: Option<ErrorCode>,
    /// Every frame decoded, in order (DATA payloads excluded).
    pub frames: Vec<Frame>,
    listed: u64,
    node_id_sent: bool,
    instance_sent: bool,
    lineage_sent: bool,
    mark_last: Option<u64>,
    ack_last: [u64; 3],
    /// Whole-file transfers begun and not committed: bytes of TEMP DATA sent into each.
    wholes: HashMap<RelPath, (u64, u64)>,
}

impl WireChecker {
    pub fn new(side: Side) -> WireChecker {
        WireChecker::offering(side, CAPABILITIES)
    }

    /// A checker for a session that offers `capabilities` (`FollowerSession::offering`).
    pub fn offering(side: Side, capabilities: u32) -> WireChecker {
        let preamble = Preamble {
            version: PROTOCOL_VERSION,
            capabilities,
        };
        WireChecker {
            side,
            preamble,
            phase: StreamPhase::Preamble,
            buf: Vec::new(),
            payload_left: 0,
            error_sent: None,
            frames: Vec::new(),
            listed: 0,
            node_id_sent: false,
            instance_sent: false,
            lineage_sent: false,
            mark_last: None,
            ack_last: [0; 3],
            wholes: HashMap::new(),
        }
    }

    /// The highest MARK position sent so far (leader streams).
    pub fn mark_last(&self) -> Option<u64> {
        self.mark_last
    }

    /// The last ACK sent (follower streams).
    pub fn ack_last(&self) -> [u64; 3] {
        self.ack_last
    }

    /// Everything sent so far ended on a frame (or payload) boundary.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.payload_left == 0
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        assert!(
            self.error_sent.is_none(),
            "{:?} sent {} bytes after its ERROR frame",
            self.side,
            bytes.len()
        );
        self.buf.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            if self.payload_left > 0 {
                let n = self.payload_left.min((self.buf.len() - pos) as u64);
                self.payload_left -= n;
                pos += n as usize;
                if self.payload_left > 0 {
                    break;
                }
            }
            if self.phase == StreamPhase::Preamble {
                let Some(head) = self.buf[pos..].first_chunk::<PREAMBLE_BYTES>() else {
                    break;
                };
                assert_eq!(
                    *head,
                    self.preamble.encode(),
                    "{:?} did not open with the preamble it offers",
                    self.side
                );
                pos += PREAMBLE_BYTES;
                self.phase = StreamPhase::First;
                continue;
            }
            let (frame, used) = match Frame::decode(&self.buf[pos..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!(
                    "{:?} sent a frame its peer cannot decode: {e} (bytes {:02x?})",
                    self.side,
                    &self.buf[pos..(pos + 64).min(self.buf.len())]
                ),
            };
            pos += used;
            assert!(
                self.error_sent.is_none(),
                "{:?} sent {} after its ERROR frame",
                self.side,
                frame.name()
            );
            self.check_order(&frame);
            if let Frame::Data { data_len, .. } = &frame {
                self.payload_left = u64::from(*data_len);
            }
            self.frames.push(frame);
        }
        self.buf.drain(..pos);
    }

    fn check_order(&mut self, frame: &Frame) {
        use StreamPhase as S;
        let side = self.side;
        let bad = |why: &str| -> ! { panic!("{side:?} sent {} {why}", frame.name()) };
        if let Frame::Error { code, message } = frame {
            assert!(
                !matches!(code, ErrorCode::Unknown(_)),
                "{side:?} sent an unknown error code: {message}"
            );
            self.error_sent = Some(*code);
            return;
        }
        match (side, self.phase, frame) {
            (Side::Leader, S::First, Frame::Challenge { .. }) => self.phase = S::Welcome,
            (Side::Leader, S::Welcome, Frame::Welcome { .. }) => self.phase = S::Listing,
            (Side::Leader, S::Listing, Frame::Instance { .. }) => {
                assert!(!self.instance_sent, "INSTANCE sent twice");
                assert!(!self.lineage_sent, "INSTANCE after LINEAGE");
                assert_eq!(self.listed, 0, "INSTANCE after INDEX");
                self.instance_sent = true;
            }
            (Side::Leader, S::Listing, Frame::Lineage { lineage }) => {
                assert!(!self.lineage_sent, "LINEAGE sent twice");
                assert_eq!(self.listed, 0, "LINEAGE after INDEX");
                assert_eq!(*lineage, LEADER_LINEAGE, "not the leader's lineage");
                self.lineage_sent = true;
            }
            (Side::Leader, S::Listing, Frame::Index { .. } | Frame::IndexBorn { .. }) => {
                self.listed += 1
            }
            (Side::Leader, S::Listing, Frame::IndexEnd { count }) => {
                assert_eq!(*count, self.listed, "INDEX_END miscounts the INDEX frames");
                self.phase = S::Streaming;
            }
            (
                Side::Leader,
                S::Streaming,
                Frame::Mark {
                    position,
                    sync_done,
                },
            ) => {
                if let Some(last) = self.mark_last {
                    assert!(*position >= last, "MARK {position} after MARK {last}");
                }
                assert_eq!(
                    *sync_done,
                    self.mark_last.is_none(),
                    "SYNC_DONE must be on the first MARK and only there"
                );
                self.mark_last = Some(*position);
            }
            (Side::Leader, S::Streaming, Frame::BeginWhole { len_bytes, path }) => {
                self.wholes.insert(path.clone(), (*len_bytes, 0));
            }
            (
                Side::Leader,
                S::Streaming,
                Frame::Data {
                    temp,
                    offset,
                    data_len,
                    path,
                },
            ) => {
                assert!(*data_len > 0, "empty DATA frame for {path}");
                if *temp {
                    let Some((len, sent)) = self.wholes.get_mut(path) else {
                        bad("TEMP without BEGIN_WHOLE")
                    };
                    assert_eq!(*offset, *sent, "TEMP DATA for {path} out of sequence");
                    *sent += u64::from(*data_len);
                    assert!(
                        *sent <= *len,
                        "TEMP DATA for {path} beyond BEGIN_WHOLE's length"
                    );
                }
            }
            (Side::Leader, S::Streaming, Frame::CommitWhole { path }) => {
                let Some((len, sent)) = self.wholes.remove(path) else {
                    bad("without BEGIN_WHOLE")
                };
                assert_eq!(
                    sent, len,
                    "COMMIT_WHOLE of {path} before all its bytes were sent"
                );
            }
            (Side::Leader, S::Streaming, Frame::Delete { path }) => {
                self.wholes.remove(path);
            }
            // A RENAME also ends a whole-file transfer of the path renamed to.
            (Side::Leader, S::Streaming, Frame::Rename { to, .. }) => {
                self.wholes.remove(to);
            }
            (Side::Leader, S::Streaming, Frame::Truncate { .. }) => {}
            // Before a BEGIN_WHOLE or a DATA that creates a file (which may be taken back).
            (Side::Leader, S::Streaming, Frame::Born { .. }) => {}
            (Side::Follower, S::First, Frame::Auth { .. }) => self.phase = S::Listing,
            (Side::Follower, S::Listing, Frame::NodeId { .. }) => {
                assert!(!self.node_id_sent, "NODE_ID sent twice");
                assert_eq!(self.listed, 0, "NODE_ID after HAVE");
                self.node_id_sent = true;
            }
            (Side::Follower, S::Listing, Frame::Have { .. } | Frame::HaveHeld { .. }) => {
                self.listed += 1
            }
            (Side::Follower, S::Listing, Frame::HaveEnd { count, .. }) => {
                assert_eq!(*count, self.listed, "HAVE_END miscounts the HAVE frames");
                self.phase = S::Streaming;
            }
            (
                Side::Follower,
                S::Streaming,
                Frame::Ack {
                    received,
                    written,
                    synced,
                },
            ) => {
                let acked = [*received, *written, *synced];
                assert!(
                    received >= written && written >= synced,
                    "ACK {acked:?} not ordered"
                );
                for (new, old) in acked.iter().zip(self.ack_last) {
                    assert!(*new >= old, "ACK {acked:?} after {:?}", self.ack_last);
                }
                self.ack_last = acked;
            }
            _ => bad(&format!("in stream phase {:?}", self.phase)),
        }
    }
}

/// Asserts what a session must have done when `handle_input` (or the shell) failed with `err`:
/// its last output is an ERROR frame with the error's code, unless the peer's own ERROR ended it.
fn check_error_reported(wire: &WireChecker, err: &SessionError) {
    match err {
        SessionError::Peer { .. } => {
            assert_eq!(wire.error_sent, None, "an ERROR was answered with an ERROR")
        }
        _ => {
            assert_eq!(
                wire.error_sent,
                Some(err.code()),
                "the session failed with {err} but did not say so"
            );
            assert!(
                matches!(wire.frames.last(), Some(Frame::Error { .. })),
                "ERROR is not the last frame"
            );
        }
    }
}

/// The frames of a byte stream that starts with a preamble (as consumed by a session).
fn frames_of(consumed: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut pos = PREAMBLE_BYTES.min(consumed.len());
    while pos < consumed.len() {
        match Frame::decode(&consumed[pos..]) {
            Ok(Some((f, used))) => {
                pos += used;
                frames.push(f);
            }
            other => panic!(
                "a session consumed bytes that are not whole frames ({:?})",
                other.map(|o| o.map(|(f, _)| f))
            ),
        }
    }
    frames
}

fn leader_rank(p: LeaderPhase) -> u8 {
    match p {
        LeaderPhase::AwaitPreamble => 0,
        LeaderPhase::AwaitAuth => 1,
        LeaderPhase::AwaitInventory => 2,
        LeaderPhase::AwaitDigests => 3,
        LeaderPhase::Streaming => 4,
        LeaderPhase::Closed => 5,
    }
}

fn follower_rank(p: FollowerPhase) -> u8 {
    match p {
        FollowerPhase::AwaitPreamble => 0,
        FollowerPhase::AwaitChallenge => 1,
        FollowerPhase::AwaitWelcome => 2,
        FollowerPhase::AwaitIndex => 3,
        FollowerPhase::AwaitInventory => 4,
        FollowerPhase::Streaming => 5,
        FollowerPhase::Closed => 6,
    }
}

/// The leader's shell: catalog and files in memory, input buffer, output checked on the way out.
pub struct LeaderShell {
    pub catalog: Catalog,
    pub files: Files,
    pub session: LeaderSession,
    pub now: Instant,
    pub inbuf: Vec<u8>,
    pub error: Option<SessionError>,
    pub wire: WireChecker,
    /// Every byte the session reported consumed, in order.
    pub consumed: Vec<u8>,
    /// The paths the shell recorded as they were, asked by `Transmit::RecordUnreported`, each
    /// with the position after its change (`None`: nothing to record, the position did not move).
    pub recorded_unreported: Vec<(RelPath, Option<u64>)>,
    rank: u8,
    /// The leader's record as its last checkpoint wrote it: each file it vouches for, and the
    /// reservation no MARK passes (`ferry::leader::checkpoint`).
    checkpoint: Option<(HashMap<RelPath, Kept>, u64)>,
}

impl LeaderShell {
    /// The connection ends and a new one begins: a new session of the same leader instance,
    /// on the same catalog and files.
    pub fn reconnect(&mut self) {
        self.session = leader_session();
        // The shell hands each session the reservation of the record on disk.
        if let Some((_, reserved)) = &self.checkpoint {
            self.session.set_mark_ceiling(*reserved);
        }
        self.inbuf.clear();
        self.error = None;
        self.wire = WireChecker::new(Side::Leader);
        self.consumed.clear();
        self.rank = 0;
    }

    /// The leader stops gracefully and starts again on its files, resuming its instance from
    /// its record (`ferry::leader_record`): positions go on above the last one, and each file
    /// keeps its birth unless it is in `changed` (changed behind the catalog and not reported
    /// when the record was taken: the record vouches for no file changed within
    /// `LEADER_RECORD_SETTLE_MS` of it, and a report comes sooner). The connection ends.
    pub fn restart(&mut self, changed: &[RelPath]) {
        let last_position = self.catalog.position();
        let kept = self.kept(changed);
        self.resume(last_position, &kept);
    }

    /// What a record taken now vouches for: every file in the catalog but `changed`.
    fn kept(&self, changed: &[RelPath]) -> HashMap<RelPath, Kept> {
        self.catalog
            .snapshot()
            .into_iter()
            .filter(|(path, _)| !changed.contains(path))
            .map(|(path, e)| {
                let kept = Kept {
                    len_bytes: e.len_bytes,
                    born_at: e.born_at,
                };
                (path, kept)
            })
            .collect()
    }

    /// A new run on the files, resuming the instance above `last_position`.
    fn resume(&mut self, last_position: u64, kept: &HashMap<RelPath, Kept>) {
        let files = self.files.iter().map(|(p, b)| (p.clone(), b.len() as u64));
        self.catalog = Catalog::resumed(files, last_position, kept);
        self.checkpoint = None;
        self.reconnect();
    }

    /// A checkpoint of the leader's record while serving: it vouches for every file but
    /// `changed` (changed behind the catalog and not yet reported: the settle rule), and reserves
    /// positions up to `reserve` above the position (at least the last reservation); from now
    /// on no MARK passes that.
    pub fn checkpoint(&mut self, changed: &[RelPath], reserve: u64) {
        let last = self.checkpoint.as_ref().map_or(0, |c| c.1);
        let reserved = self.catalog.position().saturating_add(reserve).max(last);
        self.checkpoint = Some((self.kept(changed), reserved));
        self.session.set_mark_ceiling(reserved);
    }

    pub fn has_checkpoint(&self) -> bool {
        self.checkpoint.is_some()
    }

    /// The leader dies and starts again from its last checkpoint (`has_checkpoint` must
    /// hold): positions go on above the reservation, and a file keeps its birth unless
    /// `changed_since` (its stamp then differs from the checkpoint's).
    pub fn crash_restart(&mut self, changed_since: &HashSet<RelPath>) {
        let (mut kept, reserved) = self
            .checkpoint
            .take()
            .expect("a crash restart from a checkpoint the leader wrote");
        kept.retain(|path, _| !changed_since.contains(path));
        self.resume(reserved, &kept);
    }

    /// Applies `change` to the catalog and tells the session, as the leader's writer does.
    /// Returns the position after the change, if it moved it (an empty append, or a delete of
    /// a file the catalog does not hold, does not).
    pub fn record<T>(
        &mut self,
        path: RelPath,
        change: impl FnOnce(&mut Catalog, &str) -> Result<T, CatalogError>,
    ) -> Option<u64> {
        let since = self.catalog.position();
        change(&mut self.catalog, path.as_str()).expect("a RelPath passes the catalog's check");
        self.session.note_changed(path, since);
        let after = self.catalog.position();
        (after > since).then_some(after)
    }

    /// Records the rename of `from` to `to` (the files already moved), as the leader's
    /// `rename_file` does: the move and both changes, or `to` replaced at its length where the
    /// catalog holds no `from`. Returns the position after it.
    pub fn record_rename(&mut self, from: &RelPath, to: &RelPath) -> Option<u64> {
        let since = self.catalog.position();
        let renamed = self.catalog.rename(from.as_str(), to.as_str());
        match renamed.expect("RelPaths pass the catalog's check") {
            Some(renamed) => {
                self.session.note_moved(renamed.moved);
                self.session.note_changed(from.clone(), since);
                self.session.note_changed(to.clone(), since);
                Some(self.catalog.position())
            }
            None => self.record_as_it_is(to.clone()),
        }
    }

    /// Records `path` as its file is now, replaced at its length or deleted, as a change
    /// source reports a file changed behind the catalog; as `record`, the position after it.
    pub fn record_as_it_is(&mut self, path: RelPath) -> Option<u64> {
        match self.files.get(&path) {
            Some(b) => {
                let len = b.len() as u64;
                self.record(path, |c, p| c.replace(p, len))
            }
            None => self.record(path, |c, p| c.delete(p)),
        }
    }

    pub fn new(files: Files, now: Instant) -> LeaderShell {
        let catalog = Catalog::new(files.iter().map(|(p, b)| (p.clone(), b.len() as u64)));
        LeaderShell {
            catalog,
            files,
            session: leader_session(),
            now,
            inbuf: Vec::new(),
            error: None,
            wire: WireChecker::new(Side::Leader),
            consumed: Vec::new(),
            recorded_unreported: Vec::new(),
            rank: 0,
            checkpoint: None,
        }
    }

    /// Feeds the input buffer to the session once. Returns whether it consumed anything.
    pub fn handle(&mut self) -> bool {
        if self.error.is_some() {
            self.check_closed();
            return false;
        }
        // The shell's rule: no catalog until the input may authenticate (an index sent from
        // the empty one would tell the follower to delete everything).
        let may_authenticate = self.session.may_authenticate(&self.inbuf);
        let nothing = Catalog::new([]);
        let catalog = if may_authenticate {
            &self.catalog
        } else {
            &nothing
        };
        match self.session.handle_input(&self.inbuf, catalog, self.now) {
            Ok(n) => {
                assert!(
                    n <= self.inbuf.len(),
                    "consumed {n} of {}",
                    self.inbuf.len()
                );
                self.consumed.extend(self.inbuf.drain(..n));
                let rank = leader_rank(self.session.phase());
                assert!(
                    may_authenticate || rank < leader_rank(LeaderPhase::AwaitInventory),
                    "authenticated on input that may_authenticate said could not"
                );
                assert!(rank >= self.rank, "leader phase went back");
                assert_ne!(
                    self.session.phase(),
                    LeaderPhase::Closed,
                    "closed without error"
                );
                self.rank = rank;
                if rank >= leader_rank(LeaderPhase::AwaitInventory) {
                    self.check_authenticated();
                }
                if self.session.phase() == LeaderPhase::AwaitPreamble {
                    assert!(self.inbuf.len() < PREAMBLE_BYTES);
                } else {
                    assert!(
                        matches!(Frame::decode(&self.inbuf), Ok(None)),
                        "the leader left a whole frame unread"
                    );
                }
                n > 0
            }
            Err(err) => {
                assert_eq!(self.session.phase(), LeaderPhase::Closed);
                let out = self.session.take_output();
                self.wire.feed(&out);
                check_error_reported(&self.wire, &err);
                self.error = Some(err);
                self.check_closed();
                true
            }
        }
    }

    /// What the shell's handshake timer does: `check_handshake_deadline` at `now`.
    pub fn check_deadline(&mut self, connected_at: Instant) {
        if self.error.is_some() {
            return;
        }
        let before = self.session.phase();
        match self
            .session
            .check_handshake_deadline(connected_at, self.now)
        {
            Ok(()) => assert_eq!(self.session.phase(), before),
            Err(err) => {
                assert!(matches!(
                    before,
                    LeaderPhase::AwaitPreamble | LeaderPhase::AwaitAuth
                ));
                assert!(
                    self.now.saturating_duration_since(connected_at)
                        >= Duration::from_millis(ferry::frame::HANDSHAKE_TIMEOUT_MS)
                );
                let out = self.session.take_output();
                self.wire.feed(&out);
                check_error_reported(&self.wire, &err);
                self.error = Some(err);
                self.check_closed();
            }
        }
    }

    /// The leader got past AUTH: the follower's first frame proved it knows the secret.
    fn check_authenticated(&self) {
        let frames = frames_of(&self.consumed);
        let Some(Frame::Auth {
            follower_nonce,
            follower_mac,
        }) = frames.first()
        else {
            panic!("leader authenticated without an AUTH frame first: {frames:?}")
        };
        let under =
            |s: Secret| tags_equal(&s.follower_tag(&LEADER_NONCE, follower_nonce), follower_mac);
        assert!(
            under(secret()) || under(previous_secret()),
            "leader accepted a wrong MAC"
        );
    }

    /// A failed session accepts nothing more and sends nothing more.
    fn check_closed(&mut self) {
        assert_eq!(self.session.phase(), LeaderPhase::Closed);
        assert_eq!(
            self.session
                .handle_input(&self.inbuf, &self.catalog, self.now),
            Ok(0),
            "a closed leader consumed input"
        );
        assert_eq!(self.session.poll_transmit(&self.catalog, self.now), None);
        assert!(!self.session.has_output(), "a closed leader queued output");
    }

    /// One turn of the shell after input: digests, then up to `budget` transmits (0: until the
    /// session has nothing more; a real shell stops when the socket is full). Returns the bytes
    /// to send (frames and payloads), already checked.
    pub fn drive(&mut self, budget: usize) -> Vec<u8> {
        if self.error.is_some() {
            return Vec::new();
        }
        // Asked for as the HAVEs arrive, and at HAVE_END (an empty list) if none was left.
        if let Some(requests) = self.session.digest_requests() {
            let phase = self.session.phase();
            assert!(
                matches!(
                    phase,
                    LeaderPhase::AwaitInventory | LeaderPhase::AwaitDigests
                ),
                "digests asked for in phase {phase:?}"
            );
            let digests = requests
                .into_iter()
                .map(|r| {
                    let d = self
                        .files
                        .get(&r.path)
                        .and_then(|b| b.get(..usize::try_from(r.len_bytes).ok()?))
                        .map(sha1);
                    (r.path, d)
                })
                .collect();
            self.session.digests_ready(digests);
            // This shell answers every request at once: past HAVE_END, that plans the sync.
            if phase == LeaderPhase::AwaitDigests {
                assert_eq!(self.session.phase(), LeaderPhase::Streaming);
            }
        }
        let mut wire = Vec::new();
        let mut turns = 0usize;
        while let Some(t) = self.session.poll_transmit(&self.catalog, self.now) {
            turns += 1;
            assert!(turns < 1_000_000, "poll_transmit never returns None");
            match t {
                Transmit::OpenWhole { path, .. } => match self.files.get(&path) {
                    Some(b) => {
                        let len = b.len() as u64;
                        self.session.begin_whole(&path, len, &self.catalog);
                    }
                    None => self.session.whole_unavailable(&path),
                },
                Transmit::Payload {
                    path,
                    offset,
                    len_bytes,
                    ..
                } => {
                    assert!(len_bytes > 0 && len_bytes <= u64::from(MAX_DATA_BYTES));
                    let range = self.files.get(&path).and_then(|b| {
                        b.get(
                            usize::try_from(offset).ok()?
                                ..usize::try_from(offset + len_bytes).ok()?,
                        )
                    });
                    match range {
                        Some(bytes) => {
                            wire.extend(self.session.take_output());
                            wire.extend_from_slice(bytes);
                        }
                        None => self.session.payload_unavailable(),
                    }
                }
                Transmit::RecordUnreported { paths } => {
                    // As the leader's shell does. The script's own report of the change, if
                    // it comes later, is one more change.
                    for path in paths {
                        let at = self.record_as_it_is(path.clone());
                        self.recorded_unreported.push((path, at));
                    }
                }
            }
            if budget != 0 && turns >= budget {
                break;
            }
        }
        wire.extend(self.session.take_output());
        self.wire.feed(&wire);
        assert!(
            self.wire.at_boundary(),
            "the leader's output ended inside a frame"
        );
        wire
    }
}

/// A DATA payload the follower's shell is still taking off the wire.
struct PendingWrite {
    path: RelPath,
    temp: bool,
    offset: u64,
    left: u64,
}

/// The follower's shell: files and temp files in memory, applying actions in wire order.
pub struct FollowerShell {
    pub session: FollowerSession,
    pub durability: Durability,
    pub files: Files,
    pub temps: Files,
    pub inbuf: Vec<u8>,
    pub error: Option<SessionError>,
    pub wire: WireChecker,
    /// The bytes the session consumed (DATA payloads, taken by the shell, excluded).
    pub consumed: Vec<u8>,
    pub marks: Vec<(u64, bool)>,
    /// A write reached past `MAX_SIM_FILE_BYTES`, so file contents are no longer exact.
    pub lossy: bool,
    /// Checked at each MARK unless `None` (frames injected, or contents no longer exact).
    pub claims: Option<Claims>,
    pending: Option<PendingWrite>,
    /// BEGIN_WHOLE lengths of the transfers the session said were open.
    wholes: HashMap<RelPath, u64>,
    rank: u8,
    /// The held record, as `follower::held` keeps it: per file, the MARK after which it was
    /// looked at and its stamp then.
    held: HashMap<RelPath, (u64, u64)>,
    /// Each file's stamp: a number that changes with every change to the file (its inode,
    /// size, mtime and ctime, in `follower::held`).
    stamps: HashMap<RelPath, u64>,
    stamp_next: u64,
    /// Files changed since the record last looked at them.
    touched: HashSet<RelPath>,
    /// A look begun at a MARK (its position and paths), taken at the next action: the real
    /// one runs on another thread while the frames after that MARK are applied.
    looking: Option<(u64, Vec<RelPath>)>,
    /// The leader's index of this connection, looked at whole at its SYNC_DONE MARK.
    index: Vec<RelPath>,
    /// HAVE_HELD entries sent, over all connections.
    pub held_sent: u64,
    /// The capabilities the session offers (`offering`).
    offered: u32,
    /// What the held record would keep as each copy's birth, shown every action before it is
    /// applied, as the real shell does.
    pub births: Births,
}

impl FollowerShell {
    pub fn new(files: Files, durability: Durability, node_id: bool) -> FollowerShell {
        FollowerShell {
            session: FollowerSession::with_node_id(
                secret(),
                FOLLOWER_NONCE,
                durability,
                node_id.then(|| NODE_ID.to_string()),
            ),
            durability,
            files,
            temps: HashMap::new(),
            inbuf: Vec::new(),
            error: None,
            wire: WireChecker::new(Side::Follower),
            consumed: Vec::new(),
            marks: Vec::new(),
            lossy: false,
            claims: None,
            pending: None,
            wholes: HashMap::new(),
            rank: 0,
            held: HashMap::new(),
            stamps: HashMap::new(),
            stamp_next: 0,
            touched: HashSet::new(),
            looking: None,
            index: Vec::new(),
            held_sent: 0,
            offered: CAPABILITIES,
            births: Births::default(),
        }
    }

    /// The connection ends and a new one begins, on the same files. `graceful`: the process
    /// lived on (a dropped connection), so the look in progress completes and what changed
    /// since the last MARK is looked at; otherwise it was killed, and neither happens.
    /// A follower that offers only `capabilities`, as an older build (before any input).
    pub fn offering(mut self, capabilities: u32) -> FollowerShell {
        self.offered = capabilities & CAPABILITIES;
        let session = std::mem::replace(
            &mut self.session,
            FollowerSession::new(secret(), FOLLOWER_NONCE, self.durability),
        );
        self.session = session.offering(self.offered);
        self.wire = WireChecker::offering(Side::Follower, self.offered);
        self
    }

    pub fn reconnect(&mut self, graceful: bool) {
        if graceful {
            self.finish_look();
            let last = self.marks.last().map(|m| m.0);
            if let Some(position) = last {
                let paths = self.touched.drain().collect();
                self.looking = Some((position, paths));
                self.finish_look();
            }
        } else {
            self.looking = None;
        }
        self.session =
            FollowerSession::with_node_id(secret(), FOLLOWER_NONCE, self.durability, None)
                .offering(self.offered);
        self.temps.clear();
        self.inbuf.clear();
        self.error = None;
        self.wire = WireChecker::offering(Side::Follower, self.offered);
        self.consumed.clear();
        self.marks.clear();
        self.pending = None;
        self.wholes.clear();
        self.rank = 0;
        self.index.clear();
    }

    /// `path` changed on this follower's disk.
    fn changed(&mut self, path: &RelPath) {
        self.stamp_next += 1;
        if self.files.contains_key(path) {
            self.stamps.insert(path.clone(), self.stamp_next);
        } else {
            self.stamps.remove(path);
        }
        self.touched.insert(path.clone());
    }

    /// Completes the look in progress: each file as it is now, under the MARK it began at.
    fn finish_look(&mut self) {
        let Some((position, paths)) = self.looking.take() else {
            return;
        };
        for path in paths {
            match self.stamps.get(&path) {
                Some(&stamp) => {
                    self.held.insert(path, (position, stamp));
                }
                None => {
                    self.held.remove(&path);
                }
            }
        }
    }

    /// Processes the input buffer: session input, actions, payloads, until it needs more
    /// bytes. Then syncs ("instantly"), polls for an ACK and returns the output, checked.
    pub fn step(&mut self) -> (bool, Vec<u8>) {
        let mut moved = false;
        loop {
            if let Some(w) = &mut self.pending {
                let n = w.left.min(self.inbuf.len() as u64);
                if n == 0 {
                    break;
                }
                let bytes: Vec<u8> = self.inbuf.drain(..n as usize).collect();
                let (path, temp, offset) = (w.path.clone(), w.temp, w.offset);
                w.offset += n;
                w.left -= n;
                if w.left == 0 {
                    self.pending = None;
                }
                moved = true;
                self.write(path, temp, offset, &bytes);
                continue;
            }
            if self.error.is_some() {
                self.check_closed();
                break;
            }
            match self.session.handle_input(&self.inbuf) {
                Ok((n, action)) => {
                    assert!(
                        n <= self.inbuf.len(),
                        "consumed {n} of {}",
                        self.inbuf.len()
                    );
                    self.consumed.extend(self.inbuf.drain(..n));
                    moved |= n > 0;
                    let rank = follower_rank(self.session.phase());
                    assert!(rank >= self.rank, "follower phase went back");
                    self.rank = rank;
                    if rank >= follower_rank(FollowerPhase::AwaitIndex) {
                        self.check_authenticated();
                    }
                    let Some(action) = action else {
                        if self.session.phase() == FollowerPhase::AwaitPreamble {
                            assert!(self.inbuf.len() < PREAMBLE_BYTES);
                        } else {
                            assert!(
                                matches!(Frame::decode(&self.inbuf), Ok(None)),
                                "the follower left a whole frame unread"
                            );
                        }
                        break;
                    };
                    moved = true;
                    if let Err(err) = self.apply(action) {
                        // What the real shell does when applying fails.
                        self.session.fail(&err);
                        self.on_error(err);
                        break;
                    }
                }
                Err(err) => {
                    moved = true;
                    self.on_error(err);
                    break;
                }
            }
        }
        if self.error.is_none() {
            let written = self.session.watermarks()[1];
            self.session.synced(written);
            let acked = self.session.poll_ack();
            if acked {
                let [received, written, synced] = self.session.watermarks();
                let mark = self.marks.last().map_or(0, |m| m.0);
                assert!(received <= mark && written <= received && synced <= written);
            }
        }
        let out = self.session.take_output();
        self.wire.feed(&out);
        assert!(
            self.wire.at_boundary(),
            "the follower's output ended inside a frame"
        );
        (moved || !out.is_empty(), out)
    }

    fn on_error(&mut self, err: SessionError) {
        assert_eq!(self.session.phase(), FollowerPhase::Closed);
        let out = self.session.take_output();
        self.wire.feed(&out);
        check_error_reported(&self.wire, &err);
        self.error = Some(err);
        self.check_closed();
    }

    fn check_closed(&mut self) {
        assert_eq!(self.session.phase(), FollowerPhase::Closed);
        assert_eq!(
            self.session.handle_input(&self.inbuf),
            Ok((0, None)),
            "a closed follower consumed input"
        );
        assert!(!self.session.poll_ack(), "a closed follower acked");
        assert!(
            !self.session.has_output(),
            "a closed follower queued output"
        );
    }

    /// The follower got past WELCOME: it came after a CHALLENGE and proves the secret.
    fn check_authenticated(&self) {
        let frames = frames_of(&self.consumed);
        let (Some(Frame::Challenge { leader_nonce }), Some(Frame::Welcome { leader_mac })) =
            (frames.first(), frames.get(1))
        else {
            panic!("follower authenticated without CHALLENGE, WELCOME: {frames:?}")
        };
        let expected = secret().leader_tag(leader_nonce, &FOLLOWER_NONCE);
        assert!(
            tags_equal(&expected, leader_mac),
            "follower accepted a wrong MAC"
        );
    }

    fn write(&mut self, path: RelPath, temp: bool, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if end > MAX_SIM_FILE_BYTES {
            self.lossy = true;
            self.claims = None;
            return;
        }
        let files = if temp {
            &mut self.temps
        } else {
            &mut self.files
        };
        let file = files.entry(path.clone()).or_default();
        let (offset, end) = (offset as usize, end as usize);
        if file.len() < end {
            file.resize(end, 0);
        }
        file[offset..end].copy_from_slice(bytes);
        if !temp {
            self.changed(&path);
        }
    }

    fn apply(&mut self, action: FollowerAction) -> Result<(), SessionError> {
        // A look begun at the last MARK sees the files as they are when this action comes.
        self.finish_look();
        // As the real shell: only the actions `Births::concerns`.
        if Births::concerns(&action) {
            self.births.before(&action, self.session.born_in_use());
        }
        match action {
            // A file the held record saw as it is now, after a MARK of this leader instance,
            // is reported as held (when the contents are exact); every other by digest.
            FollowerAction::Inventory {
                index,
                instance,
                forks,
                lineage,
            } => {
                assert!(!forks.is_fork(), "this leader's instance is no fork");
                assert_eq!(self.session.phase(), FollowerPhase::AwaitInventory);
                // The session passes on what the leader sent; the shell's check of it against
                // the copy's own lineage is the integration tests' (it reads the disk).
                let _ = lineage;
                self.index = index.iter().map(|(p, _)| p.clone()).collect();
                let cuts: HashMap<_, _> = index.into_iter().collect();
                self.held.retain(|p, _| cuts.contains_key(p));
                let mut haves: Vec<HaveEntry> = self
                    .files
                    .iter()
                    .map(|(path, b)| {
                        let len_bytes = b.len() as u64;
                        let held = match (instance, self.held.get(path), cuts.get(path)) {
                            (Some(_), Some(&(position, stamp)), Some(cut))
                                if !self.lossy
                                    && cut.admits_held(len_bytes, position)
                                    && self.stamps.get(path) == Some(&stamp) =>
                            {
                                Some(position)
                            }
                            _ => None,
                        };
                        let proof = match (held, cuts.get(path)) {
                            (Some(position), _) => HaveProof::Held { position },
                            (None, Some(cut)) => {
                                HaveProof::Digest(sha1(&b[..b.len().min(cut.len_bytes as usize)]))
                            }
                            (None, None) => HaveProof::Digest([0; 20]),
                        };
                        HaveEntry {
                            path: path.clone(),
                            len_bytes,
                            proof,
                        }
                    })
                    .collect();
                haves.sort_by(|a, b| a.path.cmp(&b.path));
                self.held_sent += haves
                    .iter()
                    .filter(|h| matches!(h.proof, HaveProof::Held { .. }))
                    .count() as u64;
                self.session.inventory(haves);
                assert_eq!(self.session.phase(), FollowerPhase::Streaming);
            }
            FollowerAction::Write {
                path,
                temp,
                offset,
                len_bytes,
            } => {
                assert!(len_bytes <= u64::from(MAX_DATA_BYTES));
                assert!(offset.checked_add(len_bytes).is_some());
                if temp {
                    assert!(
                        self.wholes.contains_key(&path),
                        "TEMP write to {path} without BEGIN_WHOLE"
                    );
                    self.temps.entry(path.clone()).or_default();
                }
                if len_bytes > 0 {
                    self.pending = Some(PendingWrite {
                        path,
                        temp,
                        offset,
                        left: len_bytes,
                    });
                }
            }
            FollowerAction::BeginWhole { path, len_bytes } => {
                self.wholes.insert(path.clone(), len_bytes);
                assert!(self.wholes.len() <= ferry::frame::MAX_WHOLE_IN_FLIGHT);
                self.temps.insert(path, Vec::new());
            }
            FollowerAction::CommitWhole { path, len_bytes } => {
                assert_eq!(
                    self.wholes.remove(&path),
                    Some(len_bytes),
                    "COMMIT_WHOLE of {path} does not match its BEGIN_WHOLE"
                );
                let temp = self.temps.remove(&path).unwrap_or_default();
                if !self.lossy && temp.len() as u64 != len_bytes {
                    // As `follower::apply` does.
                    return Err(SessionError::OutOfOrder {
                        frame: "COMMIT_WHOLE",
                        why: format!(
                            "{path}: the temp file holds {} bytes, BEGIN_WHOLE said {len_bytes}",
                            temp.len()
                        ),
                    });
                }
                self.files.insert(path.clone(), temp);
                self.changed(&path);
            }
            FollowerAction::Truncate { path, len_bytes } => {
                if let Some(b) = self.files.get_mut(&path) {
                    b.truncate(usize::try_from(len_bytes).unwrap_or(usize::MAX));
                }
                self.changed(&path);
            }
            FollowerAction::Born { .. } => {}
            FollowerAction::Delete { path } => {
                // A DELETE also ends a whole-file transfer of the path (docs/PROTOCOL.md).
                self.wholes.remove(&path);
                self.temps.remove(&path);
                self.files.remove(&path);
                self.changed(&path);
            }
            FollowerAction::Rename { from, to } => {
                // So does a RENAME, of the path renamed to.
                self.wholes.remove(&to);
                self.temps.remove(&to);
                let Some(bytes) = self.files.remove(&from) else {
                    // As `follower::apply` does.
                    return Err(SessionError::Io(format!(
                        "cannot rename {from}: no such file"
                    )));
                };
                self.files.insert(to.clone(), bytes);
                self.changed(&from);
                self.changed(&to);
            }
            FollowerAction::Mark {
                position,
                sync_done,
            } => {
                if let Some(&(last, _)) = self.marks.last() {
                    assert!(
                        position >= last,
                        "MARK {position} after {last} was accepted"
                    );
                }
                assert_eq!(self.session.watermarks()[0], position);
                if sync_done {
                    assert_eq!(self.session.sync_done_position(), Some(position));
                }
                self.marks.push((position, sync_done));
                if let Some(claims) = &self.claims {
                    claims.check(position, &self.files);
                }
                self.session.written(position);
                // The record looks at what changed since its last look (the whole index at
                // the end of the initial sync), unless a look is still running.
                if sync_done {
                    self.touched.extend(self.index.drain(..));
                }
                if self.looking.is_none() {
                    self.looking = Some((position, self.touched.drain().collect()));
                }
            }
        }
        Ok(())
    }
}

/// What each MARK claims, from the changes a script recorded: a MARK at position M says the
/// follower holds every change recorded at or below M. Checked at every MARK the follower
/// reads, in wire order (`FollowerShell::step`).
///
/// Per file, the model keeps each state recorded since the harness last forgot it, with the
/// position that recorded it: appended to (those that moved the position: a MARK at an empty
/// append's position may be one sent before it), rewritten whole (a replace, or a cut reported
/// as one), or deleted. At a MARK the follower must hold the last state recorded at or below it
/// or one recorded later (the leader ships what the file is when it gets to it); after an
/// append, any file that begins with the appended bytes. If the file was then cut back or
/// deleted behind the catalog (a change not yet reported), each state it has had since also
/// passes (or a prefix of one: a file rewritten twice behind the catalog while it was being sent
/// whole); a MARK claiming bytes the follower never got while they vanished fails here. When
/// such a file is recorded as the disk has it (reported, or recorded by the leader after
/// `VANISHED_HOLD_TIMEOUT_MS`), the harness forgets what it claimed before and claims that
/// state from then on. It forgets a file too when behind the catalog it becomes at least as
/// long as recorded (rewritten, or grown by appends): that is outside the append-only contract,
/// and its new bytes may ship as a tail before the change is reported.
#[derive(Default)]
pub struct Claims {
    files: HashMap<RelPath, FileClaims>,
}

#[derive(Default)]
struct FileClaims {
    /// Each recorded state, in order: (the position after it, how it was made, the file's
    /// bytes then, `None`: deleted).
    recorded: Vec<(u64, Made, Option<Vec<u8>>)>,
    /// The file's states since, changed behind the catalog (`None`: deleted).
    since: Vec<Option<Vec<u8>>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Made {
    Appended,
    Whole,
}

impl Claims {
    /// An append recorded at `position`, after which the file holds `bytes`.
    pub fn appended(&mut self, path: &RelPath, position: u64, bytes: &[u8]) {
        self.recorded(path, position, Made::Appended, Some(bytes));
    }

    /// `path` rewritten whole to `bytes`, or deleted (`None`), recorded at `position`.
    pub fn rewritten(&mut self, path: &RelPath, position: u64, bytes: Option<&[u8]>) {
        if self
            .files
            .get(path)
            .is_some_and(|file| !file.since.is_empty())
        {
            // What it held behind the catalog is gone from the disk, and the states the model
            // kept for it may still ship: forgotten until the next change.
            self.forget(path);
        }
        self.recorded(path, position, Made::Whole, bytes);
    }

    fn recorded(&mut self, path: &RelPath, position: u64, made: Made, bytes: Option<&[u8]>) {
        let file = self.files.entry(path.clone()).or_default();
        if !file.since.is_empty() {
            // Appends to a file changed behind the catalog prove nothing until it is reported.
            return;
        }
        file.recorded
            .push((position, made, bytes.map(<[u8]>::to_vec)));
    }

    /// `path` was cut back, rewritten or deleted (`None`) behind the catalog.
    pub fn changed_behind(&mut self, path: &RelPath, now: Option<&[u8]>) {
        if let Some(file) = self.files.get_mut(path) {
            file.since.push(now.map(<[u8]>::to_vec));
        }
    }

    /// A change to `path` was recorded that the model cannot place (or the harness can no
    /// longer say what it holds).
    pub fn forget(&mut self, path: &RelPath) {
        self.files.remove(path);
    }

    /// The follower read a MARK at `position` and holds `files`.
    fn check(&self, position: u64, files: &Files) {
        for (path, claims) in &self.files {
            let Some(last) = claims
                .recorded
                .iter()
                .rposition(|&(at, _, _)| at <= position)
            else {
                continue;
            };
            let have = files.get(path).map(Vec::as_slice);
            let (_, made, claimed) = &claims.recorded[last];
            let appended = *made == Made::Appended
                && matches!((claimed, have), (Some(c), Some(h)) if h.starts_with(c));
            let recorded_later = claims.recorded[last..]
                .iter()
                .any(|(_, _, state)| state.as_deref() == have);
            let a_later_state = claims.since.iter().any(|state| match (state, have) {
                (None, None) => true,
                (Some(state), Some(have)) => {
                    state == have || (!have.is_empty() && state.starts_with(have))
                }
                _ => false,
            });
            assert!(
                appended || recorded_later || a_later_state,
                "MARK {position} claims {path} as {made:?} to {:?} bytes; the follower holds \
                 {:?} bytes, the file was recorded at {:?} bytes since, and has been {:?} \
                 bytes long behind the catalog",
                claimed.as_ref().map(Vec::len),
                have.map(<[u8]>::len),
                claims.recorded[last + 1..]
                    .iter()
                    .map(|(_, _, s)| s.as_ref().map(Vec::len))
                    .collect::<Vec<_>>(),
                claims
                    .since
                    .iter()
                    .map(|s| s.as_ref().map(Vec::len))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// How two sets of files differ, one line per path (empty when they are equal).
pub fn files_diff(leader: &Files, follower: &Files) -> String {
    let mut paths: Vec<&RelPath> = leader.keys().chain(follower.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut out = String::new();
    for path in paths {
        let (l, f) = (leader.get(path), follower.get(path));
        let line = match (l, f) {
            (Some(l), Some(f)) if l == f => continue,
            (Some(l), Some(f)) => {
                let at = l.iter().zip(f).take_while(|(a, b)| a == b).count();
                format!(
                    "{path}: leader {} bytes, follower {} bytes, first difference at {at}",
                    l.len(),
                    f.len()
                )
            }
            (Some(l), None) => format!("{path}: leader {} bytes, follower lacks it", l.len()),
            (None, Some(f)) => format!("{path}: follower {} bytes, leader lacks it", f.len()),
            (None, None) => continue,
        };
        out.push_str("\n  ");
        out.push_str(&line);
    }
    out
}
