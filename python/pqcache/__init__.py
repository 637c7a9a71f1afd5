"""pqcache: SIMD product-quantization retrieval for long contexts, with FAISS's Python shape.

Code written for FAISS ports by changing the import::

    import pqcache as faiss

    index = faiss.index_factory(d, "IVF256,PQ32x4fs", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    index.nprobe = 16
    D, I = index.search(xq, 10)
    faiss.write_index(index, "base.index")
    index = faiss.read_index("base.index")          # memory-mapped (zero-copy)

Inputs are C-contiguous float32 (read in place) or float16 numpy arrays; anything else is a
TypeError or ValueError that names the fix. The GIL is released while training, adding and
searching, so Python threads search in parallel.

The attention client, for a decode loop (per layer and KV head, GQA-aware)::

    r = pqcache.AttentionRetriever(layers, query_heads, kv_heads, head_dim, budget=0.1)
    r.prefill(layer, keys, values, queries)      # (kv_heads, t, head_dim) float16 ...
    r.append(layer, key, value)                  # one decoded token, (kv_heads, head_dim)
    out = r.attend(layer, q)                     # (query_heads, head_dim) sparse attention

Differences from FAISS: ``search`` with ``k > ntotal`` (or an empty index) raises ValueError
instead of padding with -1; re-ranking is the ``rerank`` setting of the fast-scan indexes
(``index.rerank = 4``) rather than an ``IndexRefineFlat`` wrapper; ``add_with_ids`` is an
IVF and StreamingIndex operation (``remove_ids`` also works on IndexFlat and IndexPQ, whose
ids are positions).
"""

from ._pqcache import (
    IO_FLAG_MMAP,
    METRIC_INNER_PRODUCT,
    METRIC_L2,
    AttentionRetriever,
    FileFormatError,
    Index,
    IndexFlat,
    IndexFlatIP,
    IndexFlatL2,
    IndexIVFPQFastScan,
    IndexPQ,
    IndexPQFastScan,
    StreamingIndex,
    __version__,
    deserialize_index,
    index_factory,
    read_attention,
    read_index,
    serialize_index,
    simd_level,
    verify_index,
    write_attention,
    write_index,
)

__all__ = [
    "IO_FLAG_MMAP",
    "METRIC_INNER_PRODUCT",
    "METRIC_L2",
    "AttentionRetriever",
    "FileFormatError",
    "Index",
    "IndexFlat",
    "IndexFlatIP",
    "IndexFlatL2",
    "IndexIVFPQFastScan",
    "IndexPQ",
    "IndexPQFastScan",
    "StreamingIndex",
    "__version__",
    "deserialize_index",
    "index_factory",
    "read_attention",
    "read_index",
    "serialize_index",
    "simd_level",
    "verify_index",
    "write_attention",
    "write_index",
]


def _unpickle_index(data: bytes) -> Index:
    """What pickle calls to rebuild an index (`Index.__reduce__`)."""
    return deserialize_index(data)
