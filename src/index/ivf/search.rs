//! Search of [`IndexIVFPQFastScan`]: per query the probed lists' tables, one pass of the
//! shared block loop ([`Scan::blocks`]) per list and group of queries with [`ListHandler`]
//! as its result handler, then the exact re-rank. Batches run in parallel over tasks of
//! queries, each task list by list with every query's best list first
//! ([`IndexIVFPQFastScan::search_task`]); a few queries run on the caller's thread, or over
//! their lists in parallel when those hold enough codes
//! ([`IndexIVFPQFastScan::threads_for_few`]).

use super::IndexIVFPQFastScan;
use crate::error::{Error, Result};
use crate::index::scan::{self, of_query, Chunking, Scan, ScanHandler, CHUNK_BLOCKS};
use crate::index::{check_k, check_vectors, for_each_marked, Index};
use crate::metric::Metric;
use crate::pq::lut::QuantizedLut;
use crate::select::TopK;
use pqcache_simd::fastscan::{FastScanKernel, BBS, MAX_QBS};
use pqcache_simd::lut::blocked_len;
use rayon::prelude::*;
use std::cmp::Ordering;

/// From this many queries on, a search scans each list once per group of queries.
pub(super) const BATCH_MIN_QUERIES: usize = 8;

/// The most queries one task of a batch search scans (its probes sorted by list).
const MAX_TASK_QUERIES: usize = 1024;

/// A one-thread batch whose coarse scores and table material take at most this many bytes is
/// scanned as one task (half this core's L2).
const TASK_CACHE_BYTES: usize = 1 << 20;

/// The most bytes of coarse scores and table material one task of a batch search holds.
const TASK_MAX_BYTES: usize = 256 << 20;

/// The table material of a task's queries: one u8 table a query, or (L2 with residuals) the
/// `q . r_jc` terms from which each list's table is built, every query's in one array (query
/// `i`'s at `[i * stride, (i + 1) * stride)`, `stride = blocked_len(m)`), in the table
/// kernel's blocked layout (as the lists' precomputed terms).
enum Preps {
    Shared(Vec<QuantizedLut>),
    ResidualL2 {
        dots: Vec<f32>,
        norms: Vec<f32>,
        stride: usize,
    },
}

/// One query's part of [`Preps`].
#[derive(Clone, Copy)]
enum QueryPrep<'a> {
    Shared(&'a QuantizedLut),
    ResidualL2 { dots: &'a [f32], norm: f32 },
}

impl Preps {
    /// Query `i`'s material.
    fn query(&self, i: usize) -> QueryPrep<'_> {
        match self {
            Preps::Shared(luts) => QueryPrep::Shared(&luts[i]),
            Preps::ResidualL2 {
                dots,
                norms,
                stride,
            } => QueryPrep::ResidualL2 {
                dots: &dots[i * stride..(i + 1) * stride],
                norm: norms[i],
            },
        }
    }
}

/// The map of one table's u16 sums back to float scores in one list: `bias + (lut_bias +
/// delta * sum)`, [`QuantizedLut::score`] offset by the list's `bias`.
#[derive(Clone, Copy, Debug)]
struct TableScale {
    delta: f32,
    lut_bias: f32,
    bias: f32,
}

impl TableScale {
    #[inline(always)]
    fn score(&self, sum: u16) -> f32 {
        self.bias + (self.lut_bias + self.delta * sum as f32)
    }
}

/// The tables of the queries of a group that scan one list: side by side, as the block loop
/// reads them (a per-list table is quantized in place), with each one's scale.
#[derive(Default)]
struct GroupTables {
    /// The tables in its first `scales.len()` table lengths; the rest is stale, kept so that
    /// a table is written without zeroing its place first.
    bytes: Vec<u8>,
    scales: Vec<TableScale>,
    /// Scratch of the table kernel.
    mins: Vec<f32>,
    /// The per-list terms of list `terms_of`, when the index keeps none in memory.
    terms: Vec<f32>,
    terms_of: Option<usize>,
}

impl GroupTables {
    fn clear(&mut self) {
        self.scales.clear();
    }

    /// The place of the next table, of `len` bytes (every table of a group has the same),
    /// and the kernel's scratch.
    fn next_table(&mut self, len: usize) -> (&mut [u8], &mut Vec<f32>) {
        let at = self.scales.len() * len;
        if self.bytes.len() < at + len {
            self.bytes.resize(at + len, 0);
        }
        (&mut self.bytes[at..at + len], &mut self.mins)
    }

    /// The tables, side by side, each `len` bytes.
    fn tables(&self, len: usize) -> &[u8] {
        &self.bytes[..self.scales.len() * len]
    }
}

/// Buffers reused across list scans.
#[derive(Default)]
struct ListScratch {
    scan: scan::ScanScratch,
    /// A chunk's live sums, for [`chunk_floor`].
    live: Vec<u16>,
    /// The offsets of a chunk's sums above a query's floor.
    marked: Vec<u32>,
}

/// A candidate: float score, id, and where it lives.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cand {
    pub(super) score: f32,
    pub(super) id: i64,
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

impl IndexIVFPQFastScan {
    pub(super) fn check_search(&self, queries: &[f32], k: usize) -> Result<usize> {
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

    /// What the queries `qs` (`nq * d`) need to build the table of any list they probe.
    fn prepare(&self, qs: &[f32]) -> Preps {
        let d = self.pq.dim();
        if self.residual_l2_terms() {
            // L2 with residuals: q . r_jc for every (j, c), shared by the lists.
            let stride = blocked_len(self.pq.m());
            let mut dots = Vec::with_capacity(qs.len() / d * stride);
            for q in qs.chunks(d) {
                self.pq.dots_blocked(q, &self.kernels, &mut dots);
            }
            let norms = qs.chunks(d).map(crate::linalg::norm_sq).collect();
            Preps::ResidualL2 {
                dots,
                norms,
                stride,
            }
        } else {
            Preps::Shared(qs.chunks(d).map(|q| self.table(q)).collect())
        }
    }

    /// Appends to `group` the table of list `l` for a prepared query with coarse score
    /// `coarse`, and its scale with the bias added to every float score of the list.
    fn push_list_table(&self, group: &mut GroupTables, prep: QueryPrep, l: usize, coarse: f32) {
        let m = self.pq.m();
        let scale = match prep {
            // Inner product with residuals: q . x = q . c_l + q . r.
            QueryPrep::Shared(lut) => {
                group
                    .next_table(lut.table.len())
                    .0
                    .copy_from_slice(&lut.table);
                TableScale {
                    delta: lut.delta,
                    lut_bias: lut.bias,
                    bias: if self.by_residual { coarse } else { 0.0 },
                }
            }
            QueryPrep::ResidualL2 { dots, norm } => {
                // -||q - c_l - r||² = -||q - c_l||² + sum_j (2 q_j . r_jc - term_ljc), and
                // -||q - c_l||² = coarse - ||q||².
                let stride = blocked_len(m);
                let mut made = std::mem::take(&mut group.terms);
                let pre = if self.precomputed.is_empty() {
                    if group.terms_of != Some(l) {
                        made.clear();
                        self.list_terms(l, &mut made);
                        group.terms_of = Some(l);
                    }
                    &made[..]
                } else {
                    &self.precomputed[l * stride..(l + 1) * stride]
                };
                let (table, mins) = group.next_table((m + m % 2) * 16);
                let (delta, lut_bias) =
                    crate::pq::lut::quantize_residual_blocked(dots, pre, mins, table);
                group.terms = made;
                TableScale {
                    delta,
                    lut_bias,
                    bias: coarse - norm,
                }
            }
        };
        group.scales.push(scale);
    }

    /// Scans list `l` once for a group of up to `MAX_QBS` queries: table `j` of `group`
    /// belongs to the query whose heap is `heaps[members[j]]`. Each query's kernel threshold
    /// is its heap's floor, so blocks no query can use are skipped in-kernel.
    fn scan_list_group(
        &self,
        l: usize,
        group: &GroupTables,
        heaps: &mut [TopK<Cand>],
        members: &[usize],
        scratch: &mut ListScratch,
    ) {
        let list = &self.lists[l];
        let scan = Scan {
            kernel: &self.scan,
            block_bytes: list.codes.block_bytes(),
            m2: list.codes.m2(),
            tables: group.tables(list.codes.m2() * 16),
            nq: group.scales.len(),
        };
        let mut handler = ListHandler {
            list: l as u32,
            // One slice for the whole scan (a mapped id array resolves its view once).
            ids: list.ids.as_slice(),
            n: list.len(),
            scales: &group.scales,
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
            let scored = crate::index::rerank(where_, k, |(_, list, offset)| {
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
    pub(super) fn search_one(&self, q: &[f32], k: usize, parallel_lists: bool) -> Vec<Cand> {
        let probes = self.coarse.probe(&self.kernels, q, self.nprobe);
        let c = self.pool_size(k);
        let preps = self.prepare(q);
        let prep = preps.query(0);
        let scan_probe = |heaps: &mut [TopK<Cand>],
                          scratch: &mut (ListScratch, GroupTables),
                          &(coarse, l): &(f32, u32)| {
            let l = l as usize;
            if self.lists[l].live() == 0 {
                return;
            }
            let (scan, group) = scratch;
            group.clear();
            self.push_list_table(group, prep, l, coarse);
            self.scan_list_group(l, group, heaps, &[0], scan);
        };
        let heap = if parallel_lists && probes.len() > 1 {
            // One share of the probes per thread, strided (share t takes ranks t, t + T, ..),
            // so that each starts from one of the best lists and the shares cost about the
            // same; a heap per share, merged. (A `fold` over the probes started a fresh heap
            // and scratch at each of rayon's splits: slower on two threads than on one, even
            // over 2.9 MB of codes.)
            let shares = rayon::current_num_threads().min(probes.len());
            (0..shares)
                .into_par_iter()
                .map(|t| {
                    let mut heaps = [TopK::new(c)];
                    let mut scratch = Default::default();
                    for p in probes.iter().skip(t).step_by(shares) {
                        scan_probe(&mut heaps, &mut scratch, p);
                    }
                    let [h] = heaps;
                    h
                })
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
    pub(super) fn search_batch(&self, queries: &[f32], k: usize, threads: usize) -> Vec<Vec<Cand>> {
        let d = self.pq.dim();
        let nq = queries.len() / d;
        // One parallel region: each task probes (one GEMM), prepares and scans its own
        // queries (a small batch on two threads spent as long waking the pool for three
        // regions as scanning).
        // A task holds each of its queries' coarse scores and table material at once: fewer
        // queries a task where those would pass TASK_MAX_BYTES (nlist up to 2^24, or m up to
        // d, could ask for tens of GB).
        // On one thread a batch whose material fits TASK_CACHE_BYTES is one task: the more
        // queries a task holds, the more of them share each list's code loads (100 queries,
        // one task instead of two: bigann-10k at nprobe 4 / 16 1.93 / 4.79 -> 1.85 / 4.44
        // us/query, Fashion-MNIST at nprobe 8 14.4 -> 13.1). Larger batches are halved: as
        // one task of 1,000 queries, Gemma at nprobe 64 and Fashion-MNIST at nprobe 32 ran
        // 4-7 % slower than as two.
        let per_query = 4 * (self.coarse.nlist() + blocked_len(self.pq.m()));
        let tasks = if threads == 1 && nq.saturating_mul(per_query) <= TASK_CACHE_BYTES {
            1
        } else {
            threads * 2
        };
        let per_task = nq
            .div_ceil(tasks)
            .clamp(16, MAX_TASK_QUERIES)
            .min((TASK_MAX_BYTES / per_query).max(1));
        if threads == 1 {
            return queries
                .chunks(per_task * d)
                .flat_map(|qs| self.search_task(qs, k))
                .collect();
        }
        queries
            .par_chunks(per_task * d)
            .flat_map_iter(|qs| self.search_task(qs, k))
            .collect()
    }

    /// One task of [`Self::search_batch`]. Its queries' probes are scanned list by list, in
    /// two passes: first every query's best list (coarse rank 0), then the rest. Lists in
    /// list order share code loads between queries but reach each query in no useful order;
    /// the first pass fills every heap from the list likeliest to hold its best vectors, so
    /// the floors of the second are tight from its first block (bigann-10k at nprobe 16:
    /// 7.3 to 6.1 us/query; the results are the same in any order).
    fn search_task(&self, qs: &[f32], k: usize) -> Vec<Vec<Cand>> {
        let d = self.pq.dim();
        let nq = qs.len() / d;
        // Every row's probes, `np` of them a row (a task has at least one query).
        let probes = self.coarse.probe_rows(qs, self.nprobe);
        let probes: Vec<&[(f32, u32)]> = probes.chunks(probes.len() / nq).collect();
        let preps = self.prepare(qs);
        let c = self.pool_size(k);
        let mut heaps: Vec<TopK<Cand>> = (0..nq).map(|_| TopK::new(c)).collect();
        let mut scratch = ListScratch::default();
        let mut tables = GroupTables::default();
        // (list, query, coarse rank) packed so that sorting groups a list's probes, in
        // query order: list << 40 | query << 24 | rank (list and rank < MAX_NLIST = 2^24, a
        // task's query < MAX_TASK_QUERIES).
        debug_assert!(nq <= MAX_TASK_QUERIES && crate::limits::MAX_NLIST <= 1 << 24);
        let mut order: Vec<u64> = Vec::with_capacity(nq * self.nprobe);
        let mut members = Vec::with_capacity(MAX_QBS);
        for ranks in [0..1, 1..usize::MAX] {
            order.clear();
            for (query, probes) in probes.iter().enumerate() {
                let take = probes.len().min(ranks.end);
                for (rank, &(_, l)) in probes.iter().enumerate().take(take).skip(ranks.start) {
                    if self.lists[l as usize].live() > 0 {
                        order.push(u64::from(l) << 40 | (query as u64) << 24 | rank as u64);
                    }
                }
            }
            order.sort_unstable();
            for run in order.chunk_by(|a, b| a >> 40 == b >> 40) {
                let l = (run[0] >> 40) as usize;
                for group in run.chunks(MAX_QBS) {
                    members.clear();
                    tables.clear();
                    for &e in group {
                        let query = (e >> 24 & 0xffff) as usize;
                        let coarse = probes[query][(e & 0xff_ffff) as usize].0;
                        self.push_list_table(&mut tables, preps.query(query), l, coarse);
                        members.push(query);
                    }
                    self.scan_list_group(l, &tables, &mut heaps, &members, &mut scratch);
                }
            }
        }
        heaps
            .into_iter()
            .zip(qs.chunks(d))
            .map(|(h, q)| self.finish(q, k, h.into_sorted()))
            .collect()
    }

    /// How many threads a search may use: the index's pool's, or the caller's.
    pub(super) fn threads(&self) -> usize {
        match &self.pool {
            Some(pool) => pool.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Threads for a search of `nq < BATCH_MIN_QUERIES` queries: one (the caller's) when
    /// their probed lists hold, on average, fewer than `parallel_min_code_bytes` of codes
    /// ([`super::PARALLEL_MIN_CODE_BYTES`]).
    pub(super) fn threads_for_few(&self, nq: usize) -> usize {
        let nlist = self.nlist().max(1);
        let per_query = (self.ntotal / nlist).saturating_mul(self.nprobe.clamp(1, nlist));
        let bytes = per_query
            .saturating_mul(nq)
            .saturating_mul(self.pq.m().div_ceil(2));
        if bytes < self.parallel_min_code_bytes {
            1
        } else {
            self.threads()
        }
    }

    /// Runs `f` on the index's pool (if it has one) when `threads > 1`; on one thread, on
    /// the caller's: handing a search to a pool's one worker and waking the caller after
    /// cost 20-50 us per call here, more than a one-query search takes.
    pub(super) fn run<R: Send>(&self, threads: usize, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) if threads > 1 => pool.install(f),
            _ => f(),
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
    /// Per query of the group: the scale of its table's sums in this list.
    scales: &'a [TableScale],
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
    /// A u16 floor below every sum of a table with scale `t` whose float score can beat
    /// `worst` (one step of margin for the float conversion's rounding); `None` when every
    /// sum may.
    #[inline]
    fn floor_for(worst: &Cand, t: &TableScale) -> Option<u16> {
        let x = (worst.score - t.bias - t.lut_bias) / t.delta;
        // floor(x) - 1 capped at u16::MAX: for x >= 2 the truncating (saturating) cast is
        // the floor; `f32::floor` is a libm call on baseline x86-64 (no SSE4.1 `roundss`),
        // 2 % of a batch search.
        (x >= 2.0).then(|| ((x as u32) - 1).min(65_535) as u16)
    }
}

impl ScanHandler for ListHandler<'_> {
    /// Per query, [`ListHandler::floor_for`] its heap's worst; 0 (and every sum offered)
    /// while the heap is not full.
    fn thresholds(&mut self, out: &mut [u16]) -> bool {
        for (j, (t, &h)) in self.scales.iter().zip(self.members).enumerate() {
            self.floors[j] = self.heaps[h]
                .worst()
                .and_then(|worst| Self::floor_for(&worst, t));
            out[j] = self.floors[j].unwrap_or(0);
        }
        true
    }

    fn chunk(&mut self, base: usize, nb: usize, sums: &[u16], masks: &[u32]) {
        let valid = (self.n - base).min(nb * BBS);
        let ids = &self.ids[base..base + valid];
        for (j, (&t, &h)) in self.scales.iter().zip(self.members).enumerate() {
            let heap = &mut self.heaps[h];
            let sums = of_query(sums, j, nb * BBS);
            // A heap that is not full (the first lists of a query) took every score from
            // the kernel: the chunk's own cap-th best live sum bounds what can enter.
            let cut = match self.floors[j] {
                None if !heap.is_reservoir() => {
                    chunk_floor(self.kernel, self.live, sums, ids, heap.cap())
                }
                _ => None,
            };
            // The floor follows the heap through the chunk: once a candidate enters, the sums
            // that can no longer beat the new worst are skipped before any float is made.
            // (-1: every sum is offered.)
            let floor = as_floor(self.floors[j]).max(as_floor(cut));
            let mut offer = Offer {
                heap,
                sums,
                ids,
                scale: t,
                list: self.list,
                base,
                floor,
            };
            if self.floors[j].is_none() {
                // No mask from the kernel (its threshold was 0): with a cut, the sums above
                // it are found in SIMD first; `offer` skips the others anyway.
                match u16::try_from(floor) {
                    Ok(f) => {
                        self.marked.clear();
                        self.kernel.collect_above(&sums[..valid], f, 0, self.marked);
                        self.marked.iter().for_each(|&i| offer.offer(i as usize));
                    }
                    Err(_) => (0..valid).for_each(|i| offer.offer(i)),
                }
                continue;
            }
            for_each_marked::<8>(of_query(masks, j, nb), valid, |i| offer.offer(i));
        }
    }
}

/// Offers one chunk's sums of one query to its heap, the u16 floor following the heap's worst.
/// A method, always inlined, rather than a closure: the closure, called from three loops, was
/// compiled out of line (a call per offered sum, 5 % of a batch search).
struct Offer<'h, 's> {
    heap: &'h mut TopK<Cand>,
    sums: &'s [u16],
    ids: &'s [i64],
    scale: TableScale,
    list: u32,
    /// The chunk's first position in the list.
    base: usize,
    /// Sums at or below it cannot enter (-1: every sum may).
    floor: i32,
}

impl Offer<'_, '_> {
    #[inline(always)]
    fn offer(&mut self, i: usize) {
        let (s, id) = (self.sums[i], self.ids[i]);
        if i32::from(s) <= self.floor || id < 0 {
            return;
        }
        let t = &self.scale;
        self.heap.push(Cand {
            score: t.score(s),
            id,
            list: self.list,
            offset: (self.base + i) as u32,
        });
        if let Some(worst) = self.heap.worst() {
            self.floor = self.floor.max(as_floor(ListHandler::floor_for(&worst, t)));
        }
    }
}

/// A u16 floor as [`Offer::floor`] holds it (`None`: -1, below every sum).
#[inline(always)]
fn as_floor(f: Option<u16>) -> i32 {
    f.map_or(-1, i32::from)
}

/// For a heap of `cap` that is not full: a u16 floor such that no sum of this chunk at or
/// below it can be among the best `cap` (at least `cap` live sums of the chunk are higher by
/// more than one step, the margin for the float conversion's rounding); `None` when the
/// chunk holds `cap` live sums or fewer.
fn chunk_floor(
    kernel: &FastScanKernel,
    live: &mut Vec<u16>,
    sums: &[u16],
    ids: &[i64],
    cap: usize,
) -> Option<u16> {
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
    // Offer sums > kth - 2, i.e. >= kth - 1, for the cap-th largest `kth`.
    kernel
        .below_rank(live, cap - 1)
        .and_then(|kth_less_one| kth_less_one.checked_sub(1))
}
