//! The leader's live table of what it replicates: each file's logical length and generation, and
//! the leader's position counter (`docs/PROTOCOL.md`, *Positions*).
//!
//! The logical length is what followers must hold. It comes from the change sources (the library
//! API or the inotify watcher), not from stat(2), because a broker's mmap'd segment is
//! preallocated: its size on disk says nothing about how much of it is written.
//! A generation changes whenever a file is replaced as a whole, so a follower copy of an older
//! generation is re-sent whole instead of being appended to.

use std::collections::HashMap;

use crate::paths::RelPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    pub len_bytes: u64,
    pub generation: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    files: HashMap<RelPath, CatalogEntry>,
    position: u64,
    generation_next: u64,
}

impl Catalog {
    /// A catalog of `files` (path, length); the position starts at the sum of their lengths.
    pub fn new(files: impl IntoIterator<Item = (RelPath, u64)>) -> Catalog {
        let mut catalog = Catalog::default();
        for (path, len_bytes) in files {
            catalog.position += len_bytes;
            let generation = catalog.next_generation();
            catalog.files.insert(
                path,
                CatalogEntry {
                    len_bytes,
                    generation,
                },
            );
        }
        catalog
    }

    fn next_generation(&mut self) -> u64 {
        self.generation_next += 1;
        self.generation_next
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn get(&self, path: &RelPath) -> Option<CatalogEntry> {
        self.files.get(path).copied()
    }

    /// The catalog's own copy of `path`, if it has the file: cloning it shares the allocation.
    pub fn key(&self, path: &str) -> Option<&RelPath> {
        self.files.get_key_value(path).map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Every file with its entry, sorted by path.
    pub fn snapshot(&self) -> Vec<(RelPath, CatalogEntry)> {
        let mut all: Vec<_> = self.files.iter().map(|(p, e)| (p.clone(), *e)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Brings this copy of `source` (a clone taken earlier, or refreshed since) up to date,
    /// given every path changed in `source` since then: their entries and the position are
    /// copied, nothing else is looked at. A session plans from such a copy, so it holds the
    /// writers' lock only for as long as the copying takes.
    pub fn refresh_from(&mut self, source: &Catalog, changed: &[RelPath]) {
        for path in changed {
            match (source.files.get(path), self.files.get_mut(path)) {
                (Some(entry), Some(mine)) => *mine = *entry,
                (Some(entry), None) => {
                    self.files.insert(path.clone(), *entry);
                }
                (None, _) => {
                    self.files.remove(path);
                }
            }
        }
        self.position = source.position;
        self.generation_next = source.generation_next;
    }

    /// `len_bytes` new bytes at `offset` (a file not yet known is created). Returns the new position.
    pub fn append(&mut self, path: &RelPath, offset: u64, len_bytes: u64) -> u64 {
        let end = offset.saturating_add(len_bytes);
        match self.files.get_mut(path) {
            Some(entry) => entry.len_bytes = entry.len_bytes.max(end),
            None => {
                let generation = self.next_generation();
                self.files.insert(
                    path.clone(),
                    CatalogEntry {
                        len_bytes: end,
                        generation,
                    },
                );
            }
        }
        self.position += len_bytes;
        self.position
    }

    /// The file was rewritten as a whole and is now `len_bytes` long. Returns the new position.
    pub fn replace(&mut self, path: &RelPath, len_bytes: u64) -> u64 {
        let generation = self.next_generation();
        self.files.insert(
            path.clone(),
            CatalogEntry {
                len_bytes,
                generation,
            },
        );
        self.position += len_bytes.max(1);
        self.position
    }

    /// The file is gone. Returns the new position.
    pub fn delete(&mut self, path: &RelPath) -> u64 {
        if self.files.remove(path).is_some() {
            self.position += 1;
        }
        self.position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn position_counts_changed_bytes_and_replace_bumps_generation() {
        let mut c = Catalog::new([(p("a"), 10), (p("b"), 5)]);
        assert_eq!(c.position(), 15);
        let g = c.get(&p("a")).unwrap().generation;
        assert_eq!(c.append(&p("a"), 10, 4), 19);
        assert_eq!(
            c.get(&p("a")).unwrap(),
            CatalogEntry {
                len_bytes: 14,
                generation: g
            }
        );
        assert_eq!(c.replace(&p("a"), 3), 22);
        assert_ne!(c.get(&p("a")).unwrap().generation, g);
        assert_eq!(c.delete(&p("b")), 23);
        assert_eq!(
            c.delete(&p("b")),
            23,
            "deleting an absent file changes nothing"
        );
        assert_eq!(c.snapshot().len(), 1);
    }

    #[test]
    fn a_copy_refreshed_with_the_changed_paths_equals_the_source() {
        let mut source = Catalog::new([(p("a"), 10), (p("b"), 5), (p("c"), 1)]);
        let mut copy = source.clone();
        source.append(&p("a"), 10, 4);
        source.replace(&p("b"), 2);
        source.delete(&p("c"));
        source.append(&p("d"), 0, 7);
        copy.refresh_from(&source, &[p("a"), p("b"), p("c"), p("d")]);
        assert_eq!(copy.snapshot(), source.snapshot());
        assert_eq!(copy.position(), source.position());
        // Only the paths named are looked at.
        source.append(&p("a"), 14, 1);
        source.append(&p("d"), 7, 1);
        copy.refresh_from(&source, &[p("d")]);
        assert_eq!(copy.get(&p("a")).unwrap().len_bytes, 14);
        assert_eq!(copy.get(&p("d")), source.get(&p("d")));
        assert_eq!(copy.position(), source.position());
    }

    #[test]
    fn an_append_inside_a_preallocated_length_does_not_shrink_it() {
        let mut c = Catalog::new([]);
        c.append(&p("seg"), 0, 100);
        c.append(&p("seg"), 50, 10);
        assert_eq!(c.get(&p("seg")).unwrap().len_bytes, 100);
    }
}
