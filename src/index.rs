//! The file index of a data dir, and SHA-1 digests with a persisted cache.
//!
//! `scan` lists what is replicated: regular files, recursively, sorted, outside `.ferry/`,
//! symlinks never followed. Digests are SHA-1 (as LavinMQ's) over a file's first N bytes, because
//! the sync compares a follower's copy with a *prefix* of the leader's file. The `sha1` crate is
//! used over `sha1_smol` because it is about 3x faster here (SHA-NI); `cargo bench --bench
//! digest` measures both.
//!
//! `DigestCache` remembers, per path, the digest of a prefix together with how many bytes it
//! covers and the file's size and mtime when it was taken. A lookup hits only if all of them
//! still match the file, so a restart rehashes nothing unchanged, and a file changed behind
//! ferry's back (other size or mtime) is rehashed. It lives in `DIR/.ferry/digests`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use sha1::{Digest as _, Sha1};

pub use crate::frame::Digest;
use crate::paths::{DataDir, RelPath, StateSync, STATE_DIR_NAME};

/// Bytes read per pread while hashing.
const HASH_CHUNK_BYTES: usize = 1024 * 1024;
const CACHE_FILE_NAME: &str = "digests";
const CACHE_HEADER: &str = "ferry-digests-v1";

/// How often a long inventory says how far its hashing has got (`HashProgress`).
pub const HASH_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// Threads at most that look at a data dir's files at once (`look_each`), and how many files it
/// takes to start more than one.
const LOOK_THREADS_MAX: usize = 4;
pub const LOOK_PARALLEL_MIN_FILES: usize = 4096;

/// Bytes as an operator reads them: kB, MB or GB (powers of ten), as the logs give rates.
pub fn human_bytes(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.0} kB", bytes / 1e3)
    }
}

/// What a long run of hashing says while it runs (a follower's inventory after a new leader, or
/// the leader's side of it): nothing for `HASH_PROGRESS_INTERVAL`, then a line at most that
/// often, so an operator can tell a side that hashes from one that hangs.
#[derive(Debug)]
pub struct HashProgress {
    /// The files there are to look at, when known.
    files_total: Option<usize>,
    files_done: usize,
    hashed_bytes: u64,
    started: Instant,
    said_at: Instant,
}

impl HashProgress {
    pub fn new(files_total: Option<usize>, now: Instant) -> HashProgress {
        HashProgress {
            files_total,
            files_done: 0,
            hashed_bytes: 0,
            started: now,
            said_at: now,
        }
    }

    /// One more file looked at, which cost `hashed_bytes` (0 when its digest was cached); the
    /// line to log at `now`, if one is due.
    pub fn looked_at(&mut self, now: Instant, hashed_bytes: u64) -> Option<String> {
        self.files_done += 1;
        self.hashed_bytes += hashed_bytes;
        if now.duration_since(self.said_at) < HASH_PROGRESS_INTERVAL {
            return None;
        }
        self.said_at = now;
        let elapsed_s = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let of = self
            .files_total
            .map(|t| format!(" of {t}"))
            .unwrap_or_default();
        let noun = match self.files_total.unwrap_or(self.files_done) {
            1 => "file",
            _ => "files",
        };
        Some(format!(
            "{}{of} {noun} looked at, {} hashed in {elapsed_s:.0} s ({}/s)",
            self.files_done,
            human_bytes(self.hashed_bytes as f64),
            human_bytes(self.hashed_bytes as f64 / elapsed_s)
        ))
    }
}

/// Lowercase hex, two digits a byte (digests here, instance ids in the held record).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

/// The `N` bytes written by `hex` (uppercase digits read as well); `None` unless `s` is two hex
/// digits a byte. Digit by digit: `u8::from_str_radix` on each pair took a sign ("+f") and
/// was a fifth of the time a held record of 100,000 lines took to load.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(s.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub path: RelPath,
    pub len_bytes: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

/// Every file a look at each found (sorted by path), and when that look began: what a leader
/// starts from (the watcher's look, or a scan).
#[derive(Clone, Copy)]
pub struct Looked<'a> {
    pub files: &'a [FileMeta],
    /// `now_ns` before the first file was looked at: no stat of the look is older.
    pub began_ns: i64,
}

impl FileMeta {
    /// `path` as `meta`, a stat of it, shows it.
    pub fn of(path: RelPath, meta: &std::fs::Metadata) -> FileMeta {
        FileMeta {
            path,
            len_bytes: meta.len(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            ino: meta.ino(),
        }
    }
}

/// A file's mtime in nanoseconds since the epoch, as the digest cache and the watcher compare it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Now, in nanoseconds since the epoch: what a look began at, to compare with ctimes.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A file's ctime in nanoseconds since the epoch.
pub fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.ctime_nsec())
}

/// What a file looked like (the held record, the leader's record): any change to it, by ferry or
/// behind its back, changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub len_bytes: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of_meta(meta: &FileMeta) -> Stamp {
        Stamp {
            ino: meta.ino,
            len_bytes: meta.len_bytes,
            mtime_ns: meta.mtime_ns,
            ctime_ns: meta.ctime_ns,
        }
    }

    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            len_bytes: meta.len(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
        }
    }

    /// `path` in `dir` as it is now: `None` when it is not a regular file.
    pub fn look(dir: &DataDir, path: &RelPath) -> io::Result<Option<Stamp>> {
        let meta = dir.open_read(path)?.metadata()?;
        Ok(meta.is_file().then(|| Stamp::of(&meta)))
    }

    /// The four fields `Display` writes, the next four of `fields`.
    pub fn parse<'a>(fields: &mut impl Iterator<Item = &'a str>) -> Option<Stamp> {
        Some(Stamp {
            ino: fields.next()?.parse().ok()?,
            len_bytes: fields.next()?.parse().ok()?,
            mtime_ns: fields.next()?.parse().ok()?,
            ctime_ns: fields.next()?.parse().ok()?,
        })
    }
}

/// The fields of a record's line, split at spaces: `n - 1` of them, then the rest of the line
/// (a path, which may hold spaces), as `line.splitn(n, ' ')` gives them. Not through that: a
/// `char` pattern finds each space with a call to memcmp per candidate, a fifth of the time a
/// record of 100,000 lines took to load.
pub fn fields(line: &str, n: usize) -> impl Iterator<Item = &str> {
    let mut rest = (n > 0).then_some(line);
    let mut left = n;
    std::iter::from_fn(move || {
        let r = rest?;
        left = left.saturating_sub(1);
        let space = match left {
            0 => None,
            _ => r.bytes().position(|b| b == b' '),
        };
        match space {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// `ino len_bytes mtime_ns ctime_ns`, as the records write a stamp.
impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Stamp {
            ino,
            len_bytes,
            mtime_ns,
            ctime_ns,
        } = self;
        write!(f, "{ino} {len_bytes} {mtime_ns} {ctime_ns}")
    }
}

/// `look` at each of `files`, in their order, on up to `LOOK_THREADS_MAX` threads (one below
/// `LOOK_PARALLEL_MIN_FILES` files): a look at every file of a data dir (an open and an fstat
/// or more each) is what a leader's start and stop cost per file, and it is independent per file.
pub fn look_each<T: Sync, R: Send>(files: &[T], look: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = if files.len() < LOOK_PARALLEL_MIN_FILES {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(LOOK_THREADS_MAX)
    };
    crate::threads::each_on(files, threads, look)
}

pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id: a record of stamps vouches for the page cache, which a reboot may not keep.
/// `None` when unreadable.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// Every replicated file under the data dir, sorted by path.
pub fn scan(dir: &DataDir) -> io::Result<Vec<FileMeta>> {
    scan_root(dir.root())
}

fn scan_root(root: &Path) -> io::Result<Vec<FileMeta>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let cannot_list = |e| crate::paths::cannot_list(&abs, e);
        let entries = match std::fs::read_dir(&abs) {
            Ok(entries) => entries,
            // A subdirectory deleted meanwhile: nothing of it to scan.
            Err(e) if !rel.is_empty() && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(cannot_list(e)),
        };
        for entry in entries {
            let entry = entry.map_err(cannot_list)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!("skipping {:?}: the name is not UTF-8", entry.path());
                continue;
            };
            if rel.is_empty() && name == STATE_DIR_NAME {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            // symlink_metadata: a symlink is reported as one, never followed.
            let meta = match entry.path().symlink_metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                stack.push((entry.path(), child_rel));
            } else if meta.is_file() {
                match RelPath::new(&child_rel) {
                    Ok(path) => out.push(FileMeta::of(path, &meta)),
                    Err(e) => tracing::warn!("skipping {child_rel:?}: {e}"),
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// SHA-1 of the first `len_bytes` of `file`.
pub fn sha1_prefix(file: &File, len_bytes: u64) -> io::Result<Digest> {
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES.min(len_bytes as usize).max(1)];
    let mut offset = 0u64;
    while offset < len_bytes {
        let want = ((len_bytes - offset) as usize).min(buf.len());
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file is {offset} bytes, {} short of the {len_bytes} to hash",
                    len_bytes - offset
                ),
            ));
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hasher.finalize().into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheEntry {
    size_bytes: u64,
    mtime_ns: i64,
    covered_bytes: u64,
    digest: Digest,
}

#[derive(Debug, Default)]
pub struct DigestCache {
    entries: HashMap<RelPath, CacheEntry>,
    hashed_bytes: u64,
}

impl DigestCache {
    /// The cache saved in `DIR/.ferry/digests`; empty when missing or unreadable (with a warning).
    pub fn load(dir: &DataDir) -> DigestCache {
        let path = dir.state_path(CACHE_FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return DigestCache::default(),
            Err(e) => {
                tracing::warn!("ignoring the digest cache {}: {e}", path.display());
                return DigestCache::default();
            }
        };
        match DigestCache::parse(&text) {
            Some(entries) => DigestCache {
                entries,
                hashed_bytes: 0,
            },
            None => {
                tracing::warn!(
                    "ignoring the digest cache {}: it is corrupt; files will be rehashed",
                    path.display()
                );
                DigestCache::default()
            }
        }
    }

    fn parse(text: &str) -> Option<HashMap<RelPath, CacheEntry>> {
        let mut lines = text.lines();
        if lines.next()? != CACHE_HEADER {
            return None;
        }
        let mut entries = HashMap::with_capacity(text.matches('\n').count().saturating_sub(1));
        for line in lines {
            let mut fields = fields(line, 5);
            let size_bytes = fields.next()?.parse().ok()?;
            let mtime_ns = fields.next()?.parse().ok()?;
            let covered_bytes = fields.next()?.parse().ok()?;
            let digest = from_hex(fields.next()?)?;
            let path = RelPath::new(fields.next()?).ok()?;
            entries.insert(
                path,
                CacheEntry {
                    size_bytes,
                    mtime_ns,
                    covered_bytes,
                    digest,
                },
            );
        }
        Some(entries)
    }

    /// Writes the cache, whole (`StateSync::Whole`: after a crash the old cache or the new one,
    /// either of which serves; a lost save costs only a rehash).
    pub fn save(&self, dir: &DataDir) -> io::Result<()> {
        let mut text = String::from(CACHE_HEADER);
        text.push('\n');
        let mut paths: Vec<_> = self.entries.keys().collect();
        paths.sort();
        for path in paths {
            if path.as_str().contains('\n') {
                continue; // not representable in the line format; it will be rehashed
            }
            let e = &self.entries[path];
            text.push_str(&format!(
                "{} {} {} {} {}\n",
                e.size_bytes,
                e.mtime_ns,
                e.covered_bytes,
                hex(&e.digest),
                path
            ));
        }
        dir.replace_state_file(CACHE_FILE_NAME, text.as_bytes(), StateSync::Whole)
    }

    /// SHA-1 of the first `len_bytes` of `meta.path`, from the cache when the file is unchanged.
    pub fn digest_prefix(
        &mut self,
        dir: &DataDir,
        meta: &FileMeta,
        len_bytes: u64,
    ) -> io::Result<Digest> {
        self.digest_path_prefix(dir, &meta.path, len_bytes)
    }

    /// Like `digest_prefix`, by path alone (the file is stat'ed here either way).
    pub fn digest_path_prefix(
        &mut self,
        dir: &DataDir,
        path: &RelPath,
        len_bytes: u64,
    ) -> io::Result<Digest> {
        let file = dir.open_read(path)?;
        let stat = file.metadata()?;
        let (size_bytes, mtime) = (stat.len(), mtime_ns(&stat));
        if let Some(e) = self.entries.get(path) {
            if e.size_bytes == size_bytes && e.mtime_ns == mtime && e.covered_bytes == len_bytes {
                return Ok(e.digest);
            }
        }
        let digest = sha1_prefix(&file, len_bytes)?;
        self.hashed_bytes += len_bytes;
        // Changed while being hashed: the digest is of some mix of old and new bytes; use it
        // (it can only cause a resend) but do not remember it against either state.
        let after = file.metadata()?;
        if after.len() != size_bytes || mtime_ns(&after) != mtime {
            self.entries.remove(path);
            return Ok(digest);
        }
        self.entries.insert(
            path.clone(),
            CacheEntry {
                size_bytes,
                mtime_ns: mtime,
                covered_bytes: len_bytes,
                digest,
            },
        );
        Ok(digest)
    }

    pub fn retain(&mut self, keep: impl Fn(&RelPath) -> bool) {
        self.entries.retain(|p, _| keep(p));
    }

    /// Bytes this instance actually hashed (cache misses).
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_bytes
    }
}

/// `<40 hex sha1>  <path>` for every replicated file under `dir`, sorted by path. Reads only:
/// nothing is created in `dir`.
pub fn checksum_dir(dir: &Path) -> io::Result<Vec<String>> {
    let data = DataDir::open_existing(dir)?;
    let mut lines = Vec::new();
    for meta in scan_root(dir)? {
        let file = data.open_read(&meta.path)?;
        let len = file.metadata()?.len();
        let digest = sha1_prefix(&file, len)?;
        lines.push(format!("{}  {}", hex(&digest), meta.path));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::paths::temp_data_dir as setup;

    #[test]
    fn hex_writes_two_lowercase_digits_a_byte_and_from_hex_reads_them_back() {
        let bytes = [0x00, 0x0f, 0xa5, 0xff, 0x10];
        assert_eq!(hex(&bytes), "000fa5ff10");
        assert_eq!(from_hex::<5>("000fa5ff10"), Some(bytes));
        assert_eq!(hex(&[]), "");
        // Hex digits only, two a byte, uppercase read as well; no sign, no other length.
        assert_eq!(from_hex::<2>("A5fF"), Some([0xa5, 0xff]));
        for not_hex in ["+f", "-1", "g0", " 1", "1", "123"] {
            assert_eq!(from_hex::<1>(not_hex), None, "{not_hex:?}");
        }
        assert_eq!(from_hex::<2>("0+ff"), None);
    }

    #[test]
    fn fields_split_a_line_as_splitn_at_spaces_does() {
        let lines = [
            "1 2 3 4 a path with spaces",
            "1 2",
            "",
            " ",
            "1  2 ",
            "abc",
            "é ü ß q/ä ö",
        ];
        for line in lines {
            for n in 0..8 {
                let ours: Vec<&str> = fields(line, n).collect();
                let std: Vec<&str> = line.splitn(n, ' ').collect();
                assert_eq!(ours, std, "{line:?} in {n}");
            }
        }
    }

    /// Looked at on several threads or one, each file's look comes back in the files' order.
    #[test]
    fn each_look_comes_back_in_the_order_of_its_file() {
        for count in [
            0,
            3,
            LOOK_PARALLEL_MIN_FILES - 1,
            3 * LOOK_PARALLEL_MIN_FILES + 1,
        ] {
            let files: Vec<u64> = (0..count as u64).collect();
            let looks = look_each(&files, |f| (*f, std::thread::current().id()));
            assert_eq!(
                looks.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
                files,
                "{count}"
            );
            let threads: std::collections::HashSet<_> = looks.iter().map(|(_, t)| *t).collect();
            let parallel = count >= LOOK_PARALLEL_MIN_FILES
                && std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
            assert_eq!(threads.len() > 1, parallel, "{count}");
        }
    }

    #[test]
    fn a_long_hash_says_how_far_it_has_got_every_interval_and_a_short_one_says_nothing() {
        let t0 = Instant::now();
        let mut progress = HashProgress::new(Some(400), t0);
        let just_before = t0 + HASH_PROGRESS_INTERVAL - Duration::from_millis(1);
        for _ in 0..99 {
            assert_eq!(progress.looked_at(just_before, 50_000_000), None);
        }
        let line = progress
            .looked_at(t0 + HASH_PROGRESS_INTERVAL, 9_750_000_000)
            .unwrap();
        assert_eq!(
            line,
            "100 of 400 files looked at, 14.70 GB hashed in 10 s (1.47 GB/s)"
        );
        // Not again until a whole interval later; a file found in the cache costs nothing.
        let later = t0 + HASH_PROGRESS_INTERVAL * 2 - Duration::from_millis(1);
        assert_eq!(progress.looked_at(later, 0), None);
        let line = progress
            .looked_at(t0 + HASH_PROGRESS_INTERVAL * 2, 5_300_000_000)
            .unwrap();
        assert_eq!(
            line,
            "102 of 400 files looked at, 20.00 GB hashed in 20 s (1.00 GB/s)"
        );
        // With no total known (a leader hashing as a follower's HAVEs arrive).
        let mut progress = HashProgress::new(None, t0);
        let line = progress
            .looked_at(t0 + HASH_PROGRESS_INTERVAL, 2_000_000)
            .unwrap();
        assert_eq!(line, "1 file looked at, 2.0 MB hashed in 10 s (200 kB/s)");
    }

    #[test]
    fn scan_is_sorted_recursive_and_skips_state_and_symlinks() {
        let (tmp, dir) = setup();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("q/2")).unwrap();
        std::fs::write(root.join("q/2/b"), b"bb").unwrap();
        std::fs::write(root.join("a"), b"a").unwrap();
        std::fs::write(root.join(".ferry/digests"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let names: Vec<_> = scan(&dir)
            .unwrap()
            .into_iter()
            .map(|m| (m.path.to_string(), m.len_bytes))
            .collect();
        assert_eq!(names, vec![("a".to_string(), 1), ("q/2/b".to_string(), 2)]);
    }

    #[test]
    fn sha1_prefix_matches_the_bytes_and_reports_a_short_file() {
        let (tmp, _dir) = setup();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        std::fs::write(tmp.path().join("f"), &bytes).unwrap();
        let f = File::open(tmp.path().join("f")).unwrap();
        let want: Digest = Sha1::digest(&bytes[..2_500_000]).into();
        assert_eq!(sha1_prefix(&f, 2_500_000).unwrap(), want);
        let e = sha1_prefix(&f, 4_000_000).unwrap_err();
        assert!(e.to_string().contains("short"), "{e}");
    }

    #[test]
    fn the_cache_survives_a_restart_and_rehashes_a_changed_file() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), vec![7u8; 100_000]).unwrap();
        let seg = RelPath::new("seg").unwrap();
        let mut cache = DigestCache::load(&dir);
        let first = cache.digest_path_prefix(&dir, &seg, 60_000).unwrap();
        assert_eq!(cache.hashed_bytes(), 60_000);
        cache.save(&dir).unwrap();

        let mut restarted = DigestCache::load(&dir);
        assert_eq!(
            restarted.digest_path_prefix(&dir, &seg, 60_000).unwrap(),
            first
        );
        assert_eq!(
            restarted.hashed_bytes(),
            0,
            "unchanged data is not rehashed"
        );

        // Same size, other mtime: changed behind ferry's back.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join("seg"))
            .unwrap();
        f.write_all_at(b"X", 0).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12345))
            .unwrap();
        let changed = restarted.digest_path_prefix(&dir, &seg, 60_000).unwrap();
        assert_eq!(restarted.hashed_bytes(), 60_000);
        assert_ne!(changed, first);
    }

    #[test]
    fn a_corrupt_cache_is_ignored() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join(".ferry/digests"), b"garbage\n1 2").unwrap();
        assert!(DigestCache::load(&dir).entries.is_empty());
    }

    #[test]
    fn checksum_lines_are_sha1_two_spaces_path() {
        let (tmp, _dir) = setup();
        std::fs::create_dir_all(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/x"), b"abc").unwrap();
        assert_eq!(
            checksum_dir(tmp.path()).unwrap(),
            vec!["a9993e364706816aba3e25717850c26c9cd0d89d  d/x".to_string()]
        );
    }
}
