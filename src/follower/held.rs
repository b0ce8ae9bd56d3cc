//! The follower's held record, `DIR/.ferry/held` (`docs/PROTOCOL.md`, *Held records*): for each
//! file, the leader instance and MARK position after which the follower last looked at it, and
//! the file's inode, size, mtime and ctime then. At the next inventory with the same leader
//! instance, a file whose stamp still matches is reported as held (HAVE_HELD) instead of hashed.
//!
//! Why a look after a MARK is enough: the follower applies frames in wire order, each write
//! completing before the next, and a file only grows within one generation. So whatever the
//! look saw was the file as of that MARK, plus more of the same generation, or a change that
//! began a newer generation, which the leader refuses (it was born after the MARK).
//!
//! The record vouches for the page cache, which a crash of the process keeps: it is written
//! without fsync, and ignored after a reboot (it names the boot it was taken in).
//!
//! With each file it keeps the birth of the generation the copy holds, when the follower knows
//! one: an upper bound, read after the look (the follower forgets a birth before it applies the
//! change that begins a new generation). A handoff's target, a node elected after a failover and
//! a leader started on a follower's dir turn these into a leader's record (`promote`;
//! `docs/PROTOCOL.md`, *Across a handoff*, *After a failover*); the follower's own inventory does
//! not use them. A follower that stops dates the record's file then (`date_stop`): the dir had
//! no other writer until then. After a failover, the inventory also counts as held what the
//! record holds under the instance the new leader's goes on from, up to the fork, and, where
//! this dir led and its leader died, what that leader's own record vouches for
//! (`load_with_own_record`).
//!
//! It is a journal: a checkpoint appends a line per file it looked at (`- PATH` for one it
//! forgot), and later lines stand over earlier ones. It is rewritten whole (a temp file renamed
//! over it) at the first save of a process and once the journal holds more than twice as many
//! lines as files, so a checkpoint costs what changed, not the size of the index. A last line
//! torn by a crash is ignored; a lost one leaves an older line, whose stamp no longer matches.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};

use crate::fork_chain::ForkChain;
use crate::frame::{Fork, InstanceId};
use crate::index::{boot_id, from_hex, hex, Stamp, BOOT_ID_PATH};
use crate::paths::{DataDir, RelPath, StateSync};

/// How often a streaming follower records the files it changed (at a MARK, at most this often).
pub const HELD_CHECKPOINT_INTERVAL_MS: u64 = 1000;
pub(crate) const FILE_NAME: &str = "held";
const HEADER: &str = "ferry-held-v3";
/// The header of records written before marked lengths were kept: read, with none.
const HEADER_V2: &str = "ferry-held-v2";
/// The header of records written before births were kept: read, with no births.
const HEADER_V1: &str = "ferry-held-v1";
/// Journal lines a rewrite may leave behind beyond twice the entries, before it rewrites.
const JOURNAL_SLACK_LINES: usize = 1024;
const FORGET: &str = "-";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    instance: InstanceId,
    position: u64,
    /// An upper bound on the birth of the generation the copy held when looked at.
    born_at: Option<u64>,
    /// The copy's length when the MARK at `position` was applied, or a lower bound on it (its
    /// marked length): the look may come later and see bytes applied after that MARK.
    marked_len: Option<u64>,
    stamp: Stamp,
}

/// A copy the record vouches for as held (`HeldRecord::held_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldCopy {
    /// The MARK position after which it was looked at.
    pub position: u64,
    /// How much of it: its size, or less where this dir's own leader's record recorded less
    /// (a segment preallocated past what was reported), which the copy must be cut to before
    /// it is reported held.
    pub len_bytes: u64,
    /// Vouched for by this dir's own leader's record (it led, and follows now), not by a look
    /// while following.
    pub by_own_record: bool,
}

/// A file the record vouches for under one leader instance (`HeldRecord::vouched`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vouched {
    pub path: RelPath,
    /// The MARK position after which it was looked at.
    pub position: u64,
    pub born_at: Option<u64>,
    pub stamp: Stamp,
}

#[derive(Debug, Default)]
pub struct HeldRecord {
    entries: HashMap<RelPath, Entry>,
    /// This boot's id; `None` when unreadable, and then nothing is vouched for or saved.
    boot_id: Option<String>,
    /// The last save failed (said once, not at every checkpoint while a disk is full).
    save_failing: bool,
    /// Paths looked at since the last save: their lines are what the next save appends.
    unsaved: Vec<RelPath>,
    /// Entry lines in the file on disk, once this process has rewritten it (`None` before).
    journal_lines: Option<usize>,
    /// What this dir's own leader's record vouches for, when it led and died
    /// (`load_with_own_record`), the length it recorded as each entry's marked length: looked
    /// up after `entries`, never saved.
    led: HashMap<RelPath, Entry>,
}

impl HeldRecord {
    /// The record in `DIR/.ferry/held`; empty when missing, unreadable, corrupt or taken before
    /// the last reboot.
    pub fn load(dir: &DataDir) -> HeldRecord {
        HeldRecord::load_for_boot(dir, boot_id())
    }

    /// `load`, for a follower: with what the dir's own leader's record vouches for, when this
    /// dir led and its leader died (`leader_record::own_claims`; `docs/PROTOCOL.md`, *After a
    /// failover*), each file as held after a MARK at the record's catalog position, up to the
    /// length recorded.
    pub fn load_with_own_record(dir: &DataDir) -> HeldRecord {
        let mut record = HeldRecord::load(dir);
        let Some(boot) = &record.boot_id else {
            return record;
        };
        if let Some(own) = crate::leader_record::own_claims(dir, boot) {
            let position = own.catalog_position;
            record.led = own
                .files
                .into_iter()
                .map(|(path, kept, stamp)| {
                    let entry = Entry {
                        instance: own.instance,
                        position,
                        born_at: Some(kept.born_at),
                        marked_len: Some(kept.len_bytes),
                        stamp,
                    };
                    (path, entry)
                })
                .collect();
        }
        record
    }

    fn load_for_boot(dir: &DataDir, boot_id: Option<String>) -> HeldRecord {
        let mut record = HeldRecord {
            entries: HashMap::new(),
            boot_id,
            save_failing: false,
            unsaved: Vec::new(),
            journal_lines: None,
            led: HashMap::new(),
        };
        let Some(boot) = &record.boot_id else {
            tracing::warn!(
                "cannot read {BOOT_ID_PATH}: files changed since the last inventory are hashed"
            );
            return record;
        };
        let path = dir.state_path(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return record,
            Err(e) => {
                tracing::warn!("ignoring the held record {}: {e}", path.display());
                return record;
            }
        };
        match HeldRecord::parse(&text) {
            Some((taken_in, entries)) if taken_in == *boot => record.entries = entries,
            Some(_) => tracing::info!(
                "the held record {} is from before a reboot, which may have lost what it vouches \
                 for: files changed since the last inventory are hashed",
                path.display()
            ),
            None => tracing::warn!(
                "ignoring the held record {}: it is corrupt; files changed since the last \
                 inventory are hashed",
                path.display()
            ),
        }
        record
    }

    fn parse(text: &str) -> Option<(String, HashMap<RelPath, Entry>)> {
        let mut lines = text.lines();
        let (with_births, with_marked) = match lines.next()? {
            HEADER => (true, true),
            HEADER_V2 => (true, false),
            HEADER_V1 => (false, false),
            _ => return None,
        };
        let boot = lines.next()?.strip_prefix("boot ")?.to_string();
        // A last line without its newline was torn by a crash mid-append: not part of it.
        let whole = text.matches('\n').count().saturating_sub(2);
        let mut entries = HashMap::with_capacity(whole);
        for line in lines.take(whole) {
            if let Some(path) = line.strip_prefix(FORGET).and_then(|l| l.strip_prefix(' ')) {
                entries.remove(&RelPath::new(path).ok()?);
                continue;
            }
            let fields = 7 + usize::from(with_births) + usize::from(with_marked);
            let mut f = crate::index::fields(line, fields);
            let instance = from_hex(f.next()?)?;
            let position = f.next()?.parse().ok()?;
            // A field the record's version keeps: a number, or `-` for none.
            let mut optional = |kept: bool| -> Option<Option<u64>> {
                if !kept {
                    return Some(None);
                }
                match f.next()? {
                    FORGET => Some(None),
                    n => Some(Some(n.parse().ok()?)),
                }
            };
            let born_at = optional(with_births)?;
            let marked_len = optional(with_marked)?;
            let stamp = Stamp::parse(&mut f)?;
            let path = RelPath::new(f.next()?).ok()?;
            entries.insert(
                path,
                Entry {
                    instance,
                    position,
                    born_at,
                    marked_len,
                    stamp,
                },
            );
        }
        Some((boot, entries))
    }

    /// `path`'s journal line: its entry, or that it is forgotten.
    fn push_line(&self, text: &mut String, path: &RelPath) {
        if path.as_str().contains('\n') {
            return; // not representable in the line format; never vouched for
        }
        // Into `text` (writing to a String cannot fail), not a String of each line's own.
        let Some(e) = self.entries.get(path) else {
            let _ = writeln!(text, "{FORGET} {path}");
            return;
        };
        let _ = write!(text, "{} {}", hex(&e.instance), e.position);
        for n in [e.born_at, e.marked_len] {
            let _ = match n {
                Some(n) => write!(text, " {n}"),
                None => write!(text, " {FORGET}"),
            };
        }
        let _ = writeln!(text, " {} {path}", e.stamp);
    }

    /// Saves what was looked at since the last save: appended to the journal, or the whole
    /// record rewritten (`DataDir::replace_state_file`, `StateSync::Volatile`: after a reboot the
    /// record is ignored anyway).
    pub fn save(&mut self, dir: &DataDir) -> io::Result<()> {
        let Some(boot) = &self.boot_id else {
            return Ok(());
        };
        let unsaved = std::mem::take(&mut self.unsaved);
        let mut text = String::new();
        match self.journal_lines {
            Some(lines)
                if lines + unsaved.len() <= 2 * self.entries.len() + JOURNAL_SLACK_LINES =>
            {
                for path in &unsaved {
                    self.push_line(&mut text, path);
                }
                let path = dir.state_path(FILE_NAME);
                let appended = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(text.as_bytes()))
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
                    });
                if let Err(e) = appended {
                    // Rewritten whole next time: what this append lost is in the entries.
                    self.journal_lines = None;
                    return Err(e);
                }
                self.journal_lines = Some(lines + unsaved.len());
            }
            _ => {
                text = format!("{HEADER}\nboot {boot}\n");
                let mut paths: Vec<_> = self.entries.keys().cloned().collect();
                paths.sort();
                for path in &paths {
                    self.push_line(&mut text, path);
                }
                dir.replace_state_file(FILE_NAME, text.as_bytes(), StateSync::Volatile)?;
                self.journal_lines = Some(paths.len());
            }
        }
        Ok(())
    }

    /// Dates the record's file now, leaving it as it is: a follower that stops was its dir's
    /// only writer up to now, which a leader started on the dir later dates its fork by
    /// (`promote::Settled::AtHeldSave`: files settled by then are vouched for). Nothing when
    /// there is no record.
    pub fn date_stop(dir: &DataDir) {
        let path = dir.state_path(FILE_NAME);
        let dated = OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| touch_mtime(&f));
        match dated {
            Err(e) if e.kind() != io::ErrorKind::NotFound => tracing::debug!(
                "cannot date {} at this follower's stop: {e}; a leader started on this dir \
                 vouches only for the files settled by its last save",
                path.display()
            ),
            _ => {}
        }
    }

    /// Saves the record, saying so when saving fails and when it works again.
    pub fn save_or_warn(&mut self, dir: &DataDir) {
        match self.save(dir) {
            Ok(()) if self.save_failing => {
                self.save_failing = false;
                tracing::info!("the held record is saved again");
            }
            Ok(()) => {}
            Err(e) if !self.save_failing => {
                self.save_failing = true;
                tracing::warn!(
                    "cannot save the held record: {e}; until it can be, a restart hashes what \
                     changed since it was last saved"
                );
            }
            Err(_) => {}
        }
    }

    /// The MARK position after which `path` was last seen as it is now (`stamp`), if that
    /// look was under leader `instance` in this boot, or under an instance it goes on from
    /// (a link of `forks`) after a MARK at or below that link's position (`docs/PROTOCOL.md`,
    /// *After a failover*, *After failovers in a row*); and how much of it that look vouches
    /// for: all of it under `instance`, under a link only what the copy held at that MARK (its
    /// marked length, and only with a birth at or below the MARK): what the look saw past it
    /// may be what the dead leader sent after the fork, which the new leader never had.
    pub fn held_at(
        &self,
        path: &RelPath,
        (instance, forks): (&InstanceId, &ForkChain),
        stamp: &Stamp,
    ) -> Option<HeldCopy> {
        self.boot_id.as_ref()?;
        let holds = |e: &Entry| {
            let shared_history = forks.shares(&e.instance, e.position);
            (e.instance == *instance || shared_history) && e.stamp == *stamp
        };
        let copy = |e: &Entry, len_bytes, by_own_record| HeldCopy {
            position: e.position,
            len_bytes,
            by_own_record,
        };
        let own = self.entries.get(path).filter(|e| holds(e)).and_then(|e| {
            if e.instance == *instance {
                return Some(copy(e, stamp.len_bytes, false));
            }
            e.born_at.filter(|&born_at| born_at <= e.position)?;
            Some(copy(e, e.marked_len?.min(stamp.len_bytes), false))
        });
        own.or_else(|| {
            let e = self.led.get(path).filter(|e| holds(e))?;
            Some(copy(e, e.marked_len?, true))
        })
    }

    /// Cuts the copy `path`, now `len_bytes` long, to `copy`'s length where it is longer (a dead
    /// leader's segment preallocated past what its own record recorded, or bytes a follower
    /// applied after the MARK it recorded a copy at, under an instance the leader's goes on
    /// from: `HeldCopy`), and vouches for it as cut: in the entry that vouched for it (saved
    /// with the next save), or, for what this dir's own leader's record vouched for, for the
    /// rest of this process (an inventory again, the connection having dropped), not for one
    /// started later. The bytes cut off (0 for a copy of `copy`'s length); `None` when the cut
    /// failed, which it says (the copy is then hashed).
    pub fn cut_to_claim(
        &mut self,
        dir: &DataDir,
        path: &RelPath,
        len_bytes: u64,
        copy: HeldCopy,
    ) -> Option<u64> {
        if len_bytes <= copy.len_bytes {
            return Some(0);
        }
        if let Err(e) = dir.truncate(path, copy.len_bytes) {
            let whose = match copy.by_own_record {
                true => "this dir's own leader's record vouches for",
                false => "this dir held at the MARK it recorded it after",
            };
            tracing::warn!(
                "cannot cut {path} to the {} bytes {whose}: {e}; it is hashed",
                copy.len_bytes
            );
            return None;
        }
        if let Ok(Some(stamp)) = Stamp::look(dir, path) {
            let entry = match copy.by_own_record {
                true => self.led.get_mut(path),
                false => self.entries.get_mut(path),
            };
            if let Some(entry) = entry.filter(|_| stamp.len_bytes == copy.len_bytes) {
                entry.stamp = stamp;
                if !copy.by_own_record {
                    self.unsaved.push(path.clone());
                }
            }
        }
        Some(len_bytes - copy.len_bytes)
    }

    /// What a leader elected after a failover goes on from (`docs/PROTOCOL.md`, *After a
    /// failover*): the instance it vouches for the most files under, and the highest MARK
    /// position it recorded under it. `None` when it vouches for nothing.
    pub fn fork_point(&self) -> Option<Fork> {
        self.boot_id.as_ref()?;
        let mut by_instance: HashMap<InstanceId, (usize, u64)> = HashMap::new();
        for e in self.entries.values() {
            let (files, position) = by_instance.entry(e.instance).or_default();
            *files += 1;
            *position = (*position).max(e.position);
        }
        // Ties go to the higher position, then the instance id: the same record, the same answer.
        let (from, (_, position)) = by_instance
            .into_iter()
            .max_by_key(|&(instance, (files, position))| (files, position, instance))?;
        Some(Fork { from, position })
    }

    /// The leader instances it holds a file under.
    pub fn instances(&self) -> std::collections::HashSet<InstanceId> {
        self.entries.values().map(|e| e.instance).collect()
    }

    /// Every file it vouches for under leader `instance`, as it was looked at.
    pub fn vouched(&self, instance: &InstanceId) -> Vec<Vouched> {
        if self.boot_id.is_none() {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|(_, e)| e.instance == *instance)
            .map(|(path, e)| Vouched {
                path: path.clone(),
                position: e.position,
                born_at: e.born_at,
                stamp: e.stamp,
            })
            .collect()
    }

    /// Looks at each file of `marked` now, every frame before a MARK at `position` of leader
    /// `instance` having been applied, and records what it sees, with the birth `born_at`
    /// gives for it, asked after the look, and its marked length: its length when that MARK
    /// was applied, or a lower bound on it (the look may see more applied since). A file that
    /// is gone, or cannot be looked at, is forgotten (it will be hashed).
    pub fn record(
        &mut self,
        dir: &DataDir,
        at: (InstanceId, u64),
        marked: impl IntoIterator<Item = (RelPath, u64)>,
        born_at: impl Fn(&RelPath) -> Option<u64>,
    ) {
        // On several threads when there are many (`index::look_each`): the initial sync's last
        // MARK records every file of the data dir.
        let marked: Vec<(RelPath, u64)> = marked.into_iter().collect();
        let seen = crate::index::look_each(&marked, |(path, _)| Stamp::look(dir, path));
        for ((path, marked_len), seen) in marked.into_iter().zip(seen) {
            self.take_look(at, path, seen, |path, _| {
                Some((born_at(path), Some(marked_len)))
            });
        }
    }

    /// `record`, with each file's length now as its marked length: a look at the MARK itself.
    #[cfg(test)]
    pub(crate) fn record_as_is(
        &mut self,
        dir: &DataDir,
        at: (InstanceId, u64),
        paths: impl IntoIterator<Item = RelPath>,
        born_at: impl Fn(&RelPath) -> Option<u64>,
    ) {
        let marked = paths.into_iter().map(|path| {
            let len = Stamp::look(dir, &path)
                .ok()
                .flatten()
                .map_or(0, |s| s.len_bytes);
            (path, len)
        });
        self.record(dir, at, marked, born_at);
    }

    /// What a leader that handed off records of its own files, each with its catalog length
    /// and birth, as held after a MARK at `position` of its `instance` (`docs/PROTOCOL.md`,
    /// *Across a handoff*): a file is left out (forgotten) if it is shorter than the catalog
    /// says, or changed after `recorded_ns` (when every change had been reported): a write the
    /// catalog never saw, which the held record must not vouch for. A file longer than the
    /// catalog says and not changed since (a segment preallocated beyond what its writer
    /// reported) is cut to the catalog's length first: the target has none of those bytes.
    pub fn record_own(
        &mut self,
        dir: &DataDir,
        at: (InstanceId, u64),
        files: impl IntoIterator<Item = (RelPath, u64, u64)>,
        recorded_ns: i64,
    ) {
        let files: Vec<(RelPath, u64, u64)> = files.into_iter().collect();
        let mut seen = crate::index::look_each(&files, |(path, ..)| Stamp::look(dir, path));
        let mut cut = vec![false; files.len()];
        for (((path, len_bytes, _), seen), cut) in files.iter().zip(&mut seen).zip(&mut cut) {
            let longer = |s: &Stamp| s.len_bytes > *len_bytes && s.ctime_ns <= recorded_ns;
            if !matches!(seen, Ok(Some(stamp)) if longer(stamp)) {
                continue;
            }
            *seen = dir
                .truncate(path, *len_bytes)
                .and_then(|()| Stamp::look(dir, path));
            *cut = seen.is_ok();
            if let Err(e) = seen {
                tracing::warn!(
                    "cannot cut {path} to the {len_bytes} bytes this leader's catalog recorded: \
                     {e}; it is hashed when this node follows"
                );
                *seen = Ok(None);
            }
        }
        let cuts = cut.iter().filter(|c| **c).count();
        if cuts > 0 {
            tracing::info!(
                "cut {cuts} files longer on disk than this leader's catalog recorded \
                 (preallocated, the rest never reported) to the catalog's lengths: the target \
                 has none of those bytes"
            );
        }
        for ((path, len_bytes, born_at), (seen, cut)) in
            files.into_iter().zip(seen.into_iter().zip(cut))
        {
            self.take_look(at, path, seen, |_, stamp| {
                let as_recorded =
                    stamp.len_bytes == len_bytes && (cut || stamp.ctime_ns <= recorded_ns);
                as_recorded.then_some((Some(born_at), Some(len_bytes)))
            });
        }
    }

    /// Records what a look at `path` saw (`seen`) under `instance` and `position`, with the
    /// birth and marked length `vouch` gives once it has seen the file; forgets the file when
    /// `vouch` says `None`, or when it is gone or could not be looked at.
    fn take_look(
        &mut self,
        (instance, position): (InstanceId, u64),
        path: RelPath,
        seen: io::Result<Option<Stamp>>,
        vouch: impl FnOnce(&RelPath, &Stamp) -> Option<(Option<u64>, Option<u64>)>,
    ) {
        self.unsaved.push(path.clone());
        let seen = match seen {
            Ok(seen) => seen,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cannot look at {path} for the held record: {e}");
                }
                None
            }
        };
        let entry = seen.and_then(|stamp| {
            let (born_at, marked_len) = vouch(&path, &stamp)?;
            Some(Entry {
                instance,
                position,
                born_at,
                marked_len,
                stamp,
            })
        });
        match entry {
            Some(entry) => self.entries.insert(path, entry),
            None => self.entries.remove(&path),
        };
    }

    /// Forgets every file for which `keep` is false (in the file at the next save).
    pub fn retain(&mut self, keep: impl Fn(&RelPath) -> bool) {
        let unsaved = &mut self.unsaved;
        self.entries.retain(|p, _| {
            let kept = keep(p);
            if !kept {
                unsaved.push(p.clone());
            }
            kept
        });
    }
}

/// Sets `file`'s mtime to now as the kernel dates a write (its coarse clock, `UTIME_NOW`), not
/// to a time read here: compared with the mtime of a leader's record written a moment later
/// (`promote::fork_if_followed`), this one is then never the newer.
fn touch_mtime(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: futimens reads two timespecs from `times`, an array of two that outlives the
    // call, and takes a descriptor `file` keeps open for the whole call; it writes no memory.
    let rc = unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(link: Fork) -> ForkChain {
        ForkChain::of([link]).unwrap()
    }

    use crate::paths::temp_data_dir as setup;

    impl HeldRecord {
        /// `held_at`'s MARK position.
        fn held_position(
            &self,
            path: &RelPath,
            vouching: (&InstanceId, &ForkChain),
            stamp: &Stamp,
        ) -> Option<u64> {
            self.held_at(path, vouching, stamp)
                .map(|copy| copy.position)
        }
    }

    fn stamp_of(tmp: &tempfile::TempDir, name: &str) -> Stamp {
        Stamp::of(&std::fs::metadata(tmp.path().join(name)).unwrap())
    }

    /// After a failover the new leader's instance goes on from the dead one's up to the MARK it
    /// had synced: a file held under that instance counts as held under the new one when it
    /// was looked at after a MARK at or below the fork, never above it (what the dead leader
    /// did after the fork the new leader never saw), and never under a third instance.
    #[test]
    fn a_file_held_under_the_instance_a_fork_goes_on_from_counts_up_to_the_fork() {
        let (tmp, dir) = setup();
        let names: Vec<RelPath> = ["low", "at", "above"]
            .iter()
            .map(|n| {
                std::fs::write(tmp.path().join(n), n.as_bytes()).unwrap();
                RelPath::new(n).unwrap()
            })
            .collect();
        let (dead, new, other) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        for (path, position) in names.iter().zip([400, 500, 501]) {
            record.record_as_is(&dir, (dead, position), [path.clone()], |_| Some(0));
        }
        let fork = Fork {
            from: dead,
            position: 500,
        };
        let held = |path: &RelPath, vouching: (&InstanceId, &ForkChain)| {
            record.held_position(path, vouching, &stamp_of(&tmp, path.as_str()))
        };
        assert_eq!(held(&names[0], (&new, &one(fork))), Some(400));
        assert_eq!(held(&names[1], (&new, &one(fork))), Some(500));
        assert_eq!(held(&names[2], (&new, &one(fork))), None, "above the fork");
        assert_eq!(
            held(&names[0], (&new, &ForkChain::none())),
            None,
            "no fork named"
        );
        let elsewhere = Fork {
            from: other,
            ..fork
        };
        assert_eq!(held(&names[0], (&new, &one(elsewhere))), None);
        // After failovers in a row: the new instance goes on from `other`, which went on from
        // `dead` up to 500; a file held under `dead` counts up to the lower of the two forks.
        let forked_from_other = |position| {
            ForkChain::forked(
                Fork {
                    from: other,
                    position,
                },
                &one(fork),
            )
        };
        let chain = forked_from_other(900);
        assert_eq!(held(&names[1], (&new, &chain)), Some(500));
        assert_eq!(
            held(&names[2], (&new, &chain)),
            None,
            "above the older fork"
        );
        let low = forked_from_other(450);
        assert_eq!(held(&names[0], (&new, &low)), Some(400));
        assert_eq!(
            held(&names[1], (&new, &low)),
            None,
            "above where the newer fork saw it"
        );
    }

    /// Under an instance the leader's goes on from, a copy counts only as it was when the MARK
    /// it was recorded after was applied: its marked length, not what the look saw past it
    /// (what the dead leader sent after that MARK, which the new leader may never have had),
    /// and only with a birth at or below that MARK (a generation begun after it is not the
    /// one the MARK saw). Under the recording instance itself, all of it.
    #[test]
    fn a_copy_held_under_an_instance_forked_from_counts_as_it_was_at_its_mark() {
        let (tmp, dir) = setup();
        let names: Vec<RelPath> = ["seg", "new-gen", "no-birth", "whole"]
            .iter()
            .map(|n| {
                // Ten bytes on disk, six of them there when the MARK at 400 was applied.
                std::fs::write(tmp.path().join(n), b"0123456789").unwrap();
                RelPath::new(n).unwrap()
            })
            .collect();
        let (dead, new) = ([1u8; 16], [2u8; 16]);
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        let births = [Some(3), Some(401), None, Some(3)];
        for (path, born_at) in names.iter().zip(births) {
            let marked_len = if path.as_str() == "whole" { 10 } else { 6 };
            record.record(&dir, (dead, 400), [(path.clone(), marked_len)], |_| born_at);
        }
        let fork = one(Fork {
            from: dead,
            position: 500,
        });
        let held = |record: &HeldRecord, path: &RelPath, vouching| {
            let stamp = stamp_of(&tmp, path.as_str());
            record.held_at(path, vouching, &stamp).map(|c| c.len_bytes)
        };
        assert_eq!(held(&record, &names[0], (&new, &fork)), Some(6));
        assert_eq!(held(&record, &names[1], (&new, &fork)), None, "born after");
        assert_eq!(held(&record, &names[2], (&new, &fork)), None, "no birth");
        assert_eq!(held(&record, &names[3], (&new, &fork)), Some(10));
        let none = ForkChain::none();
        for path in &names {
            assert_eq!(
                held(&record, path, (&dead, &none)),
                Some(10),
                "{path} under its own"
            );
        }
        // Saved and read back; a record of a build that kept no marked lengths holds nothing
        // under a fork.
        record.save(&dir).unwrap();
        let reloaded = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        assert_eq!(held(&reloaded, &names[0], (&new, &fork)), Some(6));
        let text = std::fs::read_to_string(dir.state_path(FILE_NAME)).unwrap();
        let mut v2 = String::new();
        for line in text.lines() {
            let f: Vec<&str> = line.splitn(5, ' ').collect();
            match f.len() {
                5 => v2 += &format!("{} {} {} {}\n", f[0], f[1], f[2], f[4]),
                _ => v2 += &format!("{}\n", line.replace("ferry-held-v3", "ferry-held-v2")),
            }
        }
        std::fs::write(dir.state_path(FILE_NAME), v2).unwrap();
        let old = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        assert_eq!(
            held(&old, &names[0], (&new, &fork)),
            None,
            "no marked length"
        );
        assert_eq!(held(&old, &names[0], (&dead, &none)), Some(10));
    }

    /// A leader that died and follows next holds what its own last record vouches for, at the
    /// record's catalog position, under the record's instance: through a fork from that
    /// instance only where the fork is at or above that position; a file longer than recorded
    /// (preallocated) up to the length recorded. Its own held entries, where they hold, come
    /// first.
    #[test]
    fn a_dead_leader_following_holds_what_its_own_record_vouches_for_up_to_the_fork() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        std::fs::write(tmp.path().join("pre"), b"012345\0\0\0\0").unwrap();
        let (seg, pre) = (RelPath::new("seg").unwrap(), RelPath::new("pre").unwrap());
        let (stamp, pre_stamp) = (stamp_of(&tmp, "seg"), stamp_of(&tmp, "pre"));
        let kept = |len_bytes| crate::catalog::Kept {
            born_at: 3,
            len_bytes,
        };
        let (led, new) = ([1u8; 16], [2u8; 16]);
        let settled = crate::leader_record::settled_by_now_ns();
        let at = (1 << 40, 500);
        crate::leader_record::save_files(
            &dir,
            (&led, &ForkChain::none()),
            at,
            settled,
            [(&seg, kept(10), stamp), (&pre, kept(6), pre_stamp)],
        )
        .unwrap();
        let record = HeldRecord::load_with_own_record(&dir);
        let fork = |position| Fork {
            from: led,
            position,
        };
        let copy = |len_bytes| HeldCopy {
            position: 500,
            len_bytes,
            by_own_record: true,
        };
        let vouching = (&new, &one(fork(500)));
        assert_eq!(record.held_at(&seg, vouching, &stamp), Some(copy(10)));
        assert_eq!(record.held_at(&pre, vouching, &pre_stamp), Some(copy(6)));
        assert_eq!(
            record.held_position(&seg, (&new, &one(fork(500))), &stamp),
            Some(500)
        );
        assert_eq!(
            record.held_position(&seg, (&new, &one(fork(499))), &stamp),
            None
        );
        assert_eq!(
            record.held_position(&seg, (&led, &ForkChain::none()), &stamp),
            Some(500)
        );
        assert_eq!(
            record.held_position(&seg, (&new, &ForkChain::none()), &stamp),
            None
        );
        assert_eq!(
            HeldRecord::load(&dir).held_position(&seg, (&led, &ForkChain::none()), &stamp),
            None
        );
        assert!(
            record.vouched(&led).is_empty(),
            "not as a follower's look: never saved"
        );

        let mut record = record;
        record.record_as_is(&dir, (new, 900), [seg.clone(), pre.clone()], |_| None);
        assert_eq!(
            record.held_position(&seg, (&new, &one(fork(500))), &stamp),
            Some(900)
        );
        let own = HeldCopy {
            position: 900,
            len_bytes: 10,
            by_own_record: false,
        };
        assert_eq!(record.held_at(&pre, vouching, &pre_stamp), Some(own));
    }

    /// The instance a new leader forks from is the one its record vouches for the most files
    /// under, at the highest MARK recorded under it: the one it followed last, through its end.
    #[test]
    fn a_fork_goes_on_from_the_instance_holding_the_most_files_at_its_last_mark() {
        let (tmp, dir) = setup();
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        assert_eq!(record.fork_point(), None, "nothing held");
        let (old, last) = ([1u8; 16], [2u8; 16]);
        for (i, (instance, position)) in [(old, 900), (last, 300), (last, 700), (last, 20)]
            .into_iter()
            .enumerate()
        {
            let name = format!("f{i}");
            std::fs::write(tmp.path().join(&name), b"x").unwrap();
            record.record_as_is(
                &dir,
                (instance, position),
                [RelPath::new(&name).unwrap()],
                |_| None,
            );
        }
        let want = Fork {
            from: last,
            position: 700,
        };
        assert_eq!(record.fork_point(), Some(want));
        let rebooted = HeldRecord::load_for_boot(&dir, None);
        assert_eq!(
            rebooted.fork_point(),
            None,
            "a record not of this boot holds nothing"
        );
    }

    #[test]
    fn a_recorded_file_is_held_across_a_restart_until_it_changes() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), vec![7u8; 1000]).unwrap();
        let seg = RelPath::new("seg").unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        record.record_as_is(&dir, (a, 500), [seg.clone()], |_| None);
        record.save(&dir).unwrap();

        let restarted = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        let now = stamp_of(&tmp, "seg");
        assert_eq!(
            restarted.held_position(&seg, (&a, &ForkChain::none()), &now),
            Some(500)
        );
        assert_eq!(
            restarted.held_position(&seg, (&b, &ForkChain::none()), &now),
            None,
            "another leader instance"
        );

        // Rewritten at the same size behind ferry's back: the ctime (and mtime) moved.
        std::fs::write(tmp.path().join("seg"), vec![8u8; 1000]).unwrap();
        assert_eq!(
            restarted.held_position(&seg, (&a, &ForkChain::none()), &stamp_of(&tmp, "seg")),
            None
        );
    }

    #[test]
    fn a_record_from_another_boot_or_a_corrupt_one_vouches_for_nothing() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), b"abc").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        record.record_as_is(&dir, ([1; 16], 3), [seg.clone()], |_| None);
        record.save(&dir).unwrap();
        let now = stamp_of(&tmp, "seg");
        let rebooted = HeldRecord::load_for_boot(&dir, Some("boot-2".into()));
        assert_eq!(
            rebooted.held_position(&seg, (&[1; 16], &ForkChain::none()), &now),
            None
        );
        let unknown_boot = HeldRecord::load_for_boot(&dir, None);
        assert_eq!(
            unknown_boot.held_position(&seg, (&[1; 16], &ForkChain::none()), &now),
            None
        );

        std::fs::write(
            tmp.path().join(".ferry/held"),
            b"ferry-held-v1\nboot boot-1\nx y\n",
        )
        .unwrap();
        let corrupt = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        assert_eq!(
            corrupt.held_position(&seg, (&[1; 16], &ForkChain::none()), &now),
            None
        );
    }

    #[test]
    fn checkpoints_append_to_the_journal_which_is_rewritten_once_mostly_stale() {
        let (tmp, dir) = setup();
        let boot = || Some("b".to_string());
        let names: Vec<RelPath> = (0..3)
            .map(|i| RelPath::new(&format!("f{i}")).unwrap())
            .collect();
        for n in &names {
            std::fs::write(tmp.path().join(n.as_str()), b"abc").unwrap();
        }
        let mut record = HeldRecord::load_for_boot(&dir, boot());
        record.record_as_is(&dir, ([1; 16], 3), names.clone(), |_| None);
        record.save(&dir).unwrap();
        let text = || std::fs::read_to_string(tmp.path().join(".ferry/held")).unwrap();
        assert_eq!(text().lines().count(), 2 + 3, "the first save rewrites");

        // f0 grows and is looked at again; f1 is no longer in the leader's index.
        std::fs::write(tmp.path().join("f0"), b"abcdef").unwrap();
        record.record_as_is(&dir, ([1; 16], 9), [names[0].clone()], |_| None);
        record.retain(|p| p != &names[1]);
        record.save(&dir).unwrap();
        assert_eq!(text().lines().count(), 2 + 3 + 2, "two lines appended");
        assert!(text().ends_with("- f1\n"), "{}", text());

        // A crash mid-append leaves a torn last line: ignored, the rest stands.
        let mut f = OpenOptions::new()
            .append(true)
            .open(tmp.path().join(".ferry/held"))
            .unwrap();
        f.write_all(b"0101").unwrap();
        let reloaded = HeldRecord::load_for_boot(&dir, boot());
        let stamp = |n: &str| stamp_of(&tmp, n);
        assert_eq!(
            reloaded.held_position(&names[0], (&[1; 16], &ForkChain::none()), &stamp("f0")),
            Some(9)
        );
        assert_eq!(
            reloaded.held_position(&names[1], (&[1; 16], &ForkChain::none()), &stamp("f1")),
            None
        );
        assert_eq!(
            reloaded.held_position(&names[2], (&[1; 16], &ForkChain::none()), &stamp("f2")),
            Some(3)
        );

        // Many more looks than files: rewritten whole.
        let mut record = reloaded;
        record.save(&dir).unwrap();
        for _ in 0..(2 * 2 + JOURNAL_SLACK_LINES) {
            record.record_as_is(&dir, ([1; 16], 10), [names[2].clone()], |_| None);
            record.save(&dir).unwrap();
        }
        assert!(text().lines().count() <= 2 + 2 + 2 * 2 + JOURNAL_SLACK_LINES);
        let reloaded = HeldRecord::load_for_boot(&dir, boot());
        assert_eq!(
            reloaded.held_position(&names[2], (&[1; 16], &ForkChain::none()), &stamp("f2")),
            Some(10)
        );
    }

    #[test]
    fn births_are_kept_with_the_files_and_a_record_from_before_them_still_vouches() {
        let (tmp, dir) = setup();
        for name in ["a", "b"] {
            std::fs::write(tmp.path().join(name), b"abc").unwrap();
        }
        let [a, b] = ["a", "b"].map(|n| RelPath::new(n).unwrap());
        let mut record = HeldRecord::load_for_boot(&dir, Some("b".into()));
        let born = |p: &RelPath| (p.as_str() == "a").then_some(7);
        record.record_as_is(&dir, ([1; 16], 9), [a.clone(), b.clone()], born);
        record.record_as_is(&dir, ([2; 16], 9), [], born);
        record.save(&dir).unwrap();
        let reloaded = HeldRecord::load_for_boot(&dir, Some("b".into()));
        let mut vouched = reloaded.vouched(&[1; 16]);
        vouched.sort_by(|x, y| x.path.cmp(&y.path));
        let births: Vec<_> = vouched
            .iter()
            .map(|v| (v.path.as_str(), v.born_at))
            .collect();
        assert_eq!(births, [("a", Some(7)), ("b", None)]);
        assert_eq!(vouched[0].stamp, stamp_of(&tmp, "a"));
        assert!(reloaded.vouched(&[2; 16]).is_empty(), "another instance");

        // Written by a build that kept no births (nor marked lengths): read, with none.
        let text = std::fs::read_to_string(tmp.path().join(".ferry/held")).unwrap();
        let v1: String = text
            .replace("ferry-held-v3", "ferry-held-v1")
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(' ').collect();
                if f.len() > 3 {
                    f.drain(2..4);
                }
                format!("{}\n", f.join(" "))
            })
            .collect();
        std::fs::write(tmp.path().join(".ferry/held"), v1).unwrap();
        let old = HeldRecord::load_for_boot(&dir, Some("b".into()));
        assert_eq!(
            old.held_position(&a, (&[1; 16], &ForkChain::none()), &stamp_of(&tmp, "a")),
            Some(9)
        );
        assert!(old.vouched(&[1; 16]).iter().all(|v| v.born_at.is_none()));
    }

    /// A leader that handed off vouches for its files as its catalog has them: not one shorter
    /// on disk, nor one changed after every change was reported (left as it is); one longer on
    /// disk (a segment preallocated beyond what was reported) it cuts to the catalog's length
    /// first, and vouches for as cut (`docs/PROTOCOL.md`, *Across a handoff*).
    #[test]
    fn a_leader_handing_off_vouches_only_for_files_as_its_catalog_has_them() {
        let (tmp, dir) = setup();
        for name in ["kept", "short", "late"] {
            std::fs::write(tmp.path().join(name), b"abcdef").unwrap();
        }
        std::fs::write(tmp.path().join("preallocated"), b"abcdef\0\0\0\0").unwrap();
        let reported_ns = stamp_of(&tmp, "preallocated").ctime_ns;
        // Written after every change was reported: no catalog state.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(tmp.path().join("late"), b"abcdefgh").unwrap();
        let names = ["kept", "short", "late", "preallocated"];
        let [kept, short, late, preallocated] = names.map(|n| RelPath::new(n).unwrap());
        let mut record = HeldRecord::load_for_boot(&dir, Some("b".into()));
        let own = [
            (kept.clone(), 6, 3),
            (short.clone(), 9, 3),
            (late.clone(), 6, 3),
            (preallocated.clone(), 6, 4),
        ];
        record.record_own(&dir, ([1; 16], 40), own, reported_ns);
        let mut vouched: Vec<_> = record.vouched(&[1; 16]);
        vouched.sort_by(|a, b| a.path.cmp(&b.path));
        let vouched: Vec<_> = vouched.iter().map(|v| (&v.path, v.born_at)).collect();
        assert_eq!(vouched, [(&kept, Some(3)), (&preallocated, Some(4))]);
        let held = |path: &RelPath| {
            let stamp = stamp_of(&tmp, path.as_str());
            record.held_position(path, (&[1; 16], &ForkChain::none()), &stamp)
        };
        assert_eq!((held(&kept), held(&preallocated)), (Some(40), Some(40)));
        let read = |name: &str| std::fs::read(tmp.path().join(name)).unwrap();
        assert_eq!(
            read("preallocated"),
            b"abcdef",
            "cut to the catalog's length"
        );
        assert_eq!(
            read("late"),
            b"abcdefgh",
            "a write the catalog never saw: left"
        );
    }

    #[test]
    fn a_file_gone_when_looked_at_is_forgotten() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("f"), b"abc").unwrap();
        let f = RelPath::new("f").unwrap();
        let mut record = HeldRecord::load_for_boot(&dir, Some("b".into()));
        record.record_as_is(&dir, ([1; 16], 3), [f.clone()], |_| None);
        let before = stamp_of(&tmp, "f");
        assert_eq!(
            record.held_position(&f, (&[1; 16], &ForkChain::none()), &before),
            Some(3)
        );
        std::fs::remove_file(tmp.path().join("f")).unwrap();
        record.record_as_is(&dir, ([1; 16], 9), [f.clone()], |_| None);
        assert_eq!(
            record.held_position(&f, (&[1; 16], &ForkChain::none()), &before),
            None
        );
    }
}
