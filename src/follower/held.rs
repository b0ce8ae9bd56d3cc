//! The follower's held record, `DIR/.ferry/held` (`docs/PROTOCOL.md`, *Held records*): for each
//! file, the leader instance and MARK position after which the follower last looked at it, and
//! the file's inode, size, mtime and ctime then. At the next inventory with the same leader
//! instance, a file whose stamp still matches is reported as held (HAVE_HELD) instead of hashed.
//!
//! Why a look after a MARK is enough: the follower applies frames in wire order, each write
//! completing before the next, and a file only grows within one generation. So whatever the
//! look saw was the file as of that MARK, plus more of the same generation, or a change that
//! began a newer generation, which the leader refuses (it was born after the MARK).
//!
//! The record vouches for the page cache, which a crash of the process keeps: it is written
//! without fsync, and ignored after a reboot (it names the boot it was taken in).
//!
//! It is a journal: a checkpoint appends a line per file it looked at (`- PATH` for one it
//! forgot), and later lines stand over earlier ones. It is rewritten whole (a temp file renamed
//! over it) at the first save of a process and once the journal holds more than twice as many
//! lines as files, so a checkpoint costs what changed, not the size of the index. A last line
//! torn by a crash is ignored; a lost one leaves an older line, whose stamp no longer matches.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};

use crate::frame::InstanceId;
use crate::index::{boot_id, from_hex, hex, Stamp, BOOT_ID_PATH};
use crate::paths::{DataDir, RelPath, StateSync};

/// How often a streaming follower records the files it changed (at a MARK, at most this often).
pub const HELD_CHECKPOINT_INTERVAL_MS: u64 = 1000;
const FILE_NAME: &str = "held";
const HEADER: &str = "ferry-held-v1";
/// Journal lines a rewrite may leave behind beyond twice the entries, before it rewrites.
const JOURNAL_SLACK_LINES: usize = 1024;
const FORGET: &str = "-";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    instance: InstanceId,
    position: u64,
    stamp: Stamp,
}

#[derive(Debug, Default)]
pub struct HeldRecord {
    entries: HashMap<RelPath, Entry>,
    /// This boot's id; `None` when unreadable, and then nothing is vouched for or saved.
    boot_id: Option<String>,
    /// The last save failed (said once, not at every checkpoint while a disk is full).
    save_failing: bool,
    /// Paths looked at since the last save: their lines are what the next save appends.
    unsaved: Vec<RelPath>,
    /// Entry lines in the file on disk, once this process has rewritten it (`None` before).
    journal_lines: Option<usize>,
}

impl HeldRecord {
    /// The record in `DIR/.ferry/held`; empty when missing, unreadable, corrupt or taken before
    /// the last reboot.
    pub fn load(dir: &DataDir) -> HeldRecord {
        HeldRecord::load_for_boot(dir, boot_id())
    }

    fn load_for_boot(dir: &DataDir, boot_id: Option<String>) -> HeldRecord {
        let mut record = HeldRecord {
            entries: HashMap::new(),
            boot_id,
            save_failing: false,
            unsaved: Vec::new(),
            journal_lines: None,
        };
        let Some(boot) = &record.boot_id else {
            tracing::warn!(
                "cannot read {BOOT_ID_PATH}: files changed since the last inventory are hashed"
            );
            return record;
        };
        let path = dir.state_path(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return record,
            Err(e) => {
                tracing::warn!("ignoring the held record {}: {e}", path.display());
                return record;
            }
        };
        match HeldRecord::parse(&text) {
            Some((taken_in, entries)) if taken_in == *boot => record.entries = entries,
            Some(_) => tracing::info!(
                "the held record {} is from before a reboot, which may have lost what it vouches \
                 for: files changed since the last inventory are hashed",
                path.display()
            ),
            None => tracing::warn!(
                "ignoring the held record {}: it is corrupt; files changed since the last \
                 inventory are hashed",
                path.display()
            ),
        }
        record
    }

    fn parse(text: &str) -> Option<(String, HashMap<RelPath, Entry>)> {
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let boot = lines.next()?.strip_prefix("boot ")?.to_string();
        let mut entries = HashMap::new();
        // A last line without its newline was torn by a crash mid-append: not part of it.
        let whole = text.matches('\n').count().saturating_sub(2);
        for line in lines.take(whole) {
            if let Some(path) = line.strip_prefix(FORGET).and_then(|l| l.strip_prefix(' ')) {
                entries.remove(&RelPath::new(path).ok()?);
                continue;
            }
            let mut f = line.splitn(7, ' ');
            let instance = from_hex(f.next()?)?;
            let position = f.next()?.parse().ok()?;
            let stamp = Stamp::parse(&mut f)?;
            let path = RelPath::new(f.next()?).ok()?;
            entries.insert(
                path,
                Entry {
                    instance,
                    position,
                    stamp,
                },
            );
        }
        Some((boot, entries))
    }

    /// `path`'s journal line: its entry, or that it is forgotten.
    fn push_line(&self, text: &mut String, path: &RelPath) {
        if path.as_str().contains('\n') {
            return; // not representable in the line format; never vouched for
        }
        match self.entries.get(path) {
            Some(e) => text.push_str(&format!(
                "{} {} {} {path}\n",
                hex(&e.instance),
                e.position,
                e.stamp
            )),
            None => text.push_str(&format!("{FORGET} {path}\n")),
        }
    }

    /// Saves what was looked at since the last save: appended to the journal, or the whole
    /// record rewritten (`DataDir::replace_state_file`, `StateSync::Volatile`: after a reboot the
    /// record is ignored anyway).
    pub fn save(&mut self, dir: &DataDir) -> io::Result<()> {
        let Some(boot) = &self.boot_id else {
            return Ok(());
        };
        let unsaved = std::mem::take(&mut self.unsaved);
        let mut text = String::new();
        match self.journal_lines {
            Some(lines)
                if lines + unsaved.len() <= 2 * self.entries.len() + JOURNAL_SLACK_LINES =>
            {
                for path in &unsaved {
                    self.push_line(&mut text, path);
                }
                let path = dir.state_path(FILE_NAME);
                let appended = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(text.as_bytes()))
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
                    });
                if let Err(e) = appended {
                    // Rewritten whole next time: what this append lost is in the entries.
                    self.journal_lines = None;
                    return Err(e);
                }
                self.journal_lines = Some(lines + unsaved.len());
            }
            _ => {
                text = format!("{HEADER}\nboot {boot}\n");
                let mut paths: Vec<_> = self.entries.keys().cloned().collect();
                paths.sort();
                for path in &paths {
                    self.push_line(&mut text, path);
                }
                dir.replace_state_file(FILE_NAME, text.as_bytes(), StateSync::Volatile)?;
                self.journal_lines = Some(paths.len());
            }
        }
        Ok(())
    }

    /// Saves the record, saying so when saving fails and when it works again.
    pub fn save_or_warn(&mut self, dir: &DataDir) {
        match self.save(dir) {
            Ok(()) if self.save_failing => {
                self.save_failing = false;
                tracing::info!("the held record is saved again");
            }
            Ok(()) => {}
            Err(e) if !self.save_failing => {
                self.save_failing = true;
                tracing::warn!(
                    "cannot save the held record: {e}; until it can be, a restart hashes what \
                     changed since it was last saved"
                );
            }
            Err(_) => {}
        }
    }

    /// The MARK position after which `path` was last seen as it is now (`stamp`), if that
    /// look was under leader `instance` in this boot.
    pub fn held_at(&self, path: &RelPath, instance: &InstanceId, stamp: &Stamp) -> Option<u64> {
        self.boot_id.as_ref()?;
        let e = self.entries.get(path)?;
        (e.instance == *instance && e.stamp == *stamp).then_some(e.position)
    }

    /// Looks at each of `paths` now, every frame before a MARK at `position` of leader
    /// `instance` having been applied, and records what it sees. A file that is gone, or
    /// cannot be looked at, is forgotten (it will be hashed).
    pub fn record(
        &mut self,
        dir: &DataDir,
        instance: InstanceId,
        position: u64,
        paths: impl IntoIterator<Item = RelPath>,
    ) {
        for path in paths {
            self.unsaved.push(path.clone());
            match Stamp::look(dir, &path) {
                Ok(Some(stamp)) => {
                    let entry = Entry {
                        instance,
                        position,
                        stamp,
                    };
                    self.entries.insert(path, entry);
                }
                Ok(None) => {
                    self.entries.remove(&path);
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!("cannot look at {path} for the held record: {e}");
                    }
                    self.entries.remove(&path);
                }
            }
        }
    }

    /// Forgets every file for which `keep` is false (in the file at the next save).
    pub fn retain(&mut self, keep: impl Fn(&RelPath) -> bool) {
        let unsaved = &mut self.unsaved;
        self.entries.retain(|p, _| {
            let kept = keep(p);
            if !kept {
                unsaved.push(p.clone());
            }
            kept
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::paths::temp_data_dir as setup;

    fn stamp_of(tmp: &tempfile::TempDir, name: &str) -> Stamp {
        Stamp::of(&std::fs::metadata(tmp.path().join(name)).unwrap())
    }

    #[test]
    fn a_recorded_file_is_held_across_a_restart_until_it_changes() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), vec![7u8; 1000]).unwrap();
        let seg = RelPath::new("seg").unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        record.record(&dir, a, 500, [seg.clone()]);
        record.save(&dir).unwrap();

        let restarted = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        let now = stamp_of(&tmp, "seg");
        assert_eq!(restarted.held_at(&seg, &a, &now), Some(500));
        assert_eq!(
            restarted.held_at(&seg, &b, &now),
            None,
            "another leader instance"
        );

        // Rewritten at the same size behind ferry's back: the ctime (and mtime) moved.
        std::fs::write(tmp.path().join("seg"), vec![8u8; 1000]).unwrap();
        assert_eq!(restarted.held_at(&seg, &a, &stamp_of(&tmp, "seg")), None);
    }

    #[test]
    fn a_record_from_another_boot_or_a_corrupt_one_vouches_for_nothing() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("seg"), b"abc").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let mut record = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        record.record(&dir, [1; 16], 3, [seg.clone()]);
        record.save(&dir).unwrap();
        let now = stamp_of(&tmp, "seg");
        let rebooted = HeldRecord::load_for_boot(&dir, Some("boot-2".into()));
        assert_eq!(rebooted.held_at(&seg, &[1; 16], &now), None);
        let unknown_boot = HeldRecord::load_for_boot(&dir, None);
        assert_eq!(unknown_boot.held_at(&seg, &[1; 16], &now), None);

        std::fs::write(
            tmp.path().join(".ferry/held"),
            b"ferry-held-v1\nboot boot-1\nx y\n",
        )
        .unwrap();
        let corrupt = HeldRecord::load_for_boot(&dir, Some("boot-1".into()));
        assert_eq!(corrupt.held_at(&seg, &[1; 16], &now), None);
    }

    #[test]
    fn checkpoints_append_to_the_journal_which_is_rewritten_once_mostly_stale() {
        let (tmp, dir) = setup();
        let boot = || Some("b".to_string());
        let names: Vec<RelPath> = (0..3)
            .map(|i| RelPath::new(&format!("f{i}")).unwrap())
            .collect();
        for n in &names {
            std::fs::write(tmp.path().join(n.as_str()), b"abc").unwrap();
        }
        let mut record = HeldRecord::load_for_boot(&dir, boot());
        record.record(&dir, [1; 16], 3, names.clone());
        record.save(&dir).unwrap();
        let text = || std::fs::read_to_string(tmp.path().join(".ferry/held")).unwrap();
        assert_eq!(text().lines().count(), 2 + 3, "the first save rewrites");

        // f0 grows and is looked at again; f1 is no longer in the leader's index.
        std::fs::write(tmp.path().join("f0"), b"abcdef").unwrap();
        record.record(&dir, [1; 16], 9, [names[0].clone()]);
        record.retain(|p| p != &names[1]);
        record.save(&dir).unwrap();
        assert_eq!(text().lines().count(), 2 + 3 + 2, "two lines appended");
        assert!(text().ends_with("- f1\n"), "{}", text());

        // A crash mid-append leaves a torn last line: ignored, the rest stands.
        let mut f = OpenOptions::new()
            .append(true)
            .open(tmp.path().join(".ferry/held"))
            .unwrap();
        f.write_all(b"0101").unwrap();
        let reloaded = HeldRecord::load_for_boot(&dir, boot());
        let stamp = |n: &str| stamp_of(&tmp, n);
        assert_eq!(reloaded.held_at(&names[0], &[1; 16], &stamp("f0")), Some(9));
        assert_eq!(reloaded.held_at(&names[1], &[1; 16], &stamp("f1")), None);
        assert_eq!(reloaded.held_at(&names[2], &[1; 16], &stamp("f2")), Some(3));

        // Many more looks than files: rewritten whole.
        let mut record = reloaded;
        record.save(&dir).unwrap();
        for _ in 0..(2 * 2 + JOURNAL_SLACK_LINES) {
            record.record(&dir, [1; 16], 10, [names[2].clone()]);
            record.save(&dir).unwrap();
        }
        assert!(text().lines().count() <= 2 + 2 + 2 * 2 + JOURNAL_SLACK_LINES);
        let reloaded = HeldRecord::load_for_boot(&dir, boot());
        assert_eq!(
            reloaded.held_at(&names[2], &[1; 16], &stamp("f2")),
            Some(10)
        );
    }

    #[test]
    fn a_file_gone_when_looked_at_is_forgotten() {
        let (tmp, dir) = setup();
        std::fs::write(tmp.path().join("f"), b"abc").unwrap();
        let f = RelPath::new("f").unwrap();
        let mut record = HeldRecord::load_for_boot(&dir, Some("b".into()));
        record.record(&dir, [1; 16], 3, [f.clone()]);
        let before = stamp_of(&tmp, "f");
        assert_eq!(record.held_at(&f, &[1; 16], &before), Some(3));
        std::fs::remove_file(tmp.path().join("f")).unwrap();
        record.record(&dir, [1; 16], 9, [f.clone()]);
        assert_eq!(record.held_at(&f, &[1; 16], &before), None);
    }
}
