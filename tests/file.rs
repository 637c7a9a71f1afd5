//! Index files: round trips for every kind, growth after open, truncation and bit flips,
//! golden files of every format version.
mod common;

use pqcache::index::ivf::IndexIVFPQFastScan;
use pqcache::io::file::{self, AnyIndex, HEADER_LEN};
use pqcache::AttentionShape;
use pqcache::{Error, Index, IndexFlat, IndexPQ, IndexPQFastScan, Metric, Nbits, RerankStorage};
use std::path::{Path, PathBuf};

/// A path named `name` in a folder of its own, removed when the result is dropped.
fn tmp(name: &str) -> common::TempPath {
    common::TempPath::new("file-tests", name)
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
fn the_longest_legal_names_save_and_a_failed_save_names_its_files_and_leaves_nothing() {
    let d = 8;
    let (_, idx) = every_kind(d, 50).swap_remove(0);
    let queries = common::uniform(3, d, 5);
    // 255 bytes, the most ext4/XFS take: the temporary name must fit as well. Multi-byte
    // characters too, so that the cut lands inside one of them.
    for name in ["n".repeat(251) + ".pqc", "é".repeat(125) + ".pqc"] {
        let dir = tmp(&format!("long-{}", name.chars().next().unwrap() as u32));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(&name);
        file::save(&idx, &path).unwrap();
        same_results(&idx, &file::open(&path).unwrap(), &queries, "long name");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "only the destination is left");
    }
    // The destination is a folder: the rename fails, the error names the destination and the
    // temporary file, and the temporary file is gone.
    let dir = tmp("rename-fails");
    let dest = dir.join("index.pqc");
    std::fs::create_dir_all(dest.join("inside")).unwrap();
    let e = file::save(&idx, &dest).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Io { ref path, .. } if path == &dest),
        "{msg}"
    );
    assert!(
        msg.contains("renaming") && msg.contains(".index.pqc.tmp."),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("index.pqc")],
        "no temporary file left"
    );
    // The temporary file cannot be created (its folder does not exist): the error names it.
    let missing = dir.join("no-such-folder").join("index.pqc");
    let e = file::save(&idx, &missing).unwrap_err();
    match &e {
        Error::Io { path, .. } => {
            assert_eq!(path.parent(), missing.parent(), "{e}");
            assert!(path.to_string_lossy().contains(".index.pqc.tmp."), "{e}");
        }
        other => panic!("{other}"),
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
    // A folder or a device is named for what it is (mapping a folder says "No such device";
    // reading /dev/zero would never end).
    let folder = tmp("a-folder.pqc");
    std::fs::create_dir_all(&folder).unwrap();
    let mut not_files = vec![folder.to_path_buf()];
    if cfg!(unix) {
        not_files.push("/dev/zero".into());
    }
    for p in &not_files {
        for r in [file::open(p), file::load(p)] {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Io { .. }), "{e}");
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        assert!(pqcache::io::npy::read(p).is_err());
    }
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
    let cache = golden_attention();
    file::save(&cache, dir.join("attention-fastscan.pqc")).unwrap();
    let sel = cache.select(0, &golden_attention_queries()).unwrap();
    std::fs::write(dir.join("attention-fastscan.expect"), format!("{sel:?}\n")).unwrap();
}

/// A tiny attention cache: 1 layer, 1 kv head, group 2, d 8, 40 positions, fast-scan 2x4
/// with a key transform fitted to 10 prompt queries.
fn golden_attention() -> pqcache::attention::AttentionRetriever {
    use pqcache::attention::{AttentionRetriever, Budget, RetrieverConfig};
    let mut cfg = RetrieverConfig::new(AttentionShape {
        layers: 1,
        query_heads: 2,
        kv_heads: 1,
        head_dim: 8,
    });
    cfg.selector = "fastscan:2x4".parse().unwrap();
    cfg.budget = Budget::Tokens(20);
    cfg.sink = 2;
    // Written since format 3 (v1 and v2 files read it as on).
    cfg.tail_term = false;
    let mut r = AttentionRetriever::new(cfg).unwrap();
    let kv: Vec<half::f16> = (0..40 * 8)
        .map(|i| half::f16::from_f32(((i * 7) % 13) as f32 / 13.0 - 0.5))
        .collect();
    let prompt_queries: Vec<f32> = (0..2 * 10 * 8)
        .map(|i| {
            half::f16::from_f32(((i * 5) % 11) as f32 * (1 + i % 8) as f32 / 20.0 - 0.7).to_f32()
        })
        .collect();
    r.prefill(0, &kv, &kv, &prompt_queries).unwrap();
    r
}

fn golden_attention_queries() -> Vec<f32> {
    (0..2 * 8)
        .map(|i| ((i * 3) % 5) as f32 / 5.0 - 0.3)
        .collect()
}

#[test]
fn golden_files_of_every_version_open_and_answer_as_recorded() {
    // The current format's folder (v1 files predate the attention `transform` section and
    // must still open: their fast-scan heads read the identity transform).
    let current = golden_dir().join("v5");
    if std::env::var_os("PQCACHE_WRITE_GOLDEN").is_some() {
        write_golden(&current);
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
            file::verify(&path).unwrap();
            if file::info(&path).unwrap().kind == file::IndexKind::Attention {
                let cache = file::open_attention(&path).unwrap();
                // From format 3 the tail-term switch is kept (the golden cache has it off);
                // older files read the default, on.
                let kept = !(dir.ends_with("v1") || dir.ends_with("v2"));
                assert_eq!(cache.config().tail_term, !kept, "{}", path.display());
                let sel = cache.select(0, &golden_attention_queries()).unwrap();
                let want = std::fs::read_to_string(path.with_extension("expect")).unwrap();
                assert_eq!(format!("{sel:?}\n"), want, "{}", path.display());
                checked += 1;
                continue;
            }
            let idx = file::open(&path).unwrap();
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
    assert!(checked >= 55, "only {checked} golden files (v1 to v5)");
}

mod attention_cache {
    use super::*;
    use half::f16;
    use pqcache::attention::{AttentionRetriever, Budget, RetrieverConfig};
    use std::borrow::Cow;

    fn halves(n: usize, seed: u64) -> Vec<f16> {
        common::uniform(n, 1, seed)
            .into_iter()
            .map(f16::from_f32)
            .collect()
    }

    /// A 2-layer, 2-kv-head cache (group 2, d 16): layer 1 prefilled with 300 positions (and
    /// 50 queries per query head) and 20 appended; layer 0 left empty.
    fn cache(spec: &str) -> AttentionRetriever {
        let (kvh, d) = (2, 16);
        let mut cfg = RetrieverConfig::new(AttentionShape {
            layers: 2,
            query_heads: kvh * 2,
            kv_heads: kvh,
            head_dim: d,
        });
        cfg.selector = spec.parse().unwrap();
        cfg.budget = Budget::Tokens(80);
        cfg.sink = 4;
        let mut r = AttentionRetriever::new(cfg).unwrap();
        let queries = common::uniform(2 * kvh * 50, d, 3);
        r.prefill(
            1,
            &halves(kvh * 300 * d, 1),
            &halves(kvh * 300 * d, 2),
            &queries,
        )
        .unwrap();
        for i in 0..20 {
            r.append(1, &halves(kvh * d, 10 + i), &halves(kvh * d, 50 + i))
                .unwrap();
        }
        r
    }

    fn same_steps(a: &AttentionRetriever, b: &AttentionRetriever, what: &str) {
        for s in 0..3 {
            let q = common::uniform(4, 16, 100 + s);
            assert_eq!(a.select(1, &q).unwrap(), b.select(1, &q).unwrap(), "{what}");
            assert_eq!(a.attend(1, &q).unwrap(), b.attend(1, &q).unwrap(), "{what}");
        }
    }

    #[test]
    fn every_selector_round_trips_and_keeps_decoding() {
        for spec in [
            "exact",
            "window",
            "random",
            "pq:4x6",
            "fastscan:8x4:rerank2",
            "quest:16",
        ] {
            let mut r = cache(spec);
            let path = tmp(&format!("attention-{}.pqc", spec.replace(':', "_")));
            file::save(&r, &path).unwrap();
            let info = file::verify(&path).unwrap();
            assert_eq!(info.kind, file::IndexKind::Attention);
            let mut opened = file::open_attention(&path).unwrap();
            let loaded = file::load_attention(&path).unwrap();
            assert_eq!(opened.len(1), 320);
            assert!(opened.is_empty(0));
            same_steps(&r, &opened, spec);
            same_steps(&r, &loaded, spec);
            // Decoding goes on from the mapped cache exactly as in memory: the appended rows
            // go to an owned tail, the mapped ones are never copied (so `kv`, the one reader
            // of every row as one slice, must copy once they are in two pieces).
            assert!(matches!(opened.kv(1, 0).unwrap().0, Cow::Borrowed(_)));
            for i in 0..5 {
                let (k, v) = (halves(32, 200 + i), halves(32, 300 + i));
                r.append(1, &k, &v).unwrap();
                opened.append(1, &k, &v).unwrap();
            }
            assert!(matches!(opened.kv(1, 0).unwrap().0, Cow::Owned(_)));
            assert_eq!(opened.kv(1, 1).unwrap(), r.kv(1, 1).unwrap());
            same_steps(&r, &opened, spec);
            // The file kept everything: the value sums (tail term), the queries' energy and
            // the refresh's clock (the bytes), and a fork trains the same indexes from it.
            assert_eq!(
                file::to_bytes(&opened).unwrap(),
                file::to_bytes(&r).unwrap(),
                "{spec}"
            );
            let other = RetrieverConfig {
                selector: "fastscan:4x4".parse().unwrap(),
                ..r.config().clone()
            };
            assert_eq!(
                file::to_bytes(&opened.fork(other.clone()).unwrap()).unwrap(),
                file::to_bytes(&r.fork(other).unwrap()).unwrap(),
                "{spec}: fork"
            );
            // The index readers refuse it with a clear error, and vice versa.
            assert!(matches!(file::open(&path), Err(Error::InvalidArgument(_))));
        }
        let flat = tmp("attention-not.pqc");
        file::save(&every_kind(8, 10).remove(0).1, &flat).unwrap();
        assert!(matches!(
            file::open_attention(&flat),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_retrievers_own_save_open_and_load_are_the_files_functions() {
        let r = cache("fastscan:8x4");
        let path = tmp("attention-methods.pqc");
        r.save(&path).unwrap();
        // The same bytes as the facade writes, and both readers give back the same cache.
        assert_eq!(std::fs::read(&path).unwrap(), file::to_bytes(&r).unwrap());
        same_steps(&r, &AttentionRetriever::open(&path).unwrap(), "open");
        same_steps(&r, &AttentionRetriever::load(&path).unwrap(), "load");
        assert_eq!(
            file::verify(&path).unwrap().kind,
            file::IndexKind::Attention
        );
        // An index file is refused by the retriever's reader.
        let flat = tmp("attention-methods-not.pqc");
        file::save(&every_kind(8, 10).remove(0).1, &flat).unwrap();
        assert!(matches!(
            AttentionRetriever::open(&flat),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_context_keeps_its_client_state_and_every_damage_is_an_error() {
        let r = cache("fastscan:8x4");
        let client = file::ClientState {
            words: vec![7, u64::MAX, 0],
            data: (0..100).map(|i| i as f32 * 0.25 - 3.0).collect(),
        };
        let path = tmp("context.pqc");
        file::save_context(&path, &r, &client).unwrap();
        assert_eq!(file::verify(&path).unwrap().kind, file::IndexKind::Context);
        let (opened, got) = file::open_context(&path).unwrap();
        assert_eq!(got, client);
        same_steps(&r, &opened, "context");
        // The cache part reads as an attention cache; the index readers refuse it.
        same_steps(
            &r,
            &file::open_attention(&path).unwrap(),
            "context as attention",
        );
        assert!(matches!(file::open(&path), Err(Error::InvalidArgument(_))));
        // An attention file is not a context.
        let plain = tmp("context-not.pqc");
        file::save(&r, &plain).unwrap();
        assert!(matches!(
            file::open_context(&plain),
            Err(Error::InvalidArgument(_))
        ));
        // Every prefix is an error; a flipped bit in the client's sections is caught on open
        // (their checksums are checked there), anywhere else by verify.
        let bytes = std::fs::read(&path).unwrap();
        for len in 0..bytes.len() {
            assert!(
                file::load_context_bytes(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        let info = file::verify(&path).unwrap();
        let mut b = bytes.clone();
        let mut on_open = 0;
        for sec in &info.sections {
            for byte in [
                sec.offset,
                sec.offset + sec.len / 2,
                sec.offset + sec.len - 1,
            ] {
                b[byte] ^= 0x10;
                assert!(file::verify_bytes(&b).is_err(), "{:?} at {byte}", sec.tag);
                if matches!(sec.tag, file::Tag::ClientWords | file::Tag::ClientData) {
                    assert!(file::load_context_bytes(&b).is_err(), "{:?}", sec.tag);
                    on_open += 1;
                }
                b[byte] ^= 0x10;
            }
        }
        assert_eq!(on_open, 6);
    }

    #[test]
    fn truncations_and_bit_flips_of_an_attention_file_are_errors() {
        let mut cfg = RetrieverConfig::new(AttentionShape {
            layers: 1,
            query_heads: 2,
            kv_heads: 1,
            head_dim: 8,
        });
        cfg.selector = "fastscan:2x4".parse().unwrap();
        cfg.budget = Budget::Tokens(20);
        let mut r = AttentionRetriever::new(cfg).unwrap();
        r.prefill(0, &halves(40 * 8, 1), &halves(40 * 8, 2), &[])
            .unwrap();
        let bytes = file::to_bytes(&r).unwrap();
        for len in 0..bytes.len() {
            assert!(
                file::load_attention_bytes(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        let mut b = bytes.clone();
        for byte in 0..b.len() {
            for bit in 0..8 {
                b[byte] ^= 1 << bit;
                assert!(
                    file::verify_bytes(&b).is_err(),
                    "verify missed {byte}:{bit}"
                );
                if let Ok(c) = file::load_attention_bytes(&b) {
                    let _ = c.select(0, &[0.5; 16]);
                }
                b[byte] ^= 1 << bit;
            }
        }
    }
}

/// Adds up the bytes allocated by threads that opted in (this file's tests run in parallel:
/// only the crafted-file test's own thread is tracked).
struct Tracking;

thread_local! {
    static TRACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static ALLOCATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout; the only
// addition is a relaxed atomic add and a thread-local read, which neither allocate nor unwind.
unsafe impl std::alloc::GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if TRACK.with(|t| t.get()) {
            ALLOCATED.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` above, with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// `bytes` with word `i` of the meta section set to `value` and every CRC recomputed (the
/// meta section's, the table's in the header and footer, the header's): a crafted file.
fn with_meta_word(bytes: &[u8], i: usize, value: u64) -> Option<Vec<u8>> {
    let mut b = bytes.to_vec();
    let n = u32::from_le_bytes(b[20..24].try_into().unwrap()) as usize;
    let entry = (0..n).map(|s| 64 + 32 * s).find(|&e| {
        u32::from_le_bytes(b[e..e + 4].try_into().unwrap()) == 1 // Tag::Meta
    })?;
    let off = u64::from_le_bytes(b[entry + 8..entry + 16].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(b[entry + 16..entry + 24].try_into().unwrap()) as usize;
    if 8 * i + 8 > len {
        return None;
    }
    b[off + 8 * i..off + 8 * i + 8].copy_from_slice(&value.to_le_bytes());
    let crc = crc32fast::hash(&b[off..off + len]);
    b[entry + 24..entry + 28].copy_from_slice(&crc.to_le_bytes());
    let table_crc = crc32fast::hash(&b[64..64 + 32 * n]);
    b[32..36].copy_from_slice(&table_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&header_crc.to_le_bytes());
    let l = b.len();
    b[l - 8..l - 4].copy_from_slice(&header_crc.to_le_bytes());
    b[l - 4..].copy_from_slice(&table_crc.to_le_bytes());
    Some(b)
}

/// Loads `bytes` as an attention cache (`name == "attention"`) or an index; the result and
/// the bytes allocated on this thread meanwhile.
fn tracked_load(name: &str, bytes: &[u8]) -> (pqcache::Result<()>, usize) {
    ALLOCATED.store(0, std::sync::atomic::Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let r = if name == "attention" {
        file::load_attention_bytes(bytes).map(|_| ())
    } else {
        file::load_bytes(bytes).map(|_| ())
    };
    TRACK.with(|t| t.set(false));
    (r, ALLOCATED.load(std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn crafted_meta_counts_give_typed_errors_without_allocating_from_them() {
    // Every word of every kind's meta section (the attention cache's included) set to sizes
    // a crafted file could claim, CRCs recomputed so that only the reader's own checks stand
    // between the claim and an allocation: each load gives a typed error (or a valid index,
    // where the word is not a size), and no load allocates more than 64 MB in all for files
    // of a few KB (a claimed 65536 x 65536 heads allocated 343 GB before).
    let mut files: Vec<(String, Vec<u8>)> = every_kind(8, 40)
        .into_iter()
        .map(|(name, idx)| (name.to_string(), file::to_bytes(&idx).unwrap()))
        .collect();
    let path = tmp("crafted-attention.pqc");
    file::save(&golden_attention(), &path).unwrap();
    files.push(("attention".into(), std::fs::read(&path).unwrap()));
    let values = [
        0u64,
        1 << 16,
        1 << 20,
        1 << 24,
        u32::MAX as u64,
        1 << 32,
        1 << 40,
        i64::MAX as u64,
        u64::MAX,
    ];
    let mut crafted = 0;
    for (name, bytes) in &files {
        for i in 0.. {
            let Some(probe) = with_meta_word(bytes, i, 0) else {
                break;
            };
            // The crafting itself is sound: writing a word's own value back loads.
            let own = with_meta_word(bytes, i, 0).map(|_| {
                let info = file::parse_layout(bytes).unwrap();
                let s = info.section(file::Tag::Meta).unwrap();
                u64::from_le_bytes(
                    bytes[s.offset + 8 * i..s.offset + 8 * i + 8]
                        .try_into()
                        .unwrap(),
                )
            });
            drop(probe);
            let (ok, _) = tracked_load(name, &with_meta_word(bytes, i, own.unwrap()).unwrap());
            assert!(
                ok.is_ok(),
                "{name}: word {i} rewritten with its own value: {ok:?}"
            );
            for &v in &values {
                let (r, allocated) = tracked_load(name, &with_meta_word(bytes, i, v).unwrap());
                assert!(
                    allocated <= 64 << 20,
                    "{name}: meta word {i} = {v}: {allocated} bytes allocated ({r:?})"
                );
                crafted += 1;
            }
        }
    }
    // Pairs of words at once (the attention cache's layers x kv_heads x head_dim are only
    // dangerous together).
    for (name, bytes) in &files {
        let words = (0..)
            .take_while(|&i| with_meta_word(bytes, i, 0).is_some())
            .count();
        for i in 0..words {
            for j in i + 1..words {
                for v in [1u64 << 8, 1 << 10, 1 << 16, 1 << 20] {
                    let b = with_meta_word(&with_meta_word(bytes, i, v).unwrap(), j, v).unwrap();
                    let (r, allocated) = tracked_load(name, &b);
                    assert!(
                        allocated <= 64 << 20,
                        "{name}: meta words {i}, {j} = {v}: {allocated} bytes allocated ({r:?})"
                    );
                    crafted += 1;
                }
            }
        }
    }
    eprintln!("{crafted} crafted files, every one a typed error or a file that loads");
    assert!(crafted > 500, "{crafted} crafted files");
}
