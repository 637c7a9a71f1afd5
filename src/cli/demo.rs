//! `pqcache demo`: product quantization over real LLM keys, then sparse attention.
//!
//! Loads the bundled Gemma-3-270M sample (post-RoPE keys and queries of a global-attention
//! layer over the first 2048 tokens of Jane Austen's *Persuasion*), builds an exact f16 index,
//! an 8-bit PQ index and a 4-bit fast-scan index (with exact re-ranking on f16 keys) over the
//! keys, and reports, for every query head, recall of the top-k keys by inner product and the
//! search time against exact search, for k = 10 and k = 10 % of the tokens. Then it runs the
//! attention evaluation ([`crate::attention::eval`]) at a budget of 10 % of the context: each
//! selector's attention-output error beside the oracle's (exact top-k), and its selection time
//! beside exact scoring's.

use super::outln;
use super::progress::Progress;
use super::with_threads;
use crate::attention::eval::{evaluate, EvalConfig};
use crate::attention::selector::Aggregation;
use crate::cli::eval_attention::parse_selectors;
use crate::error::{Error, Result};
use crate::index::{Index, IndexFlat, IndexPQ, IndexPQFastScan, RerankStorage};
use crate::io::dump::AttentionDump;
use crate::io::f16_to_f32;
use crate::metric::Metric;
use crate::pq::Nbits;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// Folder of the bundled sample, relative to the repository root.
pub const BUNDLED_DATA: &str = "data/persuasion-2048-layer5";

/// Arguments of `pqcache demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// An attention dump folder (q.npy, k.npy, meta.json); default: the bundled sample.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Sub-quantizers of the PQ index.
    #[arg(long, default_value_t = 64)]
    pub m: usize,
    /// Bits per sub-quantizer index (4, 6 or 8).
    #[arg(long, default_value_t = 8)]
    pub nbits: usize,
    /// Sub-quantizers of the 4-bit fast-scan index.
    #[arg(long, default_value_t = 128)]
    pub fastscan_m: usize,
    /// Decode positions of the attention evaluation.
    #[arg(long, default_value_t = 16)]
    pub positions: usize,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn find_data(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let local = PathBuf::from(BUNDLED_DATA);
    if local.join("meta.json").exists() {
        return Ok(local);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_DATA);
    if built.join("meta.json").exists() {
        return Ok(built);
    }
    Err(Error::InvalidArgument(format!(
        "bundled data not found at {BUNDLED_DATA}; run from the repository root or pass --data DIR"
    )))
}

/// Runs `pqcache demo`.
pub fn run(a: &DemoArgs) -> Result<()> {
    with_threads(a.threads, || demo(a))?
}

fn time_search(index: &dyn Index, queries: &[f32], d: usize, k: usize) -> Result<f64> {
    // One query per call, as a decoder asks; best of 3 passes.
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for q in queries.chunks(d) {
            index.search(q, k)?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best / (queries.len() / d) as f64 * 1e6)
}

fn demo(a: &DemoArgs) -> Result<()> {
    let dir = find_data(&a.data)?;
    let dump = AttentionDump::load(&dir)?;
    let (t, d) = (dump.tokens, dump.head_dim);
    outln!(
        "pqcache demo: {} tokens, {} layer(s) {:?}, {} query heads per kv head, head_dim {}\n  data: {}",
        t,
        dump.layers.len(),
        dump.layers,
        dump.group_size(),
        d,
        dir.display()
    );
    outln!(
        "  index: PQ m={} nbits={} ({} bytes per key instead of {} as f16), inner product\n",
        a.m,
        a.nbits,
        a.m * a.nbits / 8,
        2 * d
    );
    outln!(
        "{:>6} {:>5} {:>6} {:>22} {:>10} {:>12} {:>12} {:>9}",
        "layer",
        "head",
        "k",
        "index",
        "recall",
        "exact us/q",
        "index us/q",
        "speed-up"
    );
    for (li, &layer) in dump.layers.iter().enumerate() {
        let keys = dump.keys(li, 0);
        let mut exact = IndexFlat::new_f16(d, Metric::InnerProduct)?;
        exact.add_f16(keys)?;
        let keys32 = f16_to_f32(keys);
        let mut pq = IndexPQ::new(d, a.m, Nbits::from_bits(a.nbits)?, Metric::InnerProduct)?;
        let spin = Progress::spinner("training", true);
        pq.train(&keys32)?;
        pq.add(&keys32)?;
        let mut fs = IndexPQFastScan::new(d, a.fastscan_m, Metric::InnerProduct)?;
        fs.keep_originals(RerankStorage::F16)?;
        fs.train(&keys32)?;
        fs.add(&keys32)?;
        fs.rerank_factor = 4;
        spin.finish();
        let fs_name = format!("fastscan:{}x4:rerank4", a.fastscan_m);
        let pq_name = format!("pq:{}x{}", a.m, a.nbits);
        let indexes: [(&str, &dyn Index); 2] = [(&pq_name, &pq), (&fs_name, &fs)];
        for head in 0..dump.q_heads.min(dump.group_size()) {
            // Every 8th query position, to keep the demo short.
            let q32: Vec<f32> = f16_to_f32(dump.queries(li, head))
                .chunks(d)
                .step_by(8)
                .flatten()
                .copied()
                .collect();
            for k in [10, t / 10] {
                let truth = exact.search(&q32, k)?;
                let exact_us = time_search(&exact, &q32, d, k)?;
                for (name, index) in indexes {
                    let recall = index.search(&q32, k)?.recall_against(&truth.ids, k);
                    let us = time_search(index, &q32, d, k)?;
                    outln!(
                        "{:>6} {:>5} {:>6} {:>22} {:>10.4} {:>12.1} {:>12.1} {:>8.2}x",
                        layer,
                        head,
                        k,
                        name,
                        recall,
                        exact_us,
                        us,
                        exact_us / us
                    );
                }
            }
        }
    }
    outln!(
        "\nrecall: overlap with the exact top-k by inner product. At {t} tokens exact scoring of f16 \
         keys is only {} multiply-adds per query, so compressed search cannot win on time here; \
         it pays from tens of thousands of tokens (cargo bench --bench fastscan; \
         benches/vs_faiss.sh fastscan), while storing {} bytes per key instead of {}.",
        t * d,
        a.fastscan_m / 2,
        2 * d
    );
    attention_table(&dump, a.positions)
}

/// Part 2: sparse attention at 10 % of the context, every selector against the oracle.
fn attention_table(dump: &AttentionDump, positions: usize) -> Result<()> {
    let selectors =
        "exact,window,random,pq:2x6,fastscan:32x4,fastscan:64x4,fastscan:64x4:plain,fastscan:128x4,fastscan:128x4:rerank4,quest:16";
    let cfg = EvalConfig {
        ratios: vec![0.1],
        positions,
        selectors: parse_selectors(selectors)?,
        sink: 32,
        aggregation: Aggregation::SumSoftmax,
    };
    outln!(
        "\nsparse attention, budget 10 % of the context (sink 32 + recent window + retrieved), \
         {positions} decode positions in [T/2, T), indexes trained on [0, T/2) and fed each \
         decoded key:\n"
    );
    let rows = evaluate(dump, &cfg)?;
    let exact_us = rows
        .iter()
        .find(|r| r.selector == "exact")
        .map_or(1.0, |r| r.select_us_per_step);
    outln!(
        "{:>24} {:>8} {:>8} {:>8} {:>11} {:>11} {:>12}",
        "selector",
        "mass",
        "recall",
        "err",
        "err/oracle",
        "select us",
        "vs exact"
    );
    for r in &rows {
        outln!(
            "{:>24} {:>8.4} {:>8.4} {:>8.4} {:>11.3} {:>11.1} {:>11.2}x",
            r.selector,
            r.mass,
            r.recall,
            r.err,
            r.err / r.oracle_err.max(1e-12),
            r.select_us_per_step,
            exact_us / r.select_us_per_step.max(1e-9)
        );
    }
    outln!(
        "\nmass: full-attention probability of the attended set; err: ||o_S - o|| / ||o||; \
         recall: overlap with the exact top-k; vs exact: exact scoring time over selection time."
    );
    Ok(())
}
