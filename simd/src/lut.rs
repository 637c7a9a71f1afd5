//! Quantization of fast-scan lookup tables: float rows of 16 entries to u8.
//!
//! Input: `m` rows of 16 floats (scores to maximise), row-major. Two passes:
//!
//! 1. per row `j`: `min_j` and `max_j`; `span = max_j (max_j - min_j)`;
//!    `delta = span / 255` (1 if the span is 0), `inv = 1 / delta`.
//! 2. `table[j][c] = clamp(trunc((s[j][c] - min_j) * inv + 0.5), 0, 255)` (round half up).
//!
//! [`LutKernel::quantize_residual`] quantizes the rows `2 * dots - pre` without writing them
//! out (the IVF tables of L2 search with residuals, one per probed list): `2 * d` is exact, so
//! the fused multiply-subtract rounds once per element, as `2.0 * d - p` does.
//!
//! Every level does the same operations in the same order per element (a subtraction, a
//! multiplication and an addition, each rounded; no fused multiply-add there), and min / max
//! are exact, so every level matches the scalar reference bit for bit. Rows must be finite
//! (the callers check their queries); a NaN entry gives 0.

use crate::level::Level;

type QuantizeFn = fn(&[f32], &mut [f32], &mut [u8]) -> f32;
type ResidualFn = fn(&[f32], &[f32], &mut [f32], &mut [u8]) -> f32;

/// A resolved table-quantization kernel.
#[derive(Clone, Copy)]
pub struct LutKernel {
    level: Level,
    quantize: QuantizeFn,
    residual: ResidualFn,
}

impl std::fmt::Debug for LutKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LutKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl LutKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> LutKernel {
        let level = level.capped();
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::V4 | Level::V4Icl => LutKernel {
                level: Level::V4,
                quantize: x86::quantize_v4,
                residual: x86::quantize_residual_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => LutKernel {
                level: Level::V3,
                quantize: x86::quantize_v3,
                residual: x86::quantize_residual_v3,
            },
            _ => LutKernel {
                level: Level::Scalar,
                quantize: quantize_scalar,
                residual: quantize_residual_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> LutKernel {
        LutKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Quantizes `scores` (`m * 16`) into the first `m * 16` bytes of `table`, writes each
    /// row's minimum into `mins` (`m`), and returns `delta`. Panics if the lengths disagree.
    pub fn quantize(&self, scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
        assert!(
            scores.len().is_multiple_of(16)
                && mins.len() == scores.len() / 16
                && table.len() >= scores.len(),
            "quantize: shapes disagree"
        );
        (self.quantize)(scores, mins, table)
    }
}

impl LutKernel {
    /// [`LutKernel::quantize`] of the rows `2 * dots - pre` (both `m * 16`), computed on the
    /// fly. Panics if the lengths disagree.
    pub fn quantize_residual(
        &self,
        dots: &[f32],
        pre: &[f32],
        mins: &mut [f32],
        table: &mut [u8],
    ) -> f32 {
        assert!(
            dots.len() == pre.len()
                && dots.len().is_multiple_of(16)
                && mins.len() == dots.len() / 16
                && table.len() >= dots.len(),
            "quantize_residual: shapes disagree"
        );
        (self.residual)(dots, pre, mins, table)
    }
}

/// Scalar reference of [`LutKernel::quantize_residual`]: the rows, then [`quantize_scalar`].
pub fn quantize_residual_scalar(
    dots: &[f32],
    pre: &[f32],
    mins: &mut [f32],
    table: &mut [u8],
) -> f32 {
    let scores: Vec<f32> = dots.iter().zip(pre).map(|(&d, &p)| 2.0 * d - p).collect();
    quantize_scalar(&scores, mins, table)
}

#[inline(always)]
fn delta_of(span: f32) -> f32 {
    if span > 0.0 {
        span / 255.0
    } else {
        1.0
    }
}

/// Scalar reference of [`LutKernel::quantize`].
pub fn quantize_scalar(scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
    let mut span = 0.0f32;
    for (row, lo_out) in scores.chunks_exact(16).zip(mins.iter_mut()) {
        let (mut lo, mut hi) = (row[0], row[0]);
        for &v in &row[1..] {
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
        }
        *lo_out = lo;
        let s = hi - lo;
        span = if s > span { s } else { span };
    }
    let delta = delta_of(span);
    let inv = 1.0 / delta;
    for ((row, out), &lo) in scores
        .chunks_exact(16)
        .zip(table.chunks_exact_mut(16))
        .zip(mins.iter())
    {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (((v - lo) * inv + 0.5) as i32).clamp(0, 255) as u8;
        }
    }
    delta
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Horizontal min and max of 16 floats held as two halves.
    #[inline(always)]
    unsafe fn min_max(a: __m256, b: __m256) -> (f32, f32) {
        // SAFETY (caller): AVX2 is enabled.
        unsafe {
            let mut lo = _mm256_min_ps(a, b);
            let mut hi = _mm256_max_ps(a, b);
            lo = _mm256_min_ps(lo, _mm256_permute2f128_ps::<1>(lo, lo));
            hi = _mm256_max_ps(hi, _mm256_permute2f128_ps::<1>(hi, hi));
            lo = _mm256_min_ps(lo, _mm256_shuffle_ps::<0b01_00_11_10>(lo, lo));
            hi = _mm256_max_ps(hi, _mm256_shuffle_ps::<0b01_00_11_10>(hi, hi));
            lo = _mm256_min_ps(lo, _mm256_shuffle_ps::<0b10_11_00_01>(lo, lo));
            hi = _mm256_max_ps(hi, _mm256_shuffle_ps::<0b10_11_00_01>(hi, hi));
            (_mm256_cvtss_f32(lo), _mm256_cvtss_f32(hi))
        }
    }

    /// 8 quantized values as i32 lanes: `clamp(trunc((v - lo) * inv + 0.5), 0, 255)`.
    #[inline(always)]
    unsafe fn quant8(v: __m256, lo: __m256, inv: __m256, half: __m256, top: __m256) -> __m256i {
        // SAFETY (caller): AVX2 is enabled.
        unsafe {
            let x = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, lo), inv), half);
            // max(x, 0) returns 0 for NaN (the second operand), as the scalar cast does; the
            // float clamp before truncation equals the scalar integer clamp after it.
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), top);
            _mm256_cvttps_epi32(x)
        }
    }

    /// Where the rows come from: a float table, or `2 * dots - pre` computed in registers.
    #[derive(Clone, Copy)]
    enum Rows {
        Plain(*const f32),
        Residual(*const f32, *const f32),
    }

    impl Rows {
        /// Row `j` as two halves of 8.
        ///
        /// # Safety
        /// AVX2 available; the pointers readable for row `j`.
        #[inline(always)]
        unsafe fn row8(self, j: usize) -> (__m256, __m256) {
            // SAFETY: as stated.
            unsafe {
                match self {
                    Rows::Plain(p) => (
                        _mm256_loadu_ps(p.add(16 * j)),
                        _mm256_loadu_ps(p.add(16 * j + 8)),
                    ),
                    Rows::Residual(d, p) => {
                        let two = _mm256_set1_ps(2.0);
                        let f = |o: usize| {
                            _mm256_sub_ps(
                                _mm256_mul_ps(two, _mm256_loadu_ps(d.add(o))),
                                _mm256_loadu_ps(p.add(o)),
                            )
                        };
                        (f(16 * j), f(16 * j + 8))
                    }
                }
            }
        }

        /// Row `j` as one register.
        ///
        /// # Safety
        /// AVX-512F available; the pointers readable for row `j`.
        #[inline(always)]
        unsafe fn row16(self, j: usize) -> __m512 {
            // SAFETY: as stated.
            unsafe {
                match self {
                    Rows::Plain(p) => _mm512_loadu_ps(p.add(16 * j)),
                    // One rounding, as the scalar's `2.0 * d - p`: 2 d is exact.
                    Rows::Residual(d, p) => _mm512_fmsub_ps(
                        _mm512_set1_ps(2.0),
                        _mm512_loadu_ps(d.add(16 * j)),
                        _mm512_loadu_ps(p.add(16 * j)),
                    ),
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_v3_imp(rows: Rows, mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: the callers checked that rows 0..m = mins.len() are readable and that
        // table holds 16 m bytes; row j's stores write table[16 j .. 16 j + 16].
        unsafe {
            let mut span = 0.0f32;
            for (j, lo_out) in mins.iter_mut().enumerate() {
                let (a, b) = rows.row8(j);
                let (lo, hi) = min_max(a, b);
                *lo_out = lo;
                let s = hi - lo;
                span = if s > span { s } else { span };
            }
            let delta = super::delta_of(span);
            let inv = _mm256_set1_ps(1.0 / delta);
            let half = _mm256_set1_ps(0.5);
            let top = _mm256_set1_ps(255.0);
            let out = table.as_mut_ptr();
            for (j, &lo) in mins.iter().enumerate() {
                let lo = _mm256_set1_ps(lo);
                let (a, b) = rows.row8(j);
                let q0 = quant8(a, lo, inv, half, top);
                let q1 = quant8(b, lo, inv, half, top);
                // i32 -> u16 -> u8 with unsigned saturation (values are already 0..=255);
                // packs interleave 128-bit lanes, the permute restores the order.
                let w = _mm256_packus_epi32(q0, q1);
                let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(w);
                let bytes =
                    _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
                _mm_storeu_si128(out.add(16 * j) as *mut __m128i, bytes);
            }
            delta
        }
    }

    /// `min(a, b)`, or `max(a, b)` if `MAX`.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn fold16<const MAX: bool>(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as stated.
        unsafe {
            if MAX {
                _mm512_max_ps(a, b)
            } else {
                _mm512_min_ps(a, b)
            }
        }
    }

    /// Level 2 of [`min_max16`]: quarter `q` of register `i` holds row `4i + q` (4 partials).
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn level2<const MAX: bool>(v: &[__m512; 8]) -> [__m512; 4] {
        // SAFETY: as stated.
        unsafe {
            let mut out = [_mm512_setzero_ps(); 4];
            for (i, o) in out.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                *o = fold16::<MAX>(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                );
            }
            out
        }
    }

    /// Level 3: in quarter `q` of register `i`, elements 0-1 hold row `8i + q`, 2-3 row
    /// `8i + 4 + q`.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn level3<const MAX: bool>(v: [__m512; 4]) -> [__m512; 2] {
        // SAFETY: as stated.
        unsafe {
            let mut out = [_mm512_setzero_ps(); 2];
            for (i, o) in out.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                *o = fold16::<MAX>(
                    _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                    _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
                );
            }
            out
        }
    }

    /// Level 4: element `e` of quarter `q` holds row `q + 4e`.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn level4<const MAX: bool>(v: [__m512; 2]) -> __m512 {
        // SAFETY: as stated.
        unsafe {
            fold16::<MAX>(
                _mm512_shuffle_ps::<0b10_00_10_00>(v[0], v[1]),
                _mm512_shuffle_ps::<0b11_01_11_01>(v[0], v[1]),
            )
        }
    }

    /// Per-row minima and maxima of 16 rows at once, by a transposing reduction: four levels
    /// of shuffles halve the partials per row while packing the rows together, so that 16
    /// rows cost about as many instructions as five reduced one by one. Min and max are exact,
    /// so the result is the scalar's whatever the order.
    ///
    /// # Safety
    /// AVX-512F available; rows `j0 .. j0 + 16` readable.
    #[inline(always)]
    unsafe fn min_max16(rows: Rows, j0: usize) -> (__m512, __m512) {
        // SAFETY: as stated.
        unsafe {
            // Plain loops, not `std::array::from_fn`: its closure is not always inlined, and
            // out of line it runs without the caller's target features, each intrinsic a call
            // (that made this table's quantisation 2x slower after an unrelated change).
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, row) in r.iter_mut().enumerate() {
                *row = rows.row16(j0 + i);
            }
            // Level 1: rows 2i and 2i + 1 share a register, 8 partials each (128-bit quarters
            // 0-1: row 2i, 2-3: row 2i + 1).
            let (mut lo1, mut hi1) = ([_mm512_setzero_ps(); 8], [_mm512_setzero_ps(); 8]);
            for i in 0..8 {
                let (a, b) = (r[2 * i], r[2 * i + 1]);
                let x = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
                let y = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
                lo1[i] = _mm512_min_ps(x, y);
                hi1[i] = _mm512_max_ps(x, y);
            }
            let lo = level4::<false>(level3::<false>(level2::<false>(&lo1)));
            let hi = level4::<true>(level3::<true>(level2::<true>(&hi1)));
            // Row r sits in lane 4 (r % 4) + r / 4.
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            (
                _mm512_permutexvar_ps(order, lo),
                _mm512_permutexvar_ps(order, hi),
            )
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn quantize_v4_imp(rows: Rows, mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: as in quantize_v3_imp; blocks of 16 rows read rows j0 .. j0 + 16 <= m.
        unsafe {
            let m = mins.len();
            let full = m / 16 * 16;
            let mut spans = _mm512_setzero_ps();
            let mut j0 = 0;
            while j0 < full {
                let (lo, hi) = min_max16(rows, j0);
                _mm512_storeu_ps(mins.as_mut_ptr().add(j0), lo);
                spans = _mm512_max_ps(spans, _mm512_sub_ps(hi, lo));
                j0 += 16;
            }
            let mut span = if full > 0 {
                _mm512_reduce_max_ps(spans)
            } else {
                0.0
            };
            for (j, lo_out) in mins.iter_mut().enumerate().skip(full) {
                let r = rows.row16(j);
                // The reductions are exact (min / max): any order gives the scalar's value.
                let (lo, hi) = (_mm512_reduce_min_ps(r), _mm512_reduce_max_ps(r));
                *lo_out = lo;
                let s = hi - lo;
                span = if s > span { s } else { span };
            }
            let delta = super::delta_of(span);
            let inv = _mm512_set1_ps(1.0 / delta);
            let half = _mm512_set1_ps(0.5);
            let top = _mm512_set1_ps(255.0);
            let out = table.as_mut_ptr();
            let x_of = |j: usize| {
                _mm512_add_ps(
                    _mm512_mul_ps(_mm512_sub_ps(rows.row16(j), _mm512_set1_ps(mins[j])), inv),
                    half,
                )
            };
            // Row j as 16 i32 lanes, at most 255, for the saturating packs below: x < 0 gives
            // a negative lane and NaN i32::MIN, which they turn into 0 as the scalar clamp
            // does, so only the clamp at 255 is needed (it keeps x < 2^31 and the lanes out of
            // the packs' signed 16-bit range). One instruction fewer per row: 7 % of a
            // Fashion-MNIST IVF batch at nprobe 32.
            let quant_packed = |j: usize| _mm512_cvttps_epi32(_mm512_min_ps(x_of(j), top));
            // Row j as 16 i32 lanes in 0..=255, for a truncating narrow: as quant8, max(x, 0)
            // gives 0 for NaN, then the clamp at 255 and truncation.
            let quant = |j: usize| {
                _mm512_cvttps_epi32(_mm512_min_ps(
                    _mm512_max_ps(x_of(j), _mm512_setzero_ps()),
                    top,
                ))
            };
            // Four rows per 64-byte store: the packs leave, in each 128-bit lane l, 4 bytes
            // of each row (elements 4l .. 4l + 4); the permute puts row r's 16 together.
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            let four = m / 4 * 4;
            let mut j = 0;
            while j < four {
                let w01 = _mm512_packus_epi32(quant_packed(j), quant_packed(j + 1));
                let w23 = _mm512_packus_epi32(quant_packed(j + 2), quant_packed(j + 3));
                let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(w01, w23));
                _mm512_storeu_si512(out.add(16 * j) as *mut __m512i, bytes);
                j += 4;
            }
            for j in four..m {
                let bytes = _mm512_cvtepi32_epi8(quant(j));
                _mm_storeu_si128(out.add(16 * j) as *mut __m128i, bytes);
            }
            delta
        }
    }

    pub(super) fn quantize_v3(scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: only reachable through a kernel built for V3, which the CPU supports;
        // shapes checked by LutKernel::quantize.
        unsafe { quantize_v3_imp(Rows::Plain(scores.as_ptr()), mins, table) }
    }

    pub(super) fn quantize_v4(scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports;
        // shapes checked by LutKernel::quantize.
        unsafe { quantize_v4_imp(Rows::Plain(scores.as_ptr()), mins, table) }
    }

    pub(super) fn quantize_residual_v3(
        dots: &[f32],
        pre: &[f32],
        mins: &mut [f32],
        table: &mut [u8],
    ) -> f32 {
        // SAFETY: as quantize_v3; shapes checked by LutKernel::quantize_residual.
        unsafe { quantize_v3_imp(Rows::Residual(dots.as_ptr(), pre.as_ptr()), mins, table) }
    }

    pub(super) fn quantize_residual_v4(
        dots: &[f32],
        pre: &[f32],
        mins: &mut [f32],
        table: &mut [u8],
    ) -> f32 {
        // SAFETY: as quantize_v4; shapes checked by LutKernel::quantize_residual.
        unsafe { quantize_v4_imp(Rows::Residual(dots.as_ptr(), pre.as_ptr()), mins, table) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(5);
        for m in [1usize, 2, 3, 16, 17, 64, 130] {
            for trial in 0..6 {
                let scores: Vec<f32> = (0..m * 16)
                    .map(|i| match trial {
                        0 => rng.random_range(-3.0..3.0),
                        1 => rng.random_range(-1e6..1e6),
                        2 => (i % 5) as f32, // many ties, exact halves
                        3 => 7.25,           // zero span
                        4 => rng.random_range(0..512) as f32 / 2.0, // x.5 boundaries
                        _ => rng.random_range(-1e-30..1e-30),
                    })
                    .collect();
                let (mut wm, mut wt) = (vec![0.0; m], vec![0u8; m * 16 + 16]);
                let wd = quantize_scalar(&scores, &mut wm, &mut wt);
                for level in Level::all_supported() {
                    let (mut gm, mut gt) = (vec![0.0; m], vec![0u8; m * 16 + 16]);
                    let gd = LutKernel::for_level(level).quantize(&scores, &mut gm, &mut gt);
                    assert_eq!(
                        gd.to_bits(),
                        wd.to_bits(),
                        "level {level} m {m} trial {trial}"
                    );
                    assert_eq!(gm, wm, "level {level} m {m} trial {trial}");
                    assert_eq!(gt, wt, "level {level} m {m} trial {trial}");
                }
                // The fused residual rows 2 d - p, against the reference.
                let pre: Vec<f32> = scores.iter().map(|v| v * 0.37 - 1.5).collect();
                let dots: Vec<f32> = scores.iter().rev().copied().collect();
                let (mut wm, mut wt) = (vec![0.0; m], vec![0u8; m * 16 + 16]);
                let wd = quantize_residual_scalar(&dots, &pre, &mut wm, &mut wt);
                for level in Level::all_supported() {
                    let (mut gm, mut gt) = (vec![0.0; m], vec![0u8; m * 16 + 16]);
                    let k = LutKernel::for_level(level);
                    let gd = k.quantize_residual(&dots, &pre, &mut gm, &mut gt);
                    assert_eq!(
                        gd.to_bits(),
                        wd.to_bits(),
                        "residual {level} m {m} trial {trial}"
                    );
                    assert_eq!(gm, wm, "residual {level} m {m} trial {trial}");
                    assert_eq!(gt, wt, "residual {level} m {m} trial {trial}");
                }
            }
        }
    }
}
