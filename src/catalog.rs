//! The leader's live table of what it replicates: each file's logical length and generation, and
//! the leader's position counter (`docs/PROTOCOL.md`, *Positions*); and how a session's copy of
//! it is kept in step.
//!
//! The logical length is what followers must hold. It comes from the change sources (the library
//! API or the inotify watcher), not from stat(2), because a broker's mmap'd segment is
//! preallocated: its size on disk says nothing about how much of it is written.
//! A generation changes whenever a file is replaced as a whole, so a follower copy of an older
//! generation is re-sent whole instead of being appended to.
//!
//! The writer and the follower sessions run on different CPUs. Every cache line a session writes,
//! or reads after the writer wrote it, comes back to the writer's CPU at the writer's next
//! `append` (hundreds of nanoseconds each on the VMs measured). So a session never reads the
//! writer's table for a known file: the writer numbers every file (`FileId`) and hands each
//! session a `ChangeList` of `(id, entry)` pairs, and the session keeps a detached copy, whose
//! paths share no allocation (no reference count) with the writer's.

use std::collections::{BTreeMap, HashMap};

use crate::frame::{MAX_FILE_BYTES, MAX_POSITION};
use crate::paths::{PathError, RelPath};

const _: () = assert!(
    MAX_FILE_BYTES == MAX_POSITION,
    "Catalog::append's test relies on it"
);

/// A change the catalog refuses; it changed nothing. The length refusals carry their text
/// only (made where they are refused, out of the writer's way): with their figures as fields
/// the larger `Result` cost every `append` 6 ns of 34 (`cargo bench --bench append --
/// no_follower`), copies through the stack that the CPU could not forward.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Path(#[from] PathError),
    /// `offset + len_bytes` is above `MAX_FILE_BYTES` (or past 2^64).
    #[error("{0}")]
    TooLong(Box<str>),
    /// The change would take the position above `MAX_POSITION`.
    #[error("{0}")]
    PositionExhausted(Box<str>),
}

/// `position` plus `added` (a change to `path`), unless that passes `MAX_POSITION`.
fn position_after(path: &str, position: u64, added: u64) -> Result<u64, CatalogError> {
    match position.checked_add(added) {
        Some(after) if after <= MAX_POSITION => Ok(after),
        _ => Err(past_max_position(path, position, added)),
    }
}

/// The refusal of a change to `path` that adds `added` to `position`, past `MAX_POSITION`.
fn past_max_position(path: &str, position: u64, added: u64) -> CatalogError {
    CatalogError::PositionExhausted(
        format!(
            "{path}: the change adds {added} to the position {position}, which would pass \
             MAX_POSITION ({MAX_POSITION}): lengths reported wrong?"
        )
        .into(),
    )
}

/// `Err` unless `files` (path and length, what a catalog starts with: `Catalog::new`) are each
/// within `MAX_FILE_BYTES` and start the position within `MAX_POSITION`.
pub fn check_start(files: &[(RelPath, u64)]) -> Result<(), CatalogError> {
    let mut position = 0;
    for (path, len_bytes) in files {
        within_a_file(path.as_str(), 0, *len_bytes)?;
        position = position_after(path.as_str(), position, *len_bytes)?;
    }
    Ok(())
}

/// `Err` unless `len_bytes` at `offset` ends within `MAX_FILE_BYTES`.
fn within_a_file(path: &str, offset: u64, len_bytes: u64) -> Result<u64, CatalogError> {
    match offset.checked_add(len_bytes) {
        Some(end) if end <= MAX_FILE_BYTES => Ok(end),
        _ => Err(CatalogError::TooLong(
            format!(
                "{path}: {len_bytes} bytes at offset {offset} would end above the largest file \
                 Linux allows ({MAX_FILE_BYTES} bytes, MAX_FILE_BYTES): a length or offset \
                 reported wrong?"
            )
            .into(),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    pub len_bytes: u64,
    pub generation: u64,
    /// The position this generation was born at (`docs/PROTOCOL.md`, *Positions*): right after
    /// the change that began it, or one more if that change added no position; 0 for the files
    /// the catalog started with. A MARK at or above it was sent after that change shipped.
    pub born_at: u64,
    /// This generation began with an append (a file created in place and grown), not whole: a
    /// prefix of it is a state the file went through, so a follower without a copy may get it
    /// as DATA under its real name (`docs/PROTOCOL.md`, *Sequence*).
    pub born_by_append: bool,
}

/// Where a generation begun by a change of `len_bytes` at position `since` is born.
fn born_at(since: u64, len_bytes: u64) -> u64 {
    since.saturating_add(len_bytes.max(1))
}

/// What a leader's record vouches for of a file (`docs/PROTOCOL.md`, *The leader's record*): its
/// logical length and birth when the leader stopped, the file on disk unchanged since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub len_bytes: u64,
    pub born_at: u64,
}

impl Kept {
    /// What a record keeps of a catalog's `entry`.
    pub fn of(entry: &CatalogEntry) -> Kept {
        Kept {
            len_bytes: entry.len_bytes,
            born_at: entry.born_at,
        }
    }
}

/// A file's number in a catalog: given when its path first appears (or appears again after a
/// delete), never reused, the same in every copy of that catalog.
pub type FileId = u64;

/// A file's state after a change: `None` once deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChange {
    pub id: FileId,
    pub entry: Option<CatalogEntry>,
    /// The catalog's position just before the change (in a `ChangeList`, before the first of
    /// the file's changes it holds): every change at or below it was made before this one.
    pub since: u64,
}

/// A rename the catalog recorded (`Catalog::rename`): generation `from_generation` of `from`
/// became generation `generation` of `to`, the same bytes. A session that sent its follower
/// that generation of `from`, as long as it is in the catalog, may move the follower's copy
/// rather than ship it again (`docs/PROTOCOL.md`, *Renames*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: RelPath,
    pub to: RelPath,
    pub from_generation: u64,
    pub generation: u64,
}

/// What `Catalog::rename` changed: `from` deleted, `to` a new generation, and the move.
#[derive(Debug, Clone)]
pub struct Renamed {
    pub from: FileChange,
    pub to: FileChange,
    pub moved: Move,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: FileId,
    entry: CatalogEntry,
    /// In `Catalog::listed` (false in a detached copy).
    listed: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    files: HashMap<RelPath, Slot>,
    /// The path of every file in `files`, by id (in id order, for `take_part`).
    paths: BTreeMap<FileId, RelPath>,
    position: u64,
    generation_next: u64,
    id_next: FileId,
    /// The files changed since the last `take_listed`, each once, while a reader takes them
    /// (`start_listing`): the checkpoint thread, every few seconds. Marking a file is one flag
    /// in the entry the change writes anyway, where a list of changes would copy the entry
    /// at every change, as each session's inbox does.
    listed: Option<Vec<FileId>>,
}

/// Files taken from a catalog by `take_part`, under the writers' lock, for `add_part` to copy
/// outside it.
#[derive(Debug, Default)]
pub struct CatalogPart {
    files: Vec<(RelPath, Slot)>,
    position: u64,
}

impl Catalog {
    /// A catalog of `files` (path, length); the position starts at the sum of their lengths.
    pub fn new(files: impl IntoIterator<Item = (RelPath, u64)>) -> Catalog {
        let mut catalog = Catalog::default();
        for (path, len_bytes) in files {
            catalog.position += len_bytes;
            let entry = CatalogEntry {
                len_bytes,
                generation: catalog.next_generation(),
                born_at: 0,
                born_by_append: false,
            };
            // A path listed twice: the last length stands, under one id.
            match catalog.files.get_mut(&path) {
                Some(slot) => slot.entry = entry,
                None => {
                    catalog.insert(path, entry);
                }
            }
        }
        catalog
    }

    /// The catalog of a leader resuming an instance whose last position was `last_position`:
    /// positions go on from one above it. A file keeps the birth `kept` gives it unless `files`
    /// says it is shorter than then (cut back); every other file is born at the new position,
    /// above every MARK of the instance. Files `kept` vouches for are in it whether or not
    /// `files` lists them: they are as the last run's catalog had them.
    pub fn resumed(
        files: impl IntoIterator<Item = (RelPath, u64)>,
        last_position: u64,
        kept: &HashMap<RelPath, Kept>,
    ) -> Catalog {
        let mut catalog = Catalog {
            position: last_position.saturating_add(1),
            ..Catalog::default()
        };
        let mut listed: HashMap<RelPath, u64> = files.into_iter().collect();
        for (path, k) in kept {
            listed.entry(path.clone()).or_insert(k.len_bytes);
        }
        let mut all: Vec<_> = listed.into_iter().collect();
        all.sort();
        for (path, len_bytes) in all {
            let born_at = match kept.get(&path) {
                Some(k) if len_bytes >= k.len_bytes => k.born_at,
                _ => catalog.position,
            };
            let entry = CatalogEntry {
                len_bytes,
                generation: catalog.next_generation(),
                born_at,
                born_by_append: false,
            };
            catalog.insert(path, entry);
        }
        catalog
    }

    fn next_generation(&mut self) -> u64 {
        self.generation_next += 1;
        self.generation_next
    }

    /// Adds a file not in the catalog under a new id.
    fn insert(&mut self, path: RelPath, entry: CatalogEntry) -> FileId {
        let id = self.id_next;
        self.id_next += 1;
        self.paths.insert(id, path.clone());
        let listed = match self.listed.as_mut() {
            Some(list) => {
                list.push(id);
                true
            }
            None => false,
        };
        self.files.insert(path, Slot { id, entry, listed });
        id
    }

    /// Takes `path`'s file out of the catalog (its id too), listing it as changed.
    fn remove_slot(&mut self, path: &str) -> Option<(RelPath, Slot)> {
        let (path, slot) = self.files.remove_entry(path)?;
        self.paths.remove(&slot.id);
        if !slot.listed {
            if let Some(list) = self.listed.as_mut() {
                list.push(slot.id);
            }
        }
        Some((path, slot))
    }

    /// From now on, lists every file changed (appended to, replaced, created or deleted), for
    /// `take_listed`.
    pub fn start_listing(&mut self) {
        self.stop_listing();
        self.listed = Some(Vec::new());
    }

    /// Lists nothing more, and forgets what it listed.
    pub fn stop_listing(&mut self) {
        for id in self.listed.take().unwrap_or_default() {
            self.unlist(id);
        }
    }

    /// Takes into `into` (emptied first) at most `max_files` of the files changed since they
    /// were last taken (or since `start_listing`), each as it is now: its entry, or `None` once
    /// deleted, with `since` the position now. Returns whether more are left. A detached copy
    /// brought up to date with them (`apply`) is this catalog as to those files.
    pub fn take_listed(&mut self, max_files: usize, into: &mut Vec<FileChange>) -> bool {
        into.clear();
        let Some(list) = self.listed.as_mut() else {
            return false;
        };
        let taken = list.split_off(list.len().saturating_sub(max_files));
        let more = !list.is_empty();
        for id in taken {
            let entry = self.unlist(id);
            into.push(FileChange {
                id,
                entry,
                since: self.position,
            });
        }
        more
    }

    /// Clears the mark of a listed file; its entry, if it is still there.
    fn unlist(&mut self, id: FileId) -> Option<CatalogEntry> {
        let slot = self.files.get_mut(self.paths.get(&id)?)?;
        slot.listed = false;
        Some(slot.entry)
    }

    /// Lists a changed file, unless it is listed already.
    fn list(listed: &mut Option<Vec<FileId>>, slot: &mut Slot) {
        if !slot.listed {
            if let Some(list) = listed.as_mut() {
                list.push(slot.id);
                slot.listed = true;
            }
        }
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn get(&self, path: &RelPath) -> Option<CatalogEntry> {
        self.files.get(path).map(|s| s.entry)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Every file with its entry, sorted by path.
    pub fn snapshot(&self) -> Vec<(RelPath, CatalogEntry)> {
        let mut all: Vec<_> = self
            .files
            .iter()
            .map(|(p, s)| (p.clone(), s.entry))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Why an append of `len_bytes` at `offset` of `path` is refused (it is): past a file's
    /// limit, or else past the position's.
    #[cold]
    #[inline(never)]
    fn refusal(&self, path: &str, offset: u64, len_bytes: u64) -> CatalogError {
        match within_a_file(path, offset, len_bytes) {
            Err(e) => e,
            Ok(_) => past_max_position(path, self.position, len_bytes),
        }
    }

    /// `Err` unless a change to `path` may add `added` to the position: never past
    /// `MAX_POSITION`.
    #[inline]
    fn may_add(&self, path: &str, added: u64) -> Result<(), CatalogError> {
        position_after(path, self.position, added).map(drop)
    }

    /// `len_bytes` new bytes at `offset` of `path` (a file not yet known is created, once
    /// `path` passes `RelPath::check`). The position grows by `len_bytes`.
    pub fn append(
        &mut self,
        path: &str,
        offset: u64,
        len_bytes: u64,
    ) -> Result<FileChange, CatalogError> {
        // The writer's path: both limits in one test, the error made out of line. The third
        // comparison is reached only with `len_bytes <= end <= MAX_FILE_BYTES == MAX_POSITION`,
        // so its subtraction does not wrap.
        let end = offset.wrapping_add(len_bytes);
        if end < offset || end > MAX_FILE_BYTES || self.position > MAX_POSITION - len_bytes {
            return Err(self.refusal(path, offset, len_bytes));
        }
        let change = match self.files.get_mut(path) {
            Some(slot) => {
                slot.entry.len_bytes = slot.entry.len_bytes.max(end);
                Catalog::list(&mut self.listed, slot);
                FileChange {
                    id: slot.id,
                    entry: Some(slot.entry),
                    since: self.position,
                }
            }
            None => {
                let path = RelPath::new(path)?;
                let entry = CatalogEntry {
                    len_bytes: end,
                    generation: self.next_generation(),
                    born_at: born_at(self.position, len_bytes),
                    born_by_append: true,
                };
                let id = self.insert(path, entry);
                FileChange {
                    id,
                    entry: Some(entry),
                    since: self.position,
                }
            }
        };
        self.position += len_bytes;
        Ok(change)
    }

    /// The file was rewritten as a whole and is now `len_bytes` long: a new generation. The
    /// position grows by `len_bytes` (at least 1).
    pub fn replace(&mut self, path: &str, len_bytes: u64) -> Result<FileChange, CatalogError> {
        within_a_file(path, 0, len_bytes)?;
        self.may_add(path, len_bytes.max(1))?;
        let born_at = born_at(self.position, len_bytes);
        let (id, entry) = self.put_whole(path, len_bytes, born_at)?;
        let since = self.position;
        self.position += len_bytes.max(1);
        Ok(FileChange {
            id,
            entry: Some(entry),
            since,
        })
    }

    /// A new generation of `path`, `len_bytes` long and born at `born_at`, not by an append,
    /// over any file there (which keeps its id); a path new to the catalog once it passes
    /// `RelPath::new`. The position is the caller's.
    fn put_whole(
        &mut self,
        path: &str,
        len_bytes: u64,
        born_at: u64,
    ) -> Result<(FileId, CatalogEntry), CatalogError> {
        Ok(match self.files.get_mut(path) {
            Some(slot) => {
                self.generation_next += 1;
                slot.entry = CatalogEntry {
                    len_bytes,
                    generation: self.generation_next,
                    born_at,
                    born_by_append: false,
                };
                Catalog::list(&mut self.listed, slot);
                (slot.id, slot.entry)
            }
            None => {
                let path = RelPath::new(path)?;
                let entry = CatalogEntry {
                    len_bytes,
                    generation: self.next_generation(),
                    born_at,
                    born_by_append: false,
                };
                (self.insert(path, entry), entry)
            }
        })
    }

    /// The file is gone: the position grows by 1. `None` if it was not in the catalog (then
    /// nothing changes, once `path` passes `RelPath::check`).
    pub fn delete(&mut self, path: &str) -> Result<Option<FileChange>, CatalogError> {
        if self.files.contains_key(path) {
            self.may_add(path, 1)?;
        }
        let Some((_, slot)) = self.remove_slot(path) else {
            RelPath::check(path)?;
            return Ok(None);
        };
        let since = self.position;
        self.position += 1;
        Ok(Some(FileChange {
            id: slot.id,
            entry: None,
            since,
        }))
    }

    /// `from` was renamed to `to`, over any file there: `from` is gone, and `to` holds its bytes
    /// as a new generation, born right after the rename and not by an append
    /// (`docs/PROTOCOL.md`, *Renames*). The position grows by 1. `None`, and nothing changes,
    /// when `from` is not in the catalog or is `to` (once both paths pass `RelPath::check`).
    pub fn rename(&mut self, from: &str, to: &str) -> Result<Option<Renamed>, CatalogError> {
        RelPath::check(from)?;
        let to_path = RelPath::new(to)?;
        if from == to || !self.files.contains_key(from) {
            return Ok(None);
        }
        self.may_add(to, 1)?;
        let Some((from_path, old)) = self.remove_slot(from) else {
            return Ok(None);
        };
        let since = self.position;
        // `to` passed `RelPath::new` above: this cannot fail with `from` already taken out.
        let (to_id, entry) = self.put_whole(to, old.entry.len_bytes, born_at(since, 0))?;
        self.position += 1;
        Ok(Some(Renamed {
            from: FileChange {
                id: old.id,
                entry: None,
                since,
            },
            to: FileChange {
                id: to_id,
                entry: Some(entry),
                since,
            },
            moved: Move {
                from: from_path,
                to: to_path,
                from_generation: old.entry.generation,
                generation: entry.generation,
            },
        }))
    }

    /// A copy whose paths have their own allocations, for a session to keep in step with
    /// `apply`: nothing in it is shared memory the session's thread would write. It is read,
    /// never changed otherwise (it numbers no files of its own).
    pub fn detached(&self) -> Catalog {
        Catalog::detached_in_parts(usize::MAX, |from_id, max_files, part| {
            self.take_part(from_id, max_files, part)
        })
    }

    /// A detached copy built `max_files` at a time: `take` calls `take_part` on the source with
    /// the arguments it is given (a session holds the writers' lock for that call only), and
    /// each part is copied in after it. The changes made to the source between parts are to be
    /// applied afterwards (`apply`).
    pub fn detached_in_parts(
        max_files: usize,
        mut take: impl FnMut(FileId, usize, &mut CatalogPart) -> Option<FileId>,
    ) -> Catalog {
        let mut copy = Catalog::default();
        let mut part = CatalogPart::default();
        let mut from_id = 0;
        loop {
            let next = take(from_id, max_files, &mut part);
            copy.add_part(&mut part);
            match next {
                Some(id) => from_id = id,
                None => return copy,
            }
        }
    }

    /// Takes into `part` at most `max_files` files from id `from_id` on, and the position.
    /// Returns the id to go on from, or `None` once all are taken. A session builds its copy
    /// a part per hold of the writers' lock (`add_part` outside it): with the catalog changing
    /// between parts, the copy equals it once every change made since the first part is
    /// applied (`apply`).
    pub fn take_part(
        &self,
        from_id: FileId,
        max_files: usize,
        part: &mut CatalogPart,
    ) -> Option<FileId> {
        let mut next = None;
        for (n, (&id, path)) in self.paths.range(from_id..).enumerate() {
            if n == max_files {
                next = Some(id);
                break;
            }
            if let Some(slot) = self.files.get(path) {
                part.files.push((path.clone(), *slot));
            }
        }
        part.position = self.position;
        next
    }

    /// Adds what `take_part` took (emptying `part`) to this detached copy, each path copied
    /// into an allocation of its own.
    pub fn add_part(&mut self, part: &mut CatalogPart) {
        for (path, slot) in part.files.drain(..) {
            self.insert_detached(path.unshared(), slot);
        }
        self.position = part.position;
    }

    /// Adds a file to a detached copy under the source's id. An older file at this path, whose
    /// delete the copy has not seen yet, goes now (and its delete will find nothing).
    fn insert_detached(&mut self, path: RelPath, slot: Slot) {
        let slot = Slot {
            listed: false,
            ..slot
        };
        if let Some(old) = self.files.insert(path.clone(), slot) {
            if old.id != slot.id {
                self.paths.remove(&old.id);
            }
        }
        self.paths.insert(slot.id, path);
    }

    /// Brings this detached copy of `source` up to date with every change made to `source` since
    /// the copy was taken or last brought up to date (`changes`: the latest of each file, in any
    /// order) and `source`'s position after them. `source` is read only for the paths of files
    /// new to the copy. The paths changed are pushed to `changed`, each with the position just
    /// before its first change here (`FileChange::since`).
    pub fn apply(
        &mut self,
        source: &Catalog,
        changes: &[FileChange],
        position: u64,
        changed: &mut Vec<(RelPath, u64)>,
    ) {
        self.apply_with(|id| source.path_unshared(id), changes, position, changed);
    }

    /// Brings this detached copy up to date with the files its source listed as changed
    /// (`start_listing`), `max_files` at a time, for a reader that holds the writers' lock
    /// only to take them: `take` calls the source's `take_listed` with the arguments given and
    /// returns what it returned with the source's position then (one hold); `paths_of` returns
    /// the source's `path_unshared` of each id given, those of the files new to this copy
    /// (another hold, only when there are some). The rest is done outside the lock. A file gone
    /// between the two holds is left out: its delete is listed for the next take. The paths
    /// changed are pushed to `changed`, as `apply` does; `taken` is a buffer.
    pub fn apply_listed_in_parts(
        &mut self,
        max_files: usize,
        mut take: impl FnMut(usize, &mut Vec<FileChange>) -> (bool, u64),
        mut paths_of: impl FnMut(&[FileId]) -> HashMap<FileId, RelPath>,
        taken: &mut Vec<FileChange>,
        changed: &mut Vec<(RelPath, u64)>,
    ) {
        loop {
            let (more, position) = take(max_files, taken);
            let new: Vec<FileId> = taken
                .iter()
                .filter(|c| c.entry.is_some() && !self.paths.contains_key(&c.id))
                .map(|c| c.id)
                .collect();
            let mut paths = if new.is_empty() {
                HashMap::new()
            } else {
                paths_of(&new)
            };
            self.apply_with(|id| paths.remove(&id), taken, position, changed);
            if !more {
                return;
            }
        }
    }

    /// The path of file `id`, in an allocation of its own.
    pub fn path_unshared(&self, id: FileId) -> Option<RelPath> {
        self.paths.get(&id).map(RelPath::unshared)
    }

    /// `apply`, with the path of each file new to this copy from `path_of` (`None`: the file is
    /// gone from the source, and its delete is yet to come; a path never changes under one id).
    fn apply_with(
        &mut self,
        mut path_of: impl FnMut(FileId) -> Option<RelPath>,
        changes: &[FileChange],
        position: u64,
        changed: &mut Vec<(RelPath, u64)>,
    ) {
        for change in changes {
            match change.entry {
                Some(entry) => {
                    if let Some(path) = self.paths.get(&change.id) {
                        if let Some(slot) = self.files.get_mut(path) {
                            slot.entry = entry;
                        }
                        changed.push((path.clone(), change.since));
                    } else if let Some(path) = path_of(change.id) {
                        let slot = Slot {
                            id: change.id,
                            entry,
                            listed: false,
                        };
                        self.insert_detached(path.clone(), slot);
                        changed.push((path, change.since));
                    }
                }
                None => {
                    // Unknown: never seen, or its path already taken by a newer file.
                    if let Some(path) = self.paths.remove(&change.id) {
                        self.files.remove(&path);
                        changed.push((path, change.since));
                    }
                }
            }
        }
        self.position = position;
    }
}

/// Changes made to a catalog that a session has not taken yet: the writer pushes one after each
/// change, the session takes them all at once. One per file, the latest: a file changed twice in
/// a row is one entry, and a list that reaches `CHANGE_LIST_COMPACT_AT` entries (files changed in
/// turn) is sorted and merged, so it never holds more than about twice the files changed.
#[derive(Debug, Default)]
pub struct ChangeList {
    changes: Vec<FileChange>,
    /// The renames among them, in order (`Catalog::rename`): few, and taken with the changes.
    moves: Vec<Move>,
    /// The catalog's position after the last change pushed.
    position: u64,
    /// Merge when the list reaches this length (at least `CHANGE_LIST_COMPACT_AT`).
    compact_at: usize,
}

/// Renames a `ChangeList` keeps for a session that has not taken them (`ChangeList::push_move`).
pub const MOVES_KEPT_MAX: usize = 4096;

/// The length at which a `ChangeList` is first merged.
pub const CHANGE_LIST_COMPACT_AT: usize = 64;

impl ChangeList {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// `change` was made, leaving the catalog at `position`.
    pub fn push(&mut self, change: FileChange, position: u64) {
        self.position = position;
        if let Some(last) = self.changes.last_mut() {
            if last.id == change.id {
                *last = FileChange {
                    since: last.since,
                    ..change
                };
                return;
            }
        }
        if self.changes.len() >= self.compact_at.max(CHANGE_LIST_COMPACT_AT) {
            // Stable: of each file's changes, the latest stays last.
            self.changes.sort_by_key(|c| c.id);
            self.changes.dedup_by(|later, kept| {
                let same = later.id == kept.id;
                if same {
                    *kept = FileChange {
                        since: kept.since.min(later.since),
                        ..*later
                    };
                }
                same
            });
            self.compact_at = 2 * self.changes.len();
        }
        self.changes.push(change);
    }

    /// A rename was made: its two changes are pushed as any change is, and the move with them.
    /// At most `MOVES_KEPT_MAX` wait: past that the oldest half is dropped, and those files
    /// ship whole, as without the move.
    pub fn push_move(&mut self, moved: Move) {
        if self.moves.len() >= MOVES_KEPT_MAX {
            self.moves.drain(..MOVES_KEPT_MAX / 2);
        }
        self.moves.push(moved);
    }

    /// Hands every rename pushed since the last call to the caller in `into` (emptied first):
    /// take them with the changes, under the same hold of the lock.
    pub fn take_moves(&mut self, into: &mut Vec<Move>) {
        into.clear();
        std::mem::swap(&mut self.moves, into);
    }

    /// Hands every change to the caller in `into` (emptied first), and keeps `into`'s buffer
    /// for the next ones. Returns the catalog's position after them (`None`: no change).
    pub fn take(&mut self, into: &mut Vec<FileChange>) -> Option<u64> {
        into.clear();
        if self.changes.is_empty() {
            return None;
        }
        std::mem::swap(&mut self.changes, into);
        self.compact_at = 0;
        Some(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_rename_moves_the_length_to_a_new_generation_born_after_it() {
        let mut c = Catalog::new([(p("q/seg"), 10), (p("q/old"), 3)]);
        let seg = c.get(&p("q/seg")).unwrap();
        let r = c.rename("q/seg", "q/seg.deleted").unwrap().unwrap();
        assert_eq!(c.position(), 14, "a rename adds 1");
        assert_eq!(c.get(&p("q/seg")), None);
        let moved = c.get(&p("q/seg.deleted")).unwrap();
        assert_eq!(moved.len_bytes, 10);
        assert_eq!(moved.born_at, 14, "born right after the rename");
        assert!(
            !moved.born_by_append,
            "a follower without a copy gets it whole"
        );
        assert_ne!(moved.generation, seg.generation);
        assert_eq!(
            r.moved,
            Move {
                from: p("q/seg"),
                to: p("q/seg.deleted"),
                from_generation: seg.generation,
                generation: moved.generation,
            }
        );
        assert_eq!((r.from.entry, r.from.since), (None, 13));
        assert_eq!((r.to.entry, r.to.since), (Some(moved), 13));
        // Over a file: that path's id stays, with the new generation.
        let old_id = c.replace("q/old", 3).unwrap().id;
        let over = c.rename("q/seg.deleted", "q/old").unwrap().unwrap();
        assert_eq!(over.to.id, old_id);
        assert_eq!(c.get(&p("q/old")).unwrap().len_bytes, 10);
        assert_eq!(c.len(), 1);
        // Nothing to move: nothing changes.
        assert!(c.rename("q/none", "q/x").unwrap().is_none());
        assert!(c.rename("q/old", "q/old").unwrap().is_none());
        assert!(c.rename("q/old", "../x").is_err());
        assert_eq!(c.position(), 18);
    }

    #[test]
    fn a_generation_is_born_after_the_change_that_began_it_and_appends_keep_it() {
        let mut c = Catalog::new([(p("old"), 10)]);
        assert_eq!(c.get(&p("old")).unwrap().born_at, 0, "there at the start");
        c.append("new", 0, 5).unwrap();
        assert_eq!(c.get(&p("new")).unwrap().born_at, 15);
        c.append("new", 5, 5).unwrap();
        assert_eq!(c.get(&p("new")).unwrap().born_at, 15, "an append keeps it");
        // Created empty: the position does not move, so a MARK at it may predate the file.
        c.append("empty", 0, 0).unwrap();
        assert_eq!(c.position(), 20);
        assert_eq!(c.get(&p("empty")).unwrap().born_at, 21);
        c.replace("new", 0).unwrap();
        assert_eq!(c.position(), 21);
        assert_eq!(c.get(&p("new")).unwrap().born_at, 21);
        // The change a session copy gets carries it.
        let change = c.replace("old", 4).unwrap();
        assert_eq!(change.entry.map(|e| e.born_at), Some(25));
    }

    #[test]
    fn a_resumed_catalog_goes_on_above_the_last_position_and_keeps_only_what_is_vouched_for() {
        let kept: HashMap<RelPath, Kept> = [("seg", 40, 7), ("cut", 30, 9), ("unlisted", 12, 3)]
            .into_iter()
            .map(|(path, len_bytes, born_at)| (p(path), Kept { len_bytes, born_at }))
            .collect();
        let files = [(p("seg"), 55), (p("cut"), 20), (p("new"), 8)];
        let mut c = Catalog::resumed(files, 100, &kept);
        assert_eq!(c.position(), 101, "above every MARK of the instance");
        let born = |c: &Catalog, path: &str| c.get(&p(path)).unwrap().born_at;
        assert_eq!(
            born(&c, "seg"),
            7,
            "grown since: more of the same generation"
        );
        assert_eq!(c.get(&p("seg")).unwrap().len_bytes, 55);
        assert_eq!(born(&c, "cut"), 101, "shorter than recorded: cut back");
        assert_eq!(born(&c, "new"), 101, "not vouched for");
        assert_eq!(c.get(&p("unlisted")).unwrap().len_bytes, 12);
        assert_eq!(born(&c, "unlisted"), 3, "vouched for, though not listed");
        c.append("seg", 55, 5).unwrap();
        assert_eq!((c.position(), born(&c, "seg")), (106, 7));
        c.replace("new", 2).unwrap();
        assert_eq!(born(&c, "new"), 108);
    }

    #[test]
    fn position_counts_changed_bytes_and_replace_bumps_generation() {
        let mut c = Catalog::new([(p("a"), 10), (p("b"), 5)]);
        assert_eq!(c.position(), 15);
        let g = c.get(&p("a")).unwrap().generation;
        c.append("a", 10, 4).unwrap();
        assert_eq!(c.position(), 19);
        assert_eq!(
            c.get(&p("a")).unwrap(),
            CatalogEntry {
                len_bytes: 14,
                generation: g,
                born_at: 0,
                born_by_append: false,
            }
        );
        c.replace("a", 3).unwrap();
        assert_eq!(c.position(), 22);
        assert_ne!(c.get(&p("a")).unwrap().generation, g);
        assert_eq!(
            c.get(&p("a")).unwrap().born_at,
            22,
            "right after the replace"
        );
        assert!(c.delete("b").unwrap().is_some());
        assert_eq!(c.position(), 23);
        assert_eq!(
            c.delete("b").unwrap(),
            None,
            "deleting an absent file changes nothing"
        );
        assert_eq!(c.position(), 23);
        assert_eq!(c.snapshot().len(), 1);
    }

    #[test]
    fn a_change_past_a_file_s_or_the_position_s_limit_is_refused_and_changes_nothing() {
        let mut c = Catalog::new([(RelPath::new("a").unwrap(), 10)]);
        let before = (c.position(), c.snapshot());
        let too_long = [
            c.append("a", 10, MAX_FILE_BYTES),
            c.append("a", u64::MAX, 2),
            c.replace("b", MAX_FILE_BYTES + 1),
        ];
        for r in too_long {
            assert!(matches!(r, Err(CatalogError::TooLong(_))), "{r:?}");
        }
        assert_eq!((c.position(), c.snapshot()), before);
        // At the limit itself, still taken.
        c.append("a", 0, MAX_POSITION - 10).unwrap();
        assert_eq!(c.position(), MAX_POSITION);
        let at_max = (c.position(), c.snapshot());
        assert!(matches!(
            c.append("a", 0, 1),
            Err(CatalogError::PositionExhausted(_))
        ));
        assert!(matches!(
            c.replace("a", 0),
            Err(CatalogError::PositionExhausted(_))
        ));
        assert!(matches!(
            c.delete("a"),
            Err(CatalogError::PositionExhausted(_))
        ));
        // A file not in the catalog: nothing to delete, nothing added.
        assert!(matches!(c.delete("zz"), Ok(None)));
        assert_eq!((c.position(), c.snapshot()), at_max);
    }

    #[test]
    fn a_path_that_escapes_is_refused_by_every_change() {
        let mut c = Catalog::new([]);
        assert!(matches!(
            c.append("../x", 0, 1),
            Err(CatalogError::Path(PathError::DotDot(p))) if p == "../x"
        ));
        assert!(c.replace("/etc/passwd", 1).is_err());
        assert!(c.delete("a/../../b").is_err());
        assert!(c.is_empty());
        assert_eq!(c.position(), 0);
    }

    #[test]
    fn a_path_listed_twice_at_start_is_one_file() {
        let c = Catalog::new([(p("a"), 10), (p("a"), 4)]);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&p("a")).unwrap().len_bytes, 4);
        assert_eq!(c.paths.len(), 1);
        assert_eq!(c.detached().snapshot(), c.snapshot());
    }

    #[test]
    fn an_append_inside_a_preallocated_length_does_not_shrink_it() {
        let mut c = Catalog::new([]);
        c.append("seg", 0, 100).unwrap();
        c.append("seg", 50, 10).unwrap();
        assert_eq!(c.get(&p("seg")).unwrap().len_bytes, 100);
    }

    /// The writer's side of one session: its catalog and the session's change list.
    struct Writer {
        catalog: Catalog,
        list: ChangeList,
    }

    impl Writer {
        fn change(&mut self, op: u64, path: &str) {
            let change = match op % 4 {
                0 | 1 => Some(self.catalog.append(path, op, op % 7 + 1).unwrap()),
                2 => Some(self.catalog.replace(path, op % 5).unwrap()),
                _ => self.catalog.delete(path).unwrap(),
            };
            if let Some(change) = change {
                self.list.push(change, self.catalog.position());
            }
        }
    }

    /// Takes the list into `copy` as a session does; returns the paths it reported changed.
    fn look(writer: &mut Writer, copy: &mut Catalog) -> Vec<RelPath> {
        let mut taken = Vec::new();
        let mut changed = Vec::new();
        if let Some(position) = writer.list.take(&mut taken) {
            copy.apply(&writer.catalog, &taken, position, &mut changed);
        }
        changed.into_iter().map(|(path, _)| path).collect()
    }

    /// Runs a fixed sequence of 20,000 appends, replaces and deletes (xorshift) on `names`,
    /// including a delete and a new file at the same path between two looks, and calls `look`
    /// with the step's number and seed now and then, and after the last step.
    fn run_script(
        writer: &mut Writer,
        names: &[&str],
        mut look: impl FnMut(&mut Writer, u64, u64),
    ) {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for step in 0..20_000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let path = names[(seed % names.len() as u64) as usize];
            writer.change(seed >> 8, path);
            if (seed >> 32) % 50 == 0 || step == 19_999 {
                look(writer, step, seed);
            }
        }
    }

    #[test]
    fn a_detached_copy_kept_in_step_by_the_change_list_equals_the_source() {
        let names = ["a", "b", "dir/c", "dir/d", "e"];
        let mut writer = Writer {
            catalog: Catalog::new([(p("a"), 10), (p("b"), 5)]),
            list: ChangeList::default(),
        };
        let mut copy = writer.catalog.detached();
        run_script(&mut writer, &names, |writer, step, _| {
            let changed = look(writer, &mut copy);
            assert_eq!(copy.snapshot(), writer.catalog.snapshot(), "step {step}");
            assert_eq!(copy.position(), writer.catalog.position());
            for path in &changed {
                assert!(names.contains(&path.as_str()));
            }
        });
        // Files created and deleted, over and over, leave no ids behind in either.
        assert_eq!(copy.paths.len(), copy.files.len());
        assert_eq!(writer.catalog.paths.len(), writer.catalog.files.len());
    }

    /// Takes what `source` listed into `copy`, `max_files` at a time, as the checkpoint
    /// thread does (`apply_listed_in_parts`), with `between` run right after the first part is
    /// taken: what the writer changes before the paths are asked for. Returns the paths
    /// reported changed, sorted.
    fn take_listed_with(
        source: &mut Catalog,
        copy: &mut Catalog,
        max_files: usize,
        between: impl FnOnce(&mut Catalog),
    ) -> Vec<RelPath> {
        let source = std::cell::RefCell::new(source);
        let mut between = Some(between);
        let (mut taken, mut changed) = (Vec::new(), Vec::new());
        copy.apply_listed_in_parts(
            max_files,
            |max_files, into| {
                let mut source = source.borrow_mut();
                let more = source.take_listed(max_files, into);
                let position = source.position();
                if let Some(between) = between.take() {
                    between(&mut source);
                }
                (more, position)
            },
            |ids| {
                let source = source.borrow();
                ids.iter()
                    .filter_map(|&id| Some((id, source.path_unshared(id)?)))
                    .collect()
            },
            &mut taken,
            &mut changed,
        );
        let mut paths: Vec<RelPath> = changed.into_iter().map(|(path, _)| path).collect();
        paths.sort();
        paths
    }

    fn take_listed(source: &mut Catalog, copy: &mut Catalog, max_files: usize) -> Vec<RelPath> {
        take_listed_with(source, copy, max_files, |_| {})
    }

    #[test]
    fn a_copy_kept_in_step_by_what_its_source_lists_equals_it() {
        let names = ["a", "b", "dir/c", "dir/d", "e", "f", "g"];
        let mut writer = Writer {
            catalog: Catalog::new([(p("a"), 10), (p("b"), 5)]),
            list: ChangeList::default(),
        };
        writer.catalog.start_listing();
        let mut copy = writer.catalog.detached();
        run_script(&mut writer, &names, |writer, step, seed| {
            let parts_of = 1 + (seed >> 40) as usize % 3;
            // Between taking the entries and the paths: a new file, or a file gone.
            let meanwhile = |c: &mut Catalog| match seed >> 44 & 3 {
                0 => drop(c.append(names[(seed >> 46) as usize % names.len()], 0, 1)),
                1 => drop(c.delete(names[(seed >> 46) as usize % names.len()])),
                _ => {}
            };
            take_listed_with(&mut writer.catalog, &mut copy, parts_of, meanwhile);
            // What changed meanwhile is listed: the next take brings the copy level.
            take_listed(&mut writer.catalog, &mut copy, parts_of);
            assert_eq!(copy.snapshot(), writer.catalog.snapshot(), "step {step}");
            assert_eq!(copy.position(), writer.catalog.position());
            let listed = writer.catalog.listed.as_ref().map(Vec::len);
            assert_eq!(listed, Some(0), "all taken");
            assert!(writer.catalog.files.values().all(|s| !s.listed));
        });
        assert_eq!(copy.paths.len(), copy.files.len());
    }

    #[test]
    fn a_catalog_lists_each_changed_file_once_while_listing() {
        let mut c = Catalog::new([(p("a"), 10), (p("b"), 5), (p("c"), 1)]);
        let mut copy = c.detached();
        c.append("a", 10, 1).unwrap();
        assert_eq!(c.listed, None, "nothing listed before start_listing");
        assert!(take_listed(&mut c, &mut copy, 10).is_empty());
        c.start_listing();
        for len in 0..100 {
            c.append("a", 11, len).unwrap();
        }
        c.replace("b", 3).unwrap();
        c.append("new", 0, 4).unwrap();
        c.delete("c").unwrap();
        c.delete("c").unwrap();
        assert_eq!(c.listed.as_ref().map(Vec::len), Some(4), "each file once");
        assert_eq!(
            take_listed(&mut c, &mut copy, 1),
            [p("a"), p("b"), p("c"), p("new")]
        );
        assert_eq!(copy.snapshot(), c.snapshot());
        assert!(take_listed(&mut c, &mut copy, 10).is_empty(), "taken once");
        // Deleted and created again: both files listed, the copy holds the new one.
        c.delete("a").unwrap();
        c.append("a", 0, 2).unwrap();
        assert_eq!(take_listed(&mut c, &mut copy, 10), [p("a"), p("a")]);
        assert_eq!(copy.snapshot(), c.snapshot());
        // Stopped, then started again: what it listed before is forgotten, and a file listed
        // then is listed again by its next change.
        c.append("b", 3, 1).unwrap();
        c.stop_listing();
        c.append("new", 4, 1).unwrap();
        c.start_listing();
        c.append("b", 4, 1).unwrap();
        assert_eq!(take_listed(&mut c, &mut copy, 10), [p("b")]);
        assert_eq!(copy.get(&p("b")), c.get(&p("b")));
    }

    #[test]
    fn a_copy_made_in_parts_while_the_source_changes_equals_it_after_a_look() {
        let names: Vec<String> = (0..40).map(|i| format!("q{}/seg{i}", i % 4)).collect();
        let mut writer = Writer {
            catalog: Catalog::new(names.iter().map(|n| (p(n), 100))),
            list: ChangeList::default(),
        };
        let mut step = 0u64;
        let mut copy = Catalog::detached_in_parts(3, |from_id, max_files, part| {
            let next = writer.catalog.take_part(from_id, max_files, part);
            if from_id == 0 {
                // Copied in this first part, deleted, created again: a new id, in the last part.
                writer.change(3, &names[0]);
                writer.change(0, &names[0]);
            }
            // Between two parts: appends, replaces and deletes, before and after the part
            // copied.
            for _ in 0..4 {
                step += 1;
                let name = &names[(step * 7 % names.len() as u64) as usize];
                writer.change(step, name);
            }
            next
        });
        look(&mut writer, &mut copy);
        assert_eq!(copy.snapshot(), writer.catalog.snapshot());
        assert_eq!(copy.position(), writer.catalog.position());
        assert_eq!(copy.paths.len(), copy.files.len());
    }

    #[test]
    fn a_look_reports_every_path_changed_since_the_last() {
        let mut writer = Writer {
            catalog: Catalog::new([(p("a"), 10), (p("b"), 5), (p("c"), 1)]),
            list: ChangeList::default(),
        };
        let mut copy = writer.catalog.detached();
        writer.change(0, "a");
        writer.change(3, "c");
        writer.change(0, "new");
        let mut changed = look(&mut writer, &mut copy);
        changed.sort();
        assert_eq!(changed, [p("a"), p("c"), p("new")]);
        assert!(look(&mut writer, &mut copy).is_empty());
        // Deleted and created again between two looks: the copy holds the new file.
        writer.change(3, "a");
        writer.change(2, "a");
        assert_eq!(look(&mut writer, &mut copy), [p("a"), p("a")]);
        assert_eq!(copy.get(&p("a")), writer.catalog.get(&p("a")));
    }

    #[test]
    fn changes_apply_in_any_order() {
        let mut source = Catalog::new([(p("a"), 10)]);
        let mut copy = source.detached();
        let deleted = source.delete("a").unwrap().unwrap();
        let created = source.append("a", 0, 3).unwrap();
        assert_ne!(deleted.id, created.id, "a path created again gets a new id");
        let mut changed = Vec::new();
        copy.apply(
            &source,
            &[created, deleted],
            source.position(),
            &mut changed,
        );
        assert_eq!(copy.snapshot(), source.snapshot());
        assert_eq!(copy.paths.len(), 1);
    }

    #[test]
    fn a_detached_copy_shares_no_path_with_its_source() {
        let mut writer = Writer {
            catalog: Catalog::new([(p("a"), 10)]),
            list: ChangeList::default(),
        };
        let mut copy = writer.catalog.detached();
        writer.change(0, "b");
        look(&mut writer, &mut copy);
        for mine in copy.files.keys() {
            for source in writer.catalog.files.keys() {
                assert!(!mine.shares_allocation(source), "{mine} is shared");
            }
        }
        for mine in copy.paths.values() {
            for source in writer.catalog.paths.values() {
                assert!(!mine.shares_allocation(source), "{mine} is shared");
            }
        }
        assert_eq!(copy.len(), 2);
    }

    #[test]
    fn a_change_list_holds_one_change_per_file_however_many_were_made() {
        let mut list = ChangeList::default();
        let entry = |len_bytes| {
            Some(CatalogEntry {
                len_bytes,
                generation: 1,
                born_at: 0,
                born_by_append: true,
            })
        };
        // One file appended to over and over: one entry, the latest.
        for len in 0..1000 {
            list.push(
                FileChange {
                    id: 7,
                    entry: entry(len),
                    since: len,
                },
                len,
            );
        }
        assert_eq!(list.len(), 1);
        // Three files in turn: bounded by the merge.
        for len in 0..100_000 {
            list.push(
                FileChange {
                    id: len % 3,
                    entry: entry(len),
                    since: len,
                },
                len,
            );
        }
        assert!(list.len() <= CHANGE_LIST_COMPACT_AT + 1, "{}", list.len());
        let mut taken = Vec::new();
        assert_eq!(list.take(&mut taken), Some(99_999));
        // Taken in order, the last change of each file is its state.
        let latest: std::collections::BTreeMap<FileId, Option<CatalogEntry>> =
            taken.iter().map(|c| (c.id, c.entry)).collect();
        assert_eq!(
            latest.into_iter().collect::<Vec<_>>(),
            [
                (0, entry(99_999)),
                (1, entry(99_997)),
                (2, entry(99_998)),
                (7, entry(999))
            ]
        );
        assert!(list.is_empty());
        assert_eq!(list.take(&mut taken), None);
        assert!(taken.is_empty());
    }
}
