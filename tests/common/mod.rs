//! Shared test helpers: data paths and seeded generators.
#![allow(dead_code)]

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::PathBuf;

/// `../shared/data` beside the repository (CI lays it there), or `$PQCACHE_SHARED_DATA` (for
/// test binaries run on another machine, e.g. by scripts/gpu-check.sh).
pub fn shared_data() -> PathBuf {
    let p = match std::env::var_os("PQCACHE_SHARED_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    assert!(
        p.exists(),
        "test data not found at {} (../shared/data beside the repository)",
        p.display()
    );
    p
}

/// `n * d` integer-valued floats in `-r..=r`: every dot product and distance is exact in f32,
/// so exact search must match a naive reference bit for bit, ties included.
pub fn int_vectors(n: usize, d: usize, r: i32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * d)
        .map(|_| rng.random_range(-r..=r) as f32)
        .collect()
}

/// `n * d` uniform floats in [-1, 1).
pub fn uniform(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect()
}
