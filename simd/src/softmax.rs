//! Softmax weights of fast-scan scores, for the attention client.
//!
//! A query head's u16 fast-scan sums `v` map to unnormalised softmax weights
//! `w(v) = exp(-step * d)` with `d = hi - v` (`hi`: the head's largest sum, weight 1; a sum
//! above `hi` counts as `d = 0`), and `w(v) = 0` when `d > span` (the caller's cutoff: tokens
//! that far below the best carry no weight). The exponential comes from four 16-entry tables
//! ([`ExpTables`]), one per hex digit of `d`:
//!
//! ```text
//! w = ((t3[d >> 12] * t2[(d >> 8) & 15]) * t1[(d >> 4) & 15]) * t0[d & 15]
//! tl[j] = exp(-step * j * 16^l)        (computed in f64, rounded once)
//! ```
//!
//! Every level multiplies in this order, so every level gives the same bits. Since
//! `tl[0] = 1` exactly, the SIMD levels skip the tables of the digits that are zero for every
//! `d <= span` (`span < 4096`: no `t3`; `span < 256`: no `t2` either; lanes beyond the span
//! are zeroed anyway): the same bits for one or two fewer lookups. Each table fits
//! one AVX-512 register, so a lookup is one `vpermps` (which reads only the low four bits of
//! each index: no masking) instead of a gather from memory; AVX2 looks up the two 8-entry
//! halves and blends on bit 3. Within the cutoff (`d <= span`, weights down to the caller's
//! `e^-12` or so) every partial product is at least the final weight, so no denormal occurs;
//! the product is within a few ulps of `exp(-step * d)`.
//!
//! * [`SoftmaxKernel::weight_sum`]: `sum_i w(row[i])`, the normaliser. Summed in 64 lanes
//!   (`lane = i % 64`: four independent AVX-512 or eight AVX2 accumulators, so the additions
//!   do not wait on each other), folded to 8 lanes as `m[j] = l[j] + l[8 + j] + ... + l[56 + j]`
//!   left to right, then combined as `((m0 + m1) + (m2 + m3)) + ((m4 + m5) + (m6 + m7))` on
//!   every level.
//! * [`SoftmaxKernel::weight_sum_at`]: `sum_j w(row[at[j]])`, the weight of a chosen subset
//!   (the attention client's tail term: the normaliser less this is the unchosen mass). The
//!   same 64 lanes over `j` (`lane = j % 64`) and the same folding; the SIMD levels gather.
//! * [`SoftmaxKernel::combine`]: per element, the group's weights `w_h(row_h[i]) * factor_h`
//!   folded over the heads in order from `0.0`, by addition (the sum of the group's softmax)
//!   or maximum: one pass that writes each output once, identical on every level.
//! * [`SoftmaxKernel::combine_at_least`]: the same combined weights, but only the elements at
//!   or above a floor are kept (index and weight, ascending): what a top-k selection with a
//!   sampled floor reads, without writing every combined weight and filtering them in a
//!   second pass. AVX-512 compresses the survivors of 16 elements into place.

use crate::level::Level;

/// The four 16-entry tables of `exp(-step * d)`, `d` in `0..65536` (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct ExpTables {
    t: [[f32; 16]; 4],
}

impl ExpTables {
    /// Tables for `exp(-step * d)`; `step` is the logit of one unit of the u16 sums (finite,
    /// non-negative: a negative or NaN step is treated as 0, every weight 1).
    pub fn new(step: f32) -> ExpTables {
        let step = if step.is_finite() && step > 0.0 {
            step as f64
        } else if step == f32::INFINITY {
            f64::INFINITY
        } else {
            0.0
        };
        let mut t = [[0.0f32; 16]; 4];
        for (l, table) in t.iter_mut().enumerate() {
            for (j, e) in table.iter_mut().enumerate() {
                let d = (j << (4 * l)) as f64;
                *e = if d == 0.0 {
                    1.0
                } else {
                    (-step * d).exp() as f32
                };
            }
        }
        ExpTables { t }
    }

    /// `exp(-step * d)` through the tables (the scalar reference of every level).
    #[inline(always)]
    pub fn weight(&self, d: u16) -> f32 {
        let d = d as usize;
        ((self.t[3][d >> 12] * self.t[2][(d >> 8) & 15]) * self.t[1][(d >> 4) & 15])
            * self.t[0][d & 15]
    }
}

type SumFn = fn(&[u16], u16, u16, &ExpTables) -> f32;
type SumAtFn = fn(&[u16], &[u32], u16, u16, &ExpTables) -> f32;
type CombineFn = fn(&[HeadRow<'_>], &mut [f32], bool);
type CombineAtLeastFn = fn(&[HeadRow<'_>], bool, f32, &mut Vec<u32>, &mut Vec<f32>);

/// One query head's input to [`SoftmaxKernel::combine`].
#[derive(Clone, Debug)]
pub struct HeadRow<'a> {
    /// The head's u16 sums, one per element.
    pub row: &'a [u16],
    /// The sum of weight 1 (the head's largest).
    pub hi: u16,
    /// Sums more than this below `hi` weigh 0.
    pub span: u16,
    /// The exponential tables of the head's step.
    pub exp: ExpTables,
    /// Multiplies every weight (the inverse of the head's normaliser).
    pub factor: f32,
}

/// A resolved softmax-weight kernel.
#[derive(Clone, Copy)]
pub struct SoftmaxKernel {
    level: Level,
    sum: SumFn,
    sum_at: SumAtFn,
    combine: CombineFn,
    combine_at_least: CombineAtLeastFn,
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
        match level.capped() {
            #[cfg(target_arch = "x86_64")]
            Level::V4 | Level::V4Icl => SoftmaxKernel {
                level: Level::V4,
                sum: x86::weight_sum_v4,
                sum_at: x86::weight_sum_at_v4,
                combine: x86::combine_v4,
                combine_at_least: x86::combine_at_least_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => SoftmaxKernel {
                level: Level::V3,
                sum: x86::weight_sum_v3,
                sum_at: x86::weight_sum_at_v3,
                combine: x86::combine_v3,
                combine_at_least: x86::combine_at_least_v3,
            },
            _ => SoftmaxKernel {
                level: Level::Scalar,
                sum: weight_sum_scalar,
                sum_at: weight_sum_at_scalar,
                combine: combine_scalar,
                combine_at_least: combine_at_least_scalar,
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

    /// `sum_i w(row[i])` (see the module doc).
    pub fn weight_sum(&self, row: &[u16], hi: u16, span: u16, exp: &ExpTables) -> f32 {
        (self.sum)(row, hi, span, exp)
    }

    /// `sum_j w(row[at[j]])`, summed as [`SoftmaxKernel::weight_sum`] sums (lane `j % 64`).
    /// Panics if an index is out of `row`.
    pub fn weight_sum_at(
        &self,
        row: &[u16],
        at: &[u32],
        hi: u16,
        span: u16,
        exp: &ExpTables,
    ) -> f32 {
        // Every level checks the indices as it reads them. The SIMD levels gather with signed
        // 32-bit indices.
        if row.len() > i32::MAX as usize {
            return weight_sum_at_scalar(row, at, hi, span, exp);
        }
        (self.sum_at)(row, at, hi, span, exp)
    }

    /// `out[i] = fold(0.0, heads, |a, h| a + w_h(h.row[i]) * h.factor)`, or with the maximum
    /// instead of the sum if `max`. Panics if a row's length differs from `out`'s.
    pub fn combine(&self, heads: &[HeadRow<'_>], out: &mut [f32], max: bool) {
        assert!(
            heads.iter().all(|h| h.row.len() == out.len()),
            "combine: shapes disagree"
        );
        (self.combine)(heads, out, max)
    }

    /// The elements `i` whose combined weight (`out[i]` of [`SoftmaxKernel::combine`], the
    /// same bits) is at least `floor`: `i` pushed to `at` and the weight to `values`, in
    /// ascending `i`. Panics if the rows' lengths differ or exceed `u32` indices.
    pub fn combine_at_least(
        &self,
        heads: &[HeadRow<'_>],
        max: bool,
        floor: f32,
        at: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) {
        let n = heads.first().map_or(0, |h| h.row.len());
        assert!(
            heads.iter().all(|h| h.row.len() == n),
            "combine_at_least: shapes disagree"
        );
        assert!(
            n <= u32::MAX as usize,
            "combine_at_least: rows past u32 indices"
        );
        (self.combine_at_least)(heads, max, floor, at, values)
    }
}

/// Hex digits of `d` that can be non-zero when `d <= span`: the SIMD levels look up only
/// these tables (the others read their entry 0, which is exactly 1).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn digits(span: u16) -> usize {
    match span {
        0..=255 => 2,
        256..=4095 => 3,
        _ => 4,
    }
}

/// The weight of sum `v` (scalar reference).
#[inline(always)]
fn weight(v: u16, hi: u16, span: u16, exp: &ExpTables) -> f32 {
    let d = hi.saturating_sub(v);
    if d > span {
        0.0
    } else {
        exp.weight(d)
    }
}

/// Lanes of [`SoftmaxKernel::weight_sum`].
const LANES: usize = 64;

fn combine_lanes(l: &[f32; LANES]) -> f32 {
    let m: [f32; 8] = std::array::from_fn(|j| {
        let mut s = l[j];
        for t in 1..LANES / 8 {
            s += l[8 * t + j];
        }
        s
    });
    ((m[0] + m[1]) + (m[2] + m[3])) + ((m[4] + m[5]) + (m[6] + m[7]))
}

/// Scalar reference of [`SoftmaxKernel::weight_sum`], continuing `lanes` from element `from`.
fn weight_sum_from(
    row: &[u16],
    hi: u16,
    span: u16,
    exp: &ExpTables,
    mut lanes: [f32; LANES],
    from: usize,
) -> f32 {
    for (i, &v) in row.iter().enumerate().skip(from) {
        lanes[i % LANES] += weight(v, hi, span, exp);
    }
    combine_lanes(&lanes)
}

/// Scalar reference of [`SoftmaxKernel::weight_sum`].
pub fn weight_sum_scalar(row: &[u16], hi: u16, span: u16, exp: &ExpTables) -> f32 {
    weight_sum_from(row, hi, span, exp, [0.0; LANES], 0)
}

/// Scalar reference of [`SoftmaxKernel::weight_sum_at`], continuing `lanes` from index
/// `from` of `at`.
fn weight_sum_at_from(
    row: &[u16],
    at: &[u32],
    hi: u16,
    span: u16,
    exp: &ExpTables,
    mut lanes: [f32; LANES],
    from: usize,
) -> f32 {
    for (j, &i) in at.iter().enumerate().skip(from) {
        let Some(&v) = row.get(i as usize) else {
            out_of_the_row()
        };
        lanes[j % LANES] += weight(v, hi, span, exp);
    }
    combine_lanes(&lanes)
}

/// The panic of [`SoftmaxKernel::weight_sum_at`] for an index past the row.
#[cold]
fn out_of_the_row() -> ! {
    panic!("weight_sum_at: index out of the row")
}

/// Scalar reference of [`SoftmaxKernel::weight_sum_at`].
pub fn weight_sum_at_scalar(row: &[u16], at: &[u32], hi: u16, span: u16, exp: &ExpTables) -> f32 {
    weight_sum_at_from(row, at, hi, span, exp, [0.0; LANES], 0)
}

/// `a` folded with `w`: the sum, or the maximum (`a` kept when equal).
#[inline(always)]
fn fold(a: f32, w: f32, max: bool) -> f32 {
    if max {
        if w > a {
            w
        } else {
            a
        }
    } else {
        a + w
    }
}

/// The combined weight of element `i` (the scalar reference of every level).
#[inline(always)]
fn combined(heads: &[HeadRow<'_>], i: usize, max: bool) -> f32 {
    heads.iter().fold(0.0f32, |a, h| {
        fold(a, weight(h.row[i], h.hi, h.span, &h.exp) * h.factor, max)
    })
}

/// Scalar reference of [`SoftmaxKernel::combine`], from element `from` on.
fn combine_from(heads: &[HeadRow<'_>], out: &mut [f32], max: bool, from: usize) {
    for (i, o) in out.iter_mut().enumerate().skip(from) {
        *o = combined(heads, i, max);
    }
}

/// Scalar reference of [`SoftmaxKernel::combine`].
pub fn combine_scalar(heads: &[HeadRow<'_>], out: &mut [f32], max: bool) {
    combine_from(heads, out, max, 0)
}

/// Scalar reference of [`SoftmaxKernel::combine_at_least`], from element `from` on.
fn combine_at_least_from(
    heads: &[HeadRow<'_>],
    max: bool,
    floor: f32,
    from: usize,
    at: &mut Vec<u32>,
    values: &mut Vec<f32>,
) {
    let n = heads.first().map_or(0, |h| h.row.len());
    for i in from..n {
        let v = combined(heads, i, max);
        if v >= floor {
            at.push(i as u32);
            values.push(v);
        }
    }
}

/// Scalar reference of [`SoftmaxKernel::combine_at_least`].
pub fn combine_at_least_scalar(
    heads: &[HeadRow<'_>],
    max: bool,
    floor: f32,
    at: &mut Vec<u32>,
    values: &mut Vec<f32>,
) {
    combine_at_least_from(heads, max, floor, 0, at, values)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 and AVX-512 levels: every loop is written once, generic over a [`Width`]
    //! (the register types and the handful of instructions that differ), and instantiated
    //! inside a `#[target_feature]` function per level, into which it all inlines (the
    //! pattern of memchr's `Vector`). Only what differs in substance is written per width:
    //! the table lookup (one `vpermps` against two and a blend) and the survivors' store of
    //! `combine_at_least` (a compress against a mask walk).
    use super::{ExpTables, HeadRow, LANES};
    use std::arch::x86_64::*;

    /// One vector width. Every method needs its width's features enabled in the caller
    /// (AVX2 and FMA for [`Avx2`]; AVX-512F/BW/VL for [`Avx512`]) and inlines into it.
    trait Width {
        /// f32 lanes per register.
        const N: usize;
        /// N f32 lanes.
        type F: Copy;
        /// N i32 lanes.
        type I: Copy;
        /// `LANES / N` registers: the 64 accumulator lanes of the weight sums.
        type Acc: Copy + AsRef<[Self::F]> + AsMut<[Self::F]>;
        /// The exponential's tables, held in registers.
        type Tables;

        unsafe fn tables(exp: &ExpTables) -> Self::Tables;
        unsafe fn zero() -> Self::F;
        unsafe fn acc() -> Self::Acc;
        unsafe fn splat(x: f32) -> Self::F;
        unsafe fn splat_i(x: i32) -> Self::I;
        unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
        /// `max(w, a)`, `a` when equal or NaN (the scalar `if w > a { w } else { a }`).
        unsafe fn max(w: Self::F, a: Self::F) -> Self::F;
        /// Stores N floats at `p` (writable for N f32).
        unsafe fn store(p: *mut f32, a: Self::F);
        /// N u16 at `p` (readable for N u16), widened to the 32-bit lanes.
        unsafe fn load_u16(p: *const u16) -> Self::I;
        /// `row[at[j]]` for the N indices at `idx` (readable for N u32; `1 <= len <=
        /// i32::MAX`), in 32-bit lanes. A 32-bit gather at `2 * i` reads `row[i]` and
        /// `row[i + 1]`: lanes at or past the last element (`i >= len - 1`, unsigned) are not
        /// gathered but take `last`, so nothing past the row is read whatever the indices;
        /// `top` keeps the largest index seen per lane, for the caller to check.
        unsafe fn gather_u16(
            row: *const u16,
            idx: *const u32,
            len_m1: Self::I,
            last: Self::I,
            top: &mut Self::I,
        ) -> Self::I;
        /// The largest unsigned 32-bit lane.
        unsafe fn max_u32(v: Self::I) -> u32;
        /// The weights of the N sums in the 32-bit lanes of `v` (each below 2^16, as `hi`): the
        /// `DIGITS` low tables looked up (see [`super::digits`]), multiplied in the module
        /// doc's order, zero where `hi - v > span`.
        unsafe fn weights_of<const DIGITS: usize>(
            t: &Self::Tables,
            v: Self::I,
            hi: Self::I,
            span: Self::I,
        ) -> Self::F;
    }

    /// The [`Width`] methods that are one register instruction each, for register types
    /// `$f` / `$i` and the intrinsics named.
    macro_rules! register_ops {
        ($f:ty, $i:ty, $zero:ident, $set1:ident, $set1i:ident,
         $add:ident, $mul:ident, $max:ident, $store:ident) => {
            #[inline(always)]
            unsafe fn zero() -> $f {
                // SAFETY: register operation; the width's features are available (the
                // trait's contract), as in every method here.
                unsafe { $zero() }
            }
            #[inline(always)]
            unsafe fn acc() -> Self::Acc {
                // SAFETY: as in zero.
                unsafe { [Self::zero(); LANES / Self::N] }
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> $f {
                // SAFETY: register operation.
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn splat_i(x: i32) -> $i {
                // SAFETY: register operation.
                unsafe { $set1i(x) }
            }
            #[inline(always)]
            unsafe fn add(a: $f, b: $f) -> $f {
                // SAFETY: register operation.
                unsafe { $add(a, b) }
            }
            #[inline(always)]
            unsafe fn mul(a: $f, b: $f) -> $f {
                // SAFETY: register operation.
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            unsafe fn max(w: $f, a: $f) -> $f {
                // SAFETY: register operation; vmaxps returns its second operand when equal
                // or NaN.
                unsafe { $max(w, a) }
            }
            #[inline(always)]
            unsafe fn store(p: *mut f32, a: $f) {
                // SAFETY: p writable for N f32 (the caller's contract).
                unsafe { $store(p, a) }
            }
        };
    }

    /// AVX2 and FMA: 8 lanes.
    struct Avx2;

    impl Width for Avx2 {
        const N: usize = 8;
        type F = __m256;
        type I = __m256i;
        type Acc = [__m256; 8];
        /// Per table, its two 8-entry halves.
        type Tables = [[__m256; 2]; 4];

        #[inline(always)]
        unsafe fn tables(exp: &ExpTables) -> Self::Tables {
            // A plain loop (an out-of-line `from_fn` closure would run without the features).
            // SAFETY: the caller's features; each table has 16 floats: halves at 0 and 8.
            unsafe {
                let mut out = [[_mm256_setzero_ps(); 2]; 4];
                for (o, t) in out.iter_mut().zip(&exp.t) {
                    *o = [
                        _mm256_loadu_ps(t.as_ptr()),
                        _mm256_loadu_ps(t.as_ptr().add(8)),
                    ];
                }
                out
            }
        }
        register_ops!(
            __m256,
            __m256i,
            _mm256_setzero_ps,
            _mm256_set1_ps,
            _mm256_set1_epi32,
            _mm256_add_ps,
            _mm256_mul_ps,
            _mm256_max_ps,
            _mm256_storeu_ps
        );
        #[inline(always)]
        unsafe fn load_u16(p: *const u16) -> __m256i {
            // SAFETY: p readable for 8 u16 (the caller's contract).
            unsafe { _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        unsafe fn gather_u16(
            row: *const u16,
            idx: *const u32,
            len_m1: __m256i,
            last: __m256i,
            top: &mut __m256i,
        ) -> __m256i {
            // SAFETY: the caller's contract: gathered lanes have i < len - 1 (unsigned: the
            // signed compare of both sides with their sign bits flipped), so the 4 bytes at
            // 2 i lie in the row.
            unsafe {
                let i = _mm256_loadu_si256(idx as *const __m256i);
                *top = _mm256_max_epu32(*top, i);
                let flip = _mm256_set1_epi32(i32::MIN);
                let inside =
                    _mm256_cmpgt_epi32(_mm256_xor_si256(len_m1, flip), _mm256_xor_si256(i, flip));
                let g = _mm256_mask_i32gather_epi32::<2>(last, row as *const i32, i, inside);
                _mm256_and_si256(g, _mm256_set1_epi32(0xFFFF))
            }
        }
        #[inline(always)]
        unsafe fn max_u32(v: __m256i) -> u32 {
            let mut lanes = [0u32; 8];
            // SAFETY: 8 u32 written.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
            lanes.into_iter().max().unwrap_or(0)
        }
        #[inline(always)]
        unsafe fn weights_of<const DIGITS: usize>(
            t: &Self::Tables,
            v: __m256i,
            hi: __m256i,
            span: __m256i,
        ) -> __m256 {
            // SAFETY: register operations only.
            unsafe {
                // max(hi - v, 0) in one instruction: both below 2^16, so the 16-bit
                // saturating subtraction of the low halves is it (the high halves are 0 - 0).
                let d = _mm256_subs_epu16(hi, v);
                // Table l: entry (d >> 4l) & 15; vpermps reads the low 3 bits, bit 3 (moved
                // to the sign bit) picks the half.
                let look = |l: usize, idx: __m256i, sel: __m256i| {
                    let [lo, up] = t[l];
                    _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lo, idx),
                        _mm256_permutevar8x32_ps(up, idx),
                        _mm256_castsi256_ps(sel),
                    )
                };
                let w1 = look(1, _mm256_srli_epi32::<4>(d), _mm256_slli_epi32::<24>(d));
                let w0 = look(0, d, _mm256_slli_epi32::<28>(d));
                let high = if DIGITS >= 3 {
                    let w2 = look(2, _mm256_srli_epi32::<8>(d), _mm256_slli_epi32::<20>(d));
                    if DIGITS == 4 {
                        let w3 = look(3, _mm256_srli_epi32::<12>(d), _mm256_slli_epi32::<16>(d));
                        _mm256_mul_ps(_mm256_mul_ps(w3, w2), w1)
                    } else {
                        _mm256_mul_ps(w2, w1)
                    }
                } else {
                    w1
                };
                let w = _mm256_mul_ps(high, w0);
                let cut = _mm256_cmpgt_epi32(d, span);
                _mm256_andnot_ps(_mm256_castsi256_ps(cut), w)
            }
        }
    }

    /// AVX-512F/BW/VL: 16 lanes.
    struct Avx512;

    impl Width for Avx512 {
        const N: usize = 16;
        type F = __m512;
        type I = __m512i;
        type Acc = [__m512; 4];
        /// One register per table.
        type Tables = [__m512; 4];

        #[inline(always)]
        unsafe fn tables(exp: &ExpTables) -> Self::Tables {
            // A plain loop (an out-of-line `from_fn` closure would run without the features).
            // SAFETY: the caller's features; each table has 16 floats.
            unsafe {
                let mut out = [_mm512_setzero_ps(); 4];
                for (o, t) in out.iter_mut().zip(&exp.t) {
                    *o = _mm512_loadu_ps(t.as_ptr());
                }
                out
            }
        }
        register_ops!(
            __m512,
            __m512i,
            _mm512_setzero_ps,
            _mm512_set1_ps,
            _mm512_set1_epi32,
            _mm512_add_ps,
            _mm512_mul_ps,
            _mm512_max_ps,
            _mm512_storeu_ps
        );
        #[inline(always)]
        unsafe fn load_u16(p: *const u16) -> __m512i {
            // SAFETY: p readable for 16 u16 (the caller's contract).
            unsafe { _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn gather_u16(
            row: *const u16,
            idx: *const u32,
            len_m1: __m512i,
            last: __m512i,
            top: &mut __m512i,
        ) -> __m512i {
            // SAFETY: as in Avx2::gather_u16, with an unsigned compare.
            unsafe {
                let i = _mm512_loadu_si512(idx as *const __m512i);
                *top = _mm512_max_epu32(*top, i);
                let inside = _mm512_cmplt_epu32_mask(i, len_m1);
                let g = _mm512_mask_i32gather_epi32::<2>(last, inside, i, row as *const i32);
                _mm512_and_si512(g, _mm512_set1_epi32(0xFFFF))
            }
        }
        #[inline(always)]
        unsafe fn max_u32(v: __m512i) -> u32 {
            // SAFETY: register operation.
            unsafe { _mm512_reduce_max_epu32(v) }
        }
        #[inline(always)]
        unsafe fn weights_of<const DIGITS: usize>(
            t: &Self::Tables,
            v: __m512i,
            hi: __m512i,
            span: __m512i,
        ) -> __m512 {
            // SAFETY: register operations only.
            unsafe {
                // max(hi - v, 0) in one instruction, as on AVX2.
                let d = _mm512_subs_epu16(hi, v);
                // vpermps reads the low 4 bits of each index: (d >> 4l) & 15 for free.
                let [t0, t1, t2, t3] = *t;
                let w1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(d), t1);
                let w0 = _mm512_permutexvar_ps(d, t0);
                let high = if DIGITS >= 3 {
                    let w2 = _mm512_permutexvar_ps(_mm512_srli_epi32::<8>(d), t2);
                    if DIGITS == 4 {
                        let w3 = _mm512_permutexvar_ps(_mm512_srli_epi32::<12>(d), t3);
                        _mm512_mul_ps(_mm512_mul_ps(w3, w2), w1)
                    } else {
                        _mm512_mul_ps(w2, w1)
                    }
                } else {
                    w1
                };
                let w = _mm512_mul_ps(high, w0);
                _mm512_maskz_mov_ps(_mm512_cmple_epi32_mask(d, span), w)
            }
        }
    }

    /// The 64 accumulator lanes in order, for the scalar tail to continue.
    ///
    /// # Safety
    /// `W`'s features available.
    #[inline(always)]
    unsafe fn lanes_of<W: Width>(acc: &W::Acc) -> [f32; LANES] {
        let mut lanes = [0.0f32; LANES];
        for (j, a) in acc.as_ref().iter().enumerate() {
            // SAFETY: register j fills lanes[N j .. N (j + 1)], inside the 64.
            unsafe { W::store(lanes.as_mut_ptr().add(W::N * j), *a) };
        }
        lanes
    }

    /// [`super::SoftmaxKernel::weight_sum`]: the full blocks of 64 in `W`'s registers (lane
    /// `i % 64`), the rest by the scalar reference.
    ///
    /// # Safety
    /// `W`'s features available.
    #[inline(always)]
    unsafe fn weight_sum<W: Width, const DIGITS: usize>(
        row: &[u16],
        hi: u16,
        span: u16,
        exp: &ExpTables,
    ) -> f32 {
        let full = row.len() / LANES * LANES;
        // SAFETY: loads read row[i .. i + 64] with i + 64 <= len.
        unsafe {
            let t = W::tables(exp);
            let (h, s) = (W::splat_i(hi as i32), W::splat_i(span as i32));
            let mut acc = W::acc();
            let mut i = 0;
            while i < full {
                for (j, a) in acc.as_mut().iter_mut().enumerate() {
                    let v = W::load_u16(row.as_ptr().add(i + W::N * j));
                    *a = W::add(*a, W::weights_of::<DIGITS>(&t, v, h, s));
                }
                i += LANES;
            }
            super::weight_sum_from(row, hi, span, exp, lanes_of::<W>(&acc), full)
        }
    }

    /// [`super::SoftmaxKernel::weight_sum_at`]: as [`weight_sum`] over `at`, gathering; the
    /// indices are checked on the way (the largest gathered, then the tail's one by one).
    ///
    /// # Safety
    /// `W`'s features available; `row.len() <= i32::MAX`.
    #[inline(always)]
    unsafe fn weight_sum_at<W: Width, const DIGITS: usize>(
        row: &[u16],
        at: &[u32],
        hi: u16,
        span: u16,
        exp: &ExpTables,
    ) -> f32 {
        let full = at.len() / LANES * LANES;
        if full == 0 {
            return super::weight_sum_at_scalar(row, at, hi, span, exp);
        }
        let Some(&last) = row.last() else {
            super::out_of_the_row()
        };
        // SAFETY: as stated, and row is not empty; index loads read at[j .. j + 64] with
        // j + 64 <= at.len(); the gathers read inside the row whatever the indices.
        let lanes = unsafe {
            let t = W::tables(exp);
            let (h, s) = (W::splat_i(hi as i32), W::splat_i(span as i32));
            let len_m1 = W::splat_i((row.len() - 1) as i32);
            let last = W::splat_i(last as i32);
            let (mut acc, mut top) = (W::acc(), W::splat_i(0));
            let mut j = 0;
            while j < full {
                for (l, a) in acc.as_mut().iter_mut().enumerate() {
                    let idx = at.as_ptr().add(j + W::N * l);
                    let v = W::gather_u16(row.as_ptr(), idx, len_m1, last, &mut top);
                    *a = W::add(*a, W::weights_of::<DIGITS>(&t, v, h, s));
                }
                j += LANES;
            }
            if W::max_u32(top) as usize >= row.len() {
                super::out_of_the_row()
            }
            lanes_of::<W>(&acc)
        };
        super::weight_sum_at_from(row, at, hi, span, exp, lanes, full)
    }

    /// The combined weights of elements `0..len / N * N` (every row `len` long), N at a time
    /// in order: `emit(i, weights of i .. i + N)`; returns where the full blocks end.
    ///
    /// # Safety
    /// `W`'s features available; every row holds `len` elements.
    #[inline(always)]
    unsafe fn combine_blocks<W: Width, const DIGITS: usize>(
        heads: &[HeadRow<'_>],
        len: usize,
        max: bool,
        mut emit: impl FnMut(usize, W::F),
    ) -> usize {
        let full = len / W::N * W::N;
        // SAFETY: as stated; full blocks only.
        unsafe {
            // A loop, not `map(..).collect()`: the closure ran out of line, without the
            // features, its intrinsics calls.
            let mut prep = Vec::with_capacity(heads.len());
            for h in heads {
                prep.push((
                    W::tables(&h.exp),
                    W::splat_i(h.hi as i32),
                    W::splat_i(h.span as i32),
                    W::splat(h.factor),
                    h.row.as_ptr(),
                ));
            }
            let mut i = 0;
            while i < full {
                let mut a = W::zero();
                for (t, h, s, f, row) in &prep {
                    let v = W::load_u16(row.add(i));
                    let w = W::mul(W::weights_of::<DIGITS>(t, v, *h, *s), *f);
                    a = if max { W::max(w, a) } else { W::add(a, w) };
                }
                emit(i, a);
                i += W::N;
            }
        }
        full
    }

    /// [`super::SoftmaxKernel::combine`].
    ///
    /// # Safety
    /// `W`'s features available; every row has `out.len()` elements.
    #[inline(always)]
    unsafe fn combine<W: Width, const DIGITS: usize>(
        heads: &[HeadRow<'_>],
        out: &mut [f32],
        max: bool,
    ) {
        let o = out.as_mut_ptr();
        // SAFETY: as stated; each block's N outputs lie inside `out`.
        let full = unsafe {
            combine_blocks::<W, DIGITS>(heads, out.len(), max, |i, a| W::store(o.add(i), a))
        };
        super::combine_from(heads, out, max, full);
    }

    /// [`super::SoftmaxKernel::combine_at_least`] on AVX2: the lanes at or above the floor
    /// pushed from a mask.
    ///
    /// # Safety
    /// AVX2 and FMA available; every row has the same length.
    #[inline(always)]
    unsafe fn combine_at_least_avx2<const DIGITS: usize>(
        heads: &[HeadRow<'_>],
        max: bool,
        floor: f32,
        at: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) {
        let n = heads.first().map_or(0, |h| h.row.len());
        // SAFETY: as stated.
        let full = unsafe {
            let f = _mm256_set1_ps(floor);
            combine_blocks::<Avx2, DIGITS>(heads, n, max, |i, a| {
                let mut mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(a, f)) as u32;
                if mask != 0 {
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                    while mask != 0 {
                        let j = mask.trailing_zeros() as usize;
                        at.push((i + j) as u32);
                        values.push(lanes[j]);
                        mask &= mask - 1;
                    }
                }
            })
        };
        super::combine_at_least_from(heads, max, floor, full, at, values);
    }

    /// [`super::SoftmaxKernel::combine_at_least`] on AVX-512: each block's survivors
    /// compressed into place through a running count.
    ///
    /// # Safety
    /// AVX-512F available; every row has the same length, which fits u32 indices.
    #[inline(always)]
    unsafe fn combine_at_least_avx512<const DIGITS: usize>(
        heads: &[HeadRow<'_>],
        max: bool,
        floor: f32,
        at: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) {
        let n = heads.first().map_or(0, |h| h.row.len());
        // Room for every element and a full 16-lane store past the last survivor: the blocks
        // store through a running count, without a capacity check per block.
        at.reserve(n + 16);
        values.reserve(n + 16);
        let (at0, values0) = (at.len(), values.len());
        let mut kept = 0usize;
        // SAFETY: as stated. Block i stores 16 lanes at `kept <= i` past the vectors'
        // lengths, inside the n + 16 reserved; every bit pattern is a valid u32 or f32, and
        // only the `kept` compressed survivors become part of the vectors.
        let full = unsafe {
            let f = _mm512_set1_ps(floor);
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let (pa, pv) = (at.as_mut_ptr().add(at0), values.as_mut_ptr().add(values0));
            let full = combine_blocks::<Avx512, DIGITS>(heads, n, max, |i, a| {
                let mask = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, f);
                let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(i as i32));
                _mm512_storeu_si512(
                    pa.add(kept) as *mut __m512i,
                    _mm512_maskz_compress_epi32(mask, idx),
                );
                _mm512_storeu_ps(pv.add(kept), _mm512_maskz_compress_ps(mask, a));
                kept += mask.count_ones() as usize;
            });
            at.set_len(at0 + kept);
            values.set_len(values0 + kept);
            full
        };
        super::combine_at_least_from(heads, max, floor, full, at, values);
    }

    /// `$f::<W, D>(args)` (or `$f::<D>(args)`) with `D` the number of tables `$digits` asks for
    /// (2, 3 or 4).
    macro_rules! by_digits {
        ($digits:expr, $f:ident::<$w:ident>($($arg:expr),*)) => {
            match $digits {
                2 => $f::<$w, 2>($($arg),*),
                3 => $f::<$w, 3>($($arg),*),
                _ => $f::<$w, 4>($($arg),*),
            }
        };
        ($digits:expr, $f:ident($($arg:expr),*)) => {
            match $digits {
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                _ => $f::<4>($($arg),*),
            }
        };
    }

    /// The digits the widest span of the group needs.
    fn widest(heads: &[HeadRow<'_>]) -> usize {
        heads
            .iter()
            .map(|h| super::digits(h.span))
            .max()
            .unwrap_or(2)
    }

    /// One level's entry points: `#[target_feature]` functions that instantiate the generic
    /// loops for `$w`, and the safe wrappers the kernel table holds.
    macro_rules! level {
        ($feat:literal, $w:ident, $combine_at_least:ident,
         $sum:ident, $sum_at:ident, $comb:ident, $comb_least:ident) => {
            pub(super) fn $sum(row: &[u16], hi: u16, span: u16, exp: &ExpTables) -> f32 {
                #[target_feature(enable = $feat)]
                unsafe fn imp(row: &[u16], hi: u16, span: u16, exp: &ExpTables) -> f32 {
                    // SAFETY: the features are enabled on this function.
                    unsafe { by_digits!(super::digits(span), weight_sum::<$w>(row, hi, span, exp)) }
                }
                // SAFETY: only reachable through a kernel built for this level, which the CPU
                // supports.
                unsafe { imp(row, hi, span, exp) }
            }

            pub(super) fn $sum_at(
                row: &[u16],
                at: &[u32],
                hi: u16,
                span: u16,
                exp: &ExpTables,
            ) -> f32 {
                #[target_feature(enable = $feat)]
                unsafe fn imp(row: &[u16], at: &[u32], hi: u16, span: u16, exp: &ExpTables) -> f32 {
                    // SAFETY: the features are enabled on this function; the indices were
                    // checked by SoftmaxKernel::weight_sum_at.
                    unsafe {
                        by_digits!(
                            super::digits(span),
                            weight_sum_at::<$w>(row, at, hi, span, exp)
                        )
                    }
                }
                // SAFETY: as in the weight sum.
                unsafe { imp(row, at, hi, span, exp) }
            }

            pub(super) fn $comb(heads: &[HeadRow<'_>], out: &mut [f32], max: bool) {
                #[target_feature(enable = $feat)]
                unsafe fn imp(heads: &[HeadRow<'_>], out: &mut [f32], max: bool) {
                    // SAFETY: the features are enabled on this function; the lengths were
                    // checked by SoftmaxKernel::combine.
                    unsafe { by_digits!(widest(heads), combine::<$w>(heads, out, max)) }
                }
                // SAFETY: as in the weight sum.
                unsafe { imp(heads, out, max) }
            }

            pub(super) fn $comb_least(
                heads: &[HeadRow<'_>],
                max: bool,
                floor: f32,
                at: &mut Vec<u32>,
                values: &mut Vec<f32>,
            ) {
                #[target_feature(enable = $feat)]
                unsafe fn imp(
                    heads: &[HeadRow<'_>],
                    max: bool,
                    floor: f32,
                    at: &mut Vec<u32>,
                    values: &mut Vec<f32>,
                ) {
                    // SAFETY: the features are enabled on this function; the lengths were
                    // checked by SoftmaxKernel::combine_at_least.
                    unsafe {
                        by_digits!(
                            widest(heads),
                            $combine_at_least(heads, max, floor, at, values)
                        )
                    }
                }
                // SAFETY: as in the weight sum.
                unsafe { imp(heads, max, floor, at, values) }
            }
        };
    }

    level!(
        "avx2,fma",
        Avx2,
        combine_at_least_avx2,
        weight_sum_v3,
        weight_sum_at_v3,
        combine_v3,
        combine_at_least_v3
    );
    level!(
        "avx512f,avx512bw,avx512vl,avx2,fma",
        Avx512,
        combine_at_least_avx512,
        weight_sum_v4,
        weight_sum_at_v4,
        combine_v4,
        combine_at_least_v4
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(8);
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 200, 1000] {
            for (hi, span, step) in [
                (0u16, 0u16, 0.5f32),
                (100, 50, 0.25),
                (u16::MAX, u16::MAX, 1e-4),
                (60_000, 3, 2.0),
                (30_000, 20_000, 6e-4),
                (2_000, 1_000, 0.01),
                (5_000, 300, 0.04),
                (4_200, 4_095, 3e-3),
                (9_000, 4_096, 3e-3),
                (700, 255, 0.05),
                (700, 256, 0.05),
            ] {
                let exp = ExpTables::new(step);
                // Sums around hi: inside the span, beyond it, and above hi.
                let row: Vec<u16> = (0..n)
                    .map(|_| match rng.random_range(0..4) {
                        0 => rng.random_range(0..=u16::MAX),
                        _ => hi.saturating_sub(rng.random_range(0..=span.saturating_add(2))),
                    })
                    .collect();
                let want = weight_sum_scalar(&row, hi, span, &exp);
                for level in Level::all_supported() {
                    let k = SoftmaxKernel::for_level(level);
                    assert_eq!(
                        k.weight_sum(&row, hi, span, &exp).to_bits(),
                        want.to_bits(),
                        "{level} n {n} hi {hi} span {span}"
                    );
                }
                // Gathered: every index, a random subset in random order (repeats too), and
                // the last element (the gather must not read past it).
                if n > 0 {
                    let mut sets: Vec<Vec<u32>> = vec![(0..n as u32).collect()];
                    sets.push(
                        (0..rng.random_range(0..300))
                            .map(|_| rng.random_range(0..n as u32))
                            .collect(),
                    );
                    sets.push(vec![n as u32 - 1; 70]);
                    for at in &sets {
                        let want = weight_sum_at_scalar(&row, at, hi, span, &exp);
                        for level in Level::all_supported() {
                            let k = SoftmaxKernel::for_level(level);
                            assert_eq!(
                                k.weight_sum_at(&row, at, hi, span, &exp).to_bits(),
                                want.to_bits(),
                                "{level} n {n} |at| {} hi {hi} span {span}",
                                at.len()
                            );
                        }
                    }
                    // Every index once, in order: the plain sum, bit for bit.
                    let all: Vec<u32> = (0..n as u32).collect();
                    assert_eq!(
                        weight_sum_at_scalar(&row, &all, hi, span, &exp).to_bits(),
                        weight_sum_scalar(&row, hi, span, &exp).to_bits()
                    );
                }
                // Groups of 1..=5 heads: this row, then others with their own bounds.
                let others: Vec<(Vec<u16>, u16, u16, ExpTables)> = (0..4)
                    .map(|h| {
                        let row = (0..n).map(|_| rng.random_range(0..=u16::MAX)).collect();
                        let hi = rng.random_range(0..=u16::MAX);
                        // Even heads: spans up to this row's (so that small groups need
                        // as few tables as it does); odd heads: anything.
                        let span = if h % 2 == 0 {
                            rng.random_range(0..=span)
                        } else {
                            rng.random_range(0..=u16::MAX) >> h
                        };
                        (row, hi, span, ExpTables::new(rng.random_range(1e-4..0.5)))
                    })
                    .collect();
                for g in 1..=5 {
                    let mut heads = vec![HeadRow {
                        row: &row,
                        hi,
                        span,
                        exp: exp.clone(),
                        factor: 0.75,
                    }];
                    for (r, h, s, e) in &others[..g - 1] {
                        heads.push(HeadRow {
                            row: r,
                            hi: *h,
                            span: *s,
                            exp: e.clone(),
                            factor: 1.0 / (1.0 + *h as f32),
                        });
                    }
                    for max in [false, true] {
                        let mut want = vec![f32::NAN; n];
                        combine_scalar(&heads, &mut want, max);
                        for level in Level::all_supported() {
                            let mut got = vec![f32::NAN; n];
                            SoftmaxKernel::for_level(level).combine(&heads, &mut got, max);
                            assert_eq!(got, want, "{level} n {n} heads {g} max {max}");
                        }
                        // Kept at or above a floor: the combined weights filtered, in order,
                        // on every level; floors at a present weight (ties), zero, above all.
                        let mut floors = vec![0.0f32, f32::INFINITY, 1e-3];
                        floors.extend(
                            (0..3)
                                .filter(|_| n > 0)
                                .map(|_| want[rng.random_range(0..n)]),
                        );
                        for floor in floors {
                            let (want_at, want_values): (Vec<u32>, Vec<f32>) = (0..n as u32)
                                .zip(want.iter().copied())
                                .filter(|&(_, v)| v >= floor)
                                .unzip();
                            for level in Level::all_supported() {
                                // Non-empty vectors: the survivors are appended.
                                let (mut at, mut values) = (vec![7u32], vec![0.5f32]);
                                SoftmaxKernel::for_level(level).combine_at_least(
                                    &heads,
                                    max,
                                    floor,
                                    &mut at,
                                    &mut values,
                                );
                                assert_eq!(
                                    at[1..],
                                    want_at,
                                    "{level} n {n} heads {g} floor {floor}"
                                );
                                let bits =
                                    |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(bits(&values[1..]), bits(&want_values), "{level} n {n}");
                                assert_eq!((at[0], values[0]), (7, 0.5));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weights_follow_the_rule_and_the_exponential() {
        let exp = ExpTables::new(0.01);
        for d in [0u16, 1, 15, 16, 255, 256, 4095, 4096, 20_000, u16::MAX] {
            // The tables take the f32 step as given.
            let want = (-(0.01f32 as f64) * d as f64).exp();
            let got = exp.weight(d) as f64;
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want + 1e-38,
                "d {d}: {got} vs {want}"
            );
        }
        // Above hi: weight 1; beyond the span: 0.
        for level in Level::all_supported() {
            let k = SoftmaxKernel::for_level(level);
            let row = [110u16, 100, 99, 98, 97];
            let s = k.weight_sum(&row, 100, 2, &exp);
            let want = 1.0 + 1.0 + exp.weight(1) + exp.weight(2);
            assert!((s - want).abs() < 1e-6, "{level}: {s} vs {want}");
        }
    }

    /// An index past the row panics on every level, wherever it stands (in a gathered block
    /// or in the scalar tail) and however large (sign bit set: a signed compare would let
    /// the gather read before the row); the last element itself is read, not refused.
    #[test]
    fn weight_sum_at_refuses_an_index_past_the_row() {
        let exp = ExpTables::new(0.05);
        let row: Vec<u16> = (0..300u16).map(|i| 1000 - i).collect();
        let valid: Vec<u32> = (0..130u32).map(|j| (j * 37) % 300).collect();
        for level in Level::all_supported() {
            let k = SoftmaxKernel::for_level(level);
            let mut at = valid.clone();
            at[70] = 299;
            at[129] = 299;
            assert_eq!(
                k.weight_sum_at(&row, &at, 1000, 200, &exp).to_bits(),
                weight_sum_at_scalar(&row, &at, 1000, 200, &exp).to_bits(),
                "{level}"
            );
            for (j, bad) in [(5, 300u32), (63, u32::MAX), (127, 1 << 31), (129, 300)] {
                let mut at = valid.clone();
                at[j] = bad;
                let r = std::panic::catch_unwind(|| k.weight_sum_at(&row, &at, 1000, 200, &exp));
                let msg = r.expect_err("an index past the row was read");
                let msg = msg.downcast_ref::<&str>().copied().unwrap_or_default();
                assert_eq!(
                    msg, "weight_sum_at: index out of the row",
                    "{level} at[{j}]"
                );
            }
            let r = std::panic::catch_unwind(|| k.weight_sum_at(&[], &valid, 1000, 200, &exp));
            assert!(r.is_err(), "{level}: an empty row");
        }
    }
}
