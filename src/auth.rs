//! Challenge-response authentication on a shared secret (`docs/PROTOCOL.md`, frames 0x01-0x03).
//!
//! Each side proves it knows the secret with an HMAC-SHA256 tag over both nonces and a label that
//! says which side made it, so a tag cannot be replayed in the other direction or another session.
//! The secret itself never crosses the wire, and tags are compared in constant time.

use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::frame::{Mac, Nonce, NONCE_BYTES};

const FOLLOWER_LABEL: &[u8] = b"ferry-auth-v1 follower";
const LEADER_LABEL: &[u8] = b"ferry-auth-v1 leader";

/// The shared secret. Its bytes are never logged or sent. (Equality compares two secrets this
/// process holds, as a rotation replaces one: never a peer's tag, which `tags_equal` compares.)
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Refuses an empty secret: it would authenticate anyone.
    pub fn new(bytes: Vec<u8>) -> Result<Secret, &'static str> {
        if bytes.is_empty() {
            return Err("the shared secret is empty");
        }
        Ok(Secret(bytes))
    }

    /// Its bytes: for a store that keeps it (etcd's `PREFIX/secret`), never for a log or a peer.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn tag(&self, label: &[u8], leader_nonce: &Nonce, follower_nonce: &Nonce) -> Mac {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(label);
        mac.update(leader_nonce);
        mac.update(follower_nonce);
        mac.finalize().into_bytes().into()
    }

    pub fn follower_tag(&self, leader_nonce: &Nonce, follower_nonce: &Nonce) -> Mac {
        self.tag(FOLLOWER_LABEL, leader_nonce, follower_nonce)
    }

    pub fn leader_tag(&self, leader_nonce: &Nonce, follower_nonce: &Nonce) -> Mac {
        self.tag(LEADER_LABEL, leader_nonce, follower_nonce)
    }
}

/// The secrets a leader accepts: the current one and, during a rotation, the previous one. A
/// follower authenticates with `current`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Secrets {
    pub current: Secret,
    pub previous: Option<Secret>,
}

impl Secrets {
    /// One secret, no rotation under way.
    pub fn one(current: Secret) -> Secrets {
        Secrets {
            current,
            previous: None,
        }
    }

    /// What a process logs having read its secrets again (SIGHUP): whether they changed, and
    /// what it now accepts.
    pub fn reloaded(&self, changed: bool) -> String {
        format!(
            "shared secrets read again{}: {}",
            if changed { "" } else { ", unchanged" },
            if self.previous.is_some() {
                "the current one, and a previous one accepted too"
            } else {
                "only the current one accepted (a connection made with another is closed)"
            }
        )
    }
}

/// `Secrets` that may change while in use (a rotation through etcd, `cluster`'s secret poll):
/// each connection takes them as it connects. Clones share them.
#[derive(Clone, Debug)]
pub struct SharedSecrets(Arc<Mutex<Secrets>>);

impl SharedSecrets {
    pub fn new(secrets: Secrets) -> SharedSecrets {
        SharedSecrets(Arc::new(Mutex::new(secrets)))
    }

    pub fn get(&self) -> Secrets {
        // Replaced whole by one assignment: a poisoned lock still holds a consistent value.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces them; whether that changed them.
    pub fn set(&self, secrets: Secrets) -> bool {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *held != secrets;
        *held = secrets;
        changed
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Constant-time equality of two tags: the time taken does not depend on where they differ.
pub fn tags_equal(a: &Mac, b: &Mac) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// A fresh random nonce from the kernel's CSPRNG.
pub fn random_nonce() -> std::io::Result<Nonce> {
    let mut nonce = [0u8; NONCE_BYTES];
    fill_random(&mut nonce)?;
    Ok(nonce)
}

/// A data dir's lineage id, from the kernel's CSPRNG.
pub fn random_lineage() -> std::io::Result<crate::frame::LineageId> {
    let mut id = [0u8; crate::frame::LINEAGE_ID_BYTES];
    fill_random(&mut id)?;
    Ok(id)
}

/// A leader's instance id, from the kernel's CSPRNG.
pub fn random_instance() -> std::io::Result<crate::frame::InstanceId> {
    let mut id = [0u8; crate::frame::INSTANCE_ID_BYTES];
    fill_random(&mut id)?;
    Ok(id)
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_secret_side_and_both_nonces() {
        let s = Secret::new(b"s3cret".to_vec()).unwrap();
        let other = Secret::new(b"s3creT".to_vec()).unwrap();
        let (l, f) = ([1u8; 32], [2u8; 32]);
        let t = s.follower_tag(&l, &f);
        assert!(tags_equal(&t, &s.follower_tag(&l, &f)));
        assert!(!tags_equal(&t, &other.follower_tag(&l, &f)));
        assert!(!tags_equal(&t, &s.leader_tag(&l, &f)));
        assert!(!tags_equal(&t, &s.follower_tag(&f, &l)));
    }

    #[test]
    fn empty_secret_is_refused_and_nonces_differ() {
        assert!(Secret::new(Vec::new()).is_err());
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }
}
