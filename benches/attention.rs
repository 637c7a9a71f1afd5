//! One decode step of the attention client: selection for one layer with 8 kv_heads x 4 query
//! heads, head_dim 128, budget 10 %, at 32K and 128K cached tokens. Fast-scan selection
//! (with and without exact re-ranking) against exact selection (SIMD dot products of the f16
//! keys with every candidate, the same aggregation and top-k) and against the exact scores
//! alone (the dot products, the floor of any exact selection). Single thread.
//!
//! Keys are synthetic: per channel a random offset and scale on uniform noise (LLM keys have
//! strong per-channel structure; this imitates it, the real-data quality figures come from
//! `pqcache eval-attention`). The prefill hands 1,024 synthetic prompt queries per query head
//! to the fast-scan key transform, as a serving stack would. `fastscan:32x4` reads 16 bytes
//! per key (a sixteenth of the f16 key), `fastscan:64x4` 32 bytes (an eighth).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::f16;
use pqcache::attention::{AttentionRetriever, AttentionShape, Budget, RetrieverConfig};

#[path = "common.rs"]
mod common;

fn bench_step(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (kv_heads, group, d) = (8usize, 4usize, 128usize);
    let mut g = c.benchmark_group("attention_step");
    g.sample_size(10);
    for context in [32768usize, 131072] {
        let keys: Vec<f16> = common::keys_like(kv_heads * context, d, 7)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let values: Vec<f16> = common::keys_like(kv_heads * context, d, 8)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let queries = common::keys_like(kv_heads * group, d, 9);
        let prompt_queries: Vec<f32> = common::keys_like(kv_heads * group * 1024, d, 10)
            .into_iter()
            .map(|x| f16::from_f32(x).to_f32())
            .collect();
        // The scoring part of exact selection alone (its floor): every kv head's group
        // against all its keys, one pass over the f16 keys (SIMD, memory-bound here).
        let kernels = pqcache_simd::distance::DistanceKernels::for_level(pqcache::Level::best());
        let mut logits = vec![0.0f32; group * context];
        let name = format!("exact_scores_only/kv_heads=8/group=4/d=128/context={context}");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for kv in 0..kv_heads {
                    kernels.dot_group_rows_f16(
                        &queries[kv * group * d..(kv + 1) * group * d],
                        group,
                        &keys[kv * context * d..(kv + 1) * context * d],
                        &mut logits,
                    );
                }
            })
        });
        for spec in [
            "exact",
            "fastscan:32x4",
            "fastscan:64x4",
            "fastscan:64x4:rerank4",
        ] {
            let shape = AttentionShape {
                layers: 1,
                query_heads: kv_heads * group,
                kv_heads,
                head_dim: d,
            };
            let mut r = AttentionRetriever::new(RetrieverConfig {
                selector: spec.parse().unwrap(),
                budget: Budget::Ratio(0.1),
                ..RetrieverConfig::new(shape)
            })
            .unwrap();
            pool.install(|| r.prefill(0, &keys, &values, &prompt_queries))
                .unwrap();
            // Checked once: every kv_head gets its budget.
            let sel = pool.install(|| r.select(0, &queries)).unwrap();
            assert!(
                sel.iter()
                    .all(|p| p.len() == (context as f64 * 0.1).round() as usize),
                "{spec}"
            );
            // `select_step` is what a decode step runs: the selection with its tail estimates
            // (`attend`'s path); `select` alone, positions only, skips the estimates.
            let name =
                format!("select/{spec}/kv_heads=8/group=4/d=128/context={context}/ratio=0.1");
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| {
                    common::in_pool(&pool, iters, || r.select(0, &queries).unwrap())
                })
            });
            let name =
                format!("select_step/{spec}/kv_heads=8/group=4/d=128/context={context}/ratio=0.1");
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| {
                    common::in_pool(&pool, iters, || r.select_step(0, &queries).unwrap())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
