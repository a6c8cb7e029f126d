//! The `peer` program: see `peer --help`.

use clap::Parser;

fn main() {
    let cli = peer_train::cli::Cli::parse();
    if let Err(err) = peer_train::cli::run(cli) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
