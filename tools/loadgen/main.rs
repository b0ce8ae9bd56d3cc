//! loadgen: stresses ferry the way a broker does and reports what it costs.
//!
//! Library mode (the default): writer threads append messages into mmap'd, preallocated
//! segments that roll over at `--segment-bytes`, and tell an embedded `ferry::leader::Leader`
//! with `append`, as a broker embedding ferry would. Write mode: the writers use write(2) in a
//! directory watched by a `ferry lead` process. Either way `--followers` `ferry follow`
//! processes on 127.0.0.1 replicate it at `--durability`.
//!
//! It measures messages/s and MB/s; the latency from `append()` to acked by every follower (an
//! HDR histogram, library mode only: the leader's positions are not visible across processes);
//! the cost of the `append()` call itself; per-follower lag over time; CPU seconds and peak RSS
//! of every process. Faults (`--kill-follower-every`, `--stall-follower`) are injected on a
//! timer and the latencies seen while one is active are reported apart. At the end it compares
//! every follower's checksums with the leader's and exits 1 if any differ.

mod cpus;
mod leader_view;
mod machine;
mod probe;
mod procs;
mod raw;
mod report;
mod rounds;
mod segments;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use ferry::auth::Secret;
use ferry::engine::EngineKind;
use ferry::frame::Durability;
use ferry::index::checksum_dir;
use ferry::leader::{Leader, LeaderConfig};
use leader_view::LeaderView;
use procs::Proc;
use report::{
    histogram, AckSample, FaultKind, FaultSpan, RawBaseline, Report, Sample, Usage, WriterSample,
};
use segments::SegmentWriter;

/// How often lag, throughput and process usage are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the followers get to hold everything after the writers stop.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the followers at the start get to connect and finish their initial sync (of
/// `--join-follower`'s preload, say) before the run's clock starts.
const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages a writer hands to the confirmer at once, at most.
const CONFIRM_BATCH: usize = 1024;
/// How long a message may wait in a writer's batch before the batch goes to the confirmer (a
/// writer that is about to sleep, under `--rate`, hands its batch over first).
const CONFIRM_DELAY_MAX: Duration = Duration::from_micros(50);

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Stress ferry like a broker: writers, followers, faults; report throughput, latency, lag and cost"
)]
struct Args {
    /// library: mmap'd segments and an embedded leader told with append(); write: write(2) into
    /// a directory watched by a `ferry lead` process; raw: the library mode's writer (or
    /// --raw-writer write) with no ferry, each append spliced to --followers receiver threads
    /// over loopback TCP (no protocol, no acks; at --durability synced each receiver counts
    /// only what fdatasync made durable): the machine's limit for the same workload, to run
    /// beside a library or write mode run.
    #[arg(long, default_value = "library", value_parser = ["library", "write", "raw"])]
    mode: String,
    /// `ferry follow` processes to run (0: the writer's baseline, nobody to replicate to); in
    /// raw mode, receivers.
    #[arg(long, default_value_t = 2)]
    followers: usize,
    /// What the followers promise before they ack.
    #[arg(long, default_value = "synced")]
    durability: Durability,
    /// How long the writers run (e.g. 10s, 500ms, 2m), unless --messages is given.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many messages instead of after --duration.
    #[arg(long)]
    messages: Option<u64>,
    /// Message size in bytes, or a range MIN-MAX drawn uniformly.
    #[arg(long, default_value = "1024", value_parser = parse_size_range)]
    message_bytes: (usize, usize),
    /// Messages per second over all writers; 0 means as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Writer threads, each with its own segments.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Segment size; a segment rolls over when the next message would not fit (LavinMQ: 8 MiB).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    segment_bytes: u64,
    /// Write the summary as JSON to this file (field names in the README).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw throughput, per-follower lag, the append-to-ack p99 and the writers' append() p99 over
    /// time as SVG to this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// SIGKILL one follower (in turn) this often, and restart it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    kill_follower_every: Option<Duration>,
    /// SIGSTOP the first follower for this long, a third into the run, then SIGCONT it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stall_follower: Option<Duration>,
    /// The last follower joins a third into the run instead of at the start, with a full sync
    /// of this many MiB preloaded into the leader's dir (its own files, beside the segments).
    /// The window from its start until it holds everything counts as a fault.
    #[arg(long, value_name = "MIB")]
    join_follower: Option<u64>,
    /// What a join costs the writers on this machine without ferry, the baseline for
    /// --join-follower: this many MiB preloaded as it does, and a third into the run copied to
    /// a receiver over loopback TCP with splice on both sides (a sender and a receiver thread,
    /// off --writer-cpu), checked byte for byte at the end. The copy counts as a fault; no
    /// follower is needed.
    #[arg(long, value_name = "MIB")]
    raw_join: Option<u64>,
    /// I/O engine for the leader and the followers.
    #[arg(long, value_name = "uring|fallback")]
    io_engine: Option<EngineKind>,
    /// TCP congestion control of the leader's connections to the followers (ferry's
    /// `--tcp-congestion`) and of the raw fan-out's senders; by default the system's
    #[arg(long, value_name = "NAME")]
    tcp_congestion: Option<String>,
    /// Before the run, measure the disk's raw write rate the way `dd bs=1M conv=fdatasync` does
    /// (this many MiB into the run's directory), and report the run against it; with segments
    /// smaller than that, also as files of a segment each, each synced before the next.
    #[arg(long, value_name = "MIB")]
    dd_baseline: Option<u64>,
    /// Library or write mode: first run the same workload through the plain splice fan-out
    /// (`--mode raw` in a child loadgen: the same writer, message sizes, segments, rate,
    /// duration or count, a receiver per follower at the same durability, segments beside the
    /// leader's dir), then report this run against it: messages/s delivered to every follower,
    /// and append() to acked beside the fan-out's append() to received.
    #[arg(long)]
    raw_baseline: bool,
    /// Where to put the data dirs (default: a new temporary directory, removed at the end).
    /// A run whose followers match the leader removes the dirs it made there; one that does
    /// not leaves them to inspect. A follower's dir that holds files is refused.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Put the leader's data dir here instead (it must not exist or be empty; it is removed at
    /// the end), e.g. on /dev/shm: on one machine the leader's writes otherwise share the
    /// followers' disk, which separate machines do not.
    #[arg(long, value_name = "DIR")]
    leader_dir: Option<PathBuf>,
    /// --mode raw: a sender waits until this many bytes are there to send. 0 sends each append
    /// at once, like ferry (the latency floor); 1048576 makes big splices (the throughput
    /// ceiling).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    raw_batch_bytes: u64,
    /// --mode raw: how the writer writes its segments: mmap (library mode's writer) or write
    /// (write(2), write mode's). --raw-baseline takes the run's own.
    #[arg(long, default_value = "mmap", value_parser = ["mmap", "write"])]
    raw_writer: String,
    /// Run the writer threads on this CPU alone, and everything else (the leader's server
    /// thread, the followers) on the other CPUs: on one machine the followers otherwise take
    /// the writer's CPU time, which followers on other machines do not.
    #[arg(long, value_name = "N")]
    writer_cpu: Option<usize>,
    /// Instead of a run: bounce one cache line between CPUs A and B for --duration and print its
    /// round trip every 250 ms (on a VM, the host decides it, and it can change by several
    /// times from one second to the next: what a follower costs the writer's append() moves
    /// with it).
    #[arg(long, value_name = "A:B", value_parser = parse_cpu_pair)]
    probe_cpus: Option<(usize, usize)>,
    /// Repeat the run this many times, each in a child loadgen (with --raw-baseline, the
    /// fan-out and then ferry, back to back, every round), then print a line of figures per
    /// round and their medians: on a shared machine one run is one sample. With --json, the
    /// file holds every round's report and the medians
    #[arg(long, value_name = "N", default_value_t = 1)]
    rounds: u32,
}

impl Args {
    /// Whether a fault is to be injected (`--kill-follower-every`, `--stall-follower`,
    /// `--join-follower`, `--raw-join`).
    fn faults_asked(&self) -> bool {
        self.follower_faults_asked() || self.raw_join.is_some()
    }

    /// Whether a fault that needs a follower is to be injected.
    fn follower_faults_asked(&self) -> bool {
        self.kill_follower_every.is_some()
            || self.stall_follower.is_some()
            || self.join_follower.is_some()
    }
}

fn parse_cpu_pair(s: &str) -> Result<(usize, usize), String> {
    let pair = s.split_once(':').and_then(|(a, b)| {
        Some((
            a.trim().parse::<usize>().ok()?,
            b.trim().parse::<usize>().ok()?,
        ))
    });
    pair.ok_or_else(|| format!("{s:?}: expected two CPU numbers as A:B, e.g. 0:1"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_size_range(s: &str) -> Result<(usize, usize), String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{v:?} is not a byte count"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(s)?, parse(s)?),
    };
    if lo == 0 || lo > hi {
        return Err(format!(
            "message size {s:?} must be N or MIN-MAX with 0 < MIN <= MAX"
        ));
    }
    Ok((lo, hi))
}

/// State shared by the threads of a run.
struct Shared {
    stop: AtomicBool,
    in_fault: AtomicBool,
    messages: AtomicU64,
    bytes: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    if let Some((a, b)) = args.probe_cpus {
        let samples = probe::run(a, b, args.duration)?;
        print!("{}", probe::summary(a, b, &samples));
        if let Some(path) = &args.json {
            std::fs::write(path, probe::json(a, b, &samples))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(true);
    }
    if args.writers == 0 {
        bail!("--writers must be at least 1");
    }
    if args.followers == 0 && args.follower_faults_asked() {
        bail!("fault injection needs at least one follower (--raw-join does not)");
    }
    if args.raw_join.is_some() && args.join_follower.is_some() {
        bail!("--raw-join and --join-follower both start a third into the run: run them apart");
    }
    let raw_mode = args.mode == "raw";
    if raw_mode && args.raw_join.is_some() {
        bail!("--raw-join is the baseline of a library or write mode run: --mode raw has no ferry");
    }
    if raw_mode {
        if args.writers != 1 {
            bail!("--mode raw takes one writer (its segments in order are the receivers' stream)");
        }
        if args.faults_asked() || args.io_engine.is_some() {
            bail!("--mode raw runs no ferry: faults and --io-engine apply to ferry followers only");
        }
    }
    if args.raw_baseline {
        if raw_mode {
            bail!("--raw-baseline compares a library or write mode run with --mode raw");
        }
        if args.writers != 1 {
            bail!("--raw-baseline: the fan-out takes one writer (its segments in order are the receivers' stream)");
        }
        if args.faults_asked() {
            bail!("--raw-baseline compares runs without faults: the fan-out has no followers to fault");
        }
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.rounds > 1 && args.plot.is_some() {
        bail!("--plot draws one run: leave it out with --rounds, or run one round");
    }
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            None
        }
        None => Some(
            tempfile::Builder::new()
                .prefix("ferry-loadgen-")
                .tempdir_in("/var/tmp")?,
        ),
    };
    let root = args.dir.clone().unwrap_or_else(|| {
        tmp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    if args.rounds > 1 {
        let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
        return rounds::run(
            &rounds::child_args(&argv),
            args.rounds,
            &root,
            args.json.as_deref(),
        );
    }
    let leader_dir = args
        .leader_dir
        .clone()
        .unwrap_or_else(|| root.join("leader"));
    let made = RunDirs::new(&root, &leader_dir, &args);
    made.refuse_leftovers()?;
    std::fs::create_dir_all(&leader_dir)?;
    // The fan-out runs alone, before this run starts anything, and the child it runs in may
    // use every CPU (keep_off below would take the writer's from it).
    let raw_baseline = if args.raw_baseline {
        Some(run_raw_baseline(&args, &root, &leader_dir)?)
    } else {
        None
    };
    // Before any thread or process starts: they inherit it.
    if let Some(cpu) = args.writer_cpu {
        cpus::keep_off(cpu)?;
    }
    let secret_file = made.secret.clone();
    std::fs::write(&secret_file, "loadgen-secret")?;
    let library = args.mode == "library";
    let preloaded = match args.join_follower.or(args.raw_join) {
        Some(mib) => preload(&leader_dir, mib)?,
        None => Vec::new(),
    };
    let raw_join = args.raw_join.map(|_| RawJoin {
        files: preloaded
            .iter()
            .map(|(p, len)| (p.as_str().to_string(), *len))
            .collect(),
        dir: leader_dir.clone(),
        recv_root: made.raw_join.clone(),
        tcp_congestion: args.tcp_congestion.clone(),
    });

    // The leader: embedded, or a `ferry lead` process.
    let (leader, lead_proc, addr, view) = if raw_mode {
        (None, None, "127.0.0.1:0".parse()?, None)
    } else if library {
        let secret = Secret::new(b"loadgen-secret".to_vec()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut config = LeaderConfig::new(&leader_dir, "127.0.0.1:0".parse()?, secret);
        config.engine = args.io_engine;
        config.tcp_congestion = args.tcp_congestion.clone();
        let leader = Arc::new(Leader::start(config, preloaded)?);
        let addr = leader.local_addr();
        let view = LeaderView::Embedded(leader.clone());
        (Some(leader), None, addr, Some(Arc::new(view)))
    } else {
        let (proc, addr, http) = start_lead(
            &leader_dir,
            &secret_file,
            args.io_engine,
            args.tcp_congestion.as_deref(),
        )?;
        let view = LeaderView::Lead(http.to_string());
        (None, Some(proc), addr, Some(Arc::new(view)))
    };
    let fanout = if raw_mode {
        Some(Arc::new(raw::Fanout::start(
            &leader_dir,
            &root,
            args.followers,
            args.raw_batch_bytes,
            args.tcp_congestion.as_deref(),
            args.durability == Durability::Synced,
        )?))
    } else {
        None
    };
    let engine_name = if raw_mode {
        "splice".to_string()
    } else {
        args.io_engine
            .map(|e| e.name().to_string())
            .or_else(|| leader.as_ref().map(|l| l.engine().name().to_string()))
            .unwrap_or_else(|| "auto".into())
    };

    let follower_args = |i: usize| {
        let dir = follower_dir(&root, i);
        let mut a: Vec<OsString> = vec!["follow".into(), "--data-dir".into(), dir.clone().into()];
        a.extend([
            "--leader".into(),
            addr.to_string().into(),
            "--secret-file".into(),
            secret_file.clone().into(),
        ]);
        a.extend(["--durability".into(), args.durability.name().into()]);
        if let Some(e) = args.io_engine {
            a.extend(["--io-engine".into(), e.name().into()]);
        }
        (format!("follower{i}"), dir, a)
    };
    let at_start = if raw_mode {
        0
    } else {
        args.followers - usize::from(args.join_follower.is_some())
    };
    let mut followers = Vec::new();
    for i in 1..=at_start {
        let (name, dir, a) = follower_args(i);
        followers.push(Proc::spawn(name, dir, a)?);
    }
    let joiner = args.join_follower.map(|_| follower_args(args.followers));
    let followers = Arc::new(Mutex::new(followers));
    if let Some(view) = &view {
        if !view.wait_in_sync(at_start, IN_SYNC_TIMEOUT) {
            bail!(
                "the followers were not all connected and in sync within {} s",
                IN_SYNC_TIMEOUT.as_secs()
            );
        }
    }

    let dd_before = args
        .dd_baseline
        .map(|mib| DdRates::measure(&root, mib, args.segment_bytes))
        .transpose()?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        in_fault: AtomicBool::new(false),
        messages: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let position_at_start = view.as_ref().and_then(|v| v.position());
    // Every timed append is after it: none is counted from a later epoch.
    epoch();
    let cpu_times_at_start = machine::CpuTimes::now();
    // This process's CPU from here until every follower holds everything: the writers' and
    // the embedded leader's (or the fan-out's) cost of the run, without setup or the checksums.
    let self_cpu_s_at_start = procs::self_usage().0;
    let started = Instant::now();

    // Confirmer: append-to-ack latency, without one waiter per message.
    let (confirm_tx, confirm_rx) = mpsc::channel::<Vec<Appended>>();
    // Which followers an append must be acked by: those running at the start, and a late
    // joiner for the appends after the leader's position when it started (the ones before it
    // syncs were never waiting on it). By position, not by when the confirmer gets to an
    // append: a confirmer behind (a busy machine) would otherwise make appends from before the
    // join wait for the joiner's full sync. Read at every wait of the confirmer: on a cache line
    // of its own, not the one the writers' counters in `Shared` bounce on.
    let joined_at = Arc::new(CacheLine(AtomicU64::new(u64::MAX)));
    let confirmer = match (leader.clone(), fanout.clone()) {
        (Some(leader), _) => {
            let durability = args.durability;
            let joined_at = joined_at.clone();
            Some(std::thread::spawn(move || {
                confirm(
                    |beyond, timeout| {
                        let joined = || joined_at.0.load(Ordering::Acquire);
                        if beyond < joined() {
                            // Not beyond what the joiner started at (read again after the
                            // wait: it may have started meanwhile).
                            let got =
                                leader.wait_acked_beyond(beyond, durability, at_start, timeout);
                            got.min(joined())
                        } else {
                            leader.wait_acked_beyond(beyond, durability, at_start + 1, timeout)
                        }
                    },
                    confirm_rx,
                    started,
                )
            }))
        }
        (None, Some(fanout)) => Some(std::thread::spawn(move || {
            confirm(
                |beyond, timeout| fanout.wait_received_beyond(beyond, timeout),
                confirm_rx,
                started,
            )
        })),
        (None, None) => None,
    };

    // Writers.
    let per_writer_rate = args.rate as f64 / args.writers as f64;
    let per_writer_messages = args.messages.map(|m| m.div_ceil(args.writers as u64));
    let mut writer_threads = Vec::new();
    for w in 0..args.writers {
        let sink = match (&leader, &fanout) {
            (Some(leader), _) => Some(Sink::Leader(leader.clone())),
            (None, Some(fanout)) => Some(Sink::Raw(fanout.clone())),
            (None, None) => None,
        };
        let shared = shared.clone();
        let dir = leader_dir.clone();
        let tx = confirm_tx.clone();
        let (lo, hi) = args.message_bytes;
        let segment_bytes = args.segment_bytes;
        // Library mode's writer maps its segments; write mode's, and `--raw-writer write`'s,
        // calls write(2).
        let mmap = library || (raw_mode && args.raw_writer == "mmap");
        let deadline = started + args.duration;
        writer_threads.push(std::thread::spawn(move || {
            write_loop(WriterPlan {
                id: w,
                dir,
                sink,
                shared,
                tx,
                size: (lo, hi),
                segment_bytes,
                mmap,
                cpu: args.writer_cpu,
                rate: per_writer_rate,
                messages: per_writer_messages,
                deadline: if per_writer_messages.is_some() {
                    None
                } else {
                    Some(deadline)
                },
                run_started: started,
            })
        }));
    }
    drop(confirm_tx);

    // Faults.
    let faults = {
        let followers = followers.clone();
        let shared = shared.clone();
        let view = view.clone();
        let kill_every = args.kill_follower_every;
        let stall = args.stall_follower;
        let stall_at = args.duration / 3;
        let durability = args.durability;
        let n = args.followers;
        std::thread::spawn(move || {
            inject_faults(
                &followers,
                &shared,
                view.as_deref(),
                position_at_start,
                Faults {
                    kill_every,
                    stall,
                    stall_at,
                    join: joiner.map(|j| (stall_at, j)),
                    raw_join: raw_join.map(|r| (stall_at, r)),
                    run_started: started,
                    joined_at,
                },
                durability,
                n,
            )
        })
    };

    // Sampler and progress line, until the writers are done.
    let mut samples = Vec::new();
    let mut last = (Instant::now(), 0u64);
    let mut last_print = Instant::now();
    let tty = std::io::stderr().is_terminal();
    while writer_threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(SAMPLE_INTERVAL);
        let now = Instant::now();
        let bytes = shared.bytes.load(Ordering::Relaxed);
        let mb_per_s = (bytes - last.1) as f64 / 1e6 / now.duration_since(last.0).as_secs_f64();
        last = (now, bytes);
        // Each follower process's sockets, so that its lag is its own whichever order the
        // leader's connections are in (`follower1` first, a late joiner last).
        let connected = match (&fanout, &view) {
            (None, Some(view)) => view.connected(args.durability),
            _ => Vec::new(),
        };
        let peers: Vec<u16> = connected.iter().filter_map(|c| c.0).collect();
        let mut ports = vec![Vec::new(); args.followers];
        for (i, p) in followers
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter_mut()
            .enumerate()
        {
            p.sample();
            if view.is_some() && fanout.is_none() && i < ports.len() {
                ports[i] = p.tcp_ports(&peers).to_vec();
            }
        }
        let lag_bytes = match &fanout {
            Some(f) => f.lags(),
            None => leader_view::lags_of(&connected, &ports),
        };
        samples.push(Sample {
            t_s: now.duration_since(started).as_secs_f64(),
            mb_per_s,
            lag_bytes: lag_bytes.clone(),
            in_fault: shared.in_fault.load(Ordering::Relaxed),
        });
        if now.duration_since(last_print) >= Duration::from_secs(1) {
            last_print = now;
            let lags: Vec<String> = lag_bytes
                .iter()
                .map(|l| l.map_or("-".into(), |v| format!("{:.1}MB", v as f64 / 1e6)))
                .collect();
            let line = format!(
                "{:6.1} s  {:>10} msgs  {:7.1} MB/s  lag [{}]{}",
                now.duration_since(started).as_secs_f64(),
                shared.messages.load(Ordering::Relaxed),
                mb_per_s,
                lags.join(" "),
                if shared.in_fault.load(Ordering::Relaxed) {
                    "  (fault)"
                } else {
                    ""
                }
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprintln!();
    }
    let mut call_ns = histogram();
    let mut call_fault_ns = histogram();
    let mut call_before_faults_ns = histogram();
    // When the last writer's last message went in: the sampler notices only at its next tick,
    // up to SAMPLE_INTERVAL later, which the rate and the convergence time must not count.
    let mut writers_done = started;
    let mut writer_samples = Vec::new();
    for t in writer_threads {
        match t.join() {
            Ok(Ok(w)) => {
                call_ns.add(w.normal).ok();
                call_fault_ns.add(w.fault).ok();
                call_before_faults_ns.add(w.before_faults).ok();
                writers_done = writers_done.max(w.done_at);
                writer_samples.push(w.samples);
            }
            Ok(Err(e)) => return Err(e.context("a writer failed")),
            Err(_) => bail!("a writer thread panicked"),
        }
    }
    let elapsed_s = writers_done.duration_since(started).as_secs_f64();
    let machine_cpu = cpu_times_at_start
        .zip(machine::CpuTimes::now())
        .and_then(|(start, end)| start.split_until(end));
    if let Some(fanout) = &fanout {
        fanout.close();
    }
    shared.stop.store(true, Ordering::SeqCst);
    let (faults, raw_copies) = faults
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))?;

    // Convergence: every follower holds everything at its durability, then checksums.
    let mut converged_s = None;
    let everything = view.as_ref().and_then(|v| {
        v.position_of_written(position_at_start, shared.bytes.load(Ordering::Relaxed))
    });
    if let (Some(view), Some(position)) = (&view, everything) {
        if view.wait_for(position, args.durability, args.followers, CONVERGE_TIMEOUT) {
            converged_s = Some(writers_done.elapsed().as_secs_f64());
        }
    }
    let confirmed = match confirmer {
        Some(t) => t
            .join()
            .map_err(|_| anyhow::anyhow!("the confirmer panicked"))?,
        None => Confirmed {
            normal: histogram(),
            fault: histogram(),
            queue_peak_bytes: 0,
            ack_samples: Vec::new(),
        },
    };
    let drained = match fanout {
        Some(fanout) => {
            let fanout = Arc::try_unwrap(fanout)
                .map_err(|_| anyhow::anyhow!("a writer still holds the raw fan-out"))?;
            let drained = fanout.finish()?;
            converged_s = Some(writers_done.elapsed().as_secs_f64());
            Some(drained)
        }
        None => None,
    };
    let self_cpu_s_in_run = procs::self_usage().0 - self_cpu_s_at_start;
    let mut checksums_match = true;
    if let Some(drained) = drained {
        checksums_match = drained.streams_match()?;
    }
    // A raw join that failed left no copy to compare (`recovered_s` is null).
    checksums_match &= faults
        .iter()
        .all(|f| f.kind != FaultKind::RawJoin || f.recovered_s.is_some());
    for copy in &raw_copies {
        checksums_match &= copy.streams_match()?;
    }
    // Only ferry followers are compared here (none with --followers 0 or in raw mode).
    let expected = if followers
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .is_empty()
    {
        Vec::new()
    } else {
        checksum_dir(&leader_dir)?
    };
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    for p in followers
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        loop {
            let same = checksum_dir(&p.dir)
                .map(|got| got == expected)
                .unwrap_or(false);
            if same || Instant::now() > deadline {
                checksums_match &= same;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if converged_s.is_none() && checksums_match {
        converged_s = Some(writers_done.elapsed().as_secs_f64());
    }

    let mut follower_usage = Vec::new();
    for p in followers
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter_mut()
    {
        p.stop();
        let (cpu_s, rss_peak_kib) = p.usage();
        follower_usage.push(Usage {
            name: p.name.clone(),
            cpu_s,
            rss_peak_kib,
        });
    }
    let leader_usage = match lead_proc {
        Some(mut p) => {
            p.stop();
            let (cpu_s, rss_peak_kib) = p.usage();
            Usage {
                name: "leader (ferry lead)".into(),
                cpu_s,
                rss_peak_kib,
            }
        }
        None => {
            let rss_peak_kib = procs::self_usage().1;
            Usage {
                name: if raw_mode {
                    "loadgen (the writer, raw senders and receivers)".into()
                } else {
                    "leader (embedded, with the writers)".into()
                },
                cpu_s: self_cpu_s_in_run,
                rss_peak_kib,
            }
        }
    };
    // The disk's rate drifts on a shared machine: measure it again after the run and compare
    // against the mean of before and after.
    let dd = match (dd_before, args.dd_baseline) {
        (Some(before), Some(mib)) => {
            Some(before.mean(DdRates::measure(&root, mib, args.segment_bytes)?))
        }
        _ => None,
    };
    let report = Report {
        mode: args.mode.clone(),
        engine: engine_name,
        tcp_congestion: args.tcp_congestion.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        }),
        // Raw receivers ack nothing: they either sync or not.
        durability: if raw_mode {
            raw::receivers_durability(args.durability).into()
        } else {
            args.durability.name().into()
        },
        followers: args.followers,
        writers: args.writers,
        writer_cpu: args.writer_cpu,
        elapsed_s,
        messages: shared.messages.load(Ordering::Relaxed),
        bytes: shared.bytes.load(Ordering::Relaxed),
        append_to_ack_us: confirmed.normal,
        append_to_ack_fault_us: confirmed.fault,
        append_call_ns: call_ns,
        append_call_fault_ns: call_fault_ns,
        // Without a fault, every call came before one: no baseline to quote.
        append_call_before_faults_ns: if faults.is_empty() {
            histogram()
        } else {
            call_before_faults_ns
        },
        leader: leader_usage,
        follower_usage,
        samples,
        writer_samples,
        ack_samples: confirmed.ack_samples,
        faults,
        converged_s,
        checksums_match,
        dd_mb_per_s: dd.map(|d| d.one_file),
        dd_per_segment_mb_per_s: dd.and_then(|d| d.per_segment),
        raw_baseline,
        latency_queue_peak_bytes: confirmed.queue_peak_bytes,
        machine_cpu,
        free_page_reporting_order: machine::free_page_reporting_order(),
    };
    print!("{}", report.text());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report.svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(leader) = leader {
        leader.stop_serving();
    }
    if checksums_match {
        made.remove();
    } else {
        eprintln!(
            "loadgen: the run's data dirs are left to inspect: {}",
            made.list()
        );
    }
    Ok(checksums_match)
}

/// Follower `i`'s (from 1) data dir under a run's root.
fn follower_dir(root: &Path, i: usize) -> PathBuf {
    root.join(format!("follower{i}"))
}

/// What a run makes under its root (and `--leader-dir`): the leader's data dir, each
/// follower's, the raw receivers' and the secret file. Each was empty or absent at the start
/// (`refuse_leftovers`), so all that is in them is the run's.
struct RunDirs {
    leader: PathBuf,
    /// The followers' data dirs, then the raw receivers' (raw mode), then `raw_join` if asked.
    dirs: Vec<PathBuf>,
    /// Where `--raw-join`'s receiver writes (under it, as `raw::receiver_dir` says).
    raw_join: PathBuf,
    secret: PathBuf,
}

impl RunDirs {
    fn new(root: &Path, leader: &Path, args: &Args) -> RunDirs {
        let dir = if args.mode == "raw" {
            raw::receiver_dir
        } else {
            follower_dir
        };
        let raw_join = root.join("raw-join");
        let mut dirs: Vec<PathBuf> = (1..=args.followers).map(|i| dir(root, i)).collect();
        if args.raw_join.is_some() {
            dirs.push(raw_join.clone());
        }
        RunDirs {
            leader: leader.to_path_buf(),
            dirs,
            raw_join,
            secret: root.join("secret"),
        }
    }

    /// The leader's data dir, then the others.
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.leader).chain(&self.dirs)
    }

    /// Refuses a data dir that holds files: the leader's would be replicated as the run's, and
    /// a follower would spend the run's first moments deleting what it holds.
    fn refuse_leftovers(&self) -> anyhow::Result<()> {
        for dir in self.all() {
            if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
                bail!(
                    "{} is not empty (an earlier run that stopped before cleaning up, or \
                     someone else's files): remove it, or give another --dir or --leader-dir",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    fn remove(&self) {
        for dir in self.all() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&self.secret);
    }

    fn list(&self) -> String {
        let dirs: Vec<String> = self.all().map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    }
}

/// Runs this run's workload through the plain fan-out in a child loadgen (`--mode raw`, its
/// receivers under `root`, its segments in `leader_dir/raw-baseline`: on the leader's file
/// system, removed when it ends) and reads what it measured from its JSON report. Its summary
/// goes to stderr.
fn run_raw_baseline(args: &Args, root: &Path, leader_dir: &Path) -> anyhow::Result<RawBaseline> {
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
struct DdRates {
    /// The MiB into one file.
    one_file: f64,
    /// The same MiB as the run lays them out, in files of a segment each, one after the other,
    /// each synced before the next: what the disk gives a replica of segments (creating,
    /// allocating and syncing each file costs the file system something per file). `None` when
    /// they fit in one segment.
    per_segment: Option<f64>,
}

impl DdRates {
    fn measure(root: &Path, mib: u64, segment_bytes: u64) -> anyhow::Result<DdRates> {
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
    fn mean(self, other: DdRates) -> DdRates {
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

fn start_lead(
    dir: &Path,
    secret_file: &Path,
    engine: Option<EngineKind>,
    tcp_congestion: Option<&str>,
) -> anyhow::Result<(Proc, std::net::SocketAddr, std::net::SocketAddr)> {
    // Pick free ports, then hand them to `ferry lead` (whose log line would also tell them).
    // Both held until both are known, so that the two differ. Its /metrics tells loadgen the
    // followers' lag and what they acked.
    let (replication, metrics) = (
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
    );
    let (addr, http) = (replication.local_addr()?, metrics.local_addr()?);
    drop((replication, metrics));
    let mut a: Vec<OsString> = vec![
        "lead".into(),
        "--data-dir".into(),
        dir.into(),
        "--listen".into(),
        addr.to_string().into(),
        "--http".into(),
        http.to_string().into(),
    ];
    a.extend(["--secret-file".into(), secret_file.into()]);
    if let Some(cc) = tcp_congestion {
        a.extend(["--tcp-congestion".into(), cc.into()]);
    }
    if let Some(e) = engine {
        a.extend(["--io-engine".into(), e.name().into()]);
    }
    let proc = Proc::spawn("leader".into(), dir.to_path_buf(), a)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for listening in [addr, http] {
        while std::net::TcpStream::connect(listening).is_err() {
            if Instant::now() > deadline {
                bail!("`ferry lead` did not listen on {listening} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok((proc, addr, http))
}

struct WriterPlan {
    id: usize,
    dir: PathBuf,
    /// Whom the writer tells of each message; none in write mode (`ferry lead` watches).
    sink: Option<Sink>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<Appended>>,
    size: (usize, usize),
    segment_bytes: u64,
    /// Through a shared mapping, or with write(2).
    mmap: bool,
    /// `--writer-cpu`.
    cpu: Option<usize>,
    rate: f64,
    messages: Option<u64>,
    deadline: Option<Instant>,
    /// When the run started: the time axis of the writer's samples.
    run_started: Instant,
}

/// Where a library-style writer reports its appends.
enum Sink {
    Leader(Arc<Leader>),
    /// `--mode raw`.
    Raw(Arc<raw::Fanout>),
}

impl Sink {
    /// The position that covers the append, for the confirmer.
    fn append(&self, path: &str, offset: u64, len_bytes: u64) -> anyhow::Result<u64> {
        Ok(match self {
            Sink::Leader(leader) => leader.append(path, offset, len_bytes)?,
            Sink::Raw(fanout) => fanout.append(path, offset, len_bytes),
        })
    }
}

type Hist = hdrhistogram::Histogram<u64>;

/// What one writer measured.
struct WriterResult {
    /// `append()` call latencies (ns), outside and during faults.
    normal: Hist,
    fault: Hist,
    /// Those made before the first fault: the same run's baseline for `fault` (with
    /// `--join-follower` alone, before any follower).
    before_faults: Hist,
    /// The p99 of each `SAMPLE_INTERVAL`.
    samples: Vec<WriterSample>,
    /// When its last message was appended.
    done_at: Instant,
}

/// One writer: messages into segments, each told to the leader.
fn write_loop(plan: WriterPlan) -> anyhow::Result<WriterResult> {
    if let Some(cpu) = plan.cpu {
        cpus::pin_to(cpu).with_context(|| format!("cannot pin a writer to CPU {cpu}"))?;
    }
    let mut segments = SegmentWriter::new(&plan.dir, plan.id, plan.segment_bytes, plan.mmap);
    let mut normal = histogram();
    let mut fault = histogram();
    let mut before_faults = histogram();
    let mut fault_seen = false;
    let mut window = histogram();
    let mut window_started = Instant::now();
    let mut samples = Vec::new();
    let payload: Vec<u8> = (0..plan.size.1)
        .map(|i| (i * 131 + plan.id * 7) as u8)
        .collect();
    let mut batch = Vec::with_capacity(CONFIRM_BATCH);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ plan.id as u64;
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        if plan.messages.is_some_and(|m| sent >= m)
            || plan.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if plan.rate > 0.0 {
            let due = started + Duration::from_secs_f64(sent as f64 / plan.rate);
            let now = Instant::now();
            if due > now {
                // Nothing else would hand the batch over while the writer sleeps: at a low
                // rate its messages would wait for the next one, and the confirmer would
                // count that wait as replication latency.
                if !batch.is_empty() {
                    let _ = plan.tx.send(std::mem::replace(
                        &mut batch,
                        Vec::with_capacity(CONFIRM_BATCH),
                    ));
                }
                std::thread::sleep(due - now);
            }
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = plan.size.0 + (rng as usize) % (plan.size.1 - plan.size.0 + 1);
        let written = segments.write(&payload[..len])?;
        if let Some(sink) = &plan.sink {
            let in_fault = plan.shared.in_fault.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let position = sink.append(written.path, written.offset, len as u64)?;
            let ns = t0.elapsed().as_nanos() as u64;
            let _ = if in_fault {
                fault.record(ns.max(1))
            } else {
                normal.record(ns.max(1))
            };
            fault_seen |= in_fault;
            if !fault_seen {
                let _ = before_faults.record(ns.max(1));
            }
            let _ = window.record(ns.max(1));
            if t0.duration_since(window_started) >= SAMPLE_INTERVAL {
                // Between two timed calls: what this takes (a walk of the histogram, tens of
                // microseconds every 100 ms) is caught up on at the next messages.
                samples.push(WriterSample {
                    t_s: t0.duration_since(plan.run_started).as_secs_f64(),
                    append_call_p99_ns: window.value_at_quantile(0.99),
                });
                window.reset();
                window_started = t0;
            }
            batch.push(Appended::new(position, t0, in_fault));
            // Handed over when full or when its oldest entry has waited CONFIRM_DELAY_MAX, so
            // batching adds at most that much to the measured latency.
            let oldest = batch.first().map_or(t0, Appended::at);
            if batch.len() == CONFIRM_BATCH || t0.duration_since(oldest) >= CONFIRM_DELAY_MAX {
                let _ = plan.tx.send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(CONFIRM_BATCH),
                ));
            }
        }
        sent += 1;
        plan.shared.messages.fetch_add(1, Ordering::Relaxed);
        plan.shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
    let done_at = Instant::now();
    if !batch.is_empty() {
        let _ = plan.tx.send(batch);
    }
    segments.finish()?;
    Ok(WriterResult {
        normal,
        fault,
        before_faults,
        samples,
        done_at,
    })
}

/// One timed append on its way to the confirmer. The confirmer queues one per message until
/// it is acked: millions when followers lag, inside the embedded leader's process, whose RSS
/// the run reports. So it is 16 bytes (a position, a time and a flag as three fields took 32).
#[derive(Clone, Copy)]
struct Appended {
    position: u64,
    /// Nanoseconds from `epoch()`, shifted left by one; the low bit is set during a fault.
    at_ns_fault: u64,
}

/// The time `Appended` counts from: the first call to this (2^63 ns after it is 292 years).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Appended {
    fn new(position: u64, at: Instant, in_fault: bool) -> Appended {
        let ns = at.saturating_duration_since(epoch()).as_nanos() as u64;
        Appended {
            position,
            at_ns_fault: (ns << 1) | u64::from(in_fault),
        }
    }

    fn at(&self) -> Instant {
        epoch() + Duration::from_nanos(self.at_ns_fault >> 1)
    }

    fn in_fault(&self) -> bool {
        self.at_ns_fault & 1 == 1
    }
}

/// What the confirmer measured.
struct Confirmed {
    /// Append-to-ack latencies (us), outside and during faults.
    normal: Hist,
    fault: Hist,
    /// The most bytes its queue of appends not yet acked had allocated: it grows with the
    /// followers' lag, and in library mode it is part of the leader process's RSS.
    queue_peak_bytes: u64,
    /// Per `SAMPLE_INTERVAL` of append time since `run_started`.
    ack_samples: Vec<AckSample>,
}

/// The latencies of the messages appended in each `SAMPLE_INTERVAL`, reported once every
/// message of an interval has surely been acked. Writers hand their batches over at most
/// `CONFIRM_DELAY_MAX` late, so an interval is closed once a message appended
/// `ACK_WINDOWS_OPEN` intervals after it is counted; a straggler from a closed interval counts
/// in the first interval not closed yet. The confirmer meets the intervals nearly in order:
/// the one a message belongs to is looked for from the newest.
struct AckWindows {
    run_started: Instant,
    /// Open intervals, oldest first, with their latencies (us).
    open: std::collections::VecDeque<(u64, Hist)>,
    closed_below: u64,
    samples: Vec<AckSample>,
}

/// Intervals of append time kept open for late batches (a few KiB each).
const ACK_WINDOWS_OPEN: u64 = 10;

impl AckWindows {
    fn new(run_started: Instant) -> AckWindows {
        AckWindows {
            run_started,
            open: Default::default(),
            closed_below: 0,
            samples: Vec::new(),
        }
    }

    fn record(&mut self, appended_at: Instant, us: u64) {
        let since_start_ns = appended_at
            .saturating_duration_since(self.run_started)
            .as_nanos() as u64;
        let index = (since_start_ns / SAMPLE_INTERVAL.as_nanos() as u64).max(self.closed_below);
        let at = match self.open.iter().rposition(|&(i, _)| i <= index) {
            Some(at) if self.open[at].0 == index => at,
            found => {
                let at = found.map_or(0, |at| at + 1);
                // Two significant digits: enough to read a tail, and a small histogram.
                let h = Hist::new(2).unwrap_or_else(|_| unreachable!("2 digits are valid"));
                self.open.insert(at, (index, h));
                at
            }
        };
        let _ = self.open[at].1.record(us);
        while self
            .open
            .front()
            .is_some_and(|&(oldest, _)| oldest + ACK_WINDOWS_OPEN <= index)
        {
            self.close_oldest();
        }
    }

    fn close_oldest(&mut self) {
        if let Some((index, h)) = self.open.pop_front() {
            self.closed_below = index + 1;
            self.samples.push(AckSample {
                t_s: ((index + 1) as u128 * SAMPLE_INTERVAL.as_millis()) as f64 / 1000.0,
                messages: h.len(),
                append_to_ack_p99_us: h.value_at_quantile(0.99),
                append_to_ack_max_us: h.max(),
            });
        }
    }

    fn finish(mut self) -> Vec<AckSample> {
        while !self.open.is_empty() {
            self.close_oldest();
        }
        self.samples
    }
}

/// Matches appended positions with the position every follower has acked; `wait_acked_beyond`
/// is `Leader::wait_acked_beyond` at the run's durability and follower count.
fn confirm(
    mut wait_acked_beyond: impl FnMut(u64, Duration) -> u64,
    rx: mpsc::Receiver<Vec<Appended>>,
    run_started: Instant,
) -> Confirmed {
    let mut normal = histogram();
    let mut fault = histogram();
    let mut windows = AckWindows::new(run_started);
    let mut pending: std::collections::VecDeque<Appended> = Default::default();
    // What the queue's allocation held at most: its capacity, which doubling leaves at up to
    // twice the appends in it, and which is what the process's RSS carries.
    let mut pending_capacity_max = 0;
    let mut acked = 0;
    let mut senders_gone_at: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(batch) => pending.extend(batch),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        pending_capacity_max = pending_capacity_max.max(pending.capacity());
        if pending.is_empty() {
            if senders_gone_at.is_some() {
                break;
            }
            if let Ok(batch) = rx.recv_timeout(Duration::from_millis(50)) {
                pending.extend(batch);
            }
            continue;
        }
        // What the last ack already covers (a batch handed over after it) is counted now.
        if pending.front().is_some_and(|a| a.position > acked) {
            acked = wait_acked_beyond(acked, Duration::from_millis(50));
        }
        let now = Instant::now();
        while let Some(&appended) = pending.front() {
            if appended.position > acked {
                break;
            }
            let us = (now.duration_since(appended.at()).as_micros() as u64).max(1);
            let _ = if appended.in_fault() {
                fault.record(us)
            } else {
                normal.record(us)
            };
            windows.record(appended.at(), us);
            pending.pop_front();
        }
        // Followers that never ack everything do not keep the run from ending.
        if pending.front().is_some()
            && senders_gone_at.is_some_and(|at| at.elapsed() > CONVERGE_TIMEOUT)
        {
            break;
        }
    }
    let entry_bytes = std::mem::size_of::<Appended>();
    Confirmed {
        normal,
        fault,
        queue_peak_bytes: (pending_capacity_max * entry_bytes) as u64,
        ack_samples: windows.finish(),
    }
}

/// What to inject, and when (from the start of the run).
struct Faults {
    kill_every: Option<Duration>,
    stall: Option<Duration>,
    stall_at: Duration,
    /// When the late follower starts, and how.
    join: Option<(Duration, FollowerSpec)>,
    /// When the raw copy starts (`--raw-join`), and what it copies.
    raw_join: Option<(Duration, RawJoin)>,
    /// What the times in the fault log count from.
    run_started: Instant,
    /// The leader's position when the late joiner started, from which appends wait for it
    /// too (see the confirmer); `u64::MAX` until then.
    joined_at: Arc<CacheLine<AtomicU64>>,
}

/// A value alone on its cache line (128 bytes: two lines, as adjacent-line prefetch pairs them).
#[repr(align(128))]
struct CacheLine<T>(T);

/// A follower process to start: name, data dir, `ferry` arguments.
type FollowerSpec = (String, PathBuf, Vec<OsString>);

/// `--raw-join`'s copy: the preloaded files (relative to `dir`, with their lengths), and where
/// the receiver writes.
struct RawJoin {
    files: Vec<(String, u64)>,
    dir: PathBuf,
    recv_root: PathBuf,
    tcp_congestion: Option<String>,
}

/// Writes `mib` MiB into 64 MiB files under `dir/preload/` for a joining follower's full sync;
/// returns them as the leader registers them.
fn preload(dir: &std::path::Path, mib: u64) -> anyhow::Result<Vec<(ferry::paths::RelPath, u64)>> {
    const FILE_MIB: u64 = 64;
    let sub = dir.join("preload");
    std::fs::create_dir_all(&sub)?;
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut files = Vec::new();
    let mut left = mib;
    let mut n = 0;
    while left > 0 {
        let this = left.min(FILE_MIB);
        let name = format!("preload/{n:04}.seg");
        let mut f = std::fs::File::create(dir.join(&name))?;
        for _ in 0..this {
            f.write_all(&chunk)?;
        }
        files.push((
            ferry::paths::RelPath::new(&name).map_err(|e| anyhow::anyhow!("{e}"))?,
            this * 1024 * 1024,
        ));
        left -= this;
        n += 1;
    }
    eprintln!("loadgen: preloaded {mib} MiB in {n} files for the join");
    Ok(files)
}

/// Injects the planned faults until the run stops; returns the log of what it did, and what
/// each raw join's receiver wrote (to compare once the run is over).
fn inject_faults(
    followers: &Mutex<Vec<Proc>>,
    shared: &Shared,
    leader: Option<&LeaderView>,
    position_at_start: Option<u64>,
    plan: Faults,
    durability: Durability,
    n: usize,
) -> (Vec<FaultSpan>, Vec<raw::Drained>) {
    let Faults {
        kill_every,
        stall,
        stall_at,
        join,
        raw_join,
        run_started,
        joined_at,
    } = plan;
    let mut copies = Vec::new();
    let started = Instant::now();
    let since_start = |at: Instant| at.duration_since(run_started).as_secs_f64();
    let mut log = Vec::new();
    let mut join_plan = join.map(|(at, how)| (started + at, how));
    let mut raw_join_plan = raw_join.map(|(at, what)| (started + at, what));
    let mut next_kill = kill_every.map(|d| started + d);
    let mut stall_plan = stall.map(|d| (started + stall_at, d));
    let mut victim = 0usize;
    // A fault lasts until every follower holds what was written when it ended; logged with
    // the time that happened (`None` if it did not within CONVERGE_TIMEOUT).
    let recover = |shared: &Shared, kind: FaultKind, follower: String, at: Instant| {
        let ended = Instant::now();
        let mut recovered_s = None;
        if let Some(leader) = leader {
            let written = shared.bytes.load(Ordering::Relaxed);
            if let Some(position) = leader.position_of_written(position_at_start, written) {
                if leader.wait_for(position, durability, n, CONVERGE_TIMEOUT) {
                    recovered_s = Some(since_start(Instant::now()));
                }
            }
        }
        shared.in_fault.store(false, Ordering::Relaxed);
        FaultSpan {
            kind,
            follower,
            at_s: since_start(at),
            ended_s: since_start(ended),
            recovered_s,
        }
    };
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        if let Some(at) = next_kill {
            if now >= at {
                shared.in_fault.store(true, Ordering::Relaxed);
                let mut name = String::new();
                if let Ok(mut f) = followers.lock() {
                    let i = victim % f.len();
                    name = f[i].name.clone();
                    if let Err(e) = f[i].kill_and_restart() {
                        eprintln!("loadgen: cannot restart {}: {e}", f[i].name);
                    }
                }
                victim += 1;
                log.push(recover(shared, FaultKind::Kill, name, now));
                next_kill = kill_every.map(|d| Instant::now() + d);
            }
        }
        if join_plan.as_ref().is_some_and(|(at, _)| now >= *at) {
            if let Some((_, (name, dir, args))) = join_plan.take() {
                shared.in_fault.store(true, Ordering::Relaxed);
                match Proc::spawn(name.clone(), dir, args) {
                    Ok(p) => {
                        if let Ok(mut f) = followers.lock() {
                            f.push(p);
                        }
                        // (Unknown: every append from now on waits for it too.)
                        let at = leader.and_then(|v| v.position()).unwrap_or(0);
                        joined_at.0.store(at, Ordering::Release);
                        log.push(recover(shared, FaultKind::Join, name, now));
                    }
                    Err(e) => {
                        eprintln!("loadgen: cannot start the joining follower: {e}");
                        shared.in_fault.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        if raw_join_plan.as_ref().is_some_and(|(at, _)| now >= *at) {
            if let Some((_, what)) = raw_join_plan.take() {
                shared.in_fault.store(true, Ordering::Relaxed);
                let copied = raw::copy_once(
                    &what.dir,
                    &what.files,
                    &what.recv_root,
                    what.tcp_congestion.as_deref(),
                );
                let done = Instant::now();
                shared.in_fault.store(false, Ordering::Relaxed);
                let recovered_s = match copied {
                    Ok(drained) => {
                        copies.push(drained);
                        Some(since_start(done))
                    }
                    Err(e) => {
                        eprintln!("loadgen: the raw join's copy failed: {e:#}");
                        None
                    }
                };
                log.push(FaultSpan {
                    kind: FaultKind::RawJoin,
                    follower: "raw1".into(),
                    at_s: since_start(now),
                    ended_s: since_start(done),
                    recovered_s,
                });
            }
        }
        if let Some((at, how_long)) = stall_plan {
            if now >= at {
                shared.in_fault.store(true, Ordering::Relaxed);
                let mut name = String::new();
                if let Ok(f) = followers.lock() {
                    name = f[0].name.clone();
                    f[0].signal(libc::SIGSTOP);
                }
                std::thread::sleep(how_long);
                if let Ok(f) = followers.lock() {
                    f[0].signal(libc::SIGCONT);
                }
                log.push(recover(shared, FaultKind::Stall, name, now));
                stall_plan = None;
            }
        }
    }
    (log, copies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// An append keeps its position, its time (to the nanosecond) and its fault flag in 16
    /// bytes.
    #[test]
    fn an_append_keeps_its_position_time_and_fault_in_16_bytes() {
        assert_eq!(std::mem::size_of::<Appended>(), 16);
        let t = epoch() + Duration::from_nanos(1_234_567_891);
        for in_fault in [false, true] {
            let a = Appended::new(u64::MAX - 7, t, in_fault);
            assert_eq!(a.position, u64::MAX - 7);
            assert_eq!(a.at(), t);
            assert_eq!(a.in_fault(), in_fault);
        }
    }

    /// Each message's latency also counts in the `SAMPLE_INTERVAL` it was appended in, from
    /// the run's start, so a tail can be placed in time (`ack_samples`).
    #[test]
    fn latencies_are_also_reported_per_interval_of_append_time() {
        // Times are kept from `epoch()`, as a run starts after it; the messages below are
        // appended up to 250 ms after it, all in the past once acked.
        let run_started = epoch();
        std::thread::sleep(Duration::from_millis(300));
        let (tx, rx) = mpsc::channel();
        // Appended 50 and 60 ms into the run (the first interval), then 250 ms in (the third);
        // all acked at once, so the first interval's wait is 200 ms longer than the third's.
        let at = |ms| run_started + Duration::from_millis(ms);
        tx.send(vec![
            Appended::new(1, at(50), false),
            Appended::new(2, at(60), false),
            Appended::new(3, at(250), false),
        ])
        .unwrap();
        drop(tx);
        let confirmed = confirm(|_, _| 3, rx, run_started);
        let windows: Vec<(f64, u64)> = confirmed
            .ack_samples
            .iter()
            .map(|w| (w.t_s, w.messages))
            .collect();
        assert_eq!(windows, vec![(0.1, 2), (0.3, 1)]);
        let (first, third) = (&confirmed.ack_samples[0], &confirmed.ack_samples[1]);
        // Two significant digits: within 1% of each figure.
        let longer_us = first
            .append_to_ack_max_us
            .abs_diff(third.append_to_ack_max_us);
        assert!(longer_us.abs_diff(200_000) < 10_000, "{first:?} {third:?}");
        assert_eq!(first.append_to_ack_p99_us, first.append_to_ack_max_us);
    }

    /// Intervals met out of order are reported in order; one is closed once a message from
    /// `ACK_WINDOWS_OPEN` intervals later is counted, and a straggler for it then counts in the
    /// first interval still open, not in a second report of its own.
    #[test]
    fn ack_intervals_are_reported_in_order_and_once_each() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut windows = AckWindows::new(t0);
        windows.record(at(250), 5);
        windows.record(at(50), 7);
        // 1.35 s in: the intervals up to 0.3 s are closed.
        windows.record(at(1350), 9);
        windows.record(at(150), 11);
        let samples: Vec<(f64, u64, u64)> = windows
            .finish()
            .iter()
            .map(|w| (w.t_s, w.messages, w.append_to_ack_max_us))
            .collect();
        assert_eq!(
            samples,
            vec![(0.1, 1, 7), (0.3, 1, 5), (0.4, 1, 11), (1.4, 1, 9)]
        );
    }

    /// A batch that reaches the confirmer after the ack covering it was seen is counted at
    /// once. Waiting for a further ack instead added the wait's 50 ms timeout to the last
    /// messages of a run, where no further ack comes: the reported max was 51 ms.
    #[test]
    fn positions_already_acked_are_counted_without_waiting_for_another_ack() {
        let (tx, rx) = mpsc::channel();
        tx.send(vec![Appended::new(5, Instant::now(), false)])
            .unwrap();
        let tx = RefCell::new(Some(tx));
        let mut waits = Vec::new();
        let confirmed = confirm(
            |beyond, _| {
                waits.push(beyond);
                // While the confirmer waits, the writer hands over its last batch (covered by
                // the ack about to be returned) and stops.
                if let Some(tx) = tx.borrow_mut().take() {
                    tx.send(vec![Appended::new(8, Instant::now(), false)])
                        .unwrap();
                }
                10
            },
            rx,
            Instant::now(),
        );
        assert_eq!(confirmed.normal.len(), 2, "both messages are counted");
        assert_eq!(waits, vec![0], "one wait, for the first ack only");
    }
}
