//! Arbitrary bytes, in arbitrary chunkings, into a `FollowerSession` as if from a leader.
//!
//! Input: `[chunk_seed, options, bytes...]`. `chunk_seed` picks how `bytes` is split into
//! socket reads (`ferry_fuzz::chunks`); `options % 3` is the durability level and bit 2 makes
//! the follower send NODE_ID. The shell applies actions to in-memory files, takes DATA payloads
//! off the input, syncs instantly and polls for ACKs (`FollowerShell`). Asserts (in
//! `ferry_fuzz`): no panic; consumed input is a preamble then whole frames; the phase never
//! goes back; the follower acts on nothing past WELCOME unless the leader's MAC was made with
//! the secret over the CHALLENGE's nonce; TEMP writes and commits match a BEGIN_WHOLE; MARKs
//! never go back; everything it sends decodes, in protocol order, with ACK watermarks ordered,
//! monotonic and never beyond the last MARK; after any error, its last frame is an ERROR with
//! the error's code (none when the leader sent the ERROR), and it accepts and sends nothing more.
#![no_main]

use ferry::frame::Durability;
use ferry_fuzz::{chunks, follower_files, FollowerShell};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [seed, options, rest @ ..] = data else {
        return;
    };
    let durability = Durability::ALL[usize::from(*options % 3)];
    let mut shell = FollowerShell::new(follower_files(), durability, options & 4 != 0);
    shell.step();
    for chunk in chunks(*seed, rest) {
        shell.inbuf.extend_from_slice(chunk);
        shell.step();
    }
});
