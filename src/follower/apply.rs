//! The only code that writes into a follower's data dir: it turns the session's actions into
//! file operations through `DataDir`, which refuses any path that escapes the dir.
//!
//! Whole-file transfers go into temp files under `DIR/.ferry/tmp/` and are renamed over the real
//! name only once complete, so a torn file never appears under its real name. Open files are
//! cached per path (dropped when the path is renamed over or deleted, since the cached fd would
//! then point at the old inode).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use super::Dirty;
use crate::kept_open::KeptOpen;
use crate::paths::{DataDir, RelPath, TempFile};
use crate::session::follower::FollowerAction;
use crate::session::SessionError;

/// Open files kept per connection, where the limit of open files allows (`kept_open`).
const OPEN_FILES_MAX: usize = 256;

pub struct Apply {
    dir: Arc<DataDir>,
    open: KeptOpen<File>,
    temps: HashMap<RelPath, TempFile>,
    /// What the next sync round must make durable (shared with the sync task).
    dirty: Rc<RefCell<Dirty>>,
    /// fdatasync a whole file's temp copy before renaming it over an existing copy (`synced`
    /// followers): after a power loss the name then holds the old copy or the complete new one,
    /// never a renamed but unwritten file.
    sync_before_commit: bool,
}

/// Maps a disk error on `path` to what the leader is told: BAD_PATH for an escape, else IO.
pub fn disk_error(what: &str, path: &RelPath, e: io::Error) -> SessionError {
    if crate::paths::is_escape(&e) {
        SessionError::BadPath(format!("refusing to {what} {path}: {e}"))
    } else {
        SessionError::Io(format!("cannot {what} {path}: {e}"))
    }
}

impl Apply {
    pub fn new(dir: Arc<DataDir>, dirty: Rc<RefCell<Dirty>>, sync_before_commit: bool) -> Apply {
        Apply {
            dir,
            open: KeptOpen::new(OPEN_FILES_MAX),
            temps: HashMap::new(),
            dirty,
            sync_before_commit,
        }
    }

    /// `path` (under its real name) changes: a payload is about to be written into it, or the
    /// inventory cut it to what its record vouches for. The next `synced` round makes it durable.
    pub fn note_changed(&mut self, path: &RelPath) {
        self.dirty.borrow_mut().file(path);
    }

    /// Everything noted since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        self.dirty.borrow_mut().take()
    }

    /// The file a `Write` action's payload goes to.
    pub fn file_for_write(&mut self, path: &RelPath, temp: bool) -> Result<&File, SessionError> {
        if temp {
            return match self.temps.get(path) {
                Some(t) => Ok(&t.file),
                None => Err(SessionError::Io(format!("no temp file open for {path}"))),
            };
        }
        if self.open.get(path).is_none() {
            let (file, changed) = self
                .making_room(|dir| dir.open_write(path))
                .map_err(|e| disk_error("write", path, e))?;
            self.dirty.borrow_mut().dirs_changed(changed);
            self.open.insert(path.clone(), file);
        }
        match self.open.get(path) {
            Some(f) => Ok(f),
            None => Err(SessionError::Io(format!(
                "{path} vanished from the open-file cache"
            ))),
        }
    }

    /// Calls `open` on the data dir, which opens a file or a directory, through
    /// `paths::open_making_room`: with no descriptor left in the process, the cache of files
    /// open for writing is emptied and `open` called once more.
    fn making_room<T>(&mut self, open: impl Fn(&DataDir) -> io::Result<T>) -> io::Result<T> {
        let (cache, dir) = (&mut self.open, &self.dir);
        crate::paths::open_making_room(cache.len(), || cache.clear(), || open(dir))
    }

    /// Removes an abandoned temp copy of `path`. A failure only leaves a stray file in
    /// `.ferry/tmp/` (removed at the next start), so it is logged, not fatal.
    fn discard(&self, temp: TempFile, path: &RelPath) {
        if let Err(e) = self.dir.discard_temp(temp) {
            tracing::warn!("cannot remove the abandoned temp copy of {path}: {e}");
        }
    }

    /// Renames `temp`, a complete copy of `path` (`len_bytes`), over the copy held: synced
    /// first on a `synced` follower. Only over a copy held: a new name holds nothing that was
    /// acked, and syncing each new file here would stall the stream (a full sync would wait
    /// for the disk file by file instead of once at the end).
    fn replace_held(
        &mut self,
        temp: &TempFile,
        path: &RelPath,
        len_bytes: u64,
    ) -> Result<crate::paths::DirsChanged, SessionError> {
        let held = self.dir.open_read(path).and_then(|f| f.metadata()).ok();
        if let Some(held) = &held {
            tracing::info!(
                "replacing {path} ({} bytes) with the leader's copy ({len_bytes} bytes)",
                held.len()
            );
        }
        if self.sync_before_commit && held.is_some() {
            temp.file
                .sync_data()
                .map_err(|e| disk_error("sync the temp file of", path, e))?;
        }
        self.making_room(|dir| dir.commit_temp(temp, path))
            .map_err(|e| disk_error("rename into place", path, e))
    }

    /// Applies every action but `Write` (payload), `Inventory` and `Mark` (the driver's).
    pub fn apply(&mut self, action: FollowerAction) -> Result<(), SessionError> {
        match action {
            FollowerAction::BeginWhole { path, .. } => {
                let temp = self
                    .making_room(|dir| dir.create_temp(&path))
                    .map_err(|e| disk_error("create a temp file for", &path, e))?;
                // A transfer of the same file started over: the earlier copy is not needed.
                if let Some(old) = self.temps.insert(path.clone(), temp) {
                    self.discard(old, &path);
                }
            }
            FollowerAction::CommitWhole { path, len_bytes } => {
                let Some(temp) = self.temps.remove(&path) else {
                    return Err(SessionError::Io(format!("no temp file open for {path}")));
                };
                let have = temp
                    .file
                    .metadata()
                    .map_err(|e| disk_error("stat the temp file of", &path, e))?
                    .len();
                if have != len_bytes {
                    return Err(SessionError::OutOfOrder {
                        frame: "COMMIT_WHOLE",
                        why: format!("{path}: the temp file holds {have} bytes, BEGIN_WHOLE said {len_bytes}"),
                    });
                }
                self.open.remove(&path);
                let committed = self
                    .making_room(|dir| dir.commit_temp_if_new(&temp, &path))
                    .map_err(|e| disk_error("rename into place", &path, e))?;
                let changed = match committed {
                    Some(changed) => changed,
                    None => self.replace_held(&temp, &path, len_bytes)?,
                };
                drop(temp);
                let mut dirty = self.dirty.borrow_mut();
                dirty.file(&path);
                dirty.dirs_changed(changed);
            }
            FollowerAction::Truncate { path, len_bytes } => {
                // A copy longer than the leader's: its tail was never part of what this leader
                // replicated (a former leader's unreplicated writes). Say what is discarded.
                if let Ok(held) = self.dir.open_read(&path).and_then(|f| f.metadata()) {
                    if held.len() > len_bytes {
                        tracing::warn!(
                            "discarding {} bytes of {path} beyond the leader's copy ({} bytes kept)",
                            held.len() - len_bytes,
                            len_bytes
                        );
                    }
                }
                self.making_room(|dir| dir.truncate(&path, len_bytes))
                    .map_err(|e| disk_error("truncate", &path, e))?;
                self.dirty.borrow_mut().file(&path);
            }
            FollowerAction::Delete { path } => {
                if self.dir.open_read(&path).is_ok() {
                    tracing::info!("removing {path}: the leader does not have it");
                }
                self.open.remove(&path);
                // A whole-file transfer of `path` the leader gave up on ends here.
                if let Some(temp) = self.temps.remove(&path) {
                    self.discard(temp, &path);
                }
                let changed = self
                    .making_room(|dir| dir.remove(&path))
                    .map_err(|e| disk_error("delete", &path, e))?;
                self.dirty.borrow_mut().dirs_changed(changed);
            }
            FollowerAction::Rename { from, to } => {
                if self.sync_before_commit {
                    // A sync round taken before this rename names the file by its old path,
                    // where it no longer is, and skips it: its data is made durable here.
                    self.dir
                        .open_read(&from)
                        .and_then(|f| f.sync_data())
                        .map_err(|e| disk_error("sync before renaming", &from, e))?;
                }
                self.open.remove(&from);
                self.open.remove(&to);
                // A whole-file transfer of `to` the leader gave up on ends here.
                if let Some(temp) = self.temps.remove(&to) {
                    self.discard(temp, &to);
                }
                let changed = self
                    .making_room(|dir| dir.rename(&from, &to))
                    .map_err(|e| disk_error(&format!("rename {from} to"), &to, e))?;
                tracing::debug!("renamed {from} to {to}, as the leader did");
                let mut dirty = self.dirty.borrow_mut();
                dirty.renamed(&from, &to);
                dirty.dirs_changed(changed);
            }
            FollowerAction::Write { .. }
            | FollowerAction::Inventory { .. }
            | FollowerAction::Mark { .. }
            // Only the held record's (`Births`).
            | FollowerAction::Born { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A RENAME moves the copy, and what the next synced round is to sync moves with it; one
    /// of a file this copy does not hold is an I/O error naming it (the leader's view of the
    /// copy is wrong: the next connection's inventory finds what it holds).
    #[test]
    fn a_rename_moves_the_copy_and_its_pending_sync_and_a_missing_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(DataDir::open(tmp.path()).unwrap());
        let mut apply = Apply::new(dir, Rc::default(), true);
        let p = |s: &str| RelPath::new(s).unwrap();
        apply
            .file_for_write(&p("t-0/00.log"), false)
            .unwrap()
            .write_all_at(b"segment", 0)
            .unwrap();
        apply.note_changed(&p("t-0/00.log"));
        let rename = |from: &str, to: &str| FollowerAction::Rename {
            from: p(from),
            to: p(to),
        };
        apply.apply(rename("t-0/00.log", "t-0.x/00.log")).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("t-0.x/00.log")).unwrap(),
            b"segment"
        );
        let round = apply.take_dirty();
        assert_eq!(round.files(), ["t-0.x/00.log"]);
        assert_eq!(round.dirs(), ["", "t-0", "t-0.x"]);
        let err = apply.apply(rename("t-0/00.log", "b")).unwrap_err();
        assert!(matches!(err, SessionError::Io(_)), "{err:?}");
        assert!(err.to_string().contains("t-0/00.log"), "{err}");
    }

    fn temp_files(root: &std::path::Path) -> usize {
        std::fs::read_dir(root.join(".ferry/tmp")).map_or(0, |d| d.count())
    }

    /// A synced round fsyncs a directory only where an entry in it changed: a segment written
    /// again costs no directory sync, and a new one in a nested layout (a vhost, a queue, its
    /// segments) costs its own directory, not every ancestor up to the root.
    #[test]
    fn a_round_syncs_only_the_directories_whose_entries_changed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("vh/q1")).unwrap();
        std::fs::write(tmp.path().join("vh/q1/seg.0"), b"").unwrap();
        let dir = Arc::new(DataDir::open(tmp.path()).unwrap());
        let mut apply = Apply::new(dir, Rc::default(), false);
        let p = |s: &str| RelPath::new(s).unwrap();
        let dirs_of_round = |apply: &mut Apply| {
            let round = apply.take_dirty();
            round
                .dirs()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        };

        apply.file_for_write(&p("vh/q1/seg.0"), false).unwrap();
        assert_eq!(
            dirs_of_round(&mut apply),
            Vec::<String>::new(),
            "an existing file"
        );
        apply.file_for_write(&p("vh/q1/seg.1"), false).unwrap();
        assert_eq!(dirs_of_round(&mut apply), ["vh/q1"], "a new file");
        apply.file_for_write(&p("vh/q2/seg.0"), false).unwrap();
        assert_eq!(
            dirs_of_round(&mut apply),
            ["vh", "vh/q2"],
            "a new directory"
        );
        apply.file_for_write(&p("top/a/seg.0"), false).unwrap();
        assert_eq!(
            dirs_of_round(&mut apply),
            ["", "top", "top/a"],
            "new directories"
        );

        // A whole file renamed into place, over an old copy or not: its directory.
        for name in ["vh/q1/meta.json", "vh/q1/meta.json", "vh/q3/meta.json"] {
            apply
                .apply(FollowerAction::BeginWhole {
                    path: p(name),
                    len_bytes: 0,
                })
                .unwrap();
            apply
                .apply(FollowerAction::CommitWhole {
                    path: p(name),
                    len_bytes: 0,
                })
                .unwrap();
        }
        assert_eq!(dirs_of_round(&mut apply), ["vh", "vh/q1", "vh/q3"]);

        // A delete: its directory, and the parent of each directory it left empty and removed.
        apply
            .apply(FollowerAction::Delete {
                path: p("vh/q1/seg.1"),
            })
            .unwrap();
        assert_eq!(dirs_of_round(&mut apply), ["vh/q1"]);
        apply
            .apply(FollowerAction::Delete {
                path: p("top/a/seg.0"),
            })
            .unwrap();
        assert_eq!(dirs_of_round(&mut apply), ["", "top", "top/a"]);
        assert!(!tmp.path().join("top").exists());
    }

    #[test]
    fn abandoned_whole_file_transfers_leave_no_temp_file_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(DataDir::open(tmp.path()).unwrap());
        let mut apply = Apply::new(dir, Rc::default(), false);
        let path = RelPath::new("q/meta.json").unwrap();
        let begin = || FollowerAction::BeginWhole {
            path: path.clone(),
            len_bytes: 10,
        };
        apply.apply(begin()).unwrap();
        apply
            .file_for_write(&path, true)
            .unwrap()
            .write_all_at(b"12345", 0)
            .unwrap();
        assert_eq!(temp_files(tmp.path()), 1);
        // Started over (the file changed during its transfer): one temp file, not two.
        apply.apply(begin()).unwrap();
        assert_eq!(temp_files(tmp.path()), 1);
        // Given up on (the file vanished on the leader): none.
        apply
            .apply(FollowerAction::Delete { path: path.clone() })
            .unwrap();
        assert_eq!(temp_files(tmp.path()), 0);
        // A transfer that completes still commits.
        apply.apply(begin()).unwrap();
        apply
            .file_for_write(&path, true)
            .unwrap()
            .write_all_at(b"0123456789", 0)
            .unwrap();
        apply
            .apply(FollowerAction::CommitWhole {
                path: path.clone(),
                len_bytes: 10,
            })
            .unwrap();
        assert_eq!(temp_files(tmp.path()), 0);
        assert_eq!(
            std::fs::read(tmp.path().join("q/meta.json")).unwrap(),
            b"0123456789"
        );
    }
}
