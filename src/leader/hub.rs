//! What the writers share with the connections: the catalog and each follower's inbox under
//! one lock (`Hub`), what the connections report under another (`Board`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::auth::Secrets;
use crate::catalog::{Catalog, CatalogError, ChangeList, FileChange};
use crate::frame::Durability;
use crate::lag::{FollowerState, LagSnapshot, LagView};

use super::{ChangeError, CheckpointFlush};

/// A connecting follower's session takes the catalog this many files per hold of the writers'
/// lock (`cargo bench --bench protocol -- catalog` measures one hold).
const CATALOG_COPY_FILES_PER_LOCK: usize = 256;

/// A connected follower's files changed since its session last looked: all the writer touches
/// per follower.
pub(super) struct Inbox {
    pub(super) changes: ChangeList,
    /// When it last went from empty to not empty (the session has not picked it up since).
    pub(super) since: Option<Instant>,
    pub(super) wake: Arc<Notify>,
    /// The session sleeps until woken: the writer wakes it with the next change. Otherwise it
    /// looks every `INBOX_POLL_INTERVAL`, and the writer only adds the path.
    pub(super) wake_wanted: bool,
}

impl Inbox {
    /// `change` was made, leaving the catalog at `position`. Only the first change since the
    /// session looked can wake it: the session learns of the others with that one (woken then,
    /// or finding it at its next poll).
    #[inline]
    fn push(&mut self, change: FileChange, position: u64) {
        if self.changes.is_empty() {
            self.since = Some(Instant::now());
            if std::mem::take(&mut self.wake_wanted) {
                self.wake.notify_one();
            }
        }
        self.changes.push(change, position);
    }
}

/// What a session reports about its follower, for `followers()`, `wait_for` and the state log.
pub(super) struct Slot {
    pub(super) peer: SocketAddr,
    /// When the session started a payload it has not finished sending.
    pub(super) sending_since: Option<Instant>,
    pub(super) lag: Option<LagSnapshot>,
    pub(super) view: Option<LagView>,
    pub(super) payload_bytes_sent: u64,
    pub(super) node_id: Option<String>,
    pub(super) files_sent: u64,
    pub(super) files_renamed: u64,
    pub(super) sync_bytes: Option<(u64, u64)>,
    pub(super) disconnected_at: Option<Instant>,
    /// The state last logged for this follower (a line is logged when it changes).
    pub(super) logged_state: Option<FollowerState>,
}

impl Slot {
    /// The follower's state at `now`, from its last report and what the leader knows since
    /// (`None` before its first report). `inbox_since`: see `Inbox::since`.
    pub(super) fn state(
        &self,
        now: Instant,
        inbox_since: Option<Instant>,
    ) -> Option<FollowerState> {
        if self.disconnected_at.is_some() {
            return Some(FollowerState::Disconnected);
        }
        let view = self.view?;
        Some(view.state(now, self.stalled_since(inbox_since)))
    }

    /// Since when the leader has had something for this follower that it could not get onto
    /// the wire, if it has.
    pub(super) fn stalled_since(&self, inbox_since: Option<Instant>) -> Option<Instant> {
        match (inbox_since, self.sending_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the writer shares with the sessions: the catalog and the inboxes.
pub(super) struct Hub {
    pub(super) catalog: Catalog,
    pub(super) inboxes: HashMap<u64, Inbox>,
    /// No session's MARK goes above this: the reservation of the leader's record this run
    /// wrote (`checkpoint`), `u64::MAX` while there is none on disk; while a checkpoint is
    /// written, the lower of that and the new one. Sessions take it with their inbox.
    pub(super) mark_ceiling: u64,
    /// Why changes are refused (`ChangeError::Stopped`), once they are: the leader stopped on
    /// its own (`Shared::fail`), or its stop finished. Under the lock every change takes
    /// anyway: the writer's look at it cost nothing measurable (`cargo bench --bench append --
    /// no_follower`, 34.0 ns a call with it and without).
    pub(super) refusing: Option<String>,
}

impl Hub {
    /// `ChangeError::Stopped` once changes are refused (`refusing`).
    #[inline]
    pub(super) fn refused(&self) -> Result<(), ChangeError> {
        match &self.refusing {
            Some(why) => Err(ChangeError::Stopped { why: why.clone() }),
            None => Ok(()),
        }
    }
}

/// What the sessions report. The writer never takes this lock, so a session publishing its
/// acks, or a broker waiting for them, never makes an `append` wait.
pub(super) struct Board {
    pub(super) slots: HashMap<u64, Slot>,
    pub(super) next_id: u64,
    /// What the threads blocked on `Shared::acked` wait for. A report wakes them only when
    /// one of them has what it waits for (or waits for any report): waking a thread is a
    /// syscall, and most acks (one follower's, when a waiter needs two) satisfy nobody.
    pub(super) waits: Vec<Wait>,
    pub(super) next_wait_token: u64,
}

/// One thread blocked in `Shared::wait_acked`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wait {
    /// Who registered it, to remove it.
    token: u64,
    /// `None`: woken by any report.
    wanted: Option<Wanted>,
}

/// `position` acked by at least `min_followers` connected followers at `durability`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wanted {
    pub(super) durability: Durability,
    pub(super) min_followers: usize,
    pub(super) position: u64,
}

impl Wanted {
    fn met(&self, board: &Board) -> bool {
        acked_in(board, self.durability, self.min_followers).is_some_and(|a| a >= self.position)
    }
}

impl Board {
    /// Whether a report just made should wake the waiting threads.
    pub(super) fn wake_due(&self) -> bool {
        self.waits
            .iter()
            .any(|w| w.wanted.map_or(true, |wanted| wanted.met(self)))
    }
}

pub(super) struct Shared {
    pub(super) hub: Mutex<Hub>,
    pub(super) board: Mutex<Board>,
    /// Signalled (with `board`) whenever a follower's acks (or its connection) changed, for
    /// `wait_for`.
    pub(super) acked: Condvar,
    pub(super) stopping: AtomicBool,
    pub(super) shutdown: Notify,
    /// Whether checkpoints need `checkpoint_flush` (`LeaderConfig::change_source_flushes`).
    pub(super) flush_needed: bool,
    pub(super) checkpoint_flush: Mutex<Option<CheckpointFlush>>,
    /// The server thread's id, once it runs (0 before): what `/metrics` reads its times by.
    pub(super) server_tid: AtomicU32,
    /// The secrets a connection authenticates under (`Leader::set_secrets`).
    pub(super) secrets: Mutex<Secrets>,
    /// How many times `secrets` changed: a session compares it at every turn, and ends once
    /// the leader no longer holds the secret its follower authenticated with. On lines of its
    /// own: read at every turn of every session, it must not share a line with what the writer
    /// writes at every `append` (the hub's lock), which that read would pull away from it.
    pub(super) secrets_changes: OwnLines<AtomicU64>,
    /// What the checkpoints did so far (`/metrics`).
    pub(super) checkpoint_counts: CheckpointCounts,
    /// Why the leader stopped serving on its own (`Leader::failure`), once it has.
    pub(super) failure: Mutex<Option<String>>,
}

/// What a leader's checkpoints did so far: rounds, records written, files looked at. A round
/// looks only at the files that changed since the record on disk, and writes none when nothing
/// did (`checkpoint`).
#[derive(Default)]
pub(super) struct CheckpointCounts {
    pub(super) rounds: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) files_looked: AtomicU64,
    pub(super) entries_taken: AtomicU64,
}

impl CheckpointCounts {
    pub(super) fn read(&self) -> crate::status::CheckpointCounters {
        crate::status::CheckpointCounters {
            rounds: self.rounds.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            files_looked: self.files_looked.load(Ordering::Relaxed),
            entries_taken: self.entries_taken.load(Ordering::Relaxed),
        }
    }
}

/// A value alone on its cache lines: 128 bytes, as the CPU's prefetcher fetches 64-byte lines
/// in pairs. Reading it never takes a line another thread writes.
#[repr(align(128))]
pub(super) struct OwnLines<T>(pub(super) T);

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Hub> {
        // A panic while holding the lock leaves a consistent catalog (every update is one
        // assignment), so a poisoned lock is still usable.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server thread's time on a CPU and waiting for one, by the id it stored as it
    /// started; `None` before it started, once it ended, or without schedstats.
    pub(super) fn server_thread_times(&self) -> Option<crate::schedstat::ThreadTimes> {
        match self.server_tid.load(Ordering::SeqCst) {
            0 => None,
            tid => crate::schedstat::of_thread(std::process::id(), tid),
        }
    }

    /// The secrets now, and the `secrets_changes` they are as of.
    pub(super) fn secrets(&self) -> (Secrets, u64) {
        // Replaced whole by one assignment: a poisoned lock still holds a consistent value.
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        (
            secrets.clone(),
            self.secrets_changes.0.load(Ordering::SeqCst),
        )
    }

    /// Stops serving on the leader's own account, for `why`: as `Leader::stop_serving` begins,
    /// with `why` kept for `Leader::failure`. (The rest of a stop, the record, is left to the
    /// embedder's stop.)
    pub(super) fn fail(&self, why: String) {
        self.refuse_changes(|| why.clone());
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.begin_stop();
    }

    /// Refuses every change from now on (`Hub::refusing`), for `why`, unless already refusing
    /// for another reason.
    pub(super) fn refuse_changes(&self, why: impl FnOnce() -> String) {
        let mut hub = self.lock();
        if hub.refusing.is_none() {
            hub.refusing = Some(why());
        }
    }

    /// What every stop begins with: the flag set, the server and the sessions told, and every
    /// thread waiting for acks woken to see it.
    pub(super) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.shutdown.notify_waiters();
        // Under the board's lock: a waiter (`Leader::wait_until`) looks at `stopping` and then
        // waits while holding it, so the notice cannot fall between the two and be lost, the
        // waiter then sleeping on to its timeout.
        let _board = self.board();
        self.acked.notify_all();
    }

    pub(super) fn board(&self) -> MutexGuard<'_, Board> {
        // Reports only: a poisoned one is still usable.
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to the catalog and puts what it changed into every follower's inbox.
    /// Returns the position after it. Inlined into each `append` and the like: when it was not
    /// (once the catalog listed changes), the writer's call took 3 to 4 ns more of about 30
    /// (`cargo bench --bench append -- no_follower`).
    #[inline]
    pub(super) fn record(
        &self,
        change: impl FnOnce(&mut Catalog) -> Result<Option<FileChange>, CatalogError>,
    ) -> Result<u64, ChangeError> {
        let mut hub = self.lock();
        let hub = &mut *hub;
        hub.refused()?;
        let changed = change(&mut hub.catalog)?;
        let position = hub.catalog.position();
        let Some(changed) = changed else {
            return Ok(position);
        };
        for inbox in hub.inboxes.values_mut() {
            inbox.push(changed, position);
        }
        Ok(position)
    }

    /// `record` for a rename (`Catalog::rename`): both its changes and the move go to every
    /// session at once. `Ok(None)`: the catalog holds no `from`, and nothing changed.
    pub(super) fn record_rename(&self, from: &str, to: &str) -> Result<Option<u64>, ChangeError> {
        let mut hub = self.lock();
        let hub = &mut *hub;
        hub.refused()?;
        let Some(renamed) = hub.catalog.rename(from, to)? else {
            return Ok(None);
        };
        let position = hub.catalog.position();
        for inbox in hub.inboxes.values_mut() {
            inbox.push(renamed.from, position);
            inbox.push(renamed.to, position);
            inbox.changes.push_move(renamed.moved.clone());
        }
        Ok(Some(position))
    }

    /// Waits (at most `timeout`) for a report that gives `wanted` (`None`: any report), or for
    /// a follower to disconnect or the leader to stop.
    pub(super) fn wait_acked<'a>(
        &self,
        mut board: MutexGuard<'a, Board>,
        wanted: Option<Wanted>,
        timeout: Duration,
    ) -> MutexGuard<'a, Board> {
        let token = board.next_wait_token;
        board.next_wait_token += 1;
        board.waits.push(Wait { token, wanted });
        let mut board = match self.acked.wait_timeout(board, timeout) {
            Ok((guard, _)) => guard,
            Err(p) => p.into_inner().0,
        };
        board.waits.retain(|w| w.token != token);
        board
    }

    /// The position now, and since when each connected follower's inbox has waited.
    pub(super) fn pending(&self) -> (u64, HashMap<u64, Option<Instant>>) {
        let hub = self.lock();
        let since = hub.inboxes.iter().map(|(&id, i)| (id, i.since)).collect();
        (hub.catalog.position(), since)
    }
}

/// A copy of the catalog, taken a part of `CATALOG_COPY_FILES_PER_LOCK` files per hold of the
/// writers' lock, so that a catalog of many files does not hold up an `append`. Not one moment's
/// state: each part is as it was when taken (`Catalog::detached_in_parts`).
pub(super) fn catalog_copy(shared: &Shared) -> Catalog {
    Catalog::detached_in_parts(CATALOG_COPY_FILES_PER_LOCK, |from_id, max_files, part| {
        shared.lock().catalog.take_part(from_id, max_files, part)
    })
}

/// The position acked at `durability` by the `min_followers`-th best connected follower
/// (`min_followers` at least 1: with none, the answer is the catalog's position).
pub(super) fn acked_in(board: &Board, durability: Durability, min_followers: usize) -> Option<u64> {
    let mut acked: Vec<u64> = board
        .slots
        .values()
        .filter(|s| s.disconnected_at.is_none())
        .filter_map(|s| s.lag.as_ref())
        .map(|lag| lag.acked[durability.index()])
        .collect();
    acked.sort_unstable_by(|a, b| b.cmp(a));
    acked.get(min_followers.saturating_sub(1)).copied()
}
