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

/// Configuration of a [`Peer`](crate::Peer) layer (paper §2, Algorithm 1).
///
/// The defaults are the paper's: `heads = 8`, `top_k = 16`, BatchNorm on the queries, softmax
/// router weights, one product-key set shared by all heads. `key_dim` defaults to 128.
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
    /// `true`: one product-key set shared by all heads (the paper). `false`: one set per head
    /// (PEER-pytorch and Meta's memory layers).
    #[config(default = true)]
    pub shared_keys: bool,
    /// Whether the query network has a bias.
    #[config(default = false)]
    pub query_bias: bool,
    /// Standard deviation of the normal initialisation of both expert tables. `None` means
    /// `1/√d_model`, so that `u_i·x` has unit scale for unit-scale inputs (Burn's `Embedding`
    /// default of N(0, 1) is far too large for expert tables).
    #[config(default = "None")]
    pub expert_init_std: Option<f64>,
    /// Momentum of the query BatchNorm's running statistics.
    #[config(default = 0.1)]
    pub norm_momentum: f64,
    /// Epsilon of the query norm.
    #[config(default = 1e-5)]
    pub norm_epsilon: f64,
    /// Largest row block of an expert table, in bytes. `None` (the default): one block on CPU
    /// backends, blocks of at most 64 MiB on GPU backends (wgpu caps one buffer at 128 MiB).
    /// See [`ExpertTable`](crate::ExpertTable).
    #[config(default = "None")]
    pub table_block_bytes: Option<usize>,
}

impl PeerConfig {
    /// Checks every rule of the configuration and names the first field that breaks one.
    ///
    /// [`PeerConfig::init`] calls this, so no invalid configuration reaches a tensor op.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("d_model", self.d_model)?;
        positive("heads", self.heads)?;
        validate_product_keys(self.num_experts, self.top_k, self.key_dim)?;
        if let Some(std) = self.expert_init_std
            && !(std.is_finite() && std > 0.0)
        {
            return Err(ConfigError::new("expert_init_std", format!("must be finite and positive, got {std}")));
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

    /// The standard deviation the expert tables are initialised with.
    pub fn expert_std(&self) -> f64 {
        self.expert_init_std.unwrap_or(1.0 / (self.d_model as f64).sqrt())
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

/// `Some(r)` when `n == r²`.
pub(crate) fn exact_sqrt(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}
