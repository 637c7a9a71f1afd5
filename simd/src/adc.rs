//! Asymmetric distance computation (ADC) with a float lookup table over byte codes.
//!
//! A product quantizer splits a vector into `m` sub-vectors and stores, for each, the index of
//! its nearest centroid among `ksub` (16 or 256). Given a query, the lookup table holds the
//! partial score of every (sub-quantizer, centroid) pair; the score of a code is the sum of
//! `m` table entries.
//!
//! ```text
//! lut   : m * ksub f32, row-major     lut[j * ksub + c] = partial score of centroid c in sub-space j
//! codes : n * m bytes, row-major      codes[i * m + j]  = centroid of vector i in sub-space j (< ksub)
//! out   : n f32                       out[i] = sum_{j = 0..m} lut[j * ksub + codes[i * m + j]]
//! ```
//!
//! Every level adds the `m` terms of one code in the same order (`j = 0, 1, ..`) starting from
//! 0.0, so all levels agree **bit for bit** with the scalar reference. The v3 and v4 kernels
//! score 8 codes at once with gathers: per group of 4 sub-quantizers one gather fetches
//! 4 code bytes of each vector, and 4 gathers fetch the table entries.

use crate::level::Level;

/// A resolved ADC kernel.
#[derive(Clone, Copy)]
pub struct AdcKernel {
    level: Level,
    scan: fn(&[f32], usize, usize, &[u8], &mut [f32]),
}

impl std::fmt::Debug for AdcKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdcKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl AdcKernel {
    /// The kernel for `level`, capped at what the CPU supports.
    pub fn for_level(level: Level) -> AdcKernel {
        let level = level.capped();
        match level {
            // v4 uses the 8-lane kernel: 16-lane gathers measured slower on AVX-512 machines
            // (m=16, n=65536: 250 us against 226 us; `cargo bench --bench pq adc_scan`).
            #[cfg(target_arch = "x86_64")]
            Level::V4Icl | Level::V4 | Level::V3 => AdcKernel {
                level,
                scan: x86::scan_v3,
            },
            _ => AdcKernel {
                level: Level::Scalar,
                scan: scan_scalar,
            },
        }
    }

    /// The kernel for [`Level::best`].
    pub fn best() -> AdcKernel {
        AdcKernel::for_level(Level::best())
    }

    /// The level this kernel was resolved for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Scores `out.len()` codes. `lut` is `m * ksub`, `codes` is `out.len() * m` bytes.
    ///
    /// `ksub` must be a power of two up to 256; every level reads code `c` as
    /// `c & (ksub - 1)`, so that a corrupt code byte can never index outside the table.
    /// Panics if the lengths disagree or `ksub` is not such a power of two.
    pub fn scan(&self, lut: &[f32], m: usize, ksub: usize, codes: &[u8], out: &mut [f32]) {
        assert!(
            ksub.is_power_of_two() && ksub <= 256,
            "ksub must be a power of two <= 256"
        );
        assert_eq!(lut.len(), m * ksub, "lut must hold m * ksub entries");
        assert_eq!(codes.len(), out.len() * m, "codes must hold n * m bytes");
        if m == 0 {
            out.fill(0.0);
            return;
        }
        (self.scan)(lut, m, ksub, codes, out)
    }
}

/// Scalar reference: `out[i] = sum_j lut[j * ksub + (codes[i * m + j] & (ksub - 1))]`,
/// j ascending. Shapes as in [`AdcKernel::scan`].
pub fn scan_scalar(lut: &[f32], m: usize, ksub: usize, codes: &[u8], out: &mut [f32]) {
    let mask = ksub - 1;
    for (o, code) in out.iter_mut().zip(codes.chunks_exact(m)) {
        let mut acc = 0.0f32;
        for (j, &c) in code.iter().enumerate() {
            acc += lut[j * ksub + (c as usize & mask)];
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Scores 8 codes starting at `codes` (8 * m bytes) into `out` (8 f32).
    ///
    /// # Safety
    /// AVX2 available; `codes` readable for `8 * m` bytes; `lut` readable for `m * ksub` f32;
    /// `ksub` a power of two <= 256; `out` writable for 8 f32.
    #[inline(always)]
    unsafe fn block8(lut: *const f32, m: usize, ksub: usize, codes: *const u8, out: *mut f32) {
        // SAFETY: the gathers read code words at byte offsets lane*m + j .. +4 with j + 4 <= m,
        // inside the 8 * m readable bytes; table gathers read lut[j*ksub + (c & (ksub-1))].
        unsafe {
            let lane_off = _mm256_mullo_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(m as i32),
            );
            let byte = _mm256_set1_epi32((ksub - 1) as i32);
            let mut acc = _mm256_setzero_ps();
            let mut j = 0;
            while j + 4 <= m {
                let words = _mm256_i32gather_epi32::<1>(codes.add(j) as *const i32, lane_off);
                let base = lut.add(j * ksub);
                let c0 = _mm256_and_si256(words, byte);
                acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(base, c0));
                let c1 = _mm256_and_si256(_mm256_srli_epi32::<8>(words), byte);
                acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(base.add(ksub), c1));
                let c2 = _mm256_and_si256(_mm256_srli_epi32::<16>(words), byte);
                acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(base.add(2 * ksub), c2));
                let c3 = _mm256_and_si256(_mm256_srli_epi32::<24>(words), byte);
                acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(base.add(3 * ksub), c3));
                j += 4;
            }
            while j < m {
                let mut idx = [0i32; 8];
                for (lane, v) in idx.iter_mut().enumerate() {
                    *v = (*codes.add(lane * m + j) as usize & (ksub - 1)) as i32;
                }
                let c = _mm256_loadu_si256(idx.as_ptr() as *const __m256i);
                acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(lut.add(j * ksub), c));
                j += 1;
            }
            _mm256_storeu_ps(out, acc);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn scan_v3_imp(lut: &[f32], m: usize, ksub: usize, codes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let full = n / 8 * 8;
        let mut i = 0;
        while i < full {
            // SAFETY: codes holds n * m bytes (checked by the caller), so 8 * m bytes are
            // readable from i * m; out has 8 slots from i; ksub is a power of two.
            unsafe {
                block8(
                    lut.as_ptr(),
                    m,
                    ksub,
                    codes.as_ptr().add(i * m),
                    out.as_mut_ptr().add(i),
                )
            };
            i += 8;
        }
        super::scan_scalar(lut, m, ksub, &codes[full * m..], &mut out[full..]);
    }

    pub(super) fn scan_v3(lut: &[f32], m: usize, ksub: usize, codes: &[u8], out: &mut [f32]) {
        // SAFETY: only reachable through an AdcKernel built for V3 or above, which
        // `Level::capped` confirmed the CPU supports; shapes were checked by `AdcKernel::scan`.
        unsafe { scan_v3_imp(lut, m, ksub, codes, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(11);
        for &ksub in &[16usize, 256] {
            for m in [1usize, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 64] {
                let lut: Vec<f32> = (0..m * ksub)
                    .map(|_| rng.random_range(-10.0..10.0))
                    .collect();
                for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100] {
                    // Unaligned start: codes begin one byte into the buffer.
                    let buf: Vec<u8> = (0..n * m + 1)
                        .map(|_| rng.random_range(0..ksub) as u8)
                        .collect();
                    let codes = &buf[1..];
                    let mut want = vec![0.0; n];
                    scan_scalar(&lut, m, ksub, codes, &mut want);
                    for level in Level::all_supported() {
                        let mut got = vec![f32::NAN; n];
                        AdcKernel::for_level(level).scan(&lut, m, ksub, codes, &mut got);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "level {level} ksub {ksub} m {m} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn out_of_range_codes_are_masked_identically() {
        let lut: Vec<f32> = (0..16 * 5).map(|x| x as f32).collect();
        let codes: Vec<u8> = (0..5 * 40).map(|x| (x * 37 % 256) as u8).collect();
        let mut want = vec![0.0; 40];
        scan_scalar(&lut, 5, 16, &codes, &mut want);
        assert_eq!(
            want[0],
            (0..5)
                .map(|j| (j * 16 + (j * 37 % 256) % 16) as f32)
                .sum::<f32>()
        );
        for level in Level::all_supported() {
            let mut got = vec![0.0; 40];
            AdcKernel::for_level(level).scan(&lut, 5, 16, &codes, &mut got);
            assert_eq!(got, want, "level {level}");
        }
    }
}
