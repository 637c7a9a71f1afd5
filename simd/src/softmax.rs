//! Softmax weights of fast-scan scores through a table, for the attention client.
//!
//! A query head's u16 fast-scan sums map to unnormalised softmax weights through a small
//! table: `w(v) = table[idx(v)]` with `idx(v) = v - lo + 1` for `v >= lo` and `0` below (the
//! caller puts `exp(step * (v - hi))` at `v - lo + 1` and `0.0` at index 0), the index capped
//! at `table.len() - 1`. Two kernels:
//!
//! * [`SoftmaxKernel::weight_sum`]: `sum_i w(row[i])`, the normaliser. Summed in 8 lanes
//!   (`lane = i % 8`), the lanes combined as `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`:
//!   every level adds in this order, so every level returns the same bits.
//! * [`SoftmaxKernel::accumulate`]: `acc[i] = acc[i] + w(row[i]) * factor` (sum over the
//!   group's heads) or `max(acc[i], w(row[i]) * factor)` (max): one multiplication and one
//!   addition or maximum per element, identical on every level.
//!
//! AVX2 widens 8 sums to i32, builds the indices with integer max / min, and gathers the
//! weights (`vgatherdps`); the index cap means a gather never reads outside the table.

use crate::level::Level;

type SumFn = fn(&[u16], u16, &[f32]) -> f32;
type AccFn = fn(&[u16], u16, &[f32], f32, &mut [f32], bool);

/// A resolved softmax-weight kernel.
#[derive(Clone, Copy)]
pub struct SoftmaxKernel {
    level: Level,
    sum: SumFn,
    acc: AccFn,
}

impl std::fmt::Debug for SoftmaxKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftmaxKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl SoftmaxKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> SoftmaxKernel {
        let level = level.capped();
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::V3 | Level::V4 | Level::V4Icl => SoftmaxKernel {
                level: Level::V3,
                sum: x86::weight_sum_v3,
                acc: x86::accumulate_v3,
            },
            _ => SoftmaxKernel {
                level: Level::Scalar,
                sum: weight_sum_scalar,
                acc: accumulate_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> SoftmaxKernel {
        SoftmaxKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// `sum_i w(row[i])` (see the module doc). Panics if `table` is empty.
    pub fn weight_sum(&self, row: &[u16], lo: u16, table: &[f32]) -> f32 {
        assert!(!table.is_empty(), "weight_sum: empty table");
        (self.sum)(row, lo, table)
    }

    /// `acc[i] = acc[i] + w(row[i]) * factor`, or the maximum of the two if `max`. Panics if
    /// the lengths differ or `table` is empty.
    pub fn accumulate(
        &self,
        row: &[u16],
        lo: u16,
        table: &[f32],
        factor: f32,
        acc: &mut [f32],
        max: bool,
    ) {
        assert!(
            !table.is_empty() && row.len() == acc.len(),
            "accumulate: shapes disagree"
        );
        (self.acc)(row, lo, table, factor, acc, max)
    }
}

#[inline(always)]
fn index(v: u16, lo: u16, cap: usize) -> usize {
    if v >= lo {
        ((v - lo) as usize + 1).min(cap)
    } else {
        0
    }
}

#[inline(always)]
fn combine_lanes(l: &[f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// Scalar reference of [`SoftmaxKernel::weight_sum`].
pub fn weight_sum_scalar(row: &[u16], lo: u16, table: &[f32]) -> f32 {
    let cap = table.len() - 1;
    let mut lanes = [0.0f32; 8];
    for (i, &v) in row.iter().enumerate() {
        lanes[i % 8] += table[index(v, lo, cap)];
    }
    combine_lanes(&lanes)
}

/// Scalar reference of [`SoftmaxKernel::accumulate`].
pub fn accumulate_scalar(
    row: &[u16],
    lo: u16,
    table: &[f32],
    factor: f32,
    acc: &mut [f32],
    max: bool,
) {
    let cap = table.len() - 1;
    for (a, &v) in acc.iter_mut().zip(row) {
        let w = table[index(v, lo, cap)] * factor;
        *a = if max {
            if w > *a {
                w
            } else {
                *a
            }
        } else {
            *a + w
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Gathered weights of 8 sums at `p`.
    ///
    /// # Safety
    /// AVX2 enabled; `p` readable for 8 u16; `table` has `cap + 1` floats.
    #[inline(always)]
    unsafe fn weights8(p: *const u16, lo1: __m256i, cap: __m256i, table: *const f32) -> __m256 {
        // SAFETY: as stated; every index is clamped to 0..=cap.
        unsafe {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            // v - lo + 1, negative (below lo) -> 0, capped.
            let idx = _mm256_sub_epi32(v, lo1);
            let idx = _mm256_min_epi32(_mm256_max_epi32(idx, _mm256_setzero_si256()), cap);
            _mm256_i32gather_ps::<4>(table, idx)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn weight_sum_v3_imp(row: &[u16], lo: u16, table: &[f32]) -> f32 {
        let n = row.len();
        let full = n / 8 * 8;
        let capn = table.len() - 1;
        // SAFETY: loads read row[i .. i + 8] with i + 8 <= n; gathers stay in the table.
        unsafe {
            let lo1 = _mm256_set1_epi32(lo as i32 - 1);
            let cap = _mm256_set1_epi32(capn as i32);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < full {
                acc = _mm256_add_ps(acc, weights8(row.as_ptr().add(i), lo1, cap, table.as_ptr()));
                i += 8;
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for (j, &v) in row[full..].iter().enumerate() {
                lanes[j] += table[super::index(v, lo, capn)];
            }
            super::combine_lanes(&lanes)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_v3_imp(
        row: &[u16],
        lo: u16,
        table: &[f32],
        factor: f32,
        acc: &mut [f32],
        max: bool,
    ) {
        let n = row.len();
        let full = n / 8 * 8;
        let capn = table.len() - 1;
        // SAFETY: row and acc have n elements (checked by the caller); full blocks only.
        unsafe {
            let lo1 = _mm256_set1_epi32(lo as i32 - 1);
            let cap = _mm256_set1_epi32(capn as i32);
            let f = _mm256_set1_ps(factor);
            let mut i = 0;
            while i < full {
                let w = _mm256_mul_ps(weights8(row.as_ptr().add(i), lo1, cap, table.as_ptr()), f);
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                // max(w, a) picks a when equal or NaN, as the scalar `if w > a`.
                let r = if max {
                    _mm256_max_ps(w, a)
                } else {
                    _mm256_add_ps(a, w)
                };
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), r);
                i += 8;
            }
        }
        super::accumulate_scalar(&row[full..], lo, table, factor, &mut acc[full..], max);
    }

    pub(super) fn weight_sum_v3(row: &[u16], lo: u16, table: &[f32]) -> f32 {
        // SAFETY: only reachable through a kernel built for V3 or V4, which the CPU supports.
        unsafe { weight_sum_v3_imp(row, lo, table) }
    }

    pub(super) fn accumulate_v3(
        row: &[u16],
        lo: u16,
        table: &[f32],
        factor: f32,
        acc: &mut [f32],
        max: bool,
    ) {
        // SAFETY: as above; lengths checked by SoftmaxKernel::accumulate.
        unsafe { accumulate_v3_imp(row, lo, table, factor, acc, max) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(8);
        for n in [0usize, 1, 7, 8, 9, 31, 64, 1000] {
            for (lo, tlen) in [(0u16, 1usize), (100, 50), (0, 70_000), (60_000, 3)] {
                let row: Vec<u16> = (0..n).map(|_| rng.random_range(0..=u16::MAX)).collect();
                let mut table: Vec<f32> = (0..tlen).map(|_| rng.random_range(0.0..1.0)).collect();
                table[0] = 0.0;
                let want = weight_sum_scalar(&row, lo, &table);
                let init: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..0.5)).collect();
                for max in [false, true] {
                    let mut a_want = init.clone();
                    accumulate_scalar(&row, lo, &table, 0.75, &mut a_want, max);
                    for level in Level::all_supported() {
                        let k = SoftmaxKernel::for_level(level);
                        assert_eq!(
                            k.weight_sum(&row, lo, &table).to_bits(),
                            want.to_bits(),
                            "{level} n {n}"
                        );
                        let mut a = init.clone();
                        k.accumulate(&row, lo, &table, 0.75, &mut a, max);
                        assert_eq!(a, a_want, "{level} n {n} max {max}");
                    }
                }
            }
        }
    }

    #[test]
    fn weights_follow_the_index_rule() {
        // Below lo: index 0 (weight 0); lo -> 1; beyond the table: the last entry.
        let table = [0.0, 1.0, 2.0, 4.0];
        for level in Level::all_supported() {
            let k = SoftmaxKernel::for_level(level);
            assert_eq!(
                k.weight_sum(&[9, 10, 11, 12, 500], 10, &table),
                0.0 + 1.0 + 2.0 + 4.0 + 4.0
            );
        }
    }
}
