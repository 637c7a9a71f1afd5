//! Exact (brute-force) search over f32 or f16 vectors.
//!
//! * **Few queries** (`nq < GEMM_MIN_QUERIES`): each query is scored against every row with the
//!   SIMD dot / L2 row loops of `pqcache-simd` (f16 rows are widened in registers; from memory
//!   the rows are read as four interleaved streams), the rows split across the rayon pool,
//!   then top-k selection.
//! * **Batches**: queries are taken `QUERY_GROUP` (256) at a time (fewer when that leaves a
//!   thread without a group), and the rows `ROW_BLOCK` (1,024) at a time: one faer GEMM
//!   (`Q · Xᵀ`; f16 blocks are widened first) scores the group against the block into a small
//!   matrix (1 MB, cache-resident), which each query's top-k consumes at once (FAISS's blocked
//!   `exhaustive_inner_product_blas`). For L2, `||q - x||² = ||q||² + ||x||² - 2 q·x`, with
//!   the row norms kept from `add`, clamped at 0. The group amortises reading each block
//!   (256 queries per row read); the small matrix keeps the GEMM's output in cache where a
//!   group's whole score matrix (64 queries x every row, 16 MB) went to memory and back:
//!   `pqcache eval --index flat --qbs 1000` over 65,536 x 128 went from 253 to 188 us per
//!   query (inner product) and from 286 to 215 (L2) on one thread.
//!
//! Selection never sorts all `n` scores: see the crate's `select` module. Memory: `n * d` values
//! (4 or 2 bytes each) and, for L2, `n` f32 squared norms.

use super::{check_k, check_vectors, write_best, write_row, Index};
use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::linalg::gemm_abt;
use crate::metric::Metric;
use crate::result::SearchResult;
use crate::select::{from_f32_key, TopK};
use half::f16;
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;

/// From this many queries on, a batch goes through GEMM.
const GEMM_MIN_QUERIES: usize = 8;
/// Rows scored per task on the single-query path.
const ROW_CHUNK: usize = 8192;
/// Queries scored together on the batch path (at most).
const QUERY_GROUP: usize = 256;
/// Rows per GEMM on the batch path: the group's block of scores is `256 * 1024` f32 (1 MB).
const ROW_BLOCK: usize = 1024;

/// Stored vectors.
#[derive(Clone, Debug, PartialEq)]
pub enum FlatStorage {
    /// Single precision.
    F32(Buf<f32>),
    /// Half precision (the KV-cache case): half the memory, widened on the fly.
    F16(Buf<f16>),
}

impl FlatStorage {
    /// Number of stored values (rows times dimension).
    pub fn len(&self) -> usize {
        match self {
            FlatStorage::F32(v) => v.len(),
            FlatStorage::F16(v) => v.len(),
        }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that `x` (rows of `d`) can be stored: f16 storage holds `|v| <= 65504` only.
    pub fn check(&self, x: &[f32], d: usize) -> Result<()> {
        match self {
            FlatStorage::F32(_) => Ok(()),
            FlatStorage::F16(_) => super::check_f16_range(x, d, "vectors"),
        }
    }

    /// Appends validated f32 rows (rounded to f16 in f16 storage; see [`FlatStorage::check`]).
    pub fn extend(&mut self, x: &[f32]) {
        match self {
            FlatStorage::F32(v) => v.to_mut().extend_from_slice(x),
            FlatStorage::F16(v) => v.to_mut().extend(x.iter().map(|&f| f16::from_f32(f))),
        }
    }

    /// Removes every row.
    pub fn clear(&mut self) {
        match self {
            FlatStorage::F32(v) => *v = Buf::new(),
            FlatStorage::F16(v) => *v = Buf::new(),
        }
    }

    /// Empty storage of the same precision.
    pub fn empty_like(&self) -> FlatStorage {
        match self {
            FlatStorage::F32(_) => FlatStorage::F32(Buf::new()),
            FlatStorage::F16(_) => FlatStorage::F16(Buf::new()),
        }
    }

    /// Appends row `i` (`d` wide) of `src`, which has the same precision.
    pub fn push_row_from(&mut self, src: &FlatStorage, i: usize, d: usize) {
        match (self, src) {
            (FlatStorage::F32(dst), FlatStorage::F32(s)) => {
                dst.to_mut().extend_from_slice(&s[i * d..(i + 1) * d])
            }
            (FlatStorage::F16(dst), FlatStorage::F16(s)) => {
                dst.to_mut().extend_from_slice(&s[i * d..(i + 1) * d])
            }
            (dst, src) => {
                let mut row = vec![0.0f32; d];
                src.row_into(i, &mut row);
                dst.extend(&row);
            }
        }
    }

    /// Row `i` widened to f32 into `out` (`d = out.len()` wide).
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let d = out.len();
        match self {
            FlatStorage::F32(v) => out.copy_from_slice(&v[i * d..(i + 1) * d]),
            FlatStorage::F16(v) => {
                for (o, h) in out.iter_mut().zip(&v[i * d..(i + 1) * d]) {
                    *o = h.to_f32();
                }
            }
        }
    }

    /// The metric value (dot or squared L2) of `q` against row `i` (`q.len()` wide).
    #[inline]
    pub fn metric_value(
        &self,
        kernels: &DistanceKernels,
        metric: Metric,
        q: &[f32],
        i: usize,
    ) -> f32 {
        let d = q.len();
        match (self, metric) {
            (FlatStorage::F32(v), Metric::InnerProduct) => {
                kernels.dot_f32(q, &v[i * d..(i + 1) * d])
            }
            (FlatStorage::F32(v), Metric::L2) => kernels.l2sq_f32(q, &v[i * d..(i + 1) * d]),
            (FlatStorage::F16(v), Metric::InnerProduct) => {
                kernels.dot_f16(q, &v[i * d..(i + 1) * d])
            }
            (FlatStorage::F16(v), Metric::L2) => kernels.l2sq_f16(q, &v[i * d..(i + 1) * d]),
        }
    }
}

/// Exact search index.
#[derive(Clone, Debug)]
pub struct IndexFlat {
    d: usize,
    metric: Metric,
    storage: FlatStorage,
    /// Squared norms of stored rows (as stored, i.e. after f16 rounding); L2 only.
    norms: Buf<f32>,
    kernels: DistanceKernels,
}

impl IndexFlat {
    /// An empty f32 index.
    pub fn new(d: usize, metric: Metric) -> Result<IndexFlat> {
        Self::with_storage(d, metric, FlatStorage::F32(Buf::new()))
    }

    /// An empty f16 index.
    pub fn new_f16(d: usize, metric: Metric) -> Result<IndexFlat> {
        Self::with_storage(d, metric, FlatStorage::F16(Buf::new()))
    }

    fn with_storage(d: usize, metric: Metric, storage: FlatStorage) -> Result<IndexFlat> {
        crate::limits::check_dim(d)?;
        Ok(IndexFlat {
            d,
            metric,
            storage,
            norms: Buf::new(),
            kernels: DistanceKernels::best(),
        })
    }

    /// An index over stored parts (e.g. read from a file): `norms` holds the squared norm
    /// of every row for L2 and is empty for inner product.
    pub(crate) fn from_parts(
        d: usize,
        metric: Metric,
        storage: FlatStorage,
        norms: Buf<f32>,
    ) -> Result<IndexFlat> {
        let mut idx = Self::with_storage(d, metric, storage)?;
        let rows = idx.storage.len() / d;
        let want = if metric == Metric::L2 { rows } else { 0 };
        if idx.storage.len() % d != 0 || norms.len() != want {
            return Err(Error::InvalidArgument(format!(
                "flat parts disagree: {} values for d = {d}, {} norms",
                idx.storage.len(),
                norms.len()
            )));
        }
        idx.norms = norms;
        Ok(idx)
    }

    /// Removes the vectors at positions `ids` and returns how many were removed; the rows
    /// after a removed one move down, so ids stay positions (`0..ntotal`), as in FAISS's
    /// flat indexes. Ids out of range are ignored.
    pub fn remove_ids(&mut self, ids: &[i64]) -> usize {
        let (keep, removed) = super::keep_mask(ids, self.ntotal());
        if removed > 0 {
            match &mut self.storage {
                FlatStorage::F32(v) => v.retain_rows(self.d, &keep),
                FlatStorage::F16(v) => v.retain_rows(self.d, &keep),
            }
            if self.metric == Metric::L2 {
                self.norms.retain_rows(1, &keep);
            }
        }
        removed
    }

    /// Squared row norms (L2 only; empty for inner product).
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// The stored vectors.
    pub fn storage(&self) -> &FlatStorage {
        &self.storage
    }

    /// Adds f16 vectors (`n * d`); into an f32 index they are widened.
    pub fn add_f16(&mut self, x: &[f16]) -> Result<()> {
        if !x.len().is_multiple_of(self.d) {
            return Err(Error::rows("vectors", x.len(), self.d));
        }
        crate::limits::check_capacity(self.ntotal(), x.len() / self.d)?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "vectors",
                head: None,
                row: i / self.d,
                col: i % self.d,
            });
        }
        match &mut self.storage {
            FlatStorage::F16(v) => v.to_mut().extend_from_slice(x),
            FlatStorage::F32(v) => v.to_mut().extend(x.iter().map(|h| h.to_f32())),
        }
        self.update_norms(x.len() / self.d);
        Ok(())
    }

    fn update_norms(&mut self, added: usize) {
        if self.metric != Metric::L2 {
            return;
        }
        let start = self.ntotal() - added;
        let d = self.d;
        for i in start..self.ntotal() {
            let n = match &self.storage {
                FlatStorage::F32(v) => v[i * d..(i + 1) * d].iter().map(|x| x * x).sum(),
                FlatStorage::F16(v) => v[i * d..(i + 1) * d]
                    .iter()
                    .map(|x| x.to_f32() * x.to_f32())
                    .sum(),
            };
            self.norms.to_mut().push(n);
        }
    }

    /// Scores of one query against every row, as metric values (dot or squared L2).
    pub fn scores_one(&self, q: &[f32], out: &mut [f32]) {
        let d = self.d;
        let k = &self.kernels;
        let metric = self.metric;
        // One score per stored row at most (a longer `out` keeps its tail).
        let scored = out.len().min(self.ntotal());
        let out = &mut out[..scored];
        // Chunk `c` of ROW_CHUNK rows into its piece of `out`.
        let score = |(c, o): (usize, &mut [f32])| {
            let rows = c * ROW_CHUNK * d..(c * ROW_CHUNK + o.len()) * d;
            match (&self.storage, metric) {
                (FlatStorage::F32(v), Metric::InnerProduct) => k.dot_rows_f32(q, &v[rows], o),
                (FlatStorage::F32(v), Metric::L2) => k.l2sq_rows_f32(q, &v[rows], o),
                (FlatStorage::F16(v), Metric::InnerProduct) => k.dot_rows_f16(q, &v[rows], o),
                (FlatStorage::F16(v), Metric::L2) => k.l2sq_rows_f16(q, &v[rows], o),
            }
        };
        if super::worth_parallel(out.len().div_ceil(ROW_CHUNK)) {
            out.par_chunks_mut(ROW_CHUNK).enumerate().for_each(score);
        } else {
            out.chunks_mut(ROW_CHUNK).enumerate().for_each(score);
        }
    }

    /// The best `k` rows of each query of `queries`, as
    /// [`f32_key`](crate::select::f32_key)s, best first: the batch path of the module doc.
    fn best_of_group(&self, queries: &[f32], k: usize) -> Vec<Vec<u64>> {
        let (d, n) = (self.d, self.ntotal());
        let nq = queries.len() / d;
        let mut tops: Vec<TopK<u64>> = (0..nq).map(|_| TopK::new(k)).collect();
        let query_norms: Vec<f32> = queries
            .chunks_exact(d)
            .map(|q| q.iter().map(|x| x * x).sum())
            .collect();
        let mut block = vec![0.0f32; nq * ROW_BLOCK.min(n)];
        let mut widened = Vec::new();
        for start in (0..n).step_by(ROW_BLOCK) {
            let rows = ROW_BLOCK.min(n - start);
            let x: &[f32] = match &self.storage {
                FlatStorage::F32(v) => &v[start * d..(start + rows) * d],
                FlatStorage::F16(v) => {
                    widened.clear();
                    widened.extend(v[start * d..(start + rows) * d].iter().map(|h| h.to_f32()));
                    &widened
                }
            };
            let block = &mut block[..nq * rows];
            gemm_abt(queries, nq, x, rows, d, block, rows);
            for ((scores, top), &qn) in block
                .chunks_exact_mut(rows)
                .zip(&mut tops)
                .zip(&query_norms)
            {
                if self.metric == Metric::L2 {
                    for (s, &xn) in scores.iter_mut().zip(&self.norms[start..start + rows]) {
                        *s = -(qn + xn - 2.0 * *s).max(0.0);
                    }
                }
                top.push_f32_run(scores, start as u32);
            }
        }
        tops.into_iter().map(TopK::into_sorted).collect()
    }
}

impl Index for IndexFlat {
    fn dim(&self) -> usize {
        self.d
    }
    fn ntotal(&self) -> usize {
        self.storage.len() / self.d
    }
    fn metric(&self) -> Metric {
        self.metric
    }
    fn is_trained(&self) -> bool {
        true
    }
    fn train(&mut self, x: &[f32]) -> Result<()> {
        check_vectors(x, self.d, "training set").map(|_| ())
    }
    fn add(&mut self, x: &[f32]) -> Result<()> {
        let n = check_vectors(x, self.d, "vectors")?;
        crate::limits::check_capacity(self.ntotal(), n)?;
        self.storage.check(x, self.d)?;
        self.storage.extend(x);
        self.update_norms(n);
        Ok(())
    }
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        let nq = check_vectors(queries, self.d, "queries")?;
        let n = self.ntotal();
        check_k(k, n)?;
        let mut res = SearchResult::empty(nq, k, self.metric);
        if nq < GEMM_MIN_QUERIES {
            let mut scores = vec![0.0f32; n];
            for (qi, q) in queries.chunks_exact(self.d).enumerate() {
                self.scores_one(q, &mut scores);
                if self.metric == Metric::L2 {
                    scores.iter_mut().for_each(|s| *s = -*s);
                }
                write_row(
                    &scores,
                    k,
                    self.metric,
                    &mut res.distances[qi * k..(qi + 1) * k],
                    &mut res.ids[qi * k..(qi + 1) * k],
                );
            }
            return Ok(res);
        }
        let threads = rayon::current_num_threads().max(1);
        let group = QUERY_GROUP.min(nq.div_ceil(threads)).max(1);
        let d = self.d;
        let metric = self.metric;
        let one_group = |((dist, ids), qs): ((&mut [f32], &mut [i64]), &[f32])| {
            let best = self.best_of_group(qs, k);
            for ((keys, dist), ids) in best.iter().zip(dist.chunks_mut(k)).zip(ids.chunks_mut(k)) {
                write_best(keys.iter().map(|&key| from_f32_key(key)), metric, dist, ids);
            }
        };
        if super::worth_parallel(nq.div_ceil(group)) {
            res.distances
                .par_chunks_mut(group * k)
                .zip(res.ids.par_chunks_mut(group * k))
                .zip(queries.par_chunks(group * d))
                .for_each(one_group);
        } else {
            res.distances
                .chunks_mut(group * k)
                .zip(res.ids.chunks_mut(group * k))
                .zip(queries.chunks(group * d))
                .for_each(one_group);
        }
        Ok(res)
    }
    fn reset(&mut self) {
        self.storage.clear();
        self.norms = Buf::new();
    }
}
