//! 4-bit fast-scan accumulation: u8 lookup tables held in registers, u16 sums, blocks of 32
//! vectors.
//!
//! Each vector is `m` 4-bit codes (one per sub-quantizer). `m` is padded to the even `m2`
//! (the padding sub-quantizer has code 0 and an all-zero table). Vectors are stored in
//! **blocks of `BBS = 32`**; a block is `m2 / 2` chunks of 32 bytes, one per sub-quantizer
//! pair `(2p, 2p + 1)`:
//!
//! ```text
//! block (m2 * 16 bytes) = chunk 0 | chunk 1 | ... | chunk m2/2 - 1
//!
//! chunk p (32 bytes):
//!   byte      0 ..  15                        16 .. 31
//!   holds     sub-quantizer 2p                sub-quantizer 2p + 1
//!   byte b    lo nibble: code of vector b     lo nibble: code of vector b - 16
//!             hi nibble: code of vector b+16  hi nibble: code of vector b
//! ```
//!
//! i.e. code `(vector i, sub-quantizer j)` of a block lives at byte
//! `(j / 2) * 32 + (j % 2) * 16 + (i % 16)`, in the low nibble if `i < 16`, else the high one.
//!
//! A query's table is `m2 * 16` u8, sub-quantizer-major: entry `(j, c)` at byte `j * 16 + c`.
//! So the 32 table bytes of pair `p` are exactly what a 256-bit byte shuffle needs: lane 0
//! looks up sub-quantizer `2p`, lane 1 sub-quantizer `2p + 1`, both indexed by the chunk's
//! nibbles. AVX-512 takes two pairs (64 bytes of codes and tables) per instruction.
//!
//! Accumulation: each shuffle yields 32 bytes (two u8 per u16 lane). Adding the u16 lanes as
//! they are sums `even + 256 * odd` (mod 2^16), and adding them shifted right by 8 sums `odd`;
//! `even = total - (odd << 8)` recovers the even bytes at the end. A vector's score is the sum
//! of its `m` table bytes, at most `255 * m2 <= 65,280` for `m <= 256`, so it fits a u16 and
//! every level matches the scalar reference bit for bit. Longer codes are rejected.
//!
//! With AVX-512 VBMI and VNNI ([`Level::V4Icl`]) the same layout is scanned differently: a
//! 64-byte load (four sub-quantizers) is regrouped vector-major by one byte permute shared by
//! all queries, then per query two `vpermb` look the nibbles up in the four tables at once
//! (64 entries, one register) and two `vpdpbusd` add each vector's four bytes into its i32
//! lane: four instructions per load and query instead of eight, the same sums.
//!
//! Multi-query: the kernel scores one block for up to [`MAX_QBS`] queries at once, loading
//! and splitting each code chunk once for all of them (the GQA case: the query heads sharing
//! one KV head).

use crate::level::Level;

/// Vectors per block.
pub const BBS: usize = 32;
/// Most queries scored in one pass over the codes.
pub const MAX_QBS: usize = 4;
/// Most sub-quantizers (keeps every sum within u16).
pub const MAX_M: usize = 256;

/// Bytes of one packed block for `m2` (even) sub-quantizers.
pub const fn block_bytes(m2: usize) -> usize {
    m2 * BBS / 2
}

/// The arguments of one accumulation call (shapes checked by [`FastScanKernel::accumulate`]).
pub struct Args<'a> {
    codes: &'a [u8],
    nblocks: usize,
    m2: usize,
    luts: &'a [u8],
    nq: usize,
    thresholds: &'a [u16],
    out: &'a mut [u16],
    masks: &'a mut [u32],
}

type AccumulateFn = fn(Args<'_>);
type CollectFn = fn(&[u16], u16, u32, &mut Vec<u32>);
type CountFn = fn(&[u16], u16) -> usize;

/// A resolved fast-scan kernel: block accumulation, and the threshold filter of selection.
#[derive(Clone, Copy)]
pub struct FastScanKernel {
    level: Level,
    accumulate: AccumulateFn,
    collect: CollectFn,
    count: CountFn,
}

impl std::fmt::Debug for FastScanKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastScanKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl FastScanKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> FastScanKernel {
        let level = level.capped();
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::V4Icl => FastScanKernel {
                level,
                accumulate: x86::accumulate_v4icl,
                collect: x86::collect_above_v4,
                count: x86::count_above_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V4 => FastScanKernel {
                level,
                accumulate: x86::accumulate_v4,
                collect: x86::collect_above_v4,
                count: x86::count_above_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => FastScanKernel {
                level,
                accumulate: x86::accumulate_v3,
                collect: x86::collect_above_v3,
                count: x86::count_above_v3,
            },
            #[cfg(target_arch = "aarch64")]
            Level::Neon => FastScanKernel {
                level,
                accumulate: neon::accumulate_neon,
                collect: collect_above_scalar,
                count: count_above_scalar,
            },
            _ => FastScanKernel {
                level: Level::Scalar,
                accumulate: accumulate_scalar_args,
                collect: collect_above_scalar,
                count: count_above_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> FastScanKernel {
        FastScanKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Scores `nblocks` packed blocks for `nq` queries, and marks the scores above a
    /// per-query threshold (the filter in front of a top-k heap).
    ///
    /// * `codes`: `nblocks * block_bytes(m2)` bytes, the layout of the module doc.
    /// * `luts`: `nq * m2 * 16` bytes, query-major, each the table layout of the module doc.
    /// * `thresholds`: `nq` values.
    /// * `out`: `nq * nblocks * 32` u16, query-major: `out[q * nblocks * 32 + b * 32 + i]` is
    ///   the score of vector `i` of block `b` for query `q`.
    /// * `masks`: `nq * nblocks` u32: bit `i` of `masks[q * nblocks + b]` is set iff that
    ///   score is `> thresholds[q]`.
    ///
    /// Panics if `m2` is odd, zero or above [`MAX_M`], `nq` is not in `1..=MAX_QBS`, or a
    /// length disagrees.
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate(
        &self,
        codes: &[u8],
        nblocks: usize,
        m2: usize,
        luts: &[u8],
        nq: usize,
        thresholds: &[u16],
        out: &mut [u16],
        masks: &mut [u32],
    ) {
        assert!(
            m2 > 0 && m2.is_multiple_of(2) && m2 <= MAX_M,
            "m2 must be even and in 2..=256"
        );
        assert!((1..=MAX_QBS).contains(&nq), "nq must be in 1..=4");
        assert_eq!(codes.len(), nblocks * block_bytes(m2), "codes length");
        assert_eq!(luts.len(), nq * m2 * 16, "luts length");
        assert_eq!(thresholds.len(), nq, "thresholds length");
        assert_eq!(out.len(), nq * nblocks * BBS, "out length");
        assert_eq!(masks.len(), nq * nblocks, "masks length");
        (self.accumulate)(Args {
            codes,
            nblocks,
            m2,
            luts,
            nq,
            thresholds,
            out,
            masks,
        })
    }

    /// [`FastScanKernel::accumulate`] without the threshold masks.
    pub fn accumulate_scores(
        &self,
        codes: &[u8],
        nblocks: usize,
        m2: usize,
        luts: &[u8],
        nq: usize,
        out: &mut [u16],
    ) {
        let thresholds = [u16::MAX; MAX_QBS];
        let mut masks = vec![0u32; nq * nblocks];
        self.accumulate(
            codes,
            nblocks,
            m2,
            luts,
            nq,
            &thresholds[..nq.min(MAX_QBS)],
            out,
            &mut masks,
        );
    }
}

impl FastScanKernel {
    /// Appends to `out` the positions `base + i` of every `scores[i] > threshold`, ascending:
    /// the survivors of a radix selection whose k-th score is `threshold`.
    pub fn collect_above(&self, scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
        (self.collect)(scores, threshold, base, out)
    }
}

impl FastScanKernel {
    /// How many of `scores` are `> threshold`: the count that a bisection over thresholds
    /// turns into an exact k-th largest score without sorting.
    pub fn count_above(&self, scores: &[u16], threshold: u16) -> usize {
        (self.count)(scores, threshold)
    }

    /// The largest `t` with more than `rank` of `scores` above it, i.e. the `(rank + 1)`-th
    /// largest score minus one; `None` when there is none (at most `rank` scores, or the
    /// `(rank + 1)`-th largest is 0). A bisection over the u16 range by
    /// [`FastScanKernel::count_above`]: at most 16 counting passes, no data-dependent branch
    /// per score (a `select_nth_unstable` of 256 sums was a tenth of an IVF batch search).
    pub fn below_rank(&self, scores: &[u16], rank: usize) -> Option<u16> {
        if self.count_above(scores, 0) <= rank {
            return None;
        }
        // Invariant: count_above(lo) > rank >= count_above(hi) (nothing is above u16::MAX).
        let (mut lo, mut hi) = (0u16, u16::MAX);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.count_above(scores, mid) > rank {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }
}

/// Scalar reference of [`FastScanKernel::count_above`].
pub fn count_above_scalar(scores: &[u16], threshold: u16) -> usize {
    scores.iter().filter(|&&s| s > threshold).count()
}

/// Scalar reference of [`FastScanKernel::collect_above`].
pub fn collect_above_scalar(scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
    for (i, &s) in scores.iter().enumerate() {
        if s > threshold {
            out.push(base + i as u32);
        }
    }
}

fn accumulate_scalar_args(a: Args<'_>) {
    accumulate_scalar(a.codes, a.nblocks, a.m2, a.luts, a.nq, a.out);
    masks_scalar(a.out, a.nblocks, a.nq, a.thresholds, a.masks);
}

/// Scalar reference of the threshold masks of [`FastScanKernel::accumulate`].
pub fn masks_scalar(
    scores: &[u16],
    nblocks: usize,
    nq: usize,
    thresholds: &[u16],
    masks: &mut [u32],
) {
    for q in 0..nq {
        for b in 0..nblocks {
            let s = &scores[q * nblocks * BBS + b * BBS..][..BBS];
            masks[q * nblocks + b] = s
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > thresholds[q])
                .fold(0u32, |m, (i, _)| m | (1 << i));
        }
    }
}

/// Scalar reference of [`FastScanKernel::accumulate`]: the sum of table bytes, per vector.
pub fn accumulate_scalar(
    codes: &[u8],
    nblocks: usize,
    m2: usize,
    luts: &[u8],
    nq: usize,
    out: &mut [u16],
) {
    let bb = block_bytes(m2);
    for q in 0..nq {
        let lut = &luts[q * m2 * 16..(q + 1) * m2 * 16];
        for b in 0..nblocks {
            let block = &codes[b * bb..(b + 1) * bb];
            for i in 0..BBS {
                let mut sum = 0u32;
                for j in 0..m2 {
                    sum += lut[j * 16 + code_at(block, i, j) as usize] as u32;
                }
                out[q * nblocks * BBS + b * BBS + i] = sum as u16;
            }
        }
    }
}

/// Code of vector `i` (< 32), sub-quantizer `j` in a packed block.
#[inline(always)]
pub fn code_at(block: &[u8], i: usize, j: usize) -> u8 {
    let byte = block[(j / 2) * 32 + (j % 2) * 16 + (i % 16)];
    if i < 16 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

/// Sets the code of vector `i` (< 32), sub-quantizer `j` in a packed block (`code < 16`).
#[inline(always)]
pub fn set_code_at(block: &mut [u8], i: usize, j: usize, code: u8) {
    let at = (j / 2) * 32 + (j % 2) * 16 + (i % 16);
    if i < 16 {
        block[at] = (block[at] & 0xf0) | (code & 0x0f);
    } else {
        block[at] = (block[at] & 0x0f) | (code << 4);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_bytes, BBS};
    use std::arch::x86_64::*;

    /// Folds a 256-bit accumulator pair (total, odd) into the u16 scores of 16 vectors, in
    /// order (two registers of 8), summing the two 128-bit lanes (the two sub-quantizers of
    /// each pair).
    ///
    /// # Safety
    /// AVX2 available.
    #[inline(always)]
    unsafe fn finish256(total: __m256i, odd: __m256i) -> (__m128i, __m128i) {
        // SAFETY: AVX2 is enabled by the caller.
        unsafe {
            let even = _mm256_sub_epi16(total, _mm256_slli_epi16::<8>(odd));
            let e = _mm_add_epi16(
                _mm256_castsi256_si128(even),
                _mm256_extracti128_si256::<1>(even),
            );
            let o = _mm_add_epi16(
                _mm256_castsi256_si128(odd),
                _mm256_extracti128_si256::<1>(odd),
            );
            (_mm_unpacklo_epi16(e, o), _mm_unpackhi_epi16(e, o))
        }
    }

    /// One register width of the shuffle kernel ([`block_shuffle`]): AVX2 takes one pair of
    /// sub-quantizers (32 bytes of codes and tables) per instruction, AVX-512BW two. Every
    /// method needs its width's features enabled in the caller and inlines into it.
    trait ShuffleWidth {
        /// Pairs of sub-quantizers per register.
        const PAIRS: usize;
        type V: Copy;
        unsafe fn splat8(x: i8) -> Self::V;
        unsafe fn zero() -> Self::V;
        /// `PAIRS * 32` bytes at `p`, or only the first 32 (the rest zero) when not `full`.
        unsafe fn load(p: *const u8, full: bool) -> Self::V;
        unsafe fn and(a: Self::V, b: Self::V) -> Self::V;
        /// Each u16 lane shifted right by 4 (the high nibbles into place).
        unsafe fn srli4(a: Self::V) -> Self::V;
        /// Each u16 lane shifted right by 8 (the odd bytes).
        unsafe fn srli8(a: Self::V) -> Self::V;
        /// Per 128-bit lane, `t[idx & 15]` (every index below 16).
        unsafe fn shuffle(t: Self::V, idx: Self::V) -> Self::V;
        unsafe fn add16(a: Self::V, b: Self::V) -> Self::V;
        /// The register's pairs summed into one 256-bit accumulator.
        unsafe fn to256(a: Self::V) -> __m256i;
        /// Stores the 32 scores of a block at `out` (writable for 32 u16) and returns the
        /// mask of those above `thr`.
        unsafe fn store(r: [__m128i; 4], thr: u16, out: *mut u16) -> u32;
    }

    /// The [`ShuffleWidth`] methods that are one register instruction each, for register type
    /// `$v` and the intrinsics named.
    macro_rules! shuffle_ops {
        ($v:ty, $set1:ident, $zero:ident, $and:ident, $srli:ident, $shuffle:ident, $add:ident) => {
            #[inline(always)]
            unsafe fn splat8(x: i8) -> $v {
                // SAFETY: register operation; the width's features are available (the
                // trait's contract), as in every method here.
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn zero() -> $v {
                // SAFETY: register operation.
                unsafe { $zero() }
            }
            #[inline(always)]
            unsafe fn and(a: $v, b: $v) -> $v {
                // SAFETY: register operation.
                unsafe { $and(a, b) }
            }
            #[inline(always)]
            unsafe fn srli4(a: $v) -> $v {
                // SAFETY: register operation.
                unsafe { $srli::<4>(a) }
            }
            #[inline(always)]
            unsafe fn srli8(a: $v) -> $v {
                // SAFETY: register operation.
                unsafe { $srli::<8>(a) }
            }
            #[inline(always)]
            unsafe fn shuffle(t: $v, idx: $v) -> $v {
                // SAFETY: register operation.
                unsafe { $shuffle(t, idx) }
            }
            #[inline(always)]
            unsafe fn add16(a: $v, b: $v) -> $v {
                // SAFETY: register operation.
                unsafe { $add(a, b) }
            }
        };
    }

    /// AVX2.
    struct Shuffle256;

    impl ShuffleWidth for Shuffle256 {
        const PAIRS: usize = 1;
        type V = __m256i;
        shuffle_ops!(
            __m256i,
            _mm256_set1_epi8,
            _mm256_setzero_si256,
            _mm256_and_si256,
            _mm256_srli_epi16,
            _mm256_shuffle_epi8,
            _mm256_add_epi16
        );
        #[inline(always)]
        unsafe fn load(p: *const u8, _full: bool) -> __m256i {
            // SAFETY: one pair per register: every load is full, 32 readable bytes.
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        }
        #[inline(always)]
        unsafe fn to256(a: __m256i) -> __m256i {
            a
        }
        #[inline(always)]
        unsafe fn store(r: [__m128i; 4], thr: u16, out: *mut u16) -> u32 {
            // SAFETY: as stated; unsigned compare through the signed one with flipped sign
            // bits.
            unsafe {
                let flip = _mm_set1_epi16(i16::MIN);
                let t = _mm_xor_si128(_mm_set1_epi16(thr as i16), flip);
                let mut mask = 0u32;
                for h in 0..2 {
                    let (a, b) = (r[2 * h], r[2 * h + 1]);
                    _mm_storeu_si128(out.add(16 * h) as *mut __m128i, a);
                    _mm_storeu_si128(out.add(16 * h + 8) as *mut __m128i, b);
                    let ga = _mm_cmpgt_epi16(_mm_xor_si128(a, flip), t);
                    let gb = _mm_cmpgt_epi16(_mm_xor_si128(b, flip), t);
                    mask |= (_mm_movemask_epi8(_mm_packs_epi16(ga, gb)) as u32) << (16 * h);
                }
                mask
            }
        }
    }

    /// AVX-512BW/VL: the odd last pair is read with a 32-byte masked load, so nothing past
    /// the block or the tables is touched.
    struct Shuffle512;

    impl ShuffleWidth for Shuffle512 {
        const PAIRS: usize = 2;
        type V = __m512i;
        shuffle_ops!(
            __m512i,
            _mm512_set1_epi8,
            _mm512_setzero_si512,
            _mm512_and_si512,
            _mm512_srli_epi16,
            _mm512_shuffle_epi8,
            _mm512_add_epi16
        );
        #[inline(always)]
        unsafe fn load(p: *const u8, full: bool) -> __m512i {
            // SAFETY: 64 readable bytes when full, else 32: the masked-off bytes are not read
            // (AVX-512BW fault suppression).
            unsafe {
                if full {
                    _mm512_loadu_si512(p as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi8(0xffff_ffff, p as *const i8)
                }
            }
        }
        #[inline(always)]
        unsafe fn to256(a: __m512i) -> __m256i {
            // SAFETY: register operation: pairs p and p + 1 folded.
            unsafe {
                _mm256_add_epi16(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a))
            }
        }
        #[inline(always)]
        unsafe fn store(r: [__m128i; 4], thr: u16, out: *mut u16) -> u32 {
            // SAFETY: as stated; AVX-512BW/VL unsigned compares.
            unsafe {
                let t = _mm_set1_epi16(thr as i16);
                let mut mask = 0u32;
                for (i, v) in r.iter().enumerate() {
                    _mm_storeu_si128(out.add(8 * i) as *mut __m128i, *v);
                    mask |= (_mm_cmpgt_epu16_mask(*v, t) as u32) << (8 * i);
                }
                mask
            }
        }
    }

    /// The shuffle block kernel: per code load and query, two byte shuffles look up the
    /// nibbles in the pair's tables and four u16 additions accumulate them (see the module
    /// doc); per query four accumulators (lo, lo odd, hi, hi odd).
    ///
    /// # Safety
    /// `W`'s features available; block has m2 * 16 readable bytes, each lut m2 * 16, out 32
    /// u16 and masks one u32 per query (guaranteed by the driver).
    #[inline(always)]
    unsafe fn block_shuffle<W: ShuffleWidth, const NQ: usize>(
        block: *const u8,
        m2: usize,
        luts: *const u8,
        thr: &[u16; NQ],
        out: &[*mut u16; NQ],
        masks: &[*mut u32; NQ],
    ) {
        // SAFETY: as stated; a load that is not full reads the last pair only.
        unsafe {
            let mask = W::splat8(0x0f);
            let zero = W::zero();
            let mut acc = [[zero; 4]; NQ];
            let pairs = m2 / 2;
            // (A nested function, not a closure: a closure would be compiled without the
            // caller's target features, every intrinsic a call.)
            #[inline(always)]
            unsafe fn step<W: ShuffleWidth, const NQ: usize>(
                block: *const u8,
                luts: *const u8,
                m2: usize,
                p: usize,
                full: bool,
                mask: W::V,
                acc: &mut [[W::V; 4]; NQ],
            ) {
                // SAFETY: as in block_shuffle.
                unsafe {
                    let c = W::load(block.add(p * 32), full);
                    let lo = W::and(c, mask);
                    let hi = W::and(W::srli4(c), mask);
                    for (q, a) in acc.iter_mut().enumerate() {
                        let t = W::load(luts.add(q * m2 * 16 + p * 32), full);
                        let rl = W::shuffle(t, lo);
                        let rh = W::shuffle(t, hi);
                        a[0] = W::add16(a[0], rl);
                        a[1] = W::add16(a[1], W::srli8(rl));
                        a[2] = W::add16(a[2], rh);
                        a[3] = W::add16(a[3], W::srli8(rh));
                    }
                }
            }
            // The full loads in a loop without a branch on their length, then the last pair
            // alone where AVX-512's two pairs a load leave one over.
            let mut p = 0;
            while p + W::PAIRS <= pairs {
                step::<W, NQ>(block, luts, m2, p, true, mask, &mut acc);
                p += W::PAIRS;
            }
            if p < pairs {
                step::<W, NQ>(block, luts, m2, p, false, mask, &mut acc);
            }
            for (q, a) in acc.iter().enumerate() {
                let (r0, r1) = finish256(W::to256(a[0]), W::to256(a[1]));
                let (r2, r3) = finish256(W::to256(a[2]), W::to256(a[3]));
                *masks[q] = W::store([r0, r1, r2, r3], thr[q], out[q]);
            }
        }
    }

    /// `vpermb` indices that regroup a 64-byte code load (two pairs, four sub-quantizers)
    /// vector-major: byte `4 i + j` of the result is byte `16 j + i` of the load, i.e. the
    /// codes of vector `i` (low nibble) and `16 + i` (high nibble) for sub-quantizer `j`.
    const VECTOR_MAJOR: [u8; 64] = {
        let mut idx = [0u8; 64];
        let mut k = 0;
        while k < 64 {
            idx[k] = ((k % 4) * 16 + k / 4) as u8;
            k += 1;
        }
        idx
    };

    /// `j << 4` at byte `4 i + j`: selects sub-quantizer `j`'s 16 entries of a 64-byte table.
    const SUBQ_SELECT: [u8; 64] = {
        let mut sel = [0u8; 64];
        let mut k = 0;
        while k < 64 {
            sel[k] = ((k % 4) << 4) as u8;
            k += 1;
        }
        sel
    };

    /// The AVX-512 VBMI + VNNI block kernel. Per 64-byte code load (four sub-quantizers x 32
    /// vectors) and query: two `vpermb` look up all 64-entry tables (four sub-quantizers'
    /// 16 entries each) at once, the codes regrouped vector-major so that the four bytes of
    /// each vector lie side by side, and two `vpdpbusd` against ones add them into i32 lanes,
    /// one per vector. Half the per-query instructions of [`block_shuffle`]'s shuffle / widening
    /// adds, split evenly between the two vector ports. Two accumulator sets (even and odd
    /// loads) hide the dot product's latency when few queries share the pass.
    #[inline(always)]
    unsafe fn block_v4icl<const NQ: usize>(
        block: *const u8,
        m2: usize,
        luts: *const u8,
        thr: &[u16; NQ],
        out: &[*mut u16; NQ],
        masks: &[*mut u32; NQ],
    ) {
        // SAFETY: as in block_shuffle; the odd last pair is read with a 32-byte masked load (codes
        // and tables), so nothing past the block or the tables is touched, and the missing
        // tables read as zeros. AVX-512 BW, VBMI and VNNI enabled by the entry point.
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let ones = _mm512_set1_epi8(1);
            let regroup = _mm512_loadu_si512(VECTOR_MAJOR.as_ptr() as *const __m512i);
            let select = _mm512_loadu_si512(SUBQ_SELECT.as_ptr() as *const __m512i);
            let zero = _mm512_setzero_si512();
            #[inline(always)]
            unsafe fn quad<const NQ: usize>(
                codes: __m512i,
                luts: *const u8,
                table_stride: usize,
                full: bool,
                [low, ones, regroup, select]: [__m512i; 4],
                acc: &mut [[__m512i; 2]; NQ],
            ) {
                // SAFETY: as in block_v4icl (luts points at this load's 64 table bytes of query 0,
                // or 32 when the load is not full).
                unsafe {
                    let c = _mm512_permutexvar_epi8(regroup, codes);
                    // (c & 0x0f) | select, and the same for the high nibbles.
                    let lo = _mm512_ternarylogic_epi32::<0xEA>(c, low, select);
                    let hi =
                        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<4>(c), low, select);
                    for (q, a) in acc.iter_mut().enumerate() {
                        let tp = luts.add(q * table_stride);
                        let t = if full {
                            _mm512_loadu_si512(tp as *const __m512i)
                        } else {
                            _mm512_maskz_loadu_epi8(0xffff_ffff, tp as *const i8)
                        };
                        a[0] = _mm512_dpbusd_epi32(a[0], _mm512_permutexvar_epi8(lo, t), ones);
                        a[1] = _mm512_dpbusd_epi32(a[1], _mm512_permutexvar_epi8(hi, t), ones);
                    }
                }
            }
            let consts = [low, ones, regroup, select];
            // A full load `s` (a nested function, not a closure: see block_shuffle).
            #[inline(always)]
            unsafe fn full(block: *const u8, s: usize) -> __m512i {
                // SAFETY: as in block_v4icl (4 s + 4 <= m2: the load lies in the block).
                unsafe { _mm512_loadu_si512(block.add(s * 64) as *const __m512i) }
            }
            // Per query: [vectors 0..16, vectors 16..32]; `even` takes the even loads, `odd`
            // the odd ones (unrolled by hand, so that both sets stay in registers). The full
            // loads first, in a loop without a branch on their length.
            let (mut even, mut odd) = ([[zero; 2]; NQ], [[zero; 2]; NQ]);
            let full_quads = m2 / 4;
            let mut s = 0;
            while s + 2 <= full_quads {
                let (c0, c1) = (full(block, s), full(block, s + 1));
                quad::<NQ>(c0, luts.add(s * 64), m2 * 16, true, consts, &mut even);
                quad::<NQ>(c1, luts.add((s + 1) * 64), m2 * 16, true, consts, &mut odd);
                s += 2;
            }
            if s < full_quads {
                let c0 = full(block, s);
                quad::<NQ>(c0, luts.add(s * 64), m2 * 16, true, consts, &mut even);
                s += 1;
            }
            if !m2.is_multiple_of(4) {
                // The last pair alone (m2 = 4 s + 2): a 32-byte load.
                let c = _mm512_maskz_loadu_epi8(0xffff_ffff, block.add(s * 64) as *const i8);
                quad::<NQ>(c, luts.add(s * 64), m2 * 16, false, consts, &mut odd);
            }
            // The u16 sums in vector order: the saturating pack is exact (every sum is at most
            // 255 * m2 < 2^16), and leaves 128-bit lane l holding vectors 4 l .. 4 l + 4 (the
            // low accumulator) then 16 + 4 l .. 20 + 4 l (the high one); one qword permute
            // restores the order (two `vpmovdw` and an insert took five shuffle-port uops).
            let order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
            for (q, (e, o)) in even.iter().zip(&odd).enumerate() {
                let lo = _mm512_add_epi32(e[0], o[0]);
                let hi = _mm512_add_epi32(e[1], o[1]);
                let r = _mm512_permutexvar_epi64(order, _mm512_packus_epi32(lo, hi));
                _mm512_storeu_si512(out[q] as *mut __m512i, r);
                *masks[q] = _mm512_cmpgt_epu16_mask(r, _mm512_set1_epi16(thr[q] as i16));
            }
        }
    }

    /// How far ahead of the block being scanned its codes are prefetched. A scan reads its
    /// codes once, front to back; where they come from DRAM or L3 (the attention client: 2 MB
    /// per kv head at 128K tokens, four query heads a pass; a flat index of millions) the
    /// hardware prefetcher alone left the kernel waiting: `select_step` at 128K went from
    /// 4.6-4.8 to 3.9-4.1 ms with a hint for every line 2 KB ahead (a hint every second or
    /// fourth line was slower than none). One query a pass: on the Zen 4 VM a hint per line
    /// cost 2-8 % with the codes in L2 and gained nothing on the 3.2 MB single-query row, but
    /// on the Xeon (Emerald Rapids, 2 MB L2) that row went from 134-154 to 114-118 us
    /// (`cargo bench --bench fastscan -- fastscan_bandwidth`, 1 KB ahead 121-128, 4 KB
    /// 109-114) at a cost of 0-5 % in L2 (`fastscan_kernel/m=32/n=65536/qbs=1`) and none
    /// measurable in IVF batches, so every pass takes the hints.
    const PREFETCH_AHEAD: usize = 2048;

    /// Prefetches (into every cache level) the `len` bytes from `p`, one hint per 64-byte
    /// line. Any address: a prefetch neither faults nor reads anything the program sees.
    #[inline(always)]
    fn prefetch_lines(p: *const u8, len: usize) {
        let mut off = 0;
        while off < len {
            // SAFETY: SSE is part of x86-64; a prefetch of any address, mapped or not, is a
            // hint that cannot fault (the address is formed with wrapping arithmetic).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
            off += 64;
        }
    }

    macro_rules! driver {
        ($name:ident, $block:ident $(::<$w:ty>)?, $feat:literal) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name(args: super::Args<'_>) {
                #[inline(always)]
                unsafe fn run<const NQ: usize>(a: super::Args<'_>) {
                    let bb = block_bytes(a.m2);
                    let stride = a.nblocks * BBS;
                    let (base, mbase) = (a.out.as_mut_ptr(), a.masks.as_mut_ptr());
                    let mut thr = [0u16; NQ];
                    thr.copy_from_slice(&a.thresholds[..NQ]);
                    for b in 0..a.nblocks {
                        // Past the last block the hints fall on other memory: harmless, and
                        // at most PREFETCH_AHEAD bytes a call.
                        prefetch_lines(
                            a.codes.as_ptr().wrapping_add(b * bb + PREFETCH_AHEAD),
                            bb,
                        );
                        let mut outs = [base; NQ];
                        let mut masks = [mbase; NQ];
                        for q in 0..NQ {
                            // SAFETY: q * stride + b * BBS + 32 <= nq * nblocks * 32 = out.len(),
                            // and q * nblocks + b < nq * nblocks = masks.len().
                            unsafe {
                                outs[q] = base.add(q * stride + b * BBS);
                                masks[q] = mbase.add(q * a.nblocks + b);
                            }
                        }
                        // SAFETY: block b lies inside codes (len nblocks * bb, checked by the
                        // public entry); luts holds NQ tables of m2 * 16 bytes.
                        unsafe {
                            $block::<$($w,)? NQ>(
                                a.codes.as_ptr().add(b * bb),
                                a.m2,
                                a.luts.as_ptr(),
                                &thr,
                                &outs,
                                &masks,
                            )
                        };
                    }
                }
                // SAFETY: features enabled on this function; lengths checked by the caller.
                unsafe {
                    match args.nq {
                        1 => run::<1>(args),
                        2 => run::<2>(args),
                        3 => run::<3>(args),
                        _ => run::<4>(args),
                    }
                }
            }
        };
    }

    /// Pushes `base + i` for each set bit `i` of `mask`, ascending.
    #[inline(always)]
    fn push_bits(mut mask: u32, base: u32, out: &mut Vec<u32>) {
        while mask != 0 {
            out.push(base + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn collect_above_v3_imp(scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
        let n = scores.len();
        let p = scores.as_ptr();
        let mut i = 0;
        // SAFETY: loads read 32 u16 at i with i + 32 <= n; AVX2 enabled on this function.
        unsafe {
            // Unsigned compare through the signed one: flip the sign bits of both sides.
            let flip = _mm256_set1_epi16(i16::MIN);
            let thr = _mm256_xor_si256(_mm256_set1_epi16(threshold as i16), flip);
            while i + 32 <= n {
                let a = _mm256_xor_si256(_mm256_loadu_si256(p.add(i) as *const __m256i), flip);
                let b = _mm256_xor_si256(_mm256_loadu_si256(p.add(i + 16) as *const __m256i), flip);
                let ga = _mm256_cmpgt_epi16(a, thr);
                let gb = _mm256_cmpgt_epi16(b, thr);
                // Pack to bytes (per 128-bit lane), then restore the order of the 64-bit quarters.
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(ga, gb));
                push_bits(_mm256_movemask_epi8(packed) as u32, base + i as u32, out);
                i += 32;
            }
        }
        super::collect_above_scalar(&scores[i..], threshold, base + i as u32, out);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn collect_above_v4_imp(scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
        let n = scores.len();
        let p = scores.as_ptr();
        let mut i = 0;
        // SAFETY: full loads read 32 u16 with i + 32 <= n; the tail load is masked to the
        // remaining lanes. AVX-512BW enabled on this function.
        unsafe {
            let thr = _mm512_set1_epi16(threshold as i16);
            while i + 32 <= n {
                let v = _mm512_loadu_si512(p.add(i) as *const __m512i);
                push_bits(_mm512_cmpgt_epu16_mask(v, thr), base + i as u32, out);
                i += 32;
            }
            if i < n {
                let lanes: u32 = ((1u64 << (n - i)) - 1) as u32;
                let v = _mm512_maskz_loadu_epi16(lanes, p.add(i) as *const i16);
                push_bits(
                    _mm512_mask_cmpgt_epu16_mask(lanes, v, thr),
                    base + i as u32,
                    out,
                );
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn count_above_v3_imp(scores: &[u16], threshold: u16) -> usize {
        let n = scores.len();
        let p = scores.as_ptr();
        let mut i = 0;
        let mut count = 0;
        // SAFETY: loads read 16 u16 at i with i + 16 <= n; AVX2 enabled on this function.
        unsafe {
            // Unsigned compare through the signed one: flip the sign bits of both sides.
            let flip = _mm256_set1_epi16(i16::MIN);
            let thr = _mm256_xor_si256(_mm256_set1_epi16(threshold as i16), flip);
            while i + 16 <= n {
                let a = _mm256_xor_si256(_mm256_loadu_si256(p.add(i) as *const __m256i), flip);
                // Two mask bits per u16 lane.
                count += (_mm256_movemask_epi8(_mm256_cmpgt_epi16(a, thr)) as u32).count_ones()
                    as usize
                    / 2;
                i += 16;
            }
        }
        count + super::count_above_scalar(&scores[i..], threshold)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,popcnt")]
    unsafe fn count_above_v4_imp(scores: &[u16], threshold: u16) -> usize {
        let n = scores.len();
        let p = scores.as_ptr();
        let mut i = 0;
        let mut count = 0;
        // SAFETY: full loads read 32 u16 with i + 32 <= n; the tail load is masked to the
        // remaining lanes. AVX-512BW enabled on this function.
        unsafe {
            let thr = _mm512_set1_epi16(threshold as i16);
            while i + 32 <= n {
                let v = _mm512_loadu_si512(p.add(i) as *const __m512i);
                count += _mm512_cmpgt_epu16_mask(v, thr).count_ones() as usize;
                i += 32;
            }
            if i < n {
                let lanes: u32 = ((1u64 << (n - i)) - 1) as u32;
                let v = _mm512_maskz_loadu_epi16(lanes, p.add(i) as *const i16);
                count += _mm512_mask_cmpgt_epu16_mask(lanes, v, thr).count_ones() as usize;
            }
        }
        count
    }

    pub(super) fn count_above_v3(scores: &[u16], threshold: u16) -> usize {
        // SAFETY: only reachable through a kernel built for V3 or above.
        unsafe { count_above_v3_imp(scores, threshold) }
    }

    pub(super) fn count_above_v4(scores: &[u16], threshold: u16) -> usize {
        // SAFETY: only reachable through a kernel built for V4.
        unsafe { count_above_v4_imp(scores, threshold) }
    }

    pub(super) fn collect_above_v3(scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
        // SAFETY: only reachable through a kernel built for V3 or above.
        unsafe { collect_above_v3_imp(scores, threshold, base, out) }
    }

    pub(super) fn collect_above_v4(scores: &[u16], threshold: u16, base: u32, out: &mut Vec<u32>) {
        // SAFETY: only reachable through a kernel built for V4.
        unsafe { collect_above_v4_imp(scores, threshold, base, out) }
    }

    driver!(accumulate_v3_imp, block_shuffle::<Shuffle256>, "avx2,fma");
    driver!(
        accumulate_v4_imp,
        block_shuffle::<Shuffle512>,
        "avx512f,avx512bw,avx512vl,avx2,fma"
    );

    pub(super) fn accumulate_v3(args: super::Args<'_>) {
        // SAFETY: only reachable through a kernel built for V3 or above, which the CPU
        // supports; shapes checked by FastScanKernel::accumulate.
        unsafe { accumulate_v3_imp(args) }
    }

    driver!(
        accumulate_v4icl_imp,
        block_v4icl,
        "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni"
    );

    pub(super) fn accumulate_v4icl(args: super::Args<'_>) {
        // SAFETY: only installed by FastScanKernel::for_level(Level::V4Icl), which the CPU
        // supports; shapes checked by FastScanKernel::accumulate.
        unsafe { accumulate_v4icl_imp(args) }
    }

    pub(super) fn accumulate_v4(args: super::Args<'_>) {
        // SAFETY: only reachable through a kernel built for V4; shapes checked by the caller.
        unsafe { accumulate_v4_imp(args) }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{block_bytes, BBS};
    use std::arch::aarch64::*;

    pub(super) fn accumulate_neon(a: super::Args<'_>) {
        accumulate_scores(a.codes, a.nblocks, a.m2, a.luts, a.nq, a.out);
        super::masks_scalar(a.out, a.nblocks, a.nq, a.thresholds, a.masks);
    }

    /// NEON: one 16-byte table lookup (`vqtbl1q_u8`) per sub-quantizer and nibble half,
    /// accumulated in u16 with widening adds.
    fn accumulate_scores(
        codes: &[u8],
        nblocks: usize,
        m2: usize,
        luts: &[u8],
        nq: usize,
        out: &mut [u16],
    ) {
        let bb = block_bytes(m2);
        for q in 0..nq {
            let lut = &luts[q * m2 * 16..(q + 1) * m2 * 16];
            for b in 0..nblocks {
                let block = &codes[b * bb..(b + 1) * bb];
                // SAFETY: NEON is baseline on aarch64; loads read 16 bytes inside `block` and
                // `lut` (j * 16 + 16 <= m2 * 16); stores write 8 u16 inside `out`'s row.
                unsafe {
                    let mask = vdupq_n_u8(0x0f);
                    let mut acc = [vdupq_n_u16(0); 4];
                    for j in 0..m2 {
                        let c = vld1q_u8(block.as_ptr().add((j / 2) * 32 + (j % 2) * 16));
                        let t = vld1q_u8(lut.as_ptr().add(j * 16));
                        let lo = vqtbl1q_u8(t, vandq_u8(c, mask));
                        let hi = vqtbl1q_u8(t, vshrq_n_u8::<4>(c));
                        acc[0] = vaddw_u8(acc[0], vget_low_u8(lo));
                        acc[1] = vaddw_high_u8(acc[1], lo);
                        acc[2] = vaddw_u8(acc[2], vget_low_u8(hi));
                        acc[3] = vaddw_high_u8(acc[3], hi);
                    }
                    let o = out.as_mut_ptr().add(q * nblocks * BBS + b * BBS);
                    for (k, a) in acc.iter().enumerate() {
                        vst1q_u16(o.add(8 * k), *a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_case(
        rng: &mut StdRng,
        n_vectors: usize,
        m: usize,
        extreme: bool,
    ) -> (Vec<u8>, usize, usize) {
        let m2 = m + m % 2;
        let nblocks = n_vectors.div_ceil(BBS);
        let mut codes = vec![0u8; nblocks * block_bytes(m2)];
        for v in 0..n_vectors {
            let (b, i) = (v / BBS, v % BBS);
            for j in 0..m {
                let c = if extreme { 15 } else { rng.random_range(0..16) };
                set_code_at(
                    &mut codes[b * block_bytes(m2)..(b + 1) * block_bytes(m2)],
                    i,
                    j,
                    c,
                );
            }
        }
        (codes, nblocks, m2)
    }

    #[test]
    fn pack_helpers_round_trip() {
        let mut block = vec![0u8; block_bytes(6)];
        for i in 0..BBS {
            for j in 0..6 {
                set_code_at(&mut block, i, j, ((i * 7 + j * 3) % 16) as u8);
            }
        }
        for i in 0..BBS {
            for j in 0..6 {
                assert_eq!(code_at(&block, i, j), ((i * 7 + j * 3) % 16) as u8);
            }
        }
    }

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(17);
        for m in (1..=130).step_by(3).chain([2, 4, 64, 128, 129, 130]) {
            for n_vectors in [0usize, 1, 31, 32, 33, 64, 97] {
                for extreme in [false, true] {
                    let (codes, nblocks, m2) = random_case(&mut rng, n_vectors, m, extreme);
                    for nq in 1..=MAX_QBS {
                        let mut luts: Vec<u8> = (0..nq * m2 * 16)
                            .map(|_| if extreme { 255 } else { rng.random() })
                            .collect();
                        // The padding sub-quantizer's table is zero.
                        if m % 2 == 1 {
                            for q in 0..nq {
                                luts[q * m2 * 16 + m * 16..q * m2 * 16 + m2 * 16].fill(0);
                            }
                        }
                        let mut want = vec![0u16; nq * nblocks * BBS];
                        accumulate_scalar(&codes, nblocks, m2, &luts, nq, &mut want);
                        if extreme {
                            assert!(
                                want.iter().all(|&s| s as usize == 255 * m),
                                "scalar extreme sum"
                            );
                        }
                        // Thresholds below, inside and above the sums, and the extremes.
                        let thresholds: Vec<u16> = (0..nq)
                            .map(|q| [0u16, 60 * m as u16, 127 * m as u16, u16::MAX][q % 4])
                            .collect();
                        let mut want_masks = vec![0u32; nq * nblocks];
                        masks_scalar(&want, nblocks, nq, &thresholds, &mut want_masks);
                        for level in Level::all_supported() {
                            let mut got = vec![0xdeadu16; nq * nblocks * BBS];
                            let mut masks = vec![0xdead_beefu32; nq * nblocks];
                            FastScanKernel::for_level(level).accumulate(
                                &codes,
                                nblocks,
                                m2,
                                &luts,
                                nq,
                                &thresholds,
                                &mut got,
                                &mut masks,
                            );
                            assert_eq!(
                                got, want,
                                "level {level} m {m} n {n_vectors} nq {nq} extreme {extreme}"
                            );
                            assert_eq!(
                                masks, want_masks,
                                "masks: level {level} m {m} n {n_vectors} nq {nq}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn collect_above_matches_scalar() {
        let mut rng = StdRng::seed_from_u64(4);
        for n in 0..=97 {
            let scores: Vec<u16> = (0..n + 1)
                .map(|_| rng.random_range(65000..=65535))
                .collect();
            for thr in [0u16, 65000, 65300, 65534, 65535] {
                let mut want = Vec::new();
                collect_above_scalar(&scores[1..], thr, 7, &mut want);
                for level in Level::all_supported() {
                    let mut got = vec![99];
                    FastScanKernel::for_level(level).collect_above(&scores[1..], thr, 7, &mut got);
                    assert_eq!(got[1..], want[..], "level {level} n {n} thr {thr}");
                }
            }
        }
    }

    #[test]
    fn count_above_and_below_rank_match_scalar() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in 0usize..=97 {
            // Narrow ranges give ties; the full one the bisection's extremes.
            for (lo, hi) in [(0u16, 3u16), (65000, 65535), (0, 65535)] {
                let scores: Vec<u16> = (0..n).map(|_| rng.random_range(lo..=hi)).collect();
                let mut sorted = scores.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for rank in [0, 1, n / 2, n.saturating_sub(1), n, n + 1] {
                    // The (rank + 1)-th largest minus one, if it is above 0.
                    let want = sorted.get(rank).and_then(|&s| s.checked_sub(1));
                    for level in Level::all_supported() {
                        let kernel = FastScanKernel::for_level(level);
                        let at = format!("level {level} n {n} rank {rank} range {lo}..={hi}");
                        assert_eq!(kernel.below_rank(&scores, rank), want, "{at}");
                    }
                }
                for thr in [0u16, 1, 2, 65000, 65534, 65535] {
                    let want = count_above_scalar(&scores, thr);
                    for level in Level::all_supported() {
                        let got = FastScanKernel::for_level(level).count_above(&scores, thr);
                        assert_eq!(got, want, "level {level} n {n} thr {thr}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_largest_code_does_not_overflow() {
        // m = 256, every table entry 255: the sum 65,280 must come out exactly.
        let mut rng = StdRng::seed_from_u64(3);
        let (codes, nblocks, m2) = random_case(&mut rng, 40, 256, false);
        let luts = vec![255u8; m2 * 16];
        for level in Level::all_supported() {
            let mut out = vec![0u16; nblocks * BBS];
            FastScanKernel::for_level(level)
                .accumulate_scores(&codes, nblocks, m2, &luts, 1, &mut out);
            assert!(out.iter().all(|&s| s == 65280), "level {level}");
        }
    }
}
