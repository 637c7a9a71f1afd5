//! Selectors: how the retrieved positions of a decode step are chosen among the candidates.
//!
//! | spec | index | scores |
//! |---|---|---|
//! | `exact` | none | exact `q · k` over the f16 keys (the oracle) |
//! | `window` | none | the most recent candidates (the whole budget becomes recent tokens) |
//! | `random` | none | uniformly random candidates (seeded per step) |
//! | `pq:MxB` | [`IndexPQ`] (`B` = 4, 6 or 8 bits) | float-table ADC (PQCache's own scheme: `pq:2x6`) |
//! | `fastscan:Mx4[:rerankF][:plain][:static]` | [`IndexPQFastScan`] after a [`DimTransform`] | u8-table fast-scan of the whole group at once; optionally the best `F * k` re-scored exactly |
//! | `quest:P` | page min/max | Quest's upper bound `sum_c max(q_c min_c, q_c max_c)` per page of `P` tokens; pages in bound order until the budget is spent |
//!
//! Fast-scan keys pass through a [`DimTransform`] fitted at prefill: whitened by the prefill
//! queries' second moment (when the caller gives them), rotated to their principal axes and
//! dealt to sub-spaces so that each carries the same share of variance; `:plain` quantizes
//! the raw keys instead.
//!
//! **Codebook refresh.** Post-RoPE keys drift with position: the slow-rotating channels of
//! keys decoded after the prefill take angles the prefill never showed, and codebooks trained
//! on the prefill quantize them worse and worse. A fast-scan head re-trains its codebooks on a
//! sample of every cached key and re-encodes them (same transform) once the cache has grown by
//! a quarter since the last training (and by at least [`REFRESH_MIN_GROWTH`] positions), from
//! [`HeadIndex::refresh_if_due`], which the retriever calls after each append; `:static`
//! keeps the prefill's codebooks. Amortised, about one re-encoding of the cache per 25 % of
//! growth.
//!
//! Every index is trained on the prefill keys and then takes each decoded key with `append`
//! (fast-scan appends into its last block: O(m) after encoding). Scores are combined over the
//! GQA group by [`Aggregation`].

use crate::error::{Error, Result};
use crate::index::{Index, IndexPQ, IndexPQFastScan};
use crate::metric::Metric;
use crate::pq::transform::{DimTransform, QueryEnergy};
use crate::pq::Nbits;
use crate::select::{
    nonneg_sampled_floor, nonneg_topk_of_survivors, select_topk_nonneg_f32, NONNEG_SAMPLE_STRIDE,
};
use half::f16;
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::filter::FilterKernel;
use pqcache_simd::softmax::{ExpTables, HeadRow, SoftmaxKernel};
use rand::{rngs::StdRng, seq::index::sample, SeedableRng};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Mutex;

/// How the query heads of a GQA group are combined into one score per candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// Sum over query heads of the softmax over candidates (PQCache).
    #[default]
    SumSoftmax,
    /// Max over query heads of the softmax over candidates.
    MaxSoftmax,
}

impl Aggregation {
    /// Folds one query head's probability `p` into a candidate's combined score `acc`.
    #[inline(always)]
    pub fn combine(self, acc: &mut f32, p: f32) {
        match self {
            Aggregation::SumSoftmax => *acc += p,
            Aggregation::MaxSoftmax => *acc = acc.max(p),
        }
    }
}

impl FromStr for Aggregation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Aggregation::SumSoftmax),
            "max" => Ok(Aggregation::MaxSoftmax),
            other => Err(Error::InvalidArgument(format!(
                "unknown aggregation {other:?} (sum or max)"
            ))),
        }
    }
}

/// A selector, as named on the command line.
#[derive(Clone, Debug, PartialEq)]
pub enum SelectorSpec {
    /// Exact scores (the oracle).
    Exact,
    /// The most recent candidates.
    Window,
    /// Random candidates.
    Random,
    /// Product quantization with a float table.
    Pq {
        /// Sub-quantizers.
        m: usize,
        /// Bits per index (4, 6 or 8).
        nbits: usize,
    },
    /// 4-bit fast-scan.
    FastScan {
        /// Sub-quantizers.
        m: usize,
        /// Re-rank `rerank * k` candidates exactly (0 or 1: off).
        rerank: usize,
        /// Quantize the keys through a fitted [`DimTransform`] (`false`: `:plain`).
        transform: bool,
        /// Re-train the codebooks as the cache grows (`false`: `:static`).
        refresh: bool,
    },
    /// Quest page bounds.
    Quest {
        /// Tokens per page.
        page: usize,
    },
}

impl fmt::Display for SelectorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectorSpec::Exact => write!(f, "exact"),
            SelectorSpec::Window => write!(f, "window"),
            SelectorSpec::Random => write!(f, "random"),
            SelectorSpec::Pq { m, nbits } => write!(f, "pq:{m}x{nbits}"),
            SelectorSpec::FastScan {
                m,
                rerank,
                transform,
                refresh,
            } => {
                write!(f, "fastscan:{m}x4")?;
                if *rerank > 1 {
                    write!(f, ":rerank{rerank}")?;
                }
                if !transform {
                    write!(f, ":plain")?;
                }
                if !refresh {
                    write!(f, ":static")?;
                }
                Ok(())
            }
            SelectorSpec::Quest { page } => write!(f, "quest:{page}"),
        }
    }
}

fn parse_mxb(s: &str, what: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::InvalidArgument(format!(
            "bad {what} setting {s:?} (expected MxB, e.g. 64x4)"
        ))
    };
    let (m, b) = s.split_once('x').ok_or_else(bad)?;
    Ok((m.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

impl FromStr for SelectorSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let spec = match parts.as_slice() {
            ["exact"] => SelectorSpec::Exact,
            ["window"] => SelectorSpec::Window,
            ["random"] => SelectorSpec::Random,
            ["pq", mb] => {
                let (m, nbits) = parse_mxb(mb, "pq")?;
                SelectorSpec::Pq { m, nbits }
            }
            ["fastscan", mb, rest @ ..] => {
                let (m, nbits) = parse_mxb(mb, "fastscan")?;
                if nbits != 4 {
                    return Err(Error::InvalidArgument(format!("fastscan codes are 4-bit, got {nbits}")));
                }
                let (mut rerank, mut transform, mut refresh) = (None, true, true);
                for option in rest {
                    if *option == "plain" && transform {
                        transform = false;
                    } else if *option == "static" && refresh {
                        refresh = false;
                    } else if let (Some(f), None) = (option.strip_prefix("rerank"), rerank) {
                        rerank = Some(f.parse().map_err(|_| {
                            Error::InvalidArgument(format!("bad re-rank setting {option:?} (e.g. rerank4)"))
                        })?);
                    } else {
                        return Err(Error::InvalidArgument(format!(
                            "bad fastscan option {option:?} in {s:?} (rerankF, plain, static; each once)"
                        )));
                    }
                }
                SelectorSpec::FastScan {
                    m,
                    rerank: rerank.unwrap_or(0),
                    transform,
                    refresh,
                }
            }
            ["quest", p] => SelectorSpec::Quest {
                page: p
                    .parse()
                    .ok()
                    .filter(|&p| p > 0 && p <= crate::limits::MAX_QUEST_PAGE)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "bad quest page size {p:?} (1 to {})",
                            crate::limits::MAX_QUEST_PAGE
                        ))
                    })?,
            },
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown selector {s:?} (exact, window, random, pq:MxB, fastscan:Mx4[:rerankF][:plain][:static], quest:P)"
                )))
            }
        };
        Ok(spec)
    }
}

/// Words of a spec in an attention file (format 3 on): `[kind, a, b, c, d]`.
pub(crate) const SPEC_WORDS: usize = 5;

impl SelectorSpec {
    /// The spec as typed words (kind 0 exact, 1 window, 2 random, 3 pq `[m, nbits]`,
    /// 4 fastscan `[m, rerank, transform, refresh]`, 5 quest `[page]`; unused words 0).
    pub(crate) fn to_words(&self) -> [u64; SPEC_WORDS] {
        match *self {
            SelectorSpec::Exact => [0, 0, 0, 0, 0],
            SelectorSpec::Window => [1, 0, 0, 0, 0],
            SelectorSpec::Random => [2, 0, 0, 0, 0],
            SelectorSpec::Pq { m, nbits } => [3, m as u64, nbits as u64, 0, 0],
            SelectorSpec::FastScan {
                m,
                rerank,
                transform,
                refresh,
            } => [4, m as u64, rerank as u64, transform as u64, refresh as u64],
            SelectorSpec::Quest { page } => [5, page as u64, 0, 0, 0],
        }
    }

    /// The spec from [`SelectorSpec::to_words`]' words: the shape of the words is checked
    /// here, the values by [`SelectorSpec::validate`] (as for a parsed spec).
    pub(crate) fn from_words(w: &[u64]) -> std::result::Result<SelectorSpec, String> {
        let &[kind, a, b, c, d] = w else {
            return Err(format!("{} words, expected {SPEC_WORDS}", w.len()));
        };
        let size = |v: u64, what: &str| {
            usize::try_from(v)
                .ok()
                .filter(|&x| x <= u32::MAX as usize)
                .ok_or_else(|| format!("{what} = {v} out of range"))
        };
        let flag = |v: u64, what: &str| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("{what} = {v} is not 0 or 1")),
        };
        let unused = |words: &[u64]| {
            if words.iter().all(|&v| v == 0) {
                Ok(())
            } else {
                Err(format!("kind {kind} with unused words {words:?} set"))
            }
        };
        Ok(match kind {
            0 => unused(&[a, b, c, d]).map(|_| SelectorSpec::Exact)?,
            1 => unused(&[a, b, c, d]).map(|_| SelectorSpec::Window)?,
            2 => unused(&[a, b, c, d]).map(|_| SelectorSpec::Random)?,
            3 => {
                unused(&[c, d])?;
                SelectorSpec::Pq {
                    m: size(a, "m")?,
                    nbits: size(b, "nbits")?,
                }
            }
            4 => SelectorSpec::FastScan {
                m: size(a, "m")?,
                rerank: size(b, "rerank")?,
                transform: flag(c, "transform")?,
                refresh: flag(d, "refresh")?,
            },
            5 => {
                unused(&[b, c, d])?;
                SelectorSpec::Quest {
                    page: size(a, "page")?,
                }
            }
            other => return Err(format!("unknown selector kind {other}")),
        })
    }

    /// Checks the settings against the head dimension.
    pub fn validate(&self, d: usize) -> Result<()> {
        match self {
            SelectorSpec::Pq { m, nbits } => {
                Nbits::from_bits(*nbits)?;
                crate::pq::ProductQuantizer::new(d, *m, Nbits::Four).map(|_| ())
            }
            SelectorSpec::FastScan { m, rerank, .. } => {
                crate::limits::at_most(
                    *rerank,
                    crate::limits::MAX_RERANK_FACTOR,
                    "re-rank factor",
                )?;
                IndexPQFastScan::new(d, *m, Metric::InnerProduct).map(|_| ())
            }
            SelectorSpec::Quest { page: 0 } => Err(Error::InvalidArgument(
                "the quest page size must be at least 1".into(),
            )),
            SelectorSpec::Quest { page } => {
                crate::limits::at_most(*page, crate::limits::MAX_QUEST_PAGE, "quest page")
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Rebuilds a head's index from what a file stored: the trained index for `pq` and
    /// `fastscan`, the keys (`t * d` f16) for the others.
    pub(crate) fn restore(
        &self,
        keys: &[f16],
        d: usize,
        seed: u64,
        part: RestoredHead,
    ) -> Result<Box<dyn HeadIndex>> {
        let mismatch =
            || Error::InvalidArgument("the stored index does not match the selector".into());
        Ok(match (self, part) {
            (SelectorSpec::Pq { m, nbits }, RestoredHead::Pq(pq)) => {
                if pq.pq().m() != *m || pq.pq().nbits().bits() != *nbits || pq.dim() != d {
                    return Err(mismatch());
                }
                Box::new(PqIndex { pq })
            }
            (
                SelectorSpec::FastScan {
                    m,
                    rerank,
                    refresh,
                    transform: fitted,
                },
                RestoredHead::FastScan(fs, transform, trained_len),
            ) => {
                if fs.pq().m() != *m || fs.dim() != d || transform.dim() != d {
                    return Err(mismatch());
                }
                let mut index = FastScanIndex::new(fs, transform, *rerank, *refresh, *fitted);
                if let Some(t) = trained_len {
                    if t == 0 || t > index.fs.ntotal() {
                        return Err(Error::InvalidArgument(format!(
                            "trained on {t} of {} positions",
                            index.fs.ntotal()
                        )));
                    }
                    index.trained_len = t;
                }
                Box::new(index)
            }
            (SelectorSpec::Pq { .. } | SelectorSpec::FastScan { .. }, _) => return Err(mismatch()),
            (SelectorSpec::Quest { .. }, RestoredHead::Nothing) => {
                self.build(&crate::io::f16_to_f32(keys), &QueryEnergy::new(d), d, seed)?
            }
            (_, RestoredHead::Nothing) => self.build(&[], &QueryEnergy::new(d), d, seed)?,
            _ => return Err(mismatch()),
        })
    }

    /// Keys a head must cache before this selector's index can be trained: one per centroid
    /// of a sub-quantizer (`2^nbits`: pq, fast-scan), what k-means needs; none for the others.
    /// Below it the retriever selects exactly (the oracle, cheap at that size); codebooks
    /// trained on few keys are re-trained by the refresh as the cache grows.
    pub fn min_train_len(&self) -> usize {
        match self {
            SelectorSpec::Pq { nbits, .. } => 1usize << (*nbits).min(16),
            SelectorSpec::FastScan { .. } => 1 << 4,
            _ => 0,
        }
    }

    /// Builds the per-head index on the prefill keys (`t * d` f32). `queries` sums up the
    /// prefill queries of the head's group (may hold none): fast-scan fits its
    /// [`DimTransform`] scale to them. `seed` varies per head.
    pub fn build(
        &self,
        keys: &[f32],
        queries: &QueryEnergy,
        d: usize,
        seed: u64,
    ) -> Result<Box<dyn HeadIndex>> {
        Ok(match self {
            SelectorSpec::Exact => Box::new(ExactIndex),
            SelectorSpec::Window => Box::new(WindowIndex),
            SelectorSpec::Random => Box::new(RandomIndex { seed }),
            SelectorSpec::Pq { m, nbits } => {
                let mut pq = IndexPQ::new(d, *m, Nbits::from_bits(*nbits)?, Metric::InnerProduct)?;
                pq.train_config.seed = seed;
                pq.train(keys)?;
                pq.add(keys)?;
                Box::new(PqIndex { pq })
            }
            SelectorSpec::FastScan {
                m,
                rerank,
                transform,
                refresh,
            } => {
                let mut fs = IndexPQFastScan::new(d, *m, Metric::InnerProduct)?;
                fs.train_config.seed = seed;
                let mapping = if *transform {
                    DimTransform::fit_with_energy(keys, queries, *m)?
                } else {
                    DimTransform::identity(d)
                };
                let mapped = mapping.keys(keys);
                fs.train(&mapped)?;
                fs.add(&mapped)?;
                Box::new(FastScanIndex::new(
                    fs, mapping, *rerank, *refresh, *transform,
                ))
            }
            SelectorSpec::Quest { page } => {
                let mut q = QuestIndex {
                    page: *page,
                    d,
                    len: 0,
                    min: Vec::new(),
                    max: Vec::new(),
                };
                for key in keys.chunks_exact(d) {
                    q.append(key)?;
                }
                Box::new(q)
            }
        })
    }
}

/// What a selector sees at one step for one kv_head.
pub struct ChooseContext<'a> {
    /// The group's queries, `group * d`.
    pub queries: &'a [f32],
    /// Head dimension.
    pub d: usize,
    /// Score scale.
    pub scale: f32,
    /// Every cached key of the head, `len * d` f16 (in two pieces for an opened cache
    /// appended to).
    pub keys: super::SplitRows<'a>,
    /// Candidate positions.
    pub candidates: Range<usize>,
    /// Positions to choose (`<= candidates.len()`).
    pub k: usize,
    /// Group aggregation.
    pub aggregation: Aggregation,
    /// Distance kernels.
    pub kernels: &'a DistanceKernels,
    /// A per-step value (the cache length) for seeded selectors.
    pub step: u64,
    /// Whether the caller uses the tail estimate ([`Chosen::tail`]); selectors skip it
    /// otherwise.
    pub tail: bool,
}

impl ChooseContext<'_> {
    fn group(&self) -> usize {
        self.queries.len() / self.d
    }

    /// Exact logits of every query against the contiguous `positions`, query-major: one
    /// pass over the keys for the whole group.
    fn exact_logits_range(&self, positions: Range<usize>) -> Vec<f32> {
        let (d, g) = (self.d, self.group());
        let mut out = vec![0.0f32; g * positions.len()];
        self.keys
            .dot_group_run(self.kernels, self.queries, g, d, positions, &mut out);
        out.iter_mut().for_each(|l| *l *= self.scale);
        out
    }

    /// Exact logits of every query against scattered `positions`, query-major: the rows are
    /// read in place (in the given order) and scored in one grouped pass.
    fn exact_logits_at(&self, positions: &[u32]) -> Vec<f32> {
        let g = self.group();
        let mut out = vec![0.0f32; g * positions.len()];
        self.keys
            .dot_group_at(self.kernels, self.queries, g, self.d, positions, &mut out);
        out.iter_mut().for_each(|l| *l *= self.scale);
        out
    }
}

/// Per-query softmax (max subtracted) over `logits` (`group` rows of `n`), combined per
/// column. Returns the combined scores and, per query, `(max, sum of exp)` for re-ranking.
pub fn aggregate(logits: &[f32], group: usize, agg: Aggregation) -> (Vec<f32>, Vec<(f32, f32)>) {
    let n = logits.len() / group.max(1);
    let mut combined = vec![0.0f32; n];
    let mut norms = Vec::with_capacity(group);
    let mut probs = vec![0.0f32; n];
    for row in logits.chunks_exact(n.max(1)).take(group) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = exp_nonpositive(l - max);
        }
        let total: f32 = probs.iter().sum();
        let inv = 1.0 / total;
        for (c, &p) in combined.iter_mut().zip(&probs) {
            agg.combine(c, p * inv);
        }
        norms.push((max, total));
    }
    (combined, norms)
}

/// `e^x` for `x <= 0` (softmax arguments), within 3 ulps, in straight-line code the compiler
/// vectorises (a libm call per candidate was a quarter of exact selection's time at long
/// contexts): `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody-Waite, two-part `ln 2`), `e^r` by
/// its degree-6 Taylor polynomial (truncation below `3e-8` relative), times `2^n` built in
/// the exponent bits. Arguments below `-87` give `e^-87` (about `1.6e-38`, a weight no output
/// can feel, and no denormals); NaN gives NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|t| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A selector's choice for one kv_head at one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chosen {
    /// The chosen candidate positions, ascending.
    pub positions: Vec<u32>,
    /// Per query head of the group: `ln sum_j exp(logit_j)` over the candidates *not* chosen,
    /// as the selector's scores estimate it (exact for the oracle; `-inf` when none is left),
    /// or `None` when the selector has no scores to estimate it from (window, random, Quest).
    /// The attention step uses it for the tail term (see [`crate::attention::TailTerm`]).
    pub tail: Option<Vec<f32>>,
}

impl Chosen {
    /// A choice without a tail estimate.
    pub fn positions(positions: Vec<u32>) -> Chosen {
        Chosen {
            positions,
            tail: None,
        }
    }
}

/// `ln sum exp` of each query row of `logits` (`group` rows over the candidates) over the
/// candidates whose offsets are not in `chosen`: the row's whole sum (`norms`: per row, the
/// max and the sum of `exp(l - max)`, as [`aggregate`] returns them) less the chosen terms,
/// so that only the `k` chosen are exponentiated again. `-inf` when every candidate is chosen.
fn tail_log_mass(logits: &[f32], norms: &[(f32, f32)], chosen: &[u32]) -> Vec<f32> {
    let n = logits.len() / norms.len().max(1);
    norms
        .iter()
        .zip(logits.chunks_exact(n.max(1)))
        .map(|(&(max, total), row)| {
            if chosen.len() >= n {
                return f32::NEG_INFINITY;
            }
            let chosen_terms: Vec<f32> = chosen
                .iter()
                .map(|&c| exp_nonpositive(row[c as usize] - max))
                .collect();
            let taken = lane_sum(&chosen_terms);
            let rest = total - taken;
            if rest > 0.0 {
                max + rest.ln()
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}

/// `sum(x)` over 16 lanes (vectorises; a plain f32 `sum` is one sequential chain).
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// The choice from per-query logits over the candidates (exact or a selector's estimate):
/// aggregated, top `k`, with the tail estimated from the same logits.
fn choose_from_logits(ctx: &ChooseContext<'_>, logits: &[f32]) -> Chosen {
    let (scores, norms) = aggregate(logits, ctx.group(), ctx.aggregation);
    let rel = select_topk_nonneg_f32(&scores, ctx.k);
    let tail = ctx.tail.then(|| tail_log_mass(logits, &norms, &rel));
    Chosen {
        positions: rel
            .into_iter()
            .map(|i| (ctx.candidates.start + i as usize) as u32)
            .collect(),
        tail,
    }
}

/// A per-(layer, kv_head) selector state.
pub trait HeadIndex: Send + Sync {
    /// Takes the key of the next position (`d` f32).
    fn append(&mut self, key: &[f32]) -> Result<()>;
    /// Whether [`HeadIndex::refresh_if_due`] would re-train once the cache holds `len`
    /// positions.
    fn refresh_due(&self, _len: usize) -> bool {
        false
    }
    /// Re-trains on `keys` (every cached key, `len * d` f16, the last appended one included)
    /// and `queries` (every query the head's group has shown the retriever) if the index's
    /// refresh policy says it is due; whether it did.
    fn refresh_if_due(&mut self, _keys: &[f16], _d: usize, _queries: &QueryEnergy) -> Result<bool> {
        Ok(false)
    }
    /// Chooses `ctx.k` positions among `ctx.candidates`, sorted ascending, with the tail
    /// estimate when the index has scores for it.
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen>;
    /// What this index keeps that the keys cannot give back (trained codebooks and codes),
    /// for index files.
    fn stored(&self) -> StoredHead<'_> {
        StoredHead::Nothing
    }
}

/// The trained part of a head's index, borrowed for saving.
pub enum StoredHead<'a> {
    /// Nothing: the index is rebuilt from the keys (exact, window, random, quest).
    Nothing,
    /// A PQ index.
    Pq(&'a IndexPQ),
    /// A fast-scan index, the transform its keys went through and the positions it was
    /// trained on.
    FastScan(&'a IndexPQFastScan, &'a DimTransform, usize),
}

/// The trained part of a head's index, read back from a file.
pub enum RestoredHead {
    /// Nothing stored.
    Nothing,
    /// A PQ index.
    Pq(IndexPQ),
    /// A fast-scan index, the transform its keys went through and the positions it was
    /// trained on (the refresh's clock; `None` in files before format 4: the index's size).
    FastScan(IndexPQFastScan, DimTransform, Option<usize>),
}

/// The oracle's choice: exact scores of every candidate, aggregated, top `k`. What the `exact`
/// selector does, and what every selector does while its index is untrained.
pub(crate) fn choose_exact(ctx: &ChooseContext<'_>) -> Chosen {
    let logits = ctx.exact_logits_range(ctx.candidates.clone());
    choose_from_logits(ctx, &logits)
}

struct ExactIndex;

impl HeadIndex for ExactIndex {
    fn append(&mut self, _key: &[f32]) -> Result<()> {
        Ok(())
    }
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        Ok(choose_exact(ctx))
    }
}

struct WindowIndex;

impl HeadIndex for WindowIndex {
    fn append(&mut self, _key: &[f32]) -> Result<()> {
        Ok(())
    }
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        Ok(Chosen::positions(
            (ctx.candidates.end - ctx.k..ctx.candidates.end)
                .map(|p| p as u32)
                .collect(),
        ))
    }
}

struct RandomIndex {
    seed: u64,
}

impl HeadIndex for RandomIndex {
    fn append(&mut self, _key: &[f32]) -> Result<()> {
        Ok(())
    }
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(0x9e37_79b9).wrapping_add(ctx.step));
        let mut chosen: Vec<u32> = sample(&mut rng, ctx.candidates.len(), ctx.k)
            .into_iter()
            .map(|i| (ctx.candidates.start + i) as u32)
            .collect();
        chosen.sort_unstable();
        Ok(Chosen::positions(chosen))
    }
}

struct PqIndex {
    pq: IndexPQ,
}

impl HeadIndex for PqIndex {
    fn append(&mut self, key: &[f32]) -> Result<()> {
        self.pq.add(key)
    }
    fn stored(&self) -> StoredHead<'_> {
        StoredHead::Pq(&self.pq)
    }
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        let n = self.pq.ntotal();
        let mut all = vec![0.0f32; n];
        let mut logits = Vec::with_capacity(ctx.group() * ctx.candidates.len());
        for q in ctx.queries.chunks_exact(ctx.d) {
            self.pq.adc_scores(q, &mut all)?;
            logits.extend(all[ctx.candidates.clone()].iter().map(|&s| s * ctx.scale));
        }
        Ok(choose_from_logits(ctx, &logits))
    }
}

struct FastScanIndex {
    /// Over the transformed keys.
    fs: IndexPQFastScan,
    transform: DimTransform,
    rerank: usize,
    /// Re-train as the cache grows (see the module doc).
    refresh: bool,
    /// The transform is fitted (not `:plain`): a refresh re-fits it.
    fit_transform: bool,
    /// Positions at the last training.
    trained_len: usize,
    softmax: SoftmaxKernel,
    filter: FilterKernel,
    /// Buffers reused across steps: fresh megabyte-sized allocations every step would cost
    /// page faults comparable to the scan itself.
    scratch: Mutex<Scratch>,
}

/// [`FastScanIndex`]'s buffers reused across steps.
#[derive(Default)]
struct Scratch {
    /// The group's u16 sums, `group * ntotal`.
    sums: Vec<u16>,
    /// Every candidate's combined weight (when the sampled floor cannot be used).
    dense: Vec<f32>,
    /// The candidates at or above the sampled floor, and their combined weights.
    kept: Vec<u32>,
    kept_weights: Vec<f32>,
    /// Per head, its every [`NONNEG_SAMPLE_STRIDE`]-th sum (the sampled floor's input).
    samples: Vec<Vec<u16>>,
}

/// Sums per chunk of [`max_and_sample`]: 8 KB, so that the sample is copied from L1 right
/// after the maximum's pass read the chunk (a multiple of the sample's stride).
const SAMPLE_CHUNK: usize = 4096;

/// The largest of `row` (0 when empty), and every [`NONNEG_SAMPLE_STRIDE`]-th element from
/// index 0 into `sample`: one pass over the row. Copying the sample in a pass of its own read
/// every cache line of the group's sums (the stride is half a line) a second time: 3.7 % of
/// a 128K-token selection.
fn max_and_sample(filter: &FilterKernel, row: &[u16], sample: &mut Vec<u16>) -> u16 {
    sample.clear();
    sample.reserve(row.len().div_ceil(NONNEG_SAMPLE_STRIDE));
    let mut hi = 0;
    for chunk in row.chunks(SAMPLE_CHUNK) {
        hi = hi.max(filter.max_u16(chunk));
        sample.extend(chunk.iter().step_by(NONNEG_SAMPLE_STRIDE));
    }
    hi
}

impl FastScanIndex {
    /// Wraps a trained (and filled) fast-scan index; kernels resolved once here.
    fn new(
        fs: IndexPQFastScan,
        transform: DimTransform,
        rerank: usize,
        refresh: bool,
        fit_transform: bool,
    ) -> FastScanIndex {
        FastScanIndex {
            trained_len: fs.ntotal(),
            fs,
            transform,
            rerank,
            refresh,
            fit_transform,
            softmax: SoftmaxKernel::best(),
            filter: FilterKernel::best(),
            scratch: Mutex::new(Scratch::default()),
        }
    }
}

impl HeadIndex for FastScanIndex {
    fn append(&mut self, key: &[f32]) -> Result<()> {
        if key.len() != self.transform.dim() {
            return Err(Error::DimensionMismatch {
                expected: self.transform.dim(),
                got: key.len(),
            });
        }
        self.fs.add(&self.transform.keys(key))
    }
    fn stored(&self) -> StoredHead<'_> {
        StoredHead::FastScan(&self.fs, &self.transform, self.trained_len)
    }

    /// Due once the cache holds a quarter more positions than at the last training (and at
    /// least [`REFRESH_MIN_GROWTH`] more): the codebooks are re-trained on up to
    /// [`REFRESH_SAMPLE`] keys spread evenly over every position, then every key is
    /// re-encoded (same transform, same seed). The new index replaces the old one only when
    /// both steps succeeded.
    fn refresh_due(&self, len: usize) -> bool {
        self.refresh && len >= self.trained_len + (self.trained_len / 4).max(REFRESH_MIN_GROWTH)
    }

    fn refresh_if_due(&mut self, keys: &[f16], d: usize, queries: &QueryEnergy) -> Result<bool> {
        let n = keys.len() / d.max(1);
        if !self.refresh_due(n) || d != self.fs.dim() {
            return Ok(false);
        }
        let take = n.min(REFRESH_SAMPLE);
        let sample: Vec<f32> = (0..take)
            .flat_map(|i| {
                let p = i * n / take;
                crate::io::f16_to_f32(&keys[p * d..(p + 1) * d])
            })
            .collect();
        let m = self.fs.pq().m();
        // Queries drift with position as the keys do: a fitted map is re-fitted to every
        // query seen so far (the prompt's and the decoded steps' that were handed to the
        // retriever), on the same sample of keys.
        let transform = if self.fit_transform && queries.count() > 0 && queries.dim() == d {
            DimTransform::fit_with_energy(&sample, queries, m)?
        } else {
            self.transform.clone()
        };
        let mut fs = IndexPQFastScan::new(d, m, Metric::InnerProduct)?;
        fs.train_config = self.fs.train_config.clone();
        fs.train(&transform.keys(&sample))?;
        for chunk in keys.chunks(REFRESH_ENCODE_CHUNK * d) {
            fs.add(&transform.keys(&crate::io::f16_to_f32(chunk)))?;
        }
        self.fs = fs;
        self.transform = transform;
        self.trained_len = n;
        Ok(true)
    }

    /// One fast-scan pass scores the whole group in u16. Per query head, the softmax of the
    /// approximate logits: weights `exp(step * (v - hi))` from the head's largest sum `hi`
    /// through the SIMD exponential tables of [`pqcache_simd::softmax`], zero for candidates
    /// more than `LOG_CUTOFF` below `hi` (each weighs less than `e^-12` of the head's best
    /// token), normalised over the candidates. The group's weights are combined in one pass
    /// and the best `k` (or `rerank * k`, then re-scored with exact logits under the same
    /// normalisers) found by a sampled threshold and an exact selection of the survivors. If
    /// fewer than `k` candidates carry any weight, the most recent others fill the budget
    /// (their weight is negligible either way).
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        let (n, g) = (self.fs.ntotal(), ctx.group());
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = &mut *guard;
        let sums = &mut scratch.sums;
        sums.resize(g * n, 0);
        let tables = self
            .fs
            .scan_scores(&self.transform.queries(ctx.queries), sums)?;
        let cand = ctx.candidates.clone();
        let nc = cand.len();
        // Per head: (largest approximate logit, normaliser), for re-ranking.
        let mut norms = Vec::with_capacity(g);
        let mut heads = Vec::with_capacity(g);
        scratch.samples.resize_with(g, Vec::new);
        for ((q, table), sample) in tables.iter().enumerate().zip(&mut scratch.samples) {
            let row = &sums[q * n + cand.start..q * n + cand.end];
            let hi = max_and_sample(&self.filter, row, sample);
            let step = ctx.scale * table.delta;
            let span = (LOG_CUTOFF / step).ceil().min(hi as f32) as u16;
            let exp = ExpTables::new(step);
            let z = self.softmax.weight_sum(row, hi, span, &exp);
            heads.push(HeadRow {
                row,
                hi,
                span,
                exp,
                factor: 1.0 / z,
            });
            norms.push((ctx.scale * table.score(hi), z));
        }
        let max = ctx.aggregation == Aggregation::MaxSoftmax;
        let want = if self.rerank > 1 {
            self.rerank.saturating_mul(ctx.k)
        } else {
            ctx.k
        }
        .min(nc);
        let best = self.best_weighted(
            &heads,
            &scratch.samples[..g],
            max,
            want,
            nc,
            (
                &mut scratch.dense,
                &mut scratch.kept,
                &mut scratch.kept_weights,
            ),
        );
        let rel: Vec<u32> = if self.rerank <= 1 {
            best
        } else {
            let positions: Vec<u32> = best.iter().map(|&i| cand.start as u32 + i).collect();
            let exact = ctx.exact_logits_at(&positions);
            let mut rescored = vec![0.0f32; positions.len()];
            for (q, &(top, z)) in norms.iter().enumerate() {
                let logits = &exact[q * positions.len()..(q + 1) * positions.len()];
                // p = exp(l - top) / z, as exp(l - hi) * (exp(hi - top) / z) with hi the
                // larger of `top` and the exact logits: every exponent is then <= 0 (the
                // straight-line exponential, vectorised), and one libm call per head.
                let hi = logits.iter().copied().fold(top, f32::max);
                let factor = (((hi - top) as f64).exp() / z as f64) as f32;
                for (r, &l) in rescored.iter_mut().zip(logits) {
                    ctx.aggregation.combine(r, exp_nonpositive(l - hi) * factor);
                }
            }
            select_topk_nonneg_f32(&rescored, ctx.k)
                .into_iter()
                .map(|j| best[j as usize])
                .collect()
        };
        // The tail per head: the approximate weights of every candidate (`z`) less those of
        // the chosen, in units of the head's largest approximate logit `top`.
        let tail = ctx.tail.then(|| self.tail(&heads, &norms, &rel, nc));
        let mut positions: Vec<u32> = rel.into_iter().map(|i| cand.start as u32 + i).collect();
        // Ascending already without re-ranking, unless weightless candidates were appended.
        if !positions.is_sorted() {
            positions.sort_unstable();
        }
        Ok(Chosen { positions, tail })
    }
}

impl FastScanIndex {
    /// The offsets of the `want` candidates (`nc` of them) of largest combined weight over
    /// `heads`, ascending, ties to the smaller offset; if fewer than `want` carry any weight,
    /// the most recent weightless ones fill the rest (appended after them, descending).
    ///
    /// The combined weights of every [`NONNEG_SAMPLE_STRIDE`]-th candidate (`samples`: per
    /// head, those candidates' sums, from [`max_and_sample`]) place a floor
    /// ([`nonneg_sampled_floor`]); one pass computes every combined weight and keeps those at
    /// or above it ([`SoftmaxKernel::combine_at_least`]), and the best `want` of those are the
    /// answer: what [`select_topk_nonneg_f32`] finds over all the weights, without writing them
    /// and filtering them in a second pass. Where the floor cannot be sampled, is zero (then
    /// weightless candidates may be needed) or keeps too few, every weight is written to
    /// `dense` and selected from there. `kept` and `kept_weights` hold the survivors.
    fn best_weighted(
        &self,
        heads: &[HeadRow<'_>],
        samples: &[Vec<u16>],
        max: bool,
        want: usize,
        nc: usize,
        (dense, kept, kept_weights): (&mut Vec<f32>, &mut Vec<u32>, &mut Vec<f32>),
    ) -> Vec<u32> {
        let sampled = || {
            let sample_heads: Vec<HeadRow<'_>> = heads
                .iter()
                .zip(samples)
                .map(|(h, row)| HeadRow { row, ..h.clone() })
                .collect();
            let mut sample = vec![0.0f32; nc.div_ceil(NONNEG_SAMPLE_STRIDE)];
            self.softmax.combine(&sample_heads, &mut sample, max);
            sample
        };
        if let Some(floor) = nonneg_sampled_floor(nc, want, sampled).filter(|&f| f > 0.0) {
            kept.clear();
            kept_weights.clear();
            self.softmax
                .combine_at_least(heads, max, floor, kept, kept_weights);
            if nonneg_topk_of_survivors(kept, kept_weights, want) {
                return kept.clone();
            }
        }
        dense.resize(nc, 0.0);
        self.softmax.combine(heads, dense, max);
        let mut best: Vec<u32> = select_topk_nonneg_f32(dense, want)
            .into_iter()
            .filter(|&i| dense[i as usize] > 0.0)
            .collect();
        if best.len() < want {
            // Fewer than `want` candidates carry weight (all of them are in `best`): fill
            // with the most recent weightless ones.
            let need = want - best.len();
            best.extend(
                (0..nc as u32)
                    .rev()
                    .filter(|&i| dense[i as usize] == 0.0)
                    .take(need),
            );
        }
        best
    }

    /// Per head, `ln` of the approximate weights of every candidate (`z`, the scan's
    /// normaliser) less those of the chosen (`rel`, offsets into the candidates, gathered and
    /// weighed by the same tables in one SIMD pass), in units of the head's largest
    /// approximate logit `top`; `-inf` when nothing is left.
    fn tail(
        &self,
        heads: &[HeadRow<'_>],
        norms: &[(f32, f32)],
        rel: &[u32],
        nc: usize,
    ) -> Vec<f32> {
        heads
            .iter()
            .zip(norms)
            .map(|(h, &(top, z))| {
                let taken = self.softmax.weight_sum_at(h.row, rel, h.hi, h.span, &h.exp);
                let rest = z - taken;
                if rel.len() >= nc || rest <= 0.0 {
                    f32::NEG_INFINITY
                } else {
                    top + rest.ln()
                }
            })
            .collect()
    }
}

/// A fast-scan head re-trains once it has grown by at least this many positions (and a
/// quarter) since its last training: a floor so that short caches do not re-train every few
/// tokens.
pub const REFRESH_MIN_GROWTH: usize = 256;
/// Keys a refresh trains on at most (k-means subsamples further, to 256 per centroid).
const REFRESH_SAMPLE: usize = 16_384;
/// Keys converted and encoded at a time by a refresh.
const REFRESH_ENCODE_CHUNK: usize = 4096;

/// Candidates whose approximate logit is more than this below a head's maximum weigh less
/// than `e^-12` (6e-6) of the head's best token each and are treated as weightless: they can
/// only be chosen when fewer than `k` candidates carry weight. Measured on a 32K-token Gemma
/// dump (`eval-attention`, ratio 0.1): the same error as a cutoff of 30, 30 % less time.
const LOG_CUTOFF: f32 = 12.0;

/// Quest: per page of `page` positions, the channel-wise min and max of its keys.
struct QuestIndex {
    page: usize,
    d: usize,
    len: usize,
    /// `pages * d`.
    min: Vec<f32>,
    /// `pages * d`.
    max: Vec<f32>,
}

impl HeadIndex for QuestIndex {
    fn append(&mut self, key: &[f32]) -> Result<()> {
        let d = self.d;
        if self.len.is_multiple_of(self.page) {
            self.min.extend_from_slice(key);
            self.max.extend_from_slice(key);
        } else {
            let p = self.len / self.page;
            for ((lo, hi), &v) in self.min[p * d..(p + 1) * d]
                .iter_mut()
                .zip(&mut self.max[p * d..(p + 1) * d])
                .zip(key)
            {
                *lo = lo.min(v);
                *hi = hi.max(v);
            }
        }
        self.len += 1;
        Ok(())
    }
    fn choose(&self, ctx: &ChooseContext<'_>) -> Result<Chosen> {
        let (d, page) = (self.d, self.page);
        let (first, last) = (ctx.candidates.start / page, (ctx.candidates.end - 1) / page);
        let pages: Vec<usize> = (first..=last).collect();
        // Upper bound of q . k over a page: sum_c max(q_c * min_c, q_c * max_c).
        let mut logits = Vec::with_capacity(ctx.group() * pages.len());
        for q in ctx.queries.chunks_exact(d) {
            for &p in &pages {
                let (lo, hi) = (&self.min[p * d..(p + 1) * d], &self.max[p * d..(p + 1) * d]);
                let bound: f32 = q
                    .iter()
                    .zip(lo.iter().zip(hi))
                    .map(|(&qc, (&l, &h))| (qc * l).max(qc * h))
                    .sum();
                logits.push(bound * ctx.scale);
            }
        }
        let (scores, _) = aggregate(&logits, ctx.group(), ctx.aggregation);
        // The budget is spent on pages in the order of their bounds, each contributing its
        // positions inside the candidate range, the last one cut where the budget ends: exactly
        // k positions. Only the first and last pages can be partial, so the best
        // ceil(k / page) + 2 pages always hold k of them.
        let need = ctx.k.div_ceil(page).saturating_add(2).min(pages.len());
        let mut best = select_topk_nonneg_f32(&scores, need);
        best.sort_by(|&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
        let mut chosen: Vec<u32> = Vec::with_capacity(ctx.k);
        for i in best {
            let left = ctx.k - chosen.len();
            if left == 0 {
                break;
            }
            let p = pages[i as usize];
            // The page's positions inside the candidate range (a range, not a walk).
            let lo = p.saturating_mul(page).max(ctx.candidates.start);
            let hi = p
                .saturating_add(1)
                .saturating_mul(page)
                .min(ctx.candidates.end)
                .max(lo);
            chosen.extend((lo..hi.min(lo + left)).map(|pos| pos as u32));
        }
        chosen.sort_unstable();
        Ok(Chosen::positions(chosen))
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_nonpositive, SelectorSpec};

    #[test]
    fn specs_round_trip_through_their_file_words_and_bad_words_are_refused() {
        for text in [
            "exact",
            "window",
            "random",
            "pq:2x6",
            "fastscan:64x4",
            "fastscan:32x4:rerank4:plain:static",
            "quest:16",
        ] {
            let spec: SelectorSpec = text.parse().unwrap();
            let back = SelectorSpec::from_words(&spec.to_words()).unwrap();
            assert_eq!(back, spec, "{text}");
            assert_eq!(back.to_string().parse::<SelectorSpec>().unwrap(), spec);
        }
        for bad in [
            vec![0, 0, 0, 0],
            vec![6, 0, 0, 0, 0],
            vec![0, 1, 0, 0, 0],
            vec![4, 64, 0, 2, 1],
            vec![3, 1 << 40, 4, 0, 0],
            vec![5, 16, 0, 0, 9],
        ] {
            assert!(SelectorSpec::from_words(&bad).is_err(), "{bad:?}");
        }
        // Values are the validation's: a page of 0 passes the words and fails there.
        let zero = SelectorSpec::from_words(&[5, 0, 0, 0, 0]).unwrap();
        assert!(zero.validate(8).is_err());
    }

    #[test]
    fn exp_is_within_three_ulps_on_softmax_arguments() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x -= 0.000_731;
        }
        // 3 ulps of f32 relative to the value (measured: 2.1, from the f32 Horner steps).
        assert!(
            worst <= 3.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e9) > 0.0 && exp_nonpositive(-1e9) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
