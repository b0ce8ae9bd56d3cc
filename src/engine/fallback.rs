//! The fallback engine's payload moves, for hosts where io_uring is blocked (Docker's default
//! seccomp profile refuses io_uring_setup): sendfile(2) from the page cache to the socket on the
//! leader, driven by tokio's readiness events. (The follower's receive path, shared by both
//! engines, is in `engine::receive`.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Sends `[offset, offset + len_bytes)` of `file` with sendfile(2).
pub async fn send_file(
    stream: &TcpStream,
    file: RawFd,
    offset: u64,
    len_bytes: u64,
) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    let mut off = offset as libc::off_t;
    let end = offset + len_bytes;
    while (off as u64) < end {
        let left = (end - off as u64) as usize;
        let n = stream
            .async_io(Interest::WRITABLE, || {
                // SAFETY: both fds are open for the duration of the call (the stream and the file
                // are borrowed by our caller), and `off` is a valid, exclusively borrowed off_t.
                let r = unsafe { libc::sendfile(socket, file, &mut off, left) };
                super::byte_count(r)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ended {} bytes before the range to send (it shrank meanwhile)",
                    end - off as u64
                ),
            ));
        }
    }
    Ok(())
}

/// Appends what the socket has to `buf`, up to its capacity (64 bytes more when it is full).
pub async fn read(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        // Into the spare capacity: zeroing a 256 KiB buffer for every read that brings a few
        // frame headers cost the follower 6% of its CPU time at 100,000 msgs/s.
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends all of `buf` with send(2) `flags` (MSG_MORE for a header that its payload follows, see
/// `uring::send_all_more`; 0 for a plain write).
pub async fn send_all(stream: &TcpStream, mut buf: &[u8], flags: libc::c_int) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    while !buf.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                // SAFETY: the socket is open (borrowed through `stream`) and `buf` is a valid,
                // initialised slice for the duration of the call.
                let r = unsafe {
                    libc::send(
                        socket,
                        buf.as_ptr().cast(),
                        buf.len(),
                        flags | libc::MSG_DONTWAIT,
                    )
                };
                super::byte_count(r)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// A one-shot timer of microsecond precision, a timerfd: tokio's timer wheel rounds sleeps up to
/// the next millisecond.
pub struct FineTimer {
    fd: AsyncFd<OwnedFd>,
}

impl FineTimer {
    pub fn new() -> io::Result<FineTimer> {
        // SAFETY: timerfd_create takes no pointers.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created, is valid, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` keeps the timerfd open for as long as the `AsyncFd` owns it,
        // and its `as_raw_fd` always returns that one descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(FineTimer { fd })
    }

    /// Sleeps for `duration` (at least 1 ns: a zero setting would disarm the timer). Arming
    /// resets an expiry left from a sleep that was dropped before it ended.
    pub async fn sleep(&self, duration: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: duration.as_secs() as libc::time_t,
                tv_nsec: duration.subsec_nanos().max(1) as libc::c_long,
            },
        };
        // SAFETY: the fd is open (owned by `self`), `spec` is a valid itimerspec that outlives
        // the call, and the old value may be null.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            let read = guard.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into the 8-byte buffer from an open fd.
                let r = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                super::byte_count(r)
            });
            match read {
                Ok(r) => return r.map(|_| ()),
                // Readiness left from an earlier expiry that arming cleared: wait on.
                Err(_would_block) => continue,
            }
        }
    }
}
