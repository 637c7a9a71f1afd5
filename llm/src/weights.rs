//! Model weights from a GGUF file: each matrix a [`Linear`] over candle's quantized matmul.
//!
//! [`Precision::Quantized`] keeps the file's blocks (Q4_K, Q5_0, Q6_K, Q8_0, ...) and multiplies
//! with candle's `QMatMul`, which quantizes the activations to 8 bits per block first, as
//! llama.cpp does: the fast path, memory-bound at decode. [`Precision::F32`] dequantizes every
//! matrix at load (4 bytes a weight) and multiplies in f32: the arithmetic of the numpy
//! reference (`../shared/tools/qkdump/gemma3_qk.py`), for checking the forward pass to f16
//! rounding.

use crate::error::{LlmError, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// How matrices are stored and multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Both: the file's blocks for a few rows at a time (decode: memory-bound, reads 1/6 of
    /// the f32 bytes) and an f32 copy for batches (prefill: GEMM, 5-15x faster than
    /// candle's quantized batch kernels here). About 1.3 GB for Gemma-3-270M.
    #[default]
    Mixed,
    /// The file's quantized blocks only; activations quantized to 8 bits per block
    /// (llama.cpp's scheme). Least memory, slow batches.
    Quantized,
    /// Dequantized to f32 at load; f32 activations (the reference's arithmetic) for every
    /// batch size.
    F32,
}

/// Rows from which a [`Precision::Mixed`] product takes the f32 copy.
pub const BATCH_ROWS: usize = 8;

impl std::str::FromStr for Precision {
    type Err = LlmError;
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "mixed" => Ok(Precision::Mixed),
            "q" | "quantized" => Ok(Precision::Quantized),
            "f32" => Ok(Precision::F32),
            other => Err(LlmError::InvalidArgument(format!(
                "precision {other:?}: mixed, quantized or f32"
            ))),
        }
    }
}

/// `y = x W^T` for a `[out, in]` weight.
pub struct Linear {
    /// For few rows.
    w: QMatMul,
    /// For batches of [`BATCH_ROWS`] or more (`Mixed`).
    batch: Option<QMatMul>,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
}

impl Linear {
    fn new(t: Arc<QTensor>, precision: Precision) -> Result<Linear> {
        let (out_dim, in_dim) = t.shape().dims2()?;
        let dense = || -> Result<QMatMul> { Ok(QMatMul::Tensor(t.dequantize(&Device::Cpu)?)) };
        let (w, batch) = match precision {
            Precision::Quantized => (QMatMul::from_arc(t.clone())?, None),
            Precision::Mixed => (QMatMul::from_arc(t.clone())?, Some(dense()?)),
            Precision::F32 => (dense()?, None),
        };
        Ok(Linear {
            w,
            batch,
            in_dim,
            out_dim,
        })
    }

    /// `x` is `rows * in_dim` row-major; returns `rows * out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let t = Tensor::from_slice(x, (rows, self.in_dim), &Device::Cpu)?;
        let w = match &self.batch {
            Some(b) if rows >= BATCH_ROWS => b,
            _ => &self.w,
        };
        Ok(w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The tensors of a GGUF file, read on demand.
pub struct GgufFile {
    /// Metadata and tensor table.
    pub content: Content,
    file: File,
    path: std::path::PathBuf,
}

impl GgufFile {
    /// Opens and parses the header and tensor table (no tensor data read yet).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let content = Content::read(&mut file).map_err(|e| LlmError::Gguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(GgufFile {
            content,
            file,
            path: path.to_path_buf(),
        })
    }

    /// The tensor `name`, checked against the expected shape (`[rows, cols]` or `[len]`).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Arc<QTensor>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LlmError::Gguf {
                path: self.path.clone(),
                reason: format!("no tensor {name}"),
            })?;
        if info.shape.dims() != shape {
            return Err(LlmError::Gguf {
                path: self.path.clone(),
                reason: format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    info.shape.dims()
                ),
            });
        }
        let t = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| LlmError::Gguf {
                path: self.path.clone(),
                reason: format!("{name}: {e}"),
            })?;
        Ok(Arc::new(t))
    }

    /// A matrix `[out, in]` as a [`Linear`].
    pub fn linear(&mut self, name: &str, out: usize, inp: usize, p: Precision) -> Result<Linear> {
        Linear::new(self.tensor(name, &[out, inp])?, p)
    }

    /// A vector of `len` f32 (norm weights), finite.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = self
            .tensor(name, &[len])?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(LlmError::Gguf {
                path: self.path.clone(),
                reason: format!("{name} holds a non-finite value"),
            });
        }
        Ok(v)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The token embedding, also the tied output head.
pub struct Embedding {
    table: Arc<QTensor>,
    /// `logits = h E^T`.
    pub head: Linear,
    /// Rows.
    pub vocab: usize,
    /// Width.
    pub dim: usize,
}

impl Embedding {
    /// `token_embd.weight` (`[vocab, dim]`).
    pub fn load(f: &mut GgufFile, vocab: usize, dim: usize, p: Precision) -> Result<Embedding> {
        let table = f.tensor("token_embd.weight", &[vocab, dim])?;
        Ok(Embedding {
            head: Linear::new(table.clone(), p)?,
            table,
            vocab,
            dim,
        })
    }

    /// The rows of `ids` (`ids.len() * dim`), dequantized; ids must be `< vocab`.
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
        Ok(self
            .table
            .embedding(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}
