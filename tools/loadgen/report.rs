//! loadgen's results: the summary printed at the end, the `--json` file (stable field names,
//! documented in the README) and the `--plot` SVG (throughput, per-follower lag and latencies over
//! time).

use std::fmt::Write as _;

use ferry::status::json_str;
use hdrhistogram::Histogram;

use crate::machine::CpuSplit;

/// One sample of the run, taken every `SAMPLE_INTERVAL`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub mb_per_s: f64,
    /// Per follower, bytes behind at the chosen durability (`None`: not connected / unknown).
    pub lag_bytes: Vec<Option<u64>>,
    /// A fault (a killed, stopped or joining follower) was under way.
    pub in_fault: bool,
}

/// A writer's `append()` calls over one `SAMPLE_INTERVAL`, ending at `t_s`.
#[derive(Debug, Clone)]
pub struct WriterSample {
    pub t_s: f64,
    pub append_call_p99_ns: u64,
}

/// Append-to-ack latency of the messages appended in one `SAMPLE_INTERVAL` of the run, ending at
/// `t_s`: where in the run a tail happened.
#[derive(Debug, Clone)]
pub struct AckSample {
    pub t_s: f64,
    pub messages: u64,
    pub append_to_ack_p99_us: u64,
    pub append_to_ack_max_us: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub name: String,
    pub cpu_s: f64,
    pub rss_peak_kib: u64,
}

pub struct Report {
    pub mode: String,
    pub engine: String,
    /// The TCP congestion control the leader (or the fan-out) sent with: asked for, or the
    /// system's default.
    pub tcp_congestion: String,
    pub durability: String,
    pub followers: usize,
    pub writers: usize,
    /// `--writer-cpu`: the CPU the writers had to themselves.
    pub writer_cpu: Option<usize>,
    pub elapsed_s: f64,
    pub messages: u64,
    pub bytes: u64,
    pub append_to_ack_us: Histogram<u64>,
    pub append_to_ack_fault_us: Histogram<u64>,
    pub append_call_ns: Histogram<u64>,
    pub append_call_fault_ns: Histogram<u64>,
    pub leader: Usage,
    pub follower_usage: Vec<Usage>,
    pub samples: Vec<Sample>,
    /// Per writer (library and raw modes; none in write mode, where nothing is timed).
    pub writer_samples: Vec<Vec<WriterSample>>,
    /// Per interval of append time (none in write mode, where nothing is timed).
    pub ack_samples: Vec<AckSample>,
    pub kills: u64,
    pub stalls: u64,
    pub joins: u64,
    pub converged_s: Option<f64>,
    pub checksums_match: bool,
    /// `--dd-baseline`: the disk's raw rate measured before the run.
    pub dd_mb_per_s: Option<f64>,
    /// `--raw-baseline`: the same workload through the plain fan-out, run just before.
    pub raw_baseline: Option<RawBaseline>,
    /// The most bytes loadgen's own queue of appends not yet acked had allocated (it grows
    /// with the followers' lag, to up to twice the appends in it): part of `leader`'s RSS
    /// when the leader is embedded.
    pub latency_queue_peak_bytes: u64,
    /// How the machine's CPU time split while the writers ran (`None` without /proc/stat).
    pub machine_cpu: Option<CpuSplit>,
    /// The order of the free blocks this VM hands back to its host, if it does
    /// (`machine::free_page_reporting_order`).
    pub free_page_reporting_order: Option<u32>,
}

/// Steal at or above which the summary warns that the host, not the run, set the latencies.
const STEAL_WARN_PERCENT: f64 = 10.0;

/// What `--raw-baseline`'s fan-out run measured, read back from its JSON report.
pub struct RawBaseline {
    /// Messages over the time until every receiver held them all.
    pub delivered_messages_per_s: f64,
    pub append_to_received_p50_us: f64,
    pub append_to_received_p99_us: f64,
    pub cpu_s: f64,
}

impl RawBaseline {
    /// From a `--mode raw` run's `--json` report; `None` if a figure is missing (a run that
    /// delivered nothing has no latencies).
    pub fn from_json(json: &str) -> Option<RawBaseline> {
        let messages = json_number(json, &["messages"])?;
        let elapsed_s = json_number(json, &["elapsed_s"])?;
        let converged_s = json_number(json, &["converged_s"])?;
        Some(RawBaseline {
            delivered_messages_per_s: messages / (elapsed_s + converged_s).max(1e-9),
            append_to_received_p50_us: json_number(json, &["append_to_ack_us", "p50"])?,
            append_to_received_p99_us: json_number(json, &["append_to_ack_us", "p99"])?,
            cpu_s: json_number(json, &["leader", "cpu_s"])?,
        })
    }
}

/// The number at `path` in a report this program wrote (`Report::json`): each key is looked
/// for after the one before it, which in that format finds the field nested under it. `None`
/// for a missing key, a `null` on the way, or a value that is not a number.
pub fn json_number(json: &str, path: &[&str]) -> Option<f64> {
    let mut rest = json;
    for key in path {
        let needle = format!("\"{key}\": ");
        let at = rest.find(&needle)?;
        rest = &rest[at + needle.len()..];
        // Nothing is under a null: the next key found would be another field's.
        if rest.starts_with("null") {
            return None;
        }
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 3_600_000_000_000, 3) {
        Ok(h) => h,
        Err(_) => unreachable!("constant bounds are valid"),
    }
}

fn quantiles_json(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "null".into();
    }
    format!(
        "{{\"count\": {}, \"p50\": {}, \"p99\": {}, \"p999\": {}, \"max\": {}}}",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

fn quantiles_text(h: &Histogram<u64>, unit: &str) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {} {unit}, p99 {} {unit}, p999 {} {unit}, max {} {unit} ({} samples)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    )
}

fn usage_text(u: &Usage) -> String {
    format!(
        "{}: {:.2} CPU s, peak RSS {:.1} MiB",
        u.name,
        u.cpu_s,
        u.rss_peak_kib as f64 / 1024.0
    )
}

fn usage_json(u: &Usage) -> String {
    format!(
        "{{\"name\": {}, \"cpu_s\": {:.3}, \"rss_peak_mib\": {:.1}}}",
        json_str(&u.name),
        u.cpu_s,
        u.rss_peak_kib as f64 / 1024.0
    )
}

impl Report {
    pub fn messages_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed_s.max(1e-9)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed_s.max(1e-9)
    }

    pub fn latency_queue_peak_mib(&self) -> f64 {
        self.latency_queue_peak_bytes as f64 / (1024.0 * 1024.0)
    }

    /// Messages/s counting until every follower held everything (writing plus catching up).
    pub fn delivered_messages_per_s(&self) -> Option<f64> {
        let total_s = self.elapsed_s + self.converged_s?;
        Some(self.messages as f64 / total_s.max(1e-9))
    }

    /// MB/s counting until every follower held everything (writing plus catching up).
    pub fn acked_mb_per_s(&self) -> Option<f64> {
        let total_s = self.elapsed_s + self.converged_s?;
        Some(self.bytes as f64 / 1e6 / total_s.max(1e-9))
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let raw = self.mode == "raw";
        if raw {
            let _ = writeln!(
                s,
                "loadgen: raw mode (no ferry: splice to {} receiver(s), no protocol, no acks), \
                 {} writer(s), TCP {}",
                self.followers, self.writers, self.tcp_congestion
            );
        } else {
            let _ = writeln!(
                s,
                "loadgen: {} mode, {} engine, TCP {}, {} writer(s), {} follower(s) acking at {}",
                self.mode,
                self.engine,
                self.tcp_congestion,
                self.writers,
                self.followers,
                self.durability
            );
        }
        if let Some(cpu) = self.writer_cpu {
            let _ = writeln!(
                s,
                "  writers alone on CPU {cpu}, everything else on the others"
            );
        }
        let _ = writeln!(
            s,
            "  {} messages, {:.1} MB in {:.2} s: {:.0} messages/s, {:.1} MB/s",
            self.messages,
            self.bytes as f64 / 1e6,
            self.elapsed_s,
            self.messages_per_s(),
            self.mb_per_s()
        );
        let faulted = self.kills + self.stalls + self.joins > 0;
        if self.mode == "write" {
            // Nothing calls append(): `ferry lead` finds the writes itself, so what a follower
            // holds is known by the byte, not by the message.
            let _ = writeln!(
                s,
                "  no append() to time in write mode; acked at {} by all: {}",
                self.durability,
                self.acked_mb_per_s()
                    .map_or("not within the run".into(), |mb| format!(
                        "{mb:.1} MB/s from the first write to the last ack"
                    ))
            );
            if faulted {
                let _ = writeln!(
                    s,
                    "  faults: {} kills, {} stalls, {} joins",
                    self.kills, self.stalls, self.joins
                );
            }
        } else {
            let _ = writeln!(
                s,
                "  append() to {} by all: {}",
                if raw { "received" } else { "acked" },
                quantiles_text(&self.append_to_ack_us, "us")
            );
            let _ = writeln!(
                s,
                "  append() call: {}",
                quantiles_text(&self.append_call_ns, "ns")
            );
            if faulted {
                let _ = writeln!(
                    s,
                    "  during faults ({} kills, {} stalls, {} joins): append() to acked {}; \
                     append() call {}",
                    self.kills,
                    self.stalls,
                    self.joins,
                    quantiles_text(&self.append_to_ack_fault_us, "us"),
                    quantiles_text(&self.append_call_fault_ns, "ns")
                );
            }
        }
        if let (Some(dd), Some(acked)) = (self.dd_mb_per_s, self.acked_mb_per_s()) {
            let _ = writeln!(
                s,
                "  acked at {}: {acked:.1} MB/s = {:.2}x the dd baseline ({dd:.1} MB/s)",
                self.durability,
                acked / dd
            );
        }
        if let Some(raw) = &self.raw_baseline {
            let delivered = self.delivered_messages_per_s().unwrap_or(0.0);
            let _ = writeln!(
                s,
                "  against the plain fan-out run just before (--raw-baseline): {delivered:.0} \
                 messages/s delivered to every follower = {:.2}x its {:.0}; append() to acked \
                 p50 {} us, p99 {} us, against its append() to received p50 {:.0} us, p99 {:.0} us",
                delivered / raw.delivered_messages_per_s.max(1e-9),
                raw.delivered_messages_per_s,
                self.append_to_ack_us.value_at_quantile(0.5),
                self.append_to_ack_us.value_at_quantile(0.99),
                raw.append_to_received_p50_us,
                raw.append_to_received_p99_us
            );
        }
        let queue = if self.latency_queue_peak_bytes > 0 {
            format!(
                " (loadgen's queue of appends not yet acked held up to {:.1} MiB of it)",
                self.latency_queue_peak_mib()
            )
        } else {
            String::new()
        };
        let _ = writeln!(s, "  {}{queue}", usage_text(&self.leader));
        for u in &self.follower_usage {
            let _ = writeln!(s, "  {}", usage_text(u));
        }
        if let Some(m) = self.machine_cpu {
            let _ = writeln!(
                s,
                "  the machine's CPUs while the writers ran: {:.0}% busy, {:.0}% idle, {:.0}% \
                 stolen by the host{}",
                m.busy_percent,
                m.idle_percent,
                m.steal_percent,
                if m.steal_percent >= STEAL_WARN_PERCENT {
                    " (latency figures of such a run say more about the host than about ferry)"
                } else {
                    ""
                }
            );
        }
        if let Some(order) = self.free_page_reporting_order {
            let _ = writeln!(
                s,
                "  this VM hands freed memory back to its host (free page reporting, blocks of {} \
                 KiB and up): each new page written costs a fault on the host, so copies into \
                 new memory are slow and vary with how recently it was freed",
                4u64 << order
            );
        }
        let _ = writeln!(
            s,
            "  {}: {}{}",
            if raw {
                "every receiver's stream identical to the segments"
            } else {
                "followers identical to the leader"
            },
            if self.checksums_match { "yes" } else { "NO" },
            self.converged_s
                .map(|t| format!(" ({t:.3} s after the writers stopped)"))
                .unwrap_or_default()
        );
        s
    }

    pub fn json(&self) -> String {
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"mode\": {},", json_str(&self.mode));
        let _ = writeln!(s, "  \"engine\": {},", json_str(&self.engine));
        let _ = writeln!(
            s,
            "  \"tcp_congestion\": {},",
            json_str(&self.tcp_congestion)
        );
        let _ = writeln!(s, "  \"durability\": {},", json_str(&self.durability));
        let _ = writeln!(s, "  \"writers\": {},", self.writers);
        let _ = writeln!(
            s,
            "  \"writer_cpu\": {},",
            self.writer_cpu.map_or("null".into(), |c| c.to_string())
        );
        let _ = writeln!(s, "  \"followers\": {},", self.followers);
        let _ = writeln!(s, "  \"elapsed_s\": {:.3},", self.elapsed_s);
        let _ = writeln!(s, "  \"messages\": {},", self.messages);
        let _ = writeln!(s, "  \"bytes\": {},", self.bytes);
        let _ = writeln!(s, "  \"messages_per_s\": {:.1},", self.messages_per_s());
        let _ = writeln!(s, "  \"mb_per_s\": {:.3},", self.mb_per_s());
        let _ = writeln!(
            s,
            "  \"append_to_ack_us\": {},",
            quantiles_json(&self.append_to_ack_us)
        );
        let _ = writeln!(
            s,
            "  \"append_to_ack_during_faults_us\": {},",
            quantiles_json(&self.append_to_ack_fault_us)
        );
        let _ = writeln!(
            s,
            "  \"append_call_ns\": {},",
            quantiles_json(&self.append_call_ns)
        );
        let _ = writeln!(
            s,
            "  \"append_call_during_faults_ns\": {},",
            quantiles_json(&self.append_call_fault_ns)
        );
        let _ = writeln!(s, "  \"leader\": {},", usage_json(&self.leader));
        let _ = writeln!(
            s,
            "  \"latency_queue_peak_mib\": {:.1},",
            self.latency_queue_peak_mib()
        );
        let followers: Vec<String> = self.follower_usage.iter().map(usage_json).collect();
        let _ = writeln!(s, "  \"follower_usage\": [{}],", followers.join(", "));
        let _ = writeln!(
            s,
            "  \"machine_cpu\": {},",
            self.machine_cpu.map_or("null".into(), |m| format!(
                "{{\"busy_percent\": {:.1}, \"idle_percent\": {:.1}, \"steal_percent\": {:.1}}}",
                m.busy_percent, m.idle_percent, m.steal_percent
            ))
        );
        let _ = writeln!(
            s,
            "  \"free_page_reporting_order\": {},",
            self.free_page_reporting_order
                .map_or("null".into(), |o| o.to_string())
        );
        let _ = writeln!(s, "  \"kills\": {},", self.kills);
        let _ = writeln!(s, "  \"stalls\": {},", self.stalls);
        let _ = writeln!(s, "  \"joins\": {},", self.joins);
        let samples: Vec<String> = self
            .samples
            .iter()
            .map(|x| {
                let lags: Vec<String> = x
                    .lag_bytes
                    .iter()
                    .map(|l| l.map_or("null".into(), |v| v.to_string()))
                    .collect();
                format!(
                    "{{\"t_s\": {:.2}, \"mb_per_s\": {:.3}, \"lag_bytes\": [{}], \"in_fault\": {}}}",
                    x.t_s,
                    x.mb_per_s,
                    lags.join(", "),
                    x.in_fault
                )
            })
            .collect();
        let _ = writeln!(s, "  \"samples\": [\n    {}\n  ],", samples.join(",\n    "));
        let writers: Vec<String> = self
            .writer_samples
            .iter()
            .map(|w| {
                let points: Vec<String> = w
                    .iter()
                    .map(|x| {
                        format!(
                            "{{\"t_s\": {:.2}, \"append_call_p99_ns\": {}}}",
                            x.t_s, x.append_call_p99_ns
                        )
                    })
                    .collect();
                format!("[{}]", points.join(", "))
            })
            .collect();
        let _ = writeln!(
            s,
            "  \"writer_samples\": [\n    {}\n  ],",
            writers.join(",\n    ")
        );
        let acks: Vec<String> = self
            .ack_samples
            .iter()
            .map(|x| {
                format!(
                    "{{\"t_s\": {:.2}, \"messages\": {}, \"append_to_ack_p99_us\": {}, \
                     \"append_to_ack_max_us\": {}}}",
                    x.t_s, x.messages, x.append_to_ack_p99_us, x.append_to_ack_max_us
                )
            })
            .collect();
        let _ = writeln!(s, "  \"ack_samples\": [{}],", acks.join(",\n    "));
        let _ = writeln!(
            s,
            "  \"converged_s\": {},",
            self.converged_s
                .map_or("null".into(), |t| format!("{t:.3}"))
        );
        let _ = writeln!(
            s,
            "  \"acked_mb_per_s\": {},",
            self.acked_mb_per_s()
                .map_or("null".into(), |v| format!("{v:.3}"))
        );
        let _ = writeln!(
            s,
            "  \"dd_baseline_mb_per_s\": {},",
            self.dd_mb_per_s
                .map_or("null".into(), |v| format!("{v:.3}"))
        );
        match &self.raw_baseline {
            Some(raw) => {
                let _ = writeln!(
                    s,
                    "  \"raw_baseline\": {{\"delivered_messages_per_s\": {:.1}, \
                     \"append_to_received_p50_us\": {:.0}, \"append_to_received_p99_us\": {:.0}, \
                     \"cpu_s\": {:.3}}},",
                    raw.delivered_messages_per_s,
                    raw.append_to_received_p50_us,
                    raw.append_to_received_p99_us,
                    raw.cpu_s
                );
                let _ = writeln!(
                    s,
                    "  \"delivered_messages_per_s_vs_raw\": {},",
                    self.delivered_messages_per_s()
                        .map_or("null".into(), |v| format!(
                            "{:.3}",
                            v / raw.delivered_messages_per_s.max(1e-9)
                        ))
                );
            }
            None => {
                let _ = writeln!(s, "  \"raw_baseline\": null,");
                let _ = writeln!(s, "  \"delivered_messages_per_s_vs_raw\": null,");
            }
        }
        let _ = writeln!(s, "  \"checksums_match\": {}", self.checksums_match);
        s.push_str("}\n");
        s
    }

    /// Three panels over time: throughput, each follower's lag, and the writers' `append()` p99;
    /// faults shaded.
    pub fn svg(&self) -> String {
        const W: f64 = 960.0;
        const PANEL_H: f64 = 220.0;
        const LEFT: f64 = 90.0;
        const RIGHT: f64 = 20.0;
        const TOP: f64 = 40.0;
        const GAP: f64 = 70.0;
        let colors = [
            "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        ];
        let t_max = self.samples.last().map_or(1.0, |x| x.t_s).max(1e-3);
        let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / t_max;
        let mut s = String::new();
        let h_total = TOP + 4.0 * PANEL_H + 3.0 * GAP + 50.0;
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h_total}\" font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(
            s,
            "<text x=\"{LEFT}\" y=\"20\" font-size=\"15\">ferry loadgen: {} mode, {} followers at {}, {:.0} msg/s, {:.1} MB/s</text>",
            self.mode,
            self.followers,
            self.durability,
            self.messages_per_s(),
            self.mb_per_s()
        );
        // Each sample in a fault shades the interval it ends.
        let mut fault_spans: Vec<(f64, f64)> = Vec::new();
        let mut from_s = 0.0;
        for p in &self.samples {
            if p.in_fault {
                match fault_spans.last_mut() {
                    Some(span) if span.1 == from_s => span.1 = p.t_s,
                    _ => fault_spans.push((from_s, p.t_s)),
                }
            }
            from_s = p.t_s;
        }
        // A panel's frame, title, scale and fault shading.
        let panel = |s: &mut String, top: f64, title: &str, max: f64, unit: &str| {
            for &(a, b) in &fault_spans {
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{PANEL_H}\" fill=\"#fdd\"/>",
                    x(a),
                    x(b) - x(a)
                );
            }
            let _ = writeln!(
                s,
                "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL_H}\" fill=\"none\" stroke=\"#999\"/>",
                W - LEFT - RIGHT
            );
            let _ = writeln!(s, "<text x=\"{LEFT}\" y=\"{}\">{title}</text>", top - 6.0);
            for i in 0..=4 {
                let v = max * f64::from(i) / 4.0;
                let y = top + PANEL_H - PANEL_H * f64::from(i) / 4.0;
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#eee\"/>",
                    LEFT - 6.0,
                    y + 4.0,
                    human(v, unit),
                    W - RIGHT
                );
            }
        };
        // One line in the panel at `top` whose scale ends at `max`, through (t_s, value) points.
        let curve = |s: &mut String,
                     top: f64,
                     max: f64,
                     color: &str,
                     points: &mut dyn Iterator<Item = (f64, f64)>| {
            let points: Vec<String> = points
                .map(|(t, v)| format!("{:.1},{:.1}", x(t), top + PANEL_H - PANEL_H * v / max))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                points.join(" ")
            );
        };
        let mb_max = scale_top(self.samples.iter().map(|x| x.mb_per_s), 1e-9);
        panel(&mut s, TOP, "throughput (faults shaded)", mb_max, "MB/s");
        curve(
            &mut s,
            TOP,
            mb_max,
            "#333",
            &mut self.samples.iter().map(|p| (p.t_s, p.mb_per_s)),
        );
        let top2 = TOP + PANEL_H + GAP;
        let lag_max = scale_top(
            self.samples
                .iter()
                .flat_map(|x| x.lag_bytes.iter().flatten())
                .map(|&v| v as f64),
            1.0,
        );
        panel(
            &mut s,
            top2,
            &format!("lag at {} (bytes)", self.durability),
            lag_max,
            "B",
        );
        for f in 0..self.followers {
            let color = colors[f % colors.len()];
            curve(
                &mut s,
                top2,
                lag_max,
                color,
                &mut self
                    .samples
                    .iter()
                    .filter_map(|p| Some((p.t_s, (*p.lag_bytes.get(f)?)? as f64))),
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">follower {}</text>",
                W - RIGHT - 90.0,
                top2 + 16.0 + 14.0 * f as f64,
                f + 1
            );
        }
        let top3 = top2 + PANEL_H + GAP;
        let us_max = scale_top(
            self.ack_samples
                .iter()
                .map(|a| a.append_to_ack_p99_us as f64),
            1.0,
        );
        panel(
            &mut s,
            top3,
            &format!(
                "append() to acked by all at {}, p99 of each 100 ms of appends (us)",
                self.durability
            ),
            us_max,
            "us",
        );
        curve(
            &mut s,
            top3,
            us_max,
            "#333",
            &mut self
                .ack_samples
                .iter()
                .map(|a| (a.t_s, a.append_to_ack_p99_us as f64)),
        );
        let top4 = top3 + PANEL_H + GAP;
        let ns_max = scale_top(
            self.writer_samples
                .iter()
                .flatten()
                .map(|w| w.append_call_p99_ns as f64),
            1.0,
        );
        panel(
            &mut s,
            top4,
            "writers' append() call, p99 of each 100 ms (ns)",
            ns_max,
            "ns",
        );
        for (w, samples) in self.writer_samples.iter().enumerate() {
            curve(
                &mut s,
                top4,
                ns_max,
                colors[w % colors.len()],
                &mut samples.iter().map(|p| (p.t_s, p.append_call_p99_ns as f64)),
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds (0 to {t_max:.1})</text>",
            (LEFT + W - RIGHT) / 2.0,
            top4 + PANEL_H + 30.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// The top of a panel's scale: 10% above the largest value, or above `floor` if none is larger.
fn scale_top(values: impl Iterator<Item = f64>, floor: f64) -> f64 {
    values.fold(floor, f64::max) * 1.1
}

fn human(v: f64, unit: &str) -> String {
    let (v, prefix) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if unit == "B" {
        format!("{v:.1} {prefix}B")
    } else {
        format!("{v:.1}{prefix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of a raw run's report that `--raw-baseline` reads, nested where `json()`
    /// puts them, next to fields whose names contain theirs.
    #[test]
    fn a_raw_baseline_is_read_from_the_fields_a_raw_report_has() {
        let json = "{\n  \"mode\": \"raw\",\n  \"elapsed_s\": 4.000,\n  \"messages\": 2000000,\n  \
                    \"messages_per_s\": 500000.0,\n  \"append_to_ack_us\": {\"count\": 2000000, \
                    \"p50\": 110, \"p99\": 1500, \"p999\": 3000, \"max\": 9000},\n  \
                    \"append_call_ns\": {\"count\": 2000000, \"p50\": 70, \"p99\": 600},\n  \
                    \"leader\": {\"name\": \"loadgen\", \"cpu_s\": 9.250, \"rss_peak_mib\": 20.0},\n  \
                    \"converged_s\": 1.000,\n  \"checksums_match\": true\n}\n";
        let raw = RawBaseline::from_json(json).unwrap();
        assert_eq!(raw.delivered_messages_per_s, 400_000.0);
        assert_eq!(raw.append_to_received_p50_us, 110.0);
        assert_eq!(raw.append_to_received_p99_us, 1500.0);
        assert_eq!(raw.cpu_s, 9.25);
        // A run that never converged has no delivered rate.
        let unconverged = json.replace("\"converged_s\": 1.000", "\"converged_s\": null");
        assert!(RawBaseline::from_json(&unconverged).is_none());
    }

    /// A field that is `null` (no samples) has no number under it: the one of the next object
    /// with that key is not taken for its own.
    #[test]
    fn a_null_object_has_no_fields_and_lends_none_from_the_next() {
        let json =
            "{\n  \"append_to_ack_us\": null,\n  \"append_to_ack_during_faults_us\": null,\n  \
                    \"append_call_ns\": {\"count\": 5, \"p50\": 70, \"p99\": 600}\n}\n";
        assert_eq!(json_number(json, &["append_to_ack_us", "p99"]), None);
        assert_eq!(json_number(json, &["append_call_ns", "p99"]), Some(600.0));
    }
}
