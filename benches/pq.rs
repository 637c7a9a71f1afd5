//! 8-bit (and unpacked 4-bit) ADC: the raw scan kernel against the one-code-at-a-time
//! reference loop it must match bit for bit, and IndexPQ search.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pqcache::{Index, IndexPQ, Level, Metric, Nbits};
use pqcache_simd::adc::{scan_scalar, AdcKernel};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "common.rs"]
mod common;

fn bench_adc_kernel(c: &mut Criterion) {
    let mut g = c.benchmark_group("adc_scan");
    let n = 65536;
    let mut rng = StdRng::seed_from_u64(1);
    for (m, ksub) in [
        (16usize, 256usize),
        (32, 256),
        (64, 256),
        (96, 256),
        (32, 16),
    ] {
        let lut: Vec<f32> = (0..m * ksub).map(|_| rng.random_range(-1.0..1.0)).collect();
        let codes: Vec<u8> = (0..n * m)
            .map(|_| rng.random_range(0..ksub) as u8)
            .collect();
        let mut want = vec![0.0; n];
        scan_scalar(&lut, m, ksub, &codes, &mut want);
        let kernel = AdcKernel::best();
        let mut out = vec![0.0; n];
        kernel.scan(&lut, m, ksub, &codes, &mut out);
        assert_eq!(out, want, "the kernel differs from the reference");
        g.throughput(Throughput::Elements(n as u64));
        let name = format!("m={m}/ksub={ksub}/n={n}/kernel");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| kernel.scan(&lut, m, ksub, &codes, &mut out))
        });
        let name = format!("m={m}/ksub={ksub}/n={n}/reference");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| scan_scalar(&lut, m, ksub, &codes, &mut out))
        });
    }
    g.finish();
}

fn bench_index_pq(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("index_pq");
    g.sample_size(20);
    let (n, d) = (65536, 128);
    let base = common::keys_like(n, d, 3);
    let queries = common::keys_like(16, d, 4);
    for m in [16, 32] {
        let mut idx = IndexPQ::new(d, m, Nbits::Eight, Metric::InnerProduct).unwrap();
        idx.train_config.niter = 5;
        pool.install(|| {
            idx.train(&base[..16384 * d]).unwrap();
            idx.add(&base).unwrap();
        });
        for k in [10, n / 10] {
            let r = pool.install(|| idx.search(&queries[..d], k)).unwrap();
            assert_eq!(r.ids.len(), k);
            g.throughput(Throughput::Elements(n as u64));
            let name = format!("search/m={m}/nbits=8/n={n}/k={k}/level={}", Level::best());
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| pool.install(|| idx.search(&queries[..d], k)).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_adc_kernel, bench_index_pq);
criterion_main!(benches);
