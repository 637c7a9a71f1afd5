//! Streaming upkeep of [`IndexIVFPQFastScan`]: tombstones and compaction, the drift
//! statistics, and the re-trained copy ([`IndexIVFPQFastScan::refreshed`]).

use super::IndexIVFPQFastScan;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::ivf::CoarseQuantizer;
use crate::pq::{Nbits, ProductQuantizer};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;
use std::collections::HashSet;

/// A list is compacted when this fraction of it (or more) is tombstones.
const COMPACT_DEAD_FRACTION: f64 = 0.5;

/// Quantization-error statistics behind [`IndexIVFPQFastScan::drift`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DriftStats {
    /// Mean squared reconstruction error of the training sample, per vector.
    pub train_mse: f64,
    /// Sum of the squared reconstruction errors of the vectors added since training.
    pub added_sq_err: f64,
    /// Vectors added since training.
    pub added: usize,
}

impl DriftStats {
    /// Mean error of the vectors added since training, relative to the training error:
    /// about 1 while the data looks like the training data, larger as it drifts away.
    /// `None` before any vector was added.
    pub fn ratio(&self) -> Option<f64> {
        (self.added > 0 && self.train_mse > 0.0)
            .then(|| self.added_sq_err / self.added as f64 / self.train_mse)
    }
}

impl IndexIVFPQFastScan {
    /// Sum of squared reconstruction errors of `enc` (the encoded vectors) given `codes`.
    pub(super) fn reconstruction_error(&self, enc: &[f32], codes: &[u8]) -> f64 {
        let (d, m) = (self.pq.dim(), self.pq.m());
        enc.par_chunks(d * super::ENCODE_ROWS)
            .zip(codes.par_chunks(m * super::ENCODE_ROWS))
            .map(|(rows, codes)| self.sq_error_rows(rows, codes))
            .sum()
    }

    /// [`Self::reconstruction_error`] of a few rows, on this thread.
    pub(super) fn sq_error_rows(&self, enc: &[f32], codes: &[u8]) -> f64 {
        let (d, m) = (self.pq.dim(), self.pq.m());
        let dsub = self.pq.dsub();
        let mut e = 0.0f64;
        for (row, code) in enc.chunks(d).zip(codes.chunks(m)) {
            for (j, &c) in code.iter().enumerate() {
                let cent = self.pq.centroid(j, c as usize);
                for (a, b) in row[j * dsub..(j + 1) * dsub].iter().zip(cent) {
                    e += ((a - b) * (a - b)) as f64;
                }
            }
        }
        e
    }

    /// Removes every vector whose id is in `ids`; returns how many were removed. Tombstones
    /// are skipped by searches at once; a list is repacked once half of it is dead. `O(n)`.
    pub fn remove_ids(&mut self, ids: &[i64]) -> usize {
        let set: HashSet<i64> = ids.iter().copied().filter(|&i| i >= 0).collect();
        if set.is_empty() {
            return 0;
        }
        let d = self.pq.dim();
        let removed: usize = self
            .lists
            .par_iter_mut()
            .map(|list| {
                let mut r = 0;
                if !list.ids.iter().any(|id| *id >= 0 && set.contains(id)) {
                    return 0;
                }
                // Copies a mapped id array (copy on write) only for a list that changes.
                for id in list.ids.to_mut().iter_mut() {
                    if *id >= 0 && set.contains(id) {
                        *id = -1;
                        r += 1;
                    }
                }
                list.dead += r;
                if list.dead as f64 >= COMPACT_DEAD_FRACTION * list.len() as f64 {
                    // Cannot fail: the list's m was accepted when it was created.
                    list.compact(d).expect("compacting a valid list");
                }
                r
            })
            .sum();
        self.ntotal -= removed;
        removed
    }

    /// Drops every tombstone now.
    pub fn compact(&mut self) -> Result<()> {
        let d = self.pq.dim();
        self.lists.par_iter_mut().try_for_each(|l| l.compact(d))
    }

    /// A copy re-trained on a sample of the live vectors that favours recent ones (half of
    /// the sample from vectors added since the last training, when there are that many), with
    /// every live vector re-encoded under the new codebooks and coarse centroids. Ids are
    /// kept. Needs the originals. `self` is untouched: the caller swaps the copy in.
    pub fn refreshed(&self) -> Result<IndexIVFPQFastScan> {
        if self.keep.is_none() {
            return Err(Error::InvalidArgument(
                "refresh needs the original vectors: call keep_originals before add".into(),
            ));
        }
        let d = self.pq.dim();
        let (all, all_ids, fresh) = self.live_vectors();
        let n = all_ids.len();
        if n < self.coarse.nlist() {
            return Err(Error::TooFewTrainingPoints {
                got: n,
                need: self.coarse.nlist(),
            });
        }
        let mut rng = StdRng::seed_from_u64(self.train_config.seed ^ n as u64);
        let want = self.refresh_sample.max(self.coarse.nlist()).min(n);
        let fresh_take = fresh.len().min(want / 2);
        let mut rows: Vec<usize> = sample(&mut rng, fresh.len(), fresh_take)
            .into_iter()
            .map(|i| fresh[i])
            .collect();
        let picked: HashSet<usize> = rows.iter().copied().collect();
        let rest: Vec<usize> = (0..n).filter(|i| !picked.contains(i)).collect();
        let rest_take = (want - fresh_take).min(rest.len());
        rows.extend(
            sample(&mut rng, rest.len(), rest_take)
                .into_iter()
                .map(|i| rest[i]),
        );
        rows.sort_unstable();
        let train: Vec<f32> = rows
            .iter()
            .flat_map(|&r| all[r * d..(r + 1) * d].iter().copied())
            .collect();
        let mut fresh_index = IndexIVFPQFastScan::with_quantizers(
            CoarseQuantizer::new(d, self.coarse.nlist(), self.metric)?,
            ProductQuantizer::new(d, self.pq.m(), Nbits::Four)?,
            self.metric,
            self.by_residual,
        )?;
        fresh_index.train_config = self.train_config.clone();
        fresh_index.coarse_niter = self.coarse_niter;
        fresh_index.refresh_sample = self.refresh_sample;
        fresh_index.parallel_min_code_bytes = self.parallel_min_code_bytes;
        fresh_index.precomputed_max_bytes = self.precomputed_max_bytes;
        fresh_index.nprobe = self.nprobe;
        fresh_index.rerank_factor = self.rerank_factor;
        fresh_index.pool = self.pool.clone();
        fresh_index.scan = self.scan;
        fresh_index.keep_originals(self.keep.expect("checked above"))?;
        fresh_index.train(&train)?;
        fresh_index.add_with_ids(&all, &all_ids)?;
        fresh_index.mark_trained_here();
        fresh_index.next_id = fresh_index.next_id.max(self.next_id);
        Ok(fresh_index)
    }

    /// Every live vector (from the originals, row-major), its id, and the rows that were
    /// added since the last training.
    fn live_vectors(&self) -> (Vec<f32>, Vec<i64>, Vec<usize>) {
        let d = self.pq.dim();
        let mut x = Vec::with_capacity(self.ntotal * d);
        let mut ids = Vec::with_capacity(self.ntotal);
        let mut fresh = Vec::new();
        let mut row = vec![0.0f32; d];
        for list in &self.lists {
            let Some(orig) = &list.originals else {
                continue;
            };
            for (i, &id) in list.ids.iter().enumerate() {
                if id < 0 {
                    continue;
                }
                orig.row_into(i, &mut row);
                if i >= list.fresh_from {
                    fresh.push(ids.len());
                }
                x.extend_from_slice(&row);
                ids.push(id);
            }
        }
        (x, ids, fresh)
    }

    /// Marks the present vectors as seen at training: the drift counters restart.
    pub(super) fn mark_trained_here(&mut self) {
        for l in &mut self.lists {
            l.fresh_from = l.len();
        }
        self.drift.added = 0;
        self.drift.added_sq_err = 0.0;
    }
}
