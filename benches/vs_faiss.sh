#!/usr/bin/env bash
# Side-by-side: `pqcache eval` and FAISS (../shared/peers/faiss_bench.py) on the same files and
# settings, in the same run; prints both figures and the ratios (FAISS time / ours: > 1 means
# we are faster).
#
#   benches/vs_faiss.sh                       # PQ (8-bit ADC) and exact search
#   benches/vs_faiss.sh fastscan [full]       # the 4-bit fast-scan matrix (full: n up to 1M)
#   benches/vs_faiss.sh ivf                   # IVF fast-scan: add, batch search at 1 and 2 threads
#   PAIRS=3 benches/vs_faiss.sh ...           # each row's two runs alternated 3 times, median ratio
#   benches/vs_faiss.sh --base B --queries Q --index pq --m 16 --nbits 8 --k 10 --metric l2
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared
py=$(bash "$shared/peers/setup.sh" /tmp/pqcache-peers | tail -n 1)
cargo build --release --quiet
bin=target/release/pqcache
work=${TMPDIR:-/tmp}/pqcache-vs-faiss
mkdir -p "$work"

# One row: ours and FAISS, PAIRS times alternated (default 1; PAIRS=3 on a shared machine,
# whose slow phases last longer than one side's run): each pair's ratios, then their median.
compare() {
  local pairs=() i
  for ((i = 0; i < ${PAIRS:-1}; i++)); do
    pairs+=("$("$bin" eval "$@" --json)" "$("$py" "$shared/peers/faiss_bench.py" "$@" 2>/dev/null)")
  done
  python3 - "$*" "${pairs[@]}" <<'PY'
import json, statistics, sys
args, runs = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
pairs = list(zip(runs[0::2], runs[1::2]))
print(f"\n{args}")
print(f"  {'':22}{'pqcache':>12}{'faiss':>12}{'faiss/ours':>12}")
for key in ["train_s", "add_s", "search_us_per_query"]:
    for o, t in pairs:
        print(f"  {key:22}{o[key]:12.4g}{t[key]:12.4g}{t[key] / max(o[key], 1e-12):12.2f}")
    if len(pairs) > 1:
        med = statistics.median(t[key] / max(o[key], 1e-12) for o, t in pairs)
        print(f"  {key + ' (median)':22}{'':24}{med:12.2f}")
o, t = pairs[0]
print(f"  {'recall_at_k':22}{o['recall_at_k']:12.4f}{t['recall_at_k']:12.4f}{o['recall_at_k'] - t['recall_at_k']:+12.4f} (ours - faiss)")
PY
}

# Synthetic keys with per-dimension offsets and scales (LLM keys have strong per-channel
# structure), 64 queries from the same distribution: syn_N_D.npy, synq_N_D.npy.
synth() {
  local n=$1 d=$2
  [ -f "$work/syn_${n}_${d}.npy" ] && return 0
  "$py" - "$work" "$n" "$d" <<'PY'
import sys, numpy as np
work, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(n + d)
off = rng.uniform(-1, 1, d).astype(np.float32)
scale = rng.uniform(0.2, 2, d).astype(np.float32)
x = (off + scale * rng.uniform(-1, 1, (n + 64, d))).astype(np.float32)
np.save(f"{work}/syn_{n}_{d}.npy", x[:n]); np.save(f"{work}/synq_{n}_{d}.npy", x[n:])
PY
}

# A 65,536 x 128 set of real vectors: Gemma query vectors cut into 128-d halves, and 1,000
# more of them as queries.
gemma128() {
  [ -f "$work/gemma128_65k.npy" ] && return 0
  "$py" - "$shared" "$work" <<'PY'
import sys, numpy as np
shared, work = sys.argv[1], sys.argv[2]
q = np.load(f"{shared}/data/gemma3-270m/prideprejudice-8192/q.npy").astype(np.float32).reshape(-1, 128)
np.save(f"{work}/gemma128_65k.npy", np.ascontiguousarray(q[:65536]))
np.save(f"{work}/gemma128_q1k.npy", np.ascontiguousarray(q[-1000:]))
PY
}

# Fashion-MNIST (ann-benchmarks' fashion-mnist-784-euclidean: 60,000 x 784, 1,000 queries),
# from Debian's dataset-fashion-mnist, extracted by ../shared/tools/qkdump/ann_extract.py.
fmnist() {
  [ -f "$work/fashion-mnist-784_base.fvecs" ] && return 0
  (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 && dpkg -x dataset-fashion-mnist_*.deb fmnist-deb)
  "$py" "$shared/tools/qkdump/ann_extract.py" fmnist "$work/fmnist-deb" "$work" 1000 >/dev/null
}

if [ "${1:-}" = ivf ]; then
  gemma128
  fmnist
  ann=$shared/data/ann
  # Batch search (1,000 queries per call) at 1 and 2 threads; add_s is the add throughput.
  # Each side reports its best of N passes over the queries (one pass is 1-30 ms; bigann's
  # 0.2-0.4 ms), N 30 (bigann 1,000: 0.2-0.4 s a side) for both peers. A shared machine's
  # slow phases last seconds: with N 30, bigann's 10 ms of passes fell within one phase and
  # read 1.9-3.5 us/query for either peer at 2 threads where its best is 1.2 (ours) and
  # 1.8 (FAISS); with N 10, Gemma nprobe 64 read 27.7-28.0 us/query for ours in both pairs
  # of a run (18.1-18.5 in the next minutes); hence also PAIRS.
  for threads in 1 2; do
    for nprobe in 4 16 64; do
      compare --base "$work/gemma128_65k.npy" --queries "$work/gemma128_q1k.npy" --index ivfpqfs \
        --nlist 256 --nprobe $nprobe --m 32 --k 10 --metric l2 --qbs 1000 --threads $threads --reps 30
    done
    for nprobe in 8 32; do
      compare --base "$work/fashion-mnist-784_base.fvecs" --queries "$work/fashion-mnist-784_query.fvecs" \
        --index ivfpqfs --nlist 256 --nprobe $nprobe --m 98 --k 10 --metric l2 --qbs 1000 --threads $threads --reps 30
    done
    for nprobe in 4 16; do
      compare --base $ann/bigann-10k-128_base.fvecs --queries $ann/bigann-10k-128_query.fvecs --index ivfpqfs \
        --nlist 64 --nprobe $nprobe --m 32 --k 10 --metric l2 --qbs 100 --threads $threads --reps 1000
    done
  done
  # Recall 0.9 needs exact re-ranking of the 4-bit candidates (FAISS: IndexRefineFlat, not in
  # faiss_bench.py); ours alone:
  for threads in 1 2; do
    "$bin" eval --base "$work/gemma128_65k.npy" --queries "$work/gemma128_q1k.npy" --index ivfpqfs \
      --nlist 256 --nprobe 16 --m 32 --k 10 --metric l2 --qbs 1000 --threads $threads --reps 3 --rerank 8
  done
  exit 0
fi

if [ "${1:-}" = fastscan ]; then
  sizes="32768 131072"
  [ "${2:-}" = full ] && sizes="32768 131072 1048576"
  for n in $sizes; do
    for d in 128 256; do
      [ "$n" = 1048576 ] && [ "$d" = 256 ] && continue
      synth "$n" "$d"
      for m in 16 32 64 128; do
        [ $((d % m)) = 0 ] || continue
        for k in 10 $((n / 10)); do
          for qbs in 1 4; do
            compare --base "$work/syn_${n}_${d}.npy" --queries "$work/synq_${n}_${d}.npy" \
              --index pqfs --m $m --k $k --qbs $qbs --metric ip --reps 3 --train-n 32768
          done
        done
      done
    done
  done
  exit 0
fi

if [ $# -gt 0 ]; then
  compare "$@"
  exit 0
fi

gemma128
ann=$shared/data/ann
gemma=$shared/data/gemma3-270m/prideprejudice-8192
for m in 8 16 32 64; do
  compare --base "$work/gemma128_65k.npy" --queries "$work/gemma128_q1k.npy" --index pq --m $m --nbits 8 --k 10 --metric ip --reps 1
done
# Exact search over 65,536 x 128: one query at a time (the rows read from memory per query)
# and batches of 1,000 (GEMM blocks), on one and two threads.
for metric in ip l2; do
  compare --base "$work/gemma128_65k.npy" --queries "$work/gemma128_q1k.npy" --index flat --k 10 --metric $metric --qbs 1 --reps 2
  for threads in 1 2; do
    compare --base "$work/gemma128_65k.npy" --queries "$work/gemma128_q1k.npy" --index flat --k 10 --metric $metric --qbs 1000 --threads $threads --reps 3
  done
done
compare --base $ann/bigann-10k-128_base.fvecs --queries $ann/bigann-10k-128_query.fvecs --index pq --m 16 --nbits 8 --k 10 --metric l2
compare --base $ann/bigann-10k-128_base.fvecs --queries $ann/bigann-10k-128_query.fvecs --index flat --k 10 --metric l2
compare --base $gemma/k.npy --queries $gemma/q.npy --index pq --m 64 --nbits 8 --k 10 --metric ip --reps 2
compare --base $gemma/k.npy --queries $gemma/q.npy --index flat --k 10 --metric ip --reps 2
compare --base $gemma/k.npy --queries $gemma/q.npy --index flat --k 819 --metric ip --reps 2
