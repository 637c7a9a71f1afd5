"""Type stubs of pqcache (the extension module pqcache._pqcache)."""

import os
from typing import Optional, Union

from typing_extensions import Self, disjoint_base, final

import numpy as np
import numpy.typing as npt

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

__version__: str
METRIC_INNER_PRODUCT: int
METRIC_L2: int
IO_FLAG_MMAP: int

_Floats = Union[npt.NDArray[np.float32], npt.NDArray[np.float16]]
"""C-contiguous float32 (read in place) or float16 arrays; anything else raises."""
_Ids = npt.NDArray[np.int64]
_PathLike = Union[str, "os.PathLike[str]"]

class FileFormatError(ValueError):
    """A malformed, damaged or unsupported index file."""

@disjoint_base
class Index:
    """The base of every index: FAISS's operations."""

    @property
    def d(self) -> int: ...
    @property
    def ntotal(self) -> int: ...
    @property
    def is_trained(self) -> bool: ...
    @property
    def metric_type(self) -> int: ...
    def train(self, x: _Floats) -> None:
        """Trains on x (n, d); a no-op for an exact index."""
    def add(self, x: _Floats) -> None:
        """Adds x (n, d); ids continue from ntotal."""
    def add_with_ids(self, x: _Floats, ids: _Ids) -> None:
        """Adds x under the given int64 ids (IndexIVFPQFastScan)."""
    def remove_ids(self, ids: _Ids) -> int:
        """Removes the vectors with these ids; returns how many. IndexFlat and IndexPQ move
        later vectors down (ids are positions); IndexIVFPQFastScan keeps the others' ids."""
    def search(
        self, x: _Floats, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(D, I), both (nq, k): inner products or squared L2 distances, and ids. k must be
        between 1 and ntotal."""
    def reset(self) -> None:
        """Removes every vector; keeps the training."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]: ...

class IndexFlat(Index):
    """Exact search; dtype="float16" stores the vectors in half precision."""
    def __new__(cls, d: int, metric: int = ..., dtype: str = "float32") -> Self: ...

@final
class IndexFlatIP(IndexFlat):
    def __new__(cls, d: int, dtype: str = "float32") -> Self: ...

@final
class IndexFlatL2(IndexFlat):
    def __new__(cls, d: int, dtype: str = "float32") -> Self: ...

@final
class IndexPQ(Index):
    """Product quantization with float-table ADC: M sub-quantizers of nbits (4, 6, 8)."""
    def __new__(cls, d: int, M: int, nbits: int = 8, metric: int = ...) -> Self: ...

@final
class IndexPQFastScan(Index):
    """4-bit fast-scan PQ."""
    def __new__(cls, d: int, M: int, nbits: int = 4, metric: int = ..., bbs: int = 32
    ) -> Self: ...
    rerank: int
    """Re-rank the best k * rerank candidates exactly (0 or 1: none); set before adding."""
    qbs: int
    """Queries scanned together (1 to 4)."""
    @property
    def M(self) -> int: ...

@final
class IndexIVFPQFastScan(Index):
    """IVF over 4-bit fast-scan lists."""
    def __new__(cls,
        quantizer: Optional[IndexFlat],
        d: int,
        nlist: int,
        M: int,
        nbits: int = 4,
        metric: int = ...,
        bbs: int = 32,
    ) -> Self: ...
    nprobe: int
    """Lists scanned per query (1 to nlist)."""
    rerank: int
    """Re-rank the best k * rerank candidates exactly (0 or 1: none); set before adding."""
    @property
    def nlist(self) -> int: ...
    def drift(self) -> dict[str, float]:
        """{"train_mse", "added_sq_err", "added", "ratio"}."""

@final
class StreamingIndex:
    """An IndexIVFPQFastScan shared by threads, with codebook refresh."""
    def __new__(cls, index: IndexIVFPQFastScan) -> Self: ...
    @property
    def d(self) -> int: ...
    @property
    def ntotal(self) -> int: ...
    @property
    def nprobe(self) -> int: ...
    @property
    def is_refreshing(self) -> bool: ...
    @property
    def refreshes(self) -> int: ...
    def add(self, x: _Floats) -> _Ids: ...
    def add_with_ids(self, x: _Floats, ids: _Ids) -> None: ...
    def remove_ids(self, ids: _Ids) -> int: ...
    def search(
        self, x: _Floats, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def refresh(self) -> None: ...
    def refresh_in_background(self) -> bool: ...
    def wait(self) -> None: ...
    def set_policy(
        self, drift_threshold: Optional[float] = ..., min_added: int = 4096
    ) -> None: ...
    def drift(self) -> dict[str, float]: ...
    def snapshot(self) -> IndexIVFPQFastScan: ...

_Positions = npt.NDArray[np.uint32]

@final
class AttentionRetriever:
    """The KV cache of a model's attention layers, with retrieval and sparse attention.

    Layouts: prompt keys / values (kv_heads, t, head_dim) or (1, kv_heads, t, head_dim);
    prompt queries (query_heads, t, head_dim); a step's key / value (kv_heads, head_dim) and
    queries (query_heads, head_dim) (a (…, 1, head_dim) token axis and a batch of 1 are
    accepted too).
    """
    def __new__(cls,
        layers: int,
        query_heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        budget: Union[float, int, None] = None,
        sink: int = 32,
        window: Optional[int] = ...,
        selector: Optional[str] = None,
        aggregation: str = "sum",
        scale: Optional[float] = None,
        tail_term: bool = True,
    ) -> Self: ...
    def fork(
        self,
        *,
        budget: Union[float, int, None] = None,
        sink: Optional[int] = None,
        window: Union[int, str, None] = None,
        selector: Optional[str] = None,
        aggregation: Optional[str] = None,
        scale: Optional[float] = None,
        tail_term: Optional[bool] = None,
    ) -> "AttentionRetriever":
        """A copy of the cache under other settings (those not given are kept)."""
    @property
    def layers(self) -> int: ...
    @property
    def query_heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def selector(self) -> str: ...
    budget: Union[float, int]
    def len(self, layer: int) -> int: ...
    def is_trained(self, layer: int) -> bool: ...
    def prefill(
        self, layer: int, keys: _Floats, values: _Floats, queries: Optional[_Floats] = None
    ) -> None: ...
    def extend(
        self, layer: int, keys: _Floats, values: _Floats, queries: Optional[_Floats] = None
    ) -> None: ...
    def train(self, layer: int) -> None: ...
    def append(self, layer: int, key: _Floats, value: _Floats) -> None: ...
    def select(self, layer: int, queries: _Floats) -> list[_Positions]: ...
    def select_oracle(self, layer: int, queries: _Floats) -> list[_Positions]: ...
    def attend(self, layer: int, queries: _Floats) -> npt.NDArray[np.float32]: ...
    def attend_all(self, layer: int, queries: _Floats) -> npt.NDArray[np.float32]: ...
    def attend_positions(
        self, layer: int, queries: _Floats, positions: list[_Positions]
    ) -> npt.NDArray[np.float32]: ...
    def plan(self, layer: int) -> dict[str, object]: ...
    def kv(
        self, layer: int, kv_head: int
    ) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.float16]]: ...

def index_factory(d: int, description: str, metric: int = ...) -> Index:
    """Flat, PQ{M}, PQ{M}x{4,6,8}, PQ{M}x4fs, IVF{nlist},PQ{M}x4fs."""

def write_index(index: Index, path: _PathLike) -> None: ...
def read_index(
    path: _PathLike, io_flags: Optional[int] = None, mmap: Optional[bool] = None
) -> Index: ...
def verify_index(path: _PathLike) -> str: ...
def serialize_index(index: Index) -> npt.NDArray[np.uint8]: ...
def deserialize_index(data: Union[bytes, npt.NDArray[np.uint8]]) -> Index: ...
def write_attention(retriever: AttentionRetriever, path: _PathLike) -> None: ...
def read_attention(path: _PathLike, mmap: bool = True) -> AttentionRetriever: ...
def simd_level() -> str: ...
