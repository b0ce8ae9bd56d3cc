//! Caches of open files: a leader connection's files to ship payloads from, a follower's files
//! to write into. Reopening a file for every payload would cost an open (a path resolved
//! beneath the data dir) per append; keeping every file open would run into the limit of open
//! files of a data dir of many. So each cache keeps at most its own maximum, and all of a
//! process's caches together at most half its limit of open files (its soft RLIMIT_NOFILE,
//! read at the first cache's first file and again whenever the share is taken, so a limit an
//! embedder raises later counts): the other half stays for everything else that opens
//! a file (the connections' sockets, the watcher's looks, a checkpoint's or a held record's
//! save, the sync threads), which a full cache would otherwise fail with EMFILE. A cache that
//! the process's share keeps from growing closes one of its own files for each it opens; one
//! with none keeps its file anyway, so each cache holds at least the file it is using (one
//! over the share for each cache, at most). Said once, the first time the share stops a cache.
//!
//! `paths::open_making_room` stays behind it: descriptors held by other code can still meet the
//! limit, and then the cache is emptied and the open tried again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::paths::RelPath;

/// The files every cache of a process keeps open, and how many they may.
struct Pool {
    held: AtomicUsize,
    /// The process's soft limit of open files as last read (0: never read), whose half is the
    /// share (`share_of`). Read at the first file kept, and again whenever the share is taken:
    /// an embedder that raises its limit after its leader started gets the larger share.
    limit: AtomicU64,
    /// How the limit is read: the process's soft RLIMIT_NOFILE, `None` when it cannot be read
    /// (then the share read before stays; with none, caches are bounded only by their own).
    read_limit: fn() -> Option<u64>,
    warned: AtomicBool,
}

/// The process's pool, which every cache draws from.
static PROCESS: Pool = Pool::new(|| open_files_limit().map(|l| l.rlim_cur));

/// The process's limit of open files (RLIMIT_NOFILE), `None` when getrlimit fails.
fn open_files_limit() -> Option<libc::rlimit> {
    // SAFETY: rlimit is plain data, which getrlimit only writes; `lim` lives across the call.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0).then_some(lim)
    }
}

/// Raises the soft limit of open files to the hard one, as `ferry`'s processes do at start: a
/// leader holds a socket per follower (and per stray connection) plus files, and 1024, a common
/// soft default, is easy to reach.
pub fn raise_open_files_limit() {
    if let Some(mut lim) = open_files_limit().filter(|l| l.rlim_cur < l.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads `lim`, a valid rlimit that lives across the call.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Files every cache of a process together may keep open under a soft limit of `limit`: half of
/// it, at least 1; unbounded when the limit was never read (0).
fn share_of(limit: u64) -> usize {
    match limit {
        0 => usize::MAX,
        limit => usize::try_from(limit / 2).unwrap_or(usize::MAX).max(1),
    }
}

impl Pool {
    const fn new(read_limit: fn() -> Option<u64>) -> Pool {
        Pool {
            held: AtomicUsize::new(0),
            limit: AtomicU64::new(0),
            read_limit,
            warned: AtomicBool::new(false),
        }
    }

    /// Reads the limit again and returns the share it leaves (the one read before when it
    /// cannot be read; unbounded when none ever was).
    fn read_share(&self) -> usize {
        if let Some(limit) = (self.read_limit)() {
            // At least 1: 0 stands for never read.
            self.limit.store(limit.max(1), Ordering::Relaxed);
        }
        share_of(self.limit.load(Ordering::Relaxed))
    }

    fn take_within(&self, files_max: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < files_max).then_some(held + 1)
            })
            .is_ok()
    }

    /// Takes one file of the share, if one is left. At the share, the limit is read again
    /// first (a system call for each file opened there: far less than the open it goes with).
    fn try_take(&self) -> bool {
        let files_max = match self.limit.load(Ordering::Relaxed) {
            0 => self.read_share(),
            limit => share_of(limit),
        };
        if self.take_within(files_max) {
            return true;
        }
        let now = self.read_share();
        now != files_max && self.take_within(now)
    }

    fn take_over(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    fn give_back(&self, files: usize) {
        self.held.fetch_sub(files, Ordering::Relaxed);
    }

    /// Said once: the share stopped a cache from growing.
    fn warn_share_reached(&self, cache_files_max: usize) {
        if self.warned.swap(true, Ordering::Relaxed) {
            return;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let files_max = share_of(limit);
        tracing::warn!(
            "the limit of open files ({limit}) leaves room to keep {files_max} files open (half of \
             it) to read from or write into, where each connection would keep up to \
             {cache_files_max}: the others are reopened as needed (slower). Raise the limit \
             (`ulimit -n`, systemd's LimitNOFILE=); only logged once"
        );
    }
}

/// Open files by path, `V` holding the file (with what the owner keeps beside it); see the
/// module's doc for how many.
pub struct KeptOpen<V> {
    files: HashMap<RelPath, V>,
    /// How many this cache keeps at most, the pool's share allowing.
    files_max: usize,
    pool: &'static Pool,
}

impl<V> KeptOpen<V> {
    /// A cache of at most `files_max` files, drawing from the process's pool.
    pub fn new(files_max: usize) -> KeptOpen<V> {
        KeptOpen::in_pool(files_max, &PROCESS)
    }

    fn in_pool(files_max: usize, pool: &'static Pool) -> KeptOpen<V> {
        KeptOpen {
            files: HashMap::new(),
            files_max: files_max.max(1),
            pool,
        }
    }

    pub fn get(&self, path: &RelPath) -> Option<&V> {
        self.files.get(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Keeps `file` open as `path`'s, in place of the one it held if any. A full cache is
    /// emptied first; one the pool's share stops from growing closes one of its own files.
    pub fn insert(&mut self, path: RelPath, file: V) {
        if let Some(old) = self.files.get_mut(&path) {
            *old = file;
            return;
        }
        if self.files.len() >= self.files_max {
            self.clear();
        }
        if !self.pool.try_take() {
            self.pool.warn_share_reached(self.files_max);
            // One of its own makes room; a cache holding none keeps its file anyway (the one
            // it is about to use).
            match self.files.keys().next().cloned() {
                Some(evicted) => drop(self.files.remove(&evicted)),
                None => self.pool.take_over(),
            }
        }
        self.files.insert(path, file);
    }

    pub fn remove(&mut self, path: &RelPath) -> Option<V> {
        let removed = self.files.remove(path);
        if removed.is_some() {
            self.pool.give_back(1);
        }
        removed
    }

    /// Closes every file kept.
    pub fn clear(&mut self) {
        self.pool.give_back(self.files.len());
        self.files.clear();
    }
}

impl<V> Drop for KeptOpen<V> {
    fn drop(&mut self) {
        self.pool.give_back(self.files.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool whose share is `files_max`, and whose limit cannot be read again.
    fn pool(files_max: usize) -> &'static Pool {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(|| None)));
        pool.limit.store(2 * files_max as u64, Ordering::Relaxed);
        pool
    }

    fn p(i: usize) -> RelPath {
        RelPath::new(&format!("q/{i}")).unwrap()
    }

    fn held(pool: &Pool) -> usize {
        pool.held.load(Ordering::Relaxed)
    }

    #[test]
    fn caches_together_keep_no_more_than_the_share_and_each_at_least_the_file_it_uses() {
        let pool = pool(4);
        let mut a = KeptOpen::in_pool(256, pool);
        for i in 0..4 {
            a.insert(p(i), i);
        }
        assert_eq!((a.len(), held(pool)), (4, 4));
        // The share is taken: a fifth file of the same cache closes one of its own.
        a.insert(p(4), 4);
        assert_eq!((a.len(), held(pool)), (4, 4));
        assert!(a.get(&p(4)).is_some());
        // Another cache keeps the one file it uses, and no more while the share is taken.
        let mut b = KeptOpen::in_pool(256, pool);
        b.insert(p(10), 10);
        b.insert(p(11), 11);
        assert_eq!((b.len(), held(pool)), (1, 5));
        assert!(b.get(&p(11)).is_some());
        // What a cache closes or drops goes back to the share.
        assert_eq!(a.remove(&p(4)), Some(4));
        assert_eq!(a.remove(&p(4)), None);
        assert_eq!(held(pool), 4);
        drop(a);
        assert_eq!(held(pool), 1);
        b.insert(p(12), 12);
        assert_eq!((b.len(), held(pool)), (2, 2));
        b.clear();
        assert_eq!(held(pool), 0);
    }

    /// The limit the pool of the test below reads: only that test's.
    static RAISED_LIMIT: AtomicU64 = AtomicU64::new(8);

    #[test]
    fn a_limit_raised_after_the_first_file_kept_widens_the_share_once_it_is_reached() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(|| {
            Some(RAISED_LIMIT.load(Ordering::Relaxed))
        })));
        let mut c = KeptOpen::in_pool(256, pool);
        for i in 0..5 {
            c.insert(p(i), i);
        }
        assert_eq!((c.len(), held(pool)), (4, 4));
        RAISED_LIMIT.store(20, Ordering::Relaxed);
        for i in 5..20 {
            c.insert(p(i), i);
        }
        assert_eq!((c.len(), held(pool)), (10, 10));
        // Lowered, it holds the caches to the new share as they open more.
        RAISED_LIMIT.store(12, Ordering::Relaxed);
        c.insert(p(20), 20);
        assert_eq!((c.len(), held(pool)), (10, 10));
        c.clear();
        for i in 0..10 {
            c.insert(p(i), i);
        }
        assert_eq!((c.len(), held(pool)), (6, 6));
    }

    #[test]
    fn a_cache_at_its_own_maximum_is_emptied_and_a_path_kept_again_counts_once() {
        let pool = pool(100);
        let mut c = KeptOpen::in_pool(3, pool);
        for i in 0..3 {
            c.insert(p(i), i);
        }
        c.insert(p(2), 20);
        assert_eq!((c.len(), held(pool)), (3, 3));
        assert_eq!(c.get(&p(2)), Some(&20));
        c.insert(p(3), 3);
        assert_eq!((c.len(), held(pool)), (1, 1));
    }
}
