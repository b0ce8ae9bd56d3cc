//! `ferry lead`: a leader beside an unmodified program. The initial scan registers every file;
//! the inotify watcher turns later writes into appends, replacements and deletes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry::engine::EngineKind;
use ferry::leader::{Leader, LeaderConfig, WatchedLeader};

use crate::signals::{block_signals, wait_signal};
use crate::SecretSource;

/// `ferry lead`'s settings beyond where and what to serve.
pub struct Settings {
    /// Where the secrets come from: read at start and again on SIGHUP.
    pub secrets: SecretSource,
    pub engine: Option<EngineKind>,
    pub ack_timeout_ms: u64,
    pub tcp_congestion: Option<String>,
    pub record_interval_ms: u64,
    pub http: Option<SocketAddr>,
}

pub fn run(data_dir: PathBuf, listen: SocketAddr, settings: Settings) -> anyhow::Result<()> {
    let Settings {
        secrets: source,
        engine,
        ack_timeout_ms,
        tcp_congestion,
        record_interval_ms,
        http,
    } = settings;
    let secrets = source.read()?;
    let signals = block_signals()?;
    // Serving a directory made here would be serving nothing: followers would delete their
    // copies to match (or decline to, if they hold files). The application makes its dir.
    if !data_dir.is_dir() {
        anyhow::bail!(
            "{} does not exist (or is not a directory): check --data-dir, and that its disk is \
             mounted",
            data_dir.display()
        );
    }
    let mut config = LeaderConfig::new(&data_dir, listen, secrets.current);
    config.previous_secret = secrets.previous;
    config.engine = engine;
    config.ack_timeout = Duration::from_millis(ack_timeout_ms);
    config.tcp_congestion = tcp_congestion;
    config.record_interval = Duration::from_millis(record_interval_ms);
    config.role = "ferry lead".to_string();
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
    let tick = notifier.tick();
    let failure = loop {
        if let Some(signal) = wait_signal(&signals, tick) {
            if signal == libc::SIGHUP {
                reload_secrets(&leader, &source);
                continue;
            }
            tracing::info!("signal {signal}: shutting down");
            notifier.status("shutting down");
            break None;
        }
        if let Some(why) = watched.failure() {
            notifier.status("stopping: the watcher stopped");
            break Some(why);
        }
        // The leader itself logs each follower's state changes.
        notifier.watchdog();
        notifier.status(&ferry::notify::followers_status(&leader));
    };
    drop(_http);
    drop(leader);
    watched.stop();
    match failure {
        // Serving on would pass part of the data dir off as all of it.
        Some(why) => anyhow::bail!("{why}: stopped serving"),
        None => Ok(()),
    }
}

/// SIGHUP: the secrets read again and given to the leader (a rotation with no restart: README,
/// Troubleshooting). A read that fails keeps the secrets held.
fn reload_secrets(leader: &Leader, source: &SecretSource) {
    match source.reread() {
        Ok(secrets) => {
            let changed = leader.set_secrets(secrets.clone());
            tracing::info!("SIGHUP: {}", secrets.reloaded(changed));
        }
        Err(e) => tracing::error!("SIGHUP: cannot read the secrets again: {e:#}; keeping them"),
    }
}
