//! [`TransformerConfig`]: the shape of the language model and the feed-forward of each block.

use burn::config::Config;
use peer_core::{ConfigError, DenseFfwConfig, DenseKind, LayerCost, MoeConfig, PeerConfig, PkmConfig};

/// The feed-forward layer of one block.
#[derive(Config, Debug, PartialEq)]
pub enum FeedForwardConfig {
    /// A dense MLP.
    Dense(DenseFfwConfig),
    /// A coarse mixture of experts.
    Moe(MoeConfig),
    /// A product-key memory.
    Pkm(PkmConfig),
    /// A PEER layer.
    Peer(PeerConfig),
}

impl FeedForwardConfig {
    /// A short name: `dense`, `moe`, `pkm` or `peer`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
            Self::Moe(_) => "moe",
            Self::Pkm(_) => "pkm",
            Self::Peer(_) => "peer",
        }
    }

    /// The layer's width.
    pub fn d_model(&self) -> usize {
        match self {
            Self::Dense(c) => c.d_model,
            Self::Moe(c) => c.d_model,
            Self::Pkm(c) => c.d_model,
            Self::Peer(c) => c.d_model,
        }
    }

    /// Checks the layer's own rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Dense(c) => c.validate(),
            Self::Moe(c) => c.validate(),
            Self::Pkm(c) => c.validate(),
            Self::Peer(c) => c.validate(),
        }
    }

    /// Parameters, active parameters and forward FLOPs per token.
    pub fn cost(&self) -> LayerCost {
        match self {
            Self::Dense(c) => c.cost(),
            Self::Moe(c) => c.cost(),
            Self::Pkm(c) => c.cost(),
            Self::Peer(c) => c.cost(),
        }
    }
}

/// The feed-forward of one selected block, overriding [`TransformerConfig::feed_forward`].
#[derive(Config, Debug, PartialEq)]
pub struct BlockFeedForward {
    /// Block index, from 0.
    pub block: usize,
    /// Its feed-forward layer.
    pub feed_forward: FeedForwardConfig,
}

/// Configuration of a decoder-only [`Transformer`](crate::Transformer): pre-norm (RMSNorm)
/// blocks of causal self-attention with rotary positions and a feed-forward layer chosen per
/// block.
///
/// ```
/// use peer_core::{PeerConfig, QueryNorm};
/// use peer_model::{FeedForwardConfig, TransformerConfig};
///
/// // Dense blocks everywhere except the middle one, which is PEER (the paper's placement).
/// let config = TransformerConfig::dense(512, 64, 3, 4, 64, 256).with_middle_block(
///     FeedForwardConfig::Peer(PeerConfig::new(64, 32 * 32).with_key_dim(32).with_top_k(8)),
/// );
/// assert!(config.validate().is_ok());
/// assert_eq!(config.feed_forward_of(1).kind(), "peer");
/// assert_eq!(config.feed_forward_of(0).kind(), "dense");
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct TransformerConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention heads per block (must divide `d_model`; head size must be even for RoPE).
    pub num_heads: usize,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_seq_len: usize,
    /// Feed-forward layer of every block not listed in `block_feed_forward`.
    pub feed_forward: FeedForwardConfig,
    /// Per-block overrides of `feed_forward`.
    #[config(default = "Vec::new()")]
    pub block_feed_forward: Vec<BlockFeedForward>,
    /// Share the token embedding with the output projection.
    #[config(default = true)]
    pub tie_embeddings: bool,
    /// RoPE base frequency.
    #[config(default = 10000.0)]
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub norm_epsilon: f64,
}

impl TransformerConfig {
    /// A model with a dense GELU feed-forward of width `hidden` in every block.
    pub fn dense(
        vocab_size: usize,
        d_model: usize,
        num_layers: usize,
        num_heads: usize,
        max_seq_len: usize,
        hidden: usize,
    ) -> Self {
        Self::new(
            vocab_size,
            d_model,
            num_layers,
            num_heads,
            max_seq_len,
            FeedForwardConfig::Dense(DenseFfwConfig::new(d_model, hidden).with_kind(DenseKind::Gelu)),
        )
    }

    /// Puts `feed_forward` in the middle block (`num_layers / 2`) only.
    pub fn with_middle_block(self, feed_forward: FeedForwardConfig) -> Self {
        let block = self.num_layers / 2;
        self.with_block(block, feed_forward)
    }

    /// Puts `feed_forward` in block `block`, replacing an earlier override of that block.
    pub fn with_block(mut self, block: usize, feed_forward: FeedForwardConfig) -> Self {
        self.block_feed_forward.retain(|b| b.block != block);
        self.block_feed_forward.push(BlockFeedForward::new(block, feed_forward));
        self
    }

    /// The feed-forward configuration of block `block`.
    pub fn feed_forward_of(&self, block: usize) -> &FeedForwardConfig {
        self.block_feed_forward.iter().find(|b| b.block == block).map_or(&self.feed_forward, |b| &b.feed_forward)
    }

    /// Checks every rule, naming the field (`block_feed_forward[i].…` for overrides).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1, got 0"));
            }
        }
        if !self.d_model.is_multiple_of(self.num_heads) || !(self.d_model / self.num_heads).is_multiple_of(2) {
            return Err(ConfigError::new(
                "num_heads",
                format!(
                    "must divide d_model = {} into even head sizes (RoPE rotates pairs), got {}",
                    self.d_model, self.num_heads
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigError::new("rope_theta", "must be finite and positive"));
        }
        if !(self.norm_epsilon.is_finite() && self.norm_epsilon > 0.0) {
            return Err(ConfigError::new("norm_epsilon", "must be finite and positive"));
        }
        let check = |field: &'static str, ffw: &FeedForwardConfig| {
            ffw.validate().map_err(|e| ConfigError::new(field, format!("{}: `{}` {}", ffw.kind(), e.field, e.rule)))?;
            if ffw.d_model() != self.d_model {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} layer has d_model = {} but the model has d_model = {}",
                        ffw.kind(),
                        ffw.d_model(),
                        self.d_model
                    ),
                ));
            }
            Ok(())
        };
        check("feed_forward", &self.feed_forward)?;
        for override_ in &self.block_feed_forward {
            if override_.block >= self.num_layers {
                return Err(ConfigError::new(
                    "block_feed_forward",
                    format!("names block {} but the model has blocks 0..{}", override_.block, self.num_layers),
                ));
            }
            check("block_feed_forward", &override_.feed_forward)?;
        }
        Ok(())
    }
}

/// Fields PEER and PKM configurations gained after models were first saved, with the value
/// that means what a configuration written without them meant: a model directory or training
/// configuration from an earlier version loads as the model it was.
const ADDED_PRODUCT_KEY_FIELDS: [(&str, fn() -> serde_json::Value); 5] = [
    ("scoring", || serde_json::json!("Dot")),
    ("score_scale", || serde_json::Value::Null),
    ("balance_loss", || serde_json::json!(0.0)),
    ("balance", || serde_json::json!("SubKeys")),
    ("expert_up_init_std", || serde_json::Value::Null),
];

/// Fields only PEER configurations gained later, likewise.
const ADDED_PEER_FIELDS: [(&str, fn() -> serde_json::Value); 1] = [("sparse_gradients", || serde_json::json!(true))];

/// Completes, in place, every PEER and PKM configuration inside `value` (a serialised
/// [`TransformerConfig`] or anything that holds one) that lacks a field added later, with the
/// value that reproduces the earlier behaviour. Burn's `Config` derive requires every field
/// when deserialising; call this on the JSON first.
pub fn complete_legacy_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, inner) in fields.iter_mut() {
                if let ("Peer" | "Pkm", serde_json::Value::Object(layer)) = (key.as_str(), &mut *inner) {
                    let peer_only = if key == "Peer" { &ADDED_PEER_FIELDS[..] } else { &[] };
                    for (field, legacy) in ADDED_PRODUCT_KEY_FIELDS.iter().chain(peer_only) {
                        layer.entry(*field).or_insert_with(legacy);
                    }
                }
                complete_legacy_json(inner);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(complete_legacy_json),
        _ => {}
    }
}
