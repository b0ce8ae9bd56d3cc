//! Acks on a real connection, with one side driven by hand so that the test decides the
//! timing: a real `ferry follow` against ferry's own `LeaderSession` over a plain socket (the
//! test cuts the leader's bytes into writes), and a real embedded leader against a
//! `FollowerSession` over a plain socket (the test decides when the follower reads and acks).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use ferry::auth::Secret;
use ferry::catalog::Catalog;
use ferry::frame::{Durability, Frame, PREAMBLE_BYTES};
use ferry::leader::{Leader, LeaderConfig};
use ferry::paths::RelPath;
use ferry::session::follower::{FollowerAction, FollowerSession};
use ferry::session::leader::{LeaderSession, Transmit};

/// One read(2), retried when a signal interrupts it before any byte arrived (the embedded
/// leader's threads live in this test process).
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

struct HandLeader {
    stream: TcpStream,
    session: LeaderSession,
    catalog: Catalog,
    files: HashMap<RelPath, Vec<u8>>,
    /// What the session has not consumed yet.
    input: Vec<u8>,
    /// The same bytes, for the test's own decoding of the frames.
    frames_raw: Vec<u8>,
    preamble_left: usize,
}

impl HandLeader {
    /// A `ferry follow` (with `engine`, at `written`, into `env.dir("f")`) connected to a leader
    /// driven by hand that holds `seg`, empty, past the handshake and the initial sync. Returns
    /// both and the position the sync's MARK was acked at.
    fn start(env: &Env, engine: &str, seg: &RelPath) -> (HandLeader, Proc, u64) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let follower = start_follower(env, &env.dir("f"), addr, engine, "written");
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let secret = std::fs::read_to_string(&env.secret_file).unwrap();
        let mut leader = HandLeader {
            stream,
            session: LeaderSession::new(
                Secret::new(secret.trim().as_bytes().to_vec()).unwrap(),
                [7; 32],
                Duration::from_secs(10),
                [7; 16],
                [8; 16],
            ),
            catalog: Catalog::new([(seg.clone(), 0)]),
            files: HashMap::from([(seg.clone(), Vec::new())]),
            input: Vec::new(),
            frames_raw: Vec::new(),
            preamble_left: PREAMBLE_BYTES,
        };
        // Handshake and initial sync, until the follower acks the MARK that ends the sync.
        loop {
            let out = leader.output();
            leader.stream.write_all(&out).unwrap();
            let acked = leader.acks().last().copied();
            if let Some(at) = acked {
                return (leader, follower, at);
            }
        }
    }

    /// Reads once from the follower: the `written` positions of the ACKs completed.
    fn acks(&mut self) -> Vec<u64> {
        self.read()
            .into_iter()
            .filter_map(|f| match f {
                Frame::Ack { written, .. } => Some(written),
                _ => None,
            })
            .collect()
    }

    /// Everything the session has to send now, payloads inline, as one buffer.
    fn output(&mut self) -> Vec<u8> {
        let now = Instant::now();
        let mut out = Vec::new();
        if self.session.digest_requests().is_some() {
            self.session.digests_ready(Vec::new());
        }
        while let Some(t) = self.session.poll_transmit(&self.catalog, now) {
            match t {
                Transmit::OpenWhole { path, .. } => {
                    let len = self.files[&path].len() as u64;
                    self.session.begin_whole(&path, len, &self.catalog);
                }
                Transmit::Payload {
                    path,
                    offset,
                    len_bytes,
                    ..
                } => {
                    out.extend(self.session.take_output());
                    let file = &self.files[&path];
                    out.extend_from_slice(&file[offset as usize..(offset + len_bytes) as usize]);
                }
                Transmit::RecordUnreported { paths } => {
                    panic!("no bytes vanish here, yet the session asks to record {paths:?}")
                }
            }
        }
        out.extend(self.session.take_output());
        out
    }

    /// Reads once from the follower and feeds the session; returns the frames completed.
    fn read(&mut self) -> Vec<Frame> {
        let mut buf = [0u8; 4096];
        let n = read_some(&mut self.stream, &mut buf).expect("reading from the follower");
        assert!(n > 0, "the follower closed the connection");
        self.input.extend_from_slice(&buf[..n]);
        self.frames_raw.extend_from_slice(&buf[..n]);
        let used = self
            .session
            .handle_input(&self.input, &self.catalog, Instant::now())
            .expect("the follower's input is valid");
        self.input.drain(..used);
        // The follower's preamble comes first and is not a frame.
        if self.frames_raw.len() < self.preamble_left {
            self.preamble_left -= self.frames_raw.len();
            self.frames_raw.clear();
        } else {
            self.frames_raw.drain(..self.preamble_left);
            self.preamble_left = 0;
        }
        let mut frames = Vec::new();
        while let Ok(Some((frame, used))) = Frame::decode(&self.frames_raw) {
            frames.push(frame);
            self.frames_raw.drain(..used);
        }
        frames
    }

    fn append(&mut self, path: &RelPath, bytes: &[u8]) {
        let file = self.files.entry(path.clone()).or_default();
        let offset = file.len() as u64;
        file.extend_from_slice(bytes);
        let change = self
            .catalog
            .append(path.as_str(), offset, bytes.len() as u64)
            .expect("a RelPath passes the catalog's check");
        self.session.note_changed(path.clone(), change.since);
    }
}

/// Three rounds (DATA, payload, MARK each) reach the follower in one read: it acks each MARK
/// as it reaches it, rather than once for the whole read, so the first round's ack does not
/// wait for the later rounds' payloads to be written.
#[test]
fn a_follower_acks_every_mark_even_when_several_arrive_in_one_read() {
    let env = Env::new();
    let seg = RelPath::new("seg.0").unwrap();
    let (mut leader, _follower, sync_acked) = HandLeader::start(&env, "fallback", &seg);
    let mut rounds = Vec::new();
    let mut marks = Vec::new();
    for i in 0..3u8 {
        leader.append(&seg, &[i; 1000]);
        rounds.extend(leader.output());
        marks.push(leader.catalog.position());
    }
    assert!(marks[0] > sync_acked);
    leader.stream.write_all(&rounds).unwrap();
    let mut acked = Vec::new();
    while acked.last() != marks.last() {
        acked.extend(leader.acks());
    }
    assert_eq!(acked, marks, "one ACK per MARK, in order");
}

/// A follower stopped (SIGSTOP, a paused VM) in the middle of a payload, for longer than
/// `LEADER_SILENCE_TIMEOUT_MS`, while the rest of the payload waits in its socket: on resume
/// it takes the rest and acks, instead of calling the leader silent and dropping the
/// connection (its payload receive asks the socket before it believes its timer).
#[test]
fn a_follower_stopped_inside_a_payload_takes_the_rest_on_resume() {
    const PAYLOAD_BYTES: usize = 64 * 1024;
    for engine in ["fallback", "uring"] {
        let env = Env::new();
        let seg = RelPath::new("seg.0").unwrap();
        let (mut leader, follower, _) = HandLeader::start(&env, engine, &seg);
        leader.append(&seg, &[5; PAYLOAD_BYTES]);
        let round = leader.output();
        let mark = leader.catalog.position();
        let Ok(Some((Frame::Data { data_len, .. }, header_bytes))) = Frame::decode(&round) else {
            panic!("the round starts with a DATA frame");
        };
        assert_eq!(data_len as usize, PAYLOAD_BYTES);
        // The header and half the payload; the other half and the MARK come later.
        let sent_bytes = PAYLOAD_BYTES / 2;
        let (first, rest) = round.split_at(header_bytes + sent_bytes);
        leader.stream.write_all(first).unwrap();
        // Waiting for the rest: the half is in the file, and the follower's main thread (which
        // runs the connection) sleeps, in the receive of this payload.
        let copy = env.dir("f").join("seg.0");
        let stat = format!("/proc/{}/stat", follower.child.id());
        wait_until(Duration::from_secs(10), "the first half written", || {
            let len = std::fs::metadata(&copy).map_or(0, |m| m.len());
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let sleeping = state
                .rsplit_once(") ")
                .is_some_and(|(_, f)| f.starts_with('S'));
            len == sent_bytes as u64 && sleeping
        });
        stop_process(&follower.child);
        leader.stream.write_all(rest).unwrap();
        std::thread::sleep(Duration::from_millis(
            ferry::frame::LEADER_SILENCE_TIMEOUT_MS + 1500,
        ));
        signal(&follower.child, libc::SIGCONT);
        let mut acked = Vec::new();
        while acked.last() != Some(&mark) {
            acked.extend(leader.acks());
        }
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            vec![5; PAYLOAD_BYTES],
            "{engine}: the follower's copy"
        );
        assert!(
            !follower.log_text().contains("the leader sent nothing"),
            "{engine}: {}",
            follower.log_text()
        );
    }
}

/// A follower session over a blocking socket; payload bytes are read and dropped.
struct HandFollower {
    stream: TcpStream,
    session: FollowerSession,
    /// Read from the socket, not consumed by the session yet.
    input: Vec<u8>,
}

impl HandFollower {
    fn send(&mut self) {
        let out = self.session.take_output();
        self.stream.write_all(&out).expect("writing to the leader");
    }

    fn fill(&mut self) {
        let mut buf = [0u8; 4096];
        let n = read_some(&mut self.stream, &mut buf).expect("reading from the leader");
        assert!(n > 0, "the leader closed the connection");
        self.input.extend_from_slice(&buf[..n]);
    }

    /// Feeds the session until it asks for an action (sending what it queues meanwhile).
    fn next_action(&mut self) -> FollowerAction {
        loop {
            let (used, action) = self
                .session
                .handle_input(&self.input)
                .expect("the leader's input is valid");
            self.input.drain(..used);
            self.send();
            if let Some(action) = action {
                return action;
            }
            self.fill();
        }
    }

    /// Takes `len_bytes` of payload off the wire.
    fn skip(&mut self, mut len_bytes: u64) {
        loop {
            let n = (self.input.len() as u64).min(len_bytes);
            self.input.drain(..n as usize);
            len_bytes -= n;
            if len_bytes == 0 {
                return;
            }
            self.fill();
        }
    }

    /// Follows actions, payloads dropped, until a MARK at `position` or beyond.
    fn until_mark(&mut self, position: u64) -> u64 {
        loop {
            match self.next_action() {
                FollowerAction::Inventory { .. } => self.session.inventory(Vec::new()),
                FollowerAction::Write { len_bytes, .. } => self.skip(len_bytes),
                FollowerAction::Mark { position: at, .. } if at >= position => return at,
                _ => {}
            }
        }
    }

    fn ack_written(&mut self, position: u64) {
        self.session.written(position);
        self.session.poll_ack();
        self.send();
    }
}

/// A follower acks a small round while the leader is stuck in the middle of a payload far
/// larger than the socket buffers (the follower stopped reading): the leader counts the ACK
/// at once, so `wait_for` answers, instead of after the whole payload has gone out.
#[test]
fn the_leader_counts_an_ack_that_arrives_while_a_payload_is_in_flight() {
    for engine in ENGINES {
        let env = Env::new();
        let dir = env.dir("leader");
        let secret = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
        let mut config = LeaderConfig::new(&dir, "127.0.0.1:0".parse().unwrap(), secret.clone());
        config.engine = Some(engine.parse().unwrap());
        let leader = Leader::start(config, Vec::new()).unwrap();
        let stream = TcpStream::connect(leader.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut follower = HandFollower {
            stream,
            session: FollowerSession::new(secret, [9; 32], Durability::Written),
            input: Vec::new(),
        };
        follower.send();
        let synced = follower.until_mark(0);
        follower.ack_written(synced);

        write(&dir.join("small"), &[1; 1024]);
        let small = leader.append("small", 0, 1024).unwrap();
        follower.until_mark(small);
        // Far more than the socket buffers hold (sparse: the leader sends zeroes).
        const BIG_BYTES: u64 = 256 << 20;
        std::fs::File::create(dir.join("big"))
            .and_then(|f| f.set_len(BIG_BYTES))
            .unwrap();
        leader.append("big", 0, BIG_BYTES).unwrap();
        // The first bytes of the big payload arrived: the leader is in the middle of sending
        // it, and stays there while this follower does not read.
        loop {
            if let FollowerAction::Write { len_bytes, .. } = follower.next_action() {
                assert!(len_bytes > 1 << 20, "{engine}: a payload larger than 1 MiB");
                break;
            }
        }
        follower.fill();
        follower.ack_written(small);
        assert!(
            leader.wait_for(small, Durability::Written, 1, Duration::from_secs(10)),
            "{engine}: the ACK of the small round was not counted while the big payload was \
             in flight"
        );
    }
}
