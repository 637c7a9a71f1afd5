//! The inverted lists of [`IndexIVFPQFastScan`](super::IndexIVFPQFastScan): packed codes,
//! ids (`-1`: a tombstone) and the optional originals, appended to and compacted in place.

use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::index::fastscan::RerankStorage;
use crate::index::flat::FlatStorage;
use crate::pq::pack::PackedCodes;

/// One inverted list.
#[derive(Clone, Debug, PartialEq)]
pub struct InvertedList {
    pub(super) codes: PackedCodes,
    pub(super) ids: Buf<i64>,
    pub(super) originals: Option<FlatStorage>,
    /// Tombstones (ids set to -1) not yet compacted away.
    pub(super) dead: usize,
    /// Entries from this offset on were added after the last (re)training.
    pub(super) fresh_from: usize,
}

impl InvertedList {
    pub(super) fn new(m: usize, keep: Option<RerankStorage>) -> Result<InvertedList> {
        Ok(InvertedList {
            codes: PackedCodes::new(m)?,
            ids: Buf::new(),
            originals: keep.map(|s| match s {
                RerankStorage::F32 => FlatStorage::F32(Default::default()),
                RerankStorage::F16 => FlatStorage::F16(Default::default()),
            }),
            dead: 0,
            fresh_from: 0,
        })
    }

    /// A list over stored parts (e.g. read from a file). Checks that the parts agree and
    /// that `dead` is the number of tombstones.
    pub(crate) fn from_parts(
        codes: PackedCodes,
        ids: Buf<i64>,
        originals: Option<FlatStorage>,
        fresh_from: usize,
        d: usize,
    ) -> Result<InvertedList> {
        let n = ids.len();
        let bad = |r: String| Err(Error::InvalidArgument(r));
        if codes.ntotal() != n {
            return bad(format!("{} codes for {n} ids", codes.ntotal()));
        }
        if originals.as_ref().is_some_and(|o| o.len() != n * d) {
            return bad(format!("stored vectors do not match {n} ids"));
        }
        if fresh_from > n {
            return bad(format!("fresh_from {fresh_from} beyond {n} entries"));
        }
        if let Some(&id) = ids.iter().find(|&&id| id < -1) {
            return bad(format!(
                "id {id} out of range (ids are >= 0, -1 for removed)"
            ));
        }
        let dead = ids.iter().filter(|&&id| id == -1).count();
        Ok(InvertedList {
            codes,
            ids,
            originals,
            dead,
            fresh_from,
        })
    }

    /// Entries added since the last training start at this offset.
    pub fn fresh_from(&self) -> usize {
        self.fresh_from
    }

    /// Entries, tombstones included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Live vectors.
    pub fn live(&self) -> usize {
        self.ids.len() - self.dead
    }
    /// Ids, `-1` for a tombstone.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }
    /// Packed codes.
    pub fn codes(&self) -> &PackedCodes {
        &self.codes
    }
    /// Original vectors, if kept.
    pub fn originals(&self) -> Option<&FlatStorage> {
        self.originals.as_ref()
    }

    /// Drops the tombstones (repacks the list: `O(len * m)`).
    pub(super) fn compact(&mut self, d: usize) -> Result<()> {
        if self.dead == 0 {
            return Ok(());
        }
        let mut codes = PackedCodes::new(self.codes.m())?;
        let mut ids = Vec::with_capacity(self.live());
        let mut originals = self.originals.as_ref().map(|o| o.empty_like());
        let mut fresh_from = 0;
        for (i, &id) in self.ids.iter().enumerate() {
            if id < 0 {
                continue;
            }
            if i < self.fresh_from {
                fresh_from += 1;
            }
            codes.push(&self.codes.code(i))?;
            ids.push(id);
            if let (Some(dst), Some(src)) = (&mut originals, &self.originals) {
                dst.push_row_from(src, i, d);
            }
        }
        *self = InvertedList {
            codes,
            ids: ids.into(),
            originals,
            dead: 0,
            fresh_from,
        };
        Ok(())
    }
}
