//! Quantization of fast-scan lookup tables: float rows of 16 entries to u8.
//!
//! Input: `m` rows of 16 floats (scores to maximise), row-major. Two passes:
//!
//! 1. per row `j`: `min_j` and `max_j`; `span = max_j (max_j - min_j)`;
//!    `delta = span / 255` (1 if the span is 0), `inv = 1 / delta`.
//! 2. `table[j][c] = clamp(trunc((s[j][c] - min_j) * inv + 0.5), 0, 255)` (round half up).
//!
//! [`LutKernel::quantize_residual_blocked`] quantizes the rows `2 * dots - pre` without
//! writing them out (the IVF tables of L2 search with residuals, one per query and probed
//! list): `2 * d` is exact, so the fused multiply-subtract rounds once per element, as
//! `2.0 * d - p` does. Its inputs are in a blocked layout ([`LutKernel::extend_blocked`]):
//! 16 rows to a block, entry `c` of the block's rows contiguous, so one register holds one
//! entry of 16 rows and the per-row minima and maxima are lane-wise, with no shuffles (a
//! row-major pass spent 3 shuffles a row on its transposing reductions). It also sums the
//! row minima ([`bias_of`]). The AVX-512 kernel's pass 1 keeps each entry less its row's
//! minimum in scratch (exactly the subtraction pass 2 would do), so pass 2 is a load, a
//! multiply-add and a conversion per register; a last block whose rows fit its first half is
//! done as one half of 8 rows (m 98: 251-262 to 212 ns a table, `cargo bench --bench pq --
//! ivf_tables`). [`LutKernel::dots_blocked`] makes the `dots` in that layout directly from a
//! codebook kept blocked ([`blocked_codebook`]): the query's values gathered per block, one
//! fused multiply-add per centroid coordinate (m 98, d 784: 0.62 us a query, against 0.95 for
//! the row-major table and its transpose).
//!
//! Every level does the same operations in the same order per element (a subtraction, a
//! multiplication and an addition, each rounded; the blocked kernel fuses the last two, one
//! instruction fewer per register, and its scalar reference uses `f32::mul_add`), and min /
//! max are exact, so every level matches its scalar reference bit for bit. Rows must be finite
//! (the callers check their queries); a NaN entry gives 0.

use crate::level::Level;

type QuantizeFn = fn(&[f32], &mut [f32], &mut [u8]) -> f32;
type BlockedFn = fn(&[f32], &[f32], &mut [f32], &mut [u8]) -> (f32, f32);
type ExtendFn = fn(&[f32], &mut Vec<f32>);
type DotsFn = fn(&[f32], usize, &[f32], &mut Vec<f32>);

/// A resolved table-quantization kernel.
#[derive(Clone, Copy)]
pub struct LutKernel {
    level: Level,
    quantize: QuantizeFn,
    blocked: BlockedFn,
    extend: ExtendFn,
    dots: DotsFn,
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
                blocked: x86::quantize_blocked_v4,
                extend: x86::extend_blocked_v4,
                dots: x86::dots_blocked_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => LutKernel {
                level: Level::V3,
                quantize: x86::quantize_v3,
                blocked: x86::quantize_blocked_v3,
                extend: extend_blocked_scalar,
                dots: x86::dots_blocked_v3,
            },
            _ => LutKernel {
                level: Level::Scalar,
                quantize: quantize_scalar,
                blocked: quantize_residual_blocked_scalar,
                extend: extend_blocked_scalar,
                dots: dots_blocked_scalar,
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

/// Rows per block of the blocked layout of [`LutKernel::quantize_residual_blocked`].
pub const BLOCK_ROWS: usize = 16;

/// Floats of `m` rows of 16 in the blocked layout: whole blocks of [`BLOCK_ROWS`] rows.
pub fn blocked_len(m: usize) -> usize {
    m.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * 16
}

/// Floats of the scratch of [`LutKernel::quantize_residual_blocked`] for inputs of `len`
/// floats (whole blocks): a minimum per row and the entries again.
pub fn blocked_scratch_len(len: usize) -> usize {
    len / 16 + len
}

/// Scalar [`LutKernel::extend_blocked`].
pub fn extend_blocked_scalar(rows: &[f32], out: &mut Vec<f32>) {
    let m = rows.len() / 16;
    let at = out.len();
    out.resize(at + blocked_len(m), 0.0);
    for (j, row) in rows.chunks_exact(16).enumerate() {
        let base = at + (j / BLOCK_ROWS) * BLOCK_ROWS * 16 + j % BLOCK_ROWS;
        for (c, &v) in row.iter().enumerate() {
            out[base + c * BLOCK_ROWS] = v;
        }
    }
}

/// A 16-centroid codebook in the layout of [`LutKernel::dots_blocked`]: `centroids_t` is
/// `m * dsub * 16` floats, sub-space `j`'s codebook transposed (`[j][t][c]`); the result holds
/// [`blocked_len`]`(m) * dsub` floats, coordinate `t` of centroid `c` of row `j` at
/// `((j / 16 * dsub + t) * 16 + c) * 16 + j % 16` (one register holds one coordinate of one
/// centroid for the 16 rows of a block), the padding rows zero.
pub fn blocked_codebook(centroids_t: &[f32], m: usize) -> Vec<f32> {
    let dsub = centroids_t.len() / (16 * m.max(1));
    let mut out = vec![0.0f32; blocked_len(m) * dsub];
    for j in 0..m {
        for t in 0..dsub {
            for c in 0..16 {
                out[((j / BLOCK_ROWS * dsub + t) * 16 + c) * BLOCK_ROWS + j % BLOCK_ROWS] =
                    centroids_t[(j * dsub + t) * 16 + c];
            }
        }
    }
    out
}

/// Scalar [`LutKernel::dots_blocked`]: `acc = fma(q_t, c_t, acc)` from 0 in `t` order.
pub fn dots_blocked_scalar(q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
    let dsub = q.len() / m;
    let at = out.len();
    out.resize(at + blocked_len(m), 0.0);
    let out = &mut out[at..];
    for j in 0..m {
        let (b, jj) = (j / BLOCK_ROWS, j % BLOCK_ROWS);
        for t in 0..dsub {
            let qt = q[j * dsub + t];
            for c in 0..16 {
                let o = b * 256 + c * 16 + jj;
                // A fused multiply-add: one rounding (f32::mul_add is exact on every target).
                out[o] = qt.mul_add(codebook[((b * dsub + t) * 16 + c) * 16 + jj], out[o]);
            }
        }
    }
}

/// The sum of a table's row minima, as the offset of its scores: in f64, over 16 lanes
/// (`lane = j % 16`, rows in order), folded `lane[i] += lane[i + w]` for `w` = 8, 4, 2, 1,
/// then rounded once to f32. The blocked kernels sum in this order, one register lane per
/// row of a block.
pub fn bias_of(mins: &[f32]) -> f32 {
    let mut lanes = [0.0f64; 16];
    for (i, &v) in mins.iter().enumerate() {
        lanes[i % 16] += f64::from(v);
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0] as f32
}

impl LutKernel {
    /// Appends `rows` (row-major, `m * 16`) to `out` in the blocked layout of
    /// [`LutKernel::quantize_residual_blocked`], [`blocked_len`]`(m)` floats: row `j`, entry
    /// `c` at `(j / 16) * 256 + c * 16 + j % 16`, the padding rows zero. Panics unless `rows`
    /// holds whole rows.
    pub fn extend_blocked(&self, rows: &[f32], out: &mut Vec<f32>) {
        assert!(rows.len().is_multiple_of(16), "extend_blocked: partial row");
        (self.extend)(rows, out)
    }

    /// The inner products of `q` (`m * dsub`) with every centroid of a 16-centroid codebook
    /// ([`blocked_codebook`]), appended to `out` ([`blocked_len`]`(m)` floats) in the blocked
    /// layout of [`LutKernel::extend_blocked`], without making the row-major table: per block,
    /// lane `jj` of one register holds row `j0 + jj`'s coordinate `t` of the query (gathered,
    /// stride `dsub`), multiplied into the block's 16 centroid registers of coordinate `t`.
    /// Each entry is `acc = fma(q_t, c_t, acc)` from 0 in `t` order, one rounding per
    /// coordinate, at every level (bit for bit); `DistanceKernels::axpy_cols16`, which
    /// rounds the product and the sum apart, agrees to within those roundings. Panics if the
    /// shapes disagree.
    pub fn dots_blocked(&self, q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
        let dsub = q.len().checked_div(m).unwrap_or(0);
        // The gathers index a block's query values with i32 lanes: up to 16 * dsub.
        assert!(
            dsub > 0
                && q.len() == m * dsub
                && codebook.len() == blocked_len(m) * dsub
                && dsub <= i32::MAX as usize / 16,
            "dots_blocked: shapes disagree"
        );
        (self.dots)(q, m, codebook, out)
    }

    /// [`LutKernel::quantize`] of the rows `2 * dots - pre`, computed on the fly from both
    /// inputs in the blocked layout ([`LutKernel::extend_blocked`]): per block, entry `c` of
    /// its 16 rows is one register, so the row minima and maxima are lane-wise (no shuffles)
    /// and so is the quantization; the bytes are transposed back to rows on the way out.
    /// Writes the first `table.len() / 16` rows (whole rows, at most the blocks'), uses
    /// `scratch` ([`blocked_scratch_len`]: the row minima of the blocks first, one per row,
    /// then room for the AVX-512 kernel's pass 1 to keep every entry less its row's minimum,
    /// so that pass 2 reloads one value instead of recomputing it from two) and returns
    /// `(delta, bias)` with `bias` = [`bias_of`] of the minima. Rows past the table's must be
    /// zero in both inputs (as [`LutKernel::extend_blocked`] leaves them), so that they widen
    /// no span. Panics if the lengths disagree.
    pub fn quantize_residual_blocked(
        &self,
        dots: &[f32],
        pre: &[f32],
        scratch: &mut [f32],
        table: &mut [u8],
    ) -> (f32, f32) {
        assert!(
            dots.len() == pre.len()
                && dots.len().is_multiple_of(BLOCK_ROWS * 16)
                && scratch.len() == blocked_scratch_len(dots.len())
                && table.len().is_multiple_of(16)
                && table.len() <= dots.len(),
            "quantize_residual_blocked: shapes disagree"
        );
        (self.blocked)(dots, pre, scratch, table)
    }
}

/// Scalar reference of [`LutKernel::quantize_residual_blocked`]: the rows in row-major
/// order, pass 1 of [`quantize_scalar`] over all of the blocks' rows, pass 2 with one fused
/// multiply-add, `trunc(fma(s - min_j, inv, 0.5))` clamped, then [`bias_of`].
pub fn quantize_residual_blocked_scalar(
    dots: &[f32],
    pre: &[f32],
    scratch: &mut [f32],
    table: &mut [u8],
) -> (f32, f32) {
    let rows = dots.len() / 16;
    let mins = &mut scratch[..rows];
    let scores: Vec<f32> = (0..rows)
        .flat_map(|j| {
            let base = (j / BLOCK_ROWS) * BLOCK_ROWS * 16 + j % BLOCK_ROWS;
            (0..16).map(move |c| 2.0 * dots[base + c * BLOCK_ROWS] - pre[base + c * BLOCK_ROWS])
        })
        .collect();
    let delta = row_ranges(&scores, mins);
    let inv = 1.0 / delta;
    for ((row, out), &lo) in scores
        .chunks_exact(16)
        .zip(table.chunks_exact_mut(16))
        .zip(mins.iter())
    {
        for (o, &v) in out.iter_mut().zip(row) {
            // A fused multiply-add: one rounding (f32::mul_add is exact on every target).
            *o = ((v - lo).mul_add(inv, 0.5) as i32).clamp(0, 255) as u8;
        }
    }
    (delta, bias_of(mins))
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
    let delta = row_ranges(scores, mins);
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

/// Pass 1 of the quantization: each row's minimum into `mins`, and `delta`.
fn row_ranges(scores: &[f32], mins: &mut [f32]) -> f32 {
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
    delta_of(span)
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

    /// A float table of rows of 16.
    #[derive(Clone, Copy)]
    struct Rows(*const f32);

    impl Rows {
        /// Row `j` as two halves of 8.
        ///
        /// # Safety
        /// AVX available; row `j` readable.
        #[inline(always)]
        unsafe fn row8(self, j: usize) -> (__m256, __m256) {
            // SAFETY: as stated.
            unsafe {
                (
                    _mm256_loadu_ps(self.0.add(16 * j)),
                    _mm256_loadu_ps(self.0.add(16 * j + 8)),
                )
            }
        }

        /// Row `j` as one register.
        ///
        /// # Safety
        /// AVX-512F available; row `j` readable.
        #[inline(always)]
        unsafe fn row16(self, j: usize) -> __m512 {
            // SAFETY: as stated.
            unsafe { _mm512_loadu_ps(self.0.add(16 * j)) }
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
            // min(top, x), not min(x, top): vminps returns its second operand when one is
            // NaN, and a NaN x (0 times an infinite step) must reach the packs as NaN to give 0.
            let quant_packed = |j: usize| _mm512_cvttps_epi32(_mm512_min_ps(top, x_of(j)));
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

    /// Pairwise min (or max if `MAX`) of `N` registers, in place, down to `v[0]`.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn tree16<const MAX: bool>(v: &mut [__m512; 16]) -> __m512 {
        // SAFETY: as stated.
        unsafe {
            let mut w = 8;
            while w > 0 {
                for i in 0..w {
                    v[i] = fold16::<MAX>(v[i], v[i + w]);
                }
                w /= 2;
            }
            v[0]
        }
    }

    /// The 4x4 transpose of 4-byte (and of 32-bit) elements within each 16: position
    /// `4 r + i` takes `4 i + r`.
    const T4X4: [i8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    /// The blocked kernel (AVX-512): per block, register `c` holds entry `c` of its 16 rows.
    ///
    /// # Safety
    /// AVX-512F/BW available; shapes as checked by `quantize_residual_blocked`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn quantize_blocked_v4_imp(
        dots: &[f32],
        pre: &[f32],
        scratch: &mut [f32],
        table: &mut [u8],
    ) -> (f32, f32) {
        // SAFETY: dots and pre hold nb * 256 floats, scratch nb * 16 + nb * 256; the stores
        // write the rows below table.len() / 16 only (masked in the last group of four).
        unsafe {
            let nb = dots.len() / 256;
            let (mins, centered) = scratch.split_at_mut(nb * 16);
            let (d, p) = (dots.as_ptr(), pre.as_ptr());
            let rows = table.len() / 16;
            // A last block whose table rows all lie in its first half (m 98: 2 of 16) is
            // done as one half of 8 rows with the AVX2 kernel's steps (half the work: its
            // second half is padding, zero in both inputs, of span 0 and minimum 0).
            let short_tail = nb > 0 && rows <= 16 * (nb - 1) + 8;
            let full = nb - usize::from(short_tail);
            let two = _mm512_set1_ps(2.0);
            let mut spans = _mm512_setzero_ps();
            let (mut acc_lo, mut acc_hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for b in 0..full {
                let mut entries = [_mm512_setzero_ps(); 16];
                for (c, v) in entries.iter_mut().enumerate() {
                    // One rounding, as the scalar's `2.0 * d - p`: 2 d is exact.
                    let o = b * 256 + c * 16;
                    *v = _mm512_fmsub_ps(two, _mm512_loadu_ps(d.add(o)), _mm512_loadu_ps(p.add(o)));
                }
                let (mut lo, mut hi) = (entries, entries);
                let (lo, hi) = (tree16::<false>(&mut lo), tree16::<true>(&mut hi));
                for (c, &v) in entries.iter().enumerate() {
                    _mm512_storeu_ps(
                        centered.as_mut_ptr().add(b * 256 + c * 16),
                        _mm512_sub_ps(v, lo),
                    );
                }
                _mm512_storeu_ps(mins.as_mut_ptr().add(16 * b), lo);
                spans = _mm512_max_ps(spans, _mm512_sub_ps(hi, lo));
                acc_lo = _mm512_add_pd(acc_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(lo)));
                acc_hi = _mm512_add_pd(
                    acc_hi,
                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                        _mm512_castps_pd(lo),
                    ))),
                );
            }
            let mut tail_span = 0.0f32;
            let mut tail_lo = _mm256_setzero_ps();
            if short_tail {
                let (lo, hi) = half_min_max(d, p, full, 0);
                tail_lo = lo;
                _mm256_storeu_ps(mins.as_mut_ptr().add(16 * full), lo);
                _mm256_storeu_ps(mins.as_mut_ptr().add(16 * full + 8), _mm256_setzero_ps());
                tail_span = max8(_mm256_sub_ps(hi, lo));
                acc_lo = _mm512_add_pd(acc_lo, _mm512_cvtps_pd(lo));
                // The padding half's minima, +0 each, as bias_of adds them (a lane that
                // summed to -0 becomes +0).
                acc_hi = _mm512_add_pd(acc_hi, _mm512_setzero_pd());
            }
            // bias_of's fold: w = 8, then 4, 2, 1.
            let s8 = _mm512_add_pd(acc_lo, acc_hi);
            let s4 = _mm256_add_pd(_mm512_castpd512_pd256(s8), _mm512_extractf64x4_pd::<1>(s8));
            let s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd::<1>(s4));
            let s1 = _mm_add_sd(s2, _mm_unpackhi_pd(s2, s2));
            let bias = _mm_cvtsd_f64(s1) as f32;
            // Max is exact: any order gives the scalar's span.
            let span = _mm512_reduce_max_ps(spans);
            let span = if tail_span > span { tail_span } else { span };
            let delta = super::delta_of(span);
            let inv_s = 1.0 / delta;
            // Every x = (v - lo) inv + 0.5 is at most span inv + 0.5 (rounding is monotonic
            // and v - lo <= span): about 255.5 for any normal span. Below 2^15 the packs'
            // saturation is the clamp at 255, so the min is needed only for degenerate spans
            // (subnormal: infinite steps; infinite: NaN), where it keeps NaN as its result.
            let centered = &centered[..full * 256];
            if span * inv_s < 30_000.0 {
                write_blocked_v4::<true>(centered, inv_s, rows, table);
            } else {
                write_blocked_v4::<false>(centered, inv_s, rows, table);
            }
            if short_tail {
                let inv = _mm256_set1_ps(inv_s);
                half_write(d, p, full, 0, tail_lo, inv, rows, table.as_mut_ptr());
            }
            (delta, bias)
        }
    }

    /// Pass 2 of the blocked kernel: the centered entries `v - lo` (blocked) to the table's
    /// rows; `BOUNDED`: every `x` below 2^15 (no clamp needed before the packs).
    ///
    /// # Safety
    /// AVX-512F/BW available; `centered` holds whole blocks, at least `rows` rows.
    #[inline(always)]
    unsafe fn write_blocked_v4<const BOUNDED: bool>(
        centered: &[f32],
        inv_s: f32,
        rows: usize,
        table: &mut [u8],
    ) {
        // SAFETY: as stated; the stores write the rows below `rows` only.
        unsafe {
            let nb = centered.len() / 256;
            let inv = _mm512_set1_ps(inv_s);
            let half = _mm512_set1_ps(0.5);
            let top = _mm512_set1_ps(255.0);
            let t4 = _mm512_broadcast_i32x4(_mm_loadu_si128(T4X4.as_ptr() as *const __m128i));
            let t4d = _mm512_cvtepi8_epi32(_mm_loadu_si128(T4X4.as_ptr() as *const __m128i));
            let out = table.as_mut_ptr();
            let cp = centered.as_ptr();
            for b in 0..nb.min(rows.div_ceil(16)) {
                // Entry c of the block's rows as i32 lanes, at most 255, for the saturating
                // packs (negative x and NaN become 0 there, as the scalar clamp does).
                let q = |c: usize| {
                    let x = _mm512_fmadd_ps(_mm512_loadu_ps(cp.add(b * 256 + c * 16)), inv, half);
                    _mm512_cvttps_epi32(if BOUNDED { x } else { _mm512_min_ps(top, x) })
                };
                // packs: in 128-bit lane l, byte 4 i + r of bytes[g] is entry 4 g + i of row
                // 4 l + r.
                let mut bytes = [_mm512_setzero_si512(); 4];
                for (g, out) in bytes.iter_mut().enumerate() {
                    let w0 = _mm512_packus_epi32(q(4 * g), q(4 * g + 1));
                    let w1 = _mm512_packus_epi32(q(4 * g + 2), q(4 * g + 3));
                    *out = _mm512_packus_epi16(w0, w1);
                }
                // Lane transpose: lane g of rows4[l] is lane l of bytes[g].
                let t0 = _mm512_shuffle_i64x2::<0b01_00_01_00>(bytes[0], bytes[1]);
                let t1 = _mm512_shuffle_i64x2::<0b11_10_11_10>(bytes[0], bytes[1]);
                let t2 = _mm512_shuffle_i64x2::<0b01_00_01_00>(bytes[2], bytes[3]);
                let t3 = _mm512_shuffle_i64x2::<0b11_10_11_10>(bytes[2], bytes[3]);
                let rows4 = [
                    _mm512_shuffle_i64x2::<0b10_00_10_00>(t0, t2),
                    _mm512_shuffle_i64x2::<0b11_01_11_01>(t0, t2),
                    _mm512_shuffle_i64x2::<0b10_00_10_00>(t1, t3),
                    _mm512_shuffle_i64x2::<0b11_01_11_01>(t1, t3),
                ];
                for (l, &v) in rows4.iter().enumerate() {
                    // In lane g, dword r: entries 4 g .. 4 g + 4 of row r; then dword 4 r + g.
                    let v = _mm512_permutexvar_epi32(t4d, _mm512_shuffle_epi8(v, t4));
                    let row = 16 * b + 4 * l;
                    if row + 4 <= rows {
                        _mm512_storeu_si512(out.add(16 * row) as *mut __m512i, v);
                    } else if row < rows {
                        let mask = (1u64 << (16 * (rows - row))) - 1;
                        _mm512_mask_storeu_epi8(out.add(16 * row) as *mut i8, mask, v);
                    }
                }
            }
        }
    }

    /// [`super::LutKernel::extend_blocked`] (AVX-512): each block of 16 rows is a 16 x 16
    /// transpose in registers (unpacks, then 128-bit lane shuffles), the last block's missing
    /// rows zero.
    ///
    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn extend_blocked_v4_imp(rows: &[f32], out: &mut Vec<f32>) {
        // SAFETY: each load reads row jj < 16 of `block`, 256 floats.
        unsafe {
            let m = rows.len() / 16;
            out.reserve(super::blocked_len(m));
            for first in (0..m).step_by(16) {
                let real = (m - first).min(16);
                let mut padded = [0.0f32; 256];
                let block = if real == 16 {
                    &rows[first * 16..(first + 16) * 16]
                } else {
                    padded[..real * 16].copy_from_slice(&rows[first * 16..(first + real) * 16]);
                    &padded[..]
                };
                let mut r = [_mm512_setzero_ps(); 16];
                for (jj, v) in r.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(block.as_ptr().add(16 * jj));
                }
                // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved (low, high pairs per lane).
                let mut t = [_mm512_setzero_ps(); 16];
                for i in 0..8 {
                    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // u[4i + k], 128-bit lane l: entry 4 l + k of rows 4i .. 4i + 4.
                let mut u = [_mm512_setzero_ps(); 16];
                for i in 0..4 {
                    u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
                    u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
                    u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
                    u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
                }
                // Entry 4 l + k of the 16 rows: lane l of u[k], u[4 + k], u[8 + k], u[12 + k].
                let mut cols = [0.0f32; 256];
                for k in 0..4 {
                    let v0 = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
                    let v1 = _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]);
                    let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
                    let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]);
                    let base = cols.as_mut_ptr();
                    let at = |c: usize| base.add(16 * c);
                    _mm512_storeu_ps(at(k), _mm512_shuffle_f32x4::<0x88>(v0, w0));
                    _mm512_storeu_ps(at(4 + k), _mm512_shuffle_f32x4::<0x88>(v1, w1));
                    _mm512_storeu_ps(at(8 + k), _mm512_shuffle_f32x4::<0xDD>(v0, w0));
                    _mm512_storeu_ps(at(12 + k), _mm512_shuffle_f32x4::<0xDD>(v1, w1));
                }
                out.extend_from_slice(&cols);
            }
        }
    }

    /// [`super::LutKernel::dots_blocked`] (AVX-512): per block, 16 accumulators (one per
    /// centroid), and per coordinate one gather of the block's query values.
    ///
    /// # Safety
    /// AVX-512F available; shapes as checked by `dots_blocked`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn dots_blocked_v4_imp(q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
        // SAFETY: block b's gathers read q at (16 b + jj) * dsub + t for the rows jj that
        // exist (masked), below m * dsub = q.len(); the loads read codebook block b's
        // dsub * 256 floats; the stores write the nb * 256 floats reserved past out's
        // length, which then holds them.
        unsafe {
            let nb = m.div_ceil(16);
            let dsub = q.len() / m;
            out.reserve(nb * 256);
            let dst = out.as_mut_ptr().add(out.len());
            let lanes = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(dsub as i32),
            );
            for b in 0..nb {
                let rows = (m - 16 * b).min(16);
                let mask = ((1u32 << rows) - 1) as __mmask16;
                let qb = q.as_ptr().add(16 * b * dsub);
                let cb = codebook.as_ptr().add(b * dsub * 256);
                let mut acc = [_mm512_setzero_ps(); 16];
                for t in 0..dsub {
                    let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(t as i32));
                    let qt = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, qb);
                    for (c, a) in acc.iter_mut().enumerate() {
                        let col = _mm512_loadu_ps(cb.add((t * 16 + c) * 16));
                        *a = _mm512_fmadd_ps(qt, col, *a);
                    }
                }
                for (c, &a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(b * 256 + c * 16), a);
                }
            }
            out.set_len(out.len() + nb * 256);
        }
    }

    pub(super) fn dots_blocked_v4(q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports;
        // shapes checked by LutKernel::dots_blocked.
        unsafe { dots_blocked_v4_imp(q, m, codebook, out) }
    }

    /// [`super::LutKernel::dots_blocked`] (AVX2): as the AVX-512 kernel, each block as two
    /// halves of 8 rows.
    ///
    /// # Safety
    /// AVX2 available; shapes as checked by `dots_blocked`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_blocked_v3_imp(q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
        // SAFETY: as the AVX-512 kernel's, per half of 8 rows.
        unsafe {
            let nb = m.div_ceil(16);
            let dsub = q.len() / m;
            out.reserve(nb * 256);
            let dst = out.as_mut_ptr().add(out.len());
            let lanes = _mm256_mullo_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(dsub as i32),
            );
            for b in 0..nb {
                let cb = codebook.as_ptr().add(b * dsub * 256);
                for h in 0..2 {
                    let row0 = 16 * b + 8 * h;
                    let rows = m.saturating_sub(row0).min(8);
                    if rows == 0 {
                        for c in 0..16 {
                            let at = dst.add(b * 256 + c * 16 + 8 * h);
                            _mm256_storeu_ps(at, _mm256_setzero_ps());
                        }
                        continue;
                    }
                    // Lanes of the rows that exist: all bits set (the gather's mask is the
                    // sign bit of each lane).
                    let live = _mm256_cmpgt_epi32(
                        _mm256_set1_epi32(rows as i32),
                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    );
                    let qb = q.as_ptr().add(row0 * dsub);
                    let mut acc = [_mm256_setzero_ps(); 16];
                    for t in 0..dsub {
                        let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(t as i32));
                        let qt = _mm256_mask_i32gather_ps::<4>(
                            _mm256_setzero_ps(),
                            qb,
                            idx,
                            _mm256_castsi256_ps(live),
                        );
                        for (c, a) in acc.iter_mut().enumerate() {
                            let col = _mm256_loadu_ps(cb.add((t * 16 + c) * 16 + 8 * h));
                            *a = _mm256_fmadd_ps(qt, col, *a);
                        }
                    }
                    for (c, &a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(dst.add(b * 256 + c * 16 + 8 * h), a);
                    }
                }
            }
            out.set_len(out.len() + nb * 256);
        }
    }

    pub(super) fn dots_blocked_v3(q: &[f32], m: usize, codebook: &[f32], out: &mut Vec<f32>) {
        // SAFETY: only reachable through a kernel built for V3, which the CPU supports;
        // shapes checked by LutKernel::dots_blocked.
        unsafe { dots_blocked_v3_imp(q, m, codebook, out) }
    }

    pub(super) fn extend_blocked_v4(rows: &[f32], out: &mut Vec<f32>) {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports.
        unsafe { extend_blocked_v4_imp(rows, out) }
    }

    pub(super) fn quantize_blocked_v4(
        dots: &[f32],
        pre: &[f32],
        scratch: &mut [f32],
        table: &mut [u8],
    ) -> (f32, f32) {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports;
        // shapes checked by LutKernel::quantize_residual_blocked.
        unsafe { quantize_blocked_v4_imp(dots, pre, scratch, table) }
    }

    /// Pairwise min (or max if `MAX`) of 16 registers, in place, down to `v[0]`.
    ///
    /// # Safety
    /// AVX available.
    #[inline(always)]
    unsafe fn tree8<const MAX: bool>(v: &mut [__m256; 16]) -> __m256 {
        // SAFETY: as stated.
        unsafe {
            let mut w = 8;
            while w > 0 {
                for i in 0..w {
                    v[i] = if MAX {
                        _mm256_max_ps(v[i], v[i + w])
                    } else {
                        _mm256_min_ps(v[i], v[i + w])
                    };
                }
                w /= 2;
            }
            v[0]
        }
    }

    /// Entry `c` of the 8 rows of half `h` of block `b` of the blocked kernels' inputs; one
    /// rounding, as the scalar's `2.0 * d - p` (2 d is exact).
    ///
    /// # Safety
    /// AVX2 and FMA available; block `b` readable in both inputs.
    #[inline(always)]
    unsafe fn half_entry(d: *const f32, p: *const f32, b: usize, h: usize, c: usize) -> __m256 {
        // SAFETY: as stated.
        unsafe {
            let o = b * 256 + c * 16 + 8 * h;
            _mm256_fmsub_ps(
                _mm256_set1_ps(2.0),
                _mm256_loadu_ps(d.add(o)),
                _mm256_loadu_ps(p.add(o)),
            )
        }
    }

    /// Pass 1 of the blocked kernels on half `h` of block `b` (8 rows, one lane each): the
    /// rows' minima and maxima.
    ///
    /// # Safety
    /// As [`half_entry`].
    #[inline(always)]
    unsafe fn half_min_max(d: *const f32, p: *const f32, b: usize, h: usize) -> (__m256, __m256) {
        // SAFETY: as stated.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); 16];
            for (c, v) in lo.iter_mut().enumerate() {
                *v = half_entry(d, p, b, h, c);
            }
            let mut hi = lo;
            (tree8::<false>(&mut lo), tree8::<true>(&mut hi))
        }
    }

    /// Pass 2 of the blocked kernels on half `h` of block `b`: its rows below `rows` of the
    /// table, quantized with the rows' minima `lo` and the step's inverse `inv`.
    ///
    /// # Safety
    /// As [`half_entry`]; `out` holds `rows` rows of 16 bytes.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn half_write(
        d: *const f32,
        p: *const f32,
        b: usize,
        h: usize,
        lo: __m256,
        inv: __m256,
        rows: usize,
        out: *mut u8,
    ) {
        // SAFETY: as stated; every store is of a row below `rows`.
        unsafe {
            let row0 = 16 * b + 8 * h;
            let half = _mm256_set1_ps(0.5);
            let top = _mm256_set1_ps(255.0);
            let t4 = _mm256_broadcastsi128_si256(_mm_loadu_si128(T4X4.as_ptr() as *const __m128i));
            // (A loop, not a closure: a closure here would not inherit the caller's target
            // features, and its intrinsics would be calls.)
            let mut q = [_mm256_setzero_si256(); 16];
            for (c, v) in q.iter_mut().enumerate() {
                let x = _mm256_fmadd_ps(_mm256_sub_ps(half_entry(d, p, b, h, c), lo), inv, half);
                // As quant8: max(x, 0) gives 0 for NaN, then the clamp at 255.
                *v = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), top));
            }
            // In 128-bit lane l, byte 4 i + r of bytes[g] is entry 4 g + i of row
            // row0 + 4 l + r; after the in-lane transpose, dword r holds row
            // row0 + 4 l + r's entries 4 g .. 4 g + 4.
            let mut bytes = [_mm256_setzero_si256(); 4];
            for (g, out) in bytes.iter_mut().enumerate() {
                let w0 = _mm256_packus_epi32(q[4 * g], q[4 * g + 1]);
                let w1 = _mm256_packus_epi32(q[4 * g + 2], q[4 * g + 3]);
                *out = _mm256_shuffle_epi8(_mm256_packus_epi16(w0, w1), t4);
            }
            let u01lo = _mm256_unpacklo_epi32(bytes[0], bytes[1]);
            let u01hi = _mm256_unpackhi_epi32(bytes[0], bytes[1]);
            let u23lo = _mm256_unpacklo_epi32(bytes[2], bytes[3]);
            let u23hi = _mm256_unpackhi_epi32(bytes[2], bytes[3]);
            // Register r: row row0 + r in lane 0, row row0 + 4 + r in lane 1.
            let per_row = [
                _mm256_unpacklo_epi64(u01lo, u23lo),
                _mm256_unpackhi_epi64(u01lo, u23lo),
                _mm256_unpacklo_epi64(u01hi, u23hi),
                _mm256_unpackhi_epi64(u01hi, u23hi),
            ];
            for (r, &v) in per_row.iter().enumerate() {
                if row0 + r < rows {
                    let at = out.add(16 * (row0 + r)) as *mut __m128i;
                    _mm_storeu_si128(at, _mm256_castsi256_si128(v));
                }
                if row0 + 4 + r < rows {
                    let at = out.add(16 * (row0 + 4 + r)) as *mut __m128i;
                    _mm_storeu_si128(at, _mm256_extracti128_si256::<1>(v));
                }
            }
        }
    }

    /// The blocked kernel (AVX2): each block as two halves of 8 rows, register `c` of a half
    /// holding entry `c` of its rows ([`half_min_max`], [`half_write`]).
    ///
    /// # Safety
    /// AVX2 and FMA available; shapes as checked by `quantize_residual_blocked`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_blocked_v3_imp(
        dots: &[f32],
        pre: &[f32],
        scratch: &mut [f32],
        table: &mut [u8],
    ) -> (f32, f32) {
        // SAFETY: dots and pre hold nb * 256 floats, scratch nb * 272 (the minima in its
        // first nb * 16, the rest unused here); the stores write the rows below
        // table.len() / 16 only.
        unsafe {
            let nb = dots.len() / 256;
            let mins = &mut scratch[..nb * 16];
            let (d, p) = (dots.as_ptr(), pre.as_ptr());
            let mut spans = _mm256_setzero_ps();
            // acc[q]: rows 4 q .. 4 q + 4 of each block (bias_of's lanes).
            let mut acc = [_mm256_setzero_pd(); 4];
            for b in 0..nb {
                for h in 0..2 {
                    let (lo, hi) = half_min_max(d, p, b, h);
                    _mm256_storeu_ps(mins.as_mut_ptr().add(16 * b + 8 * h), lo);
                    spans = _mm256_max_ps(spans, _mm256_sub_ps(hi, lo));
                    acc[2 * h] =
                        _mm256_add_pd(acc[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
                    acc[2 * h + 1] = _mm256_add_pd(
                        acc[2 * h + 1],
                        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(lo)),
                    );
                }
            }
            // bias_of's fold: w = 8 (acc 0 + 2, 1 + 3), then 4, 2, 1.
            let s4 = _mm256_add_pd(_mm256_add_pd(acc[0], acc[2]), _mm256_add_pd(acc[1], acc[3]));
            let s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd::<1>(s4));
            let s1 = _mm_add_sd(s2, _mm_unpackhi_pd(s2, s2));
            let bias = _mm_cvtsd_f64(s1) as f32;
            // Max is exact: any order gives the scalar's span.
            let span = max8(spans);
            let delta = super::delta_of(span);
            let inv = _mm256_set1_ps(1.0 / delta);
            let rows = table.len() / 16;
            for b in 0..nb.min(rows.div_ceil(16)) {
                for h in 0..2 {
                    if 16 * b + 8 * h >= rows {
                        break;
                    }
                    let lo = _mm256_loadu_ps(mins.as_ptr().add(16 * b + 8 * h));
                    half_write(d, p, b, h, lo, inv, rows, table.as_mut_ptr());
                }
            }
            (delta, bias)
        }
    }

    /// The largest of 8 lanes (0 if all are below it), in lane order.
    ///
    /// # Safety
    /// AVX available.
    #[inline(always)]
    unsafe fn max8(v: __m256) -> f32 {
        // SAFETY: as stated.
        unsafe {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            lanes.iter().fold(0.0f32, |a, &v| if v > a { v } else { a })
        }
    }

    pub(super) fn quantize_blocked_v3(
        dots: &[f32],
        pre: &[f32],
        scratch: &mut [f32],
        table: &mut [u8],
    ) -> (f32, f32) {
        // SAFETY: only reachable through a kernel built for V3, which the CPU supports;
        // shapes checked by LutKernel::quantize_residual_blocked.
        unsafe { quantize_blocked_v3_imp(dots, pre, scratch, table) }
    }

    pub(super) fn quantize_v3(scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: only reachable through a kernel built for V3, which the CPU supports;
        // shapes checked by LutKernel::quantize.
        unsafe { quantize_v3_imp(Rows(scores.as_ptr()), mins, table) }
    }

    pub(super) fn quantize_v4(scores: &[f32], mins: &mut [f32], table: &mut [u8]) -> f32 {
        // SAFETY: only reachable through a kernel built for V4, which the CPU supports;
        // shapes checked by LutKernel::quantize.
        unsafe { quantize_v4_imp(Rows(scores.as_ptr()), mins, table) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn blocked_residual_levels_are_bit_exact_with_the_row_major_reference() {
        let mut rng = StdRng::seed_from_u64(6);
        for m in [1usize, 2, 15, 16, 17, 31, 98, 130] {
            for trial in 0..8 {
                let mut gen = |i: usize| match trial {
                    0 => rng.random_range(-3.0..3.0),
                    1 => rng.random_range(-1e6..1e6),
                    2 => (i % 5) as f32,
                    3 => 7.25,
                    4 => rng.random_range(0..512) as f32 / 2.0,
                    5 => rng.random_range(-1e-30..1e-30),
                    // Degenerate scales, where the clamp at 255 decides: a subnormal span
                    // (delta rounds to 0, every step infinite) and an infinite one.
                    6 => rng.random_range(-1e-43..1e-43),
                    _ => rng.random_range(-1e38..1e38),
                };
                let dots: Vec<f32> = (0..m * 16).map(&mut gen).collect();
                let pre: Vec<f32> = (0..m * 16).map(|i| gen(i + 3) * 0.37).collect();
                let (mut bd, mut bp) = (Vec::new(), Vec::new());
                extend_blocked_scalar(&dots, &mut bd);
                extend_blocked_scalar(&pre, &mut bp);
                assert_eq!(bd.len(), blocked_len(m));
                // The layout, by definition, and the same from every level, appended.
                for (j, c) in [(0, 0), (0, 15), (m - 1, 3), (m / 2, 7)] {
                    assert_eq!(bd[(j / 16) * 256 + c * 16 + j % 16], dots[j * 16 + c]);
                }
                for j in m..m.div_ceil(16) * 16 {
                    assert!((0..16).all(|c| bd[(j / 16) * 256 + c * 16 + j % 16] == 0.0));
                }
                for level in Level::all_supported() {
                    let mut got = vec![5.0];
                    LutKernel::for_level(level).extend_blocked(&dots, &mut got);
                    assert_eq!(got[0], 5.0);
                    assert_eq!(got[1..], bd[..], "level {level} m {m}");
                }
                // The row-major reference gives the minima and delta, and the bytes but for
                // the rounding of x.5 (one step at most: the blocked kernels fuse the
                // multiply-add).
                let rows: Vec<f32> = dots.iter().zip(&pre).map(|(d, p)| 2.0 * d - p).collect();
                let (mut wm, mut rt) = (vec![0.0; m], vec![0u8; m * 16]);
                let wd = quantize_scalar(&rows, &mut wm, &mut rt);
                let mut scratch = vec![0.0; blocked_scratch_len(bd.len())];
                let mut wt = vec![0u8; m * 16];
                let (sd, sb) = quantize_residual_blocked_scalar(&bd, &bp, &mut scratch, &mut wt);
                assert_eq!(
                    (sd.to_bits(), sb.to_bits()),
                    (wd.to_bits(), bias_of(&wm).to_bits())
                );
                assert!(wt.iter().zip(&rt).all(|(&a, &b)| a.abs_diff(b) <= 1));
                if trial == 0 {
                    let same = wt.iter().zip(&rt).filter(|(a, b)| a == b).count();
                    assert!(same * 100 >= wt.len() * 99, "{same} of {}", wt.len());
                }
                for m2 in [m, m + m % 2] {
                    let mut want_table = wt.clone();
                    want_table.resize(m2 * 16, 0);
                    for level in Level::all_supported() {
                        let mut mins = vec![1.0; blocked_scratch_len(bd.len())];
                        let mut table = vec![9u8; m2 * 16];
                        let k = LutKernel::for_level(level);
                        let (delta, bias) =
                            k.quantize_residual_blocked(&bd, &bp, &mut mins, &mut table);
                        let at = format!("level {level} m {m} m2 {m2} trial {trial}");
                        assert_eq!(delta.to_bits(), wd.to_bits(), "{at}");
                        assert_eq!(table, want_table, "{at}");
                        assert_eq!(mins[..m], wm[..], "{at}");
                        assert_eq!(bias.to_bits(), bias_of(&wm).to_bits(), "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn blocked_dots_are_bit_exact_across_levels_and_match_the_row_major_table() {
        let mut rng = StdRng::seed_from_u64(8);
        for m in [1usize, 2, 15, 16, 17, 31, 98, 130] {
            for dsub in [1usize, 2, 3, 8] {
                let q: Vec<f32> = (0..m * dsub).map(|_| rng.random_range(-4.0..4.0)).collect();
                let cols: Vec<f32> = (0..m * dsub * 16)
                    .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..3)))
                    .collect();
                // The row-major table as the distance kernels' reference makes it (a product
                // and a sum, each rounded), blocked: the fused one agrees to within the
                // roundings of `dsub` products and sums of terms at most `bound` (the padding
                // rows exactly 0).
                let mut rows = vec![0.0f32; m * 16];
                crate::distance::scalar::axpy_cols16(1.0, &q, &cols, &mut rows);
                let mut unfused = Vec::new();
                extend_blocked_scalar(&rows, &mut unfused);
                let codebook = blocked_codebook(&cols, m);
                assert_eq!(codebook.len(), blocked_len(m) * dsub);
                let mut want = vec![7.0f32];
                dots_blocked_scalar(&q, m, &codebook, &mut want);
                assert_eq!(want.remove(0), 7.0);
                let bound = q.iter().fold(0.0f32, |a, v| a.max(v.abs()))
                    * cols.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let tol = 4.0 * dsub as f32 * bound * f32::EPSILON;
                for (i, (&a, &b)) in want.iter().zip(&unfused).enumerate() {
                    assert!((a - b).abs() <= tol, "m {m} dsub {dsub} at {i}: {a} vs {b}");
                    if i % 256 % 16 >= m.saturating_sub(i / 256 * 16) {
                        assert_eq!(a.to_bits(), 0, "padding row, m {m} at {i}");
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for level in Level::all_supported() {
                    // Appended, as extend_blocked does.
                    let mut got = vec![7.0f32];
                    LutKernel::for_level(level).dots_blocked(&q, m, &codebook, &mut got);
                    assert_eq!(got.remove(0), 7.0);
                    assert_eq!(bits(&got), bits(&want), "level {level} m {m} dsub {dsub}");
                }
            }
        }
    }

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(5);
        for m in [1usize, 2, 3, 16, 17, 64, 130] {
            for trial in 0..8 {
                let scores: Vec<f32> = (0..m * 16)
                    .map(|i| match trial {
                        0 => rng.random_range(-3.0..3.0),
                        1 => rng.random_range(-1e6..1e6),
                        2 => (i % 5) as f32, // many ties, exact halves
                        3 => 7.25,           // zero span
                        4 => rng.random_range(0..512) as f32 / 2.0, // x.5 boundaries
                        5 => rng.random_range(-1e-30..1e-30),
                        6 => rng.random_range(-1e-43..1e-43), // subnormal span: infinite steps
                        _ => rng.random_range(-1e38..1e38),   // infinite span: zero steps
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
            }
        }
    }
}
