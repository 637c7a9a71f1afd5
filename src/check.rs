//! Input validation shared by every layer (quantizers, coarse quantizer, indexes, the
//! attention client): whole rows, finite values, squared norms that f32 distances can hold,
//! the f16 range, `k`. Imports nothing but the error type.

use crate::error::{Error, Result};

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
