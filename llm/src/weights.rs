//! Model weights from a GGUF file: each matrix a [`Linear`] over candle's quantized matmul.
//!
//! [`Precision::Quantized`] keeps the file's blocks (Q4_K, Q5_0, Q6_K, Q8_0, ...) and multiplies
//! with candle's `QMatMul`, which quantizes the activations to 8 bits per block first, as
//! llama.cpp does: the fast path, memory-bound at decode. [`Precision::F32`] dequantizes every
//! matrix at load (4 bytes a weight) and multiplies in f32: the arithmetic of the numpy
//! reference (`../shared/tools/qkdump/gemma3_qk.py`), for checking the forward pass to f16
//! rounding.

use crate::error::{candle_message, LlmError, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use std::borrow::Cow;
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

/// Bytes of a Q5_0 block (f16 scale, 32 high bits, 16 bytes of low nibbles) and of a Q8_0
/// block (f16 scale, 32 signed bytes), ggml's layouts.
const Q5_0_BLOCK: usize = 22;
const Q8_0_BLOCK: usize = 34;

/// Rewrites Q5_0 blocks as Q8_0 blocks holding the same values: a Q5_0 weight is
/// `d * (q - 16)` with `q` in `0..32`, which Q8_0 stores exactly as `d * qs` with the same
/// `d`. Lossless (the dequantized weights are bit for bit the same) and the products run in
/// candle's Q8_0 kernels: its Q5_0 matrix-vector product reads 1.3 GB/s here, its Q8_0 one
/// 10-12 GB/s (two thirds of a decode step were Q5_0 products). Costs 34/22 of the bytes.
pub fn q5_0_as_q8_0(q5: &[u8]) -> Option<Vec<u8>> {
    if !q5.len().is_multiple_of(Q5_0_BLOCK) {
        return None;
    }
    let mut out = Vec::with_capacity(q5.len() / Q5_0_BLOCK * Q8_0_BLOCK);
    for b in q5.chunks_exact(Q5_0_BLOCK) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        out.extend_from_slice(&b[..2]);
        let mut q8 = [0u8; 32];
        for j in 0..16 {
            let hi0 = (((qh >> j) << 4) & 0x10) as u8;
            let hi1 = ((qh >> (j + 12)) & 0x10) as u8;
            q8[j] = (((qs[j] & 0x0f) | hi0) as i8 - 16) as u8;
            q8[j + 16] = (((qs[j] >> 4) | hi1) as i8 - 16) as u8;
        }
        out.extend_from_slice(&q8);
    }
    Some(out)
}

/// The tensor to multiply with: Q5_0 re-blocked as Q8_0 ([`q5_0_as_q8_0`]), others as stored.
fn for_matvec(t: Arc<QTensor>) -> Result<Arc<QTensor>> {
    if t.dtype() != GgmlDType::Q5_0 {
        return Ok(t);
    }
    let bytes = t.data()?;
    let q8 = q5_0_as_q8_0(&bytes).ok_or_else(|| {
        LlmError::Metadata("a Q5_0 tensor's size is not a whole number of blocks".into())
    })?;
    let storage = QStorage::from_data(Cow::Owned(q8), &Device::Cpu, GgmlDType::Q8_0)?;
    Ok(Arc::new(QTensor::new(storage, t.shape().clone())?))
}

impl Linear {
    fn new(t: Arc<QTensor>, precision: Precision) -> Result<Linear> {
        let (out_dim, in_dim) = t.shape().dims2()?;
        let t = if precision == Precision::F32 {
            t
        } else {
            for_matvec(t)?
        };
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
        let mut file = pqcache::io::open_regular(path).map_err(io)?;
        let content = Content::read(&mut file).map_err(|e| LlmError::Gguf {
            path: path.to_path_buf(),
            reason: candle_message(&e),
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
                reason: format!("{name}: {}", candle_message(&e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_0_rewritten_as_q8_0_dequantizes_to_the_same_bits() {
        let vals: Vec<f32> = (0..64 * 96)
            .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        let x = Tensor::from_vec(vals, (64, 96), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
        let q8 = for_matvec(Arc::new(q5)).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let q5 = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
        let values = |t: &QTensor| -> Vec<f32> {
            let x = t.dequantize(&Device::Cpu).unwrap();
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (values(&q5), values(&q8));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        // Every level of the 5-bit range occurs, so the bit handling is exercised.
        assert!(a.iter().any(|v| *v < 0.0) && a.iter().any(|v| *v > 0.0));
        assert_eq!(q5_0_as_q8_0(&[0u8; 23]), None);
    }
}
