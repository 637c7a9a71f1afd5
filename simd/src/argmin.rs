//! Nearest-centroid selection from GEMM output: `argmin_j (norms[j] - 2 * dots[j])`.
//!
//! k-means assignment and PQ encoding compute `dots = x · Cᵀ` for a block of points with one
//! GEMM; this kernel finishes each row: the index of the smallest `||c_j||² - 2 x·c_j` (the
//! squared distance minus the constant `||x||²`), ties to the smaller index, and that value.
//!
//! `2 * dots[j]` is exact in binary floating point, so every level computes the same value
//! `norms[j] - 2 * dots[j]` with one rounding, and the selected index and value match the
//! scalar reference bit for bit. NaN values are never selected (comparisons with NaN are false).

use crate::level::Level;

/// A resolved argmin kernel.
#[derive(Clone, Copy)]
pub struct NearestKernel {
    level: Level,
    nearest: fn(&[f32], &[f32]) -> (u32, f32),
}

impl std::fmt::Debug for NearestKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearestKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl NearestKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> NearestKernel {
        let level = level.capped();
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::V4 | Level::V4Icl => NearestKernel {
                level,
                nearest: x86::nearest_v4,
            },
            _ => NearestKernel {
                level: Level::Scalar,
                nearest: nearest_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> NearestKernel {
        NearestKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// `(j, norms[j] - 2 * dots[j])` minimising the value, smallest `j` on ties;
    /// `(0, +inf)` if empty or all NaN. Panics if the lengths differ.
    #[inline]
    pub fn nearest(&self, dots: &[f32], norms: &[f32]) -> (u32, f32) {
        assert_eq!(dots.len(), norms.len(), "nearest: length mismatch");
        (self.nearest)(dots, norms)
    }
}

/// Scalar reference of [`NearestKernel::nearest`].
pub fn nearest_scalar(dots: &[f32], norms: &[f32]) -> (u32, f32) {
    let (mut best, mut best_j) = (f32::INFINITY, 0u32);
    for (j, (&dot, &cn)) in dots.iter().zip(norms).enumerate() {
        let v = cn - (dot + dot);
        if v < best {
            best = v;
            best_j = j as u32;
        }
    }
    (best_j, best)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn nearest_v4_imp(dots: &[f32], norms: &[f32]) -> (u32, f32) {
        let n = dots.len().min(norms.len());
        let (pd, pn) = (dots.as_ptr(), norms.as_ptr());
        // SAFETY: full loads read indices < n; the masked tail reads only the rest.
        // Two independent (value, index) accumulators break the compare/blend dependency
        // chain; each keeps, per lane, the first minimum it saw.
        unsafe {
            let (mut best0, mut best1) =
                (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::INFINITY));
            let (mut idx0, mut idx1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let step = _mm512_set1_epi32(16);
            let mut i = 0;
            while i + 32 <= n {
                let d0 = _mm512_loadu_ps(pd.add(i));
                let d1 = _mm512_loadu_ps(pd.add(i + 16));
                let v0 = _mm512_sub_ps(_mm512_loadu_ps(pn.add(i)), _mm512_add_ps(d0, d0));
                let v1 = _mm512_sub_ps(_mm512_loadu_ps(pn.add(i + 16)), _mm512_add_ps(d1, d1));
                let lt0 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v0, best0);
                let lt1 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v1, best1);
                best0 = _mm512_mask_mov_ps(best0, lt0, v0);
                idx0 = _mm512_mask_mov_epi32(idx0, lt0, idx);
                let idx_next = _mm512_add_epi32(idx, step);
                best1 = _mm512_mask_mov_ps(best1, lt1, v1);
                idx1 = _mm512_mask_mov_epi32(idx1, lt1, idx_next);
                idx = _mm512_add_epi32(idx_next, step);
                i += 32;
            }
            while i < n {
                let left = (n - i).min(16);
                let mask: u16 = ((1u32 << left) - 1) as u16;
                let d = _mm512_maskz_loadu_ps(mask, pd.add(i));
                let v = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pn.add(i)), _mm512_add_ps(d, d));
                let lt = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(mask, v, best0);
                best0 = _mm512_mask_mov_ps(best0, lt, v);
                idx0 = _mm512_mask_mov_epi32(idx0, lt, idx);
                idx = _mm512_add_epi32(idx, step);
                i += left;
            }
            let best = [best0, best1];
            let best_idx = [idx0, idx1];
            // Merge the accumulators lane-wise by (value, index).
            let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(best[1], best[0]);
            let eq = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(best[1], best[0])
                & _mm512_cmplt_epu32_mask(best_idx[1], best_idx[0]);
            let take = lt | eq;
            let vals = _mm512_mask_mov_ps(best[0], take, best[1]);
            let ids = _mm512_mask_mov_epi32(best_idx[0], take, best_idx[1]);
            // Across lanes: the smallest value, then the smallest index among lanes holding it.
            let bv = _mm512_reduce_min_ps(vals);
            if bv == f32::INFINITY || bv.is_nan() {
                return super::nearest_scalar(dots, norms);
            }
            let at_min = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(vals, _mm512_set1_ps(bv));
            let bj = _mm512_mask_reduce_min_epu32(at_min, ids);
            (bj, bv)
        }
    }

    pub(super) fn nearest_v4(dots: &[f32], norms: &[f32]) -> (u32, f32) {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports.
        unsafe { nearest_v4_imp(dots, norms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(21);
        for len in 0..=257 {
            for trial in 0..4 {
                // Trial 0..1: continuous values; 2..3: few distinct values, many ties.
                let gen = |rng: &mut StdRng| -> f32 {
                    if trial < 2 {
                        rng.random_range(-5.0..5.0)
                    } else {
                        rng.random_range(0..3) as f32
                    }
                };
                let dots: Vec<f32> = (0..len + 1).map(|_| gen(&mut rng)).collect();
                let norms: Vec<f32> = (0..len + 1).map(|_| gen(&mut rng)).collect();
                // Unaligned start.
                let (d, nrm) = (&dots[1..], &norms[1..]);
                let want = nearest_scalar(d, nrm);
                for level in Level::all_supported() {
                    let got = NearestKernel::for_level(level).nearest(d, nrm);
                    assert_eq!(got.0, want.0, "level {level} len {len}");
                    assert_eq!(got.1.to_bits(), want.1.to_bits(), "level {level} len {len}");
                }
            }
        }
    }

    #[test]
    fn nan_is_never_chosen() {
        let dots = [f32::NAN, 1.0, f32::NAN];
        let norms = [0.0, 0.0, 0.0];
        for level in Level::all_supported() {
            assert_eq!(
                NearestKernel::for_level(level).nearest(&dots, &norms),
                (1, -2.0)
            );
        }
    }
}
