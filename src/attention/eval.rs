//! How close sparse attention stays to full attention on real model data.
//!
//! Protocol (the one `pqcache eval-attention` runs), for a dump of `T` tokens: for every layer
//! and `P` decode positions `t` evenly spaced in `[T/2, T)`, the indexes are trained on the keys
//! of `[0, T/2)` (the prefill; fast-scan also fits its channel scale to the prefill's
//! queries: [`super::AttentionRetriever::prefill`]) and the keys of
//! `[T/2, t]` are appended one by one (decoded tokens; fast-scan re-trains on all the cached
//! keys as the cache grows, see [`super::selector`], unless `:static`). At `t`, the budget is
//! `B = max(ratio * (t + 1), sink + 2)`, the window `W` the retriever's default
//! ([`super::DEFAULT_WINDOW`]), `k = B - sink - W` positions are retrieved among
//! `[sink, t + 1 - W)`. Per query head: `mass` = full-attention probability of the attended
//! set; `err` = `||o_S - o|| / ||o||` with `o_S` the retriever's sparse output
//! ([`super::AttentionRetriever::attend_selection`]: the softmax over the set, with the tail
//! term where the selector estimates it), the same for the oracle's set. Per kv_head:
//! `recall` = overlap of the retrieved positions with the exact top-k under the same
//! aggregation (the `exact` selector's choice), over `k`.

use super::selector::{Aggregation, SelectorSpec};
use super::{check_budget, AttentionRetriever, AttentionShape, Budget, RetrieverConfig};
use crate::error::{Error, Result};
use crate::io::dump::AttentionDump;
use crate::io::f16_to_f32;
use pqcache_simd::distance::DistanceKernels;
use std::time::Instant;

/// Settings of an evaluation.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Budget ratios.
    pub ratios: Vec<f64>,
    /// Decode positions per layer.
    pub positions: usize,
    /// Selectors to compare.
    pub selectors: Vec<SelectorSpec>,
    /// Sink size.
    pub sink: usize,
    /// Group aggregation.
    pub aggregation: Aggregation,
}

/// One row of results: means over layers, positions and heads.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRow {
    /// Budget ratio.
    pub ratio: f64,
    /// Selector name.
    pub selector: String,
    /// Mean full-attention probability mass of the attended set.
    pub mass: f64,
    /// Mean overlap with the exact top-k.
    pub recall: f64,
    /// Mean relative error of the attention output.
    pub err: f64,
    /// The same error for the exact selector (the oracle).
    pub oracle_err: f64,
    /// Wall time of one step's selection (all kv_heads of a layer), microseconds.
    pub select_us_per_step: f64,
}

/// The decode positions of the protocol: `positions` values evenly spaced in `[T/2, T)`.
pub fn decode_positions(tokens: usize, positions: usize) -> Vec<usize> {
    let half = tokens / 2;
    let span = tokens - half;
    let mut out: Vec<usize> = (0..positions.min(span))
        .map(|i| half + i * span / positions.min(span))
        .collect();
    out.dedup();
    out
}

#[derive(Default, Clone)]
struct Acc {
    mass: f64,
    err: f64,
    oracle_err: f64,
    recall: f64,
    heads: usize,
    groups: usize,
    select_s: f64,
    steps: usize,
}

/// Runs the protocol on a dump, through [`AttentionRetriever`] (one per selector, every
/// layer of the dump): `prefill` with `[0, T/2)` and its queries, `append` token by token,
/// `select` per ratio (`set_budget`), `select_oracle` for the recall and the oracle's error.
/// Rows are ordered by ratio, then selector.
pub fn evaluate(dump: &AttentionDump, cfg: &EvalConfig) -> Result<Vec<EvalRow>> {
    if dump.v.is_empty() {
        return Err(Error::InvalidArgument(
            "the dump has no v.npy: values are needed".into(),
        ));
    }
    if dump.tokens < 4 || cfg.positions == 0 || cfg.ratios.is_empty() || cfg.selectors.is_empty() {
        return Err(Error::InvalidArgument(
            "need >= 4 tokens, positions, ratios and selectors".into(),
        ));
    }
    for &r in &cfg.ratios {
        check_budget(Budget::Ratio(r))?;
    }
    let (d, g, kvh, tokens) = (dump.head_dim, dump.group_size(), dump.kv_heads, dump.tokens);
    let shape = AttentionShape {
        layers: dump.layers.len(),
        query_heads: dump.q_heads,
        kv_heads: kvh,
        head_dim: d,
    };
    let prefill = tokens / 2;
    let steps = decode_positions(tokens, cfg.positions);
    let kernels = DistanceKernels::best();
    let mut accs = vec![vec![Acc::default(); cfg.selectors.len()]; cfg.ratios.len()];
    for (si, spec) in cfg.selectors.iter().enumerate() {
        let mut retriever = AttentionRetriever::new(RetrieverConfig {
            sink: cfg.sink,
            budget: Budget::Ratio(cfg.ratios[0]),
            selector: spec.clone(),
            aggregation: cfg.aggregation,
            scale: dump.scale,
            ..RetrieverConfig::new(shape)
        })?;
        for layer in 0..dump.layers.len() {
            let keys_of = |h: usize| dump.keys(layer, h);
            let values_of = |h: usize| dump.values(layer, h);
            let queries_of = |h: usize| dump.queries(layer, h);
            retriever.prefill(
                layer,
                &rows(keys_of, kvh, 0..prefill, d),
                &rows(values_of, kvh, 0..prefill, d),
                &f16_to_f32(&rows(queries_of, dump.q_heads, 0..prefill, d)),
            )?;
            let mut next = prefill;
            for &t in &steps {
                // Decoded tokens prefill..=t enter the cache one by one, with their queries
                // (as a decode step hands them over).
                while next <= t {
                    retriever.append_with_queries(
                        layer,
                        &rows(keys_of, kvh, next..next + 1, d),
                        &rows(values_of, kvh, next..next + 1, d),
                        &f16_to_f32(&rows(queries_of, dump.q_heads, next..next + 1, d)),
                    )?;
                    next += 1;
                }
                let len = t + 1;
                let queries = f16_to_f32(&rows(queries_of, dump.q_heads, t..t + 1, d));
                for (ri, &ratio) in cfg.ratios.iter().enumerate() {
                    retriever.set_budget(Budget::Ratio(ratio))?;
                    let plan = retriever.plan(layer);
                    let acc = &mut accs[ri][si];
                    let start = Instant::now();
                    let step = retriever.select_step(layer, &queries)?;
                    acc.select_s += start.elapsed().as_secs_f64();
                    acc.steps += 1;
                    let oracle_step = retriever.select_step_oracle(layer, &queries)?;
                    let full = retriever.attend_all(layer, &queries)?;
                    let sparse = retriever.attend_selection(layer, &queries, &step)?;
                    let oracle_out = retriever.attend_selection(layer, &queries, &oracle_step)?;
                    for (h, (sel, oracle_sel)) in step.iter().zip(&oracle_step).enumerate() {
                        let (set, oracle_set) = (&sel.positions, &oracle_sel.positions);
                        if plan.k > 0 {
                            let retrieved = |s: &[u32]| -> Vec<u32> {
                                s.iter()
                                    .copied()
                                    .filter(|&p| plan.candidates.contains(&(p as usize)))
                                    .collect()
                            };
                            let best = retrieved(oracle_set);
                            let hit = retrieved(set)
                                .iter()
                                .filter(|p| best.binary_search(p).is_ok())
                                .count();
                            acc.recall += hit as f64 / plan.k as f64;
                            acc.groups += 1;
                        }
                        for qh in h * g..(h + 1) * g {
                            let row = qh * d..(qh + 1) * d;
                            acc.mass += attended_mass(
                                &kernels,
                                &queries[row.clone()],
                                keys_of(h),
                                d,
                                dump.scale,
                                len,
                                set,
                            );
                            acc.err += rel_err(&sparse[row.clone()], &full[row.clone()]);
                            acc.oracle_err += rel_err(&oracle_out[row.clone()], &full[row]);
                            acc.heads += 1;
                        }
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (ri, &ratio) in cfg.ratios.iter().enumerate() {
        for (si, spec) in cfg.selectors.iter().enumerate() {
            let a = &accs[ri][si];
            let heads = a.heads.max(1) as f64;
            rows.push(EvalRow {
                ratio,
                selector: spec.to_string(),
                mass: a.mass / heads,
                recall: if a.groups == 0 {
                    1.0
                } else {
                    a.recall / a.groups as f64
                },
                err: a.err / heads,
                oracle_err: a.oracle_err / heads,
                select_us_per_step: a.select_s / a.steps.max(1) as f64 * 1e6,
            });
        }
    }
    Ok(rows)
}

/// Rows `range` of every head of `of` (`heads` heads), in the retriever's `[head, token, dim]`
/// layout.
fn rows<'a>(
    of: impl Fn(usize) -> &'a [half::f16],
    heads: usize,
    range: std::ops::Range<usize>,
    d: usize,
) -> Vec<half::f16> {
    (0..heads)
        .flat_map(|h| of(h)[range.start * d..range.end * d].iter().copied())
        .collect()
}

/// The full-attention probability of `set` for one query head over `len` positions.
fn attended_mass(
    kernels: &DistanceKernels,
    q: &[f32],
    keys: &[half::f16],
    d: usize,
    scale: f32,
    len: usize,
    set: &[u32],
) -> f64 {
    let logits: Vec<f32> = (0..len)
        .map(|p| kernels.dot_f16(q, &keys[p * d..(p + 1) * d]) * scale)
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    set.iter()
        .map(|&p| ((logits[p as usize] - max) as f64).exp())
        .sum::<f64>()
        / total
}

/// `||o - full|| / ||full||`.
fn rel_err(o: &[f32], full: &[f32]) -> f64 {
    let diff: f64 = o
        .iter()
        .zip(full)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = full.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}
