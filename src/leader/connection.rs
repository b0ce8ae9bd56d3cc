//! One follower's connection: the task that drives its `LeaderSession`, the task that reads its
//! socket, and when the session looks at its inbox.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::auth::random_nonce;
use crate::catalog::{Catalog, ChangeList, FileChange};
use crate::engine::{Conn, FineTimer};
use crate::frame::{ErrorCode, Frame, LineageId, VANISHED_HOLD_TIMEOUT_MS};
use crate::index::{DigestCache, HashProgress};
use crate::lag::LagSnapshot;
use crate::paths::{DataDir, RelPath};
use crate::session::leader::{LeaderPhase, LeaderSession, Transmit};
use crate::session::SessionError;

use super::hub::{catalog_copy, Inbox, Shared, Slot};

/// Bytes read from a follower's socket per read.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Disconnected followers kept in `followers()` for the operator to see.
const DISCONNECTED_KEPT_MAX: usize = 16;
/// How often a connection refreshes its lag report when no ack arrived.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

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
/// Open files kept per connection for shipping payloads, where the limit of open files allows
/// (`kept_open`).
const OPEN_FILES_PER_CONNECTION_MAX: usize = 256;

pub(super) struct ConnCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) dir: Arc<DataDir>,
    pub(super) ack_timeout: Duration,
    /// The leader's digest cache; taken by a connection while it hashes (`None` meanwhile).
    pub(super) digests: Rc<std::cell::RefCell<Option<DigestCache>>>,
    pub(super) instance: super::Instance,
    pub(super) lineage: LineageId,
}

impl ConnCtx {
    /// A new connection's id, for its log lines from the start.
    pub(super) fn next_id(&self) -> u64 {
        let mut board = self.shared.board();
        let id = board.next_id;
        board.next_id += 1;
        id
    }

    /// An authenticating connection becomes a follower: its report slot and its inbox, which the
    /// writers fill from now on. Returns what wakes it.
    fn register(&self, id: u64, peer: SocketAddr) -> Arc<Notify> {
        let mut board = self.shared.board();
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
                files_renamed: 0,
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
        wake
    }

    fn set_sending(&self, id: u64, since: Option<Instant>) {
        if let Some(slot) = self.shared.board().slots.get_mut(&id) {
            slot.sending_since = since;
        }
    }

    pub(super) fn unregister(&self, id: u64) {
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
pub(super) enum ServeError {
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

impl ServeError {
    /// The kernel ended the connection: the follower's host left what was sent unacknowledged
    /// for `FOLLOWER_UNACKED_TIMEOUT_MS` (`engine::Conn::drop_when_unacked`).
    pub(super) fn is_timed_out(&self) -> bool {
        matches!(self, ServeError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
    }
}

/// Serves connection `id` from `peer`: its handshake, then, once it may authenticate, as a
/// follower. Its slot and inbox are made only then (`ConnCtx::register`): a connection that
/// says nothing, or never authenticates, is not listed, and the writers' changes are not
/// queued for it: before, each looked at its inbox as a follower does, and 500 of them cost a
/// leader 18x its CPU without them (`tools/idle-cost.sh`; README, Performance).
/// The caller unregisters `id` once this returns. Ok(false): the peer closed (or the leader
/// stopped) before it authenticated, which is not worth a line at `info` (a health check).
pub(super) async fn serve_follower(
    ctx: &ConnCtx,
    id: u64,
    peer: SocketAddr,
    conn: Rc<Conn>,
) -> Result<bool, ServeError> {
    let connected_at = Instant::now();
    let (secrets, secrets_seen) = ctx.shared.secrets();
    let mut session = LeaderSession::new(
        secrets.current,
        random_nonce()?,
        ctx.ack_timeout,
        ctx.instance.id,
        ctx.lineage,
    )
    .with_forks(ctx.instance.forks.clone())
    .with_previous_secret(secrets.previous);
    let (input_tx, mut input_rx) = mpsc::channel::<io::Result<Vec<u8>>>(4);
    let reader = tokio::task::spawn_local(read_loop(conn.clone(), input_tx));
    let result = match handshake(ctx, &conn, &mut session, &mut input_rx, connected_at).await {
        Ok(Some(input)) => {
            let wake = ctx.register(id, peer);
            let io = Io {
                conn: &conn,
                input_rx: &mut input_rx,
                input,
                peer,
                connected_at,
            };
            drive(ctx, id, io, (&mut session, secrets_seen), &wake)
                .await
                .map(|()| true)
        }
        Ok(None) => Ok(false),
        Err(e) => Err(e),
    };
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

/// The handshake, before the connection is anyone's follower: the session is fed with an
/// empty catalog until its input may authenticate it (`LeaderSession::may_authenticate`).
/// Returns that input, not yet fed; `None` when the peer closed first or the leader stops.
async fn handshake(
    ctx: &ConnCtx,
    conn: &Conn,
    session: &mut LeaderSession,
    input_rx: &mut mpsc::Receiver<io::Result<Vec<u8>>>,
    connected_at: Instant,
) -> Result<Option<Vec<u8>>, ServeError> {
    let nothing = Catalog::new([]);
    let deadline = tokio::time::Instant::from_std(
        connected_at + Duration::from_millis(crate::frame::HANDSHAKE_TIMEOUT_MS),
    );
    let mut input = Vec::new();
    // A peer that goes before it sent a byte (a TCP health check) may reset the connection as
    // our preamble reaches it: that is a close, not an error.
    let gone_silent = |e: &io::Error, session: &LeaderSession, input: &[u8]| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) && session.phase() == LeaderPhase::AwaitPreamble
            && input.is_empty()
    };
    loop {
        if session.has_output() {
            let (r, _) = conn.write_all(session.take_output()).await;
            match r {
                Err(e) if gone_silent(&e, session, &input) => return Ok(None),
                r => r?,
            }
        }
        if session.may_authenticate(&input) {
            return Ok(Some(input));
        }
        if !input.is_empty() {
            let n = session.handle_input(&input, &nothing, Instant::now())?;
            input.drain(..n);
            if n > 0 {
                continue;
            }
        }
        if ctx.shared.stopping.load(Ordering::SeqCst) {
            return Ok(None);
        }
        tokio::select! {
            chunk = input_rx.recv() => {
                if let Some(Err(e)) = &chunk {
                    if gone_silent(e, session, &input) {
                        return Ok(None);
                    }
                }
                let mut eof = false;
                take_input(chunk, &mut input, &mut eof)?;
                if eof {
                    return Ok(None);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                session.check_handshake_deadline(connected_at, Instant::now())?;
            }
            _ = ctx.shared.shutdown.notified() => {}
            // notify_waiters() wakes only tasks already waiting: re-check the flag now and
            // then (rarely: hundreds of strangers may be waiting here).
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A connection's socket as `drive` gets it from the handshake: the socket, its reader's
/// chunks, the input not yet fed to the session, and when the peer connected.
struct Io<'a> {
    conn: &'a Conn,
    input_rx: &'a mut mpsc::Receiver<io::Result<Vec<u8>>>,
    input: Vec<u8>,
    peer: SocketAddr,
    connected_at: Instant,
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
    io: Io<'_>,
    (session, mut secrets_seen): (&mut LeaderSession, u64),
    wake: &Notify,
) -> Result<(), ServeError> {
    let Io {
        conn,
        input_rx,
        mut input,
        peer,
        connected_at,
    } = io;
    let mut announced = false;
    let mut files = OpenFiles::new(OPEN_FILES_PER_CONNECTION_MAX);
    let mut eof = false;
    let mut reporter = Reporter::default();
    let mut sync_started: Option<Instant> = None;
    // How far hashing this follower's inventory has got (a long one says so as it goes).
    let mut hashing: Option<HashProgress> = None;
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
    let mut moves: Vec<crate::catalog::Move> = Vec::new();
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
        // The leader's secrets changed (a rotation) since the session last took them.
        if ctx.shared.secrets_changes.0.load(Ordering::SeqCst) != secrets_seen {
            let (secrets, seen) = ctx.shared.secrets();
            secrets_seen = seen;
            session.set_secrets(secrets.current, secrets.previous)?;
        }
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
                    inbox.changes.take_moves(&mut moves);
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
            let handshaking = matches!(
                session.phase(),
                LeaderPhase::AwaitPreamble | LeaderPhase::AwaitAuth | LeaderPhase::Closed
            );
            if !announced && !handshaking {
                announced = true;
                tracing::info!("follower #{id} connected from {peer}");
                if session.used_previous_secret() {
                    tracing::warn!(
                        "follower #{id} ({peer}) authenticated with the previous secret \
                         (--previous-secret-file, or PREFIX/secret-previous in etcd): give it \
                         the current one before the rotation ends"
                    );
                }
            }
        }
        // Before the changes they explain (`LeaderSession::note_moved`).
        for moved in moves.drain(..) {
            session.note_moved(moved);
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
            let progress = hashing
                .take()
                .unwrap_or_else(|| HashProgress::new(None, Instant::now()));
            let label = format!("follower #{id} ({peer})");
            let (results, progress) = hash_prefixes(ctx, requests, save, (progress, label)).await;
            hashing = Some(progress);
            session.digests_ready(results);
            if let (None, Some((_, planned))) = (sync_started, session.sync_progress()) {
                let r = session.inventory_report();
                tracing::info!(
                    "follower #{id}: initial sync started, {planned} bytes to send; its \
                     inventory: {} files held as it recorded them, {} held records refused \
                     (sent whole), {} files compared by digest",
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
                let kept = files.len();
                let opened = crate::paths::open_making_room(
                    kept,
                    || files.clear(),
                    || ctx.dir.open_read(&path),
                );
                match opened.and_then(|f| Ok((f.metadata()?.len(), f))) {
                    Ok((len, file)) => {
                        session.begin_whole(&path, len, &catalog);
                        files.insert(path, (generation, file));
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
type OpenFiles = crate::kept_open::KeptOpen<(u64, File)>;

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
        let kept = files.len();
        let opened =
            crate::paths::open_making_room(kept, || files.clear(), || ctx.dir.open_read(path));
        match opened {
            Ok(file) => files.insert(path.clone(), (generation, file)),
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
            slot.files_renamed = session.files_renamed_total();
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

/// Hashes the prefixes a follower's inventory asks for, off the runtime thread, saying how far
/// it has got when that takes long (`progress`, for the follower `label` names).
async fn hash_prefixes(
    ctx: &ConnCtx,
    requests: Vec<crate::session::leader::DigestRequest>,
    save: bool,
    (mut progress, label): (HashProgress, String),
) -> (Vec<(RelPath, Option<crate::frame::Digest>)>, HashProgress) {
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
                let hashed_so_far = cache.hashed_bytes();
                let digest = cache.digest_path_prefix(&dir, &r.path, r.len_bytes);
                if let Err(e) = &digest {
                    tracing::warn!("cannot hash {}: {e}", r.path);
                }
                let hashed = cache.hashed_bytes() - hashed_so_far;
                if let Some(line) = progress.looked_at(Instant::now(), hashed) {
                    tracing::info!(
                        "{label}: its inventory compared by digest: {line}; a file changed \
                         since its digest was taken is hashed, here and on the follower"
                    );
                }
                (r.path, digest.ok())
            })
            .collect();
        if save {
            if let Err(e) = cache.save(&dir) {
                tracing::warn!("cannot save the digest cache: {e}");
            }
        }
        (results, cache, progress)
    })
    .await;
    match joined {
        Ok((results, cache, progress)) => {
            *ctx.digests.borrow_mut() = Some(cache);
            (results, progress)
        }
        Err(e) => {
            // Every copy then compares as different, and is re-sent whole.
            tracing::error!("hashing task failed: {e}");
            *ctx.digests.borrow_mut() = Some(DigestCache::load(&ctx.dir));
            let results = paths.into_iter().map(|p| (p, None)).collect();
            (results, HashProgress::new(None, Instant::now()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
