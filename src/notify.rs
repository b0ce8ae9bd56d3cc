//! systemd's notify protocol, for `Type=notify` units: `READY=1` once serving, `WATCHDOG=1`
//! while healthy, `STATUS=...` for `systemctl status`. A datagram to `$NOTIFY_SOCKET`; nothing
//! at all when that is unset (not under systemd).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        // WATCHDOG_PID, when set, names the process the watchdog is for.
        let for_us = match std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        {
            Some(pid) => pid == std::process::id(),
            None => true,
        };
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    fn send(&self, message: &str) -> io::Result<()> {
        if let Some((socket, addr)) = &self.socket {
            socket.send_to_addr(message.as_bytes(), addr)?;
        }
        Ok(())
    }

    pub fn ready(&self, status: &str) {
        if let Err(e) = self.send(&format!("READY=1\nSTATUS={status}")) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    pub fn status(&self, status: &str) {
        let _ = self.send(&format!("STATUS={status}"));
    }

    /// How often `watchdog()` must be called (half systemd's `WatchdogSec`), if asked for.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// How often a notifying loop turns: every `watchdog_interval`, and at least every 500 ms
    /// so that `STATUS=` stays current without a watchdog.
    pub fn tick(&self) -> Duration {
        let most = Duration::from_millis(500);
        self.watchdog_interval().map_or(most, |w| w.min(most))
    }

    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            let _ = self.send("WATCHDOG=1");
        }
    }
}

/// What a leader tells `systemctl status` of its followers.
pub fn followers_status(leader: &crate::leader::Leader) -> String {
    use crate::lag::FollowerState;
    let followers = leader.followers();
    let lagging = followers
        .iter()
        .filter(|f| f.lag.state == FollowerState::Lagging)
        .count();
    let connected = followers
        .iter()
        .filter(|f| f.lag.state != FollowerState::Disconnected)
        .count();
    format!("{connected} followers, {lagging} lagging")
}
