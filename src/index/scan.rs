//! The fast-scan block loop, written once: flat fast-scan ([`super::fastscan`]), IVF
//! ([`super::ivf`], one probed list at a time) and, through the flat index, the attention
//! selector are drivers over [`Scan::blocks`] with a result handler ([`ScanHandler`]), as
//! FAISS's `pq4_accumulate_loop` is with its `simd_result_handlers.h`.
//!
//! Per chunk of blocks (32 vectors each, `block_bytes` of packed 4-bit codes), the loop asks
//! the handler for one u16 threshold per query of the group (from its heap, its floor, or
//! none), runs the kernel over the chunk (it loads every block once for all queries of the
//! group and marks, per block, the sums above each query's threshold), and hands the chunk's
//! sums (query-major: query `q`'s `nb * 32` sums from `q * nb * 32`) and masks (query `q`'s
//! `nb` from `q * nb`) to the handler. A handler's thresholds only ever rise, so masks from the
//! start of a chunk are conservative: handlers check a marked sum again.
//!
//! Chunks start at [`Chunking::first`] blocks and double up to [`Chunking::max`]: the first
//! chunks refresh a heap's threshold often while it settles, later ones amortise the call.
//! The handlers of this crate:
//!
//! | handler | caller | keeps |
//! |---|---|---|
//! | [`HeapHandler`] | flat fast-scan, small k | a [`TopK`] of packed (sum, position) per query |
//! | [`FloorHandler`] | flat fast-scan, large k | every (sum, position) above a per-query floor |
//! | [`RowsHandler`] | all sums for aggregating callers | the sums, copied into row pieces |
//! | `ivf::ListHandler` | IVF, one list | a [`TopK`] of float candidates, ids and a per-list bias |

use super::for_each_marked;
use crate::select::{from_u16_key, u16_key, TopK};
use pqcache_simd::fastscan::{FastScanKernel, BBS, MAX_QBS};
use rayon::prelude::*;

/// Blocks per kernel call of the parallel scans and of IVF's lists (512 vectors: the u16
/// sums of a chunk stay in L1, and a heap's threshold handed to the kernel is refreshed every
/// 512 vectors). The drivers split their codes into tasks of this many blocks.
pub(crate) const CHUNK_BLOCKS: usize = 16;

/// What a scan does with the sums of each chunk.
pub(crate) trait ScanHandler {
    /// Fills `out` (one per query of the group) with the threshold above which the next
    /// chunk's sums are marked; returns `false` when the handler takes every sum (no masks).
    fn thresholds(&mut self, out: &mut [u16]) -> bool;
    /// One chunk: vectors `base..base + nb * 32` (padding past the end included), its sums
    /// and, when [`ScanHandler::thresholds`] asked for them, its masks.
    fn chunk(&mut self, base: usize, nb: usize, sums: &[u16], masks: &[u32]);
}

/// Blocks per kernel call: `first`, doubling up to `max`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunking {
    pub first: usize,
    pub max: usize,
}

impl Chunking {
    /// The same number of blocks for every call.
    pub const fn fixed(blocks: usize) -> Chunking {
        Chunking {
            first: blocks,
            max: blocks,
        }
    }
}

/// The reusable buffers of a scan (one per thread).
#[derive(Default, Debug)]
pub(crate) struct ScanScratch {
    sums: Vec<u16>,
    masks: Vec<u32>,
}

/// A query group's tables bound to a kernel and a code layout.
#[derive(Clone, Copy)]
pub(crate) struct Scan<'a> {
    pub kernel: &'a FastScanKernel,
    /// Bytes per block of 32 codes.
    pub block_bytes: usize,
    /// Sub-quantizers, rounded up to even.
    pub m2: usize,
    /// The group's u8 tables, one after the other (`nq * m2 * 16` bytes).
    pub tables: &'a [u8],
    /// Queries in the group (1..=4).
    pub nq: usize,
}

impl<'a> Scan<'a> {
    /// The tasks of a parallel driver over `codes`: (task index, its [`CHUNK_BLOCKS`] blocks),
    /// each scanned by [`Scan::task`].
    pub fn tasks<'c>(
        &self,
        codes: &'c [u8],
    ) -> impl IndexedParallelIterator<Item = (usize, &'c [u8])> + use<'c, 'a> {
        codes
            .par_chunks(CHUNK_BLOCKS * self.block_bytes)
            .enumerate()
    }

    /// Scans task `ci` of [`Scan::tasks`] (`codes`: its blocks) in one kernel call.
    pub fn task(
        &self,
        ci: usize,
        codes: &[u8],
        scratch: &mut ScanScratch,
        handler: &mut impl ScanHandler,
    ) {
        let chunking = Chunking::fixed(CHUNK_BLOCKS);
        self.blocks(codes, ci * CHUNK_BLOCKS * BBS, chunking, scratch, handler);
    }

    /// Scans the blocks of `codes` (whole blocks; vector `base` first) in chunks, feeding
    /// `handler`.
    pub fn blocks(
        &self,
        codes: &[u8],
        base: usize,
        chunking: Chunking,
        scratch: &mut ScanScratch,
        handler: &mut impl ScanHandler,
    ) {
        debug_assert!(self.nq <= MAX_QBS && codes.len().is_multiple_of(self.block_bytes));
        let nblocks = codes.len() / self.block_bytes;
        let (mut b0, mut step) = (0, chunking.first.max(1));
        let mut thresholds = [0u16; MAX_QBS];
        while b0 < nblocks {
            let nb = step.min(nblocks - b0);
            let chunk = &codes[b0 * self.block_bytes..(b0 + nb) * self.block_bytes];
            let marks = handler.thresholds(&mut thresholds[..self.nq]);
            if !marks {
                thresholds = [u16::MAX; MAX_QBS];
            }
            scratch.sums.resize(self.nq * nb * BBS, 0);
            scratch.masks.resize(self.nq * nb, 0);
            self.kernel.accumulate(
                chunk,
                nb,
                self.m2,
                self.tables,
                self.nq,
                &thresholds[..self.nq],
                &mut scratch.sums,
                &mut scratch.masks,
            );
            handler.chunk(base + b0 * BBS, nb, &scratch.sums, &scratch.masks);
            b0 += nb;
            step = (step * 2).min(chunking.max.max(1));
        }
    }
}

/// Query `q`'s part of a chunk's sums or masks (`per_query` each).
#[inline]
pub(crate) fn of_query<T>(all: &[T], q: usize, per_query: usize) -> &[T] {
    &all[q * per_query..(q + 1) * per_query]
}

/// The best `cap` (sum, position) per query: a [`TopK`] of [`u16_key`]s each, fed by the
/// marked sums (every sum while a heap is not full); positions `>= n` (padding) are skipped.
/// Within one scan positions ascend, so a sum equal to the worst kept never enters (the
/// smaller position wins) and the kernel's strict `>` loses nothing.
pub(crate) struct HeapHandler<'a> {
    pub heaps: &'a mut [TopK<u64>],
    pub n: usize,
}

impl ScanHandler for HeapHandler<'_> {
    fn thresholds(&mut self, out: &mut [u16]) -> bool {
        for (t, h) in out.iter_mut().zip(self.heaps.iter()) {
            *t = h.worst().map_or(0, |w| from_u16_key(w).0);
        }
        true
    }

    fn chunk(&mut self, base: usize, nb: usize, sums: &[u16], masks: &[u32]) {
        let valid = (nb * BBS).min(self.n.saturating_sub(base));
        for (q, heap) in self.heaps.iter_mut().enumerate() {
            let (sums, masks) = (of_query(sums, q, nb * BBS), of_query(masks, q, nb));
            let Some(mut worst) = heap.worst() else {
                for (i, &s) in sums[..valid].iter().enumerate() {
                    heap.push(u16_key(s, (base + i) as u32));
                }
                continue;
            };
            for_each_marked::<8>(masks, valid, |i| {
                let key = u16_key(sums[i], (base + i) as u32);
                if key > worst {
                    heap.push(key);
                    worst = heap.worst().unwrap_or(worst);
                }
            });
        }
    }
}

/// Every (sum, position) above `floors[q]` per query, in position order (the large-k
/// selection's survivors); positions `>= n` are skipped.
pub(crate) struct FloorHandler<'a> {
    pub floors: &'a [u16],
    pub found: &'a mut [Vec<(u16, u32)>],
    pub n: usize,
}

impl ScanHandler for FloorHandler<'_> {
    fn thresholds(&mut self, out: &mut [u16]) -> bool {
        out.copy_from_slice(&self.floors[..out.len()]);
        true
    }

    fn chunk(&mut self, base: usize, nb: usize, sums: &[u16], masks: &[u32]) {
        let valid = self.n.saturating_sub(base);
        for (q, out) in self.found.iter_mut().enumerate() {
            let (sums, marks) = (of_query(sums, q, nb * BBS), of_query(masks, q, nb));
            out.reserve(marks.iter().map(|m| m.count_ones() as usize).sum());
            for_each_marked::<1>(marks, valid, |i| out.push((sums[i], (base + i) as u32)));
        }
    }
}

/// Every sum, copied into `rows[q]` (query `q`'s row piece for the scanned positions, which
/// may end before the chunk's padding).
pub(crate) struct RowsHandler<'a, 'b> {
    pub rows: &'a mut [&'b mut [u16]],
}

impl ScanHandler for RowsHandler<'_, '_> {
    fn thresholds(&mut self, _out: &mut [u16]) -> bool {
        false
    }

    fn chunk(&mut self, _base: usize, nb: usize, sums: &[u16], _masks: &[u32]) {
        for (q, row) in self.rows.iter_mut().enumerate() {
            let len = row.len();
            row.copy_from_slice(&of_query(sums, q, nb * BBS)[..len]);
        }
    }
}
