//! A real leader and a real follower, past a valid handshake, driven by a fuzzer-chosen script:
//! steps of either side (the leader with a transmit budget, as a full socket would impose),
//! changes on the leader (append, replace, truncate, delete, rename; and rewrites or deletes of a file
//! that the change source reports only later, so payload ranges vanish under the leader), time,
//! bytes injected into either direction, raw or as well-formed frames, and reconnections (the
//! connection dropped, or the follower killed; the leader restarted gracefully, resuming its
//! instance from its record, or killed and resuming from its last checkpoint, whose
//! reservation, small here, holds MARKs back until the next), after which the follower
//! reports the files its held record
//! vouches for as HAVE_HELD (bit 4 of `options`: a follower that does not offer `BIRTHS`, as an
//! older build, so it claims files the leader then refuses). This reaches the inventory,
//! initial sync, DATA/BEGIN_WHOLE/COMMIT_WHOLE, MARK, ACK and held-record paths that bytes
//! alone cannot reach past the HMAC.
//!
//! Input: `[leader_files, follower_files_lo, follower_files_hi, options, ops...]` (see `setup`
//! and `Op`). Asserts everything the single-session harnesses do on both sides, and, when the
//! script injected nothing: at every MARK the follower reads, it holds every append at or below
//! that position, or what the file became behind the catalog (`ferry_fuzz::Claims`); neither
//! side fails; with `BIRTHS`, the leader refuses none of the follower's held claims; and once
//! every change has been reported and both sides have settled, the follower's files equal the
//! leader's, both are streaming, the follower has acked the leader's position at every level,
//! and the birth it would keep with each copy for a handoff is never below the leader's (with
//! `BORN`, exactly the leader's).
#![no_main]

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use ferry::frame::{Durability, Frame, CAPABILITY_HELD, KEEPALIVE_INTERVAL_MS};
use ferry::paths::RelPath;
use ferry::session::follower::FollowerPhase;
use ferry::session::leader::LeaderPhase;
use ferry_fuzz::{
    files_diff, p, pattern, sha1, Claims, Files, FollowerShell, LeaderShell, LEADER_INSTANCE,
};
use libfuzzer_sys::fuzz_target;

/// The paths a script works on: the first six may exist at the start; 20 in all, more than
/// `MAX_WHOLE_IN_FLIGHT`, so open whole-file transfers can pile up.
const PATHS: [&str; 20] = [
    "a",
    "meta.json",
    "q/1/seg.0",
    "q/1/seg.1",
    "q/2/seg.0",
    "d/e/f",
    "x00",
    "x01",
    "x02",
    "x03",
    "x04",
    "x05",
    "x06",
    "x07",
    "x08",
    "x09",
    "x10",
    "x11",
    "x12",
    "x13",
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        let b = self.bytes(8);
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v)
    }
}

struct Pair {
    leader: LeaderShell,
    follower: FollowerShell,
    paths: Vec<RelPath>,
    /// Changes made to the leader's files and not yet reported to the catalog.
    unreported: Vec<RelPath>,
    injected: bool,
    version: u8,
    /// The follower offers `BIRTHS` (it does unless it is an older build).
    births: bool,
    /// Files changed on the leader's disk since its last checkpoint: their stamps differ from
    /// the checkpoint's, so a leader that dies and resumes from it does not vouch for them.
    changed_since_checkpoint: HashSet<RelPath>,
}

impl Pair {
    fn path(&self, b: u8) -> RelPath {
        self.paths[usize::from(b) % self.paths.len()].clone()
    }

    fn step_leader(&mut self, budget: usize) -> bool {
        let consumed = self.leader.handle();
        let out = self.leader.drive(budget);
        for (path, at) in std::mem::take(&mut self.leader.recorded_unreported) {
            self.recorded_as_it_is(&path, at);
        }
        let moved = consumed || !out.is_empty();
        self.follower.inbuf.extend(out);
        moved
    }

    fn step_follower(&mut self) -> bool {
        let (moved, out) = self.follower.step();
        self.leader.inbuf.extend(out);
        moved
    }

    /// The connection drops (`graceful`) or the follower is killed, and both sides start a
    /// new one, through the handshake and the follower's inventory, where the files its held
    /// record vouches for go as HAVE_HELD. With `leader_restarts`, the connection ends because
    /// the leader stopped gracefully and started again, resuming its instance: its new catalog
    /// holds the files as the disk has them, born anew where the record could not vouch.
    fn reconnect(&mut self, graceful: bool, leader_restarts: bool, leader_dies: bool) {
        self.check_no_held_claim_refused();
        if leader_dies && self.leader.has_checkpoint() {
            // What the disk has is what the next run catalogs; nothing is left to report.
            // Every path the dead run knew of (cataloged, changed since its checkpoint or behind
            // the catalog) and every file on the disk:
            let mut paths: BTreeSet<RelPath> = self
                .leader
                .catalog
                .snapshot()
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            paths.extend(self.unreported.drain(..));
            paths.extend(self.leader.files.keys().cloned());
            let changed = std::mem::take(&mut self.changed_since_checkpoint);
            paths.extend(changed.iter().cloned());
            self.leader.crash_restart(&changed);
            // What the record does not vouch for is as the disk has it from the new run's
            // start: a file born anew, or gone (the initial sync deletes the follower's copy
            // before the first MARK, and every MARK of the new run is at or above `born`;
            // without that, a claim of the dead run's outlived the file, and a file created
            // later under the path was held against it).
            let born = self.leader.catalog.position();
            for path in &paths {
                if self
                    .leader
                    .catalog
                    .get(path)
                    .is_none_or(|e| e.born_at == born)
                {
                    self.recorded_as_it_is(path, Some(born));
                }
            }
        } else if leader_restarts {
            let unreported = std::mem::take(&mut self.unreported);
            self.leader.restart(&unreported);
            let born = self.leader.catalog.position();
            for path in &unreported {
                self.recorded_as_it_is(path, Some(born));
            }
        } else {
            self.leader.reconnect();
        }
        if leader_restarts || leader_dies {
            self.changed_since_checkpoint.clear();
        }
        self.follower.reconnect(graceful);
        self.step_leader(0);
        self.step_follower();
        self.step_leader(0);
        self.step_follower();
    }

    /// With `BIRTHS`, the follower claims as held only what the leader accepts: it sees each
    /// file's birth in the index, and MARKs never go past the leader's position.
    fn check_no_held_claim_refused(&self) {
        if self.births && !self.injected {
            let report = self.leader.session.inventory_report();
            assert_eq!(report.held_refused, 0, "held claims refused: {report:?}");
        }
    }

    /// A checkpoint of the leader's record, reserving `reserve` positions above its own.
    fn checkpoint(&mut self, reserve: u64) {
        self.leader.checkpoint(&self.unreported, reserve);
        self.changed_since_checkpoint.clear();
    }

    /// `path` changed on the leader's disk.
    fn touched(&mut self, path: &RelPath) {
        self.changed_since_checkpoint.insert(path.clone());
    }

    /// Both sides until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let a = self.step_leader(0);
            let b = self.step_follower();
            if !a && !b {
                return;
            }
        }
        panic!("the sessions did not settle");
    }

    fn contents(&mut self, len: usize) -> Vec<u8> {
        self.version = self.version.wrapping_add(1);
        pattern(len, self.version)
    }

    fn append(&mut self, path: RelPath, n: usize) {
        let bytes = self.contents(n);
        if n == 0 && !self.leader.files.contains_key(&path) {
            // An empty append creates the file without moving the position: a MARK at it may
            // come before or after the creation.
            self.forget(&path);
        }
        self.touched(&path);
        let file = self.leader.files.entry(path.clone()).or_default();
        let offset = file.len() as u64;
        file.extend_from_slice(&bytes);
        let recorded_len = self.recorded_len(&path);
        let at = self
            .leader
            .record(path.clone(), |c, p| c.append(p, offset, n as u64));
        if self.unreported.contains(&path) {
            // A file changed behind the catalog, grown: one more state it has had.
            let now = self.leader.files.get(&path).cloned();
            self.claims_behind(&path, now.as_deref(), recorded_len);
        } else if let Some(position) = at {
            // (An empty append moves no position: a MARK at it may be one sent before it.)
            if let Some(claims) = &mut self.follower.claims {
                claims.appended(&path, position, &self.leader.files[&path]);
            }
        }
    }

    fn recorded_len(&self, path: &RelPath) -> u64 {
        self.leader.catalog.get(path).map_or(0, |e| e.len_bytes)
    }

    /// A change to `path` was recorded: the claims of its appends end there.
    fn forget(&mut self, path: &RelPath) {
        if let Some(claims) = &mut self.follower.claims {
            claims.forget(path);
        }
    }

    /// `path` holds `now` (`None`: deleted) behind the catalog, which says `recorded_len`.
    fn claims_behind(&mut self, path: &RelPath, now: Option<&[u8]>, recorded_len: u64) {
        if let Some(claims) = &mut self.follower.claims {
            match now {
                // As long as recorded or longer: its bytes may ship as a tail (`Claims`).
                Some(b) if b.len() as u64 >= recorded_len => claims.forget(path),
                _ => claims.changed_behind(path, now),
            }
        }
    }

    /// `path` rewritten (`Some`) or deleted behind the catalog's back, reported later.
    fn change_behind(&mut self, path: RelPath, bytes: Option<Vec<u8>>) {
        let recorded_len = self.recorded_len(&path);
        self.claims_behind(&path, bytes.as_deref(), recorded_len);
        self.touched(&path);
        match bytes {
            Some(b) => self.leader.files.insert(path.clone(), b),
            None => self.leader.files.remove(&path),
        };
        self.unreported.push(path);
    }

    fn replace(&mut self, path: RelPath, len: usize) {
        let bytes = self.contents(len);
        self.touched(&path);
        self.leader.files.insert(path.clone(), bytes);
        let at = self
            .leader
            .record(path.clone(), |c, p| c.replace(p, len as u64));
        self.rewritten(&path, at);
    }

    /// A rewrite or delete of `path` was recorded, `at` the position after it: what every MARK
    /// at or past it claims. (`None`: no change was recorded, a file deleted from the disk
    /// only; what it held is no longer known.)
    fn rewritten(&mut self, path: &RelPath, at: Option<u64>) {
        match (at, &mut self.follower.claims) {
            (Some(at), Some(claims)) => {
                claims.rewritten(path, at, self.leader.files.get(path).map(Vec::as_slice))
            }
            (None, _) => self.forget(path),
            (Some(_), None) => {}
        }
    }

    /// A file cut short, reported as the watcher (and `Leader::apply`) reports a shrink: as a
    /// rewrite. (`Catalog::truncate`, which keeps the generation, has no caller in ferry; used
    /// here, a truncate then an append before the leader ships the path leaves the follower
    /// with stale bytes in the truncated range, since only the growth is sent.)
    fn truncate(&mut self, path: RelPath, b: u8) {
        let Some(file) = self.leader.files.get_mut(&path) else {
            return;
        };
        let len = usize::from(b) % (file.len() + 1);
        file.truncate(len);
        self.touched(&path);
        let at = self
            .leader
            .record(path.clone(), |c, p| c.replace(p, len as u64));
        self.rewritten(&path, at);
    }

    /// A rename on the leader's disk, then reported (`rename_file`). Not of a file changed
    /// behind the catalog and not yet reported: the change source would report that change
    /// under the new name, which this script does not model.
    fn rename(&mut self, from: RelPath, to: RelPath) {
        let behind = |p: &RelPath| self.unreported.contains(p);
        if from == to || behind(&from) || behind(&to) {
            return;
        }
        let Some(bytes) = self.leader.files.remove(&from) else {
            return;
        };
        self.touched(&from);
        self.touched(&to);
        self.leader.files.insert(to.clone(), bytes);
        let at = self.leader.record_rename(&from, &to);
        self.rewritten(&from, at);
        self.rewritten(&to, at);
    }

    fn delete(&mut self, path: RelPath) {
        self.touched(&path);
        self.leader.files.remove(&path);
        let at = self.leader.record(path.clone(), |c, p| c.delete(p));
        self.rewritten(&path, at);
    }

    /// What the change source reports for each file changed behind the catalog's back.
    fn report(&mut self) {
        for path in std::mem::take(&mut self.unreported) {
            let at = self.leader.record_as_it_is(path.clone());
            self.recorded_as_it_is(&path, at);
        }
    }

    /// `path` was recorded as the disk has it (`at`: the position after, if that moved it):
    /// the claims made before, on a file changed behind the catalog, end there, and the
    /// recorded state is claimed from `at` on.
    fn recorded_as_it_is(&mut self, path: &RelPath, at: Option<u64>) {
        self.forget(path);
        self.rewritten(path, at);
    }

    /// A well-formed frame the follower side could send, with fields from the script.
    fn frame_to_leader(&mut self, input: &mut Input) {
        let kind = input.byte().unwrap_or(0);
        let path = self.path(input.byte().unwrap_or(0));
        let mark = self.leader.wire.mark_last().unwrap_or(0);
        let frame = match kind % 4 {
            // A held record, of this leader or another, as of the last MARK or before it.
            0 if kind & 8 != 0 => Frame::HaveHeld {
                len_bytes: u64::from(input.byte().unwrap_or(0)),
                position: mark.saturating_sub(u64::from(input.byte().unwrap_or(0))),
                instance: if kind & 16 == 0 {
                    LEADER_INSTANCE
                } else {
                    [kind; 16]
                },
                path,
            },
            0 => {
                let len = u64::from(input.byte().unwrap_or(0));
                // Half the time the digest the leader will find, so the resume paths run.
                let digest = match (kind & 4, self.leader.files.get(&path)) {
                    (0, Some(b)) => sha1(&b[..b.len().min(len as usize)]),
                    _ => [0; 20],
                };
                Frame::Have {
                    len_bytes: len,
                    digest,
                    path,
                }
            }
            1 => Frame::HaveEnd {
                count: u64::from(input.byte().unwrap_or(0)),
                durability: Durability::ALL[usize::from(kind >> 2) % 3],
            },
            2 => Frame::NodeId {
                id: format!("node-{kind}"),
            },
            _ => {
                let back = |b: Option<u8>| mark.saturating_sub(u64::from(b.unwrap_or(0)));
                Frame::Ack {
                    received: back(input.byte()),
                    written: back(input.byte()),
                    synced: back(input.byte()),
                }
            }
        };
        frame.encode(&mut self.leader.inbuf);
    }

    /// A well-formed frame the leader side could send, with fields from the script.
    fn frame_to_follower(&mut self, input: &mut Input) {
        let kind = input.byte().unwrap_or(0);
        let path = self.path(input.byte().unwrap_or(0));
        let n = u64::from(input.byte().unwrap_or(0));
        let out = &mut self.follower.inbuf;
        match kind % 8 {
            0 if kind & 8 != 0 => Frame::IndexBorn {
                len_bytes: n,
                born_at: input.u64(),
                path,
            }
            .encode(out),
            0 => Frame::Index { len_bytes: n, path }.encode(out),
            1 => Frame::IndexEnd { count: n }.encode(out),
            2 => {
                let offset = input.u64() % 4096;
                Frame::Data {
                    temp: kind & 8 != 0,
                    offset,
                    data_len: n as u32,
                    path,
                }
                .encode(out);
                out.extend(pattern(n as usize, kind));
            }
            3 => Frame::BeginWhole { len_bytes: n, path }.encode(out),
            4 => Frame::CommitWhole { path }.encode(out),
            5 => Frame::Truncate { len_bytes: n, path }.encode(out),
            6 => Frame::Delete { path }.encode(out),
            _ => {
                let last = self.follower.marks.last().map_or(0, |m| m.0);
                Frame::Mark {
                    position: (last + n).saturating_sub(16),
                    sync_done: kind & 8 != 0,
                }
                .encode(out)
            }
        }
    }
}

/// Initial files: bit `i` of `leader_sel` puts path `i` (of the first six) on the leader;
/// two bits per path of `follower_sel` give the follower's copy: none, a prefix of the
/// leader's, a longer copy starting with the leader's bytes, or different bytes.
fn setup(leader_sel: u8, follower_sel: u16) -> (Files, Files) {
    let mut leader = Files::new();
    let mut follower = Files::new();
    for (i, name) in PATHS.iter().take(6).enumerate() {
        let len = [5, 2, 3000, 0, 700, 40][i];
        let bytes = pattern(len, i as u8);
        let present = leader_sel & (1 << i) != 0;
        let copy = match (follower_sel >> (2 * i)) & 3 {
            0 => None,
            1 => Some(bytes[..len / 2].to_vec()),
            2 => Some([bytes.as_slice(), b"tail"].concat()),
            _ => Some(pattern(len.max(1), 0x80 | i as u8)),
        };
        if present {
            leader.insert(p(name), bytes);
        }
        if let Some(copy) = copy {
            follower.insert(p(name), copy);
        }
    }
    (leader, follower)
}

fuzz_target!(|data: &[u8]| {
    let [leader_sel, lo, hi, options, script @ ..] = data else {
        return;
    };
    let (leader_files, follower_files) = setup(*leader_sel, u16::from_le_bytes([*lo, *hi]));
    let durability = Durability::ALL[usize::from(options % 3)];
    let births = options & 16 == 0;
    let mut follower = FollowerShell::new(follower_files, durability, options & 4 != 0);
    if !births {
        follower = follower.offering(CAPABILITY_HELD);
    }
    follower.claims = Some(Claims::default());
    let mut pair = Pair {
        leader: LeaderShell::new(leader_files, Instant::now()),
        follower,
        paths: PATHS.iter().map(|s| p(s)).collect(),
        unreported: Vec::new(),
        injected: false,
        version: 0,
        births,
        changed_since_checkpoint: HashSet::new(),
    };
    // The handshake: preambles, CHALLENGE, AUTH, WELCOME and the index. Bit 3 of `options`
    // goes on to the end of the initial sync before the script runs.
    pair.step_leader(0);
    pair.step_follower();
    pair.step_leader(0);
    pair.step_follower();
    assert_eq!(pair.leader.session.phase(), LeaderPhase::AwaitInventory);
    assert_eq!(pair.follower.session.phase(), FollowerPhase::Streaming);
    if options & 8 != 0 {
        pair.settle();
    }

    let mut input = Input(script);
    let mut ops = 0;
    while let Some(op) = input.byte() {
        ops += 1;
        if ops > 512 {
            break;
        }
        match op % 16 {
            0 => {
                let n = usize::from(input.byte().unwrap_or(0));
                let bytes = input.bytes(n).to_vec();
                pair.leader.inbuf.extend(bytes);
                pair.injected = true;
            }
            1 => {
                let n = usize::from(input.byte().unwrap_or(0));
                let bytes = input.bytes(n).to_vec();
                pair.follower.inbuf.extend(bytes);
                pair.injected = true;
            }
            2 => {
                let budget = usize::from(input.byte().unwrap_or(0) % 8);
                pair.step_leader(budget);
            }
            3 => {
                pair.step_follower();
            }
            4 => {
                let path = pair.path(input.byte().unwrap_or(0));
                let n = usize::from(input.byte().unwrap_or(0));
                pair.append(path, n);
            }
            5 => {
                let path = pair.path(input.byte().unwrap_or(0));
                let len = usize::from(input.byte().unwrap_or(0)) * 16;
                pair.replace(path, len);
            }
            6 => {
                let path = pair.path(input.byte().unwrap_or(0));
                pair.truncate(path, input.byte().unwrap_or(0));
            }
            7 => {
                let path = pair.path(input.byte().unwrap_or(0));
                pair.delete(path);
            }
            8 => {
                let ms = u64::from(input.byte().unwrap_or(0)) * 10;
                pair.leader.now += Duration::from_millis(ms);
            }
            9 => {
                // Rewritten (shorter or longer) behind the catalog's back, reported later.
                let path = pair.path(input.byte().unwrap_or(0));
                let len = usize::from(input.byte().unwrap_or(0)) * 8;
                let bytes = pair.contents(len);
                pair.change_behind(path, Some(bytes));
            }
            10 => {
                let path = pair.path(input.byte().unwrap_or(0));
                pair.change_behind(path, None);
            }
            11 => pair.report(),
            15 => {
                let from = pair.path(input.byte().unwrap_or(0));
                let to = pair.path(input.byte().unwrap_or(0));
                pair.rename(from, to);
            }
            12 => {
                pair.frame_to_leader(&mut input);
                pair.injected = true;
            }
            14 => {
                let how = input.byte().unwrap_or(0);
                if how & 4 != 0 {
                    // A reservation small enough for MARKs to reach it.
                    let reserve = u64::from(input.byte().unwrap_or(0)) * 8;
                    pair.checkpoint(reserve);
                } else {
                    pair.reconnect(how & 1 != 0, how & 2 != 0, how & 8 != 0);
                }
            }
            _ => {
                pair.frame_to_follower(&mut input);
                pair.injected = true;
            }
        }
        if pair.injected {
            // Made-up frames may claim anything.
            pair.follower.claims = None;
        }
    }

    pair.report();
    // The next checkpoint, far above: MARKs held at a reservation claim the rest.
    if pair.leader.has_checkpoint() {
        pair.checkpoint(1 << 40);
    }
    pair.settle();
    pair.leader.now += Duration::from_millis(KEEPALIVE_INTERVAL_MS);
    pair.settle();
    if pair.injected {
        return;
    }
    pair.check_no_held_claim_refused();
    assert!(pair.leader.error.is_none(), "{:?}", pair.leader.error);
    assert!(pair.follower.error.is_none(), "{:?}", pair.follower.error);
    assert_eq!(pair.leader.session.phase(), LeaderPhase::Streaming);
    assert_eq!(pair.follower.session.phase(), FollowerPhase::Streaming);
    let diff = files_diff(&pair.leader.files, &pair.follower.files);
    assert!(diff.is_empty(), "the follower's copy differs: {diff}");
    // A handoff's target would go on with the births its held record keeps: never below the
    // leader's (docs/PROTOCOL.md, *Across a handoff*), and with BORN exactly the leader's.
    for path in pair.follower.files.keys() {
        let Some(entry) = pair.leader.catalog.get(path) else {
            continue;
        };
        let kept = pair.follower.births.get(path);
        assert!(kept.is_none_or(|b| b >= entry.born_at), "{path}: {kept:?}");
        if pair.births {
            assert_eq!(kept, Some(entry.born_at), "{path}: the birth BORN gave");
        }
    }
    let position = pair.leader.catalog.position();
    assert_eq!(pair.leader.session.lag().acked(), [position; 3]);
});
