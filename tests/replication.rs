//! `ferry lead` and `ferry follow` as real processes on 127.0.0.1 with real files, on both
//! I/O engines.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

use common::*;

fn nested_tree(root: &std::path::Path) -> u64 {
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("meta.json", b"{\"version\":1}".to_vec()),
        (
            "queues/q1/segments/00000001.seg",
            pattern(5 * 1024 * 1024 + 17, 1),
        ),
        ("queues/q1/segments/00000002.seg", pattern(70_000, 2)),
        ("queues/q2/acks", Vec::new()),
        ("a/b/c/d/e/deep.bin", pattern(1234, 3)),
    ];
    let mut total = 0;
    for (path, bytes) in files {
        total += bytes.len() as u64;
        write(&root.join(path), &bytes);
    }
    total
}

#[test]
fn full_sync_copies_nested_dirs_byte_identical_on_both_engines() {
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        let total = nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let out = follow_once(&env, &fd, leader.addr, engine);
        assert!(
            out.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(payload_bytes(&out), total, "{engine}: every byte once");
        assert_eq!(checksum(&ld), checksum(&fd), "{engine}");
        assert!(checksum(&ld).lines().count() == 5);
    }
}

#[test]
fn restarted_follower_resumes_without_resending_unchanged_bytes() {
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        let total = nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let first = follow_once(&env, &fd, leader.addr, engine);
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        assert_eq!(payload_bytes(&first), total);

        // Nothing changed: nothing is sent.
        let again = follow_once(&env, &fd, leader.addr, engine);
        assert!(again.status.success());
        assert_eq!(
            payload_bytes(&again),
            0,
            "{engine}: an unchanged dir costs no payload"
        );

        // The writer appends 1000 bytes while the follower is down: only those travel.
        let seg = ld.join("queues/q1/segments/00000002.seg");
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&pattern(1000, 9))
            .unwrap();
        let resumed = wait_for_payload(&env, &fd, &leader, engine, 1000);
        assert_eq!(resumed, 1000, "{engine}: only the appended tail is sent");
        assert_eq!(checksum(&ld), checksum(&fd));

        // A byte flipped behind ferry's back on the follower: that file is repaired whole.
        let copy = fd.join("a/b/c/d/e/deep.bin");
        let mut bytes = std::fs::read(&copy).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&copy, bytes).unwrap();
        let repaired = follow_once(&env, &fd, leader.addr, engine);
        assert!(
            repaired.status.success(),
            "{}",
            String::from_utf8_lossy(&repaired.stderr)
        );
        assert_eq!(payload_bytes(&repaired), 1234, "{engine}");
        assert_eq!(checksum(&ld), checksum(&fd));

        // Truncated behind ferry's back: the missing tail comes back, nothing more.
        let seg_copy = fd.join("queues/q1/segments/00000002.seg");
        let full = std::fs::metadata(&seg_copy).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg_copy)
            .unwrap()
            .set_len(100)
            .unwrap();
        let regrown = follow_once(&env, &fd, leader.addr, engine);
        assert!(regrown.status.success());
        assert_eq!(payload_bytes(&regrown), full - 100, "{engine}");
        assert_eq!(checksum(&ld), checksum(&fd));
    }
}

/// A follower killed (SIGKILL) and started again against the same leader resumes from its
/// held record: the files it holds as they were are not hashed on either side, and only what
/// changed while it was down travels. A file the leader rewrote meanwhile is hashed (the index
/// says it began anew since the follower's record) and sent whole; a copy changed on the
/// follower's disk behind ferry's back is hashed and repaired.
/// A data dir of more files than a process may hold open (a broker with many queues, each with
/// its segments) is served, copied, synced and streamed: neither side needs every file open at
/// once. Both processes run under a limit of 128 open files, at `synced`, where the follower
/// makes every file it wrote durable before it acks: 600 files copied whole, then an append to
/// each, which two followers at once write under the file's real name. Each process keeps at
/// most half its limit open in its caches of files (the leader's two connections together), and
/// so never meets the limit, which would fail whatever else opens a file then (the follower's
/// held record's save did, now and then; a leader's checkpoint, its watcher's look).
#[test]
fn a_dir_of_more_files_than_the_open_file_limit_is_copied_synced_and_streamed() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let (leader_dir, follower_dir) = (env.dir("leader"), env.dir("follower"));
    let second_dir = env.dir("second");
    let path = |i: usize| leader_dir.join(format!("q{}/seg.{i}", i % 7));
    for i in 0..600 {
        write(&path(i), &pattern(1000 + i, i as u8));
    }
    let kept = "the limit of open files (128) leaves room to keep 64 files open";
    for engine in ENGINES {
        let mut cmd = lead_cmd(&env, &leader_dir, engine);
        // SAFETY: limit_open_files is async-signal-safe (one setrlimit).
        unsafe { cmd.pre_exec(|| limit_open_files(128)) };
        let leader = Proc::spawn(cmd);
        let addr = listen_addr(&leader);
        let follow_into = |dir: &std::path::Path| {
            let mut cmd = follow_cmd(&env, dir, addr, engine);
            cmd.args(["--durability", "synced"]);
            // SAFETY: as above.
            unsafe { cmd.pre_exec(|| limit_open_files(128)) };
            cmd
        };
        let mut once = follow_into(&follower_dir);
        once.arg("--once");
        let out = run_bounded(once, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(checksum(&leader_dir), checksum(&follower_dir), "{engine}");

        let follower = Proc::spawn(follow_into(&follower_dir));
        let second = Proc::spawn(follow_into(&second_dir));
        for f in [&follower, &second] {
            f.wait_log("initial sync received", Duration::from_secs(30));
        }
        for i in 0..600 {
            append(&path(i), &pattern(100, 7));
        }
        wait_identical(&leader_dir, &follower_dir, Duration::from_secs(60));
        wait_identical(&leader_dir, &second_dir, Duration::from_secs(60));
        // Each says once how many files the limit leaves it room to keep open, and what to
        // raise; none met the limit.
        let procs = [
            ("leader", &leader),
            ("follower", &follower),
            ("second", &second),
        ];
        for (who, proc) in procs {
            let log = proc.log_text();
            assert_eq!(log.matches(kept).count(), 1, "{engine} {who}: {log}");
            assert_eq!(
                log.matches("os error 24").count(),
                0,
                "{engine} {who}: {log}"
            );
        }
        drop((leader, follower, second));
        std::fs::remove_dir_all(&follower_dir).unwrap();
        std::fs::remove_dir_all(&second_dir).unwrap();
    }
}

#[test]
fn a_killed_follower_resumes_from_its_held_record_without_hashing() {
    let seg = "queues/q1/segments/00000002.seg";
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd, wd) = (env.dir("leader"), env.dir("follower"), env.dir("witness"));
        nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let mut follower = start_follower(&env, &fd, leader.addr, engine, "written");
        // A second follower that stays up shows when the leader has recorded a change.
        let _witness = start_follower(&env, &wd, leader.addr, engine, "written");
        append(&ld.join(seg), &pattern(1000, 9));
        wait_identical(&ld, &fd, Duration::from_secs(20));
        wait_until(
            Duration::from_secs(10),
            "the held record notes the segment as grown",
            || held_len(&fd, seg) == Some(71_000),
        );
        follower.child.kill().unwrap();
        follower.child.wait().unwrap();

        // While it is down: an append, a rewrite at the same size on the leader, and a byte
        // flipped in the follower's copy of another file.
        append(&ld.join(seg), &pattern(500, 10));
        write(&ld.join("meta.json"), b"{\"version\":2}");
        let copy = fd.join("a/b/c/d/e/deep.bin");
        let mut bytes = std::fs::read(&copy).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&copy, bytes).unwrap();
        wait_identical(&ld, &wd, Duration::from_secs(20));

        let mark = leader.proc.log_len();
        // Only the changed copy and the rewritten file are hashed; the tail, the rewritten
        // file and the repaired one travel.
        let _follower = resume(
            (&env, &ld, &fd, engine),
            (&leader, mark),
            "5 files, 3 held as this dir recorded them, 1247 bytes hashed \
             (1 files held but changed on the leader since",
            (3, 0, 2, 500 + 13 + 1234),
        );
    }
}

/// Starts a follower on `fd`, appends 1,000 bytes to the leader's `seg` (of `nested_tree`:
/// 70,000 to 71,000), waits until the follower holds it and its held record notes it, then
/// kills it (SIGKILL).
fn sync_then_kill_a_follower(
    (env, ld, fd, engine): (&Env, &std::path::Path, &std::path::Path, &str),
    leader: &LeaderProc,
    seg: &str,
) {
    let follower = start_follower(env, fd, leader.addr, engine, "written");
    append(&ld.join(seg), &pattern(1000, 9));
    wait_identical(ld, fd, Duration::from_secs(20));
    wait_until(
        Duration::from_secs(10),
        "the held record notes the segment as grown",
        || held_len(fd, seg) == Some(71_000),
    );
    drop(follower);
}

/// Starts a follower on `fd` against `leader` and, once its copy is identical, checks its
/// inventory line for `inventory`, and the leader's initial sync line (logged after line
/// `mark` of its log) for `(held, refused, compared, bytes to send)`.
fn resume(
    (env, ld, fd, engine): (&Env, &std::path::Path, &std::path::Path, &str),
    (leader, mark): (&LeaderProc, usize),
    inventory: &str,
    (held, refused, compared, to_send): (u64, u64, u64, u64),
) -> Proc {
    let follower = start_follower(env, fd, leader.addr, engine, "written");
    wait_identical(ld, fd, Duration::from_secs(20));
    let line = follower.wait_log("inventory: ", Duration::from_secs(10));
    assert!(line.contains(inventory), "{engine}: {line}");
    let line = leader
        .proc
        .wait_log_since(mark, "initial sync started", Duration::from_secs(10));
    let says = format!(
        "{held} files held as it recorded them, {refused} held records refused (sent whole), \
         {compared} files compared by digest"
    );
    assert!(line.contains(&says), "{engine}: {line}");
    let sends = format!("{to_send} bytes to send");
    assert!(line.contains(&sends), "{engine}: {line}");
    follower
}

/// A follower stopped with SIGTERM (a service manager's stop) finishes cleanly: it exits 0
/// having noted in its held record what it holds, so its restart hashes nothing, however
/// recently the last bytes arrived.
#[test]
fn a_follower_stopped_with_sigterm_exits_cleanly_and_its_restart_hashes_nothing() {
    let seg = "queues/q1/segments/00000002.seg";
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let mut follower = start_follower(&env, &fd, leader.addr, engine, "written");
        follower.wait_log("initial sync received", Duration::from_secs(20));
        append(&ld.join(seg), &pattern(1000, 9));
        wait_identical(&ld, &fd, Duration::from_secs(20));
        signal(&follower.child, libc::SIGTERM);
        let status = follower.child.wait().unwrap();
        assert!(status.success(), "{engine}: {status}");
        assert_eq!(
            held_len(&fd, seg),
            Some(71_000),
            "{engine}: noted at the stop"
        );

        let mark = leader.proc.log_len();
        let _follower = resume(
            (&env, &ld, &fd, engine),
            (&leader, mark),
            "5 files, 5 held as this dir recorded them, 0 bytes hashed",
            (5, 0, 0, 0),
        );
    }
}

/// A `follow --once` stopped by SIGTERM before its copy matched does not claim it did: it
/// exits non-zero naming the signal. (The leader is paused, so the sync cannot end first.)
#[test]
fn a_one_shot_sync_stopped_by_sigterm_exits_nonzero_naming_the_signal() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    nested_tree(&ld);
    let leader = start_leader(&env, &ld, "fallback");
    stop_process(&leader.proc.child);
    let mut cmd = follow_cmd(&env, &fd, leader.addr, "fallback");
    cmd.arg("--once");
    let mut follower = Proc::spawn(cmd);
    follower.wait_log("connected to the leader", Duration::from_secs(10));
    signal(&follower.child, libc::SIGTERM);
    let status = follower.child.wait().unwrap();
    signal(&leader.proc.child, libc::SIGCONT);
    assert!(!status.success(), "{status}");
    follower.wait_log(
        "stopped by signal 15 before the copy matched",
        Duration::from_secs(5),
    );
}

/// The waits a follower logged before its attempts to reconnect (`reconnecting in N ms`), among
/// its log lines after the first `from`.
fn reconnect_waits_ms(follower: &Proc, from: usize) -> Vec<u64> {
    follower.log.lock().unwrap()[from..]
        .iter()
        .filter_map(|l| {
            l.split("reconnecting in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A follower whose leader is gone tries again at most `RECONNECT_NO_LEADER_MAX_MS` (1 s)
/// apart however long the leader stays away (an attempt that finds no leader listening costs
/// a SYN), so it is back within about a second of a restarted leader, whose broker's confirms
/// wait for it; and after a connection on which it came in sync, it tries again after the
/// shortest wait, however short that connection was, so a leader restarted at once is
/// followed again at once.
#[test]
fn a_follower_is_back_within_a_second_of_its_leader_however_long_it_was_away() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(64 * 1024, 3));
    let listen = format!("127.0.0.1:{}", free_port());
    let lead = || {
        let proc = Proc::spawn(lead_cmd_at(&env, &ld, "fallback", &listen));
        proc.wait_log("listening on ", Duration::from_secs(20));
        proc
    };
    let mut leader = lead();
    let mut cmd = follow_cmd(&env, &fd, listen.parse().unwrap(), "fallback");
    // Every failed attempt's wait, not only the first of a kind.
    cmd.env("RUST_LOG", "info,ferry::follower=debug");
    let follower = Proc::spawn(cmd);
    wait_identical(&ld, &fd, Duration::from_secs(20));

    // Away for eight attempts: 0.1 s doubling would have reached 12.8 s.
    let from = follower.log_len();
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    wait_until(Duration::from_secs(30), "eight failed attempts", || {
        reconnect_waits_ms(&follower, from).len() >= 8
    });
    let waits = reconnect_waits_ms(&follower, from);
    assert!(waits.iter().all(|&ms| ms <= 1000), "{waits:?}");
    let from = follower.log_len();
    leader = lead();
    // In sync on this connection (its initial sync's MARK applied), not only identical: the
    // copy is identical before the follower even connects.
    follower.wait_log_since(from, "initial sync received", Duration::from_secs(20));

    // Killed again right after the follower came in sync: a short connection that worked.
    let from = follower.log_len();
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    wait_until(Duration::from_secs(10), "a failed attempt", || {
        !reconnect_waits_ms(&follower, from).is_empty()
    });
    let waits = reconnect_waits_ms(&follower, from);
    assert_eq!(waits[0], 100, "{waits:?}");
}

/// A listening socket whose accept queue is full, so the kernel drops every SYN sent to it, as
/// a leader's host that is gone without a reset does (its SYNs retried for about two minutes).
struct Unanswered {
    addr: std::net::SocketAddr,
    _listener: std::net::TcpListener,
    _queued: std::net::TcpStream,
}

fn unanswered() -> Unanswered {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) again on a listening socket this function owns, only to shrink its
    // accept queue (to one connection, which `_queued` takes).
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().unwrap();
    let queued = std::net::TcpStream::connect(addr).unwrap();
    Unanswered {
        addr,
        _listener: listener,
        _queued: queued,
    }
}

/// A follower whose leader's host does not answer (gone without a reset: its SYNs dropped)
/// gives up on the connect after `CONNECT_TIMEOUT_MS`, saying so, and tries again, so it
/// follows within seconds of the leader's return rather than once the kernel's two minutes of
/// SYN retries ran out; and a stop (SIGTERM; a node elected, which must take the dir) does not
/// wait for a connect in flight.
#[test]
fn a_follower_whose_leader_does_not_answer_gives_up_on_the_connect_and_stops_at_once() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(4096, 5));
    let hole = unanswered();
    let addr = hole.addr;
    let follower = start_follower(&env, &fd, addr, "fallback", "written");
    let line = follower.wait_log("no answer within", Duration::from_secs(20));
    assert!(
        line.contains(&format!("cannot connect to the leader at {addr}")),
        "{line}"
    );
    // The leader's host is back.
    drop(hole);
    let _leader = {
        let proc = Proc::spawn(lead_cmd_at(&env, &ld, "fallback", &addr.to_string()));
        proc.wait_log("listening on ", Duration::from_secs(20));
        proc
    };
    wait_identical(&ld, &fd, Duration::from_secs(20));

    let hole = unanswered();
    let mut follower = start_follower(&env, &env.dir("g"), hole.addr, "fallback", "written");
    follower.wait_log("following ", Duration::from_secs(20));
    // Inside its first connect, which would take CONNECT_TIMEOUT_MS to give up.
    std::thread::sleep(Duration::from_millis(1000));
    signal(&follower.child, libc::SIGTERM);
    let (status, took) = follower.exit_within(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", follower.log_text());
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
}

/// A leader stopped with SIGTERM and started again on its data dir resumes its instance (its
/// record, `.ferry/leader`): a follower that holds everything hashes only the files changed
/// while the leader was down, which the resumed leader cannot vouch for. Of the files, one
/// rewritten while the leader was down travels (whole), and the tails of one appended to right
/// before the stop and of one appended to while it was down. A leader killed with SIGKILL
/// whose checkpoints are off (`--record-interval-ms 0`) leaves no record: its successor draws a
/// new instance, and the follower hashes again.
#[test]
fn a_gracefully_restarted_leader_resumes_its_instance_so_followers_hash_only_what_changed() {
    let seg = "queues/q1/segments/00000002.seg";
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        sync_then_kill_a_follower((&env, &ld, &fd, engine), &leader, seg);
        // An append right before the stop (the follower, gone, misses it): the leader waits
        // until the segment has settled (LEADER_RECORD_SETTLE_MS) before it records it, so it
        // can vouch for it, and only the tail travels.
        append(
            &ld.join("queues/q1/segments/00000001.seg"),
            &pattern(300, 11),
        );
        let mut leader = leader;
        signal(&leader.proc.child, libc::SIGTERM);
        assert!(leader.proc.child.wait().unwrap().success(), "{engine}");
        assert!(ld.join(".ferry/leader").exists(), "{engine}: no record");
        // A start that fails before serving anyone (its port taken) leaves the record.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap().to_string();
        let cmd = lead_cmd_at(&env, &ld, engine, &taken_addr);
        let out = run_bounded(cmd, Duration::from_secs(20));
        assert!(!out.status.success(), "{engine}: listened on a taken port");
        assert!(ld.join(".ferry/leader").exists(), "{engine}: record lost");

        // While it is down, the application goes on: a rewrite, and an append to a segment.
        write(&ld.join("meta.json"), b"{\"version\":2}");
        append(&ld.join(seg), &pattern(700, 12));
        let leader = start_leader_with(&env, &ld, engine, &["--record-interval-ms", "0"]);
        let line = resuming_line(&leader);
        assert!(
            line.contains("3 of 5 files vouched for"),
            "{engine}: {line}"
        );
        // The two files changed while the leader was down are hashed on both sides (BIRTHS):
        // the rewritten one travels whole, the segment only its new tail, as does the one
        // appended to before the stop.
        let follower = resume(
            (&env, &ld, &fd, engine),
            (&leader, 0),
            "5 files, 3 held as this dir recorded them, 71013 bytes hashed \
             (2 files held but changed on the leader since",
            (3, 0, 2, 13 + 300 + 700),
        );
        drop(follower);

        // Killed: no record, so a new instance, and the follower's held record is void.
        drop(leader);
        assert!(!ld.join(".ferry/leader").exists(), "{engine}: used once");
        let leader = start_leader(&env, &ld, engine);
        let follower = start_follower(&env, &fd, leader.addr, engine, "written");
        let line = follower.wait_log("inventory: ", Duration::from_secs(10));
        assert!(line.contains("5 files, 0 held"), "{engine}: {line}");
        wait_identical(&ld, &fd, Duration::from_secs(20));
    }
}

/// A leader killed with SIGKILL leaves the record of its last checkpoint (written every
/// `--record-interval-ms` while it serves), so the next one resumes its instance: a follower
/// that holds everything hashes only the segment appended to after that checkpoint, and only
/// its new bytes travel. Positions go on above the checkpoint's reservation.
#[test]
fn a_killed_leader_resumes_from_its_last_checkpoint_so_followers_hash_only_what_changed() {
    let seg = "queues/q1/segments/00000002.seg";
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        nested_tree(&ld);
        let leader = start_leader_with(&env, &ld, engine, &["--record-interval-ms", "100"]);
        sync_then_kill_a_follower((&env, &ld, &fd, engine), &leader, seg);
        // A checkpoint vouches for files unchanged for LEADER_RECORD_SETTLE_MS before it.
        let settled_ns = newest_ctime_ns(&ld) + 1_000_000_000;
        wait_until(
            Duration::from_secs(10),
            "a checkpoint after the files settled",
            || record_taken_ns(&ld).is_some_and(|t| t > settled_ns),
        );
        drop(leader);
        assert!(ld.join(".ferry/leader").exists(), "{engine}: no record");

        append(&ld.join(seg), &pattern(700, 12));
        let leader = start_leader(&env, &ld, engine);
        let line = resuming_line(&leader);
        assert!(
            line.contains("4 of 5 files vouched for"),
            "{engine}: {line}"
        );
        let from: u64 = line
            .rsplit("positions from ")
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{engine}: {line}"));
        assert!(from > 1 << 40, "{engine}: above the reservation: {line}");
        let _follower = resume(
            (&env, &ld, &fd, engine),
            (&leader, 0),
            "5 files, 4 held as this dir recorded them, 71000 bytes hashed \
             (1 files held but changed on the leader since",
            (4, 0, 1, 700),
        );
    }
}

/// A follower promoted by hand (`ferry lead` on its data dir, the leader it followed dead) goes
/// on from the instance it followed, up to the last MARK it synced (`docs/PROTOCOL.md`, *After
/// a failover*): another follower of the dead leader then hashes only the file rewritten while it
/// was away, where before it hashed every file.
#[test]
fn a_follower_promoted_by_hand_goes_on_from_the_instance_it_followed() {
    let engine = ENGINES[1];
    let env = Env::new();
    let (ld, bd, cd) = (env.dir("leader"), env.dir("b"), env.dir("c"));
    for i in 0..6 {
        write(&ld.join(format!("q/seg.{i}")), &pattern(200_000, i));
    }
    write(&ld.join("q/state.json"), b"{\"head\": 6}");
    let mut leader = start_leader(&env, &ld, engine);
    let b = start_follower(&env, &bd, leader.addr, engine, "written");
    let mut c = start_follower(&env, &cd, leader.addr, engine, "written");
    for d in [&bd, &cd] {
        wait_identical(&ld, d, Duration::from_secs(20));
    }
    // b's copies have settled by the time it stops following (an application may write into
    // the dir once b stopped: a leader's record vouches only for files settled by then).
    let newest_ns = newest_ctime_ns(&bd);
    signal(&c.child, libc::SIGTERM);
    assert!(c.child.wait().unwrap().success());
    write(&ld.join("q/state.new"), b"{\"head\": 7}");
    std::fs::rename(ld.join("q/state.new"), ld.join("q/state.json")).unwrap();
    wait_identical(&ld, &bd, Duration::from_secs(20));
    leader.proc.child.kill().unwrap();
    let _ = leader.proc.child.wait();
    wait_settled_since(newest_ns);
    let (promoted, line) = lead_by_hand(&env, &bd, engine, b);
    assert!(line.contains("7 of 7 files held"), "{line}");
    // `ferry status` names the instance and the fork.
    // "forking instance NEW from instance OLD at position P, ..."
    let mut words = line.split("forking instance ").nth(1).unwrap().split(' ');
    let new = words.next().unwrap();
    let old = words.nth(2).unwrap();
    let at = words.nth(2).unwrap().trim_end_matches(',');
    let shown = format!("instance {new} (a fork of instance {old} at position {at})");
    status_shows(&promoted, &shown);
    let _c = back_holding_all_but_the_rewrite((&env, &bd, &cd, engine), &promoted);
}

/// A follower whose connection to the leader ended after a DATA and before the MARK that
/// covers it (the leader died between the two) holds bytes its last MARK does not: the old
/// leader's, which a follower promoted by hand never had, and where its application then
/// wrote others. Following the promoted one, it cuts its copy back to what it held at that
/// MARK and is sent the rest (`docs/PROTOCOL.md`, *After a failover*), where it kept the old
/// leader's bytes before, and its copy differed from the new leader's for good (as a
/// randomized promotion test once found in CI).
#[test]
fn a_follower_holding_bytes_past_its_last_mark_cuts_them_when_its_leader_changes() {
    let engine = ENGINES[1];
    let env = Env::new();
    let (ld, ad, bd) = (env.dir("leader"), env.dir("a"), env.dir("b"));
    let seg = "q/seg.0";
    write(&ld.join(seg), &pattern(100_000, 1));
    write(&ld.join("q/state.json"), b"{\"head\": 1}");
    let mut leader = start_leader(&env, &ld, engine);
    let relay = RelayCuttingBeforeAMark::to(leader.addr);
    let mut a = start_follower(&env, &ad, leader.addr, engine, "written");
    let mut b = start_follower(&env, &bd, relay.addr, engine, "written");
    for d in [&ad, &bd] {
        wait_identical(&ld, d, Duration::from_secs(20));
    }
    // a stops with every file settled, so that its dir, led by hand, vouches for them.
    wait_settled(&ad);
    signal(&a.child, libc::SIGTERM);
    assert!(a.child.wait().unwrap().success());
    // The old leader's last append reaches b, and its MARK never does.
    relay.arm();
    append(&ld.join(seg), &pattern(5_000, 2));
    wait_until(Duration::from_secs(10), "the relay cut b off", || {
        relay.cut.load(std::sync::atomic::Ordering::SeqCst)
    });
    b.wait_log("reconnecting", Duration::from_secs(10));
    signal(&b.child, libc::SIGTERM);
    assert!(b.child.wait().unwrap().success());
    // All of the append, or a part the watcher saw first: past what the MARK covers either way.
    let past_mark = std::fs::metadata(bd.join(seg)).unwrap().len() - 100_000;
    assert!(past_mark > 0, "b got none of the append");
    leader.proc.child.kill().unwrap();
    let _ = leader.proc.child.wait();

    let promoted = start_leader_with(&env, &ad, engine, &[]);
    let line = promoted
        .proc
        .wait_log("forking instance", Duration::from_secs(20));
    assert!(line.contains("2 of 2 files held"), "{line}");
    // The application writes on at the promoted dir: other bytes where b holds the old
    // leader's.
    append(&ad.join(seg), &pattern(8_000, 3));
    let b = start_follower(&env, &bd, promoted.addr, engine, "written");
    wait_identical(&ad, &bd, Duration::from_secs(20));
    let cut = b.wait_log("inventory: cut", Duration::from_secs(10));
    assert!(
        cut.contains("cut 1 files to their lengths at the MARKs this dir recorded them after")
            && cut.contains(&format!("({past_mark} bytes past them")),
        "{cut}"
    );
    let line = b.wait_log("inventory: ", Duration::from_secs(10));
    assert!(
        line.contains("2 files, 2 held as this dir recorded them"),
        "{line}"
    );
}

/// A TCP relay between one follower and its leader that, once armed, cuts the connection
/// before the first MARK the leader sends after a DATA, as a leader dying between the two
/// would; then it accepts no more connections (the follower's reconnections are refused).
struct RelayCuttingBeforeAMark {
    addr: std::net::SocketAddr,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set once it cut the connection.
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RelayCuttingBeforeAMark {
    fn to(leader: std::net::SocketAddr) -> RelayCuttingBeforeAMark {
        use std::io::Read;
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (armed, cut) = (std::sync::Arc::default(), std::sync::Arc::default());
        let relay = RelayCuttingBeforeAMark {
            addr,
            armed: std::sync::Arc::clone(&armed),
            cut: std::sync::Arc::clone(&cut),
        };
        std::thread::spawn(move || {
            let (follower, _) = listener.accept().unwrap();
            drop(listener);
            let upstream = TcpStream::connect(leader).unwrap();
            let (mut to_leader, mut from_follower) =
                (upstream.try_clone().unwrap(), follower.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut from_follower, &mut to_leader));
            let (mut from_leader, mut to_follower) = (upstream, follower);
            // The preamble (PREAMBLE_BYTES), then frames: body_len (u32 LE), then the body,
            // whose first byte is the type; a DATA's payload follows, data_len (u32 LE at
            // frame offset 14) bytes.
            let mut preamble = [0u8; 16];
            from_leader.read_exact(&mut preamble).unwrap();
            to_follower.write_all(&preamble).unwrap();
            let mut data_since_armed = false;
            loop {
                let mut len = [0u8; 4];
                if from_leader.read_exact(&mut len).is_err() {
                    return;
                }
                let mut frame = len.to_vec();
                frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
                if from_leader.read_exact(&mut frame[4..]).is_err() {
                    return;
                }
                let (kind, armed) = (frame[4], armed.load(SeqCst));
                if kind == 0x20 {
                    let data_len = u32::from_le_bytes(frame[14..18].try_into().unwrap());
                    let body = frame.len();
                    frame.resize(body + data_len as usize, 0);
                    if from_leader.read_exact(&mut frame[body..]).is_err() {
                        return;
                    }
                    data_since_armed |= armed;
                }
                if kind == 0x25 && data_since_armed {
                    let _ = to_follower.shutdown(Shutdown::Both);
                    let _ = from_leader.shutdown(Shutdown::Both);
                    cut.store(true, SeqCst);
                    return;
                }
                if to_follower.write_all(&frame).is_err() {
                    return;
                }
            }
        });
        relay
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `ferry status` of `leader` (started with `--http`) shows `shown`.
fn status_shows(leader: &LeaderProc, shown: &str) {
    let out = ferry()
        .arg("status")
        .arg(http_addr(&leader.proc))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(shown), "no {shown:?} in {table}");
}

/// The follower of `fd`, stopped before `q/state.json` was rewritten and started again against
/// `leader` (serving `ld`), holds its 6 other files and hashes only that one.
fn back_holding_all_but_the_rewrite(
    (env, ld, fd, engine): (&Env, &std::path::Path, &std::path::Path, &str),
    leader: &LeaderProc,
) -> Proc {
    let follower = resume(
        (env, ld, fd, engine),
        (leader, 0),
        "7 files, 6 held as this dir recorded them, 11 bytes hashed",
        (6, 0, 1, 11),
    );
    let state = std::fs::read(fd.join("q/state.json")).unwrap();
    assert_eq!(state, b"{\"head\": 7}");
    follower
}

/// After two promotions by hand in a row (the leader dies, b is led by hand and c follows it;
/// then b dies, c is led by hand), a follower that missed both still holds what it recorded
/// under the first leader (`docs/PROTOCOL.md`, *After failovers in a row*): c forks with b's
/// chain behind its own link, and d hashes only the file rewritten while it was away, where a
/// fork naming b's instance alone left it holding nothing.
#[test]
fn a_follower_that_missed_two_promotions_in_a_row_still_holds_its_files() {
    let engine = ENGINES[1];
    let env = Env::new();
    let (ld, bd, cd, dd) = (env.dir("leader"), env.dir("b"), env.dir("c"), env.dir("d"));
    for i in 0..6 {
        write(&ld.join(format!("q/seg.{i}")), &pattern(200_000, i));
    }
    write(&ld.join("q/state.json"), b"{\"head\": 6}");
    let mut leader = start_leader(&env, &ld, engine);
    let followers: Vec<Proc> = [&bd, &cd, &dd]
        .iter()
        .map(|d| start_follower(&env, d, leader.addr, engine, "written"))
        .collect();
    let [b, mut c, mut d] = <[Proc; 3]>::try_from(followers).ok().unwrap();
    for dir in [&bd, &cd, &dd] {
        wait_identical(&ld, dir, Duration::from_secs(20));
    }
    signal(&d.child, libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
    write(&ld.join("q/state.new"), b"{\"head\": 7}");
    std::fs::rename(ld.join("q/state.new"), ld.join("q/state.json")).unwrap();
    for dir in [&bd, &cd] {
        wait_identical(&ld, dir, Duration::from_secs(20));
    }
    leader.proc.child.kill().unwrap();
    let _ = leader.proc.child.wait();

    // b is led by hand once its copies settled; c follows it, holding every file.
    wait_settled(&bd);
    signal(&c.child, libc::SIGTERM);
    assert!(c.child.wait().unwrap().success());
    let (mut promoted, line) = lead_by_hand(&env, &bd, engine, b);
    assert!(line.contains("7 of 7 files held"), "{line}");
    // c holds its files (the rewritten one too, unless the dead leader's last MARK reached c
    // and not b: what c recorded above the fork is hashed).
    let c = start_follower(&env, &cd, promoted.addr, engine, "written");
    wait_identical(&bd, &cd, Duration::from_secs(20));
    let line = c.wait_log("inventory: ", Duration::from_secs(10));
    let held: u64 = line
        .split(" held as this dir")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(line.contains("7 files, ") && held >= 6, "{line}");
    // Its held record now names b's instance (and b's chain), as of the initial sync's MARK.
    c.wait_log("initial sync received", Duration::from_secs(10));

    // b dies too; c is led by hand, going on from b's instance and from what b's went on from.
    promoted.proc.child.kill().unwrap();
    let _ = promoted.proc.child.wait();
    wait_settled(&cd);
    let (again, line) = lead_by_hand(&env, &cd, engine, c);
    assert!(line.contains("7 of 7 files held; instance "), "{line}");
    // "forking instance NEW from instance B at position P, ...; instance B goes on from
    // instance A up to position Q": `ferry status` names both links.
    let head: Vec<&str> = line
        .split("forking instance ")
        .nth(1)
        .unwrap()
        .split(' ')
        .collect();
    let tail: Vec<&str> = line
        .rsplit("; instance ")
        .next()
        .unwrap()
        .split(' ')
        .collect();
    let (new, b_instance, p) = (head[0], head[3], head[6].trim_end_matches(','));
    assert_eq!(tail[0], b_instance, "{line}");
    let (a_instance, q) = (tail[5], tail[9]);
    let shown = format!(
        "instance {new} (a fork of instance {b_instance} at position {p}, itself a fork of \
         instance {a_instance} at position {q})"
    );
    status_shows(&again, &shown);
    let _d = back_holding_all_but_the_rewrite((&env, &cd, &dd, engine), &again);
}

/// The leader's checkpoint counters from its `/metrics`: rounds, records written, files looked
/// at.
fn checkpoint_counters(http: &str) -> [u64; 4] {
    let text = ferry::http::get(http, "/metrics").unwrap_or_default();
    let samples = ferry::status::parse_prometheus(&text);
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.value as u64)
    };
    [
        value("ferry_leader_checkpoints_total"),
        value("ferry_leader_checkpoint_writes_total"),
        value("ferry_leader_checkpoint_files_looked_total"),
        value("ferry_leader_checkpoint_entries_taken_total"),
    ]
}

/// Waits until 10 checkpoint rounds in a row looked at no file and wrote nothing (what changed
/// has settled); the counters then.
fn checkpoints_at_rest(http: &str) -> [u64; 4] {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let before = checkpoint_counters(http);
        wait_until(Duration::from_secs(10), "10 checkpoint rounds", || {
            checkpoint_counters(http)[0] >= before[0] + 10
        });
        let after = checkpoint_counters(http);
        if after[1..] == before[1..] {
            return after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every 10 checkpoints look and write again: {before:?} then {after:?}"
        );
    }
}

/// A serving leader's checkpoints look again only at the files that changed since the last one
/// (or that had changed too recently then to be vouched for), and write nothing when nothing
/// changed: an idle leader of many files does no work at every interval, where it looked at
/// every file and wrote the whole record. They take from the writers' catalog only the entries
/// that changed, where each round that wrote copied the whole catalog twice. What it vouches
/// for is unchanged: after a SIGKILL the next start vouches for every file, the one appended to
/// since included.
#[test]
fn checkpoints_look_again_only_at_files_that_changed() {
    let env = Env::new();
    let ld = env.dir("leader");
    write_segments(&ld, 200);
    let flags = ["--record-interval-ms", "20", "--http", "127.0.0.1:0"];
    let leader = start_leader_with(&env, &ld, "fallback", &flags);
    let http = http_addr(&leader.proc);
    let rest = checkpoints_at_rest(&http);
    assert!(rest[2] >= 200, "every file looked at once: {rest:?}");
    assert!(rest[3] >= 200, "every file's entry taken once: {rest:?}");

    append(&ld.join("q/seg.7"), &pattern(500, 1));
    wait_until(Duration::from_secs(10), "a record with the append", || {
        checkpoint_counters(&http)[1] > rest[1]
    });
    let again = checkpoints_at_rest(&http);
    let rounds = again[0] - rest[0];
    assert!(
        again[2] - rest[2] <= rounds,
        "at most the appended file looked at each round: {rest:?} then {again:?}"
    );
    assert!(
        again[3] - rest[3] <= rounds,
        "at most the appended file's entry taken each round: {rest:?} then {again:?}"
    );
    drop(leader);

    let leader = start_leader(&env, &ld, "fallback");
    let line = resuming_line(&leader);
    assert!(line.contains("200 of 200 files vouched for"), "{line}");
}

/// `count` files of 1000 bytes in `dir`/q, `seg.0` and up.
fn write_segments(dir: &std::path::Path, count: usize) {
    for i in 0..count {
        write(&dir.join(format!("q/seg.{i}")), &pattern(1000, i as u8));
    }
}

/// The line in which `leader` says it resumes an instance, and of how many files it vouches.
fn resuming_line(leader: &LeaderProc) -> String {
    let wait = Duration::from_secs(10);
    leader.proc.wait_log("resuming instance", wait)
}

/// A leader's first checkpoint vouches for the files its start looked at (the watcher's look,
/// which the catalog is built from) where they had settled then, rather than looking at every
/// file once more: a start over 100,000 files paid for two looks at each. Its graceful stop
/// looks only at the files changed since that look, or not settled then, where it looked at
/// every file. What they vouch for is as before: after a SIGKILL the next start vouches for
/// every file but the one appended to since; after a SIGTERM, for every file, the one appended
/// to right before it too (the stop waited until it had settled).
#[test]
fn a_leaders_first_checkpoint_and_its_stop_look_again_only_at_what_changed_since_its_start() {
    let env = Env::new();
    let ld = env.dir("leader");
    write_segments(&ld, 200);
    // Settled at the start's look: unchanged for LEADER_RECORD_SETTLE_MS before it.
    wait_settled(&ld);
    let flags = ["--record-interval-ms", "20", "--http", "127.0.0.1:0"];
    let leader = start_leader_with(&env, &ld, "fallback", &flags);
    let http = http_addr(&leader.proc);
    let rest = checkpoints_at_rest(&http);
    assert!(rest[1] >= 1, "a record written: {rest:?}");
    assert_eq!(rest[2], 0, "no file looked at again: {rest:?}");
    drop(leader);

    append(&ld.join("q/seg.7"), &pattern(500, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let line = resuming_line(&leader);
    assert!(line.contains("199 of 200 files vouched for"), "{line}");
    drop(leader);

    // The appended file settles and is vouched for by a checkpoint; then an append right
    // before the stop, which the stop looks at (it waits until it has settled), and that alone.
    let leader = start_leader_with(&env, &ld, "fallback", &flags);
    checkpoints_at_rest(&http_addr(&leader.proc));
    append(&ld.join("q/seg.9"), &pattern(500, 2));
    let mut leader = leader;
    signal(&leader.proc.child, libc::SIGTERM);
    assert!(leader.proc.child.wait().unwrap().success());
    let line = leader
        .proc
        .wait_log("of them looked at now", Duration::from_secs(1));
    assert!(
        line.contains("(200 files, 1 of them looked at now"),
        "{line}"
    );
    let leader = start_leader(&env, &ld, "fallback");
    let line = resuming_line(&leader);
    assert!(line.contains("200 of 200 files vouched for"), "{line}");
}

/// `follow --once` until the leader's watcher has recorded the append (it is asynchronous).
fn wait_for_payload(
    env: &Env,
    fd: &std::path::Path,
    leader: &LeaderProc,
    engine: &str,
    want: u64,
) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = follow_once(env, fd, leader.addr, engine);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = payload_bytes(&out);
        if got == want || std::time::Instant::now() > deadline {
            return got;
        }
        assert_eq!(got, 0, "partial resend");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn streaming_replicates_appends_replaces_truncates_deletes_and_new_dirs() {
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let _follower = start_follower(&env, &fd, leader.addr, engine, "synced");
        wait_identical(&ld, &fd, Duration::from_secs(20));

        // Appends with write(2).
        let seg = ld.join("queues/q1/segments/00000002.seg");
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        for i in 0..200u32 {
            f.write_all(&pattern(512, i as u8)).unwrap();
        }
        // Rename-over of a JSON file.
        write(&ld.join("meta.json.tmp"), b"{\"version\":2,\"more\":true}");
        std::fs::rename(ld.join("meta.json.tmp"), ld.join("meta.json")).unwrap();
        // Truncate, in-place overwrite, delete, and a new nested subdirectory.
        OpenOptions::new()
            .write(true)
            .open(ld.join("queues/q1/segments/00000001.seg"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        std::fs::remove_file(ld.join("a/b/c/d/e/deep.bin")).unwrap();
        write(
            &ld.join("queues/q3/new/segments/00000001.seg"),
            &pattern(300_000, 5),
        );
        OpenOptions::new()
            .append(true)
            .open(ld.join("queues/q3/new/segments/00000001.seg"))
            .unwrap()
            .write_all(b"tail")
            .unwrap();
        wait_identical(&ld, &fd, Duration::from_secs(20));
        assert!(!fd.join("a/b/c/d/e/deep.bin").exists());
    }
}

/// What a follower's `--http` endpoint counts of the payload bytes it received.
fn payload_bytes_received(http: &str) -> u64 {
    let metrics = ferry::http::get(http, "/metrics").unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_payload_bytes_received_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

/// Renames in the leader's data dir (Kafka renames a segment to `.deleted` before retention
/// removes it, and a partition's directory to `-delete`) move the followers' copies: none of
/// the renamed bytes is received again, a synced follower's copies stay identical, and the
/// renamed directory's later deletion leaves nothing behind.
#[test]
fn renames_in_the_leaders_dir_move_the_followers_copies_without_sending_them_again() {
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd) = (env.dir("leader"), env.dir("follower"));
        let seg = pattern(4 << 20, 3);
        write(&ld.join("t-0/00.log"), &seg);
        write(&ld.join("t-0/idx/01.index"), &seg[..1 << 20]);
        write(&ld.join("meta.json"), b"{\"v\":1}");
        let leader = start_leader_with(&env, &ld, engine, &["--http", "127.0.0.1:0"]);
        let mut cmd = follow_cmd(&env, &fd, leader.addr, engine);
        cmd.args(["--durability", "synced", "--http", "127.0.0.1:0"]);
        let follower = Proc::spawn(cmd);
        let http = http_addr(&follower);
        wait_identical(&ld, &fd, Duration::from_secs(20));
        let before = payload_bytes_received(&http);
        let leader_http = http_addr(&leader.proc);
        std::fs::rename(ld.join("t-0/00.log"), ld.join("t-0/00.log.deleted")).unwrap();
        std::fs::rename(ld.join("t-0"), ld.join("t-0.abc-delete")).unwrap();
        wait_identical(&ld, &fd, Duration::from_secs(20));
        let received = payload_bytes_received(&http) - before;
        assert_eq!(received, 0, "{engine}: renamed bytes received again");
        assert!(
            !fd.join("t-0").exists(),
            "{engine}: the old directory is left"
        );
        // Renamed over a file, then gone with its directory.
        std::fs::rename(
            ld.join("t-0.abc-delete/00.log.deleted"),
            ld.join("meta.json"),
        )
        .unwrap();
        wait_identical(&ld, &fd, Duration::from_secs(20));
        assert_eq!(payload_bytes_received(&http) - before, 0, "{engine}");
        std::fs::remove_dir_all(ld.join("t-0.abc-delete")).unwrap();
        wait_identical(&ld, &fd, Duration::from_secs(20));
        assert!(!fd.join("t-0.abc-delete").exists(), "{engine}");
        // The leader counts the copies moved: the index, and the segment twice over (once if
        // the session heard of both its renames at once, which it joins into one).
        let metrics = ferry::http::get(&leader_http, "/metrics").unwrap();
        let renamed: Option<u64> = metrics
            .lines()
            .find(|l| l.starts_with("ferry_follower_files_renamed_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok());
        assert!(matches!(renamed, Some(3 | 4)), "{engine}: {renamed:?}");
    }
}

/// A file's access time as of now, in ns.
fn atime_ns(path: &std::path::Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    meta.atime() * 1_000_000_000 + meta.atime_nsec()
}

/// Sets `path`'s access time a minute back (its modification time stays): older than that, so a
/// read under `relatime` (the default mount option) would update it.
fn age_atime(path: &std::path::Path) -> i64 {
    let back = std::time::SystemTime::now() - Duration::from_secs(60);
    let times = std::fs::FileTimes::new().set_accessed(back);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(times)
        .unwrap();
    atime_ns(path)
}

/// Replicating the application's files is no access of the application's: the leader (and a
/// follower hashing its copies) reads with O_NOATIME, allowed to the files' owner and to root,
/// so their access times stay as they were. Under `relatime` a read after a write would update
/// it, which on ext4 is a journalled write of the inode at every round of a segment appended to.
#[test]
fn serving_files_leaves_their_access_times_alone() {
    let env = Env::new();
    // Whether a read updates an access time here at all (not on a `noatime` mount).
    let probe = env.dir("probe").join("f");
    write(&probe, b"probe");
    let aged = age_atime(&probe);
    std::fs::read(&probe).unwrap();
    if atime_ns(&probe) == aged {
        eprintln!("a read does not update access times on this filesystem: nothing to test");
        return;
    }
    for engine in ENGINES {
        let (ld, fd) = (
            env.dir(&format!("leader-{engine}")),
            env.dir(&format!("f-{engine}")),
        );
        let seg = ld.join("q/seg");
        let mut bytes = pattern(100_000, 1);
        write(&seg, &bytes);
        let aged = age_atime(&seg);
        let leader = start_leader(&env, &ld, engine);
        let _follower = start_follower(&env, &fd, leader.addr, engine, "written");
        // Only the copy is read here (`wait_identical` would read the leader's file too).
        let copy = fd.join("q/seg");
        let holds = |bytes: &[u8]| std::fs::read(&copy).is_ok_and(|c| c == bytes);
        wait_until(Duration::from_secs(20), "the copy", || holds(&bytes));
        let more = pattern(5000, 2);
        append(&seg, &more);
        bytes.extend_from_slice(&more);
        wait_until(Duration::from_secs(20), "the appended copy", || {
            holds(&bytes)
        });
        assert_eq!(
            atime_ns(&seg),
            aged,
            "{engine}: the leader's reads changed it"
        );
    }
}

#[test]
fn wrong_secret_exits_nonzero_naming_the_cause_and_the_leader_keeps_serving() {
    for engine in ENGINES {
        let env = Env::new();
        let (ld, fd, bad) = (env.dir("leader"), env.dir("follower"), env.dir("bad"));
        nested_tree(&ld);
        let leader = start_leader(&env, &ld, engine);
        let mut cmd = ferry();
        cmd.args(["follow", "--once", "--io-engine", engine, "--leader"])
            .arg(leader.addr.to_string())
            .arg("--data-dir")
            .arg(&bad)
            .env("FERRY_SECRET", "not-the-secret");
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("wrong secret"), "{engine}: {stderr}");
        leader.proc.wait_log("wrong secret", Duration::from_secs(5));
        assert_eq!(checksum(&bad), "", "nothing was written without the secret");
        let ok = follow_once(&env, &fd, leader.addr, engine);
        assert!(ok.status.success(), "the leader still serves others");
    }
}

/// Rotating the shared secret without stopping replication: the leader is given the new
/// secret and, with `--previous-secret-file`, the old one. A follower that still holds the old
/// one syncs (and the leader names it, so that the operator knows who is left), one with the
/// new one syncs, and one with neither is refused.
#[test]
fn a_leader_in_a_secret_rotation_serves_followers_with_the_old_or_the_new_secret() {
    let env = Env::new();
    let ld = env.dir("leader");
    nested_tree(&ld);
    let new_secret = env.tmp.path().join("new-secret");
    std::fs::write(&new_secret, "the new secret, rotated in today\n").unwrap();
    let mut cmd = lead_with_secret_cmd(&ld, "127.0.0.1:0", &new_secret);
    cmd.arg("--previous-secret-file").arg(&env.secret_file);
    let leader = Proc::spawn(cmd);
    let addr = listen_addr(&leader);
    let follow = |dir: &std::path::Path, secret: &std::path::Path| {
        let mut cmd = ferry();
        cmd.args(["follow", "--once", "--io-engine", "fallback", "--leader"])
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir)
            .arg("--secret-file")
            .arg(secret);
        run_bounded(cmd, Duration::from_secs(30))
    };
    let (old_dir, new_dir) = (env.dir("old"), env.dir("new"));
    let out = follow(&old_dir, &env.secret_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checksum(&ld), checksum(&old_dir));
    leader.wait_log(
        "authenticated with the previous secret",
        Duration::from_secs(5),
    );
    let out = follow(&new_dir, &new_secret);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checksum(&ld), checksum(&new_dir));
    let other = env.tmp.path().join("other-secret");
    std::fs::write(&other, "neither the old nor the new one").unwrap();
    let out = follow(&env.dir("other"), &other);
    failed_saying(&out, &["wrong secret"]);
}

#[test]
fn missing_secret_is_refused_before_starting() {
    let env = Env::new();
    let out = ferry()
        .args(["follow", "--leader", "127.0.0.1:1", "--data-dir"])
        .arg(env.dir("f"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--secret-file") && stderr.contains("FERRY_SECRET"),
        "{stderr}"
    );
}

#[test]
fn follower_refuses_to_write_through_a_symlink_pointing_outside_its_dir() {
    let env = Env::new();
    let (ld, fd, outside) = (env.dir("leader"), env.dir("follower"), env.dir("outside"));
    write(&ld.join("evil/x.seg"), b"payload");
    std::os::unix::fs::symlink(&outside, fd.join("evil")).unwrap();
    let leader = start_leader(&env, &ld, "fallback");
    // A dir with content that ferry never managed is not followed into without --adopt (tested
    // below); here it is, to meet the link.
    let mut cmd = follow_cmd(&env, &fd, leader.addr, "fallback");
    cmd.args(["--once", "--adopt"]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("escapes the data dir"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    leader
        .proc
        .wait_log("escapes the data dir", Duration::from_secs(5));
}

/// Pages of `path` not yet written back (cachestat(2), Linux 6.5); `None` where the kernel
/// cannot say.
fn dirty_pages(path: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    ferry::engine::uring::cachestat(file.as_raw_fd(), 0, 0).map(|stat| stat.nr_dirty)
}

/// A follower killed before its last sync round leaves bytes in the page cache that a new run
/// holds and, its copy matching the leader's, never writes again: at `synced` it must make them
/// durable before it acks them.
#[test]
fn a_synced_follower_makes_what_an_earlier_run_left_durable_before_it_acks() {
    let env = Env::new();
    let leader = env.dir("leader");
    let bytes = pattern(4 << 20, 5);
    write(&leader.join("q/seg.0"), &bytes);
    // On the build's disk: tmpfs, where /tmp may be, has no writeback to wait for.
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let follower = disk.path().join("follower");
    let held = follower.join("q/seg.0");
    write(&held, &bytes);
    // An earlier run's dir: ferry's own dir is there.
    std::fs::create_dir_all(follower.join(".ferry")).unwrap();
    match dirty_pages(&held) {
        Some(n) if n > 0 => {}
        other => {
            eprintln!("skipped: no dirty pages to observe on this filesystem ({other:?})");
            return;
        }
    }
    let l = start_leader(&env, &leader, "uring");
    let out = follow_once(&env, &follower, l.addr, "uring");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        payload_bytes(&out),
        0,
        "the copy matched: nothing was written again"
    );
    assert_eq!(
        dirty_pages(&held),
        Some(0),
        "acked as synced with pages of it still dirty"
    );
}

/// A directory that holds files but was never a ferry data dir (no `.ferry/`) is not taken over
/// by accident: following makes it an exact copy of the leader's and deletes every file the
/// leader lacks, so `ferry follow` refuses, naming such a file and `--adopt`, and leaves the
/// directory as it was. With `--adopt` (a copy seeded by other means) it becomes the leader's
/// copy, and from then on ferry manages it: a file the leader lacks goes without asking.
#[test]
fn a_follower_does_not_take_over_a_directory_of_other_files_unless_told_to() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    write(&fd.join("notes/precious.txt"), b"not the leader's");
    let leader = start_leader(&env, &ld, "fallback");
    let out = follow_once(&env, &fd, leader.addr, "fallback");
    failed_saying(
        &out,
        &[
            &format!("{}", fd.join("notes/precious.txt").display()),
            "--adopt",
        ],
    );
    assert_eq!(
        std::fs::read(fd.join("notes/precious.txt")).unwrap(),
        b"not the leader's"
    );
    assert!(!fd.join(".ferry").exists(), "nothing was written");

    let mut cmd = follow_cmd(&env, &fd, leader.addr, "fallback");
    cmd.args(["--once", "--adopt"]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree_difference(&ld, &fd), None);

    write(&fd.join("stray"), b"left by hand");
    let out = follow_once(&env, &fd, leader.addr, "fallback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree_difference(&ld, &fd), None);
}

/// A leader whose data dir is empty (its disk not mounted, a wrong --data-dir) would have every
/// follower delete its whole copy at connect. A follower that holds files declines such an
/// index: `--once` exits non-zero saying why, the leader logs the follower's reason, and the
/// copy stays. A follower that keeps running tries again with backoff, and follows once the
/// leader serves its files again (the disk mounted, the leader started on it).
#[test]
fn a_follower_does_not_wipe_its_copy_to_match_an_empty_leader() {
    let env = Env::new();
    let (ld, fd, empty) = (env.dir("leader"), env.dir("follower"), env.dir("unmounted"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    write(&ld.join("meta.json"), b"{}");
    let first = start_leader(&env, &ld, "fallback");
    follow_once_ok(&env, &fd, first.addr, "fallback");
    drop(first);

    let leader = start_leader(&env, &empty, "fallback");
    let out = follow_once(&env, &fd, leader.addr, "fallback");
    failed_saying(
        &out,
        &["the leader's data dir is empty", "would delete all 2 files"],
    );
    leader.proc.wait_log("declined", Duration::from_secs(10));
    assert_eq!(tree_difference(&ld, &fd), None, "the copy was touched");

    let follower = Proc::spawn(follow_cmd(&env, &fd, leader.addr, "fallback"));
    follower.wait_log("the leader's data dir is empty", Duration::from_secs(10));
    // The disk is mounted, written to meanwhile, and the leader started on it again, at the
    // same address: the follower follows it.
    let addr = leader.addr;
    drop(leader);
    write(&ld.join("q/seg"), &pattern(20_000, 2));
    let mut again = ferry();
    again
        .args([
            "lead",
            "--io-engine",
            "fallback",
            "--listen",
            &addr.to_string(),
        ])
        .arg("--data-dir")
        .arg(&ld)
        .arg("--secret-file")
        .arg(&env.secret_file);
    let _again = Proc::spawn(again);
    wait_same_files(&ld, &fd, Duration::from_secs(30));
}

/// A follower pointed at the wrong leader (a mistyped address, another cluster's leader with
/// the same secret) would make its copy an exact copy of that leader's data dir, deleting what
/// it held. Each data dir has a lineage that its copies carry: the follower declines a leader
/// of another, `--once` exits non-zero saying so and naming both, the leader logs the reason,
/// and the copy stays. It follows its own leader again as before; told to adopt the other's
/// data (`--adopt`), it becomes a copy of it, and from then on of that lineage.
#[test]
fn a_follower_does_not_replace_its_copy_with_another_data_dirs() {
    let env = Env::new();
    let (ld, other, fd) = (env.dir("leader"), env.dir("other"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    write(&ld.join("meta.json"), b"{}");
    write(&other.join("q/seg"), &pattern(7_000, 2));
    let leader = start_leader(&env, &ld, "fallback");
    follow_once_ok(&env, &fd, leader.addr, "fallback");
    let lineage = std::fs::read_to_string(ld.join(".ferry/lineage")).unwrap();
    assert_eq!(
        std::fs::read_to_string(fd.join(".ferry/lineage")).unwrap(),
        lineage,
        "the copy carries its leader's lineage"
    );

    let wrong = start_leader(&env, &other, "fallback");
    let theirs = std::fs::read_to_string(other.join(".ferry/lineage")).unwrap();
    let out = follow_once(&env, &fd, wrong.addr, "fallback");
    let said = failed_saying(
        &out,
        &[
            &format!("the leader at {} serves another data dir", wrong.addr),
            theirs.trim(),
            lineage.trim(),
            "--adopt",
        ],
    );
    let decline = said
        .lines()
        .find(|l| l.contains("serves another data dir"))
        .unwrap_or_default();
    let message = &decline[decline.find("the leader at").unwrap_or(0)..];
    assert!(
        !message.contains("  "),
        "a run of spaces in the message: {message}"
    );
    wrong.proc.wait_log("declined", Duration::from_secs(10));
    assert_eq!(tree_difference(&ld, &fd), None, "the copy was touched");

    write(&ld.join("q/seg2"), &pattern(3_000, 3));
    follow_once_ok(&env, &fd, leader.addr, "fallback");
    assert_eq!(tree_difference(&ld, &fd), None);

    let mut adopt = follow_cmd(&env, &fd, wrong.addr, "fallback");
    adopt.arg("--once").arg("--adopt");
    let out = run_bounded(adopt, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let adopting = stderr
        .lines()
        .find(|l| l.contains("adopting the data dir of the leader"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let message = &adopting[adopting.find("adopting").unwrap_or(0)..];
    assert!(
        !message.contains("  "),
        "a run of spaces in the line: {message}"
    );
    assert_eq!(tree_difference(&other, &fd), None);
    assert_eq!(
        std::fs::read_to_string(fd.join(".ferry/lineage")).unwrap(),
        theirs
    );
}

/// One ferry process per data dir: a follower started on a directory that a leader serves, or
/// that another follower writes, is refused at once, naming the process that has it, and
/// nothing of that directory is touched (a follower would make a leader's dir a copy of another
/// leader's). The lock goes with its process: after a SIGKILL the next one starts.
#[test]
fn a_data_dir_in_use_by_another_ferry_process_is_refused_naming_it() {
    let env = Env::new();
    let (ld, other, fd) = (env.dir("leader"), env.dir("other"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    write(&other.join("q/seg"), &pattern(5_000, 2));
    let leader = start_leader(&env, &ld, "fallback");
    let other_leader = start_leader(&env, &other, "fallback");

    let out = follow_once(&env, &ld, other_leader.addr, "fallback");
    let holder = format!("pid {}, ferry lead", leader.proc.child.id());
    failed_saying(&out, &["is in use by another ferry process", &holder]);
    assert_eq!(std::fs::read(ld.join("q/seg")).unwrap(), pattern(10_000, 1));

    let mut first = Proc::spawn(follow_cmd(&env, &fd, leader.addr, "fallback"));
    wait_identical(&ld, &fd, Duration::from_secs(20));
    let out = follow_once(&env, &fd, other_leader.addr, "fallback");
    let holder = format!("pid {}, ferry follow", first.child.id());
    failed_saying(&out, &[&holder]);

    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let out = follow_once(&env, &fd, leader.addr, "fallback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `dir` is in memory (tmpfs, ramfs), as ferry tells it.
fn in_memory(dir: &std::path::Path) -> bool {
    let dir = ferry::paths::DataDir::open_existing(dir).unwrap();
    dir.in_memory().unwrap()
}

/// An ack at `synced` says the bytes survive a power loss. A follower whose copy is on tmpfs
/// cannot give that, so it says at start what its acks at `synced` mean there; on a disk it
/// says nothing of the kind.
#[test]
fn a_synced_follower_in_ram_says_what_its_acks_mean() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("q/seg"), &pattern(1000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let Ok(ram) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("SKIPPED: no /dev/shm here");
        return;
    };
    assert!(in_memory(ram.path()));
    let out = follow_once(&env, ram.path(), leader.addr, "fallback");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is in memory (tmpfs)") && stderr.contains("power loss"),
        "{stderr}"
    );

    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if !in_memory(disk.path()) {
        let out = follow_once(&env, disk.path(), leader.addr, "fallback");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("is in memory"), "{stderr}");
    }
}

/// A data dir inside another one (a follower's copy made under the leader's dir on the same
/// machine, or the other way round) would have each replicate the other: the leader ships the
/// copy's files back into itself, growing until the disk is full. Each start refuses a dir
/// with a ferry data dir above it, naming both; siblings are fine.
#[test]
fn a_data_dir_inside_another_is_refused() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("q/seg"), &pattern(1000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let nested = ld.join("replica");
    let out = follow_once(&env, &nested, leader.addr, "fallback");
    failed_saying(&out, &[&format!("is inside {}", ld.display())]);
    assert!(!nested.exists(), "the nested copy was made");

    let fd = env.dir("follower");
    let out = follow_once(&env, &fd, leader.addr, "fallback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inner = fd.join("q");
    let out = run_bounded(lead_cmd(&env, &inner, "fallback"), Duration::from_secs(20));
    failed_saying(&out, &[&format!("is inside {}", fd.display())]);
}

/// Where the data dir's filesystem has no flock (some network and FUSE ones answer ENOLCK), the
/// follower still runs, and says what is not guarded.
#[test]
fn a_data_dir_that_cannot_be_locked_is_served_with_a_warning() {
    use std::os::unix::process::CommandExt;

    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(1000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let mut cmd = follow_cmd(&env, &fd, leader.addr, "fallback");
    cmd.arg("--once");
    // SAFETY: between fork and exec only prctl runs (async-signal-safe), on a filter built on
    // the child's stack.
    unsafe { cmd.pre_exec(|| refuse_syscalls(&[libc::SYS_flock], libc::ENOLCK)) };
    let out = run_bounded(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("nothing stops a second ferry process on this data dir"),
        "{stderr}"
    );
    assert_eq!(tree_difference(&ld, &fd), None);
}

/// A follower whose leader is down (or declines it) retries with backoff for as long as that
/// lasts. It says why once, as a warning; the retries that fail the same way are logged at
/// debug (and as a warning again once a minute, with a count, which this test does not wait
/// for), so an outage of hours does not bury the rest of its log under one line.
#[test]
fn a_follower_retrying_a_leader_that_is_down_warns_once_not_at_every_retry() {
    let env = Env::new();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = follow_cmd(&env, &env.dir("f"), addr, "fallback");
    cmd.env("RUST_LOG", "info,ferry::follower=debug");
    let follower = Proc::spawn(cmd);
    wait_until(Duration::from_secs(20), "three failed attempts", || {
        follower.log_text().matches("Connection refused").count() >= 3
    });
    let log = follower.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Connection refused"))
        .collect();
    assert!(refused[0].contains("WARN"), "{log}");
    assert!(refused[1..].iter().all(|l| l.contains("DEBUG")), "{log}");
}
