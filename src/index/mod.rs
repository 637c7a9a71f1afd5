//! Indexes: exact ([`flat`]), product-quantized ([`pq`], [`fastscan`]), inverted-file
//! fast-scan ([`ivf`]), and the concurrent wrapper ([`streaming`]).
//!
//! Every index implements [`Index`] with FAISS's vocabulary: `train`, `add`, `search(x, k)`,
//! `reset`, `ntotal`, `dim`, `is_trained`. Vectors are `n * d` f32, row-major. Every entry
//! point validates its input (dimension, finiteness, `k`) and returns a typed error.

pub mod fastscan;
pub mod flat;
pub mod ivf;
pub mod pq;
pub mod streaming;

use crate::error::{Error, Result};
use crate::metric::Metric;
use crate::result::SearchResult;

pub use fastscan::{IndexPQFastScan, RerankStorage};
pub use flat::IndexFlat;
pub use ivf::IndexIVFPQFastScan;
pub use pq::IndexPQ;
pub use streaming::{RefreshPolicy, StreamingIndex};

/// The operations every index supports.
pub trait Index: Send + Sync {
    /// Vector dimension.
    fn dim(&self) -> usize;
    /// Number of indexed vectors.
    fn ntotal(&self) -> usize;
    /// The metric.
    fn metric(&self) -> Metric;
    /// Whether the index can accept vectors.
    fn is_trained(&self) -> bool;
    /// Trains on `x` (`n * d`). A no-op for indexes that need no training.
    fn train(&mut self, x: &[f32]) -> Result<()>;
    /// Adds `x` (`n * d`); ids continue from `ntotal`.
    fn add(&mut self, x: &[f32]) -> Result<()>;
    /// The `k` best vectors for each query of `queries` (`nq * d`).
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult>;
    /// Removes every vector (keeps the training).
    fn reset(&mut self);
}

/// Checks that `x` holds whole rows of `d` finite values; returns the row count.
pub fn check_vectors(x: &[f32], d: usize, what: &'static str) -> Result<usize> {
    if d == 0 {
        return Err(Error::InvalidArgument("dimension must be positive".into()));
    }
    if !x.len().is_multiple_of(d) {
        return Err(Error::rows(what, x.len(), d));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what,
            head: None,
            row: i / d,
            col: i % d,
        });
    }
    // A finite row can still overflow a distance: ||q - x||^2 <= 2 (||q||^2 + ||x||^2), so
    // rows whose squared norm is at most MAX_SQUARED_NORM never make an f32 distance or inner
    // product infinite (or NaN), which would rank it first for every query.
    for (row, v) in x.chunks_exact(d).enumerate() {
        let sq: f64 = v.iter().map(|&c| c as f64 * c as f64).sum();
        if sq > MAX_SQUARED_NORM {
            return Err(Error::InvalidArgument(format!(
                "{what}: row {row} has squared norm {sq:.3e}, over the {MAX_SQUARED_NORM:.3e} \
                 that f32 distances can hold"
            )));
        }
    }
    Ok(x.len() / d)
}

/// Largest squared norm of an accepted vector: a quarter of `f32::MAX`, so that any distance
/// between two accepted vectors is finite.
pub const MAX_SQUARED_NORM: f64 = f32::MAX as f64 / 4.0;

/// Checks that `x` fits f16 storage (`|v| <= 65504`; larger values would be stored as
/// infinity and rank first in every L2 search).
pub fn check_f16_range(x: &[f32], d: usize, what: &'static str) -> Result<()> {
    match x.iter().position(|v| v.abs() > half::f16::MAX.to_f32()) {
        Some(i) => Err(Error::InvalidArgument(format!(
            "{what}: row {} column {} holds {}, outside the f16 range (|v| <= 65504) of this \
             index's stored vectors",
            i / d.max(1),
            i % d.max(1),
            x[i]
        ))),
        None => Ok(()),
    }
}

/// Checks `1 <= k <= ntotal` and that the index is not empty.
pub fn check_k(k: usize, ntotal: usize) -> Result<()> {
    if ntotal == 0 {
        return Err(Error::EmptyIndex);
    }
    if k == 0 || k > ntotal {
        return Err(Error::InvalidK { k, ntotal });
    }
    Ok(())
}

/// Calls `f(i)` for every position `i < valid` whose bit is set in `masks` (one u32 per block
/// of 32, as the fast-scan kernel marks the scores above a threshold), ascending.
#[inline]
pub(crate) fn for_each_marked(masks: &[u32], valid: usize, mut f: impl FnMut(usize)) {
    use pqcache_simd::fastscan::BBS;
    for (b, &mask) in masks.iter().enumerate() {
        let mut bits = mask;
        while bits != 0 {
            let i = b * BBS + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if i >= valid {
                return;
            }
            f(i);
        }
    }
}

/// Selects the top `k` of `scores` (larger is better) into one result row, converting scores
/// back to the metric's distances.
pub(crate) fn write_row(
    scores: &[f32],
    k: usize,
    metric: Metric,
    dist: &mut [f32],
    ids: &mut [i64],
) {
    let best = crate::select::select_topk(scores, k);
    for (slot, (s, pos)) in best.into_iter().enumerate() {
        dist[slot] = metric.from_score(s);
        ids[slot] = pos as i64;
    }
}
