//! `IndexPQFastScan`: 4-bit product quantization scanned with u8 tables in SIMD registers.
//!
//! Per group of up to `qbs` (<= 4) queries:
//!
//! 1. **Tables**: the float ADC table of each query (scores to maximise: inner products, or
//!    negated squared distances) is quantized to u8 ([`QuantizedLut`]), keeping `delta` and
//!    `bias` to map u16 sums back to floats.
//! 2. **Scan**: the packed codes ([`PackedCodes`]) are scanned in chunks of `CHUNK_BLOCKS`
//!    blocks of 32 vectors by the fast-scan kernel (`pqcache_simd::fastscan`), which loads each
//!    block once for every query of the group; chunks run in parallel on the rayon pool.
//! 3. **Selection**, by the number of candidates `c` (`k`, or `k * rerank_factor`):
//!    `c * 32 <= ntotal`: a heap per query and chunk, fed only by blocks whose best score beats
//!    the heap threshold, merged at the end; otherwise (the attention case, k = 5-20 % of n)
//!    an `O(n)` radix select on the u16 scores (`select::select_topk_u16_segments`).
//! 4. **Re-ranking** (optional): the candidates are re-scored exactly against the original
//!    vectors (kept as f32 or f16), and the best `k` returned with exact distances.
//!
//! `add` encodes each vector (O(d * 16)) and appends its nibbles into the last block (O(m));
//! full blocks are never repacked. Memory: `ceil(n / 32) * 32 * m / 2` bytes of codes, plus the
//! originals if kept.

use super::flat::FlatStorage;
use super::scan::{
    Chunking, FloorHandler, HeapHandler, RowsHandler, Scan, ScanScratch, CHUNK_BLOCKS,
};
use super::{check_k, check_vectors, Index};
use crate::error::{Error, Result};
use crate::kmeans::KMeansConfig;
use crate::metric::Metric;
use crate::pq::lut::QuantizedLut;
use crate::pq::pack::PackedCodes;
use crate::pq::{Nbits, ProductQuantizer};
use crate::result::SearchResult;
use crate::select::{from_u16_key, select_topk_u16_segments, sort_u16_desc_stable, TopK};
use pqcache_simd::distance::DistanceKernels;
use pqcache_simd::fastscan::{FastScanKernel, BBS, MAX_QBS};
use pqcache_simd::Level;
use rayon::prelude::*;

/// Largest chunk of the single-threaded small-k scan (it starts at `CHUNK_BLOCKS` and doubles;
/// 64 blocks of 4 queries keep the score buffer, 16 KB, in L1).
const SEQUENTIAL_CHUNK_BLOCKS: usize = 64;

/// Large-k selection samples every `SAMPLE_STRIDE`-th block to place its score floor.
const SAMPLE_STRIDE: usize = 16;
/// The floor aims at `SAMPLE_SLACK * c + SAMPLE_EXTRA` survivors (sampling noise margin).
const SAMPLE_SLACK: f64 = 1.25;
/// See [`SAMPLE_SLACK`].
const SAMPLE_EXTRA: usize = 16;

/// Precision of the original vectors kept for re-ranking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RerankStorage {
    /// Keep f32 originals (4 bytes per dimension).
    F32,
    /// Keep f16 originals (2 bytes per dimension; the KV-cache case).
    F16,
}

/// A 4-bit fast-scan product-quantization index.
#[derive(Clone, Debug)]
pub struct IndexPQFastScan {
    pq: ProductQuantizer,
    metric: Metric,
    codes: PackedCodes,
    originals: Option<FlatStorage>,
    /// Re-rank the best `k * rerank_factor` candidates exactly (0 or 1: no re-ranking).
    /// Needs the originals ([`IndexPQFastScan::keep_originals`]).
    pub rerank_factor: usize,
    /// Queries scanned together (1..=4).
    pub qbs: usize,
    /// k-means settings used by `train`.
    pub train_config: KMeansConfig,
    scan: FastScanKernel,
    kernels: DistanceKernels,
}

impl IndexPQFastScan {
    /// An untrained index of `m` 4-bit sub-quantizers over `d` dimensions (`m` divides `d`,
    /// `m <= 256`).
    pub fn new(d: usize, m: usize, metric: Metric) -> Result<IndexPQFastScan> {
        let pq = ProductQuantizer::new(d, m, Nbits::Four)?;
        Self::with_quantizer(pq, metric)
    }

    /// An empty index over a 4-bit quantizer (trained or not).
    pub fn with_quantizer(pq: ProductQuantizer, metric: Metric) -> Result<IndexPQFastScan> {
        if pq.nbits() != Nbits::Four {
            return Err(Error::InvalidArgument(
                "fast-scan needs a 4-bit quantizer".into(),
            ));
        }
        Ok(IndexPQFastScan {
            codes: PackedCodes::new(pq.m())?,
            pq,
            metric,
            originals: None,
            rerank_factor: 0,
            qbs: MAX_QBS,
            train_config: KMeansConfig::default(),
            scan: FastScanKernel::best(),
            kernels: DistanceKernels::best(),
        })
    }

    /// Keeps the original vectors from now on, for exact re-ranking. Must be called while the
    /// index is empty.
    pub fn keep_originals(&mut self, storage: RerankStorage) -> Result<()> {
        if self.ntotal() > 0 {
            return Err(Error::InvalidArgument(
                "keep_originals must be called before add".into(),
            ));
        }
        self.originals = Some(match storage {
            RerankStorage::F32 => FlatStorage::F32(Default::default()),
            RerankStorage::F16 => FlatStorage::F16(Default::default()),
        });
        Ok(())
    }

    /// The quantizer.
    pub fn pq(&self) -> &ProductQuantizer {
        &self.pq
    }

    /// An index over stored parts (e.g. read from a file).
    pub(crate) fn from_parts(
        pq: ProductQuantizer,
        metric: Metric,
        codes: PackedCodes,
        originals: Option<FlatStorage>,
    ) -> Result<IndexPQFastScan> {
        if codes.m() != pq.m() {
            return Err(Error::InvalidArgument(format!(
                "codes of m = {} for a quantizer of m = {}",
                codes.m(),
                pq.m()
            )));
        }
        if let Some(o) = &originals {
            if o.len() != codes.ntotal() * pq.dim() {
                return Err(Error::InvalidArgument(format!(
                    "{} stored values for {} vectors of d = {}",
                    o.len(),
                    codes.ntotal(),
                    pq.dim()
                )));
            }
        }
        let mut idx = Self::with_quantizer(pq, metric)?;
        idx.codes = codes;
        idx.originals = originals;
        Ok(idx)
    }

    /// The kept original vectors, if any.
    pub fn originals(&self) -> Option<&FlatStorage> {
        self.originals.as_ref()
    }

    /// The packed codes.
    pub fn packed_codes(&self) -> &PackedCodes {
        &self.codes
    }

    /// The SIMD level the scan kernel was resolved for.
    pub fn level(&self) -> Level {
        self.scan.level()
    }

    /// Forces the scan kernel's level (capped at what the CPU supports): for tests and benches.
    pub fn set_level(&mut self, level: Level) {
        self.scan = FastScanKernel::for_level(level);
    }

    /// Appends to `out` every index `i` of `scores` with `scores[i] > threshold`, ascending
    /// (the SIMD filter of this index's kernel level), e.g. over a row of
    /// [`IndexPQFastScan::scan_scores`].
    pub fn collect_above(&self, scores: &[u16], threshold: u16, out: &mut Vec<u32>) {
        self.scan.collect_above(scores, threshold, 0, out);
    }

    /// The quantized table of one query (`d` floats).
    pub fn quantized_lut(&self, q: &[f32]) -> QuantizedLut {
        let (m, m2) = (self.pq.m(), self.codes.m2());
        let mut lut = vec![0.0f32; m * 16];
        self.pq.compute_lut(q, self.metric, &self.kernels, &mut lut);
        if self.metric == Metric::L2 {
            lut.iter_mut().for_each(|v| *v = -*v);
        }
        QuantizedLut::new(&lut, m, m2)
    }

    fn check_search(&self, queries: &[f32]) -> Result<usize> {
        if !self.pq.is_trained() {
            return Err(Error::NotTrained);
        }
        let nq = check_vectors(queries, self.pq.dim(), "queries")?;
        if self.ntotal() == 0 {
            return Err(Error::EmptyIndex);
        }
        Ok(nq)
    }

    /// Every approximate score: `out[q * ntotal + i]` is the u16 fast-scan sum of query `q`
    /// against vector `i` (higher is better); the returned tables map a sum back to a float
    /// score ([`QuantizedLut::score`]: inner product, or negated squared distance). `out` must
    /// hold `nq * ntotal` values. For callers that aggregate scores across queries (the
    /// attention client sums softmaxes over a GQA group).
    pub fn scan_scores(&self, queries: &[f32], out: &mut [u16]) -> Result<Vec<QuantizedLut>> {
        let nq = self.check_search(queries)?;
        let n = self.ntotal();
        if out.len() != nq * n {
            return Err(Error::DimensionMismatch {
                expected: nq * n,
                got: out.len(),
            });
        }
        let d = self.pq.dim();
        let m2 = self.codes.m2();
        let span = CHUNK_BLOCKS * BBS;
        let mut tables = Vec::with_capacity(nq);
        if rayon::current_num_threads() == 1 && n.is_multiple_of(BBS) {
            // One kernel call per query group over every block, straight into `out`: with
            // whole blocks the kernel's query-major layout is exactly `out`'s rows.
            let nb = self.codes.nblocks();
            let mut masks = Vec::new();
            for (group, rows) in queries.chunks(MAX_QBS * d).zip(out.chunks_mut(MAX_QBS * n)) {
                let luts: Vec<QuantizedLut> =
                    group.chunks(d).map(|q| self.quantized_lut(q)).collect();
                let gq = luts.len();
                masks.resize(gq * nb, 0u32);
                self.scan.accumulate(
                    self.codes.data(),
                    nb,
                    m2,
                    &concat_tables(&luts),
                    gq,
                    &[u16::MAX; MAX_QBS][..gq],
                    rows,
                    &mut masks,
                );
                tables.extend(luts);
            }
            return Ok(tables);
        }
        for (group, rows) in queries.chunks(MAX_QBS * d).zip(out.chunks_mut(MAX_QBS * n)) {
            let luts: Vec<QuantizedLut> = group.chunks(d).map(|q| self.quantized_lut(q)).collect();
            let bytes = concat_tables(&luts);
            let gq = luts.len();
            // Per chunk of blocks, the disjoint pieces of every query's row it fills; the
            // kernel writes into a small per-task buffer, copied into the pieces.
            let mut pieces: Vec<Vec<&mut [u16]>> = (0..self.codes.nblocks().div_ceil(CHUNK_BLOCKS))
                .map(|_| Vec::with_capacity(gq))
                .collect();
            for row in rows.chunks_mut(n) {
                for (c, piece) in row.chunks_mut(span).enumerate() {
                    pieces[c].push(piece);
                }
            }
            let scan = self.scan_of(&bytes, gq);
            pieces
                .into_par_iter()
                .zip(scan.tasks(self.codes.data()))
                .for_each_init(ScanScratch::default, |scratch, (mut rows, (ci, chunk))| {
                    scan.task(ci, chunk, scratch, &mut RowsHandler { rows: &mut rows });
                });
            tables.extend(luts);
        }
        Ok(tables)
    }

    /// Scans every block for the group's tables into one buffer, chunk-major: chunk `c`
    /// holds `nq` query-major rows of `blocks_in_chunk * 32` scores, from `c * CHUNK * nq`.
    fn scan_chunks(&self, luts: &[QuantizedLut]) -> Vec<u16> {
        let bytes = concat_tables(luts);
        let (bb, m2, nq) = (self.codes.block_bytes(), self.codes.m2(), luts.len());
        let mut buf = vec![0u16; self.codes.nblocks() * BBS * nq];
        buf.par_chunks_mut(CHUNK_BLOCKS * BBS * nq)
            .zip(self.codes.data().par_chunks(CHUNK_BLOCKS * bb))
            .for_each(|(out, chunk)| {
                let nb = chunk.len() / bb;
                self.scan.accumulate_scores(chunk, nb, m2, &bytes, nq, out);
            });
        buf
    }

    /// Query `q`'s segments (one per chunk) of a [`IndexPQFastScan::scan_chunks`] buffer.
    fn segments<'a>(&self, buf: &'a [u16], nq: usize, q: usize) -> Vec<&'a [u16]> {
        buf.chunks(CHUNK_BLOCKS * BBS * nq)
            .map(|chunk| {
                let len = chunk.len() / nq;
                &chunk[q * len..(q + 1) * len]
            })
            .collect()
    }

    /// Top `c` candidates (u16 score, position) per query of a group, best first (ties to
    /// the smaller position).
    fn candidates(&self, luts: &[QuantizedLut], c: usize) -> Vec<Vec<(u16, u32)>> {
        let n = self.ntotal();
        let nq = luts.len();
        let bytes = concat_tables(luts);
        if c * 32 <= n {
            let scan = self.scan_of(&bytes, nq);
            let heaps = if rayon::current_num_threads() == 1 {
                // One thread: chunks in order with no fork-join, growing once the heaps have
                // settled (their thresholds then move little from one chunk to the next).
                let mut heaps = vec![TopK::new(c); nq];
                let chunking = Chunking {
                    first: CHUNK_BLOCKS,
                    max: SEQUENTIAL_CHUNK_BLOCKS,
                };
                let mut handler = HeapHandler {
                    heaps: &mut heaps,
                    n,
                };
                scan.blocks(
                    self.codes.data(),
                    0,
                    chunking,
                    &mut ScanScratch::default(),
                    &mut handler,
                );
                heaps
            } else {
                scan.tasks(self.codes.data())
                    .fold(
                        || (vec![TopK::new(c); nq], ScanScratch::default()),
                        |(mut heaps, mut scratch), (ci, chunk)| {
                            let mut handler = HeapHandler {
                                heaps: &mut heaps,
                                n,
                            };
                            scan.task(ci, chunk, &mut scratch, &mut handler);
                            (heaps, scratch)
                        },
                    )
                    .map(|(heaps, _)| heaps)
                    .reduce(
                        || vec![TopK::new(c); nq],
                        |mut a, b| {
                            for (x, y) in a.iter_mut().zip(b) {
                                x.merge(y);
                            }
                            a
                        },
                    )
            };
            heaps
                .into_iter()
                .map(|h| h.into_sorted().into_iter().map(from_u16_key).collect())
                .collect()
        } else {
            let floors = self.sample_floors(&bytes, nq, c);
            let found = self.collect_above_floors(&bytes, nq, &floors);
            let mut full_scan: Option<Vec<u16>> = None;
            (0..nq)
                .map(|q| {
                    if let Some(best) = select_above_floor(&found[q], c, floors[q]) {
                        return best;
                    }
                    // The sampled floor was too high (fewer than c scores above it): exact
                    // radix selection over every score.
                    let buf = full_scan.get_or_insert_with(|| self.scan_chunks(luts));
                    let segs = self.segments(buf, nq, q);
                    select_topk_u16_segments(&self.scan, &segs, CHUNK_BLOCKS * BBS, n, c)
                })
                .collect()
        }
    }

    /// Per query, a score floor expected to have a little more than `c` scores above it: the
    /// `(c / n)` quantile of the scores of every `SAMPLE_STRIDE`-th block, widened by
    /// `SAMPLE_SLACK`, minus one. A floor that turns out too high is detected by the caller.
    fn sample_floors(&self, bytes: &[u8], nq: usize, c: usize) -> [u16; MAX_QBS] {
        let (n, bb, m2) = (self.ntotal(), self.codes.block_bytes(), self.codes.m2());
        let blocks: Vec<usize> = (0..self.codes.nblocks()).step_by(SAMPLE_STRIDE).collect();
        let mut scores = vec![0u16; nq * BBS];
        let mut sample: Vec<Vec<u16>> = vec![Vec::with_capacity(blocks.len() * BBS); nq];
        for &b in &blocks {
            let block = &self.codes.data()[b * bb..(b + 1) * bb];
            self.scan
                .accumulate_scores(block, 1, m2, bytes, nq, &mut scores);
            let valid = BBS.min(n - b * BBS);
            for (q, s) in sample.iter_mut().enumerate() {
                s.extend_from_slice(&scores[q * BBS..q * BBS + valid]);
            }
        }
        let mut floors = [0u16; MAX_QBS];
        for (q, s) in sample.iter().enumerate() {
            let want = (c as f64 / n as f64 * s.len() as f64 * SAMPLE_SLACK).ceil() as usize
                + SAMPLE_EXTRA;
            if want < s.len() {
                let top = crate::select::select_topk_u16(s, s.len(), want);
                floors[q] = top.last().map_or(0, |&(v, _)| v.saturating_sub(1));
            }
        }
        floors
    }

    /// Per query, every (score, position) with score `> floors[q]`, in position order: one
    /// scan, the kernel's threshold masks pick the survivors.
    fn collect_above_floors(
        &self,
        bytes: &[u8],
        nq: usize,
        floors: &[u16; MAX_QBS],
    ) -> Vec<Vec<(u16, u32)>> {
        let n = self.ntotal();
        let scan = self.scan_of(bytes, nq);
        let floors = &floors[..nq];
        if rayon::current_num_threads() == 1 {
            // One thread: chunks in order, straight into one list per query (no per-chunk
            // lists to allocate and concatenate).
            let mut found: Vec<Vec<(u16, u32)>> = vec![Vec::new(); nq];
            let mut handler = FloorHandler {
                floors,
                found: &mut found,
                n,
            };
            let chunking = Chunking::fixed(SEQUENTIAL_CHUNK_BLOCKS);
            scan.blocks(
                self.codes.data(),
                0,
                chunking,
                &mut ScanScratch::default(),
                &mut handler,
            );
            return found;
        }
        let per_chunk: Vec<Vec<Vec<(u16, u32)>>> = scan
            .tasks(self.codes.data())
            .map_init(ScanScratch::default, |scratch, (ci, chunk)| {
                let mut found = vec![Vec::new(); nq];
                let mut handler = FloorHandler {
                    floors,
                    found: &mut found,
                    n,
                };
                scan.task(ci, chunk, scratch, &mut handler);
                found
            })
            .collect();
        (0..nq)
            .map(|q| {
                let total = per_chunk.iter().map(|chunk| chunk[q].len()).sum();
                let mut all = Vec::with_capacity(total);
                for chunk in &per_chunk {
                    all.extend_from_slice(&chunk[q]);
                }
                all
            })
            .collect()
    }

    /// The group's tables bound to this index's kernel and code layout.
    fn scan_of<'a>(&'a self, tables: &'a [u8], nq: usize) -> Scan<'a> {
        Scan {
            kernel: &self.scan,
            block_bytes: self.codes.block_bytes(),
            m2: self.codes.m2(),
            tables,
            nq,
        }
    }

    /// Searches one group of at most `MAX_QBS` queries into `dist` / `ids` (`g * k` each).
    fn search_group(&self, group: &[f32], k: usize, dist: &mut [f32], ids: &mut [i64]) {
        let d = self.pq.dim();
        let luts: Vec<QuantizedLut> = group.chunks(d).map(|q| self.quantized_lut(q)).collect();
        let rerank = self.rerank_factor > 1 && self.originals.is_some();
        let c = if rerank {
            crate::limits::rerank_pool(k, self.rerank_factor, self.ntotal())
        } else {
            k
        };
        let cands = self.candidates(&luts, c);
        for (qi, (cand, lut)) in cands.into_iter().zip(&luts).enumerate() {
            let (dist, ids) = (
                &mut dist[qi * k..(qi + 1) * k],
                &mut ids[qi * k..(qi + 1) * k],
            );
            match (&self.originals, rerank) {
                (Some(orig), true) => {
                    let q = &group[qi * d..(qi + 1) * d];
                    let scored = super::rerank(cand.iter().map(|&(_, p)| p), k, |p| {
                        let v = orig.metric_value(&self.kernels, self.metric, q, p as usize);
                        self.metric.to_score(v)
                    });
                    super::write_best(scored, self.metric, dist, ids);
                }
                // The candidates are the top k already, in order: straight into the result.
                _ => {
                    let best = cand.iter().map(|&(s, p)| (lut.score(s), p));
                    super::write_best(best, self.metric, dist, ids);
                }
            }
        }
    }
}

/// The tables of a query group, one after the other (the kernel's `luts` layout).
fn concat_tables(luts: &[QuantizedLut]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(luts.iter().map(|l| l.table.len()).sum());
    for l in luts {
        bytes.extend_from_slice(&l.table);
    }
    bytes
}

/// The best `c` of `found` (every score above `floor`, in position order), best first with
/// ties to the smaller position, by a counting sort over the score range above the floor;
/// `None` if fewer than `c` scores are above the floor.
fn select_above_floor(found: &[(u16, u32)], c: usize, floor: u16) -> Option<Vec<(u16, u32)>> {
    if found.len() < c {
        return None;
    }
    let mut sorted = sort_u16_desc_stable(found, floor);
    sorted.truncate(c);
    Some(sorted)
}

impl Index for IndexPQFastScan {
    fn dim(&self) -> usize {
        self.pq.dim()
    }
    fn ntotal(&self) -> usize {
        self.codes.ntotal()
    }
    fn metric(&self) -> Metric {
        self.metric
    }
    fn is_trained(&self) -> bool {
        self.pq.is_trained()
    }
    fn train(&mut self, x: &[f32]) -> Result<()> {
        self.pq.train(x, &self.train_config)
    }
    fn add(&mut self, x: &[f32]) -> Result<()> {
        crate::limits::check_capacity(self.ntotal(), x.len() / self.pq.dim().max(1))?;
        if let Some(orig) = &self.originals {
            check_vectors(x, self.pq.dim(), "vectors")?;
            orig.check(x, self.pq.dim())?;
        }
        // compute_codes answers NotTrained for an untrained quantizer.
        let codes = self.pq.compute_codes(x)?;
        for code in codes.chunks_exact(self.pq.m()) {
            self.codes.push(code)?;
        }
        if let Some(orig) = &mut self.originals {
            orig.extend(x);
        }
        Ok(())
    }
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        let nq = self.check_search(queries)?;
        check_k(k, self.ntotal())?;
        if self.rerank_factor > 1 && self.originals.is_none() {
            return Err(Error::InvalidArgument(
                "re-ranking needs the original vectors: call keep_originals before add".into(),
            ));
        }
        if !(1..=MAX_QBS).contains(&self.qbs) {
            return Err(Error::InvalidArgument(format!(
                "qbs must be in 1..={MAX_QBS}, got {}",
                self.qbs
            )));
        }
        let d = self.pq.dim();
        let mut res = SearchResult::empty(nq, k, self.metric);
        let g = self.qbs;
        if super::worth_parallel(nq.div_ceil(g)) {
            res.distances
                .par_chunks_mut(g * k)
                .zip(res.ids.par_chunks_mut(g * k))
                .zip(queries.par_chunks(g * d))
                .for_each(|((dist, ids), group)| self.search_group(group, k, dist, ids));
        } else {
            res.distances
                .chunks_mut(g * k)
                .zip(res.ids.chunks_mut(g * k))
                .zip(queries.chunks(g * d))
                .for_each(|((dist, ids), group)| self.search_group(group, k, dist, ids));
        }
        Ok(res)
    }
    fn reset(&mut self) {
        self.codes.clear();
        if let Some(o) = &mut self.originals {
            o.clear();
        }
    }
}
