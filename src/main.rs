//! The `peer` program: see `peer --help`.

use clap::Parser;

/// See [`peer::allocator`]: step buffers are reused instead of faulted in afresh.
#[global_allocator]
static ALLOCATOR: peer::allocator::MiMalloc = peer::allocator::MiMalloc;

fn main() {
    peer::allocator::keep_freed_pages();
    let cli = peer_train::cli::Cli::parse();
    if let Err(err) = peer_train::cli::run(cli) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
