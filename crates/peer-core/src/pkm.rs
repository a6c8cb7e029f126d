//! The product-key memory baseline (Lample et al. 2019), built on the same [`ProductKeys`].

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Tensor};

use crate::config::{
    Balance, KeyScoring, QueryNorm, positive, validate_balance_loss, validate_product_keys, validate_score_scale,
};
use crate::cost::{LayerCost, retrieval_cost};
use crate::error::ConfigError;
use crate::peer::PeerRouting;
use crate::product_keys::{ProductKeys, ProductKeysConfig};
use crate::query::{QueryNetwork, QueryNetworkSettings};

/// Configuration of a [`Pkm`] layer. Defaults follow the paper's PKM baseline (8 heads,
/// top-32, query BatchNorm) with the routing remedies of [`PeerConfig`](crate::PeerConfig):
/// one sub-key set per head, cosine scoring and an expert balance loss of weight 0.1 (on the
/// main job's PKM block they beat `Dot` at weight 0.03 in perplexity and in every routing
/// statistic, one seed); the paper's setting is
/// `.with_shared_keys(true).with_scoring(KeyScoring::Dot).with_balance_loss(0.0)`.
#[derive(Config, Debug, PartialEq)]
pub struct PkmConfig {
    /// Input and output width.
    pub d_model: usize,
    /// Number of memory slots N (a perfect square).
    pub num_values: usize,
    /// Number of heads h.
    #[config(default = 8)]
    pub heads: usize,
    /// Slots retrieved per head (k ≤ √N).
    #[config(default = 32)]
    pub top_k: usize,
    /// Full query/key dimension per head (even).
    #[config(default = 128)]
    pub key_dim: usize,
    /// Normalisation of the queries.
    #[config(default = "QueryNorm::BatchNorm")]
    pub query_norm: QueryNorm,
    /// One sub-key pair for all heads (`true`, the paper) or one per head (`false`, the default).
    #[config(default = false)]
    pub shared_keys: bool,
    /// How query halves and sub-keys are compared (see [`KeyScoring`]).
    #[config(default = "KeyScoring::Cosine")]
    pub scoring: KeyScoring,
    /// Initial value of the learned score scale of the normalised scorings; `None`: the
    /// scoring's [`default_scale`](KeyScoring::default_scale).
    #[config(default = "None")]
    pub score_scale: Option<f64>,
    /// Weight of the balance loss (see
    /// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)); 0 (the paper) turns
    /// it off.
    #[config(default = 0.1)]
    pub balance_loss: f64,
    /// What the balance loss evens out: the memory slots themselves (the default), or each
    /// half's sub-keys.
    #[config(default = "Balance::Experts")]
    pub balance: Balance,
    /// Standard deviation of the value table's normal initialisation; `None`: `1/√d_model`.
    #[config(default = "None")]
    pub value_init_std: Option<f64>,
}

impl PkmConfig {
    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("d_model", self.d_model)?;
        positive("heads", self.heads)?;
        validate_product_keys(self.num_values, self.top_k, self.key_dim).map_err(|mut err| {
            if err.field == "num_experts" {
                err.field = "num_values";
            }
            err
        })?;
        validate_score_scale(self.score_scale)?;
        validate_balance_loss(self.balance_loss)
    }

    fn query_network(&self) -> QueryNetworkSettings {
        QueryNetworkSettings {
            d_model: self.d_model,
            heads: self.heads,
            key_dim: self.key_dim,
            norm: self.query_norm,
            bias: false,
            norm_momentum: 0.1,
            norm_epsilon: 1e-5,
        }
    }

    /// Builds the layer.
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message.
    pub fn init(&self, device: &Device) -> Pkm {
        self.validate().unwrap_or_else(|err| panic!("{err}"));
        let std = self.value_init_std.unwrap_or(1.0 / (self.d_model as f64).sqrt());
        Pkm {
            query: self.query_network().init(device),
            product_keys: ProductKeysConfig::new(self.num_values, self.key_dim, self.top_k, self.heads)
                .with_shared(self.shared_keys)
                .with_scoring(self.scoring)
                .with_score_scale(self.score_scale)
                .with_balance_loss(self.balance_loss)
                .with_balance(self.balance)
                .init(device),
            values: Param::from_tensor(Tensor::random(
                [self.num_values, self.d_model],
                Distribution::Normal(0.0, std),
                device,
            )),
        }
    }

    /// Retrieval plus `h·k` value rows per token (one multiply-add per entry).
    pub fn cost(&self) -> LayerCost {
        let query = self.query_network().num_params();
        let retrieval = retrieval_cost(
            self.d_model,
            self.heads,
            self.key_dim,
            self.num_values,
            self.top_k,
            if self.shared_keys { 1 } else { self.heads },
            query,
            self.scoring,
        );
        let read = self.heads * self.top_k * self.d_model;
        LayerCost {
            params: retrieval.params + self.num_values * self.d_model,
            active_params: retrieval.active_params + read,
            flops_per_token: retrieval.flops_per_token + 2.0 * read as f64,
        }
    }
}

/// A product-key memory: `f(x) = Σ_heads Σ_{i ∈ top-k} softmax(s)_i · value_i`.
#[derive(Module, Debug)]
pub struct Pkm {
    /// The query heads and norm.
    pub query: QueryNetwork,
    /// The product keys.
    pub product_keys: ProductKeys,
    /// The memory values, `[N, d_model]`.
    pub values: Param<Tensor<2>>,
}

impl Pkm {
    /// Applies the memory and returns what it retrieved.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `([batch, seq, d_model], routing [batch, seq, heads, k])`
    pub fn forward_with_routing(&self, x: Tensor<3>) -> (Tensor<3>, PeerRouting) {
        let [batch, seq, d_model] = x.dims();
        let tokens = batch * seq;
        let queries = self.query.forward(x.reshape([tokens, d_model]));
        let (scores, ids) = self.product_keys.retrieve(queries.clone());
        let balance_loss = self.product_keys.balance_loss(queries, ids.clone());
        let [_, heads, k] = ids.dims();
        let weights = softmax(scores, 2);
        let m = heads * k;
        let rows = self.values.val().select(0, ids.clone().reshape([tokens * m])).reshape([tokens, m, d_model]);
        let output = weights.clone().reshape([tokens, 1, m]).matmul(rows).reshape([batch, seq, d_model]);
        let routing = PeerRouting {
            expert_ids: ids.reshape([batch, seq, heads, k]),
            router_weights: weights.reshape([batch, seq, heads, k]),
            balance_loss,
        };
        (output, routing)
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_routing(x).0
    }
}
