//! Per-follower ack tracking on the leader: watermarks at each durability level, time since the
//! last ack, ack latency as an HDR histogram, and the follower's state.
//!
//! Time is a parameter (`now`), never read here, so the session tests drive it deterministically.
//! Memory is bounded: at most `MARKS_IN_FLIGHT_MAX` unacked marks are remembered for latency; when
//! a stalled follower exceeds that, the oldest are forgotten (their latency samples are lost, the
//! watermarks are not).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::frame::Durability;

/// Default deadline after which a follower with unacked marks is reported as lagging.
pub const ACK_TIMEOUT_MS_DEFAULT: u64 = 1000;
pub const MARKS_IN_FLIGHT_MAX: usize = 4096;
/// Ack latencies above this are clamped into the histogram's top bucket.
const LATENCY_US_MAX: u64 = 3_600_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerState {
    /// Authenticating or receiving the initial sync.
    Syncing,
    /// In sync and acking within the deadline.
    Streaming,
    /// Has unacked marks older than the ack deadline.
    Lagging,
    /// The connection is gone.
    Disconnected,
}

impl FollowerState {
    pub fn name(self) -> &'static str {
        match self {
            FollowerState::Syncing => "syncing",
            FollowerState::Streaming => "streaming",
            FollowerState::Lagging => "lagging",
            FollowerState::Disconnected => "disconnected",
        }
    }
}

/// What the leader knows of one follower at a moment, for `followers()` and `wait_for`.
#[derive(Debug, Clone)]
pub struct LagSnapshot {
    pub state: FollowerState,
    pub durability: Option<Durability>,
    /// Highest acked position at each level (index by `Durability::index()`).
    pub acked: [u64; 3],
    /// `leader_position - acked` at each level.
    pub lag_bytes: [u64; 3],
    pub since_last_ack_ms: Option<u64>,
    /// Lag in time: how long the oldest change not yet acked at the follower's level has
    /// waited (sent and unacked, or not yet sent); 0 when it holds everything.
    pub lag_ms: u64,
    pub ack_latency_p50_us: u64,
    pub ack_latency_p99_us: u64,
    pub ack_latency_p999_us: u64,
}

/// The inputs of a follower's state; see `LagTracker::view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagView {
    pub disconnected: bool,
    pub in_sync: bool,
    pub last_ack_at: Option<Instant>,
    pub oldest_unacked_mark_at: Option<Instant>,
    pub ack_timeout: Duration,
}

impl LagView {
    /// The state at `now`. `stalled_since`: since when the leader has had something for this
    /// follower that it could not get onto the wire (a full socket), if it has; it counts like
    /// an unacked MARK, so a follower that stops reading is lagging after the same deadline.
    pub fn state(&self, now: Instant, stalled_since: Option<Instant>) -> FollowerState {
        if self.disconnected {
            return FollowerState::Disconnected;
        }
        let late = |at: Option<Instant>| {
            at.is_some_and(|at| now.saturating_duration_since(at) > self.ack_timeout)
        };
        let overdue = late(self.oldest_unacked_mark_at) || late(stalled_since);
        match (self.in_sync, overdue) {
            (_, true) if self.in_sync || self.last_ack_at.is_some() => FollowerState::Lagging,
            (true, false) => FollowerState::Streaming,
            _ => FollowerState::Syncing,
        }
    }
}

#[derive(Debug)]
pub struct LagTracker {
    durability: Option<Durability>,
    acked: [u64; 3],
    last_ack_at: Option<Instant>,
    marks_unacked: VecDeque<(u64, Instant)>,
    latency_us: Histogram<u64>,
    sync_done_position: Option<u64>,
    in_sync: bool,
    disconnected: bool,
    ack_timeout: Duration,
}

impl LagTracker {
    pub fn new(ack_timeout: Duration) -> LagTracker {
        let latency_us = match Histogram::new_with_bounds(1, LATENCY_US_MAX, 3) {
            Ok(h) => h,
            Err(_) => unreachable!("constant histogram bounds are valid"),
        };
        LagTracker {
            durability: None,
            acked: [0; 3],
            last_ack_at: None,
            marks_unacked: VecDeque::new(),
            latency_us,
            sync_done_position: None,
            in_sync: false,
            disconnected: false,
            ack_timeout,
        }
    }

    /// The follower told us (in HAVE_END) at which level it acks.
    pub fn set_durability(&mut self, durability: Durability) {
        self.durability = Some(durability);
    }

    pub fn on_mark_sent(&mut self, position: u64, sync_done: bool, now: Instant) {
        if sync_done {
            self.sync_done_position = Some(position);
        }
        // A MARK at a position already acked gets no ACK of its own (the follower acks only
        // when its watermark advances): waiting for one would call an idle follower lagging.
        if self.durability.is_some() && position <= self.acked_at_own_level() && !sync_done {
            return;
        }
        if self.marks_unacked.len() == MARKS_IN_FLIGHT_MAX {
            self.marks_unacked.pop_front();
        }
        self.marks_unacked.push_back((position, now));
    }

    /// An ACK arrived (already validated by the session as monotonic and ordered).
    pub fn on_ack(&mut self, acked: [u64; 3], now: Instant) {
        self.acked = acked;
        self.last_ack_at = Some(now);
        let level = self.acked_at_own_level();
        while let Some(&(position, sent_at)) = self.marks_unacked.front() {
            if position > level {
                break;
            }
            let us = now.saturating_duration_since(sent_at).as_micros() as u64;
            // Samples are clamped into range, so recording cannot fail.
            let _ = self.latency_us.record(us.clamp(1, LATENCY_US_MAX));
            self.marks_unacked.pop_front();
        }
        if let Some(p) = self.sync_done_position {
            if level >= p {
                self.in_sync = true;
            }
        }
    }

    fn acked_at_own_level(&self) -> u64 {
        self.acked[self.durability.unwrap_or(Durability::Received).index()]
    }

    pub fn durability(&self) -> Option<Durability> {
        self.durability
    }

    pub fn on_disconnect(&mut self) {
        self.disconnected = true;
    }

    pub fn acked(&self) -> [u64; 3] {
        self.acked
    }

    pub fn state(&self, now: Instant) -> FollowerState {
        self.view().state(now, None)
    }

    /// What the state depends on, small and `Copy`, for reports computed later than the
    /// tracker's own updates (a connection blocked on a full socket does not update it).
    pub fn view(&self) -> LagView {
        LagView {
            disconnected: self.disconnected,
            in_sync: self.in_sync,
            last_ack_at: self.last_ack_at,
            oldest_unacked_mark_at: self.marks_unacked.front().map(|&(_, at)| at),
            ack_timeout: self.ack_timeout,
        }
    }

    pub fn snapshot(&self, leader_position: u64, now: Instant) -> LagSnapshot {
        let q = |f: f64| self.latency_us.value_at_quantile(f);
        self.snapshot_with(leader_position, now, [q(0.5), q(0.99), q(0.999)])
    }

    /// `snapshot`, with the ack latency quantiles copied from `previous` instead of computed:
    /// each one walks the histogram, which costs more than the rest of a report made on every
    /// ack.
    pub fn snapshot_reusing_quantiles(
        &self,
        leader_position: u64,
        now: Instant,
        previous: &LagSnapshot,
    ) -> LagSnapshot {
        let quantiles = [
            previous.ack_latency_p50_us,
            previous.ack_latency_p99_us,
            previous.ack_latency_p999_us,
        ];
        self.snapshot_with(leader_position, now, quantiles)
    }

    fn snapshot_with(
        &self,
        leader_position: u64,
        now: Instant,
        quantiles_us: [u64; 3],
    ) -> LagSnapshot {
        let [p50, p99, p999] = quantiles_us;
        LagSnapshot {
            state: self.state(now),
            durability: self.durability,
            acked: self.acked,
            lag_bytes: self.acked.map(|a| leader_position.saturating_sub(a)),
            lag_ms: self.marks_unacked.front().map_or(0, |&(_, at)| {
                now.saturating_duration_since(at).as_millis() as u64
            }),
            since_last_ack_ms: self
                .last_ack_at
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            ack_latency_p50_us: p50,
            ack_latency_p99_us: p99,
            ack_latency_p999_us: p999,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_that_stops_acking_is_lagging_after_the_deadline_then_recovers() {
        let t0 = Instant::now();
        let mut lag = LagTracker::new(Duration::from_millis(ACK_TIMEOUT_MS_DEFAULT));
        lag.set_durability(Durability::Synced);
        lag.on_mark_sent(100, true, t0);
        assert_eq!(lag.state(t0), FollowerState::Syncing);
        lag.on_ack([100, 100, 100], t0 + Duration::from_millis(3));
        assert_eq!(lag.state(t0), FollowerState::Streaming);
        let snap = lag.snapshot(100, t0 + Duration::from_millis(3));
        assert_eq!(snap.lag_bytes, [0, 0, 0]);
        assert!((2900..=3100).contains(&snap.ack_latency_p50_us), "{snap:?}");

        let t1 = t0 + Duration::from_secs(1);
        lag.on_mark_sent(200, false, t1);
        assert_eq!(
            lag.state(t1 + Duration::from_millis(999)),
            FollowerState::Streaming
        );
        assert_eq!(
            lag.state(t1 + Duration::from_millis(1001)),
            FollowerState::Lagging
        );
        // Received and written are not enough for a follower that acks at `synced`.
        lag.on_ack([200, 200, 100], t1 + Duration::from_millis(1002));
        assert_eq!(
            lag.state(t1 + Duration::from_millis(1003)),
            FollowerState::Lagging
        );
        assert_eq!(lag.snapshot(200, t1).lag_bytes, [0, 0, 100]);
        lag.on_ack([200, 200, 200], t1 + Duration::from_millis(1004));
        assert_eq!(
            lag.state(t1 + Duration::from_millis(1005)),
            FollowerState::Streaming
        );
        lag.on_disconnect();
        assert_eq!(lag.state(t1), FollowerState::Disconnected);
    }

    #[test]
    fn a_mark_at_a_position_already_acked_is_not_waited_for() {
        let t0 = Instant::now();
        let mut lag = LagTracker::new(Duration::from_millis(ACK_TIMEOUT_MS_DEFAULT));
        lag.set_durability(Durability::Written);
        lag.on_mark_sent(100, true, t0);
        lag.on_ack([100, 100, 0], t0);
        // Nothing new since: the follower will not ack this MARK, and need not.
        lag.on_mark_sent(100, false, t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(lag.state(later), FollowerState::Streaming);
        assert_eq!(lag.snapshot(100, later).lag_ms, 0);
    }

    #[test]
    fn unacked_marks_are_bounded() {
        let t0 = Instant::now();
        let mut lag = LagTracker::new(Duration::from_secs(1));
        for i in 0..(MARKS_IN_FLIGHT_MAX as u64 * 2) {
            lag.on_mark_sent(i, false, t0);
        }
        assert_eq!(lag.marks_unacked.len(), MARKS_IN_FLIGHT_MAX);
    }

    #[test]
    fn a_snapshot_reusing_quantiles_has_fresh_watermarks_and_the_earlier_latencies() {
        let t0 = Instant::now();
        let mut lag = LagTracker::new(Duration::from_millis(ACK_TIMEOUT_MS_DEFAULT));
        lag.set_durability(Durability::Written);
        lag.on_mark_sent(100, false, t0);
        lag.on_ack([100, 100, 0], t0 + Duration::from_millis(3));
        let first = lag.snapshot(300, t0 + Duration::from_millis(3));
        lag.on_mark_sent(200, false, t0 + Duration::from_millis(10));
        lag.on_ack([200, 200, 0], t0 + Duration::from_millis(60));
        let now = t0 + Duration::from_millis(60);
        let quick = lag.snapshot_reusing_quantiles(300, now, &first);
        assert_eq!(quick.acked, [200, 200, 0]);
        assert_eq!(quick.lag_bytes, [100, 100, 300]);
        assert_eq!(quick.since_last_ack_ms, Some(0));
        assert_eq!(quick.ack_latency_p99_us, first.ack_latency_p99_us);
        // A full snapshot counts the 50 ms ack.
        assert!(lag.snapshot(300, now).ack_latency_p99_us >= 49_000);
    }
}
