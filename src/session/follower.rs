//! The follower's end of the connection, as a sans-IO state machine.
//!
//! `handle_input` parses frames and returns at most one `FollowerAction` per call: the shell
//! performs it (writes into the data dir, scans the inventory, ...) and then calls again with the
//! rest of its buffer, so actions are applied strictly in wire order. A `Write` action is followed
//! on the wire by its payload: the shell moves those bytes into the file itself (from what it has
//! buffered, then straight from the socket) before feeding more input.
//!
//! The session owns the three ack watermarks. A MARK makes its position `received`; the shell
//! reports `written` once every action before the MARK has been applied (its writes completed),
//! and `synced` after a sync (of what was written) it started once `written` had reached a
//! position. `poll_ack` coalesces: one ACK at most per call, only when the level the follower
//! acks at has advanced.

use std::collections::{HashMap, HashSet};

use super::{queue_error, take_preamble, SessionError};
use crate::auth::{tags_equal, Secret};
use crate::fork_chain::{ForkChain, LinkRefused};
use crate::frame::{
    Digest, Durability, Fork, Frame, InstanceId, LineageId, Nonce, Preamble, CAPABILITIES,
    MAX_FILE_BYTES, MAX_FORK_CHAIN, MAX_INVENTORY_FILES, MAX_POSITION, MAX_WHOLE_IN_FLIGHT,
    PREAMBLE_BYTES, PROTOCOL_VERSION,
};
use crate::paths::RelPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerPhase {
    AwaitPreamble,
    AwaitChallenge,
    AwaitWelcome,
    AwaitIndex,
    /// INDEX_END arrived; the shell is building the inventory.
    AwaitInventory,
    Streaming,
    Closed,
}

/// What the shell must do, in this order, before feeding more input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowerAction {
    /// The leader's index arrived (each path with what the index says of it): scan the data
    /// dir and call `inventory`. `instance`: the leader's, when `HELD` is in use (files the held
    /// record vouches for from this instance may be reported as held instead of by digest,
    /// where `Cut::admits_held`). `lineage`: that of the leader's data dir, when `LINEAGE` is in
    /// use: a copy of another declines (`docs/PROTOCOL.md`, *Lineage*).
    Inventory {
        index: Vec<(RelPath, Cut)>,
        instance: Option<InstanceId>,
        /// With `instance`: the chain of instances it goes on from, from the leader's FORK_OF
        /// frames (files held under a link's instance up to its position count as held under
        /// `instance`).
        forks: ForkChain,
        lineage: Option<LineageId>,
    },
    /// The next `len_bytes` on the wire go to `path` at `offset` (into its temp file if `temp`).
    Write {
        path: RelPath,
        temp: bool,
        offset: u64,
        len_bytes: u64,
    },
    /// Start a whole-file transfer into a new temp file.
    BeginWhole {
        path: RelPath,
        len_bytes: u64,
    },
    /// Check the temp file holds `len_bytes` and rename it over `path`.
    CommitWhole {
        path: RelPath,
        len_bytes: u64,
    },
    Truncate {
        path: RelPath,
        len_bytes: u64,
    },
    /// Remove `path`, and drop the temp file of any whole-file transfer of it in progress.
    Delete {
        path: RelPath,
    },
    /// Rename the copy at `from` to `to` (over any file there), and drop the temp file of any
    /// whole-file transfer of `to` in progress (RENAME).
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// The next generation of `path` to arrive (whole, or created by a DATA at offset 0) was
    /// born at `born_at` (BORN): what the held record keeps with it.
    Born {
        path: RelPath,
        born_at: u64,
    },
    /// Everything up to `position` has been applied; `sync_done` ends the initial sync.
    Mark {
        position: u64,
        sync_done: bool,
    },
}

/// An upper bound on the birth of the generation each of the follower's copies holds, where it
/// knows one (`docs/PROTOCOL.md`, *Across a handoff*): INDEX_BORN's for a file of the index,
/// BORN's for a generation shipped whole or created since. The shell shows it each action
/// before it applies it (`before`), so a birth asked for after a look at a file is never below
/// that of what the look saw. Without `BORN` in use, a copy sent whole or a DATA at offset 0
/// (which may create a file) leaves its birth unknown; with it, every new generation is
/// announced, and a DATA at offset 0 that was not is a tail of the copy the follower holds.
#[derive(Debug, Default)]
pub struct Births {
    known: HashMap<RelPath, u64>,
    /// Paths whose next generation BORN announced, until that generation lands.
    announced: HashSet<RelPath>,
}

impl Births {
    /// The birth recorded for `path`'s copy, if known.
    pub fn get(&self, path: &RelPath) -> Option<u64> {
        self.known.get(path).copied()
    }

    /// Whether `action` can change what `before` keeps. Most actions cannot (payloads past
    /// offset 0, MARKs), and a shell that shares `Births` behind a lock need not take it for
    /// those.
    pub fn concerns(action: &FollowerAction) -> bool {
        matches!(
            action,
            FollowerAction::Inventory { .. }
                | FollowerAction::Born { .. }
                | FollowerAction::CommitWhole { .. }
                | FollowerAction::Delete { .. }
                | FollowerAction::Rename { .. }
                | FollowerAction::Write {
                    temp: false,
                    offset: 0,
                    ..
                }
        )
    }

    /// Takes in `action`, which the shell is about to apply, on a connection where `BORN` is
    /// in use or not (`FollowerSession::born_in_use`).
    pub fn before(&mut self, action: &FollowerAction, born_in_use: bool) {
        match action {
            FollowerAction::Inventory { index, .. } => {
                self.announced.clear();
                self.known = index
                    .iter()
                    .filter_map(|(p, cut)| Some((p.clone(), cut.born_at?)))
                    .collect();
            }
            FollowerAction::Born { path, born_at } => {
                self.known.insert(path.clone(), *born_at);
                self.announced.insert(path.clone());
            }
            // A new generation lands: its birth is known only if BORN announced it.
            FollowerAction::CommitWhole { path, .. } => self.landed(path),
            FollowerAction::Write {
                path,
                temp: false,
                offset: 0,
                ..
            } if !born_in_use || self.announced.contains(path) => self.landed(path),
            FollowerAction::Delete { path } => {
                self.known.remove(path);
                self.announced.remove(path);
            }
            // The copy at `from` is gone; the one at `to` is a new generation, as one shipped
            // whole is.
            FollowerAction::Rename { from, to } => {
                self.known.remove(from);
                self.announced.remove(from);
                self.landed(to);
            }
            _ => {}
        }
    }

    fn landed(&mut self, path: &RelPath) {
        if !self.announced.remove(path) {
            self.known.remove(path);
        }
    }
}

/// What the leader's index says of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The leader's length when it took the index.
    pub len_bytes: u64,
    /// The position the file's generation was born at, when `BIRTHS` is in use (INDEX_BORN).
    pub born_at: Option<u64>,
}

impl Cut {
    /// Whether a copy of `len_bytes`, held since a MARK at `position` of the leader's instance,
    /// may go as HAVE_HELD: the leader's own test (`docs/PROTOCOL.md`, *Held records*), so that
    /// a copy it would refuse and send whole is hashed instead, and only a missing tail is sent.
    /// Without a birth (no `BIRTHS`), only the length can be checked here.
    pub fn admits_held(&self, len_bytes: u64, position: u64) -> bool {
        len_bytes <= self.len_bytes && self.born_at.map_or(true, |born_at| born_at <= position)
    }
}

/// One file the follower holds, as reported in HAVE or HAVE_HELD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaveEntry {
    pub path: RelPath,
    pub len_bytes: u64,
    pub proof: HaveProof,
}

/// Why the follower's copy is what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaveProof {
    /// SHA-1 of its first `min(len_bytes, the leader's cut)` bytes (HAVE).
    Digest(Digest),
    /// Unchanged since a MARK at `position` of the leader instance the Inventory action named
    /// (HAVE_HELD).
    Held { position: u64 },
}

pub struct FollowerSession {
    /// Sent in NODE_ID before the inventory, when set.
    node_id: Option<String>,
    secret: Secret,
    follower_nonce: Nonce,
    pending_leader_nonce: Option<Nonce>,
    durability: Durability,
    phase: FollowerPhase,
    out: Vec<u8>,
    index: Vec<(RelPath, Cut)>,
    wholes: HashMap<RelPath, u64>,
    /// received, written, synced.
    watermarks: [u64; 3],
    acked_level: u64,
    mark_last: u64,
    sync_done_position: Option<u64>,
    sync_done_acked: bool,
    /// HAVE frames queued so far (`inventory_part`), for HAVE_END's count.
    haves_sent: u64,
    /// The capabilities our preamble offers (`offering`).
    offered: u32,
    /// Both preambles offered `HELD`.
    held_in_use: bool,
    /// Both offered `BIRTHS` as well as `HELD`: the index comes as INDEX_BORN.
    births_in_use: bool,
    /// Both offered `BORN` as well: generations shipped whole or created come with BORN.
    born_in_use: bool,
    /// The leader's instance, from INSTANCE.
    instance: Option<InstanceId>,
    /// Both offered `FORK` as well as `HELD`.
    fork_in_use: bool,
    /// Both offered `FORK_CHAIN` as well: a FORK_OF per link.
    fork_chain_in_use: bool,
    /// What the leader's instance goes on from, from FORK_OF.
    forks: ForkChain,
    /// Both offered `LINEAGE`.
    lineage_in_use: bool,
    /// Both offered `RENAME`.
    rename_in_use: bool,
    /// The leader's data dir's lineage, from LINEAGE.
    lineage: Option<LineageId>,
}

impl FollowerSession {
    /// A session about to talk to a leader: the preamble is queued.
    pub fn new(secret: Secret, follower_nonce: Nonce, durability: Durability) -> FollowerSession {
        FollowerSession::with_node_id(secret, follower_nonce, durability, None)
    }

    /// Like `new`, for a follower that names itself to the leader (NODE_ID) as `node_id`.
    pub fn with_node_id(
        secret: Secret,
        follower_nonce: Nonce,
        durability: Durability,
        node_id: Option<String>,
    ) -> FollowerSession {
        FollowerSession {
            node_id,
            secret,
            follower_nonce,
            pending_leader_nonce: None,
            durability,
            phase: FollowerPhase::AwaitPreamble,
            out: Preamble::ours().encode().to_vec(),
            index: Vec::new(),
            wholes: HashMap::new(),
            watermarks: [0; 3],
            acked_level: 0,
            mark_last: 0,
            sync_done_position: None,
            sync_done_acked: false,
            haves_sent: 0,
            offered: CAPABILITIES,
            held_in_use: false,
            births_in_use: false,
            born_in_use: false,
            instance: None,
            fork_in_use: false,
            fork_chain_in_use: false,
            forks: ForkChain::none(),
            lineage_in_use: false,
            rename_in_use: false,
            lineage: None,
        }
    }

    /// Whether both sides offered `BORN` (with `HELD` and `BIRTHS`): every generation shipped
    /// whole or created comes with BORN (`Births`).
    pub fn born_in_use(&self) -> bool {
        self.born_in_use
    }

    /// Offers only those of `capabilities` this build has, as an older build would: for tests
    /// and fuzzing of peers of different versions. Call before any input.
    pub fn offering(mut self, capabilities: u32) -> FollowerSession {
        self.offered = capabilities & CAPABILITIES;
        let preamble = Preamble {
            version: PROTOCOL_VERSION,
            capabilities: self.offered,
        };
        self.out = preamble.encode().to_vec();
        self
    }

    pub fn phase(&self) -> FollowerPhase {
        self.phase
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// received, written, synced.
    pub fn watermarks(&self) -> [u64; 3] {
        self.watermarks
    }

    /// Ends the session because of `err` (for example a write into the data dir failed): an
    /// ERROR naming it is queued for the leader.
    pub fn fail(&mut self, err: &SessionError) {
        if self.phase != FollowerPhase::Closed {
            queue_error(&mut self.out, err);
            self.phase = FollowerPhase::Closed;
        }
    }

    /// Feeds bytes from the leader. Returns how many were consumed and the action to perform
    /// before calling again. For `Write`, the payload is not consumed: the shell takes it.
    pub fn handle_input(
        &mut self,
        buf: &[u8],
    ) -> Result<(usize, Option<FollowerAction>), SessionError> {
        let result = self.handle_input_inner(buf);
        if let Err(err) = &result {
            self.fail(err);
        }
        result
    }

    fn handle_input_inner(
        &mut self,
        buf: &[u8],
    ) -> Result<(usize, Option<FollowerAction>), SessionError> {
        let mut consumed = 0;
        if self.phase == FollowerPhase::AwaitPreamble {
            match take_preamble(buf)? {
                None => return Ok((0, None)),
                Some(peer) => {
                    let in_use = peer.in_use(self.offered);
                    (self.held_in_use, self.births_in_use) = (in_use.held, in_use.births);
                    self.lineage_in_use = in_use.lineage;
                    self.born_in_use = in_use.born;
                    self.fork_in_use = in_use.fork;
                    self.fork_chain_in_use = in_use.fork_chain;
                    self.rename_in_use = in_use.rename;
                    consumed = PREAMBLE_BYTES;
                    self.phase = FollowerPhase::AwaitChallenge;
                }
            }
        }
        while self.phase != FollowerPhase::Closed && self.phase != FollowerPhase::AwaitInventory {
            let Some((frame, used)) = Frame::decode(&buf[consumed..])? else {
                break;
            };
            consumed += used;
            if let Some(action) = self.handle_frame(frame)? {
                return Ok((consumed, Some(action)));
            }
        }
        Ok((consumed, None))
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<Option<FollowerAction>, SessionError> {
        use FollowerPhase as P;
        if let Frame::Error { code, message } = frame {
            return Err(SessionError::Peer { code, message });
        }
        let action = match (self.phase, frame) {
            (P::AwaitChallenge, Frame::Challenge { leader_nonce }) => {
                let follower_mac = self
                    .secret
                    .follower_tag(&leader_nonce, &self.follower_nonce);
                Frame::Auth {
                    follower_nonce: self.follower_nonce,
                    follower_mac,
                }
                .encode(&mut self.out);
                // Kept to check the leader's proof in WELCOME.
                self.pending_leader_nonce = Some(leader_nonce);
                self.phase = P::AwaitWelcome;
                None
            }
            (P::AwaitWelcome, Frame::Welcome { leader_mac }) => {
                let Some(leader_nonce) = self.pending_leader_nonce.take() else {
                    return Err(SessionError::AuthFailed("WELCOME before CHALLENGE".into()));
                };
                let expected = self.secret.leader_tag(&leader_nonce, &self.follower_nonce);
                if !tags_equal(&expected, &leader_mac) {
                    return Err(SessionError::AuthFailed(
                        "the leader's proof does not match: it does not know our secret".into(),
                    ));
                }
                self.phase = P::AwaitIndex;
                None
            }
            (P::AwaitIndex, Frame::Instance { instance })
                if self.held_in_use && self.instance.is_none() && self.index.is_empty() =>
            {
                self.instance = Some(instance);
                None
            }
            (P::AwaitIndex, Frame::ForkOf { instance, position })
                if self.fork_in_use
                    && self.instance.is_some()
                    && (self.fork_chain_in_use || !self.forks.is_fork())
                    && self.index.is_empty() =>
            {
                beyond_max_position("FORK_OF", position)?;
                let link = Fork {
                    from: instance,
                    position,
                };
                match self.forks.push(link) {
                    Ok(()) => None,
                    Err(LinkRefused::TooMany) => {
                        return Err(SessionError::Limit(format!(
                            "more than MAX_FORK_CHAIN ({MAX_FORK_CHAIN}) FORK_OF frames"
                        )))
                    }
                    Err(LinkRefused::AboveTheOneBefore { before }) => {
                        return Err(SessionError::OutOfOrder {
                            frame: "FORK_OF",
                            why: format!(
                                "its position {position} is above the one before's, {before}: \
                                 a fork chain's positions never rise"
                            ),
                        })
                    }
                }
            }
            (P::AwaitIndex, Frame::Lineage { lineage })
                if self.lineage_in_use && self.lineage.is_none() && self.index.is_empty() =>
            {
                self.lineage = Some(lineage);
                None
            }
            (P::AwaitIndex, Frame::Index { len_bytes, path }) => {
                if self.births_in_use {
                    return Err(SessionError::OutOfOrder {
                        frame: "INDEX",
                        why: "the BIRTHS capability is in use on this connection: the index \
                              is INDEX_BORN frames"
                            .into(),
                    });
                }
                let born_at = None;
                self.push_index(path, Cut { len_bytes, born_at })?;
                None
            }
            (
                P::AwaitIndex,
                Frame::IndexBorn {
                    len_bytes,
                    born_at,
                    path,
                },
            ) => {
                if !self.births_in_use {
                    return Err(SessionError::OutOfOrder {
                        frame: "INDEX_BORN",
                        why: "the BIRTHS capability is not in use on this connection".into(),
                    });
                }
                let born_at = Some(born_at);
                self.push_index(path, Cut { len_bytes, born_at })?;
                None
            }
            (P::AwaitIndex, Frame::IndexEnd { count }) => {
                if count != self.index.len() as u64 {
                    return Err(SessionError::OutOfOrder {
                        frame: "INDEX_END",
                        why: format!(
                            "it counts {count} INDEX frames but {} arrived",
                            self.index.len()
                        ),
                    });
                }
                if self.lineage_in_use && self.lineage.is_none() {
                    return Err(SessionError::OutOfOrder {
                        frame: "INDEX_END",
                        why: "the LINEAGE capability is in use on this connection, and no \
                              LINEAGE came before the index"
                            .into(),
                    });
                }
                self.phase = P::AwaitInventory;
                Some(FollowerAction::Inventory {
                    index: std::mem::take(&mut self.index),
                    instance: self.instance,
                    forks: std::mem::take(&mut self.forks),
                    lineage: self.lineage,
                })
            }
            (
                P::Streaming,
                Frame::Data {
                    temp,
                    offset,
                    data_len,
                    path,
                },
            ) => {
                // The decoder refused a range past 2^64 already; saturating, it stays refused.
                let end = offset.saturating_add(u64::from(data_len));
                beyond_max_file_bytes("DATA", &path, end)?;
                if temp && !self.wholes.contains_key(&path) {
                    return Err(SessionError::OutOfOrder {
                        frame: "DATA",
                        why: format!("TEMP data for {path} without BEGIN_WHOLE"),
                    });
                }
                Some(FollowerAction::Write {
                    path,
                    temp,
                    offset,
                    len_bytes: u64::from(data_len),
                })
            }
            (P::Streaming, Frame::BeginWhole { len_bytes, path }) => {
                beyond_max_file_bytes("BEGIN_WHOLE", &path, len_bytes)?;
                if !self.wholes.contains_key(&path) && self.wholes.len() >= MAX_WHOLE_IN_FLIGHT {
                    return Err(SessionError::Limit(format!(
                        "more than MAX_WHOLE_IN_FLIGHT ({MAX_WHOLE_IN_FLIGHT}) whole-file transfers open"
                    )));
                }
                self.wholes.insert(path.clone(), len_bytes);
                Some(FollowerAction::BeginWhole { path, len_bytes })
            }
            (P::Streaming, Frame::CommitWhole { path }) => {
                let Some(len_bytes) = self.wholes.remove(&path) else {
                    return Err(SessionError::OutOfOrder {
                        frame: "COMMIT_WHOLE",
                        why: format!("no BEGIN_WHOLE for {path}"),
                    });
                };
                Some(FollowerAction::CommitWhole { path, len_bytes })
            }
            (P::Streaming, Frame::Truncate { len_bytes, path }) => {
                beyond_max_file_bytes("TRUNCATE", &path, len_bytes)?;
                Some(FollowerAction::Truncate { path, len_bytes })
            }
            (P::Streaming, Frame::Delete { path }) => {
                // A whole-file transfer of `path` the leader gave up on ends here.
                self.wholes.remove(&path);
                Some(FollowerAction::Delete { path })
            }
            (P::Streaming, Frame::Rename { from, to }) => {
                if !self.rename_in_use {
                    return Err(SessionError::OutOfOrder {
                        frame: "RENAME",
                        why: "the RENAME capability is not in use on this connection".into(),
                    });
                }
                // A whole-file transfer of `to` the leader gave up on ends here.
                self.wholes.remove(&to);
                Some(FollowerAction::Rename { from, to })
            }
            (P::Streaming, Frame::Born { born_at, path }) => {
                if !self.born_in_use {
                    return Err(SessionError::OutOfOrder {
                        frame: "BORN",
                        why: "the BORN capability is not in use on this connection".into(),
                    });
                }
                Some(FollowerAction::Born { path, born_at })
            }
            (
                P::Streaming,
                Frame::Mark {
                    position,
                    sync_done,
                },
            ) => {
                beyond_max_position("MARK", position)?;
                if position < self.mark_last {
                    return Err(SessionError::OutOfOrder {
                        frame: "MARK",
                        why: format!(
                            "position {position} is below the previous {}",
                            self.mark_last
                        ),
                    });
                }
                self.mark_last = position;
                if sync_done {
                    self.sync_done_position = Some(position);
                }
                // Everything before this MARK has been received. It is written once the shell has
                // finished applying it and says so with `written`.
                self.watermarks[0] = position;
                Some(FollowerAction::Mark {
                    position,
                    sync_done,
                })
            }
            (_, frame) => {
                return Err(SessionError::out_of_order(
                    &frame,
                    format!(
                        "not allowed while the follower is in phase {:?}",
                        self.phase
                    ),
                ))
            }
        };
        Ok(action)
    }

    /// One more file of the leader's index, within `MAX_INVENTORY_FILES`.
    fn push_index(&mut self, path: RelPath, cut: Cut) -> Result<(), SessionError> {
        if self.index.len() as u64 >= MAX_INVENTORY_FILES {
            return Err(SessionError::Limit(format!(
                "more than MAX_INVENTORY_FILES ({MAX_INVENTORY_FILES}) INDEX frames"
            )));
        }
        self.index.push((path, cut));
        Ok(())
    }

    /// The shell scanned its data dir after `FollowerAction::Inventory`: each entry's digest
    /// covers `min(its length, the leader's cut)` (all zero for a path the index lacks); a
    /// held entry is for the instance that action named.
    pub fn inventory(&mut self, haves: Vec<HaveEntry>) {
        self.inventory_part(haves);
        self.inventory_end();
    }

    /// Part of the inventory, as `inventory`, queued as HAVE frames at once: sent while the
    /// shell hashes the rest, the leader hashes its side of these meanwhile.
    pub fn inventory_part(&mut self, haves: Vec<HaveEntry>) {
        if self.phase != FollowerPhase::AwaitInventory {
            return;
        }
        // NODE_ID first, once.
        if let Some(id) = self.node_id.take() {
            Frame::NodeId { id }.encode(&mut self.out);
        }
        for have in haves {
            self.haves_sent += 1;
            let frame = match (have.proof, self.instance) {
                (HaveProof::Digest(digest), _) => Frame::Have {
                    len_bytes: have.len_bytes,
                    digest,
                    path: have.path,
                },
                (HaveProof::Held { position }, Some(instance)) => Frame::HaveHeld {
                    len_bytes: have.len_bytes,
                    position,
                    instance,
                    path: have.path,
                },
                // No instance to vouch by (a shell's mistake): a digest that matches nothing
                // gets the file re-sent whole, never a wrong copy kept.
                (HaveProof::Held { .. }, None) => Frame::Have {
                    len_bytes: have.len_bytes,
                    digest: [0; crate::frame::DIGEST_BYTES],
                    path: have.path,
                },
            };
            frame.encode(&mut self.out);
        }
    }

    /// The inventory is complete: HAVE_END.
    pub fn inventory_end(&mut self) {
        if self.phase != FollowerPhase::AwaitInventory {
            return;
        }
        self.inventory_part(Vec::new());
        Frame::HaveEnd {
            count: self.haves_sent,
            durability: self.durability,
        }
        .encode(&mut self.out);
        self.phase = FollowerPhase::Streaming;
    }

    /// Every action up to the MARK at `position` has been applied to the data dir (its writes
    /// completed, into the page cache at least).
    pub fn written(&mut self, position: u64) {
        let position = position.min(self.watermarks[0]);
        self.watermarks[1] = self.watermarks[1].max(position);
    }

    /// A sync that began once `written` had reached `position` has completed.
    pub fn synced(&mut self, position: u64) {
        let position = position.min(self.watermarks[1]);
        self.watermarks[2] = self.watermarks[2].max(position);
    }

    /// Queues an ACK if the watermark at this follower's durability level advanced since the last.
    pub fn poll_ack(&mut self) -> bool {
        if self.phase != FollowerPhase::Streaming {
            return false;
        }
        let level = self.watermarks[self.durability.index()];
        // The end of the initial sync is acked once even at position 0 (an empty index), so
        // the leader learns the follower is in sync without waiting for a first write.
        let sync_ack_due =
            !self.sync_done_acked && self.sync_done_position.is_some_and(|p| level >= p);
        if level <= self.acked_level && !sync_ack_due {
            return false;
        }
        self.sync_done_acked |= sync_ack_due;
        self.acked_level = level;
        let [received, written, synced] = self.watermarks;
        Frame::Ack {
            received,
            written,
            synced,
        }
        .encode(&mut self.out);
        true
    }

    /// The position of the MARK that ended the initial sync, once it arrived.
    pub fn sync_done_position(&self) -> Option<u64> {
        self.sync_done_position
    }

    /// The initial sync is done and durable at this follower's level (what `--once` waits for).
    pub fn sync_done_durable(&self) -> bool {
        self.sync_done_position
            .is_some_and(|p| self.watermarks[self.durability.index()] >= p)
    }
}

/// `LIMIT` for a `frame` naming a `position` above `MAX_POSITION`.
fn beyond_max_position(frame: &str, position: u64) -> Result<(), SessionError> {
    if position > MAX_POSITION {
        return Err(SessionError::Limit(format!(
            "{frame} position {position} is above MAX_POSITION ({MAX_POSITION})"
        )));
    }
    Ok(())
}

/// `LIMIT` for a `frame` taking `path` to `len_bytes` (a length, or where a DATA ends), above
/// the largest file Linux allows.
fn beyond_max_file_bytes(frame: &str, path: &RelPath, len_bytes: u64) -> Result<(), SessionError> {
    if len_bytes > MAX_FILE_BYTES {
        return Err(SessionError::Limit(format!(
            "{frame} of {path} to {len_bytes} bytes, above MAX_FILE_BYTES ({MAX_FILE_BYTES})"
        )));
    }
    Ok(())
}
