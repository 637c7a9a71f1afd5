//! Attention dumps: a folder with `q.npy`, `k.npy`, `v.npy` (f16, `[layer, head, token, dim]`,
//! C order, post-RoPE) and `meta.json` (model, layers, scale), as written by
//! `../shared/tools/qkdump`.

use super::npy::{self, NpyData};
use crate::error::{Error, Result};
use half::f16;
use std::path::{Path, PathBuf};

/// One attention dump, all layers loaded.
#[derive(Clone, Debug)]
pub struct AttentionDump {
    /// The folder.
    pub dir: PathBuf,
    /// Model layer numbers, one per stored layer.
    pub layers: Vec<usize>,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Tokens.
    pub tokens: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Score scale (1 / sqrt(head_dim) unless the model says otherwise).
    pub scale: f32,
    /// `[layer, q_head, token, dim]`.
    pub q: Vec<f16>,
    /// `[layer, kv_head, token, dim]`.
    pub k: Vec<f16>,
    /// `[layer, kv_head, token, dim]`.
    pub v: Vec<f16>,
}

fn load_f16(path: &Path) -> Result<(Vec<usize>, Vec<f16>)> {
    let arr = npy::read(path)?;
    match arr.data {
        NpyData::F16(v) if arr.shape.len() == 4 => Ok((arr.shape, v)),
        NpyData::F32(v) if arr.shape.len() == 4 => {
            Ok((arr.shape, v.into_iter().map(f16::from_f32).collect()))
        }
        _ => Err(Error::format(
            path,
            format!("expected a 4-d float array, found shape {:?}", arr.shape),
        )),
    }
}

impl AttentionDump {
    /// Loads a dump folder. `v.npy` may be absent (then `v` is empty).
    pub fn load(dir: &Path) -> Result<AttentionDump> {
        let meta_path = dir.join("meta.json");
        let meta_text = super::read_regular(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value = serde_json::from_slice(&meta_text)
            .map_err(|e| Error::format(&meta_path, e.to_string()))?;
        let (qs, q) = load_f16(&dir.join("q.npy"))?;
        let (ks, k) = load_f16(&dir.join("k.npy"))?;
        let v_path = dir.join("v.npy");
        let v = if v_path.exists() {
            let (vs, v) = load_f16(&v_path)?;
            if vs != ks {
                return Err(Error::format(
                    &v_path,
                    format!("shape {vs:?} differs from k.npy's {ks:?}"),
                ));
            }
            v
        } else {
            Vec::new()
        };
        if qs[0] != ks[0] || qs[2] != ks[2] || qs[3] != ks[3] {
            return Err(Error::format(
                dir,
                format!("q shape {qs:?} does not match k shape {ks:?}"),
            ));
        }
        if ks[1] == 0 || qs[1] == 0 || qs[1] % ks[1] != 0 {
            return Err(Error::format(
                dir,
                format!(
                    "{} query heads cannot be grouped over {} kv heads (both must be positive)",
                    qs[1], ks[1]
                ),
            ));
        }
        // Optional, but never silently replaced: a `layers` list must name one distinct model
        // layer per dumped layer, and `attn_scale` must be a number (its range is the
        // retriever's to check).
        let layers = match meta.get("layers") {
            None => (0..qs[0]).collect(),
            Some(l) => {
                let list: Option<Vec<usize>> = l.as_array().and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|v| usize::try_from(v).ok()))
                        .collect()
                });
                let distinct = |l: &[usize]| {
                    let mut s = l.to_vec();
                    s.sort_unstable();
                    s.windows(2).all(|w| w[0] < w[1])
                };
                match list {
                    Some(list) if list.len() == qs[0] && distinct(&list) => list,
                    _ => {
                        return Err(Error::format(
                            &meta_path,
                            format!(
                                "\"layers\" must list {} distinct layer numbers (one per layer \
                                 of q.npy), found {}",
                                qs[0],
                                shorten(&l.to_string())
                            ),
                        ))
                    }
                }
            }
        };
        let head_dim = ks[3];
        let scale = match meta.get("attn_scale") {
            None => 1.0 / (head_dim as f32).sqrt(),
            Some(s) => match s.as_f64() {
                Some(v) => v as f32,
                None => {
                    return Err(Error::format(
                        &meta_path,
                        format!(
                            "\"attn_scale\" must be a number, found {}",
                            shorten(&s.to_string())
                        ),
                    ))
                }
            },
        };
        Ok(AttentionDump {
            dir: dir.to_path_buf(),
            layers,
            q_heads: qs[1],
            kv_heads: ks[1],
            tokens: ks[2],
            head_dim,
            scale,
            q,
            k,
            v,
        })
    }

    /// Query heads sharing one KV head.
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Queries of (layer index, query head): `tokens * head_dim`.
    pub fn queries(&self, layer: usize, head: usize) -> &[f16] {
        let len = self.tokens * self.head_dim;
        let at = (layer * self.q_heads + head) * len;
        &self.q[at..at + len]
    }

    /// Keys of (layer index, kv head): `tokens * head_dim`.
    pub fn keys(&self, layer: usize, kv_head: usize) -> &[f16] {
        let len = self.tokens * self.head_dim;
        let at = (layer * self.kv_heads + kv_head) * len;
        &self.k[at..at + len]
    }

    /// Values of (layer index, kv head): `tokens * head_dim` (empty if the dump has none).
    pub fn values(&self, layer: usize, kv_head: usize) -> &[f16] {
        if self.v.is_empty() {
            return &[];
        }
        let len = self.tokens * self.head_dim;
        let at = (layer * self.kv_heads + kv_head) * len;
        &self.v[at..at + len]
    }
}

/// `text`, cut to its first 60 characters for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}
