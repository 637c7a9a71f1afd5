//! Top-k selection over float scores (larger is better), without a full sort.
//!
//! Two strategies, chosen by [`select_topk`] from `k` and `n`:
//!
//! * **heap** (small k, the ANN case): a binary heap of the `k` best so far with the worst at
//!   the root. Each new score is compared once with the root (the threshold) and rejected in
//!   the common case, so the cost is `O(n + k log k log(n / k))`.
//! * **quickselect** (large k, the attention case, k = 5-20 % of n): `select_nth_unstable` on
//!   (score, position) pairs, then a sort of the `k` survivors: `O(n + k log k)`.
//!
//! Order: higher score first; equal scores by smaller position. Scores are compared with
//! `f32::total_cmp`, so a NaN can never make the selection panic.

use std::cmp::Ordering;

/// Below this ratio `n / k` the quickselect strategy is used.
const HEAP_MIN_RATIO: usize = 32;
/// Scores tested together against the heap threshold.
const FILTER_BLOCK: usize = 16;

/// `true` if (sa, ia) ranks before (sb, ib).
#[inline(always)]
fn better(sa: f32, ia: u32, sb: f32, ib: u32) -> bool {
    match sa.total_cmp(&sb) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => ia < ib,
    }
}

#[inline(always)]
fn rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// A bounded heap keeping the `k` best (score, position) pairs seen so far.
#[derive(Clone, Debug)]
pub struct TopKHeap {
    k: usize,
    /// Binary heap, worst element at index 0.
    heap: Vec<(f32, u32)>,
}

impl TopKHeap {
    /// An empty heap for `k` elements.
    pub fn new(k: usize) -> TopKHeap {
        TopKHeap {
            k,
            heap: Vec::with_capacity(k),
        }
    }

    /// The score an element must beat to enter, `-inf` while the heap is not full.
    #[inline(always)]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap[0].0
        }
    }

    /// Offers (score, position).
    #[inline]
    pub fn push(&mut self, score: f32, pos: u32) {
        if self.heap.len() < self.k {
            self.heap.push((score, pos));
            self.sift_up(self.heap.len() - 1);
        } else if self.k > 0 && better(score, pos, self.heap[0].0, self.heap[0].1) {
            self.heap[0] = (score, pos);
            self.sift_down(0);
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            let (c, p) = (self.heap[i], self.heap[parent]);
            // The worse element goes up.
            if better(p.0, p.1, c.0, c.1) {
                self.heap.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut worst = i;
            for c in [l, r] {
                if c < n {
                    let (a, b) = (self.heap[worst], self.heap[c]);
                    if better(a.0, a.1, b.0, b.1) {
                        worst = c;
                    }
                }
            }
            if worst == i {
                break;
            }
            self.heap.swap(i, worst);
            i = worst;
        }
    }

    /// The kept elements, best first.
    pub fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.heap.sort_unstable_by(rank);
        self.heap
    }
}

/// The `k` best (score, position) pairs of `scores`, best first. `k` is clamped to `n`.
pub fn select_topk(scores: &[f32], k: usize) -> Vec<(f32, u32)> {
    let n = scores.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if n / k >= HEAP_MIN_RATIO {
        let mut heap = TopKHeap::new(k);
        for (i, &s) in scores[..k].iter().enumerate() {
            heap.push(s, i as u32);
        }
        let mut threshold = heap.threshold();
        // Blocks of 16 are first tested as a whole against the threshold (a branch-free fold
        // that the compiler vectorises); in the common case the whole block is rejected.
        // Positions ascend, so an equal score never displaces the root: `>` suffices.
        let rest = &scores[k..];
        let mut blocks = rest.chunks_exact(FILTER_BLOCK);
        let mut base = k;
        for block in &mut blocks {
            if block.iter().fold(false, |any, &s| any | (s > threshold)) {
                for (j, &s) in block.iter().enumerate() {
                    if s > threshold {
                        heap.push(s, (base + j) as u32);
                        threshold = heap.threshold();
                    }
                }
            }
            base += FILTER_BLOCK;
        }
        for (j, &s) in blocks.remainder().iter().enumerate() {
            if s > threshold {
                heap.push(s, (base + j) as u32);
                threshold = heap.threshold();
            }
        }
        heap.into_sorted()
    } else {
        let mut all: Vec<(f32, u32)> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u32))
            .collect();
        select_sorted(&mut all, k);
        all
    }
}

/// Keeps the `k` best of `pairs` in `pairs[..k]`, sorted best first, and truncates.
pub fn select_sorted(pairs: &mut Vec<(f32, u32)>, k: usize) {
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
        for n in [0usize, 1, 2, 10, 100, 1000, 5000] {
            // Few distinct values force many ties: smaller position must win.
            let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0..20) as f32).collect();
            for k in [1usize, 2, 5, 10, 31, 100, 500, 1000, 5000] {
                assert_eq!(select_topk(&scores, k), naive(&scores, k), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn heap_handles_any_order_of_positions() {
        let mut h = TopKHeap::new(3);
        for (s, p) in [(1.0, 9), (1.0, 2), (5.0, 7), (1.0, 0), (0.5, 1)] {
            h.push(s, p);
        }
        assert_eq!(h.into_sorted(), vec![(5.0, 7), (1.0, 0), (1.0, 2)]);
    }

    #[test]
    fn nan_does_not_panic() {
        let scores = [1.0, f32::NAN, 3.0, -f32::NAN, 2.0];
        assert_eq!(select_topk(&scores, 5).len(), 5);
        assert_eq!(select_topk(&scores, 2).len(), 2);
    }
}
