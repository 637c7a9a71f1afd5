//! How close sparse attention stays to full attention on real model data.
//!
//! Protocol (the one `pqcache eval-attention` runs), for a dump of `T` tokens: for every layer
//! and `P` decode positions `t` evenly spaced in `[T/2, T)`, the indexes are trained on the keys
//! of `[0, T/2)` (the prefill; fast-scan also fits its channel scale to the prefill's
//! queries, as [`super::AttentionRetriever::prefill_with_queries`] does) and the keys of
//! `[T/2, t]` are appended one by one (decoded tokens; fast-scan re-trains on all the cached
//! keys as the cache grows, see [`super::selector`], unless `:static`). At `t`, the budget is `B = max(ratio * (t + 1), sink + 2)`, the window
//! `W = (B - sink) / 2`, `k = B - sink - W` positions are retrieved among `[sink, t + 1 - W)`.
//! Per query head: `mass` = full-attention probability of the attended set; `err` =
//! `||o_S - o|| / ||o||` with `o_S` the softmax renormalised over the set. Per kv_head:
//! `recall` = overlap of the retrieved positions with the exact top-k under the same
//! aggregation (the `exact` selector's choice), over `k`.

use super::selector::{Aggregation, ChooseContext, SelectorSpec};
use super::{attention, Budget, StepPlan};
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

/// Runs the protocol on a dump. Rows are ordered by ratio, then selector.
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
    if let Some(r) = cfg.ratios.iter().find(|r| !(**r > 0.0 && **r <= 1.0)) {
        return Err(Error::InvalidArgument(format!(
            "ratio {r} is not in (0, 1]"
        )));
    }
    let (d, g, kvh, tokens) = (dump.head_dim, dump.group_size(), dump.kv_heads, dump.tokens);
    let prefill = tokens / 2;
    let steps = decode_positions(tokens, cfg.positions);
    let kernels = DistanceKernels::best();
    let mut accs = vec![vec![Acc::default(); cfg.selectors.len()]; cfg.ratios.len()];
    for layer in 0..dump.layers.len() {
        let keys: Vec<&[half::f16]> = (0..kvh).map(|h| dump.keys(layer, h)).collect();
        let values: Vec<&[half::f16]> = (0..kvh).map(|h| dump.values(layer, h)).collect();
        for (si, spec) in cfg.selectors.iter().enumerate() {
            spec.validate(d)?;
            let mut indexes = (0..kvh)
                .map(|h| {
                    let k32 = f16_to_f32(&keys[h][..prefill * d]);
                    let q32: Vec<f32> = (h * g..(h + 1) * g)
                        .flat_map(|qh| f16_to_f32(&dump.queries(layer, qh)[..prefill * d]))
                        .collect();
                    spec.build(&k32, &q32, d, (layer * kvh + h) as u64)
                })
                .collect::<Result<Vec<_>>>()?;
            let oracle = SelectorSpec::Exact.build(&[], &[], d, 0)?;
            let mut next = prefill;
            for &t in &steps {
                // Decoded tokens prefill..=t enter the indexes one by one.
                while next <= t {
                    for (h, index) in indexes.iter_mut().enumerate() {
                        index.append(&f16_to_f32(&keys[h][next * d..(next + 1) * d]))?;
                        index.refresh_if_due(&keys[h][..(next + 1) * d], d)?;
                    }
                    next += 1;
                }
                let len = t + 1;
                let queries: Vec<Vec<f32>> = (0..dump.q_heads)
                    .map(|qh| f16_to_f32(&dump.queries(layer, qh)[t * d..(t + 1) * d]))
                    .collect();
                let group_qs: Vec<Vec<f32>> = (0..kvh)
                    .map(|h| queries[h * g..(h + 1) * g].concat())
                    .collect();
                for (ri, &ratio) in cfg.ratios.iter().enumerate() {
                    let plan = StepPlan::new(len, cfg.sink, None, Budget::Ratio(ratio));
                    let acc = &mut accs[ri][si];
                    let ctx_for = |h: usize| ChooseContext {
                        queries: &group_qs[h],
                        d,
                        scale: dump.scale,
                        keys: &keys[h][..len * d],
                        candidates: plan.candidates.clone(),
                        k: plan.k,
                        aggregation: cfg.aggregation,
                        kernels: &kernels,
                        step: len as u64,
                    };
                    let mut chosen_all = Vec::with_capacity(kvh);
                    let start = Instant::now();
                    for (h, index) in indexes.iter().enumerate() {
                        let ctx = ctx_for(h);
                        chosen_all.push(if plan.k == 0 {
                            Vec::new()
                        } else {
                            index.choose(&ctx)?
                        });
                    }
                    acc.select_s += start.elapsed().as_secs_f64();
                    acc.steps += 1;
                    for (h, chosen) in chosen_all.iter().enumerate() {
                        let ctx = ctx_for(h);
                        let best = if plan.k == 0 {
                            Vec::new()
                        } else {
                            oracle.choose(&ctx)?
                        };
                        if plan.k > 0 {
                            let hit = chosen
                                .iter()
                                .filter(|p| best.binary_search(p).is_ok())
                                .count();
                            acc.recall += hit as f64 / plan.k as f64;
                            acc.groups += 1;
                        }
                        let set = plan.positions(chosen);
                        let oracle_set = plan.positions(&best);
                        for q in &queries[h * g..(h + 1) * g] {
                            let m = head_metrics(
                                &kernels,
                                q,
                                keys[h],
                                values[h],
                                d,
                                dump.scale,
                                len,
                                &set,
                                &oracle_set,
                            );
                            acc.mass += m.0;
                            acc.err += m.1;
                            acc.oracle_err += m.2;
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

/// (mass, err, oracle err) of one query head at one step.
#[allow(clippy::too_many_arguments)]
fn head_metrics(
    kernels: &DistanceKernels,
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    d: usize,
    scale: f32,
    len: usize,
    set: &[u32],
    oracle_set: &[u32],
) -> (f64, f64, f64) {
    let all: Vec<u32> = (0..len as u32).collect();
    let mut full = vec![0.0f32; d];
    attention(kernels, q, keys, values, d, scale, &all, &mut full);
    // Full-attention probabilities, for the mass.
    let logits: Vec<f32> = (0..len)
        .map(|p| kernels.dot_f16(q, &keys[p * d..(p + 1) * d]) * scale)
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let mass: f64 = set
        .iter()
        .map(|&p| ((logits[p as usize] - max) as f64).exp())
        .sum::<f64>()
        / total;
    let rel_err = |s: &[u32]| {
        let mut o = vec![0.0f32; d];
        attention(kernels, q, keys, values, d, scale, s, &mut o);
        let diff: f64 = o
            .iter()
            .zip(&full)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = full.iter().map(|&b| (b as f64).powi(2)).sum();
        (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
    };
    (mass, rel_err(set), rel_err(oracle_set))
}
