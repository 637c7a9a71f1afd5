//! SIMD vs scalar differential of the softmax-weight kernels (the attention client's
//! normaliser, tail gather and combined weights): every supported level must match the
//! scalar reference bit for bit.
#![no_main]
#[path = "../checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::softmax_diff(data));
