//! numpy in and out.
//!
//! Inputs are read in place: a C-contiguous `float32` array is handed to the engine as the
//! slice numpy holds (no copy); `float16` is read in place where the engine stores f16 (keys
//! and values, an f16 flat index) and widened otherwise. Any other dtype is a `TypeError`, a
//! strided or Fortran-ordered array a `ValueError` naming the fix (`np.ascontiguousarray`):
//! a silent copy would hide a cost, and a silent transpose a wrong answer. Outputs are numpy
//! arrays that take over the engine's buffers (no copy).
//!
//! The GIL is released while the engine reads an input in place: as with FAISS (and numpy's
//! own released-GIL loops), an array that another thread writes during the call gives
//! whatever values it held as they were read.

use numpy::{
    Element, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pqcache::f16;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::borrow::Cow;

/// A float32 or float16 numpy array, borrowed read-only.
pub enum Floats<'py> {
    /// `float32`.
    F32(PyReadonlyArrayDyn<'py, f32>),
    /// `float16`.
    F16(PyReadonlyArrayDyn<'py, f16>),
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A readonly view of `obj` as a C-contiguous `T` array, or `None` when its dtype is not `T`.
fn view<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    let Ok(arr) = obj.cast::<PyArrayDyn<T>>() else {
        return Ok(None);
    };
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous (row-major); pass np.ascontiguousarray({what})"
        )));
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: cannot borrow the array ({e})")))?;
    Ok(Some(ro))
}

fn dtype_error(obj: &Bound<'_, PyAny>, what: &str, expected: &str) -> PyErr {
    match obj.cast::<PyUntypedArray>() {
        Ok(arr) => PyTypeError::new_err(format!(
            "{what} must be a numpy array of {expected}, got dtype {}; convert with \
             {what}.astype(np.float32)",
            arr.dtype()
        )),
        Err(_) => PyTypeError::new_err(format!(
            "{what} must be a numpy array of {expected}, got {}",
            type_name(obj)
        )),
    }
}

impl<'py> Floats<'py> {
    /// `obj` as a float32 / float16 array; `what` names it in errors.
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Floats<'py>> {
        if let Some(a) = view::<f32>(obj, what)? {
            return Ok(Floats::F32(a));
        }
        if let Some(a) = view::<f16>(obj, what)? {
            return Ok(Floats::F16(a));
        }
        Err(dtype_error(obj, what, "float32 or float16"))
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Floats::F32(a) => a.shape(),
            Floats::F16(a) => a.shape(),
        }
    }

    /// The values as f32: the array itself for float32, widened for float16.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Floats::F32(a) => Cow::Borrowed(a.as_slice().expect("checked C-contiguous")),
            Floats::F16(a) => Cow::Owned(
                a.as_slice()
                    .expect("checked C-contiguous")
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
            ),
        }
    }

    /// The values as f16: the array itself for float16; float32 narrowed after checking that
    /// every value is finite and within f16's range (`what` names the input in the error).
    pub fn to_f16(&self, what: &'static str) -> PyResult<Cow<'_, [f16]>> {
        match self {
            Floats::F16(a) => Ok(Cow::Borrowed(a.as_slice().expect("checked C-contiguous"))),
            Floats::F32(a) => {
                let x = a.as_slice().expect("checked C-contiguous");
                let row = self.shape().last().copied().unwrap_or(1).max(1);
                pqcache::index::check_f16_range(x, row, what).map_err(crate::errors::to_py)?;
                Ok(Cow::Owned(x.iter().map(|&v| f16::from_f32(v)).collect()))
            }
        }
    }
}

/// The number of rows of a `(n, d)` array.
pub fn rows(x: &Floats<'_>, d: usize, what: &str) -> PyResult<usize> {
    match x.shape() {
        [n, cols] if *cols == d => Ok(*n),
        shape => Err(PyValueError::new_err(format!(
            "{what} must have shape (n, {d}), got {shape:?}"
        ))),
    }
}

/// A 1-d C-contiguous int64 array of ids.
pub fn id_array<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray1<'py, i64>> {
    let Ok(arr) = obj.cast::<PyArray1<i64>>() else {
        return Err(match obj.cast::<PyUntypedArray>() {
            Ok(a) if a.ndim() != 1 => {
                PyValueError::new_err(format!("{what} must be 1-d, got shape {:?}", a.shape()))
            }
            Ok(a) => PyTypeError::new_err(format!(
                "{what} must be a numpy array of int64, got dtype {}; convert with \
                 {what}.astype(np.int64)",
                a.dtype()
            )),
            Err(_) => PyTypeError::new_err(format!(
                "{what} must be a numpy array of int64, got {}",
                type_name(obj)
            )),
        });
    };
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be contiguous; pass np.ascontiguousarray({what})"
        )));
    }
    arr.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: cannot borrow the array ({e})")))
}

/// The `ids` of `n` vectors: a 1-d int64 array of length `n`.
pub fn ids_for<'py>(obj: &Bound<'py, PyAny>, n: usize) -> PyResult<PyReadonlyArray1<'py, i64>> {
    let ids = id_array(obj, "ids")?;
    if ids.len() != n {
        return Err(PyValueError::new_err(format!(
            "{} ids for {n} vectors",
            ids.len()
        )));
    }
    Ok(ids)
}

/// A 1-d C-contiguous uint8 array (a serialized index).
pub fn byte_array<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray1<'py, u8>> {
    let arr = obj.cast::<PyArray1<u8>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be bytes or a 1-d numpy array of uint8 (serialize_index's output), got {}",
            type_name(obj)
        ))
    })?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be contiguous; pass np.ascontiguousarray({what})"
        )));
    }
    arr.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: cannot borrow the array ({e})")))
}

/// A count from Python (`k`, a size): a `ValueError` for a negative one.
pub fn count(v: i64, what: &str) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} must be >= 0, got {v}")))
}

/// A `(rows, cols)` numpy array owning `v` (no copy).
pub fn matrix<'py, T: Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    PyArray1::from_vec(py, v).reshape([rows, cols])
}

/// `D, I` of a search: distances `(nq, k)` float32 and ids `(nq, k)` int64.
pub type SearchArrays<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

/// A search result as FAISS returns it.
pub fn search_arrays<'py>(
    py: Python<'py>,
    r: pqcache::SearchResult,
) -> PyResult<SearchArrays<'py>> {
    let (nq, k) = (r.nq, r.k);
    Ok((matrix(py, r.distances, nq, k)?, matrix(py, r.ids, nq, k)?))
}
