//! End-to-end replication over loopback, measured against the machine's raw limit in the same
//! run: a plain file -> socket -> file transfer with splice(2) on both sides and no protocol
//! (the `/raw` function of each group), through the same steps as ferry's.
//!
//! - `initial_sync_256MiB/{raw,uring,fallback}`: `ferry follow --once --durability written`
//!   into an empty dir; raw: the transfer into a new file.
//! - `stream_1MiB` / `stream_1KiB`, `/{raw,uring,fallback}`: a fresh 256 MiB (64 MiB) segment,
//!   written untimed; an embedded leader told about it in 1 MiB (or 1 KiB) appends,
//!   one `ferry follow --durability written` process; the time from the first append to the
//!   follower's ack of the last. Raw: the transfer of the same segment into a new file.
//!
//! Each ferry row also times a raw transfer of the same bytes beside every iteration of its own
//! (untimed for criterion, before it in one iteration and after it in the next), and prints the
//! median of those paired ratios when the row ends: rows run a minute apart on a host whose
//! speed moves from minute to minute, and a pair's two transfers a fraction of a second apart.
//!
//! `cargo bench --bench streaming`; compare each `thrpt` line with its group's `raw`, and read
//! the `paired` lines.
//! `FERRY_BENCH_TCP_CONGESTION=cubic` sends with that TCP congestion control, raw and ferry alike
//! (by default the system's; BBR without an fq qdisc, as on loopback, paces every send).

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::auth::Secret;
use ferry::engine::{set_congestion, splice_blocking, Pipe};
use ferry::frame::Durability;
use ferry::leader::{Leader, LeaderConfig};

const BIG_BYTES: u64 = 256 * 1024 * 1024;
const SMALL_BYTES: u64 = 64 * 1024 * 1024;
const PIPE_BYTES: usize = 1024 * 1024;
const SECRET: &str = "bench-shared-secret";

/// The TCP congestion control asked for in FERRY_BENCH_TCP_CONGESTION, if any.
fn congestion() -> Option<String> {
    std::env::var("FERRY_BENCH_TCP_CONGESTION").ok()
}

fn write_file(path: &Path, len: u64) {
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7) as u8).collect();
    let mut f = File::create(path).expect("create the data file");
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &chunk[..n]).expect("write the data file");
        left -= n as u64;
    }
}

/// Blocking splice(2) for the bench's own transfers; they may not fail.
fn splice(fd_in: RawFd, off_in: Option<&mut i64>, fd_out: RawFd, len: usize) -> usize {
    splice_blocking(fd_in, off_in, fd_out, None, len).expect("splice")
}

/// The baseline: `src` -> loopback TCP -> `dst`, splice on both sides, no protocol.
fn raw_transfer(src: &Path, dst: &Path, len: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        let out = File::create(&dst).expect("create dst");
        let pipe = Pipe::new(PIPE_BYTES).expect("pipe");
        let mut off = 0i64;
        while (off as u64) < len {
            let n = splice(sock.as_raw_fd(), None, pipe.write.as_raw_fd(), PIPE_BYTES);
            assert!(n > 0, "sender closed early");
            let drained = pipe.drain_blocking(out.as_raw_fd(), Some(&mut off), n);
            drained.expect("splice into dst");
        }
    });
    let sock = TcpStream::connect(addr).expect("connect");
    if let Some(name) = congestion() {
        set_congestion(&sock, &name).expect("FERRY_BENCH_TCP_CONGESTION");
    }
    let file = File::open(src).expect("open src");
    let pipe = Pipe::new(PIPE_BYTES).expect("pipe");
    let mut off = 0i64;
    while (off as u64) < len {
        let want = ((len - off as u64) as usize).min(PIPE_BYTES);
        let n = splice(
            file.as_raw_fd(),
            Some(&mut off),
            pipe.write.as_raw_fd(),
            want,
        );
        let sent = pipe.drain_blocking(sock.as_raw_fd(), None, n);
        sent.expect("splice into the socket");
    }
    drop(sock);
    receiver.join().expect("receiver");
}

/// The first `len` bytes of `src` into a new file `dst` (page cache to page cache): a segment
/// just written, as a streaming follower finds it.
fn copy_prefix(src: &Path, dst: &Path, len: u64) {
    let from = File::open(src).expect("src");
    let to = File::create(dst).expect("dst");
    let pipe = Pipe::new(PIPE_BYTES).expect("pipe");
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as u64) < len {
        let want = PIPE_BYTES.min((len - off_in as u64) as usize);
        let n = splice(
            from.as_raw_fd(),
            Some(&mut off_in),
            pipe.write.as_raw_fd(),
            want,
        );
        let copied = pipe.drain_blocking(to.as_raw_fd(), Some(&mut off_out), n);
        copied.expect("splice into dst");
    }
}

fn leader(dir: &Path, engine: &str) -> Leader {
    let secret = Secret::new(SECRET.as_bytes().to_vec()).expect("secret");
    let mut config = LeaderConfig::new(dir, "127.0.0.1:0".parse().expect("addr"), secret);
    config.engine = Some(engine.parse().expect("engine"));
    config.tcp_congestion = congestion();
    Leader::start(config, Vec::new()).expect("leader")
}

fn follower(leader: &Leader, dir: &Path, secret_file: &Path, engine: &str, once: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args([
        "follow",
        "--durability",
        "written",
        "--io-engine",
        engine,
        "--leader",
    ])
    .arg(leader.local_addr().to_string())
    .arg("--data-dir")
    .arg(dir)
    .arg("--secret-file")
    .arg(secret_file)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if once {
        cmd.arg("--once");
    }
    cmd
}

/// Appends `total` bytes of `seg` in `chunk`-byte steps and waits for the follower's ack.
fn stream(leader: &Leader, seg: &str, base: u64, total: u64, chunk: u64) -> Duration {
    let started = Instant::now();
    let mut position = 0;
    let mut offset = 0;
    while offset < total {
        position = leader.append(seg, base + offset, chunk).expect("append");
        offset += chunk;
    }
    assert!(
        leader.wait_for(position, Durability::Written, 1, Duration::from_secs(120)),
        "the follower did not ack"
    );
    started.elapsed()
}

/// Each iteration of a streaming row: a fresh segment (written untimed), the timed `transfer`
/// of it, then the segment and its copy removed (untimed, `cleanup`). The raw baseline runs
/// through the same steps as ferry, so whatever those steps cost the transfer that follows,
/// both pay it. Nothing is synced: at `--durability written` the disk has no part in the
/// transfer, and segments synced and then deleted made one transfer in five or six take
/// several times as long as the rest here, raw or not, which left the ratio mostly noise.
fn stream_iterations(
    iters: u64,
    src: &Path,
    dir: &Path,
    total: u64,
    mut transfer: impl FnMut(&str) -> Duration,
    mut cleanup: impl FnMut(&str),
) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        let seg = format!(
            "seg{}",
            SEGMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        copy_prefix(src, &dir.join(&seg), total);
        elapsed += transfer(&seg);
        std::fs::remove_file(dir.join(&seg)).expect("remove");
        cleanup(&seg);
    }
    elapsed
}

/// Writes a file the rows only read back to the disk, untimed, so that its writeback falls on
/// no row.
fn settle(path: &Path) {
    File::open(path)
        .and_then(|f| f.sync_all())
        .expect("sync a data file");
}

/// Each ferry iteration of a row beside a raw transfer of the same bytes, in alternating order,
/// and the ratio of each pair (raw time over ferry time: ferry's throughput as a share of raw's).
struct Pairs {
    row: String,
    ratios: Vec<f64>,
}

impl Pairs {
    fn new(row: String) -> Pairs {
        Pairs {
            row,
            ratios: Vec::new(),
        }
    }

    /// Runs `raw` and `ours` one after the other, `raw` first every other time, records their
    /// ratio and returns `ours`' time.
    fn run(&mut self, raw: impl FnOnce() -> Duration, ours: impl FnOnce() -> Duration) -> Duration {
        let (raw_time, our_time) = if self.ratios.len() % 2 == 0 {
            let raw_time = raw();
            (raw_time, ours())
        } else {
            let our_time = ours();
            (raw(), our_time)
        };
        self.ratios
            .push(raw_time.as_secs_f64() / our_time.as_secs_f64());
        our_time
    }

    /// The median ratio, the middle half and the range, on stdout beside criterion's lines.
    fn report(mut self) {
        if self.ratios.is_empty() {
            return;
        }
        self.ratios.sort_by(f64::total_cmp);
        let n = self.ratios.len();
        let at = |share: f64| self.ratios[((n - 1) as f64 * share).round() as usize];
        println!(
            "{}: paired with raw, {:.2}x (median of {n} pairs; middle half {:.2}x to {:.2}x, \
             all {:.2}x to {:.2}x)",
            self.row,
            at(0.5),
            at(0.25),
            at(0.75),
            self.ratios[0],
            self.ratios[n - 1]
        );
    }
}

/// How long `f` took.
fn timed(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

/// Segment names are never reused, so no follower can mistake one for an earlier copy.
static SEGMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let secret_file = tmp.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("secret file");
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod the secret");
    let src = tmp.path().join("src.bin");
    write_file(&src, BIG_BYTES);
    // Written back now, untimed, rather than by the kernel's flusher 30 s on, in some row.
    settle(&src);

    let mut group = c.benchmark_group("loopback");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(BIG_BYTES));
    // Into a new file each time, like a follower's initial sync (the old one is removed
    // untimed, just before).
    let raw_out = tmp.path().join("raw.out");
    group.bench_function("initial_sync_256MiB/raw", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&raw_out);
            },
            |()| raw_transfer(&src, &raw_out, BIG_BYTES),
            criterion::BatchSize::PerIteration,
        )
    });
    for engine in ["uring", "fallback"] {
        // Initial sync of a 256 MiB dir into an empty follower dir.
        let sync_dir = tmp.path().join(format!("sync-{engine}"));
        std::fs::create_dir_all(&sync_dir).expect("dir");
        std::fs::copy(&src, sync_dir.join("seg")).expect("copy");
        settle(&sync_dir.join("seg"));
        let l = leader(&sync_dir, engine);
        l.register_file("seg", BIG_BYTES).expect("register");
        let row = format!("initial_sync_256MiB/{engine}");
        let mut pairs = Pairs::new(row.clone());
        let dst = tmp.path().join(format!("sync-copy-{engine}"));
        let raw_dst = tmp.path().join(format!("sync-raw-{engine}"));
        group.bench_function(row, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&dst);
                    let _ = std::fs::remove_file(&raw_dst);
                    let raw = || timed(|| raw_transfer(&src, &raw_dst, BIG_BYTES));
                    let sync = || {
                        timed(|| {
                            let status = follower(&l, &dst, &secret_file, engine, true)
                                .status()
                                .expect("follow");
                            assert!(status.success());
                        })
                    };
                    elapsed += pairs.run(raw, sync);
                }
                elapsed
            })
        });
        pairs.report();
    }

    // What the initial sync rows wrote, about 1.25 GiB not yet written back, goes before the
    // streaming rows start: deleted, it is never written, where left it would be written back
    // during whichever rows run 30 s later (in one run: stream_1MiB's raw and uring rows).
    let _ = std::fs::remove_file(&raw_out);
    for engine in ["uring", "fallback"] {
        let _ = std::fs::remove_dir_all(tmp.path().join(format!("sync-{engine}")));
        let _ = std::fs::remove_dir_all(tmp.path().join(format!("sync-copy-{engine}")));
        let _ = std::fs::remove_file(tmp.path().join(format!("sync-raw-{engine}")));
    }

    // Streaming appends of bytes already in the file; each row's raw baseline runs right
    // before its engines, through the same iteration.
    for (name, total, chunk) in [
        ("stream_1MiB", BIG_BYTES, 1024 * 1024),
        ("stream_1KiB", SMALL_BYTES, 1024),
    ] {
        group.throughput(Throughput::Bytes(total));
        let dir = tmp.path().join(format!("{name}-raw"));
        let out = tmp.path().join(format!("{name}-raw-copy"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::create_dir_all(&out).expect("dir");
        group.bench_function(format!("{name}/raw"), |b| {
            b.iter_custom(|iters| {
                let transfer = |seg: &str| {
                    let started = Instant::now();
                    raw_transfer(&dir.join(seg), &out.join(seg), total);
                    started.elapsed()
                };
                let cleanup = |seg: &str| std::fs::remove_file(out.join(seg)).expect("remove");
                stream_iterations(iters, &src, &dir, total, transfer, cleanup)
            })
        });
        for engine in ["uring", "fallback"] {
            let dir = tmp.path().join(format!("{name}-{engine}"));
            let copy_dir = tmp.path().join(format!("{name}-{engine}-copy"));
            std::fs::create_dir_all(&dir).expect("dir");
            let l = leader(&dir, engine);
            let mut child: Child = follower(&l, &copy_dir, &secret_file, engine, false)
                .spawn()
                .expect("follower");
            assert!(l.wait_for(0, Durability::Written, 1, Duration::from_secs(30)));
            let row = format!("{name}/{engine}");
            let mut pairs = Pairs::new(row.clone());
            group.bench_function(row, |b| {
                b.iter_custom(|iters| {
                    let transfer = |seg: &str| {
                        let raw = || {
                            let copy = out.join(seg);
                            let took = timed(|| raw_transfer(&dir.join(seg), &copy, total));
                            std::fs::remove_file(copy).expect("remove");
                            took
                        };
                        pairs.run(raw, || stream(&l, seg, 0, total, chunk))
                    };
                    // The follower removes its copy, and acks that, before the next segment.
                    let cleanup = |seg: &str| {
                        let position = l.delete_file(seg).expect("delete");
                        assert!(
                            l.wait_for(position, Durability::Written, 1, Duration::from_secs(30)),
                            "the follower did not ack the delete"
                        );
                        assert!(!copy_dir.join(seg).exists(), "acked but not deleted");
                    };
                    stream_iterations(iters, &src, &dir, total, transfer, cleanup)
                })
            });
            pairs.report();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    group.finish();
}

criterion_group!(streaming, benches);
criterion_main!(streaming);
