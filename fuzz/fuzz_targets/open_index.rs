//! Arbitrary bytes through the index-file reader: an error or an index, never a panic or UB.
//! Whatever opens must also search (or attend), grow and survive the full check.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pqcache::Index;

fuzz_target!(|data: &[u8]| {
    let _ = pqcache::io::file::verify_bytes(data);
    let _ = pqcache::io::file::load_context_bytes(data);
    if let Ok(mut cache) = pqcache::io::file::load_attention_bytes(data) {
        let c = cache.config().shape;
        if c.head_dim <= 1024 && c.query_heads <= 64 {
            let q = vec![0.25f32; c.query_heads * c.head_dim];
            for layer in 0..c.layers.min(4) {
                if !cache.is_empty(layer) {
                    let _ = cache.attend(layer, &q);
                }
                let kv = vec![half::f16::from_f32(0.5); c.kv_heads * c.head_dim];
                let _ = cache.append(layer, &kv, &kv);
            }
        }
    }
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
