//! `ferry lead`: a leader beside an unmodified program. The initial scan registers every file;
//! the inotify watcher turns later writes into appends, replacements and deletes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry::auth::Secret;
use ferry::engine::EngineKind;
use ferry::lag::FollowerState;
use ferry::leader::{LeaderConfig, WatchedLeader};

/// `ferry lead`'s settings beyond where and what to serve.
pub struct Settings {
    pub engine: Option<EngineKind>,
    pub ack_timeout_ms: u64,
    pub tcp_congestion: Option<String>,
    pub http: Option<SocketAddr>,
}

pub fn run(
    data_dir: PathBuf,
    listen: SocketAddr,
    secret: Secret,
    settings: Settings,
) -> anyhow::Result<()> {
    let Settings {
        engine,
        ack_timeout_ms,
        tcp_congestion,
        http,
    } = settings;
    let signals = block_termination_signals()?;
    let mut config = LeaderConfig::new(&data_dir, listen, secret);
    config.engine = engine;
    config.ack_timeout = Duration::from_millis(ack_timeout_ms);
    config.tcp_congestion = tcp_congestion;
    let watched = WatchedLeader::start(config)?;
    let leader = watched.leader.clone();
    let _http = match http {
        Some(addr) => {
            let leader = leader.clone();
            let server = ferry::http::HttpServer::start(addr, Arc::new(move || leader.status()))?;
            tracing::info!("metrics on http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    // The line tests and scripts wait for; it carries the actual port when ADDR had port 0.
    tracing::info!("listening on {}", leader.local_addr());
    let notifier = ferry::notify::Notifier::from_env();
    notifier.ready(&format!(
        "leading {} on {}",
        data_dir.display(),
        leader.local_addr()
    ));
    let tick = notifier
        .watchdog_interval()
        .map_or(Duration::from_millis(500), |w| {
            w.min(Duration::from_millis(500))
        });
    loop {
        if let Some(signal) = wait_signal(&signals, tick) {
            tracing::info!("signal {signal}: shutting down");
            notifier.status("shutting down");
            break;
        }
        // The leader itself logs each follower's state changes.
        notifier.watchdog();
        let followers = leader.followers();
        let lagging = followers
            .iter()
            .filter(|f| f.lag.state == FollowerState::Lagging)
            .count();
        let connected = followers
            .iter()
            .filter(|f| f.lag.state != FollowerState::Disconnected)
            .count();
        notifier.status(&format!("{connected} followers, {lagging} lagging"));
    }
    drop(_http);
    drop(leader);
    watched.stop();
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), so they can be
/// waited for with sigtimedwait instead of killing the process mid-write.
fn block_termination_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write into it and
    // into this thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; a null siginfo pointer is allowed.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (signal > 0).then_some(signal)
}
