//! A fuzzed small index (kind, shape and vectors from the input) written to bytes and read
//! back equals itself: same parameters, same search results, same bytes when written again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pqcache::index::ivf::IndexIVFPQFastScan;
use pqcache::io::file::{self, AnyIndex};
use pqcache::{Index, IndexFlat, IndexPQ, IndexPQFastScan, Metric, Nbits, RerankStorage};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let kind = head[0] % 5;
    let m = 1 + (head[1] % 4) as usize;
    let d = m * (1 + (head[2] % 4) as usize);
    let metric = if head[3] & 1 == 0 { Metric::InnerProduct } else { Metric::L2 };
    let keep = head[3] & 2 != 0;
    // Vectors from the remaining bytes, small integers (finite by construction).
    let vals: Vec<f32> = rest.iter().map(|&b| (b as i32 - 128) as f32 / 16.0).collect();
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
                let mut f = if keep { IndexFlat::new_f16(d, metric)? } else { IndexFlat::new(d, metric)? };
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
        assert_eq!(back.search(&x[..d], k).unwrap(), idx.search(&x[..d], k).unwrap());
    }
    assert_eq!(file::to_bytes(&back).unwrap(), bytes);
    file::verify_bytes(&bytes).expect("what was written verifies");
});
