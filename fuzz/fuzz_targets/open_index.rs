//! Arbitrary bytes through the index-file reader: an error or an index, never a panic or UB.
//! Whatever opens must also search, grow and survive the full check.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pqcache::Index;

fuzz_target!(|data: &[u8]| {
    let _ = pqcache::io::file::verify_bytes(data);
    if let Ok(mut idx) = pqcache::io::file::load_bytes(data) {
        let d = idx.dim();
        if d > 0 && d <= 4096 {
            let q = vec![0.25f32; d];
            let n = idx.ntotal();
            if n > 0 {
                let res = idx.search(&q, n.min(5)).expect("a valid index searches");
                assert_eq!(res.ids.len(), n.min(5));
            }
            let _ = idx.add(&q);
        }
    }
});
