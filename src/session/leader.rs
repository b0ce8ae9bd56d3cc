//! The leader's end of one follower connection, as a sans-IO state machine.
//!
//! Bytes from the socket go in through `handle_input`; frames to send accumulate in an output
//! buffer the shell drains with `take_output`. File payloads never pass through here: for each
//! DATA frame, `poll_transmit` puts the frame header in the output and returns a
//! `Transmit::Payload` telling the shell which range of which file to splice after it.
//!
//! Per follower the session keeps only what each file looked like when last shipped
//! (`sent`: generation and length) and a FIFO of paths changed since (`dirty`): memory grows
//! with the number of files, never with the bytes the follower is behind. The data dir is the
//! queue; a slow follower simply finds more to read when its socket is ready.
//!
//! Changed paths wait in a FIFO, each once, and are shipped in turn, each as it is when its turn
//! comes. Whenever new changes have been noted, a marker records the catalog's position and how
//! far the FIFO reaches then: once every path up to there has been shipped (each at least as new
//! as the marker), every change up to that position is on the wire, and a MARK says so. Within
//! a batch, the new paths are queued in the order of their first change, each with a marker at
//! the position just before it: once the paths ahead of it are shipped, every change made before
//! its own first one is. So a session working through a backlog, even one taken in a single
//! look, marks it as it drains, not once at the end. The first MARK after the inventory ends the
//! initial sync: `SYNC_DONE`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{queue_error, take_preamble, SessionError};
use crate::auth::{tags_equal, Secret};
use crate::catalog::{Catalog, CatalogEntry, Move};
use crate::fork_chain::ForkChain;
use crate::frame::{
    Digest, Durability, Frame, InstanceId, LineageId, Nonce, Preamble, CAPABILITIES,
    HANDSHAKE_TIMEOUT_MS, KEEPALIVE_INTERVAL_MS, MAX_DATA_BYTES, MAX_FORK_CHAIN,
    MAX_FRAME_BODY_BYTES, MAX_INVENTORY_FILES, PREAMBLE_BYTES, VANISHED_HOLD_TIMEOUT_MS,
};
use crate::lag::LagTracker;
use crate::paths::RelPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderPhase {
    AwaitPreamble,
    AwaitAuth,
    AwaitInventory,
    /// HAVE_END arrived; the shell is still hashing prefixes `digest_requests` asked for.
    AwaitDigests,
    Streaming,
    Closed,
}

/// The leader must hash the first `len_bytes` of `path` to compare with the follower's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestRequest {
    pub path: RelPath,
    pub len_bytes: u64,
}

/// What the shell must do next to move file bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Open `path` (for `generation`), fstat it, and call `begin_whole` or `whole_unavailable`.
    OpenWhole { path: RelPath, generation: u64 },
    /// Send everything in the output, then exactly `len_bytes` of the file at `offset`.
    Payload {
        path: RelPath,
        generation: u64,
        offset: u64,
        len_bytes: u64,
    },
    /// The bytes of these files vanished (`payload_unavailable`, `whole_unavailable`) and the
    /// MARKs have repeated the last claim for `VANISHED_HOLD_TIMEOUT_MS` since, with no change
    /// reported that explains it: record each file as it is on disk now (replaced at its
    /// length, or deleted), in the catalog the writers feed, as its writer should have.
    /// Asked again after another timeout while the hold lasts.
    RecordUnreported { paths: Vec<RelPath> },
}

/// Moves a rename may wait on, one behind the other (`LeaderSession::try_move`): a chain of
/// renames longer than this, or a cycle, ships the rest whole.
const MOVE_CHAIN_MAX: usize = 8;

/// The generation of a follower's copy that matches none of ours (catalog generations start at 1).
const GENERATION_NONE: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    generation: u64,
    len_bytes: u64,
}

#[derive(Debug)]
enum Job {
    AwaitOpen {
        path: RelPath,
        generation: u64,
    },
    Whole {
        path: RelPath,
        generation: u64,
        offset: u64,
        len_bytes: u64,
    },
    Tail {
        path: RelPath,
        generation: u64,
        offset: u64,
        end: u64,
    },
}

impl Job {
    /// Whether the catalog no longer holds the generation this job ships: the file was
    /// rewritten or deleted, and that change recorded, since the job was planned.
    fn superseded(&self, catalog: &Catalog) -> bool {
        match self {
            Job::Whole {
                path, generation, ..
            }
            | Job::Tail {
                path, generation, ..
            } => catalog.get(path).map(|entry| entry.generation) != Some(*generation),
            Job::AwaitOpen { .. } => false,
        }
    }
}

#[derive(Debug)]
struct Have {
    len_bytes: u64,
    proof: Proof,
}

/// Why a follower says its copy matches ours.
#[derive(Debug)]
enum Proof {
    /// HAVE: the digest of its first `min(f, L)` bytes.
    Digest(Digest),
    /// HAVE_HELD: unchanged since a MARK at `position` of leader `instance`.
    Held { position: u64, instance: InstanceId },
}

/// How a follower's inventory was compared (for the log and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InventoryReport {
    /// Files the follower vouched for by its held record, accepted without hashing.
    pub held_accepted: u64,
    /// Held records refused (another instance, a generation born since, a longer copy): those
    /// files are sent whole.
    pub held_refused: u64,
    /// Files compared by digest: the leader hashed its prefix of each.
    pub digests_compared: u64,
}

/// A position to MARK once the FIFO of changed paths has been shipped up to a point.
#[derive(Debug, Clone, Copy)]
struct Marker {
    position: u64,
    /// Reached when `LeaderSession::paths_taken` (paths taken off the FIFO) gets here.
    paths_taken_target: u64,
}

/// Markers kept at once (16 bytes each). Past that (a follower far behind, a backlog of many
/// files) the last marker moves on instead of a new one being added: MARKs come further apart,
/// and the state stays per file, never per change.
const MARKERS_MAX: usize = 1024;

pub struct LeaderSession {
    secret: Secret,
    /// During a rotation, the secret followers may still hold (`with_previous_secret`).
    previous_secret: Option<Secret>,
    /// The follower authenticated with `previous_secret`.
    used_previous_secret: bool,
    /// The secret the follower authenticated with, once it has: it stays connected only while
    /// the leader holds that secret (`set_secrets`).
    authenticated_with: Option<Secret>,
    leader_nonce: Nonce,
    /// This leader's instance id, sent in INSTANCE and checked in HAVE_HELD.
    instance: InstanceId,
    /// The data dir's lineage, sent in LINEAGE.
    lineage: LineageId,
    /// What this leader's instance goes on from, sent in FORK_OF (`with_forks`).
    forks: ForkChain,
    /// Both offered `FORK` as well as `HELD`.
    fork_in_use: bool,
    /// Both offered `FORK_CHAIN` as well: a FORK_OF per link.
    fork_chain_in_use: bool,
    /// Both preambles offered `HELD`.
    held_in_use: bool,
    /// Both offered `LINEAGE`.
    lineage_in_use: bool,
    /// Both offered `BIRTHS` as well as `HELD`: the index goes as INDEX_BORN.
    births_in_use: bool,
    /// Both offered `BORN` as well: each generation shipped whole or created is announced
    /// with BORN.
    born_in_use: bool,
    /// RENAME frames (`docs/PROTOCOL.md`, *Renames*).
    rename_in_use: bool,
    /// Renames noted and not yet planned, by the path renamed to: each moves the follower's
    /// copy instead of shipping the file whole, if it holds all of it when `to` is planned.
    moves: HashMap<RelPath, Move>,
    /// The same renames by the path renamed from, to move a copy before `from` is planned.
    moves_by_from: HashMap<RelPath, RelPath>,
    inventory_report: InventoryReport,
    phase: LeaderPhase,
    out: Vec<u8>,
    /// A MARK is among the bytes in `out`: they must leave at once, not wait in the socket for
    /// what follows (see `output_has_mark`).
    mark_in_output: bool,
    /// The index as sent: each file's cut and generation.
    index: HashMap<RelPath, CatalogEntry>,
    index_position: u64,
    haves: HashMap<RelPath, Have>,
    haves_count: u64,
    /// Prefixes to hash, asked for as each HAVE arrives (so the leader hashes while the
    /// follower still hashes the rest of its inventory), not yet taken by the shell.
    digest_requests: Vec<DigestRequest>,
    /// Taken by the shell and not yet answered in `digests_ready`.
    digests_outstanding: usize,
    /// The answers so far: our digest of the prefix each HAVE asked for.
    digests: HashMap<RelPath, Option<Digest>>,
    /// HAVE_END arrived with nothing left to hash: `digest_requests` returns an empty list
    /// once, whose `digests_ready` plans the sync.
    plan_due: bool,
    sent: HashMap<RelPath, Sent>,
    /// Each path with the position just before its first change noted since it was queued
    /// (`FileChange::since`).
    dirty: VecDeque<(RelPath, u64)>,
    dirty_set: HashSet<RelPath>,
    job: Option<Job>,
    /// Paths taken off `dirty` so far, to tell when a marker is reached.
    paths_taken: u64,
    markers: VecDeque<Marker>,
    /// Paths whose bytes were gone when they were to be sent (the file shrank, was replaced or
    /// deleted) and whose change has not been noted since. While any is here no MARK claims a
    /// position beyond the last one sent: the follower never got those bytes, and holds the
    /// file's next state only once that change is noted and shipped.
    vanished: HashSet<RelPath>,
    /// No marker below this position: above the change of every file whose bytes vanished, since
    /// a MARK between those bytes and that change would claim bytes the follower never gets.
    markers_from: u64,
    /// No MARK claims a position above this (`set_mark_ceiling`).
    mark_ceiling: u64,
    /// Since when MARKs have repeated the last claim because bytes vanished: set at the first
    /// `poll_transmit` of a hold, moved on at each `RecordUnreported`, cleared when a MARK
    /// claims more. (Not cleared by a change that merely queues a vanished file again: an
    /// append to a file still shorter than the catalog says explains nothing.)
    held_since: Option<Instant>,
    sync_done_sent: bool,
    node_id: Option<String>,
    mark_last: Option<(u64, Instant)>,
    lag: LagTracker,
    bytes_payload_total: u64,
    /// Whole-file transfers committed.
    files_whole_total: u64,
    /// Copies moved with RENAME instead of shipped.
    files_renamed_total: u64,
    /// The initial sync's payload, as planned when the inventory was compared: (bytes
    /// already sent when it started, bytes it plans to send).
    sync_plan: Option<(u64, u64)>,
    /// Where the last DATA header starts in `out`, so `payload_unavailable` can take it back.
    data_header_at: usize,
    /// The payload bytes of that DATA frame.
    data_last_bytes: u64,
}

impl LeaderSession {
    /// A session for a follower that just connected: the preamble and CHALLENGE are queued.
    pub fn new(
        secret: Secret,
        leader_nonce: Nonce,
        ack_timeout: Duration,
        instance: InstanceId,
        lineage: LineageId,
    ) -> LeaderSession {
        let mut out = Preamble::ours().encode().to_vec();
        Frame::Challenge { leader_nonce }.encode(&mut out);
        LeaderSession {
            secret,
            previous_secret: None,
            used_previous_secret: false,
            authenticated_with: None,
            leader_nonce,
            instance,
            lineage,
            forks: ForkChain::none(),
            fork_in_use: false,
            fork_chain_in_use: false,
            held_in_use: false,
            lineage_in_use: false,
            births_in_use: false,
            born_in_use: false,
            rename_in_use: false,
            moves: HashMap::new(),
            moves_by_from: HashMap::new(),
            inventory_report: InventoryReport::default(),
            phase: LeaderPhase::AwaitPreamble,
            out,
            index: HashMap::new(),
            index_position: 0,
            haves: HashMap::new(),
            haves_count: 0,
            digest_requests: Vec::new(),
            digests_outstanding: 0,
            digests: HashMap::new(),
            plan_due: false,
            sent: HashMap::new(),
            dirty: VecDeque::new(),
            dirty_set: HashSet::new(),
            job: None,
            paths_taken: 0,
            markers: VecDeque::new(),
            vanished: HashSet::new(),
            markers_from: 0,
            held_since: None,
            mark_ceiling: u64::MAX,
            sync_done_sent: false,
            node_id: None,
            mark_last: None,
            mark_in_output: false,
            lag: LagTracker::new(ack_timeout),
            bytes_payload_total: 0,
            files_whole_total: 0,
            files_renamed_total: 0,
            sync_plan: None,
            data_header_at: 0,
            data_last_bytes: 0,
        }
    }

    /// Also accepts followers that authenticate with `previous` (a secret being rotated out):
    /// `docs/PROTOCOL.md`, AUTH.
    pub fn with_previous_secret(mut self, previous: Option<Secret>) -> LeaderSession {
        self.previous_secret = previous;
        self
    }

    /// This leader's instance goes on from the chain `forks` (`docs/PROTOCOL.md`, *After a
    /// failover*, *After failovers in a row*): a follower offering `FORK` is told its first
    /// link in FORK_OF, one offering `FORK_CHAIN` each link.
    pub fn with_forks(mut self, forks: ForkChain) -> LeaderSession {
        self.forks = forks;
        self
    }

    /// The leader's secrets changed while this session runs (a rotation: `docs/PROTOCOL.md`,
    /// AUTH). Before AUTH, the follower is checked against these; after, an error once they no
    /// longer hold the secret it authenticated with (the caller ends the session with it).
    pub fn set_secrets(
        &mut self,
        current: Secret,
        previous: Option<Secret>,
    ) -> Result<(), SessionError> {
        if let Some(used) = &self.authenticated_with {
            if *used != current && previous.as_ref() != Some(used) {
                return Err(SessionError::AuthFailed(
                    "the secret this follower authenticated with was rotated out: the leader \
                     no longer accepts it"
                        .into(),
                ));
            }
            self.used_previous_secret = *used != current;
        }
        self.secret = current;
        self.previous_secret = previous;
        Ok(())
    }

    /// Whether the follower authenticated with the previous secret, not the current one.
    pub fn used_previous_secret(&self) -> bool {
        self.used_previous_secret
    }

    /// No MARK from now on claims a position above `position`: the reservation of the
    /// leader's record (`docs/PROTOCOL.md`, *The leader's record*), which every MARK of the
    /// instance must stay under. A MARK due above it is sent at it (claiming less), and the
    /// rest once the ceiling is raised. `u64::MAX` (the start) is no ceiling.
    pub fn set_mark_ceiling(&mut self, position: u64) {
        self.mark_ceiling = position;
    }

    pub fn phase(&self) -> LeaderPhase {
        self.phase
    }

    pub fn lag(&self) -> &LagTracker {
        &self.lag
    }

    /// Payload bytes this session has asked the shell to send.
    pub fn bytes_payload_total(&self) -> u64 {
        self.bytes_payload_total
    }

    /// The id the follower gave in NODE_ID, if any.
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Whole-file transfers committed on this connection.
    pub fn files_whole_total(&self) -> u64 {
        self.files_whole_total
    }

    /// Copies the follower moved (RENAME) instead of getting them whole, on this connection.
    pub fn files_renamed_total(&self) -> u64 {
        self.files_renamed_total
    }

    /// While the initial sync runs: (payload bytes sent for it, bytes planned). `None` before
    /// the inventory was compared and once the sync's MARK is sent.
    pub fn sync_progress(&self) -> Option<(u64, u64)> {
        if self.sync_done_sent {
            return None;
        }
        let (start, planned) = self.sync_plan?;
        Some((self.bytes_payload_total - start, planned))
    }

    /// How the follower's inventory was compared; complete once the sync is planned.
    pub fn inventory_report(&self) -> InventoryReport {
        self.inventory_report
    }

    /// The MARK that ends the initial sync has been sent.
    pub fn sync_done_sent(&self) -> bool {
        self.sync_done_sent
    }

    /// The bytes to send, in order; the buffer is left empty.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.mark_in_output = false;
        std::mem::take(&mut self.out)
    }

    /// The output holds a MARK. The shell must not hold such output back for the payload that
    /// follows it (MSG_MORE): the follower acks when it reads the MARK, and while the leader
    /// keeps streaming, held bytes leave only once a full TCP segment (64 KiB on loopback) has
    /// gathered behind them.
    pub fn output_has_mark(&self) -> bool {
        self.mark_in_output
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Ends the session because of `err`: an ERROR frame naming it is queued for the follower.
    pub fn fail(&mut self, err: &SessionError) {
        if self.phase != LeaderPhase::Closed {
            queue_error(&mut self.out, err);
            self.phase = LeaderPhase::Closed;
            self.lag.on_disconnect();
        }
    }

    /// The connection is gone.
    pub fn on_disconnect(&mut self) {
        self.phase = LeaderPhase::Closed;
        self.lag.on_disconnect();
    }

    /// Feeds bytes received from the follower. Returns how many were consumed (the rest is an
    /// incomplete frame to be fed again with more bytes). On error, an ERROR frame is queued and
    /// the session is closed: send the output, then close the connection.
    pub fn handle_input(
        &mut self,
        buf: &[u8],
        catalog: &Catalog,
        now: Instant,
    ) -> Result<usize, SessionError> {
        let result = self.handle_input_inner(buf, catalog, now);
        if let Err(err) = &result {
            self.fail(err);
        }
        result
    }

    fn handle_input_inner(
        &mut self,
        buf: &[u8],
        catalog: &Catalog,
        now: Instant,
    ) -> Result<usize, SessionError> {
        let mut consumed = 0;
        if self.phase == LeaderPhase::AwaitPreamble {
            match take_preamble(buf)? {
                None => return Ok(0),
                Some(peer) => {
                    let in_use = peer.in_use(CAPABILITIES);
                    (self.held_in_use, self.births_in_use) = (in_use.held, in_use.births);
                    self.lineage_in_use = in_use.lineage;
                    self.born_in_use = in_use.born;
                    self.fork_in_use = in_use.fork;
                    self.fork_chain_in_use = in_use.fork_chain;
                    self.rename_in_use = in_use.rename;
                    consumed = PREAMBLE_BYTES;
                    self.phase = LeaderPhase::AwaitAuth;
                }
            }
        }
        while self.phase != LeaderPhase::Closed {
            let Some((frame, used)) = Frame::decode(&buf[consumed..])? else {
                break;
            };
            consumed += used;
            self.handle_frame(frame, catalog, now)?;
        }
        Ok(consumed)
    }

    fn handle_frame(
        &mut self,
        frame: Frame,
        catalog: &Catalog,
        now: Instant,
    ) -> Result<(), SessionError> {
        if let Frame::Error { code, message } = frame {
            return Err(SessionError::Peer { code, message });
        }
        match (self.phase, frame) {
            (
                LeaderPhase::AwaitAuth,
                Frame::Auth {
                    follower_nonce,
                    follower_mac,
                },
            ) => {
                let nonces = (&self.leader_nonce, &follower_nonce);
                let current =
                    tags_equal(&self.secret.follower_tag(nonces.0, nonces.1), &follower_mac);
                // Both tags computed and compared whenever there are two secrets: the time
                // taken does not tell which one matched.
                let previous = self
                    .previous_secret
                    .as_ref()
                    .filter(|p| tags_equal(&p.follower_tag(nonces.0, nonces.1), &follower_mac));
                let secret = match (current, previous) {
                    (true, _) => &self.secret,
                    (false, Some(previous)) => previous,
                    (false, None) => {
                        return Err(SessionError::AuthFailed(
                            "wrong secret: the follower's HMAC does not match ours".into(),
                        ))
                    }
                };
                let leader_mac = secret.leader_tag(nonces.0, nonces.1);
                self.used_previous_secret = !current;
                self.authenticated_with = Some(secret.clone());
                Frame::Welcome { leader_mac }.encode(&mut self.out);
                if self.held_in_use {
                    Frame::Instance {
                        instance: self.instance,
                    }
                    .encode(&mut self.out);
                }
                let links = match (self.fork_in_use, self.fork_chain_in_use) {
                    (false, _) => 0,
                    (true, false) => 1,
                    (true, true) => MAX_FORK_CHAIN,
                };
                for link in self.forks.links().iter().take(links) {
                    Frame::ForkOf {
                        instance: link.from,
                        position: link.position,
                    }
                    .encode(&mut self.out);
                }
                if self.lineage_in_use {
                    Frame::Lineage {
                        lineage: self.lineage,
                    }
                    .encode(&mut self.out);
                }
                self.send_index(catalog);
                self.phase = LeaderPhase::AwaitInventory;
                Ok(())
            }
            (
                LeaderPhase::AwaitInventory,
                Frame::Have {
                    len_bytes,
                    digest,
                    path,
                },
            ) => {
                self.count_have("HAVE", &path)?;
                // Both sides hold it: our digest of the prefix the follower's covers.
                if let Some(cut) = self.index.get(&path) {
                    self.digest_requests.push(DigestRequest {
                        path: path.clone(),
                        len_bytes: len_bytes.min(cut.len_bytes),
                    });
                }
                let proof = Proof::Digest(digest);
                self.haves.insert(path, Have { len_bytes, proof });
                Ok(())
            }
            (
                LeaderPhase::AwaitInventory,
                Frame::HaveHeld {
                    len_bytes,
                    position,
                    instance,
                    path,
                },
            ) => {
                if !self.held_in_use {
                    return Err(SessionError::OutOfOrder {
                        frame: "HAVE_HELD",
                        why: "the HELD capability is not in use on this connection".into(),
                    });
                }
                self.count_have("HAVE_HELD", &path)?;
                let proof = Proof::Held { position, instance };
                self.haves.insert(path, Have { len_bytes, proof });
                Ok(())
            }
            (LeaderPhase::AwaitInventory, Frame::NodeId { id }) if self.node_id.is_none() => {
                self.node_id = Some(id);
                Ok(())
            }
            (LeaderPhase::AwaitInventory, Frame::HaveEnd { count, durability }) => {
                if count != self.haves_count {
                    return Err(SessionError::OutOfOrder {
                        frame: "HAVE_END",
                        why: format!(
                            "it counts {count} HAVE frames but {} arrived",
                            self.haves_count
                        ),
                    });
                }
                self.lag.set_durability(durability);
                self.phase = LeaderPhase::AwaitDigests;
                self.plan_due = self.digests_outstanding == 0 && self.digest_requests.is_empty();
                Ok(())
            }
            (
                LeaderPhase::AwaitDigests | LeaderPhase::Streaming,
                Frame::Ack {
                    received,
                    written,
                    synced,
                },
            ) => self.on_ack([received, written, synced], now),
            (_, frame) => Err(SessionError::out_of_order(
                &frame,
                format!("not allowed while the leader is in phase {:?}", self.phase),
            )),
        }
    }

    /// One more HAVE or HAVE_HELD for `path`: within `MAX_INVENTORY_FILES`, and the first for it.
    fn count_have(&mut self, frame: &'static str, path: &RelPath) -> Result<(), SessionError> {
        self.haves_count += 1;
        if self.haves_count > MAX_INVENTORY_FILES {
            return Err(SessionError::Limit(format!(
                "more than MAX_INVENTORY_FILES ({MAX_INVENTORY_FILES}) HAVE frames"
            )));
        }
        if self.haves.contains_key(path) {
            return Err(SessionError::OutOfOrder {
                frame,
                why: format!("a second HAVE for {path} in one inventory"),
            });
        }
        Ok(())
    }

    /// Whether a held record vouches for the follower's copy (`docs/PROTOCOL.md`, *Held
    /// records*): our instance, a copy no longer than the cut, and a generation born at or
    /// before the MARK it names, which is one this instance had reached.
    fn held_matches(&self, have: &Have, cut: &CatalogEntry, position: u64, of: InstanceId) -> bool {
        of == self.instance
            && have.len_bytes <= cut.len_bytes
            && cut.born_at <= position
            && position <= self.index_position
    }

    fn send_index(&mut self, catalog: &Catalog) {
        let snapshot = catalog.snapshot();
        let count = snapshot.len() as u64;
        for (path, entry) in snapshot {
            let (len_bytes, born_at) = (entry.len_bytes, entry.born_at);
            let frame = if self.births_in_use {
                let path = path.clone();
                Frame::IndexBorn {
                    len_bytes,
                    born_at,
                    path,
                }
            } else {
                let path = path.clone();
                Frame::Index { len_bytes, path }
            };
            frame.encode(&mut self.out);
            self.index.insert(path, entry);
        }
        Frame::IndexEnd { count }.encode(&mut self.out);
        self.index_position = catalog.position();
    }

    /// The prefixes the shell must hash, then pass to `digests_ready`: those of the HAVEs
    /// that arrived since the last call (for each file both sides hold, the first `min(f, L)`
    /// bytes), or, once, an empty list when HAVE_END found nothing left to hash. `None` when
    /// there is nothing to do.
    pub fn digest_requests(&mut self) -> Option<Vec<DigestRequest>> {
        if self.digest_requests.is_empty() && !std::mem::take(&mut self.plan_due) {
            return None;
        }
        self.digests_outstanding += self.digest_requests.len();
        Some(std::mem::take(&mut self.digest_requests))
    }

    /// The leader's digests for requested prefixes, one per request (`None`: the file could
    /// not be read that far). Once HAVE_END has arrived and every request is answered, decides
    /// per file what the follower needs, and starts the initial sync.
    pub fn digests_ready(&mut self, digests: Vec<(RelPath, Option<Digest>)>) {
        if !matches!(
            self.phase,
            LeaderPhase::AwaitInventory | LeaderPhase::AwaitDigests
        ) {
            return;
        }
        self.digests_outstanding = self.digests_outstanding.saturating_sub(digests.len());
        self.digests.extend(digests);
        if self.phase != LeaderPhase::AwaitDigests
            || self.digests_outstanding > 0
            || !self.digest_requests.is_empty()
        {
            return;
        }
        let ours = std::mem::take(&mut self.digests);
        let mut follower_only: Vec<&RelPath> = Vec::new();
        for (path, have) in &self.haves {
            let Some(cut) = self.index.get(path) else {
                follower_only.push(path);
                continue;
            };
            let matches = match have.proof {
                Proof::Digest(digest) => {
                    self.inventory_report.digests_compared += 1;
                    ours.get(path).is_some_and(|d| d.as_ref() == Some(&digest))
                }
                Proof::Held { position, instance } => {
                    let held = self.held_matches(have, cut, position, instance);
                    if held {
                        self.inventory_report.held_accepted += 1;
                    } else {
                        self.inventory_report.held_refused += 1;
                    }
                    held
                }
            };
            if !matches {
                // Shipped whole, into a temp file renamed over it. Until then the follower holds
                // a copy of no generation of ours: recorded so that, if the file is gone before
                // it ships, the follower is told to delete that copy.
                self.sent.insert(
                    path.clone(),
                    Sent {
                        generation: GENERATION_NONE,
                        len_bytes: 0,
                    },
                );
                continue;
            }
            if have.len_bytes > cut.len_bytes {
                Frame::Truncate {
                    len_bytes: cut.len_bytes,
                    path: path.clone(),
                }
                .encode(&mut self.out);
            }
            self.sent.insert(
                path.clone(),
                Sent {
                    generation: cut.generation,
                    len_bytes: have.len_bytes.min(cut.len_bytes),
                },
            );
        }
        follower_only.sort();
        for path in follower_only {
            Frame::Delete { path: path.clone() }.encode(&mut self.out);
        }
        let mut paths: Vec<RelPath> = self.index.keys().cloned().collect();
        paths.sort();
        let planned_bytes: u64 = paths
            .iter()
            .map(|p| {
                let cut = self.index.get(p).map_or(0, |e| e.len_bytes);
                cut - self.sent.get(p).map_or(0, |s| s.len_bytes.min(cut))
            })
            .sum();
        self.sync_plan = Some((self.bytes_payload_total, planned_bytes));
        for path in paths {
            self.note_changed(path, self.index_position);
        }
        self.haves.clear();
        self.phase = LeaderPhase::Streaming;
    }

    /// `path` changed in the catalog, first at `since` (the catalog's position just before:
    /// `FileChange::since`). Call for every change that the catalog passed to the next
    /// `poll_transmit` holds (the shell may pass a copy refreshed with exactly these).
    pub fn note_changed(&mut self, path: RelPath, since: u64) {
        if self.vanished.remove(&path) {
            self.markers_from = self.markers_from.max(since + 1);
        }
        if self.dirty_set.insert(path.clone()) {
            self.dirty.push_back((path, since));
        }
    }

    /// A rename the catalog passed to the next `poll_transmit` recorded (`Catalog::rename`), with
    /// its two changes, which are noted too (`note_changed`). Ignored where `RENAME` is not in
    /// use: `to` ships whole.
    pub fn note_moved(&mut self, mut moved: Move) {
        if !self.rename_in_use {
            return;
        }
        // Renamed on before the follower was told: the follower's copy is still where the
        // first rename found it (`.cleaned` to `.swap` to `.log`, one move).
        if let Some(first) = self.take_move(&moved.from) {
            if first.generation == moved.from_generation {
                moved.from = first.from;
                moved.from_generation = first.from_generation;
            }
        }
        // A later rename of another file to the same path replaces this one's.
        self.take_move(&moved.to);
        self.moves_by_from
            .insert(moved.from.clone(), moved.to.clone());
        self.moves.insert(moved.to.clone(), moved);
    }

    /// The move noted to `to`, taken out of both maps.
    fn take_move(&mut self, to: &RelPath) -> Option<Move> {
        let moved = self.moves.remove(to)?;
        if self.moves_by_from.get(&moved.from) == Some(to) {
            self.moves_by_from.remove(&moved.from);
        }
        Some(moved)
    }

    /// Paths changed and not yet shipped (for tests and metrics).
    pub fn dirty_files(&self) -> usize {
        self.dirty.len()
    }

    /// The next thing to send. Frames go into the output; a `Transmit` asks the shell to open a
    /// file or send a payload. `None`: nothing to do until input, a change or `poll_timeout`.
    pub fn poll_transmit(&mut self, catalog: &Catalog, now: Instant) -> Option<Transmit> {
        if self.phase != LeaderPhase::Streaming {
            return None;
        }
        self.mark_queued(catalog.position());
        loop {
            if let Some(job) = self.job.take() {
                if job.superseded(catalog) {
                    // What is left to read may be the new version's, which the path's queued
                    // change ships instead.
                    self.drop_job(job, 0);
                    self.mark_queued(catalog.position());
                    continue;
                }
                if let Some(t) = self.advance_job(job) {
                    return Some(t);
                }
                continue;
            }
            // Every path queued before the reached markers has been shipped (the job above is
            // done): one MARK for the furthest of them.
            let mut reached = None;
            while let Some(m) = self.markers.front() {
                if m.paths_taken_target > self.paths_taken {
                    break;
                }
                reached = Some(m.position);
                self.markers.pop_front();
            }
            if let Some(position) = reached {
                self.send_mark(position, now);
                continue;
            }
            if let Some((path, _)) = self.dirty.pop_front() {
                self.dirty_set.remove(&path);
                self.paths_taken += 1;
                self.plan_path(path, catalog);
                continue;
            }
            if !self.vanished.is_empty() {
                let since = *self.held_since.get_or_insert(now);
                if now >= since + Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS) {
                    self.held_since = Some(now);
                    let mut paths: Vec<RelPath> = self.vanished.iter().cloned().collect();
                    paths.sort();
                    return Some(Transmit::RecordUnreported { paths });
                }
                // Only a keepalive, which repeats the last claim.
                if self.sync_done_sent && self.keepalive_due(now) {
                    self.send_mark(0, now);
                }
                return None;
            }
            if !self.sync_done_sent {
                // An empty index: the sync is trivially done.
                self.send_mark(catalog.position(), now);
                continue;
            }
            if self.keepalive_due(now) {
                self.send_mark(catalog.position(), now);
            }
            return None;
        }
    }

    /// Whether feeding `input` may authenticate the peer, which sends it the index: where the
    /// session awaits the preamble or AUTH, whether `input` holds a valid preamble (if one is
    /// awaited) and a whole frame after it (or bytes that cannot begin one); true once past the
    /// handshake. Until then the shell feeds the session with an empty catalog, and joins the
    /// writers' changes and copies the catalog only when this says so: a connection that never
    /// authenticates costs the writers nothing.
    pub fn may_authenticate(&self, input: &[u8]) -> bool {
        let rest = match self.phase {
            LeaderPhase::AwaitPreamble => match take_preamble(input) {
                Ok(Some(_)) => &input[PREAMBLE_BYTES..],
                Ok(None) | Err(_) => return false,
            },
            LeaderPhase::AwaitAuth => input,
            _ => return true,
        };
        !matches!(Frame::decode(rest), Ok(None))
    }

    /// Ends a session that has not authenticated `HANDSHAKE_TIMEOUT_MS` after `connected_at`
    /// (an ERROR naming the limit is queued). Only unauthenticated peers are timed: a follower
    /// hashing a large inventory may take as long as it needs.
    pub fn check_handshake_deadline(
        &mut self,
        connected_at: Instant,
        now: Instant,
    ) -> Result<(), SessionError> {
        let handshaking = matches!(
            self.phase,
            LeaderPhase::AwaitPreamble | LeaderPhase::AwaitAuth
        );
        if handshaking
            && now.saturating_duration_since(connected_at)
                >= Duration::from_millis(HANDSHAKE_TIMEOUT_MS)
        {
            let err = SessionError::Limit(format!(
                "no preamble and AUTH within HANDSHAKE_TIMEOUT_MS ({HANDSHAKE_TIMEOUT_MS} ms)"
            ));
            self.fail(&err);
            return Err(err);
        }
        Ok(())
    }

    /// When the shell must call `poll_transmit` again even without input or changes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase != LeaderPhase::Streaming {
            return None;
        }
        let (_, at) = self.mark_last?;
        let keepalive = at + Duration::from_millis(KEEPALIVE_INTERVAL_MS);
        match self.held_since {
            Some(since) if !self.vanished.is_empty() => {
                Some(keepalive.min(since + Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS)))
            }
            _ => Some(keepalive),
        }
    }

    fn keepalive_due(&self, now: Instant) -> bool {
        match self.mark_last {
            None => true,
            Some((_, at)) => now >= at + Duration::from_millis(KEEPALIVE_INTERVAL_MS),
        }
    }

    /// Records that every change up to `position` (the catalog's, whose changes have all been
    /// noted) is shipped once the paths queued now are: each change since the last marker either
    /// queued its path or found it queued already, and a queued path ships as it is when taken.
    fn mark_queued(&mut self, position: u64) {
        if self.dirty.is_empty() || !self.vanished.is_empty() {
            return;
        }
        // The paths queued since the last marker: this batch. Queued in the order of their
        // first change, each (but the first) behind a marker at the position just before it.
        // Not in the initial sync's batch, whose first MARK must be the one that ends it.
        let covered = self
            .markers
            .back()
            .map_or(self.paths_taken, |m| m.paths_taken_target);
        let new_from = covered.saturating_sub(self.paths_taken) as usize;
        if new_from + 1 < self.dirty.len() && (self.sync_done_sent || !self.markers.is_empty()) {
            let mut batch: Vec<(RelPath, u64)> = self.dirty.drain(new_from..).collect();
            batch.sort_by_key(|&(_, since)| since);
            for (i, queued) in batch.into_iter().enumerate() {
                if i > 0 && queued.1 >= self.markers_from {
                    let ahead = self.paths_taken + self.dirty.len() as u64;
                    self.push_marker(queued.1, ahead);
                }
                self.dirty.push_back(queued);
            }
        }
        let target = self.paths_taken + self.dirty.len() as u64;
        self.push_marker(position, target);
    }

    /// A marker at `position`, reached once `paths_taken` gets to `target`.
    fn push_marker(&mut self, position: u64, target: u64) {
        let full = self.markers.len() >= MARKERS_MAX;
        match self.markers.back_mut() {
            // No path queued since the last marker (the changes since went to queued paths),
            // or no room: the last marker covers these changes too.
            Some(last) if last.paths_taken_target >= target || full => {
                last.position = last.position.max(position);
                last.paths_taken_target = last.paths_taken_target.max(target);
            }
            _ => self.markers.push_back(Marker {
                position,
                paths_taken_target: target,
            }),
        }
    }

    fn send_mark(&mut self, position: u64, now: Instant) {
        // Positions on a connection never decrease, even if the shell fed an older catalog (or
        // lowered the ceiling), and never pass the ceiling otherwise.
        let claimed = self.mark_last.map_or(0, |(p, _)| p);
        let position = position.min(self.mark_ceiling).max(claimed);
        if position > claimed {
            // A MARK claims more: whatever vanished has been explained and shipped.
            self.held_since = None;
        }
        let sync_done = !self.sync_done_sent;
        Frame::Mark {
            position,
            sync_done,
        }
        .encode(&mut self.out);
        self.mark_in_output = true;
        self.sync_done_sent = true;
        self.mark_last = Some((position, now));
        self.lag.on_mark_sent(position, sync_done, now);
    }

    /// Compares what the follower holds of `path` with the catalog and plans the difference.
    fn plan_path(&mut self, path: RelPath, catalog: &Catalog) {
        if !self.moves.is_empty() {
            // The follower's copy at `path` moves before anything else changes it there.
            if let Some(to) = self.moves_by_from.get(&path).cloned() {
                self.try_move(&to, catalog, 0);
            }
            if self.moves.contains_key(&path) {
                self.try_move(&path, catalog, 0);
            }
        }
        let current = catalog.get(&path);
        let sent = self.sent.get(&path).copied();
        match (current, sent) {
            (None, None) => {}
            (None, Some(_)) => {
                self.sent.remove(&path);
                Frame::Delete { path }.encode(&mut self.out);
            }
            (Some(cur), Some(s))
                if cur.generation == s.generation && cur.len_bytes == s.len_bytes => {}
            (Some(cur), Some(s))
                if cur.generation == s.generation && cur.len_bytes > s.len_bytes =>
            {
                self.job = Some(Job::Tail {
                    path,
                    generation: cur.generation,
                    offset: s.len_bytes,
                    end: cur.len_bytes,
                });
            }
            // Born by an append, and the follower holds no copy: it goes as appends do, under
            // its real name (DATA creates it); see `docs/PROTOCOL.md`, *Sequence*.
            (Some(cur), None) if cur.born_by_append && cur.len_bytes > 0 => {
                // The DATA that creates it comes next.
                self.announce_birth(&path, cur.born_at);
                self.job = Some(Job::Tail {
                    path,
                    generation: cur.generation,
                    offset: 0,
                    end: cur.len_bytes,
                });
            }
            (Some(cur), _) => {
                self.job = Some(Job::AwaitOpen {
                    path,
                    generation: cur.generation,
                });
            }
        }
    }

    /// Sends the rename noted for `to`, if the follower holds all of the renamed generation at
    /// its old path (as sent) and the catalog still holds that generation at `to` at the same
    /// length (`docs/PROTOCOL.md`, *Renames*); else leaves `to` to be planned as any change. A
    /// copy the follower holds at `to` that a move noted since goes elsewhere moves there first
    /// (`depth`: how many such moves led here; a cycle ends at `MOVE_CHAIN_MAX`, its files
    /// shipped whole).
    fn try_move(&mut self, to: &RelPath, catalog: &Catalog, depth: usize) {
        let Some(moved) = self.take_move(to) else {
            return;
        };
        if self.movable(&moved, catalog).is_none() {
            return;
        }
        if depth < MOVE_CHAIN_MAX {
            if let Some(next) = self.moves_by_from.get(to).cloned() {
                self.try_move(&next, catalog, depth + 1);
            }
        }
        // Looked at again: in a cycle, the move just made replaced the copy at `from`.
        let Some(cur) = self.movable(&moved, catalog) else {
            return;
        };
        self.announce_birth(to, cur.born_at);
        Frame::Rename {
            from: moved.from.clone(),
            to: to.clone(),
        }
        .encode(&mut self.out);
        self.sent.remove(&moved.from);
        let sent = Sent {
            generation: cur.generation,
            len_bytes: cur.len_bytes,
        };
        self.sent.insert(moved.to, sent);
        self.files_renamed_total += 1;
    }

    /// The catalog's entry for `moved.to`, if a RENAME may make the follower's copy of it now:
    /// the follower holds all of the renamed generation at `moved.from` (as sent), the catalog
    /// holds the generation the rename made at `moved.to`, and the frame fits.
    fn movable(&self, moved: &Move, catalog: &Catalog) -> Option<CatalogEntry> {
        let cur = catalog.get(&moved.to)?;
        let held = self.sent.get(&moved.from)?;
        let all_of_it = held.generation == moved.from_generation && held.len_bytes == cur.len_bytes;
        let body_bytes = 1 + 2 + moved.from.as_str().len() + 2 + moved.to.as_str().len();
        let fits = body_bytes <= MAX_FRAME_BODY_BYTES as usize;
        // Renamed away and back (`note_moved`): a new generation all the same, shipped whole.
        let back = moved.from == moved.to;
        (cur.generation == moved.generation && all_of_it && fits && !back).then_some(cur)
    }

    fn advance_job(&mut self, job: Job) -> Option<Transmit> {
        match job {
            Job::AwaitOpen { path, generation } => {
                let t = Transmit::OpenWhole {
                    path: path.clone(),
                    generation,
                };
                self.job = Some(Job::AwaitOpen { path, generation });
                Some(t)
            }
            Job::Whole {
                path,
                generation,
                offset,
                len_bytes,
            } => {
                if offset == len_bytes {
                    Frame::CommitWhole { path: path.clone() }.encode(&mut self.out);
                    self.files_whole_total += 1;
                    self.sent.insert(
                        path,
                        Sent {
                            generation,
                            len_bytes,
                        },
                    );
                    return None;
                }
                let chunk = (len_bytes - offset).min(MAX_DATA_BYTES as u64);
                let t = self.data(&path, generation, true, offset, chunk);
                self.job = Some(Job::Whole {
                    path,
                    generation,
                    offset: offset + chunk,
                    len_bytes,
                });
                Some(t)
            }
            Job::Tail {
                path,
                generation,
                offset,
                end,
            } => {
                if offset == end {
                    self.sent.insert(
                        path,
                        Sent {
                            generation,
                            len_bytes: end,
                        },
                    );
                    return None;
                }
                let chunk = (end - offset).min(MAX_DATA_BYTES as u64);
                let t = self.data(&path, generation, false, offset, chunk);
                self.job = Some(Job::Tail {
                    path,
                    generation,
                    offset: offset + chunk,
                    end,
                });
                Some(t)
            }
        }
    }

    fn data(
        &mut self,
        path: &RelPath,
        generation: u64,
        temp: bool,
        offset: u64,
        len_bytes: u64,
    ) -> Transmit {
        debug_assert!(len_bytes > 0 && len_bytes <= MAX_DATA_BYTES as u64);
        self.data_header_at = self.out.len();
        self.data_last_bytes = len_bytes;
        Frame::Data {
            temp,
            offset,
            data_len: len_bytes as u32,
            path: path.clone(),
        }
        .encode(&mut self.out);
        self.bytes_payload_total += len_bytes;
        Transmit::Payload {
            path: path.clone(),
            generation,
            offset,
            len_bytes,
        }
    }

    /// The file is shorter than the range the last `Transmit::Payload` asked for (it was
    /// truncated or replaced meanwhile; that change is, or will be, reported on its own). Call
    /// before sending anything of the output: the DATA header is taken back and the transfer
    /// of this file dropped. The follower keeps its copy as it was (an unfinished whole-file
    /// transfer stays in its temp file, replaced by the next one), so nothing torn is shown.
    pub fn payload_unavailable(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        self.out.truncate(self.data_header_at);
        self.bytes_payload_total -= self.data_last_bytes;
        // The job's offset is already past the chunk that was not sent.
        self.drop_job(job, self.data_last_bytes);
    }

    /// Gives up the transfer `job`, whose file changed under it: `unsent_bytes` before its
    /// offset did not go out. The follower keeps its copy as it was (an unfinished whole-file
    /// transfer stays in its temp file, replaced by the next one).
    fn drop_job(&mut self, job: Job, unsent_bytes: u64) {
        // This path was not shipped, so no pending marker can be claimed, nor any made before
        // the change that explains it is noted (and queues it again).
        self.markers.clear();
        if let Job::Tail { path, .. } | Job::Whole { path, .. } = &job {
            self.note_vanished(path);
        }
        match job {
            Job::Tail {
                path,
                generation,
                offset,
                ..
            } => {
                let shipped = offset - unsent_bytes;
                self.sent.insert(
                    path,
                    Sent {
                        generation,
                        len_bytes: shipped,
                    },
                );
            }
            Job::Whole { path, .. } => {
                // The follower has this transfer open. Whatever the file's next change, it is
                // sent whole (a new BEGIN_WHOLE replaces the transfer) or, if the file is gone,
                // deleted, and a DELETE ends the transfer on the follower.
                self.sent.insert(
                    path,
                    Sent {
                        generation: GENERATION_NONE,
                        len_bytes: 0,
                    },
                );
            }
            Job::AwaitOpen { .. } => {}
        }
    }

    /// The shell opened the file asked for by `Transmit::OpenWhole`; it is `file_len_bytes` long.
    /// Ships the catalog's length for that generation, or less if the file is shorter (changed
    /// behind the catalog). If the catalog has moved on to another generation, the file was
    /// rewritten or deleted since it was planned: nothing is sent, and its queued change ships
    /// the new version.
    pub fn begin_whole(&mut self, path: &RelPath, file_len_bytes: u64, catalog: &Catalog) {
        let Some(Job::AwaitOpen { generation, .. }) = &self.job else {
            return;
        };
        let generation = *generation;
        let (len_bytes, born_at) = match catalog.get(path) {
            Some(cur) if cur.generation == generation => {
                (cur.len_bytes.min(file_len_bytes), cur.born_at)
            }
            _ => {
                self.whole_unavailable(path);
                return;
            }
        };
        self.announce_birth(path, born_at);
        Frame::BeginWhole {
            len_bytes,
            path: path.clone(),
        }
        .encode(&mut self.out);
        self.job = Some(Job::Whole {
            path: path.clone(),
            generation,
            offset: 0,
            len_bytes,
        });
    }

    /// BORN for the generation of `path` whose first frame comes next, when `BORN` is in use.
    fn announce_birth(&mut self, path: &RelPath, born_at: u64) {
        if self.born_in_use {
            Frame::Born {
                born_at,
                path: path.clone(),
            }
            .encode(&mut self.out);
        }
    }

    /// The file asked for by `Transmit::OpenWhole` is gone; its removal is (or will be) a change
    /// of its own, so nothing is sent now, and no MARK claims the file until that change is
    /// noted.
    pub fn whole_unavailable(&mut self, path: &RelPath) {
        if matches!(&self.job, Some(Job::AwaitOpen { path: p, .. }) if p == path) {
            self.job = None;
            self.markers.clear();
            self.note_vanished(path);
        }
    }

    /// `path`'s bytes were gone when they were to be sent: MARKs hold until its change is
    /// noted, and none is made below that change (if it was noted already, the path is queued
    /// again, with the position before it).
    fn note_vanished(&mut self, path: &RelPath) {
        match self.dirty.iter().find(|(queued, _)| queued == path) {
            Some(&(_, since)) => self.markers_from = self.markers_from.max(since + 1),
            None => {
                self.vanished.insert(path.clone());
            }
        }
    }

    fn on_ack(&mut self, acked: [u64; 3], now: Instant) -> Result<(), SessionError> {
        let [received, written, synced] = acked;
        let why = if !(received >= written && written >= synced) {
            Some("watermarks must satisfy received >= written >= synced".to_string())
        } else if received > self.mark_last.map_or(0, |(p, _)| p) {
            Some(format!("received {received} is beyond the last MARK sent"))
        } else if acked
            .iter()
            .zip(self.lag.acked().iter())
            .any(|(new, old)| new < old)
        {
            Some("a watermark went backwards".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(SessionError::OutOfOrder { frame: "ACK", why });
        }
        self.lag.on_ack(acked, now);
        Ok(())
    }

    /// The level at which this follower acks, once its inventory has arrived.
    pub fn durability(&self) -> Option<Durability> {
        self.lag.durability()
    }
}
