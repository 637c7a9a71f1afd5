//! The indexes, FAISS-shaped: `Index` (the base: `d`, `ntotal`, `is_trained`, `train`, `add`,
//! `add_with_ids`, `remove_ids`, `search`, `reset`) and its subclasses `IndexFlat`
//! (`IndexFlatIP`, `IndexFlatL2`), `IndexPQ`, `IndexPQFastScan`, `IndexIVFPQFastScan`;
//! `index_factory`, `write_index`, `read_index`.
//!
//! Every object holds one `pqcache::io::file::AnyIndex` behind a read-write lock. A call
//! borrows its numpy input, releases the GIL, then takes the lock: searches share it (two
//! Python threads search in parallel), `train` / `add` / `remove_ids` / `reset` take it alone.

use crate::arrays::{count, id_array, ids_for, rows, search_arrays, Floats, SearchArrays};
use crate::errors::IntoPy;
use pqcache::index::flat::FlatStorage;
use pqcache::io::file::{self, AnyIndex, IndexKind};
use pqcache::{
    Index as _, IndexFlat as RsFlat, IndexIVFPQFastScan as RsIvf, IndexPQ as RsPq,
    IndexPQFastScan as RsFastScan, Metric, Nbits, RerankStorage,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::PyClassInitializer;
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// FAISS's `METRIC_INNER_PRODUCT`.
pub const METRIC_INNER_PRODUCT: i64 = 0;
/// FAISS's `METRIC_L2`.
pub const METRIC_L2: i64 = 1;
/// FAISS's `IO_FLAG_MMAP` (`read_index(path, IO_FLAG_MMAP)`).
pub const IO_FLAG_MMAP: i64 = 0x646f_0008;
/// The fast-scan block size (FAISS's `bbs`): 32 codes per block.
const BBS: i64 = 32;

/// A metric from FAISS's constants.
pub fn metric_of(m: i64) -> PyResult<Metric> {
    match m {
        METRIC_INNER_PRODUCT => Ok(Metric::InnerProduct),
        METRIC_L2 => Ok(Metric::L2),
        other => Err(PyValueError::new_err(format!(
            "metric {other} is not one pqcache supports (METRIC_INNER_PRODUCT = 0, METRIC_L2 = 1)"
        ))),
    }
}

fn metric_code(m: Metric) -> i64 {
    match m {
        Metric::InnerProduct => METRIC_INNER_PRODUCT,
        Metric::L2 => METRIC_L2,
    }
}

fn positive(v: i64, what: &str) -> PyResult<usize> {
    match usize::try_from(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(PyValueError::new_err(format!(
            "{what} must be positive, got {v}"
        ))),
    }
}

fn check_bbs(bbs: i64) -> PyResult<()> {
    if bbs != BBS {
        return Err(PyValueError::new_err(format!(
            "bbs = {bbs}: pqcache's fast-scan blocks hold 32 codes (bbs = 32)"
        )));
    }
    Ok(())
}

/// The base class: what every index does.
#[pyclass(subclass, frozen, module = "pqcache")]
pub struct Index {
    inner: RwLock<AnyIndex>,
}

impl Index {
    pub(crate) fn new(index: AnyIndex) -> Index {
        Index {
            inner: RwLock::new(index),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, AnyIndex> {
        // A panic while writing cannot leave an index half-changed in a way a reader could
        // misread (every mutation validates first), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, AnyIndex> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn dim(&self) -> usize {
        self.read().dim()
    }

    /// The Python object of the right class for `index`.
    pub(crate) fn into_py_object(py: Python<'_>, index: AnyIndex) -> PyResult<Py<PyAny>> {
        let flat_kind = match &index {
            AnyIndex::Flat(f) => Some(f.metric()),
            _ => None,
        };
        let kind = index.kind();
        let base = PyClassInitializer::from(Index::new(index));
        Ok(match kind {
            IndexKind::Flat => {
                let flat = base.add_subclass(IndexFlat);
                match flat_kind {
                    Some(Metric::InnerProduct) => {
                        Py::new(py, flat.add_subclass(IndexFlatIP))?.into_any()
                    }
                    _ => Py::new(py, flat.add_subclass(IndexFlatL2))?.into_any(),
                }
            }
            IndexKind::Pq => Py::new(py, base.add_subclass(IndexPQ))?.into_any(),
            IndexKind::PqFastScan => Py::new(py, base.add_subclass(IndexPQFastScan))?.into_any(),
            IndexKind::IvfPqFastScan => {
                Py::new(py, base.add_subclass(IndexIVFPQFastScan))?.into_any()
            }
            other => {
                return Err(PyTypeError::new_err(format!(
                    "a {} file is not an index",
                    other.name()
                )))
            }
        })
    }
}

#[pymethods]
impl Index {
    /// Vector dimension.
    #[getter]
    fn d(&self) -> usize {
        self.dim()
    }

    /// Number of indexed vectors.
    #[getter]
    fn ntotal(&self) -> usize {
        self.read().ntotal()
    }

    /// Whether the index can take vectors (`train` has run, or the index needs none).
    #[getter]
    fn is_trained(&self) -> bool {
        self.read().is_trained()
    }

    /// `METRIC_INNER_PRODUCT` (0) or `METRIC_L2` (1).
    #[getter]
    fn metric_type(&self) -> i64 {
        metric_code(self.read().metric())
    }

    /// Trains on `x` (`(n, d)` float32 / float16). A no-op for an exact index.
    fn train(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let x = Floats::extract(x, "x")?;
        rows(&x, self.dim(), "x")?;
        let x = x.to_f32();
        py.detach(|| self.write().train(&x)).py()
    }

    /// Adds `x` (`(n, d)`); ids continue from `ntotal`.
    fn add(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let x = Floats::extract(x, "x")?;
        rows(&x, self.dim(), "x")?;
        if let Floats::F16(h) = &x {
            // An f16 flat index stores what it is given: no widening.
            let halves = h.as_slice().expect("checked C-contiguous");
            let done = py.detach(|| match &mut *self.write() {
                AnyIndex::Flat(f) if matches!(f.storage(), FlatStorage::F16(_)) => {
                    Some(f.add_f16(halves))
                }
                _ => None,
            });
            if let Some(r) = done {
                return r.py();
            }
        }
        let x = x.to_f32();
        py.detach(|| self.write().add(&x)).py()
    }

    /// Adds `x` (`(n, d)`) under the given ids (`(n,)` int64). `IndexIVFPQFastScan` only,
    /// as FAISS's non-IVF indexes (which need an `IndexIDMap` there).
    fn add_with_ids(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        ids: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let x = Floats::extract(x, "x")?;
        let n = rows(&x, self.dim(), "x")?;
        let ids = ids_for(ids, n)?;
        let id_slice = ids.as_slice().expect("checked contiguous");
        let x = x.to_f32();
        py.detach(|| match &mut *self.write() {
            AnyIndex::IvfPqFastScan(ivf) => Ok(ivf.add_with_ids(&x, id_slice)),
            other => Err(other.kind()),
        })
        .map_err(|kind| not_implemented("add_with_ids", kind))?
        .py()
    }

    /// Removes the vectors with these ids (`(n,)` int64); returns how many were removed.
    /// `IndexIVFPQFastScan` keeps the other ids; `IndexFlat` and `IndexPQ` move later
    /// vectors down (their ids are positions), as FAISS's do; `IndexPQFastScan` has none.
    fn remove_ids(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<usize> {
        let ids = id_array(ids, "ids")?;
        let id_slice = ids.as_slice().expect("checked contiguous");
        py.detach(|| match &mut *self.write() {
            AnyIndex::IvfPqFastScan(ivf) => Ok(ivf.remove_ids(id_slice)),
            AnyIndex::Flat(flat) => Ok(flat.remove_ids(id_slice)),
            AnyIndex::Pq(pq) => Ok(pq.remove_ids(id_slice)),
            other => Err(other.kind()),
        })
        .map_err(|kind| not_implemented("remove_ids", kind))
    }

    /// The `k` nearest vectors of each query of `x` (`(nq, d)`): `(D, I)`, both `(nq, k)`
    /// (distances float32: inner products for METRIC_INNER_PRODUCT, squared L2 for
    /// METRIC_L2; ids int64, -1 where fewer than `k` were found). `k` must be between 1 and
    /// `ntotal` (FAISS pads a larger `k` with -1; pqcache says so instead).
    fn search<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        k: i64,
    ) -> PyResult<SearchArrays<'py>> {
        let x = Floats::extract(x, "x")?;
        rows(&x, self.dim(), "x")?;
        let k = count(k, "k")?;
        let q = x.to_f32();
        let r = py.detach(|| self.read().search(&q, k)).py()?;
        search_arrays(py, r)
    }

    /// Removes every vector; keeps the training.
    fn reset(&self, py: Python<'_>) {
        py.detach(|| self.write().reset())
    }

    /// Pickling: the index file's bytes (`serialize_index`), read back by
    /// `deserialize_index`.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let this = slf.get();
        let bytes = py.detach(|| file::to_bytes(&*this.read())).py()?;
        let unpickle = py.import("pqcache")?.getattr("_unpickle_index")?;
        Ok((unpickle, (PyBytes::new(py, &bytes),)))
    }

    fn __repr__(&self) -> String {
        let g = self.read();
        format!(
            "<pqcache.{} d={} ntotal={} metric={}>",
            class_name(&g),
            g.dim(),
            g.ntotal(),
            g.metric()
        )
    }
}

fn class_name(index: &AnyIndex) -> &'static str {
    match index {
        AnyIndex::Flat(_) => "IndexFlat",
        AnyIndex::Pq(_) => "IndexPQ",
        AnyIndex::PqFastScan(_) => "IndexPQFastScan",
        AnyIndex::IvfPqFastScan(_) => "IndexIVFPQFastScan",
    }
}

fn not_implemented(what: &str, kind: IndexKind) -> PyErr {
    PyRuntimeError::new_err(format!(
        "{what} is not implemented for a {} index: IndexIVFPQFastScan and StreamingIndex keep \
         ids of their own (remove_ids also works on IndexFlat and IndexPQ)",
        kind.name()
    ))
}

/// Exact search. `dtype="float16"` stores the vectors in half precision (half the memory;
/// scores widened on the fly), as a KV cache holds its keys.
#[pyclass(extends = Index, subclass, frozen, module = "pqcache")]
pub struct IndexFlat;

#[pymethods]
impl IndexFlat {
    #[new]
    #[pyo3(signature = (d, metric = METRIC_L2, dtype = "float32"))]
    fn py_new(d: i64, metric: i64, dtype: &str) -> PyResult<PyClassInitializer<IndexFlat>> {
        let d = positive(d, "d")?;
        let metric = metric_of(metric)?;
        let flat = match dtype {
            "float32" => RsFlat::new(d, metric),
            "float16" => RsFlat::new_f16(d, metric),
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype {other:?}: float32 or float16"
                )))
            }
        }
        .py()?;
        Ok(PyClassInitializer::from(Index::new(AnyIndex::Flat(flat))).add_subclass(IndexFlat))
    }
}

/// Exact inner-product search (`IndexFlat(d, METRIC_INNER_PRODUCT)`).
#[pyclass(extends = IndexFlat, frozen, module = "pqcache")]
pub struct IndexFlatIP;

#[pymethods]
impl IndexFlatIP {
    #[new]
    #[pyo3(signature = (d, dtype = "float32"))]
    fn py_new(d: i64, dtype: &str) -> PyResult<PyClassInitializer<IndexFlatIP>> {
        Ok(IndexFlat::py_new(d, METRIC_INNER_PRODUCT, dtype)?.add_subclass(IndexFlatIP))
    }
}

/// Exact L2 search (`IndexFlat(d, METRIC_L2)`).
#[pyclass(extends = IndexFlat, frozen, module = "pqcache")]
pub struct IndexFlatL2;

#[pymethods]
impl IndexFlatL2 {
    #[new]
    #[pyo3(signature = (d, dtype = "float32"))]
    fn py_new(d: i64, dtype: &str) -> PyResult<PyClassInitializer<IndexFlatL2>> {
        Ok(IndexFlat::py_new(d, METRIC_L2, dtype)?.add_subclass(IndexFlatL2))
    }
}

/// Product quantization with float-table ADC: `M` sub-quantizers of `nbits` (4, 6 or 8).
#[pyclass(extends = Index, frozen, module = "pqcache")]
pub struct IndexPQ;

#[pymethods]
impl IndexPQ {
    #[new]
    #[pyo3(signature = (d, M, nbits = 8, metric = METRIC_L2))]
    #[allow(non_snake_case)]
    fn py_new(d: i64, M: i64, nbits: i64, metric: i64) -> PyResult<PyClassInitializer<IndexPQ>> {
        let index = pq_index(d, M, nbits, metric)?;
        Ok(PyClassInitializer::from(Index::new(index)).add_subclass(IndexPQ))
    }
}

fn pq_index(d: i64, m: i64, nbits: i64, metric: i64) -> PyResult<AnyIndex> {
    let (d, m) = (positive(d, "d")?, positive(m, "M")?);
    let nbits = Nbits::from_bits(count(nbits, "nbits")?).py()?;
    Ok(AnyIndex::Pq(
        RsPq::new(d, m, nbits, metric_of(metric)?).py()?,
    ))
}

/// Sets the re-ranking factor of a fast-scan index: the best `k * factor` candidates are
/// scored again exactly. The originals are kept from the first `add`, so a factor above 1
/// must be set while the index is empty (or already keeps them).
fn set_rerank(index: &mut AnyIndex, factor: usize) -> PyResult<()> {
    let check = |keeps: bool, ntotal: usize| -> PyResult<bool> {
        if factor > 1 && !keeps && ntotal > 0 {
            return Err(PyValueError::new_err(
                "rerank needs the original vectors, kept from the first add: set it before \
                 adding (this index holds vectors without them)",
            ));
        }
        Ok(factor > 1 && !keeps)
    };
    pqcache::limits::at_most(factor, pqcache::limits::MAX_RERANK_FACTOR, "rerank").py()?;
    match index {
        AnyIndex::PqFastScan(fs) => {
            if check(fs.originals().is_some(), fs.ntotal())? {
                fs.keep_originals(RerankStorage::F32).py()?;
            }
            fs.rerank_factor = factor;
        }
        AnyIndex::IvfPqFastScan(ivf) => {
            if check(ivf.originals_storage().is_some(), ivf.ntotal())? {
                ivf.keep_originals(RerankStorage::F32).py()?;
            }
            ivf.rerank_factor = factor;
        }
        _ => return Err(PyTypeError::new_err("rerank is a fast-scan index setting")),
    }
    Ok(())
}

fn rerank_of(index: &AnyIndex) -> usize {
    match index {
        AnyIndex::PqFastScan(fs) => fs.rerank_factor,
        AnyIndex::IvfPqFastScan(ivf) => ivf.rerank_factor,
        _ => 0,
    }
}

/// 4-bit fast-scan PQ: `M` sub-quantizers of 16 centroids, codes scanned 32 at a time with
/// in-register lookup tables. `rerank = F` re-scores the best `k * F` exactly.
#[pyclass(extends = Index, frozen, module = "pqcache")]
pub struct IndexPQFastScan;

#[pymethods]
impl IndexPQFastScan {
    #[new]
    #[pyo3(signature = (d, M, nbits = 4, metric = METRIC_L2, bbs = 32))]
    #[allow(non_snake_case)]
    fn py_new(
        d: i64,
        M: i64,
        nbits: i64,
        metric: i64,
        bbs: i64,
    ) -> PyResult<PyClassInitializer<IndexPQFastScan>> {
        let index = fastscan_index(d, M, nbits, metric, bbs)?;
        Ok(PyClassInitializer::from(Index::new(index)).add_subclass(IndexPQFastScan))
    }

    /// Candidates re-ranked exactly per result (`k * rerank`; 0 or 1: none).
    #[getter]
    fn get_rerank(slf: &Bound<'_, Self>) -> usize {
        rerank_of(&slf.as_super().get().read())
    }

    #[setter]
    fn set_rerank(slf: &Bound<'_, Self>, factor: i64) -> PyResult<()> {
        set_rerank(&mut slf.as_super().get().write(), count(factor, "rerank")?)
    }

    /// Queries scanned together (1 to 4: each code block read once per group).
    #[getter]
    fn get_qbs(slf: &Bound<'_, Self>) -> usize {
        match &*slf.as_super().get().read() {
            AnyIndex::PqFastScan(fs) => fs.qbs,
            _ => 0,
        }
    }

    #[setter]
    fn set_qbs(slf: &Bound<'_, Self>, qbs: i64) -> PyResult<()> {
        let max = pqcache_simd::fastscan::MAX_QBS;
        match usize::try_from(qbs) {
            Ok(q) if (1..=max).contains(&q) => {
                if let AnyIndex::PqFastScan(fs) = &mut *slf.as_super().get().write() {
                    fs.qbs = q;
                }
                Ok(())
            }
            _ => Err(PyValueError::new_err(format!(
                "qbs must be between 1 and {max}, got {qbs}"
            ))),
        }
    }

    /// Sub-quantizers.
    #[getter]
    #[allow(non_snake_case)]
    fn M(slf: &Bound<'_, Self>) -> usize {
        match &*slf.as_super().get().read() {
            AnyIndex::PqFastScan(fs) => fs.pq().m(),
            _ => 0,
        }
    }
}

fn fastscan_index(d: i64, m: i64, nbits: i64, metric: i64, bbs: i64) -> PyResult<AnyIndex> {
    check_bbs(bbs)?;
    check_nbits4(nbits)?;
    let (d, m) = (positive(d, "d")?, positive(m, "M")?);
    Ok(AnyIndex::PqFastScan(
        RsFastScan::new(d, m, metric_of(metric)?).py()?,
    ))
}

fn check_nbits4(nbits: i64) -> PyResult<()> {
    if nbits != 4 {
        return Err(PyValueError::new_err(format!(
            "nbits = {nbits}: fast-scan codes are 4-bit"
        )));
    }
    Ok(())
}

/// IVF over 4-bit fast-scan lists: `nlist` coarse cells, `nprobe` of them scanned per query.
/// The `quantizer` is FAISS's argument: an empty `IndexFlat` (the coarse centroids are
/// trained by `train`) or one holding exactly `nlist` centroids (used as they are).
#[pyclass(extends = Index, frozen, module = "pqcache")]
pub struct IndexIVFPQFastScan;

#[pymethods]
impl IndexIVFPQFastScan {
    #[new]
    #[pyo3(signature = (quantizer, d, nlist, M, nbits = 4, metric = METRIC_L2, bbs = 32))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn py_new(
        py: Python<'_>,
        quantizer: Option<&Bound<'_, Index>>,
        d: i64,
        nlist: i64,
        M: i64,
        nbits: i64,
        metric: i64,
        bbs: i64,
    ) -> PyResult<PyClassInitializer<IndexIVFPQFastScan>> {
        let index = ivf_index(py, quantizer, d, nlist, M, nbits, metric, bbs)?;
        Ok(PyClassInitializer::from(Index::new(index)).add_subclass(IndexIVFPQFastScan))
    }

    /// Lists scanned per query.
    #[getter]
    fn get_nprobe(slf: &Bound<'_, Self>) -> usize {
        match &*slf.as_super().get().read() {
            AnyIndex::IvfPqFastScan(ivf) => ivf.nprobe,
            _ => 0,
        }
    }

    #[setter]
    fn set_nprobe(slf: &Bound<'_, Self>, nprobe: i64) -> PyResult<()> {
        let nprobe = positive(nprobe, "nprobe")?;
        if let AnyIndex::IvfPqFastScan(ivf) = &mut *slf.as_super().get().write() {
            pqcache::limits::at_most(nprobe, ivf.nlist(), "nprobe").py()?;
            ivf.nprobe = nprobe;
        }
        Ok(())
    }

    /// Coarse cells.
    #[getter]
    fn nlist(slf: &Bound<'_, Self>) -> usize {
        match &*slf.as_super().get().read() {
            AnyIndex::IvfPqFastScan(ivf) => ivf.nlist(),
            _ => 0,
        }
    }

    /// Candidates re-ranked exactly per result (`k * rerank`; 0 or 1: none).
    #[getter]
    fn get_rerank(slf: &Bound<'_, Self>) -> usize {
        rerank_of(&slf.as_super().get().read())
    }

    #[setter]
    fn set_rerank(slf: &Bound<'_, Self>, factor: i64) -> PyResult<()> {
        set_rerank(&mut slf.as_super().get().write(), count(factor, "rerank")?)
    }

    /// Quantization drift since training: `{"train_mse", "added_sq_err", "added", "ratio"}`
    /// (ratio: mean error of the vectors added since, relative to the training error).
    fn drift<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let stats = match &*slf.as_super().get().read() {
            AnyIndex::IvfPqFastScan(ivf) => ivf.drift(),
            _ => Default::default(),
        };
        drift_dict(slf.py(), stats)
    }
}

pub(crate) fn drift_dict(
    py: Python<'_>,
    s: pqcache::index::ivf::DriftStats,
) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("train_mse", s.train_mse)?;
    d.set_item("added_sq_err", s.added_sq_err)?;
    d.set_item("added", s.added)?;
    d.set_item("ratio", s.ratio())?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn ivf_index(
    py: Python<'_>,
    quantizer: Option<&Bound<'_, Index>>,
    d: i64,
    nlist: i64,
    m: i64,
    nbits: i64,
    metric: i64,
    bbs: i64,
) -> PyResult<AnyIndex> {
    check_bbs(bbs)?;
    check_nbits4(nbits)?;
    let (d, nlist, m) = (
        positive(d, "d")?,
        positive(nlist, "nlist")?,
        positive(m, "M")?,
    );
    let metric = metric_of(metric)?;
    let mut ivf = RsIvf::new(d, nlist, m, metric).py()?;
    if let Some(q) = quantizer {
        let q = q.get().read();
        let AnyIndex::Flat(flat) = &*q else {
            return Err(PyTypeError::new_err(
                "the quantizer must be an IndexFlat (IndexFlatL2 / IndexFlatIP)",
            ));
        };
        if flat.dim() != d {
            return Err(PyValueError::new_err(format!(
                "the quantizer has d = {}, the index d = {d}",
                flat.dim()
            )));
        }
        match flat.ntotal() {
            0 => {}
            n if n == nlist => {
                let mut centroids = vec![0f32; n * d];
                for (i, row) in centroids.chunks_exact_mut(d).enumerate() {
                    flat.storage().row_into(i, row);
                }
                let coarse =
                    pqcache::ivf::CoarseQuantizer::from_centroids(d, nlist, metric, centroids)
                        .py()?;
                let pq = ivf.pq().clone();
                ivf = py
                    .detach(|| RsIvf::with_quantizers(coarse, pq, metric, metric == Metric::L2))
                    .py()?;
            }
            n => {
                return Err(PyValueError::new_err(format!(
                    "the quantizer holds {n} vectors: 0 (trained by train()) or nlist = {nlist} \
                     centroids"
                )))
            }
        }
    }
    Ok(AnyIndex::IvfPqFastScan(ivf))
}

/// An index from a FAISS factory string: `Flat`, `PQ{M}` / `PQ{M}x{4,6,8}`, `PQ{M}x4fs`,
/// `IVF{nlist},PQ{M}x4fs` (`fs` may stand for `x4fs`).
#[pyfunction]
#[pyo3(signature = (d, description, metric = METRIC_L2))]
pub fn index_factory(
    py: Python<'_>,
    d: i64,
    description: &str,
    metric: i64,
) -> PyResult<Py<PyAny>> {
    let index = factory(d, description, metric)?;
    Index::into_py_object(py, index)
}

fn factory(d: i64, description: &str, metric: i64) -> PyResult<AnyIndex> {
    let unsupported = || {
        PyValueError::new_err(format!(
            "index_factory: {description:?} is not an index pqcache builds; it builds Flat, \
             PQ{{M}}, PQ{{M}}x{{4,6,8}}, PQ{{M}}x4fs and IVF{{nlist}},PQ{{M}}x4fs (re-ranking: \
             set index.rerank = F instead of ,RFlat)"
        ))
    };
    let parts: Vec<&str> = description.split(',').map(str::trim).collect();
    // `PQ{M}`, `PQ{M}x{b}`, `PQ{M}fs`, `PQ{M}x4fs`: (M, bits, fast-scan).
    let pq_part = |s: &str| -> Option<(i64, i64, bool)> {
        let rest = s.strip_prefix("PQ")?;
        let (rest, fs) = match rest.strip_suffix("fs") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (m, bits) = match rest.split_once('x') {
            Some((m, b)) => (m.parse().ok()?, b.parse().ok()?),
            None => (rest.parse().ok()?, if fs { 4 } else { 8 }),
        };
        Some((m, bits, fs))
    };
    match parts.as_slice() {
        ["Flat"] => {
            let flat = RsFlat::new(positive(d, "d")?, metric_of(metric)?).py()?;
            Ok(AnyIndex::Flat(flat))
        }
        [pq] => match pq_part(pq).ok_or_else(unsupported)? {
            (m, bits, false) => pq_index(d, m, bits, metric),
            (m, bits, true) => fastscan_index(d, m, bits, metric, BBS),
        },
        [ivf, pq] => {
            let nlist: i64 = ivf
                .strip_prefix("IVF")
                .and_then(|n| n.parse().ok())
                .ok_or_else(unsupported)?;
            match pq_part(pq).ok_or_else(unsupported)? {
                (m, bits, true) => {
                    Python::attach(|py| ivf_index(py, None, d, nlist, m, bits, metric, BBS))
                }
                _ => Err(unsupported()),
            }
        }
        _ => Err(unsupported()),
    }
}

/// Writes `index` to `path` (replaced atomically: a failed write leaves the old file).
#[pyfunction]
pub fn write_index(py: Python<'_>, index: &Bound<'_, Index>, path: PathBuf) -> PyResult<()> {
    let index = index.get();
    py.detach(|| file::save(&*index.read(), &path)).py()
}

/// Reads an index file. `mmap=True` (the default) maps it: opening reads only the header and
/// checks the small sections' checksums, and the vectors are read from the page cache as
/// searched (an index larger than memory still answers; `verify_index` checks the rest).
/// `mmap=False` reads it whole and checks every checksum. FAISS's `read_index(path, IO_FLAG_MMAP)` also maps.
#[pyfunction]
#[pyo3(signature = (path, io_flags = None, mmap = None))]
pub fn read_index(
    py: Python<'_>,
    path: PathBuf,
    io_flags: Option<i64>,
    mmap: Option<bool>,
) -> PyResult<Py<PyAny>> {
    let mmap = mmap.unwrap_or(match io_flags {
        Some(f) => f & IO_FLAG_MMAP == IO_FLAG_MMAP,
        None => true,
    });
    let index = py
        .detach(|| {
            if mmap {
                file::open(&path)
            } else {
                let bytes =
                    pqcache::io::read_regular(&path).map_err(|e| pqcache::Error::io(&path, e))?;
                file::verify_bytes(&bytes)?;
                file::load_bytes(&bytes)
            }
        })
        .py()?;
    Index::into_py_object(py, index)
}

/// Checks every checksum and invariant of an index or attention file; returns its kind
/// (`"flat"`, `"pq"`, `"pqfs"`, `"ivfpqfs"`, `"attention"`, `"context"`) or raises
/// `FileFormatError` naming the damaged section.
#[pyfunction]
pub fn verify_index(py: Python<'_>, path: PathBuf) -> PyResult<&'static str> {
    let info = py.detach(|| file::verify(&path)).py()?;
    Ok(info.kind.name())
}

/// The bytes of `index`'s file, as a uint8 numpy array (FAISS's `serialize_index`).
#[pyfunction]
pub fn serialize_index<'py>(
    py: Python<'py>,
    index: &Bound<'py, Index>,
) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
    let index = index.get();
    let bytes = py.detach(|| file::to_bytes(&*index.read())).py()?;
    Ok(numpy::PyArray1::from_vec(py, bytes))
}

/// An index from the bytes `serialize_index` gave (a uint8 numpy array, or `bytes`); every
/// checksum is checked.
#[pyfunction]
pub fn deserialize_index(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let index = if let Ok(b) = data.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        py.detach(|| file::verify_bytes(bytes).and_then(|_| file::load_bytes(bytes)))
    } else {
        let arr = crate::arrays::byte_array(data, "data")?;
        let bytes = arr.as_slice().expect("checked contiguous");
        py.detach(|| file::verify_bytes(bytes).and_then(|_| file::load_bytes(bytes)))
    }
    .py()?;
    Index::into_py_object(py, index)
}
