//! SIMD vs scalar differential of the fast-scan kernel: fuzzed m, n, codes, tables and
//! thresholds; every supported level must match the scalar reference bit for bit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pqcache_simd::fastscan::{accumulate_scalar, block_bytes, masks_scalar, FastScanKernel, BBS, MAX_QBS};
use pqcache_simd::Level;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let m2 = 2 * (1 + data[0] as usize % 128); // 2..=256, even
    let nblocks = data[1] as usize % 5;
    let nq = 1 + data[2] as usize % MAX_QBS;
    let thr = u16::from_le_bytes([data[3], data.get(4).copied().unwrap_or(0)]);
    let body = &data[4.min(data.len())..];
    let take = |len: usize, salt: usize| -> Vec<u8> {
        (0..len).map(|i| if body.is_empty() { (i * 31 + salt) as u8 } else { body[(i + salt) % body.len()] ^ (i as u8) }).collect()
    };
    let codes = take(nblocks * block_bytes(m2), 0);
    let luts = take(nq * m2 * 16, 7);
    let thresholds: Vec<u16> = (0..nq).map(|q| thr.wrapping_mul(q as u16 + 1)).collect();
    let mut want = vec![0u16; nq * nblocks * BBS];
    accumulate_scalar(&codes, nblocks, m2, &luts, nq, &mut want);
    let mut want_masks = vec![0u32; nq * nblocks];
    masks_scalar(&want, nblocks, nq, &thresholds, &mut want_masks);
    for level in Level::all_supported() {
        let mut got = vec![0u16; nq * nblocks * BBS];
        let mut masks = vec![0u32; nq * nblocks];
        FastScanKernel::for_level(level).accumulate(&codes, nblocks, m2, &luts, nq, &thresholds, &mut got, &mut masks);
        assert_eq!(got, want, "level {level}");
        assert_eq!(masks, want_masks, "level {level}");
    }
});
