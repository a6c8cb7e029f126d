//! The expert pool: N one-neuron MLPs `e_i(x) = σ(u_i·x) v_i` stored as two `[N, d_model]` tables.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;

use crate::activation::gelu;
use crate::topk::is_cpu_backend;

/// Largest gathered expert-row block on GPU backends (see [`Experts::forward`]).
const MAX_GATHER_BYTES: usize = 64 << 20;
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
        // GPU backends cap one buffer (wgpu: a 128 MiB storage binding); keep each gathered
        // [chunk, m, d_model] block within 64 MiB there. CPU backends take all tokens at once:
        // every chunk's backward would write another dense [N, d_model] gradient.
        let chunk = if is_cpu_backend(&x.device()) {
            tokens
        } else {
            (MAX_GATHER_BYTES / (m * d_model * 4)).clamp(1, tokens.max(1))
        };
        self.forward_chunked(x, expert_ids, router_weights, chunk)
    }

    /// [`forward`](Self::forward) in blocks of at most `chunk` tokens.
    fn forward_chunked(
        &self,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
        chunk: usize,
    ) -> Tensor<2> {
        let [tokens, _] = x.dims();
        if chunk < tokens {
            let outputs = (0..tokens)
                .step_by(chunk)
                .map(|start| {
                    let len = chunk.min(tokens - start);
                    self.forward_block(
                        x.clone().narrow(0, start, len),
                        expert_ids.clone().narrow(0, start, len),
                        router_weights.clone().narrow(0, start, len),
                    )
                })
                .collect();
            return Tensor::cat(outputs, 0);
        }
        self.forward_block(x, expert_ids, router_weights)
    }

    /// [`forward`](Self::forward) on one block of tokens.
    fn forward_block(
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Token blocks give the same outputs and gradients as one block.
    #[test]
    fn chunked_equals_unchunked() {
        let device = Device::flex().autodiff();
        let experts = Experts::init(16, 8, 0.3, Activation::Gelu, &device);
        let x = Tensor::<2>::random([7, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let ids: Vec<i64> = (0..7 * 3).map(|i| (i * 5 % 16) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [7, 3]), &device);
        let w = Tensor::<2>::random([7, 3], Distribution::Uniform(0.0, 1.0), &device);
        let whole = experts.forward_chunked(x.clone(), ids.clone(), w.clone(), 7);
        let blocks = experts.forward_chunked(x.clone(), ids, w, 3);
        whole.clone().into_data().assert_approx_eq::<f32>(&blocks.clone().into_data(), Default::default());
        let g_whole = whole.sum().backward();
        let g_blocks = blocks.sum().backward();
        experts.down.grad(&g_whole).unwrap().into_data()
            .assert_approx_eq::<f32>(&experts.down.grad(&g_blocks).unwrap().into_data(), Default::default());
        x.grad(&g_whole).unwrap().into_data().assert_approx_eq::<f32>(&x.grad(&g_blocks).unwrap().into_data(), Default::default());
    }
}
