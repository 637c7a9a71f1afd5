//! An inner-product-preserving map applied before product quantization: a per-dimension
//! scale fitted to the queries and a permutation that balances the sub-spaces.
//!
//! Keys become `x' = P S x` and queries `q' = P S^-1 q`, so `q' · x' = q · x` exactly, but the
//! quantizer trained on `x'` spends its centroids where the *scores* vary:
//!
//! * **Scale** `S = diag(s)`, `s_c` = the root mean square of the sample queries in channel
//!   `c` (floored at `1e-3` of the largest, normalised to a geometric mean of 1). The score
//!   error of a quantized key is `q · (x - x̂)`; its mean square over the queries is the
//!   residual weighted by `E[q q^T]`, whose diagonal is `s²`. Quantizing `S x` under the
//!   plain L2 loss minimises that weighted error (its diagonal part). Attention queries are
//!   far from isotropic (post-norm, post-RoPE: some channels carry 10-100x the energy of
//!   others, some none at all), so this moves the codebooks' effort to the channels that
//!   decide the scores. Without queries the scale is 1.
//! * **Permutation** `P`: the channels, by decreasing variance of `S x` on the training keys,
//!   are dealt greedily to the sub-space with the smallest sum of log-variances that still has
//!   room, so that every sub-space holds about the same product of variances (the
//!   "eigenvalue allocation" of optimized PQ, Ge et al. 2013, without the rotation). Contiguous
//!   sub-spaces of real keys otherwise mix a few high-variance channels with many flat ones.
//!
//! Memory: `perm` (`d` u32, output channel `i` reads input channel `perm[i]`) and `scale`
//! (`d` f32, indexed by input channel). Applying it costs one gather and multiply per
//! dimension.
//!
//! Measured on the Gemma-3-270M dumps (`pqcache eval-attention`, ratio 0.1, error of the
//! sparse attention output over the oracle's): see the `fastscan:MxB` vs
//! `fastscan:MxB:plain` rows in the README.

use crate::check::check_vectors;
use crate::error::{Error, Result};

/// Query channels whose root-mean-square is below this fraction of the largest are floored to
/// it: a channel no sample query used may still appear in a later query, and its keys must
/// not be scaled to nothing.
const SCALE_FLOOR: f32 = 1e-3;

/// Per-channel sums of squared queries: what [`DimTransform::fit_with_energy`] needs of the
/// queries, accumulated chunk by chunk (`d` f64 and a count, whatever the prompt's length).
#[derive(Clone, Debug, PartialEq)]
pub struct QueryEnergy {
    sum_sq: Vec<f64>,
    count: usize,
}

impl QueryEnergy {
    /// No queries yet, `d` channels.
    pub fn new(d: usize) -> QueryEnergy {
        QueryEnergy {
            sum_sq: vec![0.0; d],
            count: 0,
        }
    }

    /// Adds `queries` (`nq * d` f32, finite).
    pub fn add(&mut self, queries: &[f32]) -> Result<()> {
        let d = self.sum_sq.len();
        if queries.is_empty() {
            return Ok(());
        }
        let nq = check_vectors(queries, d, "sample queries")?;
        for q in queries.chunks_exact(d) {
            for (s, &v) in self.sum_sq.iter_mut().zip(q) {
                *s += v as f64 * v as f64;
            }
        }
        self.count += nq;
        Ok(())
    }

    /// Queries added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Per channel, the sum of the squares of the queries added.
    pub fn sum_sq(&self) -> &[f64] {
        &self.sum_sq
    }

    /// The statistics of `count` queries whose squares sum to `sum_sq` per channel (as
    /// [`QueryEnergy::sum_sq`] gave them): every sum finite and non-negative, all zero when
    /// `count` is 0.
    pub fn from_parts(sum_sq: Vec<f64>, count: usize) -> Result<QueryEnergy> {
        if let Some(bad) = sum_sq.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "a query energy of {bad}: sums of squares are finite and non-negative"
            )));
        }
        if count == 0 && sum_sq.iter().any(|&s| s != 0.0) {
            return Err(Error::InvalidArgument(
                "query energy without queries".into(),
            ));
        }
        Ok(QueryEnergy { sum_sq, count })
    }
}

/// A per-dimension scale and permutation (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct DimTransform {
    /// Output channel `i` reads input channel `perm[i]`.
    perm: Vec<u32>,
    /// Per input channel, the key multiplier (queries are divided by it).
    scale: Vec<f32>,
}

impl DimTransform {
    /// The identity on `d` dimensions.
    pub fn identity(d: usize) -> DimTransform {
        DimTransform {
            perm: (0..d as u32).collect(),
            scale: vec![1.0; d],
        }
    }

    /// Fits the transform for a quantizer of `m` sub-spaces to training `keys` (`n * d`) and,
    /// if not empty, sample `queries` (`nq * d`, the scale; without them the scale is 1).
    pub fn fit(keys: &[f32], queries: &[f32], d: usize, m: usize) -> Result<DimTransform> {
        if m == 0 || d == 0 || !d.is_multiple_of(m) {
            return Err(Error::InvalidArgument(format!(
                "m = {m} does not divide d = {d}"
            )));
        }
        check_vectors(keys, d, "training keys")?;
        let mut energy = QueryEnergy::new(d);
        energy.add(queries)?;
        DimTransform::fit_with_energy(keys, &energy, m)
    }

    /// [`DimTransform::fit`] with the queries summed up beforehand (a [`QueryEnergy`]
    /// accumulated over the chunks of a prefill); no queries: scale 1.
    pub fn fit_with_energy(keys: &[f32], energy: &QueryEnergy, m: usize) -> Result<DimTransform> {
        let d = energy.sum_sq.len();
        if m == 0 || d == 0 || !d.is_multiple_of(m) {
            return Err(Error::InvalidArgument(format!(
                "m = {m} does not divide d = {d}"
            )));
        }
        let n = check_vectors(keys, d, "training keys")?;
        if n == 0 {
            return Err(Error::TooFewTrainingPoints { got: 0, need: 1 });
        }
        let mut scale = vec![1.0f32; d];
        if energy.count > 0 {
            let nq = energy.count;
            let rms: Vec<f64> = energy
                .sum_sq
                .iter()
                .map(|s| (s / nq as f64).sqrt())
                .collect();
            let top = rms.iter().copied().fold(0.0f64, f64::max);
            if top > 0.0 {
                let floored: Vec<f64> = rms
                    .iter()
                    .map(|&r| r.max(top * SCALE_FLOOR as f64))
                    .collect();
                let log_mean = floored.iter().map(|r| r.ln()).sum::<f64>() / d as f64;
                for (s, r) in scale.iter_mut().zip(&floored) {
                    *s = (r.ln() - log_mean).exp() as f32;
                }
            }
        }
        // Variance of each scaled channel over the keys (two passes, f64).
        let mut mean = vec![0.0f64; d];
        for x in keys.chunks_exact(d) {
            for (a, &v) in mean.iter_mut().zip(x) {
                *a += v as f64;
            }
        }
        mean.iter_mut().for_each(|a| *a /= n as f64);
        let mut var = vec![0.0f64; d];
        for x in keys.chunks_exact(d) {
            for ((a, &v), mu) in var.iter_mut().zip(x).zip(&mean) {
                *a += (v as f64 - mu).powi(2);
            }
        }
        for (a, &s) in var.iter_mut().zip(&scale) {
            *a *= (s as f64).powi(2) / n as f64;
        }
        let top = var.iter().copied().fold(0.0f64, f64::max);
        let floor = if top > 0.0 { top * 1e-12 } else { 1.0 };
        let mut order: Vec<usize> = (0..d).collect();
        // Decreasing variance; ties by channel (deterministic).
        order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
        let dsub = d / m;
        let mut load = vec![0.0f64; m];
        let mut groups: Vec<Vec<u32>> = vec![Vec::with_capacity(dsub); m];
        for c in order {
            let j = (0..m)
                .filter(|&j| groups[j].len() < dsub)
                .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
                .expect("a sub-space has room: d = m * dsub channels in all");
            groups[j].push(c as u32);
            load[j] += var[c].max(floor).ln();
        }
        // Within a sub-space, channels in their input order (easier to read when debugging).
        groups.iter_mut().for_each(|g| g.sort_unstable());
        Ok(DimTransform {
            perm: groups.concat(),
            scale,
        })
    }

    /// A transform from its stored parts; `perm` must be a permutation of `0..d` and the
    /// scales finite and positive.
    pub fn from_parts(perm: Vec<u32>, scale: Vec<f32>) -> Result<DimTransform> {
        let d = perm.len();
        if scale.len() != d {
            return Err(Error::DimensionMismatch {
                expected: d,
                got: scale.len(),
            });
        }
        let mut seen = vec![false; d];
        for &p in &perm {
            match seen.get_mut(p as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "not a permutation of 0..{d}: {p} out of range or repeated"
                    )))
                }
            }
        }
        if let Some(c) = scale.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "scale of channel {c} is {} (must be finite and positive)",
                scale[c]
            )));
        }
        Ok(DimTransform { perm, scale })
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.perm.len()
    }

    /// Output channel `i` reads input channel `perm()[i]`.
    pub fn perm(&self) -> &[u32] {
        &self.perm
    }

    /// Key multiplier per input channel.
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Whether this is the identity.
    pub fn is_identity(&self) -> bool {
        self.perm.iter().enumerate().all(|(i, &p)| p as usize == i)
            && self.scale.iter().all(|&s| s == 1.0)
    }

    /// `S x` permuted, for every row of `x` (`n * d`).
    pub fn keys(&self, x: &[f32]) -> Vec<f32> {
        self.map_rows(x, |v, s| v * s)
    }

    /// `S^-1 q` permuted, for every row of `q` (`n * d`).
    pub fn queries(&self, q: &[f32]) -> Vec<f32> {
        self.map_rows(q, |v, s| v / s)
    }

    fn map_rows(&self, x: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let d = self.dim();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(d) {
            out.extend(
                self.perm
                    .iter()
                    .map(|&p| f(row[p as usize], self.scale[p as usize])),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn preserves_inner_products() {
        let d = 12;
        let keys: Vec<f32> = lcg(1, 50 * d)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % d) as f32)
            .collect();
        let queries: Vec<f32> = lcg(2, 30 * d)
            .iter()
            .enumerate()
            .map(|(i, v)| v * ((d - i % d) as f32).powi(2))
            .collect();
        let t = DimTransform::fit(&keys, &queries, d, 4).unwrap();
        assert!(!t.is_identity());
        let (tk, tq) = (t.keys(&keys), t.queries(&queries));
        for (q, q2) in queries.chunks(d).zip(tq.chunks(d)) {
            for (x, x2) in keys.chunks(d).zip(tk.chunks(d)) {
                let a: f32 = q.iter().zip(x).map(|(a, b)| a * b).sum();
                let b: f32 = q2.iter().zip(x2).map(|(a, b)| a * b).sum();
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn scale_follows_query_energy() {
        // Channel 0 carries all the query energy, channel 3 none: the first gets the largest
        // key multiplier, the last the floor (1e-3 of the largest, before normalising).
        let d = 4;
        let keys = lcg(3, 40 * d);
        let queries: Vec<f32> = (0..20)
            .flat_map(|i| [10.0 + i as f32, 1.0, 0.1, 0.0])
            .collect();
        let t = DimTransform::fit(&keys, &queries, d, 2).unwrap();
        let s = t.scale();
        assert!(s[0] > s[1] && s[1] > s[2] && s[2] > s[3], "{s:?}");
        let ratio = s[3] / s[0];
        assert!((ratio - SCALE_FLOOR).abs() < 1e-6, "{ratio}");
        let geo: f64 = s.iter().map(|&v| (v as f64).ln()).sum::<f64>();
        assert!(geo.abs() < 1e-4, "geometric mean 1, log-sum {geo}");
    }

    #[test]
    fn permutation_balances_sub_spaces() {
        // Channel variances 1e4, 1e3, 1, 1e-1 with two sub-spaces of two: a contiguous split
        // puts both large ones together; the allocation pairs the largest with the smallest.
        let d = 4;
        let keys: Vec<f32> = lcg(4, 400 * d)
            .chunks(d)
            .flat_map(|r| [r[0] * 100.0, r[1] * 31.6, r[2], r[3] * 0.316])
            .collect();
        let t = DimTransform::fit(&keys, &[], d, 2).unwrap();
        assert_eq!(t.scale(), &[1.0; 4]);
        let mut first = t.perm()[..2].to_vec();
        first.sort_unstable();
        let mut second = t.perm()[2..].to_vec();
        second.sort_unstable();
        let mut pairs = [first, second];
        pairs.sort();
        assert_eq!(pairs, [vec![0, 3], vec![1, 2]]);
    }

    #[test]
    fn rejects_bad_parts_and_shapes() {
        assert!(DimTransform::from_parts(vec![0, 0], vec![1.0, 1.0]).is_err());
        assert!(DimTransform::from_parts(vec![0, 2], vec![1.0, 1.0]).is_err());
        assert!(DimTransform::from_parts(vec![1, 0], vec![1.0, f32::NAN]).is_err());
        assert!(DimTransform::from_parts(vec![1, 0], vec![1.0, 0.0]).is_err());
        assert!(DimTransform::from_parts(vec![1, 0], vec![1.0]).is_err());
        assert!(DimTransform::from_parts(vec![1, 0], vec![2.0, 0.5]).is_ok());
        assert!(DimTransform::fit(&[1.0; 6], &[], 3, 2).is_err());
        assert!(DimTransform::fit(&[], &[], 4, 2).is_err());
        assert!(DimTransform::fit(&[1.0; 8], &[1.0; 3], 4, 2).is_err());
        assert!(DimTransform::identity(5).is_identity());
    }
}
