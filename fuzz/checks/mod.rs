//! The fuzz targets' checks, one function per target: `cargo fuzz` drives them with mutated
//! inputs (`fuzz_targets/*.rs`), and the root crate's `tests/fuzz_corpus.rs` replays every
//! committed corpus file through the same functions on each `cargo test`. A check returns
//! normally or panics (a finding).
#![allow(dead_code)]

use pqcache::index::ivf::IndexIVFPQFastScan;
use pqcache::io::file::{self, AnyIndex};
use pqcache::{Index, IndexFlat, IndexPQ, IndexPQFastScan, Metric, Nbits, RerankStorage};
use pqcache_simd::fastscan::{
    accumulate_scalar, block_bytes, masks_scalar, FastScanKernel, BBS, MAX_QBS,
};
use pqcache_simd::softmax::{
    combine_at_least_scalar, combine_scalar, weight_sum_at_scalar, weight_sum_scalar, ExpTables,
    HeadRow, SoftmaxKernel,
};
use pqcache_simd::Level;

/// Arbitrary bytes through the index-file reader: an error or an index, never a panic or UB.
/// Whatever opens must also search (or attend), grow and survive the full check.
pub fn open_index(data: &[u8]) {
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
}

/// A fuzzed small index (kind, shape and vectors from the input) written to bytes and read
/// back equals itself: same parameters, same search results, same bytes when written again.
pub fn roundtrip(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let kind = head[0] % 5;
    let m = 1 + (head[1] % 4) as usize;
    let d = m * (1 + (head[2] % 4) as usize);
    let metric = if head[3] & 1 == 0 {
        Metric::InnerProduct
    } else {
        Metric::L2
    };
    let keep = head[3] & 2 != 0;
    // Vectors from the remaining bytes, small integers (finite by construction).
    let vals: Vec<f32> = rest
        .iter()
        .map(|&b| (b as i32 - 128) as f32 / 16.0)
        .collect();
    let n = vals.len() / d;
    if n == 0 {
        return;
    }
    let x = &vals[..n * d];
    // Training data: the vectors, repeated to at least 256 rows (8-bit codebooks).
    let train: Vec<f32> = x.iter().copied().cycle().take(d * 256.max(n)).collect();
    let built: Option<AnyIndex> = (|| -> pqcache::Result<AnyIndex> {
        Ok(match kind {
            0 => {
                let mut f = if keep {
                    IndexFlat::new_f16(d, metric)?
                } else {
                    IndexFlat::new(d, metric)?
                };
                f.add(x)?;
                AnyIndex::Flat(f)
            }
            1 => {
                let nbits = [Nbits::Four, Nbits::Six, Nbits::Eight][(head[2] % 3) as usize];
                let mut p = IndexPQ::new(d, m, nbits, metric)?;
                p.train_config.niter = 2;
                p.train(&train)?;
                p.add(x)?;
                AnyIndex::Pq(p)
            }
            2 | 3 => {
                let mut p = IndexPQFastScan::new(d, m, metric)?;
                if keep {
                    p.keep_originals(RerankStorage::F16)?;
                    p.rerank_factor = 2;
                }
                p.train_config.niter = 2;
                p.train(&train)?;
                p.add(x)?;
                AnyIndex::PqFastScan(p)
            }
            _ => {
                let nlist = 1 + (head[1] % 3) as usize;
                let mut p = IndexIVFPQFastScan::new(d, nlist, m, metric)?;
                if keep {
                    p.keep_originals(RerankStorage::F32)?;
                }
                p.train_config.niter = 2;
                p.train(&train)?;
                p.add(x)?;
                p.nprobe = nlist;
                if n > 2 {
                    p.remove_ids(&[1]);
                }
                AnyIndex::IvfPqFastScan(p)
            }
        })
    })()
    .ok();
    let Some(idx) = built else { return };
    let bytes = file::to_bytes(&idx).expect("a valid index writes");
    let back = file::load_bytes(&bytes).expect("what was written reads back");
    assert_eq!(back.describe(), idx.describe());
    if idx.ntotal() > 0 {
        let k = idx.ntotal().min(3);
        assert_eq!(
            back.search(&x[..d], k).unwrap(),
            idx.search(&x[..d], k).unwrap()
        );
    }
    assert_eq!(file::to_bytes(&back).unwrap(), bytes);
    file::verify_bytes(&bytes).expect("what was written verifies");
}

/// Arbitrary bytes through the `.npy` parser: an error or an array, never a panic.
pub fn read_npy(data: &[u8]) {
    if let Ok(arr) = pqcache::io::npy::parse(data) {
        let count: usize = arr.shape.iter().product();
        assert_eq!(count, arr.data.len());
    }
}

/// SIMD vs scalar differential of the fast-scan kernel: fuzzed m, n, codes, tables and
/// thresholds; every supported level must match the scalar reference bit for bit.
pub fn fastscan_diff(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let m2 = 2 * (1 + data[0] as usize % 128); // 2..=256, even
    let nblocks = data[1] as usize % 5;
    let nq = 1 + data[2] as usize % MAX_QBS;
    let thr = u16::from_le_bytes([data[3], data.get(4).copied().unwrap_or(0)]);
    let body = &data[4.min(data.len())..];
    let take = |len: usize, salt: usize| -> Vec<u8> {
        (0..len)
            .map(|i| {
                if body.is_empty() {
                    (i * 31 + salt) as u8
                } else {
                    body[(i + salt) % body.len()] ^ (i as u8)
                }
            })
            .collect()
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
        FastScanKernel::for_level(level).accumulate(
            &codes,
            nblocks,
            m2,
            &luts,
            nq,
            &thresholds,
            &mut got,
            &mut masks,
        );
        assert_eq!(got, want, "level {level}");
        assert_eq!(masks, want_masks, "level {level}");
    }
}

/// SIMD vs scalar differential of the softmax-weight kernels: fuzzed rows (mostly within a
/// span of their maximum, some anywhere), maxima, spans, steps and factors (any f32 bits:
/// NaN, infinities and subnormals included), floors and gather indices; on every supported
/// level, `weight_sum`, `weight_sum_at`, `combine` (sum and max) and `combine_at_least` must
/// give the scalar reference's bits.
pub fn softmax_diff(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize % 1200;
    let nh = 1 + data[2] as usize % 4;
    let max = data[3] & 1 == 1;
    let body = &data[4..];
    let byte = |i: usize| body[i % body.len()] ^ (i as u8).wrapping_mul(29);
    let word = |i: usize| u16::from_le_bytes([byte(2 * i), byte(2 * i + 1)]);
    let float =
        |i: usize| f32::from_bits(u32::from(word(2 * i)) | u32::from(word(2 * i + 1)) << 16);
    // Per head: hi, span, a step (half the time a plain one, else any bits) and a factor.
    let rows: Vec<Vec<u16>> = (0..nh)
        .map(|h| {
            let (hi, span) = (word(7 * h), word(7 * h + 1));
            (0..n)
                .map(|i| {
                    let w = word(100 + h * 1200 + i);
                    if w & 3 == 0 {
                        w
                    } else {
                        hi.saturating_sub(w % span.saturating_add(3).max(1))
                    }
                })
                .collect()
        })
        .collect();
    let heads: Vec<HeadRow<'_>> = rows
        .iter()
        .enumerate()
        .map(|(h, row)| {
            let step = if byte(50 + h) & 1 == 0 {
                (1 + byte(60 + h) as u32) as f32 * 1e-4
            } else {
                float(20 + h)
            };
            let factor = if byte(70 + h) & 1 == 0 {
                (1 + byte(80 + h) as u32) as f32 / 256.0
            } else {
                float(30 + h)
            };
            HeadRow {
                row,
                hi: word(7 * h),
                span: word(7 * h + 1),
                exp: ExpTables::new(step),
                factor,
            }
        })
        .collect();
    // Gather indices inside the rows (the last element among them when there is one).
    let at: Vec<u32> = if n == 0 {
        Vec::new()
    } else {
        let count = word(5) as usize % (2 * n + 1);
        (0..count)
            .map(|j| {
                if j % 7 == 3 {
                    n as u32 - 1
                } else {
                    u32::from(word(3000 + j)) % n as u32
                }
            })
            .collect()
    };
    let mut combined = vec![0.0f32; n];
    combine_scalar(&heads, &mut combined, max);
    // A floor that some weights equal exactly, or any bits.
    let floor = match byte(90) % 3 {
        0 if n > 0 => combined[word(91) as usize % n],
        1 => 0.0,
        _ => float(40),
    };
    let (mut want_at, mut want_values) = (Vec::new(), Vec::new());
    combine_at_least_scalar(&heads, max, floor, &mut want_at, &mut want_values);
    for level in Level::all_supported() {
        let k = SoftmaxKernel::for_level(level);
        for h in &heads {
            let want = weight_sum_scalar(h.row, h.hi, h.span, &h.exp);
            let got = k.weight_sum(h.row, h.hi, h.span, &h.exp);
            assert_eq!(got.to_bits(), want.to_bits(), "weight_sum, level {level}");
            let want = weight_sum_at_scalar(h.row, &at, h.hi, h.span, &h.exp);
            let got = k.weight_sum_at(h.row, &at, h.hi, h.span, &h.exp);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "weight_sum_at, level {level}"
            );
        }
        let mut got = vec![0.0f32; n];
        k.combine(&heads, &mut got, max);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&combined), "combine, level {level}");
        let (mut at_got, mut values_got) = (vec![7u32], vec![7.0f32]);
        k.combine_at_least(&heads, max, floor, &mut at_got, &mut values_got);
        assert_eq!(at_got[1..], want_at[..], "combine_at_least, level {level}");
        assert_eq!(
            bits(&values_got[1..]),
            bits(&want_values),
            "combine_at_least, level {level}"
        );
        assert_eq!(
            (at_got[0], values_got[0]),
            (7, 7.0),
            "combine_at_least appends"
        );
    }
}
