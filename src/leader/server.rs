//! The server thread: listening, accepting, and logging each follower's state changes.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{EngineKind, Listener};
use crate::frame::{Durability, LineageId};
use crate::index::DigestCache;
use crate::lag::FollowerState;
use crate::paths::{DataDir, ROOT_CHECK_INTERVAL};

use super::connection::{serve_follower, ConnCtx};
use super::hub::Shared;
use super::LeaderConfig;

pub(super) async fn serve(
    engine: EngineKind,
    config: LeaderConfig,
    shared: Arc<Shared>,
    dir: Arc<DataDir>,
    ready: std::sync::mpsc::Sender<io::Result<(SocketAddr, String)>>,
    (instance, lineage): (super::Instance, LineageId),
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
    let root_watched_here = !config.change_source_flushes;
    let root = dir.clone();
    // The accept loop is never cancelled while serving: an io_uring accept dropped mid-flight
    // would lose the connection it completes with.
    let accept_loop = accept_loop(
        listener,
        config,
        shared.clone(),
        dir,
        digests,
        (instance, lineage),
    );
    tokio::select! {
        _ = accept_loop => {}
        _ = log_state_changes(&shared) => {}
        _ = stopping(&shared) => {}
        _ = watch_root(&shared, &root), if root_watched_here => {}
    }
}

/// Looks every `ROOT_CHECK_INTERVAL` at what the data dir's path names (`DataDir::check_root`),
/// for a leader no watcher feeds (the watcher looks itself). Moved away, deleted, unmounted or
/// mounted over, the path no longer leads to the directory this leader reads, and the
/// application's files written there would reach no follower while they looked in sync. Returns
/// once that happened and the leader stopped serving, saying why (`Leader::failure`).
async fn watch_root(shared: &Shared, dir: &DataDir) {
    loop {
        tokio::time::sleep(ROOT_CHECK_INTERVAL).await;
        if let Err(e) = dir.check_root() {
            let why = format!("the leader's data dir: {e}");
            tracing::error!("{why}: stopped serving");
            shared.fail(why);
            return;
        }
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
pub(super) fn pacing_hint(congestion: &str, default_qdisc: Option<&str>) -> Option<String> {
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
/// Over about how long the lagging line measures the server thread's wait for a CPU.
const CPU_WAIT_WINDOW: Duration = Duration::from_secs(1);
/// The share of that window from which the lagging line names the wait: a thread that shares
/// its CPUs with others waits a few percent of the time anyway.
const CPU_WAIT_NOTE_PERCENT: u128 = 10;

/// The server thread's wait for a CPU (`schedstat`) as the state log samples it, over the last
/// `CPU_WAIT_WINDOW` or so: while it waits, every follower's payloads and acks do, so a
/// follower that lags then may be lagging for want of a CPU on the leader, not of network.
#[derive(Default)]
struct CpuWaitSamples {
    samples: VecDeque<(Instant, Duration)>,
}

impl CpuWaitSamples {
    /// The thread had waited `waited` in all at `at`.
    fn push(&mut self, at: Instant, waited: Duration) {
        self.samples.push_back((at, waited));
        // The oldest kept is the newest at least CPU_WAIT_WINDOW before `at`.
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= CPU_WAIT_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// What the lagging line adds: how much of the span sampled the thread waited, if that is
    /// at least `CPU_WAIT_NOTE_PERCENT` of it.
    fn note(&self) -> Option<String> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.0.saturating_duration_since(first.0);
        if span < STATE_LOG_INTERVAL {
            return None;
        }
        let waited = last.1.saturating_sub(first.1);
        let percent = waited.as_micros() * 100 / span.as_micros().max(1);
        (percent >= CPU_WAIT_NOTE_PERCENT).then(|| {
            format!(
                "; the leader's server thread waited {} ms of the last {} ms ({percent}%) for a \
                 CPU, and every follower's payloads and acks with it",
                waited.as_millis(),
                span.as_millis()
            )
        })
    }
}

/// Logs a line whenever a follower starts or stops lagging (or finishes its initial sync): what
/// an operator acts on. Computed here rather than in the sessions, since a session blocked on a
/// full socket reports nothing.
async fn log_state_changes(shared: &Shared) {
    // The server thread's wait for a CPU (this one's), for the lagging line.
    let mut cpu_waits = CpuWaitSamples::default();
    loop {
        tokio::time::sleep(STATE_LOG_INTERVAL).await;
        if let Some(times) = shared.server_thread_times() {
            cpu_waits.push(Instant::now(), times.waiting);
        }
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
                     ack {}{}",
                    level.name(),
                    slot.view
                        .and_then(|v| v.last_ack_at)
                        .map(|t| format!("{} ms ago", now.saturating_duration_since(t).as_millis()))
                        .unwrap_or_else(|| "never".into()),
                    cpu_waits.note().unwrap_or_default()
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
    (instance, lineage): (super::Instance, LineageId),
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
            ack_timeout: config.ack_timeout,
            digests: digests.clone(),
            instance: instance.clone(),
            lineage,
        };
        tokio::task::spawn_local(async move {
            let conn = Rc::new(conn);
            let id = ctx.next_id();
            // "follower #N connected" once it authenticates: a TCP health check is no follower.
            tracing::debug!("connection #{id} from {peer}");
            match serve_follower(&ctx, id, peer, conn.clone()).await {
                Ok(true) => tracing::info!("follower #{id} ({peer}) disconnected"),
                Ok(false) => {
                    tracing::debug!("connection #{id} from {peer} closed before authenticating")
                }
                Err(e) if e.is_timed_out() => tracing::warn!(
                    "follower #{id} ({peer}): {e}: its host acknowledged nothing, or kept its \
                     window shut, for {} ms (FOLLOWER_UNACKED_TIMEOUT_MS): dropped",
                    crate::frame::FOLLOWER_UNACKED_TIMEOUT_MS
                ),
                Err(e) => tracing::warn!("follower #{id} ({peer}): {e}"),
            }
            conn.shutdown();
            ctx.unregister(id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lagging line says how much of the last second the server thread waited for a CPU
    /// when that is a good part of it (a machine short of CPUs delays every follower's payloads
    /// and acks), and nothing when it is not, or when there is no second to compare with.
    #[test]
    fn the_lagging_line_names_the_server_threads_wait_for_a_cpu_when_it_was_long() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let waited = |ms: u64| Duration::from_millis(ms);
        let mut samples = CpuWaitSamples::default();
        assert_eq!(samples.note(), None);
        samples.push(at(0), waited(100));
        assert_eq!(samples.note(), None);
        for (t, w) in [(250, 160), (500, 220), (750, 300), (1000, 400)] {
            samples.push(at(t), waited(w));
        }
        let note = samples.note().unwrap_or_default();
        assert!(
            note.contains("waited 300 ms of the last 1000 ms (30%) for a CPU"),
            "{note}"
        );
        // Older samples go: the next second is measured from 250 ms on.
        samples.push(at(1250), waited(410));
        assert!(
            samples
                .note()
                .unwrap_or_default()
                .contains("250 ms of the last 1000 ms"),
            "{:?}",
            samples.note()
        );
        // 5% is what a thread that shares its CPUs waits anyway: not worth a word.
        let mut calm = CpuWaitSamples::default();
        calm.push(at(0), waited(0));
        calm.push(at(1000), waited(50));
        assert_eq!(calm.note(), None);
    }

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
}
