//! Index and attention files: the facade over the file container ([`crate::io::container`],
//! the layout and its checks) and the codecs of every kind (`crate::index::persist` for the
//! indexes, `crate::attention::persist` for the attention cache and contexts).
//!
//! This is the one module that names every kind (to dispatch [`verify`]), so it sits on the
//! top floor of the crate's layers; the container below it knows none of them. The layout,
//! what is checked on open, copy-on-write growth and atomic saves are described in
//! [`crate::io::container`].

use crate::error::Result;
use crate::io::container::{check_every_section, map_file, Reader, Source};
use std::path::Path;

pub use crate::attention::persist::{
    load as load_attention, load_bytes as load_attention_bytes, load_context_bytes,
    open as open_attention, open_context, open_context_with, save_context, Access, ClientState,
};
pub use crate::index::persist::{load, load_bytes, open};
pub use crate::index::AnyIndex;
pub use crate::io::container::{
    info, parse_layout, save, to_bytes, write_sections, FileInfo, FormatVersion, IndexKind,
    Persist, SectionInfo, SectionOut, Tag, ALIGN, ENTRY_LEN, FOOTER_LEN, FOOTER_MAGIC, HEADER_LEN,
    MAGIC, MAX_SECTIONS,
};

/// Full check: layout, every section's CRC, zero padding, and the kind's invariants (its
/// reader runs over the whole file).
pub fn verify(path: impl AsRef<Path>) -> Result<FileInfo> {
    let map = map_file(path.as_ref())?;
    verify_bytes(&map)
}

/// [`verify`] on the bytes of a file.
pub fn verify_bytes(bytes: &[u8]) -> Result<FileInfo> {
    let r = Reader::new(Source::Bytes(bytes))?;
    check_every_section(&r, bytes)?;
    match r.info.kind {
        IndexKind::Context => {
            crate::attention::persist::read_context(&r)?;
        }
        IndexKind::Attention => {
            crate::attention::persist::read(&r)?;
        }
        _ => {
            crate::index::persist::read(&r)?;
        }
    }
    Ok(r.info)
}
