//! A broker that embeds ferry's leader, the way the library is meant to be used: it writes
//! messages through a shared mmap into segments preallocated to their full size, tells the
//! leader with `append` after each, rolls to a new segment when one is full and deletes its
//! oldest (`delete_file`, or first renamed `.deleted` as Kafka's retention does, `rename_file`),
//! and rewrites a small state file whole (`replace_file`, or a temp file beside it reported as
//! written and renamed over it, `rename_file`). Killed, it
//! recovers as a broker does: it scans its segments for the messages written whole (a header
//! stored last, with a checksum of the message) and starts its leader with those lengths.
//!
//! `tests/faults.rs` runs it as a child process (this test binary started again on the ignored
//! test `embedding_broker_process`) so that it can be killed with SIGKILL mid-write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Rng;

/// The queues it writes to, each a directory `q<k>` of segments and a `state.json`.
pub const QUEUES: usize = 3;
/// Every segment is preallocated to this size on creation (the leader is told less).
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// Segments kept per queue; rolling past it deletes the oldest.
const SEGMENTS_KEPT: u64 = 3;
/// A message's header: its payload length (low 32 bits) and a checksum of the payload (high).
const HEADER_BYTES: u64 = 8;
const MESSAGE_PAYLOAD_MAX: u64 = 2000;

/// The environment that tells a child process it is the broker, and where and how to run.
pub const ENV_DIR: &str = "FERRY_TEST_BROKER_DIR";
pub const ENV_SCRATCH: &str = "FERRY_TEST_BROKER_SCRATCH";
pub const ENV_LISTEN: &str = "FERRY_TEST_BROKER_LISTEN";
pub const ENV_ENGINE: &str = "FERRY_TEST_BROKER_ENGINE";
pub const ENV_SEED: &str = "FERRY_TEST_BROKER_SEED";
/// Said after `SAID_PAUSED`, with the copies its followers' connections moved with RENAME.
pub const SAID_RENAMED: &str = "copies moved on these connections:";
/// Logged (stderr, as everything it says) once the leader serves, with the files it was
/// started with.
pub const SAID_LEADING: &str = "broker: leading";
/// Logged once the writer stands still after a `pause` (`run`).
pub const SAID_PAUSED: &str = "broker: paused";

fn checksum(payload: &[u8]) -> u32 {
    // FNV-1a, never 0, so a header is never all zeros.
    let mut h: u32 = 0x811c_9dc5;
    for &b in payload {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h | 1
}

fn padded(len: u64) -> u64 {
    HEADER_BYTES + len.div_ceil(8) * 8
}

/// The length of segment `bytes` that holds whole messages: up to the first header that is
/// zero, runs past the segment or does not match its payload.
pub fn logical_len(bytes: &[u8]) -> u64 {
    let mut at = 0u64;
    while at + HEADER_BYTES <= bytes.len() as u64 {
        let i = at as usize;
        let header = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let len = header & 0xffff_ffff;
        if header == 0 || len == 0 || at + padded(len) > bytes.len() as u64 {
            break;
        }
        let payload = &bytes[i + 8..i + 8 + len as usize];
        if checksum(payload) as u64 != header >> 32 {
            break;
        }
        at += padded(len);
    }
    at
}

fn is_segment(rel: &str) -> bool {
    rel.ends_with(".seg") || rel.ends_with(".seg.deleted")
}

/// What a broker's dir holds for its followers, by relative path: each segment's messages
/// (its logical length), every other file whole; ferry's own `.ferry/` left out.
pub fn broker_view(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    super::common::files(dir)
        .into_iter()
        .filter_map(|(rel, path)| {
            let mut bytes = std::fs::read(path).ok()?;
            if is_segment(&rel) {
                bytes.truncate(logical_len(&bytes) as usize);
            }
            Some((rel, bytes))
        })
        .collect()
}

/// One segment being written, mapped shared and writable over its whole preallocated size.
struct Mapped {
    rel: String,
    /// Keeps the file open for the mapping's life.
    _file: std::fs::File,
    base: *mut u8,
    /// Where the next message goes: the logical length.
    len: u64,
}

impl Mapped {
    fn open(dir: &Path, rel: &str, len: u64) -> Mapped {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(rel))
            .unwrap();
        // Preallocated once: setting the length again, even to the same, changes the file's
        // mtime and ctime, and its leader's record could no longer vouch for it.
        if file.metadata().unwrap().len() != SEGMENT_BYTES {
            file.set_len(SEGMENT_BYTES).unwrap();
        }
        // SAFETY: a fresh mapping (no address asked for) of SEGMENT_BYTES of a file just set to
        // that length; the file stays open beside it, and `Drop` unmaps it once. Only this
        // process's writer thread touches it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SEGMENT_BYTES as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap {rel}");
        Mapped {
            rel: rel.to_string(),
            _file: file,
            base: base.cast(),
            len,
        }
    }

    /// Writes one message with `payload` if it fits: the payload, then its header, so that a
    /// kill in between leaves a zero header where recovery stops. Returns its offset and length.
    fn write(&mut self, payload: &[u8]) -> Option<(u64, u64)> {
        let at = self.len;
        let size = padded(payload.len() as u64);
        if at + size > SEGMENT_BYTES {
            return None;
        }
        let header = payload.len() as u64 | (checksum(payload) as u64) << 32;
        // SAFETY: `at + size <= SEGMENT_BYTES`, the mapping's length, so both writes stay in
        // it; `at` is a multiple of 8 (every message's size is) and the mapping page-aligned,
        // so the header's store is aligned. The volatile store comes after the payload's copy
        // in program order and the compiler fence keeps it there.
        unsafe {
            let p = self.base.add(at as usize);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(8), payload.len());
            std::sync::atomic::compiler_fence(Ordering::Release);
            std::ptr::write_volatile(p.cast::<u64>(), header.to_le());
        }
        self.len = at + size;
        Some((at, size))
    }
}

// SAFETY: the mapping belongs to this value alone (no copy of `base` escapes it), so moving it
// to the writer thread moves the only way to reach it.
unsafe impl Send for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping `open` made, of that length, unmapped only here.
        unsafe { libc::munmap(self.base.cast(), SEGMENT_BYTES as usize) };
    }
}

/// A queue: its oldest and active segment numbers, the active one mapped.
struct Queue {
    oldest: u64,
    active: Mapped,
    number: u64,
    /// The segment retention renamed `.deleted` (as Kafka does), deleted at the next roll.
    deleted: Option<u64>,
}

fn segment_rel(q: usize, n: u64) -> String {
    format!("q{q}/{n:08}.seg")
}

/// Recovers every queue of `dir` as a restarted broker does: the numbers of its segments, the
/// active one's messages; returns the queues and every file with the length to start the
/// leader with.
fn recover(dir: &Path) -> (Vec<Queue>, Vec<(String, u64)>) {
    let mut files = Vec::new();
    let mut queues = Vec::new();
    for q in 0..QUEUES {
        std::fs::create_dir_all(dir.join(format!("q{q}"))).unwrap();
        // What a retention or a state file rewrite left half done: finished now (not served).
        for entry in std::fs::read_dir(dir.join(format!("q{q}"))).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".deleted") || name.ends_with(".tmp") {
                std::fs::remove_file(dir.join(format!("q{q}/{name}"))).unwrap();
            }
        }
        let mut numbers: Vec<u64> = std::fs::read_dir(dir.join(format!("q{q}")))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        numbers.sort();
        for &n in &numbers {
            let rel = segment_rel(q, n);
            files.push((
                rel.clone(),
                logical_len(&std::fs::read(dir.join(&rel)).unwrap()),
            ));
        }
        let state = format!("q{q}/state.json");
        if let Ok(meta) = std::fs::metadata(dir.join(&state)) {
            files.push((state, meta.len()));
        }
        let (oldest, number) = match (numbers.first(), numbers.last()) {
            (Some(&o), Some(&a)) => (o, a),
            _ => (0, 0),
        };
        let len = files
            .iter()
            .find(|(rel, _)| *rel == segment_rel(q, number))
            .map_or(0, |&(_, len)| len);
        let active = Mapped::open(dir, &segment_rel(q, number), len);
        if numbers.is_empty() {
            files.push((segment_rel(q, number), 0));
        }
        queues.push(Queue {
            oldest,
            active,
            number,
            deleted: None,
        });
    }
    (queues, files)
}

/// The child process's body: recovers, leads, and writes until told on its stdin, a line
/// each: `pause` (it answers `SAID_PAUSED` on stderr once the writer stands still), `resume`,
/// `stop` (or the end of its input: it stops its leader in order and returns). Commands, not
/// signals: the test harness's other threads would take a signal's default action.
pub fn run() {
    use ferry::leader::{Leader, LeaderConfig};
    use std::io::BufRead;
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .try_init();
    let dir = PathBuf::from(var(ENV_DIR));
    let scratch = PathBuf::from(var(ENV_SCRATCH));
    let mut rng = Rng(var(ENV_SEED).parse().unwrap());
    let (mut queues, files) = recover(&dir);
    let mut config = LeaderConfig::new(
        &dir,
        var(ENV_LISTEN).parse().unwrap(),
        ferry::auth::Secret::new(super::common::SECRET.as_bytes().to_vec()).unwrap(),
    );
    config.engine = Some(var(ENV_ENGINE).parse().unwrap());
    // Checkpoints often, or seldom: changes made after the last one are what it must not
    // vouch for when killed.
    config.record_interval = Duration::from_millis([200, 2000][rng.below(2) as usize]);
    let start_files = files
        .iter()
        .map(|(rel, len)| (ferry::paths::RelPath::new(rel).unwrap(), *len))
        .collect();
    let leader = Arc::new(Leader::start(config, start_files).unwrap());
    eprintln!("{SAID_LEADING} {} files: {files:?}", files.len());

    let (paused, parked, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (leader, paused, parked, stop) =
            (leader.clone(), paused.clone(), parked.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if paused.load(Ordering::SeqCst) {
                    parked.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                parked.store(false, Ordering::SeqCst);
                write_once(&leader, &dir, &scratch, &mut queues, &mut rng);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    for line in std::io::stdin().lock().lines() {
        match line.unwrap().trim() {
            "pause" => {
                paused.store(true, Ordering::SeqCst);
                while !parked.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let renamed: u64 = leader.followers().iter().map(|f| f.files_renamed).sum();
                eprintln!("{SAID_PAUSED} ({SAID_RENAMED} {renamed})");
            }
            "resume" => {
                parked.store(false, Ordering::SeqCst);
                paused.store(false, Ordering::SeqCst);
            }
            "stop" => break,
            other => panic!("broker: unknown command {other:?}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    match Arc::try_unwrap(leader) {
        Ok(leader) => leader.shutdown(),
        Err(_) => panic!("the writer still holds the leader"),
    }
    eprintln!("broker: stopped");
}

/// One change of the broker's, chosen at random: mostly a message into a queue's active
/// segment (rolling to a new one when full), sometimes its state file rewritten, seldom the
/// queue purged.
fn write_once(
    leader: &ferry::leader::Leader,
    dir: &Path,
    scratch: &Path,
    queues: &mut [Queue],
    rng: &mut Rng,
) {
    // A busy queue, a slower one and a quiet one: a segment rolls every second or so, every
    // few seconds, and every half minute, so that some files settle for a checkpoint to vouch
    // for (a file changed within `LEADER_RECORD_SETTLE_MS` of it is not).
    let q = match rng.below(100) {
        0..=79 => 0,
        80..=97 => 1,
        _ => 2,
    };
    let queue = &mut queues[q];
    if rng.below(100) < 3 {
        let len = 20 + rng.below(2000) as usize;
        let body: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
        let rel = format!("q{q}/state.json");
        if rng.below(2) == 0 {
            let tmp = scratch.join("state.json.tmp");
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, dir.join(&rel)).unwrap();
            leader.replace_file(&rel).unwrap();
        } else {
            // Written beside it, reported as it is written, renamed over it: followers that
            // hold all of the temp file move it (`rename_file`), the others get it whole.
            let tmp_rel = format!("q{q}/state.json.tmp");
            std::fs::write(dir.join(&tmp_rel), &body).unwrap();
            leader.append(&tmp_rel, 0, body.len() as u64).unwrap();
            std::fs::rename(dir.join(&tmp_rel), dir.join(&rel)).unwrap();
            leader.rename_file(&tmp_rel, &rel).unwrap();
        }
        return;
    }
    if rng.below(20_000) == 0 {
        // The queue purged: its segments deleted, and numbering starts again from 0, so
        // names it had come back with other bytes (and, preallocated, the same size).
        for n in queue.oldest..=queue.number {
            let rel = segment_rel(q, n);
            std::fs::remove_file(dir.join(&rel)).unwrap();
            leader.delete_file(&rel).unwrap();
        }
        (queue.oldest, queue.number) = (0, 0);
        queue.active = Mapped::open(dir, &segment_rel(q, 0), 0);
    }
    let len = 1 + rng.below(MESSAGE_PAYLOAD_MAX);
    let seed = rng.below(u64::MAX);
    let payload: Vec<u8> = (0..len)
        .map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8)
        .collect();
    let (at, size) = match queue.active.write(&payload) {
        Some(written) => written,
        None => {
            // Rolled: the next segment, its first message, then the oldest deleted.
            queue.number += 1;
            queue.active = Mapped::open(dir, &segment_rel(q, queue.number), 0);
            let written = queue.active.write(&payload).unwrap();
            if let Some(n) = queue.deleted.take() {
                let rel = format!("{}.deleted", segment_rel(q, n));
                std::fs::remove_file(dir.join(&rel)).unwrap();
                leader.delete_file(&rel).unwrap();
            }
            if queue.number - queue.oldest >= SEGMENTS_KEPT {
                let rel = segment_rel(q, queue.oldest);
                if rng.below(2) == 0 {
                    std::fs::remove_file(dir.join(&rel)).unwrap();
                    leader.delete_file(&rel).unwrap();
                } else {
                    // Renamed first, deleted at the next roll, as Kafka's retention does.
                    let deleted = format!("{rel}.deleted");
                    std::fs::rename(dir.join(&rel), dir.join(&deleted)).unwrap();
                    leader.rename_file(&rel, &deleted).unwrap();
                    queue.deleted = Some(queue.oldest);
                }
                queue.oldest += 1;
            }
            written
        }
    };
    leader.append(&queue.active.rel, at, size).unwrap();
}
