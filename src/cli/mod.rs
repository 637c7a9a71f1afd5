//! The `pqcache` command line: `eval` (build, search and score an index on vector files, with
//! the same JSON as `../shared/peers/faiss_bench.py`) and `demo` (the README's main job on the
//! bundled Gemma sample), `build` / `search` / `info` (index files).

pub mod demo;
pub mod eval;
pub mod eval_attention;
pub mod files;
mod progress;

use clap::{Parser, Subcommand};

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "pqcache",
    version,
    about = "SIMD product-quantization retrieval for long contexts"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build an index over a base set, search it, print timings and recall.
    Eval(eval::EvalArgs),
    /// Sparse-attention fidelity of token selectors on an attention dump (q, k, v).
    EvalAttention(eval_attention::EvalAttentionArgs),
    /// Run the demonstration on the bundled real data (Gemma-3-270M keys and queries).
    Demo(demo::DemoArgs),
    /// Build an index over a base set and save it to a file.
    Build(files::BuildArgs),
    /// Search an index file (opened zero-copy) for the queries of a vector file.
    Search(files::SearchArgs),
    /// Describe an index file; --verify checks every checksum.
    Info(files::InfoArgs),
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Eval(a) => eval::run(&a),
        Command::EvalAttention(a) => eval_attention::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Build(a) => files::build(&a),
        Command::Search(a) => files::search(&a),
        Command::Info(a) => files::info(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                crate::Error::Io { .. }
                | crate::Error::Format { .. }
                | crate::Error::Corrupt { .. }
                | crate::Error::Incompatible { .. } => 2,
                _ => 1,
            }
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends the program quietly with status 0, as
/// Unix tools do (`println!` panics there). Any other write error exits with status 1.
pub fn out(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(s.as_bytes()).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`out`].
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::out(&format!("{}\n", format_args!($($t)*)))
    };
}
pub(crate) use outln;

/// Runs `f` on a rayon pool of `threads` threads (0: all cores).
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> crate::Result<T> {
    crate::limits::at_most(threads, crate::limits::MAX_THREADS, "--threads")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            crate::Error::InvalidArgument(format!("cannot start {threads} threads: {e}"))
        })?;
    Ok(pool.install(f))
}
