//! `AttentionRetriever`: the attention client for a decode loop, per layer and KV head
//! (GQA-aware): a KV cache in f16, a selector's index over its keys, and sparse attention
//! over sink + window + retrieved positions (`pqcache::AttentionRetriever`).
//!
//! Layouts, as a model produces them (HF transformers' cache tensors with batch 1):
//!
//! | argument | shape | dtype |
//! |---|---|---|
//! | prompt `keys`, `values` | `(kv_heads, t, head_dim)` or `(1, kv_heads, t, head_dim)` | float16 (read in place) or float32 |
//! | prompt `queries` | `(query_heads, t, head_dim)` or `(1, query_heads, t, head_dim)` | float32 / float16 |
//! | step `key`, `value` | `(kv_heads, head_dim)`, `(kv_heads, 1, head_dim)` or `(1, kv_heads, 1, head_dim)` | float16 / float32 |
//! | step `queries` | `(query_heads, head_dim)`, `(query_heads, 1, head_dim)` or `(1, query_heads, 1, head_dim)` | float32 / float16 |
//! | `attend` output | `(query_heads, head_dim)` | float32 |

use crate::arrays::{count, matrix, Floats};
use crate::errors::IntoPy;
use numpy::{PyArray1, PyArray2, PyReadonlyArray1};
use pqcache::attention::DEFAULT_WINDOW;
use pqcache::io::file;
use pqcache::{
    AttentionRetriever as RsRetriever, AttentionShape, Budget, RetrieverConfig, SelectorSpec,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The KV cache of a model's attention layers with retrieval and sparse attention.
///
/// `AttentionRetriever(layers, query_heads, kv_heads, head_dim, budget=0.1, sink=32,
/// window=16, selector=None, aggregation="sum", scale=None, tail_term=True)`: `budget` is a
/// fraction of the context (float in (0, 1]) or a number of positions (int); `selector` a
/// selector name (`"fastscan:64x4"`, `"pq:32x8"`, `"exact"`, `"quest:16"`, ...; None: 4-bit
/// fast-scan with `head_dim / 4` sub-quantizers); `scale` the score scale (None:
/// `1 / sqrt(head_dim)`); `window=None` gives half of what the budget leaves after the sink.
#[pyclass(frozen, module = "pqcache")]
pub struct AttentionRetriever {
    inner: RwLock<RsRetriever>,
}

fn budget_of(obj: &Bound<'_, PyAny>) -> PyResult<Budget> {
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "budget: a float ratio or an int count, not a bool",
        ));
    }
    if obj.is_instance_of::<pyo3::types::PyInt>() {
        let n: i64 = obj.extract()?;
        return Ok(Budget::Tokens(count(n, "budget")?));
    }
    match obj.extract::<f64>() {
        Ok(r) => Ok(Budget::Ratio(r)),
        Err(_) => Err(PyTypeError::new_err(
            "budget: a float ratio in (0, 1] or an int number of positions",
        )),
    }
}

/// `(t)` of a `(heads, t, dim)` or `(1, heads, t, dim)` array.
fn tokens_of(x: &Floats<'_>, heads: usize, d: usize, what: &str) -> PyResult<usize> {
    match x.shape() {
        [h, t, dd] | [1, h, t, dd] if *h == heads && *dd == d => Ok(*t),
        shape => Err(PyValueError::new_err(format!(
            "{what} must have shape ({heads}, t, {d}) or (1, {heads}, t, {d}), got {shape:?}"
        ))),
    }
}

/// Checks a one-token `(heads, dim)`, `(heads, 1, dim)` or `(1, heads, 1, dim)` array.
fn one_token(x: &Floats<'_>, heads: usize, d: usize, what: &str) -> PyResult<()> {
    match x.shape() {
        [h, dd] | [h, 1, dd] | [1, h, 1, dd] if *h == heads && *dd == d => Ok(()),
        shape => Err(PyValueError::new_err(format!(
            "{what} must have shape ({heads}, {d}) (or ({heads}, 1, {d}), (1, {heads}, 1, {d})), \
             got {shape:?}"
        ))),
    }
}

/// A head's keys and values, `(len, head_dim)` float16 each.
type KvArrays<'py> = (
    Bound<'py, PyArray2<pqcache::f16>>,
    Bound<'py, PyArray2<pqcache::f16>>,
);

fn positions_list<'py>(py: Python<'py>, lists: Vec<Vec<u32>>) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, lists.into_iter().map(|p| PyArray1::from_vec(py, p)))
}

fn range_tuple(r: &std::ops::Range<usize>) -> (usize, usize) {
    (r.start, r.end)
}

/// Settings given from Python; `None`: keep what the config has.
struct Options<'a, 'py> {
    budget: Option<&'a Bound<'py, PyAny>>,
    sink: Option<i64>,
    /// `Some(None)`: the window follows the budget.
    window: Option<Option<usize>>,
    selector: Option<&'a str>,
    aggregation: Option<&'a str>,
    scale: Option<f64>,
    tail_term: Option<bool>,
}

impl Options<'_, '_> {
    fn apply(&self, cfg: &mut RetrieverConfig) -> PyResult<()> {
        if let Some(b) = self.budget {
            cfg.budget = budget_of(b)?;
        }
        if let Some(s) = self.sink {
            cfg.sink = count(s, "sink")?;
        }
        if let Some(w) = self.window {
            cfg.window = w;
        }
        if let Some(s) = self.selector {
            cfg.selector = s.parse::<SelectorSpec>().py()?;
        }
        if let Some(a) = self.aggregation {
            cfg.aggregation = a.parse().py()?;
        }
        if let Some(s) = self.scale {
            // f64 -> f32: a value past f32's range becomes infinite and validate() says so.
            cfg.scale = s as f32;
        }
        if let Some(t) = self.tail_term {
            cfg.tail_term = t;
        }
        Ok(())
    }
}

impl AttentionRetriever {
    fn read(&self) -> RwLockReadGuard<'_, RsRetriever> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, RsRetriever> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn shape(&self) -> AttentionShape {
        self.read().config().shape
    }

    /// One decode step of `layer` for `queries` (shape-checked, as f32), run by `f` on the
    /// retriever with the GIL released.
    fn step<T: Send>(
        &self,
        py: Python<'_>,
        layer: i64,
        queries: &Bound<'_, PyAny>,
        f: impl FnOnce(&RsRetriever, usize, &[f32]) -> pqcache::Result<T> + Send,
    ) -> PyResult<T> {
        let layer = count(layer, "layer")?;
        let q = Floats::extract(queries, "queries")?;
        let s = self.shape();
        one_token(&q, s.query_heads, s.head_dim, "queries")?;
        let q = q.to_f32();
        py.detach(|| f(&self.read(), layer, &q)).py()
    }

    /// A step's output, `(query_heads, head_dim)`.
    fn heads_matrix<'py>(
        &self,
        py: Python<'py>,
        out: Vec<f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let s = self.shape();
        matrix(py, out, s.query_heads, s.head_dim)
    }
}

#[pymethods]
impl AttentionRetriever {
    #[new]
    #[pyo3(signature = (layers, query_heads, kv_heads, head_dim, *, budget = None, sink = 32,
        window = Some(DEFAULT_WINDOW as i64), selector = None, aggregation = "sum", scale = None,
        tail_term = true))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        layers: i64,
        query_heads: i64,
        kv_heads: i64,
        head_dim: i64,
        budget: Option<&Bound<'_, PyAny>>,
        sink: i64,
        window: Option<i64>,
        selector: Option<&str>,
        aggregation: &str,
        scale: Option<f64>,
        tail_term: bool,
    ) -> PyResult<AttentionRetriever> {
        let shape = AttentionShape {
            layers: count(layers, "layers")?,
            query_heads: count(query_heads, "query_heads")?,
            kv_heads: count(kv_heads, "kv_heads")?,
            head_dim: count(head_dim, "head_dim")?,
        };
        let mut cfg = RetrieverConfig::new(shape);
        Options {
            budget,
            sink: Some(sink),
            window: Some(window.map(|w| count(w, "window")).transpose()?),
            selector,
            aggregation: Some(aggregation),
            scale,
            tail_term: Some(tail_term),
        }
        .apply(&mut cfg)?;
        Ok(AttentionRetriever {
            inner: RwLock::new(RsRetriever::new(cfg).py()?),
        })
    }

    /// A copy of this cache under other settings (another selector, budget, window...; the
    /// ones not given are kept), its indexes trained anew: one prefill serves several
    /// methods. `window="auto"` lets the window follow the budget.
    #[pyo3(signature = (*, budget = None, sink = None, window = None, selector = None,
        aggregation = None, scale = None, tail_term = None))]
    #[allow(clippy::too_many_arguments)]
    fn fork(
        &self,
        py: Python<'_>,
        budget: Option<&Bound<'_, PyAny>>,
        sink: Option<i64>,
        window: Option<&Bound<'_, PyAny>>,
        selector: Option<&str>,
        aggregation: Option<&str>,
        scale: Option<f64>,
        tail_term: Option<bool>,
    ) -> PyResult<AttentionRetriever> {
        let window = match window {
            None => None,
            Some(w) if w.extract::<&str>().is_ok_and(|s| s == "auto") => Some(None),
            Some(w) => match w.extract::<i64>() {
                Ok(n) => Some(Some(count(n, "window")?)),
                Err(_) => {
                    return Err(PyTypeError::new_err(
                        "window: an int number of positions or \"auto\"",
                    ))
                }
            },
        };
        let mut cfg = self.read().config().clone();
        Options {
            budget,
            sink,
            window,
            selector,
            aggregation,
            scale,
            tail_term,
        }
        .apply(&mut cfg)?;
        let forked = py.detach(|| self.read().fork(cfg)).py()?;
        Ok(AttentionRetriever {
            inner: RwLock::new(forked),
        })
    }

    /// Layers held.
    #[getter]
    fn layers(&self) -> usize {
        self.shape().layers
    }

    /// Query heads per layer.
    #[getter]
    fn query_heads(&self) -> usize {
        self.shape().query_heads
    }

    /// Key/value heads per layer.
    #[getter]
    fn kv_heads(&self) -> usize {
        self.shape().kv_heads
    }

    /// Width of a head.
    #[getter]
    fn head_dim(&self) -> usize {
        self.shape().head_dim
    }

    /// The selector's name (`"fastscan:64x4"`, ...).
    #[getter]
    fn selector(&self) -> String {
        self.read().config().selector.to_string()
    }

    /// Positions attended per step: a float ratio of the context or an int count.
    #[getter]
    fn get_budget(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self.read().config().budget {
            Budget::Ratio(r) => r.into_pyobject(py)?.into_any().unbind(),
            Budget::Tokens(n) => n.into_pyobject(py)?.into_any().unbind(),
        })
    }

    #[setter]
    fn set_budget(&self, budget: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = budget_of(budget)?;
        self.write().set_budget(b).py()
    }

    /// Positions cached in `layer`.
    fn len(&self, layer: i64) -> PyResult<usize> {
        let layer = count(layer, "layer")?;
        let r = self.read();
        if layer >= r.config().shape.layers {
            return Err(PyValueError::new_err(format!(
                "layer {layer} out of range ({} layers)",
                r.config().shape.layers
            )));
        }
        Ok(r.len(layer))
    }

    /// Whether `layer`'s indexes are trained (below the selector's minimum length
    /// selection is exact and nothing is trained).
    fn is_trained(&self, layer: i64) -> PyResult<bool> {
        self.len(layer)?;
        Ok(self.read().is_trained(layer as usize))
    }

    /// A prompt at once: clears `layer`, caches `keys` / `values` and trains the layer's
    /// indexes. `queries` (the prompt's, optional) weigh the fast-scan transform.
    #[pyo3(signature = (layer, keys, values, queries = None))]
    fn prefill(
        &self,
        py: Python<'_>,
        layer: i64,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        queries: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.load(py, layer, keys, values, queries, true)
    }

    /// Appends a chunk of positions to `layer` (as `prefill`, without clearing or
    /// training: call `train(layer)` once the prompt is in).
    #[pyo3(signature = (layer, keys, values, queries = None))]
    fn extend(
        &self,
        py: Python<'_>,
        layer: i64,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        queries: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.load(py, layer, keys, values, queries, false)
    }

    /// Trains `layer`'s indexes on every cached key.
    fn train(&self, py: Python<'_>, layer: i64) -> PyResult<()> {
        let layer = count(layer, "layer")?;
        py.detach(|| self.write().train(layer)).py()
    }

    /// Appends one decoded token's `key` and `value` to `layer`.
    fn append(
        &self,
        py: Python<'_>,
        layer: i64,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let layer = count(layer, "layer")?;
        let s = self.shape();
        let (k, v) = (
            Floats::extract(key, "key")?,
            Floats::extract(value, "value")?,
        );
        one_token(&k, s.kv_heads, s.head_dim, "key")?;
        one_token(&v, s.kv_heads, s.head_dim, "value")?;
        let (k, v) = (k.to_f16("key")?, v.to_f16("value")?);
        py.detach(|| self.write().append(layer, &k, &v)).py()
    }

    /// The positions one step attends to, per kv_head (sorted uint32 arrays): sink, window
    /// and the retrieved ones.
    fn select<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let lists = self.step(py, layer, queries, |r, l, q| r.select(l, q))?;
        positions_list(py, lists)
    }

    /// What exact scoring (the oracle) would choose at this step, under the same plan.
    fn select_oracle<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let lists = self.step(py, layer, queries, |r, l, q| r.select_oracle(l, q))?;
        positions_list(py, lists)
    }

    /// Sparse attention of one step: select, then softmax attention over the chosen
    /// positions (with the tail term when on). Returns `(query_heads, head_dim)` float32.
    fn attend<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let out = self.step(py, layer, queries, |r, l, q| r.attend(l, q))?;
        self.heads_matrix(py, out)
    }

    /// Dense attention over every cached position (the reference `attend` approximates).
    fn attend_all<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let out = self.step(py, layer, queries, |r, l, q| r.attend_all(l, q))?;
        self.heads_matrix(py, out)
    }

    /// Attention over given positions: `positions[kv_head]` a uint32 array (any order).
    fn attend_positions<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        queries: &Bound<'py, PyAny>,
        positions: Vec<PyReadonlyArray1<'py, u32>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let lists: Vec<Vec<u32>> = positions.iter().map(|p| p.as_array().to_vec()).collect();
        let out = self.step(py, layer, queries, |r, l, q| {
            r.attend_positions(l, q, &lists)
        })?;
        self.heads_matrix(py, out)
    }

    /// The plan of `layer`'s next step: `{"len", "sink", "window", "candidates", "k"}`
    /// (ranges as `(start, end)`).
    fn plan<'py>(&self, py: Python<'py>, layer: i64) -> PyResult<Bound<'py, PyDict>> {
        self.len(layer)?;
        let p = self.read().plan(layer as usize);
        let d = PyDict::new(py);
        d.set_item("len", p.len)?;
        d.set_item("sink", range_tuple(&p.sink))?;
        d.set_item("window", range_tuple(&p.window))?;
        d.set_item("candidates", range_tuple(&p.candidates))?;
        d.set_item("k", p.k)?;
        Ok(d)
    }

    /// The cached keys and values of (`layer`, `kv_head`): two `(len, head_dim)` float16
    /// arrays (copies).
    fn kv<'py>(&self, py: Python<'py>, layer: i64, kv_head: i64) -> PyResult<KvArrays<'py>> {
        let (layer, kv_head) = (count(layer, "layer")?, count(kv_head, "kv_head")?);
        let r = self.read();
        let d = r.config().shape.head_dim;
        let (k, v) = r.kv(layer, kv_head).ok_or_else(|| {
            PyValueError::new_err(format!(
                "(layer {layer}, kv_head {kv_head}) out of range ({} layers, {} kv heads)",
                r.config().shape.layers,
                r.config().shape.kv_heads
            ))
        })?;
        let n = k.len() / d;
        Ok((
            matrix(py, k.into_owned(), n, d)?,
            matrix(py, v.into_owned(), n, d)?,
        ))
    }

    fn __repr__(&self) -> String {
        let r = self.read();
        let c = r.config();
        format!(
            "<pqcache.AttentionRetriever layers={} query_heads={} kv_heads={} head_dim={} \
             selector={} budget={:?}>",
            c.shape.layers,
            c.shape.query_heads,
            c.shape.kv_heads,
            c.shape.head_dim,
            c.selector,
            c.budget
        )
    }
}

impl AttentionRetriever {
    fn load(
        &self,
        py: Python<'_>,
        layer: i64,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        queries: Option<&Bound<'_, PyAny>>,
        prefill: bool,
    ) -> PyResult<()> {
        let layer = count(layer, "layer")?;
        let s = self.shape();
        let (k, v) = (
            Floats::extract(keys, "keys")?,
            Floats::extract(values, "values")?,
        );
        let t = tokens_of(&k, s.kv_heads, s.head_dim, "keys")?;
        let tv = tokens_of(&v, s.kv_heads, s.head_dim, "values")?;
        if t != tv {
            return Err(PyValueError::new_err(format!(
                "keys hold {t} positions, values {tv}"
            )));
        }
        let q = queries.map(|q| Floats::extract(q, "queries")).transpose()?;
        if let Some(q) = &q {
            tokens_of(q, s.query_heads, s.head_dim, "queries")?;
        }
        let (k, v) = (k.to_f16("keys")?, v.to_f16("values")?);
        let q = q.as_ref().map(|q| q.to_f32());
        let q: &[f32] = q.as_deref().unwrap_or(&[]);
        py.detach(|| {
            let mut r = self.write();
            if prefill {
                r.prefill(layer, &k, &v, q)
            } else {
                r.extend(layer, &k, &v, q)
            }
        })
        .py()
    }
}

/// Writes an attention cache (keys, values, the selectors' indexes) to `path`.
#[pyfunction]
pub fn write_attention(
    py: Python<'_>,
    retriever: &Bound<'_, AttentionRetriever>,
    path: PathBuf,
) -> PyResult<()> {
    let r = retriever.get();
    py.detach(|| file::save(&*r.read(), &path)).py()
}

/// Reads an attention cache written by `write_attention` (or the CLI / `pqcache-llm
/// prefill`'s attention part). `mmap=True` maps the keys and values (read as attended).
#[pyfunction]
#[pyo3(signature = (path, mmap = true))]
pub fn read_attention(py: Python<'_>, path: PathBuf, mmap: bool) -> PyResult<AttentionRetriever> {
    let r = py
        .detach(|| {
            if mmap {
                file::open_attention(&path)
            } else {
                file::load_attention(&path)
            }
        })
        .py()?;
    Ok(AttentionRetriever {
        inner: RwLock::new(r),
    })
}
