//! The io_uring engine's payload moves on the leader: file -> pipe -> socket with splice, so file
//! bytes never enter user space. (A follower receives the same way on both engines:
//! `engine::receive`.)
//!
//! io_uring runs every SPLICE on an io-wq worker thread: it cannot know whether the file's
//! pages are in memory, so it never tries one inline. For the appends a broker just made, which
//! are, that hand-off was most of a payload's cost: a worker's wake-up, a completion, this
//! thread's wake-up. So a range that fits in a pipe and is wholly in the page cache (cachestat(2)
//! says so) moves with two splice(2) calls right here, the socket non-blocking, and io_uring only
//! waits for room in the socket when it is full (POLL_ADD). A range that may need the disk, or
//! is longer than a pipe (a full sync, a follower catching up), goes through the ring as before.
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

/// Turns a completion into its result, or the errno it carries: a SPLICE's byte count, a
/// POLL_ADD's ready events.
struct Done;

impl OneshotOutputTransform for Done {
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
    UnsubmittedOneshot::new((), Done, sqe).submit().await
}

/// Waits until `socket` has room to write (or an error, which the next write reports).
async fn writable(socket: RawFd) -> io::Result<()> {
    let sqe = opcode::PollAdd::new(types::Fd(socket), libc::POLLOUT as u32).build();
    UnsubmittedOneshot::new((), Done, sqe).submit().await?;
    Ok(())
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

/// Moves `len` bytes from the pipe into `socket` through the ring (an io-wq worker), waiting
/// for room whenever the (non-blocking) socket is full.
async fn drain_pipe(pipe: &Pipe, socket: RawFd, mut len: u32, flags: u32) -> io::Result<()> {
    while len > 0 {
        let n = match splice(pipe.read.as_raw_fd(), -1, socket, -1, len, flags).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                writable(socket).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
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

/// Moves `len` bytes from the pipe into `socket` on this thread, waiting for room (POLL_ADD)
/// whenever the (non-blocking) socket is full.
async fn drain_pipe_here(pipe: &Pipe, socket: RawFd, mut len: u32, flags: u32) -> io::Result<()> {
    while len > 0 {
        match splice_here(pipe.read.as_raw_fd(), None, socket, len, flags) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice out of the pipe moved nothing",
                ))
            }
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(socket).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One splice(2) on this thread that waits for nothing: SPLICE_F_NONBLOCK for the pipe, and
/// the socket's own O_NONBLOCK (see `set_nonblocking`). The output is at its fd's own position.
/// A file's pages must be in memory, or this thread waits for the disk.
fn splice_here(
    fd_in: RawFd,
    off_in: Option<&mut libc::loff_t>,
    fd_out: RawFd,
    len: u32,
    flags: u32,
) -> io::Result<u32> {
    let flags = flags | libc::SPLICE_F_NONBLOCK;
    // At most `len`, a u32.
    super::splice_with(fd_in, off_in, fd_out, None, len as usize, flags).map(|n| n as u32)
}

/// Makes a leader's socket non-blocking, as `send_file` needs: its splices on this thread must
/// never wait for a follower that stopped reading. The ring's own operations on it (reads,
/// sends) wait for readiness with a poll, as they do on any socket.
pub(crate) fn set_nonblocking(socket: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd the caller keeps open; no pointers.
    let flags = unsafe { libc::fcntl(socket, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on the same fd, with its own flags plus O_NONBLOCK; no pointers.
    if unsafe { libc::fcntl(socket, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// cachestat(2), Linux 6.5: a syscall added after the tables were unified, so the same number on
/// every architecture Rust targets (the libc crate does not name it for all of them yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of the kernel's uapi (`linux/mman.h`).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of the kernel's uapi (`linux/mman.h`): page counts.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Cachestat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

/// cachestat(2) of `[offset, offset + len_bytes)` of `file` (`len_bytes` 0: to the end);
/// `None` when the kernel cannot say (before 6.5, or a file system without a page cache).
pub fn cachestat(file: RawFd, offset: u64, len_bytes: u64) -> Option<Cachestat> {
    let range = CachestatRange {
        off: offset,
        len: len_bytes,
    };
    let mut stat = Cachestat::default();
    // SAFETY: `range` and `stat` are live, properly laid out (`repr(C)` copies of the uapi
    // structs) for the whole call; the kernel reads the one and writes the other; the fd is
    // open (borrowed by the caller); flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file,
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    (r == 0).then_some(stat)
}

/// Whether every page of `[offset, offset + len_bytes)` of `file` is in the page cache, so that
/// a splice out of it cannot wait for the disk. `false` when the kernel cannot say (before 6.5,
/// or a file system without a page cache): such ranges take the ring, which never blocks this
/// thread. Pages evicted right after the look would make one splice wait for the disk, once.
fn range_cached(file: RawFd, offset: u64, len_bytes: u64) -> bool {
    if len_bytes == 0 {
        return true;
    }
    // SAFETY: sysconf has no memory effects.
    let page_bytes = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => return false,
    };
    let pages = (offset + len_bytes - 1) / page_bytes - offset / page_bytes + 1;
    cachestat(file, offset, len_bytes).is_some_and(|stat| stat.nr_cache >= pages)
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
/// `socket` must be non-blocking (`set_nonblocking`). A range that fits in a pipe (every
/// append a broker makes, and most ranges) goes with splice(2) on this thread when its pages
/// are in the page cache (`send_here`), else as one linked pair through the ring
/// (`send_linked`). A longer one goes in pipe-sized chunks through two pipes that
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
    send_file_by(Route::Cached, socket, pipes, file, offset, len_bytes).await
}

/// How `send_file_by` moves a range that fits in a pipe.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    /// On this thread when its pages are all in the page cache, else through the ring.
    Cached,
    /// Through the ring whatever the page cache holds (tests: the route a cold range takes).
    #[cfg(test)]
    Ring,
    /// On this thread whatever the page cache holds (tests: the route a hot range takes).
    #[cfg(test)]
    Here,
}

async fn send_file_by(
    route: Route,
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
        let here = match route {
            Route::Cached => range_cached(file, offset, left),
            #[cfg(test)]
            Route::Ring => false,
            #[cfg(test)]
            Route::Here => true,
        };
        let sent = if here {
            send_here(&pipes[0], socket, file, offset, left as u32, more).await?
        } else {
            send_linked(&pipes[0], socket, file, offset, left as u32, more).await?
        };
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

/// Moves up to `len` bytes (at most a pipe's worth, in the page cache) file -> `pipe` ->
/// socket with splice(2) on this thread, waiting only for room in the socket. Returns the bytes
/// sent; fewer than `len` (none, at the end of the file) leave the rest to the caller's ring
/// path, which says why.
async fn send_here(
    pipe: &Pipe,
    socket: RawFd,
    file: RawFd,
    offset: u64,
    len: u32,
    flags: u32,
) -> io::Result<u32> {
    let mut at = offset as libc::loff_t;
    // The pipe is empty and holds `len` bytes, or one page fewer when the range starts inside
    // a page: a short fill, which the caller completes.
    let filled = match splice_here(file, Some(&mut at), pipe.write.as_raw_fd(), len, 0) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    drain_pipe_here(pipe, socket, filled, flags).await?;
    Ok(filled)
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
/// nothing. The drain waits neither for room in the socket (it is non-blocking: EAGAIN) nor
/// for bytes in the pipe (SPLICE_F_NONBLOCK): should the two entries not be linked after all
/// (tokio-uring submits its queue when it is full, which can fall between them), a drain that
/// finds the pipe empty says EAGAIN instead of waiting for a fill that may fail. Whatever the
/// pipe holds after the pair goes out from this thread (`drain_pipe_here`) as the socket
/// makes room.
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
    let fill = UnsubmittedOneshot::new((), Done, fill).submit();
    let drain = UnsubmittedOneshot::new((), Done, drain).submit();
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
    drain_pipe_here(pipe, socket, filled - drained, flags).await?;
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

    /// What `send_file_by` puts on a loopback socket for each of `ranges` of a file holding
    /// `data`, one after another, read by a thread until the sender closes: (bytes received,
    /// the first error, the CPU time of the sender's thread). Fails if the sender has not
    /// returned within 20 s.
    fn send_and_receive(
        data: &[u8],
        pipe_bytes: usize,
        route: Route,
        setup: Setup,
        ranges: &[(u64, u64)],
    ) -> (Vec<u8>, io::Result<()>, std::time::Duration) {
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
        // As the leader's connections are (`Conn::uring`).
        set_nonblocking(socket.as_raw_fd()).unwrap();
        if setup == Setup::FullSocket {
            let filler = [FILLER; 4096];
            loop {
                match socket.write(&filler) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
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
                        let sent = send_file_by(
                            route,
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
            let _ = done_tx.send((result, thread_cpu()));
        });
        let (result, sender_cpu) = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("send_file did not return within 20 s");
        (receiver.join().unwrap(), result, sender_cpu)
    }

    /// CPU time (user and system) of the calling thread so far.
    fn thread_cpu() -> std::time::Duration {
        // SAFETY: rusage is plain data, and getrusage only writes into the one we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to our rusage.
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        let t = |tv: libc::timeval| {
            std::time::Duration::from_secs(tv.tv_sec as u64)
                + std::time::Duration::from_micros(tv.tv_usec as u64)
        };
        t(usage.ru_utime) + t(usage.ru_stime)
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

    /// A range within one pipe (on this thread; through the ring as the linked fill and
    /// drain, also when the queue keeps them apart) and ranges of several pipes, at an offset
    /// inside the file, arrive exactly.
    #[test]
    fn a_range_arrives_exactly_whether_it_fits_one_pipe_or_many() {
        if !uring_works() {
            return;
        }
        let data = pattern(3 * 1024 * 1024 + 123);
        let pipe_bytes = 64 * 1024;
        for (route, setup) in [
            (Route::Cached, Setup::Plain),
            (Route::Here, Setup::Plain),
            (Route::Ring, Setup::Plain),
            (Route::Ring, Setup::QueueFull),
        ] {
            for (offset, len) in [
                (0u64, 1u64),
                (1000, 1024),
                (17, 64 * 1024),
                (5, 64 * 1024 + 1),
                (123, 3 * 1024 * 1024),
            ] {
                let (got, result, _) =
                    send_and_receive(&data, pipe_bytes, route, setup, &[(offset, len)]);
                result.unwrap();
                let want = &data[offset as usize..(offset + len) as usize];
                assert_eq!(got.len(), want.len(), "[{offset}, +{len}) {route:?}");
                assert!(got == want, "[{offset}, +{len}) {route:?}: other bytes");
            }
        }
    }

    /// A range sent into a socket that is full (the sender waits for room without blocking
    /// its thread, and without spinning), and ranges after it, arrive whole and in order, on
    /// either route and for ranges longer than a pipe.
    #[test]
    fn ranges_sent_into_a_full_socket_arrive_whole_and_in_order() {
        if !uring_works() {
            return;
        }
        let data = pattern(1024 * 1024);
        let ranges: Vec<(u64, u64)> = (0..50u64)
            .map(|i| (i * 4099 % 900_000, 20_000 + i * 1337))
            .collect();
        for route in [Route::Here, Route::Ring] {
            let (got, result, sender_cpu) =
                send_and_receive(&data, 64 * 1024, route, Setup::FullSocket, &ranges);
            result.unwrap();
            // The reader starts 100 ms in: a sender that spun on EAGAIN meanwhile burnt them.
            assert!(
                sender_cpu < std::time::Duration::from_millis(50),
                "{route:?}: the sender's thread used {sender_cpu:?} of CPU"
            );
            let filler_bytes = got.iter().take_while(|&&b| b == FILLER).count();
            assert!(filler_bytes > 0, "{route:?}");
            let want: Vec<u8> = ranges
                .iter()
                .flat_map(|&(offset, len)| {
                    data[offset as usize..(offset + len) as usize]
                        .iter()
                        .copied()
                })
                .collect();
            assert_eq!(got.len() - filler_bytes, want.len(), "{route:?}");
            assert!(
                got[filler_bytes..] == want[..],
                "{route:?}: the ranges arrived with other bytes"
            );
        }
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
        for (route, setup, offset, len, pipe_bytes) in [
            (
                Route::Here,
                Setup::Plain,
                0u64,
                150 * 1024u64,
                256 * 1024usize,
            ),
            (Route::Here, Setup::Plain, 100 * 1024, 10, 64 * 1024),
            (Route::Cached, Setup::Plain, 0, 150 * 1024, 256 * 1024),
            (Route::Ring, Setup::Plain, 0, 150 * 1024, 256 * 1024),
            (Route::Ring, Setup::Plain, 1000, 150 * 1024, 64 * 1024),
            (Route::Ring, Setup::Plain, 100 * 1024, 10, 64 * 1024),
            (Route::Ring, Setup::QueueFull, 0, 150 * 1024, 256 * 1024),
            (Route::Ring, Setup::QueueFull, 100 * 1024, 10, 64 * 1024),
        ] {
            let (got, result, _) =
                send_and_receive(&data, pipe_bytes, route, setup, &[(offset, len)]);
            let err = result.expect_err("a range past the end of the file was sent");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
            let missing = offset + len - data.len() as u64;
            assert!(
                err.to_string()
                    .contains(&format!("the file ended {missing} bytes before")),
                "{err}"
            );
            assert!(
                got == data[offset as usize..],
                "[{offset}, +{len}) {route:?}"
            );
        }
    }

    /// A range is cached once its file was written, and not once its pages were dropped, nor
    /// past the end of the file: the route a payload takes turns on this.
    #[test]
    fn a_range_counts_as_cached_only_when_all_its_pages_are_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&pattern(256 * 1024)).unwrap();
        let fd = file.as_raw_fd();
        assert!(range_cached(fd, 0, 256 * 1024));
        assert!(range_cached(fd, 5000, 10_000));
        assert!(!range_cached(fd, 200 * 1024, 64 * 1024), "past the end");
        file.sync_all().unwrap();
        // SAFETY: fadvise on our open fd; no pointers.
        let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        let in_memory = crate::paths::DataDir::open_existing(dir.path())
            .and_then(|d| d.in_memory())
            .unwrap();
        if in_memory {
            eprintln!("skipped the dropped pages: tmpfs keeps them");
            return;
        }
        assert!(!range_cached(fd, 0, 256 * 1024), "its pages were dropped");
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 256 * 1024);
        assert!(range_cached(fd, 0, 256 * 1024), "read back");
    }
}
