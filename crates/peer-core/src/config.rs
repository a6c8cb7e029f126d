//! [`PeerConfig`]: the hyper-parameters of a PEER layer and the rules they must satisfy.

use burn::config::Config;

use crate::error::ConfigError;

/// The non-linearity σ of each one-neuron expert `e_i(x) = σ(u_i·x) v_i`.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// The Gaussian error linear unit (erf form), PEER-pytorch's and Meta's choice.
    Gelu,
}

/// How the k scores a head retrieved become its router weights `g`.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Softmax over each head's k scores, as in the paper's Algorithm 1 (computed in f32).
    Softmax,
    /// An independent sigmoid of each score; the weights of a head need not sum to one.
    Sigmoid,
}

/// Normalisation applied to the queries before retrieval.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum QueryNorm {
    /// BatchNorm over the `heads · key_dim` query features, as in the paper (taken from PKM).
    ///
    /// In training mode on an autodiff device the statistics are those of the whole batch, so a
    /// token's query depends on the other tokens of the batch (in a causal LM this leaks a little
    /// information across positions). In evaluation (`Module::valid()`, or any non-autodiff
    /// device) the running statistics are used and tokens are independent.
    BatchNorm,
    /// LayerNorm over each head's `key_dim` query features: per token, so causal-safe.
    LayerNorm,
    /// No normalisation.
    None,
}

/// How a query half and a sub-key are compared: the score that top-k ranks and the gate
/// turns into router weights.
///
/// With the paper's inner product a sub-key's length is part of every score it gives, so a
/// sub-key that grows during training wins for most queries and the experts built on it take
/// most of the load (product-key collapse). The normalised scorings remove that advantage; a
/// learned scalar s (one per layer, initialised from
/// [`PeerConfig::score_scale`]) keeps the gate's temperature trainable.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum KeyScoring {
    /// `q_half · c`: the paper's inner product.
    Dot,
    /// `s · q_half · c/‖c‖`: unit sub-keys.
    UnitKeys,
    /// `s · (q_half/‖q_half‖) · (c/‖c‖)`: the cosine of each half (qk-normalisation, as in
    /// Meta's memory layers and UltraMemV2), so a full score lies in `[−2s, 2s]`.
    Cosine,
}

impl KeyScoring {
    /// The initial scale s that gives the same score scale as [`KeyScoring::Dot`] at
    /// initialisation (unit-variance query features, sub-keys from U(±1/√(d/2)) whose norm is
    /// about 1/√3): 1 for `Dot` (unused), 1/√3 for `UnitKeys`, √(d/2)/√3 for `Cosine`.
    pub fn default_scale(self, key_dim: usize) -> f64 {
        let key_norm = 1.0 / 3f64.sqrt();
        match self {
            Self::Dot => 1.0,
            Self::UnitKeys => key_norm,
            Self::Cosine => (key_dim as f64 / 2.0).sqrt() * key_norm,
        }
    }
}

/// What the balance loss of a product-key layer evens out (see
/// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The choices of each half's √N sub-keys, separately: cheap, blind to which sub-keys are
    /// paired together.
    SubKeys,
    /// The choices of all N experts (pairs of sub-keys), computed exactly through the product
    /// structure: `O(N)` per query row (a `[rows, √N] × [√N, √N]` matmul per key set, forward
    /// and backward), negligible at N = 128², about as much as the rest of the layer at 1024².
    /// With one key set per head each head's own selections are balanced.
    Experts,
    /// As `Experts`, but the selection shares f count the selections of *all* heads: the heads
    /// share the experts (one `u`, `v` per expert), so an expert that every head favours is
    /// overloaded even when each head alone spreads evenly. Each key set's probabilities P
    /// are still its own heads'. The same as `Experts` with shared keys; with one key set per
    /// head the fused kernel's work grows with the number of heads (each key set sees every
    /// head's selections).
    ExpertsPooled,
}

/// Configuration of a [`Peer`](crate::Peer) layer (paper §2, Algorithm 1).
///
/// The retrieval defaults are the paper's (`heads = 8`, `top_k = 16`, BatchNorm on the
/// queries, softmax router weights; `key_dim` 128) with three changes that end product-key
/// collapse in our measurements (README, "Routing: collapse and its remedies"): **one
/// product-key set per head** instead of the paper's shared one, **cosine scoring** with a
/// learned scale ([`KeyScoring::Cosine`]) instead of the inner product, and an **expert
/// balance loss** of weight 0.1 (see
/// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)), which the training loop
/// must add to its loss ([`PeerRouting::balance_loss`](crate::PeerRouting)). The paper's
/// setting is `.with_shared_keys(true).with_scoring(KeyScoring::Dot).with_balance_loss(0.0)`.
///
/// ```
/// use peer_core::{PeerConfig, QueryNorm};
///
/// let config = PeerConfig::new(256, 128 * 128).with_query_norm(QueryNorm::LayerNorm);
/// assert!(config.validate().is_ok());
///
/// let err = PeerConfig::new(256, 1000).validate().unwrap_err();
/// assert!(err.to_string().contains("num_experts"));
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct PeerConfig {
    /// Width of the layer's input and output (`d_model`, written n in the cost formulas).
    pub d_model: usize,
    /// Number of experts N. Must be a perfect square: keys are the Cartesian product of two
    /// sub-key sets of √N vectors each.
    pub num_experts: usize,
    /// Number of retrieval heads h. Each head has its own query network and retrieves its own
    /// `top_k` experts from the one shared pool; head outputs are summed.
    #[config(default = 8)]
    pub heads: usize,
    /// Experts retrieved per head (k). At most √N, so that retrieval stays exact.
    #[config(default = 16)]
    pub top_k: usize,
    /// Dimension d of a full query and of a full product key, per head. Must be even: the
    /// first half is scored against the first sub-key set, the second half against the second.
    #[config(default = 128)]
    pub key_dim: usize,
    /// The experts' non-linearity σ.
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// How retrieved scores become router weights.
    #[config(default = "Gate::Softmax")]
    pub gate: Gate,
    /// Normalisation of the queries.
    #[config(default = "QueryNorm::BatchNorm")]
    pub query_norm: QueryNorm,
    /// `true`: one product-key set shared by all heads (the paper). `false` (the default): one
    /// set per head, as PEER-pytorch and Meta's memory layers have (lower perplexity and more
    /// even routing in our runs).
    #[config(default = false)]
    pub shared_keys: bool,
    /// How query halves and sub-keys are compared (see [`KeyScoring`]). The default, `Cosine`
    /// (the paper: `Dot`), gave lower perplexity and more even routing in our runs.
    #[config(default = "KeyScoring::Cosine")]
    pub scoring: KeyScoring,
    /// Initial value of the learned score scale s of the normalised scorings; `None`: the
    /// scoring's [`default_scale`](KeyScoring::default_scale). Ignored by `Dot`.
    #[config(default = "None")]
    pub score_scale: Option<f64>,
    /// Weight of the balance loss (see
    /// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)), returned in
    /// [`PeerRouting::balance_loss`](crate::PeerRouting::balance_loss) during training for
    /// the caller to add to its loss; 0 (the paper) turns it off. The default, 0.1, gave 100%
    /// expert usage with the top 1% of experts under 5% of the selections in our runs, with
    /// cosine scoring and the expert tables' own higher learning rate (with `Dot` scoring that
    /// weight cost perplexity; 0.03 was the default then).
    #[config(default = 0.1)]
    pub balance_loss: f64,
    /// What the balance loss evens out: the experts themselves (the default), or each half's
    /// sub-keys.
    #[config(default = "Balance::Experts")]
    pub balance: Balance,
    /// Whether the query network has a bias.
    #[config(default = false)]
    pub query_bias: bool,
    /// Standard deviation of the normal initialisation of both expert tables. `None` means
    /// `1/√d_model`, so that `u_i·x` has unit scale for unit-scale inputs (Burn's `Embedding`
    /// default of N(0, 1) is far too large for expert tables).
    #[config(default = "None")]
    pub expert_init_std: Option<f64>,
    /// Standard deviation of the up table v (the experts' outputs) alone; `None`: the same as
    /// the down table's. 0 starts every expert at zero output, so experts that have not been
    /// retrieved yet add nothing to the residual stream (under even routing most experts are
    /// rarely updated early in training).
    #[config(default = "None")]
    pub expert_up_init_std: Option<f64>,
    /// Momentum of the query BatchNorm's running statistics.
    #[config(default = 0.1)]
    pub norm_momentum: f64,
    /// Epsilon of the query norm.
    #[config(default = 1e-5)]
    pub norm_epsilon: f64,
    /// Largest row block of an expert table, in bytes. `None` (the default): one block on CPU
    /// backends and where the table fits one buffer of the device, blocks of the device's
    /// limit otherwise ([`max_buffer_bytes`](crate::max_buffer_bytes): 128 MiB on llvmpipe).
    /// See [`ExpertTable`](crate::ExpertTable).
    #[config(default = "None")]
    pub table_block_bytes: Option<usize>,
    /// Train the expert tables row-sparsely on an autodiff device: the backward pass leaves the
    /// gradients of the retrieved rows for [`apply_expert_updates`](crate::apply_expert_updates)
    /// and writes no `[N, d_model]` gradient, so a step's cost does not grow with N. `false`:
    /// dense table gradients, for any Burn optimizer (every row is then updated each step).
    #[config(default = true)]
    pub sparse_gradients: bool,
}

impl PeerConfig {
    /// Checks every rule of the configuration and names the first field that breaks one.
    ///
    /// [`PeerConfig::init`] calls this, so no invalid configuration reaches a tensor op.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("d_model", self.d_model)?;
        positive("heads", self.heads)?;
        validate_product_keys(self.num_experts, self.top_k, self.key_dim)?;
        validate_score_scale(self.score_scale)?;
        validate_balance_loss(self.balance_loss)?;
        if let Some(std) = self.expert_init_std
            && !(std.is_finite() && std > 0.0)
        {
            return Err(ConfigError::new("expert_init_std", format!("must be finite and positive, got {std}")));
        }
        if let Some(std) = self.expert_up_init_std
            && !(std.is_finite() && std >= 0.0)
        {
            return Err(ConfigError::new("expert_up_init_std", format!("must be finite and non-negative, got {std}")));
        }
        if let Some(bytes) = self.table_block_bytes
            && bytes < 4 * self.d_model
        {
            return Err(ConfigError::new(
                "table_block_bytes",
                format!("must hold at least one row of 4 · d_model = {} bytes, got {bytes}", 4 * self.d_model),
            ));
        }
        if !(self.norm_momentum.is_finite() && (0.0..=1.0).contains(&self.norm_momentum)) {
            return Err(ConfigError::new("norm_momentum", format!("must lie in [0, 1], got {}", self.norm_momentum)));
        }
        if !(self.norm_epsilon.is_finite() && self.norm_epsilon > 0.0) {
            return Err(ConfigError::new(
                "norm_epsilon",
                format!("must be finite and positive, got {}", self.norm_epsilon),
            ));
        }
        Ok(())
    }

    /// √N, the size of each sub-key set.
    pub fn sub_keys(&self) -> usize {
        exact_sqrt(self.num_experts).unwrap_or(0)
    }

    /// Active experts per token, the paper's granularity G = h·k.
    pub fn active_experts(&self) -> usize {
        self.heads * self.top_k
    }

    /// The standard deviation the down table u is initialised with.
    pub fn expert_std(&self) -> f64 {
        self.expert_init_std.unwrap_or(1.0 / (self.d_model as f64).sqrt())
    }

    /// The standard deviation the up table v is initialised with.
    pub fn expert_up_std(&self) -> f64 {
        self.expert_up_init_std.unwrap_or_else(|| self.expert_std())
    }
}

pub(crate) fn positive(field: &'static str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(field, "must be at least 1, got 0"));
    }
    Ok(())
}

/// The rules shared by every product-key layer (PEER and PKM): N a non-zero perfect square,
/// 1 ≤ k ≤ √N, key dimension even and non-zero.
pub(crate) fn validate_product_keys(num_experts: usize, top_k: usize, key_dim: usize) -> Result<(), ConfigError> {
    positive("num_experts", num_experts)?;
    let Some(root) = exact_sqrt(num_experts) else {
        let below = (num_experts as f64).sqrt().floor() as usize;
        return Err(ConfigError::new(
            "num_experts",
            format!(
                "must be a perfect square (product keys pair two sets of √N sub-keys), got {num_experts}; \
                 the nearest squares are {} and {}",
                below * below,
                (below + 1) * (below + 1)
            ),
        ));
    };
    positive("top_k", top_k)?;
    if top_k > root {
        return Err(ConfigError::new(
            "top_k",
            format!(
                "must be at most √num_experts = {root} (each sub-key set is searched with the same k, \
                 which keeps retrieval exact), got {top_k}"
            ),
        ));
    }
    positive("key_dim", key_dim)?;
    if !key_dim.is_multiple_of(2) {
        return Err(ConfigError::new(
            "key_dim",
            format!("must be even (a query is split into two halves), got {key_dim}"),
        ));
    }
    Ok(())
}

/// The rule of `balance_loss`: finite and non-negative.
pub(crate) fn validate_balance_loss(weight: f64) -> Result<(), ConfigError> {
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(ConfigError::new("balance_loss", format!("must be finite and non-negative, got {weight}")));
    }
    Ok(())
}

/// The rule of `score_scale`: finite and positive when given.
pub(crate) fn validate_score_scale(scale: Option<f64>) -> Result<(), ConfigError> {
    match scale {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            Err(ConfigError::new("score_scale", format!("must be finite and positive, got {s}")))
        }
        _ => Ok(()),
    }
}

/// `Some(r)` when `n == r²`.
pub(crate) fn exact_sqrt(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}
