//! `--mode raw`: the machine's limit for loadgen's own workload, measured the way ferry is.
//!
//! The writer is the library mode's (messages into mmap'd segments, one call per message), but
//! each call hands the range to a fan-out instead of a ferry leader: one sender thread per
//! receiver splices new ranges file -> pipe -> loopback TCP, and the receiver thread splices
//! socket -> pipe -> one file. No protocol, no index, no acks, no process boundary: only the
//! copies every replica needs (the writer's pages, each receiver's pages, the loopback
//! transfer) and one wake-up when a sender was idle. A ferry run divided by a raw run of the
//! same options, interleaved, is ferry's share of what this machine can do for the workload;
//! the raw figure alone says whether a target can be met here at all.
//!
//! One writer only: its segments, concatenated in order, are then exactly each receiver's
//! stream, which `finish` checks byte for byte (SHA-1).
//!
//! Synced receivers (`--durability synced`) make their stream durable the way a ferry follower
//! does at `synced`: a second thread per receiver calls fdatasync whenever the receiver has
//! written past what it last synced (the writes made during one call wait for the next), and
//! a byte counts as received only once a call that covers it has returned.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry::engine::{splice_blocking, Pipe, RECEIVE_PIPE_BYTES, SEND_PIPE_BYTES};
use ferry::frame::Durability;
use sha1::{Digest, Sha1};

/// What the receivers do at `durability`: "synced" (fdatasync before they count a byte) or
/// "written" (spliced into the file: `received` and `written` alike).
pub fn receivers_durability(durability: Durability) -> &'static str {
    if durability == Durability::Synced {
        "synced"
    } else {
        "written"
    }
}

/// Appended ranges not yet sent by every sender, in the order they were appended.
struct Log {
    /// `entries[0]` is range number `first_index`; a range that continues the last one (same
    /// segment, contiguous) extends it instead of adding one.
    entries: VecDeque<Range>,
    first_index: u64,
    /// Per sender, the number of the range it is sending.
    cursors: Vec<u64>,
    /// Every segment, in the order it was first appended to (what `finish` compares).
    segments: Vec<Arc<str>>,
    appended_bytes: u64,
    /// Per sender, the `appended_bytes` it waits for, if it waits.
    waits_for: Vec<Option<u64>>,
    /// The least of `waits_for` (u64::MAX: nobody to wake).
    wake_at_bytes: u64,
    closed: bool,
}

impl Log {
    fn set_wait(&mut self, sender: usize, until: Option<u64>) {
        self.waits_for[sender] = until;
        self.wake_at_bytes = self
            .waits_for
            .iter()
            .flatten()
            .copied()
            .min()
            .unwrap_or(u64::MAX);
    }
}

struct Range {
    path: Arc<str>,
    start: u64,
    end: u64,
}

struct Shared {
    log: Mutex<Log>,
    grew: Condvar,
    /// An idle sender waits until this many bytes are there to send (at least one).
    batch_bytes: u64,
    /// Per receiver, the bytes it holds (written into its stream).
    received_bytes: Vec<AtomicU64>,
    /// The least of `received_bytes`, for `wait_received_beyond`.
    held_by_all: Mutex<u64>,
    held: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // Only a panicking thread could poison it, and then its join reports the panic.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn received(&self, receiver: usize, bytes: u64) {
        self.received_bytes[receiver].store(bytes, Ordering::SeqCst);
        let least = self
            .received_bytes
            .iter()
            .map(|r| r.load(Ordering::SeqCst))
            .min()
            .unwrap_or(bytes);
        let mut held = self.held_by_all.lock().unwrap_or_else(|p| p.into_inner());
        if least > *held {
            *held = least;
            self.held.notify_all();
        }
    }
}

struct Receiver {
    path: PathBuf,
    thread: JoinHandle<io::Result<()>>,
}

/// Receiver `i`'s (from 1) dir under `recv_root`, where it writes its `stream`.
pub fn receiver_dir(recv_root: &Path, i: usize) -> PathBuf {
    recv_root.join(format!("raw{i}"))
}

pub struct Fanout {
    dir: PathBuf,
    shared: Arc<Shared>,
    senders: Vec<JoinHandle<io::Result<()>>>,
    receivers: Vec<Receiver>,
    /// With acks over the sockets: per receiver, the thread that reads them.
    ack_readers: Vec<JoinHandle<io::Result<()>>>,
}

impl Fanout {
    /// Receivers write into `recv_root/raw<i>/stream`; segments are read from `dir`. A sender
    /// waits for `batch_bytes` to send: 0 sends each append as soon as it can (the latency
    /// floor), 1 MiB gives big splices and one wake-up per MiB (the throughput ceiling).
    /// `synced` receivers count only what fdatasync made durable. With `acks`, a receiver
    /// sends what it holds back over its socket (`ACK_BYTES`, after each write, or each
    /// fdatasync when synced), and it counts once a thread on the sending side has read it: a
    /// round trip, as a ferry follower's ack makes, rather than a store into shared memory.
    pub fn start(
        dir: &Path,
        recv_root: &Path,
        receivers: usize,
        batch_bytes: u64,
        tcp_congestion: Option<&str>,
        synced: bool,
        acks: bool,
    ) -> io::Result<Fanout> {
        let shared = Arc::new(Shared {
            log: Mutex::new(Log {
                entries: VecDeque::new(),
                first_index: 0,
                cursors: vec![0; receivers],
                segments: Vec::new(),
                appended_bytes: 0,
                waits_for: vec![None; receivers],
                wake_at_bytes: u64::MAX,
                closed: false,
            }),
            grew: Condvar::new(),
            batch_bytes: batch_bytes.max(1),
            received_bytes: (0..receivers).map(|_| AtomicU64::new(0)).collect(),
            held_by_all: Mutex::new(0),
            held: Condvar::new(),
        });
        let mut fanout = Fanout {
            dir: dir.to_path_buf(),
            shared,
            senders: Vec::new(),
            receivers: Vec::new(),
            ack_readers: Vec::new(),
        };
        for i in 0..receivers {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let out_dir = receiver_dir(recv_root, i + 1);
            std::fs::create_dir_all(&out_dir)?;
            let path = out_dir.join("stream");
            let out = File::create(&path)?;
            let shared = fanout.shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("raw-receiver{}", i + 1))
                .spawn(move || receive(listener, out, shared, i, synced, acks))?;
            fanout.receivers.push(Receiver { path, thread });
            let socket = TcpStream::connect(addr)?;
            if let Some(cc) = tcp_congestion {
                ferry::engine::set_congestion(&socket, cc)?;
            }
            if acks {
                let acks_in = socket.try_clone()?;
                let shared = fanout.shared.clone();
                fanout.ack_readers.push(
                    std::thread::Builder::new()
                        .name(format!("raw-acks{}", i + 1))
                        .spawn(move || read_acks(acks_in, &shared, i))?,
                );
            }
            let shared = fanout.shared.clone();
            let dir = fanout.dir.clone();
            fanout.senders.push(
                std::thread::Builder::new()
                    .name(format!("raw-sender{}", i + 1))
                    .spawn(move || {
                        let sent = send(&shared, i, &dir, &socket);
                        // Ends the receiver's stream; the ack reader's clone keeps the socket
                        // open for the acks still to come.
                        let _ = socket.shutdown(Shutdown::Write);
                        sent
                    })?,
            );
        }
        Ok(fanout)
    }

    /// The writer wrote `[offset, offset + len_bytes)` of `path` (relative to the dir). Returns
    /// the bytes appended so far, the position `wait_received_beyond` compares.
    pub fn append(&self, path: &str, offset: u64, len_bytes: u64) -> u64 {
        let mut log = self.shared.lock();
        log.appended_bytes += len_bytes;
        match log.entries.back_mut() {
            Some(last) if &*last.path == path && last.end == offset => last.end += len_bytes,
            _ => {
                let path: Arc<str> = match log.segments.last() {
                    Some(p) if &**p == path => p.clone(),
                    _ => {
                        let p: Arc<str> = Arc::from(path);
                        log.segments.push(p.clone());
                        p
                    }
                };
                log.entries.push_back(Range {
                    path,
                    start: offset,
                    end: offset + len_bytes,
                });
            }
        }
        if log.appended_bytes >= log.wake_at_bytes {
            // Every waiter wakes and waits again if its own mark is not reached yet.
            log.wake_at_bytes = u64::MAX;
            self.shared.grew.notify_all();
        }
        log.appended_bytes
    }

    /// Waits up to `timeout` until every receiver holds more than `beyond` bytes; returns what
    /// they all hold.
    pub fn wait_received_beyond(&self, beyond: u64, timeout: Duration) -> u64 {
        let held = self
            .shared
            .held_by_all
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (held, _) = self
            .shared
            .held
            .wait_timeout_while(held, timeout, |h| *h <= beyond)
            .unwrap_or_else(|p| p.into_inner());
        *held
    }

    /// Per receiver, the bytes appended that it does not hold yet.
    pub fn lags(&self) -> Vec<Option<u64>> {
        let appended = self.shared.lock().appended_bytes;
        self.shared
            .received_bytes
            .iter()
            .map(|r| Some(appended.saturating_sub(r.load(Ordering::Relaxed))))
            .collect()
    }

    /// The writer is done: the senders send what is left, whatever the batch, and close.
    pub fn close(&self) {
        let mut log = self.shared.lock();
        log.closed = true;
        self.shared.grew.notify_all();
    }

    /// After `close`: waits until every receiver holds everything.
    pub fn finish(self) -> anyhow::Result<Drained> {
        self.close();
        let segments = self.shared.lock().segments.clone();
        for s in self.senders {
            join(s, "a raw sender")?;
        }
        let mut streams = Vec::new();
        for r in self.receivers {
            join(r.thread, "a raw receiver")?;
            streams.push(r.path);
        }
        for a in self.ack_readers {
            join(a, "a raw ack reader")?;
        }
        Ok(Drained {
            segments: segments.iter().map(|s| self.dir.join(&**s)).collect(),
            streams,
        })
    }
}

/// `--raw-join`: the copy a joining follower's full sync makes, without ferry. Sends `files`
/// (under `dir`, each whole, in order) to one receiver under `recv_root` over loopback TCP,
/// spliced on both sides in 1 MiB batches, and returns once the receiver holds them all (what
/// it wrote, to compare later: hashing 2 GiB here would keep the CPU busy after the copy).
pub fn copy_once(
    dir: &Path,
    files: &[(String, u64)],
    recv_root: &Path,
    tcp_congestion: Option<&str>,
) -> anyhow::Result<Drained> {
    let fanout = Fanout::start(dir, recv_root, 1, 1024 * 1024, tcp_congestion, false, false)?;
    for (path, len_bytes) in files {
        fanout.append(path, 0, *len_bytes);
    }
    fanout.finish()
}

/// What a finished fan-out wrote, to compare.
pub struct Drained {
    segments: Vec<PathBuf>,
    streams: Vec<PathBuf>,
}

impl Drained {
    /// Whether every receiver's stream is the writer's segments concatenated, byte for byte.
    pub fn streams_match(&self) -> io::Result<bool> {
        let mut expected = Sha1::new();
        for s in &self.segments {
            hash_file(s, &mut expected)?;
        }
        let expected = expected.finalize();
        let mut all_same = true;
        for path in &self.streams {
            let mut got = Sha1::new();
            hash_file(path, &mut got)?;
            all_same &= got.finalize() == expected;
        }
        Ok(all_same)
    }
}

fn join(thread: JoinHandle<io::Result<()>>, what: &str) -> anyhow::Result<()> {
    match thread.join() {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{what} failed: {e}")),
        Err(_) => anyhow::bail!("{what} panicked"),
    }
}

fn hash_file(path: &Path, into: &mut Sha1) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        into.update(&buf[..n]);
    }
}

/// Sender `me`: every range in order, from the segment file to the socket, once a batch is
/// there to send; returns once the log is closed and everything in it is sent (shutting the
/// socket's sending side then ends the receiver's stream).
fn send(shared: &Shared, me: usize, dir: &Path, socket: &TcpStream) -> io::Result<()> {
    let pipe = Pipe::new(SEND_PIPE_BYTES)?;
    let mut index = 0u64;
    let mut sent_to = None::<u64>;
    let mut sent_bytes = 0u64;
    let mut open: Option<(Arc<str>, File)> = None;
    loop {
        let (path, from, to) = {
            let mut log = shared.lock();
            while log.appended_bytes - sent_bytes < shared.batch_bytes && !log.closed {
                log.set_wait(me, Some(sent_bytes + shared.batch_bytes));
                log = shared.grew.wait(log).unwrap_or_else(|p| p.into_inner());
                log.set_wait(me, None);
            }
            loop {
                let at = (index - log.first_index) as usize;
                match log.entries.get(at) {
                    Some(r) if sent_to.unwrap_or(r.start) < r.end => {
                        break (Some(r.path.clone()), sent_to.unwrap_or(r.start), r.end);
                    }
                    // This range is sent and a later one exists: move on, and let go of the
                    // ranges every sender has passed.
                    Some(_) if at + 1 < log.entries.len() => {
                        index += 1;
                        sent_to = None;
                        log.cursors[me] = index;
                        let oldest = log.cursors.iter().copied().min().unwrap_or(index);
                        while log.first_index < oldest {
                            log.entries.pop_front();
                            log.first_index += 1;
                        }
                    }
                    _ if log.closed => return Ok(()),
                    // Sent everything there is: wait for the next batch.
                    _ => break (None, 0, 0),
                }
            }
        };
        let Some(path) = path else { continue };
        let file = match &open {
            Some((p, f)) if Arc::ptr_eq(p, &path) => f,
            _ => {
                let f = File::open(dir.join(&*path))?;
                &open.insert((path, f)).1
            }
        };
        let mut offset = from as libc::loff_t;
        while (offset as u64) < to {
            let want = ((to - offset as u64) as usize).min(pipe.capacity_bytes);
            let n = splice_blocking(
                file.as_raw_fd(),
                Some(&mut offset),
                pipe.write.as_raw_fd(),
                None,
                want,
            )?;
            if n == 0 {
                return Err(io::Error::other(
                    "the segment ended before an appended range",
                ));
            }
            pipe.drain_blocking(socket.as_raw_fd(), None, n)?;
        }
        sent_bytes += to - from;
        sent_to = Some(to);
    }
}

/// One receiver: the socket's bytes into `out`, in order, until the sender closes; `synced`,
/// with a `Syncer` beside it that counts them once durable. Returns once they all are.
fn receive(
    listener: TcpListener,
    out: File,
    shared: Arc<Shared>,
    me: usize,
    synced: bool,
    acks: bool,
) -> io::Result<()> {
    let (socket, _) = listener.accept()?;
    let holds = if acks {
        Holds::Ack(socket.try_clone()?)
    } else {
        Holds::Shared(shared, me)
    };
    let written = if synced {
        Written::Synced(Syncer::start(out.try_clone()?, holds, me)?)
    } else {
        Written::Held(holds)
    };
    let received = receive_into(&socket, &out, &written);
    // The syncer makes the last bytes durable (or stops, after a failed receive) before the
    // receiver is done.
    let synced = match written {
        Written::Synced(syncer) => syncer.finish(),
        Written::Held(_) => Ok(()),
    };
    received.and(synced)
}

/// What a receiver does with the length of its stream after each write: counts it as held at
/// once, or hands it to its syncer, which counts it once fdatasync has returned for it.
enum Written {
    Held(Holds),
    Synced(Syncer),
}

/// Where a receiver's count of what it holds goes: into the shared counts at once, or
/// (`acks`) back over its socket, `ACK_BYTES` a count, for the sending side to count.
enum Holds {
    Shared(Arc<Shared>, usize),
    Ack(TcpStream),
}

/// An ack: the bytes a receiver holds, little-endian.
const ACK_BYTES: usize = 8;

impl Holds {
    fn now(&self, held_bytes: u64) -> io::Result<()> {
        match self {
            Holds::Shared(shared, me) => {
                shared.received(*me, held_bytes);
                Ok(())
            }
            Holds::Ack(socket) => {
                let mut socket = socket;
                socket.write_all(&held_bytes.to_le_bytes())
            }
        }
    }
}

/// The sending side of receiver `me`'s acks: counts each as it arrives, until the receiver
/// closes its socket.
fn read_acks(mut socket: TcpStream, shared: &Shared, me: usize) -> io::Result<()> {
    let mut ack = [0u8; ACK_BYTES];
    loop {
        match socket.read_exact(&mut ack) {
            Ok(()) => shared.received(me, u64::from_le_bytes(ack)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn receive_into(socket: &TcpStream, out: &File, written: &Written) -> io::Result<()> {
    let pipe = Pipe::new(RECEIVE_PIPE_BYTES)?;
    let mut offset: libc::loff_t = 0;
    loop {
        let n = splice_blocking(
            socket.as_raw_fd(),
            None,
            pipe.write.as_raw_fd(),
            None,
            pipe.capacity_bytes,
        )?;
        if n == 0 {
            return Ok(());
        }
        pipe.drain_blocking(out.as_raw_fd(), Some(&mut offset), n)?;
        match written {
            Written::Held(holds) => holds.now(offset as u64)?,
            Written::Synced(syncer) => syncer.wrote(offset as u64),
        }
    }
}

/// A synced receiver's second thread: fdatasync of its stream in rounds, as a ferry follower's
/// sync task does (while one call runs, later writes gather for the next), each round's bytes
/// counted as received when its call returns.
struct Syncer {
    state: Arc<(Mutex<SyncState>, Condvar)>,
    thread: JoinHandle<io::Result<()>>,
}

#[derive(Default)]
struct SyncState {
    written_bytes: u64,
    /// The receiver is done: sync what is left, then stop.
    done: bool,
}

impl Syncer {
    fn start(out: File, holds: Holds, me: usize) -> io::Result<Syncer> {
        let state = Arc::new((Mutex::new(SyncState::default()), Condvar::new()));
        let thread = {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("raw-sync{}", me + 1))
                .spawn(move || sync_rounds(&out, &state, &holds))?
        };
        Ok(Syncer { state, thread })
    }

    /// The receiver's stream is `written_bytes` long.
    fn wrote(&self, written_bytes: u64) {
        let (state, wake) = &*self.state;
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .written_bytes = written_bytes;
        wake.notify_one();
    }

    /// Syncs what is left, stops, and reports the first failed fdatasync.
    fn finish(self) -> io::Result<()> {
        let (state, wake) = &*self.state;
        state.lock().unwrap_or_else(|p| p.into_inner()).done = true;
        wake.notify_one();
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("a raw receiver's sync thread panicked")),
        }
    }
}

fn sync_rounds(out: &File, state: &(Mutex<SyncState>, Condvar), holds: &Holds) -> io::Result<()> {
    let (state, wake) = state;
    let mut synced_bytes = 0u64;
    loop {
        let (written_bytes, done) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            let s = wake
                .wait_while(s, |s| s.written_bytes == synced_bytes && !s.done)
                .unwrap_or_else(|p| p.into_inner());
            (s.written_bytes, s.done)
        };
        if written_bytes > synced_bytes {
            out.sync_data()?;
            synced_bytes = written_bytes;
            holds.now(synced_bytes)?;
        } else if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synced receiver counts bytes as received only once fdatasync has returned for them,
    /// as a ferry follower acks at `synced`: when every receiver is reported to hold the
    /// segment, none of its pages is dirty or under writeback. (On a disk-backed file system:
    /// /var/tmp, where loadgen puts its runs by default.)
    #[test]
    fn a_synced_receiver_reports_only_what_fdatasync_made_durable() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let segments = tmp.path().join("leader");
        std::fs::create_dir_all(&segments).unwrap();
        let len_bytes = 4u64 << 20;
        let data: Vec<u8> = (0..len_bytes).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(segments.join("seg"), &data).unwrap();

        let fanout = Fanout::start(&segments, tmp.path(), 2, 0, None, true, false).unwrap();
        fanout.append("seg", 0, len_bytes);
        let mut held = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while held < len_bytes && std::time::Instant::now() < deadline {
            held = fanout.wait_received_beyond(held, Duration::from_secs(1));
        }
        assert_eq!(held, len_bytes);
        for i in 1..=2 {
            let stream = File::open(receiver_dir(tmp.path(), i).join("stream")).unwrap();
            let stat = ferry::engine::uring::cachestat(stream.as_raw_fd(), 0, 0)
                .expect("cachestat(2): Linux 6.5 or later");
            assert_eq!(
                (stat.nr_dirty, stat.nr_writeback),
                (0, 0),
                "receiver {i} reported bytes not yet on disk"
            );
        }
        let drained = fanout.finish().unwrap();
        assert!(drained.streams_match().unwrap());
    }
}
