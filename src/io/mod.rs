//! Readers for vector data files: NumPy `.npy` (f32, f16, f64, i64; C order) and the
//! `.fvecs` / `.ivecs` formats of the TEXMEX ANN benchmarks. Index and attention files are in
//! [`file`](mod@file) (the facade) over [`container`] (the layout); every file is opened through
//! [`open_regular`].

/// Owned or mapped arrays (on the bottom floor; re-exported here where they were).
pub use crate::buf;
pub mod container;
pub mod dump;
pub mod file;
pub mod npy;
pub mod vecs;

use crate::error::{Error, Result};
use half::f16;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Opens `path` for reading, refusing what is not a regular file: a folder (mapping one
/// fails with "No such device"), a device or a pipe (reading `/dev/zero` never ends).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = File::open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let (io_kind, what) = if kind.is_dir() {
        (std::io::ErrorKind::IsADirectory, "a folder")
    } else {
        (std::io::ErrorKind::InvalidInput, "a device, pipe or socket")
    };
    Err(std::io::Error::new(
        io_kind,
        format!("is {what}, not a regular file"),
    ))
}

/// The bytes of the regular file `path` (see [`open_regular`]).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A dense row-major matrix of f32 (`rows * dim`).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Row length.
    pub dim: usize,
    /// `rows * dim` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The first `n` rows (all of them if `n >= rows`).
    pub fn head(&self, n: usize) -> &[f32] {
        &self.data[..n.min(self.rows) * self.dim]
    }
}

/// Loads a matrix of vectors from `.npy`, `.fvecs` or `.ivecs`, as f32.
///
/// A 2-d `.npy` is taken as is. A 4-d `.npy` (`[layer, head, token, dim]`, as the attention
/// dumps are laid out) yields the `(layer, head)` slice, as `faiss_bench.py` does.
pub fn load_vectors(path: &Path, layer: usize, head: usize) -> Result<Matrix> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".fvecs") {
        let (rows, dim, data) = vecs::read_fvecs(path)?;
        return Ok(Matrix { rows, dim, data });
    }
    if name.ends_with(".ivecs") {
        let (rows, dim, data) = vecs::read_ivecs(path)?;
        let data = data.into_iter().map(|x| x as f32).collect();
        return Ok(Matrix { rows, dim, data });
    }
    if name.ends_with(".npy") {
        let arr = npy::read(path)?;
        let (rows, dim, offset) = match arr.shape.as_slice() {
            [r, d] => (*r, *d, 0),
            [nl, nh, t, d] => {
                if layer >= *nl || head >= *nh {
                    return Err(Error::InvalidArgument(format!(
                        "{}: layer {layer} / head {head} out of range for shape {:?}",
                        path.display(),
                        arr.shape
                    )));
                }
                (*t, *d, (layer * nh + head) * t * d)
            }
            other => {
                return Err(Error::format(
                    path,
                    format!("expected a 2-d or 4-d array, found shape {other:?}"),
                ))
            }
        };
        let data = arr.data.to_f32_range(offset, rows * dim);
        return Ok(Matrix { rows, dim, data });
    }
    Err(Error::format(
        path,
        "unknown extension (expected .npy, .fvecs or .ivecs)",
    ))
}

/// Loads a ground-truth file (`.ivecs`, or a 2-d integer `.npy`) as `(rows, k, ids)`.
pub fn load_groundtruth(path: &Path) -> Result<(usize, usize, Vec<i64>)> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".ivecs") {
        let (rows, k, data) = vecs::read_ivecs(path)?;
        return Ok((rows, k, data.into_iter().map(i64::from).collect()));
    }
    if name.ends_with(".npy") {
        let arr = npy::read(path)?;
        if let ([rows, k], npy::NpyData::I64(v)) = (arr.shape.as_slice(), &arr.data) {
            return Ok((*rows, *k, v.clone()));
        }
        return Err(Error::format(
            path,
            "ground truth must be a 2-d int64 array",
        ));
    }
    Err(Error::format(path, "ground truth must be .ivecs or .npy"))
}

/// Converts f16 values to f32.
pub fn f16_to_f32(x: &[f16]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    widen_f16(x, &mut out);
    out
}

/// Widens `x` into `out` (same length): F16C instructions where the CPU has them (detected at
/// run time by `half`), else exact software conversion; the same values either way.
pub fn widen_f16(x: &[f16], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    x.convert_to_f32_slice(out);
}
