//! The follower's driver: connects to the leader, runs a `session::follower::FollowerSession`,
//! applies its actions to the data dir (`apply`), syncs in batches, and reconnects with backoff.
//!
//! Payload bytes go from the socket to the file without the session seeing them: whatever the
//! read buffer already holds is written first, the rest moves socket -> pipe -> file with
//! splice(2) on the connection's task (`engine::receive`), on both engines. Each write has
//! completed before the next frame is looked at, so a MARK is acked as written at once.
//!
//! With `--durability synced` a sync task runs beside the reader: whenever `written` is ahead of
//! `synced` it makes durable everything written so far (fdatasync of each file written, fsync of
//! each directory whose entries changed: `dirty`), then acks; what an earlier process left in
//! the page cache is made durable once at start (syncfs). Syncs are batched: while one round
//! runs, later marks accumulate and the next round covers them all.

pub mod apply;
mod dirty;
pub(crate) mod held;
mod input;
mod outbox;
mod progress;

use crate::index::Stamp;
pub use dirty::Dirty;
use held::{HeldRecord, HELD_CHECKPOINT_INTERVAL_MS};
use input::Input;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::auth::{random_nonce, Secret, SharedSecrets};
use crate::engine::receive::{self, is_write_failure, Receiver};
use crate::engine::{self, Conn, EngineKind};
use crate::fork_chain::{ForkChain, ToldChains};
use crate::frame::{
    Durability, ErrorCode, FrameError, InstanceId, LineageId, CONNECT_TIMEOUT_MS,
    LEADER_SILENCE_TIMEOUT_MS,
};
use crate::index::{scan, DigestCache};
use crate::paths::{DataDir, RelPath};
use crate::session::follower::{
    Births, Cut, FollowerAction, FollowerPhase, FollowerSession, HaveEntry, HaveProof,
};
use crate::session::SessionError;
use crate::status::FollowerSelf;
use apply::{disk_error, Apply};
use outbox::Outbox;

/// Bytes read from the leader's socket per read (frames, and payload that came along).
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// The first wait before reconnecting; it doubles with each attempt that fails, and starts
/// again from here after a connection that worked (see `RECONNECT_WORKED_AFTER`).
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait after an attempt that failed once connected: each such attempt costs the
/// leader an index and this follower an inventory.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest wait after an attempt that found no leader listening, which costs a SYN: how
/// late a follower may come back after its leader restarts (the broker's confirms may wait for
/// it), however long the leader was away.
const RECONNECT_NO_LEADER_MAX: Duration = Duration::from_secs(1);
/// A connection that lasted this long worked, as did one on which the follower came in sync and
/// that the leader's going away ended (`leader_went_away`): the wait starts again from
/// `RECONNECT_BACKOFF_MIN`, and how the connection ended is news. A connection that came in
/// sync and then failed otherwise (a disk full, an ERROR from the leader) may fail so again at
/// once: its wait goes on doubling.
const RECONNECT_WORKED_AFTER: Duration = Duration::from_secs(5);
/// How long a follower that sent an ERROR waits for the leader to close before it does.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// How often a sleeping follower looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct FollowConfig {
    pub data_dir: std::path::PathBuf,
    /// host:port of the leader.
    pub leader: String,
    /// What it authenticates with: the current secret as each connection starts (changed
    /// while it runs by SIGHUP, or by a node's rotation through etcd).
    pub secret: SharedSecrets,
    pub durability: Durability,
    /// Exit once the data dir matches the leader's index as of the connection.
    pub once: bool,
    pub engine: Option<EngineKind>,
    /// What this follower reports about itself (for `--http`); the driver keeps it current.
    pub status: Arc<Mutex<FollowerSelf>>,
    /// Set to stop following (checked after every read and between connections).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Named to the leader in NODE_ID (`ferry node` uses its advertised address).
    pub node_id: Option<String>,
    /// Take over a data dir that holds files but was never ferry's (no `.ferry/`), or whose
    /// files were copied from another data dir than the leader's (`lineage`): without it, `run`
    /// refuses the first (`paths::unmanaged_file`) and declines the second, whose files it
    /// would delete.
    pub adopt: bool,
}

/// What one connection achieved.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// File bytes received (DATA payloads).
    pub payload_bytes: u64,
    /// Files in the leader's index.
    pub index_files: usize,
    /// Time from connecting to the initial sync being durable.
    pub sync_elapsed: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The leader refused us, or we refused it, for a reason a retry will not fix.
    #[error(transparent)]
    Refused(SessionError),
    /// The leader no longer accepts the secret this connection authenticated with (a
    /// rotation ended): a refusal, unless the follower has been given another secret since.
    #[error(transparent)]
    SecretRevoked(SessionError),
    #[error(transparent)]
    Session(SessionError),
    #[error(transparent)]
    Io(#[from] io::Error),
    /// No leader listening at the address (the connect failed): retried sooner than an
    /// attempt that failed once connected (`RECONNECT_NO_LEADER_MAX`).
    #[error(transparent)]
    NoLeader(io::Error),
    /// The data dir's path no longer names the directory being written (`DataDir::check_root`):
    /// following on would write, and ack, into a directory nobody will find there.
    #[error(transparent)]
    DirGone(io::Error),
}

impl FollowError {
    /// `authenticated`: the session was past the handshake when `e` came.
    fn from_session(e: SessionError, authenticated: bool) -> FollowError {
        if authenticated && wrong_secret(&e) {
            return FollowError::SecretRevoked(e);
        }
        let fatal = match &e {
            SessionError::AuthFailed(_) => true,
            SessionError::Frame(
                FrameError::BadMagic { .. } | FrameError::VersionMismatch { .. },
            ) => true,
            SessionError::Peer { code, .. } => matches!(
                code,
                ErrorCode::AuthFailed | ErrorCode::VersionMismatch | ErrorCode::BadMagic
            ),
            _ => false,
        };
        if fatal {
            FollowError::Refused(e)
        } else {
            FollowError::Session(e)
        }
    }
}

/// Follows the leader until stopped (or, with `once`, until the initial sync is durable).
pub fn run(config: FollowConfig) -> Result<SyncReport, FollowError> {
    if !config.adopt {
        if let Some(file) = crate::paths::unmanaged_file(&config.data_dir)? {
            let why = format!(
                "{} holds files (such as {}) but has never been a ferry data dir (it has no \
                 {}/): following makes it an exact copy of the leader's and deletes every file \
                 the leader lacks. Follow into an empty or new directory, or pass --adopt \
                 (FollowConfig::adopt) to take this one over, e.g. a copy seeded from the \
                 leader's data: then only what differs travels",
                config.data_dir.display(),
                file.display(),
                crate::paths::STATE_DIR_NAME
            );
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, why).into());
        }
    }
    let dir = Arc::new(DataDir::open(&config.data_dir)?);
    let role = match &config.node_id {
        Some(id) => format!("ferry node {id}, following"),
        None => "ferry follow".to_string(),
    };
    // Held until this returns; before the temp files go, which could be another's in flight.
    let _lock = crate::paths::DirLock::acquire(&dir, &role)?;
    dir.clear_temps()?;
    let recorded = crate::lineage::read(&dir)?;
    if let Ok(mut st) = config.status.lock() {
        st.lineage = recorded.map(|id| crate::index::hex(&id));
    }
    if config.durability == Durability::Synced && dir.in_memory()? {
        tracing::warn!(
            "{} is in memory (tmpfs): acks at synced will mean the bytes are in this machine's \
             memory, which a reboot or a power loss loses; put the copy on a disk for synced to \
             mean durable",
            dir.root().display()
        );
    }
    if config.durability == Durability::Synced {
        // A sync round makes durable what this process wrote, and the directories whose
        // entries it changed; what an earlier one left unsynced is made durable here, once,
        // before anything is acked.
        let started = Instant::now();
        dir.sync_filesystem().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot sync the data dir's filesystem: {e}"),
            )
        })?;
        tracing::info!(
            "synced what an earlier run left in {} (syncfs, {} ms)",
            dir.root().display(),
            started.elapsed().as_millis()
        );
    }
    let kind = engine::choose(config.engine)?;
    tracing::info!(
        "following {} into {} with the {} engine, acking at {}",
        config.leader,
        dir.root().display(),
        kind.name(),
        config.durability.name()
    );
    engine::run(kind, move || follow_loop(config, dir))
}

async fn follow_loop(config: FollowConfig, dir: Arc<DataDir>) -> Result<SyncReport, FollowError> {
    let result = follow_until_done(config, &dir).await;
    // However it ends (asked to stop, one sync done, refused), this follower was its dir's
    // only writer up to now: a leader started on the dir later vouches for the files that had
    // settled by then (`promote`), rather than by the held record's last save.
    HeldRecord::date_stop(&dir);
    result
}

async fn follow_until_done(
    config: FollowConfig,
    dir: &Arc<DataDir>,
) -> Result<SyncReport, FollowError> {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let cache = Rc::new(RefCell::new(Some(DigestCache::load(dir))));
    let held = Arc::new(Mutex::new(HeldRecord::load_with_own_record(dir)));
    // Why attempts fail: said once, then once a minute while it repeats (`log_repeats`).
    let mut repeats = crate::log_repeats::Repeats::default();
    // The next attempt authenticates with the previous secret (refused with the current one in
    // a rotation: the `Refused` arm below).
    let mut with_previous = false;
    loop {
        if config.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(SyncReport::default());
        }
        let started = Instant::now();
        let secrets = config.secret.get();
        let tried_previous = std::mem::take(&mut with_previous);
        let secret = match (&secrets.previous, tried_previous) {
            (Some(previous), true) => previous.clone(),
            _ => secrets.current.clone(),
        };
        let connects_before = config.status.lock().map_or(0, |st| st.connects);
        let result = follow_once(&config, &secret, dir, &cache, &held).await;
        // This attempt connected (the count moved) and came in sync on that connection.
        let came_in_sync = match config.status.lock() {
            Ok(mut st) => {
                st.connected = false;
                st.last_error = result.as_ref().err().map(|e| e.to_string());
                st.connects != connects_before && st.sync_done
            }
            Err(_) => false,
        };
        if config.stop.load(std::sync::atomic::Ordering::SeqCst) {
            // Asked to stop (a signal, or a node about to lead): however the connection ended.
            return Ok(result.unwrap_or_default());
        }
        if (came_in_sync && leader_went_away(&result)) || started.elapsed() > RECONNECT_WORKED_AFTER
        {
            backoff = RECONNECT_BACKOFF_MIN;
            repeats.forget();
        }
        let wait = match result {
            Err(FollowError::NoLeader(_)) => backoff.min(RECONNECT_NO_LEADER_MAX),
            _ => backoff,
        };
        match result {
            Ok(report) if config.once => return Ok(report),
            // The leader no longer accepts the secret this connection authenticated with, and
            // the follower holds another: a rotation ended. Try the current one at once.
            Err(FollowError::SecretRevoked(e)) if config.secret.get().current != secret => {
                tracing::info!(
                    "{e}; this follower holds a newer shared secret than the one it connected \
                     with: reconnecting with it"
                );
                continue;
            }
            Err(FollowError::SecretRevoked(e)) => return Err(FollowError::Refused(e)),
            // Refused the current secret while it holds a previous one: a rotation that the
            // leader has not taken yet (its reload comes later, or an older build leads). The
            // previous one is still good until the rotation ends.
            Err(FollowError::Refused(e))
                if !tried_previous && secrets.previous.is_some() && wrong_secret(&e) =>
            {
                tracing::info!(
                    "{e}; the leader does not hold the new shared secret yet: trying its \
                     previous secret (a rotation is in progress)"
                );
                with_previous = true;
                continue;
            }
            Err(e @ (FollowError::Refused(_) | FollowError::DirGone(_))) => return Err(e),
            Err(e) if config.once => return Err(e),
            Ok(_) => tracing::warn!(
                "the leader closed the connection; reconnecting in {} ms",
                wait.as_millis()
            ),
            Err(e) => {
                let message = e.to_string();
                match repeats.report(&message, Instant::now()) {
                    Some(line) => tracing::warn!("{line}; reconnecting in {} ms", wait.as_millis()),
                    None => {
                        tracing::debug!("{message}; reconnecting in {} ms", wait.as_millis())
                    }
                }
            }
        }
        sleep_unless_stopped(wait, &config.stop).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

/// Whether a connection ended because the leader went away (it closed, stopped, died, or fell
/// silent), which a restarted leader answers at once, rather than on a failure that may come
/// back as soon as the follower does.
fn leader_went_away(result: &Result<SyncReport, FollowError>) -> bool {
    use io::ErrorKind::*;
    match result {
        Ok(_) => true,
        Err(FollowError::Session(SessionError::Peer { code, .. })) => *code == ErrorCode::Shutdown,
        Err(FollowError::Io(e)) => matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut
        ),
        Err(_) => false,
    }
}

/// The leader refused the secret this follower authenticated with.
fn wrong_secret(e: &SessionError) -> bool {
    matches!(
        e,
        SessionError::Peer {
            code: ErrorCode::AuthFailed,
            ..
        }
    )
}

/// Resolves once `stop` is set.
async fn stopped(stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// Sleeps for `duration`, or less if `stop` is set meanwhile: a node that was just elected must
/// not wait out its follower's reconnect backoff before it can lead.
pub(crate) async fn sleep_unless_stopped(duration: Duration, stop: &std::sync::atomic::AtomicBool) {
    let deadline = Instant::now() + duration;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(STOP_POLL)).await;
    }
}

async fn resolve(leader: &str) -> io::Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(leader).await?;
    addrs.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{leader} resolves to no address"),
        )
    })
}

/// Connects to the leader at `leader`, giving up after `CONNECT_TIMEOUT_MS` without an answer.
async fn connect(leader: &str) -> Result<(Conn, SocketAddr), FollowError> {
    let addr = resolve(leader).await?;
    let timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
    let cannot = |kind, why: String| {
        FollowError::NoLeader(io::Error::new(
            kind,
            format!("cannot connect to the leader at {addr}: {why}"),
        ))
    };
    match tokio::time::timeout(timeout, Conn::connect(addr)).await {
        Ok(Ok(conn)) => Ok((conn, addr)),
        Ok(Err(e)) => Err(cannot(e.kind(), e.to_string())),
        Err(_) => Err(cannot(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT_MS} ms (CONNECT_TIMEOUT_MS)"),
        )),
    }
}

/// One connection, from connect to its end.
async fn follow_once(
    config: &FollowConfig,
    secret: &Secret,
    dir: &Arc<DataDir>,
    cache: &Rc<RefCell<Option<DigestCache>>>,
    held: &Arc<Mutex<HeldRecord>>,
) -> Result<SyncReport, FollowError> {
    // A stop does not wait for a connect in flight (a node elected must take the dir).
    let connected = tokio::select! {
        connected = connect(&config.leader) => connected?,
        () = stopped(&config.stop) => return Ok(SyncReport::default()),
    };
    let (conn, addr) = (Rc::new(connected.0), connected.1);
    tracing::info!("connected to the leader at {addr}");
    if let Ok(mut st) = config.status.lock() {
        st.connected = true;
        st.connects += 1;
        st.last_error = None;
        st.sync_done = false;
        st.watermarks = [0; 3];
    }
    let session = Rc::new(RefCell::new(FollowerSession::with_node_id(
        secret.clone(),
        random_nonce()?,
        config.durability,
        config.node_id.clone(),
    )));
    let (outbox, write_task) = Outbox::new(conn.clone());
    let outbox = Rc::new(outbox);
    let writer = tokio::task::spawn_local(write_task);
    let sync_wake = Rc::new(Notify::new());
    let dirty = Rc::new(RefCell::new(Dirty::default()));
    let syncer = tokio::task::spawn_local(sync_loop(
        dir.clone(),
        session.clone(),
        dirty.clone(),
        sync_wake.clone(),
        outbox.clone(),
    ));
    let mut ctx = Ctx {
        config,
        dir,
        conn: &conn,
        session: &session,
        outbox: &outbox,
        sync_wake: &sync_wake,
        cache,
        held: Held::new(held.clone()),
        apply: Apply::new(
            dir.clone(),
            dirty.clone(),
            config.durability == Durability::Synced,
        ),
        receiver: Receiver::new(),
        progress: None,
        report: SyncReport::default(),
        started: Instant::now(),
        root_checked: Instant::now(),
    };
    let result = ctx.run().await;
    // However the connection ended, what was applied after its last MARK is recorded.
    ctx.held.finish(dir).await;
    let mut told = false;
    if let Err(FollowError::Session(e) | FollowError::Refused(e) | FollowError::SecretRevoked(e)) =
        &result
    {
        // Tell the leader why we are leaving (nothing is sent back for its own ERROR).
        let mut s = session.borrow_mut();
        s.fail(e);
        let _ = outbox.send(s.take_output());
        told = !matches!(e, SessionError::Peer { .. });
    }
    syncer.abort();
    drop(ctx);
    // Whole-file transfers this connection left unfinished: their partial temp files would hold
    // disk space (what a full disk lacks) until the process restarts. The next connection
    // begins them anew.
    if let Err(e) = dir.clear_temps() {
        tracing::warn!("cannot clear the temp files of unfinished transfers: {e}");
    }
    drop(outbox);
    // Let the writer flush what is queued (the final ACK or ERROR), within reason.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    if told {
        // Closing with the leader's data unread would reset the connection, and the leader,
        // still sending, would see a broken pipe instead of our ERROR: drop what it sends
        // until it closes, within reason.
        let _ = tokio::time::timeout(ERROR_LINGER, async {
            let mut buf = Vec::with_capacity(READ_BUFFER_BYTES);
            loop {
                let (r, b) = conn.read(buf).await;
                match r {
                    Ok(n) if n > 0 => buf = b,
                    _ => return,
                }
            }
        })
        .await;
    }
    conn.shutdown();
    result
}

struct Ctx<'a> {
    config: &'a FollowConfig,
    dir: &'a Arc<DataDir>,
    conn: &'a Rc<Conn>,
    session: &'a Rc<RefCell<FollowerSession>>,
    outbox: &'a Rc<Outbox>,
    sync_wake: &'a Rc<Notify>,
    cache: &'a Rc<RefCell<Option<DigestCache>>>,
    held: Held,
    apply: Apply,
    receiver: Receiver,
    progress: Option<progress::Progress>,
    report: SyncReport,
    started: Instant,
    /// When the data dir's path was last checked (`DataDir::check_root`), at a MARK.
    root_checked: Instant,
}

impl Ctx<'_> {
    fn send_output(&self) {
        let out = self.session.borrow_mut().take_output();
        let _ = self.outbox.send(out);
    }

    async fn run(&mut self) -> Result<SyncReport, FollowError> {
        self.send_output();
        let mut input = Input::new();
        loop {
            self.process(&mut input).await?;
            if self.config.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(self.report.clone());
            }
            let durability = self.config.durability;
            let watermarks = self.session.borrow().watermarks();
            if durability == Durability::Synced && watermarks[1] > watermarks[2] {
                if !self.config.once {
                    self.sync_wake.notify_one();
                } else if self.session.borrow().sync_done_position().is_some() {
                    // --once syncs once, inline, at the end (so no round of the sync task is in
                    // flight with part of the dirty set), and exits as soon as it is durable.
                    let round = self.apply.take_dirty();
                    let target = watermarks[1];
                    sync_round(self.dir.clone(), round)
                        .await
                        .map_err(FollowError::Io)?;
                    self.session.borrow_mut().synced(target);
                }
            }
            self.session.borrow_mut().poll_ack();
            self.send_output();
            if let Ok(mut st) = self.config.status.lock() {
                let session = self.session.borrow();
                st.watermarks = session.watermarks();
                st.sync_done = session.sync_done_position().is_some();
            }
            if self.config.once && self.session.borrow().sync_done_durable() {
                self.report.sync_elapsed = Some(self.started.elapsed());
                return Ok(self.report.clone());
            }
            let read = receive::unless_silent(
                &**self.conn,
                self.conn.read_more(input.for_read(READ_BUFFER_BYTES)),
            );
            // Stopping must not wait for a leader that went silent (a node elected meanwhile
            // waits for this follower to stop before it can lead).
            let (r, b) = tokio::select! {
                read = read => match read {
                    Ok(x) => x,
                    Err(receive::Silent) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the leader sent nothing for {LEADER_SILENCE_TIMEOUT_MS} ms"),
                        )
                        .into())
                    }
                },
                () = stopped(&self.config.stop) => return Ok(self.report.clone()),
            };
            let n =
                r.map_err(|e| io::Error::new(e.kind(), format!("reading from the leader: {e}")))?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the leader closed the connection",
                )
                .into());
            }
            input.refill(b);
            if self.config.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(self.report.clone());
            }
        }
    }

    /// Parses and applies every complete frame in `input`, in order.
    async fn process(&mut self, input: &mut Input) -> Result<(), FollowError> {
        loop {
            let authenticated = !matches!(
                self.session.borrow().phase(),
                FollowerPhase::AwaitPreamble
                    | FollowerPhase::AwaitChallenge
                    | FollowerPhase::AwaitWelcome
            );
            let parsed = self.session.borrow_mut().handle_input(input.unread());
            let (n, action) = parsed.map_err(|e| FollowError::from_session(e, authenticated))?;
            input.consume(n);
            let Some(action) = action else {
                return Ok(());
            };
            // Before the action changes a file: a look at it after sees its birth. (Not for
            // every payload frame: the lock is for the few actions that matter.)
            if Births::concerns(&action) {
                let born_in_use = self.session.borrow().born_in_use();
                self.held.births_before(&action, born_in_use);
            }
            match action {
                FollowerAction::Inventory {
                    index,
                    instance,
                    forks,
                    lineage,
                } => {
                    if index.is_empty() {
                        self.decline_an_empty_index()?;
                    }
                    if let Some(lineage) = lineage {
                        self.take_lineage(lineage)?;
                    }
                    self.report.index_files = index.len();
                    self.held.instance = instance;
                    let cuts: Vec<(RelPath, u64)> = index
                        .iter()
                        .map(|(p, cut)| (p.clone(), cut.len_bytes))
                        .collect();
                    let (lengths, cut) = self.send_inventory(index, instance, forks).await?;
                    for path in &cut {
                        self.apply.note_changed(path);
                    }
                    let expected: u64 = cuts
                        .iter()
                        .map(|(p, cut)| {
                            cut.saturating_sub(lengths.get(p).copied().unwrap_or(0).min(*cut))
                        })
                        .sum();
                    self.progress = Some(progress::Progress::new(cuts.len(), expected));
                    // Marked at the initial sync's end with these lengths (`Held::marked`).
                    self.held.index = cuts;
                }
                FollowerAction::Write {
                    path,
                    temp,
                    offset,
                    len_bytes,
                } => {
                    let buffered = (len_bytes as usize).min(input.unread().len());
                    if !temp {
                        self.apply.note_changed(&path);
                        // A DATA ships a tail: from the copy's length on (`offset` is it).
                        let end = offset.saturating_add(len_bytes);
                        self.held.changed(&path, offset, |len| len.max(end));
                    }
                    let file = self
                        .apply
                        .file_for_write(&path, temp)
                        .map_err(FollowError::Session)?;
                    // What the read buffer holds first, then the rest from the socket: each
                    // write completes before the next, so the file grows in wire order.
                    file.write_all_at(&input.unread()[..buffered], offset)
                        .map_err(|e| FollowError::Session(disk_error("write", &path, e)))?;
                    input.consume(buffered);
                    let rest = len_bytes - buffered as u64;
                    if rest > 0 {
                        let stream = self.conn.tokio_stream().ok_or_else(|| {
                            io::Error::other("the follower's connection has no tokio stream")
                        })?;
                        let receive = self.receiver.receive(
                            stream,
                            file,
                            path.as_str(),
                            offset + buffered as u64,
                            rest,
                        );
                        let received = tokio::select! {
                            r = receive => r,
                            // `run` sees the flag next and ends the connection.
                            () = stopped(&self.config.stop) => return Ok(()),
                        };
                        received.map_err(|e| {
                            if is_write_failure(&e) {
                                write_error(e, &path)
                            } else {
                                io::Error::new(e.kind(), format!("receiving {path}: {e}")).into()
                            }
                        })?;
                    }
                    self.report.payload_bytes += len_bytes;
                    if let Some(p) = &mut self.progress {
                        p.on_bytes(len_bytes);
                    }
                    if let Ok(mut st) = self.config.status.lock() {
                        st.payload_bytes_received += len_bytes;
                    }
                }
                FollowerAction::Mark {
                    sync_done,
                    position,
                } => {
                    if self.root_checked.elapsed() >= crate::paths::ROOT_CHECK_INTERVAL {
                        self.dir.check_root().map_err(FollowError::DirGone)?;
                        self.root_checked = Instant::now();
                    }
                    // Every write before this MARK has completed (see `receive`).
                    self.session.borrow_mut().written(position);
                    self.held.on_mark(self.dir, position, sync_done);
                    // Acked now, not after the rest of the read buffer: rounds that came in
                    // behind this MARK (their payloads still to write) would delay it.
                    self.session.borrow_mut().poll_ack();
                    self.send_output();
                    if sync_done {
                        if let Some(mut p) = self.progress.take() {
                            p.finish();
                        }
                        tracing::info!(
                            "initial sync received: {} files in the index, {} payload bytes in {:.2} s (position {position})",
                            self.report.index_files,
                            self.report.payload_bytes,
                            self.started.elapsed().as_secs_f64()
                        );
                    }
                }
                other => {
                    match &other {
                        FollowerAction::CommitWhole { path, len_bytes }
                        | FollowerAction::Truncate { path, len_bytes } => {
                            self.held.changed(path, 0, |_| *len_bytes)
                        }
                        FollowerAction::Delete { path } => self.held.changed(path, 0, |_| 0),
                        FollowerAction::Rename { from, to } => {
                            let len = self.dir.open_read(from).and_then(|f| f.metadata());
                            let len = len.map_or(0, |m| m.len());
                            self.held.changed(from, 0, |_| 0);
                            self.held.changed(to, 0, |_| len);
                        }
                        _ => {}
                    }
                    self.apply.apply(other).map_err(FollowError::Session)?
                }
            }
        }
    }

    /// Sends HAVE entries for every file here, digests from the cache where the file is
    /// unchanged, each as soon as it is known (the leader hashes its side of it meanwhile),
    /// then HAVE_END; returns the length of each file.
    /// An empty index would delete every file of this copy: what a leader whose disk is not
    /// mounted asks for. Declined (`docs/PROTOCOL.md`, *Sequence*) when the copy holds files;
    /// the connection ends, and a later one follows once the leader has files again.
    fn decline_an_empty_index(&self) -> Result<(), FollowError> {
        let Some((files, bytes)) = self.holds()? else {
            return Ok(());
        };
        Err(FollowError::Session(SessionError::Declined(format!(
            "the leader's data dir is empty, and following it would delete all {} files ({bytes} \
             bytes) of this copy in {}: not following. If the leader's disk is not mounted or its \
             --data-dir is wrong, fix that (this follower tries again meanwhile); if its data is \
             gone on purpose, empty this copy's directory",
            files,
            self.dir.root().display()
        ))))
    }

    /// The files this copy holds and their bytes, `None` when it holds none: what a refusal
    /// to follow would otherwise delete.
    fn holds(&self) -> io::Result<Option<(usize, u64)>> {
        let held = crate::index::scan(self.dir.as_ref())?;
        let bytes = held.iter().map(|m| m.len_bytes).sum();
        Ok((!held.is_empty()).then_some((held.len(), bytes)))
    }

    /// Whether this copy may become one of the leader's data dir, whose lineage is `theirs`
    /// (`docs/PROTOCOL.md`, *Lineage*): it may unless it holds files copied from another data
    /// dir (its recorded lineage is another) and was not told to adopt the leader's. Records the
    /// leader's lineage before any file changes, so a copy carries the lineage it is made from.
    fn take_lineage(&self, theirs: LineageId) -> Result<(), FollowError> {
        let ours = crate::lineage::read(self.dir)?;
        if ours == Some(theirs) {
            return Ok(());
        }
        if let Some(ours) = ours {
            let held = self.holds()?;
            if let (Some((files, bytes)), false) = (held, self.config.adopt) {
                return Err(FollowError::Session(SessionError::Declined(format!(
                    "the leader at {} serves another data dir (lineage {}) than the one the {} \
                     files ({bytes} bytes) in {} were copied from (lineage {}), and following it \
                     would replace them with its files: not following. Check the leader's \
                     address (and that clusters do not share a secret). If this copy is to \
                     become the leader's (its data dir lost .ferry/, or it was set up anew), \
                     pass --adopt (FollowConfig::adopt) or empty this directory",
                    self.config.leader,
                    crate::index::hex(&theirs),
                    files,
                    self.dir.root().display(),
                    crate::index::hex(&ours),
                ))));
            }
            if held.is_some() {
                tracing::warn!(
                    "adopting the data dir of the leader at {} (lineage {}): the files in {} \
                     were copied from another (lineage {}), and become copies of its files",
                    self.config.leader,
                    crate::index::hex(&theirs),
                    self.dir.root().display(),
                    crate::index::hex(&ours)
                );
            }
        }
        crate::lineage::write(self.dir, &theirs)?;
        if let Ok(mut st) = self.config.status.lock() {
            st.lineage = Some(crate::index::hex(&theirs));
        }
        Ok(())
    }

    async fn send_inventory(
        &mut self,
        index: Vec<(RelPath, Cut)>,
        instance: Option<InstanceId>,
        forks: ForkChain,
    ) -> Result<(HashMap<RelPath, u64>, Vec<RelPath>), FollowError> {
        let Some(mut cache) = self.cache.borrow_mut().take() else {
            return Err(io::Error::other("digest cache in use").into());
        };
        let dir = self.dir.clone();
        let record = self.held.record.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let hashing = tokio::task::spawn_blocking(move || {
            let cuts: HashMap<RelPath, Cut> = index.into_iter().collect();
            let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(instance) = instance {
                remember_chain(&dir, &record, instance, &forks);
            }
            let held = instance.map(|i| (&mut *record, i, &forks));
            let result = build_inventory(&dir, &mut cache, held, &cuts, |have| {
                // The receiver outlives this task unless the connection failed.
                let _ = tx.send(have);
            });
            (result, cache)
        });
        let mut lengths = HashMap::new();
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            for have in &batch {
                lengths.insert(have.path.clone(), have.len_bytes);
            }
            self.session.borrow_mut().inventory_part(batch);
            self.send_output();
        }
        let (result, cache) = hashing
            .await
            .map_err(|e| io::Error::other(format!("inventory task failed: {e}")))?;
        *self.cache.borrow_mut() = Some(cache);
        let cut = result?;
        self.session.borrow_mut().inventory_end();
        self.send_output();
        Ok((lengths, cut))
    }
}

/// A write into the data dir failed (`WriteFailed` names the file, else `path` is named): the
/// session ends with an ERROR telling the leader why, not as a mere network error.
fn write_error(e: io::Error, path: &RelPath) -> FollowError {
    if is_write_failure(&e) {
        FollowError::Session(SessionError::Io(e.to_string()))
    } else {
        FollowError::Session(disk_error("write", path, e))
    }
}

/// Keeps the fork chain the leader of `instance` named (`ToldChains`), for a fork of this dir
/// from that instance later (`docs/PROTOCOL.md`, *After failovers in a row*), with the chains
/// of the instances the held record still names.
fn remember_chain(dir: &DataDir, record: &HeldRecord, instance: InstanceId, forks: &ForkChain) {
    if !forks.is_fork() {
        return;
    }
    // Built only if the file is written again (a chain it did not have), not at every inventory.
    let named = std::cell::OnceCell::new();
    let keep = |i: &InstanceId| named.get_or_init(|| record.instances()).contains(i);
    if let Err(e) = ToldChains::remember(dir, instance, forks, keep) {
        tracing::warn!(
            "cannot keep the leader's fork chain ({}): {e}; if this dir leads next, its \
             followers hash the files they recorded under its earlier instances",
            forks.describe()
        );
    }
}

/// Scans the data dir and passes each file's HAVE entry to `emit` as soon as it is known:
/// held, when `held` (the record, the leader's instance and what that instance goes on from)
/// vouches for the file as it is now and the leader would accept that (`Cut::admits_held`),
/// else by its digest; then saves the cache. Returns the files it cut to what the record
/// vouches for (`HeldRecord::cut_to_claim`) before reporting them held.
fn build_inventory(
    dir: &DataDir,
    cache: &mut DigestCache,
    mut held: Option<(&mut HeldRecord, InstanceId, &ForkChain)>,
    cuts: &HashMap<RelPath, Cut>,
    mut emit: impl FnMut(HaveEntry),
) -> io::Result<Vec<RelPath>> {
    let hashed_before = cache.hashed_bytes();
    let (mut files, mut held_files, mut born_since) = (0u64, 0u64, 0u64);
    let mut held_by_own_record = 0u64;
    // Files cut, and the bytes cut off them: [to a length at a MARK, by the own record].
    let (mut cut_files, mut cuts_by, mut cut_bytes_by) = (Vec::new(), [0u64; 2], [0u64; 2]);
    let metas = scan(dir)?;
    let mut progress = crate::index::HashProgress::new(Some(metas.len()), Instant::now());
    for meta in metas {
        let hashed_so_far = cache.hashed_bytes();
        files += 1;
        let mut len_bytes = meta.len_bytes;
        let proof = match cuts.get(&meta.path) {
            None => HaveProof::Digest([0; crate::frame::DIGEST_BYTES]),
            Some(cut) => {
                let vouched = held.as_ref().and_then(|(record, instance, forks)| {
                    let vouching = (instance, *forks);
                    record.held_at(&meta.path, vouching, &Stamp::of_meta(&meta))
                });
                let admitted = vouched.filter(|c| cut.admits_held(c.len_bytes, c.position));
                // A copy longer than what vouches for it is cut to that first.
                let cut_off = admitted.and_then(|copy| {
                    let (record, _, _) = held.as_mut()?;
                    record.cut_to_claim(dir, &meta.path, meta.len_bytes, copy)
                });
                match admitted.zip(cut_off) {
                    Some((copy, cut_off)) => {
                        held_files += 1;
                        held_by_own_record += u64::from(copy.by_own_record);
                        if cut_off > 0 {
                            cuts_by[usize::from(copy.by_own_record)] += 1;
                            cut_bytes_by[usize::from(copy.by_own_record)] += cut_off;
                            cut_files.push(meta.path.clone());
                        }
                        len_bytes = copy.len_bytes;
                        HaveProof::Held {
                            position: copy.position,
                        }
                    }
                    None => {
                        // Held, but the leader's copy began anew since (or is shorter).
                        born_since += u64::from(vouched.is_some() && admitted.is_none());
                        let prefix_bytes = meta.len_bytes.min(cut.len_bytes);
                        HaveProof::Digest(cache.digest_prefix(dir, &meta, prefix_bytes)?)
                    }
                }
            }
        };
        emit(HaveEntry {
            path: meta.path,
            len_bytes,
            proof,
        });
        let hashed = cache.hashed_bytes() - hashed_so_far;
        if let Some(line) = progress.looked_at(Instant::now(), hashed) {
            tracing::info!(
                "inventory: {line}; a file changed since its digest was taken is hashed, here \
                 and on the leader"
            );
        }
    }
    let by_own_record = if held_by_own_record > 0 {
        format!(" ({held_by_own_record} by its own record as leader)")
    } else {
        String::new()
    };
    tracing::info!(
        "inventory: {files} files, {held_files} held as this dir recorded them{by_own_record}, \
         {} bytes hashed ({born_since} files held but changed on the leader since, so hashed)",
        cache.hashed_bytes() - hashed_before
    );
    cache.retain(|p| cuts.contains_key(p));
    if let Err(e) = cache.save(dir) {
        tracing::warn!("cannot save the digest cache: {e}");
    }
    if let Some((record, _, _)) = &mut held {
        record.retain(|p| cuts.contains_key(p));
    }
    if cuts_by[0] > 0 {
        tracing::info!(
            "inventory: cut {} files to their lengths at the MARKs this dir recorded them \
             after, under an instance the leader's goes on from ({} bytes past them: what that \
             instance's leader sent after those MARKs, which this leader may never have had); \
             the leader sends what it holds past them",
            cuts_by[0],
            cut_bytes_by[0]
        );
    }
    if cuts_by[1] > 0 {
        tracing::info!(
            "inventory: cut {} files to the lengths this dir's own leader's record vouches for \
             ({} bytes past them: preallocated, or never recorded by its catalog); the leader \
             sends what it holds past them",
            cuts_by[1],
            cut_bytes_by[1]
        );
    }
    Ok(cut_files)
}

/// The connection's side of the held record: which files changed since it was last written,
/// and when to write it again.
struct Held {
    record: Arc<Mutex<HeldRecord>>,
    /// The leader's, when `HELD` is in use; nothing is recorded without it.
    instance: Option<InstanceId>,
    /// The leader's index, with each file's length in it: every file in it is as the leader's
    /// once the initial sync is done, and one no frame changed is that long (the leader sends
    /// a copy of another length what it lacks, or cuts it).
    index: Vec<(RelPath, u64)>,
    /// Files written, replaced, truncated or deleted since the record last looked at them.
    touched: HashMap<RelPath, Touched>,
    /// Files changed since the last MARK: their length is marked again at the next.
    since_mark: Vec<RelPath>,
    /// The last MARK this connection applied.
    mark_last: Option<u64>,
    recorded_at: Instant,
    /// The record being updated on a blocking thread.
    recording: Option<tokio::task::JoinHandle<()>>,
    /// What the held record keeps as each copy's birth: read by the recording thread after it
    /// looks at a file (`Births`).
    births: Arc<Mutex<Births>>,
}

impl Held {
    fn new(record: Arc<Mutex<HeldRecord>>) -> Held {
        Held {
            record,
            instance: None,
            index: Vec::new(),
            touched: HashMap::new(),
            since_mark: Vec::new(),
            mark_last: None,
            recorded_at: Instant::now(),
            recording: None,
            births: Arc::default(),
        }
    }

    fn births_before(&mut self, action: &FollowerAction, born_in_use: bool) {
        let mut births = self.births.lock().unwrap_or_else(|p| p.into_inner());
        births.before(action, born_in_use);
    }

    /// `path` is about to change: its length becomes `len_after(its length now)` (a DATA's end
    /// or more, a TRUNCATE's or COMMIT_WHOLE's length, 0 for a DELETE), and the record is to
    /// look at it with its length at the last MARK. `before`: its length now, or a lower bound
    /// on it, for a file not changed since the record last looked (a DATA's offset; 0 where
    /// the change does not tell). Only files changed since the record last looked are kept.
    fn changed(&mut self, path: &RelPath, before: u64, len_after: impl FnOnce(u64) -> u64) {
        if self.instance.is_none() {
            return;
        }
        match self.touched.get_mut(path) {
            Some(touched) => {
                touched.now = len_after(touched.now);
                if touched.since_mark {
                    return;
                }
                touched.since_mark = true;
            }
            // Unchanged since the record last looked: as long at the last MARK as before this.
            None => {
                let touched = Touched {
                    at_mark: before,
                    now: len_after(before),
                    since_mark: true,
                };
                self.touched.insert(path.clone(), touched);
            }
        }
        self.since_mark.push(path.clone());
    }

    /// Every frame before a MARK at `position` has been applied. Records the files changed since
    /// the last time, at most every `HELD_CHECKPOINT_INTERVAL_MS`, and every file in the index
    /// when the MARK ends the initial sync, each with its length now (its marked length).
    fn on_mark(&mut self, dir: &Arc<DataDir>, position: u64, sync_done: bool) {
        if self.instance.is_none() {
            return;
        }
        self.marked(position, sync_done);
        let busy = self.recording.as_ref().is_some_and(|t| !t.is_finished());
        let due = sync_done
            || self.recorded_at.elapsed() >= Duration::from_millis(HELD_CHECKPOINT_INTERVAL_MS);
        if busy || !due || self.touched.is_empty() {
            return;
        }
        self.recorded_at = Instant::now();
        self.recording = self.start_recording(dir);
    }

    /// `on_mark`'s bookkeeping: each file changed since the last MARK is marked with its length
    /// now, and at the end of the initial sync every file of the index is to be recorded.
    fn marked(&mut self, position: u64, sync_done: bool) {
        self.mark_last = Some(position);
        for path in self.since_mark.drain(..) {
            if let Some(touched) = self.touched.get_mut(&path) {
                touched.at_mark = touched.now;
                touched.since_mark = false;
            }
        }
        if sync_done {
            for (path, len) in std::mem::take(&mut self.index) {
                let touched = Touched {
                    at_mark: len,
                    now: len,
                    since_mark: false,
                };
                self.touched.entry(path).or_insert(touched);
            }
        }
    }

    /// The files to record at the last MARK, each with its length then; none are left to.
    /// Taken as they are, for the recording thread to collect (one list of them at a time).
    fn take_marked(&mut self) -> impl Iterator<Item = (RelPath, u64)> + Send + 'static {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|(path, touched)| (path, touched.at_mark))
    }

    fn start_recording(&mut self, dir: &Arc<DataDir>) -> Option<tokio::task::JoinHandle<()>> {
        let (instance, position) = (self.instance?, self.mark_last?);
        let marked = self.take_marked();
        let (dir, record, births) = (dir.clone(), self.record.clone(), self.births.clone());
        Some(tokio::task::spawn_blocking(move || {
            let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
            let born_at = |p: &RelPath| {
                let births = births.lock().unwrap_or_else(|p| p.into_inner());
                births.get(p)
            };
            record.record(&dir, (instance, position), marked, born_at);
            record.save_or_warn(&dir);
        }))
    }

    /// The connection ended: records what changed since the last time (after its last MARK,
    /// each file with its length then: what the connection applied after it is not part of
    /// the copy as of that MARK).
    async fn finish(&mut self, dir: &Arc<DataDir>) {
        if let Some(task) = self.recording.take() {
            let _ = task.await;
        }
        if self.touched.is_empty() {
            return;
        }
        if let Some(task) = self.start_recording(dir) {
            let _ = task.await;
        }
    }
}

/// A file changed since the held record last looked at it.
struct Touched {
    /// Its length when the last MARK was applied (`Held::mark_last`): the marked length a look
    /// records it with (`docs/PROTOCOL.md`, *Held records*).
    at_mark: u64,
    /// Its length after the frames applied so far (a lower bound where `before` was one).
    now: u64,
    /// Changed since that MARK: `at_mark` is taken again at the next.
    since_mark: bool,
}

/// Makes one round's dirty set durable, on a blocking thread.
async fn sync_round(dir: Arc<DataDir>, round: Dirty) -> io::Result<()> {
    if round.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || round.sync(&dir))
        .await
        .map_err(|e| io::Error::other(format!("sync task failed: {e}")))?
        .map_err(|e| io::Error::new(e.kind(), format!("syncing the data dir failed: {e}")))
}

/// Batches syncs: each round syncs everything written so far, then acks.
async fn sync_loop(
    dir: Arc<DataDir>,
    session: Rc<RefCell<FollowerSession>>,
    dirty: Rc<RefCell<Dirty>>,
    wake: Rc<Notify>,
    outbox: Rc<Outbox>,
) {
    let mut failed: Option<Dirty> = None;
    loop {
        wake.notified().await;
        loop {
            // The watermark and the dirty set are read together (no await between): the round
            // makes durable exactly what was written up to `written`.
            let [_, written, synced] = session.borrow().watermarks();
            if written <= synced {
                break;
            }
            let mut round = dirty.borrow_mut().take();
            if let Some(earlier) = failed.take() {
                round.merge(earlier);
            }
            if let Err(e) = sync_round(dir.clone(), round.clone()).await {
                tracing::error!("{e}; acks at the synced level stop until it succeeds");
                failed = Some(round);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let mut s = session.borrow_mut();
            s.synced(written);
            s.poll_ack();
            if outbox.send(s.take_output()).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Kept;
    use crate::frame::Fork;

    /// What the held record is told a copy held at a MARK: its length when that MARK was
    /// applied, not after the frames applied since (the look comes later, on another thread);
    /// a file no frame changed, at the initial sync's end, with its length in the index; a file
    /// first changed after the last MARK (a DATA, at its offset), with its length before; a
    /// file deleted, with none. Nothing is kept of a file once recorded.
    #[test]
    fn the_held_record_is_given_each_copys_length_at_the_mark() {
        let mut held = Held::new(Arc::default());
        held.instance = Some([1; 16]);
        let [seg, idle, late] = ["seg", "idle", "late"].map(|n| RelPath::new(n).unwrap());
        held.index = vec![(seg.clone(), 100), (idle.clone(), 7), (late.clone(), 80)];
        // DATA frames: offset, then what the copy grows to.
        let data = |held: &mut Held, offset: u64, end: u64| {
            held.changed(&seg, offset, |len| len.max(end));
        };
        data(&mut held, 100, 150);
        held.marked(10, false);
        data(&mut held, 150, 200);
        held.marked(11, true);
        data(&mut held, 200, 300);
        held.changed(&late, 0, |_| 50);
        let mut marked: Vec<_> = held.take_marked().collect();
        marked.sort();
        assert_eq!(marked, [(idle.clone(), 7), (late, 80), (seg.clone(), 200)]);
        held.marked(12, false);
        assert_eq!(
            held.take_marked().collect::<Vec<_>>(),
            [],
            "nothing changed since the last take"
        );
        data(&mut held, 300, 310);
        held.changed(&idle, 0, |_| 0);
        held.marked(13, false);
        let mut marked: Vec<_> = held.take_marked().collect();
        marked.sort();
        assert_eq!(
            marked,
            [(idle, 0), (seg.clone(), 310)],
            "deleted: looked at, gone"
        );
        // The connection ends after a DATA past its last MARK.
        data(&mut held, 310, 400);
        assert_eq!(held.take_marked().collect::<Vec<_>>(), [(seg, 310)]);
        assert!(held.touched.is_empty(), "nothing kept once recorded");
    }

    /// A copy recorded under an instance the leader's goes on from, with bytes applied after
    /// the MARK it was recorded after (what the dead leader sent past the new leader's fork),
    /// is cut to its length at that MARK and reported held with it, and an inventory again
    /// still holds the cut copy.
    #[test]
    fn a_copy_held_under_a_fork_is_cut_to_its_length_at_the_mark() {
        let (tmp, dir) = crate::paths::temp_data_dir();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let (dead, new) = ([1u8; 16], [2u8; 16]);
        let mut record = HeldRecord::load(&dir);
        record.record(&dir, (dead, 400), [(seg.clone(), 6)], |_| Some(3));
        let forks = ForkChain::of([Fork {
            from: dead,
            position: 500,
        }])
        .unwrap();
        // The new leader's copy: its own application wrote past what it had of the dead one's.
        let (mut cache, cuts) =
            cut_to_six_and_held_twice(&tmp, &dir, (&mut record, &forks), 12, 400);
        // Saved as cut: a process started later holds it too.
        record.save(&dir).unwrap();
        let mut haves = Vec::new();
        let held = Some((&mut HeldRecord::load(&dir), new, &forks));
        build_inventory(&dir, &mut cache, held, &cuts, |h| haves.push(h)).unwrap();
        assert_eq!(haves[0].proof, HaveProof::Held { position: 400 });
    }

    /// Two inventories of `dir` for a leader of instance `[2; 16]` going on from `forks`, whose
    /// copy of `seg` is `leaders_len` bytes long, born at 3: each reports `seg` held at
    /// `position` with its first 6 bytes, the first one after cutting the copy to them, and
    /// nothing is hashed. The digest cache and the leader's index, for more.
    fn cut_to_six_and_held_twice(
        tmp: &tempfile::TempDir,
        dir: &DataDir,
        (record, forks): (&mut HeldRecord, &ForkChain),
        leaders_len: u64,
        position: u64,
    ) -> (DigestCache, HashMap<RelPath, Cut>) {
        let seg = RelPath::new("seg").unwrap();
        let leaders = Cut {
            len_bytes: leaders_len,
            born_at: Some(3),
        };
        let cuts = HashMap::from([(seg.clone(), leaders)]);
        let mut cache = DigestCache::load(dir);
        for round in 0..2 {
            let mut haves = Vec::new();
            let held = Some((&mut *record, [2u8; 16], forks));
            let cut = build_inventory(dir, &mut cache, held, &cuts, |h| haves.push(h)).unwrap();
            let have = HaveEntry {
                path: seg.clone(),
                len_bytes: 6,
                proof: HaveProof::Held { position },
            };
            assert_eq!(haves, [have], "round {round}");
            assert_eq!(cut.len(), usize::from(round == 0), "round {round}");
        }
        assert_eq!(std::fs::read(tmp.path().join("seg")).unwrap(), b"012345");
        assert_eq!(cache.hashed_bytes(), 0);
        (cache, cuts)
    }

    /// A dead leader's dir cuts a copy longer than its own record's length to that length and
    /// reports it held with it; an inventory again in the same process (the connection dropped
    /// before the initial sync ended) still holds the cut copy, as the record vouches for it.
    #[test]
    fn a_copy_cut_to_its_own_records_length_stays_held_at_the_next_inventory() {
        let (tmp, dir) = crate::paths::temp_data_dir();
        std::fs::write(tmp.path().join("seg"), b"012345\0\0\0\0").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let stamp = Stamp::look(&dir, &seg).unwrap().unwrap();
        let led = [1u8; 16];
        let kept = Kept {
            born_at: 3,
            len_bytes: 6,
        };
        let settled = crate::leader_record::settled_by_now_ns();
        let at = (1 << 40, 500);
        let own = (&led, &ForkChain::none());
        crate::leader_record::save_files(&dir, own, at, settled, [(&seg, kept, stamp)]).unwrap();
        let mut record = HeldRecord::load_with_own_record(&dir);
        let forks = ForkChain::of([Fork {
            from: led,
            position: 500,
        }])
        .unwrap();
        // The new leader's copy grew past the record's length since.
        cut_to_six_and_held_twice(&tmp, &dir, (&mut record, &forks), 9, 500);
    }
}
