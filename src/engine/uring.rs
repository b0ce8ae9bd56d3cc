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

use io_uring::{cqueue, opcode, squeue, types};
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
///
/// A range that fits in a pipe (every append a broker makes, and most ranges) goes as one
/// linked pair (`send_linked`). A longer one goes in pipe-sized chunks through two pipes that
/// alternate, so the kernel fills one from the file while it drains the other into the socket
/// (each SPLICE runs on an io-wq worker, so the two overlap on two cores).
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
    if len_bytes == 0 {
        return Ok(());
    }
    let (mut offset, mut left) = (offset, len_bytes);
    if left <= chunk_max {
        let sent = send_linked(&pipes[0], socket, file, offset, left as u32, more).await?;
        offset += u64::from(sent);
        left -= u64::from(sent);
        if left == 0 {
            return Ok(());
        }
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

/// Moves up to `len` bytes (at most a pipe's worth) file -> `pipe` -> socket with the two
/// SPLICEs submitted together, the fill linked to the drain (IOSQE_IO_LINK): one io-wq worker
/// runs both back to back, where two separate submissions cost a completion, a wake-up of this
/// thread and a second hand-off to a worker in between. Returns the bytes sent, all of them
/// out of the pipe; fewer than `len` only if the file ended first (the caller's next fill
/// says so).
///
/// A short fill (the file ended, or an offset inside a page needed one page more than the pipe
/// has slots) fails the link: the kernel cancels the drain (ECANCELED), which then moved
/// nothing. The drain waits in its worker for room in the socket, as any drain does (the
/// socket is blocking), but not for bytes in the pipe (SPLICE_F_NONBLOCK): should the two
/// entries not be linked after all (tokio-uring submits its queue when it is full, which can
/// fall between them), a drain that finds the pipe empty says EAGAIN instead of waiting for a
/// fill that may fail. Whatever the pipe holds after the pair, a blocking drain then moves.
async fn send_linked(
    pipe: &Pipe,
    socket: RawFd,
    file: RawFd,
    offset: u64,
    len: u32,
    flags: u32,
) -> io::Result<u32> {
    let fill = opcode::Splice::new(
        types::Fd(file),
        offset as i64,
        types::Fd(pipe.write.as_raw_fd()),
        -1,
        len,
    )
    .build()
    .flags(squeue::Flags::IO_LINK);
    let drain = opcode::Splice::new(
        types::Fd(pipe.read.as_raw_fd()),
        -1,
        types::Fd(socket),
        -1,
        len,
    )
    .flags(flags | libc::SPLICE_F_NONBLOCK)
    .build();
    // Both are pushed onto the submission queue here, one after the other, before either is
    // polled: nothing else runs on this thread in between.
    let fill = UnsubmittedOneshot::new((), SpliceDone, fill).submit();
    let drain = UnsubmittedOneshot::new((), SpliceDone, drain).submit();
    let (filled, drained) = tokio::join!(fill, drain);
    let drained = match drained {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECANCELED | libc::EAGAIN)) => 0,
        Err(e) => return Err(e),
    };
    // A failed fill cancels the drain, or (not linked) left it nothing to move.
    let filled = filled?;
    if drained > filled {
        return Err(io::Error::other(format!(
            "splice out of the pipe moved {drained} bytes where {filled} went in"
        )));
    }
    drain_pipe(pipe, socket, filled - drained, flags).await?;
    Ok(filled)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// How `send_and_receive` sets the sender up.
    #[derive(Clone, Copy, PartialEq)]
    enum Setup {
        Plain,
        /// The socket is first filled to the brim with `FILLER` bytes (counted in what is
        /// received), and the reader starts 100 ms after the first range was submitted, so
        /// that range finds no room.
        FullSocket,
        /// The ring's submission queue holds `QUEUE_ENTRIES` entries, and `QUEUE_ENTRIES - 1`
        /// NOPs go in before each range: the fill is the last entry that fits, so tokio-uring
        /// submits the queue to push the drain, and the two are not linked.
        QueueFull,
    }

    const QUEUE_ENTRIES: u32 = 8;

    /// Turns a NOP's completion into nothing.
    struct NopDone;

    impl OneshotOutputTransform for NopDone {
        type Output = ();
        type StoredData = ();

        fn transform_oneshot_output(self, _data: (), _cqe: cqueue::Entry) {}
    }

    /// What `send_file` puts on a loopback socket for each of `ranges` of a file holding
    /// `data`, one after another, read by a thread until the sender closes: (bytes received,
    /// the first error). Fails if the sender has not returned within 20 s.
    fn send_and_receive(
        data: &[u8],
        pipe_bytes: usize,
        setup: Setup,
        ranges: &[(u64, u64)],
    ) -> (Vec<u8>, io::Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(data)
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (start_tx, start_rx) = std::sync::mpsc::channel::<()>();
        let receiver = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            start_rx.recv().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let mut socket = TcpStream::connect(addr).unwrap();
        if setup == Setup::FullSocket {
            socket.set_nonblocking(true).unwrap();
            let filler = [FILLER; 4096];
            loop {
                match socket.write(&filler) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            socket.set_nonblocking(false).unwrap();
        } else {
            start_tx.send(()).unwrap();
        }
        let pipes = [
            Pipe::new(pipe_bytes).unwrap(),
            Pipe::new(pipe_bytes).unwrap(),
        ];
        let ranges = ranges.to_vec();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let entries = match setup {
                Setup::QueueFull => QUEUE_ENTRIES,
                _ => 256,
            };
            let result = tokio_uring::builder().entries(entries).start(async {
                let send = async {
                    for &(offset, len_bytes) in &ranges {
                        let mut nops = Vec::new();
                        if setup == Setup::QueueFull {
                            for _ in 1..QUEUE_ENTRIES {
                                let nop = opcode::Nop::new().build();
                                nops.push(UnsubmittedOneshot::new((), NopDone, nop).submit());
                            }
                        }
                        let sent = send_file(
                            socket.as_raw_fd(),
                            &pipes,
                            file.as_raw_fd(),
                            offset,
                            len_bytes,
                        )
                        .await;
                        for nop in nops {
                            nop.await;
                        }
                        sent?;
                    }
                    Ok(())
                };
                let start_reader = async {
                    if setup == Setup::FullSocket {
                        sleep(std::time::Duration::from_millis(100)).await;
                        start_tx.send(()).unwrap();
                    }
                };
                tokio::join!(send, start_reader).0
            });
            drop(socket);
            let _ = done_tx.send(result);
        });
        let result = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("send_file did not return within 20 s");
        (receiver.join().unwrap(), result)
    }

    const FILLER: u8 = 0xa5;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn uring_works() -> bool {
        let why = super::super::uring_unavailable();
        if let Some(why) = &why {
            eprintln!("skipped: {why}");
        }
        why.is_none()
    }

    /// A range within one pipe (the linked fill and drain, also when the queue keeps them
    /// apart) and ranges of several pipes, at an offset inside the file, arrive exactly.
    #[test]
    fn a_range_arrives_exactly_whether_it_fits_one_pipe_or_many() {
        if !uring_works() {
            return;
        }
        let data = pattern(3 * 1024 * 1024 + 123);
        let pipe_bytes = 64 * 1024;
        for setup in [Setup::Plain, Setup::QueueFull] {
            for (offset, len) in [
                (0u64, 1u64),
                (1000, 1024),
                (17, 64 * 1024),
                (5, 64 * 1024 + 1),
                (123, 3 * 1024 * 1024),
            ] {
                let (got, result) = send_and_receive(&data, pipe_bytes, setup, &[(offset, len)]);
                result.unwrap();
                let want = &data[offset as usize..(offset + len) as usize];
                assert_eq!(got.len(), want.len(), "[{offset}, +{len})");
                assert!(got == want, "[{offset}, +{len}) arrived with other bytes");
            }
        }
    }

    /// A range sent into a socket that is full (the linked drain waits in its worker until the
    /// reader makes room), and ranges after it, arrive whole and in order.
    #[test]
    fn ranges_sent_into_a_full_socket_arrive_whole_and_in_order() {
        if !uring_works() {
            return;
        }
        let data = pattern(1024 * 1024);
        let ranges: Vec<(u64, u64)> = (0..50u64)
            .map(|i| (i * 4099 % 900_000, 20_000 + i * 37))
            .collect();
        let (got, result) = send_and_receive(&data, 64 * 1024, Setup::FullSocket, &ranges);
        result.unwrap();
        let filler_bytes = got.iter().take_while(|&&b| b == FILLER).count();
        assert!(filler_bytes > 0);
        let want: Vec<u8> = ranges
            .iter()
            .flat_map(|&(offset, len)| {
                data[offset as usize..(offset + len) as usize]
                    .iter()
                    .copied()
            })
            .collect();
        assert_eq!(got.len() - filler_bytes, want.len());
        assert!(
            got[filler_bytes..] == want[..],
            "the ranges arrived with other bytes"
        );
    }

    /// A file that ends inside the range (it shrank after the range was planned): the bytes it
    /// has are sent, none are left in the pipe for the next payload, and the error says the file
    /// ended and how early. With the fill and the drain not linked, a drain whose fill found
    /// nothing does not wait for bytes that never come.
    #[test]
    fn a_file_that_ends_inside_the_range_sends_what_it_has_and_says_how_much_was_missing() {
        if !uring_works() {
            return;
        }
        let data = pattern(100 * 1024);
        for (setup, offset, len, pipe_bytes) in [
            (Setup::Plain, 0u64, 150 * 1024u64, 256 * 1024usize),
            (Setup::Plain, 1000, 150 * 1024, 64 * 1024),
            (Setup::Plain, 100 * 1024, 10, 64 * 1024),
            (Setup::QueueFull, 0, 150 * 1024, 256 * 1024),
            (Setup::QueueFull, 100 * 1024, 10, 64 * 1024),
        ] {
            let (got, result) = send_and_receive(&data, pipe_bytes, setup, &[(offset, len)]);
            let err = result.expect_err("a range past the end of the file was sent");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
            let missing = offset + len - data.len() as u64;
            assert!(
                err.to_string()
                    .contains(&format!("the file ended {missing} bytes before")),
                "{err}"
            );
            assert!(got == data[offset as usize..], "[{offset}, +{len})");
        }
    }
}
