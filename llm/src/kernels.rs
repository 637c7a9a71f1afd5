//! Dense attention for the model's prefill and its sliding layers: causal softmax attention of
//! a chunk of queries over a cache, blocked as flash attention does.
//!
//! Work is split in tasks of one query head and [`ROWS`] query rows; each walks the keys it
//! may see in tiles of [`TILE`], widens the tile to f32 (the global layers' cache is f16),
//! scores it with one GEMM (`Q K^T`), keeps a running max and sum per row (online softmax)
//! and accumulates `P V` with a second GEMM. Memory per task: `ROWS x TILE` scores and two
//! `TILE x head_dim` tiles, whatever the context length.
//!
//! Layouts: queries `[head, row, dim]` (row `i` is position `start + i`); a kv head's keys and
//! values position-major, row `j` position `base + j`; the output `[row, head * dim]`, the
//! input of the output projection.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::f16;
use pqcache::attention::selector::exp_nonpositive;
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Query rows per task.
pub const ROWS: usize = 64;
/// Keys per tile.
pub const TILE: usize = 256;

/// One kv head's cached keys and values, position-major, `head_dim` wide.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    /// f32 rows (the sliding layers' window).
    F32 {
        /// Keys.
        keys: &'a [f32],
        /// Values.
        values: &'a [f32],
    },
    /// f16 rows (the global layers' cache, held by the retriever).
    F16 {
        /// Keys.
        keys: &'a [f16],
        /// Values.
        values: &'a [f16],
    },
}

impl KvRows<'_> {
    fn widen(&self, rows: std::ops::Range<usize>, d: usize, k: &mut [f32], v: &mut [f32]) {
        let span = rows.start * d..rows.end * d;
        let n = span.len();
        match self {
            KvRows::F32 { keys, values } => {
                k[..n].copy_from_slice(&keys[span.clone()]);
                v[..n].copy_from_slice(&values[span]);
            }
            KvRows::F16 { keys, values } => {
                pqcache::io::widen_f16(&keys[span.clone()], &mut k[..n]);
                pqcache::io::widen_f16(&values[span], &mut v[..n]);
            }
        }
    }
}

/// Where the keys a chunk attends to sit.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    /// Position of query row 0.
    pub start: usize,
    /// Position of cache row 0.
    pub base: usize,
    /// Keys further back than this are masked (`t - j >= window`); `None`: none are.
    pub window: Option<usize>,
    /// Logit scale.
    pub scale: f32,
}

/// `out[i][h * d..]` = softmax attention of query `h` at row `i` over the keys at positions
/// `j <= start + i` (and `start + i - j < window`). `q` is `[heads, rows, d]`, `kv[h / group]`
/// holds positions `base..` covering every key a row may see; `out` is `rows * heads * d`.
pub fn causal_attention(
    q: &[f32],
    heads: usize,
    d: usize,
    kv: &[KvRows<'_>],
    at: Causal,
    out: &mut [f32],
) {
    let rows = q.len() / (heads * d);
    let group = heads / kv.len();
    let tasks: Vec<(usize, usize)> = (0..heads)
        .flat_map(|h| (0..rows).step_by(ROWS).map(move |r| (h, r)))
        .collect();
    let task = |&(h, r0): &(usize, usize)| {
        let r1 = (r0 + ROWS).min(rows);
        let qb = &q[(h * rows + r0) * d..(h * rows + r1) * d];
        if rows == 1 {
            attend_row(qb, d, kv[h / group], at)
        } else {
            attend_block(qb, d, kv[h / group], at, r0)
        }
    };
    // One row (a decode step) is too little work to hand to other threads.
    let blocks: Vec<Vec<f32>> = if rows == 1 {
        tasks.iter().map(task).collect()
    } else {
        tasks.par_iter().map(task).collect()
    };
    for (&(h, r0), block) in tasks.iter().zip(&blocks) {
        for (i, row) in block.chunks_exact(d).enumerate() {
            let o = ((r0 + i) * heads + h) * d;
            out[o..o + d].copy_from_slice(row);
        }
    }
}

fn kernels() -> &'static DistanceKernels {
    static K: OnceLock<DistanceKernels> = OnceLock::new();
    K.get_or_init(DistanceKernels::best)
}

/// One query row (a decode step) of one head: SIMD dot products and axpys over the visible
/// keys, no GEMM set-up.
fn attend_row(q: &[f32], d: usize, kv: KvRows<'_>, at: Causal) -> Vec<f32> {
    let k = kernels();
    let t = at.start;
    let lo = at
        .window
        .map_or(0, |w| (t + 1).saturating_sub(w))
        .max(at.base);
    let rows = lo - at.base..t + 1 - at.base;
    let mut logits: Vec<f32> = match kv {
        KvRows::F32 { keys, .. } => rows
            .clone()
            .map(|j| k.dot_f32(q, &keys[j * d..(j + 1) * d]) * at.scale)
            .collect(),
        KvRows::F16 { keys, .. } => rows
            .clone()
            .map(|j| k.dot_f16(q, &keys[j * d..(j + 1) * d]) * at.scale)
            .collect(),
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for l in logits.iter_mut() {
        *l = exp_nonpositive(*l - max);
        total += *l;
    }
    let mut o = vec![0.0f32; d];
    let mut v32 = vec![0.0f32; d];
    for (j, &w) in rows.zip(&logits) {
        let v = match kv {
            KvRows::F32 { values, .. } => &values[j * d..(j + 1) * d],
            KvRows::F16 { values, .. } => {
                pqcache::io::widen_f16(&values[j * d..(j + 1) * d], &mut v32);
                &v32
            }
        };
        k.axpy(w, v, &mut o);
    }
    let inv = 1.0 / total;
    o.iter_mut().for_each(|x| *x *= inv);
    o
}

/// One task: rows `r0..r0 + qb.len() / d` of one head.
fn attend_block(qb: &[f32], d: usize, kv: KvRows<'_>, at: Causal, r0: usize) -> Vec<f32> {
    let nr = qb.len() / d;
    let first = at.start + r0;
    let last = first + nr - 1;
    let lo = at
        .window
        .map_or(0, |w| (first + 1).saturating_sub(w))
        .max(at.base);
    let hi = last + 1;
    let mut o = vec![0.0f32; nr * d];
    let mut m = vec![f32::NEG_INFINITY; nr];
    let mut l = vec![0.0f32; nr];
    let (mut kt, mut vt) = (vec![0.0f32; TILE * d], vec![0.0f32; TILE * d]);
    let mut s = vec![0.0f32; nr * TILE];
    let mut j0 = lo;
    while j0 < hi {
        let j1 = (j0 + TILE).min(hi);
        let n = j1 - j0;
        kv.widen(j0 - at.base..j1 - at.base, d, &mut kt, &mut vt);
        pqcache::linalg::gemm_abt(qb, nr, &kt[..n * d], n, d, &mut s, TILE);
        // Only tiles crossing the diagonal or the window's edge need a mask.
        let masked = j1 - 1 > first || at.window.is_some_and(|w| last - j0 >= w);
        for i in 0..nr {
            let t = first + i;
            let row = &mut s[i * TILE..i * TILE + n];
            let mut row_max = f32::NEG_INFINITY;
            if masked {
                for (jj, x) in row.iter_mut().enumerate() {
                    let j = j0 + jj;
                    let visible = j <= t && at.window.is_none_or(|w| t - j < w);
                    *x = if visible {
                        *x * at.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    row_max = row_max.max(*x);
                }
            } else {
                for x in row.iter_mut() {
                    *x *= at.scale;
                    row_max = row_max.max(*x);
                }
            }
            if row_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let new_max = m[i].max(row_max);
            let alpha = exp_nonpositive(m[i] - new_max);
            let mut sum = 0.0f32;
            for x in row.iter_mut() {
                // Masked logits are -inf: exp_nonpositive clamps them to e^-87, so zero them.
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp_nonpositive(*x - new_max)
                };
                sum += *x;
            }
            l[i] = l[i] * alpha + sum;
            m[i] = new_max;
            o[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= alpha);
        }
        // o += P V
        let p = MatRef::from_row_major_slice(&s, nr, TILE).subcols(0, n);
        let v = MatRef::from_row_major_slice(&vt[..n * d], n, d);
        let dst = MatMut::from_row_major_slice_mut(&mut o, nr, d);
        matmul(dst, Accum::Add, p, v, 1.0f32, Par::Seq);
        j0 = j1;
    }
    for (row, &li) in o.chunks_exact_mut(d).zip(&l) {
        let inv = 1.0 / li;
        row.iter_mut().for_each(|x| *x *= inv);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention in f64, the reference.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        t: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Vec<f64> {
        let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
        let logits: Vec<f64> = (lo..=t)
            .map(|j| {
                (0..d)
                    .map(|c| q[c] as f64 * k[j * d + c] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = w.iter().sum();
        (0..d)
            .map(|c| {
                (lo..=t)
                    .zip(&w)
                    .map(|(j, w)| w * v[j * d + c] as f64)
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    #[test]
    fn matches_naive_attention_with_window_and_offsets() {
        let (heads, kvh, d) = (4, 2, 8);
        let (start, rows, base) = (150, 70, 20);
        let n = start + rows - base;
        let val = |i: usize, s: u64| (((i as u64 * 2654435761 + s) % 1000) as f32 / 500.0) - 1.0;
        let q: Vec<f32> = (0..heads * rows * d).map(|i| val(i, 1)).collect();
        let k: Vec<Vec<f32>> = (0..kvh)
            .map(|h| (0..n * d).map(|i| val(i, 2 + h as u64)).collect())
            .collect();
        let v: Vec<Vec<f32>> = (0..kvh)
            .map(|h| (0..n * d).map(|i| val(i, 7 + h as u64)).collect())
            .collect();
        for window in [None, Some(64), Some(1)] {
            let at = Causal {
                start,
                base,
                window,
                scale: 0.7,
            };
            if window.is_none() && base > 0 {
                // Without a window the cache must start at 0: check on a full cache below.
            }
            let kv: Vec<KvRows> = (0..kvh)
                .map(|h| KvRows::F32 {
                    keys: &k[h],
                    values: &v[h],
                })
                .collect();
            let mut out = vec![0.0; rows * heads * d];
            let at = if window.is_none() {
                Causal {
                    base: 0,
                    start: start - base,
                    ..at
                }
            } else {
                at
            };
            causal_attention(&q, heads, d, &kv, at, &mut out);
            for h in 0..heads {
                for i in 0..rows {
                    let t = at.start + i - at.base;
                    let qi = &q[(h * rows + i) * d..(h * rows + i + 1) * d];
                    let want = naive(qi, &k[h / 2], &v[h / 2], d, t, window, 0.7);
                    let got = &out[(i * heads + h) * d..(i * heads + h + 1) * d];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "window {window:?} head {h} row {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
