//! What the next `synced` round must make durable: the files written or truncated since the
//! last round began, and the directories whose entries changed (a file created, renamed into
//! place or deleted), exactly those. Each fsync costs the disk a cache flush: a segment rolled
//! over in `vhost/queue/` pays for that directory, not for every ancestor up to the root. And
//! syncing these rather than syncfs(2) of the whole filesystem leaves other writers' dirty pages
//! alone: on a shared disk (the leader's own copy on the same machine, a broker's other files)
//! syncfs paid for all of them.

use std::collections::HashSet;
use std::io;

use crate::paths::{DataDir, DirsChanged, RelPath};

#[derive(Default, Debug, Clone)]
pub struct Dirty {
    files: HashSet<RelPath>,
    dirs: HashSet<String>,
}

impl Dirty {
    /// `path`'s data or length changed.
    pub fn file(&mut self, path: &RelPath) {
        if !self.files.contains(path) {
            self.files.insert(path.clone());
        }
    }

    /// The file at `from` was renamed to `to`: if its data was to be synced, it is synced there.
    pub fn renamed(&mut self, from: &RelPath, to: &RelPath) {
        if self.files.remove(from) {
            self.files.insert(to.clone());
        }
    }

    /// The entries of `dirs` changed (a file or directory in them created, renamed into place
    /// or deleted: `DataDir` says which).
    pub fn dirs_changed(&mut self, dirs: DirsChanged) {
        self.dirs.extend(dirs);
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Adds what `other` noted (a failed round, retried with the next).
    pub fn merge(&mut self, other: Dirty) {
        self.files.extend(other.files);
        self.dirs.extend(other.dirs);
    }

    /// Everything noted so far, leaving this empty for the next round.
    pub fn take(&mut self) -> Dirty {
        std::mem::take(self)
    }

    /// The files noted, sorted.
    #[cfg(test)]
    pub fn files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = self.files.iter().map(RelPath::as_str).collect();
        files.sort_unstable();
        files
    }

    /// The directories noted, sorted.
    #[cfg(test)]
    pub fn dirs(&self) -> Vec<&str> {
        let mut dirs: Vec<&str> = self.dirs.iter().map(String::as_str).collect();
        dirs.sort_unstable();
        dirs
    }

    /// fdatasync of every file, then fsync of every directory.
    pub fn sync(&self, dir: &DataDir) -> io::Result<()> {
        dir.sync_paths(&self.files, self.dirs.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_skips_a_file_deleted_since_and_syncs_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let kept = RelPath::new("q/kept").unwrap();
        let gone = RelPath::new("q/gone").unwrap();
        for p in [&kept, &gone] {
            use std::io::Write;
            dir.open_write(p).unwrap().0.write_all(b"x").unwrap();
        }
        let mut d = Dirty::default();
        for p in [&kept, &gone] {
            d.file(p);
        }
        d.dirs_changed(vec!["q".to_string()]);
        dir.remove(&gone).unwrap();
        let round = d.take();
        assert!(d.is_empty());
        round.sync(&dir).unwrap();
    }
}
