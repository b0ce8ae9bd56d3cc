//! The faults a run injects on a timer: followers killed and restarted, stopped with SIGSTOP,
//! started late with a full sync to do, and the same sync copied without ferry (`--raw-join`).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::leader_view::LeaderView;
use crate::procs::Proc;
use crate::report::{FaultKind, FaultSpan};
use crate::{raw, Shared, CONVERGE_TIMEOUT};
use ferry::frame::Durability;

/// What to inject, and when (from the start of the run).
pub struct Faults {
    pub kill_every: Option<Duration>,
    pub stall: Option<Duration>,
    pub stall_at: Duration,
    /// When the late follower starts, and how.
    pub join: Option<(Duration, FollowerSpec)>,
    /// When the raw copy starts (`--raw-join`), and what it copies.
    pub raw_join: Option<(Duration, RawJoin)>,
    /// What the times in the fault log count from.
    pub run_started: Instant,
    /// The leader's position when the late joiner started, from which appends wait for it
    /// too (see the confirmer); `u64::MAX` until then.
    pub joined_at: Arc<CacheLine<AtomicU64>>,
}

/// A value alone on its cache line (128 bytes: two lines, as adjacent-line prefetch pairs them).
#[repr(align(128))]
pub struct CacheLine<T>(pub T);

/// A follower process to start: name, data dir, `ferry` arguments.
type FollowerSpec = (String, PathBuf, Vec<OsString>);

/// `--raw-join`'s copy: the preloaded files (relative to `dir`, with their lengths), and where
/// the receiver writes.
pub struct RawJoin {
    pub files: Vec<(String, u64)>,
    pub dir: PathBuf,
    pub recv_root: PathBuf,
    pub tcp_congestion: Option<String>,
}

/// Writes `mib` MiB into 64 MiB files under `dir/preload/` for a joining follower's full sync;
/// returns them as the leader registers them.
pub fn preload(
    dir: &std::path::Path,
    mib: u64,
) -> anyhow::Result<Vec<(ferry::paths::RelPath, u64)>> {
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
pub fn inject_faults(
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
