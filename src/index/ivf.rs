//! `IndexIVFPQFastScan`: a coarse quantizer ([`crate::ivf`]) over inverted lists of 4-bit
//! fast-scan codes.
//!
//! **Layout.** List `l` holds its vectors' packed codes ([`PackedCodes`]: blocks of 32,
//! appendable), their ids (`i64`, `-1` marks a removed vector, a *tombstone*), and optionally
//! their original vectors (f32 or f16) for exact re-ranking and for [`refresh`]. Memory per
//! vector: `m / 2` bytes of codes, 8 bytes of id, plus the originals if kept.
//!
//! **Add.** Vectors are assigned to their best list (one GEMM per 1,024 rows), encoded (the
//! residual `x - c_l` when `by_residual`), and appended into the list's last block: `O(m)`
//! per vector after encoding, nothing is repacked.
//!
//! **Search**, per query: probe the `nprobe` best lists; build the u8 tables (one table for
//! inner product, where the list's term `q . c_l` is a per-list bias; one table per list for
//! L2 with residuals, built on `q - c_l`); scan each list with the fast-scan kernel, whose
//! threshold masks skip the vectors that cannot enter the heap of the best `k` (or `k *
//! rerank_factor`) float scores; re-rank the survivors exactly when asked. A batch runs its
//! queries in parallel; a single query runs its probed lists in parallel. Both use the
//! index's own pool when [`IndexIVFPQFastScan::set_threads`] was called.
//!
//! **Streaming.** `add` never repacks; [`IndexIVFPQFastScan::remove_ids`] writes tombstones
//! (skipped by the scan's selection) and compacts a list once half of it is dead;
//! [`IndexIVFPQFastScan::drift`] compares the quantization error of vectors added since
//! training with the error on the training sample, and [`refresh`] re-trains on a sample
//! weighted towards recent vectors and re-encodes everything. The concurrent wrapper is
//! [`crate::index::streaming::StreamingIndex`].
//!
//! [`refresh`]: IndexIVFPQFastScan::refreshed

use super::fastscan::RerankStorage;
use super::flat::FlatStorage;
use super::scan::{self, of_query, Chunking, Scan, ScanHandler, CHUNK_BLOCKS};
use super::{check_k, check_vectors, for_each_marked, Index};
use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::ivf::CoarseQuantizer;
use crate::kmeans::KMeansConfig;
use crate::metric::Metric;
use crate::pq::lut::QuantizedLut;
use crate::pq::pack::PackedCodes;
use crate::pq::{Nbits, ProductQuantizer};
use crate::result::SearchResult;
use crate::select::TopK;
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::fastscan::{FastScanKernel, BBS, MAX_QBS};
use pqcache_simd::Level;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Arc;

/// At most this many training vectors are re-encoded to measure the training error.
const DRIFT_SAMPLE: usize = 16_384;
/// A list is compacted when this fraction of it (or more) is tombstones.
const COMPACT_DEAD_FRACTION: f64 = 0.5;

/// One inverted list.
#[derive(Clone, Debug, PartialEq)]
pub struct InvertedList {
    codes: PackedCodes,
    ids: Buf<i64>,
    originals: Option<FlatStorage>,
    /// Tombstones (ids set to -1) not yet compacted away.
    dead: usize,
    /// Entries from this offset on were added after the last (re)training.
    fresh_from: usize,
}

impl InvertedList {
    fn new(m: usize, keep: Option<RerankStorage>) -> Result<InvertedList> {
        Ok(InvertedList {
            codes: PackedCodes::new(m)?,
            ids: Buf::new(),
            originals: keep.map(|s| match s {
                RerankStorage::F32 => FlatStorage::F32(Default::default()),
                RerankStorage::F16 => FlatStorage::F16(Default::default()),
            }),
            dead: 0,
            fresh_from: 0,
        })
    }

    /// A list over stored parts (e.g. read from a file). Checks that the parts agree and
    /// that `dead` is the number of tombstones.
    pub(crate) fn from_parts(
        codes: PackedCodes,
        ids: Buf<i64>,
        originals: Option<FlatStorage>,
        fresh_from: usize,
        d: usize,
    ) -> Result<InvertedList> {
        let n = ids.len();
        let bad = |r: String| Err(Error::InvalidArgument(r));
        if codes.ntotal() != n {
            return bad(format!("{} codes for {n} ids", codes.ntotal()));
        }
        if originals.as_ref().is_some_and(|o| o.len() != n * d) {
            return bad(format!("stored vectors do not match {n} ids"));
        }
        if fresh_from > n {
            return bad(format!("fresh_from {fresh_from} beyond {n} entries"));
        }
        if let Some(&id) = ids.iter().find(|&&id| id < -1) {
            return bad(format!(
                "id {id} out of range (ids are >= 0, -1 for removed)"
            ));
        }
        let dead = ids.iter().filter(|&&id| id == -1).count();
        Ok(InvertedList {
            codes,
            ids,
            originals,
            dead,
            fresh_from,
        })
    }

    /// Entries added since the last training start at this offset.
    pub fn fresh_from(&self) -> usize {
        self.fresh_from
    }

    /// Entries, tombstones included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Live vectors.
    pub fn live(&self) -> usize {
        self.ids.len() - self.dead
    }
    /// Ids, `-1` for a tombstone.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }
    /// Packed codes.
    pub fn codes(&self) -> &PackedCodes {
        &self.codes
    }
    /// Original vectors, if kept.
    pub fn originals(&self) -> Option<&FlatStorage> {
        self.originals.as_ref()
    }

    /// Drops the tombstones (repacks the list: `O(len * m)`).
    fn compact(&mut self, d: usize) -> Result<()> {
        if self.dead == 0 {
            return Ok(());
        }
        let mut codes = PackedCodes::new(self.codes.m())?;
        let mut ids = Vec::with_capacity(self.live());
        let mut originals = self.originals.as_ref().map(|o| o.empty_like());
        let mut fresh_from = 0;
        for (i, &id) in self.ids.iter().enumerate() {
            if id < 0 {
                continue;
            }
            if i < self.fresh_from {
                fresh_from += 1;
            }
            codes.push(&self.codes.code(i))?;
            ids.push(id);
            if let (Some(dst), Some(src)) = (&mut originals, &self.originals) {
                dst.push_row_from(src, i, d);
            }
        }
        *self = InvertedList {
            codes,
            ids: ids.into(),
            originals,
            dead: 0,
            fresh_from,
        };
        Ok(())
    }
}

/// From this many queries on, a search scans each list once per group of queries.
const BATCH_MIN_QUERIES: usize = 8;

/// A query's table material: one u8 table for every list, or (L2 with residuals) the
/// `q . r_jc` terms from which each list's table is built.
enum QueryPrep {
    Shared(QuantizedLut),
    ResidualL2 { dots: Vec<f32>, norm: f32 },
}

/// Buffers reused across list scans.
#[derive(Default)]
struct ListScratch {
    bytes: Vec<u8>,
    scan: scan::ScanScratch,
    /// A chunk's live sums, for [`chunk_floor`].
    live: Vec<u16>,
    /// The offsets of a chunk's sums above a query's floor.
    marked: Vec<u32>,
}

/// A per-list table under construction (L2 with residuals), reused across lists.
#[derive(Default)]
struct LutSlot {
    mins: Vec<f32>,
    lut: QuantizedLut,
}

/// A candidate: float score, id, and where it lives.
#[derive(Clone, Copy, Debug)]
struct Cand {
    score: f32,
    id: i64,
    list: u32,
    offset: u32,
}

// The rank order of [`TopK`]: greater is better (higher score, then smaller id).
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.id.cmp(&self.id))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}

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
    /// L2 with residuals: `nlist * m * 16` terms `||r_jc||² + 2 c_l,j . r_jc` (list `l`,
    /// sub-quantizer `j`, code `c`), so that a list's table is `2 q . r - term` plus the
    /// constant `-||q - c_l||²`: no table is rebuilt from the codebooks per probed list.
    precomputed: Vec<f32>,
    /// Lists visited per query (clamped to `1..=nlist`).
    pub nprobe: usize,
    /// Re-rank the best `k * rerank_factor` candidates exactly (0 or 1: off). Needs the
    /// originals ([`IndexIVFPQFastScan::keep_originals`]).
    pub rerank_factor: usize,
    /// k-means settings of the coarse quantizer and of the codebooks.
    pub train_config: KMeansConfig,
    /// Vectors sampled for a [`IndexIVFPQFastScan::refreshed`] re-training.
    pub refresh_sample: usize,
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
            nprobe: 1,
            rerank_factor: 0,
            train_config: KMeansConfig::default(),
            refresh_sample: 65_536,
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

    /// Runs searches on a pool of `threads` workers (0: the caller's rayon pool).
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

    /// The vectors the codes stand for: `x - c_l` with residuals, `x` otherwise (in place).
    fn to_encoded(&self, x: &mut [f32], labels: &[u32]) {
        if self.by_residual {
            let d = self.pq.dim();
            for (row, &l) in x.chunks_mut(d).zip(labels) {
                for (v, c) in row.iter_mut().zip(self.coarse.centroid(l as usize)) {
                    *v -= c;
                }
            }
        }
    }

    /// Sum of squared reconstruction errors of `enc` (the encoded vectors) given `codes`.
    fn reconstruction_error(&self, enc: &[f32], codes: &[u8]) -> f64 {
        let (d, m) = (self.pq.dim(), self.pq.m());
        let dsub = self.pq.dsub();
        enc.par_chunks(d)
            .zip(codes.par_chunks(m))
            .map(|(row, code)| {
                let mut e = 0.0f64;
                for (j, &c) in code.iter().enumerate() {
                    let cent = self.pq.centroid(j, c as usize);
                    for (a, b) in row[j * dsub..(j + 1) * dsub].iter().zip(cent) {
                        e += ((a - b) * (a - b)) as f64;
                    }
                }
                e
            })
            .sum()
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
        let mut enc = x.to_vec();
        self.to_encoded(&mut enc, &labels);
        let codes = self.pq.compute_codes(&enc)?;
        self.drift.added_sq_err += self.reconstruction_error(&enc, &codes);
        self.drift.added += n;
        let (d, m) = (self.pq.dim(), self.pq.m());
        for (i, &l) in labels.iter().enumerate() {
            let list = &mut self.lists[l as usize];
            list.codes.push(&codes[i * m..(i + 1) * m])?;
            list.ids.to_mut().push(ids[i]);
            if let Some(o) = &mut list.originals {
                o.extend(&x[i * d..(i + 1) * d]);
            }
        }
        self.ntotal += n;
        self.next_id = self
            .next_id
            .max(ids.iter().max().map_or(0, |&v| v.saturating_add(1)));
        Ok(())
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
        fresh_index.refresh_sample = self.refresh_sample;
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

    /// Fills [`IndexIVFPQFastScan::precomputed`] (L2 with residuals only).
    fn precompute(&mut self) {
        self.precomputed.clear();
        if !(self.by_residual && self.metric == Metric::L2 && self.is_trained()) {
            return;
        }
        let (m, dsub, nlist) = (self.pq.m(), self.pq.dsub(), self.coarse.nlist());
        let mut out = vec![0.0f32; nlist * m * 16];
        out.par_chunks_mut(m * 16).enumerate().for_each(|(l, t)| {
            let c = self.coarse.centroid(l);
            for j in 0..m {
                for code in 0..16 {
                    let r = self.pq.centroid(j, code);
                    let cj = &c[j * dsub..(j + 1) * dsub];
                    t[j * 16 + code] = r.iter().zip(cj).map(|(a, b)| a * a + 2.0 * a * b).sum();
                }
            }
        });
        self.precomputed = out;
    }

    /// Marks the present vectors as seen at training: the drift counters restart.
    fn mark_trained_here(&mut self) {
        for l in &mut self.lists {
            l.fresh_from = l.len();
        }
        self.drift.added = 0;
        self.drift.added_sq_err = 0.0;
    }

    fn check_search(&self, queries: &[f32], k: usize) -> Result<usize> {
        if !self.is_trained() {
            return Err(Error::NotTrained);
        }
        let nq = check_vectors(queries, self.pq.dim(), "queries")?;
        check_k(k, self.ntotal)?;
        if self.rerank_factor > 1 && self.keep.is_none() {
            return Err(Error::InvalidArgument(
                "re-ranking needs the original vectors: call keep_originals before add".into(),
            ));
        }
        Ok(nq)
    }

    /// The quantized table of `v` (scores to maximise).
    fn table(&self, v: &[f32]) -> QuantizedLut {
        let m = self.pq.m();
        let mut lut = vec![0.0f32; m * 16];
        self.pq.compute_lut(v, self.metric, &self.kernels, &mut lut);
        if self.metric == Metric::L2 {
            lut.iter_mut().for_each(|v| *v = -*v);
        }
        QuantizedLut::new(&lut, m, m + m % 2)
    }

    /// What a query needs to build the table of any list it probes.
    fn prepare(&self, q: &[f32]) -> QueryPrep {
        if self.by_residual && self.metric == Metric::L2 {
            // L2 with residuals: q . r_jc for every (j, c), shared by the lists.
            let mut dots = vec![0.0f32; self.pq.m() * 16];
            self.pq
                .compute_lut(q, Metric::InnerProduct, &self.kernels, &mut dots);
            QueryPrep::ResidualL2 {
                dots,
                norm: q.iter().map(|v| v * v).sum(),
            }
        } else {
            QueryPrep::Shared(self.table(q))
        }
    }

    /// The table of list `l` for a prepared query with coarse score `coarse`, and the bias
    /// added to every float score of the list; a per-list table is built in `slot`.
    fn list_table<'a>(
        &self,
        prep: &'a QueryPrep,
        l: usize,
        coarse: f32,
        slot: &'a mut LutSlot,
    ) -> (&'a QuantizedLut, f32) {
        match prep {
            // Inner product with residuals: q . x = q . c_l + q . r.
            QueryPrep::Shared(lut) => (lut, if self.by_residual { coarse } else { 0.0 }),
            QueryPrep::ResidualL2 { dots, norm } => {
                // -||q - c_l - r||² = -||q - c_l||² + sum_j (2 q_j . r_jc - term_ljc), and
                // -||q - c_l||² = coarse - ||q||².
                let m = self.pq.m();
                let pre = &self.precomputed[l * m * 16..(l + 1) * m * 16];
                slot.lut
                    .requantize_residual(dots, pre, m, m + m % 2, &mut slot.mins);
                (&slot.lut, coarse - norm)
            }
        }
    }

    /// Scans list `l` once for a group of up to `MAX_QBS` queries: `tables[j]` (table, bias)
    /// belongs to the query whose heap is `heaps[members[j]]`. Each query's kernel threshold
    /// is its heap's floor, so blocks no query can use are skipped in-kernel.
    fn scan_list_group(
        &self,
        l: usize,
        tables: &[(&QuantizedLut, f32)],
        heaps: &mut [TopK<Cand>],
        members: &[usize],
        scratch: &mut ListScratch,
    ) {
        let list = &self.lists[l];
        scratch.bytes.clear();
        for (t, _) in tables {
            scratch.bytes.extend_from_slice(&t.table);
        }
        let scan = Scan {
            kernel: &self.scan,
            block_bytes: list.codes.block_bytes(),
            m2: list.codes.m2(),
            tables: &scratch.bytes,
            nq: tables.len(),
        };
        let mut handler = ListHandler {
            list: l as u32,
            // One slice for the whole scan (a mapped id array resolves its view once).
            ids: list.ids.as_slice(),
            n: list.len(),
            tables,
            heaps,
            members,
            floors: [None; MAX_QBS],
            live: &mut scratch.live,
            kernel: &self.scan,
            marked: &mut scratch.marked,
        };
        let chunking = Chunking::fixed(CHUNK_BLOCKS);
        scan.blocks(
            list.codes.data(),
            0,
            chunking,
            &mut scratch.scan,
            &mut handler,
        );
    }

    /// Candidates kept per query before re-ranking.
    fn pool_size(&self, k: usize) -> usize {
        if self.rerank_factor > 1 && self.keep.is_some() {
            crate::limits::rerank_pool(k, self.rerank_factor, self.ntotal())
        } else {
            k
        }
    }

    /// Re-ranks (when on) and keeps the best `k` of a query's sorted candidates.
    fn finish(&self, q: &[f32], k: usize, mut best: Vec<Cand>) -> Vec<Cand> {
        if self.rerank_factor > 1 && self.keep.is_some() {
            // Candidates as (id, list, offset): the id decides equal scores.
            let where_ = best.iter().map(|c| (c.id, c.list, c.offset));
            let scored = super::rerank(where_, k, |(_, list, offset)| {
                let list = &self.lists[list as usize];
                let orig = list.originals.as_ref().expect("kept when rerank is on");
                let v = orig.metric_value(&self.kernels, self.metric, q, offset as usize);
                self.metric.to_score(v)
            });
            return scored
                .into_iter()
                .map(|(score, (id, list, offset))| Cand {
                    score,
                    id,
                    list,
                    offset,
                })
                .collect();
        }
        best.truncate(k);
        best
    }

    /// The best `k` of one query, best first (fewer if the probed lists hold fewer).
    fn search_one(&self, q: &[f32], k: usize, parallel_lists: bool) -> Vec<Cand> {
        let probes = self.coarse.probe(&self.kernels, q, self.nprobe);
        let c = self.pool_size(k);
        let prep = self.prepare(q);
        let scan_probe = |heaps: &mut [TopK<Cand>],
                          scratch: &mut (ListScratch, LutSlot),
                          &(coarse, l): &(f32, u32)| {
            let l = l as usize;
            if self.lists[l].live() == 0 {
                return;
            }
            let (scan, slot) = scratch;
            let table = self.list_table(&prep, l, coarse, slot);
            self.scan_list_group(l, &[table], heaps, &[0], scan);
        };
        let heap = if parallel_lists && probes.len() > 1 {
            probes
                .par_iter()
                .fold(
                    || ([TopK::new(c)], Default::default()),
                    |(mut heaps, mut scratch), p| {
                        scan_probe(&mut heaps, &mut scratch, p);
                        (heaps, scratch)
                    },
                )
                .map(|([h], _)| h)
                .reduce(
                    || TopK::new(c),
                    |mut a, b| {
                        a.merge(b);
                        a
                    },
                )
        } else {
            let mut heaps = [TopK::new(c)];
            let mut scratch = Default::default();
            for p in &probes {
                scan_probe(&mut heaps, &mut scratch, p);
            }
            let [h] = heaps;
            h
        };
        self.finish(q, k, heap.into_sorted())
    }

    /// A batch of queries (`nq * d`), each row's best `k`: the probed lists are scanned once
    /// per group of up to `MAX_QBS` queries of the batch that probe them (FAISS's batch
    /// order), so a code block is loaded once for the group.
    fn search_batch(&self, queries: &[f32], k: usize) -> Vec<Vec<Cand>> {
        let d = self.pq.dim();
        let nq = queries.len() / d;
        let c = self.pool_size(k);
        // One parallel region: each task probes (one GEMM), prepares and scans its own
        // queries (a small batch on two threads spent as long waking the pool for three
        // regions as scanning). Inside a task, lists are scanned for the task's queries that
        // probe them.
        let per_task = nq
            .div_ceil(rayon::current_num_threads() * 2)
            .clamp(16, 1024);
        queries
            .par_chunks(per_task * d)
            .flat_map_iter(|qs| {
                let probes = self.coarse.probe_rows(qs, self.nprobe);
                let preps: Vec<QueryPrep> = qs.chunks(d).map(|q| self.prepare(q)).collect();
                let mut by_list: Vec<Vec<(usize, f32)>> = Vec::new();
                let mut touched: Vec<usize> = Vec::new();
                for (local, probes) in probes.iter().enumerate() {
                    for &(coarse, l) in probes {
                        let l = l as usize;
                        if self.lists[l].live() == 0 {
                            continue;
                        }
                        if by_list.len() <= l {
                            by_list.resize(self.nlist(), Vec::new());
                        }
                        if by_list[l].is_empty() {
                            touched.push(l);
                        }
                        by_list[l].push((local, coarse));
                    }
                }
                touched.sort_unstable();
                let mut heaps: Vec<TopK<Cand>> = preps.iter().map(|_| TopK::new(c)).collect();
                let mut scratch = ListScratch::default();
                let mut slots: Vec<LutSlot> = (0..MAX_QBS).map(|_| LutSlot::default()).collect();
                let mut members = Vec::with_capacity(MAX_QBS);
                for &l in &touched {
                    for group in by_list[l].chunks(MAX_QBS) {
                        members.clear();
                        members.extend(group.iter().map(|&(local, _)| local));
                        let tables: Vec<(&QuantizedLut, f32)> = group
                            .iter()
                            .zip(slots.iter_mut())
                            .map(|(&(local, coarse), slot)| {
                                self.list_table(&preps[local], l, coarse, slot)
                            })
                            .collect();
                        self.scan_list_group(l, &tables, &mut heaps, &members, &mut scratch);
                    }
                }
                heaps
                    .into_iter()
                    .zip(qs.chunks(d))
                    .map(|(h, q)| self.finish(q, k, h.into_sorted()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

/// The IVF result handler of one probed list ([`Scan::blocks`]): sum `i` of the list is the
/// candidate `ids[i]` (`-1`: removed) with float score `bias + lut.score(sum)`, offered to its
/// query's [`TopK`].
struct ListHandler<'a> {
    list: u32,
    ids: &'a [i64],
    /// Vectors in the list (the last block's padding is past it).
    n: usize,
    /// Per query of the group: its table and the bias of its float scores in this list.
    tables: &'a [(&'a QuantizedLut, f32)],
    heaps: &'a mut [TopK<Cand>],
    /// `heaps[members[j]]` is query `j`'s.
    members: &'a [usize],
    /// Per query, the chunk's u16 floor (set by `thresholds`); `None`: offer every sum.
    floors: [Option<u16>; MAX_QBS],
    live: &'a mut Vec<u16>,
    /// Finds the sums above a floor where the kernel gave no mask.
    kernel: &'a FastScanKernel,
    marked: &'a mut Vec<u32>,
}

impl ListHandler<'_> {
    /// A u16 floor below every sum of table `lut` (scores offset by `bias`) whose float score
    /// can beat `worst` (one step of margin for the float conversion's rounding); `None`
    /// when every sum may.
    #[inline]
    fn floor_for(worst: &Cand, lut: &QuantizedLut, bias: f32) -> Option<u16> {
        let x = (worst.score - bias - lut.bias) / lut.delta;
        (x >= 2.0).then(|| (x.floor() as f64 - 1.0).min(65_535.0) as u16)
    }
}

impl ScanHandler for ListHandler<'_> {
    /// Per query, [`ListHandler::floor_for`] its heap's worst; 0 (and every sum offered)
    /// while the heap is not full.
    fn thresholds(&mut self, out: &mut [u16]) -> bool {
        for (j, ((lut, bias), &h)) in self.tables.iter().zip(self.members).enumerate() {
            self.floors[j] = self.heaps[h]
                .worst()
                .and_then(|worst| Self::floor_for(&worst, lut, *bias));
            out[j] = self.floors[j].unwrap_or(0);
        }
        true
    }

    fn chunk(&mut self, base: usize, nb: usize, sums: &[u16], masks: &[u32]) {
        let valid = (self.n - base).min(nb * BBS);
        let ids = &self.ids[base..base + valid];
        for (j, ((lut, bias), &h)) in self.tables.iter().zip(self.members).enumerate() {
            let (lut, bias) = (*lut, *bias);
            let heap = &mut self.heaps[h];
            let sums = of_query(sums, j, nb * BBS);
            // A heap that is not full (the first lists of a query) took every score from
            // the kernel: the chunk's own cap-th best live sum bounds what can enter.
            let cut = match self.floors[j] {
                None if !heap.is_reservoir() => chunk_floor(self.live, sums, ids, heap.cap()),
                _ => None,
            };
            // The floor follows the heap through the chunk: once a candidate enters, the sums
            // that can no longer beat the new worst are skipped before any float is made.
            // (-1: every sum is offered.)
            let as_floor = |f: Option<u16>| f.map_or(-1, i32::from);
            let mut floor = as_floor(self.floors[j]).max(as_floor(cut));
            let first_floor = floor;
            let list = self.list;
            let mut offer = |i: usize| {
                let (s, id) = (sums[i], ids[i]);
                if i32::from(s) <= floor || id < 0 {
                    return;
                }
                let cand = Cand {
                    score: bias + lut.score(s),
                    id,
                    list,
                    offset: (base + i) as u32,
                };
                heap.push(cand);
                if let Some(worst) = heap.worst() {
                    floor = floor.max(as_floor(Self::floor_for(&worst, lut, bias)));
                }
            };
            if self.floors[j].is_none() {
                // No mask from the kernel (its threshold was 0): with a cut, the sums above
                // it are found in SIMD first; `offer` skips the others anyway.
                match u16::try_from(first_floor) {
                    Ok(f) => {
                        self.marked.clear();
                        self.kernel.collect_above(&sums[..valid], f, 0, self.marked);
                        self.marked.iter().for_each(|&i| offer(i as usize));
                    }
                    Err(_) => (0..valid).for_each(&mut offer),
                }
                continue;
            }
            for_each_marked(of_query(masks, j, nb), valid, offer);
        }
    }
}

/// For a heap of `cap` that is not full: a u16 floor such that no sum of this chunk at or
/// below it can be among the best `cap` (at least `cap` live sums of the chunk are higher by
/// more than one step, the margin for the float conversion's rounding); `None` when the
/// chunk holds `cap` live sums or fewer.
fn chunk_floor(live: &mut Vec<u16>, sums: &[u16], ids: &[i64], cap: usize) -> Option<u16> {
    // Copied without a branch or a push per sum (a removed vector, id < 0, is overwritten
    // by the next): an `extend` over a filter kept its count in memory, one store-forwarding
    // round trip per sum, and was a tenth of a batch search.
    let n = sums.len().min(ids.len());
    live.resize(n, 0);
    let mut kept = 0;
    for (&s, &id) in sums[..n].iter().zip(&ids[..n]) {
        live[kept] = s;
        kept += usize::from(id >= 0);
    }
    live.truncate(kept);
    if live.len() <= cap || cap == 0 {
        return None;
    }
    let (_, &mut kth, _) = live.select_nth_unstable_by(cap - 1, |a, b| b.cmp(a));
    // Offer sums > kth - 2, i.e. >= kth - 1.
    kth.checked_sub(2)
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
        self.coarse.train(x, &self.train_config)?;
        let labels = self.coarse.assign(x);
        let mut enc = x.to_vec();
        self.to_encoded(&mut enc, &labels);
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
        self.run(|| {
            let rows = if nq >= BATCH_MIN_QUERIES {
                self.search_batch(queries, k)
            } else {
                let parallel_lists = nq < rayon::current_num_threads();
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
