//! SHA-1 throughput of the `sha1` crate (SHA-NI where the CPU has it) against `sha1_smol`, the
//! crate the product card names. The index hashes with whichever is faster: run
//! `cargo bench --bench digest` and compare the two `thrpt` figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BUFFER_BYTES: usize = 64 * 1024 * 1024;

fn sha1_crates(c: &mut Criterion) {
    let data: Vec<u8> = (0..BUFFER_BYTES).map(|i| (i * 31) as u8).collect();
    let mut group = c.benchmark_group("sha1_64MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(BUFFER_BYTES as u64));
    group.bench_function("sha1", |b| {
        b.iter(|| {
            use sha1::Digest;
            let d: [u8; 20] = sha1::Sha1::digest(&data).into();
            d
        })
    });
    group.bench_function("sha1_smol", |b| {
        b.iter(|| sha1_smol::Sha1::from(&data).digest().bytes())
    });
    group.finish();
}

criterion_group!(benches, sha1_crates);
criterion_main!(benches);
