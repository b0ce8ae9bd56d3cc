//! The follower's payload path, pipelined across two cores: the connection's task moves bytes
//! socket -> pipe with non-blocking splice(2) (page references, no copy), and hands each full
//! pipe to a writer that moves it pipe -> file (the one copy, into the page cache) while the
//! task already fills the next pipe. With the io_uring engine the writer is an IORING_OP_SPLICE,
//! which the kernel runs on an io-wq worker; with the fallback engine it is a writer thread doing
//! the same splice(2). `RECEIVE_PIPES_MAX` pipes rotate; `flush` waits for every write in flight.
//! A payload of at most `INLINE_RECEIVE_BYTES_MAX` that finds nothing in flight (a round of
//! small appends while streaming) is spliced both ways by the task itself: for a few KiB the
//! hand-off costs more than the copy it moves to another core.
//!
//! Writes into a file under its real name (`Dest::in_order`) go through the writer thread (or
//! the task itself, when nothing is in flight), one after the other, each to its end: such a
//! file only ever grows by a prefix of what is in flight, so a crash leaves no hole under a
//! real name. SPLICEs on the ring run
//! concurrently on io-wq workers (and a short one's remainder queues behind the next), so a
//! later range could land first; they carry only whole-file transfers into `.ferry/tmp/`, which
//! are renamed into place after `flush`.
//!
//! Measured here: a single task doing both splices (or recv + pwrite) is CPU-bound on one core;
//! the copy into the page cache is the expensive half, and overlapping it with the receive is
//! what brings a full sync near the machine's raw splice figure.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{EngineKind, Pipe};
use crate::frame::LEADER_SILENCE_TIMEOUT_MS;

/// Pipes in rotation per connection (each holds up to `RECEIVE_PIPE_BYTES`).
pub const RECEIVE_PIPES_MAX: usize = 4;

/// A payload up to this long, arriving while no write is in flight, is written by the
/// connection's task itself (socket -> pipe -> file, both splices here): handing a round of
/// small appends to the writer costs two thread switches and a wake-up of this runtime, more
/// than overlapping its copy saves (the MARK after it waits for the write anyway). Longer
/// payloads (a full sync's files, 1 MiB appends) are pipelined as the module doc says.
pub const INLINE_RECEIVE_BYTES_MAX: u64 = 256 * 1024;

/// Where a payload goes.
#[derive(Clone)]
pub struct Dest {
    pub file: Arc<File>,
    /// The file's path, for the error if a write fails.
    pub path: Arc<str>,
    /// The file is under its real name: its writes must land in order (see the module doc).
    pub in_order: bool,
}

struct Job {
    pipe: Pipe,
    dest: Dest,
    offset: u64,
    len_bytes: usize,
}

type Done = (Pipe, io::Result<()>);

/// A payload write into a file failed (the disk, not the socket). It travels inside the
/// `io::Error` the receiver returns, so the follower can tell the leader and name the file.
#[derive(Debug)]
pub struct WriteFailed {
    pub path: Arc<str>,
    pub source: io::Error,
}

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write {}: {}", self.path, self.source)
    }
}

impl std::error::Error for WriteFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl WriteFailed {
    fn wrap(path: &Arc<str>, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            WriteFailed {
                path: path.clone(),
                source: e,
            },
        )
    }
}

/// Whether `e` is a failed write into a file (`WriteFailed`) rather than a socket error.
pub fn is_write_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<WriteFailed>())
}

/// Who moves a full pipe into its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// An IORING_OP_SPLICE (run by the kernel on an io-wq worker).
    Ring,
    /// A dedicated thread doing splice(2).
    Thread,
}

pub struct Receiver {
    writer: Writer,
    free: Vec<Pipe>,
    pipes_total: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    thread: Option<std::sync::mpsc::Sender<Job>>,
    error: Option<io::Error>,
}

impl Receiver {
    pub fn new(kind: EngineKind) -> Receiver {
        let writer = match kind {
            EngineKind::Uring => Writer::Ring,
            EngineKind::Fallback => Writer::Thread,
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Receiver {
            writer,
            free: Vec::new(),
            pipes_total: 0,
            done_tx,
            done_rx,
            thread: None,
            error: None,
        }
    }

    fn completed(&mut self, (pipe, result): Done) {
        match result {
            Ok(()) => self.free.push(pipe),
            Err(e) => {
                // The pipe may still hold bytes: it is dropped, never reused.
                self.pipes_total -= 1;
                if self.error.is_none() {
                    self.error = Some(e);
                }
            }
        }
    }

    async fn next_pipe(&mut self) -> io::Result<Pipe> {
        loop {
            while let Ok(done) = self.done_rx.try_recv() {
                self.completed(done);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            if let Some(pipe) = self.free.pop() {
                return Ok(pipe);
            }
            if self.pipes_total < RECEIVE_PIPES_MAX {
                let pipe = Pipe::new(super::RECEIVE_PIPE_BYTES)?;
                self.pipes_total += 1;
                return Ok(pipe);
            }
            // Every pipe is in flight, so a completion is coming.
            match self.done_rx.recv().await {
                Some(done) => self.completed(done),
                None => return Err(io::Error::other("the payload writer stopped")),
            }
        }
    }

    /// Receives the next `len_bytes` of `stream` into `dest` at `offset`. Returns once every
    /// byte is off the socket; the writes may still be in flight (see `flush`). A failed write
    /// (this one's or an earlier one's) is a `WriteFailed`.
    pub async fn receive(
        &mut self,
        stream: &TcpStream,
        dest: &Dest,
        offset: u64,
        len_bytes: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        let mut left = len_bytes;
        let inline = len_bytes <= INLINE_RECEIVE_BYTES_MAX && !self.busy();
        while left > 0 {
            let pipe = self.next_pipe().await?;
            let chunk = (left as usize).min(pipe.capacity_bytes);
            // A leader that goes silent in the middle of a payload is given up on like one that
            // goes silent between frames (the follower reconnects).
            let silence = Duration::from_millis(LEADER_SILENCE_TIMEOUT_MS);
            let spliced = tokio::time::timeout(silence, splice_in(stream, &pipe, chunk))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the leader sent nothing for {LEADER_SILENCE_TIMEOUT_MS} ms, {left} \
                             bytes before the end of a payload"
                        ),
                    ))
                });
            let n = match spliced {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                        "the leader closed the connection {left} bytes before the end of a payload"
                    ),
                    ))
                }
                Ok(n) => n,
                Err(e) => {
                    self.pipes_total -= 1;
                    return Err(e);
                }
            };
            if inline {
                // Nothing else is in flight, so the file grows in order here too.
                let mut at = offset as libc::loff_t;
                if let Err(e) = pipe.drain_blocking(dest.file.as_raw_fd(), Some(&mut at), n) {
                    self.pipes_total -= 1;
                    return Err(WriteFailed::wrap(&dest.path, e));
                }
                self.free.push(pipe);
            } else {
                self.submit(pipe, dest, offset, n)?;
            }
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Whether writes handed out are still in flight.
    pub fn busy(&self) -> bool {
        self.free.len() < self.pipes_total
    }

    /// Writes `bytes` (payload that came in the read buffer along with frames) into `dest` at
    /// `offset`, behind every write already handed out: copied into pipes and queued like a
    /// payload from the socket. Written directly, they could land past earlier bytes still in
    /// flight, and a crash in between would leave a hole of zeros under the file's real name.
    /// Needed for an `in_order` dest while `busy`; otherwise writing directly is just as safe.
    /// See `flush` for completion.
    pub async fn write_behind(&mut self, dest: &Dest, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut offset = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let pipe = self.next_pipe().await?;
            // A free pipe is empty, so up to its capacity goes in without blocking.
            let n = rest.len().min(pipe.capacity_bytes);
            let mut put = 0;
            while put < n {
                // SAFETY: the pipe's write end is an open fd we own; the pointer and length
                // describe initialized bytes of `rest`.
                let w = unsafe {
                    libc::write(
                        pipe.write.as_raw_fd(),
                        rest[put..n].as_ptr().cast(),
                        n - put,
                    )
                };
                if w < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    self.pipes_total -= 1;
                    return Err(e);
                }
                if w == 0 {
                    self.pipes_total -= 1;
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write into an empty pipe moved nothing",
                    ));
                }
                put += w as usize;
            }
            self.submit(pipe, dest, offset, n)?;
            offset += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Hands the `len_bytes` in `pipe` to the writer, for `dest` at `offset`.
    fn submit(&mut self, pipe: Pipe, dest: &Dest, offset: u64, len_bytes: usize) -> io::Result<()> {
        let job = Job {
            pipe,
            dest: dest.clone(),
            offset,
            len_bytes,
        };
        let done = self.done_tx.clone();
        if self.writer == Writer::Ring && !job.dest.in_order {
            tokio::task::spawn_local(async move {
                let r = super::uring::drain_pipe(
                    &job.pipe,
                    job.dest.file.as_raw_fd(),
                    job.offset as i64,
                    job.len_bytes as u32,
                    0,
                )
                .await
                .map_err(|e| WriteFailed::wrap(&job.dest.path, e));
                let _ = done.send((job.pipe, r));
            });
            return Ok(());
        }
        if self.thread.is_none() {
            self.thread = Some(spawn_writer(done)?);
        }
        match &self.thread {
            Some(tx) => tx
                .send(job)
                .map_err(|_| io::Error::other("the payload writer thread stopped")),
            None => Err(io::Error::other("no payload writer thread")),
        }
    }

    /// Waits until every write handed out has completed; the first error (a `WriteFailed`), if
    /// any.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.free.len() < self.pipes_total {
            match self.done_rx.recv().await {
                Some(done) => self.completed(done),
                None => return Err(io::Error::other("the payload writer stopped")),
            }
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One non-blocking splice socket -> pipe, waiting for readability as needed.
async fn splice_in(stream: &TcpStream, pipe: &Pipe, len_bytes: usize) -> io::Result<usize> {
    let socket = stream.as_raw_fd();
    stream
        .async_io(Interest::READABLE, || {
            // SAFETY: the socket and the pipe's write end are open fds borrowed for the call;
            // null offsets are required for both.
            let r = unsafe {
                libc::splice(
                    socket,
                    std::ptr::null_mut(),
                    pipe.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    len_bytes,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            super::byte_count(r)
        })
        .await
}

fn spawn_writer(done: mpsc::UnboundedSender<Done>) -> io::Result<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ferry-writer".into())
        .spawn(move || {
            for job in rx {
                let mut at = job.offset as libc::loff_t;
                let r = job
                    .pipe
                    .drain_blocking(job.dest.file.as_raw_fd(), Some(&mut at), job.len_bytes)
                    .map_err(|e| WriteFailed::wrap(&job.dest.path, e));
                if done.send((job.pipe, r)).is_err() {
                    return;
                }
            }
        })?;
    Ok(tx)
}
