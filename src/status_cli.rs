//! `ferry status URL`: a table of a leader's followers (or a follower's own state), read from
//! the node's `--http` endpoint; `--json` prints its `/status` as is; `--watch` redraws every
//! second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use ferry::http;
use ferry::status::{parse_prometheus, Sample, LEVELS};

pub fn run(url: &str, json: bool, watch: bool) -> anyhow::Result<()> {
    loop {
        let out = if json {
            http::get(url, "/status")?
        } else {
            table(&parse_prometheus(&http::get(url, "/metrics")?))
        };
        if watch {
            // Clear the screen and redraw from the top.
            print!("\x1b[2J\x1b[H{out}");
        } else {
            print!("{out}");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn bytes(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2} GB", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} MB", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} kB", v / 1e3)
    } else {
        format!("{v:.0} B")
    }
}

/// The text `ferry status` prints for the samples of one `/metrics` page.
pub fn table(samples: &[Sample]) -> String {
    let info = samples.iter().find(|s| s.name == "ferry_info");
    let role = info.and_then(|i| i.label("role")).unwrap_or("unknown");
    let engine = info.and_then(|i| i.label("engine")).unwrap_or("?");
    let value = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
    let mut out = String::new();
    if role == "follower" {
        let leader = info.and_then(|i| i.label("leader")).unwrap_or("?");
        let durability = info.and_then(|i| i.label("durability")).unwrap_or("?");
        // A follower older than the label, or one that has not learnt it yet, shows none.
        let lineage = info
            .and_then(|i| i.label("lineage"))
            .filter(|l| !l.is_empty())
            .map_or(String::new(), |l| format!(", lineage {l}"));
        let _ = writeln!(
            out,
            "follower of {leader} ({engine} engine), acking at {durability}{lineage}"
        );
        let _ = writeln!(
            out,
            "connected: {}   initial sync done: {}   connects: {}   payload received: {}",
            if value("ferry_connected") == Some(1.0) {
                "yes"
            } else {
                "no"
            },
            if value("ferry_sync_done") == Some(1.0) {
                "yes"
            } else {
                "no"
            },
            value("ferry_connects_total").unwrap_or(0.0),
            bytes(value("ferry_payload_bytes_received_total").unwrap_or(0.0))
        );
        for level in LEVELS {
            let v = samples
                .iter()
                .find(|s| s.name == "ferry_watermark_position" && s.label("level") == Some(level))
                .map_or(0.0, |s| s.value);
            let _ = writeln!(out, "{level:>9}: position {v:.0}");
        }
        return out;
    }
    // A leader older than the label has no congestion control to show.
    let congestion = info
        .and_then(|i| i.label("tcp_congestion"))
        .map_or(String::new(), |c| format!(", TCP {c}"));
    let lineage = info
        .and_then(|i| i.label("lineage"))
        .map_or(String::new(), |l| format!(", lineage {l}"));
    let instance = info
        .and_then(|i| i.label("instance"))
        .map_or(String::new(), |l| format!(", instance {l}"));
    let fork = match info.map(|i| (i.label("fork_from"), i.label("fork_position"))) {
        Some((Some(from), Some(at))) => {
            let earlier = info.and_then(|i| i.label("fork_earlier")).unwrap_or("");
            let earlier = earlier.split(' ').filter_map(|l| l.split_once('@'));
            let links = std::iter::once((from, at)).chain(earlier);
            format!(" ({})", ferry::fork_chain::describe_links(links))
        }
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "leader ({engine} engine{congestion}{lineage}{instance}{fork}), position {:.0}",
        value("ferry_position_bytes").unwrap_or(0.0)
    );
    // What it sends with: a thread that waits for a CPU holds every follower's payloads and acks.
    if let (Some(cpu_s), Some(wait_s)) = (
        value("ferry_leader_thread_cpu_seconds_total"),
        value("ferry_leader_thread_cpu_wait_seconds_total"),
    ) {
        let _ = writeln!(
            out,
            "server thread: {cpu_s:.2} s on a CPU, {wait_s:.2} s waiting for a CPU"
        );
    }
    // One row per follower id, filled from the samples that carry that id.
    #[derive(Default)]
    struct Row {
        peer: String,
        state: String,
        durability: String,
        lag: [f64; 3],
        last_ack: Option<f64>,
        lag_s: Option<f64>,
        p99: Option<f64>,
        sent: f64,
        sync: [Option<f64>; 2],
    }
    let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
    for s in samples {
        let Some(id) = s.label("id").and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let row = rows.entry(id).or_default();
        row.peer = s.label("peer").unwrap_or("").to_string();
        match s.name.as_str() {
            "ferry_follower_state" => {
                row.state = s.label("state").unwrap_or("").to_string();
                row.durability = s.label("durability").unwrap_or("").to_string();
            }
            "ferry_follower_lag_bytes" => {
                if let Some(i) = LEVELS.iter().position(|l| Some(*l) == s.label("level")) {
                    row.lag[i] = s.value;
                }
            }
            "ferry_follower_last_ack_seconds" => row.last_ack = Some(s.value),
            "ferry_follower_lag_seconds" => row.lag_s = Some(s.value),
            "ferry_follower_ack_latency_seconds" if s.label("quantile") == Some("0.99") => {
                row.p99 = Some(s.value)
            }
            "ferry_follower_payload_bytes_sent_total" => row.sent = s.value,
            "ferry_follower_sync_bytes" => match s.label("kind") {
                Some("sent") => row.sync[0] = Some(s.value),
                Some("planned") => row.sync[1] = Some(s.value),
                _ => {}
            },
            _ => {}
        }
    }
    let _ = writeln!(
        out,
        "{:>4}  {:<21}  {:<12}  {:<10}  {:>12}  {:>9}  {:>10}  {:>10}  {:>10}",
        "ID", "ADDRESS", "STATE", "DURABILITY", "LAG", "LAG TIME", "LAST ACK", "P99 ACK", "SENT"
    );
    for (id, r) in &rows {
        let level = LEVELS.iter().position(|l| *l == r.durability).unwrap_or(0);
        let state = match r.sync {
            [Some(sent), Some(planned)] if planned > 0.0 => {
                format!("{} {:.0}%", r.state, (100.0 * sent / planned).min(99.0))
            }
            _ => r.state.clone(),
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<21}  {:<12}  {:<10}  {:>12}  {:>9}  {:>10}  {:>10}  {:>10}",
            id,
            r.peer,
            state,
            r.durability,
            bytes(r.lag[level]),
            r.lag_s.map_or("-".into(), |s| format!("{s:.1} s")),
            r.last_ack
                .map_or("never".into(), |s| format!("{s:.1} s ago")),
            r.p99
                .map_or("-".into(), |s| format!("{:.1} ms", s * 1000.0)),
            bytes(r.sent)
        );
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no followers)");
    }
    out
}
