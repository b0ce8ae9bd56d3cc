//! `loadgen` end to end, briefly: a writer, a follower killed and restarted under load, and the
//! report files it promises.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// loadgen, starting this build's `ferry` for its followers (not one found on the PATH).
fn loadgen() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"));
    cmd
}

/// Runs `cmd`, asserts that it succeeded and that its summary says `says`, and that the JSON
/// report it wrote to `json` holds each of `fields`; returns that report.
fn run_reporting(cmd: &mut Command, says: &str, json: &Path, fields: &[&str]) -> String {
    let out = cmd.arg("--json").arg(json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(says), "{stdout}");
    let report = std::fs::read_to_string(json).unwrap();
    for field in fields {
        assert!(report.contains(field), "{field} missing from\n{report}");
    }
    report
}

/// The number that follows `key` (which ends with `": "`) in a JSON report.
fn number_after(report: &str, key: &str) -> f64 {
    let at = report
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing from\n{report}"))
        + key.len();
    let end = report[at..].find([',', '}']).unwrap();
    report[at..at + end].trim().parse().unwrap()
}

/// The `count` of the latency object `key` (which ends with `": "`) in a JSON report.
fn count_in(report: &str, key: &str) -> f64 {
    let at = report
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing from\n{report}"));
    number_after(&report[at..], "\"count\": ")
}

/// Runs loadgen with `args` (and a data dir under `tmp`), asserts that it refused, and returns
/// what it said on stderr.
fn refused(tmp: &Path, args: &[&str]) -> String {
    let out = loadgen()
        .args(args)
        .arg("--dir")
        .arg(tmp.join("refused"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn loadgen_runs_with_a_killed_follower_and_writes_its_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let svg = tmp.path().join("run.svg");
    let report = run_reporting(
        loadgen()
            .args(["--duration", "2s", "--followers", "2"])
            .args(["--durability", "written"])
            .args(["--rate", "20000", "--kill-follower-every", "700ms"])
            .arg("--plot")
            .arg(&svg)
            .arg("--dir")
            .arg(tmp.path().join("data")),
        "followers identical to the leader: yes",
        &json,
        &[
            "\"messages_per_s\"",
            "\"append_to_ack_us\": {\"count\"",
            "\"follower_usage\"",
            "\"latency_queue_peak_mib\"",
            "\"samples\"",
            "\"in_fault\": ",
            "\"writer_samples\": [\n    [{\"t_s\": ",
            "\"append_call_p99_ns\": ",
            "\"ack_samples\": [{\"t_s\": ",
            "\"append_to_ack_p99_us\": ",
            "\"checksums_match\": true",
            "\"faults\": [{\"kind\": \"kill\", \"follower\": \"follower1\", \"at_s\": ",
            "\"free_page_reporting_order\": ",
        ],
    );
    // Where the machine's CPU time went over the run: busy, idle, stolen by the host.
    let split: Vec<f64> = ["busy_percent", "idle_percent", "steal_percent"]
        .iter()
        .map(|field| number_after(&report, &format!("\"{field}\": ")))
        .collect();
    assert!(split.iter().all(|p| (0.0..=100.0).contains(p)), "{split:?}");
    assert!((split.iter().sum::<f64>() - 100.0).abs() < 0.5, "{split:?}");
    assert!(
        split[0] > 0.0,
        "a run with a writer and 2 followers was not busy: {split:?}"
    );
    // Every message appended lands in one 100 ms interval of ack_samples, whenever the writer
    // got going and however late its acks came.
    let acks_from = report.find("\"ack_samples\": [").unwrap();
    let acks = &report[acks_from..acks_from + report[acks_from..].find(']').unwrap()];
    let mut sampled = 0.0;
    let mut last_t_s = 0.0;
    for sample in acks.split('{').skip(1) {
        let t_s = number_after(sample, "\"t_s\": ");
        assert!(t_s > last_t_s, "ack_samples out of order:\n{acks}");
        last_t_s = t_s;
        sampled += number_after(sample, "\"messages\": ");
    }
    assert_eq!(sampled, number_after(&report, "\"messages\": "), "{report}");
    assert!(
        !report.contains("\"kills\": 0,"),
        "no follower was killed:\n{report}"
    );
    // The plot names the fault where it happened and has a time axis to read it off.
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for text in [">follower1 killed</text>", ">1 s</text>"] {
        assert!(svg.contains(text), "{text} missing from\n{svg}");
    }
}

/// A follower that joins late is waited for only from when it starts: the appends before it
/// count as acked once the followers already running hold them, not after its full sync.
#[test]
fn a_late_joiner_syncs_and_the_appends_before_it_do_not_wait_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let report = run_reporting(
        loadgen()
            .args(["--duration", "3s", "--followers", "2", "--rate", "20000"])
            .args(["--durability", "written", "--join-follower", "64"])
            .arg("--dir")
            .arg(tmp.path().join("data")),
        "followers identical to the leader: yes",
        &json,
        &[
            "\"joins\": 1,",
            "\"faults\": [{\"kind\": \"join\", \"follower\": \"follower2\"",
        ],
    );
    // It joins a second into the run: waiting for it, the appends of that first second would
    // put the p99 of those outside the fault at 0.6 s or more.
    let at_s = number_after(&report, "\"at_s\": ");
    assert!(at_s >= 1.0, "joined at {at_s} s:\n{report}");
    let outside = &report[report.find("\"append_to_ack_us\": ").unwrap()..];
    let p99_us = number_after(outside, "\"p99\": ");
    assert!(
        p99_us < 500_000.0,
        "p99 {p99_us} us outside the fault:\n{report}"
    );
    // The writer's cost of append() before the first fault, the same run's baseline for the
    // one during it: about the first second's 20,000 calls, some of those outside the fault.
    let before = count_in(&report, "\"append_call_before_faults_ns\": ");
    let outside = count_in(&report, "\"append_call_ns\": ");
    assert!(
        before >= 10_000.0 && before < outside,
        "{before} calls before the join, {outside} outside it:\n{report}"
    );
}

/// `--raw-join`: what a join costs the writer on this machine without ferry. With no follower,
/// a third into the run, the preload is copied over loopback with splice (checked byte for
/// byte), and the writer's calls meanwhile count as during a fault, against those before it.
#[test]
fn a_raw_join_copies_the_preload_without_ferry_and_times_the_writer_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let data = tmp.path().join("data");
    let report = run_reporting(
        loadgen()
            .args(["--duration", "3s", "--followers", "0", "--rate", "20000"])
            .args(["--durability", "written", "--raw-join", "64", "--dir"])
            .arg(&data),
        "raw copy started at",
        &json,
        &[
            "\"raw_joins\": 1,",
            "\"faults\": [{\"kind\": \"raw_join\", \"follower\": \"raw1\"",
            "\"checksums_match\": true",
        ],
    );
    let faults = &report[report.find("\"faults\": ").unwrap()..];
    let at_s = number_after(faults, "\"at_s\": ");
    let done_s = number_after(faults, "\"recovered_s\": ");
    assert!(at_s >= 1.0 && done_s > at_s, "{report}");
    assert!(
        count_in(&report, "\"append_call_before_faults_ns\": ") >= 10_000.0,
        "{report}"
    );
    assert!(
        count_in(&report, "\"append_call_during_faults_ns\": ") >= 1.0,
        "{report}"
    );
    // The copy is the run's and goes with it.
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);

    // A ferry join and a raw one in one run would overlap; raw mode has no ferry to compare.
    let stderr = refused(
        tmp.path(),
        &[
            "--raw-join",
            "8",
            "--join-follower",
            "8",
            "--messages",
            "10",
        ],
    );
    assert!(stderr.contains("--raw-join"), "{stderr}");
    let stderr = refused(
        tmp.path(),
        &["--mode", "raw", "--raw-join", "8", "--messages", "10"],
    );
    assert!(stderr.contains("--raw-join"), "{stderr}");
}

#[test]
fn writer_cpu_is_checked_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |cpu: &str, json: &std::path::Path| {
        loadgen()
            .args(["--duration", "300ms", "--followers", "1", "--rate", "1000"])
            .args(["--durability", "written", "--writer-cpu", cpu, "--json"])
            .arg(json)
            .arg("--dir")
            .arg(tmp.path().join(format!("data-{cpu}")))
            .output()
            .unwrap()
    };
    let out = run("4095", &tmp.path().join("none.json"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--writer-cpu 4095") || stderr.contains("CPU 4095"),
        "the error names the CPU: {stderr}"
    );
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return; // one CPU: nothing to keep the writers apart on
    }
    let json = tmp.path().join("pinned.json");
    let out = run("0", &json);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("writers alone on CPU 0"), "{stdout}");
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(report.contains("\"writer_cpu\": 0,"), "{report}");
}

/// `--mode raw`, the baseline a library run is divided by: the same writer, each append spliced
/// to receiver threads with no ferry. Its figures mean something only if every receiver got
/// every byte, in order: the run checks that against the segments and fails otherwise.
#[test]
fn raw_mode_delivers_the_writers_segments_to_every_receiver() {
    let tmp = tempfile::tempdir().unwrap();
    // Each append sent at once, and in batches of 1 MiB (the last one partial: sent when the
    // writer is done).
    for batch in ["0", "1048576"] {
        let json = tmp.path().join(format!("raw-{batch}.json"));
        let data = tmp.path().join(format!("data-{batch}"));
        let report = run_reporting(
            loadgen()
                .args(["--mode", "raw", "--followers", "2", "--messages", "30000"])
                .args(["--raw-batch-bytes", batch])
                // Several segments, and message sizes that do not divide them.
                .args(["--message-bytes", "100-3000", "--segment-bytes", "1048576"])
                .arg("--dir")
                .arg(&data),
            "every receiver's stream identical to the segments: yes",
            &json,
            &[
                "\"mode\": \"raw\"",
                "\"messages\": 30000,",
                // Every message's latency to received by both, so none was left out.
                "\"append_to_ack_us\": {\"count\": 30000,",
                // No fault, so no baseline before one.
                "\"append_call_before_faults_ns\": null",
                "\"checksums_match\": true",
            ],
        );
        // More than ten segments' worth, each receiver's stream checked against them all.
        let bytes = number_after(&report, "\"bytes\": ");
        assert!(bytes > 10.0 * 1048576.0, "only {bytes} bytes");
    }

    // Two writers would interleave their segments in the stream: refused, saying why.
    let stderr = refused(
        tmp.path(),
        &["--mode", "raw", "--writers", "2", "--messages", "10"],
    );
    assert!(stderr.contains("one writer"), "{stderr}");
}

/// Each follower's MARK-to-ACK latency as the leader measures it (its round trip: payload,
/// follower, ack), per follower process, so that append-to-acked splits into the leader's part
/// and the followers': from the embedded leader's API, and from `ferry lead`'s `/metrics` in
/// write mode.
#[test]
fn each_followers_mark_to_ack_latency_is_reported_as_the_leader_measures_it() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in ["library", "write"] {
        let json = tmp.path().join(format!("{mode}.json"));
        let report = run_reporting(
            loadgen()
                .args(["--mode", mode, "--followers", "2", "--duration", "1s"])
                .args(["--durability", "written", "--rate", "20000"])
                .arg("--dir")
                .arg(tmp.path().join(format!("data-{mode}"))),
            "MARK to ACK p50 ",
            &json,
            &["\"follower_ack_latency_us\": [{\"p50\": "],
        );
        let at = report.find("\"follower_ack_latency_us\": [").unwrap();
        let list = &report[at..at + report[at..].find(']').unwrap()];
        let entries: Vec<[f64; 3]> = list
            .split("{\"p50\": ")
            .skip(1)
            .map(|e| {
                let e = format!("\"p50\": {e}");
                ["p50", "p99", "p999"].map(|q| number_after(&e, &format!("\"{q}\": ")))
            })
            .collect();
        assert_eq!(entries.len(), 2, "{mode}: {list}");
        for [p50, p99, p999] in entries {
            assert!(p50 >= 1.0 && p50 <= p99 && p99 <= p999, "{mode}: {list}");
        }
    }
}

/// `--raw-acks`: the fan-out's receivers send back over their socket what they hold (at
/// `synced`, once fdatasync returned for it), and a message counts once every ack covering it
/// came back: append() to acked through a round trip, as ferry's figure is, for a latency
/// target to be set against. The streams are checked as without acks.
#[test]
fn raw_acks_count_a_message_once_every_receivers_ack_came_back() {
    let tmp = tempfile::tempdir().unwrap();
    for durability in ["written", "synced"] {
        let json = tmp.path().join(format!("acks-{durability}.json"));
        let report = run_reporting(
            loadgen()
                .args(["--mode", "raw", "--raw-acks", "--followers", "2"])
                .args(["--messages", "20000", "--durability", durability])
                .args(["--message-bytes", "100-3000", "--segment-bytes", "1048576"])
                .arg("--dir")
                .arg(tmp.path().join(format!("data-{durability}"))),
            "append() to acked by all",
            &json,
            &[
                "\"raw_acks\": true",
                "\"append_to_ack_us\": {\"count\": 20000,",
                "\"checksums_match\": true",
            ],
        );
        assert!(!report.contains("\"raw_acks\": false"), "{report}");
    }

    // Acks are the fan-out's: a ferry run without a baseline to pass them to is refused.
    let stderr = refused(tmp.path(), &["--raw-acks", "--messages", "10"]);
    assert!(stderr.contains("--raw-acks"), "{stderr}");
}

/// `--rounds`: the run repeated in children, a line per round and the medians, with every
/// round's report and the medians in the JSON file.
#[test]
fn rounds_repeat_the_run_and_report_each_round_and_the_medians() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rounds.json");
    let data = tmp.path().join("data");
    let report = run_reporting(
        loadgen()
            .args(["--rounds", "2", "--raw-baseline", "--followers", "1"])
            .args(["--messages", "5000", "--rate", "20000"])
            .args(["--durability=written", "--dir"])
            .arg(&data),
        "median",
        &json,
        &[
            "\"rounds\": [",
            "\"median\": {\"messages_per_s\": ",
            "\"raw_cpu_s\": ",
            "\"delivered_messages_per_s_vs_raw\": ",
        ],
    );
    // Each round is a whole run against its own fan-out, its followers checked.
    assert_eq!(
        report.matches("\"mode\": \"library\"").count(),
        2,
        "{report}"
    );
    assert_eq!(report.matches("\"checksums_match\": true").count(), 2);
    assert_eq!(report.matches("\"raw_baseline\": {").count(), 2);
    // Nothing of the rounds is left in the dir.
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);

    let stderr = refused(tmp.path(), &["--rounds", "0", "--messages", "10"]);
    assert!(stderr.contains("--rounds must be at least 1"), "{stderr}");
    let stderr = refused(
        tmp.path(),
        &["--rounds", "2", "--plot", "x.svg", "--messages", "10"],
    );
    assert!(stderr.contains("--plot draws one run"), "{stderr}");
}

/// `--raw-baseline`: the same workload through the plain fan-out first, in the same
/// invocation, and the library run reported against it, so the ratio needs no second command.
#[test]
fn raw_baseline_runs_the_fan_out_first_and_reports_the_run_against_it() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let report = run_reporting(
        loadgen()
            .args(["--raw-baseline", "--raw-acks", "--followers", "2"])
            .args([
                "--messages",
                "20000",
                "--durability",
                "received",
                "--rate",
                "50000",
            ])
            .arg("--dir")
            .arg(tmp.path().join("data")),
        "against the plain fan-out run just before",
        &json,
        &[
            "\"mode\": \"library\"",
            // The followers ack as asked; the receivers, which cannot ack before they write,
            // count what they wrote.
            "\"durability\": \"received\"",
            "\"raw_baseline\": {\"delivered_messages_per_s\": ",
            "\"durability\": \"written\", \"writer\": \"mmap\"",
            "\"append_to_received_p99_us\": ",
            // Its latencies came through acks over the socket, as ferry's (--raw-acks).
            "\"acks\": true",
            "\"delivered_messages_per_s_vs_raw\": ",
            "\"checksums_match\": true",
        ],
    );
    // Both runs delivered the 20,000 messages at about 50,000 a second, so the ratio is near 1.
    let ratio: f64 = report
        .split("\"delivered_messages_per_s_vs_raw\": ")
        .nth(1)
        .and_then(|rest| rest.split([',', '\n']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ratio in\n{report}"));
    assert!((0.5..2.0).contains(&ratio), "ratio {ratio} in\n{report}");

    // The fan-out takes one writer: a baseline for several is refused before anything runs.
    let stderr = refused(
        tmp.path(),
        &["--raw-baseline", "--writers", "2", "--messages", "10"],
    );
    assert!(
        stderr.contains("--raw-baseline") && stderr.contains("one writer"),
        "{stderr}"
    );
}

#[test]
fn probe_cpus_measures_a_cache_line_round_trip_between_two_cpus() {
    let tmp = tempfile::tempdir().unwrap();
    let same = loadgen()
        .args(["--probe-cpus", "0:0", "--duration", "300ms"])
        .output()
        .unwrap();
    assert!(!same.status.success());
    assert!(
        String::from_utf8_lossy(&same.stderr).contains("two different CPUs"),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return; // one CPU: nothing to bounce a line between
    }
    let json = tmp.path().join("probe.json");
    let out = loadgen()
        .args(["--probe-cpus", "0:1", "--duration", "600ms", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cache line round trip CPU 0 <-> CPU 1"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(report.starts_with("{\"probe_cpus\": [0, 1]"), "{report}");
    // Two windows of 250 ms at least, each a positive round trip.
    let trips: Vec<f64> = report
        .split("\"round_trip_ns\": ")
        .skip(1)
        .map(|s| s.split('}').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        trips.len() >= 2 && trips.iter().all(|&ns| ns > 0.0),
        "{report}"
    );
}

/// `--raw-baseline` for the `synced` streaming target: a write mode run (`ferry lead` beside a
/// write(2) writer, the leader's copy elsewhere) against the same pipeline without ferry, whose
/// writer writes with write(2) into a dir beside the leader's and whose receivers count only
/// what fdatasync made durable; both quoted against dd in the same invocation, once into one
/// file and once into files of a segment each, as the followers write them.
#[test]
fn a_write_mode_run_is_compared_with_a_synced_fan_out_and_both_with_dd() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let json = tmp.path().join("run.json");
    let leader_dir = tmp.path().join("elsewhere").join("leader");
    let cmd = loadgen()
        .args(["--mode", "write", "--raw-baseline", "--followers", "1"])
        .args(["--messages", "64", "--message-bytes", "65536"])
        .args(["--durability", "synced", "--dd-baseline", "8"])
        // Four segments of 1 MiB, and dd's 8 MiB once more as eight files of a segment each.
        .args(["--segment-bytes", "1048576"])
        .arg("--leader-dir")
        .arg(&leader_dir)
        .arg("--dir")
        .arg(tmp.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&cmd.stdout),
        String::from_utf8_lossy(&cmd.stderr),
    );
    assert!(cmd.status.success(), "{stdout}\n{stderr}");
    // The fan-out's run: its writer used write(2) beside the leader's dir, its receivers synced.
    assert!(
        stderr.contains(&format!(
            "segments in {}",
            leader_dir.join("raw-baseline").display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("receivers at synced"), "{stderr}");
    for says in [
        "against the plain fan-out run just before (--raw-baseline): ",
        " MB/s acked at synced by every follower = ",
        "the plain fan-out: ",
        " MB/s synced by every receiver = ",
        "x the dd baseline",
        "x dd per segment file (",
    ] {
        assert!(stdout.contains(says), "{says:?} missing from\n{stdout}");
    }
    let report = std::fs::read_to_string(&json).unwrap();
    for field in [
        "\"raw_baseline\": {\"delivered_messages_per_s\": ",
        "\"delivered_mb_per_s\": ",
        "\"durability\": \"synced\", \"writer\": \"write\"",
        "\"checksums_match\": true",
    ] {
        assert!(report.contains(field), "{field} missing from\n{report}");
    }
    assert!(
        stderr.contains("dd per segment: 8 files of 1048576 bytes"),
        "{stderr}"
    );
    assert!(number_after(&report, "\"dd_per_segment_mb_per_s\": ") > 0.0);
    // Nothing of either run is left.
    assert!(!leader_dir.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("data")).unwrap().count(),
        0
    );
}

/// `--mode write`: `ferry lead` beside a writer using write(2). The run follows the followers
/// through the leader's `--http` endpoint as it does the embedded leader: every sample holds
/// each follower's lag, and the convergence time is when each acked the leader's position.
#[test]
fn write_mode_reports_each_followers_lag_from_ferry_lead() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("write.json");
    let report = run_reporting(
        loadgen()
            .args(["--mode", "write", "--followers", "2", "--duration", "1s"])
            .args(["--durability", "written", "--rate", "20000"])
            // Handed to `ferry lead`, which refuses a name it cannot use.
            .args(["--tcp-congestion", "reno"])
            .arg("--dir")
            .arg(tmp.path().join("data")),
        "no append() to time in write mode; acked at written by all: ",
        &json,
        &[
            "\"mode\": \"write\"",
            "\"tcp_congestion\": \"reno\"",
            "\"checksums_match\": true",
        ],
    );
    let lags: Vec<&str> = report
        .split("\"lag_bytes\": [")
        .skip(1)
        .filter_map(|rest| rest.split(']').next())
        .collect();
    assert!(lags.len() >= 5, "too few samples in\n{report}");
    for lag in &lags {
        let values: Vec<u64> = lag
            .split(", ")
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("lag [{lag}] in\n{report}"))
            })
            .collect();
        assert_eq!(values.len(), 2, "[{lag}]");
    }
    assert!(
        !report.contains("\"converged_s\": null"),
        "no convergence time in\n{report}"
    );
}

/// The embedded leader's CPU seconds are what the writer and the leader spent on the run, from
/// the first append until every follower acked: not loadgen's own checksums of every data dir
/// afterwards, nor its setup. Full speed keeps the machine busy through the run, so CPU time
/// spent outside it shows as more than the machine's CPUs could give in that time.
#[test]
fn leader_cpu_covers_the_run_not_loadgens_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let report = run_reporting(
        loadgen()
            .args(["--messages", "1024", "--message-bytes", "1048576"])
            .args(["--followers", "1", "--durability", "written"])
            .arg("--dir")
            .arg(tmp.path().join("data")),
        "followers identical to the leader: yes",
        &json,
        &["\"converged_s\": "],
    );
    let run_s =
        number_after(&report, "\"elapsed_s\": ") + number_after(&report, "\"converged_s\": ");
    let leader_cpu_s = number_after(
        &report,
        "\"leader\": {\"name\": \"leader (embedded, with the writers)\", \"cpu_s\": ",
    );
    let follower_cpu_s = number_after(
        &report,
        "\"follower_usage\": [{\"name\": \"follower1\", \"cpu_s\": ",
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // The follower's start (an empty initial sync) is outside the run: a little slack for it.
    assert!(
        leader_cpu_s + follower_cpu_s <= cpus * run_s + 0.2,
        "leader {leader_cpu_s} CPU s and follower {follower_cpu_s} CPU s in a run of {run_s} s \
         on {cpus} CPUs\n{report}"
    );
}

/// On one CPU for everything (loadgen, its writer, the leader, the followers), the leader's
/// sending thread has to wait for the CPU while the writer and the follower run: loadgen reports
/// that wait, as part of what the leader's process and its follower waited, in the summary and
/// the JSON report, and per 100 ms sample; and how long its own confirmer waited, which every
/// latency it measures includes. (`--mode write` reads the leader's from `ferry lead`'s
/// threads.)
#[test]
fn the_time_the_leaders_sending_thread_waited_for_a_cpu_is_reported() {
    for mode in ["library", "write"] {
        let tmp = tempfile::tempdir().unwrap();
        let json = tmp.path().join("run.json");
        let mut cmd = loadgen();
        cmd.args(["--messages", "256", "--message-bytes", "1048576"])
            .args([
                "--followers",
                "1",
                "--durability",
                "written",
                "--mode",
                mode,
            ])
            .arg("--dir")
            .arg(tmp.path().join("data"));
        // SAFETY: between fork and exec only sched_setaffinity runs (`on_cpu_0`), which is
        // async-signal-safe and touches nothing but the set on its stack.
        unsafe { cmd.pre_exec(common::on_cpu_0) };
        let report = run_reporting(
            &mut cmd,
            "s of it the thread sending to the followers",
            &json,
            &["\"converged_s\": "],
        );
        let run_s =
            number_after(&report, "\"elapsed_s\": ") + number_after(&report, "\"converged_s\": ");
        let leader = &report[report.find("\"leader\": {").unwrap()..];
        let leader_wait_s = number_after(leader, "\"cpu_wait_s\": ");
        let sender_wait_s = number_after(leader, "\"sender_cpu_wait_s\": ");
        let followers = &report[report.find("\"follower_usage\": [").unwrap()..];
        let follower_wait_s = number_after(followers, "\"cpu_wait_s\": ");
        assert!(
            sender_wait_s > 0.001 && sender_wait_s <= leader_wait_s,
            "{mode}: the sender waited {sender_wait_s} s, the leader's process \
             {leader_wait_s} s\n{report}"
        );
        // One thread waits at most as long as the run (and the follower's start before it).
        assert!(
            sender_wait_s <= run_s + 0.5,
            "{mode}: {sender_wait_s} s in {run_s} s"
        );
        // Placed in time too: each 100 ms sample says how long of it the thread waited, which
        // adds up to no more than its wait over the whole run.
        let per_sample_ms: Vec<f64> = report
            .split("\"sender_cpu_wait_ms\": ")
            .skip(1)
            .map(|rest| {
                let end = rest.find('}').unwrap();
                rest[..end]
                    .parse()
                    .unwrap_or_else(|_| panic!("{mode}: {rest}"))
            })
            .collect();
        assert!(!per_sample_ms.is_empty(), "{mode}: no samples in\n{report}");
        // loadgen's own confirmer shares the CPU too, and says so; write mode times no acks.
        if mode == "library" {
            let confirmer_wait_s = number_after(&report, "\"confirmer_cpu_wait_s\": ");
            assert!(
                confirmer_wait_s >= 0.0,
                "{mode}: confirmer {confirmer_wait_s} s"
            );
        } else {
            assert!(
                report.contains("\"confirmer_cpu_wait_s\": null"),
                "{report}"
            );
        }
        let sampled_s = per_sample_ms.iter().sum::<f64>() / 1e3;
        assert!(
            per_sample_ms.iter().all(|&ms| ms >= 0.0) && sampled_s <= sender_wait_s + 0.001,
            "{mode}: {per_sample_ms:?} against {sender_wait_s} s"
        );
        assert!(
            follower_wait_s > 0.0,
            "{mode}: follower waited {follower_wait_s} s\n{report}"
        );
    }
}

/// `--dir` can be given again: a run whose followers matched the leader removes the data dirs
/// it made there, so the next run starts from empty ones, as a measurement must (a follower
/// that finds an earlier run's files deletes them while the next run's writer is already
/// timed).
#[test]
fn a_run_on_a_given_dir_leaves_nothing_for_the_next_run_to_trip_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    for round in ["first", "second"] {
        let json = tmp.path().join(format!("{round}.json"));
        run_reporting(
            loadgen()
                .args(["--messages", "64", "--message-bytes", "65536"])
                .args(["--followers", "2", "--durability", "written"])
                .arg("--dir")
                .arg(&dir),
            "followers identical to the leader: yes",
            &json,
            &["\"checksums_match\": true"],
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "the {round} run left {left:?} in --dir");
    }
}

/// A follower's data dir that holds files (an earlier run stopped before it could clean up, or
/// someone else's) is refused by name rather than measured with: the follower would spend the
/// run's first moments deleting them.
#[test]
fn a_follower_dir_that_holds_files_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let stale = tmp.path().join("refused").join("follower2");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("old.seg"), b"from an earlier run").unwrap();
    let said = refused(
        tmp.path(),
        &[
            "--messages",
            "16",
            "--followers",
            "2",
            "--durability",
            "written",
        ],
    );
    assert!(
        said.contains("follower2") && said.contains("not empty"),
        "{said}"
    );
    assert!(
        stale.join("old.seg").exists(),
        "loadgen removed what it did not make"
    );
}
