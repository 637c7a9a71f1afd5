//! IVF fast-scan: equality with the flat fast-scan at full probe, recall against FAISS's
//! figures, streaming (concurrent add / search / remove / refresh), drift and refresh.
mod common;

use pqcache::index::ivf::{self, IndexIVFPQFastScan};
use pqcache::io::load_vectors;
use pqcache::ivf::CoarseQuantizer;
use pqcache::{
    Error, Index, IndexFlat, IndexPQFastScan, Metric, Nbits, ProductQuantizer, RefreshPolicy,
    RerankStorage, StreamingIndex,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn exact_ids(base: &[f32], queries: &[f32], d: usize, k: usize, metric: Metric) -> Vec<i64> {
    let mut flat = IndexFlat::new(d, metric).unwrap();
    flat.add(base).unwrap();
    flat.search(queries, k).unwrap().ids
}

fn recall(idx: &dyn Index, queries: &[f32], truth: &[i64], k: usize) -> f64 {
    idx.search(queries, k).unwrap().recall_against(truth, k)
}

#[test]
fn full_probe_without_residuals_equals_the_flat_fast_scan() {
    let d = 32;
    let base = common::uniform(3000, d, 1);
    let queries = common::uniform(40, d, 2);
    for metric in [Metric::InnerProduct, Metric::L2] {
        let mut pq = ProductQuantizer::new(d, 8, Nbits::Four).unwrap();
        pq.train(&base, &Default::default()).unwrap();
        let mut coarse = CoarseQuantizer::new(d, 10, metric).unwrap();
        coarse.train(&base, &Default::default()).unwrap();
        let mut ivf =
            IndexIVFPQFastScan::with_quantizers(coarse, pq.clone(), metric, false).unwrap();
        ivf.nprobe = 10;
        ivf.add(&base).unwrap();
        let mut flat = IndexPQFastScan::with_quantizer(pq, metric).unwrap();
        flat.add(&base).unwrap();
        for k in [1, 10, 300] {
            let a = ivf.search(&queries, k).unwrap();
            let b = flat.search(&queries, k).unwrap();
            assert_eq!(a.ids, b.ids, "{metric:?} k {k}");
            assert_eq!(a.distances, b.distances, "{metric:?} k {k}");
        }
    }
}

#[test]
fn recall_matches_faiss_on_bigann() {
    let dir = common::ann_data();
    let base = load_vectors(&dir.join("bigann-10k-128_base.fvecs"), 0, 0).unwrap();
    let queries = load_vectors(&dir.join("bigann-10k-128_query.fvecs"), 0, 0).unwrap();
    let d = base.dim;
    let truth = exact_ids(&base.data, &queries.data, d, 10, Metric::L2);
    let mut ivf = IndexIVFPQFastScan::new(d, 64, 32, Metric::L2).unwrap();
    ivf.train(&base.data).unwrap();
    ivf.add(&base.data).unwrap();
    // FAISS 1.15.1 IndexIVFPQFastScan(nlist 64, m 32, 4 bits, L2, by_residual) on the same
    // files (faiss_bench.py --index ivfpqfs --nlist 64 --m 32 --metric l2): recall@10 0.407
    // at nprobe 1 and 0.622 at nprobe 16; ours measured 0.411 and 0.633. The thresholds
    // allow 0.02 below FAISS (k-means seeds move recall by about +-0.01 here).
    for (nprobe, faiss) in [(1, 0.407), (16, 0.622)] {
        ivf.nprobe = nprobe;
        let r = recall(&ivf, &queries.data, &truth, 10);
        eprintln!("bigann nprobe {nprobe}: recall {r:.3}");
        assert!(
            r >= faiss - 0.02,
            "nprobe {nprobe}: recall {r} vs FAISS {faiss}"
        );
    }
    // Re-ranking with the originals lifts recall far above the 4-bit codes alone (0.95+
    // measured at nprobe 16, rerank 10; the probe, not the codes, bounds it then).
    let mut rr = IndexIVFPQFastScan::new(d, 64, 32, Metric::L2).unwrap();
    rr.keep_originals(RerankStorage::F32).unwrap();
    rr.train(&base.data).unwrap();
    rr.add(&base.data).unwrap();
    rr.nprobe = 16;
    rr.rerank_factor = 10;
    let r = recall(&rr, &queries.data, &truth, 10);
    eprintln!("bigann rerank 10: recall {r:.3}");
    assert!(r >= 0.9, "rerank recall {r}");
}

#[test]
fn recall_matches_faiss_on_gemma_keys() {
    let dir = common::dumps().join("prideprejudice-8192");
    let keys = load_vectors(&dir.join("k.npy"), 0, 0).unwrap();
    let q = load_vectors(&dir.join("q.npy"), 0, 0).unwrap();
    let d = keys.dim;
    let truth = exact_ids(&keys.data, &q.data, d, 10, Metric::InnerProduct);
    let mut ivf = IndexIVFPQFastScan::new(d, 64, 64, Metric::InnerProduct).unwrap();
    ivf.train(&keys.data).unwrap();
    ivf.add(&keys.data).unwrap();
    // FAISS 1.15.1 IndexIVFPQFastScan(nlist 64, m 64, 4 bits, IP) on layer 0, query head 0
    // (faiss_bench.py --index ivfpqfs --nlist 64 --m 64 --metric ip): recall@10 0.151 at
    // nprobe 4 and 0.163 at nprobe 16; ours measured 0.146 and 0.162. Low for both: the
    // Gemma keys are hard for 4-bit codes (re-ranking is the remedy, below). Thresholds:
    // FAISS - 0.02.
    for (nprobe, faiss) in [(4, 0.151), (16, 0.163)] {
        ivf.nprobe = nprobe;
        let r = recall(&ivf, &q.data, &truth, 10);
        eprintln!("gemma nprobe {nprobe}: recall {r:.3}");
        assert!(
            r >= faiss - 0.02,
            "nprobe {nprobe}: recall {r} vs FAISS {faiss}"
        );
    }
}

/// The batch path (lists in list order, each query's best list in a first pass) and the
/// one-query path (lists in coarse order), on any number of threads, keep the same candidates: the same ids, ties
/// included (integer vectors give many), with removed vectors among them. The distances
/// agree to rounding: a batch's coarse scores come from a GEMM, one query's from dot
/// products, summed in another order.
#[test]
fn a_batch_equals_its_queries_one_at_a_time() {
    let d = 16;
    let base = common::int_vectors(2000, d, 3, 11);
    let queries = common::int_vectors(40, d, 3, 12);
    for metric in [Metric::L2, Metric::InnerProduct] {
        let mut idx = IndexIVFPQFastScan::new(d, 16, 8, metric).unwrap();
        idx.train(&base).unwrap();
        idx.add(&base).unwrap();
        idx.remove_ids(&(0..2000).step_by(7).collect::<Vec<i64>>());
        for nprobe in [1, 3, 16] {
            idx.nprobe = nprobe;
            for k in [1, 10, 100] {
                let batch = idx.search(&queries, k).unwrap();
                // The caller's thread (1), the index's own pool (2) and the caller's pool (0)
                // give the same rows, bit for bit; one query alone the same ids, its lists
                // scanned in parallel or not.
                for (threads, parallel_min) in [(1, 0), (2, 0), (2, usize::MAX), (0, 0)] {
                    idx.set_threads(threads).unwrap();
                    idx.parallel_min_code_bytes = parallel_min;
                    let at = format!("{metric:?} nprobe {nprobe} k {k} threads {threads}");
                    assert_eq!(idx.search(&queries, k).unwrap(), batch, "{at}");
                    for (i, q) in queries.chunks(d).enumerate() {
                        let one = idx.search(q, k).unwrap();
                        let row = i * k..(i + 1) * k;
                        assert_eq!(one.ids, batch.ids[row.clone()], "{at} query {i}");
                        for (a, b) in one.distances.iter().zip(&batch.distances[row]) {
                            let close = a == b || (a - b).abs() <= 1e-5 * a.abs().max(1.0);
                            assert!(close, "{at} query {i}: {a} {b}");
                        }
                    }
                }
                // L2's per-list terms made as lists are scanned (too large to keep) give the
                // same rows, bit for bit.
                assert_eq!(idx.has_precomputed_terms(), metric == Metric::L2);
                let one: Vec<_> = queries
                    .chunks(d)
                    .map(|q| idx.search(q, k).unwrap())
                    .collect();
                idx.set_precomputed_max_bytes(0);
                assert!(!idx.has_precomputed_terms());
                let at = format!("{metric:?} nprobe {nprobe} k {k}, terms made");
                assert_eq!(idx.search(&queries, k).unwrap(), batch, "{at}");
                for (q, want) in queries.chunks(d).zip(&one) {
                    assert_eq!(&idx.search(q, k).unwrap(), want, "{at}");
                }
                idx.set_precomputed_max_bytes(ivf::PRECOMPUTED_MAX_BYTES);
            }
        }
    }
}

#[test]
fn adding_one_at_a_time_equals_bulk_add_and_ids_are_stable() {
    let d = 16;
    let base = common::uniform(700, d, 3);
    let queries = common::uniform(9, d, 4);
    let mut bulk = IndexIVFPQFastScan::new(d, 8, 4, Metric::L2).unwrap();
    bulk.train(&base).unwrap();
    let mut single = bulk.clone();
    let ids: Vec<i64> = (0..700).map(|i| 1000 + 3 * i).collect();
    bulk.add_with_ids(&base, &ids).unwrap();
    for (row, id) in base.chunks(d).zip(&ids) {
        single.add_with_ids(row, &[*id]).unwrap();
    }
    bulk.nprobe = 3;
    single.nprobe = 3;
    let (a, b) = (
        bulk.search(&queries, 20).unwrap(),
        single.search(&queries, 20).unwrap(),
    );
    assert_eq!(a, b);
    assert!(a.ids.iter().all(|id| ids.contains(id)));
    // Auto ids continue after the largest id.
    bulk.add(&base[..d]).unwrap();
    assert_eq!(bulk.next_id(), 1000 + 3 * 699 + 2);
}

#[test]
fn removed_ids_never_come_back_and_compaction_changes_nothing_else() {
    let d = 16;
    let base = common::uniform(2000, d, 5);
    let queries = common::uniform(20, d, 6);
    let mut idx = IndexIVFPQFastScan::new(d, 8, 8, Metric::InnerProduct).unwrap();
    idx.keep_originals(RerankStorage::F16).unwrap();
    idx.train(&base).unwrap();
    idx.add(&base).unwrap();
    idx.nprobe = 8;
    let before = idx.search(&queries, 50).unwrap();
    // Remove the first hit of every query (a few per list: tombstones, no compaction yet).
    let gone: Vec<i64> = (0..20).map(|q| before.ids_of(q)[0]).collect();
    let unique: HashSet<i64> = gone.iter().copied().collect();
    assert_eq!(idx.remove_ids(&gone), unique.len());
    assert_eq!(idx.remove_ids(&gone), 0, "a second removal finds nothing");
    assert_eq!(idx.ntotal(), 2000 - unique.len());
    let after = idx.search(&queries, 50).unwrap();
    assert!(after.ids.iter().all(|id| !unique.contains(id)));
    for q in 0..20 {
        // The survivors keep their order: the list without the removed ids is a prefix.
        let kept: Vec<i64> = before
            .ids_of(q)
            .iter()
            .copied()
            .filter(|id| !unique.contains(id))
            .collect();
        assert_eq!(&after.ids_of(q)[..kept.len()], &kept[..]);
    }
    idx.compact().unwrap();
    assert!(idx
        .lists()
        .iter()
        .all(|l| l.ids().iter().all(|&id| id >= 0)));
    assert_eq!(idx.search(&queries, 50).unwrap(), after);
}

/// Vectors whose energy sits in the first half of the dimensions (phase 0) or the second
/// half (phase 1): codebooks trained on phase 0 know nothing of phase 1.
fn phased(n: usize, d: usize, phase: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * d)
        .map(|i| {
            let col = i % d;
            let loud = (col < d / 2) == (phase == 0);
            let s = if loud { 1.0 } else { 0.05 };
            rng.random_range(-1.0f32..1.0) * s
        })
        .collect()
}

#[test]
fn refresh_restores_recall_on_drifted_data_and_keeps_every_id() {
    let d = 32;
    let old = phased(3000, d, 0, 7);
    let new = phased(3000, d, 1, 8);
    let queries = phased(50, d, 1, 9);
    let mut idx = IndexIVFPQFastScan::new(d, 16, 16, Metric::L2).unwrap();
    idx.keep_originals(RerankStorage::F32).unwrap();
    idx.train(&old).unwrap();
    idx.add(&old).unwrap();
    let d0 = idx.drift().ratio().unwrap();
    idx.add(&new).unwrap();
    idx.nprobe = 4;
    let drifted = idx.drift().ratio().unwrap();
    // Phase-1 vectors are coded by codebooks that saw phase 0 only: their error is many
    // times the training error (measured 7.5x); phase-0 vectors stay near 1.
    assert!(d0 < 1.3, "drift of same-distribution data {d0}");
    assert!(
        drifted > 2.0 * d0,
        "drift {drifted} after the distribution moved"
    );
    let all: Vec<f32> = old.iter().chain(&new).copied().collect();
    let truth = exact_ids(&all, &queries, d, 10, Metric::L2);
    let stale = recall(&idx, &queries, &truth, 10);
    let fresh = idx.refreshed().unwrap();
    let refreshed = recall(&fresh, &queries, &truth, 10);
    eprintln!("drift {d0:.2} -> {drifted:.2}, recall {stale:.3} -> {refreshed:.3}");
    // Measured: 0.270 before and 0.570 after; require a clear gain.
    assert!(refreshed > stale + 0.1, "recall {stale} -> {refreshed}");
    assert_eq!(fresh.ntotal(), 6000);
    assert_eq!(fresh.drift().added, 0);
    // Every id is still there, once: each vector finds itself with the originals.
    let mut ids: Vec<i64> = fresh
        .lists()
        .iter()
        .flat_map(|l| l.ids().to_vec())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..6000).collect::<Vec<i64>>());
}

#[test]
fn concurrent_adds_searches_removals_and_a_refresh_lose_nothing() {
    let d = 16;
    let per_writer = 1500;
    let train = common::uniform(2000, d, 11);
    let mut idx = IndexIVFPQFastScan::new(d, 16, 8, Metric::L2).unwrap();
    idx.keep_originals(RerankStorage::F32).unwrap();
    idx.train(&train).unwrap();
    idx.nprobe = 16;
    // Deep re-ranking so that a vector's exact self-match (distance 0) surely is among the
    // candidates of its own search.
    idx.rerank_factor = 64;
    idx.add_with_ids(&train, &(0..2000).collect::<Vec<i64>>())
        .unwrap();
    let shared = StreamingIndex::new(idx);
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let s = shared.clone();
        writers.push(std::thread::spawn(move || {
            let x = common::uniform(per_writer, d, 100 + w);
            let mut rng = StdRng::seed_from_u64(w);
            let mut i = 0;
            while i < per_writer {
                let b = rng.random_range(1..8).min(per_writer - i);
                let ids: Vec<i64> = (i..i + b)
                    .map(|j| 10_000 * (w as i64 + 1) + j as i64)
                    .collect();
                s.add_with_ids(&x[i * d..(i + b) * d], &ids).unwrap();
                i += b;
            }
            // Remove every 10th vector of this writer.
            let gone: Vec<i64> = (0..per_writer)
                .step_by(10)
                .map(|j| 10_000 * (w as i64 + 1) + j as i64)
                .collect();
            assert_eq!(s.remove_ids(&gone), gone.len());
            x
        }));
    }
    let mut readers = Vec::new();
    for r in 0..2u64 {
        let s = shared.clone();
        let stop = done.clone();
        readers.push(std::thread::spawn(move || {
            let q = common::uniform(4, d, 200 + r);
            let mut searches = 0;
            while !stop.load(Ordering::SeqCst) || searches < 50 {
                let res = s.search(&q, 10).unwrap();
                for &id in &res.ids {
                    let ok = (0..2000).contains(&id)
                        || (10_000..10_000 + per_writer as i64).contains(&id)
                        || (20_000..20_000 + per_writer as i64).contains(&id);
                    assert!(ok, "invalid id {id}");
                }
                searches += 1;
            }
            searches
        }));
    }
    let refresher = {
        let s = shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            s.refresh()
        })
    };
    let xs: Vec<Vec<f32>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    refresher.join().unwrap().unwrap();
    done.store(true, Ordering::SeqCst);
    for h in readers {
        assert!(h.join().unwrap() >= 50);
    }
    assert_eq!(shared.refreshes(), 1);
    let expect = 2000 + 2 * (per_writer - per_writer / 10);
    assert_eq!(shared.ntotal(), expect);
    // No vector lost: every live one is its own nearest neighbour (exact re-ranking, full
    // probe), every removed one is gone.
    for (w, x) in xs.iter().enumerate() {
        let res = shared.search(x, 1).unwrap();
        for j in 0..per_writer {
            let id = 10_000 * (w as i64 + 1) + j as i64;
            if j % 10 == 0 {
                assert_ne!(res.ids[j], id);
            } else {
                assert_eq!(res.ids[j], id, "writer {w} vector {j}");
            }
        }
    }
}

#[test]
fn the_policy_refreshes_in_the_background_when_drift_passes_the_threshold() {
    let d = 32;
    let mut idx = IndexIVFPQFastScan::new(d, 8, 16, Metric::L2).unwrap();
    idx.keep_originals(RerankStorage::F32).unwrap();
    idx.train(&phased(2000, d, 0, 1)).unwrap();
    let shared = StreamingIndex::new(idx);
    shared.set_policy(Some(RefreshPolicy {
        drift_threshold: 2.0,
        min_added: 500,
    }));
    shared.add_auto(&phased(400, d, 0, 2)).unwrap();
    assert!(
        !shared.is_refreshing() && shared.refreshes() == 0,
        "no drift yet"
    );
    shared.add_auto(&phased(1000, d, 1, 3)).unwrap();
    let start = std::time::Instant::now();
    while shared.refreshes() == 0 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(shared.refreshes(), 1, "{:?}", shared.last_refresh_error());
    assert_eq!(shared.ntotal(), 1400);
    assert!(
        shared.drift().ratio().is_none(),
        "counters restart after a refresh"
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let d = 8;
    let mut idx = IndexIVFPQFastScan::new(d, 4, 4, Metric::L2).unwrap();
    assert!(matches!(idx.add(&[0.0; 8]), Err(Error::NotTrained)));
    assert!(matches!(idx.search(&[0.0; 8], 1), Err(Error::NotTrained)));
    assert!(matches!(
        idx.train(&[0.0; 16]),
        Err(Error::TooFewTrainingPoints { .. })
    ));
    let base = common::uniform(100, d, 1);
    idx.train(&base).unwrap();
    assert!(matches!(idx.search(&[0.0; 8], 1), Err(Error::EmptyIndex)));
    idx.add(&base).unwrap();
    assert!(matches!(
        idx.search(&[0.0; 8], 101),
        Err(Error::InvalidK { .. })
    ));
    assert!(matches!(
        idx.search(&[0.0; 7], 1),
        Err(Error::DimensionMismatch { .. })
    ));
    assert!(matches!(
        idx.search(&[f32::NAN; 8], 1),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        idx.add_with_ids(&[0.0; 8], &[-3]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        idx.add_with_ids(&[0.0; 8], &[1, 2]),
        Err(Error::DimensionMismatch { .. })
    ));
    assert!(matches!(
        idx.keep_originals(RerankStorage::F32),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(idx.refreshed(), Err(Error::InvalidArgument(_))));
    // Automatic ids never overflow (found by the open_index fuzz target).
    idx.add_with_ids(&[0.0; 8], &[i64::MAX]).unwrap();
    assert!(matches!(idx.add(&[0.0; 8]), Err(Error::InvalidArgument(_))));
    idx.rerank_factor = 4;
    assert!(matches!(
        idx.search(&[0.0; 8], 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(IndexIVFPQFastScan::new(d, 0, 4, Metric::L2).is_err());
    assert!(IndexIVFPQFastScan::new(d, 4, 3, Metric::L2).is_err());
    // A probe that sees fewer than k vectors fills the rest with -1 and the worst distance.
    let mut sparse = IndexIVFPQFastScan::new(d, 4, 4, Metric::L2).unwrap();
    sparse.train(&base).unwrap();
    sparse.add(&base[..3 * d]).unwrap();
    sparse.nprobe = 4;
    let mut all = sparse.search(&base[..d], 3).unwrap().ids;
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2]);
    sparse.nprobe = 1;
    let r = sparse.search(&base[..d], 3).unwrap();
    let found = r.ids.iter().take_while(|&&id| id >= 0).count();
    assert!(found >= 1, "the query's own list holds it");
    assert!(r.ids[found..].iter().all(|&id| id == -1));
    assert!(r.distances[found..].iter().all(|&v| v == f32::INFINITY));
}

/// The drift experiment on real keys (reported in the issue note): codebooks trained on the
/// first half of a Gemma sequence, the second half appended one key at a time (as decoding
/// does), recall@k of the true top-k for queries from the second half, before and after a
/// refresh, for every layer of the file.
#[test]
fn drift_experiment_on_gemma_keys() {
    let dir = common::dumps().join("prideprejudice-8192");
    for layer in 0..3 {
        let keys = load_vectors(&dir.join("k.npy"), layer, 0).unwrap();
        let q = load_vectors(&dir.join("q.npy"), layer, 0).unwrap();
        let (n, d) = (keys.rows, keys.dim);
        let half = n / 2;
        let mut idx = IndexIVFPQFastScan::new(d, 32, 64, Metric::InnerProduct).unwrap();
        idx.keep_originals(RerankStorage::F16).unwrap();
        idx.train(&keys.data[..half * d]).unwrap();
        idx.add(&keys.data[..half * d]).unwrap();
        for row in keys.data[half * d..].chunks(d) {
            idx.add(row).unwrap();
        }
        idx.nprobe = 8;
        let queries: Vec<f32> = q.data[half * d..]
            .chunks(d)
            .step_by(16)
            .flatten()
            .copied()
            .collect();
        let k = 64;
        let truth = exact_ids(&keys.data, &queries, d, k, Metric::InnerProduct);
        let drift = idx.drift().ratio().unwrap();
        let stale = recall(&idx, &queries, &truth, k);
        let fresh = idx.refreshed().unwrap();
        let refreshed = recall(&fresh, &queries, &truth, k);
        eprintln!(
            "layer {layer}: drift {drift:.3}, recall@{k} nprobe 8: stale {stale:.3}, refreshed {refreshed:.3}"
        );
        // A refresh re-trains on a sample that includes the new keys: it must not lose
        // recall beyond k-means noise (0.03).
        assert!(
            refreshed >= stale - 0.03,
            "layer {layer}: {stale} -> {refreshed}"
        );
    }
}

#[test]
fn every_add_api_is_kept_across_back_to_back_refreshes() {
    // Three writers, one per add API (`add_with_ids`, `add_auto`, the generic `add`), a
    // remover, two searchers, and refreshes back to back until the writers are done. At the
    // end every acknowledged vector is live exactly once, no removed id is back and ids are
    // unique. (The generic `add` was not logged: its vectors vanished at each swap.)
    let d = 16;
    let per_writer = 1200;
    let train = common::uniform(2000, d, 21);
    let mut idx = IndexIVFPQFastScan::new(d, 16, 8, Metric::L2).unwrap();
    idx.keep_originals(RerankStorage::F32).unwrap();
    idx.train(&train).unwrap();
    // The initial ids sit above the explicit writer's, so the automatic ids (which continue
    // from the largest so far) never meet the explicit ones.
    let base = 1_000_000i64;
    idx.add_with_ids(&train, &(base..base + 2000).collect::<Vec<i64>>())
        .unwrap();
    let shared = StreamingIndex::new(idx);
    let writing = Arc::new(AtomicBool::new(true));
    let pause = std::time::Duration::from_micros(300);
    let batches = move |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        let mut i = 0;
        while i < per_writer {
            let b = rng.random_range(1..8).min(per_writer - i);
            out.push(i..i + b);
            i += b;
        }
        out
    };
    let explicit = {
        let s = shared.clone();
        std::thread::spawn(move || {
            let x = common::uniform(per_writer, d, 31);
            for r in batches(1) {
                let ids: Vec<i64> = r.clone().map(|j| j as i64).collect();
                s.add_with_ids(&x[r.start * d..r.end * d], &ids).unwrap();
                std::thread::sleep(pause);
            }
        })
    };
    let auto = {
        let s = shared.clone();
        std::thread::spawn(move || {
            let x = common::uniform(per_writer, d, 32);
            let mut ids = Vec::new();
            for r in batches(2) {
                ids.extend(s.add_auto(&x[r.start * d..r.end * d]).unwrap());
                std::thread::sleep(pause);
            }
            ids
        })
    };
    let generic = {
        let s = shared.clone();
        std::thread::spawn(move || {
            let x = common::uniform(per_writer, d, 33);
            for r in batches(3) {
                s.add(&x[r.start * d..r.end * d]).unwrap();
                std::thread::sleep(pause);
            }
        })
    };
    // Removes every 10th of the explicit writer's ids once it is there (and some initial).
    let remover = {
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut removed = vec![base, base + 7];
            assert_eq!(s.remove_ids(&removed), 2);
            let mut next = 0;
            while next < per_writer as i64 {
                let present = s.with(|g| g.lists().iter().any(|l| l.ids().contains(&next)));
                if present {
                    assert_eq!(s.remove_ids(&[next]), 1);
                    removed.push(next);
                    next += 10;
                } else {
                    std::thread::sleep(pause);
                }
            }
            removed
        })
    };
    let searchers: Vec<_> = (0..2u64)
        .map(|r| {
            let s = shared.clone();
            let w = writing.clone();
            std::thread::spawn(move || {
                let q = common::uniform(4, d, 40 + r);
                let mut n = 0;
                while w.load(Ordering::SeqCst) {
                    let res = s.search(&q, 10).unwrap();
                    assert!(res.ids.iter().all(|&id| id >= 0), "{:?}", res.ids);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let refresher = {
        let s = shared.clone();
        let w = writing.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while w.load(Ordering::SeqCst) {
                s.refresh().unwrap();
                n += 1;
            }
            n
        })
    };
    explicit.join().unwrap();
    let auto_ids = auto.join().unwrap();
    generic.join().unwrap();
    let removed = remover.join().unwrap();
    writing.store(false, Ordering::SeqCst);
    let refreshes = refresher.join().unwrap();
    for h in searchers {
        h.join().unwrap();
    }
    eprintln!(
        "stress: {} vectors added through add / add_auto / add_with_ids, {} removed, {refreshes} \
         refreshes during the adds",
        3 * per_writer,
        removed.len()
    );
    assert!(refreshes >= 2, "{refreshes} refreshes ran during the adds");
    let mut live: Vec<i64> = shared.with(|g| {
        g.lists()
            .iter()
            .flat_map(|l| l.ids().iter().copied().filter(|&id| id >= 0))
            .collect()
    });
    live.sort_unstable();
    let unique: HashSet<i64> = live.iter().copied().collect();
    assert_eq!(unique.len(), live.len(), "duplicate ids");
    assert_eq!(
        live.len(),
        2000 + 3 * per_writer - removed.len(),
        "lost or extra vectors"
    );
    assert_eq!(shared.ntotal(), live.len());
    for id in (0..per_writer as i64)
        .chain(auto_ids)
        .chain(base..base + 2000)
    {
        assert_eq!(
            unique.contains(&id),
            !removed.contains(&id),
            "id {id}: removed {}",
            removed.contains(&id)
        );
    }
}
