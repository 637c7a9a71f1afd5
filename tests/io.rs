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
    let dir = std::env::temp_dir().join(format!("pqcache-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = common::uniform(7, 5, 1);
    vecs::write_fvecs(&dir.join("x.fvecs"), 5, &x).unwrap();
    assert_eq!(load_vectors(&dir.join("x.fvecs"), 0, 0).unwrap().data, x);
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    npy::write(&dir.join("x.npy"), &[7, 5], &NpyData::F16(h.clone())).unwrap();
    let back = load_vectors(&dir.join("x.npy"), 0, 0).unwrap();
    assert_eq!(back.data, h.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).ok();
}
