//! `IndexIVFPQFastScan`: a coarse quantizer ([`crate::ivf`]) over inverted lists of 4-bit
//! fast-scan codes.
//!
//! **Layout.** List `l` holds its vectors' packed codes
//! ([`PackedCodes`](crate::pq::pack::PackedCodes): blocks of 32, appendable), their ids (`i64`, `-1` marks a removed vector, a *tombstone*), and optionally
//! their original vectors (f32 or f16) for exact re-ranking and for [`refresh`]. Memory per
//! vector: `m / 2` bytes of codes, 8 bytes of id, plus the originals if kept.
//!
//! **Train.** k-means for the coarse centroids ([`COARSE_NITER`] iterations), then for the
//! codebooks on the training vectors' residuals.
//!
//! **Add.** Vectors are assigned to their best list (one GEMM per 1,024 rows), encoded (the
//! residual `x - c_l` when `by_residual`), and appended into the list's last block: `O(m)`
//! per vector after encoding, nothing is repacked.
//!
//! **Search**, per query: probe the `nprobe` best lists; build the u8 tables (one table for
//! inner product, where the list's term `q . c_l` is a per-list bias; one table per list for
//! L2 with residuals, built on `q - c_l`); scan each list with the fast-scan kernel, whose
//! threshold masks skip the vectors that cannot enter the heap of the best `k` (or `k *
//! rerank_factor`) float scores; re-rank the survivors exactly when asked. A batch scans list
//! by list, each list once per group of the queries that probe it, every query's best list
//! in a first pass (so its heap's floor is tight for the rest); its queries run in parallel.
//! A single query runs its probed lists in coarse order, in parallel when threads are idle.
//! Both use the index's own pool when [`IndexIVFPQFastScan::set_threads`] was called.
//!
//! **Streaming.** `add` never repacks; [`IndexIVFPQFastScan::remove_ids`] writes tombstones
//! (skipped by the scan's selection) and compacts a list once half of it is dead;
//! [`IndexIVFPQFastScan::drift`] compares the quantization error of vectors added since
//! training with the error on the training sample, and [`refresh`] re-trains on a sample
//! weighted towards recent vectors and re-encodes everything. The concurrent wrapper is
//! [`crate::index::streaming::StreamingIndex`].
//!
//! **Files.** `lists` (the inverted lists), `search` (tables, the scan's result handler,
//! re-rank, batch and single-query parallelism), `refresh` (tombstones, compaction, drift,
//! re-training); this file holds the type, its settings, training and `add`.
//!
//! [`refresh`]: IndexIVFPQFastScan::refreshed

use super::fastscan::RerankStorage;
use super::{check_vectors, Index};
use crate::error::{Error, Result};
use crate::ivf::CoarseQuantizer;
use crate::kmeans::KMeansConfig;
use crate::metric::Metric;
use crate::pq::lut::extend_blocked;
use crate::pq::{Nbits, ProductQuantizer};
use crate::result::SearchResult;
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::fastscan::FastScanKernel;
use pqcache_simd::lut::blocked_len;
use pqcache_simd::Level;
use rayon::prelude::*;
use std::sync::Arc;

/// At most this many training vectors are re-encoded to measure the training error.
const DRIFT_SAMPLE: usize = 16_384;

/// Lloyd iterations of the coarse quantizer by default (the codebooks run
/// [`KMeansConfig`]'s 25): FAISS's `IndexIVF` clusters its lists with 10. The coarse k-means
/// is most of the training (`nlist` centroids over every training vector at full dimension:
/// 85 % of a Fashion-MNIST 784-d training at nlist 256).
pub const COARSE_NITER: usize = 10;

/// Rows a task of an add encodes (and of a reconstruction-error sum).
const ENCODE_ROWS: usize = 256;

/// Code bytes a search of a few queries must scan before it uses more than the caller's
/// thread ([`IndexIVFPQFastScan::parallel_min_code_bytes`]). Handing the lists to a pool and
/// waking the caller after costs 20-50 us here, so one query on two threads (strided shares
/// of its lists) against one: 256 KB of codes (Gemma, nprobe 64) 33 against 25 us, 0.73 MB
/// (Fashion-MNIST, nprobe 64) 59-85 against 62 us, 1 MB (Gemma, all lists) 63 against 89
/// us, 2.9 MB (Fashion-MNIST, all lists) 128-152 against 197 us.
pub const PARALLEL_MIN_CODE_BYTES: usize = 1 << 20;

/// The default of [`IndexIVFPQFastScan::set_precomputed_max_bytes`]: the most bytes of L2
/// per-list terms kept in memory (FAISS's `precomputed_table_max_bytes` is 2 GiB). The terms
/// take `nlist * 64 * ceil(m / 16) * 16` bytes, `16 / dsub` times the coarse centroids.
pub const PRECOMPUTED_MAX_BYTES: usize = 1 << 30;

mod lists;
mod refresh;
mod search;

pub use lists::InvertedList;
pub use refresh::DriftStats;
use search::BATCH_MIN_QUERIES;

/// An IVF index over 4-bit fast-scan codes.
#[derive(Clone, Debug)]
pub struct IndexIVFPQFastScan {
    coarse: CoarseQuantizer,
    pq: ProductQuantizer,
    metric: Metric,
    by_residual: bool,
    lists: Vec<InvertedList>,
    keep: Option<RerankStorage>,
    ntotal: usize,
    next_id: i64,
    drift: DriftStats,
    /// L2 with residuals, when they fit `precomputed_max_bytes` (else empty, and each list's
    /// terms are made when a group of queries scans it): per list `l`, the `m * 16` terms
    /// `||r_jc||² + 2 c_l,j . r_jc` (sub-quantizer `j`, code `c`) in the blocked layout of
    /// the table kernel ([`blocked_len`]`(m)` floats, [`extend_blocked`]), so that a list's
    /// table is `2 q . r - term` plus the constant `-||q - c_l||²`: no table is rebuilt from
    /// the codebooks per probed list.
    precomputed: Vec<f32>,
    precomputed_max_bytes: usize,
    /// Lists visited per query (clamped to `1..=nlist`).
    pub nprobe: usize,
    /// Re-rank the best `k * rerank_factor` candidates exactly (0 or 1: off). Needs the
    /// originals ([`IndexIVFPQFastScan::keep_originals`]).
    pub rerank_factor: usize,
    /// k-means settings of the codebooks, and of the coarse quantizer but for its
    /// iterations ([`IndexIVFPQFastScan::coarse_niter`]).
    pub train_config: KMeansConfig,
    /// Lloyd iterations of the coarse quantizer ([`COARSE_NITER`] by default).
    pub coarse_niter: usize,
    /// Vectors sampled for a [`IndexIVFPQFastScan::refreshed`] re-training.
    pub refresh_sample: usize,
    /// A search of fewer than eight queries uses more than the caller's thread only when its
    /// probed lists hold about this many bytes of codes ([`PARALLEL_MIN_CODE_BYTES`] by
    /// default; 0: whenever threads are idle).
    pub parallel_min_code_bytes: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    scan: FastScanKernel,
    kernels: DistanceKernels,
}

impl IndexIVFPQFastScan {
    /// An untrained index: `nlist` lists, `m` 4-bit sub-quantizers over `d` dimensions.
    /// `by_residual` defaults to true for L2 and false for inner product (where the residual
    /// rarely pays for its per-list bias; FAISS's default is true for both).
    pub fn new(d: usize, nlist: usize, m: usize, metric: Metric) -> Result<IndexIVFPQFastScan> {
        let coarse = CoarseQuantizer::new(d, nlist, metric)?;
        let pq = ProductQuantizer::new(d, m, Nbits::Four)?;
        Self::with_quantizers(coarse, pq, metric, metric == Metric::L2)
    }

    /// An empty index over given (trained or untrained) quantizers.
    pub fn with_quantizers(
        coarse: CoarseQuantizer,
        pq: ProductQuantizer,
        metric: Metric,
        by_residual: bool,
    ) -> Result<IndexIVFPQFastScan> {
        if pq.nbits() != Nbits::Four {
            return Err(Error::InvalidArgument(
                "fast-scan needs a 4-bit quantizer".into(),
            ));
        }
        if coarse.dim() != pq.dim() {
            return Err(Error::DimensionMismatch {
                expected: coarse.dim(),
                got: pq.dim(),
            });
        }
        let lists = (0..coarse.nlist())
            .map(|_| InvertedList::new(pq.m(), None))
            .collect::<Result<Vec<_>>>()?;
        let mut index = IndexIVFPQFastScan {
            coarse,
            pq,
            metric,
            by_residual,
            lists,
            keep: None,
            ntotal: 0,
            next_id: 0,
            drift: DriftStats::default(),
            precomputed: Vec::new(),
            precomputed_max_bytes: PRECOMPUTED_MAX_BYTES,
            nprobe: 1,
            rerank_factor: 0,
            train_config: KMeansConfig::default(),
            coarse_niter: COARSE_NITER,
            refresh_sample: 65_536,
            parallel_min_code_bytes: PARALLEL_MIN_CODE_BYTES,
            pool: None,
            scan: FastScanKernel::best(),
            kernels: DistanceKernels::best(),
        };
        index.precompute();
        Ok(index)
    }

    /// An index over stored parts (e.g. read from a file).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        coarse: CoarseQuantizer,
        pq: ProductQuantizer,
        metric: Metric,
        by_residual: bool,
        lists: Vec<InvertedList>,
        keep: Option<RerankStorage>,
        next_id: i64,
        drift: DriftStats,
    ) -> Result<IndexIVFPQFastScan> {
        if lists.len() != coarse.nlist() {
            return Err(Error::InvalidArgument(format!(
                "{} lists for nlist = {}",
                lists.len(),
                coarse.nlist()
            )));
        }
        if lists
            .iter()
            .any(|l| l.codes.m() != pq.m() || l.originals.is_some() != keep.is_some())
        {
            return Err(Error::InvalidArgument(
                "a list's codes or stored vectors disagree with the index".into(),
            ));
        }
        let mut idx = Self::with_quantizers(coarse, pq, metric, by_residual)?;
        idx.ntotal = lists.iter().map(InvertedList::live).sum();
        let max_id = lists
            .iter()
            .flat_map(|l| l.ids.iter().copied())
            .max()
            .unwrap_or(-1);
        idx.next_id = next_id.max(max_id.saturating_add(1));
        idx.lists = lists;
        idx.keep = keep;
        idx.drift = drift;
        Ok(idx)
    }

    /// Sets `by_residual` (only while the index is untrained).
    pub fn set_by_residual(&mut self, by_residual: bool) -> Result<()> {
        if self.is_trained() {
            return Err(Error::InvalidArgument(
                "by_residual must be set before train".into(),
            ));
        }
        self.by_residual = by_residual;
        Ok(())
    }

    /// Keeps the original vectors from now on (needed by re-ranking and by refresh). Must be
    /// called while the index is empty.
    pub fn keep_originals(&mut self, storage: RerankStorage) -> Result<()> {
        if self.lists.iter().any(|l| !l.is_empty()) {
            return Err(Error::InvalidArgument(
                "keep_originals must be called before add".into(),
            ));
        }
        self.keep = Some(storage);
        for l in &mut self.lists {
            *l = InvertedList::new(self.pq.m(), self.keep)?;
        }
        Ok(())
    }

    /// Runs searches on a pool of `threads` workers (0: the caller's rayon pool; 1: the
    /// caller's thread, with no hand-off).
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        crate::limits::at_most(threads, crate::limits::MAX_THREADS, "threads")?;
        self.pool = if threads == 0 {
            None
        } else {
            Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| Error::InvalidArgument(format!("thread pool: {e}")))?,
            ))
        };
        Ok(())
    }

    /// Forces the scan kernel's level (capped at what the CPU supports).
    pub fn set_level(&mut self, level: Level) {
        self.scan = pqcache_simd::fastscan::FastScanKernel::for_level(level);
    }

    /// The coarse quantizer.
    pub fn coarse(&self) -> &CoarseQuantizer {
        &self.coarse
    }
    /// The product quantizer.
    pub fn pq(&self) -> &ProductQuantizer {
        &self.pq
    }
    /// Whether codes are residuals to the list centroid.
    pub fn by_residual(&self) -> bool {
        self.by_residual
    }
    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.coarse.nlist()
    }
    /// The inverted lists.
    pub fn lists(&self) -> &[InvertedList] {
        &self.lists
    }
    /// The storage of kept originals, if any.
    pub fn originals_storage(&self) -> Option<RerankStorage> {
        self.keep
    }
    /// The id `add` gives next (one past the largest id so far).
    pub fn next_id(&self) -> i64 {
        self.next_id
    }
    /// Quantization-error statistics since the last training.
    pub fn drift(&self) -> DriftStats {
        self.drift
    }

    /// Writes into `out` (as long as `rows`) the vectors the codes of `rows` (in lists
    /// `labels`) stand for: `x - c_l` with residuals, `x` otherwise.
    fn encoded_rows(&self, rows: &[f32], labels: &[u32], out: &mut [f32]) {
        let d = self.pq.dim();
        out.copy_from_slice(rows);
        if self.by_residual {
            for (o, &l) in out.chunks_mut(d).zip(labels) {
                for (v, c) in o.iter_mut().zip(self.coarse.centroid(l as usize)) {
                    *v -= c;
                }
            }
        }
    }

    /// [`Self::encoded_rows`] of all of `x`, in parallel.
    fn to_encoded(&self, x: &[f32], labels: &[u32]) -> Vec<f32> {
        let d = self.pq.dim();
        let mut enc = vec![0.0f32; x.len()];
        enc.par_chunks_mut(ENCODE_ROWS * d)
            .zip(x.par_chunks(ENCODE_ROWS * d))
            .zip(labels.par_chunks(ENCODE_ROWS))
            .for_each(|((out, rows), labels)| self.encoded_rows(rows, labels, out));
        enc
    }

    /// The codes of `x` (rows in lists `labels`) and the sum of their squared reconstruction
    /// errors, `ENCODE_ROWS` rows a task: the encoded vectors live only in each thread's
    /// buffer (a 188 MB Fashion-MNIST add spent a fifth of its time copying, subtracting and
    /// checking them on one thread).
    fn encode(&self, x: &[f32], labels: &[u32]) -> (Vec<u8>, f64) {
        let (d, m) = (self.pq.dim(), self.pq.m());
        let mut codes = vec![0u8; labels.len() * m];
        let sq_err = codes
            .par_chunks_mut(ENCODE_ROWS * m)
            .zip(x.par_chunks(ENCODE_ROWS * d))
            .zip(labels.par_chunks(ENCODE_ROWS))
            .map_init(Vec::new, |buf: &mut Vec<f32>, ((out, rows), labels)| {
                buf.resize(rows.len(), 0.0);
                self.encoded_rows(rows, labels, buf);
                self.pq.encode_into(buf, out);
                self.sq_error_rows(buf, out)
            })
            .sum();
        (codes, sq_err)
    }

    /// Adds `x` (`n * d`) with explicit ids (`>= 0`; `-1` is the tombstone).
    pub fn add_with_ids(&mut self, x: &[f32], ids: &[i64]) -> Result<()> {
        if !self.is_trained() {
            return Err(Error::NotTrained);
        }
        let n = check_vectors(x, self.pq.dim(), "vectors")?;
        if self.originals_storage() == Some(RerankStorage::F16) {
            super::check_f16_range(x, self.pq.dim(), "vectors")?;
        }
        if ids.len() != n {
            return Err(Error::DimensionMismatch {
                expected: n,
                got: ids.len(),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&id| id < 0) {
            return Err(Error::InvalidArgument(format!(
                "ids must be non-negative, got {bad}"
            )));
        }
        let labels = self.coarse.assign(x);
        let (codes, sq_err) = self.encode(x, &labels);
        self.drift.added_sq_err += sq_err;
        self.drift.added += n;
        // Each list takes its vectors in add order; the lists fill in parallel (the vectors
        // grouped by list with a counting sort).
        let (d, m) = (self.pq.dim(), self.pq.m());
        let mut starts = vec![0usize; self.lists.len() + 1];
        for &l in &labels {
            starts[l as usize + 1] += 1;
        }
        for l in 0..self.lists.len() {
            starts[l + 1] += starts[l];
        }
        let mut order = vec![0usize; n];
        let mut next = starts.clone();
        for (i, &l) in labels.iter().enumerate() {
            order[next[l as usize]] = i;
            next[l as usize] += 1;
        }
        self.lists
            .par_iter_mut()
            .zip(starts.par_windows(2))
            .try_for_each(|(list, run)| -> Result<()> {
                for &i in &order[run[0]..run[1]] {
                    list.codes.push(&codes[i * m..(i + 1) * m])?;
                    list.ids.to_mut().push(ids[i]);
                    if let Some(o) = &mut list.originals {
                        o.extend(&x[i * d..(i + 1) * d]);
                    }
                }
                Ok(())
            })?;
        self.ntotal += n;
        self.next_id = self
            .next_id
            .max(ids.iter().max().map_or(0, |&v| v.saturating_add(1)));
        Ok(())
    }

    /// Fills [`IndexIVFPQFastScan::precomputed`] (L2 with residuals only), when it fits
    /// `precomputed_max_bytes`.
    fn precompute(&mut self) {
        self.precomputed = Vec::new();
        if !self.residual_l2_terms() {
            return;
        }
        let (stride, nlist) = (blocked_len(self.pq.m()), self.coarse.nlist());
        let fits = nlist
            .checked_mul(stride * 4)
            .is_some_and(|bytes| bytes <= self.precomputed_max_bytes);
        if !fits {
            return;
        }
        let mut out = vec![0.0f32; nlist * stride];
        out.par_chunks_mut(stride).enumerate().for_each(|(l, t)| {
            let mut terms = Vec::with_capacity(stride);
            self.list_terms(l, &mut terms);
            t.copy_from_slice(&terms);
        });
        self.precomputed = out;
    }

    /// Whether search builds each probed list's table from per-list terms: L2 with residuals,
    /// trained.
    fn residual_l2_terms(&self) -> bool {
        self.by_residual && self.metric == Metric::L2 && self.is_trained()
    }

    /// Appends list `l`'s terms `||r_jc||² + 2 c_l,j . r_jc` to `out`, blocked
    /// ([`extend_blocked`]).
    pub(super) fn list_terms(&self, l: usize, out: &mut Vec<f32>) {
        let (m, dsub) = (self.pq.m(), self.pq.dsub());
        let c = self.coarse.centroid(l);
        let mut rows = vec![0.0f32; m * 16];
        for j in 0..m {
            let cj = &c[j * dsub..(j + 1) * dsub];
            for code in 0..16 {
                let r = self.pq.centroid(j, code);
                rows[j * 16 + code] = r.iter().zip(cj).map(|(a, b)| a * a + 2.0 * a * b).sum();
            }
        }
        extend_blocked(&rows, out);
    }

    /// Keeps the L2 per-list terms in memory when they take at most `bytes` (default
    /// [`PRECOMPUTED_MAX_BYTES`]); past it, a list's terms are made each time a group of
    /// queries scans it (`d * 16` multiply-adds), with the same results.
    pub fn set_precomputed_max_bytes(&mut self, bytes: usize) {
        self.precomputed_max_bytes = bytes;
        self.precompute();
    }

    /// Whether the L2 per-list terms are held in memory
    /// ([`IndexIVFPQFastScan::set_precomputed_max_bytes`]).
    pub fn has_precomputed_terms(&self) -> bool {
        !self.precomputed.is_empty()
    }
}

impl Index for IndexIVFPQFastScan {
    fn dim(&self) -> usize {
        self.pq.dim()
    }
    fn ntotal(&self) -> usize {
        self.ntotal
    }
    fn metric(&self) -> Metric {
        self.metric
    }
    fn is_trained(&self) -> bool {
        self.coarse.is_trained() && self.pq.is_trained()
    }
    /// Trains the coarse centroids, then the codebooks on the (residual) training vectors,
    /// and measures the training quantization error for [`IndexIVFPQFastScan::drift`].
    fn train(&mut self, x: &[f32]) -> Result<()> {
        let n = check_vectors(x, self.pq.dim(), "training vectors")?;
        if n < self.coarse.nlist() {
            return Err(Error::TooFewTrainingPoints {
                got: n,
                need: self.coarse.nlist(),
            });
        }
        let coarse = KMeansConfig {
            niter: self.coarse_niter,
            ..self.train_config.clone()
        };
        self.coarse.train(x, &coarse)?;
        let labels = self.coarse.assign(x);
        let enc = self.to_encoded(x, &labels);
        self.pq.train(&enc, &self.train_config)?;
        self.precompute();
        let d = self.pq.dim();
        let step = n.div_ceil(DRIFT_SAMPLE).max(1);
        let probe: Vec<f32> = enc
            .chunks(d)
            .step_by(step)
            .flat_map(|r| r.iter().copied())
            .collect();
        let codes = self.pq.compute_codes(&probe)?;
        let count = probe.len() / d;
        self.drift = DriftStats {
            train_mse: self.reconstruction_error(&probe, &codes) / count as f64,
            ..DriftStats::default()
        };
        self.mark_trained_here();
        Ok(())
    }
    /// Adds with ids continuing from the largest id seen so far.
    fn add(&mut self, x: &[f32]) -> Result<()> {
        let n = x.len() / self.pq.dim().max(1);
        let end = i64::try_from(n)
            .ok()
            .and_then(|n| self.next_id.checked_add(n))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "ids would overflow: next id {} plus {n} vectors",
                    self.next_id
                ))
            })?;
        let ids: Vec<i64> = (self.next_id..end).collect();
        self.add_with_ids(x, &ids)
    }
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        let nq = self.check_search(queries, k)?;
        let d = self.pq.dim();
        let mut res = SearchResult::empty(nq, k, self.metric);
        let threads = if nq >= BATCH_MIN_QUERIES {
            self.threads()
        } else {
            self.threads_for_few(nq)
        };
        self.run(threads, || {
            let rows = if nq >= BATCH_MIN_QUERIES {
                self.search_batch(queries, k, threads)
            } else if threads == 1 {
                let one = |q| self.search_one(q, k, false);
                queries.chunks(d).map(one).collect()
            } else {
                let parallel_lists = nq < threads;
                queries
                    .par_chunks(d)
                    .map(|q| self.search_one(q, k, parallel_lists))
                    .collect()
            };
            for (qi, row) in rows.iter().enumerate() {
                for (slot, c) in row.iter().enumerate() {
                    res.distances[qi * k + slot] = self.metric.from_score(c.score);
                    res.ids[qi * k + slot] = c.id;
                }
            }
        });
        Ok(res)
    }
    fn reset(&mut self) {
        for l in &mut self.lists {
            // The list's m was accepted at construction.
            *l = InvertedList::new(self.pq.m(), self.keep).expect("valid m");
        }
        self.ntotal = 0;
        self.next_id = 0;
        self.drift.added = 0;
        self.drift.added_sq_err = 0.0;
    }
}
