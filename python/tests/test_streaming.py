"""StreamingIndex: adds, removals and searches from several threads while the codebooks are
refreshed; nothing added or removed is lost."""

import threading

import numpy as np
import pytest

import pqcache


@pytest.fixture
def trained(rng):
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    ivf = pqcache.index_factory(32, "IVF16,PQ16x4fs", pqcache.METRIC_L2)
    ivf.train(x[:3000])
    ivf.nprobe = 16
    return ivf, x


def test_ids_continue_and_removed_ids_are_gone(trained):
    ivf, x = trained
    s = pqcache.StreamingIndex(ivf)
    first = s.add(x[:1000])
    np.testing.assert_array_equal(first, np.arange(1000))
    s.add_with_ids(x[1000:1010], np.arange(5000, 5010, dtype=np.int64))
    second = s.add(x[1010:1020])
    np.testing.assert_array_equal(second, np.arange(5010, 5020))
    assert s.remove_ids(np.arange(0, 1000, 2, dtype=np.int64)) == 500
    assert s.ntotal == 1020 - 500
    _, I = s.search(x[:1000], 5)
    assert not set(I.ravel()) & set(range(0, 1000, 2))
    assert ivf.ntotal == 0  # the StreamingIndex holds a copy


def test_a_refresh_while_adding_loses_nothing(trained):
    ivf, x = trained
    s = pqcache.StreamingIndex(ivf)
    s.add(x[:2000])
    assert s.refresh_in_background()
    adders = [threading.Thread(target=s.add, args=(x[2000 + 1000 * i : 3000 + 1000 * i],)) for i in range(4)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    s.wait()
    assert s.refreshes == 1 and not s.is_refreshing
    assert s.ntotal == 6000
    _, I = s.search(x, 1)
    # Every vector is in under its id (ids are given in add order per thread, so compare
    # sets): at least 95 % find themselves first (4-bit PQ of 2-d sub-vectors, all lists).
    assert len(set(I[:, 0])) > 0.95 * 6000
    snap = s.snapshot()
    assert isinstance(snap, pqcache.IndexIVFPQFastScan) and snap.ntotal == 6000


def test_policy_and_drift(trained):
    ivf, x = trained
    s = pqcache.StreamingIndex(ivf)
    s.set_policy(drift_threshold=1.01, min_added=100)
    # Vectors from far away: their quantization error drifts past the training error.
    s.add(x[:500] * 3.0 + 5.0)
    s.wait()
    drift = s.drift()
    assert set(drift) == {"train_mse", "added_sq_err", "added", "ratio"}
    # The policy started a refresh (or finished one) as the drift passed the threshold.
    for _ in range(200):
        if s.refreshes >= 1:
            break
        threading.Event().wait(0.05)
    assert s.refreshes >= 1
    with pytest.raises(ValueError, match="drift_threshold"):
        s.set_policy(drift_threshold=-1.0)
    s.set_policy(None)


def test_only_a_trained_ivf_streams():
    with pytest.raises(TypeError, match="IndexIVFPQFastScan"):
        pqcache.StreamingIndex(pqcache.IndexFlatL2(8))
    with pytest.raises(ValueError, match="trained"):
        pqcache.StreamingIndex(pqcache.index_factory(8, "IVF4,PQ4x4fs"))
