//! What the model says under sparse attention: teacher-forced perplexity, KL to full attention
//! and top-1 agreement, per attention backend and budget.
//!
//! Protocol: the first `prefill` tokens are one dense prefill (the retrieval backends train
//! their indexes on it, as a serving stack would); every later token is decoded one at a time,
//! teacher-forced (the true token is the next input), by every backend in lockstep, so the
//! next-token distributions compare position by position without storing them. Per backend:
//! mean NLL of `tokens[prefill..]`, perplexity, mean `KL(dense || backend)`, the share of
//! positions whose argmax equals dense's, and decode milliseconds per token.
//!
//! Passkey ([`passkey`]): a needle sentence with a five-digit key at a depth of a haystack;
//! the haystack is prefilled densely, the *question goes through the method* token by token
//! (prefilling it densely would hide retrieval errors), then the answer is generated greedily
//! through the method; a trial passes when the answer's first number is the key.

use crate::error::{LlmError, Result};
use crate::model::{argmax, log_sum_exp, Backend, Gemma3, PrefillOptions, Session};

/// One backend's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityRow {
    /// `dense` or the selector spec.
    pub attention: String,
    /// Budget ratio (1 for dense).
    pub budget: f64,
    /// Mean next-token NLL over the decoded positions.
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Mean `KL(dense || this)` of the next-token distributions (0 for dense).
    pub kl: f64,
    /// The standard error of `kl` ([`mean_and_se`]).
    pub kl_se: f64,
    /// `nll` minus dense's: the mean of the paired per-position differences.
    pub dnll: f64,
    /// The standard error of `dnll` ([`mean_and_se`]): a perplexity gap of a few tenths of
    /// a percent over 2,048 positions is often inside it.
    pub dnll_se: f64,
    /// `nll` minus the oracle's, where the run holds this method's oracle (`exact` at the
    /// same budget and attention options, [`oracle_of`]): paired per position, so the
    /// noise both share (which tokens are hard) cancels.
    pub oracle_dnll: Option<f64>,
    /// The standard error of `oracle_dnll`.
    pub oracle_dnll_se: Option<f64>,
    /// Share of positions whose most likely token is dense's.
    pub top1: f64,
    /// Decode wall time per token.
    pub ms_per_token: f64,
}

/// `log softmax` of `logits`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// `KL(p || q)` from log-probabilities.
fn kl(logp: &[f64], logq: &[f64]) -> f64 {
    logp.iter()
        .zip(logq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// Positions per batch of [`mean_and_se`].
pub const SE_BATCH: usize = 32;

/// The mean of `x` and its standard error by batch means: the sample deviation of the means
/// of consecutive batches of [`SE_BATCH`] positions over the square root of their number
/// (per-position figures are correlated along the text: a retrieval miss or a hard passage
/// spans several tokens, and the per-position formula would understate the error). Fewer than
/// two whole batches: per position; one position: 0.
pub fn mean_and_se(x: &[f64]) -> (f64, f64) {
    let n = x.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let batch = if n >= 2 * SE_BATCH { SE_BATCH } else { 1 };
    let means: Vec<f64> = x
        .chunks_exact(batch)
        .map(|c| c.iter().sum::<f64>() / batch as f64)
        .collect();
    let b = means.len();
    if b < 2 {
        return (mean, 0.0);
    }
    let m = means.iter().sum::<f64>() / b as f64;
    let var = means.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (b - 1) as f64;
    (mean, (var / b as f64).sqrt())
}

/// `a[i] - b[i]` for every `i`.
fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// The oracle of a retrieval method: exact selection at the same budget with the same
/// attention options (`fastscan:64x4+notail` -> `exact+notail`); none for dense or exact.
pub fn oracle_of(b: &Backend) -> Option<Backend> {
    match b {
        Backend::Retrieval {
            selector,
            budget,
            window,
            tail_term,
        } if *selector != pqcache::SelectorSpec::Exact => Some(Backend::Retrieval {
            selector: pqcache::SelectorSpec::Exact,
            budget: *budget,
            window: *window,
            tail_term: *tail_term,
        }),
        _ => None,
    }
}

/// A progress callback: `(done, total)` steps.
pub type Progress<'a> = Option<&'a mut dyn FnMut(usize, usize)>;

/// Runs the protocol over `ids` (BOS first) for dense and every backend in `methods`. The
/// first row is dense. `progress` hears of every decoded position.
pub fn perplexity(
    model: &Gemma3,
    ids: &[u32],
    prefill: usize,
    methods: &[Backend],
    mut progress: Progress<'_>,
) -> Result<Vec<PerplexityRow>> {
    if ids.len() < 3 {
        return Err(LlmError::InvalidArgument(format!(
            "{} tokens given: the protocol needs at least 3 (a dense prefill, then at least \
             one token decoded)",
            ids.len()
        )));
    }
    if prefill == 0 || prefill + 1 >= ids.len() {
        return Err(LlmError::InvalidArgument(format!(
            "prefill {prefill} must leave at least one token to decode: 1 to {} for the {} \
             tokens given",
            ids.len().saturating_sub(2),
            ids.len()
        )));
    }
    // Refused now, not when decoding reaches the end of the model's context hours later.
    if ids.len() > model.cfg.context_length {
        return Err(LlmError::InvalidArgument(format!(
            "{} tokens exceed the model's context of {}",
            ids.len(),
            model.cfg.context_length
        )));
    }
    let mut backends = vec![Backend::Dense];
    backends.extend(methods.iter().filter(|b| **b != Backend::Dense).cloned());
    // One dense prefill; every method continues a fork of it.
    let mut dense = Session::new(model, Backend::Dense)?;
    let first = dense.prefill(&ids[..prefill], PrefillOptions::default())?;
    let mut sessions = backends[1..]
        .iter()
        .map(|b| dense.fork(b.clone()))
        .collect::<Result<Vec<_>>>()?;
    sessions.insert(0, dense);
    let mut logits = vec![first; backends.len()];
    let n = backends.len();
    let steps = ids.len() - prefill;
    // Per backend, per decoded position: NLL and KL (for the paired errors).
    let mut nll = vec![Vec::with_capacity(steps); n];
    let mut kls = vec![Vec::with_capacity(steps); n];
    let mut agree = vec![0usize; n];
    for (i, &next) in ids[prefill..].iter().enumerate() {
        // `logits[b]` predicts `next` (position prefill + i).
        let dense = log_softmax(&logits[0]);
        let best = argmax(&logits[0]);
        for b in 0..n {
            let lp = if b == 0 {
                dense.clone()
            } else {
                log_softmax(&logits[b])
            };
            nll[b].push(-lp[next as usize]);
            kls[b].push(if b > 0 { kl(&dense, &lp) } else { 0.0 });
            agree[b] += usize::from(argmax(&logits[b]) == best);
        }
        if i + 1 < steps {
            for (s, l) in sessions.iter_mut().zip(&mut logits) {
                *l = s.decode(next)?;
            }
        }
        if let Some(p) = progress.as_mut() {
            p(i + 1, steps);
        }
    }
    Ok(backends
        .iter()
        .zip(&sessions)
        .enumerate()
        .map(|(b, (backend, s))| {
            let mean = nll[b].iter().sum::<f64>() / steps as f64;
            let (kl, kl_se) = mean_and_se(&kls[b]);
            let (dnll, dnll_se) = mean_and_se(&paired(&nll[b], &nll[0]));
            let oracle = oracle_of(backend)
                .and_then(|o| backends.iter().position(|x| *x == o))
                .map(|o| mean_and_se(&paired(&nll[b], &nll[o])));
            let decode = &s.profile().decode;
            PerplexityRow {
                attention: backend.name(),
                budget: budget_of(backend),
                nll: mean,
                ppl: mean.exp(),
                kl,
                kl_se,
                dnll,
                dnll_se,
                oracle_dnll: oracle.map(|o| o.0),
                oracle_dnll_se: oracle.map(|o| o.1),
                top1: agree[b] as f64 / steps as f64,
                ms_per_token: decode.total.as_secs_f64() * 1e3 / decode.tokens.max(1) as f64,
            }
        })
        .collect())
}

/// One passkey configuration's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PasskeyRow {
    /// `dense` or the selector spec.
    pub attention: String,
    /// Budget ratio (1 for dense).
    pub budget: f64,
    /// Prompt length in tokens.
    pub length: usize,
    /// Where the needle sits, as a fraction of the haystack.
    pub depth: f64,
    /// Trials run.
    pub trials: usize,
    /// Trials whose answer was the key.
    pub passed: usize,
}

/// The needle and the question (RULER / needle-in-a-haystack passkey wording).
pub fn needle(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// The question decoded after the haystack.
pub const QUESTION: &str = " What is the pass key? The pass key is";

/// Tokens of the greedy answer.
pub const ANSWER_TOKENS: usize = 8;

/// The budget of a backend, as a ratio (1 for dense).
fn budget_of(b: &Backend) -> f64 {
    match b {
        Backend::Dense => 1.0,
        Backend::Retrieval { budget, .. } => match budget {
            pqcache::Budget::Ratio(r) => *r,
            pqcache::Budget::Tokens(t) => *t as f64,
        },
    }
}

/// The prompt of one trial: BOS, `haystack` cut to fit `length` tokens with the needle of
/// `key` at `depth`; the question's tokens come apart (they are decoded, not prefilled).
fn passkey_prompt(
    model: &Gemma3,
    haystack: &[u32],
    length: usize,
    depth: f64,
    key: u32,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let tok = &model.tokenizer;
    let needle = tok.encode(&needle(key))?;
    let question = tok.encode(QUESTION)?;
    let fixed = 1 + needle.len() + question.len();
    let room = length
        .checked_sub(fixed)
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            LlmError::InvalidArgument(format!(
                "length {length} leaves no room for the haystack: the BOS, the needle and the \
             question take {fixed} tokens"
            ))
        })?;
    if room > haystack.len() {
        return Err(LlmError::InvalidArgument(format!(
            "length {length} needs {room} haystack tokens; the haystack has {}",
            haystack.len()
        )));
    }
    if !(0.0..=1.0).contains(&depth) {
        return Err(LlmError::InvalidArgument(format!(
            "depth {depth} not in [0, 1]"
        )));
    }
    let at = (depth * room as f64).round() as usize;
    let mut ids = vec![tok.bos];
    ids.extend_from_slice(&haystack[..at]);
    ids.extend_from_slice(&needle);
    ids.extend_from_slice(&haystack[at..room]);
    Ok((ids, question))
}

/// Decodes the question through `s` (a prefilled prompt), then answers greedily; whether the
/// answer's first number is `key`, and the answer's text.
fn passkey_answer(
    s: &mut Session<'_>,
    last: Vec<f32>,
    question: &[u32],
    key: u32,
) -> Result<(bool, String)> {
    let answer = s
        .continue_greedy(last, question, ANSWER_TOKENS, |_| Ok(()))?
        .ids;
    let tok = &s.model().tokenizer;
    let text = tok.decode(&answer)?;
    let digits: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Ok((digits == key.to_string(), text))
}

/// One trial: `length` tokens in all (BOS, haystack with the needle at `depth`, question); the
/// prompt up to the question is prefilled densely, the question decoded token by token
/// through `backend`, then [`ANSWER_TOKENS`] tokens generated greedily through it. Returns
/// whether the answer's first number is `key`, and the answer's text.
pub fn passkey_trial(
    model: &Gemma3,
    haystack: &[u32],
    length: usize,
    depth: f64,
    key: u32,
    backend: &Backend,
) -> Result<(bool, String)> {
    let (ids, question) = passkey_prompt(model, haystack, length, depth, key)?;
    let mut s = Session::new(model, backend.clone())?;
    let last = s.prefill(&ids, PrefillOptions::default())?;
    passkey_answer(&mut s, last, &question, key)
}

/// The seeded five-digit key of one trial: a splitmix64 step per (seed, length, depth,
/// trial), the same for every method.
fn passkey_key(seed: u64, length: usize, depth: f64, trial: usize) -> u32 {
    let mut z = seed
        ^ (length as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ depth.to_bits().rotate_left(17)
        ^ (trial as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    10_000 + (z ^ (z >> 31)) as u32 % 90_000
}

/// Most trials per (length, depth) of one passkey run: each is a dense prefill of the
/// length, seconds to minutes; a count from a typo must not run for years.
pub const MAX_PASSKEY_TRIALS: usize = 1000;

/// Every (method, length, depth) over `trials` seeded five-digit keys. `progress` hears of
/// every trial (one dense prefill, every method answering from a fork of it).
#[allow(clippy::too_many_arguments)]
pub fn passkey(
    model: &Gemma3,
    haystack: &[u32],
    lengths: &[usize],
    depths: &[f64],
    trials: usize,
    methods: &[Backend],
    seed: u64,
    mut progress: Progress<'_>,
) -> Result<Vec<PasskeyRow>> {
    // Every setting checked before the first trial, not hours into the run.
    if trials == 0 || lengths.is_empty() || depths.is_empty() {
        return Err(LlmError::InvalidArgument(
            "a passkey run needs at least one trial, length and depth".into(),
        ));
    }
    if trials > MAX_PASSKEY_TRIALS {
        return Err(LlmError::InvalidArgument(format!(
            "{trials} trials is over the limit of {MAX_PASSKEY_TRIALS} (each is a prefill)"
        )));
    }
    for &length in lengths {
        if length > model.cfg.context_length {
            return Err(LlmError::InvalidArgument(format!(
                "length {length} is over the model's context of {}",
                model.cfg.context_length
            )));
        }
        for &depth in depths {
            passkey_prompt(model, haystack, length, depth, 10_000)?;
        }
    }
    // rows[method][length][depth], filled trial by trial: one dense prefill per trial, every
    // method answers from a fork of it.
    let mut passed = vec![vec![vec![0usize; depths.len()]; lengths.len()]; methods.len()];
    let (mut done, total) = (0, lengths.len() * depths.len() * trials);
    for (li, &length) in lengths.iter().enumerate() {
        for (di, &depth) in depths.iter().enumerate() {
            for t in 0..trials {
                let key = passkey_key(seed, length, depth, t);
                let (ids, question) = passkey_prompt(model, haystack, length, depth, key)?;
                let mut prompt = Session::new(model, Backend::Dense)?;
                let last = prompt.prefill(&ids, PrefillOptions::default())?;
                for (mi, backend) in methods.iter().enumerate() {
                    let mut s = prompt.fork(backend.clone())?;
                    let ok = passkey_answer(&mut s, last.clone(), &question, key)?.0;
                    passed[mi][li][di] += usize::from(ok);
                }
                done += 1;
                if let Some(p) = progress.as_mut() {
                    p(done, total);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (mi, backend) in methods.iter().enumerate() {
        for (li, &length) in lengths.iter().enumerate() {
            for (di, &depth) in depths.iter().enumerate() {
                rows.push(PasskeyRow {
                    attention: backend.name(),
                    budget: budget_of(backend),
                    length,
                    depth,
                    trials,
                    passed: passed[mi][li][di],
                });
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_errors_come_from_batch_means_when_there_are_two_batches() {
        // Fewer than two batches: per position. Sample variance 5/3 over 4 positions.
        let (m, se) = mean_and_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((se - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-15, "{se}");
        // Two batches of 32, one all 0 and one all 1: batch means 0 and 1, so the error is
        // sqrt(0.5 / 2) = 0.5 (per position it would read 0.063).
        let x: Vec<f64> = (0..64).map(|i| f64::from(u8::from(i >= 32))).collect();
        assert_eq!(mean_and_se(&x), (0.5, 0.5));
        assert_eq!(mean_and_se(&[7.0]), (7.0, 0.0));
        assert_eq!(mean_and_se(&[]), (0.0, 0.0));
    }

    #[test]
    fn the_oracle_keeps_budget_and_attention_options() {
        let fs = Backend::parse("fastscan:64x4+notail+window=8", 0.05).unwrap();
        let want = Backend::parse("exact+notail+window=8", 0.05).unwrap();
        assert_eq!(oracle_of(&fs), Some(want.clone()));
        assert_eq!(oracle_of(&want), None);
        assert_eq!(oracle_of(&Backend::Dense), None);
        assert_ne!(oracle_of(&fs), Some(Backend::parse("exact", 0.05).unwrap()));
    }
}
