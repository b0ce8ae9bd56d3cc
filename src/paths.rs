//! Relative paths that cannot escape the data dir, and the data dir handle all file access uses.
//!
//! Two layers keep writes inside the dir. `RelPath` refuses, by syntax, anything that could
//! point elsewhere (absolute, `..`, empty or `.` components, NUL) and ferry's own state under
//! `.ferry/`. `DataDir` then resolves every path with openat2(2) and `RESOLVE_BENEATH`, relative
//! to the dir's fd, so a symlink inside the dir that points outside it is refused by the kernel,
//! race-free, instead of being followed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const MAX_PATH_LEN_BYTES: usize = 4096;
/// ferry's own state: `DIR/.ferry/`, never replicated, never deleted by a sync.
pub const STATE_DIR_NAME: &str = ".ferry";
const TEMP_DIR_NAME: &str = "tmp";
/// A sync round of at least this many files (`DataDir::sync_paths`) fdatasyncs them on
/// `SYNC_THREADS_MAX` threads: a follower's initial sync of many small files paid a wait for
/// the disk per file, one after another.
pub const SYNC_PARALLEL_MIN_FILES: usize = 16;
const SYNC_THREADS_MAX: usize = 8;

/// What became of one file of a sync round (`DataDir::sync_paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileSynced {
    Synced,
    /// Deleted or renamed over since: its directory's sync records that.
    Gone,
    /// It could not be opened for want of a descriptor: a syncfs(2) makes it durable.
    NoDescriptorLeft,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path is {len_bytes} bytes, over MAX_PATH_LEN_BYTES ({max_bytes})")]
    TooLong { len_bytes: usize, max_bytes: usize },
    #[error("path {0:?} is absolute; paths are relative to the data dir")]
    Absolute(String),
    #[error("path {0:?} has a `..` component, which would escape the data dir")]
    DotDot(String),
    #[error("path {0:?} has an empty or `.` component")]
    EmptyOrDotComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path is not UTF-8")]
    NotUtf8,
    #[error("path {0:?} is inside ferry's own state dir `.ferry/`")]
    StateDir(String),
}

/// A validated path relative to the data dir, `/`-separated. Clones share one allocation (a
/// reference count); `unshared` makes a copy with its own, for another thread (`catalog`, on
/// why). Sets of them are searched by `&str`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Arc<str>);

impl std::borrow::Borrow<str> for RelPath {
    // Hash and Eq are the str's (a newtype's derived impls hash and compare its one field), as
    // Borrow requires.
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl RelPath {
    pub fn new(s: &str) -> Result<RelPath, PathError> {
        RelPath::check(s)?;
        Ok(RelPath(s.into()))
    }

    /// Whether `s` is a valid `RelPath`, without making one.
    pub fn check(s: &str) -> Result<(), PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_LEN_BYTES {
            return Err(PathError::TooLong {
                len_bytes: s.len(),
                max_bytes: MAX_PATH_LEN_BYTES,
            });
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s.to_string()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_string()));
        }
        for component in s.split('/') {
            match component {
                ".." => return Err(PathError::DotDot(s.to_string())),
                "" | "." => return Err(PathError::EmptyOrDotComponent(s.to_string())),
                _ => {}
            }
        }
        if s.split('/').next() == Some(STATE_DIR_NAME) {
            return Err(PathError::StateDir(s.to_string()));
        }
        Ok(())
    }

    pub fn from_bytes(b: &[u8]) -> Result<RelPath, PathError> {
        RelPath::new(std::str::from_utf8(b).map_err(|_| PathError::NotUtf8)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A copy with an allocation of its own: cloning or dropping it never writes the cache
    /// line of the original's reference count.
    pub fn unshared(&self) -> RelPath {
        RelPath(Arc::from(&*self.0))
    }

    #[cfg(test)]
    pub fn shares_allocation(&self, other: &RelPath) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// `"a/b/c"` -> `Some("a/b")`; `"c"` -> `None`.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(p, _)| p)
    }

    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&*self.0, |(_, f)| f)
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error a resolution that would leave the data dir turns into.
#[derive(Debug, thiserror::Error)]
#[error("path {path:?} escapes the data dir (a symlink or `..` points outside it)")]
pub struct EscapeError {
    pub path: String,
}

/// Whether `e` is a refusal to leave the data dir (vs. an ordinary I/O error).
pub fn is_escape(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<EscapeError>())
}

/// Opens a file with `open`, which a cache of open files (`cached`, holding `kept` files) saves
/// reopening: if the process holds as many files open as it may (EMFILE, or ENFILE for the
/// whole system), the cache is emptied and the open tried once more. So a limit below the
/// cache's size slows a leader or follower down rather than failing it; the first time, a
/// warning says so.
pub fn open_making_room<T>(
    kept: usize,
    cached: impl FnOnce(),
    open: impl Fn() -> io::Result<T>,
) -> io::Result<T> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    match open() {
        Err(e) if matches!(os_error(&e), Some(libc::EMFILE | libc::ENFILE)) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the limit of open files is reached ({e}): closing the {kept} files kept \
                     open to read or write without reopening, and reopening each as needed \
                     (slower). Raise the limit (`ulimit -n`, systemd's LimitNOFILE=); only \
                     logged once"
                );
            }
            cached();
            open()
        }
        r => r,
    }
}

/// The directories (relative to the data dir's root, `""` for the root itself) whose entries a
/// change created, renamed or removed: the ones an fsync must reach for the change to survive a
/// power loss.
pub type DirsChanged = Vec<String>;

/// A file being received whole, under `DIR/.ferry/tmp/`, until `DataDir::commit_temp`.
pub struct TempFile {
    pub file: File,
    name: String,
}

/// A data directory, opened once; every access to a file in it resolves beneath it.
pub struct DataDir {
    root: PathBuf,
    root_fd: OwnedFd,
    temp_seq: AtomicU64,
    /// `.ferry/tmp/`, opened beneath the root at its first use: every whole file a follower
    /// receives is made and renamed from there.
    temp_dir_fd: std::sync::OnceLock<OwnedFd>,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// The nearest directory above `root` (symlinks resolved) that is a ferry data dir, one with a
/// `.ferry/tmp/`; `root` need not exist yet.
pub fn enclosing_data_dir(root: &Path) -> io::Result<Option<PathBuf>> {
    let mut probe = std::path::absolute(root)?;
    // The nearest one that exists; when that is above `root`, it is itself a candidate.
    let mut above = false;
    while !probe.exists() {
        if !probe.pop() {
            return Ok(None);
        }
        above = true;
    }
    let real = probe.canonicalize()?;
    let mut dir = if above {
        Some(real.as_path())
    } else {
        real.parent()
    };
    while let Some(d) = dir {
        // `.ferry/tmp/`, which every data dir has from its first open: a `.ferry/` of another
        // program (say a config dir in a home directory) is not taken for one.
        if d.join(STATE_DIR_NAME).join(TEMP_DIR_NAME).is_dir() {
            return Ok(Some(d.to_path_buf()));
        }
        dir = d.parent();
    }
    Ok(None)
}

/// The file in `.ferry/` whose lock says which process leads or follows the data dir.
pub const LOCK_FILE_NAME: &str = "lock";
/// How long `DirLock::acquire` waits for a lock held by another process before it gives up: a
/// process killed a moment ago may still be exiting.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);

/// The one ferry process that leads or follows a data dir holds this: an exclusive flock(2) on
/// `DIR/.ferry/lock`, which names it ("pid N, ROLE"). A second one on the same dir (a follower
/// aimed at a leader's dir, two followers writing one copy) is refused, naming the first.
/// Released when dropped, and by the kernel when the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` for `role` (e.g. "ferry follow"), waiting up to `LOCK_WAIT`
    /// for another process to let go.
    pub fn acquire(dir: &DataDir, role: &str) -> io::Result<DirLock> {
        use std::os::unix::fs::FileExt;
        let path = dir.state_path(LOCK_FILE_NAME);
        let context =
            |e: io::Error| io::Error::new(e.kind(), format!("cannot lock {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(context)?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock takes an fd we own, open for the call, and flags; no memory.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
            ) {
                // A filesystem without flock (some network or FUSE ones): serve, and say what
                // is not guarded.
                tracing::warn!(
                    "cannot lock {}: {e}; nothing stops a second ferry process on this data dir",
                    path.display()
                );
                return Ok(DirLock { _file: file });
            }
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(context(e));
            }
            if std::time::Instant::now() >= deadline {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "which has not said who it is",
                    named => named,
                };
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another ferry process ({holder}): one process leads or \
                         follows a data dir at a time",
                        dir.root().display()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let me = format!("pid {}, {role}\n", std::process::id());
        file.set_len(0).map_err(context)?;
        file.write_all_at(me.as_bytes(), 0).map_err(context)?;
        Ok(DirLock { _file: file })
    }
}

/// How often a leader's watcher and a follower look at what their data dir's path names
/// (`still_at`): a directory renamed away, or hidden under a mount, would otherwise be served
/// or written on as if it were still there.
pub const ROOT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `path` still names the directory of device and inode `id`: not when it was moved
/// or deleted, or another directory or a mount is at that path now. A path that cannot be
/// looked at for another reason (a permission changed on the way) is let be.
pub fn still_at(path: &Path, id: (u64, u64)) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let now = match std::fs::metadata(path) {
        Ok(meta) => Some((meta.dev(), meta.ino())),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => None,
        Err(_) => return Ok(()),
    };
    if now == Some(id) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is no longer the directory ferry started on: it was moved or deleted, or another \
             directory or a mount is at that path now; start ferry on it again",
            path.display()
        ),
    ))
}

/// `e`, from listing the directory `dir`, naming it: the scan's, the watcher's and
/// `first_file`'s walks report it alike.
pub fn cannot_list(dir: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot list {}: {e}", dir.display()))
}

/// A file (anything but a directory) under `root` when `root` holds some and has no `.ferry/`:
/// a directory ferry never managed, which following would make an exact copy of the leader's,
/// deleting what the leader lacks. `None` when `root` is missing, empty of files, or ferry's.
pub fn unmanaged_file(root: &Path) -> io::Result<Option<PathBuf>> {
    if root.join(STATE_DIR_NAME).exists() {
        return Ok(None);
    }
    first_file(root)
}

/// Some file (anything but a directory) under `root`, outside its `.ferry/`; `None` when
/// `root` is missing or holds none. Stops at the first it finds.
pub fn first_file(root: &Path) -> io::Result<Option<PathBuf>> {
    if !root.exists() {
        return Ok(None);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let cannot_list = |e| cannot_list(&dir, e);
        for entry in std::fs::read_dir(&dir).map_err(cannot_list)? {
            let entry = entry.map_err(cannot_list)?;
            // file_type does not follow a symlink: a link is content too.
            if !entry.file_type().map_err(cannot_list)?.is_dir() {
                return Ok(Some(entry.path()));
            }
            if dir != root || entry.file_name() != STATE_DIR_NAME {
                stack.push(entry.path());
            }
        }
    }
    Ok(None)
}

/// A file refused O_NOATIME (EPERM: this process neither owns it nor may act as its owner,
/// CAP_FOWNER), and was opened without it: from then on every file is.
static NOATIME_REFUSED: AtomicBool = AtomicBool::new(false);

/// `open` with O_NOATIME among `open`'s flags where it is allowed, for a file opened to read.
/// Replication reads the application's files, and under `relatime` (the default mount option)
/// each read after a write would update the file's access time: an access that is not the
/// application's, and on ext4 a journalled write of the inode at every round of a segment
/// appended to. The flag is allowed to the file's owner and to root; once a file refuses it, a
/// process that owns none would meet that at every open, so files are opened without it.
pub fn open_noatime<T>(open: impl Fn(i32) -> io::Result<T>) -> io::Result<T> {
    open_noatime_unless(&NOATIME_REFUSED, open)
}

fn open_noatime_unless<T>(
    refused: &AtomicBool,
    open: impl Fn(i32) -> io::Result<T>,
) -> io::Result<T> {
    if refused.load(Ordering::Relaxed) {
        return open(0);
    }
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let opened = open(0)?;
            if !refused.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    "reading without O_NOATIME from now on: a file refused it (this process is \
                     not its owner and lacks CAP_FOWNER), so reads after writes update access \
                     times"
                );
            }
            Ok(opened)
        }
        opened => opened,
    }
}

fn with_path(e: io::Error, rel: &str) -> io::Error {
    if is_escape(&e) {
        return e;
    }
    let kind = e.kind();
    let rel = rel.to_string();
    io::Error::new(kind, AtPath { rel, source: e })
}

/// An I/O error on a path of the data dir: shown as `path: error`, keeping the error itself
/// (`os_error`).
#[derive(Debug)]
struct AtPath {
    rel: String,
    source: io::Error,
}

impl std::fmt::Display for AtPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rel, self.source)
    }
}

impl std::error::Error for AtPath {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The OS's error number behind `e`, which `with_path` keeps.
fn os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        let at = e.get_ref()?.downcast_ref::<AtPath>()?;
        at.source.raw_os_error()
    })
}

impl DataDir {
    /// Opens `root` (created if missing) and its `.ferry/` and `.ferry/tmp/` dirs. A `root`
    /// inside another ferry data dir is an error (`enclosing_data_dir`), before anything is made.
    pub fn open(root: &Path) -> io::Result<DataDir> {
        if let Some(outer) = enclosing_data_dir(root)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is inside {}, itself a ferry data dir (it has {STATE_DIR_NAME}/): each \
                     would replicate the other's files, the leader's copy growing into itself; \
                     use a directory outside it",
                    root.display(),
                    outer.display()
                ),
            ));
        }
        std::fs::create_dir_all(root.join(STATE_DIR_NAME).join(TEMP_DIR_NAME)).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", root.display()))
        })?;
        DataDir::open_existing(root)
    }

    /// Opens an existing dir without creating anything (for read-only uses like `checksum`).
    pub fn open_existing(root: &Path) -> io::Result<DataDir> {
        let dir = File::open(root).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", root.display()))
        })?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            root_fd: OwnedFd::from(dir),
            temp_seq: AtomicU64::new(0),
            temp_dir_fd: std::sync::OnceLock::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    /// Whether the root's path still names the directory this `DataDir` has open (`still_at`).
    pub fn check_root(&self) -> io::Result<()> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on the root dir's fd, which this DataDir owns and keeps open, writing
        // into `st`, which lives across the call.
        if unsafe { libc::fstat(self.root_fd().as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        still_at(&self.root, (st.st_dev, st.st_ino))
    }

    /// openat2(2) of `rel` beneath `dirfd`, refusing symlinks that lead outside.
    fn openat2(dirfd: BorrowedFd<'_>, rel: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let c = cstring(rel)?;
        // SAFETY: open_how is plain data; zeroed is a valid value that we then fill in.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = if flags & libc::O_CREAT != 0 {
            u64::from(mode)
        } else {
            0
        };
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: `c` is a NUL-terminated string and `how` a valid open_how, both alive for the
        // call; the size passed is exactly that of `how`; dirfd is a borrowed, open fd.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    EscapeError {
                        path: rel.to_string(),
                    },
                ),
                _ => e,
            });
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn open_dir_beneath(&self, rel_dir: &str) -> io::Result<OwnedFd> {
        DataDir::openat2(
            self.root_fd(),
            rel_dir,
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_PATH,
            0,
        )
    }

    /// Creates `rel_dir` and its missing ancestors, one component at a time, each beneath root,
    /// and notes in `changed` the parent of each directory it created.
    fn make_dirs(&self, rel_dir: &str, changed: &mut Vec<String>) -> io::Result<OwnedFd> {
        let mut current = self.open_dir_beneath(".")?;
        let mut prefix_len = 0;
        for component in rel_dir.split('/') {
            let c = cstring(component)?;
            // SAFETY: mkdirat with an open dir fd and a NUL-terminated single component.
            let rc = unsafe { libc::mkdirat(current.as_raw_fd(), c.as_ptr(), 0o755) };
            if rc == 0 {
                // The directory holding the new one: `rel_dir` up to this component.
                changed.push(rel_dir[..prefix_len].trim_end_matches('/').to_string());
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            prefix_len += component.len() + 1;
            current = DataDir::openat2(
                current.as_fd(),
                component,
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_PATH,
                0,
            )?;
        }
        // Re-resolve the whole path from root, so the result is known to lie beneath it.
        self.open_dir_beneath(rel_dir)
    }

    /// `rel`'s directory, created with its missing ancestors if `changed` is given (which then
    /// notes the directories whose entries that changed).
    fn parent_fd(&self, rel: &RelPath, changed: Option<&mut Vec<String>>) -> io::Result<OwnedFd> {
        match (rel.parent(), changed) {
            (None, _) => self.open_dir_beneath("."),
            // Most often the directory is there (a queue's next segment): one open.
            (Some(p), Some(changed)) => match self.open_dir_beneath(p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.make_dirs(p, changed),
                opened => opened,
            },
            (Some(p), None) => self.open_dir_beneath(p),
        }
    }

    /// Opens `rel` to read, with O_NOATIME where allowed (`open_noatime`).
    pub fn open_read(&self, rel: &RelPath) -> io::Result<File> {
        let open =
            |noatime| DataDir::openat2(self.root_fd(), rel.as_str(), libc::O_RDONLY | noatime, 0);
        let fd = open_noatime(open).map_err(|e| with_path(e, rel.as_str()))?;
        Ok(File::from(fd))
    }

    /// Opens `rel` for writing, creating it (and its parent dirs) if missing; never truncates.
    /// Also returns the directories whose entries that changed (`DirsChanged`): none when the
    /// file was there.
    pub fn open_write(&self, rel: &RelPath) -> io::Result<(File, DirsChanged)> {
        match DataDir::openat2(self.root_fd(), rel.as_str(), libc::O_WRONLY, 0) {
            Ok(fd) => return Ok((File::from(fd), Vec::new())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, rel.as_str())),
        }
        // A new file in a dir that is there (a queue's next segment): one call, resolved from
        // the root as the open above was, instead of a walk that opens each dir on the way.
        let created = DataDir::openat2(
            self.root_fd(),
            rel.as_str(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o644,
        );
        match created {
            Ok(fd) => {
                let parent = rel.parent().unwrap_or("").to_string();
                return Ok((File::from(fd), vec![parent]));
            }
            // A dir on the way is missing (made below), or the name is there now: a dangling
            // symlink, or a file made since the open above (opened below, without O_EXCL).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) => {}
            Err(e) => return Err(with_path(e, rel.as_str())),
        }
        let mut changed = Vec::new();
        let parent = self
            .parent_fd(rel, Some(&mut changed))
            .map_err(|e| with_path(e, rel.as_str()))?;
        let fd = DataDir::openat2(
            parent.as_fd(),
            rel.file_name(),
            libc::O_WRONLY | libc::O_CREAT,
            0o644,
        )
        .map_err(|e| with_path(e, rel.as_str()))?;
        changed.push(rel.parent().unwrap_or("").to_string());
        Ok((File::from(fd), changed))
    }

    /// `.ferry/tmp/`, opened once.
    fn temp_dir(&self) -> io::Result<BorrowedFd<'_>> {
        if let Some(fd) = self.temp_dir_fd.get() {
            return Ok(fd.as_fd());
        }
        let fd = self.open_dir_beneath(&format!("{STATE_DIR_NAME}/{TEMP_DIR_NAME}"))?;
        Ok(self.temp_dir_fd.get_or_init(|| fd).as_fd())
    }

    /// A new, empty temp file for a whole-file transfer of `rel`.
    pub fn create_temp(&self, rel: &RelPath) -> io::Result<TempFile> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let stem: String = rel
            .file_name()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-' || *c == '_')
            .take(64)
            .collect();
        let name = format!("{}-{seq}-{stem}", std::process::id());
        let fd = DataDir::openat2(
            self.temp_dir()?,
            &name,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o644,
        )?;
        Ok(TempFile {
            file: File::from(fd),
            name,
        })
    }

    /// Renames a complete temp file over `rel` (atomically replacing any old copy); returns
    /// the directories whose entries that changed. The temp file stays open until dropped.
    pub fn commit_temp(&self, temp: &TempFile, rel: &RelPath) -> io::Result<DirsChanged> {
        self.rename_temp(temp, rel, 0)
    }

    /// `commit_temp` where nothing is at `rel` yet; `None` (the temp file left as it was) when
    /// something is, or when the filesystem cannot rename without replacing (no
    /// `RENAME_NOREPLACE`): then the caller looks at what is there and `commit_temp`s. A full
    /// sync of new files so spares a look at each name before its rename.
    pub fn commit_temp_if_new(
        &self,
        temp: &TempFile,
        rel: &RelPath,
    ) -> io::Result<Option<DirsChanged>> {
        match self.rename_temp(temp, rel, libc::RENAME_NOREPLACE) {
            Ok(changed) => Ok(Some(changed)),
            Err(e) if matches!(os_error(&e), Some(libc::EEXIST | libc::EINVAL)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn rename_temp(
        &self,
        temp: &TempFile,
        rel: &RelPath,
        flags: libc::c_uint,
    ) -> io::Result<DirsChanged> {
        let mut changed = Vec::new();
        let name = cstring(&temp.name)?;
        self.rename_into(self.temp_dir()?, &name, rel, flags, &mut changed)?;
        Ok(changed)
    }

    /// Renames `name` in the open directory `dir` to `to`, with `renameat2`'s `flags`,
    /// creating `to`'s missing parent dirs; notes in `changed` the directories whose entries
    /// that changed on `to`'s side.
    fn rename_into(
        &self,
        dir: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        to: &RelPath,
        flags: libc::c_uint,
        changed: &mut Vec<String>,
    ) -> io::Result<()> {
        let to_parent = self
            .parent_fd(to, Some(changed))
            .map_err(|e| with_path(e, to.as_str()))?;
        let to_name = cstring(to.file_name())?;
        // SAFETY: both dir fds are open; both names are NUL-terminated single components, so
        // the rename stays within dirs already resolved beneath root.
        let rc = unsafe {
            libc::renameat2(
                dir.as_raw_fd(),
                name.as_ptr(),
                to_parent.as_raw_fd(),
                to_name.as_ptr(),
                flags,
            )
        };
        if rc != 0 {
            return Err(with_path(io::Error::last_os_error(), to.as_str()));
        }
        changed.push(to.parent().unwrap_or("").to_string());
        Ok(())
    }

    /// Removes a temp file that will never be committed (a whole-file transfer the leader gave
    /// up on or started over), so abandoned transfers do not pile up in `.ferry/tmp/`.
    pub fn discard_temp(&self, temp: TempFile) -> io::Result<()> {
        let tmp = self.temp_dir()?;
        let name = cstring(&temp.name)?;
        drop(temp.file);
        // SAFETY: unlinkat on an open dir fd with a NUL-terminated single component (a name
        // create_temp made), so it stays inside `.ferry/tmp/`.
        let rc = unsafe { libc::unlinkat(tmp.as_raw_fd(), name.as_ptr(), 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Deletes `rel` (absent is fine), then any parent dirs it left empty; returns the
    /// directories whose entries that changed.
    pub fn remove(&self, rel: &RelPath) -> io::Result<DirsChanged> {
        let mut changed = Vec::new();
        let parent = match self.parent_fd(rel, None) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changed),
            Err(e) => return Err(with_path(e, rel.as_str())),
        };
        let name = cstring(rel.file_name())?;
        // SAFETY: unlinkat on an open dir fd with a NUL-terminated single component.
        if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(with_path(e, rel.as_str()));
            }
        } else {
            changed.push(rel.parent().unwrap_or("").to_string());
        }
        self.prune_empty_parents(rel, &mut changed)?;
        Ok(changed)
    }

    /// Renames the file `from` to `to` (over any file there, in one step), creating `to`'s
    /// missing parent dirs and removing `from`'s parents left empty; returns the directories
    /// whose entries that changed. `from` must be a regular file: anything else there (none, a
    /// directory, a symlink) is an error naming it.
    pub fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<DirsChanged> {
        let mut changed = Vec::new();
        let from_parent = self
            .parent_fd(from, None)
            .map_err(|e| with_path(e, from.as_str()))?;
        let from_name = cstring(from.file_name())?;
        // SAFETY: struct stat is plain integers, for which all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat on an open dir fd with a NUL-terminated single component, not
        // following a symlink, into a stat buffer we own.
        let rc = unsafe {
            libc::fstatat(
                from_parent.as_raw_fd(),
                from_name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(with_path(io::Error::last_os_error(), from.as_str()));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(with_path(
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                from.as_str(),
            ));
        }
        self.rename_into(from_parent.as_fd(), &from_name, to, 0, &mut changed)?;
        changed.push(from.parent().unwrap_or("").to_string());
        self.prune_empty_parents(from, &mut changed)?;
        Ok(changed)
    }

    /// Removes `rel`'s parent dirs, innermost first, while each is empty; notes in `changed`
    /// the directory each was removed from.
    fn prune_empty_parents(&self, rel: &RelPath, changed: &mut Vec<String>) -> io::Result<()> {
        let mut dir = rel.parent();
        while let Some(d) = dir {
            let (up, leaf) = match d.rsplit_once('/') {
                Some((up, leaf)) => (Some(up), leaf),
                None => (None, d),
            };
            let Ok(up_fd) = (match up {
                Some(u) => self.open_dir_beneath(u),
                None => self.open_dir_beneath("."),
            }) else {
                break;
            };
            let leaf = cstring(leaf)?;
            // SAFETY: as above; AT_REMOVEDIR only removes an empty directory.
            if unsafe { libc::unlinkat(up_fd.as_raw_fd(), leaf.as_ptr(), libc::AT_REMOVEDIR) } != 0
            {
                break;
            }
            changed.push(up.unwrap_or("").to_string());
            dir = up;
        }
        Ok(())
    }

    pub fn truncate(&self, rel: &RelPath, len_bytes: u64) -> io::Result<()> {
        let fd = DataDir::openat2(self.root_fd(), rel.as_str(), libc::O_WRONLY, 0)
            .map_err(|e| with_path(e, rel.as_str()))?;
        File::from(fd)
            .set_len(len_bytes)
            .map_err(|e| with_path(e, rel.as_str()))
    }

    /// Whether the data dir's filesystem keeps its files in memory only (tmpfs, ramfs): there a
    /// sync makes nothing survive a power loss or a reboot.
    pub fn in_memory(&self) -> io::Result<bool> {
        // SAFETY: struct statfs is plain integers, for which all zeroes is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on the root dir's fd, which this DataDir owns and keeps open, writing
        // into `st`, which lives across the call.
        if unsafe { libc::fstatfs(self.root_fd().as_raw_fd(), &mut st) } != 0 {
            return Err(with_path(io::Error::last_os_error(), "."));
        }
        // RAMFS_MAGIC of linux/magic.h, which the libc crate lacks.
        const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
        Ok(matches!(st.f_type, libc::TMPFS_MAGIC | RAMFS_MAGIC))
    }

    /// Makes everything written to the data dir's filesystem durable, syncfs(2): what an earlier
    /// process left in the page cache (a follower killed before its last sync round), which a
    /// new one holds and acks without having written it.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        // SAFETY: syncfs on the root dir's fd, which this DataDir owns and keeps open.
        if unsafe { libc::syncfs(self.root_fd().as_raw_fd()) } != 0 {
            return Err(with_path(io::Error::last_os_error(), "."));
        }
        Ok(())
    }

    /// Makes durable the data of `files` (fdatasync) and the entries of `dirs` (fsync; "" is
    /// the root). A path gone since (deleted or renamed over later) is skipped: its directory's
    /// sync records that. One file is open at a time on each of at most `SYNC_THREADS_MAX`
    /// threads, however many there are: a round may follow the initial sync of more files than
    /// the process may hold open.
    pub fn sync_paths<'a>(
        &self,
        files: impl IntoIterator<Item = &'a RelPath>,
        dirs: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<()> {
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let files: Vec<&RelPath> = files.into_iter().collect();
        // Start writeback of every file before waiting on any, so the disk sees them all at
        // once rather than one file after another. It goes on once the fd is closed. A file
        // that cannot be opened here is left to the loop after.
        for rel in &files {
            if let Ok(f) = self.open_read(rel) {
                // SAFETY: sync_file_range on an fd we own; offset 0 and length 0 mean the
                // whole file, and the flag only starts writeback. A failure is harmless: the
                // fdatasync below reports what matters.
                unsafe {
                    libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
        }
        // Other tasks of the process hold files open too (the caches of files being written):
        // with no descriptor left for one more, syncfs(2) of the filesystem makes it durable
        // instead, with everything else written to that filesystem.
        let no_fd_left = |e: &io::Error| matches!(os_error(e), Some(libc::EMFILE | libc::ENFILE));
        // Many files on several threads: each fdatasync mostly waits for the disk, and those
        // in flight at once share the filesystem's journal commits and the disk's cache
        // flushes, where one after another each waits for its own.
        let threads = if files.len() < SYNC_PARALLEL_MIN_FILES {
            1
        } else {
            SYNC_THREADS_MAX
        };
        let synced = crate::threads::each_on(&files, threads, |rel| match self.open_read(rel) {
            Ok(f) => f
                .sync_data()
                .map(|()| FileSynced::Synced)
                .map_err(|e| with_path(e, rel.as_str())),
            Err(e) if gone(&e) => Ok(FileSynced::Gone),
            Err(e) if no_fd_left(&e) => Ok(FileSynced::NoDescriptorLeft),
            Err(e) => Err(e),
        });
        let mut out_of_fds = false;
        for file in synced {
            out_of_fds |= file? == FileSynced::NoDescriptorLeft;
        }
        for rel_dir in dirs {
            let name = if rel_dir.is_empty() { "." } else { rel_dir };
            match DataDir::openat2(self.root_fd(), name, libc::O_DIRECTORY | libc::O_RDONLY, 0) {
                Ok(fd) => File::from(fd).sync_all().map_err(|e| with_path(e, name))?,
                Err(e) if gone(&e) => {}
                Err(e) if no_fd_left(&e) => out_of_fds = true,
                Err(e) => return Err(with_path(e, name)),
            }
        }
        if out_of_fds {
            self.sync_filesystem()?;
        }
        Ok(())
    }

    /// Removes temp files a crash left behind.
    pub fn clear_temps(&self) -> io::Result<()> {
        let tmp = self.root.join(STATE_DIR_NAME).join(TEMP_DIR_NAME);
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// `DIR/.ferry/<name>`.
    pub fn state_path(&self, name: &str) -> PathBuf {
        self.root.join(STATE_DIR_NAME).join(name)
    }

    /// Replaces `DIR/.ferry/<name>` with `bytes`: written to `<name>.tmp` and renamed over it,
    /// so a reader, or a restart after the process died, finds the old file or the new one,
    /// never a part. `sync` says what a crash of the machine leaves. The one way ferry writes
    /// its state files (the lineage, the leader's and the held record, the digest cache).
    pub fn replace_state_file(&self, name: &str, bytes: &[u8], sync: StateSync) -> io::Result<()> {
        use std::io::Write;
        let path = self.state_path(name);
        let tmp = self.state_path(&format!("{name}.tmp"));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            match sync {
                StateSync::Volatile => {}
                StateSync::Whole => file.sync_data()?,
                StateSync::Durable => file.sync_all()?,
            }
            std::fs::rename(&tmp, &path)?;
            if sync == StateSync::Durable {
                File::open(self.state_path(""))?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|e: io::Error| {
            io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
        })
    }
}

/// What a crash of the machine (a power loss, a kernel panic) leaves of a state file that
/// `DataDir::replace_state_file` wrote. A crash of the process alone leaves the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSync {
    /// Nothing synced: the file may be old, new, empty or gone. For records that name the boot
    /// they were written in and are ignored after a reboot.
    Volatile,
    /// The data synced before the rename: the old file or the new one, whole (the rename may
    /// not have reached the disk). For a cache, which either serves.
    Whole,
    /// `Whole`, and the directory synced after the rename: once written, the new file stays.
    /// For what must never go back (the lineage).
    Durable,
}

/// A data dir in a new temp dir, for unit tests (the temp dir goes when the first is dropped).
#[cfg(test)]
pub(crate) fn temp_data_dir() -> (tempfile::TempDir, DataDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(tmp.path()).unwrap();
    (tmp, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A sync round that finds no descriptor left for a file (the follower's caches hold them
    /// all) still makes it durable, with syncfs(2), rather than failing the round. Run in a
    /// child process of this test binary, which takes every descriptor its own lowered limit
    /// allows before the sync.
    #[test]
    fn a_sync_with_no_descriptor_left_syncs_the_filesystem_instead() {
        const CHILD: &str = "FERRY_TEST_NO_DESCRIPTOR_LEFT";
        let name = "paths::tests::a_sync_with_no_descriptor_left_syncs_the_filesystem_instead";
        if std::env::var_os(CHILD).is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args(["--exact", name, "--nocapture", "--test-threads", "1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(said.contains("1 passed"), "the child ran the test: {said}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        // One file, synced on this thread, and a round of many, on several.
        let files = files_to_sync(&dir);
        let limit = libc::rlimit {
            rlim_cur: 64,
            rlim_max: 64,
        };
        // SAFETY: setrlimit reads the struct passed, alive for the call; this process is the
        // child, which runs this one test.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut taken = Vec::new();
        while let Ok(f) = File::open("/dev/null") {
            taken.push(f);
        }
        dir.sync_paths(&files[..1], ["q"]).unwrap();
        dir.sync_paths(&files, ["q"]).unwrap();
        drop(taken);
    }

    /// `SYNC_PARALLEL_MIN_FILES` files of a data dir, `q/f.0` on, one byte each.
    fn files_to_sync(dir: &DataDir) -> Vec<RelPath> {
        use std::io::Write;
        let files: Vec<RelPath> = (0..SYNC_PARALLEL_MIN_FILES)
            .map(|i| p(&format!("q/f.{i}")))
            .collect();
        for file in &files {
            dir.open_write(file).unwrap().0.write_all(b"x").unwrap();
        }
        files
    }

    /// A round of many files, synced on several threads: files deleted since they were written
    /// are skipped, the rest synced.
    #[test]
    fn a_sync_of_many_files_skips_those_deleted_since() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let files = files_to_sync(&dir);
        for gone in [&files[0], &files[files.len() / 2], &files[files.len() - 1]] {
            dir.remove(gone).unwrap();
        }
        dir.sync_paths(&files, ["q"]).unwrap();
    }

    /// A file of a round of many that cannot be synced (here, replaced by a symlink out of the
    /// data dir) fails the round, naming it, whichever thread met it.
    #[test]
    fn a_sync_of_many_files_fails_naming_a_file_it_could_not_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let files = files_to_sync(&dir);
        for bad in [files.len() - 1, files.len() / 2, 0] {
            let name = tmp.path().join(files[bad].as_str());
            std::fs::remove_file(&name).unwrap();
            std::os::unix::fs::symlink("/etc/hostname", &name).unwrap();
            let err = dir.sync_paths(&files, ["q"]).unwrap_err().to_string();
            assert!(err.contains(files[bad].as_str()), "{err}");
            std::fs::remove_file(&name).unwrap();
            std::fs::write(&name, b"x").unwrap();
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_data_dir_is_found_above_a_path_by_its_state_dir_and_another_programs_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let outer = tmp.path().join("outer");
        DataDir::open(&outer).unwrap();
        let real = outer.canonicalize().unwrap();
        for inner in ["a", "a/b/c"] {
            let found = enclosing_data_dir(&outer.join(inner)).unwrap();
            assert_eq!(found.as_deref(), Some(real.as_path()), "{inner}");
        }
        assert_eq!(enclosing_data_dir(&outer).unwrap(), None, "not itself");
        assert!(DataDir::open(&outer.join("a")).is_err());
        // A sibling, and a dir under another program's .ferry/ (no tmp/ in it).
        assert_eq!(
            enclosing_data_dir(&tmp.path().join("beside")).unwrap(),
            None
        );
        let home = tmp.path().join("home");
        std::fs::create_dir_all(home.join(".ferry")).unwrap();
        assert_eq!(enclosing_data_dir(&home.join("data")).unwrap(), None);
    }

    #[test]
    fn a_data_dir_holds_files_only_outside_its_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        assert_eq!(first_file(&root).unwrap(), None, "missing");
        let dir = DataDir::open(&root).unwrap();
        std::fs::write(dir.state_path("leader"), b"record").unwrap();
        std::fs::create_dir_all(root.join("q/empty")).unwrap();
        assert_eq!(first_file(&root).unwrap(), None, "only .ferry/ and dirs");
        std::fs::create_dir_all(root.join("q/sub/.ferry")).unwrap();
        std::fs::write(root.join("q/sub/.ferry/x"), b"data").unwrap();
        let found = first_file(&root).unwrap();
        assert_eq!(
            found,
            Some(root.join("q/sub/.ferry/x")),
            "a nested .ferry is data"
        );
        assert_eq!(unmanaged_file(&root).unwrap(), None, "ferry's dir");
    }

    #[test]
    fn a_path_is_found_by_its_text_and_its_clones_share_one_allocation() {
        let path = p("queues/q1/seg.0");
        let copy = path.clone();
        assert!(std::ptr::eq(path.as_str(), copy.as_str()));
        let set: std::collections::HashSet<RelPath> = [path].into_iter().collect();
        assert!(set.contains("queues/q1/seg.0"));
        assert!(!set.contains("queues/q1/seg.1"));
        assert!(RelPath::check("queues/q1/seg.0").is_ok());
        assert!(matches!(RelPath::check("../x"), Err(PathError::DotDot(_))));
    }

    #[test]
    fn relative_paths_are_accepted() {
        for ok in ["a", "a/b.seg", "dir/sub/x.json", ".hidden", "a/.ferry"] {
            assert_eq!(p(ok).as_str(), ok);
        }
        assert_eq!(p("a/b/c").parent(), Some("a/b"));
        assert_eq!(p("c").parent(), None);
        assert_eq!(p("a/b/c").file_name(), "c");
    }

    #[test]
    fn paths_that_could_escape_are_refused_naming_the_cause() {
        let cases: [(&str, &str); 9] = [
            ("", "empty"),
            ("/abs", "absolute"),
            ("a/../b", "`..`"),
            ("..", "`..`"),
            ("a//b", "empty or `.`"),
            ("a/", "empty or `.`"),
            ("./a", "empty or `.`"),
            ("a\0b", "NUL"),
            (".ferry/x", "state dir"),
        ];
        for (bad, cause) in cases {
            let e = RelPath::new(bad).unwrap_err().to_string();
            assert!(e.contains(cause), "{bad:?}: {e}");
        }
        let long = "x".repeat(MAX_PATH_LEN_BYTES + 1);
        assert!(RelPath::new(&long)
            .unwrap_err()
            .to_string()
            .contains("MAX_PATH_LEN_BYTES"));
        assert_eq!(RelPath::from_bytes(&[0xff]), Err(PathError::NotUtf8));
    }

    #[test]
    fn nested_files_are_written_and_read_beneath_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        use std::os::unix::fs::FileExt;
        dir.open_write(&p("q/1/seg"))
            .unwrap()
            .0
            .write_all_at(b"hello", 0)
            .unwrap();
        let mut s = String::new();
        dir.open_read(&p("q/1/seg"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        assert!(tmp.path().join(".ferry/tmp").is_dir());
    }

    /// What `synced` must fsync for a new file to survive a crash: every dir whose entries the
    /// open changed, and nothing for a file that was there.
    #[test]
    fn open_write_names_the_dirs_whose_entries_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        assert_eq!(dir.open_write(&p("q/1/seg.0")).unwrap().1, ["", "q", "q/1"]);
        assert_eq!(dir.open_write(&p("q/1/seg.1")).unwrap().1, ["q/1"]);
        assert_eq!(dir.open_write(&p("q/2/seg.0")).unwrap().1, ["q", "q/2"]);
        assert!(dir.open_write(&p("q/1/seg.0")).unwrap().1.is_empty());
        assert_eq!(dir.open_write(&p("top")).unwrap().1, [""]);
        assert!(tmp.path().join("q/2/seg.0").is_file());
    }

    /// A whole file received is renamed into its directory, made with its missing ancestors:
    /// the directories whose entries that changed are named, for the sync that follows.
    #[test]
    fn commit_temp_names_the_dirs_whose_entries_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let commit = |rel: &str| {
            let t = dir.create_temp(&p(rel)).unwrap();
            dir.commit_temp(&t, &p(rel)).unwrap()
        };
        assert_eq!(commit("q/1/seg.0"), ["", "q", "q/1"]);
        assert_eq!(commit("q/1/seg.1"), ["q/1"]);
        assert_eq!(commit("q/2/seg.0"), ["q", "q/2"]);
        assert_eq!(commit("q/1/seg.0"), ["q/1"]);
        assert_eq!(commit("top"), [""]);
        assert!(tmp.path().join("q/2/seg.0").is_file());
    }

    #[test]
    fn commit_temp_replaces_atomically_and_remove_prunes_empty_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/b/f"), b"old").unwrap();
        let t = dir.create_temp(&p("a/b/f")).unwrap();
        use std::io::Write;
        (&t.file).write_all(b"new!").unwrap();
        dir.commit_temp(&t, &p("a/b/f")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("a/b/f")).unwrap(), b"new!");
        assert_eq!(
            std::fs::read_dir(tmp.path().join(".ferry/tmp"))
                .unwrap()
                .count(),
            0
        );
        dir.remove(&p("a/b/f")).unwrap();
        assert!(!tmp.path().join("a").exists(), "empty parents are pruned");
        dir.remove(&p("never/there")).unwrap();
    }

    #[test]
    fn a_file_that_refuses_o_noatime_is_opened_without_it_and_so_is_every_file_after() {
        let refused = AtomicBool::new(false);
        let asked = std::sync::Mutex::new(Vec::new());
        let open = |flags: i32| {
            asked.lock().unwrap().push(flags);
            if flags & libc::O_NOATIME != 0 {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            } else {
                Ok(flags)
            }
        };
        assert_eq!(open_noatime_unless(&refused, open).unwrap(), 0);
        assert_eq!(open_noatime_unless(&refused, open).unwrap(), 0);
        assert_eq!(*asked.lock().unwrap(), vec![libc::O_NOATIME, 0, 0]);
        // Another error is the open's own: returned, and the flag still asked for next time.
        let refused = AtomicBool::new(false);
        let missing = |_| Err::<i32, _>(io::Error::from_raw_os_error(libc::ENOENT));
        let e = open_noatime_unless(&refused, missing).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(!refused.load(Ordering::Relaxed));
        // Allowed: asked for once, kept.
        let noatime = open_noatime_unless(&refused, Ok::<i32, io::Error>).unwrap();
        assert_eq!(noatime, libc::O_NOATIME);
    }

    /// A whole file received under a new name is renamed into place at once; over a name
    /// taken, nothing happens, so that the caller can look at the copy it replaces first.
    #[test]
    fn rename_moves_a_file_over_another_makes_and_prunes_dirs_and_refuses_a_non_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::create_dir_all(tmp.path().join("t-0")).unwrap();
        std::fs::write(tmp.path().join("t-0/00.log"), b"segment").unwrap();
        std::fs::write(tmp.path().join("over"), b"old").unwrap();
        let changed = dir
            .rename(&p("t-0/00.log"), &p("t-0.x-delete/00.log"))
            .unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("t-0.x-delete/00.log")).unwrap(),
            b"segment"
        );
        assert!(
            !tmp.path().join("t-0").exists(),
            "its empty parent is pruned"
        );
        for d in ["", "t-0", "t-0.x-delete"] {
            assert!(changed.iter().any(|c| c == d), "{d:?} in {changed:?}");
        }
        dir.rename(&p("t-0.x-delete/00.log"), &p("over")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("over")).unwrap(), b"segment");
        let gone = dir.rename(&p("none"), &p("x")).unwrap_err();
        assert!(gone.to_string().contains("none"), "{gone}");
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        let not_file = dir.rename(&p("d"), &p("x")).unwrap_err();
        assert!(
            not_file.to_string().contains("not a regular file"),
            "{not_file}"
        );
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn commit_temp_if_new_renames_only_where_nothing_is() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let t = dir.create_temp(&p("q/f")).unwrap();
        (&t.file).write_all(b"first").unwrap();
        assert_eq!(
            dir.commit_temp_if_new(&t, &p("q/f")).unwrap(),
            Some(vec!["".to_string(), "q".to_string()])
        );
        let t = dir.create_temp(&p("q/f")).unwrap();
        (&t.file).write_all(b"second").unwrap();
        assert_eq!(dir.commit_temp_if_new(&t, &p("q/f")).unwrap(), None);
        assert_eq!(std::fs::read(tmp.path().join("q/f")).unwrap(), b"first");
        assert_eq!(dir.commit_temp(&t, &p("q/f")).unwrap(), ["q"]);
        assert_eq!(std::fs::read(tmp.path().join("q/f")).unwrap(), b"second");
        let temps = std::fs::read_dir(tmp.path().join(".ferry/tmp")).unwrap();
        assert_eq!(temps.count(), 0);
    }

    #[test]
    fn a_symlink_pointing_outside_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("evil")).unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        for e in [
            dir.open_write(&p("evil/x")).unwrap_err(),
            dir.open_read(&p("evil/secret")).unwrap_err(),
            dir.commit_temp(&dir.create_temp(&p("x")).unwrap(), &p("evil/x"))
                .unwrap_err(),
            dir.rename(&p("evil/secret"), &p("x")).unwrap_err(),
            {
                std::fs::write(tmp.path().join("mine"), b"m").unwrap();
                dir.rename(&p("mine"), &p("evil/x")).unwrap_err()
            },
        ] {
            assert!(is_escape(&e), "{e}");
            assert!(e.to_string().contains("escapes the data dir"), "{e}");
        }
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            1,
            "nothing created outside"
        );
    }

    #[test]
    fn a_state_file_is_replaced_whole_and_a_failure_names_it() {
        let (_tmp, dir) = temp_data_dir();
        for (sync, text) in [
            (StateSync::Volatile, "first"),
            (StateSync::Whole, "second, longer"),
            (StateSync::Durable, "3rd"),
        ] {
            dir.replace_state_file("record", text.as_bytes(), sync)
                .unwrap();
            let read = std::fs::read_to_string(dir.state_path("record")).unwrap();
            assert_eq!(read, text, "{sync:?}");
            assert!(!dir.state_path("record.tmp").exists(), "{sync:?}");
        }
        // A state dir that is gone: the error says which file could not be written.
        std::fs::remove_dir_all(dir.state_path("")).unwrap();
        let e = dir
            .replace_state_file("record", b"x", StateSync::Durable)
            .unwrap_err();
        let path = dir.state_path("record");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot write {}: ", path.display())),
            "{e}"
        );
    }

    #[test]
    fn clear_temps_empties_the_temp_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let _ = dir.create_temp(&p("x")).unwrap();
        dir.clear_temps().unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path().join(".ferry/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
