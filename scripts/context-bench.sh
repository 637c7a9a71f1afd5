#!/usr/bin/env bash
# Issue 17's figures: a document prefilled once and saved (pqcache-llm prefill), reopened and
# asked (pqcache-llm ask) warm and from a cold page cache, against prefilling it again
# (generate --question) and against llama.cpp's saved state (scripts/llamacpp_state.py); and
# a 32K context answering under a memory cgroup smaller than its KV.
#
#   bash scripts/context-bench.sh TEXT [LENGTHS] [LLAMA_PYTHON]
#
# TEXT: a UTF-8 document (its first LENGTHS tokens, default "8192 32000"). LLAMA_PYTHON: a
# python with llama-cpp-python (skipped if absent). A cold cache is made by evicting the
# file's pages (posix_fadvise DONTNEED; fincore shows what came back). The cgroup step needs
# a writable cgroup-v1 memory controller (skipped otherwise). Prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
text=$1
lengths=${2:-"8192 32000"}
py=${3:-}
model=$(bash scripts/fetch-gemma.sh | tail -n 1)
cargo build --release -p pqcache-llm --quiet
bin=target/release/pqcache-llm
work=${PQCACHE_BENCH_DIR:-/tmp/pqcache-context-bench}
mkdir -p "$work"
question=" Question: who is Harriet Smith? Answer:"
evict() { python3 -c 'import os,sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$1"; }
printf '%s' "$question" > "$work/q.txt"
"$bin" tokenize --model "$model" --text "$work/q.txt" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[1:]))' > "$work/q.json"
for n in $lengths; do
  ctx=$work/ctx-$n.pqc
  "$bin" tokenize --model "$model" --text "$text" --tokens "$n" > "$work/ids-$n.json"
  echo "{\"prefill\": $n, \"result\": $("$bin" prefill --model "$model" --ids "$work/ids-$n.json" --out "$ctx" --json 2>/dev/null)}"
  "$bin" ask --model "$model" --context "$ctx" --prompt "$question" --max-new 16 --json >/dev/null 2>&1
  echo "{\"ask_warm\": $n, \"result\": $("$bin" ask --model "$model" --context "$ctx" --prompt "$question" --max-new 16 --json 2>/dev/null)}"
  evict "$ctx"
  echo "{\"ask_cold\": $n, \"result\": $("$bin" ask --model "$model" --context "$ctx" --prompt "$question" --max-new 16 --json 2>/dev/null), \"resident_after\": \"$(fincore -n -o RES "$ctx")\"}"
  echo "{\"generate_again\": $n, \"result\": $("$bin" generate --model "$model" --ids "$work/ids-$n.json" --attention fastscan:64x4 --question "$question" --max-new 16 --json 2>/dev/null)}"
  if [ -n "$py" ]; then
    state=$work/llamacpp-$n.state
    echo "{\"llamacpp_save\": $n, \"result\": $("$py" scripts/llamacpp_state.py save "$model" "$work/ids-$n.json" "$state" 2>/dev/null)}"
    "$py" scripts/llamacpp_state.py ask "$model" "$state" "$work/q.json" 16 >/dev/null 2>&1
    echo "{\"llamacpp_load_warm\": $n, \"result\": $("$py" scripts/llamacpp_state.py ask "$model" "$state" "$work/q.json" 16 2>/dev/null)}"
    evict "$state"
    echo "{\"llamacpp_load_cold\": $n, \"result\": $("$py" scripts/llamacpp_state.py ask "$model" "$state" "$work/q.json" 16 2>/dev/null)}"
    rm -f "$state"
  fi
done
# Under a memory limit: once the model is loaded, ask is moved into a cgroup of LIMIT MB, so
# every page it touches from then on (the context's, its new allocations) counts there.
last=$(echo "$lengths" | awk '{print $NF}')
if mkdir -p /sys/fs/cgroup/memory/pqcache-squeeze 2>/dev/null; then
  for limit in 200 64; do
    evict "$work/ctx-$last.pqc"
    python3 scripts/squeeze.py "$bin" "$model" "$work/ctx-$last.pqc" "$question" "$limit"
  done
else
  echo '{"squeeze": "skipped: no writable memory cgroup"}'
fi
