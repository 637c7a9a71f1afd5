//! A fuzzed small index (kind, shape and vectors from the input) written to bytes and read
//! back equals itself: same parameters, same search results, same bytes when written again.
#![no_main]
#[path = "../checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::roundtrip(data));
