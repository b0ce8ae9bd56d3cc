//! The baselines a run measures beside itself: the plain fan-out in a child loadgen
//! (`--raw-baseline`) and dd with fdatasync on the followers' disk (`--dd-baseline`).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::report::RawBaseline;
use crate::{raw, Args};

/// Runs this run's workload through the plain fan-out in a child loadgen (`--mode raw`, its
/// receivers under `root`, its segments in `leader_dir/raw-baseline`: on the leader's file
/// system, removed when it ends) and reads what it measured from its JSON report. Its summary
/// goes to stderr.
pub fn run_raw_baseline(
    args: &Args,
    root: &Path,
    leader_dir: &Path,
) -> anyhow::Result<RawBaseline> {
    let dir = root.join("raw-baseline");
    let segments = leader_dir.join("raw-baseline");
    let json = root.join("raw-baseline.json");
    let (lo, hi) = args.message_bytes;
    let writer = if args.mode == "write" {
        "write"
    } else {
        "mmap"
    };
    let durability = raw::receivers_durability(args.durability);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--mode", "raw", "--raw-writer", writer])
        .args(["--durability", args.durability.name()])
        .args(["--followers", &args.followers.to_string()])
        .args(["--message-bytes", &format!("{lo}-{hi}")])
        .args(["--segment-bytes", &args.segment_bytes.to_string()])
        .args(["--raw-batch-bytes", &args.raw_batch_bytes.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .arg("--dir")
        .arg(&dir)
        .arg("--leader-dir")
        .arg(&segments)
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::from(std::io::stderr()));
    match args.messages {
        Some(m) => cmd.args(["--messages", &m.to_string()]),
        None => cmd.args(["--duration", &format!("{}ms", args.duration.as_millis())]),
    };
    if let Some(cpu) = args.writer_cpu {
        cmd.args(["--writer-cpu", &cpu.to_string()]);
    }
    if let Some(cc) = &args.tcp_congestion {
        cmd.args(["--tcp-congestion", cc]);
    }
    if args.raw_acks {
        cmd.arg("--raw-acks");
    }
    eprintln!(
        "raw baseline: the same workload through the plain fan-out first (its writer's \
         {writer}, segments in {}, receivers at {durability} in {})",
        segments.display(),
        dir.display()
    );
    let status = cmd
        .status()
        .context("cannot run loadgen --mode raw for --raw-baseline")?;
    if !status.success() {
        bail!("the raw baseline (loadgen --mode raw) failed: {status}");
    }
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("cannot read the raw baseline's {}", json.display()))?;
    let baseline = RawBaseline::from_json(&text, durability, writer)
        .with_context(|| format!("the raw baseline's report lacks a figure:\n{text}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&json);
    Ok(baseline)
}

/// The disk's raw write rates in MB/s, measured the way `dd bs=1M conv=fdatasync` does.
#[derive(Clone, Copy)]
pub struct DdRates {
    /// The MiB into one file.
    pub one_file: f64,
    /// The same MiB as the run lays them out, in files of a segment each, one after the other,
    /// each synced before the next: what the disk gives a replica of segments (creating,
    /// allocating and syncing each file costs the file system something per file). `None` when
    /// they fit in one segment.
    pub per_segment: Option<f64>,
}

impl DdRates {
    pub fn measure(root: &Path, mib: u64, segment_bytes: u64) -> anyhow::Result<DdRates> {
        let total_bytes = mib * 1024 * 1024;
        let (_, secs) = dd_files(&root.join("dd-baseline"), total_bytes, total_bytes)?;
        let one_file = total_bytes as f64 / 1e6 / secs;
        eprintln!("dd baseline: {mib} MiB in {secs:.2} s = {one_file:.1} MB/s");
        let per_segment = if segment_bytes == 0 || segment_bytes >= total_bytes {
            None
        } else {
            let dir = root.join("dd-per-segment");
            let (files, secs) = dd_files(&dir, total_bytes, segment_bytes)?;
            let rate = total_bytes as f64 / 1e6 / secs;
            eprintln!(
                "dd per segment: {files} files of {segment_bytes} bytes, each synced before the \
                 next, in {secs:.2} s = {rate:.1} MB/s"
            );
            Some(rate)
        };
        Ok(DdRates {
            one_file,
            per_segment,
        })
    }

    /// The mean of two measurements (before and after a run: a shared disk drifts).
    pub fn mean(self, other: DdRates) -> DdRates {
        DdRates {
            one_file: (self.one_file + other.one_file) / 2.0,
            per_segment: self
                .per_segment
                .zip(other.per_segment)
                .map(|(a, b)| (a + b) / 2.0),
        }
    }
}

/// Writes `total_bytes` into `dir` as files of `file_bytes` each (the last one shorter), one
/// after the other, each as `dd bs=1M conv=fdatasync` writes one: 1 MiB writes, then
/// fdatasync. Returns how many files and the seconds it took; removes `dir` after.
fn dd_files(dir: &Path, total_bytes: u64, file_bytes: u64) -> std::io::Result<(u64, f64)> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let block = vec![0x5a_u8; 1024 * 1024];
    // `--dd-baseline 0` writes no file (and measures nothing, as before).
    let files = total_bytes.div_ceil(file_bytes.max(1));
    let started = Instant::now();
    let mut left_bytes = total_bytes;
    for n in 0..files {
        let mut f = std::fs::File::create(dir.join(format!("{n:08}.seg")))?;
        let mut file_left = file_bytes.min(left_bytes);
        left_bytes -= file_left;
        while file_left > 0 {
            let len = (block.len() as u64).min(file_left) as usize;
            f.write_all(&block[..len])?;
            file_left -= len as u64;
        }
        f.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok((files, secs))
}
