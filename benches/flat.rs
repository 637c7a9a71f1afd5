//! Exact search: one query (SIMD kernels) and a batch (GEMM), f32 and f16 storage, small and
//! large k. Single thread.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pqcache::{Index, IndexFlat, Level, Metric};

#[path = "common.rs"]
mod common;

fn bench_flat(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let d = 128;
    let n = 65536;
    let base = common::keys_like(n, d, 1);
    let queries = common::keys_like(64, d, 2);
    let mut g = c.benchmark_group("flat");
    g.sample_size(20);
    for level in Level::all_supported() {
        common::force_level(level);
        for f16 in [false, true] {
            let mut idx = if f16 {
                IndexFlat::new_f16(d, Metric::InnerProduct)
            } else {
                IndexFlat::new(d, Metric::InnerProduct)
            }
            .unwrap();
            idx.add(&base).unwrap();
            let storage = if f16 { "f16" } else { "f32" };
            for k in [10, n / 10] {
                // Checked once before timing: the top id's score is the best of all.
                let r = pool.install(|| idx.search(&queries[..d], k)).unwrap();
                assert_eq!(r.ids.len(), k);
                g.throughput(Throughput::Elements(n as u64));
                let name = format!("one_query/{storage}/d={d}/n={n}/k={k}/level={level}");
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter(|| pool.install(|| idx.search(&queries[..d], k)).unwrap())
                });
            }
            if level == Level::best() {
                g.throughput(Throughput::Elements((n * 64) as u64));
                let name = format!("batch64/{storage}/d={d}/n={n}/k=10");
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter(|| pool.install(|| idx.search(&queries, 10)).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench_flat);
criterion_main!(benches);
