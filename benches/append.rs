//! The writer's cost of `Leader::append` (1 KiB messages): with no follower, with a follower
//! that keeps up, and with one that is stopped (SIGSTOP) while the writer appends far past any
//! socket buffer. The claim: a stopped follower leaves the writer's append latency unchanged, so
//! all three run in the same process and run, and are compared as ratios.
//!
//! `cargo bench --bench append`

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::auth::Secret;
use ferry::frame::Durability;
use ferry::leader::{Leader, LeaderConfig};

const MESSAGE_BYTES: u64 = 1024;
/// A sparse segment: appends walk through it without touching the disk.
const SEGMENT_BYTES: u64 = 512 * 1024 * 1024 * 1024;

fn leader(dir: &Path) -> Leader {
    let secret =
        Secret::new(b"bench-shared-secret".to_vec()).expect("a constant, non-empty secret");
    let config = LeaderConfig::new(dir, "127.0.0.1:0".parse().expect("an address"), secret);
    let leader = Leader::start(config, Vec::new()).expect("the leader starts");
    let seg = std::fs::File::create(dir.join("seg")).expect("create the segment");
    seg.set_len(SEGMENT_BYTES).expect("size the sparse segment");
    leader
}

fn follower(leader: &Leader, dir: &Path, secret_file: &Path, stop: bool) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["follow", "--durability", "received", "--leader"])
        .arg(leader.local_addr().to_string())
        .arg("--data-dir")
        .arg(dir)
        .arg("--secret-file")
        .arg(secret_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("start a follower");
    let position = leader.append("seg", 0, MESSAGE_BYTES).expect("append");
    assert!(
        leader.wait_for(position, Durability::Received, 1, Duration::from_secs(30)),
        "the follower never connected"
    );
    if stop {
        // SAFETY: kill(2) on our own child, by pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    }
    child
}

fn appends(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let secret_file = tmp.path().join("secret");
    std::fs::write(&secret_file, "bench-shared-secret").expect("write the secret");
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod the secret");
    let mut group = c.benchmark_group("append_1KiB");
    group.throughput(Throughput::Elements(1));

    let dir = tmp.path().join("alone");
    let alone = leader(&dir);
    let mut offset = 0;
    group.bench_function("no_follower", |b| {
        b.iter(|| {
            let p = alone.append("seg", offset, MESSAGE_BYTES);
            offset = (offset + MESSAGE_BYTES) % (SEGMENT_BYTES - MESSAGE_BYTES);
            p
        })
    });
    drop(alone);

    for (name, stop) in [("healthy_follower", false), ("stopped_follower", true)] {
        let dir = tmp.path().join(name);
        let leader = leader(&dir);
        let mut child = follower(
            &leader,
            &tmp.path().join(format!("{name}-copy")),
            &secret_file,
            stop,
        );
        let mut offset = MESSAGE_BYTES;
        group.bench_function(name, |b| {
            b.iter(|| {
                let p = leader.append("seg", offset, MESSAGE_BYTES);
                offset = (offset + MESSAGE_BYTES) % (SEGMENT_BYTES - MESSAGE_BYTES);
                p
            })
        });
        let f = leader.followers();
        eprintln!(
            "{name}: {:?}, {} bytes behind",
            f.first().map(|f| f.lag.state),
            f.first().map_or(0, |f| f.lag.lag_bytes[0])
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    group.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
