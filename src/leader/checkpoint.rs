//! The leader's record, rewritten while it serves (the `ferry-record` thread), so that a
//! leader that dies is resumed above every MARK it sent.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::frame::InstanceId;
use crate::index::hex;
use crate::leader_record::{self, LEADER_POSITION_RESERVE};
use crate::paths::DataDir;

use super::hub::{catalog_copy, catalog_paths, Shared};

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
            .spawn(move || loop {
                checkpoint(&shared, &dir, &instance);
                let asked = stopped.recv_timeout(interval);
                if asked == Err(std::sync::mpsc::RecvTimeoutError::Disconnected) {
                    return;
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

/// Writes the leader's record while it serves (`docs/PROTOCOL.md`, *The leader's record*): the
/// files as a look sees them, and as position a reservation that no MARK passes from now until
/// the next checkpoint, so that a successor of a leader that died resumes above every MARK it
/// sent. A record that cannot be written is deleted, lest it promise less than MARKs send.
fn checkpoint(shared: &Shared, dir: &DataDir, instance: &InstanceId) {
    let look = leader_record::look(dir, &catalog_paths(shared));
    // What changed before the look must be in the catalog taken next (as at a stop).
    let flush = shared
        .checkpoint_flush
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let flushed = match flush {
        Some(flush) => flush(),
        None => !shared.flush_needed,
    };
    if !flushed {
        if shared.lock().mark_ceiling != u64::MAX {
            tracing::warn!(
                "not writing a checkpoint of the leader's record: the watcher did not report \
                 its changes (stopped, or slower than {} ms); the last checkpoint stays",
                WATCHER_FLUSH_TIMEOUT.as_millis()
            );
        }
        return;
    }
    // Each entry is taken after the look (what changed it since changed the file's stamp) and
    // before the reservation (so every birth is at or below it).
    let catalog = catalog_copy(shared).snapshot();
    let (reserved, first) = {
        let mut hub = shared.lock();
        // The reservation of the record on disk, if there is one: the ceiling.
        let on_disk = (hub.mark_ceiling != u64::MAX).then_some(hub.mark_ceiling);
        let reserved = hub
            .catalog
            .position()
            .saturating_add(LEADER_POSITION_RESERVE)
            .max(on_disk.unwrap_or(0));
        // Every MARK so far is at or below the position; from now on, at or below `reserved`.
        hub.mark_ceiling = hub.mark_ceiling.min(reserved);
        (reserved, on_disk.is_none())
    };
    let saved = leader_record::save(dir, instance, reserved, &catalog, &look);
    let mut hub = shared.lock();
    match saved {
        Ok(()) => {
            hub.mark_ceiling = reserved;
            if first {
                tracing::info!(
                    "recorded instance {} ({} files), and again every checkpoint, so that if \
                     this leader dies the next one resumes it",
                    hex(instance),
                    catalog.len()
                );
            }
        }
        Err(e) => match leader_record::remove(dir) {
            Ok(()) => {
                hub.mark_ceiling = u64::MAX;
                tracing::warn!(
                    "cannot write the leader's record: {e}; if this leader dies, the next one \
                     draws a new instance and its followers hash what changed since their last \
                     inventory"
                );
            }
            Err(removing) => tracing::warn!(
                "cannot write the leader's record ({e}) nor delete the last one ({removing}): \
                 MARKs stay at or below its position, {}",
                hub.mark_ceiling
            ),
        },
    }
}
