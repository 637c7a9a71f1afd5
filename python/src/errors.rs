//! pqcache's typed errors as Python exceptions.
//!
//! | `pqcache::Error` | Python |
//! |---|---|
//! | `Io` | `FileNotFoundError` / `PermissionError` / `OSError` (with the path) |
//! | `Format`, `Corrupt`, `Incompatible` | `pqcache.FileFormatError` (a `ValueError`) |
//! | `NotTrained` | `RuntimeError` (as FAISS raises for an untrained index) |
//! | `NoDevice`, `Gpu` | `RuntimeError` |
//! | the rest (dimensions, NaN, k, arguments) | `ValueError` |

use pyo3::exceptions::{
    PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    pqcache,
    FileFormatError,
    PyValueError,
    "An index or data file that is malformed, damaged (a checksum failed) or of a format \
     version this build does not read."
);

/// The Python exception of a pqcache error.
pub fn to_py(e: pqcache::Error) -> PyErr {
    use pqcache::Error as E;
    let msg = e.to_string();
    match e {
        E::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        E::Format { .. } | E::Corrupt { .. } | E::Incompatible { .. } => {
            FileFormatError::new_err(msg)
        }
        E::NotTrained | E::NoDevice(_) | E::Gpu(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// `Result<T, pqcache::Error>` into `PyResult<T>`.
pub trait IntoPy<T> {
    /// Converts the error.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for pqcache::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
