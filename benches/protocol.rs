//! The protocol core's costs, without I/O: encoding and decoding the frames on the hot path
//! (DATA headers and ACKs), the lag tracker's updates, building an index with digests, and what
//! a connecting follower's session copies of the catalog (under the writers' lock, then not),
//! and what the checkpoint thread takes of it under that lock.
//!
//! `cargo bench --bench protocol`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry::catalog::{Catalog, CatalogPart};
use ferry::frame::{Durability, Frame};
use ferry::index::{scan, DigestCache};
use ferry::lag::LagTracker;
use ferry::paths::{DataDir, RelPath};

fn frames(c: &mut Criterion) {
    let path = RelPath::new("queues/q1/segments/00000042.seg").expect("a valid path");
    let data = Frame::Data {
        temp: false,
        offset: 123_456_789,
        data_len: 1024,
        path,
    };
    let ack = Frame::Ack {
        received: 1 << 40,
        written: 1 << 40,
        synced: 1 << 39,
    };
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(256);
    group.bench_function("encode_data_header", |b| {
        b.iter(|| {
            out.clear();
            data.encode(&mut out);
            out.len()
        })
    });
    let mut encoded = Vec::new();
    data.encode(&mut encoded);
    group.bench_function("decode_data_header", |b| {
        b.iter(|| Frame::decode(&encoded).expect("valid").map(|(_, n)| n))
    });
    let mut acks = Vec::new();
    ack.encode(&mut acks);
    group.bench_function("decode_ack", |b| {
        b.iter(|| Frame::decode(&acks).expect("valid").map(|(_, n)| n))
    });
    group.finish();
}

fn lag(c: &mut Criterion) {
    let mut group = c.benchmark_group("lag_tracker");
    group.throughput(Throughput::Elements(1));
    let mut tracker = LagTracker::new(Duration::from_secs(1));
    tracker.set_durability(Durability::Synced);
    let t0 = Instant::now();
    let mut position = 0u64;
    group.bench_function("mark_then_ack", |b| {
        b.iter(|| {
            position += 1024;
            let at = t0 + Duration::from_nanos(position);
            tracker.on_mark_sent(position, false, at);
            tracker.on_ack([position; 3], at + Duration::from_micros(300));
        })
    });
    group.bench_function("snapshot", |b| {
        b.iter(|| {
            tracker
                .snapshot(position, t0 + Duration::from_secs(1))
                .lag_bytes
        })
    });
    group.finish();
}

fn index(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = DataDir::open(tmp.path()).expect("data dir");
    let files = 64usize;
    let file_bytes = 1024 * 1024;
    for i in 0..files {
        let path = tmp.path().join(format!("q{}/seg{i}", i % 8));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, vec![i as u8; file_bytes]).expect("write");
    }
    let mut group = c.benchmark_group("index_64_files_of_1MiB");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((files * file_bytes) as u64));
    group.bench_function("scan_and_hash_cold", |b| {
        b.iter_batched(
            DigestCache::default,
            |mut cache| {
                for meta in scan(&dir).expect("scan") {
                    cache
                        .digest_prefix(&dir, &meta, meta.len_bytes)
                        .expect("digest");
                }
                cache.hashed_bytes()
            },
            BatchSize::PerIteration,
        )
    });
    let mut warm = DigestCache::default();
    for meta in scan(&dir).expect("scan") {
        warm.digest_prefix(&dir, &meta, meta.len_bytes)
            .expect("digest");
    }
    group.bench_function("scan_and_hash_cached", |b| {
        b.iter(|| {
            for meta in scan(&dir).expect("scan") {
                warm.digest_prefix(&dir, &meta, meta.len_bytes)
                    .expect("digest");
            }
        })
    });
    group.finish();
}

/// A connecting follower's session takes the writer's catalog 256 files per hold of the writers'
/// lock (an `append` waits meanwhile), against cloning it all at once (as it did before), and
/// the whole detached copy (made outside the lock); the checkpoint thread takes 256 changed
/// files per hold.
fn catalog_copy(c: &mut Criterion) {
    let files = 100_000u64;
    let catalog = Catalog::new((0..files).map(|i| {
        let path = format!("queues/q{}/segments/{i:020}.seg", i % 100);
        (RelPath::new(&path).expect("a valid path"), 8 << 20)
    }));
    let mut group = c.benchmark_group("catalog_100k_files");
    group.sample_size(20);
    group.bench_function("take_256_files_one_lock_hold", |b| {
        b.iter_batched(
            CatalogPart::default,
            |mut part| {
                catalog.take_part(50_000, 256, &mut part);
                part
            },
            BatchSize::SmallInput,
        )
    });
    // The checkpoint thread takes the files changed since its last round, 256 per hold
    // (`Catalog::take_listed`), and brings its own copy up to date outside the lock: here 256
    // files appended to in turn, each hold timed alone, and the copy's update.
    let mut listing = catalog.clone();
    listing.start_listing();
    let mut copy = listing.detached();
    let (mut taken, mut changed) = (Vec::new(), Vec::new());
    let mut next_file = 0u64;
    let mut change_256 = |listing: &mut Catalog| {
        for _ in 0..256 {
            let path = format!("queues/q{}/segments/{next_file:020}.seg", next_file % 100);
            let _ = listing.append(&path, 8 << 20, 1);
            next_file = (next_file + 1) % files;
        }
    };
    group.bench_function("take_listed_256_files_one_lock_hold", |b| {
        b.iter_custom(|iters| {
            let mut held = std::time::Duration::ZERO;
            for _ in 0..iters {
                change_256(&mut listing);
                let started = std::time::Instant::now();
                listing.take_listed(256, &mut taken);
                held += started.elapsed();
                changed.clear();
                copy.apply(&listing, &taken, listing.position(), &mut changed);
            }
            held
        })
    });
    group.bench_function("apply_256_listed_files_outside_the_lock", |b| {
        b.iter_custom(|iters| {
            let mut applying = std::time::Duration::ZERO;
            for _ in 0..iters {
                change_256(&mut listing);
                listing.take_listed(256, &mut taken);
                changed.clear();
                let started = std::time::Instant::now();
                // Every file is the copy's already: no path asked of the source.
                copy.apply(&listing, &taken, listing.position(), &mut changed);
                applying += started.elapsed();
            }
            applying
        })
    });
    group.bench_function("clone_all_at_once", |b| b.iter(|| catalog.clone()));
    group.bench_function("copy_all_100k_files", |b| b.iter(|| catalog.detached()));
    group.finish();
}

criterion_group!(protocol, frames, lag, index, catalog_copy);
criterion_main!(protocol);
