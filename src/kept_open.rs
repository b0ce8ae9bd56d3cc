//! Caches of open files: a leader connection's files to ship payloads from, a follower's files
//! to write into. Reopening a file for every payload would cost an open (a path resolved
//! beneath the data dir) per append; keeping every file open would run into the limit of open
//! files of a data dir of many. So each cache keeps at most its own maximum, and all of a
//! process's caches together at most half its limit of open files (its soft RLIMIT_NOFILE,
//! read at the first cache's first file): the other half stays for everything else that opens
//! a file (the connections' sockets, the watcher's looks, a checkpoint's or a held record's
//! save, the sync threads), which a full cache would otherwise fail with EMFILE. A cache that
//! the process's share keeps from growing closes one of its own files for each it opens; one
//! with none keeps its file anyway, so each cache holds at least the file it is using (one
//! over the share for each cache, at most). Said once, the first time the share stops a cache.
//!
//! `paths::open_making_room` stays behind it: descriptors held by other code can still meet the
//! limit, and then the cache is emptied and the open tried again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::paths::RelPath;

/// The files every cache of a process keeps open, and how many they may.
struct Pool {
    held: AtomicUsize,
    /// Half the process's limit of open files, as it was at the first file kept.
    share: OnceLock<Share>,
    warned: AtomicBool,
}

/// The process's pool, which every cache draws from.
static PROCESS: Pool = Pool::new();

#[derive(Debug, Clone, Copy)]
struct Share {
    /// The soft limit of open files; `None` when getrlimit failed (no share then).
    limit: Option<u64>,
    /// Files every cache together keeps open at most.
    files_max: usize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            held: AtomicUsize::new(0),
            share: OnceLock::new(),
            warned: AtomicBool::new(false),
        }
    }

    fn share(&self) -> Share {
        *self.share.get_or_init(|| {
            // SAFETY: rlimit is plain data, which getrlimit only writes.
            let limit = unsafe {
                let mut lim: libc::rlimit = std::mem::zeroed();
                (libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0).then_some(lim.rlim_cur)
            };
            let files_max = limit.map_or(usize::MAX, |l| {
                usize::try_from(l / 2).unwrap_or(usize::MAX).max(1)
            });
            Share { limit, files_max }
        })
    }

    /// Takes one file of the share, if one is left.
    fn try_take(&self) -> bool {
        let files_max = self.share().files_max;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < files_max).then_some(held + 1)
            })
            .is_ok()
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
        let Share { limit, files_max } = self.share();
        tracing::warn!(
            "the limit of open files ({}) leaves room to keep {files_max} files open (half of \
             it) to read from or write into, where each connection would keep up to \
             {cache_files_max}: the others are reopened as needed (slower). Raise the limit \
             (`ulimit -n`, systemd's LimitNOFILE=); only logged once",
            limit.unwrap_or(0)
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

    fn pool(files_max: usize) -> &'static Pool {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let share = Share {
            limit: Some(2 * files_max as u64),
            files_max,
        };
        assert!(pool.share.set(share).is_ok());
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
