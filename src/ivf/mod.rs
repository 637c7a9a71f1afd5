//! The IVF layer: a coarse quantizer that splits the vectors into `nlist` inverted lists.
//!
//! Vocabulary (FAISS's): `nlist` coarse centroids, each owning one inverted list; a query
//! visits (probes) the `nprobe` lists whose centroids score best; `by_residual` encodes
//! `x - centroid(list)` instead of `x`, which spends the codes on what the centroid does not
//! already say.
//!
//! Assignment maximises a score: the inner product `q . c` for [`Metric::InnerProduct`]
//! (FAISS's `IndexFlatIP` quantizer), and `2 q . c - ||c||²` for [`Metric::L2`] (the same
//! ranking as the negated distance, without `||q||²`). Batches go through one GEMM per 1,024
//! rows; single queries through the SIMD dot kernel. Memory: `nlist * d` f32 centroids and
//! their `nlist` squared norms.

use crate::check::check_vectors;
use crate::error::{Error, Result};
use crate::kmeans::{kmeans, KMeansConfig};
use crate::linalg::{gemm_abt, row_norms_sq};
use crate::metric::Metric;
use crate::select::{select_topk, select_topk_into, SelectScratch};
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;

/// Rows assigned per GEMM.
const ASSIGN_CHUNK: usize = 1024;

/// `nlist` coarse centroids and the rule that assigns a vector to one of them.
#[derive(Clone, Debug, PartialEq)]
pub struct CoarseQuantizer {
    d: usize,
    nlist: usize,
    metric: Metric,
    /// `nlist * d`, row-major; empty until trained.
    centroids: Vec<f32>,
    /// `nlist` squared norms of the centroids.
    norms: Vec<f32>,
}

impl CoarseQuantizer {
    /// An untrained quantizer of `nlist` lists over `d` dimensions.
    pub fn new(d: usize, nlist: usize, metric: Metric) -> Result<CoarseQuantizer> {
        if d == 0 || nlist == 0 {
            return Err(Error::InvalidArgument(format!(
                "an IVF needs d > 0 and nlist > 0 (got d = {d}, nlist = {nlist})"
            )));
        }
        if nlist > crate::limits::MAX_NLIST {
            return Err(Error::InvalidArgument(format!(
                "nlist {nlist} is too large (at most {})",
                crate::limits::MAX_NLIST
            )));
        }
        crate::limits::check_dim(d)?;
        Ok(CoarseQuantizer {
            d,
            nlist,
            metric,
            centroids: Vec::new(),
            norms: Vec::new(),
        })
    }

    /// A trained quantizer from `nlist * d` centroids (e.g. read from a file).
    pub fn from_centroids(
        d: usize,
        nlist: usize,
        metric: Metric,
        centroids: Vec<f32>,
    ) -> Result<CoarseQuantizer> {
        let mut q = CoarseQuantizer::new(d, nlist, metric)?;
        if centroids.len() != nlist * d {
            return Err(Error::DimensionMismatch {
                expected: nlist * d,
                got: centroids.len(),
            });
        }
        check_vectors(&centroids, d, "coarse centroids")?;
        q.norms = row_norms_sq(&centroids, d);
        q.centroids = centroids;
        Ok(q)
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.d
    }
    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.nlist
    }
    /// Whether the centroids exist.
    pub fn is_trained(&self) -> bool {
        !self.centroids.is_empty()
    }
    /// `nlist * d` centroids, row-major.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Centroid of list `l`.
    pub fn centroid(&self, l: usize) -> &[f32] {
        &self.centroids[l * self.d..(l + 1) * self.d]
    }

    /// Trains the centroids by k-means on `x` (`n * d`, validated by the caller).
    pub fn train(&mut self, x: &[f32], cfg: &KMeansConfig) -> Result<()> {
        let km = kmeans(x, self.d, self.nlist, cfg)?;
        self.norms = row_norms_sq(&km.centroids, self.d);
        self.centroids = km.centroids;
        Ok(())
    }

    /// Turns a row of `q . c_l` (one per list) into coarse scores in place: unchanged for
    /// inner product, `2 q . c_l - ||c_l||²` for L2 (the metric matched once, the loop
    /// vectorised; per element a match and a bounds-checked norm were 7 % of a batch search).
    fn adjust_row(&self, row: &mut [f32]) {
        if self.metric == Metric::L2 {
            for (v, &norm) in row.iter_mut().zip(&self.norms) {
                *v = 2.0 * *v - norm;
            }
        }
    }

    /// The list of each row of `x` (`n * d`, finite): one GEMM per chunk, ties to the
    /// smaller list. The quantizer must be trained.
    pub fn assign(&self, x: &[f32]) -> Vec<u32> {
        let (d, nlist) = (self.d, self.nlist);
        let n = x.len() / d;
        let mut labels = vec![0u32; n];
        labels
            .par_chunks_mut(ASSIGN_CHUNK)
            .zip(x.par_chunks(ASSIGN_CHUNK * d))
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (lab, rows)| {
                let r = lab.len();
                scores.resize(r * nlist, 0.0);
                gemm_abt(rows, r, &self.centroids, nlist, d, scores, nlist);
                for (out, row) in lab.iter_mut().zip(scores.chunks_mut(nlist)) {
                    self.adjust_row(row);
                    let mut best = (f32::NEG_INFINITY, 0u32);
                    for (l, &s) in row.iter().enumerate() {
                        if s > best.0 {
                            best = (s, l as u32);
                        }
                    }
                    *out = best.1;
                }
            });
        labels
    }

    /// The `nprobe` best lists of each row of `rows` (`nq * d`), best first, with their coarse
    /// scores: one GEMM for all of them, on the calling thread (the IVF batch search runs one
    /// per task). Row `i`'s probes are `[i * np, (i + 1) * np)` of the result, `np =
    /// nprobe.clamp(1, nlist)` (one allocation a batch: a `Vec` a row was a tenth of a
    /// bigann-10k batch at nprobe 4, with the selection's own).
    pub fn probe_rows(&self, rows: &[f32], nprobe: usize) -> Vec<(f32, u32)> {
        let (d, nlist) = (self.d, self.nlist);
        let np = nprobe.clamp(1, nlist);
        let r = rows.len() / d.max(1);
        let mut scores = vec![0.0f32; r * nlist];
        gemm_abt(rows, r, &self.centroids, nlist, d, &mut scores, nlist);
        let mut probes = Vec::with_capacity(r * np);
        let mut scratch = SelectScratch::default();
        for row in scores.chunks_mut(nlist) {
            self.adjust_row(row);
            select_topk_into(row, np, &mut scratch, &mut probes);
        }
        probes
    }

    /// The `nprobe` best lists for one query (`d` floats), best first, with their coarse
    /// scores (`q . c` for inner product, `2 q . c - ||c||²` for L2).
    pub fn probe(&self, kernels: &DistanceKernels, q: &[f32], nprobe: usize) -> Vec<(f32, u32)> {
        let mut scores: Vec<f32> = (0..self.nlist)
            .map(|l| kernels.dot_f32(q, self.centroid(l)))
            .collect();
        self.adjust_row(&mut scores);
        select_topk(&scores, nprobe.clamp(1, self.nlist))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_and_probe_agree_with_brute_force() {
        let d = 8;
        let centroids: Vec<f32> = (0..5 * d).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let x: Vec<f32> = (0..300 * d).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        for metric in [Metric::L2, Metric::InnerProduct] {
            let q = CoarseQuantizer::from_centroids(d, 5, metric, centroids.clone()).unwrap();
            let labels = q.assign(&x);
            let k = DistanceKernels::best();
            for (i, row) in x.chunks(d).enumerate() {
                let want = (0..5)
                    .map(|l| {
                        let c = &centroids[l * d..(l + 1) * d];
                        let s = match metric {
                            Metric::L2 => {
                                -row.iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
                            }
                            Metric::InnerProduct => row.iter().zip(c).map(|(a, b)| a * b).sum(),
                        };
                        (s, l)
                    })
                    .fold((f32::NEG_INFINITY, 0), |b, s| if s.0 > b.0 { s } else { b });
                assert_eq!(labels[i] as usize, want.1, "{metric:?} row {i}");
                assert_eq!(q.probe(&k, row, 1)[0].1 as usize, want.1);
            }
            // The batch form (one GEMM) picks the same best list for every row.
            let batch = q.probe_rows(&x, 1);
            assert_eq!(batch.len(), 300);
            for (i, p) in batch.chunks(1).enumerate() {
                assert_eq!(p[0].1, labels[i], "{metric:?} row {i}");
            }
            assert_eq!(q.probe(&k, &x[..d], 99).len(), 5);
        }
    }
}
