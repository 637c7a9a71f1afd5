//! Per-query lookup tables for asymmetric distance computation (ADC).
//!
//! `lut[j * ksub + c]` is the partial score of centroid `c` of sub-space `j` against the
//! query's `j`-th sub-vector: the inner product, or the squared L2 distance. The score of a
//! code is the sum of its `m` entries (exact for both metrics, since both decompose over
//! sub-spaces).

use super::ProductQuantizer;
use crate::metric::Metric;
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::lut::LutKernel;
use std::sync::OnceLock;

impl ProductQuantizer {
    /// Fills `lut` (`m * ksub`) for query `q` (`d`). The quantizer must be trained and the
    /// shapes right (callers validate).
    ///
    /// Row `j` is built as `dsub` AXPYs over the transposed codebook: `sum_t q_jt * C_j[t][..]`
    /// for inner product, and `||q_j||² + ||c||² - 2 sum_t q_jt * C_j[t][..]` for L2 (clamped
    /// at 0). `d * ksub` fused multiply-adds in all.
    pub fn compute_lut(
        &self,
        q: &[f32],
        metric: Metric,
        kernels: &DistanceKernels,
        lut: &mut [f32],
    ) {
        let (m, ksub, dsub) = (self.m, self.ksub(), self.dsub());
        debug_assert_eq!(q.len(), self.d);
        debug_assert_eq!(lut.len(), m * ksub);
        let alpha = match metric {
            Metric::InnerProduct => {
                lut.fill(0.0);
                1.0
            }
            Metric::L2 => {
                lut.copy_from_slice(&self.centroid_norms[..m * ksub]);
                -2.0
            }
        };
        if ksub == 16 {
            // 4-bit tables: each row stays in one register (two on AVX2) for its whole
            // sub-vector, every row in one kernel call.
            kernels.axpy_cols16(alpha, q, &self.centroids_t[..m * dsub * 16], lut);
        } else {
            for (j, row) in lut.chunks_exact_mut(ksub).enumerate() {
                for (t, &qt) in q[j * dsub..(j + 1) * dsub].iter().enumerate() {
                    let col = &self.centroids_t[(j * dsub + t) * ksub..(j * dsub + t + 1) * ksub];
                    kernels.axpy(alpha * qt, col, row);
                }
            }
        }
        if metric == Metric::L2 {
            for (qj, row) in q.chunks_exact(dsub.max(1)).zip(lut.chunks_exact_mut(ksub)) {
                let base = qj.iter().map(|v| v * v).sum::<f32>();
                row.iter_mut().for_each(|v| *v = (*v + base).max(0.0));
            }
        }
    }
}

/// Sub-quantizers from which [`ProductQuantizer::dots_blocked`] uses the blocked codebook:
/// below half a block of rows its padding would hold up to 16 times the centroids (m 1) and
/// the kernel multiply as many zero rows.
const BLOCKED_MIN_M: usize = pqcache_simd::lut::BLOCK_ROWS / 2;

impl ProductQuantizer {
    /// The inner-product table of `q` (4-bit, trained) in the blocked layout of the IVF table
    /// kernel ([`extend_blocked`]), appended to `out` ([`pqcache_simd::lut::blocked_len`]`(m)`
    /// floats). From [`BLOCKED_MIN_M`] sub-quantizers on it is made blocked directly
    /// ([`LutKernel::dots_blocked`]: one fused multiply-add per coordinate, no row-major
    /// table or transpose), below it as [`ProductQuantizer::compute_lut`] with
    /// [`Metric::InnerProduct`] passed through [`extend_blocked`] (the two agree to within
    /// rounding).
    pub(crate) fn dots_blocked(&self, q: &[f32], kernels: &DistanceKernels, out: &mut Vec<f32>) {
        debug_assert_eq!(self.ksub(), 16);
        if self.m < BLOCKED_MIN_M {
            let mut rows = vec![0.0f32; self.m * 16];
            self.compute_lut(q, Metric::InnerProduct, kernels, &mut rows);
            extend_blocked(&rows, out);
            return;
        }
        let codebook = self
            .centroids_blocked
            .get_or_init(|| pqcache_simd::lut::blocked_codebook(&self.centroids_t, self.m));
        lut_kernel().dots_blocked(q, self.m, codebook, out);
    }
}

/// A lookup table quantized to u8 for fast-scan, with the map back to float scores.
///
/// `table[j * 16 + c] = round((s[j][c] - min_j) / delta)`, where `s` is the float table of
/// scores to maximise, `min_j` the smallest entry of sub-quantizer `j`, and `delta` the widest
/// per-sub-quantizer range over 255. A u16 sum `t` of table bytes maps back to the float score
/// `bias + delta * t` with `bias = sum_j min_j`; the rounding error is at most `m * delta / 2`.
/// Padding sub-quantizers (`m <= j < m2`) have all-zero rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedLut {
    /// `m2 * 16` bytes.
    pub table: Vec<u8>,
    /// Float value of one unit of the u16 sum.
    pub delta: f32,
    /// Float value of a zero sum.
    pub bias: f32,
}

impl QuantizedLut {
    /// Quantizes `scores` (`m * 16` floats to maximise) into a table of `m2` rows.
    pub fn new(scores: &[f32], m: usize, m2: usize) -> QuantizedLut {
        let mut lut = QuantizedLut::default();
        lut.requantize(scores, m, m2, &mut Vec::new());
        lut
    }

    /// [`QuantizedLut::new`] into this table's buffer (no allocation once it is large
    /// enough); `mins` is scratch space.
    pub fn requantize(&mut self, scores: &[f32], m: usize, m2: usize, mins: &mut Vec<f32>) {
        debug_assert_eq!(scores.len(), m * 16);
        let kernel = lut_kernel();
        mins.clear();
        mins.resize(m, 0.0);
        self.table.clear();
        self.table.resize(m2 * 16, 0);
        self.delta = kernel.quantize(scores, mins, &mut self.table);
        self.bias = sum_f64(mins);
    }

    /// The float score of a u16 sum.
    #[inline(always)]
    pub fn score(&self, sum: u16) -> f32 {
        self.bias + self.delta * sum as f32
    }
}

/// The u8 table of the rows `2 * dots - pre` (the IVF tables of L2 search with residuals,
/// one per query and probed list), both in the blocked layout
/// ([`extend_blocked`]), written into `table` (`m2 * 16` bytes, padding rows
/// zero) without making the float rows; `scratch` is the kernel's (resized here). Returns
/// `(delta, bias)` as in [`QuantizedLut`] ([`pqcache_simd::lut::bias_of`] sums the minima).
pub fn quantize_residual_blocked(
    dots: &[f32],
    pre: &[f32],
    scratch: &mut Vec<f32>,
    table: &mut [u8],
) -> (f32, f32) {
    scratch.resize(pqcache_simd::lut::blocked_scratch_len(dots.len()), 0.0);
    lut_kernel().quantize_residual_blocked(dots, pre, scratch, table)
}

/// Appends `rows` (`m * 16`, row-major) to `out` in the blocked layout of
/// [`quantize_residual_blocked`] ([`pqcache_simd::lut::LutKernel::extend_blocked`]).
pub fn extend_blocked(rows: &[f32], out: &mut Vec<f32>) {
    lut_kernel().extend_blocked(rows, out);
}

/// The table-quantization kernel, resolved once per process (every level gives the same
/// bytes).
fn lut_kernel() -> &'static LutKernel {
    static KERNEL: OnceLock<LutKernel> = OnceLock::new();
    KERNEL.get_or_init(LutKernel::best)
}

/// `sum(x)` in f64, rounded once to f32: four independent lanes (`lane = i % 4`, folded
/// `(l0 + l1) + (l2 + l3)`, [`crate::linalg::lane_sum`]).
fn sum_f64(x: &[f32]) -> f32 {
    crate::linalg::lane_sum::<f64, 4>(x, f64::from) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::Nbits;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Below and above `BLOCKED_MIN_M`, the blocked inner-product table is the row-major one
    /// transposed: exactly below (the same path), within the roundings of `dsub` products
    /// and sums above (one fused multiply-add per coordinate against a product and a sum).
    #[test]
    fn blocked_dots_are_the_row_major_table_blocked() {
        let mut rng = StdRng::seed_from_u64(11);
        let kernels = DistanceKernels::best();
        for (d, m) in [
            (12usize, 1usize),
            (28, 7),
            (32, 8),
            (96, 12),
            (128, 32),
            (784, 98),
        ] {
            let dsub = d / m;
            let centroids: Vec<f32> = (0..m * 16 * dsub)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let pq = ProductQuantizer::from_centroids(d, m, Nbits::Four, centroids).unwrap();
            let q: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut rows = vec![0.0f32; m * 16];
            pq.compute_lut(&q, Metric::InnerProduct, &kernels, &mut rows);
            let mut want = Vec::new();
            extend_blocked(&rows, &mut want);
            let mut got = vec![3.0f32];
            pq.dots_blocked(&q, &kernels, &mut got);
            assert_eq!(got.remove(0), 3.0, "appended");
            assert_eq!(got.len(), want.len());
            // |q_t| <= 2, |c_t| <= 1: each partial sum below 2 dsub.
            let tol = if m < BLOCKED_MIN_M {
                0.0
            } else {
                4.0 * (dsub * dsub) as f32 * f32::EPSILON
            };
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= tol, "d {d} m {m} at {i}: {a} vs {b}");
            }
        }
    }
}
