//! Top-k selection over float scores (larger is better), without a full sort.
//!
//! Two strategies, chosen by [`select_topk`] from `k` and `n`:
//!
//! * **heap** (small k, the ANN case): [`TopK`], a binary heap of the `k` best so far with the
//!   worst at the root (a reservoir from 48 kept). Each new score is compared once with the
//!   root (the threshold) and rejected in the common case, so the cost is
//!   `O(n + k log k log(n / k))`.
//! * **quickselect** (large k, the attention case, k = 5-20 % of n): `select_nth_unstable` on
//!   (score, position) pairs, then a sort of the `k` survivors: `O(n + k log k)`.
//!
//! Order: higher score first; equal scores by smaller position. Scores are compared with
//! `f32::total_cmp`, so a NaN can never make the selection panic.
//!
//! Fast-scan scores are u16 and get an `O(n)` **radix select** for large k
//! ([`select_topk_u16_segments`]): a 256-bin histogram of the high bytes finds the bucket
//! holding the k-th score, a second histogram of that bucket's low bytes finds the k-th score
//! `T` itself; one pass collects every score above `T` and the first (smallest-position) ones
//! equal to `T`, and a counting sort over `T..=max` orders the survivors: `O(n + k + 2^16)`.

use pqcache_simd::fastscan::FastScanKernel;
use pqcache_simd::filter::FilterKernel;
use std::cmp::Ordering;

/// Below this ratio `n / k` the quickselect strategy is used.
const HEAP_MIN_RATIO: usize = 32;
/// Scores tested together against the heap threshold.
const FILTER_BLOCK: usize = 16;

/// The ranking order of (score, candidate) pairs: higher score first, then the smaller
/// candidate (a position, or an id).
#[inline(always)]
fn rank<C: Ord>(a: &(f32, C), b: &(f32, C)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// From this many kept candidates on (re-ranking pools, large k), [`TopK`] keeps a reservoir
/// instead of a binary heap.
const RESERVOIR_MIN: usize = 48;

/// The best `cap` candidates offered so far; a candidate's `Ord` is its rank (**greater is
/// better**, ties included: callers put the tie-break in the order, e.g. the smaller position).
/// The one top-k type of the crate: fast-scan sums and float scores as packed `u64` keys
/// ([`u16_key`], [`f32_key`]), IVF candidates as a struct.
///
/// Small `cap`: a binary min-heap, the worst kept candidate at the root, `O(log cap)` per
/// entering offer. From `RESERVOIR_MIN` on: a reservoir of up to `2 * cap` candidates; when
/// it fills, a selection keeps the best `cap` and the worst of them becomes the floor to beat
/// (FAISS's reservoir result handler): `O(1)` amortised per offer.
#[derive(Clone, Debug)]
pub struct TopK<T> {
    cap: usize,
    /// Heap mode: the min-heap. Reservoir mode: the unordered reservoir.
    items: Vec<T>,
    /// Reservoir mode: the worst kept candidate after the last compaction.
    floor: Option<T>,
}

impl<T: Ord + Copy> TopK<T> {
    /// An empty selection of at most `cap` candidates.
    pub fn new(cap: usize) -> TopK<T> {
        let room = if cap >= RESERVOIR_MIN { 2 * cap } else { cap };
        TopK {
            cap,
            items: Vec::with_capacity(room),
            floor: None,
        }
    }

    /// The number of candidates kept at most.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether it keeps a reservoir (`cap >= 48`) rather than a heap.
    #[inline(always)]
    pub fn is_reservoir(&self) -> bool {
        self.cap >= RESERVOIR_MIN
    }

    /// The candidate an offer must beat, once there is one (only better candidates can still
    /// enter; never for a capacity of 0, which takes nothing): the worst kept (heap), or the
    /// floor of the last compaction (reservoir).
    #[inline(always)]
    pub fn worst(&self) -> Option<T> {
        if self.is_reservoir() {
            self.floor
        } else if self.items.len() >= self.cap {
            self.items.first().copied()
        } else {
            None
        }
    }

    /// Offers a candidate. The common case, a candidate no better than the worst kept, is a
    /// comparison here; the insertion is out of line.
    #[inline(always)]
    pub fn push(&mut self, x: T) {
        let rejected = if self.is_reservoir() {
            self.floor.is_some_and(|f| x <= f)
        } else {
            self.items.len() >= self.cap && self.items.first().is_none_or(|&w| x <= w)
        };
        if !rejected {
            self.insert(x);
        }
    }

    /// [`TopK::push`] of a candidate that enters.
    #[inline(never)]
    fn insert(&mut self, x: T) {
        if self.is_reservoir() {
            self.items.push(x);
            if self.items.len() >= 2 * self.cap {
                self.compact();
            }
            return;
        }
        let heap = &mut self.items;
        if heap.len() < self.cap {
            heap.push(x);
            let mut i = heap.len() - 1;
            while i > 0 {
                let parent = (i - 1) / 2;
                if heap[parent] <= x {
                    break;
                }
                heap[i] = heap[parent];
                i = parent;
            }
            heap[i] = x;
        } else if self.cap > 0 && x > heap[0] {
            let n = heap.len();
            let mut i = 0;
            loop {
                let l = 2 * i + 1;
                if l >= n {
                    break;
                }
                let c = if l + 1 < n && heap[l + 1] < heap[l] {
                    l + 1
                } else {
                    l
                };
                if heap[c] >= x {
                    break;
                }
                heap[i] = heap[c];
                i = c;
            }
            heap[i] = x;
        }
    }

    /// Reservoir: keeps the best `cap`, the worst of them as the floor.
    fn compact(&mut self) {
        if self.items.len() > self.cap {
            self.items
                .select_nth_unstable_by(self.cap - 1, |a, b| b.cmp(a));
            self.items.truncate(self.cap);
        }
        if self.items.len() == self.cap {
            self.floor = self.items.iter().min().copied();
        }
    }

    /// Offers every candidate of `other`.
    pub fn merge(&mut self, other: TopK<T>) {
        for x in other.items {
            self.push(x);
        }
    }

    /// The kept candidates, best first.
    pub fn into_sorted(mut self) -> Vec<T> {
        if self.is_reservoir() {
            self.compact();
        }
        self.items.sort_unstable_by(|a, b| b.cmp(a));
        self.items
    }
}

impl TopK<u64> {
    /// Offers `scores[i]` at position `first + i`, as [`f32_key`]s, for every `i`: what
    /// [`select_topk`] does over a whole row, here for a row that comes a block at a time
    /// (the exact search's GEMM blocks). Positions must ascend across the calls, so that an
    /// equal score never displaces a kept one and a strict `>` against the threshold
    /// suffices.
    ///
    /// Until the selection has a threshold ([`TopK::worst`]) every score is offered; then
    /// blocks of 16 are first tested as a whole against it (a branch-free fold that the
    /// compiler vectorises): in the common case the whole block is rejected.
    pub fn push_f32_run(&mut self, scores: &[f32], first: u32) {
        let threshold_of = |t: &TopK<u64>| t.worst().map(|w| from_f32_key(w).0);
        let mut at = 0;
        while at < scores.len() && self.worst().is_none() {
            self.push(f32_key(scores[at], first + at as u32));
            at += 1;
        }
        let Some(mut threshold) = threshold_of(self) else {
            return;
        };
        let rest = &scores[at..];
        let mut base = first + at as u32;
        let mut blocks = rest.chunks_exact(FILTER_BLOCK);
        for block in &mut blocks {
            if block.iter().fold(false, |any, &s| any | (s > threshold)) {
                for (j, &s) in block.iter().enumerate() {
                    if s > threshold {
                        self.push(f32_key(s, base + j as u32));
                        threshold = threshold_of(self).unwrap_or(threshold);
                    }
                }
            }
            base += FILTER_BLOCK as u32;
        }
        for (j, &s) in blocks.remainder().iter().enumerate() {
            if s > threshold {
                self.push(f32_key(s, base + j as u32));
                threshold = threshold_of(self).unwrap_or(threshold);
            }
        }
    }
}

/// A fast-scan (u16 sum, position) as a [`TopK`] key: `score << 32 | !position`, so that the
/// greater key is the better pair (higher score, then smaller position).
#[inline(always)]
pub fn u16_key(score: u16, pos: u32) -> u64 {
    (u64::from(score) << 32) | u64::from(!pos)
}

/// The (score, position) of a [`u16_key`].
#[inline(always)]
pub fn from_u16_key(key: u64) -> (u16, u32) {
    ((key >> 32) as u16, !(key as u32))
}

/// A float (score, position) as a [`TopK`] key, ordered as `f32::total_cmp` then the smaller
/// position: the score's bits mapped to an unsigned integer of the same total order.
#[inline(always)]
pub fn f32_key(score: f32, pos: u32) -> u64 {
    (u64::from(ordered_bits(score)) << 32) | u64::from(!pos)
}

/// The bits of `score` as an unsigned integer in `f32::total_cmp`'s order: negative scores
/// have every bit flipped, the others the sign bit set (without a branch, so that it
/// vectorises in [`select_topk_bounded`]'s block maxima).
#[inline(always)]
pub fn ordered_bits(score: f32) -> u32 {
    let b = score.to_bits();
    b ^ ((((b as i32) >> 31) as u32) | 0x8000_0000)
}

/// The (score, position) of an [`f32_key`] (bit-exact: NaN payloads and -0.0 survive).
#[inline(always)]
pub fn from_f32_key(key: u64) -> (f32, u32) {
    let ordered = (key >> 32) as u32;
    // The inverse of `ordered_bits`, branch-free as it is: a set top bit (a non-negative
    // score) clears it, a clear one flips every bit.
    let b = ordered ^ (!(((ordered as i32) >> 31) as u32) | 0x8000_0000);
    (f32::from_bits(b), !(key as u32))
}

/// The `k` best (score, position) pairs of `scores`, best first. `k` is clamped to `n`.
pub fn select_topk(scores: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut out = Vec::new();
    select_topk_into(scores, k, &mut SelectScratch::default(), &mut out);
    out
}

/// The buffers of [`select_topk_into`], reused from row to row.
#[derive(Default)]
pub struct SelectScratch {
    keys: Vec<u64>,
    maxima: Vec<f32>,
    at: Vec<u32>,
}

/// [`select_topk`] appending to `out`, with its buffers in `scratch`: a row of many (an IVF
/// batch's coarse probes) allocates nothing once the buffers have grown (the four
/// allocations of a row were half of a bigann-10k batch's, nprobe 4).
pub fn select_topk_into(
    scores: &[f32],
    k: usize,
    scratch: &mut SelectScratch,
    out: &mut Vec<(f32, u32)>,
) {
    let n = scores.len();
    let k = k.min(n);
    if k == 0 {
        return;
    }
    let keys = &mut scratch.keys;
    keys.clear();
    if n <= BOUNDED_MAX_N && k <= BOUNDED_MAX_K && n / BOUND_BLOCK >= k {
        select_topk_bounded(scores, k, keys, &mut scratch.maxima, &mut scratch.at);
    } else if n / k >= HEAP_MIN_RATIO {
        let mut heap = TopK::new(k);
        heap.push_f32_run(scores, 0);
        out.extend(heap.into_sorted().into_iter().map(from_f32_key));
        return;
    } else {
        // Packed keys (the same order as `rank`: the score's total order, then the smaller
        // position), compared as integers: a selection over (f32, u32) pairs through `rank`
        // was 9 % of an IVF batch search (its coarse probe, 16 of 256 lists).
        keys.extend(
            scores
                .iter()
                .enumerate()
                .map(|(i, &s)| f32_key(s, i as u32)),
        );
        if k < n {
            keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            keys.truncate(k);
        }
        keys.sort_unstable_by(|a, b| b.cmp(a));
    }
    out.extend(keys.iter().map(|&key| from_f32_key(key)));
}

/// Scores per block of [`select_topk_bounded`].
const BOUND_BLOCK: usize = 16;

/// The largest `k` [`select_topk`] selects with [`select_topk_bounded`]. Measured on real
/// coarse scores (Fashion-MNIST, 256 lists), ns per row, bounded (in plain loops, before
/// its SIMD kernels; not measured since) against the heap or the quickselect: k 4: 360 /
/// 430; k 8: 560 / 910; k 16: 870 / 700; k 32: 1300 / 690.
const BOUNDED_MAX_K: usize = 8;

/// Up to this many candidates, [`select_topk_bounded`] sorts them all by insertion.
const SMALL_SORT: usize = 32;

/// The longest row [`select_topk`] selects with [`select_topk_bounded`] (two passes over a
/// row in cache); longer ones stream through a heap once.
const BOUNDED_MAX_N: usize = 1 << 16;

/// [`select_topk`] for `k <= n / 16` in two passes: the maxima of blocks of 16, whose `k`-th
/// largest `t` bounds the `k`-th best score from below (`k` distinct positions reach it);
/// then the scores `>= t` (10 on average for the top 8 of 256 real coarse scores), from which
/// the `k` best are selected. The candidates are few whatever the order of the row, where a
/// heap's pushes depend on it (every score, for a row in ascending order). Both passes are
/// [`FilterKernel`]'s (this crate is built for baseline x86-64, where the plain loops ran at
/// SSE2's width). An IVF probe's top 8 of 256 real coarse scores (Fashion-MNIST): the heap
/// 0.91 us a row, these passes in plain loops 0.56; the top 4 of 256 (Gemma): 11-12 % of a
/// batch in plain loops, 5.4 % with the kernels. Leaves the `k` best keys in `keys` (empty
/// on entry), best first; `maxima` and `at` are scratch.
fn select_topk_bounded(
    scores: &[f32],
    k: usize,
    keys: &mut Vec<u64>,
    maxima: &mut Vec<f32>,
    at: &mut Vec<u32>,
) {
    // Where no score is NaN, the SIMD kernels: float maxima and compares (-0.0 and 0.0
    // compare equal there, which only adds candidates: the final order is the keys'). A NaN
    // ranks first by `total_cmp`: such rows compare the ordered bits.
    if !scores.iter().fold(false, |any, s| any | s.is_nan()) {
        let filter = filter_kernel();
        maxima.clear();
        filter.block_max16(scores, maxima);
        let bound = kth_largest(maxima.iter().copied(), k, f32::NEG_INFINITY, |a, b| a > b);
        at.clear();
        filter.collect_at_least(scores, bound, 0, at);
        keys.extend(at.iter().map(|&i| f32_key(scores[i as usize], i)));
    } else {
        let ordered = ordered_bits;
        let maxima = scores
            .chunks_exact(BOUND_BLOCK)
            .map(|block| block.iter().fold(0, |m, &s| m.max(ordered(s))));
        let bound = kth_largest(maxima, k, 0, |a, b| a > b);
        collect_candidates(scores, BOUND_BLOCK, |s| ordered(s) >= bound, keys);
    }
    debug_assert!(keys.len() >= k);
    if keys.len() > SMALL_SORT {
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        keys.truncate(k);
    }
    // Usually a handful: an insertion sort, best first.
    for i in 1..keys.len() {
        let x = keys[i];
        let mut j = i;
        while j > 0 && keys[j - 1] < x {
            keys[j] = keys[j - 1];
            j -= 1;
        }
        keys[j] = x;
    }
    keys.truncate(k);
}

/// The filter kernel, resolved once per process (`FilterKernel::best` reads the level's
/// environment variable on every call): a later change of `PQCACHE_SIMD_LEVEL` in the same
/// process (as `benches/common.rs::force_level` makes) does not reach it, where the indexes
/// built after it take the new level.
fn filter_kernel() -> &'static FilterKernel {
    static KERNEL: std::sync::OnceLock<FilterKernel> = std::sync::OnceLock::new();
    KERNEL.get_or_init(FilterKernel::best)
}

/// The `k`-th largest of `values` (`k <= BOUNDED_MAX_K`, at least `k` values), by insertion
/// into the `k` largest so far; `floor` is below every value, `gt` the order.
fn kth_largest<T: Copy>(
    values: impl Iterator<Item = T>,
    k: usize,
    floor: T,
    gt: impl Fn(T, T) -> bool,
) -> T {
    let mut top = [floor; BOUNDED_MAX_K];
    for v in values {
        if gt(v, top[k - 1]) {
            let mut j = k - 1;
            while j > 0 && gt(v, top[j - 1]) {
                top[j] = top[j - 1];
                j -= 1;
            }
            top[j] = v;
        }
    }
    top[k - 1]
}

/// Appends the keys of the scores that pass `keep`, block by block: a compare mask
/// (vectorised), then its set bits.
fn collect_candidates(
    scores: &[f32],
    block_len: usize,
    keep: impl Fn(f32) -> bool,
    keys: &mut Vec<u64>,
) {
    for (b, block) in scores.chunks(block_len).enumerate() {
        let mut mask = block
            .iter()
            .enumerate()
            .fold(0u32, |m, (i, &s)| m | (u32::from(keep(s)) << i));
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            keys.push(f32_key(block[i], (b * block_len + i) as u32));
        }
    }
}

/// Keeps the `k` best of `pairs` in `pairs[..k]`, sorted best first ([`rank`]), and truncates.
pub fn select_sorted<C: Ord>(pairs: &mut Vec<(f32, C)>, k: usize) {
    let k = k.min(pairs.len());
    if k == 0 {
        pairs.clear();
        return;
    }
    if k < pairs.len() {
        pairs.select_nth_unstable_by(k - 1, rank);
        pairs.truncate(k);
    }
    pairs.sort_unstable_by(rank);
}

/// The `k` best (score, position) pairs of u16 scores split into segments, best first
/// (higher score, then smaller position). Segment `s` covers positions
/// `[s * seg_len, s * seg_len + segs[s].len())`; positions `>= n_valid` are ignored (block
/// padding). `k` is clamped to the number of valid positions.
pub fn select_topk_u16_segments(
    kernel: &FastScanKernel,
    segs: &[&[u16]],
    seg_len: usize,
    n_valid: usize,
    k: usize,
) -> Vec<(u16, u32)> {
    let valid =
        |si: usize, seg: &[u16]| -> usize { seg.len().min(n_valid.saturating_sub(si * seg_len)) };
    let total: usize = segs
        .iter()
        .enumerate()
        .map(|(si, seg)| valid(si, seg))
        .sum();
    let k = k.min(total);
    if k == 0 {
        return Vec::new();
    }
    // Pass 1: high bytes.
    let mut hist = [0usize; 257];
    for (si, seg) in segs.iter().enumerate() {
        histogram(&seg[..valid(si, seg)], &mut hist, |v| (v >> 8) as usize);
    }
    let (hi, above_hi) = find_bucket(&hist, k);
    // Pass 2: low bytes inside the high-byte bucket; other values land in the spare bins
    // 256..264 (branch-free: whether a score is in the bucket is unpredictable; eight spare
    // bins keep their increments from forming one long dependency chain).
    let mut hist_lo = [0usize; 257];
    for (si, seg) in segs.iter().enumerate() {
        histogram(&seg[..valid(si, seg)], &mut hist_lo, |v| {
            let inside = ((v >> 8) as usize == hi) as usize;
            inside * (v & 0xff) as usize + (1 - inside) * (256 + (v & 7) as usize)
        });
    }
    let (lo, above_lo) = find_bucket(&hist_lo, k - above_hi);
    let threshold = ((hi << 8) | lo) as u16;
    let equal_left = k - above_hi - above_lo;
    // Pass 3: the survivors, in position order: every score above the threshold (SIMD
    // filter), then the first `equal_left` scores equal to it.
    let mut above: Vec<u32> = Vec::with_capacity(k);
    for (si, seg) in segs.iter().enumerate() {
        kernel.collect_above(
            &seg[..valid(si, seg)],
            threshold,
            (si * seg_len) as u32,
            &mut above,
        );
    }
    let mut equal: Vec<u32> = Vec::with_capacity(equal_left);
    'find: for (si, seg) in segs.iter().enumerate() {
        for (i, &v) in seg[..valid(si, seg)].iter().enumerate() {
            if equal.len() == equal_left {
                break 'find;
            }
            if v == threshold {
                equal.push((si * seg_len + i) as u32);
            }
        }
    }
    let score_at = |p: u32| segs[p as usize / seg_len][p as usize % seg_len];
    let out: Vec<(u16, u32)> = above
        .iter()
        .chain(&equal)
        .map(|&p| (score_at(p), p))
        .collect();
    sort_u16_desc_stable(&out, threshold)
}

/// `pairs` of (score, position) sorted by score, highest first; equal scores keep their input
/// order (callers pass positions ascending within each score, so ties go to the smaller
/// position). A counting sort over `floor..=max`: `O(n + max - floor)`. Every score must be at
/// least `floor`.
pub fn sort_u16_desc_stable(pairs: &[(u16, u32)], floor: u16) -> Vec<(u16, u32)> {
    let max = pairs.iter().map(|&(v, _)| v).max().unwrap_or(floor);
    let range = (max - floor) as usize + 1;
    let mut starts = vec![0usize; range + 1];
    for &(v, _) in pairs {
        starts[(max - v) as usize + 1] += 1;
    }
    for b in 1..=range {
        starts[b] += starts[b - 1];
    }
    let mut sorted = vec![(0u16, 0u32); pairs.len()];
    for &(v, pos) in pairs {
        let b = (max - v) as usize;
        sorted[starts[b]] = (v, pos);
        starts[b] += 1;
    }
    sorted
}

/// The `k` best of contiguous u16 scores (positions `>= n_valid` ignored), best first.
pub fn select_topk_u16(scores: &[u16], n_valid: usize, k: usize) -> Vec<(u16, u32)> {
    select_topk_u16_segments(
        &FastScanKernel::best(),
        &[scores],
        scores.len().max(1),
        n_valid,
        k,
    )
}

/// Indices of the `k` largest of non-negative, non-NaN `scores` (ties to the smaller index),
/// in ascending index order, in `O(n + k log k)` at worst and `O(n)` typically.
///
/// The bit pattern of a non-negative f32 is monotone as an integer, so the top 16 bits
/// (sign, exponent, 7 mantissa bits) bucket the scores in order: a histogram over the buckets
/// present finds the bucket holding the k-th score; everything above it is kept, and only that
/// bucket is sorted exactly.
pub fn select_topk_nonneg_f32(scores: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    if let Some(found) = select_topk_sampled(scores, k) {
        return found;
    }
    select_topk_nonneg_f32_histogram(scores, k)
}

/// Elements sampled (every `NONNEG_SAMPLE_STRIDE`-th, from index 0) to place the floor of the
/// sampled selection ([`nonneg_sampled_floor`]).
pub const NONNEG_SAMPLE_STRIDE: usize = 16;

/// The sampled path of [`select_topk_nonneg_f32`]: [`nonneg_sampled_floor`] from every 16th
/// score, one pass collecting the scores at or above it, [`nonneg_topk_of_survivors`] on
/// them. `None` when the floor cannot be sampled or turns out too high: the caller falls back
/// to the exact histogram method. About one pass over the scores plus `O(k)`, and no large
/// allocation.
fn select_topk_sampled(scores: &[f32], k: usize) -> Option<Vec<u32>> {
    let floor = nonneg_sampled_floor(scores.len(), k, || {
        scores
            .iter()
            .step_by(NONNEG_SAMPLE_STRIDE)
            .copied()
            .collect()
    })?;
    let mut found: Vec<u32> = Vec::with_capacity(k + k / 2 + 64);
    filter_kernel().collect_at_least(scores, floor, 0, &mut found);
    let values: Vec<f32> = found.iter().map(|&i| scores[i as usize]).collect();
    nonneg_topk_of_survivors(&mut found, &values, k).then_some(found)
}

/// Non-negative floats order as their bit patterns (negative zero counts as zero).
#[inline(always)]
fn nonneg_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        0
    } else {
        b
    }
}

/// A floor for the `k` largest of `n` non-negative, non-NaN scores, from `sample()`, the
/// scores at every [`NONNEG_SAMPLE_STRIDE`]-th index (`0, 16, 32, ...`), called only when the
/// selection is sampled: the `(k / n)` quantile of the sample, widened by 25 % and 16 places,
/// expected to have a little more than `k` scores at or above it. `None` when the input is too
/// small to sample, `k` too large a share of it (`2 k > n`) or the sample not of the length
/// the stride gives: the caller selects exactly. A caller that computes its scores can compute
/// the sample first, then keep only the scores at or above the floor as it computes them all.
pub fn nonneg_sampled_floor(n: usize, k: usize, sample: impl FnOnce() -> Vec<f32>) -> Option<f32> {
    if n < 64 * NONNEG_SAMPLE_STRIDE || k * 2 > n {
        return None;
    }
    let sample = sample();
    if sample.len() != n.div_ceil(NONNEG_SAMPLE_STRIDE) {
        return None;
    }
    let mut bits: Vec<u32> = sample.iter().map(|&v| nonneg_bits(v)).collect();
    let want = ((k as f64 / n as f64) * bits.len() as f64 * 1.25).ceil() as usize + 16;
    if want >= bits.len() {
        return None;
    }
    // The want-th largest of the sample.
    let (_, nth, _) = bits.select_nth_unstable_by(want - 1, |a, b| b.cmp(a));
    Some(f32::from_bits(*nth))
}

/// Keeps in `found` the indices of the `k` largest scores: `found` holds the indices
/// (ascending) and `values` the scores (the same order) of every score at or above a floor,
/// the rest lying below it. Ties to the smaller index; the answer ascending. `false` (and
/// `found` untouched) when fewer than `k` were found: the floor was too high.
pub fn nonneg_topk_of_survivors(found: &mut Vec<u32>, values: &[f32], k: usize) -> bool {
    assert_eq!(found.len(), values.len(), "one value per survivor");
    if found.len() < k {
        return false;
    }
    if k == found.len() {
        return true;
    }
    // The k-th largest score among the survivors; every survivor above it is kept, and of
    // those equal to it the first `k - above` (the smaller indices): `found` filtered in place
    // is the answer, ascending.
    let mut found_bits: Vec<u32> = values.iter().map(|&v| nonneg_bits(v)).collect();
    let kth = *found_bits.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1;
    // Usually exactly `k` survivors lie at or above the k-th score (no tie beyond it): one
    // SIMD filter pass finds them, in order, and they move down in place (`j >= slot`).
    let mut at = Vec::with_capacity(k + 64);
    filter_kernel().collect_at_least(values, f32::from_bits(kth), 0, &mut at);
    if at.len() == k {
        for (slot, &j) in at.iter().enumerate() {
            found[slot] = found[j as usize];
        }
        found.truncate(k);
        return true;
    }
    let above = found_bits[..k - 1].iter().filter(|&&b| b > kth).count();
    let mut ties = k - above;
    // Ties at the k-th score: compacted in place without branches (which survivor stays is
    // data-dependent).
    let mut kept = 0;
    for (j, &v) in values.iter().enumerate() {
        let b = nonneg_bits(v);
        let tie = (b == kth) & (ties > 0);
        found[kept] = found[j];
        kept += usize::from((b > kth) | tie);
        ties -= usize::from(tie);
    }
    found.truncate(kept);
    true
}

/// The exact histogram path of [`select_topk_nonneg_f32`] (`1 <= k <= scores.len()`).
fn select_topk_nonneg_f32_histogram(scores: &[f32], k: usize) -> Vec<u32> {
    // Negative zero and anything negative (not expected) map to bucket 0.
    let key = |v: f32| {
        let bits = v.to_bits();
        if bits >> 31 == 1 {
            0
        } else {
            (bits >> 16) as usize
        }
    };
    let mut lo = usize::MAX;
    let mut hi = 0usize;
    for &v in scores {
        let b = key(v);
        lo = lo.min(b);
        hi = hi.max(b);
    }
    let mut hist = vec![0u32; hi - lo + 1];
    for &v in scores {
        hist[key(v) - lo] += 1;
    }
    let mut above = 0usize;
    let mut bucket = 0usize;
    for b in (0..hist.len()).rev() {
        if above + hist[b] as usize >= k {
            bucket = b + lo;
            break;
        }
        above += hist[b] as usize;
    }
    let mut out: Vec<u32> = Vec::with_capacity(k);
    let mut edge: Vec<(f32, u32)> = Vec::new();
    for (i, &v) in scores.iter().enumerate() {
        let b = key(v);
        if b > bucket {
            out.push(i as u32);
        } else if b == bucket {
            edge.push((v, i as u32));
        }
    }
    select_sorted(&mut edge, k - above);
    out.extend(edge.into_iter().map(|(_, i)| i));
    out.sort_unstable();
    out
}

/// Adds the bins `bin(v)` of `values` to `hist`. Four interleaved partial histograms break
/// the load-add-store chains that concentrated scores (few distinct bins) would otherwise
/// serialise.
#[inline(always)]
fn histogram(values: &[u16], hist: &mut [usize; 257], bin: impl Fn(u16) -> usize) {
    let mut parts = [[0u32; SPARE_BINS]; 4];
    let mut quads = values.chunks_exact(4);
    for q in &mut quads {
        for (part, &v) in parts.iter_mut().zip(q) {
            part[bin(v).min(SPARE_BINS - 1)] += 1;
        }
    }
    for &v in quads.remainder() {
        parts[0][bin(v).min(SPARE_BINS - 1)] += 1;
    }
    for (b, h) in hist.iter_mut().enumerate().take(256) {
        *h += parts.iter().map(|p| p[b] as usize).sum::<usize>();
    }
    hist[256] += parts
        .iter()
        .map(|p| p[256..].iter().map(|&c| c as usize).sum::<usize>())
        .sum::<usize>();
}

/// Bins of the partial histograms: 256 values and 8 spare bins for values outside.
const SPARE_BINS: usize = 264;

/// Scanning bins 255 down to 0 of a histogram (bin 256 holds the values outside it), the bin
/// where the count reaches `k`, and how many elements lie strictly above it.
fn find_bucket(hist: &[usize; 257], k: usize) -> (usize, usize) {
    let mut above = 0;
    for b in (0..256).rev() {
        if above + hist[b] >= k {
            return (b, above);
        }
        above += hist[b];
    }
    (0, above)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn naive(scores: &[f32], k: usize) -> Vec<(f32, u32)> {
        let mut all: Vec<(f32, u32)> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u32))
            .collect();
        all.sort_by(rank);
        all.truncate(k);
        all
    }

    #[test]
    fn both_strategies_match_full_sort_with_ties() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [0usize, 1, 2, 10, 100, 1000, 5000, 70_000] {
            // Few distinct values force many ties: smaller position must win; rows in
            // ascending and descending order, and signed scores with -0.0 and NaN, too.
            let few: Vec<f32> = (0..n).map(|_| rng.random_range(0..20) as f32).collect();
            let up: Vec<f32> = (0..n).map(|i| i as f32 - 500.0).collect();
            let down: Vec<f32> = up.iter().rev().copied().collect();
            let signed: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    0 => -0.0,
                    1 => f32::NAN,
                    2 => 0.0,
                    _ => rng.random_range(-5.0..5.0),
                })
                .collect();
            for scores in [&few, &up, &down, &signed] {
                for k in [1usize, 2, 5, 8, 10, 31, 100, 500, 1000, 5000] {
                    // NaN ranks first by `total_cmp` in the two-pass selection and the
                    // quickselect; the heap's float filter (long rows, small k) passes none.
                    let kk = k.min(n).max(1);
                    let bounded =
                        n <= BOUNDED_MAX_N && kk <= BOUNDED_MAX_K && n / BOUND_BLOCK >= kk;
                    if std::ptr::eq(scores, &signed) && !bounded && n / kk >= HEAP_MIN_RATIO {
                        continue;
                    }
                    let (got, want) = (select_topk(scores, k), naive(scores, k));
                    let bits = |v: Vec<(f32, u32)>| -> Vec<(u32, u32)> {
                        v.into_iter().map(|(s, i)| (s.to_bits(), i)).collect()
                    };
                    assert_eq!(bits(got), bits(want), "n {n} k {k}");
                }
            }
        }
    }

    /// A row offered in runs of any length (the exact search's GEMM blocks) selects what the
    /// whole row selects, ties to the smaller position included, in heap and reservoir mode.
    #[test]
    fn runs_of_a_row_select_as_the_whole_row() {
        let mut rng = StdRng::seed_from_u64(6);
        for n in [1usize, 17, 1000, 5000] {
            let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0..50) as f32).collect();
            for k in [1usize, 10, 47, 48, 300, n] {
                let k = k.min(n);
                let mut top = TopK::new(k);
                let mut at = 0;
                while at < n {
                    let len = rng.random_range(1..=1100).min(n - at);
                    top.push_f32_run(&scores[at..at + len], at as u32);
                    at += len;
                }
                let got: Vec<(f32, u32)> =
                    top.into_sorted().into_iter().map(from_f32_key).collect();
                assert_eq!(got, naive(&scores, k), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn heap_handles_any_order_of_positions() {
        let mut h = TopK::new(3);
        for (s, p) in [(1.0, 9), (1.0, 2), (5.0, 7), (1.0, 0), (0.5, 1)] {
            h.push(f32_key(s, p));
        }
        let got: Vec<(f32, u32)> = h.into_sorted().into_iter().map(from_f32_key).collect();
        assert_eq!(got, vec![(5.0, 7), (1.0, 0), (1.0, 2)]);
    }

    #[test]
    fn f32_keys_order_as_total_cmp_and_decode_bit_exact() {
        let vals = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-38,
            2.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fc0_0001),
        ];
        for &a in &vals {
            for &b in &vals {
                assert_eq!(
                    f32_key(a, 0).cmp(&f32_key(b, 0)),
                    a.total_cmp(&b),
                    "{a} {b}"
                );
            }
            let (back, p) = from_f32_key(f32_key(a, 77));
            assert_eq!((back.to_bits(), p), (a.to_bits(), 77));
        }
        // Equal scores: the smaller position is the greater (better) key.
        assert!(f32_key(1.0, 3) > f32_key(1.0, 4));
    }

    fn naive_u16(scores: &[u16], n_valid: usize, k: usize) -> Vec<(u16, u32)> {
        let mut all: Vec<(u16, u32)> = scores[..n_valid.min(scores.len())]
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u32))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    #[test]
    fn u16_heap_matches_full_sort_in_any_order_and_across_merges() {
        let mut rng = StdRng::seed_from_u64(21);
        for n in [0usize, 1, 5, 64, 1000] {
            // Few distinct values: ties everywhere, the smaller position must win.
            let scores: Vec<u16> = (0..n).map(|_| rng.random_range(60_000..60_008)).collect();
            for k in [1usize, 3, 10, 47, 48, 100, 600] {
                let want = naive_u16(&scores, n, k);
                // Shuffled offers, split over three heaps merged at the end.
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                let mut heaps = vec![TopK::new(k); 3];
                for (j, &i) in order.iter().enumerate() {
                    heaps[j % 3].push(u16_key(scores[i], i as u32));
                }
                let mut all = heaps.pop().unwrap();
                for h in heaps {
                    all.merge(h);
                }
                // A heap is full at cap offers; a reservoir once it compacted (2 * cap).
                if k < RESERVOIR_MIN {
                    assert_eq!(all.worst().is_some(), n >= k, "n {n} k {k}");
                } else {
                    assert!(all.worst().is_none() || n >= 2 * k, "n {n} k {k}");
                }
                let got: Vec<(u16, u32)> =
                    all.into_sorted().into_iter().map(from_u16_key).collect();
                assert_eq!(got, want, "n {n} k {k}");
            }
        }
    }

    #[test]
    fn radix_select_matches_full_sort() {
        let mut rng = StdRng::seed_from_u64(8);
        for n in [0usize, 1, 33, 1000, 4096] {
            for spread in [3u32, 300, 65536] {
                let scores: Vec<u16> = (0..n).map(|_| rng.random_range(0..spread) as u16).collect();
                for k in [1usize, 7, 100, 999, 5000] {
                    let n_valid = n.saturating_sub(5);
                    let want = naive_u16(&scores, n_valid, k);
                    assert_eq!(
                        select_topk_u16(&scores, n_valid, k),
                        want,
                        "n {n} spread {spread} k {k}"
                    );
                    // The same split into segments of 64.
                    let segs: Vec<&[u16]> = scores.chunks(64).collect();
                    for level in pqcache_simd::Level::all_supported() {
                        let kernel = FastScanKernel::for_level(level);
                        assert_eq!(
                            select_topk_u16_segments(&kernel, &segs, 64, n_valid, k),
                            want,
                            "level {level}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nonneg_f32_selection_matches_full_sort() {
        let mut rng = StdRng::seed_from_u64(12);
        // n >= 1024 and k <= n / 2 take the sampled path; kind 3 fools the sample (every
        // sampled position is high), forcing its fallback to the histogram for larger k.
        for n in [0usize, 1, 50, 3000, 40_000] {
            for kind in 0..4 {
                let scores: Vec<f32> = (0..n)
                    .map(|i| match kind {
                        0 => rng.random_range(0.0..1.0),
                        1 => rng.random_range(0..5) as f32 * 0.25, // many ties
                        2 => (rng.random_range(-80.0f32..0.0)).exp(), // wide dynamic range
                        _ if i % 16 == 0 => 1.0,
                        _ => rng.random_range(0.0..0.5),
                    })
                    .collect();
                for k in [1usize, 10, 300, 2999, 5000, 19_000] {
                    let mut want: Vec<u32> = naive(&scores, k.min(n))
                        .into_iter()
                        .map(|(_, i)| i)
                        .collect();
                    want.sort_unstable();
                    assert_eq!(
                        select_topk_nonneg_f32(&scores, k),
                        want,
                        "n {n} kind {kind} k {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn nan_does_not_panic() {
        let scores = [1.0, f32::NAN, 3.0, -f32::NAN, 2.0];
        assert_eq!(select_topk(&scores, 5).len(), 5);
        assert_eq!(select_topk(&scores, 2).len(), 2);
    }
}
