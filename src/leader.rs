//! The leader as a library: the change API a broker calls, and the server that ships changes.
//!
//! A broker (or `ferry lead`, fed by the inotify watcher) tells the `Leader` what changed with
//! `append`, `replace_file` and `delete_file`. Those calls only update the catalog and mark the
//! path dirty for each connected follower, under one short lock: they never wait for a follower,
//! never touch a socket and never copy data, so a slow or stopped follower costs the writer
//! nothing. The data dir is the queue: a follower's session reads the bytes from the file when
//! its socket is ready.
//!
//! The server runs on its own thread with the chosen I/O engine. Each connection is a task that
//! drives a `session::leader::LeaderSession`; a second task per connection reads the socket, so
//! acks keep arriving while a payload is being spliced out.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::auth::{random_instance, random_nonce, Secret};
use crate::catalog::{Catalog, ChangeList, FileChange};
use crate::engine::{self, Conn, EngineKind, FineTimer, Listener};
use crate::frame::{Durability, ErrorCode, Frame, InstanceId, VANISHED_HOLD_TIMEOUT_MS};
use crate::index::{hex, scan, DigestCache};
use crate::lag::{FollowerState, LagSnapshot, LagView, ACK_TIMEOUT_MS_DEFAULT};
use crate::leader_record::{
    self, LEADER_POSITION_RESERVE, LEADER_RECORD_INTERVAL_MS, LEADER_RECORD_SETTLE_MS,
};
use crate::paths::{DataDir, PathError, RelPath};
use crate::session::leader::{LeaderPhase, LeaderSession, Transmit};
use crate::session::SessionError;
use crate::watch::{Change, Watcher};

/// Bytes read from a follower's socket per read.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Disconnected followers kept in `followers()` for the operator to see.
const DISCONNECTED_KEPT_MAX: usize = 16;
/// How often a connection refreshes its lag report when no ack arrived.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// A connecting follower's session takes the catalog this many files per hold of the writers'
/// lock (`cargo bench --bench protocol -- catalog` measures one hold).
const CATALOG_COPY_FILES_PER_LOCK: usize = 256;

/// While changes keep arriving, a connection looks at its inbox this often instead of having the
/// writer wake it: a wake is a system call on the writer's thread (and, on a VM, an interrupt to
/// another CPU), which costs an `append` many times what the rest of it does.
const INBOX_POLL_INTERVAL: Duration = Duration::from_micros(200);
/// How long a connection keeps looking after the last change it found, before it goes back to
/// sleeping until the writer wakes it: an idle leader costs no CPU.
const INBOX_POLL_IDLE_MAX: Duration = Duration::from_millis(1);
/// Until its initial sync is sent, a connection looks this often instead: nothing it finds is
/// acked before the sync's last MARK anyway, and each look pulls the writers' lock and inbox
/// over to the session's CPU, which the writer's next `append` pays to pull back. While a
/// follower joined with a 2 GiB full sync, the writer's `append()` p99 was lower with looks
/// every 5 ms than every 200 us in 12 interleaved pairs of 12 (docs/PERFORMANCE.md).
const INBOX_POLL_INTERVAL_SYNCING: Duration = Duration::from_millis(5);
/// `INBOX_POLL_IDLE_MAX` for a connection sending its initial sync: longer than its look
/// interval, or finding nothing new at one look would make the writer wake it again.
const INBOX_POLL_IDLE_MAX_SYNCING: Duration = Duration::from_millis(25);
/// Open files kept per connection for shipping payloads.
const OPEN_FILES_PER_CONNECTION_MAX: usize = 256;

#[derive(Clone)]
pub struct LeaderConfig {
    pub data_dir: std::path::PathBuf,
    pub listen: SocketAddr,
    pub secret: Secret,
    /// `None`: io_uring when it works here, else the fallback with a warning.
    pub engine: Option<EngineKind>,
    pub ack_timeout: Duration,
    /// The TCP congestion control the leader sends to followers with (TCP_CONGESTION on the
    /// listening socket, which every accepted connection inherits); `None` keeps the system's
    /// (`net.ipv4.tcp_congestion_control`). Where that is BBR without the fq qdisc, the kernel
    /// paces each round's burst, which costs latency and CPU on a fast link (README, Use).
    pub tcp_congestion: Option<String>,
    /// How often the serving leader rewrites its record (`leader_record`), so that if it dies
    /// its successor resumes the instance; zero writes none until the stop.
    pub record_interval: Duration,
    /// The leader is fed by a change source that reports changes late (`ferry lead`'s
    /// watcher): a checkpoint is written only once that source has reported every change made
    /// before it (`Leader::set_checkpoint_flush`), so none before the source is attached.
    pub change_source_flushes: bool,
}

/// Has a change source report every change made up to now to the leader; false if it cannot
/// (stopped, or too slow), and the checkpoint is not written.
pub type CheckpointFlush = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long a checkpoint waits for the watcher to report what it has queued.
const WATCHER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl LeaderConfig {
    pub fn new(
        data_dir: impl Into<std::path::PathBuf>,
        listen: SocketAddr,
        secret: Secret,
    ) -> LeaderConfig {
        LeaderConfig {
            data_dir: data_dir.into(),
            listen,
            secret,
            engine: None,
            ack_timeout: Duration::from_millis(ACK_TIMEOUT_MS_DEFAULT),
            tcp_congestion: None,
            record_interval: Duration::from_millis(LEADER_RECORD_INTERVAL_MS),
            change_source_flushes: false,
        }
    }
}

/// What the leader knows of one follower connection.
#[derive(Debug, Clone)]
pub struct FollowerInfo {
    pub id: u64,
    /// The node id the follower named itself with (NODE_ID), if any.
    pub node_id: Option<String>,
    pub peer: SocketAddr,
    pub lag: LagSnapshot,
    pub payload_bytes_sent: u64,
    /// Whole-file transfers committed on this connection.
    pub files_sent: u64,
    /// While its initial sync runs: (payload bytes sent for it, bytes planned).
    pub sync_bytes: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("cannot stat {path}: {source}")]
    Stat { path: String, source: io::Error },
}

/// A connected follower's files changed since its session last looked: all the writer touches
/// per follower.
struct Inbox {
    changes: ChangeList,
    /// When it last went from empty to not empty (the session has not picked it up since).
    since: Option<Instant>,
    wake: Arc<Notify>,
    /// The session sleeps until woken: the writer wakes it with the next change. Otherwise it
    /// looks every `INBOX_POLL_INTERVAL`, and the writer only adds the path.
    wake_wanted: bool,
}

/// What a session reports about its follower, for `followers()`, `wait_for` and the state log.
struct Slot {
    peer: SocketAddr,
    /// When the session started a payload it has not finished sending.
    sending_since: Option<Instant>,
    lag: Option<LagSnapshot>,
    view: Option<LagView>,
    payload_bytes_sent: u64,
    node_id: Option<String>,
    files_sent: u64,
    sync_bytes: Option<(u64, u64)>,
    disconnected_at: Option<Instant>,
    /// The state last logged for this follower (a line is logged when it changes).
    logged_state: Option<FollowerState>,
}

impl Slot {
    /// The follower's state at `now`, from its last report and what the leader knows since
    /// (`None` before its first report). `inbox_since`: see `Inbox::since`.
    fn state(&self, now: Instant, inbox_since: Option<Instant>) -> Option<FollowerState> {
        if self.disconnected_at.is_some() {
            return Some(FollowerState::Disconnected);
        }
        let view = self.view?;
        Some(view.state(now, self.stalled_since(inbox_since)))
    }

    /// Since when the leader has had something for this follower that it could not get onto
    /// the wire, if it has.
    fn stalled_since(&self, inbox_since: Option<Instant>) -> Option<Instant> {
        match (inbox_since, self.sending_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the writer shares with the sessions: the catalog and the inboxes.
struct Hub {
    catalog: Catalog,
    inboxes: HashMap<u64, Inbox>,
    /// No session's MARK goes above this: the reservation of the leader's record this run
    /// wrote (`checkpoint`), `u64::MAX` while there is none on disk; while a checkpoint is
    /// written, the lower of that and the new one. Sessions take it with their inbox.
    mark_ceiling: u64,
}

/// What the sessions report. The writer never takes this lock, so a session publishing its
/// acks, or a broker waiting for them, never makes an `append` wait.
struct Board {
    slots: HashMap<u64, Slot>,
    next_id: u64,
    /// What the threads blocked on `Shared::acked` wait for. A report wakes them only when
    /// one of them has what it waits for (or waits for any report): waking a thread is a
    /// syscall, and most acks (one follower's, when a waiter needs two) satisfy nobody.
    waits: Vec<Wait>,
    next_wait_token: u64,
}

/// One thread blocked in `Shared::wait_acked`.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// Who registered it, to remove it.
    token: u64,
    /// `None`: woken by any report.
    wanted: Option<Wanted>,
}

/// `position` acked by at least `min_followers` connected followers at `durability`.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    durability: Durability,
    min_followers: usize,
    position: u64,
}

impl Wanted {
    fn met(&self, board: &Board) -> bool {
        acked_in(board, self.durability, self.min_followers).is_some_and(|a| a >= self.position)
    }
}

impl Board {
    /// Whether a report just made should wake the waiting threads.
    fn wake_due(&self) -> bool {
        self.waits
            .iter()
            .any(|w| w.wanted.map_or(true, |wanted| wanted.met(self)))
    }
}

struct Shared {
    hub: Mutex<Hub>,
    board: Mutex<Board>,
    /// Signalled (with `board`) whenever a follower's acks (or its connection) changed, for
    /// `wait_for`.
    acked: Condvar,
    stopping: AtomicBool,
    shutdown: Notify,
    /// Whether checkpoints need `checkpoint_flush` (`LeaderConfig::change_source_flushes`).
    flush_needed: bool,
    checkpoint_flush: Mutex<Option<CheckpointFlush>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Hub> {
        // A panic while holding the lock leaves a consistent catalog (every update is one
        // assignment), so a poisoned lock is still usable.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        // Reports only: a poisoned one is still usable.
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to the catalog and puts what it changed into every follower's inbox.
    /// Returns the position after it.
    fn record(
        &self,
        change: impl FnOnce(&mut Catalog) -> Result<Option<FileChange>, PathError>,
    ) -> Result<u64, ChangeError> {
        let mut hub = self.lock();
        let hub = &mut *hub;
        let changed = change(&mut hub.catalog)?;
        let position = hub.catalog.position();
        let Some(changed) = changed else {
            return Ok(position);
        };
        for inbox in hub.inboxes.values_mut() {
            // Only the first change since the session looked can wake it: the session learns
            // of the others with that one (woken then, or finding it at its next poll).
            if inbox.changes.is_empty() {
                inbox.since = Some(Instant::now());
                if std::mem::take(&mut inbox.wake_wanted) {
                    inbox.wake.notify_one();
                }
            }
            inbox.changes.push(changed, position);
        }
        Ok(position)
    }

    /// Waits (at most `timeout`) for a report that gives `wanted` (`None`: any report), or for
    /// a follower to disconnect or the leader to stop.
    fn wait_acked<'a>(
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
    fn pending(&self) -> (u64, HashMap<u64, Option<Instant>>) {
        let hub = self.lock();
        let since = hub.inboxes.iter().map(|(&id, i)| (id, i.since)).collect();
        (hub.catalog.position(), since)
    }
}

/// The running leader: the change API for the writer, and a server thread for the followers.
pub struct Leader {
    shared: Arc<Shared>,
    dir: Arc<DataDir>,
    local_addr: SocketAddr,
    engine: EngineKind,
    /// The TCP congestion control followers' connections use, as the listening socket has it.
    tcp_congestion: String,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Positions mean something only within this instance (held records): drawn at start, or
    /// resumed from the last graceful stop's record.
    instance: InstanceId,
    /// The record for the next start is written (by the first stop).
    record_written: AtomicBool,
    /// The thread writing the record while serving (`checkpoint`), until the stop.
    checkpoints: Mutex<Option<Checkpoints>>,
}

/// The checkpoint thread, and the channel that asks it for a checkpoint now (a message) or
/// stops it (closing).
struct Checkpoints {
    stop: std::sync::mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpoints {
    /// Writes the record at once, then every `interval`, until stopped.
    fn start(
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

    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// A copy of the catalog, taken a part of `CATALOG_COPY_FILES_PER_LOCK` files per hold of the
/// writers' lock, so that a catalog of many files does not hold up an `append`. Not one moment's
/// state: each part is as it was when taken (`Catalog::detached_in_parts`).
fn catalog_copy(shared: &Shared) -> Catalog {
    Catalog::detached_in_parts(CATALOG_COPY_FILES_PER_LOCK, |from_id, max_files, part| {
        shared.lock().catalog.take_part(from_id, max_files, part)
    })
}

/// The paths of every file in the catalog.
fn catalog_paths(shared: &Shared) -> Vec<RelPath> {
    let copy = catalog_copy(shared);
    copy.snapshot().into_iter().map(|(p, _)| p).collect()
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

impl Leader {
    /// Opens the data dir and starts serving followers on `config.listen`. The catalog starts
    /// with `files` (path, logical length), e.g. from a scan; more can be registered later.
    /// After a stop in the same boot, or a run that died once it had written its record (every
    /// `config.record_interval` while serving), it resumes that run's instance, and the files
    /// unchanged since the record keep what followers' held records know of them
    /// (`leader_record`).
    pub fn start(config: LeaderConfig, files: Vec<(RelPath, u64)>) -> io::Result<Leader> {
        let dir = Arc::new(DataDir::open(&config.data_dir)?);
        dir.clear_temps()?;
        let engine = engine::choose(config.engine)?;
        let congestion_asked = config.tcp_congestion.is_some();
        let record_interval = config.record_interval;
        let resumed = leader_record::take(&dir);
        let (catalog, instance) = match &resumed {
            Some(r) => {
                tracing::info!(
                    "resuming instance {} from its record: {} of {} files vouched for (the \
                     rest changed since, within {LEADER_RECORD_SETTLE_MS} ms before the \
                     record, or gone: their followers' copies are hashed), positions from {}",
                    hex(&r.instance),
                    r.kept.len(),
                    r.kept.len() + r.not_kept,
                    r.last_position.saturating_add(1)
                );
                (
                    Catalog::resumed(files, r.last_position, &r.kept),
                    r.instance,
                )
            }
            None => {
                let instance = random_instance().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot draw the leader's instance id: {e}"),
                    )
                })?;
                (Catalog::new(files), instance)
            }
        };
        let shared = Arc::new(Shared {
            hub: Mutex::new(Hub {
                catalog,
                inboxes: HashMap::new(),
                mark_ceiling: u64::MAX,
            }),
            board: Mutex::new(Board {
                slots: HashMap::new(),
                next_id: 1,
                waits: Vec::new(),
                next_wait_token: 0,
            }),
            acked: Condvar::new(),
            stopping: AtomicBool::new(false),
            shutdown: Notify::new(),
            flush_needed: config.change_source_flushes,
            checkpoint_flush: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            let dir = dir.clone();
            std::thread::Builder::new()
                .name("ferry-leader".into())
                .spawn(move || {
                    engine::run(engine, move || {
                        serve(engine, config, shared, dir, ready_tx, instance)
                    })
                })?
        };
        let ready = match ready_rx.recv() {
            Ok(ready) => ready,
            Err(_) => Err(io::Error::other(
                "the leader's server thread exited at start",
            )),
        };
        let (local_addr, tcp_congestion) = match ready {
            Ok(ready) => ready,
            Err(e) => {
                if let Some(r) = &resumed {
                    r.put_back(&dir);
                }
                return Err(e);
            }
        };
        tracing::info!(
            "leading {} on {local_addr} with the {} engine, TCP congestion control {tcp_congestion} ({})",
            dir.root().display(),
            engine.name(),
            if congestion_asked {
                "asked for"
            } else {
                "the system's default"
            }
        );
        let default_qdisc = std::fs::read_to_string("/proc/sys/net/core/default_qdisc").ok();
        if let Some(hint) = pacing_hint(&tcp_congestion, default_qdisc.as_deref().map(str::trim)) {
            tracing::info!("{hint}");
        }
        let checkpoints = if record_interval.is_zero() {
            None
        } else {
            let (shared, dir) = (shared.clone(), dir.clone());
            match Checkpoints::start(shared, dir, instance, record_interval) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(
                        "cannot start the thread that writes the leader's record ({e}): if \
                         this leader dies, the next one draws a new instance"
                    );
                    None
                }
            }
        };
        Ok(Leader {
            shared,
            dir,
            local_addr,
            engine,
            tcp_congestion,
            thread: Mutex::new(Some(thread)),
            instance,
            record_written: AtomicBool::new(false),
            checkpoints: Mutex::new(checkpoints),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// The TCP congestion control followers' connections use ("cubic", "bbr", ...).
    pub fn tcp_congestion(&self) -> &str {
        &self.tcp_congestion
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    /// The current replication position (what `wait_for` compares against).
    pub fn position(&self) -> u64 {
        self.shared.lock().catalog.position()
    }

    /// A file the followers must hold, `len_bytes` long (its logical length: a preallocated
    /// segment may be longer on disk). Shipped whole unless it is already known at that length.
    pub fn register_file(&self, path: &str, len_bytes: u64) -> Result<u64, ChangeError> {
        let path = RelPath::new(path)?;
        {
            let hub = self.shared.lock();
            if hub
                .catalog
                .get(&path)
                .is_some_and(|e| e.len_bytes == len_bytes)
            {
                return Ok(hub.catalog.position());
            }
        }
        self.shared
            .record(|c| c.replace(path.as_str(), len_bytes).map(Some))
    }

    /// `length` bytes were written at `offset` of `path` (already in the file, e.g. through an
    /// mmap). Returns the replication position that covers them, for `wait_for`.
    ///
    /// Segments are append-only: what ships is the file's growth, up to `offset + length`.
    /// Bytes rewritten below what followers already hold are not sent again; a file changed in
    /// place is reported with `replace_file`, which ships it whole. A path new to the leader is
    /// created by its first append, and reaches the followers as appends do, under its real
    /// name from its first byte: report a file that must never show there in part (a JSON
    /// file) with `replace_file`.
    pub fn append(&self, path: &str, offset: u64, length: u64) -> Result<u64, ChangeError> {
        // A path the catalog knows is not checked again (nor copied).
        self.shared
            .record(|c| c.append(path, offset, length).map(Some))
    }

    /// `path` was rewritten as a whole (e.g. a JSON file renamed over); its size is taken now.
    pub fn replace_file(&self, path: &str) -> Result<u64, ChangeError> {
        let rel = RelPath::new(path)?;
        let len_bytes = self
            .dir
            .open_read(&rel)
            .and_then(|f| f.metadata())
            .map_err(|source| ChangeError::Stat {
                path: path.to_string(),
                source,
            })?
            .len();
        self.shared
            .record(|c| c.replace(rel.as_str(), len_bytes).map(Some))
    }

    /// Like `replace_file`, with the length given (for `ferry lead`'s watcher, which stat'ed it).
    pub fn replace_file_with_len(&self, path: &str, len_bytes: u64) -> Result<u64, ChangeError> {
        self.shared.record(|c| c.replace(path, len_bytes).map(Some))
    }

    /// Records a change the inotify watcher saw.
    pub fn apply(&self, change: &Change) -> Result<u64, ChangeError> {
        match change {
            Change::Grew {
                path,
                from_bytes,
                to_bytes,
            } => self.append(path.as_str(), *from_bytes, to_bytes - from_bytes),
            Change::Rewritten { path, len_bytes } => {
                self.replace_file_with_len(path.as_str(), *len_bytes)
            }
            Change::Removed { path } => self.delete_file(path.as_str()),
        }
    }

    /// The facts `--http` reports about this leader.
    pub fn status(&self) -> crate::status::Status {
        crate::status::Status::Leader {
            engine: self.engine().name().to_string(),
            tcp_congestion: self.tcp_congestion.clone(),
            position: self.position(),
            followers: self.followers().iter().map(Into::into).collect(),
        }
    }

    pub fn delete_file(&self, path: &str) -> Result<u64, ChangeError> {
        self.shared.record(|c| c.delete(path))
    }

    /// Every follower connected now, and the last few that disconnected.
    pub fn followers(&self) -> Vec<FollowerInfo> {
        let (position, inbox_since) = self.shared.pending();
        let board = self.shared.board();
        let now = Instant::now();
        let mut all: Vec<FollowerInfo> = board
            .slots
            .iter()
            .filter_map(|(&id, slot)| {
                let mut lag = slot.lag.clone()?;
                let inbox_since = inbox_since.get(&id).copied().flatten();
                // The snapshot is as of the session's last update; a session blocked on a full
                // socket makes none, so the state and ages are recomputed for now.
                if let Some(view) = slot.view {
                    lag.since_last_ack_ms = view
                        .last_ack_at
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64);
                    let waiting_since =
                        [view.oldest_unacked_mark_at, slot.stalled_since(inbox_since)]
                            .into_iter()
                            .flatten()
                            .min();
                    lag.lag_ms = waiting_since
                        .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64);
                }
                lag.state = slot.state(now, inbox_since).unwrap_or(lag.state);
                for level in 0..3 {
                    lag.lag_bytes[level] = position.saturating_sub(lag.acked[level]);
                }
                Some(FollowerInfo {
                    id,
                    node_id: slot.node_id.clone(),
                    peer: slot.peer,
                    lag,
                    payload_bytes_sent: slot.payload_bytes_sent,
                    files_sent: slot.files_sent,
                    sync_bytes: slot.sync_bytes,
                })
            })
            .collect();
        all.sort_by_key(|f| f.id);
        all
    }

    /// Waits until at least `min_followers` connected followers acked `position` at
    /// `durability`. Returns false if `timeout` passed first. For publish confirms.
    pub fn wait_for(
        &self,
        position: u64,
        durability: Durability,
        min_followers: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_until(durability, min_followers, timeout, position)
            .is_some_and(|acked| acked >= position)
    }

    /// The highest position that at least `min_followers` connected followers have acked at
    /// `durability` (0 when fewer are connected; the current position when `min_followers` is 0).
    pub fn acked_position(&self, durability: Durability, min_followers: usize) -> u64 {
        if min_followers == 0 {
            return self.position();
        }
        acked_in(&self.shared.board(), durability, min_followers).unwrap_or(0)
    }

    /// Waits until `acked_position(durability, min_followers)` is beyond `beyond`, or `timeout`
    /// passed; returns it either way. (How a load generator measures append-to-ack latency
    /// without one waiter per message.)
    pub fn wait_acked_beyond(
        &self,
        beyond: u64,
        durability: Durability,
        min_followers: usize,
        timeout: Duration,
    ) -> u64 {
        self.wait_until(durability, min_followers, timeout, beyond.saturating_add(1))
            .unwrap_or(0)
    }

    /// Waits until the connected follower that named itself `node_id` acked `position` at
    /// `durability`; false if `timeout` passed first. A handoff waits on its target this way.
    pub fn wait_node_acked(
        &self,
        node_id: &str,
        position: u64,
        durability: Durability,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut board = self.shared.board();
        loop {
            let acked = board
                .slots
                .values()
                .filter(|s| s.disconnected_at.is_none() && s.node_id.as_deref() == Some(node_id))
                .filter_map(|s| s.lag.as_ref())
                .map(|lag| lag.acked[durability.index()])
                .max();
            let now = Instant::now();
            if acked.is_some_and(|a| a >= position) {
                return true;
            }
            if now >= deadline || self.is_stopped() {
                return false;
            }
            // A node's acks are not what `Wanted` describes: any report wakes this one.
            board = self.shared.wait_acked(board, None, deadline - now);
        }
    }

    /// Waits until the position acked by `min_followers` at `durability` is at least
    /// `position` (or `timeout`); returns that acked position, `None` while fewer followers are
    /// connected.
    fn wait_until(
        &self,
        durability: Durability,
        min_followers: usize,
        timeout: Duration,
        position: u64,
    ) -> Option<u64> {
        if min_followers == 0 {
            // Nobody to wait for: everything recorded counts as acked.
            return (!self.is_stopped()).then(|| self.position());
        }
        let deadline = Instant::now() + timeout;
        let mut board = self.shared.board();
        loop {
            if self.is_stopped() {
                return None;
            }
            let acked = acked_in(&board, durability, min_followers);
            let now = Instant::now();
            if acked.is_some_and(|a| a >= position) || now >= deadline {
                return acked;
            }
            let wanted = Wanted {
                durability,
                min_followers,
                position,
            };
            board = self.shared.wait_acked(board, Some(wanted), deadline - now);
        }
    }

    /// Stops serving: followers are told the leader is shutting down. A graceful stop (as is
    /// dropping the `Leader`): the record for the next start vouches for the files written
    /// just before it too, after waiting for them to settle, at most
    /// `LEADER_RECORD_SETTLE_MS` (`leader_record`).
    pub fn shutdown(self) {
        self.stop_serving_with(|| {}, Settle::Wait);
    }

    /// Stops serving and returns once the server thread is gone: no follower is served or
    /// heard from afterwards, and `wait_for` and friends answer at once. Changes recorded
    /// after it are kept but shipped to no one. Through `&self` because a fenced node must stop
    /// even while its embedder still holds the `Arc<Leader>` it was given. The first stop
    /// writes the record the next start resumes from (`leader_record`); this one does not wait
    /// for files written within `LEADER_RECORD_SETTLE_MS` to settle, so those are not vouched
    /// for (`shutdown` waits).
    pub fn stop_serving(&self) {
        self.stop_serving_with(|| {}, Settle::DoNotWait);
    }

    /// `stop_serving`, with `report_pending` reporting every change not reported yet (the
    /// watcher's last flush) once the files have been looked at for the record, before it is
    /// written: what changed before the look is then in the catalog the record keeps. With
    /// `Settle::Wait`, files changed less than `LEADER_RECORD_SETTLE_MS` before the look are
    /// waited for and looked at again, so the record can vouch for them.
    pub fn stop_serving_with(&self, report_pending: impl FnOnce(), settle: Settle) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.shutdown.notify_waiters();
        self.shared.acked.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        let checkpoints = self
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = checkpoints {
            c.stop();
        }
        if self.record_written.swap(true, Ordering::SeqCst) {
            report_pending();
            return;
        }
        // No session is left, so no MARK beyond the position the record names was sent. (If
        // this record cannot be written, the last checkpoint stays: its reservation is above
        // every MARK too.)
        let paths = catalog_paths(&self.shared);
        let mut look = leader_record::look(&self.dir, &paths);
        if let Some(wait) = look.unsettled_for().filter(|_| settle == Settle::Wait) {
            // Files written in the last second would not be vouched for (the settle rule),
            // and the files a broker wrote last are its active segments: worth the wait.
            tracing::info!(
                "waiting {} ms before recording instance {} for the next start: {} files \
                 changed less than {LEADER_RECORD_SETTLE_MS} ms ago",
                wait.as_millis(),
                hex(&self.instance),
                look.unsettled()
            );
            std::thread::sleep(wait);
            look = leader_record::look(&self.dir, &paths);
        }
        report_pending();
        let catalog = catalog_copy(&self.shared).snapshot();
        // Read after the copy: at or above every birth in it.
        let position = self.shared.lock().catalog.position();
        match leader_record::save(&self.dir, &self.instance, position, &catalog, &look) {
            Ok(()) => tracing::info!(
                "recorded instance {} at position {position} ({} files) for the next start",
                hex(&self.instance),
                catalog.len()
            ),
            Err(e) => tracing::warn!(
                "cannot write the leader's record: {e}; the next start draws a new instance, and \
                 its followers hash what changed since their last inventory"
            ),
        }
    }

    /// Sets what a checkpoint of the leader's record calls first, to have the change source
    /// report every change made up to then (`watch` sets the watcher's), and asks for a
    /// checkpoint now.
    pub fn set_checkpoint_flush(&self, flush: CheckpointFlush) {
        *self
            .shared
            .checkpoint_flush
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(flush);
        let checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = checkpoints.as_ref() {
            let _ = c.stop.send(());
        }
    }

    /// Whether `stop_serving` (or shutdown) ran.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }
}

/// A leader fed by the inotify watcher on its data dir: `ferry lead`, and `ferry node` while
/// elected. Every file found at start is registered; later writes reach it as changes.
pub struct WatchedLeader {
    pub leader: Arc<Leader>,
    watcher: Watcher,
}

/// What a scan found: path -> (length in bytes, mtime in ns), the watcher's starting point.
pub type Known = HashMap<RelPath, (u64, i64)>;

/// What the watcher needs of a scan: each file's length and mtime.
pub fn known_of(files: &[crate::index::FileMeta]) -> Known {
    files
        .iter()
        .map(|m| (m.path.clone(), (m.len_bytes, m.mtime_ns)))
        .collect()
}

/// Scans the data dir and starts a leader with every file found registered.
pub fn start_scanned(config: LeaderConfig) -> io::Result<(Arc<Leader>, Known)> {
    let data_dir = config.data_dir.clone();
    let files = scan(&DataDir::open(&data_dir)?).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot scan {}: {e}", data_dir.display()))
    })?;
    let known = known_of(&files);
    tracing::info!(
        "{} files, {} bytes in {}",
        files.len(),
        files.iter().map(|m| m.len_bytes).sum::<u64>(),
        data_dir.display()
    );
    let leader = Arc::new(Leader::start(
        config,
        files.into_iter().map(|m| (m.path, m.len_bytes)).collect(),
    )?);
    Ok((leader, known))
}

/// Feeds `leader` every change inotify sees in its data dir from now on (`known` being what
/// the leader already has).
pub fn watch(leader: &Arc<Leader>, known: Known) -> io::Result<Watcher> {
    let data_dir = leader.data_dir().root().to_path_buf();
    let sink = {
        let leader = leader.clone();
        Box::new(move |change: Change| {
            if let Err(e) = leader.apply(&change) {
                tracing::warn!("ignoring {change:?}: {e}");
            }
        })
    };
    let watcher = Watcher::start(&data_dir, known, sink).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot watch {} with inotify: {e}", data_dir.display()),
        )
    })?;
    let flusher = watcher.flusher();
    leader.set_checkpoint_flush(Arc::new(move || flusher.flush(WATCHER_FLUSH_TIMEOUT)));
    Ok(watcher)
}

impl WatchedLeader {
    pub fn start(mut config: LeaderConfig) -> io::Result<WatchedLeader> {
        config.change_source_flushes = true;
        let (leader, known) = start_scanned(config)?;
        let watcher = watch(&leader, known)?;
        Ok(WatchedLeader { leader, watcher })
    }

    /// Stops serving, then watching: the watcher reports what it has not yet after the files
    /// are looked at for the leader's record.
    pub fn stop(self) {
        let watcher = self.watcher;
        self.leader
            .stop_serving_with(move || watcher.flush_and_stop(), Settle::Wait);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.stop_serving_with(|| {}, Settle::Wait);
    }
}

/// Whether a stop waits for files written just before it to settle, so that the leader's
/// record vouches for them (`Leader::stop_serving_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// A graceful stop: up to `LEADER_RECORD_SETTLE_MS` longer.
    Wait,
    /// A prompt one (a fenced or departing node): those files go whole after the next start.
    DoNotWait,
}

/// The position acked at `durability` by the `min_followers`-th best connected follower
/// (`min_followers` at least 1: with none, the answer is the catalog's position).
fn acked_in(board: &Board, durability: Durability, min_followers: usize) -> Option<u64> {
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

async fn serve(
    engine: EngineKind,
    config: LeaderConfig,
    shared: Arc<Shared>,
    dir: Arc<DataDir>,
    ready: std::sync::mpsc::Sender<io::Result<(SocketAddr, String)>>,
    instance: InstanceId,
) {
    let listener = match bind_waiting(engine, config.listen, config.tcp_congestion.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", config.listen),
            )));
            return;
        }
    };
    // What the operator is told the connections use; unreadable only on a broken kernel.
    let congestion = listener
        .congestion()
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let _ = ready.send(listener.local_addr().map(|addr| (addr, congestion)));
    let digests = Rc::new(std::cell::RefCell::new(Some(DigestCache::load(&dir))));
    // The accept loop is never cancelled while serving: an io_uring accept dropped mid-flight
    // would lose the connection it completes with.
    let accept_loop = accept_loop(listener, config, shared.clone(), dir, digests, instance);
    tokio::select! {
        _ = accept_loop => {}
        _ = log_state_changes(&shared) => {}
        _ = stopping(&shared) => {}
    }
}

/// How long a starting leader waits for its address while the kernel says it is in use: a leader
/// killed with SIGKILL on io_uring holds its listening socket until its ring is torn down (about
/// 30 ms after it was reaped, here), so a supervisor restarting it at once would otherwise fail.
pub const LISTEN_RETRY_MS: u64 = 1000;
const LISTEN_RETRY_STEP_MS: u64 = 20;

/// `Listener::bind`, tried again for up to `LISTEN_RETRY_MS` while the address is in use (on the
/// server thread, before it serves anyone: the sleeps block nobody).
fn bind_waiting(
    engine: EngineKind,
    listen: SocketAddr,
    congestion: Option<&str>,
) -> io::Result<Listener> {
    let deadline = Instant::now() + Duration::from_millis(LISTEN_RETRY_MS);
    let mut said = false;
    loop {
        match Listener::bind(engine, listen, congestion) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    tracing::info!(
                        "{listen} is in use; trying again for up to {LISTEN_RETRY_MS} ms (a \
                         leader killed a moment ago may still hold it)"
                    );
                }
                std::thread::sleep(Duration::from_millis(LISTEN_RETRY_STEP_MS));
            }
            other => return other,
        }
    }
}

/// What the leader tells the operator when it sends with `congestion` and new interfaces get
/// `default_qdisc` (`None`: unreadable): bbr without fq paces every send with a kernel timer of
/// its own, which cost ferry half its throughput in this project's benchmarks. Nothing where fq
/// is the default (an operator who set up bbr with fq; loopback still has no qdisc, README).
fn pacing_hint(congestion: &str, default_qdisc: Option<&str>) -> Option<String> {
    if congestion != "bbr" || default_qdisc == Some("fq") {
        return None;
    }
    Some(format!(
        "bbr paces every send with a kernel timer of its own on an interface without the fq \
         qdisc (the system's default qdisc is {}; loopback has none): on a LAN, \
         --tcp-congestion cubic (LeaderConfig::tcp_congestion) costs less CPU; in ferry's \
         loopback benchmarks it carried up to twice the 1 KiB messages (README, Use)",
        default_qdisc.unwrap_or("unknown")
    ))
}

/// How often the leader looks for followers whose state changed, to log it.
const STATE_LOG_INTERVAL: Duration = Duration::from_millis(250);

/// Logs a line whenever a follower starts or stops lagging (or finishes its initial sync): what
/// an operator acts on. Computed here rather than in the sessions, since a session blocked on a
/// full socket reports nothing.
async fn log_state_changes(shared: &Shared) {
    loop {
        tokio::time::sleep(STATE_LOG_INTERVAL).await;
        let (position, inbox_since) = shared.pending();
        let mut board = shared.board();
        let now = Instant::now();
        for (id, slot) in board.slots.iter_mut() {
            let Some(state) = slot.state(now, inbox_since.get(id).copied().flatten()) else {
                continue;
            };
            if slot.logged_state == Some(state) || state == FollowerState::Disconnected {
                continue;
            }
            let was = slot.logged_state.replace(state);
            let Some(lag) = &slot.lag else { continue };
            let level = lag.durability.unwrap_or(Durability::Received);
            let lag_bytes = position.saturating_sub(lag.acked[level.index()]);
            let peer = slot.peer;
            match (was, state) {
                (_, FollowerState::Lagging) => tracing::warn!(
                    "follower #{id} ({peer}) is lagging: {lag_bytes} bytes behind at {}, last \
                     ack {}",
                    level.name(),
                    slot.view
                        .and_then(|v| v.last_ack_at)
                        .map(|t| format!("{} ms ago", now.saturating_duration_since(t).as_millis()))
                        .unwrap_or_else(|| "never".into())
                ),
                (Some(FollowerState::Lagging), FollowerState::Streaming) => tracing::info!(
                    "follower #{id} ({peer}) caught up: streaming again ({lag_bytes} bytes behind)"
                ),
                (_, FollowerState::Streaming) => {
                    tracing::info!("follower #{id} ({peer}) is in sync: streaming")
                }
                _ => {}
            }
        }
    }
}

/// Resolves once `Leader::stop` was called.
async fn stopping(shared: &Shared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        tokio::select! {
            _ = shared.shutdown.notified() => {}
            // notify_waiters() wakes only tasks already waiting: re-check the flag now and then.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn accept_loop(
    listener: Listener,
    config: LeaderConfig,
    shared: Arc<Shared>,
    dir: Arc<DataDir>,
    digests: Rc<std::cell::RefCell<Option<DigestCache>>>,
    instance: InstanceId,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: keep serving the followers already connected.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ConnCtx {
            shared: shared.clone(),
            dir: dir.clone(),
            secret: config.secret.clone(),
            ack_timeout: config.ack_timeout,
            digests: digests.clone(),
            instance,
        };
        tokio::task::spawn_local(async move {
            let conn = Rc::new(conn);
            let (id, wake) = ctx.register(peer);
            tracing::info!("follower #{id} connected from {peer}");
            match serve_follower(&ctx, id, &wake, conn.clone()).await {
                Ok(()) => tracing::info!("follower #{id} ({peer}) disconnected"),
                Err(e) => tracing::warn!("follower #{id} ({peer}): {e}"),
            }
            conn.shutdown();
            ctx.unregister(id);
        });
    }
}

struct ConnCtx {
    shared: Arc<Shared>,
    dir: Arc<DataDir>,
    secret: Secret,
    ack_timeout: Duration,
    /// The leader's digest cache; taken by a connection while it hashes (`None` meanwhile).
    digests: Rc<std::cell::RefCell<Option<DigestCache>>>,
    instance: InstanceId,
}

impl ConnCtx {
    /// A new connection: its report slot and its inbox. Returns its id and what wakes it.
    fn register(&self, peer: SocketAddr) -> (u64, Arc<Notify>) {
        let mut board = self.shared.board();
        let id = board.next_id;
        board.next_id += 1;
        board.slots.insert(
            id,
            Slot {
                peer,
                sending_since: None,
                lag: None,
                view: None,
                payload_bytes_sent: 0,
                node_id: None,
                files_sent: 0,
                sync_bytes: None,
                disconnected_at: None,
                logged_state: None,
            },
        );
        drop(board);
        let wake = Arc::new(Notify::new());
        self.shared.lock().inboxes.insert(
            id,
            Inbox {
                changes: ChangeList::default(),
                since: None,
                wake: wake.clone(),
                wake_wanted: true,
            },
        );
        (id, wake)
    }

    fn set_sending(&self, id: u64, since: Option<Instant>) {
        if let Some(slot) = self.shared.board().slots.get_mut(&id) {
            slot.sending_since = since;
        }
    }

    fn unregister(&self, id: u64) {
        self.shared.lock().inboxes.remove(&id);
        let mut board = self.shared.board();
        if let Some(slot) = board.slots.get_mut(&id) {
            slot.disconnected_at = Some(Instant::now());
            if slot.lag.is_none() {
                board.slots.remove(&id);
            }
        }
        let mut gone: Vec<(Instant, u64)> = board
            .slots
            .iter()
            .filter_map(|(&id, s)| Some((s.disconnected_at?, id)))
            .collect();
        if gone.len() > DISCONNECTED_KEPT_MAX {
            gone.sort();
            for (_, id) in &gone[..gone.len() - DISCONNECTED_KEPT_MAX] {
                board.slots.remove(id);
            }
        }
        self.shared.acked.notify_all();
    }
}

/// Why a follower connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

async fn serve_follower(
    ctx: &ConnCtx,
    id: u64,
    wake: &Notify,
    conn: Rc<Conn>,
) -> Result<(), ServeError> {
    let mut session = LeaderSession::new(
        ctx.secret.clone(),
        random_nonce()?,
        ctx.ack_timeout,
        ctx.instance,
    );
    let (input_tx, mut input_rx) = mpsc::channel::<io::Result<Vec<u8>>>(4);
    let reader = tokio::task::spawn_local(read_loop(conn.clone(), input_tx));
    let result = drive(ctx, id, &conn, &mut session, wake, &mut input_rx).await;
    reader.abort();
    if let Err(ServeError::Session(e)) = &result {
        // Tell the follower why, best effort: the connection is closing anyway.
        session.fail(e);
        let out = session.take_output();
        if !out.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.write_all(out)).await;
        }
    }
    result
}

async fn read_loop(conn: Rc<Conn>, tx: mpsc::Sender<io::Result<Vec<u8>>>) {
    let mut buf = Vec::with_capacity(READ_BUFFER_BYTES);
    loop {
        let (r, b) = conn.read(buf).await;
        match r {
            Ok(0) => {
                let _ = tx.send(Ok(Vec::new())).await;
                return;
            }
            Ok(n) => {
                if tx.send(Ok(b[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
        buf = b;
    }
}

/// Records `path` as it is on disk (replaced at its length now, or deleted), for a session
/// whose MARKs have held for `VANISHED_HOLD_TIMEOUT_MS` because bytes vanished from it and no
/// change explaining that was reported. Nothing is recorded if the file's generation moved on
/// since the session's copy of the catalog (another session recorded it, or its writer reported
/// a replacement or deletion meanwhile): that change is on its way to the session.
fn record_unreported(ctx: &ConnCtx, id: u64, path: &RelPath, catalog: &Catalog) {
    let held = catalog.get(path).map(|e| e.generation);
    let on_disk = match ctx.dir.open_read(path).and_then(|f| f.metadata()) {
        Ok(meta) => Some(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(
                "follower #{id}: acks held {VANISHED_HOLD_TIMEOUT_MS} ms for {path}, whose bytes \
                 vanished with no change reported; cannot read it to record it: {e}"
            );
            return;
        }
    };
    let mut moved_on = false;
    let recorded = ctx.shared.record(|c| {
        if c.get(path).map(|e| e.generation) != held {
            moved_on = true;
            return Ok(None);
        }
        match on_disk {
            Some(len_bytes) => c.replace(path.as_str(), len_bytes).map(Some),
            None => c.delete(path.as_str()),
        }
    });
    let what = match on_disk {
        Some(len_bytes) => format!("replaced, {len_bytes} bytes long"),
        None => "deleted".to_string(),
    };
    match recorded {
        Ok(_) if moved_on => tracing::info!(
            "follower #{id}: acks held {VANISHED_HOLD_TIMEOUT_MS} ms for {path}, whose bytes \
             vanished; a change to it was recorded meanwhile, which ends the hold"
        ),
        Ok(position) => tracing::warn!(
            "follower #{id}: acks held {VANISHED_HOLD_TIMEOUT_MS} ms for {path}, whose bytes \
             vanished with no change reported (a library user reports a file cut back or \
             rewritten with replace_file, a removed one with delete_file); recorded it as the \
             disk has it: {what}, at position {position}"
        ),
        Err(e) => tracing::warn!("follower #{id}: cannot record {path} as {what}: {e}"),
    }
}

/// The connection's main loop: feed input, ship what the session asks for, sleep until input,
/// a change or a timer.
async fn drive(
    ctx: &ConnCtx,
    id: u64,
    conn: &Conn,
    session: &mut LeaderSession,
    wake: &Notify,
    input_rx: &mut mpsc::Receiver<io::Result<Vec<u8>>>,
) -> Result<(), ServeError> {
    let mut input: Vec<u8> = Vec::new();
    let mut files = OpenFiles::new();
    let mut eof = false;
    let mut reporter = Reporter::default();
    let connected_at = Instant::now();
    let mut sync_started: Option<Instant> = None;
    // A payload sits in the socket with MORE set, waiting for what follows it.
    let mut corked = false;
    // The session plans from its own copy of the catalog, brought up to date with the changes
    // in its inbox: the writers' lock is held for that only, never while frames are parsed or
    // encoded. The copy is detached (`catalog`, on why) and made a part per hold of the lock,
    // so a catalog of many files does not hold up the writers; the changes made meanwhile are
    // in the inbox (registered before), which the first look applies.
    let mut catalog = catalog_copy(&ctx.shared);
    let mut changes: Vec<FileChange> = Vec::new();
    let mut changed: Vec<(RelPath, u64)> = Vec::new();
    // When the inbox last had changes: until INBOX_POLL_IDLE_MAX after that, the session looks
    // at it every INBOX_POLL_INTERVAL, and the writer need not wake it (until the initial sync
    // is sent, the `_SYNCING` ones: `poll_rate`).
    let mut changes_seen_at: Option<Instant> = None;
    // When the session last looked at its inbox. While polling, it looks no more often than
    // every INBOX_POLL_INTERVAL, however often acks wake it: a look that finds a few appends
    // starts a round for them, and with acks back sooner than the poll, rounds of a handful of
    // messages cost the leader and the follower CPU per message (README, Performance).
    let mut inbox_seen_at: Option<Instant> = None;
    let timer = FineTimer::new(conn.engine())?;
    // The sleep until the next look, with the `inbox_seen_at` it counts from and the interval it
    // waits (`poll_rate`): kept across turns of the loop, so that the acks that wake the session
    // in between do not arm a timer each (arming a fine timer reprograms the CPU's timer, which
    // on a VM is an exit to the host).
    let mut look_sleep = None;
    loop {
        // Everything the reader has, without waiting.
        while let Ok(chunk) = input_rx.try_recv() {
            eof |= take_chunk(chunk?, &mut input);
        }
        let now = Instant::now();
        session.check_handshake_deadline(connected_at, now)?;
        let had_input = !input.is_empty();
        let rate = poll_rate(session.sync_done_sent());
        if look_due(changes_seen_at, inbox_seen_at, now, rate) {
            inbox_seen_at = Some(now);
            let mut hub = ctx.shared.lock();
            let hub = &mut *hub;
            // Taken with the changes: no MARK of this session goes above the positions it
            // has seen (at most the catalog's then), so a lower ceiling set after this look
            // binds it at its next look, before it can mark anything newer.
            session.set_mark_ceiling(hub.mark_ceiling);
            if let Some(inbox) = hub.inboxes.get_mut(&id) {
                if let Some(position) = inbox.changes.take(&mut changes) {
                    changes_seen_at = Some(now);
                    catalog.apply(&hub.catalog, &changes, position, &mut changed);
                }
                inbox.since = None;
                // Set here, while the inbox is seen empty under the lock: a change from now on
                // either wakes the session or waits at most one poll interval.
                inbox.wake_wanted = !polling(changes_seen_at, now, rate);
            }
        }
        if had_input {
            let n = session.handle_input(&input, &catalog, now)?;
            input.drain(..n);
        }
        for (path, since) in changed.drain(..) {
            // A deleted or replaced file's old inode is not kept open here: its disk space (a
            // segment that retention removed) comes back only once nobody holds it.
            let current = catalog.get(&path).map(|e| e.generation);
            if files.get(&path).is_some_and(|(g, _)| Some(*g) != current) {
                files.remove(&path);
            }
            session.note_changed(path, since);
        }
        let transmit = session.poll_transmit(&catalog, now);
        let position = catalog.position();
        // The report for followers() and wait_for: at once after acks, else now and then. It is
        // computed outside the lock, which writers share.
        if had_input || reporter.due(now) {
            reporter.publish(ctx, id, session, position, now);
        }
        if eof {
            return Ok(());
        }
        if ctx.shared.stopping.load(Ordering::SeqCst) {
            let mut out = Vec::new();
            Frame::error(ErrorCode::Shutdown, "the leader is shutting down").encode(&mut out);
            let _ = conn.write_all(out).await;
            return Ok(());
        }
        // Asked for as the follower's HAVEs arrive: hashed here while the follower still
        // hashes the rest of its inventory; the sync starts with the last answer after HAVE_END.
        if let Some(requests) = session.digest_requests() {
            // Saved once the inventory is all in (no more batches come), not per batch.
            let save = session.phase() == LeaderPhase::AwaitDigests;
            let results = hash_prefixes(ctx, requests, save).await;
            session.digests_ready(results);
            if let (None, Some((_, planned))) = (sync_started, session.sync_progress()) {
                let r = session.inventory_report();
                tracing::info!(
                    "follower #{id}: initial sync started, {planned} bytes to send; its \
                     inventory: {} files held since an earlier connection to this leader, {} \
                     held records refused (sent whole), {} files compared by digest",
                    r.held_accepted,
                    r.held_refused,
                    r.digests_compared
                );
                sync_started = Some(Instant::now());
            }
            continue;
        }
        if let (Some(at), true) = (sync_started, session.sync_done_sent()) {
            sync_started = None;
            tracing::info!(
                "follower #{id}: initial sync sent: {} payload bytes, {} whole files, in {:.2} s",
                session.bytes_payload_total(),
                session.files_whole_total(),
                at.elapsed().as_secs_f64()
            );
        }
        match transmit {
            Some(Transmit::OpenWhole { path, generation }) => {
                match ctx
                    .dir
                    .open_read(&path)
                    .and_then(|f| Ok((f.metadata()?.len(), f)))
                {
                    Ok((len, file)) => {
                        session.begin_whole(&path, len, &catalog);
                        keep_open(&mut files, path, generation, file);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        tracing::info!(
                            "follower #{id}: {path} is gone before it could be sent; acks hold \
                             at the last MARK until its deletion is reported"
                        );
                        session.whole_unavailable(&path);
                    }
                    Err(e) => {
                        return Err(SessionError::Io(format!("cannot read {path}: {e}")).into());
                    }
                }
            }
            Some(Transmit::RecordUnreported { paths }) => {
                for path in paths {
                    record_unreported(ctx, id, &path, &catalog);
                }
                continue;
            }
            Some(Transmit::Payload {
                path,
                generation,
                offset,
                len_bytes,
            }) => {
                if !payload_available(
                    ctx,
                    &mut files,
                    &catalog,
                    &path,
                    generation,
                    offset + len_bytes,
                )? {
                    // Cut back or removed behind the catalog since the range was planned:
                    // take the header back; that change ships on its own. (A shrink during the splice
                    // below still ends the connection: the frame's length is already on the
                    // wire.)
                    tracing::info!(
                        "follower #{id}: {path} no longer has [{offset}, +{len_bytes}): skipped; \
                         acks hold at the last MARK until its change is reported"
                    );
                    session.payload_unavailable();
                    files.remove(&path);
                    continue;
                }
                // The header leaves with its payload, and the payload with what follows it
                // (the round's MARK, or the next header): one segment, not three, for a small
                // append, so the follower reads them in one go. Output with a MARK in it leaves
                // at once instead: while rounds follow each other, held bytes would wait for a
                // full segment, and the follower's ack with them.
                if len_bytes > 0 && session.has_output() && !session.output_has_mark() {
                    let (r, _) = conn.write_all_before_payload(session.take_output()).await;
                    r?;
                } else {
                    flush(conn, session, &mut corked).await?;
                }
                if let Some((_, file)) = files.get(&path) {
                    ctx.set_sending(id, Some(Instant::now()));
                    let send = conn.send_file(file, offset, len_bytes);
                    tokio::pin!(send);
                    // The follower's ACKs count while the payload is on its way, not after:
                    // a payload may wait for room in the socket or for an io-wq worker, and
                    // `wait_for` waits for the ACK.
                    // Bad input ends the connection only once the payload is whole on the
                    // wire, so the ERROR frame that follows never lands inside it.
                    let mut deferred: Option<ServeError> = None;
                    let sent = loop {
                        tokio::select! {
                            biased;
                            sent = &mut send => break sent,
                            chunk = input_rx.recv(), if !eof && deferred.is_none() => {
                                let now = Instant::now();
                                let taken = take_input(chunk, &mut input, &mut eof).and_then(|()| {
                                    Ok(session.handle_input(&input, &catalog, now)?)
                                });
                                match taken {
                                    Ok(n) => {
                                        input.drain(..n);
                                        reporter.publish(ctx, id, session, position, now);
                                    }
                                    Err(e) => deferred = Some(e),
                                }
                            }
                        }
                    };
                    ctx.set_sending(id, None);
                    if let Some(e) = deferred {
                        return Err(e);
                    }
                    corked = len_bytes > 0;
                    sent.map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("sending {path} [{offset}, +{len_bytes}): {e}"),
                        )
                    })?;
                }
            }
            None => {
                flush(conn, session, &mut corked).await?;
                if std::mem::take(&mut corked) {
                    conn.push()?;
                }
                let timeout = session
                    .poll_timeout()
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_millis(500));
                // Again: the round may have sent the initial sync's last MARK.
                let rate = poll_rate(session.sync_done_sent());
                let poll = polling(changes_seen_at, now, rate);
                let from = (inbox_seen_at, rate.interval);
                if !poll {
                    look_sleep = None;
                } else if !matches!(&look_sleep, Some((armed, _)) if *armed == from) {
                    let next_look = next_look_in(inbox_seen_at, Instant::now(), rate);
                    look_sleep = Some((from, Box::pin(timer.sleep(next_look))));
                }
                tokio::select! {
                    chunk = input_rx.recv() => take_input(chunk, &mut input, &mut eof)?,
                    _ = wake.notified() => {}
                    slept = until_look(&mut look_sleep), if poll => {
                        look_sleep = None;
                        slept?
                    }
                    _ = tokio::time::sleep_until(timeout) => {}
                    _ = ctx.shared.shutdown.notified() => {}
                }
            }
        }
    }
}

/// What a sleep until the next look was armed for: the look it counts from (`inbox_seen_at`)
/// and the interval it waits (`PollRate::interval`).
type LookFrom = (Option<Instant>, Duration);

/// Waits for the sleep in `look_sleep`, forever if there is none.
async fn until_look<F: std::future::Future<Output = io::Result<()>>>(
    look_sleep: &mut Option<(LookFrom, std::pin::Pin<Box<F>>)>,
) -> io::Result<()> {
    match look_sleep {
        Some((_, sleep)) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// How often a session looks at its inbox while changes keep arriving (`interval`), and for how
/// long after the last change it found (`idle_max`).
#[derive(Debug, Clone, Copy)]
struct PollRate {
    interval: Duration,
    idle_max: Duration,
}

/// The rate for a session that has sent its initial sync (`sync_done_sent`), or is sending it.
fn poll_rate(sync_done_sent: bool) -> PollRate {
    if sync_done_sent {
        PollRate {
            interval: INBOX_POLL_INTERVAL,
            idle_max: INBOX_POLL_IDLE_MAX,
        }
    } else {
        PollRate {
            interval: INBOX_POLL_INTERVAL_SYNCING,
            idle_max: INBOX_POLL_IDLE_MAX_SYNCING,
        }
    }
}

/// Whether a session that last found changes in its inbox at `changes_seen_at` looks at it
/// every `rate.interval` now, rather than waiting for the writer to wake it.
fn polling(changes_seen_at: Option<Instant>, now: Instant, rate: PollRate) -> bool {
    changes_seen_at.is_some_and(|at| now.saturating_duration_since(at) < rate.idle_max)
}

/// Whether the session looks at its inbox now: always when idle (not `polling`: the writer
/// wakes it, and it must see the inbox empty to ask for that), else once `rate.interval` has
/// passed since it last looked at `inbox_seen_at`.
fn look_due(
    changes_seen_at: Option<Instant>,
    inbox_seen_at: Option<Instant>,
    now: Instant,
    rate: PollRate,
) -> bool {
    !polling(changes_seen_at, now, rate) || next_look_in(inbox_seen_at, now, rate).is_zero()
}

/// How long until the next look while polling: `rate.interval` after the last.
fn next_look_in(inbox_seen_at: Option<Instant>, now: Instant, rate: PollRate) -> Duration {
    inbox_seen_at.map_or(Duration::ZERO, |at| {
        rate.interval
            .saturating_sub(now.saturating_duration_since(at))
    })
}

/// The files a connection keeps open to ship payloads from: path -> (generation, file).
type OpenFiles = HashMap<RelPath, (u64, File)>;

fn keep_open(files: &mut OpenFiles, path: RelPath, generation: u64, file: File) {
    if files.len() >= OPEN_FILES_PER_CONNECTION_MAX {
        files.clear();
    }
    files.insert(path, (generation, file));
}

/// Whether `path` at `generation` still holds the bytes up to `end`, opening it if needed
/// (then it is in `files`). Not when the file is gone or shorter. The session asks only for
/// the generation `catalog` holds (it drops a transfer the catalog has moved past,
/// `Job::superseded`), so reopening the name cannot send another version's bytes for it.
fn payload_available(
    ctx: &ConnCtx,
    files: &mut OpenFiles,
    catalog: &crate::catalog::Catalog,
    path: &RelPath,
    generation: u64,
    end: u64,
) -> Result<bool, ServeError> {
    debug_assert_eq!(
        catalog.get(path).map(|e| e.generation),
        Some(generation),
        "a payload of {path} planned for a generation the catalog has moved past"
    );
    if !matches!(files.get(path), Some((g, _)) if *g == generation) {
        match ctx.dir.open_read(path) {
            Ok(file) => keep_open(files, path.clone(), generation, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SessionError::Io(format!("cannot read {path}: {e}")).into()),
        }
    }
    let len_bytes = match files.get(path) {
        Some((_, file)) => file.metadata().map(|m| m.len()).unwrap_or(0),
        None => 0,
    };
    Ok(len_bytes >= end)
}

/// Takes what the reader sent: a chunk into `input`, or the end of the stream into `eof`.
fn take_input(
    chunk: Option<io::Result<Vec<u8>>>,
    input: &mut Vec<u8>,
    eof: &mut bool,
) -> Result<(), ServeError> {
    match chunk {
        Some(chunk) => *eof |= take_chunk(chunk?, input),
        None => *eof = true,
    }
    Ok(())
}

/// Appends a chunk from the reader to `input`; true at the end of the stream.
fn take_chunk(chunk: Vec<u8>, input: &mut Vec<u8>) -> bool {
    if chunk.is_empty() {
        return true;
    }
    input.extend_from_slice(&chunk);
    false
}

/// Writes the session's output; that pushes out a payload left corked before it too.
async fn flush(
    conn: &Conn,
    session: &mut LeaderSession,
    corked: &mut bool,
) -> Result<(), ServeError> {
    if session.has_output() {
        let (r, _) = conn.write_all(session.take_output()).await;
        r?;
        *corked = false;
    }
    Ok(())
}

/// What a connection reports to the board (for `followers()`, `wait_for` and the state log):
/// at once after acks, else every `PUBLISH_INTERVAL`.
#[derive(Default)]
struct Reporter {
    published_at: Option<Instant>,
    /// The last report whose ack latency quantiles were computed, and when: they are computed
    /// at most once per `PUBLISH_INTERVAL`, however often acks arrive, and copied meanwhile.
    quantiles_from: Option<(Instant, LagSnapshot)>,
}

/// Whether `PUBLISH_INTERVAL` has passed since `at` (or nothing happened yet).
fn interval_passed(at: Option<Instant>, now: Instant) -> bool {
    !at.is_some_and(|at| now < at + PUBLISH_INTERVAL)
}

impl Reporter {
    fn due(&self, now: Instant) -> bool {
        interval_passed(self.published_at, now)
    }

    /// The report is made outside the board's lock, which `wait_for` shares.
    fn publish(
        &mut self,
        ctx: &ConnCtx,
        id: u64,
        session: &LeaderSession,
        position: u64,
        now: Instant,
    ) {
        let lag = session.lag();
        let snapshot = session.durability().map(|_| match &self.quantiles_from {
            Some((at, previous)) if !interval_passed(Some(*at), now) => {
                lag.snapshot_reusing_quantiles(position, now, previous)
            }
            _ => {
                let snapshot = lag.snapshot(position, now);
                self.quantiles_from = Some((now, snapshot.clone()));
                snapshot
            }
        });
        let view = lag.view();
        self.published_at = Some(now);
        let mut board = ctx.shared.board();
        if let Some(slot) = board.slots.get_mut(&id) {
            if let Some(snapshot) = snapshot {
                slot.lag = Some(snapshot);
                slot.view = Some(view);
            }
            slot.payload_bytes_sent = session.bytes_payload_total();
            slot.files_sent = session.files_whole_total();
            if slot.node_id.is_none() {
                slot.node_id = session.node_id().map(str::to_string);
            }
            slot.sync_bytes = session.sync_progress();
        }
        let wake = board.wake_due();
        drop(board);
        if wake {
            ctx.shared.acked.notify_all();
        }
    }
}

/// Hashes the prefixes a follower's inventory asks for, off the runtime thread.
async fn hash_prefixes(
    ctx: &ConnCtx,
    requests: Vec<crate::session::leader::DigestRequest>,
    save: bool,
) -> Vec<(RelPath, Option<crate::frame::Digest>)> {
    // One connection hashes at a time with the shared cache; others wait their turn.
    let mut cache = loop {
        if let Some(c) = ctx.digests.borrow_mut().take() {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let dir = ctx.dir.clone();
    let paths: Vec<RelPath> = requests.iter().map(|r| r.path.clone()).collect();
    let joined = tokio::task::spawn_blocking(move || {
        let results: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let digest = cache.digest_path_prefix(&dir, &r.path, r.len_bytes);
                if let Err(e) = &digest {
                    tracing::warn!("cannot hash {}: {e}", r.path);
                }
                (r.path, digest.ok())
            })
            .collect();
        if save {
            if let Err(e) = cache.save(&dir) {
                tracing::warn!("cannot save the digest cache: {e}");
            }
        }
        (results, cache)
    })
    .await;
    match joined {
        Ok((results, cache)) => {
            *ctx.digests.borrow_mut() = Some(cache);
            results
        }
        Err(e) => {
            // Every copy then compares as different, and is re-sent whole.
            tracing::error!("hashing task failed: {e}");
            *ctx.digests.borrow_mut() = Some(DigestCache::load(&ctx.dir));
            paths.into_iter().map(|p| (p, None)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bbr line is for a leader that likely paces in the kernel: bbr where new interfaces
    /// do not get fq (or that cannot be read); not for cubic, nor for bbr beside fq.
    #[test]
    fn the_pacing_hint_comes_with_bbr_where_the_default_qdisc_is_not_fq() {
        let hint = pacing_hint("bbr", Some("pfifo_fast")).unwrap_or_default();
        assert!(hint.contains("pfifo_fast") && hint.contains("--tcp-congestion cubic"));
        assert!(pacing_hint("bbr", None).is_some());
        assert_eq!(pacing_hint("bbr", Some("fq")), None);
        assert_eq!(pacing_hint("cubic", Some("pfifo_fast")), None);
    }

    /// While polling, acks that wake the session often do not make it look at the inbox more
    /// often than every INBOX_POLL_INTERVAL; an idle session (the writer wakes it) always looks.
    #[test]
    fn the_inbox_is_looked_at_once_per_poll_interval_while_polling() {
        let rate = poll_rate(true);
        let t0 = Instant::now();
        let seen = Some(t0);
        let looked = Some(t0);
        let soon = t0 + INBOX_POLL_INTERVAL / 4;
        assert!(!look_due(seen, looked, soon, rate));
        assert_eq!(
            next_look_in(looked, soon, rate),
            INBOX_POLL_INTERVAL * 3 / 4
        );
        let later = t0 + INBOX_POLL_INTERVAL;
        assert!(look_due(seen, looked, later, rate));
        assert_eq!(next_look_in(looked, later, rate), Duration::ZERO);
        // Never looked, or idle (no changes within INBOX_POLL_IDLE_MAX): look at once.
        assert!(look_due(seen, None, soon, rate));
        assert!(look_due(None, looked, soon, rate));
        let idle = t0 + INBOX_POLL_IDLE_MAX;
        assert!(look_due(
            seen,
            Some(idle),
            idle + INBOX_POLL_INTERVAL / 4,
            rate
        ));
    }

    /// Until the initial sync is sent, nothing a session finds is acked before the sync's last
    /// MARK anyway, and each look moves the writers' cache lines to the session's CPU: it looks
    /// every INBOX_POLL_INTERVAL_SYNCING, stays polling that long without changes too (so the
    /// writer does not start waking it), and goes back to the streaming rate once the sync is
    /// sent.
    #[test]
    fn a_session_sending_its_initial_sync_looks_at_the_inbox_less_often() {
        let syncing = poll_rate(false);
        let t0 = Instant::now();
        let (seen, looked) = (Some(t0), Some(t0));
        let streaming_due = t0 + INBOX_POLL_INTERVAL;
        assert!(INBOX_POLL_INTERVAL_SYNCING > INBOX_POLL_IDLE_MAX);
        assert!(!look_due(seen, looked, streaming_due, syncing));
        assert!(polling(seen, t0 + INBOX_POLL_INTERVAL_SYNCING, syncing));
        assert_eq!(
            next_look_in(looked, streaming_due, syncing),
            INBOX_POLL_INTERVAL_SYNCING - INBOX_POLL_INTERVAL
        );
        let due = t0 + INBOX_POLL_INTERVAL_SYNCING;
        assert!(look_due(seen, looked, due, syncing));
        // Idle for INBOX_POLL_IDLE_MAX_SYNCING: the writer wakes it, it looks whenever woken.
        let idle = t0 + INBOX_POLL_IDLE_MAX_SYNCING;
        assert!(!polling(seen, idle, syncing));
        assert!(look_due(seen, Some(idle), idle, syncing));
        // Sync sent: the next look is due at the streaming rate.
        assert!(look_due(seen, looked, streaming_due, poll_rate(true)));
    }
}
