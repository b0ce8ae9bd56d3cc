//! A leader instance's fork chain (`docs/PROTOCOL.md`, *After a failover*, *After failovers in
//! a row*): the instance it goes on from and up to which position, then what that one goes on
//! from, and so on, at most `MAX_FORK_CHAIN` links. A follower holding a file under any link's
//! instance, looked at after a MARK at or below that link's position, holds it under the
//! leader's instance too.
//!
//! And the chains a follower was told (`DIR/.ferry/forks`): a dir that followed a forked
//! instance and is then led forks from it with that instance's chain behind its own link, so a
//! follower that missed two failovers in a row still holds what it recorded before the first.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;

use crate::frame::{Fork, InstanceId, MAX_FORK_CHAIN};
use crate::index::{from_hex, hex};
use crate::paths::{DataDir, StateSync};

/// The links of one instance's fork chain, in order; empty when the instance is no fork.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForkChain(Vec<Fork>);

/// Why a link cannot follow a chain's others (`ForkChain::push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefused {
    /// The chain has `MAX_FORK_CHAIN` links already.
    TooMany,
    /// Its position is above the one before's: a chain's positions never rise.
    AboveTheOneBefore { before: u64 },
}

impl std::fmt::Display for LinkRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkRefused::TooMany => write!(f, "more than MAX_FORK_CHAIN ({MAX_FORK_CHAIN}) links"),
            LinkRefused::AboveTheOneBefore { before } => write!(
                f,
                "a link's position above the one before's, {before}: a fork chain's positions \
                 never rise"
            ),
        }
    }
}

impl ForkChain {
    /// The chain of an instance that goes on from nothing.
    pub fn none() -> ForkChain {
        ForkChain(Vec::new())
    }

    /// A chain of these links, or why one of them cannot follow the ones before.
    pub fn of(links: impl IntoIterator<Item = Fork>) -> Result<ForkChain, LinkRefused> {
        let mut chain = ForkChain::none();
        for link in links {
            chain.push(link)?;
        }
        Ok(chain)
    }

    /// The chain of a fork from `fork.from` at `fork.position`, where `from_chain` is what
    /// `fork.from` itself goes on from: its link first, then each of `from_chain`'s with its
    /// position no higher than the fork's (the new instance saw `fork.from` only up to there),
    /// cut at `MAX_FORK_CHAIN` links.
    pub fn forked(fork: Fork, from_chain: &ForkChain) -> ForkChain {
        let later = from_chain.0.iter().map(|link| Fork {
            from: link.from,
            position: link.position.min(fork.position),
        });
        let mut links: Vec<Fork> = std::iter::once(fork).chain(later).collect();
        // Each link's position is already at most its predecessor's: no link is refused.
        links.truncate(MAX_FORK_CHAIN);
        ForkChain(links)
    }

    /// Adds the next link (the instance the last one goes on from).
    pub fn push(&mut self, link: Fork) -> Result<(), LinkRefused> {
        if self.0.len() >= MAX_FORK_CHAIN {
            return Err(LinkRefused::TooMany);
        }
        match self.0.last() {
            Some(before) if link.position > before.position => {
                Err(LinkRefused::AboveTheOneBefore {
                    before: before.position,
                })
            }
            _ => {
                self.0.push(link);
                Ok(())
            }
        }
    }

    /// Whether the instance is a fork at all.
    pub fn is_fork(&self) -> bool {
        !self.0.is_empty()
    }

    /// The instance's own fork: what it goes on from directly.
    pub fn first(&self) -> Option<&Fork> {
        self.0.first()
    }

    pub fn links(&self) -> &[Fork] {
        &self.0
    }

    /// Whether what was looked at after a MARK at `position` of `instance` is part of the
    /// history this chain's instance goes on from.
    pub fn shares(&self, instance: &InstanceId, position: u64) -> bool {
        self.0
            .iter()
            .any(|link| link.from == *instance && position <= link.position)
    }

    /// The chain that words `FROM P FROM P ...` name (a handoff's `PREFIX/handoff-fork` after
    /// its instance), or why they name none: not pairs of an instance in hex and a position, or
    /// a link refused (`push`).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<ForkChain, String> {
        const PAIRS: &str = "not pairs of an instance in hex and a position";
        let mut words = words.into_iter();
        let mut chain = ForkChain::none();
        while let Some(from) = words.next() {
            let link = words.next().and_then(|position| parse_link(from, position));
            chain
                .push(link.ok_or(PAIRS)?)
                .map_err(|refused| refused.to_string())?;
        }
        Ok(chain)
    }

    /// A text for people: `a fork of instance F at position P, itself a fork of ...`.
    pub fn describe(&self) -> String {
        describe_links(self.0.iter().map(|link| (hex(&link.from), link.position)))
    }
}

/// `a fork of instance F at position P, itself a fork of instance G at position Q, ...` of the
/// links, each an instance and a position as text gives them (a chain, a `ferry_info`'s labels,
/// an etcd value): the one wording of a chain for logs and status.
pub fn describe_links<F: std::fmt::Display, P: std::fmt::Display>(
    links: impl IntoIterator<Item = (F, P)>,
) -> String {
    let mut text = String::new();
    for (n, (from, position)) in links.into_iter().enumerate() {
        let lead = if n == 0 { "a fork" } else { ", itself a fork" };
        let _ = write!(text, "{lead} of instance {from} at position {position}");
    }
    text
}

/// A link as text writes it (a leader's record, the told chains): the instance `from` in hex,
/// and `position` in decimal.
pub(crate) fn parse_link(from: &str, position: &str) -> Option<Fork> {
    Some(Fork {
        from: from_hex(from)?,
        position: position.parse().ok()?,
    })
}

/// The file of the chains a follower was told, in `DIR/.ferry/`.
pub(crate) const FILE_NAME: &str = "forks";
const HEADER: &str = "ferry-forks-v1";

/// The chains leaders named to this dir while it followed, by the leader's instance
/// (`DIR/.ferry/forks`).
#[derive(Debug, Default)]
pub struct ToldChains {
    chains: HashMap<InstanceId, ForkChain>,
}

impl ToldChains {
    /// The chains in `DIR/.ferry/forks`; none when it is missing, unreadable or corrupt (a
    /// fork from an instance then names that instance alone).
    pub fn load(dir: &DataDir) -> ToldChains {
        let path = dir.state_path(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return ToldChains::default(),
            Err(e) => {
                tracing::warn!("ignoring the fork chains in {}: {e}", path.display());
                return ToldChains::default();
            }
        };
        ToldChains::parse(&text).unwrap_or_else(|| {
            tracing::warn!(
                "ignoring the fork chains in {}: the file is corrupt; a fork of this dir's \
                 names only the instance it followed",
                path.display()
            );
            ToldChains::default()
        })
    }

    fn parse(text: &str) -> Option<ToldChains> {
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let mut chains: HashMap<InstanceId, ForkChain> = HashMap::new();
        for line in lines {
            let mut words = crate::index::fields(line, 3);
            let instance = from_hex(words.next()?)?;
            let link = parse_link(words.next()?, words.next()?)?;
            chains.entry(instance).or_default().push(link).ok()?;
        }
        Some(ToldChains { chains })
    }

    /// What `instance` goes on from, as a leader of it said; no links when none did.
    pub fn chain_of(&self, instance: &InstanceId) -> ForkChain {
        self.chains.get(instance).cloned().unwrap_or_default()
    }

    /// Keeps `chain`, named by a leader of `instance`, writing the file again when it is new;
    /// the chains of instances for which `keep` is false are left out then.
    pub fn remember(
        dir: &DataDir,
        instance: InstanceId,
        chain: &ForkChain,
        keep: impl Fn(&InstanceId) -> bool,
    ) -> io::Result<()> {
        let mut told = ToldChains::load(dir);
        if !chain.is_fork() || told.chains.get(&instance) == Some(chain) {
            return Ok(());
        }
        told.chains.retain(|i, _| keep(i));
        told.chains.insert(instance, chain.clone());
        let mut instances: Vec<&InstanceId> = told.chains.keys().collect();
        instances.sort();
        let mut text = format!("{HEADER}\n");
        for instance in instances {
            for link in told.chains[instance].links() {
                let (i, from) = (hex(instance), hex(&link.from));
                let _ = writeln!(text, "{i} {from} {}", link.position);
            }
        }
        dir.replace_state_file(FILE_NAME, text.as_bytes(), StateSync::Volatile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(from: u8, position: u64) -> Fork {
        Fork {
            from: [from; 16],
            position,
        }
    }

    /// A fork of a fork names both instances, the older one only up to where the new instance
    /// saw it; and a chain never grows past `MAX_FORK_CHAIN`, the oldest links dropped.
    #[test]
    fn a_fork_of_a_fork_goes_on_from_both_up_to_the_lower_position() {
        let first = ForkChain::forked(link(1, 500), &ForkChain::none());
        assert_eq!(first.links(), &[link(1, 500)]);
        let second = ForkChain::forked(link(2, 900), &first);
        assert_eq!(second.links(), &[link(2, 900), link(1, 500)]);
        assert!(second.shares(&[1; 16], 500) && !second.shares(&[1; 16], 501));
        assert!(second.shares(&[2; 16], 900) && !second.shares(&[2; 16], 901));
        assert!(!second.shares(&[3; 16], 1));
        // A fork taken below an older link's position sees the older instance only up to it.
        let low = ForkChain::forked(link(3, 400), &second);
        assert_eq!(low.links(), &[link(3, 400), link(2, 400), link(1, 400)]);
        let mut long = ForkChain::none();
        for n in 0..20u8 {
            long = ForkChain::forked(link(n, 1000 - u64::from(n)), &long);
        }
        assert_eq!(long.links().len(), MAX_FORK_CHAIN);
        assert_eq!(long.first(), Some(&link(19, 981)), "the newest link first");
    }

    /// A chain's positions never rise along it, and it has at most `MAX_FORK_CHAIN` links:
    /// what a follower refuses from a leader, and a record or etcd value that says otherwise.
    #[test]
    fn a_chain_refuses_a_link_above_the_one_before_or_past_its_limit() {
        let mut chain = ForkChain::none();
        assert_eq!(chain.push(link(1, 10)), Ok(()));
        assert_eq!(
            chain.push(link(2, 11)),
            Err(LinkRefused::AboveTheOneBefore { before: 10 })
        );
        for n in 1..MAX_FORK_CHAIN {
            assert_eq!(chain.push(link(2, 10)), Ok(()), "link {n}");
        }
        assert_eq!(chain.push(link(2, 1)), Err(LinkRefused::TooMany));
        let words: Vec<String> = chain
            .links()
            .iter()
            .map(|l| format!("{} {}", hex(&l.from), l.position))
            .collect();
        let words = words.join(" ");
        assert_eq!(ForkChain::from_words(words.split(' ')), Ok(chain));
        for bad in [
            "01",
            "x 1",
            &format!("{} -1", hex(&[1; 16])),
            &hex(&[1; 16]),
        ] {
            let err = ForkChain::from_words(bad.split(' ')).unwrap_err();
            assert!(err.contains("not pairs"), "{bad}: {err}");
        }
        let rising = format!("{} 1 {} 2", hex(&[1; 16]), hex(&[2; 16]));
        let err = ForkChain::from_words(rising.split(' ')).unwrap_err();
        assert!(err.contains("above the one before"), "{err}");
    }

    /// The chains a follower was told come back as written, for the instances kept; a file
    /// that is not what was written is none.
    #[test]
    fn told_chains_read_back_as_written_for_the_instances_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        assert_eq!(ToldChains::load(&dir).chain_of(&[9; 16]), ForkChain::none());
        let chain = ForkChain::of([link(1, 50), link(0, 40)]).unwrap();
        ToldChains::remember(&dir, [9; 16], &chain, |_| true).unwrap();
        let other = ForkChain::of([link(2, 70)]).unwrap();
        ToldChains::remember(&dir, [8; 16], &other, |i| *i == [9; 16]).unwrap();
        let told = ToldChains::load(&dir);
        assert_eq!(
            (told.chain_of(&[9; 16]), told.chain_of(&[8; 16])),
            (chain, other)
        );
        ToldChains::remember(&dir, [7; 16], &ForkChain::of([link(3, 1)]).unwrap(), |_| {
            false
        })
        .unwrap();
        let told = ToldChains::load(&dir);
        assert_eq!(told.chain_of(&[9; 16]), ForkChain::none(), "not kept");
        assert_eq!(told.chain_of(&[7; 16]).links(), &[link(3, 1)]);
        std::fs::write(dir.state_path(FILE_NAME), "ferry-forks-v1\nbad\n").unwrap();
        assert_eq!(ToldChains::load(&dir).chain_of(&[7; 16]), ForkChain::none());
    }
}
