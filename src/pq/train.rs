//! Codebook training: one k-means per sub-space, the sub-spaces in parallel (rayon).

use super::ProductQuantizer;
use crate::check::check_vectors;
use crate::error::{Error, Result};
use crate::kmeans::{kmeans, KMeansConfig};
use rayon::prelude::*;

impl ProductQuantizer {
    /// Trains the `m` codebooks on `x` (`n * d` row-major). Needs at least `ksub` points.
    ///
    /// Sub-space `j` is clustered with seed `cfg.seed + j`, so results do not depend on the
    /// thread count.
    pub fn train(&mut self, x: &[f32], cfg: &KMeansConfig) -> Result<()> {
        let n = check_vectors(x, self.d, "training set")?;
        let ksub = self.ksub();
        if n < ksub {
            return Err(Error::TooFewTrainingPoints { got: n, need: ksub });
        }
        let (d, dsub) = (self.d, self.dsub());
        let books: Vec<Vec<f32>> = (0..self.m)
            .into_par_iter()
            .map(|j| {
                let sub: Vec<f32> = x
                    .chunks_exact(d)
                    .flat_map(|row| row[j * dsub..(j + 1) * dsub].iter().copied())
                    .collect();
                let cfg_j = KMeansConfig {
                    seed: cfg.seed.wrapping_add(j as u64),
                    ..cfg.clone()
                };
                kmeans(&sub, dsub, ksub, &cfg_j).map(|km| km.centroids)
            })
            .collect::<Result<_>>()?;
        self.set_centroids(books.concat());
        Ok(())
    }
}
