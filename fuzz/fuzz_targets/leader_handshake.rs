//! Arbitrary bytes, in arbitrary chunkings, into a `LeaderSession` as if from a follower.
//!
//! Input: `[chunk_seed, tick, bytes...]`. `chunk_seed` picks how `bytes` is split into socket
//! reads (`ferry_fuzz::chunks`); after each read the clock advances by `tick * 10` ms and the
//! handshake deadline is checked, as the real connection task does. The shell answers digest
//! requests and transmits from in-memory files (`LeaderShell`). Asserts (in `ferry_fuzz`): no
//! panic; consumed input is a preamble then whole frames, and nothing whole is left unread;
//! the phase never goes back; the leader gets past AUTH only with a MAC made with the secret;
//! everything it sends decodes, in protocol order; after any error, its last frame is an ERROR
//! with the error's code (none when the follower sent the ERROR), and it accepts and sends
//! nothing more.
#![no_main]

use std::time::{Duration, Instant};

use ferry_fuzz::{chunks, leader_files, LeaderShell};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [seed, tick, rest @ ..] = data else {
        return;
    };
    let connected_at = Instant::now();
    let tick = Duration::from_millis(u64::from(*tick) * 10);
    let mut shell = LeaderShell::new(leader_files(), connected_at);
    shell.drive(0);
    for chunk in chunks(*seed, rest) {
        shell.inbuf.extend_from_slice(chunk);
        shell.handle();
        shell.drive(0);
        shell.now += tick;
        shell.check_deadline(connected_at);
        shell.drive(0);
    }
});
