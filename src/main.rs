//! The `pqcache` binary: see `pqcache --help`.
use clap::Parser;

fn main() {
    let cli = pqcache::cli::Cli::parse();
    std::process::exit(pqcache::cli::run(cli));
}
