//! `--rounds N`: the same run N times, each in a child loadgen, one line of figures per round
//! and their medians. On a shared VM one run is one sample: the host's steal and its memory
//! move a p99 by milliseconds from one minute to the next, so a figure worth quoting is the
//! spread of several rounds, each with its baseline (`--raw-baseline`) right beside it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::report::json_number;

/// Flags the parent keeps for itself: each takes a value, given as `--flag VALUE` or
/// `--flag=VALUE`. Each child gets its own `--dir` and `--json`.
const PARENT_FLAGS: [&str; 4] = ["--rounds", "--json", "--plot", "--dir"];

/// A figure each round reports, read from its JSON report.
struct Column {
    header: &'static str,
    /// The key in the median object of `--json`.
    key: &'static str,
    figure: Figure,
    decimals: usize,
}

enum Figure {
    /// A number at this path of the report (see `json_number`).
    At(&'static [&'static str]),
    /// The CPU seconds of all followers together.
    FollowersCpu,
    /// The largest p99 among the followers' MARK-to-ACK round trips (`follower_ack_latency_us`):
    /// the part of append-to-acked the slowest follower took.
    FollowerRoundTripP99Max,
    /// One number over another (`--dd-baseline`: what was acked over what dd wrote).
    Ratio(&'static [&'static str], &'static [&'static str]),
}

const COLUMNS: [Column; 17] = [
    Column {
        header: "msgs/s",
        key: "messages_per_s",
        figure: Figure::At(&["messages_per_s"]),
        decimals: 0,
    },
    Column {
        header: "p50 us",
        key: "append_to_ack_p50_us",
        figure: Figure::At(&["append_to_ack_us", "p50"]),
        decimals: 0,
    },
    Column {
        header: "p99 us",
        key: "append_to_ack_p99_us",
        figure: Figure::At(&["append_to_ack_us", "p99"]),
        decimals: 0,
    },
    Column {
        header: "follower RT p99 us",
        key: "follower_ack_p99_us_max",
        figure: Figure::FollowerRoundTripP99Max,
        decimals: 0,
    },
    Column {
        header: "append() p99 ns",
        key: "append_call_p99_ns",
        figure: Figure::At(&["append_call_ns", "p99"]),
        decimals: 0,
    },
    Column {
        header: "in faults p99 ns",
        key: "append_call_during_faults_p99_ns",
        figure: Figure::At(&["append_call_during_faults_ns", "p99"]),
        decimals: 0,
    },
    Column {
        header: "before faults p99 ns",
        key: "append_call_before_faults_p99_ns",
        figure: Figure::At(&["append_call_before_faults_ns", "p99"]),
        decimals: 0,
    },
    Column {
        header: "leader CPU s",
        key: "leader_cpu_s",
        figure: Figure::At(&["leader", "cpu_s"]),
        decimals: 2,
    },
    Column {
        header: "followers CPU s",
        key: "followers_cpu_s",
        figure: Figure::FollowersCpu,
        decimals: 2,
    },
    Column {
        header: "sender wait s",
        key: "sender_cpu_wait_s",
        figure: Figure::At(&["leader", "sender_cpu_wait_s"]),
        decimals: 2,
    },
    Column {
        header: "steal %",
        key: "steal_percent",
        figure: Figure::At(&["machine_cpu", "steal_percent"]),
        decimals: 1,
    },
    Column {
        header: "acked vs dd",
        key: "acked_vs_dd",
        figure: Figure::Ratio(&["acked_mb_per_s"], &["dd_baseline_mb_per_s"]),
        decimals: 2,
    },
    Column {
        header: "vs dd per segment",
        key: "acked_vs_dd_per_segment",
        figure: Figure::Ratio(&["acked_mb_per_s"], &["dd_per_segment_mb_per_s"]),
        decimals: 2,
    },
    Column {
        header: "fan-out p50 us",
        key: "raw_append_to_received_p50_us",
        figure: Figure::At(&["raw_baseline", "append_to_received_p50_us"]),
        decimals: 0,
    },
    Column {
        header: "fan-out p99 us",
        key: "raw_append_to_received_p99_us",
        figure: Figure::At(&["raw_baseline", "append_to_received_p99_us"]),
        decimals: 0,
    },
    Column {
        header: "fan-out CPU s",
        key: "raw_cpu_s",
        figure: Figure::At(&["raw_baseline", "cpu_s"]),
        decimals: 2,
    },
    Column {
        header: "delivered vs fan-out",
        key: "delivered_messages_per_s_vs_raw",
        figure: Figure::At(&["delivered_messages_per_s_vs_raw"]),
        decimals: 2,
    },
];

impl Figure {
    fn read(&self, json: &str) -> Option<f64> {
        match self {
            Figure::At(path) => json_number(json, path),
            Figure::FollowersCpu => {
                let cpus = numbers_in_list(json, "follower_usage", "cpu_s")?;
                (!cpus.is_empty()).then(|| cpus.iter().sum())
            }
            Figure::FollowerRoundTripP99Max => {
                numbers_in_list(json, "follower_ack_latency_us", "p99")?
                    .into_iter()
                    .reduce(f64::max)
            }
            Figure::Ratio(over, under) => {
                let under = json_number(json, under)?;
                (under > 0.0).then_some(json_number(json, over)? / under)
            }
        }
    }
}

/// Every `key` number in the report's list `list` (one per follower), in order; `None` without
/// the list.
fn numbers_in_list(json: &str, list: &str, key: &str) -> Option<Vec<f64>> {
    let start = json.find(&format!("\"{list}\": ["))?;
    let list = &json[start..];
    let list = &list[..list.find(']')?];
    let needle = format!("\"{key}\": ");
    Some(
        list.match_indices(&needle)
            .filter_map(|(at, _)| json_number(&list[at..], &[key]))
            .collect(),
    )
}

/// This run's arguments for a child: `argv` (without the program name) less the parent's own
/// flags and their values.
pub fn child_args(argv: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in argv {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        let flag = text.split_once('=').map_or(&*text, |(f, _)| f);
        if PARENT_FLAGS.contains(&flag) {
            skip_value = !text.contains('=');
            continue;
        }
        out.push(arg.clone());
    }
    out
}

/// The median of the values there are (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// The per-round table and the medians, from each round's report; columns no round reports
/// (the fan-out's, without `--raw-baseline`) are left out.
pub fn summary(reports: &[String]) -> (String, String) {
    let values: Vec<Vec<Option<f64>>> = COLUMNS
        .iter()
        .map(|c| reports.iter().map(|r| c.figure.read(r)).collect())
        .collect();
    let shown: Vec<usize> = (0..COLUMNS.len())
        .filter(|&i| values[i].iter().any(Option::is_some))
        .collect();
    let cell = |i: usize, v: Option<f64>| match v {
        Some(v) => format!("{v:.*}", COLUMNS[i].decimals),
        None => "-".into(),
    };
    let mut text = String::new();
    let mut header = format!("{:<8}", "round");
    for &i in &shown {
        let _ = write!(
            header,
            "  {:>w$}",
            COLUMNS[i].header,
            w = COLUMNS[i].header.len()
        );
    }
    let _ = writeln!(text, "{header}");
    let mut row = |name: String, at: &dyn Fn(usize) -> Option<f64>| {
        let mut line = format!("{name:<8}");
        for &i in &shown {
            let _ = write!(
                line,
                "  {:>w$}",
                cell(i, at(i)),
                w = COLUMNS[i].header.len()
            );
        }
        let _ = writeln!(text, "{line}");
    };
    for (r, _) in reports.iter().enumerate() {
        row(format!("{}", r + 1), &|i| values[i][r]);
    }
    let medians: Vec<Option<f64>> = values
        .iter()
        .map(|v| median(&v.iter().flatten().copied().collect::<Vec<_>>()))
        .collect();
    row("median".into(), &|i| medians[i]);
    let fields: Vec<String> = shown
        .iter()
        .map(|&i| {
            let v = medians[i].map_or("null".into(), |m| format!("{m:.3}"));
            format!("\"{}\": {v}", COLUMNS[i].key)
        })
        .collect();
    let json = format!(
        "{{\n\"rounds\": [\n{}\n],\n\"median\": {{{}}}\n}}\n",
        reports
            .iter()
            .map(|r| r.trim_end())
            .collect::<Vec<_>>()
            .join(",\n"),
        fields.join(", ")
    );
    (text, json)
}

/// Runs `rounds` children with `child_argv`, each in its own dir under `root` (removed after
/// it), their summaries to stderr; prints the table and writes `json`. `Ok(false)` when a
/// round failed (its followers differed from the leader, say): what came before is printed.
pub fn run(
    child_argv: &[OsString],
    rounds: u32,
    root: &Path,
    json: Option<&Path>,
) -> anyhow::Result<bool> {
    let mut reports = Vec::new();
    let mut ok = true;
    for round in 1..=rounds {
        let dir = root.join(format!("round-{round}"));
        let report = root.join(format!("round-{round}.json"));
        eprintln!("loadgen: round {round} of {rounds}");
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(child_argv)
            .arg("--dir")
            .arg(&dir)
            .arg("--json")
            .arg(&report)
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .with_context(|| format!("cannot run round {round}"))?;
        let _ = std::fs::remove_dir_all(&dir);
        if !status.success() {
            eprintln!("loadgen: round {round} failed ({status}); no rounds after it");
            ok = false;
            break;
        }
        let text = std::fs::read_to_string(&report)
            .with_context(|| format!("cannot read round {round}'s {}", report.display()))?;
        let _ = std::fs::remove_file(&report);
        reports.push(text);
    }
    if reports.is_empty() {
        return Ok(false);
    }
    let (text, json_text) = summary(&reports);
    print!("{text}");
    if let Some(path) = json {
        std::fs::write(path, json_text)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_child_gets_every_argument_but_the_parents_own_in_either_spelling() {
        let argv = os(&[
            "--rounds",
            "5",
            "--raw-baseline",
            "--json=run.json",
            "--rate",
            "250000",
            "--dir",
            "/dev/shm/lg",
            "--plot",
            "x.svg",
            "--durability=written",
            "--rounds=3",
        ]);
        assert_eq!(
            child_args(&argv),
            os(&["--raw-baseline", "--rate", "250000", "--durability=written"])
        );
    }

    #[test]
    fn medians_of_odd_and_even_counts_and_of_nothing() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn the_table_has_a_row_per_round_and_the_medians_and_leaves_out_missing_columns() {
        let report = |p99: u32, steal: f64, rt: u32| {
            format!(
                "{{\n  \"messages_per_s\": 1000.0,\n  \"append_to_ack_us\": {{\"count\": 5, \
                 \"p50\": 10, \"p99\": {p99}, \"p999\": 1, \"max\": 1}},\n  \"leader\": \
                 {{\"name\": \"l\", \"cpu_s\": 1.500, \"rss_peak_mib\": 1.0}},\n  \
                 \"follower_usage\": [{{\"name\": \"f1\", \"cpu_s\": 0.250, \"rss_peak_mib\": \
                 1.0}}, {{\"name\": \"f2\", \"cpu_s\": 0.500, \"rss_peak_mib\": 1.0}}],\n  \
                 \"follower_ack_latency_us\": [{{\"p50\": 80, \"p99\": {rt}, \"p999\": 900}}, \
                 null, {{\"p50\": 90, \"p99\": 300, \"p999\": 800}}],\n  \
                 \"machine_cpu\": {{\"busy_percent\": 90.0, \"idle_percent\": 5.0, \
                 \"steal_percent\": {steal:.1}}},\n  \"acked_mb_per_s\": 450.0,\n  \
                 \"dd_baseline_mb_per_s\": 500.0,\n  \"raw_baseline\": null\n}}\n"
            )
        };
        let (text, json) = summary(&[
            report(900, 1.0, 200),
            report(3000, 20.0, 700),
            report(1000, 3.0, 400),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].contains("p99 us") && lines[0].contains("followers CPU s"));
        assert!(!lines[0].contains("fan-out"), "{text}");
        assert!(
            lines[2].contains("3000") && lines[2].contains("20.0"),
            "{text}"
        );
        assert!(lines[4].starts_with("median"), "{text}");
        assert!(
            lines[4].contains(" 1000 ") && lines[4].contains("0.75"),
            "{text}"
        );
        assert!(
            json.contains("\"append_to_ack_p99_us\": 1000.000"),
            "{json}"
        );
        assert!(json.contains("\"steal_percent\": 3.000"), "{json}");
        assert!(json.contains("\"acked_vs_dd\": 0.900"), "{json}");
        assert!(
            lines[0].contains("acked vs dd") && lines[4].contains("0.90"),
            "{text}"
        );
        assert_eq!(json.matches("\"messages_per_s\": 1000.0,").count(), 3);
        // The slowest follower's round trip (null: one not connected at the end), per round.
        assert!(lines[0].contains("follower RT p99 us"), "{text}");
        assert!(
            lines[1].contains(" 300 ") && lines[2].contains(" 700 "),
            "{text}"
        );
        assert!(
            json.contains("\"follower_ack_p99_us_max\": 400.000"),
            "{json}"
        );
    }
}
