//! Per-query lookup tables for asymmetric distance computation (ADC).
//!
//! `lut[j * ksub + c]` is the partial score of centroid `c` of sub-space `j` against the
//! query's `j`-th sub-vector: the inner product, or the squared L2 distance. The score of a
//! code is the sum of its `m` entries (exact for both metrics, since both decompose over
//! sub-spaces).

use super::ProductQuantizer;
use crate::metric::Metric;
use pqcache_simd::distance::DistanceKernels;

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
        for j in 0..m {
            let qj = &q[j * dsub..(j + 1) * dsub];
            let row = &mut lut[j * ksub..(j + 1) * ksub];
            let (alpha, base) = match metric {
                Metric::InnerProduct => {
                    row.fill(0.0);
                    (1.0, 0.0)
                }
                Metric::L2 => {
                    row.copy_from_slice(&self.centroid_norms[j * ksub..(j + 1) * ksub]);
                    (-2.0, qj.iter().map(|v| v * v).sum::<f32>())
                }
            };
            if ksub == 16 {
                // 4-bit tables: one 16-float row fits a register or two; an inline loop beats
                // a kernel call per (j, t).
                let row16: &mut [f32; 16] = row.try_into().expect("ksub == 16");
                for (t, &qt) in qj.iter().enumerate() {
                    let col: &[f32; 16] = self.centroids_t[(j * dsub + t) * 16..][..16]
                        .try_into()
                        .expect("16 wide");
                    let a = alpha * qt;
                    for c in 0..16 {
                        row16[c] += a * col[c];
                    }
                }
            } else {
                for (t, &qt) in qj.iter().enumerate() {
                    let col = &self.centroids_t[(j * dsub + t) * ksub..(j * dsub + t + 1) * ksub];
                    kernels.axpy(alpha * qt, col, row);
                }
            }
            if metric == Metric::L2 {
                row.iter_mut().for_each(|v| *v = (*v + base).max(0.0));
            }
        }
    }
}

/// Smallest and largest of 16 finite values, by a halving tree of lane-wise comparisons
/// (vectorises; `f32::min` folds do not, for their NaN rule). Exact, like any min / max.
#[inline(always)]
fn min_max16(row: &[f32; 16]) -> (f32, f32) {
    #[inline(always)]
    fn fold<const W: usize>(lo: &mut [f32; 16], hi: &mut [f32; 16]) {
        for i in 0..W {
            lo[i] = if lo[i + W] < lo[i] { lo[i + W] } else { lo[i] };
            hi[i] = if hi[i + W] > hi[i] { hi[i + W] } else { hi[i] };
        }
    }
    let (mut lo, mut hi) = (*row, *row);
    fold::<8>(&mut lo, &mut hi);
    fold::<4>(&mut lo, &mut hi);
    fold::<2>(&mut lo, &mut hi);
    fold::<1>(&mut lo, &mut hi);
    (lo[0], hi[0])
}

/// A lookup table quantized to u8 for fast-scan, with the map back to float scores.
///
/// `table[j * 16 + c] = round((s[j][c] - min_j) / delta)`, where `s` is the float table of
/// scores to maximise, `min_j` the smallest entry of sub-quantizer `j`, and `delta` the widest
/// per-sub-quantizer range over 255. A u16 sum `t` of table bytes maps back to the float score
/// `bias + delta * t` with `bias = sum_j min_j`; the rounding error is at most `m * delta / 2`.
/// Padding sub-quantizers (`m <= j < m2`) have all-zero rows.
#[derive(Clone, Debug, PartialEq)]
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
        debug_assert_eq!(scores.len(), m * 16);
        let mut mins = Vec::with_capacity(m);
        let mut span = 0.0f32;
        for row in scores.chunks_exact(16) {
            let (lo, hi) = min_max16(row.try_into().expect("16 wide"));
            mins.push(lo);
            span = span.max(hi - lo);
        }
        let delta = if span > 0.0 { span / 255.0 } else { 1.0 };
        let inv = 1.0 / delta;
        let mut table = vec![0u8; m2 * 16];
        for ((row, out), &lo) in scores
            .chunks_exact(16)
            .zip(table.chunks_exact_mut(16))
            .zip(&mins)
        {
            for (o, &v) in out.iter_mut().zip(row) {
                // Round half up (truncation of x + 0.5 >= 0); through i32 and an integer
                // clamp (same result as a saturating `as u8`, NaN to 0) the loop vectorises.
                *o = (((v - lo) * inv + 0.5) as i32).clamp(0, 255) as u8;
            }
        }
        let bias = mins.iter().map(|&v| v as f64).sum::<f64>() as f32;
        QuantizedLut { table, delta, bias }
    }

    /// The float score of a u16 sum.
    #[inline(always)]
    pub fn score(&self, sum: u16) -> f32 {
        self.bias + self.delta * sum as f32
    }
}
