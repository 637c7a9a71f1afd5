//! Gemma-3 hyper-parameters, read from a GGUF file's metadata (`gemma3.*` keys).
//!
//! Nothing is fixed for one size: layers, widths, heads, window, RoPE bases and scaling, the
//! attention scale and the local/global layer pattern all come from the file. Where a file
//! leaves a key out, the Gemma-3 architecture's value is used and named here:
//!
//! | key | default |
//! |---|---|
//! | `gemma3.attention.sliding_window_pattern` | 6: layers `i` with `(i + 1) % 6 == 0` are global |
//! | `gemma3.rope.local.freq_base` | 10 000 (sliding layers) |
//! | `gemma3.rope.scaling.factor` | 1 (linear scaling of global-layer positions) |
//! | `gemma3.attention.scale` | `1 / sqrt(key_length)` |

use crate::error::{LlmError, Result};
use candle_core::quantized::gguf_file::{Content, Value};

/// Largest width, head count or layer count accepted from a file (far above any released
/// Gemma; a crafted file cannot make us allocate from a huge count).
const MAX_DIM: usize = 1 << 16;

/// Whether a layer attends over the whole context or a sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Full causal attention (RoPE base `rope_global_base`): goes through the attention backend.
    Global,
    /// Causal attention over the last `sliding_window` positions (RoPE base `rope_local_base`).
    Sliding,
}

/// The hyper-parameters of a Gemma-3 model.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width (`embedding_length`).
    pub d_model: usize,
    /// MLP hidden width (`feed_forward_length`).
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA: divides `heads`).
    pub kv_heads: usize,
    /// Query/key head width (`key_length`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base of global layers.
    pub rope_global_base: f64,
    /// RoPE base of sliding layers.
    pub rope_local_base: f64,
    /// Global-layer positions are divided by this (linear RoPE scaling; 1: none).
    pub rope_global_scale: f64,
    /// Window of the sliding layers.
    pub sliding_window: usize,
    /// Per layer, global or sliding.
    pub kinds: Vec<LayerKind>,
    /// Attention logit scale.
    pub attn_scale: f32,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Vocabulary size (rows of `token_embd`).
    pub vocab: usize,
}

fn get<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn int(c: &Content, key: &str) -> Result<Option<usize>> {
    let Some(v) = get(c, key) else {
        return Ok(None);
    };
    let n: i128 = match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        other => {
            return Err(LlmError::Metadata(format!(
                "{key} is {:?}, expected an integer",
                other.value_type()
            )))
        }
    };
    usize::try_from(n)
        .map(Some)
        .map_err(|_| LlmError::Metadata(format!("{key} = {n} is negative")))
}

fn float(c: &Content, key: &str) -> Result<Option<f64>> {
    match get(c, key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x as f64)),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(_) => int(c, key).map(|v| v.map(|v| v as f64)),
    }
}

fn required(c: &Content, key: &str) -> Result<usize> {
    let v = int(c, key)?.ok_or_else(|| LlmError::Metadata(format!("missing {key}")))?;
    if v == 0 || v > MAX_DIM {
        return Err(LlmError::Metadata(format!(
            "{key} = {v} is out of range (1..={MAX_DIM})"
        )));
    }
    Ok(v)
}

impl Gemma3Config {
    /// Reads the hyper-parameters of a `gemma3` GGUF (`vocab` from the embedding's shape).
    pub fn from_gguf(c: &Content) -> Result<Gemma3Config> {
        let arch = match get(c, "general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(LlmError::Metadata("missing general.architecture".into())),
        };
        if arch != "gemma3" {
            return Err(LlmError::Metadata(format!(
                "architecture {arch:?}: this runtime runs gemma3"
            )));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let layers = required(c, &k("block_count"))?;
        let heads = required(c, &k("attention.head_count"))?;
        let kv_heads = required(c, &k("attention.head_count_kv"))?;
        let head_dim = required(c, &k("attention.key_length"))?;
        if let Some(vl) = int(c, &k("attention.value_length"))? {
            if vl != head_dim {
                return Err(LlmError::Metadata(format!(
                    "value_length {vl} differs from key_length {head_dim}: not supported"
                )));
            }
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(LlmError::Metadata(format!(
                "head_count {heads} is not a multiple of head_count_kv {kv_heads}"
            )));
        }
        let sliding_window = required(c, &k("attention.sliding_window"))?;
        let pattern = match int(c, &k("attention.sliding_window_pattern")) {
            Ok(Some(p)) if p > 0 => p,
            Ok(_) | Err(_) => 6,
        };
        let kinds = (0..layers)
            .map(|i| {
                if (i + 1) % pattern == 0 {
                    LayerKind::Global
                } else {
                    LayerKind::Sliding
                }
            })
            .collect();
        let eps = float(c, &k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| LlmError::Metadata("missing layer_norm_rms_epsilon".into()))?;
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(LlmError::Metadata(format!("{name} = {v} must be positive")))
            }
        };
        let rope_global_base = positive(
            "rope.freq_base",
            float(c, &k("rope.freq_base"))?.unwrap_or(1e6),
        )?;
        let rope_local_base = positive(
            "rope.local.freq_base",
            float(c, &k("rope.local.freq_base"))?.unwrap_or(1e4),
        )?;
        let rope_global_scale = positive(
            "rope.scaling.factor",
            float(c, &k("rope.scaling.factor"))?.unwrap_or(1.0),
        )?;
        let attn_scale = positive(
            "attention.scale",
            float(c, &k("attention.scale"))?.unwrap_or(1.0 / (head_dim as f64).sqrt()),
        )? as f32;
        let vocab = c
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims().first().copied().unwrap_or(0))
            .ok_or_else(|| LlmError::Metadata("no token_embd.weight tensor".into()))?;
        Ok(Gemma3Config {
            layers,
            d_model: required(c, &k("embedding_length"))?,
            ffn: required(c, &k("feed_forward_length"))?,
            heads,
            kv_heads,
            head_dim,
            eps: positive("layer_norm_rms_epsilon", eps)? as f32,
            rope_global_base,
            rope_local_base,
            rope_global_scale,
            sliding_window,
            kinds,
            attn_scale,
            context_length: int(c, &k("context_length"))?.unwrap_or(usize::MAX),
            vocab,
        })
    }

    /// Indices of the global layers, in order.
    pub fn global_layers(&self) -> Vec<usize> {
        (0..self.layers)
            .filter(|&i| self.kinds[i] == LayerKind::Global)
            .collect()
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}
