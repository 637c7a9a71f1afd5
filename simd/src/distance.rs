//! Dot products and squared L2 distances: f32 x f32 and f32 x f16.
//!
//! Layout: a query is `d` contiguous f32; a row block is `n * d` contiguous values (f32 or
//! IEEE binary16), row-major, row `i` at `[i * d, (i + 1) * d)`. The `*_rows` kernels write one
//! score per row into `out[..n]`.
//!
//! Algorithm: the scalar reference keeps 8 partial sums (lane `l` takes elements `8c + l`),
//! then adds them pairwise; the v3 kernel keeps four 8-lane FMA accumulators, the v4 kernel
//! four 16-lane ones with a masked tail. The order of additions differs between levels, so
//! results agree to rounding, not bit for bit: the tests bound the error against an f64
//! reference by `len * eps * sum |a_i b_i|` (the classic bound for recursive summation).

use crate::level::Level;
use half::f16;

/// Group dot products over every row (`None`) or the rows at the given positions.
type GroupDotFn = fn(&[f32], usize, &[f16], Option<&[u32]>, &mut [f32]);

/// One query against every row: `out[i] = f(q, row_i)`, in one loop that calls no function
/// per row. The caller checked `q.len() > 0` and `rows.len() == out.len() * q.len()`.
type RowsFn<T> = fn(&[f32], &[T], &mut [f32]);

/// From this many bytes of rows on, [`rows_in_streams`] reads four streams (a few L2s'
/// worth: below it the rows are likely cached).
const STREAMS_MIN_BYTES: usize = 4 << 20;

/// `out[i] = one(q, row_i)` for every row (`q.len()` wide, `out.len()` of them), the rows
/// taken as four interleaved streams: row `i` of each quarter in turn, then the last
/// `n % 4`. Each score is `one`'s, bit for bit; only the order of the reads changes. From
/// memory four sequential streams read faster than one: 67 MB of 128-wide f32 rows at
/// 31 GB/s against 20-24 GB/s on this Zen 4 (the prefetchers keep more lines in flight),
/// and a single query's exact search is bound by that read.
///
/// Rows under [`STREAMS_MIN_BYTES`] (likely cached) are read in order: over 2.4 MB of
/// 37-wide rows in cache the interleaving cost 15 % (46.7 against 53.8 us), and within
/// 3 % either way at 128 wide; from memory it gains 1.4x (1,113 against 785 us over 33.6 MB).
#[inline(always)]
fn rows_in_streams<T>(q: &[f32], rows: &[T], out: &mut [f32], one: impl Fn(&[f32], &[T]) -> f32) {
    let d = q.len();
    if std::mem::size_of_val(rows) < STREAMS_MIN_BYTES {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
            *o = one(q, row);
        }
        return;
    }
    let quarter = out.len() / 4;
    let (heads, tail) = out.split_at_mut(4 * quarter);
    let (o01, o23) = heads.split_at_mut(2 * quarter);
    let ((o0, o1), (o2, o3)) = (o01.split_at_mut(quarter), o23.split_at_mut(quarter));
    let span = quarter * d;
    let r = |s: usize| rows[s * span..(s + 1) * span].chunks_exact(d);
    let scores = o0
        .iter_mut()
        .zip(o1.iter_mut())
        .zip(o2.iter_mut().zip(o3.iter_mut()));
    let streams = r(0).zip(r(1)).zip(r(2).zip(r(3)));
    for (((a, b), (c, e)), ((ra, rb), (rc, re))) in scores.zip(streams) {
        *a = one(q, ra);
        *b = one(q, rb);
        *c = one(q, rc);
        *e = one(q, re);
    }
    for (o, row) in tail.iter_mut().zip(rows[4 * span..].chunks_exact(d)) {
        *o = one(q, row);
    }
}

/// A [`RowsFn`] that applies `$one` to each row through [`rows_in_streams`] (its calls
/// inline into the loop): the row loops of the levels without target features of their own.
macro_rules! rows_of {
    ($name:ident, $one:path, $elem:ty) => {
        pub(super) fn $name(q: &[f32], rows: &[$elem], out: &mut [f32]) {
            super::rows_in_streams(q, rows, out, $one)
        }
    };
}

/// A table of distance kernels resolved for one [`Level`].
#[derive(Clone, Copy)]
pub struct DistanceKernels {
    level: Level,
    dot_f32: fn(&[f32], &[f32]) -> f32,
    l2sq_f32: fn(&[f32], &[f32]) -> f32,
    dot_f16: fn(&[f32], &[f16]) -> f32,
    l2sq_f16: fn(&[f32], &[f16]) -> f32,
    axpy: fn(f32, &[f32], &mut [f32]),
    axpy_cols16: Cols16Fn,
    dot_group_f16: GroupDotFn,
    dot_rows_f32: RowsFn<f32>,
    l2sq_rows_f32: RowsFn<f32>,
    dot_rows_f16: RowsFn<f16>,
    l2sq_rows_f16: RowsFn<f16>,
}

type Cols16Fn = fn(f32, &[f32], &[f32], &mut [f32]);

impl std::fmt::Debug for DistanceKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistanceKernels")
            .field("level", &self.level)
            .finish()
    }
}

impl DistanceKernels {
    /// Kernels for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> DistanceKernels {
        let level = level.capped();
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::V4 | Level::V4Icl => DistanceKernels {
                level,
                dot_f32: x86::dot_f32_v4,
                l2sq_f32: x86::l2sq_f32_v4,
                dot_f16: x86::dot_f16_v4,
                l2sq_f16: x86::l2sq_f16_v4,
                axpy: x86::axpy_v4,
                axpy_cols16: x86::axpy_cols16_v4,
                dot_group_f16: x86::dot_group_f16_v4,
                dot_rows_f32: x86::dot_rows_f32_v4,
                l2sq_rows_f32: x86::l2sq_rows_f32_v4,
                dot_rows_f16: x86::dot_rows_f16_v4,
                l2sq_rows_f16: x86::l2sq_rows_f16_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => DistanceKernels {
                level,
                dot_f32: x86::dot_f32_v3,
                l2sq_f32: x86::l2sq_f32_v3,
                dot_f16: x86::dot_f16_v3,
                l2sq_f16: x86::l2sq_f16_v3,
                axpy: x86::axpy_v3,
                axpy_cols16: x86::axpy_cols16_v3,
                dot_group_f16: x86::dot_group_f16_v3,
                dot_rows_f32: x86::dot_rows_f32_v3,
                l2sq_rows_f32: x86::l2sq_rows_f32_v3,
                dot_rows_f16: x86::dot_rows_f16_v3,
                l2sq_rows_f16: x86::l2sq_rows_f16_v3,
            },
            #[cfg(target_arch = "aarch64")]
            Level::Neon => DistanceKernels {
                level,
                dot_f32: neon::dot_f32,
                l2sq_f32: neon::l2sq_f32,
                dot_f16: scalar::dot_f16,
                l2sq_f16: scalar::l2sq_f16,
                axpy: scalar::axpy,
                axpy_cols16: scalar::axpy_cols16,
                dot_group_f16: scalar::dot_group_f16,
                dot_rows_f32: neon::dot_rows_f32,
                l2sq_rows_f32: neon::l2sq_rows_f32,
                dot_rows_f16: portable_rows::dot_rows_f16,
                l2sq_rows_f16: portable_rows::l2sq_rows_f16,
            },
            _ => DistanceKernels {
                level: Level::Scalar,
                dot_f32: scalar::dot_f32,
                l2sq_f32: scalar::l2sq_f32,
                dot_f16: scalar::dot_f16,
                l2sq_f16: scalar::l2sq_f16,
                axpy: scalar::axpy,
                axpy_cols16: scalar::axpy_cols16,
                dot_group_f16: scalar::dot_group_f16,
                dot_rows_f32: portable_rows::dot_rows_f32,
                l2sq_rows_f32: portable_rows::l2sq_rows_f32,
                dot_rows_f16: portable_rows::dot_rows_f16,
                l2sq_rows_f16: portable_rows::l2sq_rows_f16,
            },
        }
    }

    /// Kernels for [`Level::best`].
    pub fn best() -> DistanceKernels {
        DistanceKernels::for_level(Level::best())
    }

    /// The level these kernels were resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// `sum_i a[i] * b[i]`. Panics if the lengths differ.
    #[inline]
    pub fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f32: length mismatch");
        (self.dot_f32)(a, b)
    }

    /// `sum_i (a[i] - b[i])^2`. Panics if the lengths differ.
    #[inline]
    pub fn l2sq_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "l2sq_f32: length mismatch");
        (self.l2sq_f32)(a, b)
    }

    /// `sum_i q[i] * x[i]` with `x` in binary16, computed in f32. Panics if the lengths differ.
    #[inline]
    pub fn dot_f16(&self, q: &[f32], x: &[f16]) -> f32 {
        assert_eq!(q.len(), x.len(), "dot_f16: length mismatch");
        (self.dot_f16)(q, x)
    }

    /// `sum_i (q[i] - x[i])^2` with `x` in binary16. Panics if the lengths differ.
    #[inline]
    pub fn l2sq_f16(&self, q: &[f32], x: &[f16]) -> f32 {
        assert_eq!(q.len(), x.len(), "l2sq_f16: length mismatch");
        (self.l2sq_f16)(q, x)
    }

    /// `y[i] += alpha * x[i]` (fused multiply-add on v3/v4: results agree with the scalar
    /// reference to one rounding per element). Panics if the lengths differ.
    #[inline]
    pub fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "axpy: length mismatch");
        (self.axpy)(alpha, x, y)
    }

    /// For each of the `m = rows.len() / 16` rows of 16 (`dsub = q.len() / m` elements of `q`
    /// and `dsub` columns of 16 of `cols` each): `row_j[c] += (alpha * q_j[t]) * cols_j[16 t +
    /// c]` for `t` in order, each a multiplication then an addition (no fused multiply-add):
    /// the same bits on every level. A 4-bit product quantizer's table (`cols`: each
    /// sub-codebook transposed), every row in one call: the rows' addition chains overlap,
    /// where a call per row waited on each. Panics unless `rows.len()` is a multiple of 16,
    /// `q.len()` of `m` and `cols.len() == 16 * q.len()`.
    pub fn axpy_cols16(&self, alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
        let m = rows.len() / 16;
        // Every row gets the same number of elements of q (none when there are no rows).
        let even = if m == 0 {
            q.is_empty()
        } else {
            q.len().is_multiple_of(m)
        };
        assert!(
            rows.len().is_multiple_of(16) && even && cols.len() == 16 * q.len(),
            "axpy_cols16: length mismatch"
        );
        (self.axpy_cols16)(alpha, q, cols, rows)
    }

    /// Scores of one query against `out.len()` rows of `rows` (row-major, `q.len()` wide):
    /// `out[i] = dot(q, row_i)`. Panics unless `rows.len() == out.len() * q.len()`.
    pub fn dot_rows_f32(&self, q: &[f32], rows: &[f32], out: &mut [f32]) {
        rows_apply(q, rows, out, self.dot_rows_f32);
    }

    /// `out[i] = ||q - row_i||^2`, as [`DistanceKernels::dot_rows_f32`].
    pub fn l2sq_rows_f32(&self, q: &[f32], rows: &[f32], out: &mut [f32]) {
        rows_apply(q, rows, out, self.l2sq_rows_f32);
    }

    /// `out[i] = dot(q, row_i)` with binary16 rows.
    pub fn dot_rows_f16(&self, q: &[f32], rows: &[f16], out: &mut [f32]) {
        rows_apply(q, rows, out, self.dot_rows_f16);
    }

    /// `out[i] = ||q - row_i||^2` with binary16 rows.
    pub fn l2sq_rows_f16(&self, q: &[f32], rows: &[f16], out: &mut [f32]) {
        rows_apply(q, rows, out, self.l2sq_rows_f16);
    }

    /// Dot products of a group of `g` queries (`queries`: `g * d`, `d = queries.len() / g`)
    /// with every row of `rows` (`n * d` binary16): `out[q * n + i] = dot(query_q, row_i)`.
    /// Each row is loaded and widened once for the whole group (the GQA case: the query heads
    /// sharing a KV head). Panics if the shapes disagree or `g` is 0.
    pub fn dot_group_rows_f16(&self, queries: &[f32], g: usize, rows: &[f16], out: &mut [f32]) {
        assert!(
            g > 0 && queries.len().is_multiple_of(g),
            "queries must hold g rows"
        );
        let d = queries.len() / g;
        let n = rows.len().checked_div(d).unwrap_or(0);
        assert_eq!(rows.len(), n * d, "rows length must be n * d");
        assert_eq!(out.len(), g * n, "out length must be g * n");
        (self.dot_group_f16)(queries, g, rows, None, out)
    }

    /// [`DistanceKernels::dot_group_rows_f16`] over the rows at `positions` of `rows` (`n`
    /// positions, in any order, repeats allowed), read in place:
    /// `out[q * n + j] = dot(query_q, row_{positions[j]})`. Panics if the shapes disagree, `g`
    /// is 0 or a position is out of range.
    pub fn dot_group_at_f16(
        &self,
        queries: &[f32],
        g: usize,
        rows: &[f16],
        positions: &[u32],
        out: &mut [f32],
    ) {
        assert!(
            g > 0 && queries.len().is_multiple_of(g),
            "queries must hold g rows"
        );
        let d = queries.len() / g;
        let nrows = rows.len().checked_div(d).unwrap_or(0);
        assert_eq!(rows.len(), nrows * d, "rows length must be a multiple of d");
        assert!(
            d == 0 || positions.iter().all(|&p| (p as usize) < nrows),
            "position out of range"
        );
        assert_eq!(
            out.len(),
            g * positions.len(),
            "out length must be g * positions"
        );
        (self.dot_group_f16)(queries, g, rows, Some(positions), out)
    }
}

/// Checks the shapes of a row kernel's call and runs it (`d == 0`: every score 0).
fn rows_apply<T>(q: &[f32], rows: &[T], out: &mut [f32], f: RowsFn<T>) {
    let d = q.len();
    assert_eq!(rows.len(), out.len() * d, "rows length must be n * d");
    if d == 0 {
        out.fill(0.0);
        return;
    }
    f(q, rows, out)
}

/// The row loops of the scalar level (and NEON's f16 rows).
mod portable_rows {
    use half::f16;
    rows_of!(dot_rows_f32, super::scalar::dot_f32, f32);
    rows_of!(l2sq_rows_f32, super::scalar::l2sq_f32, f32);
    rows_of!(dot_rows_f16, super::scalar::dot_f16, f16);
    rows_of!(l2sq_rows_f16, super::scalar::l2sq_f16, f16);
}

/// Scalar reference kernels: the fallback on any CPU and the oracle of the tests.
pub mod scalar {
    use half::f16;

    const LANES: usize = 8;

    #[inline(always)]
    fn reduce(acc: [f32; LANES]) -> f32 {
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    #[inline(always)]
    fn fold<A: Copy, B: Copy>(a: &[A], b: &[B], term: impl Fn(A, B) -> f32) -> f32 {
        let mut acc = [0.0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..LANES {
                acc[l] += term(x[l], y[l]);
            }
        }
        for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
            acc[l] += term(x, y);
        }
        reduce(acc)
    }

    /// `sum a[i] * b[i]`.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        fold(a, b, |x, y| x * y)
    }

    /// `sum (a[i] - b[i])^2`.
    pub fn l2sq_f32(a: &[f32], b: &[f32]) -> f32 {
        fold(a, b, |x, y| {
            let t = x - y;
            t * t
        })
    }

    /// `y[i] += alpha * x[i]`.
    pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += alpha * v;
        }
    }

    /// Reference of `DistanceKernels::axpy_cols16` (shapes checked there).
    pub fn axpy_cols16(alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
        let m = rows.len() / 16;
        let dsub = q.len() / m.max(1);
        for (j, row) in rows.chunks_exact_mut(16).enumerate() {
            let (qj, cj) = (&q[j * dsub..(j + 1) * dsub], &cols[j * dsub * 16..]);
            for (&qt, col) in qj.iter().zip(cj.chunks_exact(16)) {
                let a = alpha * qt;
                for (r, &c) in row.iter_mut().zip(col) {
                    *r += a * c;
                }
            }
        }
    }

    /// Group dot products, query-major output (see `DistanceKernels::dot_group_rows_f16`),
    /// over every row or the rows `at` the given positions.
    pub fn dot_group_f16(
        queries: &[f32],
        g: usize,
        rows: &[f16],
        at: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let d = queries.len() / g;
        if d == 0 {
            out.fill(0.0);
            return;
        }
        let n = at.map_or(rows.len() / d, <[u32]>::len);
        for i in 0..n {
            let p = at.map_or(i, |a| a[i] as usize);
            let row = &rows[p * d..(p + 1) * d];
            for q in 0..g {
                out[q * n + i] = dot_f16(&queries[q * d..(q + 1) * d], row);
            }
        }
    }

    /// `sum q[i] * x[i]`, `x` in binary16.
    pub fn dot_f16(q: &[f32], x: &[f16]) -> f32 {
        fold(q, x, |a, b| a * b.to_f32())
    }

    /// `sum (q[i] - x[i])^2`, `x` in binary16.
    pub fn l2sq_f16(q: &[f32], x: &[f16]) -> f32 {
        fold(q, x, |a, b| {
            let t = a - b.to_f32();
            t * t
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes.
    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        // SAFETY: the caller runs under AVX (implied by every level that calls this).
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps::<1>(v);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    /// Loads 8 lanes from `p` as f32 (f32 loads directly, f16 converts with F16C).
    trait Load8: Copy {
        /// # Safety
        /// `p` must be valid for reading 8 elements; the CPU must support AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        /// # Safety
        /// `p` must be valid for reading 16 elements; the CPU must support AVX-512F.
        unsafe fn load16(p: *const Self) -> __m512;
        /// # Safety
        /// `p` must be valid for reading the lanes set in `mask`; AVX-512F/BW/VL.
        unsafe fn load16_mask(p: *const Self, mask: u16) -> __m512;
        fn to_f32(self) -> f32;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f32 at p.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable f32 at p.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load16_mask(p: *const f32, mask: u16) -> __m512 {
            // SAFETY: masked-off lanes are not read (AVX-512 fault suppression).
            unsafe { _mm512_maskz_loadu_ps(mask, p) }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: f16 is a transparent u16; the caller guarantees 8 readable halves.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: 16 readable halves (32 bytes), AVX-512F provides the conversion.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn load16_mask(p: *const f16, mask: u16) -> __m512 {
            // SAFETY: masked-off 16-bit lanes are not read (AVX-512BW+VL fault suppression).
            unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)) }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    /// `sum_i term(a[i], b[i])` on AVX2: four 8-lane accumulators over blocks of 32 (each
    /// lane's terms added by `step(x, y, acc)`), then blocks of 8 into the first, the lanes
    /// summed, and the rest term by term (`term`, the scalar form of `step`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `step` a register operation.
    #[inline(always)]
    unsafe fn fold_v3<T: Load8>(
        a: &[f32],
        b: &[T],
        step: impl Fn(__m256, __m256, __m256) -> __m256,
        term: impl Fn(f32, f32) -> f32,
    ) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: every load below reads indices < n of both slices; the features are
        // enabled by the calling #[target_feature] entry point.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * u;
                    *a = step(_mm256_loadu_ps(pa.add(o)), T::load8(pb.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = step(_mm256_loadu_ps(pa.add(i)), T::load8(pb.add(i)), acc[0]);
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum256(s);
            while i < n {
                total += term(*pa.add(i), (*pb.add(i)).to_f32());
                i += 1;
            }
            total
        }
    }

    /// As [`fold_v3`] on AVX-512, with 16-lane accumulators over blocks of 64 and 16; the
    /// rest is one masked step (masked-off lanes load as zeros, which every step maps to 0).
    ///
    /// # Safety
    /// AVX-512F/BW/VL and F16C available; `step` a register operation with
    /// `step(0, 0, acc) == acc`.
    #[inline(always)]
    unsafe fn fold_v4<T: Load8>(
        a: &[f32],
        b: &[T],
        step: impl Fn(__m512, __m512, __m512) -> __m512,
    ) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: full loads read indices < n; the tail uses masked loads that touch only
        // the `n - i` remaining elements. The features are enabled by the entry point.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 16 * u;
                    *a = step(_mm512_loadu_ps(pa.add(o)), T::load16(pb.add(o)), *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = step(_mm512_loadu_ps(pa.add(i)), T::load16(pb.add(i)), acc[0]);
                i += 16;
            }
            if i < n {
                let mask: u16 = ((1u32 << (n - i)) - 1) as u16;
                let x = _mm512_maskz_loadu_ps(mask, pa.add(i));
                acc[1] = step(x, T::load16_mask(pb.add(i), mask), acc[1]);
            }
            let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_reduce_add_ps(s)
        }
    }

    /// # Safety
    /// As [`fold_v3`].
    #[inline(always)]
    unsafe fn dot_v3<T: Load8>(a: &[f32], b: &[T]) -> f32 {
        // SAFETY: as stated; the step is a register operation.
        unsafe { fold_v3(a, b, |x, y, acc| _mm256_fmadd_ps(x, y, acc), |x, y| x * y) }
    }

    /// # Safety
    /// As [`fold_v3`].
    #[inline(always)]
    unsafe fn l2sq_v3<T: Load8>(a: &[f32], b: &[T]) -> f32 {
        // SAFETY: as stated; the step is a register operation.
        unsafe {
            fold_v3(
                a,
                b,
                |x, y, acc| {
                    let t = _mm256_sub_ps(x, y);
                    _mm256_fmadd_ps(t, t, acc)
                },
                |x, y| (x - y) * (x - y),
            )
        }
    }

    /// # Safety
    /// As [`fold_v4`].
    #[inline(always)]
    unsafe fn dot_v4<T: Load8>(a: &[f32], b: &[T]) -> f32 {
        // SAFETY: as stated; 0 * 0 adds nothing.
        unsafe { fold_v4(a, b, |x, y, acc| _mm512_fmadd_ps(x, y, acc)) }
    }

    /// # Safety
    /// As [`fold_v4`].
    #[inline(always)]
    unsafe fn l2sq_v4<T: Load8>(a: &[f32], b: &[T]) -> f32 {
        // SAFETY: as stated; (0 - 0)^2 adds nothing.
        unsafe {
            fold_v4(a, b, |x, y, acc| {
                let t = _mm512_sub_ps(x, y);
                _mm512_fmadd_ps(t, t, acc)
            })
        }
    }

    #[inline(always)]
    unsafe fn axpy_v3_raw(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        // SAFETY: indices < n of both slices; AVX2/FMA enabled by the entry point.
        unsafe {
            let a = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
            while i < n {
                *py.add(i) = alpha.mul_add(*px.add(i), *py.add(i));
                i += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn axpy_v4_raw(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        // SAFETY: full vectors cover indices < n; the masked tail touches only the rest.
        unsafe {
            let a = _mm512_set1_ps(alpha);
            let mut i = 0;
            while i + 16 <= n {
                let v = _mm512_fmadd_ps(a, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
                _mm512_storeu_ps(py.add(i), v);
                i += 16;
            }
            if i < n {
                let mask: u16 = ((1u32 << (n - i)) - 1) as u16;
                let v = _mm512_fmadd_ps(
                    a,
                    _mm512_maskz_loadu_ps(mask, px.add(i)),
                    _mm512_maskz_loadu_ps(mask, py.add(i)),
                );
                _mm512_mask_storeu_ps(py.add(i), mask, v);
            }
        }
    }

    pub(super) fn axpy_cols16_v3(alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn imp(alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
            let dsub = q.len() / (rows.len() / 16).max(1);
            for (j, row) in rows.chunks_exact_mut(16).enumerate() {
                // SAFETY: row j's dsub columns of 16 lie inside cols (16 per element of q,
                // checked by the caller); the row holds 16 floats, as two halves.
                unsafe {
                    let p = cols.as_ptr().add(16 * dsub * j);
                    let (mut lo, mut hi) = (
                        _mm256_loadu_ps(row.as_ptr()),
                        _mm256_loadu_ps(row.as_ptr().add(8)),
                    );
                    for (t, &qt) in q[dsub * j..dsub * (j + 1)].iter().enumerate() {
                        let a = _mm256_set1_ps(alpha * qt);
                        lo = _mm256_add_ps(lo, _mm256_mul_ps(a, _mm256_loadu_ps(p.add(16 * t))));
                        hi =
                            _mm256_add_ps(hi, _mm256_mul_ps(a, _mm256_loadu_ps(p.add(16 * t + 8))));
                    }
                    _mm256_storeu_ps(row.as_mut_ptr(), lo);
                    _mm256_storeu_ps(row.as_mut_ptr().add(8), hi);
                }
            }
        }
        // SAFETY: only reachable through a table built for a level >= V3 the CPU supports.
        unsafe { imp(alpha, q, cols, rows) }
    }

    pub(super) fn axpy_cols16_v4(alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn imp(alpha: f32, q: &[f32], cols: &[f32], rows: &mut [f32]) {
            let dsub = q.len() / (rows.len() / 16).max(1);
            for (j, row) in rows.chunks_exact_mut(16).enumerate() {
                // SAFETY: as in axpy_cols16_v3, one register per row.
                unsafe {
                    let p = cols.as_ptr().add(16 * dsub * j);
                    let mut r = _mm512_loadu_ps(row.as_ptr());
                    for (t, &qt) in q[dsub * j..dsub * (j + 1)].iter().enumerate() {
                        let a = _mm512_set1_ps(alpha * qt);
                        r = _mm512_add_ps(r, _mm512_mul_ps(a, _mm512_loadu_ps(p.add(16 * t))));
                    }
                    _mm512_storeu_ps(row.as_mut_ptr(), r);
                }
            }
        }
        // SAFETY: only reachable through a table built for V4 or above, which the CPU supports.
        unsafe { imp(alpha, q, cols, rows) }
    }

    pub(super) fn axpy_v3(alpha: f32, x: &[f32], y: &mut [f32]) {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn imp(alpha: f32, x: &[f32], y: &mut [f32]) {
            // SAFETY: the features are enabled on this function.
            unsafe { axpy_v3_raw(alpha, x, y) }
        }
        // SAFETY: only reachable through a table built for a level >= V3 the CPU supports.
        unsafe { imp(alpha, x, y) }
    }

    pub(super) fn axpy_v4(alpha: f32, x: &[f32], y: &mut [f32]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn imp(alpha: f32, x: &[f32], y: &mut [f32]) {
            // SAFETY: the features are enabled on this function.
            unsafe { axpy_v4_raw(alpha, x, y) }
        }
        // SAFETY: only reachable through a table built for V4, which the CPU supports.
        unsafe { imp(alpha, x, y) }
    }

    /// Rows scored at scattered positions are requested this many positions ahead: the
    /// hardware prefetcher cannot guess the next position, and a row fetched only when it is
    /// scored costs a full memory latency (measured: re-ranking 25K rows of 256 bytes per
    /// head: 29 -> 21 ms per 8-head step at 128K tokens, `fastscan:64x4:rerank4`).
    const PREFETCH_AHEAD: usize = 32;

    /// Asks for the rows at `at[from..from + count]` (those that exist) to be brought into
    /// the cache.
    #[inline(always)]
    fn prefetch_rows(rows: &[f16], at: &[u32], from: usize, count: usize, d: usize) {
        for &p in at.iter().skip(from).take(count) {
            let row = rows.as_ptr().wrapping_add(p as usize * d) as *const i8;
            let mut off = 0;
            while off < d * 2 {
                // SAFETY: a prefetch is a hint that never faults; the address lies in `rows`
                // (positions are checked against the rows by the public entry points).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(off)) };
                off += 64;
            }
        }
    }

    /// Group dot products with `L`-lane registers: rows two at a time, each 8/16-wide chunk
    /// of a row widened once and multiplied into every query's accumulator. The query count
    /// is a const parameter (groups of 4) so that the `2 x NQ` accumulators live in registers:
    /// independent FMA chains enough to cover the FMA latency. Rows at scattered positions
    /// are prefetched [`PREFETCH_AHEAD`] positions ahead.
    macro_rules! group_kernel {
        ($name:ident, $feat:literal, $w:expr, $vec:ty, $zero:ident, $load_q:ident, $fma:ident, $reduce:expr, $load_h:expr) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name(
                queries: &[f32],
                g: usize,
                rows: &[f16],
                at: Option<&[u32]>,
                out: &mut [f32],
            ) {
                let d = queries.len() / g;
                if d == 0 {
                    out.fill(0.0);
                    return;
                }
                let n = at.map_or(rows.len() / d, <[u32]>::len);
                #[inline(always)]
                unsafe fn tail(q: &[f32], row: &[f16], from: usize) -> f32 {
                    let mut t = 0.0f32;
                    for c in from..q.len() {
                        t += q[c] * row[c].to_f32();
                    }
                    t
                }
                /// Outputs `i0..i0 + R` (rows `i0..` or at `at[i0..]`) against queries
                /// `q0..q0 + NQ`.
                #[inline(always)]
                unsafe fn tile<const R: usize, const NQ: usize>(
                    queries: &[f32],
                    q0: usize,
                    (rows, at): (&[f16], Option<&[u32]>),
                    i0: usize,
                    d: usize,
                    n: usize,
                    out: &mut [f32],
                ) {
                    let full = d / $w * $w;
                    let phys: [usize; R] =
                        std::array::from_fn(|r| at.map_or(i0 + r, |a| a[i0 + r] as usize));
                    // SAFETY: loads read columns < full <= d of rows phys[r] (< rows / d,
                    // checked by the caller) and of queries q0..q0 + NQ (< g).
                    unsafe {
                        let mut acc: [[$vec; NQ]; R] = [[$zero(); NQ]; R];
                        let mut c = 0;
                        while c < full {
                            for r in 0..R {
                                let x = $load_h(rows.as_ptr().add(phys[r] * d + c));
                                for j in 0..NQ {
                                    acc[r][j] = $fma(
                                        $load_q(queries.as_ptr().add((q0 + j) * d + c)),
                                        x,
                                        acc[r][j],
                                    );
                                }
                            }
                            c += $w;
                        }
                        for r in 0..R {
                            let row = &rows[phys[r] * d..(phys[r] + 1) * d];
                            for j in 0..NQ {
                                let q = &queries[(q0 + j) * d..(q0 + j + 1) * d];
                                let t = if full < d { tail(q, row, full) } else { 0.0 };
                                out[(q0 + j) * n + i0 + r] = $reduce(acc[r][j]) + t;
                            }
                        }
                    }
                }
                #[inline(always)]
                unsafe fn run<const NQ: usize>(
                    queries: &[f32],
                    q0: usize,
                    rows: &[f16],
                    at: Option<&[u32]>,
                    d: usize,
                    n: usize,
                    out: &mut [f32],
                ) {
                    let mut i = 0;
                    // SAFETY: i + 2 <= n and i < n respectively; q0 + NQ <= g.
                    unsafe {
                        while i + 2 <= n {
                            if let Some(at) = at {
                                prefetch_rows(rows, at, i + PREFETCH_AHEAD, 2, d);
                            }
                            tile::<2, NQ>(queries, q0, (rows, at), i, d, n, out);
                            i += 2;
                        }
                        if i < n {
                            tile::<1, NQ>(queries, q0, (rows, at), i, d, n, out);
                        }
                    }
                }
                let mut q0 = 0;
                while q0 < g {
                    // SAFETY: every call covers queries q0..q0 + NQ <= g and rows < n.
                    unsafe {
                        match g - q0 {
                            1 => run::<1>(queries, q0, rows, at, d, n, out),
                            2 => run::<2>(queries, q0, rows, at, d, n, out),
                            3 => run::<3>(queries, q0, rows, at, d, n, out),
                            _ => run::<4>(queries, q0, rows, at, d, n, out),
                        }
                    }
                    q0 += 4;
                }
            }
        };
    }

    group_kernel!(
        dot_group_v3_imp,
        "avx2,fma,f16c",
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        |v| hsum256(v),
        |p: *const f16| f16::load8(p)
    );
    group_kernel!(
        dot_group_v4_imp,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        |v| _mm512_reduce_add_ps(v),
        |p: *const f16| f16::load16(p)
    );

    pub(super) fn dot_group_f16_v3(
        queries: &[f32],
        g: usize,
        rows: &[f16],
        at: Option<&[u32]>,
        out: &mut [f32],
    ) {
        // SAFETY: only reachable through a table built for a level >= V3 the CPU supports;
        // shapes and positions checked by the public entry points.
        unsafe { dot_group_v3_imp(queries, g, rows, at, out) }
    }

    pub(super) fn dot_group_f16_v4(
        queries: &[f32],
        g: usize,
        rows: &[f16],
        at: Option<&[u32]>,
        out: &mut [f32],
    ) {
        // SAFETY: only reachable through a table built for V4, which the CPU supports;
        // shapes and positions checked by the public entry points.
        unsafe { dot_group_v4_imp(queries, g, rows, at, out) }
    }

    macro_rules! entry {
        ($name:ident, $rows:ident, $raw:ident, $elem:ty, $feat:literal) => {
            /// Safe entry point, reachable only through a kernel table built for a level the
            /// CPU supports.
            pub(super) fn $name(a: &[f32], b: &[$elem]) -> f32 {
                #[target_feature(enable = $feat)]
                unsafe fn imp(a: &[f32], b: &[$elem]) -> f32 {
                    // SAFETY: the features are enabled on this function.
                    unsafe { $raw(a, b) }
                }
                debug_assert!(crate::Level::detected() >= crate::Level::V3);
                // SAFETY: tables holding this function are only built when `Level::capped`
                // confirmed the CPU supports the level named in the function's suffix.
                unsafe { imp(a, b) }
            }

            /// The row loop of the same kernel (a [`super::RowsFn`]): every row's score in
            /// one function with the features on, the rows read by
            /// [`super::rows_in_streams`]; the same bits as one call per row. A call per row
            /// through the table was 4-10 % slower over 128-wide rows in cache.
            pub(super) fn $rows(q: &[f32], rows: &[$elem], out: &mut [f32]) {
                #[target_feature(enable = $feat)]
                unsafe fn imp(q: &[f32], rows: &[$elem], out: &mut [f32]) {
                    super::rows_in_streams(q, rows, out, |q, row| {
                        // SAFETY: the features are enabled on this function, whose closures
                        // inherit them.
                        unsafe { $raw(q, row) }
                    })
                }
                debug_assert!(crate::Level::detected() >= crate::Level::V3);
                // SAFETY: as for the single kernel above.
                unsafe { imp(q, rows, out) }
            }
        };
    }

    entry!(dot_f32_v3, dot_rows_f32_v3, dot_v3, f32, "avx2,fma,f16c");
    entry!(l2sq_f32_v3, l2sq_rows_f32_v3, l2sq_v3, f32, "avx2,fma,f16c");
    entry!(dot_f16_v3, dot_rows_f16_v3, dot_v3, f16, "avx2,fma,f16c");
    entry!(l2sq_f16_v3, l2sq_rows_f16_v3, l2sq_v3, f16, "avx2,fma,f16c");
    entry!(
        dot_f32_v4,
        dot_rows_f32_v4,
        dot_v4,
        f32,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
    );
    entry!(
        l2sq_f32_v4,
        l2sq_rows_f32_v4,
        l2sq_v4,
        f32,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
    );
    entry!(
        dot_f16_v4,
        dot_rows_f16_v4,
        dot_v4,
        f16,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
    );
    entry!(
        l2sq_f16_v4,
        l2sq_rows_f16_v4,
        l2sq_v4,
        f16,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
    );
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    #[inline(always)]
    fn fold(a: &[f32], b: &[f32], l2: bool) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: NEON is part of the aarch64 baseline; loads read indices < n only.
        unsafe {
            let mut acc = [vdupq_n_f32(0.0); 4];
            let mut i = 0;
            while i + 16 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let x = vld1q_f32(pa.add(i + 4 * u));
                    let y = vld1q_f32(pb.add(i + 4 * u));
                    *a = if l2 {
                        let t = vsubq_f32(x, y);
                        vfmaq_f32(*a, t, t)
                    } else {
                        vfmaq_f32(*a, x, y)
                    };
                }
                i += 16;
            }
            let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
            let mut total = vaddvq_f32(s);
            while i < n {
                let (x, y) = (*pa.add(i), *pb.add(i));
                total += if l2 { (x - y) * (x - y) } else { x * y };
                i += 1;
            }
            total
        }
    }

    pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        fold(a, b, false)
    }

    pub(super) fn l2sq_f32(a: &[f32], b: &[f32]) -> f32 {
        fold(a, b, true)
    }

    rows_of!(dot_rows_f32, dot_f32, f32);
    rows_of!(l2sq_rows_f32, l2sq_f32, f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn check(level: Level) {
        let k = DistanceKernels::for_level(level);
        let mut rng = StdRng::seed_from_u64(7);
        let buf_a: Vec<f32> = (0..300).map(|_| rng.random_range(-2.0..2.0)).collect();
        let buf_b: Vec<f32> = (0..300).map(|_| rng.random_range(-2.0..2.0)).collect();
        let buf_h: Vec<f16> = buf_b.iter().map(|&x| f16::from_f32(x)).collect();
        for len in 0..=257 {
            for off in 0..4 {
                let a = &buf_a[off..off + len];
                let b = &buf_b[off + 1..off + 1 + len];
                let h = &buf_h[off + 2..off + 2 + len];
                let hf: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
                let cases: [(f32, f64, f64); 4] = [
                    (k.dot_f32(a, b), ref_dot(a, b), ref_abs_dot(a, b)),
                    (k.l2sq_f32(a, b), ref_l2(a, b), ref_l2(a, b)),
                    (k.dot_f16(a, h), ref_dot(a, &hf), ref_abs_dot(a, &hf)),
                    (k.l2sq_f16(a, h), ref_l2(a, &hf), ref_l2(a, &hf)),
                ];
                for (i, (got, want, mag)) in cases.into_iter().enumerate() {
                    // Recursive summation error bound: len * eps * sum |terms|, plus the
                    // rounding of each product/difference (one more eps per term).
                    let tol = (len as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "level {level} case {i} len {len} off {off}: {got} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }

    fn ref_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }
    fn ref_abs_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum()
    }
    fn ref_l2(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum()
    }

    #[test]
    fn every_level_matches_f64_reference() {
        for level in Level::all_supported() {
            check(level);
        }
    }

    #[test]
    fn axpy_cols16_is_bit_exact_on_every_level() {
        let mut rng = StdRng::seed_from_u64(21);
        for (m, dsub) in [
            (1usize, 0usize),
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 8),
            (1, 33),
            (7, 4),
            (98, 8),
        ] {
            let q: Vec<f32> = (0..m * dsub).map(|_| rng.random_range(-2.0..2.0)).collect();
            let cols: Vec<f32> = (0..16 * m * dsub)
                .map(|_| rng.random_range(-1e3..1e3))
                .collect();
            let start: Vec<f32> = (0..16 * m).map(|_| rng.random_range(-5.0..5.0)).collect();
            // The rows one at a time: each row depends only on its own slices.
            let mut want = start.clone();
            for (j, row) in want.chunks_exact_mut(16).enumerate() {
                let cj = &cols[16 * dsub * j..16 * dsub * (j + 1)];
                scalar::axpy_cols16(-2.0, &q[dsub * j..dsub * (j + 1)], cj, row);
            }
            for level in Level::all_supported() {
                let mut got = start.clone();
                DistanceKernels::for_level(level).axpy_cols16(-2.0, &q, &cols, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{level} m {m} dsub {dsub}"
                );
            }
        }
    }

    #[test]
    fn axpy_matches_f64_reference() {
        let mut rng = StdRng::seed_from_u64(9);
        let x: Vec<f32> = (0..300).map(|_| rng.random_range(-3.0..3.0)).collect();
        let y0: Vec<f32> = (0..300).map(|_| rng.random_range(-3.0..3.0)).collect();
        for level in Level::all_supported() {
            let k = DistanceKernels::for_level(level);
            for len in 0..=257 {
                for off in 0..3 {
                    let mut y = y0[off..off + len].to_vec();
                    k.axpy(0.7, &x[off + 1..off + 1 + len], &mut y);
                    for i in 0..len {
                        let want = y0[off + i] as f64 + 0.7f32 as f64 * x[off + 1 + i] as f64;
                        // One product and one sum: two roundings of values below 6 in size.
                        assert!(
                            (y[i] as f64 - want).abs() <= 2.0 * 6.0 * f32::EPSILON as f64,
                            "level {level} len {len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn group_kernels_match_f64_reference() {
        let mut rng = StdRng::seed_from_u64(13);
        for d in [1usize, 7, 8, 15, 16, 17, 64, 130, 256] {
            for g in 1..=6 {
                let n = 5;
                let queries: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let rows: Vec<f16> = (0..n * d)
                    .map(|_| f16::from_f32(rng.random_range(-2.0..2.0)))
                    .collect();
                for level in Level::all_supported() {
                    let mut out = vec![f32::NAN; g * n];
                    DistanceKernels::for_level(level)
                        .dot_group_rows_f16(&queries, g, &rows, &mut out);
                    for q in 0..g {
                        for i in 0..n {
                            let qv = &queries[q * d..(q + 1) * d];
                            let rv: Vec<f32> = rows[i * d..(i + 1) * d]
                                .iter()
                                .map(|h| h.to_f32())
                                .collect();
                            let want = ref_dot(qv, &rv);
                            let tol = (d as f64 + 2.0) * f32::EPSILON as f64 * ref_abs_dot(qv, &rv)
                                + 1e-30;
                            assert!(
                                (out[q * n + i] as f64 - want).abs() <= tol,
                                "level {level} d {d} g {g}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn group_at_positions_equals_group_over_the_gathered_rows() {
        let mut rng = StdRng::seed_from_u64(14);
        for d in [1usize, 16, 17, 128] {
            for g in 1..=6 {
                let nrows = 9;
                let queries: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let rows: Vec<f16> = (0..nrows * d)
                    .map(|_| f16::from_f32(rng.random_range(-2.0..2.0)))
                    .collect();
                for n in [0usize, 1, 2, 5, 12] {
                    let at: Vec<u32> = (0..n).map(|_| rng.random_range(0..nrows as u32)).collect();
                    let gathered: Vec<f16> = at
                        .iter()
                        .flat_map(|&p| rows[p as usize * d..(p as usize + 1) * d].iter().copied())
                        .collect();
                    for level in Level::all_supported() {
                        let k = DistanceKernels::for_level(level);
                        let mut want = vec![f32::NAN; g * n];
                        k.dot_group_rows_f16(&queries, g, &gathered, &mut want);
                        let mut got = vec![f32::NAN; g * n];
                        k.dot_group_at_f16(&queries, g, &rows, &at, &mut got);
                        assert_eq!(got, want, "level {level} d {d} g {g} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "position out of range")]
    fn group_at_rejects_a_position_past_the_rows() {
        let rows = vec![f16::ZERO; 2 * 4];
        let mut out = vec![0.0; 1];
        DistanceKernels::for_level(Level::Scalar).dot_group_at_f16(
            &[1.0; 4],
            1,
            &rows,
            &[2],
            &mut out,
        );
    }

    #[test]
    fn rows_kernels_match_single_kernels() {
        // Each level's row loops (one function over every row) against its single kernels
        // called per row: the same bits, for widths with and without a tail.
        let mut rng = StdRng::seed_from_u64(3);
        // 11 rows are read in order; 16,387 rows of 128 (8.4 MB of f32, 4.2 MB of f16) as
        // four streams with a tail of 3 (`STREAMS_MIN_BYTES`).
        for (d, n) in [
            (1usize, 11usize),
            (16, 11),
            (37, 11),
            (64, 11),
            (128, 11),
            (200, 11),
            (128, 16_387),
        ] {
            let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rows: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rows_h: Vec<f16> = rows.iter().map(|&x| f16::from_f32(x)).collect();
            for level in Level::all_supported() {
                let k = DistanceKernels::for_level(level);
                let mut out = vec![0.0; n];
                let same = |out: &[f32], one: &dyn Fn(usize) -> f32| {
                    (0..n).all(|i| out[i].to_bits() == one(i).to_bits())
                };
                k.dot_rows_f32(&q, &rows, &mut out);
                assert!(
                    same(&out, &|i| k.dot_f32(&q, &rows[i * d..(i + 1) * d])),
                    "{level} {d}"
                );
                k.l2sq_rows_f32(&q, &rows, &mut out);
                assert!(
                    same(&out, &|i| k.l2sq_f32(&q, &rows[i * d..(i + 1) * d])),
                    "{level} {d}"
                );
                k.dot_rows_f16(&q, &rows_h, &mut out);
                assert!(
                    same(&out, &|i| k.dot_f16(&q, &rows_h[i * d..(i + 1) * d])),
                    "{level} {d}"
                );
                k.l2sq_rows_f16(&q, &rows_h, &mut out);
                assert!(
                    same(&out, &|i| k.l2sq_f16(&q, &rows_h[i * d..(i + 1) * d])),
                    "{level} {d}"
                );
            }
        }
    }
}
