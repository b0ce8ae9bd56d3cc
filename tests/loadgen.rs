//! `loadgen` end to end, briefly: a writer, a follower killed and restarted under load, and the
//! report files it promises.

use std::process::Command;

#[test]
fn loadgen_runs_with_a_killed_follower_and_writes_its_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("run.json");
    let svg = tmp.path().join("run.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .args([
            "--duration",
            "2s",
            "--followers",
            "2",
            "--durability",
            "written",
        ])
        .args(["--rate", "20000", "--kill-follower-every", "700ms"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .arg("--dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("followers identical to the leader: yes"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(&json).unwrap();
    for field in [
        "\"messages_per_s\"",
        "\"append_to_ack_us\": {\"count\"",
        "\"follower_usage\"",
        "\"samples\"",
        "\"checksums_match\": true",
    ] {
        assert!(report.contains(field), "{field} missing from\n{report}");
    }
    assert!(
        !report.contains("\"kills\": 0,"),
        "no follower was killed:\n{report}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}
