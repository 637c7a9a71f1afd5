//! Bad input gives a typed error, never a panic.
mod common;

use pqcache::{Error, Index, IndexFlat, IndexPQ, KMeansConfig, Metric, Nbits, ProductQuantizer};

#[test]
fn dimension_mismatch() {
    let mut idx = IndexFlat::new(4, Metric::L2).unwrap();
    assert!(matches!(
        idx.add(&[1.0; 6]),
        Err(Error::PartialRow {
            what: "vectors",
            row_len: 4,
            len: 6
        })
    ));
    assert_eq!(
        idx.add(&[1.0; 6]).unwrap_err().to_string(),
        "vectors: 6 values are not a whole number of rows of 4"
    );
    idx.add(&[1.0; 8]).unwrap();
    assert!(matches!(
        idx.search(&[1.0; 3], 1),
        Err(Error::DimensionMismatch {
            expected: 4,
            got: 3
        })
    ));
    let mut pq = IndexPQ::new(8, 2, Nbits::Four, Metric::L2).unwrap();
    assert!(matches!(
        pq.train(&[0.5; 12]),
        Err(Error::PartialRow { len: 12, .. })
    ));
}

#[test]
fn m_must_divide_d_and_nbits_must_be_4_or_8() {
    assert!(matches!(
        ProductQuantizer::new(10, 3, Nbits::Eight),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ProductQuantizer::new(10, 0, Nbits::Eight),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Nbits::from_bits(5),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        IndexFlat::new(0, Metric::L2),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn no_index_is_built_that_its_file_could_not_hold() {
    // The file reader refuses d past limits::MAX_DIM and nlist past MAX_NLIST: every
    // constructor refuses them too. An IndexFlat of d 2^20 + 1 used to be built and saved,
    // and its file then refused on open.
    let d = pqcache::limits::MAX_DIM;
    assert!(IndexFlat::new(d, Metric::L2).is_ok());
    for make in [
        &(|d| IndexFlat::new(d, Metric::L2).map(drop)) as &dyn Fn(usize) -> pqcache::Result<()>,
        &|d| IndexFlat::new_f16(d, Metric::InnerProduct).map(drop),
        &|d| IndexPQ::new(d, 1, Nbits::Eight, Metric::L2).map(drop),
        &|d| pqcache::IndexPQFastScan::new(d, 1, Metric::L2).map(drop),
        &|d| pqcache::IndexIVFPQFastScan::new(d, 4, 1, Metric::L2).map(drop),
    ] {
        for bad in [d + 1, usize::MAX] {
            let err = make(bad).unwrap_err().to_string();
            assert!(err.contains("out of range (1 to 1048576)"), "{bad}: {err}");
        }
    }
    let err = pqcache::IndexIVFPQFastScan::new(8, pqcache::limits::MAX_NLIST + 1, 2, Metric::L2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nlist 16777217 is too large"), "{err}");
}

#[test]
fn non_finite_values_are_rejected_with_their_position() {
    let mut idx = IndexFlat::new(2, Metric::InnerProduct).unwrap();
    let e = idx.add(&[1.0, 2.0, f32::NAN, 0.0]).unwrap_err();
    assert!(matches!(e, Error::NonFinite { row: 1, col: 0, .. }), "{e}");
    assert_eq!(idx.ntotal(), 0, "a failed add must add nothing");
    idx.add(&[1.0, 2.0]).unwrap();
    assert!(matches!(
        idx.search(&[f32::INFINITY, 0.0], 1),
        Err(Error::NonFinite { .. })
    ));
    let mut pq = ProductQuantizer::new(2, 1, Nbits::Four).unwrap();
    let mut x = common::uniform(64, 2, 1);
    x[77] = f32::NEG_INFINITY;
    assert!(matches!(
        pq.train(&x, &KMeansConfig::default()),
        Err(Error::NonFinite {
            row: 38,
            col: 1,
            ..
        })
    ));
}

#[test]
fn empty_and_small_training_sets() {
    let mut pq = IndexPQ::new(4, 2, Nbits::Eight, Metric::L2).unwrap();
    assert!(matches!(
        pq.train(&[]),
        Err(Error::TooFewTrainingPoints { got: 0, need: 256 })
    ));
    assert!(matches!(
        pq.train(&common::uniform(100, 4, 2)),
        Err(Error::TooFewTrainingPoints {
            got: 100,
            need: 256
        })
    ));
    assert!(matches!(pq.add(&[0.0; 4]), Err(Error::NotTrained)));
    assert!(matches!(pq.search(&[0.0; 4], 1), Err(Error::NotTrained)));
}

#[test]
fn k_zero_or_above_ntotal_and_empty_index() {
    let mut idx = IndexFlat::new(2, Metric::L2).unwrap();
    assert!(matches!(idx.search(&[0.0, 0.0], 1), Err(Error::EmptyIndex)));
    idx.add(&[1.0, 1.0, 2.0, 2.0]).unwrap();
    assert!(matches!(
        idx.search(&[0.0, 0.0], 0),
        Err(Error::InvalidK { k: 0, ntotal: 2 })
    ));
    assert!(matches!(
        idx.search(&[0.0, 0.0], 3),
        Err(Error::InvalidK { k: 3, ntotal: 2 })
    ));
    let mut pq = IndexPQ::new(2, 1, Nbits::Four, Metric::L2).unwrap();
    pq.train(&common::uniform(64, 2, 3)).unwrap();
    assert!(matches!(pq.search(&[0.0, 0.0], 1), Err(Error::EmptyIndex)));
    pq.add(&[0.5, 0.5]).unwrap();
    assert!(matches!(
        pq.search(&[0.0, 0.0], 2),
        Err(Error::InvalidK { k: 2, ntotal: 1 })
    ));
}

#[test]
fn unreadable_and_malformed_files() {
    let dir = common::TempDir::new("errors");
    let missing = dir.join("missing.fvecs");
    assert!(matches!(
        pqcache::io::load_vectors(&missing, 0, 0),
        Err(Error::Io { .. })
    ));
    let bad = dir.join("bad.fvecs");
    std::fs::write(&bad, [4, 0, 0, 0, 1, 2, 3]).unwrap();
    assert!(matches!(
        pqcache::io::load_vectors(&bad, 0, 0),
        Err(Error::Format { .. })
    ));
    let npy = dir.join("bad.npy");
    std::fs::write(&npy, b"\x93NUMPY\x01\x00garbage").unwrap();
    assert!(matches!(
        pqcache::io::load_vectors(&npy, 0, 0),
        Err(Error::Format { .. })
    ));
    let txt = dir.join("vectors.csv");
    std::fs::write(&txt, "1,2,3").unwrap();
    let e = pqcache::io::load_vectors(&txt, 0, 0).unwrap_err();
    assert!(e.to_string().contains("unknown extension"), "{e}");
}

#[test]
fn huge_factors_pages_and_thread_counts_are_capped_or_refused() {
    use pqcache::index::ivf::IndexIVFPQFastScan;
    use pqcache::{IndexPQFastScan, RerankStorage};
    let d = 16;
    let x = common::uniform(600, d, 5);
    // A re-ranking factor of 2^62 asks for k * 2^62 candidates: the pool saturates and is
    // capped at ntotal, the search answers k real ids (it panicked on capacity overflow, or
    // aborted on a 240 TB allocation, or returned -1 everywhere).
    let mut fs = IndexPQFastScan::new(d, 8, Metric::L2).unwrap();
    fs.keep_originals(RerankStorage::F32).unwrap();
    fs.train(&x).unwrap();
    fs.add(&x).unwrap();
    let mut ivf = IndexIVFPQFastScan::new(d, 8, 8, Metric::L2).unwrap();
    ivf.keep_originals(RerankStorage::F32).unwrap();
    ivf.train(&x).unwrap();
    ivf.add(&x).unwrap();
    ivf.nprobe = 8;
    for factor in [1usize << 62, usize::MAX] {
        fs.rerank_factor = factor;
        ivf.rerank_factor = factor;
        for res in [
            fs.search(&x[..d], 5).unwrap(),
            ivf.search(&x[..d], 5).unwrap(),
        ] {
            assert_eq!(res.ids.len(), 5);
            assert!(
                res.ids.iter().all(|&id| (0..600).contains(&id)),
                "{:?}",
                res.ids
            );
            // Exact re-ranking over every vector: the query's own row is first.
            assert_eq!(res.ids[0], 0);
        }
    }
    // What the reader refuses, the writer refuses first (`build` wrote files `open` called
    // corrupt): the error names the setting, and no file is left behind.
    let dir = common::TempDir::new("limits");
    let path = dir.join("fs.pqx");
    let err = pqcache::io::file::save(&fs, &path).unwrap_err();
    assert!(err.to_string().contains("rerank_factor"), "{err}");
    assert!(!path.exists());
    ivf.rerank_factor = 4;
    ivf.nprobe = pqcache::limits::MAX_NLIST + 1;
    let err = pqcache::io::file::save(&ivf, &path).unwrap_err();
    assert!(err.to_string().contains("nprobe"), "{err}");
    ivf.nprobe = 8;
    pqcache::io::file::save(&ivf, &path).unwrap();
    assert!(pqcache::io::file::open(&path).is_ok());
    // The attention selectors: a re-rank factor or a Quest page past the limits is refused
    // (quest:10^12 never returned: its page loop walked every position of a page).
    use pqcache::{AttentionRetriever, AttentionShape, RetrieverConfig};
    let shape = AttentionShape {
        layers: 1,
        query_heads: 2,
        kv_heads: 1,
        head_dim: d,
    };
    assert!("quest:1000000000000"
        .parse::<pqcache::SelectorSpec>()
        .is_err());
    let huge_rerank = RetrieverConfig {
        selector: "fastscan:4x4:rerank1000000000000".parse().unwrap(),
        ..RetrieverConfig::new(shape)
    };
    assert!(matches!(
        AttentionRetriever::new(huge_rerank),
        Err(Error::InvalidArgument(_))
    ));
    // The largest page allowed, over a small cache, answers at once with its budget.
    let mut r = AttentionRetriever::new(RetrieverConfig {
        selector: format!("quest:{}", pqcache::limits::MAX_QUEST_PAGE)
            .parse()
            .unwrap(),
        budget: pqcache::Budget::Tokens(100),
        ..RetrieverConfig::new(shape)
    })
    .unwrap();
    let kv: Vec<pqcache::f16> = x[..600 * d]
        .iter()
        .map(|&v| pqcache::f16::from_f32(v))
        .collect();
    r.prefill(0, &kv, &kv, &[]).unwrap();
    let sel = r.select(0, &x[..2 * d]).unwrap();
    assert_eq!(sel[0].len(), 100);
    // A million threads: refused with the limit, not minutes of thread creation.
    let err = pqcache::cli::with_threads(1_000_000, || ()).unwrap_err();
    assert!(err.to_string().contains("1024"), "{err}");
    assert!(ivf.set_threads(1_000_000).is_err());
}

#[test]
fn finite_values_that_overflow_a_distance_or_f16_storage_are_refused() {
    // A row of 1e38 is finite, but its squared distance to anything is infinite (or NaN), and
    // it ranked first for every L2 query with distance 0; in f16 storage anything above 65504
    // became infinity. Both are refused at add (and as queries), with the row named.
    let d = 8;
    let mut x = common::uniform(100, d, 3);
    let mut flat = IndexFlat::new(d, Metric::L2).unwrap();
    flat.add(&x).unwrap();
    let huge = vec![1e38f32; d];
    let err = flat.add(&huge).unwrap_err();
    assert!(err.to_string().contains("squared norm"), "{err}");
    assert!(matches!(
        flat.search(&huge, 1),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(flat.ntotal(), 100, "nothing added by the failed call");
    // 1e5 fits f32 distances but not f16 storage.
    x[3 * d + 2] = 1e5;
    let mut f16_flat = IndexFlat::new_f16(d, Metric::L2).unwrap();
    let err = f16_flat.add(&x).unwrap_err();
    assert!(err.to_string().contains("row 3 column 2"), "{err}");
    assert_eq!(f16_flat.ntotal(), 0);
    let mut ivf = pqcache::index::ivf::IndexIVFPQFastScan::new(d, 4, 4, Metric::L2).unwrap();
    ivf.keep_originals(pqcache::RerankStorage::F16).unwrap();
    ivf.train(&common::uniform(400, d, 4)).unwrap();
    assert!(ivf.add(&x).is_err());
    assert_eq!(ivf.ntotal(), 0);
    let mut fs = pqcache::IndexPQFastScan::new(d, 4, Metric::L2).unwrap();
    fs.keep_originals(pqcache::RerankStorage::F16).unwrap();
    fs.train(&common::uniform(400, d, 4)).unwrap();
    assert!(fs.add(&x).is_err());
    assert_eq!(fs.ntotal(), 0);
    // The same rows are fine where they fit: f32 storage takes 1e5.
    flat.add(&x).unwrap();
    let res = flat.search(&x[..d], 1).unwrap();
    assert_eq!(res.ids[0], 0);
}
