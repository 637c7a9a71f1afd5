"""Search from Python: pqcache's binding against the same search in Rust and against FAISS's
Python module, one thread each, on the bundled SIFT sample (9,900 x 128, L2).

    python scripts/python-bench.py [--reps 5] [--pqcache target/release/pqcache]

Per case: microseconds per query at k = 10 with one query per call (the binding's overhead
per call shows here) and with batches of 1,000 queries; the Rust figure is `pqcache eval`
(`--qbs 1` / `--qbs 1000`, one thread) on the same vectors and settings. Then two Python
threads sharing one index against one thread doing the same calls (the GIL is released).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread, as FAISS below and the CLI

import numpy as np  # noqa: E402

import pqcache  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python" / "tests"))
from conftest import read_fvecs  # noqa: E402

# (factory string, CLI arguments of `pqcache eval`, nprobe)
CASES = [
    ("Flat", ["--index", "flat"], None),
    ("PQ32x4fs", ["--index", "pqfs", "--m", "32"], None),
    ("IVF64,PQ32x4fs", ["--index", "ivfpqfs", "--nlist", "64", "--nprobe", "8", "--m", "32"], 8),
]


def best_time(f, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def per_query_us(index, xq, reps):
    one = [np.ascontiguousarray(xq[i : i + 1]) for i in range(len(xq))]

    def singles():
        for q in one:
            index.search(q, 10)

    single = best_time(singles, reps) / len(xq) * 1e6
    batch = best_time(lambda: index.search(xq, 10), reps) / len(xq) * 1e6
    return single, batch


def rust_us(cli, xb_path, xq_path, args, reps):
    out = []
    for qbs in (1, 1000):
        r = subprocess.run(
            [cli, "eval", "--base", xb_path, "--queries", xq_path, "--metric", "l2", "--k", "10",
             "--qbs", str(qbs), "--threads", "1", "--reps", str(reps), "--json", *args],
            capture_output=True, text=True, check=True,
        )
        out.append(json.loads(r.stdout)["search_us_per_query"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pqcache", default=str(REPO / "target" / "release" / "pqcache"))
    a = ap.parse_args()
    base = REPO / "data" / "ann" / "bigann-10k-128_"
    xb = read_fvecs(f"{base}base.fvecs")
    xq = np.ascontiguousarray(np.tile(read_fvecs(f"{base}query.fvecs"), (10, 1)))  # 1,000
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        faiss = None
    tmp = pathlib.Path(tempfile.mkdtemp())
    np.save(tmp / "xb.npy", xb)
    np.save(tmp / "xq.npy", xq)
    print(f"pqcache {pqcache.__version__} ({pqcache.simd_level()}), "
          f"faiss {faiss.__version__ if faiss else 'absent'}; us per query, k = 10, 1 thread")
    print(f"{'index':16} {'calls of':>9} {'rust':>8} {'python':>8} {'overhead':>9} {'faiss':>8} {'faiss/py':>9}")
    for desc, args, nprobe in CASES:
        rust = rust_us(a.pqcache, tmp / "xb.npy", tmp / "xq.npy", args, a.reps)
        ours = pqcache.index_factory(128, desc, pqcache.METRIC_L2)
        ours.train(xb)
        ours.add(xb)
        if nprobe:
            ours.nprobe = nprobe
        py = per_query_us(ours, xq, a.reps)
        fa = (None, None)
        if faiss:
            theirs = faiss.index_factory(128, desc, faiss.METRIC_L2)
            theirs.train(xb)
            theirs.add(xb)
            if nprobe:
                theirs.nprobe = nprobe
            fa = per_query_us(theirs, xq, a.reps)
        for i, calls in enumerate(("1", "1000")):
            f = f"{fa[i]:8.2f} {fa[i] / py[i]:9.2f}" if fa[i] else f"{'-':>8} {'-':>9}"
            print(f"{desc:16} {calls:>9} {rust[i]:8.2f} {py[i]:8.2f} {py[i] - rust[i]:+9.2f} {f}")

    # The cost of a call itself: an exact index of 16 vectors of 8 dimensions, k = 1.
    tiny_b = np.ascontiguousarray(xb[:16, :8])
    tiny_q = np.ascontiguousarray(xq[:, :8])
    np.save(tmp / "tb.npy", tiny_b)
    np.save(tmp / "tq.npy", tiny_q)
    r = subprocess.run(
        [a.pqcache, "eval", "--base", tmp / "tb.npy", "--queries", tmp / "tq.npy", "--index",
         "flat", "--metric", "l2", "--k", "1", "--qbs", "1", "--threads", "1", "--reps",
         str(a.reps), "--json"], capture_output=True, text=True, check=True)
    rust_tiny = json.loads(r.stdout)["search_us_per_query"]
    row = []
    for lib in [pqcache] + ([faiss] if faiss else []):
        index = lib.IndexFlatL2(8)
        index.add(tiny_b)
        one = [np.ascontiguousarray(tiny_q[i : i + 1]) for i in range(len(tiny_q))]
        us = best_time(lambda: [index.search(q, 1) for q in one], a.reps) / len(one) * 1e6
        row.append(f"{lib.__name__} {us:.2f} us")
    print(f"a call on 16 x 8 vectors, k = 1: rust {rust_tiny:.2f} us, " + ", ".join(row))

    # Two threads sharing one index against one thread making the same calls.
    for desc, batch in [("Flat", 1), ("PQ32x4fs", 1), ("PQ32x4fs", 100)]:
        index = pqcache.index_factory(128, desc, pqcache.METRIC_L2)
        index.train(xb)
        index.add(xb)
        calls = [np.ascontiguousarray(xq[i : i + batch]) for i in range(0, len(xq), batch)]

        def run(part):
            for q in part:
                index.search(q, 10)

        def parallel():
            ts = [threading.Thread(target=run, args=(calls[i::2],)) for i in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        serial = best_time(lambda: run(calls), a.reps)
        par = best_time(parallel, a.reps)
        print(f"{desc}, {len(calls)} calls of {batch} queries: one thread {serial * 1e3:.1f} ms, "
              f"two threads {par * 1e3:.1f} ms ({serial / par:.2f}x; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
