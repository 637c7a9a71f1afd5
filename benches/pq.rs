//! 8-bit (and unpacked 4-bit) ADC: the raw scan kernel against the one-code-at-a-time
//! reference loop it must match bit for bit, and IndexPQ search; the table kernels of IVF's
//! L2 search (a query's `q . r` terms, a probed list's u8 table).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pqcache::{Index, IndexPQ, Level, Metric, Nbits};
use pqcache_simd::adc::{scan_scalar, AdcKernel};
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::lut::{blocked_codebook, blocked_len, blocked_scratch_len, LutKernel};
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

/// The per-query and per-probe table work of an IVF fast-scan L2 search with residuals, at
/// Fashion-MNIST's shape (d 784, m 98) and at d 128, m 32: the query's `q . r` terms made
/// row-major and transposed to the blocked layout (the way before `dots_blocked`) or made
/// blocked directly, and one list's table quantized from them (once per query and probe).
fn bench_ivf_tables(c: &mut Criterion) {
    let mut g = c.benchmark_group("ivf_tables");
    let mut rng = StdRng::seed_from_u64(3);
    let lut = LutKernel::best();
    let dist = DistanceKernels::best();
    for (d, m) in [(784usize, 98usize), (128, 32)] {
        let dsub = d / m;
        let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let cols: Vec<f32> = (0..d * 16).map(|_| rng.random_range(-1.0..1.0)).collect();
        let codebook = blocked_codebook(&cols, m);
        let mut rows = vec![0.0f32; m * 16];
        let mut dots = Vec::new();
        let level = lut.level();
        let name = format!("terms/row-major+transpose/d={d}/m={m}/level={level}");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                rows.fill(0.0);
                dist.axpy_cols16(1.0, &q, &cols, &mut rows);
                dots.clear();
                lut.extend_blocked(&rows, &mut dots);
            })
        });
        let name = format!("terms/blocked/d={d}/m={m}/level={level}");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                dots.clear();
                lut.dots_blocked(&q, m, &codebook, &mut dots);
            })
        });
        // Made here too: a filter or `--list` runs none of the closures above.
        dots.clear();
        lut.dots_blocked(&q, m, &codebook, &mut dots);
        assert_eq!(dots.len(), blocked_len(m));
        assert_eq!(codebook.len(), blocked_len(m) * dsub);
        let pre_rows: Vec<f32> = (0..m * 16).map(|_| rng.random_range(0.0..2.0)).collect();
        let mut pre = Vec::new();
        lut.extend_blocked(&pre_rows, &mut pre);
        let mut scratch = vec![0.0f32; blocked_scratch_len(dots.len())];
        let mut table = vec![0u8; (m + m % 2) * 16];
        let name = format!("table/quantize/m={m}/level={level}");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| lut.quantize_residual_blocked(&dots, &pre, &mut scratch, &mut table))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_adc_kernel, bench_index_pq, bench_ivf_tables);
criterion_main!(benches);
