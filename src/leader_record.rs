//! The leader's record, `DIR/.ferry/leader` (`docs/PROTOCOL.md`, *The leader's record*): written
//! when a leader stops, and while it serves every `LEADER_RECORD_INTERVAL_MS` (a checkpoint,
//! whose position is a reservation no MARK passes: `leader::checkpoint`), so that the next
//! leader on the same data dir, in the same boot, resumes its instance, even after a crash, and
//! its followers' held records stay good for every file that did not change in between.
//!
//! A stop looks at the files changed since the last checkpoint, or at every file in the catalog
//! without checkpoints (`look`; again, once they have settled, if some changed less than
//! `LEADER_RECORD_SETTLE_MS` before), has the change sources report what they have not yet
//! (`ferry lead`'s watcher), then writes the catalog's length and birth of each file with the
//! stamp a look saw (`save_files`). A start reads the record and deletes it before serving anyone
//! (`take`): a record is good once, for the run right after the one that wrote it. It keeps a
//! file's birth only if the file is as the look saw it and had not changed for
//! `LEADER_RECORD_SETTLE_MS` before it: a change in the same clock tick as the look, or one
//! made before it and reported only after, leaves the stamp as it was.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use crate::catalog::Kept;
use crate::fork_chain::ForkChain;
use crate::frame::InstanceId;
use crate::index::{boot_id, from_hex, hex, now_ns, FileMeta, Looked, Stamp};
use crate::paths::{DataDir, RelPath, StateSync};

/// How much older than the record a file's ctime must be for a resumed instance to vouch for it.
pub const LEADER_RECORD_SETTLE_MS: u64 = 1000;
/// How often a serving leader rewrites its record (a checkpoint), unless configured otherwise,
/// so that a leader that dies leaves one.
pub const LEADER_RECORD_INTERVAL_MS: u64 = 10_000;
/// How far above its position a checkpoint reserves positions: until the next checkpoint, no
/// MARK of the instance goes above the reservation, which the record names as its position.
pub const LEADER_POSITION_RESERVE: u64 = 1 << 40;
/// A record naming a position above this starts a new instance rather than resume: so near
/// `MAX_POSITION` (only lengths reported wrong get there) the resumed instance would soon
/// refuse every change.
const RESUMED_POSITION_MAX: u64 = crate::frame::MAX_POSITION / 2;
pub(crate) const FILE_NAME: &str = "leader";
const HEADER: &str = "ferry-leader-v1";
/// The optional lines after `taken_ns` naming what the instance goes on from: `fork FROM P`,
/// one per link of its fork chain, in order.
const FORK: &str = "fork";
/// The optional line after the `fork` lines naming the catalog's position when the record
/// took it.
const CATALOG_POSITION: &str = "catalog_position";

/// What a stop (or a checkpoint) saw of its files, and when it began looking.
pub struct Look {
    stamps: HashMap<RelPath, Stamp>,
    taken_ns: i64,
}

/// What a leader resumes from: the instance, its last position, and the files it vouches for.
#[derive(Debug)]
pub struct Resumed {
    pub instance: InstanceId,
    /// What the instance goes on from, when it is a fork of a dead leader's (`docs/PROTOCOL.md`,
    /// *After a failover*, *After failovers in a row*).
    pub forks: ForkChain,
    /// At or above every MARK of the instance: its position at a stop, the reservation of a
    /// checkpoint.
    pub last_position: u64,
    pub kept: HashMap<RelPath, Kept>,
    /// Files in the record it no longer vouches for (changed since, changed too close to the
    /// stop, gone).
    pub not_kept: usize,
    /// The record as it was read, for `put_back`.
    text: String,
}

impl Resumed {
    /// Writes the record back, for a start that failed before serving anyone (a port in use):
    /// no MARK went out under it, so it is as good as it was for the next start.
    pub fn put_back(&self, dir: &DataDir) {
        let path = dir.state_path(FILE_NAME);
        if let Err(e) = std::fs::write(&path, &self.text) {
            tracing::warn!(
                "cannot put the leader's record {} back: {e}",
                path.display()
            );
        }
    }
}

/// `path` as it is now, if it is a regular file that can be looked at.
fn stamp_of(dir: &DataDir, path: &RelPath) -> Option<Stamp> {
    Stamp::look(dir, path).ok().flatten()
}

impl Look {
    /// What `looked` saw of each file, as if this look had: a leader's first checkpoint vouches
    /// for the files its start looked at, when they had settled then, without looking again.
    pub fn of_looked(looked: Looked) -> Look {
        let stamps = looked
            .files
            .iter()
            .map(|m| (m.path.clone(), Stamp::of_meta(m)))
            .collect();
        Look {
            stamps,
            taken_ns: looked.began_ns,
        }
    }

    /// How long until every file it saw will have been unchanged for
    /// `LEADER_RECORD_SETTLE_MS`, if some changed more recently than that: a stop that waits
    /// so long and looks again can vouch for the files written just before it.
    pub fn unsettled_for(&self) -> Option<Duration> {
        let newest = self.stamps.values().map(|s| s.ctime_ns).max()?;
        let wait_ns = newest.saturating_sub(settled_before(self.taken_ns));
        let at_most = Duration::from_millis(LEADER_RECORD_SETTLE_MS);
        (wait_ns > 0).then(|| Duration::from_nanos(wait_ns as u64).min(at_most))
    }

    /// What it saw of `path`, if it looked at it and found a file.
    pub fn stamp(&self, path: &RelPath) -> Option<Stamp> {
        self.stamps.get(path).copied()
    }

    /// When it began looking (ns since the epoch).
    pub fn taken_ns(&self) -> i64 {
        self.taken_ns
    }

    /// Whether `stamp`, as it saw it, had not changed for `LEADER_RECORD_SETTLE_MS`: a record
    /// taken then or later vouches for it.
    pub fn settled(&self, stamp: &Stamp) -> bool {
        stamp.ctime_ns <= settled_before(self.taken_ns)
    }

    /// How many files it saw.
    pub fn files_seen(&self) -> usize {
        self.stamps.len()
    }

    /// Files it saw changed within `LEADER_RECORD_SETTLE_MS` before it.
    pub fn unsettled(&self) -> usize {
        self.stamps.values().filter(|s| !self.settled(s)).count()
    }
}

const SETTLE_NS: i64 = LEADER_RECORD_SETTLE_MS as i64 * 1_000_000;

/// Whether a file a record saw as `recorded` is, as `now`, still so, and had settled by the
/// record (its ctime at or before `settled_before`): what a resumed instance keeps a birth for,
/// and what a dead leader following next holds.
fn still_as_recorded(recorded: &Stamp, now: Option<Stamp>, settled_before: i64) -> bool {
    recorded.ctime_ns <= settled_before && now.as_ref() == Some(recorded)
}

/// The newest ctime a record taken at `taken_ns` vouches for.
fn settled_before(taken_ns: i64) -> i64 {
    taken_ns.saturating_sub(SETTLE_NS)
}

/// A `taken_ns` under which every file changed up to now counts as settled: for a record whose
/// files can have changed only in ways their stamps show (a handoff's target's, `cluster`).
pub fn settled_by_now_ns() -> i64 {
    now_ns().saturating_add(SETTLE_NS)
}

/// Looks at each of `paths` now (the time taken first, so nothing looked at is newer).
pub fn look<'a>(dir: &DataDir, paths: impl IntoIterator<Item = &'a RelPath>) -> Look {
    let taken_ns = now_ns();
    let paths: Vec<&RelPath> = paths.into_iter().collect();
    let stamps = crate::index::look_each(&paths, |p| stamp_of(dir, p));
    let stamps = paths
        .into_iter()
        .zip(stamps)
        .filter_map(|(p, stamp)| Some((p.clone(), stamp?)))
        .collect();
    Look { stamps, taken_ns }
}

/// Writes a record of instance `instance` (going on from `forks`) at `position`, taken
/// at `taken_ns`, of `files`: each with its length and birth, as seen with its stamp. A
/// handoff's target, and a leader elected after a failover, write one from their held records
/// (`docs/PROTOCOL.md`, *Across a handoff*, *After a failover*).
pub fn save_files<'a>(
    dir: &DataDir,
    (instance, forks): (&InstanceId, &ForkChain),
    (position, catalog_position): (u64, u64),
    taken_ns: i64,
    files: impl IntoIterator<Item = (&'a RelPath, Kept, Stamp)>,
) -> io::Result<()> {
    let Some(boot) = boot_id() else {
        return Err(io::Error::other(format!(
            "cannot read {}",
            crate::index::BOOT_ID_PATH
        )));
    };
    let mut text = format!(
        "{HEADER}\nboot {boot}\ninstance {}\nposition {position}\ntaken_ns {taken_ns}\n",
        hex(instance),
    );
    for link in forks.links() {
        let _ = writeln!(text, "{FORK} {} {}", hex(&link.from), link.position);
    }
    let _ = writeln!(text, "{CATALOG_POSITION} {catalog_position}");
    for (path, kept, s) in files {
        if path.as_str().contains('\n') {
            continue; // not representable in the line format; never vouched for
        }
        // Into the text as it grows: a record of 100,000 files is written every checkpoint.
        let _ = writeln!(text, "{} {} {s} {path}", kept.born_at, kept.len_bytes);
    }
    dir.replace_state_file(FILE_NAME, text.as_bytes(), StateSync::Volatile)
}

/// What a leader that died holds by its own last record, once it follows (`docs/PROTOCOL.md`,
/// *After a failover*): the record's instance and catalog position `C`, and each file the record
/// saw that is still as it saw it, had settled then, and is at least as long as recorded, with
/// its recorded length and birth (a longer file is held only once cut to that length). The
/// record is read, not taken.
#[derive(Debug)]
pub struct OwnClaims {
    pub instance: InstanceId,
    pub catalog_position: u64,
    pub files: Vec<(RelPath, Kept, Stamp)>,
}

/// The record's `OwnClaims`; `None` without a record of this boot (`boot`, as the caller read
/// it) that names its catalog position.
pub fn own_claims(dir: &DataDir, boot: &str) -> Option<OwnClaims> {
    let text = std::fs::read_to_string(dir.state_path(FILE_NAME)).ok()?;
    let record = parse(&text)?;
    if record.boot != boot {
        return None;
    }
    let catalog_position = record.catalog_position?;
    let settled_before = settled_before(record.taken_ns);
    let files = record
        .entries
        .into_iter()
        .filter(|(path, kept, stamp)| {
            // Bytes past the length recorded (a preallocated segment, an append not yet
            // reported) are no part of the claim: the follower cuts them before it reports.
            stamp.len_bytes >= kept.len_bytes
                && kept.born_at <= catalog_position
                && still_as_recorded(stamp, stamp_of(dir, path), settled_before)
        })
        .collect();
    Some(OwnClaims {
        instance: record.instance,
        catalog_position,
        files,
    })
}

/// Deletes the record (there being none is no error): what a checkpoint that could not be
/// written does, so that no record promises less than the MARKs sent from then on.
pub fn remove(dir: &DataDir) -> io::Result<()> {
    match std::fs::remove_file(dir.state_path(FILE_NAME)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

struct Parsed {
    boot: String,
    instance: InstanceId,
    forks: ForkChain,
    position: u64,
    /// The catalog's position when the record took it, if the record says (`None`: an older
    /// build's).
    catalog_position: Option<u64>,
    taken_ns: i64,
    entries: Vec<(RelPath, Kept, Stamp)>,
}

fn parse(text: &str) -> Option<Parsed> {
    // Written whole and renamed: a missing newline at the end means a corrupt file.
    if !text.ends_with('\n') {
        return None;
    }
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut field = |name: &str| lines.next()?.strip_prefix(name)?.strip_prefix(' ');
    let boot = field("boot")?.to_string();
    let instance = from_hex(field("instance")?)?;
    let position = field("position")?.parse().ok()?;
    let taken_ns = field("taken_ns")?.parse().ok()?;
    let mut entries = Vec::with_capacity(text.matches('\n').count().saturating_sub(5));
    let mut lines = lines.peekable();
    let mut forks = ForkChain::none();
    while let Some(line) = lines.next_if(|l| l.starts_with(FORK)) {
        let link = match line.split(' ').collect::<Vec<_>>().as_slice() {
            [FORK, from, position] => crate::fork_chain::parse_link(from, position)?,
            _ => return None,
        };
        forks.push(link).ok()?;
    }
    // The fork's position is where the instance began: never above a position it reached (and
    // the chain's later links are no higher).
    if forks.first().is_some_and(|f| f.position > position) {
        return None;
    }
    let catalog_position = match lines.next_if(|l| l.starts_with(CATALOG_POSITION)) {
        None => None,
        Some(line) => {
            let c: u64 = line
                .strip_prefix(CATALOG_POSITION)?
                .strip_prefix(' ')?
                .parse()
                .ok()?;
            if c > position {
                // Taken at or below the position (a stop's) or reservation the record names.
                return None;
            }
            Some(c)
        }
    };
    for line in lines {
        let mut f = crate::index::fields(line, 7);
        let kept = Kept {
            born_at: f.next()?.parse().ok()?,
            len_bytes: f.next()?.parse().ok()?,
        };
        let stamp = Stamp::parse(&mut f)?;
        let path = RelPath::new(f.next()?).ok()?;
        // A birth above the last position was never a MARK's to claim.
        if kept.born_at > position {
            return None;
        }
        entries.push((path, kept, stamp));
    }
    Some(Parsed {
        boot,
        instance,
        forks,
        position,
        catalog_position,
        taken_ns,
        entries,
    })
}

/// The record left by the last stop or checkpoint, deleted here so that it is used once; `None`
/// (and the reason logged) when there is none to resume from. Each file is vouched for while
/// it is as the record says: in `looked` (sorted by path), the look the leader's catalog is
/// built from, taken with the change source already watching; without one, looked at now.
pub fn take(dir: &DataDir, looked: Option<&[FileMeta]>) -> Option<Resumed> {
    take_for_boot(dir, boot_id(), looked)
}

fn take_for_boot(
    dir: &DataDir,
    boot: Option<String>,
    looked: Option<&[FileMeta]>,
) -> Option<Resumed> {
    let path = dir.state_path(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("ignoring the leader's record {}: {e}", path.display());
            return None;
        }
    };
    // Used once: a run that ends without writing one leaves its successor none.
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(
            "cannot delete the leader's record {} ({e}), so it is not used: a new instance, and \
             followers hash what changed since their last inventory",
            path.display()
        );
        return None;
    }
    let Some(record) = parse(&text) else {
        tracing::warn!(
            "ignoring the leader's record {}: it is corrupt; a new instance",
            path.display()
        );
        return None;
    };
    if boot.as_deref() != Some(record.boot.as_str()) {
        tracing::info!(
            "the leader's record {} is from before a reboot, which may have lost what it \
             vouches for: a new instance",
            path.display()
        );
        return None;
    }
    if record.position > RESUMED_POSITION_MAX {
        tracing::warn!(
            "the leader's record {} names position {}, past {RESUMED_POSITION_MAX} (half of \
             MAX_POSITION; lengths reported wrong took it there): a new instance, whose \
             positions start again",
            path.display(),
            record.position
        );
        return None;
    }
    let settled_before = settled_before(record.taken_ns);
    let total = record.entries.len();
    let mut entries = record.entries;
    if looked.is_some() {
        // In the look's order, so that its searches go from one file to the next (a checkpoint
        // writes its lines in no order; 100,000 searches at random miss the cache each).
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }
    let kept: HashMap<RelPath, Kept> = entries
        .into_iter()
        .filter(|(path, _, stamp)| {
            let now = match looked {
                Some(files) => files
                    .binary_search_by(|m| m.path.cmp(path))
                    .ok()
                    .map(|i| Stamp::of_meta(&files[i])),
                None => stamp_of(dir, path),
            };
            still_as_recorded(stamp, now, settled_before)
        })
        .map(|(path, kept, _)| (path, kept))
        .collect();
    Some(Resumed {
        instance: record.instance,
        forks: record.forks,
        last_position: record.position,
        not_kept: total - kept.len(),
        kept,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogEntry;
    use crate::frame::Fork;

    use crate::paths::temp_data_dir as setup;

    fn entry(len_bytes: u64, born_at: u64) -> CatalogEntry {
        CatalogEntry {
            len_bytes,
            generation: 1,
            born_at,
            born_by_append: true,
        }
    }

    /// A record of files "a" (born 5) and "b" (born 0), taken `age_ms` after they were written.
    fn saved(age_ms: i64) -> (tempfile::TempDir, DataDir, [RelPath; 2]) {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("a"), b"hello").unwrap();
        std::fs::write(tmp.path().join("b"), b"world!").unwrap();
        let paths = [RelPath::new("a").unwrap(), RelPath::new("b").unwrap()];
        let mut look = look(&dir, &paths);
        look.taken_ns += age_ms * 1_000_000;
        let catalog = [
            (paths[0].clone(), entry(5, 5)),
            (paths[1].clone(), entry(6, 0)),
        ];
        let lines = catalog
            .iter()
            .map(|(path, entry)| (path, Kept::of(entry), look.stamp(path).unwrap()));
        save_files(
            &dir,
            (&[7; 16], &ForkChain::none()),
            (20, 20),
            look.taken_ns,
            lines,
        )
        .unwrap();
        (tmp, dir, paths)
    }

    #[test]
    fn a_record_resumes_the_instance_once_with_the_files_unchanged_since() {
        let (tmp, dir, [a, b]) = saved(2000);
        // Replaced by a rename since the stop: another inode.
        std::fs::write(tmp.path().join("b.new"), b"WORLD!").unwrap();
        std::fs::rename(tmp.path().join("b.new"), tmp.path().join("b")).unwrap();
        let resumed = take_for_boot(&dir, boot_id(), None).unwrap();
        assert_eq!(resumed.instance, [7; 16]);
        assert_eq!(resumed.last_position, 20);
        assert_eq!(
            resumed.kept.get(&a),
            Some(&Kept {
                len_bytes: 5,
                born_at: 5
            })
        );
        assert_eq!(resumed.kept.get(&b), None, "rewritten since the stop");
        assert_eq!(resumed.not_kept, 1);
        assert!(
            take_for_boot(&dir, boot_id(), None).is_none(),
            "used once: deleted when taken"
        );
        resumed.put_back(&dir);
        let again = take_for_boot(&dir, boot_id(), None).unwrap();
        assert_eq!(
            (again.instance, again.kept),
            (resumed.instance, resumed.kept)
        );
    }

    /// A forked instance's record names what it goes on from, a line per link of its chain,
    /// and a start resumes the chain with the instance (a restarted leader still tells
    /// followers); a fork line that does not say `fork FROM P`, or whose position is above the
    /// one before's, makes the record corrupt.
    #[test]
    fn a_fork_is_kept_in_the_record_with_its_instance() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("a"), b"hello").unwrap();
        let a = RelPath::new("a").unwrap();
        let mut look = look(&dir, std::slice::from_ref(&a));
        look.taken_ns += 2000 * 1_000_000;
        let link = |from: u8, position| Fork {
            from: [from; 16],
            position,
        };
        let forks = ForkChain::of([link(6, 20), link(4, 12)]).unwrap();
        let line = (&a, Kept::of(&entry(5, 5)), look.stamp(&a).unwrap());
        save_files(&dir, (&[7; 16], &forks), (20, 20), look.taken_ns, [line]).unwrap();
        let text = std::fs::read_to_string(dir.state_path(FILE_NAME)).unwrap();
        let fork_lines = format!(
            "\ntaken_ns {}\nfork {} 20\nfork {} 12\n",
            look.taken_ns,
            "06".repeat(16),
            "04".repeat(16)
        );
        assert!(text.contains(&fork_lines), "{text}");
        let resumed = take_for_boot(&dir, boot_id(), None).unwrap();
        assert_eq!((resumed.instance, &resumed.forks), ([7; 16], &forks));
        assert_eq!(resumed.kept.len(), 1);

        // In the fork line's place (before `catalog_position`), each of these is corrupt.
        let at = &fork_lines[fork_lines.find("fork").unwrap()..];
        for bad in [
            "fork 0606 20",
            "fork x",
            &format!("fork {} -1", "06".repeat(16)),
            &format!("fork {} 21", "06".repeat(16)),
            &format!("fork {} 20\nfork {} 21", "06".repeat(16), "04".repeat(16)),
            "catalog_position 21",
            "catalog_position x",
        ] {
            let corrupt = text.replace(at, &format!("{bad}\n"));
            std::fs::write(dir.state_path(FILE_NAME), &corrupt).unwrap();
            assert!(take_for_boot(&dir, boot_id(), None).is_none(), "{corrupt}");
        }
    }

    /// A leader that died and follows next holds, by its own last record (read, not taken), the
    /// files that record saw as they still are, settled then, up to the length it recorded, at
    /// the catalog position it names: a file longer on disk than recorded (a preallocated
    /// segment) with that length; not one shorter than recorded, nor one changed since; a record
    /// of an older build, which names no catalog position, holds nothing.
    #[test]
    fn a_dead_leader_s_own_record_holds_its_settled_files_up_to_the_recorded_length() {
        let (tmp, dir) = setup();
        let names = ["kept", "preallocated", "shorter", "changed"];
        for n in names {
            std::fs::write(tmp.path().join(n), b"0123456789").unwrap();
        }
        let paths: Vec<RelPath> = names.iter().map(|n| RelPath::new(n).unwrap()).collect();
        let mut look = look(&dir, &paths);
        let lines: Vec<_> = paths
            .iter()
            .zip([10, 4, 12, 10])
            .map(|(p, len)| (p, Kept::of(&entry(len, 3)), look.stamp(p).unwrap()))
            .collect();
        // Written right before the record: not settled, nothing held.
        let at = (1 << 40, 500);
        save_files(
            &dir,
            (&[7; 16], &ForkChain::none()),
            at,
            look.taken_ns,
            lines.clone(),
        )
        .unwrap();
        let claims = own_claims(&dir, &boot_id().unwrap()).unwrap();
        assert!(claims.files.is_empty(), "{claims:?}");
        look.taken_ns += 2000 * 1_000_000;
        save_files(
            &dir,
            (&[7; 16], &ForkChain::none()),
            at,
            look.taken_ns,
            lines,
        )
        .unwrap();
        std::fs::write(tmp.path().join("changed"), b"0123456789x").unwrap();
        let claims = own_claims(&dir, &boot_id().unwrap()).unwrap();
        assert_eq!((claims.instance, claims.catalog_position), ([7; 16], 500));
        let mut held: Vec<(&str, u64, u64)> = claims
            .files
            .iter()
            .map(|(p, kept, _)| (p.as_str(), kept.len_bytes, kept.born_at))
            .collect();
        held.sort();
        assert_eq!(held, [("kept", 10, 3), ("preallocated", 4, 3)]);
        assert!(dir.state_path(FILE_NAME).exists(), "read, not taken");
        assert!(own_claims(&dir, "another boot").is_none());

        let text = std::fs::read_to_string(dir.state_path(FILE_NAME)).unwrap();
        let older = text.replace("catalog_position 500\n", "");
        std::fs::write(dir.state_path(FILE_NAME), older).unwrap();
        assert!(
            own_claims(&dir, &boot_id().unwrap()).is_none(),
            "no catalog position"
        );
        assert!(
            take_for_boot(&dir, boot_id(), None).is_some(),
            "still a record to resume"
        );
    }

    /// A leader started from a look at its files (the watcher's, a scan's) compares the record
    /// with that look, which its catalog was built from, not with the files as they are later.
    #[test]
    fn a_record_is_compared_with_the_look_the_leader_starts_from() {
        let (tmp, dir, [a, b]) = saved(2000);
        let meta = |path: &RelPath| {
            let m = std::fs::symlink_metadata(tmp.path().join(path.as_str())).unwrap();
            FileMeta::of(path.clone(), &m)
        };
        // "a" looked at as the record says; "b" changed between the record and the look (it is
        // as the record says again by the time the record is taken).
        let b_changed = FileMeta {
            len_bytes: 7,
            ..meta(&b)
        };
        let looked = [meta(&a), b_changed];
        let resumed = take_for_boot(&dir, boot_id(), Some(&looked)).unwrap();
        assert_eq!(resumed.kept.keys().collect::<Vec<_>>(), vec![&a]);
        resumed.put_back(&dir);
        // "a" not in the look (gone by then).
        let looked = [meta(&b)];
        let resumed = take_for_boot(&dir, boot_id(), Some(&looked)).unwrap();
        assert_eq!(resumed.kept.keys().collect::<Vec<_>>(), vec![&b]);
    }

    #[test]
    fn a_look_says_how_long_until_what_it_saw_has_settled() {
        let (_tmp, dir, paths) = saved(0);
        let fresh = look(&dir, &paths);
        assert_eq!(fresh.unsettled(), 2, "both written just now");
        let wait = fresh.unsettled_for().unwrap();
        assert!(
            wait <= Duration::from_millis(LEADER_RECORD_SETTLE_MS),
            "{wait:?}"
        );
        let mut later = look(&dir, &paths);
        later.taken_ns += LEADER_RECORD_SETTLE_MS as i64 * 1_000_000;
        assert_eq!((later.unsettled(), later.unsettled_for()), (0, None));
    }

    #[test]
    fn a_file_changed_too_close_to_the_stop_is_not_vouched_for() {
        let (_tmp, dir, [a, _]) = saved(LEADER_RECORD_SETTLE_MS as i64 / 2);
        let resumed = take_for_boot(&dir, boot_id(), None).unwrap();
        assert_eq!(resumed.kept.get(&a), None);
        assert_eq!(resumed.not_kept, 2);
    }

    /// A position that lengths reported wrong took near `MAX_POSITION` would leave a resumed
    /// instance refusing every change: such a record starts a new instance instead.
    #[test]
    fn a_record_whose_position_is_past_half_of_max_position_resumes_nothing() {
        for (position, resumes) in [
            (RESUMED_POSITION_MAX, true),
            (RESUMED_POSITION_MAX + 1, false),
        ] {
            let (tmp, dir) = setup();
            std::fs::write(tmp.path().join("a"), b"hello").unwrap();
            let a = RelPath::new("a").unwrap();
            let mut look = look(&dir, std::slice::from_ref(&a));
            look.taken_ns += 2_000_000_000;
            let lines = [(&a, Kept::of(&entry(5, 5)), look.stamp(&a).unwrap())];
            save_files(
                &dir,
                (&[7; 16], &ForkChain::none()),
                (position, position),
                look.taken_ns,
                lines,
            )
            .unwrap();
            let resumed = take_for_boot(&dir, boot_id(), None);
            assert_eq!(resumed.is_some(), resumes, "{position}");
        }
    }

    #[test]
    fn a_record_from_another_boot_or_a_corrupt_one_resumes_nothing() {
        let (tmp, dir, _) = saved(2000);
        assert!(take_for_boot(&dir, Some("another-boot".into()), None).is_none());
        assert!(!tmp.path().join(".ferry/leader").exists(), "still used up");

        let (tmp, dir, _) = saved(2000);
        let text = std::fs::read_to_string(tmp.path().join(".ferry/leader")).unwrap();
        // A birth above the record's position is no birth this instance gave.
        let bad = text.replace("\n5 5 ", "\n21 5 ");
        assert_ne!(bad, text);
        std::fs::write(tmp.path().join(".ferry/leader"), bad).unwrap();
        assert!(take_for_boot(&dir, boot_id(), None).is_none());
        std::fs::write(tmp.path().join(".ferry/leader"), &text[..text.len() - 1]).unwrap();
        assert!(take_for_boot(&dir, boot_id(), None).is_none(), "torn");
    }
}
