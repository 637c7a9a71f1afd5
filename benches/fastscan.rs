//! 4-bit fast-scan: the accumulation kernel per SIMD level and query-group size, and
//! IndexPQFastScan search for small k (ANN) and large k (attention), and the memory-bound
//! one-query scan against a plain read of the same bytes. Single thread.
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
                        b.iter_custom(|iters| {
                            common::in_pool(&pool, iters, || idx.search(&queries, k).unwrap())
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

/// The memory-bound row against its limit, in the same run: one query per scan (`qbs` 1),
/// k = 10, over 200K x m 32 (3.2 MB of codes, past L2, in L3), and a plain read of the same
/// bytes (eight independent xor lanes of u64 words: every cache line loaded once), both
/// reported in bytes of codes per second. Their ratio is the scan's share of the read
/// bandwidth.
fn bench_bandwidth(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("fastscan_bandwidth");
    g.sample_size(30);
    let (n, d, m) = (200_000usize, 128usize, 32usize);
    let base = common::keys_like(n, d, 11);
    let queries = common::keys_like(16, d, 12);
    let mut idx = IndexPQFastScan::new(d, m, Metric::InnerProduct).unwrap();
    idx.train_config.niter = 5;
    pool.install(|| {
        idx.train(&base[..32768 * d]).unwrap();
        idx.add(&base).unwrap();
    });
    idx.qbs = 1;
    let codes = idx.packed_codes().data().to_vec();
    g.throughput(Throughput::Bytes(codes.len() as u64));
    g.bench_function("read_loop/bytes=3.2MB", |b| {
        b.iter(|| {
            let mut acc = [0u64; 8];
            for line in std::hint::black_box(&codes).chunks_exact(64) {
                for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
                    *a ^= u64::from_le_bytes(w.try_into().unwrap());
                }
            }
            acc
        })
    });
    // Timed inside the one-thread pool (`common::in_pool`): the search itself, not a
    // hand-over per call.
    let name = format!("search/m={m}/n={n}/k=10/qbs=1/level={}", idx.level());
    let mut i = 0;
    g.bench_function(BenchmarkId::from_parameter(name), |b| {
        b.iter_custom(|iters| {
            common::in_pool(&pool, iters, || {
                i = (i + 1) % 16;
                idx.search(&queries[i * d..(i + 1) * d], 10).unwrap()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench_kernel, bench_search, bench_bandwidth);
criterion_main!(benches);
