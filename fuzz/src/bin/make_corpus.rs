//! Writes the seed corpus of every fuzz target into `DIR/<target>/` (default `fuzz/corpus`):
//!
//! - `frame_decode`: a preamble, one frame of each type (a DATA frame with its payload), and
//!   both directions of a recorded session as raw streams.
//! - `leader_handshake` / `follower_handshake`: prefixes of what a real follower / leader sent
//!   in a session recorded here, run with `ferry_fuzz`'s shells, its secret and its nonces, so
//!   the AUTH and WELCOME in them are valid for the targets' sessions. The follower's seeds
//!   include the initial sync and streaming changes; the leader's end at the follower's ACK of
//!   the initial sync and are also given byte-at-a-time (chunk seed 9), so the ACK arrives
//!   after the MARK it acknowledges.
//! - `session_pair`: short scripts (see `fuzz_targets/session_pair.rs`).
//!
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --bin make_corpus -- fuzz/corpus`.
//! The output is deterministic.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::frame::{Durability, ErrorCode, Frame, Preamble, KEEPALIVE_INTERVAL_MS, PREAMBLE_BYTES};
use ferry_fuzz::{
    follower_files, leader_files, p, pattern, secret, FollowerShell, LeaderShell, FOLLOWER_NONCE,
    LEADER_INSTANCE, LEADER_LINEAGE, LEADER_NONCE,
};

struct Recording {
    /// Everything the leader sent (frames and payloads).
    to_follower: Vec<u8>,
    /// Everything the follower sent.
    to_leader: Vec<u8>,
}

struct Run {
    leader: LeaderShell,
    follower: FollowerShell,
    rec: Recording,
}

impl Run {
    fn settle(&mut self) {
        for _ in 0..1000 {
            let consumed = self.leader.handle();
            let out = self.leader.drive(0);
            let a = consumed || !out.is_empty();
            self.rec.to_follower.extend_from_slice(&out);
            self.follower.inbuf.extend(out);
            let (b, out) = self.follower.step();
            self.rec.to_leader.extend_from_slice(&out);
            self.leader.inbuf.extend(out);
            if !a && !b {
                return;
            }
        }
        panic!("did not settle");
    }

    fn append(&mut self, path: &str, bytes: &[u8]) {
        let path = p(path);
        let file = self.leader.files.entry(path.clone()).or_default();
        let offset = file.len() as u64;
        file.extend_from_slice(bytes);
        let len_bytes = bytes.len() as u64;
        self.leader
            .record(path, |c, p| c.append(p, offset, len_bytes));
    }
}

/// A leader and a follower (`ferry_fuzz::leader_files` and `follower_files`, durability synced,
/// with NODE_ID): the initial sync; then, if `streaming`, an append, a new file, a replace, a
/// delete and a keepalive.
fn record(streaming: bool) -> Recording {
    let mut run = Run {
        leader: LeaderShell::new(leader_files(), Instant::now()),
        follower: FollowerShell::new(follower_files(), Durability::Synced, true),
        rec: Recording {
            to_follower: Vec::new(),
            to_leader: Vec::new(),
        },
    };
    run.settle();
    if streaming {
        run.append("seg/000", b"more bytes");
        run.append("seg/001", &pattern(100, 7));
        let path = p("meta.json");
        run.leader.files.insert(path.clone(), b"{\"v\":2}".to_vec());
        run.leader.record(path, |c, p| c.replace(p, 7));
        run.settle();
        let path = p("a");
        run.leader.files.remove(&path);
        run.leader.record(path, |c, p| c.delete(p));
        run.settle();
        run.leader.now += Duration::from_millis(KEEPALIVE_INTERVAL_MS);
        run.settle();
    }
    assert!(run.leader.error.is_none() && run.follower.error.is_none());
    let mut l: Vec<_> = run.leader.files.iter().collect();
    let mut f: Vec<_> = run.follower.files.iter().collect();
    l.sort();
    f.sort();
    assert_eq!(l, f, "the recorded session did not converge");
    run.rec
}

/// The end offsets of the frames in a stream that starts with a preamble (payloads skipped).
fn frame_ends(stream: &[u8]) -> Vec<(usize, &'static str)> {
    let mut ends = Vec::new();
    let mut pos = PREAMBLE_BYTES;
    while pos < stream.len() {
        let (frame, used) = Frame::decode(&stream[pos..]).unwrap().unwrap();
        pos += used;
        if let Frame::Data { data_len, .. } = frame {
            pos += data_len as usize;
        }
        ends.push((pos, frame.name()));
    }
    ends
}

/// The stream up to and including the first frame named `name` (or `nth` of them).
fn upto<'a>(stream: &'a [u8], name: &str, nth: usize) -> &'a [u8] {
    let (end, _) = frame_ends(stream)
        .into_iter()
        .filter(|(_, n)| *n == name)
        .nth(nth)
        .unwrap_or_else(|| panic!("no {name} #{nth} in the stream"));
    &stream[..end]
}

fn write(dir: &Path, target: &str, name: &str, parts: &[&[u8]]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), parts.concat()).unwrap();
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(&mut out);
    out
}

fn main() {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("fuzz/corpus"), PathBuf::from);
    let sync = record(false);
    let full = record(true);

    // frame_decode
    let t = "frame_decode";
    write(&dir, t, "preamble", &[&Preamble::ours().encode()]);
    let path = p("queues/q1/00000001.seg");
    let frames = [
        Frame::Challenge {
            leader_nonce: LEADER_NONCE,
        },
        Frame::Auth {
            follower_nonce: FOLLOWER_NONCE,
            follower_mac: secret().follower_tag(&LEADER_NONCE, &FOLLOWER_NONCE),
        },
        Frame::Welcome {
            leader_mac: secret().leader_tag(&LEADER_NONCE, &FOLLOWER_NONCE),
        },
        Frame::error(ErrorCode::BadFrame, "frame ACK out of order: why"),
        Frame::Index {
            len_bytes: 4096,
            path: path.clone(),
        },
        Frame::IndexBorn {
            len_bytes: 4096,
            born_at: 77,
            path: path.clone(),
        },
        Frame::IndexEnd { count: 1 },
        Frame::Instance {
            instance: LEADER_INSTANCE,
        },
        Frame::Lineage {
            lineage: LEADER_LINEAGE,
        },
        Frame::HaveHeld {
            len_bytes: 100,
            position: 5000,
            instance: LEADER_INSTANCE,
            path: path.clone(),
        },
        Frame::Have {
            len_bytes: 100,
            digest: [0xab; 20],
            path: path.clone(),
        },
        Frame::HaveEnd {
            count: 1,
            durability: Durability::Written,
        },
        Frame::NodeId {
            id: "10.0.0.2:7070".into(),
        },
        Frame::BeginWhole {
            len_bytes: 3,
            path: path.clone(),
        },
        Frame::CommitWhole { path: path.clone() },
        Frame::Truncate {
            len_bytes: 10,
            path: path.clone(),
        },
        Frame::Delete { path: path.clone() },
        Frame::Mark {
            position: 1234,
            sync_done: true,
        },
        Frame::Ack {
            received: 3,
            written: 2,
            synced: 1,
        },
    ];
    for frame in &frames {
        write(&dir, t, &frame.name().to_lowercase(), &[&encoded(frame)]);
    }
    let data = encoded(&Frame::Data {
        temp: true,
        offset: 0,
        data_len: 3,
        path,
    });
    write(&dir, t, "data", &[&data, b"abc"]);
    write(&dir, t, "stream-leader", &[&full.to_follower]);
    write(&dir, t, "stream-follower", &[&full.to_leader]);

    // leader_handshake: [chunk_seed, tick, bytes...]
    let t = "leader_handshake";
    let to_leader = &sync.to_leader;
    write(
        &dir,
        t,
        "preamble",
        &[&[0, 0], &to_leader[..PREAMBLE_BYTES]],
    );
    write(&dir, t, "auth", &[&[0, 0], upto(to_leader, "AUTH", 0)]);
    write(
        &dir,
        t,
        "auth-chunked",
        &[&[3, 0], upto(to_leader, "AUTH", 0)],
    );
    write(
        &dir,
        t,
        "inventory",
        &[&[0, 0], upto(to_leader, "HAVE_END", 0)],
    );
    // An inventory of held records: one this leader accepts, one of another instance.
    let mut held = upto(to_leader, "AUTH", 0).to_vec();
    for (path, instance) in [("a", LEADER_INSTANCE), ("meta.json", [0; 16])] {
        held.extend(encoded(&Frame::HaveHeld {
            len_bytes: 3,
            position: 0,
            instance,
            path: p(path),
        }));
    }
    held.extend(encoded(&Frame::HaveEnd {
        count: 2,
        durability: Durability::Written,
    }));
    write(&dir, t, "inventory-held", &[&[0, 0], &held]);
    write(&dir, t, "synced-bytewise", &[&[9, 0], to_leader]);
    write(&dir, t, "synced-bytewise-keepalive", &[&[9, 5], to_leader]);
    write(
        &dir,
        t,
        "slow-handshake",
        &[&[9, 255], &to_leader[..PREAMBLE_BYTES]],
    );

    // follower_handshake: [chunk_seed, options, bytes...]; options 6: synced, NODE_ID.
    let t = "follower_handshake";
    let to_follower = &full.to_follower;
    write(
        &dir,
        t,
        "preamble",
        &[&[0, 6], &to_follower[..PREAMBLE_BYTES]],
    );
    write(
        &dir,
        t,
        "challenge",
        &[&[0, 6], upto(to_follower, "CHALLENGE", 0)],
    );
    write(
        &dir,
        t,
        "index",
        &[&[0, 6], upto(to_follower, "INDEX_END", 0)],
    );
    write(&dir, t, "sync", &[&[0, 6], upto(to_follower, "MARK", 0)]);
    write(&dir, t, "streaming", &[&[0, 6], to_follower]);
    write(&dir, t, "streaming-chunked", &[&[5, 1], to_follower]);
    write(&dir, t, "streaming-received", &[&[0, 0], to_follower]);

    // session_pair: [leader_files, follower_files (u16 LE), options, ops...]
    let t = "session_pair";
    // Every file on the leader; follower copies: a: prefix, meta.json: longer, q/1/seg.0:
    // different, q/1/seg.1: none, q/2/seg.0: prefix, d/e/f: longer.
    let files: [u8; 3] = [0x3f, 0b0011_1001, 0b0000_1001];
    write(&dir, t, "initial-sync", &[&files, &[2]]);
    write(&dir, t, "initial-sync-written", &[&files, &[1 | 4]]);
    // After the sync (options bit 3): append, replace, step both, delete, truncate, step both,
    // time for a keepalive, step both.
    write(
        &dir,
        t,
        "streaming",
        &[
            &files,
            &[8 | 2],
            &[
                4, 2, 50, 5, 1, 3, 2, 0, 3, 7, 0, 6, 4, 1, 2, 0, 3, 8, 60, 2, 0, 3,
            ],
        ],
    );
    // Reconnections after the sync: the follower killed (its last look lost), then a file
    // replaced and the connection dropped before the follower heard of it: the files its held
    // record saw as they are go as HAVE_HELD, and the replaced one, born since (INDEX_BORN),
    // is hashed. As an older follower (options bit 4, no BIRTHS), it claims that one too, and
    // the leader refuses it.
    let reconnect_held = [
        4, 2, 50, 2, 0, 3, 2, 0, 3, 14, 0, 2, 0, 3, 2, 0, 3, 5, 1, 3, 14, 1, 2, 0, 3, 2, 0, 3, 4,
        2, 20, 2, 0, 3,
    ];
    write(
        &dir,
        t,
        "reconnect-held",
        &[&files, &[8 | 2], &reconnect_held],
    );
    let older = [8 | 16 | 2];
    write(
        &dir,
        t,
        "reconnect-held-older",
        &[&files, &older, &reconnect_held],
    );
    // Streaming, then meta.json rewritten behind the catalog and, before that is reported, the
    // leader restarted gracefully: it resumes its instance, the follower's held records stand
    // for the other files, and meta.json, born anew, is hashed (by an older follower, claimed,
    // refused and sent whole).
    let leader_restart = [
        4, 2, 50, 2, 0, 3, 2, 0, 3, 9, 1, 4, 14, 3, 2, 0, 3, 2, 0, 3, 2, 0, 3, 4, 2, 20, 2, 0, 3,
        14, 2, 2, 0, 3, 2, 0, 3,
    ];
    write(
        &dir,
        t,
        "leader-restart",
        &[&files, &[8 | 2], &leader_restart],
    );
    write(
        &dir,
        t,
        "leader-restart-older",
        &[&files, &older, &leader_restart],
    );
    // Streaming, a checkpoint reserving 16 positions, appends past it (MARKs held at the
    // reservation), then the leader killed: it resumes from the checkpoint above the
    // reservation, the files appended to since are born anew and hashed, and only their tails
    // travel.
    write(
        &dir,
        t,
        "leader-crash",
        &[
            &files,
            &[8 | 2],
            &[
                4, 2, 50, 2, 0, 3, 2, 0, 3, 14, 4, 2, 4, 2, 30, 4, 1, 20, 2, 0, 3, 2, 0, 3, 14, 8,
                2, 0, 3, 2, 0, 3, 2, 0, 3, 4, 2, 20, 2, 0, 3,
            ],
        ],
    );
    // A checkpoint reserving nothing: the MARKs after it stay at its position, keepalives
    // included, until a second checkpoint raises the reservation.
    write(
        &dir,
        t,
        "checkpoint-ceiling",
        &[
            &files,
            &[8 | 2],
            &[
                14, 4, 0, 4, 2, 50, 2, 0, 3, 8, 60, 2, 0, 3, 14, 4, 255, 8, 60, 2, 0, 3, 2, 0, 3,
            ],
        ],
    );
    // An append, then the file rewritten shorter behind the catalog's back before the tail is
    // read: the DATA is taken back; then the change is reported and shipped.
    write(
        &dir,
        t,
        "vanishing-range",
        &[
            &files,
            &[8 | 2],
            &[4, 2, 200, 9, 2, 1, 2, 0, 3, 11, 2, 0, 3],
        ],
    );
    // The same, with the change never reported by the script until the end: the leader
    // records the file as it is once the hold has lasted VANISHED_HOLD_TIMEOUT_MS (2 x 2550
    // ms), and the appends after that are shipped and claimed.
    write(
        &dir,
        t,
        "vanishing-range-unreported",
        &[
            &files,
            &[8 | 2],
            &[
                4, 2, 200, 9, 2, 1, 2, 0, 3, 8, 255, 2, 0, 3, 8, 255, 2, 0, 3, 2, 0, 3, 4, 0, 9, 2,
                0, 3,
            ],
        ],
    );
    // A whole-file transfer cut short (its file shrinks after BEGIN_WHOLE), then deleted.
    write(
        &dir,
        t,
        "abandoned-whole",
        &[
            &files,
            &[8 | 2],
            &[5, 6, 20, 2, 1, 9, 6, 0, 2, 0, 3, 10, 6, 11, 2, 0, 3],
        ],
    );
    // The same for 17 (MAX_WHOLE_IN_FLIGHT + 1) files, one after another: the case of
    // session/tests.rs's whole_file_transfers_cut_short_and_then_deleted_do_not_pile_up...
    let mut ops = Vec::new();
    for path in 3u8..20 {
        ops.extend_from_slice(&[
            5, path, 1, 2, 1, 3, 9, path, 0, 2, 0, 3, 10, path, 11, 2, 0, 3,
        ]);
    }
    write(&dir, t, "abandoned-wholes", &[&[0, 0, 0, 8 | 2], &ops]);
    // Injected: an ACK built from the leader's last MARK, then raw bytes to the follower.
    write(
        &dir,
        t,
        "injected",
        &[
            &files,
            &[8 | 2],
            &[12, 3, 0, 0, 0, 0, 2, 0, 1, 4, 1, 2, 3, 4, 3],
        ],
    );
}
