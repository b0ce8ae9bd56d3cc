//! `ferry demo`: the README's first command. A leader (embedded, through the library API a broker
//! would use) and two `ferry follow` processes in a temporary directory; a writer appends to
//! segment files and rewrites a small JSON file for a while; the followers' lag is printed every
//! second; at the end every copy's checksums are compared. Exit 0 only if all match.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use ferry::auth::Secret;
use ferry::engine::EngineKind;
use ferry::frame::Durability;
use ferry::index::checksum_dir;
use ferry::leader::{Leader, LeaderConfig};

const SEGMENTS: usize = 4;
const MESSAGE_BYTES: usize = 1024;
const SEGMENT_BYTES_MAX: u64 = 8 * 1024 * 1024;

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(seconds: u64, engine: Option<EngineKind>) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let leader_dir = tmp.path().join("leader");
    let secret_bytes = b"ferry-demo-secret".to_vec();
    let secret_file = tmp.path().join("secret");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Readable by its owner only, as a secret file should be (ferry warns otherwise).
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_file)?;
        file.write_all(&secret_bytes)?;
    }
    let secret = Secret::new(secret_bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = LeaderConfig::new(&leader_dir, "127.0.0.1:0".parse()?, secret);
    config.engine = engine;
    let leader = Leader::start(config, Vec::new())?;
    println!(
        "demo: leader on {} ({} engine), data in {}",
        leader.local_addr(),
        leader.engine().name(),
        tmp.path().display()
    );
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    let mut follower_dirs = Vec::new();
    for i in 1..=2 {
        let dir = tmp.path().join(format!("follower{i}"));
        let mut cmd = Command::new(&exe);
        cmd.arg("follow")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--leader")
            .arg(leader.local_addr().to_string())
            .arg("--secret-file")
            .arg(&secret_file)
            .stdout(Stdio::null())
            .env("RUST_LOG", "warn");
        if let Some(e) = engine {
            cmd.arg("--io-engine").arg(e.name());
        }
        children
            .0
            .push(cmd.spawn().context("cannot start a follower")?);
        follower_dirs.push(dir);
    }

    // The writer: 1 KiB messages into segments that roll over at 8 MiB, like a broker's.
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut segment_no = 0u64;
    let mut offset = 0u64;
    let mut messages = 0u64;
    let mut position = 0u64;
    let mut file = open_segment(&leader_dir, segment_no)?;
    let message = vec![b'm'; MESSAGE_BYTES];
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..64 {
            if offset + MESSAGE_BYTES as u64 > SEGMENT_BYTES_MAX {
                segment_no += 1;
                offset = 0;
                file = open_segment(&leader_dir, segment_no)?;
                if segment_no as usize >= SEGMENTS {
                    let old = format!("segments/{:08}.seg", segment_no - SEGMENTS as u64);
                    std::fs::remove_file(leader_dir.join(&old))?;
                    leader.delete_file(&old)?;
                }
            }
            file.write_all_at(&message, offset)?;
            position = leader.append(&segment_path(segment_no), offset, MESSAGE_BYTES as u64)?;
            offset += MESSAGE_BYTES as u64;
            messages += 1;
        }
        if messages % 4096 == 0 {
            let meta = format!("{{\"segment\":{segment_no},\"offset\":{offset}}}\n");
            let tmp_meta = leader_dir.join("meta.json.tmp");
            std::fs::write(&tmp_meta, meta)?;
            std::fs::rename(&tmp_meta, leader_dir.join("meta.json"))?;
            position = leader.replace_file("meta.json")?;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            print_lag(&leader, started, messages);
        }
        // About 40 MB/s: a broker's steady load, not a benchmark.
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("demo: writer stopped after {messages} messages; waiting for both followers to sync");
    let synced = leader.wait_for(position, Durability::Synced, 2, Duration::from_secs(30));
    print_lag(&leader, started, messages);
    if !synced {
        println!(
            "demo: FAILED: the followers did not ack position {position} as synced within 30 s"
        );
        return Ok(ExitCode::FAILURE);
    }
    let expected = checksum_dir(&leader_dir)?;
    let mut ok = true;
    for dir in &follower_dirs {
        let got = checksum_dir(dir)?;
        let same = got == expected;
        ok &= same;
        println!(
            "demo: {}: {} files, {}",
            dir.display(),
            got.len(),
            if same {
                "checksums match the leader"
            } else {
                "CHECKSUMS DIFFER"
            }
        );
    }
    drop(children);
    leader.shutdown();
    if ok {
        println!(
            "demo: OK: all {} files identical on the leader and both followers",
            expected.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

fn segment_path(n: u64) -> String {
    format!("segments/{n:08}.seg")
}

fn open_segment(root: &std::path::Path, n: u64) -> anyhow::Result<std::fs::File> {
    let path = root.join(segment_path(n));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?)
}

fn print_lag(leader: &Leader, started: Instant, messages: u64) {
    let mut line = format!(
        "{:5.1} s  {:>8} msgs  position {:>11}",
        started.elapsed().as_secs_f64(),
        messages,
        leader.position()
    );
    for f in leader.followers() {
        line.push_str(&format!(
            "  | #{} {:<9} lag {:>9} B  p99 ack {:>6} us",
            f.id,
            f.lag.state.name(),
            f.lag.lag_bytes[Durability::Synced.index()],
            f.lag.ack_latency_p99_us
        ));
    }
    println!("{line}");
    let _ = std::io::stdout().flush();
}
