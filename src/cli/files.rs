//! `pqcache build`, `search` and `info`: index files from the command line.

use super::eval::{checked_nprobe, IndexOptions};
use super::outln;
use super::progress::Progress;
use super::with_threads;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::io::file::{self, AnyIndex};
use crate::io::load_vectors;
use crate::limits;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `pqcache build`.
#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    /// Base vectors (.npy 2-d or 4-d [layer, head, token, dim], .fvecs).
    #[arg(long)]
    pub base: PathBuf,
    /// The index to build.
    #[command(flatten)]
    pub opts: IndexOptions,
    /// Layer of a 4-d .npy (kv head 0).
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The index file to write (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `pqcache search`.
#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// An index file.
    #[arg(long)]
    pub index: PathBuf,
    /// Query vectors (same formats as the base).
    #[arg(long)]
    pub queries: PathBuf,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Layer / query head of a 4-d .npy.
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Query head of a 4-d .npy.
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// IVF: lists probed per query, for this search (the file's setting otherwise; at most
    /// nlist).
    #[arg(long)]
    pub nprobe: Option<usize>,
    /// Fast-scan and IVF: re-rank the best k * F candidates exactly, for this search (the
    /// file's setting otherwise; 0 or 1: off). Needs an index built with its originals
    /// (`build --rerank`).
    #[arg(long)]
    pub rerank: Option<usize>,
    /// Read the file into memory instead of mapping it.
    #[arg(long)]
    pub load: bool,
    /// Print JSON: {"ids": [[...], ...], "distances": [[...], ...]}.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pqcache info`.
#[derive(Args, Debug, Clone)]
pub struct InfoArgs {
    /// An index file.
    pub file: PathBuf,
    /// Check every checksum and invariant; exit non-zero on damage.
    #[arg(long)]
    pub verify: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pqcache build`.
pub fn build(a: &BuildArgs) -> Result<()> {
    with_threads(a.threads, || -> Result<()> {
        let base = load_vectors(&a.base, a.layer, 0)?;
        let mut index = a.opts.empty_index(base.dim, 1)?;
        let t = Instant::now();
        let spin = Progress::spinner("training", true);
        index.train(base.head(a.opts.train_n))?;
        spin.finish();
        let spin = Progress::spinner("adding", true);
        index.add(&base.data)?;
        spin.finish();
        file::save(&index, &a.out)?;
        eprintln!(
            "built {} over {} x {} in {:.2} s -> {}",
            a.opts.index.name(),
            base.rows,
            base.dim,
            t.elapsed().as_secs_f64(),
            a.out.display()
        );
        Ok(())
    })?
}

/// Runs `pqcache search`.
pub fn search(a: &SearchArgs) -> Result<()> {
    let mut index = if a.load {
        file::load(&a.index)?
    } else {
        file::open(&a.index)?
    };
    search_settings(&mut index, a.nprobe, a.rerank)?;
    let q = load_vectors(&a.queries, a.layer, a.head)?;
    if q.dim != index.dim() {
        return Err(Error::DimensionMismatch {
            expected: index.dim(),
            got: q.dim,
        });
    }
    let res = index.search(&q.data, a.k)?;
    if a.json {
        let rows = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(a.k).map(<[f32]>::to_vec).collect() };
        let ids: Vec<Vec<i64>> = res.ids.chunks(a.k).map(<[i64]>::to_vec).collect();
        let out = serde_json::json!({"ids": ids, "distances": rows(&res.distances)});
        outln!("{out}");
    } else {
        for qi in 0..res.nq {
            let line: Vec<String> = res
                .ids_of(qi)
                .iter()
                .zip(res.distances_of(qi))
                .map(|(id, d)| format!("{id}:{d}"))
                .collect();
            outln!("{qi}\t{}", line.join(" "));
        }
    }
    Ok(())
}

/// Applies `search --nprobe / --rerank` to an opened index: refused where the kind has no
/// such setting, or out of range.
fn search_settings(
    index: &mut AnyIndex,
    nprobe: Option<usize>,
    rerank: Option<usize>,
) -> Result<()> {
    let kind = index.kind();
    if let Some(n) = nprobe {
        let AnyIndex::IvfPqFastScan(ivf) = index else {
            return Err(Error::InvalidArgument(format!(
                "--nprobe applies to an IVF index; this file holds {kind:?}"
            )));
        };
        ivf.nprobe = checked_nprobe(n, ivf.nlist())?;
    }
    if let Some(f) = rerank {
        limits::at_most(f, limits::MAX_RERANK_FACTOR, "--rerank")?;
        let (factor, kept) = match index {
            AnyIndex::PqFastScan(fs) => {
                let kept = fs.originals().is_some();
                (&mut fs.rerank_factor, kept)
            }
            AnyIndex::IvfPqFastScan(ivf) => {
                let kept = ivf.originals_storage().is_some();
                (&mut ivf.rerank_factor, kept)
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "--rerank applies to a fast-scan or IVF index; this file holds {kind:?}"
                )))
            }
        };
        if f > 1 && !kept {
            return Err(Error::InvalidArgument(
                "--rerank needs the original vectors, and this index was built without them \
                 (build it with --rerank)"
                    .into(),
            ));
        }
        *factor = f;
    }
    Ok(())
}

/// Runs `pqcache info`.
pub fn info(a: &InfoArgs) -> Result<()> {
    let layout = if a.verify {
        file::verify(&a.file)?
    } else {
        file::info(&a.file)?
    };
    let params = if matches!(
        layout.kind,
        file::IndexKind::Attention | file::IndexKind::Context
    ) {
        let cache = file::open_attention(&a.file)?;
        let c = cache.config();
        let mut p: Vec<(String, String)> = vec![
            ("kind".into(), layout.kind.name().into()),
            ("layers".into(), c.shape.layers.to_string()),
            ("kv_heads".into(), c.shape.kv_heads.to_string()),
            ("group".into(), c.group().to_string()),
            ("head_dim".into(), c.shape.head_dim.to_string()),
            ("selector".into(), c.selector.to_string()),
            ("sink".into(), c.sink.to_string()),
        ];
        for layer in 0..c.shape.layers {
            p.push((format!("positions[{layer}]"), cache.len(layer).to_string()));
        }
        p
    } else {
        file::open(&a.file)?.describe()
    };
    if a.json {
        let mut obj = serde_json::Map::new();
        obj.insert("version".into(), layout.version.into());
        obj.insert("file_len".into(), layout.file_len.into());
        for (k, v) in &params {
            obj.insert(k.clone(), v.clone().into());
        }
        let secs: Vec<serde_json::Value> = layout
            .sections
            .iter()
            .map(|s| serde_json::json!({"name": s.tag.name(), "offset": s.offset, "len": s.len}))
            .collect();
        obj.insert("sections".into(), secs.into());
        obj.insert("verified".into(), a.verify.into());
        outln!("{}", serde_json::Value::Object(obj));
    } else {
        outln!(
            "{}: pqcache index, format version {}",
            a.file.display(),
            layout.version
        );
        for (k, v) in &params {
            outln!("  {k:14} {v}");
        }
        outln!("  {:14} {} bytes", "file", layout.file_len);
        for s in &layout.sections {
            outln!(
                "  section {:16} {:>12} bytes at {}",
                s.tag.name(),
                s.len,
                s.offset
            );
        }
        if a.verify {
            outln!("  verified: every checksum and invariant holds");
        }
    }
    Ok(())
}
