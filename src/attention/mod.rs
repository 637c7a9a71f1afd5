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
//!   for a ratio, or a fixed count. By default `window` = [`DEFAULT_WINDOW`] (16; `None`: half
//!   of what the budget leaves after the sink) and the remaining `k = B - sink - window`
//!   positions are *retrieved* among the candidates `sink .. len - window` by the
//!   [`selector`].
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
mod rows;
pub mod selector;

use crate::error::{Error, Result};
use crate::io::f16_to_f32;
use crate::pq::transform::QueryEnergy;
use half::f16;
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;
use rows::RowStore;
pub use rows::SplitRows;
use selector::{Aggregation, ChooseContext, Chosen, HeadIndex, SelectorSpec};
use std::borrow::Cow;
use std::ops::Range;

/// The default recent window: the last 16 positions, always attended. Measured end to end
/// (`pqcache-llm perplexity`, Gemma-3-270M, Pride and Prejudice, 2,560 prefilled + 512
/// decoded, budget 10 % / 5 %): KL to dense 0.0091 / 0.0170 with `fastscan:64x4` and the tail
/// term, against 0.0093 / 0.0253 with a 64-position window and 0.0113 at 10 % with half the
/// budget (the former default): a selector finds the recent tokens that matter by itself,
/// and a fixed share of the budget on the window is budget not retrieved.
pub const DEFAULT_WINDOW: usize = 16;

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
    /// `window = (B - sink) / 2` unless fixed (a fixed one at most `B - sink`),
    /// `k = B - sink - window`.
    pub fn new(len: usize, sink: usize, window: Option<usize>, budget: Budget) -> StepPlan {
        let b = match budget {
            Budget::Ratio(r) => (r * len as f64).round() as usize,
            Budget::Tokens(n) => n,
        }
        .max(sink + 2);
        // A fixed window is clipped to what the budget leaves after the sink.
        let window = window.unwrap_or((b - sink) / 2).min(b - sink).min(len);
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

/// The attention geometry of a model, as its config states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Layers whose KV the retriever holds (a model's global-attention layers, say).
    pub layers: usize,
    /// Query heads per layer.
    pub query_heads: usize,
    /// Key/value heads per layer; divides `query_heads` (GQA; equal for multi-head attention).
    pub kv_heads: usize,
    /// Width of one head's query, key and value.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads per kv_head (the GQA group size); 0 when `kv_heads` is 0.
    pub fn group(&self) -> usize {
        self.query_heads.checked_div(self.kv_heads).unwrap_or(0)
    }
}

/// Largest `layers * kv_heads` a retriever takes (one state per head: a million is far past
/// any model, and a typo's huge product must not become an allocation).
pub const MAX_HEAD_STATES: usize = 1 << 20;
/// Largest `head_dim`.
pub const MAX_HEAD_DIM: usize = 1 << 16;
/// Most `layers * kv_heads * head_dim`: each head keeps `2 * head_dim` f64 of statistics
/// from the start (1 GB at this limit; a 405B-parameter model needs 2^17).
pub const MAX_HEAD_ELEMS: usize = 1 << 26;

/// Settings of an [`AttentionRetriever`]. Build with [`RetrieverConfig::new`] and change
/// fields by name: `RetrieverConfig { budget: Budget::Ratio(0.05), ..RetrieverConfig::new(shape) }`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrieverConfig {
    /// Layers, heads and head width.
    pub shape: AttentionShape,
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
    /// Add the tail term to sparse attention (see [`TailTerm`]) when the selector estimates
    /// the unselected positions' mass (exact, PQ, fast-scan). Default on. Not stored in index
    /// files: a reopened cache takes the default.
    pub tail_term: bool,
}

impl RetrieverConfig {
    /// Defaults for a model of this shape: sink 32, window 16, budget 10 %, the tail term,
    /// sum-of-softmax aggregation, 4-bit fast-scan with four dimensions per sub-quantizer
    /// (`m = head_dim / 4`, or the largest divisor of `head_dim` below it: 1/16 of the f16
    /// keys' bytes), keys through the fitted transform, codebook refresh, no re-ranking. On
    /// the Gemma-3 dumps at a 10 % budget that is 1.08-1.13x the oracle's attention error at
    /// 7-9x the speed of exact scoring; `m = head_dim / 2` gives 1.02-1.05x at about 5x, and
    /// `rerank: 4` on top 1.00-1.01x at about 2x (README, "Measured").
    pub fn new(shape: AttentionShape) -> RetrieverConfig {
        let head_dim = shape.head_dim;
        RetrieverConfig {
            shape,
            sink: 32,
            window: Some(DEFAULT_WINDOW),
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
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            tail_term: true,
        }
    }

    /// Query heads per kv_head.
    pub fn group(&self) -> usize {
        self.shape.group()
    }

    /// Checks every setting; what [`AttentionRetriever::new`] runs.
    pub fn validate(&self) -> Result<()> {
        let s = &self.shape;
        if s.layers == 0 || s.kv_heads == 0 || s.query_heads == 0 || s.head_dim == 0 {
            return Err(Error::InvalidArgument(format!(
                "layers, query_heads, kv_heads and head_dim must be positive, got {s:?}"
            )));
        }
        if !s.query_heads.is_multiple_of(s.kv_heads) {
            return Err(Error::InvalidArgument(format!(
                "query_heads ({}) must be a multiple of kv_heads ({})",
                s.query_heads, s.kv_heads
            )));
        }
        match s.layers.checked_mul(s.kv_heads) {
            Some(n) if n <= MAX_HEAD_STATES && n.saturating_mul(s.head_dim) <= MAX_HEAD_ELEMS => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "layers x kv_heads x head_dim = {} x {} x {} is over the limits of \
                     {MAX_HEAD_STATES} heads and {MAX_HEAD_ELEMS} head elements",
                    s.layers, s.kv_heads, s.head_dim
                )))
            }
        }
        if s.head_dim > MAX_HEAD_DIM || s.query_heads > MAX_HEAD_STATES {
            return Err(Error::InvalidArgument(format!(
                "head_dim {} or query_heads {} over the limits ({MAX_HEAD_DIM}, {MAX_HEAD_STATES})",
                s.head_dim, s.query_heads
            )));
        }
        if !self.scale.is_finite() || self.scale <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "scale must be positive and finite, got {}",
                self.scale
            )));
        }
        check_budget(self.budget)?;
        self.selector.validate(s.head_dim)
    }
}

fn check_budget(budget: Budget) -> Result<()> {
    if let Budget::Ratio(r) = budget {
        if !(r > 0.0 && r <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "budget ratio must be in (0, 1], got {r}"
            )));
        }
    }
    Ok(())
}

/// Keys, values and the selector's index of one (layer, kv_head).
struct HeadState {
    keys: RowStore,
    values: RowStore,
    /// `None` until trained ([`AttentionRetriever::train`], or an `append` that brings the
    /// cache to the selector's minimum): selection is exact meanwhile.
    index: Option<Box<dyn HeadIndex>>,
    /// The group's queries seen by `extend`, for the fast-scan transform.
    queries: QueryEnergy,
    /// Per channel, the sum of every cached value (f64): the tail term's mean value.
    value_sum: Vec<f64>,
}

impl HeadState {
    fn empty(d: usize) -> HeadState {
        HeadState {
            keys: RowStore::new(),
            values: RowStore::new(),
            index: None,
            queries: QueryEnergy::new(d),
            value_sum: vec![0.0; d],
        }
    }
}

/// One head's keys and values, `[position, dim]` f16 each ([`AttentionRetriever::kv`]).
pub type KvPair<'a> = (Cow<'a, [f16]>, Cow<'a, [f16]>);

/// Per-layer, per-kv-head retrieval over a KV cache (the PQCache scheme). The retriever owns
/// the cache: a model appends each position's key and value here and reads them back with
/// [`AttentionRetriever::kv`] (dense attention) or attends through
/// [`AttentionRetriever::attend`] (sparse).
///
/// Layouts, the same for every entry point: keys and values are f16, queries f32, all
/// head-major: `[kv_head, token, head_dim]` for keys and values, `[query_head, token,
/// head_dim]` for queries (one token: `[head, head_dim]`). Query head `q` belongs to kv_head
/// `q / group`.
pub struct AttentionRetriever {
    cfg: RetrieverConfig,
    heads: Vec<HeadState>,
    kernels: DistanceKernels,
}

impl AttentionRetriever {
    /// An empty cache.
    pub fn new(cfg: RetrieverConfig) -> Result<AttentionRetriever> {
        cfg.validate()?;
        let d = cfg.shape.head_dim;
        let heads = (0..cfg.shape.layers * cfg.shape.kv_heads)
            .map(|_| HeadState::empty(d))
            .collect();
        Ok(AttentionRetriever {
            cfg,
            heads,
            kernels: DistanceKernels::best(),
        })
    }

    /// A copy of this cache (keys, values and the queries `extend` saw) under `cfg`, another
    /// selector or budget for the same shape, with every layer long enough trained for it:
    /// one prefill serves several methods. The copy owns its memory.
    pub fn fork(&self, cfg: RetrieverConfig) -> Result<AttentionRetriever> {
        cfg.validate()?;
        if cfg.shape != self.cfg.shape {
            return Err(Error::InvalidArgument(format!(
                "a fork keeps the cache's shape {:?}, not {:?}",
                self.cfg.shape, cfg.shape
            )));
        }
        let heads = self
            .heads
            .iter()
            .map(|h| HeadState {
                keys: h.keys.to_owned_store(),
                values: h.values.to_owned_store(),
                index: None,
                queries: h.queries.clone(),
                value_sum: h.value_sum.clone(),
            })
            .collect();
        let mut fork = AttentionRetriever {
            cfg,
            heads,
            kernels: self.kernels,
        };
        for layer in 0..fork.cfg.shape.layers {
            fork.train(layer)?;
        }
        Ok(fork)
    }

    /// The settings.
    pub fn config(&self) -> &RetrieverConfig {
        &self.cfg
    }

    /// Changes the budget of the steps to come (the cache and indexes stay as they are).
    pub fn set_budget(&mut self, budget: Budget) -> Result<()> {
        check_budget(budget)?;
        self.cfg.budget = budget;
        Ok(())
    }

    /// Takes the step settings of `cfg` (budget, sink, window, tail term, aggregation,
    /// scale) for this cache, whose shape and selector `cfg` must keep: the indexes stay as
    /// trained. Another selector needs [`AttentionRetriever::fork`], which trains anew.
    pub fn reconfigure(&mut self, cfg: RetrieverConfig) -> Result<()> {
        cfg.validate()?;
        if cfg.shape != self.cfg.shape || cfg.selector != self.cfg.selector {
            return Err(Error::InvalidArgument(format!(
                "reconfigure keeps the shape {:?} and the selector {} (got {:?}, {}): fork \
                 for another",
                self.cfg.shape, self.cfg.selector, cfg.shape, cfg.selector
            )));
        }
        self.cfg = cfg;
        Ok(())
    }

    /// Positions cached in `layer` (0 for a layer out of range).
    pub fn len(&self, layer: usize) -> usize {
        self.heads
            .get(layer * self.cfg.shape.kv_heads)
            .filter(|_| layer < self.cfg.shape.layers)
            .map_or(0, |h| h.keys.len() / self.cfg.shape.head_dim)
    }

    /// Whether `layer` holds no position.
    pub fn is_empty(&self, layer: usize) -> bool {
        self.len(layer) == 0
    }

    /// Whether `layer`'s indexes are trained (until then selection is exact).
    pub fn is_trained(&self, layer: usize) -> bool {
        self.layer(layer)
            .is_ok_and(|heads| heads.iter().all(|h| h.index.is_some()))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.shape.layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} out of range ({} layers)",
                self.cfg.shape.layers
            )));
        }
        Ok(())
    }

    fn layer(&self, layer: usize) -> Result<&[HeadState]> {
        self.check_layer(layer)?;
        let h = self.cfg.shape.kv_heads;
        Ok(&self.heads[layer * h..(layer + 1) * h])
    }

    fn layer_mut(&mut self, layer: usize) -> Result<&mut [HeadState]> {
        self.check_layer(layer)?;
        let h = self.cfg.shape.kv_heads;
        Ok(&mut self.heads[layer * h..(layer + 1) * h])
    }

    /// A whole prompt at once: clears `layer`, [`AttentionRetriever::extend`]s it with the
    /// prompt and [`AttentionRetriever::train`]s its indexes (the kv_heads in parallel).
    /// `queries` are the prompt's queries (may be empty, or any number of tokens): the
    /// fast-scan selector weighs each key channel by the root mean square of its group's
    /// queries in that channel before quantizing (see [`crate::pq::transform`]), which is
    /// what a prefill has already computed and what decides which keys score high.
    pub fn prefill(
        &mut self,
        layer: usize,
        keys: &[f16],
        values: &[f16],
        queries: &[f32],
    ) -> Result<()> {
        self.check_layer(layer)?;
        let d = self.cfg.shape.head_dim;
        self.layer_mut(layer)?
            .iter_mut()
            .for_each(|h| *h = HeadState::empty(d));
        self.extend(layer, keys, values, queries)?;
        self.train(layer)
    }

    /// Appends `t` positions to `layer` (a prefill chunk): `keys` and `values` are
    /// `[kv_head, t, dim]`, `queries` `[query_head, t', dim]` with any `t'` (may be empty;
    /// they only feed the transform's statistics). Trains nothing: call
    /// [`AttentionRetriever::train`] once the prompt is in. A trained index takes the keys
    /// (and re-trains if its refresh comes due).
    pub fn extend(
        &mut self,
        layer: usize,
        keys: &[f16],
        values: &[f16],
        queries: &[f32],
    ) -> Result<()> {
        self.check_layer(layer)?;
        let s = self.cfg.shape;
        let (h, d) = (s.kv_heads, s.head_dim);
        if keys.len() != values.len() {
            return Err(Error::DimensionMismatch {
                expected: keys.len(),
                got: values.len(),
            });
        }
        if !keys.len().is_multiple_of(h * d) {
            // Keys are [kv_head, token, dim]: whole rows of kv_heads * head_dim.
            return Err(Error::rows("keys", keys.len(), h * d));
        }
        let qrow = s.query_heads * d;
        if !queries.len().is_multiple_of(qrow) {
            // Queries are [query_head, token, dim].
            return Err(Error::rows("queries", queries.len(), qrow));
        }
        check_finite(keys, "keys", h, d)?;
        check_finite(values, "values", h, d)?;
        if !queries.is_empty() {
            let per_head = queries.len() / s.query_heads;
            for (head, q) in queries.chunks_exact(per_head).enumerate() {
                crate::check::check_vectors(q, d, "queries").map_err(|e| of_head(e, head))?;
            }
        }
        let t = keys.len() / (h * d);
        let group_len = queries.len() / h;
        let heads = self.layer_mut(layer)?;
        heads
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(kv, state)| {
                let k = &keys[kv * t * d..(kv + 1) * t * d];
                state
                    .queries
                    .add(&queries[kv * group_len..(kv + 1) * group_len])?;
                if let Some(index) = state.index.as_mut() {
                    for key in k.chunks_exact(d) {
                        index.append(&f16_to_f32(key))?;
                    }
                }
                state.keys.push(k);
                let v = &values[kv * t * d..(kv + 1) * t * d];
                add_rows(&mut state.value_sum, v);
                state.values.push(v);
                Ok::<(), Error>(())
            })?;
        self.refresh_if_due(layer)
    }

    /// Trains `layer`'s indexes on every cached key (and the queries `extend` saw), the
    /// kv_heads in parallel, replacing any index it had. Below the selector's
    /// [`SelectorSpec::min_train_len`] the heads stay untrained and selection stays exact.
    pub fn train(&mut self, layer: usize) -> Result<()> {
        let len = self.len(layer);
        let (kvh, d) = (self.cfg.shape.kv_heads, self.cfg.shape.head_dim);
        if len < self.cfg.selector.min_train_len() {
            return Ok(());
        }
        let spec = self.cfg.selector.clone();
        self.layer_mut(layer)?
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(kv, state)| {
                let k32 = f16_to_f32(&state.keys.contiguous());
                state.index =
                    Some(spec.build(&k32, &state.queries, d, (layer * kvh + kv) as u64)?);
                Ok(())
            })
    }

    /// Appends one decoded token to `layer`: `key` and `value` are `[kv_head, dim]`. Trains
    /// the layer's indexes once the cache reaches the selector's minimum (a short prompt).
    pub fn append(&mut self, layer: usize, key: &[f16], value: &[f16]) -> Result<()> {
        self.append_with_queries(layer, key, value, &[])
    }

    /// [`AttentionRetriever::append`] with the step's queries (`[query_head, dim]`, or empty):
    /// they join the prompt's in the statistics the fast-scan transform is re-fitted to when
    /// a refresh comes due (decoded queries drift with position as the keys do), at
    /// `head_dim^2` multiply-adds per query head.
    pub fn append_with_queries(
        &mut self,
        layer: usize,
        key: &[f16],
        value: &[f16],
        queries: &[f32],
    ) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.cfg.shape.kv_heads, self.cfg.shape.head_dim);
        for x in [key, value] {
            if x.len() != h * d {
                // One token: [kv_head, dim].
                return Err(Error::DimensionMismatch {
                    expected: h * d,
                    got: x.len(),
                });
            }
        }
        let qrow = self.cfg.shape.query_heads * d;
        if !queries.is_empty() && queries.len() != qrow {
            // One token: [query_head, dim].
            return Err(Error::DimensionMismatch {
                expected: qrow,
                got: queries.len(),
            });
        }
        self.extend(layer, key, value, queries)?;
        if !self.is_trained(layer) && self.len(layer) >= self.cfg.selector.min_train_len() {
            self.train(layer)?;
        }
        Ok(())
    }

    /// The heads of a layer grow together, so a refresh comes due on all of them at once:
    /// they re-train in parallel (and no thread is woken for the appends in between).
    fn refresh_if_due(&mut self, layer: usize) -> Result<()> {
        let len = self.len(layer);
        let d = self.cfg.shape.head_dim;
        let heads = self.layer_mut(layer)?;
        if heads
            .iter()
            .any(|s| s.index.as_ref().is_some_and(|i| i.refresh_due(len)))
        {
            heads
                .par_iter_mut()
                .try_for_each(|state| match state.index.as_mut() {
                    Some(index) => index
                        .refresh_if_due(&state.keys.contiguous(), d, &state.queries)
                        .map(|_| ()),
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

    fn check_step_queries(&self, layer: usize, queries: &[f32], heads: usize) -> Result<()> {
        self.check_layer(layer)?;
        let d = self.cfg.shape.head_dim;
        if queries.len() != heads * d {
            // One step's queries: [query_head, dim].
            return Err(Error::DimensionMismatch {
                expected: heads * d,
                got: queries.len(),
            });
        }
        crate::check::check_vectors(queries, d, "queries")?;
        if self.is_empty(layer) {
            // Nothing to attend to: prefill or append first.
            return Err(Error::EmptyIndex);
        }
        Ok(())
    }

    /// One decode step's positions, per kv_head (sorted): sink, window and the retrieved
    /// ones. `queries` is `[query_head, dim]`.
    pub fn select(&self, layer: usize, queries: &[f32]) -> Result<Vec<Vec<u32>>> {
        Ok(strip(self.select_by(layer, queries, false, false)?))
    }

    /// What the `exact` selector (the oracle) would choose at this step, under the same
    /// plan: the reference for a selector's recall.
    pub fn select_oracle(&self, layer: usize, queries: &[f32]) -> Result<Vec<Vec<u32>>> {
        Ok(strip(self.select_by(layer, queries, true, false)?))
    }

    /// [`AttentionRetriever::select`] with each kv_head's tail estimate, for
    /// [`AttentionRetriever::attend_selection`].
    pub fn select_step(&self, layer: usize, queries: &[f32]) -> Result<Vec<HeadSelection>> {
        self.select_by(layer, queries, false, self.cfg.tail_term)
    }

    /// [`AttentionRetriever::select_oracle`] with each kv_head's (exact) tail.
    pub fn select_step_oracle(&self, layer: usize, queries: &[f32]) -> Result<Vec<HeadSelection>> {
        self.select_by(layer, queries, true, self.cfg.tail_term)
    }

    /// Every kv_head's choice; `tail`: with the tail estimates.
    fn select_by(
        &self,
        layer: usize,
        queries: &[f32],
        oracle: bool,
        tail: bool,
    ) -> Result<Vec<HeadSelection>> {
        let s = self.cfg.shape;
        self.check_step_queries(layer, queries, s.query_heads)?;
        let (g, d) = (s.group(), s.head_dim);
        let plan = self.plan(layer);
        (0..s.kv_heads)
            .into_par_iter()
            .map(|kv| {
                self.choose_head(
                    layer,
                    kv,
                    &queries[kv * g * d..(kv + 1) * g * d],
                    &plan,
                    oracle,
                    tail,
                )
            })
            .collect()
    }

    /// [`AttentionRetriever::select`] for one kv_head: `queries` is that head's group,
    /// `[group, dim]`. Lets a caller overlap one head's selection with another head's
    /// attention (the GPU adapter's pipeline).
    pub fn select_head(&self, layer: usize, kv_head: usize, queries: &[f32]) -> Result<Vec<u32>> {
        let s = self.cfg.shape;
        if kv_head >= s.kv_heads {
            return Err(Error::InvalidArgument(format!(
                "select_head: kv_head {kv_head} out of range ({} kv heads)",
                s.kv_heads
            )));
        }
        self.check_step_queries(layer, queries, s.group())?;
        Ok(self
            .choose_head(layer, kv_head, queries, &self.plan(layer), false, false)?
            .positions)
    }

    fn choose_head(
        &self,
        layer: usize,
        kv: usize,
        queries: &[f32],
        plan: &StepPlan,
        oracle: bool,
        tail: bool,
    ) -> Result<HeadSelection> {
        let state = &self.heads[layer * self.cfg.shape.kv_heads + kv];
        let chosen = if plan.k == 0 {
            Chosen::default()
        } else {
            let ctx = ChooseContext {
                queries,
                d: self.cfg.shape.head_dim,
                scale: self.cfg.scale,
                keys: state.keys.view(),
                candidates: plan.candidates.clone(),
                k: plan.k,
                aggregation: self.cfg.aggregation,
                kernels: &self.kernels,
                step: plan.len as u64,
                tail,
            };
            match (&state.index, oracle) {
                (Some(index), false) => index.choose(&ctx)?,
                _ => selector::choose_exact(&ctx),
            }
        };
        Ok(HeadSelection {
            positions: plan.positions(&chosen.positions),
            tail: chosen.tail,
        })
    }

    /// The cached keys and values of (`layer`, `kv_head`): `[position, dim]` f16 each,
    /// borrowed (a copy only for a cache opened from a file and appended to since: its rows
    /// are then in two pieces).
    pub fn kv(&self, layer: usize, kv_head: usize) -> Option<KvPair<'_>> {
        let h = self.heads.get(layer * self.cfg.shape.kv_heads + kv_head)?;
        (layer < self.cfg.shape.layers && kv_head < self.cfg.shape.kv_heads)
            .then(|| (h.keys.contiguous(), h.values.contiguous()))
    }

    /// The sparse attention output of one decode step: [`AttentionRetriever::select`], then
    /// softmax attention over the chosen positions only. Returns `[query_head, dim]`.
    pub fn attend(&self, layer: usize, queries: &[f32]) -> Result<Vec<f32>> {
        let step = self.select_step(layer, queries)?;
        self.attend_selection(layer, queries, &step)
    }

    /// Sparse attention of `queries` (`[query_head, dim]`) over a step's selection (one
    /// [`HeadSelection`] per kv_head), with the tail term where the selection carries one.
    pub fn attend_selection(
        &self,
        layer: usize,
        queries: &[f32],
        step: &[HeadSelection],
    ) -> Result<Vec<f32>> {
        let s = self.cfg.shape;
        let positions: Vec<&[u32]> = step.iter().map(|h| h.positions.as_slice()).collect();
        self.check_positions(layer, queries, &positions)?;
        if let Some(t) = step
            .iter()
            .filter_map(|h| h.tail.as_ref())
            .find(|t| t.len() != s.group())
        {
            return Err(Error::InvalidArgument(format!(
                "attend_selection: a tail estimate per query head of the group ({}), got {}",
                s.group(),
                t.len()
            )));
        }
        let len = self.len(layer);
        let heads = self.layer(layer)?;
        let tails: Vec<Option<TailTerm<'_>>> = step
            .iter()
            .zip(heads)
            .map(|(h, state)| {
                h.tail.as_ref().map(|t| TailTerm {
                    log_mass: t,
                    value_sum: &state.value_sum,
                    len,
                })
            })
            .collect();
        self.attend_each_head(layer, queries, |kv| {
            (Positions::At(positions[kv]), tails[kv])
        })
    }

    /// Full (dense) attention of one step's `queries` (`[query_head, dim]`) over every cached
    /// position of `layer`: the reference [`AttentionRetriever::attend`] approximates, with the
    /// same kernels (a budget of 100 % gives the same bits).
    pub fn attend_all(&self, layer: usize, queries: &[f32]) -> Result<Vec<f32>> {
        let s = self.cfg.shape;
        self.check_step_queries(layer, queries, s.query_heads)?;
        let len = self.len(layer);
        self.attend_each_head(layer, queries, |_| (Positions::Range(0..len), None))
    }

    /// Attention of `queries` (`[query_head, dim]`) over the given positions of each kv_head
    /// (`positions[kv_head]`, any order).
    pub fn attend_positions(
        &self,
        layer: usize,
        queries: &[f32],
        positions: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        let lists: Vec<&[u32]> = positions.iter().map(|p| p.as_slice()).collect();
        self.check_positions(layer, queries, &lists)?;
        self.attend_each_head(layer, queries, |kv| (Positions::At(&positions[kv]), None))
    }

    fn check_positions(&self, layer: usize, queries: &[f32], positions: &[&[u32]]) -> Result<()> {
        let s = self.cfg.shape;
        self.check_step_queries(layer, queries, s.query_heads)?;
        if positions.len() != s.kv_heads {
            return Err(Error::InvalidArgument(format!(
                "attend: one position list per kv_head ({}), got {}",
                s.kv_heads,
                positions.len()
            )));
        }
        let len = self.len(layer);
        if let Some(&p) = positions
            .iter()
            .copied()
            .flatten()
            .find(|&&p| p as usize >= len)
        {
            return Err(Error::InvalidArgument(format!(
                "attend: position {p} beyond the cache ({len} positions)"
            )));
        }
        Ok(())
    }

    fn attend_each_head<'p>(
        &self,
        layer: usize,
        queries: &[f32],
        positions: impl Fn(usize) -> (Positions<'p>, Option<TailTerm<'p>>) + Sync,
    ) -> Result<Vec<f32>> {
        let s = self.cfg.shape;
        let (g, d) = (s.group(), s.head_dim);
        let mut out = vec![0.0f32; s.query_heads * d];
        let heads = self.layer(layer)?;
        out.par_chunks_mut(g * d)
            .zip(heads)
            .enumerate()
            .for_each(|(kv, (o, state))| {
                let (positions, tail) = positions(kv);
                group_attention_rows(
                    &self.kernels,
                    &queries[kv * g * d..(kv + 1) * g * d],
                    state.keys.view(),
                    state.values.view(),
                    d,
                    self.cfg.scale,
                    positions,
                    tail.as_ref(),
                    o,
                )
            });
        Ok(out)
    }
}

/// `sum[c] += row[c]` for every `sum.len()`-wide row of `rows`.
fn add_rows(sum: &mut [f64], rows: &[f16]) {
    // Widened a row at a time in bulk (F16C where present): a per-element `to_f64` runs the
    // CPU-feature check and a scalar conversion each time, two thirds of a 128K-token
    // prefill's bookkeeping. f16 -> f32 -> f64 is exact, so the sums are the same.
    let mut row32 = vec![0.0f32; sum.len()];
    for row in rows.chunks_exact(sum.len().max(1)) {
        crate::io::widen_f16(row, &mut row32);
        for (s, &v) in sum.iter_mut().zip(&row32) {
            *s += v as f64;
        }
    }
}

/// Checks that `x` (`[head, token, d]` over `heads` heads) is finite; an error names the head
/// and the token within it.
fn check_finite(x: &[f16], what: &'static str, heads: usize, d: usize) -> Result<()> {
    let per_head = (x.len() / heads.max(1)).max(1);
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFinite {
            what,
            head: Some(i / per_head),
            row: i % per_head / d.max(1),
            col: i % d.max(1),
        }),
        None => Ok(()),
    }
}

/// `e` about one head's part of a `[head, token, dim]` input, said of that head.
fn of_head(e: Error, head: usize) -> Error {
    match e {
        Error::NonFinite { what, row, col, .. } => Error::NonFinite {
            what,
            head: Some(head),
            row,
            col,
        },
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("head {head}: {m}")),
        e => e,
    }
}

/// One kv_head's part of a decode step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadSelection {
    /// Sink, window and retrieved positions, ascending.
    pub positions: Vec<u32>,
    /// Per query head of the group, `ln sum exp(logit)` over the positions *not* attended,
    /// as the selector estimates it; `None` without an estimate or with the tail term off.
    pub tail: Option<Vec<f32>>,
}

/// The positions of each kv_head's selection.
fn strip(step: Vec<HeadSelection>) -> Vec<Vec<u32>> {
    step.into_iter().map(|h| h.positions).collect()
}

/// The tail term of sparse attention. Top-k attention drops the unselected positions'
/// softmax mass, which over-weights the selected ones; with the selector's estimate `T` of
/// that mass (`T = sum exp(logit)` over the positions not attended) and the mean `v_rest` of
/// their values (every value's running sum less the attended ones', read anyway), each query
/// head's output becomes `(sum_sel e_j v_j + T v_rest) / (sum_sel e_j + T)`: full attention
/// with the tail's values replaced by their mean (SparQ's mean-value reallocation, with the
/// mass estimated from the selector's scores). Exact when nothing is left out.
#[derive(Clone, Copy, Debug)]
pub struct TailTerm<'a> {
    /// Per query head of the group, `ln T`.
    pub log_mass: &'a [f32],
    /// Per channel, the sum of every cached value.
    pub value_sum: &'a [f64],
    /// Positions cached.
    pub len: usize,
}

/// Which cached positions an attention step reads.
#[derive(Clone, Debug)]
pub enum Positions<'a> {
    /// A contiguous run (dense attention).
    Range(Range<usize>),
    /// Listed positions (sparse attention), any order.
    At(&'a [u32]),
}

impl Positions<'_> {
    fn len(&self) -> usize {
        match self {
            Positions::Range(r) => r.len(),
            Positions::At(p) => p.len(),
        }
    }

    fn get(&self, j: usize) -> usize {
        match self {
            Positions::Range(r) => r.start + j,
            Positions::At(p) => p[j] as usize,
        }
    }
}

/// Softmax attention of a GQA group's queries (`queries`: `g * d`, one row per query head)
/// over `positions` of `keys` / `values` (f16, position-major, `d` wide) into `out` (`g * d`).
/// Each key and value row is read and widened once for the whole group; logits in one grouped
/// dot pass, max subtracted, f32 accumulation. The same arithmetic for a range and for the
/// same positions listed, so a budget of 100 % reproduces dense attention bit for bit. With
/// `tail`, the [`TailTerm`] joins each head's sum (`positions` must then be distinct).
/// Panics if the shapes disagree or a position is out of range.
#[allow(clippy::too_many_arguments)]
pub fn group_attention(
    kernels: &DistanceKernels,
    queries: &[f32],
    keys: &[f16],
    values: &[f16],
    d: usize,
    scale: f32,
    positions: Positions<'_>,
    tail: Option<&TailTerm<'_>>,
    out: &mut [f32],
) {
    group_attention_rows(
        kernels,
        queries,
        SplitRows::whole(keys),
        SplitRows::whole(values),
        d,
        scale,
        positions,
        tail,
        out,
    )
}

/// [`group_attention`] over rows that may be in two pieces (an opened cache appended to).
#[allow(clippy::too_many_arguments)]
fn group_attention_rows(
    kernels: &DistanceKernels,
    queries: &[f32],
    keys: SplitRows<'_>,
    values: SplitRows<'_>,
    d: usize,
    scale: f32,
    positions: Positions<'_>,
    tail: Option<&TailTerm<'_>>,
    out: &mut [f32],
) {
    assert!(
        d > 0 && queries.len().is_multiple_of(d),
        "queries must hold whole rows of d"
    );
    assert_eq!(out.len(), queries.len(), "out must match queries");
    assert_eq!(keys.len(), values.len(), "keys and values must match");
    out.fill(0.0);
    let (n, g) = (positions.len(), queries.len() / d);
    if n == 0 || g == 0 {
        return;
    }
    let mut logits = vec![0.0f32; g * n];
    match &positions {
        Positions::Range(r) => keys.dot_group_run(kernels, queries, g, d, r.clone(), &mut logits),
        Positions::At(p) => keys.dot_group_at(kernels, queries, g, d, p, &mut logits),
    }
    let (mut inv, mut maxes, mut totals) = (vec![0.0f32; g], vec![0.0f32; g], vec![0.0f32; g]);
    for (qi, row) in logits.chunks_exact_mut(n).enumerate() {
        row.iter_mut().for_each(|l| *l *= scale);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for l in row.iter_mut() {
            *l = selector::exp_nonpositive(*l - max);
            total += *l;
        }
        (inv[qi], maxes[qi], totals[qi]) = (1.0 / total, max, total);
    }
    let rest = tail.filter(|t| t.len > n && t.value_sum.len() == d && t.log_mass.len() == g);
    let mut attended = vec![0.0f64; if rest.is_some() { d } else { 0 }];
    let mut v32 = vec![0.0f32; d];
    for j in 0..n {
        let p = positions.get(j);
        crate::io::widen_f16(values.row(p, d), &mut v32);
        for (qi, o) in out.chunks_exact_mut(d).enumerate() {
            kernels.axpy(logits[qi * n + j], &v32, o);
        }
        for (a, &v) in attended.iter_mut().zip(&v32) {
            *a += v as f64;
        }
    }
    let Some(t) = rest else {
        for (o, &inv) in out.chunks_exact_mut(d).zip(&inv) {
            o.iter_mut().for_each(|x| *x *= inv);
        }
        return;
    };
    let others = (t.len - n) as f64;
    let mean: Vec<f64> = t
        .value_sum
        .iter()
        .zip(&attended)
        .map(|(&all, &a)| (all - a) / others)
        .collect();
    for (qi, o) in out.chunks_exact_mut(d).enumerate() {
        // The tail's mass relative to the head's largest attended logit (capped: a tail
        // of e^80 times the best attended token would make the attended part vanish anyway).
        let mass = ((t.log_mass[qi] - maxes[qi]) as f64).min(80.0).exp();
        if !mass.is_finite() || mass <= 0.0 {
            o.iter_mut().for_each(|x| *x *= inv[qi]);
            continue;
        }
        let denom = totals[qi] as f64 + mass;
        for (x, &m) in o.iter_mut().zip(&mean) {
            *x = ((*x as f64 + mass * m) / denom) as f32;
        }
    }
}

/// [`group_attention`] of one query over listed `positions`.
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
    group_attention(
        kernels,
        q,
        keys,
        values,
        d,
        scale,
        Positions::At(positions),
        None,
        out,
    )
}
