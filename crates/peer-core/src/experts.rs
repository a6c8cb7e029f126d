//! The expert pool: N one-neuron MLPs `e_i(x) = σ(u_i·x) v_i` stored as two `[N, d_model]` tables.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;

use crate::activation::gelu;
use burn::tensor::{Device, Distribution, Int, Tensor};

use crate::config::Activation;

/// The expert tables: row i of `down` is u_i, row i of `up` is v_i.
#[derive(Module, Debug)]
pub struct Experts {
    /// u: the experts' input weights, `[N, d_model]`.
    pub down: Param<Tensor<2>>,
    /// v: the experts' output weights, `[N, d_model]`.
    pub up: Param<Tensor<2>>,
    /// σ.
    #[module(skip)]
    pub activation: Activation,
}

impl Experts {
    /// N experts of width `d_model`, both tables drawn from N(0, std²).
    pub fn init(
        num_experts: usize,
        d_model: usize,
        std: f64,
        activation: Activation,
        device: &Device,
    ) -> Self {
        let table = || {
            Param::from_tensor(Tensor::random(
                [num_experts, d_model],
                Distribution::Normal(0.0, std),
                device,
            ))
        };
        Self {
            down: table(),
            up: table(),
            activation,
        }
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.down.dims()[0]
    }

    /// `Σ_j g_j σ(u_{id_j}·x) v_{id_j}` for every token: the paper's Eq. 5 summed over heads.
    ///
    /// # Shapes
    /// - `x`: `[tokens, d_model]`
    /// - `expert_ids`: `[tokens, m]` (m = heads · k retrieved experts per token)
    /// - `router_weights`: `[tokens, m]`
    /// - output: `[tokens, d_model]`
    pub fn forward(
        &self,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
    ) -> Tensor<2> {
        let [tokens, d_model] = x.dims();
        let [_, m] = expert_ids.dims();
        let ids = expert_ids.reshape([tokens * m]);

        let u = self.down.val().select(0, ids.clone()).reshape([tokens, m, d_model]);
        let pre_activation = u.matmul(x.reshape([tokens, d_model, 1])).reshape([tokens, m]);
        let hidden = self.activate(pre_activation) * router_weights;

        let v = self.up.val().select(0, ids).reshape([tokens, m, d_model]);
        hidden
            .reshape([tokens, 1, m])
            .matmul(v)
            .reshape([tokens, d_model])
    }

    fn activate<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self.activation {
            Activation::Relu => relu(x),
            Activation::Gelu => gelu(x),
        }
    }
}
