//! Each index kind's sections, and [`AnyIndex`], what `open` / `load` return.
//!
//! `meta` words (u64, little-endian), by kind (metric: 0 inner product, 1 L2; stored
//! vectors: 0 none, 1 f32, 2 f16):
//!
//! ```text
//! flat     d, metric, precision (1 f32, 2 f16), ntotal
//!          + vectors (ntotal * d), norms (ntotal f32 for L2, empty for inner product)
//! pq       d, metric, m, nbits, ntotal
//!          + pq_centroids (m * ksub * dsub f32), codes (ntotal * m bytes)
//! pqfs     d, metric, m, ntotal, stored, rerank_factor, qbs
//!          + pq_centroids (m * 16 * dsub), codes (ceil(ntotal / 32) blocks), [vectors]
//! ivfpqfs  d, metric, nlist, m, by_residual, stored, next_id, nprobe, rerank_factor,
//!          refresh_sample, train_mse (f64 bits), added_sq_err (f64 bits), added
//!          + coarse_centroids (nlist * d), pq_centroids, lists (nlist x [entries,
//!          fresh_from]), codes / ids / [vectors]: list after list, in list order
//! ```

use super::{corrupt, IndexKind, Reader, SectionOut, Tag};
use crate::error::{Error, Result};
use crate::index::fastscan::RerankStorage;
use crate::index::flat::FlatStorage;
use crate::index::ivf::{DriftStats, IndexIVFPQFastScan, InvertedList};
use crate::index::{Index, IndexFlat, IndexPQ, IndexPQFastScan};
use crate::ivf::CoarseQuantizer;
use crate::metric::Metric;
use crate::pq::pack::PackedCodes;
use crate::pq::{Nbits, ProductQuantizer};
use crate::result::SearchResult;
use half::f16;
use pqcache_simd::fastscan::{block_bytes, BBS};
use std::borrow::Cow;

use crate::limits::{MAX_DIM, MAX_NLIST, MAX_RERANK_FACTOR};

/// An index that can be written by [`super::save`].
pub trait Persist {
    /// Kind and sections, `meta` first (borrowing the index's arrays).
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>);
    /// Checks the settings against the limits the reader applies ([`crate::limits`]), so that
    /// nothing is written that cannot be opened.
    fn check_limits(&self) -> crate::Result<()> {
        Ok(())
    }
}

fn metric_word(m: Metric) -> u64 {
    match m {
        Metric::InnerProduct => 0,
        Metric::L2 => 1,
    }
}

fn storage_word(s: Option<&FlatStorage>) -> u64 {
    match s {
        None => 0,
        Some(FlatStorage::F32(_)) => 1,
        Some(FlatStorage::F16(_)) => 2,
    }
}

fn storage_section(tag: Tag, s: &FlatStorage) -> SectionOut<'_> {
    match s {
        FlatStorage::F32(v) => SectionOut::of(tag, v.as_slice()),
        FlatStorage::F16(v) => SectionOut::of(tag, v.as_slice()),
    }
}

impl Persist for IndexFlat {
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        let s = self.storage();
        let meta = vec![
            self.dim() as u64,
            metric_word(self.metric()),
            storage_word(Some(s)),
            self.ntotal() as u64,
        ];
        let secs = vec![
            SectionOut::words(Tag::Meta, &meta),
            storage_section(Tag::Vectors, s),
            SectionOut::of(Tag::Norms, self.norms()),
        ];
        (IndexKind::Flat, secs)
    }
}

impl Persist for IndexPQ {
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        let pq = self.pq();
        let meta = vec![
            pq.dim() as u64,
            metric_word(self.metric()),
            pq.m() as u64,
            pq.nbits().bits() as u64,
            self.ntotal() as u64,
        ];
        let secs = vec![
            SectionOut::words(Tag::Meta, &meta),
            SectionOut::of(Tag::PqCentroids, pq.centroids()),
            SectionOut::of(Tag::Codes, self.codes()),
        ];
        (IndexKind::Pq, secs)
    }
}

impl Persist for IndexPQFastScan {
    fn check_limits(&self) -> crate::Result<()> {
        crate::limits::at_most(self.rerank_factor, MAX_RERANK_FACTOR, "rerank_factor")?;
        crate::limits::at_most(self.qbs, pqcache_simd::fastscan::MAX_QBS, "qbs")?;
        Ok(())
    }
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        let pq = self.pq();
        let meta = vec![
            pq.dim() as u64,
            metric_word(self.metric()),
            pq.m() as u64,
            self.ntotal() as u64,
            storage_word(self.originals()),
            self.rerank_factor as u64,
            self.qbs as u64,
        ];
        let mut secs = vec![
            SectionOut::words(Tag::Meta, &meta),
            SectionOut::of(Tag::PqCentroids, pq.centroids()),
            SectionOut::of(Tag::Codes, self.packed_codes().data()),
        ];
        if let Some(o) = self.originals() {
            secs.push(storage_section(Tag::Vectors, o));
        }
        (IndexKind::PqFastScan, secs)
    }
}

/// Per list: entries and `fresh_from`.
fn list_words(idx: &IndexIVFPQFastScan) -> Vec<u64> {
    idx.lists()
        .iter()
        .flat_map(|l| [l.len() as u64, l.fresh_from() as u64])
        .collect()
}

impl Persist for IndexIVFPQFastScan {
    fn check_limits(&self) -> crate::Result<()> {
        crate::limits::at_most(self.rerank_factor, MAX_RERANK_FACTOR, "rerank_factor")?;
        crate::limits::at_most(self.nprobe, MAX_NLIST, "nprobe")?;
        Ok(())
    }
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        let pq = self.pq();
        let drift = self.drift();
        let lists = self.lists();
        let meta = vec![
            pq.dim() as u64,
            metric_word(self.metric()),
            self.nlist() as u64,
            pq.m() as u64,
            self.by_residual() as u64,
            match self.originals_storage() {
                None => 0,
                Some(RerankStorage::F32) => 1,
                Some(RerankStorage::F16) => 2,
            },
            self.next_id() as u64,
            self.nprobe as u64,
            self.rerank_factor as u64,
            self.refresh_sample as u64,
            drift.train_mse.to_bits(),
            drift.added_sq_err.to_bits(),
            drift.added as u64,
        ];
        let mut secs = vec![
            SectionOut::words(Tag::Meta, &meta),
            SectionOut::of(Tag::CoarseCentroids, self.coarse().centroids()),
            SectionOut::of(Tag::PqCentroids, pq.centroids()),
            SectionOut::words(Tag::Lists, &list_words(self)),
            SectionOut {
                tag: Tag::Codes,
                elem: 1,
                pieces: lists
                    .iter()
                    .map(|l| Cow::Borrowed(l.codes().data()))
                    .collect(),
            },
            SectionOut {
                tag: Tag::Ids,
                elem: 8,
                pieces: lists
                    .iter()
                    .map(|l| Cow::Borrowed(bytemuck::cast_slice(l.ids())))
                    .collect(),
            },
        ];
        if let Some(storage) = self.originals_storage() {
            secs.push(SectionOut {
                tag: Tag::Vectors,
                elem: if storage == RerankStorage::F32 { 4 } else { 2 },
                pieces: lists
                    .iter()
                    .map(|l| match l.originals().expect("kept by every list") {
                        FlatStorage::F32(v) => Cow::Borrowed(bytemuck::cast_slice(v.as_slice())),
                        FlatStorage::F16(v) => Cow::Borrowed(bytemuck::cast_slice(v.as_slice())),
                    })
                    .collect(),
            });
        }
        (IndexKind::IvfPqFastScan, secs)
    }
}

/// Any index a file can hold.
#[derive(Clone, Debug)]
pub enum AnyIndex {
    /// Exact.
    Flat(IndexFlat),
    /// PQ with float-table ADC.
    Pq(IndexPQ),
    /// 4-bit fast-scan PQ.
    PqFastScan(IndexPQFastScan),
    /// IVF over 4-bit fast-scan lists.
    IvfPqFastScan(IndexIVFPQFastScan),
}

impl AnyIndex {
    /// The kind.
    pub fn kind(&self) -> IndexKind {
        match self {
            AnyIndex::Flat(_) => IndexKind::Flat,
            AnyIndex::Pq(_) => IndexKind::Pq,
            AnyIndex::PqFastScan(_) => IndexKind::PqFastScan,
            AnyIndex::IvfPqFastScan(_) => IndexKind::IvfPqFastScan,
        }
    }

    /// The index behind the common trait.
    pub fn as_index(&self) -> &dyn Index {
        match self {
            AnyIndex::Flat(i) => i,
            AnyIndex::Pq(i) => i,
            AnyIndex::PqFastScan(i) => i,
            AnyIndex::IvfPqFastScan(i) => i,
        }
    }

    /// Mutable access behind the common trait.
    pub fn as_index_mut(&mut self) -> &mut dyn Index {
        match self {
            AnyIndex::Flat(i) => i,
            AnyIndex::Pq(i) => i,
            AnyIndex::PqFastScan(i) => i,
            AnyIndex::IvfPqFastScan(i) => i,
        }
    }

    /// One line per parameter, for `pqcache info`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let i = self.as_index();
        let mut out = vec![
            ("kind".into(), self.kind().name().into()),
            ("d".into(), i.dim().to_string()),
            ("ntotal".into(), i.ntotal().to_string()),
            ("metric".into(), i.metric().name().into()),
        ];
        match self {
            AnyIndex::Flat(f) => out.push((
                "storage".into(),
                match f.storage() {
                    FlatStorage::F32(_) => "f32".into(),
                    FlatStorage::F16(_) => "f16".into(),
                },
            )),
            AnyIndex::Pq(p) => {
                out.push(("m".into(), p.pq().m().to_string()));
                out.push(("nbits".into(), p.pq().nbits().bits().to_string()));
            }
            AnyIndex::PqFastScan(p) => {
                out.push(("m".into(), p.pq().m().to_string()));
                out.push(("nbits".into(), "4".into()));
                out.push(("originals".into(), storage_word(p.originals()).to_string()));
                out.push(("rerank_factor".into(), p.rerank_factor.to_string()));
            }
            AnyIndex::IvfPqFastScan(p) => {
                out.push(("nlist".into(), p.nlist().to_string()));
                out.push(("m".into(), p.pq().m().to_string()));
                out.push(("nbits".into(), "4".into()));
                out.push(("by_residual".into(), p.by_residual().to_string()));
                out.push(("nprobe".into(), p.nprobe.to_string()));
                out.push(("rerank_factor".into(), p.rerank_factor.to_string()));
                let dead: usize = p.lists().iter().map(|l| l.len() - l.live()).sum();
                out.push(("tombstones".into(), dead.to_string()));
            }
        }
        out
    }
}

impl Persist for AnyIndex {
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        match self {
            AnyIndex::Flat(i) => i.sections(),
            AnyIndex::Pq(i) => i.sections(),
            AnyIndex::PqFastScan(i) => i.sections(),
            AnyIndex::IvfPqFastScan(i) => i.sections(),
        }
    }
}

impl Index for AnyIndex {
    fn dim(&self) -> usize {
        self.as_index().dim()
    }
    fn ntotal(&self) -> usize {
        self.as_index().ntotal()
    }
    fn metric(&self) -> Metric {
        self.as_index().metric()
    }
    fn is_trained(&self) -> bool {
        self.as_index().is_trained()
    }
    fn train(&mut self, x: &[f32]) -> Result<()> {
        self.as_index_mut().train(x)
    }
    fn add(&mut self, x: &[f32]) -> Result<()> {
        self.as_index_mut().add(x)
    }
    fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        self.as_index().search(queries, k)
    }
    fn reset(&mut self) {
        self.as_index_mut().reset()
    }
}

/// The `meta` words, exactly `n` of them.
fn meta(r: &Reader<'_>, n: usize) -> Result<Vec<u64>> {
    let words: Vec<u64> = r.vec(Tag::Meta)?;
    if words.len() != n {
        return Err(corrupt(
            "meta",
            format!("{} words, expected {n}", words.len()),
        ));
    }
    Ok(words)
}

/// A `meta` word as a size no larger than `max`, or a corruption error naming it.
pub(crate) fn small(v: u64, max: usize, what: &str) -> Result<usize> {
    match usize::try_from(v) {
        Ok(x) if x <= max => Ok(x),
        _ => Err(corrupt(
            "meta",
            format!("{what} = {v} out of range (max {max})"),
        )),
    }
}

fn metric_of(v: u64) -> Result<Metric> {
    match v {
        0 => Ok(Metric::InnerProduct),
        1 => Ok(Metric::L2),
        other => Err(corrupt("meta", format!("unknown metric {other}"))),
    }
}

/// `a * b`, or a corruption error on overflow.
fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| corrupt("meta", format!("{what} overflows")))
}

/// Maps a constructor's complaint about the parts to a corruption of `section`.
fn parts<T>(section: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Corrupt { .. } => e,
        other => corrupt(section, other.to_string()),
    })
}

fn exact_count(r: &Reader<'_>, tag: Tag, want: usize) -> Result<()> {
    match r.count(tag) {
        Some(n) if n == want => Ok(()),
        Some(n) => Err(corrupt(
            tag.name(),
            format!("{n} elements, expected {want}"),
        )),
        None => Err(corrupt(tag.name(), "missing section")),
    }
}

fn storage(r: &Reader<'_>, word: u64, first: usize, n: usize) -> Result<Option<FlatStorage>> {
    Ok(match word {
        0 => None,
        1 => Some(FlatStorage::F32(r.buf::<f32>(Tag::Vectors, first, n)?)),
        2 => Some(FlatStorage::F16(r.buf::<f16>(Tag::Vectors, first, n)?)),
        other => return Err(corrupt("meta", format!("unknown storage {other}"))),
    })
}

fn quantizer(r: &Reader<'_>, d: usize, m: usize, nbits: Nbits) -> Result<ProductQuantizer> {
    if m == 0 || !d.is_multiple_of(m) {
        return Err(corrupt("meta", format!("m = {m} does not divide d = {d}")));
    }
    let cents: Vec<f32> = r.vec(Tag::PqCentroids)?;
    parts(
        "pq_centroids",
        ProductQuantizer::from_centroids(d, m, nbits, cents),
    )
}

/// Reads the index a validated file holds.
pub(crate) fn read(r: &Reader<'_>) -> Result<AnyIndex> {
    match r.info.kind {
        IndexKind::Flat => {
            let w = meta(r, 4)?;
            let d = small(w[0], MAX_DIM, "d")?.max(1);
            let metric = metric_of(w[1])?;
            let n = small(w[3], usize::MAX, "ntotal")?;
            let values = mul(n, d, "ntotal * d")?;
            exact_count(r, Tag::Vectors, values)?;
            let st = storage(r, w[2], 0, values)?
                .ok_or_else(|| corrupt("meta", "a flat index needs stored vectors"))?;
            let nn = if metric == Metric::L2 { n } else { 0 };
            exact_count(r, Tag::Norms, nn)?;
            let norms = r.buf::<f32>(Tag::Norms, 0, nn)?;
            Ok(AnyIndex::Flat(parts(
                "vectors",
                IndexFlat::from_parts(d, metric, st, norms),
            )?))
        }
        IndexKind::Pq => {
            let w = meta(r, 5)?;
            let d = small(w[0], MAX_DIM, "d")?;
            let metric = metric_of(w[1])?;
            let m = small(w[2], MAX_DIM, "m")?;
            let nbits = parts("meta", Nbits::from_bits(small(w[3], 64, "nbits")?))?;
            let n = small(w[4], usize::MAX, "ntotal")?;
            let pq = quantizer(r, d, m, nbits)?;
            let bytes = mul(n, m, "ntotal * m")?;
            exact_count(r, Tag::Codes, bytes)?;
            let codes = r.buf::<u8>(Tag::Codes, 0, bytes)?;
            Ok(AnyIndex::Pq(parts(
                "codes",
                IndexPQ::from_parts(pq, metric, codes),
            )?))
        }
        IndexKind::PqFastScan => {
            let w = meta(r, 7)?;
            let d = small(w[0], MAX_DIM, "d")?;
            let metric = metric_of(w[1])?;
            let m = small(w[2], 256, "m")?;
            let n = small(w[3], usize::MAX, "ntotal")?;
            let pq = quantizer(r, d, m, Nbits::Four)?;
            let bytes = mul(n.div_ceil(BBS), block_bytes(m + m % 2), "code blocks")?;
            exact_count(r, Tag::Codes, bytes)?;
            let codes = parts(
                "codes",
                PackedCodes::from_parts(m, n, r.buf::<u8>(Tag::Codes, 0, bytes)?),
            )?;
            let values = mul(n, d, "ntotal * d")?;
            if w[4] != 0 {
                exact_count(r, Tag::Vectors, values)?;
            }
            let originals = storage(r, w[4], 0, values)?;
            let mut idx = parts(
                "codes",
                IndexPQFastScan::from_parts(pq, metric, codes, originals),
            )?;
            idx.rerank_factor = small(w[5], MAX_RERANK_FACTOR, "rerank_factor")?;
            idx.qbs = small(w[6], pqcache_simd::fastscan::MAX_QBS, "qbs")?.max(1);
            Ok(AnyIndex::PqFastScan(idx))
        }
        IndexKind::IvfPqFastScan => read_ivf(r),
        IndexKind::Attention | IndexKind::Context => Err(Error::InvalidArgument(format!(
            "the file holds an {}: use open_attention / load_attention",
            if r.info.kind == IndexKind::Context {
                "attention cache and a model's state (a context)"
            } else {
                "attention cache"
            }
        ))),
    }
}

fn read_ivf(r: &Reader<'_>) -> Result<AnyIndex> {
    let w = meta(r, 13)?;
    let d = small(w[0], MAX_DIM, "d")?;
    let metric = metric_of(w[1])?;
    let nlist = small(w[2], MAX_NLIST, "nlist")?;
    let m = small(w[3], 256, "m")?;
    let by_residual = match w[4] {
        0 => false,
        1 => true,
        other => return Err(corrupt("meta", format!("by_residual = {other}"))),
    };
    let keep = match w[5] {
        0 => None,
        1 => Some(RerankStorage::F32),
        2 => Some(RerankStorage::F16),
        other => return Err(corrupt("meta", format!("unknown storage {other}"))),
    };
    let coarse_c: Vec<f32> = r.vec(Tag::CoarseCentroids)?;
    let coarse = parts(
        "coarse_centroids",
        CoarseQuantizer::from_centroids(d.max(1), nlist, metric, coarse_c),
    )?;
    let pq = quantizer(r, d, m, Nbits::Four)?;
    let words: Vec<u64> = r.vec(Tag::Lists)?;
    if words.len() != 2 * nlist {
        return Err(corrupt(
            "lists",
            format!("{} words for {nlist} lists", words.len()),
        ));
    }
    let bb = block_bytes(m + m % 2);
    let (mut entries, mut blocks) = (0usize, 0usize);
    let mut lists = Vec::with_capacity(nlist);
    for pair in words.chunks_exact(2) {
        let len = small(pair[0], u32::MAX as usize, "list length")?;
        let fresh = small(pair[1], u32::MAX as usize, "fresh_from")?;
        let nb = len.div_ceil(BBS);
        let codes = parts(
            "codes",
            PackedCodes::from_parts(
                m,
                len,
                r.buf::<u8>(Tag::Codes, mul(blocks, bb, "codes")?, nb * bb)?,
            ),
        )?;
        let ids = r.buf::<i64>(Tag::Ids, entries, len)?;
        let originals = match keep {
            None => None,
            Some(_) => storage(
                r,
                w[5],
                mul(entries, d, "vectors")?,
                mul(len, d, "vectors")?,
            )?,
        };
        lists.push(parts(
            "ids",
            InvertedList::from_parts(codes, ids, originals, fresh, d),
        )?);
        entries = entries
            .checked_add(len)
            .ok_or_else(|| corrupt("lists", "entry count overflows"))?;
        blocks += nb;
    }
    exact_count(r, Tag::Codes, mul(blocks, bb, "codes")?)?;
    exact_count(r, Tag::Ids, entries)?;
    if keep.is_some() {
        exact_count(r, Tag::Vectors, mul(entries, d, "vectors")?)?;
    }
    let drift = DriftStats {
        train_mse: f64::from_bits(w[10]),
        added_sq_err: f64::from_bits(w[11]),
        added: small(w[12], usize::MAX, "added")?,
    };
    let mut idx = parts(
        "lists",
        IndexIVFPQFastScan::from_parts(
            coarse,
            pq,
            metric,
            by_residual,
            lists,
            keep,
            w[6] as i64,
            drift,
        ),
    )?;
    idx.nprobe = small(w[7], MAX_NLIST, "nprobe")?.max(1);
    idx.rerank_factor = small(w[8], MAX_RERANK_FACTOR, "rerank_factor")?;
    idx.refresh_sample = small(w[9], usize::MAX, "refresh_sample")?;
    Ok(AnyIndex::IvfPqFastScan(idx))
}
