//! Arbitrary bytes through the `.npy` parser: an error or an array, never a panic.
#![no_main]
#[path = "../checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::read_npy(data));
