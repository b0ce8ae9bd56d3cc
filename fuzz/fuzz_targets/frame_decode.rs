//! Arbitrary bytes into the wire codec: `Preamble::decode` on the first 16 bytes, and
//! `Frame::decode` over the whole input read as a frame stream (DATA payloads skipped, as a
//! peer does). Asserts: no panic; a decoded frame re-encodes to exactly the bytes it came from
//! (except the two lossy cases the spec allows: reserved preamble bytes, and an ERROR message
//! that is not UTF-8); a strict prefix of a frame decodes to "need more bytes" or to the same
//! error as the whole; and the ERROR frame a session would send about a rejection decodes.
#![no_main]

use ferry::frame::{
    Frame, FrameError, Preamble, FRAME_LEN_FIELD_BYTES, MAGIC, MAX_ERROR_MESSAGE_BYTES,
    MAX_FRAME_BODY_BYTES, PREAMBLE_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_preamble(data);
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let result = Frame::decode(rest);
        check_prefixes(rest, &result);
        match result {
            Ok(Some((frame, used))) => {
                assert!(used > FRAME_LEN_FIELD_BYTES && used <= rest.len());
                assert!(used <= FRAME_LEN_FIELD_BYTES + MAX_FRAME_BODY_BYTES as usize);
                check_reencode(&frame, &rest[..used]);
                pos += used;
                if let Frame::Data { data_len, .. } = frame {
                    pos = pos.saturating_add(data_len as usize);
                }
            }
            Ok(None) => {
                if let Some(len) = rest.first_chunk::<4>() {
                    let body_len = u32::from_le_bytes(*len) as usize;
                    assert!(rest.len() < FRAME_LEN_FIELD_BYTES + body_len);
                }
                break;
            }
            Err(err) => {
                check_rejection(&err);
                break;
            }
        }
    }
});

fn check_preamble(data: &[u8]) {
    let Some(head) = data.first_chunk::<PREAMBLE_BYTES>() else {
        return;
    };
    match Preamble::decode(head) {
        Ok(p) => {
            let mut expected = *head;
            expected[10..12].fill(0); // reserved: ignored on receipt, 0 when sent
            assert_eq!(p.encode(), expected);
        }
        Err(err) => {
            assert!(matches!(err, FrameError::BadMagic { .. }), "{err}");
            assert_ne!(head[..8], MAGIC);
            check_rejection(&err);
        }
    }
}

/// Every strict prefix of the bytes a decode result came from decodes to `Ok(None)` or, for an
/// error that needs fewer bytes to see, to the same error.
fn check_prefixes(rest: &[u8], result: &Result<Option<(Frame, usize)>, FrameError>) {
    let end = match result {
        Ok(Some((_, used))) => *used,
        Ok(None) => rest.len(),
        Err(_) => rest
            .len()
            .min(FRAME_LEN_FIELD_BYTES + MAX_FRAME_BODY_BYTES as usize),
    };
    for cut in 0..end {
        match Frame::decode(&rest[..cut]) {
            Ok(None) => {}
            Err(e) => assert_eq!(Err(&e), result.as_ref().map(|_| ()), "prefix {cut}"),
            Ok(Some((f, used))) => panic!("prefix of {cut} bytes decoded to {f:?} ({used})"),
        }
    }
}

fn check_reencode(frame: &Frame, original: &[u8]) {
    let mut out = Vec::new();
    frame.encode(&mut out);
    if let Frame::Error { message, .. } = frame {
        // The message is decoded lossily: only UTF-8 round-trips byte for byte.
        let msg_bytes = &original[9..];
        if std::str::from_utf8(msg_bytes).is_err() {
            assert!(message.contains('\u{fffd}'));
            return;
        }
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
    }
    assert_eq!(out, original, "{frame:?} re-encodes differently");
    let (again, used) = Frame::decode(&out)
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is whole");
    assert_eq!(used, out.len());
    assert_eq!(&again, frame);
}

/// What a session sends about a rejection (`queue_error`) is a frame the peer can decode.
fn check_rejection(err: &FrameError) {
    let reply = Frame::error(err.code(), &err.to_string());
    let mut out = Vec::new();
    reply.encode(&mut out);
    let (back, used) = Frame::decode(&out)
        .expect("the ERROR frame about a rejection decodes")
        .expect("and is whole");
    assert_eq!(used, out.len());
    assert_eq!(back, reply);
}
