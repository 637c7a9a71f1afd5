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
    // One pass: a row's squared norm is NaN or infinite if any of its values is not finite,
    // so the finiteness and norm checks share it; the slow search for the exact culprit runs
    // only on a failing row.
    for (row, v) in x.chunks_exact(d).enumerate() {
        let sq = squared_norm_f64(v);
        if sq.is_nan() || sq > MAX_SQUARED_NORM {
            return Err(row_error(x, d, row, sq, what));
        }
    }
    Ok(x.len() / d)
}

/// `sum v_i^2` in f64, in eight independent lanes (the serial chain of one accumulator cost a
/// microsecond per 784-d row, a few % of a batch search).
#[inline]
fn squared_norm_f64(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64 * x as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x as f64 * x as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// The error of the first row that failed [`check_vectors`]: the first non-finite value of
/// the whole input if there is one (rows before `row` are finite), else `row`'s norm.
#[cold]
fn row_error(x: &[f32], d: usize, row: usize, sq: f64, what: &'static str) -> Error {
    if let Some(i) = x[row * d..].iter().position(|v| !v.is_finite()) {
        let i = row * d + i;
        return Error::NonFinite {
            what,
            head: None,
            row: i / d,
            col: i % d,
        };
    }
    Error::InvalidArgument(format!(
        "{what}: row {row} has squared norm {sq:.3e}, over the {MAX_SQUARED_NORM:.3e} that f32 \
         distances can hold"
    ))
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
