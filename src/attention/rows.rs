//! One head's cached keys or values: a base that may be mapped from a file, and the rows
//! appended since it was opened.
//!
//! ```text
//! RowStore   base  Buf<f16>  rows 0 .. split          mapped (an opened cache) or owned
//!            tail  Vec<f16>  rows split .. len        owned; empty unless base is mapped
//! ```
//!
//! An opened cache decodes without copying its mapped rows: an append goes to the tail, a
//! step reads the rows it selects from wherever they are (the kernels see contiguous runs:
//! a run of positions on both sides of the split is scored in two calls, scattered positions
//! are partitioned). Whole-array work (training, a refresh, dense attention, saving) takes a
//! contiguous copy where the rows are split. An owned base simply grows.

use crate::buf::Buf;
use half::f16;
use pqcache_simd::distance::DistanceKernels;
use std::borrow::Cow;
use std::ops::Range;

/// Owned or mapped rows plus an owned tail (see the module doc).
#[derive(Clone)]
pub(crate) struct RowStore {
    base: Buf<f16>,
    tail: Vec<f16>,
}

impl RowStore {
    pub(crate) fn new() -> RowStore {
        RowStore::from_buf(Buf::new())
    }

    pub(crate) fn from_buf(base: Buf<f16>) -> RowStore {
        RowStore {
            base,
            tail: Vec::new(),
        }
    }

    /// Elements held.
    pub(crate) fn len(&self) -> usize {
        self.base.len() + self.tail.len()
    }

    /// Appends elements: to the tail over a mapped base, to the base otherwise.
    pub(crate) fn push(&mut self, x: &[f16]) {
        if self.base.is_mapped() {
            self.tail.extend_from_slice(x);
        } else {
            self.base.to_mut().extend_from_slice(x);
        }
    }

    pub(crate) fn view(&self) -> SplitRows<'_> {
        SplitRows {
            base: self.base.as_slice(),
            tail: &self.tail,
        }
    }

    /// Every element in order: borrowed unless the rows are split.
    pub(crate) fn contiguous(&self) -> Cow<'_, [f16]> {
        self.view().contiguous()
    }

    /// The pieces in order, for a file section.
    pub(crate) fn pieces(&self) -> [&[f16]; 2] {
        [self.base.as_slice(), &self.tail]
    }

    /// An owned copy in one piece.
    pub(crate) fn to_owned_store(&self) -> RowStore {
        RowStore::from_buf(Buf::Owned(self.contiguous().into_owned()))
    }
}

/// A borrowed view of a `RowStore`: `base` then `tail`, each whole rows.
#[derive(Clone, Copy)]
pub struct SplitRows<'a> {
    base: &'a [f16],
    tail: &'a [f16],
}

impl<'a> SplitRows<'a> {
    /// Rows in one piece.
    pub fn whole(rows: &'a [f16]) -> SplitRows<'a> {
        SplitRows {
            base: rows,
            tail: &[],
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.base.len() + self.tail.len()
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element in order: borrowed unless split.
    pub fn contiguous(&self) -> Cow<'a, [f16]> {
        if self.tail.is_empty() {
            Cow::Borrowed(self.base)
        } else {
            let mut v = Vec::with_capacity(self.len());
            v.extend_from_slice(self.base);
            v.extend_from_slice(self.tail);
            Cow::Owned(v)
        }
    }

    /// Row `p` of width `d`.
    pub fn row(&self, p: usize, d: usize) -> &'a [f16] {
        let split = self.base.len() / d.max(1);
        if p < split {
            &self.base[p * d..(p + 1) * d]
        } else {
            &self.tail[(p - split) * d..(p - split + 1) * d]
        }
    }

    /// Grouped dot products of `g` queries (`g * d`) with the rows `run`, query-major into
    /// `out` (`g * run.len()`): the kernel on each side of the split.
    pub(crate) fn dot_group_run(
        &self,
        kernels: &DistanceKernels,
        queries: &[f32],
        g: usize,
        d: usize,
        run: Range<usize>,
        out: &mut [f32],
    ) {
        let split = self.base.len() / d.max(1);
        if run.end <= split || self.tail.is_empty() {
            let rows = &self.base[run.start * d..run.end * d];
            return kernels.dot_group_rows_f16(queries, g, rows, out);
        }
        if run.start >= split {
            let rows = &self.tail[(run.start - split) * d..(run.end - split) * d];
            return kernels.dot_group_rows_f16(queries, g, rows, out);
        }
        let (a, b) = (split - run.start, run.end - split);
        let (mut left, mut right) = (vec![0.0f32; g * a], vec![0.0f32; g * b]);
        kernels.dot_group_rows_f16(queries, g, &self.base[run.start * d..], &mut left);
        kernels.dot_group_rows_f16(queries, g, &self.tail[..b * d], &mut right);
        for (qi, o) in out.chunks_exact_mut(a + b).enumerate() {
            o[..a].copy_from_slice(&left[qi * a..(qi + 1) * a]);
            o[a..].copy_from_slice(&right[qi * b..(qi + 1) * b]);
        }
    }

    /// Grouped dot products of `g` queries with the rows at `positions` (any order),
    /// query-major into `out` (`g * positions.len()`): positions on each side of the split
    /// scored in one call each, the results put back in the given order.
    pub(crate) fn dot_group_at(
        &self,
        kernels: &DistanceKernels,
        queries: &[f32],
        g: usize,
        d: usize,
        positions: &[u32],
        out: &mut [f32],
    ) {
        let split = self.base.len() / d.max(1);
        if self.tail.is_empty() || positions.iter().all(|&p| (p as usize) < split) {
            return kernels.dot_group_at_f16(queries, g, self.base, positions, out);
        }
        let (mut lo, mut hi, mut lo_at, mut hi_at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (j, &p) in positions.iter().enumerate() {
            if (p as usize) < split {
                lo.push(p);
                lo_at.push(j);
            } else {
                hi.push(p - split as u32);
                hi_at.push(j);
            }
        }
        let n = positions.len();
        for (list, at, rows) in [(&lo, &lo_at, self.base), (&hi, &hi_at, self.tail)] {
            if list.is_empty() {
                continue;
            }
            let mut part = vec![0.0f32; g * list.len()];
            kernels.dot_group_at_f16(queries, g, rows, list, &mut part);
            for qi in 0..g {
                for (i, &j) in at.iter().enumerate() {
                    out[qi * n + j] = part[qi * list.len() + i];
                }
            }
        }
    }
}
