//! Contexts that persist: a prefilled sequence saved as one file, reopened zero-copy and
//! continued (`pqcache-llm prefill`, then `ask` as often as wanted).
//!
//! A context file is a pqcache file of kind `context` (format 4, [`pqcache::io::file`]):
//! the global layers' attention cache with its trained indexes, exactly as
//! [`pqcache::attention`] saves one (keys and values f16, codes, codebooks, per-head value
//! sums and query statistics), and beside it the runtime's state:
//!
//! ```text
//! client_words  0       magic b"PQCLLM\0\x01" (this layout, version 1)
//!               1       position (tokens prefilled)
//!               2..7    layers, kv_heads, head_dim, sliding_window, vocab
//!               7..11   the model's digest: BLAKE3 of the whole GGUF (Gemma3::digest)
//!               11..15  the tokenizer's digest (GemmaTokenizer::digest)
//!               15..    per layer: first position its window holds, rows (0: a global layer)
//! client_data   the last prompt position's logits (vocab f32), then per sliding layer and
//!               kv head: keys (rows * head_dim f32), values (the same)
//! ```
//!
//! Opening maps the file: keys, values and codes stay in the mapping (opening costs the
//! small sections, whatever the length; a step then reads the codes and the keys and values
//! it selects). The file is never written: decoding appends copy on write, in memory. Any
//! number of processes may open one file. A file saved from another model or tokenizer, or
//! whose state does not add up, is refused with [`LlmError::Context`] naming what differs;
//! a damaged or truncated one with [`LlmError::ContextFile`].

use crate::error::{LlmError, Result};
use crate::model::{retriever_config, Backend, Gemma3, Session, SlidingKv};
use crate::LayerKind;
pub use pqcache::io::file::Access;
use pqcache::io::file::{self, ClientState};
use std::path::Path;

const MAGIC: u64 = u64::from_le_bytes(*b"PQCLLM\0\x01");
const FIXED_WORDS: usize = 15;

fn digest_words(d: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes")))
}

fn hex(words: &[u64]) -> String {
    words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "…"
}

/// The backend a saved cache decodes with when `ask` names none (a dense session saves an
/// exact cache of budget 1).
fn backend_of(cfg: &pqcache::RetrieverConfig, model: &Gemma3) -> Backend {
    let dense = retriever_config(model, &Backend::Dense);
    if cfg == &dense {
        return Backend::Dense;
    }
    let default_window = dense.window;
    Backend::Retrieval {
        selector: cfg.selector.clone(),
        budget: cfg.budget,
        window: (cfg.window != default_window)
            .then_some(cfg.window)
            .flatten(),
        tail_term: cfg.tail_term,
    }
}

impl<'m> Session<'m> {
    /// Saves this sequence as a context file (atomically: a temporary file renamed over
    /// `path`): everything decoding needs to go on from here, `logits` being those of the
    /// last position (what [`Session::prefill`] returned).
    pub fn save(&self, path: &Path, logits: &[f32]) -> Result<()> {
        let c = &self.model.cfg;
        if self.pos == 0 {
            return Err(LlmError::InvalidArgument(
                "an empty sequence: prefill before saving".into(),
            ));
        }
        if logits.len() != c.vocab {
            return Err(LlmError::InvalidArgument(format!(
                "{} logits for a vocabulary of {}",
                logits.len(),
                c.vocab
            )));
        }
        let (hd, w) = (c.head_dim, c.sliding_window);
        let mut words = vec![MAGIC, self.pos as u64];
        words.extend([c.layers, c.kv_heads, hd, w, c.vocab].map(|v| v as u64));
        words.extend(digest_words(&self.model.digest()?));
        words.extend(digest_words(&self.model.tokenizer.digest));
        let mut data = logits.to_vec();
        for s in &self.sliding {
            // The positions a later token can see: the last `w` (older rows are masked).
            // (A global layer holds none here: its keys are in the cache.)
            let held = s.keys.first().map_or(0, |k| k.len() / hd);
            let from = if held == 0 {
                0
            } else {
                self.pos.saturating_sub(w).max(s.base)
            };
            let rows = (s.base + held).saturating_sub(from);
            words.extend([from as u64, rows as u64]);
            let skip = (from - s.base) * hd;
            for (k, v) in s.keys.iter().zip(&s.values) {
                data.extend_from_slice(&k[skip..]);
                data.extend_from_slice(&v[skip..]);
            }
        }
        file::save_context(path, &self.cache, &ClientState { words, data }).map_err(|source| {
            LlmError::ContextFile {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Opens a context file saved by [`Session::save`] for `model` and goes on from where it
    /// stopped; returns the session and the last position's logits. `backend`: `None`
    /// decodes as the context was saved; `dense`, or the saved selector with another budget,
    /// window or tail switch, keep its indexes; another selector trains new ones (a read of
    /// every key).
    pub fn open(
        model: &'m Gemma3,
        path: &Path,
        backend: Option<Backend>,
    ) -> Result<(Session<'m>, Vec<f32>)> {
        Session::open_with(model, path, backend, Access::Selected)
    }

    /// [`Session::open`], the context's keys and values to be read as `access` says
    /// (`Access::Prefetch`: read the file ahead now, for a context that fits in memory).
    pub fn open_with(
        model: &'m Gemma3,
        path: &Path,
        backend: Option<Backend>,
        access: Access,
    ) -> Result<(Session<'m>, Vec<f32>)> {
        let (mut cache, client) =
            file::open_context_with(path, access).map_err(|source| LlmError::ContextFile {
                path: path.to_path_buf(),
                source,
            })?;
        let bad = |reason: String| LlmError::Context {
            path: path.to_path_buf(),
            reason,
        };
        let (words, mut data) = (client.words, client.data);
        if words.len() < FIXED_WORDS || words[0] != MAGIC {
            return Err(bad(
                "not a pqcache-llm context (its client state is of another layout)".into(),
            ));
        }
        let c = &model.cfg;
        let (model_digest, tok_digest) = (
            digest_words(&model.digest()?),
            digest_words(&model.tokenizer.digest),
        );
        let same_tokenizer = words[11..15] == tok_digest;
        if words[7..11] != model_digest {
            return Err(bad(format!(
                "saved from another model: its GGUF digest is {}, {}'s is {} ({})",
                hex(&words[7..11]),
                model.path().display(),
                hex(&model_digest),
                if same_tokenizer {
                    "the tokenizer is the same"
                } else {
                    "the tokenizer differs too"
                }
            )));
        }
        if !same_tokenizer {
            return Err(bad(format!(
                "saved with another tokenizer: digest {}, this runtime's {}",
                hex(&words[11..15]),
                hex(&tok_digest)
            )));
        }
        let (hd, w, kvh) = (c.head_dim, c.sliding_window, c.kv_heads);
        let want = [c.layers, kvh, hd, w, c.vocab].map(|v| v as u64);
        if words[2..7] != want {
            return Err(bad(format!(
                "saved for layers, kv heads, head_dim, window, vocabulary {:?}; this model has {want:?}",
                &words[2..7]
            )));
        }
        let pos = words[1];
        if pos == 0 || pos > c.context_length as u64 {
            return Err(bad(format!(
                "position {pos} is outside 1..={}",
                c.context_length
            )));
        }
        let pos = pos as usize;
        let shape = model.global_shape();
        if cache.config().shape != shape {
            return Err(bad(format!(
                "an attention cache of shape {:?}; this model's global layers are {shape:?}",
                cache.config().shape
            )));
        }
        if let Some(gi) = (0..model.global_layers().len()).find(|&gi| cache.len(gi) != pos) {
            return Err(bad(format!(
                "global layer {gi} caches {} positions, the context is at {pos}",
                cache.len(gi)
            )));
        }
        let layer_words = &words[FIXED_WORDS..];
        if layer_words.len() != 2 * c.layers {
            return Err(bad(format!(
                "{} words of layer state for {} layers",
                layer_words.len(),
                c.layers
            )));
        }
        // Every count is checked against the model before a row is read.
        let mut rows_total = 0usize;
        for (li, lw) in layer_words.chunks_exact(2).enumerate() {
            let (from, rows) = (lw[0], lw[1]);
            let ok = match c.kinds[li] {
                LayerKind::Global => from == 0 && rows == 0,
                LayerKind::Sliding => {
                    rows <= w as u64
                        && from.checked_add(rows) == Some(pos as u64)
                        && rows == (pos as u64).min(w as u64)
                }
            };
            if !ok {
                return Err(bad(format!(
                    "layer {li} holds rows {from}+{rows}, not the window before position {pos}"
                )));
            }
            rows_total += rows as usize;
        }
        let expect = rows_total * kvh * hd * 2 + c.vocab;
        if data.len() != expect {
            return Err(bad(format!(
                "{} values of runtime state, expected {expect}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "a non-finite value in the runtime state at {i}"
            )));
        }
        let tail = data.split_off(c.vocab);
        let logits = data;
        let mut at = 0;
        let mut take = |n: usize| {
            let v = tail[at..at + n].to_vec();
            at += n;
            v
        };
        let sliding = layer_words
            .chunks_exact(2)
            .map(|lw| {
                let n = lw[1] as usize * hd;
                let (mut keys, mut values) = (Vec::with_capacity(kvh), Vec::with_capacity(kvh));
                for _ in 0..kvh {
                    keys.push(take(n));
                    values.push(take(n));
                }
                SlidingKv {
                    base: lw[0] as usize,
                    keys,
                    values,
                }
            })
            .collect();
        let saved = backend_of(cache.config(), model);
        let backend = match backend {
            None => saved,
            Some(Backend::Dense) => Backend::Dense,
            Some(b @ Backend::Retrieval { .. }) => {
                let cfg = retriever_config(model, &b);
                if cfg.selector == cache.config().selector {
                    cache.reconfigure(cfg)?;
                } else {
                    cache = cache.fork(cfg)?;
                }
                b
            }
        };
        let mut session = Session::new(model, backend)?;
        session.cache = cache;
        session.sliding = sliding;
        session.pos = pos;
        Ok((session, logits))
    }
}
