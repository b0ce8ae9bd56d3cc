//! inotify on the data dir, turned into replication changes, for `ferry lead` beside an
//! unmodified program that writes with write(2).
//!
//! Every directory under the root is watched (new subdirectories as they appear, their existing
//! content reported at once so nothing created before the watch is missed), except ferry's own
//! `.ferry/` and symlinks, which are never followed. A leader starts from the watcher's own look
//! at every file, taken once the watches are in place (`Watcher::prepare`), so a change made
//! during its start is an event. Events are read in batches, deduplicated per path, and each
//! touched file is stat'ed once and compared with what was last reported:
//!
//! - it grew, and the bytes just before the old end and at the start are unchanged: `Grew`
//!   (an append: only the new range ships);
//! - it shrank, was created or renamed over, its sampled bytes changed, or its mtime changed at
//!   the same size (an in-place overwrite): `Rewritten` (the whole file ships);
//! - same size, new mtime, still after `SETTLE_MAX`: the same (a write(2) sets the mtime before
//!   the size, so an append caught mid-way is given a few ms to show its size);
//! - same size and mtime: nothing. The event was for a write an earlier stat already saw. This
//!   is why mtime is tracked: appends coalesced into one stat must not look like overwrites.
//! - gone: `Removed`.
//!
//! The sampled bytes (up to `SAMPLE_BYTES` at the start and before the end) catch a file that
//! was truncated and rewritten longer between two looks, which sizes alone would take for an
//! append. Limits: mmap writes raise no inotify event at all, so programs that write through a
//! mmap must use the library API (`Leader::append`); an in-place overwrite that keeps the size
//! within the filesystem's mtime granularity of an earlier write, and leaves the sampled bytes
//! alone, can go unseen. On queue overflow the whole tree is rescanned and diffed.
//!
//! A directory that cannot be watched or listed, other than one gone or replaced meanwhile (the
//! inotify watch limit reached, a descriptor limit, a permission), would hide every change
//! under it, and its files would look deleted. So it is an error: at start `Watcher::prepare`
//! fails; later the watcher stops and `Watcher::failure` says why, for its owner to stop
//! serving (`ferry lead` exits, a node steps down). So is the root itself moved away, deleted,
//! unmounted or hidden under a mount (its own events, and `paths::still_at` every
//! `ROOT_CHECK_INTERVAL`): the watches stay on the old directory, and the files written at its
//! path from then on would go unseen.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::index::{mtime_ns, FileMeta, Looked};
use crate::paths::{RelPath, ROOT_CHECK_INTERVAL, STATE_DIR_NAME};

/// Bytes compared at the start and before the old end of a file that grew.
const SAMPLE_BYTES: usize = 64;
const _: () = assert!(
    SAMPLE_BYTES <= u8::MAX as usize,
    "Samples::len counts them in a u8"
);
/// How long a file that looks overwritten in place is watched for an append in flight.
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_millis(10);
/// Bytes read from the inotify fd at once.
const EVENT_BUFFER_BYTES: usize = 64 * 1024;
/// After handling a batch of events the watcher rests this long before it looks again, so
/// that a writer's next appends gather in inotify's queue, where the kernel merges repeated
/// events of one file into one: one stat and one `Grew` for many write(2)s, instead of a
/// wake-up, a stat and two samples read for every few.
const WATCH_BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_micros(200);
const EVENT_HEADER_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file grew: bytes `[from_bytes, to_bytes)` are new and ship as an append. From 0: a
    /// file created in place (a segment), new to the watcher.
    Grew {
        path: RelPath,
        from_bytes: u64,
        to_bytes: u64,
    },
    /// Renamed in or over, created under a second name, found by a scan (its origin unknown),
    /// recreated over a known file, shrunk, truncated or overwritten in place: ship it whole.
    Rewritten { path: RelPath, len_bytes: u64 },
    /// Deleted or moved away.
    Removed { path: RelPath },
    /// Renamed from `from`, a file known at `len_bytes`, to `to` (over any file there), both
    /// in the data dir: one rename (both halves seen, one right after the other), of the file
    /// or of a directory above it. What it did since is reported after this, as a change of
    /// `to`.
    Renamed {
        from: RelPath,
        to: RelPath,
        len_bytes: u64,
    },
}

pub type Sink = Box<dyn FnMut(Change) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    len_bytes: u64,
    mtime_ns: i64,
    /// Inode number: a rename-over gives the path a new one, even at the same size and mtime.
    ino: u64,
    samples: Samples,
}

impl Seen {
    /// A file as `meta`, a stat of it, shows it, with its samples (`read_samples`).
    fn of(meta: &std::fs::Metadata, samples: Samples) -> Seen {
        Seen {
            len_bytes: meta.len(),
            mtime_ns: mtime_ns(meta),
            ino: meta.ino(),
            samples,
        }
    }
}

/// A file's first `SAMPLE_BYTES` and the `SAMPLE_BYTES` before a length (fewer when it is
/// shorter): whether it grew by an append or was rewritten. Kept inline, not on the heap: a
/// watcher holds one for every file of the data dir. None read (a file that cannot be opened,
/// or shorter than the length by the time it was read) is the default, all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Samples {
    /// How many bytes of each are read; the rest stays zero.
    len: u8,
    head: [u8; SAMPLE_BYTES],
    tail: [u8; SAMPLE_BYTES],
}

impl Default for Samples {
    fn default() -> Samples {
        Samples {
            len: 0,
            head: [0; SAMPLE_BYTES],
            tail: [0; SAMPLE_BYTES],
        }
    }
}

pub struct Watcher {
    stop: OwnedFd,
    /// Set before signalling `stop`: rescan the whole tree once more before exiting.
    rescan_on_stop: Arc<AtomicBool>,
    flusher: Flusher,
    /// Ends with what was last reported of each file.
    thread: Option<JoinHandle<HashMap<RelPath, Seen>>>,
    /// Why the watcher's thread stopped on its own, once it has.
    failure: Arc<Mutex<Option<String>>>,
    /// The root's device and inode as the watcher started: what its path must still name.
    root_id: (u64, u64),
}

/// A watcher stopped by `Watcher::flush_and_stop`: why a change may have gone unreported, if
/// one may have, and what it reported of each file, from which `Watcher::resume` takes up.
pub struct Stopped {
    root_id: (u64, u64),
    /// `None` when its thread ended without it (a panic).
    reported: Option<HashMap<RelPath, Seen>>,
    failure: Option<String>,
}

impl Stopped {
    /// Why a change made before the stop may have gone unreported (the watcher had stopped on
    /// its own, or its last look failed), if one may have.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

/// A non-blocking eventfd, which the watcher's thread polls to be stopped or asked to flush.
fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(efd) })
}

/// Makes `eventfd` readable (adds 1 to its counter).
fn wake(eventfd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 into an eventfd we own.
    unsafe {
        libc::write(eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Asks a running watcher to report every change made up to now (`Watcher::flusher`): what a
/// checkpoint of the leader's record needs before it takes the catalog.
#[derive(Clone)]
pub struct Flusher {
    /// An eventfd the watcher's thread polls.
    wake: Arc<OwnedFd>,
    asks: Arc<(Mutex<FlushAsks>, Condvar)>,
}

#[derive(Default)]
struct FlushAsks {
    /// Flushes asked for so far, and answered.
    asked: u64,
    done: u64,
    /// The watcher's thread has exited: nothing more is reported.
    gone: bool,
}

impl Flusher {
    fn new() -> io::Result<Flusher> {
        let wake = Arc::new(new_eventfd()?);
        let asks = Arc::new((Mutex::new(FlushAsks::default()), Condvar::new()));
        Ok(Flusher { wake, asks })
    }

    /// Has the watcher report every change made before this call (the events inotify has
    /// queued; after an overflow, a rescan of the tree) and returns true once it has; false if
    /// the watcher has stopped or `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, answered) = &*self.asks;
        let mut asks = lock.lock().unwrap_or_else(|p| p.into_inner());
        if asks.gone {
            return false;
        }
        asks.asked += 1;
        let ticket = asks.asked;
        wake(&self.wake);
        while asks.done < ticket && !asks.gone {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            asks = match answered.wait_timeout(asks, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        asks.done >= ticket
    }

    /// The flushes asked for so far, once the wake-up is taken off the eventfd.
    fn take_asked(&self) -> u64 {
        let mut counter: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe {
            libc::read(self.wake.as_raw_fd(), (&mut counter as *mut u64).cast(), 8);
        }
        let (lock, _) = &*self.asks;
        lock.lock().unwrap_or_else(|p| p.into_inner()).asked
    }

    /// Every flush up to `asked` is done (or, `gone`, none ever will be).
    fn answer(&self, asked: u64, gone: bool) {
        let (lock, answered) = &*self.asks;
        let mut asks = lock.lock().unwrap_or_else(|p| p.into_inner());
        asks.done = asks.done.max(asked);
        asks.gone |= gone;
        answered.notify_all();
    }
}

struct State {
    root: PathBuf,
    /// The root's device and inode as the watcher started: what its path must still name.
    root_id: (u64, u64),
    inotify: OwnedFd,
    dirs: HashMap<i32, String>,
    files: HashMap<RelPath, Seen>,
    sink: Sink,
}

impl State {
    /// The state of a watcher of `root` (device and inode `root_id`) that watches nothing yet,
    /// `files` what was reported of each file so far.
    fn new(
        root: &Path,
        root_id: (u64, u64),
        files: HashMap<RelPath, Seen>,
        sink: Sink,
    ) -> io::Result<State> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EMFILE) {
                let why = format!(
                    "{e}: the inotify instance limit (sysctl fs.inotify.max_user_instances, \
                     counted over every process of this user) or this process's descriptor \
                     limit is reached"
                );
                return Err(io::Error::new(e.kind(), why));
            }
            return Err(e);
        }
        // SAFETY: inotify_init1 returned a new fd owned by nobody else.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(State {
            root: root.to_path_buf(),
            root_id,
            inotify,
            dirs: HashMap::new(),
            files,
            sink,
        })
    }
}

/// Whether `e` says the path is gone or no longer a directory: a change its own events report.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// `path` under `root` as it is now (its stat, and what the watcher keeps of it with its
/// samples): `None` when it is no longer a file. One open, one fstat, the samples read, one
/// close: a look at every file is what a leader's start costs per file. A file that cannot be
/// opened (its mode) is stat'ed instead and has no samples, as `samples` gives it none.
fn look(root: &Path, path: &RelPath) -> io::Result<Option<(std::fs::Metadata, Seen)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = root.join(path.as_str());
    let cannot_look = |e: io::Error| {
        let why = format!("cannot look at {}: {e}", name.display());
        io::Error::new(e.kind(), why)
    };
    // O_NOFOLLOW: a symlink put in its place is not a file (ELOOP); O_NONBLOCK: nor does
    // a FIFO put there hold the open up. O_NOATIME where allowed (`paths::open_noatime`).
    let opened = crate::paths::open_noatime(|noatime| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | noatime)
            .open(&name)
    });
    let (meta, file) = match opened {
        Ok(file) => (file.metadata().map_err(cannot_look)?, Some(file)),
        Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(_) => match std::fs::symlink_metadata(&name) {
            Ok(meta) => (meta, None),
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(cannot_look(e)),
        },
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let samples = file
        .and_then(|f| read_samples(&f, meta.len()))
        .unwrap_or_default();
    let seen = Seen::of(&meta, samples);
    Ok(Some((meta, seen)))
}

/// The first `SAMPLE_BYTES` of `file` and those before `len_bytes` (fewer when it is
/// shorter): `None` when they cannot be read (it is shorter than `len_bytes` now).
fn read_samples(file: &File, len_bytes: u64) -> Option<Samples> {
    let n = len_bytes.min(SAMPLE_BYTES as u64) as usize;
    let mut samples = Samples {
        len: n as u8,
        ..Samples::default()
    };
    file.read_exact_at(&mut samples.head[..n], 0).ok()?;
    file.read_exact_at(&mut samples.tail[..n], len_bytes - n as u64)
        .ok()?;
    Some(samples)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// A watcher whose watches are in place and which has looked at every file under its root,
/// not reporting yet (`Watcher::prepare`): its owner starts serving `files`, then `start`s it.
pub struct Prepared {
    state: State,
    /// What the look found, sorted by path.
    files: Vec<FileMeta>,
    /// When the look began (`index::now_ns`).
    began_ns: i64,
}

impl Watcher {
    /// Watches every directory under `root`, then looks at every file in them: what a leader
    /// starts from (`Prepared::files`), one look at each file, the watcher's own. Every change
    /// made from the watches on is reported once the watcher is started.
    pub fn prepare(root: &Path) -> io::Result<Prepared> {
        let root_meta = std::fs::metadata(root)?;
        let root_id = (root_meta.dev(), root_meta.ino());
        // Nothing is reported before `start`, which gives the sink.
        let mut state = State::new(root, root_id, HashMap::new(), Box::new(|_| {}))?;
        let found = state.add_tree("")?;
        let began_ns = crate::index::now_ns();
        let mut files = Vec::with_capacity(found.len());
        state.files.reserve(found.len());
        let looks = crate::index::look_each(&found, |path| look(root, path));
        for (path, look) in found.into_iter().zip(looks) {
            if let Some((meta, seen)) = look? {
                files.push(FileMeta::of(path.clone(), &meta));
                state.files.insert(path, seen);
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Prepared {
            state,
            files,
            began_ns,
        })
    }

    /// Watches `root` again after `stopped`, its watcher until then (a handoff that failed
    /// after its final drain stopped the watcher): reports to `sink` at once how each file
    /// differs from what that watcher reported (a stat of each, compared as after an event),
    /// then every change from the watches on. An error when the root is no longer the
    /// directory `stopped` watched, or `stopped` has no account of what it reported.
    pub fn resume(root: &Path, stopped: Stopped, sink: Sink) -> io::Result<Watcher> {
        let Some(reported) = stopped.reported else {
            return Err(io::Error::other(format!(
                "the watcher of {} ended without saying what it had reported",
                root.display()
            )));
        };
        crate::paths::still_at(root, stopped.root_id)?;
        let mut state = State::new(root, stopped.root_id, reported, sink)?;
        state.rescan()?;
        Watcher::spawn(state)
    }

    /// Why the watcher stopped on its own (a directory it could not watch or list, its inotify
    /// fd failing), once it has: from then on it reports nothing, and its owner must stop
    /// serving the data dir as if it were whole.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A handle that has this watcher report every change made up to now, from any thread.
    pub fn flusher(&self) -> Flusher {
        self.flusher.clone()
    }

    /// Stops watching and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Reports every change made up to now, then stops: the thread handles the events already
    /// queued and compares the whole tree once more with what it reported. For a final drain,
    /// once the writer has stopped. `Stopped::failure` says when it could not (it had stopped
    /// on its own, or that last look failed): some change may be unreported.
    pub fn flush_and_stop(mut self) -> Stopped {
        self.rescan_on_stop.store(true, Ordering::SeqCst);
        let reported = self.shutdown();
        let failure = self.failure().or_else(|| {
            reported.is_none().then(|| {
                "the watcher's thread panicked, so a change may have gone unreported".to_string()
            })
        });
        Stopped {
            root_id: self.root_id,
            reported,
            failure,
        }
    }

    /// Stops the thread; what it last reported of each file, if it ended without a panic.
    fn shutdown(&mut self) -> Option<HashMap<RelPath, Seen>> {
        wake(&self.stop);
        self.thread.take()?.join().ok()
    }
}

impl Prepared {
    /// Every file found under the root, sorted by path, as the watcher looked at it, and when
    /// it began looking.
    pub fn looked(&self) -> Looked<'_> {
        Looked {
            files: &self.files,
            began_ns: self.began_ns,
        }
    }

    /// Starts reporting to `sink`: every change made since the look at each file.
    pub fn start(mut self, sink: Sink) -> io::Result<Watcher> {
        self.state.sink = sink;
        Watcher::spawn(self.state)
    }
}

impl Watcher {
    /// Starts a watcher's thread, which reports what `state`'s watches see.
    fn spawn(mut state: State) -> io::Result<Watcher> {
        let stop = new_eventfd()?;
        let stop_fd = stop.as_raw_fd();
        let root_id = state.root_id;
        let rescan_on_stop = Arc::new(AtomicBool::new(false));
        let rescan = rescan_on_stop.clone();
        let flusher = Flusher::new()?;
        let flushes = flusher.clone();
        let failure = Arc::new(Mutex::new(None));
        let failed = failure.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-watch".into())
            .spawn(move || {
                if let Err(e) = state.run(stop_fd, &rescan, &flushes) {
                    let why = format!(
                        "the watcher of {} stopped, so changes from then on go unseen: {e}",
                        state.root.display()
                    );
                    tracing::error!("{why}");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                }
                flushes.answer(0, true);
                state.files
            })?;
        Ok(Watcher {
            stop,
            rescan_on_stop,
            flusher,
            thread: Some(thread),
            failure,
            root_id,
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What one batch of events said about a file.
#[derive(Default, Clone, Copy)]
struct Touched {
    recreated: bool,
    /// The last event that gave the name a file was IN_CREATE: created in place (not renamed
    /// in, not found by a scan of a new directory).
    in_place: bool,
}

impl State {
    fn emit(&mut self, change: Change) {
        tracing::debug!("watch: {change:?}");
        (self.sink)(change);
    }

    fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn samples(&self, path: &RelPath, len_bytes: u64) -> Samples {
        use std::os::unix::fs::OpenOptionsExt;
        let name = self.abs(path.as_str());
        crate::paths::open_noatime(|noatime| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(noatime)
                .open(&name)
        })
        .ok()
        .and_then(|file| read_samples(&file, len_bytes))
        .unwrap_or_default()
    }

    fn add_watch(&mut self, rel: &str) -> io::Result<()> {
        let c = std::ffi::CString::new(self.abs(rel).into_os_string().into_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        let mask = libc::IN_MODIFY
            | libc::IN_CLOSE_WRITE
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR
            | libc::IN_DONT_FOLLOW
            | libc::IN_EXCL_UNLINK;
        // SAFETY: a valid inotify fd and a NUL-terminated path alive for the call.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.to_string());
        Ok(())
    }

    /// Why `dir` cannot be watched, for an operator: `e` from inotify_add_watch.
    fn cannot_watch(&self, dir: &str, e: io::Error) -> io::Error {
        let name = self.abs(dir);
        if e.raw_os_error() != Some(libc::ENOSPC) {
            return io::Error::new(e.kind(), format!("cannot watch {}: {e}", name.display()));
        }
        // The limit of this user namespace (in the initial one, fs.inotify.max_user_watches).
        let limit = std::fs::read_to_string("/proc/sys/user/max_inotify_watches")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let limit = limit.map_or_else(|| "unknown".to_string(), |n| n.to_string());
        io::Error::new(
            e.kind(),
            format!(
                "cannot watch {}: the inotify watch limit is reached (max_user_watches is \
                 {limit}, counted over every process of this user; ferry watches each directory \
                 of the data dir and held {} watches): raise it, e.g. \
                 `sysctl fs.inotify.max_user_watches=N` with N above the number of directories",
                name.display(),
                self.dirs.len()
            ),
        )
    }

    /// Watches `rel` and every directory under it; returns the files found beneath it. A
    /// directory gone or replaced by a non-directory meanwhile is left out (its own events say
    /// so); any other that cannot be watched or listed is an error, since every change under
    /// it would go unseen and its files would look deleted.
    fn add_tree(&mut self, rel: &str) -> io::Result<Vec<RelPath>> {
        let mut files = Vec::new();
        let mut stack = vec![rel.to_string()];
        while let Some(dir) = stack.pop() {
            match self.add_watch(&dir) {
                Ok(()) => {}
                Err(e) if !dir.is_empty() && is_gone(&e) => {
                    tracing::debug!("not watching {dir:?}: {e}");
                    continue;
                }
                Err(e) => return Err(self.cannot_watch(&dir, e)),
            }
            let name = self.abs(&dir);
            let cannot_list = |e| crate::paths::cannot_list(&name, e);
            let entries = match std::fs::read_dir(&name) {
                Ok(entries) => entries,
                Err(e) if !dir.is_empty() && is_gone(&e) => continue,
                Err(e) => return Err(cannot_list(e)),
            };
            for entry in entries {
                let entry = entry.map_err(cannot_list)?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    tracing::warn!("skipping {:?}: the name is not UTF-8", entry.path());
                    continue;
                };
                if dir.is_empty() && name == STATE_DIR_NAME {
                    continue;
                }
                let child = join(&dir, &name);
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(child),
                    Ok(t) if t.is_file() => match RelPath::new(&child) {
                        Ok(p) => files.push(p),
                        // As a scan does (`index::scan`): never replicated, so said.
                        Err(e) => tracing::warn!("skipping {child:?}: {e}"),
                    },
                    Ok(_) => {}
                    Err(e) if is_gone(&e) => {}
                    Err(e) => return Err(cannot_list(e)),
                }
            }
        }
        Ok(files)
    }

    /// `path` is no longer a file: reported removed if it was known.
    fn removed(&mut self, path: &RelPath) {
        if self.files.remove(path).is_some() {
            self.emit(Change::Removed { path: path.clone() });
        }
    }

    /// Stats `path` and reports how it differs from what was last seen.
    fn check(&mut self, path: &RelPath, touched: Touched) -> io::Result<()> {
        let stat = std::fs::symlink_metadata(self.abs(path.as_str()));
        self.check_stat(path, touched, stat)
    }

    /// `check`, with the stat of `path` taken.
    fn check_stat(
        &mut self,
        path: &RelPath,
        touched: Touched,
        stat: io::Result<std::fs::Metadata>,
    ) -> io::Result<()> {
        let meta = match stat {
            Ok(m) if m.is_file() => Some(m),
            // Not a file any more, or gone: removed. A stat that fails for another reason says
            // nothing of the file, which followers would delete if it were taken for removed.
            Ok(_) => None,
            Err(e) if is_gone(&e) => None,
            Err(e) => {
                let name = self.abs(path.as_str());
                let why = format!("cannot look at {}: {e}", name.display());
                return Err(io::Error::new(e.kind(), why));
            }
        };
        let Some(mut meta) = meta else {
            // Gone with its directory, which is no longer at its path either: that directory's
            // own event, still to come, says whether the file was deleted (removed then) or
            // moved with it (`moved`), which a removal here would make a new file to ship.
            let parent_gone = path.parent().is_some_and(|parent| {
                std::fs::symlink_metadata(self.abs(parent)).is_err_and(|e| is_gone(&e))
            });
            if !parent_gone {
                self.removed(path);
            }
            return Ok(());
        };
        let old = self.files.get(path).copied();
        if let Some(old) = &old {
            let same_file = !touched.recreated || old.ino == meta.ino();
            if same_file && meta.len() == old.len_bytes && mtime_ns(&meta) != old.mtime_ns {
                meta = self.settle(path, meta);
            }
        }
        let (len_bytes, mtime) = (meta.len(), mtime_ns(&meta));
        let change = match old {
            // Created in place, under its only name: it grew from nothing, as a segment does (a
            // file with a second name appeared whole, as one renamed in did).
            None if touched.in_place && meta.nlink() == 1 => Some(Change::Grew {
                path: path.clone(),
                from_bytes: 0,
                to_bytes: len_bytes,
            }),
            None => Some(Change::Rewritten {
                path: path.clone(),
                len_bytes,
            }),
            // Created or renamed over: a new inode. The same inode is the file already known
            // (seen by a directory scan before its own, now stale, create event arrived), and is
            // compared like any other event.
            Some(old) if touched.recreated && old.ino != meta.ino() => Some(Change::Rewritten {
                path: path.clone(),
                len_bytes,
            }),
            Some(old) if len_bytes > old.len_bytes => {
                if self.samples(path, old.len_bytes) == old.samples {
                    Some(Change::Grew {
                        path: path.clone(),
                        from_bytes: old.len_bytes,
                        to_bytes: len_bytes,
                    })
                } else {
                    Some(Change::Rewritten {
                        path: path.clone(),
                        len_bytes,
                    })
                }
            }
            Some(old) if len_bytes < old.len_bytes || mtime != old.mtime_ns => {
                Some(Change::Rewritten {
                    path: path.clone(),
                    len_bytes,
                })
            }
            Some(_) => None,
        };
        if let Some(change) = change {
            let samples = self.samples(path, len_bytes);
            self.files.insert(path.clone(), Seen::of(&meta, samples));
            self.emit(change);
        }
        Ok(())
    }

    /// A write(2) sets the mtime before the new size, so a stat in the middle of an append sees
    /// "same size, new mtime", which reads as an in-place overwrite. Re-stat for a few ms: an
    /// append in flight shows its new size by then.
    fn settle(&self, path: &RelPath, meta: std::fs::Metadata) -> std::fs::Metadata {
        let deadline = std::time::Instant::now() + SETTLE_MAX;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
            match std::fs::symlink_metadata(self.abs(path.as_str())) {
                Ok(m) if m.is_file() && m.len() != meta.len() => return m,
                Ok(_) => {}
                Err(_) => return meta,
            }
        }
        meta
    }

    /// Walks the whole tree (re-adding watches) and reports every difference; nothing when a
    /// directory cannot be watched or listed (the error), rather than its files as deleted.
    fn rescan(&mut self) -> io::Result<()> {
        let found = self.add_tree("")?;
        // A file known and not found is gone, reported before what was found (a file replaced
        // by a directory of the same name goes before the files in it come). Mostly none is:
        // every known file was found, and no set of the found is needed to tell.
        let known_found = found.iter().filter(|p| self.files.contains_key(*p)).count();
        if known_found < self.files.len() {
            let present: HashSet<&RelPath> = found.iter().collect();
            let gone: Vec<RelPath> = self
                .files
                .keys()
                .filter(|p| !present.contains(p))
                .cloned()
                .collect();
            for path in gone {
                self.files.remove(&path);
                self.emit(Change::Removed { path });
            }
        }
        // The stats first, on several threads when there are many (`index::look_each`): at a
        // stop, and after an overflow, the tree may be the whole data dir.
        let root = self.root.clone();
        let stats = crate::index::look_each(&found, |path| {
            std::fs::symlink_metadata(root.join(path.as_str()))
        });
        for (path, stat) in found.iter().zip(stats) {
            self.check_stat(path, Touched::default(), stat)?;
        }
        Ok(())
    }

    /// Handles events until stopped (`Ok`), or until it cannot go on seeing every change (the
    /// error: it reports nothing more).
    fn run(
        &mut self,
        stop_fd: i32,
        rescan_on_stop: &AtomicBool,
        flusher: &Flusher,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; EVENT_BUFFER_BYTES];
        let mut root_checked = Instant::now();
        loop {
            if root_checked.elapsed() >= ROOT_CHECK_INTERVAL {
                crate::paths::still_at(&self.root, self.root_id)?;
                root_checked = Instant::now();
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.inotify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: flusher.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout_ms = ROOT_CHECK_INTERVAL.as_millis() as libc::c_int;
            // SAFETY: `fds` is a valid array of three pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("inotify poll failed: {e}"),
                ));
            }
            if fds[1].revents != 0 {
                if rescan_on_stop.load(Ordering::SeqCst) {
                    self.rescan()?;
                }
                return Ok(());
            }
            // Every flush asked for before this: its changes are in inotify's queue by now
            // (an event is queued before the write(2) returns), which is read to its end here.
            let flushed = (fds[2].revents != 0).then(|| flusher.take_asked());
            let mut events = Vec::new();
            loop {
                // SAFETY: reads into our buffer, at most its length.
                let n = unsafe {
                    libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n <= 0 {
                    break;
                }
                parse_events(&buf[..n as usize], &mut events);
            }
            if !events.is_empty() {
                self.handle(events)?;
                if flushed.is_none() {
                    std::thread::sleep(WATCH_BATCH_INTERVAL);
                }
            }
            if let Some(asked) = flushed {
                flusher.answer(asked, false);
            }
        }
    }

    fn handle(&mut self, events: Vec<Event>) -> io::Result<()> {
        let mut order: Vec<RelPath> = Vec::new();
        let mut touched: HashMap<RelPath, Touched> = HashMap::new();
        let mut overflow = false;
        let mut events = events.into_iter().peekable();
        while let Some(Event {
            wd,
            mask,
            cookie,
            name,
        }) = events.next()
        {
            if mask & libc::IN_Q_OVERFLOW != 0 {
                overflow = true;
                continue;
            }
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&wd);
                continue;
            }
            if mask & libc::IN_UNMOUNT != 0 {
                return Err(io::Error::other(format!(
                    "the filesystem of {} was unmounted",
                    self.root.display()
                )));
            }
            let Some(dir) = self.dirs.get(&wd).cloned() else {
                continue;
            };
            if name.is_empty() {
                if dir.is_empty() && mask & (libc::IN_MOVE_SELF | libc::IN_DELETE_SELF) != 0 {
                    let what = if mask & libc::IN_MOVE_SELF != 0 {
                        "moved away (renamed)"
                    } else {
                        "deleted"
                    };
                    return Err(io::Error::other(format!(
                        "{} was {what} while served: a directory at that path now is not the \
                         one served; start ferry on it again",
                        self.root.display()
                    )));
                }
                continue; // another event on a directory itself
            }
            if dir.is_empty() && name == STATE_DIR_NAME {
                continue;
            }
            let rel = join(&dir, &name);
            if mask & libc::IN_MOVED_FROM != 0 {
                // The other half of the rename, when it is the next event (as it mostly is:
                // inotify queues the two one after the other). Otherwise the rename is what it
                // was before: a removal here, and a new file or directory there.
                let to = events.peek().and_then(|next| {
                    let moved_here = next.mask & libc::IN_MOVED_TO != 0 && next.cookie == cookie;
                    let to_dir = self.dirs.get(&next.wd).filter(|_| moved_here)?;
                    let state_dir = to_dir.is_empty() && next.name == STATE_DIR_NAME;
                    (!state_dir && !next.name.is_empty()).then(|| join(to_dir, &next.name))
                });
                if let Some(to) = to {
                    self.moved(&rel, &to, mask & libc::IN_ISDIR != 0);
                }
            }
            if mask & libc::IN_ISDIR != 0 {
                if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                    self.forget_dir(&rel);
                }
                if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                    for f in self.add_tree(&rel)? {
                        let found = Touched {
                            recreated: true,
                            in_place: false,
                        };
                        if touched.insert(f.clone(), found).is_none() {
                            order.push(f);
                        }
                    }
                }
                continue;
            }
            let path = match RelPath::new(&rel) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("ignoring a change to {rel:?}: {e}");
                    continue;
                }
            };
            let entry = touched.entry(path.clone()).or_insert_with(|| {
                order.push(path.clone());
                Touched::default()
            });
            if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                entry.recreated = true;
                entry.in_place = mask & libc::IN_CREATE != 0;
            }
        }
        if overflow {
            tracing::warn!(
                "inotify queue overflowed: events were dropped; rescanning {}",
                self.root.display()
            );
            return self.rescan();
        }
        for path in order {
            let t = touched.get(&path).copied().unwrap_or_default();
            self.check(&path, t)?;
        }
        Ok(())
    }

    /// `from` (a file, or a directory when `is_dir`) was renamed to `to`, in the data dir: what
    /// was seen of each file moves with it, so that the events that follow compare the file
    /// with itself, and each file known is reported `Renamed`. A file whose new path is not one
    /// ferry replicates stays where it was seen, and is reported removed, as before.
    fn moved(&mut self, from: &str, to: &str, is_dir: bool) {
        let mut pairs: Vec<(RelPath, RelPath)> = Vec::new();
        if is_dir {
            let prefix = format!("{from}/");
            let mut under: Vec<&RelPath> = (self.files.keys())
                .filter(|p| p.as_str().starts_with(&prefix))
                .collect();
            under.sort();
            for old in under {
                if let Ok(new) = RelPath::new(&format!("{to}/{}", &old.as_str()[prefix.len()..])) {
                    pairs.push((old.clone(), new));
                }
            }
        } else if let (Ok(old), Ok(new)) = (RelPath::new(from), RelPath::new(to)) {
            if self.files.contains_key(&old) {
                pairs.push((old, new));
            }
        }
        for (old, new) in pairs {
            if let Some(seen) = self.files.remove(&old) {
                self.files.insert(new.clone(), seen);
                self.emit(Change::Renamed {
                    from: old,
                    to: new,
                    len_bytes: seen.len_bytes,
                });
            }
        }
    }

    /// A directory was deleted or moved away: every file known under it is gone.
    fn forget_dir(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let gone: Vec<RelPath> = self
            .files
            .keys()
            .filter(|p| p.as_str().starts_with(&prefix))
            .cloned()
            .collect();
        for path in gone {
            self.files.remove(&path);
            self.emit(Change::Removed { path });
        }
        let wds: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, d)| *d == rel || d.starts_with(&prefix))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            self.dirs.remove(&wd);
            // SAFETY: removing a watch descriptor from our own inotify fd; failure is harmless.
            unsafe {
                libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd);
            }
        }
    }
}

/// One inotify event: the watch it came on, its mask, the cookie that pairs the two halves of a
/// rename, and the name in the watched directory (empty for the directory itself).
struct Event {
    wd: i32,
    mask: u32,
    cookie: u32,
    name: String,
}

/// Parses `struct inotify_event` records: wd i32, mask u32, cookie u32, len u32, name[len].
fn parse_events(mut buf: &[u8], out: &mut Vec<Event>) {
    while buf.len() >= EVENT_HEADER_BYTES {
        let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let cookie = u32::from_ne_bytes(word(8));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name_bytes) = buf.get(EVENT_HEADER_BYTES..EVENT_HEADER_BYTES + len) else {
            return;
        };
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        match std::str::from_utf8(&name_bytes[..end]) {
            Ok(name) => out.push(Event {
                wd,
                mask,
                cookie,
                name: name.to_string(),
            }),
            Err(_) => tracing::warn!("ignoring an event for a name that is not UTF-8"),
        }
        buf = &buf[EVENT_HEADER_BYTES + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::{channel, Receiver};
    use std::time::Duration;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A watcher of `root` started as a leader's is: its look, then its changes from the look on.
    fn watch(root: &Path) -> (Watcher, Receiver<Change>) {
        let (sink, rx) = to_channel();
        (Watcher::prepare(root).unwrap().start(sink).unwrap(), rx)
    }

    /// A sink that sends each change to the receiver.
    fn to_channel() -> (Sink, Receiver<Change>) {
        let (tx, rx) = channel();
        let sink: Sink = Box::new(move |c| {
            let _ = tx.send(c);
        });
        (sink, rx)
    }

    /// `LOOK_PARALLEL_MIN_FILES` files and 7 more, so that they are looked at on several
    /// threads, in three directories, file `i` of `1 + i % 300` bytes `byte(i)`: their names,
    /// `i` at `i`.
    fn many_files(root: &Path, byte: impl Fn(usize) -> u8) -> Vec<String> {
        let names: Vec<String> = (0..crate::index::LOOK_PARALLEL_MIN_FILES + 7)
            .map(|i| format!("q{}/s.{i:05}", i % 3))
            .collect();
        for q in 0..3 {
            std::fs::create_dir(root.join(format!("q{q}"))).unwrap();
        }
        for (i, name) in names.iter().enumerate() {
            std::fs::write(root.join(name), vec![byte(i); 1 + i % 300]).unwrap();
        }
        names
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    fn next(rx: &Receiver<Change>) -> Change {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("no change within 5 s")
    }

    /// The length a change leaves the file at (None for a removal).
    fn len_after(c: &Change) -> Option<u64> {
        match c {
            Change::Grew { to_bytes, .. } => Some(*to_bytes),
            Change::Rewritten { len_bytes, .. } | Change::Renamed { len_bytes, .. } => {
                Some(*len_bytes)
            }
            Change::Removed { .. } => None,
        }
    }

    /// Changes for `path` until one leaves it at `len_bytes`. A file written right after its
    /// creation may first be seen empty: `Grew { 0, 0 }` then `Grew { 0, n }` is as good as
    /// `Grew { 0, n }`. Asserts the sequence starts with `Grew` from 0 (a file created in place)
    /// or, if `found_by_scan` (a new directory's files may be), `Rewritten`, and grows
    /// contiguously.
    fn created(rx: &Receiver<Change>, path: &str, len_bytes: u64, found_by_scan: bool) {
        let first = next(rx);
        assert!(
            match &first {
                Change::Grew {
                    path: q,
                    from_bytes: 0,
                    ..
                } => q.as_str() == path,
                Change::Rewritten { path: q, .. } => found_by_scan && q.as_str() == path,
                Change::Grew { .. } | Change::Removed { .. } | Change::Renamed { .. } => false,
            },
            "{first:?}"
        );
        let mut at = len_after(&first).unwrap();
        while at != len_bytes {
            match next(rx) {
                Change::Grew {
                    path: q,
                    from_bytes,
                    to_bytes,
                } if q.as_str() == path && from_bytes == at => at = to_bytes,
                other => panic!("after {first:?}, {other:?}"),
            }
        }
    }

    /// A writer's rapid appends to one file come out as a few contiguous `Grew`s, not one per
    /// wake-up: the watcher rests WATCH_BATCH_INTERVAL after each batch, and inotify merges
    /// the repeated events meanwhile.
    #[test]
    fn rapid_appends_are_reported_in_few_contiguous_growths() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("seg"), b"").unwrap();
        let (w, rx) = watch(tmp.path());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join("seg"))
            .unwrap();
        const WRITES: u64 = 2000;
        const WRITE_BYTES: u64 = 64;
        let started = std::time::Instant::now();
        for _ in 0..WRITES {
            file.write_all(&[7u8; WRITE_BYTES as usize]).unwrap();
        }
        let elapsed = started.elapsed();
        let mut at = 0;
        let mut growths = 0u128;
        while at != WRITES * WRITE_BYTES {
            match next(&rx) {
                Change::Grew {
                    from_bytes,
                    to_bytes,
                    ..
                } if from_bytes == at => {
                    at = to_bytes;
                    growths += 1;
                }
                other => panic!("at {at}: {other:?}"),
            }
        }
        // One batch per interval while the writer wrote, and the last one after it.
        let batches_max = elapsed.as_micros() / WATCH_BATCH_INTERVAL.as_micros() + 3;
        assert!(
            growths <= batches_max,
            "{growths} growths for {WRITES} writes in {elapsed:?} (at most {batches_max})"
        );
        w.stop();
    }

    #[test]
    fn an_append_is_reported_as_growth_with_exact_offsets() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("seg"), b"12345").unwrap();
        let (w, rx) = watch(tmp.path());
        append(&tmp.path().join("seg"), b"678");
        assert_eq!(
            next(&rx),
            Change::Grew {
                path: p("seg"),
                from_bytes: 5,
                to_bytes: 8
            }
        );
        w.stop();
    }

    #[test]
    fn flush_and_stop_reports_a_write_made_just_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("seg"), b"12345").unwrap();
        let (w, rx) = watch(tmp.path());
        append(&tmp.path().join("seg"), b"678");
        std::fs::write(tmp.path().join("new.json"), b"{}").unwrap();
        // No waiting: the events may still sit in inotify's queue or in the settle window.
        assert_eq!(w.flush_and_stop().failure(), None);
        let got: Vec<Change> = rx.try_iter().collect();
        assert!(
            got.iter()
                .any(|c| matches!(c, Change::Grew { to_bytes: 8, .. })),
            "{got:?}"
        );
        // Seen by its event (created in place) or by the scan at the stop (found, origin
        // unknown).
        assert!(
            got.iter().any(
                |c| matches!(c, Change::Grew { path, .. } | Change::Rewritten { path, .. }
                if path.as_str() == "new.json" && len_after(c) == Some(2))
            ),
            "{got:?}"
        );
    }

    #[test]
    fn a_flush_reports_what_was_written_before_it_and_the_watcher_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("seg"), b"12345").unwrap();
        let (w, rx) = watch(tmp.path());
        let flusher = w.flusher();
        let timeout = std::time::Duration::from_secs(10);
        for (round, more) in [b"678", b"9ab"].iter().enumerate() {
            append(&tmp.path().join("seg"), *more);
            std::fs::write(tmp.path().join(format!("new{round}.json")), b"{}").unwrap();
            // No waiting but the flush's own: the events may still be in inotify's queue.
            assert!(flusher.flush(timeout));
            let got: Vec<Change> = rx.try_iter().collect();
            let to = 8 + 3 * round as u64;
            assert!(
                got.iter()
                    .any(|c| matches!(c, Change::Grew { to_bytes, .. } if *to_bytes == to)),
                "{got:?}"
            );
            assert!(
                got.iter()
                    .any(|c| matches!(c, Change::Grew { path, to_bytes: 2, .. }
                    if path.as_str() == format!("new{round}.json"))),
                "{got:?}"
            );
        }
        w.stop();
        let asked = std::time::Instant::now();
        assert!(!flusher.flush(timeout), "a stopped watcher flushes nothing");
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(1),
            "and says so at once"
        );
    }

    #[test]
    fn a_file_in_a_new_nested_directory_is_seen_then_its_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let (w, rx) = watch(tmp.path());
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/b/c.seg"), b"xy").unwrap();
        created(&rx, "a/b/c.seg", 2, true);
        append(&tmp.path().join("a/b/c.seg"), b"z");
        assert_eq!(
            next(&rx),
            Change::Grew {
                path: p("a/b/c.seg"),
                from_bytes: 2,
                to_bytes: 3
            }
        );
        w.stop();
    }

    /// A file created in place grows from nothing, as a segment does, so its prefix may ship as
    /// appends; one renamed into place, or given a second name, appeared whole and ships whole.
    #[test]
    fn a_file_created_in_place_grows_from_nothing_and_one_renamed_in_is_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir_in(tmp.path().parent().unwrap()).unwrap();
        let (w, rx) = watch(tmp.path());
        std::fs::write(tmp.path().join("seg.1"), b"0123").unwrap();
        created(&rx, "seg.1", 4, false);
        std::fs::write(elsewhere.path().join("meta.json"), b"{\"v\":1}").unwrap();
        std::fs::rename(
            elsewhere.path().join("meta.json"),
            tmp.path().join("meta.json"),
        )
        .unwrap();
        assert_eq!(
            next(&rx),
            Change::Rewritten {
                path: p("meta.json"),
                len_bytes: 7
            }
        );
        std::fs::hard_link(tmp.path().join("seg.1"), tmp.path().join("seg.1.link")).unwrap();
        assert_eq!(
            next(&rx),
            Change::Rewritten {
                path: p("seg.1.link"),
                len_bytes: 4
            }
        );
        w.stop();
    }

    /// Both halves of a rename seen: the file known moves, a directory's files each move, and
    /// what was done to a file since is a change of its new path; a file moved out of the data
    /// dir is removed, one moved in is new.
    #[test]
    fn a_rename_within_the_data_dir_is_reported_as_one_and_its_files_move() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir_in(tmp.path().parent().unwrap()).unwrap();
        std::fs::create_dir_all(tmp.path().join("t-0/sub")).unwrap();
        std::fs::write(tmp.path().join("t-0/00.log"), b"0123456789").unwrap();
        std::fs::write(tmp.path().join("t-0/sub/00.index"), b"abc").unwrap();
        let (w, rx) = watch(tmp.path());
        // A file renamed, then its directory right after (the file's new path gone before the
        // watcher looks at it): each a rename.
        let log = tmp.path().join("t-0/00.log");
        std::fs::rename(&log, tmp.path().join("t-0/00.log.deleted")).unwrap();
        std::fs::rename(tmp.path().join("t-0"), tmp.path().join("t-0.x-delete")).unwrap();
        let mut got = vec![next(&rx), next(&rx), next(&rx)];
        got.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            got,
            [
                Change::Renamed {
                    from: p("t-0/00.log"),
                    to: p("t-0/00.log.deleted"),
                    len_bytes: 10
                },
                Change::Renamed {
                    from: p("t-0/00.log.deleted"),
                    to: p("t-0.x-delete/00.log.deleted"),
                    len_bytes: 10
                },
                Change::Renamed {
                    from: p("t-0/sub/00.index"),
                    to: p("t-0.x-delete/sub/00.index"),
                    len_bytes: 3
                },
            ]
        );
        // The moved directory is watched under its new name.
        append(&tmp.path().join("t-0.x-delete/sub/00.index"), b"de");
        assert_eq!(
            next(&rx),
            Change::Grew {
                path: p("t-0.x-delete/sub/00.index"),
                from_bytes: 3,
                to_bytes: 5
            }
        );
        let log = tmp.path().join("t-0.x-delete/00.log.deleted");
        std::fs::rename(&log, tmp.path().join("00.log.deleted")).unwrap();
        assert_eq!(
            next(&rx),
            Change::Renamed {
                from: p("t-0.x-delete/00.log.deleted"),
                to: p("00.log.deleted"),
                len_bytes: 10
            }
        );
        std::fs::rename(
            tmp.path().join("00.log.deleted"),
            elsewhere.path().join("out"),
        )
        .unwrap();
        assert_eq!(
            next(&rx),
            Change::Removed {
                path: p("00.log.deleted")
            }
        );
        std::fs::rename(elsewhere.path().join("out"), tmp.path().join("back")).unwrap();
        assert_eq!(
            next(&rx),
            Change::Rewritten {
                path: p("back"),
                len_bytes: 10
            }
        );
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        w.stop();
    }

    #[test]
    fn rename_over_truncate_and_delete_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("meta.json"), b"{\"v\":1}").unwrap();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        let (w, rx) = watch(tmp.path());
        std::fs::write(tmp.path().join("meta.tmp"), b"{\"v\":22}").unwrap();
        created(&rx, "meta.tmp", 8, false);
        std::fs::rename(tmp.path().join("meta.tmp"), tmp.path().join("meta.json")).unwrap();
        assert_eq!(
            next(&rx),
            Change::Renamed {
                from: p("meta.tmp"),
                to: p("meta.json"),
                len_bytes: 8
            }
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join("seg"))
            .unwrap()
            .set_len(4)
            .unwrap();
        assert_eq!(
            next(&rx),
            Change::Rewritten {
                path: p("seg"),
                len_bytes: 4
            }
        );
        std::fs::remove_file(tmp.path().join("seg")).unwrap();
        assert_eq!(next(&rx), Change::Removed { path: p("seg") });
        w.stop();
    }

    #[test]
    fn truncate_then_a_longer_rewrite_is_not_taken_for_an_append() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"old content").unwrap();
        let (w, rx) = watch(tmp.path());
        // Truncate and rewrite in one go, as `echo ... > f` does.
        std::fs::write(tmp.path().join("f"), b"brand new, longer content").unwrap();
        let mut got = vec![next(&rx)];
        while let Ok(c) = rx.recv_timeout(Duration::from_millis(300)) {
            got.push(c);
        }
        // Replayed on a copy holding the old content, the changes must give the new one: the
        // old bytes are replaced by a rewrite (the whole file, or the truncation to empty seen
        // on its own), never kept as the prefix of an append.
        let mut len_bytes = 11u64;
        let mut stale = true;
        for c in &got {
            match c {
                Change::Rewritten { len_bytes: n, .. } => (len_bytes, stale) = (*n, false),
                Change::Grew {
                    from_bytes,
                    to_bytes,
                    ..
                } => {
                    assert_eq!(*from_bytes, len_bytes, "{got:?}");
                    len_bytes = *to_bytes;
                }
                Change::Removed { .. } | Change::Renamed { .. } => panic!("{got:?}"),
            }
        }
        assert!(!stale && len_bytes == 25, "{got:?}");
        w.stop();
    }

    #[test]
    fn ferry_state_is_ignored_and_coalesced_appends_are_not_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join(".ferry")).unwrap();
        std::fs::write(tmp.path().join("seg"), b"").unwrap();
        let (w, rx) = watch(tmp.path());
        std::fs::write(tmp.path().join(".ferry/digests"), b"x").unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join("seg"))
            .unwrap();
        for _ in 0..500 {
            f.write_all(b"0123456789").unwrap();
        }
        let mut end = 0;
        while end < 5000 {
            match next(&rx) {
                Change::Grew {
                    path,
                    from_bytes,
                    to_bytes,
                } => {
                    assert_eq!(path, p("seg"), "nothing from .ferry/");
                    assert_eq!(from_bytes, end, "ranges are contiguous");
                    end = to_bytes;
                }
                other => panic!("an append was reported as {other:?}"),
            }
        }
        assert_eq!(end, 5000);
        w.stop();
    }

    /// A leader starts serving what a prepared watcher looked at; started, the watcher reports
    /// every change made since that look (here while the leader would be starting), and
    /// nothing from before it.
    #[test]
    fn a_prepared_watcher_lists_every_file_and_reports_what_changed_after_its_look() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("seg"), b"12345").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/meta.json"), b"{}").unwrap();
        std::fs::create_dir(root.join(STATE_DIR_NAME)).unwrap();
        std::fs::write(root.join(STATE_DIR_NAME).join("lock"), b"").unwrap();
        std::os::unix::fs::symlink("seg", root.join("link")).unwrap();
        let prepared = Watcher::prepare(root).unwrap();
        let as_found = |name: &str| {
            FileMeta::of(
                p(name),
                &std::fs::symlink_metadata(root.join(name)).unwrap(),
            )
        };
        assert_eq!(
            prepared.looked().files,
            [as_found("d/meta.json"), as_found("seg")]
        );
        append(&root.join("seg"), b"678");
        std::fs::write(root.join("new"), b"abc").unwrap();
        let (sink, rx) = to_channel();
        let w = prepared.start(sink).unwrap();
        assert!(w.flusher().flush(Duration::from_secs(10)));
        let got: Vec<Change> = rx.try_iter().collect();
        let grew = Change::Grew {
            path: p("seg"),
            from_bytes: 5,
            to_bytes: 8,
        };
        assert!(got.contains(&grew), "{got:?}");
        assert!(
            got.iter().all(|c| c == &grew
                || (matches!(c, Change::Grew { path, .. } if path.as_str() == "new")
                    && len_after(c) <= Some(3))),
            "{got:?}"
        );
        assert!(got.iter().any(|c| len_after(c) == Some(3)), "{got:?}");
        w.stop();
    }

    /// Past `LOOK_PARALLEL_MIN_FILES` the files are looked at on several threads: each is
    /// listed as it is, and its samples are its own (an append is one, a longer rewrite is not).
    #[test]
    fn a_prepared_watcher_of_many_files_looks_at_each_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let names = many_files(root, |i| (i % 251) as u8);
        let prepared = Watcher::prepare(root).unwrap();
        let files = prepared.looked().files;
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            sorted
        );
        for f in files {
            let m = std::fs::symlink_metadata(root.join(f.path.as_str())).unwrap();
            assert_eq!(
                (f.len_bytes, f.ino),
                (m.len(), m.ino()),
                "{}",
                f.path.as_str()
            );
        }
        let (first, last) = (&names[0], &names[names.len() - 1]);
        let last_len = std::fs::metadata(root.join(last)).unwrap().len();
        append(&root.join(last), b"more");
        std::fs::write(root.join(first), b"another, longer content").unwrap();
        let (sink, rx) = to_channel();
        let w = prepared.start(sink).unwrap();
        assert!(w.flusher().flush(Duration::from_secs(10)));
        let got: Vec<Change> = rx.try_iter().collect();
        assert!(
            got.contains(&Change::Grew {
                path: p(last),
                from_bytes: last_len,
                to_bytes: last_len + 4
            }),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|c| matches!(c, Change::Rewritten { path, len_bytes: 23 }
                if path.as_str() == first)),
            "{got:?}"
        );
        w.stop();
    }

    /// A rescan (at a stop, after an overflow) of a tree past `LOOK_PARALLEL_MIN_FILES`, whose
    /// stats are taken on several threads, reports exactly where the files differ from what was
    /// seen of them.
    #[test]
    fn a_rescan_of_many_files_reports_what_differs_from_what_was_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let names = many_files(root, |_| 7);
        let mut prepared = Watcher::prepare(root).unwrap();
        let (sink, rx) = to_channel();
        prepared.state.sink = sink;
        let (first, last) = (p(&names[0]), p(&names[names.len() - 1]));
        // What the watcher saw, made to differ from the files: one never seen, one seen with
        // another mtime (overwritten in place, as through a mmap), one seen and gone since.
        let files = &mut prepared.state.files;
        files.remove(&first);
        let seen_last = files.get_mut(&last).unwrap();
        seen_last.mtime_ns -= 1;
        let gone = *seen_last;
        files.insert(p("q0/gone"), gone);
        prepared.state.rescan().unwrap();
        let mut got: Vec<Change> = rx.try_iter().collect();
        got.sort_by_key(|c| format!("{c:?}"));
        let len_bytes = |path: &RelPath| std::fs::metadata(root.join(path.as_str())).unwrap().len();
        assert_eq!(
            got,
            vec![
                Change::Removed { path: p("q0/gone") },
                Change::Rewritten {
                    path: first.clone(),
                    len_bytes: len_bytes(&first)
                },
                Change::Rewritten {
                    path: last.clone(),
                    len_bytes: len_bytes(&last)
                },
            ]
        );
    }

    /// Sets the mtime of `path` a second past what it was: a rewrite the watcher must tell from
    /// the write before it, whatever the clock's granularity.
    fn a_second_later(path: &Path) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        let was = f.metadata().unwrap().modified().unwrap();
        f.set_modified(was + Duration::from_secs(1)).unwrap();
    }

    /// A watcher resumed after another stopped (a handoff that failed in its final drain)
    /// reports every change made while none ran, compared with what the stopped one reported:
    /// a file made, one removed, one grown, one rewritten longer (its samples differ: not an
    /// append), one rewritten at the same length; not one left as it was. Then every change from
    /// its watches on.
    #[test]
    fn a_resumed_watcher_reports_what_changed_while_none_ran() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["a", "c", "same", "longer"] {
            std::fs::write(tmp.path().join(name), b"1").unwrap();
        }
        std::fs::write(tmp.path().join("meta.json"), b"{\"v\":1}").unwrap();
        let (w, rx) = watch(tmp.path());
        let stopped = w.flush_and_stop();
        assert_eq!(stopped.failure(), None);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![]);

        std::fs::write(tmp.path().join("b"), b"22").unwrap();
        std::fs::remove_file(tmp.path().join("a")).unwrap();
        append(&tmp.path().join("c"), b"23");
        std::fs::write(tmp.path().join("longer"), b"2345").unwrap();
        std::fs::write(tmp.path().join("meta.json"), b"{\"v\":2}").unwrap();
        a_second_later(&tmp.path().join("meta.json"));
        let (sink, rx) = to_channel();
        let w = Watcher::resume(tmp.path(), stopped, sink).unwrap();
        assert!(w.flusher().flush(Duration::from_secs(10)));
        let mut got: Vec<Change> = rx.try_iter().collect();
        got.sort_by_key(|c| format!("{c:?}"));
        let rewritten = |path: &str, len_bytes| Change::Rewritten {
            path: p(path),
            len_bytes,
        };
        assert_eq!(
            got,
            vec![
                Change::Grew {
                    path: p("c"),
                    from_bytes: 1,
                    to_bytes: 3
                },
                Change::Removed { path: p("a") },
                rewritten("b", 2),
                rewritten("longer", 4),
                rewritten("meta.json", 7),
            ]
        );
        append(&tmp.path().join("c"), b"4");
        assert_eq!(
            next(&rx),
            Change::Grew {
                path: p("c"),
                from_bytes: 3,
                to_bytes: 4
            }
        );
        w.stop();
    }

    /// The directory at the root's path replaced while no watcher ran: a resumed watcher would
    /// watch another directory than the one its leader serves, so it refuses to.
    #[test]
    fn a_watcher_is_not_resumed_on_another_directory_at_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).unwrap();
        let (w, _rx) = watch(&root);
        let stopped = w.flush_and_stop();
        std::fs::rename(&root, tmp.path().join("moved")).unwrap();
        std::fs::create_dir(&root).unwrap();
        let (sink, _rx) = to_channel();
        let err = Watcher::resume(&root, stopped, sink)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("is no longer the directory ferry started on"),
            "{err}"
        );
    }
}
