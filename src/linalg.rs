//! Dense products through faer's GEMM: the batch paths of k-means assignment, exact search and
//! encoding all reduce to `A · Bᵀ` over row-major matrices.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// `out[i * out_stride + j] = sum_t a[i * d + t] * b[j * d + t]` for `i < na`, `j < nb`.
///
/// `a` is `na * d` row-major, `b` is `nb * d` row-major, `out` holds `na` rows of stride
/// `out_stride >= nb`. Runs on the calling thread.
pub fn gemm_abt(
    a: &[f32],
    na: usize,
    b: &[f32],
    nb: usize,
    d: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    debug_assert_eq!(a.len(), na * d);
    debug_assert_eq!(b.len(), nb * d);
    debug_assert!(out_stride >= nb);
    if na == 0 || nb == 0 {
        return;
    }
    let needed = (na - 1) * out_stride + nb;
    let out = &mut out[..needed];
    if d == 0 {
        for i in 0..na {
            out[i * out_stride..i * out_stride + nb].fill(0.0);
        }
        return;
    }
    let lhs = MatRef::from_row_major_slice(a, na, d);
    let rhs = MatRef::from_row_major_slice(b, nb, d).transpose();
    // Not `from_row_major_slice_with_stride_mut`: in faer 0.24.4 it swaps the two strides
    // (row stride 1, column stride `row_stride`), i.e. builds a column-major view and writes
    // out of bounds. The transpose of a column-major view is the row-major view we want.
    let dst =
        MatMut::from_column_major_slice_with_stride_mut(out, nb, na, out_stride).transpose_mut();
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
}

/// Squared norms of `n` rows of width `d`.
pub fn row_norms_sq(x: &[f32], d: usize) -> Vec<f32> {
    if d == 0 {
        return vec![0.0; 0];
    }
    x.chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_with_stride() {
        let (na, nb, d) = (5, 7, 3);
        let a: Vec<f32> = (0..na * d).map(|x| x as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..nb * d).map(|x| (x % 5) as f32 - 1.0).collect();
        // A stride larger than the row catches a swapped-stride view (writes outside rows).
        let stride = 9;
        let mut out = vec![f32::NAN; na * stride];
        gemm_abt(&a, na, &b, nb, d, &mut out, stride);
        for i in 0..na {
            for j in 0..nb {
                let want: f32 = (0..d).map(|t| a[i * d + t] * b[j * d + t]).sum();
                assert_eq!(out[i * stride + j], want);
            }
            assert!(
                out[i * stride + nb].is_nan() || i == na - 1,
                "wrote outside the block"
            );
        }
    }
}
