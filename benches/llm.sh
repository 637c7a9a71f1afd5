#!/usr/bin/env bash
# Prefill and decode speed of pqcache-llm (dense and retrieval attention) and of llama.cpp on
# the same GGUF, prompt ids and thread count, at several context lengths; one JSON line per
# run, then a table. llama.cpp comes from PyPI (llama-cpp-python builds it from source, several
# minutes the first time) into $PEER_VENV (default target/peers/llamacpp).
# usage: [PEER=0] benches/llm.sh [CONTEXTS] [SPECS] [NEW]     (PEER=0: pqcache-llm alone)
#   CONTEXTS  comma list of prompt lengths in tokens (default 2048,8192,32000)
#   SPECS     comma list of attention backends (default dense,fastscan:64x4)
#   NEW       tokens decoded per run (default 32)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
contexts=${1:-2048,8192,32000}; specs=${2:-dense,fastscan:64x4}; new=${3:-32}
threads=$(nproc)
gguf=$(bash "$root/scripts/fetch-gemma.sh" | tail -n 1)
(cd "$root" && cargo build --release --quiet -p pqcache-llm)
bin="$root/target/release/pqcache-llm"
venv=${PEER_VENV:-$root/target/peers/llamacpp}
peer=${PEER:-1}
if [ "$peer" = 1 ] && { [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; }; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet llama-cpp-python numpy >&2
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# Pride and Prejudice from Debian's r-cran-janeaustenr (as ../shared/tools/qkdump extracts
# it) if at hand, else the bundled first 64K characters repeated.
text="$work/text.txt"
for _ in 1 2 3 4 5 6 7 8; do cat "$root/data/gemma3/prideprejudice-64k-chars.txt"; done > "$text"
[ -n "${BENCH_TEXT:-}" ] && cp "$BENCH_TEXT" "$text"
results="$work/results.jsonl"
for n in ${contexts//,/ }; do
  "$bin" tokenize --model "$gguf" --text "$text" --tokens "$n" > "$work/ids-$n.json"
  for spec in ${specs//,/ }; do
    "$bin" generate --model "$gguf" --ids "$work/ids-$n.json" --max-new "$new" --attention "$spec" \
      --budget 0.1 --json | python3 -c "import json,sys; d=json.load(sys.stdin); d['context']=$n; print(json.dumps(d))" | tee -a "$results"
  done
  [ "$peer" = 1 ] || continue
  "$venv/bin/python" "$root/benches/llamacpp_peer.py" "$gguf" "$work/ids-$n.json" "$new" "$threads" |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['context']=$n; d['attention']='llama.cpp'; print(json.dumps(d))" | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n| context | attention | prefill tok/s | decode tok/s | decode ms/token: matmul / sliding / global attn / select / cache / other |")
print("|---|---|---|---|---|")
for r in rows:
    d = r.get("decode_ms_per_token")
    parts = " / ".join(f"{d[k]:.1f}" for k in ["matmul", "sliding_attention", "global_attention", "select", "cache_update", "other"]) if d else "-"
    print(f"| {r['context']} | {r['attention']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {parts} |")
PY
