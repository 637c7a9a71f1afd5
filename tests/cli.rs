//! The binary: `eval --json` prints exactly faiss_bench.py's keys; `demo` runs on the bundled
//! sample; errors exit non-zero with a message.
mod common;

use std::process::Command;

fn pqcache() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pqcache"))
}

#[test]
fn eval_json_has_exactly_the_peer_keys() {
    let data = common::shared_data().join("ann");
    let out = pqcache()
        .args([
            "eval", "--index", "pq", "--m", "16", "--nbits", "8", "--k", "10", "--metric", "l2",
            "--json", "--reps", "1",
        ])
        .arg("--base")
        .arg(data.join("bigann-10k-128_base.fvecs"))
        .arg("--queries")
        .arg(data.join("bigann-10k-128_query.fvecs"))
        .arg("--groundtruth")
        .arg(data.join("bigann-10k-128_groundtruth.ivecs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
    keys.sort_unstable();
    // The keys faiss_bench.py prints, sorted.
    let mut want = vec![
        "peer",
        "version",
        "index",
        "n",
        "d",
        "m",
        "nbits",
        "k",
        "qbs",
        "metric",
        "threads",
        "train_s",
        "add_s",
        "search_us_per_query",
        "ns_per_code_per_query",
        "recall_at_k",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(v["n"], 9900);
    assert_eq!(v["d"], 128);
    let r = v["recall_at_k"].as_f64().unwrap();
    // Against the shipped ground truth, as in tests/pq.rs (FAISS 0.74 - 0.02).
    assert!(r >= 0.72, "recall {r}");
}

#[test]
fn demo_runs_on_bundled_data() {
    let out = pqcache()
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("2048 tokens"), "{text}");
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let out = pqcache()
        .args([
            "eval",
            "--base",
            "/nonexistent.fvecs",
            "--queries",
            "/nonexistent.fvecs",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    let data = common::shared_data().join("ann");
    let out = pqcache()
        .args(["eval", "--m", "7", "--json"])
        .arg("--base")
        .arg(data.join("bigann-10k-128_base.fvecs"))
        .arg("--queries")
        .arg(data.join("bigann-10k-128_query.fvecs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not divide"));
    for sub in ["eval", "demo"] {
        let out = pqcache().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
    }
}

#[test]
fn eval_attention_json_rows() {
    let out = pqcache()
        .args([
            "eval-attention",
            "--positions",
            "2",
            "--ratios",
            "0.2,0.1",
            "--selectors",
            "exact,window,fastscan:64x4:rerank4",
            "--json",
        ])
        .arg("--data")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/persuasion-2048-layer5"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    let mut keys: Vec<&str> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|s| s.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "err",
            "mass",
            "oracle_err",
            "ratio",
            "recall",
            "select_us_per_step",
            "selector"
        ]
    );
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["selector"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "exact",
            "window",
            "fastscan:64x4:rerank4",
            "exact",
            "window",
            "fastscan:64x4:rerank4"
        ]
    );
    for r in rows {
        let mass = r["mass"].as_f64().unwrap();
        assert!(mass > 0.0 && mass <= 1.0 + 1e-9);
    }
}
