//! Bad input against a real `ferry lead`: each gets a clean, named rejection, and the leader
//! keeps serving a real follower afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use ferry::auth::Secret;
use ferry::frame::{ErrorCode, Frame, Preamble, PREAMBLE_BYTES};

/// Reads everything the leader sends until it closes, and decodes the frames after its preamble.
fn frames_until_close(stream: &mut TcpStream) -> Vec<Frame> {
    frames_after(stream, Vec::new())
}

/// Like `frames_until_close`, for a stream of which `all` was already read.
fn frames_after(stream: &mut TcpStream, mut all: Vec<u8>) -> Vec<Frame> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_end(&mut all);
    assert!(all.len() >= PREAMBLE_BYTES, "the leader sent no preamble");
    let mut rest = &all[PREAMBLE_BYTES..];
    let mut frames = Vec::new();
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        frames.push(frame);
        rest = &rest[used..];
    }
    frames
}

fn last_error(frames: &[Frame]) -> (ErrorCode, String) {
    match frames.last() {
        Some(Frame::Error { code, message }) => (*code, message.clone()),
        other => panic!("expected an ERROR frame last, got {other:?}"),
    }
}

fn assert_still_serving(env: &Env, addr: SocketAddr) {
    let out = follow_once(env, &env.dir("good"), addr, "fallback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn wrong_magic_is_refused_as_bad_magic() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("a"), b"1");
    let leader = start_leader(&env, &ld, "uring");
    let mut s = TcpStream::connect(leader.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (code, message) = last_error(&frames_until_close(&mut s));
    assert_eq!(code, ErrorCode::BadMagic);
    assert!(message.contains("magic"), "{message}");
    leader.proc.wait_log("magic", Duration::from_secs(5));
    assert_still_serving(&env, leader.addr);
}

#[test]
fn wrong_version_is_refused_naming_both_versions() {
    let env = Env::new();
    let ld = env.dir("leader");
    let leader = start_leader(&env, &ld, "fallback");
    let mut s = TcpStream::connect(leader.addr).unwrap();
    let mut preamble = Preamble::ours().encode();
    preamble[8..10].copy_from_slice(&99u16.to_le_bytes());
    s.write_all(&preamble).unwrap();
    let (code, message) = last_error(&frames_until_close(&mut s));
    assert_eq!(code, ErrorCode::VersionMismatch);
    assert!(message.contains("99") && message.contains('1'), "{message}");
    assert_still_serving(&env, leader.addr);
}

#[test]
fn a_follower_facing_a_leader_of_another_version_exits_naming_it() {
    let env = Env::new();
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut preamble = Preamble::ours().encode();
        preamble[8..10].copy_from_slice(&7u16.to_le_bytes());
        let _ = s.write_all(&preamble);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let out = follow_once(&env, &env.dir("f"), addr, "fallback");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("version"), "{stderr}");
}

/// A HAVE frame built by hand, so its path can be anything at all.
fn raw_have(path: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&(1u32 + 8 + 20 + 2 + path.len() as u32).to_le_bytes());
    frame.push(0x12); // HAVE
    frame.extend_from_slice(&4u64.to_le_bytes());
    frame.extend_from_slice(&[0; 20]);
    frame.extend_from_slice(&(path.len() as u16).to_le_bytes());
    frame.extend_from_slice(path);
    frame
}

/// Does the handshake as a follower would, up to the leader's INDEX_END.
fn authenticate(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&Preamble::ours().encode()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut frames = Vec::new();
    while !frames.iter().any(|f| matches!(f, Frame::Challenge { .. })) {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= PREAMBLE_BYTES {
            let mut rest = &buf[PREAMBLE_BYTES..];
            frames.clear();
            while let Ok(Some((f, used))) = Frame::decode(rest) {
                frames.push(f);
                rest = &rest[used..];
            }
        }
    }
    let Some(Frame::Challenge { leader_nonce }) = frames.first().cloned() else {
        unreachable!()
    };
    let secret = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let follower_nonce = [5u8; 32];
    let mut out = Vec::new();
    Frame::Auth {
        follower_nonce,
        follower_mac: secret.follower_tag(&leader_nonce, &follower_nonce),
    }
    .encode(&mut out);
    s.write_all(&out).unwrap();
    (s, buf)
}

#[test]
fn a_path_escaping_the_data_dir_is_refused_as_bad_path() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("seg"), b"data");
    let leader = start_leader(&env, &ld, "uring");
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        ".ferry/digests",
    ] {
        let (mut s, seen) = authenticate(leader.addr);
        s.write_all(&raw_have(bad.as_bytes())).unwrap();
        let (code, message) = last_error(&frames_after(&mut s, seen));
        assert_eq!(code, ErrorCode::BadPath, "{bad}: {message}");
        assert!(message.contains(bad), "{message}");
    }
    assert_still_serving(&env, leader.addr);
}

#[test]
fn an_oversized_frame_is_refused_naming_the_limit() {
    let env = Env::new();
    let ld = env.dir("leader");
    let leader = start_leader(&env, &ld, "uring");
    let (mut s, seen) = authenticate(leader.addr);
    s.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    s.write_all(&[0x12]).unwrap();
    let (code, message) = last_error(&frames_after(&mut s, seen));
    assert_eq!(code, ErrorCode::Limit);
    assert!(message.contains("MAX_FRAME_BODY_BYTES"), "{message}");
    assert_still_serving(&env, leader.addr);
}

#[test]
fn a_frame_out_of_order_is_refused() {
    let env = Env::new();
    let ld = env.dir("leader");
    let leader = start_leader(&env, &ld, "fallback");
    let mut s = TcpStream::connect(leader.addr).unwrap();
    let mut out = Preamble::ours().encode().to_vec();
    Frame::Ack {
        received: 0,
        written: 0,
        synced: 0,
    }
    .encode(&mut out);
    s.write_all(&out).unwrap();
    let (code, message) = last_error(&frames_until_close(&mut s));
    assert_eq!(code, ErrorCode::BadFrame);
    assert!(message.contains("out of order"), "{message}");
    assert_still_serving(&env, leader.addr);
}

#[test]
fn an_idle_unauthenticated_connection_is_closed_after_the_handshake_timeout() {
    let env = Env::new();
    let leader = start_leader(&env, &env.dir("leader"), "fallback");
    let mut s = TcpStream::connect(leader.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed too early"
    );
    let frames = frames_after(&mut s, all);
    let (code, message) = last_error(&frames);
    assert_eq!(code, ErrorCode::Limit);
    assert!(message.contains("HANDSHAKE_TIMEOUT_MS"), "{message}");
}

#[test]
fn unknown_frame_types_and_nul_in_paths_are_refused_by_name() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("seg"), b"data");
    let leader = start_leader(&env, &ld, "uring");
    // An unknown frame type after authenticating.
    let (mut s, seen) = authenticate(leader.addr);
    s.write_all(&[1, 0, 0, 0, 0x7f]).unwrap();
    let (code, message) = last_error(&frames_after(&mut s, seen));
    assert_eq!(code, ErrorCode::BadFrame);
    assert!(
        message.contains("0x7f") || message.contains("unknown"),
        "{message}"
    );
    // A HAVE whose path holds a NUL byte.
    let (mut s, seen) = authenticate(leader.addr);
    s.write_all(&raw_have(b"seg\0evil")).unwrap();
    let (code, message) = last_error(&frames_after(&mut s, seen));
    assert_eq!(code, ErrorCode::BadPath);
    assert!(message.contains("NUL"), "{message}");
    assert_still_serving(&env, leader.addr);
}

#[test]
fn a_connection_closed_in_the_middle_of_a_frame_leaves_the_leader_serving() {
    let env = Env::new();
    let ld = env.dir("leader");
    write(&ld.join("seg"), b"data");
    let leader = start_leader(&env, &ld, "fallback");
    let (mut s, _) = authenticate(leader.addr);
    // The first 3 bytes of a 40-byte frame, then the connection goes away. Closing with the
    // leader's unread frames in our buffer sends a reset rather than a FIN, so the leader logs
    // either "disconnected" or the reset: both lines name the peer.
    let peer = s.local_addr().unwrap();
    s.write_all(&[40, 0, 0]).unwrap();
    drop(s);
    leader
        .proc
        .wait_log(&format!("({peer})"), Duration::from_secs(10));
    assert_still_serving(&env, leader.addr);
}

#[test]
fn a_thousand_idle_and_garbage_connections_leave_a_real_follower_unaffected() {
    // This process holds the thousand sockets: lift its soft limit on open files (ferry lifts
    // its own).
    // SAFETY: rlimit is plain data; getrlimit and setrlimit only read and write it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let env = Env::new();
    let (ld, fd) = (env.dir("leader"), env.dir("follower"));
    write(&ld.join("seg"), &pattern(1_000_000, 7));
    let leader = start_leader(&env, &ld, "uring");
    // 700 connections that say nothing, and 300 that send garbage and stay open.
    let mut idle: Vec<TcpStream> = (0..700)
        .map(|_| TcpStream::connect(leader.addr).unwrap())
        .collect();
    for _ in 0..300 {
        let mut s = TcpStream::connect(leader.addr).unwrap();
        let _ = s.write_all(&[0xff; 64]);
        idle.push(s);
    }
    // A real follower syncs and then streams a change, while all of them hang around.
    let _follower = start_follower(&env, &fd, leader.addr, "uring", "synced");
    wait_identical(&ld, &fd, Duration::from_secs(20));
    write(&ld.join("seg2"), &pattern(300_000, 8));
    wait_identical(&ld, &fd, Duration::from_secs(20));
    drop(idle);
}
