//! The I/O shells' common ground: which engine runs, and the connection type both the leader
//! and the follower drivers use, whichever engine is underneath.
//!
//! Two engines speak the same protocol. On the leader, `uring` (tokio-uring, the default) moves
//! payloads with IORING_OP_SPLICE and `fallback` (plain tokio) with sendfile(2), for hosts where
//! io_uring is blocked. A follower receives payloads with splice(2) on either (`receive`). Both
//! run a current-thread runtime with a `LocalSet`, so the drivers are written once and use
//! `tokio::task::spawn_local`, `tokio::time` and `tokio::sync` alike.
//! `Conn` and `Listener` are enums rather than traits: there are exactly two engines, and an enum
//! keeps the drivers free of generics.

pub mod fallback;
pub mod receive;
pub mod uring;

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a leader's splice pipe holds (asked for); each splice moves at most this much.
pub const SEND_PIPE_BYTES: usize = 4 * 1024 * 1024;
/// Bytes a follower's receive pipe holds (asked for).
pub const RECEIVE_PIPE_BYTES: usize = 1024 * 1024;
/// While a payload streams in, the follower waits for this many bytes (or the rest of the
/// payload, if less) before it reads (SO_RCVLOWAT): a paced sender (bbr) delivers a 64 KiB
/// segment at a time, and a read per segment doubled the follower's wake-ups and splices.
pub const RECEIVE_WAKE_BYTES: usize = 256 * 1024;
/// What `Conn::read_more` adds to a buffer that came with no spare capacity: a read of 0
/// bytes would look like the end of the stream.
const READ_MORE_MIN_BYTES: usize = 4096;

/// The size asked for when a bigger one is refused (the default pipe-max-size).
pub const PIPE_CAPACITY_FALLBACK_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Fallback,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Fallback => "fallback",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<EngineKind, String> {
        match s {
            "uring" => Ok(EngineKind::Uring),
            "fallback" => Ok(EngineKind::Fallback),
            other => Err(format!(
                "unknown I/O engine {other:?}: expected uring or fallback"
            )),
        }
    }
}

/// What a read/write-like syscall returned: the bytes it moved, or the errno it set.
fn byte_count(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Why io_uring cannot be used here, or `None` when it can (ring setup and SPLICE both work).
pub fn uring_unavailable() -> Option<String> {
    let ring = match io_uring::IoUring::new(4) {
        Ok(ring) => ring,
        Err(e) => return Some(format!("io_uring_setup failed: {e}")),
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return Some(format!("io_uring probe failed: {e}"));
    }
    if !probe.is_supported(io_uring::opcode::Splice::CODE) {
        return Some("the kernel's io_uring lacks IORING_OP_SPLICE".into());
    }
    None
}

/// The engine to run: the one asked for, or io_uring when it works here, else the fallback
/// with a warning that says why.
pub fn choose(requested: Option<EngineKind>) -> io::Result<EngineKind> {
    match requested {
        Some(EngineKind::Uring) => match uring_unavailable() {
            None => Ok(EngineKind::Uring),
            Some(why) => Err(io::Error::other(format!(
                "--io-engine uring was asked for, but {why}"
            ))),
        },
        Some(EngineKind::Fallback) => Ok(EngineKind::Fallback),
        None => match uring_unavailable() {
            None => Ok(EngineKind::Uring),
            Some(why) => {
                tracing::warn!(
                    "io_uring is not usable ({why}); using the fallback engine (sendfile); \
                     pass --io-engine fallback to silence this"
                );
                Ok(EngineKind::Fallback)
            }
        },
    }
}

/// Runs `make()`'s future to completion on `kind`'s runtime, on this thread.
pub fn run<F, Fut>(kind: EngineKind, make: F) -> Fut::Output
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    match kind {
        EngineKind::Uring => tokio_uring::start(make()),
        EngineKind::Fallback => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                // Building a current-thread runtime only fails if the OS refuses an epoll fd.
                Err(e) => panic!("cannot start the tokio runtime: {e}"),
            };
            tokio::task::LocalSet::new().block_on(&runtime, make())
        }
    }
}

/// Sleeps of microsecond precision on this thread's engine (tokio's own timer rounds up to the
/// next millisecond): an io_uring TIMEOUT, or a timerfd on the fallback engine.
pub enum FineTimer {
    Uring,
    Fallback(fallback::FineTimer),
}

impl FineTimer {
    pub fn new(kind: EngineKind) -> io::Result<FineTimer> {
        Ok(match kind {
            EngineKind::Uring => FineTimer::Uring,
            EngineKind::Fallback => FineTimer::Fallback(fallback::FineTimer::new()?),
        })
    }

    pub async fn sleep(&self, duration: std::time::Duration) -> io::Result<()> {
        match self {
            FineTimer::Uring => {
                uring::sleep(duration).await;
                Ok(())
            }
            FineTimer::Fallback(timer) => timer.sleep(duration).await,
        }
    }
}

/// A pipe used as the kernel-side buffer of splice.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity_bytes: usize,
}

impl Pipe {
    /// A pipe of `capacity_bytes` if allowed (see below).
    pub fn new(capacity_bytes: usize) -> io::Result<Pipe> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer splices per payload. Above /proc/sys/fs/pipe-max-size only a
        // privileged process may go; then the largest allowed size is asked for, and failing
        // that the pipe keeps its default (F_GETPIPE_SZ tells which).
        for want in [capacity_bytes, PIPE_CAPACITY_FALLBACK_BYTES] {
            // SAFETY: F_SETPIPE_SZ on a pipe fd we own; the result is checked.
            if unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) }
                > 0
            {
                break;
            }
        }
        // SAFETY: F_GETPIPE_SZ on a pipe fd we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size <= 0 {
            return Err(io::Error::last_os_error());
        }
        let capacity_bytes = size as usize;
        Ok(Pipe {
            read,
            write,
            capacity_bytes,
        })
    }

    /// Moves exactly `len_bytes` out of the pipe into `fd_out`, blocking: at `*off_out`
    /// (advanced as bytes land) when given, else at `fd_out`'s own position (a socket, a pipe).
    pub fn drain_blocking(
        &self,
        fd_out: RawFd,
        mut off_out: Option<&mut libc::loff_t>,
        len_bytes: usize,
    ) -> io::Result<()> {
        let mut left = len_bytes;
        while left > 0 {
            let n = splice_blocking(
                self.read.as_raw_fd(),
                None,
                fd_out,
                off_out.as_deref_mut(),
                left,
            )?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice out of the pipe moved nothing",
                ));
            }
            left -= n;
        }
        Ok(())
    }
}

/// One blocking splice(2) of up to `len_bytes`, retried when a signal interrupts it. An offset
/// is `None` for an fd read or written at its own position (pipes and sockets must be); a
/// given one is advanced by the kernel. It blocks the calling thread: on a runtime thread only
/// into a file or a pipe, never into a socket a peer may stop reading (the leader's sessions
/// share one thread, so their payloads go through the ring, or `splice_with` non-blocking).
pub fn splice_blocking(
    fd_in: RawFd,
    off_in: Option<&mut libc::loff_t>,
    fd_out: RawFd,
    off_out: Option<&mut libc::loff_t>,
    len_bytes: usize,
) -> io::Result<usize> {
    splice_with(
        fd_in,
        off_in,
        fd_out,
        off_out,
        len_bytes,
        libc::SPLICE_F_MOVE,
    )
}

/// One splice(2) with `flags`, retried when a signal interrupts it; offsets as for
/// `splice_blocking`.
pub(crate) fn splice_with(
    fd_in: RawFd,
    off_in: Option<&mut libc::loff_t>,
    fd_out: RawFd,
    off_out: Option<&mut libc::loff_t>,
    len_bytes: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let p_in = off_in.map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
    let p_out = off_out.map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
    loop {
        // SAFETY: the caller passes open fds (borrowed for the call); each offset pointer is
        // null or points to a live, exclusively borrowed loff_t the kernel advances.
        let r = unsafe { libc::splice(fd_in, p_in, fd_out, p_out, len_bytes, flags) };
        match byte_count(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sets an int-valued socket option; whether the kernel took it (the receive path's options
/// are hints, which it may ignore; `Conn::drop_when_unacked`'s is not).
pub(crate) fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: setsockopt reads one c_int from `value`, which outlives the call; the fd is an
    // open socket borrowed for it.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Sets TCP_CONGESTION on `socket`; an algorithm this kernel lacks, or one an unprivileged
/// process may not choose, is an error that names it and where to look.
pub fn set_congestion(socket: &impl AsRawFd, name: &str) -> io::Result<()> {
    // SAFETY: setsockopt reads `name.len()` bytes from the string's buffer, which outlives the
    // call; the fd is an open socket borrowed for it.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    let why = match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "not available in this kernel (/proc/sys/net/ipv4/tcp_available_congestion_control \
             lists those that are; a module such as tcp_bbr may need loading)"
        }
        Some(libc::EPERM) => {
            "not allowed for this user (/proc/sys/net/ipv4/tcp_allowed_congestion_control \
             lists those that are)"
        }
        _ => "refused",
    };
    Err(io::Error::new(
        e.kind(),
        format!("TCP congestion control {name:?}: {why}: {e}"),
    ))
}

/// The TCP congestion control `socket` uses (TCP_CONGESTION), e.g. "cubic".
pub fn congestion_of(socket: &impl AsRawFd) -> io::Result<String> {
    // TCP_CA_NAME_MAX in the kernel: names are at most 15 bytes and a NUL.
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `name`, which lives across the call,
    // and stores the length it wrote in `len`; the fd is an open socket borrowed for it.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let written = &name[..(len as usize).min(name.len())];
    let end = written
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(written.len());
    Ok(String::from_utf8_lossy(&written[..end]).into_owned())
}

/// Whether a TCP socket may use the congestion control `name` here (the same error as
/// `set_congestion`), tried on a socket made for it and closed.
pub fn check_congestion(name: &str) -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers; the fd it returns is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_congestion(&socket, name)
}

pub enum Listener {
    Uring(tokio_uring::net::TcpListener),
    Fallback(tokio::net::TcpListener),
}

impl Listener {
    /// Listens on `addr`; with `congestion`, every connection accepted uses that TCP
    /// congestion control (set on the listening socket, which they inherit).
    pub fn bind(
        kind: EngineKind,
        addr: SocketAddr,
        congestion: Option<&str>,
    ) -> io::Result<Listener> {
        let std = std::net::TcpListener::bind(addr)?;
        if let Some(name) = congestion {
            set_congestion(&std, name)?;
        }
        std.set_nonblocking(true)?;
        Ok(match kind {
            EngineKind::Uring => Listener::Uring(tokio_uring::net::TcpListener::from_std(std)),
            EngineKind::Fallback => Listener::Fallback(tokio::net::TcpListener::from_std(std)?),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Uring(l) => l.local_addr(),
            Listener::Fallback(l) => l.local_addr(),
        }
    }

    /// The TCP congestion control the connections it accepts inherit.
    pub fn congestion(&self) -> io::Result<String> {
        match self {
            Listener::Uring(l) => congestion_of(l),
            Listener::Fallback(l) => congestion_of(l),
        }
    }

    pub async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        let (conn, peer) = match self {
            Listener::Uring(l) => {
                let (s, peer) = l.accept().await?;
                (Conn::uring(s)?, peer)
            }
            Listener::Fallback(l) => {
                let (s, peer) = l.accept().await?;
                (Conn::fallback(s), peer)
            }
        };
        conn.set_nodelay()?;
        conn.drop_when_unacked()?;
        Ok((conn, peer))
    }
}

enum Stream {
    Uring(tokio_uring::net::TcpStream),
    Fallback(tokio::net::TcpStream),
}

/// One TCP connection. Methods take `&self`, so a reader task and a writer task can share it
/// through an `Rc` (each payload method keeps its own pipe or buffer).
pub struct Conn {
    stream: Stream,
    send_pipes: RefCell<Option<[Pipe; 2]>>,
}

impl Conn {
    fn uring(s: tokio_uring::net::TcpStream) -> io::Result<Conn> {
        uring::set_nonblocking(s.as_raw_fd())?;
        Ok(Conn::new(Stream::Uring(s)))
    }

    fn fallback(s: tokio::net::TcpStream) -> Conn {
        Conn::new(Stream::Fallback(s))
    }

    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            send_pipes: RefCell::new(None),
        }
    }

    /// A follower's connection. It is a tokio stream on both engines: the follower's payloads
    /// come off the socket with non-blocking splice(2) driven by readiness (`receive`), which
    /// tokio-uring's completion-based stream cannot offer.
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let conn = Conn::fallback(tokio::net::TcpStream::connect(addr).await?);
        conn.set_nodelay()?;
        Ok(conn)
    }

    /// TCP_USER_TIMEOUT: the kernel ends the connection (ETIMEDOUT) once the peer's host has
    /// left what was sent unacknowledged, or its receive window shut, for
    /// `FOLLOWER_UNACKED_TIMEOUT_MS` (docs/PROTOCOL.md): a follower's host gone without a reset
    /// leaves then, not after the kernel's quarter of an hour of retransmissions.
    fn drop_when_unacked(&self) -> io::Result<()> {
        let ms = crate::frame::FOLLOWER_UNACKED_TIMEOUT_MS as libc::c_int;
        let fd = match &self.stream {
            Stream::Uring(s) => s.as_raw_fd(),
            Stream::Fallback(s) => s.as_raw_fd(),
        };
        match set_int_option(&fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms) {
            true => Ok(()),
            false => Err(io::Error::last_os_error()),
        }
    }

    fn set_nodelay(&self) -> io::Result<()> {
        match &self.stream {
            Stream::Uring(s) => s.set_nodelay(true),
            Stream::Fallback(s) => s.set_nodelay(true),
        }
    }

    /// The engine this connection runs on.
    pub fn engine(&self) -> EngineKind {
        match &self.stream {
            Stream::Uring(_) => EngineKind::Uring,
            Stream::Fallback(_) => EngineKind::Fallback,
        }
    }

    /// Reads what is available into `buf` (cleared first, filled up to its capacity).
    /// `Ok(0)` is the end of the stream.
    pub async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        self.read_more(buf).await
    }

    /// Reads what is available into `buf`'s spare capacity, after the bytes it holds (which it
    /// keeps): a reader that parses in place reads on behind a partial frame without moving
    /// the bytes it has. A buffer with no room left gets `READ_MORE_MIN_BYTES` more first.
    /// `Ok(0)` is the end of the stream.
    pub async fn read_more(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(READ_MORE_MIN_BYTES);
        }
        match &self.stream {
            Stream::Uring(s) => {
                use tokio_uring::buf::BoundedBuf;
                let held = buf.len();
                // The kernel writes from `held` on, and the slice sets the length to
                // `held + n` when it returns.
                let (r, slice) = s.read(buf.slice(held..)).await;
                (r, slice.into_inner())
            }
            Stream::Fallback(s) => {
                let r = fallback::read(s, &mut buf).await;
                (r, buf)
            }
        }
    }

    pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match &self.stream {
            Stream::Uring(s) => s.write_all(buf).await,
            Stream::Fallback(s) => {
                let r = fallback::send_all(s, &buf, 0).await;
                (r, buf)
            }
        }
    }

    /// Writes what the socket takes of `buf` now, without waiting: `WouldBlock` when it takes
    /// nothing. A completion-based (io_uring) stream cannot try; it always says `WouldBlock`.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.stream {
            Stream::Fallback(s) => s.try_write(buf),
            Stream::Uring(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Writes `buf` and holds it back (MSG_MORE) for the payload that follows it: a frame
    /// header and a small payload then leave in one segment, and the follower reads both at
    /// once. Only call it right before `send_file`, which pushes everything out.
    pub async fn write_all_before_payload(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match &self.stream {
            Stream::Uring(s) => uring::send_all_more(s.as_raw_fd(), buf).await,
            Stream::Fallback(s) => {
                let r = fallback::send_all(s, &buf, libc::MSG_MORE).await;
                (r, buf)
            }
        }
    }

    /// Sends `[offset, offset + len_bytes)` of `file` without copying it through user space.
    pub async fn send_file(
        &self,
        file: &std::fs::File,
        offset: u64,
        len_bytes: u64,
    ) -> io::Result<()> {
        match &self.stream {
            Stream::Uring(_) => {
                let taken = self.send_pipes.borrow_mut().take();
                let pipes = match taken {
                    Some(p) => p,
                    None => [Pipe::new(SEND_PIPE_BYTES)?, Pipe::new(SEND_PIPE_BYTES)?],
                };
                let r = uring::send_file(
                    self.as_raw_fd(),
                    &pipes,
                    file.as_raw_fd(),
                    offset,
                    len_bytes,
                )
                .await;
                // Pipes left holding bytes after an error would corrupt the next payload.
                if r.is_ok() {
                    *self.send_pipes.borrow_mut() = Some(pipes);
                }
                r
            }
            Stream::Fallback(s) => {
                fallback::send_file(s, file.as_raw_fd(), offset, len_bytes).await
            }
        }
    }

    /// The tokio stream under a follower's connection (see `connect`), for `receive::Receiver`.
    pub fn tokio_stream(&self) -> Option<&tokio::net::TcpStream> {
        match &self.stream {
            Stream::Fallback(s) => Some(s),
            Stream::Uring(_) => None,
        }
    }

    /// Sends what `send_file` left corked in the socket (see `uring::send_file`) now.
    pub fn push(&self) -> io::Result<()> {
        // Setting TCP_NODELAY (again) pushes every pending segment out.
        self.set_nodelay()
    }

    /// Shuts both directions down, so the peer sees the end of the stream.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on our own open socket fd; failure (already closed) is harmless.
        unsafe {
            libc::shutdown(self.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match &self.stream {
            Stream::Uring(s) => s.as_raw_fd(),
            Stream::Fallback(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Each sleep lasts at least its duration, also right after one dropped before it ended
    /// (whose expiry must not end the next early), and every one ends.
    #[test]
    fn fine_timer_sleeps_at_least_as_long_as_asked_and_wakes_up() {
        for kind in [EngineKind::Uring, EngineKind::Fallback] {
            if kind == EngineKind::Uring && uring_unavailable().is_some() {
                continue;
            }
            run(kind, || async move {
                let timer = FineTimer::new(kind).unwrap();
                let short = Duration::from_micros(100);
                for _ in 0..20 {
                    let started = Instant::now();
                    timer.sleep(short).await.unwrap();
                    assert!(started.elapsed() >= short, "{kind:?}");
                }
                // Dropped before its end: its expiry comes while nobody waits.
                let dropped = tokio::time::timeout(Duration::from_millis(1), async {
                    timer.sleep(Duration::from_millis(20)).await.unwrap();
                });
                assert!(dropped.await.is_err(), "{kind:?}");
                std::thread::sleep(Duration::from_millis(25));
                let started = Instant::now();
                timer.sleep(Duration::from_millis(5)).await.unwrap();
                assert!(started.elapsed() >= Duration::from_millis(5), "{kind:?}");
            });
        }
    }

    /// `read_more` keeps what the buffer holds and appends after it, on both engines, also
    /// when the buffer came with no room left.
    #[test]
    fn read_more_appends_to_what_the_buffer_holds() {
        for kind in [EngineKind::Uring, EngineKind::Fallback] {
            if kind == EngineKind::Uring && uring_unavailable().is_some() {
                continue;
            }
            run(kind, || async move {
                let listener = Listener::bind(kind, "127.0.0.1:0".parse().unwrap(), None).unwrap();
                let addr = listener.local_addr().unwrap();
                let (client, accepted) = tokio::join!(Conn::connect(addr), listener.accept());
                let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
                // The accepted side runs on `kind`'s stream; the connecting one is always a
                // tokio stream (a follower's).
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let mut held = Vec::with_capacity(64);
                    held.extend_from_slice(b"held:");
                    for (sent, full) in [(&b"abc"[..], false), (&b"defg"[..], true)] {
                        if full {
                            held.shrink_to_fit();
                            assert_eq!(held.capacity(), held.len());
                        }
                        let (r, _) = from.write_all(sent.to_vec()).await;
                        r.unwrap();
                        let before = held.len();
                        let (r, back) = to.read_more(held).await;
                        held = back;
                        assert_eq!(r.unwrap(), sent.len(), "{kind:?}");
                        assert_eq!(&held[before..], sent, "{kind:?}");
                    }
                    assert_eq!(held, b"held:abcdefg", "{kind:?}");
                }
            });
        }
    }
}
