//! `pqcache eval`: build an index, time train / add / search, measure recall@k.
//!
//! Prints one JSON object with exactly the keys of `../shared/peers/faiss_bench.py`, so that
//! the two can be compared field by field (`benches/vs_faiss.sh`).

use super::outln;
use super::progress::Progress;
use super::with_threads;
use crate::error::{Error, Result};
use crate::index::{
    check_vectors, Index, IndexFlat, IndexIVFPQFastScan, IndexPQ, IndexPQFastScan, RerankStorage,
};
use crate::io::file::AnyIndex;
use crate::io::{load_groundtruth, load_vectors};
use crate::kmeans::{KMeansConfig, KMeansInit};
use crate::metric::Metric;
use crate::pq::Nbits;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

/// Index kinds the CLI can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IndexKind {
    /// Exact search, f32 storage.
    Flat,
    /// Exact search, f16 storage.
    Flat16,
    /// Product quantization, ADC with a float table.
    Pq,
    /// 4-bit fast-scan product quantization (u8 tables in registers).
    Pqfs,
    /// Inverted file over 4-bit fast-scan lists (`--nlist`, `--nprobe`).
    Ivfpqfs,
}

impl IndexKind {
    /// The CLI spelling.
    pub fn name(self) -> &'static str {
        match self {
            IndexKind::Flat => "flat",
            IndexKind::Flat16 => "flat16",
            IndexKind::Pq => "pq",
            IndexKind::Pqfs => "pqfs",
            IndexKind::Ivfpqfs => "ivfpqfs",
        }
    }
}

/// How to build an index (shared by `eval` and `build`).
#[derive(Args, Debug, Clone)]
pub struct IndexOptions {
    /// Index kind.
    #[arg(long, value_enum, default_value = "pq")]
    pub index: IndexKind,
    /// Sub-quantizers (must divide the dimension).
    #[arg(long, default_value_t = 16)]
    pub m: usize,
    /// Bits per sub-quantizer index (4, 6 or 8; pq only).
    #[arg(long, default_value_t = 8)]
    pub nbits: usize,
    /// ivfpqfs: number of inverted lists.
    #[arg(long, default_value_t = 1024)]
    pub nlist: usize,
    /// ivfpqfs: lists probed per query.
    #[arg(long, default_value_t = 16)]
    pub nprobe: usize,
    /// pqfs / ivfpqfs: re-rank the best k * F candidates exactly (keeps f32 originals);
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub rerank: usize,
    /// Metric: ip (inner product) or l2.
    #[arg(long, default_value = "ip")]
    pub metric: String,
    /// Train on the first N base vectors.
    #[arg(long, default_value_t = 65536)]
    pub train_n: usize,
    /// k-means iterations of the codebooks.
    #[arg(long, default_value_t = 25)]
    pub niter: usize,
    /// ivfpqfs: k-means iterations of the coarse quantizer (FAISS's IndexIVF runs 10).
    #[arg(long, default_value_t = crate::index::ivf::COARSE_NITER)]
    pub coarse_niter: usize,
    /// Seed of k-means sampling and initialisation.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// k-means initialisation: random or kmeans++.
    #[arg(long, default_value = "random")]
    pub init: String,
}

impl IndexOptions {
    fn kmeans_config(&self) -> Result<KMeansConfig> {
        let init = match self.init.as_str() {
            "random" => KMeansInit::Random,
            "kmeans++" | "kmeanspp" => KMeansInit::KMeansPlusPlus,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown init {other:?} (random or kmeans++)"
                )))
            }
        };
        let iterations = |n: usize, what: &str| {
            crate::limits::at_most(n, crate::limits::MAX_KMEANS_ITERATIONS, what)
        };
        iterations(self.coarse_niter, "--coarse-niter")?;
        Ok(KMeansConfig {
            niter: iterations(self.niter, "--niter")?,
            seed: self.seed,
            init,
            ..KMeansConfig::default()
        })
    }

    /// An empty (untrained) index of `d` dimensions as described; `qbs` is the fast-scan
    /// query group.
    pub fn empty_index(&self, d: usize, qbs: usize) -> Result<AnyIndex> {
        let metric: Metric = self.metric.parse()?;
        Ok(match self.index {
            IndexKind::Flat => AnyIndex::Flat(IndexFlat::new(d, metric)?),
            IndexKind::Flat16 => AnyIndex::Flat(IndexFlat::new_f16(d, metric)?),
            IndexKind::Pq => {
                let mut pq = IndexPQ::new(d, self.m, Nbits::from_bits(self.nbits)?, metric)?;
                pq.train_config = self.kmeans_config()?;
                AnyIndex::Pq(pq)
            }
            IndexKind::Pqfs => {
                // --nbits is ignored: fast-scan codes are 4-bit.
                let mut fs = IndexPQFastScan::new(d, self.m, metric)?;
                fs.train_config = self.kmeans_config()?;
                if self.rerank > 1 {
                    fs.keep_originals(RerankStorage::F32)?;
                    fs.rerank_factor = self.rerank;
                }
                fs.qbs = qbs.clamp(1, pqcache_simd::fastscan::MAX_QBS);
                AnyIndex::PqFastScan(fs)
            }
            IndexKind::Ivfpqfs => {
                let mut ivf = IndexIVFPQFastScan::new(d, self.nlist, self.m, metric)?;
                ivf.train_config = self.kmeans_config()?;
                ivf.coarse_niter = self.coarse_niter;
                ivf.nprobe = checked_nprobe(self.nprobe, self.nlist)?;
                if self.rerank > 1 {
                    ivf.keep_originals(RerankStorage::F32)?;
                    ivf.rerank_factor = self.rerank;
                }
                AnyIndex::IvfPqFastScan(ivf)
            }
        })
    }

    /// (m, nbits) as reported.
    fn code_shape(&self) -> (usize, usize) {
        match self.index {
            IndexKind::Pq => (self.m, self.nbits),
            IndexKind::Pqfs | IndexKind::Ivfpqfs => (self.m, 4),
            _ => (0, 0),
        }
    }
}

/// `--nprobe` as `build`, `eval` and `search` take it: at least 1 and at most `nlist` (as the
/// Python binding's setter; FAISS's C++ quietly probes every list). Before this check,
/// `build --nprobe 0` stored 1 and `build --nprobe 100 --nlist 16` stored 100.
pub(super) fn checked_nprobe(nprobe: usize, nlist: usize) -> Result<usize> {
    if nprobe == 0 {
        return Err(Error::InvalidArgument("--nprobe must be at least 1".into()));
    }
    crate::limits::at_most(nprobe, nlist, "--nprobe")
}

/// Arguments of `pqcache eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Base vectors (.npy 2-d or 4-d [layer, head, token, dim], .fvecs).
    #[arg(long)]
    pub base: PathBuf,
    /// Query vectors (same formats).
    #[arg(long)]
    pub queries: PathBuf,
    /// Ground-truth ids (.ivecs); without it, recall is measured against exact search.
    #[arg(long)]
    pub groundtruth: Option<PathBuf>,
    /// The index to build.
    #[command(flatten)]
    pub opts: IndexOptions,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Queries per search call.
    #[arg(long, default_value_t = 1)]
    pub qbs: usize,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Timed repetitions of the search (the best is reported; at most 10,000).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Layer of a 4-d .npy.
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Head of a 4-d .npy (base: always kv head 0; queries: this query head).
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// Print one JSON object (and no progress bars).
    #[arg(long)]
    pub json: bool,
}

/// The figures of one evaluation, named as `faiss_bench.py` names them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Always "pqcache".
    pub peer: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// Index kind.
    pub index: String,
    /// Base vectors.
    pub n: usize,
    /// Dimension.
    pub d: usize,
    /// Sub-quantizers.
    pub m: usize,
    /// Bits per index.
    pub nbits: usize,
    /// Neighbours.
    pub k: usize,
    /// Queries per search call.
    pub qbs: usize,
    /// Metric name.
    pub metric: String,
    /// Threads.
    pub threads: usize,
    /// Training time, seconds.
    pub train_s: f64,
    /// Adding time, seconds.
    pub add_s: f64,
    /// Search time per query, microseconds (best of `reps`).
    pub search_us_per_query: f64,
    /// Search time per base vector per query, nanoseconds.
    pub ns_per_code_per_query: f64,
    /// Mean recall@k.
    pub recall_at_k: f64,
}

/// Runs `pqcache eval`.
pub fn run(a: &EvalArgs) -> Result<()> {
    let report = with_threads(a.threads, || evaluate(a))??;
    if a.json {
        outln!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        outln!(
            "{} n={} d={} m={} nbits={} k={} qbs={} metric={} threads={}\n  train {:.3} s, add {:.3} s, search {:.1} us/query ({:.3} ns/code/query), recall@{} = {:.4}",
            report.index, report.n, report.d, report.m, report.nbits, report.k, report.qbs, report.metric,
            report.threads, report.train_s, report.add_s, report.search_us_per_query,
            report.ns_per_code_per_query, report.k, report.recall_at_k
        );
    }
    Ok(())
}

/// Most timed repetitions of one `eval`.
const MAX_REPS: usize = 10_000;

/// Builds, times and scores the index described by `a` on the current thread pool.
pub fn evaluate(a: &EvalArgs) -> Result<EvalReport> {
    let metric: Metric = a.opts.metric.parse()?;
    if a.qbs == 0 || a.reps == 0 {
        return Err(Error::InvalidArgument(
            "qbs and reps must be at least 1".into(),
        ));
    }
    // Timed repetitions are a benchmark's count: past this a run would not end in a working
    // day whatever the index (and `reps + 1` would wrap at usize::MAX).
    crate::limits::at_most(a.reps, MAX_REPS, "--reps")?;
    let show = !a.json;
    let base = load_vectors(&a.base, a.layer, 0)?;
    let queries = load_vectors(&a.queries, a.layer, a.head)?;
    if base.dim != queries.dim {
        return Err(Error::DimensionMismatch {
            expected: base.dim,
            got: queries.dim,
        });
    }
    let (n, d) = (base.rows, base.dim);
    // Whole files up front: searched in batches, a bad query would be named by its row in
    // its batch.
    check_vectors(&base.data, d, "base")?;
    check_vectors(&queries.data, d, "queries")?;
    let mut index = a.opts.empty_index(d, a.qbs)?;
    let spin = Progress::spinner("training", show);
    let t = Instant::now();
    index.train(base.head(a.opts.train_n))?;
    let train_s = t.elapsed().as_secs_f64();
    spin.finish();
    let spin = Progress::spinner("adding", show);
    let t = Instant::now();
    index.add(&base.data)?;
    let add_s = t.elapsed().as_secs_f64();
    spin.finish();

    let nq = queries.rows / a.qbs * a.qbs;
    if nq == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} queries cannot fill one batch of qbs = {}",
            queries.rows, a.qbs
        )));
    }
    let qdata = &queries.data[..nq * d];
    let bar = Progress::new((a.reps + 1) as u64, "searching", show);
    let mut best = f64::INFINITY;
    for rep in 0..=a.reps {
        let t = Instant::now();
        for batch in qdata.chunks(a.qbs * d) {
            index.search(batch, a.k)?;
        }
        // Repetition 0 warms caches and page tables; it is not timed.
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
        bar.inc(1);
    }
    bar.finish();
    let found = index.search(qdata, a.k)?;
    let recall = match &a.groundtruth {
        Some(path) => {
            let (rows, gk, gt) = load_groundtruth(path)?;
            if rows < nq || gk < a.k {
                return Err(Error::InvalidArgument(format!(
                    "ground truth has {rows} rows of {gk} ids, need {nq} rows of at least {}",
                    a.k
                )));
            }
            found.recall_against(&gt, gk)
        }
        None => {
            let mut exact = IndexFlat::new(d, metric)?;
            exact.add(&base.data)?;
            found.recall_against(&exact.search(qdata, a.k)?.ids, a.k)
        }
    };
    let (m, nbits) = a.opts.code_shape();
    Ok(EvalReport {
        peer: "pqcache",
        version: env!("CARGO_PKG_VERSION"),
        index: a.opts.index.name().to_string(),
        n,
        d,
        m,
        nbits,
        k: a.k,
        qbs: a.qbs,
        metric: metric.name().to_string(),
        threads: a.threads,
        train_s,
        add_s,
        search_us_per_query: best / nq as f64 * 1e6,
        ns_per_code_per_query: best / nq as f64 / n as f64 * 1e9,
        recall_at_k: recall,
    })
}
