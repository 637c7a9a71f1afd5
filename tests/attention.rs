//! The attention client on real Gemma-3-270M data, and its invariants on synthetic caches.
mod common;

use half::f16;
use pqcache::attention::eval::{evaluate, EvalConfig};
use pqcache::attention::selector::{Aggregation, SelectorSpec};
use pqcache::attention::{
    attention, AttentionRetriever, AttentionShape, Budget, RetrieverConfig, StepPlan,
};
use pqcache::io::dump::AttentionDump;
use pqcache::Error;
use pqcache_simd::distance::DistanceKernels;

fn persuasion() -> AttentionDump {
    AttentionDump::load(&common::dumps().join("persuasion-2048")).unwrap()
}

#[test]
fn selectors_on_real_gemma_attention() {
    let dump = persuasion();
    let cfg = EvalConfig {
        ratios: vec![0.1],
        positions: 8,
        selectors: [
            "exact",
            "window",
            "random",
            "fastscan:64x4",
            "fastscan:64x4:plain",
            "fastscan:128x4",
            "fastscan:128x4:rerank4",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect(),
        sink: 32,
        aggregation: Aggregation::SumSoftmax,
    };
    let rows = evaluate(&dump, &cfg).unwrap();
    let row = |name: &str| rows.iter().find(|r| r.selector == name).unwrap();
    let oracle = row("exact");
    // The oracle picks the exact top-k by construction.
    assert_eq!(oracle.recall, 1.0);
    assert!(
        oracle.err > 0.05 && oracle.err < 0.5,
        "oracle err {}",
        oracle.err
    );
    // Measured on this data (window 16, tail term): oracle 0.085, 128x4 0.087 (1.02x), with
    // re-ranking 0.085 (0.99x). 1.05x leaves room for k-means seeds, not for a broken scorer
    // (window and random are 5-6x worse).
    let fs = row("fastscan:128x4:rerank4");
    assert!(
        fs.err <= 1.05 * oracle.err,
        "rerank err {} vs oracle {}",
        fs.err,
        oracle.err
    );
    assert!(fs.recall > 0.8, "rerank recall {}", fs.recall);
    let plain = row("fastscan:128x4");
    assert!(
        plain.err <= 1.2 * oracle.err && plain.err >= fs.err * 0.98,
        "plain err {}",
        plain.err
    );
    // The key transform (query-weighted channels, balanced sub-spaces) at 4 dimensions per
    // sub-quantizer: measured 1.14x the oracle's err, against 1.68x for the raw keys
    // (`:plain`). 1.25x and a 5 % gap leave room for k-means seeds; a transform not applied
    // (or applied to keys and not queries, which scrambles the scores) fails both.
    let fs64 = row("fastscan:64x4");
    let raw64 = row("fastscan:64x4:plain");
    assert!(
        fs64.err <= 1.25 * oracle.err,
        "64x4 err {} vs oracle {}",
        fs64.err,
        oracle.err
    );
    assert!(
        raw64.err >= 1.05 * fs64.err,
        "64x4 plain {} vs transformed {}",
        raw64.err,
        fs64.err
    );
    // Guards against a broken metric: uninformed choices must be clearly worse.
    for name in ["window", "random"] {
        let r = row(name);
        assert!(
            r.err > 1.5 * oracle.err,
            "{name} err {} vs oracle {}",
            r.err,
            oracle.err
        );
        assert!(
            r.mass < oracle.mass && r.recall < 0.5,
            "{name} mass {} recall {}",
            r.mass,
            r.recall
        );
    }
}

/// Dense softmax attention in f64, the reference for `attend`.
fn dense(q: &[f32], keys: &[f16], values: &[f16], d: usize, scale: f32) -> Vec<f64> {
    let n = keys.len() / d;
    let logits: Vec<f64> = (0..n)
        .map(|j| {
            q.iter()
                .zip(&keys[j * d..(j + 1) * d])
                .map(|(a, b)| *a as f64 * b.to_f64())
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = w.iter().sum();
    (0..d)
        .map(|c| {
            (0..n)
                .map(|j| w[j] * values[j * d + c].to_f64())
                .sum::<f64>()
                / total
        })
        .collect()
}

#[test]
fn attend_equals_dense_attention_when_the_budget_is_the_whole_context() {
    let dump = persuasion();
    let (d, t) = (dump.head_dim, 600);
    let mut cfg = RetrieverConfig::new(one_gemma_layer(d));
    cfg.budget = Budget::Ratio(1.0);
    cfg.scale = dump.scale;
    cfg.selector = "fastscan:64x4".parse().unwrap();
    let mut r = AttentionRetriever::new(cfg).unwrap();
    let keys = dump.keys(0, 0);
    let values = dump.values(0, 0);
    r.prefill(0, &keys[..500 * d], &values[..500 * d], &[])
        .unwrap();
    for p in 500..t {
        r.append(0, &keys[p * d..(p + 1) * d], &values[p * d..(p + 1) * d])
            .unwrap();
    }
    let q: Vec<f32> = (0..4)
        .flat_map(|h| {
            dump.queries(0, h)[(t - 1) * d..t * d]
                .iter()
                .map(|x| x.to_f32())
        })
        .collect();
    assert_eq!(
        r.select(0, &q).unwrap()[0].len(),
        t,
        "every position is attended"
    );
    let out = r.attend(0, &q).unwrap();
    for h in 0..4 {
        let want = dense(
            &q[h * d..(h + 1) * d],
            &keys[..t * d],
            &values[..t * d],
            d,
            dump.scale,
        );
        for c in 0..d {
            // f32 accumulation over 600 terms of |v| < 10: 1e-4 absolute is ~50x the bound.
            assert!(
                (out[h * d + c] as f64 - want[c]).abs() < 1e-4,
                "head {h} dim {c}"
            );
        }
    }
}

#[test]
fn gqa_selection_keeps_sink_window_and_budget_per_kv_head() {
    let (kvh, g, d, t) = (2, 3, 16, 400);
    let keys: Vec<f16> = common::uniform(kvh * t, d, 1)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let values: Vec<f16> = common::uniform(kvh * t, d, 2)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    for spec in [
        "exact",
        "window",
        "random",
        "pq:4x6",
        "fastscan:8x4:rerank2",
        "quest:16",
    ] {
        let mut cfg = RetrieverConfig::new(AttentionShape {
            layers: 2,
            query_heads: kvh * g,
            kv_heads: kvh,
            head_dim: d,
        });
        cfg.selector = spec.parse().unwrap();
        cfg.budget = Budget::Tokens(100);
        cfg.sink = 8;
        // Half of what the budget leaves after the sink (the default is a fixed 16).
        cfg.window = None;
        let mut r = AttentionRetriever::new(cfg).unwrap();
        r.prefill(1, &keys, &values, &[]).unwrap();
        let q = common::uniform(kvh * g, d, 3);
        let sel = r.select(1, &q).unwrap();
        let plan: StepPlan = r.plan(1);
        assert_eq!(
            (plan.sink.len(), plan.window.len(), plan.k),
            (8, 46, 46),
            "{spec}"
        );
        for positions in &sel {
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "{spec}: sorted, distinct"
            );
            assert!((0..8).all(|p| positions.contains(&p)), "{spec}: sink kept");
            assert!(
                (t as u32 - 46..t as u32).all(|p| positions.contains(&p)),
                "{spec}: window kept"
            );
            // Quest too: pages in bound order, the last one cut at the budget.
            assert_eq!(positions.len() - 8 - 46, 46, "{spec}");
        }
        // Layer 0 was never filled.
        assert!(matches!(r.select(0, &q), Err(Error::EmptyIndex)));
        let out = r.attend(1, &q).unwrap();
        assert_eq!(out.len(), kvh * g * d);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn exact_selection_matches_a_brute_force_sum_of_softmaxes() {
    let (g, d, t) = (4, 8, 300);
    let keys: Vec<f16> = common::uniform(t, d, 4)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let values = keys.clone();
    let mut cfg = RetrieverConfig::new(AttentionShape {
        layers: 1,
        query_heads: g,
        kv_heads: 1,
        head_dim: d,
    });
    cfg.selector = SelectorSpec::Exact;
    cfg.budget = Budget::Tokens(60);
    cfg.sink = 4;
    let mut r = AttentionRetriever::new(cfg.clone()).unwrap();
    r.prefill(0, &keys, &values, &[]).unwrap();
    let q = common::uniform(g, d, 5);
    let plan = r.plan(0);
    let chosen: Vec<u32> = r.select(0, &q).unwrap()[0]
        .iter()
        .copied()
        .filter(|&p| plan.candidates.contains(&(p as usize)))
        .collect();
    // Brute force: sum over heads of the softmax over candidates, top k.
    let mut score = vec![0.0f64; plan.candidates.len()];
    for h in 0..g {
        let l: Vec<f64> = plan
            .candidates
            .clone()
            .map(|p| {
                (0..d)
                    .map(|c| q[h * d + c] as f64 * keys[p * d + c].to_f64())
                    .sum::<f64>()
                    * cfg.scale as f64
            })
            .collect();
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
        for (s, x) in score.iter_mut().zip(&l) {
            *s += (x - m).exp() / z;
        }
    }
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].partial_cmp(&score[a]).unwrap());
    let mut want: Vec<u32> = order[..plan.k]
        .iter()
        .map(|&i| (plan.candidates.start + i) as u32)
        .collect();
    want.sort_unstable();
    assert_eq!(chosen, want);
}

#[test]
fn a_bad_value_in_a_per_head_input_is_named_by_head_and_token() {
    let cfg = RetrieverConfig::new(AttentionShape {
        layers: 1,
        query_heads: 4,
        kv_heads: 2,
        head_dim: 8,
    });
    let mut r = AttentionRetriever::new(cfg).unwrap();
    // [kv_head, token, dim] with 5 tokens: kv head 1, token 3, column 2.
    let kv = vec![f16::from_f32(0.25); 2 * 5 * 8];
    let mut bad = kv.clone();
    bad[(5 + 3) * 8 + 2] = f16::INFINITY;
    let e = r.prefill(0, &kv, &bad, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NonFinite {
                what: "values",
                head: Some(1),
                row: 3,
                col: 2
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "non-finite value (NaN or infinity) in values of head 1 at row 3, column 2"
    );
    // Queries [query_head, token, dim] with 2 tokens: query head 2, token 1, column 7.
    let mut q = vec![0.5f32; 4 * 2 * 8];
    q[(2 * 2 + 1) * 8 + 7] = f32::NAN;
    let e = r.prefill(0, &kv, &kv, &q).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NonFinite {
                what: "queries",
                head: Some(2),
                row: 1,
                col: 7
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    assert!("fastscan:64x8".parse::<SelectorSpec>().is_err());
    assert!("pq:2".parse::<SelectorSpec>().is_err());
    assert!("quest:0".parse::<SelectorSpec>().is_err());
    assert!("nope".parse::<SelectorSpec>().is_err());
    let mut cfg = RetrieverConfig::new(AttentionShape {
        layers: 1,
        query_heads: 2,
        kv_heads: 1,
        head_dim: 8,
    });
    cfg.selector = "fastscan:3x4".parse().unwrap();
    assert!(matches!(
        AttentionRetriever::new(cfg.clone()),
        Err(Error::InvalidArgument(_))
    ));
    cfg.selector = SelectorSpec::Exact;
    cfg.budget = Budget::Ratio(1.5);
    assert!(AttentionRetriever::new(cfg.clone()).is_err());
    cfg.budget = Budget::Ratio(0.5);
    let mut r = AttentionRetriever::new(cfg).unwrap();
    let kv: Vec<f16> = vec![f16::from_f32(0.5); 10 * 8];
    assert!(matches!(
        r.prefill(1, &kv, &kv, &[]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.prefill(0, &kv[..7], &kv[..7], &[]),
        Err(Error::DimensionMismatch { .. })
    ));
    let mut bad = kv.clone();
    bad[3] = f16::NAN;
    assert!(matches!(
        r.prefill(0, &bad, &kv, &[]),
        Err(Error::NonFinite { .. })
    ));
    // An empty layer takes appends (a prompt shorter than any codebook): it selects exactly
    // until the selector can train.
    r.append(0, &kv[..8], &kv[..8]).unwrap();
    assert_eq!(r.select(0, &[0.0; 16]).unwrap(), vec![vec![0]]);
    r.prefill(0, &kv, &kv, &[]).unwrap();
    assert!(matches!(
        r.select(0, &[0.0; 8]),
        Err(Error::DimensionMismatch { .. })
    ));
    assert!(matches!(
        r.select(0, &[f32::NAN; 16]),
        Err(Error::NonFinite { .. })
    ));
    let k = DistanceKernels::best();
    let mut out = vec![1.0; 8];
    attention(&k, &[0.0; 8], &kv, &kv, 8, 1.0, &[], &mut out);
    assert_eq!(out, vec![0.0; 8], "no position attends to nothing");
}

/// The refresh tests' cache: one layer, one kv head of `g` query heads, `spec`, 200 tokens
/// a step with 8 sink positions.
fn refresh_test_retriever(spec: &str, g: usize, d: usize) -> AttentionRetriever {
    let mut cfg = RetrieverConfig::new(AttentionShape {
        layers: 1,
        query_heads: g,
        kv_heads: 1,
        head_dim: d,
    });
    cfg.selector = spec.parse().unwrap();
    cfg.budget = Budget::Tokens(200);
    cfg.sink = 8;
    AttentionRetriever::new(cfg).unwrap()
}

/// The share of the exact selections' positions (sorted) that `sel` holds, over all probes.
fn recall_of(sel: &[Vec<u32>], exact: &[Vec<u32>]) -> f64 {
    let mut hit = 0;
    let mut all = 0;
    for (s, e) in sel.iter().zip(exact) {
        hit += s.iter().filter(|p| e.binary_search(p).is_ok()).count();
        all += e.len();
    }
    hit as f64 / all as f64
}

/// Keys that drift after the prefill (the decoded ones move to a region the prefill never
/// covered, as slow RoPE channels do): a fast-scan head that re-trains as the cache grows
/// keeps finding the exact top-k; one that keeps the prefill's codebooks (`:static`) maps
/// the new keys onto the edge of its old centroids and loses them. The refreshed cache also
/// survives a save / open unchanged.
#[test]
fn fastscan_refresh_follows_drifting_keys() {
    let (g, d, prompt, decoded) = (4, 16, 512, 1536);
    let t = prompt + decoded;
    let mut keys = common::uniform(t, d, 11);
    for (p, key) in keys.chunks_mut(d).enumerate().skip(prompt) {
        // Channels 0..4 move steadily away from the prefill's range [-1, 1].
        let shift = 2.0 + 6.0 * (p - prompt) as f32 / decoded as f32;
        key[..4].iter_mut().for_each(|v| *v += shift);
    }
    let keys: Vec<f16> = keys.into_iter().map(f16::from_f32).collect();
    let values = keys.clone();
    // Queries that weigh the drifting channels as much as the others.
    let queries: Vec<Vec<f32>> = (0..8).map(|s| common::uniform(g, d, 100 + s)).collect();
    let run = |spec: &str| {
        let mut r = refresh_test_retriever(spec, g, d);
        r.prefill(0, &keys[..prompt * d], &values[..prompt * d], &[])
            .unwrap();
        for p in prompt..t {
            r.append(0, &keys[p * d..(p + 1) * d], &values[p * d..(p + 1) * d])
                .unwrap();
        }
        let sel: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| r.select(0, q).unwrap().remove(0))
            .collect();
        (r, sel)
    };
    let (_, exact) = run("exact");
    let recall = |sel: &[Vec<u32>]| recall_of(sel, &exact);
    let (refreshed, fresh_sel) = run("fastscan:4x4");
    let (_, static_sel) = run("fastscan:4x4:static");
    let (fresh, stale) = (recall(&fresh_sel), recall(&static_sel));
    // Measured over three key seeds: 0.79-0.80 with refresh, 0.61-0.64 without (sink and
    // window count as hits in both); with refresh disabled both are equal and this fails.
    assert!(fresh > stale + 0.08, "refresh {fresh} vs static {stale}");
    let path = common::TempPath::new("refresh", "refresh.pqc");
    pqcache::io::file::save(&refreshed, &path).unwrap();
    let reopened = pqcache::io::file::open_attention(&path).unwrap();
    for (q, want) in queries.iter().zip(&fresh_sel) {
        assert_eq!(&reopened.select(0, q).unwrap()[0], want);
    }
    // The options print back as parsed.
    for s in ["fastscan:8x4:rerank2:plain:static", "fastscan:8x4:static"] {
        assert_eq!(s.parse::<SelectorSpec>().unwrap().to_string(), s);
    }
    assert!("fastscan:8x4:static:static"
        .parse::<SelectorSpec>()
        .is_err());
}

/// Queries that drift after the prefill (the prompt's use channels 0..8, the decoded ones
/// 8..16): a fast-scan head handed each step's queries (`append_with_queries`) re-fits its
/// key transform to them at each refresh and finds the exact top-k; one handed none keeps
/// the map fitted to the prompt, which squeezed channels 8..16 to its floor, and loses them.
/// The re-fitted cache survives a save / open unchanged (the query statistics are stored).
#[test]
fn fastscan_refresh_refits_the_transform_to_drifting_queries() {
    let (g, d, prompt, decoded) = (4, 16, 512, 1536);
    let t = prompt + decoded;
    let keys: Vec<f16> = common::uniform(t, d, 21)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let values = keys.clone();
    // `on`: the channels a query uses; the others carry a hundredth.
    let query = |seed: u64, on: std::ops::Range<usize>| -> Vec<f32> {
        let mut q = common::uniform(g, d, seed);
        for row in q.chunks_mut(d) {
            for (c, v) in row.iter_mut().enumerate() {
                if !on.contains(&c) {
                    *v *= 0.01;
                }
            }
        }
        q
    };
    // [query_head, token, dim] for the prompt.
    let prompt_queries: Vec<f32> = {
        let per_token: Vec<Vec<f32>> = (0..prompt).map(|p| query(1000 + p as u64, 0..8)).collect();
        (0..g)
            .flat_map(|h| {
                per_token
                    .iter()
                    .flat_map(move |q| q[h * d..(h + 1) * d].to_vec())
            })
            .collect()
    };
    let probes: Vec<Vec<f32>> = (0..8).map(|s| query(100 + s, 8..16)).collect();
    let run = |spec: &str, hand_over: bool| {
        let mut r = refresh_test_retriever(spec, g, d);
        r.prefill(
            0,
            &keys[..prompt * d],
            &values[..prompt * d],
            &prompt_queries,
        )
        .unwrap();
        for p in prompt..t {
            let q = if hand_over {
                query(5000 + p as u64, 8..16)
            } else {
                Vec::new()
            };
            r.append_with_queries(
                0,
                &keys[p * d..(p + 1) * d],
                &values[p * d..(p + 1) * d],
                &q,
            )
            .unwrap();
        }
        let sel: Vec<Vec<u32>> = probes
            .iter()
            .map(|q| r.select(0, q).unwrap().remove(0))
            .collect();
        (r, sel)
    };
    let (_, exact) = run("exact", false);
    let recall = |sel: &[Vec<u32>]| recall_of(sel, &exact);
    let (refitted, refit_sel) = run("fastscan:4x4", true);
    let (_, stale_sel) = run("fastscan:4x4", false);
    let (refit, stale) = (recall(&refit_sel), recall(&stale_sel));
    // Measured: 0.59 re-fitted, 0.23 prompt-fitted (sink and window count as hits in both);
    // without the re-fit both are equal and this fails.
    assert!(
        refit > stale + 0.1,
        "re-fitted {refit} vs prompt-fitted {stale}"
    );
    let err = AttentionRetriever::new(refitted.config().clone())
        .unwrap()
        .append_with_queries(0, &keys[..d], &values[..d], &[1.0; 3])
        .unwrap_err();
    assert!(
        err.to_string().contains("64"),
        "a step's queries are [query_head, dim]: {err}"
    );
    let path = common::TempPath::new("refit", "refit.pqc");
    pqcache::io::file::save(&refitted, &path).unwrap();
    let reopened = pqcache::io::file::open_attention(&path).unwrap();
    for (q, want) in probes.iter().zip(&refit_sel) {
        assert_eq!(&reopened.select(0, q).unwrap()[0], want);
    }
}

/// One layer of the Gemma-3-270M dumps' shape: 4 query heads over 1 kv head.
fn one_gemma_layer(head_dim: usize) -> AttentionShape {
    AttentionShape {
        layers: 1,
        query_heads: 4,
        kv_heads: 1,
        head_dim,
    }
}

/// The group's queries of `dump`'s layer 0 at position `p`, `[query_head, dim]`.
fn step_queries(dump: &AttentionDump, p: usize) -> Vec<f32> {
    let d = dump.head_dim;
    (0..dump.q_heads)
        .flat_map(|h| {
            dump.queries(0, h)[p * d..(p + 1) * d]
                .iter()
                .map(|x| x.to_f32())
        })
        .collect()
}

#[test]
fn the_tail_term_gives_full_attention_when_the_unattended_values_are_equal() {
    // Real keys and queries; the values of every position the oracle leaves out are set to
    // one vector, so that their mean is exact and the tail term with the oracle's exact tail
    // mass reproduces full attention (measured: 6e-7 relative). Without the tail term the
    // same step leaves that vector out and is far off (measured: 1.3).
    let dump = persuasion();
    let (d, t) = (dump.head_dim, 800);
    let shape = one_gemma_layer(d);
    let cfg = RetrieverConfig {
        selector: SelectorSpec::Exact,
        budget: Budget::Ratio(0.1),
        scale: dump.scale,
        ..RetrieverConfig::new(shape)
    };
    let keys = &dump.keys(0, 0)[..t * d];
    let mut values = dump.values(0, 0)[..t * d].to_vec();
    let q = step_queries(&dump, t - 1);
    let mut r = AttentionRetriever::new(cfg.clone()).unwrap();
    r.prefill(0, keys, &values, &[]).unwrap();
    let step = r.select_step(0, &q).unwrap();
    let attended = &step[0].positions;
    assert_eq!(attended.len(), 80);
    assert_eq!(step[0].tail.as_ref().map(|t| t.len()), Some(4));
    let fill: Vec<f16> = (0..d)
        .map(|c| f16::from_f32(c as f32 / d as f32 - 0.5))
        .collect();
    for p in 0..t {
        if attended.binary_search(&(p as u32)).is_err() {
            values[p * d..(p + 1) * d].copy_from_slice(&fill);
        }
    }
    for tail_term in [true, false] {
        let mut r = AttentionRetriever::new(RetrieverConfig {
            tail_term,
            ..cfg.clone()
        })
        .unwrap();
        r.prefill(0, keys, &values, &[]).unwrap();
        assert_eq!(
            &r.select(0, &q).unwrap()[0],
            attended,
            "values do not move the choice"
        );
        let sparse = r.attend(0, &q).unwrap();
        let worst = (0..4)
            .map(|h| {
                let want = dense(&q[h * d..(h + 1) * d], keys, &values, d, dump.scale);
                let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
                let err = (0..d)
                    .map(|c| (sparse[h * d + c] as f64 - want[c]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                err / norm
            })
            .fold(0.0, f64::max);
        if tail_term {
            // f32 logits and sums over 800 positions: 1e-4 relative is far above rounding
            // and far below the 1e-2 a wrong mass or mean gives.
            assert!(worst < 1e-4, "with the tail term: relative error {worst}");
        } else {
            assert!(
                worst > 1e-2,
                "without the tail term: relative error {worst}"
            );
        }
    }
}

#[test]
fn the_tail_term_lowers_the_error_of_every_scoring_selector_on_real_attention() {
    // Prefill 1,000 positions of layer 0, decode the next 200 one by one; at every 20th
    // step, each selector's sparse output with and without the tail term against full
    // attention. Measured here: the tail term halves the error of exact, PQ and fast-scan
    // selection at a 10 % budget (0.49x, 0.52x, 0.48x). 0.8x is a loose bound that a tail
    // of the wrong size or sign fails.
    let dump = persuasion();
    let (d, prefill, t) = (dump.head_dim, 1000, 1200);
    let keys = dump.keys(0, 0);
    let values = dump.values(0, 0);
    let prompt: Vec<f32> = (0..4)
        .flat_map(|h| dump.queries(0, h)[..prefill * d].iter().map(|x| x.to_f32()))
        .collect();
    for spec in ["exact", "pq:32x8", "fastscan:64x4"] {
        let mut errs = [0.0f64; 2];
        for (i, tail_term) in [true, false].into_iter().enumerate() {
            let mut r = AttentionRetriever::new(RetrieverConfig {
                selector: spec.parse().unwrap(),
                budget: Budget::Ratio(0.1),
                scale: dump.scale,
                tail_term,
                ..RetrieverConfig::new(one_gemma_layer(d))
            })
            .unwrap();
            r.prefill(0, &keys[..prefill * d], &values[..prefill * d], &prompt)
                .unwrap();
            for p in prefill..t {
                r.append(0, &keys[p * d..(p + 1) * d], &values[p * d..(p + 1) * d])
                    .unwrap();
                if (p + 1) % 20 != 0 {
                    continue;
                }
                let q = step_queries(&dump, p);
                let (sparse, full) = (r.attend(0, &q).unwrap(), r.attend_all(0, &q).unwrap());
                for h in 0..4 {
                    let row = h * d..(h + 1) * d;
                    let e: f64 = sparse[row.clone()]
                        .iter()
                        .zip(&full[row.clone()])
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum();
                    let n: f64 = full[row].iter().map(|b| (*b as f64).powi(2)).sum();
                    errs[i] += (e / n).sqrt();
                }
            }
        }
        assert!(
            errs[0] <= 0.8 * errs[1],
            "{spec}: error with the tail term {} vs without {}",
            errs[0],
            errs[1]
        );
    }
}

#[test]
fn a_fork_selects_and_attends_as_a_fresh_prefill_of_the_same_cache() {
    let dump = persuasion();
    let (d, t) = (dump.head_dim, 1500);
    let shape = one_gemma_layer(d);
    let keys = &dump.keys(0, 0)[..t * d];
    let values = &dump.values(0, 0)[..t * d];
    let prompt: Vec<f32> = (0..4)
        .flat_map(|h| dump.queries(0, h)[..t * d].iter().map(|x| x.to_f32()))
        .collect();
    let base = RetrieverConfig {
        selector: SelectorSpec::Exact,
        scale: dump.scale,
        ..RetrieverConfig::new(shape)
    };
    let mut dense = AttentionRetriever::new(base.clone()).unwrap();
    // In two chunks, as a model's prefill extends the cache.
    for (a, b) in [(0, 700), (700, t)] {
        let q: Vec<f32> = (0..4)
            .flat_map(|h| prompt[h * t * d + a * d..h * t * d + b * d].to_vec())
            .collect();
        dense
            .extend(0, &keys[a * d..b * d], &values[a * d..b * d], &q)
            .unwrap();
    }
    let fast = RetrieverConfig {
        selector: "fastscan:64x4".parse().unwrap(),
        budget: Budget::Ratio(0.05),
        ..base.clone()
    };
    let fork = dense.fork(fast.clone()).unwrap();
    let mut fresh = AttentionRetriever::new(fast).unwrap();
    fresh.prefill(0, keys, values, &prompt).unwrap();
    assert!(fork.is_trained(0) && fork.len(0) == t);
    for p in [200, 900, t - 1] {
        let q = step_queries(&dump, p);
        assert_eq!(
            fork.select(0, &q).unwrap(),
            fresh.select(0, &q).unwrap(),
            "at {p}"
        );
        assert_eq!(
            fork.attend(0, &q).unwrap(),
            fresh.attend(0, &q).unwrap(),
            "at {p}"
        );
    }
    // The source is untouched: still exact and whole.
    assert_eq!(dense.config().selector, SelectorSpec::Exact);
    let wider = RetrieverConfig::new(AttentionShape { layers: 2, ..shape });
    assert!(matches!(dense.fork(wider), Err(Error::InvalidArgument(_))));
}
