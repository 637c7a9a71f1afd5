//! # pqcache: a SIMD product-quantization retrieval engine for long contexts
//!
//! Maximum-inner-product and L2 search over dense vectors, built for the decoding loop of an
//! LLM: at each step, find the cached keys with the largest inner product with the query.
//!
//! Where things live (follow a vector through its lifecycle):
//!
//! | module | what |
//! |---|---|
//! | [`kmeans`] | k-means (Lloyd, GEMM assignment) for codebooks and coarse quantizers |
//! | [`ivf`] | coarse quantizer of the inverted-file index |
//! | [`pq`] | product quantizer: `train`, `encode`, per-query `lut` |
//! | [`index`] | indexes: [`IndexFlat`] (exact, f32/f16), [`IndexPQ`] (ADC), [`IndexPQFastScan`] (4-bit fast-scan), [`IndexIVFPQFastScan`] (IVF), [`StreamingIndex`] (concurrent add/search/refresh) |
//! | `select` | (internal) top-k selection: `TopK` (heap, reservoir from 48 kept; the one top-k type), large k (quickselect, u16 radix select) |
//! | [`attention`] | the attention client: per layer and kv_head KV cache, selectors, sparse attention ([`AttentionRetriever`]) |
//! | [`io`] | `.npy`, `.fvecs`, `.ivecs` readers; the file container (`io::container`) and the files' facade (`io::file`) |
//! | `cli` | (feature `cli`, default) the `pqcache` command line |
//! | `gpu` | (feature `cuda`) KV cache on the GPU and sparse attention over selected positions |
//! | `pqcache_simd` | the kernels (separate crate), runtime-dispatched scalar / AVX2 / AVX-512 / NEON |
//!
//! The layers, each importing only from those below it (`pqcache_simd` under all of them):
//!
//! ```text
//! cli (feature), gpu (feature), io::file   command line, GPU adapter, the files' facade
//! attention            retriever, selectors, evaluation protocol, attention::persist
//! index                flat, pq, fastscan, ivf, streaming, index::scan (the block loop),
//!                      index::persist (the kinds' file codecs), AnyIndex
//! pq, ivf              quantizers (train, encode, tables), coarse quantizer
//! kmeans, select, linalg
//! error, limits, check, buf, metric, result, io (npy, vecs, dump, container)
//!                      errors, size limits, input validation, arrays, readers, the file
//!                      container (layout, reader, section writer, CRC, atomic save)
//! ```
//!
//! Each kind implements the container's `Persist` beside its type (`index::persist`,
//! `attention::persist`); `io::file` re-exports their entry points and dispatches `verify`
//! by kind, the one module that names them all.
//!
//! ```
//! use pqcache::{Index, IndexFlat, IndexPQ, Metric, Nbits};
//!
//! let d = 16;
//! // 1,000 pseudo-random vectors.
//! let base: Vec<f32> = (0..1000 * d).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
//! let queries = &base[..5 * d];
//!
//! let mut exact = IndexFlat::new(d, Metric::InnerProduct)?;
//! exact.add(&base)?;
//! let truth = exact.search(queries, 10)?;
//!
//! let mut pq = IndexPQ::new(d, 8, Nbits::Eight, Metric::InnerProduct)?;
//! pq.train(&base)?;
//! pq.add(&base)?;
//! let found = pq.search(queries, 10)?;
//! assert_eq!(found.ids.len(), 5 * 10);
//! println!("recall@10 = {}", found.recall_against(&truth.ids, 10));
//! # Ok::<(), pqcache::Error>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod attention;
pub mod buf;
pub mod check;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod index;
pub mod io;
pub mod ivf;
pub mod kmeans;
pub mod limits;
pub mod linalg;
pub mod metric;
pub mod pq;
pub mod result;
mod select;

pub use attention::selector::{Aggregation, SelectorSpec};
pub use attention::{AttentionRetriever, AttentionShape, Budget, RetrieverConfig, StepPlan};
pub use error::{Error, Result};
/// The f16 type of keys and values (`half::f16`), so callers need not depend on `half`.
pub use half::f16;
pub use index::{
    Index, IndexFlat, IndexIVFPQFastScan, IndexPQ, IndexPQFastScan, RefreshPolicy, RerankStorage,
    StreamingIndex,
};
pub use kmeans::{KMeansConfig, KMeansInit};
pub use metric::Metric;
pub use pq::{Nbits, ProductQuantizer};
pub use pqcache_simd::Level;
pub use result::SearchResult;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
