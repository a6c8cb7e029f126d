//! # peer-model
//!
//! A decoder-only transformer language model whose feed-forward layers are chosen per block:
//! dense, MoE, PKM or PEER (from [`peer_core`]). Pre-norm RMSNorm blocks, causal self-attention
//! with rotary positions, optional tied embeddings; generation with a KV cache; checkpoints as
//! model directories; parameter and FLOP counts for FLOP-matched comparisons.
//!
//! See [`Transformer`] for a complete example.
#![warn(missing_docs)]

mod attention;
pub mod checkpoint;
mod config;
mod cost;
mod generate;
mod model;

pub use attention::{CausalSelfAttention, KvCache};
pub use config::{BlockFeedForward, FeedForwardConfig, TransformerConfig, complete_legacy_json};
pub use cost::{ModelCost, size_to_flops};
pub use generate::{GenerateError, SamplingConfig, sample};
pub use model::{BlockRouting, FeedForward, ModelOutput, Transformer, TransformerBlock};
