//! Each index kind's file codec ([`Persist`] and its reader), and the index entry points
//! of the file container ([`crate::io::container`]): [`open`] (zero-copy), [`load`],
//! [`load_bytes`], returning an [`AnyIndex`].
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

use super::any::AnyIndex;
use super::fastscan::RerankStorage;
use super::flat::FlatStorage;
use super::ivf::{DriftStats, IndexIVFPQFastScan, InvertedList};
use super::{Index, IndexFlat, IndexPQ, IndexPQFastScan};
use crate::error::{Error, Result};
use crate::io::container::{
    corrupt, exact_count, map_file, meta, metric_of, metric_word, mul, parts, read_file, small,
    IndexKind, Persist, Reader, SectionOut, Source, Tag,
};
use crate::ivf::CoarseQuantizer;
use crate::metric::Metric;
use crate::pq::pack::PackedCodes;
use crate::pq::{Nbits, ProductQuantizer};
use std::path::Path;

use half::f16;
use pqcache_simd::fastscan::{block_bytes, BBS};
use std::borrow::Cow;

use crate::limits::{MAX_DIM, MAX_NLIST, MAX_RERANK_FACTOR};

/// The `meta` word of a kind's stored vectors (0 none, 1 f32, 2 f16).
pub(crate) fn storage_word(s: Option<&FlatStorage>) -> u64 {
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

/// Opens an index file zero-copy: the bulk arrays stay in the mapping.
pub fn open(path: impl AsRef<Path>) -> Result<AnyIndex> {
    let map = map_file(path.as_ref())?;
    read(&Reader::new(Source::Map(&map))?)
}

/// Reads an index file into owned memory.
pub fn load(path: impl AsRef<Path>) -> Result<AnyIndex> {
    load_bytes(&read_file(path.as_ref())?)
}

/// Reads an index from the bytes of a file (owned memory; the fuzz targets' entry point).
pub fn load_bytes(bytes: &[u8]) -> Result<AnyIndex> {
    read(&Reader::new(Source::Bytes(bytes))?)
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
