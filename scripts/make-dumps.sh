#!/usr/bin/env bash
# Makes the attention dumps the tests and benches read, with `pqcache-llm dump` over the
# public-domain texts in data/gemma3/ (the model from scripts/fetch-gemma.sh): post-RoPE
# Q, K, V of Gemma-3-270M's global layers 5, 11, 17 in the layout of AttentionDump.
#   persuasion-2048       Persuasion, first 2048 tokens  (about 15 s on 2 cores)
#   prideprejudice-8192   Pride and Prejudice, 8192 tokens (about 1 minute)
# Idempotent; each dump is written to a temporary folder and renamed into place.
# usage: scripts/make-dumps.sh [OUTDIR]     (default: target/dumps; prints OUTDIR last)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${PQCACHE_DUMPS:-$root/target/dumps}}
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
need=0
for name in persuasion-2048 prideprejudice-8192; do
  [ -f "$out/$name/meta.json" ] || need=1
done
if [ "$need" = 1 ]; then
  gguf=$(bash "$root/scripts/fetch-gemma.sh" | tail -n 1)
  (cd "$root" && cargo build --release --quiet -p pqcache-llm)
  bin="$root/target/release/pqcache-llm"
  for spec in "persuasion-2048 persuasion-16k-chars.txt 2048" \
              "prideprejudice-8192 prideprejudice-64k-chars.txt 8192"; do
    set -- $spec
    [ -f "$out/$1/meta.json" ] && continue
    rm -rf "$out/$1.tmp"
    "$bin" dump --model "$gguf" --text "$root/data/gemma3/$2" --tokens "$3" \
      --layers 5,11,17 --no-nll --out "$out/$1.tmp" >&2
    mv "$out/$1.tmp" "$out/$1"
  done
fi
echo "$out"
