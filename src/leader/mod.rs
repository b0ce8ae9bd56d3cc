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

mod checkpoint;
mod connection;
mod hub;
mod server;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::auth::{random_instance, Secret, Secrets};
use crate::catalog::{Catalog, CatalogError};
use crate::engine::{self, EngineKind};
use crate::fork_chain::ForkChain;
use crate::frame::{Durability, InstanceId, LineageId};
use crate::index::{hex, now_ns, scan, Looked};
use crate::lag::{LagSnapshot, ACK_TIMEOUT_MS_DEFAULT};
use crate::leader_record::{self, LEADER_RECORD_INTERVAL_MS, LEADER_RECORD_SETTLE_MS};
use crate::paths::{DataDir, DirLock, PathError, RelPath};
use crate::watch::{Change, Watcher};

use checkpoint::{Checkpoints, WATCHER_FLUSH_TIMEOUT};
use hub::{acked_in, catalog_copy, Board, Hub, OwnLines, Shared, Wanted};
pub use server::LISTEN_RETRY_MS;
use server::{pacing_hint, serve};

/// The name of the leader's server thread: it accepts followers and runs every connection, so
/// it looks at their inboxes and sends them their payloads (`loadgen` reports how long it
/// waited for a CPU by this name).
pub const SERVER_THREAD_NAME: &str = "ferry-leader";

#[derive(Clone)]
pub struct LeaderConfig {
    pub data_dir: std::path::PathBuf,
    pub listen: SocketAddr,
    pub secret: Secret,
    /// During a rotation of the shared secret, the one followers may still hold: accepted as
    /// well, with a warning per follower that uses it (`docs/PROTOCOL.md`, AUTH).
    pub previous_secret: Option<Secret>,
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
    /// before it (`Leader::set_checkpoint_flush`), so none before the source is attached. That
    /// source also looks at what the data dir's path names, and fails when it is no longer the
    /// directory served (the watcher does); without one the leader looks itself
    /// (`Leader::failure`).
    pub change_source_flushes: bool,
    /// Who holds the data dir while this leader serves it, as another ferry process refused it
    /// is told (`paths::DirLock`): "ferry lead", "ferry node ADDR, leading", or the embedder's.
    pub role: String,
}

/// Has a change source report every change made up to now to the leader; false if it cannot
/// (stopped, or too slow), and the checkpoint is not written.
pub type CheckpointFlush = Arc<dyn Fn() -> bool + Send + Sync>;

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
            previous_secret: None,
            engine: None,
            ack_timeout: Duration::from_millis(ACK_TIMEOUT_MS_DEFAULT),
            tcp_congestion: None,
            record_interval: Duration::from_millis(LEADER_RECORD_INTERVAL_MS),
            change_source_flushes: false,
            role: "an embedded ferry leader".to_string(),
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
    /// Copies the follower moved (RENAME) instead of getting them whole, on this connection.
    pub files_renamed: u64,
    /// While its initial sync runs: (payload bytes sent for it, bytes planned).
    pub sync_bytes: Option<(u64, u64)>,
}

/// Why a change (`append`, `replace_file`, ...) was refused. More reasons may come in later
/// versions: a `match` on it needs a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("cannot stat {path}: {source}")]
    Stat { path: String, source: io::Error },
    /// The leader no longer serves followers (`Leader::is_stopped`), so the change would reach
    /// none: it is refused. What the application wrote stays in its files, and a leader started
    /// on the dir again ships it.
    #[error("this leader stopped serving, so no follower would get the change: {why}")]
    Stopped { why: String },
    /// The change says a file ends above the largest file Linux allows
    /// (`frame::MAX_FILE_BYTES`), or it would take the position past `frame::MAX_POSITION`:
    /// a length reported wrong. Refused, and nothing changed.
    #[error("{0}")]
    Length(String),
}

impl From<CatalogError> for ChangeError {
    // Out of the writer's way (`CatalogError`, on what its size costs an `append`).
    #[cold]
    #[inline(never)]
    fn from(e: CatalogError) -> ChangeError {
        match e {
            CatalogError::Path(e) => ChangeError::Path(e),
            CatalogError::TooLong(why) | CatalogError::PositionExhausted(why) => {
                ChangeError::Length(why.into())
            }
        }
    }
}

/// Why a leader stopped by its embedder (or by its node, once no longer leading) refuses
/// changes: `ChangeError::Stopped`. A leader that stopped on its own gives its `failure`.
const STOPPED_BY_EMBEDDER: &str =
    "it was stopped (stop_serving or shutdown, or by its node, which no longer leads)";

/// The instance a leader serves: its id, and what it goes on from when it is a fork of a dead
/// leader's (`docs/PROTOCOL.md`, *After a failover*, *After failovers in a row*), which every
/// session names to its follower and every record keeps.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) id: InstanceId,
    pub(crate) forks: ForkChain,
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
    instance: Instance,
    /// The data dir's lineage, which every session names to its follower (`crate::lineage`).
    lineage: LineageId,
    /// The record for the next start is written (by the first stop).
    record_written: AtomicBool,
    /// The thread writing the record while serving (`checkpoint`), until the stop.
    checkpoints: Mutex<Option<Checkpoints>>,
    /// The data dir's lock, from the start until the first stop has written the record: then a
    /// follower in this process (a node stepping down) may take the dir.
    lock: Mutex<Option<DirLock>>,
}

impl Leader {
    /// Opens the data dir and starts serving followers on `config.listen`. The catalog starts
    /// with `files` (path, logical length), e.g. from a scan; more can be registered later.
    /// After a stop in the same boot, or a run that died once it had written its record (every
    /// `config.record_interval` while serving), it resumes that run's instance, and the files
    /// unchanged since the record keep what followers' held records know of them
    /// (`leader_record`). A length in `files` above the largest file Linux allows, or lengths
    /// that together pass `frame::MAX_POSITION`, fail it with `InvalidInput`.
    pub fn start(config: LeaderConfig, files: Vec<(RelPath, u64)>) -> io::Result<Leader> {
        // The embedder's lengths, held to its later changes' limits (`ChangeError::Length`).
        crate::catalog::check_start(&files)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Leader::start_from(config, files, None)
    }

    /// `start` with the files a look found (a scan's, the watcher's): the leader's record is
    /// compared with that look, which the catalog is built from, and the first checkpoint
    /// vouches for the files that had settled by then, instead of each file being looked at
    /// again for either.
    pub(crate) fn start_looked(config: LeaderConfig, looked: Looked) -> io::Result<Leader> {
        let listed = looked
            .files
            .iter()
            .map(|m| (m.path.clone(), m.len_bytes))
            .collect();
        Leader::start_from(config, listed, Some(looked))
    }

    fn start_from(
        config: LeaderConfig,
        files: Vec<(RelPath, u64)>,
        looked: Option<Looked>,
    ) -> io::Result<Leader> {
        let dir = Arc::new(DataDir::open(&config.data_dir)?);
        // Before the record is taken and the temp files go: another process may be serving.
        let lock = DirLock::acquire(&dir, &config.role)?;
        dir.clear_temps()?;
        let lineage = crate::lineage::of_leader(&dir)?;
        let engine = engine::choose(config.engine)?;
        let congestion_asked = config.tcp_congestion.is_some();
        let record_interval = config.record_interval;
        fork_if_followed(&dir);
        let resumed = leader_record::take(&dir, looked.map(|l| l.files));
        let (catalog, instance, forks) = match &resumed {
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
                if r.forks.is_fork() {
                    tracing::info!(
                        "instance {} is {} (a failover): followers' files held under those up \
                         to there count as held",
                        hex(&r.instance),
                        r.forks.describe()
                    );
                }
                (
                    Catalog::resumed(files, r.last_position, &r.kept),
                    r.instance,
                    r.forks.clone(),
                )
            }
            None => {
                let instance = random_instance().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot draw the leader's instance id: {e}"),
                    )
                })?;
                (Catalog::new(files), instance, ForkChain::none())
            }
        };
        let instance = Instance {
            id: instance,
            forks,
        };
        let shared = Arc::new(Shared {
            hub: Mutex::new(Hub {
                catalog,
                inboxes: HashMap::new(),
                mark_ceiling: u64::MAX,
                refusing: None,
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
            server_tid: AtomicU32::new(0),
            secrets: Mutex::new(Secrets {
                current: config.secret.clone(),
                previous: config.previous_secret.clone(),
            }),
            secrets_changes: OwnLines(AtomicU64::new(0)),
            checkpoint_counts: Default::default(),
            failure: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            let dir = dir.clone();
            let instance = instance.clone();
            std::thread::Builder::new()
                .name(SERVER_THREAD_NAME.into())
                .spawn(move || {
                    let tid = shared.clone();
                    tid.server_tid
                        .store(crate::schedstat::current_tid(), Ordering::SeqCst);
                    engine::run(engine, move || {
                        serve(engine, config, shared, dir, ready_tx, (instance, lineage))
                    });
                    // Its id may go to a thread of the embedder next.
                    tid.server_tid.store(0, Ordering::SeqCst);
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
            let seen_at_start = looked.map(leader_record::Look::of_looked);
            let of = (instance.clone(), record_interval);
            match Checkpoints::start(shared, dir, of, seen_at_start) {
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
            lineage,
            record_written: AtomicBool::new(false),
            checkpoints: Mutex::new(checkpoints),
            lock: Mutex::new(Some(lock)),
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

    /// The data dir's lineage, as this leader serves it (`docs/PROTOCOL.md`, *Lineage*).
    pub fn lineage(&self) -> LineageId {
        self.lineage
    }

    /// Replaces the secrets followers authenticate with (`LeaderConfig::secret` and
    /// `previous_secret` at start): a rotation, `docs/PROTOCOL.md` (AUTH). A connection made from
    /// now on is checked against these; one whose follower authenticated with a secret not
    /// among them is closed with ERROR `AUTH_FAILED` within a moment. Whether they changed.
    pub fn set_secrets(&self, secrets: Secrets) -> bool {
        {
            let mut held = self
                .shared
                .secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *held == secrets {
                return false;
            }
            *held = secrets;
            // Under the lock: a session that reads the count reads these secrets or newer.
            self.shared.secrets_changes.0.fetch_add(1, Ordering::SeqCst);
        }
        // Every session looks now rather than at its next timeout.
        for inbox in self.shared.lock().inboxes.values() {
            inbox.wake.notify_one();
        }
        true
    }

    /// The current replication position (what `wait_for` compares against).
    pub fn position(&self) -> u64 {
        self.shared.lock().catalog.position()
    }

    /// The instance whose positions these are (`docs/PROTOCOL.md`, *The leader's record*).
    pub(crate) fn instance(&self) -> InstanceId {
        self.instance.id
    }

    /// What its instance goes on from, if it is a fork (`docs/PROTOCOL.md`, *After a
    /// failover*, *After failovers in a row*).
    pub(crate) fn forks(&self) -> &ForkChain {
        &self.instance.forks
    }

    /// Every file of the catalog with its length and birth, and the position, read after:
    /// at or above every birth.
    pub(crate) fn catalog_snapshot(&self) -> (Vec<(RelPath, crate::catalog::CatalogEntry)>, u64) {
        let catalog = catalog_copy(&self.shared).snapshot();
        (catalog, self.position())
    }

    /// A file the followers must hold, `len_bytes` long (its logical length: a preallocated
    /// segment may be longer on disk). Shipped whole unless it is already known at that length.
    pub fn register_file(&self, path: &str, len_bytes: u64) -> Result<u64, ChangeError> {
        let path = RelPath::new(path)?;
        {
            let hub = self.shared.lock();
            hub.refused()?;
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
    /// file) with `replace_file`. Like every change, refused once the leader stopped
    /// (`ChangeError::Stopped`).
    pub fn append(&self, path: &str, offset: u64, length: u64) -> Result<u64, ChangeError> {
        // A path the catalog knows is not checked again (nor copied).
        self.shared
            .record(|c| c.append(path, offset, length).map(Some))
    }

    /// `path` was rewritten as a whole (e.g. a JSON file renamed over); its size is taken now.
    pub fn replace_file(&self, path: &str) -> Result<u64, ChangeError> {
        let rel = RelPath::new(path)?;
        // Before the stat: a stopped leader says so, not that the file cannot be stat'ed.
        self.shared.lock().refused()?;
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

    /// `from` was renamed to `to` (over any file there), in the data dir: call after the
    /// rename(2). Followers that hold all of `from` move their copy (RENAME) instead of getting
    /// `to` again whole (`docs/PROTOCOL.md`, *Renames*); a follower that does not (behind, or
    /// of a build without `RENAME`) gets `to` whole, as `replace_file` would ship it. A `from`
    /// the leader does not know: `to` is taken as replaced (`replace_file`).
    pub fn rename_file(&self, from: &str, to: &str) -> Result<u64, ChangeError> {
        match self.shared.record_rename(from, to)? {
            Some(position) => Ok(position),
            None if from == to => Ok(self.position()),
            None => self.replace_file(to),
        }
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
            Change::Renamed {
                from,
                to,
                len_bytes,
            } => match self.shared.record_rename(from.as_str(), to.as_str())? {
                Some(position) => Ok(position),
                None => self.replace_file_with_len(to.as_str(), *len_bytes),
            },
        }
    }

    /// The facts `--http` reports about this leader.
    pub fn status(&self) -> crate::status::Status {
        crate::status::Status::Leader {
            engine: self.engine().name().to_string(),
            tcp_congestion: self.tcp_congestion.clone(),
            position: self.position(),
            followers: self.followers().iter().map(Into::into).collect(),
            server_thread: self.server_thread_times(),
            lineage: hex(&self.lineage),
            instance: hex(&self.instance.id),
            forks: (self.instance.forks.links().iter())
                .map(|f| (hex(&f.from), f.position))
                .collect(),
            checkpoints: self.shared.checkpoint_counts.read(),
        }
    }

    /// The server thread's time on a CPU and waiting for one (`SERVER_THREAD_NAME`: it sends
    /// to every follower, so while it waits, their payloads and acks do); `None` once it ended
    /// or where the kernel keeps no schedstats.
    pub fn server_thread_times(&self) -> Option<crate::schedstat::ThreadTimes> {
        self.shared.server_thread_times()
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
                    files_renamed: slot.files_renamed,
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
    /// `durability`, until `timeout` passes, or until no connection of that node is left. A
    /// handoff waits on its target this way.
    pub fn wait_node_acked(
        &self,
        node_id: &str,
        position: u64,
        durability: Durability,
        timeout: Duration,
    ) -> NodeAck {
        let deadline = Instant::now() + timeout;
        let mut board = self.shared.board();
        loop {
            let mut connected = board
                .slots
                .values()
                .filter(|s| s.disconnected_at.is_none() && s.node_id.as_deref() == Some(node_id))
                .peekable();
            if connected.peek().is_none() {
                return NodeAck::Gone;
            }
            let acked = connected
                .filter_map(|s| s.lag.as_ref())
                .map(|lag| lag.acked[durability.index()])
                .max();
            let now = Instant::now();
            if acked.is_some_and(|a| a >= position) {
                return NodeAck::Acked;
            }
            if now >= deadline || self.is_stopped() {
                return NodeAck::Behind;
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
        self.stop_serving_with(|| true, Settle::Wait);
    }

    /// Stops serving and returns once the server thread is gone: no follower is served or
    /// heard from afterwards, and `wait_for` and friends answer at once. Changes reported
    /// once it returned are refused (`ChangeError::Stopped`); those the change source's flush
    /// reports during it are taken, for the record. Through `&self` because a fenced node must
    /// stop even while its embedder still holds the `Arc<Leader>` it was given. The first stop
    /// writes the record the next start resumes from (`leader_record`); this one does not wait
    /// for files written within `LEADER_RECORD_SETTLE_MS` to settle, so those are not vouched
    /// for (`shutdown` waits).
    pub fn stop_serving(&self) {
        self.stop_serving_with(|| true, Settle::DoNotWait);
    }

    /// `stop_serving`, with `report_pending` reporting every change not reported yet (the
    /// watcher's last flush) once the files have been looked at for the record, before it is
    /// written: what changed before the look is then in the catalog the record keeps. With
    /// `Settle::Wait`, files changed less than `LEADER_RECORD_SETTLE_MS` before the look are
    /// waited for and looked at again, so the record can vouch for them. `report_pending`
    /// returns false when it could not report every change (a watcher that had stopped on its
    /// own): then no record is written, since it could vouch for a file changed behind the
    /// catalog, and the next start resumes from the last checkpoint, if any.
    pub fn stop_serving_with(&self, report_pending: impl FnOnce() -> bool, settle: Settle) {
        self.stop_and_record(report_pending, settle);
        // Only now: the stop's own flush (`report_pending`, a checkpoint's) reports changes
        // the record must keep.
        self.shared
            .refuse_changes(|| STOPPED_BY_EMBEDDER.to_string());
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// `stop_serving_with` but for the lock, which it lets go of once this is done.
    fn stop_and_record(&self, report_pending: impl FnOnce() -> bool, settle: Settle) {
        self.shared.begin_stop();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        let checkpoints = self
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let rounds = checkpoints.and_then(Checkpoints::stop);
        let recorded = self.record_written.swap(true, Ordering::SeqCst);
        if recorded || settle == Settle::HandedOffAt(self.position()) {
            checkpoint::stop_listing(&self.shared);
            report_pending();
            return;
        }
        // No session is left, so no MARK beyond the position the record names was sent. (If
        // this record cannot be written, the last checkpoint stays: its reservation is above
        // every MARK too.)
        let wait = settle == Settle::Wait;
        let (shared, instance) = (&self.shared, &self.instance);
        checkpoint::record_stop(shared, &self.dir, (instance, rounds), wait, report_pending);
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
            c.ask_now();
        }
    }

    /// Whether `stop_serving` (or shutdown) ran, or the leader stopped on its own (`failure`).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Why the leader stopped serving on its own, once it has: its data dir's path no longer
    /// names the directory it serves (moved away, deleted, unmounted, or mounted over: a leader
    /// no watcher feeds looks every `paths::ROOT_CHECK_INTERVAL`). Files written at that path
    /// from then on would reach no follower, and changes are refused (`ChangeError::Stopped`,
    /// with this reason). Start a leader on the path again.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A dir that followed since it last led (`ferry lead` on a former follower's dir, the leader it
/// followed gone) goes on from the instance it followed (`promote`), so that the followers of
/// that leader keep what their held records vouch for. An application may have written into
/// the dir since its follower stopped: only the files settled by then (the held record's mtime,
/// which the follower set as it stopped) are vouched for. A `ferry node` forked already, at its
/// election, and has the newer record.
fn fork_if_followed(dir: &DataDir) {
    match crate::promote::fork_if_followed(dir, crate::promote::Settled::AtHeldSave) {
        Ok(None) => {}
        Ok(Some(forked)) => forked.log(
            "this data dir synced as a follower (its held record is newer than any leader's \
             record of it)",
        ),
        Err(e) => tracing::warn!(
            "cannot go on from the instance this data dir followed: {e}; a new one, and \
             followers hash what changed since their last inventory"
        ),
    }
}

/// A leader fed by the inotify watcher on its data dir: `ferry lead`, and `ferry node` while
/// elected. Every file found at start is registered; later writes reach it as changes.
pub struct WatchedLeader {
    pub leader: Arc<Leader>,
    watcher: Watcher,
}

/// Scans the data dir and starts a leader with every file found registered.
pub fn start_scanned(config: LeaderConfig) -> io::Result<Arc<Leader>> {
    let data_dir = config.data_dir.clone();
    let began_ns = now_ns();
    let files = scan(&DataDir::open(&data_dir)?).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot scan {}: {e}", data_dir.display()))
    })?;
    let files = &files;
    start_with(config, Looked { files, began_ns })
}

/// Watches the data dir, and starts a leader with every file the watcher found registered,
/// fed every change it sees from then on: one look at each file for both.
pub fn start_watched(mut config: LeaderConfig) -> io::Result<(Arc<Leader>, Watcher)> {
    config.change_source_flushes = true;
    let data_dir = DataDir::open(&config.data_dir)?.root().to_path_buf();
    let prepared = Watcher::prepare(&data_dir).map_err(|e| cannot_watch(&data_dir, e))?;
    let leader = start_with(config, prepared.looked())?;
    let watcher = prepared
        .start(sink_of(&leader))
        .map_err(|e| cannot_watch(&data_dir, e))?;
    set_watcher_flush(&leader, &watcher);
    Ok((leader, watcher))
}

/// Starts a leader with `files` registered, said in the log.
fn start_with(config: LeaderConfig, looked: Looked) -> io::Result<Arc<Leader>> {
    let (data_dir, files) = (&config.data_dir, looked.files);
    tracing::info!(
        "{} files, {} bytes in {}",
        files.len(),
        files.iter().map(|m| m.len_bytes).sum::<u64>(),
        data_dir.display()
    );
    if files.is_empty() {
        tracing::warn!(
            "{} is empty: if its disk is not mounted, or it is not the application's data dir, \
             followers that hold copies will decline to follow until it has files",
            data_dir.display()
        );
    }
    Ok(Arc::new(Leader::start_looked(config, looked)?))
}

fn cannot_watch(data_dir: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot watch {} with inotify: {e}", data_dir.display()),
    )
}

/// What feeds `leader` the watcher's changes.
fn sink_of(leader: &Arc<Leader>) -> crate::watch::Sink {
    let leader = leader.clone();
    Box::new(move |change: Change| {
        if let Err(e) = leader.apply(&change) {
            tracing::warn!("ignoring {change:?}: {e}");
        }
    })
}

/// A checkpoint of `leader`'s record has `watcher` report every change made before it.
fn set_watcher_flush(leader: &Leader, watcher: &Watcher) {
    let flusher = watcher.flusher();
    leader.set_checkpoint_flush(Arc::new(move || flusher.flush(WATCHER_FLUSH_TIMEOUT)));
}

/// Feeds `leader` every change inotify sees in its data dir again, after `stopped`, its
/// watcher until then: first every change that one did not report (`Watcher::resume`).
pub fn watch_again(leader: &Arc<Leader>, stopped: crate::watch::Stopped) -> io::Result<Watcher> {
    let data_dir = leader.data_dir().root().to_path_buf();
    let watcher = Watcher::resume(&data_dir, stopped, sink_of(leader))
        .map_err(|e| cannot_watch(&data_dir, e))?;
    set_watcher_flush(leader, &watcher);
    Ok(watcher)
}

impl WatchedLeader {
    pub fn start(config: LeaderConfig) -> io::Result<WatchedLeader> {
        let (leader, watcher) = start_watched(config)?;
        Ok(WatchedLeader { leader, watcher })
    }

    /// Why the watcher stopped on its own, once it has (`Watcher::failure`): it no longer sees
    /// every change, and the leader should stop.
    pub fn failure(&self) -> Option<String> {
        self.watcher.failure()
    }

    /// Stops serving, then watching: the watcher reports what it has not yet after the files
    /// are looked at for the leader's record.
    pub fn stop(self) {
        let watcher = self.watcher;
        self.leader.stop_serving_with(
            move || watcher.flush_and_stop().failure().is_none(),
            Settle::Wait,
        );
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.stop_serving_with(|| true, Settle::Wait);
    }
}

/// What `Leader::wait_node_acked` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAck {
    /// The node acked the position.
    Acked,
    /// Connected, and short of the position when the timeout passed.
    Behind,
    /// No connection of that node is left (stopped, killed, its connection dropped).
    Gone,
}

/// Whether a stop waits for files written just before it to settle, so that the leader's
/// record vouches for them (`Leader::stop_serving_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// A graceful stop: up to `LEADER_RECORD_SETTLE_MS` longer.
    Wait,
    /// A prompt one (a fenced or departing node): those files go whole after the next start.
    DoNotWait,
    /// A prompt one after a handoff at the final drain's position, given: if the position is
    /// still that, no record at all, since the instance goes on at the target and must not
    /// resume here too (`cluster`'s `pass_on_instance` deletes the last checkpoint); else as
    /// `DoNotWait`. Not looking at every file spares the cluster that long without a leader.
    HandedOffAt(u64),
}
