//! The leader's record, rewritten while it serves (the `ferry-record` thread), so that a
//! leader that dies is resumed above every MARK it sent, and written once more at its stop
//! (`record_stop`), each time looking only at the files changed since the last.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Instance;
use crate::catalog::{Catalog, CatalogEntry, FileChange, Kept};
use crate::index::{hex, Stamp};
use crate::leader_record::{self, Look, LEADER_POSITION_RESERVE, LEADER_RECORD_SETTLE_MS};
use crate::paths::{DataDir, RelPath};

use super::hub::{catalog_copy, Shared};
use super::CheckpointFlush;

/// How many changed files a checkpoint takes from the writers' catalog per hold of their lock,
/// which holds up an `append` as long (`cargo bench --bench protocol -- catalog`).
const CHECKPOINT_FILES_PER_LOCK: usize = 256;

/// How long a checkpoint waits for the watcher to report what it has queued.
pub(super) const WATCHER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The checkpoint thread, and the channel that asks it for a checkpoint now (a message) or
/// stops it (closing).
pub(super) struct Checkpoints {
    stop: std::sync::mpsc::Sender<()>,
    thread: JoinHandle<Rounds>,
}

impl Checkpoints {
    /// Writes the record at once, then every `interval`, until stopped. `seen_at_start`: the
    /// look the writers' catalog was built from, if it was, for the first record to vouch for
    /// the files that had settled by then. Before the catalog changes (the leader is handed
    /// out), since the writers list the files they change from now on.
    pub(super) fn start(
        shared: Arc<Shared>,
        dir: Arc<DataDir>,
        (instance, interval): (Instance, Duration),
        seen_at_start: Option<Look>,
    ) -> io::Result<Checkpoints> {
        shared.lock().catalog.start_listing();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-record".into())
            .spawn(move || {
                let shared = for_thread;
                let mut rounds = Rounds::start(&shared, seen_at_start);
                loop {
                    checkpoint(&shared, &dir, &instance, &mut rounds);
                    let asked = stopped.recv_timeout(interval);
                    if asked == Err(std::sync::mpsc::RecvTimeoutError::Disconnected) {
                        return rounds;
                    }
                }
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                shared.lock().catalog.stop_listing();
                return Err(e);
            }
        };
        Ok(Checkpoints { stop, thread })
    }

    /// Asks for a checkpoint now, rather than at the end of the interval.
    pub(super) fn ask_now(&self) {
        let _ = self.stop.send(());
    }

    /// Stops the thread: what its rounds know of the record on disk, for the stop's
    /// (`record_stop`), unless it panicked. The writers go on listing their changes until
    /// `record_stop` (or `stop_listing`) ends it.
    pub(super) fn stop(self) -> Option<Rounds> {
        drop(self.stop);
        self.thread.join().ok()
    }
}

/// The writers no longer list the files they change (no checkpoint will take them).
pub(super) fn stop_listing(shared: &Shared) {
    shared.lock().catalog.stop_listing();
}

/// Writes the record of a stop (`Leader::stop_serving_with`), once no session is left: the
/// catalog's position, which every MARK sent is at or below, and the files as a checkpoint round
/// makes them, looking only at the stale files of `rounds` (the checkpoints' own, at their
/// stop), or at every file without them (checkpoints off, or their thread panicked). With
/// `wait`, files changed less than `LEADER_RECORD_SETTLE_MS` before that look are waited for
/// and looked at again, so the record can vouch for them. `report_pending` reports every change
/// not reported yet, after the look; false: some may not have been, so no record is written
/// (the last checkpoint, if any, stays). Then the writers stop listing their changes.
pub(super) fn record_stop(
    shared: &Shared,
    dir: &DataDir,
    (instance, rounds): (&Instance, Option<Rounds>),
    wait: bool,
    report_pending: impl FnOnce() -> bool,
) {
    let mut rounds = rounds.unwrap_or_else(|| {
        shared.lock().catalog.start_listing();
        Rounds::start(shared, None)
    });
    // The change source reports what it holds, so that the look takes in a file changed right
    // before the stop (else left out of the record: its line on disk no longer matches its
    // entry). Not a promise, which `report_pending` makes after the look.
    if let Some(flush) = change_source_flush(shared) {
        flush();
    }
    rounds.take_changes(shared);
    let mut look = rounds.look_at_stale(shared, dir);
    if let Some(wait_for) = look.unsettled_for().filter(|_| wait) {
        // Files written in the last second would not be vouched for (the settle rule), and
        // the files a broker wrote last are its active segments: worth the wait.
        tracing::info!(
            "waiting {} ms before recording instance {} for the next start: {} files changed \
             less than {LEADER_RECORD_SETTLE_MS} ms ago",
            wait_for.as_millis(),
            hex(&instance.id),
            look.unsettled()
        );
        std::thread::sleep(wait_for);
        rounds.take_changes(shared);
        look = rounds.look_at_stale(shared, dir);
    }
    if !report_pending() {
        stop_listing(shared);
        tracing::warn!(
            "not recording instance {} for the next start: some changes may not have been \
             reported; the next start resumes from the last checkpoint, if any",
            hex(&instance.id)
        );
        return;
    }
    rounds.renew_lines(shared, &look);
    let position = rounds.catalog.position();
    let of = (&instance.id, &instance.forks);
    let at = (position, position);
    let saved = leader_record::save_files(dir, of, at, look.taken_ns(), rounds.lines());
    stop_listing(shared);
    let (files, looked) = (rounds.files.len(), look.files_seen());
    match saved {
        Ok(()) if looked < files => tracing::info!(
            "recorded instance {} at position {position} ({files} files, {looked} of them \
             looked at now, the rest as a checkpoint saw them) for the next start",
            hex(&instance.id),
        ),
        Ok(()) => tracing::info!(
            "recorded instance {} at position {position} ({files} files, each looked at now) \
             for the next start",
            hex(&instance.id),
        ),
        Err(e) => tracing::warn!(
            "cannot write the leader's record: {e}; the next start resumes from the last \
             checkpoint, if any, else draws a new instance, and its followers hash what \
             changed since their last inventory"
        ),
    }
}

/// What the record on disk, written by the last checkpoint, says of a file: the catalog's
/// entry with the stamp a look saw, settled when seen (unchanged for `LEADER_RECORD_SETTLE_MS`
/// before that look) or not.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Recorded {
    entry: CatalogEntry,
    stamp: Stamp,
    settled: bool,
}

/// What the checkpoints keep between rounds: their own copy of the writers' catalog, kept in
/// step with the files the writers list as changed (`Catalog::start_listing`), and the record
/// on disk, if the last round wrote it.
pub(super) struct Rounds {
    /// The writers' catalog as of the last round's changes (`Catalog::detached`).
    catalog: Catalog,
    /// Each file's line as the last round made it (or the start's look, before one did): what
    /// the record on disk holds, once `reserved` is set, and what the next record or the stop's
    /// carries over for a file not stale.
    files: HashMap<RelPath, Recorded>,
    /// The reservation of the record on disk, if the last round wrote one.
    reserved: Option<u64>,
    /// The files whose line the next record must make again: changed since the record on disk,
    /// not settled when looked at, or left out of it. Empty: a new record would say the same.
    stale: HashSet<RelPath>,
    /// Buffers for the changes taken from the writers.
    changes: Vec<FileChange>,
    changed: Vec<(RelPath, u64)>,
}

impl Rounds {
    /// Copies the writers' catalog, once they list the files they change (a part per hold of
    /// their lock: a file changed meanwhile is in both the copy and the list, which `apply`
    /// allows). Each file is stale, for the first round to look at, but those `seen_at_start`
    /// saw settled: that look's stamp and the copy's entry are their line, as a round's look
    /// and the entries taken after it would be (the catalog was built from that look, and each
    /// change made since it is listed, so its file will be stale).
    fn start(shared: &Shared, seen_at_start: Option<Look>) -> Rounds {
        let catalog = catalog_copy(shared);
        shared
            .checkpoint_counts
            .entries_taken
            .fetch_add(catalog.len() as u64, Ordering::Relaxed);
        let mut rounds = Rounds {
            catalog,
            files: HashMap::new(),
            reserved: None,
            stale: HashSet::new(),
            changes: Vec::new(),
            changed: Vec::new(),
        };
        rounds.forget_record();
        let Some(look) = seen_at_start else {
            return rounds;
        };
        let Rounds {
            catalog,
            files,
            stale,
            ..
        } = &mut rounds;
        stale.retain(|path| {
            let stamp = look.stamp(path).filter(|s| look.settled(s));
            let Some((entry, stamp)) = catalog.get(path).zip(stamp) else {
                return true;
            };
            let settled = true;
            let line = Recorded {
                entry,
                stamp,
                settled,
            };
            files.insert(path.clone(), line);
            false
        });
        rounds
    }

    /// Whether the record on disk says what a new one would: no file stale, and the position
    /// where it was (the reservation is above it by `LEADER_POSITION_RESERVE`).
    fn record_current(&self) -> bool {
        self.stale.is_empty()
            && self.reserved.is_some_and(|reserved| {
                self.catalog
                    .position()
                    .saturating_add(LEADER_POSITION_RESERVE)
                    <= reserved
            })
    }

    /// As if no record were on disk: every file stale.
    fn forget_record(&mut self) {
        self.files.clear();
        self.reserved = None;
        self.stale = self
            .catalog
            .snapshot()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
    }

    /// Brings the catalog up to date with the files the writers changed since the last call;
    /// those files become stale. Returns them. Under the writers' lock it only takes their
    /// entries (`CHECKPOINT_FILES_PER_LOCK` a hold) and, in another hold, the paths of the files
    /// new to its copy (`Catalog::apply_listed_in_parts`; `cargo bench --bench protocol --
    /// catalog` measures a hold).
    fn take_changes(&mut self, shared: &Shared) -> &[(RelPath, u64)] {
        self.changed.clear();
        self.catalog.apply_listed_in_parts(
            CHECKPOINT_FILES_PER_LOCK,
            |max_files, into| {
                let mut hub = shared.lock();
                let more = hub.catalog.take_listed(max_files, into);
                (more, hub.catalog.position())
            },
            |ids| {
                let hub = shared.lock();
                ids.iter()
                    .filter_map(|&id| Some((id, hub.catalog.path_unshared(id)?)))
                    .collect()
            },
            &mut self.changes,
            &mut self.changed,
        );
        shared
            .checkpoint_counts
            .entries_taken
            .fetch_add(self.changed.len() as u64, Ordering::Relaxed);
        self.stale
            .extend(self.changed.iter().map(|(path, _)| path.clone()));
        &self.changed
    }

    /// Looks at the stale files still in the catalog (counted in `files_looked`).
    fn look_at_stale(&self, shared: &Shared, dir: &DataDir) -> Look {
        let to_look: Vec<&RelPath> = self
            .stale
            .iter()
            .filter(|path| self.catalog.get(path).is_some())
            .collect();
        shared
            .checkpoint_counts
            .files_looked
            .fetch_add(to_look.len() as u64, Ordering::Relaxed);
        leader_record::look(dir, to_look)
    }

    /// Takes the changes made since `look`, which came after it (the change source having
    /// reported everything made before it), and makes each stale file's line of the next record
    /// from `look` and its entry taken now (what changed it since changed the file's stamp): a
    /// file stays stale if it is still in the catalog and was not settled when looked at, or
    /// changed since. Whether every line is the one the record on disk has.
    fn renew_lines(&mut self, shared: &Shared, look: &Look) -> bool {
        let changed_since_look: HashSet<RelPath> = self
            .take_changes(shared)
            .iter()
            .map(|(path, _)| path.clone())
            .collect();
        let lines: Vec<(RelPath, Option<Recorded>, bool)> = self
            .stale
            .iter()
            .map(|path| {
                let entry = self.catalog.get(path);
                let line = entry.and_then(|entry| self.line(path, entry, look));
                let done = line.is_some_and(|l| l.settled) && !changed_since_look.contains(path);
                (path.clone(), line, entry.is_some() && !done)
            })
            .collect();
        let mut unchanged = true;
        for (path, line, stays_stale) in lines {
            if !stays_stale {
                self.stale.remove(&path);
            }
            let before = match line {
                Some(line) => self.files.insert(path, line),
                None => self.files.remove(&path),
            };
            unchanged &= before == line;
        }
        unchanged
    }

    /// The record's lines: each file with its catalog entry and stamp.
    fn lines(&self) -> impl Iterator<Item = (&RelPath, Kept, Stamp)> {
        self.files
            .iter()
            .map(|(path, r)| (path, Kept::of(&r.entry), r.stamp))
    }

    /// The line of `path` in the next record, from its catalog `entry` and what this round's
    /// `look` saw: that stamp if it looked, else the one on disk if still good (the entry is
    /// the one recorded: no change reported since, and within a generation a file only grows;
    /// and the stamp had settled when seen, so a later change to the file changes it, with a
    /// ctime at least `LEADER_RECORD_SETTLE_MS` newer, and the next start, finding it as
    /// recorded, finds it as that look did). `None`: left out of this record.
    fn line(&self, path: &RelPath, entry: CatalogEntry, look: &Look) -> Option<Recorded> {
        if let Some(stamp) = look.stamp(path) {
            let settled = look.settled(&stamp);
            return Some(Recorded {
                entry,
                stamp,
                settled,
            });
        }
        let on_disk = self.files.get(path)?;
        (on_disk.settled && on_disk.entry == entry).then_some(*on_disk)
    }
}

/// What has the change source report every change made up to now, once it is set
/// (`Leader::set_checkpoint_flush`).
fn change_source_flush(shared: &Shared) -> Option<CheckpointFlush> {
    let flush = shared.checkpoint_flush.lock();
    flush.unwrap_or_else(|p| p.into_inner()).clone()
}

/// Writes the leader's record while it serves (`docs/PROTOCOL.md`, *The leader's record*): the
/// files as a look sees them, and as position a reservation that no MARK passes from now until
/// the next checkpoint, so that a successor of a leader that died resumes above every MARK it
/// sent. A record that cannot be written is deleted, lest it promise less than MARKs send.
///
/// A round takes from the writers only the entries changed since the last one, looks again
/// only at the stale files (changed since the record on disk, or not settled then), and writes
/// nothing when none is: an idle leader of many files does no work at each interval, and a busy
/// one looks at and takes what changed (the record itself is still written whole).
fn checkpoint(shared: &Shared, dir: &DataDir, instance: &Instance, rounds: &mut Rounds) {
    let counts = &shared.checkpoint_counts;
    counts.rounds.fetch_add(1, Ordering::Relaxed);
    let flush = change_source_flush(shared);
    if flush.is_none() && shared.flush_needed {
        return; // the change source cannot say yet that it reported everything: nothing to write
    }
    let flushed = || {
        let flushed = flush.as_ref().map_or(true, |flush| flush());
        if !flushed && shared.lock().mark_ceiling != u64::MAX {
            tracing::warn!(
                "not writing a checkpoint of the leader's record: the watcher did not report \
                 its changes (stopped, or slower than {} ms); the last checkpoint stays",
                WATCHER_FLUSH_TIMEOUT.as_millis()
            );
        }
        flushed
    };
    rounds.take_changes(shared);
    if rounds.record_current() {
        // Nothing changed that the writers have handed over: has the change source anything
        // more to report?
        if !flushed() {
            return;
        }
        rounds.take_changes(shared);
        if rounds.record_current() {
            return;
        }
    }
    let look = rounds.look_at_stale(shared, dir);
    // What changed before the look must be in the catalog the record takes (as at a stop).
    if !flushed() {
        return;
    }
    // Each entry is taken after the look and before the reservation (so every birth is at or
    // below it). A file changed since the look stays stale, to be looked at again next round.
    let unchanged = rounds.renew_lines(shared, &look);
    let (reserved, catalog_position, first, already_on_disk) = {
        let mut hub = shared.lock();
        // The reservation of the record on disk, if there is one: the ceiling.
        let ceiling = (hub.mark_ceiling != u64::MAX).then_some(hub.mark_ceiling);
        let catalog_position = hub.catalog.position();
        let reserved = catalog_position
            .saturating_add(LEADER_POSITION_RESERVE)
            .max(ceiling.unwrap_or(0));
        // The record on disk says all this already: every file kept its line, the same
        // reservation.
        let already_on_disk = unchanged && rounds.reserved == Some(reserved);
        if !already_on_disk {
            // Every MARK so far is at or below the position; from now on, at or below
            // `reserved`.
            hub.mark_ceiling = hub.mark_ceiling.min(reserved);
        }
        (
            reserved,
            catalog_position,
            ceiling.is_none(),
            already_on_disk,
        )
    };
    if already_on_disk {
        return;
    }
    let of = (&instance.id, &instance.forks);
    let at = (reserved, catalog_position);
    let saved = leader_record::save_files(dir, of, at, look.taken_ns(), rounds.lines());
    let mut hub = shared.lock();
    match saved {
        Ok(()) => {
            counts.writes.fetch_add(1, Ordering::Relaxed);
            hub.mark_ceiling = reserved;
            rounds.reserved = Some(reserved);
            if first {
                tracing::info!(
                    "recorded instance {} ({} files), and again every checkpoint, so that if \
                     this leader dies the next one resumes it",
                    hex(&instance.id),
                    rounds.files.len()
                );
            }
        }
        Err(e) => {
            rounds.forget_record();
            match leader_record::remove(dir) {
                Ok(()) => {
                    hub.mark_ceiling = u64::MAX;
                    tracing::warn!(
                        "cannot write the leader's record: {e}; if this leader dies, the next \
                         one draws a new instance and its followers hash what changed since \
                         their last inventory"
                    );
                }
                Err(removing) => tracing::warn!(
                    "cannot write the leader's record ({e}) nor delete the last one \
                     ({removing}): MARKs stay at or below its position, {}",
                    hub.mark_ceiling
                ),
            }
        }
    }
}
