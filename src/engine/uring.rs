//! The io_uring engine's payload moves on the leader: file -> pipe -> socket with
//! IORING_OP_SPLICE, so file bytes never enter user space. (A follower receives the same way on
//! both engines: `engine::receive`.)
//!
//! tokio-uring 0.5 has no splice op; `tokio_uring::UnsubmittedOneshot` takes a raw io-uring 0.6
//! submission entry, and a SPLICE entry yields exactly one completion, which is what a oneshot
//! expects. The offsets are passed by value in the entry (no pointer outlives the call), so the
//! oneshot stores no data.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, types};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

use super::Pipe;

/// Turns a SPLICE completion into the byte count it moved.
struct SpliceDone;

impl OneshotOutputTransform for SpliceDone {
    type Output = io::Result<u32>;
    type StoredData = ();

    fn transform_oneshot_output(self, _data: (), cqe: cqueue::Entry) -> io::Result<u32> {
        let result = cqe.result();
        if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as u32)
        }
    }
}

/// One splice(2) through the ring. An offset of -1 means "the fd's own position" (pipes, sockets).
async fn splice(
    fd_in: RawFd,
    off_in: i64,
    fd_out: RawFd,
    off_out: i64,
    len: u32,
    flags: u32,
) -> io::Result<u32> {
    let sqe = opcode::Splice::new(types::Fd(fd_in), off_in, types::Fd(fd_out), off_out, len)
        .flags(flags)
        .build();
    UnsubmittedOneshot::new((), SpliceDone, sqe).submit().await
}

/// Turns a SEND completion into the byte count sent, handing the buffer back.
struct SendDone;

impl OneshotOutputTransform for SendDone {
    type Output = (io::Result<u32>, Vec<u8>);
    type StoredData = Vec<u8>;

    fn transform_oneshot_output(self, buf: Vec<u8>, cqe: cqueue::Entry) -> Self::Output {
        let result = cqe.result();
        if result < 0 {
            (Err(io::Error::from_raw_os_error(-result)), buf)
        } else {
            (Ok(result as u32), buf)
        }
    }
}

/// Sends all of `buf` with MSG_MORE: the kernel holds the bytes back until what follows (a
/// payload spliced into the socket) fills a segment or is sent without MORE, so a frame header
/// and its payload travel together instead of as a tiny segment of their own.
pub(crate) async fn send_all_more(socket: RawFd, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let mut buf = buf;
    let mut sent = 0usize;
    while sent < buf.len() {
        let left = (buf.len() - sent).min(u32::MAX as usize) as u32;
        // The pointer is into `buf`'s heap allocation, which the oneshot keeps as its stored
        // data until the completion arrives (tokio-uring holds it even if this future is
        // dropped first), so the kernel never reads freed memory.
        let sqe = opcode::Send::new(types::Fd(socket), buf[sent..].as_ptr(), left)
            .flags(libc::MSG_MORE)
            .build();
        let (r, b) = UnsubmittedOneshot::new(buf, SendDone, sqe).submit().await;
        buf = b;
        match r {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => sent += n as usize,
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// Moves `len` bytes from the pipe into `socket`.
async fn drain_pipe(pipe: &Pipe, socket: RawFd, mut len: u32, flags: u32) -> io::Result<()> {
    while len > 0 {
        let n = splice(pipe.read.as_raw_fd(), -1, socket, -1, len, flags).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "splice out of the pipe moved nothing",
            ));
        }
        len -= n;
    }
    Ok(())
}

/// Fills `pipe` with up to `len` bytes of `file` at `offset`; an error if the file ends first.
async fn fill_pipe(pipe: &Pipe, file: RawFd, offset: u64, len: u32, left: u64) -> io::Result<u32> {
    let n = splice(file, offset as i64, pipe.write.as_raw_fd(), -1, len, 0).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the file ended {left} bytes before the range to send (it shrank meanwhile)"),
        ));
    }
    Ok(n)
}

/// Sends `[offset, offset + len_bytes)` of `file` to `socket`, page cache -> pipe -> socket.
/// Two pipes alternate, so the kernel fills one from the file while it drains the other into
/// the socket (each SPLICE runs on an io-wq worker, so the two overlap on two cores).
///
/// The last splice into the socket carries SPLICE_F_MORE: the payload waits in the socket
/// for what follows it (typically the round's MARK), and the caller must push it out with
/// a write without MORE, or with `push`, before it waits for anything.
pub async fn send_file(
    socket: RawFd,
    pipes: &[Pipe; 2],
    file: RawFd,
    offset: u64,
    len_bytes: u64,
) -> io::Result<()> {
    let more = libc::SPLICE_F_MORE;
    let chunk_max = pipes[0].capacity_bytes.min(pipes[1].capacity_bytes) as u64;
    let mut offset = offset;
    let mut left = len_bytes;
    if left == 0 {
        return Ok(());
    }
    let mut current = 0usize;
    let mut in_current =
        fill_pipe(&pipes[0], file, offset, left.min(chunk_max) as u32, left).await?;
    loop {
        offset += u64::from(in_current);
        left -= u64::from(in_current);
        if left == 0 {
            return drain_pipe(&pipes[current], socket, in_current, more).await;
        }
        let next = 1 - current;
        let (drained, filled) = tokio::join!(
            drain_pipe(&pipes[current], socket, in_current, more),
            fill_pipe(&pipes[next], file, offset, left.min(chunk_max) as u32, left),
        );
        drained?;
        in_current = filled?;
        current = next;
    }
}

/// Turns a TIMEOUT completion into `()`: -ETIME is the timer expiring, the normal end; anything
/// else (a cancellation) ends the sleep early, which costs the caller one extra look.
struct TimeoutDone;

impl OneshotOutputTransform for TimeoutDone {
    type Output = ();
    type StoredData = Box<types::Timespec>;

    fn transform_oneshot_output(self, _ts: Box<types::Timespec>, _cqe: cqueue::Entry) {}
}

/// Sleeps for `duration` with IORING_OP_TIMEOUT: microsecond precision, where tokio's timer
/// wheel rounds up to the next millisecond.
pub(crate) async fn sleep(duration: std::time::Duration) {
    let ts = Box::new(
        types::Timespec::new()
            .sec(duration.as_secs())
            .nsec(duration.subsec_nanos()),
    );
    // The pointer is into the box, which the oneshot keeps as its stored data until the
    // completion arrives (also if this future is dropped first): the kernel reads it at
    // submission, and it is still there.
    let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    UnsubmittedOneshot::new(ts, TimeoutDone, sqe).submit().await
}
