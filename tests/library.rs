//! The leader embedded as a library, the way a broker uses it, with real `ferry follow`
//! processes: appends of bytes already in the file, publish confirms with `wait_for`, the
//! per-follower lag report, and a stopped follower that must not hold anyone back.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ferry::auth::Secret;
use ferry::frame::Durability;
use ferry::lag::FollowerState;
use ferry::leader::{Leader, LeaderConfig, Settle};
use ferry::paths::RelPath;

/// The leaders' ack timeout here: a follower is lagging once something waited longer.
const ACK_TIMEOUT_MS: u64 = 300;

fn start(dir: &Path, engine: &str) -> Leader {
    Leader::start(config(dir, engine), Vec::new()).unwrap()
}

fn config(dir: &Path, engine: &str) -> LeaderConfig {
    let secret = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let mut config = LeaderConfig::new(dir, "127.0.0.1:0".parse().unwrap(), secret);
    config.engine = Some(engine.parse().unwrap());
    config.ack_timeout = Duration::from_millis(ACK_TIMEOUT_MS);
    config
}

/// Writes `count` messages into a segment the way a broker does (bytes first, then `append`).
fn publish(leader: &Leader, dir: &Path, segment: &str, offset: &mut u64, count: usize) -> u64 {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(segment))
        .unwrap();
    let mut position = 0;
    for i in 0..count {
        let message = pattern(1024, i as u8);
        file.write_all_at(&message, *offset).unwrap();
        position = leader.append(segment, *offset, 1024).unwrap();
        *offset += 1024;
    }
    position
}

/// Asserts that a follower acks `position` at `written` within 20 s.
#[track_caller]
fn acked_written(leader: &Leader, position: u64) {
    assert!(
        leader.wait_for(position, Durability::Written, 1, Duration::from_secs(20)),
        "position {position} not acked at written within 20 s"
    );
}

/// A leader on `engine` with one follower at `written` that has acked the first `count`
/// messages of `seg.0`. Returns both, the leader's dir and the offset after those messages.
fn with_a_follower_in_sync(env: &Env, engine: &str, count: usize) -> (Leader, Proc, PathBuf, u64) {
    with_a_follower_in_sync_of(env, engine, count, |_| {})
}

/// `with_a_follower_in_sync`, the leader's config changed by `configure` first.
fn with_a_follower_in_sync_of(
    env: &Env,
    engine: &str,
    count: usize,
    configure: impl FnOnce(&mut LeaderConfig),
) -> (Leader, Proc, PathBuf, u64) {
    let ld = env.dir("leader");
    let mut config = config(&ld, engine);
    configure(&mut config);
    let leader = Leader::start(config, Vec::new()).unwrap();
    let follower = start_follower(env, &env.dir("f"), leader.local_addr(), engine, "written");
    let mut offset = 0;
    let position = publish(&leader, &ld, "seg.0", &mut offset, count);
    acked_written(&leader, position);
    (leader, follower, ld, offset)
}

fn wait_state(leader: &Leader, id: u64, state: FollowerState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = leader.followers().into_iter().find(|f| f.id == id);
        if f.as_ref().is_some_and(|f| f.lag.state == state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "follower #{id} never became {state:?}: {f:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn appends_are_confirmed_with_wait_for_and_followers_report_their_lag() {
    for engine in ENGINES {
        let env = Env::new();
        let ld = env.dir("leader");
        let leader = start(&ld, engine);
        let _f1 = start_follower(&env, &env.dir("f1"), leader.local_addr(), engine, "synced");
        let _f2 = start_follower(&env, &env.dir("f2"), leader.local_addr(), engine, "written");
        let mut offset = 0;
        let position = publish(&leader, &ld, "seg.0", &mut offset, 500);
        assert!(
            leader.wait_for(position, Durability::Written, 2, Duration::from_secs(20)),
            "{engine}: both followers hold the bytes in their page cache"
        );
        assert!(leader.wait_for(position, Durability::Synced, 1, Duration::from_secs(20)));
        std::fs::write(ld.join("meta.json"), b"{\"segments\":1}").unwrap();
        let position = leader.replace_file("meta.json").unwrap();
        assert!(leader.wait_for(position, Durability::Written, 2, Duration::from_secs(20)));
        let followers = leader.followers();
        assert_eq!(followers.len(), 2);
        for f in &followers {
            assert_eq!(f.lag.lag_bytes[Durability::Written.index()], 0, "{f:?}");
            assert!(f.payload_bytes_sent >= 500 * 1024);
        }
        wait_identical(&ld, &env.tmp.path().join("f1"), Duration::from_secs(10));
        wait_identical(&ld, &env.tmp.path().join("f2"), Duration::from_secs(10));
        assert!(leader.acked_position(Durability::Written, 2) >= position);
        // Three followers were asked for; two are connected.
        assert!(!leader.wait_for(0, Durability::Received, 3, Duration::from_millis(100)));
        // Nobody has acked a position that does not exist yet.
        assert!(!leader.wait_for(
            position + 1,
            Durability::Received,
            1,
            Duration::from_millis(200)
        ));
    }
}

#[test]
fn a_stopped_follower_is_marked_lagging_and_holds_back_neither_writer_nor_others() {
    let env = Env::new();
    let ld = env.dir("leader");
    let leader = start(&ld, "uring");
    let stalled = start_follower(
        &env,
        &env.dir("stalled"),
        leader.local_addr(),
        "uring",
        "synced",
    );
    // Known by its id: the only follower until the second one starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stalled_id = loop {
        if let Some(f) = leader.followers().first() {
            break f.id;
        }
        assert!(
            Instant::now() < deadline,
            "the first follower never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _healthy = start_follower(
        &env,
        &env.dir("healthy"),
        leader.local_addr(),
        "uring",
        "synced",
    );
    let mut offset = 0;
    let position = publish(&leader, &ld, "seg.0", &mut offset, 10);
    assert!(leader.wait_for(position, Durability::Synced, 2, Duration::from_secs(20)));

    // SIGSTOP the first follower: it stops reading, acking, everything.
    stop_process(&stalled.child);
    // The writer keeps going (about 40 MiB, far beyond any socket buffer) ...
    let position = publish(&leader, &ld, "seg.0", &mut offset, 40_000);
    // ... and the healthy follower confirms all of it while the other is stopped.
    assert!(leader.wait_for(position, Durability::Synced, 1, Duration::from_secs(30)));
    wait_state(&leader, stalled_id, FollowerState::Lagging);
    let lagging = leader
        .followers()
        .into_iter()
        .find(|f| f.id == stalled_id)
        .unwrap();
    assert!(lagging.lag.lag_bytes[Durability::Synced.index()] > 0);
    // Lagging means something has waited beyond the ack timeout: the lag in time says so.
    assert!(
        lagging.lag.lag_ms > ACK_TIMEOUT_MS,
        "lag_ms {}",
        lagging.lag.lag_ms
    );

    // Resumed, it catches up from the files: nothing was queued in memory for it.
    signal(&stalled.child, libc::SIGCONT);
    assert!(leader.wait_for(position, Durability::Synced, 2, Duration::from_secs(30)));
    wait_state(&leader, stalled_id, FollowerState::Streaming);
    wait_identical(
        &ld,
        &env.tmp.path().join("stalled"),
        Duration::from_secs(10),
    );
}

/// A follower stopped for longer than `LEADER_SILENCE_TIMEOUT_MS` (SIGSTOP, a paused VM) finds
/// the leader's frames waiting in its socket when it resumes: the leader was not silent, so it
/// carries on over the same connection instead of dropping it and syncing again.
#[test]
fn a_follower_stopped_longer_than_the_silence_timeout_keeps_its_connection() {
    for engine in ENGINES {
        let env = Env::new();
        let (leader, follower, ld, mut offset) = with_a_follower_in_sync(&env, engine, 10);
        let id = leader.followers()[0].id;

        stop_process(&follower.child);
        publish(&leader, &ld, "seg.0", &mut offset, 100);
        // Stopped beyond the timeout: on resume, the follower's timer has run out.
        std::thread::sleep(Duration::from_millis(
            ferry::frame::LEADER_SILENCE_TIMEOUT_MS + 1500,
        ));
        signal(&follower.child, libc::SIGCONT);

        let position = publish(&leader, &ld, "seg.0", &mut offset, 10);
        acked_written(&leader, position);
        let ids: Vec<u64> = leader.followers().iter().map(|f| f.id).collect();
        assert_eq!(
            ids,
            vec![id],
            "{engine}: the follower reconnected; its log:\n{}",
            follower.log_text()
        );
        wait_identical(&ld, &env.tmp.path().join("f"), Duration::from_secs(10));
    }
}

/// A broker's data dir moved away while its embedded leader serves it (`mv DIR DIR.old` and a
/// new DIR made, as a reset may do; or a disk mounted over it): the leader would go on reading
/// the old directory while the broker writes into the new one, and its followers would never
/// get a file of it. It stops serving within seconds, saying why (`Leader::failure`), so publish
/// confirms fail at once rather than at their timeouts; the follower keeps every file it had.
#[test]
fn an_embedded_leader_whose_data_dir_is_moved_away_stops_serving_and_says_why() {
    for engine in ENGINES {
        let env = Env::new();
        let (leader, follower, ld, offset) = with_a_follower_in_sync(&env, engine, 10);
        assert_eq!(leader.failure(), None);
        let old = env.tmp.path().join("leader.old");
        std::fs::rename(&ld, &old).unwrap();
        std::fs::create_dir(&ld).unwrap();
        let position = publish(&leader, &ld, "seg.1", &mut 0, 1);
        wait_until(
            Duration::from_secs(20),
            "the leader stopped serving",
            || leader.is_stopped(),
        );
        let why = leader.failure().unwrap_or_default();
        let cause = format!(
            "{} is no longer the directory ferry started on",
            ld.display()
        );
        assert!(why.contains(&cause), "{engine}: {why:?}");
        // The broker's next write is refused, for the same reason: it reaches no follower.
        let refused = leader
            .append("seg.1", 1024, 1024)
            .map_err(|e| e.to_string());
        assert!(
            refused.as_ref().is_err_and(|e| e.contains(&cause)),
            "{engine}: {refused:?}"
        );
        let asked = Instant::now();
        assert!(!leader.wait_for(position, Durability::Written, 1, Duration::from_secs(10)));
        assert!(asked.elapsed() < Duration::from_secs(1), "{engine}");
        drop(follower);
        let copy = std::fs::read(env.tmp.path().join("f/seg.0")).unwrap();
        assert_eq!(copy, std::fs::read(old.join("seg.0")).unwrap(), "{engine}");
        assert_eq!(copy.len() as u64, offset, "{engine}");
    }
}

/// Once stopped, a leader refuses the broker's changes and says so, rather than taking them
/// and shipping them to no one: a broker still writing (a node that lost its leadership before
/// its embedder heard) learns from its next `append` that the write is not replicated.
#[test]
fn a_stopped_leader_refuses_changes_and_says_why() {
    let env = Env::new();
    let (leader, _follower, ld, offset) = with_a_follower_in_sync(&env, "fallback", 2);
    write(&ld.join("meta.json"), b"{}");
    leader.stop_serving();
    let refusals = [
        leader.append("seg.0", offset, 1024),
        leader.replace_file("meta.json"),
        leader.register_file("meta.json", 2),
        // Known at that length already: nothing would change, and still it is said.
        leader.register_file("seg.0", offset),
        leader.replace_file("gone.json"),
        leader.delete_file("seg.0"),
    ];
    for refused in refusals.map(|r| r.map_err(|e| e.to_string())) {
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("it was stopped")),
            "{refused:?}"
        );
    }
}

/// A length reported wrong (a broker's bug: a negative number cast, an offset added twice) is
/// refused with an error naming the limit, and the position does not move: a position that
/// wrapped past 2^64 would fall below what followers acked, and `wait_for` would confirm
/// bytes no follower has.
#[test]
fn a_change_of_an_impossible_length_is_refused_and_the_position_stays() {
    use ferry::frame::MAX_POSITION;
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("seg"), &pattern(1000, 1));
    // The files a leader starts with are held to the same limits.
    for files in [
        vec![(RelPath::new("seg").unwrap(), u64::MAX)],
        vec![
            (RelPath::new("seg").unwrap(), MAX_POSITION),
            (RelPath::new("other").unwrap(), 1),
        ],
    ] {
        let refused = Leader::start(config(&ld, "fallback"), files).map(|_| ());
        let refused = refused.map_err(|e| (e.kind(), e.to_string()));
        assert!(
            refused.as_ref().is_err_and(|(kind, e)| {
                *kind == std::io::ErrorKind::InvalidInput
                    && (e.contains("largest file") || e.contains("MAX_POSITION"))
            }),
            "{refused:?}"
        );
    }
    let leader = start(&ld, "fallback");
    leader.append("seg", 0, 1000).unwrap();
    let before = leader.position();
    let refused = |r: Result<u64, ferry::leader::ChangeError>| r.map_err(|e| e.to_string());
    // Ends above the largest file Linux allows.
    for r in [
        leader.append("seg", 1000, u64::MAX),
        leader.append("seg", MAX_POSITION, 1),
        leader.register_file("new", MAX_POSITION + 1),
    ] {
        let r = refused(r);
        assert!(
            r.as_ref().is_err_and(|e| e.contains("largest file")),
            "{r:?}"
        );
    }
    assert_eq!(leader.position(), before);
    // Within a file's size each, but past MAX_POSITION together.
    leader.append("seg", 0, MAX_POSITION - before).unwrap();
    assert_eq!(leader.position(), MAX_POSITION);
    for r in [
        leader.append("seg", 1000, 1),
        leader.register_file("other", 1),
        leader.delete_file("seg"),
    ] {
        let r = refused(r);
        assert!(
            r.as_ref().is_err_and(|e| e.contains("MAX_POSITION")),
            "{r:?}"
        );
    }
    assert_eq!(leader.position(), MAX_POSITION);
}

/// A lone small append (a broker's one message in a quiet moment) is shipped at once: the
/// leader holds a payload back only while something else is about to follow it in the same
/// segment, never until the next keepalive.
#[test]
fn a_lone_small_append_is_acked_without_waiting_for_the_keepalive() {
    for engine in ENGINES {
        let env = Env::new();
        let (leader, _f, ld, mut offset) = with_a_follower_in_sync(&env, engine, 1);
        let mut latencies_ms = Vec::new();
        for _ in 0..15 {
            // A quiet moment: nothing else follows this append for a while.
            std::thread::sleep(Duration::from_millis(
                ferry::frame::KEEPALIVE_INTERVAL_MS / 5,
            ));
            let started = Instant::now();
            let position = publish(&leader, &ld, "seg.0", &mut offset, 1);
            acked_written(&leader, position);
            latencies_ms.push(started.elapsed().as_millis());
        }
        latencies_ms.sort();
        let median_ms = latencies_ms[latencies_ms.len() / 2];
        // Shipped at once this takes about a millisecond; held back for the keepalive MARK,
        // it would take 250 ms on average.
        assert!(
            (median_ms as u64) < ferry::frame::KEEPALIVE_INTERVAL_MS / 5,
            "{engine}: acks of lone appends took {latencies_ms:?} ms"
        );
    }
}

/// A broker that truncates a segment and never says so (no `replace_file`), then reports an
/// append of bytes the file no longer has, holds the acks only for a while: no ack may claim
/// bytes the follower never got, but after `VANISHED_HOLD_TIMEOUT_MS` the leader records the
/// file as it is on disk, ships it, and acks flow again with the follower's copy identical.
#[test]
fn an_unreported_truncation_holds_acks_only_until_the_leader_records_it_itself() {
    use ferry::frame::VANISHED_HOLD_TIMEOUT_MS;
    for engine in ENGINES {
        let env = Env::new();
        let (leader, _f, ld, offset) = with_a_follower_in_sync(&env, engine, 10);
        // Two more messages written, the segment cut back to 4 of them behind the leader's
        // back, and the stale append reported.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(ld.join("seg.0"))
            .unwrap();
        file.write_all_at(&pattern(2048, 10), offset).unwrap();
        file.set_len(4 * 1024).unwrap();
        let stale = leader.append("seg.0", offset, 2048).unwrap();
        let started = Instant::now();
        assert!(
            !leader.wait_for(stale, Durability::Received, 1, Duration::from_millis(500)),
            "{engine}: acked bytes the follower cannot have got"
        );
        let mut offset = 4 * 1024;
        let position = publish(&leader, &ld, "seg.0", &mut offset, 1);
        assert!(
            leader.wait_for(
                position,
                Durability::Written,
                1,
                Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS + 15_000)
            ),
            "{engine}: acks still held {:?} after the bytes vanished",
            started.elapsed()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(VANISHED_HOLD_TIMEOUT_MS),
            "{engine}: acks resumed after {:?}, before the broker had its chance to report",
            started.elapsed()
        );
        wait_identical(&ld, &env.tmp.path().join("f"), Duration::from_secs(10));
    }
}

/// The files of `dir` that this process holds open although they were deleted: their disk
/// space (and page cache) cannot be reclaimed while an fd keeps them.
fn deleted_but_open(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|t| t.starts_with(&prefix) && t.ends_with(" (deleted)"))
        .collect()
}

/// A broker's retention deletes old segments and rewrites small files by renaming over them;
/// the disk space must come back at once, not when the leader happens to close the file.
#[test]
fn a_deleted_segment_or_a_replaced_file_is_not_held_open_by_the_leader() {
    for engine in ENGINES {
        let env = Env::new();
        let ld = env.dir("leader");
        let leader = start(&ld, engine);
        let _f = start_follower(&env, &env.dir("f"), leader.local_addr(), engine, "written");
        let mut offsets = [0u64; 3];
        for (i, offset) in offsets.iter_mut().enumerate() {
            let position = publish(&leader, &ld, &format!("seg.{i}"), offset, 100);
            acked_written(&leader, position);
        }
        for generation in 0..3 {
            std::fs::write(
                ld.join("meta.tmp"),
                format!("{{\"generation\":{generation}}}"),
            )
            .unwrap();
            std::fs::rename(ld.join("meta.tmp"), ld.join("meta.json")).unwrap();
            let position = leader.replace_file("meta.json").unwrap();
            acked_written(&leader, position);
        }
        // Retention: the two oldest segments go.
        for segment in ["seg.0", "seg.1"] {
            std::fs::remove_file(ld.join(segment)).unwrap();
            let position = leader.delete_file(segment).unwrap();
            acked_written(&leader, position);
        }
        // Once the follower acked the deletes, the leader holds none of the old files.
        assert_eq!(
            deleted_but_open(&ld),
            Vec::<String>::new(),
            "{engine}: deleted files still open in the leader"
        );
        // And it still ships what remains.
        let position = publish(&leader, &ld, "seg.2", &mut offsets[2], 10);
        acked_written(&leader, position);
        wait_identical(&ld, &env.tmp.path().join("f"), Duration::from_secs(10));
    }
}

/// write(2)-family system calls this thread has made (`syscw` in `/proc/thread-self/io`):
/// waking another thread through an eventfd is one.
fn write_syscalls_of_this_thread() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .map(|n| n.trim().parse().unwrap())
        .unwrap()
}

#[test]
fn appends_while_a_follower_keeps_up_make_no_system_call_on_the_writers_thread() {
    // 100,000 appends of 1 KiB per second, for 0.2 s.
    const APPENDS: u64 = 20_000;
    const APPEND_INTERVAL: Duration = Duration::from_micros(10);
    for engine in ENGINES {
        let env = Env::new();
        let ld = env.dir("leader");
        let leader = start(&ld, engine);
        let fd = env.dir("f1");
        let _f = start_follower(&env, &fd, leader.local_addr(), engine, "written");
        write(
            &ld.join("seg.0"),
            &pattern(((APPENDS + 1) * 1024) as usize, 7),
        );
        let first = leader.append("seg.0", 0, 1024).unwrap();
        acked_written(&leader, first);

        let before = write_syscalls_of_this_thread();
        let started = Instant::now();
        let mut position = first;
        for i in 1..=APPENDS {
            while started.elapsed() < APPEND_INTERVAL * (i as u32) {
                std::hint::spin_loop();
            }
            position = leader.append("seg.0", i * 1024, 1024).unwrap();
        }
        let syscalls = write_syscalls_of_this_thread() - before;
        acked_written(&leader, position);
        wait_identical(&ld, &fd, Duration::from_secs(10));
        // Waking the follower's connection for every batch it ships would be one per batch:
        // thousands here. A few are allowed, for when this thread was descheduled long enough
        // for the connection to go to sleep.
        assert!(
            syscalls < APPENDS / 200,
            "{engine}: {syscalls} system calls on the writer's thread for {APPENDS} appends"
        );
    }
}

/// The congestion control asked for (`LeaderConfig::tcp_congestion`) is what every follower's
/// connection sends with, on both engines, whatever the system's default: found here among
/// this process's own sockets, as the one whose peer is the test's client.
#[test]
fn connections_to_followers_use_the_congestion_control_asked_for() {
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    // reno is built into every kernel; cubic is the usual default where it is not.
    let asked = if default.trim() == "reno" {
        "cubic"
    } else {
        "reno"
    };
    for engine in ["uring", "fallback"] {
        let tmp = tempfile::tempdir().unwrap();
        let secret = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
        let mut config = LeaderConfig::new(tmp.path(), "127.0.0.1:0".parse().unwrap(), secret);
        config.engine = Some(engine.parse().unwrap());
        config.tcp_congestion = Some(asked.to_string());
        let leader = Leader::start(config, Vec::new()).unwrap();
        let client = std::net::TcpStream::connect(leader.local_addr()).unwrap();
        let me = client.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            if let Some(cc) = congestion_of_socket_with_peer(me) {
                break cc;
            }
            assert!(
                Instant::now() < deadline,
                "{engine}: no accepted socket for {me}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found, asked, "{engine}");
    }
}

/// TCP_CONGESTION of this process's socket whose peer is `peer`, if it has one.
fn congestion_of_socket_with_peer(peer: std::net::SocketAddr) -> Option<String> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    for entry in std::fs::read_dir("/proc/self/fd").ok()? {
        let Ok(fd) = entry.ok()?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the fd is open in this process while we look (a race with a close only makes
        // the calls below fail); it is borrowed, not owned, so nothing closes it.
        let sock = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(stream) = sock.try_clone_to_owned().map(std::net::TcpStream::from) else {
            continue;
        };
        if stream.peer_addr().ok() != Some(peer) {
            continue;
        }
        let mut name = [0u8; 16];
        let mut len = name.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `name`, which outlives the call.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                name.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r != 0 {
            continue;
        }
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        return Some(String::from_utf8_lossy(&name[..end]).into_owned());
    }
    None
}

/// A broker that shuts its embedded leader down (`Leader::shutdown`) right after writing and
/// starts it again with no file list resumes the leader's instance: the files it replicated are
/// in the new catalog as they were, positions go on above the old ones, and a follower that
/// held everything hashes nothing; a segment written after the restart ships as a tail.
#[test]
fn a_broker_restarting_its_leader_resumes_the_instance_and_its_positions() {
    for engine in ENGINES {
        let env = Env::new();
        let (leader, follower, ld, mut offset) = with_a_follower_in_sync(&env, engine, 100);
        let last = leader.position();
        let fd = env.dir("f");
        wait_until(
            Duration::from_secs(10),
            "the follower's held record notes the segment",
            || held_len(&fd, "seg.0") == Some(offset),
        );
        drop(follower);
        leader.shutdown();

        let leader = start(&ld, engine);
        assert!(
            leader.position() > last,
            "{engine}: {} after {last}",
            leader.position()
        );
        let follower = start_follower(&env, &fd, leader.local_addr(), engine, "written");
        let line = follower.wait_log("inventory: ", Duration::from_secs(10));
        assert!(
            line.contains("1 files, 1 held as this dir recorded them, 0 bytes"),
            "{engine}: {line}"
        );
        let position = publish(&leader, &ld, "seg.0", &mut offset, 10);
        acked_written(&leader, position);
        assert_eq!(checksum(&ld), checksum(&fd), "{engine}");
        let sent: u64 = leader
            .followers()
            .iter()
            .map(|f| f.payload_bytes_sent)
            .sum();
        assert_eq!(sent, 10 * 1024, "{engine}: only the new messages travel");
    }
}

/// A broker's segment preallocated past what it reported, its leader stopped, its follower led
/// by hand (`ferry lead` on the copy) and the broker's dir following that: the dir's own record
/// vouches for the segment as its catalog had it (`docs/PROTOCOL.md`, *After a failover*), so
/// the dir cuts its segment to the reported length and holds it, hashing nothing, where it
/// hashed the reported prefix on both sides (and the new leader then cut it).
#[test]
fn a_dead_leaders_dir_following_cuts_its_preallocated_segment_and_holds_it() {
    let engine = ENGINES[0];
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("f"));
    let leader = start(&ld, engine);
    let follower = start_follower(&env, &fd, leader.local_addr(), engine, "written");
    std::fs::File::create(ld.join("seg.0"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut offset = 0;
    let position = publish(&leader, &ld, "seg.0", &mut offset, 100);
    acked_written(&leader, position);
    // Settled by the stop's record: a file changed in the second before it is not vouched for.
    wait_settled(&ld);
    leader.shutdown();

    let (new_leader, _) = lead_by_hand(&env, &fd, engine, follower);
    let out = follow_once_ok(&env, &ld, new_leader.addr, engine);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(
            "inventory: 1 files, 1 held as this dir recorded them (1 by its own record as leader), \
             0 bytes hashed"
        ),
        "{log}"
    );
    assert_eq!(std::fs::metadata(ld.join("seg.0")).unwrap().len(), offset);
    assert_eq!(checksum(&ld), checksum(&fd));
}

/// The position the leader's record in `dir` names, if there is one.
fn record_position(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(".ferry/leader")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("position "))
        .and_then(|n| n.parse().ok())
}

/// A serving leader rewrites its record every `record_interval`, reserving positions 2^40
/// above its own. A checkpoint that cannot be written deletes the record (it would promise
/// less than the MARKs sent from then on), and acks go on; once it can, the record is back.
#[test]
fn a_checkpoint_that_cannot_be_written_deletes_the_record_and_acks_go_on() {
    let env = Env::new();
    let (leader, _follower, ld, mut offset) =
        with_a_follower_in_sync_of(&env, "fallback", 10, |c| {
            c.record_interval = Duration::from_millis(50);
        });
    let position = leader.position();
    wait_until(
        Duration::from_secs(10),
        "a checkpoint reserving positions above the leader's",
        || record_position(&ld).is_some_and(|p| p >= position + (1 << 40)),
    );

    // The record is written to leader.tmp and renamed: a directory there makes that fail.
    std::fs::create_dir(ld.join(".ferry/leader.tmp")).unwrap();
    wait_until(Duration::from_secs(10), "the record deleted", || {
        !ld.join(".ferry/leader").exists()
    });
    let position = publish(&leader, &ld, "seg.0", &mut offset, 10);
    acked_written(&leader, position);

    std::fs::remove_dir(ld.join(".ferry/leader.tmp")).unwrap();
    wait_until(Duration::from_secs(10), "the record written again", || {
        record_position(&ld).is_some_and(|p| p >= position + (1 << 40))
    });
}

/// Connections that have not authenticated (a port scanner, a health check, a peer that sent
/// only a preamble) are nobody's follower: they are not listed, while a real follower beside
/// them is listed and acks. (That the writers' changes are not queued for them is not visible
/// here: `tools/idle-cost.sh` measures what they cost, and `LeaderSession::may_authenticate`,
/// which the shell waits for, has its own unit test and fuzz check.)
#[test]
fn connections_that_have_not_authenticated_are_not_followers() {
    use std::io::Write;
    let env = Env::new();
    let ld = env.dir("leader");
    let leader = start(&ld, "fallback");
    let mut strangers: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(leader.local_addr()).unwrap())
        .collect();
    for s in &mut strangers[..10] {
        s.write_all(&ferry::frame::Preamble::ours().encode())
            .unwrap();
    }
    let mut offset = 0;
    publish(&leader, &ld, "seg.0", &mut offset, 100);
    let _follower = start_follower(
        &env,
        &env.dir("f"),
        leader.local_addr(),
        "fallback",
        "written",
    );
    let position = publish(&leader, &ld, "seg.0", &mut offset, 100);
    acked_written(&leader, position);
    // Each stranger's connection has been served since before the follower's: one that were
    // a follower would be listed by now, as it is.
    assert_eq!(leader.followers().len(), 1, "{:?}", leader.followers());
    drop(strangers);
}

/// A broker rotates the shared secret without a restart: `set_secrets` with the new one and
/// the old one as previous keeps its follower on the old one streaming and lets one with the new
/// one join; without the old one, the follower still on it is closed, told why, and the old
/// secret no longer gets in.
#[test]
fn an_embedded_leader_rotates_its_secret_and_cuts_off_a_follower_on_the_old_one() {
    use ferry::auth::Secrets;
    let env = Env::new();
    let dir = env.dir("leader");
    let leader = start(&dir, "fallback");
    let mut offset = 0;
    let position = publish(&leader, &dir, "seg", &mut offset, 4);
    let on_old = start_follower(
        &env,
        &env.dir("old"),
        leader.local_addr(),
        "fallback",
        "written",
    );
    acked_written(&leader, position);

    let old = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let new_text = "the rotated-in secret for this test";
    let new = Secret::new(new_text.as_bytes().to_vec()).unwrap();
    leader.set_secrets(Secrets {
        current: new.clone(),
        previous: Some(old),
    });
    let new_file = env.dir("keys").join("new");
    write(&new_file, new_text.as_bytes());
    let addr = leader.local_addr().to_string();
    let out = follow_once_with_secret(&env.dir("new"), &addr, &new_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The follower on the old secret still streams.
    let position = publish(&leader, &dir, "seg", &mut offset, 4);
    acked_written(&leader, position);

    leader.set_secrets(Secrets::one(new));
    let mut on_old = on_old;
    let status = exit_within(&mut on_old, Duration::from_secs(10));
    assert!(!status.success(), "{}", on_old.log_text());
    on_old.wait_log("rotated out", Duration::from_secs(5));
    let out = follow_once_with_secret(&env.dir("old-again"), &addr, &env.secret_file);
    failed_saying(&out, &["wrong secret"]);
}

/// A stop has the change source report what it holds (the flush a checkpoint calls) before it
/// looks at the files changed since the last checkpoint: a file changed right before the stop,
/// not reported yet, is looked at (once settled) and vouched for as it is, where the record
/// named it as the checkpoint had seen it, which the next start would not vouch for.
#[test]
fn a_stop_looks_at_a_file_changed_right_before_it_once_the_change_source_reports_it() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("seg"), &pattern(1000, 1));
    wait_settled(&ld);
    let mut config = config(&ld, "fallback");
    config.record_interval = Duration::from_secs(3600);
    let leader =
        Arc::new(Leader::start(config, vec![(RelPath::new("seg").unwrap(), 1000)]).unwrap());
    let checkpoints = |leader: &Leader| match leader.status() {
        ferry::status::Status::Leader { checkpoints, .. } => checkpoints,
        other => panic!("{other:?}"),
    };
    wait_until(Duration::from_secs(10), "the first record", || {
        checkpoints(&leader).writes == 1
    });

    // The change source: an application's bytes not reported yet, reported when flushed.
    let pending = Arc::new(Mutex::new(None::<u64>));
    let flushes = Arc::new(AtomicUsize::new(0));
    let source = (Arc::downgrade(&leader), pending.clone(), flushes.clone());
    leader.set_checkpoint_flush(Arc::new(move || {
        let (leader, pending, flushes) = &source;
        if let (Some(leader), Some(n)) = (leader.upgrade(), pending.lock().unwrap().take()) {
            leader.append("seg", 1000, n).unwrap();
        }
        flushes.fetch_add(1, Ordering::SeqCst);
        true
    }));
    // The checkpoint it asks for finds nothing to write; none follows within the interval.
    wait_until(Duration::from_secs(10), "a checkpoint's flush", || {
        flushes.load(Ordering::SeqCst) == 1
    });
    append(&ld.join("seg"), &pattern(500, 2));
    *pending.lock().unwrap() = Some(500);
    leader.stop_serving_with(|| true, Settle::Wait);
    assert_eq!(
        checkpoints(&leader).writes,
        1,
        "no checkpoint took the change"
    );

    let record = std::fs::read_to_string(ld.join(".ferry/leader")).unwrap();
    let meta = std::fs::metadata(ld.join("seg")).unwrap();
    let line = record.lines().find(|l| l.ends_with(" seg")).unwrap_or("");
    let stamp = format!(
        "1500 {} 1500 {} {} seg",
        meta.ino(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
    );
    assert!(line.ends_with(&stamp), "{line:?} in:\n{record}");
}

/// A broker that renames a segment (Kafka's `.deleted` before retention removes it) or a file
/// over another tells the leader with `rename_file`: a follower holding the file moves its copy,
/// and none of its bytes is sent again; the copies stay identical.
#[test]
fn a_renamed_file_reported_with_rename_file_is_moved_on_the_follower_not_sent_again() {
    for engine in ENGINES {
        let env = Env::new();
        let (leader, _follower, ld, _) = with_a_follower_in_sync(&env, engine, 2048);
        let sent = |leader: &Leader| leader.followers()[0].payload_bytes_sent;
        let before = sent(&leader);
        std::fs::create_dir(ld.join("old")).unwrap();
        std::fs::rename(ld.join("seg.0"), ld.join("old/seg.0.deleted")).unwrap();
        let position = leader.rename_file("seg.0", "old/seg.0.deleted").unwrap();
        acked_written(&leader, position);
        assert_eq!(sent(&leader), before, "{engine}: renamed bytes sent again");
        wait_identical(&ld, &env.tmp.path().join("f"), Duration::from_secs(10));
        // A file the leader does not know is taken as replaced: shipped whole.
        std::fs::write(ld.join("unknown.tmp"), b"{\"v\":1}").unwrap();
        std::fs::rename(ld.join("unknown.tmp"), ld.join("state.json")).unwrap();
        let position = leader.rename_file("unknown.tmp", "state.json").unwrap();
        acked_written(&leader, position);
        assert_eq!(sent(&leader), before + 7);
        wait_identical(&ld, &env.tmp.path().join("f"), Duration::from_secs(10));
    }
}
