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
//! Every kernel adds the `m` terms of one code in the same order (`j = 0, 1, ..`) starting from
//! 0.0, so it agrees **bit for bit** with the scalar reference [`scan_scalar`].
//!
//! **The loop** ([`AdcKernel::scan`]) is blocked, not vectorised. Codes are taken
//! `BLOCK` (256) at a time, and the block is swept once per group of `GROUP` (8) sub-quantizers:
//! one 8-byte load per code gives the group's indices, shifted out of the word one byte at a
//! time, and the code's running sum takes the group's terms in order. Per sweep the block's
//! sums (1 KB) and the group's table rows (8 KB at `ksub` 256) stay in L1 whatever `m` is;
//! per term the loop does one table load and one add, and the adds of consecutive codes are
//! independent chains the core overlaps. The one-code-at-a-time reference pays a 3-cycle add
//! latency per term and, once `m * ksub * 4` bytes outgrow L1 (`m` >= 32 at `ksub` 256), a
//! table row from L2 per term.
//!
//! Measured on a Zen 4 core (`cargo bench --bench pq adc_scan`, 65,536 codes): 2.5-2.8x the
//! AVX2 gather kernel this replaced (8 codes per gather; per group of 4 sub-quantizers one
//! gather of code words and four of table entries), which was itself no faster than the
//! reference there; gathers of 8 scattered floats cost more than 8 scalar loads on that
//! core. No target feature changed the blocked loop's speed, so one portable loop serves
//! every level.

use crate::level::Level;

/// Codes per block: their running sums (1 KB) stay in L1 across the block's sweeps.
const BLOCK: usize = 256;
/// Sub-quantizers per sweep of a block: the indices come from one 8-byte load per code.
const GROUP: usize = 8;

/// A resolved ADC kernel.
#[derive(Clone, Copy)]
pub struct AdcKernel {
    level: Level,
}

impl std::fmt::Debug for AdcKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdcKernel")
            .field("level", &self.level)
            .finish()
    }
}

impl AdcKernel {
    /// The kernel for `level`, capped at what the CPU supports (the same portable loop at
    /// every level, see the module doc).
    pub fn for_level(level: Level) -> AdcKernel {
        AdcKernel {
            level: level.capped(),
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
    /// `ksub` must be a power of two up to 256; code `c` is read as `c & (ksub - 1)`, as the
    /// reference reads it, so that a corrupt code byte can never index outside the table.
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
        match ksub {
            256 => scan_blocked::<256>(lut, m, codes, out),
            128 => scan_blocked::<128>(lut, m, codes, out),
            64 => scan_blocked::<64>(lut, m, codes, out),
            32 => scan_blocked::<32>(lut, m, codes, out),
            16 => scan_blocked::<16>(lut, m, codes, out),
            8 => scan_blocked::<8>(lut, m, codes, out),
            4 => scan_blocked::<4>(lut, m, codes, out),
            2 => scan_blocked::<2>(lut, m, codes, out),
            _ => scan_blocked::<1>(lut, m, codes, out),
        }
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

/// [`AdcKernel::scan`] for `ksub == KSUB` and `m > 0` (shapes checked by the caller): the
/// blocked loop of the module doc.
fn scan_blocked<const KSUB: usize>(lut: &[f32], m: usize, codes: &[u8], out: &mut [f32]) {
    let mask = KSUB - 1;
    let (rows, _) = lut.as_chunks::<KSUB>();
    for (sums, block) in out.chunks_mut(BLOCK).zip(codes.chunks(BLOCK * m)) {
        sums.fill(0.0);
        let mut j = 0;
        while j + GROUP <= m {
            let group: &[[f32; KSUB]; GROUP] = rows[j..j + GROUP].try_into().expect("GROUP rows");
            for (sum, code) in sums.iter_mut().zip(block.chunks_exact(m)) {
                let word = u64::from_le_bytes(code[j..j + GROUP].try_into().expect("GROUP bytes"));
                let mut acc = *sum;
                for (t, row) in group.iter().enumerate() {
                    acc += row[(word >> (8 * t)) as usize & mask];
                }
                *sum = acc;
            }
            j += GROUP;
        }
        for (j, row) in rows.iter().enumerate().take(m).skip(j) {
            for (sum, code) in sums.iter_mut().zip(block.chunks_exact(m)) {
                *sum += row[code[j] as usize & mask];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every `ksub`, `m` with and without a partial group of sub-quantizers, and `n` with
    /// full blocks, a partial last block, and a block alone.
    #[test]
    fn every_level_is_bit_exact_with_scalar() {
        let mut rng = StdRng::seed_from_u64(11);
        for ksub in [1usize, 2, 16, 64, 256] {
            for m in [1usize, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 64] {
                let lut: Vec<f32> = (0..m * ksub)
                    .map(|_| rng.random_range(-10.0..10.0))
                    .collect();
                for n in [
                    0usize,
                    1,
                    7,
                    9,
                    100,
                    BLOCK - 1,
                    BLOCK,
                    BLOCK + 1,
                    2 * BLOCK + 37,
                ] {
                    // Unaligned start: codes begin one byte into the buffer. Code bytes take
                    // every value: those >= ksub must be masked as the reference masks them.
                    let buf: Vec<u8> = (0..n * m + 1).map(|_| rng.random::<u8>()).collect();
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
