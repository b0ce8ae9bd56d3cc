//! The `ferry` processes loadgen runs beside itself, and what they cost: CPU seconds, the time
//! their threads waited for a CPU, and peak RSS, read from /proc, summed over every incarnation
//! of a follower that was killed and restarted.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// CPU seconds (user + system) and peak RSS in KiB of a live process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')' and state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())?;
    Some(((utime + stime) / ticks, hwm_kib))
}

/// The name of the thread in which an embedded leader, or `ferry lead`, sends to its followers.
pub const SENDER_THREAD: &str = ferry::leader::SERVER_THREAD_NAME;

/// What each thread of process `pid` has waited for a CPU so far (runnable, not running), in
/// ns, by thread id, with the thread's name: the second field of /proc/PID/task/TID/schedstat.
/// Empty if the process is gone or the kernel keeps no such figures (no CONFIG_SCHED_INFO).
fn threads_cpu_wait_ns(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut waits = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return waits;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended meanwhile has no file left: it counts as of the last sample.
        let Some(times) = ferry::schedstat::of_thread(pid, tid) else {
            continue;
        };
        let wait_ns = u64::try_from(times.waiting.as_nanos()).unwrap_or(u64::MAX);
        let name = std::fs::read_to_string(task.path().join("comm"))
            .map(|n| n.trim_end().to_string())
            .unwrap_or_default();
        waits.insert(tid, (name, wait_ns));
    }
    waits
}

/// How long a process's threads waited for a CPU, from samples of /proc: each thread counts
/// what it waited from its start (or, for a thread already there at `from_now`, from then)
/// until the last sample that saw it, so a thread that ended between samples keeps what it
/// waited until then. On a machine short of CPUs this is where latency goes that no profile
/// of the process's own code shows.
#[derive(Debug, Default)]
pub struct CpuWaits {
    /// Thread id -> (name, ns waited before counting began, ns at the last sample).
    threads: HashMap<u32, (String, u64, u64)>,
}

impl CpuWaits {
    /// Counting from now: what the threads of `pid` alive now have waited so far is left out.
    pub fn from_now(pid: u32) -> CpuWaits {
        let threads = threads_cpu_wait_ns(pid)
            .into_iter()
            .map(|(tid, (name, ns))| (tid, (name, ns, ns)))
            .collect();
        CpuWaits { threads }
    }

    pub fn sample(&mut self, pid: u32) {
        for (tid, (name, ns)) in threads_cpu_wait_ns(pid) {
            let t = self.threads.entry(tid).or_insert((String::new(), 0, 0));
            // Named as of the last sample (a thread may name itself after it started).
            t.0 = name;
            t.2 = t.2.max(ns);
        }
    }

    /// Seconds all threads seen waited; `None` if no sample saw any (no schedstats).
    pub fn total_s(&self) -> Option<f64> {
        self.sum_s(|_| true)
    }

    /// Seconds the threads named `name` waited; `None` if no sample saw one.
    pub fn thread_s(&self, name: &str) -> Option<f64> {
        self.sum_s(|n| n == name)
    }

    fn sum_s(&self, named: impl Fn(&str) -> bool) -> Option<f64> {
        let mut seen = false;
        let mut ns = 0u64;
        for (name, first, last) in self.threads.values() {
            if named(name) {
                seen = true;
                ns += last - first;
            }
        }
        seen.then_some(ns as f64 / 1e9)
    }
}

/// The local ports of the TCP sockets process `pid` holds open (its file descriptors' socket
/// inodes, looked up in its network namespace's /proc tables): how a follower process is told
/// apart among the connections a leader reports, by their peer addresses. Empty if /proc does
/// not say (the process is gone).
pub fn local_tcp_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    // Each read walks the kernel's whole table of TCP sockets (about 6 ms here): the IPv6
    // one only if the IPv4 one had none of them.
    for table in ["tcp", "tcp6"] {
        if !ports.is_empty() {
            break;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // "sl local_address rem_address st ... uid timeout inode ...", the address as
        // hex IP ':' hex port.
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            if !inodes.iter().any(|i| i == inode) {
                continue;
            }
            if let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// CPU seconds and peak RSS (KiB) of this process so far.
pub fn self_usage() -> (f64, u64) {
    // SAFETY: rusage is plain data and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to our rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as u64,
    )
}

pub struct Proc {
    pub name: String,
    pub dir: PathBuf,
    args: Vec<OsString>,
    child: Child,
    /// CPU seconds of incarnations already gone.
    cpu_s_past: f64,
    /// What the current incarnation's threads waited for a CPU, and those gone before it.
    waits: CpuWaits,
    cpu_wait_s_past: Option<f64>,
    rss_peak_kib: u64,
    last: (f64, u64),
    /// The local TCP ports last found for the process with this pid (`tcp_ports`).
    ports: (u32, Vec<u16>),
}

impl Proc {
    pub fn spawn(name: String, dir: PathBuf, args: Vec<OsString>) -> io::Result<Proc> {
        let child = Self::start(&args)?;
        Ok(Proc {
            name,
            dir,
            args,
            child,
            cpu_s_past: 0.0,
            waits: CpuWaits::default(),
            cpu_wait_s_past: None,
            rss_peak_kib: 0,
            last: (0.0, 0),
            ports: (0, Vec::new()),
        })
    }

    fn start(args: &[OsString]) -> io::Result<Child> {
        let exe = std::env::var_os("FERRY_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let me = std::env::current_exe().ok()?;
                Some(me.with_file_name("ferry"))
            })
            .ok_or_else(|| io::Error::other("cannot locate the ferry binary"))?;
        Command::new(&exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", exe.display())))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The local ports of the process's TCP sockets, looked up again (`local_tcp_ports`, a
    /// few milliseconds) only when none of those found before is among `peers`: after a
    /// restart or a reconnection, not at every sample.
    pub fn tcp_ports(&mut self, peers: &[u16]) -> &[u16] {
        let pid = self.pid();
        if self.ports.0 != pid || !self.ports.1.iter().any(|p| peers.contains(p)) {
            self.ports = (pid, local_tcp_ports(pid));
        }
        &self.ports.1
    }

    /// Records the process's current usage (call now and then, and before it goes away).
    pub fn sample(&mut self) {
        if let Some(now) = proc_usage(self.pid()) {
            self.last = now;
            self.rss_peak_kib = self.rss_peak_kib.max(now.1);
        }
        self.waits.sample(self.pid());
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILL, then a fresh incarnation with the same arguments.
    pub fn kill_and_restart(&mut self) -> io::Result<()> {
        self.sample();
        self.cpu_s_past += self.last.0;
        self.last = (0.0, 0);
        self.cpu_wait_s_past = self.cpu_wait_s();
        self.waits = CpuWaits::default();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::start(&self.args)?;
        Ok(())
    }

    /// Total CPU seconds and peak RSS (KiB) over every incarnation.
    pub fn usage(&self) -> (f64, u64) {
        (self.cpu_s_past + self.last.0, self.rss_peak_kib)
    }

    /// Seconds its threads waited for a CPU over every incarnation (`CpuWaits`), and those of
    /// its `SENDER_THREAD` (a `ferry lead`'s) in this one; `None` where not seen.
    pub fn cpu_waits(&self) -> (Option<f64>, Option<f64>) {
        (self.cpu_wait_s(), self.waits.thread_s(SENDER_THREAD))
    }

    fn cpu_wait_s(&self) -> Option<f64> {
        match (self.cpu_wait_s_past, self.waits.total_s()) {
            (Some(past), now) => Some(past + now.unwrap_or(0.0)),
            (None, now) => now,
        }
    }

    pub fn stop(&mut self) {
        self.sample();
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads that keep one CPU busy each wait for it about half the time: the waits read
    /// from /proc count that, for each thread under its name, also for threads that started
    /// after counting began.
    #[test]
    fn threads_that_share_one_cpu_are_seen_waiting_for_it() {
        let pid = std::process::id();
        let mut waits = CpuWaits::from_now(pid);
        let busy_for = std::time::Duration::from_millis(300);
        let spin = move || {
            crate::cpus::pin_to(0).unwrap();
            let started = std::time::Instant::now();
            while started.elapsed() < busy_for {
                std::hint::spin_loop();
            }
        };
        let spinners: Vec<_> = (0..2)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("spinner{i}"))
                    .spawn(spin)
                    .unwrap()
            })
            .collect();
        // Sampled while they run: once they end, /proc has no file left for them.
        std::thread::sleep(busy_for * 2 / 3);
        waits.sample(pid);
        for s in spinners {
            s.join().unwrap();
        }
        let spinner0 = waits.thread_s("spinner0").expect("spinner0 seen");
        let spinner1 = waits.thread_s("spinner1").expect("spinner1 seen");
        // Sampled at 200 ms of 300: together they had waited about 200 ms by then.
        assert!(spinner0 + spinner1 > 0.05, "{spinner0} + {spinner1}");
        assert!(waits.total_s().unwrap() >= spinner0 + spinner1);
        assert_eq!(waits.thread_s("no such thread"), None);
    }

    #[test]
    fn a_process_s_tcp_ports_are_those_of_the_sockets_it_holds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ports = local_tcp_ports(std::process::id());
        let (listening, connected) = (
            listener.local_addr().unwrap().port(),
            client.local_addr().unwrap().port(),
        );
        assert!(ports.contains(&listening), "{listening} not in {ports:?}");
        assert!(ports.contains(&connected), "{connected} not in {ports:?}");
        drop(client);
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        drop(other);
        assert!(!local_tcp_ports(std::process::id()).contains(&port));
        assert!(local_tcp_ports(u32::MAX).is_empty());
    }
}
