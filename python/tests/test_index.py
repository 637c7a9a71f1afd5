"""The indexes from Python against the Rust API (the `pqcache` command line on the same files:
bit for bit) and against numpy (exact search)."""

import json

import numpy as np
import pytest

import pqcache

# (CLI arguments of `pqcache build`, the same index from Python, the metric)
KINDS = {
    "flat-ip": (["--index", "flat", "--metric", "ip"], lambda d: pqcache.IndexFlatIP(d)),
    "flat16-l2": (
        ["--index", "flat16", "--metric", "l2"],
        lambda d: pqcache.IndexFlat(d, pqcache.METRIC_L2, dtype="float16"),
    ),
    "pq8-l2": (
        ["--index", "pq", "--m", "16", "--nbits", "8", "--metric", "l2"],
        lambda d: pqcache.IndexPQ(d, 16, 8, pqcache.METRIC_L2),
    ),
    "pqfs-ip": (
        ["--index", "pqfs", "--m", "32", "--metric", "ip"],
        lambda d: pqcache.index_factory(d, "PQ32x4fs", pqcache.METRIC_INNER_PRODUCT),
    ),
    "pqfs-l2-rerank": (
        ["--index", "pqfs", "--m", "16", "--rerank", "8", "--metric", "l2"],
        lambda d: pqcache.IndexPQFastScan(d, 16, 4, pqcache.METRIC_L2),
    ),
    "ivfpqfs-l2-rerank": (
        ["--index", "ivfpqfs", "--nlist", "64", "--nprobe", "8", "--m", "32", "--rerank", "4",
         "--metric", "l2"],
        None,
    ),
    "ivfpqfs-ip": (
        ["--index", "ivfpqfs", "--nlist", "64", "--nprobe", "8", "--m", "32", "--metric", "ip"],
        None,
    ),
}


def python_index(name, d):
    build = KINDS[name][1]
    if build is not None:
        index = build(d)
        if isinstance(index, pqcache.IndexPQFastScan):
            index.qbs = 1  # what `pqcache build` stores (it is in the file)
            if "rerank" in name:
                index.rerank = 8
        return index
    metric = pqcache.METRIC_L2 if "l2" in name else pqcache.METRIC_INNER_PRODUCT
    index = pqcache.IndexIVFPQFastScan(pqcache.IndexFlatL2(d), d, 64, 32, 4, metric)
    index.nprobe = 8
    if "rerank" in name:
        index.rerank = 4  # before add: the originals are kept from the first add
    return index


def cli_search(cli, path, queries, k):
    out = json.loads(cli("search", "--index", path, "--queries", queries, "--k", k, "--json"))
    return np.array(out["distances"], dtype=np.float32), np.array(out["ids"], dtype=np.int64)


def assert_same_file(cli, a, b):
    """The same index in two files: every section byte for byte but the metadata, whose
    drift statistics (f64 sums of quantization errors, added in parallel) may differ in the
    last bits; the metadata's other fields as `pqcache info` reads them."""
    info_a, info_b = (json.loads(cli("info", "--json", f)) for f in (a, b))
    bytes_a, bytes_b = a.read_bytes(), b.read_bytes()
    assert info_a == info_b
    for s in info_a["sections"]:
        if s["name"] != "meta":
            lo, hi = s["offset"], s["offset"] + s["len"]
            assert bytes_a[lo:hi] == bytes_b[lo:hi], s["name"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, bigann):
    xb, xq, _ = bigann
    d = tmp_path_factory.mktemp("vectors")
    np.save(d / "xb.npy", xb)
    np.save(d / "xq.npy", xq)
    return d


@pytest.mark.parametrize("name", list(KINDS))
def test_same_answers_and_same_file_as_the_rust_api(name, cli, files, bigann, tmp_path):
    """Built from Python and built by the CLI with the same settings: the same file, byte for
    byte (same training, codes and lists), and the same search results, bit for bit, whether
    Python builds the index, maps the CLI's file or reads it whole."""
    xb, xq, _ = bigann
    k = 10
    cli_file = tmp_path / "cli.index"
    cli("build", "--base", files / "xb.npy", *KINDS[name][0], "--out", cli_file)
    d_rust, i_rust = cli_search(cli, cli_file, files / "xq.npy", k)

    index = python_index(name, xb.shape[1])
    index.train(xb)
    index.add(xb if "flat16" not in name else xb.astype(np.float16))
    assert index.ntotal == len(xb) and index.is_trained and index.d == 128
    d_py, i_py = index.search(xq, k)
    assert d_py.dtype == np.float32 and i_py.dtype == np.int64 and d_py.shape == (len(xq), k)
    np.testing.assert_array_equal(i_py, i_rust)
    np.testing.assert_array_equal(d_py, d_rust)

    py_file = tmp_path / "py.index"
    pqcache.write_index(index, py_file)
    assert_same_file(cli, py_file, cli_file)

    for mmap in (True, False):
        opened = pqcache.read_index(str(cli_file), mmap=mmap)
        assert type(opened) is type(index) or isinstance(opened, type(index))
        d_f, i_f = opened.search(xq, k)
        np.testing.assert_array_equal(i_f, i_rust)
        np.testing.assert_array_equal(d_f, d_rust)


def test_exact_search_is_numpys_top_k(rng):
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((20, 48)).astype(np.float32)
    for metric in (pqcache.METRIC_INNER_PRODUCT, pqcache.METRIC_L2):
        index = pqcache.IndexFlat(48, metric)
        index.add(x)
        D, I = index.search(q, 7)
        if metric == pqcache.METRIC_INNER_PRODUCT:
            scores = q.astype(np.float64) @ x.T.astype(np.float64)
            want = np.argsort(-scores, axis=1)[:, :7]
            got = np.take_along_axis(scores, I, 1)
        else:
            scores = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
            want = np.argsort(scores, axis=1)[:, :7]
            got = np.take_along_axis(scores, I, 1)
        np.testing.assert_array_equal(I, want)
        np.testing.assert_allclose(D, got, rtol=1e-4, atol=1e-3)


def test_float16_queries_are_widened_exactly(rng):
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q16 = rng.standard_normal((5, 16)).astype(np.float16)
    index = pqcache.IndexFlatIP(16)
    index.add(x)
    D16, I16 = index.search(q16, 5)
    D32, I32 = index.search(q16.astype(np.float32), 5)
    np.testing.assert_array_equal(D16, D32)
    np.testing.assert_array_equal(I16, I32)


def test_read_index_gives_each_kind_its_class(tmp_path, rng):
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    cases = [
        (pqcache.IndexFlatIP(32), pqcache.IndexFlatIP),
        (pqcache.IndexFlatL2(32), pqcache.IndexFlatL2),
        (pqcache.IndexPQ(32, 8, 8), pqcache.IndexPQ),
        (pqcache.IndexPQFastScan(32, 8), pqcache.IndexPQFastScan),
        (pqcache.index_factory(32, "IVF16,PQ8x4fs"), pqcache.IndexIVFPQFastScan),
    ]
    for index, cls in cases:
        index.train(x)
        index.add(x)
        path = tmp_path / f"{cls.__name__}.index"
        pqcache.write_index(index, path)
        back = pqcache.read_index(path, pqcache.IO_FLAG_MMAP)
        assert type(back) is cls, (type(back), cls)
        assert isinstance(back, pqcache.Index)
        assert back.ntotal == 2000 and back.metric_type == index.metric_type
        np.testing.assert_array_equal(back.search(x[:4], 3)[1], index.search(x[:4], 3)[1])


def test_a_mapped_index_takes_more_vectors_like_a_loaded_one(tmp_path, rng):
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    index = pqcache.index_factory(32, "IVF16,PQ16x4fs", pqcache.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x[:2000])
    path = tmp_path / "ivf.index"
    pqcache.write_index(index, path)
    mapped = pqcache.read_index(path)
    loaded = pqcache.read_index(path, mmap=False)
    for i in (mapped, loaded, index):
        i.add(x[2000:])
        i.nprobe = 4
    assert mapped.ntotal == loaded.ntotal == 3000
    want = index.search(x[:10], 5)
    for i in (mapped, loaded):
        got = i.search(x[:10], 5)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_ivf_ids_and_removal(rng):
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    index = pqcache.index_factory(32, "IVF32,PQ16x4fs", pqcache.METRIC_L2)
    index.train(x)
    ids = np.arange(4000, dtype=np.int64) * 10 + 7
    index.add_with_ids(x, ids)
    index.nprobe = 32
    _, I = index.search(x[:50], 1)
    # The query itself is its own nearest neighbour (almost always: 4-bit PQ of 16 2-d
    # sub-vectors): at least 45 of 50, under its given id.
    assert (I[:, 0] == ids[:50]).sum() >= 45
    assert set(I.ravel()) <= set(ids)
    removed = index.remove_ids(ids[:25])
    assert removed == 25 and index.ntotal == 3975
    _, I = index.search(x[:50], 10)
    assert not set(I.ravel()) & set(ids[:25])


def test_reset_keeps_the_training(rng):
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    index = pqcache.IndexPQ(16, 4, 8, pqcache.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    before = index.search(x[:3], 4)
    index.reset()
    assert index.ntotal == 0 and index.is_trained
    index.add(x)
    after = index.search(x[:3], 4)
    np.testing.assert_array_equal(before[1], after[1])


def test_a_trained_quantizer_is_used_as_the_coarse_centroids(rng):
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    centroids = x[rng.choice(3000, 8, replace=False)]
    quantizer = pqcache.IndexFlatL2(16)
    quantizer.add(centroids)
    index = pqcache.IndexIVFPQFastScan(quantizer, 16, 8, 8)
    index.train(x)
    index.add(x)
    index.nprobe = 1
    # With nprobe 1 a vector is only found in its own cell: the centroids given decide the
    # cell, so every vector's cell is its nearest given centroid and it finds itself.
    _, I = index.search(x[:100], 1)
    assert (I[:, 0] == np.arange(100)).mean() > 0.8


def test_serialize_and_pickle_give_the_file_bytes_back(tmp_path, rng):
    import pickle

    x = rng.standard_normal((1500, 32)).astype(np.float32)
    for index in (
        pqcache.IndexFlatIP(32),
        pqcache.IndexPQ(32, 8, 6, pqcache.METRIC_L2),
        pqcache.IndexPQFastScan(32, 16),
        pqcache.index_factory(32, "IVF8,PQ16x4fs", pqcache.METRIC_INNER_PRODUCT),
    ):
        index.train(x)
        index.add(x)
        path = tmp_path / "i.index"
        pqcache.write_index(index, path)
        data = pqcache.serialize_index(index)
        assert data.dtype == np.uint8 and data.tobytes() == path.read_bytes()
        want = index.search(x[:8], 5)
        for back in (
            pqcache.deserialize_index(data),
            pqcache.deserialize_index(data.tobytes()),
            pickle.loads(pickle.dumps(index)),
        ):
            assert type(back) is type(index)
            got = back.search(x[:8], 5)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    bad = data.copy()
    bad[-200] ^= 1
    with pytest.raises(pqcache.FileFormatError, match="checksum"):
        pqcache.deserialize_index(bad)
    with pytest.raises(TypeError, match="uint8"):
        pqcache.deserialize_index(data.astype(np.int16))
    with pytest.raises(pqcache.FileFormatError):
        pqcache.deserialize_index(b"")


def test_remove_ids_on_positional_indexes_moves_later_vectors_down(rng):
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    for index in (pqcache.IndexFlatL2(16), pqcache.IndexPQ(16, 4, 8, pqcache.METRIC_L2)):
        index.train(x)
        index.add(x)
        assert index.remove_ids(np.arange(0, 1000, 2, dtype=np.int64)) == 500
        assert index.ntotal == 500
        # Vector 2j+1 is now at position j.
        _, I = index.search(np.ascontiguousarray(x[1::2][:50]), 1)
        assert (I[:, 0] == np.arange(50)).mean() > 0.9
