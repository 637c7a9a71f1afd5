//! `StreamingIndex`: an `IndexIVFPQFastScan` shared by many threads, with codebook refresh.
//! Searches and adds go on while a refresh re-trains on a snapshot in the background; the
//! operations made meanwhile are replayed onto the refreshed index before it is swapped in,
//! so nothing added or removed is lost (`pqcache::StreamingIndex`).

use crate::arrays::{count, id_array, ids_for, rows, search_arrays, Floats, SearchArrays};
use crate::errors::IntoPy;
use crate::index::{drift_dict, Index, IndexIVFPQFastScan};
use numpy::PyArray1;
use pqcache::io::file::AnyIndex;
use pqcache::{IndexIVFPQFastScan as RsIvf, RefreshPolicy, StreamingIndex as RsStreaming};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// A concurrent IVF fast-scan index with codebook refresh.
///
/// `StreamingIndex(index)` takes a copy of a trained `IndexIVFPQFastScan` (empty, or keeping
/// its original vectors: a refresh re-encodes from them; an empty one starts keeping them). `add` gives ids
/// continuing from the largest so far; `refresh()` re-trains the codebooks on the current
/// vectors (`refresh_in_background()` does it on a thread); `set_policy(drift_threshold,
/// min_added)` refreshes by itself once the quantization error of the vectors added since
/// training drifts past the threshold.
#[pyclass(frozen, module = "pqcache")]
pub struct StreamingIndex {
    inner: RsStreaming<RsIvf>,
    background: Mutex<Option<JoinHandle<pqcache::Result<()>>>>,
}

#[pymethods]
impl StreamingIndex {
    #[new]
    fn py_new(index: &Bound<'_, Index>) -> PyResult<StreamingIndex> {
        let AnyIndex::IvfPqFastScan(ivf) = &*index.get().read() else {
            return Err(PyTypeError::new_err(
                "StreamingIndex takes an IndexIVFPQFastScan",
            ));
        };
        if !pqcache::Index::is_trained(ivf) {
            return Err(PyValueError::new_err(
                "StreamingIndex takes a trained index: call train() first",
            ));
        }
        let mut ivf = ivf.clone();
        if ivf.originals_storage().is_none() {
            // A refresh re-encodes every vector from its original: kept from here on.
            if pqcache::Index::ntotal(&ivf) > 0 {
                return Err(PyValueError::new_err(
                    "a StreamingIndex refreshes from the original vectors: start it from an \
                     index without vectors (or one that keeps them: rerank set before adding)",
                ));
            }
            ivf.keep_originals(pqcache::RerankStorage::F32).py()?;
        }
        Ok(StreamingIndex {
            inner: RsStreaming::new(ivf),
            background: Mutex::new(None),
        })
    }

    /// Vector dimension.
    #[getter]
    fn d(&self) -> usize {
        self.inner.with(pqcache::Index::dim)
    }

    /// Number of indexed vectors.
    #[getter]
    fn ntotal(&self) -> usize {
        self.inner.ntotal()
    }

    /// Adds `x` (`(n, d)`); returns the ids given (int64, continuing from the largest).
    fn add<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let x = Floats::extract(x, "x")?;
        rows(&x, self.d(), "x")?;
        let x = x.to_f32();
        let given = py.detach(|| self.inner.add_auto(&x)).py()?;
        Ok(PyArray1::from_vec(py, given))
    }

    /// Adds `x` (`(n, d)`) under the given ids (`(n,)` int64).
    fn add_with_ids(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        ids: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let x = Floats::extract(x, "x")?;
        let n = rows(&x, self.d(), "x")?;
        let ids = ids_for(ids, n)?;
        let id_slice = ids.as_slice().expect("checked contiguous");
        let x = x.to_f32();
        py.detach(|| self.inner.add_with_ids(&x, id_slice)).py()
    }

    /// Removes the vectors with these ids; returns how many were removed.
    fn remove_ids(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<usize> {
        let ids = id_array(ids, "ids")?;
        let id_slice = ids.as_slice().expect("checked contiguous");
        Ok(py.detach(|| self.inner.remove_ids(id_slice)))
    }

    /// `(D, I)` of the `k` best vectors per query, as `Index.search`.
    fn search<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        k: i64,
    ) -> PyResult<SearchArrays<'py>> {
        let x = Floats::extract(x, "x")?;
        rows(&x, self.d(), "x")?;
        let k = count(k, "k")?;
        let q = x.to_f32();
        let r = py.detach(|| self.inner.search(&q, k)).py()?;
        search_arrays(py, r)
    }

    /// Lists scanned per query (set on the current index; a refresh keeps it).
    #[getter]
    fn get_nprobe(&self) -> usize {
        self.inner.with(|i| i.nprobe)
    }

    /// Re-trains the codebooks on the current vectors, now (blocks; the GIL is released and
    /// searches from other threads go on).
    fn refresh(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.refresh()).py()
    }

    /// Starts a refresh on a background thread; `False` if one is already running.
    fn refresh_in_background(&self) -> bool {
        let mut slot = self.background.lock().unwrap_or_else(|e| e.into_inner());
        match self.inner.refresh_in_background() {
            Some(handle) => {
                *slot = Some(handle);
                true
            }
            None => false,
        }
    }

    /// Waits for the background refresh started by `refresh_in_background` (if any) and
    /// raises its error.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(handle) = handle else {
            return Ok(());
        };
        match py.detach(|| handle.join()) {
            Ok(r) => r.py(),
            Err(_) => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "the background refresh panicked",
            )),
        }
    }

    /// Whether a refresh is running.
    #[getter]
    fn is_refreshing(&self) -> bool {
        self.inner.is_refreshing()
    }

    /// Refreshes completed.
    #[getter]
    fn refreshes(&self) -> usize {
        self.inner.refreshes()
    }

    /// Refresh by itself once `drift()["ratio"]` passes `drift_threshold` with at least
    /// `min_added` vectors added since training; `set_policy(None)` turns it off.
    #[pyo3(signature = (drift_threshold = Some(1.25), min_added = 4096))]
    fn set_policy(&self, drift_threshold: Option<f64>, min_added: i64) -> PyResult<()> {
        let min_added = count(min_added, "min_added")?;
        let policy = match drift_threshold {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(RefreshPolicy {
                drift_threshold: t,
                min_added,
            }),
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "drift_threshold must be positive and finite, got {t}"
                )))
            }
        };
        self.inner.set_policy(policy);
        Ok(())
    }

    /// Quantization drift since the last training (see `IndexIVFPQFastScan.drift`).
    fn drift<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        drift_dict(py, self.inner.drift())
    }

    /// A copy of the current index (an `IndexIVFPQFastScan`, e.g. to `write_index`).
    fn snapshot(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ivf = py.detach(|| self.inner.snapshot());
        let obj = Index::into_py_object(py, AnyIndex::IvfPqFastScan(ivf))?;
        debug_assert!(obj.bind(py).is_instance_of::<IndexIVFPQFastScan>());
        Ok(obj)
    }

    fn __repr__(&self) -> String {
        format!(
            "<pqcache.StreamingIndex d={} ntotal={} refreshes={}>",
            self.d(),
            self.ntotal(),
            self.refreshes()
        )
    }
}
