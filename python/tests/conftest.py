"""Shared fixtures: the repository's bundled data, the `pqcache` command line (the Rust API's
answers to compare with), random data."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "data"


def read_fvecs(path):
    """An .fvecs file as an (n, d) float32 array."""
    raw = np.fromfile(path, dtype=np.int32)
    d = int(raw[0])
    return raw.reshape(-1, d + 1)[:, 1:].view(np.float32).copy()


def read_ivecs(path):
    raw = np.fromfile(path, dtype=np.int32)
    d = int(raw[0])
    return raw.reshape(-1, d + 1)[:, 1:].copy()


@pytest.fixture(scope="session")
def bigann():
    """The bundled ANN sample: 10,000 SIFT base vectors (128-d), 100 queries, 100 true
    neighbours each (L2)."""
    base = DATA / "ann"
    xb = read_fvecs(base / "bigann-10k-128_base.fvecs")
    xq = read_fvecs(base / "bigann-10k-128_query.fvecs")
    gt = read_ivecs(base / "bigann-10k-128_groundtruth.ivecs")
    return xb, xq, gt


@pytest.fixture(scope="session")
def gemma_layer():
    """Real attention data: Gemma-3-270M layer 5 over 2,048 tokens of Persuasion (post-RoPE
    f16 queries (4 heads), keys and values (1 kv head), head_dim 256)."""
    d = DATA / "persuasion-2048-layer5"
    meta = json.loads((d / "meta.json").read_text())
    q = np.load(d / "q.npy")[0]  # (4, 2048, 256) float16
    k = np.load(d / "k.npy")[0]  # (1, 2048, 256)
    v = np.load(d / "v.npy")[0]
    return q, k, v, float(meta["attn_scale"])


@pytest.fixture(scope="session")
def cli():
    """Runs the `pqcache` command line (the Rust API); returns its stdout. The binary is
    $PQCACHE_BIN or target/release/pqcache (built by `cargo build --release`)."""
    path = pathlib.Path(os.environ.get("PQCACHE_BIN", REPO / "target" / "release" / "pqcache"))
    if not path.exists():
        pytest.fail(f"{path} not found: run `cargo build --release` first (or set PQCACHE_BIN)")

    def run(*args):
        out = subprocess.run([str(path), *map(str, args)], capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"pqcache {' '.join(map(str, args))}: {out.stderr}")
        return out.stdout

    return run


@pytest.fixture
def rng():
    return np.random.default_rng(20261201)


def clustered(rng, n, d, centers=64, spread=0.3):
    """n points around `centers` Gaussian centres: data with structure for PQ and IVF."""
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)
