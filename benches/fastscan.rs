//! 4-bit fast-scan: the accumulation kernel per SIMD level and query-group size, and
//! IndexPQFastScan search for small k (ANN) and large k (attention). Single thread.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pqcache::{Index, IndexPQFastScan, Level, Metric};
use pqcache_simd::fastscan::{accumulate_scalar, block_bytes, FastScanKernel, BBS};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "common.rs"]
mod common;

fn bench_kernel(c: &mut Criterion) {
    let mut g = c.benchmark_group("fastscan_kernel");
    let mut rng = StdRng::seed_from_u64(1);
    let n = 65536;
    let nblocks = n / BBS;
    for m in [16usize, 32, 64, 128] {
        let codes: Vec<u8> = (0..nblocks * block_bytes(m))
            .map(|_| rng.random())
            .collect();
        for nq in [1usize, 4] {
            let luts: Vec<u8> = (0..nq * m * 16)
                .map(|_| rng.random_range(0..=255))
                .collect();
            let mut want = vec![0u16; nq * n];
            accumulate_scalar(&codes, nblocks, m, &luts, nq, &mut want);
            for level in Level::all_supported() {
                let k = FastScanKernel::for_level(level);
                let mut out = vec![0u16; nq * n];
                // A threshold near the top, as a small-k heap has after the first blocks.
                let thresholds = vec![(200 * m) as u16; nq];
                let mut masks = vec![0u32; nq * nblocks];
                k.accumulate(
                    &codes,
                    nblocks,
                    m,
                    &luts,
                    nq,
                    &thresholds,
                    &mut out,
                    &mut masks,
                );
                assert_eq!(out, want, "level {level}");
                g.throughput(Throughput::Elements((n * nq) as u64));
                let name = format!("m={m}/n={n}/qbs={nq}/level={level}");
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter(|| {
                        k.accumulate(
                            &codes,
                            nblocks,
                            m,
                            &luts,
                            nq,
                            &thresholds,
                            &mut out,
                            &mut masks,
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

fn bench_search(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("fastscan_search");
    g.sample_size(20);
    let d = 128;
    for n in [32768usize, 131072] {
        let base = common::keys_like(n, d, 5);
        let queries = common::keys_like(4, d, 6);
        for m in [32usize, 64] {
            let mut idx = IndexPQFastScan::new(d, m, Metric::InnerProduct).unwrap();
            idx.train_config.niter = 5;
            pool.install(|| {
                idx.train(&base[..16384 * d]).unwrap();
                idx.add(&base).unwrap();
            });
            for k in [10, n / 10] {
                for qbs in [1usize, 4] {
                    idx.qbs = qbs;
                    let r = pool.install(|| idx.search(&queries, k)).unwrap();
                    assert_eq!(r.ids.len(), 4 * k);
                    g.throughput(Throughput::Elements((4 * n) as u64));
                    let name = format!("m={m}/n={n}/k={k}/qbs={qbs}/level={}", idx.level());
                    g.bench_function(BenchmarkId::from_parameter(name), |b| {
                        b.iter(|| pool.install(|| idx.search(&queries, k)).unwrap())
                    });
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench_kernel, bench_search);
criterion_main!(benches);
