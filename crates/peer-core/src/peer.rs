//! The PEER layer (paper Algorithm 1).

use burn::module::Module;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Device, Int, Tensor};

use crate::config::{Gate, PeerConfig};
use crate::cost::{LayerCost, retrieval_cost};
use crate::custom_op;
use crate::error::ConfigError;
use crate::experts::Experts;
use crate::kernels;
use crate::product_keys::{ProductKeys, ProductKeysConfig};
use crate::query::{QueryNetwork, QueryNetworkSettings};

/// Which experts each token's heads retrieved, and with which router weights.
///
/// Used for the paper's expert-usage statistics (see [`ExpertUsage`](crate::ExpertUsage)).
#[derive(Debug, Clone)]
pub struct PeerRouting {
    /// Expert ids in `0..N`, `[batch, seq, heads, k]`.
    pub expert_ids: Tensor<4, Int>,
    /// Router weights g, `[batch, seq, heads, k]`.
    pub router_weights: Tensor<4>,
    /// The weighted balance loss of this forward pass (`[1]`), when the layer has one
    /// (`balance_loss > 0`) and it is training (see
    /// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)): add it to the loss.
    pub balance_loss: Option<Tensor<1>>,
}

/// A [`PeerRouting`] read back to the host ([`PeerRouting::to_host`]): one transfer that
/// [`ExpertUsage`](crate::ExpertUsage) and [`TokenLoad`](crate::TokenLoad) can both take.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRouting {
    /// `[batch, seq, heads, k]`.
    pub dims: [usize; 4],
    /// Expert ids, row-major over `dims`.
    pub expert_ids: Vec<i64>,
    /// Router weights, laid out as `expert_ids`.
    pub router_weights: Vec<f64>,
}

impl HostRouting {
    /// Routed positions: `batch · seq`.
    pub fn positions(&self) -> usize {
        self.dims[0] * self.dims[1]
    }
}

impl PeerRouting {
    /// Reads the expert ids and router weights back to the host (waits for the device).
    pub fn to_host(&self) -> HostRouting {
        HostRouting {
            dims: self.expert_ids.dims(),
            expert_ids: self.expert_ids.to_data().iter::<i64>().collect(),
            router_weights: self.router_weights.to_data().iter::<f64>().collect(),
        }
    }

    /// The routing of `batch × seq` tokens from `[tokens, heads, k]` ids and weights.
    pub(crate) fn new(expert_ids: Tensor<3, Int>, router_weights: Tensor<3>, [batch, seq]: [usize; 2]) -> Self {
        let [_, heads, k] = expert_ids.dims();
        Self {
            expert_ids: expert_ids.reshape([batch, seq, heads, k]),
            router_weights: router_weights.reshape([batch, seq, heads, k]),
            balance_loss: None,
        }
    }
}

/// A Parameter Efficient Expert Retrieval layer: a drop-in replacement for a transformer
/// feed-forward block (no residual inside; the block adds it).
///
/// `f(x) = Σ_heads Σ_{i ∈ top-k(q_h(x)·K)} g_i(x) σ(u_i·x) v_i`, with product keys K,
/// query networks q_h and router weights g = softmax (or sigmoid) of the retrieved scores.
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use peer_core::{PeerConfig, QueryNorm};
///
/// let device = Device::flex();
/// let peer = PeerConfig::new(32, 16 * 16)
///     .with_heads(4)
///     .with_top_k(8)
///     .with_key_dim(16)
///     .with_query_norm(QueryNorm::LayerNorm)
///     .init(&device);
/// let x = Tensor::<3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
/// let y = peer.forward(x);
/// assert_eq!(y.dims(), [2, 5, 32]);
/// ```
#[derive(Module, Debug)]
pub struct Peer {
    /// The h query networks and the query norm.
    pub query: QueryNetwork,
    /// The product keys.
    pub product_keys: ProductKeys,
    /// The expert pool.
    pub experts: Experts,
    /// How scores become router weights.
    #[module(skip)]
    pub gate: Gate,
}

impl PeerConfig {
    /// Builds the layer on `device`.
    ///
    /// Initialisation: query network as Burn's `Linear` (Kaiming uniform); sub-keys
    /// U(±1/√(key_dim/2)); the expert tables N(0, [`expert_std`](Self::expert_std)²) (down)
    /// and N(0, [`expert_up_std`](Self::expert_up_std)²) (up).
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message naming the field and
    /// the rule; use [`try_init`](Self::try_init) to get the error instead.
    pub fn init(&self, device: &Device) -> Peer {
        self.try_init(device).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Builds the layer, or says which field of the configuration is invalid.
    pub fn try_init(&self, device: &Device) -> Result<Peer, ConfigError> {
        self.validate()?;
        let query = self.query_network().init(device);
        let product_keys = ProductKeysConfig::new(self.num_experts, self.key_dim, self.top_k, self.heads)
            .with_shared(self.shared_keys)
            .with_scoring(self.scoring)
            .with_score_scale(self.score_scale)
            .with_balance_loss(self.balance_loss)
            .with_balance(self.balance)
            .try_init(device)?;
        let mut experts = Experts::init(
            self.num_experts,
            self.d_model,
            [self.expert_std(), self.expert_up_std()],
            self.activation,
            self.table_block_bytes,
            device,
        );
        experts.sparse_gradients = self.sparse_gradients;
        Ok(Peer { query, product_keys, experts, gate: self.gate })
    }
}

impl PeerConfig {
    pub(crate) fn query_network(&self) -> QueryNetworkSettings {
        QueryNetworkSettings {
            d_model: self.d_model,
            heads: self.heads,
            key_dim: self.key_dim,
            norm: self.query_norm,
            bias: self.query_bias,
            norm_momentum: self.norm_momentum,
            norm_epsilon: self.norm_epsilon,
        }
    }
}

impl PeerConfig {
    /// Parameters, active parameters and forward FLOPs per token (formulas in [`crate::cost`]):
    /// retrieval, plus per retrieved expert a dot product and an axpy of width `d_model`.
    pub fn cost(&self) -> LayerCost {
        let retrieval = retrieval_cost(
            self.d_model,
            self.heads,
            self.key_dim,
            self.num_experts,
            self.top_k,
            if self.shared_keys { 1 } else { self.heads },
            self.query_network().num_params(),
            self.scoring,
        );
        let active = self.heads * self.top_k * self.d_model;
        LayerCost {
            params: retrieval.params + 2 * self.num_experts * self.d_model,
            active_params: retrieval.active_params + 2 * active,
            flops_per_token: retrieval.flops_per_token + 4.0 * active as f64,
        }
    }
}

impl Peer {
    /// Applies the layer to every token.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_routing(x).0
    }

    /// Applies the layer and also returns what it retrieved: Algorithm 1, queries → product-key
    /// top-k → router weights → experts.
    ///
    /// On an autodiff device the output is differentiable in the input and every parameter.
    /// The expert tables are trained row-sparsely when
    /// [`experts.sparse_gradients`](Experts::sparse_gradients) is on (the default): the
    /// backward pass leaves the retrieved rows' gradients in the row store for
    /// [`apply_expert_updates`](crate::apply_expert_updates) and writes no dense table gradient.
    /// With it off, Burn's gather backward writes dense `[N, d_model]` gradients. On Flex,
    /// retrieval, router weights and experts run as fused host kernels (their backward pass
    /// included); other devices compose Burn tensor ops.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `([batch, seq, d_model], routing [batch, seq, heads, k])`
    pub fn forward_with_routing(&self, x: Tensor<3>) -> (Tensor<3>, PeerRouting) {
        let [batch, seq, d_model] = x.dims();
        let tokens = batch * seq;
        let x = x.reshape([tokens, d_model]);
        let queries = self.query.forward(x.clone());
        let row_sparse = !x.is_autodiff() || (self.experts.sparse_gradients && custom_op::supported(&x));
        let fused =
            if row_sparse { kernels::fused_layer(self, x.clone(), queries.clone(), [batch, seq]) } else { None };
        let (output, routing) = fused.unwrap_or_else(|| {
            let (expert_ids, router_weights) = self.route_queries(queries.clone()); // top-k, g
            let [_, heads, k] = expert_ids.dims();
            let ids = expert_ids.clone().reshape([tokens, heads * k]);
            let weights = router_weights.clone().reshape([tokens, heads * k]);
            let output = if row_sparse {
                self.experts.forward_row_sparse(x, ids, weights)
            } else {
                self.experts.forward(x, ids, weights)
            };
            (output.reshape([batch, seq, d_model]), PeerRouting::new(expert_ids, router_weights, [batch, seq]))
        });
        self.with_balance_loss(queries, (output, routing))
    }

    /// Adds the balance loss of `queries` (`[tokens, heads, key_dim]`) to the routing,
    /// when the layer has one and is training.
    fn with_balance_loss(
        &self,
        queries: Tensor<3>,
        (output, mut routing): (Tensor<3>, PeerRouting),
    ) -> (Tensor<3>, PeerRouting) {
        let [batch, seq, heads, k] = routing.expert_ids.dims();
        let ids = routing.expert_ids.clone().reshape([batch * seq, heads, k]);
        routing.balance_loss = self.product_keys.balance_loss(queries, ids);
        (output, routing)
    }

    /// The experts each token retrieves and their router weights, without computing them.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: routing `[batch, seq, heads, k]`
    pub fn route(&self, x: Tensor<3>) -> PeerRouting {
        let [batch, seq, d_model] = x.dims();
        let (expert_ids, router_weights) = self.route_tokens(x.reshape([batch * seq, d_model]));
        PeerRouting::new(expert_ids, router_weights, [batch, seq])
    }

    /// Retrieval and router weights: `(expert_ids [tokens, heads, k], g [tokens, heads, k])`.
    fn route_tokens(&self, x: Tensor<2>) -> (Tensor<3, Int>, Tensor<3>) {
        self.route_queries(self.query.forward(x))
    }

    /// [`route_tokens`](Self::route_tokens) from the queries `[tokens, heads, key_dim]`.
    fn route_queries(&self, queries: Tensor<3>) -> (Tensor<3, Int>, Tensor<3>) {
        let (scores, expert_ids) = self.product_keys.retrieve(queries);
        let router_weights = match self.gate {
            Gate::Softmax => softmax(scores, 2),
            Gate::Sigmoid => sigmoid(scores),
        };
        (expert_ids, router_weights)
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.experts.num_experts()
    }
}
