//! A follower's data dir becoming a leader's: a leader's record written from its held record
//! (`docs/PROTOCOL.md`, *Across a handoff*, *After a failover*), which the leader's start then
//! resumes as any record, so that followers' held records stay good. A handoff's target writes
//! one of the instance passed on to it (`cluster`); a dir whose follower followed since it last
//! led forks the instance it followed, at a node's election (`cluster`) and at any leader's
//! start (`Leader::start`: `ferry lead` on a former follower's dir, an embedder's promotion).

use std::fmt::Write as _;
use std::io;
use std::time::SystemTime;

use crate::follower::held::HeldRecord;
use crate::fork_chain::{ForkChain, ToldChains};
use crate::frame::InstanceId;
use crate::index::hex;
use crate::paths::DataDir;

/// Which files of a record written from a held record count as settled (the settle rule of
/// `leader_record`, for a write the stamp does not show).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Every file, as of now: only this node's own writes as a follower changed its copies since
    /// its held record looked, and each of those changes the size (DATA past the end, TRUNCATE)
    /// or the inode (COMMIT_WHOLE), as its held record relies on. For a `ferry node`, whose
    /// application is told it leads only once the leader started: a segment written just
    /// before the handoff or the failover is vouched for too.
    ByNow,
    /// Those whose ctime is `LEADER_RECORD_SETTLE_MS` older than the held record's mtime, which
    /// the follower set as it stopped (`HeldRecord::date_stop`; else its last save): an
    /// application may have written since (a leader started by hand or by an embedder), so the
    /// record vouches only for what a record taken then could, as any leader's record does. A
    /// file the follower changed in its last second is hashed. An mtime in the future (a clock
    /// set back, a file touched by hand) counts as now.
    AtHeldSave,
}

impl Settled {
    /// The `taken_ns` of a record from a held record written at `held_at`.
    pub(crate) fn taken_ns(self, held_at: SystemTime) -> i64 {
        match self {
            Settled::ByNow => crate::leader_record::settled_by_now_ns(),
            Settled::AtHeldSave => ns_since_epoch(held_at).min(crate::index::now_ns()),
        }
    }
}

/// Writes a leader's record of instance `id` (going on from `forks`) at `position` from
/// this dir's held record of instance `from`: each file it holds under `from`, with the size
/// and stamp seen then and the birth recorded with it (`position` where none was; one above
/// `position` is no birth of what this dir holds, and the file is left out). Returns the files
/// written, and those held under `from`. Dated `taken_ns` (`Settled::taken_ns`).
pub(crate) fn record_from_held(
    dir: &DataDir,
    record: &HeldRecord,
    (id, forks): (InstanceId, &ForkChain),
    (from, position): (&InstanceId, u64),
    taken_ns: i64,
) -> io::Result<(usize, usize)> {
    let vouched = record.vouched(from);
    let total = vouched.len();
    let files: Vec<_> = vouched
        .into_iter()
        .filter_map(|v| {
            let born_at = v.born_at.unwrap_or(position);
            (born_at <= position).then(|| {
                let kept = crate::catalog::Kept {
                    born_at,
                    len_bytes: v.stamp.len_bytes,
                };
                (v.path, kept, v.stamp)
            })
        })
        .collect();
    let refs = files.iter().map(|(p, k, s)| (p, *k, *s));
    let at = (position, position); // its files are the old leader's at `position`
    crate::leader_record::save_files(dir, (&id, forks), at, taken_ns, refs)?;
    Ok((files.len(), total))
}

/// A fork written by `fork_if_followed`.
#[derive(Debug)]
pub(crate) struct Forked {
    /// The new instance.
    pub(crate) id: InstanceId,
    /// What it goes on from: the instance followed, then that one's chain as this dir was told
    /// it (`fork_chain::ToldChains`).
    pub(crate) forks: ForkChain,
    /// Files written into the record, and those the held record names under the first link.
    pub(crate) held: usize,
    pub(crate) total: usize,
}

/// When this dir followed since it last led (its held record written after its own leader's
/// record, or no such record), its instance goes on from the one it followed, up to the last
/// MARK it synced (`docs/PROTOCOL.md`, *After a failover*), and from what that one went on from
/// (*After failovers in a row*): a new instance, and a leader's record of it that the start
/// resumes, so that followers' files held under those instances up to there count as held.
/// `None` when it led since, or holds nothing.
pub(crate) fn fork_if_followed(dir: &DataDir, settled: Settled) -> io::Result<Option<Forked>> {
    let Some(held_at) = written_at(dir, crate::follower::held::FILE_NAME) else {
        return Ok(None);
    };
    if written_at(dir, crate::leader_record::FILE_NAME).is_some_and(|led_at| led_at >= held_at) {
        return Ok(None); // it led since it last followed: its own record is the newer
    }
    let record = HeldRecord::load(dir);
    let Some(fork) = record.fork_point() else {
        return Ok(None);
    };
    let id = crate::auth::random_instance()?;
    let forks = ForkChain::forked(fork, &ToldChains::load(dir).chain_of(&fork.from));
    let at = (&fork.from, fork.position);
    let taken_ns = settled.taken_ns(held_at);
    let (held, total) = record_from_held(dir, &record, (id, &forks), at, taken_ns)?;
    Ok(Some(Forked {
        id,
        forks,
        held,
        total,
    }))
}

impl Forked {
    /// Logs the fork: `synced` says whose last MARK its position is, and why it forked.
    pub(crate) fn log(&self, synced: &str) {
        let Some(fork) = self.forks.first() else {
            return;
        };
        // The earlier links after the counts, which tests and operators read first.
        let mut earlier = String::new();
        for pair in self.forks.links().windows(2) {
            let (newer, older) = (hex(&pair[0].from), hex(&pair[1].from));
            let at = pair[1].position;
            let _ = write!(
                earlier,
                "; instance {newer} goes on from instance {older} up to position {at}"
            );
        }
        tracing::info!(
            "forking instance {} from instance {} at position {}, the last {synced}: {} of {} \
             files held{earlier}",
            hex(&self.id),
            hex(&fork.from),
            fork.position,
            self.held,
            self.total
        );
    }
}

/// When the state file `name` was last written, if there is one.
fn written_at(dir: &DataDir, name: &str) -> Option<SystemTime> {
    std::fs::metadata(dir.state_path(name))
        .and_then(|m| m.modified())
        .ok()
}

fn ns_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Kept;
    use crate::frame::Fork;
    use crate::paths::RelPath;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    fn ctime_ns(path: &std::path::Path) -> i64 {
        let m = std::fs::metadata(path).unwrap();
        m.ctime() * 1_000_000_000 + m.ctime_nsec()
    }

    fn set_written_at(dir: &DataDir, name: &str, t: SystemTime) {
        let file = std::fs::File::options()
            .write(true)
            .open(dir.state_path(name));
        file.unwrap().set_modified(t).unwrap();
    }

    /// A dir that followed since it last led forks the instance it followed: a leader's record
    /// of a new instance naming that one and the last MARK it synced, vouching for the files it
    /// holds. One that led since it last followed resumes its own record instead, and one that
    /// holds nothing writes none.
    #[test]
    fn a_dir_forks_the_instance_it_followed_unless_it_led_since() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        let seg = RelPath::new("seg").unwrap();
        assert!(fork_if_followed(&dir, Settled::ByNow).unwrap().is_none());
        assert!(
            crate::leader_record::take(&dir, None).is_none(),
            "nothing held: no record"
        );

        let followed = [1u8; 16];
        let mut held = HeldRecord::load(&dir);
        held.record_as_is(&dir, (followed, 700), [seg.clone()], |_| Some(3));
        held.save(&dir).unwrap();
        let forked = fork_if_followed(&dir, Settled::ByNow).unwrap().unwrap();
        let forks = ForkChain::of([Fork {
            from: followed,
            position: 700,
        }])
        .unwrap();
        assert_eq!((&forked.forks, forked.held, forked.total), (&forks, 1, 1));
        let resumed = crate::leader_record::take(&dir, None).unwrap();
        assert_eq!(resumed.forks, forks);
        assert_eq!(resumed.instance, forked.id);
        assert_ne!(resumed.instance, followed, "a new instance");
        assert_eq!(resumed.last_position, 700);
        let kept = Kept {
            born_at: 3,
            len_bytes: 10,
        };
        assert_eq!(resumed.kept.get(&seg), Some(&kept));

        // It leads, and its own record is written after its held record: that one it resumes.
        let a_while_ago = SystemTime::now() - Duration::from_secs(10);
        set_written_at(&dir, crate::follower::held::FILE_NAME, a_while_ago);
        let own = [9u8; 16];
        let stamp = crate::index::Stamp::look(&dir, &seg).unwrap().unwrap();
        let line = (&seg, kept, stamp);
        let taken_ns = crate::leader_record::settled_by_now_ns();
        let at = (900, 900);
        let none = ForkChain::none();
        crate::leader_record::save_files(&dir, (&own, &none), at, taken_ns, [line]).unwrap();
        assert!(fork_if_followed(&dir, Settled::ByNow).unwrap().is_none());
        let resumed = crate::leader_record::take(&dir, None).unwrap();
        assert_eq!((resumed.instance, resumed.forks), (own, none));
    }

    /// A dir that followed a forked instance, and was told its chain, forks with that chain
    /// behind its own link (`docs/PROTOCOL.md`, *After failovers in a row*): a follower that
    /// missed both failovers still holds what it recorded before the first.
    #[test]
    fn a_dir_told_a_fork_chain_forks_with_that_chain_behind_its_own_link() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let (followed, older, oldest) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let link = |from, position| Fork { from, position };
        let told = ForkChain::of([link(older, 800), link(oldest, 600)]).unwrap();
        ToldChains::remember(&dir, followed, &told, |_| false).unwrap();
        let mut held = HeldRecord::load(&dir);
        held.record_as_is(&dir, (followed, 700), [seg.clone()], |_| Some(3));
        held.save(&dir).unwrap();
        let forked = fork_if_followed(&dir, Settled::ByNow).unwrap().unwrap();
        let want = [link(followed, 700), link(older, 700), link(oldest, 600)];
        assert_eq!(forked.forks.links(), want);
        let resumed = crate::leader_record::take(&dir, None).unwrap();
        assert_eq!((resumed.instance, resumed.forks), (forked.id, forked.forks));
    }

    /// A follower's stop dates its held record as the kernel dates a write, so a leader's
    /// record written right after it (a handoff's target's, a node's fork) is never the older:
    /// a leader's start does not fork over it.
    #[test]
    fn a_record_written_right_after_the_follower_stopped_is_the_newer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("seg"), b"0123456789").unwrap();
        let seg = RelPath::new("seg").unwrap();
        let mut held = HeldRecord::load(&dir);
        held.record_as_is(&dir, ([1u8; 16], 700), [seg.clone()], |_| None);
        held.save(&dir).unwrap();
        for _ in 0..20 {
            HeldRecord::date_stop(&dir);
            let own = [9u8; 16];
            let stamp = crate::index::Stamp::look(&dir, &seg).unwrap().unwrap();
            let kept = Kept {
                born_at: 700,
                len_bytes: 10,
            };
            let taken_ns = crate::leader_record::settled_by_now_ns();
            let files = [(&seg, kept, stamp)];
            crate::leader_record::save_files(
                &dir,
                (&own, &ForkChain::none()),
                (700, 700),
                taken_ns,
                files,
            )
            .unwrap();
            assert!(fork_if_followed(&dir, Settled::AtHeldSave)
                .unwrap()
                .is_none());
        }
    }

    /// Where an application may have written since the follower stopped (a leader's start), a
    /// fork vouches only for the files whose ctime is `LEADER_RECORD_SETTLE_MS` older than the
    /// held record's mtime, and an mtime in the future counts as now; at a node's election, for
    /// every file.
    #[test]
    fn a_fork_at_a_leader_s_start_vouches_only_for_files_settled_by_the_follower_s_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let (old, new) = (RelPath::new("old").unwrap(), RelPath::new("new").unwrap());
        std::fs::write(tmp.path().join("old"), b"settled").unwrap();
        let settle_ns = crate::leader_record::LEADER_RECORD_SETTLE_MS as i64 * 1_000_000;
        // The clock passes the old file's settling (and the coarse clock's lag behind it).
        let settled_at_ns = ctime_ns(&tmp.path().join("old")) + settle_ns + 100_000_000;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::index::now_ns() < settled_at_ns {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock stands still"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(tmp.path().join("new"), b"written last").unwrap();
        let future = SystemTime::now() + Duration::from_secs(3600);
        for (settled, dated, kept) in [
            (Settled::AtHeldSave, None, 1),
            (Settled::AtHeldSave, Some(future), 1),
            (Settled::ByNow, None, 2),
        ] {
            let mut held = HeldRecord::load(&dir);
            let paths = [old.clone(), new.clone()];
            held.record_as_is(&dir, ([1u8; 16], 700), paths, |_| None);
            held.save(&dir).unwrap();
            if let Some(t) = dated {
                set_written_at(&dir, crate::follower::held::FILE_NAME, t);
            }
            let forked = fork_if_followed(&dir, settled).unwrap().unwrap();
            assert_eq!((forked.held, forked.total), (2, 2), "{settled:?}");
            let resumed = crate::leader_record::take(&dir, None).unwrap();
            assert_eq!(resumed.kept.len(), kept, "{settled:?} {dated:?}");
            assert!(resumed.kept.contains_key(&old), "{settled:?}");
        }
    }
}
