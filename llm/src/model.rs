//! The Gemma-3 forward pass, and a [`Session`] that prefills and decodes through it.
//!
//! Per block (all widths from [`Gemma3Config`]):
//!
//! ```text
//! h = rms(x) * attn_norm                  q, k, v = h Wq, h Wk, h Wv
//! q, k = rms(q) * q_norm, rms(k) * k_norm  (per head), then RoPE (rotate-half; global or
//!                                          local base; global positions / rope scale)
//! a = attention(q, k, v)                  global: every position, through the backend;
//!                                          sliding: the last `sliding_window` positions
//! x = x + rms(a Wo) * post_attention_norm
//! h = rms(x) * ffn_norm
//! x = x + rms((gelu_tanh(h Wg) * (h Wu)) Wd) * post_ffw_norm
//! ```
//!
//! after `x = embed(ids) * sqrt(d_model)`; logits `rms(x) * output_norm E^T` with the tied
//! embedding `E`. The stored norm weights already hold Gemma's `1 + w`.
//!
//! Caches: the global layers' keys and values live in the session's
//! [`AttentionRetriever`] (f16, one cache for dense and retrieval attention alike: the dense
//! backend reads them back, the retrieval backend selects among them); each sliding layer
//! keeps the last `sliding_window` positions (f32) in a buffer trimmed as it grows.
//!
//! Prefill runs in chunks of [`PrefillOptions::chunk`] tokens with dense attention (memory
//! bounded by the chunk, whatever the prompt's length); at its end the retrieval backend
//! trains its indexes on the prompt's keys and queries. Decode runs one token at a time; a
//! global layer then `append`s its key and value to the retriever and attends densely
//! (`attend_all`) or through retrieval (`select_step` + `attend_selection`, with the tail term).

use crate::config::{Gemma3Config, LayerKind};
use crate::error::{LlmError, Result};
use crate::kernels::{causal_attention, Causal, KvRows};
use crate::tokenizer::GemmaTokenizer;
use crate::weights::{Embedding, GgufFile, Linear, Precision};
use half::f16;
use pqcache::attention::selector::exp_nonpositive;
use pqcache::{AttentionRetriever, AttentionShape, Budget, RetrieverConfig, SelectorSpec};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Block {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Vec<f32>,
}

/// Why [`Session::continue_greedy`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model produced its end-of-sequence token (the last of the new tokens).
    EndOfSequence,
    /// `max_new` tokens were produced.
    MaxNew,
    /// The model's context is full: the last new token was predicted at its last position.
    ContextFull,
}

impl Stop {
    /// The name in `--json` output: `eos`, `max_new` or `context_full`.
    pub fn name(self) -> &'static str {
        match self {
            Stop::EndOfSequence => "eos",
            Stop::MaxNew => "max_new",
            Stop::ContextFull => "context_full",
        }
    }
}

/// The tokens of a greedy continuation and why it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The new tokens, in order.
    pub ids: Vec<u32>,
    /// Why there are no more.
    pub stop: Stop,
}

/// A Gemma-3 model: weights, hyper-parameters and tokenizer.
pub struct Gemma3 {
    /// Hyper-parameters.
    pub cfg: Gemma3Config,
    /// The tokenizer from the same file.
    pub tokenizer: GemmaTokenizer,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    globals: Vec<usize>,
    path: PathBuf,
    digest: OnceLock<[u8; 32]>,
}

impl Gemma3 {
    /// Loads a Gemma-3 GGUF.
    pub fn load(path: &Path, precision: Precision) -> Result<Gemma3> {
        let mut f = GgufFile::open(path)?;
        let cfg = Gemma3Config::from_gguf(&f.content)?;
        let tokenizer = GemmaTokenizer::from_gguf(&f.content)?;
        if tokenizer.vocab != cfg.vocab {
            return Err(LlmError::Metadata(format!(
                "{} tokens in the vocabulary, {} rows in token_embd",
                tokenizer.vocab, cfg.vocab
            )));
        }
        let (d, hd, h, kvh, ffn) = (cfg.d_model, cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.ffn);
        let embed = Embedding::load(&mut f, cfg.vocab, d, precision)?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}");
                Ok(Block {
                    attn_norm: f.vector(&n("attn_norm.weight"), d)?,
                    q: f.linear(&n("attn_q.weight"), h * hd, d, precision)?,
                    k: f.linear(&n("attn_k.weight"), kvh * hd, d, precision)?,
                    v: f.linear(&n("attn_v.weight"), kvh * hd, d, precision)?,
                    o: f.linear(&n("attn_output.weight"), d, h * hd, precision)?,
                    q_norm: f.vector(&n("attn_q_norm.weight"), hd)?,
                    k_norm: f.vector(&n("attn_k_norm.weight"), hd)?,
                    post_attn_norm: f.vector(&n("post_attention_norm.weight"), d)?,
                    ffn_norm: f.vector(&n("ffn_norm.weight"), d)?,
                    gate: f.linear(&n("ffn_gate.weight"), ffn, d, precision)?,
                    up: f.linear(&n("ffn_up.weight"), ffn, d, precision)?,
                    down: f.linear(&n("ffn_down.weight"), d, ffn, precision)?,
                    post_ffn_norm: f.vector(&n("post_ffw_norm.weight"), d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = f.vector("output_norm.weight", d)?;
        let globals = cfg.global_layers();
        Ok(Gemma3 {
            cfg,
            tokenizer,
            embed,
            blocks,
            final_norm,
            globals,
            path: path.to_path_buf(),
            digest: OnceLock::new(),
        })
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// BLAKE3 of the whole GGUF file (metadata, tensor table and tensors), computed on first
    /// use: the model's identity, which a saved context must match. The file is read again
    /// (about 0.1 s for 250 MB); a file changed since loading gives another digest.
    pub fn digest(&self) -> Result<[u8; 32]> {
        if let Some(d) = self.digest.get() {
            return Ok(*d);
        }
        let io = |source| LlmError::Io {
            path: self.path.clone(),
            source,
        };
        let file = pqcache::io::open_regular(&self.path).map_err(io)?;
        let mut h = blake3::Hasher::new();
        h.update_reader(file).map_err(io)?;
        let d = *h.finalize().as_bytes();
        Ok(*self.digest.get_or_init(|| d))
    }

    /// The attention geometry of the global layers (what the retriever holds).
    pub fn global_shape(&self) -> AttentionShape {
        AttentionShape {
            layers: self.globals.len().max(1),
            query_heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Indices of the global layers.
    pub fn global_layers(&self) -> &[usize] {
        &self.globals
    }
}

/// How the global layers attend during decode.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    /// Full attention over every cached position (the reference).
    Dense,
    /// Retrieval through an [`AttentionRetriever`] with this selector and budget.
    Retrieval {
        /// How candidates are scored (`fastscan:64x4`, `exact`, `quest:16`, ...).
        selector: SelectorSpec,
        /// Positions attended per step.
        budget: Budget,
        /// The recent window in positions (`None`: the retriever's default, half of what the
        /// budget leaves after the sink).
        window: Option<usize>,
        /// The tail term of sparse attention ([`pqcache::attention::TailTerm`]).
        tail_term: bool,
    },
}

impl Backend {
    /// `dense`, or a selector spec with a budget ratio, optionally followed by attention
    /// options after `+`: `+notail` (no tail term), `+window=N` (a fixed recent window of `N`
    /// positions). `fastscan:64x4+notail+window=0`.
    pub fn parse(spec: &str, budget: f64) -> Result<Backend> {
        let mut parts = spec.trim().split('+');
        let selector = parts.next().unwrap_or_default();
        if selector == "dense" && spec.trim() == "dense" {
            return Ok(Backend::Dense);
        }
        if !(budget > 0.0 && budget <= 1.0) {
            return Err(LlmError::InvalidArgument(format!(
                "budget {budget} must be in (0, 1]"
            )));
        }
        let (mut window, mut tail_term) = (None, true);
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "notail" => tail_term = false,
                Some(("window", n)) => {
                    window = Some(n.parse().map_err(|_| {
                        LlmError::InvalidArgument(format!("window {n:?} is not a count"))
                    })?)
                }
                _ => {
                    return Err(LlmError::InvalidArgument(format!(
                        "unknown attention option {opt:?} in {spec:?} (notail, window=N)"
                    )))
                }
            }
        }
        Ok(Backend::Retrieval {
            selector: SelectorSpec::from_str(selector)?,
            budget: Budget::Ratio(budget),
            window,
            tail_term,
        })
    }

    /// `dense`, or the selector spec with its options (the form [`Backend::parse`] reads).
    pub fn name(&self) -> String {
        match self {
            Backend::Dense => "dense".into(),
            Backend::Retrieval {
                selector,
                window,
                tail_term,
                ..
            } => {
                let mut name = selector.to_string();
                if !tail_term {
                    name.push_str("+notail");
                }
                if let Some(w) = window {
                    name.push_str(&format!("+window={w}"));
                }
                name
            }
        }
    }
}

/// Where the time of one phase went (wall time, summed over calls).
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    /// Matrix products (projections, MLP, output head).
    pub matmul: Duration,
    /// Sliding-window attention.
    pub sliding_attention: Duration,
    /// Global attention over the attended positions (all of them when dense).
    pub global_attention: Duration,
    /// Retrieval: choosing the positions (`select`).
    pub select: Duration,
    /// Taking new keys into the global cache and its indexes (append, train, refresh).
    pub cache_update: Duration,
    /// Everything else (embedding, norms, RoPE, activations, copies).
    pub other: Duration,
    /// Wall time of the phase.
    pub total: Duration,
    /// Tokens processed.
    pub tokens: usize,
}

impl Breakdown {
    /// Tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.total.as_secs_f64().max(1e-9)
    }

    /// The buckets in milliseconds per token, as JSON.
    pub fn ms_per_token_json(&self) -> serde_json::Value {
        let per = |d: Duration| d.as_secs_f64() * 1e3 / self.tokens.max(1) as f64;
        serde_json::json!({
            "total": per(self.total),
            "matmul": per(self.matmul),
            "sliding_attention": per(self.sliding_attention),
            "global_attention": per(self.global_attention),
            "select": per(self.select),
            "cache_update": per(self.cache_update),
            "other": per(self.other),
        })
    }
}

/// Where the time of a session went: prefill and decode apart.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Prefill chunks.
    pub prefill: Breakdown,
    /// Decode steps.
    pub decode: Breakdown,
    /// Sum over decode steps and global layers of the attended fraction of the cache.
    attended_sum: f64,
    attended_count: usize,
}

impl Profile {
    /// Mean fraction of the cache a global layer attended to per decode step.
    pub fn attended_fraction(&self) -> f64 {
        if self.attended_count == 0 {
            1.0
        } else {
            self.attended_sum / self.attended_count as f64
        }
    }
}

/// Which logits a prefill returns.
pub enum Logits<'a> {
    /// The last position's only.
    Last,
    /// Every position's, handed to the callback `(position, logits)` chunk by chunk.
    All(&'a mut dyn FnMut(usize, &[f32])),
}

/// Settings of [`Session::prefill`].
pub struct PrefillOptions<'a> {
    /// Tokens per chunk (memory is bounded by it).
    pub chunk: usize,
    /// Which logits to compute.
    pub logits: Logits<'a>,
    /// Called after each chunk with (tokens done, tokens in all).
    pub progress: Option<&'a mut dyn FnMut(usize, usize)>,
}

impl Default for PrefillOptions<'_> {
    fn default() -> Self {
        PrefillOptions {
            chunk: 512,
            logits: Logits::Last,
            progress: None,
        }
    }
}

/// Post-RoPE queries, keys and values of chosen layers, as a session computes them
/// (`pqcache-llm dump`): per layer, per head, token-major rows of `head_dim` f16.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    /// Model layers captured.
    pub layers: Vec<usize>,
    /// `q[layer][head]`: `tokens * head_dim`.
    pub q: Vec<Vec<Vec<f16>>>,
    /// `k[layer][kv_head]`.
    pub k: Vec<Vec<Vec<f16>>>,
    /// `v[layer][kv_head]`.
    pub v: Vec<Vec<Vec<f16>>>,
}

/// The last positions of a sliding layer, per kv head: rows `base..base + len`.
#[derive(Clone)]
pub(crate) struct SlidingKv {
    pub(crate) base: usize,
    pub(crate) keys: Vec<Vec<f32>>,
    pub(crate) values: Vec<Vec<f32>>,
}

/// One sequence being prefilled and decoded: the caches, the position and the profile.
pub struct Session<'m> {
    pub(crate) model: &'m Gemma3,
    pub(crate) backend: Backend,
    pub(crate) cache: AttentionRetriever,
    pub(crate) sliding: Vec<SlidingKv>,
    pub(crate) pos: usize,
    pub(crate) profile: Profile,
    capture: Option<Capture>,
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64) as f32;
        let denom = (ms + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v / denom * w;
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    rms_norm_rows(x, w, eps, &mut out);
    out
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with `tanh(u) = sign(u) (1 - e) / (1 + e)`,
/// `e = exp(-2 |u|)` by the straight-line exponential the compiler vectorises (within 3 ulps;
/// libm's `tanh` per element was most of a prefill's non-matmul time).
fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    let e = exp_nonpositive(-2.0 * u.abs());
    let t = ((1.0 - e) / (1.0 + e)).copysign(u);
    0.5 * x * (1.0 + t)
}

/// cos and sin of `pos * base^(-2i/d)` for `i < d/2`, per position (`rows * d/2` each).
fn rope_tables(start: usize, rows: usize, d: usize, base: f64, scale: f64) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
        .collect();
    let (mut cos, mut sin) = (
        Vec::with_capacity(rows * half),
        Vec::with_capacity(rows * half),
    );
    for r in 0..rows {
        let p = (start + r) as f64 / scale;
        for &f in &inv {
            let a = p * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE of one head row at table row `r`.
fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/// The global layers' cache settings for `backend`: dense reads the cache back (the exact
/// selector keeps no index); retrieval uses the backend's selector and budget.
pub(crate) fn retriever_config(model: &Gemma3, backend: &Backend) -> RetrieverConfig {
    let defaults = RetrieverConfig::new(model.global_shape());
    match backend {
        Backend::Dense => RetrieverConfig {
            selector: SelectorSpec::Exact,
            budget: Budget::Ratio(1.0),
            scale: model.cfg.attn_scale,
            ..defaults
        },
        Backend::Retrieval {
            selector,
            budget,
            window,
            tail_term,
        } => RetrieverConfig {
            selector: selector.clone(),
            budget: *budget,
            window: window.or(defaults.window),
            tail_term: *tail_term,
            scale: model.cfg.attn_scale,
            ..defaults
        },
    }
}

impl<'m> Session<'m> {
    /// A new, empty sequence.
    pub fn new(model: &'m Gemma3, backend: Backend) -> Result<Session<'m>> {
        let cfg = retriever_config(model, &backend);
        let kvh = model.cfg.kv_heads;
        let sliding = (0..model.cfg.layers)
            .map(|_| SlidingKv {
                base: 0,
                keys: vec![Vec::new(); kvh],
                values: vec![Vec::new(); kvh],
            })
            .collect();
        Ok(Session {
            model,
            backend,
            cache: AttentionRetriever::new(cfg)?,
            sliding,
            pos: 0,
            profile: Profile::default(),
            capture: None,
        })
    }

    /// This sequence, as it stands, continued through `backend`: the caches are copied and the
    /// global layers' indexes trained for it, as if it had prefilled the same prompt (a
    /// prefill is dense whatever the backend). Methods compared on one prompt share its
    /// prefill this way. The fork's profile starts from this one's prefill figures.
    pub fn fork(&self, backend: Backend) -> Result<Session<'m>> {
        let t = Instant::now();
        let cache = self.cache.fork(retriever_config(self.model, &backend))?;
        let mut profile = Profile {
            prefill: self.profile.prefill.clone(),
            ..Profile::default()
        };
        // Training the fork's indexes is prefill work: part of the total as well.
        profile.prefill.cache_update += t.elapsed();
        profile.prefill.total += t.elapsed();
        Ok(Session {
            model: self.model,
            backend,
            cache,
            sliding: self.sliding.clone(),
            pos: self.pos,
            profile,
            capture: None,
        })
    }

    /// Records the post-RoPE q, k, v of `layers` from now on (see [`Capture`]).
    pub fn capture(&mut self, layers: &[usize]) -> Result<()> {
        if let Some(&l) = layers.iter().find(|&&l| l >= self.model.cfg.layers) {
            return Err(LlmError::InvalidArgument(format!(
                "layer {l} out of range ({} layers)",
                self.model.cfg.layers
            )));
        }
        let (h, kvh) = (self.model.cfg.heads, self.model.cfg.kv_heads);
        let n = layers.len();
        self.capture = Some(Capture {
            layers: layers.to_vec(),
            q: vec![vec![Vec::new(); h]; n],
            k: vec![vec![Vec::new(); kvh]; n],
            v: vec![vec![Vec::new(); kvh]; n],
        });
        Ok(())
    }

    /// What [`Session::capture`] recorded.
    pub fn take_capture(&mut self) -> Option<Capture> {
        self.capture.take()
    }

    /// Positions processed so far (the next token's position).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Where the time went.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The model this sequence runs on.
    pub fn model(&self) -> &'m Gemma3 {
        self.model
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Attend to `ratio` of the context from the next step on (a retrieval backend).
    pub fn set_budget(&mut self, ratio: f64) -> Result<()> {
        match &mut self.backend {
            Backend::Dense => Err(LlmError::InvalidArgument(
                "a dense backend has no budget".into(),
            )),
            Backend::Retrieval { budget, .. } => {
                if !(ratio > 0.0 && ratio <= 1.0) {
                    return Err(LlmError::InvalidArgument(format!(
                        "budget {ratio} must be in (0, 1]"
                    )));
                }
                self.cache.set_budget(Budget::Ratio(ratio))?;
                *budget = Budget::Ratio(ratio);
                Ok(())
            }
        }
    }

    /// The global layers' cache and indexes.
    pub fn retriever(&self) -> &AttentionRetriever {
        &self.cache
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.model.cfg.vocab) {
            return Err(LlmError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.model.cfg.vocab
            )));
        }
        if self.pos.saturating_add(ids.len()) > self.model.cfg.context_length {
            return Err(LlmError::InvalidArgument(format!(
                "{} tokens after {} exceed the model's context of {}",
                ids.len(),
                self.pos,
                self.model.cfg.context_length
            )));
        }
        Ok(())
    }

    /// Runs `ids` through the model in chunks with dense attention and returns the logits of
    /// the last position (or hands every position's to `opts.logits`). The retrieval
    /// backend then trains its indexes on every cached key and the prompt's queries.
    pub fn prefill(&mut self, ids: &[u32], mut opts: PrefillOptions<'_>) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if ids.is_empty() {
            return Err(LlmError::InvalidArgument("an empty prompt".into()));
        }
        let chunk = opts.chunk.max(1);
        let t0 = Instant::now();
        let mut last = Vec::new();
        for (c, part) in ids.chunks(chunk).enumerate() {
            let want_all = matches!(opts.logits, Logits::All(_));
            let start = self.pos;
            let logits = self.forward(part, true, want_all, true)?;
            match &mut opts.logits {
                Logits::All(f) => {
                    let v = self.model.cfg.vocab;
                    for (i, row) in logits.chunks_exact(v).enumerate() {
                        f(start + i, row);
                    }
                    if c == ids.len().div_ceil(chunk) - 1 {
                        last = logits[logits.len() - v..].to_vec();
                    }
                }
                Logits::Last => last = logits,
            }
            if let Some(p) = opts.progress.as_mut() {
                p((c * chunk + part.len()).min(ids.len()), ids.len());
            }
        }
        let t = Instant::now();
        for gi in 0..self.model.globals.len() {
            if !self.cache.is_trained(gi) {
                self.cache.train(gi)?;
            }
        }
        self.profile.prefill.cache_update += t.elapsed();
        self.profile.prefill.total += t0.elapsed();
        self.profile.prefill.tokens += ids.len();
        Ok(last)
    }

    /// Greedy continuation of the prompt whose last logits are `logits`: decodes `question`
    /// token by token through the backend, then up to `max_new` tokens greedily (each fed
    /// back), stopping after the end of sequence, or once the model's context is full (the
    /// token predicted at its last position is the last one: llama.cpp's "context full"
    /// stop without context shifting); `each` sees every new token as it comes. What
    /// `generate`, `ask` and the passkey test do. A question that does not fit in the
    /// context is an error.
    pub fn continue_greedy(
        &mut self,
        mut logits: Vec<f32>,
        question: &[u32],
        max_new: usize,
        mut each: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generated> {
        if let Some((&last, before)) = question.split_last() {
            self.check_ids(question)?;
            for &t in before {
                self.feed(t)?;
            }
            logits = self.decode(last)?;
        }
        let mut ids = Vec::new();
        let mut stop = Stop::MaxNew;
        for i in 0..max_new {
            let next = argmax(&logits);
            ids.push(next);
            each(next)?;
            if next == self.model.tokenizer.eos {
                stop = Stop::EndOfSequence;
                break;
            }
            if i + 1 == max_new {
                break;
            }
            if self.pos >= self.model.cfg.context_length {
                stop = Stop::ContextFull;
                break;
            }
            logits = self.decode(next)?;
        }
        Ok(Generated { ids, stop })
    }

    /// Decodes one token (the next input) and returns the logits of the position after it.
    pub fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        self.check_ids(&[id])?;
        let t0 = Instant::now();
        let logits = self.forward(&[id], false, false, true)?;
        self.profile.decode.total += t0.elapsed();
        self.profile.decode.tokens += 1;
        Ok(logits)
    }

    /// [`Session::decode`] of a token whose next-token logits are not wanted (a question's
    /// tokens before its last): the same step without the output head (a 262K-row product,
    /// most of a small model's step).
    pub fn feed(&mut self, id: u32) -> Result<()> {
        self.check_ids(&[id])?;
        let t0 = Instant::now();
        self.forward(&[id], false, false, false)?;
        self.profile.decode.total += t0.elapsed();
        self.profile.decode.tokens += 1;
        Ok(())
    }

    /// One chunk through every block. `prefill`: dense attention on the global layers (and
    /// `extend` of their cache); otherwise one token through the backend. Returns the
    /// logits of every row (`all`) or of the last.
    fn forward(&mut self, ids: &[u32], prefill: bool, all: bool, head: bool) -> Result<Vec<f32>> {
        let m = self.model;
        let c = &m.cfg;
        let (rows, d, hd, h, kvh) = (ids.len(), c.d_model, c.head_dim, c.heads, c.kv_heads);
        let start = self.pos;
        let mut t = Instant::now();
        let mut bd = std::mem::take(if prefill {
            &mut self.profile.prefill
        } else {
            &mut self.profile.decode
        });
        let lap = |bucket: &mut Duration, t: &mut Instant| {
            let now = Instant::now();
            *bucket += now - *t;
            *t = now;
        };
        let scale = (d as f32).sqrt();
        let mut x: Vec<f32> = m.embed.rows(ids)?.into_iter().map(|v| v * scale).collect();
        let local = rope_tables(start, rows, hd, c.rope_local_base, 1.0);
        let global = rope_tables(start, rows, hd, c.rope_global_base, c.rope_global_scale);
        let mut h_buf = vec![0.0f32; rows * d];
        lap(&mut bd.other, &mut t);
        let mut gi = 0;
        for (li, b) in m.blocks.iter().enumerate() {
            let kind = c.kinds[li];
            rms_norm_rows(&x, &b.attn_norm, c.eps, &mut h_buf);
            lap(&mut bd.other, &mut t);
            let q_tok = b.q.forward(&h_buf, rows)?;
            let k_tok = b.k.forward(&h_buf, rows)?;
            let v_tok = b.v.forward(&h_buf, rows)?;
            lap(&mut bd.matmul, &mut t);
            // Per-head norm and RoPE, into head-major [head, row, dim].
            let (cos, sin) = if kind == LayerKind::Global {
                &global
            } else {
                &local
            };
            let half = hd / 2;
            let mut q = vec![0.0f32; h * rows * hd];
            let mut k = vec![0.0f32; kvh * rows * hd];
            let mut v = vec![0.0f32; kvh * rows * hd];
            for r in 0..rows {
                let (cr, sr) = (
                    &cos[r * half..(r + 1) * half],
                    &sin[r * half..(r + 1) * half],
                );
                for hh in 0..h {
                    let dst = &mut q[(hh * rows + r) * hd..(hh * rows + r + 1) * hd];
                    rms_norm_rows(
                        &q_tok[(r * h + hh) * hd..(r * h + hh + 1) * hd],
                        &b.q_norm,
                        c.eps,
                        dst,
                    );
                    rope_row(dst, cr, sr);
                }
                for hh in 0..kvh {
                    let src = (r * kvh + hh) * hd..(r * kvh + hh + 1) * hd;
                    let dst = (hh * rows + r) * hd..(hh * rows + r + 1) * hd;
                    rms_norm_rows(&k_tok[src.clone()], &b.k_norm, c.eps, &mut k[dst.clone()]);
                    rope_row(&mut k[dst.clone()], cr, sr);
                    v[dst].copy_from_slice(&v_tok[src]);
                }
            }
            if let Some(cap) = self.capture.as_mut() {
                if let Some(ci) = cap.layers.iter().position(|&l| l == li) {
                    let half16 =
                        |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
                    for hh in 0..h {
                        cap.q[ci][hh].extend(half16(&q[hh * rows * hd..(hh + 1) * rows * hd]));
                    }
                    for hh in 0..kvh {
                        let span = hh * rows * hd..(hh + 1) * rows * hd;
                        cap.k[ci][hh].extend(half16(&k[span.clone()]));
                        cap.v[ci][hh].extend(half16(&v[span]));
                    }
                }
            }
            lap(&mut bd.other, &mut t);
            let mut attn = vec![0.0f32; rows * h * hd];
            match kind {
                LayerKind::Global => {
                    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                    let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                    if prefill {
                        self.cache.extend(gi, &k16, &v16, &q)?;
                        lap(&mut bd.cache_update, &mut t);
                        let held: Vec<_> = (0..kvh)
                            .map(|hh| self.cache.kv(gi, hh).expect("in range"))
                            .collect();
                        let kv: Vec<KvRows> = held
                            .iter()
                            .map(|(keys, values)| KvRows::F16 { keys, values })
                            .collect();
                        let at = Causal {
                            start,
                            base: 0,
                            window: None,
                            scale: c.attn_scale,
                        };
                        causal_attention(&q, h, hd, &kv, at, &mut attn);
                        lap(&mut bd.global_attention, &mut t);
                    } else {
                        self.cache.append_with_queries(gi, &k16, &v16, &q)?;
                        lap(&mut bd.cache_update, &mut t);
                        let len = self.cache.len(gi);
                        let out = match &self.backend {
                            Backend::Dense => {
                                self.profile.attended_sum += 1.0;
                                self.cache.attend_all(gi, &q)?
                            }
                            Backend::Retrieval { .. } => {
                                let step = self.cache.select_step(gi, &q)?;
                                lap(&mut bd.select, &mut t);
                                let n: usize = step.iter().map(|h| h.positions.len()).sum();
                                self.profile.attended_sum += n as f64 / (len * kvh) as f64;
                                self.cache.attend_selection(gi, &q, &step)?
                            }
                        };
                        self.profile.attended_count += 1;
                        // One row: [head, dim] is already [row, head * dim].
                        attn.copy_from_slice(&out);
                        lap(&mut bd.global_attention, &mut t);
                    }
                    gi += 1;
                }
                LayerKind::Sliding => {
                    let w = c.sliding_window;
                    let s = &mut self.sliding[li];
                    for hh in 0..kvh {
                        s.keys[hh].extend_from_slice(&k[hh * rows * hd..(hh + 1) * rows * hd]);
                        s.values[hh].extend_from_slice(&v[hh * rows * hd..(hh + 1) * rows * hd]);
                    }
                    let kv: Vec<KvRows> = (0..kvh)
                        .map(|hh| KvRows::F32 {
                            keys: &s.keys[hh],
                            values: &s.values[hh],
                        })
                        .collect();
                    let at = Causal {
                        start,
                        base: s.base,
                        window: Some(w),
                        scale: c.attn_scale,
                    };
                    causal_attention(&q, h, hd, &kv, at, &mut attn);
                    // Keep the last `w - 1` positions the next token can see, trimming only
                    // once a window's worth is stale (amortised O(1) per token).
                    let end = start + rows;
                    let keep_from = end.saturating_sub(w);
                    if keep_from - s.base >= w {
                        let drop = (keep_from - s.base) * hd;
                        for hh in 0..kvh {
                            s.keys[hh].drain(..drop);
                            s.values[hh].drain(..drop);
                        }
                        s.base = keep_from;
                    }
                    lap(&mut bd.sliding_attention, &mut t);
                }
            }
            let o = b.o.forward(&attn, rows)?;
            lap(&mut bd.matmul, &mut t);
            let o = rms_norm(&o, &b.post_attn_norm, c.eps);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            rms_norm_rows(&x, &b.ffn_norm, c.eps, &mut h_buf);
            lap(&mut bd.other, &mut t);
            let gate = b.gate.forward(&h_buf, rows)?;
            let up = b.up.forward(&h_buf, rows)?;
            lap(&mut bd.matmul, &mut t);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| gelu_tanh(g) * u)
                .collect();
            lap(&mut bd.other, &mut t);
            let down = b.down.forward(&act, rows)?;
            lap(&mut bd.matmul, &mut t);
            let down = rms_norm(&down, &b.post_ffn_norm, c.eps);
            x.iter_mut().zip(&down).for_each(|(x, o)| *x += o);
            lap(&mut bd.other, &mut t);
        }
        self.pos += rows;
        // Logits of the rows asked for, in slices of 64 rows (64 x vocab floats at a time).
        let mut logits = Vec::new();
        if head {
            let first = if all { 0 } else { rows - 1 };
            let hidden = rms_norm(&x[first * d..], &m.final_norm, c.eps);
            lap(&mut bd.other, &mut t);
            logits.reserve((rows - first) * c.vocab);
            for part in hidden.chunks(64 * d) {
                logits.extend(m.embed.head.forward(part, part.len() / d)?);
            }
            lap(&mut bd.matmul, &mut t);
        }
        *(if prefill {
            &mut self.profile.prefill
        } else {
            &mut self.profile.decode
        }) = bd;
        Ok(logits)
    }
}

/// `ln sum_i exp(logits_i)`, max subtracted, in f64.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// `log softmax(logits)[target]`'s negation: the next-token loss.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    log_sum_exp(logits) - logits[target as usize] as f64
}

/// The index of the largest logit (the first of ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
