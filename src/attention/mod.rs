//! The attention client: PQCache-style token retrieval for LLM decoding.
//!
//! At each decode step, for each layer and KV head, choose the cached tokens to attend to so
//! that the attention output stays close to full attention while only a fraction of the keys
//! and values are read.
//!
//! Vocabulary:
//!
//! * **layer**: a transformer layer; each has its own keys, values and indexes.
//! * **kv_head**: a key/value head of a layer. Keys are post-RoPE, `head_dim` wide.
//! * **query_head**: a query head. Under grouped-query attention (GQA) the `group` query heads
//!   `kv_head * group .. (kv_head + 1) * group` share one kv_head (Gemma-3-270M: 4 query heads,
//!   1 kv_head).
//! * **position**: a token's index in the sequence, 0-based; the cache holds positions `0..len`.
//! * **sink**: the first `sink` positions, always attended (attention sinks; default 32).
//! * **window**: the last `window` positions, always attended (recent tokens).
//! * **budget**: the number of positions attended per step, `B = max(ratio * len, sink + 2)`
//!   for a ratio, or a fixed count. By default `window = (B - sink) / 2` and the remaining
//!   `k = B - sink - window` positions are *retrieved* among the candidates
//!   `sink .. len - window` by the [`selector`].
//!
//! Retrieval scores a candidate by aggregating over the group's query heads (PQCache): the sum
//! (or max) over query heads of `softmax_j(q · k_j * scale)`, the softmax taken over the
//! candidates, with `q · k_j` approximated by the selector's index (fast-scan, PQ, page bounds)
//! or exact. The attention output is then computed exactly (f32 math over f16 keys and
//! values) over the chosen positions: [`AttentionRetriever::attend`].
//!
//! Memory layout: per (layer, kv_head), keys and values are `len * head_dim` f16, position-
//! major; the selector's index covers the same positions.

pub mod eval;
pub mod persist;
pub mod selector;

use crate::error::{Error, Result};
use crate::io::buf::Buf;
use crate::io::f16_to_f32;
use half::f16;
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;
use selector::{Aggregation, ChooseContext, HeadIndex, SelectorSpec};
use std::ops::Range;

/// How many positions a step attends to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// A fraction of the context (`B = round(ratio * len)`).
    Ratio(f64),
    /// A fixed number of positions.
    Tokens(usize),
}

/// The positions one step attends to, before retrieval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Positions cached (the query's own key included).
    pub len: usize,
    /// `0..sink` (clamped to `len`).
    pub sink: Range<usize>,
    /// The recent window `len - window .. len`.
    pub window: Range<usize>,
    /// Candidates for retrieval, between the sink and the window.
    pub candidates: Range<usize>,
    /// Positions to retrieve among the candidates.
    pub k: usize,
}

impl StepPlan {
    /// The plan for a cache of `len` positions: `B = max(budget, sink + 2)`,
    /// `window = (B - sink) / 2` unless fixed, `k = B - sink - window`.
    pub fn new(len: usize, sink: usize, window: Option<usize>, budget: Budget) -> StepPlan {
        let b = match budget {
            Budget::Ratio(r) => (r * len as f64).round() as usize,
            Budget::Tokens(n) => n,
        }
        .max(sink + 2);
        let window = window.unwrap_or((b - sink) / 2).min(len);
        let sink_end = sink.min(len - window);
        let candidates = sink_end..len - window;
        let k = (b.saturating_sub(sink + window)).min(candidates.len());
        StepPlan {
            len,
            sink: 0..sink_end,
            window: len - window..len,
            candidates,
            k,
        }
    }

    /// Sink, window and `chosen` positions, sorted, without duplicates.
    pub fn positions(&self, chosen: &[u32]) -> Vec<u32> {
        let mut all: Vec<u32> = self.sink.clone().map(|p| p as u32).collect();
        all.extend_from_slice(chosen);
        all.extend(self.window.clone().map(|p| p as u32));
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Settings of an [`AttentionRetriever`].
#[derive(Clone, Debug)]
pub struct RetrieverConfig {
    /// Layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per kv head (the GQA group size).
    pub group: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Always-attended first positions (default 32).
    pub sink: usize,
    /// Always-attended last positions; `None`: half of what the budget leaves after the sink.
    pub window: Option<usize>,
    /// Positions attended per step.
    pub budget: Budget,
    /// How candidates are scored.
    pub selector: SelectorSpec,
    /// How the group's query heads are combined.
    pub aggregation: Aggregation,
    /// Score scale (`1 / sqrt(head_dim)` unless the model says otherwise).
    pub scale: f32,
}

impl RetrieverConfig {
    /// Defaults: sink 32, window from the budget, budget 10 %, sum-of-softmax aggregation,
    /// 4-bit fast-scan with four dimensions per sub-quantizer (`m = head_dim / 4`, or the
    /// largest divisor of `head_dim` below it: 1/16 of the f16 keys' bytes), keys through the
    /// fitted transform, codebook refresh, no re-ranking. On the Gemma-3 dumps at a 10 %
    /// budget that is 1.08-1.13x the oracle's attention error at 7-9x the speed of exact
    /// scoring; `m = head_dim / 2` gives 1.02-1.05x at about 5x, and `rerank: 4` on top
    /// 1.00-1.01x at about 2x (README, "Measured").
    pub fn new(layers: usize, kv_heads: usize, group: usize, head_dim: usize) -> RetrieverConfig {
        RetrieverConfig {
            layers,
            kv_heads,
            group,
            head_dim,
            sink: 32,
            window: None,
            budget: Budget::Ratio(0.1),
            selector: SelectorSpec::FastScan {
                m: (1..=(head_dim / 4).clamp(1, 256))
                    .rev()
                    .find(|m| head_dim.is_multiple_of(*m))
                    .unwrap_or(1),
                rerank: 0,
                transform: true,
                refresh: true,
            },
            aggregation: Aggregation::SumSoftmax,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Keys, values and the selector's index of one (layer, kv_head).
struct HeadState {
    keys: Buf<f16>,
    values: Buf<f16>,
    index: Option<Box<dyn HeadIndex>>,
}

/// Per-layer, per-kv-head retrieval over a KV cache (the PQCache scheme).
pub struct AttentionRetriever {
    cfg: RetrieverConfig,
    heads: Vec<HeadState>,
    kernels: DistanceKernels,
}

impl AttentionRetriever {
    /// An empty cache.
    pub fn new(cfg: RetrieverConfig) -> Result<AttentionRetriever> {
        if cfg.layers == 0 || cfg.kv_heads == 0 || cfg.group == 0 || cfg.head_dim == 0 {
            return Err(Error::InvalidArgument(
                "layers, kv_heads, group and head_dim must be positive".into(),
            ));
        }
        if !cfg.scale.is_finite() || cfg.scale <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "scale must be positive, got {}",
                cfg.scale
            )));
        }
        if let Budget::Ratio(r) = cfg.budget {
            if !(r > 0.0 && r <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "budget ratio must be in (0, 1], got {r}"
                )));
            }
        }
        cfg.selector.validate(cfg.head_dim)?;
        let heads = (0..cfg.layers * cfg.kv_heads)
            .map(|_| HeadState {
                keys: Buf::new(),
                values: Buf::new(),
                index: None,
            })
            .collect();
        Ok(AttentionRetriever {
            cfg,
            heads,
            kernels: DistanceKernels::best(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RetrieverConfig {
        &self.cfg
    }

    /// Positions cached in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.heads
            .get(layer * self.cfg.kv_heads)
            .map_or(0, |h| h.keys.len() / self.cfg.head_dim)
    }

    /// Whether `layer` holds no position.
    pub fn is_empty(&self, layer: usize) -> bool {
        self.len(layer) == 0
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} out of range ({} layers)",
                self.cfg.layers
            )));
        }
        Ok(())
    }

    /// Stores a whole prompt for `layer` and builds each kv_head's index (trained on these
    /// keys; the kv_heads in parallel). `keys` and `values` are `[kv_head, token, dim]` f16.
    /// Replaces anything cached for the layer. Without the prompt's queries the fast-scan
    /// selector balances its sub-spaces on the keys alone: prefer
    /// [`AttentionRetriever::prefill_with_queries`] when they are at hand.
    pub fn prefill(&mut self, layer: usize, keys: &[f16], values: &[f16]) -> Result<()> {
        self.prefill_with_queries(layer, keys, values, &[])
    }

    /// [`AttentionRetriever::prefill`], with the prompt's queries (`[query_head, token, dim]`
    /// f16, any number of tokens, `kv_heads * group` query heads; may be empty): the fast-scan
    /// selector weighs each key channel by the root mean square of its group's queries in
    /// that channel before quantizing (see [`crate::pq::transform`]), which is what a
    /// prefill has already computed and what decides which keys score high.
    pub fn prefill_with_queries(
        &mut self,
        layer: usize,
        keys: &[f16],
        values: &[f16],
        queries: &[f16],
    ) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        if !keys.len().is_multiple_of(h * d) || keys.len() != values.len() {
            return Err(Error::DimensionMismatch {
                expected: h * d,
                got: keys.len() % (h * d),
            });
        }
        check_finite(keys, "keys")?;
        check_finite(values, "values")?;
        let qrow = h * self.cfg.group * d;
        if !queries.len().is_multiple_of(qrow) {
            return Err(Error::DimensionMismatch {
                expected: qrow,
                got: queries.len() % qrow,
            });
        }
        check_finite(queries, "queries")?;
        let group_len = queries.len() / h;
        let t = keys.len() / (h * d);
        let spec = self.cfg.selector.clone();
        let heads = &mut self.heads[layer * h..(layer + 1) * h];
        heads
            .par_iter_mut()
            .enumerate()
            .map(|(kv, state)| {
                let k = &keys[kv * t * d..(kv + 1) * t * d];
                let v = &values[kv * t * d..(kv + 1) * t * d];
                let k32 = f16_to_f32(k);
                let q32 = f16_to_f32(&queries[kv * group_len..(kv + 1) * group_len]);
                state.index = Some(spec.build(&k32, &q32, d, (layer * h + kv) as u64)?);
                state.keys = k.to_vec().into();
                state.values = v.to_vec().into();
                Ok(())
            })
            .collect::<Result<()>>()
    }

    /// Appends one decoded token to `layer`: `key` and `value` are `[kv_head, dim]`.
    pub fn append(&mut self, layer: usize, key: &[f16], value: &[f16]) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        if key.len() != h * d || value.len() != h * d {
            return Err(Error::DimensionMismatch {
                expected: h * d,
                got: key.len().min(value.len()),
            });
        }
        check_finite(key, "key")?;
        check_finite(value, "value")?;
        for (kv, state) in self.heads[layer * h..(layer + 1) * h]
            .iter_mut()
            .enumerate()
        {
            let k = &key[kv * d..(kv + 1) * d];
            let index = state.index.as_mut().ok_or(Error::NotTrained)?;
            let k32 = f16_to_f32(k);
            index.append(&k32)?;
            state.keys.to_mut().extend_from_slice(k);
            state
                .values
                .to_mut()
                .extend_from_slice(&value[kv * d..(kv + 1) * d]);
        }
        // The heads of a layer grow together, so a refresh comes due on all of them at once:
        // they re-train in parallel (and no thread is woken for the appends in between).
        let heads = &mut self.heads[layer * h..(layer + 1) * h];
        let len = heads[0].keys.len() / d;
        if heads
            .iter()
            .any(|s| s.index.as_ref().is_some_and(|i| i.refresh_due(len)))
        {
            heads
                .par_iter_mut()
                .try_for_each(|state| match state.index.as_mut() {
                    Some(index) => index.refresh_if_due(&state.keys, d).map(|_| ()),
                    None => Ok(()),
                })?;
        }
        Ok(())
    }

    /// The plan of the next step of `layer`.
    pub fn plan(&self, layer: usize) -> StepPlan {
        StepPlan::new(
            self.len(layer),
            self.cfg.sink,
            self.cfg.window,
            self.cfg.budget,
        )
    }

    /// One decode step's positions, per kv_head (sorted): sink, window and the retrieved
    /// ones. `queries` is `[query_head, dim]` f32 (`kv_heads * group` heads).
    pub fn select(&self, layer: usize, queries: &[f32]) -> Result<Vec<Vec<u32>>> {
        self.check_layer(layer)?;
        let (h, g, d) = (self.cfg.kv_heads, self.cfg.group, self.cfg.head_dim);
        if queries.len() != h * g * d {
            return Err(Error::DimensionMismatch {
                expected: h * g * d,
                got: queries.len(),
            });
        }
        crate::index::check_vectors(queries, d, "queries")?;
        if self.is_empty(layer) {
            return Err(Error::EmptyIndex);
        }
        let plan = self.plan(layer);
        (0..h)
            .into_par_iter()
            .map(|kv| self.choose_head(layer, kv, &queries[kv * g * d..(kv + 1) * g * d], &plan))
            .collect()
    }

    /// [`AttentionRetriever::select`] for one kv_head: `queries` is that head's group,
    /// `[group, dim]` f32. Lets a caller overlap one head's selection with another head's
    /// attention (the GPU adapter's pipeline).
    pub fn select_head(&self, layer: usize, kv_head: usize, queries: &[f32]) -> Result<Vec<u32>> {
        self.check_layer(layer)?;
        let (h, g, d) = (self.cfg.kv_heads, self.cfg.group, self.cfg.head_dim);
        if kv_head >= h {
            return Err(Error::InvalidArgument(format!(
                "kv_head {kv_head} out of range ({h} kv heads)"
            )));
        }
        if queries.len() != g * d {
            return Err(Error::DimensionMismatch {
                expected: g * d,
                got: queries.len(),
            });
        }
        crate::index::check_vectors(queries, d, "queries")?;
        if self.is_empty(layer) {
            return Err(Error::EmptyIndex);
        }
        self.choose_head(layer, kv_head, queries, &self.plan(layer))
    }

    fn choose_head(
        &self,
        layer: usize,
        kv: usize,
        queries: &[f32],
        plan: &StepPlan,
    ) -> Result<Vec<u32>> {
        let d = self.cfg.head_dim;
        let state = &self.heads[layer * self.cfg.kv_heads + kv];
        let index = state.index.as_ref().ok_or(Error::NotTrained)?;
        let chosen = if plan.k == 0 {
            Vec::new()
        } else {
            index.choose(&ChooseContext {
                queries,
                d,
                scale: self.cfg.scale,
                keys: &state.keys,
                candidates: plan.candidates.clone(),
                k: plan.k,
                aggregation: self.cfg.aggregation,
                kernels: &self.kernels,
                step: plan.len as u64,
            })?
        };
        Ok(plan.positions(&chosen))
    }

    /// The cached keys and values of (`layer`, `kv_head`): `[position, dim]` f16 each.
    pub fn kv(&self, layer: usize, kv_head: usize) -> Option<(&[f16], &[f16])> {
        let h = self.heads.get(layer * self.cfg.kv_heads + kv_head)?;
        (layer < self.cfg.layers && kv_head < self.cfg.kv_heads)
            .then(|| (h.keys.as_slice(), h.values.as_slice()))
    }

    /// The sparse attention output of one decode step: [`AttentionRetriever::select`], then
    /// softmax attention over the chosen positions only. Returns `[query_head, dim]` f32.
    pub fn attend(&self, layer: usize, queries: &[f32]) -> Result<Vec<f32>> {
        let positions = self.select(layer, queries)?;
        self.attend_positions(layer, queries, &positions)
    }

    /// Attention of `queries` (`[query_head, dim]`) over the given positions of each kv_head.
    pub fn attend_positions(
        &self,
        layer: usize,
        queries: &[f32],
        positions: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let (h, g, d) = (self.cfg.kv_heads, self.cfg.group, self.cfg.head_dim);
        if queries.len() != h * g * d || positions.len() != h {
            return Err(Error::DimensionMismatch {
                expected: h * g * d,
                got: queries.len(),
            });
        }
        let len = self.len(layer);
        let mut out = vec![0.0f32; h * g * d];
        for kv in 0..h {
            let state = &self.heads[layer * h + kv];
            if let Some(&p) = positions[kv].iter().find(|&&p| p as usize >= len) {
                return Err(Error::InvalidArgument(format!(
                    "position {p} beyond the cache ({len})"
                )));
            }
            for qi in 0..g {
                let q = &queries[(kv * g + qi) * d..(kv * g + qi + 1) * d];
                let o = &mut out[(kv * g + qi) * d..(kv * g + qi + 1) * d];
                attention(
                    &self.kernels,
                    q,
                    &state.keys,
                    &state.values,
                    d,
                    self.cfg.scale,
                    &positions[kv],
                    o,
                );
            }
        }
        Ok(out)
    }
}

fn check_finite(x: &[f16], what: &'static str) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFinite {
            what,
            row: i,
            col: 0,
        }),
        None => Ok(()),
    }
}

/// Softmax attention of one query over `positions` of `keys` / `values` (f16, position-major,
/// `d` wide) into `out` (`d`). Numerically stable (max subtracted); f32 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    kernels: &DistanceKernels,
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    d: usize,
    scale: f32,
    positions: &[u32],
    out: &mut [f32],
) {
    out.fill(0.0);
    if positions.is_empty() {
        return;
    }
    let logits: Vec<f32> = positions
        .iter()
        .map(|&p| kernels.dot_f16(q, &keys[p as usize * d..(p as usize + 1) * d]) * scale)
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    let mut v32 = vec![0.0f32; d];
    for (&p, &l) in positions.iter().zip(&logits) {
        let w = (l - max).exp();
        total += w;
        for (x, h) in v32
            .iter_mut()
            .zip(&values[p as usize * d..(p as usize + 1) * d])
        {
            *x = h.to_f32();
        }
        kernels.axpy(w, &v32, out);
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|x| *x *= inv);
}
