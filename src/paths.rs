//! (placeholder until the full module lands) Validated relative paths.
pub const MAX_PATH_LEN_BYTES: usize = 4096;
pub const STATE_DIR_NAME: &str = ".ferry";

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} is not valid")]
    Invalid(String),
    #[error("path is not UTF-8")]
    NotUtf8,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);
impl RelPath {
    pub fn new(s: &str) -> Result<RelPath, PathError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PATH_LEN_BYTES
            && !s.contains('\0')
            && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && s.split('/').next() != Some(STATE_DIR_NAME);
        if ok {
            Ok(RelPath(s.to_string()))
        } else {
            Err(PathError::Invalid(s.to_string()))
        }
    }
    pub fn from_bytes(b: &[u8]) -> Result<RelPath, PathError> {
        RelPath::new(std::str::from_utf8(b).map_err(|_| PathError::NotUtf8)?)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
