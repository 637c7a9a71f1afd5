//! An inner-product-preserving linear map applied before product quantization, fitted to the
//! queries the keys will be scored against.
//!
//! Keys become `x' = A x` and queries `q' = B q` with `B = A^-T`, so `q' · x' = q · x` (to
//! f32 rounding), but the quantizer trained on `x'` spends its centroids where the *scores*
//! vary. The score error of a quantized key is `q · (x - x̂)`; its mean square over the
//! queries is `e^T M e` with `M = E[q q^T]` the queries' second moment and `e` the residual.
//! Plain L2 k-means minimises `e^T e`, so the map whitens the keys by `M`:
//!
//! * **Full map** (the default when sample queries were seen and `d <=`
//!   [`FULL_MOMENT_MAX_DIM`]): `A = P V^T W`, `B = P V^T W^-1`, with `W = M^(1/2)` (from the
//!   eigendecomposition of `M`, eigenvalues floored at `1e-6` of the largest, i.e. the scale
//!   at `1e-3`, and normalised to a geometric mean of 1), `V` the eigenvectors of the
//!   covariance of the whitened training keys `W x` (a PCA rotation: optimized PQ's
//!   decorrelation, Ge et al. 2013, in closed form) and `P` the permutation that deals the
//!   rotated channels, by decreasing variance, greedily to the sub-space with the smallest
//!   sum of log-variances that still has room, so that every sub-space holds about the same
//!   product of variances (OPQ's "eigenvalue allocation"). Post-RoPE attention queries are
//!   far from isotropic and their energy is not axis-aligned (RoPE pairs channels, the q/k
//!   norms couple them), so the off-diagonal part of `M` matters: on Gemma-3-270M's keys (the
//!   Pride and Prejudice 8K dump, the last 512 positions scored after training on the rest,
//!   64 x 4-bit sub-quantizers, budget 10 %, `scripts/transform_study.py`), the oracle's
//!   attention mass the selection misses falls from 2.3 / 2.7 / 1.6 % (layers 5 / 11 / 17,
//!   diagonal map) to 1.8 / 1.6 / 1.0 %, and the recall of its top 10 % rises from 0.75 /
//!   0.74 / 0.80 to 0.77 / 0.79 / 0.84.
//! * **Diagonal map** (queries with `d >` [`FULL_MOMENT_MAX_DIM`], whose `d^2` moment is not
//!   kept, or a file of format 4 or older): `A = P S`, `B = P S^-1`, `S = diag(s)` with `s_c`
//!   the root mean square of the queries in channel `c` (floored and normalised as above), `P`
//!   the same allocation over the channels. Without queries `S = 1` and only `P` remains.
//!
//! Memory: the full map holds `A` and `B` (`2 d^2` f32, row-major: output channel `i` is row
//! `i`), the diagonal one `perm` (`d` u32, output channel `i` reads input channel `perm[i]`)
//! and `scale` (`d` f32, indexed by input channel). Applying the full map costs `d^2`
//! multiply-adds per row, in a fixed summation order (the same bits for one row or many).
//!
//! Measured end to end in the README ("What the model says").

use crate::check::check_vectors;
use crate::error::{Error, Result};
use faer::{Mat, Side};

/// Query channels whose root-mean-square is below this fraction of the largest are floored to
/// it: a channel no sample query used may still appear in a later query, and its keys must
/// not be scaled to nothing. (The full map floors the square roots of `M`'s eigenvalues the
/// same way.)
const SCALE_FLOOR: f32 = 1e-3;

/// Head dimensions up to this keep the queries' full second moment (`d^2` f64: 2 MB at 512)
/// and get the full map; wider ones keep the diagonal.
pub const FULL_MOMENT_MAX_DIM: usize = 512;

/// Sums of query outer products: what [`DimTransform::fit_with_energy`] needs of the queries,
/// accumulated chunk by chunk (a count and `d^2` f64 for `d <=` [`FULL_MOMENT_MAX_DIM`], `d`
/// otherwise, whatever the prompt's length).
#[derive(Clone, Debug, PartialEq)]
pub struct QueryEnergy {
    d: usize,
    sums: EnergySums,
    count: usize,
}

/// What a [`QueryEnergy`] keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum EnergySums {
    /// Per channel, the sum of squares (`d`).
    Diagonal(Vec<f64>),
    /// `sum q q^T`, `d * d` row-major (symmetric); empty until the first query.
    Full(Vec<f64>),
}

impl QueryEnergy {
    /// No queries yet, `d` channels (nothing allocated beyond `d` until the first query).
    pub fn new(d: usize) -> QueryEnergy {
        let sums = if d <= FULL_MOMENT_MAX_DIM {
            EnergySums::Full(Vec::new())
        } else {
            EnergySums::Diagonal(vec![0.0; d])
        };
        QueryEnergy { d, sums, count: 0 }
    }

    /// Adds `queries` (`nq * d` f32, finite).
    pub fn add(&mut self, queries: &[f32]) -> Result<()> {
        let d = self.d;
        if queries.is_empty() {
            return Ok(());
        }
        let nq = check_vectors(queries, d, "sample queries")?;
        match &mut self.sums {
            EnergySums::Diagonal(sum_sq) => {
                for q in queries.chunks_exact(d) {
                    for (s, &v) in sum_sq.iter_mut().zip(q) {
                        *s += v as f64 * v as f64;
                    }
                }
            }
            EnergySums::Full(sums) => {
                if sums.is_empty() {
                    *sums = vec![0.0; d * d];
                }
                // A decode step's few queries: rank-one updates (no d x d temporary);
                // a prefill's: `Q^T Q` in f64 through faer, a chunk of rows at a time.
                const FEW: usize = 16;
                if nq <= FEW {
                    for q in queries.chunks_exact(d) {
                        for (row, &qi) in sums.chunks_exact_mut(d).zip(q) {
                            let qi = qi as f64;
                            for (s, &qj) in row.iter_mut().zip(q) {
                                *s += qi * qj as f64;
                            }
                        }
                    }
                    self.count += nq;
                    return Ok(());
                }
                const ROWS: usize = 1024;
                for chunk in queries.chunks(ROWS * d) {
                    let rows = chunk.len() / d;
                    let q = Mat::<f64>::from_fn(rows, d, |i, j| chunk[i * d + j] as f64);
                    let outer = q.transpose() * &q;
                    for i in 0..d {
                        for j in 0..d {
                            sums[i * d + j] += outer[(i, j)];
                        }
                    }
                }
            }
        }
        self.count += nq;
        Ok(())
    }

    /// Queries added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The sums kept.
    pub fn sums(&self) -> &EnergySums {
        &self.sums
    }

    /// The `f64` words a file stores for this energy: `d^2` (the full sums, zero before the
    /// first query) for `d <=` [`FULL_MOMENT_MAX_DIM`], else the `d` sums of squares.
    pub fn stored_words(&self) -> std::borrow::Cow<'_, [f64]> {
        match &self.sums {
            EnergySums::Diagonal(s) => s.as_slice().into(),
            EnergySums::Full(s) if s.is_empty() => vec![0.0; self.d * self.d].into(),
            EnergySums::Full(s) => s.as_slice().into(),
        }
    }

    /// How many `f64` words [`QueryEnergy::stored_words`] gives for dimension `d`.
    pub fn stored_len(d: usize) -> Option<usize> {
        if d <= FULL_MOMENT_MAX_DIM {
            d.checked_mul(d)
        } else {
            Some(d)
        }
    }

    /// The statistics of `count` queries from their stored sums: `d^2` words (the full sums,
    /// as [`QueryEnergy::stored_words`] gives them, `d <=` [`FULL_MOMENT_MAX_DIM`]) or `d`
    /// (per-channel sums of squares, as files of format 4 hold them; for `d <=`
    /// [`FULL_MOMENT_MAX_DIM`] they become the diagonal of full sums). Every sum finite, the
    /// diagonal non-negative, the full sums symmetric, all zero when `count` is 0.
    pub fn from_parts(d: usize, sums: Vec<f64>, count: usize) -> Result<QueryEnergy> {
        if let Some(bad) = sums.iter().find(|s| !s.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "a query energy of {bad}: the sums are finite"
            )));
        }
        if count == 0 && sums.iter().any(|&s| s != 0.0) {
            return Err(Error::InvalidArgument(
                "query energy without queries".into(),
            ));
        }
        let full = d <= FULL_MOMENT_MAX_DIM;
        let diag: Vec<f64> = if sums.len() == d {
            sums.clone()
        } else if full && Some(sums.len()) == d.checked_mul(d) {
            (0..d).map(|i| sums[i * d + i]).collect()
        } else {
            return Err(Error::InvalidArgument(format!(
                "query energy of {} sums for dimension {d}",
                sums.len()
            )));
        };
        if let Some(bad) = diag.iter().find(|s| **s < 0.0) {
            return Err(Error::InvalidArgument(format!(
                "a query sum of squares of {bad} (must be non-negative)"
            )));
        }
        let sums = if !full {
            EnergySums::Diagonal(sums)
        } else if count == 0 {
            EnergySums::Full(Vec::new())
        } else if sums.len() == d {
            let mut m = vec![0.0; d * d];
            for (i, &v) in sums.iter().enumerate() {
                m[i * d + i] = v;
            }
            EnergySums::Full(m)
        } else {
            for i in 0..d {
                for j in 0..i {
                    if sums[i * d + j] != sums[j * d + i] {
                        return Err(Error::InvalidArgument(format!(
                            "query energy not symmetric at ({i}, {j})"
                        )));
                    }
                }
            }
            EnergySums::Full(sums)
        };
        Ok(QueryEnergy { d, sums, count })
    }
}

/// A fitted map (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct DimTransform {
    map: Map,
}

/// The two shapes of [`DimTransform`], as files store them.
#[derive(Clone, Debug, PartialEq)]
pub enum Map {
    /// `A = P S`: output channel `i` reads input channel `perm[i]` times `scale[perm[i]]`
    /// (queries: divided by it).
    Diagonal {
        /// Output channel `i` reads input channel `perm[i]`.
        perm: Vec<u32>,
        /// Per input channel, the key multiplier.
        scale: Vec<f32>,
    },
    /// `A` (keys) and `B = A^-T` (queries), `d * d` row-major each.
    Full {
        /// Dimension.
        d: usize,
        /// The key map `A`.
        keys: Vec<f32>,
        /// The query map `B`.
        queries: Vec<f32>,
    },
}

impl DimTransform {
    /// The identity on `d` dimensions.
    pub fn identity(d: usize) -> DimTransform {
        DimTransform {
            map: Map::Diagonal {
                perm: (0..d as u32).collect(),
                scale: vec![1.0; d],
            },
        }
    }

    /// Fits the transform for a quantizer of `m` sub-spaces to training `keys` (`n * d`) and,
    /// if not empty, sample `queries` (`nq * d`; without them only the permutation).
    pub fn fit(keys: &[f32], queries: &[f32], d: usize, m: usize) -> Result<DimTransform> {
        check_split(d, m)?;
        check_vectors(keys, d, "training keys")?;
        let mut energy = QueryEnergy::new(d);
        energy.add(queries)?;
        DimTransform::fit_with_energy(keys, &energy, m)
    }

    /// [`DimTransform::fit`] with the queries summed up beforehand (a [`QueryEnergy`]
    /// accumulated over the chunks of a prefill).
    pub fn fit_with_energy(keys: &[f32], energy: &QueryEnergy, m: usize) -> Result<DimTransform> {
        let d = energy.d;
        check_split(d, m)?;
        let n = check_vectors(keys, d, "training keys")?;
        if n == 0 {
            return Err(Error::TooFewTrainingPoints { got: 0, need: 1 });
        }
        match &energy.sums {
            EnergySums::Full(sums) if energy.count > 0 => Ok(fit_full(keys, sums, d, m)),
            EnergySums::Full(_) => Ok(fit_diagonal(keys, &vec![0.0; d], 0, d, m)),
            EnergySums::Diagonal(sum_sq) => Ok(fit_diagonal(keys, sum_sq, energy.count, d, m)),
        }
    }

    /// A diagonal transform from its stored parts; `perm` must be a permutation of `0..d` and
    /// the scales finite and positive.
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
        Ok(DimTransform {
            map: Map::Diagonal { perm, scale },
        })
    }

    /// A full transform from its stored maps (`d * d` row-major each, finite). That `queries`
    /// is `keys^-T` is not checked (a `d^3` product): a file that lies about it only makes its
    /// own scores wrong.
    pub fn from_matrices(d: usize, keys: Vec<f32>, queries: Vec<f32>) -> Result<DimTransform> {
        let dd = d
            .checked_mul(d)
            .ok_or(Error::InvalidArgument(format!("dimension {d} too large")))?;
        for (name, a) in [("key", &keys), ("query", &queries)] {
            if a.len() != dd {
                return Err(Error::DimensionMismatch {
                    expected: dd,
                    got: a.len(),
                });
            }
            if let Some(i) = a.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "{name} map entry ({}, {}) is {}",
                    i / d,
                    i % d,
                    a[i]
                )));
            }
        }
        if d == 0 {
            return Err(Error::InvalidArgument("dimension 0".into()));
        }
        Ok(DimTransform {
            map: Map::Full { d, keys, queries },
        })
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        match &self.map {
            Map::Diagonal { perm, .. } => perm.len(),
            Map::Full { d, .. } => *d,
        }
    }

    /// The map's stored form.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// Whether this is the identity.
    pub fn is_identity(&self) -> bool {
        match &self.map {
            Map::Diagonal { perm, scale } => {
                perm.iter().enumerate().all(|(i, &p)| p as usize == i)
                    && scale.iter().all(|&s| s == 1.0)
            }
            Map::Full { .. } => false,
        }
    }

    /// `A x` for every row of `x` (`n * d`).
    pub fn keys(&self, x: &[f32]) -> Vec<f32> {
        match &self.map {
            Map::Diagonal { perm, scale } => permute_rows(x, perm, scale, |v, s| v * s),
            Map::Full { d, keys, .. } => mat_rows(x, keys, *d),
        }
    }

    /// `B q` for every row of `q` (`n * d`).
    pub fn queries(&self, q: &[f32]) -> Vec<f32> {
        match &self.map {
            Map::Diagonal { perm, scale } => permute_rows(q, perm, scale, |v, s| v / s),
            Map::Full { d, queries, .. } => mat_rows(q, queries, *d),
        }
    }
}

fn check_split(d: usize, m: usize) -> Result<()> {
    if m == 0 || d == 0 || !d.is_multiple_of(m) {
        return Err(Error::InvalidArgument(format!(
            "m = {m} does not divide d = {d}"
        )));
    }
    Ok(())
}

fn permute_rows(x: &[f32], perm: &[u32], scale: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    let d = perm.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        out.extend(perm.iter().map(|&p| f(row[p as usize], scale[p as usize])));
    }
    out
}

/// `a x` for every row `x` of `x`, `a` `d * d` row-major; each output a 16-lane sum in a
/// fixed order (vectorises; the same bits whatever the number of rows).
fn mat_rows(x: &[f32], a: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        out.extend(a.chunks_exact(d).map(|r| lane_dot(r, row)));
    }
    out
}

fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Per channel, the mean of `keys` (`n * d`, `n > 0`), f64.
fn channel_means(keys: &[f32], d: usize) -> Vec<f64> {
    let n = keys.len() / d;
    let mut mean = vec![0.0f64; d];
    for x in keys.chunks_exact(d) {
        for (a, &v) in mean.iter_mut().zip(x) {
            *a += v as f64;
        }
    }
    mean.iter_mut().for_each(|a| *a /= n as f64);
    mean
}

/// Per channel, the variance of `keys` (`n * d`) mapped by `diag(scale)`, f64, two passes.
fn channel_variances(keys: &[f32], scale: &[f32], d: usize) -> Vec<f64> {
    let n = keys.len() / d;
    let mean = channel_means(keys, d);
    let mut var = vec![0.0f64; d];
    for x in keys.chunks_exact(d) {
        for ((a, &v), mu) in var.iter_mut().zip(x).zip(&mean) {
            *a += (v as f64 - mu).powi(2);
        }
    }
    for (a, &s) in var.iter_mut().zip(scale) {
        *a *= (s as f64).powi(2) / n as f64;
    }
    var
}

/// The eigenvalue allocation: channels by decreasing variance, each to the sub-space (of
/// `d / m`) with the smallest sum of log-variances that still has room; within a sub-space in
/// channel order. Output channel `i` reads channel `perm[i]`.
fn balance(var: &[f64], m: usize) -> Vec<u32> {
    let d = var.len();
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
        load[j] += var[c].max(floor).max(f64::MIN_POSITIVE).ln();
    }
    groups.iter_mut().for_each(|g| g.sort_unstable());
    groups.concat()
}

/// Floors `roots` (square roots of the second moment's eigenvalues or of per-channel means
/// of squares) at [`SCALE_FLOOR`] of the largest and normalises them to a geometric mean of
/// 1; all ones when every root is 0.
fn normalised_scales(roots: &[f64]) -> Vec<f64> {
    let top = roots.iter().copied().fold(0.0f64, f64::max);
    if top.is_nan() || top <= 0.0 {
        return vec![1.0; roots.len()];
    }
    let floored: Vec<f64> = roots
        .iter()
        .map(|&r| r.max(top * SCALE_FLOOR as f64))
        .collect();
    let log_mean = floored.iter().map(|r| r.ln()).sum::<f64>() / roots.len() as f64;
    floored.iter().map(|r| (r.ln() - log_mean).exp()).collect()
}

fn fit_diagonal(keys: &[f32], sum_sq: &[f64], count: usize, d: usize, m: usize) -> DimTransform {
    let scale: Vec<f32> = if count > 0 {
        let rms: Vec<f64> = sum_sq.iter().map(|s| (s / count as f64).sqrt()).collect();
        normalised_scales(&rms).iter().map(|&s| s as f32).collect()
    } else {
        vec![1.0; d]
    };
    let perm = balance(&channel_variances(keys, &scale, d), m);
    DimTransform {
        map: Map::Diagonal { perm, scale },
    }
}

/// The full map of the module doc from the queries' outer-product `sums` (`d * d`).
fn fit_full(keys: &[f32], sums: &[f64], d: usize, m: usize) -> DimTransform {
    let moment = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (sums[i * d + j] + sums[j * d + i]));
    // Eigendecomposition of a finite symmetric matrix; should faer fail (it does not for
    // finite input), fall back to the diagonal map.
    let Ok(eig) = moment.self_adjoint_eigen(Side::Lower) else {
        let diag: Vec<f64> = (0..d).map(|i| sums[i * d + i].max(0.0)).collect();
        return fit_diagonal(keys, &diag, 1, d, m);
    };
    let (u, w) = (eig.U(), eig.S());
    let roots: Vec<f64> = (0..d).map(|i| w[i].max(0.0).sqrt()).collect();
    let s = normalised_scales(&roots);
    // W = U diag(s) U^T and W^-1 = U diag(1/s) U^T.
    let w_half = Mat::<f64>::from_fn(d, d, |i, j| {
        (0..d).map(|t| u[(i, t)] * s[t] * u[(j, t)]).sum()
    });
    let w_inv = Mat::<f64>::from_fn(d, d, |i, j| {
        (0..d).map(|t| u[(i, t)] / s[t] * u[(j, t)]).sum()
    });
    // Covariance of the whitened keys, W C W with C the keys' covariance.
    let n = keys.len() / d;
    let mean = channel_means(keys, d);
    let mut cov = Mat::<f64>::zeros(d, d);
    const ROWS: usize = 1024;
    for chunk in keys.chunks(ROWS * d) {
        let rows = chunk.len() / d;
        let x = Mat::<f64>::from_fn(rows, d, |i, j| chunk[i * d + j] as f64 - mean[j]);
        cov += x.transpose() * &x;
    }
    let cov = &w_half * (cov * (1.0 / n as f64)) * &w_half;
    let cov = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (cov[(i, j)] + cov[(j, i)]));
    let (v, var): (Mat<f64>, Vec<f64>) = match cov.self_adjoint_eigen(Side::Lower) {
        Ok(e) => (
            e.U().to_owned(),
            (0..d).map(|i| e.S()[i].max(0.0)).collect(),
        ),
        Err(_) => (
            Mat::<f64>::identity(d, d),
            (0..d).map(|i| cov[(i, i)].max(0.0)).collect(),
        ),
    };
    let perm = balance(&var, m);
    // Rows of V^T W and V^T W^-1, in the allocation's order.
    let vt = v.transpose();
    let a = vt * &w_half;
    let b = vt * &w_inv;
    let mut keys_map = Vec::with_capacity(d * d);
    let mut queries_map = Vec::with_capacity(d * d);
    for &p in &perm {
        keys_map.extend((0..d).map(|j| a[(p as usize, j)] as f32));
        queries_map.extend((0..d).map(|j| b[(p as usize, j)] as f32));
    }
    DimTransform {
        map: Map::Full {
            d,
            keys: keys_map,
            queries: queries_map,
        },
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
        let mut energy = QueryEnergy::new(d);
        energy.add(&queries).unwrap();
        let EnergySums::Full(sums) = energy.sums() else {
            panic!("d = 12 keeps the full moment")
        };
        let diag: Vec<f64> = (0..d).map(|i| sums[i * d + i]).collect();
        let full = DimTransform::fit(&keys, &queries, d, 4).unwrap();
        assert!(matches!(full.map(), Map::Full { .. }));
        let diagonal = fit_diagonal(&keys, &diag, 30, d, 4);
        for t in [full, diagonal] {
            assert!(!t.is_identity());
            let (tk, tq) = (t.keys(&keys), t.queries(&queries));
            for (q, q2) in queries.chunks(d).zip(tq.chunks(d)) {
                for (x, x2) in keys.chunks(d).zip(tk.chunks(d)) {
                    let a: f32 = q.iter().zip(x).map(|(a, b)| a * b).sum();
                    let b: f32 = q2.iter().zip(x2).map(|(a, b)| a * b).sum();
                    let size: f32 = q.iter().map(|v| v * v).sum::<f32>().sqrt()
                        * x.iter().map(|v| v * v).sum::<f32>().sqrt();
                    assert!((a - b).abs() <= 1e-5 * (1.0 + size), "{a} vs {b}");
                }
            }
        }
    }

    /// Queries with correlated channels (a random mixing of independent ones): the full map
    /// makes their second moment a multiple of the identity (what the diagonal scale cannot
    /// do for correlated channels) and the mapped keys' covariance diagonal; mapping one row
    /// at a time gives the same bits as all at once.
    #[test]
    fn full_map_whitens_queries_and_decorrelates_keys() {
        let d = 8;
        let mix = lcg(5, d * d);
        let mixed = |raw: &[f32], gain: f32| -> Vec<f32> {
            raw.chunks(d)
                .flat_map(|r| {
                    (0..d)
                        .map(|i| {
                            (0..d)
                                .map(|j| mix[i * d + j] * r[j] * (1.0 + j as f32 * gain))
                                .sum()
                        })
                        .collect::<Vec<f32>>()
                })
                .collect()
        };
        let queries = mixed(&lcg(6, 400 * d), 2.0);
        let keys = mixed(&lcg(7, 500 * d), 0.5);
        let t = DimTransform::fit(&keys, &queries, d, 2).unwrap();
        let (tq, tk) = (t.queries(&queries), t.keys(&keys));
        let second = |x: &[f32], i: usize, j: usize, centred: bool| -> f64 {
            let n = (x.len() / d) as f64;
            let mean = |c: usize| {
                if centred {
                    x.chunks(d).map(|r| r[c] as f64).sum::<f64>() / n
                } else {
                    0.0
                }
            };
            let (mi, mj) = (mean(i), mean(j));
            x.chunks(d)
                .map(|r| (r[i] as f64 - mi) * (r[j] as f64 - mj))
                .sum::<f64>()
                / n
        };
        let c = second(&tq, 0, 0, false);
        for i in 0..d {
            for j in 0..d {
                let want = if i == j { c } else { 0.0 };
                let got = second(&tq, i, j, false);
                assert!(
                    (got - want).abs() < 1e-3 * c,
                    "queries ({i}, {j}): {got} vs {want}"
                );
                if i != j {
                    let cov = second(&tk, i, j, true);
                    let scale = (second(&tk, i, i, true) * second(&tk, j, j, true)).sqrt();
                    assert!(
                        cov.abs() < 1e-3 * scale,
                        "keys ({i}, {j}): {cov} of {scale}"
                    );
                }
            }
        }
        let one_by_one: Vec<f32> = keys.chunks(d).flat_map(|r| t.keys(r)).collect();
        assert_eq!(one_by_one, tk);
    }

    #[test]
    fn energy_parts_round_trip_and_old_files_read_as_the_diagonal() {
        let d = 3;
        let q = [1.0f32, 2.0, 0.0, -1.0, 0.5, 3.0];
        let mut e = QueryEnergy::new(d);
        assert_eq!(e.stored_words().len(), d * d);
        e.add(&q).unwrap();
        let words = e.stored_words().to_vec();
        // (0, 1): 1 * 2 + -1 * 0.5.
        assert_eq!(words[1], 1.5);
        assert_eq!(QueryEnergy::from_parts(d, words.clone(), 2).unwrap(), e);
        // A format-4 file's sums of squares: the diagonal of the full sums.
        let old = QueryEnergy::from_parts(d, vec![2.0, 4.25, 9.0], 2).unwrap();
        let EnergySums::Full(m) = old.sums() else {
            panic!("full below 512")
        };
        assert_eq!(m, &vec![2.0, 0.0, 0.0, 0.0, 4.25, 0.0, 0.0, 0.0, 9.0]);
        let mut asym = words.clone();
        asym[1] += 1.0;
        assert!(QueryEnergy::from_parts(d, asym, 2).is_err());
        assert!(QueryEnergy::from_parts(d, words.clone(), 0).is_err());
        assert!(QueryEnergy::from_parts(d, vec![1.0; 4], 2).is_err());
        assert!(QueryEnergy::from_parts(d, vec![-1.0, 0.0, 0.0], 2).is_err());
        let mut nan = words;
        nan[4] = f64::NAN;
        assert!(QueryEnergy::from_parts(d, nan, 2).is_err());
        // Wide heads keep the diagonal.
        let wide = QueryEnergy::new(FULL_MOMENT_MAX_DIM + 1);
        assert!(
            matches!(wide.sums(), EnergySums::Diagonal(s) if s.len() == FULL_MOMENT_MAX_DIM + 1)
        );
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
        let sum_sq: Vec<f64> = (0..d)
            .map(|c| queries.chunks(d).map(|q| (q[c] as f64).powi(2)).sum())
            .collect();
        let t = fit_diagonal(&keys, &sum_sq, 20, d, 2);
        let Map::Diagonal { scale: s, .. } = t.map() else {
            panic!("a diagonal map")
        };
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
        let Map::Diagonal { perm, scale } = t.map() else {
            panic!("no queries: a diagonal map")
        };
        assert_eq!(scale, &[1.0; 4]);
        let mut first = perm[..2].to_vec();
        first.sort_unstable();
        let mut second = perm[2..].to_vec();
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
        assert!(DimTransform::from_matrices(2, vec![1.0; 4], vec![1.0; 4]).is_ok());
        assert!(DimTransform::from_matrices(2, vec![1.0; 4], vec![1.0; 3]).is_err());
        assert!(DimTransform::from_matrices(2, vec![f32::INFINITY; 4], vec![1.0; 4]).is_err());
        assert!(DimTransform::from_matrices(0, vec![], vec![]).is_err());
        assert!(DimTransform::from_matrices(usize::MAX, vec![], vec![]).is_err());
    }
}
