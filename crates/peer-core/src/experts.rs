//! The expert pool: N one-neuron MLPs `e_i(x) = σ(u_i·x) v_i` stored as two `[N, d_model]` tables.
//!
//! Two ways to train the tables:
//! - [`Experts::forward`] is differentiable: autodiff writes a dense `[N, d_model]` gradient for
//!   each table (Burn's gather backward), and a standard optimizer updates every row.
//! - [`Experts::forward_detached`] and [`Experts::backward_detached`] compute Eq. 5 and its
//!   gradients by hand: on Flex with fused host kernels that visit the retrieved experts one by
//!   one (each row read once per step, nothing `[slots, d_model]` wide materialized); on other
//!   devices with tensor ops in token blocks of bounded size, re-gathering the rows in backward
//!   instead of keeping them. The table gradients come back as [`RowGradients`]: one row per
//!   expert the step retrieved. [`ExpertTape`](crate::ExpertTape) wires them into autodiff and
//!   [`SparseAdamWConfig`](crate::SparseAdamWConfig) applies them.

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor};

use crate::activation::{gelu, gelu_derivative};
use crate::config::Activation;
use crate::custom_op::{self, Vjp};
use crate::expert_updates;
use crate::host;
use crate::table::{ExpertTable, GPU_BLOCK_BYTES, TableRows, block_rows};
use crate::topk::is_cpu_backend;

/// Size of one gathered `[tokens, m, d_model]` block in the detached path: 8 MiB on CPU
/// backends (the block stays in cache between the gather and its use), 64 MiB on GPU backends.
fn detached_block_bytes(device: &Device) -> usize {
    if is_cpu_backend(device) { 8 << 20 } else { GPU_BLOCK_BYTES }
}

/// The expert tables: row i of `down` is u_i, row i of `up` is v_i.
#[derive(Module, Debug)]
pub struct Experts {
    /// u: the experts' input weights, `[N, d_model]`.
    pub down: ExpertTable,
    /// v: the experts' output weights, `[N, d_model]`.
    pub up: ExpertTable,
    /// σ.
    #[module(skip)]
    pub activation: Activation,
    /// On an autodiff device, train the tables row-sparsely (see [`crate::expert_updates`]):
    /// `true` by [`init`](Self::init). `false`: [`Peer`](crate::Peer) uses the differentiable
    /// [`forward`](Self::forward) and the tables get dense gradients.
    #[module(skip)]
    pub sparse_gradients: bool,
}

/// The experts a step retrieved, each once, and where each retrieved slot went.
#[derive(Debug, Clone)]
pub struct TouchedRows {
    /// Distinct expert ids in increasing order, `[U]`.
    pub ids: Tensor<1, Int>,
    /// For every retrieved slot, the position of its expert in `ids`, `[slots]`.
    pub inverse: Tensor<1, Int>,
}

/// Gradients of the two tables restricted to the rows a step retrieved.
#[derive(Debug, Clone)]
pub struct RowGradients {
    /// Distinct expert ids, `[U]`.
    pub ids: Tensor<1, Int>,
    /// dL/du for those experts, `[U, d_model]` (duplicates summed).
    pub down: Tensor<2>,
    /// dL/dv for those experts, `[U, d_model]`.
    pub up: Tensor<2>,
}

/// What [`Experts::backward_detached`] returns.
#[derive(Debug, Clone)]
pub struct ExpertGradients {
    /// dL/dx, `[tokens, d_model]`.
    pub x: Tensor<2>,
    /// dL/dg, `[tokens, m]`.
    pub router_weights: Tensor<2>,
    /// dL/du and dL/dv on the retrieved rows.
    pub rows: RowGradients,
}

/// The distinct ids among `expert_ids` (all in `0..num_experts`), with tensor ops only: a
/// count per expert, a cumulative sum for the rank of each touched expert, and one scalar read
/// for their number. O(num_experts) integer work, none of it `d_model` wide.
pub fn touched_rows(expert_ids: Tensor<1, Int>, num_experts: usize) -> TouchedRows {
    let device = expert_ids.device();
    let [slots] = expert_ids.dims();
    let counts = Tensor::<1, Int>::zeros([num_experts], &device).select_assign(
        0,
        expert_ids.clone(),
        Tensor::ones([slots], &device),
        IndexingUpdateOp::Add,
    );
    let touched = counts.greater_elem(0);
    let rank = prefix_sum(touched.clone().int()) - 1;
    let distinct = rank.clone().slice(num_experts - 1..num_experts).into_scalar::<i64>() as usize + 1;
    let inverse = rank.clone().select(0, expert_ids);
    // Touched expert e goes to slot rank[e]; untouched ones all land on a spare slot `distinct`.
    let target = rank.mask_fill(touched.clone().bool_not(), distinct as i64);
    let values = Tensor::<1, Int>::arange(0..num_experts as i64, &device).mask_fill(touched.bool_not(), 0);
    let ids = Tensor::<1, Int>::zeros([distinct + 1], &device)
        .select_assign(0, target, values, IndexingUpdateOp::Add)
        .slice(0..distinct);
    TouchedRows { ids, inverse }
}

/// Inclusive prefix sum. CPU backends have a native `cumsum`; CubeCL's takes time quadratic in
/// the length (50 s for 2²⁰ entries on Mesa's driver), so GPU backends add shifted copies in
/// log₂(n) steps (Hillis–Steele) instead.
fn prefix_sum(x: Tensor<1, Int>) -> Tensor<1, Int> {
    if is_cpu_backend(&x.device()) {
        return x.cumsum(0);
    }
    let [n] = x.dims();
    let device = x.device();
    let mut sum = x;
    let mut offset = 1;
    while offset < n {
        let shifted =
            Tensor::cat(vec![Tensor::<1, Int>::zeros([offset], &device), sum.clone().slice(0..n - offset)], 0);
        sum = sum + shifted;
        offset *= 2;
    }
    sum
}

impl Experts {
    /// N experts of width `d_model`, the down table u drawn from N(0, down_std²) and the up
    /// table v from N(0, up_std²) (zeros when `up_std` is 0).
    ///
    /// Tables larger than `max_block_bytes` (default: unlimited on CPU backends, 64 MiB on GPU
    /// backends) are stored in row blocks; see [`ExpertTable`].
    pub fn init(
        num_experts: usize,
        d_model: usize,
        [down_std, up_std]: [f64; 2],
        activation: Activation,
        max_block_bytes: Option<usize>,
        device: &Device,
    ) -> Self {
        let rows = block_rows(num_experts, d_model, device, max_block_bytes);
        let table = |std: f64| {
            ExpertTable::from_fn(num_experts, d_model, rows, |shape| {
                if std == 0.0 {
                    Tensor::zeros(shape, device)
                } else {
                    Tensor::random(shape, Distribution::Normal(0.0, std), device)
                }
            })
        };
        Self { down: table(down_std), up: table(up_std), activation, sparse_gradients: true }
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.down.dims()[0]
    }

    /// `Σ_j g_j σ(u_{id_j}·x) v_{id_j}` for every token: the paper's Eq. 5 summed over heads.
    ///
    /// Differentiable; on an autodiff device the tables get dense gradients.
    ///
    /// # Shapes
    /// - `x`: `[tokens, d_model]`
    /// - `expert_ids`: `[tokens, m]` (m = heads · k retrieved experts per token)
    /// - `router_weights`: `[tokens, m]`
    /// - output: `[tokens, d_model]`
    pub fn forward(&self, x: Tensor<2>, expert_ids: Tensor<2, Int>, router_weights: Tensor<2>) -> Tensor<2> {
        let [tokens, d_model] = x.dims();
        let [_, m] = expert_ids.dims();
        // GPU backends cap one buffer (wgpu: a 128 MiB storage binding); keep each gathered
        // [chunk, m, d_model] block within 64 MiB there. CPU backends take all tokens at once:
        // every chunk's backward would write another dense [N, d_model] gradient.
        let chunk = if is_cpu_backend(&x.device()) {
            tokens
        } else {
            (GPU_BLOCK_BYTES / (m * d_model * 4)).clamp(1, tokens.max(1))
        };
        self.forward_in_blocks(&self.down.rows(), &self.up.rows(), x, expert_ids, router_weights, chunk)
    }

    /// Eq. 5 from the tables `down` and `up`, in blocks of at most `chunk` tokens.
    fn forward_in_blocks(
        &self,
        down: &TableRows,
        up: &TableRows,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
        chunk: usize,
    ) -> Tensor<2> {
        let [tokens, _] = x.dims();
        let chunk = chunk.max(1);
        let outputs = (0..tokens)
            .step_by(chunk)
            .map(|start| {
                let len = chunk.min(tokens - start);
                self.forward_block(
                    down,
                    up,
                    x.clone().narrow(0, start, len),
                    expert_ids.clone().narrow(0, start, len),
                    router_weights.clone().narrow(0, start, len),
                )
            })
            .collect();
        Tensor::cat(outputs, 0)
    }

    /// Eq. 5 on one block of tokens, from the tables `down` and `up`.
    fn forward_block(
        &self,
        down: &TableRows,
        up: &TableRows,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
    ) -> Tensor<2> {
        let [tokens, d_model] = x.dims();
        let [_, m] = expert_ids.dims();
        let ids = expert_ids.reshape([tokens * m]);

        let u = down.gather(ids.clone()).reshape([tokens, m, d_model]);
        let pre_activation = u.matmul(x.reshape([tokens, d_model, 1])).reshape([tokens, m]);
        let hidden = self.activate(pre_activation) * router_weights;

        let v = up.gather(ids).reshape([tokens, m, d_model]);
        hidden.reshape([tokens, 1, m]).matmul(v).reshape([tokens, d_model])
    }

    /// Eq. 5 like [`forward`](Self::forward), differentiable in `x` and `router_weights`, with
    /// row-sparse table gradients: computed by [`forward_detached`](Self::forward_detached) and
    /// recorded as one autodiff node whose backward pass is
    /// [`backward_detached`](Self::backward_detached). The tables' row gradients go to the row
    /// store ([`crate::expert_updates`]), not to `Gradients`. On a device without autodiff this
    /// is `forward_detached`.
    ///
    /// # Shapes
    /// - `x`: `[tokens, d_model]`, `expert_ids`, `router_weights`: `[tokens, m]`
    /// - output: `[tokens, d_model]`
    pub fn forward_row_sparse(
        &self,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
    ) -> Tensor<2> {
        let output = self.forward_detached(x.clone(), expert_ids.clone(), router_weights.clone());
        let backward = ExpertsBackward {
            experts: self.clone(),
            x: x.clone().inner(),
            expert_ids: expert_ids.inner(),
            router_weights: router_weights.clone().inner(),
        };
        custom_op::record([x, router_weights, self.down.anchor()], output, Box::new(backward))
    }

    /// Tokens per block of the detached path.
    fn detached_chunk(&self, device: &Device, m: usize) -> usize {
        let [_, d_model] = self.down.dims();
        (detached_block_bytes(device) / (m * d_model * 4)).max(1)
    }

    /// Eq. 5 like [`forward`](Self::forward), computed without autodiff. On Flex (f32) by the
    /// fused host kernel, expert by expert; elsewhere in token blocks whose gathered rows
    /// (`[block, m, d_model]`, 8 MiB on CPU, 64 MiB on GPU backends) are freed before the next
    /// block. Inputs may live on an autodiff device; the output does not.
    ///
    /// # Shapes
    /// - `x`: `[tokens, d_model]`, `expert_ids`, `router_weights`: `[tokens, m]`
    /// - output: `[tokens, d_model]`
    pub fn forward_detached(&self, x: Tensor<2>, expert_ids: Tensor<2, Int>, router_weights: Tensor<2>) -> Tensor<2> {
        let (x, expert_ids, router_weights) = (x.inner(), expert_ids.inner(), router_weights.inner());
        if let Some(output) = host::experts_forward(self, &x, &expert_ids, &router_weights) {
            return output;
        }
        let [_, m] = expert_ids.dims();
        let chunk = self.detached_chunk(&x.device(), m);
        let (down, up) = (self.down.rows().inner(), self.up.rows().inner());
        self.forward_in_blocks(&down, &up, x, expert_ids, router_weights, chunk)
    }

    /// The vector-Jacobian product of [`forward_detached`](Self::forward_detached): given
    /// dL/dy, returns dL/dx, dL/dg and the table gradients on the retrieved rows only.
    ///
    /// With `a = u·x`, `h = g σ(a)`, `y = Σ h v` (per token, over its m retrieved experts):
    /// `dv = h dy`, `dh = v·dy`, `dg = σ(a) dh`, `da = g σ'(a) dh`, `du = da x`,
    /// `dx = Σ da u`. Nothing from the forward pass is kept. On Flex the host kernel visits the
    /// distinct experts in increasing id order and sums each one's slots into its gradient rows
    /// directly; elsewhere rows are gathered again block by block and slot gradients are summed
    /// per distinct expert with `select_assign`.
    ///
    /// # Shapes
    /// - `x`, `grad_output`: `[tokens, d_model]`; `expert_ids`, `router_weights`: `[tokens, m]`
    pub fn backward_detached(
        &self,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
        grad_output: Tensor<2>,
    ) -> ExpertGradients {
        let (x, expert_ids) = (x.inner(), expert_ids.inner());
        let (router_weights, grad_output) = (router_weights.inner(), grad_output.inner());
        if let Some(grads) = host::experts_backward(self, &x, &expert_ids, &router_weights, &grad_output) {
            return grads;
        }
        let [tokens, d_model] = x.dims();
        let [_, m] = expert_ids.dims();
        let device = x.device();
        let touched = touched_rows(expert_ids.clone().reshape([tokens * m]), self.num_experts());
        let [distinct] = touched.ids.dims();
        let (down, up) = (self.down.rows().inner(), self.up.rows().inner());
        let mut grad_down = Tensor::<2>::zeros([distinct, d_model], &device);
        let mut grad_up = Tensor::<2>::zeros([distinct, d_model], &device);
        let mut grad_x = Vec::new();
        let mut grad_g = Vec::new();
        let chunk = self.detached_chunk(&device, m);
        for start in (0..tokens).step_by(chunk) {
            let len = chunk.min(tokens - start);
            let x = x.clone().narrow(0, start, len);
            let g = router_weights.clone().narrow(0, start, len);
            let dy = grad_output.clone().narrow(0, start, len);
            let ids = expert_ids.clone().narrow(0, start, len).reshape([len * m]);
            let slots = touched.inverse.clone().narrow(0, start * m, len * m);

            let u = down.gather(ids.clone()).reshape([len, m, d_model]);
            let a = u.clone().matmul(x.clone().reshape([len, d_model, 1])).reshape([len, m]);
            let sigma = self.activate(a.clone());
            let v = up.gather(ids).reshape([len, m, d_model]);

            let dh = v.matmul(dy.clone().reshape([len, d_model, 1])).reshape([len, m]);
            let da = dh.clone() * g.clone() * self.activation_derivative(a);
            let dv = (sigma.clone() * g).reshape([len, m, 1]) * dy.reshape([len, 1, d_model]);
            grad_g.push(dh * sigma);
            grad_x.push(da.clone().reshape([len, 1, m]).matmul(u).reshape([len, d_model]));
            let du = da.reshape([len, m, 1]) * x.reshape([len, 1, d_model]);

            grad_down =
                grad_down.select_assign(0, slots.clone(), du.reshape([len * m, d_model]), IndexingUpdateOp::Add);
            grad_up = grad_up.select_assign(0, slots, dv.reshape([len * m, d_model]), IndexingUpdateOp::Add);
        }
        ExpertGradients {
            x: Tensor::cat(grad_x, 0),
            router_weights: Tensor::cat(grad_g, 0),
            rows: RowGradients { ids: touched.ids, down: grad_down, up: grad_up },
        }
    }

    fn activation_derivative(&self, a: Tensor<2>) -> Tensor<2> {
        match self.activation {
            Activation::Relu => a.greater_elem(0.0).float(),
            Activation::Gelu => gelu_derivative(a),
        }
    }

    fn activate<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self.activation {
            Activation::Relu => relu(x),
            Activation::Gelu => gelu(x),
        }
    }
}

/// The backward pass of [`Experts::forward_row_sparse`].
struct ExpertsBackward {
    experts: Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
}

impl Vjp for ExpertsBackward {
    fn backward(self: Box<Self>, grad_output: Tensor<2>) -> Vec<Option<Tensor<2>>> {
        let grads = self.experts.backward_detached(self.x, self.expert_ids, self.router_weights, grad_output);
        expert_updates::deposit(&self.experts, grads.rows);
        vec![Some(grads.x), Some(grads.router_weights), None]
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
        let experts = Experts::init(16, 8, [0.3; 2], Activation::Gelu, None, &device);
        let x = Tensor::<2>::random([7, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let ids: Vec<i64> = (0..7 * 3).map(|i| (i * 5 % 16) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [7, 3]), &device);
        let w = Tensor::<2>::random([7, 3], Distribution::Uniform(0.0, 1.0), &device);
        let (down, up) = (experts.down.rows(), experts.up.rows());
        let whole = experts.forward_in_blocks(&down, &up, x.clone(), ids.clone(), w.clone(), 7);
        let blocks = experts.forward_in_blocks(&down, &up, x.clone(), ids, w, 3);
        whole.clone().into_data().assert_approx_eq::<f32>(&blocks.clone().into_data(), Default::default());
        let g_whole = whole.sum().backward();
        let g_blocks = blocks.sum().backward();
        experts
            .down
            .grad(&g_whole)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&experts.down.grad(&g_blocks).unwrap().into_data(), Default::default());
        x.grad(&g_whole)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&x.grad(&g_blocks).unwrap().into_data(), Default::default());
    }
}

#[cfg(test)]
mod blocked_tests {
    use super::*;
    use burn::tensor::TensorData;

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// The same tables, once whole and once in blocks of 5 rows (the last one shorter).
    fn pair(device: &Device) -> (Experts, Experts) {
        let whole = Experts::init(23, 8, [0.3; 2], Activation::Gelu, None, device);
        let mut blocked = Experts::init(23, 8, [0.3; 2], Activation::Gelu, Some(5 * 8 * 4), device);
        assert_eq!((whole.down.num_blocks(), blocked.down.num_blocks()), (1, 5));
        blocked.down.set(whole.down.val());
        blocked.up.set(whole.up.val());
        (whole, blocked)
    }

    fn inputs(device: &Device) -> (Tensor<2>, Tensor<2, Int>, Tensor<2>) {
        let ids: Vec<i64> = (0..7 * 4).map(|i| (i * 5 % 23) as i64).collect();
        (
            Tensor::random([7, 8], Distribution::Normal(0.0, 1.0), device),
            Tensor::from_data(TensorData::new(ids, [7, 4]), device),
            Tensor::random([7, 4], Distribution::Uniform(0.0, 1.0), device),
        )
    }

    /// Row blocks give the same outputs, dense gradients, row gradients and row updates as
    /// one table.
    #[test]
    fn blocked_tables_equal_one_table() {
        let device = Device::flex().autodiff();
        let (whole, blocked) = pair(&device);
        let (x, ids, w) = inputs(&device);
        let tolerance = Default::default();

        let (a, b) =
            (whole.forward(x.clone(), ids.clone(), w.clone()), blocked.forward(x.clone(), ids.clone(), w.clone()));
        a.clone().into_data().assert_approx_eq::<f32>(&b.clone().into_data(), tolerance);
        let (ga, gb) = (a.sum().backward(), b.sum().backward());
        whole
            .down
            .grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&blocked.down.grad(&gb).unwrap().into_data(), tolerance);
        whole
            .up
            .grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&blocked.up.grad(&gb).unwrap().into_data(), tolerance);

        let dy = Tensor::<2>::random([7, 8], Distribution::Normal(0.0, 1.0), &device.clone().inner());
        let (ra, rb) = (
            whole.backward_detached(x.clone(), ids.clone(), w.clone(), dy.clone()),
            blocked.backward_detached(x.clone(), ids.clone(), w.clone(), dy),
        );
        ra.x.into_data().assert_approx_eq::<f32>(&rb.x.into_data(), tolerance);
        ra.rows.down.clone().into_data().assert_approx_eq::<f32>(&rb.rows.down.into_data(), tolerance);

        let rows = ra.rows.ids;
        let new_a = whole.down.update_rows(&rows, |old| old * 2.0 + 1.0);
        let new_b = blocked.down.update_rows(&rows, |old| old * 2.0 + 1.0);
        new_a.into_data().assert_approx_eq::<f32>(&new_b.into_data(), tolerance);
        assert_eq!(host(whole.down.val().inner()), host(blocked.down.val().inner()));
    }
}
