//! The limits on every size a user or a file gives, in one table: the constructors and setters,
//! the CLI, the index-file writer and the reader all check against these, so that nothing
//! builds what cannot be opened, and no product of two user sizes is computed unchecked.
//!
//! | limit | value | bounds |
//! |---|---|---|
//! | [`MAX_DIM`] | 2^20 | vector dimension |
//! | [`MAX_NLIST`] | 2^24 | inverted lists, and so `nprobe` |
//! | [`MAX_RERANK_FACTOR`] | 2^20 | `k * factor` candidates re-ranked (then capped at `ntotal`) |
//! | [`MAX_THREADS`] | 1024 | worker threads of one pool |
//! | [`MAX_QUEST_PAGE`] | 2^20 | positions per Quest page |
//! | [`MAX_NTOTAL`] | 2^32 - 1 | vectors of a flat, PQ or fast-scan index (positions are u32) |
//! | [`MAX_KMEANS_ITERATIONS`] | 1,000 | Lloyd iterations of one k-means |

use crate::error::{Error, Result};

/// Largest vector dimension.
pub const MAX_DIM: usize = 1 << 20;
/// Most inverted lists (and so the largest useful `nprobe`).
pub const MAX_NLIST: usize = 1 << 24;
/// Largest re-ranking factor.
pub const MAX_RERANK_FACTOR: usize = 1 << 20;
/// Most worker threads in one pool.
pub const MAX_THREADS: usize = 1024;
/// Largest Quest page, in positions.
pub const MAX_QUEST_PAGE: usize = 1 << 20;
/// Most vectors in one flat, PQ or fast-scan index: their selections rank `u32` positions
/// (FAISS's `idx_t` is 64-bit; a larger collection is split, or an IVF, whose ids are i64).
pub const MAX_NTOTAL: usize = u32::MAX as usize;

/// Most Lloyd iterations of one k-means (codebooks, coarse quantizer): Lloyd's algorithm has
/// long converged by then (FAISS trains 10-25), and a count from a typo must not run for days
/// or size an allocation (the objective's history).
pub const MAX_KMEANS_ITERATIONS: usize = 1000;

/// Checks that `adding` more vectors fit an index of `ntotal` ([`MAX_NTOTAL`]): past it the
/// positions the selections rank would wrap and answer other vectors' ids.
pub fn check_capacity(ntotal: usize, adding: usize) -> Result<()> {
    match ntotal.checked_add(adding) {
        Some(total) if total <= MAX_NTOTAL => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{adding} vectors added to {ntotal} would exceed the {MAX_NTOTAL} an index holds"
        ))),
    }
}

/// `d` if it is a vector dimension an index may have (`1..=`[`MAX_DIM`]), else an error:
/// every index constructor checks it, so that no index is built (and saved) that its file
/// reader would refuse.
pub fn check_dim(d: usize) -> Result<usize> {
    if (1..=MAX_DIM).contains(&d) {
        Ok(d)
    } else {
        Err(Error::InvalidArgument(format!(
            "dimension {d} is out of range (1 to {MAX_DIM})"
        )))
    }
}

/// `value` if it is at most `max`, else an error naming `what` and the limit.
pub fn at_most(value: usize, max: usize, what: &str) -> Result<usize> {
    if value <= max {
        Ok(value)
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {value} is over the limit of {max}"
        )))
    }
}

/// Candidates kept for `k` results with a re-ranking `factor` over `ntotal` vectors:
/// `k * factor` (saturating) capped at `ntotal`, and never fewer than `k`.
pub fn rerank_pool(k: usize, factor: usize, ntotal: usize) -> usize {
    k.saturating_mul(factor.max(1)).min(ntotal).max(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_ends_at_the_last_u32_position() {
        assert!(check_capacity(0, MAX_NTOTAL).is_ok());
        assert!(check_capacity(MAX_NTOTAL - 10, 10).is_ok());
        let err = check_capacity(MAX_NTOTAL - 10, 11).unwrap_err().to_string();
        assert!(err.contains("would exceed the 4294967295"), "{err}");
        // The sum itself overflowing is refused, not wrapped.
        assert!(check_capacity(usize::MAX, 2).is_err());
    }
}
