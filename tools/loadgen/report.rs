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
    /// How long the leader's sending thread (`procs::SENDER_THREAD`) waited for a CPU since the
    /// sample before: where it waits, the followers' payloads and acks do. `None` in raw mode
    /// or without schedstats.
    pub sender_cpu_wait_ms: Option<f64>,
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

/// What a fault did to a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL, then started again at once (`--kill-follower-every`).
    Kill,
    /// SIGSTOP, then SIGCONT (`--stall-follower`).
    Stall,
    /// Started late, with a full sync to do (`--join-follower`).
    Join,
    /// No follower: the preload copied over loopback with splice (`--raw-join`), the baseline
    /// of `Join`.
    RawJoin,
}

impl FaultKind {
    /// Its name in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stall => "stall",
            FaultKind::Join => "join",
            FaultKind::RawJoin => "raw_join",
        }
    }

    /// What the plot says happened to the follower.
    fn happened(self) -> &'static str {
        match self {
            FaultKind::Kill => "killed",
            FaultKind::Stall => "stopped",
            FaultKind::Join => "joins",
            FaultKind::RawJoin => "copies the preload (no ferry)",
        }
    }
}

/// One injected fault, in seconds from the start of the run.
#[derive(Debug, Clone)]
pub struct FaultSpan {
    pub kind: FaultKind,
    /// The follower it hit, by its process name (`follower2`); a raw join's receiver, `raw1`.
    pub follower: String,
    /// When it began: SIGKILL or SIGSTOP sent, the late follower started, the raw copy begun.
    pub at_s: f64,
    /// When the follower could go on: started again, sent SIGCONT, or (joining) started; when
    /// a raw join's copy was done.
    pub ended_s: f64,
    /// When every follower held what had been written by `ended_s`, at the run's durability;
    /// `None` if that did not happen within loadgen's convergence timeout, or if there was no
    /// leader to ask (raw mode). A raw join's: when its copy was done, `None` if it failed.
    pub recovered_s: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub name: String,
    pub cpu_s: f64,
    /// How long its threads waited for a CPU (`procs::CpuWaits`); `None` without schedstats.
    pub cpu_wait_s: Option<f64>,
    /// The leader's: how long of it its thread that sends to the followers waited
    /// (`procs::SENDER_THREAD`); `None` for a follower, in raw mode, or without schedstats.
    pub sender_cpu_wait_s: Option<f64>,
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
    /// `append()` calls before the first fault began: the same run's baseline for
    /// `append_call_fault_ns` (with `--join-follower` as the only fault, before any follower).
    pub append_call_before_faults_ns: Histogram<u64>,
    pub leader: Usage,
    pub follower_usage: Vec<Usage>,
    /// Per follower process (`follower1` first), its MARK-to-ACK latency as the leader measured
    /// it over its last connection (p50, p99, p999 in us), read as the run ended; `None` for one
    /// not connected then; empty with no leader (raw mode).
    pub follower_ack_latency_us: Vec<Option<[u64; 3]>>,
    pub samples: Vec<Sample>,
    /// Per writer (library and raw modes; none in write mode, where nothing is timed).
    pub writer_samples: Vec<Vec<WriterSample>>,
    /// Per interval of append time (none in write mode, where nothing is timed).
    pub ack_samples: Vec<AckSample>,
    /// Every fault injected, in order (the counts of each kind are `fault_count`).
    pub faults: Vec<FaultSpan>,
    pub converged_s: Option<f64>,
    pub checksums_match: bool,
    /// `--dd-baseline`: the disk's raw rate measured before the run.
    pub dd_mb_per_s: Option<f64>,
    /// `--dd-baseline` again, into files of a segment each (`None`: the run fits in one).
    pub dd_per_segment_mb_per_s: Option<f64>,
    /// `--raw-baseline`: the same workload through the plain fan-out, run just before.
    pub raw_baseline: Option<RawBaseline>,
    /// `--mode raw`: whether the receivers acked over their sockets (`--raw-acks`), so that
    /// `append_to_ack_us` is to acked, not to received; `None` in the other modes.
    pub raw_acks: Option<bool>,
    /// The most bytes loadgen's own queue of appends not yet acked had allocated (it grows
    /// with the followers' lag, to up to twice the appends in it): part of `leader`'s RSS
    /// when the leader is embedded.
    pub latency_queue_peak_bytes: u64,
    /// How the machine's CPU time split while the writers ran (`None` without /proc/stat).
    pub machine_cpu: Option<CpuSplit>,
    /// How long loadgen's confirmer thread, which times each message to acked, waited for a
    /// CPU over the run: a wait of its own adds to every latency it measures then. `None`
    /// without schedstats.
    pub confirmer_cpu_wait_s: Option<f64>,
    /// The order of the free blocks this VM hands back to its host, if it does
    /// (`machine::free_page_reporting_order`).
    pub free_page_reporting_order: Option<u32>,
}

/// Faults the summary lists one per line; the rest are counted (all are in the JSON).
const FAULT_LINES_MAX: usize = 10;

/// Steal at or above which the summary warns that the host, not the run, set the latencies.
const STEAL_WARN_PERCENT: f64 = 10.0;

/// What `--raw-baseline`'s fan-out run measured, read back from its JSON report.
pub struct RawBaseline {
    /// Messages over the time until every receiver held them all.
    pub delivered_messages_per_s: f64,
    /// The same in MB/s.
    pub delivered_mb_per_s: f64,
    /// What its receivers did before they counted a byte: "written" or "synced".
    pub durability: &'static str,
    /// How its writer wrote: "mmap" or "write".
    pub writer: &'static str,
    /// Its receivers acked over their sockets (its report's `raw_acks`): its latencies are
    /// append() to acked, not to received, though the fields keep their names.
    pub acks: bool,
    pub append_to_received_p50_us: f64,
    pub append_to_received_p99_us: f64,
    pub cpu_s: f64,
}

impl RawBaseline {
    /// From a `--mode raw` run's `--json` report, run with `durability` and `writer`; `None`
    /// if a figure is missing (a run that delivered nothing has no latencies).
    pub fn from_json(
        json: &str,
        durability: &'static str,
        writer: &'static str,
    ) -> Option<RawBaseline> {
        let messages = json_number(json, &["messages"])?;
        let bytes = json_number(json, &["bytes"])?;
        let elapsed_s = json_number(json, &["elapsed_s"])?;
        let converged_s = json_number(json, &["converged_s"])?;
        let total_s = (elapsed_s + converged_s).max(1e-9);
        Some(RawBaseline {
            delivered_messages_per_s: messages / total_s,
            delivered_mb_per_s: bytes / 1e6 / total_s,
            durability,
            writer,
            acks: json.contains("\"raw_acks\": true"),
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
    let waited = match (u.cpu_wait_s, u.sender_cpu_wait_s) {
        (Some(all), Some(sender)) => format!(
            ", waited {all:.2} s for a CPU ({sender:.2} s of it the thread sending to the \
             followers)"
        ),
        (Some(all), None) => format!(", waited {all:.2} s for a CPU"),
        (None, _) => String::new(),
    };
    format!(
        "{}: {:.2} CPU s{waited}, peak RSS {:.1} MiB",
        u.name,
        u.cpu_s,
        u.rss_peak_kib as f64 / 1024.0
    )
}

/// A process's usage; `sender` for the leader's, which names its sending thread's wait too.
fn usage_json(u: &Usage, sender: bool) -> String {
    let sender = if sender {
        format!(
            ", \"sender_cpu_wait_s\": {}",
            u.sender_cpu_wait_s
                .map_or("null".into(), |v| format!("{v:.3}"))
        )
    } else {
        String::new()
    };
    format!(
        "{{\"name\": {}, \"cpu_s\": {:.3}, \"cpu_wait_s\": {}{sender}, \"rss_peak_mib\": {:.1}}}",
        json_str(&u.name),
        u.cpu_s,
        u.cpu_wait_s.map_or("null".into(), |v| format!("{v:.3}")),
        u.rss_peak_kib as f64 / 1024.0
    )
}

impl Report {
    /// How many faults of `kind` the run injected.
    pub fn fault_count(&self, kind: FaultKind) -> u64 {
        self.faults.iter().filter(|f| f.kind == kind).count() as u64
    }

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
        let faulted = !self.faults.is_empty();
        let (kills, stalls, joins) = (
            self.fault_count(FaultKind::Kill),
            self.fault_count(FaultKind::Stall),
            self.fault_count(FaultKind::Join),
        );
        let raw_joins = match self.fault_count(FaultKind::RawJoin) {
            0 => String::new(),
            n => format!(", {n} raw joins"),
        };
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
                    "  faults: {kills} kills, {stalls} stalls, {joins} joins{raw_joins}"
                );
            }
        } else {
            let _ = writeln!(
                s,
                "  append() to {} by all: {}",
                if raw && self.raw_acks != Some(true) {
                    "received"
                } else {
                    "acked"
                },
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
                    "  during faults ({kills} kills, {stalls} stalls, {joins} joins{raw_joins}): \
                     append() to acked {}; append() call {}",
                    quantiles_text(&self.append_to_ack_fault_us, "us"),
                    quantiles_text(&self.append_call_fault_ns, "ns")
                );
                let _ = writeln!(
                    s,
                    "  before the first fault, in this run: append() call {}",
                    quantiles_text(&self.append_call_before_faults_ns, "ns")
                );
            }
        }
        for f in self.faults.iter().take(FAULT_LINES_MAX) {
            let what = match f.kind {
                FaultKind::Kill => {
                    format!("killed at {:.2} s, restarted at {:.2} s", f.at_s, f.ended_s)
                }
                FaultKind::Stall => {
                    format!("stopped at {:.2} s, resumed at {:.2} s", f.at_s, f.ended_s)
                }
                FaultKind::Join => format!("started late at {:.2} s", f.at_s),
                FaultKind::RawJoin => format!("raw copy started at {:.2} s", f.at_s),
            };
            let _ = writeln!(
                s,
                "    {} {what}, {}",
                f.follower,
                f.recovered_s
                    .map_or("not caught up within the run".into(), |t| format!(
                        "caught up {:.3} s after it began",
                        t - f.at_s
                    ))
            );
        }
        if self.faults.len() > FAULT_LINES_MAX {
            let _ = writeln!(
                s,
                "    and {} more (faults[] in the --json report)",
                self.faults.len() - FAULT_LINES_MAX
            );
        }
        if let (Some(dd), Some(acked)) = (self.dd_mb_per_s, self.acked_mb_per_s()) {
            let per_segment = self.dd_per_segment_mb_per_s.map_or(String::new(), |per| {
                format!(", {:.2}x dd per segment file ({per:.1} MB/s)", acked / per)
            });
            let _ = writeln!(
                s,
                "  acked at {}: {acked:.1} MB/s = {:.2}x the dd baseline ({dd:.1} MB/s){per_segment}",
                self.durability,
                acked / dd
            );
        }
        if let Some(raw) = &self.raw_baseline {
            if self.mode == "write" {
                // No append() to time: the byte rates, as the synced target is stated.
                let acked = self.acked_mb_per_s().unwrap_or(0.0);
                let _ = writeln!(
                    s,
                    "  against the plain fan-out run just before (--raw-baseline): {acked:.1} \
                     MB/s acked at {} by every follower = {:.2}x its {:.1} MB/s",
                    self.durability,
                    acked / raw.delivered_mb_per_s.max(1e-9),
                    raw.delivered_mb_per_s
                );
            } else {
                let delivered = self.delivered_messages_per_s().unwrap_or(0.0);
                let _ = writeln!(
                    s,
                    "  against the plain fan-out run just before (--raw-baseline): {delivered:.0} \
                     messages/s delivered to every follower = {:.2}x its {:.0}; append() to \
                     acked p50 {} us, p99 {} us, against its append() to {} p50 {:.0} us, \
                     p99 {:.0} us",
                    delivered / raw.delivered_messages_per_s.max(1e-9),
                    raw.delivered_messages_per_s,
                    self.append_to_ack_us.value_at_quantile(0.5),
                    self.append_to_ack_us.value_at_quantile(0.99),
                    if raw.acks { "acked" } else { "received" },
                    raw.append_to_received_p50_us,
                    raw.append_to_received_p99_us
                );
            }
            if let Some(dd) = self.dd_mb_per_s {
                // Whether the target can be met here at all: the same pipeline without ferry.
                let _ = writeln!(
                    s,
                    "  the plain fan-out: {:.1} MB/s {} by every receiver = {:.2}x the dd baseline",
                    raw.delivered_mb_per_s,
                    raw.durability,
                    raw.delivered_mb_per_s / dd.max(1e-9)
                );
            }
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
        for (i, u) in self.follower_usage.iter().enumerate() {
            let round_trip = match self.follower_ack_latency_us.get(i) {
                Some(Some([p50, p99, _])) => {
                    format!(", MARK to ACK p50 {p50} us, p99 {p99} us (as the leader measured it)")
                }
                _ => String::new(),
            };
            let _ = writeln!(s, "  {}{round_trip}", usage_text(u));
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
        if let Some(wait_s) = self.confirmer_cpu_wait_s {
            let _ = writeln!(
                s,
                "  loadgen's confirmer, which times each ack, waited {wait_s:.2} s for a CPU \
                 (while it waits, the acks it has yet to see look later than they came)"
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
        let _ = writeln!(
            s,
            "  \"raw_acks\": {},",
            self.raw_acks.map_or("null".into(), |a| a.to_string())
        );
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
        let _ = writeln!(
            s,
            "  \"append_call_before_faults_ns\": {},",
            quantiles_json(&self.append_call_before_faults_ns)
        );
        let _ = writeln!(s, "  \"leader\": {},", usage_json(&self.leader, true));
        let _ = writeln!(
            s,
            "  \"latency_queue_peak_mib\": {:.1},",
            self.latency_queue_peak_mib()
        );
        let followers: Vec<String> = self
            .follower_usage
            .iter()
            .map(|u| usage_json(u, false))
            .collect();
        let _ = writeln!(s, "  \"follower_usage\": [{}],", followers.join(", "));
        let round_trips: Vec<String> = self
            .follower_ack_latency_us
            .iter()
            .map(|l| match l {
                Some([p50, p99, p999]) => {
                    format!("{{\"p50\": {p50}, \"p99\": {p99}, \"p999\": {p999}}}")
                }
                None => "null".into(),
            })
            .collect();
        let _ = writeln!(
            s,
            "  \"follower_ack_latency_us\": [{}],",
            round_trips.join(", ")
        );
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
            "  \"confirmer_cpu_wait_s\": {},",
            self.confirmer_cpu_wait_s
                .map_or("null".into(), |v| format!("{v:.3}"))
        );
        let _ = writeln!(
            s,
            "  \"free_page_reporting_order\": {},",
            self.free_page_reporting_order
                .map_or("null".into(), |o| o.to_string())
        );
        for (name, kind) in [
            ("kills", FaultKind::Kill),
            ("stalls", FaultKind::Stall),
            ("joins", FaultKind::Join),
            ("raw_joins", FaultKind::RawJoin),
        ] {
            let _ = writeln!(s, "  \"{name}\": {},", self.fault_count(kind));
        }
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|f| {
                format!(
                    "{{\"kind\": {}, \"follower\": {}, \"at_s\": {:.3}, \"ended_s\": {:.3}, \
                     \"recovered_s\": {}}}",
                    json_str(f.kind.name()),
                    json_str(&f.follower),
                    f.at_s,
                    f.ended_s,
                    f.recovered_s.map_or("null".into(), |t| format!("{t:.3}"))
                )
            })
            .collect();
        let _ = writeln!(s, "  \"faults\": [{}],", faults.join(",\n    "));
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
                    "{{\"t_s\": {:.2}, \"mb_per_s\": {:.3}, \"lag_bytes\": [{}], \"in_fault\": {}, \"sender_cpu_wait_ms\": {}}}",
                    x.t_s,
                    x.mb_per_s,
                    lags.join(", "),
                    x.in_fault,
                    x.sender_cpu_wait_ms
                        .map_or("null".into(), |v| format!("{v:.3}"))
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
        let _ = writeln!(
            s,
            "  \"dd_per_segment_mb_per_s\": {},",
            self.dd_per_segment_mb_per_s
                .map_or("null".into(), |v| format!("{v:.3}"))
        );
        match &self.raw_baseline {
            Some(raw) => {
                let _ = writeln!(
                    s,
                    "  \"raw_baseline\": {{\"delivered_messages_per_s\": {:.1}, \
                     \"delivered_mb_per_s\": {:.3}, \"durability\": {}, \"writer\": {}, \
                     \"acks\": {}, \"append_to_received_p50_us\": {:.0}, \
                     \"append_to_received_p99_us\": {:.0}, \"cpu_s\": {:.3}}},",
                    raw.delivered_messages_per_s,
                    raw.delivered_mb_per_s,
                    json_str(raw.durability),
                    json_str(raw.writer),
                    raw.acks,
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

    /// Four panels over time (throughput, each follower's lag, append-to-ack p99, the writers'
    /// `append()` p99) on one time axis, each fault shaded and named where it began.
    pub fn svg(&self) -> String {
        const W: f64 = 960.0;
        const PANEL_H: f64 = 220.0;
        const LEFT: f64 = 90.0;
        const RIGHT: f64 = 20.0;
        const TOP: f64 = 70.0;
        const GAP: f64 = 70.0;
        /// About how wide a character of the 12 px labels is.
        const CHAR_W: f64 = 6.5;
        let colors = [
            "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        ];
        let t_max = self.samples.last().map_or(1.0, |x| x.t_s).max(1e-3);
        let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t.clamp(0.0, t_max) / t_max;
        let t_step = time_step(t_max);
        let mut s = String::new();
        let h_total = TOP + 5.0 * PANEL_H + 4.0 * GAP + 60.0;
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
        if !self.faults.is_empty() {
            let _ = writeln!(
                s,
                "<text x=\"{LEFT}\" y=\"38\" fill=\"#555\">shaded: each fault, from when it began \
                 until every follower held what was written by its end; darker while the follower \
                 was down or stopped</text>"
            );
        }
        // A panel's frame, title, scales and fault shading; returns the top of its scale.
        let panel = |s: &mut String, top: f64, title: &str, max: f64, unit: Unit| -> f64 {
            let mut label_end = f64::MIN;
            for f in &self.faults {
                let end = f.recovered_s.unwrap_or(f.ended_s).max(f.ended_s);
                let what = format!("{} {}", f.follower, f.kind.happened());
                for (to, fill) in [(end, "#fdecec"), (f.ended_s, "#f8d2d2")] {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{PANEL_H}\" fill=\"{fill}\"><title>{what} at {:.2} s, until {:.2} s, caught up {}</title></rect>",
                        x(f.at_s),
                        (x(to) - x(f.at_s)).max(1.0),
                        f.at_s,
                        f.ended_s,
                        f.recovered_s
                            .map_or("not within the run".into(), |t| format!("at {t:.2} s"))
                    );
                }
                // Named where it began (moved left to end inside the panel), unless that would
                // overlap the name before.
                let width = CHAR_W * what.len() as f64;
                let at = (x(f.at_s) + 3.0).min(W - RIGHT - 3.0 - width);
                if at > label_end {
                    let _ = writeln!(
                        s,
                        "<text x=\"{at:.1}\" y=\"{}\" fill=\"#a33\">{what}</text>",
                        top + 14.0
                    );
                    label_end = at + width;
                }
            }
            let _ = writeln!(
                s,
                "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL_H}\" fill=\"none\" stroke=\"#999\"/>",
                W - LEFT - RIGHT
            );
            let _ = writeln!(s, "<text x=\"{LEFT}\" y=\"{}\">{title}</text>", top - 6.0);
            let (step, scale_top) = scale(max);
            for i in 0..=(scale_top / step).round() as u32 {
                let v = step * f64::from(i);
                let y = top + PANEL_H - PANEL_H * v / scale_top;
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
                    LEFT - 6.0,
                    y + 4.0,
                    label(v, unit),
                    W - RIGHT
                );
            }
            for i in 0..=(t_max / t_step + 1e-9).floor() as u32 {
                let t = t_step * f64::from(i);
                let _ = writeln!(
                    s,
                    "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{1}\" stroke=\"#eee\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\" fill=\"#555\">{3}</text>",
                    x(t),
                    top + PANEL_H,
                    top + PANEL_H + 15.0,
                    seconds_label(t)
                );
            }
            scale_top
        };
        // One line in the panel at `top` whose scale ends at `max`, through (t_s, value) points.
        // A line in the panel at `top` whose scale ends at `max`, through (t_s, value) points;
        // a point without a value (a follower not connected) breaks it.
        let curve = |s: &mut String,
                     top: f64,
                     max: f64,
                     color: &str,
                     points: &mut dyn Iterator<Item = (f64, Option<f64>)>| {
            let mut runs: Vec<Vec<String>> = vec![Vec::new()];
            for (t, v) in points {
                match (v, runs.last_mut()) {
                    (Some(v), Some(run)) => run.push(format!(
                        "{:.1},{:.1}",
                        x(t),
                        top + PANEL_H - PANEL_H * v / max
                    )),
                    _ => runs.push(Vec::new()),
                }
            }
            for run in runs.iter().filter(|r| !r.is_empty()) {
                let _ = writeln!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                    run.join(" ")
                );
            }
        };
        // Said in a panel with nothing to draw.
        let empty = |s: &mut String, top: f64, why: &str| {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{why}</text>",
                (LEFT + W - RIGHT) / 2.0,
                top + PANEL_H / 2.0
            );
        };
        let untimed = if self.mode == "write" {
            "nothing timed: write mode calls no append()"
        } else {
            "no samples"
        };
        let largest = |values: &mut dyn Iterator<Item = f64>| values.fold(0.0, f64::max);
        let mb_max = panel(
            &mut s,
            TOP,
            "throughput: what the writers wrote, per second",
            largest(&mut self.samples.iter().map(|x| x.mb_per_s)),
            Unit::MbPerS,
        );
        curve(
            &mut s,
            TOP,
            mb_max,
            "#333",
            &mut self.samples.iter().map(|p| (p.t_s, Some(p.mb_per_s))),
        );
        let top2 = TOP + PANEL_H + GAP;
        let lag_max = panel(
            &mut s,
            top2,
            &format!("lag: bytes each follower is behind at {}", self.durability),
            largest(
                &mut self
                    .samples
                    .iter()
                    .flat_map(|x| x.lag_bytes.iter().flatten())
                    .map(|&v| v as f64),
            ),
            Unit::Bytes,
        );
        for f in 0..self.followers {
            let color = colors[f % colors.len()];
            curve(
                &mut s,
                top2,
                lag_max,
                color,
                &mut self.samples.iter().map(|p| {
                    let lag = p.lag_bytes.get(f).copied().flatten();
                    (p.t_s, lag.map(|v| v as f64))
                }),
            );
            // The legend on the title's line, right-aligned, clear of the fault names.
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"{color}\">follower{}</text>",
                W - RIGHT - 80.0 * (self.followers - 1 - f) as f64,
                top2 - 6.0,
                f + 1
            );
        }
        let top3 = top2 + PANEL_H + GAP;
        let us_max = panel(
            &mut s,
            top3,
            &format!(
                "append() to acked by all at {}: p99 of the messages appended in each 100 ms",
                self.durability
            ),
            largest(
                &mut self
                    .ack_samples
                    .iter()
                    .map(|a| a.append_to_ack_p99_us as f64),
            ),
            Unit::Us,
        );
        curve(
            &mut s,
            top3,
            us_max,
            "#333",
            &mut self
                .ack_samples
                .iter()
                .map(|a| (a.t_s, Some(a.append_to_ack_p99_us as f64))),
        );
        if self.ack_samples.is_empty() {
            empty(&mut s, top3, untimed);
        }
        // Beneath the acks' p99, on the same time axis: where the sending thread waited for a
        // CPU, acks came late (docs/PERFORMANCE.md, T3).
        let top4 = top3 + PANEL_H + GAP;
        let wait_max = panel(
            &mut s,
            top4,
            "the leader's thread sending to the followers: time it waited for a CPU in each 100 ms",
            largest(
                &mut self
                    .samples
                    .iter()
                    .filter_map(|x| x.sender_cpu_wait_ms)
                    .map(|ms| ms * 1e3),
            ),
            Unit::Us,
        );
        curve(
            &mut s,
            top4,
            wait_max,
            "#333",
            &mut self
                .samples
                .iter()
                .map(|p| (p.t_s, p.sender_cpu_wait_ms.map(|ms| ms * 1e3))),
        );
        if self.samples.iter().all(|x| x.sender_cpu_wait_ms.is_none()) {
            let why = if self.mode == "raw" {
                "no ferry leader in raw mode"
            } else {
                "not known: the kernel keeps no schedstats"
            };
            empty(&mut s, top4, why);
        }
        let top5 = top4 + PANEL_H + GAP;
        let ns_max = panel(
            &mut s,
            top5,
            "the writers' append() call: p99 of each 100 ms",
            largest(
                &mut self
                    .writer_samples
                    .iter()
                    .flatten()
                    .map(|w| w.append_call_p99_ns as f64),
            ),
            Unit::Ns,
        );
        for (w, samples) in self.writer_samples.iter().enumerate() {
            curve(
                &mut s,
                top5,
                ns_max,
                match self.writer_samples.len() {
                    1 => "#333",
                    _ => colors[w % colors.len()],
                },
                &mut samples
                    .iter()
                    .map(|p| (p.t_s, Some(p.append_call_p99_ns as f64))),
            );
        }
        if self.writer_samples.iter().all(Vec::is_empty) {
            empty(&mut s, top5, untimed);
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time from the start of the run</text>",
            (LEFT + W - RIGHT) / 2.0,
            top5 + PANEL_H + 40.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// What a scale's values are.
#[derive(Debug, Clone, Copy)]
enum Unit {
    MbPerS,
    Bytes,
    Us,
    Ns,
}

/// A scale for values up to `max`: a round step (1, 2, 2.5 or 5 times a power of ten) that
/// gives about five ticks, and the first multiple of it above `max`.
fn scale(max: f64) -> (f64, f64) {
    if max.is_nan() || max <= 0.0 {
        return (1.0, 1.0);
    }
    let rough = max / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * magnitude);
    (step, ((max / step).floor() + 1.0) * step)
}

/// The time axis's step for a run of `t_max` seconds: at most six intervals.
fn time_step(t_max: f64) -> f64 {
    const STEPS_S: [f64; 14] = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ];
    STEPS_S
        .into_iter()
        .find(|&step| t_max / step <= 6.0)
        .unwrap_or(3600.0)
}

/// `v` with at most two decimals, without trailing zeros.
fn trimmed(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `v` (in `unit`) in the largest unit it is at least one of: "250 ms", "1.5 GB/s".
fn label(v: f64, unit: Unit) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let units: &[(f64, &str)] = match unit {
        Unit::MbPerS => &[(1.0, "MB/s"), (1e3, "GB/s")],
        Unit::Bytes => &[(1.0, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB")],
        Unit::Us => &[(1.0, "us"), (1e3, "ms"), (1e6, "s")],
        Unit::Ns => &[(1.0, "ns"), (1e3, "us"), (1e6, "ms"), (1e9, "s")],
    };
    let (factor, name) = units
        .iter()
        .rev()
        .find(|(factor, _)| v >= factor * (1.0 - 1e-9))
        .unwrap_or(&units[0]);
    format!("{} {name}", trimmed(v / factor))
}

/// A point on the time axis: seconds, or whole minutes from two on.
fn seconds_label(t: f64) -> String {
    let minutes = t / 60.0;
    if t >= 120.0 && (minutes - minutes.round()).abs() < 1e-9 {
        format!("{} min", minutes.round())
    } else {
        format!("{} s", trimmed(t))
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
                    \"bytes\": 2000000000,\n  \"messages_per_s\": 500000.0,\n  \
                    \"append_to_ack_us\": {\"count\": 2000000, \"p50\": 110, \"p99\": 1500, \
                    \"p999\": 3000, \"max\": 9000},\n  \
                    \"append_call_ns\": {\"count\": 2000000, \"p50\": 70, \"p99\": 600},\n  \
                    \"leader\": {\"name\": \"loadgen\", \"cpu_s\": 9.250, \"rss_peak_mib\": 20.0},\n  \
                    \"converged_s\": 1.000,\n  \"checksums_match\": true\n}\n";
        let raw = RawBaseline::from_json(json, "written", "mmap").unwrap();
        assert!(!raw.acks);
        let acked = json.replace(
            "\"mode\": \"raw\",",
            "\"mode\": \"raw\",\n  \"raw_acks\": true,",
        );
        let acked = RawBaseline::from_json(&acked, "written", "mmap").unwrap();
        assert!(acked.acks);
        assert_eq!(raw.delivered_messages_per_s, 400_000.0);
        assert_eq!(raw.delivered_mb_per_s, 400.0);
        assert_eq!(raw.append_to_received_p50_us, 110.0);
        assert_eq!(raw.append_to_received_p99_us, 1500.0);
        assert_eq!(raw.cpu_s, 9.25);
        // A run that never converged has no delivered rate.
        let unconverged = json.replace("\"converged_s\": 1.000", "\"converged_s\": null");
        assert!(RawBaseline::from_json(&unconverged, "written", "mmap").is_none());
    }

    /// A report of `t_max_s` seconds, sampled every 100 ms at 100 MB/s with one follower
    /// lagging by 60 MB at the end, its acks at 1.2 ms, the writer's calls at 450 ns, and the
    /// leader's sending thread waiting 25 ms of each 100 for a CPU.
    fn plotted(t_max_s: f64, faults: Vec<FaultSpan>) -> Report {
        let n = (t_max_s * 10.0).round() as usize;
        let t = |i: usize| (i + 1) as f64 / 10.0;
        Report {
            mode: "library".into(),
            engine: "uring".into(),
            tcp_congestion: "cubic".into(),
            durability: "written".into(),
            followers: 1,
            writers: 1,
            writer_cpu: None,
            elapsed_s: t_max_s,
            messages: 1000,
            bytes: 1_024_000,
            append_to_ack_us: histogram(),
            append_to_ack_fault_us: histogram(),
            append_call_ns: histogram(),
            append_call_fault_ns: histogram(),
            append_call_before_faults_ns: histogram(),
            leader: Usage::default(),
            follower_usage: Vec::new(),
            follower_ack_latency_us: Vec::new(),
            samples: (0..n)
                .map(|i| Sample {
                    t_s: t(i),
                    mb_per_s: 100.0,
                    lag_bytes: vec![Some(60_000_000 * i as u64 / n as u64)],
                    in_fault: false,
                    sender_cpu_wait_ms: Some(25.0),
                })
                .collect(),
            writer_samples: vec![(0..n)
                .map(|i| WriterSample {
                    t_s: t(i),
                    append_call_p99_ns: 450,
                })
                .collect()],
            ack_samples: (0..n)
                .map(|i| AckSample {
                    t_s: t(i),
                    messages: 100,
                    append_to_ack_p99_us: 1200,
                    append_to_ack_max_us: 1500,
                })
                .collect(),
            faults,
            converged_s: Some(0.1),
            checksums_match: true,
            dd_mb_per_s: None,
            dd_per_segment_mb_per_s: None,
            raw_baseline: None,
            raw_acks: None,
            latency_queue_peak_bytes: 0,
            machine_cpu: None,
            confirmer_cpu_wait_s: None,
            free_page_reporting_order: None,
        }
    }

    /// The text of every `<text>` element in `svg`.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(&t[t.find('>')? + 1..t.find("</text>")?]))
            .collect()
    }

    /// An operator reads when things happened off the time axis, and what they measured off
    /// scales in round numbers with their units.
    #[test]
    fn the_plot_has_a_time_axis_and_round_scales_with_units() {
        let svg = plotted(4.0, Vec::new()).svg();
        let texts = texts(&svg);
        for second in ["0 s", "1 s", "2 s", "3 s", "4 s"] {
            assert!(texts.contains(&second), "no {second} tick in {texts:?}");
        }
        for label in ["100 MB/s", "60 MB", "1 ms", "400 ns", "25 ms"] {
            assert!(texts.contains(&label), "no {label} on a scale in {texts:?}");
        }
        assert!(
            texts.contains(
                &"the leader's thread sending to the followers: time it waited for a CPU in each \
                  100 ms"
            ),
            "{texts:?}"
        );
        let json = plotted(0.2, Vec::new()).json();
        assert!(
            json.contains("\"in_fault\": false, \"sender_cpu_wait_ms\": 25.000}"),
            "{json}"
        );
    }

    #[test]
    fn scales_step_in_round_numbers_to_just_above_the_largest_value() {
        assert_eq!(scale(112.8), (25.0, 125.0));
        assert_eq!(scale(100.0), (20.0, 120.0));
        assert_eq!(scale(1200.0), (250.0, 1250.0));
        assert_eq!(scale(60e6), (20e6, 80e6));
        assert_eq!(scale(0.0), (1.0, 1.0));
        assert_eq!(time_step(4.0), 1.0);
        assert_eq!(time_step(0.7), 0.2);
        assert_eq!(time_step(20.0), 5.0);
        assert_eq!(time_step(600.0), 120.0);
    }

    #[test]
    fn values_are_labelled_in_the_unit_that_reads_best() {
        assert_eq!(label(0.0, Unit::Us), "0");
        assert_eq!(label(500.0, Unit::Us), "500 us");
        assert_eq!(label(1500.0, Unit::Us), "1.5 ms");
        assert_eq!(label(250_000.0, Unit::Us), "250 ms");
        assert_eq!(label(1_000_000.0, Unit::Us), "1 s");
        assert_eq!(label(1100.0, Unit::Ns), "1.1 us");
        assert_eq!(label(2500.0, Unit::MbPerS), "2.5 GB/s");
        assert_eq!(label(20e6, Unit::Bytes), "20 MB");
        assert_eq!(seconds_label(0.5), "0.5 s");
        assert_eq!(seconds_label(120.0), "2 min");
    }

    /// A shaded span says which follower was killed, stopped or joined, where it happened.
    #[test]
    fn the_plot_names_each_fault_where_it_happened() {
        let stall = FaultSpan {
            kind: FaultKind::Stall,
            follower: "follower1".into(),
            at_s: 1.0,
            ended_s: 2.0,
            recovered_s: Some(2.5),
        };
        let svg = plotted(4.0, vec![stall]).svg();
        assert!(
            texts(&svg).contains(&"follower1 stopped"),
            "the stall is not named in {svg}"
        );
        // Shaded from where it began (x of 1.0 s: 90 + 850 * 1/4) to where it was caught up.
        assert!(svg.contains("<rect x=\"302.5\""), "{svg}");
        let json = plotted(
            4.0,
            vec![FaultSpan {
                kind: FaultKind::Kill,
                follower: "follower2".into(),
                at_s: 1.0,
                ended_s: 1.05,
                recovered_s: None,
            }],
        )
        .json();
        assert!(
            json.contains(
                "\"faults\": [{\"kind\": \"kill\", \"follower\": \"follower2\", \"at_s\": 1.000, \
                 \"ended_s\": 1.050, \"recovered_s\": null}]"
            ),
            "{json}"
        );
    }

    /// A follower not connected for a while is a gap in its line, not a straight line across;
    /// a panel with nothing to draw says why.
    #[test]
    fn the_plot_leaves_gaps_where_nothing_was_known_and_says_why_a_panel_is_empty() {
        let mut report = plotted(4.0, Vec::new());
        report.samples[10].lag_bytes = vec![None];
        report.samples[11].lag_bytes = vec![None];
        let svg = report.svg();
        let lag_lines = svg
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains("#d62728"))
            .count();
        assert_eq!(lag_lines, 2, "{svg}");
        report.mode = "write".into();
        report.ack_samples.clear();
        report.writer_samples.clear();
        let written = texts(&report.svg()).join("\n");
        assert_eq!(
            written
                .matches("nothing timed: write mode calls no append()")
                .count(),
            2,
            "{written}"
        );
        report.mode = "raw".into();
        for sample in &mut report.samples {
            sample.sender_cpu_wait_ms = None;
        }
        let raw = texts(&report.svg()).join("\n");
        assert!(raw.contains("no ferry leader in raw mode"), "{raw}");
    }

    /// The summary says how long each fault took to be caught up, up to a screenful.
    #[test]
    fn the_summary_lists_the_faults_and_how_long_each_took() {
        let fault = |i: usize| FaultSpan {
            kind: FaultKind::Kill,
            follower: format!("follower{}", i % 2 + 1),
            at_s: i as f64,
            ended_s: i as f64 + 0.01,
            recovered_s: (i != 1).then_some(i as f64 + 0.25),
        };
        let report = plotted(4.0, (0..FAULT_LINES_MAX + 2).map(fault).collect());
        let text = report.text();
        assert!(
            text.contains("    follower1 killed at 0.00 s, restarted at 0.01 s, caught up 0.250 s after it began\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "    follower2 killed at 1.00 s, restarted at 1.01 s, not caught up within the run\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("    and 2 more (faults[] in the --json report)\n"),
            "{text}"
        );
        assert!(
            !text.contains(&format!("killed at {}.00 s", FAULT_LINES_MAX)),
            "{text}"
        );
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
