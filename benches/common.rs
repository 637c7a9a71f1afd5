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
pub fn force_level(level: pqcache::Level) {
    std::env::set_var(pqcache_simd::level::LEVEL_ENV, level.name());
}
