//! A data dir's lineage (`docs/PROTOCOL.md`, *Lineage*): random bytes drawn by the first leader
//! of a dir and kept in `DIR/.ferry/lineage`, which every follower copies into its own before it
//! changes a file. A follower can then tell a copy of another data dir (pointed at the wrong
//! leader) from a stale copy of this one, and declines to replace the first.

use std::io;

use crate::frame::{LineageId, LINEAGE_ID_BYTES};
use crate::index::hex;
use crate::paths::{DataDir, StateSync};

/// `DIR/.ferry/lineage`: the id as lowercase hex and a newline.
pub const FILE_NAME: &str = "lineage";

/// The lineage recorded in `dir`, if any. A file that does not hold one is an error naming it.
pub fn read(dir: &DataDir) -> io::Result<Option<LineageId>> {
    let path = dir.state_path(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    parse(text.trim_end_matches('\n')).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} does not hold a lineage id ({} hexadecimal digits): delete it, and this \
                 data dir takes the lineage of the next leader it follows, or draws a new one \
                 when it leads",
                path.display(),
                2 * LINEAGE_ID_BYTES
            ),
        )
    })
}

/// A lineage id from its hex form (`hex`), if `text` is one.
pub fn parse(text: &str) -> Option<LineageId> {
    if text.len() != 2 * LINEAGE_ID_BYTES || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; LINEAGE_ID_BYTES];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// Records `id` as `dir`'s lineage, durably (`StateSync::Durable`): a crash leaves the old
/// lineage or the new, and a power loss after a leader served under a lineage cannot make it
/// draw another.
pub fn write(dir: &DataDir, id: &LineageId) -> io::Result<()> {
    let text = format!("{}\n", hex(id));
    dir.replace_state_file(FILE_NAME, text.as_bytes(), StateSync::Durable)
}

/// The lineage a leader of `dir` serves: the one recorded, or a new one drawn and recorded (a
/// dir that never was a copy, or whose `.ferry/` was lost).
pub fn of_leader(dir: &DataDir) -> io::Result<LineageId> {
    if let Some(id) = read(dir)? {
        return Ok(id);
    }
    let id = crate::auth::random_lineage()?;
    write(dir, &id)?;
    tracing::info!(
        "{} had no lineage: drew {} (followers holding copies of another data dir decline to \
         follow this one)",
        dir.root().display(),
        hex(&id)
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_draws_a_lineage_once_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        assert_eq!(read(&dir).unwrap(), None);
        let id = of_leader(&dir).unwrap();
        assert_eq!(of_leader(&dir).unwrap(), id);
        let text = std::fs::read_to_string(tmp.path().join(".ferry/lineage")).unwrap();
        assert_eq!(text, format!("{}\n", hex(&id)));
        write(&dir, &[0xab; LINEAGE_ID_BYTES]).unwrap();
        assert_eq!(read(&dir).unwrap(), Some([0xab; LINEAGE_ID_BYTES]));
        assert_eq!(
            parse(&"+a".repeat(LINEAGE_ID_BYTES)),
            None,
            "a sign is no digit"
        );
        std::fs::write(tmp.path().join(".ferry/lineage"), "not hex\n").unwrap();
        let e = read(&dir).unwrap_err();
        assert!(e.to_string().contains("does not hold a lineage id"), "{e}");
    }
}
