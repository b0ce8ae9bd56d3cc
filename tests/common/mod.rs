//! Helpers for the integration tests: real `ferry` processes on 127.0.0.1 with real files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SECRET: &str = "integration-test-secret";
pub const ENGINES: [&str; 2] = ["uring", "fallback"];

pub fn ferry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env("RUST_LOG", "info").env_remove("FERRY_SECRET");
    cmd
}

/// `ferry` (the caller adds its arguments) in a user namespace of its own, as root there,
/// whose `/proc/sys/user/{name}` limit (e.g. max_inotify_watches) is `limit`: only this process
/// is limited, not the machine's other users of the same uid. Needs unshare(1) (util-linux).
pub fn ferry_with_user_limit(name: &str, limit: u32) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "sh", "-c"])
        .arg(format!(
            "echo {limit} > /proc/sys/user/{name} && exec \"$@\""
        ))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .env("RUST_LOG", "info")
        .env_remove("FERRY_SECRET");
    cmd
}

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub secret_file: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let secret_file = tmp.path().join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        // Its owner's only, as ferry asks of a secret file.
        std::fs::set_permissions(
            &secret_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Env { tmp, secret_file }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// A running process whose stderr is collected line by line.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, log }
    }

    /// Waits until a log line contains `needle`; returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Lines logged so far: a mark for `wait_log_since`.
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Like `wait_log`, among the lines logged after the first `from`, and polling more often
    /// (for a test that acts right after a log line).
    pub fn wait_log_since(&self, from: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap()[from..]
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for the process to exit (failing past it); its exit status and how
    /// long that took.
    pub fn exit_within(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, began.elapsed());
            }
            assert!(
                began.elapsed() < timeout,
                "still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGHUP (a reload) and waits up to 10 s for a line containing `needle` logged
    /// after it.
    pub fn reload(&self, needle: &str) -> String {
        let from = self.log_len();
        signal(&self.child, libc::SIGHUP);
        self.wait_log_since(from, needle, Duration::from_secs(10))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct LeaderProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// `ferry lead` on an ephemeral port of 127.0.0.1; the caller may add flags.
pub fn lead_cmd(env: &Env, dir: &Path, engine: &str) -> Command {
    lead_cmd_at(env, dir, engine, "127.0.0.1:0")
}

/// `lead_cmd` listening on `listen` (a leader restarted on the address its followers know).
pub fn lead_cmd_at(env: &Env, dir: &Path, engine: &str, listen: &str) -> Command {
    let mut cmd = ferry();
    cmd.arg("lead")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(listen)
        .arg("--secret-file")
        .arg(&env.secret_file)
        .arg("--io-engine")
        .arg(engine);
    cmd
}

pub fn start_leader(env: &Env, dir: &Path, engine: &str) -> LeaderProc {
    start_leader_with(env, dir, engine, &[])
}

/// `start_leader` with more flags.
pub fn start_leader_with(env: &Env, dir: &Path, engine: &str, flags: &[&str]) -> LeaderProc {
    let mut cmd = lead_cmd(env, dir, engine);
    cmd.args(flags);
    let proc = Proc::spawn(cmd);
    let addr = listen_addr(&proc);
    LeaderProc { proc, addr }
}

/// The `--http` address a process logged ("metrics on http://ADDR/metrics").
pub fn http_addr(proc: &Proc) -> String {
    let line = proc.wait_log("metrics on http://", Duration::from_secs(20));
    let rest = line.rsplit("http://").next().unwrap();
    rest.trim().trim_end_matches("/metrics").to_string()
}

/// The replication address a `ferry lead` process logged ("listening on ADDR").
pub fn listen_addr(proc: &Proc) -> SocketAddr {
    let line = proc.wait_log("listening on ", Duration::from_secs(20));
    line.rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn follow_cmd(env: &Env, dir: &Path, addr: SocketAddr, engine: &str) -> Command {
    let mut cmd = ferry();
    cmd.arg("follow")
        .arg("--data-dir")
        .arg(dir)
        .arg("--leader")
        .arg(addr.to_string())
        .arg("--secret-file")
        .arg(&env.secret_file)
        .arg("--io-engine")
        .arg(engine);
    cmd
}

/// Runs `ferry follow --once` to completion (bounded by a 60 s watchdog).
pub fn follow_once(env: &Env, dir: &Path, addr: SocketAddr, engine: &str) -> Output {
    let mut cmd = follow_cmd(env, dir, addr, engine);
    cmd.arg("--once");
    run_bounded(cmd, Duration::from_secs(60))
}

/// `follow_once` that must succeed; its output.
pub fn follow_once_ok(env: &Env, dir: &Path, addr: SocketAddr, engine: &str) -> Output {
    let out = follow_once(env, dir, addr, engine);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(Mutex::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if *flag.lock().unwrap() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY-free: a plain kill(1) of a child that overran its time.
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    *done.lock().unwrap() = true;
    out
}

/// Asserts that `out` is of a process that failed and whose stderr holds each of `needles`;
/// returns that stderr.
pub fn failed_saying(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it succeeded:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    stderr
}

/// Sends `signal` (SIGSTOP, SIGCONT) to this test's child process `child`.
pub fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is of a child
    // we spawned and have not waited for, so it cannot have been reused.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", child.id());
}

/// SIGSTOP, and waits until the kernel shows the process stopped (`/proc/PID/stat`), so that
/// what the caller does next happens while it cannot run: a thread busy in a syscall stops
/// only when that returns.
pub fn stop_process(child: &Child) {
    signal(child, libc::SIGSTOP);
    let stat = format!("/proc/{}/stat", child.id());
    wait_until(Duration::from_secs(10), "the process stopped", || {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        text.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    });
}

pub fn start_follower(
    env: &Env,
    dir: &Path,
    addr: SocketAddr,
    engine: &str,
    durability: &str,
) -> Proc {
    let mut cmd = follow_cmd(env, dir, addr, engine);
    cmd.arg("--durability").arg(durability);
    Proc::spawn(cmd)
}

pub fn checksum(dir: &Path) -> String {
    try_checksum(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// `ferry checksum DIR`, or its error (a file can vanish while a dir is still changing).
pub fn try_checksum(dir: &Path) -> Result<String, String> {
    let out = ferry().arg("checksum").arg(dir).output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// Polls `done` every 20 ms until it holds; fails naming `what` if `timeout` passes first.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until both dirs have identical checksums; panics with both listings at the deadline.
pub fn wait_identical(a: &Path, b: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        // A follower still applying a delete can lose a file under `ferry checksum`: that is
        // "not identical yet", not a failure.
        let (x, y) = match (try_checksum(a), try_checksum(b)) {
            (Ok(x), Ok(y)) if x == y => return,
            (x, y) => (x.unwrap_or_else(|e| e), y.unwrap_or_else(|e| e)),
        };
        assert!(
            Instant::now() < deadline,
            "not identical after {timeout:?}\nleader:\n{x}\nfollower:\n{y}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The "payload bytes received" figure from `ferry follow --once`'s summary line.
pub fn payload_bytes(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("in sync:"))
        .unwrap_or_else(|| {
            panic!(
                "no summary line; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let before = line.split(" payload bytes").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Keeps the calling thread, and what it starts from then on, on CPU 0 only: a thread that
/// must share it waits for it. Async-signal-safe, so it may also run in `Command::pre_exec`,
/// putting a child and all its threads there.
pub fn on_cpu_0() -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, all zeroes the empty set; CPU_SET writes bit 0 of
    // it, and sched_setaffinity reads the set of the size passed, for this thread.
    unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lowers the calling process's limit of open files (RLIMIT_NOFILE, soft and hard) to `files`,
/// for what it execs next. Async-signal-safe (one setrlimit), so it may run in
/// `Command::pre_exec`.
pub fn limit_open_files(files: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: files,
        rlim_max: files,
    };
    // SAFETY: setrlimit reads the struct passed, which lives on this stack for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Refuses io_uring to the calling thread and what it starts from then on, as Docker's default
/// seccomp profile does on many hosts: io_uring_setup, io_uring_enter and io_uring_register
/// fail with EPERM, every other syscall runs. For `Command::pre_exec` (see `refuse_syscalls`).
pub fn refuse_io_uring() -> std::io::Result<()> {
    const IO_URING: [libc::c_long; 3] = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    refuse_syscalls(&IO_URING, libc::EPERM)
}

/// Makes the syscalls `nrs` (at most `REFUSED_SYSCALLS_MAX`) fail with `errno` for the calling
/// thread and what it starts from then on; every other syscall runs. Async-signal-safe (two
/// prctl calls on a filter built on the stack), so it may run in `Command::pre_exec`; the
/// filter outlives the exec. The numbers are this build's architecture's, and the filter does
/// not check the architecture: ferry makes no syscall of another ABI.
pub fn refuse_syscalls(nrs: &[libc::c_long], errno: i32) -> std::io::Result<()> {
    fn statement(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    let n = nrs.len();
    assert!((1..=REFUSED_SYSCALLS_MAX).contains(&n));
    let allow = statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    let mut program = [allow; REFUSED_SYSCALLS_MAX + 3];
    // The syscall number: `nr` is at offset 0 of struct seccomp_data.
    program[0] = statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0);
    for (k, nr) in nrs.iter().enumerate() {
        // On a match, jump over the checks left to the ERRNO return; after the last check
        // without one, over that return to ALLOW.
        program[1 + k] = libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: (n - 1 - k) as u8,
            jf: u8::from(k == n - 1),
            k: *nr as u32,
        };
    }
    program[1 + n] = statement(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | errno as u32,
    );
    program[2 + n] = allow;
    let filter = libc::sock_fprog {
        len: (n + 3) as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only. PR_SET_SECCOMP reads the `sock_fprog`
    // passed by pointer and the `len` instructions it points to, both on this stack frame and
    // alive across the call; the kernel copies the program, so nothing need outlive it.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &filter as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How many syscalls `refuse_syscalls` takes at once.
pub const REFUSED_SYSCALLS_MAX: usize = 4;

pub fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Every regular file under `dir` by its relative path, ferry's own `.ferry/` left out (what
/// `ferry checksum` lists).
pub fn files(dir: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && rel != ".ferry" {
                walk(root, &path, out);
            } else if kind.is_file() {
                out.insert(rel, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `None` if both trees hold the same files with the same bytes; else the first difference.
/// Byte comparison: much faster than `checksum` (a debug build's SHA-1) on big trees.
pub fn tree_difference(a: &Path, b: &Path) -> Option<String> {
    let (fa, fb) = (files(a), files(b));
    let (na, nb): (Vec<&String>, Vec<&String>) = (fa.keys().collect(), fb.keys().collect());
    if na != nb {
        let only_a: Vec<_> = na.iter().filter(|p| !fb.contains_key(**p)).collect();
        let only_b: Vec<_> = nb.iter().filter(|p| !fa.contains_key(**p)).collect();
        return Some(format!(
            "only in {}: {only_a:?}; only in {}: {only_b:?}",
            a.display(),
            b.display()
        ));
    }
    for (rel, pa) in &fa {
        let (x, y) = (
            std::fs::read(pa).unwrap_or_default(),
            std::fs::read(&fb[rel]).unwrap_or_default(),
        );
        if x != y {
            let at = x
                .iter()
                .zip(&y)
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len()));
            return Some(format!(
                "{rel}: {} vs {} bytes, first difference at {at}",
                x.len(),
                y.len()
            ));
        }
    }
    None
}

/// Polls until `tree_difference(a, b)` is `None`; panics with the last difference at the deadline.
pub fn wait_same_files(a: &Path, b: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(diff) = tree_difference(a, b) else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "not identical after {timeout:?}: {diff}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry node` with the settings the cluster tests share (2 s lease, fallback engine), listening
/// and advertising on `advertise`. The caller adds the secret and anything else.
pub fn node_cmd(etcd: &str, dir: &Path, advertise: &str) -> Command {
    let mut cmd = ferry();
    node_args(&mut cmd, etcd, dir, advertise);
    cmd
}

/// `node_cmd`'s arguments, on a command that runs `ferry` some other way.
pub fn node_args(cmd: &mut Command, etcd: &str, dir: &Path, advertise: &str) {
    cmd.args(["node", "--lease-ttl", "2", "--io-engine", "fallback"])
        .args([
            "--etcd",
            etcd,
            "--listen",
            advertise,
            "--advertise",
            advertise,
        ])
        .arg("--data-dir")
        .arg(dir);
}

/// A `ferry node` of a test cluster (2 s lease, fallback engine, `--http` on a free port).
pub struct Node {
    pub proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
    pub advertise: String,
}

pub fn start_node(env: &Env, etcd: &str, dir: &Path, port: u16) -> Node {
    start_node_with(env, etcd, dir, port, &[])
}

/// `start_node` with more flags.
pub fn start_node_with(env: &Env, etcd: &str, dir: &Path, port: u16, flags: &[&str]) -> Node {
    let mut args: Vec<&OsStr> = ["--http", "127.0.0.1:0", "--secret-file"]
        .map(OsStr::new)
        .to_vec();
    args.push(env.secret_file.as_os_str());
    args.extend(flags.iter().map(OsStr::new));
    spawn_node(etcd, dir, port, args)
}

/// A `ferry node` of a test cluster on 127.0.0.1:`port` (`node_cmd`'s settings) with `args`
/// added: where its secret comes from is the caller's to give.
pub fn spawn_node<S: AsRef<OsStr>>(
    etcd: &str,
    dir: &Path,
    port: u16,
    args: impl IntoIterator<Item = S>,
) -> Node {
    let advertise = format!("127.0.0.1:{port}");
    let mut cmd = node_cmd(etcd, dir, &advertise);
    cmd.args(args);
    Node {
        proc: Proc::spawn(cmd),
        dir: dir.to_path_buf(),
        port,
        advertise,
    }
}

/// The socket systemd gives a `Type=notify` service (`NOTIFY_SOCKET`), here a test's own.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind(env: &Env, name: &str) -> NotifySocket {
        let path = env.tmp.path().join(name);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        NotifySocket { path, socket }
    }

    /// Sets the variables systemd sets for a unit with a watchdog of `WatchdogSec=0.4`.
    pub fn configure(&self, cmd: &mut Command) {
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "400000");
    }

    /// The next message that contains `needle`, reading (up to 30 s each) past any other.
    pub fn wait_for(&self, needle: &str) -> String {
        let mut buf = [0u8; 512];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no notification with {needle:?}: {e}"));
            let message = String::from_utf8_lossy(&buf[..n]).to_string();
            if message.contains(needle) {
                return message;
            }
        }
    }
}

/// The key-value at `key` in etcd, if it is set and etcd answers.
pub fn etcd_get(etcd: &str, key: &str) -> Option<etcd_client::KeyValue> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd], None).await.ok()?;
        let resp = client.get(key, None).await.ok()?;
        resp.kvs().first().cloned()
    })
}

/// Sets `key` to `value` in etcd, as a node would.
pub fn etcd_put(etcd: &str, key: &str, value: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd], None).await.unwrap();
        client.put(key, value, None).await.unwrap();
    });
}

/// The value of `key` in etcd, if it is set and etcd answers.
pub fn read_key(etcd: &str, key: &str) -> Option<String> {
    etcd_get(etcd, key)?.value_str().ok().map(str::to_string)
}

/// A port for a process the test starts later (a node's --listen, etcd's ports). Taken below
/// the kernel's ephemeral range (32768 and up on Linux): a port the kernel hands out for bind(0)
/// can go to any outgoing connection before the process binds it, which made a node fail with
/// "Address already in use". Each test process walks its own stretch of 10000..32000.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() * 1009) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A single-member etcd cluster (Debian's etcd-server), killed on drop.
pub struct Etcd {
    pub proc: Proc,
    /// The client URL on the first address it listens on.
    pub url: String,
}

pub fn start_etcd(dir: &Path) -> Etcd {
    start_etcd_on(dir, free_port())
}

/// etcd serving clients on 127.0.0.1:`client` (a restarted etcd can keep its port).
pub fn start_etcd_on(dir: &Path, client: u16) -> Etcd {
    start_etcd_at(dir, &["127.0.0.1"], client)
}

/// etcd serving clients on port `client` of each of `ips`, its peer port on the first; `url`
/// names the first.
pub fn start_etcd_at(dir: &Path, ips: &[&str], client: u16) -> Etcd {
    let peer = free_port();
    let urls: Vec<String> = ips
        .iter()
        .map(|ip| format!("http://{ip}:{client}"))
        .collect();
    let peer_url = format!("http://{}:{peer}", ips[0]);
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "t", "--data-dir"])
        .arg(dir)
        .args(["--listen-client-urls", &urls.join(",")])
        .args(["--advertise-client-urls", &urls[0]])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")]);
    let proc = Proc::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect((ips[0], client)).is_err() {
        assert!(
            Instant::now() < deadline,
            "etcd did not start:\n{}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Etcd {
        proc,
        url: urls[0].clone(),
    }
}

/// When the leader's record in `leader_dir` was taken (its look at the files), if there is one.
pub fn record_taken_ns(leader_dir: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(leader_dir.join(".ferry/leader")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("taken_ns "))
        .and_then(|n| n.parse().ok())
}

/// Appends `bytes` to the file at `path`, as an application writes.
pub fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

/// The newest ctime of the files under `dir` (ferry's state left out), in ns.
pub fn newest_ctime_ns(dir: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let mut newest = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() && entry.file_name() != ".ferry" {
                todo.push(entry.path());
            } else if meta.is_file() {
                newest = newest.max(meta.ctime() * 1_000_000_000 + meta.ctime_nsec());
            }
        }
    }
    newest
}

/// The length the follower's held record (`.ferry/held`, a journal whose later lines stand)
/// notes for `path` (its stamp's size), if it notes it. A line: instance, position, birth,
/// marked length, inode, size, mtime, ctime, path.
pub fn held_len(follower_dir: &Path, path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(follower_dir.join(".ferry/held")).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| l.splitn(9, ' ').collect::<Vec<_>>().try_into().ok())
        .find(|f: &[&str; 9]| f[8] == path)
        .and_then(|f| f[5].parse().ok())
}

/// `ferry lead` of `dir` on `listen` with the secret in `secret_file` (fallback engine); the
/// caller may add flags (`--previous-secret-file`).
pub fn lead_with_secret_cmd(dir: &Path, listen: &str, secret_file: &Path) -> Command {
    let mut cmd = ferry();
    cmd.args(["lead", "--io-engine", "fallback", "--listen", listen])
        .arg("--data-dir")
        .arg(dir)
        .arg("--secret-file")
        .arg(secret_file);
    cmd
}

/// `ferry follow` of `dir` from the leader at `leader` with the secret in `secret_file`
/// (fallback engine).
pub fn follow_with_secret_cmd(dir: &Path, leader: &str, secret_file: &Path) -> Command {
    let mut cmd = ferry();
    cmd.args(["follow", "--io-engine", "fallback", "--leader", leader])
        .arg("--data-dir")
        .arg(dir)
        .arg("--secret-file")
        .arg(secret_file);
    cmd
}

/// `follow_with_secret_cmd` with `--once`, bounded by a 60 s watchdog.
pub fn follow_once_with_secret(dir: &Path, leader: &str, secret_file: &Path) -> Output {
    let mut cmd = follow_with_secret_cmd(dir, leader, secret_file);
    cmd.arg("--once");
    run_bounded(cmd, Duration::from_secs(60))
}

/// Waits up to `timeout` for `proc` to exit; its status.
pub fn exit_within(proc: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {timeout:?}:\n{}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops `follower` (SIGTERM: it exits 0, dating its held record) and leads its dir `dir` by
/// hand (`ferry lead`, with `--http`): the leader, and the line it logged as it forked the
/// instance the dir followed.
pub fn lead_by_hand(env: &Env, dir: &Path, engine: &str, follower: Proc) -> (LeaderProc, String) {
    let mut follower = follower;
    signal(&follower.child, libc::SIGTERM);
    assert!(follower.child.wait().unwrap().success());
    let leader = start_leader_with(env, dir, engine, &["--http", "127.0.0.1:0"]);
    let line = leader
        .proc
        .wait_log("forking instance", Duration::from_secs(20));
    (leader, line)
}

/// Waits until every file of `dir` changed at least `LEADER_RECORD_SETTLE_MS` ago: a leader
/// started on a follower's dir vouches only for files settled by the follower's stop.
pub fn wait_settled(dir: &Path) {
    wait_settled_since(newest_ctime_ns(dir));
}

/// Waits until a file changed at `ctime_ns` has settled by the time a follower stopped now: the
/// stop is dated by the kernel's coarse clock, which may be a tick behind the one read here
/// (a run under load saw the held record dated 1.1 ms before the time this waited for, and its
/// newest file not vouched for), so 100 ms more than `LEADER_RECORD_SETTLE_MS`.
pub fn wait_settled_since(ctime_ns: i64) {
    let settled_ns = ctime_ns + 1_100_000_000;
    wait_until(Duration::from_secs(10), "the copies settled", || {
        ferry::index::now_ns() > settled_ns
    });
}
