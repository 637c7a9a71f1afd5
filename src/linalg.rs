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

/// Squared norms of `n` rows of width `d` ([`norm_sq`] each).
pub fn row_norms_sq(x: &[f32], d: usize) -> Vec<f32> {
    if d == 0 {
        return vec![0.0; 0];
    }
    x.chunks_exact(d).map(norm_sq).collect()
}

/// `sum x_i^2` in eight lanes (`lane_sum`, folded pairwise): the same bits on every CPU,
/// and the lanes' additions do not wait on each other (a sum in order is a chain of `d`
/// dependent additions: 0.7 us per 784-d query, 4 % of an IVF search).
pub fn norm_sq(x: &[f32]) -> f32 {
    lane_sum::<f32, 8>(x, |v| v * v)
}

/// `sum term(x_i)` in `L` lanes (`L` a power of two: `term(x_i)` added into lane `i % L`),
/// folded pairwise (`(l0 + l1) + (l2 + l3)` for 4, the same tree again for 8): a fixed order,
/// so the same bits wherever it runs, and `L` independent addition chains.
pub(crate) fn lane_sum<A, const L: usize>(x: &[f32], term: impl Fn(f32) -> A) -> A
where
    A: Copy + Default + std::ops::Add<Output = A>,
{
    let mut l = [A::default(); L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in l.iter_mut().zip(c) {
            *a = *a + term(v);
        }
    }
    for (a, &v) in l.iter_mut().zip(tail) {
        *a = *a + term(v);
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            l[i] = l[2 * i] + l[2 * i + 1];
        }
    }
    l[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_sq_sums_eight_lanes_in_their_order() {
        // 19 elements: two full rounds and a tail of 3, with a sum that depends on the order
        // (1e8 first absorbs each later 1 of a sum in order; the lanes keep them).
        let x: Vec<f32> = (0..19).map(|i| if i == 0 { 1e4 } else { 1.0 }).collect();
        let mut l = [0.0f32; 8];
        for (i, &v) in x.iter().enumerate() {
            l[i % 8] += v * v;
        }
        let want = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        assert_eq!(norm_sq(&x).to_bits(), want.to_bits());
        assert_ne!(
            want.to_bits(),
            x.iter().map(|v| v * v).sum::<f32>().to_bits()
        );
        assert_eq!(
            row_norms_sq(&x[..18], 6),
            vec![norm_sq(&x[..6]), norm_sq(&x[6..12]), norm_sq(&x[12..18])]
        );
    }

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
