//! The operator's view of a running leader and follower: `--http` endpoints and `ferry status`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry::status::parse_prometheus;

/// Polls `ferry status ADDR` until its output contains every needle.
fn status_until(addr: &str, args: &[&str], needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ferry().arg("status").args(args).arg(addr).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`ferry status {args:?} {addr}` never showed {needles:?}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn leader_and_follower_report_metrics_status_and_a_table() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(100_000, 1));
    let mut cmd = ferry();
    cmd.args([
        "lead",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&ld)
    .arg("--secret-file")
    .arg(&env.secret_file);
    let leader = Proc::spawn(cmd);
    let leader_http = http_addr(&leader);
    let addr = listen_addr(&leader);
    let mut cmd = follow_cmd(&env, &fd, addr, "uring");
    cmd.args(["--durability", "written", "--http", "127.0.0.1:0"]);
    let follower = Proc::spawn(cmd);
    let follower_http = http_addr(&follower);

    // The table a broker operator reads.
    let table = status_until(&leader_http, &[], &["streaming", "written", "100.0 kB"]);
    assert!(
        table.contains("ADDRESS") && table.contains("LAG TIME") && table.contains("P99 ACK"),
        "{table}"
    );
    // The same facts as JSON and as Prometheus text.
    let json = status_until(&leader_http, &["--json"], &["\"state\": \"streaming\""]);
    assert!(json.contains("\"payload_bytes_sent\": 100000"), "{json}");
    assert!(json.contains("\"lag_ms\": 0,"), "{json}");
    let metrics = ferry::http::get(&leader_http, "/metrics").unwrap();
    let samples = parse_prometheus(&metrics);
    let lag = samples
        .iter()
        .find(|s| s.name == "ferry_follower_lag_bytes" && s.label("level") == Some("written"))
        .unwrap_or_else(|| panic!("no lag in\n{metrics}"));
    assert_eq!(lag.value, 0.0);
    assert!(samples
        .iter()
        .any(|s| s.name == "ferry_info" && s.label("engine").is_some()));
    // Which data dir it serves: its lineage, in all three.
    let lineage = std::fs::read_to_string(ld.join(".ferry/lineage")).unwrap();
    let lineage = lineage.trim();
    assert!(table.contains(&format!("lineage {lineage}")), "{table}");
    assert!(
        json.contains(&format!("\"lineage\": \"{lineage}\"")),
        "{json}"
    );
    assert!(samples
        .iter()
        .any(|s| s.name == "ferry_info" && s.label("lineage") == Some(lineage)));
    // And its instance, a fresh one here (no fork).
    let info = samples.iter().find(|s| s.name == "ferry_info").unwrap();
    let instance = info
        .label("instance")
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(instance.len(), 32, "{metrics}");
    assert!(table.contains(&format!("instance {instance})")), "{table}");
    let no_fork = format!("\"instance\": \"{instance}\", \"fork\": null");
    assert!(json.contains(&no_fork), "{json}");

    // The follower's own view, with the lineage its copy records.
    let mine = status_until(
        &follower_http,
        &[],
        &["connected: yes", "initial sync done: yes"],
    );
    assert!(mine.contains("written: position 100000"), "{mine}");
    assert!(mine.contains(&format!("lineage {lineage}")), "{mine}");
    let json = ferry::http::get(&follower_http, "/status").unwrap();
    assert!(
        json.contains(&format!("\"lineage\": \"{lineage}\"")),
        "{json}"
    );
    assert!(ferry::http::get(&follower_http, "/nope").is_err());
}

/// Where acks wait on a machine short of CPUs: the leader's server thread (it sends to every
/// follower) reports its CPU time and how long it was runnable but waited for a CPU. Here
/// `ferry lead` shares its CPU with a thread that keeps it busy, so each time the server thread
/// wakes to send it waits: the wait shows in `/metrics`, `/status` and the table.
#[test]
fn the_leader_reports_how_long_its_server_thread_waited_for_a_cpu() {
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    for i in 0..8 {
        write(&ld.join(format!("q/seg{i}")), &pattern(4 << 20, i as u8));
    }
    let busy = std::sync::Arc::new(AtomicBool::new(true));
    let spinner = {
        let busy = busy.clone();
        std::thread::spawn(move || {
            on_cpu_0().unwrap();
            while busy.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let mut cmd = lead_cmd(&env, &ld, "uring");
    cmd.args(["--http", "127.0.0.1:0"]);
    // SAFETY: between fork and exec only sched_setaffinity runs (async-signal-safe).
    unsafe { cmd.pre_exec(on_cpu_0) };
    let leader = Proc::spawn(cmd);
    let http = http_addr(&leader);
    let follower = Proc::spawn(follow_cmd(&env, &fd, listen_addr(&leader), "uring"));
    wait_identical(&ld, &fd, Duration::from_secs(60));
    busy.store(false, Ordering::Relaxed);
    spinner.join().unwrap();

    let metrics = ferry::http::get(&http, "/metrics").unwrap();
    let samples = parse_prometheus(&metrics);
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .value
    };
    let cpu_s = value("ferry_leader_thread_cpu_seconds_total");
    let wait_s = value("ferry_leader_thread_cpu_wait_seconds_total");
    assert!(cpu_s > 0.0, "{metrics}");
    assert!(wait_s > 0.0, "{metrics}");
    let json = status_until(&http, &["--json"], &["\"server_thread\": {\"cpu_s\": "]);
    assert!(json.contains("\"cpu_wait_s\": "), "{json}");
    status_until(&http, &[], &["server thread: ", " s waiting for a CPU"]);
    drop(follower);
}

#[test]
fn under_systemd_the_leader_reports_ready_and_feeds_the_watchdog() {
    let env = Env::new();
    let systemd = NotifySocket::bind(&env, "notify.sock");
    let mut cmd = ferry();
    cmd.args(["lead", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(env.dir("leader"))
        .arg("--secret-file")
        .arg(&env.secret_file);
    systemd.configure(&mut cmd);
    let _leader = Proc::spawn(cmd);
    let ready = systemd.wait_for("READY=1");
    assert!(ready.contains("STATUS=leading"), "{ready}");
    systemd.wait_for("WATCHDOG=1");
}

/// A TCP health check on the replication port (connect, then close) is nobody's follower: the
/// leader's log has no line for it at `info`, while a follower is logged as it authenticates.
#[test]
fn a_health_check_on_the_replication_port_leaves_no_line_in_the_log() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("seg"), &pattern(1000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let check = std::net::TcpStream::connect(leader.addr).unwrap();
    let check_addr = check.local_addr().unwrap().to_string();
    drop(check);
    let _follower = Proc::spawn(follow_cmd(&env, &fd, leader.addr, "fallback"));
    wait_identical(&ld, &fd, Duration::from_secs(20));
    // The health check's connection was accepted and closed before the follower's.
    leader
        .proc
        .wait_log(" connected from 127.0.0.1:", Duration::from_secs(20));
    let log = leader.proc.log_text();
    assert!(!log.contains(&check_addr), "{check_addr}: {log}");
}

/// The example an operator copies to /etc/ferry names only settings each subcommand knows.
#[test]
fn the_example_config_in_contrib_is_accepted_by_every_subcommand() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ferry.toml");
    for sub in ["lead", "follow", "node", "handoff", "cluster"] {
        let out = ferry()
            .args([sub, "--help", "--config"])
            .arg(&example)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let env = Env::new();
    let (ld, fd, other) = (env.dir("leader"), env.dir("follower"), env.dir("other"));
    write(&ld.join("seg"), b"from the config file");
    let leader = start_leader(&env, &ld, "fallback");
    let config = env.tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "# a follower's settings\nsecret_file = \"{}\"\n[follow]\ndata_dir = \"{}\"\nleader = \"{}\"\nonce = true\ndurability = \"written\"\n",
            env.secret_file.display(),
            other.display(),
            leader.addr
        ),
    )
    .unwrap();
    // The file gives everything but the data dir, which the environment overrides.
    let mut cmd = ferry();
    cmd.arg("follow")
        .arg("--config")
        .arg(&config)
        .env("FERRY_DATA_DIR", &fd);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checksum(&ld), checksum(&fd));
    assert_eq!(checksum(&other), "", "the environment won over the file");
    // A flag wins over both.
    let flagged = env.dir("flagged");
    let mut cmd = ferry();
    cmd.args(["follow", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&flagged)
        .env("FERRY_DATA_DIR", &fd);
    assert!(run_bounded(cmd, Duration::from_secs(60)).status.success());
    assert_eq!(checksum(&ld), checksum(&flagged));
    // An unknown key is refused, naming it.
    std::fs::write(&config, "listen_adress = \"127.0.0.1:1\"\n").unwrap();
    let out = ferry()
        .args(["lead", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown key `listen-adress`"), "{stderr}");
}

/// A pseudo-terminal: (master, slave).
fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into our locals; null name, termios and winsize are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created by openpty and are owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn a_full_sync_draws_a_progress_bar_on_a_terminal_and_logs_lines_otherwise() {
    use std::io::Read;
    let env = Env::new();
    let ld = env.dir("leader");
    for i in 0..8u8 {
        write(&ld.join(format!("seg{i}")), &pattern(4_000_000, i));
    }
    let leader = start_leader(&env, &ld, "fallback");

    // On a terminal: a bar redrawn in place with carriage returns, and a final "done".
    let (master, slave) = openpty();
    let mut cmd = follow_cmd(&env, &env.dir("tty"), leader.addr, "fallback");
    cmd.arg("--once").stderr(std::process::Stdio::from(slave));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // closes our copy of the slave: reads see EIO once the child exits
    let mut screen = Vec::new();
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => screen.extend_from_slice(&buf[..n]),
        }
    }
    assert!(child.wait().unwrap().success());
    let screen = String::from_utf8_lossy(&screen);
    assert!(screen.contains("\r["), "no bar drawn in place:\n{screen}");
    assert!(screen.contains("ETA"), "{screen}");
    assert!(screen.contains("(8 files in the index)"), "{screen}");
    assert!(
        screen.contains(&format!("[{}] done", "#".repeat(30))),
        "no finished bar:\n{screen}"
    );

    // Not a terminal: log lines, no carriage returns.
    let out = follow_once(&env, &env.dir("pipe"), leader.addr, "fallback");
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INFO initial sync: "), "{log}");
    assert!(!log.contains('\r'), "a bar was drawn into a pipe:\n{log}");
}

#[test]
fn the_leader_logs_a_follower_that_starts_lagging_and_one_that_catches_up() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("seg"), &pattern(10_000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let follower = start_follower(&env, &fd, leader.addr, "fallback", "written");
    leader
        .proc
        .wait_log("is in sync: streaming", Duration::from_secs(20));
    stop_process(&follower.child);
    write(&ld.join("seg2"), &pattern(100_000, 2));
    let line = leader.proc.wait_log("is lagging", Duration::from_secs(20));
    assert!(line.contains("bytes behind at written, last ack"), "{line}");
    signal(&follower.child, libc::SIGCONT);
    leader
        .proc
        .wait_log("caught up: streaming again", Duration::from_secs(20));
    wait_identical(&ld, &fd, Duration::from_secs(20));
}

/// `--tcp-congestion` names an algorithm this kernel may not have: `ferry lead` refuses to
/// start, naming it and where the available ones are listed, rather than serving with another.
#[test]
fn an_unavailable_congestion_control_is_refused_naming_it() {
    let env = Env::new();
    let ld = env.dir("leader");
    let mut cmd = lead_cmd(&env, &ld, "fallback");
    cmd.args(["--tcp-congestion", "no-such-cc"]);
    refused_naming_no_such_cc(cmd);
}

/// `ferry node` leads only once elected, maybe hours later: a congestion control it could not
/// use is refused at start, before it goes near etcd, not when it wins an election.
#[test]
fn a_node_refuses_an_unavailable_congestion_control_at_start() {
    let env = Env::new();
    let mut cmd = ferry();
    cmd.arg("node")
        .arg("--data-dir")
        .arg(env.dir("node"))
        // Nothing listens here: the node must fail before it tries.
        .args(["--etcd", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"])
        .args([
            "--advertise",
            "127.0.0.1:1",
            "--tcp-congestion",
            "no-such-cc",
        ])
        .arg("--secret-file")
        .arg(&env.secret_file);
    let stderr = refused_naming_no_such_cc(cmd);
    assert!(!stderr.contains("etcd"), "it went to etcd first: {stderr}");
}

/// Runs `cmd`, asserts that it failed naming the congestion control `no-such-cc` and where the
/// available ones are listed, and returns its stderr.
fn refused_naming_no_such_cc(cmd: std::process::Command) -> String {
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("no-such-cc") && stderr.contains("tcp_available_congestion_control"),
        "{stderr}"
    );
    stderr
}

/// An operator can tell which TCP congestion control the leader sends with, and whether it was
/// asked for or is the system's: in the line it logs at start, in `/status` and in `ferry_info`.
/// BBR gets a line of its own where the default qdisc is not fq, since without fq it costs CPU
/// and throughput (README).
#[test]
fn the_leader_reports_the_congestion_control_it_sends_with() {
    let env = Env::new();
    let ld = env.dir("leader");
    let mut cmd = lead_cmd(&env, &ld, "fallback");
    // reno is built into every kernel.
    cmd.args(["--tcp-congestion", "reno", "--http", "127.0.0.1:0"]);
    let leader = Proc::spawn(cmd);
    leader.wait_log(
        "with the fallback engine, TCP congestion control reno (asked for)",
        Duration::from_secs(20),
    );
    let http = http_addr(&leader);
    status_until(&http, &["--json"], &["\"tcp_congestion\": \"reno\""]);
    status_until(&http, &[], &["leader (fallback engine, TCP reno, lineage "]);
    let metrics = ferry::http::get(&http, "/metrics").unwrap();
    assert!(
        parse_prometheus(&metrics)
            .iter()
            .any(|s| s.name == "ferry_info" && s.label("tcp_congestion") == Some("reno")),
        "{metrics}"
    );
    assert!(
        !leader.log_text().contains("fq qdisc"),
        "{}",
        leader.log_text()
    );
    drop(leader);

    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    let leader = Proc::spawn(lead_cmd(&env, &ld, "fallback"));
    leader.wait_log(
        &format!(
            "TCP congestion control {} (the system's default)",
            system.trim()
        ),
        Duration::from_secs(20),
    );
    drop(leader);

    let available =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap();
    // Where bbr is a module not loaded yet, the leader would refuse it (tested above).
    if available.split_whitespace().any(|n| n == "bbr") {
        let mut cmd = lead_cmd(&env, &ld, "fallback");
        cmd.args(["--tcp-congestion", "bbr"]);
        let leader = Proc::spawn(cmd);
        let line = leader.wait_log("TCP congestion control bbr", Duration::from_secs(20));
        assert!(line.contains("(asked for)"), "{line}");
        // Where new interfaces get fq, an operator set bbr up with it: no line then.
        let qdisc = std::fs::read_to_string("/proc/sys/net/core/default_qdisc").unwrap();
        if qdisc.trim() != "fq" {
            let hint = leader.wait_log("fq qdisc", Duration::from_secs(20));
            assert!(
                hint.contains("--tcp-congestion cubic") && hint.contains(qdisc.trim()),
                "{hint}"
            );
        }
    }
}

/// A port still held for a moment (a leader killed with SIGKILL on io_uring keeps its
/// listening socket until its ring is torn down, about 30 ms here) is waited for, with a line
/// saying so; one held for longer than `LISTEN_RETRY_MS` is an error naming the address.
#[test]
fn a_leader_waits_briefly_for_a_port_still_in_use_and_names_it_if_it_stays_so() {
    let env = Env::new();
    let dir = env.dir("leader");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let lead = |env: &Env| {
        let mut cmd = ferry();
        cmd.args(["lead", "--listen", &addr, "--data-dir"])
            .arg(&dir)
            .arg("--secret-file")
            .arg(&env.secret_file);
        cmd
    };
    let out = run_bounded(lead(&env), Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );

    let leader = Proc::spawn(lead(&env));
    leader.wait_log("in use; trying again", Duration::from_secs(10));
    drop(taken);
    leader.wait_log("listening on", Duration::from_secs(10));
}

/// Where the host refuses io_uring (Docker's default seccomp profile does on many hosts),
/// `ferry lead` and `ferry follow` started without `--io-engine` say why in a warning, run the
/// fallback engine (as the start line and `/status` show) and replicate, the initial sync and
/// streaming alike; asked for io_uring there, each refuses to start and names the cause.
#[test]
fn where_seccomp_refuses_io_uring_ferry_falls_back_and_says_why() {
    use std::os::unix::process::CommandExt;

    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(3 << 20, 7));
    write(&ld.join("meta.json"), b"{\"v\":1}");
    let refused = |cmd: &mut std::process::Command| {
        // SAFETY: between fork and exec only prctl runs (async-signal-safe), on a filter
        // built on the child's stack.
        unsafe { cmd.pre_exec(refuse_io_uring) };
    };
    let mut cmd = ferry();
    cmd.args(["lead", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&ld)
        .arg("--secret-file")
        .arg(&env.secret_file);
    refused(&mut cmd);
    let leader = Proc::spawn(cmd);
    let because = "io_uring is not usable (io_uring_setup failed: Operation not permitted";
    let warning = leader.wait_log(because, Duration::from_secs(20));
    assert!(warning.contains("using the fallback engine"), "{warning}");
    leader.wait_log("with the fallback engine", Duration::from_secs(20));
    let http = http_addr(&leader);
    status_until(&http, &["--json"], &["\"engine\": \"fallback\""]);

    let mut cmd = ferry();
    cmd.arg("follow")
        .arg("--data-dir")
        .arg(&fd)
        .arg("--leader")
        .arg(listen_addr(&leader).to_string())
        .arg("--secret-file")
        .arg(&env.secret_file);
    refused(&mut cmd);
    let follower = Proc::spawn(cmd);
    follower.wait_log(because, Duration::from_secs(20));
    follower.wait_log("with the fallback engine", Duration::from_secs(20));
    wait_identical(&ld, &fd, Duration::from_secs(60));
    // Streaming: an append and a rewrite reach the follower while both stay on the fallback.
    append(&ld.join("q/seg"), &pattern(100_000, 8));
    write(&ld.join("meta.json"), b"{\"v\":2}");
    wait_identical(&ld, &fd, Duration::from_secs(60));
    drop(follower);
    drop(leader);

    // Asked for io_uring where it is refused: no start, and the reason.
    let (other, other_follower) = (env.dir("other"), env.dir("other-follower"));
    let mut cmd = lead_cmd(&env, &other, "uring");
    refused(&mut cmd);
    let out = run_bounded(cmd, Duration::from_secs(20));
    failed_saying(
        &out,
        &["--io-engine uring was asked for, but io_uring_setup failed: Operation not permitted"],
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = follow_cmd(&env, &other_follower, taken.local_addr().unwrap(), "uring");
    refused(&mut cmd);
    let out = run_bounded(cmd, Duration::from_secs(20));
    failed_saying(
        &out,
        &["--io-engine uring was asked for, but io_uring_setup failed"],
    );
}

/// `ferry lead` in a user namespace of its own whose inotify watch limit
/// (`/proc/sys/user/max_inotify_watches`) is `limit`, so that nothing else here is limited.
fn lead_with_watch_limit(env: &Env, dir: &std::path::Path, limit: u32) -> std::process::Command {
    lead_with_inotify_limit(env, dir, "max_inotify_watches", limit)
}

/// `ferry lead` in a user namespace of its own whose `/proc/sys/user/{name}` is `limit`.
fn lead_with_inotify_limit(
    env: &Env,
    dir: &std::path::Path,
    name: &str,
    limit: u32,
) -> std::process::Command {
    let mut cmd = ferry_with_user_limit(name, limit);
    cmd.args(["lead", "--listen", "127.0.0.1:0", "--io-engine", "fallback"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--secret-file")
        .arg(&env.secret_file);
    cmd
}

/// A data dir of `dirs` directories with a file each.
fn queue_dirs(root: &std::path::Path, from: usize, dirs: usize) {
    for i in from..from + dirs {
        write(&root.join(format!("q{i}/seg")), &pattern(1000 + i, i as u8));
    }
}

/// `ferry lead` watches every directory of its data dir with inotify. Where the watch limit
/// leaves some unwatched, it refuses to start and says which limit to raise, instead of
/// serving part of the dir as if it were all of it (before, the directories past the limit were
/// skipped without a word, and the files found in them at start were reported gone: a
/// follower deleted them).
#[test]
fn a_leader_that_cannot_watch_every_directory_refuses_to_start_and_names_the_limit() {
    let env = Env::new();
    let ld = env.dir("leader");
    queue_dirs(&ld, 0, 30);
    let out = run_bounded(
        lead_with_watch_limit(&env, &ld, 10),
        Duration::from_secs(20),
    );
    let stderr = failed_saying(
        &out,
        &["the inotify watch limit is reached", "max_user_watches"],
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
}

/// The other inotify limit, on instances (one per `ferry lead`), named likewise.
#[test]
fn a_leader_that_cannot_have_an_inotify_instance_names_the_limit() {
    let env = Env::new();
    let ld = env.dir("leader");
    queue_dirs(&ld, 0, 1);
    let cmd = lead_with_inotify_limit(&env, &ld, "max_inotify_instances", 0);
    let out = run_bounded(cmd, Duration::from_secs(20));
    failed_saying(
        &out,
        &["the inotify instance limit (sysctl fs.inotify.max_user_instances"],
    );
}

/// The same limit reached while serving, by directories the application creates: the leader
/// says so and stops (exit non-zero) rather than go on without seeing what is written under
/// them; the follower keeps every file it held.
#[test]
fn a_leader_that_cannot_watch_a_new_directory_stops_and_says_why() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    queue_dirs(&ld, 0, 30);
    // The root and 30 directories take 31 watches.
    let mut leader = Proc::spawn(lead_with_watch_limit(&env, &ld, 40));
    let follower = Proc::spawn(follow_cmd(&env, &fd, listen_addr(&leader), "fallback"));
    wait_identical(&ld, &fd, Duration::from_secs(30));
    queue_dirs(&ld, 30, 12);
    let line = leader.wait_log(
        "the inotify watch limit is reached",
        Duration::from_secs(20),
    );
    assert!(line.contains("cannot watch"), "{line}");
    let status = exit_within(&mut leader, Duration::from_secs(20));
    assert!(!status.success(), "{}", leader.log_text());
    // Its record could vouch for a file changed after the watcher stopped: none is written.
    leader.wait_log("not recording instance", Duration::from_secs(1));
    drop(follower);
    for i in 0..30 {
        let held = std::fs::read(fd.join(format!("q{i}/seg"))).unwrap();
        assert_eq!(held, pattern(1000 + i, i as u8), "q{i}/seg");
    }
}

/// The same for a directory the leader may not read (here `ferry lead` runs as nobody beside a
/// directory only root may list): at start it refuses to start, and while serving it stops,
/// naming the directory and the cause either way, rather than serve the data dir without it.
#[test]
fn a_leader_that_may_not_read_a_directory_refuses_to_serve_and_names_it() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::os::unix::process::CommandExt;

    if !running_as_root("running as another user needs root") {
        return;
    }
    let env = Env::new();
    let ld = env.dir("leader");
    queue_dirs(&ld, 0, 3);
    let private = ld.join("q1");
    let nobody = 65534;
    for path in [env.tmp.path(), &env.secret_file] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for entry in walk_all(&ld) {
        std::os::unix::fs::chown(&entry, Some(nobody), Some(nobody)).unwrap();
    }
    std::os::unix::fs::chown(&private, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = lead_cmd(&env, &ld, "fallback");
    cmd.uid(nobody).gid(nobody);
    let out = run_bounded(cmd, Duration::from_secs(20));
    failed_saying(
        &out,
        &[&format!("{}: Permission denied", private.display())],
    );

    // Made while it serves: the watcher stops, naming it, and so does the leader.
    std::fs::remove_dir_all(&private).unwrap();
    let mut cmd = lead_cmd(&env, &ld, "fallback");
    cmd.uid(nobody).gid(nobody);
    let mut leader = Proc::spawn(cmd);
    listen_addr(&leader);
    // Made private as it is made: a moment readable would let the watcher in.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .unwrap();
    let line = leader.wait_log("the watcher of", Duration::from_secs(20));
    assert!(
        line.contains(&format!(
            "cannot watch {}: Permission denied",
            private.display()
        )),
        "{line}"
    );
    let status = exit_within(&mut leader, Duration::from_secs(20));
    assert!(!status.success(), "{}", leader.log_text());
}

/// A data dir moved away while it is served (`mv DIR DIR.old` and a new DIR made, as a broker
/// reset may do): the leader would go on serving the old directory and never see a file of the
/// new one, while its followers looked in sync. It stops, naming the move, and exits non-zero
/// (a service manager starts it again on the new DIR); the follower keeps every file.
#[test]
fn a_leader_whose_data_dir_is_moved_away_stops_and_says_why() {
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    let mut leader = start_leader(&env, &ld, "fallback");
    let follower = Proc::spawn(follow_cmd(&env, &fd, leader.addr, "fallback"));
    wait_identical(&ld, &fd, Duration::from_secs(30));
    let old = env.tmp.path().join("leader.old");
    std::fs::rename(&ld, &old).unwrap();
    write(&ld.join("q/seg"), &pattern(500, 2));
    let line = leader
        .proc
        .wait_log("the watcher of", Duration::from_secs(20));
    assert!(line.contains("was moved away"), "{line}");
    let status = exit_within(&mut leader.proc, Duration::from_secs(20));
    assert!(!status.success(), "{}", leader.proc.log_text());
    drop(follower);
    assert_eq!(std::fs::read(fd.join("q/seg")).unwrap(), pattern(10_000, 1));
}

/// The same for a filesystem mounted over the data dir while it is served (here a tmpfs; as
/// well a data disk mounted late, over the directory the leader started on): nothing in the
/// old directory tells, so the leader looks at what its path names every second.
#[test]
fn a_leader_whose_data_dir_is_mounted_over_stops_and_says_why() {
    if !running_as_root("mounting needs root") {
        return;
    }
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    let mut leader = start_leader(&env, &ld, "fallback");
    let _mounted = Mount::tmpfs(&ld);
    let line = leader
        .proc
        .wait_log("the watcher of", Duration::from_secs(20));
    assert!(
        line.contains("is no longer the directory ferry started on"),
        "{line}"
    );
    let status = exit_within(&mut leader.proc, Duration::from_secs(20));
    assert!(!status.success(), "{}", leader.proc.log_text());
}

/// A follower's data dir mounted over while it follows (a data disk mounted after ferry
/// started, a unit without `RequiresMountsFor=`): its writes and acks would go on into the
/// hidden directory, and a node elected later would serve what the mount holds. It stops,
/// naming the cause, and exits non-zero.
#[test]
fn a_follower_whose_data_dir_is_mounted_over_stops_and_says_why() {
    if !running_as_root("mounting needs root") {
        return;
    }
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &pattern(10_000, 1));
    let leader = start_leader(&env, &ld, "fallback");
    let mut follower = Proc::spawn(follow_cmd(&env, &fd, leader.addr, "fallback"));
    wait_identical(&ld, &fd, Duration::from_secs(30));
    let _mounted = Mount::tmpfs(&fd);
    // The application goes on appending: the follower looks at its path as it applies them.
    let mut seg = std::fs::OpenOptions::new()
        .append(true)
        .open(ld.join("q/seg"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = follower.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{}", follower.log_text());
        std::io::Write::write_all(&mut seg, &pattern(1000, 3)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{}", follower.log_text());
    let log = follower.log_text();
    assert!(
        log.contains(&format!(
            "{} is no longer the directory ferry started on",
            fd.display()
        )),
        "{log}"
    );
}

/// Whether this test runs as root; if not, says that it is skipped, and why (`needs`).
fn running_as_root(needs: &str) -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: {needs}");
    }
    root
}

/// A tmpfs mounted at a path, unmounted when dropped (a failed test leaves no mount behind).
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &std::path::Path) -> Mount {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount {}", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// `root` and everything under it.
fn walk_all(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() {
            for entry in std::fs::read_dir(&out[i]).unwrap() {
                out.push(entry.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// `ferry lead` serves a directory that exists: a mistyped --data-dir, or a mount point whose
/// disk is gone with its directory, is an error naming it, and nothing is created there (an
/// empty dir served would have followers delete their copies). An existing empty dir is served
/// (a broker's first start), with a warning that says what followers will make of it.
#[test]
fn a_leader_refuses_a_missing_data_dir_and_warns_of_an_empty_one() {
    let env = Env::new();
    let missing = env.tmp.path().join("no-such-dir");
    let out = run_bounded(
        lead_cmd(&env, &missing, "fallback"),
        Duration::from_secs(20),
    );
    failed_saying(&out, &[&format!("{} does not exist", missing.display())]);
    assert!(!missing.exists(), "the leader made the directory");

    let empty = env.dir("empty");
    let leader = Proc::spawn(lead_cmd(&env, &empty, "fallback"));
    let line = leader.wait_log("is empty", Duration::from_secs(20));
    assert!(line.contains("not mounted"), "{line}");
    listen_addr(&leader);
}

/// The handshake's tags are over nonces anyone watching the network sees, so a short secret
/// can be guessed offline from one handshake: ferry says so when the secret is under 16 bytes,
/// and not for a longer one.
#[test]
fn a_short_secret_is_warned_about() {
    let env = Env::new();
    let ld = env.dir("leader");
    let short = env.tmp.path().join("short-secret");
    std::fs::write(&short, "abc\n").unwrap();
    let leader = Proc::spawn(lead_with_secret_cmd(&ld, "127.0.0.1:0", &short));
    let line = leader.wait_log("the shared secret is 3 bytes", Duration::from_secs(20));
    assert!(line.contains("offline") && line.contains("16"), "{line}");
    drop(leader);

    let leader = Proc::spawn(lead_cmd(&env, &ld, "fallback"));
    listen_addr(&leader);
    assert!(
        !leader.log_text().contains("the shared secret is"),
        "{}",
        leader.log_text()
    );
}

/// A secret file that every user of the machine may read (or change) lets any of them join as
/// a follower or pose as the leader: ferry names the file and the fix, and says nothing for a
/// file only its owner (and group) may read.
#[test]
fn a_secret_file_every_user_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let ld = env.dir("leader");
    let secret = env.tmp.path().join("open-secret");
    std::fs::write(&secret, "a secret of more than sixteen bytes\n").unwrap();
    for (mode, warned) in [(0o644, true), (0o640, false)] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let leader = Proc::spawn(lead_with_secret_cmd(&ld, "127.0.0.1:0", &secret));
        listen_addr(&leader);
        let log = leader.log_text();
        let line = log.lines().find(|l| l.contains("every user"));
        match (line, warned) {
            (Some(line), true) => assert!(
                line.contains(&secret.display().to_string())
                    && line.contains("644")
                    && line.contains("chmod 600"),
                "{line}"
            ),
            (None, false) => {}
            _ => panic!(
                "mode {mode:o}: warned {}, expected {warned}:\n{log}",
                !warned
            ),
        }
    }
}

/// The shared secret of `ferry lead` and `ferry follow` is rotated with no restart: each reads
/// its secret files again on SIGHUP (as `systemctl reload` sends it). The leader given the new
/// secret and the old one as previous accepts both; the follower given the new one keeps its
/// connection; once the leader's previous-secret file is gone and it is reloaded again, it
/// closes that connection, made with the old secret, and the follower reconnects at once with
/// the new one and goes on. The old secret no longer gets in.
#[test]
fn lead_and_follow_read_their_secrets_again_on_sighup() {
    let env = Env::new();
    let (dir, copy) = (env.dir("leader"), env.dir("copy"));
    write(&dir.join("seg"), &pattern(20_000, 1));
    let keys = env.dir("keys");
    let (secret, previous, follower_secret) = (
        keys.join("secret"),
        keys.join("previous"),
        keys.join("follower"),
    );
    let old = "the secret before the rotation";
    let new = "the secret after the rotation!";
    write(&secret, old.as_bytes());
    write(&follower_secret, old.as_bytes());
    let mut cmd = lead_with_secret_cmd(&dir, "127.0.0.1:0", &secret);
    cmd.arg("--previous-secret-file").arg(&previous);
    let mut leader = Proc::spawn(cmd);
    let addr = listen_addr(&leader);
    let cmd = follow_with_secret_cmd(&copy, &addr.to_string(), &follower_secret);
    let follower = Proc::spawn(cmd);
    wait_identical(&dir, &copy, Duration::from_secs(20));

    // The rotation starts: the leader holds both.
    write(&secret, new.as_bytes());
    write(&previous, old.as_bytes());
    leader.reload("a previous one accepted too");
    write(&follower_secret, new.as_bytes());
    let from_f = follower.log_len();
    follower.reload("new shared secret read");
    for (name, text) in [("with-old", old), ("with-new", new)] {
        let file = keys.join(name);
        write(&file, text.as_bytes());
        let out = follow_once_with_secret(&env.dir(name), &addr.to_string(), &file);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // It ends.
    std::fs::remove_file(&previous).unwrap();
    leader.reload("only the current one accepted");
    follower.wait_log_since(from_f, "reconnecting with it", Duration::from_secs(10));
    write(&dir.join("seg2"), &pattern(30_000, 2));
    wait_identical(&dir, &copy, Duration::from_secs(20));
    let out = follow_once_with_secret(
        &env.dir("old-again"),
        &addr.to_string(),
        &keys.join("with-old"),
    );
    failed_saying(&out, &["wrong secret"]);
    // Neither stopped on SIGHUP.
    assert!(
        leader.child.try_wait().unwrap().is_none(),
        "{}",
        leader.log_text()
    );
}

/// An outside follower reloaded with the new secret before its leader, the old one kept as its
/// previous (`--previous-secret-file`), goes on following whatever the order of the reloads:
/// refused with the new secret on a reconnect, it authenticates with its previous one.
#[test]
fn a_follower_reloaded_before_its_leader_follows_with_its_previous_secret() {
    let env = Env::new();
    let (dir, copy) = (env.dir("leader"), env.dir("copy"));
    write(&dir.join("seg"), &pattern(20_000, 1));
    let keys = env.dir("keys");
    let (secret, previous) = (keys.join("secret"), keys.join("previous"));
    let (follower_secret, follower_previous) = (keys.join("follower"), keys.join("f-previous"));
    let old = "the secret before the rotation";
    let new = "the secret after the rotation!";
    write(&secret, old.as_bytes());
    write(&follower_secret, old.as_bytes());
    let addr = format!("127.0.0.1:{}", free_port());
    let lead = || {
        let mut cmd = lead_with_secret_cmd(&dir, &addr, &secret);
        cmd.arg("--previous-secret-file").arg(&previous);
        let leader = Proc::spawn(cmd);
        leader.wait_log("listening", Duration::from_secs(20));
        leader
    };
    let mut leader = lead();
    let mut cmd = follow_with_secret_cmd(&copy, &addr, &follower_secret);
    cmd.arg("--previous-secret-file").arg(&follower_previous);
    let mut follower = Proc::spawn(cmd);
    wait_identical(&dir, &copy, Duration::from_secs(20));

    // The follower takes the new secret first, the old one as its previous.
    write(&follower_secret, new.as_bytes());
    write(&follower_previous, old.as_bytes());
    let from_f = follower.log_len();
    follower.reload("new shared secret read");
    // Its connection ends before the leader is reloaded (here a restart, on the old secret):
    // refused with the new secret, it follows with the old one.
    signal(&leader.child, libc::SIGTERM);
    assert!(exit_within(&mut leader, Duration::from_secs(20)).success());
    leader = lead();
    follower.wait_log_since(
        from_f,
        "trying its previous secret",
        Duration::from_secs(20),
    );
    write(&dir.join("seg2"), &pattern(30_000, 2));
    wait_identical(&dir, &copy, Duration::from_secs(20));

    // The leader's rotation, started and ended: cut off on the old secret, the follower
    // reconnects at once with the new one.
    write(&secret, new.as_bytes());
    write(&previous, old.as_bytes());
    leader.reload("a previous one accepted too");
    std::fs::remove_file(&previous).unwrap();
    let from_f = follower.log_len();
    leader.reload("only the current one accepted");
    follower.wait_log_since(from_f, "reconnecting with it", Duration::from_secs(10));
    write(&dir.join("seg3"), &pattern(40_000, 3));
    wait_identical(&dir, &copy, Duration::from_secs(20));
    assert!(
        follower.child.try_wait().unwrap().is_none(),
        "{}",
        follower.log_text()
    );
}
