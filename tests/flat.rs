//! Exact search against a naive reference.
mod common;

use half::f16;
use pqcache::{Index, IndexFlat, Metric};

/// Naive top-k: f64 scores, full sort, ties to the smaller id.
fn naive(
    base: &[f32],
    queries: &[f32],
    d: usize,
    k: usize,
    metric: Metric,
) -> (Vec<f32>, Vec<i64>) {
    let mut dist = Vec::new();
    let mut ids = Vec::new();
    for q in queries.chunks(d) {
        let mut all: Vec<(f64, i64)> = base
            .chunks(d)
            .enumerate()
            .map(|(i, x)| {
                let v: f64 = match metric {
                    Metric::InnerProduct => {
                        q.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
                    }
                    Metric::L2 => -q
                        .iter()
                        .zip(x)
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum::<f64>(),
                };
                (v, i as i64)
            })
            .collect();
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for &(s, i) in &all[..k] {
            dist.push(match metric {
                Metric::InnerProduct => s as f32,
                Metric::L2 => -s as f32,
            });
            ids.push(i);
        }
    }
    (dist, ids)
}

#[test]
fn integer_data_matches_naive_exactly_both_paths_both_metrics() {
    let (n, d) = (3000, 24);
    let base = common::int_vectors(n, d, 2, 1);
    // 5 queries take the per-query SIMD path, 40 the GEMM path.
    for nq in [5usize, 40] {
        let queries = common::int_vectors(nq, d, 2, 2);
        for metric in [Metric::InnerProduct, Metric::L2] {
            for k in [1usize, 10, 300, n] {
                let (want_d, want_i) = naive(&base, &queries, d, k, metric);
                for f16_storage in [false, true] {
                    let mut idx = if f16_storage {
                        IndexFlat::new_f16(d, metric)
                    } else {
                        IndexFlat::new(d, metric)
                    }
                    .unwrap();
                    idx.add(&base).unwrap();
                    let got = idx.search(&queries, k).unwrap();
                    assert_eq!(got.ids, want_i, "nq {nq} {metric} k {k} f16 {f16_storage}");
                    assert_eq!(
                        got.distances, want_d,
                        "nq {nq} {metric} k {k} f16 {f16_storage}"
                    );
                }
            }
        }
    }
}

#[test]
fn float_data_returns_true_neighbours_within_rounding() {
    let (n, d) = (2000, 37);
    let base = common::uniform(n, d, 3);
    let queries = common::uniform(20, d, 4);
    for metric in [Metric::InnerProduct, Metric::L2] {
        for k in [10usize, 200] {
            let mut idx = IndexFlat::new(d, metric).unwrap();
            idx.add(&base).unwrap();
            let got = idx.search(&queries, k).unwrap();
            let (want_d, _) = naive(&base, &queries, d, k, metric);
            for q in 0..20 {
                let kth = want_d[q * k + k - 1];
                for (slot, &id) in got.ids_of(q).iter().enumerate() {
                    // Each returned distance is the true one to f32 rounding (|v| <= 40 here,
                    // 37 terms: 1e-4 absolute is ~20x the bound), and no better vector was
                    // skipped: every returned one is at least as good as the true k-th.
                    let x = &base[id as usize * d..(id as usize + 1) * d];
                    let qv = &queries[q * d..(q + 1) * d];
                    let true_v: f64 = match metric {
                        Metric::InnerProduct => {
                            qv.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
                        }
                        Metric::L2 => qv
                            .iter()
                            .zip(x)
                            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                            .sum(),
                    };
                    assert!((got.distances_of(q)[slot] as f64 - true_v).abs() < 1e-4);
                    match metric {
                        Metric::InnerProduct => assert!(true_v >= kth as f64 - 1e-4),
                        Metric::L2 => assert!(true_v <= kth as f64 + 1e-4),
                    }
                }
            }
        }
    }
}

#[test]
fn f16_adds_round_once() {
    let d = 8;
    let x: Vec<f32> = (0..d).map(|i| 0.1 + i as f32 / 3.0).collect();
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let mut a = IndexFlat::new_f16(d, Metric::InnerProduct).unwrap();
    a.add(&x).unwrap();
    let mut b = IndexFlat::new_f16(d, Metric::InnerProduct).unwrap();
    b.add_f16(&h).unwrap();
    let q = vec![1.0f32; d];
    assert_eq!(a.search(&q, 1).unwrap(), b.search(&q, 1).unwrap());
    let want: f32 = h.iter().map(|v| v.to_f32()).sum();
    assert!((a.search(&q, 1).unwrap().distances[0] - want).abs() < 1e-5);
}

#[test]
fn reset_empties_the_index() {
    let mut idx = IndexFlat::new(4, Metric::L2).unwrap();
    idx.add(&[1.0; 8]).unwrap();
    assert_eq!(idx.ntotal(), 2);
    idx.reset();
    assert_eq!(idx.ntotal(), 0);
    assert!(matches!(
        idx.search(&[0.0; 4], 1),
        Err(pqcache::Error::EmptyIndex)
    ));
}

#[test]
fn removing_ids_is_the_index_built_without_them() {
    // FAISS's flat remove_ids: later rows move down, ids stay positions. After removing,
    // every search answers bit for bit as an index built from the surviving rows only; ids
    // out of range and repeated ids remove nothing more.
    let d = 24;
    let base = common::uniform(3000, d, 41);
    let queries = common::uniform(20, d, 42);
    let gone: Vec<i64> = (0..3000)
        .filter(|i| i % 7 == 3 || (1000..1200).contains(i))
        .collect();
    let mut ids = gone.clone();
    ids.extend([-1, 3000, 1 << 40, gone[0]]);
    let kept: Vec<f32> = base
        .chunks(d)
        .enumerate()
        .filter(|(i, _)| !gone.contains(&(*i as i64)))
        .flat_map(|(_, r)| r.iter().copied())
        .collect();
    for metric in [Metric::InnerProduct, Metric::L2] {
        for half in [false, true] {
            let make = || {
                if half {
                    IndexFlat::new_f16(d, metric)
                } else {
                    IndexFlat::new(d, metric)
                }
            };
            let mut index = make().unwrap();
            index.add(&base).unwrap();
            assert_eq!(index.remove_ids(&ids), gone.len());
            let mut fresh = make().unwrap();
            fresh.add(&kept).unwrap();
            assert_eq!(index.ntotal(), fresh.ntotal());
            for nq in [1, 20] {
                let (a, b) = (
                    index.search(&queries[..nq * d], 10).unwrap(),
                    fresh.search(&queries[..nq * d], 10).unwrap(),
                );
                assert_eq!(
                    (a.ids, a.distances),
                    (b.ids, b.distances),
                    "{metric} f16 {half}"
                );
            }
            assert_eq!(index.remove_ids(&[-5, 1 << 50]), 0);
        }
    }
}

#[test]
fn a_search_answers_the_same_on_one_thread_and_on_a_pool() {
    // One query, or one group, on a pool of one runs on the calling thread (no hand-over to
    // the pool); on a pool of two it is spread over chunks. Both give the same bits, for
    // exact, PQ and fast-scan search, one query and a batch.
    use pqcache::{IndexPQ, IndexPQFastScan, Nbits};
    let d = 16;
    let base = common::uniform(20_000, d, 77); // 3 chunks of 8,192 rows
    let queries = common::uniform(12, d, 78);
    let mut flat = IndexFlat::new(d, Metric::L2).unwrap();
    flat.add(&base).unwrap();
    let mut pq = IndexPQ::new(d, 4, Nbits::Eight, Metric::InnerProduct).unwrap();
    pq.train(&base[..4000 * d]).unwrap();
    pq.add(&base).unwrap();
    let mut fs = IndexPQFastScan::new(d, 8, Metric::InnerProduct).unwrap();
    fs.train(&base[..4000 * d]).unwrap();
    fs.add(&base).unwrap();
    let indexes: [&dyn Index; 3] = [&flat, &pq, &fs];
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            indexes
                .iter()
                .flat_map(|i| [1, 12].map(|nq| i.search(&queries[..nq * d], 10).unwrap()))
                .map(|r| (r.ids, r.distances))
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(run(1), run(2));
}
