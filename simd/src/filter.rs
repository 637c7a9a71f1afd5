//! Threshold filters: the positions of the scores at or above a floor, ascending; and the
//! largest of u16 scores (the softmax reference point of a fast-scan row).
//!
//! [`FilterKernel::collect_at_least`] takes non-negative, non-NaN f32 scores (aggregated
//! softmax weights): 16 (AVX-512) or 8 (AVX2) compares give a bit mask, whose set bits are
//! pushed with `tzcnt`. No branch per score: a floor that one score in ten passes would
//! mispredict a plain `if` often. Every level pushes the same positions in the same order.

use crate::level::Level;

type CollectFn = fn(&[f32], f32, u32, &mut Vec<u32>);
type MaxFn = fn(&[u16]) -> u16;
type BlockMaxFn = fn(&[f32], &mut Vec<f32>);

/// A resolved filter kernel.
#[derive(Clone, Copy)]
pub struct FilterKernel {
    level: Level,
    collect: CollectFn,
    max: MaxFn,
    block_max: BlockMaxFn,
}

impl std::fmt::Debug for FilterKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl FilterKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> FilterKernel {
        match level.capped() {
            #[cfg(target_arch = "x86_64")]
            Level::V4 | Level::V4Icl => FilterKernel {
                level: Level::V4,
                collect: x86::collect_v4,
                max: x86::max_v4,
                block_max: x86::block_max16_v4,
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => FilterKernel {
                level: Level::V3,
                collect: x86::collect_v3,
                max: x86::max_v3,
                block_max: x86::block_max16_v3,
            },
            _ => FilterKernel {
                level: Level::Scalar,
                collect: collect_at_least_scalar,
                max: max_u16_scalar,
                block_max: block_max16_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> FilterKernel {
        FilterKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Pushes `base + i` for every `i` with `scores[i] >= floor`, ascending. `scores` must
    /// not hold NaN (a NaN score is never pushed on any level; a NaN floor pushes nothing).
    pub fn collect_at_least(&self, scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
        (self.collect)(scores, floor, base, out)
    }

    /// The largest of `scores` (0 when empty).
    pub fn max_u16(&self, scores: &[u16]) -> u16 {
        (self.max)(scores)
    }

    /// Appends the largest score of each whole block of 16 (a shorter tail is skipped).
    /// `scores` must not hold NaN; -0.0 and 0.0 may come out as either.
    pub fn block_max16(&self, scores: &[f32], out: &mut Vec<f32>) {
        (self.block_max)(scores, out)
    }
}

/// Scalar reference of [`FilterKernel::block_max16`].
pub fn block_max16_scalar(scores: &[f32], out: &mut Vec<f32>) {
    out.extend(
        scores
            .chunks_exact(16)
            .map(|b| b[1..].iter().fold(b[0], |m, &v| if v > m { v } else { m })),
    );
}

/// Scalar reference of [`FilterKernel::max_u16`].
pub fn max_u16_scalar(scores: &[u16]) -> u16 {
    scores.iter().copied().max().unwrap_or(0)
}

/// Pushes `base + i` for each set bit `i` of `mask`, ascending.
#[inline(always)]
fn push_bits(mut mask: u64, base: u32, out: &mut Vec<u32>) {
    while mask != 0 {
        out.push(base + mask.trailing_zeros());
        mask &= mask - 1;
    }
}

/// Scalar reference of [`FilterKernel::collect_at_least`] (64 scores per mask).
pub fn collect_at_least_scalar(scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
    for (c, chunk) in scores.chunks(64).enumerate() {
        let mut mask = 0u64;
        for (j, &v) in chunk.iter().enumerate() {
            mask |= u64::from(v >= floor) << j;
        }
        push_bits(mask, base + (c * 64) as u32, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    unsafe fn collect_v3_imp(scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
        let full = scores.len() / 32 * 32;
        // SAFETY: loads read scores[i .. i + 32] with i + 32 <= len.
        unsafe {
            let f = _mm256_set1_ps(floor);
            let p = scores.as_ptr();
            let mut i = 0;
            while i < full {
                let mut mask = 0u64;
                for j in 0..4 {
                    let v = _mm256_loadu_ps(p.add(i + 8 * j));
                    let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(v, f);
                    mask |= (_mm256_movemask_ps(ge) as u32 as u64) << (8 * j);
                }
                super::push_bits(mask, base + i as u32, out);
                i += 32;
            }
        }
        super::collect_at_least_scalar(&scores[full..], floor, base + full as u32, out);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn collect_v4_imp(scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
        let full = scores.len() / 64 * 64;
        // SAFETY: loads read scores[i .. i + 64] with i + 64 <= len.
        unsafe {
            let f = _mm512_set1_ps(floor);
            let p = scores.as_ptr();
            let mut i = 0;
            while i < full {
                let mut mask = 0u64;
                for j in 0..4 {
                    let v = _mm512_loadu_ps(p.add(i + 16 * j));
                    mask |= (_mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, f) as u64) << (16 * j);
                }
                super::push_bits(mask, base + i as u32, out);
                i += 64;
            }
        }
        super::collect_at_least_scalar(&scores[full..], floor, base + full as u32, out);
    }

    #[target_feature(enable = "avx2")]
    unsafe fn max_v3_imp(scores: &[u16]) -> u16 {
        let full = scores.len() / 64 * 64;
        // SAFETY: loads read scores[i .. i + 64] with i + 64 <= len.
        unsafe {
            let p = scores.as_ptr();
            let mut m = [_mm256_setzero_si256(); 4];
            let mut i = 0;
            while i < full {
                for (j, a) in m.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(p.add(i + 16 * j) as *const __m256i);
                    *a = _mm256_max_epu16(*a, v);
                }
                i += 64;
            }
            let all = _mm256_max_epu16(_mm256_max_epu16(m[0], m[1]), _mm256_max_epu16(m[2], m[3]));
            let mut lanes = [0u16; 16];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, all);
            lanes
                .into_iter()
                .max()
                .unwrap_or(0)
                .max(super::max_u16_scalar(&scores[full..]))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn max_v4_imp(scores: &[u16]) -> u16 {
        let full = scores.len() / 128 * 128;
        // SAFETY: loads read scores[i .. i + 128] with i + 128 <= len.
        unsafe {
            let p = scores.as_ptr();
            let mut m = [_mm512_setzero_si512(); 4];
            let mut i = 0;
            while i < full {
                for (j, a) in m.iter_mut().enumerate() {
                    let v = _mm512_loadu_si512(p.add(i + 32 * j) as *const __m512i);
                    *a = _mm512_max_epu16(*a, v);
                }
                i += 128;
            }
            let all = _mm512_max_epu16(_mm512_max_epu16(m[0], m[1]), _mm512_max_epu16(m[2], m[3]));
            let mut lanes = [0u16; 32];
            _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, all);
            lanes
                .into_iter()
                .max()
                .unwrap_or(0)
                .max(super::max_u16_scalar(&scores[full..]))
        }
    }

    pub(super) fn max_v3(scores: &[u16]) -> u16 {
        // SAFETY: only reachable through a kernel built for V3 or above, which the CPU
        // supports.
        unsafe { max_v3_imp(scores) }
    }

    pub(super) fn max_v4(scores: &[u16]) -> u16 {
        // SAFETY: only reachable through a kernel built for V4 or above, which the CPU
        // supports.
        unsafe { max_v4_imp(scores) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn block_max16_v3_imp(scores: &[f32], out: &mut Vec<f32>) {
        out.reserve(scores.len() / 16);
        for block in scores.chunks_exact(16) {
            // SAFETY: the block holds 16 floats.
            unsafe {
                let p = block.as_ptr();
                let m = _mm256_max_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
                out.push(_mm_cvtss_f32(m));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn block_max16_v4_imp(scores: &[f32], out: &mut Vec<f32>) {
        out.reserve(scores.len() / 16);
        for block in scores.chunks_exact(16) {
            // SAFETY: the block holds 16 floats.
            unsafe { out.push(_mm512_reduce_max_ps(_mm512_loadu_ps(block.as_ptr()))) }
        }
    }

    pub(super) fn block_max16_v3(scores: &[f32], out: &mut Vec<f32>) {
        // SAFETY: only reachable through a kernel built for V3 or above, which the CPU
        // supports.
        unsafe { block_max16_v3_imp(scores, out) }
    }

    pub(super) fn block_max16_v4(scores: &[f32], out: &mut Vec<f32>) {
        // SAFETY: only reachable through a kernel built for V4 or above, which the CPU
        // supports.
        unsafe { block_max16_v4_imp(scores, out) }
    }

    pub(super) fn collect_v3(scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
        // SAFETY: only reachable through a kernel built for V3 or above, which the CPU
        // supports.
        unsafe { collect_v3_imp(scores, floor, base, out) }
    }

    pub(super) fn collect_v4(scores: &[f32], floor: f32, base: u32, out: &mut Vec<u32>) {
        // SAFETY: only reachable through a kernel built for V4 or above, which the CPU
        // supports.
        unsafe { collect_v4_imp(scores, floor, base, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_matches_scalar_and_the_definition() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [0usize, 1, 7, 8, 31, 32, 33, 63, 64, 65, 200, 1000] {
            // Few distinct values, so that scores equal to the floor occur.
            let scores: Vec<f32> = (0..n)
                .map(|_| rng.random_range(0..20) as f32 * 0.125)
                .collect();
            for floor in [0.0f32, 0.5, 1.25, 2.375, 3.0, f32::INFINITY] {
                let want: Vec<u32> = (0..n as u32)
                    .filter(|&i| scores[i as usize] >= floor)
                    .map(|i| i + 7)
                    .collect();
                let mut got = vec![99];
                collect_at_least_scalar(&scores, floor, 7, &mut got);
                assert_eq!(got[1..], want[..], "scalar n {n} floor {floor}");
                let bits: Vec<u16> = scores.iter().map(|&v| (v * 8.0) as u16 * 3000).collect();
                // Signed scores for the block maxima, each block's largest somewhere in it.
                let signed: Vec<f32> = scores.iter().map(|v| v - 1.2).collect();
                let want_max: Vec<f32> = signed
                    .chunks_exact(16)
                    .map(|b| b.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
                let mut got_max = vec![5.0];
                block_max16_scalar(&signed, &mut got_max);
                assert_eq!(got_max[1..], want_max[..], "scalar n {n}");
                for level in Level::all_supported() {
                    let k = FilterKernel::for_level(level);
                    assert_eq!(k.max_u16(&bits), max_u16_scalar(&bits), "{level} n {n}");
                    let mut got_max = vec![5.0];
                    k.block_max16(&signed, &mut got_max);
                    assert_eq!(got_max[1..], want_max[..], "{level} n {n}");
                    let mut got = vec![99];
                    FilterKernel::for_level(level).collect_at_least(&scores, floor, 7, &mut got);
                    assert_eq!(got[0], 99, "appends");
                    assert_eq!(got[1..], want[..], "{level} n {n} floor {floor}");
                }
            }
        }
    }
}
