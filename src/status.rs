//! What a running `ferry` reports about itself: the facts behind `/metrics` (Prometheus text
//! format) and `/status` (JSON), and the parser `ferry status` uses to read `/metrics` back.
//!
//! One `Status` value renders both formats, so they always state the same facts. The JSON is
//! written by hand (flat, few types) rather than pulling in a serializer; `ferry status` reads
//! the Prometheus text, which is line-oriented and needs no JSON parser.

use std::fmt::Write as _;

use crate::leader::FollowerInfo;
use crate::schedstat::ThreadTimes;

/// A leader's view of one follower.
#[derive(Debug, Clone)]
pub struct FollowerRow {
    pub id: u64,
    pub peer: String,
    pub state: String,
    pub durability: Option<String>,
    pub acked: [u64; 3],
    pub lag_bytes: [u64; 3],
    pub since_last_ack_ms: Option<u64>,
    /// See `LagSnapshot::lag_ms`.
    pub lag_ms: u64,
    pub ack_latency_us: [u64; 3],
    pub payload_bytes_sent: u64,
    pub files_sent: u64,
    pub files_renamed: u64,
    /// While its initial sync runs: (bytes sent for it, bytes planned).
    pub sync_bytes: Option<(u64, u64)>,
}

impl From<&FollowerInfo> for FollowerRow {
    fn from(f: &FollowerInfo) -> FollowerRow {
        FollowerRow {
            id: f.id,
            peer: f.peer.to_string(),
            state: f.lag.state.name().to_string(),
            durability: f.lag.durability.map(|d| d.name().to_string()),
            acked: f.lag.acked,
            lag_bytes: f.lag.lag_bytes,
            since_last_ack_ms: f.lag.since_last_ack_ms,
            lag_ms: f.lag.lag_ms,
            ack_latency_us: [
                f.lag.ack_latency_p50_us,
                f.lag.ack_latency_p99_us,
                f.lag.ack_latency_p999_us,
            ],
            payload_bytes_sent: f.payload_bytes_sent,
            files_sent: f.files_sent,
            files_renamed: f.files_renamed,
            sync_bytes: f.sync_bytes,
        }
    }
}

/// A follower's view of itself.
#[derive(Debug, Clone, Default)]
pub struct FollowerSelf {
    pub leader: String,
    pub connected: bool,
    pub durability: String,
    pub sync_done: bool,
    /// received, written, synced.
    pub watermarks: [u64; 3],
    pub payload_bytes_received: u64,
    pub connects: u64,
    pub last_error: Option<String>,
    /// The lineage this copy records (hex), once known (`crate::lineage`).
    pub lineage: Option<String>,
}

/// What a leader's checkpoints of its record did so far (`docs/PROTOCOL.md`, *The leader's
/// record*): each round looks only at the files changed since the record on disk, and writes
/// none when nothing changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointCounters {
    pub rounds: u64,
    pub writes: u64,
    pub files_looked: u64,
    pub entries_taken: u64,
}

#[derive(Debug, Clone)]
pub enum Status {
    Leader {
        engine: String,
        /// The TCP congestion control the leader sends to followers with.
        tcp_congestion: String,
        position: u64,
        followers: Vec<FollowerRow>,
        /// The server thread's time on a CPU and waiting for one (`Leader::server_thread_times`).
        server_thread: Option<ThreadTimes>,
        /// The data dir's lineage (hex), which the leader serves (`crate::lineage`).
        lineage: String,
        /// The leader's instance (hex): followers' held records count only under it.
        instance: String,
        /// Its fork chain, empty when it is no fork: each instance it goes on from (hex) and up
        /// to which position (`docs/PROTOCOL.md`, *After a failover*, *After failovers in a
        /// row*): held records under those count too, up to there.
        forks: Vec<(String, u64)>,
        /// What the checkpoints of the leader's record did so far.
        checkpoints: CheckpointCounters,
    },
    Follower {
        engine: String,
        me: FollowerSelf,
    },
}

pub const LEVELS: [&str; 3] = ["received", "written", "synced"];
const QUANTILES: [&str; 3] = ["0.5", "0.99", "0.999"];

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `s` as a JSON string literal, escaped.
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn opt_json<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("null".into(), |v| v.to_string())
}

impl Status {
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        let version = env!("CARGO_PKG_VERSION");
        match self {
            Status::Leader {
                engine,
                tcp_congestion,
                position,
                followers,
                server_thread,
                lineage,
                instance,
                forks,
                checkpoints,
            } => {
                let counters = [
                    (
                        "ferry_leader_checkpoints_total",
                        "Checkpoints of the leader's record: rounds.",
                        checkpoints.rounds,
                    ),
                    (
                        "ferry_leader_checkpoint_writes_total",
                        "Checkpoints that wrote the record (the rest found nothing changed).",
                        checkpoints.writes,
                    ),
                    (
                        "ferry_leader_checkpoint_files_looked_total",
                        "Files the checkpoints looked at (stat): those changed since the record on disk.",
                        checkpoints.files_looked,
                    ),
                    (
                        "ferry_leader_checkpoint_entries_taken_total",
                        "Catalog entries the checkpoints took from the writers' catalog: every file's at start, then the changed ones.",
                        checkpoints.entries_taken,
                    ),
                ];
                for (name, help, value) in counters {
                    let _ = writeln!(s, "# HELP {name} {help}");
                    let _ = writeln!(s, "# TYPE {name} counter");
                    let _ = writeln!(s, "{name} {value}");
                }
                if let Some(t) = server_thread {
                    let _ = writeln!(
                        s,
                        "# HELP ferry_leader_thread_cpu_seconds_total CPU time of the leader's server thread, which sends to every follower."
                    );
                    let _ = writeln!(s, "# TYPE ferry_leader_thread_cpu_seconds_total counter");
                    let _ = writeln!(
                        s,
                        "ferry_leader_thread_cpu_seconds_total {:.6}",
                        t.on_cpu.as_secs_f64()
                    );
                    let _ = writeln!(
                        s,
                        "# HELP ferry_leader_thread_cpu_wait_seconds_total Time the leader's server thread was runnable but waited for a CPU: payloads and acks wait with it."
                    );
                    let _ = writeln!(
                        s,
                        "# TYPE ferry_leader_thread_cpu_wait_seconds_total counter"
                    );
                    let _ = writeln!(
                        s,
                        "ferry_leader_thread_cpu_wait_seconds_total {:.6}",
                        t.waiting.as_secs_f64()
                    );
                }
                let _ = writeln!(
                    s,
                    "# HELP ferry_info The node's role, I/O engine, version and data dir lineage; a leader's TCP congestion control, instance, the instance and position it forks from, and the earlier links of its fork chain (INSTANCE@POSITION, space-separated)."
                );
                let _ = writeln!(s, "# TYPE ferry_info gauge");
                let mut fork = forks.first().map_or(String::new(), |(from, at)| {
                    format!(",fork_from=\"{}\",fork_position=\"{at}\"", label(from))
                });
                if forks.len() > 1 {
                    let earlier: Vec<String> = forks[1..]
                        .iter()
                        .map(|(from, at)| format!("{from}@{at}"))
                        .collect();
                    let _ = write!(fork, ",fork_earlier=\"{}\"", label(&earlier.join(" ")));
                }
                let _ = writeln!(
                    s,
                    "ferry_info{{role=\"leader\",engine=\"{}\",version=\"{version}\",tcp_congestion=\"{}\",lineage=\"{}\",instance=\"{}\"{fork}}} 1",
                    label(engine),
                    label(tcp_congestion),
                    label(lineage),
                    label(instance)
                );
                let _ = writeln!(
                    s,
                    "# HELP ferry_position_bytes The leader's replication position."
                );
                let _ = writeln!(s, "# TYPE ferry_position_bytes counter");
                let _ = writeln!(s, "ferry_position_bytes {position}");
                let _ = writeln!(
                    s,
                    "# HELP ferry_followers Followers known (connected or recently gone)."
                );
                let _ = writeln!(s, "# TYPE ferry_followers gauge");
                let _ = writeln!(s, "ferry_followers {}", followers.len());
                let help = [
                    (
                        "ferry_follower_state",
                        "gauge",
                        "1 for the follower's current state.",
                    ),
                    (
                        "ferry_follower_lag_bytes",
                        "gauge",
                        "Bytes behind the leader's position, per level.",
                    ),
                    (
                        "ferry_follower_acked_position",
                        "gauge",
                        "Position acked, per level.",
                    ),
                    (
                        "ferry_follower_last_ack_seconds",
                        "gauge",
                        "Seconds since the last ack.",
                    ),
                    (
                        "ferry_follower_lag_seconds",
                        "gauge",
                        "How long the oldest change not acked at the follower's level has waited.",
                    ),
                    (
                        "ferry_follower_ack_latency_seconds",
                        "summary",
                        "From MARK sent to acked at the follower's level.",
                    ),
                    (
                        "ferry_follower_payload_bytes_sent_total",
                        "counter",
                        "File bytes shipped to the follower on this connection.",
                    ),
                    (
                        "ferry_follower_files_sent_total",
                        "counter",
                        "Files shipped whole to the follower on this connection.",
                    ),
                    (
                        "ferry_follower_files_renamed_total",
                        "counter",
                        "Files the follower moved (RENAME) instead of getting them whole, on this connection.",
                    ),
                    (
                        "ferry_follower_sync_bytes",
                        "gauge",
                        "While the follower's initial sync runs: bytes sent for it and planned.",
                    ),
                ];
                for (name, kind, text) in help {
                    let _ = writeln!(s, "# HELP {name} {text}");
                    let _ = writeln!(s, "# TYPE {name} {kind}");
                    for f in followers {
                        let l = format!("id=\"{}\",peer=\"{}\"", f.id, label(&f.peer));
                        match name {
                            "ferry_follower_state" => {
                                let _ = writeln!(
                                    s,
                                    "{name}{{{l},state=\"{}\",durability=\"{}\"}} 1",
                                    label(&f.state),
                                    label(f.durability.as_deref().unwrap_or("unknown"))
                                );
                            }
                            "ferry_follower_lag_bytes" | "ferry_follower_acked_position" => {
                                let values = if name == "ferry_follower_lag_bytes" {
                                    f.lag_bytes
                                } else {
                                    f.acked
                                };
                                for (level, v) in LEVELS.iter().zip(values) {
                                    let _ = writeln!(s, "{name}{{{l},level=\"{level}\"}} {v}");
                                }
                            }
                            "ferry_follower_last_ack_seconds" => {
                                if let Some(ms) = f.since_last_ack_ms {
                                    let _ = writeln!(s, "{name}{{{l}}} {:.3}", ms as f64 / 1000.0);
                                }
                            }
                            "ferry_follower_lag_seconds" => {
                                let _ =
                                    writeln!(s, "{name}{{{l}}} {:.3}", f.lag_ms as f64 / 1000.0);
                            }
                            "ferry_follower_ack_latency_seconds" => {
                                for (q, us) in QUANTILES.iter().zip(f.ack_latency_us) {
                                    let _ = writeln!(
                                        s,
                                        "{name}{{{l},quantile=\"{q}\"}} {:.6}",
                                        us as f64 / 1e6
                                    );
                                }
                            }
                            "ferry_follower_files_sent_total" => {
                                let _ = writeln!(s, "{name}{{{l}}} {}", f.files_sent);
                            }
                            "ferry_follower_files_renamed_total" => {
                                let _ = writeln!(s, "{name}{{{l}}} {}", f.files_renamed);
                            }
                            "ferry_follower_sync_bytes" => {
                                if let Some((sent, planned)) = f.sync_bytes {
                                    let _ = writeln!(s, "{name}{{{l},kind=\"sent\"}} {sent}");
                                    let _ = writeln!(s, "{name}{{{l},kind=\"planned\"}} {planned}");
                                }
                            }
                            _ => {
                                let _ = writeln!(s, "{name}{{{l}}} {}", f.payload_bytes_sent);
                            }
                        }
                    }
                }
            }
            Status::Follower { engine, me } => {
                let _ = writeln!(
                    s,
                    "# HELP ferry_info The node's role, I/O engine, version and the lineage its copy records (empty until known)."
                );
                let _ = writeln!(s, "# TYPE ferry_info gauge");
                let _ = writeln!(
                    s,
                    "ferry_info{{role=\"follower\",engine=\"{}\",version=\"{version}\",leader=\"{}\",durability=\"{}\",lineage=\"{}\"}} 1",
                    label(engine),
                    label(&me.leader),
                    label(&me.durability),
                    label(me.lineage.as_deref().unwrap_or(""))
                );
                let _ = writeln!(s, "# HELP ferry_connected 1 while connected to the leader.");
                let _ = writeln!(s, "# TYPE ferry_connected gauge");
                let _ = writeln!(s, "ferry_connected {}", u8::from(me.connected));
                let _ = writeln!(
                    s,
                    "# HELP ferry_sync_done 1 once the initial sync of this connection is applied."
                );
                let _ = writeln!(s, "# TYPE ferry_sync_done gauge");
                let _ = writeln!(s, "ferry_sync_done {}", u8::from(me.sync_done));
                let _ = writeln!(
                    s,
                    "# HELP ferry_watermark_position Position held, per level, on this connection."
                );
                let _ = writeln!(s, "# TYPE ferry_watermark_position gauge");
                for (level, v) in LEVELS.iter().zip(me.watermarks) {
                    let _ = writeln!(s, "ferry_watermark_position{{level=\"{level}\"}} {v}");
                }
                let _ = writeln!(
                    s,
                    "# HELP ferry_payload_bytes_received_total File bytes received since start."
                );
                let _ = writeln!(s, "# TYPE ferry_payload_bytes_received_total counter");
                let _ = writeln!(
                    s,
                    "ferry_payload_bytes_received_total {}",
                    me.payload_bytes_received
                );
                let _ = writeln!(
                    s,
                    "# HELP ferry_connects_total Connections made to the leader since start."
                );
                let _ = writeln!(s, "# TYPE ferry_connects_total counter");
                let _ = writeln!(s, "ferry_connects_total {}", me.connects);
            }
        }
        s
    }

    pub fn json(&self) -> String {
        match self {
            Status::Leader {
                engine,
                tcp_congestion,
                position,
                followers,
                server_thread,
                lineage,
                instance,
                forks,
                checkpoints,
            } => {
                let rows: Vec<String> = followers.iter().map(follower_json).collect();
                let link = |(from, at): &(String, u64)| {
                    format!("{{\"from\": {}, \"position\": {at}", json_str(from))
                };
                let fork = forks.first().map_or("null".into(), |first| {
                    let earlier: Vec<String> =
                        forks[1..].iter().map(|l| format!("{}}}", link(l))).collect();
                    format!("{}, \"earlier\": [{}]}}", link(first), earlier.join(", "))
                });
                let checkpoints = format!(
                    "{{\"rounds\": {}, \"writes\": {}, \"files_looked\": {}, \"entries_taken\": {}}}",
                    checkpoints.rounds,
                    checkpoints.writes,
                    checkpoints.files_looked,
                    checkpoints.entries_taken
                );
                let thread = server_thread.map_or("null".into(), |t| {
                    format!(
                        "{{\"cpu_s\": {:.6}, \"cpu_wait_s\": {:.6}}}",
                        t.on_cpu.as_secs_f64(),
                        t.waiting.as_secs_f64()
                    )
                });
                format!(
                    "{{\"role\": \"leader\", \"engine\": {}, \"version\": {}, \"tcp_congestion\": {}, \"lineage\": {}, \"instance\": {}, \"fork\": {fork}, \"position\": {position}, \"server_thread\": {thread}, \"checkpoints\": {checkpoints}, \"followers\": [{}]}}\n",
                    json_str(engine),
                    json_str(env!("CARGO_PKG_VERSION")),
                    json_str(tcp_congestion),
                    json_str(lineage),
                    json_str(instance),
                    rows.join(", ")
                )
            }
            Status::Follower { engine, me } => format!(
                "{{\"role\": \"follower\", \"engine\": {}, \"version\": {}, \"leader\": {}, \"connected\": {}, \"durability\": {}, \"sync_done\": {}, \"watermarks\": {{\"received\": {}, \"written\": {}, \"synced\": {}}}, \"payload_bytes_received\": {}, \"connects\": {}, \"last_error\": {}, \"lineage\": {}}}\n",
                json_str(engine),
                json_str(env!("CARGO_PKG_VERSION")),
                json_str(&me.leader),
                me.connected,
                json_str(&me.durability),
                me.sync_done,
                me.watermarks[0],
                me.watermarks[1],
                me.watermarks[2],
                me.payload_bytes_received,
                me.connects,
                me.last_error.as_deref().map_or("null".into(), json_str),
                me.lineage.as_deref().map_or("null".into(), json_str)
            ),
        }
    }
}

pub fn follower_json(f: &FollowerRow) -> String {
    format!(
        "{{\"id\": {}, \"peer\": {}, \"state\": {}, \"durability\": {}, \"acked\": {{\"received\": {}, \"written\": {}, \"synced\": {}}}, \"lag_bytes\": {{\"received\": {}, \"written\": {}, \"synced\": {}}}, \"last_ack_ms_ago\": {}, \"lag_ms\": {}, \"ack_latency_us\": {{\"p50\": {}, \"p99\": {}, \"p999\": {}}}, \"payload_bytes_sent\": {}, \"files_sent\": {}, \"files_renamed\": {}, \"sync_bytes\": {}}}",
        f.id,
        json_str(&f.peer),
        json_str(&f.state),
        f.durability.as_deref().map_or("null".into(), json_str),
        f.acked[0],
        f.acked[1],
        f.acked[2],
        f.lag_bytes[0],
        f.lag_bytes[1],
        f.lag_bytes[2],
        opt_json(&f.since_last_ack_ms),
        f.lag_ms,
        f.ack_latency_us[0],
        f.ack_latency_us[1],
        f.ack_latency_us[2],
        f.payload_bytes_sent,
        f.files_sent,
        f.files_renamed,
        f.sync_bytes.map_or("null".into(), |(sent, planned)| format!(
            "{{\"sent\": {sent}, \"planned\": {planned}}}"
        ))
    )
}

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped; a line that does
/// not parse is skipped too, so a newer ferry's extra metrics do not break an older client).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some(Sample {
            name: head.to_string(),
            labels: Vec::new(),
            value,
        });
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => v.push('\n'),
                    Some(other) => v.push(other),
                    None => return None,
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), v));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader() -> Status {
        Status::Leader {
            engine: "uring".into(),
            tcp_congestion: "cubic".into(),
            position: 1000,
            followers: vec![FollowerRow {
                id: 3,
                peer: "127.0.0.1:4000".into(),
                state: "lagging".into(),
                durability: Some("synced".into()),
                acked: [900, 800, 700],
                lag_bytes: [100, 200, 300],
                since_last_ack_ms: Some(1500),
                lag_ms: 2500,
                ack_latency_us: [100, 2000, 9000],
                payload_bytes_sent: 12345,
                files_sent: 2,
                files_renamed: 4,
                sync_bytes: Some((10, 100)),
            }],
            server_thread: Some(ThreadTimes {
                on_cpu: std::time::Duration::from_millis(2500),
                waiting: std::time::Duration::from_millis(750),
            }),
            lineage: "5aae7870c08f6f8ed9ea4ac952c1a86f".into(),
            instance: "00112233445566778899aabbccddeeff".into(),
            forks: vec![
                ("ffeeddccbbaa99887766554433221100".into(), 900),
                ("0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f".into(), 700),
            ],
            checkpoints: CheckpointCounters {
                rounds: 12,
                writes: 3,
                files_looked: 40,
                entries_taken: 250,
            },
        }
    }

    #[test]
    fn metrics_parse_back_to_the_same_facts() {
        let samples = parse_prometheus(&leader().prometheus());
        let find = |name: &str, level: Option<&str>| {
            samples
                .iter()
                .find(|s| s.name == name && !level.is_some_and(|l| s.label("level") != Some(l)))
                .unwrap_or_else(|| panic!("{name} missing"))
                .clone()
        };
        assert_eq!(find("ferry_position_bytes", None).value, 1000.0);
        let lag = find("ferry_follower_lag_bytes", Some("synced"));
        assert_eq!(lag.value, 300.0);
        assert_eq!(lag.label("peer"), Some("127.0.0.1:4000"));
        assert_eq!(
            find("ferry_follower_state", None).label("state"),
            Some("lagging")
        );
        assert_eq!(find("ferry_follower_last_ack_seconds", None).value, 1.5);
        // Every per-follower metric the README lists is there.
        assert_eq!(
            find("ferry_follower_payload_bytes_sent_total", None).value,
            12345.0
        );
        assert_eq!(find("ferry_follower_files_sent_total", None).value, 2.0);
        assert_eq!(find("ferry_follower_files_renamed_total", None).value, 4.0);
        let sync = |kind| {
            let found = samples
                .iter()
                .find(|s| s.name == "ferry_follower_sync_bytes" && s.label("kind") == Some(kind));
            found.map(|s| s.value)
        };
        assert_eq!((sync("sent"), sync("planned")), (Some(10.0), Some(100.0)));
        assert_eq!(find("ferry_follower_lag_seconds", None).value, 2.5);
        assert_eq!(
            find("ferry_leader_thread_cpu_seconds_total", None).value,
            2.5
        );
        assert_eq!(
            find("ferry_leader_thread_cpu_wait_seconds_total", None).value,
            0.75
        );
        assert_eq!(find("ferry_leader_checkpoints_total", None).value, 12.0);
        assert_eq!(
            find("ferry_leader_checkpoint_writes_total", None).value,
            3.0
        );
        assert_eq!(
            find("ferry_leader_checkpoint_files_looked_total", None).value,
            40.0
        );
        assert_eq!(
            find("ferry_leader_checkpoint_entries_taken_total", None).value,
            250.0
        );
        let info = find("ferry_info", None);
        assert_eq!(
            info.label("lineage"),
            Some("5aae7870c08f6f8ed9ea4ac952c1a86f")
        );
        assert_eq!(
            info.label("instance"),
            Some("00112233445566778899aabbccddeeff")
        );
        assert_eq!(
            info.label("fork_from"),
            Some("ffeeddccbbaa99887766554433221100")
        );
        assert_eq!(info.label("fork_position"), Some("900"));
        assert_eq!(
            info.label("fork_earlier"),
            Some("0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f@700")
        );
    }

    #[test]
    fn json_names_the_same_facts() {
        let json = leader().json();
        for needle in [
            "\"role\": \"leader\"",
            "\"position\": 1000",
            "\"state\": \"lagging\"",
            "\"synced\": 300",
            "\"files_sent\": 2, \"files_renamed\": 4",
            "\"server_thread\": {\"cpu_s\": 2.500000, \"cpu_wait_s\": 0.750000}",
            "\"lineage\": \"5aae7870c08f6f8ed9ea4ac952c1a86f\"",
            "\"instance\": \"00112233445566778899aabbccddeeff\", \"fork\": {\"from\": \
             \"ffeeddccbbaa99887766554433221100\", \"position\": 900, \"earlier\": [{\"from\": \
             \"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f\", \"position\": 700}]}",
            "\"checkpoints\": {\"rounds\": 12, \"writes\": 3, \"files_looked\": 40, \
             \"entries_taken\": 250}",
        ] {
            assert!(json.contains(needle), "{needle} in {json}");
        }
    }

    #[test]
    fn label_values_with_quotes_survive_the_round_trip() {
        let s = parse_line(r#"m{a="x\"y",b="z"} 2"#).unwrap();
        assert_eq!(s.label("a"), Some("x\"y"));
        assert_eq!(s.label("b"), Some("z"));
        assert!(parse_line("garbage").is_none());
    }
}
