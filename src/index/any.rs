//! [`AnyIndex`]: any index a file can hold, behind one type (what [`super::persist::open`]
//! and [`super::persist::load`] return), dispatching to the kind it holds.

use super::flat::FlatStorage;
use super::persist::storage_word;
use super::{Index, IndexFlat, IndexIVFPQFastScan, IndexPQ, IndexPQFastScan};
use crate::error::Result;
use crate::io::container::{IndexKind, Persist, SectionOut};
use crate::metric::Metric;
use crate::result::SearchResult;

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
