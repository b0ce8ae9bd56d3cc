//! Fault injection against real `ferry` processes (issue 6): a follower killed with SIGKILL at
//! random points of its sync, a follower whose disk fills, a cluster leader killed under load, a
//! leader partitioned from etcd and its followers by network namespaces, a leader that goes
//! silent in the middle of a payload, a leader and follower restarted at random while the
//! broker writes on, and a broker that embeds the leader (`embedding_broker`) killed at random.
//! Random choices come from one seed, printed (`FERRY_FAULT_SEED` replays
//! another); tests that need root (tmpfs, namespaces) say why they skip without it.
//!
//! What a follower may show under a file's real name, from how it writes (src/follower/apply.rs
//! and the session): a file it lacks, or whose copy does not match, arrives whole in
//! `.ferry/tmp/` and is renamed over the real name once its length checks out; only a copy that
//! is already a byte prefix of the leader's gets DATA under its real name, at offsets from its
//! end, and those bytes reach the file in wire order (each write completes before the next,
//! `engine::receive`). So at any instant, even right after a SIGKILL, every visible file is
//! either the copy the follower held before (untouched), or a byte prefix of the leader's copy;
//! and a prefix shorter than the leader's file only for a file the follower already held as a
//! prefix (a tail being appended).
//! `check_not_torn` asserts exactly that.

mod common;
mod embedding_broker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
/// The seed of every random choice here unless `FERRY_FAULT_SEED` says otherwise.
const SEED_DEFAULT: u64 = 0x5eed_f417;

fn seed() -> u64 {
    let seed = std::env::var("FERRY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED_DEFAULT);
    eprintln!("seed {seed} (set FERRY_FAULT_SEED to replay another)");
    seed
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in [lo, hi): many small files, a few big ones.
    fn size(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        (a + self.unit() * (b - a)).exp() as u64
    }
}

/// Random bytes that file contents are cut from. Its length is prime, so no power-of-two offset
/// (a pipe, a frame, a page) lines up with its period.
fn pool() -> &'static [u8] {
    const POOL_BYTES: u64 = 1_000_003;
    static POOL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let mut rng = Rng(0x9001);
        let mut pool: Vec<u8> = (0..POOL_BYTES.div_ceil(8))
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        pool.truncate(POOL_BYTES as usize);
        pool
    })
}

/// Bytes `[offset, offset + len)` of the file whose content is keyed by `key`: any range can be
/// regenerated, appending the next range extends the same content, and files of different keys
/// differ (the pool read from another starting point). Slices, not a loop per byte: fast even
/// in a debug build.
fn content(key: u64, offset: u64, len: u64) -> Vec<u8> {
    let pool = pool();
    let period = pool.len() as u64;
    let mut at = ((key % period + offset % period) % period) as usize;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let n = (len as usize - out.len()).min(pool.len() - at);
        out.extend_from_slice(&pool[at..at + n]);
        at = 0;
    }
    out
}

/// What a file of the test's model holds: `content(key, 0, len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    key: u64,
    len: u64,
}

type Model = BTreeMap<String, Spec>;

fn append_to(path: &Path, spec: &mut Spec, more: u64) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(&content(spec.key, spec.len, more)).unwrap();
    spec.len += more;
}

/// Writes `spec` to `path` the way a broker rewrites a small file: a new file renamed over it.
fn replace(scratch: &Path, path: &Path, spec: Spec) {
    let tmp = scratch.join("replacement");
    std::fs::write(&tmp, content(spec.key, 0, spec.len)).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Length of the common prefix of two byte strings (compared in blocks: memcmp, even in a
/// debug build).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut at = 0;
    while at < n {
        let end = (at + 65536).min(n);
        if a[at..end] != b[at..end] {
            let (x, y) = (&a[at..end], &b[at..end]);
            return at + x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
        }
        at = end;
    }
    n
}

/// The invariant of this file's header, for a follower (not running) that held `before` and is
/// syncing towards a leader holding `now`. Returns how many payload bytes the follower still
/// lacks (what a resumed sync must send), or what is torn.
fn check_not_torn(fd: &Path, ld: &Path, before: &Model, now: &Model) -> Result<u64, String> {
    let held = files(fd);
    for path in before.keys() {
        if now.contains_key(path) && !held.contains_key(path) {
            return Err(format!(
                "{path} vanished: the follower held it and the leader still has it"
            ));
        }
    }
    let mut lacking = 0;
    for (path, spec) in now {
        if !held.contains_key(path) {
            lacking += spec.len;
        }
    }
    for (path, at) in &held {
        let mine = std::fs::read(at).unwrap();
        let old = before.get(path);
        let is_old =
            || old.is_some_and(|o| o.len == mine.len() as u64 && content(o.key, 0, o.len) == mine);
        let Some(spec) = now.get(path) else {
            // The leader deleted it: the follower's old copy, or nothing, never anything else.
            if !is_old() {
                return Err(format!(
                    "{path}: {} bytes, neither the old copy nor absent",
                    mine.len()
                ));
            }
            continue;
        };
        let theirs = std::fs::read(ld.join(path)).unwrap();
        assert_eq!(
            theirs.len() as u64,
            spec.len,
            "the leader's {path} is not what the test wrote"
        );
        let prefix = common_prefix(&mine, &theirs);
        if prefix == mine.len() {
            lacking += spec.len - mine.len() as u64;
            if prefix == theirs.len() {
                continue; // complete
            }
            // A proper prefix: only a tail being appended to a copy that was already a prefix.
            let was_prefix = old.is_some_and(|o| o.key == spec.key && o.len <= mine.len() as u64);
            if !was_prefix {
                return Err(format!(
                    "{path} is torn: it holds the first {} of the leader's {} bytes, but the \
                     follower did not hold a prefix of it before ({old:?})",
                    mine.len(),
                    theirs.len()
                ));
            }
        } else if is_old() {
            lacking += spec.len; // the old copy of a rewritten file: re-sent whole
        } else {
            return Err(format!(
                "{path} is torn: {} bytes, differs from the leader's {} bytes at offset {prefix}, \
                 and is not the follower's old copy ({old:?})",
                mine.len(),
                theirs.len()
            ));
        }
    }
    Ok(lacking)
}

/// The text of `line` between `a` and the next `b`.
fn between<'a>(line: &'a str, a: &str, b: &str) -> &'a str {
    let rest = line
        .split(a)
        .nth(1)
        .unwrap_or_else(|| panic!("no {a:?} in {line:?}"));
    rest.split(b).next().unwrap()
}

fn temp_files(fd: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(fd.join(".ferry/tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().to_string(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn follow_once_written(env: &Env, fd: &Path, leader: &LeaderProc, engine: &str) -> Output {
    let mut cmd = follow_cmd(env, fd, leader.addr, engine);
    cmd.args(["--once", "--durability", "written"]);
    run_bounded(cmd, Duration::from_secs(60))
}

/// Builds the leader's tree: `total` bytes over files of 1 KiB to 24 MiB in a few directories,
/// plus an empty one.
fn build_tree(ld: &Path, rng: &mut Rng, total: u64) -> Model {
    let mut model = Model::new();
    model.insert("empty".into(), Spec { key: 0, len: 0 });
    let mut sum = 0;
    let mut i = 0;
    while sum < total {
        let len = rng.size(1024, 24 * MIB).min(total - sum).max(1);
        let spec = Spec {
            key: rng.next(),
            len,
        };
        model.insert(format!("q{}/{i:08}.seg", i % 5), spec);
        sum += len;
        i += 1;
    }
    for (path, spec) in &model {
        write(&ld.join(path), &content(spec.key, 0, spec.len));
    }
    model
}

/// One round's changes while the follower is down: 2 to 12 MiB appended to each of three
/// files, two rewritten with new content and length, one created, then random deletes down to
/// `limit` bytes in all.
fn mutate(ld: &Path, scratch: &Path, rng: &mut Rng, model: &mut Model, round: usize, limit: u64) {
    let paths: Vec<String> = model.keys().filter(|p| *p != "empty").cloned().collect();
    // Tails of several DATA frames (MAX_DATA_BYTES is 4 MiB): a kill may land between frames.
    for _ in 0..3 {
        let path = &paths[rng.below(paths.len() as u64) as usize];
        let more = 2 * MIB + rng.below(10 * MIB);
        append_to(&ld.join(path), model.get_mut(path).unwrap(), more);
    }
    for _ in 0..2 {
        let path = &paths[rng.below(paths.len() as u64) as usize];
        let spec = Spec {
            key: rng.next(),
            len: rng.size(1024, 8 * MIB),
        };
        replace(scratch, &ld.join(path), spec);
        model.insert(path.clone(), spec);
    }
    let spec = Spec {
        key: rng.next(),
        len: rng.size(1024, 8 * MIB),
    };
    let path = format!("new/{round:03}.seg");
    replace(scratch, &ld.join(&path), spec);
    model.insert(path, spec);
    // Deletes keep the tree near its first size, so rounds stay alike.
    while model.values().map(|s| s.len).sum::<u64>() > limit {
        let paths: Vec<String> = model.keys().filter(|p| *p != "empty").cloned().collect();
        let gone = &paths[rng.below(paths.len() as u64) as usize];
        std::fs::remove_file(ld.join(gone)).unwrap();
        model.remove(gone);
    }
}

#[test]
fn a_follower_killed_at_random_points_of_its_sync_never_shows_a_torn_file_and_converges() {
    const ROUNDS: usize = 20;
    let mut rng = Rng(seed());
    let env = Env::new();
    let (ld, fd, scratch) = (env.dir("leader"), env.dir("follower"), env.dir("scratch"));
    let mut model = build_tree(&ld, &mut rng, 160 * MIB);
    let total: u64 = model.values().map(|s| s.len).sum();
    eprintln!("leader: {} files, {} MiB", model.len(), total / MIB);
    let leader = start_leader(&env, &ld, "uring");

    // The leader's payload rate here: each kill lands within the time its sync should take.
    let mark = leader.proc.log_len();
    let out = follow_once_written(&env, &env.dir("calibration"), &leader, "uring");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = leader
        .proc
        .wait_log_since(mark, "initial sync sent: ", Duration::from_secs(10));
    let seconds: f64 = between(&line, " whole files, in ", " s").parse().unwrap();
    let mut bytes_per_s = total as f64 / seconds.max(0.001);
    std::fs::remove_dir_all(env.dir("calibration")).unwrap();
    eprintln!("a full sync takes {seconds:.2} s here");

    let mut before = Model::new(); // what the follower holds
    let (mut mid_sync, mut mid_whole, mut mid_tail) = (0, 0, 0);
    for round in 0..ROUNDS {
        // Each engine gets both kinds of round. Even rounds: a full sync into an emptied dir.
        // Odd rounds: catching up after changes (tails appended under the real names).
        let engine = ENGINES[(round / 2) % 2];
        if round > 0 {
            mutate(&ld, &scratch, &mut rng, &mut model, round, total);
        }
        if round % 2 == 0 {
            std::fs::remove_dir_all(&fd).unwrap();
            std::fs::create_dir_all(&fd).unwrap();
            before.clear();
        }
        let unit = rng.unit();

        // The kill comes a random fraction of the sync's expected time after the leader starts
        // sending (it logs how many bytes it plans to send).
        let mark = leader.proc.log_len();
        let mut follower = start_follower(&env, &fd, leader.addr, engine, "written");
        let line =
            leader
                .proc
                .wait_log_since(mark, "initial sync started, ", Duration::from_secs(20));
        let planned: f64 = between(&line, "initial sync started, ", " bytes")
            .parse()
            .unwrap();
        let delay = Duration::from_secs_f64(unit * planned / bytes_per_s);
        std::thread::sleep(delay);
        follower.child.kill().unwrap();
        follower.child.wait().unwrap();

        let synced = follower.log_text().contains("initial sync received");
        let temps = temp_files(&fd);
        let lacking = check_not_torn(&fd, &ld, &before, &model).unwrap_or_else(|e| {
            panic!("round {round} ({engine}, killed {delay:?} into the sync): {e}")
        });
        let tails = files(&fd)
            .iter()
            .filter(|(p, at)| {
                let len = std::fs::metadata(at).unwrap().len();
                model.get(*p).is_some_and(|s| len < s.len)
                    && before.get(*p).is_some_and(|o| o.len < len)
            })
            .count();
        mid_sync += usize::from(!synced);
        mid_whole += usize::from(temps.iter().any(|(_, len)| *len > 0));
        mid_tail += usize::from(tails > 0);
        eprintln!(
            "round {round:2} {engine:8} killed {:3} ms into a sync of {:3} MiB: {}, {} temp \
             files, {tails} tails part-appended, {} MiB still lacking",
            delay.as_millis(),
            planned as u64 / MIB,
            if synced { "after it" } else { "mid-sync" },
            temps.len(),
            lacking / MIB
        );

        // Restarted, it converges, and receives only what it lacks.
        let mark = leader.proc.log_len();
        let out = follow_once_written(&env, &fd, &leader, engine);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            payload_bytes(&out),
            lacking,
            "round {round}: resumed, not re-sent"
        );
        if let Some(diff) = tree_difference(&ld, &fd) {
            panic!("round {round}: not converged: {diff}");
        }
        assert_eq!(
            temp_files(&fd),
            vec![],
            "round {round}: temp files left behind"
        );
        before = model.clone();
        // The fastest sync seen sets the pace: kills should land before the end, not after.
        let line = leader
            .proc
            .wait_log_since(mark, "initial sync sent: ", Duration::from_secs(10));
        let bytes: f64 = between(&line, "initial sync sent: ", " payload")
            .parse()
            .unwrap();
        let seconds: f64 = between(&line, " whole files, in ", " s").parse().unwrap();
        if bytes >= (16 * MIB) as f64 {
            bytes_per_s = bytes_per_s.max(bytes / seconds.max(0.001));
        }
    }
    eprintln!(
        "{mid_sync} of {ROUNDS} kills landed mid-sync, {mid_whole} mid whole-file transfer, \
         {mid_tail} mid tail append"
    );
    assert!(
        mid_sync >= ROUNDS / 2 && mid_whole >= 3 && mid_tail >= 1,
        "too few kills landed mid-sync for the test to mean anything"
    );
    // The final word, by ferry's own checksums.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| checksum(&ld));
        let b = s.spawn(|| checksum(&fd));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a, b);
}

/// A tmpfs mounted over a test's dir, unmounted (lazily, so a panic cannot leave it busy) on drop.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount(8) takes it: "8m") at `at`, or says why it cannot.
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs {
            at: at.to_path_buf(),
        })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start with the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system setting.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_s)
}

/// The leader's followers as its `/metrics` reports them: (state, synced lag bytes) by id.
fn followers_seen(http: &str) -> BTreeMap<String, (String, f64)> {
    let text = ferry::http::get(http, "/metrics").unwrap_or_default();
    let mut rows: BTreeMap<String, (String, f64)> = BTreeMap::new();
    for s in ferry::status::parse_prometheus(&text) {
        let Some(id) = s.label("id").map(str::to_string) else {
            continue;
        };
        if s.name == "ferry_follower_state" {
            rows.entry(id).or_default().0 = s.label("state").unwrap_or("").to_string();
        } else if s.name == "ferry_follower_lag_bytes" && s.label("level") == Some("synced") {
            rows.entry(id).or_default().1 = s.value;
        }
    }
    rows
}

#[test]
fn a_follower_whose_disk_fills_says_so_shows_no_torn_file_and_recovers_when_space_returns() {
    for engine in ENGINES {
        if !disk_fills(engine) {
            return;
        }
    }
}

/// The disk-full scenario with the follower on `engine`; false if it cannot run here.
fn disk_fills(engine: &str) -> bool {
    eprintln!("-- follower engine {engine}");
    let env = Env::new();
    let (ld, fd, scratch) = (env.dir("leader"), env.dir("follower"), env.dir("scratch"));
    let disk = match Tmpfs::mount(&fd, "8m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a tmpfs ({why}); a full disk needs root to test");
            return false;
        }
    };
    // What fits: 2 MiB.
    let mut model = Model::new();
    model.insert(
        "q/seg".into(),
        Spec {
            key: 1,
            len: 2 * MIB,
        },
    );
    model.insert("meta".into(), Spec { key: 2, len: 1000 });
    for (path, spec) in &model {
        write(&ld.join(path), &content(spec.key, 0, spec.len));
    }
    let mut cmd = lead_cmd(&env, &ld, "uring");
    cmd.args(["--http", "127.0.0.1:0"]);
    let leader = Proc::spawn(cmd);
    let (addr, leader_http) = (listen_addr(&leader), http_addr(&leader));
    let mut cmd = follow_cmd(&env, &fd, addr, engine);
    cmd.args(["--durability", "synced", "--http", "127.0.0.1:0"]);
    let mut follower = Proc::spawn(cmd);
    let follower_http = http_addr(&follower);
    wait_same_files(&ld, &fd, Duration::from_secs(20));
    let before = model.clone();

    // The leader grows past what fits: a 5 MiB tail on the segment, a new 6 MiB file.
    let mark = follower.log_len();
    append_to(&ld.join("q/seg"), model.get_mut("q/seg").unwrap(), 5 * MIB);
    let spec = Spec {
        key: 3,
        len: 6 * MIB,
    };
    replace(&scratch, &ld.join("q/seg2"), spec);
    model.insert("q/seg2".into(), spec);

    // A clear error, naming the cause and the file, on both sides. (The follower may also say
    // that its held record could not be saved, a line that names no data file.)
    wait_until(
        Duration::from_secs(20),
        "the follower's error naming the cause and the file",
        || {
            follower.log.lock().unwrap()[mark..]
                .iter()
                .any(|l| l.contains("No space left on device") && l.contains("q/seg"))
        },
    );
    eprintln!("follower:\n{}", follower.log_text());
    let line = leader.wait_log("No space left on device", Duration::from_secs(10));
    eprintln!("leader: {line}");
    let status = ferry::http::get(&follower_http, "/status").unwrap();
    assert!(status.contains("No space left on device"), "{status}");

    // The leader counts it out of sync: no connection of it is streaming, and it lags.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out_of_sync = |rows: &BTreeMap<String, (String, f64)>| {
        !rows.is_empty()
            && rows.values().all(|(state, _)| state != "streaming")
            && rows.values().any(|(_, lag)| *lag > 0.0)
    };
    while !out_of_sync(&followers_seen(&leader_http)) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            followers_seen(&leader_http)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It stays alive and retries without spinning: under half a core over 3 s, and still out
    // of sync meanwhile.
    let pid = follower.child.id();
    let (cpu, wall) = (cpu_time(pid), Instant::now());
    while wall.elapsed() < Duration::from_secs(3) {
        assert!(
            follower.child.try_wait().unwrap().is_none(),
            "the follower exited"
        );
        let rows = followers_seen(&leader_http);
        assert!(out_of_sync(&rows), "back in sync on a full disk? {rows:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_time(pid) - cpu;
    eprintln!(
        "while the disk is full: {used:?} of CPU in 3 s; leader sees {:?}",
        followers_seen(&leader_http)
    );
    assert!(
        used < Duration::from_millis(1500),
        "spinning: {used:?} of CPU in 3 s"
    );

    // Nothing torn: the old segment's copy has at most grown along the leader's, the new file is
    // absent or whole; whatever partial transfer there is sits in .ferry/tmp.
    check_not_torn(&fd, &ld, &before, &model).unwrap();
    // Nor do failed transfers pile up in .ferry/tmp holding space: at most the one under way.
    let temps = temp_files(&fd);
    assert!(
        temps.len() <= 1,
        "temp files of failed transfers kept: {temps:?}"
    );

    // Space returns: the same process catches up, no restart.
    let mark = follower.log_len();
    disk.resize("64m");
    wait_same_files(&ld, &fd, Duration::from_secs(30));
    follower.wait_log_since(mark, "initial sync received", Duration::from_secs(10));
    assert!(follower.child.try_wait().unwrap().is_none());
    assert_eq!(temp_files(&fd), vec![], "temp files left behind");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !followers_seen(&leader_http)
        .values()
        .any(|(state, lag)| state == "streaming" && *lag == 0.0)
    {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            followers_seen(&leader_http)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A leader's position and its connected followers' (state, synced acked position), from its
/// `/metrics`; `None` unless it answers as a leader.
fn leader_view(http: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let text = ferry::http::get(http, "/metrics").ok()?;
    let samples = ferry::status::parse_prometheus(&text);
    samples
        .iter()
        .find(|s| s.name == "ferry_info" && s.label("role") == Some("leader"))?;
    let position = samples
        .iter()
        .find(|s| s.name == "ferry_position_bytes")?
        .value as u64;
    let mut rows: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for s in &samples {
        let Some(id) = s.label("id").map(str::to_string) else {
            continue;
        };
        if s.name == "ferry_follower_state" {
            rows.entry(id).or_default().0 = s.label("state").unwrap_or("").to_string();
        } else if s.name == "ferry_follower_acked_position" && s.label("level") == Some("synced") {
            rows.entry(id).or_default().1 = s.value as u64;
        }
    }
    let connected = rows
        .into_values()
        .filter(|(state, _)| state != "disconnected")
        .collect();
    Some((position, connected))
}

/// Appends `content(key, ...)` to a file in 16 KiB writes, about 8 MB/s, until stopped; `len`
/// is the file's length after the last completed write.
struct Appender {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    len: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Appender {
    fn start(path: PathBuf, key: u64, from: u64) -> Appender {
        Appender::spawn(path, key, from, None)
    }

    /// The application beside a cluster's leader: as `start`, and it also stops once its
    /// node's lost hook asks (the `stop` marker exists), then creates `stopped`, which the hook
    /// waits for.
    fn until_told(path: PathBuf, key: u64, from: u64, told: (PathBuf, PathBuf)) -> Appender {
        Appender::spawn(path, key, from, Some(told))
    }

    fn spawn(path: PathBuf, key: u64, from: u64, told: Option<(PathBuf, PathBuf)>) -> Appender {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let len = std::sync::Arc::new(AtomicU64::new(from));
        let (s, l) = (stop.clone(), len.clone());
        let thread = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            let mut at = from;
            let told_to_stop = || told.as_ref().is_some_and(|(stop, _)| stop.exists());
            while !s.load(Ordering::SeqCst) && !told_to_stop() {
                f.write_all(&content(key, at, 16 * 1024)).unwrap();
                at += 16 * 1024;
                l.store(at, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Some((stop, stopped)) = &told {
                if stop.exists() {
                    std::fs::write(stopped, b"").unwrap();
                }
            }
        });
        Appender {
            stop,
            len,
            thread: Some(thread),
        }
    }

    /// Stops writing at once (its host died), without waiting for the thread.
    fn halt(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn len(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops writing; the file's final length.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.len()
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_cluster_leader_killed_under_load_loses_no_byte_acked_as_synced() {
    const ROUNDS: usize = 3;
    const KEY: u64 = 77;
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    // Every node starts with the same 1 MiB segment: positions then map to its length. A copy
    // seeded so is one that ferry never managed: --adopt lets the followers take theirs over.
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let dir = env.dir(&format!("n{i}"));
            write(&dir.join("q/seg"), &content(KEY, 0, MIB));
            start_node_with(&env, &etcd.url, &dir, free_port(), &["--adopt"])
        })
        .collect();
    let mut all: Vec<String> = nodes.iter().map(|n| n.advertise.clone()).collect();
    all.sort();
    let isr_all = format!("in-sync replica set: {}", all.join(","));

    let mut leader = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = (0..3).find(|&i| nodes[i].proc.log_text().contains("elected leader")) {
                break i;
            }
            assert!(Instant::now() < deadline, "no leader elected");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut elected_mark = 0;
    for round in 0..ROUNDS {
        let http = http_addr(&nodes[leader].proc);
        let seg = nodes[leader].dir.join("q/seg");
        // Ready: every node in the ISR (so either follower may take over), both followers
        // streaming, identical, and everything acked as synced.
        nodes[leader]
            .proc
            .wait_log_since(elected_mark, &isr_all, Duration::from_secs(30));
        for i in (0..3).filter(|&i| i != leader) {
            wait_same_files(&nodes[leader].dir, &nodes[i].dir, Duration::from_secs(30));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let (position, _) = loop {
            if let Some((p, f)) = leader_view(&http) {
                if f.len() == 2 && f.iter().all(|(s, a)| s == "streaming" && *a == p) {
                    break (p, f);
                }
            }
            assert!(Instant::now() < deadline, "{:?}", leader_view(&http));
            std::thread::sleep(Duration::from_millis(20));
        };
        // Only appends to this one file change the position from here on: a byte's offset in
        // it is its position less `shift`. The shift is negative after a fork whose new leader
        // held bytes past its last MARK: its positions go on from that MARK's.
        let start_len = std::fs::metadata(&seg).unwrap().len();
        let shift = i128::from(position) - i128::from(start_len);

        // Under load: wait until both followers ack as synced 2 MiB more than they had, while
        // the ISR in etcd still holds every node. (A follower that falls behind by more than the
        // ack timeout leaves it, and only its members campaign: were both to lag at the moment
        // of the kill, no one could take over, by design. That is not what this test is about.)
        let writer = Appender::start(seg.clone(), KEY, start_len);
        let deadline = Instant::now() + Duration::from_secs(30);
        let acked = loop {
            if let Some((_, f)) = leader_view(&http) {
                let least = f.iter().map(|(_, a)| *a).min().unwrap_or(0);
                if f.len() == 2
                    && least >= position + 2 * MIB
                    && read_key(&etcd.url, "ferry/isr") == Some(all.join(","))
                {
                    break u64::try_from(i128::from(least) - shift).unwrap();
                }
            }
            assert!(Instant::now() < deadline, "{:?}", leader_view(&http));
            std::thread::sleep(Duration::from_millis(10));
        };
        let written_then = writer.len();
        assert!(
            acked <= written_then,
            "acked {acked} bytes of a file written to {written_then}: positions misread"
        );

        // SIGKILL the leader while the writer goes on; then the writer stops (its host died).
        let marks: Vec<usize> = nodes.iter().map(|n| n.proc.log_len()).collect();
        let killed_at = Instant::now();
        nodes[leader].proc.child.kill().unwrap();
        nodes[leader].proc.child.wait().unwrap();
        let written = writer.stop();
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let next = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let elected: Vec<usize> = survivors
                    .iter()
                    .copied()
                    .filter(|&i| {
                        nodes[i]
                            .proc
                            .log_text()
                            .lines()
                            .skip(marks[i])
                            .any(|l| l.contains("elected leader"))
                    })
                    .collect();
                assert!(elected.len() < 2, "two leaders: {elected:?}");
                if let Some(&i) = elected.first() {
                    break i;
                }
                if Instant::now() >= deadline {
                    let isr = nodes[leader]
                        .proc
                        .log_text()
                        .lines()
                        .rfind(|l| l.contains("in-sync replica set"))
                        .map(str::to_string);
                    let logs: Vec<String> = survivors
                        .iter()
                        .map(|&i| format!("node {i}:\n{}", nodes[i].proc.log_text()))
                        .collect();
                    panic!(
                        "no new leader 30 s after the kill; the killed leader's last ISR: \
                         {isr:?}\n{}",
                        logs.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let failover = killed_at.elapsed();

        // Every byte acked as synced by both followers is on the new leader, byte for byte.
        let theirs = std::fs::read(nodes[next].dir.join("q/seg")).unwrap();
        let killed = std::fs::read(&seg).unwrap();
        eprintln!(
            "round {round}: killed the leader with {written} bytes written, {acked} acked as \
             synced by both followers (positions {shift} from offsets); node {next} elected \
             {:.2} s later holding {} bytes",
            failover.as_secs_f64(),
            theirs.len()
        );
        assert!(
            theirs.len() as u64 >= acked,
            "round {round}: the new leader holds {} bytes, {acked} were acked as synced",
            theirs.len()
        );
        let acked = acked as usize;
        assert_eq!(common_prefix(&theirs[..acked], &killed[..acked]), acked);
        assert_eq!(theirs[..acked], content(KEY, 0, acked as u64)[..]);

        // The killed node comes back (same dir and address) and follows the new leader.
        let (dir, port) = (nodes[leader].dir.clone(), nodes[leader].port);
        nodes[leader] = start_node(&env, &etcd.url, &dir, port);
        nodes[leader].proc.wait_log(
            &format!("following the leader at {}", nodes[next].advertise),
            Duration::from_secs(30),
        );
        elected_mark = marks[next];
        leader = next;
    }
    // Everyone converges on the last leader's copy.
    for i in (0..3).filter(|&i| i != leader) {
        wait_same_files(&nodes[leader].dir, &nodes[i].dir, Duration::from_secs(30));
    }
    drop(etcd);
}

/// Seconds into the day of a log line's timestamp (`2026-11-23T13:27:44.426413Z  INFO ...`).
fn log_seconds(line: &str) -> f64 {
    let time = line.split('T').nth(1).unwrap().split('Z').next().unwrap();
    let hms: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    hms[0] * 3600.0 + hms[1] * 60.0 + hms[2]
}

/// A network namespace joined to the host by a veth pair (host side `.1`, namespace side `.2`
/// of a /30), torn down on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        // Tests of one process run at once: each namespace its own names and subnet.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = format!("10.{}.{}", 213 + n % 40, pid % 250);
        let net = Netns {
            name: format!("ferry-test-{pid}-{n}"),
            host_if: format!("fy{pid}h{n}"),
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
        };
        let ns_if = format!("fy{pid}n{n}");
        let (host_cidr, ns_cidr) = (format!("{}/30", net.host_ip), format!("{}/30", net.ns_ip));
        let name = net.name.as_str();
        ip(&["netns", "add", name])?;
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", name])?;
        ip(&["addr", "add", &host_cidr, "dev", &net.host_if])?;
        ip(&["link", "set", &net.host_if, "up"])?;
        ip(&["-n", name, "addr", "add", &ns_cidr, "dev", &ns_if])?;
        ip(&["-n", name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// `create`, or `None` having said why the test is skipped (it needs root and iproute2).
    fn create_or_skip() -> Option<Netns> {
        Netns::create()
            .map_err(|why| {
                eprintln!(
                    "SKIPPED: cannot build a network namespace ({why}); needs root and iproute2"
                )
            })
            .ok()
    }

    /// A command run inside the namespace.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Cuts (or restores) the link: the namespace can reach nothing outside it, nor be reached.
    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).unwrap();
    }

    /// Whether a TCP connection to `addr` succeeds from inside the namespace (within 1 s).
    fn connects(&self, addr: &str) -> bool {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut cmd = self.exec("timeout");
        cmd.args([
            "1",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{host}/{port}"),
        ]);
        cmd.stderr(std::process::Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

#[test]
fn a_leader_partitioned_from_etcd_and_its_followers_is_fenced_and_its_later_writes_never_count() {
    let Some(net) = Netns::create_or_skip() else {
        return;
    };
    let env = Env::new();
    let etcd = start_etcd_at(&env.dir("etcd"), &["127.0.0.1", &net.host_ip], free_port());
    let etcd_port = etcd.url.rsplit(':').next().unwrap();
    let (a_dir, b_dir) = (env.dir("a"), env.dir("b"));
    write(&a_dir.join("q/seg"), &content(5, 0, MIB));

    // A leads from inside the namespace, reaching etcd over the veth.
    let a_adv = format!("{}:7070", net.ns_ip);
    let ns_etcd = format!("http://{}:{etcd_port}", net.host_ip);
    let a = {
        let mut cmd = net.exec(env!("CARGO_BIN_EXE_ferry"));
        cmd.env("RUST_LOG", "info").env_remove("FERRY_SECRET");
        node_args(&mut cmd, &ns_etcd, &a_dir, &a_adv);
        cmd.arg("--secret-file").arg(&env.secret_file);
        Proc::spawn(cmd)
    };
    a.wait_log("elected leader", Duration::from_secs(30));
    // B, outside, follows it over the veth.
    let b_adv = format!("{}:{}", net.host_ip, free_port());
    let mut cmd = node_cmd(&etcd.url, &b_dir, &b_adv);
    cmd.arg("--secret-file").arg(&env.secret_file);
    let b = Proc::spawn(cmd);
    b.wait_log(
        &format!("following the leader at {a_adv}"),
        Duration::from_secs(30),
    );
    wait_same_files(&a_dir, &b_dir, Duration::from_secs(20));
    let mut isr = [a_adv.clone(), b_adv.clone()];
    isr.sort();
    a.wait_log(
        &format!("in-sync replica set: {}", isr.join(",")),
        Duration::from_secs(20),
    );
    assert!(net.connects(&a_adv));

    // Cut the link: A loses etcd and B at once.
    let (a_mark, b_mark) = (a.log_len(), b.log_len());
    let cut = Instant::now();
    net.link(false);
    let fenced_line = a.wait_log_since(a_mark, "fenced", Duration::from_secs(10));
    let fenced = cut.elapsed();
    // It stops serving at once: seen from inside the namespace, nothing listens any more.
    wait_until(
        Duration::from_secs(10),
        "stopped serving after being fenced",
        || !net.connects(&a_adv),
    );
    let stopped = cut.elapsed();
    let elected_line = b.wait_log_since(b_mark, "elected leader", Duration::from_secs(30));
    let replaced = cut.elapsed();
    eprintln!(
        "after the cut: A fenced in {:.2} s, not serving in {:.2} s; B elected in {:.2} s",
        fenced.as_secs_f64(),
        stopped.as_secs_f64(),
        replaced.as_secs_f64()
    );
    assert!(
        fenced <= Duration::from_millis(2500),
        "fenced after {fenced:?}, lease TTL 2 s"
    );
    assert!(
        stopped <= fenced + Duration::from_millis(1000),
        "fenced at {fenced:?} but served until {stopped:?}"
    );
    // B leads once etcd expires A's lease (TTL 2 s), without first waiting out its silent
    // connection to A; and never while A may still serve. By the two processes' log clocks
    // (one host): A's fence, plus the time it took to stop listening, comes before B's election.
    assert!(
        replaced <= Duration::from_secs(4),
        "B took over after {replaced:?}"
    );
    let margin =
        log_seconds(&elected_line) - log_seconds(&fenced_line) - (stopped - fenced).as_secs_f64();
    eprintln!("A stopped serving {margin:.2} s before B was elected");
    assert!(
        margin > 0.0,
        "two leaders: A {fenced_line:?}, B {elected_line:?}"
    );

    // Writes on the cut-off side (its broker goes on) were never acked by anyone; B takes its
    // own, different ones.
    let mut a_seg = Spec { key: 6, len: MIB };
    append_to(&a_dir.join("q/seg"), &mut a_seg, 300_000);
    let mut b_seg = Spec { key: 7, len: MIB };
    append_to(&b_dir.join("q/seg"), &mut b_seg, 100_000);

    // The link comes back: A, a follower now, rejoins by itself, follows B and ends with B's
    // copy: what it took after the cut is gone.
    net.link(true);
    let healed = Instant::now();
    a.wait_log_since(
        a_mark,
        &format!("following the leader at {b_adv}"),
        Duration::from_secs(30),
    );
    eprintln!(
        "A follows B {:.2} s after the link is back",
        healed.elapsed().as_secs_f64()
    );
    wait_same_files(&b_dir, &a_dir, Duration::from_secs(30));
    a.wait_log_since(a_mark, "replacing q/seg", Duration::from_secs(5));
    let held = std::fs::read(a_dir.join("q/seg")).unwrap();
    assert_eq!(held.len() as u64, MIB + 100_000);
    assert_eq!(held[MIB as usize..], content(7, MIB, 100_000)[..]);
}

/// Reads frames from a follower until one matches `done`; the frames read.
fn read_frames_until(
    s: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&ferry::frame::Frame) -> bool,
) -> Vec<ferry::frame::Frame> {
    use std::io::Read;
    let mut frames = Vec::new();
    loop {
        while let Some((frame, used)) = ferry::frame::Frame::decode(buf).unwrap() {
            buf.drain(..used);
            let last = done(&frame);
            frames.push(frame);
            if last {
                return frames;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the follower closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A fake leader that authenticates a follower, offers one 1 MiB file, sends the first 1000
/// bytes of it and then nothing more, holding the connection open. Returns the socket.
fn leader_going_silent_mid_payload(mut s: std::net::TcpStream) -> std::net::TcpStream {
    use ferry::frame::{Frame, Preamble, PREAMBLE_BYTES, PROTOCOL_VERSION};
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let leader_nonce = [1u8; 32];
    // No capability: the index is plain INDEX frames and no INSTANCE is due.
    let preamble = Preamble {
        version: PROTOCOL_VERSION,
        capabilities: 0,
    };
    let mut out = preamble.encode().to_vec();
    Frame::Challenge { leader_nonce }.encode(&mut out);
    s.write_all(&out).unwrap();
    let mut preamble = [0u8; PREAMBLE_BYTES];
    s.read_exact(&mut preamble).unwrap();
    let mut buf = Vec::new();
    let auth = read_frames_until(&mut s, &mut buf, |f| matches!(f, Frame::Auth { .. }));
    let Some(Frame::Auth { follower_nonce, .. }) = auth.last().cloned() else {
        unreachable!()
    };
    let secret = ferry::auth::Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let path = ferry::paths::RelPath::new("seg").unwrap();
    let mut out = Vec::new();
    Frame::Welcome {
        leader_mac: secret.leader_tag(&leader_nonce, &follower_nonce),
    }
    .encode(&mut out);
    Frame::Index {
        len_bytes: MIB,
        path: path.clone(),
    }
    .encode(&mut out);
    Frame::IndexEnd { count: 1 }.encode(&mut out);
    s.write_all(&out).unwrap();
    read_frames_until(&mut s, &mut buf, |f| matches!(f, Frame::HaveEnd { .. }));
    let mut out = Vec::new();
    Frame::BeginWhole {
        len_bytes: MIB,
        path: path.clone(),
    }
    .encode(&mut out);
    Frame::Data {
        temp: true,
        offset: 0,
        data_len: MIB as u32,
        path,
    }
    .encode(&mut out);
    out.extend_from_slice(&content(9, 0, 1000));
    s.write_all(&out).unwrap();
    s
}

#[test]
fn a_follower_whose_leader_goes_silent_mid_payload_gives_up_and_reconnects() {
    // What a partition in the middle of a transfer looks like to a follower: no FIN, no RST,
    // just no more bytes. It must not wait forever (a node elected meanwhile would wait for it
    // to stop); it gives up after LEADER_SILENCE_TIMEOUT_MS, as between frames.
    std::thread::scope(|scope| {
        for engine in ENGINES {
            scope.spawn(move || {
                let env = Env::new();
                let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = fake.local_addr().unwrap();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let (first, _) = fake.accept().unwrap();
                    let _held = leader_going_silent_mid_payload(first);
                    let _ = tx.send(Instant::now());
                    let (_second, _) = fake.accept().unwrap();
                    let _ = tx.send(Instant::now());
                });
                let follower = start_follower(&env, &env.dir("f"), addr, engine, "written");
                let silent_from = rx.recv_timeout(Duration::from_secs(20)).unwrap();
                let again = rx
                    .recv_timeout(Duration::from_secs(15))
                    .unwrap_or_else(|_| {
                        panic!(
                            "{engine}: still waiting 15 s after the leader went silent:\n{}",
                            follower.log_text()
                        )
                    });
                let line = follower.wait_log("sent nothing for", Duration::from_secs(1));
                eprintln!(
                    "{engine}: reconnected {:.2} s after the leader went silent: {line}",
                    (again - silent_from).as_secs_f64()
                );
                assert!(line.contains("before the end of a payload"), "{line}");
            });
        }
    });
}

/// What the broker of `restarts_at_random_while_the_broker_writes_never_leave_a_copy_that_differs`
/// writes: in each of a few queues, a segment appended to and rolled at `SEGMENT_BYTES`, the
/// oldest retired beyond sixteen, now and then its tail cut back and written again (a torn tail
/// recovered after a crash), and a small state file rewritten whole; once in a while the whole
/// queue is deleted and begins again.
struct Broker {
    rng: Rng,
    /// Per queue: the number of its oldest segment, of its active one, and the active one's
    /// length.
    queues: Vec<(u64, u64, u64)>,
    /// The queues written to now, a bit per queue, set by the test as it goes. A queue left
    /// alone for a while has settled files for a leader's record to vouch for, which change
    /// once it is written to again (while the leader is down, say).
    busy: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Which queues the broker writes to next.
#[derive(Clone, Copy)]
enum Next {
    /// One or two at random.
    Any,
    /// Those it left alone so far: their files have settled, so a leader's record may vouch
    /// for them, and now they change.
    Quiet,
    /// The same: files a follower changed after the leader's last checkpoint change again.
    Same,
}

impl Broker {
    const QUEUES: usize = 3;
    const SEGMENT_BYTES: u64 = 256 * 1024;
    const SEGMENTS_KEPT: u64 = 16;

    fn new(seed: u64) -> Broker {
        Broker {
            rng: Rng(seed),
            queues: vec![(0, 0, 0); Self::QUEUES],
            busy: std::sync::Arc::new(((1 << Self::QUEUES) - 1).into()),
        }
    }

    /// Writes into `dir` on a thread of its own while `during` runs, and stops once it
    /// returned (or panicked).
    fn write_while<R>(&mut self, (dir, scratch): (&Path, &Path), during: impl FnOnce() -> R) -> R {
        use std::sync::atomic::{AtomicBool, Ordering};
        struct Pause<'a>(&'a AtomicBool);
        impl Drop for Pause<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let on = AtomicBool::new(true);
        std::thread::scope(|s| {
            let on = &on;
            s.spawn(move || {
                while on.load(Ordering::Relaxed) {
                    self.write_once(dir, scratch);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            let _pause = Pause(on);
            during()
        })
    }

    /// Takes up writing in `dir`, a copy of the dir it wrote in (a follower's, promoted):
    /// each queue's oldest and active segments and the active one's length as they are there.
    fn on(&mut self, dir: &Path) {
        for (q, queue) in self.queues.iter_mut().enumerate() {
            let numbers: Vec<u64> = std::fs::read_dir(dir.join(format!("q{q}")))
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let name = e.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".seg")?.parse().ok()
                })
                .collect();
            *queue = match (numbers.iter().min(), numbers.iter().max()) {
                (Some(&oldest), Some(&active)) => {
                    let len = std::fs::metadata(Self::segment(dir, q, active))
                        .unwrap()
                        .len();
                    (oldest, active, len)
                }
                _ => (0, 0, 0),
            };
        }
    }

    /// Sets the queues written to from now on, and returns them (for the log).
    fn set_busy(busy: &std::sync::atomic::AtomicU64, next: Next, rng: &mut Rng) -> Vec<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let all = (1 << Self::QUEUES) - 1;
        let now = busy.load(Relaxed);
        let mask = match next {
            Next::Quiet if now != all => all & !now,
            Next::Same => now,
            // One or two of them.
            _ => match all
                & !(1 << rng.below(Self::QUEUES as u64))
                & !(1 << rng.below(Self::QUEUES as u64))
            {
                0 => 1,
                some => some,
            },
        };
        busy.store(mask, Relaxed);
        (0..Self::QUEUES).filter(|q| mask & (1 << q) != 0).collect()
    }

    fn segment(ld: &Path, q: usize, n: u64) -> PathBuf {
        ld.join(format!("q{q}/{n:08}.seg"))
    }

    /// One write of the broker's, chosen at random.
    fn write_once(&mut self, ld: &Path, scratch: &Path) {
        use std::os::unix::fs::FileExt as _;
        let mask = self.busy.load(std::sync::atomic::Ordering::Relaxed);
        let busy: Vec<usize> = (0..Self::QUEUES).filter(|q| mask & (1 << q) != 0).collect();
        let q = busy[self.rng.below(busy.len() as u64) as usize];
        let (oldest, active, len) = self.queues[q];
        let path = Self::segment(ld, q, active);
        match self.rng.below(1000) {
            0..=849 => {
                let more = 1 + self.rng.below(8 * 1024);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(&content(self.rng.next(), 0, more)).unwrap();
                let len = len + more;
                if len < Self::SEGMENT_BYTES {
                    self.queues[q] = (oldest, active, len);
                    return;
                }
                // Rolled: the next segment is created by its first append.
                let mut oldest = oldest;
                if active + 1 - oldest >= Self::SEGMENTS_KEPT {
                    // Gone already where the model was taken from a follower's copy (`on`).
                    // Half the time renamed first, as Kafka's retention does (`.deleted`).
                    let mut gone = Self::segment(ld, q, oldest);
                    if self.rng.below(2) == 0 {
                        let deleted = gone.with_extension("seg.deleted");
                        if std::fs::rename(&gone, &deleted).is_ok() {
                            gone = deleted;
                        }
                    }
                    let removed = std::fs::remove_file(gone);
                    if let Err(e) = removed {
                        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
                    }
                    oldest += 1;
                }
                self.queues[q] = (oldest, active + 1, 0);
            }
            850..=929 => {
                let tmp = scratch.join("state.json.tmp");
                let n = 20 + self.rng.below(2000);
                std::fs::write(&tmp, content(self.rng.next(), 0, n)).unwrap();
                std::fs::create_dir_all(ld.join(format!("q{q}"))).unwrap();
                std::fs::rename(&tmp, ld.join(format!("q{q}/state.json"))).unwrap();
            }
            999 => {
                // The queue is deleted (unless it is already: nothing was written to it since),
                // and starts again from segment 0: names its earlier segments had, with other
                // bytes.
                // Half the time renamed first, as Kafka deletes a partition (`-delete`).
                let mut dir = ld.join(format!("q{q}"));
                if dir.exists() {
                    if self.rng.below(2) == 0 {
                        let renamed = ld.join(format!("q{q}.x-delete"));
                        std::fs::rename(&dir, &renamed).unwrap();
                        dir = renamed;
                    }
                    std::fs::remove_dir_all(dir).unwrap();
                }
                self.queues[q] = (0, 0, 0);
            }
            _ if len > 0 => {
                // Cut back, then written past where it was with other bytes.
                let cut = 1 + self.rng.below(len.min(16 * 1024));
                let more = cut + 1 + self.rng.below(8 * 1024);
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(len - cut).unwrap();
                f.write_all_at(&content(self.rng.next(), 0, more), len - cut)
                    .unwrap();
                self.queues[q] = (oldest, active, len - cut + more);
            }
            _ => {}
        }
    }
}

/// Counts what runs of `ferry lead` logged that the restart test needs to have happened:
/// instances resumed with files vouched for, and files a follower held that it accepted.
#[derive(Default, Debug)]
struct Resumed {
    instances: usize,
    vouched: u64,
    held: u64,
    /// Copies a follower cut to their length at the MARK it recorded them after, held under an
    /// instance the leader's goes on from (bytes it applied after that MARK).
    cut_to_mark: u64,
}

impl Resumed {
    /// Stops `proc` with signal `how` (it must exit cleanly unless SIGKILLed) and counts what
    /// it logged; returns its log.
    fn stop(&mut self, mut proc: Proc, how: libc::c_int) -> String {
        signal(&proc.child, how);
        let status = proc.child.wait().unwrap();
        let log = proc.log_text();
        assert!(
            how == libc::SIGKILL || status.success(),
            "stopped by signal {how}: {status}\n{log}"
        );
        self.count(&log);
        log
    }

    /// Fails the test unless restarts resumed an instance at least twice, vouching for files,
    /// and followers held some: else it showed nothing about them.
    fn assert_meaningful(&self) {
        eprintln!("{self:?}");
        assert!(
            self.instances >= 2 && self.vouched > 0 && self.held > 0,
            "too few restarts resumed an instance or held a file for the test to mean anything: \
             {self:?}"
        );
    }

    fn count(&mut self, log: &str) {
        for line in log.lines() {
            if [
                "from its record: ",
                " held as this dir recorded",
                "inventory: cut",
                "forking instance",
            ]
            .iter()
            .any(|said| line.contains(said))
            {
                eprintln!("  {line}");
            }
            if let Some(rest) = line.split("from its record: ").nth(1) {
                self.instances += 1;
                self.vouched += rest.split(' ').next().unwrap().parse::<u64>().unwrap();
            }
            if let Some(rest) = line.split("inventory: cut ").nth(1) {
                if rest.contains("to their lengths at the MARKs") {
                    self.cut_to_mark += rest.split(' ').next().unwrap().parse::<u64>().unwrap();
                }
            }
            // The leader's word on what it accepted.
            if let Some(rest) = line.split("; its inventory: ").nth(1) {
                self.held += rest.split(' ').next().unwrap().parse::<u64>().unwrap();
            }
        }
    }
}

/// The held records and the leader's record let a follower keep a copy without hashing it,
/// and a restarted leader vouch for files it did not see change. The broker never stops
/// writing for ferry, so restarts land anywhere: mid-append, mid-rewrite, during the leader's
/// graceful stop, with changes made while the leader is down. Each round stops one or both
/// processes (SIGKILL or SIGTERM) at a random moment and starts them again (each start with an
/// engine and, for the follower, a durability chosen at random); then the broker pauses, and
/// the follower's copy must become byte-identical to the leader's dir. A file wrongly taken as
/// held or vouched for would differ for good: nothing sends it again.
#[test]
fn restarts_at_random_while_the_broker_writes_never_leave_a_copy_that_differs() {
    const ROUNDS: usize = 12;
    let mut rng = Rng(seed());
    let env = Env::new();
    let (ld, fd, scratch) = (env.dir("leader"), env.dir("follower"), env.dir("scratch"));
    let mut broker = Broker::new(rng.next());
    for _ in 0..4000 {
        broker.write_once(&ld, &scratch);
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let engine = |rng: &mut Rng| ENGINES[rng.below(2) as usize];
    let lead = |engine: &str| {
        let mut cmd = lead_cmd_at(&env, &ld, engine, &listen);
        cmd.args(["--record-interval-ms", "200"]);
        let proc = Proc::spawn(cmd);
        proc.wait_log("listening on ", Duration::from_secs(20));
        proc
    };
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let follow = |rng: &mut Rng| {
        let durability = ["received", "written", "synced"][rng.below(3) as usize];
        start_follower(&env, &fd, addr, engine(rng), durability)
    };
    let stop = |proc: Proc, how: libc::c_int, seen: &mut Resumed| {
        seen.stop(proc, how);
    };

    let mut seen = Resumed::default();
    let mut leader = Some(lead(engine(&mut rng)));
    let mut follower = Some(follow(&mut rng));
    for round in 0..ROUNDS {
        let busy = broker.busy.clone();
        let before = Broker::set_busy(&busy, Next::Any, &mut rng);
        // The broker writes until the round ends.
        let what = broker.write_while((&ld, &scratch), || {
            // Long enough for the quiet queues' files to settle (LEADER_RECORD_SETTLE_MS).
            std::thread::sleep(Duration::from_millis(1000 + rng.below(600)));
            let (leader_how, follower_how) = match rng.below(7) {
                0 => (None, Some(libc::SIGKILL)),
                1 => (None, Some(libc::SIGTERM)),
                // Twice as likely: a leader resumed from its last checkpoint, with a follower
                // that holds changes made after it.
                2 | 3 => (Some(libc::SIGKILL), None),
                4 => (Some(libc::SIGTERM), None),
                5 => (Some(libc::SIGKILL), Some(libc::SIGKILL)),
                _ => (Some(libc::SIGTERM), Some(libc::SIGTERM)),
            };
            if let Some(how) = follower_how {
                stop(follower.take().unwrap(), how, &mut seen);
            }
            if let Some(how) = leader_how {
                stop(leader.take().unwrap(), how, &mut seen);
            }
            // The broker goes on while they are down.
            let next = [Next::Any, Next::Quiet, Next::Same][rng.below(3) as usize];
            let after = Broker::set_busy(&busy, next, &mut rng);
            std::thread::sleep(Duration::from_millis(rng.below(600)));
            if leader.is_none() {
                leader = Some(lead(engine(&mut rng)));
            }
            if follower.is_none() {
                follower = Some(follow(&mut rng));
            }
            std::thread::sleep(Duration::from_millis(rng.below(600)));
            let name = |how: Option<libc::c_int>| match how {
                Some(libc::SIGKILL) => "SIGKILL",
                Some(_) => "SIGTERM",
                None => "-",
            };
            format!(
                "leader {}, follower {}; queues {before:?} written, then {after:?}",
                name(leader_how),
                name(follower_how)
            )
        });
        eprintln!("round {round:2}: {what}");
        wait_identical(&ld, &fd, Duration::from_secs(60));
    }
    for proc in [leader.take(), follower.take()].into_iter().flatten() {
        stop(proc, libc::SIGTERM, &mut seen);
    }
    seen.assert_meaningful();
}

/// A follower promoted by hand, again and again, while the broker writes: each round kills the
/// leader (SIGKILL, mid-write), stops the followers (SIGKILL or SIGTERM), lets the broker write
/// into one follower's dir for a moment or not (an application may start before ferry does),
/// starts `ferry lead` on it, and points the other follower and the dead leader's dir at it; at
/// random one of those sits the round out and follows only after the next promotion, having
/// missed two failovers in a row (`docs/PROTOCOL.md`, *After failovers in a row*). The promoted
/// dir forks the instance it followed, with that one's fork chain, the others keep what their
/// held records (and a dead leader's own record) vouch for, and every copy must become
/// byte-identical to the new leader's dir: a file wrongly taken as held would differ for good.
#[test]
fn promotions_by_hand_at_random_while_the_broker_writes_never_leave_a_copy_that_differs() {
    const ROUNDS: usize = 8;
    let mut rng = Rng(seed());
    let env = Env::new();
    let dirs: Vec<PathBuf> = (0..3).map(|i| env.dir(&format!("n{i}"))).collect();
    let scratch = env.dir("scratch");
    let listens: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut broker = Broker::new(rng.next());
    for _ in 0..4000 {
        broker.write_once(&dirs[0], &scratch);
    }
    let engine = |rng: &mut Rng| ENGINES[rng.below(2) as usize];
    let lead = |i: usize, engine: &str| {
        let mut cmd = lead_cmd_at(&env, &dirs[i], engine, &listens[i]);
        cmd.args(["--record-interval-ms", "200"]);
        let proc = Proc::spawn(cmd);
        proc.wait_log("listening on ", Duration::from_secs(20));
        proc
    };
    let follow = |i: usize, leader: usize, rng: &mut Rng| {
        let durability = ["received", "written", "synced"][rng.below(3) as usize];
        let addr = listens[leader].parse().unwrap();
        start_follower(&env, &dirs[i], addr, engine(rng), durability)
    };
    let stop = |proc: Proc, how: libc::c_int, seen: &mut Resumed| {
        seen.stop(proc, how).matches("forking instance").count()
    };
    let name = |how| match how {
        libc::SIGKILL => "SIGKILL",
        _ => "SIGTERM",
    };
    let (mut seen, mut forks, mut missed_two) = (Resumed::default(), 0, 0);
    let mut leader = 0;
    let mut lead_proc = lead(leader, engine(&mut rng));
    let mut followers: Vec<(usize, Proc)> = (1..3).map(|i| (i, follow(i, 0, &mut rng))).collect();
    for (i, _) in &followers {
        wait_identical(&dirs[0], &dirs[*i], Duration::from_secs(60));
    }
    // The node that sat the last round out, if one did.
    let mut away: Option<usize> = None;
    for round in 0..ROUNDS {
        let busy = broker.busy.clone();
        Broker::set_busy(&busy, Next::Any, &mut rng);
        broker.write_while((&dirs[leader], &scratch), || {
            // Long enough for the quiet queues' files to settle (LEADER_RECORD_SETTLE_MS).
            std::thread::sleep(Duration::from_millis(1000 + rng.below(600)));
            // The leader's host dies, the broker with it.
            lead_proc.child.kill().unwrap();
            let _ = lead_proc.child.wait();
        });
        seen.count(&lead_proc.log_text());
        forks += lead_proc.log_text().matches("forking instance").count();
        let picked = rng.below(followers.len() as u64) as usize;
        let (promoted, promoted_proc) = followers.remove(picked);
        let how = [libc::SIGKILL, libc::SIGTERM][rng.below(2) as usize];
        forks += stop(promoted_proc, how, &mut seen);
        let mut stopped = String::new();
        for (other, other_proc) in followers.drain(..) {
            let other_how = [libc::SIGKILL, libc::SIGTERM][rng.below(2) as usize];
            forks += stop(other_proc, other_how, &mut seen);
            stopped += &format!("; node {other} stopped by {}", name(other_how));
        }
        // Who follows the new leader: the other follower and the dead leader, one of which may
        // sit this round out (not the last), and the node that sat the last one out.
        let mut next: Vec<usize> = (0..3)
            .filter(|&i| i != promoted && Some(i) != away)
            .collect();
        let returning = away.take();
        if round + 1 < ROUNDS && rng.below(3) == 0 {
            away = Some(next.remove(rng.below(next.len() as u64) as usize));
        }
        next.extend(returning);
        missed_two += usize::from(returning.is_some());
        broker.on(&dirs[promoted]);
        let early_ms = [0, rng.below(300)][rng.below(2) as usize];
        let busy_next = [Next::Any, Next::Quiet, Next::Same][rng.below(3) as usize];
        Broker::set_busy(&busy, busy_next, &mut rng);
        broker.write_while((&dirs[promoted], &scratch), || {
            std::thread::sleep(Duration::from_millis(early_ms));
            lead_proc = lead(promoted, engine(&mut rng));
            followers = next
                .iter()
                .map(|&i| (i, follow(i, promoted, &mut rng)))
                .collect();
            std::thread::sleep(Duration::from_millis(300 + rng.below(600)));
        });
        eprintln!(
            "round {round:2}: node {leader} killed; node {promoted} (follower stopped by {}) \
             leads, the broker writing there {early_ms} ms before it started{stopped}; following \
             it: {next:?}{}{}",
            name(how),
            returning.map_or(String::new(), |i| format!(
                " (node {i} after two failovers)"
            )),
            away.map_or(String::new(), |i| format!("; node {i} sits this round out")),
        );
        leader = promoted;
        for (i, follower) in &followers {
            let same = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_identical(&dirs[leader], &dirs[*i], Duration::from_secs(60))
            }));
            if let Err(e) = same {
                // What this test hunts is rare (CI once in session 53: an old segment differed
                // for good): say whose copy differs, with what both processes logged and what
                // their dirs' records held.
                eprintln!(
                    "node {i}'s copy differs from node {leader}'s; its log:\n{}\nthe leader's \
                     log:\n{}",
                    follower.log_text(),
                    lead_proc.log_text()
                );
                for (node, name) in [(*i, "held"), (*i, "forks"), (leader, "leader")] {
                    let path = dirs[node].join(".ferry").join(name);
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    eprintln!("node {node}'s .ferry/{name}:\n{text}");
                }
                std::panic::resume_unwind(e);
            }
        }
    }
    for (_, proc) in followers {
        stop(proc, libc::SIGTERM, &mut seen);
    }
    forks += stop(lead_proc, libc::SIGTERM, &mut seen);
    eprintln!("{seen:?}, {forks} forks, {missed_two} nodes back after two failovers");
    assert!(
        forks >= ROUNDS / 2 && seen.held > 0,
        "too few promotions forked or held a file for the test to mean anything: {seen:?}, \
         {forks} forks"
    );
}

/// Leadership moved again and again at random while the application writes at the leader:
/// a handoff to a node chosen at random, the leader SIGKILLed or stopped with SIGTERM (it
/// leaves the cluster, handing off first), or a follower SIGKILLed; each stopped node is
/// started again. Every round, the segment on the node that leads next is a prefix of what the
/// application wrote (never other bytes), all of it unless the leader was SIGKILLed, and every
/// node converges on it.
#[test]
fn leadership_moved_at_random_under_load_never_shows_other_bytes_and_nodes_converge() {
    const ROUNDS: usize = 8;
    const KEY: u64 = 78;
    let mut rng = Rng(seed());
    let env = Env::new();
    let etcd = start_etcd(&env.dir("etcd"));
    let marker = |i: usize, what: &str| env.tmp.path().join(format!("n{i}.{what}"));
    let start = |i: usize, port: u16| {
        let dir = env.dir(&format!("n{i}"));
        // The application stops writing when told, and the hook returns once it has.
        let hook = format!(
            "touch {} && while [ ! -e {} ]; do sleep 0.01; done",
            marker(i, "stop").display(),
            marker(i, "stopped").display()
        );
        let secret = env.secret_file.to_str().unwrap();
        spawn_node(
            &etcd.url,
            &dir,
            port,
            ["--secret-file", secret, "--on-leader-lost", &hook],
        )
    };
    // Every node starts with the same segment (and takes the others' over: --adopt is not
    // needed, each is empty but node 0).
    write(&env.dir("n0").join("q/seg"), &content(KEY, 0, 64 * 1024));
    let mut nodes: Vec<Node> = (0..3).map(|i| start(i, free_port())).collect();
    let mut marks = vec![0; 3];
    let elected = |nodes: &[Node], marks: &[usize], of: &[usize]| -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let won: Vec<usize> = of
                .iter()
                .copied()
                .filter(|&i| {
                    nodes[i].proc.log.lock().unwrap()[marks[i]..]
                        .iter()
                        .any(|l| l.contains("elected leader"))
                })
                .collect();
            assert!(won.len() < 2, "two leaders: {won:?}");
            if let Some(&i) = won.first() {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader elected within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut leader = elected(&nodes, &marks, &[0, 1, 2]);
    for round in 0..ROUNDS {
        // Ready: every node in the ISR, so any may take over, and a copy of the leader's files.
        let mut all: Vec<String> = nodes.iter().map(|n| n.advertise.clone()).collect();
        all.sort();
        nodes[leader].proc.wait_log_since(
            marks[leader],
            &format!("in-sync replica set: {}", all.join(",")),
            Duration::from_secs(30),
        );
        for i in (0..3).filter(|&i| i != leader) {
            wait_same_files(&nodes[leader].dir, &nodes[i].dir, Duration::from_secs(30));
        }
        let seg = nodes[leader].dir.join("q/seg");
        for what in ["stop", "stopped"] {
            let _ = std::fs::remove_file(marker(leader, what));
        }
        let app = Appender::until_told(
            seg.clone(),
            KEY,
            std::fs::metadata(&seg).unwrap().len(),
            (marker(leader, "stop"), marker(leader, "stopped")),
        );
        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        marks = nodes.iter().map(|n| n.proc.log_len()).collect();
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let other = others[rng.below(2) as usize];
        let (what, next, whole) = match rng.below(4) {
            0 => {
                let out = run_bounded(
                    {
                        let mut cmd = ferry();
                        cmd.args(["handoff", "--etcd", &etcd.url, "--timeout", "60"])
                            .args(["--to", &nodes[other].advertise]);
                        cmd
                    },
                    Duration::from_secs(90),
                );
                assert!(
                    out.status.success(),
                    "round {round}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let next = elected(&nodes, &marks, &[other]);
                // The target goes on with the instance: followers keep their held records.
                nodes[next].proc.wait_log_since(
                    marks[next],
                    "going on with instance",
                    Duration::from_secs(10),
                );
                ("handoff", next, true)
            }
            1 | 2 => {
                let how = if rng.below(2) == 0 {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                signal(&nodes[leader].proc.child, how);
                let status = nodes[leader].proc.child.wait().unwrap();
                app.halt();
                assert!(how == libc::SIGKILL || status.success(), "{status}");
                let next = elected(&nodes, &marks, &others);
                let port = nodes[leader].port;
                nodes[leader] = start(leader, port);
                marks[leader] = 0;
                // A leader stopped with SIGTERM hands off first, losing nothing.
                if how == libc::SIGKILL {
                    ("leader SIGKILLed", next, false)
                } else {
                    ("leader stopped", next, true)
                }
            }
            _ => {
                nodes[other].proc.child.kill().unwrap();
                nodes[other].proc.child.wait().unwrap();
                std::thread::sleep(Duration::from_millis(rng.below(1000)));
                let port = nodes[other].port;
                nodes[other] = start(other, port);
                marks[other] = 0;
                std::thread::sleep(Duration::from_millis(rng.below(1000)));
                app.halt();
                ("follower SIGKILLed", leader, true)
            }
        };
        let written = app.stop();
        let theirs = std::fs::read(nodes[next].dir.join("q/seg")).unwrap();
        eprintln!(
            "round {round}: {what}: {written} bytes written on node {leader}, node {next} leads \
             with {}",
            theirs.len()
        );
        assert!(
            theirs[..] == content(KEY, 0, theirs.len() as u64)[..],
            "round {round}: node {next}'s segment is not a prefix of what was written"
        );
        if whole {
            assert_eq!(theirs.len() as u64, written, "round {round}: bytes lost");
        }
        leader = next;
    }
    for i in (0..3).filter(|&i| i != leader) {
        wait_same_files(&nodes[leader].dir, &nodes[i].dir, Duration::from_secs(30));
    }
    drop(etcd);
}

/// The broker `an_embedding_broker_killed_at_random_never_leaves_a_copy_that_differs` runs as
/// a child process: this test binary started again on this test alone.
#[test]
#[ignore = "a child process of an_embedding_broker_killed_at_random_never_leaves_a_copy_that_differs"]
fn embedding_broker_process() {
    embedding_broker::run();
}

/// Tells the embedding broker `proc` one command (`embedding_broker::run`).
fn tell(proc: &mut Proc, command: &str) {
    let stdin = proc.child.stdin.as_mut().unwrap();
    stdin.write_all(format!("{command}\n").as_bytes()).unwrap();
    stdin.flush().unwrap();
}

/// `None` once copy `fd` holds exactly what the broker's dir `ld` holds for its followers
/// (`embedding_broker::broker_view`); else the first difference.
fn copy_difference(ld: &Path, fd: &Path) -> Option<String> {
    let want = embedding_broker::broker_view(ld);
    let have: BTreeMap<String, Vec<u8>> = files(fd)
        .into_iter()
        .filter_map(|(rel, path)| Some((rel, std::fs::read(path).ok()?)))
        .collect();
    let only = |a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>| -> Vec<String> {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
    };
    let (missing, extra) = (only(&want, &have), only(&have, &want));
    if !missing.is_empty() || !extra.is_empty() {
        return Some(format!("missing {missing:?}, not the broker's {extra:?}"));
    }
    want.iter()
        .find(|(rel, bytes)| have[*rel] != **bytes)
        .map(|(rel, bytes)| {
            let theirs = &have[rel];
            format!(
                "{rel}: the broker's {} bytes, the copy's {} (first difference at {})",
                bytes.len(),
                theirs.len(),
                common_prefix(bytes, theirs)
            )
        })
}

/// The library as brokers embed it, killed with the broker: a broker writes messages through
/// a shared mmap into segments preallocated to their full size, tells its leader with `append`
/// after each, rolls and deletes segments and rewrites small state files
/// (`embedding_broker`). Each round kills it with SIGKILL mid-write (or stops it in order) and
/// starts it again, and it recovers its messages from its segments and starts its leader with
/// those lengths, which resumes the instance of its last checkpoint; its two followers are
/// killed or stopped at random too, with random engines and durabilities. Once the broker
/// pauses, each copy must hold exactly what the broker's dir holds for followers: each
/// segment's messages, never the zeros preallocated past them, and each state file whole. A
/// copy wrongly taken as held, or a prefix shipped from a stale length, would differ for good;
/// so would a copy moved by RENAME that was not all of the renamed file (retention renames
/// segments `.deleted`, and state files are renamed into place: `embedding_broker`).
#[test]
fn an_embedding_broker_killed_at_random_never_leaves_a_copy_that_differs() {
    const ROUNDS: usize = 10;
    let mut rng = Rng(seed());
    let env = Env::new();
    let (ld, scratch) = (env.dir("broker"), env.dir("scratch"));
    let fds = [env.dir("f0"), env.dir("f1")];
    let listen = format!("127.0.0.1:{}", free_port());
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let engine = |rng: &mut Rng| ENGINES[rng.below(2) as usize];
    let start_broker = |rng: &mut Rng| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "embedding_broker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(embedding_broker::ENV_DIR, &ld)
        .env(embedding_broker::ENV_SCRATCH, &scratch)
        .env(embedding_broker::ENV_LISTEN, &listen)
        .env(embedding_broker::ENV_ENGINE, engine(rng))
        .env(embedding_broker::ENV_SEED, rng.next().to_string())
        .stdin(std::process::Stdio::piped());
        let proc = Proc::spawn(cmd);
        proc.wait_log(embedding_broker::SAID_LEADING, Duration::from_secs(30));
        proc
    };
    let follow = |rng: &mut Rng, fd: &Path| {
        let durability = ["received", "written", "synced"][rng.below(3) as usize];
        start_follower(&env, fd, addr, engine(rng), durability)
    };
    // Stops the broker: SIGKILL, or in order (its leader writes its record and ends).
    let stop_broker = |mut proc: Proc, kill: bool, seen: &mut Resumed| {
        if kill {
            seen.stop(proc, libc::SIGKILL);
            return;
        }
        tell(&mut proc, "stop");
        let (status, _) = proc.exit_within(Duration::from_secs(30));
        let log = proc.log_text();
        assert!(status.success(), "{status}\n{log}");
        seen.count(&log);
    };

    let mut seen = Resumed::default();
    // Copies the followers moved with RENAME (retention renaming segments `.deleted`).
    let mut renamed_total = 0;
    let mut broker = Some(start_broker(&mut rng));
    let mut followers: Vec<Option<Proc>> =
        fds.iter().map(|fd| Some(follow(&mut rng, fd))).collect();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(600 + rng.below(800)));
        let k = rng.below(2) as usize;
        let either = |rng: &mut Rng| [libc::SIGKILL, libc::SIGTERM][rng.below(2) as usize];
        // The broker writing on between the followers' stop and its own, for so long.
        let mut gap_ms = 0;
        let (broker_how, follower_how, whom) = match rng.below(10) {
            0 | 1 => (Some(libc::SIGKILL), None, vec![]),
            2 => (Some(libc::SIGTERM), None, vec![]),
            3 => (None, Some(either(&mut rng)), vec![k]),
            4 => (Some(libc::SIGKILL), Some(libc::SIGKILL), vec![k]),
            5 => (Some(libc::SIGKILL), Some(libc::SIGTERM), vec![0, 1]),
            // Changes the follower never saw, some of them after the broker's last
            // checkpoint: what a checkpoint must not vouch for.
            _ => {
                gap_ms = rng.below(1500);
                (Some(libc::SIGKILL), Some(either(&mut rng)), vec![k])
            }
        };
        for &i in &whom {
            seen.stop(followers[i].take().unwrap(), follower_how.unwrap());
        }
        std::thread::sleep(Duration::from_millis(gap_ms));
        if let Some(how) = broker_how {
            stop_broker(broker.take().unwrap(), how == libc::SIGKILL, &mut seen);
        }
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        if broker.is_none() {
            broker = Some(start_broker(&mut rng));
        }
        for (i, fd) in fds.iter().enumerate() {
            if followers[i].is_none() {
                followers[i] = Some(follow(&mut rng, fd));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(800)));
        let proc = broker.as_mut().unwrap();
        let from = proc.log_len();
        tell(proc, "pause");
        let said =
            proc.wait_log_since(from, embedding_broker::SAID_PAUSED, Duration::from_secs(30));
        let moved: u64 = said
            .rsplit(embedding_broker::SAID_RENAMED)
            .next()
            .and_then(|n| n.trim().trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no count of moved copies in {said:?}"));
        renamed_total += moved;
        let name = |how: Option<libc::c_int>| match how {
            Some(libc::SIGKILL) => "SIGKILL",
            Some(_) => "stopped",
            None => "-",
        };
        let paused = Instant::now();
        for fd in &fds {
            while let Some(diff) = copy_difference(&ld, fd) {
                assert!(
                    paused.elapsed() < Duration::from_secs(60),
                    "round {round}: {} differs after 60 s: {diff}",
                    fd.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        eprintln!(
            "round {round:2}: followers {whom:?} {}, then {gap_ms} ms later broker {}; copies \
             as the broker's {:.1} s after it paused; {moved} moved by RENAME",
            name(follower_how),
            name(broker_how),
            paused.elapsed().as_secs_f64()
        );
        tell(broker.as_mut().unwrap(), "resume");
    }
    for proc in followers.iter_mut().filter_map(Option::take) {
        seen.stop(proc, libc::SIGTERM);
    }
    stop_broker(broker.take().unwrap(), false, &mut seen);
    seen.assert_meaningful();
    assert!(
        renamed_total > 0,
        "no copy was moved with RENAME: renames not tested"
    );
}

/// A follower's host that drops off the network without a reset (its link cut: nothing it
/// sends or acknowledges arrives) leaves the leader's followers within
/// `FOLLOWER_UNACKED_TIMEOUT_MS` of its last acknowledgement, the leader saying why, where the
/// kernel's retransmissions of the leader's keepalives would have kept it listed (and its
/// connection's files open) for about 15 minutes.
#[test]
fn a_follower_whose_host_vanishes_leaves_the_leaders_followers_within_the_unacked_timeout() {
    let Some(net) = Netns::create_or_skip() else {
        return;
    };
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("q/seg"), &content(7, 0, MIB));
    let listen = format!("{}:{}", net.host_ip, free_port());
    let leader = Proc::spawn(lead_cmd_at(&env, &ld, "fallback", &listen));
    leader.wait_log("listening on ", Duration::from_secs(20));
    // The follower's host is the namespace, reaching the leader over the veth.
    let _follower = {
        let mut cmd = net.exec(env!("CARGO_BIN_EXE_ferry"));
        cmd.env("RUST_LOG", "info").env_remove("FERRY_SECRET");
        cmd.args(["follow", "--leader", &listen, "--io-engine", "fallback"])
            .arg("--data-dir")
            .arg(&fd)
            .arg("--secret-file")
            .arg(&env.secret_file);
        Proc::spawn(cmd)
    };
    leader.wait_log("is in sync: streaming", Duration::from_secs(30));
    wait_same_files(&ld, &fd, Duration::from_secs(20));

    let (mark, cut) = (leader.log_len(), Instant::now());
    net.link(false);
    let line = leader.wait_log_since(mark, "FOLLOWER_UNACKED_TIMEOUT_MS", Duration::from_secs(60));
    let took = cut.elapsed();
    assert!(line.contains("follower #"), "{line}");
    eprintln!("{:.1} s after the cut: {line}", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(50),
        "dropped {took:?} after the cut"
    );
}
