//! The fallback engine's payload moves, for hosts where io_uring is blocked (Docker's default
//! seccomp profile refuses io_uring_setup): sendfile(2) from the page cache to the socket on the
//! leader, splice(2) socket -> pipe -> file on the follower (measured faster here than recv(2) +
//! pwrite(2): one copy instead of two), each driven by tokio's readiness events.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

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
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
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

pub async fn read(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives `len_bytes` into `file` at `offset` with splice(2): socket -> pipe -> file, so the
/// bytes are never copied through user space. The socket side is non-blocking and driven by
/// tokio's readiness; the pipe -> file side writes into the page cache and does not block on
/// the network.
pub async fn splice_recv_file(
    stream: &TcpStream,
    pipe: &super::Pipe,
    file: RawFd,
    offset: u64,
    len_bytes: u64,
) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    let mut offset = offset as libc::loff_t;
    let mut left = len_bytes;
    while left > 0 {
        let chunk = (left as usize).min(pipe.capacity_bytes);
        let n = stream
            .async_io(Interest::READABLE, || {
                // SAFETY: the socket and the pipe's write end are open fds borrowed for the call;
                // null offsets are allowed for a socket and a pipe.
                let r = unsafe {
                    libc::splice(
                        socket,
                        std::ptr::null_mut(),
                        pipe.write.as_raw_fd(),
                        std::ptr::null_mut(),
                        chunk,
                        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                    )
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the leader closed the connection {left} bytes before the end of a payload"
                ),
            ));
        }
        let mut in_pipe = n;
        while in_pipe > 0 {
            // SAFETY: the pipe's read end and the file are open fds; `offset` is a valid loff_t
            // the kernel advances.
            let w = unsafe {
                libc::splice(
                    pipe.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    file,
                    &mut offset,
                    in_pipe,
                    libc::SPLICE_F_MOVE,
                )
            };
            if w < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if w == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice into the file moved nothing",
                ));
            }
            in_pipe -= w as usize;
        }
        left -= n as u64;
    }
    Ok(())
}
