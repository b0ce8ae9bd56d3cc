//! End-to-end replication over loopback, measured against the machine's raw limit in the same
//! run: a plain file -> socket -> file transfer with splice(2) on both sides and no protocol.
//!
//! - `stream_1MiB` / `stream_1KiB`: an embedded leader told about 1 MiB (or 1 KiB) appends of an
//!   already-written 256 MiB (64 MiB) file, one `ferry follow --durability written` process; the
//!   time from the first append to the follower's ack of the last.
//! - `initial_sync_256MiB`: `ferry follow --once --durability written` into an empty dir.
//! - `raw_splice_256MiB`: the baseline.
//!
//! Each for both I/O engines. `cargo bench --bench streaming`; compare the `thrpt` lines.

use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::auth::Secret;
use ferry::frame::Durability;
use ferry::leader::{Leader, LeaderConfig};

const BIG_BYTES: u64 = 256 * 1024 * 1024;
const SMALL_BYTES: u64 = 64 * 1024 * 1024;
const PIPE_BYTES: usize = 1024 * 1024;
const SECRET: &str = "bench-secret";

fn write_file(path: &Path, len: u64) {
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7) as u8).collect();
    let mut f = File::create(path).expect("create the data file");
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        io::Write::write_all(&mut f, &chunk[..n]).expect("write the data file");
        left -= n as u64;
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two ints of a valid array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded; both fds are new and owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int) };
    (r, w)
}

fn splice(
    fd_in: RawFd,
    off_in: Option<&mut i64>,
    fd_out: RawFd,
    off_out: Option<&mut i64>,
    len: usize,
) -> usize {
    let p_in = off_in.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    let p_out = off_out.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    // SAFETY: open fds; offsets are null or point to live i64s for the call.
    let n = unsafe { libc::splice(fd_in, p_in, fd_out, p_out, len, libc::SPLICE_F_MOVE) };
    assert!(n >= 0, "splice: {}", io::Error::last_os_error());
    n as usize
}

/// The baseline: `src` -> loopback TCP -> `dst`, splice on both sides, no protocol.
fn raw_transfer(src: &Path, dst: &Path, len: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        let out = File::create(&dst).expect("create dst");
        let (r, w) = pipe();
        let mut off = 0i64;
        while (off as u64) < len {
            let n = splice(sock.as_raw_fd(), None, w.as_raw_fd(), None, PIPE_BYTES);
            assert!(n > 0, "sender closed early");
            let mut left = n;
            while left > 0 {
                left -= splice(r.as_raw_fd(), None, out.as_raw_fd(), Some(&mut off), left);
            }
        }
    });
    let sock = TcpStream::connect(addr).expect("connect");
    let file = File::open(src).expect("open src");
    let (r, w) = pipe();
    let mut off = 0i64;
    while (off as u64) < len {
        let want = ((len - off as u64) as usize).min(PIPE_BYTES);
        let n = splice(file.as_raw_fd(), Some(&mut off), w.as_raw_fd(), None, want);
        let mut left = n;
        while left > 0 {
            left -= splice(r.as_raw_fd(), None, sock.as_raw_fd(), None, left);
        }
    }
    drop(sock);
    receiver.join().expect("receiver");
}

/// The first `len` bytes of `src` into a new file `dst` (page cache to page cache).
fn copy_prefix(src: &Path, dst: &Path, len: u64) {
    let from = File::open(src).expect("src");
    let to = File::create(dst).expect("dst");
    let (r, w) = pipe();
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as u64) < len {
        let want = PIPE_BYTES.min((len - off_in as u64) as usize);
        let mut left = splice(
            from.as_raw_fd(),
            Some(&mut off_in),
            w.as_raw_fd(),
            None,
            want,
        );
        while left > 0 {
            left -= splice(
                r.as_raw_fd(),
                None,
                to.as_raw_fd(),
                Some(&mut off_out),
                left,
            );
        }
    }
}

fn leader(dir: &Path, engine: &str) -> Leader {
    let secret = Secret::new(SECRET.as_bytes().to_vec()).expect("secret");
    let mut config = LeaderConfig::new(dir, "127.0.0.1:0".parse().expect("addr"), secret);
    config.engine = Some(engine.parse().expect("engine"));
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

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let secret_file = tmp.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("secret file");
    let src = tmp.path().join("src.bin");
    write_file(&src, BIG_BYTES);

    let mut group = c.benchmark_group("loopback");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(BIG_BYTES));
    // Into a new file each time, like a follower's sync (the old one is removed untimed).
    let raw_out = tmp.path().join("raw.out");
    group.bench_function("raw_splice_256MiB", |b| {
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
        let l = leader(&sync_dir, engine);
        l.register_file("seg", BIG_BYTES).expect("register");
        group.throughput(Throughput::Bytes(BIG_BYTES));
        group.bench_function(format!("initial_sync_256MiB/{engine}"), |b| {
            let dst = tmp.path().join(format!("sync-copy-{engine}"));
            b.iter_batched(
                || {
                    let _ = std::fs::remove_dir_all(&dst);
                },
                |()| {
                    let status = follower(&l, &dst, &secret_file, engine, true)
                        .status()
                        .expect("follow");
                    assert!(status.success());
                },
                criterion::BatchSize::PerIteration,
            )
        });
        drop(l);

        // Streaming appends of bytes already in the file.
        for (name, total, chunk) in [
            ("stream_1MiB", BIG_BYTES, 1024 * 1024),
            ("stream_1KiB", SMALL_BYTES, 1024),
        ] {
            let dir = tmp.path().join(format!("{name}-{engine}"));
            std::fs::create_dir_all(&dir).expect("dir");
            let l = leader(&dir, engine);
            let mut child: Child = follower(
                &l,
                &tmp.path().join(format!("{name}-{engine}-copy")),
                &secret_file,
                engine,
                false,
            )
            .spawn()
            .expect("follower");
            assert!(l.wait_for(0, Durability::Written, 1, Duration::from_secs(30)));
            // Each iteration streams a fresh segment, deleted afterwards to bound disk use.
            // Untimed, as the baseline's are: the copy is written back before the clock
            // starts (the baseline's source is clean too), and the follower has removed the
            // previous copy (the baseline removes its output before each transfer).
            let copy_dir = tmp.path().join(format!("{name}-{engine}-copy"));
            let mut n = 0u64;
            group.throughput(Throughput::Bytes(total));
            group.bench_function(format!("{name}/{engine}"), |b| {
                b.iter_custom(|iters| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        n += 1;
                        let seg = format!("seg{n}");
                        copy_prefix(&src, &dir.join(&seg), total);
                        File::open(dir.join(&seg))
                            .and_then(|f| f.sync_data())
                            .expect("sync the segment");
                        elapsed += stream(&l, &seg, 0, total, chunk);
                        std::fs::remove_file(dir.join(&seg)).expect("remove");
                        let position = l.delete_file(&seg).expect("delete");
                        assert!(
                            l.wait_for(position, Durability::Written, 1, Duration::from_secs(30)),
                            "the follower did not ack the delete"
                        );
                        assert!(!copy_dir.join(&seg).exists(), "acked but not deleted");
                    }
                    elapsed
                })
            });
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    group.finish();
}

criterion_group!(streaming, benches);
criterion_main!(streaming);
