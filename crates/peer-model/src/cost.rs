//! Parameter counts and FLOPs of a whole model, and FLOP matching of feed-forward layers.
//!
//! Per token and block, forward (n = `d_model`, L = `max_seq_len`):
//! - attention projections: 2 · 4n² (Q, K, V, output);
//! - attention scores and weighted values: 4 · n · (L + 1)/2 (a causal token sees (L + 1)/2
//!   positions on average);
//! - feed-forward: [`FeedForwardConfig::cost`] (retrieval included).
//!
//! Plus 2 · n · V for the output projection. Training FLOPs are 3× forward (backward ≈ 2×).

use peer_core::{ConfigError, LayerCost};

use crate::config::{FeedForwardConfig, TransformerConfig};

/// Size and compute of a model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelCost {
    /// All parameters.
    pub params: usize,
    /// Parameters one token uses.
    pub active_params: usize,
    /// Forward FLOPs per token (inference).
    pub forward_flops_per_token: f64,
    /// Forward + backward FLOPs per token (training), 3× forward.
    pub training_flops_per_token: f64,
}

impl TransformerConfig {
    /// Parameters and FLOPs per token of this model.
    pub fn cost(&self) -> ModelCost {
        let n = self.d_model;
        let embedding = self.vocab_size * n;
        let head = if self.tie_embeddings { 0 } else { embedding };
        let attention_params = 4 * n * n;
        let norms_per_block = 2 * n;
        let context = (self.max_seq_len as f64 + 1.0) / 2.0;
        let attention_flops = 2.0 * attention_params as f64 + 4.0 * n as f64 * context;

        let mut params = embedding + head + n; // + final norm
        let mut active = params;
        let mut flops = 2.0 * (n * self.vocab_size) as f64;
        for block in 0..self.num_layers {
            let LayerCost { params: p, active_params: a, flops_per_token: f } = self.feed_forward_of(block).cost();
            params += attention_params + norms_per_block + p;
            active += attention_params + norms_per_block + a;
            flops += attention_flops + f;
        }
        ModelCost {
            params,
            active_params: active,
            forward_flops_per_token: flops,
            training_flops_per_token: 3.0 * flops,
        }
    }

    /// A copy of this model whose every block using a feed-forward other than `template`'s
    /// kind keeps its layer, and whose blocks overridden by `block_feed_forward` (or all
    /// blocks, when there is no override) get `template` resized to the FLOPs of the layer it
    /// replaces. The result has the same forward FLOPs per token as `self` up to rounding of
    /// one integer dimension (see [`size_to_flops`]).
    pub fn flop_matched(&self, template: &FeedForwardConfig) -> Result<TransformerConfig, ConfigError> {
        let mut matched = self.clone();
        if self.block_feed_forward.is_empty() {
            matched.feed_forward = size_to_flops(template, self.feed_forward.cost().flops_per_token)?;
        } else {
            for (slot, original) in matched.block_feed_forward.iter_mut().zip(&self.block_feed_forward) {
                slot.feed_forward = size_to_flops(template, original.feed_forward.cost().flops_per_token)?;
            }
        }
        matched.validate()?;
        Ok(matched)
    }
}

/// `template` with one dimension chosen so its forward FLOPs per token are as close as possible
/// to `target`: the hidden width of a dense layer or MoE expert, the key dimension of a PKM or
/// PEER layer (kept even).
pub fn size_to_flops(template: &FeedForwardConfig, target: f64) -> Result<FeedForwardConfig, ConfigError> {
    // Every layer's FLOPs are affine in its free dimension: measure at two values and solve.
    fn set(config: &mut FeedForwardConfig, value: usize) {
        match config {
            FeedForwardConfig::Dense(c) => c.hidden = value,
            FeedForwardConfig::Moe(c) => c.hidden = value,
            FeedForwardConfig::Pkm(c) => c.key_dim = value,
            FeedForwardConfig::Peer(c) => c.key_dim = value,
        }
    }
    let step = if matches!(template, FeedForwardConfig::Pkm(_) | FeedForwardConfig::Peer(_)) { 2 } else { 1 };
    let flops_with = |value: usize| {
        let mut c = template.clone();
        set(&mut c, value);
        c.cost().flops_per_token
    };
    let (a, b) = (flops_with(2 * step), flops_with(4 * step));
    let per_unit = (b - a) / (2 * step) as f64;
    let fixed = a - per_unit * (2 * step) as f64;
    let ideal = (target - fixed) / per_unit;
    if ideal < step as f64 {
        return Err(ConfigError::new(
            "feed_forward",
            format!(
                "a {} layer cannot be sized down to {target:.3e} FLOPs per token: its fixed cost is {fixed:.3e}",
                template.kind()
            ),
        ));
    }
    let value = ((ideal / step as f64).round() as usize).max(1) * step;
    let mut sized = template.clone();
    set(&mut sized, value);
    Ok(sized)
}
