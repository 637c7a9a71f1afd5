#!/usr/bin/env bash
# GPU checks for a machine without registry access (the `device` machine).
#
# Here (with crates.io):      bash scripts/gpu-check.sh stage
#   builds the GPU test and bench binaries (feature `cuda`) and copies them, with the Gemma
#   dump they read (scripts/make-dumps.sh), into target/gpu-check/ (about 30 MB).
# There (carry target/gpu-check): bash scripts/gpu-check.sh [run]
#   runs the GPU tests (GPU output vs the CPU reference on every layer, within 1e-3
#   relative error; the CPU/GPU pipeline's hidden selection time) and the GPU bench
#   (sparse k = n/10 vs dense at n = 128K). Exits non-zero if a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
mode=${1:-run}

if [ "$mode" = stage ]; then
  rm -rf "$out" && mkdir -p "$out/dumps"
  test_bin=$(cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
  bench_bin=$(cargo bench --features cuda --bench gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
  cp "$test_bin" "$out/gpu-tests"
  cp "$bench_bin" "$out/gpu-bench"
  # Debug info is most of the size; the device tool carries at most 64 MiB.
  strip "$out/gpu-tests" "$out/gpu-bench" 2>/dev/null || true
  dumps=$(bash scripts/make-dumps.sh | tail -n 1)
  cp -r "$dumps/persuasion-2048" "$out/dumps/"
  du -sh "$out"
  exit 0
fi

[ -x "$out/gpu-tests" ] || { echo "no binaries in $out: run 'bash scripts/gpu-check.sh stage' on a machine with cargo" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PQCACHE_DUMPS="$PWD/$out/dumps"
echo "== GPU tests"
"$out/gpu-tests" --nocapture --test-threads 1
echo "== GPU bench"
"$out/gpu-bench" --bench --warm-up-time 1 --measurement-time 3
