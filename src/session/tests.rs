//! A leader session against a follower session in one thread, without sockets or disks: the
//! files on each side are byte vectors, the wire is two byte queues, time is a parameter.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha1::{Digest as _, Sha1};

use super::follower::{
    Births, FollowerAction, FollowerPhase, FollowerSession, HaveEntry, HaveProof,
};
use super::leader::{InventoryReport, LeaderPhase, LeaderSession, Transmit};
use super::SessionError;
use crate::auth::Secret;
use crate::catalog::Catalog;
use crate::fork_chain::ForkChain;
use crate::frame::{
    Digest, Durability, ErrorCode, Fork, Frame, InstanceId, LineageId, Preamble, CAPABILITIES,
    CAPABILITY_BIRTHS, CAPABILITY_BORN, CAPABILITY_FORK, CAPABILITY_FORK_CHAIN, CAPABILITY_HELD,
    CAPABILITY_LINEAGE, CAPABILITY_RENAME, KEEPALIVE_INTERVAL_MS, MAX_DATA_BYTES, MAX_FORK_CHAIN,
    VANISHED_HOLD_TIMEOUT_MS,
};
use crate::lag::FollowerState;
use crate::paths::RelPath;

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn sha1(bytes: &[u8]) -> Digest {
    Sha1::digest(bytes).into()
}

type Files = HashMap<RelPath, Vec<u8>>;

/// The simulated leader's instance id.
const INSTANCE: InstanceId = [5; 16];
const LINEAGE: LineageId = [6; 16];

/// A MARK's position and what the follower held of a file when it read it (`None`: absent).
type CopyAtMark = (u64, Option<Vec<u8>>);

struct Sim {
    catalog: Catalog,
    leader_files: Files,
    leader: LeaderSession,
    follower_files: Files,
    follower_temps: Files,
    follower: FollowerSession,
    to_follower: Vec<u8>,
    to_leader: Vec<u8>,
    now: Instant,
    leader_error: Option<SessionError>,
    follower_error: Option<SessionError>,
    marks_seen: Vec<(u64, bool)>,
    /// Each append as (position after it, path, file length after it), for tests that check
    /// every MARK against them (`check_marks`; only for scripts that never replace, truncate
    /// or delete, which would make an older prefix legitimately absent).
    appends: Vec<(u64, RelPath, usize)>,
    check_marks: bool,
    /// The paths of each `Transmit::RecordUnreported`, in order.
    unreported_asks: Vec<Vec<RelPath>>,
    /// A file whose copy on the follower is noted at every MARK, with the MARK's position.
    watched: Option<(RelPath, Vec<CopyAtMark>)>,
    /// Files the follower reports as held since a MARK at this position (HAVE_HELD), as its
    /// held record would.
    held_claims: HashMap<RelPath, u64>,
    /// Every prefix the leader was asked to hash.
    leader_hashed: Vec<RelPath>,
    /// Every path a whole-file transfer began for, in order (BEGIN_WHOLE).
    begun_whole: Vec<RelPath>,
    /// Every RENAME the follower applied, in order.
    renamed: Vec<(RelPath, RelPath)>,
    /// The births the follower's held record would keep, shown every action as the shell does.
    births: Births,
}

impl Sim {
    fn new(leader_files: Files, follower_files: Files) -> Sim {
        Sim::with_secrets(leader_files, follower_files, b"s3cret", b"s3cret")
    }

    fn with_secrets(leader_files: Files, follower_files: Files, ls: &[u8], fs: &[u8]) -> Sim {
        let catalog = Catalog::new(
            leader_files
                .iter()
                .map(|(p, b)| (p.clone(), b.len() as u64)),
        );
        let secret_l = Secret::new(ls.to_vec()).unwrap();
        let secret_f = Secret::new(fs.to_vec()).unwrap();
        Sim {
            catalog,
            leader_files,
            leader: LeaderSession::new(
                secret_l,
                [7; 32],
                Duration::from_millis(1000),
                INSTANCE,
                LINEAGE,
            ),
            follower_files,
            follower_temps: HashMap::new(),
            follower: FollowerSession::new(secret_f, [9; 32], Durability::Synced),
            to_follower: Vec::new(),
            to_leader: Vec::new(),
            now: Instant::now(),
            leader_error: None,
            follower_error: None,
            marks_seen: Vec::new(),
            appends: Vec::new(),
            check_marks: false,
            unreported_asks: Vec::new(),
            watched: None,
            held_claims: HashMap::new(),
            leader_hashed: Vec::new(),
            begun_whole: Vec::new(),
            renamed: Vec::new(),
            births: Births::default(),
        }
    }

    /// The same pair, its follower offering only `capabilities` (as an older build would).
    fn follower_offering(mut self, capabilities: u32) -> Sim {
        self.follower = self.follower.offering(capabilities);
        self
    }

    /// Applies `change` to the catalog and tells the session, as the leader's writer does.
    fn record<T>(
        &mut self,
        path: RelPath,
        change: impl FnOnce(&mut Catalog, &str) -> Result<T, crate::catalog::CatalogError>,
    ) {
        let since = self.catalog.position();
        change(&mut self.catalog, path.as_str()).expect("a RelPath passes the catalog's check");
        self.leader.note_changed(path, since);
    }

    /// The leader-side change sources: write the bytes, record the change, tell the session.
    fn append(&mut self, path: &str, bytes: &[u8]) {
        let path = p(path);
        let file = self.leader_files.entry(path.clone()).or_default();
        let offset = file.len() as u64;
        file.extend_from_slice(bytes);
        let len_bytes = bytes.len() as u64;
        self.record(path.clone(), |c, p| c.append(p, offset, len_bytes));
        let position = self.catalog.position();
        self.appends
            .push((position, path, (offset + len_bytes) as usize));
    }

    fn replace(&mut self, path: &str, bytes: &[u8]) {
        let path = p(path);
        self.leader_files.insert(path.clone(), bytes.to_vec());
        self.record(path, |c, p| c.replace(p, bytes.len() as u64));
    }

    fn delete(&mut self, path: &str) {
        let path = p(path);
        self.leader_files.remove(&path);
        self.record(path, |c, p| c.delete(p));
    }

    /// A rename on the leader, told to the session as the leader's writer does: the move, then
    /// both changes.
    fn rename(&mut self, from: &str, to: &str) {
        let (from, to) = (p(from), p(to));
        let bytes = self
            .leader_files
            .remove(&from)
            .expect("renames a leader's file");
        self.leader_files.insert(to.clone(), bytes);
        let since = self.catalog.position();
        let renamed = self.catalog.rename(from.as_str(), to.as_str()).unwrap();
        let renamed = renamed.expect("the catalog holds it");
        self.leader.note_moved(renamed.moved);
        self.leader.note_changed(from, since);
        self.leader.note_changed(to, since);
    }

    /// One turn of the leader: input, digests, transmits. Returns whether anything moved.
    fn step_leader(&mut self) -> bool {
        let mut moved = false;
        if self.leader_error.is_none() && !self.to_leader.is_empty() {
            match self
                .leader
                .handle_input(&self.to_leader, &self.catalog, self.now)
            {
                Ok(n) => {
                    moved |= n > 0;
                    self.to_leader.drain(..n);
                }
                Err(e) => self.leader_error = Some(e),
            }
        }
        if let Some(requests) = self.leader.digest_requests() {
            self.leader_hashed
                .extend(requests.iter().map(|r| r.path.clone()));
            let digests = requests
                .into_iter()
                .map(|r| {
                    let d = self
                        .leader_files
                        .get(&r.path)
                        .and_then(|b| b.get(..r.len_bytes as usize).map(sha1));
                    (r.path, d)
                })
                .collect();
            self.leader.digests_ready(digests);
            moved = true;
        }
        while self.transmit_one() {
            moved = true;
        }
        moved | self.flush_leader()
    }

    /// One `poll_transmit` of the leader, carried out. Returns whether there was one.
    fn transmit_one(&mut self) -> bool {
        let Some(t) = self.leader.poll_transmit(&self.catalog, self.now) else {
            return false;
        };
        match t {
            Transmit::OpenWhole { path, .. } => match self.leader_files.get(&path) {
                Some(b) => {
                    let len = b.len() as u64;
                    self.leader.begin_whole(&path, len, &self.catalog)
                }
                None => self.leader.whole_unavailable(&path),
            },
            Transmit::Payload {
                path,
                offset,
                len_bytes,
                ..
            } => {
                let range = offset as usize..(offset + len_bytes) as usize;
                match self.leader_files.get(&path).and_then(|b| b.get(range)) {
                    Some(bytes) => {
                        self.to_follower.extend(self.leader.take_output());
                        self.to_follower.extend_from_slice(bytes);
                    }
                    None => self.leader.payload_unavailable(),
                }
            }
            Transmit::RecordUnreported { paths } => {
                self.unreported_asks.push(paths.clone());
                // As the leader's shell does: each file as it is now, replaced or deleted.
                for path in paths {
                    match self.leader_files.get(&path) {
                        Some(b) => {
                            let len_bytes = b.len() as u64;
                            self.record(path, |c, p| c.replace(p, len_bytes));
                        }
                        None => self.record(path, |c, p| c.delete(p)),
                    }
                }
            }
        }
        true
    }

    /// Moves the handshake along, a leader turn then a follower turn, until `done`.
    fn handshake_until(&mut self, done: impl Fn(&Sim) -> bool) {
        while !done(self) {
            // The shell's rule: until the input may authenticate, the session sees no catalog.
            if !self.leader.may_authenticate(&self.to_leader) {
                let n = self
                    .leader
                    .handle_input(&self.to_leader, &Catalog::new([]), self.now)
                    .unwrap();
                self.to_leader.drain(..n);
            }
            let n = self
                .leader
                .handle_input(&self.to_leader, &self.catalog, self.now)
                .unwrap();
            self.to_leader.drain(..n);
            let out = self.leader.take_output();
            self.to_follower.extend(out);
            assert!(self.step_follower() || n > 0, "the handshake stalled");
        }
    }

    fn step_follower(&mut self) -> bool {
        let mut moved = false;
        while self.follower_error.is_none() {
            let (n, action) = match self.follower.handle_input(&self.to_follower) {
                Ok(r) => r,
                Err(e) => {
                    self.follower_error = Some(e);
                    break;
                }
            };
            self.to_follower.drain(..n);
            moved |= n > 0;
            let Some(action) = action else { break };
            self.apply(action);
        }
        // Synced durability: this "disk" syncs instantly, after the batch.
        let written = self.follower.watermarks()[1];
        self.follower.synced(written);
        self.follower.poll_ack();
        let out = self.follower.take_output();
        moved |= !out.is_empty();
        self.to_leader.extend(out);
        moved
    }

    fn apply(&mut self, action: FollowerAction) {
        // As the shell: only the actions `Births::concerns`.
        if Births::concerns(&action) {
            self.births.before(&action, self.follower.born_in_use());
        }
        match action {
            FollowerAction::Inventory {
                index,
                instance,
                forks,
                lineage,
            } => {
                assert!(!forks.is_fork(), "this leader's instance is no fork");
                assert_eq!(instance, Some(INSTANCE), "HELD is in use between these two");
                assert!(lineage.is_none() || lineage == Some(LINEAGE), "{lineage:?}");
                let cuts: HashMap<_, _> = index.into_iter().collect();
                let mut haves: Vec<HaveEntry> = self
                    .follower_files
                    .iter()
                    .map(|(path, b)| {
                        let len_bytes = b.len() as u64;
                        let proof = match (self.held_claims.get(path), cuts.get(path)) {
                            // As the shell: held where the leader would accept it.
                            (Some(&position), Some(cut))
                                if cut.admits_held(len_bytes, position) =>
                            {
                                HaveProof::Held { position }
                            }
                            (_, Some(cut)) => {
                                HaveProof::Digest(sha1(&b[..b.len().min(cut.len_bytes as usize)]))
                            }
                            (_, None) => HaveProof::Digest([0; 20]),
                        };
                        HaveEntry {
                            path: path.clone(),
                            len_bytes,
                            proof,
                        }
                    })
                    .collect();
                haves.sort_by(|a, b| a.path.cmp(&b.path));
                self.follower.inventory(haves);
            }
            FollowerAction::Write {
                path,
                temp,
                offset,
                len_bytes,
            } => {
                let payload: Vec<u8> = self.to_follower.drain(..len_bytes as usize).collect();
                let files = if temp {
                    &mut self.follower_temps
                } else {
                    &mut self.follower_files
                };
                let file = files.entry(path).or_default();
                let end = (offset + len_bytes) as usize;
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[offset as usize..end].copy_from_slice(&payload);
            }
            FollowerAction::BeginWhole { path, .. } => {
                self.begun_whole.push(path.clone());
                self.follower_temps.insert(path, Vec::new());
            }
            FollowerAction::CommitWhole { path, len_bytes } => {
                let b = self.follower_temps.remove(&path).unwrap();
                assert_eq!(b.len() as u64, len_bytes);
                self.follower_files.insert(path, b);
            }
            FollowerAction::Truncate { path, len_bytes } => {
                if let Some(b) = self.follower_files.get_mut(&path) {
                    b.truncate(len_bytes as usize);
                }
            }
            FollowerAction::Delete { path } => {
                self.follower_files.remove(&path);
                self.follower_temps.remove(&path);
            }
            FollowerAction::Rename { from, to } => {
                self.renamed.push((from.clone(), to.clone()));
                let bytes = self.follower_files.remove(&from);
                let bytes = bytes.unwrap_or_else(|| panic!("RENAME of {from}, not held"));
                self.follower_files.insert(to.clone(), bytes);
                self.follower_temps.remove(&to);
            }
            FollowerAction::Born { .. } => {}
            FollowerAction::Mark {
                position,
                sync_done,
            } => {
                self.marks_seen.push((position, sync_done));
                if self.check_marks {
                    self.assert_mark_covers_appends(position);
                }
                if let Some((path, seen)) = &mut self.watched {
                    seen.push((position, self.follower_files.get(path).cloned()));
                }
                self.follower.written(position);
            }
        }
    }

    /// Runs both sides until nothing moves. Returns the payload bytes the leader sent.
    fn run(&mut self) -> u64 {
        let before = self.leader.bytes_payload_total();
        for _ in 0..10_000 {
            let a = self.step_leader();
            let b = self.step_follower();
            if !a && !b {
                return self.leader.bytes_payload_total() - before;
            }
        }
        panic!("the sessions did not settle");
    }

    /// Every append at or below `position` is in the follower's copy, which an append-only
    /// script only ever extends.
    fn assert_mark_covers_appends(&self, position: u64) {
        // Per file, the longest an append at or below `position` made it: its prefix holds
        // every earlier one's.
        let mut longest: HashMap<&RelPath, (u64, usize)> = HashMap::new();
        for (at, path, len) in self.appends.iter().filter(|a| a.0 <= position) {
            let e = longest.entry(path).or_insert((*at, *len));
            if *len > e.1 {
                *e = (*at, *len);
            }
        }
        for (path, (at, len)) in longest {
            let have = self.follower_files.get(path).map_or(&[][..], |b| &b[..]);
            assert!(
                have.len() >= len && have[..len] == self.leader_files[path][..len],
                "MARK {position}: {path} holds {} bytes, the append at {at} made it {len}",
                have.len()
            );
        }
    }

    /// The positions of the MARKs the follower read after the first `from`.
    fn mark_positions_since(&self, from: usize) -> Vec<u64> {
        self.marks_seen[from..].iter().map(|&(p, _)| p).collect()
    }

    /// Moves the leader's pending output to the follower's side. Returns whether there was any.
    /// A follower in sync with "seg" (10 bytes), then an append to it whose range, once
    /// planned, is found gone from the file (truncated behind the catalog): the DATA header is
    /// taken back. Returns the catalog's position after the append.
    fn with_a_vanished_tail() -> (Sim, u64) {
        let mut sim = Sim::new(files(&[("seg", b"0123456789")]), Files::new());
        sim.run();
        sim.append("seg", b"abcdef");
        let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
        assert!(
            matches!(t, Some(Transmit::Payload { len_bytes: 6, .. })),
            "{t:?}"
        );
        sim.leader.payload_unavailable();
        let position = sim.catalog.position();
        (sim, position)
    }

    fn flush_leader(&mut self) -> bool {
        let out = self.leader.take_output();
        let any = !out.is_empty();
        self.to_follower.extend(out);
        any
    }

    fn assert_in_sync(&self) {
        assert!(self.leader_error.is_none(), "{:?}", self.leader_error);
        assert!(self.follower_error.is_none(), "{:?}", self.follower_error);
        let mut l: Vec<_> = self.leader_files.iter().collect();
        let mut f: Vec<_> = self.follower_files.iter().collect();
        l.sort();
        f.sort();
        assert_eq!(l, f, "follower copy differs from the leader");
        assert!(
            self.follower_temps.is_empty(),
            "a whole-file transfer was left open"
        );
    }
}

fn files(entries: &[(&str, &[u8])]) -> Files {
    entries.iter().map(|(k, v)| (p(k), v.to_vec())).collect()
}

fn big(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn empty_follower_receives_every_file_whole() {
    let seg = big(MAX_DATA_BYTES as usize + 1000, 1);
    let mut sim = Sim::new(
        files(&[("a.json", b"{}"), ("q/1/seg.0", &seg), ("q/empty", b"")]),
        Files::new(),
    );
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 2 + seg.len() as u64);
    assert_eq!(sim.follower.phase(), FollowerPhase::Streaming);
    assert!(sim.follower.sync_done_durable());
    let position = sim.catalog.position();
    assert_eq!(sim.marks_seen.first(), Some(&(position, true)));
    assert_eq!(sim.leader.lag().acked(), [position; 3]);
}

#[test]
fn follower_with_a_prefix_gets_only_the_tail() {
    let seg = big(100_000, 2);
    let mut sim = Sim::new(
        files(&[("seg.0", &seg), ("same", b"unchanged")]),
        files(&[("seg.0", &seg[..60_000]), ("same", b"unchanged")]),
    );
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 40_000, "only the missing tail crosses the wire");
    assert_eq!(
        sim.leader.sync_progress(),
        None,
        "no progress once the sync is done"
    );
    assert_eq!(sim.leader.files_whole_total(), 0);
}

#[test]
fn longer_follower_copy_with_matching_prefix_is_truncated_without_payload() {
    let seg = big(10_000, 3);
    let mut sim = Sim::new(files(&[("seg.0", &seg[..4000])]), files(&[("seg.0", &seg)]));
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 0);
}

#[test]
fn mismatched_copy_is_resent_whole_and_extra_files_are_deleted() {
    let mut sim = Sim::new(
        files(&[("meta.json", b"{\"v\":2}"), ("seg.0", b"abcdef")]),
        files(&[
            ("meta.json", b"{\"v\":1}"),
            ("seg.0", b"abX"),
            ("stale/old", b"x"),
        ]),
    );
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 7 + 6);
    assert_eq!(sim.leader.files_whole_total(), 2);
}

#[test]
fn changes_after_the_sync_stream_appends_replaces_and_deletes() {
    let mut sim = Sim::new(files(&[("seg.0", b"hello"), ("meta", b"1")]), Files::new());
    sim.run();
    sim.append("seg.0", b" world");
    sim.replace("meta", b"22");
    sim.append("new/dir/seg.1", b"fresh");
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 6 + 2 + 5);
    sim.delete("meta");
    sim.run();
    sim.assert_in_sync();
    let position = sim.catalog.position();
    assert_eq!(sim.leader.lag().acked(), [position; 3]);
    let snap = sim.leader.lag().snapshot(position, sim.now);
    assert_eq!(snap.lag_bytes, [0; 3]);
    assert_eq!(snap.state, FollowerState::Streaming);
}

/// A file created by an append goes to the follower like any append, as DATA under its real
/// name: a prefix of it is a state the leader's own file went through. One created by a
/// replacement (a file renamed into place) goes whole, so the follower never shows a part of
/// it; so does an empty one, which no DATA would create, and any new file over a copy the
/// follower holds of an earlier one.
#[test]
fn only_files_born_whole_or_empty_or_over_a_held_copy_go_whole() {
    let seg = big(MAX_DATA_BYTES as usize + 1000, 4);
    let held = files(&[("old/seg.0", b"held")]);
    let mut sim = Sim::new(held.clone(), held);
    sim.run();
    assert!(sim.begun_whole.is_empty());
    sim.append("q/seg.1", &seg);
    sim.replace("meta.json", b"{\"v\":1}");
    sim.append("q/empty", b"");
    sim.delete("old/seg.0");
    sim.append("old/seg.0", b"born again");
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, seg.len() as u64 + 7 + 10);
    let mut whole = std::mem::take(&mut sim.begun_whole);
    whole.sort();
    assert_eq!(whole, [p("meta.json"), p("old/seg.0"), p("q/empty")]);
    assert_eq!(sim.leader.files_whole_total(), 3);
    // Once held, a file born by an append grows by its tail, as before.
    sim.append("q/seg.1", b"more");
    assert_eq!(sim.run(), 4);
    sim.assert_in_sync();
    assert!(sim.begun_whole.is_empty());
}

/// With `BORN`, the follower knows the birth of every copy it holds as the leader's catalog
/// gives it: from the index for a file it kept (an empty copy growing from offset 0 too), from
/// BORN for one shipped whole or created since. Without it, a copy sent whole or written at
/// offset 0 since has none (`docs/PROTOCOL.md`, *Across a handoff*).
#[test]
fn the_follower_knows_the_birth_of_every_copy_it_holds() {
    for born in [true, false] {
        let leader = files(&[
            ("old/seg.0", b"held"),
            ("old/empty", b""),
            ("state", b"1"),
            ("gone", b"x"),
        ]);
        let held = files(&[("old/seg.0", b"he"), ("old/empty", b"")]);
        let mut sim = Sim::new(leader, held);
        if !born {
            sim = sim.follower_offering(CAPABILITIES & !CAPABILITY_BORN);
        }
        sim.run();
        sim.append("q/seg.1", b"created by an append");
        sim.replace("state", b"22");
        sim.append("old/seg.0", b" and more");
        sim.append("old/empty", b"grown from 0");
        sim.delete("gone");
        sim.run();
        sim.assert_in_sync();
        assert!(sim.catalog.get(&p("q/seg.1")).unwrap().born_at > 0);
        for path in sim.follower_files.keys() {
            let catalog = sim.catalog.get(path).unwrap().born_at;
            let kept = path.as_str() == "old/seg.0";
            let want = (born || kept).then_some(catalog);
            assert_eq!(sim.births.get(path), want, "{path} (BORN in use: {born})");
        }
        assert_eq!(sim.births.get(&p("gone")), None);
    }
}

#[test]
fn writes_during_the_initial_sync_are_shipped_without_pausing_the_writer() {
    let mut sim = Sim::new(files(&[("seg.0", b"0123")]), files(&[("seg.0", b"01")]));
    // Run until the leader has sent its index, then write before the inventory is answered.
    sim.step_leader();
    sim.step_follower();
    sim.step_leader();
    assert_eq!(sim.leader.phase(), LeaderPhase::AwaitInventory);
    sim.append("seg.0", b"4567");
    sim.append("seg.1", b"new");
    sim.run();
    sim.assert_in_sync();
}

#[test]
fn many_appends_coalesce_into_one_range_per_file() {
    let mut sim = Sim::new(files(&[("seg.0", b"")]), Files::new());
    sim.run();
    for _ in 0..1000 {
        sim.append("seg.0", b"m");
    }
    assert_eq!(
        sim.leader.dirty_files(),
        1,
        "pending state is per file, not per append"
    );
    let marks_before = sim.marks_seen.len();
    assert_eq!(sim.run(), 1000);
    sim.assert_in_sync();
    assert_eq!(sim.marks_seen.len(), marks_before + 1);
}

/// A session busy shipping a large change (a follower catching up) takes the changes made
/// meanwhile in several batches: each batch's position is marked as soon as its files are on
/// the wire, so the follower acks (and the leader's `wait_for` callers hear) as the backlog
/// drains, not once at its end.
#[test]
fn each_batch_of_changes_is_marked_once_its_files_are_shipped() {
    let mut sim = Sim::new(files(&[("seg.0", b"")]), Files::new());
    sim.run();
    let marks_before = sim.marks_seen.len();
    sim.append("seg.0", &big(3 * MAX_DATA_BYTES as usize, 1));
    let first = sim.catalog.position();
    assert!(sim.transmit_one(), "the first chunk of seg.0");
    sim.append("seg.1", b"one");
    let second = sim.catalog.position();
    assert!(sim.transmit_one(), "the second chunk of seg.0");
    sim.append("seg.2", b"two");
    let third = sim.catalog.position();
    sim.run();
    sim.assert_in_sync();
    assert_eq!(
        sim.mark_positions_since(marks_before),
        [first, second, third]
    );
}

/// No MARK goes above the ceiling the shell sets (the reservation of the leader's record,
/// `docs/PROTOCOL.md`, *The leader's record*): what ships past it is marked at the ceiling,
/// which claims less, and the rest once the ceiling is raised. The follower still gets every
/// byte at once; only its acks wait.
#[test]
fn no_mark_goes_above_the_ceiling_until_it_is_raised() {
    let mut sim = Sim::new(files(&[("seg", b"0123456789")]), Files::new());
    sim.leader.set_mark_ceiling(15);
    sim.run();
    sim.append("seg", b"abc");
    sim.run();
    sim.append("seg", b"defgh");
    sim.run();
    sim.assert_in_sync();
    let marks: Vec<u64> = sim.mark_positions_since(0);
    assert_eq!(marks.iter().max(), Some(&15), "{marks:?}");
    assert!(
        marks.contains(&13),
        "below the ceiling, as usual: {marks:?}"
    );
    assert_eq!(sim.follower.watermarks()[2], 15);

    sim.leader.set_mark_ceiling(1000);
    sim.now += Duration::from_millis(KEEPALIVE_INTERVAL_MS);
    sim.run();
    assert_eq!(sim.marks_seen.last().map(|m| m.0), Some(18));
    assert_eq!(sim.follower.watermarks()[2], 18);
}

/// A follower that resumes after a stall (or whose session was blocked on a full socket) finds
/// its whole backlog in one look: each file of it is marked as soon as it, and every file
/// changed before it, is on the wire.
#[test]
fn a_backlog_taken_in_one_look_is_marked_file_by_file() {
    let mut sim = Sim::new(files(&[("seg.0", b"")]), Files::new());
    sim.run();
    let marks_before = sim.marks_seen.len();
    sim.append("seg.0", &big(2 * MAX_DATA_BYTES as usize, 3));
    let after_seg0 = sim.catalog.position();
    sim.append("seg.1", &big(1000, 4));
    let after_seg1 = sim.catalog.position();
    sim.append("seg.2", b"x");
    let after_seg2 = sim.catalog.position();
    sim.run();
    sim.assert_in_sync();
    assert_eq!(
        sim.mark_positions_since(marks_before),
        [after_seg0, after_seg1, after_seg2]
    );
}

/// A change to a file still waiting in the queue is shipped with it, and the MARK that
/// follows claims it at once, rather than at the next keepalive.
#[test]
fn a_change_to_a_queued_file_is_marked_when_that_file_ships() {
    let mut sim = Sim::new(files(&[("seg.0", b""), ("seg.1", b"")]), Files::new());
    sim.run();
    let marks_before = sim.marks_seen.len();
    sim.append("seg.0", &big(2 * MAX_DATA_BYTES as usize, 2));
    sim.append("seg.1", b"one");
    assert!(sim.transmit_one(), "the first chunk of seg.0");
    sim.append("seg.1", b" more");
    let last = sim.catalog.position();
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.marks_seen.last().map(|&(p, _)| p), Some(last));
    assert!(sim.marks_seen.len() > marks_before);
}

/// MARKs claim no more than is on the wire: random scripts of appends to many files, the
/// leader shipping in short bursts (a socket that takes little at a time) so batches pile up,
/// checked at every MARK the follower reads. (It stays well under `MARKERS_MAX`; it held with
/// that cap set to 2, where markers merge.)
#[test]
fn every_mark_covers_every_append_at_or_below_it() {
    let paths: Vec<String> = (0..80).map(|i| format!("q/{}/seg.{i}", i % 7)).collect();
    for seed in 1..=10u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sim = Sim::new(files(&[(paths[0].as_str(), b"x")]), Files::new());
        sim.check_marks = true;
        sim.run();
        let marks_before = sim.marks_seen.len();
        for _ in 0..400 {
            match next() % 8 {
                0..=4 => {
                    let path = &paths[(next() % paths.len() as u64) as usize];
                    // Mostly small, now and then more than one DATA frame's worth.
                    let len = match next() % 40 {
                        0 => MAX_DATA_BYTES as usize + 1 + (next() % 1000) as usize,
                        _ => 1 + (next() % 4000) as usize,
                    };
                    sim.append(path, &big(len, next() as u8));
                    // A poll between appends: each one a batch of its own.
                    if next() % 2 == 0 {
                        sim.transmit_one();
                        sim.flush_leader();
                    }
                }
                5 => {
                    for _ in 0..next() % 3 {
                        sim.transmit_one();
                    }
                    sim.flush_leader();
                }
                6 => {
                    sim.step_follower();
                }
                _ => {
                    sim.step_leader();
                }
            }
        }
        sim.run();
        sim.assert_in_sync();
        assert!(sim.marks_seen.len() > marks_before + 1, "seed {seed}");
        let position = sim.catalog.position();
        assert_eq!(sim.marks_seen.last().map(|m| m.0), Some(position));
    }
}

#[test]
fn output_holding_a_mark_is_flagged_so_the_shell_sends_it_at_once() {
    let mut sim = Sim::new(files(&[("seg.0", b"")]), Files::new());
    sim.run();
    sim.append("seg.0", b"first");
    let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
    assert!(matches!(t, Some(Transmit::Payload { .. })));
    assert!(
        sim.leader.has_output() && !sim.leader.output_has_mark(),
        "a lone header may wait in the socket for its payload"
    );
    sim.leader.take_output();
    // The next round begins before the shell asked again: the first round's MARK, then the
    // second round's header.
    sim.append("seg.0", b"second");
    let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
    assert!(matches!(t, Some(Transmit::Payload { .. })));
    assert!(
        sim.leader.output_has_mark(),
        "a MARK must not wait in the socket for the next payload"
    );
    sim.leader.take_output();
    assert!(!sim.leader.output_has_mark());
}

#[test]
fn idle_leader_sends_a_keepalive_mark_after_the_interval() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    let marks = sim.marks_seen.len();
    sim.run();
    assert_eq!(sim.marks_seen.len(), marks, "no mark before the interval");
    let due = sim.leader.poll_timeout().unwrap();
    assert_eq!(due, sim.now + Duration::from_millis(KEEPALIVE_INTERVAL_MS));
    sim.now = due;
    sim.run();
    assert_eq!(sim.marks_seen.len(), marks + 1);
}

#[test]
fn wrong_secret_is_refused_and_reported_on_both_sides() {
    let mut sim = Sim::with_secrets(files(&[("a", b"1")]), Files::new(), b"right", b"wrong");
    sim.run();
    assert!(matches!(
        sim.leader_error,
        Some(SessionError::AuthFailed(_))
    ));
    match &sim.follower_error {
        Some(SessionError::Peer { code, message }) => {
            assert_eq!(*code, ErrorCode::AuthFailed);
            assert!(message.contains("wrong secret"), "{message}");
        }
        other => panic!("follower saw {other:?}"),
    }
    assert!(sim.follower_files.is_empty());
}

#[test]
fn version_mismatch_is_reported_with_both_versions() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    let mut bad = crate::frame::Preamble::ours().encode();
    bad[8] = 9;
    sim.to_leader.extend_from_slice(&bad);
    sim.step_leader();
    let err = sim.leader_error.clone().unwrap();
    assert_eq!(err.code(), ErrorCode::VersionMismatch);
    assert!(
        err.to_string().contains('9') && err.to_string().contains('1'),
        "{err}"
    );
}

#[test]
fn garbage_instead_of_a_preamble_is_bad_magic() {
    let mut sim = Sim::new(Files::new(), Files::new());
    sim.to_leader
        .extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    sim.step_leader();
    assert_eq!(
        sim.leader_error.clone().unwrap().code(),
        ErrorCode::BadMagic
    );
}

#[test]
fn a_path_escaping_the_data_dir_is_refused_with_bad_path() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    // Handshake up to the inventory, then a HAVE naming "../etc/passwd", built by hand.
    sim.step_leader();
    sim.step_follower();
    sim.step_leader();
    sim.to_leader.clear();
    let path = b"../etc/passwd";
    let mut frame = Vec::new();
    frame.extend_from_slice(&(1u32 + 8 + 20 + 2 + path.len() as u32).to_le_bytes());
    frame.push(0x12);
    frame.extend_from_slice(&5u64.to_le_bytes());
    frame.extend_from_slice(&[0; 20]);
    frame.extend_from_slice(&(path.len() as u16).to_le_bytes());
    frame.extend_from_slice(path);
    sim.to_leader.extend_from_slice(&frame);
    sim.step_leader();
    let err = sim.leader_error.clone().unwrap();
    assert_eq!(err.code(), ErrorCode::BadPath);
    assert!(err.to_string().contains(".."), "{err}");
    assert_eq!(sim.leader.phase(), LeaderPhase::Closed);
}

#[test]
fn an_ack_beyond_the_last_mark_is_refused() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    Frame::Ack {
        received: 1_000_000,
        written: 0,
        synced: 0,
    }
    .encode(&mut sim.to_leader);
    sim.step_leader();
    assert!(matches!(
        sim.leader_error,
        Some(SessionError::OutOfOrder { frame: "ACK", .. })
    ));
}

/// A follower that has synced gets `frame`, and must refuse it with `LIMIT` naming `limit`.
#[track_caller]
fn follower_refuses_with_limit(frame: Frame, limit: &str) {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    let name = frame.name();
    frame.encode(&mut sim.to_follower);
    sim.step_follower();
    assert!(
        matches!(&sim.follower_error, Some(SessionError::Limit(why)) if why.contains(limit)),
        "{name}: {:?}",
        sim.follower_error
    );
}

#[test]
fn a_mark_above_max_position_is_refused_by_the_follower_with_limit() {
    let mark = Frame::Mark {
        position: crate::frame::MAX_POSITION + 1,
        sync_done: false,
    };
    follower_refuses_with_limit(mark, "MAX_POSITION");
}

/// A file offset or length above the largest file Linux allows is the leader's error, named
/// as such (`LIMIT`), not a disk error from the follower's write.
#[test]
fn a_file_range_above_max_file_bytes_is_refused_by_the_follower_with_limit() {
    use crate::frame::MAX_FILE_BYTES;
    let frames = [
        Frame::Data {
            temp: false,
            offset: MAX_FILE_BYTES,
            data_len: 1,
            path: p("a"),
        },
        // (A range past 2^64 the frame decoder refuses first: BAD_FRAME, "overflows".)
        Frame::Data {
            temp: false,
            offset: MAX_FILE_BYTES - 1,
            data_len: 2,
            path: p("a"),
        },
        Frame::BeginWhole {
            len_bytes: MAX_FILE_BYTES + 1,
            path: p("b"),
        },
        Frame::Truncate {
            len_bytes: MAX_FILE_BYTES + 1,
            path: p("a"),
        },
    ];
    for frame in frames {
        follower_refuses_with_limit(frame, "MAX_FILE_BYTES");
    }
}

#[test]
fn temp_data_without_begin_whole_is_refused_by_the_follower() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    Frame::Data {
        temp: true,
        offset: 0,
        data_len: 1,
        path: p("zzz"),
    }
    .encode(&mut sim.to_follower);
    sim.to_follower.push(b'x');
    sim.step_follower();
    assert!(matches!(
        sim.follower_error,
        Some(SessionError::OutOfOrder { frame: "DATA", .. })
    ));
}

#[test]
fn a_follower_that_stops_acking_is_lagging_after_the_deadline() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    sim.append("a", b"more");
    sim.step_leader(); // shipped and marked, but the follower never answers
    let t0 = sim.now;
    let position = sim.catalog.position();
    let snap = sim.leader.lag().snapshot(position, t0);
    assert_eq!(snap.state, FollowerState::Streaming);
    assert_eq!(snap.lag_bytes, [4; 3]);
    let snap = sim
        .leader
        .lag()
        .snapshot(position, t0 + Duration::from_millis(1001));
    assert_eq!(snap.state, FollowerState::Lagging);
}

#[test]
fn a_range_gone_before_sending_is_taken_back_and_the_rewrite_ships() {
    let (mut sim, _) = Sim::with_a_vanished_tail();
    let marks = sim.marks_seen.len();
    assert!(
        sim.leader.take_output().is_empty(),
        "the DATA header was taken back"
    );
    assert_eq!(sim.leader.poll_transmit(&sim.catalog, sim.now), None);
    assert!(
        sim.leader.take_output().is_empty(),
        "no MARK for a round that shipped nothing"
    );
    // The truncation, as the change source reports it.
    sim.replace("seg", b"012");
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.marks_seen.len(), marks + 1);
}

/// A file found shorter (or gone) when its bytes were to be sent was changed by its writer, and
/// that change may reach the session only later (`ferry lead`'s watcher, a broker's call). Until
/// it does, no MARK may claim the appends the follower never got: not a marker's, not the
/// keepalive's, which repeats what was claimed.
#[test]
fn no_mark_claims_bytes_that_vanished_until_their_change_is_noted() {
    // A tail found truncated: its DATA is taken back.
    let (mut sim, _) = Sim::with_a_vanished_tail();
    let claimed = sim.marks_seen.last().unwrap().0;
    let from = sim.marks_seen.len();
    // Another file's append ships meanwhile; then the keepalive falls due.
    sim.append("other", b"x");
    sim.run();
    sim.now += Duration::from_millis(KEEPALIVE_INTERVAL_MS);
    sim.run();
    // A new file found gone when opened to be sent whole.
    sim.replace("gone", b"12345");
    sim.leader_files.remove(&p("gone"));
    sim.run();
    sim.now += Duration::from_millis(KEEPALIVE_INTERVAL_MS);
    sim.run();
    let marks = sim.mark_positions_since(from);
    assert!(!marks.is_empty(), "keepalives still go out");
    assert!(
        marks.iter().all(|&m| m == claimed),
        "claimed {claimed} before the truncation, then {marks:?}"
    );

    // The changes, as their sources report them: the truncation and the deletion.
    sim.replace("seg", b"012");
    sim.record(p("gone"), |c, p| c.delete(p));
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.marks_seen.last().unwrap().0, sim.catalog.position());
}

/// Once the change of a file whose bytes vanished is noted, the MARKs resume, but none between
/// those bytes and that change: the follower never gets them, and the file's next state ships
/// behind the change. (A backlog taken in one look is marked file by file, at the position
/// before each file's first change: those before the change must not be sent.)
#[test]
fn no_mark_falls_between_vanished_bytes_and_the_change_that_explains_them() {
    let (mut sim, vanished_at) = Sim::with_a_vanished_tail();
    let from = sim.marks_seen.len();
    // A backlog the session takes in one look: other files, the truncation, more files.
    sim.append("a", b"1");
    sim.append("b", b"2");
    sim.replace("seg", b"012");
    let changed_at = sim.catalog.position();
    sim.append("c", b"3");
    sim.append("d", b"4");
    sim.run();
    sim.assert_in_sync();
    let marks = sim.mark_positions_since(from);
    assert!(
        marks.len() > 1,
        "the backlog is still marked file by file: {marks:?}"
    );
    assert!(
        marks.iter().all(|&m| m < vanished_at || m >= changed_at),
        "MARKs {marks:?}; the vanished bytes are at {vanished_at}, their change at {changed_at}"
    );
}

/// The change that explains vanished bytes may never come (a library user who cut a segment
/// back and did not say so). The hold lasts `VANISHED_HOLD_TIMEOUT_MS`, counted from when it
/// began, then the session asks its shell, once per timeout, to record those files as they are
/// on disk; that change ships like any other, and the MARKs resume.
#[test]
fn a_hold_nobody_explains_asks_the_shell_to_record_the_files_as_they_are() {
    let (mut sim, _) = Sim::with_a_vanished_tail();
    // What the disk holds: the file was cut back to 3 bytes.
    sim.leader_files.insert(p("seg"), b"012".to_vec());
    let t0 = sim.now;
    let hold = Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS);
    assert_eq!(sim.leader.poll_transmit(&sim.catalog, t0), None);
    // An append to the same file, reported, does not explain the vanished bytes (the file is
    // still shorter than the catalog says), nor does it start the hold over.
    sim.now = t0 + hold / 2;
    sim.append("seg", b"xy");
    sim.run();
    assert!(sim.unreported_asks.is_empty());
    // Waking for the keepalive just before the hold's end, the shell is told to wake at it.
    sim.now = t0 + hold - Duration::from_millis(100);
    sim.run();
    assert!(sim.unreported_asks.is_empty(), "{:?}", sim.unreported_asks);
    assert_eq!(sim.leader.poll_timeout(), Some(t0 + hold));
    let claimed = sim.marks_seen.last().unwrap().0;
    assert!(claimed < sim.catalog.position());
    sim.now = t0 + hold;
    assert_eq!(
        sim.leader.poll_transmit(&sim.catalog, sim.now),
        Some(Transmit::RecordUnreported {
            paths: vec![p("seg")]
        })
    );
    // Once per timeout, not at every turn.
    assert_eq!(sim.leader.poll_transmit(&sim.catalog, sim.now), None);
    // The shell records the file as the disk has it: it ships, and the MARKs claim it.
    sim.replace("seg", b"012xy");
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.marks_seen.last().unwrap().0, sim.catalog.position());
    // The hold is over: however long things stay quiet, nothing more is asked.
    let position = sim.catalog.position();
    for _ in 0..4 {
        sim.now += hold;
        sim.run();
    }
    assert!(sim.unreported_asks.is_empty(), "{:?}", sim.unreported_asks);
    assert_eq!(sim.catalog.position(), position);
}

/// If recording a file from disk does not end the hold (the shell could not read it), the
/// session asks again a timeout later, for every file whose bytes are still missing.
#[test]
fn a_hold_the_shell_could_not_end_is_asked_about_again_a_timeout_later() {
    let (mut sim, _) = Sim::with_a_vanished_tail();
    sim.replace("gone", b"12345");
    sim.leader_files.remove(&p("gone"));
    sim.run();
    let hold = Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS);
    let t0 = sim.now;
    let mut asks = Vec::new();
    for _ in 0..2 {
        sim.now += hold;
        // The shell fails to record anything: it asks again only after another timeout.
        while let Some(t) = sim.leader.poll_transmit(&sim.catalog, sim.now) {
            asks.push((sim.now - t0, t));
        }
        sim.leader.take_output();
    }
    let expected = |after| {
        (
            after,
            Transmit::RecordUnreported {
                paths: vec![p("gone"), p("seg")],
            },
        )
    };
    assert_eq!(asks, vec![expected(hold), expected(hold * 2)]);
}

#[test]
fn a_connection_that_never_finishes_the_handshake_is_closed_naming_the_limit() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    let t0 = sim.now;
    assert!(sim
        .leader
        .check_handshake_deadline(t0, t0 + Duration::from_millis(9_999))
        .is_ok());
    let err = sim
        .leader
        .check_handshake_deadline(t0, t0 + Duration::from_millis(10_000))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Limit);
    assert!(err.to_string().contains("HANDSHAKE_TIMEOUT_MS"), "{err}");
    assert_eq!(sim.leader.phase(), LeaderPhase::Closed);
    // A session past its handshake is not affected.
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new());
    sim.run();
    assert!(sim
        .leader
        .check_handshake_deadline(t0, t0 + Duration::from_secs(3600))
        .is_ok());
}

/// The leader asks for its own digest of a file as soon as the follower's HAVE for it arrives,
/// so that both sides hash at once rather than one after the other, and plans the sync only once
/// HAVE_END and every digest are in, in whatever order they come.
#[test]
fn the_leader_hashes_each_prefix_as_soon_as_its_have_arrives() {
    let mut sim = Sim::new(
        files(&[("a", b"leader a"), ("b", b"leader b")]),
        files(&[("a", b"leader"), ("b", b"stale")]),
    );
    // The handshake, up to the follower's inventory (HAVE a, HAVE b, HAVE_END) in to_leader.
    sim.handshake_until(|sim| {
        sim.leader.phase() == LeaderPhase::AwaitInventory && !sim.to_leader.is_empty()
    });
    let digest_of =
        |sim: &Sim, path: &RelPath, len: u64| Some(sha1(&sim.leader_files[path][..len as usize]));
    // Fed a byte at a time: each request is answered at once, but b's only after HAVE_END.
    let inventory = std::mem::take(&mut sim.to_leader);
    let mut asked_before_end = Vec::new();
    let mut held = Vec::new();
    for byte in inventory {
        sim.to_leader.push(byte);
        let n = sim
            .leader
            .handle_input(&sim.to_leader, &sim.catalog, sim.now)
            .unwrap();
        sim.to_leader.drain(..n);
        for r in sim.leader.digest_requests().unwrap_or_default() {
            if sim.leader.phase() == LeaderPhase::AwaitInventory {
                asked_before_end.push(r.path.to_string());
            }
            if r.path.as_str() == "b" {
                held.push(r);
            } else {
                let d = digest_of(&sim, &r.path, r.len_bytes);
                sim.leader.digests_ready(vec![(r.path, d)]);
            }
        }
    }
    assert_eq!(asked_before_end, ["a", "b"]);
    assert_eq!(sim.leader.phase(), LeaderPhase::AwaitDigests);
    assert_eq!(
        sim.leader.sync_progress(),
        None,
        "planned without b's digest"
    );
    for r in held {
        let d = digest_of(&sim, &r.path, r.len_bytes);
        sim.leader.digests_ready(vec![(r.path, d)]);
    }
    // a resumes from its 6 bytes, b is re-sent whole.
    assert_eq!(sim.leader.sync_progress(), Some((0, 2 + 8)));
    sim.run();
    sim.assert_in_sync();
}

/// An inventory names each file once: a second HAVE for a path would leave the leader unsure
/// which length its digest belongs to, and is refused by name.
#[test]
fn a_second_have_for_a_path_is_a_bad_frame() {
    let mut sim = Sim::new(files(&[("a", b"leader a")]), Files::new());
    sim.handshake_until(|sim| sim.leader.phase() == LeaderPhase::AwaitInventory);
    sim.to_leader.clear();
    for len_bytes in [8, 3] {
        Frame::Have {
            len_bytes,
            digest: [0; 20],
            path: RelPath::new("a").unwrap(),
        }
        .encode(&mut sim.to_leader);
    }
    let err = sim
        .leader
        .handle_input(&sim.to_leader, &sim.catalog, sim.now)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(err.to_string().contains("a second HAVE for a"), "{err}");
}

#[test]
fn the_initial_sync_reports_what_it_planned_and_what_it_sent() {
    let seg = big(3 * MAX_DATA_BYTES as usize, 4);
    let mut sim = Sim::new(
        files(&[("seg", &seg), ("small", b"abc")]),
        files(&[("seg", &seg[..1000])]),
    );
    // Up to the inventory's comparison, before any payload.
    loop {
        let n = sim
            .leader
            .handle_input(&sim.to_leader, &sim.catalog, sim.now)
            .unwrap();
        sim.to_leader.drain(..n);
        if let Some(requests) = sim.leader.digest_requests() {
            let digests = requests
                .into_iter()
                .map(|r| {
                    let d = sim.leader_files[&r.path][..r.len_bytes as usize].to_vec();
                    (r.path, Some(sha1(&d)))
                })
                .collect();
            sim.leader.digests_ready(digests);
            break;
        }
        let out = sim.leader.take_output();
        sim.to_follower.extend(out);
        sim.step_follower();
    }
    let planned = (seg.len() - 1000 + 3) as u64;
    assert_eq!(sim.leader.sync_progress(), Some((0, planned)));
    // One payload chunk out: progress moves.
    let mut moved = false;
    while let Some(t) = sim.leader.poll_transmit(&sim.catalog, sim.now) {
        if let Transmit::Payload { len_bytes, .. } = t {
            assert_eq!(sim.leader.sync_progress(), Some((len_bytes, planned)));
            moved = true;
            break;
        }
        if let Transmit::OpenWhole { path, .. } = t {
            let len = sim.leader_files[&path].len() as u64;
            sim.leader.begin_whole(&path, len, &sim.catalog);
        }
    }
    assert!(moved);
}

#[test]
fn a_follower_of_an_empty_dir_is_in_sync_without_waiting_for_a_write() {
    let mut sim = Sim::new(Files::new(), Files::new());
    sim.run();
    sim.assert_in_sync();
    let snap = sim.leader.lag().snapshot(0, sim.now);
    assert_eq!(snap.state, FollowerState::Streaming, "{snap:?}");
}

#[test]
fn a_file_deleted_before_its_mismatched_copy_is_replaced_is_deleted_on_the_follower() {
    // Found by the session_pair fuzz target: the follower's copy of "a" differs from the
    // leader's, so it is to be re-sent whole; the leader deletes "a" after sending its index
    // and before the whole-file transfer starts. The follower must not keep its stale copy.
    let mut sim = Sim::new(
        files(&[("a", b"leader"), ("b", b"1")]),
        files(&[("a", b"stale copy"), ("b", b"1")]),
    );
    sim.step_leader();
    sim.step_follower();
    sim.step_leader();
    assert_eq!(sim.leader.phase(), LeaderPhase::AwaitInventory);
    sim.delete("a");
    sim.run();
    sim.assert_in_sync();
    // The same once the comparison is done: deleted before the transfer is opened.
    let mut sim = Sim::new(files(&[("a", b"leader")]), files(&[("a", b"stale copy")]));
    loop {
        sim.step_follower();
        let n = sim
            .leader
            .handle_input(&sim.to_leader, &sim.catalog, sim.now)
            .unwrap();
        sim.to_leader.drain(..n);
        if let Some(requests) = sim.leader.digest_requests() {
            let digests = requests.into_iter().map(|r| (r.path, None)).collect();
            sim.leader.digests_ready(digests);
            break;
        }
        let out = sim.leader.take_output();
        sim.to_follower.extend(out);
    }
    sim.delete("a");
    sim.run();
    sim.assert_in_sync();
}

#[test]
fn whole_file_transfers_cut_short_and_then_deleted_do_not_pile_up_on_the_follower() {
    // A file shrinks after BEGIN_WHOLE went out (the DATA is taken back), then is deleted: the
    // transfer must not stay open on the follower, or MAX_WHOLE_IN_FLIGHT such files on one
    // connection make the next BEGIN_WHOLE fail with LIMIT.
    let mut sim = Sim::new(Files::new(), Files::new());
    sim.run();
    for i in 0..=crate::frame::MAX_WHOLE_IN_FLIGHT {
        let name = format!("x{i}");
        sim.replace(&name, b"0123456789");
        let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
        assert!(matches!(t, Some(Transmit::OpenWhole { .. })), "{t:?}");
        sim.leader.begin_whole(&p(&name), 10, &sim.catalog);
        let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
        assert!(matches!(t, Some(Transmit::Payload { .. })), "{t:?}");
        sim.leader.payload_unavailable();
        sim.delete(&name);
        sim.run();
        assert!(
            sim.follower_error.is_none(),
            "file {i}: {:?}",
            sim.follower_error
        );
    }
    sim.replace("last", b"x");
    sim.run();
    sim.assert_in_sync();
}

/// A file rewritten in place while it is being sent whole (a small file rewritten with
/// O_TRUNC, say, and the change recorded) would reach the follower as neither version: the
/// bytes read after the rewrite, cut at the length planned before it. The session drops the
/// transfer of the older version instead, uncommitted, whatever its shell checks (this one
/// reads whatever the file holds), and no MARK claims it: at every MARK the follower holds the
/// version recorded at or below it, or a later one, never a mix.
#[test]
fn a_file_rewritten_while_sent_whole_is_never_committed_as_a_mix() {
    let (v1, v2, v3): (&[u8], &[u8], &[u8]) = (b"{\"v\":1}", b"{\"v\":2222}", b"{\"v\":33333333}");
    for rewritten_after_open in [true, false] {
        let mut sim = Sim::new(files(&[("meta.json", v1)]), Files::new());
        sim.run();
        sim.watched = Some((p("meta.json"), Vec::new()));
        sim.replace("meta.json", v2);
        let v2_at = sim.catalog.position();
        let t = sim.leader.poll_transmit(&sim.catalog, sim.now);
        assert!(matches!(t, Some(Transmit::OpenWhole { .. })), "{t:?}");
        if rewritten_after_open {
            // Opened at v2's length; then rewritten in place before its bytes are read.
            sim.leader
                .begin_whole(&p("meta.json"), v2.len() as u64, &sim.catalog);
            sim.replace("meta.json", v3);
        } else {
            // Rewritten between the session's plan and the shell's open.
            sim.replace("meta.json", v3);
            sim.leader
                .begin_whole(&p("meta.json"), v3.len() as u64, &sim.catalog);
        }
        let v3_at = sim.catalog.position();
        sim.run();
        sim.assert_in_sync();
        let (_, seen) = sim.watched.take().unwrap();
        assert!(!seen.is_empty());
        for (mark, have) in seen {
            let have = have.as_deref();
            let ok = if mark >= v3_at {
                have == Some(v3)
            } else if mark >= v2_at {
                have == Some(v2) || have == Some(v3)
            } else {
                have == Some(v1) || have == Some(v2) || have == Some(v3)
            };
            assert!(
                ok,
                "rewritten after open: {rewritten_after_open}; MARK {mark} (v2 at {v2_at}, \
                 v3 at {v3_at}): the follower holds {:?}",
                have.map(String::from_utf8_lossy)
            );
        }
    }
}

/// A copy the follower's held record vouches for, since a MARK of this leader instance that
/// came after the file's generation was born, resumes from its length: the leader hashes
/// nothing and sends only the tail.
#[test]
fn a_copy_held_since_a_mark_of_this_leader_resumes_without_hashing() {
    let seg = big(150, 3);
    let mut sim = Sim::new(
        files(&[("seg", &seg), ("meta", b"{}")]),
        files(&[("seg", &seg[..100]), ("meta", b"{}")]),
    );
    sim.held_claims.insert(p("seg"), 100);
    sim.run();
    sim.assert_in_sync();
    assert_eq!(
        sim.leader_hashed,
        [p("meta")],
        "only the file not held is hashed"
    );
    assert_eq!(
        sim.leader.inventory_report(),
        InventoryReport {
            held_accepted: 1,
            held_refused: 0,
            digests_compared: 1,
        }
    );
    assert_eq!(sim.leader.bytes_payload_total(), 50, "the tail only");
}

/// A file replaced after the MARK a held record names is another generation: the follower's
/// copy is of the one before, so it is refused and the file is sent whole. (A follower that
/// does not offer BIRTHS, as an older build, cannot tell and claims it.)
#[test]
fn a_held_copy_older_than_the_files_generation_is_refused_and_sent_whole() {
    let mut sim = Sim::new(
        files(&[("cfg", b"{\"v\":1}")]),
        files(&[("cfg", b"{\"v\":1}")]),
    );
    sim.follower = FollowerSession::new(
        Secret::new(b"s3cret".to_vec()).unwrap(),
        [9; 32],
        Durability::Synced,
    )
    .offering(CAPABILITY_HELD);
    let before = sim.catalog.position();
    sim.replace("cfg", b"{\"v\":2}");
    sim.held_claims.insert(p("cfg"), before);
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.follower_files[&p("cfg")], b"{\"v\":2}");
    assert!(sim.leader_hashed.is_empty());
    assert_eq!(sim.leader.inventory_report().held_refused, 1);
    assert_eq!(sim.leader.files_whole_total(), 1);
}

/// With BIRTHS, the follower sees in the index that a file began anew after the MARK its held
/// record names, and hashes it instead of claiming it: a copy that is still a prefix of the
/// new generation (a segment appended to while a resumed leader was down) gets its tail only,
/// where a refused claim would have cost the whole file.
#[test]
fn a_held_copy_of_a_file_born_since_is_compared_by_digest_and_gets_only_its_tail() {
    let seg = big(150, 3);
    let mut sim = Sim::new(
        files(&[("seg", &seg[..120]), ("meta", b"{}")]),
        files(&[("seg", &seg[..100]), ("meta", b"{}")]),
    );
    let before = sim.catalog.position();
    sim.replace("seg", &seg);
    sim.held_claims.insert(p("seg"), before);
    sim.held_claims.insert(p("meta"), before);
    sim.run();
    sim.assert_in_sync();
    assert_eq!(sim.leader_hashed, [p("seg")], "only the file born since");
    assert_eq!(
        sim.leader.inventory_report(),
        InventoryReport {
            held_accepted: 1,
            held_refused: 0,
            digests_compared: 1,
        }
    );
    assert_eq!(sim.leader.files_whole_total(), 0);
    assert_eq!(sim.leader.bytes_payload_total(), 50, "the tail only");
}

/// A leader session that a follower whose preamble offers `capabilities` has authenticated
/// with, and every frame it sent after its preamble.
fn leader_after_auth(catalog: &Catalog, capabilities: u32) -> (LeaderSession, Vec<Frame>) {
    leader_after_auth_with(catalog, capabilities, ForkChain::none())
}

/// `leader_after_auth`, of a leader whose instance goes on from the chain `forks`.
fn leader_after_auth_with(
    catalog: &Catalog,
    capabilities: u32,
    forks: ForkChain,
) -> (LeaderSession, Vec<Frame>) {
    let secret = Secret::new(b"s3cret".to_vec()).unwrap();
    let mut leader = LeaderSession::new(
        secret.clone(),
        [7; 32],
        Duration::from_secs(1),
        INSTANCE,
        LINEAGE,
    )
    .with_forks(forks);
    let mut input = Preamble {
        version: 1,
        capabilities,
    }
    .encode()
    .to_vec();
    Frame::Auth {
        follower_nonce: [9; 32],
        follower_mac: secret.follower_tag(&[7; 32], &[9; 32]),
    }
    .encode(&mut input);
    let n = leader
        .handle_input(&input, catalog, Instant::now())
        .unwrap();
    assert_eq!(n, input.len());
    let out = leader.take_output();
    let mut rest = &out[crate::frame::PREAMBLE_BYTES..];
    let mut frames = Vec::new();
    while let Some((frame, used)) = Frame::decode(rest).unwrap() {
        rest = &rest[used..];
        frames.push(frame);
    }
    (leader, frames)
}

/// What the leader's index frames are, for a follower whose preamble offers `capabilities`.
fn index_frames_for(catalog: &Catalog, capabilities: u32) -> Vec<Frame> {
    let (_, frames) = leader_after_auth(catalog, capabilities);
    frames
        .into_iter()
        .filter(|f| matches!(f, Frame::Index { .. } | Frame::IndexBorn { .. }))
        .collect()
}

/// What a follower whose preamble offers `ours` makes of a leader offering `theirs` that
/// sends `index` as its index: the Inventory action, or the error.
fn follower_given_index(
    ours: u32,
    theirs: u32,
    index: Frame,
) -> Result<FollowerAction, SessionError> {
    follower_given(ours, theirs, &[index, Frame::IndexEnd { count: 1 }])
}

/// What a follower whose preamble offers `ours` makes of a leader offering `theirs` that
/// sends `frames` after WELCOME: the first action, or the error.
fn follower_given(
    ours: u32,
    theirs: u32,
    frames: &[Frame],
) -> Result<FollowerAction, SessionError> {
    let secret = Secret::new(b"s3cret".to_vec()).unwrap();
    let mut follower =
        FollowerSession::new(secret.clone(), [9; 32], Durability::Written).offering(ours);
    let mut input = Preamble {
        version: 1,
        capabilities: theirs,
    }
    .encode()
    .to_vec();
    Frame::Challenge {
        leader_nonce: [7; 32],
    }
    .encode(&mut input);
    Frame::Welcome {
        leader_mac: secret.leader_tag(&[7; 32], &[9; 32]),
    }
    .encode(&mut input);
    for frame in frames {
        frame.encode(&mut input);
    }
    let mut rest = &input[..];
    loop {
        let (n, action) = follower.handle_input(rest)?;
        rest = &rest[n..];
        if let Some(action) = action {
            return Ok(action);
        }
        assert!(n > 0, "the follower stalled");
    }
}

/// BIRTHS is used only when both sides offer it and HELD: then each file of the index goes as
/// INDEX_BORN with its birth, and a plain INDEX is refused by name; an older peer on either
/// side gets and sends INDEX, as before.
#[test]
fn the_index_carries_births_only_when_both_sides_offer_them() {
    let mut catalog = Catalog::new([(p("a"), 4)]);
    catalog.replace("a", 6).unwrap();
    let born_at = catalog.get(&p("a")).unwrap().born_at;
    assert!(born_at > 0);
    let born = Frame::IndexBorn {
        len_bytes: 6,
        born_at,
        path: p("a"),
    };
    let plain = Frame::Index {
        len_bytes: 6,
        path: p("a"),
    };
    let both = CAPABILITY_HELD | CAPABILITY_BIRTHS;
    assert_eq!(
        index_frames_for(&catalog, both),
        std::slice::from_ref(&born)
    );
    for older in [0, CAPABILITY_HELD, CAPABILITY_BIRTHS] {
        assert_eq!(
            index_frames_for(&catalog, older),
            std::slice::from_ref(&plain),
            "{older}"
        );
    }

    let FollowerAction::Inventory { index, .. } =
        follower_given_index(both, both, born.clone()).unwrap()
    else {
        panic!("no inventory")
    };
    let cut = index[0].1;
    assert_eq!(cut.born_at, Some(born_at));
    assert!(cut.admits_held(6, born_at) && !cut.admits_held(6, born_at - 1));
    assert!(!cut.admits_held(7, born_at), "a longer copy");
    let FollowerAction::Inventory { index, .. } =
        follower_given_index(both, CAPABILITY_HELD, plain.clone()).unwrap()
    else {
        panic!("no inventory")
    };
    assert_eq!(index[0].1.born_at, None, "an older leader");
    assert!(index[0].1.admits_held(6, 0));

    let err = follower_given_index(both, both, plain).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(
        err.to_string().contains("BIRTHS capability is in use"),
        "{err}"
    );
    let err = follower_given_index(CAPABILITY_HELD, both, born).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(
        err.to_string().contains("BIRTHS capability is not in use"),
        "{err}"
    );
}

/// With LINEAGE offered by both, the leader names its data dir's lineage before the index, and
/// the follower hands it to its shell with the index (which declines a copy of another data
/// dir); an index without it, or a second LINEAGE, is refused by name. With an older peer on
/// either side, there is none and nothing is required.
#[test]
fn the_leader_names_its_lineage_before_the_index_when_both_sides_offer_it() {
    let lineage = Frame::Lineage { lineage: LINEAGE };
    let index = Frame::Index {
        len_bytes: 6,
        path: p("a"),
    };
    let end = Frame::IndexEnd { count: 1 };
    let all = CAPABILITY_LINEAGE;
    let FollowerAction::Inventory { lineage: got, .. } =
        follower_given(all, all, &[lineage.clone(), index.clone(), end.clone()]).unwrap()
    else {
        panic!("no inventory")
    };
    assert_eq!(got, Some(LINEAGE));
    for (ours, theirs) in [(all, 0), (0, all)] {
        let FollowerAction::Inventory { lineage: got, .. } =
            follower_given(ours, theirs, &[index.clone(), end.clone()]).unwrap()
        else {
            panic!("no inventory")
        };
        assert_eq!(got, None);
    }

    let err = follower_given(all, all, &[index.clone(), end.clone()]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(err.to_string().contains("no LINEAGE came before"), "{err}");
    let twice = [lineage.clone(), lineage.clone(), index.clone(), end.clone()];
    let err = follower_given(all, all, &twice).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    let err = follower_given(0, all, &[lineage, index, end]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame, "LINEAGE not in use");

    // The leader's side: LINEAGE after WELCOME, only to a follower that offers it.
    for (offered, sent) in [
        (CAPABILITIES, true),
        (CAPABILITY_HELD | CAPABILITY_BIRTHS, false),
    ] {
        let (_, frames) = leader_after_auth(&Catalog::new([(p("a"), 4)]), offered);
        let at = frames
            .iter()
            .position(|f| matches!(f, Frame::Lineage { .. }));
        assert_eq!(at.is_some(), sent, "{offered}");
        if let Some(at) = at {
            assert_eq!(frames[at], Frame::Lineage { lineage: LINEAGE });
            assert!(
                matches!(frames[at - 1], Frame::Instance { .. }),
                "{frames:?}"
            );
        }
    }
}

/// A leader whose instance goes on from a dead leader's (a failover) names that instance and
/// the fork's position in FORK_OF, right after INSTANCE, to a follower that offers `FORK`; the
/// follower hands both to its shell with the index, which counts its files held under that
/// instance up to the position as held under this one. Nothing of it reaches an older
/// follower, and the follower refuses one out of place or past `MAX_POSITION`.
#[test]
fn a_forked_instance_is_named_after_instance_to_a_follower_that_offers_fork() {
    let fork = Fork {
        from: [6; 16],
        position: 1234,
    };
    let catalog = Catalog::new([(p("a"), 4)]);
    for (offered, sent) in [
        (CAPABILITIES, true),
        (CAPABILITIES & !CAPABILITY_FORK, false),
        (CAPABILITY_FORK, false),
    ] {
        let forks = ForkChain::of([fork]).unwrap();
        let (_, frames) = leader_after_auth_with(&catalog, offered, forks);
        let at = frames
            .iter()
            .position(|f| matches!(f, Frame::ForkOf { .. }));
        assert_eq!(at.is_some(), sent, "{offered}");
        if let Some(at) = at {
            let want = Frame::ForkOf {
                instance: fork.from,
                position: fork.position,
            };
            assert_eq!(frames[at], want);
            assert!(
                matches!(frames[at - 1], Frame::Instance { .. }),
                "{frames:?}"
            );
        }
    }
    let (_, frames) = leader_after_auth_with(&catalog, CAPABILITIES, ForkChain::none());
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::ForkOf { .. })),
        "no fork, no FORK_OF: {frames:?}"
    );

    let held = CAPABILITY_HELD | CAPABILITY_FORK;
    let instance = Frame::Instance { instance: INSTANCE };
    let fork_of = |position| Frame::ForkOf {
        instance: fork.from,
        position,
    };
    let index = Frame::Index {
        len_bytes: 4,
        path: p("a"),
    };
    let end = Frame::IndexEnd { count: 1 };
    let inventory = |frames: &[Frame]| match follower_given(held, held, frames) {
        Ok(FollowerAction::Inventory {
            instance: got,
            forks,
            ..
        }) => Ok((got, forks.first().copied())),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    };
    let frames = [instance.clone(), fork_of(1234), index.clone(), end.clone()];
    assert_eq!(inventory(&frames).unwrap(), (Some(INSTANCE), Some(fork)));
    let frames = [instance.clone(), index.clone(), end.clone()];
    assert_eq!(inventory(&frames).unwrap(), (Some(INSTANCE), None));

    let max = crate::frame::MAX_POSITION;
    let frames = [
        instance.clone(),
        fork_of(max + 1),
        index.clone(),
        end.clone(),
    ];
    let err = inventory(&frames).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Limit, "{err}");
    assert!(err.to_string().contains("MAX_POSITION"), "{err}");
    for (why, frames) in [
        ("before INSTANCE", vec![fork_of(1), instance.clone()]),
        ("twice", vec![instance.clone(), fork_of(1), fork_of(1)]),
        (
            "after the index began",
            vec![instance.clone(), index.clone(), fork_of(1)],
        ),
    ] {
        let err = inventory(&frames).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadFrame, "{why}: {err}");
    }
    let not_in_use = [instance, fork_of(1), index, end];
    let err = follower_given(CAPABILITY_HELD, held, &not_in_use).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame, "FORK not in use: {err}");
}

/// A leader whose instance is a fork of a fork names every link of its chain, in order, to a
/// follower that offers `FORK_CHAIN` (the first link only to one offering `FORK` alone), and
/// the follower hands the whole chain to its shell; it refuses a link whose position is above
/// the one before's, and more than `MAX_FORK_CHAIN` links.
#[test]
fn a_fork_chain_is_named_link_by_link_to_a_follower_that_offers_fork_chain() {
    let link = |from: u8, position| Fork {
        from: [from; 16],
        position,
    };
    let chain = ForkChain::of([link(6, 900), link(5, 500), link(4, 300)]).unwrap();
    let catalog = Catalog::new([(p("a"), 4)]);
    for (offered, links) in [
        (CAPABILITIES, 3),
        (CAPABILITIES & !CAPABILITY_FORK_CHAIN, 1),
        (CAPABILITIES & !CAPABILITY_FORK, 0),
    ] {
        let (_, frames) = leader_after_auth_with(&catalog, offered, chain.clone());
        let sent: Vec<Fork> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::ForkOf { instance, position } => Some(Fork {
                    from: *instance,
                    position: *position,
                }),
                _ => None,
            })
            .collect();
        assert_eq!(sent, chain.links()[..links], "offering {offered:#x}");
    }

    let with_chain = CAPABILITY_HELD | CAPABILITY_FORK | CAPABILITY_FORK_CHAIN;
    let given = |links: &[Fork]| {
        let mut frames = vec![Frame::Instance { instance: INSTANCE }];
        frames.extend(links.iter().map(|l| Frame::ForkOf {
            instance: l.from,
            position: l.position,
        }));
        frames.push(Frame::Index {
            len_bytes: 4,
            path: p("a"),
        });
        frames.push(Frame::IndexEnd { count: 1 });
        match follower_given(with_chain, with_chain, &frames) {
            Ok(FollowerAction::Inventory { forks, .. }) => Ok(forks),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        }
    };
    assert_eq!(given(chain.links()).unwrap(), chain);
    let err = given(&[link(6, 900), link(5, 901)]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame, "{err}");
    assert!(err.to_string().contains("never rise"), "{err}");
    let too_long = vec![link(3, 7); MAX_FORK_CHAIN + 1];
    assert_eq!(given(&too_long[..MAX_FORK_CHAIN]).unwrap().links().len(), 8);
    let err = given(&too_long).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Limit, "{err}");
    assert!(err.to_string().contains("MAX_FORK_CHAIN"), "{err}");
}

/// What a held record cannot vouch for: another leader instance's positions, a position this
/// leader never reached, a copy longer than the leader's cut. Each is sent whole.
#[test]
fn held_records_of_another_instance_a_future_position_or_a_longer_copy_are_refused() {
    let mut sim = Sim::new(
        files(&[("a", b"aaaa"), ("b", b"bbbb"), ("c", b"cccc")]),
        Files::new(),
    );
    sim.handshake_until(|sim| sim.leader.phase() == LeaderPhase::AwaitInventory);
    sim.to_leader.clear();
    let position = sim.catalog.position();
    for (path, len_bytes, position, instance) in [
        ("a", 4, position, [6; 16]),
        ("b", 4, position + 1, INSTANCE),
        ("c", 5, position, INSTANCE),
    ] {
        Frame::HaveHeld {
            len_bytes,
            position,
            instance,
            path: p(path),
        }
        .encode(&mut sim.to_leader);
    }
    Frame::HaveEnd {
        count: 3,
        durability: Durability::Written,
    }
    .encode(&mut sim.to_leader);
    sim.leader
        .handle_input(&sim.to_leader, &sim.catalog, sim.now)
        .unwrap();
    let requests = sim.leader.digest_requests().unwrap();
    assert!(requests.is_empty(), "nothing to hash: {requests:?}");
    sim.leader.digests_ready(Vec::new());
    assert_eq!(
        sim.leader.inventory_report(),
        InventoryReport {
            held_accepted: 0,
            held_refused: 3,
            digests_compared: 0,
        }
    );
    assert_eq!(sim.leader.sync_progress(), Some((0, 12)), "all three whole");
}

/// HELD is used only when both preambles offer it: to a follower that does not, the leader
/// sends no INSTANCE, and a HAVE_HELD from it is refused by name.
#[test]
fn without_the_held_capability_there_is_no_instance_and_have_held_is_a_bad_frame() {
    let catalog = Catalog::new([(p("a"), 4)]);
    let (mut leader, frames) = leader_after_auth(&catalog, 0);
    let names: Vec<&str> = frames.iter().map(Frame::name).collect();
    assert_eq!(names, ["CHALLENGE", "WELCOME", "INDEX", "INDEX_END"]);

    let mut held = Vec::new();
    Frame::HaveHeld {
        len_bytes: 4,
        position: 4,
        instance: INSTANCE,
        path: p("a"),
    }
    .encode(&mut held);
    let err = leader
        .handle_input(&held, &catalog, Instant::now())
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(err.to_string().contains("HELD capability"), "{err}");
}

/// The shell copies the catalog for a connection, and joins the writers' changes, only when
/// its input may authenticate it: a whole AUTH after a valid preamble. Before that, a peer that
/// sends nothing, part of a frame or a bad preamble is fed with no catalog.
#[test]
fn a_connection_may_authenticate_only_with_a_whole_auth_after_a_valid_preamble() {
    let secret = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
    let mut leader = LeaderSession::new(secret, [7; 32], Duration::from_secs(1), INSTANCE, LINEAGE);
    let preamble = Preamble::ours().encode();
    let mut auth = Vec::new();
    Frame::Auth {
        follower_nonce: [1; 32],
        follower_mac: [2; 32],
    }
    .encode(&mut auth);
    let with_auth: Vec<u8> = preamble.iter().chain(&auth).copied().collect();
    assert!(!leader.may_authenticate(&[]));
    assert!(!leader.may_authenticate(&preamble));
    assert!(!leader.may_authenticate(&with_auth[..with_auth.len() - 1]));
    assert!(leader.may_authenticate(&with_auth));
    let mut bad = with_auth.clone();
    bad[0] ^= 0xff;
    assert!(
        !leader.may_authenticate(&bad),
        "a bad preamble fails without the catalog"
    );
    // Past the preamble, the AUTH alone.
    let n = leader
        .handle_input(&preamble, &Catalog::new([]), Instant::now())
        .unwrap();
    assert_eq!(n, preamble.len());
    assert_eq!(leader.phase(), LeaderPhase::AwaitAuth);
    assert!(!leader.may_authenticate(&auth[..3]));
    assert!(leader.may_authenticate(&auth));
}

/// What a follower sends a leader whose nonce is `[7; 32]` to authenticate with `secret`: our
/// preamble and AUTH (its nonce `[9; 32]`).
fn preamble_and_auth(secret: &Secret) -> Vec<u8> {
    let mut input = Preamble::ours().encode().to_vec();
    Frame::Auth {
        follower_nonce: [9; 32],
        follower_mac: secret.follower_tag(&[7; 32], &[9; 32]),
    }
    .encode(&mut input);
    input
}

/// During a rotation the leader also holds the previous secret: a follower with either
/// authenticates, and gets a WELCOME it can check with its own; the session says which one
/// was used; a follower with any other secret is refused as before.
#[test]
fn a_leader_in_a_rotation_accepts_the_current_and_the_previous_secret() {
    let current = Secret::new(b"the new secret, 32 bytes or so..".to_vec()).unwrap();
    let previous = Secret::new(b"the old secret, 32 bytes or so..".to_vec()).unwrap();
    let other = Secret::new(b"somebody else's secret, whatever".to_vec()).unwrap();
    for (follower_secret, outcome) in [
        (&current, Some(false)),
        (&previous, Some(true)),
        (&other, None),
    ] {
        let mut leader = LeaderSession::new(
            current.clone(),
            [7; 32],
            Duration::from_secs(1),
            INSTANCE,
            LINEAGE,
        )
        .with_previous_secret(Some(previous.clone()));
        let input = preamble_and_auth(follower_secret);
        let result = leader.handle_input(&input, &Catalog::new([]), Instant::now());
        match outcome {
            Some(used_previous) => {
                assert!(result.is_ok(), "{result:?}");
                assert_eq!(leader.used_previous_secret(), used_previous);
                let out = leader.take_output();
                let rest = &out[crate::frame::PREAMBLE_BYTES..];
                let (_challenge, used) = Frame::decode(rest).unwrap().unwrap();
                let (welcome, _) = Frame::decode(&rest[used..]).unwrap().unwrap();
                let Frame::Welcome { leader_mac } = welcome else {
                    panic!("not a WELCOME: {welcome:?}");
                };
                assert_eq!(leader_mac, follower_secret.leader_tag(&[7; 32], &[9; 32]));
            }
            None => assert!(
                matches!(result, Err(SessionError::AuthFailed(_))),
                "{result:?}"
            ),
        }
    }
}

/// A leader's secrets change while it runs (a rotation through etcd). A session not yet
/// authenticated checks AUTH against the new ones; one that authenticated with a secret the
/// leader still holds, as the previous one, goes on; once the leader no longer holds it, the
/// session ends with ERROR `AUTH_FAILED` saying why.
#[test]
fn a_leader_cuts_off_a_follower_whose_secret_was_rotated_out() {
    let old = Secret::new(b"the old secret, 32 bytes or so..".to_vec()).unwrap();
    let new = Secret::new(b"the new secret, 32 bytes or so..".to_vec()).unwrap();
    let session = || {
        LeaderSession::new(
            old.clone(),
            [7; 32],
            Duration::from_secs(1),
            INSTANCE,
            LINEAGE,
        )
    };

    let mut leader = session();
    let input = preamble_and_auth(&old);
    leader
        .handle_input(&input, &Catalog::new([]), Instant::now())
        .unwrap();
    leader.take_output();
    // The rotation starts: the old secret is the previous one, still held.
    leader.set_secrets(new.clone(), Some(old.clone())).unwrap();
    assert!(!leader.has_output());
    // It ends.
    let e = leader.set_secrets(new.clone(), None).unwrap_err();
    assert!(
        matches!(&e, SessionError::AuthFailed(m) if m.contains("rotated out")),
        "{e:?}"
    );
    leader.fail(&e);
    let out = leader.take_output();
    let (frame, _) = Frame::decode(&out).unwrap().unwrap();
    assert!(
        matches!(
            frame,
            Frame::Error {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{frame:?}"
    );

    // Before AUTH arrives, the new secrets are the ones it is checked against.
    let mut leader = session();
    leader.set_secrets(new.clone(), None).unwrap();
    let result = leader.handle_input(&preamble_and_auth(&old), &Catalog::new([]), Instant::now());
    assert!(
        matches!(result, Err(SessionError::AuthFailed(_))),
        "{result:?}"
    );
    let mut leader = session();
    leader.set_secrets(new.clone(), None).unwrap();
    let result = leader.handle_input(&preamble_and_auth(&new), &Catalog::new([]), Instant::now());
    assert!(result.is_ok(), "{result:?}");
}

/// A file renamed on the leader (a segment renamed before its deletion, a directory renamed)
/// is moved on the follower that holds all of it: no byte of it is sent again
/// (`docs/PROTOCOL.md`, *Renames*); its new generation's birth comes first.
#[test]
fn a_renamed_file_the_follower_holds_moves_there_without_its_bytes() {
    let seg = big(3 * MAX_DATA_BYTES as usize / 2, 7);
    let mut sim = Sim::new(
        files(&[("t-0/00.log", &seg), ("t-0/00.index", b"index")]),
        Files::new(),
    );
    sim.run();
    sim.begun_whole.clear();
    sim.rename("t-0/00.log", "t-0/00.log.deleted");
    sim.rename("t-0/00.index", "t-0.x-delete/00.index");
    let sent = sim.run();
    sim.assert_in_sync();
    assert_eq!(sent, 0, "nothing shipped again");
    assert_eq!(
        sim.renamed,
        [
            (p("t-0/00.log"), p("t-0/00.log.deleted")),
            (p("t-0/00.index"), p("t-0.x-delete/00.index"))
        ]
    );
    assert_eq!(sim.leader.files_renamed_total(), 2);
    assert!(sim.begun_whole.is_empty(), "{:?}", sim.begun_whole);
    let moved = sim.catalog.get(&p("t-0/00.log.deleted")).unwrap();
    assert_eq!(
        sim.births.get(&p("t-0/00.log.deleted")),
        Some(moved.born_at)
    );
    assert_eq!(sim.births.get(&p("t-0/00.log")), None);
    // Over a file the follower holds: still nothing sent; and appends to it go on. (Appended
    // before the follower heard of the rename, it would go whole: see the next test.)
    sim.rename("t-0/00.log.deleted", "t-0.x-delete/00.index");
    assert_eq!(sim.run(), 0);
    sim.append("t-0.x-delete/00.index", b"more");
    assert_eq!(sim.run(), 4);
    sim.assert_in_sync();
    let position = sim.catalog.position();
    assert_eq!(sim.leader.lag().acked(), [position; 3]);
}

/// Where the follower holds the renamed file only in part (the leader's last bytes of it not
/// sent before the rename), or its build does not know RENAME, the new name ships whole as
/// before: never a prefix under the new name that the leader's file there never was.
#[test]
fn a_renamed_file_goes_whole_to_a_follower_that_lacks_some_of_it_or_rename() {
    for (capabilities, held_in_part) in [
        (CAPABILITIES, true),
        (CAPABILITIES & !CAPABILITY_RENAME, false),
    ] {
        let mut sim = Sim::new(files(&[("state.json.tmp", b"{\"v\":")]), Files::new())
            .follower_offering(capabilities);
        sim.run();
        sim.begun_whole.clear();
        if held_in_part {
            sim.append("state.json.tmp", b"1}");
        }
        sim.rename("state.json.tmp", "state.json");
        let sent = sim.run();
        sim.assert_in_sync();
        let whole = sim.leader_files[&p("state.json")].len() as u64;
        assert_eq!(sent, whole, "capabilities {capabilities:#x}");
        assert_eq!(sim.begun_whole, [p("state.json")]);
        assert!(sim.renamed.is_empty());
    }
}

/// Renames in a row before the follower hears of them (a compaction's `.cleaned` to `.swap` to
/// `.log`, while the old `.log` becomes `.deleted`) move each copy once, the old `.log` out of
/// the way first; a swap of two names through a third ends in sync.
#[test]
fn renames_in_a_row_move_each_copy_once_and_a_swap_ends_in_sync() {
    let mut sim = Sim::new(
        files(&[("p/00.log", b"old segment"), ("p/00.cleaned", b"compacted")]),
        Files::new(),
    );
    sim.run();
    sim.rename("p/00.cleaned", "p/00.swap");
    sim.rename("p/00.log", "p/00.log.deleted");
    sim.rename("p/00.swap", "p/00.log");
    assert_eq!(sim.run(), 0);
    sim.assert_in_sync();
    let mut renamed = sim.renamed.clone();
    renamed.sort();
    assert_eq!(
        renamed,
        [
            (p("p/00.cleaned"), p("p/00.log")),
            (p("p/00.log"), p("p/00.log.deleted"))
        ]
    );
    // Whichever path is planned first, the old `.log` moves before the new one lands there.
    assert_eq!(sim.renamed[0], (p("p/00.log"), p("p/00.log.deleted")));
    sim.rename("p/00.log", "p/tmp");
    sim.rename("p/00.log.deleted", "p/00.log");
    sim.rename("p/tmp", "p/00.log.deleted");
    sim.run();
    sim.assert_in_sync();
}

/// A RENAME to a follower that did not offer `RENAME` (an older build would not know it) is out
/// of order, naming the capability.
#[test]
fn a_rename_without_the_rename_capability_is_refused_by_the_follower() {
    let mut sim = Sim::new(files(&[("a", b"1")]), Files::new())
        .follower_offering(CAPABILITIES & !CAPABILITY_RENAME);
    sim.run();
    Frame::Rename {
        from: p("a"),
        to: p("b"),
    }
    .encode(&mut sim.to_follower);
    sim.step_follower();
    let err = sim.follower_error.expect("refused");
    assert!(
        matches!(
            err,
            SessionError::OutOfOrder {
                frame: "RENAME",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("RENAME capability"), "{err}");
    assert!(sim.renamed.is_empty());
}
