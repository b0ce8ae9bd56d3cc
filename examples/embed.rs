//! Embedding the leader in a broker: write into a segment through a mmap or write(2), then
//! tell ferry with `append`, and confirm publishes with `wait_for`.
//!
//! cargo run --example embed -- /tmp/broker-data 127.0.0.1:7070
//! (then, elsewhere: FERRY_SECRET=example ferry follow --data-dir /tmp/copy --leader 127.0.0.1:7070)

use std::os::unix::fs::FileExt;
use std::time::Duration;

use ferry::auth::Secret;
use ferry::frame::Durability;
use ferry::leader::{Leader, LeaderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "/tmp/ferry-embed-example".into());
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let secret = Secret::new(b"example".to_vec())?;
    let leader = Leader::start(LeaderConfig::new(&dir, listen.parse()?, secret), Vec::new())?;
    println!("leading {dir} on {}", leader.local_addr());

    std::fs::create_dir_all(format!("{dir}/queues/q1"))?;
    let segment = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(format!("{dir}/queues/q1/00000001.seg"))?;
    let mut offset = 0;
    for i in 0..10u64 {
        let message = format!("message {i}\n");
        // The broker's own write (here write(2); through a mmap it is the same call after).
        segment.write_all_at(message.as_bytes(), offset)?;
        let position = leader.append("queues/q1/00000001.seg", offset, message.len() as u64)?;
        offset += message.len() as u64;
        // A publish confirm: one follower has the bytes on disk, or we say so.
        let confirmed =
            leader.wait_for(position, Durability::Synced, 1, Duration::from_millis(100));
        println!(
            "message {i} at position {position}: {}",
            if confirmed {
                "confirmed"
            } else {
                "not confirmed (no follower)"
            }
        );
    }
    for f in leader.followers() {
        println!(
            "follower {} {} lag {} bytes",
            f.peer,
            f.lag.state.name(),
            f.lag.lag_bytes[2]
        );
    }
    leader.shutdown();
    Ok(())
}
