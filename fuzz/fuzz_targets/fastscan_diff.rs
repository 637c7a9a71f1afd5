//! SIMD vs scalar differential of the fast-scan kernel: fuzzed m, n, codes, tables and
//! thresholds; every supported level must match the scalar reference bit for bit.
#![no_main]
#[path = "../checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::fastscan_diff(data));
