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

mod baselines;
mod cpus;
mod faults;
mod leader_view;
mod machine;
mod probe;
mod procs;
mod raw;
mod report;
mod rounds;
mod segments;
mod writer;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use baselines::{run_raw_baseline, DdRates};
use faults::{inject_faults, preload, CacheLine, Faults, RawJoin};
use ferry::auth::Secret;
use ferry::engine::EngineKind;
use ferry::frame::Durability;
use ferry::index::checksum_dir;
use ferry::leader::{Leader, LeaderConfig};
use leader_view::LeaderView;
use procs::Proc;
use report::{histogram, FaultKind, Report, Sample, Usage};
use writer::{confirm, epoch, write_loop, Appended, Confirmed, Sink, WriterPlan};

/// How often lag, throughput and process usage are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The thread that times each message from `append()` to acked (`writer::confirm`): its own
/// waits for a CPU count in every latency it measures.
const CONFIRMER_THREAD: &str = "confirmer";

/// A thread named `name` (what /proc, `top -H` and loadgen's own `CpuWaits` call it).
fn spawn_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}
/// How long the followers get to hold everything after the writers stop.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the followers at the start get to connect and finish their initial sync (of
/// `--join-follower`'s preload, say) before the run's clock starts.
const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// --mode raw (and --raw-baseline's fan-out): each receiver sends back over its socket what
    /// it holds, and a message counts once every receiver's ack covering it has come back, so
    /// its latency is append() to acked through a round trip, as ferry's is, not append() to
    /// received.
    #[arg(long)]
    raw_acks: bool,
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
    if args.raw_acks && !raw_mode && !args.raw_baseline {
        bail!("--raw-acks is the fan-out's: give it with --mode raw or --raw-baseline");
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
    std::fs::write(&secret_file, "loadgen-shared-secret")?;
    // Its owner's only, as ferry asks of a secret file.
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
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
    let (leader, mut lead_proc, addr, view) = if raw_mode {
        (None, None, "127.0.0.1:0".parse()?, None)
    } else if library {
        let secret =
            Secret::new(b"loadgen-shared-secret".to_vec()).map_err(|e| anyhow::anyhow!("{e}"))?;
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
            args.raw_acks,
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
    // Its threads' waits for a CPU over the same span (sampled with the followers', below).
    let mut self_waits = procs::CpuWaits::from_now(std::process::id());
    // The leader's sending thread's wait at the last sample, for each sample's share of it.
    let sender_wait_s =
        |lead_proc: &Option<procs::Proc>, self_waits: &procs::CpuWaits| match lead_proc {
            Some(p) => p.cpu_waits().1,
            None => self_waits.thread_s(procs::SENDER_THREAD),
        };
    if let Some(p) = lead_proc.as_mut() {
        p.sample();
    }
    let mut sender_waited_s = sender_wait_s(&lead_proc, &self_waits);
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
            Some(spawn_named(CONFIRMER_THREAD, move || {
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
        (None, Some(fanout)) => Some(spawn_named(CONFIRMER_THREAD, move || {
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
        writer_threads.push(spawn_named(&format!("writer{w}"), move || {
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
        self_waits.sample(std::process::id());
        if let Some(p) = lead_proc.as_mut() {
            p.sample();
        }
        let waited_s = sender_wait_s(&lead_proc, &self_waits);
        let sender_cpu_wait_ms = match (waited_s, sender_waited_s) {
            (Some(now), Some(before)) => Some((now - before) * 1e3),
            _ => None,
        };
        sender_waited_s = waited_s;
        let lag_bytes = match &fanout {
            Some(f) => f.lags(),
            None => leader_view::per_process(&connected, &ports),
        };
        samples.push(Sample {
            t_s: now.duration_since(started).as_secs_f64(),
            mb_per_s,
            lag_bytes: lag_bytes.clone(),
            in_fault: shared.in_fault.load(Ordering::Relaxed),
            sender_cpu_wait_ms,
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
    self_waits.sample(std::process::id());
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

    // Read before the followers stop: each one's round trip as the leader measured it.
    let follower_ack_latency_us = match &view {
        Some(view) => {
            let connected = view.ack_latencies();
            let peers: Vec<u16> = connected.iter().filter_map(|c| c.0).collect();
            let ports: Vec<Vec<u16>> = followers
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .iter_mut()
                .map(|p| p.tcp_ports(&peers).to_vec())
                .collect();
            leader_view::per_process(&connected, &ports)
        }
        None => Vec::new(),
    };
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
            cpu_wait_s: p.cpu_waits().0,
            sender_cpu_wait_s: None,
            rss_peak_kib,
        });
    }
    let leader_usage = match lead_proc {
        Some(mut p) => {
            p.stop();
            let (cpu_s, rss_peak_kib) = p.usage();
            let (cpu_wait_s, sender_cpu_wait_s) = p.cpu_waits();
            Usage {
                name: "leader (ferry lead)".into(),
                cpu_s,
                cpu_wait_s,
                sender_cpu_wait_s,
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
                cpu_wait_s: self_waits.total_s(),
                sender_cpu_wait_s: self_waits.thread_s(procs::SENDER_THREAD),
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
        follower_ack_latency_us,
        samples,
        writer_samples,
        ack_samples: confirmed.ack_samples,
        faults,
        converged_s,
        checksums_match,
        dd_mb_per_s: dd.map(|d| d.one_file),
        dd_per_segment_mb_per_s: dd.and_then(|d| d.per_segment),
        raw_baseline,
        raw_acks: raw_mode.then_some(args.raw_acks),
        latency_queue_peak_bytes: confirmed.queue_peak_bytes,
        machine_cpu,
        confirmer_cpu_wait_s: self_waits.thread_s(CONFIRMER_THREAD),
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
