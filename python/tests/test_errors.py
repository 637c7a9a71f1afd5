"""Every bad input is a Python exception with a message that says what is wrong: never a
crash, a hang or a silent copy."""

import os

import numpy as np
import pytest

import pqcache


@pytest.fixture
def trained(rng):
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    index = pqcache.index_factory(16, "IVF8,PQ4x4fs")
    index.train(x)
    index.add(x)
    return index, x


def raises(exc, match, f, *args, **kwargs):
    with pytest.raises(exc, match=match):
        f(*args, **kwargs)


def test_bad_arrays(trained):
    index, x = trained
    raises(TypeError, "float32 or float16, got dtype float64", index.search, x.astype(np.float64), 1)
    raises(TypeError, "got dtype int32", index.add, x.astype(np.int32))
    raises(TypeError, "got list", index.search, x.tolist(), 1)
    raises(TypeError, "got NoneType", index.train, None)
    raises(ValueError, "C-contiguous", index.search, np.asfortranarray(x[:5]), 1)
    raises(ValueError, "C-contiguous", index.search, x[::2], 1)
    raises(ValueError, r"shape \(n, 16\), got \[2000, 8\]", index.search, np.ascontiguousarray(x[:, :8]), 1)
    raises(ValueError, r"shape \(n, 16\)", index.search, x[0], 1)
    raises(ValueError, r"shape \(n, 16\)", index.add, x.reshape(1, 2000, 16))
    big_endian = x[:3].astype(">f4")
    raises(TypeError, "float32 or float16", index.search, big_endian, 1)


def test_non_finite_values_are_named_by_row_and_column(trained):
    index, x = trained
    q = x[:4].copy()
    q[2, 5] = np.nan
    raises(ValueError, "row 2, column 5", index.search, q, 1)
    y = x[:10].copy()
    y[7, 0] = np.inf
    raises(ValueError, "row 7, column 0", index.add, y)
    flat16 = pqcache.IndexFlat(16, dtype="float16")
    raises(ValueError, "f16 range", flat16.add, x[:3] * 1e6)


def test_bad_k(trained):
    index, x = trained
    raises(ValueError, "k = 0|k", index.search, x[:2], 0)
    raises(ValueError, "k must be >= 0", index.search, x[:2], -3)
    raises(ValueError, "2001|ntotal", index.search, x[:2], 2001)
    raises(ValueError, "empty|no vectors", pqcache.IndexFlatL2(16).search, x[:2], 1)


def test_bad_constructors():
    raises(ValueError, "d must be positive", pqcache.IndexFlat, 0)
    raises(ValueError, "metric 7", pqcache.IndexFlat, 8, 7)
    raises(ValueError, "dtype", pqcache.IndexFlat, 8, dtype="bfloat16")
    raises(ValueError, "divide|multiple", pqcache.IndexPQ, 10, 3, 8)
    raises(ValueError, "nbits|bits", pqcache.IndexPQ, 16, 4, 5)
    raises(ValueError, "4-bit", pqcache.IndexPQFastScan, 16, 4, 8)
    raises(ValueError, "bbs", pqcache.IndexPQFastScan, 16, 4, 4, pqcache.METRIC_L2, 64)
    raises(ValueError, "M must be positive", pqcache.IndexPQFastScan, 16, -1)
    raises(ValueError, "nlist", pqcache.IndexIVFPQFastScan, None, 16, 0, 4)
    raises(ValueError, "nlist|limit|at most", pqcache.IndexIVFPQFastScan, None, 16, 1 << 40, 4)
    raises(OverflowError, "int", pqcache.IndexFlat, 1 << 70)
    raises(TypeError, "IndexFlat", pqcache.IndexIVFPQFastScan, pqcache.IndexPQ(16, 4), 16, 4, 4)
    q = pqcache.IndexFlatL2(8)
    q.add(np.ones((3, 8), np.float32))
    raises(ValueError, "holds 3 vectors", pqcache.IndexIVFPQFastScan, q, 8, 4, 4)
    raises(ValueError, "quantizer has d = 8", pqcache.IndexIVFPQFastScan, pqcache.IndexFlatL2(8), 16, 4, 4)


def test_factory_strings():
    for bad in ["HNSW32", "IVF256,Flat", "PQ", "PQx4fs", "IVFx,PQ8x4fs", "IVF64,PQ8x4fs,RFlat", ""]:
        raises(ValueError, "not an index pqcache builds", pqcache.index_factory, 16, bad)
    raises(ValueError, "4-bit", pqcache.index_factory, 16, "PQ4x8fs")
    assert isinstance(pqcache.index_factory(16, "PQ4"), pqcache.IndexPQ)
    assert isinstance(pqcache.index_factory(16, "PQ4fs"), pqcache.IndexPQFastScan)
    assert isinstance(pqcache.index_factory(16, "Flat", pqcache.METRIC_INNER_PRODUCT), pqcache.IndexFlat)


def test_untrained_and_unsupported(rng):
    x = rng.standard_normal((100, 16)).astype(np.float32)
    raises(RuntimeError, "not trained", pqcache.IndexPQ(16, 4).add, x)
    raises(ValueError, "too few|training points|at least", pqcache.IndexPQ(16, 4, 8).train, x[:10])
    flat = pqcache.IndexFlatL2(16)
    raises(RuntimeError, "add_with_ids is not implemented for a flat index", flat.add_with_ids, x, np.arange(100))
    raises(RuntimeError, "remove_ids is not implemented for a pqfs", pqcache.IndexPQFastScan(16, 4).remove_ids, np.arange(3))
    ivf = pqcache.index_factory(16, "IVF4,PQ4x4fs")
    ivf.train(x)
    raises(ValueError, "3 ids for 100 vectors", ivf.add_with_ids, x, np.arange(3))
    raises(TypeError, "int64, got dtype int32", ivf.add_with_ids, x, np.arange(100, dtype=np.int32))
    raises(ValueError, "1-d", ivf.remove_ids, np.zeros((2, 2), np.int64))
    raises(ValueError, "nprobe must be positive", setattr, ivf, "nprobe", 0)
    raises(ValueError, "nprobe", setattr, ivf, "nprobe", 5)
    ivf.add(x)
    raises(ValueError, "set it before adding", setattr, ivf, "rerank", 4)
    raises(ValueError, "rerank", setattr, pqcache.IndexPQFastScan(16, 4), "rerank", 1 << 30)
    raises(ValueError, "qbs", setattr, pqcache.IndexPQFastScan(16, 4), "qbs", 9)
    raises(AttributeError, "nprobe", getattr, flat, "nprobe")


def test_bad_files(tmp_path, trained):
    index, x = trained
    path = tmp_path / "good.index"
    pqcache.write_index(index, path)
    good = path.read_bytes()
    raises(FileNotFoundError, "missing.index", pqcache.read_index, tmp_path / "missing.index")
    with pytest.raises(OSError):
        pqcache.read_index(tmp_path)
    for name, data in {
        "empty": b"",
        "garbage": os.urandom(4096),
        "truncated": good[: len(good) // 2],
        "header only": good[:256],
    }.items():
        f = tmp_path / name
        f.write_bytes(data)
        for mmap in (True, False):
            with pytest.raises(pqcache.FileFormatError):
                pqcache.read_index(f, mmap=mmap)
    # A flipped byte in the codes: the mapped open checks the small sections, the full read
    # every checksum.
    damaged = bytearray(good)
    damaged[len(good) - 100] ^= 0xFF
    f = tmp_path / "damaged"
    f.write_bytes(bytes(damaged))
    with pytest.raises(pqcache.FileFormatError, match="checksum|crc|corrupt"):
        pqcache.read_index(f, mmap=False)
    with pytest.raises(pqcache.FileFormatError, match="checksum"):
        pqcache.verify_index(f)
    assert pqcache.verify_index(path) == "ivfpqfs"
    assert issubclass(pqcache.FileFormatError, ValueError)
    raises(OSError, "no-such-dir", pqcache.write_index, index, tmp_path / "no-such-dir" / "x.index")
    # An attention file is not an index.
    r = pqcache.AttentionRetriever(1, 2, 1, 8)
    r.prefill(0, np.ones((1, 4, 8), np.float16), np.ones((1, 4, 8), np.float16))
    pqcache.write_attention(r, tmp_path / "attn")
    raises(ValueError, "attention cache", pqcache.read_index, tmp_path / "attn")
    raises(ValueError, "not an attention cache", pqcache.read_attention, path)


def test_attention_errors(rng):
    raises(ValueError, "multiple of kv_heads", pqcache.AttentionRetriever, 1, 3, 2, 8)
    raises(ValueError, "positive", pqcache.AttentionRetriever, 0, 2, 1, 8)
    raises(ValueError, "over the limits", pqcache.AttentionRetriever, 1 << 20, 8, 8, 128)
    raises(ValueError, "budget ratio", pqcache.AttentionRetriever, 1, 2, 1, 8, budget=1.5)
    raises(TypeError, "budget", pqcache.AttentionRetriever, 1, 2, 1, 8, budget="10%")
    raises(ValueError, "scale", pqcache.AttentionRetriever, 1, 2, 1, 8, scale=1e39)
    raises(ValueError, "selector|unknown", pqcache.AttentionRetriever, 1, 2, 1, 8, selector="hnsw")
    raises(ValueError, "aggregation", pqcache.AttentionRetriever, 1, 2, 1, 8, aggregation="mean")
    r = pqcache.AttentionRetriever(2, 4, 2, 8, selector="exact")
    k = rng.standard_normal((2, 50, 8)).astype(np.float16)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    raises(ValueError, "empty|Nothing|no vectors", r.attend, 0, q)
    raises(ValueError, r"shape \(2, t, 8\)", r.prefill, 0, k[:1], k[:1])
    raises(ValueError, "keys hold 50 positions, values 49", r.prefill, 0, k, k[:, :49].copy())
    raises(ValueError, "layer 2 out of range", r.prefill, 2, k, k)
    r.prefill(0, k, k)
    raises(ValueError, r"shape \(4, 8\)", r.attend, 0, q[:3])
    bad = q.copy()
    bad[1, 2] = np.nan
    raises(ValueError, "row 1, column 2", r.attend, 0, bad)
    v = np.ones((2, 8), np.float32)
    v[1, 3] = np.inf
    raises(ValueError, "value", r.append, 0, np.ones((2, 8), np.float16), v)
    raises(ValueError, "f16 range", r.append, 0, np.full((2, 8), 1e6, np.float32), np.ones((2, 8), np.float32))
    raises(ValueError, "layer 9 out of range", r.len, 9)
    raises(ValueError, "out of range", r.kv, 0, 5)
    raises(ValueError, "budget ratio", setattr, r, "budget", 0.0)
