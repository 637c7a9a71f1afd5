//! The file container: one little-endian layout for every kind of file, knowing no kind.
//! It lays out, checksums, writes atomically and reads back sections of plain arrays; each
//! kind's codec (`index::persist`, `attention::persist`) implements [`Persist`] and reads its
//! sections through `Reader`; [`crate::io::file`] is the facade over all of them. It
//! imports only the error and buffer modules (the bottom floor).
//!
//! ```text
//! offset        size       content
//! 0             64         header
//!                            0  magic      b"PQCACHE\0"
//!                            8  version    u32   (FormatVersion)
//!                           12  kind       u32   (IndexKind: 1 flat, 2 pq, 3 pq fast-scan, 4 ivf fast-scan,
//!                                                  5 attention cache, 6 context: an attention
//!                                                  cache and a client's state, format 4)
//!                           16  flags      u32   (0; reserved)
//!                           20  nsections  u32   (<= MAX_SECTIONS)
//!                           24  file_len   u64   (the whole file, footer included)
//!                           32  table_crc  u32   (CRC-32 of the section table)
//!                           36  reserved   24 zero bytes
//!                           60  header_crc u32   (CRC-32 of bytes 0..60)
//! 64            32 * n     section table, one entry per section:
//!                            0  tag u32 (Tag) | 4 elem u32 (element size: 1, 2, 4 or 8)
//!                            8  offset u64    | 16 len u64 (bytes) | 24 crc u32 | 28 zero u32
//! align 64      ...        sections, each at a multiple of 64, zero padding between
//! len - 16      16         footer: b"PQCEND\0\0", header_crc u32, table_crc u32
//! ```
//!
//! Every section is an array of little-endian scalars (`u8`, `f16`, `f32`, `i64`, `u64`);
//! `meta` holds the kind's parameters as `u64` words (see `crate::index::persist` and
//! `crate::attention::persist`). Nothing is serialised with a generic encoder: the arrays
//! are read in place.
//!
//! **Open** ([`crate::io::file::open`]) maps the file and checks, before trusting anything:
//! length, magic, version, kind, flags, header and table CRCs, the footer, every section's
//! bounds, alignment, element size and overlap, the `meta` CRC, then the kind's invariants
//! (shapes, `nbits`, code lengths against `ntotal`, ids `>= -1`, codes `< ksub`, finite
//! centroids). The bulk arrays (codes, ids, stored vectors, norms) are then used straight
//! from the mapping through [`Buf`]; the small ones (centroids) are copied. **Load** (`load`)
//! does the same into owned memory. **Verify** ([`crate::io::file::verify`]) also checks
//! every section's CRC and that the padding is zero: a flipped bit anywhere in the file is
//! found.
//!
//! **Growth**: an opened index is an ordinary index. Its first `add` or removal copies the
//! arrays it changes into owned memory (copy on write) and leaves the rest mapped; searches
//! never copy. Save it again with [`save`] (to any path, the opened one included: the mapping
//! stays valid, since the new file replaces the name, not the old file's bytes).
//!
//! **Save** ([`save`]) writes a temporary file in the destination folder, fsyncs it, renames
//! it over the destination and fsyncs the folder: a crash leaves the old file or the new one.

use crate::buf::{Buf, Mapping};
use crate::error::{Error, Result};
use crate::metric::Metric;
use bytemuck::Pod;
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// File magic.
pub const MAGIC: [u8; 8] = *b"PQCACHE\0";
/// Footer magic.
pub const FOOTER_MAGIC: [u8; 8] = *b"PQCEND\0\0";
/// Header size.
pub const HEADER_LEN: usize = 64;
/// Section table entry size.
pub const ENTRY_LEN: usize = 32;
/// Footer size.
pub const FOOTER_LEN: usize = 16;
/// Section alignment.
pub const ALIGN: usize = 64;
/// Most sections a file may declare.
pub const MAX_SECTIONS: usize = 32;

/// Format versions this build knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum FormatVersion {
    /// The first format.
    V1 = 1,
    /// Adds the attention file's `transform` section.
    V2 = 2,
    /// Adds the attention file's `tail_term` meta word.
    V3 = 3,
    /// Adds the attention file's `head_stats` section (value sums, query energy) and two
    /// words per head in `lists` (queries seen, positions trained on): an opened cache reads
    /// no key or value it does not attend to. Adds the `context` kind.
    V4 = 4,
    /// The attention file's fast-scan transforms may be full maps (a kind word per head) and
    /// its `head_stats` hold each head's full query second moment for head dimensions up to
    /// 512 (`QueryEnergy::stored_words`).
    V5 = 5,
}

impl FormatVersion {
    /// The version written.
    pub const CURRENT: FormatVersion = FormatVersion::V5;
    /// The oldest version read.
    pub const OLDEST_SUPPORTED: FormatVersion = FormatVersion::V1;

    fn from_u32(v: u32) -> Result<FormatVersion> {
        match v {
            1 => Ok(FormatVersion::V1),
            2 => Ok(FormatVersion::V2),
            3 => Ok(FormatVersion::V3),
            4 => Ok(FormatVersion::V4),
            5 => Ok(FormatVersion::V5),
            found => Err(Error::Incompatible {
                found,
                supported: format!(
                    "{}..={}",
                    FormatVersion::OLDEST_SUPPORTED as u32,
                    FormatVersion::CURRENT as u32
                ),
            }),
        }
    }
}

/// Index kinds a file can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum IndexKind {
    /// [`crate::IndexFlat`].
    Flat = 1,
    /// [`crate::IndexPQ`].
    Pq = 2,
    /// [`crate::IndexPQFastScan`].
    PqFastScan = 3,
    /// [`crate::IndexIVFPQFastScan`].
    IvfPqFastScan = 4,
    /// [`crate::attention::AttentionRetriever`] (the KV cache and its per-head indexes).
    Attention = 5,
    /// An attention cache and a client's state beside it (`client_words`, `client_data`:
    /// a model runtime's resume state, opaque to this crate; format 4).
    Context = 6,
}

impl IndexKind {
    fn from_u32(v: u32) -> Result<IndexKind> {
        Ok(match v {
            1 => IndexKind::Flat,
            2 => IndexKind::Pq,
            3 => IndexKind::PqFastScan,
            4 => IndexKind::IvfPqFastScan,
            5 => IndexKind::Attention,
            6 => IndexKind::Context,
            other => return Err(corrupt("header", format!("unknown index kind {other}"))),
        })
    }

    /// Short name (as the CLI spells it).
    pub fn name(self) -> &'static str {
        match self {
            IndexKind::Flat => "flat",
            IndexKind::Pq => "pq",
            IndexKind::PqFastScan => "pqfs",
            IndexKind::IvfPqFastScan => "ivfpqfs",
            IndexKind::Attention => "attention",
            IndexKind::Context => "context",
        }
    }
}

/// Section tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Tag {
    /// Parameters, `u64` words.
    Meta = 1,
    /// Product-quantizer centroids, f32.
    PqCentroids = 2,
    /// Coarse centroids, f32.
    CoarseCentroids = 3,
    /// Codes, bytes.
    Codes = 4,
    /// Ids, i64.
    Ids = 5,
    /// Stored vectors, f32 or f16.
    Vectors = 6,
    /// Squared norms, f32.
    Norms = 7,
    /// Per inverted list (or attention head): two u64 words.
    Lists = 8,
    /// The attention selector spec, UTF-8 text.
    Selector = 9,
    /// Attention keys, f16.
    Keys = 10,
    /// Attention values, f16.
    Values = 11,
    /// Per fast-scan attention head, its key transform (format 2).
    Transform = 12,
    /// Per attention head, its value sums then its query energy, f64 (format 4).
    HeadStats = 13,
    /// A client's parameters, u64 words (context files).
    ClientWords = 14,
    /// A client's arrays, f32 (context files).
    ClientData = 15,
}

impl Tag {
    fn from_u32(v: u32) -> Option<Tag> {
        Some(match v {
            1 => Tag::Meta,
            2 => Tag::PqCentroids,
            3 => Tag::CoarseCentroids,
            4 => Tag::Codes,
            5 => Tag::Ids,
            6 => Tag::Vectors,
            7 => Tag::Norms,
            8 => Tag::Lists,
            9 => Tag::Selector,
            10 => Tag::Keys,
            11 => Tag::Values,
            12 => Tag::Transform,
            13 => Tag::HeadStats,
            14 => Tag::ClientWords,
            15 => Tag::ClientData,
            _ => return None,
        })
    }

    /// Name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Tag::Meta => "meta",
            Tag::PqCentroids => "pq_centroids",
            Tag::CoarseCentroids => "coarse_centroids",
            Tag::Codes => "codes",
            Tag::Ids => "ids",
            Tag::Vectors => "vectors",
            Tag::Norms => "norms",
            Tag::Lists => "lists",
            Tag::Selector => "selector",
            Tag::Keys => "keys",
            Tag::Values => "values",
            Tag::Transform => "transform",
            Tag::HeadStats => "head_stats",
            Tag::ClientWords => "client_words",
            Tag::ClientData => "client_data",
        }
    }
}

pub(crate) fn corrupt(section: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        section: section.to_string(),
        reason: reason.into(),
    }
}

/// What can be written to a file ([`save`], [`to_bytes`]): every index kind, the attention
/// cache. Each kind implements it beside its type; the container knows none of them.
pub trait Persist {
    /// Kind and sections, `meta` first (borrowing the index's arrays).
    fn sections(&self) -> (IndexKind, Vec<SectionOut<'_>>);
    /// Checks the settings against the limits the reader applies ([`crate::limits`]), so that
    /// nothing is written that cannot be opened.
    fn check_limits(&self) -> crate::Result<()> {
        Ok(())
    }
}

// The codecs' common readers of `meta` words and section sizes.

/// The `meta` word of a metric ([`metric_of`] reads it).
pub(crate) fn metric_word(m: Metric) -> u64 {
    match m {
        Metric::InnerProduct => 0,
        Metric::L2 => 1,
    }
}

/// The `meta` words, exactly `n` of them.
pub(crate) fn meta(r: &Reader<'_>, n: usize) -> Result<Vec<u64>> {
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

/// The metric of a `meta` word (0 inner product, 1 L2).
pub(crate) fn metric_of(v: u64) -> Result<Metric> {
    match v {
        0 => Ok(Metric::InnerProduct),
        1 => Ok(Metric::L2),
        other => Err(corrupt("meta", format!("unknown metric {other}"))),
    }
}

/// `a * b`, or a corruption error on overflow.
pub(crate) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| corrupt("meta", format!("{what} overflows")))
}

/// Maps a constructor's complaint about the parts to a corruption of `section`.
pub(crate) fn parts<T>(section: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Corrupt { .. } => e,
        other => corrupt(section, other.to_string()),
    })
}

/// Checks that section `tag` holds exactly `want` elements.
pub(crate) fn exact_count(r: &Reader<'_>, tag: Tag, want: usize) -> Result<()> {
    match r.count(tag) {
        Some(n) if n == want => Ok(()),
        Some(n) => Err(corrupt(
            tag.name(),
            format!("{n} elements, expected {want}"),
        )),
        None => Err(corrupt(tag.name(), "missing section")),
    }
}

/// One section to write: its tag, element size and bytes (in pieces, written in order).
pub struct SectionOut<'a> {
    /// Tag.
    pub tag: Tag,
    /// Element size in bytes.
    pub elem: u32,
    /// The bytes, in pieces (borrowed from the index, or small owned ones).
    pub pieces: Vec<Cow<'a, [u8]>>,
}

impl<'a> SectionOut<'a> {
    /// A section of one typed slice.
    pub fn of<T: Pod>(tag: Tag, data: &'a [T]) -> SectionOut<'a> {
        SectionOut {
            tag,
            elem: std::mem::size_of::<T>() as u32,
            pieces: vec![Cow::Borrowed(bytemuck::cast_slice(data))],
        }
    }

    /// A section of owned `u64` words (parameters, list sizes).
    pub fn words(tag: Tag, words: &[u64]) -> SectionOut<'static> {
        SectionOut {
            tag,
            elem: 8,
            pieces: vec![Cow::Owned(bytemuck::cast_slice(words).to_vec())],
        }
    }

    fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }

    fn crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for p in &self.pieces {
            h.update(p);
        }
        h.finalize()
    }
}

/// A validated section table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// Tag.
    pub tag: Tag,
    /// Element size.
    pub elem: u32,
    /// Byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
    /// CRC-32 of the bytes.
    pub crc: u32,
}

/// What the header and section table say.
#[derive(Clone, Debug)]
pub struct FileInfo {
    /// Format version.
    pub version: u32,
    /// Index kind.
    pub kind: IndexKind,
    /// File length in bytes.
    pub file_len: usize,
    /// Sections, in file order.
    pub sections: Vec<SectionInfo>,
}

impl FileInfo {
    /// The section with this tag, if present.
    pub fn section(&self, tag: Tag) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.tag == tag)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| corrupt("section table", format!("{what} {v} too large")))
}

/// Validates header, table and footer of `bytes` (a whole file).
pub fn parse_layout(bytes: &[u8]) -> Result<FileInfo> {
    if bytes.len() < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(
            "header",
            format!("file of {} bytes is too short to be an index", bytes.len()),
        ));
    }
    let h = &bytes[..HEADER_LEN];
    if h[..8] != MAGIC {
        return Err(corrupt("header", "not a pqcache index file (bad magic)"));
    }
    let header_crc = u32_at(h, 60);
    if crc32fast::hash(&h[..60]) != header_crc {
        return Err(corrupt("header", "header checksum mismatch"));
    }
    let version = FormatVersion::from_u32(u32_at(h, 8))?;
    let kind = IndexKind::from_u32(u32_at(h, 12))?;
    if u32_at(h, 16) != 0 || h[36..60].iter().any(|&b| b != 0) {
        return Err(corrupt(
            "header",
            "unknown flags or non-zero reserved bytes",
        ));
    }
    let nsections = u32_at(h, 20) as usize;
    if nsections == 0 || nsections > MAX_SECTIONS {
        return Err(corrupt("header", format!("{nsections} sections")));
    }
    let file_len = u64_at(h, 24);
    if file_len != bytes.len() as u64 {
        return Err(corrupt(
            "header",
            format!(
                "file is {} bytes, header says {file_len} (truncated or extended)",
                bytes.len()
            ),
        ));
    }
    let table_end = HEADER_LEN + nsections * ENTRY_LEN;
    let data_start = table_end.next_multiple_of(ALIGN);
    let footer_at = bytes.len() - FOOTER_LEN;
    if data_start > footer_at {
        return Err(corrupt("section table", "table runs into the footer"));
    }
    let table = &bytes[HEADER_LEN..table_end];
    let table_crc = u32_at(h, 32);
    if crc32fast::hash(table) != table_crc {
        return Err(corrupt("section table", "table checksum mismatch"));
    }
    let f = &bytes[footer_at..];
    if f[..8] != FOOTER_MAGIC || u32_at(f, 8) != header_crc || u32_at(f, 12) != table_crc {
        return Err(corrupt("footer", "footer does not match the header"));
    }
    let mut sections = Vec::with_capacity(nsections);
    for e in table.chunks_exact(ENTRY_LEN) {
        let tag = Tag::from_u32(u32_at(e, 0))
            .ok_or_else(|| corrupt("section table", format!("unknown tag {}", u32_at(e, 0))))?;
        let elem = u32_at(e, 4);
        let offset = to_usize(u64_at(e, 8), "offset")?;
        let len = to_usize(u64_at(e, 16), "length")?;
        if u32_at(e, 28) != 0 {
            return Err(corrupt(tag.name(), "non-zero reserved field"));
        }
        if !matches!(elem, 1 | 2 | 4 | 8) || len % elem as usize != 0 {
            return Err(corrupt(
                tag.name(),
                format!("{len} bytes of {elem}-byte elements"),
            ));
        }
        if offset % ALIGN != 0 || offset < data_start {
            return Err(corrupt(tag.name(), format!("misplaced at offset {offset}")));
        }
        if offset.checked_add(len).is_none_or(|end| end > footer_at) {
            return Err(corrupt(tag.name(), "runs past the end of the data"));
        }
        if sections.iter().any(|s: &SectionInfo| s.tag == tag) {
            return Err(corrupt(tag.name(), "section appears twice"));
        }
        sections.push(SectionInfo {
            tag,
            elem,
            offset,
            len,
            crc: u32_at(e, 24),
        });
    }
    sections.sort_by_key(|s| s.offset);
    for w in sections.windows(2) {
        if w[0].offset + w[0].len > w[1].offset {
            return Err(corrupt(w[1].tag.name(), "overlaps the previous section"));
        }
    }
    Ok(FileInfo {
        version: version as u32,
        kind,
        file_len: bytes.len(),
        sections,
    })
}

/// Where sections are read from: a mapping (zero-copy) or bytes (copied).
pub(crate) enum Source<'a> {
    Map(&'a Mapping),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Map(m) => m,
            Source::Bytes(b) => b,
        }
    }
}

/// Typed access to a validated file's sections.
pub(crate) struct Reader<'a> {
    pub(crate) info: FileInfo,
    src: Source<'a>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(src: Source<'a>) -> Result<Reader<'a>> {
        let info = parse_layout(src.bytes())?;
        let r = Reader { info, src };
        // The parameters are small: always checked.
        if let Some(meta) = r.info.section(Tag::Meta) {
            r.check_crc(meta)?;
        }
        Ok(r)
    }

    /// Checks the CRC of section `tag` where the file has one.
    pub(crate) fn check(&self, tag: Tag) -> Result<()> {
        match self.info.section(tag) {
            Some(s) => self.check_crc(s),
            None => Ok(()),
        }
    }

    fn check_crc(&self, s: &SectionInfo) -> Result<()> {
        let bytes = &self.src.bytes()[s.offset..s.offset + s.len];
        if crc32fast::hash(bytes) != s.crc {
            return Err(corrupt(s.tag.name(), "checksum mismatch"));
        }
        Ok(())
    }

    fn section(&self, tag: Tag, elem: usize) -> Result<SectionInfo> {
        let s = *self
            .info
            .section(tag)
            .ok_or_else(|| corrupt(tag.name(), "missing section"))?;
        if s.elem as usize != elem {
            return Err(corrupt(
                tag.name(),
                format!("{}-byte elements, expected {elem}", s.elem),
            ));
        }
        Ok(s)
    }

    /// Element count of a section, if present.
    pub(crate) fn count(&self, tag: Tag) -> Option<usize> {
        self.info.section(tag).map(|s| s.len / s.elem as usize)
    }

    /// Elements `first .. first + n` of section `tag` (zero-copy from a mapping).
    pub(crate) fn buf<T: Pod>(&self, tag: Tag, first: usize, n: usize) -> Result<Buf<T>> {
        let size = std::mem::size_of::<T>();
        let s = self.section(tag, size)?;
        let end = first
            .checked_add(n)
            .filter(|&e| e <= s.len / size)
            .ok_or_else(|| corrupt(tag.name(), "shorter than its parameters say"))?;
        let start = s.offset + first * size;
        match &self.src {
            Source::Map(map) => Buf::mapped(map, start, n)
                .ok_or_else(|| corrupt(tag.name(), "misaligned or out of bounds")),
            Source::Bytes(b) => Ok(Buf::Owned(bytemuck::pod_collect_to_vec(
                &b[start..s.offset + end * size],
            ))),
        }
    }

    /// The whole section `tag`, copied.
    pub(crate) fn vec<T: Pod>(&self, tag: Tag) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        let s = self.section(tag, size)?;
        let b = &self.src.bytes()[s.offset..s.offset + s.len];
        Ok(bytemuck::pod_collect_to_vec(b))
    }
}

/// Writes `sections` of an index of `kind` to `path`, atomically (temporary file, fsync,
/// rename, fsync of the folder). On error the destination is untouched and the temporary
/// file removed.
pub fn write_sections(path: &Path, kind: IndexKind, sections: &[SectionOut<'_>]) -> Result<()> {
    if sections.is_empty() || sections.len() > MAX_SECTIONS {
        return Err(Error::InvalidArgument(format!(
            "{} sections",
            sections.len()
        )));
    }
    let layout = plan(kind, sections)?;
    let tmp = temp_path(path);
    // Errors name the file they happened on: the temporary file while it is written, the
    // destination for the rename (with the temporary name in the message).
    let written = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        layout.write(&mut w, sections)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })()
    .map_err(|e| Error::io(&tmp, e));
    let renamed = written.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| {
            let context = format!("renaming {} to it: {e}", tmp.display());
            Error::io(path, std::io::Error::new(e.kind(), context))
        })
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path).map_err(|e| Error::io(path, e))
}

/// Header, table and section offsets of a file about to be written.
struct Layout {
    header: [u8; HEADER_LEN],
    table: Vec<u8>,
    offsets: Vec<usize>,
    header_crc: u32,
    table_crc: u32,
}

impl Layout {
    fn write(&self, w: &mut impl Write, sections: &[SectionOut<'_>]) -> std::io::Result<()> {
        w.write_all(&self.header)?;
        w.write_all(&self.table)?;
        let mut at = HEADER_LEN + self.table.len();
        let zeros = [0u8; ALIGN];
        for (s, &off) in sections.iter().zip(&self.offsets) {
            w.write_all(&zeros[..off - at])?;
            for p in &s.pieces {
                w.write_all(p.as_ref())?;
            }
            at = off + s.len();
        }
        w.write_all(&FOOTER_MAGIC)?;
        w.write_all(&self.header_crc.to_le_bytes())?;
        w.write_all(&self.table_crc.to_le_bytes())
    }
}

/// The bytes of the file [`save`] would write (for tests and fuzzing).
pub fn to_bytes(index: &impl Persist) -> Result<Vec<u8>> {
    let (kind, sections) = index.sections();
    let layout = plan(kind, &sections)?;
    let mut out = Vec::new();
    layout
        .write(&mut out, &sections)
        .expect("writing to a Vec cannot fail");
    Ok(out)
}

/// Lays out `sections` of an index of `kind`: header, table, offsets, checksums.
fn plan(kind: IndexKind, sections: &[SectionOut<'_>]) -> Result<Layout> {
    if sections.is_empty() || sections.len() > MAX_SECTIONS {
        return Err(Error::InvalidArgument(format!(
            "{} sections",
            sections.len()
        )));
    }
    // Layout.
    let n = sections.len();
    let mut offset = (HEADER_LEN + n * ENTRY_LEN).next_multiple_of(ALIGN);
    let mut table = Vec::with_capacity(n * ENTRY_LEN);
    let mut offsets = Vec::with_capacity(n);
    for s in sections {
        offsets.push(offset);
        table.extend_from_slice(&(s.tag as u32).to_le_bytes());
        table.extend_from_slice(&s.elem.to_le_bytes());
        table.extend_from_slice(&(offset as u64).to_le_bytes());
        table.extend_from_slice(&(s.len() as u64).to_le_bytes());
        table.extend_from_slice(&s.crc().to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        offset = (offset + s.len()).next_multiple_of(ALIGN);
    }
    let last_end = offsets.last().copied().unwrap_or(0) + sections.last().map_or(0, |s| s.len());
    let file_len = last_end + FOOTER_LEN;
    let table_crc = crc32fast::hash(&table);
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&(FormatVersion::CURRENT as u32).to_le_bytes());
    header[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    header[20..24].copy_from_slice(&(n as u32).to_le_bytes());
    header[24..32].copy_from_slice(&(file_len as u64).to_le_bytes());
    header[32..36].copy_from_slice(&table_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..60]);
    header[60..64].copy_from_slice(&header_crc.to_le_bytes());

    Ok(Layout {
        header,
        table,
        offsets,
        header_crc,
        table_crc,
    })
}

/// The longest file name most file systems take (ext4, XFS, APFS, NTFS: 255 bytes).
const MAX_NAME_BYTES: usize = 255;

/// A fresh temporary name beside `path`: `.{name}.tmp.{pid}.{n}`, with `name` cut short (at a
/// character boundary) where the whole would pass [`MAX_NAME_BYTES`], so that every legal
/// destination name has a legal temporary name.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    let suffix = format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let room = MAX_NAME_BYTES - 1 - suffix.len();
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    path.with_file_name(format!(".{}{suffix}", &name[..cut]))
}

/// Fsyncs the folder holding `path`, so that the rename itself is durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Maps `path` read-only. The only `unsafe` of the root crate.
#[allow(unsafe_code)]
pub(crate) fn map_file(path: &Path) -> Result<Mapping> {
    let file = super::open_regular(path).map_err(|source| Error::io(path, source))?;
    // SAFETY: the mapping is read-only and every access goes through bounds-checked slices of
    // it. The remaining hazard of any file mapping, another process truncating or rewriting
    // the file in place while it is mapped, is outside what this crate does: `save` never
    // writes into an existing file, it renames a new one over the name.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Arc::new(map))
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    super::read_regular(path).map_err(|source| Error::io(path, source))
}

/// Saves any index atomically (see the module doc).
pub fn save(index: &impl Persist, path: impl AsRef<Path>) -> Result<()> {
    index.check_limits()?;
    let (kind, sections) = index.sections();
    write_sections(path.as_ref(), kind, &sections)
}

/// The header and section table of a file (validated, data not read).
pub fn info(path: impl AsRef<Path>) -> Result<FileInfo> {
    let map = map_file(path.as_ref())?;
    parse_layout(&map)
}

/// The container's part of a full check: every section's CRC, and zero padding between the
/// sections and before the footer (the kind's invariants are its reader's: see
/// [`crate::io::file::verify`]).
pub(crate) fn check_every_section(r: &Reader<'_>, bytes: &[u8]) -> Result<()> {
    let mut at = HEADER_LEN + r.info.sections.len() * ENTRY_LEN;
    for s in &r.info.sections {
        r.check_crc(s)?;
        if bytes[at..s.offset].iter().any(|&b| b != 0) {
            return Err(corrupt(s.tag.name(), "non-zero padding before the section"));
        }
        at = s.offset + s.len;
    }
    if bytes[at..bytes.len() - FOOTER_LEN].iter().any(|&b| b != 0) {
        return Err(corrupt("footer", "non-zero padding before the footer"));
    }
    Ok(())
}
