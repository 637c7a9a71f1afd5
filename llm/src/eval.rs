//! What the model says under sparse attention: teacher-forced perplexity, KL to full attention
//! and top-1 agreement, per attention backend and budget.
//!
//! Protocol: the first `prefill` tokens are one dense prefill (the retrieval backends train
//! their indexes on it, as a serving stack would); every later token is decoded one at a time,
//! teacher-forced (the true token is the next input), by every backend in lockstep, so the
//! next-token distributions compare position by position without storing them. Per backend:
//! mean NLL of `tokens[prefill..]`, perplexity, mean `KL(dense || backend)`, the share of
//! positions whose argmax equals dense's, and decode milliseconds per token.

use crate::error::{LlmError, Result};
use crate::model::{argmax, Backend, Gemma3, PrefillOptions, Session};

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
    /// Share of positions whose most likely token is dense's.
    pub top1: f64,
    /// Decode wall time per token.
    pub ms_per_token: f64,
}

/// `log softmax` of `logits`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
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

/// Runs the protocol over `ids` (BOS first) for dense and every backend in `methods`. The
/// first row is dense.
pub fn perplexity(
    model: &Gemma3,
    ids: &[u32],
    prefill: usize,
    methods: &[Backend],
) -> Result<Vec<PerplexityRow>> {
    if prefill == 0 || prefill + 1 >= ids.len() {
        return Err(LlmError::InvalidArgument(format!(
            "prefill {prefill} must be in 1..{} (tokens - 1)",
            ids.len().saturating_sub(1)
        )));
    }
    let mut backends = vec![Backend::Dense];
    backends.extend(methods.iter().filter(|b| **b != Backend::Dense).cloned());
    let mut sessions = backends
        .iter()
        .map(|b| Session::new(model, b.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut logits = sessions
        .iter_mut()
        .map(|s| s.prefill(&ids[..prefill], PrefillOptions::default()))
        .collect::<Result<Vec<_>>>()?;
    let n = backends.len();
    let (mut nll, mut kls, mut agree) = (vec![0.0; n], vec![0.0; n], vec![0usize; n]);
    let steps = ids.len() - prefill;
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
            nll[b] -= lp[next as usize];
            if b > 0 {
                kls[b] += kl(&dense, &lp);
            }
            agree[b] += usize::from(argmax(&logits[b]) == best);
        }
        if i + 1 < steps {
            for (s, l) in sessions.iter_mut().zip(&mut logits) {
                *l = s.decode(next)?;
            }
        }
    }
    Ok(backends
        .iter()
        .zip(&sessions)
        .enumerate()
        .map(|(b, (backend, s))| {
            let mean = nll[b] / steps as f64;
            let decode = &s.profile().decode;
            PerplexityRow {
                attention: backend.name(),
                budget: match backend {
                    Backend::Dense => 1.0,
                    Backend::Retrieval { budget, .. } => match budget {
                        pqcache::Budget::Ratio(r) => *r,
                        pqcache::Budget::Tokens(t) => *t as f64,
                    },
                },
                nll: mean,
                ppl: mean.exp(),
                kl: kls[b] / steps as f64,
                top1: agree[b] as f64 / steps as f64,
                ms_per_token: decode.total.as_secs_f64() * 1e3 / decode.tokens.max(1) as f64,
            }
        })
        .collect())
}
