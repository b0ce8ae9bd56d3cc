//! How loadgen writes messages, the way a broker does: into preallocated segment files that
//! roll over at a fixed size, through a shared mmap (then told to the embedded leader with
//! `append`), or with write(2) into a directory `ferry lead` watches.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One writer's current segment.
pub struct SegmentWriter {
    dir: PathBuf,
    writer_id: usize,
    segment_bytes: u64,
    use_mmap: bool,
    segment_no: u64,
    /// `rel(segment_no)`, formatted once per segment rather than once per message.
    segment_path: String,
    offset: u64,
    file: Option<File>,
    map: Option<Mmap>,
}

/// A shared, writable mapping of a whole segment.
struct Mmap {
    ptr: *mut u8,
    len_bytes: usize,
}

impl Mmap {
    fn new(file: &File, len_bytes: usize) -> io::Result<Mmap> {
        use std::os::fd::AsRawFd;
        // SAFETY: maps `len_bytes` of an open file we own, shared and writable; the result is
        // checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: ptr.cast(),
            len_bytes,
        })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len_bytes,
            "write beyond the mapping"
        );
        // SAFETY: the range lies inside the mapping (asserted above), which stays mapped until
        // drop; `bytes` cannot overlap it (it is a separate heap buffer).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len_bytes) };
    }
}

// SAFETY: the mapping is owned by one SegmentWriter and only used from the thread that owns it.
unsafe impl Send for Mmap {}

/// Where a message landed: the file (relative to the data dir) and its offset.
pub struct Written<'a> {
    pub path: &'a str,
    pub offset: u64,
}

impl SegmentWriter {
    pub fn new(dir: &Path, writer_id: usize, segment_bytes: u64, use_mmap: bool) -> SegmentWriter {
        SegmentWriter {
            dir: dir.to_path_buf(),
            writer_id,
            segment_bytes,
            use_mmap,
            segment_no: 0,
            segment_path: String::new(),
            offset: 0,
            file: None,
            map: None,
        }
    }

    fn rel(&self, n: u64) -> String {
        format!("queues/w{}/{:08}.seg", self.writer_id, n)
    }

    fn open_next(&mut self) -> io::Result<()> {
        if self.file.is_some() {
            self.finish()?;
            self.segment_no += 1;
        }
        self.segment_path = self.rel(self.segment_no);
        let path = self.dir.join(&self.segment_path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        if self.use_mmap {
            // Preallocated as a broker does; followers still get only the written bytes.
            file.set_len(self.segment_bytes)?;
            self.map = Some(Mmap::new(&file, self.segment_bytes as usize)?);
        }
        self.file = Some(file);
        self.offset = 0;
        Ok(())
    }

    /// Writes one message; rolls over to a new segment when it would not fit.
    pub fn write(&mut self, message: &[u8]) -> io::Result<Written<'_>> {
        if self.file.is_none() || self.offset + message.len() as u64 > self.segment_bytes {
            self.open_next()?;
        }
        let offset = self.offset;
        match (&mut self.map, &self.file) {
            (Some(map), _) => map.write(offset as usize, message),
            (None, Some(file)) => file.write_all_at(message, offset)?,
            (None, None) => return Err(io::Error::other("no segment open")),
        }
        self.offset += message.len() as u64;
        Ok(Written {
            path: &self.segment_path,
            offset,
        })
    }

    /// Closes the current segment, trimming the preallocation to what was written, as a
    /// broker does when it closes a segment (the bytes beyond were never part of it).
    pub fn finish(&mut self) -> io::Result<()> {
        self.map = None;
        if let Some(file) = self.file.take() {
            file.set_len(self.offset)?;
        }
        Ok(())
    }
}
