//! # peer-train
//!
//! Data, tokenizer, training and evaluation of PEER (and dense, MoE, PKM) language models with
//! Burn's own training loop, and the `peer` command-line program.
//!
//! - [`corpus`]: the bundled World English Bible or any text, split by held-out books.
//! - [`tokenizer`]: byte-level BPE through the `tokenizers` crate, cached beside the corpus.
//! - [`data`]: token windows as a `burn-dataset` `Dataset` and a `Batcher`.
//! - [`training`]: `SupervisedTraining` + `Learner` with AdamW (expert tables in their own
//!   group), warm-up + cosine, clipping, atomic checkpoints, `--resume`, NaN guard.
//! - [`charts`]: PNG charts drawn by the repository's `tools/plot`.
//! - [`metrics`]: tokens/s, expert usage and unevenness as Burn metrics.
//! - [`renderer`]: plain progress lines when stdout is not a terminal (Burn's dashboard otherwise).
//! - [`cli`]: `peer train | eval | generate | info`.
#![warn(missing_docs)]

pub mod charts;
pub mod cli;
pub mod corpus;
pub mod data;
pub mod error;
pub mod learner;
pub mod metrics;
pub mod renderer;
pub mod tokenizer;
pub mod training;

pub use error::TrainError;
