"""The GIL is released while the engine works: other Python threads run meanwhile, and
searches from several threads share the index."""

import threading
import time

import numpy as np

import pqcache


def python_progress_during(call):
    """Runs `call` on a thread; counts the iterations a pure-Python loop on this thread
    makes while it runs. A call that holds the GIL lets this thread run only at its edges
    (a handful of iterations at most); one that releases it lets it run throughout."""
    started = threading.Event()
    bounds = {}

    def work():
        started.set()
        bounds["t0"] = time.perf_counter()
        call()
        bounds["t1"] = time.perf_counter()

    t = threading.Thread(target=work)
    stamps = []
    t.start()
    started.wait()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = bounds["t0"], bounds["t1"]
    # The middle 80 % of the call: away from the GIL hand-overs at its start and end.
    lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
    return sum(lo < s < hi for s in stamps), t1 - t0


def test_search_train_and_add_release_the_gil(rng):
    x = rng.standard_normal((60_000, 64)).astype(np.float32)
    index = pqcache.IndexFlatIP(64)
    index.add(x)
    q = x[:400]
    n, secs = python_progress_during(lambda: index.search(q, 10))
    # Holding the GIL, the loop gets no iteration in the middle of the call; released, it
    # gets one every few microseconds (thousands over a call of tens of milliseconds).
    assert secs > 0.005, "the call was too short to tell"
    assert n > 100, (n, secs)

    pq = pqcache.IndexPQFastScan(64, 32, 4, pqcache.METRIC_INNER_PRODUCT)
    n, secs = python_progress_during(lambda: pq.train(x[:20_000]))
    assert n > 100, (n, secs)
    n, secs = python_progress_during(lambda: pq.add(x))
    assert n > 100, (n, secs)


def test_threads_searching_at_once_get_what_each_would_alone(rng):
    x = rng.standard_normal((20_000, 32)).astype(np.float32)
    index = pqcache.index_factory(32, "IVF64,PQ16x4fs", pqcache.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 8
    queries = [x[i * 50 : (i + 1) * 50] for i in range(8)]
    alone = [index.search(q, 10) for q in queries]
    together = [None] * len(queries)

    def run(i):
        for _ in range(20):
            together[i] = index.search(queries[i], 10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (da, ia), (dt, it) in zip(alone, together):
        np.testing.assert_array_equal(ia, it)
        np.testing.assert_array_equal(da, dt)


def test_adds_from_threads_lose_nothing(rng):
    x = rng.standard_normal((8_000, 16)).astype(np.float32)
    index = pqcache.IndexFlatL2(16)
    chunks = np.split(x, 8)
    threads = [threading.Thread(target=index.add, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.ntotal == 8_000
    # Every vector is in, whatever order the chunks went in: each finds itself (distance 0 up
    # to the rounding of |x|^2 + |q|^2 - 2 q.x), and the ids found are all 8,000.
    D, I = index.search(x, 1)
    assert np.all(D[:, 0] < 1e-4)
    assert len(set(I[:, 0])) == 8_000
