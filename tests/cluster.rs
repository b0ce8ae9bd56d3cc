//! `ferry node` with a real etcd-server: one node leads, the others follow it; when the leader
//! is killed with SIGKILL another is elected, the rest re-point, and the old one rejoins.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The index of the node that logs being elected, waiting up to `timeout`.
fn wait_leader(nodes: &[&Node], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let leaders: Vec<usize> = (0..nodes.len())
            .filter(|&i| nodes[i].proc.log_text().contains("elected leader"))
            .collect();
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(leaders.len() < 2, "two leaders: {leaders:?}");
        assert!(
            Instant::now() < deadline,
            "no leader elected within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The in-sync replica set of these node ids as the leader writes it at `PREFIX/isr`.
fn isr_of(ids: &[&str]) -> String {
    let mut ids = ids.to_vec();
    ids.sort();
    ids.join(",")
}

#[test]
fn a_killed_leader_is_replaced_and_every_node_converges() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let nodes: Vec<Node> = (0..3)
        .map(|i| start_node(&env, &etcd.url, &env.dir(&format!("n{i}")), free_port()))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let first = wait_leader(&refs, Duration::from_secs(30));
    let others: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    for &i in &others {
        nodes[i].proc.wait_log(
            &format!("following the leader at {}", nodes[first].advertise),
            Duration::from_secs(20),
        );
    }
    write(&nodes[first].dir.join("q/seg"), &pattern(200_000, 1));
    for &i in &others {
        wait_identical(&nodes[first].dir, &nodes[i].dir, Duration::from_secs(20));
    }
    // Each node's --http reports its role.
    let role = |n: &Node| {
        let line = n
            .proc
            .wait_log("metrics on http://", Duration::from_secs(10));
        let addr = line
            .rsplit("http://")
            .next()
            .unwrap()
            .trim()
            .trim_end_matches("/metrics")
            .to_string();
        ferry::http::get(&addr, "/status").unwrap()
    };
    assert!(role(&nodes[first]).contains("\"role\": \"leader\""));
    assert!(role(&nodes[others[0]]).contains("\"role\": \"follower\""));

    // Only nodes in the in-sync replica set may take over: wait until both followers are in it.
    let mut all: Vec<String> = nodes.iter().map(|n| n.advertise.clone()).collect();
    all.sort();
    nodes[first].proc.wait_log(
        &format!("in-sync replica set: {}", all.join(",")),
        Duration::from_secs(20),
    );

    // While leading, it checkpoints its record (once its watcher can report what it queued).
    let line = nodes[first]
        .proc
        .wait_log("recorded instance", Duration::from_secs(20));
    assert!(line.contains("every checkpoint"), "{line}");
    assert!(nodes[first].dir.join(".ferry/leader").exists());

    // kill -9 the leader: another is elected, and the last one follows it.
    let mut nodes = nodes;
    let killed_at = Instant::now();
    let _ = nodes[first].proc.child.kill();
    let _ = nodes[first].proc.child.wait();
    // Serving means accepting replication connections: only a leader listens.
    let serving_s = loop {
        if others
            .iter()
            .any(|&i| std::net::TcpStream::connect(&nodes[i].advertise).is_ok())
        {
            break killed_at.elapsed().as_secs_f64();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no new leader serving 30 s after kill -9"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("new leader serving {serving_s:.2} s after kill -9");
    let survivors: Vec<&Node> = others.iter().map(|&i| &nodes[i]).collect();
    let second = others[wait_leader(&survivors, Duration::from_secs(30))];
    let third = *others.iter().find(|&&i| i != second).unwrap();
    nodes[third].proc.wait_log(
        &format!("following the leader at {}", nodes[second].advertise),
        Duration::from_secs(20),
    );
    write(&nodes[second].dir.join("q/seg2"), &pattern(50_000, 2));
    wait_identical(
        &nodes[second].dir,
        &nodes[third].dir,
        Duration::from_secs(20),
    );

    // The old leader comes back as a follower and converges.
    let back = start_node(&env, &etcd.url, &nodes[first].dir, nodes[first].port);
    back.proc.wait_log(
        &format!("following the leader at {}", nodes[second].advertise),
        Duration::from_secs(20),
    );
    wait_identical(&nodes[second].dir, &back.dir, Duration::from_secs(20));
    drop(etcd);
}

#[test]
fn a_leader_cut_off_from_etcd_is_fenced_within_the_lease_ttl_and_runs_its_hooks() {
    let env = Env::new();
    let mut etcd = start_etcd(&env.dir("etcd"));
    let port = free_port();
    let advertise = format!("127.0.0.1:{port}");
    let elected_marker = env.tmp.path().join("elected");
    let lost_marker = env.tmp.path().join("lost");
    let mut cmd = node_cmd(&etcd.url, &env.dir("n0"), &advertise);
    cmd.arg("--secret-file")
        .arg(&env.secret_file)
        .arg("--on-leader-elected")
        .arg(format!("touch {}", elected_marker.display()))
        .arg("--on-leader-lost")
        .arg(format!("touch {}", lost_marker.display()));
    let node = Proc::spawn(cmd);
    node.wait_log("elected leader", Duration::from_secs(30));
    node.wait_log("on-leader-elected hook ran", Duration::from_secs(10));
    assert!(elected_marker.exists());
    // Serving: a follower can sync from it.
    assert!(
        follow_once(&env, &env.dir("f"), advertise.parse().unwrap(), "fallback")
            .status
            .success()
    );

    let cut_at = Instant::now();
    let _ = etcd.proc.child.kill();
    let _ = etcd.proc.child.wait();
    node.wait_log("fenced", Duration::from_secs(10));
    let fenced_s = cut_at.elapsed().as_secs_f64();
    eprintln!("fenced {fenced_s:.2} s after etcd went away");
    assert!(
        fenced_s <= 2.5,
        "fenced after {fenced_s:.2} s, beyond the 2 s lease TTL"
    );
    node.wait_log("on-leader-lost hook ran", Duration::from_secs(10));
    assert!(lost_marker.exists());
    // No longer serving replication.
    wait_until(
        Duration::from_secs(10),
        "stopped listening after being fenced",
        || std::net::TcpStream::connect(&advertise).is_err(),
    );
}

#[test]
fn the_secret_can_live_in_etcd_and_a_diverged_copy_is_cut_back_with_a_log_line() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let spawn = |dir: &Path| {
        let advertise = format!("127.0.0.1:{}", free_port());
        let mut cmd = node_cmd(&etcd.url, dir, &advertise);
        cmd.arg("--secret-from-etcd");
        (Proc::spawn(cmd), advertise)
    };
    // B leads with a 100-byte segment; A comes back with the same 100 bytes plus 50 that B never
    // had (a former leader's unreplicated tail).
    let (b_dir, a_dir) = (env.dir("b"), env.dir("a"));
    let seg = pattern(150, 3);
    write(&b_dir.join("seg"), &seg[..100]);
    write(&a_dir.join("seg"), &seg);
    // As a former leader's: ferry's own dir is there (a leader makes it), so A follows into
    // its copy without --adopt.
    std::fs::create_dir_all(a_dir.join(".ferry")).unwrap();
    let (b, _) = spawn(&b_dir);
    b.wait_log("elected leader", Duration::from_secs(30));
    b.wait_log("shared secret created in etcd", Duration::from_secs(5));
    let (a, _) = spawn(&a_dir);
    a.wait_log("shared secret read from etcd", Duration::from_secs(30));
    a.wait_log(
        "discarding 50 bytes of seg beyond the leader's copy",
        Duration::from_secs(30),
    );
    wait_identical(&b_dir, &a_dir, Duration::from_secs(20));
}

#[test]
fn the_leader_keeps_the_in_sync_replica_set_in_etcd_and_drops_a_stopped_follower() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let nodes: Vec<Node> = (0..3)
        .map(|i| start_node(&env, &etcd.url, &env.dir(&format!("n{i}")), free_port()))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let leader = wait_leader(&refs, Duration::from_secs(30));
    let mut all: Vec<String> = nodes.iter().map(|n| n.advertise.clone()).collect();
    all.sort();
    nodes[leader].proc.wait_log(
        &format!("in-sync replica set: {}", all.join(",")),
        Duration::from_secs(20),
    );
    // Stop one follower: the leader marks it lagging and the ISR shrinks without it.
    let stopped = (0..3).find(|&i| i != leader).unwrap();
    stop_process(&nodes[stopped].proc.child);
    write(&nodes[leader].dir.join("seg"), &pattern(10_000, 4));
    let mut rest: Vec<String> = all
        .iter()
        .filter(|a| **a != nodes[stopped].advertise)
        .cloned()
        .collect();
    rest.sort();
    nodes[leader].proc.wait_log(
        &format!("in-sync replica set: {}", rest.join(",")),
        Duration::from_secs(20),
    );
    signal(&nodes[stopped].proc.child, libc::SIGCONT);
    // Back and caught up, it is in sync again.
    wait_identical(
        &nodes[leader].dir,
        &nodes[stopped].dir,
        Duration::from_secs(30),
    );
    drop(etcd);
}

/// Appends 4 KiB chunks to `seg` until `stop` exists, then creates `stopped` (the way an
/// application answers the on-leader-lost hook). Returns every byte it wrote.
fn writer_until_told(
    seg: PathBuf,
    stop: PathBuf,
    stopped: PathBuf,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        use std::io::Write;
        std::fs::create_dir_all(seg.parent().unwrap()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&seg)
            .unwrap();
        let mut all = Vec::new();
        let mut i = 0u32;
        while !stop.exists() {
            let chunk = pattern(4096, (i % 251) as u8);
            f.write_all(&chunk).unwrap();
            all.extend_from_slice(&chunk);
            i += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        std::fs::write(&stopped, b"").unwrap();
        all
    })
}

fn handoff(etcd: &str, to: Option<&str>) -> std::process::Output {
    let mut cmd = ferry();
    cmd.args(["handoff", "--etcd", etcd, "--timeout", "60"]);
    if let Some(to) = to {
        cmd.args(["--to", to]);
    }
    run_bounded(cmd, Duration::from_secs(90))
}

/// `handoff` to `to` on a thread of its own, for a test that acts while the leader hands off.
fn handoff_in_background(etcd: &str, to: &str) -> std::thread::JoinHandle<std::process::Output> {
    let (etcd, to) = (etcd.to_string(), to.to_string());
    std::thread::spawn(move || handoff(&etcd, Some(&to)))
}

/// The stdout of a command that must have succeeded.
fn stdout_of_success(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `ferry handoff` that must succeed; its stdout.
fn handoff_ok(etcd: &str, to: Option<&str>) -> String {
    stdout_of_success(handoff(etcd, to))
}

/// How many times the node logged being elected.
fn elections_won(n: &Node) -> usize {
    n.proc.log_text().matches("elected leader").count()
}

#[test]
fn handoff_moves_leadership_under_load_with_zero_loss_and_reports_the_pause() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let marker = |i: usize, what: &str| env.tmp.path().join(format!("n{i}.{what}"));
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let dir = env.dir(&format!("n{i}"));
            let port = free_port();
            let advertise = format!("127.0.0.1:{port}");
            let mut cmd = node_cmd(&etcd.url, &dir, &advertise);
            // The application stops writing when told, and the hook returns once it has.
            let hook = format!(
                "touch {} && while [ ! -e {} ]; do sleep 0.01; done",
                marker(i, "stop").display(),
                marker(i, "stopped").display()
            );
            cmd.arg("--secret-file")
                .arg(&env.secret_file)
                .arg("--on-leader-lost")
                .arg(hook);
            Node {
                proc: Proc::spawn(cmd),
                dir,
                port,
                advertise,
            }
        })
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let first = wait_leader(&refs, Duration::from_secs(30));
    let mut all: Vec<String> = nodes.iter().map(|n| n.advertise.clone()).collect();
    all.sort();
    let in_sync = format!("in-sync replica set: {}", all.join(","));
    nodes[first]
        .proc
        .wait_log(&in_sync, Duration::from_secs(20));

    // A target that is not in sync is refused with the reason, and the leader leads on.
    let refused = handoff(&etcd.url, Some("127.0.0.1:1"));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refused the handoff: no connected follower named 127.0.0.1:1 (followers: "),
        "{err}"
    );

    let writer = writer_until_told(
        nodes[first].dir.join("q/seg"),
        marker(first, "stop"),
        marker(first, "stopped"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let target = (0..3).find(|&i| i != first).unwrap();
    let third = (0..3).find(|&i| i != first && i != target).unwrap();
    let stdout = handoff_ok(&etcd.url, Some(&nodes[target].advertise));
    assert!(
        stdout.contains(&format!(
            "leadership moved from {} to {}: writer paused ",
            nodes[first].advertise, nodes[target].advertise
        )),
        "{stdout}"
    );
    eprintln!("{stdout}");
    let written = writer.join().unwrap();
    assert!(
        written.len() > 4096,
        "the writer wrote {} bytes",
        written.len()
    );
    // Zero loss: the moment the target leads, it holds every byte the application wrote.
    assert_eq!(
        std::fs::read(nodes[target].dir.join("q/seg")).unwrap(),
        written,
        "the new leader lacks bytes written before the handoff"
    );
    assert_eq!(elections_won(&nodes[target]), 1);
    // Only the named node took over, though the third was in sync and queued too.
    assert_eq!(elections_won(&nodes[third]), 0);
    for i in [first, third] {
        nodes[i].proc.wait_log(
            &format!("following the leader at {}", nodes[target].advertise),
            Duration::from_secs(20),
        );
    }
    write(&nodes[target].dir.join("q/after"), &pattern(10_000, 9));
    for i in [first, third] {
        wait_identical(&nodes[target].dir, &nodes[i].dir, Duration::from_secs(20));
    }

    // Without --to, leadership goes to an in-sync follower. (No application writes on the
    // target: its hook returns at once.)
    std::fs::write(marker(target, "stopped"), b"").unwrap();
    nodes[target]
        .proc
        .wait_log(&in_sync, Duration::from_secs(20));
    let stdout = handoff_ok(&etcd.url, None);
    assert!(
        stdout.contains(&format!(
            "leadership moved from {} to ",
            nodes[target].advertise
        )),
        "{stdout}"
    );
    drop(etcd);
}

/// The config of a node a test embeds (`Feed::Library`: the test writes and reports), on the
/// dir `embedded`, listening on 127.0.0.1:`port`.
fn embedded_node_config(env: &Env, etcd: &str, port: u16) -> ferry::cluster::NodeConfig {
    let advertise = format!("127.0.0.1:{port}");
    ferry::cluster::NodeConfig {
        data_dir: env.dir("embedded"),
        etcd: vec![etcd.to_string()],
        listen: advertise.parse().unwrap(),
        advertise,
        prefix: "ferry".into(),
        lease_ttl_s: 2,
        secret: ferry::auth::Secret::new(SECRET.as_bytes().to_vec()).unwrap(),
        previous_secret: None,
        secret_from_etcd: false,
        engine: Some(ferry::engine::EngineKind::Fallback),
        tcp_congestion: None,
        record_interval: Duration::from_secs(10),
        on_leader_elected: None,
        on_leader_lost: None,
        http: None,
        adopt: false,
        empty_wait: Duration::from_secs(ferry::cluster::EMPTY_WAIT_S_DEFAULT),
        leave_handoff_timeout: Duration::from_secs(ferry::cluster::LEAVE_HANDOFF_TIMEOUT_S_DEFAULT),
    }
}

/// Starts an embedded node fed by the test; its role events arrive on the receiver.
fn start_embedded_node(
    config: ferry::cluster::NodeConfig,
) -> (
    ferry::cluster::Node,
    std::sync::mpsc::Receiver<ferry::cluster::RoleEvent>,
) {
    let (events, roles) = std::sync::mpsc::channel();
    let on_role = Box::new(move |e| {
        let _ = events.send(e);
    });
    let node = ferry::cluster::Node::start(config, ferry::cluster::Feed::Library, on_role).unwrap();
    (node, roles)
}

/// An embedded node on 127.0.0.1:`port`, alone in the cluster, elected (its role events, and
/// the leader to report its writes to), and a `ferry node` following it, both in the in-sync
/// replica set: the other node may take over.
fn embedded_leader_and_a_follower(
    env: &Env,
    etcd: &str,
    port: u16,
) -> (
    ferry::cluster::Node,
    std::sync::mpsc::Receiver<ferry::cluster::RoleEvent>,
    std::sync::Arc<ferry::leader::Leader>,
    Node,
) {
    let (node, roles) = start_embedded_node(embedded_node_config(env, etcd, port));
    let Ok(ferry::cluster::RoleEvent::Elected(leader)) =
        roles.recv_timeout(Duration::from_secs(30))
    else {
        panic!("the first role event is not Elected");
    };
    let other = start_node(env, etcd, &env.dir("other"), free_port());
    other.proc.wait_log(
        &format!("following the leader at 127.0.0.1:{port}"),
        Duration::from_secs(20),
    );
    let both = isr_of(&[&format!("127.0.0.1:{port}"), &other.advertise]);
    wait_until(
        Duration::from_secs(20),
        "the ISR holding both nodes",
        || read_key(etcd, "ferry/isr").as_deref() == Some(both.as_str()),
    );
    (node, roles, leader, other)
}

#[test]
fn an_embedded_node_learns_its_role_through_callbacks_and_leaving_hands_off_at_once() {
    use ferry::cluster::RoleEvent;
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let port = free_port();
    let (node, roles, leader, other) = embedded_leader_and_a_follower(&env, &etcd.url, port);
    // The broker writes (no inotify here: Feed::Library) and tells the leader.
    let seg = pattern(100_000, 5);
    write(&env.dir("embedded").join("q/seg"), &seg);
    leader.register_file("q/seg", 0).unwrap();
    let position = leader.append("q/seg", 0, seg.len() as u64).unwrap();
    assert!(
        leader.wait_for(
            position,
            ferry::frame::Durability::Synced,
            1,
            Duration::from_secs(20)
        ),
        "not acked: {:?}\n{}",
        leader.followers(),
        other.proc.log_text()
    );
    assert_eq!(std::fs::read(other.dir.join("q/seg")).unwrap(), seg);

    // Leaving hands off to the in-sync node first (the embedder is told to stop writing),
    // then revokes the lease: the other node leads well before a 2 s lease could lapse.
    let left_at = Instant::now();
    let leave = std::thread::spawn(move || node.leave());
    match roles.recv_timeout(Duration::from_secs(10)).unwrap() {
        RoleEvent::Draining { to } => assert_eq!(to, other.advertise),
        _ => panic!("leaving did not start with a handoff's drain"),
    }
    assert!(matches!(
        roles.recv_timeout(Duration::from_secs(10)).unwrap(),
        RoleEvent::Lost
    ));
    assert!(
        leader.is_stopped(),
        "the embedder's leader still serves after Lost"
    );
    // A write the broker reports anyway is refused, not taken and shipped to no one.
    let late = leader
        .append("q/seg", seg.len() as u64, 1)
        .map_err(|e| e.to_string());
    assert!(
        late.as_ref().is_err_and(|e| e.contains("stopped")),
        "{late:?}"
    );
    leave.join().unwrap().unwrap();
    other
        .proc
        .wait_log("elected leader", Duration::from_secs(10));
    let took = left_at.elapsed();
    eprintln!(
        "the other node elected {:.2} s after leave()",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_millis(1500),
        "took {took:?}: as if the lease had to lapse"
    );

    // A leader with no follower to hand off to leaves at once, saying so.
    let mut other = other;
    signal(&other.proc.child, libc::SIGTERM);
    assert!(other.proc.child.wait().unwrap().success());
    let log = other.proc.log_text();
    assert!(
        log.contains(
            "leaving without a handoff: no connected follower to hand off to (followers: none)"
        ),
        "{log}"
    );
    drop(etcd);
}

/// A broker's segment preallocated beyond what it reported (a segment it maps and fills) is
/// cut to the reported length when its embedded leader hands off, and held when that node then
/// follows the target, where before the target had it hashed on both sides and then cut it
/// (`docs/PROTOCOL.md`, *Across a handoff*).
#[test]
fn an_embedded_leader_handing_off_cuts_its_preallocated_segment_and_holds_it() {
    use ferry::cluster::RoleEvent;
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let port = free_port();
    let (node, roles, leader, other) = embedded_leader_and_a_follower(&env, &etcd.url, port);
    // The broker preallocates a segment of 1 MiB, writes 100,000 bytes into it and reports them.
    let seg = pattern(100_000, 5);
    let path = env.dir("embedded").join("q/seg");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    file.write_all_at(&seg, 0).unwrap();
    drop(file);
    leader.register_file("q/seg", 0).unwrap();
    let position = leader.append("q/seg", 0, seg.len() as u64).unwrap();
    let synced = ferry::frame::Durability::Synced;
    assert!(leader.wait_for(position, synced, 1, Duration::from_secs(20)));

    let mark = other.proc.log_len();
    handoff_ok(&etcd.url, Some(&other.advertise));
    let following = loop {
        match roles.recv_timeout(Duration::from_secs(30)).unwrap() {
            RoleEvent::Following { leader } => break leader,
            RoleEvent::Draining { .. } | RoleEvent::Lost => continue,
            RoleEvent::Elected(_) => panic!("elected again"),
        }
    };
    assert_eq!(following, other.advertise);
    let line = other
        .proc
        .wait_log_since(mark, "files compared by digest", Duration::from_secs(30));
    eprintln!("{line}");
    assert!(line.contains("its inventory: 1 files held"), "{line}");
    assert!(line.contains(" 0 files compared by digest"), "{line}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        seg,
        "cut to what was reported"
    );
    drop((node, other, etcd));
}

#[test]
fn a_node_started_before_etcd_says_so_and_is_elected_once_etcd_is_up() {
    let env = Env::new();
    let etcd_port = free_port();
    let url = format!("http://127.0.0.1:{etcd_port}");
    let node = start_node(&env, &url, &env.dir("n0"), free_port());
    let line = node
        .proc
        .wait_log("cannot reach etcd at", Duration::from_secs(20));
    assert!(
        line.contains(&format!("cannot reach etcd at {url}: "))
            && line.contains("Connection refused")
            && line.contains("retrying in"),
        "{line}"
    );
    // The operator's commands say it too, in one line naming the cause.
    for args in [
        &["handoff"][..],
        &["cluster", "status"],
        &["cluster", "reset"],
    ] {
        let mut cmd = ferry();
        cmd.args(args).args(["--etcd", &url]);
        let out = run_bounded(cmd, Duration::from_secs(30));
        failed_saying(
            &out,
            &[&format!(
                "cannot reach etcd at {url}: Connection refused (os error 111)\n"
            )],
        );
    }
    let _etcd = start_etcd_on(&env.dir("etcd"), etcd_port);
    node.proc
        .wait_log("elected leader", Duration::from_secs(30));
}

#[test]
fn a_node_refused_by_the_leader_keeps_trying_instead_of_idling_until_the_leader_changes() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let leader = start_node(&env, &etcd.url, &env.dir("a"), free_port());
    leader
        .proc
        .wait_log("elected leader", Duration::from_secs(30));
    // Another node with the wrong secret: refused at every attempt, every 2 s. It says why
    // once, as an error; the retries that meet the same refusal are logged at debug, so a
    // node left misconfigured does not fill its log with the same error (at most once a
    // minute, which this test does not wait for).
    let wrong = env.tmp.path().join("wrong-secret");
    std::fs::write(&wrong, "not the cluster's secret").unwrap();
    let advertise = format!("127.0.0.1:{}", free_port());
    let mut cmd = node_cmd(&etcd.url, &env.dir("b"), &advertise);
    cmd.arg("--secret-file")
        .arg(&wrong)
        .env("RUST_LOG", "info,ferry::cluster=debug");
    let other = Proc::spawn(cmd);
    let line = other.wait_log("wrong secret", Duration::from_secs(20));
    assert!(line.contains("ERROR following stopped"), "{line}");
    let retried = format!("following {} again after it refused us", leader.advertise);
    wait_until(Duration::from_secs(20), "two retries", || {
        other.log_text().matches(&retried).count() >= 2
    });
    let log = other.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("following stopped"))
        .collect();
    assert!(refusals.len() >= 2, "{log}");
    assert!(refusals[0].contains("ERROR"), "{log}");
    assert!(refusals[1..].iter().all(|l| l.contains("DEBUG")), "{log}");
    assert_eq!(log.matches("ERROR").count(), 1, "{log}");
    drop(etcd);
}

/// A node elected while something else holds its --listen port cannot serve. It says so,
/// naming the address, resigns at once so that another node leads, and stays in the cluster
/// as a follower instead of exiting with its lease still holding the election. Alone, it is
/// elected again and fails the same way every 5 s: said once as an error (then once a
/// minute), the repeats at debug.
#[test]
fn an_elected_node_that_cannot_listen_resigns_and_follows_the_next_leader() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let a_port = free_port();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", a_port)).unwrap();
    let (a_dir, advertise) = (env.dir("a"), format!("127.0.0.1:{a_port}"));
    let mut cmd = node_cmd(&etcd.url, &a_dir, &advertise);
    cmd.arg("--secret-file")
        .arg(&env.secret_file)
        .env("RUST_LOG", "info,ferry::cluster=debug");
    let mut a = Node {
        proc: Proc::spawn(cmd),
        dir: a_dir,
        port: a_port,
        advertise,
    };
    let line = a.proc.wait_log("cannot lead", Duration::from_secs(20));
    assert!(
        line.contains(&a.advertise) && line.contains("resigning") && line.contains("ERROR"),
        "the error names the address and what the node does about it: {line}"
    );
    wait_until(Duration::from_secs(20), "a second failed election", || {
        a.proc.log_text().matches("cannot lead").count() >= 2
    });
    let log = a.proc.log_text();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("cannot lead")).collect();
    assert!(failures[1..].iter().all(|l| l.contains("DEBUG")), "{log}");
    let b = start_node(&env, &etcd.url, &env.dir("b"), free_port());
    b.proc.wait_log("elected leader", Duration::from_secs(20));
    a.proc.wait_log(
        &format!("following the leader at {}", b.advertise),
        Duration::from_secs(20),
    );
    write(&b.dir.join("q/seg"), &pattern(100_000, 3));
    wait_identical(&b.dir, &a.dir, Duration::from_secs(20));
    assert!(
        a.proc.child.try_wait().unwrap().is_none(),
        "the node that could not lead is still running"
    );
    drop(etcd);
}

/// A leading node whose watcher stops (here the application creates directories past the
/// inotify watch limit of the node's own user namespace) resigns at once rather than lead on
/// blind to what is written under them; another node is elected, and this one follows it.
#[test]
fn a_leading_node_that_cannot_watch_a_new_directory_resigns_for_another() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let a_dir = env.dir("a");
    for i in 0..5 {
        write(&a_dir.join(format!("q{i}/seg")), &pattern(1000, i as u8));
    }
    // The root and 5 directories take 6 watches of the 20.
    let advertise = format!("127.0.0.1:{}", free_port());
    let mut cmd = ferry_with_user_limit("max_inotify_watches", 20);
    node_args(&mut cmd, &etcd.url, &a_dir, &advertise);
    cmd.arg("--secret-file").arg(&env.secret_file);
    let a = Proc::spawn(cmd);
    a.wait_log("elected leader", Duration::from_secs(30));
    let b = start_node(&env, &etcd.url, &env.dir("b"), free_port());
    b.proc.wait_log(
        &format!("following the leader at {advertise}"),
        Duration::from_secs(20),
    );
    wait_identical(&a_dir, &b.dir, Duration::from_secs(20));

    for i in 5..25 {
        write(&a_dir.join(format!("q{i}/seg")), &pattern(1000, i as u8));
    }
    let line = a.wait_log("cannot lead on", Duration::from_secs(20));
    assert!(
        line.contains("the inotify watch limit is reached") && line.contains("resigning"),
        "{line}"
    );
    b.proc.wait_log("elected leader", Duration::from_secs(20));
    a.wait_log(
        &format!("following the leader at {}", b.advertise),
        Duration::from_secs(20),
    );
    drop(etcd);
}

/// A node started on a directory of files that ferry never managed (no `.ferry/`), whose
/// cluster already has another leader, does not follow into it: following would delete every
/// file that leader lacks (the broker's own data, when a cluster is set up on a node that has
/// it and another node wins the first election). It says so, naming `--adopt`, and keeps the
/// files; with `--adopt` it follows.
#[test]
fn a_node_does_not_follow_into_a_directory_of_other_files_unless_told_to() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let leader = start_node(&env, &etcd.url, &env.dir("a"), free_port());
    leader
        .proc
        .wait_log("elected leader", Duration::from_secs(30));
    write(&leader.dir.join("q/seg"), &pattern(10_000, 1));

    let b_dir = env.dir("b");
    write(&b_dir.join("q/own-data"), b"the broker's data on this node");
    let b = start_node(&env, &etcd.url, &b_dir, free_port());
    let line = b
        .proc
        .wait_log("following stopped", Duration::from_secs(20));
    assert!(line.contains("--adopt"), "{line}");
    assert_eq!(
        std::fs::read(b_dir.join("q/own-data")).unwrap(),
        b"the broker's data on this node"
    );
    drop(b);

    let _b = start_node_with(&env, &etcd.url, &b_dir, free_port(), &["--adopt"]);
    wait_same_files(&leader.dir, &b_dir, Duration::from_secs(20));
    drop(etcd);
}

/// Setting a cluster up on the node that holds the broker's data: a node with an empty data
/// dir that joins the new cluster first does not win its first election, which would leave the
/// data on a node that cannot follow (or, with `--adopt`, delete it). It says that it waits,
/// the node that holds files is elected though it joined later, and the empty one follows it.
#[test]
fn an_empty_node_lets_a_node_that_holds_data_win_a_new_clusters_first_election() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let empty = start_node(&env, &etcd.url, &env.dir("empty"), free_port());
    let line = empty
        .proc
        .wait_log("holds no files", Duration::from_secs(20));
    assert!(line.contains("before campaigning"), "{line}");

    let data_dir = env.dir("data");
    write(&data_dir.join("q/seg"), &pattern(100_000, 7));
    write(&data_dir.join("meta.json"), b"{\"queues\":[\"q\"]}");
    let data = start_node(&env, &etcd.url, &data_dir, free_port());
    data.proc
        .wait_log("elected leader", Duration::from_secs(20));
    empty.proc.wait_log(
        &format!("following the leader at {}", data.advertise),
        Duration::from_secs(20),
    );
    wait_identical(&data_dir, &empty.dir, Duration::from_secs(20));
    assert!(
        !empty.proc.log_text().contains("elected leader"),
        "the empty node led: {}",
        empty.proc.log_text()
    );
    drop(etcd);
}

/// `ferry node` as a `Type=notify` systemd service: a leading node is ready once it serves, a
/// following one once it holds the leader's files (its first sync applied), and both feed the
/// watchdog.
#[test]
fn under_systemd_a_node_reports_ready_once_it_serves_or_holds_the_leaders_files() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let start = |name: &str, systemd: &NotifySocket| {
        let dir = env.dir(name);
        let advertise = format!("127.0.0.1:{}", free_port());
        let mut cmd = node_cmd(&etcd.url, &dir, &advertise);
        cmd.arg("--secret-file").arg(&env.secret_file);
        systemd.configure(&mut cmd);
        (Proc::spawn(cmd), dir, advertise)
    };
    let a_systemd = NotifySocket::bind(&env, "a.sock");
    let a_dir = env.dir("a");
    write(&a_dir.join("q/seg"), &pattern(2_000_000, 4));
    let (_a, _, a_advertise) = start("a", &a_systemd);
    let ready = a_systemd.wait_for("READY=1");
    assert!(
        ready.contains(&format!("STATUS=leading on {a_advertise}")),
        "{ready}"
    );
    a_systemd.wait_for("WATCHDOG=1");

    // B cannot follow while something else holds its data dir (the test, by ferry's own lock):
    // it is not ready then, whatever else it does.
    let b_systemd = NotifySocket::bind(&env, "b.sock");
    let b_dir = env.dir("b");
    std::fs::create_dir_all(b_dir.join(".ferry")).unwrap();
    let lock = std::fs::File::create(b_dir.join(".ferry/lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns, open for the call.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let (b, _, _) = start("b", &b_systemd);
    b.wait_log("is in use by another", Duration::from_secs(20));
    let syncing = b_systemd.wait_for("STATUS=following");
    assert!(
        !syncing.contains("READY=1"),
        "ready without the files: {syncing}"
    );
    drop(lock);
    let ready = b_systemd.wait_for("READY=1");
    assert!(
        tree_difference(&a_dir, &b_dir).is_none(),
        "ready before it held the files"
    );
    assert!(
        ready.contains(&format!("STATUS=following {a_advertise}")),
        "{ready}"
    );
    b_systemd.wait_for("WATCHDOG=1");
    drop(etcd);
}

/// Two nodes started with one `--advertise` (a config file copied from host to host) would
/// share a node id: the leader would take either for the other, the in-sync replica set
/// would vouch for both, and one that never synced could be elected. The second refuses to
/// join, naming the id and the process that holds it, and exits non-zero; the first leads on.
#[test]
fn a_second_node_with_the_same_advertised_id_refuses_to_join() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let a_dir = env.dir("a");
    write(&a_dir.join("q/seg"), &pattern(1000, 1));
    let a = start_node(&env, &etcd.url, &a_dir, free_port());
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let mut cmd = ferry();
    cmd.args([
        "node",
        "--lease-ttl",
        "2",
        "--io-engine",
        "fallback",
        "--etcd",
    ])
    .arg(&etcd.url)
    .args(["--listen", &format!("127.0.0.1:{}", free_port())])
    .args(["--advertise", &a.advertise])
    .arg("--data-dir")
    .arg(env.dir("b"))
    .arg("--secret-file")
    .arg(&env.secret_file);
    let out = run_bounded(cmd, Duration::from_secs(30));
    failed_saying(
        &out,
        &[
            &format!("node id {} is in use by another node", a.advertise),
            &format!("pid {}", a.proc.child.id()),
            "--advertise",
        ],
    );
    let mut a = a;
    assert!(
        a.proc.child.try_wait().unwrap().is_none(),
        "the first node stopped"
    );
    assert!(
        !a.proc.log_text().contains("no longer leading"),
        "{}",
        a.proc.log_text()
    );

    // The same node killed and started again at once (a service manager's restart) finds its
    // id held by its own earlier run until that lease lapses, and then joins.
    signal(&a.proc.child, libc::SIGKILL);
    let _ = a.proc.child.wait();
    let port: u16 = a.advertise.rsplit(':').next().unwrap().parse().unwrap();
    let again = start_node(&env, &etcd.url, &a_dir, port);
    again
        .proc
        .wait_log("waiting up to", Duration::from_secs(20));
    again
        .proc
        .wait_log("elected leader", Duration::from_secs(30));
    drop(etcd);
}

/// A cluster of two nodes: A, whose data dir holds a segment, leads; B follows it, holds the
/// same files, and both are in the in-sync replica set.
fn a_leads_b_in_sync(env: &Env, etcd: &str) -> (Node, Node) {
    a_leads_b_in_sync_with(env, etcd, &[], &[])
}

/// `a_leads_b_in_sync`, each node started with more flags.
fn a_leads_b_in_sync_with(
    env: &Env,
    etcd: &str,
    a_flags: &[&str],
    b_flags: &[&str],
) -> (Node, Node) {
    let (a_dir, b_dir) = (env.dir("a"), env.dir("b"));
    write(&a_dir.join("q/seg"), &pattern(100_000, 5));
    let a = start_node_with(env, etcd, &a_dir, free_port(), a_flags);
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let b = start_node_with(env, etcd, &b_dir, free_port(), b_flags);
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    let both = isr_of(&[&a.advertise, &b.advertise]);
    wait_until(
        Duration::from_secs(20),
        "the ISR holding both nodes",
        || read_key(etcd, "ferry/isr").as_deref() == Some(both.as_str()),
    );
    (a, b)
}

/// A node of a cluster that has held data comes back with an empty data dir (its disk
/// replaced, or not mounted) while the leader is down. It is in the in-sync replica set, but
/// elected it would serve nothing: the others would decline to follow until its application
/// wrote anew, and then delete what they hold. It says so and does not campaign; the node with
/// the data, back, is elected, and the empty one gets the data from it.
#[test]
fn a_node_that_lost_its_data_does_not_lead_a_cluster_that_held_data() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (mut a, b) = a_leads_b_in_sync(&env, &etcd.url);
    let (a_dir, b_dir, a_port, b_port) = (a.dir.clone(), b.dir.clone(), a.port, b.port);
    wait_until(Duration::from_secs(20), "ferry/data set", || {
        read_key(&etcd.url, "ferry/data").is_some()
    });

    // The leader dies; B's disk is replaced.
    drop(b);
    signal(&a.proc.child, libc::SIGKILL);
    let _ = a.proc.child.wait();
    std::fs::remove_dir_all(&b_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let b = start_node(&env, &etcd.url, &b_dir, b_port);
    let line = b
        .proc
        .wait_log("but this cluster has held data", Duration::from_secs(30));
    assert!(line.contains("not campaigning"), "{line}");

    let a = start_node(&env, &etcd.url, &a_dir, a_port);
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    assert!(
        !b.proc.log_text().contains("elected leader"),
        "{}",
        b.proc.log_text()
    );
    drop(etcd);
}

/// `ferry cluster ARGS --etcd ETCD`, bounded.
fn cluster(etcd: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = ferry();
    cmd.arg("cluster").args(args).args(["--etcd", etcd]);
    run_bounded(cmd, Duration::from_secs(30))
}

/// `cluster` that must succeed; its stdout.
fn cluster_ok(etcd: &str, args: &[&str]) -> String {
    stdout_of_success(cluster(etcd, args))
}

/// The columns after the node id in `ferry cluster status`'s row for `id`.
fn status_row(status: &str, id: &str) -> Vec<String> {
    let row = status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no row for {id} in:\n{status}"));
    row.split_whitespace().skip(1).map(str::to_string).collect()
}

/// Stops a node as a service manager does (SIGTERM): it leaves, revoking its lease.
fn stop_node(node: &mut Node) {
    signal(&node.proc.child, libc::SIGTERM);
    let status = node.proc.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", node.proc.log_text());
}

/// `ferry cluster status` tells an operator from etcd alone who leads, which nodes are in the
/// in-sync replica set (those that may be elected), whether the cluster has held data, and
/// which nodes run and campaign; `--json` says the same for a script. Once every node is
/// stopped, `ferry cluster reset` forgets the set and the data mark.
#[test]
fn cluster_status_shows_who_leads_who_may_lead_and_who_runs() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (a_dir, b_dir, c_dir) = (env.dir("a"), env.dir("b"), env.dir("c"));
    write(&a_dir.join("q/seg"), &pattern(100_000, 3));
    let mut a = start_node(&env, &etcd.url, &a_dir, free_port());
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let mut b = start_node(&env, &etcd.url, &b_dir, free_port());
    // C holds files ferry never managed and has no --adopt: it runs, but neither follows nor
    // joins the in-sync replica set.
    write(&c_dir.join("own"), b"another broker's data");
    let mut c = start_node(&env, &etcd.url, &c_dir, free_port());
    c.proc
        .wait_log("following stopped", Duration::from_secs(20));
    let both = isr_of(&[&a.advertise, &b.advertise]);
    wait_until(Duration::from_secs(20), "the ISR holding A and B", || {
        read_key(&etcd.url, "ferry/isr").as_deref() == Some(both.as_str())
    });
    wait_until(Duration::from_secs(20), "ferry/data set", || {
        read_key(&etcd.url, "ferry/data").is_some()
    });
    // B campaigns once its sync is done and it is in the set; C, which campaigned while the
    // cluster had no set yet, withdraws once the leader writes one without it.
    let rows = |status: &str| {
        (status.lines().any(|l| l.starts_with(&c.advertise))).then(|| {
            (
                status_row(status, &b.advertise)[..3].join(" "),
                status_row(status, &c.advertise)[..3].join(" "),
            )
        })
    };
    let settled = Some(("no yes yes".to_string(), "no no no".to_string()));
    wait_until(Duration::from_secs(20), "B queued, C running", || {
        rows(&cluster_ok(&etcd.url, &["status"])) == settled
    });

    let status = cluster_ok(&etcd.url, &["status"]);
    assert_eq!(rows(&status), settled, "{status}");
    assert!(
        status.contains(&format!("leader: {}", a.advertise)),
        "{status}"
    );
    assert!(status.contains(&format!("in sync: {both}")), "{status}");
    assert!(
        status.contains(&format!("held data: yes (set by {})", a.advertise)),
        "{status}"
    );
    // NODE  LEADS  IN-SYNC  CAMPAIGNING  PROCESS
    let a_row = status_row(&status, &a.advertise);
    assert_eq!(a_row[..3], ["yes", "yes", "yes"], "{status}");
    assert!(
        status.contains(&format!("pid {}", a.proc.child.id())),
        "{status}"
    );
    let json = cluster_ok(&etcd.url, &["status", "--json"]);
    for needle in [
        format!("\"leader\":\"{}\"", a.advertise),
        format!("\"held_data_set_by\":\"{}\"", a.advertise),
        format!(
            "{{\"id\":\"{}\",\"running\":true,\"process\":\"pid {}",
            c.advertise,
            c.proc.child.id()
        ),
        format!("\"id\":\"{}\",\"running\":true,", b.advertise),
    ] {
        assert!(json.contains(&needle), "no {needle} in {json}");
    }

    // On a node's host the operator names the node's config file instead: the cluster's
    // commands take etcd and the prefix from its [node] section.
    let config = env.tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[node]\netcd = \"{}\"\nlisten = \"127.0.0.1:1\"\n",
            a_dir.display(),
            etcd.url
        ),
    )
    .unwrap();
    let mut cmd = ferry();
    cmd.args(["cluster", "status", "--config"]).arg(&config);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("leader: {}", a.advertise)),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped, the nodes leave the listing; the set and the mark stay until a reset.
    stop_node(&mut c);
    stop_node(&mut b);
    stop_node(&mut a);
    let status = cluster_ok(&etcd.url, &["status"]);
    assert!(status.contains("leader: none"), "{status}");
    assert_eq!(
        status_row(&status, &a.advertise),
        ["no", "yes", "no", "(not", "running)"],
        "{status}"
    );
    assert!(
        !status.lines().any(|l| l.starts_with(&c.advertise)),
        "{status}"
    );
    // An instance a handoff passed on to a node that has not led since (as a leader that
    // handed off to B leaves it, B stopped before its election): status names it, and the
    // reset forgets it, since B would otherwise go on with it whenever it next leads. So with
    // the fork that instance is, which B would go on with too.
    let passed = format!("{} 00112233445566778899aabbccddeeff 1300011", b.advertise);
    etcd_put(&etcd.url, "ferry/handoff-instance", &passed);
    let fork = "00112233445566778899aabbccddeeff ffeeddccbbaa99887766554433221100 900 \
                0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f 700";
    etcd_put(&etcd.url, "ferry/handoff-fork", fork);
    let status = cluster_ok(&etcd.url, &["status"]);
    let line = format!(
        "handoff: instance 00112233445566778899aabbccddeeff (a fork of instance \
         ffeeddccbbaa99887766554433221100 at position 900, itself a fork of instance \
         0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f at position 700) passed on to {} at position 1300011, \
         for it to go on with once elected",
        b.advertise
    );
    assert!(status.contains(&line), "{status}");
    let json = cluster_ok(&etcd.url, &["status", "--json"]);
    let needle = format!(
        "\"passed_instance\":{{\"to\":\"{}\",\"instance\":\"00112233445566778899aabbccddeeff\",\
         \"position\":1300011,\"fork\":{{\"from\":\"ffeeddccbbaa99887766554433221100\",\
         \"position\":900,\"earlier\":[{{\"from\":\"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f\",\
         \"position\":700}}]}}}}",
        b.advertise
    );
    assert!(json.contains(&needle), "no {needle} in {json}");
    let reset = cluster_ok(&etcd.url, &["reset"]);
    assert!(reset.contains("ferry/data"), "{reset}");
    assert!(reset.contains("ferry/handoff-instance"), "{reset}");
    assert!(reset.contains("ferry/handoff-fork"), "{reset}");
    assert_eq!(read_key(&etcd.url, "ferry/data"), None);
    assert_eq!(read_key(&etcd.url, "ferry/isr"), None);
    assert_eq!(read_key(&etcd.url, "ferry/handoff-instance"), None);
    assert_eq!(read_key(&etcd.url, "ferry/handoff-fork"), None);
    let status = cluster_ok(&etcd.url, &["status"]);
    assert!(status.contains("held data: no"), "{status}");
    assert!(!status.contains("passed on"), "{status}");
    let json = cluster_ok(&etcd.url, &["status", "--json"]);
    assert!(json.contains("\"passed_instance\":null"), "{json}");
    drop(etcd);
}

/// The node that holds a new cluster's data joined after the empty nodes' `--empty-wait`: an
/// empty node leads, and the in-sync replica set it wrote keeps the data node from leading.
/// `ferry cluster reset` refuses while any node runs (a node that joined after it could lead
/// whatever it holds); once every node is stopped it clears the set, and the data node,
/// started first, is elected, its data intact, and the empty one gets the data from it.
#[test]
fn cluster_reset_lets_a_late_data_node_lead_once_every_node_is_stopped() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (e_dir, d_dir) = (env.dir("empty"), env.dir("data"));
    let (e_port, d_port) = (free_port(), free_port());
    let mut e = start_node_with(&env, &etcd.url, &e_dir, e_port, &["--empty-wait", "0"]);
    e.proc.wait_log("elected leader", Duration::from_secs(30));
    wait_until(Duration::from_secs(20), "the ISR holding E", || {
        read_key(&etcd.url, "ferry/isr").as_deref() == Some(e.advertise.as_str())
    });
    let seg = pattern(300_000, 9);
    write(&d_dir.join("q/seg"), &seg);
    let mut d = start_node(&env, &etcd.url, &d_dir, d_port);
    d.proc
        .wait_log("following stopped", Duration::from_secs(20));
    let status = cluster_ok(&etcd.url, &["status"]);
    assert_eq!(
        status_row(&status, &d.advertise)[..3],
        ["no", "no", "no"],
        "{status}"
    );

    let refused = cluster(&etcd.url, &["reset"]);
    failed_saying(&refused, &["refusing", &e.advertise, &d.advertise]);
    assert_eq!(
        read_key(&etcd.url, "ferry/isr").as_deref(),
        Some(e.advertise.as_str())
    );

    stop_node(&mut d);
    stop_node(&mut e);
    let reset = cluster_ok(&etcd.url, &["reset"]);
    assert!(reset.contains("ferry/isr"), "{reset}");
    assert_eq!(read_key(&etcd.url, "ferry/isr"), None);

    let d = start_node(&env, &etcd.url, &d_dir, d_port);
    d.proc.wait_log("elected leader", Duration::from_secs(30));
    let _e = start_node(&env, &etcd.url, &e_dir, e_port);
    wait_identical(&d_dir, &e_dir, Duration::from_secs(30));
    assert_eq!(std::fs::read(d_dir.join("q/seg")).unwrap(), seg);
    drop(etcd);
}

/// A cluster's data has one lineage, which its nodes' copies carry. A node whose copy has none
/// recorded (made by a build before lineages, as in a rolling upgrade) is elected: it serves the
/// cluster's lineage, kept in etcd, not a new one, so the node that holds the cluster's lineage
/// follows it instead of declining its data. `ferry cluster status` names the lineage, and
/// `ferry cluster reset` forgets it with the rest.
#[test]
fn a_node_without_a_recorded_lineage_leads_with_the_clusters() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (mut a, mut b) = a_leads_b_in_sync(&env, &etcd.url);
    let (a_dir, b_dir, a_port, b_port) = (a.dir.clone(), b.dir.clone(), a.port, b.port);
    let lineage = std::fs::read_to_string(a_dir.join(".ferry/lineage")).unwrap();
    assert_eq!(
        read_key(&etcd.url, "ferry/lineage").as_deref(),
        Some(lineage.trim())
    );
    let status = cluster_ok(&etcd.url, &["status"]);
    assert!(
        status.contains(&format!("lineage: {}", lineage.trim())),
        "{status}"
    );

    stop_node(&mut b);
    stop_node(&mut a);
    std::fs::remove_file(b_dir.join(".ferry/lineage")).unwrap();
    let mut b = start_node(&env, &etcd.url, &b_dir, b_port);
    b.proc.wait_log("elected leader", Duration::from_secs(30));
    let mut a = start_node(&env, &etcd.url, &a_dir, a_port);
    write(&b_dir.join("q/seg2"), &pattern(5_000, 6));
    wait_identical(&b_dir, &a_dir, Duration::from_secs(30));
    assert_eq!(
        std::fs::read_to_string(b_dir.join(".ferry/lineage")).unwrap(),
        lineage
    );
    stop_node(&mut a);
    stop_node(&mut b);
    cluster_ok(&etcd.url, &["reset"]);
    assert_eq!(read_key(&etcd.url, "ferry/lineage"), None);
    drop(etcd);
}

/// When the key at `key` in etcd was created (its create revision), if it exists.
fn created_at(etcd: &str, key: &str) -> Option<i64> {
    etcd_get(etcd, key).map(|kv| kv.create_revision())
}

/// A queued node dropped from the in-sync replica set (here by a handoff to another node, which
/// names its target alone) leaves the election but stays joined: its node id stays claimed
/// under the same lease throughout, so no other node can take the id meanwhile, and `ferry
/// cluster status` never loses it. Once back in the set it campaigns again.
#[test]
fn a_node_dropped_from_the_set_withdraws_but_keeps_its_id() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (_a, b) = a_leads_b_in_sync(&env, &etcd.url);
    let c = start_node(&env, &etcd.url, &env.dir("c"), free_port());
    let queued = |node: &Node| {
        let status = cluster_ok(&etcd.url, &["status"]);
        status.lines().any(|l| l.starts_with(&node.advertise))
            && status_row(&status, &node.advertise)[1..3] == ["yes", "yes"]
    };
    wait_until(
        Duration::from_secs(30),
        "B and C in sync and queued",
        || queued(&b) && queued(&c),
    );
    let b_key = format!("ferry/nodes/{}", b.advertise);
    let before = created_at(&etcd.url, &b_key);
    assert!(before.is_some());

    // B, queued behind A, either withdraws once the set names C alone, or wins as A resigns
    // and resigns in turn: either way it leaves the election, not the cluster.
    handoff_ok(&etcd.url, Some(&c.advertise));
    wait_until(Duration::from_secs(30), "B out of the election", || {
        let log = b.proc.log_text();
        log.contains("withdrawing from the election")
            || log.contains("won the election outside the in-sync replica set")
    });
    wait_until(
        Duration::from_secs(30),
        "B in sync with C and queued again",
        || queued(&b),
    );
    assert_eq!(created_at(&etcd.url, &b_key), before, "B's id was let go");
    assert!(
        !b.proc.log_text().contains("joining the election again"),
        "{}",
        b.proc.log_text()
    );
    drop(etcd);
}

/// A cluster that keeps its shared secret in etcd rotates it with no node restarted. After
/// `ferry cluster rotate-secret` every node holds the new secret and the leader accepts both;
/// after `--finish` only the new one: a follower outside the cluster still connected with the
/// old one is cut off, saying why, while the nodes, which reconnect with the new one, go on
/// replicating.
#[test]
fn a_secret_kept_in_etcd_is_rotated_with_no_node_restarted() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let spawn = |dir: &Path| spawn_node(&etcd.url, dir, free_port(), ["--secret-from-etcd"]);
    let (a_dir, b_dir) = (env.dir("a"), env.dir("b"));
    write(&a_dir.join("q/seg"), &pattern(100_000, 7));
    let a = spawn(&a_dir);
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let b = spawn(&b_dir);
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    let old = read_key(&etcd.url, "ferry/secret").expect("the secret in etcd");
    let keys = env.dir("keys");
    let old_file = keys.join("old");
    write(&old_file, old.as_bytes());
    // A follower outside the cluster, given the secret as a file, connected throughout.
    let outside_dir = env.dir("outside");
    let cmd = follow_with_secret_cmd(&outside_dir, &a.advertise, &old_file);
    let mut outside = Proc::spawn(cmd);
    wait_identical(&a_dir, &outside_dir, Duration::from_secs(20));

    let said = cluster_ok(&etcd.url, &["rotate-secret"]);
    assert!(said.contains("2 of 2 running nodes hold it"), "{said}");
    let new = read_key(&etcd.url, "ferry/secret").expect("the new secret");
    assert_ne!(new, old);
    assert_eq!(
        read_key(&etcd.url, "ferry/secret-previous").as_deref(),
        Some(old.as_str())
    );
    for node in [&a, &b] {
        node.proc
            .wait_log("shared secret rotated", Duration::from_secs(5));
    }
    // Meanwhile the leader accepts either secret.
    let new_file = keys.join("new");
    write(&new_file, new.as_bytes());
    for (name, file) in [("with-old", &old_file), ("with-new", &new_file)] {
        let out = follow_once_with_secret(&env.dir(name), &a.advertise, file);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = cluster_ok(&etcd.url, &["status"]);
    assert!(
        status.contains("secret: in etcd, a rotation in progress"),
        "{status}"
    );
    assert!(!status.contains(&old) && !status.contains(&new), "{status}");
    let json = cluster_ok(&etcd.url, &["status", "--json"]);
    assert!(
        json.contains(r#""secret_in_etcd":true,"secret_rotating":true"#),
        "{json}"
    );
    // One rotation at a time.
    let out = cluster(&etcd.url, &["rotate-secret"]);
    failed_saying(&out, &["in progress", "--finish"]);

    let b_lines = b.proc.log_len();
    let said = cluster_ok(&etcd.url, &["rotate-secret", "--finish"]);
    assert!(said.contains("deleted ferry/secret-previous"), "{said}");
    assert_eq!(read_key(&etcd.url, "ferry/secret-previous"), None);
    let json = cluster_ok(&etcd.url, &["status", "--json"]);
    assert!(
        json.contains(r#""secret_in_etcd":true,"secret_rotating":false"#),
        "{json}"
    );
    // The follower still on the old secret is cut off, and told why.
    let status = exit_within(&mut outside, Duration::from_secs(10));
    assert!(!status.success(), "{}", outside.log_text());
    outside.wait_log("rotated out", Duration::from_secs(5));
    let out = follow_once_with_secret(&env.dir("old-again"), &a.advertise, &old_file);
    failed_saying(&out, &["wrong secret"]);
    // The nodes go on: B reconnects with the new secret at once, and gets what is written now.
    write(&a_dir.join("q/seg2"), &pattern(50_000, 8));
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    let since: Vec<String> = b.proc.log.lock().unwrap()[b_lines..].to_vec();
    assert!(
        !since.iter().any(|l| l.contains("following stopped")),
        "B gave up on the leader:\n{}",
        since.join("\n")
    );
    drop(etcd);
}

/// A rotation does not end while a running node does not hold the new secret (here, one given
/// its own with --secret-file): finishing would cut it off. Both steps say which node. The new
/// secret may be one the operator chose (`--secret-file`), to give to followers outside.
#[test]
fn a_rotation_waits_for_every_running_node_and_names_one_that_does_not_take_the_secret() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let a_dir = env.dir("a");
    write(&a_dir.join("q/seg"), &pattern(10_000, 9));
    let a = spawn_node(&etcd.url, &a_dir, free_port(), ["--secret-from-etcd"]);
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let a_id = a.advertise.clone();
    let b = start_node(&env, &etcd.url, &env.dir("b"), free_port());
    b.proc
        .wait_log("joined the election", Duration::from_secs(30));

    // The new secret chosen by the operator, from a file, rather than drawn at random.
    let chosen = env.dir("keys").join("chosen");
    write(&chosen, b"a secret the operator chose and gave out\n");
    let mut args = vec!["rotate-secret", "--timeout", "2", "--secret-file"];
    args.push(chosen.to_str().unwrap());
    let out = cluster(&etcd.url, &args);
    let said = failed_saying(&out, &["1 of 2 running nodes do not hold", &b.advertise]);
    assert!(!said.contains(&a_id), "{said}");
    assert_eq!(
        read_key(&etcd.url, "ferry/secret").as_deref(),
        Some("a secret the operator chose and gave out")
    );
    let out = cluster(&etcd.url, &["rotate-secret", "--finish", "--timeout", "1"]);
    failed_saying(&out, &[&b.advertise, "still accepted"]);
    assert!(read_key(&etcd.url, "ferry/secret-previous").is_some());
    // B killed: the rotation ends once its node key lapses with its lease (2 s).
    drop(b);
    let said = cluster_ok(&etcd.url, &["rotate-secret", "--finish", "--timeout", "10"]);
    assert!(said.contains("deleted ferry/secret-previous"), "{said}");
    drop(etcd);
}

/// A cluster whose nodes are given their secret as files rotates it with no node restarted:
/// each node reads its files again on SIGHUP. In two reloads of every node (the new secret with
/// the old one as previous; then no previous one) no node is refused, and after the last one
/// the old secret no longer gets in, while the nodes go on replicating.
#[test]
fn nodes_read_their_secret_files_again_on_sighup() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let keys = env.dir("keys");
    let old = "the secret before the rotation";
    let new = "the secret after the rotation!";
    let spawn = |name: &str, dir: &Path| {
        let (secret, previous) = (keys.join(name), keys.join(format!("{name}-previous")));
        write(&secret, old.as_bytes());
        let args = [
            "--secret-file".as_ref(),
            secret.as_os_str(),
            "--previous-secret-file".as_ref(),
            previous.as_os_str(),
        ];
        let node = spawn_node(&etcd.url, dir, free_port(), args);
        (node, secret, previous)
    };
    let (a_dir, b_dir) = (env.dir("a"), env.dir("b"));
    write(&a_dir.join("q/seg"), &pattern(50_000, 4));
    let a = spawn("a", &a_dir);
    a.0.proc.wait_log("elected leader", Duration::from_secs(30));
    let b = spawn("b", &b_dir);
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    let b_lines = b.0.proc.log_len();
    let reload_both = |current: &str, previous: Option<&str>, needle: &str| {
        for (node, secret, previous_file) in [&a, &b] {
            write(secret, current.as_bytes());
            match previous {
                Some(p) => write(previous_file, p.as_bytes()),
                None => std::fs::remove_file(previous_file).unwrap(),
            }
            node.proc.reload(needle);
        }
    };
    reload_both(new, Some(old), "a previous one accepted too");
    reload_both(new, None, "only the current one accepted");
    // B's connection, made with the old secret, was closed; it reconnected with the new one.
    b.0.proc
        .wait_log_since(b_lines, "reconnecting with it", Duration::from_secs(10));
    write(&a_dir.join("q/seg2"), &pattern(30_000, 5));
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    let since: Vec<String> = b.0.proc.log.lock().unwrap()[b_lines..].to_vec();
    assert!(
        !since.iter().any(|l| l.contains("following stopped")),
        "B was refused:\n{}",
        since.join("\n")
    );
    let old_file = keys.join("old");
    write(&old_file, old.as_bytes());
    let out = follow_once_with_secret(&env.dir("old"), &a.0.advertise, &old_file);
    failed_saying(&out, &["wrong secret"]);
    drop(etcd);
}

/// A broker embedding a node rotates the shared secret with no restart (`Node::set_secrets`):
/// its leader then closes a connection made with the old secret, and accepts the new one.
#[test]
fn an_embedded_node_takes_new_secrets_while_it_leads() {
    use ferry::auth::{Secret, Secrets};
    use ferry::cluster::RoleEvent;
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let port = free_port();
    let advertise = format!("127.0.0.1:{port}");
    let mut config = embedded_node_config(&env, &etcd.url, port);
    config.empty_wait = Duration::from_secs(0);
    let (node, roles) = start_embedded_node(config);
    assert!(matches!(
        roles.recv_timeout(Duration::from_secs(30)).unwrap(),
        RoleEvent::Elected(_)
    ));
    let mut on_old = Proc::spawn(follow_with_secret_cmd(
        &env.dir("old"),
        &advertise,
        &env.secret_file,
    ));
    on_old.wait_log("connected to the leader", Duration::from_secs(20));

    let new_text = "the embedder's rotated-in secret";
    assert!(node.set_secrets(Secrets::one(
        Secret::new(new_text.as_bytes().to_vec()).unwrap()
    )));
    let status = exit_within(&mut on_old, Duration::from_secs(10));
    assert!(!status.success(), "{}", on_old.log_text());
    on_old.wait_log("rotated out", Duration::from_secs(5));
    let new_file = env.dir("keys").join("new");
    write(&new_file, new_text.as_bytes());
    let out = follow_once_with_secret(&env.dir("new"), &advertise, &new_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.leave().unwrap();
    drop(etcd);
}

/// A broker's data dir moved away while its embedded node leads (`mv DIR DIR.old` and a new DIR
/// made; or a disk mounted over it): its leader stops serving, saying why, and the node resigns
/// (the embedder is told it lost the lead), as a `ferry node` whose watcher stops does, rather
/// than hold the lead over a directory the broker no longer writes.
#[test]
fn an_embedded_leading_node_whose_data_dir_is_moved_away_resigns() {
    use ferry::cluster::RoleEvent;
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let config = embedded_node_config(&env, &etcd.url, free_port());
    let dir = config.data_dir.clone();
    write(&dir.join("q/seg"), &pattern(1000, 1));
    let (node, roles) = start_embedded_node(config);
    let leader = match roles.recv_timeout(Duration::from_secs(30)).unwrap() {
        RoleEvent::Elected(leader) => leader,
        _ => panic!("the first role event is not Elected"),
    };
    std::fs::rename(&dir, env.tmp.path().join("embedded.old")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    assert!(
        matches!(
            roles.recv_timeout(Duration::from_secs(20)),
            Ok(RoleEvent::Lost)
        ),
        "the node did not give up the lead within 20 s: {:?}",
        leader.failure()
    );
    let why = leader.failure().unwrap_or_default();
    let cause = format!(
        "{} is no longer the directory ferry started on",
        dir.display()
    );
    assert!(why.contains(&cause), "{why:?}");
    node.leave().unwrap();
    drop(etcd);
}

/// During a rotation a node may hold the new secret before the leader does (its reload came
/// first, or the leader runs an older build): refused with the new one, it authenticates with
/// its previous one at once, rather than being refused until the leader catches up. So a
/// rotation of nodes' secret files takes two reloads of each node, in any order.
#[test]
fn a_node_ahead_in_a_rotation_follows_with_its_previous_secret() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let keys = env.dir("keys");
    let new_file = keys.join("new");
    write(&new_file, b"the secret after the rotation!");
    let a_dir = env.dir("a");
    write(&a_dir.join("q/seg"), &pattern(40_000, 6));
    let a = start_node(&env, &etcd.url, &a_dir, free_port());
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let b_dir = env.dir("b");
    let args = [
        "--secret-file".as_ref(),
        new_file.as_os_str(),
        "--previous-secret-file".as_ref(),
        env.secret_file.as_os_str(), // the old one, which A holds
    ];
    let b = spawn_node(&etcd.url, &b_dir, free_port(), args).proc;
    b.wait_log("trying its previous secret", Duration::from_secs(20));
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    // The leader takes the new secret alone: it closes B's connection, made with the old one,
    // and B reconnects at once with the new one.
    write(&env.secret_file, b"the secret after the rotation!");
    a.proc.reload("only the current one accepted");
    b.wait_log("reconnecting with it", Duration::from_secs(10));
    write(&a_dir.join("q/seg2"), &pattern(20_000, 7));
    wait_identical(&a_dir, &b_dir, Duration::from_secs(20));
    assert!(
        !b.log_text().contains("following stopped"),
        "{}",
        b.log_text()
    );
    drop(etcd);
}

/// A leader that leaves while its only follower lags starts a handoff to it and waits for it
/// to catch up; when that follower dies meanwhile (a whole cluster being stopped), the leader
/// gives up at once and leaves without a handoff, rather than waiting out its timeout.
#[test]
fn a_leaving_leader_gives_up_its_handoff_as_soon_as_the_target_is_gone() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (mut a, mut b) = a_leads_b_in_sync(&env, &etcd.url);
    // b stops acking (connected, not reading), and a has more for it.
    stop_process(&b.proc.child);
    write(&a.dir.join("q/more"), &pattern(100_000, 6));
    std::thread::sleep(Duration::from_millis(300));
    let mark = a.proc.log_len();
    signal(&a.proc.child, libc::SIGTERM);
    a.proc.wait_log_since(
        mark,
        &format!("handoff to {}: waiting for it to catch up", b.advertise),
        Duration::from_secs(10),
    );
    let gone = Instant::now();
    b.proc.child.kill().unwrap();
    b.proc.child.wait().unwrap();
    let line = a
        .proc
        .wait_log_since(mark, "leaving without a handoff", Duration::from_secs(20));
    assert!(a.proc.child.wait().unwrap().success());
    let took = gone.elapsed();
    assert!(
        line.contains(&format!("{} disconnected", b.advertise)),
        "{line}"
    );
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} after the target died"
    );
    drop(etcd);
}

/// An operator who would rather a stop be quick than lose nothing written since the last acks
/// bounds the leave's handoff (`--leave-handoff-timeout`), or turns it off with 0.
#[test]
fn a_leaving_leader_waits_for_its_handoff_only_as_long_as_told() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let no_handoff = ["--leave-handoff-timeout", "0"];
    let one_second = ["--leave-handoff-timeout", "1"];
    let (mut a, mut b) = a_leads_b_in_sync_with(&env, &etcd.url, &no_handoff, &one_second);
    let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());

    // With 0, a leaves at once, without telling anyone to drain, and b leads.
    let mark = a.proc.log_len();
    signal(&a.proc.child, libc::SIGTERM);
    let line = a
        .proc
        .wait_log_since(mark, "leaving without a handoff", Duration::from_secs(20));
    assert!(a.proc.child.wait().unwrap().success());
    assert!(line.contains("--leave-handoff-timeout 0"), "{line}");
    let log = a.proc.log.lock().unwrap()[mark..].join("\n");
    assert!(!log.contains("handoff to"), "{log}");
    b.proc.wait_log("elected leader", Duration::from_secs(30));

    // a follows; it stops acking (connected, not reading), and b has more for it: b waits
    // 1 s, not the default 10.
    let a = start_node(&env, &etcd.url, &a_dir, a.port);
    a.proc
        .wait_log("initial sync received", Duration::from_secs(30));
    stop_process(&a.proc.child);
    write(&b_dir.join("q/more"), &pattern(100_000, 6));
    let mark = b.proc.log_len();
    let asked = Instant::now();
    signal(&b.proc.child, libc::SIGTERM);
    let line = b
        .proc
        .wait_log_since(mark, "leaving without a handoff", Duration::from_secs(20));
    assert!(b.proc.child.wait().unwrap().success());
    let took = asked.elapsed();
    // Whether the watcher had recorded `more` when the leave began decides which wait it is.
    assert!(line.contains("within 1 s"), "{line}");
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}, as if the default"
    );
    drop((a, etcd));
}

/// `ferry handoff --timeout` promises to leave the leader leading when it gives up. A leader
/// that took the request and still waits for its target then must not hand off later, once
/// the target has caught up: the operator was told it did not happen.
#[test]
fn a_handoff_whose_requester_gave_up_does_not_happen_later() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (a, b) = a_leads_b_in_sync(&env, &etcd.url);
    // b lags (connected, not reading), so a waits for it to catch up.
    stop_process(&b.proc.child);
    write(&a.dir.join("q/more"), &pattern(100_000, 6));
    let mark = a.proc.log_len();
    let mut cmd = ferry();
    cmd.args(["handoff", "--etcd", &etcd.url, "--timeout", "4"])
        .args(["--to", &b.advertise]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no handoff within 4 s"), "{err}");
    assert!(err.contains("was still waiting for the target"), "{err}");
    assert!(err.contains("keeps leading"), "{err}");
    a.proc.wait_log_since(
        mark,
        &format!("handoff to {}: waiting for it to catch up", b.advertise),
        Duration::from_secs(10),
    );

    // b catches up now; a gives the handoff up instead of resigning.
    signal(&b.proc.child, libc::SIGCONT);
    let mut ended = String::new();
    wait_until(Duration::from_secs(60), "a's handoff to end", || {
        let log = a.proc.log.lock().unwrap()[mark..].join("\n");
        let end = log
            .lines()
            .find(|l| l.contains("resigning") || l.contains("handoff failed, still leading"));
        ended = end.unwrap_or_default().to_string();
        end.is_some()
    });
    assert!(ended.contains("its requester gave up"), "{ended}");
    assert_eq!(wait_leader(&[&a, &b], Duration::from_secs(10)), 0);
    drop(etcd);
}

/// A handoff that fails in its final drain leaves the leader leading, and watching again. An
/// application that went on writing after the on-leader-lost hook (it was told to stop) made
/// changes no watcher saw: the leader must still learn of them, and its followers get them.
#[test]
fn after_a_failed_handoff_the_leader_reports_what_was_written_while_it_was_not_watching() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let b_pid = env.dir("pids").join("b");
    let a_dir = env.dir("a");
    // At the drain, b stops acking, and a has one more file for it: the drain cannot finish.
    let hook = format!(
        "kill -STOP $(cat {}) && printf drained > {}",
        b_pid.display(),
        a_dir.join("q/drained").display()
    );
    let (a, b) = a_leads_b_in_sync_with(&env, &etcd.url, &["--on-leader-lost", &hook], &[]);
    write(&a.dir.join("meta.json"), b"{\"version\": 1}");
    write(&a.dir.join("q/old"), &pattern(5_000, 7));
    wait_same_files(&a.dir, &b.dir, Duration::from_secs(20));
    write(&b_pid, b.proc.child.id().to_string().as_bytes());

    let mark = a.proc.log_len();
    let requester = handoff_in_background(&etcd.url, &b.advertise);
    a.proc.wait_log_since(
        mark,
        "every write so far reported; waiting for it to sync the final drain",
        Duration::from_secs(30),
    );
    // The application writes on: a file made, one rewritten at the same length, one deleted.
    write(&a.dir.join("q/late"), &pattern(3_000, 8));
    write(&a.dir.join("meta.json"), b"{\"version\": 2}");
    std::fs::remove_file(a.dir.join("q/old")).unwrap();
    let mut b = b;
    b.proc.child.kill().unwrap();
    b.proc.child.wait().unwrap();
    let failed = a.proc.wait_log_since(
        mark,
        "handoff failed, still leading",
        Duration::from_secs(20),
    );
    assert!(failed.contains("disconnected"), "{failed}");
    let out = requester.join().unwrap();
    assert!(!out.status.success(), "{out:?}");

    // b, back, follows a and gets every file as it is now; and what is written from now on.
    write(&a.dir.join("q/after"), &pattern(4_000, 9));
    let b = start_node(&env, &etcd.url, &b.dir, b.port);
    wait_same_files(&a.dir, &b.dir, Duration::from_secs(30));
    assert_eq!(wait_leader(&[&a, &b], Duration::from_secs(10)), 0);
    let log = a.proc.log.lock().unwrap()[mark..].join("\n");
    assert!(!log.contains("cannot watch the data dir again"), "{log}");
    drop(etcd);
}

/// A stop that comes while an asked handoff waits for a lagging target: the node leaves within
/// its leave's bound (`--leave-handoff-timeout`), not the asked handoff's 30 s, and tries no
/// second handoff after it.
#[test]
fn a_stop_during_an_asked_handoff_waits_only_as_long_as_a_leave_would() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let one_second = ["--leave-handoff-timeout", "1"];
    let (mut a, b) = a_leads_b_in_sync_with(&env, &etcd.url, &one_second, &[]);
    let a_dir = a.dir.clone();
    stop_process(&b.proc.child);
    write(&a_dir.join("q/more"), &pattern(100_000, 6));
    let mark = a.proc.log_len();
    let requester = handoff_in_background(&etcd.url, &b.advertise);
    a.proc.wait_log_since(
        mark,
        &format!("handoff to {}: waiting for it to catch up", b.advertise),
        Duration::from_secs(10),
    );
    let asked = Instant::now();
    signal(&a.proc.child, libc::SIGTERM);
    let line = a
        .proc
        .wait_log_since(mark, "leaving without a handoff", Duration::from_secs(60));
    assert!(a.proc.child.wait().unwrap().success());
    let took = asked.elapsed();
    assert!(line.contains("told to stop"), "{line}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let log = a.proc.log.lock().unwrap()[mark..].join("\n");
    assert_eq!(
        log.matches("waiting for it to catch up").count(),
        1,
        "{log}"
    );
    let out = requester.join().unwrap();
    assert!(!out.status.success());
    drop((b, etcd));
}

/// The number before `what` in `line` (`"7 held as"` -> 7).
fn count_before(line: &str, what: &str) -> u64 {
    let head = &line[..line
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} in {line}"))];
    head.trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {what:?} in {line}"))
}

/// Nodes a (leading), b and c, all in sync on 6 segments and a state file, every node in the
/// in-sync set; then c stops, and while it is down the state file is rewritten (renamed into
/// place, as long as before: c's copy, which its held record vouches for, is of a generation no
/// longer the leader's) and a segment is written, which b gets. Returns the dirs and the nodes,
/// c stopped. `a_flags`: more flags for a.
fn a_leads_while_c_misses_a_rewrite(
    env: &Env,
    etcd: &str,
    a_flags: &[&str],
) -> (Vec<PathBuf>, Node, Node, Node) {
    let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| env.dir(n)).collect();
    for i in 0..6 {
        write(&dirs[0].join(format!("q/seg.{i}")), &pattern(200_000, i));
    }
    write(&dirs[0].join("q/state.json"), b"{\"head\": 6}");
    let a = start_node_with(env, etcd, &dirs[0], free_port(), a_flags);
    a.proc.wait_log("elected leader", Duration::from_secs(30));
    let (b, mut c) = (
        start_node(env, etcd, &dirs[1], free_port()),
        start_node(env, etcd, &dirs[2], free_port()),
    );
    let all = isr_of(&[&a.advertise, &b.advertise, &c.advertise]);
    wait_until(Duration::from_secs(30), "the ISR holding all three", || {
        read_key(etcd, "ferry/isr").as_deref() == Some(all.as_str())
    });
    for d in &dirs[1..] {
        wait_identical(&dirs[0], d, Duration::from_secs(20));
    }
    stop_node(&mut c);
    let state = dirs[0].join("q/state.json");
    write(&dirs[0].join("q/state.new"), b"{\"head\": 7}");
    std::fs::rename(dirs[0].join("q/state.new"), &state).unwrap();
    // A segment written right before the handoff or the failover, as a busy broker's active
    // ones are: b vouches for it too as it leads, since only its own writes as a follower
    // changed its copies, and each of those changes the size or the inode.
    write(&dirs[0].join("q/active"), &pattern(100_000, 9));
    wait_identical(&dirs[0], &dirs[1], Duration::from_secs(20));
    (dirs, a, b, c)
}

/// After a handoff the new leader goes on with the old one's instance, so the followers' held
/// records stay good: neither a follower nor the old leader, following the new one, hashes the
/// files that did not change, where before both hashed everything changed since their last
/// inventory. A copy of a generation the new leader no longer holds is still replaced: a
/// follower stopped before a file was rewritten gets the new version.
#[test]
fn after_a_handoff_followers_keep_what_their_held_records_vouch_for() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (dirs, a, b, c) = a_leads_while_c_misses_a_rewrite(&env, &etcd.url, &[]);
    let marks: Vec<usize> = [&a, &b].iter().map(|n| n.proc.log_len()).collect();
    handoff_ok(&etcd.url, Some(&b.advertise));

    let line = b
        .proc
        .wait_log_since(marks[1], "going on with instance", Duration::from_secs(20));
    assert_eq!(count_before(&line, " of "), 8, "{line}");
    let line = b
        .proc
        .wait_log_since(marks[1], "resuming instance", Duration::from_secs(20));
    assert_eq!(
        count_before(&line, " of "),
        8,
        "every file, the active one too: {line}"
    );
    let line = a
        .proc
        .wait_log_since(marks[0], "inventory: ", Duration::from_secs(30));
    eprintln!("{line}");
    assert_eq!(count_before(&line, "held as"), 8, "{line}");
    assert_eq!(count_before(&line, "bytes hashed"), 0, "{line}");
    let c = start_node(&env, &etcd.url, &dirs[2], c.port);
    let line = c.proc.wait_log("inventory: ", Duration::from_secs(30));
    eprintln!("{line}");
    assert!(count_before(&line, "held as") >= 6, "{line}");
    write(&dirs[1].join("q/after"), &pattern(10_000, 3));
    for d in [&dirs[0], &dirs[2]] {
        wait_identical(&dirs[1], d, Duration::from_secs(20));
    }
    drop((a, b, c, etcd));
}

/// After a failover (the leader killed) the new leader's instance goes on from the dead one's,
/// up to the last MARK the new leader had synced (`docs/PROTOCOL.md`, *After a failover*): a
/// follower that comes back hashes only what its held record cannot vouch for against the new
/// leader, where before it hashed every file changed since its last inventory. A copy of a
/// generation the new leader no longer holds is still replaced. The dead leader, started again,
/// holds what its own last checkpoint vouched for, where before it hashed every file it had
/// written since it last followed.
#[test]
fn after_a_failover_followers_keep_what_their_held_records_vouch_for_up_to_the_fork() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    // b, the only node of the in-sync set left running once a dies, is elected.
    let (dirs, a, b, c) = a_dies_and_b_forks(&env, &etcd.url);
    let c = c_comes_back_holding_all_but_the_rewrite(&env, &etcd.url, &dirs, c);

    let a = start_node(&env, &etcd.url, &dirs[0], a.port);
    let line = a.proc.wait_log("inventory: ", Duration::from_secs(30));
    eprintln!("{line}");
    assert_eq!(count_before(&line, "held as"), 8, "{line}");
    assert!(line.contains("(8 by its own record as leader)"), "{line}");
    assert_eq!(count_before(&line, "bytes hashed"), 0, "{line}");
    write(&dirs[1].join("q/after"), &pattern(10_000, 3));
    wait_identical(&dirs[1], &dirs[2], Duration::from_secs(20));
    wait_identical(&dirs[1], &dirs[0], Duration::from_secs(20));
    assert_eq!(
        std::fs::read(dirs[2].join("q/state.json")).unwrap(),
        b"{\"head\": 7}"
    );
    drop((a, b, c, etcd));
}

/// `a_leads_while_c_misses_a_rewrite`, then a is killed once its last checkpoint vouches for
/// every file, and b, elected, forks a's instance and leads: 8 of 8 files held. Returns a and c
/// stopped.
fn a_dies_and_b_forks(env: &Env, etcd: &str) -> (Vec<PathBuf>, Node, Node, Node) {
    // b, the only node of the in-sync set left running once a dies, is elected.
    let frequent = ["--record-interval-ms", "200"];
    let (dirs, mut a, b, c) = a_leads_while_c_misses_a_rewrite(env, etcd, &frequent);
    // a's last checkpoint vouches for every file: taken once each had settled.
    wait_until(
        Duration::from_secs(20),
        "a checkpoint after every file settled",
        || record_taken_ns(&dirs[0]).unwrap_or(0) > newest_ctime_ns(&dirs[0]) + 1_000_000_000,
    );
    let mark = b.proc.log_len();
    a.proc.child.kill().unwrap();
    let _ = a.proc.child.wait();
    let line = b
        .proc
        .wait_log_since(mark, "forking instance", Duration::from_secs(30));
    eprintln!("{line}");
    assert_eq!(count_before(&line, " of "), 8, "{line}");
    let line = b
        .proc
        .wait_log_since(mark, "resuming instance", Duration::from_secs(20));
    assert_eq!(count_before(&line, " of "), 8, "{line}");
    (dirs, a, b, c)
}

/// c (of `a_leads_while_c_misses_a_rewrite`), started again: it holds 6 of its 7 files, and
/// hashes only its copy of the file rewritten while it was away.
fn c_comes_back_holding_all_but_the_rewrite(
    env: &Env,
    etcd: &str,
    dirs: &[PathBuf],
    c: Node,
) -> Node {
    let c = start_node(env, etcd, &dirs[2], c.port);
    let line = c.proc.wait_log("inventory: ", Duration::from_secs(30));
    eprintln!("{line}");
    assert_eq!(count_before(&line, "held as"), 6, "{line}");
    assert!(count_before(&line, "bytes hashed") <= 11, "{line}");
    c
}

/// Two failovers in a row (a dies and b forks; a comes back, follows b, and then b dies and a
/// forks): a node that missed both still holds what it recorded under a's first instance
/// (`docs/PROTOCOL.md`, *After failovers in a row*), since a's fork names b's chain behind its
/// own link; one naming b's instance alone left it hashing every file.
#[test]
fn a_node_that_missed_two_failovers_in_a_row_still_holds_its_files() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (dirs, a, mut b, c) = a_dies_and_b_forks(&env, &etcd.url);
    let a = start_node(&env, &etcd.url, &dirs[0], a.port);
    let both = isr_of(&[&a.advertise, &b.advertise]);
    a.proc
        .wait_log("initial sync received", Duration::from_secs(30));
    wait_until(Duration::from_secs(30), "a back in the ISR", || {
        read_key(&etcd.url, "ferry/isr").as_deref() == Some(both.as_str())
    });
    let mark = a.proc.log_len();
    b.proc.child.kill().unwrap();
    let _ = b.proc.child.wait();
    let line = a
        .proc
        .wait_log_since(mark, "forking instance", Duration::from_secs(30));
    eprintln!("{line}");
    assert!(line.contains("; instance "), "the earlier link: {line}");

    let c = c_comes_back_holding_all_but_the_rewrite(&env, &etcd.url, &dirs, c);
    write(&dirs[0].join("q/after"), &pattern(10_000, 3));
    wait_identical(&dirs[0], &dirs[2], Duration::from_secs(20));
    drop((a, c, etcd));
}

/// A handoff after a failover passes the fork on with the instance (`docs/PROTOCOL.md`, *Across
/// a handoff*): a follower that missed both still holds what its held record vouches for up to
/// the fork, where before the target led the instance without it and the follower hashed every
/// file it had recorded under the dead leader's instance.
#[test]
fn a_handoff_after_a_failover_passes_the_fork_on() {
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let (dirs, a, b, c) = a_dies_and_b_forks(&env, &etcd.url);
    let a = start_node(&env, &etcd.url, &dirs[0], a.port);
    let both = isr_of(&[&a.advertise, &b.advertise]);
    wait_until(Duration::from_secs(30), "a back in the ISR", || {
        read_key(&etcd.url, "ferry/isr").as_deref() == Some(both.as_str())
    });
    let mark = a.proc.log_len();
    handoff_ok(&etcd.url, Some(&a.advertise));
    let line = a
        .proc
        .wait_log_since(mark, "going on with instance", Duration::from_secs(20));
    eprintln!("{line}");
    assert!(line.contains("a fork of instance"), "{line}");
    assert_eq!(read_key(&etcd.url, "ferry/handoff-fork"), None);

    let c = c_comes_back_holding_all_but_the_rewrite(&env, &etcd.url, &dirs, c);
    write(&dirs[0].join("q/after"), &pattern(10_000, 3));
    for d in [&dirs[1], &dirs[2]] {
        wait_identical(&dirs[0], d, Duration::from_secs(20));
    }
    drop((a, b, c, etcd));
}
