//! Search results.

use crate::metric::Metric;

/// Results of searching `nq` queries for `k` neighbours each.
///
/// `distances` and `ids` are `nq * k`, row-major: row `q` holds query `q`'s neighbours, best
/// first, ties broken by the smaller id. Distances follow [`Metric`]: inner products
/// (descending) or squared L2 distances (ascending). A slot that could not be filled (an IVF
/// probe that saw fewer than `k` vectors) has id `-1` and the worst possible distance.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchResult {
    /// Number of queries.
    pub nq: usize,
    /// Neighbours per query.
    pub k: usize,
    /// `nq * k` distances, row-major.
    pub distances: Vec<f32>,
    /// `nq * k` ids, row-major; `-1` for an empty slot.
    pub ids: Vec<i64>,
}

impl SearchResult {
    /// An empty result for `nq` queries of `k` slots, every id `-1`.
    pub fn empty(nq: usize, k: usize, metric: Metric) -> SearchResult {
        let worst = match metric {
            Metric::InnerProduct => f32::NEG_INFINITY,
            Metric::L2 => f32::INFINITY,
        };
        SearchResult {
            nq,
            k,
            distances: vec![worst; nq * k],
            ids: vec![-1; nq * k],
        }
    }

    /// The ids of query `q`, best first.
    pub fn ids_of(&self, q: usize) -> &[i64] {
        &self.ids[q * self.k..(q + 1) * self.k]
    }

    /// The distances of query `q`, best first.
    pub fn distances_of(&self, q: usize) -> &[f32] {
        &self.distances[q * self.k..(q + 1) * self.k]
    }

    /// Mean recall@k of `self` against `truth` (ids of the true neighbours, `truth_k` per query,
    /// of which the first `self.k` count): `|found ∩ true| / k`, averaged over queries.
    pub fn recall_against(&self, truth: &[i64], truth_k: usize) -> f64 {
        if self.nq == 0 || self.k == 0 {
            return 0.0;
        }
        let k = self.k.min(truth_k);
        let mut total = 0usize;
        let mut t = Vec::with_capacity(k);
        for q in 0..self.nq {
            t.clear();
            t.extend_from_slice(&truth[q * truth_k..q * truth_k + k]);
            t.sort_unstable();
            total += self
                .ids_of(q)
                .iter()
                .filter(|id| t.binary_search(id).is_ok())
                .count();
        }
        total as f64 / (self.nq * k) as f64
    }
}
