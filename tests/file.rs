//! Index files: round trips for every kind, growth after open, truncation and bit flips,
//! golden files of every format version.
mod common;

use pqcache::index::ivf::IndexIVFPQFastScan;
use pqcache::io::file::{self, AnyIndex, HEADER_LEN};
use pqcache::{Error, Index, IndexFlat, IndexPQ, IndexPQFastScan, Metric, Nbits, RerankStorage};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pqcache-file-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// One small index of every kind (and variant), all over the same data.
fn every_kind(d: usize, n: usize) -> Vec<(&'static str, AnyIndex)> {
    let base = common::uniform(n, d, 1);
    // Training data apart from the (small) base: 8-bit codebooks need 256 points.
    let train = common::uniform(300, d, 7);
    let mut out: Vec<(&'static str, AnyIndex)> = Vec::new();
    for (name, metric) in [("flat-ip", Metric::InnerProduct), ("flat-l2", Metric::L2)] {
        let mut f = IndexFlat::new(d, metric).unwrap();
        f.add(&base).unwrap();
        out.push((name, AnyIndex::Flat(f)));
    }
    let mut f16 = IndexFlat::new_f16(d, Metric::L2).unwrap();
    f16.add(&base).unwrap();
    out.push(("flat16-l2", AnyIndex::Flat(f16)));
    for (name, nbits) in [
        ("pq8", Nbits::Eight),
        ("pq6", Nbits::Six),
        ("pq4", Nbits::Four),
    ] {
        let mut p = IndexPQ::new(d, 4, nbits, Metric::L2).unwrap();
        p.train(&train).unwrap();
        p.add(&base).unwrap();
        out.push((name, AnyIndex::Pq(p)));
    }
    let mut fs = IndexPQFastScan::new(d, 4, Metric::InnerProduct).unwrap();
    fs.train(&train).unwrap();
    fs.add(&base).unwrap();
    out.push(("pqfs", AnyIndex::PqFastScan(fs)));
    let mut fsr = IndexPQFastScan::new(d, 1, Metric::L2).unwrap();
    fsr.keep_originals(RerankStorage::F16).unwrap();
    fsr.rerank_factor = 4;
    fsr.train(&train).unwrap();
    fsr.add(&base).unwrap();
    out.push(("pqfs-rerank", AnyIndex::PqFastScan(fsr)));
    let mut ivf = IndexIVFPQFastScan::new(d, 4, 4, Metric::L2).unwrap();
    ivf.keep_originals(RerankStorage::F32).unwrap();
    ivf.train(&train).unwrap();
    ivf.add(&base).unwrap();
    ivf.remove_ids(&[3, 5]);
    ivf.nprobe = 2;
    ivf.rerank_factor = 2;
    out.push(("ivf-l2", AnyIndex::IvfPqFastScan(ivf)));
    let mut ivf_ip = IndexIVFPQFastScan::new(d, 3, 2, Metric::InnerProduct).unwrap();
    ivf_ip.train(&train).unwrap();
    ivf_ip.add(&base).unwrap();
    ivf_ip.nprobe = 3;
    out.push(("ivf-ip", AnyIndex::IvfPqFastScan(ivf_ip)));
    out
}

fn same_results(a: &AnyIndex, b: &AnyIndex, queries: &[f32], what: &str) {
    assert_eq!(a.kind(), b.kind(), "{what}");
    assert_eq!(a.ntotal(), b.ntotal(), "{what}");
    for k in [1, 7] {
        assert_eq!(
            a.search(queries, k).unwrap(),
            b.search(queries, k).unwrap(),
            "{what} k {k}"
        );
    }
}

#[test]
fn save_open_load_round_trip_for_every_kind() {
    let d = 8;
    let queries = common::uniform(5, d, 9);
    for (name, idx) in every_kind(d, 100) {
        let path = tmp(&format!("{name}.pqc"));
        file::save(&idx, &path).unwrap();
        let opened = file::open(&path).unwrap();
        let loaded = file::load(&path).unwrap();
        same_results(&idx, &opened, &queries, name);
        same_results(&idx, &loaded, &queries, name);
        assert_eq!(opened.describe(), idx.describe(), "{name}");
        file::verify(&path).unwrap();
        // Saving what was opened (still mapped) gives the same bytes.
        let again = tmp(&format!("{name}.again.pqc"));
        file::save(&opened, &again).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn an_opened_index_grows_copy_on_write_and_saves_over_itself() {
    let d = 8;
    let base = common::uniform(300, d, 2);
    let more = common::uniform(50, d, 3);
    let queries = common::uniform(6, d, 4);
    for (name, idx) in every_kind(d, 250) {
        let path = tmp(&format!("grow-{name}.pqc"));
        file::save(&idx, &path).unwrap();
        let mut opened = file::open(&path).unwrap();
        let mut owned = idx.clone();
        opened.add(&more).unwrap();
        owned.add(&more).unwrap();
        same_results(&opened, &owned, &queries, name);
        // Over the very file it was mapped from: the mapping keeps the old bytes alive.
        file::save(&opened, &path).unwrap();
        same_results(&file::open(&path).unwrap(), &owned, &queries, name);
        let _ = &base;
    }
}

#[test]
fn every_truncation_is_an_error() {
    for (name, idx) in every_kind(8, 40) {
        let path = tmp(&format!("trunc-{name}.pqc"));
        file::save(&idx, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for len in 0..bytes.len() {
            assert!(
                file::load_bytes(&bytes[..len]).is_err(),
                "{name}: a prefix of {len} of {} bytes was accepted",
                bytes.len()
            );
        }
        // Through the mapping as well, for a few lengths.
        for len in [0, 1, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..len]).unwrap();
            assert!(
                file::open(&path).is_err(),
                "{name}: open accepted {len} bytes"
            );
        }
    }
}

#[test]
fn every_bit_flip_is_caught_by_open_or_by_verify() {
    for (name, idx) in every_kind(8, 40) {
        let path = tmp(&format!("flip-{name}.pqc"));
        file::save(&idx, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let info = file::parse_layout(&bytes).unwrap();
        let table_end = HEADER_LEN + 32 * info.sections.len();
        let footer = bytes.len() - 16;
        let mut flipped = bytes.clone();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                flipped[byte] ^= 1 << bit;
                let structural = byte < table_end || byte >= footer;
                let loaded = file::load_bytes(&flipped);
                if structural {
                    assert!(
                        loaded.is_err(),
                        "{name}: flip at byte {byte} bit {bit} opened"
                    );
                }
                // Anywhere else the data may still parse (a code is a code), but the full
                // check finds it, and whatever parsed searches without panicking.
                assert!(
                    file::verify_bytes(&flipped).is_err(),
                    "{name}: verify missed byte {byte} bit {bit}"
                );
                if let Ok(i) = loaded {
                    let _ = i.search(&[0.5; 8], 1);
                }
                flipped[byte] ^= 1 << bit;
            }
        }
    }
}

#[test]
fn bad_files_give_typed_errors() {
    let missing = tmp("does-not-exist.pqc");
    assert!(matches!(file::open(&missing), Err(Error::Io { .. })));
    let not_index = tmp("not-an-index.pqc");
    std::fs::write(&not_index, vec![7u8; 4096]).unwrap();
    assert!(matches!(file::open(&not_index), Err(Error::Corrupt { .. })));
    // A future version is Incompatible, not Corrupt: rewrite the version and fix the CRCs.
    let (_, idx) = every_kind(8, 40).remove(0);
    let path = tmp("future.pqc");
    file::save(&idx, &path).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    let n = b.len();
    b[n - 8..n - 4].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        file::load_bytes(&b),
        Err(Error::Incompatible { found: 99, .. })
    ));
    // Saving into a folder that does not exist fails and leaves nothing behind.
    let nowhere = tmp("no-such-dir").join("x.pqc");
    assert!(matches!(file::save(&idx, &nowhere), Err(Error::Io { .. })));
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The golden indexes: tiny, deterministic (flat and pre-set centroids need no training).
fn golden_indexes() -> Vec<(&'static str, AnyIndex)> {
    every_kind(8, 40)
}

fn golden_queries() -> Vec<f32> {
    (0..3 * 8)
        .map(|i| ((i * 5) % 7) as f32 / 7.0 - 0.4)
        .collect()
}

/// Writes the golden files of the current version (run with PQCACHE_WRITE_GOLDEN=1 when a
/// new format version is introduced; old versions' files stay as they are).
fn write_golden(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, idx) in golden_indexes() {
        file::save(&idx, dir.join(format!("{name}.pqc"))).unwrap();
        let res = idx.search(&golden_queries(), 3).unwrap();
        let dists: Vec<String> = res.distances.iter().map(|v| v.to_string()).collect();
        let text = format!("{:?}\n{}\n", res.ids, dists.join(" "));
        std::fs::write(dir.join(format!("{name}.expect")), text).unwrap();
    }
}

#[test]
fn golden_files_of_every_version_open_and_answer_as_recorded() {
    let v1 = golden_dir().join("v1");
    if std::env::var_os("PQCACHE_WRITE_GOLDEN").is_some() {
        write_golden(&v1);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    versions.sort();
    assert!(!versions.is_empty());
    let mut checked = 0;
    for dir in versions {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "pqc") {
                continue;
            }
            let idx = file::open(&path).unwrap();
            file::verify(&path).unwrap();
            let res = idx.search(&golden_queries(), 3).unwrap();
            let want = std::fs::read_to_string(path.with_extension("expect")).unwrap();
            let mut lines = want.lines();
            assert_eq!(
                Some(format!("{:?}", res.ids).as_str()),
                lines.next(),
                "{}",
                path.display()
            );
            // Distances within float rounding: the SIMD level may differ from the writer's.
            let dists: Vec<f32> = lines
                .next()
                .unwrap()
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect();
            for (a, b) in res.distances.iter().zip(&dists) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{}: {a} vs {b}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} golden files");
}
