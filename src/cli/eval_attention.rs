//! `pqcache eval-attention`: sparse attention fidelity on an attention dump, per budget ratio
//! and selector (the protocol of [`crate::attention::eval`]).

use super::outln;
use super::with_threads;
use crate::attention::eval::{evaluate, EvalConfig, EvalRow};
use crate::attention::selector::{Aggregation, SelectorSpec};
use crate::error::{Error, Result};
use crate::io::dump::AttentionDump;
use clap::Args;
use std::path::PathBuf;

/// Selectors run when none is named.
pub const DEFAULT_SELECTORS: &str =
    "exact,window,random,pq:2x6,fastscan:32x4,fastscan:64x4,fastscan:64x4:plain,fastscan:64x4:rerank4,fastscan:128x4,fastscan:128x4:plain,fastscan:128x4:rerank4,quest:16";

/// Arguments of `pqcache eval-attention`.
#[derive(Args, Debug, Clone)]
pub struct EvalAttentionArgs {
    /// Attention dump folder (q.npy, k.npy, v.npy, meta.json).
    #[arg(long)]
    pub data: PathBuf,
    /// Budget ratios, comma-separated.
    #[arg(long, default_value = "0.2,0.1,0.05")]
    pub ratios: String,
    /// Decode positions per layer, evenly spaced in [T/2, T).
    #[arg(long, default_value_t = 16)]
    pub positions: usize,
    /// Selectors, comma-separated (exact, window, random, pq:MxB, fastscan:Mx4 with optional :rerankF and :plain, quest:P).
    #[arg(long, default_value = DEFAULT_SELECTORS)]
    pub selectors: String,
    /// Always-attended first tokens.
    #[arg(long, default_value_t = 32)]
    pub sink: usize,
    /// How the query heads of a GQA group are combined: sum or max of softmaxes.
    #[arg(long, default_value = "sum")]
    pub aggregation: String,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object {"rows": [...]}.
    #[arg(long)]
    pub json: bool,
}

/// Parses a comma-separated list of selectors.
pub fn parse_selectors(list: &str) -> Result<Vec<SelectorSpec>> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// Parses a comma-separated list of ratios.
pub fn parse_ratios(list: &str) -> Result<Vec<f64>> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| Error::InvalidArgument(format!("bad ratio {s:?}")))
        })
        .collect()
}

/// Runs `pqcache eval-attention`.
pub fn run(a: &EvalAttentionArgs) -> Result<()> {
    let cfg = EvalConfig {
        ratios: parse_ratios(&a.ratios)?,
        positions: a.positions,
        selectors: parse_selectors(&a.selectors)?,
        sink: a.sink,
        aggregation: a.aggregation.parse::<Aggregation>()?,
    };
    let dump = AttentionDump::load(&a.data)?;
    let rows = with_threads(a.threads, || evaluate(&dump, &cfg))??;
    if a.json {
        outln!("{}", serde_json::json!({ "rows": rows }));
    } else {
        outln!(
            "{}: {} tokens, layers {:?}, {} query heads / {} kv heads, head_dim {}, {} positions per layer",
            a.data.display(),
            dump.tokens,
            dump.layers,
            dump.q_heads,
            dump.kv_heads,
            dump.head_dim,
            a.positions
        );
        print_table(&rows);
    }
    Ok(())
}

/// Prints rows as a table.
pub fn print_table(rows: &[EvalRow]) {
    outln!(
        "{:>6} {:>24} {:>8} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "ratio",
        "selector",
        "mass",
        "recall",
        "err",
        "oracle_err",
        "err/oracle",
        "select us"
    );
    for r in rows {
        outln!(
            "{:>6} {:>24} {:>8.4} {:>8.4} {:>8.4} {:>10.4} {:>10.3} {:>12.1}",
            r.ratio,
            r.selector,
            r.mass,
            r.recall,
            r.err,
            r.oracle_err,
            r.err / r.oracle_err.max(1e-12),
            r.select_us_per_step
        );
    }
}
