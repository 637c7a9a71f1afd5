//! Readers on the bundled data, the made dumps and files written here.
mod common;

use half::f16;
use pqcache::io::npy::{self, NpyData};
use pqcache::io::{load_vectors, vecs};

#[test]
fn reads_bundled_fvecs_ivecs_and_f16_npy() {
    let data = common::ann_data();
    let dumps = common::dumps();
    let base = load_vectors(&data.join("bigann-10k-128_base.fvecs"), 0, 0).unwrap();
    assert_eq!((base.rows, base.dim), (9900, 128));
    // SIFT descriptors are small non-negative integers.
    assert!(base
        .data
        .iter()
        .all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0));
    let (rows, k, gt) = vecs::read_ivecs(&data.join("bigann-10k-128_groundtruth.ivecs")).unwrap();
    assert_eq!((rows, k), (100, 100));
    assert!(gt.iter().all(|&i| (0..9900).contains(&i)));
    let k = npy::read(&dumps.join("persuasion-2048/k.npy")).unwrap();
    assert_eq!(k.shape, vec![3, 1, 2048, 256]);
    assert!(matches!(k.data, NpyData::F16(_)));
    // The (layer 2, head 0) slice is the last third of the array.
    let slice = load_vectors(&dumps.join("persuasion-2048/k.npy"), 2, 0).unwrap();
    if let NpyData::F16(all) = &k.data {
        assert_eq!(slice.data[0], all[2 * 2048 * 256].to_f32());
    }
    assert!(load_vectors(&dumps.join("persuasion-2048/k.npy"), 3, 0).is_err());
}

#[test]
fn written_files_read_back() {
    let dir = common::TempDir::new("io");
    let x = common::uniform(7, 5, 1);
    vecs::write_fvecs(&dir.join("x.fvecs"), 5, &x).unwrap();
    assert_eq!(load_vectors(&dir.join("x.fvecs"), 0, 0).unwrap().data, x);
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    npy::write(&dir.join("x.npy"), &[7, 5], &NpyData::F16(h.clone())).unwrap();
    let back = load_vectors(&dir.join("x.npy"), 0, 0).unwrap();
    assert_eq!(back.data, h.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
}

/// Writes a dump folder of `layers` layers, `qh` query heads and `kvh` kv heads (4 tokens of
/// width 8) with `meta` as its `meta.json`.
fn write_dump(name: &str, layers: usize, qh: usize, kvh: usize, meta: &str) -> common::TempDir {
    let dir = common::TempDir::new(&format!("dump-{name}"));
    let (t, d) = (4, 8);
    let fill = |heads: usize| NpyData::F16(vec![f16::from_f32(0.5); layers * heads * t * d]);
    npy::write(&dir.join("q.npy"), &[layers, qh, t, d], &fill(qh)).unwrap();
    npy::write(&dir.join("k.npy"), &[layers, kvh, t, d], &fill(kvh)).unwrap();
    npy::write(&dir.join("v.npy"), &[layers, kvh, t, d], &fill(kvh)).unwrap();
    std::fs::write(dir.join("meta.json"), meta).unwrap();
    dir
}

#[test]
fn a_dump_meta_that_lies_is_refused_not_replaced() {
    use pqcache::io::dump::AttentionDump;
    let good = write_dump(
        "good",
        2,
        2,
        1,
        r#"{"layers": [5, 11], "attn_scale": 0.25}"#,
    );
    let dump = AttentionDump::load(&good).unwrap();
    assert_eq!((dump.layers.clone(), dump.scale), (vec![5, 11], 0.25));
    // Absent fields take their defaults: layers 0.., scale 1/sqrt(head_dim).
    let bare = write_dump("bare", 2, 2, 1, "{}");
    let dump = AttentionDump::load(&bare).unwrap();
    assert_eq!(dump.layers, vec![0, 1]);
    assert_eq!(dump.scale, 1.0 / 8f32.sqrt());
    for (name, meta, says) in [
        ("short", r#"{"layers": [5]}"#, "\"layers\" must list 2"),
        ("dup", r#"{"layers": [5, 5]}"#, "distinct"),
        ("neg", r#"{"layers": [5, -1]}"#, "\"layers\""),
        ("str", r#"{"layers": "5,11"}"#, "\"layers\""),
        (
            "scale",
            r#"{"attn_scale": "0.1"}"#,
            "\"attn_scale\" must be a number",
        ),
        ("json", "{not json", "meta.json"),
    ] {
        let dir = write_dump(name, 2, 2, 1, meta);
        let e = AttentionDump::load(&dir).unwrap_err();
        assert!(matches!(e, pqcache::Error::Format { .. }), "{name}: {e}");
        assert!(e.to_string().contains(says), "{name}: {e}");
    }
    // Zero query heads or heads that do not group.
    for (name, qh, kvh) in [("q0", 0, 1), ("group", 3, 2)] {
        let dir = write_dump(name, 1, qh, kvh, "{}");
        assert!(AttentionDump::load(&dir).is_err(), "{name}");
    }
}
