//! Index files for the attention client: the whole KV cache and every (layer, kv_head)'s
//! trained index in one file of kind `attention` (layout in [`crate::io::container`]).
//!
//! ```text
//! meta       layers, kv_heads, group, head_dim, sink, window (u64::MAX: from the budget),
//!            budget kind (0 ratio, 1 tokens), budget (f64 bits or count), aggregation
//!            (0 sum, 1 max), scale (f32 bits), tail term (0 off, 1 on; from format 3: older
//!            files read on, the default)
//! selector   the selector spec: from format 3, five words `[kind, a, b, c, d]`
//!            (`SelectorSpec::to_words`); before, its command-line text ("fastscan:64x4:rerank4")
//! lists      per head (layer-major, then kv_head): positions, state (0 untrained: exact
//!            selection, 1 rebuilt from the keys, 2 pq, 3 fast-scan); from format 4 also the
//!            queries seen and the positions its index was trained on (0: none)
//! head_stats from format 4, f64 per head: its value sums (head_dim), then its query energy:
//!            from format 5 `QueryEnergy::stored_words` (head_dim^2 outer-product sums up to
//!            head_dim 512, else head_dim sums of squares), in format 4 head_dim sums of
//!            squares; before, the value sums were summed again from the values on open (a
//!            read of every value) and the energy started empty
//! keys       f16, head after head (positions * head_dim each); values: the same
//! pq_centroids, codes   per head with a trained index, head after head
//! transform  per fast-scan head, head after head: from format 5 a kind word (0 diagonal, 1
//!            full), then for a diagonal map its permutation (head_dim u32) and scales
//!            (head_dim f32 bits), for a full map its key then query matrices (head_dim^2 f32
//!            bits each, row-major); before format 5 always the diagonal's two arrays, no
//!            kind word; absent in files of format 1, whose fast-scan heads read the identity
//! ```
//!
//! Opening maps the file: keys, values and fast-scan / PQ codes stay in the mapping (a head
//! copies its arrays on its first `append`); codebooks are copied; quest pages are rebuilt
//! from the keys. Every section but keys and values has its checksum checked on open (the
//! codes too: every step reads them whole); [`crate::io::file::verify`] checks those two as
//! well.

use super::selector::{Aggregation, RestoredHead, SelectorSpec, StoredHead};
use super::{AttentionRetriever, AttentionShape, Budget, RetrieverConfig};
use crate::buf::Mapping;
use crate::error::{Error, Result};
use crate::index::{IndexPQ, IndexPQFastScan};
use crate::io::container::{
    corrupt, map_file, read_file, small, write_sections, FileInfo, FormatVersion, IndexKind,
    Persist, Reader, SectionOut, Source, Tag,
};
use crate::metric::Metric;
use crate::pq::pack::PackedCodes;
use crate::pq::transform::{DimTransform, Map, QueryEnergy};
use crate::pq::{Nbits, ProductQuantizer};
use half::f16;
use pqcache_simd::fastscan::{block_bytes, BBS};
use std::borrow::Cow;
use std::path::Path;

const NO_WINDOW: u64 = u64::MAX;
/// From format 5, the first word of a head's transform: a permutation and scales follow.
const TRANSFORM_DIAGONAL: u32 = 0;
/// From format 5, the first word of a head's transform: the key and query maps follow.
const TRANSFORM_FULL: u32 = 1;
/// Words per head in `lists` (format 4; 2 before).
const LIST_WORDS: usize = 4;
/// Bounds on what a file may declare.
const MAX_HEADS: usize = 1 << 16;
const MAX_DIM: usize = 1 << 16;
/// `heads * head_dim` a file may declare whatever its keys (an empty cache of this size is
/// 16 MB of head states).
const MIN_HEAD_STATE_ELEMS: usize = 1 << 20;

impl Persist for AttentionRetriever {
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>) {
        let c = &self.cfg;
        let (budget_kind, budget) = match c.budget {
            Budget::Ratio(r) => (0, r.to_bits()),
            Budget::Tokens(t) => (1, t as u64),
        };
        let meta = vec![
            c.shape.layers as u64,
            c.shape.kv_heads as u64,
            c.group() as u64,
            c.shape.head_dim as u64,
            c.sink as u64,
            c.window.map_or(NO_WINDOW, |w| w as u64),
            budget_kind,
            budget,
            match c.aggregation {
                Aggregation::SumSoftmax => 0,
                Aggregation::MaxSoftmax => 1,
            },
            c.scale.to_bits() as u64,
            c.tail_term as u64,
        ];
        let mut words = Vec::with_capacity(LIST_WORDS * self.heads.len());
        let (mut cents, mut codes, mut transforms) = (Vec::new(), Vec::new(), Vec::new());
        let mut stats = Vec::with_capacity(2 * self.heads.len());
        for h in &self.heads {
            let (state, trained_len) = match h.index.as_ref().map(|i| i.stored()) {
                None => (0, 0),
                Some(StoredHead::Nothing) => (1, 0),
                Some(StoredHead::Pq(pq)) => {
                    cents.push(Cow::Borrowed(bytemuck::cast_slice(pq.pq().centroids())));
                    codes.push(Cow::Borrowed(pq.codes()));
                    (2, 0)
                }
                Some(StoredHead::FastScan(fs, transform, trained_len)) => {
                    cents.push(Cow::Borrowed(bytemuck::cast_slice(fs.pq().centroids())));
                    codes.push(Cow::Borrowed(fs.packed_codes().data()));
                    match transform.map() {
                        Map::Diagonal { perm, scale } => {
                            transforms.push(Cow::Owned(TRANSFORM_DIAGONAL.to_le_bytes().to_vec()));
                            transforms.push(Cow::Borrowed(bytemuck::cast_slice(perm)));
                            transforms.push(Cow::Borrowed(bytemuck::cast_slice(scale)));
                        }
                        Map::Full { keys, queries, .. } => {
                            transforms.push(Cow::Owned(TRANSFORM_FULL.to_le_bytes().to_vec()));
                            transforms.push(Cow::Borrowed(bytemuck::cast_slice(keys)));
                            transforms.push(Cow::Borrowed(bytemuck::cast_slice(queries)));
                        }
                    }
                    (3, trained_len as u64)
                }
            };
            words.push((h.keys.len() / c.shape.head_dim) as u64);
            words.push(state);
            words.push(h.queries.count() as u64);
            words.push(trained_len);
            stats.push(Cow::Borrowed(bytemuck::cast_slice(h.value_sum.as_slice())));
            stats.push(match h.queries.stored_words() {
                Cow::Borrowed(w) => Cow::Borrowed(bytemuck::cast_slice(w)),
                Cow::Owned(w) => Cow::Owned(bytemuck::cast_slice(&w).to_vec()),
            });
        }
        let spec = c.selector.to_words().to_vec();
        let mut secs = vec![
            SectionOut::words(Tag::Meta, &meta),
            SectionOut::words(Tag::Selector, &spec),
            SectionOut::words(Tag::Lists, &words),
            SectionOut {
                tag: Tag::Keys,
                elem: 2,
                pieces: self
                    .heads
                    .iter()
                    .flat_map(|h| h.keys.pieces())
                    .map(|p| Cow::Borrowed(bytemuck::cast_slice(p)))
                    .collect(),
            },
            SectionOut {
                tag: Tag::Values,
                elem: 2,
                pieces: self
                    .heads
                    .iter()
                    .flat_map(|h| h.values.pieces())
                    .map(|p| Cow::Borrowed(bytemuck::cast_slice(p)))
                    .collect(),
            },
            SectionOut {
                tag: Tag::HeadStats,
                elem: 8,
                pieces: stats,
            },
            SectionOut {
                tag: Tag::PqCentroids,
                elem: 4,
                pieces: cents,
            },
            SectionOut {
                tag: Tag::Codes,
                elem: 1,
                pieces: codes,
            },
        ];
        if !transforms.is_empty() {
            secs.push(SectionOut {
                tag: Tag::Transform,
                elem: 4,
                pieces: transforms,
            });
        }
        (IndexKind::Attention, secs)
    }
}

fn checked(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| corrupt("lists", "sizes overflow"))
}

/// Reads an attention cache from a validated file.
pub(crate) fn read(r: &Reader<'_>) -> Result<AttentionRetriever> {
    // Everything but the keys and values is checked: small, or read by every step anyway.
    for tag in [
        Tag::Selector,
        Tag::Lists,
        Tag::HeadStats,
        Tag::PqCentroids,
        Tag::Codes,
        Tag::Transform,
    ] {
        r.check(tag)?;
    }
    let v4 = r.info.version >= FormatVersion::V4 as u32;
    let list_words = if v4 { LIST_WORDS } else { 2 };
    let w: Vec<u64> = r.vec(Tag::Meta)?;
    // Format 3 added the tail-term word.
    let words = if r.info.version >= FormatVersion::V3 as u32 {
        11
    } else {
        10
    };
    if w.len() != words {
        return Err(corrupt(
            "meta",
            format!(
                "{} words, expected {words} in format {}",
                w.len(),
                r.info.version
            ),
        ));
    }
    // Format 3 stores the spec as typed words; older files as its command-line text.
    let spec: SelectorSpec = if r.info.version >= FormatVersion::V3 as u32 {
        let w: Vec<u64> = r.vec(Tag::Selector)?;
        SelectorSpec::from_words(&w).map_err(|e| corrupt("selector", e))?
    } else {
        let text: Vec<u8> = r.vec(Tag::Selector)?;
        std::str::from_utf8(&text)
            .map_err(|_| corrupt("selector", "not UTF-8"))?
            .parse()
            .map_err(|e: Error| corrupt("selector", e.to_string()))?
    };
    let (layers, kv_heads) = (
        small(w[0], MAX_HEADS, "layers")?,
        small(w[1], MAX_HEADS, "kv_heads")?,
    );
    let mut cfg = RetrieverConfig::new(AttentionShape {
        layers,
        query_heads: checked(small(w[2], MAX_HEADS, "group")?, kv_heads)?,
        kv_heads,
        head_dim: small(w[3], MAX_DIM, "head_dim")?,
    });
    cfg.sink = small(w[4], u32::MAX as usize, "sink")?;
    cfg.window = match w[5] {
        NO_WINDOW => None,
        v => Some(small(v, u32::MAX as usize, "window")?),
    };
    cfg.budget = match w[6] {
        0 => Budget::Ratio(f64::from_bits(w[7])),
        1 => Budget::Tokens(small(w[7], u32::MAX as usize, "budget")?),
        other => return Err(corrupt("meta", format!("budget kind {other}"))),
    };
    cfg.aggregation = match w[8] {
        0 => Aggregation::SumSoftmax,
        1 => Aggregation::MaxSoftmax,
        other => return Err(corrupt("meta", format!("aggregation {other}"))),
    };
    cfg.scale = f32::from_bits(small(w[9], u32::MAX as usize, "scale")? as u32);
    cfg.tail_term = match w.get(10) {
        None | Some(1) => true,
        Some(0) => false,
        Some(other) => return Err(corrupt("meta", format!("tail term {other}"))),
    };
    cfg.selector = spec.clone();
    let (layers, h, d) = (cfg.shape.layers, cfg.shape.kv_heads, cfg.shape.head_dim);
    let nheads = checked(layers, h)?;
    // Counts from the meta must be backed by bytes before anything is allocated from them:
    // the lists section holds `list_words` words per head, and each head's state takes `2 d`
    // f64 (query energy, value sums) however few positions it holds: from format 4 the
    // head_stats section holds exactly those; before, `heads * d` is bounded by the file's
    // keys and values (4 bytes per element and position) or a small floor.
    if r.count(Tag::Lists) != Some(checked(nheads, list_words)?) {
        return Err(corrupt(
            "lists",
            format!("the section does not hold {list_words} words for each of {nheads} heads"),
        ));
    }
    // Per head in head_stats: the value sums, then the query energy (format 5: its stored
    // words, `d^2` up to `FULL_MOMENT_MAX_DIM`; format 4: `d` sums of squares).
    let v5 = r.info.version >= FormatVersion::V5 as u32;
    let energy_len = if v5 {
        QueryEnergy::stored_len(d).ok_or_else(|| corrupt("meta", "head_dim too large"))?
    } else {
        d
    };
    let stat_len = checked(d, 1)?
        .checked_add(energy_len)
        .ok_or_else(|| corrupt("meta", "head_dim too large"))?;
    let stats: Option<Vec<f64>> = if v4 {
        if r.count(Tag::HeadStats) != Some(checked(nheads, stat_len)?) {
            return Err(corrupt(
                "head_stats",
                format!(
                    "the section does not hold {d} + {energy_len} values for each of {nheads} heads"
                ),
            ));
        }
        Some(r.vec(Tag::HeadStats)?)
    } else {
        let backed = r
            .count(Tag::Keys)
            .unwrap_or(0)
            .saturating_add(r.count(Tag::Values).unwrap_or(0))
            .max(MIN_HEAD_STATE_ELEMS);
        if checked(nheads, d)? > backed {
            return Err(corrupt(
                "meta",
                format!(
                    "{nheads} heads of dimension {d} are more than the file's keys and values back"
                ),
            ));
        }
        None
    };
    let mut ret = AttentionRetriever::new(cfg).map_err(|e| corrupt("meta", e.to_string()))?;
    let words: Vec<u64> = r.vec(Tag::Lists)?;
    let (mut kv_at, mut cent_at, mut code_at, mut transform_at) = (0usize, 0usize, 0usize, 0usize);
    let has_transforms = r.count(Tag::Transform).is_some();
    let mut layer_len: Vec<Option<usize>> = vec![None; layers];
    for (i, pair) in words.chunks_exact(list_words).enumerate() {
        let t = small(pair[0], u32::MAX as usize, "positions")?;
        // From format 4: the queries seen and the positions the index was trained on.
        let (query_count, trained_len) = match pair {
            [_, _, q, tl] => (
                small(*q, usize::MAX, "queries")?,
                Some(small(*tl, u32::MAX as usize, "trained positions")?),
            ),
            _ => (0, None),
        };
        let n = checked(t, d)?;
        // Every kv_head of a layer holds the same positions.
        let layer = i / h;
        match layer_len[layer] {
            Some(len) if len != t => {
                return Err(corrupt(
                    "lists",
                    format!("layer {layer}: heads of {len} and {t} positions"),
                ))
            }
            _ => layer_len[layer] = Some(t),
        }
        let keys = r.buf::<f16>(Tag::Keys, kv_at, n)?;
        let values = r.buf::<f16>(Tag::Values, kv_at, n)?;
        kv_at += n;
        let part = match (pair[1], &spec) {
            (0, _) => None,
            (1, _) => Some(RestoredHead::Nothing),
            (2, SelectorSpec::Pq { m, nbits }) => {
                let nb =
                    Nbits::from_bits(*nbits).map_err(|e| corrupt("selector", e.to_string()))?;
                let pq = quantizer(r, d, *m, nb, &mut cent_at)?;
                let bytes = checked(t, *m)?;
                let codes = r.buf::<u8>(Tag::Codes, code_at, bytes)?;
                code_at += bytes;
                let idx = IndexPQ::from_parts(pq, Metric::InnerProduct, codes)
                    .map_err(|e| corrupt("codes", e.to_string()))?;
                Some(RestoredHead::Pq(idx))
            }
            (3, SelectorSpec::FastScan { m, .. }) => {
                let pq = quantizer(r, d, *m, Nbits::Four, &mut cent_at)?;
                let bytes = checked(t.div_ceil(BBS), block_bytes(*m + *m % 2))?;
                let buf = r.buf::<u8>(Tag::Codes, code_at, bytes)?;
                code_at += bytes;
                let codes = PackedCodes::from_parts(*m, t, buf)
                    .map_err(|e| corrupt("codes", e.to_string()))?;
                let idx = IndexPQFastScan::from_parts(pq, Metric::InnerProduct, codes, None)
                    .map_err(|e| corrupt("codes", e.to_string()))?;
                let transform = if has_transforms {
                    read_transform(r, d, v5, &mut transform_at)?
                } else {
                    DimTransform::identity(d)
                };
                Some(RestoredHead::FastScan(idx, transform, trained_len))
            }
            (state, _) => {
                return Err(corrupt(
                    "lists",
                    format!("head state {state} does not fit the selector {spec}"),
                ))
            }
        };
        let head = &mut ret.heads[i];
        head.index = match part {
            Some(p) => Some(
                spec.restore(&keys, d, i as u64, p)
                    .map_err(|e| corrupt("lists", e.to_string()))?,
            ),
            None => None,
        };
        head.keys = super::rows::RowStore::from_buf(keys);
        match &stats {
            Some(stats) => {
                let own = &stats[i * stat_len..(i + 1) * stat_len];
                if let Some(bad) = own[..d].iter().find(|v| !v.is_finite()) {
                    return Err(corrupt(
                        "head_stats",
                        format!("head {i}: a value sum of {bad}"),
                    ));
                }
                head.value_sum.copy_from_slice(&own[..d]);
                head.queries = QueryEnergy::from_parts(d, own[d..].to_vec(), query_count)
                    .map_err(|e| corrupt("head_stats", format!("head {i}: {e}")))?;
            }
            None => super::add_rows(&mut head.value_sum, &values),
        }
        head.values = super::rows::RowStore::from_buf(values);
    }
    for (tag, used) in [
        (Tag::Keys, kv_at),
        (Tag::Values, kv_at),
        (Tag::PqCentroids, cent_at),
        (Tag::Codes, code_at),
        (Tag::Transform, transform_at),
    ] {
        // Format-1 files have no transform section (their heads read the identity).
        let optional = tag == Tag::Transform && !has_transforms;
        if !optional && r.count(tag) != Some(used) {
            return Err(corrupt(tag.name(), "size does not match the heads"));
        }
    }
    Ok(ret)
}

/// One fast-scan head's transform at word `at` of the transform section: from format 5 a
/// kind word, then a permutation and scales (`2 d` words) or the key and query maps
/// (`2 d^2`); before, always the permutation and scales.
fn read_transform(r: &Reader<'_>, d: usize, v5: bool, at: &mut usize) -> Result<DimTransform> {
    let kind = if v5 {
        let k = r.buf::<u32>(Tag::Transform, *at, 1)?[0];
        *at += 1;
        k
    } else {
        TRANSFORM_DIAGONAL
    };
    let floats = |at: usize, n: usize| -> Result<Vec<f32>> {
        Ok(r.buf::<u32>(Tag::Transform, at, n)?
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect())
    };
    let bad = |e: Error| corrupt("transform", e.to_string());
    match kind {
        TRANSFORM_DIAGONAL => {
            let perm = r.buf::<u32>(Tag::Transform, *at, d)?.to_vec();
            let scale = floats(*at + d, d)?;
            *at += 2 * d;
            DimTransform::from_parts(perm, scale).map_err(bad)
        }
        TRANSFORM_FULL => {
            let dd = checked(d, d)?;
            let keys = floats(*at, dd)?;
            let queries = floats(*at + dd, dd)?;
            *at += 2 * dd;
            DimTransform::from_matrices(d, keys, queries).map_err(bad)
        }
        other => Err(corrupt("transform", format!("transform kind {other}"))),
    }
}

fn quantizer(
    r: &Reader<'_>,
    d: usize,
    m: usize,
    nbits: Nbits,
    at: &mut usize,
) -> Result<ProductQuantizer> {
    let n = checked(nbits.ksub(), d)?;
    let cents = r.buf::<f32>(Tag::PqCentroids, *at, n)?.to_vec();
    *at += n;
    ProductQuantizer::from_centroids(d, m, nbits, cents)
        .map_err(|e| corrupt("pq_centroids", e.to_string()))
}

// Entry points: the cache (and a context: the cache and a client's state) from and to files
// of the container (`crate::io::container`), as `AttentionRetriever::{save, open, load}`
// and the free functions `crate::io::file` re-exports.

/// Opens an attention cache file zero-copy (keys, values and codes stay in the mapping). A
/// context file opens too (its client state is left unread).
pub fn open(path: impl AsRef<Path>) -> Result<AttentionRetriever> {
    let map = map_file(path.as_ref())?;
    let r = Reader::new(Source::Map(&map))?;
    advise_attention(&map, &r.info, Access::Selected);
    read_cache(&r)
}

/// How decoding will read an opened cache's keys and values (advice to the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Only the rows steps select (`MADV_RANDOM`: no read-ahead around a fault): a cold file
    /// reads the pages its steps touch and no others, and a cache larger than memory keeps
    /// only those resident. A cold start faults page by page.
    #[default]
    Selected,
    /// All of them soon (`MADV_WILLNEED` over the file: read ahead now, in the background):
    /// the quickest cold start when the file fits in memory (measured: 4x quicker to the
    /// first token at 32K tokens on this machine's disk), the wrong choice when it does not.
    Prefetch,
}

/// Tells the kernel how decoding reads an opened cache: keys and values as `access` says,
/// the codes whole at every step (read ahead now: `MADV_WILLNEED`). Advice only: ignored
/// where the system refuses it.
fn advise_attention(map: &Mapping, info: &FileInfo, access: Access) {
    #[cfg(unix)]
    for s in &info.sections {
        let advice = match (s.tag, access) {
            (Tag::Keys | Tag::Values, Access::Selected) => memmap2::Advice::Random,
            (Tag::Keys | Tag::Values, Access::Prefetch) | (Tag::Codes, _) => {
                memmap2::Advice::WillNeed
            }
            _ => continue,
        };
        if s.len > 0 {
            let _ = map.advise_range(advice, s.offset, s.len);
        }
    }
    #[cfg(not(unix))]
    let _ = (map, info, access);
}

/// Reads an attention cache file into owned memory.
pub fn load(path: impl AsRef<Path>) -> Result<AttentionRetriever> {
    load_bytes(&read_file(path.as_ref())?)
}

/// Reads an attention cache from the bytes of a file.
pub fn load_bytes(bytes: &[u8]) -> Result<AttentionRetriever> {
    read_cache(&Reader::new(Source::Bytes(bytes))?)
}

fn read_cache(r: &Reader<'_>) -> Result<AttentionRetriever> {
    match r.info.kind {
        IndexKind::Attention => {}
        IndexKind::Context if r.info.version >= FormatVersion::V4 as u32 => {}
        IndexKind::Context => {
            return Err(corrupt(
                "header",
                format!(
                    "a context file of format {} (contexts began with 4)",
                    r.info.version
                ),
            ))
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "the file holds a {} index, not an attention cache: use open / load",
                other.name()
            )))
        }
    }
    read(r)
}

/// What a client (a model runtime) keeps beside an attention cache in a context file, to
/// resume where it stopped: parameters as `u64` words and arrays as f32, opaque to this
/// crate, checksummed and checked on open like every section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientState {
    /// Parameters.
    pub words: Vec<u64>,
    /// Arrays.
    pub data: Vec<f32>,
}

/// Saves `cache` and `client` as one context file, atomically (see the module doc).
pub fn save_context(
    path: impl AsRef<Path>,
    cache: &AttentionRetriever,
    client: &ClientState,
) -> Result<()> {
    cache.check_limits()?;
    let (_, mut sections) = cache.sections();
    sections.push(SectionOut::of(Tag::ClientWords, &client.words));
    sections.push(SectionOut::of(Tag::ClientData, &client.data));
    write_sections(path.as_ref(), IndexKind::Context, &sections)
}

/// Opens a context file: the attention cache zero-copy (as [`open`]), the client
/// state copied.
pub fn open_context(path: impl AsRef<Path>) -> Result<(AttentionRetriever, ClientState)> {
    open_context_with(path, Access::Selected)
}

/// [`open_context`], its keys and values to be read as `access` says.
pub fn open_context_with(
    path: impl AsRef<Path>,
    access: Access,
) -> Result<(AttentionRetriever, ClientState)> {
    let map = map_file(path.as_ref())?;
    let r = Reader::new(Source::Map(&map))?;
    advise_attention(&map, &r.info, access);
    read_context(&r)
}

/// [`open_context`] from the bytes of a file (owned memory).
pub fn load_context_bytes(bytes: &[u8]) -> Result<(AttentionRetriever, ClientState)> {
    read_context(&Reader::new(Source::Bytes(bytes))?)
}

pub(crate) fn read_context(r: &Reader<'_>) -> Result<(AttentionRetriever, ClientState)> {
    if r.info.kind != IndexKind::Context {
        return Err(Error::InvalidArgument(format!(
            "the file holds a {} index, not a context",
            r.info.kind.name()
        )));
    }
    let cache = read_cache(r)?;
    r.check(Tag::ClientWords)?;
    r.check(Tag::ClientData)?;
    let client = ClientState {
        words: r.vec(Tag::ClientWords)?,
        data: r.vec(Tag::ClientData)?,
    };
    Ok((cache, client))
}

impl AttentionRetriever {
    /// Saves the cache atomically ([`crate::io::file::save`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::io::container::save(self, path)
    }

    /// Opens a cache file zero-copy (keys, values and codes stay in the mapping); a context
    /// file opens too, its client state left unread.
    pub fn open(path: impl AsRef<Path>) -> Result<AttentionRetriever> {
        open(path)
    }

    /// Reads a cache file into owned memory.
    pub fn load(path: impl AsRef<Path>) -> Result<AttentionRetriever> {
        load(path)
    }
}
