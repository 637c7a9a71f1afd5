//! Seeded data for the benches.
#![allow(dead_code)]

use rand::{rngs::StdRng, Rng, SeedableRng};

/// `n * d` floats: a random per-dimension offset and scale plus uniform noise, so that inner
/// products have structure (as LLM keys do) rather than being pure noise.
pub fn keys_like(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let offset: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let scale: Vec<f32> = (0..d).map(|_| rng.random_range(0.2..2.0)).collect();
    (0..n * d)
        .map(|i| offset[i % d] + scale[i % d] * rng.random_range(-1.0f32..1.0))
        .collect()
}

/// Forces the SIMD level of indexes built afterwards (benches run single-threaded here).
/// The top-k selections' filter kernel (`select`'s, resolved once per process) keeps the
/// level of its first use: a bench row's level is its index's distance and scan kernels'.
pub fn force_level(level: pqcache::Level) {
    std::env::set_var(pqcache_simd::level::LEVEL_ENV, level.name());
}

/// Times `iters` calls of `f` inside `pool` (criterion's `iter_custom`): one hand-over to the
/// pool per sample, not per call. A hand-over per call costs tens to hundreds of microseconds
/// on this VM: a third of a one-query search, a few % of an attention step.
pub fn in_pool<R>(
    pool: &rayon::ThreadPool,
    iters: u64,
    mut f: impl FnMut() -> R + Send,
) -> std::time::Duration {
    pool.install(|| {
        let start = std::time::Instant::now();
        for _ in 0..iters {
            std::hint::black_box(f());
        }
        start.elapsed()
    })
}
