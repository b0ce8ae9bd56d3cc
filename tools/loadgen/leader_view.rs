//! What loadgen reads of the leader it drives, whichever it is: the embedded one through the
//! library API, or `ferry lead` (write mode, a process of its own) through its `--http`
//! endpoint, as an operator's scraper would. Both give the leader's position, each connected
//! follower's lag, and a wait for every follower to ack a position: the sampler, the fault
//! windows and the convergence time use them alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::frame::Durability;
use ferry::leader::Leader;
use ferry::status::{parse_prometheus, Sample};

/// How often a wait on `ferry lead` asks it again.
const LEAD_POLL_INTERVAL: Duration = Duration::from_millis(10);

pub enum LeaderView {
    Embedded(Arc<Leader>),
    /// `ferry lead`'s `--http` address (`127.0.0.1:PORT`).
    Lead(String),
}

/// One look at `ferry lead`'s `/metrics`.
#[derive(Debug, PartialEq)]
struct LeadFigures {
    position_bytes: u64,
    /// `(peer port, lag_bytes, acked_position)` at the run's durability of each follower
    /// connected now, in the order of their ids.
    followers: Vec<(Option<u16>, u64, u64)>,
}

impl LeaderView {
    /// The leader's position; `None` when `ferry lead` does not answer.
    pub fn position(&self) -> Option<u64> {
        match self {
            LeaderView::Embedded(leader) => Some(leader.position()),
            LeaderView::Lead(http) => {
                lead_figures(http, Durability::Written).map(|f| f.position_bytes)
            }
        }
    }

    /// The position that covers everything the writers wrote so far: the embedded leader's
    /// own (an append is recorded before it returns); `ferry lead`'s watcher may not have seen
    /// the last writes yet, but its position grows by each append's length (docs/PROTOCOL.md,
    /// Positions), so there it is where it started plus the bytes written since.
    pub fn position_of_written(&self, start: Option<u64>, bytes_written: u64) -> Option<u64> {
        match self {
            LeaderView::Embedded(leader) => Some(leader.position()),
            LeaderView::Lead(_) => start.map(|start| start + bytes_written),
        }
    }

    /// Each connected follower's peer port and lag at `durability`, for `per_process`, which
    /// matches them to follower processes by port: connections come and go in any order as
    /// followers are killed and restart, so never by position.
    pub fn connected(&self, durability: Durability) -> Vec<(Option<u16>, u64)> {
        match self {
            LeaderView::Embedded(leader) => leader
                .followers()
                .into_iter()
                .filter(|f| f.lag.state != ferry::lag::FollowerState::Disconnected)
                .map(|f| (Some(f.peer.port()), f.lag.lag_bytes[durability.index()]))
                .collect(),
            LeaderView::Lead(http) => lead_figures(http, durability)
                .map(|f| f.followers.iter().map(|&(p, lag, _)| (p, lag)).collect())
                .unwrap_or_default(),
        }
    }

    /// Each connected follower's peer port and its MARK-to-ACK latency as the leader measures it
    /// over the connection (p50, p99 and p999, in us), for `per_process`: the embedded one's
    /// `followers()`, or `ferry lead`'s `ferry_follower_ack_latency_seconds`.
    pub fn ack_latencies(&self) -> Vec<(Option<u16>, [u64; 3])> {
        match self {
            LeaderView::Embedded(leader) => leader
                .followers()
                .into_iter()
                .filter(|f| f.lag.state != ferry::lag::FollowerState::Disconnected)
                .map(|f| {
                    let l = &f.lag;
                    let us = [
                        l.ack_latency_p50_us,
                        l.ack_latency_p99_us,
                        l.ack_latency_p999_us,
                    ];
                    (Some(f.peer.port()), us)
                })
                .collect(),
            LeaderView::Lead(http) => ferry::http::get(http, "/metrics")
                .map(|text| ack_latencies(&parse_prometheus(&text)))
                .unwrap_or_default(),
        }
    }

    /// Waits until at least `n` followers are in sync (state `streaming`: their initial sync
    /// done, nothing overdue); false if `timeout` passed first. A run's clock starts after it,
    /// so no follower's initial sync is timed as part of the run.
    pub fn wait_in_sync(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let streaming = match self {
                LeaderView::Embedded(leader) => leader
                    .followers()
                    .iter()
                    .filter(|f| f.lag.state == ferry::lag::FollowerState::Streaming)
                    .count(),
                LeaderView::Lead(http) => ferry::http::get(http, "/metrics")
                    .map(|text| streaming(&parse_prometheus(&text)))
                    .unwrap_or(0),
            };
            if streaming >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(LEAD_POLL_INTERVAL);
        }
    }

    /// Waits until at least `n` connected followers acked `position` at `durability`; false if
    /// `timeout` passed first.
    pub fn wait_for(
        &self,
        position: u64,
        durability: Durability,
        n: usize,
        timeout: Duration,
    ) -> bool {
        match self {
            LeaderView::Embedded(leader) => leader.wait_for(position, durability, n, timeout),
            LeaderView::Lead(http) => {
                let deadline = Instant::now() + timeout;
                loop {
                    let acked = lead_figures(http, durability).is_some_and(|f| {
                        f.followers
                            .iter()
                            .filter(|&&(_, _, a)| a >= position)
                            .count()
                            >= n
                    });
                    if acked {
                        return true;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(LEAD_POLL_INTERVAL);
                }
            }
        }
    }
}

/// Of the `connected` followers' `(peer port, figure)`, the figure of the one each process
/// (given by its sockets' local ports, `procs::Proc::tcp_ports`) connects from; `None` while
/// it has no connection.
pub fn per_process<T: Copy>(connected: &[(Option<u16>, T)], ports: &[Vec<u16>]) -> Vec<Option<T>> {
    ports
        .iter()
        .map(|mine| {
            connected
                .iter()
                .find(|(peer, _)| peer.is_some_and(|p| mine.contains(&p)))
                .map(|&(_, figure)| figure)
        })
        .collect()
}

/// The id and peer port of each follower connected now, from `ferry_follower_state` (1 for its
/// current state), in the order of their ids.
fn connected_ids(samples: &[Sample]) -> Vec<(&str, Option<u16>)> {
    let mut connected: Vec<(&str, Option<u16>)> = samples
        .iter()
        .filter(|s| s.name == "ferry_follower_state" && s.value == 1.0)
        .filter(|s| s.label("state") != Some("disconnected"))
        .filter_map(|s| {
            let port = s.label("peer")?.rsplit_once(':')?.1.parse().ok();
            Some((s.label("id")?, port))
        })
        .collect();
    connected.sort_by_key(|(id, _)| (id.len(), *id));
    connected
}

/// From `ferry lead`'s `/metrics` samples: each connected follower's peer port and its
/// `ferry_follower_ack_latency_seconds` at the quantiles 0.5, 0.99 and 0.999, in us.
fn ack_latencies(samples: &[Sample]) -> Vec<(Option<u16>, [u64; 3])> {
    connected_ids(samples)
        .into_iter()
        .filter_map(|(id, port)| {
            let at = |q: &str| {
                samples
                    .iter()
                    .find(|s| {
                        s.name == "ferry_follower_ack_latency_seconds"
                            && s.label("id") == Some(id)
                            && s.label("quantile") == Some(q)
                    })
                    .map(|s| (s.value * 1e6).round() as u64)
            };
            Some((port, [at("0.5")?, at("0.99")?, at("0.999")?]))
        })
        .collect()
}

/// How many followers `ferry lead`'s `/metrics` samples show in state `streaming`.
fn streaming(samples: &[Sample]) -> usize {
    samples
        .iter()
        .filter(|s| s.name == "ferry_follower_state" && s.value == 1.0)
        .filter(|s| s.label("state") == Some("streaming"))
        .count()
}

fn lead_figures(http: &str, durability: Durability) -> Option<LeadFigures> {
    let text = ferry::http::get(http, "/metrics").ok()?;
    figures(&parse_prometheus(&text), durability)
}

/// From the samples of `ferry lead`'s `/metrics`: `ferry_position_bytes`, and per follower id
/// `ferry_follower_state` (1 for its current state) and `ferry_follower_lag_bytes` /
/// `ferry_follower_acked_position` at the level named like `durability`.
fn figures(samples: &[Sample], durability: Durability) -> Option<LeadFigures> {
    let position_bytes = samples
        .iter()
        .find(|s| s.name == "ferry_position_bytes")?
        .value as u64;
    let level = durability.name();
    let at_level = |name: &str, id: &str| {
        samples
            .iter()
            .find(|s| {
                s.name == name && s.label("id") == Some(id) && s.label("level") == Some(level)
            })
            .map(|s| s.value as u64)
    };
    let connected = connected_ids(samples);
    let followers = connected
        .into_iter()
        .filter_map(|(id, port)| {
            Some((
                port,
                at_level("ferry_follower_lag_bytes", id)?,
                at_level("ferry_follower_acked_position", id)?,
            ))
        })
        .collect();
    Some(LeadFigures {
        position_bytes,
        followers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_take_the_runs_level_and_skip_followers_gone() {
        let metrics = "\
# TYPE ferry_position_bytes counter
ferry_position_bytes 5000
ferry_follower_state{id=\"10\",peer=\"127.0.0.1:2\",state=\"streaming\",durability=\"written\"} 1
ferry_follower_state{id=\"2\",peer=\"127.0.0.1:1\",state=\"syncing\",durability=\"written\"} 1
ferry_follower_state{id=\"3\",peer=\"127.0.0.1:3\",state=\"disconnected\",durability=\"written\"} 1
ferry_follower_lag_bytes{id=\"10\",peer=\"127.0.0.1:2\",level=\"received\"} 0
ferry_follower_lag_bytes{id=\"10\",peer=\"127.0.0.1:2\",level=\"written\"} 100
ferry_follower_lag_bytes{id=\"2\",peer=\"127.0.0.1:1\",level=\"written\"} 4000
ferry_follower_lag_bytes{id=\"3\",peer=\"127.0.0.1:3\",level=\"written\"} 5000
ferry_follower_acked_position{id=\"10\",peer=\"127.0.0.1:2\",level=\"written\"} 4900
ferry_follower_acked_position{id=\"2\",peer=\"127.0.0.1:1\",level=\"written\"} 1000
ferry_follower_acked_position{id=\"3\",peer=\"127.0.0.1:3\",level=\"written\"} 0
";
        let samples = parse_prometheus(metrics);
        assert_eq!(
            figures(&samples, Durability::Written),
            Some(LeadFigures {
                position_bytes: 5000,
                followers: vec![(Some(1), 4000, 1000), (Some(2), 100, 4900)],
            })
        );
        // No level `synced` in these samples: no follower figures at it.
        assert_eq!(
            figures(&samples, Durability::Synced).map(|f| f.followers.len()),
            Some(0)
        );
        assert_eq!(figures(&samples[1..], Durability::Written), None);
        // Of the three, one is in sync: "syncing" and "disconnected" are not.
        assert_eq!(streaming(&samples), 1);
    }

    /// A follower killed and restarted connects again after the others: its lag is still
    /// reported as its own, found by the port it connects from.
    #[test]
    fn each_process_gets_the_lag_of_the_connection_from_its_own_port() {
        let connected = [(Some(40002), 100), (None, 7), (Some(40001), 5000)];
        let ports = [vec![40001], vec![40002, 9100], vec![40003]];
        assert_eq!(
            per_process(&connected, &ports),
            vec![Some(5000), Some(100), None]
        );
    }
}
