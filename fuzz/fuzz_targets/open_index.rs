//! Arbitrary bytes through the index-file reader: an error or an index, never a panic or UB.
//! Whatever opens must also search (or attend), grow and survive the full check.
#![no_main]
#[path = "../checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::open_index(data));
