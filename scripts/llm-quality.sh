#!/usr/bin/env bash
# What the model says under sparse attention, on long texts: the perplexity / KL / top-1
# tables at budgets 10 / 5 / 2 %, the passkey table and the KL plot (docs/llm-kl.png).
#
#   scripts/llm-quality.sh TEXTS_DIR [OUT_DIR]
#
# TEXTS_DIR holds the texts `../shared/tools/qkdump/setup.sh` extracts (emma.txt,
# northangerabbey.txt, python_reference.txt, sensesensibility.txt, ...). TOKENS (16384) and
# DECODED (512) set each perplexity run: the first TOKENS - DECODED tokens are one dense
# prefill, shared by every method (Session::fork). About 12 minutes per text on 2 cores.
# The plot needs matplotlib (a venv with `pip install matplotlib`; PYTHON names it).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
texts="${1:?usage: scripts/llm-quality.sh TEXTS_DIR [OUT_DIR]}"
out="${2:-$here/target/llm-quality}"
tokens="${TOKENS:-16384}"
decoded="${DECODED:-512}"
python="${PYTHON:-python3}"
mkdir -p "$out" "$here/docs"
model="$("$here/scripts/fetch-gemma.sh" | tail -n 1)"
cargo build --release -p pqcache-llm --manifest-path "$here/Cargo.toml"
bin="$here/target/release/pqcache-llm"
methods="exact,exact+notail,fastscan:64x4,fastscan:64x4+notail,pq:2x6,pq:2x6+notail,quest:16,window"
args=()
for t in emma northangerabbey python_reference; do
  "$bin" perplexity --model "$model" --text "$texts/$t.txt" --tokens "$tokens" \
    --prefill $((tokens - decoded)) --attention "$methods" --budgets 0.1,0.05,0.02 --json \
    > "$out/ppl-$t.json"
  args+=("$t=$out/ppl-$t.json")
done
"$bin" passkey --model "$model" --haystack "$texts/sensesensibility.txt" \
  --lengths 4096,8192,16384 --depths 0.1,0.5,0.9 --trials 1 \
  --attention dense,exact,fastscan:64x4,pq:2x6,quest:16,window --budgets 0.1,0.05,0.02 \
  --json > "$out/passkey.json"
"$python" "$here/scripts/llm-quality.py" --passkey "$out/passkey.json" \
  --plot "$here/docs/llm-kl.png" "${args[@]}" > "$here/docs/llm-quality.md"
echo "tables: docs/llm-quality.md, plot: docs/llm-kl.png"
