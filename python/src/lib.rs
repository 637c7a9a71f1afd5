//! `pqcache._pqcache`: the Python extension module (PyO3). `python/pqcache/__init__.py`
//! re-exports it; `python/pqcache/__init__.pyi` types it.
//!
//! | module | what |
//! |---|---|
//! | `arrays` | numpy in (read in place, typed errors) and out (buffers handed over) |
//! | `errors` | `pqcache::Error` as Python exceptions |
//! | `index` | FAISS-shaped indexes, `index_factory`, `write_index` / `read_index` |
//! | `streaming` | `StreamingIndex`: add / remove / search / refresh from many threads |
//! | `attention` | `AttentionRetriever`: the decode loop's KV cache and sparse attention |

#![deny(unsafe_code)]

mod arrays;
mod attention;
mod errors;
mod index;
mod streaming;

use pyo3::prelude::*;

#[pymodule]
fn _pqcache(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("METRIC_INNER_PRODUCT", index::METRIC_INNER_PRODUCT)?;
    m.add("METRIC_L2", index::METRIC_L2)?;
    m.add("IO_FLAG_MMAP", index::IO_FLAG_MMAP)?;
    m.add(
        "FileFormatError",
        m.py().get_type::<errors::FileFormatError>(),
    )?;
    m.add_class::<index::Index>()?;
    m.add_class::<index::IndexFlat>()?;
    m.add_class::<index::IndexFlatIP>()?;
    m.add_class::<index::IndexFlatL2>()?;
    m.add_class::<index::IndexPQ>()?;
    m.add_class::<index::IndexPQFastScan>()?;
    m.add_class::<index::IndexIVFPQFastScan>()?;
    m.add_class::<streaming::StreamingIndex>()?;
    m.add_class::<attention::AttentionRetriever>()?;
    m.add_function(wrap_pyfunction!(index::index_factory, m)?)?;
    m.add_function(wrap_pyfunction!(index::write_index, m)?)?;
    m.add_function(wrap_pyfunction!(index::read_index, m)?)?;
    m.add_function(wrap_pyfunction!(index::verify_index, m)?)?;
    m.add_function(wrap_pyfunction!(index::serialize_index, m)?)?;
    m.add_function(wrap_pyfunction!(index::deserialize_index, m)?)?;
    m.add_function(wrap_pyfunction!(attention::write_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention::read_attention, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}

/// The SIMD kernels this machine runs: "scalar", "v3" (AVX2), "v4" (AVX-512) or "neon"
/// (`PQCACHE_SIMD_LEVEL` caps it).
#[pyfunction]
fn simd_level() -> String {
    format!("{:?}", pqcache::Level::best()).to_lowercase()
}
