#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each, after installing
# cargo-fuzz if it is missing. A finding fails the script; libFuzzer leaves the input in
# fuzz/artifacts/<target>/, and new interesting inputs in fuzz/corpus/<target>/ (commit them:
# tests/fuzz_corpus.rs replays the corpora on every `cargo test`).
# usage: scripts/fuzz.sh [SECONDS] [TARGET ...]    (default: 20 s; every target)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(open_index roundtrip read_npy fastscan_diff softmax_diff)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for target in "${targets[@]}"; do
  # cargo-fuzz needs -Zsanitizer: RUSTC_BOOTSTRAP=1 lets a stable toolchain accept it.
  # pipefail: a finding (non-zero exit of cargo fuzz) fails the script.
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds" 2>&1 | tail -n 3
done
