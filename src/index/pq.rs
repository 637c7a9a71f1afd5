//! `IndexPQ`: product-quantized vectors searched by ADC with a float lookup table.
//!
//! Search, per query: build the `m * ksub` table ([`crate::pq::lut`]), score every code with
//! the SIMD ADC kernel (`pqcache_simd::adc`, gathers on v3/v4; bit-exact with scalar), select
//! the top k. Queries run in parallel on the rayon pool.
//!
//! Memory: `ntotal * m` code bytes (one per sub-quantizer, for 8-bit and unpacked 4-bit codes)
//! plus the codebooks (`d * ksub` f32).

use super::{check_k, check_vectors, write_row, Index};
use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::kmeans::KMeansConfig;
use crate::metric::Metric;
use crate::pq::{Nbits, ProductQuantizer};
use crate::result::SearchResult;
use pqcache_simd::adc::AdcKernel;
use pqcache_simd::distance::DistanceKernels;
use rayon::prelude::*;

/// A product-quantized index.
#[derive(Clone, Debug)]
pub struct IndexPQ {
    pq: ProductQuantizer,
    metric: Metric,
    codes: Buf<u8>,
    /// k-means settings used by `train`.
    pub train_config: KMeansConfig,
    adc: AdcKernel,
    kernels: DistanceKernels,
}

impl IndexPQ {
    /// An untrained index: `m` sub-quantizers of `nbits` bits over `d` dimensions.
    pub fn new(d: usize, m: usize, nbits: Nbits, metric: Metric) -> Result<IndexPQ> {
        Ok(IndexPQ {
            pq: ProductQuantizer::new(d, m, nbits)?,
            metric,
            codes: Buf::new(),
            train_config: KMeansConfig::default(),
            adc: AdcKernel::best(),
            kernels: DistanceKernels::best(),
        })
    }

    /// An empty index over an already trained quantizer (e.g. to compare a fast-scan index
    /// with float-table ADC on the same codebooks).
    pub fn with_quantizer(pq: ProductQuantizer, metric: Metric) -> IndexPQ {
        IndexPQ {
            pq,
            metric,
            codes: Buf::new(),
            train_config: KMeansConfig::default(),
            adc: AdcKernel::best(),
            kernels: DistanceKernels::best(),
        }
    }

    /// The quantizer.
    pub fn pq(&self) -> &ProductQuantizer {
        &self.pq
    }

    /// An index over a trained quantizer and its codes (`ntotal * m` bytes, each `< ksub`).
    pub(crate) fn from_parts(
        pq: ProductQuantizer,
        metric: Metric,
        codes: Buf<u8>,
    ) -> Result<IndexPQ> {
        let ksub = pq.ksub();
        if !codes.len().is_multiple_of(pq.m()) {
            return Err(Error::InvalidArgument(format!(
                "{} code bytes do not fill rows of m = {}",
                codes.len(),
                pq.m()
            )));
        }
        if ksub < 256 {
            if let Some(&c) = codes.iter().find(|&&c| c as usize >= ksub) {
                return Err(Error::InvalidArgument(format!(
                    "code byte {c} out of range for ksub = {ksub}"
                )));
            }
        }
        let mut idx = IndexPQ::with_quantizer(pq, metric);
        idx.codes = codes;
        Ok(idx)
    }

    /// Removes the vectors at positions `ids` and returns how many were removed; later
    /// rows move down, so ids stay positions (FAISS's `IndexPQ.remove_ids`). Ids out of
    /// range are ignored.
    pub fn remove_ids(&mut self, ids: &[i64]) -> usize {
        let (keep, removed) = super::keep_mask(ids, crate::Index::ntotal(self));
        if removed > 0 {
            self.codes.retain_rows(self.pq.m(), &keep);
        }
        removed
    }

    /// The codes, `ntotal * m` bytes.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// Approximate metric values of one query against every code, into `out` (`ntotal`).
    pub fn adc_scores(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        if !self.pq.is_trained() {
            return Err(Error::NotTrained);
        }
        check_vectors(q, self.pq.dim(), "queries")?;
        if out.len() != self.ntotal() {
            return Err(Error::DimensionMismatch {
                expected: self.ntotal(),
                got: out.len(),
            });
        }
        let mut lut = vec![0.0f32; self.pq.m() * self.pq.ksub()];
        self.pq.compute_lut(q, self.metric, &self.kernels, &mut lut);
        self.adc
            .scan(&lut, self.pq.m(), self.pq.ksub(), &self.codes, out);
        Ok(())
    }

    /// Reconstructs vector `i` from its code.
    pub fn reconstruct(&self, i: usize) -> Result<Vec<f32>> {
        if i >= self.ntotal() {
            return Err(Error::InvalidArgument(format!(
                "id {i} out of range (ntotal {})",
                self.ntotal()
            )));
        }
        let m = self.pq.m();
        self.pq.decode(&self.codes[i * m..(i + 1) * m])
    }
}

impl Index for IndexPQ {
    fn dim(&self) -> usize {
        self.pq.dim()
    }
    fn ntotal(&self) -> usize {
        self.codes.len() / self.pq.m()
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
        // compute_codes answers NotTrained for an untrained quantizer.
        let codes = self.pq.compute_codes(x)?;
        self.codes.to_mut().extend_from_slice(&codes);
        Ok(())
    }
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        if !self.pq.is_trained() {
            return Err(Error::NotTrained);
        }
        let d = self.pq.dim();
        let nq = check_vectors(queries, d, "queries")?;
        let n = self.ntotal();
        check_k(k, n)?;
        let (m, ksub) = (self.pq.m(), self.pq.ksub());
        let mut res = SearchResult::empty(nq, k, self.metric);
        let one = |(lut, scores): &mut (Vec<f32>, Vec<f32>),
                   ((dist, ids), q): ((&mut [f32], &mut [i64]), &[f32])| {
            self.pq.compute_lut(q, self.metric, &self.kernels, lut);
            self.adc.scan(lut, m, ksub, &self.codes, scores);
            if self.metric == Metric::L2 {
                scores.iter_mut().for_each(|s| *s = -*s);
            }
            write_row(scores, k, self.metric, dist, ids);
        };
        let scratch = || (vec![0.0f32; m * ksub], vec![0.0f32; n]);
        if super::worth_parallel(nq) {
            res.distances
                .par_chunks_mut(k)
                .zip(res.ids.par_chunks_mut(k))
                .zip(queries.par_chunks(d))
                .for_each_init(scratch, one);
        } else {
            let mut state = scratch();
            res.distances
                .chunks_mut(k)
                .zip(res.ids.chunks_mut(k))
                .zip(queries.chunks(d))
                .for_each(|item| one(&mut state, item));
        }
        Ok(res)
    }
    fn reset(&mut self) {
        self.codes = Buf::new();
    }
}
