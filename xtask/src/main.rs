//! `cargo xtask bench <backends|models|scaling|pytorch>`: benchmarks that print a Markdown table
//! and write JSON under `target/bench/`.

mod harness;
mod layers;
mod models;

use clap::{Parser, Subcommand};

/// The allocator of the `peer` program, so benchmarks measure what it runs.
#[global_allocator]
static ALLOCATOR: peer::allocator::MiMalloc = peer::allocator::MiMalloc;

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The PEER layer and a FLOP-matched dense FFW, forward and forward+backward, on every device.
    Backends(layers::LayerArgs),
    /// Dense, MoE, PKM and PEER language models at equal FLOPs per token, plus a PEER N sweep.
    Models(models::ModelsArgs),
    /// Training-step time and peak memory of a PEER LM as N grows.
    Scaling(models::ScalingArgs),
    /// The PEER layer through PEER-pytorch and through this crate, side by side.
    Pytorch {
        #[command(flatten)]
        layer: layers::LayerArgs,
        /// The Python interpreter with torch and peer-pytorch.
        #[arg(long, env = "PEER_PYTHON", default_value = "python3")]
        python: String,
    },
}

fn main() {
    peer::allocator::keep_freed_pages();
    match Cli::parse().task {
        Task::Bench { bench } => match bench {
            Bench::Backends(args) => layers::backends(&args),
            Bench::Models(args) => models::models(&args),
            Bench::Scaling(args) => models::scaling(&args),
            Bench::Pytorch { layer, python } => layers::pytorch(&layer, &python),
        },
    }
}
