//! Product quantization: recall against exact search on real data, compared with FAISS.
mod common;

use pqcache::io::load_vectors;
use pqcache::{Index, IndexFlat, IndexPQ, KMeansConfig, Metric, Nbits, ProductQuantizer};

fn recall(
    base: &[f32],
    queries: &[f32],
    d: usize,
    m: usize,
    nbits: Nbits,
    metric: Metric,
    k: usize,
) -> f64 {
    let mut exact = IndexFlat::new(d, metric).unwrap();
    exact.add(base).unwrap();
    let truth = exact.search(queries, k).unwrap();
    let mut pq = IndexPQ::new(d, m, nbits, metric).unwrap();
    pq.train(base).unwrap();
    pq.add(base).unwrap();
    pq.search(queries, k).unwrap().recall_against(&truth.ids, k)
}

// Thresholds: FAISS 1.15.1's own recall@10 for the same data, m, nbits and 25 k-means
// iterations (`../shared/peers/faiss_bench.py --index pq ...`), minus 0.02. Across k-means
// seeds our recall moves by about +-0.015 on these sets, so 0.02 is the slack the issue allows
// and not a loosened bound: a broken LUT, encoder or selection drops recall far below it.

#[test]
fn bigann_l2_recall_matches_faiss() {
    let dir = common::ann_data();
    let base = load_vectors(&dir.join("bigann-10k-128_base.fvecs"), 0, 0).unwrap();
    let queries = load_vectors(&dir.join("bigann-10k-128_query.fvecs"), 0, 0).unwrap();
    // FAISS: m=16 nbits=8 -> 0.740; ours 0.724 (seed 1234).
    let r8 = recall(
        &base.data,
        &queries.data,
        128,
        16,
        Nbits::Eight,
        Metric::L2,
        10,
    );
    assert!(r8 >= 0.740 - 0.02, "recall@10 {r8}");
    // FAISS: m=32 nbits=4 -> 0.625; ours 0.639.
    let r4 = recall(
        &base.data,
        &queries.data,
        128,
        32,
        Nbits::Four,
        Metric::L2,
        10,
    );
    assert!(r4 >= 0.625 - 0.02, "recall@10 {r4}");
}

#[test]
fn bigann_recall_against_shipped_groundtruth() {
    let dir = common::ann_data();
    let base = load_vectors(&dir.join("bigann-10k-128_base.fvecs"), 0, 0).unwrap();
    let queries = load_vectors(&dir.join("bigann-10k-128_query.fvecs"), 0, 0).unwrap();
    let (rows, gk, gt) =
        pqcache::io::load_groundtruth(&dir.join("bigann-10k-128_groundtruth.ivecs")).unwrap();
    assert_eq!((rows, gk), (100, 100));
    // Exact search must reproduce the shipped brute-force ground truth at k = 1 (ties aside,
    // which SIFT's integer data makes rare): recall@1 of 1.0 within one tie.
    let mut exact = IndexFlat::new(128, Metric::L2).unwrap();
    exact.add(&base.data).unwrap();
    let r = exact
        .search(&queries.data, 1)
        .unwrap()
        .recall_against(&gt, gk);
    assert!(r >= 0.99, "exact recall@1 against ground truth {r}");
}

#[test]
fn gemma_keys_inner_product_recall_matches_faiss() {
    let dir = common::dumps().join("prideprejudice-8192");
    let keys = load_vectors(&dir.join("k.npy"), 0, 0).unwrap();
    let queries = load_vectors(&dir.join("q.npy"), 0, 0).unwrap();
    assert_eq!((keys.rows, keys.dim), (8192, 256));
    // FAISS: m=64 nbits=8 -> 0.4446; ours 0.4466. Every 4th query keeps the test quick.
    let q: Vec<f32> = queries
        .data
        .chunks(256)
        .step_by(4)
        .flatten()
        .copied()
        .collect();
    let r8 = recall(
        &keys.data,
        &q,
        256,
        64,
        Nbits::Eight,
        Metric::InnerProduct,
        10,
    );
    assert!(r8 >= 0.4446 - 0.02, "recall@10 {r8}");
    // FAISS: m=64 nbits=4 -> 0.1559; ours 0.1676.
    let r4 = recall(
        &keys.data,
        &q,
        256,
        64,
        Nbits::Four,
        Metric::InnerProduct,
        10,
    );
    assert!(r4 >= 0.1559 - 0.02, "recall@10 {r4}");
}

#[test]
fn adc_scores_equal_scores_of_decoded_vectors() {
    // The table decomposition is exact: the ADC score of a code equals the metric between the
    // query and the decoded vector (to f32 rounding).
    let d = 32;
    let base = common::uniform(2000, d, 9);
    for metric in [Metric::InnerProduct, Metric::L2] {
        let mut pq = IndexPQ::new(d, 8, Nbits::Eight, metric).unwrap();
        pq.train(&base).unwrap();
        pq.add(&base[..100 * d]).unwrap();
        let q = &base[1900 * d..1901 * d];
        let mut scores = vec![0.0; 100];
        pq.adc_scores(q, &mut scores).unwrap();
        for (i, &s) in scores.iter().enumerate() {
            let x = pq.reconstruct(i).unwrap();
            let want: f32 = match metric {
                Metric::InnerProduct => q.iter().zip(&x).map(|(a, b)| a * b).sum(),
                Metric::L2 => q.iter().zip(&x).map(|(a, b)| (a - b) * (a - b)).sum(),
            };
            assert!((s - want).abs() < 1e-4, "{metric} code {i}: {s} vs {want}");
        }
    }
}

#[test]
fn encode_decode_reduces_error_with_more_bits_and_sub_quantizers() {
    let d = 32;
    let x = common::uniform(4000, d, 10);
    let err = |m: usize, nbits: Nbits| -> f64 {
        let mut pq = ProductQuantizer::new(d, m, nbits).unwrap();
        pq.train(&x, &KMeansConfig::default()).unwrap();
        let codes = pq.compute_codes(&x).unwrap();
        let y = pq.decode(&codes).unwrap();
        x.iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / x.len() as f64
    };
    let (e4, e8, e8m) = (
        err(8, Nbits::Four),
        err(8, Nbits::Eight),
        err(16, Nbits::Eight),
    );
    // Uniform data in [-1, 1): variance 1/3 per coordinate. Quantizing must beat it by far and
    // each refinement must lower the error.
    assert!(e4 < 0.33 && e8 < e4 && e8m < e8, "errors {e4} {e8} {e8m}");
}

#[test]
fn codes_are_independent_of_thread_count() {
    let d = 16;
    let x = common::uniform(3000, d, 11);
    let train = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut pq = ProductQuantizer::new(d, 4, Nbits::Eight).unwrap();
            pq.train(&x, &KMeansConfig::default()).unwrap();
            pq.compute_codes(&x).unwrap()
        })
    };
    assert_eq!(train(1), train(2));
}

#[test]
fn codes_are_the_nearest_centroids_for_both_encoders() {
    // 4-bit codebooks go through the direct encoder, 8-bit ones through GEMM assignment: both
    // must pick the nearest centroid of every sub-vector (up to float near-ties).
    let d = 24;
    let x = common::uniform(3000, d, 21);
    for nbits in [Nbits::Four, Nbits::Eight] {
        let mut pq = ProductQuantizer::new(d, 6, nbits).unwrap();
        pq.train(&x, &KMeansConfig::default()).unwrap();
        let codes = pq.compute_codes(&x[..200 * d]).unwrap();
        let dsub = pq.dsub();
        for i in 0..200 {
            for j in 0..6 {
                let sub = &x[i * d + j * dsub..i * d + (j + 1) * dsub];
                let dist = |c: usize| -> f32 {
                    pq.centroid(j, c)
                        .iter()
                        .zip(sub)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum()
                };
                let best = (0..pq.ksub()).map(dist).fold(f32::INFINITY, f32::min);
                let got = dist(codes[i * 6 + j] as usize);
                assert!(
                    got <= best + 1e-5,
                    "{nbits:?} row {i} sub {j}: {got} vs {best}"
                );
            }
        }
    }
}

#[test]
fn removing_ids_is_the_index_built_without_them() {
    // As FAISS's IndexPQ.remove_ids: later codes move down. The same codebooks over the
    // surviving rows answer bit for bit alike.
    let d = 32;
    let base = common::uniform(3000, d, 5);
    let queries = common::uniform(10, d, 6);
    for nbits in [Nbits::Four, Nbits::Eight] {
        let mut index = IndexPQ::new(d, 8, nbits, Metric::L2).unwrap();
        index.train(&base).unwrap();
        let mut fresh = index.clone();
        index.add(&base).unwrap();
        let gone: Vec<i64> = (0..3000).step_by(3).collect();
        assert_eq!(index.remove_ids(&gone), 1000);
        // 2,000 rows remain: 2000 is past the end now.
        assert_eq!(index.remove_ids(&[2000, -1, 5000]), 0);
        let kept: Vec<f32> = base
            .chunks(d)
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        fresh.add(&kept).unwrap();
        let (a, b) = (
            index.search(&queries, 10).unwrap(),
            fresh.search(&queries, 10).unwrap(),
        );
        assert_eq!((a.ids, a.distances), (b.ids, b.distances));
    }
}
