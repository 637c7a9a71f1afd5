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
            for (t, &qt) in qj.iter().enumerate() {
                let col = &self.centroids_t[(j * dsub + t) * ksub..(j * dsub + t + 1) * ksub];
                kernels.axpy(alpha * qt, col, row);
            }
            if metric == Metric::L2 {
                row.iter_mut().for_each(|v| *v = (*v + base).max(0.0));
            }
        }
    }
}
