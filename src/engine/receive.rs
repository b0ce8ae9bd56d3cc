//! The follower's payload path, the same on both engines: the connection's task moves each
//! payload socket -> pipe with non-blocking splice(2) (page references, no copy), waiting for
//! readability as needed, then pipe -> file with a blocking splice(2) (the one copy, into the
//! page cache), a pipe's worth at a time, the way a plain splice receiver does. While a payload
//! streams in, the socket wakes the task only once `RECEIVE_WAKE_BYTES` (or the rest of the
//! payload) is there: a paced sender delivers a segment at a time.
//!
//! Each write has completed when `receive` returns, so a file under its real name only ever
//! grows by a prefix of what arrived (a crash leaves no hole), bytes never land out of wire
//! order, and a MARK after a payload can be acked as written at once.
//!
//! The copy is the same wherever it runs. Handing the pipe -> file half to another thread (an
//! io-wq worker through IORING_OP_SPLICE, or a writer thread) with four pipes in rotation, so
//! that the task could fill the next pipe meanwhile, was measured slower here (2 cores, the
//! streaming bench): the hand-offs and wake-ups cost more than the overlap won (README,
//! Performance).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Pipe, RECEIVE_WAKE_BYTES};
use crate::frame::LEADER_SILENCE_TIMEOUT_MS;

/// A payload write into a file failed (the disk, not the socket). It travels inside the
/// `io::Error` the receiver returns, so the follower can tell the leader and name the file.
#[derive(Debug)]
pub struct WriteFailed {
    pub path: String,
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
    fn wrap(path: &str, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            WriteFailed {
                path: path.to_string(),
                source: e,
            },
        )
    }
}

/// Whether `e` is a failed write into a file (`WriteFailed`) rather than a socket error.
pub fn is_write_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<WriteFailed>())
}

/// A connection's payload receiver: the pipe its payloads pass through.
#[derive(Default)]
pub struct Receiver {
    /// Empty between payloads. Dropped after an error, which may leave bytes in it.
    pipe: Option<Pipe>,
}

impl Receiver {
    pub fn new() -> Receiver {
        Receiver::default()
    }

    /// Receives the next `len_bytes` of `stream` into `file` (named `path` in errors) at
    /// `offset`. Returns once every byte is in the file's page cache. A failed write into the
    /// file is a `WriteFailed`; anything else is the socket's.
    pub async fn receive(
        &mut self,
        stream: &TcpStream,
        file: &File,
        path: &str,
        offset: u64,
        len_bytes: u64,
    ) -> io::Result<()> {
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => Pipe::new(super::RECEIVE_PIPE_BYTES)?,
        };
        let mut at = offset as libc::loff_t;
        let mut left = len_bytes;
        let mut wake = WakeThreshold::of(stream);
        while left > 0 {
            let chunk = (left as usize).min(pipe.capacity_bytes);
            wake.set(left.min(RECEIVE_WAKE_BYTES as u64) as usize);
            ack_at_once(stream);
            // A leader that goes silent in the middle of a payload is given up on like one that
            // goes silent between frames (the follower reconnects).
            let n = match unless_silent(stream, splice_in(stream, &pipe, chunk)).await {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the leader closed the connection {left} bytes before the end of a \
                             payload"
                        ),
                    ))
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e),
                Err(Silent) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the leader sent nothing for {LEADER_SILENCE_TIMEOUT_MS} ms, {left} \
                             bytes before the end of a payload"
                        ),
                    ))
                }
            };
            pipe.drain_blocking(file.as_raw_fd(), Some(&mut at), n)
                .map_err(|e| WriteFailed::wrap(path, e))?;
            left -= n as u64;
        }
        self.pipe = Some(pipe);
        Ok(())
    }
}

/// The leader went silent: nothing arrived for `LEADER_SILENCE_TIMEOUT_MS`.
#[derive(Debug)]
pub struct Silent;

/// Runs `io` (a read of `stream`) until it ends, or until the leader has sent nothing for
/// `LEADER_SILENCE_TIMEOUT_MS`. A timer that ran out while bytes wait in the socket measured
/// this process's own pause (SIGSTOP, a suspended VM, a long swap-in), not the leader's
/// silence: the wait goes on, and `io` gets them.
pub async fn unless_silent<T>(
    socket: &impl AsRawFd,
    io: impl std::future::Future<Output = T>,
) -> Result<T, Silent> {
    let silence = Duration::from_millis(LEADER_SILENCE_TIMEOUT_MS);
    tokio::pin!(io);
    loop {
        match tokio::time::timeout(silence, &mut io).await {
            Ok(done) => return Ok(done),
            Err(_) if bytes_waiting(socket) => continue,
            Err(_) => return Err(Silent),
        }
    }
}

/// Whether the socket holds received bytes not read yet.
fn bytes_waiting(socket: &impl AsRawFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD on our own open socket fd writes one c_int, into `queued`, which lives
    // across the call.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    r == 0 && queued > 0
}

/// Sends the ACK the kernel holds back for `socket`, if any, and takes the socket out of its
/// interactive ("pingpong") mode, in which the ACKs of what arrives wait for a reply to ride on.
/// A follower's own acks put its socket in that mode; while a payload streams in, the leader
/// must hear at once what arrived: with bbr, whose window is about twice the tiny delay it
/// measures on a fast link, a leader kept waiting for ACKs sends in short bursts, and the
/// follower, behind it, reads in small pieces (docs/PERFORMANCE.md has the figures: the
/// streaming bench with bbr gained about a quarter, cubic nothing). Once per chunk: the mode
/// comes back with the next ack the follower sends.
fn ack_at_once(socket: &impl AsRawFd) {
    // Only a hint: a socket that refused it (none that TCP gives us would) still receives
    // every byte, with the ACKs at the kernel's pace.
    let _ = super::set_int_option(socket, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
}

/// How many received bytes a socket must hold before a wait for readability ends
/// (SO_RCVLOWAT), set for the length of one payload and back to 1 byte when dropped, whatever
/// way `receive` ends: between payloads a frame of a few bytes must wake the follower. The
/// kernel still wakes a reader below the threshold when the receive window or buffer runs low,
/// and a non-blocking read takes whatever is there, so a raised threshold delays no byte that
/// the rest of the payload would not have to wait for anyway.
struct WakeThreshold<'a> {
    socket: &'a TcpStream,
    /// The threshold in effect: 1 byte, the socket's default, until `set`.
    bytes: usize,
}

impl<'a> WakeThreshold<'a> {
    fn of(socket: &'a TcpStream) -> WakeThreshold<'a> {
        WakeThreshold { socket, bytes: 1 }
    }

    /// Asks the socket to wake its reader once `bytes` are there (called only when it changes).
    fn set(&mut self, bytes: usize) {
        if bytes == self.bytes {
            return;
        }
        let value = libc::c_int::try_from(bytes)
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // Only a hint, as `ack_at_once`: a socket that refused it wakes its reader for every
        // arrival, which costs wake-ups, not bytes. What is in effect is what `Drop` restores.
        if super::set_int_option(self.socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, value) {
            self.bytes = bytes;
        }
    }
}

impl Drop for WakeThreshold<'_> {
    fn drop(&mut self) {
        self.set(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::RawFd;

    /// An int-valued socket option of `socket`.
    fn sockopt(socket: RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `value` and its size into `len`, both live
        // across the call; the fd is an open socket.
        let r = unsafe {
            libc::getsockopt(
                socket,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    /// Whether `socket` ACKs received data at once rather than holding the ACK back for a reply
    /// to ride on (TCP_QUICKACK reads 0 in the kernel's interactive, "pingpong", mode).
    fn acks_at_once(socket: &impl AsRawFd) -> bool {
        sockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_QUICKACK) == 1
    }

    /// The bytes `socket` must hold before a wait for readability ends (SO_RCVLOWAT).
    fn wake_threshold(socket: RawFd) -> libc::c_int {
        sockopt(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT)
    }

    /// What a test's follower receives into: a new file in a temporary dir, and a runtime with
    /// `follower` made its non-blocking stream (dropped before the runtime: fields drop in
    /// order).
    struct Receiving {
        stream: TcpStream,
        file: File,
        dir: tempfile::TempDir,
        runtime: tokio::runtime::Runtime,
    }

    fn receiving(follower: std::net::TcpStream) -> Receiving {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("seg")).unwrap();
        follower.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = {
            let _in_runtime = runtime.enter();
            TcpStream::from_std(follower).unwrap()
        };
        Receiving {
            stream,
            file,
            dir,
            runtime,
        }
    }

    /// A follower answers the leader (acks), which puts its socket in the kernel's interactive
    /// mode, where the ACKs of what arrives wait for a reply to ride on. Receiving a payload
    /// takes it out of that mode, so the leader hears at once what arrived: with bbr, whose
    /// window is about twice the tiny delay it measures on a fast link, a leader kept waiting
    /// for ACKs sends in short bursts (README, Performance).
    #[test]
    fn receiving_a_payload_acks_what_arrives_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut leader = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut follower, _) = listener.accept().unwrap();
        // Each side answers the other at once, a few times over, as a follower acking MARKs.
        let mut word = [0u8; 4];
        for _ in 0..8 {
            leader.write_all(b"mark").unwrap();
            follower.read_exact(&mut word).unwrap();
            follower.write_all(b"ack!").unwrap();
            leader.read_exact(&mut word).unwrap();
        }
        assert!(
            !acks_at_once(&follower),
            "the exchange did not put the follower's socket in interactive mode; this test \
             cannot tell anything on this kernel"
        );
        const PAYLOAD_BYTES: usize = 256 * 1024;
        let sender = std::thread::spawn(move || {
            leader.write_all(&vec![7u8; PAYLOAD_BYTES]).unwrap();
            leader
        });
        let r = receiving(follower);
        r.runtime.block_on(async {
            Receiver::new()
                .receive(&r.stream, &r.file, "seg", 0, PAYLOAD_BYTES as u64)
                .await
                .unwrap();
        });
        assert!(
            acks_at_once(&r.stream),
            "still holding ACKs back after a payload"
        );
        assert_eq!(r.file.metadata().unwrap().len(), PAYLOAD_BYTES as u64);
        drop(sender.join().unwrap());
    }

    /// A payload that trickles in (a paced sender: bbr sends a 64 KiB segment per timer on
    /// loopback) wakes the follower once `RECEIVE_WAKE_BYTES`, or the rest of the payload, is
    /// there, not for every segment; once the payload is in, the next frame wakes it at once.
    #[test]
    fn a_trickling_payload_wakes_the_follower_per_quarter_mib_then_frames_at_once() {
        const PAYLOAD_BYTES: usize = 2 * RECEIVE_WAKE_BYTES + 1000;
        const FIRST_BYTES: usize = 100 * 1024;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut leader = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (follower, _) = listener.accept().unwrap();
        let follower_fd = follower.as_raw_fd();
        let sender = std::thread::spawn(move || {
            let payload = vec![7u8; PAYLOAD_BYTES];
            leader.write_all(&payload[..FIRST_BYTES]).unwrap();
            // The receiver has taken what came and waits for more: for how much? (Asked
            // until well within the silence after which the receiver gives up on the leader.)
            let deadline =
                std::time::Instant::now() + Duration::from_millis(LEADER_SILENCE_TIMEOUT_MS / 3);
            let mut seen = wake_threshold(follower_fd);
            while seen != RECEIVE_WAKE_BYTES as libc::c_int && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
                seen = wake_threshold(follower_fd);
            }
            leader.write_all(&payload[FIRST_BYTES..]).unwrap();
            leader.write_all(b"mark").unwrap();
            (leader, seen)
        });
        let r = receiving(follower);
        let stream = &r.stream;
        r.runtime.block_on(async {
            Receiver::new()
                .receive(stream, &r.file, "seg", 0, PAYLOAD_BYTES as u64)
                .await
                .unwrap();
            assert_eq!(
                wake_threshold(stream.as_raw_fd()),
                1,
                "after the payload, a frame of a few bytes must wake the follower"
            );
            let mut mark = [0u8; 4];
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                let mut got = 0;
                while got < mark.len() {
                    stream.readable().await.unwrap();
                    match stream.try_read(&mut mark[got..]) {
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("reading the frame after the payload: {e}"),
                    }
                }
            })
            .await;
            assert!(
                read.is_ok(),
                "the frame after the payload never woke the follower"
            );
            assert_eq!(&mark, b"mark");
        });
        let (_leader, seen) = sender.join().unwrap();
        assert_eq!(
            seen, RECEIVE_WAKE_BYTES as libc::c_int,
            "while the rest of a payload was awaited, the socket woke the follower for any byte"
        );
        let written = std::fs::read(r.dir.path().join("seg")).unwrap();
        assert_eq!(written, vec![7u8; PAYLOAD_BYTES]);
    }
}
