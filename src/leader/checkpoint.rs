//! The leader's record, rewritten while it serves (the `ferry-record` thread), so that a
//! leader that dies is resumed above every MARK it sent.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::catalog::{CatalogEntry, Kept};
use crate::frame::InstanceId;
use crate::index::{hex, Stamp};
use crate::leader_record::{self, LEADER_POSITION_RESERVE};
use crate::paths::{DataDir, RelPath};

use super::hub::{catalog_copy, Shared};

/// How long a checkpoint waits for the watcher to report what it has queued.
pub(super) const WATCHER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The checkpoint thread, and the channel that asks it for a checkpoint now (a message) or
/// stops it (closing).
pub(super) struct Checkpoints {
    stop: std::sync::mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpoints {
    /// Writes the record at once, then every `interval`, until stopped.
    pub(super) fn start(
        shared: Arc<Shared>,
        dir: Arc<DataDir>,
        instance: InstanceId,
        interval: Duration,
    ) -> io::Result<Checkpoints> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ferry-record".into())
            .spawn(move || {
                let mut on_disk = OnDisk::default();
                loop {
                    checkpoint(&shared, &dir, &instance, &mut on_disk);
                    let asked = stopped.recv_timeout(interval);
                    if asked == Err(std::sync::mpsc::RecvTimeoutError::Disconnected) {
                        return;
                    }
                }
            })?;
        Ok(Checkpoints { stop, thread })
    }

    /// Asks for a checkpoint now, rather than at the end of the interval.
    pub(super) fn ask_now(&self) {
        let _ = self.stop.send(());
    }

    pub(super) fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// What the record on disk, written by the last checkpoint, says of each file: the catalog's
/// entry with the stamp a look saw, settled when seen (unchanged for `LEADER_RECORD_SETTLE_MS`
/// before that look) or not.
struct Recorded {
    entry: CatalogEntry,
    stamp: Stamp,
    settled: bool,
}

/// What the checkpoints keep between rounds: the record on disk, if the last round wrote it.
#[derive(Default)]
struct OnDisk {
    files: HashMap<RelPath, Recorded>,
    reserved: Option<u64>,
    /// The catalog's `changes` when the catalog it records was taken.
    changes: Option<u64>,
    /// Every stamp in it had settled: none needs a look again.
    all_settled: bool,
}

impl OnDisk {
    /// The stamp the record on disk holds for `path` at `entry`, if a later record may vouch
    /// for the file with it without looking again: the catalog's entry is the one recorded (no
    /// change reported since; within a generation a file only grows), and the stamp had
    /// settled when seen. A later change to the file then changes its stamp (a ctime at least
    /// `LEADER_RECORD_SETTLE_MS` newer), so the next start, finding it as recorded, finds it
    /// as that look did.
    fn still_good(&self, path: &RelPath, entry: &CatalogEntry) -> Option<Stamp> {
        let r = self.files.get(path)?;
        (r.settled && r.entry == *entry).then_some(r.stamp)
    }
}

/// Writes the leader's record while it serves (`docs/PROTOCOL.md`, *The leader's record*): the
/// files as a look sees them, and as position a reservation that no MARK passes from now until
/// the next checkpoint, so that a successor of a leader that died resumes above every MARK it
/// sent. A record that cannot be written is deleted, lest it promise less than MARKs send.
///
/// Only the files whose entry changed since the record on disk, or whose stamp had not settled
/// then, are looked at again (`OnDisk::still_good`), and nothing is written when nothing
/// changed: an idle leader of many files does no work at each interval.
fn checkpoint(shared: &Shared, dir: &DataDir, instance: &InstanceId, on_disk: &mut OnDisk) {
    let counts = &shared.checkpoint_counts;
    counts.rounds.fetch_add(1, Ordering::Relaxed);
    let flush = shared
        .checkpoint_flush
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
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
    // No change reported since the catalog the record on disk took, and every file in it
    // settled: a new record would say the same.
    if let (Some(changes), true) = (on_disk.changes, on_disk.all_settled) {
        if !flushed() {
            return;
        }
        if shared.lock().catalog.changes() == changes {
            return;
        }
    }
    let before = catalog_copy(shared).snapshot();
    let to_look: Vec<&RelPath> = before
        .iter()
        .filter(|(path, entry)| on_disk.still_good(path, entry).is_none())
        .map(|(path, _)| path)
        .collect();
    counts
        .files_looked
        .fetch_add(to_look.len() as u64, Ordering::Relaxed);
    let looked_at_none = to_look.is_empty();
    let look = leader_record::look(dir, to_look);
    // What changed before the look must be in the catalog taken next (as at a stop).
    if !flushed() {
        return;
    }
    let changes = shared.lock().catalog.changes();
    // Each entry is taken after the look (what changed it since changed the file's stamp) and
    // before the reservation (so every birth is at or below it). A file changed between the
    // two catalogs, and not looked at, is left out until the next round.
    let catalog = catalog_copy(shared).snapshot();
    let files: Vec<(RelPath, Recorded)> = catalog
        .into_iter()
        .filter_map(|(path, entry)| {
            let (stamp, settled) = match look.stamp(&path) {
                Some(stamp) => (stamp, look.settled(&stamp)),
                None => (on_disk.still_good(&path, &entry)?, true),
            };
            Some((
                path,
                Recorded {
                    entry,
                    stamp,
                    settled,
                },
            ))
        })
        .collect();
    let unchanged = looked_at_none && files.len() == on_disk.files.len();
    let (reserved, first) = {
        let mut hub = shared.lock();
        // The reservation of the record on disk, if there is one: the ceiling.
        let ceiling = (hub.mark_ceiling != u64::MAX).then_some(hub.mark_ceiling);
        let reserved = hub
            .catalog
            .position()
            .saturating_add(LEADER_POSITION_RESERVE)
            .max(ceiling.unwrap_or(0));
        // The record on disk says all this already: every file kept its stamp, the same
        // files, the same reservation.
        if unchanged && on_disk.reserved == Some(reserved) {
            on_disk.changes = Some(changes);
            return;
        }
        // Every MARK so far is at or below the position; from now on, at or below `reserved`.
        hub.mark_ceiling = hub.mark_ceiling.min(reserved);
        (reserved, ceiling.is_none())
    };
    let lines = files
        .iter()
        .map(|(path, r)| (path, Kept::of(&r.entry), r.stamp));
    let saved = leader_record::save_files(dir, (instance, reserved), look.taken_ns(), lines);
    let mut hub = shared.lock();
    match saved {
        Ok(()) => {
            counts.writes.fetch_add(1, Ordering::Relaxed);
            hub.mark_ceiling = reserved;
            if first {
                tracing::info!(
                    "recorded instance {} ({} files), and again every checkpoint, so that if \
                     this leader dies the next one resumes it",
                    hex(instance),
                    files.len()
                );
            }
            *on_disk = OnDisk {
                all_settled: files.iter().all(|(_, r)| r.settled),
                files: files.into_iter().collect(),
                reserved: Some(reserved),
                changes: Some(changes),
            };
        }
        Err(e) => {
            *on_disk = OnDisk::default();
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
