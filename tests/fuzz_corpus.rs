//! Every committed fuzz corpus file (`fuzz/corpus/<target>/`) through its target's check
//! (`fuzz/checks/mod.rs`, the code `cargo fuzz` runs): what the fuzzer once found interesting
//! stays answered (a typed error, an index that searches, a round trip that is byte-identical,
//! SIMD equal to scalar) on every `cargo test`, without the sanitizer build.
#[path = "../fuzz/checks/mod.rs"]
mod checks;

use std::path::Path;

/// Runs `check` over the target's corpus; the count is asserted so that a moved or emptied
/// corpus folder fails instead of passing on nothing.
fn replay(target: &str, check: fn(&[u8]), at_least: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // A panic names the corpus file it came from (the file is the reproducer).
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: corpus file {name} fails its check"
        );
    }
    assert!(
        files.len() >= at_least,
        "{target}: {} corpus files, expected at least {at_least}",
        files.len()
    );
}

#[test]
fn open_index_corpus() {
    replay("open_index", checks::open_index, 400);
}

#[test]
fn roundtrip_corpus() {
    replay("roundtrip", checks::roundtrip, 1000);
}

#[test]
fn read_npy_corpus() {
    replay("read_npy", checks::read_npy, 200);
}

#[test]
fn fastscan_diff_corpus() {
    replay("fastscan_diff", checks::fastscan_diff, 70);
}

#[test]
fn softmax_diff_corpus() {
    replay("softmax_diff", checks::softmax_diff, 48);
}
