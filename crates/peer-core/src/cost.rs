//! One set of formulas for parameter counts and FLOPs (a multiply-add counts 2 FLOPs).
//!
//! Per token, forward, for a layer of width n = `d_model`:
//!
//! | layer | FLOPs per token | active params |
//! |---|---|---|
//! | dense (GELU / SwiGLU, hidden f) | 2·(2 or 3)·n·f | (2 or 3)·n·f |
//! | MoE (E experts, hidden f, k active) | 2·n·E (router) + k·2·(2 or 3)·n·f | n·E + k·(2 or 3)·n·f |
//! | PKM (h heads, key dim d, top-k) | 2·n·h·d + 2·h·d·√N + h·k² + 2·h·k·n | n·h·d + keys + h·k·n |
//! | PEER (h heads, key dim d, top-k) | 2·n·h·d + 2·h·d·√N + h·k² + 4·h·k·n | n·h·d + keys + 2·h·k·n |
//!
//! Retrieval (query network, sub-key scores, k² candidate sums) is counted, as PEER_NOTES §2
//! asks: at the paper's sizes it costs more than the active experts themselves. Norms, biases,
//! activations, softmax and top-k selection are not counted (they are O(n) or O(k²)).

use crate::config::KeyScoring;

/// What a feed-forward layer costs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerCost {
    /// Every trainable parameter of the layer (BatchNorm running statistics are buffers and
    /// are not counted; Burn's `Module::num_params` counts them).
    pub params: usize,
    /// Parameters one token touches in a forward pass.
    pub active_params: usize,
    /// Forward FLOPs per token (2 per multiply-add).
    pub flops_per_token: f64,
}

/// The cost of product-key retrieval for h heads: query network, sub-key scores and the k²
/// candidate sums, with `key_sets` sub-key pairs (1 when shared).
pub(crate) fn retrieval_cost(
    d_model: usize,
    heads: usize,
    key_dim: usize,
    num_keys: usize,
    top_k: usize,
    key_sets: usize,
    query_params: usize,
    scoring: KeyScoring,
) -> LayerCost {
    let root = (num_keys as f64).sqrt() as usize;
    // The normalised scorings learn one scale.
    let key_params = key_sets * root * key_dim + usize::from(scoring != KeyScoring::Dot);
    let flops = 2.0 * (d_model * heads * key_dim) as f64
        + 2.0 * (heads * key_dim * root) as f64
        + (heads * top_k * top_k) as f64;
    LayerCost {
        params: query_params + key_params,
        // One token scores against every sub-key of its heads' sets.
        active_params: query_params + key_params,
        flops_per_token: flops,
    }
}
