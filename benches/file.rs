//! Index files: time to open a 1M-vector fast-scan file by mmap vs reading it into memory,
//! and the latency of open + first query (the mapped pages fault in during that scan).
//! Single thread. `PQCACHE_BENCH_N` overrides the size (default 1,048,576).
use criterion::{criterion_group, criterion_main, Criterion};
use pqcache::io::file;
use pqcache::{Index, IndexPQFastScan, Metric};

#[path = "common.rs"]
mod common;

fn bench_open(c: &mut Criterion) {
    let n: usize = std::env::var("PQCACHE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let (d, m) = (128, 32);
    let base = common::keys_like(n, d, 1);
    let mut idx = IndexPQFastScan::new(d, m, Metric::InnerProduct).unwrap();
    idx.train(&base[..65536.min(n) * d]).unwrap();
    idx.add(&base).unwrap();
    drop(base);
    let path = std::env::temp_dir().join(format!("pqcache-bench-open-{n}.pqc"));
    file::save(&idx, &path).unwrap();
    let q = common::keys_like(1, d, 2);
    // Checked once before timing: both readers answer as the index in memory.
    let want = idx.search(&q, 10).unwrap();
    assert_eq!(file::open(&path).unwrap().search(&q, 10).unwrap(), want);
    assert_eq!(file::load(&path).unwrap().search(&q, 10).unwrap(), want);
    let mut g = c.benchmark_group(format!("file/pqfs/m={m}/n={n}"));
    g.sample_size(20);
    g.bench_function("open_mmap", |b| b.iter(|| file::open(&path).unwrap()));
    g.bench_function("load", |b| b.iter(|| file::load(&path).unwrap()));
    g.bench_function("open_mmap+first_query", |b| {
        b.iter(|| file::open(&path).unwrap().search(&q, 10).unwrap())
    });
    g.bench_function("load+first_query", |b| {
        b.iter(|| file::load(&path).unwrap().search(&q, 10).unwrap())
    });
    g.bench_function("query_in_memory", |b| {
        b.iter(|| idx.search(&q, 10).unwrap())
    });
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench_open);
criterion_main!(benches);
