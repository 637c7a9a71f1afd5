//! Indexes: exact ([`flat`]), product-quantized ([`pq`], [`fastscan`]), inverted-file
//! fast-scan ([`ivf`]), and the concurrent wrapper ([`streaming`]).
//!
//! Every index implements [`Index`] with FAISS's vocabulary: `train`, `add`, `search(x, k)`,
//! `reset`, `ntotal`, `dim`, `is_trained`. Vectors are `n * d` f32, row-major. Every entry
//! point validates its input (dimension, finiteness, `k`) and returns a typed error.

pub mod any;
pub mod fastscan;
pub mod flat;
pub mod ivf;
pub mod persist;
pub mod pq;
mod scan;
pub mod streaming;

use crate::error::Result;
use crate::metric::Metric;
use crate::result::SearchResult;

pub use any::AnyIndex;
pub use fastscan::{IndexPQFastScan, RerankStorage};
pub use flat::IndexFlat;
pub use ivf::IndexIVFPQFastScan;
pub use pq::IndexPQ;
pub use streaming::{RefreshPolicy, StreamingIndex};
// Input validation lives on the bottom floor (`crate::check`, used by `pq` and `ivf` too);
// re-exported here where callers have found it.
pub use crate::check::{check_f16_range, check_k, check_vectors, MAX_SQUARED_NORM};

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

/// The rows of an index of `n` that survive removing the positions `ids` (FAISS's
/// `remove_ids` on an index whose ids are positions; ids out of range remove nothing), and
/// how many go.
pub(crate) fn keep_mask(ids: &[i64], n: usize) -> (Vec<bool>, usize) {
    let mut keep = vec![true; n];
    let mut removed = 0;
    for &id in ids {
        if let Some(k) = usize::try_from(id).ok().and_then(|i| keep.get_mut(i)) {
            removed += usize::from(*k);
            *k = false;
        }
    }
    (keep, removed)
}

/// Whether `tasks` pieces of work should go to rayon's pool: more than one, and more than
/// one thread to run them. A parallel call from a thread outside the pool (a Python thread,
/// a server's request thread) hands the work to the pool and waits for it to come back,
/// tens of microseconds on a loaded machine: a single task, or a pool of one, pays that
/// for nothing (a one-query fast-scan search is about 10 us).
#[inline]
pub(crate) fn worth_parallel(tasks: usize) -> bool {
    tasks > 1 && rayon::current_num_threads() > 1
}

/// Calls `f(i)` for every position `i < valid` whose bit is set in `masks` (one u32 per block
/// of 32, as the fast-scan kernel marks the scores above a threshold), ascending.
///
/// `RUN`: the masks are tested `RUN` at a time (one OR, vectorised) before any is walked bit by
/// bit. A top-k whose floor has settled (small k: `scan::HeapHandler`, IVF's lists) leaves
/// almost every block unmarked, and walking them one at a time cost about four cycles each
/// (the walk's counters live across `f`'s calls, so they went through the stack): a tenth of
/// a one-query scan, which `RUN = 8` cuts to a few %. Where most blocks hold a mark (a
/// large-k floor) the extra test is pure cost (1.5 % of a k = n/10 search): `RUN = 1`.
#[inline]
pub(crate) fn for_each_marked<const RUN: usize>(
    masks: &[u32],
    valid: usize,
    mut f: impl FnMut(usize),
) {
    use pqcache_simd::fastscan::BBS;
    const { assert!(RUN > 0) };
    for (g, run) in masks.chunks(RUN).enumerate() {
        if RUN > 1 && run.iter().fold(0, |a, &m| a | m) == 0 {
            continue;
        }
        for (j, &mask) in run.iter().enumerate() {
            let mut bits = mask;
            while bits != 0 {
                let i = (g * RUN + j) * BBS + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if i >= valid {
                    return;
                }
                f(i);
            }
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
    write_best(crate::select::select_topk(scores, k), metric, dist, ids);
}

/// Writes ranked (score, position) pairs, best first, into one result row: the scores as the
/// metric's distances, the positions as ids.
pub(crate) fn write_best(
    best: impl IntoIterator<Item = (f32, u32)>,
    metric: Metric,
    dist: &mut [f32],
    ids: &mut [i64],
) {
    for (((s, pos), dist), id) in best.into_iter().zip(dist).zip(ids) {
        *dist = metric.from_score(s);
        *id = pos as i64;
    }
}

/// Exact re-ranking, the one helper of every index that keeps its original vectors: each
/// candidate `c` is scored again as `exact(c)` (larger is better: an inner product or a
/// negated squared distance) and the best `k` are kept, best first; equal scores go to the
/// smaller candidate (a position, or IVF's id first).
pub(crate) fn rerank<C: Ord + Copy>(
    cands: impl IntoIterator<Item = C>,
    k: usize,
    mut exact: impl FnMut(C) -> f32,
) -> Vec<(f32, C)> {
    let mut scored: Vec<(f32, C)> = cands.into_iter().map(|c| (exact(c), c)).collect();
    crate::select::select_sorted(&mut scored, k);
    scored
}

#[cfg(test)]
mod tests {
    use super::for_each_marked;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every marked position below `valid`, ascending, whatever the run of unmarked blocks
    /// before it (the walk skips `RUN` blocks at a time) and wherever `valid` cuts.
    #[test]
    fn for_each_marked_finds_every_mark_in_order() {
        let mut rng = StdRng::seed_from_u64(7);
        for nblocks in [0usize, 1, 7, 8, 9, 16, 17, 40] {
            for density in [0.0, 0.002, 0.05, 0.5] {
                let masks: Vec<u32> = (0..nblocks)
                    .map(|_| (0..32).fold(0, |m, b| m | (u32::from(rng.random_bool(density)) << b)))
                    .collect();
                for valid in [0, 1, 31, 32, 33, 8 * 32 + 5, nblocks * 32, nblocks * 32 + 9] {
                    let want: Vec<usize> = (0..(nblocks * 32).min(valid))
                        .filter(|&i| masks[i / 32] >> (i % 32) & 1 == 1)
                        .collect();
                    let mut got = [Vec::new(), Vec::new(), Vec::new()];
                    for_each_marked::<1>(&masks, valid, |i| got[0].push(i));
                    for_each_marked::<3>(&masks, valid, |i| got[1].push(i));
                    for_each_marked::<8>(&masks, valid, |i| got[2].push(i));
                    for got in got {
                        let at = format!("{nblocks} blocks, density {density}, valid {valid}");
                        assert_eq!(got, want, "{at}");
                    }
                }
            }
        }
    }
}
