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
//!   expert the step retrieved. [`Experts::forward_row_sparse`] records the pair as one
//!   autodiff node, whose backward pass leaves the row gradients in the row store
//!   ([`crate::expert_updates`]), and [`SparseAdamWConfig`](crate::SparseAdamWConfig) applies
//!   them.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor};

use crate::config::Activation;
use crate::custom_op::{self, Vjp};
use crate::expert_updates;
use crate::kernels;
use crate::table::{ExpertTable, block_rows};

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
    kernels::touched_rows(expert_ids, num_experts)
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
        kernels::experts_forward_tracked(self, x, expert_ids, router_weights)
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
    pub fn forward_row_sparse(&self, x: Tensor<2>, expert_ids: Tensor<2, Int>, router_weights: Tensor<2>) -> Tensor<2> {
        let (output, pre_activation) =
            kernels::experts_forward(self, x.clone(), expert_ids.clone(), router_weights.clone());
        let backward = ExpertsBackward {
            experts: self.clone(),
            x: x.clone().inner(),
            expert_ids: expert_ids.inner(),
            router_weights: router_weights.clone().inner(),
            pre_activation,
        };
        custom_op::record([x, router_weights, self.down.anchor()], output, Box::new(backward))
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
        kernels::experts_forward(self, x, expert_ids, router_weights).0
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
        kernels::experts_backward(self, x, expert_ids, router_weights, grad_output, None)
    }
}

/// The backward pass of [`Experts::forward_row_sparse`].
struct ExpertsBackward {
    experts: Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
    /// `a = u·x`, where the device family kept it.
    pre_activation: Option<Tensor<2>>,
}

impl Vjp for ExpertsBackward {
    fn backward(self: Box<Self>, grad_output: Tensor<2>) -> Vec<Option<Tensor<2>>> {
        let grads = kernels::experts_backward(
            &self.experts,
            self.x,
            self.expert_ids,
            self.router_weights,
            grad_output,
            self.pre_activation,
        );
        expert_updates::deposit(&self.experts, grads.rows);
        vec![Some(grads.x), Some(grads.router_weights), None]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tensor_ops::forward_in_blocks;
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
        let whole = forward_in_blocks(&experts, &down, &up, x.clone(), ids.clone(), w.clone(), 7);
        let blocks = forward_in_blocks(&experts, &down, &up, x.clone(), ids, w, 3);
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
