//! The query network shared by PEER and PKM: h linear query heads and an optional norm.

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::config::QueryNorm;

/// h query heads fused into one `d_model → heads · key_dim` linear map, then the query norm.
#[derive(Module, Debug)]
pub struct QueryNetwork {
    /// The fused query heads: weight `[d_model, heads · key_dim]`, laid out head-major.
    pub linear: Linear,
    /// BatchNorm over the `heads · key_dim` query features, when configured (the paper).
    pub batch_norm: Option<BatchNorm>,
    /// LayerNorm over each head's `key_dim` features, when configured (causal-safe).
    pub layer_norm: Option<LayerNorm>,
    /// Number of heads h.
    #[module(skip)]
    pub heads: usize,
    /// Query dimension per head d.
    #[module(skip)]
    pub key_dim: usize,
}

/// Settings of a [`QueryNetwork`]; built by the layers that own one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryNetworkSettings {
    pub d_model: usize,
    pub heads: usize,
    pub key_dim: usize,
    pub norm: QueryNorm,
    pub bias: bool,
    pub norm_momentum: f64,
    pub norm_epsilon: f64,
}

impl QueryNetworkSettings {
    /// Parameters of the network these settings build.
    pub fn num_params(&self) -> usize {
        let features = self.heads * self.key_dim;
        self.d_model * features
            + if self.bias { features } else { 0 }
            + match self.norm {
                QueryNorm::BatchNorm => 2 * features,
                QueryNorm::LayerNorm => 2 * self.key_dim,
                QueryNorm::None => 0,
            }
    }

    /// Query heads as Burn's `Linear` (Kaiming uniform), norms with unit scale and zero shift.
    pub fn init(&self, device: &Device) -> QueryNetwork {
        let features = self.heads * self.key_dim;
        QueryNetwork {
            linear: LinearConfig::new(self.d_model, features).with_bias(self.bias).init(device),
            batch_norm: (self.norm == QueryNorm::BatchNorm).then(|| {
                BatchNormConfig::new(features)
                    .with_momentum(self.norm_momentum)
                    .with_epsilon(self.norm_epsilon)
                    .init(device)
            }),
            layer_norm: (self.norm == QueryNorm::LayerNorm)
                .then(|| LayerNormConfig::new(self.key_dim).with_epsilon(self.norm_epsilon).init(device)),
            heads: self.heads,
            key_dim: self.key_dim,
        }
    }
}

impl QueryNetwork {
    /// The normalised query of every head.
    ///
    /// # Shapes
    /// - `x`: `[tokens, d_model]`
    /// - output: `[tokens, heads, key_dim]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<3> {
        let [tokens, _] = x.dims();
        let mut queries = self.linear.forward(x);
        if let Some(norm) = &self.batch_norm {
            queries = norm.forward(queries);
        }
        let queries = queries.reshape([tokens, self.heads, self.key_dim]);
        match &self.layer_norm {
            Some(norm) => norm.forward(queries),
            None => queries,
        }
    }
}
