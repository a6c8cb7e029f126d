//! # peer-core
//!
//! The PEER layer of "Mixture of A Million Experts" (X. O. He, arXiv 2407.04153) as Burn 0.22
//! modules, and the feed-forward layers it is compared against.
//!
//! A PEER layer holds N one-neuron experts `e_i(x) = σ(u_i·x) v_i`. For each token, h query
//! heads retrieve their top-k experts through product keys (exact, O(√N) per query), weight
//! them with a softmax over the retrieved scores, and sum the results.
//!
//! - [`PeerConfig`] / [`Peer`]: the layer (Algorithm 1).
//! - [`ProductKeys`]: exact product-key top-k retrieval, reusable by other memory layers.
//! - [`QueryNetwork`]: the h query heads and the query norm.
//! - [`Experts`]: the two `[N, d_model]` expert tables ([`ExpertTable`]).
//! - Row-sparse training ([`expert_updates`]): a plain `loss.backward()` leaves the gradients
//!   of the retrieved rows only, and [`apply_expert_updates`] applies the lazy AdamW
//!   ([`SparseAdamWConfig`]) to those rows of every expert pool of a model, in place.
//! - [`ExpertUsage`]: the paper's expert usage and unevenness statistics.
//! - [`interop`]: loading PEER-pytorch (the PyTorch reference) weights.
//! - Baselines: [`DenseFfw`] (GELU / SwiGLU), [`Moe`] (token- or expert-choice), [`Pkm`]
//!   (product-key memory), each with a [`LayerCost`] from one formula set ([`cost`]).
//!
//! On Flex the layer's retrieval and experts run as fused CPU kernels (read in place through
//! Burn's `extension` feature: sub-key scores by `gemm` in cache-sized blocks reduced to their
//! top-k at once, experts visited one by one); other devices compose Burn tensor ops. Both give
//! the same results, checked against each other and against brute force in the tests.
//!
//! Modules are not generic over a backend: the same `Peer` runs on Flex, NdArray, wgpu or CUDA,
//! whichever `Device` its tensors live on.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peer_core::{ExpertUsage, PeerConfig};
//!
//! let device = Device::flex();
//! let config = PeerConfig::new(64, 32 * 32).with_heads(2).with_top_k(4).with_key_dim(32);
//! let peer = config.init(&device);
//!
//! let x = Tensor::<3>::random([2, 8, 64], Distribution::Normal(0.0, 1.0), &device);
//! let (y, routing) = peer.forward_with_routing(x);
//! assert_eq!(y.dims(), [2, 8, 64]);
//!
//! let mut usage = ExpertUsage::new(config.num_experts);
//! usage.add_routing(&routing);
//! assert!(usage.usage() > 0.0);
//! ```
#![warn(missing_docs)]

pub mod activation;
mod config;
pub mod cost;
mod custom_op;
mod dense;
mod device;
mod error;
pub mod expert_updates;
mod experts;
pub mod interop;
mod kernels;
mod moe;
mod peer;
mod pkm;
mod product_keys;
mod query;
pub mod sparse_adamw;
pub mod table;
mod usage;

pub use config::{Activation, Balance, Gate, KeyScoring, PeerConfig, QueryNorm};
pub use cost::LayerCost;
pub use dense::{DenseFfw, DenseFfwConfig, DenseKind};
pub use device::device_works;
pub use error::ConfigError;
pub use expert_updates::{ExpertPool, apply_expert_updates, discard_row_gradients, expert_pools, take_row_gradients};
pub use experts::{ExpertGradients, Experts, RowGradients, TouchedRows, touched_rows};
pub use kernels::set_gpu_kernels;
pub use moe::{Moe, MoeConfig, MoeRouting};
pub use peer::{HostRouting, Peer, PeerRouting};
pub use pkm::{Pkm, PkmConfig};
pub use product_keys::{ProductKeys, ProductKeysConfig};
pub use query::QueryNetwork;
pub use sparse_adamw::{RowMoments, SparseAdamWConfig, SparseAdamWState};
pub use table::{ExpertTable, GPU_BLOCK_BYTES, TableRows, block_rows, max_buffer_bytes};
pub use usage::{ExpertUsage, FrequentTokens, RoutingReport, Spread, TokenLoad};
