//! The decoder-only language model, top to bottom.

use burn::module::{Initializer, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::tensor::{Device, Int, Tensor};
use peer_core::{ConfigError, DenseFfw, Moe, Peer, PeerRouting, Pkm, ProductKeys};

use crate::attention::{CausalSelfAttention, KvCache};
use crate::config::{FeedForwardConfig, TransformerConfig};

/// The feed-forward layer of a block.
#[derive(Module, Debug)]
pub enum FeedForward {
    /// Dense MLP.
    Dense(DenseFfw),
    /// Mixture of experts.
    Moe(Moe),
    /// Product-key memory.
    Pkm(Pkm),
    /// PEER.
    Peer(Peer),
}

/// What a feed-forward layer returns besides its output.
struct FeedForwardOutput {
    output: Tensor<3>,
    aux_loss: Option<Tensor<1>>,
    routing: Option<PeerRouting>,
}

impl FeedForward {
    fn init(config: &FeedForwardConfig, device: &Device) -> Self {
        match config {
            FeedForwardConfig::Dense(c) => Self::Dense(c.init(device)),
            FeedForwardConfig::Moe(c) => Self::Moe(c.init(device)),
            FeedForwardConfig::Pkm(c) => Self::Pkm(c.init(device)),
            FeedForwardConfig::Peer(c) => Self::Peer(c.init(device)),
        }
    }

    fn forward(&self, x: Tensor<3>) -> FeedForwardOutput {
        let (output, aux_loss, mut routing) = match self {
            Self::Dense(layer) => (layer.forward(x), None, None),
            Self::Moe(layer) => {
                let (y, aux) = layer.forward(x);
                (y, Some(aux), None)
            }
            Self::Pkm(layer) => {
                let (y, routing) = layer.forward_with_routing(x);
                (y, None, Some(routing))
            }
            Self::Peer(layer) => {
                let (y, routing) = layer.forward_with_routing(x);
                (y, None, Some(routing))
            }
        };
        // The balance loss of a PEER/PKM layer is an auxiliary loss like the MoE's.
        let aux_loss = aux_loss.or_else(|| routing.as_mut().and_then(|r| r.balance_loss.take()));
        FeedForwardOutput { output, aux_loss, routing }
    }
}

/// One pre-norm block: `x + attn(norm(x))`, then `x + ffw(norm(x))`.
#[derive(Module, Debug)]
pub struct TransformerBlock {
    /// Norm before attention.
    pub attention_norm: RmsNorm,
    /// Causal self-attention.
    pub attention: CausalSelfAttention,
    /// Norm before the feed-forward.
    pub feed_forward_norm: RmsNorm,
    /// Dense, MoE, PKM or PEER.
    pub feed_forward: FeedForward,
}

/// The routing of one PKM or PEER block, for expert-usage metrics.
#[derive(Debug, Clone)]
pub struct BlockRouting {
    /// Block index.
    pub block: usize,
    /// Number of experts (or memory slots) of that block.
    pub num_experts: usize,
    /// Retrieved ids and router weights, `[batch, seq, heads, k]`.
    pub routing: PeerRouting,
}

/// Everything a forward pass produces.
#[derive(Debug)]
pub struct ModelOutput {
    /// Next-token logits, `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Sum of the blocks' weighted auxiliary losses (MoE load balancing, PEER/PKM product-key
    /// balance), `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing of every PKM/PEER block.
    pub routings: Vec<BlockRouting>,
}

/// A decoder-only transformer language model.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use peer_core::{PeerConfig, QueryNorm};
/// use peer_model::{FeedForwardConfig, TransformerConfig};
///
/// let device = Device::flex();
/// let peer = PeerConfig::new(32, 16 * 16)
///     .with_heads(2)
///     .with_top_k(4)
///     .with_key_dim(16)
///     .with_query_norm(QueryNorm::LayerNorm);
/// let config = TransformerConfig::dense(100, 32, 3, 2, 16, 64)
///     .with_middle_block(FeedForwardConfig::Peer(peer));
/// let model = config.init(&device);
///
/// let tokens = Tensor::<2, Int>::from_data([[1, 2, 3, 4]], &device);
/// let output = model.forward(tokens);
/// assert_eq!(output.logits.dims(), [1, 4, 100]);
/// assert_eq!(output.routings.len(), 1); // the PEER block
/// ```
#[derive(Module, Debug)]
pub struct Transformer {
    /// Token embedding `[vocab, d_model]`, N(0, 0.02).
    pub embedding: Embedding,
    /// The blocks.
    pub blocks: Vec<TransformerBlock>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Rotary position frequencies (a constant, not saved).
    pub rope: RotaryEncoding,
}

impl TransformerConfig {
    /// Builds the model.
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message; see
    /// [`try_init`](Self::try_init).
    pub fn init(&self, device: &Device) -> Transformer {
        self.try_init(device).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Builds the model or says which field is invalid.
    pub fn try_init(&self, device: &Device) -> Result<Transformer, ConfigError> {
        self.validate()?;
        let norm = || RmsNormConfig::new(self.d_model).with_epsilon(self.norm_epsilon).init(device);
        let blocks = (0..self.num_layers)
            .map(|block| TransformerBlock {
                attention_norm: norm(),
                attention: CausalSelfAttention::init(self.d_model, self.num_heads, device),
                feed_forward_norm: norm(),
                feed_forward: FeedForward::init(self.feed_forward_of(block), device),
            })
            .collect();
        Ok(Transformer {
            embedding: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device),
            blocks,
            norm: norm(),
            lm_head: (!self.tie_embeddings)
                .then(|| LinearConfig::new(self.d_model, self.vocab_size).with_bias(false).init(device)),
            rope: RotaryEncodingConfig::new(self.max_seq_len, self.d_model / self.num_heads)
                .with_theta(self.rope_theta)
                .init(device),
        })
    }
}

impl Transformer {
    /// Logits for every position, plus auxiliary losses and routings.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` with `seq ≤ max_seq_len`
    /// - output logits: `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<2, Int>) -> ModelOutput {
        self.forward_cached(tokens, None)
    }

    /// Like [`forward`](Self::forward), continuing from the positions held in `cache` (and
    /// appending the new ones to it) when one is given.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> ModelOutput {
        let [_, seq] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let max = self.max_seq_len();
        assert!(start + seq <= max, "sequence of {} positions exceeds max_seq_len = {max}", start + seq);
        let device = tokens.device();
        let mut x = self.embedding.forward(tokens);
        let mut aux_loss = Tensor::<1>::zeros([1], &device);
        let mut routings = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer(index));
            x = x.clone() + block.attention.forward(block.attention_norm.forward(x), &self.rope, slot);
            let ffw = block.feed_forward.forward(block.feed_forward_norm.forward(x.clone()));
            if let Some(aux) = ffw.aux_loss {
                aux_loss = aux_loss + aux;
            }
            x = x + ffw.output;
            if let Some(routing) = ffw.routing {
                routings.push(BlockRouting { block: index, num_experts: block.num_experts(), routing });
            }
        }
        let x = self.norm.forward(x);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embedding.weight.val().transpose().unsqueeze()),
        };
        ModelOutput { logits, aux_loss, routings }
    }

    /// Next-token cross-entropy of `targets` given `inputs`, plus the auxiliary losses.
    /// Returns `(training loss = cross-entropy + aux, cross-entropy alone, output)`.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> (Tensor<1>, Tensor<1>, ModelOutput) {
        let [batch, seq] = targets.dims();
        let output = self.forward(inputs);
        let vocab = self.vocab_size();
        let logits = output.logits.clone().reshape([batch * seq, vocab]);
        let cross_entropy =
            CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, targets.reshape([batch * seq]));
        (cross_entropy.clone() + output.aux_loss.clone(), cross_entropy, output)
    }

    /// Longest sequence the model accepts.
    pub fn max_seq_len(&self) -> usize {
        self.rope.freq_complex.dims()[0]
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    /// Number of blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Switches row-sparse training of every PEER block's expert tables on or off (see
    /// [`PeerConfig::sparse_gradients`](peer_core::PeerConfig::sparse_gradients)).
    pub fn set_sparse_gradients(&mut self, on: bool) {
        for block in &mut self.blocks {
            if let FeedForward::Peer(peer) = &mut block.feed_forward {
                peer.experts.sparse_gradients = on;
            }
        }
    }

    /// The PEER layers, in block order.
    pub fn peer_layers(&self) -> impl Iterator<Item = &Peer> {
        self.blocks.iter().filter_map(|block| match &block.feed_forward {
            FeedForward::Peer(peer) => Some(peer),
            _ => None,
        })
    }
}

impl Transformer {
    /// The product keys of block `block` when it is a PEER or PKM block.
    pub fn product_keys(&self, block: usize) -> Option<&ProductKeys> {
        match &self.blocks.get(block)?.feed_forward {
            FeedForward::Peer(p) => Some(&p.product_keys),
            FeedForward::Pkm(p) => Some(&p.product_keys),
            _ => None,
        }
    }
}

impl TransformerBlock {
    /// Experts (or memory slots) of a PEER/PKM block, 0 otherwise.
    fn num_experts(&self) -> usize {
        match &self.feed_forward {
            FeedForward::Peer(p) => p.num_experts(),
            FeedForward::Pkm(p) => p.values.dims()[0],
            _ => 0,
        }
    }
}
