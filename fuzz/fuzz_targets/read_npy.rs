//! Arbitrary bytes through the `.npy` parser: an error or an array, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(arr) = pqcache::io::npy::parse(data) {
        let count: usize = arr.shape.iter().product();
        assert_eq!(count, arr.data.len());
    }
});
